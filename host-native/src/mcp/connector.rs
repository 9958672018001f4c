//! The call's stream: the `tools/call` POST at most once, then resumes.

use super::McpError;
use super::session::{MAX_JSON, is_event_stream, post_headers};
use crate::{HttpBody, HttpConnector};
use hyper::Method;
use hyper::body::Bytes;
use serde_json::Value;
use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;
use tidemark_core::reconnect::check_response;
use tidemark_core::{ConnectRequest, Connector, Failure};

/// Opens the call's stream: the `tools/call` POST the first time, a `GET`
/// with `Last-Event-ID` after that.
pub(super) struct CallConnector {
    pub(super) http: HttpConnector,
    /// The `tools/call` request.
    pub(super) call: Bytes,
    /// Whether the call may have reached the server (here or in an earlier
    /// run): from then on it is never posted again, only resumed.
    pub(super) posted: Cell<bool>,
    /// Set when the stream must be resumed but has no event id to resume
    /// from.
    pub(super) unresumable: Rc<Cell<bool>>,
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
