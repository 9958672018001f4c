//! Unit tests of the file log: the encoding, and failures injected where a
//! real disk cannot be made to fail on cue (a short write, a failed fsync, a
//! crash between compaction's copy and its delete).

use super::*;
use crate::proxy::storage::LogStorage;

/// Failures the next write (or compaction) runs into.
#[derive(Debug, Default)]
pub(super) struct Faults {
    /// Write only this many bytes of the next batch, then fail (a full disk).
    pub(super) short_write: Option<usize>,
    /// Fail the next fsync.
    pub(super) fail_sync: bool,
    /// Stop compaction after its copies are durable, before the old segment
    /// is deleted, as a crash there would.
    pub(super) crash_mid_compaction: bool,
}

fn token(n: u8) -> StreamToken {
    StreamToken::from_bytes([n; 16])
}

fn open(n: u8) -> LogOp {
    LogOp::Open(StreamMeta {
        token: token(n),
        kind: if n.is_multiple_of(2) {
            StreamKind::Get
        } else {
            StreamKind::Post
        },
        target: format!("/events/{n}?q=ü"),
        identity: Identity::from_bytes([n.wrapping_mul(7); 16]),
        created: Millis(1_000 + u64::from(n)),
    })
}

fn append(n: u8, seq: u64) -> LogOp {
    LogOp::Append {
        token: token(n),
        record: record(n, seq),
    }
}

fn record(n: u8, seq: u64) -> LogRecord {
    LogRecord::new(
        seq,
        Millis(5_000 + seq),
        (!seq.is_multiple_of(3))
            .then(|| format!("up-{seq}"))
            .as_deref(),
        format!("id: {}-{seq}\ndata: event {seq}\n\n", token(n)).as_bytes(),
    )
}

fn seqs(stream: &StoredStream) -> Vec<u64> {
    stream.records.iter().map(|r| r.seq).collect()
}

#[test]
fn every_op_encodes_and_decodes_to_itself() {
    let ops = [
        open(1),
        open(2),
        append(1, 1),
        append(1, 3),
        LogOp::Append {
            token: token(2),
            record: LogRecord::new(u64::MAX, Millis(u64::MAX), Some(""), b""),
        },
        LogOp::Trim {
            token: token(1),
            first_seq: 3,
        },
        LogOp::End { token: token(1) },
        LogOp::Drop { token: token(2) },
    ];
    for op in ops {
        let mut buf = Vec::new();
        let len = encode_op(&mut buf, &op).unwrap();
        assert_eq!(len as usize, buf.len());
        assert_eq!(parse_record(&buf), Ok((op.clone(), buf.len())));
        for cut in 0..buf.len() {
            assert_eq!(
                parse_record(&buf[..cut]),
                Err(Bad::Torn),
                "{op:?} cut at {cut}"
            );
        }
        for at in 0..buf.len() {
            let mut flipped = buf.clone();
            flipped[at] ^= 0x40;
            assert!(parse_record(&flipped).is_err(), "{op:?} flipped at {at}");
        }
    }
}

#[test]
fn a_short_write_is_cut_back_and_the_retry_appends_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = FileLog::open(dir.path()).unwrap();
    log.write(&[open(1), append(1, 1)]).unwrap();
    let good = log.disk_bytes();
    let batch = [append(1, 2), append(1, 3)];
    for cut in [1, 9, 30] {
        log.faults.short_write = Some(cut);
        let error = log.write(&batch).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::StorageFull);
        assert_eq!(log.disk_bytes(), good);
        let on_disk = fs::metadata(segment_path(dir.path(), 1)).unwrap().len();
        assert_eq!(on_disk, good, "cut back after a short write of {cut}");
    }
    log.write(&batch).unwrap();
    log.write(&[append(1, 4)]).unwrap();
    drop(log);
    let mut log = FileLog::open(dir.path()).unwrap();
    let streams = log.recover().unwrap();
    assert_eq!(streams.len(), 1);
    assert_eq!(seqs(&streams[0]), [1, 2, 3, 4]);
}

#[test]
fn a_failed_fsync_returns_err_and_the_retry_stores_each_op_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = FileLog::open(dir.path()).unwrap();
    log.faults.fail_sync = true;
    let batch = [open(1), append(1, 1), append(1, 2)];
    assert!(log.write(&batch).is_err());
    assert_eq!(log.disk_bytes(), HEADER_LEN);
    log.write(&batch).unwrap();
    // The same batch again (as a retry after an Err that had in fact
    // written) stores nothing more.
    let after = log.disk_bytes();
    log.write(&batch).unwrap();
    assert_eq!(log.disk_bytes(), after);
    drop(log);
    let mut log = FileLog::open(dir.path()).unwrap();
    let streams = log.recover().unwrap();
    assert_eq!(seqs(&streams[0]), [1, 2]);
}

/// Event `seq` of stream 1, kept, and four events of stream 3, trimmed:
/// a batch of which dead bytes come to dominate.
fn kept_and_trimmed(seq: u64) -> Vec<LogOp> {
    let mut batch = vec![append(1, seq)];
    batch.extend((1..=4).map(|i| append(3, seq * 4 + i)));
    batch.push(LogOp::Trim {
        token: token(3),
        first_seq: seq * 4 + 4,
    });
    batch
}

#[test]
fn a_crash_mid_compaction_recovers_without_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = FileLog::open_with_segment_bytes(dir.path(), 600).unwrap();
    log.write(&[open(1), open(2), open(3), append(2, 1)])
        .unwrap();
    log.write(&[LogOp::End { token: token(2) }]).unwrap();
    // Every segment gets one event of stream 1, kept, and events of stream
    // 3, trimmed: dead bytes come to dominate.
    log.faults.crash_mid_compaction = true;
    let mut seq = 0;
    while !log.compaction_failed {
        seq += 1;
        assert!(seq < 100, "compaction never started");
        log.write(&kept_and_trimmed(seq)).unwrap();
    }
    let oldest = *log.segments.keys().next().unwrap();
    assert!(segment_path(dir.path(), oldest).exists());
    drop(log);

    let mut log = FileLog::open_with_segment_bytes(dir.path(), 600).unwrap();
    assert!(
        !segment_path(dir.path(), oldest).exists(),
        "the old copy is deleted at open: nothing in it is live"
    );
    let streams = log.recover().unwrap();
    assert_eq!(streams.len(), 3);
    assert_eq!(seqs(&streams[0]), (1..=seq).collect::<Vec<_>>());
    assert_eq!(streams[0].records[0], record(1, 1));
    assert_eq!(seqs(&streams[1]), [1]);
    assert!(!streams[0].ended && streams[1].ended);
    assert_eq!(seqs(&streams[2]), [seq * 4 + 4]);
    assert!(log.disk_bytes() <= 2 * log.live_bytes() + 600 + 600);
}

#[test]
fn a_torn_segment_header_is_started_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = FileLog::open_with_segment_bytes(dir.path(), 100).unwrap();
    log.write(&[open(1), append(1, 1)]).unwrap();
    drop(log);
    // A crash while the next segment was being created.
    fs::write(segment_path(dir.path(), 2), &header()[..5]).unwrap();
    let mut log = FileLog::open_with_segment_bytes(dir.path(), 100).unwrap();
    log.write(&[append(1, 2)]).unwrap();
    drop(log);
    let mut log = FileLog::open(dir.path()).unwrap();
    assert_eq!(seqs(&log.recover().unwrap()[0]), [1, 2]);
}

#[test]
fn a_newer_format_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(FileLog::open(dir.path()).unwrap());
    let path = segment_path(dir.path(), 1);
    let mut bytes = fs::read(&path).unwrap();
    bytes[12] = 2;
    fs::write(&path, bytes).unwrap();
    let error = FileLog::open(dir.path()).unwrap_err();
    assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    assert!(error.to_string().contains("version 2"), "{error}");
}

#[test]
fn compaction_drops_an_event_changed_on_disk_and_moves_the_rest_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = FileLog::open_with_segment_bytes(dir.path(), 600).unwrap();
    log.write(&[open(1), open(3), append(1, 1), append(1, 2)])
        .unwrap();
    // Bit rot in event 1's record, after it was written.
    let loc = log.streams[&token(1)].records[0].loc;
    assert_eq!(loc.seg, 1);
    let path = segment_path(dir.path(), 1);
    let mut bytes = fs::read(&path).unwrap();
    bytes[(loc.offset + loc.len) as usize - 3] ^= 0x20;
    fs::write(&path, bytes).unwrap();
    // Stream 3's events, trimmed as they come, make dead bytes dominate
    // until the first segment is compacted.
    let mut seq = 2;
    while log.segments.contains_key(&1) {
        seq += 1;
        assert!(seq < 100, "the first segment was never compacted");
        log.write(&kept_and_trimmed(seq)).unwrap();
    }
    assert!(!path.exists());
    let kept: Vec<u64> = log.streams[&token(1)]
        .records
        .iter()
        .map(|s| s.seq)
        .collect();
    assert_eq!(kept, (2..=seq).collect::<Vec<_>>());
    let live = log.live_bytes();
    drop(log);

    let mut log = FileLog::open_with_segment_bytes(dir.path(), 600).unwrap();
    let streams = log.recover().unwrap();
    assert_eq!(seqs(&streams[0]), (2..=seq).collect::<Vec<_>>());
    assert_eq!(streams[0].records[0], record(1, 2), "moved as written");
    assert_eq!(log.live_bytes(), live, "the lost event was booked dead");
}
