//! `tidemark follow`: one resumable stream, printed as JSON lines.
//!
//! The client loop, signals and persistence are shared with [`mcp`](crate::mcp)
//! (in the crate's private `client` module); this module adds what is `follow`'s own: the output format, the event
//! budget, following under a Redis lease as a holder or a standby, and its
//! metrics ([`FollowMetrics`], served with `--metrics-listen`).

use crate::client::{self, Ended, Persistence, stop_signals, write_line};
use crate::lease::TAKEOVER_SEQ_GAP;
use crate::metrics::{FollowMetrics, serve_metrics};
use crate::private::HeaderNames;
use crate::{
    FileStore, HttpConnector, Lease, LeaseLost, NativeStore, RedisConfig, RedisStore, SmolClock,
};
use async_signal::Signals;
use futures::StreamExt;
use futures::future::{Either, select};
use std::fmt;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tidemark_core::sse::Event;
use tidemark_core::{
    Clock, Cursor, Millis, Registry, RegistryError, ResumableStream, StoreError, StreamConfig,
    StreamError, StreamItem, StreamKey,
};

/// What to follow and where to keep its cursor.
///
/// Its `Debug` shows the names of the headers, not their values.
#[derive(Clone)]
pub struct FollowOptions {
    /// The SSE URL.
    pub url: String,
    /// The state directory of the `FileStore` (the cursor and the dedup
    /// window): created `0700`, its files `0600`.
    pub state: PathBuf,
    /// The stream's name; the cursor is kept per URL and name.
    pub stream: String,
    /// Extra request headers.
    pub headers: Vec<(String, String)>,
    /// Stop after this many fresh events.
    pub max_events: Option<u64>,
    /// Keep the cursor in Redis instead of the state directory, following
    /// the stream only while holding its lease.
    pub redis: Option<RedisFollow>,
    /// Serve [`FollowMetrics`] on `GET /metrics` at this address (port 0
    /// picks a free port; the address is said on stderr).
    pub metrics_listen: Option<SocketAddr>,
}

impl fmt::Debug for FollowOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FollowOptions")
            .field("url", &self.url)
            .field("state", &self.state)
            .field("stream", &self.stream)
            .field("headers", &HeaderNames(&self.headers))
            .field("max_events", &self.max_events)
            .field("redis", &self.redis)
            .field("metrics_listen", &self.metrics_listen)
            .finish()
    }
}

/// Where `follow` keeps the cursor in Redis, and its lease.
#[derive(Clone, Debug)]
pub struct RedisFollow {
    /// The server, key prefix, cursor TTL and whether windows are kept
    /// too ([`RedisConfig::windows`]).
    pub store: RedisConfig,
    /// Time to live of the stream's lease: how long a standby waits after the
    /// holder dies (10 s in the CLI). `None`: no lease, for one consumer per
    /// stream; it follows through Redis outages of any length.
    pub lease_ttl: Option<Duration>,
}

/// Why following stopped with an error.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    /// The state directory could not be opened.
    #[error("state: {0}")]
    Store(#[source] StoreError),
    /// The stream could not be opened in the registry.
    #[error(transparent)]
    Registry(RegistryError),
    /// The stream gave up or broke its limits.
    #[error(transparent)]
    Stream(StreamError),
    /// Writing the output failed.
    #[error("writing output: {0}")]
    Output(#[source] io::Error),
    /// The metrics address could not be bound.
    #[error("metrics: {0}")]
    Metrics(#[source] io::Error),
}

/// The exit status of `tidemark follow`: success when it stopped after
/// `--max-events` or on a signal; otherwise failure, with the reason on
/// stderr.
pub fn exit_code(result: &Result<u64, FollowError>) -> ExitCode {
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tidemark: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Why a turn refused an event: it is not delivered.
enum Refusal {
    /// The lease is no longer valid: another instance may deliver it.
    Lease(LeaseLost),
    /// Writing it failed.
    Output(io::Error),
}

impl From<io::Error> for Refusal {
    fn from(error: io::Error) -> Self {
        Refusal::Output(error)
    }
}

/// One output line of `follow` (keys in the order serde_json's maps print
/// them, as before: `data`, `event`, `id`).
#[derive(serde::Serialize)]
struct Line<'a> {
    data: &'a str,
    event: &'a str,
    id: Option<&'a str>,
}

/// Follows the stream, writing each fresh event to `out` as one JSON object
/// per line (`id`, `event`, `data`) and flushing it before the cursor moves.
/// Stops after `max_events`, on SIGINT or SIGTERM, or on a permanent error;
/// in every case it writes the cursor to the store before it returns.
/// Returns the number of events written.
///
/// With Redis and a lease, it follows only while it holds the stream's
/// lease: it waits as a standby until it can take it, stops delivering at
/// once when it loses it (another instance took it, or Redis was out of
/// reach for most of a TTL), and then waits as a standby again.
///
/// With `metrics_listen`, it serves its [`FollowMetrics`] there while it
/// follows, and says `tidemark: metrics on http://ADDR/metrics` on stderr.
pub async fn follow(options: FollowOptions, out: &mut impl Write) -> Result<u64, FollowError> {
    let clock = SmolClock::new();
    let key = StreamKey::new(&options.url, &options.stream);
    let mut signals = stop_signals().map_err(FollowError::Output)?;
    let metrics_listener = match options.metrics_listen {
        Some(addr) => {
            let listener = smol::net::TcpListener::bind(addr)
                .await
                .map_err(FollowError::Metrics)?;
            let addr = listener.local_addr().map_err(FollowError::Metrics)?;
            eprintln!("tidemark: metrics on http://{addr}/metrics");
            Some(listener)
        }
        None => None,
    };
    let metrics = FollowMetrics::new();
    let (store, lease) = match &options.redis {
        None => {
            let store = FileStore::open(&options.state).map_err(FollowError::Store)?;
            (NativeStore::Left(store), None)
        }
        Some(redis) => {
            let store = Arc::new(RedisStore::new(redis.store.clone()).map_err(FollowError::Store)?);
            let lease = redis
                .lease_ttl
                .map(|ttl| Lease::new(store.clone(), &key, ttl, clock));
            (NativeStore::Right(store), lease)
        }
    };
    // One registry for every turn as the holder: a cursor this process
    // committed but could not write yet is where its next turn resumes.
    let persistence = Persistence::start(store, clock);
    let registry = &persistence.registry;
    let mut written = 0u64;
    // The newest cursor this process committed, carried from turn to turn.
    let mut committed = None;
    let following = async {
        loop {
            if let Some(lease) = &lease {
                let signalled = {
                    let acquired = pin!(acquire(lease, &key));
                    matches!(select(acquired, signals.next()).await, Either::Right(_))
                };
                if signalled {
                    eprintln!("tidemark: stopping on signal");
                    break Ok(());
                }
            }
            let turn = Turn {
                options: &options,
                key: &key,
                registry,
                lease: lease.as_ref(),
                clock,
                metrics: &metrics,
            };
            match turn
                .run(&mut signals, out, &mut written, &mut committed)
                .await
            {
                Ok(Some(lost)) => eprintln!("tidemark: {lost}; stopped delivering"),
                Ok(None) => break Ok(()),
                Err(FollowError::Registry(RegistryError::Store(e)))
                    if e.is_transient() && lease.is_some() =>
                {
                    // Redis failed right after the lease was taken: let it go
                    // and try again as a standby.
                    eprintln!("tidemark: loading the cursor: {e}; standby again");
                    if let Some(lease) = &lease {
                        let _ = lease.release().await;
                    }
                    clock.sleep_until(clock.now() + Millis::from_secs(1)).await;
                }
                Err(e) => break Err(e),
            }
        }
    };
    let outcome = match metrics_listener {
        None => following.await,
        Some(listener) => {
            // Duplicates and the store's counters are the registry's.
            let render = |format| {
                metrics.update(&registry.stats());
                metrics.render(format)
            };
            let serving = serve_metrics(listener, render, std::future::pending());
            match select(pin!(following), pin!(serving)).await {
                Either::Left((outcome, _)) => outcome,
                Either::Right(((), following)) => following.await,
            }
        }
    };
    let worker = registry.worker().clone();
    // Writes the Redis script refused as older than the stored cursor: a
    // previous holder's late writes, or ours after another took over.
    let stale = match &**registry.store() {
        NativeStore::Right(store) => format!(", {} stale cursors refused", store.stale_cursors()),
        NativeStore::Left(_) => String::new(),
    };
    persistence.close().await;
    let worker = worker.stats();
    eprintln!(
        "tidemark: {written} events; {} cursor writes in {} batches, {} failed batches{stale}{}",
        worker.cursors_written,
        worker.batches,
        worker.failed_batches,
        worker
            .last_error
            .map_or_else(String::new, |e| format!(", last store error: {e}"))
    );
    if let Some(lease) = lease {
        // The cursor is saved: a standby may take over at once. (The script
        // deletes the key only if it holds this instance's token.)
        if let Err(e) = lease.release().await {
            eprintln!("tidemark: could not release the lease: {e}");
        }
    }
    outcome.map(|()| written)
}

/// One turn of following: with a lease, the time this instance holds it.
struct Turn<'a> {
    options: &'a FollowOptions,
    key: &'a StreamKey,
    registry: &'a Registry<Arc<NativeStore>>,
    lease: Option<&'a Lease>,
    clock: SmolClock,
    metrics: &'a FollowMetrics,
}

impl Turn<'_> {
    /// Follows until `max_events` in all or a signal (`Ok(None)`), the loss
    /// of the lease (`Ok(Some)`), or an error. The cursor is committed up to
    /// the last event written. `committed` is the newest cursor this process
    /// committed in earlier turns: the turn starts from it when it is newer
    /// than the stored one (Redis lost the stored one, or never got it), and
    /// it is updated when the turn ends.
    async fn run<W: Write>(
        &self,
        signals: &mut Signals,
        out: &mut W,
        written: &mut u64,
        committed: &mut Option<Cursor>,
    ) -> Result<Option<LeaseLost>, FollowError> {
        let options = self.options;
        let mut tracker = self
            .registry
            .open(self.key.clone())
            .await
            .map_err(FollowError::Registry)?;
        if let Some(ours) = committed.as_ref().filter(|c| c.seq > tracker.seq()) {
            tracker.seed(ours);
        }
        if self.lease.is_some() {
            // Any cursor the previous owner still writes stays below ours.
            // Half the range still takes 2^31 takeovers; a seq beyond it is
            // no cursor of ours.
            if tracker.seq() > u64::MAX / 2 {
                return Err(FollowError::Store(StoreError::Corrupt {
                    what: format!("the cursor of {}", tracker.key()),
                    detail: format!("seq {} is beyond any takeover", tracker.seq()),
                }));
            }
            tracker.seed(&Cursor {
                seq: tracker.seq() + TAKEOVER_SEQ_GAP,
                ..tracker.cursor()
            });
        }
        let mut keeper = self
            .lease
            .cloned()
            .map(|lease| smol::spawn(async move { lease.keep().await }));
        match tracker.last_event_id() {
            Some(id) => eprintln!(
                "tidemark: following {} from Last-Event-ID {id}",
                options.url
            ),
            None => eprintln!("tidemark: following {} from the start", options.url),
        }
        let config = StreamConfig {
            headers: options.headers.clone(),
            ..StreamConfig::default()
        };
        let mut stream = ResumableStream::new(
            HttpConnector::default(),
            self.clock,
            &options.url,
            tracker,
            config,
        );
        let lease = self.lease;
        let metrics = self.metrics;
        let max_events = options.max_events;
        let ended = if max_events.is_some_and(|max| *written >= max) {
            Ended::Done(())
        } else {
            client::run(
                &mut stream,
                self.clock,
                signals,
                keeper.as_mut(),
                out,
                |item| match item {
                    StreamItem::Open { .. } => metrics.set_connected(true),
                    StreamItem::Reconnecting { .. } => {
                        metrics.set_connected(false);
                        metrics.reconnect();
                    }
                    _ => {}
                },
                || match lease.filter(|l| !l.is_valid()) {
                    // A renewal that found another token zeroes the
                    // deadline.
                    Some(lease) => Err(Refusal::Lease(if lease.valid_until() == Millis::ZERO {
                        LeaseLost::Taken
                    } else {
                        LeaseLost::Lapsed(None)
                    })),
                    None => Ok(()),
                },
                async |event: Event, group: &mut Vec<u8>| {
                    let line = Line {
                        data: &event.data,
                        event: &event.event,
                        id: event.id.as_deref(),
                    };
                    write_line(group, &line)?;
                    *written += 1;
                    metrics.events(1);
                    Ok(max_events.filter(|max| *written >= *max).map(|_| ()))
                },
            )
            .await
        };
        metrics.set_connected(false);
        let outcome = match ended {
            Ended::Done(()) | Ended::Signal => Ok(None),
            Ended::Lease(lost) | Ended::Refused(Refusal::Lease(lost)) => Ok(Some(lost)),
            Ended::Stream(e) => Err(FollowError::Stream(e)),
            Ended::Refused(Refusal::Output(e)) => Err(FollowError::Output(e)),
        };
        // The slot's cursor is the committed one, without an event in hand.
        let newest = self.registry.newest_cursors().into_iter();
        if let Some(cursor) = newest.filter(|c| &c.key == self.key).max_by_key(|c| c.seq)
            && committed.as_ref().is_none_or(|c| cursor.seq > c.seq)
        {
            *committed = Some(cursor);
        }
        drop(stream);
        if let Some(keeper) = keeper {
            keeper.cancel().await;
        }
        outcome
    }
}

/// Waits as a standby until `lease` is held, saying so on stderr.
async fn acquire(lease: &Lease, key: &StreamKey) {
    let mut last: Option<String> = None;
    lease
        .acquire(|error| {
            let status = match error {
                None => "another instance holds it".to_owned(),
                Some(e) => e.to_string(),
            };
            if last.as_ref() != Some(&status) {
                eprintln!("tidemark: standby for {key}: {status}; waiting for the lease");
                last = Some(status);
            }
        })
        .await;
    eprintln!("tidemark: holding the lease on {key} ({})", lease.token());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error;

    #[test]
    fn errors_say_what_failed_and_keep_their_cause() {
        let output = FollowError::Output(io::Error::new(io::ErrorKind::BrokenPipe, "closed"));
        assert_eq!(output.to_string(), "writing output: closed");
        assert_eq!(output.source().unwrap().to_string(), "closed");
        let stream = FollowError::Stream(StreamError::Closed);
        assert_eq!(stream.to_string(), "stream closed");
    }

    #[test]
    fn debug_shows_header_names_not_values() {
        let options = FollowOptions {
            url: "http://127.0.0.1:1/".into(),
            state: "state".into(),
            stream: "default".into(),
            headers: vec![("Authorization".into(), "Bearer s3cr3t".into())],
            max_events: None,
            redis: None,
            metrics_listen: None,
        };
        let shown = format!("{options:?}");
        assert!(shown.contains("Authorization: <redacted>"), "{shown}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
    }
}
