//! Per-event cost of the hot path: `EventTracker::observe(Some(id), now)`
//! and, when the event is fresh, `commit()`.
//!
//! The tracker is opened from a [`Registry`] wired to a `PersistenceWorker`
//! (`MemStore`, `ManualClock`, default config), so each commit also hands
//! the window's new entry to the slot for the store (`tidemark`); the case
//! `tidemark_cursor_only` uses a `MemStore` that keeps no windows, the cost
//! of a commit before windows were stored. The worker is spawned on a
//! `LocalPool` that runs only to open the tracker; it does not run while
//! timing: a
//! commit only copies the cursor into the stream's slot, and the first commit
//! queues one channel message, which is what a commit costs between two
//! flushes. The baseline, built here, is the seed design: a
//! `HashSet<String>` plus a `VecDeque<String>` window of 1024 ids and one
//! `async_channel` unbounded `try_send` of the id `String` per fresh event.
//!
//! Input: a cycled stream of 65,536 MCP-like ids, either numeric ("10000",
//! "10001", ...) or 36-character UUID-like strings, where about 10% of the
//! events replay one of the last 64 fresh ids. Both implementations see the
//! same stream, and a setup pass asserts that they classify every event the
//! same way.
//!
//! Timing: one criterion iteration is one event, so the reported time is the
//! time per event. Events run in chunks of 1,024 timed with `Instant`. The
//! baseline's receiver is drained after every chunk: `seed_baseline` drains
//! outside the timed region (favouring the baseline: receiving and freeing
//! the sent strings is not counted), and `seed_baseline_with_recv` drains
//! inside it (the seed design's full cost).
//!
//! Run: `cargo bench -p tidemark-core --bench observe`
//! (`cargo test -p tidemark-core --benches` runs every case once).
//!
//! Instruction counts: with
//! `TIDEMARK_OBSERVE_EVENTS=<ours|ours-cursor|seed|seed+recv>:<numeric|uuid>:<n>` the
//! binary skips criterion, builds the same fixture (including the warm-up
//! pass that fills both windows) and then runs `n` events through
//! `ours_chunk`, or `seed_chunk` plus `seed_drain`. Under callgrind, collect
//! only inside those functions and divide the total by `n`:
//!
//! ```text
//! BIN=$(ls -t target/release/deps/observe-* | grep -v '\.d$' | head -1)
//! TIDEMARK_OBSERVE_EVENTS=ours:numeric:200000 valgrind --tool=callgrind \
//!     --callgrind-out-file=/dev/null --toggle-collect='observe::ours_chunk*' $BIN
//! TIDEMARK_OBSERVE_EVENTS=seed:numeric:200000 valgrind --tool=callgrind \
//!     --callgrind-out-file=/dev/null --toggle-collect='observe::seed_chunk*' \
//!     --toggle-collect='observe::seed_drain*' $BIN
//! ```
//!
//! ("Collected" is the instruction count; drop the `seed_drain` toggle for
//! the baseline without its receiver.)

mod common;

use common::{SeedTracker, WINDOW, uuid_like};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use futures::executor::LocalPool;
use futures::task::LocalSpawnExt;
use std::hint::black_box;
use std::rc::Rc;
use std::time::{Duration, Instant};
use tidemark_core::{
    Config, EventTracker, ManualClock, MemStore, Millis, Registry, Rng, StreamKey, persistence,
};

/// The window of both implementations (the tracker's default).
/// Events in the generated id stream (a power of two; cycled).
const STREAM_LEN: usize = 1 << 16;
/// Events between two reads of the clock (and baseline drains).
const CHUNK: u64 = 1024;
/// Per mille of events that replay a recent id.
const REPLAY_PER_MILLE: u32 = 100;
/// Replays pick one of this many most recent fresh ids (all inside the window).
const REPLAY_DEPTH: usize = 64;

#[derive(Copy, Clone, Debug)]
enum IdKind {
    Numeric,
    Uuid,
}

impl IdKind {
    fn name(self) -> &'static str {
        match self {
            IdKind::Numeric => "numeric",
            IdKind::Uuid => "uuid",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "numeric" => Some(IdKind::Numeric),
            "uuid" => Some(IdKind::Uuid),
            _ => None,
        }
    }
}

/// The id stream and the number of replays in it.
fn id_stream(kind: IdKind) -> (Vec<String>, usize) {
    let mut rng = Rng::new(0x5eed_0b5e_57e4_0001);
    let mut fresh: Vec<String> = Vec::new();
    let mut ids = Vec::with_capacity(STREAM_LEN);
    let mut replays = 0;
    while ids.len() < STREAM_LEN {
        if !fresh.is_empty() && rng.chance(REPLAY_PER_MILLE) {
            let depth = fresh.len().min(REPLAY_DEPTH) as u64;
            let back = rng.up_to(depth - 1) as usize;
            ids.push(fresh[fresh.len() - 1 - back].clone());
            replays += 1;
            continue;
        }
        let id = match kind {
            IdKind::Numeric => (10_000 + fresh.len()).to_string(),
            IdKind::Uuid => uuid_like(&mut rng, &mut [0; 36]).to_owned(),
        };
        fresh.push(id.clone());
        ids.push(id);
    }
    (ids, replays)
}

/// One id stream and a tracker of each implementation, ready to run.
struct Fixture {
    ids: Vec<String>,
    replays: usize,
    ours: EventTracker,
    // Kept alive so the tracker's channel stays open. The worker is spawned
    // on the pool, which never runs while timing.
    _registry: Registry<Rc<MemStore>>,
    _pool: LocalPool,
    seed: SeedTracker,
    seed_rx: async_channel::Receiver<String>,
    pos_ours: usize,
    pos_seed: usize,
    now: u64,
}

impl Fixture {
    /// With `windows`, over a store that keeps windows.
    fn new(kind: IdKind, windows: bool) -> Self {
        let (ids, replays) = id_stream(kind);
        let store = if windows {
            MemStore::new()
        } else {
            MemStore::without_windows()
        };
        let (registry, worker) = persistence(Rc::new(store), ManualClock::new(), Config::default());
        let mut pool = LocalPool::new();
        pool.spawner()
            .spawn_local(async move {
                worker.run().await;
            })
            .expect("spawn worker");
        let ours = pool
            .run_until(registry.open(StreamKey::new("bench-session", kind.name())))
            .expect("open");
        let (tx, seed_rx) = async_channel::unbounded();
        let mut fixture = Fixture {
            ids,
            replays,
            ours,
            _registry: registry,
            _pool: pool,
            seed: SeedTracker::new(tx),
            seed_rx,
            pos_ours: 0,
            pos_seed: 0,
            now: 0,
        };
        fixture.check_and_warm_up();
        fixture
    }

    /// One pass over the stream with both implementations, asserting that
    /// they agree on every event and that the replays are what was generated.
    /// Leaves both windows full.
    fn check_and_warm_up(&mut self) {
        let mut duplicates = 0;
        let mut last_fresh = None;
        for (n, id) in self.ids.iter().enumerate() {
            let ours = self.ours.observe(Some(id), Millis(0)).is_fresh();
            if ours {
                self.ours.commit();
                last_fresh = Some(id.as_str());
            }
            let seed = self.seed.observe(id);
            if seed {
                self.seed.commit();
            }
            assert_eq!(ours, seed, "event {n} ({id}) classified differently");
            duplicates += usize::from(!ours);
        }
        assert_eq!(duplicates, self.replays, "every replay is a duplicate");
        assert_eq!(self.ours.window_len(), WINDOW);
        assert_eq!(self.seed.window_len(), WINDOW);
        assert_eq!(self.ours.last_event_id(), last_fresh);
        seed_drain(&self.seed_rx);
    }

    /// Runs `iters` events of ours; returns the time spent in them.
    fn time_ours(&mut self, iters: u64) -> Duration {
        let mut left = iters;
        let mut total = Duration::ZERO;
        while left > 0 {
            let n = left.min(CHUNK);
            self.now += 1;
            let start = Instant::now();
            let (pos, fresh) = ours_chunk(&mut self.ours, &self.ids, self.pos_ours, n, self.now);
            total += start.elapsed();
            black_box(fresh);
            self.pos_ours = pos;
            left -= n;
        }
        total
    }

    /// Runs `iters` events of the baseline; returns the time spent in them.
    /// The channel is drained between chunks, inside the timed region when
    /// `time_recv` is set (the receiver's share of the cost) and outside it
    /// otherwise.
    fn time_seed(&mut self, iters: u64, time_recv: bool) -> Duration {
        let mut left = iters;
        let mut total = Duration::ZERO;
        while left > 0 {
            let n = left.min(CHUNK);
            let start = Instant::now();
            let (pos, fresh) = seed_chunk(&mut self.seed, &self.ids, self.pos_seed, n);
            if time_recv {
                seed_drain(&self.seed_rx);
                total += start.elapsed();
            } else {
                total += start.elapsed();
                seed_drain(&self.seed_rx);
            }
            black_box(fresh);
            self.pos_seed = pos;
            left -= n;
        }
        total
    }
}

/// `n` events through our tracker, from position `pos` of the stream.
/// Returns the next position and the number of fresh events.
#[inline(never)]
fn ours_chunk(
    tracker: &mut EventTracker,
    ids: &[String],
    mut pos: usize,
    n: u64,
    now: u64,
) -> (usize, u64) {
    let now = Millis(now);
    let mut fresh = 0;
    for _ in 0..n {
        let id = &ids[pos];
        pos = (pos + 1) & (STREAM_LEN - 1);
        if tracker.observe(Some(id), now).is_fresh() {
            tracker.commit();
            fresh += 1;
        }
    }
    (pos, fresh)
}

/// `n` events through the baseline, from position `pos` of the stream.
#[inline(never)]
fn seed_chunk(tracker: &mut SeedTracker, ids: &[String], mut pos: usize, n: u64) -> (usize, u64) {
    let mut fresh = 0;
    for _ in 0..n {
        let id = &ids[pos];
        pos = (pos + 1) & (STREAM_LEN - 1);
        if tracker.observe(id) {
            tracker.commit();
            fresh += 1;
        }
    }
    (pos, fresh)
}

/// The baseline's receiving side: takes every queued id and drops it.
#[inline(never)]
fn seed_drain(rx: &async_channel::Receiver<String>) -> usize {
    let mut n = 0;
    while let Ok(id) = rx.try_recv() {
        black_box(id);
        n += 1;
    }
    n
}

fn bench_observe(c: &mut Criterion) {
    let mut group = c.benchmark_group("observe_commit");
    group.throughput(Throughput::Elements(1));
    for kind in [IdKind::Numeric, IdKind::Uuid] {
        let mut fixture = Fixture::new(kind, true);
        group.bench_function(BenchmarkId::new("tidemark", kind.name()), |b| {
            b.iter_custom(|iters| fixture.time_ours(iters))
        });
        let mut cursor_only = Fixture::new(kind, false);
        group.bench_function(BenchmarkId::new("tidemark_cursor_only", kind.name()), |b| {
            b.iter_custom(|iters| cursor_only.time_ours(iters))
        });
        group.bench_function(BenchmarkId::new("seed_baseline", kind.name()), |b| {
            b.iter_custom(|iters| fixture.time_seed(iters, false))
        });
        group.bench_function(
            BenchmarkId::new("seed_baseline_with_recv", kind.name()),
            |b| b.iter_custom(|iters| fixture.time_seed(iters, true)),
        );
    }
    group.finish();
}

/// `TIDEMARK_OBSERVE_EVENTS=<ours|seed>:<numeric|uuid>:<n>`: run `n` events
/// of one implementation after the warm-up pass, for callgrind.
fn count_mode(spec: &str) {
    let parts: Vec<&str> = spec.split(':').collect();
    let (which, kind, n) = match parts.as_slice() {
        [which, kind, n] => (
            *which,
            IdKind::parse(kind).expect("kind is numeric or uuid"),
            n.parse::<u64>().expect("n is a number"),
        ),
        _ => panic!("TIDEMARK_OBSERVE_EVENTS=<ours|ours-cursor|seed|seed+recv>:<numeric|uuid>:<n>"),
    };
    let mut fixture = Fixture::new(kind, which != "ours-cursor");
    let elapsed = match which {
        "ours" | "ours-cursor" => fixture.time_ours(n),
        "seed" => fixture.time_seed(n, false),
        "seed+recv" => fixture.time_seed(n, true),
        _ => panic!("implementation is ours, ours-cursor, seed or seed+recv"),
    };
    println!(
        "{which} {}: {n} events in {elapsed:?} ({:.1} ns/event)",
        kind.name(),
        elapsed.as_nanos() as f64 / n as f64
    );
}

criterion_group!(benches, bench_observe);

fn main() {
    if let Ok(spec) = std::env::var("TIDEMARK_OBSERVE_EVENTS") {
        count_mode(&spec);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
