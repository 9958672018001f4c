//! The `tidemark` binary end to end on loopback: `serve` with dropped
//! connections, `follow` across the drops and across a restart.

mod support {
    pub mod serve;
}

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use support::serve::Server;

const BIN: &str = env!("CARGO_BIN_EXE_tidemark");

/// Starts `tidemark follow` on `url` with the state in `state`.
fn spawn_follow(url: &str, state: &std::path::Path, stdout: Stdio) -> Child {
    Command::new(BIN)
        .args(["follow", url])
        .arg("--state")
        .arg(state)
        .stdout(stdout)
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Runs `tidemark follow` to completion; returns the ids it printed.
fn follow(url: &str, state: &std::path::Path, max: u64) -> Vec<u64> {
    let output = Command::new(BIN)
        .args(["follow", url, "--max-events", &max.to_string()])
        .arg("--state")
        .arg(state)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(value["event"], "message");
            assert_eq!(value["id"], value["data"]);
            value["data"].as_str().unwrap().parse().unwrap()
        })
        .collect()
}

#[test]
fn follow_resumes_across_drops_and_restarts_exactly_once() {
    let server = Server::start(&[
        "--count",
        "150",
        "--interval-ms",
        "1",
        "--drop-every",
        "13",
        "--retry-ms",
        "5",
    ]);
    let url = server.events_url();
    let state = tempfile::tempdir().unwrap();
    let first = follow(&url, state.path(), 60);
    let second = follow(&url, state.path(), 90);
    let all: Vec<u64> = first.into_iter().chain(second).collect();
    assert_eq!(all, (1..=150).collect::<Vec<_>>());
}

#[test]
fn usage_errors_exit_2_and_failures_exit_1() {
    let usage = Command::new(BIN).arg("follow").output().unwrap();
    assert_eq!(usage.status.code(), Some(2));
    let header = Command::new(BIN)
        .args(["follow", "http://127.0.0.1:1/", "-H", "no colon"])
        .output()
        .unwrap();
    assert_eq!(header.status.code(), Some(2));
    let window_without_redis = Command::new(BIN)
        .args(["follow", "http://127.0.0.1:1/", "--redis-window"])
        .output()
        .unwrap();
    assert_eq!(window_without_redis.status.code(), Some(2));

    let server = Server::start(&[]);
    let state = tempfile::tempdir().unwrap();
    let missing = Command::new(BIN)
        .args(["follow", &format!("http://{}/nowhere", server.addr)])
        .arg("--state")
        .arg(state.path())
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.contains("404"), "{stderr}");
}

#[test]
fn sigint_saves_the_cursor_so_a_restart_repeats_nothing() {
    let server = Server::start(&["--count", "400", "--interval-ms", "2"]);
    let url = server.events_url();
    let state = tempfile::tempdir().unwrap();
    let mut child = spawn_follow(&url, state.path(), Stdio::piped());
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut first: Vec<u64> = Vec::new();
    let parse = |line: String| -> u64 {
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        value["data"].as_str().unwrap().parse().unwrap()
    };
    while first.len() < 20 {
        first.push(parse(lines.next().unwrap().unwrap()));
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    first.extend(lines.map(|line| parse(line.unwrap())));
    assert!(child.wait().unwrap().success(), "SIGINT is a clean exit");
    let rest = 400 - first.len() as u64;
    let second = follow(&url, state.path(), rest);
    let all: Vec<u64> = first.into_iter().chain(second).collect();
    assert_eq!(all, (1..=400).collect::<Vec<_>>());
}

/// Reads JSON lines from a `follow` process until `stop` says so or the
/// output ends; returns the ids.
fn read_ids(
    lines: &mut impl Iterator<Item = std::io::Result<String>>,
    mut stop: impl FnMut(&[u64]) -> bool,
) -> Vec<u64> {
    let mut ids = Vec::new();
    while !stop(&ids) {
        let Some(line) = lines.next() else { break };
        let value: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        ids.push(value["data"].as_str().unwrap().parse().unwrap());
    }
    ids
}

fn stored_cursor(state: &std::path::Path, url: &str) -> u64 {
    use tidemark_core::Store;
    let store = tidemark::FileStore::open(state).unwrap();
    let key = tidemark_core::StreamKey::new(url, "default");
    smol::block_on(store.load(&key))
        .unwrap()
        .map_or(0, |c| c.last_event_id.parse().unwrap())
}

#[test]
fn kill_9_repeats_only_what_was_not_flushed_and_loses_nothing() {
    // A server that replays 30 events before Last-Event-ID on every
    // connection: the stored window drops those a restart would repeat.
    let server = Server::rewinding(500, 2);
    let url = server.events_url();
    let state = tempfile::tempdir().unwrap();
    let mut expected_start = 1;
    let mut printed_up_to = 0;
    let mut seen = Vec::new();
    for round in 0..4 {
        let mut child = spawn_follow(&url, state.path(), Stdio::piped());
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let last_round = round == 3;
        let mut ids = read_ids(&mut lines, |ids| {
            ids.last() == Some(&500) || (!last_round && ids.len() >= 60 + 25 * round)
        });
        if last_round {
            Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status()
                .unwrap();
        } else {
            child.kill().unwrap(); // SIGKILL: no chance to flush
        }
        child.wait().unwrap();
        ids.extend(read_ids(&mut lines, |_| false));
        // The window is written before the cursor: a kill between the two
        // leaves it ahead, which drops more of the replay, never an event
        // that was not printed.
        let first = *ids.first().unwrap();
        assert!(
            (expected_start..=printed_up_to + 1).contains(&first),
            "round {round} starts at {first}: not after the stored cursor \
             ({expected_start}) and at most one past what was printed ({printed_up_to})"
        );
        assert!(
            ids.windows(2).all(|w| w[1] == w[0] + 1),
            "round {round}: no gap and no repeat inside a run"
        );
        let stored = stored_cursor(state.path(), &url);
        let last = *ids.last().unwrap();
        assert!(stored <= last, "the cursor never passes what was printed");
        // At 2 ms per event, a 250 ms flush interval leaves well under 250
        // events unflushed; a crash repeats only those.
        assert!(
            last - stored < 250,
            "round {round}: {} events unflushed",
            last - stored
        );
        expected_start = stored + 1;
        printed_up_to = last;
        seen.extend(ids);
    }
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen, (1..=500).collect::<Vec<_>>());
    assert_eq!(
        stored_cursor(state.path(), &url),
        500,
        "SIGINT saved the last cursor"
    );
}

#[test]
fn sigterm_restarts_against_a_rewinding_server_repeat_nothing() {
    // Every connection (a drop's or a restart's) replays 30 events before
    // Last-Event-ID; the window kept in the state directory drops them.
    let server = Server::rewinding(1200, 1);
    let url = server.events_url();
    let state = tempfile::tempdir().unwrap();
    let mut all = Vec::new();
    for round in 0..6 {
        let mut child = spawn_follow(&url, state.path(), Stdio::piped());
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let last_round = round == 5;
        let mut ids = read_ids(&mut lines, |ids| {
            ids.last() == Some(&1200) || (!last_round && ids.len() >= 100 + 37 * round)
        });
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        ids.extend(read_ids(&mut lines, |_| false));
        assert!(child.wait().unwrap().success(), "SIGTERM is a clean exit");
        all.extend(ids);
    }
    assert_eq!(all, (1..=1200).collect::<Vec<_>>(), "every id exactly once");
}

#[test]
fn demo_delivers_everything_once_and_says_so() {
    let output = Command::new(BIN)
        .args(["demo", "--events", "3000"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.contains("expected 3000, received 3000, lost 0, duplicated 0"),
        "{stdout}"
    );
}

#[test]
fn repeated_kill_9_never_leaves_a_torn_state_file() {
    let server = Server::start(&["--interval-ms", "0", "--retry-ms", "5"]);
    let url = server.events_url();
    let state = tempfile::tempdir().unwrap();
    let mut rng = tidemark_core::Rng::new(7);
    let mut last = 0;
    for _ in 0..15 {
        let mut child = spawn_follow(&url, state.path(), Stdio::null());
        std::thread::sleep(std::time::Duration::from_millis(100 + rng.up_to(400)));
        child.kill().unwrap();
        child.wait().unwrap();
        // Whatever instant the kill hit, the state is whole and never older.
        let stored = stored_cursor(state.path(), &url);
        assert!(
            stored >= last,
            "the cursor went back from {last} to {stored}"
        );
        last = stored;
    }
    assert!(last > 0, "something was persisted");
}

#[test]
fn serve_www_serves_files_and_nothing_outside() {
    let www = tempfile::tempdir().unwrap();
    std::fs::write(www.path().join("index.html"), "<p>tidemark</p>").unwrap();
    let dir = www.path().to_str().unwrap().to_owned();
    let server = Server::start(&["--www", &dir]);
    let get = |path: &str| -> String {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&server.addr).unwrap();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    };
    let index = get("/");
    assert!(index.starts_with("HTTP/1.1 200"), "{index}");
    assert!(index.contains("text/html"), "{index}");
    assert!(index.ends_with("<p>tidemark</p>"), "{index}");
    assert!(get("/../../etc/passwd").starts_with("HTTP/1.1 404"));
    assert!(get("/missing.js").starts_with("HTTP/1.1 404"));
}

#[test]
fn an_event_that_cannot_be_written_is_printed_by_the_next_run() {
    // One event more than the second run asks for, so that a run that
    // skipped event 1 prints event 21 instead of waiting for it.
    let server = Server::start(&["--count", "21", "--interval-ms", "0"]);
    let url = server.events_url();
    let state = tempfile::tempdir().unwrap();
    // /dev/full fails every write with ENOSPC: event 1 is never printed.
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let status = spawn_follow(&url, state.path(), full.into())
        .wait()
        .unwrap();
    assert_eq!(status.code(), Some(1));
    assert_eq!(follow(&url, state.path(), 20), (1..=20).collect::<Vec<_>>());
}

/// Lines of a child's pipe, read on a thread, with a timeout per wait.
struct Lines(std::sync::mpsc::Receiver<String>);

impl Lines {
    fn of(pipe: impl std::io::Read + Send + 'static) -> Lines {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Lines(rx)
    }

    /// The next line, failing the test after 20 s without one.
    fn next(&self, what: &str) -> String {
        self.0
            .recv_timeout(std::time::Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("no line: waiting for {what}"))
    }

    /// The first line containing `needle`, with every line before it.
    fn until(&self, needle: &str) -> (String, Vec<String>) {
        let mut before = Vec::new();
        loop {
            let line = self.next(needle);
            if line.contains(needle) {
                return (line, before);
            }
            before.push(line);
        }
    }
}

#[test]
fn follow_says_at_once_that_the_connection_is_lost_and_when_it_is_back() {
    let args = [
        "--count",
        "100000",
        "--interval-ms",
        "5",
        "--retry-ms",
        "50",
    ];
    let server = Server::start(&args);
    let addr = server.addr.clone();
    let state = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args(["follow", &server.events_url()])
        .arg("--state")
        .arg(state.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = Lines::of(child.stdout.take().unwrap());
    let stderr = Lines::of(child.stderr.take().unwrap());
    let id = |line: String| -> u64 {
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        value["id"].as_str().unwrap().parse().unwrap()
    };
    let mut ids: Vec<u64> = (0..20).map(|_| id(stdout.next("an event"))).collect();

    drop(server);
    // While the server is away: the loss, with its reason and the retry.
    let (lost, _) = stderr.until("connection lost");
    assert!(lost.contains("reconnecting in"), "{lost}");
    assert!(lost.contains("(attempt 1)"), "{lost}");
    let (refused, _) = stderr.until("could not connect");
    assert!(refused.contains("(attempt 2)"), "{refused}");
    // Every event the follower had printed arrived before the loss.
    while let Ok(line) = stdout.0.try_recv() {
        ids.push(id(line));
    }
    let last = *ids.last().unwrap();

    let _back = Server::start_at(&addr, &args);
    let (back, _) = stderr.until("connection is back");
    assert!(
        back.ends_with(&format!("resumed from Last-Event-ID {last}")),
        "{back}"
    );
    while ids.len() < last as usize + 20 {
        ids.push(id(stdout.next("an event after the return")));
    }
    assert_eq!(ids, (1..=ids.len() as u64).collect::<Vec<_>>());
    let _ = child.kill();
    let _ = child.wait();
}

fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn a_new_state_dir_is_0700_and_its_cursor_file_0600() {
    let server = Server::start(&["--count", "10", "--interval-ms", "1"]);
    let root = tempfile::tempdir().unwrap();
    let state = root.path().join("parent/state");
    assert_eq!(
        follow(&server.events_url(), &state, 10),
        (1..=10).collect::<Vec<_>>()
    );
    assert_eq!(mode(&root.path().join("parent")), 0o700);
    assert_eq!(mode(&state), 0o700);
    let names: Vec<_> = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(!names.is_empty());
    for path in names {
        assert_eq!(mode(&path), 0o600, "{}", path.display());
    }
}

#[test]
fn an_existing_state_dir_open_to_others_gets_one_warning_and_still_works() {
    use std::os::unix::fs::PermissionsExt;
    let server = Server::start(&["--count", "10", "--interval-ms", "1"]);
    let state = tempfile::tempdir().unwrap();
    std::fs::set_permissions(state.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let output = Command::new(BIN)
        .args(["follow", &server.events_url(), "--max-events", "10"])
        .arg("--state")
        .arg(state.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&output.stdout).lines().count(), 10);
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains("warning")).collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(warnings[0].contains("mode 0755"), "{stderr}");
    let fix = format!("chmod 700 {}", state.path().display());
    assert!(warnings[0].contains(&fix), "{stderr}");
    assert_eq!(mode(state.path()), 0o755, "the mode is left to its owner");
    assert_eq!(mode(&state.path().join("cursors.tdm")), 0o600);
    // A private directory gets no warning.
    std::fs::set_permissions(state.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let output = Command::new(BIN)
        .args(["follow", &server.events_url(), "--max-events", "1"])
        .arg("--state")
        .arg(state.path())
        .arg("--stream")
        .arg("other")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
}
