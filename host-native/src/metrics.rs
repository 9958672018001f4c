//! Prometheus metrics: the proxy's ([`ProxyMetrics`]), `follow`'s
//! ([`FollowMetrics`]), and [`serve_metrics`], a tiny HTTP/1 server that
//! answers `GET /metrics`.
//!
//! The metrics are `prometheus-client`'s atomic counters and gauges. Every
//! labelled series is created once, when the metrics are made, so a call on
//! the hot path (`events_in`, `gap`, ...) is one atomic add: no lock, no
//! allocation, no label lookup.
//!
//! A scrape is answered in the Prometheus text format (version 0.0.4), or in
//! OpenMetrics text when the scraper's `Accept` header asks for it (as
//! Prometheus itself does); the sample names are the same in both.

use crate::proxy::StreamKind;
use futures::StreamExt;
use futures::future::{Either, select};
use futures::stream::FuturesUnordered;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ACCEPT, CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use smol_hyper::rt::{FuturesIo, SmolTimer};
use std::convert::Infallible;
use std::fmt::{self, Write as _};
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tidemark_core::replay::GapReason;

/// The text format of a scrape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The Prometheus text format, version 0.0.4: what `curl` users and most
    /// scrapers expect.
    Prometheus,
    /// OpenMetrics text 1.0.0 (ends with `# EOF`).
    OpenMetrics,
}

impl Format {
    /// The format a request's `Accept` header asks for: OpenMetrics when it
    /// names `application/openmetrics-text`, else Prometheus text.
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(accept) if accept.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    /// The `Content-Type` of a response in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// Encodes `registry` in `format`.
fn encode(registry: &Registry, format: Format) -> String {
    let mut text = String::with_capacity(4096);
    let encoded = match format {
        Format::Prometheus => {
            prometheus_client::encoding::prometheus_text::encode(&mut text, registry)
        }
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut text, registry),
    };
    // Writing to a String fails only if a metric's encoder does, and ours
    // are prometheus-client's own.
    encoded.expect("encoding metrics into a String");
    text
}

/// The values of label `kind`, in the order of `ProxyInner::streams`.
const KINDS: [StreamKind; 2] = [StreamKind::Get, StreamKind::Post];

/// The values of label `reason`, in the order of `ProxyInner::gaps`.
const REASONS: [GapReason; 3] = [
    GapReason::Retention,
    GapReason::Unknown,
    GapReason::TooLarge,
];

fn kind_index(kind: StreamKind) -> usize {
    match kind {
        StreamKind::Get => 0,
        StreamKind::Post => 1,
    }
}

fn reason_index(reason: GapReason) -> usize {
    match reason {
        GapReason::Retention => 0,
        GapReason::Unknown => 1,
        GapReason::TooLarge => 2,
    }
}

/// A limit that refused a request: label `limit` of
/// `tidemark_proxy_refusals_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Limit {
    /// `--max-streams` (503).
    Streams,
    /// `--max-clients` (503).
    Clients,
    /// `--max-header-bytes` (431).
    HeaderBytes,
    /// `--max-body-bytes` (413).
    BodyBytes,
}

impl Limit {
    const ALL: [Limit; 4] = [
        Limit::Streams,
        Limit::Clients,
        Limit::HeaderBytes,
        Limit::BodyBytes,
    ];

    /// The label value: `streams`, `clients`, `header_bytes`, `body_bytes`.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Streams => "streams",
            Limit::Clients => "clients",
            Limit::HeaderBytes => "header_bytes",
            Limit::BodyBytes => "body_bytes",
        }
    }
}

// Written by hand: the derive would print the variants' Rust names.
macro_rules! label_value {
    ($($ty:ty),*) => {$(
        impl EncodeLabelValue for $ty {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
                encoder.write_str(self.as_str())
            }
        }
    )*};
}
label_value!(Limit);

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct LimitLabel {
    limit: Limit,
}

/// The proxy's metrics; a cheap handle (clones share the same metrics).
///
/// | series | type | labels |
/// | --- | --- | --- |
/// | `tidemark_proxy_streams` | gauge | `kind="get\|post"` |
/// | `tidemark_proxy_clients` | gauge | |
/// | `tidemark_proxy_upstream_connections` | gauge | |
/// | `tidemark_proxy_events_in_total` | counter | |
/// | `tidemark_proxy_events_out_total` | counter | |
/// | `tidemark_proxy_resumes_total` | counter | |
/// | `tidemark_proxy_gaps_total` | counter | `reason="retention\|unknown\|too_large"` |
/// | `tidemark_proxy_upstream_reconnects_total` | counter | |
/// | `tidemark_proxy_upstream_failures_total` | counter | |
/// | `tidemark_proxy_log_bytes` | gauge | |
/// | `tidemark_proxy_log_up` | gauge | |
/// | `tidemark_proxy_log_writes_total` | counter | |
/// | `tidemark_proxy_log_write_failures_total` | counter | |
/// | `tidemark_proxy_refusals_total` | counter | `limit="streams\|clients\|header_bytes\|body_bytes"` |
/// | `tidemark_proxy_fleet_mirrored_streams` | gauge | |
/// | `tidemark_proxy_fleet_takeovers_total` | counter | |
///
/// Every labelled series is exported from the start, at 0.
#[derive(Clone, Debug)]
pub struct ProxyMetrics {
    inner: Arc<ProxyInner>,
}

#[derive(Debug)]
struct ProxyInner {
    registry: Registry,
    streams: [Gauge; 2],
    clients: Gauge,
    upstream_connections: Gauge,
    events_in: Counter,
    events_out: Counter,
    resumes: Counter,
    gaps: [Counter; 3],
    upstream_reconnects: Counter,
    upstream_failures: Counter,
    log_bytes: Gauge,
    log_up: Gauge,
    log_writes: Counter,
    log_write_failures: Counter,
    refusals: [Counter; 4],
    fleet_mirrored: Gauge,
    fleet_takeovers: Counter,
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ProxyMetrics {
    /// Registers every metric, each labelled series at 0.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tidemark_proxy");
        let streams = Family::<KindLabel, Gauge>::default();
        let gaps = Family::<ReasonLabel, Counter>::default();
        let refusals = Family::<LimitLabel, Counter>::default();
        let inner = ProxyInner {
            streams: KINDS.map(|kind| {
                streams.get_or_create_owned(&KindLabel {
                    kind: kind.as_str(),
                })
            }),
            clients: Gauge::default(),
            upstream_connections: Gauge::default(),
            events_in: Counter::default(),
            events_out: Counter::default(),
            resumes: Counter::default(),
            gaps: REASONS.map(|reason| {
                gaps.get_or_create_owned(&ReasonLabel {
                    reason: reason.as_str(),
                })
            }),
            upstream_reconnects: Counter::default(),
            upstream_failures: Counter::default(),
            log_bytes: Gauge::default(),
            log_up: Gauge::default(),
            log_writes: Counter::default(),
            log_write_failures: Counter::default(),
            refusals: Limit::ALL.map(|limit| refusals.get_or_create_owned(&LimitLabel { limit })),
            fleet_mirrored: Gauge::default(),
            fleet_takeovers: Counter::default(),
            registry: Registry::default(),
        };
        registry.register("streams", "Logged streams open", streams.clone());
        registry.register(
            "clients",
            "Clients connected to logged streams",
            inner.clients.clone(),
        );
        registry.register(
            "upstream_connections",
            "Upstream connections open for logged streams",
            inner.upstream_connections.clone(),
        );
        registry.register(
            "events_in",
            "Events read from upstreams and appended to the log",
            inner.events_in.clone(),
        );
        registry.register(
            "events_out",
            "Events written to clients",
            inner.events_out.clone(),
        );
        registry.register(
            "resumes",
            "Requests with a Last-Event-ID served from the log",
            inner.resumes.clone(),
        );
        registry.register(
            "gaps",
            "Gap signals sent: the Last-Event-ID was older than the log or unknown",
            gaps.clone(),
        );
        registry.register(
            "upstream_reconnects",
            "Upstream reconnects after a dropped or failed connection",
            inner.upstream_reconnects.clone(),
        );
        registry.register(
            "upstream_failures",
            "Upstream connections or attempts that failed",
            inner.upstream_failures.clone(),
        );
        registry.register(
            "log_bytes",
            "Bytes held in the replay log",
            inner.log_bytes.clone(),
        );
        registry.register(
            "log_up",
            "1 while the log's storage takes writes (always, for a memory log), 0 while writes fail",
            inner.log_up.clone(),
        );
        inner.log_up.set(1);
        registry.register(
            "log_writes",
            "Batches written to the log's storage (group commits; for Redis, pipelines)",
            inner.log_writes.clone(),
        );
        registry.register(
            "log_write_failures",
            "Writes of a batch to the log's storage that failed (each retry counts)",
            inner.log_write_failures.clone(),
        );
        registry.register("refusals", "Requests refused by a limit", refusals.clone());
        registry.register(
            "fleet_mirrored_streams",
            "Streams another instance of the fleet writes, mirrored here from Redis",
            inner.fleet_mirrored.clone(),
        );
        registry.register(
            "fleet_takeovers",
            "Streams this instance took over from another (its lease lapsed or was let go)",
            inner.fleet_takeovers.clone(),
        );
        ProxyMetrics {
            inner: Arc::new(ProxyInner { registry, ..inner }),
        }
    }

    /// A logged stream of `kind` opened.
    pub fn stream_opened(&self, kind: StreamKind) {
        self.inner.streams[kind_index(kind)].inc();
    }

    /// A logged stream of `kind` was dropped.
    pub fn stream_closed(&self, kind: StreamKind) {
        self.inner.streams[kind_index(kind)].dec();
    }

    /// A client connected to a logged stream.
    pub fn client_connected(&self) {
        self.inner.clients.inc();
    }

    /// A client of a logged stream went away.
    pub fn client_disconnected(&self) {
        self.inner.clients.dec();
    }

    /// An upstream connection of a logged stream opened.
    pub fn upstream_connected(&self) {
        self.inner.upstream_connections.inc();
    }

    /// An upstream connection of a logged stream closed.
    pub fn upstream_disconnected(&self) {
        self.inner.upstream_connections.dec();
    }

    /// `n` events were read from upstream and logged.
    pub fn events_in(&self, n: u64) {
        self.inner.events_in.inc_by(n);
    }

    /// `n` events were written to a client.
    pub fn events_out(&self, n: u64) {
        self.inner.events_out.inc_by(n);
    }

    /// A request with a `Last-Event-ID` was served from the log.
    pub fn resume(&self) {
        self.inner.resumes.inc();
    }

    /// A client got a gap signal.
    pub fn gap(&self, reason: GapReason) {
        self.inner.gaps[reason_index(reason)].inc();
    }

    /// An upstream stream reconnects.
    pub fn upstream_reconnect(&self) {
        self.inner.upstream_reconnects.inc();
    }

    /// An upstream connection, or an attempt to open one, failed.
    pub fn upstream_failure(&self) {
        self.inner.upstream_failures.inc();
    }

    /// `n` streams are mirrored from the fleet's log now.
    pub fn set_mirrored(&self, n: usize) {
        self.inner.fleet_mirrored.set(n as i64);
    }

    /// This instance took a stream over from another of the fleet.
    pub fn fleet_takeover(&self) {
        self.inner.fleet_takeovers.inc();
    }

    /// The log grew by `delta` bytes (shrank, when negative).
    pub fn log_bytes_add(&self, delta: i64) {
        self.inner.log_bytes.inc_by(delta);
    }

    /// The log holds `bytes` bytes (after loading it from disk).
    pub fn log_bytes_set(&self, bytes: i64) {
        self.inner.log_bytes.set(bytes);
    }

    /// A write of the log's storage failed.
    pub fn log_write_failed(&self) {
        self.inner.log_write_failures.inc();
        self.inner.log_up.set(0);
    }

    /// A batch was written to the log's storage.
    pub fn log_written(&self) {
        self.inner.log_writes.inc();
        self.inner.log_up.set(1);
    }

    /// A request was refused by `limit`.
    pub fn refused(&self, limit: Limit) {
        self.inner.refusals[limit as usize].inc();
    }

    /// The exposition text of every metric, for a scrape.
    pub fn render(&self, format: Format) -> String {
        encode(&self.inner.registry, format)
    }
}

/// `tidemark follow`'s metrics; a cheap handle (clones share the same
/// metrics).
///
/// | series | type | what |
/// | --- | --- | --- |
/// | `tidemark_follow_events_total` | counter | events printed |
/// | `tidemark_follow_duplicates_total` | counter | replayed events dropped |
/// | `tidemark_follow_reconnects_total` | counter | reconnects scheduled after a failure |
/// | `tidemark_follow_connected` | gauge | 1 while a connection is open |
/// | `tidemark_follow_cursor_writes_total` | counter | cursors written to the store |
/// | `tidemark_follow_store_failures_total` | counter | failed cursor store writes (batches) |
///
/// The first four are counted as they happen; duplicates and the store's
/// counters are read from the persistence registry at each scrape
/// ([`update`](Self::update)).
#[derive(Clone, Debug)]
pub struct FollowMetrics {
    inner: Arc<FollowInner>,
}

#[derive(Debug)]
struct FollowInner {
    registry: Registry,
    events: Counter,
    duplicates: Counter,
    reconnects: Counter,
    connected: Gauge,
    cursor_writes: Counter,
    store_failures: Counter,
}

impl Default for FollowMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl FollowMetrics {
    /// Registers every metric, at 0.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tidemark_follow");
        let inner = FollowInner {
            events: Counter::default(),
            duplicates: Counter::default(),
            reconnects: Counter::default(),
            connected: Gauge::default(),
            cursor_writes: Counter::default(),
            store_failures: Counter::default(),
            registry: Registry::default(),
        };
        registry.register("events", "Events printed", inner.events.clone());
        registry.register(
            "duplicates",
            "Replayed events dropped",
            inner.duplicates.clone(),
        );
        registry.register(
            "reconnects",
            "Reconnects scheduled after a failed or lost connection",
            inner.reconnects.clone(),
        );
        registry.register(
            "connected",
            "1 while a connection to the stream is open",
            inner.connected.clone(),
        );
        registry.register(
            "cursor_writes",
            "Cursors written to the store",
            inner.cursor_writes.clone(),
        );
        registry.register(
            "store_failures",
            "Failed cursor store writes (batches); the cursor is retried",
            inner.store_failures.clone(),
        );
        FollowMetrics {
            inner: Arc::new(FollowInner { registry, ..inner }),
        }
    }

    /// `n` events were printed.
    pub fn events(&self, n: u64) {
        self.inner.events.inc_by(n);
    }

    /// A connection opened (`true`) or was lost or failed (`false`).
    pub fn set_connected(&self, connected: bool) {
        self.inner.connected.set(i64::from(connected));
    }

    /// A reconnect was scheduled.
    pub fn reconnect(&self) {
        self.inner.reconnects.inc();
    }

    /// Takes the counters kept by the persistence registry: duplicates
    /// dropped, cursors written, failed batches. They only move forwards
    /// here, whatever order concurrent updates come in.
    pub fn update(&self, stats: &tidemark_core::Stats) {
        let inner = &*self.inner;
        inner
            .duplicates
            .inner()
            .fetch_max(stats.duplicates_dropped, Relaxed);
        inner
            .cursor_writes
            .inner()
            .fetch_max(stats.worker.cursors_written, Relaxed);
        inner
            .store_failures
            .inner()
            .fetch_max(stats.worker.failed_batches, Relaxed);
    }

    /// The exposition text of every metric, for a scrape.
    pub fn render(&self, format: Format) -> String {
        encode(&self.inner.registry, format)
    }
}

/// At most this many scrape connections at once; more are closed at once.
const MAX_CONNECTIONS: usize = 64;

/// A connection that sends no whole request head for this long (idle
/// between scrapes, or slow on purpose) is closed, so idle connections
/// cannot hold every slot.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `GET /metrics` on `listener` until `shutdown` completes: each
/// scrape calls `render` with the format the scraper asked for (see
/// [`Format::from_accept`]) and answers its text. Every other path is `404`,
/// every other method `405`. Open connections close with it. A failed
/// accept (out of file descriptors, say) is retried after 100 ms: the
/// metrics outlive a bad moment.
///
/// It spawns nothing: its connections are driven inside the returned
/// future, so `render` may borrow (the caller's registry, say). Run it
/// beside the work it reports on, or spawn it when `render` is `'static`.
pub async fn serve_metrics(
    listener: smol::net::TcpListener,
    render: impl Fn(Format) -> String,
    shutdown: impl Future<Output = ()>,
) {
    let render = &render;
    let serve = async {
        let mut connections = FuturesUnordered::new();
        loop {
            let accepted = if connections.is_empty() {
                listener.accept().await
            } else {
                let accept = pin!(listener.accept());
                match select(accept, connections.next()).await {
                    Either::Left((accepted, _)) => accepted,
                    Either::Right(_) => continue,
                }
            };
            let Ok((stream, _)) = accepted else {
                async_io::Timer::after(Duration::from_millis(100)).await;
                continue;
            };
            if connections.len() >= MAX_CONNECTIONS {
                continue;
            }
            let service = service_fn(move |request| std::future::ready(respond(&request, render)));
            connections.push(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(SmolTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(FuturesIo::new(stream), service)
                    .await;
            });
        }
    };
    smol::future::or(serve, shutdown).await
}

fn respond(
    request: &Request<Incoming>,
    render: impl Fn(Format) -> String,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let status = match (request.method(), request.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => None,
        (_, "/metrics") => Some(StatusCode::METHOD_NOT_ALLOWED),
        _ => Some(StatusCode::NOT_FOUND),
    };
    if let Some(status) = status {
        let reason = status.canonical_reason().unwrap_or("error");
        let mut response = Response::new(Full::new(Bytes::from(format!("{reason}\n"))));
        *response.status_mut() = status;
        return Ok(response);
    }
    let accept = request.headers().get(ACCEPT).and_then(|v| v.to_str().ok());
    let format = Format::from_accept(accept);
    let mut response = Response::new(Full::new(Bytes::from(render(format))));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sample lines of `text` (no comments), as `name{labels} value`.
    fn samples(text: &str) -> Vec<&str> {
        text.lines().filter(|l| !l.starts_with('#')).collect()
    }

    #[test]
    fn every_proxy_series_is_there_from_the_start_at_zero() {
        let text = ProxyMetrics::new().render(Format::Prometheus);
        let mut got = samples(&text);
        got.sort_unstable();
        let mut want = vec![
            "tidemark_proxy_streams{kind=\"get\"} 0",
            "tidemark_proxy_streams{kind=\"post\"} 0",
            "tidemark_proxy_clients 0",
            "tidemark_proxy_upstream_connections 0",
            "tidemark_proxy_events_in_total 0",
            "tidemark_proxy_events_out_total 0",
            "tidemark_proxy_resumes_total 0",
            "tidemark_proxy_gaps_total{reason=\"retention\"} 0",
            "tidemark_proxy_gaps_total{reason=\"unknown\"} 0",
            "tidemark_proxy_gaps_total{reason=\"too_large\"} 0",
            "tidemark_proxy_upstream_reconnects_total 0",
            "tidemark_proxy_upstream_failures_total 0",
            "tidemark_proxy_log_bytes 0",
            "tidemark_proxy_log_up 1",
            "tidemark_proxy_log_writes_total 0",
            "tidemark_proxy_log_write_failures_total 0",
            "tidemark_proxy_refusals_total{limit=\"streams\"} 0",
            "tidemark_proxy_refusals_total{limit=\"clients\"} 0",
            "tidemark_proxy_refusals_total{limit=\"header_bytes\"} 0",
            "tidemark_proxy_refusals_total{limit=\"body_bytes\"} 0",
            "tidemark_proxy_fleet_mirrored_streams 0",
            "tidemark_proxy_fleet_takeovers_total 0",
        ];
        want.sort_unstable();
        assert_eq!(got, want);
    }

    #[test]
    fn each_proxy_method_moves_its_own_series() {
        let metrics = ProxyMetrics::new();
        let clone = metrics.clone();
        metrics.stream_opened(StreamKind::Get);
        metrics.stream_opened(StreamKind::Get);
        metrics.stream_opened(StreamKind::Post);
        metrics.stream_closed(StreamKind::Get);
        for _ in 0..3 {
            metrics.client_connected();
        }
        metrics.client_disconnected();
        metrics.upstream_connected();
        metrics.upstream_connected();
        metrics.upstream_disconnected();
        metrics.events_in(7);
        clone.events_out(5);
        clone.events_out(6);
        metrics.resume();
        metrics.gap(GapReason::Retention);
        metrics.gap(GapReason::Unknown);
        metrics.gap(GapReason::Unknown);
        metrics.gap(GapReason::TooLarge);
        metrics.upstream_reconnect();
        metrics.upstream_failure();
        metrics.upstream_failure();
        metrics.log_bytes_set(100);
        metrics.log_bytes_add(50);
        metrics.log_bytes_add(-30);
        metrics.refused(Limit::Streams);
        metrics.refused(Limit::Clients);
        metrics.refused(Limit::HeaderBytes);
        metrics.refused(Limit::HeaderBytes);
        metrics.refused(Limit::BodyBytes);
        metrics.log_write_failed();
        metrics.log_write_failed();
        metrics.set_mirrored(3);
        metrics.fleet_takeover();
        assert!(samples(&clone.render(Format::Prometheus)).contains(&"tidemark_proxy_log_up 0"));
        metrics.log_written();
        let text = clone.render(Format::Prometheus);
        let got = samples(&text);
        for line in [
            "tidemark_proxy_streams{kind=\"get\"} 1",
            "tidemark_proxy_streams{kind=\"post\"} 1",
            "tidemark_proxy_clients 2",
            "tidemark_proxy_upstream_connections 1",
            "tidemark_proxy_events_in_total 7",
            "tidemark_proxy_events_out_total 11",
            "tidemark_proxy_resumes_total 1",
            "tidemark_proxy_gaps_total{reason=\"retention\"} 1",
            "tidemark_proxy_gaps_total{reason=\"unknown\"} 2",
            "tidemark_proxy_gaps_total{reason=\"too_large\"} 1",
            "tidemark_proxy_upstream_reconnects_total 1",
            "tidemark_proxy_upstream_failures_total 2",
            "tidemark_proxy_log_bytes 120",
            "tidemark_proxy_log_up 1",
            "tidemark_proxy_log_writes_total 1",
            "tidemark_proxy_log_write_failures_total 2",
            "tidemark_proxy_refusals_total{limit=\"streams\"} 1",
            "tidemark_proxy_refusals_total{limit=\"clients\"} 1",
            "tidemark_proxy_refusals_total{limit=\"header_bytes\"} 2",
            "tidemark_proxy_refusals_total{limit=\"body_bytes\"} 1",
            "tidemark_proxy_fleet_mirrored_streams 3",
            "tidemark_proxy_fleet_takeovers_total 1",
        ] {
            assert!(got.contains(&line), "{line} missing from\n{text}");
        }
        assert_eq!(got.len(), 22, "{text}");
    }

    #[test]
    fn types_are_declared_in_both_formats() {
        let metrics = ProxyMetrics::new();
        let prometheus = metrics.render(Format::Prometheus);
        assert!(prometheus.contains("# TYPE tidemark_proxy_events_in_total counter\n"));
        assert!(prometheus.contains("# TYPE tidemark_proxy_streams gauge\n"));
        assert!(!prometheus.contains("# EOF"));
        let open = metrics.render(Format::OpenMetrics);
        assert!(open.contains("# TYPE tidemark_proxy_events_in counter\n"));
        assert!(open.contains("\ntidemark_proxy_events_in_total 0\n"));
        assert!(open.ends_with("# EOF\n"));
    }

    #[test]
    fn follow_metrics_count_and_take_the_registry_counters_forwards_only() {
        let metrics = FollowMetrics::new();
        metrics.events(3);
        metrics.events(1);
        metrics.reconnect();
        metrics.set_connected(true);
        let mut stats = tidemark_core::Stats {
            duplicates_dropped: 4,
            ..Default::default()
        };
        stats.worker.cursors_written = 9;
        stats.worker.failed_batches = 2;
        metrics.update(&stats);
        stats.duplicates_dropped = 3;
        metrics.update(&stats);
        let text = metrics.render(Format::Prometheus);
        let mut got = samples(&text);
        got.sort_unstable();
        let mut want = vec![
            "tidemark_follow_events_total 4",
            "tidemark_follow_duplicates_total 4",
            "tidemark_follow_reconnects_total 1",
            "tidemark_follow_connected 1",
            "tidemark_follow_cursor_writes_total 9",
            "tidemark_follow_store_failures_total 2",
        ];
        want.sort_unstable();
        assert_eq!(got, want);
        metrics.set_connected(false);
        assert!(
            metrics
                .render(Format::OpenMetrics)
                .contains("\ntidemark_follow_connected 0\n")
        );
    }

    #[test]
    fn scrapers_get_the_format_they_ask_for() {
        assert_eq!(Format::from_accept(None), Format::Prometheus);
        assert_eq!(Format::from_accept(Some("*/*")), Format::Prometheus);
        let prometheus =
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";
        assert_eq!(Format::from_accept(Some(prometheus)), Format::OpenMetrics);
        assert!(Format::Prometheus.content_type().starts_with("text/plain"));
    }

    /// One HTTP/1.0 request to `addr`; the whole response.
    async fn get(addr: std::net::SocketAddr, request: &str) -> String {
        use futures::{AsyncReadExt, AsyncWriteExt};
        let mut stream = smol::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    #[test]
    fn the_server_answers_metrics_404_otherwise_and_stops_on_shutdown() {
        smol::block_on(async {
            let metrics = ProxyMetrics::new();
            metrics.events_in(42);
            let listener = smol::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (stop, stopped) = async_channel::bounded::<()>(1);
            // Spawned, as the proxy does: the server is Send with a Sync render.
            let handle = metrics.clone();
            let render = move |format| handle.render(format);
            let server = smol::spawn(serve_metrics(listener, render, async move {
                let _ = stopped.recv().await;
            }));
            let client = async {
                let ok = get(addr, "GET /metrics HTTP/1.0\r\n\r\n").await;
                assert!(ok.starts_with("HTTP/1.0 200"), "{ok}");
                assert!(
                    ok.contains("content-type: text/plain; version=0.0.4; charset=utf-8\r\n"),
                    "{ok}"
                );
                assert!(ok.contains("\ntidemark_proxy_events_in_total 42\n"), "{ok}");
                let open = get(
                    addr,
                    "GET /metrics HTTP/1.0\r\nAccept: application/openmetrics-text\r\n\r\n",
                )
                .await;
                assert!(open.contains("application/openmetrics-text"), "{open}");
                assert!(open.ends_with("# EOF\n"), "{open}");
                let missing = get(addr, "GET /events HTTP/1.0\r\n\r\n").await;
                assert!(missing.starts_with("HTTP/1.0 404"), "{missing}");
                let post = get(addr, "POST /metrics HTTP/1.0\r\n\r\n").await;
                assert!(post.starts_with("HTTP/1.0 405"), "{post}");
                stop.send(()).await.unwrap();
            };
            smol::future::zip(server, client).await;
        });
    }
}
