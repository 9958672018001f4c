//! `RedisStore` against a real `redis-server` on loopback:
//!
//! 1. `flush`: one flush of 100,000 dirty cursors (100,000 trackers of one
//!    `Registry`, one commit each, then `WorkerHandle::flush`), median of 5.
//!    Baseline in the same run: the same 100,000 hashes written with a plain
//!    pipeline of `HSET`s in one round trip, without the sequence guard.
//! 2. `rate`: events per Redis command with 100 streams fed at 100,000
//!    events/s for 5 s through the persistence worker (250 ms flush
//!    interval), counting the commands Redis processed (`INFO`).
//! 3. `window`: what storing each stream's dedup window with its cursor would
//!    cost per flush: the store's script against the same script also writing
//!    a full window snapshot (1024 fingerprints, 8 KiB) per stream, for 100
//!    and 10,000 dirty streams, median of 11 flushes each.
//!
//! Run: `cargo bench -p tidemark --bench redis` (starts its own
//! `redis-server`). Under `cargo test` it runs each part briefly against the
//! test command's server (`TIDEMARK_TEST_REDIS`) or its own, and asserts no
//! targets.

#[path = "../tests/support/redis_server.rs"]
mod redis_server;

use std::sync::Arc;
use std::time::{Duration, Instant};
use tidemark::{CURSORS_PER_SCRIPT, RedisConfig, RedisStore, SmolClock};
use tidemark_core::{Clock, Config, Cursor, Millis, Store, StreamKey, WorkerConfig, persistence};

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

fn flush(url: &str, prefix: &str, streams: usize, rounds: usize) {
    let clock = SmolClock::new();
    let store = Arc::new(
        RedisStore::new(RedisConfig {
            prefix: format!("{prefix}flush:"),
            timeout: Duration::from_secs(30),
            ..RedisConfig::new(url)
        })
        .unwrap(),
    );
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
    for round in 0..rounds {
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
        let written = handle.stats().cursors_written - before;
        assert_eq!(written, streams as u64, "{report:?}");
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

    // Baseline: the same hashes, one plain pipeline, no guard, no script.
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
    let (flush, base) = (median(times), median(base));
    println!("flush: {streams} dirty cursors to Redis, median of {rounds}");
    println!(
        "  RedisStore flush       {:.1} ms ({} scripts in one pipeline; target <= 1 s for 100k)",
        ms(flush),
        streams.div_ceil(CURSORS_PER_SCRIPT)
    );
    println!(
        "  baseline: HSET pipeline {:.1} ms (flush/baseline {:.2}x)",
        ms(base),
        flush.as_secs_f64() / base.as_secs_f64().max(1e-9)
    );
}

fn rate(url: &str, prefix: &str, seconds: u64) {
    const STREAMS: usize = 100;
    const PER_MS: usize = 100; // 100,000 events/s
    let clock = SmolClock::new();
    let store = Arc::new(
        RedisStore::new(RedisConfig {
            prefix: format!("{prefix}rate:"),
            ..RedisConfig::new(url)
        })
        .unwrap(),
    );
    let (registry, worker) = persistence(store, clock, Config::default());
    let mut redis = redis::Client::open(url).unwrap().get_connection().unwrap();
    let (events, commands, evalsha, batches, elapsed) = smol::block_on(async {
        let mut trackers = Vec::with_capacity(STREAMS);
        for s in 0..STREAMS {
            let key = StreamKey::new(SESSION, format!("rate-{s}"));
            trackers.push(registry.open(key).await.unwrap());
        }
        let worker = smol::spawn(worker.run());
        let before = (
            info(&mut redis, "stats", "total_commands_processed"),
            info(&mut redis, "commandstats", "cmdstat_evalsha"),
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
        let batches = registry.stats().worker.batches;
        (events, commands, evalsha, batches, elapsed)
    });
    let rate = events as f64 / elapsed.as_secs_f64();
    println!("rate: {STREAMS} streams, {events} events in {elapsed:.2?} ({rate:.0} events/s)");
    println!(
        "  {batches} flushes, {evalsha} EVALSHA, {commands} commands processed by Redis \
         (scripts' inner commands included)"
    );
    println!(
        "  {:.0} events per client command (EVALSHA), {:.0} events per command processed",
        events as f64 / evalsha.max(1) as f64,
        events as f64 / commands.max(1) as f64
    );
}

/// The store's script ([`RedisStore::SAVE_SCRIPT`]) with a window snapshot
/// per stream as a fourth value, so that the two differ only by the window.
fn save_with_window() -> String {
    let edits = [
        ("3 * i - 1", "4 * i - 2"),
        ("ARGV[at + 2])", "ARGV[at + 2], 'window', ARGV[at + 3])"),
    ];
    edits
        .iter()
        .fold(RedisStore::SAVE_SCRIPT.to_owned(), |script, (from, to)| {
            assert_eq!(
                script.matches(from).count(),
                1,
                "RedisStore::SAVE_SCRIPT changed: edit the window variant ({from:?})"
            );
            script.replace(from, to)
        })
}

fn window(url: &str, prefix: &str, streams: usize, rounds: usize) {
    let store = RedisStore::new(RedisConfig {
        prefix: format!("{prefix}window-plain:"),
        ..RedisConfig::new(url)
    })
    .unwrap();
    // Keys of the same length, apart from the store's.
    let snapshots = RedisStore::new(RedisConfig {
        prefix: format!("{prefix}window-snaps:"),
        ..RedisConfig::new(url)
    })
    .unwrap();
    let script = redis::Script::new(&save_with_window());
    let snapshot = vec![0xA5u8; 1024 * 8];
    let mut redis = redis::Client::open(url).unwrap().get_connection().unwrap();
    let cursors = |round: u64| -> Vec<Cursor> {
        (0..streams)
            .map(|s| Cursor {
                key: StreamKey::new(SESSION, format!("w-{s}")),
                last_event_id: format!("{s}-{round}"),
                seq: round + 1,
                at: Millis(1_700_000_000_000 + round),
            })
            .collect()
    };
    let mut plain = Vec::new();
    let mut with_window = Vec::new();
    let mut bytes = (0, 0);
    for round in 0..rounds as u64 {
        let batch = cursors(round);
        let started = Instant::now();
        smol::block_on(store.save_batch(&batch)).unwrap();
        plain.push(started.elapsed());

        let pipeline = |window: Option<&[u8]>| {
            let mut pipe = redis::pipe();
            for chunk in batch.chunks(CURSORS_PER_SCRIPT) {
                let mut call = script.prepare_invoke();
                call.arg(0);
                for cursor in chunk {
                    call.key(snapshots.cursor_key(&cursor.key))
                        .arg(cursor.seq)
                        .arg(cursor.last_event_id.as_str())
                        .arg(cursor.at.as_u64());
                    if let Some(window) = window {
                        call.arg(window);
                    }
                }
                pipe.invoke_script(&call);
            }
            pipe
        };
        let pipe = pipeline(Some(&snapshot));
        if round == 0 {
            script.prepare_invoke().load(&mut redis).unwrap();
            // The store's request has the same shape without the windows.
            bytes = (
                pipeline(None).get_packed_pipeline().len(),
                pipe.get_packed_pipeline().len(),
            );
        }
        let started = Instant::now();
        let stale: Vec<u64> = pipe.query(&mut redis).unwrap();
        with_window.push(started.elapsed());
        assert_eq!(stale.iter().sum::<u64>(), 0);
    }
    // The window variant writes what the store writes, and the window.
    let last = cursors(rounds as u64 - 1).swap_remove(0);
    let (seq, id, at, window): (u64, String, u64, Vec<u8>) = redis::cmd("HMGET")
        .arg(snapshots.cursor_key(&last.key))
        .arg(&["seq", "id", "at", "window"][..])
        .query(&mut redis)
        .unwrap();
    assert_eq!(
        (seq, id, at),
        (last.seq, last.last_event_id, last.at.as_u64())
    );
    assert_eq!(window, snapshot);
    let (plain, with_window) = (median(plain), median(with_window));
    println!("window: {streams} dirty streams, median of {rounds} flushes");
    println!(
        "  cursor only            {:.2} ms per flush ({} B on the wire)",
        ms(plain),
        bytes.0
    );
    println!(
        "  cursor + 8 KiB window  {:.2} ms per flush ({} B on the wire), {:.1}x",
        ms(with_window),
        bytes.1,
        with_window.as_secs_f64() / plain.as_secs_f64().max(1e-9)
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
        flush(&url, &prefix, 2_500, 2);
        rate(&url, &prefix, 1);
        window(&url, &prefix, 100, 3);
    } else {
        flush(&url, &prefix, 100_000, 5);
        rate(&url, &prefix, 5);
        window(&url, &prefix, 100, 11);
        window(&url, &prefix, 10_000, 11);
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
