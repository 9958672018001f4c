//! The upstream side of logged streams: a GET stream followed with the
//! core's `ResumableStream` (reconnects with the upstream's own
//! `Last-Event-ID`, its replays dropped), a POST answer read once to its
//! end. Both append every event to the stream's log.

use super::fleet;
use super::hub::{Hub, LoggedStream, Upstream};
use super::storage::LogOp;
use crate::Lease;
use crate::{HttpBody, HttpConnector};
use futures::StreamExt;
use futures::future::{Either, select};
use std::pin::pin;
use std::sync::{Arc, Mutex};
use tidemark_core::replay::{
    GAP_EVENT, Gap, GapReason, LogBatch, LogRecord, StreamToken, gap_data,
};
use tidemark_core::sse::{EventRef, ItemRef, Parser};
use tidemark_core::{
    Clock, ConnectRequest, Connector, EventTracker, Failure, GiveUp, ResumableStream, StreamConfig,
    StreamError, StreamItem, StreamKey, TrackerConfig,
};

/// A connector whose first connection is one already open: the request
/// that found the upstream answering with a stream.
struct Primed {
    first: Mutex<Option<HttpBody>>,
    inner: HttpConnector,
}

impl Connector for Primed {
    type Chunk = hyper::body::Bytes;
    type Body = HttpBody;

    async fn connect(&self, request: ConnectRequest<'_>) -> Result<HttpBody, Failure> {
        let first = self.first.lock().ok().and_then(|mut first| first.take());
        match first {
            Some(body) => Ok(body),
            None => self.inner.connect(request).await,
        }
    }
}

/// Appends `batch` to the stream's log and wakes its clients (at once for
/// a memory log, or while a storage that serves while failing fails; the
/// writer wakes them once they are durable). `false` when the stream was
/// ended meanwhile (its MCP session ended) or another instance of the fleet
/// writes it now: nothing is appended, and the reader stops.
fn append(hub: &Hub, stream: &LoggedStream, batch: &LogBatch) -> bool {
    if batch.is_empty() {
        let state = stream.state();
        return !state.log.is_ended() && (state.writes || state.lapsed);
    }
    let now = hub.clock.now();
    let mut ops = Vec::new();
    let at_once = hub.shows_at_once();
    let appended = {
        let mut state = stream.state();
        // Ended meanwhile, or (in a fleet) written by another instance now.
        // A writer whose lease lapsed (Redis unreachable) goes on serving
        // its clients from memory.
        if state.log.is_ended() || !(state.writes || state.lapsed) {
            return false;
        }
        hub.metrics.events_in(batch.len() as u64);
        let appended = state.log.append_batch(now, batch);
        if hub.is_durable() && state.writes {
            let first = appended.seq + 1 - appended.events as u64;
            ops.extend(state.log.since(first).map(|record| LogOp::Append {
                token: stream.meta.token,
                record,
            }));
            if let Some(first_seq) = appended.trimmed_to {
                ops.push(LogOp::Trim {
                    token: stream.meta.token,
                    first_seq,
                });
            }
        }
        let at_once = at_once || !state.writes;
        if at_once {
            state.log.mark_durable(appended.seq);
        }
        (appended, at_once)
    };
    let (appended, at_once) = appended;
    hub.metrics.log_bytes_add(appended.bytes_delta);
    hub.log_ops(ops);
    if at_once {
        stream.changed.notify(usize::MAX);
    }
    true
}

/// Adds a fresh upstream event to `batch`.
fn push(batch: &mut LogBatch, event: EventRef<'_>) {
    // The parser never yields a type with a line end, which is all `push`
    // refuses.
    let _ = batch.push(event.id, event.event, event.data);
}

/// What stands in the log for an upstream event over `--max-event-bytes`
/// (the parser dropped it): a gap event, so that clients are told.
fn push_too_large(batch: &mut LogBatch) {
    let data = gap_data(Gap {
        reason: GapReason::TooLarge,
        lost: None,
    });
    batch
        .push(None, GAP_EVENT, &data)
        .expect("a valid event type");
}

/// Follows a GET stream whose first answer is `body` (`None`: connect
/// first), with the request `headers`, until the linger is over or the
/// upstream gives up.
///
/// In a fleet it holds the stream's `lease` meanwhile (see `fleet::hold`),
/// and lets it go at the end.
pub(super) async fn follow_get(
    hub: Arc<Hub>,
    stream: Arc<LoggedStream>,
    url: String,
    headers: Vec<(String, String)>,
    body: Option<HttpBody>,
    lease: Option<Lease>,
) {
    let holding = held(&hub, &stream, lease.clone());
    let session = headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("mcp-session-id"));
    let tracker_config = TrackerConfig::default();
    let window = tracker_config.window;
    let mut tracker = EventTracker::new(
        StreamKey::new("proxy", stream.meta.token.to_string()),
        tracker_config,
    );
    {
        // Resume after the newest upstream id logged, remembering the ones
        // before it, so that an upstream that replays too much after a
        // revival (or a restart of the proxy) has its repeats dropped.
        let state = stream.state();
        let now = hub.clock.now();
        let with_ids: Vec<LogRecord> = state
            .log
            .records()
            .rev()
            .filter(|record| record.upstream_id().is_some())
            .take(window)
            .collect();
        for record in with_ids.iter().rev() {
            let _ = tracker.observe(record.upstream_id(), now);
        }
        tracker.commit();
    }
    let config = StreamConfig {
        headers,
        limits: hub.config.limits.parser(),
        skip_oversized: true,
        ..StreamConfig::default()
    };
    let connector = Primed {
        first: Mutex::new(body),
        inner: hub.get_connector.clone(),
    };
    let mut upstream = ResumableStream::new(connector, hub.clock, url, tracker, config);
    let mut batch = LogBatch::new();
    let mut connected = false;
    let reason = loop {
        let stopped = {
            let state = stream.state();
            state
                .stop
                .then_some(())
                .ok_or_else(|| stream.stopping.listen())
        };
        let listener = match stopped {
            Ok(()) => break None,
            Err(listener) => listener,
        };
        let next = upstream.next_with(|event| push(&mut batch, event));
        let item = match select(pin!(next), listener).await {
            Either::Left((item, _)) => item,
            Either::Right(((), _)) => continue,
        };
        match item {
            Ok(StreamItem::Delivered { .. }) => {
                append(&hub, &stream, &batch);
                batch.clear();
            }
            Ok(StreamItem::Skipped { .. }) => {
                hub.metrics.gap(GapReason::TooLarge);
                push_too_large(&mut batch);
                append(&hub, &stream, &batch);
                batch.clear();
            }
            Ok(StreamItem::Open { .. }) => {
                connected = true;
                hub.metrics.upstream_connected();
            }
            Ok(StreamItem::Reconnecting { .. }) => {
                hub.metrics.upstream_reconnect();
                if connected {
                    connected = false;
                    hub.metrics.upstream_disconnected();
                } else {
                    hub.metrics.upstream_failure();
                }
            }
            Ok(_) => {}
            Err(e) => {
                hub.metrics.upstream_failure();
                break Some(e);
            }
        }
    };
    if connected {
        hub.metrics.upstream_disconnected();
    }
    if let Some(e) = &reason {
        eprintln!("tidemark: stopped following {}: {e}", stream.meta.target);
    }
    // An MCP server that no longer knows the session: its logs end.
    if let Some(StreamError::GaveUp(GiveUp::Permanent(Failure::Status { code: 404, .. }))) = reason
        && session
    {
        hub.end_identity(stream.meta.identity, false);
    }
    {
        let mut state = stream.state();
        state.upstream = Upstream::Idle;
        state.stop = false;
    }
    stream.changed.notify(usize::MAX);
    let_go(&hub, stream.meta.token, holding).await;
}

/// In a fleet, the task that holds a writer's lease (see `fleet::hold`):
/// a GET follower that loses it stops.
fn held(
    hub: &Arc<Hub>,
    stream: &Arc<LoggedStream>,
    lease: Option<Lease>,
) -> Option<smol::Task<()>> {
    let fleet = hub.fleet.clone()?;
    let lease = lease?;
    fleet.holding(stream.meta.token, lease.clone());
    let task = fleet::hold(hub.clone(), fleet, stream.clone(), lease);
    Some(hub.executor.spawn(task))
}

/// The writer is done: stops holding its lease and gives it back.
async fn let_go(hub: &Hub, token: StreamToken, holding: Option<smol::Task<()>>) {
    drop(holding);
    if let Some(fleet) = &hub.fleet {
        fleet.let_go(token).await;
    }
}

/// Reads a POST answer to its end, whether or not a client reads along.
/// In a fleet it holds the stream's `lease` meanwhile.
pub(super) async fn read_post(
    hub: Arc<Hub>,
    stream: Arc<LoggedStream>,
    mut body: HttpBody,
    lease: Option<Lease>,
) {
    let holding = held(&hub, &stream, lease.clone());
    let mut parser = Parser::new(hub.config.limits.parser());
    let mut batch = LogBatch::new();
    let mut failure = None;
    hub.metrics.upstream_connected();
    loop {
        let chunk = match body.next().await {
            Some(Ok(chunk)) => chunk,
            Some(Err(e)) => {
                failure = Some(e.to_string());
                break;
            }
            None => break,
        };
        let fed = parser.feed_with(&chunk, |item| {
            if let ItemRef::Event(event) = item {
                push(&mut batch, event);
            }
        });
        if fed.is_err() {
            hub.metrics.gap(GapReason::TooLarge);
            push_too_large(&mut batch);
        }
        let taken = append(&hub, &stream, &batch);
        batch.clear();
        if !taken {
            break;
        }
    }
    drop(body);
    hub.metrics.upstream_disconnected();
    if let Some(e) = failure {
        hub.metrics.upstream_failure();
        eprintln!(
            "tidemark: the answer to POST {} broke off: {e}",
            stream.meta.target
        );
    }
    let ended_here = {
        let mut state = stream.state();
        state.upstream = Upstream::Idle;
        let ended_here = !state.log.is_ended() && state.writes;
        state.log.end();
        ended_here
    };
    if ended_here {
        hub.log_op(LogOp::End {
            token: stream.meta.token,
        });
    }
    stream.changed.notify(usize::MAX);
    let_go(&hub, stream.meta.token, holding).await;
}
