//! A fleet of proxies on one log in Redis Streams (`--log redis://...`).
//!
//! Every instance of the fleet serves any client of any stream; the log in
//! Redis ([`RedisLog`]) is the one truth, and each instance keeps the
//! streams its clients read in memory, as their *writer* or as a *mirror*:
//!
//! - **One writer per stream**, holding the stream's [`Lease`] (the key
//!   `{prefix}lease:5:proxy:{token}`): for a GET stream the instance that
//!   follows the upstream, for a POST stream the one that received the
//!   POST and reads its answer. Only the writer hands the stream's changes
//!   to storage, and it checks its lease before each append. Redis refuses
//!   a sequence number that does not increase (entry ids `<seq>-0`), a last
//!   guard against two writers.
//! - **Mirrors** on every other instance with clients of the stream: the
//!   fleet's tail task reads every mirrored stream with one `XREAD BLOCK`
//!   and appends what it gets to the local logs
//!   ([`ReplayLog::append_stored`]); clients are served from there as from
//!   any log. A mirror learns that its stream ended from the stream's meta.
//! - **One token per GET stream**: the instance that opens a GET stream
//!   agrees on its token with the others first, through the key
//!   `{prefix}proxy:get:{hash}` (the keyed hash of its path, query and
//!   identity), set if absent. So ids are the same on every instance and a
//!   client may resume on any of them.
//! - **Failover**: a mirror with clients is a standby for its stream's
//!   lease, trying it every [`STANDBY_PERIOD`] (or a third of the lease's
//!   time to live, if shorter). When the writer dies, the lease lapses and
//!   a standby takes it: it reads what the writer logged, then follows the
//!   upstream on from the last upstream id in the log (the upstream's
//!   replay fills the gap), its ids going on from the last one. A standby
//!   that finds the lease of a POST stream free ends the stream: its
//!   reader died, nobody can read the answer on.
//! - **Resumes anywhere**: an id or `Content-Location` of a stream this
//!   instance does not have is looked up in Redis (its meta says whose it
//!   is), and the stream is mirrored from there.
//! - **A Redis outage**: the writer goes on serving its clients from memory
//!   (and writes the backlog when Redis is back); mirrors wait; what needs
//!   Redis to start (a new stream, a resume of an unknown one) is answered
//!   `503` with `Retry-After`. Everything recovers by itself.
//!
//! [`ReplayLog::append_stored`]: tidemark_core::replay::ReplayLog::append_stored

use super::FleetOptions;
use super::hub::{GetKey, Hub, LoggedStream, Upstream};
use super::redis_log::RedisLog;
use super::storage::{LogOp, StoredStream, StreamKind, StreamMeta, TokenMap};
use super::upstream::follow_get;
use crate::{Lease, LeaseLost, RedisStore, SmolClock};
use event_listener::Event;
use std::io;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tidemark_core::replay::{Retention, StreamToken};
use tidemark_core::{Clock, Millis, StreamKey};

/// The longest a standby waits between two attempts at a lease.
pub const STANDBY_PERIOD: Duration = Duration::from_millis(250);

/// How long one `XREAD BLOCK` of the tail task waits.
const TAIL_BLOCK: Duration = Duration::from_millis(200);

/// How often the tail task asks whether idle mirrored streams ended.
const ENDED_CHECK: Millis = Millis(500);

/// The fleet's shared parts: the log's reads, the leases, the mirrors.
#[derive(Debug)]
pub(super) struct Fleet {
    redis: RedisLog,
    leases: Arc<RedisStore>,
    lease_ttl: Duration,
    clock: SmolClock,
    /// The streams mirrored here, by token.
    mirrors: Mutex<TokenMap<Arc<LoggedStream>>>,
    /// The leases of the streams this instance writes.
    held: Mutex<TokenMap<Lease>>,
    /// Notified when a stream is mirrored.
    mirrored: Event,
}

impl Fleet {
    /// The fleet of `options`, for streams kept with `retention`.
    pub fn new(options: FleetOptions, retention: Retention, clock: SmolClock) -> io::Result<Self> {
        let leases = RedisStore::new(options.redis.clone())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        Ok(Fleet {
            redis: RedisLog::new(options.redis, retention)?,
            leases: Arc::new(leases),
            lease_ttl: options.lease_ttl,
            clock,
            mirrors: Mutex::default(),
            held: Mutex::default(),
            mirrored: Event::new(),
        })
    }

    /// A lease on `token` for this instance (not held yet).
    pub fn lease(&self, token: StreamToken) -> Lease {
        Lease::new(
            self.leases.clone(),
            &StreamKey::new("proxy", token.to_string()),
            self.lease_ttl,
            self.clock,
        )
    }

    /// The token of the GET stream of `key` in the whole fleet: the one
    /// stored, or `meta`'s, stored now with `meta` (see
    /// [`RedisLog::agree`]).
    pub async fn agree(
        &self,
        hub: &Hub,
        key: &GetKey,
        meta: &StreamMeta,
    ) -> io::Result<StreamToken> {
        let hash = hub
            .key
            .identity([key.0.as_bytes(), &key.1.to_bytes()[..]])
            .to_bytes();
        let pending = Duration::from_millis(hub.config.retention.idle.as_u64());
        self.redis.agree(hash, meta, pending).await
    }

    /// The stream of `token` as Redis has it (meta and records), if any.
    pub async fn load(&self, token: StreamToken) -> io::Result<Option<StoredStream>> {
        self.redis.load(token).await
    }

    /// Appends to `stream`'s log whatever Redis has after it; `Ok` once it
    /// has all Redis had.
    pub async fn catch_up(&self, stream: &LoggedStream) -> io::Result<()> {
        let after = stream.state().log.next_seq() - 1;
        let records = self.redis.read_all_after(stream.meta.token, after).await?;
        {
            let mut state = stream.state();
            for record in records {
                state.log.append_stored(record);
            }
        }
        stream.changed.notify(usize::MAX);
        Ok(())
    }

    fn lock_held(&self) -> std::sync::MutexGuard<'_, TokenMap<Lease>> {
        self.held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// This instance writes the stream of `token` under `lease`.
    pub fn holding(&self, token: StreamToken, lease: Lease) {
        self.lock_held().insert(token, lease);
    }

    /// This instance is done writing the stream of `token`: its lease is
    /// given back, so a standby need not wait for it to lapse.
    pub async fn let_go(&self, token: StreamToken) {
        let lease = self.lock_held().remove(&token);
        if let Some(lease) = lease {
            let _ = lease.release().await;
        }
    }

    /// Whether this instance may drop the stream of `token` from the
    /// fleet's log: it holds the stream's lease (taken now if free), so no
    /// other instance writes it. The lease is given back either way: there
    /// is nothing left to write.
    pub async fn take_to_drop(&self, token: StreamToken) -> bool {
        let lease = self
            .lock_held()
            .remove(&token)
            .unwrap_or_else(|| self.lease(token));
        let held = lease.is_valid() || matches!(lease.try_acquire().await, Ok(true));
        let _ = lease.release().await;
        held
    }

    /// Gives back every lease held (the proxy stops): the fleet takes the
    /// streams over at once.
    pub async fn let_go_all(&self) {
        let leases: Vec<Lease> = self.lock_held().drain().map(|(_, lease)| lease).collect();
        for lease in leases {
            let _ = lease.release().await;
        }
    }

    fn lock_mirrors(&self) -> std::sync::MutexGuard<'_, TokenMap<Arc<LoggedStream>>> {
        self.mirrors
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts mirroring `stream` (its state says `Mirrored`).
    pub fn mirror(&self, stream: Arc<LoggedStream>) {
        self.lock_mirrors().insert(stream.meta.token, stream);
        self.mirrored.notify(usize::MAX);
    }

    /// Stops mirroring the stream of `token`.
    pub fn unmirror(&self, token: StreamToken) {
        self.lock_mirrors().remove(&token);
    }

    /// How many streams are mirrored here.
    pub fn mirrored(&self) -> usize {
        self.lock_mirrors().len()
    }

    /// The tail task: reads every mirrored stream from Redis with one
    /// `XREAD BLOCK` after another, appends what comes to the local logs and
    /// wakes their clients; ends the mirrors of streams that ended. Runs
    /// until the hub is gone.
    pub async fn tail(self: Arc<Self>, hub: Weak<Hub>) {
        let mut failing = false;
        let mut ended_checked = Millis::ZERO;
        loop {
            let listener = self.mirrored.listen();
            let streams: Vec<Arc<LoggedStream>> = self.lock_mirrors().values().cloned().collect();
            if streams.is_empty() {
                listener.await;
                continue;
            }
            let from: Vec<(StreamToken, u64)> = streams
                .iter()
                .map(|s| (s.meta.token, s.state().log.next_seq() - 1))
                .collect();
            let read = self.redis.tail_many(&from, TAIL_BLOCK).await;
            let Some(hub) = hub.upgrade() else { return };
            let records = match read {
                Ok(records) => {
                    if failing {
                        eprintln!("tidemark: the fleet's log is readable again");
                        failing = false;
                    }
                    records
                }
                Err(e) => {
                    if !failing {
                        eprintln!(
                            "tidemark: cannot read the fleet's log ({e}); mirrored streams wait, retrying"
                        );
                        failing = true;
                    }
                    async_io::Timer::after(TAIL_BLOCK).await;
                    continue;
                }
            };
            // Each mirrored stream by token, and whether it got anything.
            let mut by_token: TokenMap<(&Arc<LoggedStream>, bool)> =
                streams.iter().map(|s| (s.meta.token, (s, false))).collect();
            for (token, record) in records {
                let Some((stream, fresh)) = by_token.get_mut(&token) else {
                    continue;
                };
                if let Some(appended) = stream.state().log.append_stored(record) {
                    hub.metrics.log_bytes_add(appended.bytes_delta);
                    *fresh = true;
                }
            }
            for (stream, fresh) in by_token.values() {
                if *fresh {
                    stream.changed.notify(usize::MAX);
                }
            }
            let now = self.clock.now();
            if now >= ended_checked.saturating_add(ENDED_CHECK) {
                ended_checked = now;
                let idle: Vec<&Arc<LoggedStream>> = by_token
                    .values()
                    .filter(|(_, fresh)| !fresh)
                    .map(|&(stream, _)| stream)
                    .collect();
                let tokens: Vec<StreamToken> = idle.iter().map(|s| s.meta.token).collect();
                if let Ok(ended) = self.redis.ended(&tokens).await {
                    for (stream, ended) in idle.into_iter().zip(ended) {
                        if ended {
                            self.end_mirror(stream).await;
                        }
                    }
                }
            }
        }
    }

    /// The janitor task: every half retention period (between 0.5 s and
    /// 60 s), drops from the fleet's log the streams no instance has here
    /// and nobody writes whose last event is older than retention, such as
    /// those of an instance that died: no instance would drop them
    /// otherwise. Runs until the hub is gone.
    pub async fn janitor(self: Arc<Self>, hub: Weak<Hub>) {
        let idle = Duration::from_millis(
            hub.upgrade()
                .map_or(0, |hub| hub.config.retention.idle.as_u64()),
        );
        let period = (idle / 2).clamp(Duration::from_millis(500), Duration::from_secs(60));
        loop {
            async_io::Timer::after(period).await;
            let Some(hub) = hub.upgrade() else { return };
            let before = Millis(
                self.clock
                    .now()
                    .as_u64()
                    .saturating_sub(idle.as_millis() as u64),
            );
            let Ok(stale) = self.redis.idle_since(before).await else {
                continue;
            };
            for token in stale {
                if hub.has(token) {
                    continue; // this instance's sweep sees to it
                }
                hub.drop_if_unwritten(token);
            }
        }
    }

    /// A mirrored stream ended: takes what is left, then ends it here.
    async fn end_mirror(&self, stream: &LoggedStream) {
        if self.catch_up(stream).await.is_err() {
            return;
        }
        self.unmirror(stream.meta.token);
        {
            let mut state = stream.state();
            state.log.end();
            state.upstream = Upstream::Idle;
        }
        stream.changed.notify(usize::MAX);
    }
}

/// Mirrors `stream` here, another instance writing it, with a standby for
/// its lease. `follow`: the upstream URL and request headers to follow a
/// GET stream with if this instance takes it over.
pub(super) fn mirror(
    hub: &Arc<Hub>,
    fleet: &Arc<Fleet>,
    stream: &Arc<LoggedStream>,
    follow: Option<(String, Vec<(String, String)>)>,
) {
    {
        let mut state = stream.state();
        state.upstream = Upstream::Mirrored;
        // Its writer hands its changes to storage, not this instance.
        state.writes = false;
    }
    stream.changed.notify(usize::MAX);
    fleet.mirror(stream.clone());
    hub.metrics.set_mirrored(fleet.mirrored());
    let task = standby(hub.clone(), fleet.clone(), stream.clone(), follow);
    hub.executor.spawn(task).detach();
}

/// Holds `lease` for the writer of `stream` until another instance takes
/// it, or the task is dropped (the writer is done; the caller releases the
/// lease). A lease not held yet (Redis was down when the writer started) is
/// tried until it is.
///
/// A lease that lapses because Redis cannot be reached (an outage, or a
/// partition) does not stop the writer: it goes on serving its own clients
/// from memory, writing nothing to Redis, and tries the lease again. Once
/// it holds it again, and Redis has nothing of the stream beyond what this
/// instance wrote, it writes what it logged meanwhile and is the writer
/// again. If another instance wrote the stream meanwhile, this one is
/// fenced off: it stops, and forgets its copy.
pub(super) async fn hold(
    hub: Arc<Hub>,
    fleet: Arc<Fleet>,
    stream: Arc<LoggedStream>,
    lease: Lease,
) {
    let period = fleet.standby_period();
    while !lease.is_valid() {
        if let Ok(true) = lease.try_acquire().await {
            break;
        }
        async_io::Timer::after(period).await;
    }
    loop {
        let why = lease.keep().await;
        if why == LeaseLost::Taken {
            fenced(&hub, &stream);
            return;
        }
        eprintln!(
            "tidemark: the lease of {} lapsed ({why}); serving its clients from memory, retrying",
            stream.meta.target
        );
        {
            let mut state = stream.state();
            state.lapsed = true;
            // Nothing more goes to Redis until the lease is back (see
            // `hub::fence`).
            state.writes = false;
        }
        loop {
            async_io::Timer::after(period).await;
            match lease.try_acquire().await {
                Ok(true) => match fleet.reconcile(&hub, &stream).await {
                    Ok(true) => break,
                    Ok(false) => {
                        fenced(&hub, &stream);
                        let _ = lease.release().await;
                        return;
                    }
                    Err(_) => continue,
                },
                Ok(false) => {
                    fenced(&hub, &stream);
                    return;
                }
                Err(_) => continue,
            }
        }
        eprintln!(
            "tidemark: the lease of {} is back; the stream's log is written again",
            stream.meta.target
        );
    }
}

/// Another instance writes `stream` now: this one stops writing and
/// following it, and forgets its copy (which may differ from the fleet's
/// after a partition); its clients reconnect and get the fleet's.
fn fenced(hub: &Hub, stream: &LoggedStream) {
    eprintln!(
        "tidemark: another instance writes {} now; this one lets it go",
        stream.meta.target
    );
    {
        let mut state = stream.state();
        state.writes = false;
        state.lapsed = false;
        state.stop = true;
    }
    stream.stopping.notify(usize::MAX);
    hub.forget(stream);
}

impl Fleet {
    /// After this instance took the lease of `stream` back: whether it is
    /// still the stream's writer, and then hands storage what it logged
    /// meanwhile. It is if everything Redis has of the stream beyond what
    /// this instance knows it wrote is this instance's own (writes that
    /// timed out here but reached Redis): anything else was written by
    /// another instance.
    async fn reconcile(&self, hub: &Hub, stream: &LoggedStream) -> io::Result<bool> {
        let token = stream.meta.token;
        let mut last = stream.state().stored_upto;
        let theirs = self.redis.read_all_after(token, last).await?;
        {
            let state = stream.state();
            for record in &theirs {
                let ours = state
                    .log
                    .since(record.seq)
                    .next()
                    .is_some_and(|own| own.seq == record.seq && own.frame() == record.frame());
                if !ours {
                    return Ok(false);
                }
                last = record.seq;
            }
        }
        let ops = {
            let mut state = stream.state();
            let mut ops = vec![LogOp::Open(stream.meta.clone())];
            ops.extend(
                state
                    .log
                    .since(last + 1)
                    .map(|record| LogOp::Append { token, record }),
            );
            if state.log.is_ended() {
                ops.push(LogOp::End { token });
            }
            state.stored_upto = last;
            state.writes = true;
            state.lapsed = false;
            ops
        };
        hub.log_ops(ops);
        Ok(true)
    }
}

impl Fleet {
    /// How often a standby tries a lease, and a writer retries one.
    pub fn standby_period(&self) -> Duration {
        STANDBY_PERIOD.min(self.lease_ttl / 3)
    }
}

/// A mirror's standby: tries the stream's lease until it holds it (the
/// writer died or let go), then takes the stream over; gives up when the
/// stream ended or nobody here reads it any more (after the linger).
async fn standby(
    hub: Arc<Hub>,
    fleet: Arc<Fleet>,
    stream: Arc<LoggedStream>,
    follow: Option<(String, Vec<(String, String)>)>,
) {
    let lease = fleet.lease(stream.meta.token);
    let period = fleet.standby_period();
    let linger = Millis(u64::try_from(hub.config.linger.as_millis()).unwrap_or(u64::MAX));
    loop {
        async_io::Timer::after(period).await;
        let now = hub.clock.now();
        {
            let state = stream.state();
            let gone = state.upstream != Upstream::Mirrored
                || (state.clients == 0 && now >= state.left_at.saturating_add(linger));
            if gone {
                drop(state);
                fleet.unmirror(stream.meta.token);
                hub.metrics.set_mirrored(fleet.mirrored());
                hub.forget_mirror(&stream);
                return;
            }
        }
        match lease.try_acquire().await {
            Ok(true) => break,
            Ok(false) | Err(_) => continue,
        }
    }
    fleet.unmirror(stream.meta.token);
    hub.metrics.set_mirrored(fleet.mirrored());
    if fleet.catch_up(&stream).await.is_err() {
        // Redis went away right after the lease was taken: let it go, and
        // be a mirror again.
        let _ = lease.release().await;
        mirror(&hub, &fleet, &stream, follow);
        return;
    }
    hub.metrics.fleet_takeover();
    hub.take_over(&stream);
    match (stream.meta.kind, follow) {
        (StreamKind::Get, Some((url, headers))) if !stream.state().log.is_ended() => {
            eprintln!(
                "tidemark: took over following {} from another instance",
                stream.meta.target
            );
            hub.log_op(LogOp::Open(stream.meta.clone()));
            stream.state().upstream = Upstream::Live;
            stream.changed.notify(usize::MAX);
            follow_get(hub, stream, url, headers, None, Some(lease)).await;
        }
        _ => {
            // A POST answer whose reader died: nobody can read it on. It
            // ends at what was logged.
            {
                let mut state = stream.state();
                state.upstream = Upstream::Idle;
            }
            hub.end_stream(&stream);
            let _ = lease.release().await;
        }
    }
}
