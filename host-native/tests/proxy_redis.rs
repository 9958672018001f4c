//! `tidemark proxy --log redis://...` end to end: the binary in front of the
//! test upstream, driven over raw HTTP on loopback, its log in a real
//! `redis-server` (the test command's, under a key prefix of each test's
//! own, or, for the tests that stop Redis, one of their own).

mod support {
    pub mod http;
    pub mod proxy;
    pub mod redis_server;
    pub mod upstream;
}

use std::process::Command;
use std::time::{Duration, Instant};
use support::http::proxy_id;
use support::proxy::{Proxy, numbered, open, scrape, seqs, until_cut};
use support::redis_server::{RedisServer, shared, unique_prefix};
use support::upstream::{Upstream, kill_9_mid_stream_and_resume, wait_until};

/// How many events Redis holds for `token` under `prefix`.
fn stored(url: &str, prefix: &str, token: &str) -> u64 {
    let mut redis = redis::Client::open(url).unwrap().get_connection().unwrap();
    redis::cmd("XLEN")
        .arg(format!("{prefix}proxy:log:{token}"))
        .query(&mut redis)
        .unwrap()
}

fn metric(addr: &str, name: &str) -> f64 {
    scrape(addr)
        .get(name)
        .copied()
        .unwrap_or_else(|| panic!("no metric {name}"))
}

#[test]
fn kill_9_with_a_redis_log_loses_nothing_a_client_saw() {
    let (url, _server) = shared();
    let prefix = unique_prefix("proxy-kill");
    let upstream = Upstream::start();
    let args = ["--log", &url, "--redis-prefix", &prefix];
    let proxy = kill_9_mid_stream_and_resume(&upstream, &args, |token, n| {
        assert_eq!(stored(&url, &prefix, token), n, "written before shown");
    });
    let line = proxy.stderr_line("tidemark: proxy on");
    assert!(line.ends_with(&format!("(log: {url})")), "{line}");
}

#[test]
fn a_redis_outage_keeps_live_clients_going_and_the_log_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = RedisServer::start_persistent(dir.path());
    let url = redis.url();
    let prefix = unique_prefix("proxy-outage");
    let upstream = Upstream::start();
    let args = [
        "--log",
        &url,
        "--redis-prefix",
        &prefix,
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    let mut proxy = Proxy::start(&upstream.url(), &args);
    let metrics = proxy.metrics_addr();
    let mut client = open(&proxy, "/live", &[]);
    upstream.wait_live_requests(1);
    upstream.emit(10);
    let token = proxy_id(client.events(10)[0].id()).0;
    assert_eq!(metric(&metrics, "tidemark_proxy_log_up"), 1.0);

    redis.stop();
    upstream.emit(10);
    // The live client keeps the stream, served from memory.
    assert_eq!(seqs(&client.events(10), &token), numbered(11..=20));
    let line = proxy.stderr_line("cannot write the log");
    assert!(line.contains("serving clients from memory"), "{line}");
    assert!(line.contains(&url), "{line}");
    assert_eq!(metric(&metrics, "tidemark_proxy_log_up"), 0.0);
    assert!(metric(&metrics, "tidemark_proxy_log_write_failures_total") >= 1.0);
    // So does a client resuming on this proxy meanwhile.
    let from = format!("{token}-5");
    let mut resumed = open(&proxy, "/live", &[("Last-Event-ID", &from)]);
    assert_eq!(seqs(&resumed.events(15), &token), numbered(6..=20));

    redis.restart(); // with its data back
    proxy.stderr_line("the log is writable again");
    wait_until("the log to catch up", || {
        stored(&url, &prefix, &token) == 20
    });
    assert_eq!(metric(&metrics, "tidemark_proxy_log_up"), 1.0);
    let outages = proxy
        .stderr()
        .iter()
        .filter(|l| l.contains("cannot write the log"))
        .count();
    assert_eq!(outages, 1, "said once, not per retry");
    upstream.emit(10);
    assert_eq!(seqs(&client.events(10), &token), numbered(21..=30));
    assert_eq!(seqs(&resumed.events(10), &token), numbered(21..=30));

    // Nothing was lost: a restarted proxy has all of it from Redis.
    proxy.kill9();
    until_cut(&mut client);
    let proxy = Proxy::start(&upstream.url(), &args);
    let first = format!("{token}-1");
    let mut early = open(&proxy, "/live", &[("Last-Event-ID", &first)]);
    assert_eq!(seqs(&early.events(29), &token), numbered(2..=30));
}

#[test]
fn a_redis_that_hangs_does_not_hold_up_live_clients() {
    let redis = RedisServer::start();
    let prefix = unique_prefix("proxy-hang");
    let upstream = Upstream::start();
    let args = ["--log", &redis.url(), "--redis-prefix", &prefix];
    let proxy = Proxy::start(&upstream.url(), &args);
    let mut client = open(&proxy, "/live", &[]);
    upstream.wait_live_requests(1);
    upstream.emit(3);
    let token = proxy_id(client.events(3)[0].id()).0;

    redis.pause(true);
    upstream.emit(3);
    // The write waits out its timeouts (5 s each) before the outage shows.
    proxy.stderr_line("cannot write the log");
    assert_eq!(seqs(&client.events(3), &token), numbered(4..=6));
    // The writer's retries hang as long, but new events reach clients at
    // once, not after the next retry.
    let emitted = Instant::now();
    upstream.emit(3);
    assert_eq!(seqs(&client.events(3), &token), numbered(7..=9));
    assert!(
        emitted.elapsed() < Duration::from_secs(4),
        "{:?}",
        emitted.elapsed()
    );

    redis.pause(false);
    proxy.stderr_line("the log is writable again");
    wait_until("the log to catch up", || {
        stored(&redis.url(), &prefix, &token) == 9
    });
}

#[test]
fn a_redis_that_is_down_at_start_fails_it_and_no_password_shows() {
    let output = Command::new(env!("CARGO_BIN_EXE_tidemark"))
        .args(["proxy", "--upstream", "http://127.0.0.1:1", "--listen"])
        .args(["127.0.0.1:0", "--log", "redis://:hunter2@127.0.0.1:1/"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("hunter2"), "{stderr}");
    assert!(stderr.contains("redis://:***@127.0.0.1:1/"), "{stderr}");
}

#[test]
fn sigterm_while_redis_is_down_gives_up_on_the_backlog_and_exits() {
    let mut redis = RedisServer::start();
    let prefix = unique_prefix("proxy-shutdown");
    let upstream = Upstream::start();
    let args = ["--log", &redis.url(), "--redis-prefix", &prefix];
    let mut proxy = Proxy::start(&upstream.url(), &args);
    let mut client = open(&proxy, "/live", &[]);
    upstream.wait_live_requests(1);
    upstream.emit(3);
    client.events(3);
    redis.stop();
    upstream.emit(3);
    client.events(3);
    proxy.stderr_line("cannot write the log");
    let status = proxy.signal_and_wait("TERM");
    assert!(status.success(), "{status:?}");
    let line = proxy.stderr_line("stopping with");
    assert!(line.contains("changes not written to the log"), "{line}");
}

#[test]
fn rediss_logs_over_tls_to_a_server_whose_certificate_is_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let redis = RedisServer::start_tls(&cert, &key);
    let tls_url = redis.tls_url().unwrap();
    let prefix = unique_prefix("proxy-tls");
    let upstream = Upstream::start();
    let args = ["--log", &tls_url, "--redis-prefix", &prefix];
    // The system's roots, and the test's certificate (SSL_CERT_FILE).
    let trust = [("SSL_CERT_FILE", cert.to_str().unwrap())];
    let proxy = Proxy::start_with_env(&upstream.url(), &args, &trust);
    let mut client = open(&proxy, "/live", &[]);
    upstream.wait_live_requests(1);
    upstream.emit(5);
    let token = proxy_id(client.events(5)[0].id()).0;
    // Written over TLS: the plain port of the same server has them.
    assert_eq!(stored(&redis.url(), &prefix, &token), 5);

    // Not trusted (the roots are another certificate): the proxy does not
    // start, and says why.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(dir.path().join("other.pem"), other.cert.pem()).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_tidemark"))
        .args([
            "proxy",
            "--upstream",
            &upstream.url(),
            "--listen",
            "127.0.0.1:0",
        ])
        .args(args)
        .env("SSL_CERT_FILE", dir.path().join("other.pem"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("certificate"), "{stderr}");
}
