//! Where cursors are persisted.
//!
//! Hosts implement [`Store`] over their storage (a state directory, Redis,
//! IndexedDB). The persistence worker calls `save_batch` at most once per flush
//! interval with the newest cursor of every dirty stream, so a store sees one
//! write per flush, not one per event.
//!
//! Every store keeps, per key, the cursor with the highest `seq` and ignores
//! older ones ([`Cursor::supersedes`]); together with the worker's ordering
//! this is what guarantees that a persisted cursor never moves backwards, even
//! when writes are retried or several writers race.
//!
//! A store may also keep each stream's dedup window, so that a tracker opened
//! after a restart or a page reload drops what the server replays, not only
//! resumes from the cursor. Such a store has a [`Store::window_key`] of its
//! own, takes window changes with the cursors in
//! [`Store::save_with_windows`] and hands the window back in
//! [`Store::load_window`]; see [`SavedWindow`] for what to keep.

use crate::cursor::{Cursor, StreamKey};
use crate::fingerprint::FingerprintKey;
use crate::saved_window::{SavedWindow, WindowChange};
use core::fmt;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

/// Why a store operation failed.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreError {
    /// The backend cannot be reached right now (connection lost, timeout,
    /// server restarting). Transient.
    Unavailable(String),
    /// The backend is out of space or quota. Transient: space may be freed.
    QuotaExceeded(String),
    /// Stored data cannot be read (torn, foreign or from a newer version).
    /// Permanent until someone fixes it; the store must not overwrite it.
    Corrupt {
        /// What is corrupt (a file name, a key).
        what: String,
        /// What is wrong with it.
        detail: String,
    },
    /// Any other failure of the backend.
    Backend {
        /// What failed.
        message: String,
        /// Whether retrying may help.
        transient: bool,
    },
}

impl StoreError {
    /// Whether retrying soon may succeed. The worker retries every failure,
    /// since it never gives up on the newest cursor, but backs off to its
    /// maximum delay at once for permanent ones.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Unavailable(_) | StoreError::QuotaExceeded(_) => true,
            StoreError::Corrupt { .. } => false,
            StoreError::Backend { transient, .. } => *transient,
        }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Unavailable(m) => write!(f, "store unavailable: {m}"),
            StoreError::QuotaExceeded(m) => write!(f, "store quota exceeded: {m}"),
            StoreError::Corrupt { what, detail } => {
                write!(f, "corrupt store data in {what}: {detail}")
            }
            StoreError::Backend { message, .. } => write!(f, "store error: {message}"),
        }
    }
}

impl std::error::Error for StoreError {}

/// Durable storage for cursors.
///
/// Methods are async without a `Send` bound: browser futures are `!Send`.
/// Native hosts that need `Send` futures get them from stores whose futures
/// are `Send`.
///
/// Contract:
/// - `save_batch` writes all cursors or reports an error; it keeps, per key,
///   whichever of the stored and the given cursor has the higher `seq`. A
///   batch holds at most one cursor per key.
/// - `load` returns the newest saved cursor of a key.
/// - `delete` forgets a key (and its window); deleting a missing key is not
///   an error.
/// - A store that keeps windows returns the same [`Store::window_key`] every
///   time, in every process that opens it: a random key made on first use
///   and kept in the store, never derived from anything guessable. It folds
///   every change of [`Store::save_with_windows`] into the stream's
///   [`SavedWindow`] ([`SavedWindow::apply`], which skips what it already
///   has, so a change written twice is harmless) and returns that from
///   [`Store::load_window`].
///
/// The window methods have defaults for a store that keeps cursors only.
#[allow(async_fn_in_trait)]
pub trait Store {
    /// The stored cursor of `key`, if any.
    async fn load(&self, key: &StreamKey) -> Result<Option<Cursor>, StoreError>;
    /// Saves every cursor in one write, never moving a key backwards.
    async fn save_batch(&self, cursors: &[Cursor]) -> Result<(), StoreError>;
    /// Forgets `key`.
    async fn delete(&self, key: &StreamKey) -> Result<(), StoreError>;

    /// The key that fingerprints the ids of this store's windows, or `None`
    /// (the default) if the store keeps no windows: then a tracker opened
    /// from it starts with only its cursor's id in the window.
    async fn window_key(&self) -> Result<Option<FingerprintKey>, StoreError> {
        Ok(None)
    }

    /// The stored window of `key`, if any. Only asked of a store with a
    /// [`Store::window_key`].
    async fn load_window(&self, key: &StreamKey) -> Result<Option<SavedWindow>, StoreError> {
        let _ = key;
        Ok(None)
    }

    /// Saves every cursor as [`Store::save_batch`] does and, in the same
    /// write, every window change (at most one per stream). The default
    /// saves the cursors only.
    async fn save_with_windows(
        &self,
        cursors: &[Cursor],
        windows: &[WindowChange],
    ) -> Result<(), StoreError> {
        let _ = windows;
        self.save_batch(cursors).await
    }
}

macro_rules! forward_store {
    ($($ty:ty),*) => {$(
        impl<S: Store + ?Sized> Store for $ty {
            async fn load(&self, key: &StreamKey) -> Result<Option<Cursor>, StoreError> {
                (**self).load(key).await
            }
            async fn save_batch(&self, cursors: &[Cursor]) -> Result<(), StoreError> {
                (**self).save_batch(cursors).await
            }
            async fn delete(&self, key: &StreamKey) -> Result<(), StoreError> {
                (**self).delete(key).await
            }
            async fn window_key(&self) -> Result<Option<FingerprintKey>, StoreError> {
                (**self).window_key().await
            }
            async fn load_window(
                &self,
                key: &StreamKey,
            ) -> Result<Option<SavedWindow>, StoreError> {
                (**self).load_window(key).await
            }
            async fn save_with_windows(
                &self,
                cursors: &[Cursor],
                windows: &[WindowChange],
            ) -> Result<(), StoreError> {
                (**self).save_with_windows(cursors, windows).await
            }
        }
    )*};
}

forward_store!(&S, Rc<S>, Arc<S>);

/// An in-memory store, for tests and for hosts that want dedup without
/// durability. It keeps windows too, under a random key of its own (none if
/// the platform has no entropy source), so a stream closed and opened again
/// in the same process keeps its window.
pub struct MemStore {
    inner: Mutex<MemInner>,
    key: Option<FingerprintKey>,
}

impl Default for MemStore {
    fn default() -> Self {
        MemStore {
            inner: Mutex::default(),
            key: FingerprintKey::try_random().ok(),
        }
    }
}

#[derive(Default)]
struct MemInner {
    cursors: HashMap<StreamKey, Cursor>,
    windows: HashMap<StreamKey, SavedWindow>,
    batches: u64,
    cursors_written: u64,
    window_entries_written: u64,
}

impl fmt::Debug for MemStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.inner();
        f.debug_struct("MemStore")
            .field("streams", &inner.cursors.len())
            .field("batches", &inner.batches)
            .field("cursors_written", &inner.cursors_written)
            .field("keeps_windows", &self.key.is_some())
            .finish()
    }
}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, MemInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The stored cursor of `key`, without awaiting.
    pub fn get(&self, key: &StreamKey) -> Option<Cursor> {
        self.inner().cursors.get(key).cloned()
    }

    /// Every stored cursor.
    pub fn cursors(&self) -> Vec<Cursor> {
        self.inner().cursors.values().cloned().collect()
    }

    /// How many `save_batch` calls succeeded.
    pub fn batches(&self) -> u64 {
        self.inner().batches
    }

    /// How many cursors those batches carried.
    pub fn cursors_written(&self) -> u64 {
        self.inner().cursors_written
    }

    /// A store that keeps no windows, like a store written before windows
    /// were kept: trackers opened from it start with only the cursor's id.
    pub fn without_windows() -> Self {
        MemStore {
            key: None,
            ..MemStore::default()
        }
    }

    /// The stored window of `key`, without awaiting.
    pub fn window(&self, key: &StreamKey) -> Option<SavedWindow> {
        self.inner().windows.get(key).cloned()
    }

    /// How many window entries the batches carried.
    pub fn window_entries_written(&self) -> u64 {
        self.inner().window_entries_written
    }
}

/// Applies a batch to an in-memory map of stored cursors the way the
/// [`Store`] contract asks: per key, the cursor with the higher `seq` wins.
/// For stores that keep their state in memory and persist it whole.
pub fn merge_newest(stored: &mut HashMap<StreamKey, Cursor>, batch: &[Cursor]) {
    for cursor in batch {
        match stored.get_mut(&cursor.key) {
            Some(current) if !cursor.supersedes(current) => {}
            Some(current) => *current = cursor.clone(),
            None => {
                stored.insert(cursor.key.clone(), cursor.clone());
            }
        }
    }
}

impl Store for MemStore {
    async fn load(&self, key: &StreamKey) -> Result<Option<Cursor>, StoreError> {
        Ok(self.get(key))
    }

    async fn save_batch(&self, cursors: &[Cursor]) -> Result<(), StoreError> {
        let mut inner = self.inner();
        inner.batches += 1;
        inner.cursors_written += cursors.len() as u64;
        merge_newest(&mut inner.cursors, cursors);
        Ok(())
    }

    async fn delete(&self, key: &StreamKey) -> Result<(), StoreError> {
        let mut inner = self.inner();
        inner.cursors.remove(key);
        inner.windows.remove(key);
        Ok(())
    }

    async fn window_key(&self) -> Result<Option<FingerprintKey>, StoreError> {
        Ok(self.key)
    }

    async fn load_window(&self, key: &StreamKey) -> Result<Option<SavedWindow>, StoreError> {
        Ok(self.window(key))
    }

    async fn save_with_windows(
        &self,
        cursors: &[Cursor],
        windows: &[WindowChange],
    ) -> Result<(), StoreError> {
        let mut inner = self.inner();
        inner.batches += 1;
        inner.cursors_written += cursors.len() as u64;
        merge_newest(&mut inner.cursors, cursors);
        if self.key.is_some() {
            for change in windows {
                inner.window_entries_written += change.len() as u64;
                let saved = inner.windows.entry(change.key().clone()).or_default();
                saved.apply(change);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Millis;
    use futures::executor::block_on;

    fn cursor(id: &str, seq: u64) -> Cursor {
        Cursor {
            key: StreamKey::new("s", "a"),
            last_event_id: id.into(),
            seq,
            at: Millis(seq),
        }
    }

    #[test]
    fn mem_store_never_moves_backwards() {
        let store = MemStore::new();
        block_on(store.save_batch(&[cursor("5", 5)])).unwrap();
        block_on(store.save_batch(&[cursor("3", 3)])).unwrap();
        assert_eq!(store.get(&StreamKey::new("s", "a")), Some(cursor("5", 5)));
        block_on(store.save_batch(&[cursor("6", 6)])).unwrap();
        let shared = Arc::new(store);
        let loaded = block_on(shared.load(&StreamKey::new("s", "a"))).unwrap();
        assert_eq!(loaded, Some(cursor("6", 6)));
        block_on(shared.delete(&StreamKey::new("s", "a"))).unwrap();
        assert_eq!(
            block_on(shared.load(&StreamKey::new("s", "a"))).unwrap(),
            None
        );
        assert_eq!(shared.batches(), 3);
    }

    #[test]
    fn transient_classification() {
        assert!(StoreError::Unavailable("down".into()).is_transient());
        assert!(StoreError::QuotaExceeded("full".into()).is_transient());
        assert!(
            !StoreError::Corrupt {
                what: "f".into(),
                detail: "bad".into()
            }
            .is_transient()
        );
        assert!(
            !StoreError::Backend {
                message: "x".into(),
                transient: false
            }
            .is_transient()
        );
    }
}
