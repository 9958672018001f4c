//! `tidemark mcp`: one MCP tool call over Streamable HTTP that survives
//! dropped streams and restarts of this process.
//!
//! The Streamable HTTP transport (MCP 2025-03-26 through 2025-11-25) answers
//! a `tools/call` POST with an SSE stream: the call's progress notifications
//! and, last, its result. A server with an event store gives every event of
//! that stream an id (the first one a priming event with empty data) and,
//! when the stream breaks, replays the events after `Last-Event-ID` to a
//! `GET` of the endpoint carrying the session id. That is resumption in the
//! spec, and this module drives it with the core's [`ResumableStream`]:
//!
//! 1. A new call: `initialize` (a JSON or SSE answer; the `Mcp-Session-Id`
//!    header is the session), `notifications/initialized`, then a record of
//!    the call in the state directory (`mcp/<hash>.json`, written durably),
//!    then the `tools/call` POST, whose SSE answer is the call's stream.
//! 2. The stream breaks: the core reconnects after the server's `retry:`
//!    with a `GET` carrying `Mcp-Session-Id`, `MCP-Protocol-Version` and the
//!    cursor as `Last-Event-ID`, and drops replayed events it has already
//!    delivered.
//! 3. This process is killed: the next run with the same URL and `--name`
//!    finds the record and the stored cursor and resumes with a `GET`, in the
//!    same session, without calling the tool again. Events delivered after
//!    the last cursor write (at most one flush interval, 250 ms) are printed
//!    again; nothing is lost.
//! 4. The result arrives: it is printed, the record and the cursor are
//!    removed, and the session is ended with a `DELETE`.
//!
//! Each message is printed as one JSON line, `{"id": <event id>, "message":
//! <JSON-RPC message>}`, before the cursor moves past it. Requests from the
//! server on the stream are answered: `ping` with an empty result, anything
//! else with "method not found" (this client offers no sampling, roots or
//! elicitation).
//!
//! The call is posted at most once: once the POST may have reached the
//! server, only resuming is left (only an explicit 429 or 503 refusal lets
//! the reconnect policy post it again). So a call that cannot be resumed
//! fails with a clear [`McpError`] rather than running the tool twice: the
//! session is gone on the server (404), or the stream carried no event id
//! before it broke or this process stopped (a server without an event store,
//! a server on 2025-03-26 or 2025-06-18 cut before its first message, which
//! sends no priming event, or a kill in the instant after the POST).
//! `--new` then starts the call again. A 409 to a resume (the SDK's answer
//! while it still holds the previous connection) is retried.

use crate::file_store::{io_error, replace_durably};
use crate::follow::{Persistence, next_or_stop, stop_signals};
use crate::{HttpBody, HttpConnector, HttpResponse, NativeStore};
use futures::StreamExt;
use hyper::Method;
use hyper::body::Bytes;
use serde_json::{Value, json};
use std::cell::Cell;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;
use tidemark_core::reconnect::check_response;
use tidemark_core::sse::{Item, Limits, Parser};
use tidemark_core::{
    ConnectRequest, Connector, Failure, GiveUp, Registry, RegistryError, ResumableStream,
    StoreError, StreamConfig, StreamError, StreamKey,
};

/// The protocol revision this client asks for in `initialize`. Servers may
/// answer with an older one (2025-03-26 or later resume the same way); the
/// answer is sent back as `MCP-Protocol-Version` on every later request.
pub const PROTOCOL_VERSION: &str = "2025-11-25";

/// The revisions whose Streamable HTTP streams resume with `Last-Event-ID`;
/// a server answering `initialize` with another is refused.
pub const RESUMABLE_VERSIONS: [&str; 3] = ["2025-03-26", "2025-06-18", "2025-11-25"];

/// The JSON-RPC id of `initialize`.
const INITIALIZE_ID: u64 = 0;
/// The JSON-RPC id of the `tools/call` request (ids are per session).
const CALL_ID: u64 = 1;
/// The largest JSON answer read whole (`initialize`, a JSON `tools/call`).
const MAX_JSON: usize = 16 << 20;

/// Which tool to call, on which server, and where to keep the call's state.
#[derive(Clone, Debug)]
pub struct McpOptions {
    /// The MCP endpoint (Streamable HTTP), e.g. `http://127.0.0.1:3000/mcp`.
    pub url: String,
    /// The state directory (cursors, and the records of unfinished calls).
    pub state: PathBuf,
    /// The call's name: a run with the same URL and name resumes the
    /// unfinished call instead of starting one.
    pub name: String,
    /// The tool to call.
    pub tool: String,
    /// The tool's arguments (a JSON object).
    pub arguments: Value,
    /// Extra request headers (authorization, ...), sent with every request.
    pub headers: Vec<(String, String)>,
    /// Forget an unfinished call of this name and start a new one.
    pub new: bool,
}

/// Why a call stopped without its result.
#[derive(Debug)]
pub enum McpError {
    /// The state directory could not be read or written.
    Store(StoreError),
    /// The call's stream could not be opened in the registry.
    Registry(RegistryError),
    /// `initialize` or `notifications/initialized` failed.
    Handshake(String),
    /// An unfinished call of this name has another tool or arguments.
    Conflict {
        /// The record of the unfinished call.
        record: PathBuf,
    },
    /// The server no longer knows the session: the call's remaining events
    /// are gone.
    SessionGone {
        /// The lost session.
        session: String,
    },
    /// The stream carried no event id before it broke or this process
    /// stopped, so there is nothing to resume from: posting the call again
    /// could run the tool twice.
    Unresumable,
    /// The stream gave up or broke its limits.
    Stream(StreamError),
    /// Stopped by SIGINT or SIGTERM; the call can be resumed.
    Stopped,
    /// Writing the output failed.
    Output(io::Error),
}

impl fmt::Display for McpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            McpError::Store(e) => write!(f, "state: {e}"),
            McpError::Registry(e) => write!(f, "{e}"),
            McpError::Handshake(e) => write!(f, "initializing the session: {e}"),
            McpError::Conflict { record } => write!(
                f,
                "an unfinished call of this name calls another tool or other arguments \
                 ({}); run it with the same ones to resume it, or pass --new to forget it",
                record.display()
            ),
            McpError::SessionGone { session } => write!(
                f,
                "the server no longer knows session {session}: the call cannot be resumed \
                 (pass --new to start it again)"
            ),
            McpError::Unresumable => f.write_str(
                "the call's stream carried no event id before it broke or this client stopped, \
                 so there is nothing to resume from (a server without an event store sends \
                 none); pass --new to call the tool again",
            ),
            McpError::Stream(e) => write!(f, "{e}"),
            McpError::Stopped => f.write_str("stopped; run the same command to resume the call"),
            McpError::Output(e) => write!(f, "writing output: {e}"),
        }
    }
}

impl std::error::Error for McpError {}

/// The record of an unfinished call, kept in the state directory until the
/// result arrives.
#[derive(Clone, Debug, PartialEq)]
struct Record {
    url: String,
    name: String,
    tool: String,
    arguments: Value,
    session: Option<String>,
    protocol_version: String,
}

impl Record {
    fn to_json(&self) -> Value {
        json!({
            "url": self.url,
            "name": self.name,
            "tool": self.tool,
            "arguments": self.arguments,
            "session": self.session,
            "protocolVersion": self.protocol_version,
        })
    }

    fn from_json(value: &Value) -> Option<Record> {
        let text = |key: &str| value.get(key)?.as_str().map(str::to_owned);
        Some(Record {
            url: text("url")?,
            name: text("name")?,
            tool: text("tool")?,
            arguments: value.get("arguments")?.clone(),
            session: text("session"),
            protocol_version: text("protocolVersion")?,
        })
    }

    /// The headers of every request after `initialize`.
    fn session_headers(&self, extra: &[(String, String)]) -> Vec<(String, String)> {
        let mut headers = Vec::with_capacity(extra.len() + 2);
        if let Some(session) = &self.session {
            headers.push(("mcp-session-id".to_owned(), session.clone()));
        }
        headers.push((
            "mcp-protocol-version".to_owned(),
            self.protocol_version.clone(),
        ));
        headers.extend_from_slice(extra);
        headers
    }

    fn stream_key(&self) -> StreamKey {
        StreamKey::new(
            &self.url,
            format!(
                "mcp {} {} {}",
                self.name,
                self.session.as_deref().unwrap_or("-"),
                self.tool
            ),
        )
    }
}

/// Where the record of the call named `name` on `url` lives: `mcp/` in the
/// state directory, under a stable 64-bit FNV-1a hash of both.
fn record_path(state: &Path, url: &str, name: &str) -> PathBuf {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in url.bytes().chain([0]).chain(name.bytes()) {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    state.join("mcp").join(format!("{hash:016x}.json"))
}

fn read_record(path: &Path) -> Result<Option<Record>, StoreError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(path, &e)),
    };
    serde_json::from_slice(&bytes)
        .ok()
        .as_ref()
        .and_then(Record::from_json)
        .map(Some)
        .ok_or_else(|| StoreError::Corrupt {
            what: path.display().to_string(),
            detail: "not the record of an MCP call".into(),
        })
}

fn write_record(path: &Path, record: &Record) -> Result<(), StoreError> {
    let dir = path.parent().expect("a record path has a directory");
    fs::create_dir_all(dir).map_err(|e| io_error(dir, &e))?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .expect("record names are ASCII");
    let bytes = serde_json::to_vec_pretty(&record.to_json()).expect("JSON values serialize");
    replace_durably(dir, name, &bytes)
}

fn remove_record(path: &Path) -> Result<(), StoreError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_error(path, &e)),
        _ => Ok(()),
    }
}

/// The headers of a JSON-RPC POST.
fn post_headers(session: &[(String, String)]) -> Vec<(String, String)> {
    let mut headers = vec![
        (
            "accept".to_owned(),
            "application/json, text/event-stream".to_owned(),
        ),
        ("content-type".to_owned(), "application/json".to_owned()),
    ];
    headers.extend_from_slice(session);
    headers
}

fn is_event_stream(response: &HttpResponse) -> bool {
    check_response(200, None, response.header("content-type")).is_ok()
}

/// Reads the answer to the request `id` from a POST's response: a JSON body,
/// or the first matching message of an SSE body.
async fn read_answer(response: HttpResponse, id: u64) -> Result<Value, String> {
    if response.status != 200 {
        return Err(format!("HTTP {}", response.status));
    }
    let answers = |message: &Value| message.get("id") == Some(&json!(id));
    if !is_event_stream(&response) {
        let bytes = response.bytes(MAX_JSON).await.map_err(|e| e.to_string())?;
        let message: Value =
            serde_json::from_slice(&bytes).map_err(|e| format!("the answer is not JSON: {e}"))?;
        return match message {
            Value::Array(batch) => batch.into_iter().find(answers),
            message => Some(message).filter(answers),
        }
        .ok_or_else(|| format!("the answer does not answer request {id}"));
    }
    let mut parser = Parser::new(Limits::default());
    let mut body = response.body;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        parser.feed(&chunk).map_err(|e| e.to_string())?;
        while let Some(item) = parser.next_item() {
            if let Item::Event(event) = item {
                let message = serde_json::from_str::<Value>(&event.data).ok();
                if let Some(message) = message.filter(answers) {
                    return Ok(message);
                }
            }
        }
    }
    Err(format!(
        "the stream ended without the answer to request {id}"
    ))
}

/// `initialize` and `notifications/initialized`: a new session.
async fn initialize(http: &HttpConnector, options: &McpOptions) -> Result<Record, McpError> {
    let request = json!({
        "jsonrpc": "2.0",
        "id": INITIALIZE_ID,
        "method": "initialize",
        "params": {
            "protocolVersion": PROTOCOL_VERSION,
            "capabilities": {},
            "clientInfo": { "name": "tidemark", "version": env!("CARGO_PKG_VERSION") },
        },
    });
    let handshake = |e: String| McpError::Handshake(e);
    let response = http
        .request(
            Method::POST,
            &options.url,
            &post_headers(&options.headers),
            Bytes::from(request.to_string()),
        )
        .await
        .map_err(|e| handshake(e.to_string()))?;
    let session = response.header("mcp-session-id").map(str::to_owned);
    let answer = read_answer(response, INITIALIZE_ID)
        .await
        .map_err(handshake)?;
    if let Some(error) = answer.get("error") {
        return Err(handshake(format!("the server refused: {error}")));
    }
    let protocol_version = answer
        .pointer("/result/protocolVersion")
        .and_then(Value::as_str)
        .ok_or_else(|| handshake("the answer has no protocolVersion".into()))?
        .to_owned();
    if !RESUMABLE_VERSIONS.contains(&protocol_version.as_str()) {
        return Err(handshake(format!(
            "the server speaks MCP {protocol_version}; tidemark resumes the streams of {}",
            RESUMABLE_VERSIONS.join(", ")
        )));
    }
    let record = Record {
        url: options.url.clone(),
        name: options.name.clone(),
        tool: options.tool.clone(),
        arguments: options.arguments.clone(),
        session,
        protocol_version,
    };
    let initialized = json!({ "jsonrpc": "2.0", "method": "notifications/initialized" });
    let response = http
        .request(
            Method::POST,
            &options.url,
            &post_headers(&record.session_headers(&options.headers)),
            Bytes::from(initialized.to_string()),
        )
        .await
        .map_err(|e| handshake(e.to_string()))?;
    if !matches!(response.status, 200 | 202) {
        return Err(handshake(format!(
            "notifications/initialized: HTTP {}",
            response.status
        )));
    }
    Ok(record)
}

/// Opens the call's stream: the `tools/call` POST the first time, a `GET`
/// with `Last-Event-ID` after that.
struct CallConnector {
    http: HttpConnector,
    /// The `tools/call` request.
    call: Bytes,
    /// Whether the call may have reached the server (here or in an earlier
    /// run): from then on it is never posted again, only resumed.
    posted: Cell<bool>,
    /// Set when the stream must be resumed but has no event id to resume
    /// from.
    unresumable: Rc<Cell<bool>>,
}

impl Connector for CallConnector {
    type Chunk = Bytes;
    type Body = HttpBody;

    async fn connect(&self, request: ConnectRequest<'_>) -> Result<HttpBody, Failure> {
        if request.last_event_id.is_some() || self.posted.get() {
            if request.last_event_id.is_none() {
                self.unresumable.set(true);
                return Err(Failure::Request(McpError::Unresumable.to_string()));
            }
            return match self.http.connect(request).await {
                // The SDK answers 409 while it still holds the previous
                // connection of the stream (a half-open one): it goes away.
                Err(Failure::Status { code: 409, .. }) => Err(Failure::Network(
                    "409 Conflict: the server still holds the previous connection of the stream"
                        .into(),
                )),
                other => other,
            };
        }
        // At most once: the call may reach the server even when no answer
        // comes back, and posting it again would run the tool twice.
        self.posted.set(true);
        // The head of a JSON answer comes when the tool is done, however
        // long it runs.
        let mut patient = self.http.clone();
        patient.connect_timeout = Duration::MAX;
        let response = patient
            .request(
                Method::POST,
                request.url,
                &post_headers(request.headers),
                self.call.clone(),
            )
            .await?;
        let status = response.status;
        // Refusals of an overloaded server: it did not take the call.
        self.posted.set(!matches!(status, 429 | 503));
        if status == 200 && !is_event_stream(&response) {
            // A JSON answer: the whole result at once, as one event
            // without an id (there is nothing to resume).
            let bytes = response.bytes(MAX_JSON).await?;
            let message: Value = serde_json::from_slice(&bytes).map_err(|e| {
                Failure::Request(format!("the answer to tools/call is not JSON: {e}"))
            })?;
            return Ok(HttpBody::from_bytes(format!("data: {message}\n\n").into()));
        }
        check_response(
            status,
            response.retry_after(),
            response.header("content-type"),
        )?;
        Ok(response.body)
    }
}

/// The answer to a request the server sent on the stream.
fn answer_to(request: &Value) -> Value {
    let id = request.get("id").cloned().unwrap_or(Value::Null);
    match request.get("method").and_then(Value::as_str) {
        Some("ping") => json!({ "jsonrpc": "2.0", "id": id, "result": {} }),
        method => json!({
            "jsonrpc": "2.0",
            "id": id,
            "error": {
                "code": -32601,
                "message": format!("method not found: {}", method.unwrap_or("(none)")),
            },
        }),
    }
}

/// Calls `options.tool`, or resumes the unfinished call of `options.name`,
/// printing every message of the call's stream to `out` as a JSON line.
/// Returns the call's final JSON-RPC message (a result or an error), after
/// removing the call's record and cursor and ending the session.
pub async fn call(options: McpOptions, out: &mut impl Write) -> Result<Value, McpError> {
    let persistence = Persistence::open(&options.state).map_err(McpError::Store)?;
    let outcome = run(&options, &persistence, out).await;
    persistence.close().await;
    outcome
}

async fn run(
    options: &McpOptions,
    persistence: &Persistence,
    out: &mut impl Write,
) -> Result<Value, McpError> {
    let http = HttpConnector::default();
    let path = record_path(&options.state, &options.url, &options.name);
    let registry = &persistence.registry;
    let mut stored = read_record(&path).map_err(McpError::Store)?;
    if let Some(old) = stored.take_if(|_| options.new) {
        eprintln!("tidemark: forgetting the unfinished call of {}", old.tool);
        remove_record(&path).map_err(McpError::Store)?;
        forget(&http, registry, &old, &options.headers).await;
    }
    let resumed = stored.is_some();
    let record = match stored {
        Some(record) if record.tool != options.tool || record.arguments != options.arguments => {
            return Err(McpError::Conflict { record: path });
        }
        Some(record) => record,
        None => {
            let record = initialize(&http, options).await?;
            write_record(&path, &record).map_err(McpError::Store)?;
            record
        }
    };
    let session = record.session.as_deref().unwrap_or("(none)");
    let tracker = registry
        .open(record.stream_key())
        .await
        .map_err(McpError::Registry)?;
    match tracker.last_event_id() {
        Some(id) if resumed => eprintln!(
            "tidemark: resuming the call of {} in session {session} from Last-Event-ID {id}",
            record.tool
        ),
        None if resumed => return Err(McpError::Unresumable),
        _ => eprintln!("tidemark: calling {} in session {session}", record.tool),
    }
    let session_headers = record.session_headers(&options.headers);
    let call = json!({
        "jsonrpc": "2.0",
        "id": CALL_ID,
        "method": "tools/call",
        "params": {
            "name": record.tool,
            "arguments": record.arguments,
            "_meta": { "progressToken": CALL_ID },
        },
    });
    let unresumable = Rc::new(Cell::new(false));
    let connector = CallConnector {
        http: http.clone(),
        call: Bytes::from(call.to_string()),
        posted: Cell::new(resumed),
        unresumable: unresumable.clone(),
    };
    let config = StreamConfig {
        headers: session_headers.clone(),
        ..StreamConfig::default()
    };
    let mut stream =
        ResumableStream::new(connector, persistence.clock, &options.url, tracker, config);
    let mut signals = stop_signals().map_err(McpError::Output)?;
    let outcome = loop {
        let event = match next_or_stop(&mut stream, &mut signals, None).await {
            Err(_) if stream.last_event_id().is_none() => break Err(McpError::Unresumable),
            Err(_) => break Err(McpError::Stopped),
            Ok(Err(_)) if unresumable.get() => break Err(McpError::Unresumable),
            Ok(Err(StreamError::GaveUp(GiveUp::Permanent(Failure::Status {
                code: 404, ..
            }))))
                if record.session.is_some() =>
            {
                break Err(McpError::SessionGone {
                    session: session.to_owned(),
                });
            }
            Ok(Err(e)) => break Err(McpError::Stream(e)),
            Ok(Ok(event)) => event,
        };
        // A priming event: an id for the cursor, no message.
        if event.data.is_empty() {
            continue;
        }
        let message = match serde_json::from_str::<Value>(&event.data) {
            Ok(message) => message,
            Err(e) => {
                eprintln!(
                    "tidemark: event {:?} is not JSON ({e}); printed as text",
                    event.id
                );
                Value::String(event.data)
            }
        };
        let line = json!({ "id": event.id, "message": message });
        if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
            // Not delivered: the cursor stays before it, and a rerun
            // prints it.
            return Err(McpError::Output(e));
        }
        let mut result = None;
        for message in messages_of(&message) {
            if is_request(message) {
                answer(&http, &options.url, &session_headers, message).await;
            } else if message.get("id") == Some(&json!(CALL_ID)) {
                result = Some(message.clone());
            }
        }
        if let Some(result) = result {
            break Ok(result);
        }
    };
    // Every message printed was flushed: it is delivered.
    stream.commit();
    drop(stream);
    let result = outcome?;
    // The call is over. The record goes first: a crash before the cursor
    // is removed too leaves only an unused cursor behind.
    remove_record(&path).map_err(McpError::Store)?;
    forget(&http, registry, &record, &options.headers).await;
    Ok(result)
}

/// The messages of one SSE event: a JSON-RPC message, or each message of a
/// batch (an array, allowed by revision 2025-03-26).
fn messages_of(message: &Value) -> &[Value] {
    match message {
        Value::Array(batch) => batch,
        message => std::slice::from_ref(message),
    }
}

/// Whether `message` is a request (a method and an id), which needs an
/// answer.
fn is_request(message: &Value) -> bool {
    message.get("method").is_some() && message.get("id").is_some()
}

/// Posts the answer to a request the server sent on the stream.
async fn answer(http: &HttpConnector, url: &str, session: &[(String, String)], request: &Value) {
    let answer = answer_to(request);
    let posted = http
        .request(
            Method::POST,
            url,
            &post_headers(session),
            Bytes::from(answer.to_string()),
        )
        .await;
    match posted {
        Ok(response) if matches!(response.status, 200 | 202) => {}
        Ok(response) => eprintln!(
            "tidemark: the server refused the answer to its request: HTTP {}",
            response.status
        ),
        Err(e) => eprintln!("tidemark: answering the server's request: {e}"),
    }
}

/// Removes the cursor of `record`'s call and ends its session with a
/// `DELETE` (which also stops a call still running there); failures are
/// reported, not fatal: the call is over either way.
async fn forget(
    http: &HttpConnector,
    registry: &Registry<Arc<NativeStore>>,
    record: &Record,
    headers: &[(String, String)],
) {
    if let Err(e) = registry.remove(&record.stream_key()).await {
        eprintln!("tidemark: removing the call's cursor: {e}");
    }
    if record.session.is_none() {
        return;
    }
    let ended = http
        .request(
            Method::DELETE,
            &record.url,
            &record.session_headers(headers),
            Bytes::new(),
        )
        .await;
    match ended {
        // 405: the server does not let clients end sessions; 404: it is gone.
        Ok(response) if matches!(response.status, 200 | 202 | 204 | 404 | 405) => {}
        Ok(response) => eprintln!("tidemark: ending the session: HTTP {}", response.status),
        Err(e) => eprintln!("tidemark: ending the session: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            url: "http://127.0.0.1:1/mcp".into(),
            name: "default".into(),
            tool: "progress".into(),
            arguments: json!({ "count": 3 }),
            session: Some("abc".into()),
            protocol_version: PROTOCOL_VERSION.into(),
        }
    }

    #[test]
    fn a_record_survives_a_write_and_a_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = record_path(dir.path(), "http://127.0.0.1:1/mcp", "default");
        assert_eq!(read_record(&path).unwrap(), None);
        write_record(&path, &record()).unwrap();
        assert_eq!(read_record(&path).unwrap(), Some(record()));
        remove_record(&path).unwrap();
        assert_eq!(read_record(&path).unwrap(), None);
        remove_record(&path).unwrap();
    }

    #[test]
    fn a_damaged_record_is_reported_not_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = record_path(dir.path(), "u", "n");
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, b"{\"url\": 1}").unwrap();
        let error = read_record(&path).unwrap_err();
        assert!(matches!(error, StoreError::Corrupt { .. }), "{error}");
    }

    #[test]
    fn record_paths_differ_by_url_and_name_and_are_stable() {
        let dir = Path::new("state");
        let a = record_path(dir, "http://a/mcp", "x");
        assert_ne!(a, record_path(dir, "http://a/mcp", "y"));
        assert_ne!(a, record_path(dir, "http://a/mcpx", ""));
        // The FNV-1a 64 of "u\0n": a record written by one version is found
        // by the next.
        assert_eq!(
            record_path(dir, "u", "n"),
            dir.join("mcp").join("4dc4a9193f06d7da.json")
        );
    }

    #[test]
    fn session_headers_carry_the_session_and_version_first() {
        let extra = [("authorization".to_owned(), "Bearer t".to_owned())];
        let headers = record().session_headers(&extra);
        assert_eq!(
            headers,
            [
                ("mcp-session-id".to_owned(), "abc".to_owned()),
                (
                    "mcp-protocol-version".to_owned(),
                    PROTOCOL_VERSION.to_owned()
                ),
                ("authorization".to_owned(), "Bearer t".to_owned()),
            ]
        );
    }

    #[test]
    fn a_batch_is_read_message_by_message() {
        let single = json!({ "jsonrpc": "2.0", "id": 1, "result": {} });
        assert_eq!(messages_of(&single).len(), 1);
        assert_eq!(messages_of(&single)[0], single);
        let ping = json!({ "jsonrpc": "2.0", "id": "p", "method": "ping" });
        let batch = json!([ping.clone(), single.clone()]);
        assert_eq!(messages_of(&batch), [ping.clone(), single.clone()]);
        assert!(is_request(&ping));
        assert!(!is_request(&single));
        assert!(!is_request(
            &json!({ "jsonrpc": "2.0", "method": "notifications/progress" })
        ));
    }

    #[test]
    fn server_requests_get_a_pong_or_method_not_found() {
        let pong = answer_to(&json!({ "jsonrpc": "2.0", "id": 7, "method": "ping" }));
        assert_eq!(pong, json!({ "jsonrpc": "2.0", "id": 7, "result": {} }));
        let refused =
            answer_to(&json!({ "jsonrpc": "2.0", "id": "s", "method": "sampling/createMessage" }));
        assert_eq!(refused["id"], "s");
        assert_eq!(refused["error"]["code"], -32601);
    }
}
