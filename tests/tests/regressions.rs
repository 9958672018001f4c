//! Regression tests for two bugs the seeded simulation (`simulation.rs`)
//! found in `tidemark-core`:
//!
//! 1. Reopening a stream in the same process shortly after its tracker was
//!    dropped seeded the new tracker from the store, which did not yet hold
//!    the closed tracker's last commit (it was waiting for the next flush).
//!    The stream resumed from a stale cursor, delivering events twice within
//!    one process lifetime, and the new tracker reused sequence numbers the
//!    closed one had spent, so the persisted id could move backwards. Now
//!    `Registry::open` asks the worker for a pending cursor first.
//! 2. `shutdown(deadline)` was not bounded by its deadline while a regular
//!    write was in flight: the worker handled the shutdown only after the
//!    write returned, so a hung store blocked the shutdown forever. Now a
//!    shutdown signal bounds every store call in progress.

use futures::task::LocalSpawnExt;
use std::cell::RefCell;
use std::rc::Rc;
use tidemark_core::{
    Clock, Config, EventTracker, FlakyConfig, FlakyStore, ManualClock, MemStore, Millis, StreamKey,
};
use tidemark_tests::start_persistence;

/// Feeds `ids` to the tracker, committing after each fresh one.
fn receive(tracker: &mut EventTracker, clock: &ManualClock, ids: impl IntoIterator<Item = u64>) {
    for id in ids {
        if tracker
            .observe(Some(&id.to_string()), clock.now())
            .is_fresh()
        {
            tracker.commit();
        }
    }
}

/// The reopened tracker must resume from the closed tracker's last
/// commit, not from the older cursor in the store.
#[test]
fn reopen_resumes_from_the_last_commit() {
    let store = Rc::new(MemStore::new());
    let clock = ManualClock::new();
    let (registry, mut pool) = start_persistence(store.clone(), &clock, Config::default());
    let key = StreamKey::new("session", "stream");

    let mut tracker = pool.run_until(registry.open(key.clone())).unwrap();
    receive(&mut tracker, &clock, [1]);
    pool.run_until_stalled(); // the first commit is written at once
    receive(&mut tracker, &clock, [2, 3]);
    pool.run_until_stalled(); // these wait for the flush interval
    drop(tracker); // the stream ends; "its last commit is still written"

    let reopened = pool.run_until(registry.open(key.clone())).unwrap();
    assert_eq!(
        reopened.last_event_id(),
        Some("3"),
        "the reopened stream resumes from the stored id 1 although 2 and 3 were \
         delivered and committed in this process; the server replays them and \
         the fresh tracker delivers them again"
    );
}

/// The persisted id never moves backwards when a stream is reopened before
/// its last commit is written.
#[test]
fn reopened_stream_never_moves_the_stored_id_backwards() {
    let store = Rc::new(MemStore::new());
    let clock = ManualClock::new();
    let (registry, mut pool) = start_persistence(store.clone(), &clock, Config::default());
    let key = StreamKey::new("session", "stream");
    let stored_id = || {
        store
            .get(&key)
            .map_or(0, |c| c.last_event_id.parse::<u64>().unwrap())
    };

    let mut tracker = pool.run_until(registry.open(key.clone())).unwrap();
    receive(&mut tracker, &clock, [1]);
    pool.run_until_stalled(); // seq 1, id 1: written at once
    for id in 2..=10 {
        let _ = tracker.observe(Some(&id.to_string()), clock.now());
    }
    tracker.commit(); // seq 2, id 10: waits for the flush interval
    pool.run_until_stalled();
    drop(tracker);

    // The application reopens the stream and the server resumes after the
    // tracker's last event id.
    let mut reopened = pool.run_until(registry.open(key.clone())).unwrap();
    let resume: u64 = reopened.last_event_id().map_or(0, |id| id.parse().unwrap());
    clock.advance(Millis(250));
    pool.run_until_stalled();
    let mut highest = stored_id();
    assert_eq!(highest, 10, "the closed tracker's last commit is written");
    for id in resume + 1..=12 {
        receive(&mut reopened, &clock, [id]);
        clock.advance(Millis(250));
        pool.run_until_stalled();
        let now = stored_id();
        assert!(
            now >= highest,
            "the stored id moved back from {highest} to {now}: the reopened tracker \
             started at the stale seq 1 and its later commits outrank seq 2"
        );
        highest = now;
    }
}

/// A shutdown resolves by its deadline even when the store hangs on
/// a write that started before the shutdown was asked for.
#[test]
fn shutdown_resolves_by_its_deadline_while_a_write_hangs() {
    let mem = Rc::new(MemStore::new());
    let clock = ManualClock::new();
    let store = Rc::new(FlakyStore::new(
        mem.clone(),
        clock.clone(),
        FlakyConfig::default(),
    ));
    let (registry, mut pool) = start_persistence(store.clone(), &clock, Config::default());
    let key = StreamKey::new("session", "stream");
    let mut tracker = pool.run_until(registry.open(key.clone())).unwrap();

    // From now on every store call takes ten minutes.
    store.set_config(FlakyConfig {
        latency: (Millis::from_secs(600), Millis::from_secs(600)),
        ..FlakyConfig::default()
    });
    receive(&mut tracker, &clock, [1]);
    pool.run_until_stalled(); // the write starts and hangs

    let registry = Rc::new(registry);
    let report = Rc::new(RefCell::new(None));
    {
        let (registry, report) = (registry.clone(), report.clone());
        let deadline = clock.now() + Millis(1_000);
        pool.spawner()
            .spawn_local(async move {
                *report.borrow_mut() = Some(registry.shutdown(deadline).await);
            })
            .unwrap();
    }
    for _ in 0..20 {
        clock.advance(Millis(100));
        pool.run_until_stalled();
    }
    let report = report.borrow_mut().take();
    assert!(
        report.is_some(),
        "shutdown(now + 1 s) is still pending 2 s later: the worker only handles \
         it after the write in flight returns (in ten minutes here)"
    );
}
