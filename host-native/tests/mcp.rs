//! `tidemark mcp` against a small MCP Streamable HTTP server on loopback
//! (std only, one thread per connection): the state it leaves is private,
//! and its stderr never holds the session id or a header value whole.
//! The SDK's own server is used in `www/tests/mcp-native.test.mjs`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_tidemark");
/// The session the server gives: long enough that a prefix is not all of it.
const SESSION: &str = "3f2a9c1e-7b4d-4e8a-9f00-5ec2e7-session";
/// What stderr may show of it.
const PREFIX: &str = "3f2a9c1e…";
/// A credential passed with `-H`.
const TOKEN: &str = "Bearer tok-5up3r-s3cr3t-value";

/// The server's behaviour, switchable while it runs.
#[derive(Default)]
struct Behaviour {
    /// The `tools/call` stream stays open after its progress event (until
    /// the client goes away) instead of breaking off.
    hold: AtomicBool,
    /// A resume (`GET`) is answered 404: the session is gone.
    gone: AtomicBool,
    /// Every request as `METHOD session-header`, for the checks.
    seen: Mutex<Vec<String>>,
}

/// The server: `initialize` gives [`SESSION`]; `tools/call` answers with an
/// SSE stream (a priming event `1`, a progress notification `2`) that
/// breaks off or is held; a `GET` with `Last-Event-ID: 2` gets the result as
/// event `3`; `DELETE` ends the session.
struct McpServer {
    url: String,
    behaviour: Arc<Behaviour>,
}

impl McpServer {
    fn start() -> McpServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/mcp", listener.local_addr().unwrap());
        let behaviour = Arc::new(Behaviour::default());
        let shared = behaviour.clone();
        std::thread::spawn(move || {
            for socket in listener.incoming() {
                let Ok(socket) = socket else { continue };
                let behaviour = shared.clone();
                std::thread::spawn(move || serve(socket, &behaviour));
            }
        });
        McpServer { url, behaviour }
    }
}

/// One request and its answer; every answer closes the connection.
fn serve(socket: TcpStream, behaviour: &Behaviour) {
    let mut reader = BufReader::new(socket.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let method = line.split(' ').next().unwrap_or_default().to_owned();
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
        }
    }
    let length = headers
        .get("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let body = String::from_utf8_lossy(&body).into_owned();
    let session = headers.get("mcp-session-id").cloned().unwrap_or_default();
    behaviour
        .seen
        .lock()
        .unwrap()
        .push(format!("{method} {session}"));
    let mut out = socket;
    let sse_head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                    cache-control: no-cache\r\nconnection: close\r\n\r\n";
    let result = r#"{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"done"}]}}"#;
    match method.as_str() {
        "POST" if body.contains(r#""method":"initialize""#) => {
            let answer = r#"{"jsonrpc":"2.0","id":0,"result":{"protocolVersion":"2025-11-25","capabilities":{"tools":{}},"serverInfo":{"name":"test","version":"0"}}}"#;
            let _ = write!(
                out,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nmcp-session-id: {SESSION}\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n{answer}",
                answer.len()
            );
        }
        "POST" if body.contains(r#""method":"tools/call""#) => {
            let progress = r#"{"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":1,"progress":1}}"#;
            let _ = write!(
                out,
                "{sse_head}retry: 50\nid: 1\ndata: \n\nid: 2\ndata: {progress}\n\n"
            );
            let _ = out.flush();
            // Held: open until the client is gone (a write fails).
            while behaviour.hold.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(50));
                if out.write_all(b": keep-alive\n\n").is_err() {
                    break;
                }
            }
        }
        "POST" | "DELETE" => {
            let _ = write!(
                out,
                "HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            );
        }
        "GET" if behaviour.gone.load(Ordering::SeqCst) || session != SESSION => {
            let _ = write!(
                out,
                "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            );
        }
        "GET" if headers.get("last-event-id").map(String::as_str) == Some("2") => {
            let _ = write!(out, "{sse_head}id: 3\ndata: {result}\n\n");
        }
        _ => {
            let _ = write!(
                out,
                "HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            );
        }
    }
}

fn mcp_command(url: &str, state: &Path) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(["mcp", url, "--tool", "progress", "-H"])
        .arg(format!("Authorization: {TOKEN}"))
        .arg("--state")
        .arg(state);
    command
}

/// Asserts that `stderr` names the session by its prefix only and never
/// shows the credential.
fn assert_redacted(stderr: &str) {
    assert!(
        !stderr.contains(SESSION),
        "the full session id is on stderr:\n{stderr}"
    );
    assert!(
        !stderr.contains(&SESSION[..12]),
        "more than a prefix of the session id is on stderr:\n{stderr}"
    );
    assert!(
        !stderr.contains("s3cr3t"),
        "a header value on stderr:\n{stderr}"
    );
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Every directory under `dir` (itself included) and every file in them,
/// with their modes.
fn tree(dir: &Path) -> Vec<(PathBuf, u32)> {
    let mut all = vec![(dir.to_path_buf(), mode(dir))];
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            all.extend(tree(&path));
        } else {
            all.push((path.clone(), mode(&path)));
        }
    }
    all
}

/// Asserts that `dir` and its subdirectories are 0700, its files 0600, and
/// that there are files.
fn assert_private(dir: &Path) -> Vec<PathBuf> {
    let tree = tree(dir);
    let mut files = Vec::new();
    for (path, mode) in tree {
        let want = if path.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode, want, "{} is {mode:04o}", path.display());
        if !path.is_dir() {
            files.push(path);
        }
    }
    assert!(!files.is_empty(), "no files in {}", dir.display());
    files
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_call_resumed_in_process_leaves_private_state_and_shows_a_session_prefix() {
    let server = McpServer::start();
    let root = tempfile::tempdir().unwrap();
    let state = root.path().join("new/state");
    let output = mcp_command(&server.url, &state).output().unwrap();
    let stderr = stderr_of(&output);
    assert!(output.status.success(), "{stderr}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 2, "progress and result: {stdout}");
    assert!(stdout.contains(r#""text":"done""#), "{stdout}");
    // It broke off after the progress event and was resumed in the session.
    assert!(
        stderr.contains("Last-Event-ID 2"),
        "a resume is reported: {stderr}"
    );
    assert!(
        stderr.contains(&format!("calling progress in session {PREFIX}")),
        "{stderr}"
    );
    assert_redacted(&stderr);
    let seen = server.behaviour.seen.lock().unwrap().clone();
    assert!(seen.contains(&format!("GET {SESSION}")), "{seen:?}");
    // The new directory and its parent are 0700, the cursor file 0600.
    assert_eq!(mode(&root.path().join("new")), 0o700);
    let files = assert_private(&state);
    assert!(
        files.iter().any(|f| f.ends_with("cursors.tdm")),
        "{files:?}"
    );
}

/// Runs the held call until its progress event is printed, then stops it
/// with SIGINT (which saves the cursor); returns its stderr.
fn run_until_stopped(server: &McpServer, state: &Path) -> String {
    server.behaviour.hold.store(true, Ordering::SeqCst);
    let mut child: Child = mcp_command(&server.url, state)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert!(line.contains("notifications/progress"), "{line:?}");
    // SIGINT commits the delivered events and writes the cursor.
    std::thread::sleep(Duration::from_millis(100));
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let output = child.wait_with_output().unwrap();
    server.behaviour.hold.store(false, Ordering::SeqCst);
    assert_eq!(
        output.status.code(),
        Some(1),
        "stopped: the call is unfinished"
    );
    stderr_of(&output)
}

#[test]
fn an_unfinished_call_is_private_on_disk_and_resumes_without_showing_its_session() {
    let server = McpServer::start();
    let root = tempfile::tempdir().unwrap();
    let state = root.path().join("state");

    let stopped = run_until_stopped(&server, &state);
    assert!(
        stopped.contains("run the same command to resume"),
        "{stopped}"
    );
    assert_redacted(&stopped);
    // The record of the call (it holds the session id) and the cursor.
    let files = assert_private(&state);
    let record = files
        .iter()
        .find(|f| f.extension().is_some_and(|e| e == "json"))
        .unwrap_or_else(|| panic!("no record of the call: {files:?}"));
    let text = std::fs::read_to_string(record).unwrap();
    assert!(
        text.contains(SESSION),
        "the record keeps the session: {text}"
    );

    // The server lost the session: the error names it by its prefix.
    server.behaviour.gone.store(true, Ordering::SeqCst);
    let gone = mcp_command(&server.url, &state).output().unwrap();
    let stderr = stderr_of(&gone);
    assert_eq!(gone.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("no longer knows session {PREFIX}")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "resuming the call of progress in session {PREFIX}"
        )),
        "{stderr}"
    );
    assert_redacted(&stderr);

    // It is back: the same command resumes the call and gets its result.
    server.behaviour.gone.store(false, Ordering::SeqCst);
    let resumed = mcp_command(&server.url, &state).output().unwrap();
    let stderr = stderr_of(&resumed);
    assert!(resumed.status.success(), "{stderr}");
    let stdout = String::from_utf8(resumed.stdout).unwrap();
    assert!(stdout.contains(r#""text":"done""#), "{stdout}");
    assert!(
        stderr.contains(&format!(
            "resuming the call of progress in session {PREFIX} from Last-Event-ID 2"
        )),
        "{stderr}"
    );
    assert_redacted(&stderr);
    let posts = server
        .behaviour
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.starts_with("POST"))
        .count();
    assert_eq!(posts, 3, "initialize, initialized, one tools/call");
}

#[test]
fn an_existing_state_dir_open_to_others_is_warned_about_and_still_used() {
    let server = McpServer::start();
    let root = tempfile::tempdir().unwrap();
    let state = root.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let output = mcp_command(&server.url, &state).output().unwrap();
    let stderr = stderr_of(&output);
    assert!(output.status.success(), "{stderr}");
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains("chmod 700")).collect();
    assert_eq!(warnings.len(), 1, "one warning: {stderr}");
    assert!(warnings[0].contains("mode 0755"), "{stderr}");
    assert!(
        warnings[0].contains(&format!("chmod 700 {}", state.display())),
        "{stderr}"
    );
    assert_eq!(mode(&state), 0o755, "its mode is left to its owner");
    assert_eq!(mode(&state.join("cursors.tdm")), 0o600);
    assert_redacted(&stderr);
}

#[test]
fn a_malformed_header_is_refused_without_being_repeated() {
    let output = Command::new(BIN)
        .args(["mcp", "http://127.0.0.1:1/mcp", "--tool", "t", "-H", TOKEN])
        .output()
        .unwrap();
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("expected 'Name: value'"), "{stderr}");
    assert!(!stderr.contains("s3cr3t"), "{stderr}");
}
