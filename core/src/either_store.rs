//! One store type for a store chosen at run time.

use crate::cursor::{Cursor, StreamKey};
use crate::fingerprint::FingerprintKey;
use crate::saved_window::{SavedWindow, WindowChange};
use crate::store::{Store, StoreError};

/// Either of two stores: every call goes to the one it holds.
///
/// For a host that picks its store at startup (a file or Redis, IndexedDB or
/// memory) and wants one [`Registry`](crate::Registry) and worker type for
/// both. An enum rather than a trait object: [`Store`]'s async methods make
/// it dyn-incompatible, and an enum's futures are `Send` exactly when both
/// stores' futures are, so a native host can still spawn the worker on a
/// multi-threaded executor. Nest it for more than two stores.
#[derive(Clone, Debug)]
pub enum EitherStore<A, B> {
    /// The first store.
    Left(A),
    /// The second store.
    Right(B),
}

impl<A: Store, B: Store> Store for EitherStore<A, B> {
    async fn load(&self, key: &StreamKey) -> Result<Option<Cursor>, StoreError> {
        match self {
            EitherStore::Left(store) => store.load(key).await,
            EitherStore::Right(store) => store.load(key).await,
        }
    }

    async fn save_batch(&self, cursors: &[Cursor]) -> Result<(), StoreError> {
        match self {
            EitherStore::Left(store) => store.save_batch(cursors).await,
            EitherStore::Right(store) => store.save_batch(cursors).await,
        }
    }

    async fn delete(&self, key: &StreamKey) -> Result<(), StoreError> {
        match self {
            EitherStore::Left(store) => store.delete(key).await,
            EitherStore::Right(store) => store.delete(key).await,
        }
    }
    async fn window_key(&self) -> Result<Option<FingerprintKey>, StoreError> {
        match self {
            EitherStore::Left(store) => store.window_key().await,
            EitherStore::Right(store) => store.window_key().await,
        }
    }

    async fn load_window(&self, key: &StreamKey) -> Result<Option<SavedWindow>, StoreError> {
        match self {
            EitherStore::Left(store) => store.load_window(key).await,
            EitherStore::Right(store) => store.load_window(key).await,
        }
    }

    async fn save_with_windows(
        &self,
        cursors: &[Cursor],
        windows: &[WindowChange],
    ) -> Result<(), StoreError> {
        match self {
            EitherStore::Left(store) => store.save_with_windows(cursors, windows).await,
            EitherStore::Right(store) => store.save_with_windows(cursors, windows).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{ManualClock, Millis};
    use crate::flaky::{FlakyConfig, FlakyStore};
    use crate::store::MemStore;
    use crate::{Clock, Config, persistence};
    use futures::executor::{LocalPool, block_on};
    use futures::task::LocalSpawnExt;
    use std::rc::Rc;

    type Either = EitherStore<MemStore, FlakyStore<MemStore, ManualClock>>;

    fn cursor(stream: &str, id: &str, seq: u64) -> Cursor {
        Cursor {
            key: StreamKey::new("s", stream),
            last_event_id: id.into(),
            seq,
            at: Millis(seq),
        }
    }

    fn flaky() -> FlakyStore<MemStore, ManualClock> {
        FlakyStore::new(MemStore::new(), ManualClock::new(), FlakyConfig::default())
    }

    #[test]
    fn left_goes_to_the_first_store() {
        let store: Either = EitherStore::Left(MemStore::new());
        block_on(store.save_batch(&[cursor("a", "2", 2)])).unwrap();
        block_on(store.save_batch(&[cursor("a", "1", 1)])).unwrap();
        let EitherStore::Left(mem) = &store else {
            unreachable!()
        };
        assert_eq!(mem.batches(), 2);
        let key = cursor("a", "", 0).key;
        assert_eq!(
            block_on(store.load(&key)).unwrap(),
            Some(cursor("a", "2", 2))
        );
        block_on(store.delete(&key)).unwrap();
        assert_eq!(mem.get(&key), None);
    }

    #[test]
    fn right_goes_to_the_second_store_errors_included() {
        let store: Either = EitherStore::Right(flaky());
        let EitherStore::Right(flaky) = &store else {
            unreachable!()
        };
        let key = cursor("a", "", 0).key;
        block_on(store.save_batch(&[cursor("a", "5", 5)])).unwrap();
        assert_eq!(flaky.inner().get(&key), Some(cursor("a", "5", 5)));

        flaky.set_down(true);
        let failed = block_on(store.save_batch(&[cursor("a", "6", 6)]));
        assert!(
            matches!(failed, Err(StoreError::Unavailable(_))),
            "{failed:?}"
        );
        assert!(block_on(store.load(&key)).is_err());
        assert!(block_on(store.delete(&key)).is_err());
        assert_eq!(flaky.inner().get(&key), Some(cursor("a", "5", 5)));
        assert_eq!((flaky.calls(), flaky.failures()), (4, 3));
    }

    #[test]
    fn a_registry_and_worker_run_on_either() {
        let clock = ManualClock::new();
        let store: Rc<Either> = Rc::new(EitherStore::Right(flaky()));
        let (registry, worker) = persistence(store.clone(), clock.clone(), Config::default());
        let mut pool = LocalPool::new();
        pool.spawner()
            .spawn_local(async move {
                worker.run().await;
            })
            .unwrap();
        let key = StreamKey::new("s", "a");
        let mut tracker = pool.run_until(registry.open(key.clone())).unwrap();
        assert!(tracker.observe(Some("1"), clock.now()).is_fresh());
        tracker.commit();
        pool.run_until_stalled();
        let EitherStore::Right(flaky) = &*store else {
            unreachable!()
        };
        assert_eq!(flaky.inner().get(&key).unwrap().last_event_id, "1");
    }
}
