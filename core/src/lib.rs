//! `tidemark-core`: the runtime-agnostic heart of tidemark.
//!
//! tidemark keeps Server-Sent-Events streams resumable: it remembers the last
//! event id of every stream, drops replayed duplicates, and stores each
//! stream's cursor durably without slowing the stream down. This crate holds
//! the logic; it does no I/O, reads no clock, and spawns nothing. Hosts (the
//! native `tidemark` binary, the browser package) supply a [`Store`], a
//! [`Clock`] and an executor.
//!
//! # Pieces
//!
//! - [`EventTracker`]: one per stream. `observe` classifies an event as fresh
//!   or duplicate with a bounded window of recent ids (numbers for increasing
//!   decimal ids, keyed 64-bit fingerprints for any others);
//!   `commit` moves the cursor once the application has the event.
//! - [`PersistenceWorker`]: one future for all streams. Coalesces each
//!   stream's cursor to the newest, writes every dirty stream at most once per
//!   flush interval in a single [`Store::save_with_windows`], retries failures from a
//!   min-heap with capped exponential backoff and jitter, and shuts down with
//!   a report.
//! - [`Registry`]: opens trackers seeded from the store and wired to the
//!   worker; [`persistence`] builds both.
//! - [`sse`]: the Server-Sent-Events codec, a sans-I/O WHATWG parser with
//!   caps on line and event size, and an encoder for servers.
//! - [`ReconnectPolicy`]: backoff with jitter above the server's `retry:`
//!   floor, `Retry-After`, a budget of attempts without progress, an idle
//!   watchdog, and a clear stop on permanent failures.
//! - [`ResumableStream`]: the client loop both hosts share, generic over a
//!   host [`Connector`] and [`Clock`]: connect with `Last-Event-ID`, parse,
//!   drop replays, deliver fresh events, back off, reconnect.
//! - [`replay`]: the rules of a proxy's replay log: ids that name their
//!   stream, retention, durability, gap signals, keyed identities.
//! - [`Millis`], [`Clock`], [`Cursor`], [`StreamKey`], [`MemStore`],
//!   [`EitherStore`] (one store type for a store chosen at run time), and
//!   behind the `test-util` feature `ManualClock` and `FlakyStore`.
//!
//! # Delivery semantics
//!
//! - While a process lives, every event with an id is delivered once:
//!   duplicates inside the window (the last 1024 distinct ids by default) are
//!   dropped. Events without an id are always delivered.
//! - A cursor moves only when the application commits, after the event was
//!   handed over: a crash may repeat events, never skip one.
//! - Across a crash delivery is at-least-once; what is redelivered is bounded
//!   by the flush interval (250 ms by default), like a consumer offset
//!   auto-commit. After a graceful shutdown nothing is redelivered.
//! - With a store that keeps windows ([`Store::window_key`]; `MemStore` and
//!   the hosts' file and IndexedDB stores do), each stream's dedup window is
//!   written with its cursor (only the ids added since the last write, see
//!   [`WindowChange`]) and a tracker opened from the store starts with it:
//!   after a graceful shutdown nothing is redelivered whatever the server
//!   replays within the window, and after a crash replays of ids older than
//!   the last flush are still dropped. A store without windows keeps the
//!   cursor only.
//! - The persisted cursor of a stream never moves backwards: every cursor
//!   carries a per-stream sequence number, a newer cursor replaces a pending
//!   retry, and stores keep the highest sequence.
//! - A store outage never blocks or slows the stream: commits only update an
//!   in-memory slot; the newest cursor is retried until the store is back, and
//!   the outage shows in [`Stats`].
//!
//! # Driving contract
//!
//! Per event: `observe(id, now)`; deliver if fresh; `commit()` once delivered
//! (see [`tracker`]). The host spawns [`PersistenceWorker::run`] once and calls
//! [`WorkerHandle::shutdown`] (or [`Registry::shutdown`]) before exiting; the
//! worker waits on the channel and on the clock and needs nothing else (see
//! [`worker`]). A host that reads SSE over its own HTTP client implements
//! [`Connector`] and loops on [`ResumableStream::next`], which observes and
//! commits for it and yields the connection's lifecycle as values
//! ([`StreamItem`]: open, event, reconnecting; see [`stream`]).
//!
//! # Example
//!
//! ```
//! use futures::executor::LocalPool;
//! use futures::task::LocalSpawnExt;
//! use std::rc::Rc;
//! use tidemark_core::{persistence, Clock, Config, ManualClock, MemStore, Millis, StreamKey};
//!
//! let store = Rc::new(MemStore::new());
//! let clock = ManualClock::new();
//! let (registry, worker) = persistence(store.clone(), clock.clone(), Config::default());
//! let mut pool = LocalPool::new();
//! pool.spawner().spawn_local(async move { worker.run().await; }).unwrap();
//!
//! let key = StreamKey::new("session-1", "stream-a");
//! let mut tracker = pool.run_until(registry.open(key.clone())).unwrap();
//! let mut delivered = Vec::new();
//! let mut receive = |tracker: &mut tidemark_core::EventTracker, id: &'static str| {
//!     if tracker.observe(Some(id), clock.now()).is_fresh() {
//!         delivered.push(id); // hand the event to the application...
//!         tracker.commit(); // ...then move the cursor
//!     }
//! };
//!
//! // The first commit is written at once...
//! receive(&mut tracker, "1");
//! pool.run_until_stalled();
//! assert_eq!(store.get(&key).unwrap().last_event_id, "1");
//!
//! // ...later ones within the flush interval are coalesced into one write.
//! for id in ["2", "2", "3", "1"] {
//!     receive(&mut tracker, id);
//! }
//! pool.run_until_stalled();
//! assert_eq!(store.get(&key).unwrap().last_event_id, "1", "not yet");
//! clock.advance(Millis(250));
//! pool.run_until_stalled();
//! assert_eq!(store.get(&key).unwrap().last_event_id, "3");
//! assert_eq!(store.batches(), 2);
//! assert_eq!(delivered, ["1", "2", "3"]);
//!
//! // Graceful shutdown writes everything and reports what it could not.
//! let report = pool.run_until(registry.shutdown(clock.now() + Millis(1000))).unwrap();
//! assert!(report.is_complete());
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations)]

mod backoff;
mod clock;
mod cursor;
mod either_store;
mod entropy;
pub mod fanout;
mod fingerprint;
#[cfg(any(test, feature = "test-util"))]
mod flaky;
pub mod reconnect;
mod registry;
pub mod replay;
pub mod saved_window;
mod slot;
pub mod sse;
mod store;
pub mod stream;
pub mod tracker;
mod window;
pub mod worker;

pub use backoff::{Backoff, Rng, random_seed};
pub use clock::{Clock, Millis};
#[cfg(any(test, feature = "test-util"))]
pub use clock::{ManualClock, ManualSleep};
pub use cursor::{Cursor, StreamKey};
pub use either_store::EitherStore;
pub use entropy::EntropyError;
pub use fingerprint::FingerprintKey;
#[cfg(any(test, feature = "test-util"))]
pub use flaky::{FlakyConfig, FlakyStore};
pub use reconnect::{Decision, Failure, GiveUp, ReconnectConfig, ReconnectPolicy};
pub use registry::{Config, Registry, RegistryError, Stats, persistence};
pub use saved_window::{SavedWindow, WindowChange};
pub use store::{MemStore, Store, StoreError, merge_newest};
pub use stream::{
    ConnectRequest, Connector, ResumableStream, StreamConfig, StreamError, StreamItem, StreamStats,
};
pub use tracker::{EventTracker, Observation, TrackerConfig, TrackerStats};
pub use window::MAX_WINDOW;
pub use worker::{
    FlushReport, PersistenceWorker, ShutdownReport, WorkerConfig, WorkerHandle, WorkerStats,
    WorkerStopped,
};
