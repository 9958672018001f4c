//! `tidemark proxy` processes for the tests: started on `127.0.0.1:0`, the
//! address read from the first line of stdout, stderr collected line by
//! line; killed when dropped.

#![allow(dead_code)] // each test binary uses its own part

use super::http::{Event, Sse, get_sse, proxy_id};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running `tidemark proxy`.
pub struct Proxy {
    child: Child,
    /// The address it printed, `127.0.0.1:PORT`.
    pub addr: String,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Proxy {
    /// Starts `tidemark proxy --upstream upstream --listen 127.0.0.1:0
    /// args...` and waits for its address.
    pub fn start(upstream: &str, args: &[&str]) -> Proxy {
        Self::start_with_env(upstream, args, &[])
    }

    /// [`start`](Self::start) with more environment variables.
    pub fn start_with_env(upstream: &str, args: &[&str], env: &[(&str, &str)]) -> Proxy {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tidemark"))
            .args(["proxy", "--upstream", upstream, "--listen", "127.0.0.1:0"])
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let lines = stderr.clone();
        let pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if std::env::var_os("PROXY_TEST_DEBUG").is_some() {
                    eprintln!("proxy: {line}");
                }
                lines.lock().unwrap().push(line);
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next().and_then(Result::ok);
            let _ = tx.send(first);
            // Keep draining, so that later writes never fail.
            for _ in lines {}
        });
        let first = rx.recv_timeout(Duration::from_secs(20)).ok().flatten();
        let mut proxy = Proxy {
            child,
            addr: String::new(),
            stderr,
        };
        let Some(line) = first else {
            let _ = proxy.child.kill();
            let status = proxy.child.wait().ok();
            // Let the stderr thread catch up.
            std::thread::sleep(Duration::from_millis(100));
            panic!(
                "tidemark proxy printed no address (exit {status:?}); stderr:\n{}",
                proxy.stderr().join("\n")
            );
        };
        let addr = line.trim().to_owned();
        assert!(
            addr.starts_with("127.0.0.1:") && addr[10..].parse::<u16>().is_ok_and(|p| p != 0),
            "proxy printed {line:?} as its first line"
        );
        proxy.addr = addr;
        proxy
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The stderr lines so far.
    pub fn stderr(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// The first stderr line containing `needle`, waiting up to 20 s.
    pub fn stderr_line(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(line) = self.stderr().into_iter().find(|l| l.contains(needle)) {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "no stderr line with {needle:?}; stderr:\n{}",
                self.stderr().join("\n")
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `SIGKILL`, and the wait for it.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Sends `signal` (`TERM`, `INT`) and waits up to 10 s for the exit.
    pub fn signal_and_wait(&mut self, signal: &str) -> ExitStatus {
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the proxy did not exit within 10 s of SIG{signal}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The metrics address from its stderr line `tidemark: metrics on
    /// http://ADDR/metrics`.
    pub fn metrics_addr(&self) -> String {
        let line = self.stderr_line("metrics on http://");
        let url = line
            .split("metrics on http://")
            .nth(1)
            .unwrap_or_default()
            .trim();
        let addr = url
            .strip_suffix("/metrics")
            .unwrap_or_else(|| panic!("metrics line {line:?}"));
        assert!(addr.starts_with("127.0.0.1:"), "metrics line {line:?}");
        addr.to_owned()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One scrape of Prometheus text at `http://addr/metrics`: each sample by
/// its name with labels as written (`name{label="value"}`).
pub fn scrape(addr: &str) -> HashMap<String, f64> {
    let response = super::http::get(addr, "/metrics", &[("Connection", "close")]);
    assert_eq!(response.status, 200);
    let text = response.text();
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            Some((name.trim().to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

/// Opens an event stream through the proxy and checks that it is one.
pub fn open(proxy: &Proxy, path: &str, headers: &[(&str, &str)]) -> Sse {
    let response = get_sse(&proxy.addr, path, headers);
    assert_eq!(response.status, 200, "GET {path}: {response:?}");
    assert!(response.is_sse(), "GET {path}: {response:?}");
    response.sse()
}

/// `(seq, data)` of each event, checking that all carry `token`.
pub fn seqs(events: &[Event], token: &str) -> Vec<(u64, String)> {
    events
        .iter()
        .map(|e| {
            let (t, seq) = proxy_id(e.id());
            assert_eq!(t, token, "an event of another stream: {e:?}");
            (seq, e.data.clone())
        })
        .collect()
}

/// `(k, "k")` for each `k` in `range`: a live-feed event the proxy
/// numbered as the upstream did.
pub fn numbered(range: std::ops::RangeInclusive<u64>) -> Vec<(u64, String)> {
    range.map(|k| (k, k.to_string())).collect()
}

/// `(seq, data)` of the test upstream's chat events `range`, as it sent
/// them.
pub fn tokens(range: std::ops::RangeInclusive<u64>) -> Vec<(u64, String)> {
    range.map(|i| (i, format!("{{\"i\":{i}}}"))).collect()
}

/// The token of a stream whose event the test just read.
pub fn token_of(event: &Event) -> String {
    proxy_id(event.id()).0
}

/// Reads until the stream ends or fails (a killed proxy).
pub fn until_cut(sse: &mut Sse) {
    while let Ok(Some(_)) = sse.try_item() {}
}
