//! Failover of a fleet of `tidemark proxy` instances on one Redis log
//! (issue 15): whole processes on loopback.
//!
//! Two instances share a Redis (one this bench starts) before
//! `tidemark serve --interval-ms 10` (which replays after `Last-Event-ID`).
//! A client on instance A opens the stream, so A follows the upstream; a
//! client on instance B reads the same stream from B's mirror. Then A is
//! killed (`kill -9`), and the bench measures, at B's client, the time from
//! the kill to the first event the new writer delivered (B takes the lease
//! once it lapses, reads what A logged, and follows on from the upstream id
//! in the log), and checks that B's client got every event once, in order.
//! Target: at most the lease's time to live plus one second.
//!
//! `cargo bench -p tidemark --bench fleet` runs 5 rounds for leases of 1 s,
//! 3 s and 10 s (the default) and prints a markdown table with the medians;
//! `TIDEMARK_FLEET_ROUNDS` and `TIDEMARK_FLEET_LEASES_MS` (comma separated)
//! override them. In test mode (`cargo test --benches`) it runs one round
//! with a 300 ms lease.

#[path = "../tests/support/http.rs"]
mod http;
#[path = "../tests/support/proxy.rs"]
mod proxy;
#[path = "../tests/support/redis_server.rs"]
mod redis_server;
#[path = "../tests/support/serve.rs"]
mod serve;

use http::{Item, get_sse, proxy_id};
use proxy::Proxy;
use redis_server::RedisServer;
use serve::Server;
use std::time::{Duration, Instant};

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let env = |name: &str| std::env::var(format!("TIDEMARK_FLEET_{name}")).ok();
    let rounds: usize = env("ROUNDS")
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { 5 } else { 1 });
    let leases: Vec<u64> = env("LEASES_MS")
        .unwrap_or_else(|| (if full { "1000,3000,10000" } else { "300" }).to_owned())
        .split(',')
        .map(|v| v.trim().parse().expect("milliseconds"))
        .collect();
    println!("\nfleet failover: kill -9 of the following instance, {rounds} rounds per lease");
    println!(
        "\n| lease | to the first event from the new writer (median) | runs | target (lease + 1 s) |"
    );
    println!("|---|---|---|---|");
    for lease in leases {
        let mut times: Vec<Duration> = (0..rounds).map(|_| failover(lease)).collect();
        times.sort();
        let median = times[times.len() / 2];
        let target = Duration::from_millis(lease) + Duration::from_secs(1);
        let runs: Vec<String> = times
            .iter()
            .map(|t| format!("{:.0} ms", t.as_secs_f64() * 1e3))
            .collect();
        println!(
            "| {:.1} s | **{:.0} ms** | {} | {} |",
            lease as f64 / 1e3,
            median.as_secs_f64() * 1e3,
            runs.join(", "),
            if median <= target { "met" } else { "missed" }
        );
    }
}

/// One failover with leases of `lease_ms`: the time from the kill to B's
/// client's first event written by B.
fn failover(lease_ms: u64) -> Duration {
    let redis = RedisServer::start();
    let upstream = Server::start(&["--interval-ms", "10"]);
    let lease = lease_ms.to_string();
    let url = redis.url();
    let args = [
        "--log",
        url.as_str(),
        "--lease-ms",
        lease.as_str(),
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    let base = format!("http://{}", upstream.addr);
    let mut a = Proxy::start(&base, &args);
    let b = Proxy::start(&base, &args);
    let path = "/events";
    let mut on_a = get_sse(&a.addr, path, &[]).sse();
    let opened = on_a.next_event().expect("A's first event");
    let token = proxy_id(opened.id()).0;
    let mut on_b = get_sse(&b.addr, path, &[]).sse();
    on_b.set_timeout(Duration::from_secs(60));
    let mut last = next_seq(&mut on_b, &token);
    // Let B mirror a while, then kill the writer between two events.
    for _ in 0..20 {
        last = expect_next(&mut on_b, &token, last);
    }
    a.kill9();
    let killed = Instant::now();
    // Events A logged before it died still reach B from Redis; the new
    // writer's are the first B appended itself (its events_in counter:
    // a mirror's appends do not count).
    let metrics = b.metrics_addr();
    loop {
        last = expect_next(&mut on_b, &token, last);
        let appended = proxy::scrape(&metrics)
            .get("tidemark_proxy_events_in_total")
            .copied()
            .unwrap_or(0.0);
        if appended > 0.0 {
            let took = killed.elapsed();
            // A few more, to see it goes on in order.
            for _ in 0..5 {
                last = expect_next(&mut on_b, &token, last);
            }
            return took;
        }
        assert!(killed.elapsed() < Duration::from_secs(60), "no takeover");
    }
}

fn next_seq(sse: &mut http::Sse, token: &str) -> u64 {
    loop {
        match sse.next_item() {
            Some(Item::Event(event)) => {
                let (t, seq) = proxy_id(event.id());
                assert_eq!(t, token, "one stream in the fleet");
                return seq;
            }
            Some(_) => {}
            None => panic!("the stream ended"),
        }
    }
}

/// The next event's sequence number, which must follow `last`.
fn expect_next(sse: &mut http::Sse, token: &str, last: u64) -> u64 {
    let seq = next_seq(sse, token);
    assert_eq!(seq, last + 1, "every event once, in order");
    seq
}
