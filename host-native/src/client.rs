//! The client loop `follow` and `mcp` share: persistence, stop signals, and
//! [`run`], which drives a [`ResumableStream`] and hands each fresh event to
//! the command.
//!
//! The loop reports the stream's lifecycle on stderr as it happens, from the
//! core's [`StreamItem`]s: a lost connection at once (with the reason, when
//! it retries and which attempt that is), and its return (with the
//! `Last-Event-ID` it resumed from). Nothing is reconstructed from counters.
//!
//! Delivery follows the core's rule, in groups: the handler appends the
//! line of each event of a received chunk to a buffer, the loop writes the
//! buffer to the output in one write and flushes it, and the cursor moves
//! past the whole group when the loop asks for the next item or stops. A group with an event the handler
//! refused (its output failed, the lease was lost), or whose flush failed,
//! is not committed: the cursor stays before it.

use crate::{FileStore, LeaseLost, NativeStore, SmolClock};
use async_signal::{Signal, Signals};
use futures::StreamExt;
use futures::future::{Either, select};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::Arc;
use tidemark_core::sse::Event;
use tidemark_core::{
    Clock, Config, Connector, Millis, Registry, ResumableStream, ShutdownReport, StoreError,
    StreamError, StreamItem, WorkerHandle, persistence,
};

/// The default state directory: `$XDG_STATE_HOME/tidemark`, else
/// `~/.local/state/tidemark`, else `.tidemark` in the working directory.
pub fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("tidemark");
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => PathBuf::from(home).join(".local/state/tidemark"),
        None => PathBuf::from(".tidemark"),
    }
}

/// A command's persistence: a registry over a [`NativeStore`], its worker
/// running on smol, and a task that says on stderr when the store fails and
/// when it is back.
pub(crate) struct Persistence {
    pub(crate) registry: Registry<Arc<NativeStore>>,
    pub(crate) clock: SmolClock,
    worker: smol::Task<ShutdownReport>,
    health: smol::Task<()>,
}

impl Persistence {
    /// Starts the worker over `store`.
    pub(crate) fn start(store: NativeStore, clock: SmolClock) -> Self {
        let (registry, worker) = persistence(Arc::new(store), clock, Config::default());
        let health = smol::spawn(report_store_health(registry.worker().clone(), clock));
        Persistence {
            registry,
            clock,
            worker: smol::spawn(worker.run()),
            health,
        }
    }

    /// Opens the state directory's [`FileStore`] and starts the worker.
    pub(crate) fn open(state: &Path) -> Result<Self, StoreError> {
        let store = FileStore::open(state)?;
        Ok(Self::start(NativeStore::Left(store), SmolClock::new()))
    }

    /// Writes every committed cursor, waiting up to 5 seconds, and stops the
    /// worker; says on stderr what could not be written.
    pub(crate) async fn close(self) {
        let deadline = self.clock.now() + Millis::from_secs(5);
        match self.registry.shutdown(deadline).await {
            Ok(report) if !report.is_complete() => eprintln!(
                "tidemark: could not save the cursor of {} stream(s): {}",
                report.unwritten.len(),
                report
                    .last_error
                    .map_or_else(String::new, |e| e.to_string())
            ),
            Ok(_) => {}
            Err(e) => eprintln!("tidemark: {e}"),
        }
        self.worker.await;
        self.health.cancel().await;
    }
}

/// SIGINT and SIGTERM, which stop a command after it saves its cursors.
pub(crate) fn stop_signals() -> io::Result<Signals> {
    Signals::new([Signal::Int, Signal::Term])
}

/// Appends `line` as one line of JSON to a group of lines: [`run`] writes
/// and flushes a group at once, and a line is delivered only once that
/// flush succeeds.
pub(crate) fn write_line(group: &mut Vec<u8>, line: &impl serde::Serialize) -> io::Result<()> {
    serde_json::to_writer(&mut *group, line)?;
    group.push(b'\n');
    Ok(())
}

/// How [`run`] ended.
pub(crate) enum Ended<T, E> {
    /// The handler stopped the loop after delivering an event.
    Done(T),
    /// SIGINT or SIGTERM.
    Signal,
    /// The stream's lease is lost.
    Lease(LeaseLost),
    /// The stream gave up or broke its limits.
    Stream(StreamError),
    /// The handler refused an event: it is not delivered.
    Refused(E),
}

/// Drives `stream`, handing each fresh event to `handle` with the group of
/// lines to append its line to, until the handler stops (`Ok(Some(T))`) or
/// refuses an event (`Err(E)`), `admit` refuses a group, a stop signal
/// arrives, `keeper` (the task renewing the stream's lease, if any) ends, or
/// the stream stops. `Ok(None)` from the handler means accepted, go on.
///
/// Group commit: `admit` is asked before each group (the lease check: a
/// group is written in microseconds), then the events of one received chunk
/// go to the handler one after the other (the core's `next_ready`), then
/// the group is written to `out` in one write and flushed, and only then,
/// at the next read, does the cursor move past all of them. Every group the
/// handler accepted and that was flushed is committed before this returns.
/// A group `admit` refused is not delivered at all. When the handler refuses an event (its output
/// failed), or the flush fails, nothing of that group is committed: lines
/// written before it may be printed again later (at least once), never
/// skipped. Lifecycle changes are reported on stderr, after `observe` has
/// seen them (every item but events: `Open`, `Reconnecting`).
#[expect(
    clippy::too_many_arguments,
    reason = "each is one independent part of the loop; a struct of them would only be unpacked here"
)]
pub(crate) async fn run<C: Connector, W: Write, T, E: From<io::Error>>(
    stream: &mut ResumableStream<C, SmolClock>,
    clock: SmolClock,
    signals: &mut Signals,
    mut keeper: Option<&mut smol::Task<LeaseLost>>,
    out: &mut W,
    mut observe: impl FnMut(&StreamItem),
    mut admit: impl FnMut() -> Result<(), E>,
    mut handle: impl AsyncFnMut(Event, &mut Vec<u8>) -> Result<Option<T>, E>,
) -> Ended<T, E> {
    let mut lifecycle = Lifecycle::default();
    // Kept across groups: its capacity is the largest group's output.
    let mut group = Vec::new();
    let ended = loop {
        let next = {
            let item = pin!(stream.next());
            let lost = pin!(lease_lost(keeper.as_deref_mut()));
            // Stops first: a stream that always has data ready must not
            // starve them.
            match select(select(signals.next(), lost), item).await {
                Either::Right((item, _)) => item,
                Either::Left((Either::Left(_), _)) => {
                    eprintln!("tidemark: stopping on signal");
                    break Ended::Signal;
                }
                Either::Left((Either::Right((lost, _)), _)) => break Ended::Lease(lost),
            }
        };
        match next {
            Err(error) => break Ended::Stream(error),
            Ok(StreamItem::Event(mut event)) => {
                if let Err(refused) = admit() {
                    // Not delivered: the cursor stays before it.
                    return Ended::Refused(refused);
                }
                let handled = loop {
                    match handle(event, &mut group).await {
                        Ok(None) => match stream.next_ready() {
                            Some(ready) => event = ready,
                            None => break Ok(None),
                        },
                        other => break other,
                    }
                };
                let flushed = out.write_all(&group).and_then(|()| out.flush());
                group.clear();
                match (handled, flushed) {
                    // Not delivered: the cursor stays before the group.
                    (Err(refused), _) => return Ended::Refused(refused),
                    (Ok(_), Err(error)) => return Ended::Refused(E::from(error)),
                    (Ok(Some(done)), Ok(())) => break Ended::Done(done),
                    (Ok(None), Ok(())) => {}
                }
            }
            Ok(item) => {
                observe(&item);
                lifecycle.report(&item, clock.now());
            }
        }
    };
    stream.commit();
    ended
}

/// What the loop says on stderr about the connection.
#[derive(Default)]
struct Lifecycle {
    /// Whether a connection was open (the next failure is a loss).
    open: bool,
    /// Whether a connection was lost since the last one opened (the next
    /// open is a return).
    lost: bool,
}

impl Lifecycle {
    fn report(&mut self, item: &StreamItem, now: Millis) {
        match item {
            StreamItem::Open { last_event_id } => {
                if self.lost {
                    match last_event_id {
                        Some(id) => eprintln!(
                            "tidemark: connection is back, resumed from Last-Event-ID {id}"
                        ),
                        None => eprintln!("tidemark: connection is back, from the start"),
                    }
                }
                self.open = true;
                self.lost = false;
            }
            StreamItem::Reconnecting {
                failure,
                retry_at,
                attempt,
            } => {
                let what = if self.open {
                    "connection lost"
                } else {
                    "could not connect"
                };
                eprintln!(
                    "tidemark: {what}: {failure}; reconnecting in {} (attempt {attempt})",
                    delay(retry_at.saturating_sub(now))
                );
                self.open = false;
                self.lost = true;
            }
            // A new kind of item from a newer core: nothing to say.
            _ => {}
        }
    }
}

/// A delay for people: `250 ms`, `1.5 s`.
fn delay(d: Millis) -> String {
    if d < Millis(1000) {
        format!("{} ms", d.0)
    } else {
        format!("{:.1} s", d.0 as f64 / 1000.0)
    }
}

/// Resolves when the lease keeper ends (the lease is lost); never without a
/// lease.
async fn lease_lost(keeper: Option<&mut smol::Task<LeaseLost>>) -> LeaseLost {
    match keeper {
        Some(task) => task.await,
        None => std::future::pending().await,
    }
}

/// Reports on stderr when cursor writes start failing and when they succeed
/// again; the stream goes on in between.
async fn report_store_health(worker: WorkerHandle, clock: SmolClock) {
    let mut failing = false;
    loop {
        clock.sleep_until(clock.now() + Millis(100)).await;
        let stats = worker.stats();
        if !failing && stats.consecutive_failures > 0 {
            failing = true;
            let error = stats.last_error.map(|e| e.to_string()).unwrap_or_default();
            eprintln!(
                "tidemark: cursor store failing ({error}); the stream goes on, the cursor is retried"
            );
        } else if failing && stats.consecutive_failures == 0 {
            failing = false;
            eprintln!(
                "tidemark: cursor store is back; {} failed batches so far",
                stats.failed_batches
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_core::{ConnectRequest, EventTracker, Failure, StreamConfig, StreamKey};

    /// One body: `chunk`, then nothing (the connection stays open).
    struct OneChunk(&'static str);

    impl Connector for OneChunk {
        type Chunk = &'static [u8];
        type Body = futures::stream::BoxStream<'static, Result<&'static [u8], Failure>>;

        async fn connect(&self, _: ConnectRequest<'_>) -> Result<Self::Body, Failure> {
            let chunk = futures::stream::once(std::future::ready(Ok(self.0.as_bytes())));
            Ok(Box::pin(chunk.chain(futures::stream::pending())))
        }
    }

    /// Records each write and flush; its flushes fail if `fail`.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<Vec<u8>>,
        flushes: usize,
        fail: bool,
    }

    impl Write for Recorder {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.writes.push(bytes.to_vec());
            Ok(bytes.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            self.flushes += 1;
            if self.fail {
                return Err(io::Error::new(io::ErrorKind::BrokenPipe, "closed"));
            }
            Ok(())
        }
    }

    const THREE: &str = "id: 1\ndata: a\n\nid: 2\ndata: b\n\nid: 3\ndata: c\n\n";

    /// Runs the loop over [`THREE`] until the third event; returns the
    /// outcome and the stream.
    fn run_three(
        out: &mut Recorder,
    ) -> (Ended<(), io::Error>, ResumableStream<OneChunk, SmolClock>) {
        let clock = SmolClock::new();
        let tracker = EventTracker::new(StreamKey::new("s", "1"), Default::default());
        let mut stream = ResumableStream::new(
            OneChunk(THREE),
            clock,
            "http://x/",
            tracker,
            StreamConfig::default(),
        );
        let mut signals = stop_signals().unwrap();
        let mut seen = 0;
        let ended = smol::block_on(run(
            &mut stream,
            clock,
            &mut signals,
            None,
            out,
            |_| {},
            || Ok(()),
            async |event: Event, group: &mut Vec<u8>| {
                group.extend_from_slice(event.data.as_bytes());
                seen += 1;
                Ok((seen == 3).then_some(()))
            },
        ));
        (ended, stream)
    }

    #[test]
    fn a_chunk_is_one_write_and_one_flush_then_one_commit() {
        let mut out = Recorder::default();
        let (ended, stream) = run_three(&mut out);
        assert!(matches!(ended, Ended::Done(())));
        assert_eq!(out.writes, [b"abc".to_vec()]);
        assert_eq!(out.flushes, 1);
        assert_eq!(stream.tracker().seq(), 1, "one commit for the group");
        assert!(!stream.tracker().has_uncommitted());
        assert_eq!(stream.last_event_id(), Some("3"));
    }

    #[test]
    fn a_group_whose_flush_fails_is_not_committed() {
        let mut out = Recorder {
            fail: true,
            ..Recorder::default()
        };
        let (ended, stream) = run_three(&mut out);
        assert!(matches!(ended, Ended::Refused(e) if e.kind() == io::ErrorKind::BrokenPipe));
        assert_eq!(
            stream.tracker().seq(),
            0,
            "the cursor stays before the group"
        );
        assert!(stream.tracker().has_uncommitted());
    }

    #[test]
    fn delays_read_as_people_write_them() {
        assert_eq!(delay(Millis(0)), "0 ms");
        assert_eq!(delay(Millis(999)), "999 ms");
        assert_eq!(delay(Millis(1000)), "1.0 s");
        assert_eq!(delay(Millis(12_345)), "12.3 s");
    }

    #[test]
    fn a_loss_then_a_return_is_tracked() {
        let mut lifecycle = Lifecycle::default();
        lifecycle.report(
            &StreamItem::Open {
                last_event_id: None,
            },
            Millis(0),
        );
        assert!(lifecycle.open && !lifecycle.lost);
        let failure = tidemark_core::Failure::Network("reset".into());
        lifecycle.report(
            &StreamItem::Reconnecting {
                failure,
                retry_at: Millis(500),
                attempt: 1,
            },
            Millis(0),
        );
        assert!(!lifecycle.open && lifecycle.lost);
        lifecycle.report(
            &StreamItem::Open {
                last_event_id: Some("7".into()),
            },
            Millis(600),
        );
        assert!(lifecycle.open && !lifecycle.lost);
    }
}
