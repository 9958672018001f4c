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
//!
//! The layers, one file each: `session` (the JSON-RPC session: initialize,
//! answers to the server's requests, the end of the session), `record` (the
//! durable record of an unfinished call), `connector` (the call's stream,
//! posted at most once), and here the command, on the client loop shared
//! with [`follow`](crate::follow) (the crate's private `client` module).

mod connector;
mod record;
mod session;

pub use session::{PROTOCOL_VERSION, RESUMABLE_VERSIONS};

use crate::client::{self, Ended, Persistence, stop_signals, write_line};
use crate::private::{HeaderNames, Redacted};
use crate::{HttpConnector, NativeStore};
use connector::CallConnector;
use hyper::body::Bytes;
use record::{Record, read_record, record_path, remove_record, write_record};
use serde_json::{Value, json};
use std::cell::Cell;
use std::fmt;
use std::io;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::Arc;
use tidemark_core::sse::Event;
use tidemark_core::{
    Failure, GiveUp, Registry, RegistryError, ResumableStream, StoreError, StreamConfig,
    StreamError,
};

/// Which tool to call, on which server, and where to keep the call's state.
///
/// Its `Debug` shows the names of the headers, not their values.
#[derive(Clone)]
pub struct McpOptions {
    /// The MCP endpoint (Streamable HTTP), e.g. `http://127.0.0.1:3000/mcp`.
    pub url: String,
    /// The state directory (cursors, and the records of unfinished calls,
    /// which hold the session id): created `0700`, its files `0600`.
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

impl fmt::Debug for McpOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("McpOptions")
            .field("url", &self.url)
            .field("state", &self.state)
            .field("name", &self.name)
            .field("tool", &self.tool)
            .field("arguments", &self.arguments)
            .field("headers", &HeaderNames(&self.headers))
            .field("new", &self.new)
            .finish()
    }
}

/// Why a call stopped without its result.
///
/// Messages never hold a session id whole, only its first characters.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum McpError {
    /// The state directory could not be read or written.
    #[error("state: {0}")]
    Store(#[source] StoreError),
    /// The call's stream could not be opened in the registry.
    #[error("{}", registry_message(.0))]
    Registry(RegistryError),
    /// `initialize` or `notifications/initialized` failed.
    #[error("initializing the session: {0}")]
    Handshake(String),
    /// An unfinished call of this name has another tool or arguments.
    #[error(
        "an unfinished call of this name calls another tool or other arguments ({}); run it \
         with the same ones to resume it, or pass --new to forget it",
        record.display()
    )]
    Conflict {
        /// The record of the unfinished call.
        record: PathBuf,
    },
    /// The server no longer knows the session: the call's remaining events
    /// are gone.
    #[error(
        "the server no longer knows session {session}: the call cannot be resumed (pass --new \
         to start it again)"
    )]
    SessionGone {
        /// The lost session, redacted: its first characters and `…`.
        session: String,
    },
    /// The stream carried no event id before it broke or this process
    /// stopped, so there is nothing to resume from: posting the call again
    /// could run the tool twice.
    #[error(
        "the call's stream carried no event id before it broke or this client stopped, so there \
         is nothing to resume from (a server without an event store sends none); pass --new to \
         call the tool again"
    )]
    Unresumable,
    /// The stream gave up or broke its limits.
    #[error(transparent)]
    Stream(StreamError),
    /// Stopped by SIGINT or SIGTERM; the call can be resumed.
    #[error("stopped; run the same command to resume the call")]
    Stopped,
    /// Writing the output failed.
    #[error("writing output: {0}")]
    Output(#[source] io::Error),
}

/// A registry error without the stream's key, which holds the session id.
fn registry_message(error: &RegistryError) -> String {
    match error {
        RegistryError::AlreadyOpen(_) => "the call's stream is already open".into(),
        RegistryError::StillOpen(_) => "the call's stream is still open".into(),
        other => other.to_string(),
    }
}

/// The exit status of `tidemark mcp`: success when the call's result
/// arrived and is no error; failure, with the reason on stderr, when the
/// call failed (a JSON-RPC error, or a result with `isError`) or could not
/// be completed.
pub fn exit_code(result: &Result<Value, McpError>) -> ExitCode {
    match result {
        Ok(last) if last.get("error").is_some() => {
            eprintln!("tidemark: the call failed: {}", last["error"]);
            ExitCode::FAILURE
        }
        Ok(last) if last.pointer("/result/isError") == Some(&true.into()) => {
            eprintln!("tidemark: the tool reported an error (isError)");
            ExitCode::FAILURE
        }
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tidemark: {e}");
            ExitCode::FAILURE
        }
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

async fn run<W: Write>(
    options: &McpOptions,
    persistence: &Persistence,
    out: &mut W,
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
            let call = session::Call {
                url: &options.url,
                name: &options.name,
                tool: &options.tool,
                arguments: &options.arguments,
                headers: &options.headers,
            };
            let record = session::initialize(&http, call).await?;
            write_record(&path, &record).map_err(McpError::Store)?;
            record
        }
    };
    // Only a prefix of the session goes to stderr: the id is a credential.
    let session = match &record.session {
        Some(session) => Redacted(session).to_string(),
        None => "(none)".to_owned(),
    };
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
    let unresumable = Rc::new(Cell::new(false));
    let connector = CallConnector {
        http: http.clone(),
        call: Bytes::from(session::call_request(&record).to_string()),
        posted: Cell::new(resumed),
        unresumable: unresumable.clone(),
    };
    let config = StreamConfig {
        headers: session_headers.clone(),
        ..StreamConfig::default()
    };
    let clock = persistence.clock;
    let mut stream = ResumableStream::new(connector, clock, &options.url, tracker, config);
    let mut signals = stop_signals().map_err(McpError::Output)?;
    let ended = client::run(
        &mut stream,
        clock,
        &mut signals,
        None,
        out,
        |_| {},
        || Ok(()),
        async |event: Event, group: &mut Vec<u8>| {
            // A priming event: an id for the cursor, no message.
            if event.data.is_empty() {
                return Ok(None);
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
            // Not delivered if this fails: the cursor stays before it, and a
            // rerun prints it.
            let line = Line {
                id: event.id.as_deref(),
                message: &message,
            };
            write_line(group, &line)?;
            let mut result = None;
            for message in session::messages_of(&message) {
                if session::is_request(message) {
                    session::answer(&http, &options.url, &session_headers, message).await;
                } else if message.get("id") == Some(&json!(session::CALL_ID)) {
                    result = Some(message.clone());
                }
            }
            Ok(result)
        },
    )
    .await;
    let result = match ended {
        Ended::Done(result) => result,
        Ended::Refused(e) => return Err(McpError::Output(e)),
        Ended::Signal | Ended::Lease(_) if stream.last_event_id().is_none() => {
            return Err(McpError::Unresumable);
        }
        Ended::Signal | Ended::Lease(_) => return Err(McpError::Stopped),
        Ended::Stream(_) if unresumable.get() => return Err(McpError::Unresumable),
        Ended::Stream(e) if record.session.is_some() && status_of(&e) == Some(404) => {
            return Err(McpError::SessionGone { session });
        }
        Ended::Stream(e) => return Err(McpError::Stream(e)),
    };
    drop(stream);
    // The call is over. The record goes first: a crash before the cursor
    // is removed too leaves only an unused cursor behind.
    remove_record(&path).map_err(McpError::Store)?;
    forget(&http, registry, &record, &options.headers).await;
    Ok(result)
}

/// One output line: the event's id and its message.
#[derive(serde::Serialize)]
struct Line<'a> {
    id: Option<&'a str>,
    message: &'a Value,
}

/// The HTTP status a stream gave up on, if that is why it stopped.
fn status_of(error: &StreamError) -> Option<u16> {
    match error {
        StreamError::GaveUp(GiveUp::Permanent(Failure::Status { code, .. })) => Some(*code),
        _ => None,
    }
}

/// Removes the cursor of `record`'s call and ends its session; failures are
/// reported, not fatal: the call is over either way.
async fn forget(
    http: &HttpConnector,
    registry: &Registry<Arc<NativeStore>>,
    record: &Record,
    headers: &[(String, String)],
) {
    if let Err(e) = registry.remove(&record.stream_key()).await {
        eprintln!(
            "tidemark: removing the call's cursor: {}",
            registry_message(&e)
        );
    }
    session::end(http, record, headers).await;
}
