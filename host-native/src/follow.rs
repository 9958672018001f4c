//! `tidemark follow`: one resumable stream, printed as JSON lines.

use crate::lease::TAKEOVER_SEQ_GAP;
use crate::{
    FileStore, HttpConnector, Lease, LeaseLost, NativeStore, RedisConfig, RedisStore, SmolClock,
};
use async_signal::{Signal, Signals};
use futures::StreamExt;
use futures::future::{Either, select};
use std::fmt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;
use tidemark_core::sse::Event;
use tidemark_core::{
    Clock, Config, Connector, Cursor, Millis, Registry, RegistryError, ResumableStream,
    ShutdownReport, StoreError, StreamConfig, StreamError, StreamKey, WorkerHandle, persistence,
};

/// What to follow and where to keep its cursor.
#[derive(Clone, Debug)]
pub struct FollowOptions {
    /// The SSE URL.
    pub url: String,
    /// The state directory of the `FileStore`.
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
}

/// Where `follow` keeps the cursor in Redis, and its lease.
#[derive(Clone, Debug)]
pub struct RedisFollow {
    /// The server, key prefix and cursor TTL.
    pub store: RedisConfig,
    /// Time to live of the stream's lease: how long a standby waits after the
    /// holder dies (10 s in the CLI). `None`: no lease, for one consumer per
    /// stream; it follows through Redis outages of any length.
    pub lease_ttl: Option<Duration>,
}

/// Why following stopped with an error.
#[derive(Debug)]
pub enum FollowError {
    /// The state directory could not be opened.
    Store(StoreError),
    /// The stream could not be opened in the registry.
    Registry(RegistryError),
    /// The stream gave up or broke its limits.
    Stream(StreamError),
    /// Writing the output failed.
    Output(io::Error),
}

impl fmt::Display for FollowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FollowError::Store(e) => write!(f, "state: {e}"),
            FollowError::Registry(e) => write!(f, "{e}"),
            FollowError::Stream(e) => write!(f, "{e}"),
            FollowError::Output(e) => write!(f, "writing output: {e}"),
        }
    }
}

impl std::error::Error for FollowError {}

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

/// A command's persistence: a registry over a [`NativeStore`], and its
/// worker running on smol.
pub(crate) struct Persistence {
    pub(crate) registry: Registry<Arc<NativeStore>>,
    pub(crate) clock: SmolClock,
    worker: smol::Task<ShutdownReport>,
}

impl Persistence {
    /// Starts the worker over `store`.
    pub(crate) fn start(store: NativeStore, clock: SmolClock) -> Self {
        let (registry, worker) = persistence(Arc::new(store), clock, Config::default());
        Persistence {
            registry,
            clock,
            worker: smol::spawn(worker.run()),
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
    }
}

/// SIGINT and SIGTERM, which stop a command after it saves its cursors.
pub(crate) fn stop_signals() -> io::Result<Signals> {
    Signals::new([Signal::Int, Signal::Term])
}

/// Why a command stopped waiting for its stream's next event.
pub(crate) enum Interrupt {
    /// SIGINT or SIGTERM.
    Signal,
    /// The stream's lease is lost: stop delivering at once.
    Lease(LeaseLost),
}

/// The stream's next event, unless a stop signal arrives or `keeper` (the
/// task renewing the stream's lease, if any) ends first. Says on stderr why
/// the stream reconnects.
pub(crate) async fn next_or_stop<C: Connector>(
    stream: &mut ResumableStream<C, SmolClock>,
    signals: &mut Signals,
    keeper: Option<&mut smol::Task<LeaseLost>>,
) -> Result<Result<Event, StreamError>, Interrupt> {
    let reconnects = stream.stats().reconnects;
    let next = {
        let event = pin!(stream.next());
        let lost = pin!(lease_lost(keeper));
        match select(event, select(signals.next(), lost)).await {
            Either::Left((event, _)) => Ok(event),
            Either::Right((Either::Left(_), _)) => Err(Interrupt::Signal),
            Either::Right((Either::Right((lost, _)), _)) => Err(Interrupt::Lease(lost)),
        }
    };
    let stats = stream.stats();
    // A stream that gave up says why in its error.
    if stats.reconnects != reconnects
        && matches!(next, Ok(Ok(_)))
        && let Some(failure) = &stats.last_failure
    {
        eprintln!("tidemark: {failure}; reconnecting ({})", stats.reconnects);
    }
    if matches!(next, Err(Interrupt::Signal)) {
        eprintln!("tidemark: stopping on signal");
    }
    next
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
pub async fn follow(options: FollowOptions, out: &mut impl Write) -> Result<u64, FollowError> {
    let clock = SmolClock::new();
    let key = StreamKey::new(&options.url, &options.stream);
    let mut signals = stop_signals().map_err(FollowError::Output)?;
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
    let health = smol::spawn(report_store_health(registry.worker().clone(), clock));
    let mut written = 0u64;
    // The newest cursor this process committed, carried from turn to turn.
    let mut committed = None;
    let outcome = loop {
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
    };
    let worker = registry.worker().clone();
    // Writes the Redis script refused as older than the stored cursor: a
    // previous holder's late writes, or ours after another took over.
    let stale = match &**registry.store() {
        NativeStore::Right(store) => format!(", {} stale cursors refused", store.stale_cursors()),
        NativeStore::Left(_) => String::new(),
    };
    persistence.close().await;
    health.cancel().await;
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
}

impl Turn<'_> {
    /// Follows until `max_events` in all or a signal (`Ok(None)`), the loss
    /// of the lease (`Ok(Some)`), or an error. The cursor is committed up to
    /// the last event written. `committed` is the newest cursor this process
    /// committed in earlier turns: the turn starts from it when it is newer
    /// than the stored one (Redis lost the stored one, or never got it), and
    /// it is updated when the turn ends.
    async fn run(
        &self,
        signals: &mut Signals,
        out: &mut impl Write,
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
        let outcome = loop {
            if options.max_events.is_some_and(|max| *written >= max) {
                break Ok(None);
            }
            match next_or_stop(&mut stream, signals, keeper.as_mut()).await {
                Err(Interrupt::Signal) => break Ok(None),
                Err(Interrupt::Lease(lost)) => break Ok(Some(lost)),
                Ok(Err(e)) => break Err(FollowError::Stream(e)),
                Ok(Ok(_)) if self.lease.is_some_and(|l| !l.is_valid()) => {
                    // A renewal that found another token zeroes the deadline.
                    let taken = self.lease.is_some_and(|l| l.valid_until() == Millis::ZERO);
                    break Ok(Some(if taken {
                        LeaseLost::Taken
                    } else {
                        LeaseLost::Lapsed(None)
                    }));
                }
                Ok(Ok(event)) => {
                    let line = serde_json::json!({
                        "id": event.id,
                        "event": event.event,
                        "data": event.data,
                    });
                    if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
                        // Not delivered: the cursor stays before it.
                        break Err(FollowError::Output(e));
                    }
                    *written += 1;
                }
            }
        };
        // Every event written was flushed: it is delivered. After losing the
        // lease, or failing to write, the last event taken from the stream
        // was not written.
        if matches!(outcome, Ok(None) | Err(FollowError::Stream(_))) {
            stream.commit();
        }
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
