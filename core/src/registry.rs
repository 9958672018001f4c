//! The registry of open streams: creates trackers wired to the worker.

use crate::clock::{Clock, Millis};
use crate::cursor::{Cursor, StreamKey};
use crate::fingerprint::FingerprintKey;
use crate::saved_window::{Span, WindowChange};
use crate::slot::{Publisher, Slot};
use crate::store::{Store, StoreError};
use crate::tracker::{EventTracker, TrackerConfig};
use crate::worker::{DeleteError, PersistenceWorker, WorkerConfig, WorkerHandle, WorkerStats};
use core::fmt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};

/// Why a registry operation failed.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegistryError {
    /// `open` of a stream that already has a live tracker: two trackers would
    /// race on one cursor.
    AlreadyOpen(StreamKey),
    /// `remove` of a stream whose tracker is still alive.
    StillOpen(StreamKey),
    /// The store failed.
    Store(StoreError),
    /// The persistence worker has stopped.
    WorkerStopped,
}

impl fmt::Display for RegistryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegistryError::AlreadyOpen(key) => write!(f, "stream {key} is already open"),
            RegistryError::StillOpen(key) => write!(f, "stream {key} is still open"),
            RegistryError::Store(e) => write!(f, "{e}"),
            RegistryError::WorkerStopped => f.write_str("the persistence worker has stopped"),
        }
    }
}

impl std::error::Error for RegistryError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RegistryError::Store(e) => Some(e),
            _ => None,
        }
    }
}

/// Counters over all streams of a registry and its worker.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Streams with a live tracker.
    pub open_streams: usize,
    /// Events passed to `observe`, over all streams ever opened.
    pub events_observed: u64,
    /// Duplicates dropped, over all streams ever opened.
    pub duplicates_dropped: u64,
    /// Commits that reached a stopped worker and were not persisted.
    pub rejected_commits: u64,
    /// The persistence worker's counters: writes, batches, retries pending,
    /// consecutive failures, the last store error.
    pub worker: WorkerStats,
}

#[derive(Default)]
pub(crate) struct Shared {
    slots: Mutex<Slots>,
    retired_observed: AtomicU64,
    retired_duplicates: AtomicU64,
    rejected: AtomicU64,
}

/// Weak references to the slots of open streams and of closed streams whose
/// last cursor the worker still holds (see `slot.rs`). Dead entries are
/// pruned whenever the map has doubled since the last pruning, so the map
/// stays proportional to the live streams at O(1) amortized cost.
#[derive(Default)]
struct Slots {
    map: HashMap<StreamKey, Weak<Slot>>,
    prune_at: usize,
}

impl Slots {
    fn live(&self, key: &StreamKey) -> Option<Arc<Slot>> {
        self.map.get(key).and_then(Weak::upgrade)
    }

    fn insert(&mut self, key: StreamKey, slot: &Arc<Slot>) {
        if self.map.len() >= self.prune_at {
            self.map.retain(|_, w| w.strong_count() > 0);
            self.prune_at = (self.map.len() * 2).max(64);
        }
        self.map.insert(key, Arc::downgrade(slot));
    }
}

impl Shared {
    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called when a tracker goes away: the stream is closed; its counts move
    /// to the registry's totals.
    pub(crate) fn close(&self, slot: &Slot) {
        slot.open.store(false, Relaxed);
        self.retired_observed
            .fetch_add(slot.observed.swap(0, Relaxed), Relaxed);
        self.retired_duplicates
            .fetch_add(slot.duplicates.swap(0, Relaxed), Relaxed);
    }

    pub(crate) fn note_rejected(&self) {
        self.rejected.fetch_add(1, Relaxed);
    }
}

/// Opens trackers whose cursors persist through one [`PersistenceWorker`].
///
/// `open` seeds the tracker from the store; dropping the tracker closes the
/// stream (its last commit is still written); `remove` deletes a closed
/// stream's cursor.
pub struct Registry<S> {
    store: S,
    handle: WorkerHandle,
    config: TrackerConfig,
    shared: Arc<Shared>,
    /// The store's window key, once asked: `Some(None)` if it keeps no
    /// windows.
    window_key: Mutex<Option<Option<FingerprintKey>>>,
}

impl<S: fmt::Debug> fmt::Debug for Registry<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let open_streams = {
            let slots = self.shared.slots();
            let live = slots.map.values().filter_map(Weak::upgrade);
            live.filter(|slot| slot.open.load(Relaxed)).count()
        };
        f.debug_struct("Registry")
            .field("store", &self.store)
            .field("open_streams", &open_streams)
            .field("tracker", &self.config)
            .field("worker", &self.handle)
            .finish()
    }
}

/// Settings of a registry and its worker.
#[derive(Clone, Debug, Default)]
pub struct Config {
    /// Settings of every tracker.
    pub tracker: TrackerConfig,
    /// Settings of the worker.
    pub worker: WorkerConfig,
}

/// A registry and the worker that persists its streams, sharing `store`.
/// Spawn the worker's [`run`](PersistenceWorker::run) on the host executor.
pub fn persistence<S: Store + Clone, C: Clock>(
    store: S,
    clock: C,
    config: Config,
) -> (Registry<S>, PersistenceWorker<S, C>) {
    let (worker, handle) = PersistenceWorker::with_clock(store.clone(), clock, config.worker);
    (Registry::new(store, handle, config.tracker), worker)
}

impl<S: Store> Registry<S> {
    /// A registry loading from `store` and persisting through `handle`.
    pub fn new(store: S, handle: WorkerHandle, config: TrackerConfig) -> Self {
        Registry {
            store,
            handle,
            config,
            shared: Arc::default(),
            window_key: Mutex::new(None),
        }
    }

    /// The store's window key, asked of the store once.
    async fn window_key(&self) -> Result<Option<FingerprintKey>, StoreError> {
        let known = *self.window_key.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(key) = known {
            return Ok(key);
        }
        let key = self.store.window_key().await?;
        *self.window_key.lock().unwrap_or_else(|e| e.into_inner()) = Some(key);
        Ok(key)
    }

    /// Opens `key`: a tracker seeded from its newest cursor (the stored one,
    /// or one this process committed and has not written yet) whose commits
    /// are persisted. If the store keeps windows, the tracker also starts
    /// with the stream's window (the stored one plus what this process has
    /// not written yet), fingerprinting under the store's key instead of
    /// [`TrackerConfig::fingerprint_key`]; otherwise only the cursor's id
    /// is in the new window. Needs only the store, not a running worker.
    /// Fails if the stream is already open, or if the stored cursor or
    /// window cannot be loaded (resuming without them would replay or skip;
    /// the caller decides whether to retry or start fresh with
    /// [`EventTracker::new`]).
    pub async fn open(&self, key: StreamKey) -> Result<EventTracker, RegistryError> {
        if self.handle.is_stopped() {
            return Err(RegistryError::WorkerStopped);
        }
        let window_key = self.window_key().await.map_err(RegistryError::Store)?;
        let slot = {
            let mut slots = self.shared.slots();
            match slots.live(&key) {
                Some(slot) if slot.open.load(Relaxed) => {
                    return Err(RegistryError::AlreadyOpen(key));
                }
                Some(closing) => closing,
                None => {
                    let slot = Arc::new(Slot::new(key.clone()));
                    slots.insert(key.clone(), &slot);
                    slot
                }
            }
        };
        slot.open.store(true, Relaxed);
        // A closed stream's last commit may not be written yet: its slot
        // still has it, and it is newer than what the store holds.
        let unwritten = slot.peek();
        let unwritten_window = slot.unwritten_window();
        let publisher = Publisher {
            tx: self.handle.tx.clone(),
            registry: self.shared.clone(),
        };
        let mut config = self.config.clone();
        if let Some(window_key) = window_key {
            config.fingerprint_key = window_key;
        }
        let mut tracker = EventTracker::with_slot(config, slot, Some(publisher));
        let stored = self.store.load(&key).await.map_err(RegistryError::Store)?;
        let newest = stored
            .into_iter()
            .chain((unwritten.seq > 0).then_some(unwritten))
            .max_by_key(|c| c.seq);
        if window_key.is_some() {
            let stored = self.store.load_window(&key).await;
            let mut window = stored.map_err(RegistryError::Store)?.unwrap_or_default();
            if let Some(unwritten) = &unwritten_window {
                window.span.apply(unwritten);
            }
            if newest.as_ref().is_some_and(|c| c.seq > window.span.seq) {
                // A writer that kept no window moved the cursor since: the
                // window may hold ids from before a reset. Start empty, in
                // an epoch after it, so the next write replaces it.
                let (cap, epoch) = (window.span.cap, window.span.epoch + 1);
                window.span = Span::new(true, cap, epoch, 0);
            }
            tracker.restore_window(&window.span);
        }
        if let Some(cursor) = newest {
            tracker.seed(&cursor);
        }
        Ok(tracker)
    }

    /// Deletes the stored cursor of a closed stream, after any pending write
    /// of it.
    pub async fn remove(&self, key: &StreamKey) -> Result<(), RegistryError> {
        if self.is_open(key) {
            return Err(RegistryError::StillOpen(key.clone()));
        }
        self.handle.delete(key.clone()).await.map_err(|e| match e {
            DeleteError::Stopped => RegistryError::WorkerStopped,
            DeleteError::Store(e) => RegistryError::Store(e),
        })
    }

    /// Whether `key` has a live tracker.
    pub fn is_open(&self, key: &StreamKey) -> bool {
        self.shared
            .slots()
            .live(key)
            .is_some_and(|slot| slot.open.load(Relaxed))
    }

    /// The handle of the worker behind this registry.
    pub fn worker(&self) -> &WorkerHandle {
        &self.handle
    }

    /// The store behind this registry.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The newest cursor of every stream this registry tracks (open, or
    /// closed with its last write still to come), whether or not it is
    /// written yet. For a host that must write now, beside the worker: a
    /// browser page being unloaded cannot wait until the worker finishes a
    /// write in progress. Writing them again is harmless: stores keep the
    /// highest `seq`.
    pub fn newest_cursors(&self) -> Vec<Cursor> {
        let slots = self.shared.slots();
        slots
            .map
            .values()
            .filter_map(Weak::upgrade)
            .filter_map(|slot| slot.committed())
            .collect()
    }

    /// The unwritten window change of every stream this registry tracks,
    /// for a host that writes [`Registry::newest_cursors`] itself: pass both
    /// to [`Store::save_with_windows`]. Writing them again beside the
    /// worker is harmless: stores skip entries they already have.
    pub fn newest_windows(&self) -> Vec<WindowChange> {
        let slots = self.shared.slots();
        slots
            .map
            .values()
            .filter_map(Weak::upgrade)
            .filter_map(|slot| slot.window_change())
            .collect()
    }

    /// Counters over every stream and the worker.
    pub fn stats(&self) -> Stats {
        let (open_streams, live_observed, live_duplicates) = {
            let slots = self.shared.slots();
            slots
                .map
                .values()
                .filter_map(Weak::upgrade)
                .fold((0, 0, 0), |(n, o, d), slot| {
                    (
                        n + usize::from(slot.open.load(Relaxed)),
                        o + slot.observed.load(Relaxed),
                        d + slot.duplicates.load(Relaxed),
                    )
                })
        };
        Stats {
            open_streams,
            events_observed: live_observed + self.shared.retired_observed.load(Relaxed),
            duplicates_dropped: live_duplicates + self.shared.retired_duplicates.load(Relaxed),
            rejected_commits: self.shared.rejected.load(Relaxed),
            worker: self.handle.stats(),
        }
    }

    /// Shuts the worker down (see [`WorkerHandle::shutdown`]).
    pub async fn shutdown(&self, deadline: Millis) -> Result<crate::ShutdownReport, RegistryError> {
        self.handle
            .shutdown(deadline)
            .await
            .map_err(|_| RegistryError::WorkerStopped)
    }
}
