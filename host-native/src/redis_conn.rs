//! The one shared, lazily opened Redis connection that [`RedisStore`],
//! [`Lease`] and the proxy's `RedisLog` run their requests on, and how
//! Redis errors map onto [`StoreError`].
//!
//! A request that fails on the connection (refused, reset, timed out) drops
//! it and reports [`StoreError::Unavailable`]; the next request connects
//! again. So Redis may restart, or be unreachable for a while, and its users
//! carry on once it is back. `LOADING`, `TRYAGAIN`, `READONLY` (a replica
//! being promoted) and `MASTERDOWN` replies are transient too, `OOM` is
//! [`StoreError::QuotaExceeded`], other server errors are permanent.
//!
//! [`RedisStore`]: crate::RedisStore
//! [`Lease`]: crate::Lease

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, ErrorKind, RedisError, RedisResult, ServerErrorKind};
use std::future::Future;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use tidemark_core::StoreError;

/// A multiplexed connection to one server, opened on first use and again
/// after it broke.
pub(crate) struct SharedConnection {
    client: Client,
    connect_timeout: Duration,
    response_timeout: Duration,
    slot: Mutex<Option<MultiplexedConnection>>,
}

impl SharedConnection {
    /// A connection to the server of `url` (`shown`: the URL as messages may
    /// show it, without its password), bounding each connect by
    /// `connect_timeout` and each response by `response_timeout`. Checks
    /// the URL only: a server that is down now is not an error yet.
    pub fn new(
        url: &str,
        shown: &str,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Result<Self, StoreError> {
        let client = Client::open(url).map_err(|e| StoreError::Backend {
            message: format!("redis URL {shown:?}: {e}"),
            transient: false,
        })?;
        Ok(SharedConnection {
            client,
            connect_timeout,
            response_timeout,
            slot: Mutex::new(None),
        })
    }

    /// Another connection to the same server with another response bound
    /// (for requests that block, which must not hold up the others).
    pub fn sibling(&self, response_timeout: Duration) -> Self {
        SharedConnection {
            client: self.client.clone(),
            connect_timeout: self.connect_timeout,
            response_timeout,
            slot: Mutex::new(None),
        }
    }

    fn slot(&self) -> MutexGuard<'_, Option<MultiplexedConnection>> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a connection is open (as far as is known).
    pub fn is_connected(&self) -> bool {
        self.slot().is_some()
    }

    /// Runs `request` on the shared connection. A request that fails because
    /// a connection opened earlier turned out broken (Redis restarted since)
    /// is tried once more on a new connection, so that only a Redis that is
    /// down now fails. Only for requests that are safe to repeat.
    pub async fn run<T, F, R>(&self, request: F) -> Result<T, StoreError>
    where
        F: Fn(MultiplexedConnection) -> R,
        R: Future<Output = RedisResult<T>>,
    {
        let cached = self.slot().clone();
        let reused = cached.is_some();
        let connection = match cached {
            Some(connection) => connection,
            None => self.connect().await?,
        };
        match request(connection).await {
            Ok(value) => Ok(value),
            Err(e) if reused && is_broken(&e) => {
                *self.slot() = None;
                let connection = self.connect().await?;
                request(connection).await.map_err(|e| self.error(e))
            }
            Err(e) => Err(self.error(e)),
        }
    }

    /// Opens a connection and shares it.
    async fn connect(&self) -> Result<MultiplexedConnection, StoreError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.response_timeout));
        let connection = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| self.error(e))?;
        *self.slot() = Some(connection.clone());
        Ok(connection)
    }

    /// Converts a Redis error into a store error, dropping the connection
    /// when the error means it is broken.
    pub fn error(&self, error: RedisError) -> StoreError {
        if is_broken(&error) {
            *self.slot() = None;
        }
        store_error(error)
    }
}

/// The store error of a Redis error; see the [module docs](self).
pub(crate) fn store_error(error: RedisError) -> StoreError {
    if is_broken(&error) {
        return StoreError::Unavailable(format!("redis: {error}"));
    }
    match error.kind() {
        ErrorKind::Server(
            ServerErrorKind::BusyLoading
            | ServerErrorKind::TryAgain
            | ServerErrorKind::ReadOnly
            | ServerErrorKind::MasterDown,
        ) => StoreError::Unavailable(format!("redis: {error}")),
        _ if error.code() == Some("OOM") => StoreError::QuotaExceeded(format!("redis: {error}")),
        _ => StoreError::Backend {
            message: format!("redis: {error}"),
            transient: false,
        },
    }
}

/// Whether `error` means the connection is broken and must be replaced.
fn is_broken(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_unrecoverable_error()
}
