//! `tidemark follow`: one resumable stream, printed as JSON lines.

use crate::{FileStore, HttpConnector, SmolClock};
use async_signal::{Signal, Signals};
use futures::StreamExt;
use futures::future::{Either, select};
use std::fmt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::Arc;
use tidemark_core::sse::Event;
use tidemark_core::{
    Clock, Config, Connector, Millis, Registry, RegistryError, ResumableStream, ShutdownReport,
    StoreError, StreamConfig, StreamError, StreamKey, persistence,
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

/// A command's persistence: a registry over the state directory's
/// [`FileStore`], and its worker running on smol.
pub(crate) struct Persistence {
    pub(crate) registry: Registry<Arc<FileStore>>,
    pub(crate) clock: SmolClock,
    worker: smol::Task<ShutdownReport>,
}

impl Persistence {
    /// Opens the state directory and starts the worker.
    pub(crate) fn open(state: &Path) -> Result<Self, StoreError> {
        let clock = SmolClock::new();
        let store = Arc::new(FileStore::open(state)?);
        let (registry, worker) = persistence(store, clock, Config::default());
        Ok(Persistence {
            registry,
            clock,
            worker: smol::spawn(worker.run()),
        })
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

/// The stream's next event, or `None` once a stop signal arrives. Says on
/// stderr why the stream reconnects.
pub(crate) async fn next_or_stop<C: Connector>(
    stream: &mut ResumableStream<C, SmolClock>,
    signals: &mut Signals,
) -> Option<Result<Event, StreamError>> {
    let reconnects = stream.stats().reconnects;
    let next = {
        let event = pin!(stream.next());
        match select(event, signals.next()).await {
            Either::Left((event, _)) => Some(event),
            Either::Right(_) => None,
        }
    };
    let stats = stream.stats();
    // A stream that gave up says why in its error.
    if stats.reconnects != reconnects && !matches!(next, Some(Err(_))) {
        if let Some(failure) = &stats.last_failure {
            eprintln!("tidemark: {failure}; reconnecting ({})", stats.reconnects);
        }
    }
    if next.is_none() {
        eprintln!("tidemark: stopping on signal");
    }
    next
}

/// Follows the stream, writing each fresh event to `out` as one JSON object
/// per line (`id`, `event`, `data`) and flushing it before the cursor moves.
/// Stops after `max_events`, on SIGINT or SIGTERM, or on a permanent error;
/// in every case it writes the cursor to the state directory before it
/// returns. Returns the number of events written.
pub async fn follow(options: FollowOptions, out: &mut impl Write) -> Result<u64, FollowError> {
    let persistence = Persistence::open(&options.state).map_err(FollowError::Store)?;
    let tracker = persistence
        .registry
        .open(StreamKey::new(&options.url, &options.stream))
        .await
        .map_err(FollowError::Registry)?;
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
        persistence.clock,
        &options.url,
        tracker,
        config,
    );
    let mut signals = stop_signals().map_err(FollowError::Output)?;
    let mut written = 0u64;
    let outcome = loop {
        if options.max_events.is_some_and(|max| written >= max) {
            break Ok(());
        }
        match next_or_stop(&mut stream, &mut signals).await {
            None => break Ok(()),
            Some(Err(e)) => break Err(FollowError::Stream(e)),
            Some(Ok(event)) => {
                let line = serde_json::json!({
                    "id": event.id,
                    "event": event.event,
                    "data": event.data,
                });
                if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
                    // Not delivered: the cursor stays before it.
                    break Err(FollowError::Output(e));
                }
                written += 1;
            }
        }
    };
    // Every event written was flushed: it is delivered.
    if !matches!(outcome, Err(FollowError::Output(_))) {
        stream.commit();
    }
    drop(stream);
    persistence.close().await;
    outcome.map(|()| written)
}
