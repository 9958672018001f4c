//! The JSON-RPC session over Streamable HTTP: `initialize`, answers to the
//! server's requests, and the end of the session.

use super::McpError;
use super::record::Record;
use crate::{HttpConnector, HttpResponse};
use futures::StreamExt;
use hyper::Method;
use hyper::body::Bytes;
use serde_json::{Value, json};
use tidemark_core::reconnect::check_response;
use tidemark_core::sse::{Item, Limits, Parser};

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
pub(super) const CALL_ID: u64 = 1;
/// The largest JSON answer read whole (`initialize`, a JSON `tools/call`).
pub(super) const MAX_JSON: usize = 16 << 20;

/// The headers of a JSON-RPC POST.
pub(super) fn post_headers(session: &[(String, String)]) -> Vec<(String, String)> {
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

/// Whether a response's body is an SSE stream.
pub(super) fn is_event_stream(response: &HttpResponse) -> bool {
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

/// What a new session is opened for.
pub(super) struct Call<'a> {
    pub(super) url: &'a str,
    pub(super) name: &'a str,
    pub(super) tool: &'a str,
    pub(super) arguments: &'a Value,
    pub(super) headers: &'a [(String, String)],
}

/// `initialize` and `notifications/initialized`: a new session, and the
/// record of the call to make in it.
pub(super) async fn initialize(http: &HttpConnector, call: Call<'_>) -> Result<Record, McpError> {
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
    let handshake = McpError::Handshake;
    let response = http
        .request(
            Method::POST,
            call.url,
            &post_headers(call.headers),
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
        url: call.url.to_owned(),
        name: call.name.to_owned(),
        tool: call.tool.to_owned(),
        arguments: call.arguments.clone(),
        session,
        protocol_version,
    };
    let initialized = json!({ "jsonrpc": "2.0", "method": "notifications/initialized" });
    let response = http
        .request(
            Method::POST,
            call.url,
            &post_headers(&record.session_headers(call.headers)),
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

/// The `tools/call` request of `record`'s call.
pub(super) fn call_request(record: &Record) -> Value {
    json!({
        "jsonrpc": "2.0",
        "id": CALL_ID,
        "method": "tools/call",
        "params": {
            "name": record.tool,
            "arguments": record.arguments,
            "_meta": { "progressToken": CALL_ID },
        },
    })
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

/// The messages of one SSE event: a JSON-RPC message, or each message of a
/// batch (an array, allowed by revision 2025-03-26).
pub(super) fn messages_of(message: &Value) -> &[Value] {
    match message {
        Value::Array(batch) => batch,
        message => std::slice::from_ref(message),
    }
}

/// Whether `message` is a request (a method and an id), which needs an
/// answer.
pub(super) fn is_request(message: &Value) -> bool {
    message.get("method").is_some() && message.get("id").is_some()
}

/// Posts the answer to a request the server sent on the stream.
pub(super) async fn answer(
    http: &HttpConnector,
    url: &str,
    session: &[(String, String)],
    request: &Value,
) {
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

/// Ends `record`'s session with a `DELETE` (which also stops a call still
/// running there); failures are reported, not fatal.
pub(super) async fn end(http: &HttpConnector, record: &Record, headers: &[(String, String)]) {
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

    #[test]
    fn the_call_asks_for_progress_under_its_own_id() {
        let record = super::super::record::Record {
            url: "u".into(),
            name: "n".into(),
            tool: "progress".into(),
            arguments: json!({ "count": 3 }),
            session: None,
            protocol_version: PROTOCOL_VERSION.into(),
        };
        let call = call_request(&record);
        assert_eq!(call["method"], "tools/call");
        assert_eq!(call["id"], CALL_ID);
        assert_eq!(call["params"]["name"], "progress");
        assert_eq!(call["params"]["arguments"]["count"], 3);
        assert_eq!(call["params"]["_meta"]["progressToken"], CALL_ID);
    }
}
