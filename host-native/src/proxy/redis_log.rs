//! [`RedisLog`]: the proxy's replay logs in Redis Streams (`tidemark proxy
//! --log redis://HOST:PORT/[DB]`). Its documentation describes the layout,
//! the writes, outages and reads.

use super::storage::{LogOp, LogStorage, StoredStream, StreamKind, StreamMeta, TokenMap};
use crate::RedisConfig;
use crate::redis_conn::{SharedConnection, store_error};
use redis::{RedisError, Value};
use std::fmt;
use std::io;
use std::sync::LazyLock;
use std::time::Duration;
use tidemark_core::replay::{Identity, LogRecord, Retention, StreamToken};
use tidemark_core::{Millis, StoreError};

/// The fleet's agreement on a GET stream's token: KEYS[1] the stream's
/// `get` key, KEYS[2] the meta key of the proposed token, KEYS[3] the meta
/// key prefix; ARGV the proposed token, target, identity, created and the
/// pending meta's time to live in milliseconds.
const AGREE: &str = r"
local stored = redis.call('GET', KEYS[1])
if stored and redis.call('EXISTS', KEYS[3] .. stored) == 1 then
  return stored
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], 'kind', 'get', 'target', ARGV[2], 'identity', ARGV[3], 'created', ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return ARGV[1]
";

static AGREE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(AGREE));

/// The most commands one pipeline (one round trip) carries.
pub const COMMANDS_PER_ROUND_TRIP: usize = 20_000;

/// How far a stream's first retained event must move before the log sends
/// it `XTRIM` again: trims are not urgent, and most are `MAXLEN`'s anyway.
pub const TRIM_STEP: u64 = 256;

/// The longest a [`tail`](RedisLog::tail) waits.
pub const MAX_TAIL_BLOCK: Duration = Duration::from_secs(30);

/// Entries per `XRANGE` page of [`recover`](LogStorage::recover).
const RECOVER_PAGE: usize = 1000;

/// Streams whose meta one pipeline of [`recover`](LogStorage::recover)
/// reads.
const META_PAGE: usize = 1000;

/// The proxy's replay logs in Redis Streams. Its `Debug` shows the
/// redacted URL.
///
/// Choose it over the file log when the log must outlive the machine, or
/// (with the fleet to come) when several proxies serve the same streams. One
/// proxy on one machine is better served by `--log DIR`: no server to run,
/// and a group commit is one local `fdatasync`.
///
/// # Layout
///
/// Every key starts with the prefix (`--redis-prefix`, default `tidemark:`);
/// `{token}` is the stream's token as 32 hex digits.
///
/// - `{prefix}proxy:log:{token}`: a Redis Stream with one entry per event,
///   its entry id `<seq>-0`, and the fields `time` (milliseconds since the
///   Unix epoch, decimal), `upstream` (the upstream's id; absent when the
///   event had none) and `frame` (the SSE frame clients get, bytes as
///   logged). The explicit ids make Redis itself refuse a sequence number
///   that does not increase.
/// - `{prefix}proxy:meta:{token}`: a hash with `kind` (`get` or `post`),
///   `target` (the upstream path and query), `identity` (32 hex digits),
///   `created` (milliseconds) and `ended` (`1`, once the stream ended).
/// - `{prefix}proxy:streams`: the set of every stored stream's token, what
///   [`recover`](LogStorage::recover) reads.
/// - `{prefix}proxy:get:{hash}`: the token of the GET stream whose path,
///   query and identity hash to `{hash}` (32 hex digits, a keyed hash), for
///   a fleet of proxies to agree on it. Set, with a
///   meta that expires unless the stream is logged, by one script that
///   reuses the stored token only while its meta exists.
/// - `{prefix}proxy:identity-key`: the key of the proxy's identity hashes,
///   64 hex digits, written once with `SET NX` (the first proxy's key wins).
///
/// # One round trip per batch
///
/// [`write`](LogStorage::write) sends all ops of a batch in one pipeline:
///
/// | op | commands |
/// |---|---|
/// | `Open` | `HSET meta kind .. target .. identity .. created ..`, `PERSIST meta`, `SADD streams token` |
/// | `Append` | `XADD log MAXLEN ~ <retain> <seq>-0 time .. [upstream ..] frame ..` |
/// | `Trim` | `XTRIM log MINID <first_seq>-0`, after the batch's appends, once per stream, and only once the first event moved [`TRIM_STEP`] past the last one sent |
/// | `End` | `HSET meta ended 1` |
/// | `Drop` | `SREM streams token`, `DEL meta log` |
///
/// Only a batch of more than [`COMMANDS_PER_ROUND_TRIP`] commands (a
/// backlog after an outage) takes more than one round trip, so that each
/// fits in the response timeout. `MAXLEN ~` keeps a stream's entries near
/// `--retain` at almost no cost; `XTRIM MINID` forgets what retention by
/// bytes or age dropped, lazily: trims need not be durable, and recovery
/// applies retention again.
///
/// Every op may be written twice: the proxy retries a failed batch whole,
/// and part of it may have reached Redis. `HSET`, `SADD`, `XTRIM`, `SREM`
/// and `DEL` are idempotent; an `XADD` that Redis refuses because its id is
/// not above the stream's last one was written before, and counts as
/// written.
///
/// # Outages
///
/// The log holds one multiplexed connection and opens it lazily
/// (`redis_conn` has the rules). While Redis is down or unreachable,
/// `write` fails, and the proxy keeps serving clients from memory, live
/// events included ([`LogStorage::serves_while_failing`]), retrying the
/// batch until Redis takes it; it says so on stderr once when the outage
/// begins and once when it ends, and in the `tidemark_proxy_log_up` and
/// `tidemark_proxy_log_write_failures_total` metrics. A proxy killed during
/// an outage loses what was not written yet. A Redis that loses data
/// (restarted without persistence, `FLUSHDB`) loses the log as it would
/// lose anything: run it with AOF persistence (`appendonly yes`) when the
/// log must survive Redis restarts too.
///
/// # Reading
///
/// Besides what [`LogStorage`] needs (whose methods block: they run on the
/// proxy's writer thread), [`read_after`](RedisLog::read_after) (`XRANGE`
/// with an exclusive start) and [`tail`](RedisLog::tail) (`XREAD BLOCK`, on
/// a connection of its own so that it never holds up a write) read a
/// stream's events back, as an instance serving clients from Redis does;
/// they are `async`, for the proxy's executor.
///
pub struct RedisLog {
    config: RedisConfig,
    /// The redacted URL, for messages.
    shown: String,
    max_len: usize,
    connection: SharedConnection,
    /// For `XREAD BLOCK`, which holds its connection while it waits.
    blocking: SharedConnection,
    /// Per stream, the first event of the last `XTRIM` written.
    trimmed: TokenMap<u64>,
}

impl fmt::Debug for RedisLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLog")
            .field("config", &self.config)
            .field("max_len", &self.max_len)
            .field("connected", &self.connection.is_connected())
            .finish_non_exhaustive()
    }
}

impl RedisLog {
    /// A log on the server of `config` (its `ttl` is not used: the proxy
    /// drops streams itself) for streams kept with `retention`. Checks the
    /// URL; connects on first use.
    pub fn new(config: RedisConfig, retention: Retention) -> io::Result<RedisLog> {
        let shown = config.redacted_url();
        let connection = SharedConnection::new(&config.url, &shown, config.timeout, config.timeout)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(RedisLog {
            shown,
            blocking: connection.sibling(config.timeout + MAX_TAIL_BLOCK),
            connection,
            max_len: retention.max_events.max(1),
            config,
            trimmed: TokenMap::default(),
        })
    }

    /// The settings of this log.
    pub fn config(&self) -> &RedisConfig {
        &self.config
    }

    /// The key of `token`'s events.
    pub fn log_key(&self, token: StreamToken) -> String {
        format!("{}proxy:log:{token}", self.config.prefix)
    }

    /// The key of `token`'s meta.
    pub fn meta_key(&self, token: StreamToken) -> String {
        format!("{}{token}", self.meta_key_prefix())
    }

    /// What every meta key starts with.
    fn meta_key_prefix(&self) -> String {
        format!("{}proxy:meta:", self.config.prefix)
    }

    /// The key of the set of stored tokens.
    pub fn streams_key(&self) -> String {
        format!("{}proxy:streams", self.config.prefix)
    }

    /// The key of the identity key.
    pub fn identity_key_key(&self) -> String {
        format!("{}proxy:identity-key", self.config.prefix)
    }

    /// Up to `count` events of `token` after `after_seq`, oldest first
    /// (`XRANGE` from `(<after_seq>-0`): none for a stream Redis does not
    /// have.
    pub async fn read_after(
        &self,
        token: StreamToken,
        after_seq: u64,
        count: usize,
    ) -> io::Result<Vec<LogRecord>> {
        let key = self.log_key(token);
        let xrange = redis::cmd("XRANGE")
            .arg(&key)
            .arg(format!("({after_seq}-0"))
            .arg("+")
            .arg("COUNT")
            .arg(count)
            .take();
        let reply: Value = self.query(&self.connection, &xrange).await?;
        entries(&key, &reply)
    }

    /// Every event of `token` after `after_seq`, oldest first, read in
    /// pages.
    pub(super) async fn read_all_after(
        &self,
        token: StreamToken,
        after_seq: u64,
    ) -> io::Result<Vec<LogRecord>> {
        let mut records: Vec<LogRecord> = Vec::new();
        loop {
            let after = records.last().map_or(after_seq, |r| r.seq);
            let page = self.read_after(token, after, RECOVER_PAGE).await?;
            let full = page.len() == RECOVER_PAGE;
            records.extend(page);
            if !full {
                return Ok(records);
            }
        }
    }

    /// The events of `token` after `after_seq`, waiting up to `block` (at
    /// most [`MAX_TAIL_BLOCK`]) for one if there is none yet (`XREAD
    /// BLOCK`): empty if none came. Tails share one connection of their
    /// own, so concurrent calls wait for each other, and never for a write.
    pub async fn tail(
        &self,
        token: StreamToken,
        after_seq: u64,
        block: Duration,
    ) -> io::Result<Vec<LogRecord>> {
        let records = self.tail_many(&[(token, after_seq)], block).await?;
        Ok(records.into_iter().map(|(_, record)| record).collect())
    }

    /// The events of each stream `(token, after_seq)` after its `after_seq`,
    /// with its token, waiting up to `block` (at most [`MAX_TAIL_BLOCK`])
    /// if none has any yet: one `XREAD BLOCK` for all of them.
    pub(super) async fn tail_many(
        &self,
        from: &[(StreamToken, u64)],
        block: Duration,
    ) -> io::Result<Vec<(StreamToken, LogRecord)>> {
        let block_ms = u64::try_from(block.min(MAX_TAIL_BLOCK).as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let mut xread = redis::cmd("XREAD");
        xread
            .arg("COUNT")
            .arg(RECOVER_PAGE)
            .arg("BLOCK")
            .arg(block_ms)
            .arg("STREAMS");
        let keys: Vec<String> = from.iter().map(|&(token, _)| self.log_key(token)).collect();
        for key in &keys {
            xread.arg(key);
        }
        for (_, after_seq) in from {
            xread.arg(format!("{after_seq}-0"));
        }
        let what = keys.first().map_or("XREAD", String::as_str);
        let reply: Value = self.query(&self.blocking, &xread).await?;
        // Nil after the block; else per stream its key and entries, as
        // pairs (RESP2) or a map (RESP3).
        let streams: Vec<(&Value, &Value)> = match &reply {
            Value::Nil => Vec::new(),
            Value::Array(streams) => streams
                .iter()
                .map(|stream| match stream.as_sequence() {
                    Some([key, entries]) => Ok((key, entries)),
                    _ => Err(corrupt(what, "XREAD answered no stream and entries")),
                })
                .collect::<io::Result<_>>()?,
            Value::Map(streams) => streams
                .iter()
                .map(|(key, entries)| (key, entries))
                .collect(),
            _ => return Err(corrupt(what, "XREAD answered no list of streams")),
        };
        let mut records = Vec::new();
        for (key, stream) in streams {
            let key = text(key).ok_or_else(|| corrupt(what, "a stream key is not text"))?;
            let Some(at) = keys.iter().position(|k| k == key) else {
                return Err(corrupt(key, "XREAD answered a stream not asked for"));
            };
            let token = from[at].0;
            records.extend(entries(key, stream)?.into_iter().map(|r| (token, r)));
        }
        Ok(records)
    }

    /// The stream of `token` as stored (its meta, every event, whether it
    /// ended), if Redis has it.
    pub(super) async fn load(&self, token: StreamToken) -> io::Result<Option<StoredStream>> {
        let key = self.meta_key(token);
        let hgetall = redis::cmd("HGETALL").arg(&key).take();
        let reply: Value = self.query(&self.connection, &hgetall).await?;
        let Some(mut stream) = parse_meta(token, &reply).map_err(|d| corrupt(&key, &d))? else {
            return Ok(None);
        };
        stream.records = self.read_all_after(token, 0).await?;
        Ok(Some(stream))
    }

    /// Whether each stream of `tokens` has ended, by its meta (one round
    /// trip).
    pub(super) async fn ended(&self, tokens: &[StreamToken]) -> io::Result<Vec<bool>> {
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for &token in tokens {
            pipe.cmd("HEXISTS").arg(self.meta_key(token)).arg("ended");
        }
        self.query_pipe(&pipe).await
    }

    /// The key naming the token of the GET stream whose keyed hash is
    /// `hash`: `{prefix}proxy:get:{hash}`.
    pub fn get_key(&self, hash: [u8; 16]) -> String {
        format!("{}proxy:get:{}", self.config.prefix, hex(&hash))
    }

    /// The token of the GET stream `hash` names in the fleet: the stored
    /// one, if its stream is still stored, or else `meta`'s, stored now
    /// with `meta` (which expires after `pending` unless the stream is
    /// logged: an `Open` makes it last). One atomic step (a script), so two
    /// instances opening the stream at once agree, and a token whose stream
    /// was dropped is never reused: a client's old id of it cannot name an
    /// event of a new stream.
    pub(super) async fn agree(
        &self,
        hash: [u8; 16],
        meta: &StreamMeta,
        pending: Duration,
    ) -> io::Result<StreamToken> {
        let key = self.get_key(hash);
        let mut call = AGREE_SCRIPT.key(&key);
        call.key(self.meta_key(meta.token))
            .key(self.meta_key_prefix())
            .arg(meta.token.to_string())
            .arg(&meta.target)
            .arg(hex(&meta.identity.to_bytes()))
            .arg(meta.created.as_u64())
            .arg(
                u64::try_from(pending.as_millis())
                    .unwrap_or(u64::MAX)
                    .max(1),
            );
        let token: String = self
            .connection
            .run(|mut connection| {
                let call = &call;
                async move { call.invoke_async(&mut connection).await }
            })
            .await
            .map_err(|e| io_error(e, &self.shown))?;
        StreamToken::parse(&token)
            .ok_or_else(|| corrupt(&key, &format!("{token:?} is not a token")))
    }

    /// The stored streams whose last event (or start, if they have none)
    /// was before `before`: one `SMEMBERS`, then one round trip per
    /// [`META_PAGE`] streams (`XREVRANGE ... COUNT 1` and the meta's
    /// `created`).
    pub(super) async fn idle_since(&self, before: Millis) -> io::Result<Vec<StreamToken>> {
        let smembers = redis::cmd("SMEMBERS").arg(self.streams_key()).take();
        let members: Vec<String> = self.query(&self.connection, &smembers).await?;
        let tokens: Vec<StreamToken> = members
            .iter()
            .filter_map(|m| StreamToken::parse(m))
            .collect();
        let mut idle = Vec::new();
        for page in tokens.chunks(META_PAGE) {
            let mut pipe = redis::pipe();
            for &token in page {
                pipe.cmd("XREVRANGE")
                    .arg(self.log_key(token))
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1);
                pipe.cmd("HGET").arg(self.meta_key(token)).arg("created");
            }
            let replies: Vec<Value> = self.query_pipe(&pipe).await?;
            for (&token, pair) in page.iter().zip(replies.chunks(2)) {
                let last = entries(&self.log_key(token), &pair[0])?
                    .last()
                    .map(|r| r.time)
                    .or_else(|| text(&pair[1]).and_then(|t| t.parse().ok()).map(Millis));
                if last.is_none_or(|last| last < before) {
                    idle.push(token);
                }
            }
        }
        Ok(idle)
    }

    /// Sends `pipe` on the shared connection.
    async fn query_pipe<T: redis::FromRedisValue>(&self, pipe: &redis::Pipeline) -> io::Result<T> {
        self.connection
            .run(|mut connection| async move { pipe.query_async(&mut connection).await })
            .await
            .map_err(|e| io_error(e, &self.shown))
    }

    /// Runs one command on `connection`.
    async fn query<T: redis::FromRedisValue>(
        &self,
        connection: &SharedConnection,
        command: &redis::Cmd,
    ) -> io::Result<T> {
        connection
            .run(|mut connection| async move { command.query_async(&mut connection).await })
            .await
            .map_err(|e| io_error(e, &self.shown))
    }

    /// Sends `pipe`, blocking, and gives each command's reply, server
    /// errors included.
    fn send(&self, pipe: &redis::Pipeline) -> io::Result<Vec<Value>> {
        smol::block_on(self.query_pipe(pipe))
    }

    /// The pipelines of `ops`: their commands in order (the trims last),
    /// [`COMMANDS_PER_ROUND_TRIP`] at most in each; and the trims they write.
    fn pipelines(&self, ops: &[LogOp]) -> (Vec<redis::Pipeline>, TokenMap<u64>) {
        let mut pipes = Pipelines::default();
        let mut trims = TokenMap::<u64>::default();
        // One key per stream, not per event.
        let mut log_keys = TokenMap::<String>::default();
        for op in ops {
            match op {
                LogOp::Open(meta) => {
                    // The meta before the token: whoever finds the token
                    // finds its meta.
                    pipes
                        .next()
                        .cmd("HSET")
                        .arg(self.meta_key(meta.token))
                        .arg("kind")
                        .arg(meta.kind.as_str())
                        .arg("target")
                        .arg(&meta.target)
                        .arg("identity")
                        .arg(hex(&meta.identity.to_bytes()))
                        .arg("created")
                        .arg(meta.created.as_u64());
                    // A GET stream's meta the fleet agreed on expires
                    // unless the stream is logged.
                    pipes.next().cmd("PERSIST").arg(self.meta_key(meta.token));
                    pipes
                        .next()
                        .cmd("SADD")
                        .arg(self.streams_key())
                        .arg(meta.token.to_string());
                }
                LogOp::Append { token, record } => {
                    let key = log_keys
                        .entry(*token)
                        .or_insert_with(|| self.log_key(*token));
                    let xadd = pipes
                        .next()
                        .cmd("XADD")
                        .arg(&**key)
                        .arg("MAXLEN")
                        .arg("~")
                        .arg(self.max_len)
                        .arg(format!("{}-0", record.seq))
                        .arg("time")
                        .arg(record.time.as_u64());
                    if let Some(id) = record.upstream_id() {
                        xadd.arg("upstream").arg(id);
                    }
                    xadd.arg("frame").arg(record.frame());
                }
                LogOp::Trim { token, first_seq } => {
                    let trim = trims.entry(*token).or_default();
                    *trim = (*trim).max(*first_seq);
                }
                LogOp::End { token } => {
                    pipes
                        .next()
                        .cmd("HSET")
                        .arg(self.meta_key(*token))
                        .arg("ended")
                        .arg(1);
                }
                LogOp::Drop { token } => {
                    trims.remove(token);
                    pipes
                        .next()
                        .cmd("SREM")
                        .arg(self.streams_key())
                        .arg(token.to_string());
                    pipes
                        .next()
                        .cmd("DEL")
                        .arg(self.meta_key(*token))
                        .arg(self.log_key(*token));
                }
            }
        }
        trims.retain(|token, first_seq| {
            let last = self.trimmed.get(token).copied().unwrap_or(0);
            *first_seq >= last.saturating_add(TRIM_STEP)
        });
        for (token, first_seq) in &trims {
            pipes
                .next()
                .cmd("XTRIM")
                .arg(self.log_key(*token))
                .arg("MINID")
                .arg(format!("{first_seq}-0"));
        }
        (pipes.finish(), trims)
    }

    /// Every stored stream, without its records yet, and the tokens of
    /// those whose meta is missing (a `Drop` cut short, say).
    fn stored_metas(&self) -> io::Result<(Vec<StoredStream>, Vec<StreamToken>)> {
        let smembers = redis::cmd("SMEMBERS").arg(self.streams_key()).take();
        let members: Vec<String> = smol::block_on(self.query(&self.connection, &smembers))?;
        let mut tokens = Vec::with_capacity(members.len());
        for member in &members {
            let token = StreamToken::parse(member).ok_or_else(|| {
                corrupt(&self.streams_key(), &format!("{member:?} is not a token"))
            })?;
            tokens.push(token);
        }
        let mut metas = Vec::with_capacity(tokens.len());
        let mut orphans = Vec::new();
        for page in tokens.chunks(META_PAGE) {
            let mut pipe = redis::pipe();
            for &token in page {
                pipe.cmd("HGETALL").arg(self.meta_key(token));
            }
            let replies = self.send(&pipe)?;
            for (&token, reply) in page.iter().zip(&replies) {
                match parse_meta(token, reply) {
                    Ok(Some(meta)) => metas.push(meta),
                    Ok(None) => orphans.push(token),
                    Err(detail) => return Err(corrupt(&self.meta_key(token), &detail)),
                }
            }
        }
        Ok((metas, orphans))
    }

    /// Every event stored of `token`, oldest first, read in pages.
    fn stored_records(&self, token: StreamToken) -> io::Result<Vec<LogRecord>> {
        smol::block_on(self.read_all_after(token, 0))
    }
}

impl LogStorage for RedisLog {
    fn write(&mut self, ops: &[LogOp]) -> io::Result<()> {
        let (pipes, trims) = self.pipelines(ops);
        for pipe in &pipes {
            let replies = self.send(pipe)?;
            for reply in replies {
                if let Value::ServerError(error) = reply
                    && !is_written_before(error.details())
                {
                    return Err(io_error(store_error(RedisError::from(error)), &self.shown));
                }
            }
        }
        self.trimmed.extend(trims);
        for op in ops {
            if let LogOp::Drop { token } = op {
                self.trimmed.remove(token);
            }
        }
        Ok(())
    }

    fn recover(&mut self) -> io::Result<Vec<StoredStream>> {
        let (metas, orphans) = self.stored_metas()?;
        if !orphans.is_empty() {
            eprintln!(
                "tidemark: {} stream(s) in {} have no meta (dropped midway?): forgetting them",
                orphans.len(),
                self.streams_key()
            );
            let ops: Vec<LogOp> = orphans
                .into_iter()
                .map(|token| LogOp::Drop { token })
                .collect();
            self.write(&ops)?;
        }
        let mut streams = metas;
        for stream in &mut streams {
            stream.records = self.stored_records(stream.meta.token)?;
            if let Some(first) = stream.records.first() {
                self.trimmed.insert(stream.meta.token, first.seq);
            }
        }
        streams.sort_by_key(|s| (s.meta.created, s.meta.token));
        Ok(streams)
    }

    fn identity_key(&mut self, fresh: [u8; 32]) -> io::Result<[u8; 32]> {
        let key = self.identity_key_key();
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(&key)
            .arg(hex(&fresh))
            .arg("NX")
            .ignore()
            .cmd("GET")
            .arg(&key);
        let (stored,): (Option<String>,) = smol::block_on(self.query_pipe(&pipe))?;
        let stored = stored.ok_or_else(|| corrupt(&key, "it vanished right after SET NX"))?;
        unhex::<32>(&stored).ok_or_else(|| corrupt(&key, "not 64 hex digits"))
    }

    fn serves_while_failing(&self) -> bool {
        true
    }
}

/// Pipelines being filled, each with at most [`COMMANDS_PER_ROUND_TRIP`]
/// commands, every command's reply kept, errors included.
#[derive(Default)]
struct Pipelines {
    full: Vec<redis::Pipeline>,
    current: Option<redis::Pipeline>,
}

impl Pipelines {
    /// The pipeline for the next command.
    fn next(&mut self) -> &mut redis::Pipeline {
        if self
            .current
            .as_ref()
            .is_some_and(|pipe| pipe.len() >= COMMANDS_PER_ROUND_TRIP)
        {
            self.full.extend(self.current.take());
        }
        self.current.get_or_insert_with(|| {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            pipe
        })
    }

    fn finish(mut self) -> Vec<redis::Pipeline> {
        self.full.extend(self.current);
        self.full
    }
}

/// Whether an error's `details` say that Redis refused a command only
/// because it was written before: an `XADD` whose id is not above the
/// stream's last.
fn is_written_before(details: Option<&str>) -> bool {
    details.is_some_and(|d| d.contains("equal or smaller than the target stream top item"))
}

/// A stream (without its records) from its meta's `HGETALL` reply; `None`
/// for an empty reply (no such key).
fn parse_meta(token: StreamToken, reply: &Value) -> Result<Option<StoredStream>, String> {
    let fields = reply
        .as_map_iter()
        .ok_or_else(|| format!("HGETALL answered {reply:?}"))?;
    let mut kind = None;
    let mut target = None;
    let mut identity = None;
    let mut created = None;
    let mut ended = false;
    let mut any = false;
    for (name, value) in fields {
        any = true;
        let name = text(name).ok_or("a field name is not text")?;
        let value = text(value).ok_or_else(|| format!("field {name} is not text"))?;
        match name {
            "kind" => {
                kind = Some(match value {
                    "get" => StreamKind::Get,
                    "post" => StreamKind::Post,
                    _ => return Err(format!("kind {value:?}")),
                })
            }
            "target" => target = Some(value.to_owned()),
            "identity" => {
                identity = Some(Identity::from_bytes(
                    unhex::<16>(value).ok_or("identity is not 32 hex digits")?,
                ))
            }
            "created" => created = Some(Millis(value.parse().map_err(|_| "created")?)),
            "ended" => ended = true,
            _ => {}
        }
    }
    if !any {
        return Ok(None);
    }
    match (kind, target, identity, created) {
        (Some(kind), Some(target), Some(identity), Some(created)) => Ok(Some(StoredStream {
            meta: StreamMeta {
                token,
                kind,
                target,
                identity,
                created,
            },
            records: Vec::new(),
            ended,
        })),
        _ => Err("a field of kind, target, identity, created is missing".into()),
    }
}

/// The records of an `XRANGE` reply (or of one stream of an `XREAD`
/// reply: its key, then its entries).
fn entries(key: &str, reply: &Value) -> io::Result<Vec<LogRecord>> {
    let list = match reply.as_sequence() {
        Some(list) => list,
        None => return Err(corrupt(key, "the reply is not a list of entries")),
    };
    list.iter()
        .map(|entry| record(entry).map_err(|detail| corrupt(key, &detail)))
        .collect()
}

/// One entry, `[id, [field, value, ...]]`, as a record.
fn record(entry: &Value) -> Result<LogRecord, String> {
    let [id, fields] = entry.as_sequence().unwrap_or_default() else {
        return Err(format!("entry {entry:?}"));
    };
    let id = text(id).ok_or("an entry id is not text")?;
    let seq = id
        .strip_suffix("-0")
        .and_then(|seq| seq.parse().ok())
        .ok_or_else(|| format!("entry id {id:?} is not <seq>-0"))?;
    let mut time = None;
    let mut upstream = None;
    let mut frame = None;
    for (name, value) in fields
        .as_map_iter()
        .ok_or_else(|| format!("entry {id}: fields {fields:?}"))?
    {
        match (name, value) {
            (Value::BulkString(name), Value::BulkString(value)) => match &name[..] {
                b"time" => time = std::str::from_utf8(value).ok().and_then(|t| t.parse().ok()),
                b"upstream" => upstream = Some(String::from_utf8(value.clone()).ok()),
                b"frame" => frame = Some(&value[..]),
                _ => {}
            },
            _ => return Err(format!("entry {id}: a field is not a string")),
        }
    }
    let upstream = match upstream {
        Some(None) => return Err(format!("entry {id}: upstream is not UTF-8")),
        Some(Some(upstream)) => Some(upstream),
        None => None,
    };
    match (time, frame) {
        (Some(time), Some(frame)) => Ok(LogRecord::new(
            seq,
            Millis(time),
            upstream.as_deref(),
            frame,
        )),
        _ => Err(format!("entry {id}: time or frame is missing")),
    }
}

fn text(value: &Value) -> Option<&str> {
    match value {
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.is_ascii() {
        return None;
    }
    let mut bytes = [0; N];
    for (byte, pair) in bytes.iter_mut().zip(s.as_bytes().chunks_exact(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(bytes)
}

fn corrupt(key: &str, detail: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("redis key {key}: {detail}"),
    )
}

/// A store error of the server at `shown` as the proxy's storage reports
/// it.
fn io_error(error: StoreError, shown: &str) -> io::Error {
    let kind = match error {
        StoreError::Unavailable(_) => io::ErrorKind::NotConnected,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, format!("{shown}: {error}"))
}
