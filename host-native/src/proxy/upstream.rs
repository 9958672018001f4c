//! The upstream side of logged streams: a GET stream followed with the
//! core's `ResumableStream` (reconnects with the upstream's own
//! `Last-Event-ID`, its replays dropped), a POST answer read once to its
//! end. Both append every event to the stream's log.

use super::hub::{Hub, LoggedStream, Upstream};
use super::storage::LogOp;
use crate::{HttpBody, HttpConnector};
use futures::StreamExt;
use futures::future::{Either, select};
use std::pin::pin;
use std::sync::{Arc, Mutex};
use tidemark_core::replay::{GAP_EVENT, Gap, GapReason, gap_data};
use tidemark_core::sse::{Event, Item, Parser};
use tidemark_core::{
    Clock, ConnectRequest, Connector, EventTracker, Failure, ResumableStream, StreamConfig,
    StreamItem, StreamKey, TrackerConfig,
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

/// Appends `events` to the stream's log and wakes its clients (at once for
/// a memory log; the writer wakes them once they are durable).
fn append(hub: &Hub, stream: &LoggedStream, events: &[Event]) {
    if events.is_empty() {
        return;
    }
    let now = hub.clock.now();
    let mut ops = Vec::new();
    let mut bytes = 0;
    hub.metrics.events_in(events.len() as u64);
    {
        let mut state = stream.state();
        for event in events {
            let Ok(appended) =
                state
                    .log
                    .append(now, event.id.as_deref(), &event.event, &event.data)
            else {
                continue; // the parser never yields a type with a line end
            };
            bytes += appended.bytes_delta;
            if hub.is_durable() {
                let record = state.log.last().expect("just appended").clone();
                ops.push(LogOp::Append {
                    token: stream.meta.token,
                    record,
                });
                if let Some(first_seq) = appended.trimmed_to {
                    ops.push(LogOp::Trim {
                        token: stream.meta.token,
                        first_seq,
                    });
                }
            }
        }
        if !hub.is_durable() {
            let last = state.log.next_seq() - 1;
            state.log.mark_durable(last);
        }
    }
    hub.metrics.log_bytes_add(bytes);
    for op in ops {
        hub.log_op(op);
    }
    if !hub.is_durable() {
        stream.changed.notify(usize::MAX);
    }
}

/// What stands in the log for an upstream event over `--max-event-bytes`
/// (the parser dropped it): a gap event, so that clients are told.
fn too_large() -> Event {
    Event {
        event: GAP_EVENT.to_owned(),
        data: gap_data(Gap {
            reason: GapReason::TooLarge,
            lost: None,
        }),
        id: None,
        last_event_id: String::new(),
    }
}

/// Follows a GET stream whose first answer is `body` (`None`: connect
/// first), with the request `headers`, until the linger is over or the
/// upstream gives up.
pub(super) async fn follow_get(
    hub: Arc<Hub>,
    stream: Arc<LoggedStream>,
    url: String,
    headers: Vec<(String, String)>,
    body: Option<HttpBody>,
) {
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
        let ids: Vec<&str> = state
            .log
            .records()
            .rev()
            .filter_map(|r| r.upstream_id.as_deref())
            .take(window)
            .collect();
        for id in ids.into_iter().rev() {
            let _ = tracker.observe(Some(id), now);
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
    let mut events = Vec::new();
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
        let item = match select(pin!(upstream.next()), listener).await {
            Either::Left((item, _)) => item,
            Either::Right(((), _)) => continue,
        };
        match item {
            Ok(StreamItem::Event(event)) => {
                events.push(event);
                while let Some(event) = upstream.next_ready() {
                    events.push(event);
                }
                append(&hub, &stream, &events);
                events.clear();
            }
            Ok(StreamItem::Skipped { .. }) => {
                hub.metrics.gap(GapReason::TooLarge);
                append(&hub, &stream, &[too_large()]);
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
    if let Some(e) = reason {
        eprintln!("tidemark: stopped following {}: {e}", stream.meta.target);
    }
    let mut state = stream.state();
    state.upstream = Upstream::Idle;
    state.stop = false;
    drop(state);
    stream.changed.notify(usize::MAX);
}

/// Reads a POST answer to its end, whether or not a client reads along.
pub(super) async fn read_post(hub: Arc<Hub>, stream: Arc<LoggedStream>, mut body: HttpBody) {
    let mut parser = Parser::new(hub.config.limits.parser());
    let mut events = Vec::new();
    let mut failure = None;
    hub.metrics.upstream_connected();
    loop {
        let chunk = match body.next().await {
            Some(Ok(chunk)) => chunk,
            Some(Err(e)) => {
                failure = Some(e.to_string());
                break;
            }
            None => {
                parser.finish();
                break;
            }
        };
        let oversized = parser.feed(&chunk).is_err();
        while let Some(item) = parser.next_item() {
            if let Item::Event(event) = item {
                events.push(event);
            }
        }
        if oversized {
            hub.metrics.gap(GapReason::TooLarge);
            events.push(too_large());
        }
        append(&hub, &stream, &events);
        events.clear();
    }
    while let Some(item) = parser.next_item() {
        if let Item::Event(event) = item {
            events.push(event);
        }
    }
    append(&hub, &stream, &events);
    drop(body);
    hub.metrics.upstream_disconnected();
    if let Some(e) = failure {
        hub.metrics.upstream_failure();
        eprintln!(
            "tidemark: the answer to POST {} broke off: {e}",
            stream.meta.target
        );
    }
    {
        let mut state = stream.state();
        state.log.end();
        state.upstream = Upstream::Idle;
    }
    hub.log_op(LogOp::End {
        token: stream.meta.token,
    });
    stream.changed.notify(usize::MAX);
}
