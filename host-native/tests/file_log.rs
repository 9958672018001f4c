//! The proxy's file log (`tidemark proxy --log DIR`) through its public API:
//! every op survives a reopen, a torn tail is cut wherever the crash tore
//! it, corruption is found, compaction keeps exactly what is live, the
//! identity key persists, one directory serves one proxy, and random op
//! sequences recover to what an in-memory model of the log says.

use proptest::prelude::*;
use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tidemark::core::Millis;
use tidemark::core::replay::{Identity, LogRecord, StreamToken};
use tidemark::proxy::{FileLog, LogOp, LogStorage, StoredStream, StreamKind, StreamMeta};

fn token(n: u8) -> StreamToken {
    StreamToken::from_bytes([n; 16])
}

fn meta(n: u8) -> StreamMeta {
    StreamMeta {
        token: token(n),
        kind: if n.is_multiple_of(2) {
            StreamKind::Get
        } else {
            StreamKind::Post
        },
        target: format!("/v1/stream/{n}?model=x&q=ü"),
        identity: Identity::from_bytes([n.wrapping_mul(31); 16]),
        created: Millis(1_700_000_000_000 + u64::from(n)),
    }
}

fn record(n: u8, seq: u64, data_len: usize) -> LogRecord {
    let mut frame = format!("id: {}-{seq}\ndata: ", token(n)).into_bytes();
    frame.extend(std::iter::repeat_n(b'a' + (seq % 26) as u8, data_len));
    frame.extend_from_slice(b"\n\n");
    LogRecord::new(
        seq,
        Millis(1_700_000_100_000 + seq),
        seq.is_multiple_of(2)
            .then(|| format!("upstream-{seq}"))
            .as_deref(),
        &frame,
    )
}

fn append(n: u8, seq: u64) -> LogOp {
    LogOp::Append {
        token: token(n),
        record: record(n, seq, 20),
    }
}

/// What the log should hold after some ops: the rules of the module docs,
/// written the simplest way.
#[derive(Debug, Default)]
struct Model {
    streams: BTreeMap<StreamToken, (StoredStream, u64, u64)>, // stream, floor, next seq
}

impl Model {
    fn apply(&mut self, op: &LogOp) {
        match op {
            LogOp::Open(meta) => {
                self.streams.entry(meta.token).or_insert_with(|| {
                    let stream = StoredStream {
                        meta: meta.clone(),
                        records: Vec::new(),
                        ended: false,
                    };
                    (stream, 0, 1)
                });
            }
            LogOp::Append { token, record } => {
                if let Some((stream, _, next)) = self.streams.get_mut(token)
                    && record.seq >= *next
                {
                    *next = record.seq + 1;
                    stream.records.push(record.clone());
                }
            }
            LogOp::Trim { token, first_seq } => {
                if let Some((stream, floor, next)) = self.streams.get_mut(token)
                    && *first_seq > *floor
                {
                    *floor = *first_seq;
                    *next = (*next).max(*first_seq);
                    stream.records.retain(|r| r.seq >= *first_seq);
                }
            }
            LogOp::End { token } => {
                if let Some((stream, _, _)) = self.streams.get_mut(token) {
                    stream.ended = true;
                }
            }
            LogOp::Drop { token } => {
                self.streams.remove(token);
            }
        }
    }

    fn expected(&self) -> Vec<StoredStream> {
        let mut streams: Vec<StoredStream> =
            self.streams.values().map(|(s, _, _)| s.clone()).collect();
        streams.sort_by_key(|s| (s.meta.created, s.meta.token));
        streams
    }
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_str().unwrap();
            name.starts_with("segment-") && name.ends_with(".log")
        })
        .collect();
    paths.sort();
    paths
}

fn segment_number(path: &Path) -> u64 {
    let name = path.file_name().unwrap().to_str().unwrap();
    name["segment-".len()..name.len() - ".log".len()]
        .parse()
        .unwrap()
}

fn recover(dir: &Path) -> Vec<StoredStream> {
    FileLog::open(dir).unwrap().recover().unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap() != "lock" {
            fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
        }
    }
}

#[test]
fn every_op_kind_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let ops = vec![
        LogOp::Open(meta(1)),
        LogOp::Open(meta(2)),
        LogOp::Open(meta(3)),
        append(1, 1),
        append(2, 1),
        append(1, 2),
        LogOp::Append {
            token: token(1),
            record: record(1, 5, 0),
        },
        append(3, 1),
        LogOp::Trim {
            token: token(1),
            first_seq: 2,
        },
        LogOp::End { token: token(2) },
        LogOp::Drop { token: token(3) },
    ];
    let mut model = Model::default();
    ops.iter().for_each(|op| model.apply(op));
    let mut log = FileLog::open(dir.path()).unwrap();
    assert!(log.is_durable());
    assert!(log.recover().unwrap().is_empty());
    log.write(&ops[..4]).unwrap();
    log.write(&ops[4..]).unwrap();
    drop(log);

    let streams = recover(dir.path());
    assert_eq!(streams, model.expected());
    assert_eq!(streams.len(), 2);
    assert_eq!(streams[0].meta, meta(1));
    assert_eq!(
        streams[0].records,
        [record(1, 2, 20), record(1, 5, 0)],
        "trimmed to 2, a gap kept"
    );
    assert!(!streams[0].ended);
    assert_eq!(streams[1].meta.kind, StreamKind::Get);
    assert_eq!(streams[1].records, [record(2, 1, 20)]);
    assert!(streams[1].ended);
}

#[test]
fn a_torn_tail_is_cut_at_every_byte_and_the_next_write_appends_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = FileLog::open(dir.path()).unwrap();
    log.write(&[LogOp::Open(meta(1)), append(1, 1), append(1, 2)])
        .unwrap();
    let before = log.disk_bytes();
    log.write(&[append(1, 3)]).unwrap();
    let after = log.disk_bytes();
    drop(log);
    let segment = segments(dir.path()).pop().unwrap();
    let name = segment.file_name().unwrap().to_owned();
    assert_eq!(fs::metadata(&segment).unwrap().len(), after);

    for cut in before..after {
        let torn = tempfile::tempdir().unwrap();
        copy_dir(dir.path(), torn.path());
        let file = fs::OpenOptions::new()
            .write(true)
            .open(torn.path().join(&name))
            .unwrap();
        file.set_len(cut).unwrap();
        drop(file);

        let mut log = FileLog::open(torn.path()).unwrap();
        let streams = log.recover().unwrap();
        assert_eq!(streams.len(), 1, "cut at {cut}");
        assert_eq!(streams[0].records, [record(1, 1, 20), record(1, 2, 20)]);
        assert_eq!(log.disk_bytes(), before, "the torn record is cut off");
        assert_eq!(fs::metadata(torn.path().join(&name)).unwrap().len(), before);
        log.write(&[append(1, 3), append(1, 4)]).unwrap();
        drop(log);
        let streams = recover(torn.path());
        let seqs: Vec<u64> = streams[0].records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4], "cut at {cut}");
    }
}

#[test]
fn a_flipped_byte_in_the_last_segment_ends_the_log_there() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = FileLog::open(dir.path()).unwrap();
    log.write(&[LogOp::Open(meta(1)), append(1, 1)]).unwrap();
    let middle = log.disk_bytes() + 20;
    log.write(&[append(1, 2)]).unwrap();
    log.write(&[append(1, 3)]).unwrap();
    drop(log);
    let segment = segments(dir.path()).pop().unwrap();
    let mut bytes = fs::read(&segment).unwrap();
    bytes[middle as usize] ^= 1;
    fs::write(&segment, bytes).unwrap();

    let mut log = FileLog::open(dir.path()).unwrap();
    let streams = log.recover().unwrap();
    assert_eq!(streams[0].records, [record(1, 1, 20)]);
    assert_eq!(log.disk_bytes(), middle - 20);
    log.write(&[append(1, 4)]).unwrap();
    drop(log);
    let seqs: Vec<u64> = recover(dir.path())[0]
        .records
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(seqs, [1, 4]);
}

#[test]
fn a_flipped_byte_in_an_earlier_segment_costs_only_its_remainder() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = FileLog::open_with_segment_bytes(dir.path(), 1_000).unwrap();
    log.write(&[LogOp::Open(meta(1)), LogOp::Open(meta(2))])
        .unwrap();
    let first = log.disk_bytes();
    log.write(&[append(1, 1), append(1, 2)]).unwrap();
    let mut seq = 0;
    while log.segment_count() < 3 {
        seq += 1;
        log.write(&[append(2, seq)]).unwrap();
    }
    drop(log);
    let paths = segments(dir.path());
    let mut bytes = fs::read(&paths[0]).unwrap();
    bytes[first as usize + 30] ^= 0x10; // inside append(1, 1)
    fs::write(&paths[0], bytes).unwrap();

    let streams = recover(dir.path());
    assert_eq!(streams.len(), 2, "both Opens came before the flipped byte");
    assert!(
        streams[0].records.is_empty(),
        "1/1 and 1/2 after it are lost"
    );
    assert!(!streams[1].records.is_empty(), "later segments are read");
    assert_eq!(segments(dir.path()).len(), 3, "nothing was cut");
}

#[test]
fn compaction_keeps_exactly_the_live_records_and_deletes_dead_segments() {
    let dir = tempfile::tempdir().unwrap();
    const SEGMENT: u64 = 2_000;
    let mut log = FileLog::open_with_segment_bytes(dir.path(), SEGMENT).unwrap();
    let mut model = Model::default();
    let mut write = |log: &mut FileLog, ops: Vec<LogOp>| {
        ops.iter().for_each(|op| model.apply(op));
        log.write(&ops).unwrap();
    };
    // A long-lived stream with one event in each round, kept; a busy stream
    // trimmed to its last 3 events; short POST streams that end and are
    // dropped.
    write(&mut log, vec![LogOp::Open(meta(1)), LogOp::Open(meta(2))]);
    let mut busy = 0;
    let mut max_disk = 0;
    for round in 1..=300u64 {
        let mut ops = vec![append(1, round)];
        for _ in 0..5 {
            busy += 1;
            ops.push(append(2, busy));
        }
        ops.push(LogOp::Trim {
            token: token(2),
            first_seq: busy - 2,
        });
        let post = 10 + (round % 200) as u8;
        ops.extend([
            LogOp::Open(meta(post)),
            append(post, 1),
            LogOp::End { token: token(post) },
        ]);
        write(&mut log, ops);
        write(&mut log, vec![LogOp::Drop { token: token(post) }]);
        max_disk = max_disk.max(log.disk_bytes());
        assert!(
            log.disk_bytes() <= 2 * log.live_bytes() + 3 * SEGMENT,
            "round {round}: {log:?}"
        );
        assert_eq!(segments(dir.path()).len(), log.segment_count());
    }
    // Over 1,800 events and 300 streams went through; the disk held at most
    // about the live events of the long-lived stream, twice, plus segments.
    assert!(max_disk < 100_000, "max disk {max_disk}");
    drop(log);

    let streams = recover(dir.path());
    assert_eq!(streams, model.expected());
    assert_eq!(streams.len(), 2);
    assert_eq!(streams[0].records.len(), 300);
    let busy_seqs: Vec<u64> = streams[1].records.iter().map(|r| r.seq).collect();
    assert_eq!(busy_seqs, [busy - 2, busy - 1, busy]);
}

#[test]
fn the_identity_key_is_kept_across_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = FileLog::open(dir.path()).unwrap();
    let key = log.identity_key([7; 32]).unwrap();
    assert_eq!(key, [7; 32]);
    assert_eq!(log.identity_key([8; 32]).unwrap(), [7; 32]);
    drop(log);
    let mut log = FileLog::open(dir.path()).unwrap();
    assert_eq!(log.identity_key([9; 32]).unwrap(), [7; 32]);
    assert!(!dir.path().join("identity.key.tmp").exists());
    drop(log);

    // A damaged key file is refused, not silently replaced.
    let path = dir.path().join("identity.key");
    let mut bytes = fs::read(&path).unwrap();
    *bytes.last_mut().unwrap() ^= 1;
    fs::write(&path, bytes).unwrap();
    let mut log = FileLog::open(dir.path()).unwrap();
    let error = log.identity_key([9; 32]).unwrap_err();
    assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    assert!(error.to_string().contains("identity.key"), "{error}");
}

#[test]
fn a_second_open_of_the_directory_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let first = FileLog::open(dir.path().join("log")).unwrap();
    let error = FileLog::open(dir.path().join("log")).unwrap_err();
    assert_eq!(error.kind(), io::ErrorKind::ResourceBusy);
    let message = error.to_string();
    assert!(message.contains("in use by another process"), "{message}");
    assert!(message.contains("--log"), "{message}");
    drop(first);
    FileLog::open(dir.path().join("log")).unwrap();
}

/// One step of a random run, resolved against the model's state.
#[derive(Clone, Debug)]
enum Step {
    Open(u8),
    Append {
        stream: u8,
        skip: u64,
        len: usize,
    },
    Trim {
        stream: u8,
        keep: u64,
    },
    End(u8),
    Drop(u8),
    /// An op the log must ignore: a stale append, an Open of an open stream.
    Noise(u8),
    /// Ends the batch.
    Commit,
    /// Ends the batch, closes the log and opens it again.
    Reopen,
    /// Ends the batch and crashes as if every segment the write deleted
    /// (after compaction copied what was live in it) were still there.
    Crash,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        2 => (0..6u8).prop_map(Step::Open),
        8 => (0..6u8, 0..3u64, 0..120usize)
            .prop_map(|(stream, skip, len)| Step::Append { stream, skip, len }),
        2 => (0..6u8, 0..4u64).prop_map(|(stream, keep)| Step::Trim { stream, keep }),
        1 => (0..6u8).prop_map(Step::End),
        1 => (0..6u8).prop_map(Step::Drop),
        1 => (0..6u8).prop_map(Step::Noise),
        3 => Just(Step::Commit),
        1 => Just(Step::Reopen),
        2 => Just(Step::Crash),
    ]
}

proptest! {
    // Each case fsyncs a few dozen times: 48 cases by default, more with
    // PROPTEST_CASES.
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(48),
    ))]

    #[test]
    fn random_runs_recover_to_the_model(
        steps in proptest::collection::vec(step(), 1..80),
        segment in prop_oneof![Just(150u64), Just(700), Just(1 << 20)],
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut log = FileLog::open_with_segment_bytes(dir.path(), segment).unwrap();
        let mut model = Model::default();
        let mut batch: Vec<LogOp> = Vec::new();
        for step in steps.into_iter().chain([Step::Commit]) {
            let op = match step {
                Step::Open(n) => Some(LogOp::Open(meta(n))),
                Step::Append { stream, skip, len } => {
                    model.streams.get(&token(stream)).map(|&(_, _, next)| LogOp::Append {
                        token: token(stream),
                        record: record(stream, next + skip, len),
                    })
                }
                Step::Trim { stream, keep } => {
                    model.streams.get(&token(stream)).map(|&(_, floor, next)| LogOp::Trim {
                        token: token(stream),
                        first_seq: next.saturating_sub(keep).max(floor + 1),
                    })
                }
                Step::End(n) => Some(LogOp::End { token: token(n) }),
                Step::Drop(n) => Some(LogOp::Drop { token: token(n) }),
                Step::Noise(n) => Some(match model.streams.get(&token(n)) {
                    Some((stream, _, _)) if !stream.records.is_empty() => LogOp::Append {
                        token: token(n),
                        record: stream.records[0].clone(),
                    },
                    _ => LogOp::Append { token: token(n), record: record(n, 1, 3) },
                }),
                Step::Commit | Step::Reopen | Step::Crash => {
                    let before: Vec<(PathBuf, Vec<u8>)> = match step {
                        Step::Crash => segments(dir.path())
                            .into_iter()
                            .map(|p| { let bytes = fs::read(&p).unwrap(); (p, bytes) })
                            .collect(),
                        _ => Vec::new(),
                    };
                    log.write(&batch).unwrap();
                    batch.clear();
                    // Deletions are durable one by one, in order: the
                    // crash came before the first. Not simulated when the
                    // write deleted a segment it had also written to (the
                    // one active before it, or one it made): the test does
                    // not know that segment's last content.
                    let newest_before = before.last().map_or(0, |(p, _)| segment_number(p));
                    let now: Vec<u64> = segments(dir.path()).iter().map(|p| segment_number(p)).collect();
                    let made = now.iter().filter(|&&n| n > newest_before).count() as u64;
                    if made == now.last().unwrap() - newest_before && now.contains(&newest_before) {
                        for (path, bytes) in before {
                            if !path.exists() {
                                fs::write(path, bytes).unwrap();
                            }
                        }
                    }
                    if let Step::Reopen | Step::Crash = step {
                        drop(log);
                        log = FileLog::open_with_segment_bytes(dir.path(), segment).unwrap();
                        prop_assert_eq!(log.recover().unwrap(), model.expected());
                    }
                    None
                }
            };
            if let Some(op) = op {
                model.apply(&op);
                batch.push(op);
            }
        }
        prop_assert_eq!(segments(dir.path()).len(), log.segment_count());
        drop(log);
        prop_assert_eq!(recover(dir.path()), model.expected());
    }
}

/// Appends per second with one fsync per batch, for batches of 1 and of
/// 100 events of about 100 bytes, on the disk of the target directory.
#[test]
#[ignore = "a measurement: cargo test --release -p tidemark --test file_log -- --ignored --nocapture"]
fn appends_per_second() {
    let root = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    for size in [1usize, 100] {
        let mut log = FileLog::open(root.path().join(size.to_string())).unwrap();
        log.write(&[LogOp::Open(meta(1))]).unwrap();
        let record = LogRecord::new(0, Millis(0), Some("upstream-id-123"), &[b'x'; 100]);
        let mut seq = 0;
        let mut batches = 0u64;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            let ops: Vec<LogOp> = (0..size)
                .map(|_| {
                    seq += 1;
                    LogOp::Append {
                        token: token(1),
                        record: {
                            let mut record = record.clone();
                            record.seq = seq;
                            record.time = Millis(seq);
                            record
                        },
                    }
                })
                .collect();
            log.write(&ops).unwrap();
            batches += 1;
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "batch of {size:>3}: {:>8.0} batches/s (fsyncs/s), {:>9.0} events/s, {:.3} ms per batch",
            batches as f64 / secs,
            seq as f64 / secs,
            secs * 1e3 / batches as f64
        );
    }
}
