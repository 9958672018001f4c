//! One process tracking 100,000 streams: resident memory per stream, and the
//! time to flush 100,000 dirty streams to a `FileStore` (encode, append the
//! window changes to `windows.tdm` and fsync it, write the cursors to a
//! temporary file, fsync, rename, fsync the directory); then the bytes a
//! flush writes for 100 streams at 100k events/s.
//!
//! Baselines in the same run: the same flush to a cursors-only `FileStore`
//! (`FileStore::open_cursors_only`, the store as it was before windows were
//! kept), and writing and fsyncing as many bytes as its state file with
//! `std::fs::write` + `sync_all`, the I/O floor of any durable flush. Rounds
//! alternate the two stores; figures are medians.
//!
//! Run: `cargo bench -p tidemark --bench scale` (under `cargo test` it runs
//! 2,000 streams, one round, and asserts no targets).
//! Targets: at most 2 GB resident for 100k streams, at most 1 s per flush,
//! the flush with windows at most 2x the cursors-only one.

use std::sync::Arc;
use std::time::{Duration, Instant};
use tidemark::{FileStore, SmolClock};
use tidemark_core::{Clock, Config, Millis, StreamKey, WorkerConfig, persistence};

const SESSION: &str = "2f1c6b1e-6a51-4a7e-9f0e-7d3c2b1a0f9e";

fn proc_value(file: &str, field: &str) -> u64 {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
}

fn rss_anon() -> u64 {
    proc_value("/proc/self/status", "RssAnon:") * 1024
}

/// Bytes this process has passed to `write` and friends so far.
fn written() -> u64 {
    proc_value("/proc/self/io", "wchar:")
}

fn open(dir: &std::path::Path, windows: bool) -> FileStore {
    if windows {
        FileStore::open(dir).unwrap()
    } else {
        FileStore::open_cursors_only(dir).unwrap()
    }
}

fn config() -> Config {
    Config {
        worker: WorkerConfig {
            flush_interval: Millis::from_secs(3600),
            ..WorkerConfig::default()
        },
        ..Config::default()
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One flush of `streams` dirty streams, one event committed on each.
struct DirtyFlush {
    flush: Duration,
    bytes_written: u64,
    cursors_file: u64,
    windows_file: u64,
    /// Growth of `RssAnon` while the trackers were opened, and after the
    /// flush (the store's fold of the windows), if measured.
    rss: Option<(u64, u64)>,
}

fn dirty_flush(streams: u64, windows: bool, measure_rss: bool) -> DirtyFlush {
    let dir = tempfile::tempdir().unwrap();
    let clock = SmolClock::new();
    let store = Arc::new(open(dir.path(), windows));
    let (registry, worker) = persistence(store.clone(), clock, config());
    let handle = registry.worker().clone();

    let before = rss_anon();
    let trackers: Vec<_> = smol::block_on(async {
        let mut trackers = Vec::with_capacity(streams as usize);
        for s in 0..streams {
            let key = StreamKey::new(SESSION, format!("stream-{s}"));
            let mut tracker = registry.open(key).await.unwrap();
            let id = format!("{s}-1");
            assert!(tracker.observe(Some(&id), clock.now()).is_fresh());
            tracker.commit();
            trackers.push(tracker);
        }
        trackers
    });
    let opened = rss_anon().saturating_sub(before);

    // The worker starts only now, so that all streams are dirty at once.
    // Its first batch may take them before `flush()` asks: the time runs
    // from its start until everything is written, in one batch either way.
    let (flush, bytes_written) = smol::block_on(async {
        let written_before = written();
        let started = Instant::now();
        let worker = smol::spawn(worker.run());
        handle.flush().await.unwrap();
        let flushed_in = started.elapsed();
        let bytes = written() - written_before;
        let stats = handle.stats();
        assert_eq!(stats.cursors_written, streams, "{stats:?}");
        assert_eq!(stats.batches, 1, "{stats:?}");
        let report = registry
            .shutdown(clock.now() + Millis::from_secs(10))
            .await
            .unwrap();
        assert!(report.is_complete());
        worker.await;
        (flushed_in, bytes)
    });
    let flushed = rss_anon().saturating_sub(before);
    drop(trackers);
    let windows_file = std::fs::metadata(store.windows_path()).map_or(0, |m| m.len());
    DirtyFlush {
        flush,
        bytes_written,
        cursors_file: std::fs::metadata(store.path()).unwrap().len(),
        windows_file,
        rss: measure_rss.then_some((opened, flushed)),
    }
}

/// Bytes and time per flush of 100 streams at 100k events/s with a 250 ms
/// flush interval: 25,000 events per flush, 250 per stream.
struct Steady {
    bytes: Vec<f64>,
    times: Vec<f64>,
}

fn steady(windows: bool, uuid_ids: bool, flushes: usize) -> Steady {
    const STREAMS: usize = 100;
    const PER_FLUSH: u64 = 250;
    const WARM_UP: usize = 8; // full windows (1024 ids), the log past its first write
    let dir = tempfile::tempdir().unwrap();
    let clock = SmolClock::new();
    let store = Arc::new(open(dir.path(), windows));
    let (registry, worker) = persistence(store.clone(), clock, config());
    let handle = registry.worker().clone();
    let id = |s: usize, n: u64| {
        if uuid_ids {
            format!(
                "{n:08x}-4f1c-8a2e-b5d3-{:012x}",
                ((s as u64) << 32) | (n * 7919)
            )
        } else {
            n.to_string()
        }
    };
    smol::block_on(async {
        let worker = smol::spawn(worker.run());
        let mut trackers = Vec::new();
        for s in 0..STREAMS {
            let key = StreamKey::new(SESSION, format!("stream-{s}"));
            trackers.push(registry.open(key).await.unwrap());
        }
        let mut next = 1u64;
        let mut result = Steady {
            bytes: Vec::new(),
            times: Vec::new(),
        };
        for round in 0..WARM_UP + flushes {
            for n in next..next + PER_FLUSH {
                for (s, tracker) in trackers.iter_mut().enumerate() {
                    assert!(tracker.observe(Some(&id(s, n)), clock.now()).is_fresh());
                    tracker.commit();
                }
            }
            next += PER_FLUSH;
            let written_before = written();
            let started = Instant::now();
            let flush = handle.flush().await.unwrap();
            let took = started.elapsed();
            let bytes = written() - written_before;
            assert_eq!(flush.written, STREAMS, "{flush:?}");
            if round >= WARM_UP {
                result.bytes.push(bytes as f64);
                result.times.push(ms(took));
            }
        }
        drop(trackers);
        registry
            .shutdown(clock.now() + Millis::from_secs(10))
            .await
            .unwrap();
        worker.await;
        result
    })
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not.
    let args: Vec<String> = std::env::args().collect();
    let test_mode = !args.iter().any(|a| a == "--bench") || args.iter().any(|a| a == "--test");
    let streams: u64 = if test_mode { 2_000 } else { 100_000 };
    let rounds = if test_mode { 1 } else { 3 };

    let mut with = Vec::new();
    let mut without = Vec::new();
    for round in 0..rounds {
        // Alternate which store goes first.
        if round % 2 == 0 {
            with.push(dirty_flush(streams, true, round == 0));
            without.push(dirty_flush(streams, false, false));
        } else {
            without.push(dirty_flush(streams, false, false));
            with.push(dirty_flush(streams, true, false));
        }
    }
    let flush_ms = |runs: &[DirtyFlush]| median(runs.iter().map(|r| ms(r.flush)).collect());
    let (with_ms, without_ms) = (flush_ms(&with), flush_ms(&without));
    let cursors_file = without[0].cursors_file;

    let floor_dir = tempfile::tempdir().unwrap();
    let floor_path = floor_dir.path().join("floor");
    let bytes = vec![b'x'; cursors_file as usize];
    let started = Instant::now();
    std::fs::write(&floor_path, &bytes).unwrap();
    std::fs::File::open(&floor_path)
        .unwrap()
        .sync_all()
        .unwrap();
    let floor = ms(started.elapsed());

    println!("scale: {streams} streams, one event committed each, median of {rounds} rounds");
    let (opened, flushed) = with[0].rss.unwrap();
    println!(
        "  resident memory       {:.1} MB total, {:.0} B per stream (target <= 2 GB for 100k); \
         {:.0} B per stream after the flush (with the store's copies of the cursors and windows)",
        opened as f64 / 1e6,
        opened as f64 / streams as f64,
        flushed as f64 / streams as f64,
    );
    println!(
        "  flush, cursors only   {without_ms:.1} ms (rounds {:?}), {} bytes written, {cursors_file} bytes state file",
        without
            .iter()
            .map(|r| ms(r.flush).round())
            .collect::<Vec<_>>(),
        without[0].bytes_written,
    );
    println!(
        "  flush with windows    {with_ms:.1} ms (rounds {:?}), {} bytes written, {} + {} bytes files \
         (target <= 1 s)",
        with.iter().map(|r| ms(r.flush).round()).collect::<Vec<_>>(),
        with[0].bytes_written,
        with[0].cursors_file,
        with[0].windows_file,
    );
    println!(
        "  windows / cursors only: {:.2}x the time (target <= 2x), {:.2}x the bytes",
        with_ms / without_ms,
        with[0].bytes_written as f64 / without[0].bytes_written as f64
    );
    println!(
        "  baseline: write+fsync of {cursors_file} bytes {floor:.1} ms (cursors-only flush/baseline {:.1}x)",
        without_ms / floor.max(1e-6)
    );

    let flushes = if test_mode { 4 } else { 80 };
    println!(
        "steady: 100 streams at 100k events/s, 250 ms flush (25,000 events per flush), {flushes} flushes after 8 to fill the windows"
    );
    for uuid_ids in [false, true] {
        let with = steady(true, uuid_ids, flushes);
        let without = steady(false, uuid_ids, flushes);
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
        println!(
            "  {} ids: bytes per flush with windows median {:.0}, mean {:.0}, max {:.0}; cursors only median {:.0} \
             ({:.2}x by median, {:.2}x by mean); flush time median {:.2} ms vs {:.2} ms ({:.2}x)",
            if uuid_ids { "UUID" } else { "numeric" },
            median(with.bytes.clone()),
            mean(&with.bytes),
            max(&with.bytes),
            median(without.bytes.clone()),
            median(with.bytes.clone()) / median(without.bytes.clone()),
            mean(&with.bytes) / mean(&without.bytes),
            median(with.times.clone()),
            median(without.times.clone()),
            median(with.times.clone()) / median(without.times.clone()),
        );
    }

    if !test_mode {
        assert!(opened <= 2_000_000_000, "resident memory over 2 GB");
        assert!(with_ms <= 1e3, "flush slower than 1 s");
    }
}
