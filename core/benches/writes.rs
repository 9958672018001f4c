//! Store writes per event, in virtual time: 100 streams receiving 100,000
//! events per second in total for 10 s, with the default 250 ms flush
//! interval.
//!
//! The trackers come from a `Registry` whose `PersistenceWorker` runs on a
//! `futures::executor::LocalPool` with a `ManualClock`; the store is an
//! `Rc<MemStore>`, which counts `save_batch` calls and cursors written. Every
//! event carries a fresh id ("<stream>-<n>") and is observed and committed on
//! the streams in round-robin; after every 100 events the clock advances by
//! 1 ms and the pool runs until stalled, so the worker sees time pass as it
//! would in production. At the end `Registry::shutdown` writes what is left,
//! and the program checks that the store holds the last id of every stream.
//!
//! Reported: events per `save_batch` call and per cursor written, against the
//! naive design that writes once per event (1 event per write), and the
//! asserted target of at least 1,000 events per store write.
//!
//! Run: `cargo bench -p tidemark-core --bench writes`.
//! Without `--bench`, or with `--test` (as `cargo test -p tidemark-core --benches`
//! runs it), it simulates 1 s instead of 10 s.

use futures::executor::LocalPool;
use futures::task::LocalSpawnExt;
use std::fmt::Write;
use std::rc::Rc;
use std::time::Instant;
use tidemark_core::{Clock, Config, ManualClock, MemStore, Millis, StreamKey, persistence};

const STREAMS: usize = 100;
const EVENTS_PER_SEC: u64 = 100_000;
/// Events between two 1 ms clock ticks.
const EVENTS_PER_MS: u64 = EVENTS_PER_SEC / 1000;
/// Target: events per store write.
const TARGET: f64 = 1_000.0;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let has = |flag: &str| args.iter().any(|a| a == flag);
    let bench = has("--bench") && !has("--test");
    let seconds: u64 = if bench { 10 } else { 1 };
    let total_events = EVENTS_PER_SEC * seconds;

    let store = Rc::new(MemStore::new());
    let clock = ManualClock::new();
    let config = Config::default();
    let flush_interval = config.worker.flush_interval;
    let (registry, worker) = persistence(store.clone(), clock.clone(), config);
    let mut pool = LocalPool::new();
    pool.spawner()
        .spawn_local(async move {
            worker.run().await;
        })
        .expect("spawn worker");

    let keys: Vec<StreamKey> = (0..STREAMS)
        .map(|s| StreamKey::new("writes-session", format!("stream-{s}")))
        .collect();
    let mut trackers: Vec<_> = keys
        .iter()
        .map(|key| pool.run_until(registry.open(key.clone())).expect("open"))
        .collect();
    let mut next_id = vec![0u64; STREAMS];
    let mut id = String::new();

    let wall = Instant::now();
    for event in 0..total_events {
        let s = (event % STREAMS as u64) as usize;
        id.clear();
        write!(id, "{s}-{}", next_id[s]).expect("write to a String");
        next_id[s] += 1;
        let tracker = &mut trackers[s];
        assert!(tracker.observe(Some(&id), clock.now()).is_fresh());
        tracker.commit();
        if (event + 1) % EVENTS_PER_MS == 0 {
            clock.advance(Millis(1));
            pool.run_until_stalled();
        }
    }
    let batches_running = store.batches();
    let cursors_running = store.cursors_written();
    let report = pool
        .run_until(registry.shutdown(clock.now() + Millis(1000)))
        .expect("shutdown");
    let wall = wall.elapsed();
    assert!(report.is_complete(), "shutdown left cursors unwritten");

    for (s, key) in keys.iter().enumerate() {
        let cursor = store.get(key).expect("every stream has a stored cursor");
        let last = format!("{s}-{}", next_id[s] - 1);
        assert_eq!(cursor.last_event_id, last, "stream {s} stored its last id");
    }
    let stats = registry.stats();
    assert_eq!(stats.events_observed, total_events);
    assert_eq!(registry.worker().stats().batches, store.batches());
    assert_eq!(stats.rejected_commits, 0);

    let batches = store.batches();
    let cursors = store.cursors_written();
    let per_write = total_events as f64 / batches as f64;
    let per_cursor = total_events as f64 / cursors as f64;
    println!(
        "writes: {STREAMS} streams, {EVENTS_PER_SEC} events/s, {seconds} s virtual, \
         flush every {flush_interval} ({} ms clock ticks, {:.2?} wall)",
        clock.now().as_u64(),
        wall
    );
    println!("  events                 {total_events}");
    println!(
        "  save_batch calls       {batches} ({batches_running} while running, {} at shutdown)",
        batches - batches_running
    );
    println!(
        "  cursors written        {cursors} ({cursors_running} while running, {} at shutdown)",
        cursors - cursors_running
    );
    println!(
        "  events per store write {per_write:.1}  (naive baseline: 1.0, ratio {per_write:.1}x)"
    );
    println!("  events per cursor      {per_cursor:.1}  (naive baseline: 1.0)");
    println!(
        "  target >= {TARGET} events per write: {}",
        if per_write >= TARGET { "met" } else { "MISSED" }
    );
    assert!(
        per_write >= TARGET,
        "{per_write:.1} events per store write, target {TARGET}"
    );
}
