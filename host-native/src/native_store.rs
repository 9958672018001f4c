//! The store a native host runs on, chosen at startup.

use crate::{FileStore, RedisStore};
use std::sync::Arc;
use tidemark_core::EitherStore;

/// Either of the native stores, so that one registry and worker type serves
/// both: [`EitherStore::Left`] holds a [`FileStore`] (cursors in a local
/// state directory), [`EitherStore::Right`] a [`RedisStore`] shared by many
/// instances (and by the instance's [`Lease`](crate::Lease)s). Its futures
/// are `Send`, as both stores' are.
pub type NativeStore = EitherStore<FileStore, Arc<RedisStore>>;
