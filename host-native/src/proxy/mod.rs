//! `tidemark proxy`: any SSE endpoint made resumable, for any client.
//!
//! The proxy sits between clients (a browser's plain `EventSource`, curl,
//! tidemark's own clients) and one upstream service. Every request goes to
//! the upstream with its path, query and headers (those of the connection
//! removed); an answer that is not `text/event-stream` comes back
//! unchanged. An event stream becomes a *logged stream*: the proxy reads it
//! from the upstream, appends each event to the stream's replay log
//! (`tidemark_core::replay`), and serves every client from the log, each at
//! its own pace, with ids of its own that the client echoes as
//! `Last-Event-ID` to resume with nothing lost and nothing repeated.
//!
//! - **GET streams** are shared by every request with the same path, query
//!   and identity: one upstream connection, followed with the core's
//!   `ResumableStream` (reconnects with the upstream's own ids, its replays
//!   dropped), open while a client is connected and for `linger` after the
//!   last one leaves. A client without `Last-Event-ID` joins live.
//! - **POST streams**: each POST answered with a stream is its own stream,
//!   read to its end whether or not the client stays. The answer carries
//!   `Content-Location: /_tidemark/streams/<token>`; a GET there resumes
//!   after `Last-Event-ID` (from the first event without one), and answers
//!   `204 No Content` once the stream has ended and the client has it all.
//! - **Ids** are `<token>-<seq>`: the stream's 128-bit random token and a
//!   sequence number from 1, strictly increasing.
//! - **Gaps are never silent**: resuming from an id older than the log
//!   retains, or one the stream never issued, first gives an event of type
//!   `tidemark-gap` whose data is `{"reason":"retention","lost":N}` or
//!   `{"reason":"unknown","lost":null}`, then the oldest retained event on.
//! - **Identity**: a stream belongs to a keyed hash of the `Authorization`,
//!   `Cookie` and `Mcp-Session-Id` headers and of each `--identity-header`
//!   it was opened with; for any other identity it does not exist. GET
//!   streams are shared per `Origin` too.
//! - **MCP** Streamable HTTP is recognised by its headers (see `mcp.rs`):
//!   a session's GET resumes any of its streams by `Last-Event-ID` alone.
//! - **Storage** ([`LogStorage`]): memory by default ([`MemoryLog`]), a
//!   directory ([`FileLog`]) or Redis Streams ([`RedisLog`]); with a
//!   durable storage, every event is written (group commits on a thread of
//!   their own) before any client sees it, so what a client saw survives a
//!   crash. While a storage on a server fails (a Redis outage), clients are
//!   served from memory and the writes are retried until it is back.
//! - **Fleet**: with Redis, every instance serves every stream; one writes
//!   each (holding its lease), the others mirror it (see `fleet.rs`).
//! - **Connections**: the proxy's own HTTP/1.1 front reads every request
//!   head and answers a GET without a body itself, so an idle client costs
//!   its socket, its task and its reader (about 2 KB); anything else goes
//!   to hyper for the rest of its connection.

mod client;
mod file_log;
mod fleet;
mod front;
mod http;
mod hub;
mod mcp;
mod redis_log;
mod storage;
mod upstream;

pub use file_log::FileLog;
pub use fleet::STANDBY_PERIOD;
pub use http::STREAMS_PATH;
pub use redis_log::{COMMANDS_PER_ROUND_TRIP, MAX_TAIL_BLOCK, RedisLog, TRIM_STEP};
pub use storage::{LogOp, LogStorage, MemoryLog, StoredStream, StreamKind, StreamMeta};

use crate::HttpConnector;
use crate::metrics::{Format, ProxyMetrics, serve_metrics};
use futures::StreamExt;
use hub::Hub;
use hyper::header::HeaderName;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tidemark_core::Clock;
use tidemark_core::replay::Retention;
use tidemark_core::sse::Limits as ParserLimits;

/// The proxy's bounds; each refusal has its own answer.
#[derive(Clone, Debug)]
pub struct ProxyLimits {
    /// Most logged streams held at once (`503` beyond).
    pub max_streams: usize,
    /// Most clients reading logged streams at once (`503` beyond).
    pub max_clients: usize,
    /// Largest upstream event or line (beyond, it is dropped and a
    /// `too_large` gap event logged in its place).
    pub max_event_bytes: usize,
    /// Largest request head (`431` beyond; at least 8 KiB).
    pub max_header_bytes: usize,
    /// Largest request body (`413` beyond).
    pub max_body_bytes: usize,
}

impl Default for ProxyLimits {
    fn default() -> Self {
        ProxyLimits {
            max_streams: 10_000,
            max_clients: 50_000,
            max_event_bytes: 1 << 20,
            max_header_bytes: 64 << 10,
            max_body_bytes: 1 << 20,
        }
    }
}

impl ProxyLimits {
    /// The parser caps for upstream bodies.
    pub fn parser(&self) -> ParserLimits {
        ParserLimits {
            max_line: self.max_event_bytes,
            max_event: self.max_event_bytes,
        }
    }
}

/// What the proxy fronts and how.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// The upstream base URL; a request's path and query are joined to it.
    pub upstream: url::Url,
    /// How much of each stream is kept, and for how long.
    pub retention: Retention,
    /// A keep-alive comment to every client this often.
    pub keep_alive: Duration,
    /// How long a GET stream is followed after its last client left.
    pub linger: Duration,
    /// The `retry:` hint sent to every client, in milliseconds.
    pub retry_ms: u64,
    /// Headers that are part of a request's identity, beyond
    /// `Authorization`, `Cookie` and `Mcp-Session-Id`.
    pub identity_headers: Vec<HeaderName>,
    /// How long the upstream may take to answer a request's head.
    pub upstream_timeout: Duration,
    /// The bounds.
    pub limits: ProxyLimits,
    /// Threads that run connections and upstream streams.
    pub threads: usize,
}

impl ProxyConfig {
    /// Defaults for `upstream`: 15 s keep-alives, 60 s linger, `retry: 1000`,
    /// a thread per core.
    pub fn new(upstream: url::Url) -> Self {
        ProxyConfig {
            upstream,
            retention: Retention::default(),
            keep_alive: Duration::from_secs(15),
            linger: Duration::from_secs(60),
            retry_ms: 1000,
            identity_headers: Vec::new(),
            upstream_timeout: Duration::from_secs(300),
            limits: ProxyLimits::default(),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }

    /// The upstream URL of a request for `target` (its path and query).
    fn upstream_url(&self, target: &str) -> String {
        let base = self.upstream.as_str().trim_end_matches('/');
        let base = base.split_once('?').map_or(base, |(b, _)| b);
        format!("{base}{target}")
    }

    /// The connectors for GET streams and for other requests, which may
    /// take long to answer (a tool call answered with JSON once it is
    /// done). Neither follows redirects: they are the client's business.
    fn connectors(&self) -> (HttpConnector, HttpConnector) {
        let mut get = HttpConnector::default();
        get.follow_redirects = false;
        let mut other = get.clone();
        other.connect_timeout = self.upstream_timeout;
        (get, other)
    }
}

/// A bound proxy; [`run`](Proxy::run) serves until shut down.
#[derive(Debug)]
pub struct Proxy {
    listener: async_io::Async<std::net::TcpListener>,
    hub: Arc<Hub>,
    writer: Option<hub::Writer>,
}

impl Proxy {
    /// Binds `addr` (port 0 picks a free port) and recovers the streams
    /// `storage` holds.
    pub async fn bind(
        addr: SocketAddr,
        config: ProxyConfig,
        storage: Box<dyn LogStorage>,
    ) -> io::Result<Proxy> {
        Proxy::bind_with(addr, config, storage, None).await
    }

    /// [`bind`](Self::bind), as one instance of a `fleet` whose log
    /// (`storage`, a [`RedisLog`]) is in Redis: streams are taken in from
    /// the log when clients ask for them, not recovered at start.
    pub async fn bind_with(
        addr: SocketAddr,
        config: ProxyConfig,
        storage: Box<dyn LogStorage>,
        fleet: Option<FleetOptions>,
    ) -> io::Result<Proxy> {
        let listener = async_io::Async::<std::net::TcpListener>::bind(addr)?;
        let metrics = ProxyMetrics::new();
        let (hub, writer) =
            smol::unblock(move || Hub::new(config, storage, metrics, fleet)).await?;
        Ok(Proxy {
            listener,
            hub,
            writer,
        })
    }

    /// The address the proxy listens on, with the real port.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.get_ref().local_addr()
    }

    /// The proxy's metrics (a handle: it stays current).
    pub fn metrics(&self) -> ProxyMetrics {
        self.hub.metrics.clone()
    }

    /// Serves until `shutdown` completes, then stops the followers and
    /// writes everything still queued to storage before returning.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> io::Result<()> {
        let Proxy {
            listener,
            hub,
            writer,
        } = self;
        // Connections, followers and readers run on the proxy's own
        // executor, on `threads` threads: this one and `threads - 1` more.
        let (stop_workers, workers_stop) = async_channel::bounded::<()>(1);
        let workers: Vec<std::thread::JoinHandle<()>> = (1..hub.config.threads.max(1))
            .map(|i| {
                let executor = hub.executor.clone();
                let stop = workers_stop.clone();
                std::thread::Builder::new()
                    .name(format!("tidemark-proxy-{i}"))
                    .spawn(move || {
                        smol::block_on(executor.run(async move {
                            let _ = stop.recv().await;
                        }))
                    })
                    .expect("spawn a proxy thread")
            })
            .collect();
        let fleet_tasks = hub.fleet.clone().map(|fleet| {
            [
                hub.executor.spawn(fleet.clone().tail(Arc::downgrade(&hub))),
                hub.executor.spawn(fleet.janitor(Arc::downgrade(&hub))),
            ]
        });
        let sweeper = hub.executor.spawn({
            let hub = hub.clone();
            async move {
                loop {
                    async_io::Timer::after(Duration::from_millis(500)).await;
                    hub.sweep(hub.clock.now());
                }
            }
        });
        let connections = Arc::new(AtomicUsize::new(0));
        let max_connections = hub.config.limits.max_clients.saturating_add(1024);
        let accept = async {
            loop {
                let (socket, _) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors, say: back off, go on.
                        eprintln!("tidemark: accept failed: {e}");
                        async_io::Timer::after(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if connections.load(Ordering::Acquire) >= max_connections {
                    drop(socket);
                    continue;
                }
                let _ = socket.get_ref().set_nodelay(true);
                connections.fetch_add(1, Ordering::AcqRel);
                let hub = hub.clone();
                let connections = connections.clone();
                hub.executor
                    .clone()
                    .spawn(async move {
                        front::serve(hub, socket).await;
                        connections.fetch_sub(1, Ordering::AcqRel);
                    })
                    .detach();
            }
        };
        hub.executor.run(smol::future::or(accept, shutdown)).await;
        drop(listener);
        drop(sweeper);
        drop(fleet_tasks);
        drop(stop_workers);
        smol::unblock(move || {
            for worker in workers {
                let _ = worker.join();
            }
        })
        .await;
        hub.stop_all();
        if let Some(fleet) = &hub.fleet {
            fleet.let_go_all().await;
        }
        hub.close_log();
        if let Some(writer) = writer {
            smol::unblock(move || writer.finish()).await;
        }
        Ok(())
    }
}

/// One instance of a fleet of proxies sharing their log in Redis: one
/// follows each upstream stream, holding its lease, the others serve their
/// clients from Redis.
#[derive(Clone, Debug)]
pub struct FleetOptions {
    /// The Redis server and key prefix of the log and the leases.
    pub redis: crate::RedisConfig,
    /// Time to live of a stream's lease: how long the fleet waits for a
    /// writer that died before another takes its streams over.
    pub lease_ttl: Duration,
}

/// How `tidemark proxy` runs, beyond its [`ProxyConfig`].
#[derive(Debug)]
pub struct ProxyOptions {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Where to serve `GET /metrics`, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// The log's storage.
    pub storage: Box<dyn LogStorage>,
    /// What the storage is, for the start-up line (`memory`, a directory,
    /// a Redis URL without its password).
    pub log_name: String,
    /// The fleet this instance is one of (with a log in Redis).
    pub fleet: Option<FleetOptions>,
}

/// `tidemark proxy`: raises the open-files limit, binds `listen`, prints
/// the bound address (the real port for port 0) as the first line of
/// stdout, and proxies until SIGINT or SIGTERM, then writes what the log
/// still has queued and returns.
pub async fn proxy_until_signal(config: ProxyConfig, options: ProxyOptions) -> io::Result<()> {
    let mut signals =
        async_signal::Signals::new([async_signal::Signal::Int, async_signal::Signal::Term])?;
    let clients = config.limits.max_clients;
    match crate::raise_open_files_limit() {
        // Each client is a socket; the upstream connections and the log
        // need a few more.
        Ok((soft, _)) if soft < clients as u64 + 64 => eprintln!(
            "tidemark: the open-files limit is {soft}, below --max-clients {clients}: no more than about {soft} connections can be open at once"
        ),
        Ok(_) => {}
        Err(e) => eprintln!("tidemark: cannot raise the open-files limit: {e}"),
    }
    let upstream = config.upstream.to_string();
    let proxy = Proxy::bind_with(options.listen, config, options.storage, options.fleet).await?;
    let addr = proxy.local_addr()?;
    let metrics_listener = match options.metrics_listen {
        Some(at) => Some(smol::net::TcpListener::bind(at).await?),
        None => None,
    };
    println!("{addr}");
    use std::io::Write as _;
    io::stdout().flush()?;
    eprintln!(
        "tidemark: proxy on http://{addr} for {upstream} (log: {})",
        options.log_name
    );
    let (stop, stopped) = async_channel::bounded::<()>(1);
    if let Some(listener) = metrics_listener {
        eprintln!(
            "tidemark: metrics on http://{}/metrics",
            listener.local_addr()?
        );
        let metrics = proxy.metrics();
        smol::spawn(serve_metrics(
            listener,
            move |format: Format| metrics.render(format),
            async move {
                let _ = stopped.recv().await;
            },
        ))
        .detach();
    }
    let result = proxy
        .run(async move {
            signals.next().await;
        })
        .await;
    drop(stop);
    result
}
