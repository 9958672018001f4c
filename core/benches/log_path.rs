//! The proxy's per-event path in the core, one upstream chunk at a time:
//! parse, drop replays in the tracker, encode into the replay log, and read
//! back what a client gets. `borrowed` is what `tidemark proxy` does
//! (`Parser::feed_with`, one `LogBatch` per chunk, `ReplayLog::append_batch`);
//! `owned` is the path it replaced, in the same run (`Parser::feed` and an
//! owned `Event` per event, `ReplayLog::append` per event).
//!
//! Input: 1M events (10,000 under `cargo test --benches`) shaped like `tidemark serve`'s (`id: N`, `data: N`), in
//! 64 KiB chunks, with the default tracker window and a retention of 10,000
//! events (the proxy's default), read by one client after each chunk.
//!
//! Run: `cargo bench -p tidemark-core --bench log_path`.
//! Instruction counts: with `TIDEMARK_LOG_PATH=<path>:<n>` the binary skips
//! criterion and runs the whole input `n` times (`path` is `borrowed` or
//! `owned`) inside `log_path::run_borrowed` or `log_path::run_owned`:
//!
//! ```text
//! BIN=$(ls -t target/release/deps/log_path-* | grep -v '\.d$' | head -1)
//! TIDEMARK_LOG_PATH=borrowed:1 valgrind --tool=callgrind \
//!     --callgrind-out-file=/dev/null --toggle-collect='log_path::run_borrowed' $BIN
//! ```
//!
//! (The exact name: a pattern such as `run_*` also matches the closures
//! inside, and entering one would switch collection off.)

use criterion::{Criterion, Throughput, criterion_group};
use std::fmt::Write;
use std::hint::black_box;
use tidemark_core::replay::{LogBatch, ReplayLog, Retention, StreamToken};
use tidemark_core::sse::{Item, ItemRef, Limits, Parser};
use tidemark_core::{EventTracker, Millis, StreamKey, TrackerConfig};

const CHUNK: usize = 64 << 10;

/// 1M events when measuring; 10,000 when `cargo test --benches` runs the
/// bench once, unoptimized, as a test.
fn events() -> u64 {
    let measuring =
        std::env::args().any(|a| a == "--bench") || std::env::var_os("TIDEMARK_LOG_PATH").is_some();
    if measuring { 1_000_000 } else { 10_000 }
}

fn chunks(events: u64) -> Vec<Vec<u8>> {
    let mut text = String::new();
    for n in 1..=events {
        write!(text, "id: {n}\ndata: {n}\n\n").unwrap();
    }
    text.into_bytes()
        .chunks(CHUNK)
        .map(<[u8]>::to_vec)
        .collect()
}

fn setup() -> (Parser, EventTracker, ReplayLog, Vec<u8>) {
    let retention = Retention {
        max_events: 10_000,
        ..Retention::default()
    };
    (
        Parser::new(Limits::default()),
        EventTracker::new(StreamKey::new("bench", "1"), TrackerConfig::default()),
        ReplayLog::new(StreamToken::from_bytes([7; 16]), retention, Millis(0)),
        Vec::with_capacity(CHUNK * 3),
    )
}

/// Returns (events a client read, bytes it read).
fn run_borrowed(chunks: &[Vec<u8>]) -> (u64, usize) {
    let (mut parser, mut tracker, mut log, mut out) = setup();
    let mut batch = LogBatch::new();
    let (mut next, mut read, mut bytes) = (1, 0, 0);
    for (i, chunk) in chunks.iter().enumerate() {
        let now = Millis(i as u64);
        parser
            .feed_with(chunk, |item| {
                if let ItemRef::Event(event) = item
                    && tracker.observe(event.id, now).is_fresh()
                {
                    let _ = batch.push(event.id, event.event, event.data);
                }
            })
            .unwrap();
        tracker.commit();
        let appended = log.append_batch(now, &batch);
        batch.clear();
        log.mark_durable(appended.seq);
        out.clear();
        read += log.read(&mut next, usize::MAX, &mut out).events;
        bytes += out.len();
    }
    (read, bytes)
}

fn run_owned(chunks: &[Vec<u8>]) -> (u64, usize) {
    let (mut parser, mut tracker, mut log, mut out) = setup();
    let (mut next, mut read, mut bytes) = (1, 0, 0);
    for (i, chunk) in chunks.iter().enumerate() {
        let now = Millis(i as u64);
        parser.feed(chunk).unwrap();
        let mut events = Vec::new();
        while let Some(item) = parser.next_item() {
            if let Item::Event(event) = item
                && tracker.observe(event.id.as_deref(), now).is_fresh()
            {
                events.push(event);
            }
        }
        tracker.commit();
        for event in &events {
            let _ = log.append(now, event.id.as_deref(), &event.event, &event.data);
        }
        log.mark_durable(log.next_seq() - 1);
        out.clear();
        read += log.read(&mut next, usize::MAX, &mut out).events;
        bytes += out.len();
    }
    (read, bytes)
}

fn log_path(c: &mut Criterion) {
    let events = events();
    let chunks = chunks(events);
    let owned = run_owned(&chunks);
    assert_eq!(owned.0, events);
    assert_eq!(
        run_borrowed(&chunks),
        owned,
        "both paths serve the same bytes"
    );
    let mut group = c.benchmark_group("log_path");
    group.throughput(Throughput::Elements(events));
    group.sample_size(10);
    group.bench_function("borrowed", |b| b.iter(|| run_borrowed(black_box(&chunks))));
    group.bench_function("owned", |b| b.iter(|| run_owned(black_box(&chunks))));
    group.finish();
}

criterion_group!(benches, log_path);

fn main() {
    if let Ok(spec) = std::env::var("TIDEMARK_LOG_PATH") {
        let (path, n) = spec.split_once(':').expect("<path>:<n>");
        let run = match path {
            "borrowed" => run_borrowed,
            "owned" => run_owned,
            _ => panic!("path is borrowed or owned"),
        };
        let chunks = chunks(events());
        let mut read = (0, 0);
        for _ in 0..n.parse::<usize>().expect("n") {
            read = black_box(run(black_box(&chunks)));
        }
        println!("{path}: {n} x {} events, {} bytes read", read.0, read.1);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
