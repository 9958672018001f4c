//! The client side of a logged stream: each client is an offset into the
//! log. A wake (an event became visible, the stream ended) writes
//! everything after the offset in one frame, up to a byte budget; there is
//! no queue per client, so a slow client only falls behind and never holds
//! the upstream or anyone else.

use super::hub::{Hub, LoggedStream, Upstream};
use super::storage::StreamKind;
use futures::Stream;
use futures::future::{Either, select};
use hyper::body::Bytes;
use std::sync::Arc;
use std::time::Duration;
use tidemark_core::replay::{Gap, Start, encode_gap, event_id};
use tidemark_core::sse::{encode_comment, encode_event, encode_retry};

/// The most bytes of events one wake writes to a client.
pub(super) const READ_BUDGET: usize = 64 * 1024;

/// Counts the client out when its body is dropped (it left, or it ended).
struct ClientGuard {
    hub: Arc<Hub>,
    stream: Arc<LoggedStream>,
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.hub.client_out(&self.stream);
    }
}

struct Reader {
    guard: ClientGuard,
    next: u64,
    gap: Option<Gap>,
    hinted: bool,
    priming: bool,
    done: bool,
    keep_alive: Duration,
    timer: async_io::Timer,
}

/// The body of one client already counted in ([`Hub::client_in`]): the
/// `retry:` hint, the gap signal if `start` has one (else, with `priming`,
/// an event of the id before `start.next` and empty data), then every event from
/// `start.next` on, keep-alive comments while idle. It ends when the stream
/// has ended and the client has everything, or when nobody follows the
/// upstream any more (the client reconnects and revives it).
pub(super) fn body(
    hub: Arc<Hub>,
    stream: Arc<LoggedStream>,
    start: Start,
    priming: bool,
) -> impl Stream<Item = Bytes> + Send + 'static {
    let keep_alive = hub.config.keep_alive;
    let reader = Reader {
        guard: ClientGuard { hub, stream },
        next: start.next,
        gap: start.gap,
        hinted: false,
        priming,
        done: false,
        keep_alive,
        timer: async_io::Timer::after(keep_alive),
    };
    futures::stream::unfold(reader, |mut r| async move {
        if r.done {
            return None;
        }
        let mut out = Vec::new();
        if !r.hinted {
            r.hinted = true;
            encode_retry(&mut out, r.guard.hub.config.retry_ms);
        }
        let stream = r.guard.stream.clone();
        if let Some(gap) = r.gap.take() {
            encode_gap(&mut out, stream.meta.token, r.next, gap);
            // The gap event has an id: it primes the client as well.
            r.priming = false;
        } else if std::mem::take(&mut r.priming) {
            let id = event_id(stream.meta.token, r.next.saturating_sub(1));
            encode_event(&mut out, None, Some(&id), "").expect("a valid id");
        }
        loop {
            let listener = {
                let state = stream.state();
                let read = state.log.read(&mut r.next, READ_BUDGET, &mut out);
                r.guard.hub.metrics.events_out(read.events);
                if let Some(gap) = read.gap {
                    r.guard.hub.metrics.gap(gap.reason);
                }
                let over = state.log.is_complete(r.next)
                    || (stream.meta.kind == StreamKind::Get
                        && state.upstream == Upstream::Idle
                        && r.next > state.log.durable());
                if over {
                    r.done = true;
                }
                if !out.is_empty() || over {
                    None
                } else {
                    Some(stream.changed.listen())
                }
            };
            let Some(listener) = listener else {
                return if out.is_empty() {
                    None
                } else {
                    Some((Bytes::from(out), r))
                };
            };
            if let Either::Right(_) = select(listener, &mut r.timer).await {
                r.timer.set_after(r.keep_alive);
                encode_comment(&mut out, "keep-alive");
                return Some((Bytes::from(out), r));
            }
        }
    })
}
