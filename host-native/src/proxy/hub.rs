//! The proxy's shared state: every logged stream, its log, its clients, and
//! the storage writer that makes appends durable before clients see them.

use super::fleet::Fleet;
use super::storage::{LogOp, LogStorage, StoredStream, StreamKind, StreamMeta, TokenMap};
use super::{FleetOptions, ProxyConfig};
use crate::metrics::{Limit, ProxyMetrics};
use crate::{HttpConnector, SmolClock};
use event_listener::Event;
use hyper::HeaderMap;
use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tidemark_core::replay::{Identity, IdentityKey, ReplayLog, StreamToken};
use tidemark_core::{Clock, Millis};

/// Which GET stream a request shares: its path and query, and its
/// [`Who::sharing`].
pub(super) type GetKey = (String, Identity);

/// Who sent a request.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(super) struct Who {
    /// Whose streams it may read: a keyed hash of its credentials.
    pub owner: Identity,
    /// Which GET streams it shares: the owner, and its `Origin` when it
    /// has one (a stream's clients get its upstream answer's headers, whose
    /// CORS headers may be for one origin only). Browsers send no `Origin`
    /// on same-origin GETs, so the owner alone decides resumes.
    pub sharing: Identity,
}

/// Who reads the upstream of a stream right now.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(super) enum Upstream {
    /// Nobody: a GET stream between clients (after its linger), or a
    /// stream restored from disk.
    Idle,
    /// A request is asking the upstream; others wait for its answer.
    Opening,
    /// A task follows (GET) or reads (POST) the upstream.
    Live,
    /// Another instance of the fleet writes the stream; this one mirrors
    /// its log from Redis (see `fleet.rs`).
    Mirrored,
}

/// What a logged stream's lock guards.
#[derive(Debug)]
pub(super) struct StreamState {
    /// The log clients read.
    pub log: ReplayLog,
    /// Clients reading now.
    pub clients: usize,
    /// When the last client left.
    pub left_at: Millis,
    /// The upstream side.
    pub upstream: Upstream,
    /// Set to make the follower stop (linger over, shutdown).
    pub stop: bool,
    /// Whether storage has the stream (its `Open` was handed over).
    pub stored: bool,
    /// Whether this instance hands the stream's changes to storage: it
    /// made the stream, or took it over. A fleet's mirror does not (its
    /// writer does).
    pub writes: bool,
    /// In a fleet: this instance writes the stream but its lease lapsed
    /// (Redis unreachable): it serves its clients from memory, writing
    /// nothing, until it holds the lease again.
    pub lapsed: bool,
    /// The last sequence number storage wrote (the writer's own count).
    pub stored_upto: u64,
}

/// One logged stream.
#[derive(Debug)]
pub(super) struct LoggedStream {
    /// What it is.
    pub meta: StreamMeta,
    /// The key GET requests share it by (`None` for POST streams).
    pub key: Option<GetKey>,
    /// The headers the upstream answered with, for every client (those that
    /// belong to one connection removed).
    headers: Mutex<HeaderMap>,
    state: Mutex<StreamState>,
    /// Notified when clients may have something new: an event became
    /// durable, the stream ended, the upstream side changed.
    pub changed: Event,
    /// Notified when the follower must stop (`stop` was set).
    pub stopping: Event,
}

impl LoggedStream {
    /// A stream of `meta` shared by `key` with `log`, idle, without
    /// clients, as of `now`; `stored` and `writes` as in [`StreamState`].
    fn new(
        meta: StreamMeta,
        key: Option<GetKey>,
        log: ReplayLog,
        now: Millis,
        stored: bool,
        writes: bool,
    ) -> Arc<Self> {
        Arc::new(LoggedStream {
            meta,
            key,
            headers: Mutex::new(default_headers()),
            state: Mutex::new(StreamState {
                log,
                clients: 0,
                left_at: now,
                upstream: Upstream::Idle,
                stop: false,
                stored,
                writes,
                lapsed: false,
                stored_upto: 0,
            }),
            changed: Event::new(),
            stopping: Event::new(),
        })
    }

    /// The headers every client of the stream gets.
    pub fn headers(&self) -> HeaderMap {
        self.headers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Sets the headers every client of the stream gets.
    pub fn set_headers(&self, headers: HeaderMap) {
        *self
            .headers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = headers;
    }

    /// Locks the stream's state.
    pub fn state(&self) -> MutexGuard<'_, StreamState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Every stream, by token, and the GET streams by key.
#[derive(Debug, Default)]
struct Streams {
    by_token: HashMap<StreamToken, Arc<LoggedStream>>,
    gets: HashMap<GetKey, StreamToken>,
    /// Streams that are logged (not GET streams still asking the upstream
    /// whether their answer is a stream): what `--max-streams` bounds.
    logged: usize,
}

/// The proxy's state, shared by every connection and task.
#[derive(Debug)]
pub(super) struct Hub {
    pub config: ProxyConfig,
    pub key: IdentityKey,
    pub clock: SmolClock,
    /// What the proxy counts.
    pub metrics: ProxyMetrics,
    /// Runs the proxy's tasks (see `Proxy::run`).
    pub executor: Arc<smol::Executor<'static>>,
    /// Opens GET streams upstream.
    pub get_connector: HttpConnector,
    /// Sends every other request upstream.
    pub request_connector: HttpConnector,
    streams: Mutex<Streams>,
    clients: AtomicUsize,
    /// The storage writer's queue; `None` for a memory log.
    writer: Option<async_channel::Sender<Vec<LogOp>>>,
    /// The fleet this instance is one of, with a log in Redis.
    pub fleet: Option<Arc<Fleet>>,
    /// Set while a storage that serves while failing fails: appends are
    /// shown to clients at once, not only once the writer tried them.
    log_failing: AtomicBool,
}

impl Hub {
    /// The hub over `storage`: recovers its streams, and starts the writer
    /// thread when the storage is durable (joined by [`Writer::finish`]).
    /// In a `fleet`, nothing is recovered at start: streams are taken in
    /// from the fleet's log when a client asks for them.
    pub fn new(
        config: ProxyConfig,
        mut storage: Box<dyn LogStorage>,
        metrics: ProxyMetrics,
        fleet: Option<FleetOptions>,
    ) -> io::Result<(Arc<Hub>, Option<Writer>)> {
        let clock = SmolClock::new();
        let fleet = match fleet {
            Some(options) => Some(Fleet::new(options, config.retention, clock)?),
            None => None,
        };
        let fresh = tidemark_core::replay::random_bytes().map_err(io::Error::other)?;
        let key = IdentityKey::from_bytes(storage.identity_key(fresh)?);
        let recovered = match fleet {
            Some(_) => Vec::new(),
            None => storage.recover()?,
        };
        let durable = storage.is_durable();
        let (writer, queue) = if durable {
            let (sender, receiver) = async_channel::unbounded();
            (Some(sender), Some(receiver))
        } else {
            (None, None)
        };
        let (get_connector, request_connector) = config.connectors();
        let hub = Arc::new(Hub {
            get_connector,
            request_connector,
            config,
            key,
            clock,
            metrics,
            executor: Arc::new(smol::Executor::new()),
            streams: Mutex::default(),
            clients: AtomicUsize::new(0),
            writer,
            fleet: fleet.map(Arc::new),
            log_failing: AtomicBool::new(false),
        });
        let ended_on_recovery = hub.restore(recovered);
        for token in ended_on_recovery {
            hub.log_op(LogOp::End { token });
        }
        let writer = queue
            .map(|queue| Writer::start(storage, queue, Arc::downgrade(&hub), hub.metrics.clone()));
        Ok((hub, writer))
    }

    /// Puts recovered streams back; returns the POST streams that were
    /// still being read (they cannot be read on: they end here).
    fn restore(&self, recovered: Vec<StoredStream>) -> Vec<StreamToken> {
        let now = self.clock.now();
        let mut ended = Vec::new();
        let mut streams = self.lock();
        for stored in recovered {
            let mut log = ReplayLog::restore(
                stored.meta.token,
                self.config.retention,
                stored.records,
                stored.ended,
                now,
            );
            if stored.meta.kind == StreamKind::Post && !log.is_ended() {
                log.end();
                ended.push(stored.meta.token);
            }
            let token = stored.meta.token;
            streams.logged += 1;
            self.metrics.stream_opened(stored.meta.kind);
            self.metrics.log_bytes_add(log.bytes() as i64);
            // Shared again by requests without an `Origin`; those with one
            // resume it by its ids.
            let key = (stored.meta.kind == StreamKind::Get)
                .then(|| (stored.meta.target.clone(), stored.meta.identity));
            if let Some(key) = &key {
                streams.gets.insert(key.clone(), token);
            }
            streams.by_token.insert(
                token,
                LoggedStream::new(stored.meta, key, log, now, true, true),
            );
        }
        ended
    }

    fn lock(&self) -> MutexGuard<'_, Streams> {
        self.streams
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The stream of `token`, if it belongs to `identity`: another
    /// identity's stream is as unknown as one that never was.
    pub fn find(&self, token: StreamToken, identity: Identity) -> Option<Arc<LoggedStream>> {
        self.lock()
            .by_token
            .get(&token)
            .filter(|s| s.meta.identity == identity)
            .cloned()
    }

    /// The GET stream of `key`, if this instance has it.
    pub fn local_get(&self, key: &GetKey) -> Option<Arc<LoggedStream>> {
        let streams = self.lock();
        streams
            .gets
            .get(key)
            .and_then(|t| streams.by_token.get(t))
            .cloned()
    }

    /// The GET stream of `key`, made (idle, not logged yet, `owner`'s, of
    /// `token` if given: the one the fleet agreed on) if there is none;
    /// `Err` when that would exceed `--max-streams`.
    pub fn get_stream(
        &self,
        key: &GetKey,
        owner: Identity,
        token: Option<StreamToken>,
    ) -> Result<Arc<LoggedStream>, Limit> {
        let mut streams = self.lock();
        if let Some(stream) = streams.gets.get(key).and_then(|t| streams.by_token.get(t)) {
            return Ok(stream.clone());
        }
        if let Some(stream) = token.and_then(|t| streams.by_token.get(&t)).cloned() {
            streams.gets.insert(key.clone(), stream.meta.token);
            return Ok(stream);
        }
        let stream = self.make(&mut streams, Some(key.clone()), key.0.clone(), owner, token)?;
        streams.gets.insert(key.clone(), stream.meta.token);
        Ok(stream)
    }

    /// Takes in a stream of the fleet that this instance does not have,
    /// as Redis has it (`key`: the key GET requests share it by), written
    /// by another instance: the caller mirrors it, or takes it over. The
    /// one already here, if another request took it in meanwhile.
    pub fn adopt(&self, stored: StoredStream, key: Option<GetKey>) -> Arc<LoggedStream> {
        let now = self.clock.now();
        let mut streams = self.lock();
        if let Some(stream) = streams.by_token.get(&stored.meta.token) {
            return stream.clone();
        }
        let log = ReplayLog::restore(
            stored.meta.token,
            self.config.retention,
            stored.records,
            stored.ended,
            now,
        );
        self.metrics.log_bytes_add(log.bytes() as i64);
        let token = stored.meta.token;
        let stored_upto = log.next_seq() - 1;
        if let Some(key) = &key {
            streams.gets.insert(key.clone(), token);
        }
        let stream = LoggedStream::new(stored.meta, key, log, now, true, false);
        stream.state().stored_upto = stored_upto;
        streams.by_token.insert(token, stream.clone());
        stream
    }

    /// This instance writes `stream` from now on (it took its lease).
    pub fn take_over(&self, stream: &LoggedStream) {
        let mut state = stream.state();
        state.writes = true;
        state.stored = true;
        // It caught up with Redis: storage has all of it.
        state.stored_upto = state.log.next_seq() - 1;
    }

    /// Forgets `stream` here, leaving storage as it is (another instance
    /// of the fleet writes it).
    pub fn forget(&self, stream: &LoggedStream) {
        let mut streams = self.lock();
        if streams.by_token.contains_key(&stream.meta.token) {
            self.remove(&mut streams, stream);
        }
    }

    /// Forgets a mirrored stream nobody here reads any more (its writer
    /// keeps it in the fleet's log).
    pub fn forget_mirror(&self, stream: &LoggedStream) {
        let mut streams = self.lock();
        let idle = {
            let mut state = stream.state();
            if state.upstream == Upstream::Mirrored {
                state.upstream = Upstream::Idle;
            }
            !state.writes && state.clients == 0
        };
        if idle && streams.by_token.contains_key(&stream.meta.token) {
            self.remove(&mut streams, stream);
        }
    }

    /// Ends `stream` here (and in storage, if this instance writes it):
    /// nothing more is appended.
    pub fn end_stream(&self, stream: &LoggedStream) {
        let op = {
            let mut state = stream.state();
            let ended_here = !state.log.is_ended();
            state.log.end();
            (ended_here && state.writes && state.stored).then_some(LogOp::End {
                token: stream.meta.token,
            })
        };
        if let Some(op) = op {
            self.log_op(op);
        }
        stream.changed.notify(usize::MAX);
    }

    /// A new POST stream, logged at once.
    pub fn post_stream(
        &self,
        target: String,
        identity: Identity,
    ) -> Result<Arc<LoggedStream>, Limit> {
        let stream = {
            let mut streams = self.lock();
            self.make(&mut streams, None, target, identity, None)?
        };
        self.metrics.stream_opened(StreamKind::Post);
        self.log_op(LogOp::Open(stream.meta.clone()));
        Ok(stream)
    }

    /// A new stream: a GET stream shared by `key`, or a POST stream.
    fn make(
        &self,
        streams: &mut Streams,
        key: Option<GetKey>,
        target: String,
        identity: Identity,
        token: Option<StreamToken>,
    ) -> Result<Arc<LoggedStream>, Limit> {
        let kind = if key.is_some() {
            StreamKind::Get
        } else {
            StreamKind::Post
        };
        if kind == StreamKind::Post {
            self.admit(streams)?;
        }
        let now = self.clock.now();
        let token = token.unwrap_or_else(|| {
            loop {
                let token = StreamToken::random().expect("the OS has an entropy source");
                if !streams.by_token.contains_key(&token) {
                    break token;
                }
            }
        });
        let meta = StreamMeta {
            token,
            kind,
            target,
            identity,
            created: now,
        };
        let log = ReplayLog::new(token, self.config.retention, now);
        let stream = LoggedStream::new(meta, key, log, now, kind == StreamKind::Post, true);
        streams.by_token.insert(token, stream.clone());
        Ok(stream)
    }

    /// Forgets a GET stream that was made for a request whose answer was
    /// not a stream, if nothing was ever logged in it.
    pub fn discard_if_empty(&self, stream: &LoggedStream) {
        let mut streams = self.lock();
        let empty = {
            let state = stream.state();
            state.log.next_seq() == 1 && state.clients == 0 && state.upstream == Upstream::Idle
        };
        if empty {
            self.remove(&mut streams, stream);
        }
    }

    /// Counts a stream as logged, unless `--max-streams` are.
    fn admit(&self, streams: &mut Streams) -> Result<(), Limit> {
        if streams.logged >= self.config.limits.max_streams {
            self.metrics.refused(Limit::Streams);
            return Err(Limit::Streams);
        }
        streams.logged += 1;
        Ok(())
    }

    /// The GET stream becomes logged (its first answer was a stream),
    /// unless `--max-streams` are.
    pub fn log_open(&self, stream: &LoggedStream) -> Result<(), Limit> {
        self.admit(&mut self.lock())?;
        stream.state().stored = true;
        self.metrics.stream_opened(stream.meta.kind);
        self.log_op(LogOp::Open(stream.meta.clone()));
        Ok(())
    }

    /// Hands an op to storage; with a memory log, nothing to do.
    pub fn log_op(&self, op: LogOp) {
        self.log_ops(vec![op]);
    }

    /// Hands ops to storage in one go (an appended batch's); with a memory
    /// log, nothing to do.
    pub fn log_ops(&self, ops: Vec<LogOp>) {
        if let Some(writer) = &self.writer
            && !ops.is_empty()
        {
            // Unbounded: never blocks the stream; the writer drains it.
            let _ = writer.try_send(ops);
        }
    }

    /// Whether appends go to the writer, to be made durable.
    pub fn is_durable(&self) -> bool {
        self.writer.is_some()
    }

    /// Whether clients see appends at once: with a memory log, or while a
    /// storage that serves while failing fails (otherwise they see them
    /// once the writer wrote them).
    pub fn shows_at_once(&self) -> bool {
        self.writer.is_none() || self.log_failing.load(Ordering::Acquire)
    }

    /// Lets clients see events up to the marks (the writer wrote them, or
    /// the storage serves while it fails), and wakes them.
    fn mark_durable(&self, marks: &TokenMap<u64>) {
        let streams: Vec<Arc<LoggedStream>> = {
            let streams = self.lock();
            marks
                .keys()
                .filter_map(|t| streams.by_token.get(t).cloned())
                .collect()
        };
        for stream in streams {
            stream.state().log.mark_durable(marks[&stream.meta.token]);
            stream.changed.notify(usize::MAX);
        }
    }

    /// Counts a client in, unless `--max-clients` are connected.
    pub fn client_in(&self, stream: &LoggedStream) -> Result<(), Limit> {
        let mut now = self.clients.load(Ordering::Relaxed);
        loop {
            if now >= self.config.limits.max_clients {
                self.metrics.refused(Limit::Clients);
                return Err(Limit::Clients);
            }
            match self.clients.compare_exchange_weak(
                now,
                now + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(actual) => now = actual,
            }
        }
        stream.state().clients += 1;
        self.metrics.client_connected();
        Ok(())
    }

    /// Counts a client out.
    pub fn client_out(&self, stream: &LoggedStream) {
        self.clients.fetch_sub(1, Ordering::AcqRel);
        self.metrics.client_disconnected();
        let mut state = stream.state();
        state.clients -= 1;
        state.left_at = self.clock.now();
    }

    /// One round of housekeeping at `now`: stops GET followers whose last
    /// client left more than `--linger-secs` ago, and drops streams past
    /// retention that nothing uses.
    pub fn sweep(&self, now: Millis) {
        let linger = Millis(u64::try_from(self.config.linger.as_millis()).unwrap_or(u64::MAX));
        let mut dropped = Vec::new();
        {
            let mut streams = self.lock();
            let all: Vec<Arc<LoggedStream>> = streams.by_token.values().cloned().collect();
            for stream in all {
                let mut state = stream.state();
                if state.clients > 0 {
                    continue;
                }
                match state.upstream {
                    Upstream::Live
                        if stream.meta.kind == StreamKind::Get
                            && now >= state.left_at.saturating_add(linger)
                            && !state.stop =>
                    {
                        state.stop = true;
                        drop(state);
                        stream.stopping.notify(usize::MAX);
                    }
                    Upstream::Idle if state.log.is_expired(now) => {
                        let writes = state.writes;
                        drop(state);
                        self.remove(&mut streams, &stream);
                        if writes {
                            dropped.push(stream.meta.token);
                        }
                    }
                    _ => {}
                }
            }
        }
        for token in dropped {
            match &self.fleet {
                Some(_) => self.drop_if_unwritten(token),
                None => self.log_op(LogOp::Drop { token }),
            }
        }
    }

    /// Whether this instance has the stream of `token`.
    pub fn has(&self, token: StreamToken) -> bool {
        self.lock().by_token.contains_key(&token)
    }

    /// In a fleet, drops the stream of `token` from storage if no other
    /// instance writes it now (it may have taken the stream over since):
    /// only the one holding its lease may drop it.
    pub fn drop_if_unwritten(&self, token: StreamToken) {
        let Some(fleet) = self.fleet.clone() else {
            return;
        };
        let writer = self.writer.clone();
        self.executor
            .spawn(async move {
                if fleet.take_to_drop(token).await
                    && let Some(writer) = writer
                {
                    let _ = writer.try_send(vec![LogOp::Drop { token }]);
                }
            })
            .detach();
    }

    /// Ends every stream of `identity` (an MCP session the upstream ended
    /// or forgot): followers stop, readers of POST answers stop, nothing
    /// more is appended, and a new GET of the same path opens a new stream.
    /// What was logged stays resumable until retention drops it, or is
    /// dropped now if `drop` (the session was deleted).
    pub fn end_identity(&self, identity: Identity, drop: bool) {
        let mut ops = Vec::new();
        let mut streams = self.lock();
        let ours: Vec<Arc<LoggedStream>> = streams
            .by_token
            .values()
            .filter(|s| s.meta.identity == identity)
            .cloned()
            .collect();
        for stream in ours {
            let token = stream.meta.token;
            {
                let mut state = stream.state();
                state.stop = true;
                let writes = state.stored && state.writes;
                if !state.log.is_ended() {
                    state.log.end();
                    if writes {
                        ops.push(LogOp::End { token });
                    }
                }
                if drop && writes {
                    ops.push(LogOp::Drop { token });
                }
            }
            streams.unshare(&stream);
            if drop {
                self.remove(&mut streams, &stream);
            }
            stream.stopping.notify(usize::MAX);
            stream.changed.notify(usize::MAX);
        }
        std::mem::drop(streams);
        self.log_ops(ops);
    }

    /// Stops every follower (shutdown).
    pub fn stop_all(&self) {
        let all: Vec<Arc<LoggedStream>> = self.lock().by_token.values().cloned().collect();
        for stream in all {
            stream.state().stop = true;
            stream.stopping.notify(usize::MAX);
        }
    }
}

impl Streams {
    /// New GET requests no longer join `stream`.
    fn unshare(&mut self, stream: &LoggedStream) {
        if let Some(key) = &stream.key
            && self.gets.get(key) == Some(&stream.meta.token)
        {
            self.gets.remove(key);
        }
    }
}

impl Hub {
    fn remove(&self, streams: &mut Streams, stream: &LoggedStream) {
        let meta = &stream.meta;
        streams.by_token.remove(&meta.token);
        streams.unshare(stream);
        let state = stream.state();
        if state.stored {
            streams.logged -= 1;
            self.metrics.stream_closed(meta.kind);
        }
        self.metrics.log_bytes_add(-(state.log.bytes() as i64));
    }
}

/// What every client of a logged stream gets, whatever the upstream sent.
pub(super) fn default_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-cache"),
    );
    headers.insert(
        "x-accel-buffering",
        hyper::header::HeaderValue::from_static("no"),
    );
    headers
}

/// How long a proxy that is shutting down keeps retrying a log that fails.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The storage writer: a thread that writes whatever ops arrived while it
/// wrote the previous batch (a group commit), then lets clients see the
/// events of that batch. While the storage fails, it retries the batch
/// (with whatever arrived meanwhile, [compacted](compact)) every 200 ms; a
/// storage that [serves while failing](LogStorage::serves_while_failing)
/// has its events shown to clients meanwhile. At shutdown it gives up
/// after [`SHUTDOWN_GRACE`].
#[derive(Debug)]
pub(super) struct Writer {
    thread: std::thread::JoinHandle<()>,
}

/// In a fleet, drops from a backlog the changes of streams this instance
/// no longer writes (it lost their lease while the log was down): another
/// instance writes them now, and an old holder's events must not land in
/// its log.
fn fence(hub: &std::sync::Weak<Hub>, batch: &mut Vec<LogOp>) {
    let Some(hub) = hub.upgrade() else { return };
    if hub.fleet.is_none() {
        return;
    }
    let streams = hub.lock();
    batch.retain(|op| {
        let token = match op {
            LogOp::Open(meta) => meta.token,
            LogOp::Append { token, .. }
            | LogOp::Trim { token, .. }
            | LogOp::End { token }
            | LogOp::Drop { token } => *token,
        };
        streams
            .by_token
            .get(&token)
            .is_none_or(|stream| stream.state().writes)
    });
}

/// Ops the writer's batch keeps room for between writes.
const KEEP_WRITER_OPS: usize = 1 << 16;

impl Writer {
    fn start(
        mut storage: Box<dyn LogStorage>,
        queue: async_channel::Receiver<Vec<LogOp>>,
        hub: std::sync::Weak<Hub>,
        metrics: ProxyMetrics,
    ) -> Writer {
        let serve_while_failing = storage.serves_while_failing();
        let thread = std::thread::Builder::new()
            .name("tidemark-log".into())
            .spawn(move || {
                let mut batch = Vec::new();
                let mut failing = false;
                while let Ok(ops) = queue.recv_blocking() {
                    batch.extend(ops);
                    while let Ok(ops) = queue.try_recv() {
                        batch.extend(ops);
                    }
                    // The ops before this one have had their events shown.
                    let mut shown = 0;
                    let mut closed_at = None;
                    loop {
                        if failing {
                            if serve_while_failing {
                                show(&hub, &batch[shown..]);
                            }
                            fence(&hub, &mut batch);
                            compact(&mut batch);
                            if serve_while_failing {
                                shown = batch.len();
                            }
                        }
                        match storage.write(&batch) {
                            Ok(()) => {
                                metrics.log_written();
                                written(&hub, &batch);
                                if failing {
                                    set_failing(&hub, false);
                                    eprintln!(
                                        "tidemark: the log is writable again ({} changes held meanwhile written)",
                                        batch.len()
                                    );
                                    failing = false;
                                }
                                break;
                            }
                            Err(e) => {
                                metrics.log_write_failed();
                                if !failing {
                                    if serve_while_failing {
                                        eprintln!(
                                            "tidemark: cannot write the log ({e}); serving clients from memory meanwhile (what they get until it is written is lost if the proxy stops first), retrying"
                                        );
                                    } else {
                                        eprintln!(
                                            "tidemark: cannot write the log ({e}); clients wait for new events until it is written, retrying"
                                        );
                                    }
                                    failing = true;
                                    if serve_while_failing {
                                        set_failing(&hub, true);
                                    }
                                }
                                if queue.is_closed() {
                                    let since = *closed_at.get_or_insert_with(Instant::now);
                                    if since.elapsed() >= SHUTDOWN_GRACE {
                                        eprintln!(
                                            "tidemark: stopping with {} changes not written to the log ({e})",
                                            batch.len()
                                        );
                                        return;
                                    }
                                }
                                std::thread::sleep(Duration::from_millis(200));
                                while let Ok(ops) = queue.try_recv() {
                                    batch.extend(ops);
                                }
                            }
                        }
                    }
                    show(&hub, &batch[shown..]);
                    batch.clear();
                    // A backlog (a slow disk, an outage) does not pin its
                    // size for the proxy's life.
                    batch.shrink_to(KEEP_WRITER_OPS);
                }
            })
            .expect("spawn the log writer thread");
        Writer { thread }
    }

    /// Waits until every op handed over so far is written (the queue must
    /// be closed: every [`Hub`] dropped).
    pub fn finish(self) {
        let _ = self.thread.join();
    }
}

impl Hub {
    /// Closes the writer's queue: it writes what is queued and stops.
    pub fn close_log(&self) {
        if let Some(writer) = &self.writer {
            writer.close();
        }
    }
}

/// Forgets what a batch that is being retried need not write any more, so
/// that the backlog of a long outage stays within retention: a stream's
/// events below its newest `Trim` in the batch (retention dropped them),
/// its older `Trim`s, and every op of a stream that the batch drops but
/// the `Drop`.
fn compact(batch: &mut Vec<LogOp>) {
    const DROPPED: u64 = u64::MAX;
    let mut floors = TokenMap::<u64>::default();
    for op in batch.iter() {
        match op {
            LogOp::Trim { token, first_seq } => {
                let floor = floors.entry(*token).or_default();
                *floor = (*floor).max(*first_seq);
            }
            LogOp::Drop { token } => {
                floors.insert(*token, DROPPED);
            }
            _ => {}
        }
    }
    if floors.is_empty() {
        return;
    }
    batch.retain(|op| match op {
        LogOp::Open(meta) => floors.get(&meta.token) != Some(&DROPPED),
        LogOp::Append { token, record } => floors.get(token).is_none_or(|&f| record.seq >= f),
        LogOp::Trim { token, first_seq } => floors.get(token) == Some(first_seq),
        LogOp::End { token } => floors.get(token) != Some(&DROPPED),
        LogOp::Drop { .. } => true,
    });
}

/// Says whether the storage fails, for [`Hub::shows_at_once`].
fn set_failing(hub: &std::sync::Weak<Hub>, failing: bool) {
    if let Some(hub) = hub.upgrade() {
        hub.log_failing.store(failing, Ordering::Release);
    }
}

/// Lets clients see the events appended by `ops`.
/// Records how far storage has each stream of `ops`, which it just wrote.
fn written(hub: &std::sync::Weak<Hub>, ops: &[LogOp]) {
    let Some(hub) = hub.upgrade() else { return };
    if hub.fleet.is_none() {
        return;
    }
    let mut marks = TokenMap::default();
    for op in ops {
        if let LogOp::Append { token, record } = op {
            marks.insert(*token, record.seq);
        }
    }
    let streams = hub.lock();
    for (token, seq) in marks {
        if let Some(stream) = streams.by_token.get(&token) {
            let mut state = stream.state();
            state.stored_upto = state.stored_upto.max(seq);
        }
    }
}

fn show(hub: &std::sync::Weak<Hub>, ops: &[LogOp]) {
    let mut marks = TokenMap::default();
    for op in ops {
        if let LogOp::Append { token, record } = op {
            marks.insert(*token, record.seq);
        }
    }
    match hub.upgrade() {
        Some(hub) if !marks.is_empty() => hub.mark_durable(&marks),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_core::replay::LogRecord;

    fn append(token: StreamToken, seq: u64) -> LogOp {
        LogOp::Append {
            token,
            record: LogRecord::new(seq, Millis(seq), None, b"data: x\n\n"),
        }
    }

    #[test]
    fn compact_keeps_what_retention_keeps_and_a_drop_alone() {
        let [a, b, c] = [1, 2, 3].map(|n| StreamToken::from_bytes([n; 16]));
        let meta = |token| StreamMeta {
            token,
            kind: StreamKind::Get,
            target: "/".into(),
            identity: Identity::from_bytes([0; 16]),
            created: Millis(0),
        };
        let mut batch = vec![
            LogOp::Open(meta(a)),
            append(a, 1),
            append(a, 2),
            LogOp::Trim {
                token: a,
                first_seq: 2,
            },
            append(a, 3),
            LogOp::Trim {
                token: a,
                first_seq: 3,
            },
            append(b, 7),
            LogOp::Open(meta(c)),
            append(c, 1),
            LogOp::End { token: c },
            LogOp::Drop { token: c },
        ];
        compact(&mut batch);
        assert_eq!(
            batch,
            vec![
                LogOp::Open(meta(a)),
                append(a, 3),
                LogOp::Trim {
                    token: a,
                    first_seq: 3,
                },
                append(b, 7),
                LogOp::Drop { token: c },
            ]
        );
        let unchanged = vec![append(b, 8), LogOp::End { token: b }];
        let mut copy = unchanged.clone();
        compact(&mut copy);
        assert_eq!(copy, unchanged);
    }
}
