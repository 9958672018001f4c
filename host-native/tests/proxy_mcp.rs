//! `tidemark proxy` in front of an MCP Streamable HTTP endpoint (issue 15):
//! the binary before `/mcp` of `support/upstream.rs`, which never replays,
//! driven over raw HTTP on loopback as the MCP transport drives it. The
//! SDK's own client and server run through the proxy in
//! `www/tests/mcp-proxy.test.mjs`.

mod support {
    pub mod http;
    pub mod proxy;
    pub mod serve;
    pub mod upstream;
}

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use support::http::{Event, Item, Sse, get_sse, proxy_id, request};
use support::proxy::{Proxy, seqs, token_of, tokens};
use support::upstream::{Upstream, wait_until};

const SESSION_A: (&str, &str) = ("Mcp-Session-Id", "session-a");
const SESSION_B: (&str, &str) = ("Mcp-Session-Id", "session-b");
const JUNE: (&str, &str) = ("MCP-Protocol-Version", "2025-06-18");
const NOVEMBER: (&str, &str) = ("MCP-Protocol-Version", "2025-11-25");

/// A `tools/call`-like POST to `/mcp` answered with `tokens` events, the
/// ones after `hold` held until the test releases them.
fn call(proxy: &Proxy, query: &str, headers: &[(&str, &str)]) -> (Sse, String) {
    let mut all = vec![
        ("Content-Type", "application/json"),
        ("Accept", "application/json, text/event-stream"),
    ];
    all.extend_from_slice(headers);
    let answer = request(
        &proxy.addr,
        "POST",
        &format!("/mcp?{query}"),
        &all,
        Some(br#"{"jsonrpc":"2.0","id":7,"method":"tools/call"}"#),
    );
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(answer.is_sse(), "{answer:?}");
    let location = answer
        .header("content-location")
        .unwrap_or_else(|| panic!("a logged stream has a Content-Location: {answer:?}"))
        .to_owned();
    (answer.sse(), location)
}

fn answer_done(upstream: &Upstream, n: u64) {
    wait_until("the upstream's answer to end", || {
        upstream.state.chats_done.load(Ordering::SeqCst) == n
    });
}

#[test]
fn a_session_resumes_its_post_stream_by_id_alone_at_the_endpoint() {
    let upstream = Upstream::start();
    let proxy = Proxy::start(&upstream.url(), &[]);
    let (mut first, _) = call(&proxy, "tokens=20&hold=10", &[SESSION_A, JUNE]);
    let half = first.events(10);
    let token = token_of(&half[0]);
    assert_eq!(seqs(&half, &token), tokens(1..=10));
    drop(first); // cut halfway
    upstream.release_chat();
    answer_done(&upstream, 1);

    // The transport resumes with a GET of the endpoint and the id alone.
    let id = format!("{token}-10");
    let resumed = get_sse(
        &proxy.addr,
        "/mcp",
        &[SESSION_A, JUNE, ("Last-Event-ID", &id)],
    );
    assert_eq!(resumed.status, 200, "{resumed:?}");
    assert_eq!(seqs(&resumed.sse().rest(), &token), tokens(11..=20));
    let last = format!("{token}-20");
    let done = get_sse(&proxy.addr, "/mcp", &[SESSION_A, ("Last-Event-ID", &last)]);
    assert_eq!(done.status, 204, "everything was delivered: {done:?}");

    assert_eq!(upstream.state.count("/mcp"), 1, "one POST, no GET upstream");
}

#[test]
fn an_id_of_another_session_resumes_nothing_and_gets_404_like_an_unknown_one() {
    let upstream = Upstream::start();
    let proxy = Proxy::start(&upstream.url(), &[]);
    let (mut a, _) = call(&proxy, "tokens=5", &[SESSION_A]);
    let events = a.rest();
    let token = token_of(&events[0]);
    let id = format!("{token}-2");
    let unknown = format!("{}-2", "0".repeat(32));
    let mut answers = Vec::new();
    for headers in [
        vec![SESSION_B, ("Last-Event-ID", id.as_str())],
        vec![SESSION_B, ("Last-Event-ID", unknown.as_str())],
        vec![SESSION_B, ("Last-Event-ID", "not one of the proxy's ids")],
        vec![
            SESSION_B,
            ("Authorization", "Bearer A"),
            ("Last-Event-ID", &id),
        ],
    ] {
        let answer = get_sse(&proxy.addr, "/mcp", &headers);
        assert_eq!(answer.status, 404, "{headers:?}: {answer:?}");
        let content_type = answer.header("content-type").map(str::to_owned);
        answers.push((content_type, answer.text()));
    }
    assert!(
        answers.windows(2).all(|w| w[0] == w[1]),
        "every refusal alike: {answers:?}"
    );
    assert_eq!(
        upstream.state.count("/mcp"),
        1,
        "no refused GET reached the upstream"
    );
    // Without a session header the id is no MCP resume: the GET goes to
    // the upstream (the live feed here) and the stranger gets a new
    // stream with the unknown gap, none of A's events.
    let mut stranger = get_sse(&proxy.addr, "/mcp", &[("Last-Event-ID", &id)]).sse();
    let first = stranger.next_event().unwrap();
    assert_eq!(first.event.as_deref(), Some("tidemark-gap"), "{first:?}");
    assert_ne!(token_of(&first), token);
    // The session itself resumes it.
    let own = get_sse(&proxy.addr, "/mcp", &[SESSION_A, ("Last-Event-ID", &id)]);
    assert_eq!(own.status, 200, "{own:?}");
    assert_eq!(seqs(&own.sse().rest(), &token), tokens(3..=5));
}

#[test]
fn the_standalone_get_stream_is_logged_shared_and_resumed_by_id() {
    let upstream = Upstream::start();
    let proxy = Proxy::start(&upstream.url(), &[]);
    let mut standalone = get_sse(&proxy.addr, "/mcp", &[SESSION_A]).sse();
    upstream.wait_live_open(1);
    let base = upstream.emit(5) - 5;
    let seen = standalone.events(5);
    let token = token_of(&seen[0]);
    let data: Vec<String> = seen.iter().map(|e| e.data.clone()).collect();
    let expected: Vec<String> = (base + 1..=base + 5).map(|k| k.to_string()).collect();
    assert_eq!(data, expected);
    drop(standalone);
    upstream.emit(3);
    let id = format!("{token}-5");
    let mut resumed = get_sse(&proxy.addr, "/mcp", &[SESSION_A, ("Last-Event-ID", &id)]).sse();
    let rest = resumed.events(3);
    assert_eq!(
        seqs(&rest, &token)
            .iter()
            .map(|(seq, _)| *seq)
            .collect::<Vec<_>>(),
        vec![6, 7, 8]
    );
    assert_eq!(
        upstream.state.count("/mcp"),
        1,
        "one upstream GET for the session's stream"
    );
    // Another session has a stream of its own.
    let _b = get_sse(&proxy.addr, "/mcp", &[SESSION_B]).sse();
    upstream.wait_live_open(2);
}

#[test]
fn clients_of_2025_11_25_get_a_priming_event_first_on_every_stream() {
    let upstream = Upstream::start();
    let proxy = Proxy::start(&upstream.url(), &[]);
    // A POST stream: the priming event names the position before event 1.
    let (mut primed, _) = call(&proxy, "tokens=3&hold=0", &[SESSION_A, NOVEMBER]);
    let priming = primed.next_event().unwrap();
    let (token, seq) = proxy_id(priming.id());
    assert_eq!((seq, priming.data.as_str()), (0, ""), "{priming:?}");
    assert_eq!(priming.event, None);
    // Cut before any message: resumable from the priming id.
    drop(primed);
    upstream.release_chat();
    answer_done(&upstream, 1);
    let from_priming = format!("{token}-0");
    let resumed = get_sse(
        &proxy.addr,
        "/mcp",
        &[SESSION_A, NOVEMBER, ("Last-Event-ID", &from_priming)],
    );
    let mut resumed = resumed.sse();
    let again = resumed.next_event().unwrap();
    assert_eq!(
        (again.id(), again.data.as_str()),
        (from_priming.as_str(), "")
    );
    assert_eq!(seqs(&resumed.rest(), &token), tokens(1..=3));

    // An older revision: no priming.
    let (mut plain, _) = call(&proxy, "tokens=2", &[SESSION_A, JUNE]);
    let first = plain.next_event().unwrap();
    assert_eq!(
        (proxy_id(first.id()).1, first.data.as_str()),
        (1, "{\"i\":1}")
    );

    // The standalone GET stream, joined live after events were logged:
    // primed with the id just before the live position.
    let mut opener = get_sse(&proxy.addr, "/mcp", &[SESSION_B, NOVEMBER]).sse();
    upstream.wait_live_open(1);
    let opening = opener.next_event().unwrap();
    let (get_token, zero) = proxy_id(opening.id());
    assert_eq!((zero, opening.data.as_str()), (0, ""));
    upstream.emit(4);
    assert_eq!(opener.events(4).len(), 4);
    let mut joiner = get_sse(&proxy.addr, "/mcp", &[SESSION_B, NOVEMBER]).sse();
    let joined = joiner.next_event().unwrap();
    assert_eq!(
        (joined.id(), joined.data.as_str()),
        (format!("{get_token}-4").as_str(), "")
    );
    upstream.emit(1);
    assert_eq!(proxy_id(joiner.next_event().unwrap().id()), (get_token, 5));
}

#[test]
fn a_delete_the_upstream_accepts_drops_the_sessions_logs() {
    let upstream = Upstream::start();
    let proxy = Proxy::start(&upstream.url(), &[]);
    let (mut answer, location) = call(&proxy, "tokens=4", &[SESSION_A]);
    let token = token_of(&answer.rest()[0]);
    let mut standalone = get_sse(&proxy.addr, "/mcp", &[SESSION_A]).sse();
    upstream.wait_live_open(1);
    upstream.emit(2);
    assert_eq!(standalone.events(2).len(), 2);
    let (mut b, _) = call(&proxy, "tokens=1", &[SESSION_B]);
    let b_token = token_of(&b.rest()[0]);

    let deleted = request(&proxy.addr, "DELETE", "/mcp", &[SESSION_A], None);
    assert_eq!(deleted.status, 200, "{deleted:?}");
    assert_eq!(
        upstream.state.requests_to("/mcp").last().unwrap().method,
        "DELETE"
    );
    // The standalone stream's client is let go, its follower stops.
    assert_eq!(standalone.rest(), Vec::<Event>::new());
    wait_until("the follower to stop", || {
        upstream.state.live_open.load(Ordering::SeqCst) == 0
    });
    // Nothing of the session resumes any more.
    let id = format!("{token}-1");
    let gone = get_sse(&proxy.addr, "/mcp", &[SESSION_A, ("Last-Event-ID", &id)]);
    assert_eq!(gone.status, 404, "{gone:?}");
    let gone = get_sse(&proxy.addr, &location, &[SESSION_A]);
    assert_eq!(gone.status, 404, "{gone:?}");
    // Another session's stream stays.
    let from_start = format!("{b_token}-0");
    let b = get_sse(
        &proxy.addr,
        "/mcp",
        &[SESSION_B, ("Last-Event-ID", &from_start)],
    );
    assert_eq!(b.status, 200, "{b:?}");
    assert_eq!(seqs(&b.sse().rest(), &b_token), tokens(1..=1));
}

#[test]
fn a_session_the_upstream_forgot_ends_its_logs_but_what_was_logged_stays_resumable() {
    let upstream = Upstream::start();
    let proxy = Proxy::start(&upstream.url(), &[]);
    let mut standalone = get_sse(&proxy.addr, "/mcp", &[SESSION_A]).sse();
    upstream.wait_live_open(1);
    upstream.emit(3);
    let seen = standalone.events(3);
    let token = token_of(&seen[0]);

    upstream.state.forget("session-a"); // a restarted server
    let refused = request(
        &proxy.addr,
        "POST",
        "/mcp",
        &[SESSION_A, ("Content-Type", "application/json")],
        Some(b"{}"),
    );
    assert_eq!(refused.status, 404, "the upstream's 404 passes through");
    // The session's stream ends: its client gets the end, not keep-alives.
    assert_eq!(standalone.rest(), Vec::<Event>::new());
    // What was logged is still there for a client that missed it...
    let id = format!("{token}-1");
    let resumed = get_sse(&proxy.addr, "/mcp", &[SESSION_A, ("Last-Event-ID", &id)]);
    assert_eq!(resumed.status, 200, "{resumed:?}");
    let rest = resumed.sse().rest();
    assert_eq!(
        seqs(&rest, &token)
            .iter()
            .map(|(seq, _)| *seq)
            .collect::<Vec<_>>(),
        vec![2, 3]
    );
    // ...and a client that has it all is told to stop.
    let last = format!("{token}-3");
    let done = get_sse(&proxy.addr, "/mcp", &[SESSION_A, ("Last-Event-ID", &last)]);
    assert_eq!(done.status, 204, "{done:?}");
    // A new standalone GET of the forgotten session is the upstream's 404.
    let again = get_sse(&proxy.addr, "/mcp", &[SESSION_A]);
    assert_eq!(again.status, 404, "{again:?}");
}

#[test]
fn a_follower_whose_session_the_upstream_forgot_ends_the_sessions_logs() {
    let upstream = Upstream::start();
    let proxy = Proxy::start(&upstream.url(), &[]);
    let (mut answer, _) = call(&proxy, "tokens=2", &[SESSION_A]);
    let post_token = token_of(&answer.rest()[0]);
    let mut standalone = get_sse(&proxy.addr, "/mcp", &[SESSION_A]).sse();
    upstream.wait_live_open(1);
    upstream.emit(1);
    assert_eq!(standalone.events(1).len(), 1);
    // The upstream restarts without the session: the follower's reconnect
    // gets 404, and the session's logs end.
    upstream.state.forget("session-a");
    let mut upstream = upstream;
    upstream.stop();
    upstream.resume();
    assert_eq!(standalone.rest(), Vec::<Event>::new());
    let done = get_sse(
        &proxy.addr,
        "/mcp",
        &[SESSION_A, ("Last-Event-ID", &format!("{post_token}-2"))],
    );
    assert_eq!(done.status, 204, "{done:?}");
}

#[test]
fn revision_2026_07_28_streams_pass_through_unlogged_with_keep_alives() {
    let upstream = Upstream::start();
    let proxy = Proxy::start(&upstream.url(), &["--keep-alive-secs", "1"]);
    let answer = request(
        &proxy.addr,
        "POST",
        "/mcp?tokens=3&hold=1",
        &[
            SESSION_A,
            ("MCP-Protocol-Version", "2026-07-28"),
            ("Content-Type", "application/json"),
            ("Accept", "application/json, text/event-stream"),
        ],
        Some(b"{}"),
    );
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(answer.is_sse(), "{answer:?}");
    assert_eq!(answer.header("content-location"), None, "not logged");
    let mut sse = answer.sse();
    let first = sse.next_event().unwrap();
    assert_eq!(first.id(), "c1", "the upstream's own id, unchanged");
    let held = Instant::now();
    match sse.next_item() {
        Some(Item::Comment(text)) => assert_eq!(text, "keep-alive"),
        other => panic!("while the upstream is silent: {other:?}"),
    }
    let waited = held.elapsed();
    assert!(
        waited > Duration::from_millis(800) && waited < Duration::from_secs(4),
        "a keep-alive after 1 s, took {waited:?}"
    );
    upstream.release_chat();
    let rest = sse.rest();
    let ids: Vec<&str> = rest.iter().map(Event::id).collect();
    assert_eq!(ids, ["c2", "c3"]);
}

#[test]
fn a_same_origin_resume_without_origin_finds_the_stream_a_post_with_origin_opened() {
    // Browsers send `Origin` on a same-origin POST but not on a same-origin
    // GET: the resume must still find the stream.
    let upstream = Upstream::start();
    let proxy = Proxy::start(&upstream.url(), &[]);
    let origin = ("Origin", "http://app.test");
    let (mut answer, location) = call(&proxy, "tokens=4&hold=2", &[origin]);
    let half = answer.events(2);
    let token = token_of(&half[0]);
    drop(answer);
    upstream.release_chat();
    answer_done(&upstream, 1);
    let id = format!("{token}-2");
    let resumed = get_sse(&proxy.addr, &location, &[("Last-Event-ID", &id)]);
    assert_eq!(resumed.status, 200, "{resumed:?}");
    assert_eq!(seqs(&resumed.sse().rest(), &token), tokens(3..=4));
    // GET streams are still shared per origin: another origin gets its own
    // upstream answer (its CORS headers may differ).
    let _a = get_sse(&proxy.addr, "/live", &[origin]).sse();
    upstream.wait_live_open(1);
    let _b = get_sse(&proxy.addr, "/live", &[("Origin", "http://other.test")]).sse();
    upstream.wait_live_open(2);
    let _same = get_sse(&proxy.addr, "/live", &[origin]).sse();
    assert_eq!(upstream.state.count("/live"), 2);
}
