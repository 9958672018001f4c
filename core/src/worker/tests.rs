use super::*;
use crate::backoff::Backoff;
use crate::clock::ManualClock;
use crate::flaky::{FlakyConfig, FlakyStore};
use crate::registry::{Config, Registry, RegistryError, persistence};
use crate::store::MemStore;
use crate::tracker::{EventTracker, TrackerConfig};
use futures::executor::LocalPool;
use futures::task::LocalSpawnExt;
use proptest::prelude::*;
use std::cell::RefCell;
use std::collections::HashSet;
use std::rc::Rc;

fn config() -> WorkerConfig {
    WorkerConfig {
        flush_interval: Millis(250),
        retry: Backoff {
            initial: Millis(100),
            max: Millis(1000),
        },
        shutdown_grace: Millis(5000),
        seed: 1,
    }
}

fn slot(name: &str) -> Arc<Slot> {
    Arc::new(Slot::new(StreamKey::new("s", name)))
}

fn ids(batch: &Batch) -> Vec<(String, u64)> {
    batch
        .cursors
        .iter()
        .map(|c| (c.last_event_id.clone(), c.seq))
        .collect()
}

fn down() -> Result<(), StoreError> {
    Err(StoreError::Unavailable("down".into()))
}

#[test]
fn first_write_is_immediate_then_at_most_once_per_interval() {
    let mut s = Scheduler::new(&config());
    let a = slot("a");
    assert!(a.publish("1", 1, Millis(0), None));
    s.on_dirty(a.clone());
    assert_eq!(s.poll_timeout(), Some(Millis(0)));
    let batch = s.poll_batch(Millis(0)).unwrap();
    assert_eq!(ids(&batch), [("1".to_string(), 1)]);
    s.on_result(batch, &Ok(()), Millis(0));
    assert_eq!(s.poll_timeout(), None, "nothing left to write");

    assert!(a.publish("2", 2, Millis(10), None));
    s.on_dirty(a.clone());
    assert!(
        !a.publish("3", 3, Millis(20), None),
        "a queued slot is not queued twice"
    );
    assert_eq!(s.poll_timeout(), Some(Millis(250)));
    assert!(s.poll_batch(Millis(249)).is_none());
    let batch = s.poll_batch(Millis(250)).unwrap();
    assert_eq!(
        ids(&batch),
        [("3".to_string(), 3)],
        "coalesced to the newest"
    );
    assert!(
        a.publish("4", 4, Millis(260), None),
        "the snapshot cleaned the slot"
    );
}

#[test]
fn failed_write_backs_off_and_newer_cursor_replaces_the_retry() {
    let mut s = Scheduler::new(&config());
    let a = slot("a");
    a.publish("1", 1, Millis(0), None);
    s.on_dirty(a.clone());
    let batch = s.poll_batch(Millis(0)).unwrap();
    s.on_result(batch, &down(), Millis(0));
    assert_eq!(s.retries_pending(), 1);
    assert_eq!(
        s.poll_timeout(),
        Some(Millis(250)),
        "the retry (due within 100 ms) waits for the flush interval"
    );

    a.publish("2", 2, Millis(100), None);
    s.on_dirty(a.clone());
    let batch = s.poll_batch(Millis(250)).unwrap();
    assert_eq!(ids(&batch), [("2".to_string(), 2)], "only the newer cursor");
    assert_eq!(batch.attempts, [1], "it inherits the attempt count");
    s.on_result(batch, &down(), Millis(250));
    let due = s.next_retry_due().unwrap();
    assert!(
        (Millis(350)..=Millis(450)).contains(&due),
        "second attempt backs off 100..=200 ms, got {due}"
    );
    assert_eq!(s.poll_timeout(), Some(Millis(500)));
    let batch = s.poll_batch(Millis(500)).unwrap();
    assert_eq!(ids(&batch), [("2".to_string(), 2)]);
    s.on_result(batch, &Ok(()), Millis(500));
    assert!(s.is_idle());
}

#[test]
fn permanent_errors_retry_at_the_maximum_delay() {
    let mut s = Scheduler::new(&config());
    let a = slot("a");
    a.publish("1", 1, Millis(0), None);
    s.on_dirty(a);
    let batch = s.poll_batch(Millis(0)).unwrap();
    let corrupt = Err(StoreError::Corrupt {
        what: "f".into(),
        detail: "bad".into(),
    });
    s.on_result(batch, &corrupt, Millis(0));
    assert_eq!(s.next_retry_due(), Some(Millis(1000)));
}

#[test]
fn stale_failure_never_replaces_a_newer_retry() {
    let mut s = Scheduler::new(&config());
    let a = slot("a");
    a.publish("2", 2, Millis(0), None);
    s.on_dirty(a.clone());
    let newer = s.take(Millis(0), true).unwrap();
    s.on_result(newer, &down(), Millis(0));
    let mut older = Batch::default();
    older.push(
        &mut HashMap::new(),
        (
            Cursor {
                key: a.key.clone(),
                last_event_id: "1".into(),
                seq: 1,
                at: Millis(0),
            },
            None,
        ),
        a.clone(),
        0,
    );
    s.on_result(older, &down(), Millis(0));
    assert_eq!(s.retries[&a.key].cursor.seq, 2);
}

#[test]
fn forget_drops_pending_work_of_a_stream() {
    let mut s = Scheduler::new(&config());
    let (a, b) = (slot("a"), slot("b"));
    a.publish("1", 1, Millis(0), None);
    b.publish("1", 1, Millis(0), None);
    s.on_dirty(a.clone());
    s.on_dirty(b.clone());
    let batch = s.take(Millis(0), true).unwrap();
    s.on_result(batch, &down(), Millis(0));
    a.publish("2", 2, Millis(1), None);
    s.on_dirty(a.clone());
    s.forget(&a.key);
    let batch = s.take(Millis(0), true).unwrap();
    assert_eq!(batch.cursors.len(), 1);
    assert_eq!(batch.cursors[0].key, b.key);
}

#[derive(Debug, Clone)]
enum Op {
    Commit(usize),
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0usize..4).prop_map(Op::Commit),
        2 => (1u64..400).prop_map(Op::Advance),
    ]
}

proptest! {
    /// Against random commits, store failures and lost acknowledgements:
    /// batches hold one cursor per stream; every retry due by `now` goes out,
    /// earliest first, and none before its time; successful writes of a
    /// stream never go backwards; and once the store recovers it holds the
    /// newest cursor of every stream.
    #[test]
    fn scheduler_invariants(
        ops in prop::collection::vec(op(), 1..200),
        outcomes in prop::collection::vec(0u8..4, 200),
    ) {
        let mut s = Scheduler::new(&config());
        let slots: Vec<_> = (0..4).map(|i| slot(&i.to_string())).collect();
        let mut newest = [0u64; 4];
        let mut stored: HashMap<StreamKey, u64> = HashMap::new();
        let mut now = Millis(0);
        let mut outcomes = outcomes.into_iter().cycle();
        let mut last_batch: Option<Millis> = None;
        let mut drive = |s: &mut Scheduler, now: Millis, always_ok: bool, stored: &mut HashMap<StreamKey, u64>| -> Result<(), TestCaseError> {
            let due_before: HashMap<StreamKey, Millis> = s
                .retries
                .iter()
                .filter(|(k, _)| !s.dirty.iter().any(|d| &d.key == *k))
                .map(|(k, r)| {
                    let due = s.heap.iter().find(|Reverse((_, g, _))| *g == r.generation).unwrap().0.0;
                    (k.clone(), due)
                })
                .collect();
            while let Some(batch) = s.poll_batch(now) {
                if let Some(last) = last_batch {
                    prop_assert!(now >= last + Millis(250), "batches at least one interval apart");
                }
                last_batch = Some(now);
                let keys: HashSet<_> = batch.cursors.iter().map(|c| c.key.clone()).collect();
                prop_assert_eq!(keys.len(), batch.cursors.len(), "one cursor per stream");
                let mut last_due = Millis::ZERO;
                for c in &batch.cursors {
                    if let Some(&due) = due_before.get(&c.key) {
                        prop_assert!(due <= now, "retry fired before it was due");
                        prop_assert!(due >= last_due, "retries in due order");
                        last_due = due;
                    }
                }
                for (k, due) in &due_before {
                    if *due <= now {
                        prop_assert!(keys.contains(k), "a due retry was left out");
                    }
                }
                let outcome = if always_ok { 0 } else { outcomes.next().unwrap() };
                let result = if outcome >= 2 { down() } else { Ok(()) };
                if outcome != 2 {
                    // Written (outcome 3 is a lost acknowledgement).
                    for c in &batch.cursors {
                        let prev = stored.insert(c.key.clone(), c.seq).unwrap_or(0);
                        prop_assert!(c.seq >= prev, "a stream's write went backwards");
                    }
                }
                s.on_result(batch, &result, now);
            }
            Ok(())
        };
        for op in ops {
            match op {
                Op::Commit(i) => {
                    newest[i] += 1;
                    if slots[i].publish(&newest[i].to_string(), newest[i], now, None) {
                        s.on_dirty(slots[i].clone());
                    }
                }
                Op::Advance(dt) => {
                    now = now + Millis(dt);
                    drive(&mut s, now, false, &mut stored)?;
                }
            }
        }
        for _ in 0..20 {
            now = now + Millis(1000);
            drive(&mut s, now, true, &mut stored)?;
        }
        prop_assert!(s.is_idle());
        for (i, slot) in slots.iter().enumerate() {
            prop_assert_eq!(stored.get(&slot.key).copied().unwrap_or(0), newest[i]);
        }
    }
}

type Flaky = Rc<FlakyStore<Rc<MemStore>, ManualClock>>;

struct Env {
    pool: LocalPool,
    clock: ManualClock,
    mem: Rc<MemStore>,
    store: Flaky,
    registry: Registry<Flaky>,
    report: Rc<RefCell<Option<ShutdownReport>>>,
}

fn env(flaky: FlakyConfig) -> Env {
    let clock = ManualClock::new();
    let mem = Rc::new(MemStore::new());
    let store = Rc::new(FlakyStore::new(mem.clone(), clock.clone(), flaky));
    let (registry, worker) = persistence(
        store.clone(),
        clock.clone(),
        Config {
            tracker: TrackerConfig::default(),
            worker: config(),
        },
    );
    let pool = LocalPool::new();
    let report = Rc::new(RefCell::new(None));
    let out = report.clone();
    pool.spawner()
        .spawn_local(async move {
            *out.borrow_mut() = Some(worker.run().await);
        })
        .unwrap();
    Env {
        pool,
        clock,
        mem,
        store,
        registry,
        report,
    }
}

impl Env {
    fn open(&mut self, name: &str) -> EventTracker {
        self.pool
            .run_until(self.registry.open(StreamKey::new("s", name)))
            .unwrap()
    }

    fn deliver(&mut self, tracker: &mut EventTracker, id: &str) {
        if tracker.observe(Some(id), self.clock.now()).is_fresh() {
            tracker.commit();
        }
        self.pool.run_until_stalled();
    }

    fn advance(&mut self, ms: u64) {
        self.clock.advance(Millis(ms));
        self.pool.run_until_stalled();
    }

    fn stored(&self, name: &str) -> Option<String> {
        self.mem
            .get(&StreamKey::new("s", name))
            .map(|c| c.last_event_id)
    }

    /// Starts a shutdown and returns a cell that fills with its report.
    fn start_shutdown(&mut self, deadline: Millis) -> Rc<RefCell<Option<ShutdownReport>>> {
        let cell = Rc::new(RefCell::new(None));
        let out = cell.clone();
        let handle = self.registry.worker().clone();
        self.pool
            .spawner()
            .spawn_local(async move {
                *out.borrow_mut() = Some(handle.shutdown(deadline).await.unwrap());
            })
            .unwrap();
        self.pool.run_until_stalled();
        cell
    }
}

#[test]
fn a_quiet_stream_is_still_flushed() {
    let mut e = env(FlakyConfig::default());
    let mut t = e.open("a");
    e.deliver(&mut t, "1");
    assert_eq!(e.stored("a").as_deref(), Some("1"));
    e.deliver(&mut t, "2");
    assert_eq!(e.stored("a").as_deref(), Some("1"), "coalescing window");
    e.advance(250);
    assert_eq!(
        e.stored("a").as_deref(),
        Some("2"),
        "flushed with no new event"
    );
    assert_eq!(e.mem.batches(), 2);
}

#[test]
fn many_streams_share_one_write_per_interval() {
    let mut e = env(FlakyConfig::default());
    let mut trackers: Vec<_> = (0..20).map(|i| e.open(&i.to_string())).collect();
    for round in 0..50 {
        for t in &mut trackers {
            let _ = t.observe(Some(&round.to_string()), e.clock.now());
            t.commit();
        }
        e.advance(10);
    }
    e.advance(250);
    // 500 ms of events: one immediate write, then one per 250 ms.
    assert!(e.mem.batches() <= 4, "batches: {}", e.mem.batches());
    for i in 0..20 {
        assert_eq!(e.stored(&i.to_string()).as_deref(), Some("49"));
    }
}

#[test]
fn queued_messages_never_exceed_live_streams() {
    let mut e = env(FlakyConfig::default());
    let mut trackers: Vec<_> = (0..50).map(|i| e.open(&i.to_string())).collect();
    for n in 0..100 {
        for t in &mut trackers {
            let _ = t.observe(Some(&n.to_string()), e.clock.now());
            t.commit();
        }
    }
    assert_eq!(e.registry.stats().worker.queued_messages, 50);
}

#[test]
fn store_outage_never_blocks_and_shows_in_stats() {
    let mut e = env(FlakyConfig::default());
    let mut t = e.open("a");
    e.store.set_down(true);
    for n in 1..=2000 {
        e.deliver(&mut t, &n.to_string());
        if n % 100 == 0 {
            e.advance(50);
        }
    }
    let stats = e.registry.stats();
    assert_eq!(stats.events_observed, 2000);
    assert_eq!(stats.worker.retries_pending, 1);
    assert!(stats.worker.consecutive_failures >= 2, "{stats:?}");
    assert!(stats.worker.last_error.is_some());
    assert_eq!(e.stored("a"), None);
    e.store.set_down(false);
    e.advance(2000);
    assert_eq!(e.stored("a").as_deref(), Some("2000"));
    let stats = e.registry.stats();
    assert_eq!(stats.worker.consecutive_failures, 0);
    assert_eq!(stats.worker.retries_pending, 0);
}

#[test]
fn shutdown_resolves_as_soon_as_everything_is_written() {
    let mut e = env(FlakyConfig::default());
    let mut t = e.open("a");
    e.deliver(&mut t, "1");
    e.deliver(&mut t, "2");
    let report = e.start_shutdown(Millis::from_secs(60));
    let report = report
        .borrow()
        .clone()
        .expect("resolved without time passing");
    assert!(report.is_complete());
    assert_eq!(report.written, 1);
    assert_eq!(e.clock.now(), Millis(0));
    assert_eq!(e.stored("a").as_deref(), Some("2"));
    assert_eq!(
        e.report.borrow().as_ref(),
        Some(&report),
        "run() returns it too"
    );

    // Commits after shutdown are refused and counted.
    e.deliver(&mut t, "3");
    assert_eq!(e.registry.stats().rejected_commits, 1);
    let again = e.pool.run_until(e.registry.shutdown(Millis(0))).unwrap();
    assert_eq!(again, report);
    assert_eq!(
        e.pool
            .run_until(e.registry.open(StreamKey::new("s", "b")))
            .unwrap_err(),
        RegistryError::WorkerStopped
    );
}

#[test]
fn shutdown_retries_until_the_deadline_then_reports_what_is_missing() {
    let mut e = env(FlakyConfig::default());
    let mut t = e.open("a");
    e.store.set_down(true);
    e.deliver(&mut t, "1");
    let report = e.start_shutdown(Millis(3000));
    let calls_before = e.store.calls();
    while report.borrow().is_none() {
        e.advance(100);
        assert!(
            e.clock.now() <= Millis(3100),
            "shutdown overran its deadline"
        );
    }
    assert!(e.store.calls() > calls_before + 2, "it kept retrying");
    let report = report.borrow().clone().unwrap();
    assert_eq!(report.written, 0);
    assert_eq!(report.unwritten.len(), 1);
    assert_eq!(report.unwritten[0].last_event_id, "1");
    assert!(report.last_error.is_some());
}

#[test]
fn shutdown_recovers_when_the_store_comes_back_before_the_deadline() {
    let mut e = env(FlakyConfig::default());
    let mut t = e.open("a");
    e.store.set_down(true);
    e.deliver(&mut t, "1");
    let report = e.start_shutdown(Millis(10_000));
    e.advance(500);
    e.store.set_down(false);
    while report.borrow().is_none() {
        e.advance(100);
    }
    assert!(e.clock.now() < Millis(10_000));
    assert!(report.borrow().as_ref().unwrap().is_complete());
    assert_eq!(e.stored("a").as_deref(), Some("1"));
}

#[test]
fn shutdown_does_not_wait_past_the_deadline_for_a_hanging_store() {
    let mut e = env(FlakyConfig::default());
    let mut t = e.open("a");
    e.deliver(&mut t, "1");
    e.store.set_config(FlakyConfig {
        latency: (Millis(1_000_000), Millis(1_000_000)),
        ..FlakyConfig::default()
    });
    e.deliver(&mut t, "2");
    let report = e.start_shutdown(Millis(500));
    e.advance(499);
    assert!(report.borrow().is_none());
    e.advance(1);
    let report = report.borrow().clone().expect("resolved at the deadline");
    assert_eq!(report.unwritten.len(), 1);
    assert_eq!(report.unwritten[0].last_event_id, "2");
}

#[test]
fn worker_shuts_down_by_itself_when_everything_is_dropped() {
    let mut e = env(FlakyConfig::default());
    let mut t = e.open("a");
    e.deliver(&mut t, "1");
    e.deliver(&mut t, "2");
    let Env {
        mut pool,
        registry,
        report,
        mem,
        ..
    } = e;
    drop(t);
    drop(registry);
    pool.run_until_stalled();
    assert!(report.borrow().as_ref().unwrap().is_complete());
    assert_eq!(
        mem.get(&StreamKey::new("s", "a")).unwrap().last_event_id,
        "2"
    );
}

#[test]
fn flush_writes_now_regardless_of_the_interval() {
    let mut e = env(FlakyConfig::default());
    let mut t = e.open("a");
    e.deliver(&mut t, "1");
    e.deliver(&mut t, "2");
    let handle = e.registry.worker().clone();
    let report = e.pool.run_until(handle.flush()).unwrap();
    assert_eq!(report.written, 1);
    assert_eq!(report.error, None);
    assert_eq!(e.stored("a").as_deref(), Some("2"));
    e.store.set_down(true);
    e.deliver(&mut t, "3");
    let report = e.pool.run_until(handle.flush()).unwrap();
    assert_eq!(report.written, 0);
    assert_eq!(report.retries_pending, 1);
    assert!(report.error.is_some());
}

#[test]
fn registry_seeds_rejects_double_open_and_removes() {
    let mut e = env(FlakyConfig::default());
    let mut t = e.open("a");
    e.deliver(&mut t, "1");
    e.deliver(&mut t, "2");
    e.deliver(&mut t, "2");
    assert_eq!(
        e.pool
            .run_until(e.registry.open(StreamKey::new("s", "a")))
            .unwrap_err(),
        RegistryError::AlreadyOpen(StreamKey::new("s", "a"))
    );
    assert_eq!(
        e.pool
            .run_until(e.registry.remove(&StreamKey::new("s", "a")))
            .unwrap_err(),
        RegistryError::StillOpen(StreamKey::new("s", "a"))
    );
    assert_eq!(e.registry.stats().open_streams, 1);
    drop(t);
    let stats = e.registry.stats();
    assert_eq!(
        (
            stats.open_streams,
            stats.events_observed,
            stats.duplicates_dropped
        ),
        (0, 3, 1)
    );

    e.advance(250);
    let mut t = e.open("a");
    assert_eq!(t.last_event_id(), Some("2"), "seeded from the store");
    assert_eq!(t.seq(), 2);
    assert!(!t.observe(Some("2"), e.clock.now()).is_fresh());
    drop(t);

    e.pool
        .run_until(e.registry.remove(&StreamKey::new("s", "a")))
        .unwrap();
    assert_eq!(e.stored("a"), None);
    let t = e.open("a");
    assert_eq!(t.last_event_id(), None);
}

#[test]
fn open_fails_cleanly_when_the_store_cannot_load() {
    let mut e = env(FlakyConfig::default());
    e.store.set_down(true);
    let err = e
        .pool
        .run_until(e.registry.open(StreamKey::new("s", "a")))
        .unwrap_err();
    assert!(matches!(err, RegistryError::Store(_)));
    assert!(!e.registry.is_open(&StreamKey::new("s", "a")));
    e.store.set_down(false);
    e.open("a");
}

#[test]
fn a_closed_stream_with_an_unwritten_cursor_is_reopened_from_it() {
    let mut e = env(FlakyConfig::default());
    let mut t = e.open("a");
    e.deliver(&mut t, "1");
    e.store.set_down(true);
    e.deliver(&mut t, "2");
    e.advance(300);
    drop(t);
    assert_eq!(e.registry.stats().worker.retries_pending, 1);
    e.store.set_down(false);
    assert_eq!(
        e.stored("a").as_deref(),
        Some("1"),
        "the retry is not due yet"
    );
    let mut t = e.open("a");
    assert_eq!((t.last_event_id(), t.seq()), (Some("2"), 2));
    e.deliver(&mut t, "3");
    e.advance(5000);
    assert_eq!(e.stored("a").as_deref(), Some("3"));
    drop(t);
    e.advance(5000);
    assert_eq!(e.registry.stats().open_streams, 0);
}

#[test]
fn open_does_not_need_a_running_worker() {
    let store = Rc::new(MemStore::new());
    let (registry, _worker) = persistence(store, ManualClock::new(), Config::default());
    let tracker = futures::executor::block_on(registry.open(StreamKey::new("s", "a"))).unwrap();
    assert_eq!(tracker.seq(), 0);
}

#[test]
fn remove_is_ordered_after_a_pending_write() {
    let mut e = env(FlakyConfig::default());
    let mut t = e.open("a");
    e.deliver(&mut t, "1");
    e.deliver(&mut t, "2");
    drop(t);
    e.pool
        .run_until(e.registry.remove(&StreamKey::new("s", "a")))
        .unwrap();
    e.advance(1000);
    assert_eq!(
        e.stored("a"),
        None,
        "the pending write did not resurrect it"
    );
}

#[test]
fn newest_cursors_lists_every_committed_stream_written_or_not() {
    let mut e = env(FlakyConfig::default());
    let mut a = e.open("a");
    let b = e.open("b");
    let mut c = e.open("c");
    e.deliver(&mut a, "1");
    e.deliver(&mut c, "x");
    e.store.set_down(true);
    e.deliver(&mut a, "2");
    e.deliver(&mut c, "y");
    drop(c); // closed, its last cursor not written yet
    let mut newest: Vec<(String, String, u64)> = e
        .registry
        .newest_cursors()
        .into_iter()
        .map(|cursor| {
            (
                cursor.key.stream().to_owned(),
                cursor.last_event_id,
                cursor.seq,
            )
        })
        .collect();
    newest.sort();
    // "b" never committed: nothing to write.
    assert_eq!(
        newest,
        [("a".into(), "2".into(), 2), ("c".into(), "y".into(), 2)]
    );
    assert_eq!(e.stored("a").as_deref(), Some("1"));
    drop((a, b));
}
