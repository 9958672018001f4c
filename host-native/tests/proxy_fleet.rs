//! A fleet of `tidemark proxy` instances sharing their log in Redis
//! Streams (issue 15): three instances before one upstream, clients spread
//! over them and moved between them mid-stream, `kill -9` of the instance
//! that follows the upstream, a Redis restart. Every client gets every
//! event once, in order. The Redis server is one the test starts (with an
//! append-only file, so that its restart loses nothing it acknowledged).

mod support {
    pub mod http;
    pub mod proxy;
    pub mod redis_server;
    pub mod serve;
    pub mod upstream;
}

use std::time::{Duration, Instant};
use support::http::{Event, Sse, get_sse, proxy_id};
use support::proxy::{Proxy, scrape, seqs, tokens};
use support::redis_server::RedisServer;
use support::upstream::{Upstream, wait_until};

/// The upstream feed: replays after `Last-Event-ID`, never drops by itself.
const FEED: &str = "/replay?drop=1000000&count=100000";

fn fleet_proxy(upstream: &Upstream, redis: &RedisServer, prefix: &str) -> Proxy {
    instance(upstream, &redis.url(), prefix, &[])
}

/// An instance of the fleet on the Redis at `redis_url` with `prefix`, a
/// 1 s lease unless `extra` says otherwise, metrics on a port of its own.
fn instance(upstream: &Upstream, redis_url: &str, prefix: &str, extra: &[&str]) -> Proxy {
    let mut args = vec!["--log", redis_url, "--redis-prefix", prefix];
    if !extra.contains(&"--lease-ms") {
        args.extend(["--lease-ms", "1000"]);
    }
    args.extend(["--metrics-listen", "127.0.0.1:0"]);
    args.extend_from_slice(extra);
    Proxy::start(&upstream.url(), &args)
}

/// Streams that expire a second after their last event, and GET streams
/// let go as soon as their last client here leaves.
const SHORT_LIVED: [&str; 4] = ["--retain-secs", "1", "--linger-secs", "0"];

/// A client of the feed that remembers what it got and can move.
struct Client {
    sse: Option<Sse>,
    events: Vec<Event>,
}

impl Client {
    fn connect(&mut self, proxy: &Proxy) {
        let mut headers = Vec::new();
        let last = self.events.last().map(|e| e.id().to_owned());
        if let Some(id) = &last {
            headers.push(("Last-Event-ID", id.as_str()));
        }
        let response = get_sse(&proxy.addr, FEED, &headers);
        assert_eq!(response.status, 200, "{response:?}");
        let sse = response.sse();
        sse.set_timeout(Duration::from_secs(20));
        self.sse = Some(sse);
    }

    /// Reads until it has `n` events; `false` if its connection broke
    /// first (its proxy died).
    fn read_until(&mut self, n: usize) -> bool {
        let Some(sse) = &mut self.sse else {
            return false;
        };
        while self.events.len() < n {
            match sse.try_item() {
                Ok(Some(support::http::Item::Event(event))) => self.events.push(event),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    self.sse = None;
                    return false;
                }
            }
        }
        true
    }
}

/// The instance following the upstream now, by its metrics.
fn follower(proxies: &[Option<Proxy>]) -> usize {
    let mut found = None;
    wait_until("one instance to follow the upstream", || {
        let following: Vec<usize> = proxies
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                let p = p.as_ref()?;
                let metrics = scrape(&p.metrics_addr());
                (metrics.get("tidemark_proxy_upstream_connections") == Some(&1.0)).then_some(i)
            })
            .collect();
        found = (following.len() == 1).then(|| following[0]);
        found.is_some()
    });
    found.unwrap()
}

#[test]
fn three_instances_on_redis_every_client_gets_every_event_once_through_moves_a_kill_and_a_redis_restart()
 {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = RedisServer::start_persistent(dir.path());
    let upstream = Upstream::start();
    let mut proxies: Vec<Option<Proxy>> = (0..3)
        .map(|_| Some(fleet_proxy(&upstream, &redis, "fleet:")))
        .collect();
    let mut clients: Vec<(usize, Client)> = (0..6)
        .map(|i| {
            let mut client = Client {
                sse: None,
                events: Vec::new(),
            };
            client.connect(proxies[i % 3].as_ref().unwrap());
            (i % 3, client)
        })
        .collect();
    let read_all = |clients: &mut Vec<(usize, Client)>, proxies: &[Option<Proxy>], n: usize| {
        let deadline = Instant::now() + Duration::from_secs(30);
        for (at, client) in clients.iter_mut() {
            while !client.read_until(n) {
                assert!(Instant::now() < deadline, "a client never got {n} events");
                // Its instance died: to the next one alive, as a load
                // balancer would.
                *at = (1..=3)
                    .map(|k| (*at + k) % 3)
                    .find(|&k| proxies[k].is_some())
                    .unwrap();
                client.connect(proxies[*at].as_ref().unwrap());
            }
        }
    };

    upstream.release(50);
    read_all(&mut clients, &proxies, 50);
    let first_follower = follower(&proxies);
    assert_eq!(upstream.state.count("/replay"), 1, "one instance follows");

    // Every client moves to the next instance mid-stream.
    for (at, client) in clients.iter_mut() {
        *at = (*at + 1) % 3;
        client.connect(proxies[*at].as_ref().unwrap());
    }
    upstream.release(100);
    read_all(&mut clients, &proxies, 100);

    // The follower dies; another takes its lease and follows on from the
    // upstream id in the log.
    proxies[first_follower].as_mut().unwrap().kill9();
    proxies[first_follower] = None;
    upstream.release(150);
    read_all(&mut clients, &proxies, 150);
    let second_follower = follower(&proxies);
    assert_ne!(second_follower, first_follower);
    let resumed = upstream.state.requests_to("/replay");
    assert_eq!(
        resumed.len(),
        2,
        "one more upstream connection: {resumed:?}"
    );
    assert!(
        resumed[1].header("last-event-id").is_some(),
        "the new follower resumes the upstream: {:?}",
        resumed[1]
    );

    // Redis goes down: the follower's own clients keep the live stream,
    // from its memory.
    redis.stop();
    upstream.release(175);
    assert!(
        clients.iter().any(|(at, _)| *at == second_follower),
        "a client of the follower"
    );
    for (at, client) in clients.iter_mut() {
        if *at == second_follower {
            assert!(
                client.read_until(175),
                "the follower's client keeps the stream"
            );
        }
    }
    // Redis is back (its append-only file has everything it acknowledged):
    // the backlog is written, the mirrors catch up.
    redis.restart();
    upstream.release(200);
    read_all(&mut clients, &proxies, 200);

    for (i, (_, client)) in clients.iter().enumerate() {
        let data: Vec<u64> = client
            .events
            .iter()
            .map(|e| e.data.parse().unwrap())
            .collect();
        assert_eq!(
            data,
            (1..=200).collect::<Vec<u64>>(),
            "client {i}: every event once, in order"
        );
        let token = proxy_id(client.events[0].id()).0;
        let seqs: Vec<u64> = client
            .events
            .iter()
            .map(|e| {
                let (t, seq) = proxy_id(e.id());
                assert_eq!(t, token, "client {i}: one stream for the whole fleet");
                seq
            })
            .collect();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "client {i}: ids strictly increasing: {seqs:?}"
        );
    }
}

/// A POST answered with a stream, through `proxy`: its Content-Location
/// and the stream.
fn post(proxy: &Proxy, path: &str) -> (String, Sse) {
    let answer = support::http::request(
        &proxy.addr,
        "POST",
        path,
        &[AUTH, ("Accept", "text/event-stream")],
        Some(b"{}"),
    );
    assert_eq!(answer.status, 200, "{answer:?}");
    let location = answer.header("content-location").unwrap().to_owned();
    (location, answer.sse())
}

const AUTH: (&str, &str) = ("Authorization", "Bearer fleet");

#[test]
fn a_post_answer_read_by_one_instance_resumes_on_another_then_ends_there() {
    let redis = RedisServer::start();
    let upstream = Upstream::start();
    let a = fleet_proxy(&upstream, &redis, "post:");
    let b = fleet_proxy(&upstream, &redis, "post:");
    let (location, mut first) = post(&a, "/chat?tokens=20&hold=10");
    let half = first.events(10);
    let token = proxy_id(half[0].id()).0;
    drop(first);
    // Resumed on B while A still reads the answer: B mirrors it from Redis.
    let last = format!("{token}-10");
    let mut resumed = get_sse(&b.addr, &location, &[AUTH, ("Last-Event-ID", &last)]).sse();
    resumed.set_timeout(Duration::from_secs(20));
    upstream.release_chat();
    let rest = resumed.rest(); // ends when the stream ends, as B learns from Redis
    assert_eq!(seqs(&rest, &token), tokens(11..=20));
    let done = format!("{token}-20");
    let finished = get_sse(&b.addr, &location, &[AUTH, ("Last-Event-ID", &done)]);
    assert_eq!(finished.status, 204, "{finished:?}");
    // Another identity learns nothing of it, on any instance.
    let stranger = get_sse(&b.addr, &location, &[("Last-Event-ID", &last)]);
    assert_eq!(stranger.status, 404, "{stranger:?}");
    assert_eq!(upstream.state.count("/chat"), 1, "one POST upstream");
}

#[test]
fn when_the_instance_reading_a_post_answer_dies_another_ends_the_stream_at_what_was_logged() {
    let redis = RedisServer::start();
    let upstream = Upstream::start();
    let mut a = fleet_proxy(&upstream, &redis, "orphan:");
    let b = fleet_proxy(&upstream, &redis, "orphan:");
    let (location, mut first) = post(&a, "/chat?tokens=20&hold=10");
    let token = proxy_id(first.events(10)[0].id()).0;
    let mut resumed = get_sse(&b.addr, &location, &[AUTH]).sse();
    resumed.set_timeout(Duration::from_secs(20));
    assert_eq!(seqs(&resumed.events(10), &token), tokens(1..=10));
    a.kill9();
    let killed = Instant::now();
    // B takes the lease once it lapses and ends the stream: its client
    // gets the end, not keep-alives forever.
    assert_eq!(resumed.rest(), Vec::<Event>::new());
    assert!(
        killed.elapsed() < Duration::from_secs(5),
        "ended {:?} after the kill",
        killed.elapsed()
    );
    let done = format!("{token}-10");
    let finished = get_sse(&b.addr, &location, &[AUTH, ("Last-Event-ID", &done)]);
    assert_eq!(finished.status, 204, "{finished:?}");
    let metrics = scrape(&b.metrics_addr());
    assert_eq!(
        metrics.get("tidemark_proxy_fleet_takeovers_total"),
        Some(&1.0)
    );
}

#[test]
fn while_redis_is_down_what_needs_it_gets_503_and_everything_works_once_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = RedisServer::start_persistent(dir.path());
    let upstream = Upstream::start();
    let a = fleet_proxy(&upstream, &redis, "down:");
    let b = fleet_proxy(&upstream, &redis, "down:");
    let (location, mut answer) = post(&a, "/chat?tokens=3");
    let token = proxy_id(answer.rest()[0].id()).0;
    redis.stop();
    // A stream B never saw cannot be found without Redis: a clear 503.
    let resume = get_sse(&b.addr, &location, &[AUTH]);
    assert_eq!(resume.status, 503, "{resume:?}");
    assert_eq!(resume.header("retry-after"), Some("1"));
    assert!(resume.text().contains("unreachable"));
    // Nor can a new GET stream agree on its token.
    let live = get_sse(&b.addr, "/live", &[]);
    assert_eq!(live.status, 503, "{live:?}");
    // A still serves what it has in memory.
    let local = get_sse(&a.addr, &location, &[AUTH]);
    assert_eq!(local.status, 200, "{local:?}");
    assert_eq!(seqs(&local.sse().rest(), &token), tokens(1..=3));
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    let resumed = loop {
        let resumed = get_sse(&b.addr, &location, &[AUTH]);
        if resumed.status != 503 {
            break resumed;
        }
        assert!(
            Instant::now() < deadline,
            "Redis is back, B still answers 503"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(resumed.status, 200, "{resumed:?}");
    assert_eq!(seqs(&resumed.sse().rest(), &token), tokens(1..=3));
    let mut live = get_sse(&b.addr, "/live", &[]).sse();
    upstream.wait_live_open(1);
    upstream.emit(1);
    assert!(live.next_event().is_some());
}

#[test]
fn a_get_stream_dropped_by_retention_is_opened_anew_with_a_new_token_never_the_old_one() {
    let redis = RedisServer::start();
    let upstream = Upstream::start();
    let url = redis.url();
    let extra = SHORT_LIVED;
    let prefix = "drop:";
    let a = instance(&upstream, &url, prefix, &extra);
    let b = instance(&upstream, &url, prefix, &extra);
    let mut first = get_sse(&a.addr, "/live", &[]).sse();
    upstream.wait_live_open(1);
    upstream.emit(2);
    let old = first.events(2);
    let old_token = proxy_id(old[0].id()).0;
    drop(first);
    let mut connection = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let meta = format!("drop:proxy:meta:{old_token}");
    wait_until("A to drop the stream from Redis", || {
        redis::cmd("EXISTS")
            .arg(&meta)
            .query::<i64>(&mut connection)
            .unwrap()
            == 0
    });
    let mut again = get_sse(&b.addr, "/live", &[]).sse();
    upstream.wait_live_open(1);
    upstream.emit(1);
    let new = again.next_event().unwrap();
    assert_ne!(
        proxy_id(new.id()).0,
        old_token,
        "a dropped stream's token is not reused"
    );
    // An id of the dropped stream is unknown now, not an event of the new one.
    let stale = format!("{old_token}-1");
    let mut resumed = get_sse(&b.addr, "/live", &[("Last-Event-ID", &stale)]).sse();
    let first = resumed.next_event().unwrap();
    assert_eq!(first.event.as_deref(), Some("tidemark-gap"), "{first:?}");
}

#[test]
fn an_instance_stopped_with_sigterm_hands_its_streams_over_at_once() {
    let redis = RedisServer::start();
    let upstream = Upstream::start();
    // A lease of 30 s: a takeover within seconds can only be a handover.
    let url = redis.url();
    let extra = ["--lease-ms", "30000"];
    let prefix = "term:";
    let mut a = instance(&upstream, &url, prefix, &extra);
    let b = instance(&upstream, &url, prefix, &extra);
    let mut on_a = get_sse(&a.addr, FEED, &[]).sse();
    let mut on_b = get_sse(&b.addr, FEED, &[]).sse();
    on_b.set_timeout(Duration::from_secs(20));
    upstream.release(5);
    assert_eq!(on_a.events(5).len(), 5);
    assert_eq!(on_b.events(5).len(), 5);
    let stopped = Instant::now();
    assert!(a.signal_and_wait("TERM").success());
    upstream.release(10);
    let rest = on_b.events(5);
    let data: Vec<&str> = rest.iter().map(|e| e.data.as_str()).collect();
    assert_eq!(data, ["6", "7", "8", "9", "10"]);
    assert!(
        stopped.elapsed() < Duration::from_secs(10),
        "handed over in {:?}, not after the 30 s lease",
        stopped.elapsed()
    );
}

#[test]
fn an_instance_that_let_a_stream_go_never_drops_it_while_another_writes_it() {
    let redis = RedisServer::start();
    let upstream = Upstream::start();
    let url = redis.url();
    let extra = SHORT_LIVED;
    let prefix = "handover:";
    let a = instance(&upstream, &url, prefix, &extra);
    let b = instance(&upstream, &url, prefix, &extra);
    let c = instance(&upstream, &url, prefix, &extra);
    let on_a = get_sse(&a.addr, FEED, &[]).sse();
    let mut on_b = get_sse(&b.addr, FEED, &[]).sse();
    on_b.set_timeout(Duration::from_secs(20));
    upstream.release(3);
    let first = on_b.events(3);
    let token = proxy_id(first[0].id()).0;
    // A's only client leaves: A lets the stream go, B takes it over.
    drop(on_a);
    let b_metrics = b.metrics_addr();
    wait_until("B to take the stream over", || {
        scrape(&b_metrics).get("tidemark_proxy_fleet_takeovers_total") == Some(&1.0)
    });
    // A's copy expires (--retain-secs 1): A must not drop the stream B
    // writes now.
    let a_metrics = a.metrics_addr();
    wait_until("A to forget its copy", || {
        scrape(&a_metrics).get("tidemark_proxy_streams{kind=\"get\"}") == Some(&0.0)
    });
    upstream.release(6);
    let rest = on_b.events(3);
    assert_eq!(
        rest.iter().map(|e| e.data.as_str()).collect::<Vec<_>>(),
        ["4", "5", "6"]
    );
    // Still in Redis, whole: a third instance resumes it from its start.
    let from_start = format!("{token}-0");
    let mut on_c = get_sse(&c.addr, FEED, &[("Last-Event-ID", &from_start)]).sse();
    let all = on_c.events(6);
    assert_eq!(
        all.iter().map(|e| e.data.as_str()).collect::<Vec<_>>(),
        ["1", "2", "3", "4", "5", "6"]
    );
}

/// A TCP relay to `target` that the test can cut (every connection closed,
/// new ones refused at once) and heal: a network partition between one
/// instance and Redis.
struct Partition {
    addr: String,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sockets: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Partition {
    fn start(target: String) -> Partition {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sockets = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c, s) = (cut.clone(), sockets.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                if c.load(Ordering::SeqCst) {
                    continue; // dropped: the connection is closed at once
                }
                let Ok(server) = std::net::TcpStream::connect(&target) else {
                    continue;
                };
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server.try_clone().unwrap(), client.try_clone().unwrap()),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
                s.lock().unwrap().extend([client, server]);
            }
        });
        Partition { addr, cut, sockets }
    }

    fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for socket in self.sockets.lock().unwrap().drain(..) {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
    }

    fn heal(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn a_writer_cut_off_from_redis_that_lost_its_lease_never_writes_its_backlog_into_the_new_writers_log()
 {
    let redis = RedisServer::start();
    let partition = Partition::start(
        redis
            .url()
            .trim_start_matches("redis://")
            .trim_end_matches('/')
            .to_owned(),
    );
    let upstream = Upstream::start();
    let start = |url: &str| instance(&upstream, url, "fence:", &[]);
    let a = start(&partition.url());
    let b = start(&redis.url());
    let c = start(&redis.url());
    // `/live` never replays: a new writer goes on from the live edge.
    let mut on_a = get_sse(&a.addr, "/live", &[]).sse();
    upstream.wait_live_open(1);
    let mut on_b = get_sse(&b.addr, "/live", &[]).sse();
    on_b.set_timeout(Duration::from_secs(20));
    let base = upstream.emit(10) - 10;
    assert_eq!(on_a.events(10).len(), 10);
    let token = proxy_id(on_b.events(10)[0].id()).0;

    partition.cut();
    // A keeps following and serving its client from memory, with a backlog
    // Redis never gets; its lease lapses and B takes the stream over from
    // the live edge.
    upstream.emit(10);
    assert_eq!(
        on_a.events(10).len(),
        10,
        "A's client keeps the live stream"
    );
    let b_metrics = b.metrics_addr();
    wait_until("B to take over", || {
        scrape(&b_metrics).get("tidemark_proxy_fleet_takeovers_total") == Some(&1.0)
    });
    upstream.wait_live_open(2); // A's follower and B's
    upstream.emit(3);
    assert_eq!(on_b.events(3).len(), 3);
    partition.heal();
    // A gets Redis back, finds the lease taken: it must write nothing of
    // that stream, and lets it go.
    upstream.wait_live_open(1);
    assert!(a.stderr_line("another instance writes").contains("/live"));
    upstream.emit(2);
    assert_eq!(on_b.events(2).len(), 2);
    drop(on_a);

    // The log in Redis, read whole on a third instance: the upstream's
    // events in order, none twice, none of A's backlog.
    let from_start = format!("{token}-0");
    let mut on_c = get_sse(&c.addr, "/live", &[("Last-Event-ID", &from_start)]).sse();
    let all = on_c.events(15);
    let data: Vec<u64> = all.iter().map(|e| e.data.parse().unwrap()).collect();
    let expected: Vec<u64> = (base + 1..=base + 10)
        .chain(base + 21..=base + 25)
        .collect();
    assert_eq!(data, expected, "the fleet's log");
}

#[test]
fn the_streams_of_an_instance_that_died_are_dropped_from_redis_by_the_others_after_retention() {
    let redis = RedisServer::start();
    let upstream = Upstream::start();
    let url = redis.url();
    let extra = ["--lease-ms", "1000", "--retain-secs", "1"];
    let prefix = "janitor:";
    let mut a = instance(&upstream, &url, prefix, &extra);
    let _b = instance(&upstream, &url, prefix, &extra);
    let (_, mut answer) = post(&a, "/chat?tokens=3");
    let token = proxy_id(answer.rest()[0].id()).0;
    let mut connection = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let meta = format!("janitor:proxy:meta:{token}");
    let log = format!("janitor:proxy:log:{token}");
    let exists = |connection: &mut redis::Connection| -> i64 {
        redis::cmd("EXISTS")
            .arg(&meta)
            .arg(&log)
            .query(connection)
            .unwrap()
    };
    wait_until("A to write the stream", || exists(&mut connection) == 2);
    a.kill9();
    // B never had the stream; once it is past retention, B drops it.
    wait_until("B to drop the dead instance's stream", || {
        exists(&mut connection) == 0
    });
}
