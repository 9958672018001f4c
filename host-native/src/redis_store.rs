//! Cursors in Redis, shared by a fleet of native instances.
//!
//! Choose it over [`FileStore`](crate::FileStore) when cursors must outlive
//! the machine, or when several `tidemark` instances follow the same streams
//! (a standby taking over from a crashed consumer, or streams spread over
//! machines). One machine with one consumer per stream is better served by the
//! file store: no server to run, and a flush is one local fsync.
//!
//! # Layout
//!
//! Each stream's cursor is a hash at `{prefix}cursor:{n}:{session}:{stream}`
//! (`n` is the byte length of the session id, so any session and stream ids
//! map to distinct keys) with the fields `seq`, `id` and `at`. The prefix is
//! configurable (default `tidemark:`), so several deployments can share one
//! Redis. With a TTL, every write of a stream resets its expiry, so only
//! abandoned streams expire.
//!
//! # One round trip per flush, guarded by `seq`
//!
//! `save_batch` runs a Lua script (EVALSHA, loading it after a `NOSCRIPT`
//! reply, which a restarted Redis gives) that writes a cursor only if its
//! `seq` is higher than the stored one. The check and the write are one
//! atomic step on the server, so two instances racing on a stream can never
//! move its cursor backwards, whatever order their writes arrive in. A batch
//! is split into scripts of at most [`CURSORS_PER_SCRIPT`] cursors, all sent
//! in one pipeline: still one round trip, but Redis serves other clients (a
//! lease renewal, say) between the scripts of a large flush instead of
//! blocking for all of it. Only a flush of more than
//! [`CURSORS_PER_ROUND_TRIP`] streams takes more than one round trip, so that
//! each fits in the response timeout however many streams are dirty.
//!
//! # Connection loss
//!
//! The store holds one multiplexed connection and opens it lazily
//! ([`redis_conn`](crate::redis_conn) has the rules). A request that fails
//! on the connection drops it and reports [`StoreError::Unavailable`], which
//! the persistence worker retries; the next request connects again. So Redis
//! may restart, or be unreachable for a while, without restarting the
//! instance: the stream keeps flowing, the newest cursor waits in memory,
//! and the outage shows in the worker's stats.
//!
//! This store needs a single Redis server (or a primary with replicas): the
//! scripts touch keys of many streams at once, which Redis Cluster refuses
//! across slots.

use crate::redis_conn::SharedConnection;
use redis::aio::MultiplexedConnection;
use redis::{ErrorKind, RedisResult, Script, ServerErrorKind};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;
use tidemark_core::{Cursor, Millis, Store, StoreError, StreamKey};
use url::Url;

/// The most cursors one script writes; larger batches are split into several
/// scripts sent in one pipeline.
pub const CURSORS_PER_SCRIPT: usize = 1000;

/// The most cursors one pipeline (one round trip) carries: about 0.75 s of
/// Redis's time on the benchmark machine (BENCHMARKS.md), well inside the
/// default 5 s response timeout, which a flush of every stream of a large
/// fleet in one pipeline would exceed on every retry.
pub const CURSORS_PER_ROUND_TRIP: usize = 100 * CURSORS_PER_SCRIPT;

/// Where and how a [`RedisStore`] keeps cursors. Its `Debug` shows the
/// [redacted URL](Self::redacted_url).
#[derive(Clone)]
pub struct RedisConfig {
    /// The server, as `redis://[user:password@]host:port/[db]`.
    pub url: String,
    /// Prefix of every key (default `tidemark:`).
    pub prefix: String,
    /// Expire a stream's cursor this long after its last write (default:
    /// never).
    pub ttl: Option<Duration>,
    /// Bound on connecting and on each response (default 5 s); past it the
    /// request fails as [`StoreError::Unavailable`]. A request whose
    /// connection turns out broken is tried once more on a new connection,
    /// so one call can take up to three of these (response, connect,
    /// response). A flush must fit in it: a batch so large that Redis takes
    /// longer to run it fails every time.
    pub timeout: Duration,
}

impl RedisConfig {
    /// The defaults for the server at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig {
            url: url.into(),
            prefix: "tidemark:".into(),
            ttl: None,
            timeout: Duration::from_secs(5),
        }
    }

    /// The URL without its password, for logs and messages: the password
    /// of `redis://user:password@host/` and the `pass` parameter of
    /// `redis+unix:///path?pass=...` read `***`, as does the password
    /// parameter of any other query. A URL that does not parse shows only
    /// its scheme.
    pub fn redacted_url(&self) -> String {
        let hidden = || match self.url.split_once("://") {
            Some((scheme, _)) => format!("{scheme}://*** (not a valid URL)"),
            None => "*** (not a valid URL)".to_owned(),
        };
        let Ok(mut url) = Url::parse(&self.url) else {
            return hidden();
        };
        if url.password().is_some() && url.set_password(Some("***")).is_err() {
            return hidden();
        }
        if url.query().is_some() {
            let pairs: Vec<(String, String)> = url
                .query_pairs()
                .map(|(name, value)| {
                    let secret = matches!(&*name, "pass" | "password");
                    let value = if secret {
                        "***".into()
                    } else {
                        value.into_owned()
                    };
                    (name.into_owned(), value)
                })
                .collect();
            url.query_pairs_mut().clear().extend_pairs(pairs);
        }
        url.into()
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &self.redacted_url())
            .field("prefix", &self.prefix)
            .field("ttl", &self.ttl)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Cursors of many streams and instances in one Redis; see the
/// [module docs](self).
pub struct RedisStore {
    config: RedisConfig,
    connection: SharedConnection,
    save: Script,
    stale_cursors: AtomicU64,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("config", &self.config)
            .field("connected", &self.connection.is_connected())
            .field("stale_cursors", &self.stale_cursors())
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// The Lua script of [`save_batch`](Store::save_batch): it writes each
    /// cursor whose `seq` is higher than the stored one. KEYS are the cursor
    /// keys ([`cursor_key`](Self::cursor_key)); ARGV[1] is the TTL in
    /// milliseconds (0: none), then `seq`, `id`, `at` per key, at most
    /// [`CURSORS_PER_SCRIPT`] keys per call. `seq` values are decimal strings
    /// without leading zeros, compared by length, then bytes: exact for every
    /// u64, where Lua's numbers are not. Returns how many cursors were stale.
    /// Public for tools and benchmarks that measure or extend the store's
    /// write.
    pub const SAVE_SCRIPT: &str = r"
local ttl = tonumber(ARGV[1])
local stale = 0
for i, key in ipairs(KEYS) do
  local at = 3 * i - 1
  local seq = ARGV[at]
  local stored = redis.call('HGET', key, 'seq')
  if stored and (#stored > #seq or (#stored == #seq and stored >= seq)) then
    stale = stale + 1
  else
    redis.call('HSET', key, 'seq', seq, 'id', ARGV[at + 1], 'at', ARGV[at + 2])
  end
  if ttl > 0 then
    redis.call('PEXPIRE', key, ttl)
  end
end
return stale
";

    /// A store on the server of `config`. Checks the URL; connects on first
    /// use, so a server that is down now is not an error yet.
    pub fn new(config: RedisConfig) -> Result<Self, StoreError> {
        let connection = SharedConnection::new(
            &config.url,
            &config.redacted_url(),
            config.timeout,
            config.timeout,
        )?;
        Ok(RedisStore {
            config,
            connection,
            save: Script::new(Self::SAVE_SCRIPT),
            stale_cursors: AtomicU64::new(0),
        })
    }

    /// The settings of this store.
    pub fn config(&self) -> &RedisConfig {
        &self.config
    }

    /// The key of `stream`'s cursor.
    pub fn cursor_key(&self, stream: &StreamKey) -> String {
        self.key("cursor", stream)
    }

    /// The key `{prefix}{kind}:{n}:{session}:{stream}` of `stream`.
    pub(crate) fn key(&self, kind: &str, stream: &StreamKey) -> String {
        format!(
            "{}{kind}:{}:{}:{}",
            self.config.prefix,
            stream.session().len(),
            stream.session(),
            stream.stream()
        )
    }

    /// Cursors that `save_batch` was given but did not write because the
    /// stored cursor of their stream was as new or newer (another instance
    /// got there first, or a retried write arrived late).
    pub fn stale_cursors(&self) -> u64 {
        self.stale_cursors.load(Relaxed)
    }

    /// Runs `request` on the store's connection; see
    /// [`SharedConnection::run`]. Every request of this store is safe to
    /// repeat.
    pub(crate) async fn run<T, F, R>(&self, request: F) -> Result<T, StoreError>
    where
        F: Fn(MultiplexedConnection) -> R,
        R: Future<Output = RedisResult<T>>,
    {
        self.connection.run(request).await
    }

    async fn save(
        &self,
        mut connection: MultiplexedConnection,
        pipe: &redis::Pipeline,
    ) -> RedisResult<Vec<u64>> {
        match pipe.query_async(&mut connection).await {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                // A restarted or flushed Redis has forgotten the script.
                self.save.load_async(&mut connection).await?;
                pipe.query_async(&mut connection).await
            }
            result => result,
        }
    }

    fn save_pipeline(&self, cursors: &[Cursor]) -> redis::Pipeline {
        let ttl = self.config.ttl.map_or(0, |t| t.as_millis().max(1));
        let mut pipe = redis::pipe();
        for chunk in cursors.chunks(CURSORS_PER_SCRIPT) {
            let mut call = self.save.prepare_invoke();
            call.arg(ttl.to_string());
            for cursor in chunk {
                call.key(self.cursor_key(&cursor.key))
                    .arg(cursor.seq)
                    .arg(cursor.last_event_id.as_str())
                    .arg(cursor.at.as_u64());
            }
            pipe.invoke_script(&call);
        }
        pipe
    }
}

impl Store for RedisStore {
    async fn load(&self, key: &StreamKey) -> Result<Option<Cursor>, StoreError> {
        let name = self.cursor_key(key);
        let hmget = redis::cmd("HMGET")
            .arg(&name)
            .arg(&["seq", "id", "at"][..])
            .take();
        let fields: (Option<String>, Option<String>, Option<String>) = self
            .run(|mut connection| {
                let hmget = &hmget;
                async move { hmget.query_async(&mut connection).await }
            })
            .await?;
        let corrupt = |detail: &str| StoreError::Corrupt {
            what: format!("redis key {name}"),
            detail: detail.into(),
        };
        match fields {
            (None, None, None) => Ok(None),
            (Some(seq), Some(id), Some(at)) => Ok(Some(Cursor {
                key: key.clone(),
                last_event_id: id,
                seq: seq.parse().map_err(|_| corrupt("seq is not a number"))?,
                at: Millis(at.parse().map_err(|_| corrupt("at is not a number"))?),
            })),
            _ => Err(corrupt("a field of seq, id, at is missing")),
        }
    }

    async fn save_batch(&self, cursors: &[Cursor]) -> Result<(), StoreError> {
        if cursors.is_empty() {
            return Ok(());
        }
        // A part written before a later part fails is written again by the
        // retry: the seq guard makes that harmless.
        for part in cursors.chunks(CURSORS_PER_ROUND_TRIP) {
            let pipe = self.save_pipeline(part);
            let stale = self.run(|connection| self.save(connection, &pipe)).await?;
            self.stale_cursors.fetch_add(stale.iter().sum(), Relaxed);
        }
        Ok(())
    }

    async fn delete(&self, key: &StreamKey) -> Result<(), StoreError> {
        let del = redis::cmd("DEL").arg(self.cursor_key(key)).take();
        self.run(|mut connection| {
            let del = &del;
            async move { del.query_async(&mut connection).await }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_distinct_for_any_session_and_stream() {
        let store = RedisStore::new(RedisConfig::new("redis://127.0.0.1:1/")).unwrap();
        let a = store.cursor_key(&StreamKey::new("a:b", "c"));
        let b = store.cursor_key(&StreamKey::new("a", "b:c"));
        assert_eq!(a, "tidemark:cursor:3:a:b:c");
        assert_eq!(b, "tidemark:cursor:1:a:b:c");
        assert_ne!(a, b);
    }

    #[test]
    fn passwords_never_show() {
        let cases = [
            (
                "redis://user:hunter2@db.example:6380/3",
                "redis://user:***@db.example:6380/3",
            ),
            ("redis://:hunter2@127.0.0.1/", "redis://:***@127.0.0.1/"),
            (
                "rediss://127.0.0.1/?protocol=resp3",
                "rediss://127.0.0.1/?protocol=resp3",
            ),
            (
                "redis+unix:///run/redis.sock?db=2&pass=hunter2",
                "redis+unix:///run/redis.sock?db=2&pass=***",
            ),
            ("redis://:hun ter2@[bad/", "redis://*** (not a valid URL)"),
        ];
        for (url, shown) in cases {
            let config = RedisConfig::new(url);
            assert_eq!(config.redacted_url(), shown);
            let debug = format!("{config:?}");
            assert!(!debug.contains("hunter2"), "{debug}");
            assert!(debug.contains(shown), "{debug}");
        }
        let store = RedisStore::new(RedisConfig::new("redis://:hunter2@127.0.0.1:1/")).unwrap();
        let debug = format!("{store:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(
            debug.contains("connected: false, stale_cursors: 0"),
            "{debug}"
        );
    }

    #[test]
    fn a_bad_url_is_a_permanent_error_that_hides_the_password() {
        let Err(error) = RedisStore::new(RedisConfig::new("redis://:hunter2@[bad/")) else {
            panic!("not a URL");
        };
        assert!(!error.is_transient(), "{error}");
        assert!(!error.to_string().contains("hunter2"), "{error}");
    }

    #[test]
    fn a_bad_url_is_a_permanent_error() {
        let Err(error) = RedisStore::new(RedisConfig::new("http://nowhere/")) else {
            panic!("not a redis URL");
        };
        assert!(!error.is_transient(), "{error}");
    }

    #[test]
    fn a_server_that_is_down_is_unavailable() {
        let mut config = RedisConfig::new("redis://127.0.0.1:1/");
        config.timeout = Duration::from_secs(2);
        let store = RedisStore::new(config).unwrap();
        let error = smol::block_on(store.load(&StreamKey::new("s", "a"))).unwrap_err();
        assert!(matches!(error, StoreError::Unavailable(_)), "{error}");
    }
}
