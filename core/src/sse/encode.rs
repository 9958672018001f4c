//! Writing an event stream, for servers.
//!
//! Every function appends one self-contained piece to `out`, so pieces can be
//! written in any order and any number; what [`Parser`](super::Parser) reads
//! back is what was written, with two normalizations of the format itself:
//!
//! - line ends inside data and comments (LF, CR or CRLF) become separate
//!   `data:` or `:` lines, so they are read back as LF;
//! - an empty event type is read back as `"message"`.
//!
//! Event types and ids are a single line each: one containing CR or LF (or,
//! for an id, NUL, which a client ignores) is refused with an [`EncodeError`]
//! and nothing is written.

use super::{find_line_end, split_lines};
use std::fmt;

/// A field that cannot be written as given.
#[non_exhaustive]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum EncodeError {
    /// The event type contains CR or LF.
    InvalidEventType,
    /// The id contains CR, LF or NUL.
    InvalidId,
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EncodeError::InvalidEventType => "event type contains CR or LF",
            EncodeError::InvalidId => "event id contains CR, LF or NUL",
        })
    }
}

impl std::error::Error for EncodeError {}

/// Appends one event: `event:` if a type is given, `id:` if an id is given
/// (`Some("")` resets the client's last event id), one `data:` line per line
/// of `data` (at least one, so empty data still dispatches an event), and the
/// blank line that dispatches it.
pub fn encode_event(
    out: &mut Vec<u8>,
    event: Option<&str>,
    id: Option<&str>,
    data: &str,
) -> Result<(), EncodeError> {
    if event.is_some_and(|event| event.contains(['\r', '\n'])) {
        return Err(EncodeError::InvalidEventType);
    }
    if id.is_some_and(|id| id.contains(['\r', '\n', '\0'])) {
        return Err(EncodeError::InvalidId);
    }
    out.reserve(data.len() + 16 + event.map_or(0, |e| e.len() + 8) + id.map_or(0, |i| i.len() + 5));
    if let Some(event) = event {
        field(out, b"event", event);
    }
    if let Some(id) = id {
        field(out, b"id", id);
    }
    if find_line_end(data.as_bytes()).is_none() {
        // One line, as nearly all data is: no splitting.
        field(out, b"data", data);
    } else {
        for line in split_lines(data) {
            field(out, b"data", line);
        }
    }
    out.push(b'\n');
    Ok(())
}

/// Appends a comment, one `:` line per line of `text`: the usual keep-alive.
/// A client reads it back as [`Item::Comment`](super::Item::Comment)s and
/// dispatches nothing.
pub fn encode_comment(out: &mut Vec<u8>, text: &str) {
    for line in split_lines(text) {
        field(out, b"", line);
    }
}

/// Appends a `retry` field: the client's reconnection time in milliseconds.
pub fn encode_retry(out: &mut Vec<u8>, ms: u64) {
    out.extend_from_slice(b"retry: ");
    out.extend_from_slice(ms.to_string().as_bytes());
    out.push(b'\n');
}

/// `name: value` and a line end; the space keeps a value's own leading space,
/// and is left out when there is no value.
#[inline]
fn field(out: &mut Vec<u8>, name: &[u8], value: &str) {
    out.extend_from_slice(name);
    if value.is_empty() {
        out.extend_from_slice(b":\n");
    } else {
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.push(b'\n');
    }
}
