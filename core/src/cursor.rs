//! What a cursor belongs to, and what is persisted.

use crate::clock::Millis;
use core::fmt;
use std::sync::Arc;

/// Identifies one stream: a session id plus a stream id.
///
/// MCP event ids are unique per stream, and one session can hold several
/// streams (the standalone GET stream and one per request). Replay never crosses
/// streams, so each stream has its own cursor and dedup window. Clones are
/// cheap (two reference-count increments).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct StreamKey {
    session: Arc<str>,
    stream: Arc<str>,
}

impl StreamKey {
    /// The key of stream `stream` in session `session`.
    pub fn new(session: impl AsRef<str>, stream: impl AsRef<str>) -> Self {
        StreamKey {
            session: Arc::from(session.as_ref()),
            stream: Arc::from(stream.as_ref()),
        }
    }

    /// The session id.
    pub fn session(&self) -> &str {
        &self.session
    }

    /// The stream id within the session.
    pub fn stream(&self) -> &str {
        &self.stream
    }
}

impl fmt::Debug for StreamKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}/{:?}", &*self.session, &*self.stream)
    }
}

impl fmt::Display for StreamKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.session, self.stream)
    }
}

/// The persisted position of one stream.
///
/// `seq` counts cursor moves of the stream and only grows; stores keep, per
/// key, the cursor with the highest `seq`, so a late or retried write can never
/// move a stream backwards.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Cursor {
    /// The stream this cursor belongs to.
    pub key: StreamKey,
    /// The last event id delivered to the application; empty after the server
    /// reset it (an event with an empty `id` field), meaning "send no
    /// `Last-Event-ID`".
    pub last_event_id: String,
    /// Per-stream sequence number of this cursor move; monotonic.
    pub seq: u64,
    /// When the event that moved the cursor was observed.
    pub at: Millis,
}

impl Cursor {
    /// The id to send as `Last-Event-ID` on reconnect, if any.
    pub fn resume_id(&self) -> Option<&str> {
        (!self.last_event_id.is_empty()).then_some(self.last_event_id.as_str())
    }

    /// Whether `self` should replace `stored` in a store: only a strictly
    /// newer cursor does.
    pub fn supersedes(&self, stored: &Cursor) -> bool {
        self.seq > stored.seq
    }
}
