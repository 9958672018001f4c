//! `tidemark proxy` end to end: the binary in front of the test upstreams
//! of `support/upstream.rs`, driven over raw HTTP on loopback as any client
//! would (issue 14).

mod support {
    pub mod http;
    pub mod proxy;
    pub mod serve;
    pub mod upstream;
}

use std::time::{Duration, Instant};
use support::http::{self, Event, Item, Sse, get, get_sse, proxy_id, request};
use support::proxy::{Proxy, numbered, open, scrape, seqs, token_of, tokens, until_cut};
use support::upstream::{Upstream, blob, kill_9_mid_stream_and_resume, wait_until};

/// A gap signal's JSON.
fn gap(event: &Event) -> serde_json::Value {
    assert_eq!(
        event.event.as_deref(),
        Some("tidemark-gap"),
        "expected the gap signal, got {event:?}"
    );
    serde_json::from_str(&event.data).unwrap_or_else(|e| panic!("gap data {event:?}: {e}"))
}

#[test]
fn the_test_upstream_behaves_as_the_proxy_tests_assume() {
    // The fixtures on their own, no proxy: what the other tests rely on.
    let upstream = Upstream::start();
    let addr = upstream.addr.to_string();

    // The live feed never replays: a second connection asking for
    // everything after 0 gets only what is emitted from then on.
    let mut first = get_sse(&addr, "/live", &[]).sse();
    upstream.wait_live_requests(1);
    upstream.emit(3);
    assert_eq!(first.next_item(), Some(Item::Retry(20)));
    assert_eq!(
        first.next_item(),
        Some(Item::Comment("upstream comment".into()))
    );
    let ids: Vec<String> = first.events(3).into_iter().map(|e| e.data).collect();
    assert_eq!(ids, ["1", "2", "3"]);
    let mut second = get_sse(&addr, "/live", &[("Last-Event-ID", "0")]).sse();
    upstream.wait_live_requests(2);
    upstream.emit(2);
    assert_eq!(second.next_event().unwrap().data, "4");
    assert_eq!(first.events(2)[1].data, "5");
    assert_eq!(
        upstream
            .state
            .live_open
            .load(std::sync::atomic::Ordering::SeqCst),
        2
    );

    // The replay feed: replays after Last-Event-ID, ends every N events.
    upstream.release(25);
    let mut replay = get_sse(&addr, "/replay?drop=10&count=25", &[("Last-Event-ID", "7")]).sse();
    let rest: Vec<String> = replay.rest().into_iter().map(|e| e.data).collect();
    assert_eq!(rest, (8..=17).map(|i| i.to_string()).collect::<Vec<_>>());
    let mut last = get_sse(
        &addr,
        "/replay?drop=10&count=25",
        &[("Last-Event-ID", "20")],
    )
    .sse();
    assert_eq!(last.events(5).last().unwrap().data, "25");
    last.set_timeout(Duration::from_millis(200));
    assert!(
        last.try_item().is_err(),
        "the replay feed stays open at its end"
    );

    // The chat: K events, those after H held until released, then the end.
    let chat = request(
        &addr,
        "POST",
        "/chat?tokens=4&hold=2",
        &[],
        Some(b"{\"q\":1}"),
    );
    let mut chat = chat.sse();
    let held = chat.events(2);
    assert_eq!(held[0].event.as_deref(), Some("token"));
    assert_eq!(held[1].id.as_deref(), Some("c2"));
    upstream.release_chat();
    assert_eq!(chat.rest().len(), 2);
    assert_eq!(
        upstream
            .state
            .chats_done
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    assert_eq!(upstream.state.requests_to("/chat")[0].body, b"{\"q\":1}");

    // Plain answers carry the hop-by-hop headers the proxy must drop.
    let json = get(&addr, "/json", &[]);
    assert_eq!(json.header("x-upstream-hop"), Some("dropped"));
    assert_eq!(json.header("keep-alive"), Some("timeout=30"));
    assert_eq!(json.header("x-custom"), Some("kept"));
    assert_eq!(json.text(), r#"{"ok":true,"n":42}"#);
    assert_eq!(get(&addr, "/blob", &[]).body(), blob());
    assert_eq!(get(&addr, "/redirect", &[]).status, 302);
}

#[test]
fn plain_answers_pass_through_unchanged_and_redirects_are_not_followed() {
    let upstream = Upstream::start();
    let proxy = Proxy::start(&upstream.url(), &[]);

    let json = get(&proxy.addr, "/json", &[("Accept", "application/json")]);
    assert_eq!(json.status, 200);
    assert_eq!(json.header("content-type"), Some("application/json"));
    let asked = &upstream.state.requests_to("/json")[0];
    assert_eq!(
        asked.header("accept"),
        Some("application/json"),
        "the request goes upstream as the client sent it"
    );
    assert_eq!(asked.header("cache-control"), None);
    assert_eq!(json.header("x-custom"), Some("kept"));
    assert_eq!(json.text(), r#"{"ok":true,"n":42}"#);

    let missing = get(&proxy.addr, "/missing", &[]);
    assert_eq!(missing.status, 404);
    assert_eq!(missing.header("x-custom"), Some("kept"));
    assert_eq!(missing.text(), "not here\n");

    let redirect = get(&proxy.addr, "/redirect", &[]);
    assert_eq!(
        redirect.status, 302,
        "a redirect is passed on, not followed"
    );
    assert_eq!(redirect.header("location"), Some("/json"));
    assert_eq!(redirect.header("x-custom"), Some("kept"));
    assert_eq!(redirect.text(), "moved\n");
    assert_eq!(
        upstream.state.count("/json"),
        1,
        "only the client's own GET"
    );

    let big = get(&proxy.addr, "/blob", &[]);
    assert_eq!(big.status, 200);
    assert_eq!(big.header("content-type"), Some("application/octet-stream"));
    assert!(big.body() == blob(), "200 KB of bytes unchanged");

    // Method, path, query and body reach the upstream as sent.
    let body = br#"{"hello":"upstream"}"#;
    let echo = request(
        &proxy.addr,
        "POST",
        "/echo?a=1&b=two%20words",
        &[("Content-Type", "application/json")],
        Some(body),
    );
    assert_eq!(echo.status, 200);
    let seen: serde_json::Value = serde_json::from_slice(&echo.body()).unwrap();
    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["target"], "/echo?a=1&b=two%20words");
    assert_eq!(seen["body"], r#"{"hello":"upstream"}"#);
    assert_eq!(seen["headers"]["content-type"], "application/json");
    assert_eq!(seen["headers"]["host"], upstream.addr.to_string());
}

#[test]
fn hop_by_hop_headers_are_not_forwarded_either_way() {
    let upstream = Upstream::start();
    let proxy = Proxy::start(&upstream.url(), &[]);
    let echo = get(
        &proxy.addr,
        "/echo",
        &[
            ("Connection", "keep-alive, X-Client-Hop"),
            ("X-Client-Hop", "secret"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Trailer", "X-End"),
            ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
            ("X-Kept", "yes"),
            ("Authorization", "Bearer end-to-end"),
        ],
    );
    assert_eq!(echo.status, 200);
    let seen: serde_json::Value = serde_json::from_slice(&echo.body()).unwrap();
    let headers = seen["headers"].as_object().unwrap();
    assert_eq!(headers["x-kept"], "yes");
    assert_eq!(headers["authorization"], "Bearer end-to-end");
    for hop in [
        "x-client-hop",
        "keep-alive",
        "te",
        "trailer",
        "proxy-authorization",
    ] {
        assert!(
            !headers.contains_key(hop),
            "{hop} was forwarded: {headers:?}"
        );
    }
    if let Some(connection) = headers.get("connection") {
        assert!(
            !connection
                .as_str()
                .unwrap()
                .to_ascii_lowercase()
                .contains("x-client-hop"),
            "{connection}"
        );
    }

    // And from the upstream's answer.
    let json = get(&proxy.addr, "/json", &[]);
    assert_eq!(json.status, 200);
    assert_eq!(json.header("x-custom"), Some("kept"));
    assert_eq!(json.header("x-upstream-hop"), None, "{json:?}");
    assert_eq!(json.header("keep-alive"), None, "{json:?}");
    if let Some(connection) = json.header("connection") {
        assert!(
            !connection.to_ascii_lowercase().contains("x-upstream-hop"),
            "{json:?}"
        );
    }
}

#[test]
fn the_client_that_opens_a_stream_gets_it_from_its_first_event_however_fast_the_upstream() {
    // Every event is ready upstream before the stream is asked for, so the
    // proxy's follower (on another executor thread) logs a burst at once;
    // the client that opened the stream must still start at event 1, not
    // wherever the log had got to when its answer was made. (It did not:
    // a million-event stream through the proxy bench then missed its first
    // few thousand events now and then.)
    let upstream = Upstream::start();
    upstream.release(3000);
    let proxy = Proxy::start(&upstream.url(), &["--threads", "4"]);
    for round in 0..30 {
        let path = format!("/replay?drop=100000&count=3000&round={round}");
        let mut client = open(&proxy, &path, &[]);
        let first = client.next_event().expect("an event");
        assert_eq!(
            proxy_id(first.id()).1,
            1,
            "round {round}: the opener's first event"
        );
    }
}

#[test]
fn a_replaying_upstream_that_drops_is_followed_once_for_all_clients() {
    let upstream = Upstream::start();
    let proxy = Proxy::start(&upstream.url(), &[]);
    let path = "/replay?drop=10&count=60";
    let mut clients = vec![open(&proxy, path, &[])];
    wait_until("the proxy's upstream request", || {
        upstream.state.count("/replay") == 1
    });
    clients.push(open(&proxy, path, &[]));
    clients.push(open(&proxy, path, &[]));
    upstream.release(60);
    let mut tokens = Vec::new();
    for (i, client) in clients.iter_mut().enumerate() {
        let events = client.events(60);
        let token = token_of(&events[0]);
        assert_eq!(seqs(&events, &token), numbered(1..=60), "client {i}");
        // Nothing after the 60th: the stream is idle.
        client.set_timeout(Duration::from_millis(300));
        match client.try_item() {
            Err(_) | Ok(Some(Item::Comment(_))) => {}
            other => panic!("client {i}: after the last event: {other:?}"),
        }
        tokens.push(token);
    }
    assert!(
        tokens.windows(2).all(|w| w[0] == w[1]),
        "one stream: {tokens:?}"
    );
    let requests = upstream.state.requests_to("/replay");
    let resumed_from: Vec<Option<&str>> =
        requests.iter().map(|r| r.header("last-event-id")).collect();
    assert_eq!(
        resumed_from,
        [
            None,
            Some("10"),
            Some("20"),
            Some("30"),
            Some("40"),
            Some("50")
        ],
        "one upstream connection per drop (not per client), each resuming with the upstream's own id"
    );
}

#[test]
fn two_hundred_clients_of_one_get_stream_share_one_upstream_connection() {
    let upstream = Upstream::start();
    let proxy = Proxy::start(&upstream.url(), &[]);
    let mut clients = vec![open(&proxy, "/live?room=1", &[])];
    upstream.wait_live_requests(1);
    for _ in 1..200 {
        clients.push(open(&proxy, "/live?room=1", &[]));
    }
    upstream.emit(5);
    let mut token = None;
    for (i, client) in clients.iter_mut().enumerate() {
        let events = client.events(5);
        let t = token.get_or_insert_with(|| token_of(&events[0])).clone();
        assert_eq!(seqs(&events, &t), numbered(1..=5), "client {i}");
    }
    assert_eq!(upstream.state.count("/live"), 1);
    assert_eq!(
        upstream
            .state
            .live_open
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}

#[test]
fn a_client_that_leaves_before_the_upstream_answers_does_not_wedge_the_stream() {
    use std::io::Write;
    let upstream = Upstream::start();
    let proxy = Proxy::start(&upstream.url(), &[]);
    let path = "/live?hold-head";
    let mut impatient = std::net::TcpStream::connect(&proxy.addr).unwrap();
    write!(
        impatient,
        "GET {path} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\r\n",
        proxy.addr
    )
    .unwrap();
    upstream.wait_live_requests(1);
    drop(impatient); // gone while the proxy waits for the upstream's head
    upstream.release_heads();
    // The next client of the same stream is served, by a new upstream
    // request or by the first one's answer.
    let mut next = open(&proxy, path, &[]);
    wait_until("the upstream feed to be open", || {
        upstream
            .state
            .live_open
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 1
    });
    upstream.emit(1);
    assert_eq!(next.next_event().unwrap().data, "1");
}

/// The token in a `Content-Location: /_tidemark/streams/<token>`.
fn location_token(location: &str) -> &str {
    let token = location
        .strip_prefix("/_tidemark/streams/")
        .unwrap_or_else(|| panic!("Content-Location {location:?}"));
    assert!(
        token.len() == 32
            && token
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "Content-Location {location:?}: not 128 bits of lowercase hex"
    );
    token
}

#[test]
fn a_post_stream_resumes_at_its_content_location_then_answers_204() {
    let upstream = Upstream::start();
    let proxy = Proxy::start(&upstream.url(), &[]);
    let auth = ("Authorization", "Bearer A");
    let prompt = br#"{"prompt":"twenty tokens please"}"#;
    let answer = request(
        &proxy.addr,
        "POST",
        "/chat?tokens=20&hold=10",
        &[
            auth,
            ("Content-Type", "application/json"),
            ("Accept", "text/event-stream"),
        ],
        Some(prompt),
    );
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(answer.is_sse(), "{answer:?}");
    let location = answer
        .header("content-location")
        .unwrap_or_else(|| panic!("no Content-Location: {answer:?}"))
        .to_owned();
    location_token(&location);
    let mut first = answer.sse();
    let half = first.events(10);
    let token = token_of(&half[0]);
    assert_eq!(seqs(&half, &token), tokens(1..=10));
    assert!(half.iter().all(|e| e.event.as_deref() == Some("token")));
    drop(first); // the client goes away halfway

    // The upstream answer goes on without any client, to its end.
    upstream.release_chat();
    wait_until("the upstream's answer to end", || {
        upstream
            .state
            .chats_done
            .load(std::sync::atomic::Ordering::SeqCst)
            == 1
    });
    let last_seen = format!("{token}-10");
    let mut resumed = open(&proxy, &location, &[auth, ("Last-Event-ID", &last_seen)]);
    let rest = resumed.rest(); // the stream has ended: the response ends
    assert_eq!(seqs(&rest, &token), tokens(11..=20), "the rest, once");
    assert!(rest.iter().all(|e| e.event.as_deref() == Some("token")));

    let last = format!("{token}-20");
    let done = get_sse(&proxy.addr, &location, &[auth, ("Last-Event-ID", &last)]);
    assert_eq!(done.status, 204, "everything was delivered: {done:?}");

    // Without Last-Event-ID: from the first retained event.
    let all = open(&proxy, &location, &[auth]).rest();
    assert_eq!(seqs(&all, &token), tokens(1..=20));

    let posts = upstream.state.requests_to("/chat");
    assert_eq!(posts.len(), 1, "the upstream saw one POST");
    assert_eq!(posts[0].body, prompt);
    assert_eq!(posts[0].header("authorization"), Some("Bearer A"));
    assert_eq!(posts[0].header("content-type"), Some("application/json"));
}

#[test]
fn kill_9_with_a_log_dir_loses_nothing_a_client_saw() {
    let upstream = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    let args = ["--log", dir.path().to_str().unwrap()];
    kill_9_mid_stream_and_resume(&upstream, &args, |_, _| {});
}

fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn a_new_log_dir_is_0700_and_every_file_in_it_0600() {
    let upstream = Upstream::start();
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("log");
    let proxy = Proxy::start(&upstream.url(), &["--log", dir.to_str().unwrap()]);
    let mut client = open(&proxy, "/live", &[]);
    upstream.wait_live_requests(1);
    upstream.emit(5);
    let token = token_of(&client.events(5)[0]);
    assert!(!token.is_empty());
    assert_eq!(mode(&dir), 0o700);
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let names: Vec<_> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for expected in ["lock", "identity.key"] {
        assert!(names.iter().any(|n| n == expected), "{names:?}");
    }
    assert!(names.iter().any(|n| n.starts_with("segment-")), "{names:?}");
    for file in &files {
        assert_eq!(mode(file), 0o600, "{}", file.display());
    }
    assert!(
        !proxy.stderr().iter().any(|l| l.contains("warning")),
        "{:?}",
        proxy.stderr()
    );
}

#[test]
fn an_existing_log_dir_open_to_others_gets_a_warning_and_still_works() {
    use std::os::unix::fs::PermissionsExt;
    let upstream = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let proxy = Proxy::start(&upstream.url(), &["--log", dir.path().to_str().unwrap()]);
    let warning = proxy.stderr_line("warning");
    assert!(warning.contains("mode 0755"), "{warning}");
    let fix = format!("chmod 700 {}", dir.path().display());
    assert!(warning.contains(&fix), "{warning}");
    let mut client = open(&proxy, "/live", &[]);
    upstream.wait_live_requests(1);
    upstream.emit(5);
    let seen = client.events(5);
    assert_eq!(seqs(&seen, &token_of(&seen[0])), numbered(1..=5));
    assert_eq!(mode(dir.path()), 0o755, "the mode is left to its owner");
    assert_eq!(mode(&dir.path().join("identity.key")), 0o600);
}

#[test]
fn a_resume_older_than_retention_or_unknown_gets_the_gap_signal() {
    let upstream = Upstream::start();
    let proxy = Proxy::start(&upstream.url(), &["--retain", "5"]);
    let mut opener = open(&proxy, "/live", &[]);
    upstream.wait_live_requests(1);
    // One at a time, so that the opener never falls behind the five kept.
    let seen: Vec<Event> = (1..=20)
        .map(|_| {
            upstream.emit(1);
            opener.next_event().unwrap()
        })
        .collect();
    let token = token_of(&seen[0]);
    assert_eq!(seqs(&seen, &token), numbered(1..=20));
    let resume = |id: &str| open(&proxy, "/live", &[("Last-Event-ID", id)]);

    // Retention: 16..=20 are kept, 4..=15 are lost to a client at 3.
    let mut old = resume(&format!("{token}-3"));
    let signal = old.next_event().unwrap();
    assert_eq!(
        gap(&signal),
        serde_json::json!({"reason": "retention", "lost": 12})
    );
    assert_eq!(signal.id.as_deref(), Some(format!("{token}-15").as_str()));
    assert_eq!(seqs(&old.events(5), &token), numbered(16..=20));

    // Within retention: no signal.
    let mut recent = resume(&format!("{token}-17"));
    assert_eq!(seqs(&recent.events(3), &token), numbered(18..=20));

    // Unknown: garbage, and a well-formed id of a stream that does not exist.
    let mut unknown = Vec::new();
    for id in ["garbage", "0123456789abcdef0123456789abcdef-7"] {
        let mut client = resume(id);
        let signal = client.next_event().unwrap();
        assert_eq!(
            gap(&signal),
            serde_json::json!({"reason": "unknown", "lost": null}),
            "Last-Event-ID {id}"
        );
        assert_eq!(signal.id.as_deref(), Some(format!("{token}-15").as_str()));
        assert_eq!(
            seqs(&client.events(5), &token),
            numbered(16..=20),
            "Last-Event-ID {id}"
        );
        unknown.push(client);
    }

    // And all of them go on live.
    upstream.emit(1);
    for client in [&mut opener, &mut old, &mut recent]
        .into_iter()
        .chain(unknown.iter_mut())
    {
        assert_eq!(seqs(&client.events(1), &token), numbered(21..=21));
    }
}

/// Whether two answers are the same but for `Date`.
fn same_answer(a: http::Response, b: http::Response) {
    let strip = |headers: &[(String, String)]| -> Vec<(String, String)> {
        headers
            .iter()
            .filter(|(n, _)| n != "date")
            .cloned()
            .collect()
    };
    assert_eq!(a.status, b.status);
    assert_eq!(strip(&a.headers), strip(&b.headers));
    assert_eq!(a.body(), b.body());
}

#[test]
fn identity_another_identitys_content_location_is_404_like_an_unknown_token() {
    let upstream = Upstream::start();
    let proxy = Proxy::start(&upstream.url(), &[]);
    let a = ("Authorization", "Bearer A");
    let b = ("Authorization", "Bearer B");
    let answer = request(&proxy.addr, "POST", "/chat?tokens=5", &[a], Some(b"{}"));
    assert_eq!(answer.status, 200);
    let location = answer.header("content-location").unwrap().to_owned();
    let events = answer.sse().rest();
    let token = token_of(&events[0]);
    assert_eq!(seqs(&events, &token), tokens(1..=5));
    let nowhere = "/_tidemark/streams/00112233445566778899aabbccddeeff";
    let mid = format!("{token}-2");

    // The owner resumes (the control).
    let mut owner = open(&proxy, &location, &[a, ("Last-Event-ID", &mid)]);
    assert_eq!(seqs(&owner.rest(), &token), tokens(3..=5));

    let unknown = || get_sse(&proxy.addr, nowhere, &[b, ("Connection", "close")]);
    assert_eq!(unknown().status, 404);
    for headers in [
        vec![b],
        vec![b, ("Last-Event-ID", mid.as_str())],
        vec![],
        vec![("Authorization", "Bearer a")],
        vec![a, ("Cookie", "session=other")],
    ] {
        let mut all = headers.clone();
        all.push(("Connection", "close"));
        let other = get_sse(&proxy.addr, &location, &all);
        assert_eq!(other.status, 404, "{headers:?}: {other:?}");
        same_answer(other, unknown());
    }
    assert_eq!(upstream.state.count("/chat"), 1);
}

#[test]
fn identity_a_get_stream_is_never_joined_by_another_identity() {
    let upstream = Upstream::start();
    let proxy = Proxy::start(&upstream.url(), &[]);
    let a = ("Authorization", "Bearer A");
    let mut opened = vec![open(&proxy, "/live", &[a])];
    upstream.wait_live_requests(1);
    opened.push(open(&proxy, "/live", &[a])); // joins
    let others: [&[(&str, &str)]; 4] = [
        &[("Authorization", "Bearer B")],
        &[("Cookie", "session=1")],
        &[("Cookie", "session=2")],
        &[a, ("Mcp-Session-Id", "m1")],
    ];
    for (i, headers) in others.iter().enumerate() {
        opened.push(open(&proxy, "/live", headers));
        upstream.wait_live_requests(2 + i);
        let request = &upstream.state.requests_to("/live")[1 + i];
        for (name, value) in *headers {
            assert_eq!(
                request.header(&name.to_ascii_lowercase()),
                Some(*value),
                "the upstream request of identity {headers:?} carries its own credentials"
            );
        }
    }
    upstream.emit(1);
    let ids: Vec<String> = opened
        .iter_mut()
        .map(|client| {
            let event = client.next_event().unwrap();
            assert_eq!(event.data, "1");
            token_of(&event)
        })
        .collect();
    assert_eq!(ids[0], ids[1], "the same identity shares the stream");
    let mut distinct = ids[1..].to_vec();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 5, "one stream per identity: {ids:?}");
    assert_eq!(
        upstream.state.count("/live"),
        5,
        "one upstream connection per identity"
    );
}

#[test]
fn identity_a_last_event_id_of_another_identity_gets_what_garbage_gets() {
    let upstream = Upstream::start();
    let proxy = Proxy::start(&upstream.url(), &[]);
    let a = ("Authorization", "Bearer A");
    let b = ("Authorization", "Bearer B");
    let mut of_a = open(&proxy, "/live", &[a]);
    upstream.wait_live_requests(1);
    let mut of_b = open(&proxy, "/live", &[b]);
    upstream.wait_live_requests(2);
    upstream.emit(3);
    let token_a = token_of(&of_a.events(3)[0]);
    let token_b = token_of(&of_b.events(3)[0]);
    assert_ne!(token_a, token_b);

    let copied = format!("{token_a}-1");
    let mut with_copied = open(&proxy, "/live", &[b, ("Last-Event-ID", &copied)]);
    let mut with_garbage = open(&proxy, "/live", &[b, ("Last-Event-ID", "garbage")]);
    let copied_got = with_copied.events(4);
    let garbage_got = with_garbage.events(4);
    assert_eq!(copied_got, garbage_got);
    assert_eq!(
        gap(&garbage_got[0]),
        serde_json::json!({"reason": "unknown", "lost": null})
    );
    assert_eq!(seqs(&garbage_got[1..], &token_b), numbered(1..=3));
    // B joined its own stream: no new upstream connection, none to A's.
    assert_eq!(upstream.state.count("/live"), 2);
}

#[test]
fn identity_header_flag_makes_a_header_part_of_the_identity() {
    let upstream = Upstream::start();
    let proxy = Proxy::start(&upstream.url(), &["--identity-header", "X-Api-Key"]);
    let k1 = ("X-Api-Key", "k1");
    let k2 = ("X-Api-Key", "k2");
    let mut first = open(&proxy, "/live", &[k1]);
    upstream.wait_live_requests(1);
    let mut joined = open(&proxy, "/live", &[k1]);
    let mut second = open(&proxy, "/live", &[k2]);
    upstream.wait_live_requests(2);
    assert_eq!(
        upstream.state.requests_to("/live")[1].header("x-api-key"),
        Some("k2")
    );
    upstream.emit(1);
    let t1 = token_of(&first.next_event().unwrap());
    assert_eq!(token_of(&joined.next_event().unwrap()), t1);
    assert_ne!(token_of(&second.next_event().unwrap()), t1);

    let answer = request(&proxy.addr, "POST", "/chat?tokens=3", &[k1], Some(b"{}"));
    let location = answer.header("content-location").unwrap().to_owned();
    answer.sse().rest();
    assert_eq!(get_sse(&proxy.addr, &location, &[k2]).status, 404);
    assert_eq!(get_sse(&proxy.addr, &location, &[]).status, 404);
    assert_eq!(open(&proxy, &location, &[k1]).rest().len(), 3);
    assert_eq!(upstream.state.count("/live"), 2);

    // Without the flag the header is not part of the identity: one stream.
    let plain_upstream = Upstream::start();
    let plain = Proxy::start(&plain_upstream.url(), &[]);
    let mut p1 = open(&plain, "/live", &[k1]);
    plain_upstream.wait_live_requests(1);
    let mut p2 = open(&plain, "/live", &[k2]);
    plain_upstream.emit(1);
    assert_eq!(
        token_of(&p1.next_event().unwrap()),
        token_of(&p2.next_event().unwrap())
    );
    assert_eq!(plain_upstream.state.count("/live"), 1);
}

#[test]
fn header_and_body_caps_answer_431_and_413_and_reach_no_upstream() {
    let upstream = Upstream::start();
    let proxy = Proxy::start(
        &upstream.url(),
        &["--max-header-bytes", "8192", "--max-body-bytes", "1000"],
    );
    let small = "a".repeat(2000);
    let ok = get(&proxy.addr, "/echo?under", &[("X-Big", &small)]);
    assert_eq!(ok.status, 200);
    let big = "a".repeat(12_000);
    let refused = get(&proxy.addr, "/echo?over", &[("X-Big", &big)]);
    assert_eq!(refused.status, 431, "{refused:?}");

    let under = vec![b'x'; 900];
    let ok = request(&proxy.addr, "POST", "/echo?body-under", &[], Some(&under));
    assert_eq!(ok.status, 200);
    let seen: serde_json::Value = serde_json::from_slice(&ok.body()).unwrap();
    assert_eq!(seen["body"].as_str().unwrap().len(), 900);
    let over = vec![b'x'; 5000];
    let refused = request(&proxy.addr, "POST", "/echo?body-over", &[], Some(&over));
    assert_eq!(
        refused.status, 413,
        "Content-Length over the cap: {refused:?}"
    );

    // A chunked body with no Content-Length, over the cap as it arrives.
    let mut chunked = format!(
        "POST /echo?chunked-over HTTP/1.1\r\nHost: {}\r\nTransfer-Encoding: chunked\r\n\r\n",
        proxy.addr
    )
    .into_bytes();
    for _ in 0..5 {
        chunked.extend_from_slice(b"3e8\r\n");
        chunked.extend_from_slice(&[b'y'; 1000]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let refused = http::raw(&proxy.addr, &chunked);
    assert_eq!(
        refused.status, 413,
        "a chunked body over the cap: {refused:?}"
    );

    let targets: Vec<String> = upstream
        .state
        .seen()
        .into_iter()
        .map(|s| s.target)
        .collect();
    assert_eq!(targets, ["/echo?under", "/echo?body-under"]);
}

#[test]
fn max_streams_refuses_another_get_stream_with_503() {
    let upstream = Upstream::start();
    let proxy = Proxy::start(&upstream.url(), &["--max-streams", "1"]);
    let _first = open(&proxy, "/live", &[]);
    upstream.wait_live_requests(1);
    let second = get_sse(&proxy.addr, "/live?another", &[]);
    assert_eq!(second.status, 503, "a second stream: {second:?}");
    let _joined = open(&proxy, "/live", &[]); // no new stream
    assert_eq!(
        get(&proxy.addr, "/json", &[]).status,
        200,
        "plain answers are no stream"
    );
}

#[test]
fn a_post_stream_over_max_streams_is_passed_through_unlogged_and_counted() {
    // The POST has reached the upstream by the time its answer shows it is
    // a stream: refusing it then would lose an answer that was made (and
    // maybe paid for). It goes to the client as it is, not resumable.
    let upstream = Upstream::start();
    let proxy = Proxy::start(
        &upstream.url(),
        &["--max-streams", "1", "--metrics-listen", "127.0.0.1:0"],
    );
    let _first = open(&proxy, "/live", &[]);
    upstream.wait_live_requests(1);
    let chat = request(&proxy.addr, "POST", "/chat?tokens=2", &[], Some(b"{}"));
    assert_eq!(chat.status, 200, "{chat:?}");
    assert_eq!(
        chat.header("content-location"),
        None,
        "not logged: {chat:?}"
    );
    let metrics = scrape(&proxy.metrics_addr());
    assert_eq!(
        metrics["tidemark_proxy_refusals_total{limit=\"streams\"}"],
        1.0
    );
    assert_eq!(metrics["tidemark_proxy_streams{kind=\"post\"}"], 0.0);
}

#[test]
fn max_clients_refuses_another_client_with_503_until_one_leaves() {
    let upstream = Upstream::start();
    let proxy = Proxy::start(&upstream.url(), &["--max-clients", "2"]);
    let first = open(&proxy, "/live", &[]);
    upstream.wait_live_requests(1);
    let _second = open(&proxy, "/live", &[]);
    let third = get_sse(&proxy.addr, "/live", &[]);
    assert_eq!(third.status, 503, "a third client: {third:?}");
    drop(first);
    // Once the proxy sees the first client gone, a new one is let in.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let again = get_sse(&proxy.addr, "/live", &[]);
        if again.status == 200 {
            break;
        }
        assert_eq!(again.status, 503);
        assert!(
            Instant::now() < deadline,
            "the first client's place was never freed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_slow_client_does_not_slow_another() {
    let upstream = Upstream::start();
    let proxy = Proxy::start(&upstream.url(), &[]);
    let mut slow = open(&proxy, "/live", &[]);
    upstream.wait_live_requests(1);
    let mut fast = open(&proxy, "/live", &[]);
    // 300 events of 64 KiB: about 20 MB, far more than the socket buffers
    // of a client that never reads.
    let pad = 64 * 1024;
    upstream.emit_padded(300, pad);
    let started = Instant::now();
    let check = |events: Vec<Event>, who: &str| {
        let token = token_of(&events[0]);
        for (k, event) in (1u64..).zip(&events) {
            assert_eq!(proxy_id(event.id()), (token.clone(), k), "{who}");
            assert!(event.data.starts_with(&format!("{k} ")), "{who}: event {k}");
            assert_eq!(event.data.len(), format!("{k} ").len() + pad, "{who}");
        }
    };
    check(fast.events(300), "the fast client");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the fast client took {:?}",
        started.elapsed()
    );
    // The slow client was stalled all along; it still gets everything.
    check(slow.events(300), "the slow client");
}

#[test]
fn a_connected_client_that_falls_behind_retention_gets_the_gap_signal() {
    let upstream = Upstream::start();
    let proxy = Proxy::start(
        &upstream.url(),
        &["--retain", "5", "--metrics-listen", "127.0.0.1:0"],
    );
    let metrics = proxy.metrics_addr();
    let mut behind = open(&proxy, "/live", &[]);
    upstream.wait_live_requests(1);
    // Far more than the socket buffers of a client that does not read
    // hold, and far more than the log keeps: all logged before the client
    // reads anything.
    let pad = 64 * 1024;
    upstream.emit_padded(200, pad);
    wait_until("the proxy logged all 200", || {
        scrape(&metrics)["tidemark_proxy_events_in_total"] == 200.0
    });
    // Everything up to 200 is accounted for: each event once and in order,
    // and each hole announced by a gap signal that says exactly how many
    // events it lost.
    let mut last = 0;
    let mut gaps = 0;
    let mut token = None;
    while last < 200 {
        let event = behind.next_event().unwrap();
        let (t, seq) = proxy_id(event.id());
        assert_eq!(&t, token.get_or_insert_with(|| t.clone()), "{event:?}");
        if event.event.as_deref() == Some("tidemark-gap") {
            let signal = gap(&event);
            assert_eq!(signal["reason"], "retention", "{event:?}");
            assert_eq!(signal["lost"], seq - last, "lost after {last}: {event:?}");
            gaps += 1;
        } else {
            assert_eq!(seq, last + 1, "after {last}: {}", &event.data[..16]);
            assert!(event.data.starts_with(&format!("{seq} ")));
        }
        last = seq;
    }
    assert!(
        gaps > 0,
        "200 events of 64 KiB through --retain 5 lost none"
    );
}

#[test]
fn an_idle_stream_gets_retry_first_then_keep_alives() {
    let upstream = Upstream::start();
    let proxy = Proxy::start(
        &upstream.url(),
        &["--keep-alive-secs", "1", "--retry-ms", "1234"],
    );
    let mut idle = open(&proxy, "/live", &[]);
    let opened = Instant::now();
    assert_eq!(idle.next_item(), Some(Item::Retry(1234)), "retry: first");
    let mut comments = Vec::new();
    while comments.len() < 2 {
        match idle.next_item() {
            Some(Item::Comment(text)) => comments.push(text),
            other => panic!("on an idle stream after retry: {other:?}"),
        }
    }
    let took = opened.elapsed();
    assert!(
        took > Duration::from_millis(900) && took < Duration::from_secs(4),
        "two keep-alives at 1 s took {took:?}"
    );
    assert!(
        comments.iter().all(|c| c != "upstream comment"),
        "the upstream's comment was forwarded: {comments:?}"
    );
}

#[test]
fn sigterm_and_sigint_exit_0() {
    for signal in ["TERM", "INT"] {
        let upstream = Upstream::start();
        let mut proxy = Proxy::start(&upstream.url(), &[]);
        let mut client = open(&proxy, "/live", &[]);
        upstream.wait_live_requests(1);
        upstream.emit(3);
        client.events(3);
        let status = proxy.signal_and_wait(signal);
        assert!(
            status.success(),
            "SIG{signal}: {status:?}; stderr:\n{}",
            proxy.stderr().join("\n")
        );
        until_cut(&mut client);
    }
}

#[test]
fn sigterm_with_a_log_dir_exits_0_and_the_restart_serves_everything() {
    let upstream = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    let args = ["--log", dir.path().to_str().unwrap()];
    let mut proxy = Proxy::start(&upstream.url(), &args);
    let mut client = open(&proxy, "/live", &[]);
    upstream.wait_live_requests(1);
    upstream.emit(10);
    let token = token_of(&client.events(10)[0]);
    let status = proxy.signal_and_wait("TERM");
    assert!(
        status.success(),
        "{status:?}; stderr:\n{}",
        proxy.stderr().join("\n")
    );
    until_cut(&mut client);
    let proxy = Proxy::start(&upstream.url(), &args);
    let from = format!("{token}-3");
    let mut resumed = open(&proxy, "/live", &[("Last-Event-ID", &from)]);
    assert_eq!(seqs(&resumed.events(7), &token), numbered(4..=10));
}

#[test]
fn metrics_count_events_clients_gaps_and_refusals() {
    let upstream = Upstream::start();
    let proxy = Proxy::start(
        &upstream.url(),
        &[
            "--metrics-listen",
            "127.0.0.1:0",
            "--max-clients",
            "2",
            "--max-body-bytes",
            "100",
            "--max-header-bytes",
            "8192",
        ],
    );
    let metrics = proxy.metrics_addr();
    let value = |name: &str| scrape(&metrics).get(name).copied();
    let eventually = |name: &str, expected: f64| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = value(name);
            if got == Some(expected) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name} is {got:?}, expected {expected}; scrape:\n{:?}",
                scrape(&metrics)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let mut first = open(&proxy, "/live", &[]);
    upstream.wait_live_requests(1);
    let mut second = open(&proxy, "/live", &[]);
    upstream.emit(3);
    let token = token_of(&first.events(3)[0]);
    second.events(3);
    eventually("tidemark_proxy_events_in_total", 3.0);
    eventually("tidemark_proxy_clients", 2.0);
    eventually("tidemark_proxy_streams{kind=\"get\"}", 1.0);
    eventually("tidemark_proxy_upstream_connections", 1.0);
    let out = value("tidemark_proxy_events_out_total").unwrap_or_default();
    assert!(out >= 6.0, "events out {out}");

    assert_eq!(get_sse(&proxy.addr, "/live", &[]).status, 503);
    eventually("tidemark_proxy_refusals_total{limit=\"clients\"}", 1.0);

    drop(second);
    eventually("tidemark_proxy_clients", 1.0);
    let mut garbage = open(&proxy, "/live", &[("Last-Event-ID", "garbage")]);
    gap(&garbage.next_event().unwrap());
    eventually("tidemark_proxy_gaps_total{reason=\"unknown\"}", 1.0);
    drop(garbage);
    eventually("tidemark_proxy_clients", 1.0);
    // Whether the garbage id counted as a resume is the proxy's to say; a
    // good one counts once more.
    let resumes = value("tidemark_proxy_resumes_total").unwrap_or_default();
    let resumed_from = format!("{token}-1");
    let mut resumed = open(&proxy, "/live", &[("Last-Event-ID", &resumed_from)]);
    assert_eq!(seqs(&resumed.events(2), &token), numbered(2..=3));
    eventually("tidemark_proxy_resumes_total", resumes + 1.0);

    let body = [b'x'; 500];
    assert_eq!(
        request(&proxy.addr, "POST", "/echo", &[], Some(&body)).status,
        413
    );
    eventually("tidemark_proxy_refusals_total{limit=\"body_bytes\"}", 1.0);
    let big = "h".repeat(12_000);
    assert_eq!(get(&proxy.addr, "/echo", &[("X-Big", &big)]).status, 431);
    eventually("tidemark_proxy_refusals_total{limit=\"header_bytes\"}", 1.0);
    assert_eq!(
        value("tidemark_proxy_gaps_total{reason=\"unknown\"}"),
        Some(1.0),
        "a good resume is no gap"
    );
}

#[test]
fn a_revived_stream_drops_what_the_upstream_replays_too_much() {
    // An upstream that replays 5 events before the Last-Event-ID it is sent:
    // once the proxy stops following it (linger 0) and a client revives the
    // stream, the follower resumes from the newest upstream id logged and
    // must drop the 5 repeats, which it remembers from the log.
    let server = support::serve::Server::start(&["--interval-ms", "20", "--rewind", "5"]);
    let proxy = Proxy::start(
        &format!("http://{}", server.addr),
        &["--linger-secs", "0", "--metrics-listen", "127.0.0.1:0"],
    );
    let metrics = proxy.metrics_addr();
    let mut first = open(&proxy, "/events", &[]);
    let seen = first.events(10);
    let token = token_of(&seen[0]);
    assert_eq!(seqs(&seen, &token), numbered(1..=10));
    drop(first);
    wait_until("the follower stops after the last client left", || {
        scrape(&metrics)["tidemark_proxy_upstream_connections"] == 0.0
    });
    let mut again = open(&proxy, "/events", &[("Last-Event-ID", seen[9].id())]);
    let events = again.events(40);
    assert_eq!(
        seqs(&events, &token),
        numbered(11..=50),
        "no replayed event logged twice"
    );
    assert!(scrape(&metrics)["tidemark_proxy_upstream_reconnects_total"] == 0.0);
}

/// Every event up to the end of the response, which must come within 5 s
/// (keep-alives or not); fails the test with `what` and the events so far
/// otherwise.
fn to_the_end(sse: &mut Sse, what: &str) -> Vec<Event> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut events = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "{what}: the response did not end; events so far: {events:?}"
        );
        sse.set_timeout(left);
        match sse.try_item() {
            Ok(None) => return events,
            Ok(Some(Item::Event(event))) => events.push(event),
            Ok(Some(_)) => {}
            Err(e) => panic!("{what}: the response did not end ({e}); events so far: {events:?}"),
        }
    }
}

/// One sample of the proxy's metrics at `addr`, if it is there.
fn metric(addr: &str, name: &str) -> Option<f64> {
    scrape(addr).get(name).copied()
}

/// Waits (up to 10 s) until metric `name` at `addr` is `expected`.
fn metric_eventually(addr: &str, name: &str, expected: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = metric(addr, name);
        if got == Some(expected) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} is {got:?}, expected {expected}; scrape:\n{:?}",
            scrape(addr)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How many `/live` responses the upstream has open.
fn live_open(upstream: &Upstream) -> u64 {
    upstream
        .state
        .live_open
        .load(std::sync::atomic::Ordering::SeqCst)
}

#[test]
fn linger_keeps_the_upstream_for_a_returning_client_then_lets_it_go() {
    let upstream = Upstream::start();
    let proxy = Proxy::start(
        &upstream.url(),
        &["--linger-secs", "1", "--metrics-listen", "127.0.0.1:0"],
    );
    let metrics = proxy.metrics_addr();
    let mut first = open(&proxy, "/live", &[]);
    upstream.wait_live_open(1);
    upstream.emit(3);
    let seen = first.events(3);
    let token = token_of(&seen[0]);
    assert_eq!(seqs(&seen, &token), numbered(1..=3));
    drop(first);
    metric_eventually(&metrics, "tidemark_proxy_clients", 0.0);

    // Nobody reads now, but the proxy still follows the (never replaying)
    // upstream and logs what it sends: a page reloading loses nothing.
    upstream.emit(2);
    let last = format!("{token}-3");
    let mut back = open(&proxy, "/live", &[("Last-Event-ID", &last)]);
    assert_eq!(
        seqs(&back.events(2), &token),
        numbered(4..=5),
        "every event since its id, logged while it was away"
    );
    upstream.emit(1);
    assert_eq!(seqs(&back.events(1), &token), numbered(6..=6));
    assert_eq!(
        upstream
            .state
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the upstream saw no new connection"
    );
    assert_eq!(upstream.state.count("/live"), 1);
    assert_eq!(
        metric(&metrics, "tidemark_proxy_upstream_connections"),
        Some(1.0)
    );

    // The last client leaves: the upstream is let go after the linger,
    // not before.
    drop(back);
    let left = Instant::now();
    wait_until("the upstream feed to be closed after the linger", || {
        live_open(&upstream) == 0
    });
    let took = left.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "the upstream was closed {took:?} after the last client left, within --linger-secs 1"
    );
    metric_eventually(&metrics, "tidemark_proxy_upstream_connections", 0.0);
    // The stream itself is retained (--retain-secs 300).
    assert_eq!(
        metric(&metrics, "tidemark_proxy_streams{kind=\"get\"}"),
        Some(1.0)
    );
}

#[test]
fn a_stream_past_retain_secs_that_nobody_follows_is_dropped() {
    let upstream = Upstream::start();
    let proxy = Proxy::start(
        &upstream.url(),
        &[
            "--retain-secs",
            "1",
            "--linger-secs",
            "0",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let metrics = proxy.metrics_addr();
    let mut first = open(&proxy, "/live", &[]);
    upstream.wait_live_open(1);
    upstream.emit(3);
    let token = token_of(&first.events(3)[0]);
    let last_event = Instant::now();
    // The control: while the stream is retained, an old id resumes.
    let from = format!("{token}-1");
    let mut second = open(&proxy, "/live", &[("Last-Event-ID", &from)]);
    assert_eq!(seqs(&second.events(2), &token), numbered(2..=3));
    assert_eq!(
        metric(&metrics, "tidemark_proxy_streams{kind=\"get\"}"),
        Some(1.0)
    );
    drop(first);
    drop(second);

    metric_eventually(&metrics, "tidemark_proxy_streams{kind=\"get\"}", 0.0);
    let took = last_event.elapsed();
    assert!(
        took >= Duration::from_millis(800),
        "dropped {took:?} after its last event, within --retain-secs 1"
    );
    wait_until("the upstream feed to be let go", || {
        live_open(&upstream) == 0
    });

    // The log is gone: an old id is unknown now, and the stream starts
    // over (a new token, a new upstream request).
    let old = format!("{token}-2");
    let mut late = open(&proxy, "/live", &[("Last-Event-ID", &old)]);
    let signal = late.next_event().unwrap();
    assert_eq!(
        gap(&signal),
        serde_json::json!({"reason": "unknown", "lost": null})
    );
    let (fresh, seq) = proxy_id(signal.id());
    assert_ne!(fresh, token, "a dropped stream is not revived");
    assert_eq!(seq, 0);
    upstream.wait_live_open(1);
    upstream.emit(1);
    assert_eq!(
        seqs(&late.events(1), &fresh),
        [(1, "4".to_owned())],
        "then the stream"
    );
    assert_eq!(upstream.state.count("/live"), 2);
    metric_eventually(&metrics, "tidemark_proxy_streams{kind=\"get\"}", 1.0);
    metric_eventually(
        &metrics,
        "tidemark_proxy_gaps_total{reason=\"unknown\"}",
        1.0,
    );
}

#[test]
fn an_upstream_event_over_max_event_bytes_becomes_a_too_large_gap_event() {
    let upstream = Upstream::start();
    let proxy = Proxy::start(
        &upstream.url(),
        &[
            "--max-event-bytes",
            "1000",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let metrics = proxy.metrics_addr();

    // A GET stream: an event under the cap passes; the one over it is
    // dropped and a gap event says so (after the events of the same
    // upstream read: the parser reports a cap per chunk); the stream goes
    // on with one upstream connection.
    let mut clients = vec![open(&proxy, "/live", &[])];
    upstream.wait_live_open(1);
    clients.push(open(&proxy, "/live", &[]));
    upstream.emit_padded(1, 900); // a data line of 908 bytes
    upstream.emit_padded(1, 2000);
    upstream.emit(1);
    let mut token = None;
    for (i, client) in clients.iter_mut().enumerate() {
        let events = client.events(3);
        let (t, _) = proxy_id(events[0].id());
        let token = token.get_or_insert(t).clone();
        assert_eq!(
            events[0].data,
            format!("1 {}", "x".repeat(900)),
            "client {i}"
        );
        let (signals, rest): (Vec<&Event>, Vec<&Event>) = events[1..]
            .iter()
            .partition(|e| e.event.as_deref() == Some("tidemark-gap"));
        assert_eq!(signals.len(), 1, "client {i}: one gap event: {events:?}");
        let signal = gap(signals[0]);
        assert_eq!(signal["reason"], "too_large", "client {i}: {events:?}");
        assert!(signal["lost"].is_null());
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].data, "3", "client {i}: the stream goes on");
        let ids: Vec<u64> = events
            .iter()
            .map(|e| {
                let (t, seq) = proxy_id(e.id());
                assert_eq!(t, token);
                seq
            })
            .collect();
        assert_eq!(ids, [1, 2, 3], "client {i}");
    }
    assert_eq!(live_open(&upstream), 1, "still one upstream connection");
    metric_eventually(
        &metrics,
        "tidemark_proxy_gaps_total{reason=\"too_large\"}",
        1.0,
    );

    // A POST answer: the same, and it is read to its end.
    let small = request(
        &proxy.addr,
        "POST",
        "/chat?tokens=3&big=900",
        &[],
        Some(b"{}"),
    );
    assert_eq!(small.status, 200, "{small:?}");
    let events = to_the_end(&mut small.sse(), "a POST answer under the cap");
    assert_eq!(events.len(), 3, "{events:?}");
    assert_eq!(
        events[2].data,
        format!("{{\"i\":3}} {}", "x".repeat(900)),
        "an event under the cap passes"
    );
    let big = request(
        &proxy.addr,
        "POST",
        "/chat?tokens=3&big=2000",
        &[],
        Some(b"{}"),
    );
    assert_eq!(big.status, 200, "{big:?}");
    let events = to_the_end(&mut big.sse(), "a POST answer over the cap");
    let token = token_of(&events[0]);
    assert_eq!(seqs(&events[..2], &token), tokens(1..=2));
    assert_eq!(events.len(), 3, "{events:?}");
    assert_eq!(gap(&events[2])["reason"], "too_large");
    assert_eq!(proxy_id(events[2].id()), (token, 3));
}

#[test]
fn a_client_back_while_the_upstream_is_down_is_served_from_the_log_until_it_returns() {
    let mut upstream = Upstream::start();
    let proxy = Proxy::start(
        &upstream.url(),
        &["--linger-secs", "0", "--metrics-listen", "127.0.0.1:0"],
    );
    let metrics = proxy.metrics_addr();
    let mut first = open(&proxy, "/live", &[]);
    upstream.wait_live_open(1);
    upstream.emit(5);
    let token = token_of(&first.events(5)[0]);
    drop(first);
    // Nobody reads: with --linger-secs 0 the proxy lets the upstream go.
    upstream.wait_live_open(0);
    metric_eventually(&metrics, "tidemark_proxy_upstream_connections", 0.0);

    upstream.stop();
    assert!(
        std::net::TcpStream::connect(upstream.addr).is_err(),
        "the upstream is down"
    );
    let from = format!("{token}-3");
    let back = get_sse(&proxy.addr, "/live", &[("Last-Event-ID", &from)]);
    assert_eq!(back.status, 200, "served from the log, not a 502: {back:?}");
    assert!(back.is_sse(), "{back:?}");
    let mut back = back.sse();
    assert_eq!(seqs(&back.events(2), &token), numbered(4..=5));
    let failures = metric(&metrics, "tidemark_proxy_upstream_failures_total").unwrap_or(0.0);
    assert!(failures >= 1.0, "upstream failures {failures}");

    // The upstream comes back on the same port: the proxy, retrying all
    // along, resumes it with the upstream's own id of the last event.
    upstream.resume();
    upstream.wait_live_open(1);
    let requests = upstream.state.requests_to("/live");
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert_eq!(
        requests[1].header("last-event-id"),
        Some("5"),
        "the follower resumes with the upstream's Last-Event-ID"
    );
    upstream.emit(2);
    assert_eq!(seqs(&back.events(2), &token), numbered(6..=7));
}

#[test]
fn a_memory_log_lost_in_a_restart_gives_an_old_id_the_unknown_gap_then_the_stream() {
    let upstream = Upstream::start();
    let mut proxy = Proxy::start(&upstream.url(), &[]);
    let mut client = open(&proxy, "/live", &[]);
    upstream.wait_live_open(1);
    upstream.emit(3);
    let token = token_of(&client.events(3)[0]);
    let answer = request(&proxy.addr, "POST", "/chat?tokens=2", &[], Some(b"{}"));
    let location = answer.header("content-location").unwrap().to_owned();
    assert_eq!(answer.sse().rest().len(), 2);

    proxy.kill9();
    until_cut(&mut client);
    upstream.wait_live_open(0);
    let proxy = Proxy::start(&upstream.url(), &[]);
    let old = format!("{token}-3");
    let mut back = open(&proxy, "/live", &[("Last-Event-ID", &old)]);
    let signal = back.next_event().unwrap();
    assert_eq!(
        gap(&signal),
        serde_json::json!({"reason": "unknown", "lost": null}),
        "the log was lost: said, not silent"
    );
    let (fresh, seq) = proxy_id(signal.id());
    assert_ne!(fresh, token);
    assert_eq!(seq, 0);
    upstream.wait_live_open(1);
    upstream.emit(2);
    assert_eq!(
        seqs(&back.events(2), &fresh),
        [(1, "4".to_owned()), (2, "5".to_owned())],
        "then the stream"
    );
    // A POST stream of the lost log is as unknown as one never made.
    assert_eq!(get_sse(&proxy.addr, &location, &[]).status, 404);
}

#[test]
fn kill_9_mid_post_stream_with_a_log_dir_then_its_content_location_serves_what_was_logged() {
    let upstream = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    let args = ["--log", dir.path().to_str().unwrap()];
    let mut proxy = Proxy::start(&upstream.url(), &args);
    let auth = ("Authorization", "Bearer A");
    let answer = request(
        &proxy.addr,
        "POST",
        "/chat?tokens=20&hold=10",
        &[auth, ("Accept", "text/event-stream")],
        Some(b"{}"),
    );
    assert_eq!(answer.status, 200, "{answer:?}");
    let location = answer
        .header("content-location")
        .unwrap_or_else(|| panic!("no Content-Location: {answer:?}"))
        .to_owned();
    let mut reader = answer.sse();
    let seen = reader.events(6);
    let token = token_of(&seen[0]);
    assert_eq!(seqs(&seen, &token), tokens(1..=6));
    // Another reader got all ten the upstream sent so far: all ten were
    // logged (a client sees only what is on disk).
    let mut other = open(&proxy, &location, &[auth]);
    assert_eq!(seqs(&other.events(10), &token), tokens(1..=10));

    proxy.kill9(); // the upstream's answer is still being read
    until_cut(&mut reader);
    until_cut(&mut other);
    let proxy = Proxy::start(&upstream.url(), &args);
    let last_seen = format!("{token}-6");
    let mut resumed = open(&proxy, &location, &[auth, ("Last-Event-ID", &last_seen)]);
    assert_eq!(
        seqs(&to_the_end(&mut resumed, "the resumed POST stream"), &token),
        tokens(7..=10),
        "the rest of what was logged, then the end"
    );
    let last = format!("{token}-10");
    let done = get_sse(&proxy.addr, &location, &[auth, ("Last-Event-ID", &last)]);
    assert_eq!(done.status, 204, "the stream ended at the crash: {done:?}");
    assert_eq!(upstream.state.count("/chat"), 1, "the POST is not repeated");
}

#[test]
fn ids_increase_strictly_across_upstream_reconnects_even_when_the_upstream_replays_too_much() {
    let mut upstream = Upstream::start();
    let proxy = Proxy::start(&upstream.url(), &[]);
    // Each connection ends after 7 events, and each resume starts 3 events
    // before the one after Last-Event-ID: repeats the proxy must drop.
    let path = "/replay?drop=7&count=30&rewind=3";
    let mut first = open(&proxy, path, &[]);
    wait_until("the proxy's upstream request", || {
        upstream.state.count("/replay") == 1
    });
    upstream.release(12);
    let mut all_first = first.events(12);
    let token = token_of(&all_first[0]);
    let from = all_first[4].id().to_owned();
    let mut second = open(&proxy, path, &[("Last-Event-ID", &from)]);
    let mut all_second = second.events(7);
    // The upstream dies mid-connection and comes back.
    upstream.stop();
    upstream.resume();
    upstream.release(30);
    all_first.extend(first.events(18));
    all_second.extend(second.events(18));
    for (who, events, from) in [("first", &all_first, 1), ("second", &all_second, 6)] {
        // proxy_id: each is <32 lowercase hex>-<decimal>.
        let ids: Vec<(String, u64)> = events.iter().map(|e| proxy_id(e.id())).collect();
        assert!(
            ids.windows(2).all(|w| w[0].0 == w[1].0 && w[1].1 > w[0].1),
            "{who}: ids of one stream, strictly increasing: {ids:?}"
        );
        assert_eq!(
            seqs(events, &token),
            numbered(from..=30),
            "{who}: each upstream event once, in order"
        );
    }
    let requests = upstream.state.requests_to("/replay");
    let resumed_from: Vec<Option<&str>> =
        requests.iter().map(|r| r.header("last-event-id")).collect();
    let expected = [
        None,
        Some("7"),
        Some("11"),
        Some("12"), // cut there
        Some("16"),
        Some("20"),
        Some("24"),
        Some("28"),
    ];
    assert_eq!(
        resumed_from, expected,
        "one upstream connection per drop or cut, each resuming with the upstream's own id"
    );
}

// The proxy's own front: GETs without a body are answered without hyper,
// everything else goes to hyper with the bytes read so far replayed.

/// Reads a response head from `reader`: the status line and the header
/// fields (names in lower case).
fn raw_head(reader: &mut impl std::io::BufRead) -> (String, Vec<(String, String)>) {
    let mut status = String::new();
    reader.read_line(&mut status).unwrap();
    assert!(status.ends_with("\r\n"), "status line {status:?}");
    let mut fields = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.ends_with("\r\n"), "header line {line:?}");
        let line = line.trim_end();
        if line.is_empty() {
            return (status.trim_end().to_owned(), fields);
        }
        let (name, value) = line.split_once(':').unwrap();
        fields.push((name.to_ascii_lowercase(), value.trim().to_owned()));
    }
}

/// Reads a chunked body exactly as framed (`<hex>\r\n<data>\r\n`, then
/// `0\r\n\r\n`), failing the test on any other byte; the chunks.
fn raw_chunks(reader: &mut impl std::io::BufRead) -> Vec<Vec<u8>> {
    let mut chunks = Vec::new();
    loop {
        let mut size = String::new();
        reader.read_line(&mut size).unwrap();
        let hex = size
            .strip_suffix("\r\n")
            .unwrap_or_else(|| panic!("chunk size line {size:?}"));
        assert!(
            !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()),
            "chunk size line {size:?}"
        );
        let len = usize::from_str_radix(hex, 16).unwrap();
        let mut chunk = vec![0; len + 2];
        std::io::Read::read_exact(reader, &mut chunk).unwrap();
        assert_eq!(
            &chunk[len..],
            b"\r\n",
            "a chunk of {len} bytes ends with CRLF"
        );
        if len == 0 {
            return chunks;
        }
        chunk.truncate(len);
        chunks.push(chunk);
    }
}

#[test]
fn front_a_keep_alive_connection_takes_gets_a_whole_chunked_stream_then_a_post() {
    use std::io::{BufReader, Write};
    let upstream = Upstream::start();
    let proxy = Proxy::start(&upstream.url(), &[]);
    // A POST stream that ends, so that a resume of it is a whole stream.
    let auth = ("Authorization", "Bearer F");
    let answer = request(
        &proxy.addr,
        "POST",
        "/chat?tokens=5&hold=5",
        &[auth, ("Accept", "text/event-stream")],
        Some(b"{}"),
    );
    assert_eq!(answer.status, 200, "{answer:?}");
    let location = answer.header("content-location").unwrap().to_owned();
    let token = token_of(&answer.sse().rest()[0]);

    let socket = std::net::TcpStream::connect(&proxy.addr).unwrap();
    socket.set_read_timeout(Some(http::TIMEOUT)).unwrap();
    let mut reader = BufReader::new(socket.try_clone().unwrap());
    let send = |head: String| (&socket).write_all(head.as_bytes()).unwrap();
    let host = &proxy.addr;

    // A plain answer, with its length, twice on the same connection.
    for _ in 0..2 {
        send(format!("GET /json HTTP/1.1\r\nHost: {host}\r\n\r\n"));
        let (status, fields) = raw_head(&mut reader);
        assert_eq!(status, "HTTP/1.1 200 OK");
        let length = fields.iter().find(|(n, _)| n == "content-length");
        let body = r#"{"ok":true,"n":42}"#;
        assert_eq!(length.map(|(_, v)| v.as_str()), Some("18"), "{fields:?}");
        let mut got = vec![0; body.len()];
        std::io::Read::read_exact(&mut reader, &mut got).unwrap();
        assert_eq!(got, body.as_bytes());
    }

    // The stream from its first event: chunked, to its last chunk.
    send(format!(
        "GET {location} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\nAuthorization: Bearer F\r\n\r\n"
    ));
    let (status, fields) = raw_head(&mut reader);
    assert_eq!(status, "HTTP/1.1 200 OK");
    let field = |name: &str| {
        fields
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect::<Vec<_>>()
    };
    assert_eq!(field("transfer-encoding"), ["chunked"], "{fields:?}");
    assert_eq!(field("content-type"), ["text/event-stream"], "{fields:?}");
    assert_eq!(field("cache-control"), ["no-cache"], "{fields:?}");
    assert!(field("content-length").is_empty(), "{fields:?}");
    assert_eq!(field("date").len(), 1, "{fields:?}");
    let chunks = raw_chunks(&mut reader);
    assert!(!chunks.is_empty());
    let text = String::from_utf8(chunks.concat()).unwrap();
    assert!(text.starts_with("retry: 1000\n"), "{text:?}");
    let ids: Vec<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("id: "))
        .collect();
    let expected: Vec<String> = (1..=5).map(|seq| format!("{token}-{seq}")).collect();
    assert_eq!(ids, expected, "{text:?}");

    // Then a POST on the same connection, which hyper answers.
    send(format!(
        "POST /echo?after HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\n\r\nhello"
    ));
    drop(reader);
    let echo = http::read_response(socket.try_clone().unwrap());
    assert_eq!(echo.status, 200, "{echo:?}");
    let seen: serde_json::Value = serde_json::from_slice(&echo.body()).unwrap();
    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["target"], "/echo?after");
    assert_eq!(seen["body"], "hello");
    let to_json = upstream.state.count("/json");
    assert_eq!(to_json, 2, "each GET of /json reached the upstream");
}

#[test]
fn front_a_head_over_max_header_bytes_gets_431_whatever_the_method() {
    let upstream = Upstream::start();
    let proxy = Proxy::start(
        &upstream.url(),
        &[
            "--max-header-bytes",
            "10000",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let metrics = proxy.metrics_addr();
    // Under the cap, but over a first read of the head.
    let under = "u".repeat(9000);
    let ok = get_sse(&proxy.addr, "/echo?under", &[("X-Big", &under)]);
    assert_eq!(ok.status, 200, "{ok:?}");
    let over = "o".repeat(10_000);
    let refused = get_sse(&proxy.addr, "/live?over", &[("X-Big", &over)]);
    assert_eq!(refused.status, 431, "{refused:?}");
    assert_eq!(refused.header("content-length"), Some("0"));
    let refused = request(
        &proxy.addr,
        "POST",
        "/echo?over",
        &[("X-Big", &over)],
        Some(b"x"),
    );
    assert_eq!(refused.status, 431, "{refused:?}");
    metric_eventually(
        &metrics,
        "tidemark_proxy_refusals_total{limit=\"header_bytes\"}",
        2.0,
    );
    let targets: Vec<String> = upstream
        .state
        .seen()
        .into_iter()
        .map(|s| s.target)
        .collect();
    assert_eq!(targets, ["/echo?under"]);
}

#[test]
fn front_http_1_0_and_head_go_through_hyper() {
    use std::io::{BufReader, Write};
    let upstream = Upstream::start();
    let proxy = Proxy::start(&upstream.url(), &[]);
    // HTTP/1.0 knows no chunks: hyper ends the stream's body with the
    // connection, which the front never does.
    let old = http::raw(
        &proxy.addr,
        b"GET /live HTTP/1.0\r\nAccept: text/event-stream\r\n\r\n",
    );
    assert_eq!(old.status, 200, "{old:?}");
    assert!(old.is_sse(), "{old:?}");
    assert_eq!(old.header("transfer-encoding"), None, "{old:?}");
    let mut old = old.sse();
    upstream.wait_live_open(1);
    upstream.emit(2);
    assert_eq!(old.events(2).len(), 2);

    // HEAD: the head alone, and the connection goes on.
    let socket = std::net::TcpStream::connect(&proxy.addr).unwrap();
    socket.set_read_timeout(Some(http::TIMEOUT)).unwrap();
    let mut reader = BufReader::new(socket.try_clone().unwrap());
    let host = &proxy.addr;
    (&socket)
        .write_all(format!("HEAD /echo HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .unwrap();
    let (status, fields) = raw_head(&mut reader);
    assert_eq!(status, "HTTP/1.1 200 OK", "{fields:?}");
    assert!(
        fields
            .iter()
            .any(|(n, v)| n == "content-type" && v == "application/json"),
        "{fields:?}"
    );
    (&socket)
        .write_all(format!("GET /missing HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .unwrap();
    let (status, _) = raw_head(&mut reader);
    assert_eq!(
        status, "HTTP/1.1 404 Not Found",
        "no body came after HEAD's head"
    );
    let seen = upstream.state.requests_to("/echo");
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, "HEAD");
}

#[test]
fn front_a_client_that_leaves_an_idle_stream_is_counted_out_at_once() {
    use std::io::Write;
    let upstream = Upstream::start();
    // No keep-alive within the test: only the read side can tell that the
    // client left.
    let proxy = Proxy::start(
        &upstream.url(),
        &[
            "--keep-alive-secs",
            "600",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let metrics = proxy.metrics_addr();
    let mut staying = open(&proxy, "/live", &[]);
    upstream.wait_live_open(1);
    let leaving = open(&proxy, "/live", &[]);
    metric_eventually(&metrics, "tidemark_proxy_clients", 2.0);
    drop(leaving);
    metric_eventually(&metrics, "tidemark_proxy_clients", 1.0);

    // Bytes sent mid-stream (a pipelined request) are no leaving.
    (&staying.socket)
        .write_all(b"GET /json HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    upstream.emit(3);
    assert_eq!(staying.events(3).len(), 3);
    assert_eq!(metric(&metrics, "tidemark_proxy_clients"), Some(1.0));
    staying.socket.shutdown(std::net::Shutdown::Both).unwrap();
    drop(staying);
    metric_eventually(&metrics, "tidemark_proxy_clients", 0.0);
}
