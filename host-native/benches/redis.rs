//! `RedisStore` against a real `redis-server` on loopback:
//!
//! 1. `flush`: one flush of 100,000 dirty cursors (100,000 trackers of one
//!    `Registry`, one commit each, then `WorkerHandle::flush`), median of 5,
//!    by a store keeping cursors only and by one keeping windows too
//!    (`RedisConfig::windows`), with the bytes Redis received per flush.
//!    Baseline in the same run: the same 100,000 hashes written with a plain
//!    pipeline of `HSET`s in one round trip, without the sequence guard.
//! 2. `rate`: 100 streams fed at 100,000 events/s for 5 s through the
//!    persistence worker (250 ms flush interval), cursors only and with
//!    windows, one after the other: events per Redis command, the time of
//!    each store write (median) and the bytes Redis received per flush.
//!
//! Run: `cargo bench -p tidemark --bench redis` (starts its own
//! `redis-server`). Under `cargo test` it runs each part briefly against the
//! test command's server (`TIDEMARK_TEST_REDIS`) or its own, and asserts no
//! targets.

#[path = "../tests/support/redis_server.rs"]
mod redis_server;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tidemark::{CURSORS_PER_SCRIPT, RedisConfig, RedisStore, SmolClock};
use tidemark_core::{
    Clock, Config, Cursor, FingerprintKey, Millis, SavedWindow, Store, StoreError, StreamKey,
    WindowChange, WorkerConfig, persistence,
};

const SESSION: &str = "2f1c6b1e-6a51-4a7e-9f0e-7d3c2b1a0f9e";

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort_unstable();
    samples[samples.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `INFO` fields of `section` as `name -> value` text.
fn info(redis: &mut redis::Connection, section: &str, field: &str) -> u64 {
    let text: String = redis::cmd("INFO").arg(section).query(redis).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .map(|rest| {
            rest.trim_start_matches(':')
                .trim_start_matches("calls=")
                .split([',', '\r'])
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .unwrap_or(0)
}

/// A store that times each write of the store it wraps.
struct Timed<S> {
    inner: S,
    writes: Mutex<Vec<Duration>>,
}

impl<S: Store> Store for Timed<S> {
    async fn load(&self, key: &StreamKey) -> Result<Option<Cursor>, StoreError> {
        self.inner.load(key).await
    }
    async fn save_batch(&self, cursors: &[Cursor]) -> Result<(), StoreError> {
        self.save_with_windows(cursors, &[]).await
    }
    async fn delete(&self, key: &StreamKey) -> Result<(), StoreError> {
        self.inner.delete(key).await
    }
    async fn window_key(&self) -> Result<Option<FingerprintKey>, StoreError> {
        self.inner.window_key().await
    }
    async fn load_window(&self, key: &StreamKey) -> Result<Option<SavedWindow>, StoreError> {
        self.inner.load_window(key).await
    }
    async fn save_with_windows(
        &self,
        cursors: &[Cursor],
        windows: &[WindowChange],
    ) -> Result<(), StoreError> {
        let started = Instant::now();
        let result = self.inner.save_with_windows(cursors, windows).await;
        self.writes.lock().unwrap().push(started.elapsed());
        result
    }
}

/// What one way of storing cost per flush.
struct Cost {
    time: Duration,
    bytes: u64,
}

fn label(windows: bool) -> &'static str {
    if windows {
        "cursors + windows"
    } else {
        "cursors only     "
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    a / b.max(1e-9)
}

fn flush(url: &str, prefix: &str, streams: usize, rounds: usize, windows: bool) -> Cost {
    let clock = SmolClock::new();
    let store = Arc::new(
        RedisStore::new(RedisConfig {
            prefix: format!("{prefix}flush-{windows}:"),
            timeout: Duration::from_secs(30),
            windows,
            ..RedisConfig::new(url)
        })
        .unwrap(),
    );
    let mut redis = redis::Client::open(url).unwrap().get_connection().unwrap();
    // Loaded first, so that no flush is sent twice (after a NOSCRIPT).
    for script in [RedisStore::SAVE_SCRIPT, RedisStore::COMPACT_SCRIPT] {
        redis::Script::new(script)
            .prepare_invoke()
            .load(&mut redis)
            .unwrap();
    }
    let config = Config {
        worker: WorkerConfig {
            flush_interval: Millis::from_secs(3600),
            ..WorkerConfig::default()
        },
        ..Config::default()
    };
    let (registry, worker) = persistence(store.clone(), clock, config);
    let handle = registry.worker().clone();
    let mut trackers: Vec<_> = smol::block_on(async {
        let mut trackers = Vec::with_capacity(streams);
        for s in 0..streams {
            let key = StreamKey::new(SESSION, format!("stream-{s}"));
            trackers.push(registry.open(key).await.unwrap());
        }
        trackers
    });
    let mut worker = Some(worker);
    let mut running = None;
    let mut times = Vec::new();
    let mut bytes = Vec::new();
    for round in 0..rounds {
        let received = info(&mut redis, "stats", "total_net_input_bytes");
        for (s, tracker) in trackers.iter_mut().enumerate() {
            let id = format!("{s}-{round}");
            assert!(tracker.observe(Some(&id), clock.now()).is_fresh());
            tracker.commit();
        }
        let before = handle.stats().cursors_written;
        let started = Instant::now();
        // Started only now, so that all cursors are dirty at once. Its first
        // batch is not held back by the flush interval, so it may write them
        // before the flush request arrives: either way, one batch of all.
        if let Some(worker) = worker.take() {
            running = Some(smol::spawn(worker.run()));
        }
        let report = smol::block_on(handle.flush()).unwrap();
        times.push(started.elapsed());
        // Less the INFO request itself (about 40 bytes).
        bytes.push(info(&mut redis, "stats", "total_net_input_bytes") - received);
        let written = handle.stats().cursors_written - before;
        assert_eq!(written, streams as u64, "{report:?}");
    }
    if windows {
        // Every stream's window has every id of the rounds.
        let key = StreamKey::new(SESSION, "stream-0");
        let window = smol::block_on(store.load_window(&key)).unwrap().unwrap();
        assert_eq!(window.len(), rounds);
    }
    let last = smol::block_on(store.load(&StreamKey::new(SESSION, "stream-0")))
        .unwrap()
        .unwrap();
    assert_eq!(last.last_event_id, format!("0-{}", rounds - 1));
    drop(trackers);
    smol::block_on(async {
        registry
            .shutdown(clock.now() + Millis::from_secs(10))
            .await
            .unwrap();
        if let Some(worker) = running {
            worker.await;
        }
    });
    bytes.sort_unstable();
    Cost {
        time: median(times),
        bytes: bytes[bytes.len() / 2],
    }
}

/// The same hashes as `flush` writes, one plain pipeline, no guard, no
/// script: the floor of a flush of cursors.
fn hset_baseline(url: &str, prefix: &str, streams: usize, rounds: usize) -> Duration {
    let clock = SmolClock::new();
    let mut redis = redis::Client::open(url).unwrap().get_connection().unwrap();
    let mut base = Vec::new();
    for round in 0..rounds {
        let mut pipe = redis::pipe();
        for s in 0..streams {
            let key = format!("{prefix}floor:stream-{s}");
            pipe.cmd("HSET")
                .arg(key)
                .arg("seq")
                .arg(round + 1)
                .arg("id")
                .arg(format!("{s}-{round}"))
                .arg("at")
                .arg(clock.now().as_u64())
                .ignore();
        }
        let started = Instant::now();
        let () = pipe.query(&mut redis).unwrap();
        base.push(started.elapsed());
    }
    median(base)
}

fn flushes(url: &str, prefix: &str, streams: usize, rounds: usize) {
    let plain = flush(url, prefix, streams, rounds, false);
    let windowed = flush(url, prefix, streams, rounds, true);
    let base = hset_baseline(url, prefix, streams, rounds);
    println!("flush: {streams} dirty streams to Redis, median of {rounds} flushes");
    for (windows, cost) in [(false, &plain), (true, &windowed)] {
        println!(
            "  {}  {:.1} ms, {} B received by Redis ({:.1} B per stream; flush/baseline {:.2}x)",
            label(windows),
            ms(cost.time),
            cost.bytes,
            cost.bytes as f64 / streams as f64,
            ratio(cost.time.as_secs_f64(), base.as_secs_f64()),
        );
    }
    println!(
        "  baseline: HSET pipeline {:.1} ms ({} scripts in one pipeline; target <= 1 s for 100k)",
        ms(base),
        streams.div_ceil(CURSORS_PER_SCRIPT)
    );
    println!(
        "  windows / cursors only: {:.2}x the time, {:.2}x the bytes",
        ratio(windowed.time.as_secs_f64(), plain.time.as_secs_f64()),
        ratio(windowed.bytes as f64, plain.bytes as f64)
    );
}

fn rate(url: &str, prefix: &str, seconds: u64, windows: bool) -> Cost {
    const STREAMS: usize = 100;
    const PER_MS: usize = 100; // 100,000 events/s
    let clock = SmolClock::new();
    let store = Arc::new(Timed {
        inner: RedisStore::new(RedisConfig {
            prefix: format!("{prefix}rate-{windows}:"),
            windows,
            ..RedisConfig::new(url)
        })
        .unwrap(),
        writes: Mutex::default(),
    });
    let (registry, worker) = persistence(store.clone(), clock, Config::default());
    let mut redis = redis::Client::open(url).unwrap().get_connection().unwrap();
    let (events, commands, evalsha, batches, received, elapsed) = smol::block_on(async {
        let mut trackers = Vec::with_capacity(STREAMS);
        for s in 0..STREAMS {
            let key = StreamKey::new(SESSION, format!("rate-{s}"));
            trackers.push(registry.open(key).await.unwrap());
        }
        let worker = smol::spawn(worker.run());
        let before = (
            info(&mut redis, "stats", "total_commands_processed"),
            info(&mut redis, "commandstats", "cmdstat_evalsha"),
            info(&mut redis, "stats", "total_net_input_bytes"),
        );
        let started = Instant::now();
        let mut events = 0u64;
        for tick in 0..seconds * 1000 {
            async_io::Timer::at(started + Duration::from_millis(tick)).await;
            for _ in 0..PER_MS {
                let tracker = &mut trackers[events as usize % STREAMS];
                let id = events.to_string();
                assert!(tracker.observe(Some(&id), clock.now()).is_fresh());
                tracker.commit();
                events += 1;
            }
        }
        let elapsed = started.elapsed();
        drop(trackers);
        registry
            .shutdown(clock.now() + Millis::from_secs(10))
            .await
            .unwrap();
        worker.await;
        // The second INFO is itself counted before it answers.
        let commands = info(&mut redis, "stats", "total_commands_processed") - before.0 - 2;
        let evalsha = info(&mut redis, "commandstats", "cmdstat_evalsha") - before.1;
        // Less the INFO requests in between (about 40 bytes each).
        let received = info(&mut redis, "stats", "total_net_input_bytes") - before.2;
        let batches = registry.stats().worker.batches;
        (events, commands, evalsha, batches, received, elapsed)
    });
    let rate = events as f64 / elapsed.as_secs_f64();
    let write = median(store.writes.lock().unwrap().clone());
    println!(
        "rate, {}: {STREAMS} streams, {events} events in {elapsed:.2?} ({rate:.0} events/s)",
        label(windows).trim_end()
    );
    println!(
        "  {batches} flushes, {evalsha} EVALSHA, {commands} commands processed by Redis \
         (scripts' inner commands included)"
    );
    println!(
        "  {:.0} events per client command (EVALSHA), {:.0} events per command processed",
        events as f64 / evalsha.max(1) as f64,
        events as f64 / commands.max(1) as f64
    );
    let bytes = received / batches.max(1);
    println!(
        "  store write {:.2} ms (median of {batches}), {bytes} B received by Redis per flush",
        ms(write)
    );
    if windows {
        let mut stored = 0u64;
        for s in 0..STREAMS {
            let key = store
                .inner
                .window_key_of(&StreamKey::new(SESSION, format!("rate-{s}")));
            let len: u64 = redis::cmd("STRLEN").arg(key).query(&mut redis).unwrap();
            stored += len;
        }
        println!(
            "  window strings stored: {:.0} B per stream",
            stored as f64 / STREAMS as f64
        );
    }
    Cost { time: write, bytes }
}

fn rates(url: &str, prefix: &str, seconds: u64) {
    let plain = rate(url, prefix, seconds, false);
    let windowed = rate(url, prefix, seconds, true);
    println!(
        "  rate, windows / cursors only: {:.2}x the store write time, {:.2}x the bytes per flush",
        ratio(windowed.time.as_secs_f64(), plain.time.as_secs_f64()),
        ratio(windowed.bytes as f64, plain.bytes as f64)
    );
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not.
    let args: Vec<String> = std::env::args().collect();
    let test_mode = !args.iter().any(|a| a == "--bench") || args.iter().any(|a| a == "--test");
    let (url, server) = if test_mode {
        redis_server::shared()
    } else {
        let server = redis_server::RedisServer::start();
        (server.url(), Some(server))
    };
    let prefix = redis_server::unique_prefix("bench");
    if test_mode {
        flushes(&url, &prefix, 2_500, 2);
        rates(&url, &prefix, 1);
    } else {
        flushes(&url, &prefix, 100_000, 5);
        rates(&url, &prefix, 5);
    }
    if server.is_none() {
        // The test command's server: leave it as it was found.
        let mut redis = redis::Client::open(url.as_str())
            .unwrap()
            .get_connection()
            .unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query(&mut redis)
            .unwrap();
        for chunk in keys.chunks(1000) {
            let () = redis::cmd("DEL").arg(chunk).query(&mut redis).unwrap();
        }
    }
}
