//! `FetchConnector` in headless Chromium against real `tidemark serve`
//! processes on other origins (CORS). Run through `tests/with-server.sh`,
//! which starts the servers and sets the `TIDEMARK_TEST_*` variables these
//! tests read at compile time.
#![cfg(target_arch = "wasm32")]

use futures::StreamExt;
use futures::future::{Either, select};
use gloo_timers::future::TimeoutFuture;
use std::future::Future;
use std::rc::Rc;
use std::time::Duration;
use tidemark_core::sse::{Item, Limits, Parser};
use tidemark_core::{
    Clock, Config, ConnectRequest, Connector, EventTracker, Failure, GiveUp, MemStore, Millis,
    ResumableStream, StreamConfig, StreamError, StreamItem, StreamKey, persistence,
};
use tidemark_wasm::{BrowserClock, FetchBody, FetchConnector};
use wasm_bindgen_test::{wasm_bindgen_test, wasm_bindgen_test_configure};
use web_sys::RequestCredentials;

wasm_bindgen_test_configure!(run_in_browser);

const HOW: &str = "run the browser tests through host-wasm/tests/with-server.sh";

/// The chaotic server: ids 1..=100, every connection dropped after 7
/// events, 3 events replayed too many on reconnect, a static page at `/`.
fn chaos() -> &'static str {
    option_env!("TIDEMARK_TEST_SERVER").unwrap_or_else(|| panic!("TIDEMARK_TEST_SERVER: {HOW}"))
}

/// An endless server sending one event a minute: its streams stay open.
fn steady() -> &'static str {
    option_env!("TIDEMARK_TEST_STEADY_SERVER")
        .unwrap_or_else(|| panic!("TIDEMARK_TEST_STEADY_SERVER: {HOW}"))
}

/// A loopback URL nothing listens on.
fn closed() -> &'static str {
    option_env!("TIDEMARK_TEST_CLOSED_URL")
        .unwrap_or_else(|| panic!("TIDEMARK_TEST_CLOSED_URL: {HOW}"))
}

/// Fails the test instead of hanging when `future` does not finish in time.
async fn within<T>(ms: u32, what: &str, future: impl Future<Output = T>) -> T {
    match select(Box::pin(future), TimeoutFuture::new(ms)).await {
        Either::Left((value, _)) => value,
        Either::Right(_) => panic!("{what} did not finish within {ms} ms"),
    }
}

fn request<'a>(url: &'a str, headers: &'a [(String, String)]) -> ConnectRequest<'a> {
    ConnectRequest {
        url,
        headers,
        last_event_id: None,
        body: None,
    }
}

/// A stream of `url` through a fresh connector, its tracker in memory.
fn stream_of(url: &str, config: StreamConfig) -> ResumableStream<FetchConnector, BrowserClock> {
    let tracker = EventTracker::new(StreamKey::new("browser", url), Default::default());
    ResumableStream::new(
        FetchConnector::new(),
        BrowserClock::new(),
        url,
        tracker,
        config,
    )
}

/// Reads `body` until its first event; returns the event's id.
async fn first_event_id(body: &mut FetchBody) -> String {
    let mut parser = Parser::new(Limits::default());
    loop {
        let chunk = within(5000, "an event", body.next())
            .await
            .expect("the stream ended before an event")
            .expect("a chunk");
        parser.feed(&chunk).unwrap();
        while let Some(item) = parser.next_item() {
            if let Item::Event(event) = item {
                return event.id.expect("the server sends ids");
            }
        }
    }
}

fn fast_reconnect() -> StreamConfig {
    StreamConfig::default().with_backoff(Millis(5), Millis(50))
}

#[wasm_bindgen_test]
async fn a_resumable_stream_follows_a_dropping_server_and_delivers_every_id_once() {
    let clock = BrowserClock::new();
    let store = Rc::new(MemStore::new());
    let (registry, worker) = persistence(store.clone(), clock.clone(), Config::default());
    let (worker_done_tx, worker_done) = futures::channel::oneshot::channel();
    wasm_bindgen_futures::spawn_local(async move {
        worker.run().await;
        let _ = worker_done_tx.send(());
    });
    let key = StreamKey::new("browser", "chaos");
    let tracker = registry.open(key.clone()).await.unwrap();
    let url = format!("{}/events", chaos());
    let mut stream = ResumableStream::new(
        FetchConnector::new(),
        clock.clone(),
        url,
        tracker,
        fast_reconnect(),
    );

    // Every item, with the time it came.
    let mut items = Vec::new();
    within(20_000, "100 events", async {
        let mut events = 0;
        while events < 100 {
            let item = stream.next().await.expect("no final error");
            events += usize::from(matches!(item, StreamItem::Event(_)));
            items.push((clock.now(), item));
        }
    })
    .await;
    stream.commit();

    // Per connection: Open (with the id delivered last before it), its
    // events, then Reconnecting; the server never refuses, so no attempt
    // fails before its headers.
    let mut ids = Vec::new();
    let (mut opens, mut reconnects) = (0, 0);
    let mut open = false;
    for (at, item) in &items {
        match item {
            StreamItem::Open { last_event_id } => {
                assert!(!open, "Open twice in a row: {items:?}");
                assert_eq!(last_event_id.as_deref(), ids.last().map(String::as_str));
                open = true;
                opens += 1;
            }
            StreamItem::Event(event) => {
                assert!(open, "an event outside a connection: {items:?}");
                assert_eq!(event.id.as_deref(), Some(event.data.as_str()));
                ids.push(event.data.clone());
            }
            StreamItem::Reconnecting {
                failure,
                retry_at,
                attempt,
            } => {
                assert!(open, "Reconnecting without a connection: {items:?}");
                assert_eq!(
                    failure,
                    &Failure::Network("the server closed the stream".into())
                );
                // The connection received data: the budget starts over.
                assert_eq!(*attempt, 1);
                // Not before the server's `retry: 10`, not long after.
                assert!(*retry_at > *at && *retry_at <= *at + Millis(1000));
                open = false;
                reconnects += 1;
            }
            other => panic!("unexpected item {other:?}"),
        }
    }
    let expected: Vec<String> = (1..=100).map(|n| n.to_string()).collect();
    assert_eq!(ids, expected);
    let stats = stream.stats().clone();
    // 100 events, 7 per connection: at least 14 drops, each followed by a
    // reconnect that replays 3 events too many.
    assert!(reconnects >= 14, "{items:?}");
    assert_eq!(stats.connects, opens);
    assert_eq!(stats.reconnects, reconnects);
    assert!(stats.duplicates >= 3 * 14, "{stats:?}");
    assert_eq!(stats.delivered, 100);
    assert_eq!(
        stats.last_failure,
        Some(Failure::Network("the server closed the stream".into()))
    );
    assert_eq!(stream.last_event_id(), Some("100"));

    drop(stream);
    let report = registry
        .shutdown(clock.now() + Millis::from_secs(5))
        .await
        .unwrap();
    assert!(report.is_complete(), "{report:?}");
    within(5000, "the worker", worker_done).await.unwrap();
    assert_eq!(store.get(&key).unwrap().last_event_id, "100");
}

#[wasm_bindgen_test]
async fn last_event_id_and_custom_headers_are_sent() {
    let connector = FetchConnector::new().credentials(RequestCredentials::Omit);
    let url = format!("{}/events", chaos());

    // The server replays after Last-Event-ID, minus its rewind of 3.
    let mut body = connector
        .connect(ConnectRequest {
            url: &url,
            headers: &[],
            last_event_id: Some("10"),
            body: None,
        })
        .await
        .expect("a stream");
    assert_eq!(first_event_id(&mut body).await, "8");
    drop(body);

    // Extra headers go out with their values: here one the server acts on,
    // plus allowed credentials and MCP headers.
    let headers = [
        ("Last-Event-ID", "50"),
        ("Authorization", "Bearer secret"),
        ("Mcp-Session-Id", "session-1"),
    ]
    .map(|(n, v)| (n.to_owned(), v.to_owned()));
    let mut body = connector
        .connect(request(&url, &headers))
        .await
        .expect("a stream");
    assert_eq!(first_event_id(&mut body).await, "48");
    drop(body);

    // A header the server does not allow fails the CORS preflight; the
    // browser reports that to scripts only as a network error.
    let headers = [("X-Not-Allowed".to_owned(), "1".to_owned())];
    match connector.connect(request(&url, &headers)).await {
        Err(Failure::Network(message)) => assert!(message.contains("TypeError"), "{message}"),
        other => panic!("expected a network failure, got {other:?}"),
    }
}

#[wasm_bindgen_test]
async fn requests_the_browser_cannot_build_fail_permanently() {
    let connector = FetchConnector::new();
    let events = format!("{}/events", chaos());

    let bad_name = [("bad header".to_owned(), "1".to_owned())];
    let bad_value = [("X-Ok".to_owned(), "line\nbreak".to_owned())];
    let cases = [
        ("http://[::1/events", &[][..], "http://[::1"),
        ("ftp://127.0.0.1/events", &[][..], "only http"),
        (events.as_str(), &bad_name[..], "bad header"),
        (events.as_str(), &bad_value[..], "X-Ok"),
    ];
    for (url, headers, expected) in cases {
        match connector.connect(request(url, headers)).await {
            Err(failure @ Failure::Request(_)) => {
                assert!(failure.to_string().contains(expected), "{failure}");
                assert!(!failure.is_retryable());
            }
            other => panic!("{url} {headers:?}: expected a request failure, got {other:?}"),
        }
    }
    // A stream of such a request stops at its first item: no Open, no
    // Reconnecting.
    let mut stream = stream_of("ftp://127.0.0.1/events", fast_reconnect());
    match within(5000, "the stream", stream.next()).await {
        Err(StreamError::GaveUp(GiveUp::Permanent(Failure::Request(message)))) => {
            assert!(message.contains("only http"), "{message}")
        }
        other => panic!("expected a permanent request failure, got {other:?}"),
    }
    assert_eq!(stream.stats().connects, 0);
    assert_eq!(stream.stats().reconnects, 0);

    let bogus = FetchConnector::new().credentials("bogus");
    match bogus.connect(request(&events, &[])).await {
        Err(Failure::Request(message)) => assert!(message.contains("bogus"), "{message}"),
        other => panic!("expected a request failure, got {other:?}"),
    }
    // Credentials by name are applied: `include` needs the server to name
    // the origin and allow credentials, which `tidemark serve` (`*`) does
    // not, so the browser refuses the response.
    let include = FetchConnector::new().credentials("include");
    match include.connect(request(&events, &[])).await {
        Err(Failure::Network(message)) => assert!(message.contains("TypeError"), "{message}"),
        other => panic!("expected a CORS (network) failure, got {other:?}"),
    }
    let omit = FetchConnector::new().credentials(String::from("omit"));
    assert!(omit.connect(request(&events, &[])).await.is_ok());
}

#[wasm_bindgen_test]
async fn not_found_is_a_permanent_status_failure() {
    let url = format!("{}/nope", chaos());
    let not_found = Failure::Status {
        code: 404,
        retry_after: None,
    };
    match FetchConnector::new().connect(request(&url, &[])).await {
        Err(failure) => assert_eq!(failure, not_found),
        other => panic!("expected 404, got {other:?}"),
    }

    // The resumable stream's first item is its final error, and it stays.
    let mut stream = stream_of(&url, fast_reconnect());
    let gave_up = StreamError::GaveUp(GiveUp::Permanent(not_found.clone()));
    assert_eq!(
        within(5000, "the stream", stream.next()).await,
        Err(gave_up.clone())
    );
    assert_eq!(stream.next().await, Err(gave_up));
    let stats = stream.stats();
    assert_eq!((stats.connects, stats.reconnects), (0, 0));
    assert_eq!(stats.last_failure, Some(not_found));
}

#[wasm_bindgen_test]
async fn a_page_is_not_a_stream() {
    let url = format!("{}/", chaos());
    match FetchConnector::new().connect(request(&url, &[])).await {
        Err(failure @ Failure::ContentType(_)) => {
            assert_eq!(
                failure,
                Failure::ContentType("text/html; charset=utf-8".into())
            );
            assert!(!failure.is_retryable());
        }
        other => panic!("expected a content type failure, got {other:?}"),
    }
}

#[wasm_bindgen_test]
async fn a_refused_connection_is_a_retryable_network_failure() {
    let failure = within(
        10_000,
        "the refused connect",
        FetchConnector::new().connect(request(closed(), &[])),
    )
    .await
    .unwrap_err();
    assert!(matches!(failure, Failure::Network(_)), "{failure:?}");
    assert!(failure.is_retryable());

    // The stream: Reconnecting for each refused attempt, counting up, no
    // Open, until the budget of attempts without data runs out.
    let mut config = fast_reconnect();
    config.reconnect.max_attempts = Some(3);
    let clock = BrowserClock::new();
    let mut stream = stream_of(closed(), config);
    for expected in 1..=2 {
        match within(10_000, "a refused attempt", stream.next()).await {
            Ok(StreamItem::Reconnecting {
                failure: Failure::Network(_),
                retry_at,
                attempt,
            }) => {
                assert_eq!(attempt, expected);
                // Backoff from 5 ms, doubling, with jitter.
                assert!(retry_at <= clock.now() + Millis(100), "{retry_at:?}");
            }
            other => panic!("attempt {expected}: expected Reconnecting, got {other:?}"),
        }
    }
    match within(10_000, "the last attempt", stream.next()).await {
        Err(StreamError::GaveUp(GiveUp::Exhausted {
            attempts: 3,
            last: Failure::Network(_),
        })) => {}
        other => panic!("expected the stream to give up, got {other:?}"),
    }
    let stats = stream.stats();
    assert_eq!((stats.connects, stats.reconnects), (0, 2));
}

/// Browsers open at most six HTTP/1.1 connections to one server; a seventh
/// request waits for one of them. That makes leaks visible: a connection
/// that is not aborted keeps its place.
#[wasm_bindgen_test]
async fn dropping_a_body_or_a_pending_connect_aborts_the_request() {
    // Connects that must get a connection may wait long (a loaded machine
    // frees sockets slowly); the one that must not get one gives up soon.
    let connector = FetchConnector::new().connect_timeout(Duration::from_secs(20));
    let impatient = FetchConnector::new().connect_timeout(Duration::from_millis(1500));
    let url = format!("{}/events", steady());
    let req = request(&url, &[]);

    let mut open = Vec::new();
    for i in 0..6 {
        let body = within(5000, "a connect", connector.connect(req)).await;
        open.push(body.unwrap_or_else(|f| panic!("connection {i}: {f}")));
    }
    // The seventh waits for a connection and times out (and is aborted).
    match impatient.connect(req).await {
        Err(Failure::Network(message)) => {
            assert!(message.contains("no response within"), "{message}")
        }
        other => panic!("expected the seventh connection to wait, got {other:?}"),
    }

    // Dropping a body frees its connection at once.
    open.pop();
    let body = connector.connect(req).await.expect("the freed connection");
    open.push(body);

    // A connect dropped while it waits gives up its place in the queue: it
    // does not take the next connection that frees up.
    match select(Box::pin(connector.connect(req)), TimeoutFuture::new(300)).await {
        Either::Left((result, _)) => panic!("the pool should be full, got {result:?}"),
        Either::Right(((), waiting)) => drop(waiting),
    }
    open.pop();
    let body = connector
        .connect(req)
        .await
        .expect("the connection freed after the dropped connect");
    open.push(body);

    // Many more connections than the pool holds, one after another.
    open.clear();
    for i in 0..12 {
        let body = connector.connect(req).await;
        drop(body.unwrap_or_else(|f| panic!("sequential connection {i}: {f}")));
    }
}
