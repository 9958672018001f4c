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
//! abandoned streams expire. With [`RedisConfig::windows`], each stream also
//! has its window at `{prefix}window:{n}:{session}:{stream}` (a string), and
//! the prefix one fingerprint key at `{prefix}window-key`; see below.
//!
//! # Dedup windows (optional)
//!
//! With [`RedisConfig::windows`] (`follow --redis-window`) the store also
//! keeps each stream's dedup window, so that a process opening the stream
//! after a restart or a takeover drops what the server replays instead of
//! only resuming from the cursor. The window is a string at
//! `{prefix}window:{n}:{session}:{stream}` holding
//! [`SavedWindow`] records one after another: each flush `APPEND`s the
//! stream's [`WindowChange`] (usually a few bytes) in the same pipeline as the
//! cursor scripts, so windows cost no extra round trip. When the string has
//! grown past [`COMPACT_GROWTH`] times its folded size (and past
//! [`COMPACT_MIN_BYTES`]), the store writes the folded window instead, with a
//! script that does so only if the string is still the one this store folded
//! (its length is the one the last reply gave), and otherwise appends and
//! reads the string back to fold it again: another instance's records are
//! never overwritten. For that the store keeps, per stream it loaded or
//! wrote, the fold in memory. The TTL applies to windows as to cursors;
//! `delete` removes both.
//!
//! The fingerprint key of every window is one random 16-byte value at
//! `{prefix}window-key`, shared by every instance with the same prefix: the
//! first to need it creates it (`SET NX`) and every one reads it back. It
//! never expires, and the store never shows it.
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
use redis::{ErrorKind, FromRedisValue, RedisResult, Script, ServerErrorKind, Value};
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use tidemark_core::{
    Cursor, FingerprintKey, Millis, SavedWindow, Store, StoreError, StreamKey, WindowChange,
};
use url::Url;

/// The most cursors one script writes; larger batches are split into several
/// scripts sent in one pipeline.
pub const CURSORS_PER_SCRIPT: usize = 1000;

/// The most cursors one pipeline (one round trip) carries: about 0.75 s of
/// Redis's time on the benchmark machine (BENCHMARKS.md), well inside the
/// default 5 s response timeout, which a flush of every stream of a large
/// fleet in one pipeline would exceed on every retry.
pub const CURSORS_PER_ROUND_TRIP: usize = 100 * CURSORS_PER_SCRIPT;

/// A stream's window string is compacted (its fold written in place of its
/// records) when it has grown past this many times its folded size, and
/// past [`COMPACT_MIN_BYTES`].
pub(crate) const COMPACT_GROWTH: usize = 2;

/// The length below which a window string is never compacted: small
/// windows are left to grow a little.
pub(crate) const COMPACT_MIN_BYTES: usize = 512;

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
    /// Keep each stream's dedup window beside its cursor, under a
    /// fingerprint key kept in Redis (default: no, cursors only). See the
    /// [module docs](crate::redis_store#dedup-windows-optional).
    pub windows: bool,
}

impl RedisConfig {
    /// The defaults for the server at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig {
            url: url.into(),
            prefix: "tidemark:".into(),
            ttl: None,
            timeout: Duration::from_secs(5),
            windows: false,
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
            .field("windows", &self.windows)
            .finish()
    }
}

/// Cursors of many streams and instances in one Redis; see the
/// [module docs](self).
pub struct RedisStore {
    config: RedisConfig,
    connection: SharedConnection,
    save: Script,
    compact: Script,
    stale_cursors: AtomicU64,
    /// The fleet's fingerprint key, once read from Redis.
    window_key: Mutex<Option<FingerprintKey>>,
    /// What this store knows of each window string it loaded or wrote.
    folds: Mutex<HashMap<StreamKey, Fold>>,
}

/// What a store knows of one stream's window string in Redis.
struct Fold {
    /// The fold of the records this store loaded and wrote.
    window: SavedWindow,
    /// The string's length, as the last reply gave it.
    len: usize,
    /// Its length when it was last loaded or compacted.
    base: usize,
    /// Whether `window` is the fold of the whole string: no one else wrote
    /// it since this store last read or compacted it.
    exact: bool,
}

impl Fold {
    /// A window this store knows nothing of.
    fn unknown() -> Self {
        Fold {
            window: SavedWindow::new(),
            len: 0,
            base: 0,
            exact: false,
        }
    }

    /// Whether writing `more` bytes should compact the string instead.
    fn due(&self, more: usize) -> bool {
        self.len + more > COMPACT_GROWTH * self.base.max(COMPACT_MIN_BYTES / COMPACT_GROWTH)
    }
}

/// The fold of `key`, a new one ([`Fold::unknown`]) if there is none.
fn fold_of<'a>(folds: &'a mut HashMap<StreamKey, Fold>, key: &StreamKey) -> &'a mut Fold {
    if !folds.contains_key(key) {
        folds.insert(key.clone(), Fold::unknown());
    }
    folds.get_mut(key).expect("inserted")
}

/// One window write of a flush, and what to learn from its reply.
enum WindowWrite {
    /// `APPEND` of a record of `len` bytes.
    Append { len: usize },
    /// The compaction script, writing `folded` if the string is as expected.
    Compact { folded: SavedWindow },
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

    /// The Lua script that compacts a window string: KEYS[1] is the window
    /// key; ARGV[1] the length the string must have (-1: unknown), ARGV[2]
    /// the folded window, ARGV[3] the record to append instead, ARGV[4] the
    /// TTL in milliseconds (0: none). Returns the new length if it wrote the
    /// fold, else (after appending the record) the whole string.
    pub const COMPACT_SCRIPT: &str = r"
local key = KEYS[1]
local ttl = tonumber(ARGV[4])
if redis.call('STRLEN', key) == tonumber(ARGV[1]) then
  if ttl > 0 then
    redis.call('SET', key, ARGV[2], 'PX', ttl)
  else
    redis.call('SET', key, ARGV[2])
  end
  return #ARGV[2]
end
redis.call('APPEND', key, ARGV[3])
if ttl > 0 then
  redis.call('PEXPIRE', key, ttl)
end
return redis.call('GET', key)
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
            compact: Script::new(Self::COMPACT_SCRIPT),
            stale_cursors: AtomicU64::new(0),
            window_key: Mutex::new(None),
            folds: Mutex::default(),
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

    /// The key of `stream`'s window (kept only with
    /// [`RedisConfig::windows`]).
    pub fn window_key_of(&self, stream: &StreamKey) -> String {
        self.key("window", stream)
    }

    /// The key of the fingerprint key that every window of this prefix is
    /// kept under.
    pub fn fingerprint_key_name(&self) -> String {
        format!("{}window-key", self.config.prefix)
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

    async fn save<T: FromRedisValue>(
        &self,
        mut connection: MultiplexedConnection,
        pipe: &redis::Pipeline,
    ) -> RedisResult<T> {
        match pipe.query_async(&mut connection).await {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                // A restarted or flushed Redis has forgotten the scripts. (The
                // rest of the pipeline ran: the cursor guard and the folding
                // of window records make running it again harmless.)
                self.save.load_async(&mut connection).await?;
                if self.config.windows {
                    self.compact.load_async(&mut connection).await?;
                }
                pipe.query_async(&mut connection).await
            }
            result => result,
        }
    }

    fn ttl_ms(&self) -> u128 {
        self.config.ttl.map_or(0, |t| t.as_millis().max(1))
    }

    fn folds(&self) -> MutexGuard<'_, HashMap<StreamKey, Fold>> {
        self.folds.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds the writes of `windows` to `pipe`: an `APPEND` of each change,
    /// or a compaction where the string has grown enough.
    fn window_writes(
        &self,
        pipe: &mut redis::Pipeline,
        windows: &[WindowChange],
    ) -> Vec<WindowWrite> {
        let ttl = self.ttl_ms();
        let mut folds = self.folds();
        let mut record = Vec::new();
        windows
            .iter()
            .map(|change| {
                record.clear();
                change.encode(&mut record);
                let name = self.window_key_of(change.key());
                let fold = fold_of(&mut folds, change.key());
                if fold.due(record.len()) {
                    let mut folded = fold.window.clone();
                    folded.apply(change);
                    let expected = if fold.exact { fold.len as i64 } else { -1 };
                    let mut call = self.compact.prepare_invoke();
                    call.key(name)
                        .arg(expected)
                        .arg(folded.to_bytes())
                        .arg(&record[..])
                        .arg(ttl.to_string());
                    pipe.invoke_script(&call);
                    WindowWrite::Compact { folded }
                } else {
                    pipe.cmd("APPEND").arg(&name).arg(&record[..]);
                    if ttl > 0 {
                        pipe.cmd("PEXPIRE").arg(&name).arg(ttl.to_string()).ignore();
                    }
                    WindowWrite::Append { len: record.len() }
                }
            })
            .collect()
    }

    /// Learns from the replies to `writes` what the window strings hold now.
    fn window_written(
        &self,
        windows: &[WindowChange],
        writes: Vec<WindowWrite>,
        replies: &[Value],
    ) -> Result<(), StoreError> {
        let mut folds = self.folds();
        for ((change, write), reply) in windows.iter().zip(writes).zip(replies) {
            let fold = fold_of(&mut folds, change.key());
            match (write, reply) {
                (WindowWrite::Append { len }, Value::Int(now)) => {
                    let now = *now as usize;
                    // Anything else written meanwhile is not in the fold.
                    fold.exact &= now == fold.len + len;
                    fold.len = now;
                    fold.window.apply(change);
                }
                (WindowWrite::Compact { folded }, Value::Int(now)) => {
                    fold.window = folded;
                    fold.len = *now as usize;
                    fold.base = fold.len;
                    fold.exact = true;
                }
                (WindowWrite::Compact { .. }, Value::BulkString(bytes)) => {
                    let name = self.window_key_of(change.key());
                    fold.window =
                        SavedWindow::decode(bytes).map_err(|detail| StoreError::Corrupt {
                            what: format!("redis key {name}"),
                            detail,
                        })?;
                    fold.len = bytes.len();
                    fold.exact = true;
                }
                (_, reply) => {
                    fold.exact = false;
                    return Err(StoreError::Backend {
                        message: format!("redis: unexpected reply to a window write: {reply:?}"),
                        transient: true,
                    });
                }
            }
        }
        Ok(())
    }

    /// After a failed write: the strings of `windows` may or may not have
    /// their records now.
    fn window_unknown(&self, windows: &[WindowChange]) {
        let mut folds = self.folds();
        for change in windows {
            if let Some(fold) = folds.get_mut(change.key()) {
                fold.exact = false;
            }
        }
    }

    fn save_pipeline(&self, cursors: &[Cursor]) -> redis::Pipeline {
        let ttl = self.ttl_ms();
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
            let stale: Vec<u64> = self.run(|connection| self.save(connection, &pipe)).await?;
            self.stale_cursors.fetch_add(stale.iter().sum(), Relaxed);
        }
        Ok(())
    }

    async fn delete(&self, key: &StreamKey) -> Result<(), StoreError> {
        let del = redis::cmd("DEL")
            .arg(self.cursor_key(key))
            .arg(self.window_key_of(key))
            .take();
        self.run(|mut connection| {
            let del = &del;
            async move { del.query_async::<()>(&mut connection).await }
        })
        .await?;
        self.folds().remove(key);
        Ok(())
    }

    async fn window_key(&self) -> Result<Option<FingerprintKey>, StoreError> {
        if !self.config.windows {
            return Ok(None);
        }
        if let Some(key) = *self.window_key.lock().unwrap_or_else(|e| e.into_inner()) {
            return Ok(Some(key));
        }
        let fresh = FingerprintKey::try_random().map_err(|e| StoreError::Backend {
            message: format!("cannot make a window key: {e}"),
            transient: false,
        })?;
        let name = self.fingerprint_key_name();
        // Whoever comes first sets it; everyone reads the one that is there.
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(&name)
            .arg(&fresh.to_bytes()[..])
            .arg("NX")
            .ignore()
            .cmd("GET")
            .arg(&name);
        let (stored,): (Option<Vec<u8>>,) = self
            .run(|mut connection| {
                let pipe = &pipe;
                async move { pipe.query_async(&mut connection).await }
            })
            .await?;
        let stored = stored.ok_or_else(|| StoreError::Backend {
            message: format!("redis key {name} vanished as it was set"),
            transient: true,
        })?;
        let bytes: [u8; 16] = stored.try_into().map_err(|_| StoreError::Corrupt {
            what: format!("redis key {name}"),
            detail: "not a 16-byte key".into(),
        })?;
        let key = FingerprintKey::from_bytes(bytes);
        *self.window_key.lock().unwrap_or_else(|e| e.into_inner()) = Some(key);
        Ok(Some(key))
    }

    async fn load_window(&self, key: &StreamKey) -> Result<Option<SavedWindow>, StoreError> {
        if !self.config.windows {
            return Ok(None);
        }
        let name = self.window_key_of(key);
        let get = redis::cmd("GET").arg(&name).take();
        let stored: Option<Vec<u8>> = self
            .run(|mut connection| {
                let get = &get;
                async move { get.query_async(&mut connection).await }
            })
            .await?;
        let Some(bytes) = stored else {
            let fold = Fold {
                exact: true,
                ..Fold::unknown()
            };
            self.folds().insert(key.clone(), fold);
            return Ok(None);
        };
        let window = SavedWindow::decode(&bytes).map_err(|detail| StoreError::Corrupt {
            what: format!("redis key {name}"),
            detail,
        })?;
        let fold = Fold {
            window: window.clone(),
            len: bytes.len(),
            base: window.to_bytes().len(),
            exact: true,
        };
        self.folds().insert(key.clone(), fold);
        Ok(Some(window))
    }

    async fn save_with_windows(
        &self,
        cursors: &[Cursor],
        windows: &[WindowChange],
    ) -> Result<(), StoreError> {
        if !self.config.windows || windows.is_empty() {
            return self.save_batch(cursors).await;
        }
        // Windows travel with the cursors, each part in one round trip.
        let per = CURSORS_PER_ROUND_TRIP;
        let parts = cursors.len().max(windows.len()).div_ceil(per);
        let part = |items: usize, i: usize| (i * per).min(items)..((i + 1) * per).min(items);
        for i in 0..parts {
            let cursors = &cursors[part(cursors.len(), i)];
            let windows = &windows[part(windows.len(), i)];
            let mut pipe = self.save_pipeline(cursors);
            let scripts = cursors.len().div_ceil(CURSORS_PER_SCRIPT);
            let writes = self.window_writes(&mut pipe, windows);
            let replies: Vec<Value> =
                match self.run(|connection| self.save(connection, &pipe)).await {
                    Ok(replies) => replies,
                    Err(e) => {
                        self.window_unknown(windows);
                        return Err(e);
                    }
                };
            if replies.len() != scripts + writes.len() {
                self.window_unknown(windows);
                return Err(StoreError::Backend {
                    message: format!(
                        "redis: {} replies to a pipeline of {} requests",
                        replies.len(),
                        scripts + writes.len()
                    ),
                    transient: true,
                });
            }
            let stale: u64 = replies[..scripts]
                .iter()
                .map(|r| match r {
                    Value::Int(n) => *n as u64,
                    _ => 0,
                })
                .sum();
            self.stale_cursors.fetch_add(stale, Relaxed);
            self.window_written(windows, writes, &replies[scripts..])?;
        }
        Ok(())
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
