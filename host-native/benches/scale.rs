//! One process tracking 100,000 streams: resident memory per stream, and the
//! time to flush 100,000 dirty cursors to a `FileStore` (one `save_batch`:
//! encode, write a temporary file, fsync, rename, fsync the directory).
//!
//! Baseline in the same run: writing and fsyncing the same number of bytes
//! with `std::fs::write` + `sync_all`, the I/O floor of any durable flush.
//!
//! Run: `cargo bench -p tidemark --bench scale` (under `cargo test` it runs
//! 2,000 streams and asserts no targets).
//! Targets: at most 2 GB resident for 100k streams, at most 1 s per flush.

use std::sync::Arc;
use std::time::Instant;
use tidemark::{FileStore, SmolClock};
use tidemark_core::{Clock, Config, Millis, StreamKey, WorkerConfig, persistence};

fn rss_anon() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not.
    let args: Vec<String> = std::env::args().collect();
    let test_mode = !args.iter().any(|a| a == "--bench") || args.iter().any(|a| a == "--test");
    let streams: u64 = if test_mode { 2_000 } else { 100_000 };
    let dir = tempfile::tempdir().unwrap();
    let clock = SmolClock::new();
    let store = Arc::new(FileStore::open(dir.path()).unwrap());
    let config = Config {
        worker: WorkerConfig {
            flush_interval: Millis::from_secs(3600),
            ..WorkerConfig::default()
        },
        ..Config::default()
    };
    let (registry, worker) = persistence(store.clone(), clock, config);
    let handle = registry.worker().clone();

    let before = rss_anon();
    let trackers: Vec<_> = smol::block_on(async {
        let mut trackers = Vec::with_capacity(streams as usize);
        for s in 0..streams {
            let key = StreamKey::new(
                "2f1c6b1e-6a51-4a7e-9f0e-7d3c2b1a0f9e",
                format!("stream-{s}"),
            );
            let mut tracker = registry.open(key).await.unwrap();
            let id = format!("{s}-1");
            assert!(tracker.observe(Some(&id), clock.now()).is_fresh());
            tracker.commit();
            trackers.push(tracker);
        }
        trackers
    });
    let grown = rss_anon().saturating_sub(before);
    let per_stream = grown as f64 / streams as f64;

    // The worker starts only now, so that all cursors are dirty at once.
    let report = smol::block_on(async {
        let worker = smol::spawn(worker.run());
        let started = Instant::now();
        let flush = handle.flush().await.unwrap();
        let flushed_in = started.elapsed();
        assert_eq!(flush.written as u64, streams, "{flush:?}");
        let report = registry
            .shutdown(clock.now() + Millis::from_secs(10))
            .await
            .unwrap();
        worker.await;
        (flushed_in, report)
    });
    let (flushed_in, shutdown) = report;
    assert!(shutdown.is_complete());
    let file_bytes = std::fs::metadata(store.path()).unwrap().len();

    let floor_path = dir.path().join("floor");
    let bytes = vec![b'x'; file_bytes as usize];
    let started = Instant::now();
    std::fs::write(&floor_path, &bytes).unwrap();
    std::fs::File::open(&floor_path)
        .unwrap()
        .sync_all()
        .unwrap();
    let floor = started.elapsed();

    println!("scale: {streams} streams, one event committed each");
    println!(
        "  resident memory       {:.1} MB total, {per_stream:.0} B per stream (target <= 2 GB for 100k)",
        grown as f64 / 1e6
    );
    println!(
        "  flush of all cursors  {:.1} ms, {} bytes state file (target <= 1 s)",
        flushed_in.as_secs_f64() * 1e3,
        file_bytes
    );
    println!(
        "  baseline: write+fsync of the same bytes {:.1} ms (flush/baseline {:.1}x)",
        floor.as_secs_f64() * 1e3,
        flushed_in.as_secs_f64() / floor.as_secs_f64().max(1e-9)
    );
    drop(trackers);
    if !test_mode {
        assert!(grown <= 2_000_000_000, "resident memory over 2 GB");
        assert!(flushed_in.as_secs_f64() <= 1.0, "flush slower than 1 s");
    }
}
