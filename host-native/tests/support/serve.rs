//! `tidemark serve` processes for the tests that run the binary.

#![allow(dead_code)] // each test binary uses its own part

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// A `tidemark serve --listen 127.0.0.1:0` process, killed when dropped.
pub struct Server {
    child: Child,
    /// The address it printed, `127.0.0.1:PORT`: proven to be this server's.
    pub addr: String,
}

impl Server {
    /// Starts `tidemark serve` with `args` and waits for its address.
    pub fn start(args: &[&str]) -> Server {
        Self::start_at("127.0.0.1:0", args)
    }

    /// Starts `tidemark serve --listen listen` with `args` (to bring a
    /// server back on the address of one that stopped).
    #[allow(dead_code)] // not every test binary brings servers back
    pub fn start_at(listen: &str, args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tidemark"))
            .args(["serve", "--listen", listen])
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line.trim().to_owned();
        assert!(addr.starts_with("127.0.0.1:"), "serve printed {line:?}");
        Server { child, addr }
    }

    /// A server of `count` events, one every `interval_ms`, that drops the
    /// connection every 200 events and, as naive servers re-send "recent
    /// history", replays the 30 events before `Last-Event-ID` on every
    /// reconnect (`retry: 5`).
    #[allow(dead_code)] // for the tests of restarts against such a server
    pub fn rewinding(count: u64, interval_ms: u64) -> Server {
        let (count, interval) = (count.to_string(), interval_ms.to_string());
        Self::start(&[
            "--count",
            &count,
            "--interval-ms",
            &interval,
            "--drop-every",
            "200",
            "--rewind",
            "30",
            "--retry-ms",
            "5",
        ])
    }

    /// The URL of its event stream.
    pub fn events_url(&self) -> String {
        format!("http://{}/events", self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
