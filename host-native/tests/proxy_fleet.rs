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
use support::proxy::{Proxy, scrape};
use support::redis_server::RedisServer;
use support::upstream::{Upstream, wait_until};

/// The upstream feed: replays after `Last-Event-ID`, never drops by itself.
const FEED: &str = "/replay?drop=1000000&count=100000";

fn fleet_proxy(upstream: &Upstream, redis: &RedisServer, prefix: &str) -> Proxy {
    Proxy::start(
        &upstream.url(),
        &[
            "--log",
            &redis.url(),
            "--redis-prefix",
            prefix,
            "--lease-ms",
            "1000",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    )
}

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
