//! `tidemark follow --metrics-listen`: the real binary against a real
//! `tidemark serve`, scraped over real HTTP on loopback.

mod support {
    pub mod serve;
}

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::Duration;
use support::serve::Server;

const BIN: &str = env!("CARGO_BIN_EXE_tidemark");

/// The lines of a pipe, read on a thread so that the child never blocks on
/// a full pipe.
fn lines_of(pipe: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn next(lines: &Receiver<String>, what: &str) -> String {
    lines
        .recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("no line: waiting for {what}"))
}

/// `GET path` over HTTP/1.0 with `accept`; the status line, the headers
/// and the body.
fn get(addr: &str, path: &str, accept: &str) -> (String, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nAccept: {accept}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.to_owned(), body.to_owned())
}

/// The value of the sample named exactly `name` (no labels).
fn sample(body: &str, name: &str) -> u64 {
    body.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in\n{body}"))
        .parse()
        .unwrap()
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn follow_serves_its_counters_and_they_match_what_it_printed() {
    // Drops every 13 events and replays 3 before Last-Event-ID: reconnects
    // and duplicates to count. After 60 it stays open with keep-alives.
    let server = Server::start(&[
        "--count",
        "60",
        "--interval-ms",
        "1",
        "--drop-every",
        "13",
        "--rewind",
        "3",
        "--retry-ms",
        "5",
    ]);
    let state = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args([
            "follow",
            &server.events_url(),
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .arg("--state")
        .arg(state.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = lines_of(child.stdout.take().unwrap());
    let stderr = lines_of(child.stderr.take().unwrap());
    let child = Killed(child);
    let url = loop {
        let line = next(&stderr, "the metrics address");
        if let Some(url) = line.strip_prefix("tidemark: metrics on ") {
            break url.to_owned();
        }
    };
    let addr = url
        .strip_prefix("http://")
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("not a metrics URL: {url}"));
    assert!(
        addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
        "{addr}"
    );

    // stdout is the events and nothing else.
    let ids: Vec<u64> = (0..60)
        .map(|_| {
            let line = next(&stdout, "an event");
            let value: serde_json::Value = serde_json::from_str(&line).unwrap();
            value["id"].as_str().unwrap().parse().unwrap()
        })
        .collect();
    assert_eq!(ids, (1..=60).collect::<Vec<_>>());

    // The connection after the last drop is open once every event is
    // printed; the duplicates of that reconnect came before them.
    let (head, body) = get(addr, "/metrics", "text/plain");
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
        "{head}"
    );
    assert_eq!(sample(&body, "tidemark_follow_events_total"), 60, "{body}");
    // Each connection sends 13 events, replays included: 1-13, 11-23,
    // 21-33, 31-43, 41-53, then 51-60. Five reconnects, 3 replays each.
    assert_eq!(
        sample(&body, "tidemark_follow_reconnects_total"),
        5,
        "{body}"
    );
    assert_eq!(
        sample(&body, "tidemark_follow_duplicates_total"),
        15,
        "{body}"
    );
    assert_eq!(sample(&body, "tidemark_follow_connected"), 1, "{body}");
    assert_eq!(
        sample(&body, "tidemark_follow_store_failures_total"),
        0,
        "{body}"
    );
    sample(&body, "tidemark_follow_cursor_writes_total");
    for name in [
        "tidemark_follow_events_total",
        "tidemark_follow_duplicates_total",
        "tidemark_follow_reconnects_total",
        "tidemark_follow_cursor_writes_total",
        "tidemark_follow_store_failures_total",
    ] {
        assert!(
            body.contains(&format!("# TYPE {name} counter\n")),
            "{name}: {body}"
        );
    }
    assert!(body.contains("# TYPE tidemark_follow_connected gauge\n"));

    let (head, body) = get(addr, "/metrics", "application/openmetrics-text");
    assert!(head.contains("application/openmetrics-text"), "{head}");
    assert!(body.ends_with("# EOF\n"), "{body}");
    let (head, _) = get(addr, "/", "*/*");
    assert!(head.starts_with("HTTP/1.0 404"), "{head}");

    // The stream's server goes away: the gauge says so.
    drop(server);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, body) = get(addr, "/metrics", "text/plain");
        if sample(&body, "tidemark_follow_connected") == 0 {
            assert!(sample(&body, "tidemark_follow_reconnects_total") >= 6);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{body}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(stdout.try_recv().is_err(), "nothing but events on stdout");
    drop(child);
}

#[test]
fn a_metrics_address_in_use_is_a_failure_with_the_reason() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let state = tempfile::tempdir().unwrap();
    let output = Command::new(BIN)
        .args([
            "follow",
            "http://127.0.0.1:1/events",
            "--metrics-listen",
            &addr,
        ])
        .arg("--state")
        .arg(state.path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("tidemark: metrics: "), "{stderr}");
    assert!(output.stdout.is_empty());
}
