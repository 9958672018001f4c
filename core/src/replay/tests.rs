use super::*;
use crate::sse::{Item, Limits, Parser};
use proptest::prelude::*;

const TOKEN: StreamToken = StreamToken::from_bytes([0xab; 16]);
const OTHER: StreamToken = StreamToken::from_bytes([0xcd; 16]);

fn retention(max_events: usize) -> Retention {
    Retention {
        max_events,
        max_bytes: usize::MAX,
        idle: Millis(1000),
    }
}

/// A log of `n` durable events with data "1".."n".
fn log_of(n: u64, max_events: usize) -> ReplayLog {
    let mut log = ReplayLog::new(TOKEN, retention(max_events), Millis(0));
    for i in 1..=n {
        log.append(Millis(i), Some(&format!("u{i}")), "message", &i.to_string())
            .unwrap();
    }
    log.mark_durable(n);
    log
}

/// Parses what a client got: (event type, id, data) per event.
fn events(bytes: &[u8]) -> Vec<(String, String, String)> {
    let mut parser = Parser::new(Limits::default());
    parser.feed(bytes).unwrap();
    let mut out = Vec::new();
    while let Some(item) = parser.next_item() {
        if let Item::Event(e) = item {
            out.push((e.event, e.id.unwrap_or_default(), e.data));
        }
    }
    out
}

fn id(seq: u64) -> String {
    event_id(TOKEN, seq)
}

#[test]
fn tokens_and_ids_round_trip() {
    let token = StreamToken::random().unwrap();
    assert_ne!(token, StreamToken::random().unwrap());
    let text = token.to_string();
    assert_eq!(text.len(), 32);
    assert!(
        text.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );
    assert_eq!(StreamToken::parse(&text), Some(token));
    assert_eq!(parse_event_id(&event_id(token, 0)), Some((token, 0)));
    assert_eq!(
        parse_event_id(&event_id(token, u64::MAX)),
        Some((token, u64::MAX))
    );
    assert_eq!(id(42), format!("{}-42", "ab".repeat(16)));
}

#[test]
fn malformed_ids_are_not_ids() {
    let t = "ab".repeat(16);
    for bad in [
        String::new(),
        "42".into(),
        t.clone(),
        format!("{t}-"),
        format!("{t}-+1"),
        format!("{t}-01"),
        format!("{t}-1x"),
        format!("{t}-99999999999999999999999"),
        format!("{}-1", "AB".repeat(16)),
        format!("{}-1", "ab".repeat(15)),
        format!("{}g-1", "ab".repeat(15) + "a"),
    ] {
        assert_eq!(parse_event_id(&bad), None, "{bad:?}");
    }
}

#[test]
fn appended_events_get_increasing_ids_and_keep_type_and_data() {
    let mut log = ReplayLog::new(TOKEN, retention(10), Millis(0));
    log.append(Millis(1), Some("up-1"), "message", "a\nb")
        .unwrap();
    log.append(Millis(2), None, "delta", "c").unwrap();
    log.mark_durable(2);
    let mut next = 1;
    let mut out = Vec::new();
    let read = log.read(&mut next, usize::MAX, &mut out);
    assert_eq!(
        read,
        Read {
            events: 2,
            gap: None
        }
    );
    assert_eq!(next, 3);
    assert_eq!(
        events(&out),
        [
            ("message".into(), id(1), "a\nb".into()),
            ("delta".into(), id(2), "c".into())
        ]
    );
    assert!(out.starts_with(format!("id: {}\ndata: a\ndata: b\n\n", id(1)).as_bytes()));
    assert_eq!(
        log.upstream_id(),
        Some("up-1"),
        "newest with an upstream id"
    );
}

#[test]
fn a_batch_is_appended_in_order_in_one_block() {
    let mut log = ReplayLog::new(TOKEN, retention(10), Millis(0));
    log.append(Millis(1), Some("up-1"), "message", "one")
        .unwrap();
    let mut batch = LogBatch::new();
    batch.push(Some("up-2"), "message", "two").unwrap();
    assert_eq!(
        batch.push(None, "bad\ntype", "x"),
        Err(EncodeError::InvalidEventType)
    );
    batch.push(None, "delta", "three\nlines\nhere").unwrap();
    batch.push(Some(""), "", "four").unwrap();
    assert_eq!(batch.len(), 3, "the refused event is not in it");
    let appended = log.append_batch(Millis(2), &batch);
    assert_eq!(appended.seq, 4);
    assert_eq!(appended.events, 3);
    assert_eq!(appended.trimmed_to, None);
    let frames: usize = log.records().map(|r| r.frame().len()).sum();
    assert_eq!(log.bytes(), frames);
    assert_eq!(
        appended.bytes_delta as usize,
        frames - log.record(1).frame().len()
    );
    let new: Vec<_> = log.since(2).collect();
    assert_eq!(new.len(), 3);
    assert!(new.iter().all(|r| Arc::ptr_eq(&r.block, &new[0].block)));
    assert!(!Arc::ptr_eq(&log.record(1).block, &new[0].block));
    assert_eq!(
        new.iter().map(|r| r.upstream_id()).collect::<Vec<_>>(),
        [Some("up-2"), None, Some("")]
    );
    assert_eq!(
        new.iter().map(|r| r.time).collect::<Vec<_>>(),
        [Millis(2); 3]
    );
    assert_eq!(
        new[1],
        LogRecord::new(
            3,
            Millis(2),
            None,
            format!(
                "id: {}\nevent: delta\ndata: three\ndata: lines\ndata: here\n\n",
                id(3)
            )
            .as_bytes()
        ),
        "a record of a batch equals one built alone"
    );
    assert_eq!(
        log.upstream_id(),
        Some(""),
        "the newest with an id, even empty"
    );
    log.mark_durable(4);
    let (mut next, mut out) = (1, Vec::new());
    assert_eq!(log.read(&mut next, usize::MAX, &mut out).events, 4);
    assert_eq!(
        events(&out),
        [
            ("message".into(), id(1), "one".into()),
            ("message".into(), id(2), "two".into()),
            ("delta".into(), id(3), "three\nlines\nhere".into()),
            ("message".into(), id(4), "four".into()),
        ]
    );
    let empty = log.append_batch(Millis(3), &LogBatch::new());
    assert_eq!((empty.seq, empty.events, empty.bytes_delta), (4, 0, 0));
    batch.clear();
    assert!(batch.is_empty());
}

#[test]
fn ids_count_up_across_digit_carries_and_restores() {
    let mut log = ReplayLog::new(TOKEN, retention(2000), Millis(0));
    let mut batch = LogBatch::new();
    for n in 1..=1001u64 {
        batch.push(None, "message", "x").unwrap();
        if n % 7 == 0 || n == 1001 {
            log.append_batch(Millis(n), &batch);
            batch.clear();
        }
    }
    for record in log.records() {
        let frame = std::str::from_utf8(record.frame()).unwrap();
        assert_eq!(frame, format!("id: {}\ndata: x\n\n", id(record.seq)));
    }
    let records: Vec<LogRecord> = log.records().skip(997).collect();
    let mut restored = ReplayLog::restore(TOKEN, retention(10), records, false, Millis(0));
    restored.append(Millis(1), None, "message", "y").unwrap();
    assert_eq!(
        restored.last().unwrap().frame(),
        format!("id: {}\ndata: y\n\n", id(1002)).as_bytes()
    );
    let mut at_nines = ReplayLog::restore(
        TOKEN,
        retention(10),
        [LogRecord::new(99_999, Millis(0), None, b"")],
        false,
        Millis(0),
    );
    at_nines.append(Millis(1), None, "message", "z").unwrap();
    at_nines.append(Millis(1), None, "message", "z").unwrap();
    let ids: Vec<_> = at_nines
        .since(100_000)
        .map(|r| r.frame().to_vec())
        .collect();
    assert_eq!(
        ids,
        [
            format!("id: {}\ndata: z\n\n", id(100_000)).into_bytes(),
            format!("id: {}\ndata: z\n\n", id(100_001)).into_bytes()
        ]
    );
}

#[test]
fn refuses_event_types_with_line_ends() {
    let mut log = ReplayLog::new(TOKEN, retention(10), Millis(0));
    assert_eq!(
        log.append(Millis(1), None, "a\nb", "x"),
        Err(EncodeError::InvalidEventType)
    );
    assert!(log.is_empty());
    assert_eq!(log.next_seq(), 1);
}

#[test]
fn clients_see_only_durable_events() {
    let mut log = ReplayLog::new(TOKEN, retention(10), Millis(0));
    log.append(Millis(1), None, "message", "1").unwrap();
    log.append(Millis(2), None, "message", "2").unwrap();
    let mut next = 1;
    let mut out = Vec::new();
    assert_eq!(log.read(&mut next, usize::MAX, &mut out).events, 0);
    assert!(out.is_empty());
    log.mark_durable(1);
    assert_eq!(log.read(&mut next, usize::MAX, &mut out).events, 1);
    assert_eq!(next, 2);
    log.mark_durable(0);
    assert_eq!(log.durable(), 1, "never moves back");
    // An id the log has issued but not let anyone see is not resumable.
    assert_eq!(
        log.start(Some(&id(2))).gap.unwrap().reason,
        GapReason::Unknown
    );
    log.mark_durable(99);
    assert_eq!(log.durable(), 2, "never past the last event");
}

#[test]
fn read_budget_writes_whole_frames_and_at_least_one() {
    let log = log_of(10, 100);
    let frame = log.record(1).frame().len();
    let mut next = 1;
    let mut out = Vec::new();
    assert_eq!(
        log.read(&mut next, 1, &mut out).events,
        1,
        "one even over budget"
    );
    assert_eq!(log.read(&mut next, 2 * frame, &mut out).events, 2);
    assert_eq!(next, 4);
    assert_eq!(log.read(&mut next, usize::MAX, &mut out).events, 7);
    assert_eq!(log.read(&mut next, usize::MAX, &mut out).events, 0);
    let got: Vec<String> = events(&out).into_iter().map(|e| e.2).collect();
    assert_eq!(got, (1..=10).map(|i| i.to_string()).collect::<Vec<_>>());
}

#[test]
fn retention_by_count_and_bytes() {
    let log = log_of(20, 5);
    assert_eq!((log.first_seq(), log.len()), (16, 5));
    let mut log = ReplayLog::new(
        TOKEN,
        Retention {
            max_events: 100,
            max_bytes: 200,
            idle: Millis(1000),
        },
        Millis(0),
    );
    let big = "x".repeat(150);
    let a = log.append(Millis(1), None, "message", &big).unwrap();
    assert_eq!(a.trimmed_to, None);
    let b = log.append(Millis(2), None, "message", &big).unwrap();
    assert_eq!(b.trimmed_to, Some(2), "the first one no longer fits");
    assert_eq!(log.len(), 1);
    assert!(b.bytes_delta == 0, "one frame in, one of the same size out");
    assert_eq!(log.bytes() as i64, a.bytes_delta);
    let huge = "y".repeat(1000);
    log.append(Millis(3), None, "message", &huge).unwrap();
    assert_eq!(log.len(), 1, "the newest is kept even alone over the cap");
}

#[test]
fn start_rules() {
    let log = log_of(20, 5); // holds 16..=20
    let at = |next, gap| Start { next, gap };
    assert_eq!(log.start_live(), at(21, None));
    assert_eq!(log.start(Some(&id(20))), at(21, None));
    assert_eq!(log.start(Some(&id(17))), at(18, None));
    assert_eq!(
        log.start(Some(&id(15))),
        at(16, None),
        "just before the oldest"
    );
    let retention = |lost| {
        Some(Gap {
            reason: GapReason::Retention,
            lost: Some(lost),
        })
    };
    let unknown = Some(Gap {
        reason: GapReason::Unknown,
        lost: None,
    });
    assert_eq!(log.start(Some(&id(14))), at(16, retention(1)));
    assert_eq!(log.start(Some(&id(0))), at(16, retention(15)));
    assert_eq!(log.start(None), at(16, retention(15)));
    assert_eq!(log_of(3, 5).start(None), at(1, None));
    assert_eq!(log.start(Some(&id(21))), at(16, unknown), "not issued yet");
    assert_eq!(log.start(Some(&event_id(OTHER, 18))), at(16, unknown));
    assert_eq!(log.start(Some("18")), at(16, unknown));
    assert_eq!(log.start(Some("")), at(16, unknown));
}

#[test]
fn gap_signal_then_oldest_retained() {
    let log = log_of(20, 5);
    let start = log.start(Some(&id(10)));
    let mut out = Vec::new();
    encode_gap(&mut out, TOKEN, start.next, start.gap.unwrap());
    let mut next = start.next;
    log.read(&mut next, usize::MAX, &mut out);
    let got = events(&out);
    assert_eq!(
        got[0],
        (
            GAP_EVENT.into(),
            id(15),
            r#"{"reason":"retention","lost":5}"#.into()
        )
    );
    assert_eq!(got[1].1, id(16));
    assert_eq!(got.len(), 6);
    // Resuming from the gap event's own id is not told again.
    assert_eq!(log.start(Some(&got[0].1)).gap, None);

    let mut out = Vec::new();
    encode_gap(
        &mut out,
        TOKEN,
        16,
        Gap {
            reason: GapReason::Unknown,
            lost: None,
        },
    );
    assert_eq!(events(&out)[0].2, r#"{"reason":"unknown","lost":null}"#);
}

#[test]
fn a_client_behind_retention_is_told_on_read() {
    let mut log = log_of(3, 5);
    let mut next = 2;
    for i in 4..=12 {
        log.append(Millis(i), None, "message", &i.to_string())
            .unwrap();
    }
    log.mark_durable(12);
    let mut out = Vec::new();
    let read = log.read(&mut next, usize::MAX, &mut out);
    assert_eq!(
        read.gap,
        Some(Gap {
            reason: GapReason::Retention,
            lost: Some(6)
        })
    );
    assert_eq!(read.events, 5);
    let got = events(&out);
    assert_eq!(got[0].0, GAP_EVENT);
    assert_eq!(got[1].2, "8");
    assert_eq!(next, 13);
}

#[test]
fn completion_and_expiry() {
    let mut log = log_of(3, 5);
    assert!(!log.is_complete(4), "not ended");
    log.end();
    assert!(log.is_complete(4));
    assert!(!log.is_complete(3), "one event left");
    assert!(!log.is_expired(Millis(1002)));
    assert!(
        log.is_expired(Millis(1003)),
        "idle after the last event at 3"
    );
    let fresh = ReplayLog::new(TOKEN, retention(5), Millis(50));
    assert!(fresh.is_expired(Millis(1050)) && !fresh.is_expired(Millis(1049)));
}

#[test]
fn restore_keeps_the_run_after_the_last_hole() {
    let log = log_of(8, 100);
    let mut records: Vec<LogRecord> = log.records().collect();
    records.remove(2); // seq 3 is missing
    records.reverse();
    let restored = ReplayLog::restore(TOKEN, retention(100), records, true, Millis(500));
    assert_eq!((restored.first_seq(), restored.next_seq()), (4, 9));
    assert_eq!(restored.durable(), 8);
    assert!(restored.is_ended());
    assert_eq!(restored.last_event_at(), Millis(8));
    assert_eq!(restored.upstream_id(), Some("u8"));
    assert_eq!(restored.start(Some(&id(5))).next, 6);
    let empty = ReplayLog::restore(TOKEN, retention(5), Vec::new(), false, Millis(7));
    assert_eq!((empty.next_seq(), empty.last_event_at()), (1, Millis(7)));
    let trimmed = ReplayLog::restore(TOKEN, retention(2), log.records(), false, Millis(0));
    assert_eq!(
        trimmed.first_seq(),
        7,
        "retention applies to what is restored"
    );
}

#[test]
fn a_mirror_appends_stored_records_in_order_skips_repeats_and_restarts_after_a_hole() {
    let source = log_of(10, 100);
    let stored: Vec<LogRecord> = source.records().collect();
    let mut mirror = ReplayLog::new(TOKEN, retention(4), Millis(0));
    for record in &stored[..3] {
        let appended = mirror.append_stored(record.clone()).unwrap();
        assert_eq!((appended.seq, appended.events), (record.seq, 1));
    }
    assert_eq!(
        (mirror.first_seq(), mirror.next_seq(), mirror.durable()),
        (1, 4, 3)
    );
    assert_eq!(mirror.append_stored(stored[1].clone()), None, "a repeat");
    // Clients read the mirror as they read the source.
    let mut next = 1;
    let mut out = Vec::new();
    mirror.read(&mut next, usize::MAX, &mut out);
    let mut expected = Vec::new();
    let mut at = 1;
    source.read(&mut at, usize::MAX, &mut expected);
    assert_eq!(events(&out), events(&expected)[..3]);
    // Retention applies.
    let appended = mirror.append_stored(stored[3].clone()).unwrap();
    assert_eq!(appended.trimmed_to, None);
    let appended = mirror.append_stored(stored[4].clone()).unwrap();
    assert_eq!(appended.trimmed_to, Some(2));
    // A hole: the log starts anew at the record after it, and a client
    // still at 6 is told what it lost.
    let appended = mirror.append_stored(stored[8].clone()).unwrap();
    assert_eq!(appended.trimmed_to, Some(9));
    assert_eq!(
        (mirror.first_seq(), mirror.next_seq(), mirror.len()),
        (9, 10, 1)
    );
    let mut behind = 6;
    let mut out = Vec::new();
    let read = mirror.read(&mut behind, usize::MAX, &mut out);
    assert_eq!(read.gap.map(|g| g.lost), Some(Some(3)));
    assert_eq!(read.events, 1);
    assert_eq!(mirror.upstream_id(), Some("u9"));
}

#[test]
fn a_batch_is_one_segment_with_sixteen_bytes_or_less_per_event() {
    let mut log = ReplayLog::new(TOKEN, retention(1500), Millis(0));
    let mut batch = LogBatch::new();
    for i in 0..1000 {
        let upstream = (i % 3 != 0).then(|| format!("u{i}"));
        batch.push(upstream.as_deref(), "message", "x").unwrap();
    }
    log.append_batch(Millis(1), &batch);
    log.append_batch(Millis(2), &batch);
    assert_eq!((log.segments.len(), log.len()), (2, 1500));
    assert_eq!(log.first_seq(), 501, "the first batch is cut, not dropped");
    assert_eq!(log.segments[0].seq, 501);
    assert!(
        size_of::<Ends>() <= 16,
        "per event: where its frame and id end"
    );
    assert_eq!(
        Arc::strong_count(&log.segments[0].block),
        1,
        "no reference per event"
    );
    let expected: Vec<_> = log.records().collect();
    assert_eq!(log.upstream_id(), Some("u998"));
    // Records given back (storage that kept them) point into the block.
    let restored = ReplayLog::restore(TOKEN, retention(1500), expected.clone(), false, Millis(3));
    assert!(Arc::ptr_eq(
        &restored.segments[0].block,
        &log.segments[0].block
    ));
    assert_eq!(restored.records().collect::<Vec<_>>(), expected);
    assert_eq!(restored.upstream_id(), Some("u998"));
    drop((expected, restored));
    let block = Arc::downgrade(&log.segments[0].block);
    log.append_batch(Millis(4), &batch);
    assert!(block.upgrade().is_none(), "freed with its last event");
    assert_eq!(log.segments.len(), 2);
}

#[test]
fn identities_are_keyed_and_unambiguous() {
    let key = IdentityKey::from_bytes([7; 32]);
    let other = IdentityKey::from_bytes([8; 32]);
    let a = key.identity([b"Bearer A".as_slice(), b""]);
    assert_eq!(a, key.identity([b"Bearer A".as_slice(), b""]));
    assert_ne!(a, key.identity([b"Bearer B".as_slice(), b""]));
    assert_ne!(a, other.identity([b"Bearer A".as_slice(), b""]));
    assert_ne!(
        key.identity([b"ab".as_slice(), b"c"]),
        key.identity([b"a".as_slice(), b"bc"]),
        "parts are length-prefixed"
    );
    assert_ne!(
        IdentityKey::random().unwrap(),
        IdentityKey::random().unwrap()
    );
    assert_eq!(format!("{a:?}"), "Identity(..)");
}

proptest! {
    /// Whatever is appended, trimmed and made durable, and wherever a client
    /// starts, it gets events in strictly increasing order with no hole
    /// except right after a gap signal whose count is the hole's size.
    #[test]
    fn clients_never_miss_silently(
        steps in proptest::collection::vec((0u8..4, 0usize..6), 1..80),
        max_events in 1usize..8,
        start_at in 0u64..40,
    ) {
        let mut log = ReplayLog::new(TOKEN, retention(max_events), Millis(0));
        let mut next = log.start(Some(&id(start_at))).next;
        let mut expected = next;
        let mut out = Vec::new();
        let mut time = 0;
        for (op, n) in steps {
            match op {
                0 => for _ in 0..n {
                    time += 1;
                    log.append(Millis(time), None, "message", &log.next_seq().to_string()).unwrap();
                },
                1 => {
                    // One batch: one block, which retention may cut.
                    time += 1;
                    let mut batch = LogBatch::new();
                    for i in 0..n as u64 {
                        let upstream = (i % 2 == 0).then(|| format!("u{i}"));
                        batch.push(upstream.as_deref(), "message", &(log.next_seq() + i).to_string()).unwrap();
                    }
                    let appended = log.append_batch(Millis(time), &batch);
                    prop_assert_eq!(appended.events, n);
                    prop_assert_eq!(appended.seq, log.next_seq() - 1);
                },
                2 => log.mark_durable(log.next_seq() - 1),
                _ => {
                    out.clear();
                    log.read(&mut next, n * 40, &mut out);
                    for (event, id_got, data) in events(&out) {
                        let (token, seq) = parse_event_id(&id_got).unwrap();
                        prop_assert_eq!(token, TOKEN);
                        if event == GAP_EVENT {
                            let lost: u64 = data
                                .trim_start_matches("{\"reason\":\"retention\",\"lost\":")
                                .trim_end_matches('}')
                                .parse()
                                .unwrap();
                            prop_assert_eq!(seq + 1 - expected, lost);
                            expected = seq + 1;
                        } else {
                            prop_assert_eq!(seq, expected);
                            prop_assert_eq!(data, seq.to_string());
                            prop_assert!(seq <= log.durable());
                            expected += 1;
                        }
                    }
                    prop_assert_eq!(next, expected);
                }
            }
        }
    }
}

/// The log's rules without segments: one entry per event, (seq, frame,
/// upstream id, time), dropped from the front by the same retention.
#[derive(Debug)]
struct Model {
    events: VecDeque<(u64, Vec<u8>, Option<String>, Millis)>,
    next_seq: u64,
    durable: u64,
    retention: Retention,
}

impl Model {
    fn new(retention: Retention) -> Self {
        Model {
            events: VecDeque::new(),
            next_seq: 1,
            durable: 0,
            retention,
        }
    }

    fn first(&self) -> u64 {
        self.events.front().map_or(self.next_seq, |e| e.0)
    }

    fn bytes(&self) -> usize {
        self.events.iter().map(|e| e.1.len()).sum()
    }

    fn push(&mut self, seq: u64, frame: Vec<u8>, upstream_id: Option<String>, time: Millis) {
        self.events.push_back((seq, frame, upstream_id, time));
        self.next_seq = seq + 1;
    }

    /// Applies retention and says what an append of `events` did, from the
    /// first sequence number and bytes before it.
    fn appended(&mut self, first: u64, bytes: usize, events: usize) -> Appended {
        while self.events.len() > self.retention.max_events.max(1)
            || (self.bytes() > self.retention.max_bytes && self.events.len() > 1)
        {
            self.events.pop_front();
        }
        Appended {
            seq: self.next_seq - 1,
            events,
            bytes_delta: self.bytes() as i64 - bytes as i64,
            trimmed_to: (self.first() != first).then(|| self.first()),
        }
    }

    fn records(&self) -> Vec<LogRecord> {
        self.events
            .iter()
            .map(|(seq, frame, id, time)| LogRecord::new(*seq, *time, id.as_deref(), frame))
            .collect()
    }

    fn upstream_id(&self) -> Option<&str> {
        self.events.iter().rev().find_map(|e| e.2.as_deref())
    }

    fn start(&self, last_event_id: Option<&str>) -> Start {
        let first = self.first();
        let after = match last_event_id.map(parse_event_id) {
            None => 0,
            Some(Some((token, seq))) if token == TOKEN && seq <= self.durable => seq,
            Some(_) => {
                return Start {
                    next: first,
                    gap: Some(Gap {
                        reason: GapReason::Unknown,
                        lost: None,
                    }),
                };
            }
        };
        if after + 1 >= first {
            Start {
                next: after + 1,
                gap: None,
            }
        } else {
            Start {
                next: first,
                gap: Some(Gap {
                    reason: GapReason::Retention,
                    lost: Some(first - after - 1),
                }),
            }
        }
    }

    fn read(&self, next: &mut u64, budget: usize, out: &mut Vec<u8>) -> Read {
        let mut read = Read::default();
        let first = self.first();
        if *next < first {
            let gap = Gap {
                reason: GapReason::Retention,
                lost: Some(first - *next),
            };
            encode_gap(out, TOKEN, first, gap);
            read.gap = Some(gap);
            *next = first;
        }
        let mut written = 0;
        for (seq, frame, _, _) in &self.events {
            if *seq < *next || *seq > self.durable {
                continue;
            }
            if written >= budget && read.events > 0 {
                break;
            }
            written += frame.len();
            out.extend_from_slice(frame);
            read.events += 1;
            *next = seq + 1;
        }
        read
    }
}

/// The frame the log writes for event `seq`.
fn frame_of(seq: u64, event: &str, data: &str) -> Vec<u8> {
    let mut frame = format!("id: {}\n", id(seq)).into_bytes();
    let event = (event != "message" && !event.is_empty()).then_some(event);
    encode_event(&mut frame, event, None, data).unwrap();
    frame
}

#[derive(Clone, Debug)]
enum Op {
    Batch(Vec<(Option<String>, &'static str, String)>),
    Append(Option<String>, String),
    /// A record of its own at `next_seq() + ahead` (below: a repeat;
    /// above: after a hole).
    Stored(i64, Option<String>, Vec<u8>),
    Durable(i64),
    /// From the connected client's place (`None`) or from this seq, with
    /// a budget of so many bytes, or of the next so many frames' bytes
    /// plus -1, 0 or 1.
    Read(Option<u64>, Budget),
    /// `None`: no id; `Some((seq, ours))`: an id of this stream or
    /// another's.
    Start(Option<(u64, bool)>),
    /// The log rebuilt from its own records, perhaps one of them lost.
    Restore(Option<prop::sample::Index>, bool),
    Tick,
}

#[derive(Copy, Clone, Debug)]
enum Budget {
    Bytes(usize),
    Frames(usize, isize),
}

fn op() -> impl Strategy<Value = Op> {
    let upstream = || prop::option::of("[a-z0-9]{0,3}");
    let data = || "[a-z\n]{0,6}";
    let event = prop::sample::select(vec!["message", "", "delta"]);
    prop_oneof![
        4 => prop::collection::vec((upstream(), event, data()), 0..6).prop_map(Op::Batch),
        2 => (upstream(), data()).prop_map(|(u, d)| Op::Append(u, d)),
        2 => (prop_oneof![4 => Just(0i64), 1 => -3i64..0, 1 => 1i64..4], upstream(), "[a-z]{0,30}")
            .prop_map(|(ahead, u, frame)| Op::Stored(ahead, u, frame.into_bytes())),
        3 => (-3i64..2).prop_map(Op::Durable),
        4 => (prop::option::of(0u64..60), prop_oneof![
            (0usize..150).prop_map(Budget::Bytes),
            (0usize..6, -1isize..=1).prop_map(|(n, plus)| Budget::Frames(n, plus)),
        ]).prop_map(|(from, budget)| Op::Read(from, budget)),
        1 => prop::option::of((0u64..60, prop::bool::weighted(0.8))).prop_map(Op::Start),
        1 => (prop::option::of(any::<prop::sample::Index>()), any::<bool>())
            .prop_map(|(lost, rev)| Op::Restore(lost, rev)),
        1 => Just(Op::Tick),
    ]
}

/// Everything the log tells about what it holds matches the model.
fn same_state(log: &ReplayLog, model: &Model) -> Result<(), TestCaseError> {
    prop_assert_eq!(log.len(), model.events.len());
    prop_assert_eq!(log.is_empty(), model.events.is_empty());
    prop_assert_eq!(log.first_seq(), model.first());
    prop_assert_eq!(log.next_seq(), model.next_seq);
    prop_assert_eq!(log.durable(), model.durable);
    prop_assert_eq!(log.bytes(), model.bytes());
    prop_assert_eq!(log.upstream_id(), model.upstream_id());
    let expected = model.records();
    prop_assert_eq!(log.records().len(), expected.len());
    prop_assert_eq!(log.records().collect::<Vec<_>>(), expected.clone());
    let mut reversed = expected.clone();
    reversed.reverse();
    prop_assert_eq!(log.records().rev().collect::<Vec<_>>(), reversed);
    prop_assert_eq!(log.last(), expected.last().cloned());
    for seq in model.first().saturating_sub(1)..=model.next_seq + 1 {
        let since: Vec<_> = expected.iter().filter(|r| r.seq >= seq).cloned().collect();
        prop_assert_eq!(log.since(seq).collect::<Vec<_>>(), since);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Segments keep every event as one record per event would: what is
    /// retained, its bytes and ids, what each append did, and what each
    /// client reads, byte for byte.
    #[test]
    fn the_log_behaves_as_one_record_per_event(
        ops in prop::collection::vec(op(), 1..60),
        max_events in 1usize..12,
        max_bytes in prop_oneof![Just(usize::MAX), 0usize..400],
    ) {
        let retention = Retention { max_events, max_bytes, idle: Millis(1000) };
        let mut log = ReplayLog::new(TOKEN, retention, Millis(0));
        let mut model = Model::new(retention);
        let mut time = 0;
        let (mut client, mut model_client) = (1, 1);
        for op in ops {
            let (first, bytes) = (model.first(), model.bytes());
            match op {
                Op::Batch(events) => {
                    let mut batch = LogBatch::new();
                    for (i, (upstream, event, data)) in events.iter().enumerate() {
                        batch.push(upstream.as_deref(), event, data).unwrap();
                        let seq = model.next_seq + i as u64;
                        model.events.push_back((seq, frame_of(seq, event, data), upstream.clone(), Millis(time)));
                    }
                    model.next_seq += events.len() as u64;
                    let appended = log.append_batch(Millis(time), &batch);
                    prop_assert_eq!(appended, model.appended(first, bytes, events.len()));
                }
                Op::Append(upstream, data) => {
                    let appended = log.append(Millis(time), upstream.as_deref(), "message", &data).unwrap();
                    let seq = model.next_seq;
                    model.push(seq, frame_of(seq, "message", &data), upstream, Millis(time));
                    prop_assert_eq!(appended, model.appended(first, bytes, 1));
                }
                Op::Stored(ahead, upstream, frame) => {
                    let seq = model.next_seq.saturating_add_signed(ahead);
                    let record = LogRecord::new(seq, Millis(time), upstream.as_deref(), &frame);
                    let appended = log.append_stored(record);
                    if seq < model.next_seq {
                        prop_assert_eq!(appended, None);
                    } else {
                        if seq > model.next_seq {
                            model.events.clear();
                        }
                        model.push(seq, frame, upstream, Millis(time));
                        model.durable = seq;
                        prop_assert_eq!(appended, Some(model.appended(first, bytes, 1)));
                    }
                }
                Op::Durable(off) => {
                    let seq = (model.next_seq - 1).saturating_add_signed(off);
                    log.mark_durable(seq);
                    model.durable = model.durable.max(seq.min(model.next_seq - 1));
                }
                Op::Read(from, budget) => {
                    let (mut next, mut model_next) = match from {
                        Some(seq) => (seq, seq),
                        None => (client, model_client),
                    };
                    let budget = match budget {
                        Budget::Bytes(n) => n,
                        Budget::Frames(n, plus) => model
                            .events
                            .iter()
                            .filter(|e| e.0 >= model_next.max(model.first()))
                            .take(n)
                            .map(|e| e.1.len())
                            .sum::<usize>()
                            .saturating_add_signed(plus),
                    };
                    let (mut out, mut expected) = (Vec::new(), Vec::new());
                    let read = log.read(&mut next, budget, &mut out);
                    prop_assert_eq!(read, model.read(&mut model_next, budget, &mut expected));
                    prop_assert_eq!(out, expected);
                    prop_assert_eq!(next, model_next);
                    if from.is_none() {
                        (client, model_client) = (next, model_next);
                    }
                }
                Op::Start(at) => {
                    let last_event_id = at.map(|(seq, ours)| event_id(if ours { TOKEN } else { OTHER }, seq));
                    prop_assert_eq!(
                        log.start(last_event_id.as_deref()),
                        model.start(last_event_id.as_deref())
                    );
                }
                Op::Restore(lost, rev) => {
                    let mut records: Vec<LogRecord> = log.records().collect();
                    // Not the newest: the next appended event keeps its seq.
                    if let Some(lost) = lost.filter(|_| records.len() > 1) {
                        let at = lost.index(records.len() - 1);
                        let lost = records.remove(at).seq;
                        model.events.retain(|e| e.0 > lost);
                    }
                    if rev {
                        records.reverse();
                    }
                    let next_seq = log.next_seq();
                    log = ReplayLog::restore(TOKEN, retention, records, false, Millis(time));
                    if model.events.is_empty() {
                        // Nothing to restore from: a new log.
                        model.next_seq = 1;
                        (client, model_client) = (1, 1);
                    }
                    prop_assert_eq!(log.next_seq(), model.next_seq);
                    prop_assert!(model.events.is_empty() || log.next_seq() == next_seq);
                    model.durable = model.next_seq - 1;
                }
                Op::Tick => time += 1,
            }
            same_state(&log, &model)?;
        }
    }
}
