//! `tidemark proxy` against nginx and a direct connection (issue 14), whole
//! processes on loopback, in the same run:
//!
//! - `one stream`: one client reads one stream of
//!   `tidemark serve --interval-ms 0 --count N` directly, through nginx
//!   (Debian's, `proxy_buffering off`), through `tidemark proxy` (memory log)
//!   through `tidemark proxy --log DIR` (file log) and through
//!   `tidemark proxy --log redis://...` (Redis Streams, on a redis-server
//!   of the bench's own), alternating, several rounds. Events/s at the client, and CPU per event (utime + stime from
//!   `/proc/PID/stat`) of the proxy process, of nginx's worker and of the
//!   upstream. Every round opens a new stream (its own query string), so
//!   through the proxy it is a fresh logged GET stream read from its first
//!   event. The client is the same raw HTTP/1.1 + SSE reader for all.
//! - `fan-out`: one upstream stream to many clients (10,000) through the
//!   proxy: delivered events/s, p50/p99 delay from the upstream's write to the
//!   client's read, and the proxy's memory per idle client (VmRSS with all
//!   clients connected and no events flowing, minus VmRSS with one client,
//!   divided by the rest). The upstream is a small server in this program
//!   whose event data is its write time in microseconds (`SystemTime`), so
//!   delay = read time - data. nginx the same way, for context: it does not
//!   share a stream, each client is its own upstream connection.
//! - `resume`: a client that read the first event of a stream and left
//!   comes back with its `Last-Event-ID` 10,000 events behind: the time to
//!   the last event and the catch-up rate, through the proxy (memory and file
//!   log), against `tidemark serve` replaying after `Last-Event-ID` itself.
//!
//! - `redis`: one stream of 10,000 events/s (an upstream in this program,
//!   one event per write every 100 µs) through `tidemark proxy --log
//!   redis://...`: Redis commands per event (`INFO commandstats` before and
//!   after) and the proxy's log writes (round trips) per event.
//!
//! `cargo bench -p tidemark --bench proxy` runs the full sizes and prints
//! markdown tables with medians and ratios; environment variables
//! `TIDEMARK_PROXY_EVENTS`, `_ROUNDS`, `_CLIENTS`, `_FANOUT_SECS`,
//! `_INTERVALS` (milliseconds between upstream events, comma separated),
//! `_BEHIND` (comma separated) override the sizes; `TIDEMARK_PROXY_STRACE=1`
//! adds one `strace -c -f` run of the proxy and of nginx with syscalls per
//! event; `TIDEMARK_PROXY_NGINX_FANOUT=0` skips nginx's fan-out;
//! `TIDEMARK_PROXY_ONLY=one,fan,resume,redis` picks parts;
//! `TIDEMARK_PROXY_REDIS_SECS` sets how long the `redis` part reads. In test mode
//! (`cargo test --benches`) everything runs once at small sizes and only
//! what each client received is asserted, the Redis cases against the test
//! command's server (`TIDEMARK_TEST_REDIS`) if there is one. nginx is
//! skipped with a message when it is not installed, the Redis cases when
//! redis-server is not, and the proxy cases when this `tidemark` has no
//! `proxy` command.

mod support {
    pub mod http;
    #[path = "../../tests/support/redis_server.rs"]
    pub mod redis_server;
    pub mod strace;
}

use smol::io::{AsyncReadExt, AsyncWriteExt};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const TIDEMARK: &str = env!("CARGO_BIN_EXE_tidemark");

/// Linux reports process CPU time in clock ticks of 1/100 s (`USER_HZ`).
const TICKS_PER_SECOND: f64 = 100.0;

struct Sizes {
    full: bool,
    events: u64,
    rounds: usize,
    clients: usize,
    fanout_secs: u64,
    intervals_ms: Vec<u64>,
    behind: Vec<u64>,
    strace: bool,
    nginx_fanout: bool,
    /// `tidemark proxy` has `--log DIR`.
    file_log: bool,
    /// The Redis for `--log redis://`, if this `tidemark proxy` has it and
    /// a server is there.
    redis: Option<String>,
    redis_secs: f64,
    /// This process's open-files limit (its children inherit it).
    open_files: u64,
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let env = |name: &str| std::env::var(format!("TIDEMARK_PROXY_{name}")).ok();
    let size = |name: &str, bench: u64, test: u64| {
        env(name)
            .and_then(|v| v.parse().ok())
            .unwrap_or(if full { bench } else { test })
    };
    let list = |name: &str, bench: &str, test: &str| -> Vec<u64> {
        env(name)
            .unwrap_or_else(|| (if full { bench } else { test }).to_owned())
            .split(',')
            .map(|v| v.trim().parse().expect("a number"))
            .collect()
    };
    let mut sizes = Sizes {
        full,
        events: size("EVENTS", 1_000_000, 5_000),
        rounds: size("ROUNDS", 5, 1) as usize,
        clients: size("CLIENTS", 10_000, 50) as usize,
        fanout_secs: size("FANOUT_SECS", 5, 1),
        intervals_ms: list("INTERVALS", "100,10", "20"),
        behind: list("BEHIND", "10000,100000", "1000"),
        strace: env("STRACE").is_some_and(|v| v != "0"),
        nginx_fanout: env("NGINX_FANOUT").is_none_or(|v| v != "0"),
        file_log: false,
        redis: None,
        redis_secs: env("REDIS_SECS")
            .and_then(|v| v.parse().ok())
            .unwrap_or(if full { 10.0 } else { 0.5 }),
        open_files: 0,
    };
    if sizes.strace && !runs("strace", &["-V"]) {
        println!("strace is not installed: the syscall profile is skipped");
        sizes.strace = false;
    }

    let limit = raise_open_files(sizes.clients as u64 * 3 + 1_000);
    sizes.open_files = limit;
    if limit < sizes.clients as u64 + 200 {
        let clients = limit.saturating_sub(200) as usize;
        println!(
            "open files are limited to {limit}: fan-out with {clients} clients instead of {}",
            sizes.clients
        );
        sizes.clients = clients;
    }
    machine();
    println!("open files: {limit}");

    let nginx = nginx_binary();
    if nginx.is_none() {
        println!("nginx is not installed (apt-get install -y nginx): the nginx cases are skipped");
    }
    let help = Command::new(TIDEMARK)
        .args(["proxy", "--help"])
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    let proxy = help.is_some();
    sizes.file_log = help.as_ref().is_some_and(|h| h.contains("--log"));
    if !proxy {
        println!("this tidemark has no `proxy` command: the proxy cases are skipped");
    } else if !sizes.file_log {
        println!("this tidemark proxy has no --log: the file-log cases are skipped");
    }

    // The bench's own server when measuring (nothing else sends it
    // commands), the test command's in test mode.
    let redis_server = if !help.as_ref().is_some_and(|h| h.contains("redis://")) {
        println!("this tidemark proxy has no --log redis://: the Redis cases are skipped");
        None
    } else if full && runs("redis-server", &["--version"]) {
        let server = support::redis_server::RedisServer::start();
        sizes.redis = Some(server.url());
        Some(server)
    } else if !full
        && (std::env::var_os("TIDEMARK_TEST_REDIS").is_some()
            || runs("redis-server", &["--version"]))
    {
        let (url, server) = support::redis_server::shared();
        sizes.redis = Some(url);
        server
    } else {
        println!("redis-server is not installed: the Redis cases are skipped");
        None
    };

    let only = env("ONLY");
    let part = |name: &str| {
        only.as_ref()
            .is_none_or(|o| o.split(',').any(|p| p.trim() == name))
    };
    if part("one") {
        one_stream(&sizes, nginx.as_deref(), proxy);
    }
    if part("fan") {
        fan_out(&sizes, nginx.as_deref(), proxy);
    }
    if proxy && part("resume") {
        resume(&sizes);
    }
    if let Some(url) = sizes.redis.as_deref().filter(|_| part("redis")) {
        redis_commands(&sizes, url);
    }
    drop(redis_server);
    println!("\nload average at the end: {}", load_average());
}

fn runs(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn machine() {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']))
        .unwrap_or("unknown");
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "machine: {cores} cores, {model}, load average {}",
        load_average()
    );
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Raises this process's open-files limit (inherited by the processes it
/// starts) to at least `want` if allowed, else to the hard limit; returns
/// the soft limit in force.
fn raise_open_files(want: u64) -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let old = getrlimit(Resource::Nofile);
    let (current, maximum) = (
        old.current.unwrap_or(u64::MAX),
        old.maximum.unwrap_or(u64::MAX),
    );
    if current >= want {
        return current;
    }
    let raised = Rlimit {
        current: Some(want),
        maximum: Some(maximum.max(want)),
    };
    if setrlimit(Resource::Nofile, raised).is_ok() {
        return want;
    }
    let capped = Rlimit {
        current: Some(maximum),
        maximum: Some(maximum),
    };
    if setrlimit(Resource::Nofile, capped).is_ok() {
        maximum
    } else {
        current
    }
}

// ---------------------------------------------------------------------------
// Processes

/// `utime + stime` of a process, in ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(end) = stat.rfind(')') else { return 0 };
    let fields: Vec<&str> = stat[end + 1..].split_whitespace().collect();
    // After the command: field 3 (state) is index 0; utime is 14, stime 15.
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

/// Resident memory of a process, KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The threads of a process.
fn threads(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// The processes whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let Some(end) = stat.rfind(')') else { continue };
        let parent = stat[end + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok());
        if parent == Some(pid) {
            found.push(child);
        }
    }
    found
}

fn signal(pid: u32, signal: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(pid, signal);
    }
}

/// A `tidemark` process (`serve` or `proxy`) on a free port, killed when
/// dropped.
struct Tidemark {
    child: Child,
    addr: SocketAddr,
    /// The process to measure: the child, or under strace the child's child.
    pid: u32,
    _dir: Option<tempfile::TempDir>,
    stderr: tempfile::NamedTempFile,
}

impl Tidemark {
    /// `tidemark serve --interval-ms 0 --count N`.
    fn serve(count: u64) -> Self {
        let args = [
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--interval-ms",
            "0",
            "--count",
        ];
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        args.push(count.to_string());
        Self::start(None, &args, None)
    }

    /// `tidemark proxy --upstream URL`, with `--log DIR` when `file_log`,
    /// optionally under `strace -c -f -o SUMMARY`.
    fn proxy(
        upstream: SocketAddr,
        file_log: bool,
        extra: &[String],
        strace: Option<&Path>,
    ) -> Self {
        let mut args: Vec<String> = [
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--upstream",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        args.push(format!("http://{upstream}"));
        let dir = file_log.then(|| tempfile::tempdir().expect("a log directory"));
        if let Some(dir) = &dir {
            args.push("--log".into());
            args.push(dir.path().display().to_string());
        }
        args.extend(extra.iter().cloned());
        Self::start(strace, &args, dir)
    }

    fn start(strace: Option<&Path>, args: &[String], dir: Option<tempfile::TempDir>) -> Self {
        let stderr = tempfile::NamedTempFile::new().expect("a temporary file");
        let mut command = support::strace::command(TIDEMARK, strace);
        let mut child = command
            .args(args)
            .stdout(Stdio::piped())
            .stderr(stderr.reopen().expect("the temporary file"))
            .spawn()
            .expect("tidemark starts");
        let mut out = BufReader::new(child.stdout.take().expect("piped"));
        let mut line = String::new();
        out.read_line(&mut line).expect("the bound address");
        let Ok(addr) = line.trim().parse() else {
            let _ = child.kill();
            let _ = child.wait();
            let errors = std::fs::read_to_string(stderr.path()).unwrap_or_default();
            panic!("tidemark {args:?} printed {line:?}, not an address; stderr: {errors}");
        };
        // Keep draining stdout so the process never blocks on it.
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        let pid = match strace {
            Some(_) => *children(child.id()).first().expect("strace's child"),
            None => child.id(),
        };
        Tidemark {
            child,
            addr,
            pid,
            _dir: dir,
            stderr,
        }
    }

    /// SIGTERM, then waits for the exit (and strace's summary).
    fn stop(mut self) {
        signal(self.pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        println!("tidemark did not exit within 20 s of SIGTERM: killed");
    }

    /// Its metrics' event counters, if it serves metrics.
    fn event_metrics(&self) -> String {
        self.metrics()
            .lines()
            .filter(|l| l.contains("events") && !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The value of the metric `name` (without labels), or 0.
    fn metric(&self, name: &str) -> f64 {
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// Its metrics, if it serves them (read from the address its status
    /// line gives).
    fn metrics(&self) -> String {
        let errors = std::fs::read_to_string(self.stderr.path()).unwrap_or_default();
        let Some(addr) = errors
            .lines()
            .find_map(|l| l.strip_prefix("tidemark: metrics on http://"))
            .and_then(|l| l.strip_suffix("/metrics"))
        else {
            return String::new();
        };
        let Ok(mut stream) = TcpStream::connect(addr) else {
            return String::new();
        };
        let _ = stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let mut text = String::new();
        let _ = stream.read_to_string(&mut text);
        text
    }

    /// What it wrote to stderr, but its status line.
    fn errors(&self) -> String {
        std::fs::read_to_string(self.stderr.path())
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                !l.starts_with("tidemark: proxy on ") && !l.starts_with("tidemark: metrics on ")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Tidemark {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Debian's nginx as a reverse proxy with `proxy_buffering off`, run
/// unprivileged in the foreground (`daemon off`) with one worker.
struct Nginx {
    child: Child,
    addr: SocketAddr,
    master: u32,
    worker: u32,
    dir: tempfile::TempDir,
}

fn nginx_binary() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

impl Nginx {
    fn start(binary: &Path, upstream: SocketAddr, connections: u64, strace: Option<&Path>) -> Self {
        let dir = tempfile::tempdir().expect("a directory");
        let addr = free_port();
        let d = dir.path().display();
        // nginx stops accepting well before its free connections run out
        // ("worker_connections are not enough"): let open files be the
        // limit.
        let files = connections.max(1024) + 100;
        let files = files.min(
            rustix::process::getrlimit(rustix::process::Resource::Nofile)
                .current
                .unwrap_or(u64::MAX),
        );
        let connections = (connections * 2).max(1024);
        let conf = format!(
            "daemon off;\n\
             master_process on;\n\
             worker_processes 1;\n\
             worker_rlimit_nofile {files};\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\n\
             events {{ worker_connections {connections}; }}\n\
             http {{\n\
               access_log off;\n\
               client_body_temp_path {d}/body;\n\
               proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fastcgi;\n\
               uwsgi_temp_path {d}/uwsgi;\n\
               scgi_temp_path {d}/scgi;\n\
               server {{\n\
                 listen {addr} backlog=4096;\n\
                 location / {{\n\
                   proxy_pass http://{upstream};\n\
                   proxy_http_version 1.1;\n\
                   proxy_set_header Connection \"\";\n\
                   proxy_buffering off;\n\
                   proxy_cache off;\n\
                   proxy_read_timeout 3600s;\n\
                 }}\n\
               }}\n\
             }}\n",
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("writing nginx.conf");
        let mut command = support::strace::command(binary, strace);
        let mut child = command
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx starts");
        let deadline = Instant::now() + Duration::from_secs(10);
        let pid_file = dir.path().join("nginx.pid");
        let (master, worker) = loop {
            let master = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|p| p.trim().parse::<u32>().ok());
            let ready = TcpStream::connect(addr).is_ok();
            if let (Some(master), true) = (master, ready)
                && let [worker] = children(master)[..]
            {
                break (master, worker);
            }
            if Instant::now() > deadline || child.try_wait().ok().flatten().is_some() {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default();
                panic!("nginx did not start; error.log: {log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Nginx {
            child,
            addr,
            master,
            worker,
            dir,
        }
    }

    /// Graceful stop (SIGQUIT), then waits for the exit (and strace's summary).
    fn stop(mut self) {
        signal(self.master, rustix::process::Signal::QUIT);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn errors(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // The master stops its worker; killed at once it would leave the
        // worker running.
        signal(self.master, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if Path::new(&format!("/proc/{}", self.worker)).exists() {
            signal(self.worker, rustix::process::Signal::KILL);
        }
    }
}

// ---------------------------------------------------------------------------
// The client: a raw HTTP/1.1 response decoder (chunked or to the end) and SSE
// event splitter, fed with whatever a read returned.

/// One dispatched SSE event, borrowed from the decoder.
struct Event<'a> {
    id: &'a [u8],
    data: &'a [u8],
    kind: &'a [u8],
}

enum Body {
    Head,
    /// Reading a chunk size (hex digits, then extensions to the line end).
    Size {
        value: u64,
        extension: bool,
    },
    Data(u64),
    /// The CRLF after a chunk's data.
    AfterData,
    Identity,
    Done,
}

struct SseDecoder {
    body: Body,
    head: Vec<u8>,
    status: u16,
    line: Vec<u8>,
    id: Vec<u8>,
    data: Vec<u8>,
    kind: Vec<u8>,
    has_data: bool,
    events: u64,
}

impl SseDecoder {
    fn new() -> Self {
        SseDecoder {
            body: Body::Head,
            head: Vec::new(),
            status: 0,
            line: Vec::new(),
            id: Vec::new(),
            data: Vec::new(),
            kind: Vec::new(),
            has_data: false,
            events: 0,
        }
    }

    fn head_done(&self) -> bool {
        !matches!(self.body, Body::Head)
    }

    fn ended(&self) -> bool {
        matches!(self.body, Body::Done)
    }

    /// Decodes `input`, calling `on_event` for every complete event.
    fn feed(&mut self, mut input: &[u8], on_event: &mut impl FnMut(&Event<'_>)) {
        while !input.is_empty() {
            match &mut self.body {
                Body::Head => {
                    let start = self.head.len().saturating_sub(3);
                    self.head.extend_from_slice(input);
                    let Some(end) = self.head[start..]
                        .windows(4)
                        .position(|w| w == b"\r\n\r\n")
                        .map(|p| start + p + 4)
                    else {
                        return;
                    };
                    let rest = self.head.split_off(end);
                    let head = String::from_utf8_lossy(&self.head).to_ascii_lowercase();
                    self.status = head
                        .split_whitespace()
                        .nth(1)
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0);
                    let chunked = head
                        .lines()
                        .any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked"));
                    let empty = self.status == 204
                        || self.status == 304
                        || head.lines().any(|l| l.trim() == "content-length: 0");
                    self.body = if empty {
                        Body::Done
                    } else if chunked {
                        Body::Size {
                            value: 0,
                            extension: false,
                        }
                    } else {
                        Body::Identity
                    };
                    self.feed(&rest, on_event);
                    return;
                }
                Body::Size { value, extension } => {
                    let byte = input[0];
                    input = &input[1..];
                    match byte {
                        b'\n' if *value == 0 => self.body = Body::Done,
                        b'\n' => self.body = Body::Data(*value),
                        b'\r' => {}
                        _ if *extension => {}
                        _ => match (byte as char).to_digit(16) {
                            Some(d) => *value = *value * 16 + u64::from(d),
                            None => *extension = true,
                        },
                    }
                }
                Body::Data(remaining) => {
                    let take = (*remaining).min(input.len() as u64) as usize;
                    *remaining -= take as u64;
                    if *remaining == 0 {
                        self.body = Body::AfterData;
                    }
                    let (data, rest) = input.split_at(take);
                    input = rest;
                    self.lines(data, on_event);
                }
                Body::AfterData => {
                    if input[0] == b'\n' {
                        self.body = Body::Size {
                            value: 0,
                            extension: false,
                        };
                    }
                    input = &input[1..];
                }
                Body::Identity => {
                    self.lines(input, on_event);
                    return;
                }
                Body::Done => return,
            }
        }
    }

    fn lines(&mut self, mut data: &[u8], on_event: &mut impl FnMut(&Event<'_>)) {
        while let Some(end) = data.iter().position(|&b| b == b'\n') {
            if self.line.is_empty() {
                self.line_done(&data[..end], on_event);
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(&data[..end]);
                self.line_done(&line, on_event);
                line.clear();
                self.line = line;
            }
            data = &data[end + 1..];
        }
        self.line.extend_from_slice(data);
    }

    fn line_done(&mut self, line: &[u8], on_event: &mut impl FnMut(&Event<'_>)) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            if self.has_data {
                self.events += 1;
                on_event(&Event {
                    id: &self.id,
                    data: &self.data,
                    kind: &self.kind,
                });
            }
            self.has_data = false;
            self.data.clear();
            self.kind.clear();
            return;
        }
        let field = |name: &[u8]| {
            line.strip_prefix(name)
                .map(|v| v.strip_prefix(b" ").unwrap_or(v))
        };
        if let Some(v) = field(b"data:") {
            self.data.clear();
            self.data.extend_from_slice(v);
            self.has_data = true;
        } else if let Some(v) = field(b"id:") {
            self.id.clear();
            self.id.extend_from_slice(v);
        } else if let Some(v) = field(b"event:") {
            self.kind.clear();
            self.kind.extend_from_slice(v);
        }
    }
}

fn request(path: &str, last_event_id: Option<&str>) -> Vec<u8> {
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n"
    );
    if let Some(id) = last_event_id {
        request.push_str(&format!("Last-Event-ID: {id}\r\n"));
    }
    request.push_str("\r\n");
    request.into_bytes()
}

/// How many events a client resuming `path` from an id the proxy never
/// issued gets (a gap, then everything the log lets clients see), reading
/// until 2 s pass without data: what the log holds, when a reader stalls.
fn available(addr: SocketAddr, path: &str) -> (u64, String) {
    let Ok(mut stream) = TcpStream::connect(addr) else {
        return (0, String::new());
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = stream.write_all(&request(path, Some("not-an-id")));
    let mut decoder = SseDecoder::new();
    let mut buffer = vec![0; 1 << 16];
    let mut last = String::new();
    while let Ok(n @ 1..) = stream.read(&mut buffer) {
        decoder.feed(&buffer[..n], &mut |event| {
            last = String::from_utf8_lossy(event.id).into_owned();
        });
    }
    (decoder.events, last)
}

/// What one blocking read of a stream saw.
struct Read1 {
    elapsed: Duration,
    first_event: Duration,
    events: u64,
    bytes: u64,
    last_id: String,
    gaps: u64,
}

/// Reads `path` of `addr` until `done(events so far, event)` is true.
fn read_stream(
    addr: SocketAddr,
    path: &str,
    last_event_id: Option<&str>,
    mut done: impl FnMut(u64, &Event<'_>) -> bool,
) -> Read1 {
    let start = Instant::now();
    let mut stream = TcpStream::connect(addr).expect("the server accepts");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("a timeout");
    stream
        .write_all(&request(path, last_event_id))
        .expect("the request goes out");
    let mut decoder = SseDecoder::new();
    let mut buffer = vec![0; 1 << 16];
    let (mut bytes, mut finished, mut first, mut gaps) = (0u64, false, None, 0u64);
    let mut last_id = Vec::new();
    let mut first_id = String::new();
    let mut gap = None;
    let deadline = start
        + Duration::from_secs(
            std::env::var("TIDEMARK_PROXY_DEADLINE_SECS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(300),
        );
    while !finished {
        assert!(
            Instant::now() < deadline,
            "{addr}{path}: {} events in {:?}, the first {first_id:?}",
            decoder.events,
            deadline - start
        );
        if let Some(gap) = gap {
            panic!(
                "{addr}{path}: a gap signal after {} events: {gap}",
                decoder.events
            );
        }
        let n = match stream.read(&mut buffer) {
            Ok(n) => n,
            Err(e) => panic!(
                "reading {path} from {addr}: {e} after {} events",
                decoder.events
            ),
        };
        assert!(
            n > 0 && !decoder.ended(),
            "{addr}{path} ended after {} events (status {})",
            decoder.events,
            decoder.status
        );
        bytes += n as u64;
        let mut count = decoder.events;
        decoder.feed(&buffer[..n], &mut |event| {
            count += 1;
            first.get_or_insert_with(|| {
                first_id = String::from_utf8_lossy(event.id).into_owned();
                start.elapsed()
            });
            if event.kind == b"tidemark-gap" {
                gaps += 1;
                gap.get_or_insert_with(|| String::from_utf8_lossy(event.data).into_owned());
            }
            if !finished && done(count, event) {
                finished = true;
                last_id.clear();
                last_id.extend_from_slice(event.id);
            }
        });
        if decoder.head_done() {
            assert_eq!(decoder.status, 200, "{addr}{path}: status");
        }
    }
    Read1 {
        elapsed: start.elapsed(),
        first_event: first.unwrap_or_default(),
        events: decoder.events,
        bytes,
        last_id: String::from_utf8_lossy(&last_id).into_owned(),
        gaps,
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

// ---------------------------------------------------------------------------
// 1. One stream, one client

struct Path1 {
    name: &'static str,
    addr: SocketAddr,
    /// The process in the middle (proxy or nginx worker).
    middle: Option<u32>,
    rates: Vec<f64>,
    middle_us: Vec<f64>,
    upstream_us: Vec<f64>,
    bytes_per_event: Vec<f64>,
}

fn one_stream(sizes: &Sizes, nginx: Option<&Path>, proxy: bool) {
    let n = sizes.events;
    let upstream = Tidemark::serve(n);
    let nginx = nginx.map(|b| (b, Nginx::start(b, upstream.addr, 1024, None)));
    // The upstream writes the whole stream at once, faster than any client
    // reads: a log that kept fewer events than the stream would trim events
    // before the client read them (a gap), so it keeps them all.
    let keep = keep_all(n);
    let memory = proxy.then(|| Tidemark::proxy(upstream.addr, false, &keep, None));
    let file = (proxy && sizes.file_log).then(|| Tidemark::proxy(upstream.addr, true, &keep, None));
    let redis = sizes.redis.as_deref().map(|url| {
        let mut args = redis_log(url, "one");
        args.extend(keep.iter().cloned());
        Tidemark::proxy(upstream.addr, false, &args, None)
    });
    let new = |name, addr, middle| Path1 {
        name,
        addr,
        middle,
        rates: Vec::new(),
        middle_us: Vec::new(),
        upstream_us: Vec::new(),
        bytes_per_event: Vec::new(),
    };
    let mut paths = vec![new("direct", upstream.addr, None)];
    if let Some((_, nginx)) = &nginx {
        paths.push(new("nginx", nginx.addr, Some(nginx.worker)));
    }
    if let Some(memory) = &memory {
        paths.push(new("tidemark proxy", memory.addr, Some(memory.pid)));
    }
    if let Some(file) = &file {
        paths.push(new("tidemark proxy --log", file.addr, Some(file.pid)));
    }
    if let Some(redis) = &redis {
        paths.push(new(REDIS_PATH, redis.addr, Some(redis.pid)));
    }
    println!(
        "\none stream, one client: `tidemark serve --interval-ms 0 --count {n}`, {} rounds, load {}",
        sizes.rounds,
        load_average()
    );
    for round in 0..sizes.rounds {
        for (i, path) in paths.iter_mut().enumerate() {
            let target = format!("/events?round={round}&path={i}");
            let middle0 = path.middle.map_or(0, cpu_ticks);
            let upstream0 = cpu_ticks(upstream.pid);
            let read = std::panic::catch_unwind(|| {
                read_stream(path.addr, &target, None, |count, _| count == n)
            });
            let read = read.unwrap_or_else(|panic| {
                // Say what the proxy said, then fail as the read did.
                let process = match path.name {
                    "tidemark proxy" => memory.as_ref(),
                    "tidemark proxy --log" => file.as_ref(),
                    REDIS_PATH => redis.as_ref(),
                    _ => None,
                };
                if let Some(process) = process {
                    println!("{} stderr: {}", path.name, process.errors());
                    println!("{} metrics:\n{}", path.name, process.event_metrics());
                    let (events, last) = available(path.addr, &target);
                    println!("a new client resuming {target} got {events} events, the last {last}");
                }
                std::panic::resume_unwind(panic)
            });
            // Let the middle finish what it does after the last event
            // (the file log's writes) before reading its CPU time.
            std::thread::sleep(Duration::from_millis(200));
            let middle = path.middle.map_or(0, cpu_ticks) - middle0;
            let up = cpu_ticks(upstream.pid) - upstream0;
            assert_eq!(read.events, n, "{} delivered every event", path.name);
            assert_eq!(read.gaps, 0);
            let per_event = |ticks: u64| ticks as f64 / TICKS_PER_SECOND * 1e6 / n as f64;
            path.rates.push(n as f64 / read.elapsed.as_secs_f64());
            path.middle_us.push(per_event(middle));
            path.upstream_us.push(per_event(up));
            path.bytes_per_event.push(read.bytes as f64 / n as f64);
        }
    }
    println!(
        "| path | events/s | runs (events/s) | middle CPU µs/event | upstream CPU µs/event | bytes/event at the client |"
    );
    println!("|---|---|---|---|---|---|");
    for path in &paths {
        let runs: Vec<String> = path.rates.iter().map(|r| format!("{r:.0}")).collect();
        let middle = if path.middle.is_some() {
            format!("{:.3}", median(path.middle_us.clone()))
        } else {
            "-".into()
        };
        println!(
            "| {} | {:.0} | {} | {middle} | {:.3} | {:.1} |",
            path.name,
            median(path.rates.clone()),
            runs.join(", "),
            median(path.upstream_us.clone()),
            median(path.bytes_per_event.clone()),
        );
    }
    let find = |name: &str| paths.iter().find(|p| p.name == name);
    if let Some(nginx) = find("nginx") {
        for name in ["tidemark proxy", "tidemark proxy --log"] {
            let Some(proxy) = find(name) else { continue };
            let rate = median(proxy.rates.clone()) / median(nginx.rates.clone());
            let cpu = median(proxy.middle_us.clone()) / median(nginx.middle_us.clone());
            println!(
                "{name} / nginx: events/s {rate:.2}x (target >= 0.8x: {}), CPU per event {cpu:.2}x (target <= 2x: {})",
                verdict(rate >= 0.8),
                verdict(cpu <= 2.0)
            );
        }
    }
    if let (Some(memory), Some(redis)) = (find("tidemark proxy"), find(REDIS_PATH)) {
        println!(
            "{REDIS_PATH} / memory log: events/s {:.2}x, CPU per event {:.2}x",
            median(redis.rates.clone()) / median(memory.rates.clone()),
            median(redis.middle_us.clone()) / median(memory.middle_us.clone())
        );
    }
    if let Some(direct) = find("direct") {
        for path in &paths[1..] {
            println!(
                "{} / direct: events/s {:.2}x",
                path.name,
                median(path.rates.clone()) / median(direct.rates.clone())
            );
        }
    }
    for (name, errors) in [
        ("nginx", nginx.as_ref().map(|(_, n)| n.errors())),
        ("proxy", memory.as_ref().map(Tidemark::errors)),
        ("proxy --log", file.as_ref().map(Tidemark::errors)),
        (REDIS_PATH, redis.as_ref().map(Tidemark::errors)),
    ] {
        if let Some(errors) = errors.filter(|e| !e.trim().is_empty()) {
            println!("{name} stderr/error log:\n{}", tail(&errors, 10));
        }
    }

    if sizes.strace {
        println!(
            "\nsyscalls per event, `strace -c -f` of the middle process, one run of {n} events:"
        );
        if let Some((binary, _)) = &nginx {
            let summary = tempfile::NamedTempFile::new().expect("a temporary file");
            let traced = Nginx::start(binary, upstream.addr, 1024, Some(summary.path()));
            let read = read_stream(traced.addr, "/events?strace=nginx", None, |c, _| c == n);
            assert_eq!(read.events, n);
            traced.stop();
            print_strace("nginx", summary.path(), n);
        }
        if proxy {
            let logs: &[_] = if sizes.file_log {
                &[false, true]
            } else {
                &[false]
            };
            for &file_log in logs {
                let name = if file_log {
                    "tidemark proxy --log"
                } else {
                    "tidemark proxy"
                };
                let summary = tempfile::NamedTempFile::new().expect("a temporary file");
                let traced = Tidemark::proxy(upstream.addr, file_log, &keep, Some(summary.path()));
                let read = read_stream(traced.addr, "/events?strace=proxy", None, |c, _| c == n);
                assert_eq!(read.events, n);
                traced.stop();
                print_strace(name, summary.path(), n);
            }
        }
    }
    drop(nginx);
    drop((memory, file, redis));
}

/// The one-stream row of the Redis log.
const REDIS_PATH: &str = "tidemark proxy --log redis://";

/// Proxy flags for a log in the Redis at `url`, under a prefix of this run
/// and `part`.
fn redis_log(url: &str, part: &str) -> Vec<String> {
    vec![
        "--log".into(),
        url.into(),
        "--redis-prefix".into(),
        format!("tidemark-bench:{}:{part}:", std::process::id()),
    ]
}

/// Proxy flags that keep every one of `events` small events in the log.
fn keep_all(events: u64) -> Vec<String> {
    vec![
        "--retain".into(),
        events.to_string(),
        "--max-stream-bytes".into(),
        (events * 256).max(64 << 20).to_string(),
    ]
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn print_strace(name: &str, summary: &Path, events: u64) {
    let text = std::fs::read_to_string(summary).unwrap_or_default();
    let mut rows = Vec::new();
    let mut total = 0.0;
    for row in support::strace::rows(&text) {
        if row.name == "total" {
            total = row.calls;
            continue;
        }
        rows.push((row.name.to_owned(), row.calls));
    }
    let shown: Vec<String> = rows
        .iter()
        .filter(|(_, calls)| calls / events as f64 >= 0.001)
        .map(|(s, calls)| format!("{s} {:.3}", calls / events as f64))
        .collect();
    println!(
        "| {name} | {:.3} in all | {} |",
        total / events as f64,
        shown.join(", ")
    );
}

// ---------------------------------------------------------------------------
// 2. Fan-out

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// An upstream that writes one event to every open connection every
/// `interval`, with its write time (µs since the epoch) as the data, as
/// HTTP/1.1 chunks; no replay.
struct Ticker {
    addr: SocketAddr,
    running: Arc<AtomicBool>,
    ticks: Arc<AtomicU64>,
    connections: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
}

impl Ticker {
    fn start(interval: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
        let addr = listener.local_addr().expect("bound");
        let ticker = Ticker {
            addr,
            running: Arc::new(AtomicBool::new(true)),
            ticks: Arc::new(AtomicU64::new(0)),
            connections: Arc::new(Mutex::new(Vec::new())),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (connections, stop) = (ticker.connections.clone(), ticker.stop.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(mut stream) = stream else { continue };
                let connections = connections.clone();
                std::thread::spawn(move || {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                    if support::http::read_head(&mut stream).is_none() {
                        return;
                    }
                    let _ = stream.set_nodelay(true);
                    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
                    let head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                                 cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n";
                    if stream.write_all(head).is_ok() {
                        connections.lock().expect("not poisoned").push(stream);
                    }
                });
            }
        });
        let (connections, stop) = (ticker.connections.clone(), ticker.stop.clone());
        let (running, ticks) = (ticker.running.clone(), ticker.ticks.clone());
        std::thread::spawn(move || {
            let mut next = Instant::now();
            let mut seq = 0u64;
            let mut chunk = Vec::with_capacity(128);
            while !stop.load(Ordering::Relaxed) {
                next += interval;
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                } else {
                    next = now;
                }
                if !running.load(Ordering::Relaxed) {
                    continue;
                }
                seq += 1;
                let mut open = connections.lock().expect("not poisoned");
                open.retain_mut(|stream| {
                    let event = format!("id: {seq}\ndata: {}\n\n", now_micros());
                    chunk.clear();
                    let _ = write!(chunk, "{:x}\r\n{event}\r\n", event.len());
                    stream.write_all(&chunk).is_ok()
                });
                drop(open);
                ticks.fetch_add(1, Ordering::Relaxed);
            }
            connections.lock().expect("not poisoned").clear();
        });
        ticker
    }

    fn connections(&self) -> usize {
        self.connections.lock().expect("not poisoned").len()
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
    }
}

/// Delay histogram: 10 µs buckets up to 100 ms, then 1 ms buckets up to 10 s.
struct Histogram(Vec<AtomicU64>);

impl Histogram {
    const FINE: u64 = 10_000;

    fn new() -> Self {
        Histogram((0..Self::FINE + 9_900).map(|_| AtomicU64::new(0)).collect())
    }

    fn record(&self, micros: u64) {
        let bucket = if micros < 100_000 {
            micros / 10
        } else {
            (Self::FINE + (micros - 100_000) / 1_000).min(self.0.len() as u64 - 1)
        };
        self.0[bucket as usize].fetch_add(1, Ordering::Relaxed);
    }

    fn clear(&self) {
        for b in &self.0 {
            b.store(0, Ordering::Relaxed);
        }
    }

    /// The delay below which a fraction `q` of the samples lie, in µs.
    fn quantile(&self, q: f64) -> f64 {
        let counts: Vec<u64> = self.0.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        let target = (total as f64 * q).ceil() as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= target.max(1) {
                let i = i as u64;
                return if i < Self::FINE {
                    (i * 10 + 5) as f64
                } else {
                    (100_000 + (i - Self::FINE) * 1_000 + 500) as f64
                };
            }
        }
        f64::NAN
    }
}

#[derive(Default)]
struct FleetCounters {
    connected: AtomicU64,
    failed: AtomicU64,
    closed: AtomicU64,
    /// Events read at any time.
    seen: AtomicU64,
    /// Events read while measuring.
    measured: AtomicU64,
    measuring: AtomicBool,
}

/// Many SSE clients on a few threads running one smol executor.
struct Fleet {
    executor: Arc<smol::Executor<'static>>,
    tasks: Vec<smol::Task<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    stop: Option<smol::channel::Sender<()>>,
    counters: Arc<FleetCounters>,
    delays: Arc<Histogram>,
    gate: Arc<smol::lock::Semaphore>,
}

impl Fleet {
    fn new(threads: usize) -> Self {
        let executor = Arc::new(smol::Executor::new());
        let (stop, stopped) = smol::channel::bounded::<()>(1);
        let threads = (0..threads)
            .map(|_| {
                let (executor, stopped) = (executor.clone(), stopped.clone());
                std::thread::spawn(move || {
                    let _ = smol::block_on(executor.run(stopped.recv()));
                })
            })
            .collect();
        Fleet {
            executor,
            tasks: Vec::new(),
            threads,
            stop: Some(stop),
            counters: Arc::default(),
            delays: Arc::new(Histogram::new()),
            // Connections being set up at once (below the listen backlogs).
            gate: Arc::new(smol::lock::Semaphore::new(256)),
        }
    }

    fn connect(&mut self, addr: SocketAddr, path: &str, clients: usize) {
        for _ in 0..clients {
            let (counters, delays, gate) = (
                self.counters.clone(),
                self.delays.clone(),
                self.gate.clone(),
            );
            let request = request(path, None);
            self.tasks.push(self.executor.spawn(async move {
                let permit = gate.acquire_arc().await;
                let mut stream = None;
                for _ in 0..50 {
                    match smol::net::TcpStream::connect(addr).await {
                        Ok(s) => {
                            stream = Some(s);
                            break;
                        }
                        Err(_) => smol::Timer::after(Duration::from_millis(100)).await,
                    };
                }
                let Some(mut stream) = stream else {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                if stream.write_all(&request).await.is_err() {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                let mut permit = Some(permit);
                let mut decoder = SseDecoder::new();
                let mut buffer = vec![0; 4096];
                loop {
                    let n = match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let now = now_micros();
                    let measuring = counters.measuring.load(Ordering::Relaxed);
                    let mut measured = 0;
                    let before = decoder.events;
                    decoder.feed(&buffer[..n], &mut |event| {
                        if measuring
                            && let Ok(sent) =
                                std::str::from_utf8(event.data).unwrap_or("").parse::<u64>()
                        {
                            delays.record(now.saturating_sub(sent));
                            measured += 1;
                        }
                    });
                    if permit.is_some() && decoder.head_done() {
                        permit = None;
                        if decoder.status == 200 {
                            counters.connected.fetch_add(1, Ordering::Relaxed);
                        } else {
                            counters.failed.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    }
                    counters
                        .seen
                        .fetch_add(decoder.events - before, Ordering::Relaxed);
                    if measured > 0 {
                        counters.measured.fetch_add(measured, Ordering::Relaxed);
                    }
                }
                counters.closed.fetch_add(1, Ordering::Relaxed);
            }));
        }
    }

    /// Waits until `connected + failed >= total`; false on timeout.
    fn wait_connected(&self, total: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let c = &self.counters;
            let done = c.connected.load(Ordering::Relaxed) + c.failed.load(Ordering::Relaxed);
            if done >= total as u64 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // Cancel every client (their sockets close), then stop the threads.
        let tasks = std::mem::take(&mut self.tasks);
        smol::block_on(async {
            for task in tasks {
                task.cancel().await;
            }
        });
        drop(self.stop.take());
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

struct FanResult {
    clients: u64,
    /// Clients whose stream ended while measuring.
    closed: u64,
    connect_secs: f64,
    failed: u64,
    idle_kib_per_client: f64,
    rss_one_mib: f64,
    rss_all_mib: f64,
    delivered_per_s: f64,
    expected_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_us_per_event: f64,
    /// This process: the clients (and the upstream's writes).
    bench_cpu_us_per_event: f64,
    load: String,
}

fn fan_out(sizes: &Sizes, nginx: Option<&Path>, proxy: bool) {
    let clients = sizes.clients;
    let nginx = nginx.filter(|_| sizes.nginx_fanout);
    if !proxy && nginx.is_none() {
        return;
    }
    let mut results = Vec::new();
    for &interval in &sizes.intervals_ms {
        let interval = Duration::from_millis(interval);
        if proxy {
            let ticker = Ticker::start(interval);
            let proxy = Tidemark::proxy(ticker.addr, false, &[], None);
            let result = measure_fan_out(
                "tidemark proxy",
                &ticker,
                proxy.addr,
                proxy.pid,
                clients,
                sizes,
            );
            assert_eq!(
                ticker.connections(),
                1,
                "the proxy's clients share one upstream connection"
            );
            println!(
                "tidemark proxy ({} ms): {} threads{}",
                interval.as_millis(),
                threads(proxy.pid),
                std::env::var("SMOL_THREADS")
                    .map_or(String::new(), |t| format!(", SMOL_THREADS={t}"))
            );
            if !proxy.errors().trim().is_empty() {
                println!("proxy stderr:\n{}", tail(&proxy.errors(), 10));
            }
            results.push(("tidemark proxy", interval, result));
        }
        if let Some(binary) = nginx {
            // nginx holds two sockets per client (client and upstream), and
            // so does this process (client and the ticker's end); its worker
            // cannot raise its open-files limit above the hard limit.
            let clients = clients.min((sizes.open_files as usize).saturating_sub(500) / 2);
            if clients < sizes.clients {
                println!(
                    "nginx fan-out: {clients} clients, not {}: two sockets per client in nginx and here, open files limited to {}",
                    sizes.clients, sizes.open_files
                );
            }
            let ticker = Ticker::start(interval);
            let nginx = Nginx::start(binary, ticker.addr, clients as u64 * 2 + 100, None);
            let result =
                measure_fan_out("nginx", &ticker, nginx.addr, nginx.worker, clients, sizes);
            if !nginx.errors().trim().is_empty() {
                println!("nginx error log:\n{}", tail(&nginx.errors(), 10));
            }
            results.push(("nginx", interval, result));
        }
    }
    println!(
        "\nfan-out: one upstream event every INTERVAL to {clients} clients on loopback, {} s measured after 1 s of warm-up, load {}",
        sizes.fanout_secs,
        load_average()
    );
    println!(
        "| path | interval | clients (failed, cut) | connecting | delivered events/s | of the upstream's × clients | p50 delay | p99 delay | CPU µs/delivered event | clients' CPU µs/event | idle KiB/client | RSS 1 client → all | load |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (name, interval, r) in &results {
        println!(
            "| {name} | {} ms | {} ({}, {}) | {:.1} s | {:.0} | {:.1}% | {:.2} ms | {:.2} ms | {:.2} | {:.2} | {:.2} | {:.1} → {:.1} MiB | {} |",
            interval.as_millis(),
            r.clients,
            r.failed,
            r.closed,
            r.connect_secs,
            r.delivered_per_s,
            100.0 * r.delivered_per_s / r.expected_per_s,
            r.p50_ms,
            r.p99_ms,
            r.cpu_us_per_event,
            r.bench_cpu_us_per_event,
            r.idle_kib_per_client,
            r.rss_one_mib,
            r.rss_all_mib,
            r.load,
        );
    }
    for (name, _, r) in &results {
        if *name == "tidemark proxy" {
            let bytes = r.idle_kib_per_client * 1024.0;
            println!(
                "tidemark proxy memory per idle client: {bytes:.0} B (target <= 16 KB: {})",
                verdict(bytes <= 16_000.0)
            );
            break;
        }
    }
}

fn measure_fan_out(
    name: &str,
    ticker: &Ticker,
    addr: SocketAddr,
    pid: u32,
    clients: usize,
    sizes: &Sizes,
) -> FanResult {
    let mut fleet = Fleet::new(2);
    let counters = fleet.counters.clone();
    // One client opens the stream; then the upstream pauses and the others
    // join an idle stream.
    ticker.running.store(true, Ordering::Relaxed);
    fleet.connect(addr, "/fan", 1);
    let deadline = Instant::now() + Duration::from_secs(20);
    while counters.seen.load(Ordering::Relaxed) == 0 {
        assert!(
            Instant::now() < deadline,
            "no event reached the first client"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    ticker.running.store(false, Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(500));
    let rss_one = rss_kib(pid);
    fleet.connect(addr, "/fan", clients - 1);
    let timeout = Duration::from_secs(30 + clients as u64 / 100);
    let connecting = Instant::now();
    if !fleet.wait_connected(clients, timeout) {
        println!(
            "{name}: only {} of {clients} clients connected in {} s ({} failed, upstream connections {})",
            counters.connected.load(Ordering::Relaxed),
            timeout.as_secs(),
            counters.failed.load(Ordering::Relaxed),
            ticker.connections(),
        );
        assert!(sizes.full, "every client connects");
    }
    let connect_secs = connecting.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(1));
    let rss_all = rss_kib(pid);
    let connected = counters.connected.load(Ordering::Relaxed);
    let failed = counters.failed.load(Ordering::Relaxed);

    ticker.running.store(true, Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(1));
    fleet.delays.clear();
    let me = std::process::id();
    let (cpu0, ticks0, start) = (
        cpu_ticks(pid),
        ticker.ticks.load(Ordering::Relaxed),
        Instant::now(),
    );
    let own0 = cpu_ticks(me);
    counters.measured.store(0, Ordering::Relaxed);
    counters.measuring.store(true, Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(sizes.fanout_secs));
    counters.measuring.store(false, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    let (cpu1, ticks1, own1) = (
        cpu_ticks(pid),
        ticker.ticks.load(Ordering::Relaxed),
        cpu_ticks(me),
    );
    let delivered = counters.measured.load(Ordering::Relaxed);
    assert!(delivered > 0, "events reached the clients");
    let closed = counters.closed.load(Ordering::Relaxed);
    if !sizes.full {
        assert_eq!(closed, 0, "no client was cut");
    }
    let result = FanResult {
        clients: connected,
        closed,
        connect_secs,
        failed,
        idle_kib_per_client: (rss_all as f64 - rss_one as f64) / (connected.max(2) - 1) as f64,
        rss_one_mib: rss_one as f64 / 1024.0,
        rss_all_mib: rss_all as f64 / 1024.0,
        delivered_per_s: delivered as f64 / elapsed,
        expected_per_s: (ticks1 - ticks0) as f64 * connected as f64 / elapsed,
        p50_ms: fleet.delays.quantile(0.5) / 1000.0,
        p99_ms: fleet.delays.quantile(0.99) / 1000.0,
        cpu_us_per_event: (cpu1 - cpu0) as f64 / TICKS_PER_SECOND * 1e6 / delivered as f64,
        bench_cpu_us_per_event: (own1 - own0) as f64 / TICKS_PER_SECOND * 1e6 / delivered as f64,
        load: load_average(),
    };
    if !sizes.full {
        assert_eq!(connected, clients as u64, "every client connected");
    }
    ticker.running.store(false, Ordering::Relaxed);
    drop(fleet);
    result
}

// ---------------------------------------------------------------------------
// 3. Resume

fn resume(sizes: &Sizes) {
    println!(
        "\nresume: a client that read event 1 and left comes back with its Last-Event-ID; time to the last event, {} rounds, load {}",
        sizes.rounds,
        load_average()
    );
    println!(
        "| behind | path | catch-up events/s | runs (events/s) | time to the last event | time to the first |"
    );
    println!("|---|---|---|---|---|---|");
    for &behind in &sizes.behind {
        let last = behind + 1;
        let upstream = Tidemark::serve(last);
        let retain = keep_all(behind);
        let memory = Tidemark::proxy(upstream.addr, false, &retain, None);
        let file = sizes
            .file_log
            .then(|| Tidemark::proxy(upstream.addr, true, &retain, None));
        let mut rows: Vec<(&str, Vec<Read1>)> = vec![
            ("tidemark serve replaying itself", Vec::new()),
            ("tidemark proxy", Vec::new()),
        ];
        if file.is_some() {
            rows.push(("tidemark proxy --log", Vec::new()));
        }
        let suffix = format!("-{last}");
        for round in 0..sizes.rounds {
            for (name, reads) in rows.iter_mut() {
                let read = if name.starts_with("tidemark serve") {
                    let path = format!("/events?resume={round}");
                    read_stream(upstream.addr, &path, Some("1"), |_, e| {
                        e.id == last.to_string().as_bytes()
                    })
                } else {
                    let proxy = match &file {
                        Some(file) if *name == "tidemark proxy --log" => file,
                        _ => &memory,
                    };
                    let path = format!("/events?resume={round}");
                    let first = read_stream(proxy.addr, &path, None, |_, _| true);
                    assert!(
                        first.last_id.ends_with("-1"),
                        "the opener starts at event 1, not {}",
                        first.last_id
                    );
                    // The proxy keeps reading the upstream into the log.
                    std::thread::sleep(Duration::from_millis(if sizes.full { 1000 } else { 300 }));
                    read_stream(proxy.addr, &path, Some(&first.last_id), |_, e| {
                        e.id.ends_with(suffix.as_bytes())
                    })
                };
                assert_eq!(
                    read.events, behind,
                    "{name}: every event after the first, once"
                );
                assert_eq!(read.gaps, 0, "{name}: no gap");
                reads.push(read);
            }
        }
        for (name, reads) in &rows {
            let rates: Vec<f64> = reads
                .iter()
                .map(|r| behind as f64 / r.elapsed.as_secs_f64())
                .collect();
            let shown: Vec<String> = rates.iter().map(|r| format!("{r:.0}")).collect();
            let ms = |f: fn(&Read1) -> Duration| {
                median(reads.iter().map(|r| f(r).as_secs_f64() * 1e3).collect())
            };
            println!(
                "| {behind} | {name} | {:.0} | {} | {:.2} ms | {:.2} ms |",
                median(rates),
                shown.join(", "),
                ms(|r| r.elapsed),
                ms(|r| r.first_event),
            );
        }
    }
}

// ---------------------------------------------------------------------------
// 4. Redis commands per event

/// Calls of each command Redis has served (`INFO commandstats`), and its
/// CPU seconds (`INFO cpu`, user + system).
fn redis_stats(redis: &mut redis::Connection) -> (BTreeMap<String, u64>, f64) {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(redis)
        .expect("INFO commandstats");
    let calls = info
        .lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(":calls=")?;
            Some((name.to_owned(), rest.split(',').next()?.parse().ok()?))
        })
        .collect();
    let cpu: String = redis::cmd("INFO")
        .arg("cpu")
        .query(redis)
        .expect("INFO cpu");
    let seconds = cpu
        .lines()
        .filter_map(|line| {
            let value = line
                .strip_prefix("used_cpu_user:")
                .or_else(|| line.strip_prefix("used_cpu_sys:"))?;
            value.trim().parse::<f64>().ok()
        })
        .sum();
    (calls, seconds)
}

/// What the window of the `redis` part starts or ends with.
struct RedisSnapshot {
    at: Instant,
    /// Redis's counters (none for the memory log).
    redis: Option<(BTreeMap<String, u64>, f64)>,
    events_in: f64,
    log_writes: f64,
    proxy_ticks: u64,
}

/// Reads `events` events of a stream of `RATE` events/s through `proxy`
/// after `warmup`, and the snapshots around them.
fn rate_window(
    proxy: &Tidemark,
    mut redis: Option<&mut redis::Connection>,
    warmup: u64,
    events: u64,
) -> (RedisSnapshot, RedisSnapshot) {
    let mut snapshot = || RedisSnapshot {
        at: Instant::now(),
        redis: redis.as_deref_mut().map(redis_stats),
        events_in: proxy.metric("tidemark_proxy_events_in_total"),
        log_writes: proxy.metric("tidemark_proxy_log_writes_total"),
        proxy_ticks: cpu_ticks(proxy.pid),
    };
    let (mut before, mut after) = (None, None);
    let read = read_stream(proxy.addr, "/ticks?redis", None, |count, _| {
        if count == warmup {
            before = Some(snapshot());
        }
        let done = count == warmup + events;
        if done {
            after = Some(snapshot());
        }
        done
    });
    assert_eq!(read.gaps, 0);
    (before.expect("a start"), after.expect("an end"))
}

fn redis_commands(sizes: &Sizes, url: &str) {
    const RATE: u64 = 10_000;
    let warmup = RATE / 5;
    let events = ((RATE as f64 * sizes.redis_secs) as u64).max(1);
    println!(
        "\nRedis commands per event: one stream at {RATE} events/s (one event per upstream write) through {REDIS_PATH}, {events} events after {warmup}, against the memory log; load {}",
        load_average()
    );
    let mut redis = redis::Client::open(url)
        .and_then(|client| client.get_connection())
        .expect("the Redis of the bench");
    let mut cpu = Vec::new();
    for name in ["tidemark proxy", REDIS_PATH] {
        let ticker = Ticker::start(Duration::from_micros(1_000_000 / RATE));
        let on_redis = name == REDIS_PATH;
        let args = if on_redis {
            redis_log(url, "rate")
        } else {
            Vec::new()
        };
        let proxy = Tidemark::proxy(ticker.addr, false, &args, None);
        let (before, after) = rate_window(&proxy, on_redis.then_some(&mut redis), warmup, events);
        let logged = after.events_in - before.events_in;
        let seconds = (after.at - before.at).as_secs_f64();
        let proxy_us =
            (after.proxy_ticks - before.proxy_ticks) as f64 / TICKS_PER_SECOND * 1e6 / logged;
        println!(
            "{name}: {:.0} events/s in the window ({logged} events in {seconds:.2} s), the proxy's CPU {proxy_us:.2} µs/event",
            logged / seconds
        );
        cpu.push(proxy_us);
        if let (Some((calls0, cpu0)), Some((calls1, cpu1))) = (&before.redis, &after.redis) {
            println!("| command | calls | per event |");
            println!("|---|---|---|");
            let mut total = 0;
            for (command, &calls) in calls1 {
                // The bench's own INFO calls are not the proxy's.
                let calls = calls - calls0.get(command).copied().unwrap_or(0);
                if calls == 0 || command == "info" {
                    continue;
                }
                total += calls;
                println!("| {command} | {calls} | {:.3} |", calls as f64 / logged);
            }
            println!("| **all** | {total} | **{:.3}** |", total as f64 / logged);
            let writes = after.log_writes - before.log_writes;
            println!(
                "log writes (pipelines, one round trip each): {writes}, {:.3} per event, {:.2} events per write; Redis CPU {:.2} µs/event",
                writes / logged,
                logged / writes,
                (cpu1 - cpu0) * 1e6 / logged
            );
        }
        if let Some(errors) = Some(proxy.errors()).filter(|e| !e.trim().is_empty()) {
            println!("{name} stderr:\n{}", tail(&errors, 10));
        }
    }
    println!(
        "the proxy's CPU per event at {RATE} events/s, Redis log / memory log: {:.2}x",
        cpu[1] / cpu[0]
    );
}
