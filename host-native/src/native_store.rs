//! The store a native host runs on, chosen at startup.

use crate::{FileStore, RedisStore};
use std::sync::Arc;
use tidemark_core::{Cursor, Store, StoreError, StreamKey};

/// Either of the native stores, so that one registry and worker type serves
/// both (an enum, not a trait object: the core's `Store` is not object safe,
/// and this keeps the futures `Send`).
pub enum NativeStore {
    /// Cursors in a local state directory.
    File(FileStore),
    /// Cursors in Redis, shared by many instances (and by the instance's
    /// [`Lease`](crate::Lease)s).
    Redis(Arc<RedisStore>),
}

impl Store for NativeStore {
    async fn load(&self, key: &StreamKey) -> Result<Option<Cursor>, StoreError> {
        match self {
            NativeStore::File(store) => store.load(key).await,
            NativeStore::Redis(store) => store.load(key).await,
        }
    }

    async fn save_batch(&self, cursors: &[Cursor]) -> Result<(), StoreError> {
        match self {
            NativeStore::File(store) => store.save_batch(cursors).await,
            NativeStore::Redis(store) => store.save_batch(cursors).await,
        }
    }

    async fn delete(&self, key: &StreamKey) -> Result<(), StoreError> {
        match self {
            NativeStore::File(store) => store.delete(key).await,
            NativeStore::Redis(store) => store.delete(key).await,
        }
    }
}
