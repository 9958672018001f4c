//! A small SSE source: `GET /events` serves events with ids `1..=count` (each
//! event's data is its id), replays after `Last-Event-ID`, sends keep-alive
//! comments while idle and a `retry:` hint, and, to exercise clients, can
//! drop every connection after a number of events and replay more than was
//! asked for.
//!
//! Browsers on other origins may read it (CORS): every response carries
//! `Access-Control-Allow-Origin: *`, and `OPTIONS` preflights are answered
//! for `GET` with the headers SSE and MCP clients send (`CORS_HEADERS`).

use futures::{Stream, StreamExt};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::header::{
    ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_MAX_AGE, CACHE_CONTROL, CONNECTION, CONTENT_TYPE, HeaderValue,
};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use smol_hyper::rt::FuturesIo;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tidemark_core::sse::{encode_comment, encode_event, encode_retry};

/// What the server serves.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The last id; `None` serves forever.
    pub count: Option<u64>,
    /// Time between two events.
    pub interval: Duration,
    /// Close each connection after this many events (chaos for clients).
    pub drop_every: Option<u64>,
    /// Replay this many events before the client's `Last-Event-ID` (chaos:
    /// a server that cannot tell what arrived); clients must drop them.
    pub rewind: u64,
    /// Send a keep-alive comment after this long without an event.
    pub keep_alive: Duration,
    /// The `retry:` hint sent first on every connection, in milliseconds.
    pub retry_ms: Option<u64>,
    /// Serve static files from this directory for paths other than
    /// `/events` (the browser demo uses this).
    pub www: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            count: None,
            interval: Duration::from_millis(100),
            drop_every: None,
            rewind: 0,
            keep_alive: Duration::from_secs(15),
            retry_ms: Some(1000),
            www: None,
        }
    }
}

/// A bound SSE server; [`run`](SseServer::run) serves until shut down.
pub struct SseServer {
    listener: smol::net::TcpListener,
    config: Arc<ServerConfig>,
}

type Body = BoxBody<Bytes, Infallible>;

impl std::fmt::Debug for SseServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SseServer")
            .field("local_addr", &self.listener.local_addr().ok())
            .field("config", &self.config)
            .finish()
    }
}

impl SseServer {
    /// Binds `addr` (port 0 picks a free port; see [`local_addr`](Self::local_addr)).
    pub async fn bind(addr: SocketAddr, config: ServerConfig) -> io::Result<Self> {
        Ok(SseServer {
            listener: smol::net::TcpListener::bind(addr).await?,
            config: Arc::new(config),
        })
    }

    /// The address the server listens on, with the real port.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts connections until `shutdown` completes; open connections are
    /// closed with it.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> io::Result<()> {
        let accept = async {
            let mut connections = Vec::new();
            loop {
                let (stream, _) = self.listener.accept().await?;
                let config = self.config.clone();
                let service = service_fn(move |request| respond(request, config.clone()));
                connections.push(smol::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(FuturesIo::new(stream), service)
                        .await;
                }));
                connections.retain(|task: &smol::Task<()>| !task.is_finished());
            }
        };
        smol::future::or(accept, async {
            shutdown.await;
            Ok(())
        })
        .await
    }
}

/// The request headers a cross-origin browser may send (answer to a CORS
/// preflight): what SSE and MCP clients need, and nothing else.
const CORS_HEADERS: &str = "Last-Event-ID, Authorization, Content-Type, Cache-Control, Mcp-Session-Id, Mcp-Protocol-Version";

/// How long browsers may cache a preflight answer, in seconds.
const CORS_MAX_AGE: &str = "600";

async fn respond(
    request: Request<Incoming>,
    config: Arc<ServerConfig>,
) -> Result<Response<Body>, Infallible> {
    let mut response = if request.method() == Method::OPTIONS {
        preflight()
    } else {
        serve(request, config).await
    };
    response
        .headers_mut()
        .insert(ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    Ok(response)
}

/// `204` to a CORS preflight: `GET` with [`CORS_HEADERS`].
fn preflight() -> Response<Body> {
    let mut response = Response::new(BodyExt::boxed(http_body_util::Empty::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    let headers = response.headers_mut();
    headers.insert(
        ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET"),
    );
    headers.insert(
        ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static(CORS_HEADERS),
    );
    headers.insert(
        ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static(CORS_MAX_AGE),
    );
    response
}

async fn serve(request: Request<Incoming>, config: Arc<ServerConfig>) -> Response<Body> {
    if request.method() != Method::GET {
        return status(StatusCode::METHOD_NOT_ALLOWED);
    }
    if request.uri().path() != "/events" {
        let file = match &config.www {
            Some(root) => static_file(root, request.uri().path()).await,
            None => None,
        };
        return file.unwrap_or_else(|| status(StatusCode::NOT_FOUND));
    }
    let after = request
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(0, |id| id.saturating_sub(config.rewind));
    let body = StreamBody::new(events(config.clone(), after).map(|bytes| Ok(Frame::data(bytes))));
    let mut response = Response::new(BodyExt::boxed(body));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, "text/event-stream".parse().expect("valid"));
    headers.insert(CACHE_CONTROL, "no-cache".parse().expect("valid"));
    if config.drop_every.is_some() {
        headers.insert(CONNECTION, "close".parse().expect("valid"));
    }
    response
}

fn status(code: StatusCode) -> Response<Body> {
    let reason = code.canonical_reason().unwrap_or("error");
    let mut response = Response::new(Full::new(Bytes::from(format!("{reason}\n"))).boxed());
    *response.status_mut() = code;
    response
}

/// The file under `root` that `path` names (`index.html` for a directory),
/// never one outside `root`.
async fn static_file(root: &Path, path: &str) -> Option<Response<Body>> {
    let relative = Path::new(path.trim_start_matches('/'));
    if relative
        .components()
        .any(|c| !matches!(c, Component::Normal(_)))
    {
        return None;
    }
    let mut file = root.join(relative);
    if file.is_dir() {
        file = file.join("index.html");
    }
    let bytes = smol::fs::read(&file).await.ok()?;
    let content_type = match file.extension().and_then(|e| e.to_str()) {
        Some("html") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript",
        Some("css") => "text/css",
        Some("wasm") => "application/wasm",
        Some("json") => "application/json",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        _ => "application/octet-stream",
    };
    let mut response = Response::new(Full::new(Bytes::from(bytes)).boxed());
    response
        .headers_mut()
        .insert(CONTENT_TYPE, content_type.parse().expect("valid"));
    Some(response)
}

/// How many bytes of events due at once go into one chunk.
const BATCH_BYTES: usize = 64 * 1024;

/// The body of one connection: the `retry:` hint, then events after `after`,
/// keep-alives while idle, and the end after `drop_every` events. With no
/// interval, every event is due at once: they go out in chunks of up to
/// [`BATCH_BYTES`].
fn events(config: Arc<ServerConfig>, after: u64) -> impl Stream<Item = Bytes> + Send {
    struct State {
        config: Arc<ServerConfig>,
        next: u64,
        sent: u64,
        hinted: bool,
        waited: Duration,
    }
    let state = State {
        config,
        next: after + 1,
        sent: 0,
        hinted: false,
        waited: Duration::ZERO,
    };
    futures::stream::unfold(state, |mut s| async move {
        let mut out = Vec::with_capacity(if s.config.interval.is_zero() {
            BATCH_BYTES + 64
        } else {
            64
        });
        if !s.hinted {
            s.hinted = true;
            if let Some(ms) = s.config.retry_ms {
                encode_retry(&mut out, ms);
                return Some((Bytes::from(out), s));
            }
        }
        if s.config.drop_every.is_some_and(|k| s.sent >= k) {
            return None;
        }
        if s.config.count.is_some_and(|n| s.next > n) {
            // Everything is sent: stay open with keep-alives.
            async_io::Timer::after(s.config.keep_alive).await;
            encode_comment(&mut out, "keep-alive");
            return Some((Bytes::from(out), s));
        }
        if s.config.interval.is_zero() {
            // Every event is due now: send as many as fit in one chunk (one
            // write), not one frame and one timer per event.
            while out.len() < BATCH_BYTES
                && s.config.count.is_none_or(|n| s.next <= n)
                && s.config.drop_every.is_none_or(|k| s.sent < k)
            {
                let id = s.next.to_string();
                encode_event(&mut out, None, Some(&id), &id).expect("numeric ids are valid");
                s.next += 1;
                s.sent += 1;
            }
            return Some((Bytes::from(out), s));
        }
        // A gap longer than the keep-alive period is bridged with comments.
        let remaining = s.config.interval.saturating_sub(s.waited);
        if remaining > s.config.keep_alive {
            async_io::Timer::after(s.config.keep_alive).await;
            s.waited += s.config.keep_alive;
            encode_comment(&mut out, "keep-alive");
            return Some((Bytes::from(out), s));
        }
        async_io::Timer::after(remaining).await;
        s.waited = Duration::ZERO;
        let id = s.next.to_string();
        encode_event(&mut out, None, Some(&id), &id).expect("numeric ids are valid");
        s.next += 1;
        s.sent += 1;
        Some((Bytes::from(out), s))
    })
}

/// `tidemark serve`: binds `listen`, prints the bound address (the real port
/// for port 0) as the first line of stdout, and serves until SIGINT or
/// SIGTERM.
pub async fn serve_until_signal(listen: SocketAddr, config: ServerConfig) -> io::Result<()> {
    let server = SseServer::bind(listen, config).await?;
    println!("{}", server.local_addr()?);
    let mut signals =
        async_signal::Signals::new([async_signal::Signal::Int, async_signal::Signal::Term])?;
    server
        .run(async move {
            signals.next().await;
        })
        .await
}

/// The exit status of `tidemark serve`: failure, with the reason on stderr,
/// when it could not serve.
pub fn exit_code(result: &io::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tidemark: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
