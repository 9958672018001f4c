//! `RedisStore`, leases and `tidemark follow --redis` against a real
//! `redis-server`: the test command's (`TIDEMARK_TEST_REDIS`) or one started
//! here, on loopback, under a key prefix of each test's own.

mod support {
    pub mod redis_server;
    pub mod serve;
}

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};
use support::redis_server::{RedisServer, shared, unique_prefix};
use support::serve::Server;
use tidemark::{Lease, LeaseLost, RedisConfig, RedisStore, SmolClock};
use tidemark_core::{Clock, Cursor, Millis, SavedWindow, Store, StoreError, StreamKey};

const BIN: &str = env!("CARGO_BIN_EXE_tidemark");

fn store(url: &str, prefix: &str) -> RedisStore {
    RedisStore::new(RedisConfig {
        prefix: prefix.into(),
        timeout: Duration::from_secs(2),
        ..RedisConfig::new(url)
    })
    .unwrap()
}

fn cursor(stream: &str, id: &str, seq: u64) -> Cursor {
    Cursor {
        key: StreamKey::new("session:1", stream),
        last_event_id: id.into(),
        seq,
        at: Millis(1_700_000_000_000 + seq % 1_000_000),
    }
}

fn load(store: &RedisStore, stream: &str) -> Option<Cursor> {
    smol::block_on(store.load(&StreamKey::new("session:1", stream))).unwrap()
}

fn sync_connection(url: &str) -> redis::Connection {
    redis::Client::open(url).unwrap().get_connection().unwrap()
}

/// Polls `condition` until it holds or `within` has passed.
fn wait_for(within: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn cursors_round_trip_and_never_move_backwards() {
    let (url, _server) = shared();
    let store = store(&url, &unique_prefix("round-trip"));
    assert_eq!(load(&store, "a"), None);
    let batch = [cursor("a", "5", 5), cursor("b:c", "ü-1 \n x", 1)];
    smol::block_on(store.save_batch(&batch)).unwrap();
    smol::block_on(store.save_batch(&[cursor("a", "3", 3), cursor("b:c", "2", 2)])).unwrap();
    assert_eq!(load(&store, "a"), Some(cursor("a", "5", 5)));
    assert_eq!(load(&store, "b:c"), Some(cursor("b:c", "2", 2)));
    assert_eq!(store.stale_cursors(), 1);
    // Equal seq is not newer either.
    smol::block_on(store.save_batch(&[cursor("a", "other", 5)])).unwrap();
    assert_eq!(load(&store, "a"), Some(cursor("a", "5", 5)));
    // Sequence numbers compare exactly beyond 2^53, where Lua numbers do not.
    let big = (1u64 << 60) + 1;
    smol::block_on(store.save_batch(&[cursor("a", "big", big)])).unwrap();
    smol::block_on(store.save_batch(&[cursor("a", "less", big - 1)])).unwrap();
    assert_eq!(load(&store, "a"), Some(cursor("a", "big", big)));
    // One more is newer, though a double cannot tell 2^60 + 2 from 2^60 + 1.
    smol::block_on(store.save_batch(&[cursor("a", "more", big + 1)])).unwrap();
    assert_eq!(load(&store, "a"), Some(cursor("a", "more", big + 1)));
    smol::block_on(store.save_batch(&[cursor("a", "max", u64::MAX)])).unwrap();
    assert_eq!(load(&store, "a"), Some(cursor("a", "max", u64::MAX)));
    smol::block_on(store.delete(&StreamKey::new("session:1", "a"))).unwrap();
    assert_eq!(load(&store, "a"), None);
    smol::block_on(store.delete(&StreamKey::new("session:1", "a"))).unwrap();
}

#[test]
fn a_batch_is_one_round_trip_of_one_script_per_thousand_cursors() {
    let server = RedisServer::start();
    let store = store(&server.url(), &unique_prefix("batch"));
    let batch: Vec<Cursor> = (0..2500)
        .map(|i| cursor(&format!("s{i}"), &i.to_string(), 7))
        .collect();
    // The first write loads the script once (NOSCRIPT, SCRIPT LOAD, again).
    smol::block_on(store.save_batch(&batch[..1])).unwrap();
    let mut redis = sync_connection(&server.url());
    let calls = |redis: &mut redis::Connection, command: &str| -> u64 {
        let info: String = redis::cmd("INFO").arg("commandstats").query(redis).unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
            .map_or(0, |rest| rest.split(',').next().unwrap().parse().unwrap())
    };
    let before = (
        calls(&mut redis, "evalsha"),
        calls(&mut redis, "script|load"),
    );
    smol::block_on(store.save_batch(&batch)).unwrap();
    let after = (
        calls(&mut redis, "evalsha"),
        calls(&mut redis, "script|load"),
    );
    assert_eq!(after.0 - before.0, 3, "2500 cursors in three scripts");
    assert_eq!(after.1, before.1, "the script is not sent again");
    for i in [0, 999, 1000, 2499] {
        assert_eq!(
            load(&store, &format!("s{i}")),
            Some(cursor(&format!("s{i}"), &i.to_string(), 7))
        );
    }
}

#[test]
fn two_racing_writers_never_move_a_cursor_backwards() {
    let (url, _server) = shared();
    let prefix = unique_prefix("race");
    let streams = 20;
    let top = 300u64;
    // One writer moves forward, the other writes the same cursors late, in
    // reverse: without the guard, the last write (seq 1) would win.
    let writer = |forward: bool| {
        let store = store(&url, &prefix);
        std::thread::spawn(move || {
            let seqs: Vec<u64> = if forward {
                (1..=top).collect()
            } else {
                (1..=top).rev().collect()
            };
            for chunk in seqs.chunks(10) {
                for &seq in chunk {
                    let batch: Vec<Cursor> = (0..streams)
                        .map(|s| cursor(&format!("s{s}"), &seq.to_string(), seq))
                        .collect();
                    smol::block_on(store.save_batch(&batch)).unwrap();
                }
            }
            store.stale_cursors()
        })
    };
    let reader = {
        let store = store(&url, &prefix);
        std::thread::spawn(move || {
            let mut seen = vec![0u64; streams];
            let mut reads = 0;
            while seen.iter().any(|&s| s < top) {
                for (s, last) in seen.iter_mut().enumerate() {
                    let seq = load(&store, &format!("s{s}")).map_or(0, |c| c.seq);
                    assert!(seq >= *last, "stream s{s} went back from {last} to {seq}");
                    *last = seq;
                    reads += 1;
                }
            }
            reads
        })
    };
    let forward = writer(true);
    let backward = writer(false);
    let stale = forward.join().unwrap() + backward.join().unwrap();
    assert!(reader.join().unwrap() > 0);
    let store = store(&url, &prefix);
    for s in 0..streams {
        let stored = load(&store, &format!("s{s}")).unwrap();
        assert_eq!(stored.seq, top);
        assert_eq!(stored.last_event_id, top.to_string());
    }
    // Once the backward writer's first write (seq 300) is in, each of its
    // later ones is stale.
    assert!(stale >= (top - 1) * streams as u64, "{stale} stale");
}

#[test]
fn keys_have_the_prefix_and_the_ttl() {
    let (url, _server) = shared();
    let prefix = unique_prefix("ttl");
    let mut redis = sync_connection(&url);
    let plain = store(&url, &prefix);
    smol::block_on(plain.save_batch(&[cursor("kept", "1", 1)])).unwrap();
    let kept = plain.cursor_key(&StreamKey::new("session:1", "kept"));
    assert!(kept.starts_with(&prefix));
    let pttl: i64 = redis::cmd("PTTL").arg(&kept).query(&mut redis).unwrap();
    assert_eq!(pttl, -1, "no TTL by default");

    let expiring = RedisStore::new(RedisConfig {
        prefix: prefix.clone(),
        ttl: Some(Duration::from_millis(300)),
        ..RedisConfig::new(&url)
    })
    .unwrap();
    smol::block_on(expiring.save_batch(&[cursor("gone", "1", 1)])).unwrap();
    let gone = expiring.cursor_key(&StreamKey::new("session:1", "gone"));
    let pttl: i64 = redis::cmd("PTTL").arg(&gone).query(&mut redis).unwrap();
    assert!(pttl > 0 && pttl <= 300, "{pttl}");
    wait_for(
        Duration::from_secs(5),
        "the abandoned cursor to expire",
        || load(&expiring, "gone").is_none(),
    );
    assert!(load(&expiring, "kept").is_some(), "other streams stay");
}

#[test]
fn foreign_data_under_a_cursor_key_is_corrupt() {
    let (url, _server) = shared();
    let store = store(&url, &unique_prefix("corrupt"));
    let key = store.cursor_key(&StreamKey::new("session:1", "a"));
    let mut redis = sync_connection(&url);
    let () = redis::cmd("HSET")
        .arg(&key)
        .arg("seq")
        .arg("x")
        .query(&mut redis)
        .unwrap();
    let error = smol::block_on(store.load(&StreamKey::new("session:1", "a"))).unwrap_err();
    assert!(matches!(error, StoreError::Corrupt { .. }), "{error}");
    assert!(error.to_string().contains(&key), "{error}");
}

#[test]
fn a_restarted_redis_is_unavailable_then_reconnected_without_a_restart() {
    let mut server = RedisServer::start();
    let store = store(&server.url(), &unique_prefix("restart"));
    smol::block_on(store.save_batch(&[cursor("a", "1", 1)])).unwrap();
    server.stop();
    let error = smol::block_on(store.save_batch(&[cursor("a", "2", 2)])).unwrap_err();
    assert!(matches!(error, StoreError::Unavailable(_)), "{error}");
    assert!(error.is_transient());
    let error = smol::block_on(store.load(&StreamKey::new("session:1", "a"))).unwrap_err();
    assert!(error.is_transient(), "{error}");
    server.restart();
    // The new server has neither the data nor the script.
    smol::block_on(store.save_batch(&[cursor("a", "3", 3)])).unwrap();
    assert_eq!(load(&store, "a"), Some(cursor("a", "3", 3)));
}

fn lease(store: &Arc<RedisStore>, ttl_ms: u64) -> Lease {
    let key = StreamKey::new("session:1", "leased");
    Lease::new(
        store.clone(),
        &key,
        Duration::from_millis(ttl_ms),
        SmolClock::new(),
    )
}

#[test]
fn a_lease_has_one_holder_and_passes_on_when_it_lapses() {
    let (url, _server) = shared();
    let store = Arc::new(store(&url, &unique_prefix("lease")));
    let first = lease(&store, 400);
    let second = lease(&store, 400);
    assert!(smol::block_on(first.try_acquire()).unwrap());
    assert!(first.is_valid());
    assert!(!smol::block_on(second.try_acquire()).unwrap());
    assert!(smol::block_on(first.renew()).unwrap());
    // Without renewals the holder's own deadline passes before Redis lets
    // the lease go, so the two never both hold it.
    wait_for(Duration::from_secs(5), "the second to acquire", || {
        let acquired = smol::block_on(second.try_acquire()).unwrap();
        assert!(!(acquired && first.is_valid()), "two holders");
        acquired
    });
    assert!(
        !smol::block_on(first.renew()).unwrap(),
        "lapsed: not renewed"
    );
    assert!(smol::block_on(second.renew()).unwrap());
    smol::block_on(second.release()).unwrap();
    assert!(!second.is_valid());
    assert!(smol::block_on(first.try_acquire()).unwrap(), "released");
    let mut redis = sync_connection(&url);
    let holder: String = redis::cmd("GET")
        .arg(first.key())
        .query(&mut redis)
        .unwrap();
    assert_eq!(holder, first.token());
}

#[test]
fn keep_renews_and_reports_a_lease_taken_or_lapsed() {
    let mut server = RedisServer::start();
    let store = Arc::new(store(&server.url(), &unique_prefix("keep")));
    let holder = lease(&store, 600);
    assert!(smol::block_on(holder.try_acquire()).unwrap());
    let kept = smol::block_on(async {
        let keep = std::pin::pin!(holder.keep());
        let later = async_io::Timer::after(Duration::from_millis(2000));
        let later = std::pin::pin!(later);
        matches!(
            futures::future::select(keep, later).await,
            futures::future::Either::Right(_)
        )
    });
    assert!(kept, "kept through three TTLs");
    assert!(holder.is_valid());

    // Redis restarted without persistence while the lease is valid: renewing
    // takes the key again.
    let long = lease(&store, 10_000);
    let () = redis::cmd("DEL")
        .arg(long.key())
        .query(&mut sync_connection(&server.url()))
        .unwrap();
    assert!(smol::block_on(long.try_acquire()).unwrap());
    server.restart();
    assert!(smol::block_on(long.renew()).unwrap());
    let mut redis = sync_connection(&server.url());
    let token: String = redis::cmd("GET").arg(long.key()).query(&mut redis).unwrap();
    assert_eq!(token, long.token());

    // Someone else's token: taken, and no longer valid at once (a lease of
    // its own, valid for long whatever the restart above took).
    let () = redis::cmd("SET")
        .arg(long.key())
        .arg("another")
        .query(&mut redis)
        .unwrap();
    assert_eq!(smol::block_on(long.keep()), LeaseLost::Taken);
    assert!(!long.is_valid());

    // Redis gone for longer than the TTL: lapsed, with the error.
    let () = redis::cmd("DEL")
        .arg(holder.key())
        .query(&mut redis)
        .unwrap();
    assert!(smol::block_on(holder.try_acquire()).unwrap());
    server.stop();
    let started = Instant::now();
    let lost = smol::block_on(holder.keep());
    assert!(
        matches!(lost, LeaseLost::Lapsed(Some(StoreError::Unavailable(_)))),
        "{lost:?}"
    );
    assert!(!holder.is_valid());
    // By the deadline: 540 ms after the last renewal.
    assert!(started.elapsed() < Duration::from_millis(1000));
}

/// A `tidemark follow --redis` process with its stdout ids and stderr lines
/// read by threads; killed when dropped.
struct Follower {
    child: Child,
    ids: Receiver<u64>,
    stderr: Receiver<String>,
    log: Vec<String>,
}

impl Follower {
    fn start(url: &str, redis: &str, args: &[&str]) -> Follower {
        let mut child = Command::new(BIN)
            .args(["follow", url, "--redis", redis])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (id_tx, ids) = channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let value: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
                let _ = id_tx.send(value["data"].as_str().unwrap().parse().unwrap());
            }
        });
        let (err_tx, stderr) = channel();
        let pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let _ = err_tx.send(line.unwrap());
            }
        });
        Follower {
            child,
            ids,
            stderr,
            log: Vec::new(),
        }
    }

    /// Waits for a stderr line containing `needle`; returns it.
    fn wait_stderr(&mut self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(e) => panic!("no {needle:?} on stderr ({e:?}); so far: {:#?}", self.log),
            }
        }
    }

    /// Reads ids into `into` until none arrives for 300 ms (at most 20 s);
    /// returns how many there are then.
    fn read_until_quiet(&self, into: &mut Vec<u64>) -> usize {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let before = into.len();
            self.read_for(into, Duration::from_millis(300));
            if into.len() == before {
                return before;
            }
            assert!(Instant::now() < deadline, "the output never went quiet");
        }
    }

    /// Reads the ids that arrive within `within` into `into`.
    fn read_for(&self, into: &mut Vec<u64>, within: Duration) {
        let deadline = Instant::now() + within;
        while let Ok(id) = self
            .ids
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            into.push(id);
        }
    }

    /// Reads ids into `into` until `stop` holds or the output ends.
    fn read_until(&self, into: &mut Vec<u64>, within: Duration, stop: impl Fn(&[u64]) -> bool) {
        let deadline = Instant::now() + within;
        while !stop(into) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.ids.recv_timeout(left) {
                Ok(id) => into.push(id),
                Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => panic!("timed out after {} ids", into.len()),
            }
        }
    }

    /// The rest of stderr, once the process has exited.
    fn finish_stderr(&mut self) -> Vec<String> {
        self.log.extend(self.stderr.iter());
        self.log.clone()
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn contiguous(ids: &[u64]) -> bool {
    ids.windows(2).all(|w| w[1] == w[0] + 1)
}

#[test]
fn a_standby_takes_over_from_the_shared_cursor_after_kill_9() {
    let (redis, _server) = shared();
    let prefix = unique_prefix("failover");
    let source = Server::start(&["--count", "3000", "--interval-ms", "2"]);
    let args = [
        "--redis-prefix",
        &prefix,
        "--lease-ms",
        "1000",
        "--stream",
        "failover",
    ];
    let mut active = Follower::start(&source.events_url(), &redis, &args);
    active.wait_stderr("holding the lease", Duration::from_secs(10));
    let mut standby = Follower::start(&source.events_url(), &redis, &args);
    standby.wait_stderr("waiting for the lease", Duration::from_secs(10));

    let mut first = Vec::new();
    active.read_until(&mut first, Duration::from_secs(20), |ids| ids.len() >= 400);
    assert!(
        standby.ids.try_recv().is_err(),
        "the standby delivers nothing while the lease is held"
    );
    active.child.kill().unwrap(); // SIGKILL: no chance to flush or release
    let killed = Instant::now();
    active.child.wait().unwrap();
    active.read_until(&mut first, Duration::from_secs(5), |_| false);

    let took_over = standby.wait_stderr("following", Duration::from_secs(10));
    let waited = killed.elapsed();
    let resumed_from: u64 = took_over
        .rsplit_once("Last-Event-ID ")
        .map(|(_, id)| id.parse().unwrap())
        .unwrap_or_else(|| panic!("{took_over}"));
    assert!(
        waited < Duration::from_millis(1000 + 1500),
        "took over {waited:?} after the kill, lease 1 s"
    );
    let mut second = Vec::new();
    standby.read_until(&mut second, Duration::from_secs(30), |ids| {
        ids.last() == Some(&3000)
    });
    standby.signal("-INT");
    assert!(standby.child.wait().unwrap().success());

    assert_eq!(first.first(), Some(&1));
    assert!(contiguous(&first) && contiguous(&second));
    let last_printed = *first.last().unwrap();
    assert!(
        resumed_from > 0,
        "the active instance flushed before the kill"
    );
    assert!(
        resumed_from <= last_printed,
        "the cursor never passes output"
    );
    assert_eq!(second.first(), Some(&(resumed_from + 1)));
    // Repeated: exactly the events after the last flush before the kill, at
    // most a flush interval's worth (250 ms at 2 ms per event).
    let repeated: Vec<u64> = second
        .iter()
        .copied()
        .filter(|id| first.contains(id))
        .collect();
    assert_eq!(
        repeated,
        ((resumed_from + 1)..=last_printed).collect::<Vec<_>>()
    );
    assert!(repeated.len() < 250, "{} repeated", repeated.len());
    let mut union: Vec<u64> = first.into_iter().chain(second).collect();
    union.sort_unstable();
    union.dedup();
    assert_eq!(union, (1..=3000).collect::<Vec<_>>());

    let shared = store(&redis, &prefix);
    let key = StreamKey::new(source.events_url(), "failover");
    let cursor = smol::block_on(shared.load(&key)).unwrap().unwrap();
    assert_eq!(cursor.last_event_id, "3000", "the graceful stop saved it");
}

#[test]
fn redis_restarted_mid_run_loses_nothing_and_the_cursor_catches_up() {
    // An outage of 150 events (300 ms), well inside the 10 s lease.
    outage(&[], 150);
}

#[test]
fn without_a_lease_an_outage_longer_than_any_lease_loses_nothing() {
    // 2 s without Redis: a 600 ms lease would have lapsed and stopped it.
    outage(&["--no-lease"], 1000);
}

#[test]
fn an_outage_longer_than_the_lease_pauses_delivery_and_loses_nothing() {
    let mut server = RedisServer::start();
    let prefix = unique_prefix("lapse");
    let source = Server::start(&["--count", "2000", "--interval-ms", "2"]);
    let mut follower = Follower::start(
        &source.events_url(),
        &server.url(),
        &[
            "--redis-prefix",
            &prefix,
            "--max-events",
            "2000",
            "--lease-ms",
            "1500",
        ],
    );
    let mut ids = Vec::new();
    follower.read_until(&mut ids, Duration::from_secs(20), |ids| ids.len() >= 300);
    server.stop();
    let line = follower.wait_stderr("stopped delivering", Duration::from_secs(10));
    assert!(line.contains("lapsed"), "{line}");
    follower.wait_stderr("standby", Duration::from_secs(5));
    let at_stop = follower.read_until_quiet(&mut ids);
    follower.read_for(&mut ids, Duration::from_millis(1000));
    assert_eq!(ids.len(), at_stop, "delivered without the lease");
    // Redis comes back empty: the lease is free, and this process resumes
    // from the cursor it committed.
    server.restart();
    follower.wait_stderr("holding the lease", Duration::from_secs(10));
    follower.read_until(&mut ids, Duration::from_secs(30), |_| false);
    assert!(follower.child.wait().unwrap().success());
    assert_eq!(ids, (1..=2000).collect::<Vec<_>>(), "no loss, no repeat");
}

#[test]
fn a_holder_back_from_standby_resumes_from_its_own_cursor_when_redis_lost_it() {
    let mut server = RedisServer::start();
    let prefix = unique_prefix("idle");
    let source = Server::start(&["--count", "200", "--interval-ms", "1"]);
    let mut follower = Follower::start(
        &source.events_url(),
        &server.url(),
        &["--redis-prefix", &prefix, "--lease-ms", "1500"],
    );
    let mut ids = Vec::new();
    follower.read_until(&mut ids, Duration::from_secs(20), |ids| ids.len() >= 200);
    // The stream is idle, and its cursor is written.
    let store = store(&server.url(), &prefix);
    let key = StreamKey::new(source.events_url(), "default");
    wait_for(Duration::from_secs(5), "the cursor to be written", || {
        smol::block_on(store.load(&key))
            .ok()
            .flatten()
            .is_some_and(|c| c.last_event_id == "200")
    });
    // Redis goes away for longer than the lease, and comes back empty.
    server.stop();
    follower.wait_stderr("stopped delivering", Duration::from_secs(10));
    server.restart();
    follower.wait_stderr("holding the lease", Duration::from_secs(10));
    let line = follower.wait_stderr("following", Duration::from_secs(10));
    assert!(line.contains("from Last-Event-ID 200"), "{line}");
    follower.read_for(&mut ids, Duration::from_millis(500));
    follower.signal("-TERM");
    follower.read_until(&mut ids, Duration::from_secs(20), |_| false);
    assert!(follower.child.wait().unwrap().success());
    assert_eq!(ids, (1..=200).collect::<Vec<_>>(), "no repeat");
}

/// Follows 2,000 events while Redis is stopped for `events` of them, then
/// restarted empty.
fn outage(args: &[&str], events: usize) {
    let leased = args.is_empty();
    let mut server = RedisServer::start();
    let prefix = unique_prefix("outage");
    let source = Server::start(&["--count", "2000", "--interval-ms", "2"]);
    let mut follower = Follower::start(
        &source.events_url(),
        &server.url(),
        &[&["--redis-prefix", &prefix, "--max-events", "2000"], args].concat(),
    );
    let store = store(&server.url(), &prefix);
    let key = StreamKey::new(source.events_url(), "default");
    let stored = || {
        smol::block_on(store.load(&key))
            .ok()
            .flatten()
            .map_or(0, |c| c.last_event_id.parse::<u64>().unwrap())
    };
    let mut ids = Vec::new();
    follower.read_until(&mut ids, Duration::from_secs(20), |ids| ids.len() >= 300);
    wait_for(Duration::from_secs(5), "a first cursor", || stored() > 0);

    server.stop();
    follower.wait_stderr("cursor store failing", Duration::from_secs(10));
    let at_failure = ids.len();
    follower.read_until(&mut ids, Duration::from_secs(20), |ids| {
        ids.len() >= at_failure + events
    });
    server.restart();
    let at_restart = *ids.last().unwrap();
    follower.wait_stderr("cursor store is back", Duration::from_secs(10));
    wait_for(Duration::from_secs(5), "the cursor to catch up", || {
        stored() >= at_restart
    });
    let mut redis = sync_connection(&server.url());
    let leases = |redis: &mut redis::Connection| {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}lease:*"))
            .query(redis)
            .unwrap();
        keys.len()
    };
    if leased {
        wait_for(
            Duration::from_secs(10),
            "the holder to take its lease back",
            || leases(&mut redis) == 1,
        );
    } else {
        assert_eq!(leases(&mut redis), 0);
    }

    follower.read_until(&mut ids, Duration::from_secs(30), |_| false);
    assert!(follower.child.wait().unwrap().success());
    assert_eq!(ids, (1..=2000).collect::<Vec<_>>(), "no loss, no repeat");
    assert_eq!(stored(), 2000);
    let stderr = follower.finish_stderr();
    let summary = stderr.last().unwrap();
    let failed: u64 = summary
        .split(", ")
        .find_map(|part| part.strip_suffix(" failed batches"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{summary}"));
    assert!(failed > 0, "{summary}");
    assert!(
        summary.contains("last store error: store unavailable"),
        "{summary}"
    );
}

#[test]
fn an_instance_that_loses_its_lease_stops_delivering_and_waits_as_a_standby() {
    let (redis, _server) = shared();
    let prefix = unique_prefix("taken");
    // A source that never pauses: the next event is always ready, so only
    // the lease's own state can stop the follower between two events.
    let source = Server::start(&["--interval-ms", "0"]);
    let mut follower = Follower::start(
        &source.events_url(),
        &redis,
        &["--redis-prefix", &prefix, "--lease-ms", "6000"],
    );
    let mut ids = Vec::new();
    follower.read_until(&mut ids, Duration::from_secs(20), |ids| ids.len() >= 50);
    let store = Arc::new(store(&redis, &prefix));
    let key = StreamKey::new(source.events_url(), "default");
    let lease_key = Lease::new(store, &key, Duration::from_secs(1), SmolClock::new())
        .key()
        .to_owned();
    let mut connection = sync_connection(&redis);
    let () = redis::cmd("SET")
        .arg(&lease_key)
        .arg("intruder")
        .query(&mut connection)
        .unwrap();
    let taken = Instant::now();
    let line = follower.wait_stderr("stopped delivering", Duration::from_secs(5));
    assert!(line.contains("another instance holds it"), "{line}");
    let stopped_after = taken.elapsed();
    // Within a renewal period (2 s) of the take, not at the deadline of
    // the last renewal (5.4 s after it, so at least 3.4 s after the take).
    assert!(
        stopped_after < Duration::from_millis(3000),
        "{stopped_after:?}"
    );
    follower.wait_stderr("standby", Duration::from_secs(5));
    // What was printed before the stop arrives; then nothing while the
    // intruder holds the lease.
    let at_stop = follower.read_until_quiet(&mut ids);
    follower.read_for(&mut ids, Duration::from_millis(1500));
    assert_eq!(ids.len(), at_stop, "delivered while a standby");
    assert!(
        follower.child.try_wait().unwrap().is_none(),
        "still running"
    );
    let holder: String = redis::cmd("GET")
        .arg(&lease_key)
        .query(&mut connection)
        .unwrap();
    assert_eq!(holder, "intruder", "the loser leaves the lease alone");

    // The intruder goes: the standby takes the lease again and resumes from
    // the stored cursor, losing nothing.
    let () = redis::cmd("DEL")
        .arg(&lease_key)
        .query(&mut connection)
        .unwrap();
    follower.wait_stderr("holding the lease", Duration::from_secs(5));
    follower.read_until(&mut ids, Duration::from_secs(20), |ids| {
        ids.len() >= at_stop + 100
    });
    follower.signal("-TERM");
    follower.read_until(&mut ids, Duration::from_secs(20), |_| false);
    assert!(follower.child.wait().unwrap().success());
    // It resumed right after the last event it wrote: the stored cursor.
    assert_eq!(ids[0], 1);
    assert!(contiguous(&ids), "an id is missing or repeated");
}

// Dedup windows (`RedisConfig::windows`, `follow --redis-window`).

fn windowed(url: &str, prefix: &str) -> Arc<RedisStore> {
    Arc::new(
        RedisStore::new(RedisConfig {
            prefix: prefix.into(),
            timeout: Duration::from_secs(2),
            windows: true,
            ..RedisConfig::new(url)
        })
        .unwrap(),
    )
}

fn numbers(range: std::ops::RangeInclusive<u64>) -> Vec<String> {
    range.map(|n| n.to_string()).collect()
}

fn uuid(n: u64) -> String {
    format!("{n:08x}-4f1c-8a2e-b5d3-{:012x}", n * 7919)
}

/// One process's life over `store`: a registry and its worker, stream
/// `stream` opened, each of `ids` observed and the fresh ones committed, a
/// flush after every `flush_every` ids, then a graceful shutdown. Returns the
/// fresh ids, as an application would have received them.
fn session(
    store: &Arc<RedisStore>,
    stream: &str,
    ids: &[String],
    flush_every: usize,
) -> Vec<String> {
    let clock = SmolClock::new();
    smol::block_on(async {
        let (registry, worker) =
            tidemark_core::persistence(store.clone(), clock, tidemark_core::Config::default());
        let worker = smol::spawn(worker.run());
        let mut tracker = registry
            .open(StreamKey::new("session:1", stream))
            .await
            .unwrap();
        let mut fresh = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            if tracker.observe(Some(id), clock.now()).is_fresh() {
                fresh.push(id.clone());
                tracker.commit();
            }
            if (i + 1) % flush_every == 0 {
                let report = registry.worker().flush().await.unwrap();
                assert_eq!(report.error, None);
            }
        }
        drop(tracker);
        let report = registry
            .shutdown(clock.now() + Millis::from_secs(5))
            .await
            .unwrap();
        assert!(report.is_complete(), "{report:?}");
        worker.await;
        fresh
    })
}

fn window_bytes(url: &str, store: &RedisStore, stream: &str) -> Option<Vec<u8>> {
    redis::cmd("GET")
        .arg(store.window_key_of(&StreamKey::new("session:1", stream)))
        .query(&mut sync_connection(url))
        .unwrap()
}

#[test]
fn windows_survive_a_new_store_instance_whose_tracker_drops_the_replay() {
    let (url, _server) = shared();
    let prefix = unique_prefix("window-survive");
    let all: Vec<String> = (0..400).map(uuid).collect();
    let first = windowed(&url, &prefix);
    assert_eq!(session(&first, "a", &all[..200], 7), &all[..200]);
    // Another store, as another process or another instance of the fleet
    // would open: it has the window, under the same key.
    let second = windowed(&url, &prefix);
    assert_eq!(session(&second, "a", &all[150..300], 7), &all[200..300]);
    let numeric = numbers(1..=100);
    assert_eq!(session(&second, "n", &numeric, 10), numeric);
    assert_eq!(
        session(&windowed(&url, &prefix), "n", &numbers(60..=110), 10),
        numbers(101..=110)
    );
    // Without windows, the same Redis resumes from the cursor only, as
    // before: the rewind repeats but for the cursor's own id.
    let plain = Arc::new(store(&url, &prefix));
    assert_eq!(smol::block_on(plain.window_key()).unwrap(), None);
    let mut expected = all[290..299].to_vec();
    expected.extend_from_slice(&all[300..310]);
    assert_eq!(session(&plain, "a", &all[290..310], 7), expected);
}

#[test]
fn every_instance_of_a_fleet_shares_one_random_key_kept_in_redis() {
    let (url, _server) = shared();
    let prefix = unique_prefix("window-key");
    // Many instances asking at once for a key no one made yet.
    let keys: Vec<[u8; 16]> = (0..8)
        .map(|_| {
            let store = windowed(&url, &prefix);
            std::thread::spawn(move || {
                smol::block_on(store.window_key())
                    .unwrap()
                    .unwrap()
                    .to_bytes()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    assert!(keys.iter().all(|k| *k == keys[0]), "one key for all");
    let name = windowed(&url, &prefix).fingerprint_key_name();
    assert_eq!(name, format!("{prefix}window-key"));
    let mut redis = sync_connection(&url);
    let stored: Vec<u8> = redis::cmd("GET").arg(&name).query(&mut redis).unwrap();
    assert_eq!(stored, keys[0]);
    assert_ne!(keys[0], [0; 16]);
    // Another prefix is another deployment, with a key of its own.
    let other = windowed(&url, &unique_prefix("window-key-other"));
    let other = smol::block_on(other.window_key()).unwrap().unwrap();
    assert_ne!(other.to_bytes(), keys[0]);
    // The store never shows it.
    let store = windowed(&url, &prefix);
    smol::block_on(store.window_key()).unwrap();
    let shown = format!("{store:?}");
    assert!(shown.contains("windows: true"), "{shown}");
    for byte in keys[0].chunks(4) {
        let hex: String = byte.iter().map(|b| format!("{b:02x}")).collect();
        assert!(!shown.contains(&hex), "{shown}");
    }
    // A foreign value there is corrupt, not silently replaced.
    let broken = unique_prefix("window-key-broken");
    let () = redis::cmd("SET")
        .arg(format!("{broken}window-key"))
        .arg("short")
        .query(&mut redis)
        .unwrap();
    let error = smol::block_on(windowed(&url, &broken).window_key()).unwrap_err();
    assert!(matches!(error, StoreError::Corrupt { .. }), "{error}");
}

#[test]
fn a_cursor_written_without_windows_opens_and_resumes_with_them() {
    let (url, _server) = shared();
    let prefix = unique_prefix("window-old");
    let plain = Arc::new(store(&url, &prefix));
    assert_eq!(session(&plain, "a", &numbers(1..=50), 10).len(), 50);
    let windowed = windowed(&url, &prefix);
    let key = StreamKey::new("session:1", "a");
    assert_eq!(smol::block_on(windowed.load_window(&key)).unwrap(), None);
    // It resumes after the cursor; only the cursor's id was known of the
    // old window.
    let mut expected = numbers(41..=49);
    expected.extend(numbers(51..=60));
    assert_eq!(session(&windowed, "a", &numbers(41..=60), 10), expected);
    // From now on the window is kept.
    assert_eq!(
        session(&windowed, "a", &numbers(41..=70), 10),
        numbers(61..=70)
    );
    assert_eq!(load(&windowed, "a").unwrap().last_event_id, "70");
}

#[test]
fn compaction_keeps_the_window_and_bounds_what_is_stored() {
    let (url, _server) = shared();
    let prefix = unique_prefix("window-compact");
    let store = windowed(&url, &prefix);
    let mut longest = 0;
    for part in 0..30u64 {
        let ids = numbers(part * 100 + 1..=part * 100 + 100);
        assert_eq!(session(&store, "a", &ids, 5), ids);
        longest = longest.max(window_bytes(&url, &store, "a").unwrap().len());
    }
    let stored = window_bytes(&url, &store, "a").unwrap();
    let window = SavedWindow::decode(&stored).unwrap();
    assert_eq!(window.len(), 1024, "a full window (the default bound)");
    let folded = window.to_bytes().len();
    // 600 flushes of five ids (a record of about 11 bytes each) were
    // appended; the string never grew much past twice its fold.
    assert!(longest <= 2 * folded + 64, "{longest} B, fold {folded} B");
    assert!(longest < 600 * 11, "{longest}");
    // What a new instance loads drops the whole window's worth of replays.
    let replay = numbers(3001 - 1024..=3010);
    assert_eq!(
        session(&windowed(&url, &prefix), "a", &replay, 50),
        numbers(3001..=3010)
    );
}

#[test]
fn a_compaction_never_overwrites_what_another_instance_wrote() {
    let (url, _server) = shared();
    let prefix = unique_prefix("window-race");
    let clock = SmolClock::new();
    let first = windowed(&url, &prefix);
    assert_eq!(session(&first, "a", &numbers(1..=100), 10).len(), 100);
    smol::block_on(async {
        // Instance A has the stream open (and its window folded in memory)...
        let a = windowed(&url, &prefix);
        let (registry, worker) =
            tidemark_core::persistence(a.clone(), clock, tidemark_core::Config::default());
        let worker = smol::spawn(worker.run());
        let mut tracker = registry
            .open(StreamKey::new("session:1", "a"))
            .await
            .unwrap();
        let mut feed = |ids: std::ops::RangeInclusive<u64>| {
            for id in ids {
                assert!(
                    tracker
                        .observe(Some(&id.to_string()), clock.now())
                        .is_fresh()
                );
                tracker.commit();
            }
        };
        feed(101..=110);
        registry.worker().flush().await.unwrap();
        // ... when instance B sees the server start its ids again (an empty
        // id resets them) and delivers 1 to 5 of the new sequence.
        let b = windowed(&url, &prefix);
        let mut reset = vec![String::new()];
        reset.extend(numbers(1..=5));
        assert_eq!(session(&b, "a", &reset, 10), reset);
        // A goes on writing the old sequence, long enough to compact.
        let mut last = window_bytes(&url, &a, "a").unwrap().len();
        let mut shrank = false;
        for part in 0..60u64 {
            feed(111 + part * 10..=120 + part * 10);
            registry.worker().flush().await.unwrap();
            let now = window_bytes(&url, &a, "a").unwrap().len();
            shrank |= now < last;
            last = now;
        }
        assert!(shrank, "A compacted the string");
        drop(tracker);
        registry
            .shutdown(clock.now() + Millis::from_secs(5))
            .await
            .unwrap();
        worker.await;
    });
    // B's reset is kept: the window is B's five ids, not A's fold of a
    // thousand. (Overwriting it with A's fold would drop 6 to 10 of the new
    // sequence, which were never delivered.)
    let third = windowed(&url, &prefix);
    let window = smol::block_on(third.load_window(&StreamKey::new("session:1", "a")));
    assert_eq!(window.unwrap().map(|w| w.len()), Some(5));
    // The stored cursor is A's, newer than B's window: the registry starts
    // with an empty window rather than trust one that does not go with its
    // cursor, so 1 to 5 come again, and 6 to 10 are fresh.
    let delivered = session(&third, "a", &numbers(1..=10), 10);
    assert_eq!(delivered, numbers(1..=10));
}

#[test]
fn delete_removes_the_window_and_the_ttl_covers_it() {
    let (url, _server) = shared();
    let prefix = unique_prefix("window-ttl");
    let store = Arc::new(
        RedisStore::new(RedisConfig {
            prefix: prefix.clone(),
            ttl: Some(Duration::from_secs(60)),
            windows: true,
            ..RedisConfig::new(&url)
        })
        .unwrap(),
    );
    assert_eq!(session(&store, "a", &numbers(1..=1000), 3).len(), 1000);
    let key = StreamKey::new("session:1", "a");
    let mut redis = sync_connection(&url);
    for name in [store.cursor_key(&key), store.window_key_of(&key)] {
        let pttl: i64 = redis::cmd("PTTL").arg(&name).query(&mut redis).unwrap();
        assert!(pttl > 50_000 && pttl <= 60_000, "{name}: {pttl}");
    }
    let pttl: i64 = redis::cmd("PTTL")
        .arg(store.fingerprint_key_name())
        .query(&mut redis)
        .unwrap();
    assert_eq!(pttl, -1, "the key outlives every window");
    smol::block_on(store.delete(&key)).unwrap();
    let exists: u64 = redis::cmd("EXISTS")
        .arg(store.cursor_key(&key))
        .arg(store.window_key_of(&key))
        .query(&mut redis)
        .unwrap();
    assert_eq!(exists, 0);
    assert_eq!(smol::block_on(store.load_window(&key)).unwrap(), None);
    // Opened again, the stream starts from nothing.
    assert_eq!(session(&store, "a", &numbers(1..=3), 3), numbers(1..=3));
}

#[test]
fn windows_wait_out_a_redis_restart_like_cursors() {
    let mut server = RedisServer::start();
    let url = server.url();
    let prefix = unique_prefix("window-restart");
    let store = windowed(&url, &prefix);
    let clock = SmolClock::new();
    smol::block_on(async {
        let (registry, worker) =
            tidemark_core::persistence(store.clone(), clock, tidemark_core::Config::default());
        let worker = smol::spawn(worker.run());
        let mut tracker = registry
            .open(StreamKey::new("session:1", "a"))
            .await
            .unwrap();
        for id in 1..=50 {
            assert!(
                tracker
                    .observe(Some(&id.to_string()), clock.now())
                    .is_fresh()
            );
            tracker.commit();
        }
        assert_eq!(registry.worker().flush().await.unwrap().error, None);
        server.stop();
        for id in 51..=100 {
            assert!(
                tracker
                    .observe(Some(&id.to_string()), clock.now())
                    .is_fresh()
            );
            tracker.commit();
        }
        let failed = registry.worker().flush().await.unwrap();
        assert!(
            matches!(failed.error, Some(StoreError::Unavailable(_))),
            "{failed:?}"
        );
        // Back, empty: what was not written yet is written now.
        server.restart();
        drop(tracker);
        let report = registry
            .shutdown(clock.now() + Millis::from_secs(10))
            .await
            .unwrap();
        assert!(report.is_complete(), "{report:?}");
        worker.await;
    });
    let again = windowed(&url, &prefix);
    assert_eq!(
        session(&again, "a", &numbers(51..=110), 10),
        numbers(101..=110)
    );
}

/// Runs `follow --redis` (with `args`) against a server that re-sends 30
/// events before Last-Event-ID and drops every 200, stopping it with SIGTERM
/// after every 150 ids until all `count` are in; returns every id printed
/// and the number of runs.
fn restarted_follower(count: u64, args: &[&str]) -> (Vec<u64>, u64) {
    let (redis, _server) = shared();
    let prefix = unique_prefix("window-follow");
    let source = Server::rewinding(count, 1);
    let mut ids: Vec<u64> = Vec::new();
    let mut runs = 0;
    while ids.last() != Some(&count) {
        runs += 1;
        assert!(runs <= 20, "{runs} runs for {count} ids: {ids:?}");
        let mut follower = Follower::start(
            &source.events_url(),
            &redis,
            &[&["--redis-prefix", &prefix], args].concat(),
        );
        let target = ids.len() + 150;
        follower.read_until(&mut ids, Duration::from_secs(30), |ids| {
            ids.len() >= target || ids.last() == Some(&count)
        });
        follower.signal("-TERM");
        follower.read_until(&mut ids, Duration::from_secs(20), |_| false);
        assert!(follower.child.wait().unwrap().success());
    }
    (ids, runs)
}

#[test]
fn follow_with_redis_window_restarted_five_times_prints_every_id_once() {
    let (ids, runs) = restarted_follower(900, &["--redis-window"]);
    assert!(runs >= 6, "{runs} runs");
    assert_eq!(ids, (1..=900).collect::<Vec<_>>(), "every id exactly once");
}

#[test]
fn follow_without_redis_window_repeats_the_rewind_after_a_restart_as_before() {
    let (ids, runs) = restarted_follower(450, &[]);
    let mut unique = ids.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique, (1..=450).collect::<Vec<_>>(), "nothing lost");
    // The server re-sends 30 events before the cursor; only the cursor's id
    // is known to a restarted process.
    assert!(runs >= 3, "{runs} runs");
    assert_eq!(
        ids.len() - unique.len(),
        29 * (runs as usize - 1),
        "{ids:?}"
    );
}

#[test]
fn kill_9_with_redis_window_repeats_only_what_arrived_since_the_last_flush() {
    let (redis, _server) = shared();
    let prefix = unique_prefix("window-kill");
    let source = Server::rewinding(2000, 1);
    let args = ["--redis-prefix", &prefix, "--redis-window", "--no-lease"];
    let mut first = Vec::new();
    let mut killed = Follower::start(&source.events_url(), &redis, &args);
    killed.read_until(&mut first, Duration::from_secs(30), |ids| ids.len() >= 500);
    killed.child.kill().unwrap(); // SIGKILL: no last flush
    killed.child.wait().unwrap();
    killed.read_until(&mut first, Duration::from_secs(5), |_| false);
    let last_printed = *first.last().unwrap();
    let store = store(&redis, &prefix);
    let key = StreamKey::new(source.events_url(), "default");
    let flushed: u64 = smol::block_on(store.load(&key))
        .unwrap()
        .unwrap()
        .last_event_id
        .parse()
        .unwrap();

    let mut second = Vec::new();
    let mut follower = Follower::start(&source.events_url(), &redis, &args);
    follower.read_until(&mut second, Duration::from_secs(30), |ids| {
        ids.last() == Some(&2000)
    });
    follower.signal("-TERM");
    follower.read_until(&mut second, Duration::from_secs(20), |_| false);
    assert!(follower.child.wait().unwrap().success());

    assert_eq!(first, (1..=last_printed).collect::<Vec<_>>());
    // The server re-sent 30 events before the cursor: the stored window
    // dropped them. What repeats is what was printed after the last flush.
    assert_eq!(second, (flushed + 1..=2000).collect::<Vec<_>>());
    let repeated = last_printed - flushed;
    assert!(repeated < 300, "{repeated} repeated (250 ms of events)");
}
