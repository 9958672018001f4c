//! The persistence worker: one future that persists the cursors of all
//! streams.
//!
//! # How it works
//!
//! Trackers commit into their stream's slot; the first commit into a clean
//! slot queues the slot on an unbounded `async-channel` (see `slot.rs`), so the
//! queue never holds more messages than there are live streams and a tracker
//! never waits. The worker collects queued slots and, at most once per flush
//! interval, snapshots every one of them (the newest cursor of each stream,
//! however many commits happened in between) and writes them with a single
//! [`Store::save_with_windows`], together with each stream's window entries
//! not yet written (for a store that keeps windows; see `saved_window.rs`).
//! A stream that goes quiet is still flushed: its slot stays queued until the
//! next flush takes it.
//!
//! A failed batch puts each of its cursors into a retry min-heap ordered by
//! due time, with capped exponential backoff and jitter per stream. A newer
//! cursor for the same stream replaces a pending retry (and inherits its
//! attempt count), so an older value is never written after a newer one. A
//! retry writes its slot's newest cursor, with the window as of that cursor;
//! window entries stay in the slot until a write of them succeeds.
//! Retries ride in the same batches as fresh cursors, and batches stay at
//! least one flush interval apart, so a store outage costs at most one write
//! attempt per interval. The worker never gives up on the newest cursor while
//! it runs; failures show in [`WorkerStats`].
//!
//! # Driving contract
//!
//! The scheduling logic is synchronous and takes `now` as an argument; the
//! async [`PersistenceWorker::run`] only drives it:
//!
//! 1. wait for the next message or for the scheduler's next deadline
//!    (`poll_timeout`: the flush time when slots are queued, the earliest retry
//!    otherwise, never earlier than one interval after the previous batch);
//! 2. hand every queued message to the scheduler (`on_dirty`);
//! 3. take the batch that is due (`poll_batch(now)`), await `save_batch`, and
//!    report the result (`on_result(batch, result, now)`); repeat from 1.
//!
//! Control messages come through the same channel and are handled between
//! batches, so they are ordered with writes: [`WorkerHandle::flush`] writes
//! everything now, `Registry::remove` deletes a stream's cursor after any
//! pending write of it, and [`WorkerHandle::shutdown`] stops intake, writes
//! everything, retries until its deadline and resolves as soon as nothing is
//! left. When every handle and tracker is dropped, the worker shuts down by
//! itself with [`WorkerConfig::shutdown_grace`] as the deadline.
//!
//! The host spawns [`PersistenceWorker::run`]; the core never spawns.

use crate::backoff::{Backoff, Rng, random_seed};
use crate::clock::{Clock, Millis};
use crate::cursor::{Cursor, StreamKey};
use crate::saved_window::WindowChange;
use crate::slot::Slot;
use crate::store::{Store, StoreError};
use core::fmt;
use core::future::Future;
use futures::future::{Either, select};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::pin::pin;
use std::sync::{Arc, Mutex};

/// Settings of the persistence worker.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// The least time between two writes to the store (default 250 ms). A
    /// crash redelivers at most the events of about this long.
    pub flush_interval: Millis,
    /// Backoff of failed writes (default 250 ms doubling to 30 s).
    pub retry: Backoff,
    /// Deadline of the implicit shutdown when every handle is dropped
    /// (default 5 s).
    pub shutdown_grace: Millis,
    /// Seed of the retry jitter. Default: random per process.
    pub seed: u64,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            flush_interval: Millis(250),
            retry: Backoff {
                initial: Millis(250),
                max: Millis::from_secs(30),
            },
            shutdown_grace: Millis::from_secs(5),
            seed: random_seed(),
        }
    }
}

/// Counters of the worker, for monitoring a store outage or a slow store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkerStats {
    /// Cursors written successfully.
    pub cursors_written: u64,
    /// Successful `save_batch` calls.
    pub batches: u64,
    /// Failed `save_batch` calls.
    pub failed_batches: u64,
    /// Streams whose newest cursor waits for a retry.
    pub retries_pending: u64,
    /// Failed batches since the last successful one.
    pub consecutive_failures: u64,
    /// The most recent store error (kept after recovery, for diagnosis).
    pub last_error: Option<StoreError>,
    /// Messages waiting in the worker's queue; never more than the number of
    /// live streams plus pending control requests.
    pub queued_messages: usize,
}

/// The outcome of [`WorkerHandle::flush`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlushReport {
    /// Cursors written by this flush.
    pub written: usize,
    /// Streams still waiting for a retry afterwards.
    pub retries_pending: usize,
    /// The error of the write, if it failed.
    pub error: Option<StoreError>,
}

/// The outcome of a shutdown: what was written and what was not.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Cursors written during the shutdown.
    pub written: usize,
    /// Newest cursors that could not be written before the deadline.
    pub unwritten: Vec<Cursor>,
    /// The last store error seen during the shutdown.
    pub last_error: Option<StoreError>,
}

impl ShutdownReport {
    /// Whether every cursor was written.
    pub fn is_complete(&self) -> bool {
        self.unwritten.is_empty()
    }
}

/// The worker is no longer running, so the request cannot be served.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct WorkerStopped;

impl fmt::Display for WorkerStopped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the persistence worker has stopped")
    }
}

impl std::error::Error for WorkerStopped {}

type Reply<T> = async_channel::Sender<T>;

pub(crate) enum Msg {
    Dirty(Arc<Slot>),
    Flush(Reply<FlushReport>),
    Delete(StreamKey, Reply<Result<(), StoreError>>),
    Shutdown(Millis, Reply<ShutdownReport>),
}

#[derive(Default)]
struct Shared {
    stats: Mutex<WorkerStats>,
    final_report: Mutex<Option<ShutdownReport>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A cloneable handle to a running [`PersistenceWorker`].
#[derive(Clone)]
pub struct WorkerHandle {
    pub(crate) tx: async_channel::Sender<Msg>,
    stop: async_channel::Sender<Millis>,
    shared: Arc<Shared>,
}

impl fmt::Debug for WorkerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerHandle")
            .field("stopped", &self.is_stopped())
            .field("stats", &self.stats())
            .finish()
    }
}

impl WorkerHandle {
    /// Writes every dirty cursor and every pending retry now, ignoring the
    /// flush interval (for `pagehide`, or before a planned restart).
    pub async fn flush(&self) -> Result<FlushReport, WorkerStopped> {
        let (reply, answer) = async_channel::bounded(1);
        self.tx
            .send(Msg::Flush(reply))
            .await
            .map_err(|_| WorkerStopped)?;
        answer.recv().await.map_err(|_| WorkerStopped)
    }

    /// Stops intake, writes everything, retries failed writes until
    /// `deadline`, and resolves with the report as soon as nothing is left
    /// (or at the deadline). Calling it again, or after the worker stopped,
    /// returns the same report.
    pub async fn shutdown(&self, deadline: Millis) -> Result<ShutdownReport, WorkerStopped> {
        let (reply, answer) = async_channel::bounded(1);
        // The signal bounds a store call already in progress by the deadline;
        // the message, queued behind every earlier commit, starts the shutdown.
        let _ = self.stop.try_send(deadline);
        if self.tx.send(Msg::Shutdown(deadline, reply)).await.is_ok()
            && let Ok(report) = answer.recv().await
        {
            return Ok(report);
        }
        lock(&self.shared.final_report).clone().ok_or(WorkerStopped)
    }

    /// Deletes the stored cursor of `key`, after any pending write of it.
    pub(crate) async fn delete(&self, key: StreamKey) -> Result<(), DeleteError> {
        let (reply, answer) = async_channel::bounded(1);
        self.tx
            .send(Msg::Delete(key, reply))
            .await
            .map_err(|_| DeleteError::Stopped)?;
        answer
            .recv()
            .await
            .map_err(|_| DeleteError::Stopped)?
            .map_err(DeleteError::Store)
    }

    /// A snapshot of the worker's counters.
    pub fn stats(&self) -> WorkerStats {
        let mut stats = lock(&self.shared.stats).clone();
        stats.queued_messages = self.tx.len();
        stats
    }

    /// Whether the worker has stopped taking cursors.
    pub fn is_stopped(&self) -> bool {
        self.tx.is_closed()
    }
}

pub(crate) enum DeleteError {
    Stopped,
    Store(StoreError),
}

struct Retry {
    cursor: Cursor,
    slot: Arc<Slot>,
    attempts: u32,
    generation: u64,
}

/// One `save_batch` worth of cursors, with the slot and attempt count of
/// each. Holding the slots keeps a closed stream's slot alive until its
/// cursor is written (see `slot.rs`).
#[derive(Default)]
pub(crate) struct Batch {
    pub(crate) cursors: Vec<Cursor>,
    slots: Vec<Arc<Slot>>,
    attempts: Vec<u32>,
    /// The unwritten window change of each entry, taken with its cursor.
    window_of: Vec<Option<WindowChange>>,
    /// The window changes of the batch, and the index in `slots` of each.
    pub(crate) windows: Vec<WindowChange>,
    window_slots: Vec<usize>,
}

impl Batch {
    /// Lines the window changes up for the store.
    fn seal(&mut self) {
        for (i, change) in std::mem::take(&mut self.window_of).into_iter().enumerate() {
            if let Some(change) = change {
                self.windows.push(change);
                self.window_slots.push(i);
            }
        }
    }

    /// Tells each stream that its window change is written.
    fn confirm_windows(&self) {
        for (change, &i) in self.windows.iter().zip(&self.window_slots) {
            self.slots[i].confirm_window(change);
        }
    }

    fn push(
        &mut self,
        positions: &mut HashMap<StreamKey, usize>,
        (cursor, window): (Cursor, Option<WindowChange>),
        slot: Arc<Slot>,
        attempts: u32,
    ) {
        match positions.get(&cursor.key) {
            Some(&i) if self.cursors[i].seq >= cursor.seq => {}
            Some(&i) => {
                self.cursors[i] = cursor;
                self.window_of[i] = window;
                self.slots[i] = slot;
                self.attempts[i] = self.attempts[i].max(attempts);
            }
            None => {
                positions.insert(cursor.key.clone(), self.cursors.len());
                self.cursors.push(cursor);
                self.window_of.push(window);
                self.slots.push(slot);
                self.attempts.push(attempts);
            }
        }
    }
}

/// The synchronous coalescing and retry logic; see the module docs.
pub(crate) struct Scheduler {
    interval: Millis,
    backoff: Backoff,
    rng: Rng,
    dirty: Vec<Arc<Slot>>,
    retries: HashMap<StreamKey, Retry>,
    heap: BinaryHeap<Reverse<(Millis, u64, StreamKey)>>,
    next_gen: u64,
    last_batch: Option<Millis>,
}

impl Scheduler {
    pub(crate) fn new(config: &WorkerConfig) -> Self {
        Scheduler {
            interval: config.flush_interval,
            backoff: config.retry,
            rng: Rng::new(config.seed),
            dirty: Vec::new(),
            retries: HashMap::new(),
            heap: BinaryHeap::new(),
            next_gen: 0,
            last_batch: None,
        }
    }

    pub(crate) fn on_dirty(&mut self, slot: Arc<Slot>) {
        self.dirty.push(slot);
    }

    /// The due time of the earliest live retry, dropping stale heap entries.
    fn next_retry_due(&mut self) -> Option<Millis> {
        while let Some(Reverse((due, generation, key))) = self.heap.peek() {
            if self
                .retries
                .get(key)
                .is_some_and(|r| r.generation == *generation)
            {
                return Some(*due);
            }
            self.heap.pop();
        }
        None
    }

    /// When the next batch is due, if there is anything to write.
    pub(crate) fn poll_timeout(&mut self) -> Option<Millis> {
        let wanted = if self.dirty.is_empty() {
            self.next_retry_due()?
        } else {
            Millis::ZERO
        };
        let earliest = self
            .last_batch
            .map_or(Millis::ZERO, |t| t.saturating_add(self.interval));
        Some(wanted.max(earliest))
    }

    /// The batch due at `now`, if any.
    pub(crate) fn poll_batch(&mut self, now: Millis) -> Option<Batch> {
        match self.poll_timeout() {
            Some(due) if due <= now => self.take(now, false),
            _ => None,
        }
    }

    /// Everything queued plus the retries that are due at `now` (or all of
    /// them with `all_retries`), ignoring the flush interval.
    pub(crate) fn take(&mut self, now: Millis, all_retries: bool) -> Option<Batch> {
        let mut batch = Batch::default();
        let mut positions = HashMap::new();
        for slot in std::mem::take(&mut self.dirty) {
            let taken = slot.snapshot();
            let attempts = self.retries.remove(&taken.0.key).map_or(0, |r| r.attempts);
            batch.push(&mut positions, taken, slot, attempts);
        }
        while let Some(due) = self.next_retry_due() {
            if due > now && !all_retries {
                break;
            }
            let Reverse((_, _, key)) = self.heap.pop().expect("peeked");
            let retry = self.retries.remove(&key).expect("live entry");
            // The slot's newest cursor (the failed one, or a newer commit
            // whose message is still on its way), with the window as of it.
            let taken = retry.slot.peek_with_window();
            let taken = if taken.0.seq >= retry.cursor.seq {
                taken
            } else {
                (retry.cursor, None)
            };
            batch.push(&mut positions, taken, retry.slot, retry.attempts);
        }
        if batch.cursors.is_empty() {
            return None;
        }
        batch.seal();
        self.last_batch = Some(now);
        Some(batch)
    }

    /// Records the outcome of writing `batch`: failed cursors are scheduled
    /// for retry unless a newer cursor of their stream is already pending.
    pub(crate) fn on_result(&mut self, batch: Batch, result: &Result<(), StoreError>, now: Millis) {
        let Err(error) = result else {
            batch.confirm_windows();
            return;
        };
        let entries = batch
            .cursors
            .into_iter()
            .zip(batch.slots)
            .zip(batch.attempts);
        for ((cursor, slot), attempts) in entries {
            if self
                .retries
                .get(&cursor.key)
                .is_some_and(|r| r.cursor.seq >= cursor.seq)
            {
                continue;
            }
            let attempts = attempts.saturating_add(1);
            let delay = if error.is_transient() {
                self.backoff.delay(attempts, &mut self.rng)
            } else {
                self.backoff.max
            };
            let due = now.saturating_add(delay);
            let generation = self.next_gen;
            self.next_gen += 1;
            self.heap
                .push(Reverse((due, generation, cursor.key.clone())));
            self.retries.insert(
                cursor.key.clone(),
                Retry {
                    cursor,
                    slot,
                    attempts,
                    generation,
                },
            );
        }
    }

    /// Drops everything pending for `key` (its stream is being deleted).
    pub(crate) fn forget(&mut self, key: &StreamKey) {
        self.retries.remove(key);
        self.dirty.retain(|slot| &slot.key != key);
    }

    pub(crate) fn retries_pending(&self) -> usize {
        self.retries.len()
    }

    pub(crate) fn is_idle(&self) -> bool {
        self.dirty.is_empty() && self.retries.is_empty()
    }

    /// The cursors that are still waiting to be written.
    fn pending(&mut self) -> Vec<Cursor> {
        self.take(Millis::MAX, true)
            .map(|b| b.cursors)
            .unwrap_or_default()
    }
}

/// The future that persists the cursors of every stream; see the
/// [module docs](self).
pub struct PersistenceWorker<S, C> {
    store: S,
    clock: C,
    rx: async_channel::Receiver<Msg>,
    stop: async_channel::Receiver<Millis>,
    deadline: Option<Millis>,
    sched: Scheduler,
    shared: Arc<Shared>,
    grace: Millis,
}

impl<S: fmt::Debug, C: fmt::Debug> fmt::Debug for PersistenceWorker<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PersistenceWorker")
            .field("store", &self.store)
            .field("clock", &self.clock)
            .field("flush_interval", &self.sched.interval)
            .field("queued_slots", &self.sched.dirty.len())
            .field("retries_pending", &self.sched.retries.len())
            .field("shutdown_deadline", &self.deadline)
            .field("shutdown_grace", &self.grace)
            .finish_non_exhaustive()
    }
}

impl<S: Store, C: Clock> PersistenceWorker<S, C> {
    /// A worker writing to `store` on `clock`'s time, and a handle to it.
    /// Spawn [`run`](Self::run) on the host's executor.
    pub fn with_clock(store: S, clock: C, config: WorkerConfig) -> (Self, WorkerHandle) {
        let (tx, rx) = async_channel::unbounded();
        let (stop_tx, stop) = async_channel::bounded(1);
        let shared = Arc::new(Shared::default());
        let worker = PersistenceWorker {
            store,
            clock,
            rx,
            stop,
            deadline: None,
            sched: Scheduler::new(&config),
            shared: shared.clone(),
            grace: config.shutdown_grace,
        };
        (
            worker,
            WorkerHandle {
                tx,
                stop: stop_tx,
                shared,
            },
        )
    }

    /// Runs until shut down, then resolves with the shutdown report.
    pub async fn run(mut self) -> ShutdownReport {
        let mut shutdowns = Vec::new();
        let deadline = loop {
            let msg = match self.sched.poll_timeout() {
                Some(due) if due <= self.clock.now() => None,
                Some(due) => {
                    let recv = pin!(self.rx.recv());
                    let sleep = pin!(self.clock.sleep_until(due));
                    match select(recv, sleep).await {
                        Either::Left((msg, _)) => Some(msg),
                        Either::Right(((), _)) => None,
                    }
                }
                None => Some(self.rx.recv().await),
            };
            let mut deadline = match msg {
                Some(Ok(msg)) => self.handle(msg, &mut shutdowns).await,
                Some(Err(_closed)) => Some(self.clock.now().saturating_add(self.grace)),
                None => None,
            };
            while deadline.is_none() {
                match self.rx.try_recv() {
                    Ok(msg) => deadline = self.handle(msg, &mut shutdowns).await,
                    Err(_) => break,
                }
            }
            if let Some(deadline) = deadline {
                break *self.deadline.get_or_insert(deadline);
            }
            let now = self.clock.now();
            if let Some(batch) = self.sched.poll_batch(now) {
                self.write(batch).await;
            }
        };
        let report = self.shut_down(deadline, &mut shutdowns).await;
        *lock(&self.shared.final_report) = Some(report.clone());
        for reply in shutdowns {
            let _ = reply.try_send(report.clone());
        }
        report
    }

    /// Handles one message; returns the deadline when it asks to shut down.
    async fn handle(
        &mut self,
        msg: Msg,
        shutdowns: &mut Vec<Reply<ShutdownReport>>,
    ) -> Option<Millis> {
        match msg {
            Msg::Dirty(slot) => self.sched.on_dirty(slot),
            Msg::Flush(reply) => {
                let now = self.clock.now();
                let (written, error) = match self.sched.take(now, true) {
                    Some(batch) => self.write(batch).await,
                    None => (0, None),
                };
                let _ = reply.try_send(FlushReport {
                    written,
                    retries_pending: self.sched.retries_pending(),
                    error,
                });
            }
            Msg::Delete(key, reply) => {
                self.sched.forget(&key);
                let delete = self.store.delete(&key);
                let result = bounded(delete, &self.clock, &self.stop, &mut self.deadline)
                    .await
                    .unwrap_or_else(|| Err(cut_off()));
                let _ = reply.try_send(result);
            }
            Msg::Shutdown(deadline, reply) => {
                shutdowns.push(reply);
                return Some(deadline);
            }
        }
        None
    }

    /// Writes one batch and records the outcome; returns how many cursors
    /// were written and the error, if any.
    async fn write(&mut self, batch: Batch) -> (usize, Option<StoreError>) {
        let save = self.store.save_with_windows(&batch.cursors, &batch.windows);
        let result = bounded(save, &self.clock, &self.stop, &mut self.deadline)
            .await
            .unwrap_or_else(|| Err(cut_off()));
        let n = batch.cursors.len();
        self.record(batch, result, self.clock.now())
            .map_or((n, None), |e| (0, Some(e)))
    }

    fn record(
        &mut self,
        batch: Batch,
        result: Result<(), StoreError>,
        now: Millis,
    ) -> Option<StoreError> {
        let n = batch.cursors.len() as u64;
        self.sched.on_result(batch, &result, now);
        let mut stats = lock(&self.shared.stats);
        match &result {
            Ok(()) => {
                stats.cursors_written += n;
                stats.batches += 1;
                stats.consecutive_failures = 0;
            }
            Err(error) => {
                stats.failed_batches += 1;
                stats.consecutive_failures += 1;
                stats.last_error = Some(error.clone());
            }
        }
        stats.retries_pending = self.sched.retries_pending() as u64;
        result.err()
    }

    async fn shut_down(
        &mut self,
        deadline: Millis,
        shutdowns: &mut Vec<Reply<ShutdownReport>>,
    ) -> ShutdownReport {
        self.rx.close();
        while let Ok(msg) = self.rx.try_recv() {
            // Further shutdown requests only add a reply; the first deadline holds.
            let _ = self.handle(msg, shutdowns).await;
        }
        let mut report = ShutdownReport::default();
        let mut first = true;
        loop {
            let now = self.clock.now();
            let last_try = now >= deadline;
            if let Some(batch) = self.sched.take(now, first || last_try) {
                let n = batch.cursors.len();
                let save = self.store.save_with_windows(&batch.cursors, &batch.windows);
                let outcome = bounded(save, &self.clock, &self.stop, &mut self.deadline).await;
                match outcome {
                    Some(result) => {
                        let ok = result.is_ok();
                        if let Some(error) = self.record(batch, result, self.clock.now()) {
                            report.last_error = Some(error);
                        }
                        if ok {
                            report.written += n;
                        }
                    }
                    None => {
                        report.unwritten.extend(batch.cursors);
                        report.last_error = Some(cut_off());
                        break;
                    }
                }
            }
            first = false;
            if self.sched.is_idle() || last_try {
                break;
            }
            let wake = self
                .sched
                .next_retry_due()
                .unwrap_or(deadline)
                .min(deadline);
            self.clock.sleep_until(wake).await;
        }
        report.unwritten.extend(self.sched.pending());
        report
    }
}

fn cut_off() -> StoreError {
    StoreError::Unavailable("store did not answer before the shutdown deadline".into())
}

/// Awaits a store call, but not past the shutdown deadline once one is known,
/// including one asked for while the call is in progress. `None` when the
/// deadline cut the call off (it may or may not have taken effect).
async fn bounded<F: Future, C: Clock>(
    call: F,
    clock: &C,
    stop: &async_channel::Receiver<Millis>,
    deadline: &mut Option<Millis>,
) -> Option<F::Output> {
    let mut call = pin!(call);
    if deadline.is_none() {
        match select(call.as_mut(), pin!(stop.recv())).await {
            Either::Left((out, _)) => return Some(out),
            Either::Right((Ok(asked), _)) => *deadline = Some(asked),
            Either::Right((Err(_), _)) => return Some(call.await),
        }
    }
    let timeout = pin!(clock.sleep_until(deadline.unwrap_or(Millis::MAX)));
    match select(call, timeout).await {
        Either::Left((out, _)) => Some(out),
        Either::Right(((), _)) => None,
    }
}

#[cfg(test)]
mod tests;
