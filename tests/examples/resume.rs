//! A resumable stream end to end, in virtual time: servers that drop the
//! connection and replay too much, a flaky store, a crash, a restart from the
//! store, and a graceful shutdown. Prints what happened and a verdict.
//!
//! Run with `cargo run -p tidemark-tests --example resume`.

use futures::executor::LocalPool;
use std::collections::HashSet;
use std::rc::Rc;
use tidemark_core::{
    Clock, Config, EventTracker, FlakyConfig, FlakyStore, ManualClock, MemStore, Millis, Registry,
    Rng, StreamKey,
};
use tidemark_tests::start_persistence;

const STREAMS: usize = 3;
const EVENTS: u64 = 3000;
const CRASH_AT: u64 = 1700;

type Store = Rc<FlakyStore<Rc<MemStore>, ManualClock>>;

/// One stream's server: ids 1..=EVENTS. Connections drop now and then; on a
/// reconnect the server replays up to 40 events before the `Last-Event-ID` it
/// is sent (it cannot know which of them arrived). On the first connection of
/// a restarted process it resumes exactly after `Last-Event-ID`: the dedup
/// window does not survive a crash, only the cursor does.
struct Server {
    next: u64,
}

impl Server {
    fn connect(&mut self, last_event_id: Option<&str>, rewind: u64) {
        let after: u64 = last_event_id.map_or(0, |id| id.parse().unwrap());
        self.next = after.saturating_sub(rewind) + 1;
    }
}

/// Runs `fut` to completion beside the worker on `pool`, moving virtual time
/// on while both wait (the flaky store sleeps on the clock).
fn block_on<F: std::future::Future>(
    pool: &mut LocalPool,
    clock: &ManualClock,
    fut: F,
) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let waker = futures::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    loop {
        pool.run_until_stalled();
        if let std::task::Poll::Ready(value) = fut.as_mut().poll(&mut cx) {
            return value;
        }
        clock.advance(Millis(1));
    }
}

struct Lifetime {
    pool: LocalPool,
    registry: Registry<Store>,
    trackers: Vec<EventTracker>,
    servers: Vec<Server>,
    delivered: Vec<Vec<u64>>,
}

fn start(store: &Store, clock: &ManualClock) -> Lifetime {
    let (registry, mut pool) = start_persistence(store.clone(), clock, Config::default());
    let mut trackers = Vec::new();
    let mut servers = Vec::new();
    for s in 0..STREAMS {
        let key = StreamKey::new("demo-session", format!("stream-{s}"));
        // A host retries opening while the store cannot load the cursor.
        let tracker = loop {
            match block_on(&mut pool, clock, registry.open(key.clone())) {
                Ok(tracker) => break tracker,
                Err(e) => println!("open {key}: {e}; retrying"),
            }
        };
        let mut server = Server { next: 1 };
        server.connect(tracker.last_event_id(), 0);
        trackers.push(tracker);
        servers.push(server);
    }
    Lifetime {
        pool,
        registry,
        trackers,
        servers,
        delivered: vec![Vec::new(); STREAMS],
    }
}

impl Lifetime {
    /// Runs until every stream has read up to `until` (or the end).
    fn run(&mut self, until: u64, clock: &ManualClock, rng: &mut Rng) -> (u64, u64) {
        let (mut reconnects, mut ticks) = (0, 0);
        loop {
            let mut busy = false;
            for s in 0..STREAMS {
                let server = &mut self.servers[s];
                if server.next > until {
                    continue;
                }
                busy = true;
                if rng.chance(5) {
                    reconnects += 1;
                    server.connect(self.trackers[s].last_event_id(), rng.up_to(40));
                    continue;
                }
                let id = server.next;
                server.next += 1;
                let tracker = &mut self.trackers[s];
                if tracker
                    .observe(Some(&id.to_string()), clock.now())
                    .is_fresh()
                {
                    self.delivered[s].push(id);
                    tracker.commit();
                }
            }
            ticks += 1;
            clock.advance(Millis(1));
            self.pool.run_until_stalled();
            if !busy {
                return (reconnects, ticks);
            }
        }
    }
}

fn main() {
    let mut rng = Rng::new(2026);
    let clock = ManualClock::new();
    let mem = Rc::new(MemStore::new());
    let store: Store = Rc::new(FlakyStore::new(
        mem.clone(),
        clock.clone(),
        FlakyConfig {
            seed: 7,
            fail_per_mille: 100,
            lost_ack_per_mille: 20,
            latency: (Millis(1), Millis(30)),
        },
    ));
    println!(
        "tidemark resume demo: {STREAMS} streams of {EVENTS} events; connections drop and the \
         server replays up to 40 events on reconnect; the store fails 10% of writes; a crash at event {CRASH_AT}."
    );

    let mut first = start(&store, &clock);
    let (reconnects, ticks) = first.run(CRASH_AT, &clock, &mut rng);
    let stats = first.registry.stats();
    let stored: Vec<u64> = (0..STREAMS)
        .map(|s| {
            mem.get(first.trackers[s].key())
                .map_or(0, |c| c.last_event_id.parse().unwrap())
        })
        .collect();
    println!(
        "lifetime 1 ({ticks} ms): delivered {}, dropped {} replayed duplicates over {reconnects} \
         reconnects; {} store writes and {} failed ones, {:.0} events per write",
        first.delivered.iter().map(Vec::len).sum::<usize>(),
        stats.duplicates_dropped,
        stats.worker.batches,
        stats.worker.failed_batches,
        stats.events_observed as f64
            / (stats.worker.batches + stats.worker.failed_batches).max(1) as f64,
    );
    println!("crash: the process dies without a shutdown; stored cursors {stored:?}");
    let before_crash = first.delivered;
    drop(first.trackers);
    drop(first.registry);
    drop(first.pool);

    let mut second = start(&store, &clock);
    second.run(EVENTS, &clock, &mut rng);
    let deadline = clock.now() + Millis::from_secs(5);
    let shutdown = second.registry.shutdown(deadline);
    let report = block_on(&mut second.pool, &clock, shutdown).unwrap();
    println!(
        "lifetime 2: resumed from the store, delivered {}; graceful shutdown wrote {} cursors, \
         {} unwritten",
        second.delivered.iter().map(Vec::len).sum::<usize>(),
        report.written,
        report.unwritten.len(),
    );

    let (mut lost, mut duplicated, mut redelivered) = (0, 0, 0);
    for s in 0..STREAMS {
        for lifetime in [&before_crash[s], &second.delivered[s]] {
            let unique: HashSet<_> = lifetime.iter().collect();
            duplicated += lifetime.len() - unique.len();
        }
        let first: HashSet<_> = before_crash[s].iter().collect();
        let all: HashSet<_> = first.iter().copied().chain(&second.delivered[s]).collect();
        lost += (1..=EVENTS).filter(|id| !all.contains(id)).count();
        let again: Vec<_> = second.delivered[s]
            .iter()
            .filter(|id| first.contains(id))
            .collect();
        assert!(
            again.iter().all(|&&id| id > stored[s]),
            "only events after the last flushed cursor may repeat"
        );
        redelivered += again.len();
    }
    println!(
        "verdict: expected {}, lost {lost}, duplicated within a lifetime {duplicated}, \
         redelivered after the crash {redelivered} (all after the last flushed cursor)",
        EVENTS as usize * STREAMS
    );
    if lost > 0 || duplicated > 0 || !report.is_complete() {
        std::process::exit(1);
    }
}
