//! Upstream servers for the proxy tests: hyper on smol, on a thread of its
//! own, recording every request it sees so that a test can count what
//! reached the upstream. One server has every route:
//!
//! - `GET /live` (any query): a live feed that never replays. Events come
//!   from one global sequence (ids and data `1`, `2`, ...) emitted by the
//!   test ([`Upstream::emit`]); each connection gets those emitted while it
//!   is open and ignores `Last-Event-ID`. It starts with an upstream
//!   `retry:` and a comment, which the proxy must not forward.
//! - `GET /replay?drop=N&count=M&rewind=R`: ids `1..=M` after
//!   `Last-Event-ID`, each event only once the test released it
//!   ([`Upstream::release`]); the connection ends after `N` events, and
//!   stays open once `M` is sent. With `rewind`, a resume starts `R` events
//!   before the one after `Last-Event-ID` (an upstream that replays too
//!   much).
//! - `POST /chat?tokens=K&hold=H&big=B`: an LLM-like answer, `K` events
//!   (`event: token`, upstream ids `c1`...), then the end; events after the
//!   first `H` wait for [`Upstream::release_chat`]. With `big`, the last
//!   event's data has `B` more bytes (a space, then `x`s).
//! - Any request with `hold-head` in its query gets its answer only after
//!   [`Upstream::release_heads`] (an upstream slow to answer).
//! - `GET /json`, `/missing` (404), `/redirect` (302), `/blob` (200 KB of
//!   bytes), each with a custom header and hop-by-hop headers the proxy
//!   must drop; `/echo` (any method) answers the request it saw as JSON.

#![allow(dead_code)] // each test binary uses its own part

use futures::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Method, Request, Response};
use smol_hyper::rt::FuturesIo;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type Body = BoxBody<Bytes, Infallible>;

/// One request the upstream saw.
#[derive(Clone, Debug)]
pub struct Seen {
    /// The method.
    pub method: String,
    /// The path with its query.
    pub target: String,
    /// The header fields, names in lower case.
    pub headers: Vec<(String, String)>,
    /// The request body.
    pub body: Vec<u8>,
}

impl Seen {
    /// The path without the query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or_default()
    }

    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A value tasks can wait on.
#[derive(Default)]
struct Watch {
    inner: Mutex<(u64, Vec<async_channel::Sender<()>>)>,
}

impl Watch {
    fn get(&self) -> u64 {
        self.inner.lock().unwrap().0
    }

    fn set(&self, value: u64) {
        let mut inner = self.inner.lock().unwrap();
        inner.0 = value;
        inner.1.clear(); // closing the channels wakes every waiter
    }

    async fn at_least(&self, value: u64) {
        loop {
            let rx = {
                let mut inner = self.inner.lock().unwrap();
                if inner.0 >= value {
                    return;
                }
                let (tx, rx) = async_channel::bounded(1);
                inner.1.push(tx);
                rx
            };
            let _ = rx.recv().await;
        }
    }
}

/// What the upstream shares with the test.
#[derive(Default)]
pub struct State {
    /// TCP connections accepted.
    pub connections: AtomicU64,
    /// `/live` responses open now.
    pub live_open: AtomicU64,
    /// `/chat` answers sent to their end.
    pub chats_done: AtomicU64,
    seen: Mutex<Vec<Seen>>,
    /// MCP sessions `/mcp` answers 404 for (deleted, or forgotten).
    forgotten: Mutex<std::collections::HashSet<String>>,
    live: Mutex<Live>,
    released: Watch,
    chat_gate: Watch,
    head_gate: Watch,
}

#[derive(Default)]
struct Live {
    last: u64,
    subscribers: Vec<async_channel::Sender<Bytes>>,
}

impl State {
    /// Makes `/mcp` forget MCP session `session`, as a restarted server
    /// would: its requests get 404 from now on.
    pub fn forget(&self, session: &str) {
        self.forgotten.lock().unwrap().insert(session.to_owned());
    }

    /// Every request seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The requests seen for `path` (without query).
    pub fn requests_to(&self, path: &str) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.path() == path)
            .collect()
    }

    /// How many requests for `path` were seen.
    pub fn count(&self, path: &str) -> usize {
        self.requests_to(path).len()
    }
}

/// A running upstream; stops (closing every connection) when dropped.
pub struct Upstream {
    /// Its address, `127.0.0.1:PORT`.
    pub addr: SocketAddr,
    /// What it saw.
    pub state: Arc<State>,
    stop: Option<async_channel::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Upstream {
    /// Binds `127.0.0.1:0` and serves on a thread.
    pub fn start() -> Upstream {
        let state = Arc::new(State::default());
        let listener = smol::block_on(smol::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, thread) = serve(listener, state.clone());
        Upstream {
            addr,
            state,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Stops serving, as if the upstream were killed: the listener is
    /// closed (connecting is refused) and every open connection is cut.
    /// What it saw, and the live feed's sequence, are kept for
    /// [`resume`](Self::resume).
    pub fn stop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    /// Serves again on the same address with the same state (the live feed
    /// goes on from its last id), as a restarted upstream would.
    pub fn resume(&mut self) {
        assert!(self.thread.is_none(), "the upstream is still running");
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match smol::block_on(smol::net::TcpListener::bind(self.addr)) {
                Ok(listener) => break listener,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "rebinding the upstream on {}: {e}",
                        self.addr
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        let (stop, thread) = serve(listener, self.state.clone());
        self.stop = Some(stop);
        self.thread = Some(thread);
    }

    /// Its base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Emits `n` events on the live feed (ids and data continue the global
    /// sequence); returns the last id.
    pub fn emit(&self, n: u64) -> u64 {
        self.emit_padded(n, 0)
    }

    /// Emits `n` events whose data is the id, a space and `pad` bytes.
    pub fn emit_padded(&self, n: u64, pad: usize) -> u64 {
        let mut live = self.state.live.lock().unwrap();
        for _ in 0..n {
            live.last += 1;
            let id = live.last.to_string();
            let data = if pad == 0 {
                id.clone()
            } else {
                format!("{id} {}", "x".repeat(pad))
            };
            let bytes = Bytes::from(format!("id: {id}\ndata: {data}\n\n"));
            live.subscribers
                .retain(|subscriber| subscriber.try_send(bytes.clone()).is_ok());
        }
        live.last
    }

    /// Lets the replay feed send every id up to `id`.
    pub fn release(&self, id: u64) {
        self.state.released.set(id);
    }

    /// Lets every `/chat` answer send its held events.
    pub fn release_chat(&self) {
        self.state.chat_gate.set(1);
    }

    /// Lets `/live?hold-head` requests have their answer.
    pub fn release_heads(&self) {
        self.state.head_gate.set(1);
    }

    /// Waits until exactly `n` `/live` responses are open (each subscribed
    /// to the feed: what is emitted from then on reaches them).
    pub fn wait_live_open(&self, n: u64) {
        wait_until(&format!("{n} open /live responses"), || {
            self.state.live_open.load(Ordering::SeqCst) == n
        });
    }

    /// Waits until `/live` was requested `n` times.
    pub fn wait_live_requests(&self, n: usize) {
        wait_until(&format!("{n} requests to /live"), || {
            self.state.count("/live") >= n
        });
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Serves `listener` on a thread of its own until the sender is dropped;
/// then every connection is cut.
fn serve(
    listener: smol::net::TcpListener,
    shared: Arc<State>,
) -> (async_channel::Sender<()>, std::thread::JoinHandle<()>) {
    let (stop, stopped) = async_channel::bounded::<()>(1);
    let thread = std::thread::spawn(move || {
        smol::block_on(async move {
            let accept = async {
                let mut connections: Vec<smol::Task<()>> = Vec::new();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    shared.connections.fetch_add(1, Ordering::SeqCst);
                    let state = shared.clone();
                    let service = service_fn(move |request| respond(request, state.clone()));
                    connections.push(smol::spawn(async move {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(FuturesIo::new(stream), service)
                            .await;
                    }));
                    connections.retain(|task| !task.is_finished());
                }
            };
            smol::future::or(accept, async {
                let _ = stopped.recv().await;
            })
            .await;
        });
    });
    (stop, thread)
}

/// Polls `condition` every 10 ms until it holds; fails the test after 20 s.
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn query(target: &str) -> HashMap<String, String> {
    target
        .split_once('?')
        .map(|(_, q)| q)
        .unwrap_or_default()
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn full(status: u16, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()).boxed());
    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
    for (name, value) in headers {
        response.headers_mut().append(
            hyper::header::HeaderName::from_bytes(name.as_bytes()).expect("a valid header name"),
            value.parse().expect("a valid header value"),
        );
    }
    response
}

fn sse(body: impl futures::Stream<Item = Bytes> + Send + Sync + 'static) -> Response<Body> {
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(
        body.map(|bytes| Ok::<_, Infallible>(Frame::data(bytes))),
    )));
    let headers = response.headers_mut();
    headers.insert("content-type", "text/event-stream".parse().unwrap());
    headers.insert("cache-control", "no-cache".parse().unwrap());
    response
}

/// The hop-by-hop headers every plain answer carries, which the proxy must
/// not pass on.
const HOP_BY_HOP: [(&str, &str); 3] = [
    ("connection", "x-upstream-hop"),
    ("x-upstream-hop", "dropped"),
    ("keep-alive", "timeout=30"),
];

async fn respond(
    request: Request<Incoming>,
    state: Arc<State>,
) -> Result<Response<Body>, Infallible> {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    let target = parts
        .uri
        .path_and_query()
        .map_or("/".to_owned(), |pq| pq.as_str().to_owned());
    let seen = Seen {
        method: parts.method.to_string(),
        target: target.clone(),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body,
    };
    state.seen.lock().unwrap().push(seen.clone());
    let params = query(&target);
    let last_event_id = seen
        .header("last-event-id")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let custom = [("x-custom", "kept")];
    let with_hops = |extra: &[(&'static str, &'static str)]| -> Vec<(&'static str, &'static str)> {
        custom
            .iter()
            .chain(&HOP_BY_HOP)
            .chain(extra)
            .copied()
            .collect()
    };
    if params.contains_key("hold-head") {
        state.head_gate.at_least(1).await;
    }
    // `/mcp`, a Streamable HTTP endpoint in miniature: a POST is answered
    // like `/chat`, a GET is the live feed, a DELETE ends the session;
    // requests of a session it forgot get 404.
    let session = seen.header("mcp-session-id").unwrap_or_default().to_owned();
    let known = !state.forgotten.lock().unwrap().contains(&session);
    let route = match seen.path() {
        "/mcp" if !known => "/mcp-unknown",
        "/mcp" if parts.method == Method::POST => "/chat",
        "/mcp" if parts.method == Method::GET => "/live",
        path => path,
    };
    let response = match (&parts.method, route) {
        (_, "/mcp-unknown") => full(404, &[], "no such session\n"),
        (&Method::DELETE, "/mcp") => {
            state.forget(&session);
            full(200, &[], "")
        }
        (&Method::GET, "/live") => live(&state),
        (&Method::GET, "/replay") => {
            let drop: u64 = params
                .get("drop")
                .and_then(|v| v.parse().ok())
                .unwrap_or(10);
            let count: u64 = params
                .get("count")
                .and_then(|v| v.parse().ok())
                .unwrap_or(100);
            let rewind: u64 = params
                .get("rewind")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            replay(state.clone(), last_event_id, drop, count, rewind)
        }
        (&Method::POST, "/chat") => {
            let tokens: u64 = params
                .get("tokens")
                .and_then(|v| v.parse().ok())
                .unwrap_or(10);
            let hold: u64 = params
                .get("hold")
                .and_then(|v| v.parse().ok())
                .unwrap_or(tokens);
            let big: usize = params.get("big").and_then(|v| v.parse().ok()).unwrap_or(0);
            chat(state.clone(), tokens, hold, big)
        }
        (&Method::GET, "/json") => full(
            200,
            &with_hops(&[("content-type", "application/json")]),
            r#"{"ok":true,"n":42}"#,
        ),
        (&Method::GET, "/missing") => full(
            404,
            &with_hops(&[("content-type", "text/plain")]),
            "not here\n",
        ),
        (&Method::GET, "/redirect") => full(
            302,
            &with_hops(&[("location", "/json"), ("content-type", "text/plain")]),
            "moved\n",
        ),
        (&Method::GET, "/blob") => full(
            200,
            &with_hops(&[("content-type", "application/octet-stream")]),
            blob(),
        ),
        (_, "/echo") => {
            let headers: serde_json::Map<String, serde_json::Value> = seen
                .headers
                .iter()
                .map(|(n, v)| (n.clone(), serde_json::Value::from(v.clone())))
                .collect();
            let answer = serde_json::json!({
                "method": seen.method,
                "target": seen.target,
                "headers": headers,
                "body": String::from_utf8_lossy(&seen.body),
            });
            full(
                200,
                &[("content-type", "application/json")],
                answer.to_string(),
            )
        }
        _ => full(404, &[], "no route\n"),
    };
    Ok(response)
}

/// The `/blob` body: 200,000 bytes of a pattern.
pub fn blob() -> Vec<u8> {
    (0..200_000u32).map(|i| (i % 251) as u8).collect()
}

/// Decrements `live_open` when the response body is dropped.
struct Open(Arc<State>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.live_open.fetch_sub(1, Ordering::SeqCst);
    }
}

fn live(state: &Arc<State>) -> Response<Body> {
    let (tx, rx) = async_channel::unbounded();
    state.live.lock().unwrap().subscribers.push(tx);
    state.live_open.fetch_add(1, Ordering::SeqCst);
    let open = Open(state.clone());
    let hello = Bytes::from_static(b"retry: 20\n\n: upstream comment\n\n");
    let events = rx.map(move |bytes| {
        let _open = &open;
        bytes
    });
    sse(futures::stream::once(async move { hello }).chain(events))
}

fn replay(state: Arc<State>, after: u64, drop: u64, count: u64, rewind: u64) -> Response<Body> {
    struct S {
        state: Arc<State>,
        next: u64,
        sent: u64,
        hinted: bool,
    }
    let s = S {
        state,
        next: (after + 1).saturating_sub(rewind).max(1),
        sent: 0,
        hinted: false,
    };
    let body = futures::stream::unfold(s, move |mut s| async move {
        if !s.hinted {
            s.hinted = true;
            return Some((Bytes::from_static(b"retry: 20\n\n"), s));
        }
        if s.next > count {
            // Everything is sent: stay open, silent.
            futures::future::pending::<()>().await;
        }
        if s.sent >= drop {
            return None;
        }
        s.state.released.at_least(s.next).await;
        let bytes = Bytes::from(format!("id: {0}\ndata: {0}\n\n", s.next));
        s.next += 1;
        s.sent += 1;
        Some((bytes, s))
    });
    let mut response = sse(body);
    response
        .headers_mut()
        .insert("connection", "close".parse().unwrap());
    response
}

fn chat(state: Arc<State>, tokens: u64, hold: u64, big: usize) -> Response<Body> {
    let body = futures::stream::unfold((state, 1u64), move |(state, i)| async move {
        if i > tokens {
            state.chats_done.fetch_add(1, Ordering::SeqCst);
            return None;
        }
        if i > hold {
            state.chat_gate.at_least(1).await;
        }
        let pad = if i == tokens && big > 0 {
            format!(" {}", "x".repeat(big))
        } else {
            String::new()
        };
        let bytes = Bytes::from(format!(
            "id: c{i}\nevent: token\ndata: {{\"i\":{i}}}{pad}\n\n"
        ));
        Some((bytes, (state, i + 1)))
    });
    sse(body)
}

impl State {
    /// The last id the live feed emitted.
    pub fn live_last(&self) -> u64 {
        self.live.lock().unwrap().last
    }

    /// How far the replay feed is released.
    pub fn released(&self) -> u64 {
        self.released.get()
    }
}

/// The `kill -9` scenario of a proxy with a durable log (`args` say which):
/// a client reads 30 live events, the proxy is killed mid-stream and started
/// again with `args`; a client resuming after the last event it saw and one
/// resuming from the 5th get everything from there, and the stream goes on
/// with the same ids. `written` is called with the stream's token after the
/// first 30 events and after the last (for the log's own checks). The
/// restarted proxy, for more checks.
pub fn kill_9_mid_stream_and_resume(
    upstream: &Upstream,
    args: &[&str],
    mut written: impl FnMut(&str, u64),
) -> super::proxy::Proxy {
    use super::proxy::{Proxy, numbered, open, seqs, token_of, until_cut};
    let mut proxy = Proxy::start(&upstream.url(), args);
    let mut client = open(&proxy, "/live", &[]);
    upstream.wait_live_requests(1);
    upstream.emit(30);
    let seen = client.events(30);
    let token = token_of(&seen[0]);
    assert_eq!(seqs(&seen, &token), numbered(1..=30));
    written(&token, 30);

    proxy.kill9(); // mid-stream: the stream and its upstream are open
    until_cut(&mut client);
    let proxy = Proxy::start(&upstream.url(), args);
    let last_seen = format!("{token}-30");
    let mut resumed = open(&proxy, "/live", &[("Last-Event-ID", &last_seen)]);
    let early_id = format!("{token}-5");
    let mut early = open(&proxy, "/live", &[("Last-Event-ID", &early_id)]);
    // What the client saw before the kill is all still there.
    assert_eq!(seqs(&early.events(25), &token), numbered(6..=30));
    // The restarted proxy follows the upstream again (it resumes after the
    // stored upstream id); new events continue the stream's ids, with no
    // gap signal and nothing repeated.
    upstream.wait_live_requests(2);
    upstream.emit(30);
    assert_eq!(seqs(&resumed.events(30), &token), numbered(31..=60));
    assert_eq!(seqs(&early.events(30), &token), numbered(31..=60));
    written(&token, 60);
    proxy
}
