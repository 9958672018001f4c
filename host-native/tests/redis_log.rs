//! The proxy's `RedisLog` against a real `redis-server`: the test command's
//! (`TIDEMARK_TEST_REDIS`) or one started here, on loopback, under a key
//! prefix of each test's own. Tests that stop Redis start their own.

mod support {
    pub mod redis_server;
}

use std::time::{Duration, Instant};
use support::redis_server::{RedisServer, shared, unique_prefix};
use tidemark::RedisConfig;
use tidemark::proxy::{
    COMMANDS_PER_ROUND_TRIP, LogOp, LogStorage, RedisLog, StoredStream, StreamKind, StreamMeta,
    TRIM_STEP,
};
use tidemark_core::Millis;
use tidemark_core::replay::{Identity, LogRecord, Retention, StreamToken};

fn retention(max_events: usize) -> Retention {
    Retention {
        max_events,
        ..Retention::default()
    }
}

fn log(url: &str, prefix: &str, max_events: usize) -> RedisLog {
    let config = RedisConfig {
        prefix: prefix.into(),
        timeout: Duration::from_secs(2),
        ..RedisConfig::new(url)
    };
    RedisLog::new(config, retention(max_events)).unwrap()
}

fn meta(kind: StreamKind, n: u8) -> StreamMeta {
    StreamMeta {
        token: StreamToken::random().unwrap(),
        kind,
        target: format!("/stream/{n}?q=ü x"),
        identity: Identity::from_bytes([n; 16]),
        created: Millis(1_700_000_000_000 + u64::from(n)),
    }
}

/// Event `seq`: every third without an upstream id, one with an empty one,
/// frames with bytes that are not UTF-8.
fn record(seq: u64) -> LogRecord {
    let upstream = match seq % 3 {
        0 => None,
        _ if seq == 7 => Some(String::new()),
        _ => Some(format!("up-{seq}")),
    };
    let mut frame = format!("id: t-{seq}\ndata: {seq}\n\n").into_bytes();
    frame.push(0xff);
    LogRecord::new(
        seq,
        Millis(1_700_000_000_000 + seq),
        upstream.as_deref(),
        &frame,
    )
}

fn appends(token: StreamToken, seqs: std::ops::RangeInclusive<u64>) -> Vec<LogOp> {
    seqs.map(|seq| LogOp::Append {
        token,
        record: record(seq),
    })
    .collect()
}

fn redis(url: &str) -> redis::Connection {
    redis::Client::open(url).unwrap().get_connection().unwrap()
}

fn by_token(streams: Vec<StoredStream>, token: StreamToken) -> StoredStream {
    streams
        .into_iter()
        .find(|s| s.meta.token == token)
        .unwrap_or_else(|| panic!("stream {token} not recovered"))
}

#[test]
fn streams_round_trip_with_their_ends_trims_and_drops() {
    let (url, _server) = shared();
    let prefix = unique_prefix("log-round-trip");
    let mut writer = log(&url, &prefix, 1000);
    assert!(writer.recover().unwrap().is_empty());
    let key = writer.identity_key([7; 32]).unwrap();
    assert_eq!(key, [7; 32]);

    let get = meta(StreamKind::Get, 1);
    let post = meta(StreamKind::Post, 2);
    let gone = meta(StreamKind::Get, 3);
    let mut ops = vec![
        LogOp::Open(get.clone()),
        LogOp::Open(post.clone()),
        LogOp::Open(gone.clone()),
    ];
    ops.extend(appends(get.token, 1..=10));
    ops.extend(appends(post.token, 1..=3));
    ops.extend(appends(gone.token, 1..=2));
    writer.write(&ops).unwrap();
    let mut ops = appends(get.token, 11..=600);
    ops.push(LogOp::Trim {
        token: get.token,
        first_seq: 301,
    });
    ops.push(LogOp::End { token: post.token });
    ops.push(LogOp::Drop { token: gone.token });
    writer.write(&ops).unwrap();
    drop(writer);

    let mut reader = log(&url, &prefix, 1000);
    // The first proxy's key stays, whatever key a later one brings.
    assert_eq!(reader.identity_key([9; 32]).unwrap(), [7; 32]);
    let streams = reader.recover().unwrap();
    assert_eq!(streams.len(), 2, "{streams:?}");
    assert_eq!(
        [streams[0].meta.token, streams[1].meta.token],
        [get.token, post.token],
        "oldest first"
    );
    let get_back = by_token(streams.clone(), get.token);
    assert_eq!(get_back.meta, get);
    assert!(!get_back.ended);
    assert_eq!(
        get_back.records,
        (301..=600).map(record).collect::<Vec<_>>()
    );
    let post_back = by_token(streams, post.token);
    assert_eq!(post_back.meta, post);
    assert!(post_back.ended);
    assert_eq!(post_back.records, (1..=3).map(record).collect::<Vec<_>>());

    let mut redis = redis(&url);
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query(&mut redis)
        .unwrap();
    assert!(
        keys.iter().all(|k| !k.contains(&gone.token.to_string())),
        "the dropped stream's keys are gone: {keys:?}"
    );
    assert_eq!(keys.len(), 6, "{keys:?}");
}

#[test]
fn a_retried_batch_is_stored_once() {
    let (url, _server) = shared();
    let prefix = unique_prefix("log-retry");
    let mut log = log(&url, &prefix, 1000);
    let stream = meta(StreamKind::Get, 1);
    let mut first = vec![LogOp::Open(stream.clone())];
    first.extend(appends(stream.token, 1..=5));
    log.write(&first).unwrap();
    // The writer retries a batch whole, with what arrived meanwhile: part
    // of it may have been written before.
    let mut retried = first.clone();
    retried.extend(appends(stream.token, 6..=8));
    retried.push(LogOp::End {
        token: stream.token,
    });
    log.write(&retried).unwrap();
    log.write(&retried).unwrap();

    let back = by_token(log.recover().unwrap(), stream.token);
    assert_eq!(back.records, (1..=8).map(record).collect::<Vec<_>>());
    assert!(back.ended);
    assert_eq!(xlen(&url, &log, stream.token), 8);

    // Redis refuses a sequence number that does not increase, whatever the
    // event: a lower one does not get in.
    let late = LogRecord::new(3, Millis(1), None, b"data: other\n\n");
    log.write(&[LogOp::Append {
        token: stream.token,
        record: late,
    }])
    .unwrap();
    let back = by_token(log.recover().unwrap(), stream.token);
    assert_eq!(back.records, (1..=8).map(record).collect::<Vec<_>>());
}

fn xlen(url: &str, log: &RedisLog, token: StreamToken) -> u64 {
    redis::cmd("XLEN")
        .arg(log.log_key(token))
        .query(&mut redis(url))
        .unwrap()
}

#[test]
fn maxlen_and_trims_bound_what_redis_keeps() {
    let (url, _server) = shared();
    let prefix = unique_prefix("log-trim");
    let mut short = log(&url, &prefix, 100);
    let stream = meta(StreamKind::Get, 1);
    let mut ops = vec![LogOp::Open(stream.clone())];
    ops.extend(appends(stream.token, 1..=5000));
    short.write(&ops).unwrap();
    // `MAXLEN ~ 100`: about 100 (whole nodes of 100 entries), never fewer.
    let kept = xlen(&url, &short, stream.token);
    assert!((100..=200).contains(&kept), "{kept} entries kept");

    let mut long = log(&url, &prefix, 100_000);
    let stream = meta(StreamKind::Get, 2);
    let mut ops = vec![LogOp::Open(stream.clone())];
    ops.extend(appends(stream.token, 1..=1000));
    long.write(&ops).unwrap();
    let trim = |log: &mut RedisLog, first_seq| {
        log.write(&[LogOp::Trim {
            token: stream.token,
            first_seq,
        }])
        .unwrap()
    };
    trim(&mut long, 300);
    assert_eq!(xlen(&url, &long, stream.token), 701);
    // Less than TRIM_STEP further: not sent yet.
    trim(&mut long, 300 + TRIM_STEP - 1);
    assert_eq!(xlen(&url, &long, stream.token), 701);
    trim(&mut long, 300 + TRIM_STEP);
    assert_eq!(xlen(&url, &long, stream.token), 1001 - 300 - TRIM_STEP);
    let back = by_token(long.recover().unwrap(), stream.token);
    assert_eq!(
        back.records,
        (300 + TRIM_STEP..=1000).map(record).collect::<Vec<_>>()
    );
}

#[test]
fn a_batch_larger_than_a_round_trip_is_written_whole() {
    let (url, _server) = shared();
    let prefix = unique_prefix("log-large");
    let mut log = log(&url, &prefix, 1_000_000);
    let stream = meta(StreamKind::Get, 1);
    let last = 2 * COMMANDS_PER_ROUND_TRIP as u64 + 5;
    let mut ops = vec![LogOp::Open(stream.clone())];
    ops.extend(appends(stream.token, 1..=last));
    log.write(&ops).unwrap();
    assert_eq!(xlen(&url, &log, stream.token), last);
    let back = by_token(log.recover().unwrap(), stream.token);
    assert_eq!(back.records.len() as u64, last);
    assert_eq!(back.records.last(), Some(&record(last)));
}

#[test]
fn read_after_pages_from_an_exclusive_start_and_tail_waits_for_the_next_event() {
    let (url, _server) = shared();
    let prefix = unique_prefix("log-read");
    let mut writer = log(&url, &prefix, 1000);
    let stream = meta(StreamKind::Get, 1);
    let mut ops = vec![LogOp::Open(stream.clone())];
    ops.extend(appends(stream.token, 1..=20));
    writer.write(&ops).unwrap();

    let reader = log(&url, &prefix, 1000);
    let read_after =
        |after, count| smol::block_on(reader.read_after(stream.token, after, count)).unwrap();
    let seqs = |records: Vec<LogRecord>| records.iter().map(|r| r.seq).collect::<Vec<_>>();
    assert_eq!(seqs(read_after(0, 5)), [1, 2, 3, 4, 5]);
    assert_eq!(
        read_after(17, 100),
        (18..=20).map(record).collect::<Vec<_>>()
    );
    assert!(read_after(20, 100).is_empty());
    let unknown = StreamToken::random().unwrap();
    assert!(
        smol::block_on(reader.read_after(unknown, 0, 100))
            .unwrap()
            .is_empty()
    );

    let tail = |after, block| smol::block_on(reader.tail(stream.token, after, block)).unwrap();
    // What is there already comes at once.
    assert_eq!(seqs(tail(18, Duration::from_secs(10))), [19, 20]);
    // Nothing new: empty after the block.
    let started = Instant::now();
    assert!(tail(20, Duration::from_millis(50)).is_empty());
    assert!(started.elapsed() >= Duration::from_millis(50));
    // A tail waiting for event 21 gets it as soon as it is written.
    let tailing = std::thread::spawn(move || {
        let started = Instant::now();
        let records =
            smol::block_on(reader.tail(stream.token, 20, Duration::from_secs(20))).unwrap();
        (records, started.elapsed())
    });
    // Once Redis has the tail waiting (its only blocked client).
    let mut redis = redis(&url);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let info: String = redis::cmd("INFO").arg("clients").query(&mut redis).unwrap();
        if !info.contains("blocked_clients:0") {
            break;
        }
        assert!(Instant::now() < deadline, "the tail never blocked: {info}");
        std::thread::yield_now();
    }
    writer.write(&appends(stream.token, 21..=21)).unwrap();
    let (records, waited) = tailing.join().unwrap();
    assert_eq!(records, vec![record(21)]);
    assert!(waited < Duration::from_secs(20), "{waited:?}");
}

#[test]
fn a_redis_that_is_down_fails_writes_until_it_is_back_then_they_go_through() {
    let mut server = RedisServer::start();
    let prefix = unique_prefix("log-outage");
    let mut log = log(&server.url(), &prefix, 1000);
    let stream = meta(StreamKind::Get, 1);
    let mut ops = vec![LogOp::Open(stream.clone())];
    ops.extend(appends(stream.token, 1..=3));
    log.write(&ops).unwrap();
    server.stop();
    let error = log.write(&appends(stream.token, 4..=4)).unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::NotConnected, "{error}");
    assert!(error.to_string().contains(&server.url()), "{error}");
    assert!(log.recover().is_err());
    // Back (empty: no persistence), on a new connection, without a new log.
    server.restart();
    log.write(&ops).unwrap();
    assert_eq!(
        by_token(log.recover().unwrap(), stream.token).records,
        (1..=3).map(record).collect::<Vec<_>>()
    );
}

#[test]
fn a_token_without_meta_is_forgotten_and_foreign_data_is_an_error() {
    let (url, _server) = shared();
    let prefix = unique_prefix("log-foreign");
    let mut log = log(&url, &prefix, 1000);
    let mut redis = redis(&url);
    let orphan = StreamToken::random().unwrap();
    let streams_key = format!("{prefix}proxy:streams");
    let _: () = redis::cmd("SADD")
        .arg(&streams_key)
        .arg(orphan.to_string())
        .query(&mut redis)
        .unwrap();
    assert!(log.recover().unwrap().is_empty());
    let members: Vec<String> = redis::cmd("SMEMBERS")
        .arg(&streams_key)
        .query(&mut redis)
        .unwrap();
    assert!(members.is_empty(), "{members:?}");

    let stream = meta(StreamKind::Post, 1);
    log.write(&[LogOp::Open(stream.clone())]).unwrap();
    let _: () = redis::cmd("XADD")
        .arg(log.log_key(stream.token))
        .arg("1-0")
        .arg("data")
        .arg("no time, no frame")
        .query(&mut redis)
        .unwrap();
    let error = log.recover().unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidData, "{error}");
    assert!(error.to_string().contains("time or frame"), "{error}");

    let _: () = redis::cmd("SET")
        .arg(log.identity_key_key())
        .arg("short")
        .query(&mut redis)
        .unwrap();
    let error = log.identity_key([1; 32]).unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidData, "{error}");
}

#[test]
fn debug_shows_no_password() {
    let log = log("redis://:hunter2@127.0.0.1:1/", "p:", 10);
    let debug = format!("{log:?}");
    assert!(!debug.contains("hunter2"), "{debug}");
    assert!(debug.contains("redis://:***@127.0.0.1:1/"), "{debug}");
}
