//! Redis servers for tests and benches: the one the test command started
//! (`TIDEMARK_TEST_REDIS`), or one of our own on a free loopback port. Never
//! any other Redis.

#![allow(dead_code)] // each test binary uses its own part

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` child process, without persistence unless started with
/// [`start_persistent`](Self::start_persistent), killed when dropped.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    /// The flags beyond the port: persistence, TLS.
    persistence: Vec<String>,
    /// The TLS port, if it has one.
    tls_port: Option<u16>,
}

impl RedisServer {
    /// Starts a server on a free loopback port.
    pub fn start() -> RedisServer {
        Self::start_with(&["--save", "", "--appendonly", "no"])
    }

    /// Starts a server on a free loopback port that keeps its data in `dir`
    /// in an append-only file synced on every write, so that it loses
    /// nothing it acknowledged when killed, and has it all back when
    /// [restarted](Self::restart).
    pub fn start_persistent(dir: &std::path::Path) -> RedisServer {
        let dir = dir.to_str().expect("a UTF-8 temporary directory");
        Self::start_with(&[
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--dir",
            dir,
        ])
    }

    /// Starts a server on a free loopback port that also takes TLS
    /// connections on another, with the certificate and key in these PEM
    /// files, without asking clients for certificates.
    pub fn start_tls(cert: &std::path::Path, key: &std::path::Path) -> RedisServer {
        let tls_port = free_port().to_string();
        let mut server = Self::start_with(&[
            "--save",
            "",
            "--appendonly",
            "no",
            "--tls-port",
            &tls_port,
            "--tls-cert-file",
            cert.to_str().expect("a UTF-8 path"),
            "--tls-key-file",
            key.to_str().expect("a UTF-8 path"),
            "--tls-auth-clients",
            "no",
        ]);
        server.tls_port = tls_port.parse().ok();
        server
    }

    /// Its `rediss://localhost:PORT/` URL, if it takes TLS connections.
    pub fn tls_url(&self) -> Option<String> {
        self.tls_port
            .map(|port| format!("rediss://localhost:{port}/"))
    }

    fn start_with(persistence: &[&str]) -> RedisServer {
        let persistence: Vec<String> = persistence.iter().map(|&a| a.to_owned()).collect();
        for _ in 0..10 {
            if let Some(server) = RedisServer::try_start(free_port(), &persistence) {
                return server;
            }
        }
        panic!("could not start redis-server on a free port");
    }

    /// Starts a server on `port`, or `None` if it exits (the port is taken).
    fn try_start(port: u16, persistence: &[String]) -> Option<RedisServer> {
        let mut child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(persistence)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (tests/run.sh installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if child.try_wait().unwrap().is_some() {
                return None;
            }
            // Ours, not another server that took the port meanwhile.
            if server_pid(port) == Some(child.id()) {
                return Some(RedisServer {
                    child: Some(child),
                    port,
                    persistence: persistence.to_vec(),
                    tls_port: None,
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// The server's URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops (`SIGSTOP`) or continues (`SIGCONT`) the server: stopped, it
    /// accepts connections (the kernel does) but answers nothing, as a
    /// server behind a network partition.
    pub fn pause(&self, paused: bool) {
        let child = self.child.as_ref().expect("a running server");
        let signal = if paused { "-STOP" } else { "-CONT" };
        let sent = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(sent.success());
    }

    /// Kills the server (`SIGKILL`; without persistence its data is gone).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port: empty, or with its data
    /// back if it is persistent.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(mut server) = RedisServer::try_start(self.port, &self.persistence) {
                self.child = server.child.take();
                return;
            }
            assert!(Instant::now() < deadline, "port {} stays taken", self.port);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A loopback port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The `process_id` that the Redis on `port` reports, if one answers.
fn server_pid(port: u16) -> Option<u32> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    stream.write_all(b"INFO server\r\n").ok()?;
    // A bulk string: `$<length>\r\n<text>\r\n`.
    let mut reply = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).ok().filter(|&n| n > 0)?;
        reply.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&reply);
        let (length, body) = text.strip_prefix('$')?.split_once("\r\n")?;
        if body.len() >= length.parse::<usize>().ok()? {
            return body
                .lines()
                .find_map(|line| line.strip_prefix("process_id:"))
                .and_then(|pid| pid.trim().parse().ok());
        }
    }
}

/// The URL of the test command's server, or a server of our own (kept alive
/// by the returned guard). Tests keep apart by key prefix.
///
/// The test command's server must prove to be the process the command
/// started: `TIDEMARK_TEST_REDIS_PID` is its pid, and the server on the URL's
/// port must report that `process_id`.
pub fn shared() -> (String, Option<RedisServer>) {
    match std::env::var("TIDEMARK_TEST_REDIS") {
        Ok(url) if !url.is_empty() => {
            let port = url
                .strip_prefix("redis://127.0.0.1:")
                .and_then(|rest| rest.trim_end_matches('/').parse().ok())
                .unwrap_or_else(|| {
                    panic!("TIDEMARK_TEST_REDIS={url:?}: not redis://127.0.0.1:PORT/")
                });
            let pid = std::env::var("TIDEMARK_TEST_REDIS_PID")
                .ok()
                .and_then(|pid| pid.parse().ok())
                .expect("TIDEMARK_TEST_REDIS_PID names the server's pid");
            assert_eq!(
                server_pid(port),
                Some(pid),
                "the Redis on port {port} is not the one the test command started"
            );
            (url, None)
        }
        _ => {
            let server = RedisServer::start();
            (server.url(), Some(server))
        }
    }
}

/// A key prefix no other test or run uses.
pub fn unique_prefix(test: &str) -> String {
    format!(
        "tidemark-test:{test}:{}:{:x}:",
        std::process::id(),
        tidemark_core::random_seed()
    )
}
