//! Whole-process throughput of `tidemark follow` against Node's `eventsource`
//! (issue 13), on the same servers in the same run, alternating:
//!
//! - `live`: `tidemark serve --interval-ms 0 --count N`, every client from
//!   the start of the stream.
//! - `bulk`: N MCP-progress events (~130 bytes each) written at once by a
//!   plain server (a thread here: one `write_all` of the whole body, then
//!   close); `curl -sN` reading the same body is the raw limit.
//!
//! - `serve`: `tidemark serve --interval-ms 0` to one raw HTTP reader.
//!
//! `TIDEMARK_THROUGHPUT_BASELINE=PATH` adds another `tidemark` binary (an
//! older build) as a contender in every case, against the same servers.
//! Every contender writes to a pipe that this program drains and counts.
//! CPU time and peak RSS come from `/usr/bin/time`. `cargo bench` runs the
//! full sizes (200k live, 1M bulk, 3 rounds; `TIDEMARK_THROUGHPUT_LIVE`,
//! `_BULK`, `_ROUNDS` override them) and prints medians and ratios;
//! `TIDEMARK_THROUGHPUT_STRACE=1` adds one `strace -c -f` run of `follow` per
//! case with its syscalls per event. In test mode (`cargo test --benches`) it
//! runs small sizes once and asserts only that every contender got every
//! event; the Node peer is skipped there when Node or the package is
//! missing.

mod support {
    pub mod http;
    pub mod strace;
}

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TIDEMARK: &str = env!("CARGO_BIN_EXE_tidemark");

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let size = |name: &str, bench: u64, test: u64| {
        std::env::var(format!("TIDEMARK_THROUGHPUT_{name}"))
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(if full { bench } else { test })
    };
    let live = size("LIVE", 200_000, 2_000);
    let bulk = size("BULK", 1_000_000, 5_000);
    let rounds = size("ROUNDS", 3, 1) as usize;
    let strace = std::env::var_os("TIDEMARK_THROUGHPUT_STRACE").is_some();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let node = node_peer(&root);
    if node.is_none() {
        assert!(
            !full,
            "the bench needs node and the npm package eventsource: run npm install"
        );
        println!("node or the npm package eventsource is missing: the Node peer is skipped");
    }

    let baseline = std::env::var_os("TIDEMARK_THROUGHPUT_BASELINE").map(PathBuf::from);

    let serve = size("SERVE", 1_000_000, 20_000);
    let mut servers = vec![("tidemark serve", PathBuf::from(TIDEMARK))];
    servers.extend(baseline.iter().map(|b| ("baseline serve", b.clone())));
    println!("\nserve: {serve} events to one raw reader, {rounds} rounds");
    println!("| server | events/s | runs (events/s) |");
    println!("|---|---|---|");
    let mut serve_rates = Vec::new();
    for (name, binary) in &servers {
        let server = LiveServer::start(binary, serve);
        let each: Vec<f64> = (0..rounds)
            .map(|_| serve as f64 / read_raw(server.addr, serve).as_secs_f64())
            .collect();
        let shown: Vec<String> = each.iter().map(|r| format!("{r:.0}")).collect();
        let rate = median(each);
        println!("| {name} | {rate:.0} | {} |", shown.join(", "));
        serve_rates.push(rate);
    }
    if let [ours, base] = serve_rates[..] {
        println!("tidemark serve / baseline serve: {:.2}x", ours / base);
    }

    let server = LiveServer::start(Path::new(TIDEMARK), live);
    let url = format!("http://{}/events", server.addr);
    let mut contenders = vec![Contender::Follow(PathBuf::from(TIDEMARK))];
    contenders.extend(baseline.iter().cloned().map(Contender::Baseline));
    contenders.extend(node.iter().cloned().map(Contender::Node));
    let live_runs = measure(&contenders, &url, live, rounds, None);
    report("live", live, &live_runs, None);
    if strace {
        for contender in contenders.iter().filter(|c| c.follow_binary().is_some()) {
            strace_follow(contender, &url, live);
        }
    }
    drop(server);
    if let Some(baseline) = &baseline {
        // The same clients against the older server (one frame per event).
        let server = LiveServer::start(baseline, live);
        let url = format!("http://{}/events", server.addr);
        let runs = measure(&contenders, &url, live, rounds, None);
        report("live, baseline serve", live, &runs, None);
        if strace {
            for contender in contenders.iter().filter(|c| c.follow_binary().is_some()) {
                strace_follow(contender, &url, live);
            }
        }
    }

    let body = Arc::new(mcp_body(bulk));
    let addr = serve_bulk(body.clone());
    let url = format!("http://{addr}/events");
    contenders.push(Contender::Curl);
    let bulk_runs = measure(&contenders, &url, bulk, rounds, Some(body.len()));
    report("bulk", bulk, &bulk_runs, Some(body.len()));
    if strace {
        for contender in contenders.iter().filter(|c| c.follow_binary().is_some()) {
            strace_follow(contender, &url, bulk);
        }
    }
}

#[derive(Clone)]
enum Contender {
    /// This tree's `tidemark`.
    Follow(PathBuf),
    /// Another build of `tidemark` (`TIDEMARK_THROUGHPUT_BASELINE`), to
    /// compare with in the same run.
    Baseline(PathBuf),
    /// The peer script.
    Node(PathBuf),
    Curl,
}

impl Contender {
    fn name(&self) -> &'static str {
        match self {
            Contender::Follow(_) => "tidemark follow",
            Contender::Baseline(_) => "baseline follow",
            Contender::Node(_) => "node eventsource",
            Contender::Curl => "curl -sN",
        }
    }

    fn follow_binary(&self) -> Option<&Path> {
        match self {
            Contender::Follow(binary) | Contender::Baseline(binary) => Some(binary),
            _ => None,
        }
    }

    /// The command reading `count` events of `url`, and the state directory
    /// it must not outlive.
    fn command(&self, url: &str, count: u64) -> (Vec<String>, Option<tempfile::TempDir>) {
        match self {
            Contender::Follow(binary) | Contender::Baseline(binary) => {
                let state = tempfile::tempdir().expect("a state directory");
                let args = vec![
                    binary.display().to_string(),
                    "follow".into(),
                    url.into(),
                    "--state".into(),
                    state.path().display().to_string(),
                    "--max-events".into(),
                    count.to_string(),
                ];
                (args, Some(state))
            }
            Contender::Node(script) => (
                vec![
                    "node".into(),
                    script.display().to_string(),
                    url.into(),
                    count.to_string(),
                ],
                None,
            ),
            Contender::Curl => (vec!["curl".into(), "-sN".into(), url.into()], None),
        }
    }
}

/// One run of one contender.
#[derive(Clone, Copy, Debug)]
struct Run {
    wall: Duration,
    user: f64,
    system: f64,
    /// Peak resident set, KiB.
    rss_kib: u64,
    lines: u64,
    bytes: u64,
}

/// Runs every contender `rounds` times, alternating, and checks what each
/// received.
fn measure(
    contenders: &[Contender],
    url: &str,
    count: u64,
    rounds: usize,
    body_len: Option<usize>,
) -> Vec<(Contender, Vec<Run>)> {
    let mut runs: Vec<_> = contenders.iter().map(|c| (c.clone(), Vec::new())).collect();
    for _ in 0..rounds {
        for (contender, done) in &mut runs {
            let (args, _state) = contender.command(url, count);
            let run = timed(&args);
            match contender {
                Contender::Curl => assert_eq!(
                    Some(run.bytes as usize),
                    body_len,
                    "curl read the whole body"
                ),
                _ => assert_eq!(run.lines, count, "{} printed every event", contender.name()),
            }
            done.push(run);
        }
    }
    runs
}

/// Runs `args` under `/usr/bin/time`, draining and counting its stdout.
fn timed(args: &[String]) -> Run {
    let times = tempfile::NamedTempFile::new().expect("a temporary file");
    let start = Instant::now();
    let mut child = Command::new("/usr/bin/time")
        .arg("-f")
        .arg("%U %S %M")
        .arg("-o")
        .arg(times.path())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("/usr/bin/time runs");
    let (lines, bytes) = drain(child.stdout.take().expect("piped"));
    let status = child.wait().expect("the contender exits");
    let wall = start.elapsed();
    assert!(status.success(), "{args:?} failed: {status}");
    let times = std::fs::read_to_string(times.path()).expect("time's report");
    let fields: Vec<&str> = times
        .lines()
        .last()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let [user, system, rss] = fields[..] else {
        panic!("unexpected /usr/bin/time output {times:?}")
    };
    Run {
        wall,
        user: user.parse().expect("seconds"),
        system: system.parse().expect("seconds"),
        rss_kib: rss.parse().expect("KiB"),
        lines,
        bytes,
    }
}

/// Reads `out` to its end: lines and bytes.
fn drain(mut out: impl Read) -> (u64, u64) {
    let mut buffer = vec![0; 1 << 16];
    let (mut lines, mut bytes) = (0u64, 0u64);
    loop {
        match out.read(&mut buffer) {
            Ok(0) => return (lines, bytes),
            Ok(n) => {
                bytes += n as u64;
                lines += buffer[..n].iter().filter(|&&b| b == b'\n').count() as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("reading a contender's output: {e}"),
        }
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn report(case: &str, count: u64, runs: &[(Contender, Vec<Run>)], body_len: Option<usize>) {
    println!("\n{case}: {count} events, {} rounds", runs[0].1.len());
    println!(
        "| contender | events/s | MB/s in | user µs/event | system µs/event | peak RSS MB | runs (events/s) |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut rates = Vec::new();
    for (contender, done) in runs {
        let rate = median(
            done.iter()
                .map(|r| count as f64 / r.wall.as_secs_f64())
                .collect(),
        );
        let mb = body_len.map_or(String::from("-"), |len| {
            format!("{:.1}", rate * len as f64 / count as f64 / 1e6)
        });
        let per = |f: fn(&Run) -> f64| median(done.iter().map(f).collect()) * 1e6 / count as f64;
        let rss = median(done.iter().map(|r| r.rss_kib as f64).collect()) / 1024.0;
        let each: Vec<String> = done
            .iter()
            .map(|r| format!("{:.0}", count as f64 / r.wall.as_secs_f64()))
            .collect();
        println!(
            "| {} | {rate:.0} | {mb} | {:.2} | {:.2} | {rss:.1} | {} |",
            contender.name(),
            per(|r| r.user),
            per(|r| r.system),
            each.join(", ")
        );
        rates.push((contender.name(), rate));
    }
    let follow = rates[0].1;
    for (name, rate) in &rates[1..] {
        println!("follow / {name}: {:.2}x", follow / rate);
    }
}

/// `strace -c -f` of one `follow` run: syscalls per event.
fn strace_follow(contender: &Contender, url: &str, count: u64) {
    let (args, _state) = contender.command(url, count);
    let summary = tempfile::NamedTempFile::new().expect("a temporary file");
    let mut child = support::strace::command(&args[0], Some(summary.path()))
        .args(&args[1..])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("strace runs");
    let (lines, _) = drain(child.stdout.take().expect("piped"));
    assert!(child.wait().expect("strace exits").success());
    assert_eq!(lines, count);
    let text = std::fs::read_to_string(summary.path()).expect("strace's summary");
    println!(
        "strace -c -f of {}, per event ({count} events):",
        contender.name()
    );
    for support::strace::Row {
        name,
        calls,
        errors,
    } in support::strace::rows(&text)
    {
        println!(
            "  {name:<16} {:>10.3} calls/event  ({calls} calls, {errors} errors)",
            calls / count as f64
        );
    }
}

/// The Node peer script, if Node and the package are installed.
fn node_peer(root: &Path) -> Option<PathBuf> {
    let installed = root.join("node_modules/eventsource/package.json").exists();
    let node = Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    (installed && node).then(|| root.join("host-native/benches/eventsource_peer.mjs"))
}

/// `tidemark serve --interval-ms 0 --count N` on a free port.
struct LiveServer {
    child: Child,
    addr: SocketAddr,
}

impl LiveServer {
    fn start(binary: &Path, count: u64) -> Self {
        let mut child = Command::new(binary)
            .args(["serve", "--listen", "127.0.0.1:0", "--interval-ms", "0"])
            .arg("--count")
            .arg(count.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("tidemark serve starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("the bound address");
        let addr = line.trim().parse().expect("an address");
        LiveServer { child, addr }
    }
}

impl Drop for LiveServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads `/events` of `addr` over raw HTTP/1.1 until `count` events are in
/// (every event ends with an empty line; the `retry:` hint does not).
fn read_raw(addr: SocketAddr, count: u64) -> Duration {
    let start = Instant::now();
    let mut stream = std::net::TcpStream::connect(addr).expect("the server accepts");
    stream
        .write_all(b"GET /events HTTP/1.1\r\nhost: bench\r\naccept: text/event-stream\r\n\r\n")
        .expect("the request goes out");
    let mut buffer = vec![0; 1 << 16];
    let (mut ends, mut last) = (0u64, 0u8);
    while ends < count {
        let n = stream.read(&mut buffer).expect("the stream goes on");
        assert!(n > 0, "the server closed the stream after {ends} events");
        for &byte in &buffer[..n] {
            if byte == b'\n' && last == b'\n' {
                ends += 1;
            }
            last = byte;
        }
    }
    start.elapsed()
}

/// `count` MCP progress notifications with ids `1..=count`, as one SSE body.
fn mcp_body(count: u64) -> Vec<u8> {
    let mut body = Vec::with_capacity(count as usize * 140);
    for id in 1..=count {
        writeln!(
            body,
            "id: {id}\ndata: {{\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\
             \"params\":{{\"progressToken\":\"call-1\",\"progress\":{id},\"total\":{count},\
             \"message\":\"working\"}}}}\n"
        )
        .expect("writing to a Vec");
    }
    body
}

/// A plain HTTP server on a free port answering every request with `body`
/// in one write, then closing the connection.
fn serve_bulk(body: Arc<Vec<u8>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
    let addr = listener.local_addr().expect("bound");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let body = body.clone();
            std::thread::spawn(move || {
                if support::http::read_head(&mut stream).is_none() {
                    return;
                }
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                      cache-control: no-cache\r\nconnection: close\r\n\r\n",
                );
                let _ = stream.write_all(&body);
            });
        }
    });
    addr
}
