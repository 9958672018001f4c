//! Where the proxy's replay logs live: the [`LogStorage`] trait, and
//! [`MemoryLog`], which keeps nothing beyond the process.
//!
//! The proxy serves clients from the in-memory [`ReplayLog`] of each
//! stream (bounded by retention); storage is what makes those logs survive
//! a restart. The proxy hands storage every change as a [`LogOp`], in
//! order, in batches (a group commit: whatever arrived while the previous
//! batch was written), and lets clients see an event only once the batch
//! that holds it was written. After a crash, [`LogStorage::recover`] gives
//! back every stream and every event of every batch that was written.
//!
//! [`ReplayLog`]: tidemark_core::replay::ReplayLog

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use tidemark_core::Millis;
use tidemark_core::replay::{Identity, LogRecord, StreamToken};

/// How a logged stream was opened.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum StreamKind {
    /// A GET stream, shared by every client of its path, query and identity,
    /// followed upstream with reconnects.
    Get,
    /// The answer to one POST, read once to its end.
    Post,
}

impl StreamKind {
    /// `"get"` or `"post"` (a metrics label).
    pub const fn as_str(self) -> &'static str {
        match self {
            StreamKind::Get => "get",
            StreamKind::Post => "post",
        }
    }
}

/// What a logged stream is: stored once, when it opens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamMeta {
    /// Its token: the first part of its ids, and its path for POST streams.
    pub token: StreamToken,
    /// GET or POST.
    pub kind: StreamKind,
    /// The upstream path and query it was opened with.
    pub target: String,
    /// The identity it belongs to.
    pub identity: Identity,
    /// When it opened.
    pub created: Millis,
}

/// One change to the logs, in the order the proxy made it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogOp {
    /// A stream opened.
    Open(StreamMeta),
    /// An event was appended to a stream.
    Append {
        /// The stream.
        token: StreamToken,
        /// The event.
        record: LogRecord,
    },
    /// Retention dropped a stream's events before `first_seq`: storage may
    /// forget them (and need not make this durable: the proxy applies
    /// retention again on recovery).
    Trim {
        /// The stream.
        token: StreamToken,
        /// Its oldest retained event.
        first_seq: u64,
    },
    /// The stream ended upstream: nothing more will be appended.
    End {
        /// The stream.
        token: StreamToken,
    },
    /// The stream expired: storage forgets it.
    Drop {
        /// The stream.
        token: StreamToken,
    },
}

/// A stream as [`LogStorage::recover`] gives it back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredStream {
    /// What it is.
    pub meta: StreamMeta,
    /// Its events, oldest first (at least the retained ones).
    pub records: Vec<LogRecord>,
    /// Whether it had ended.
    pub ended: bool,
}

/// Durable storage of replay logs. Implementations are driven from one
/// thread of their own, so methods block.
pub trait LogStorage: Send + std::fmt::Debug + 'static {
    /// Makes `ops` durable, in order: once this returns `Ok`, a crash
    /// (`kill -9`, power loss) loses none of them. On `Err` the proxy keeps
    /// serving from memory and retries the same ops with the next batch.
    fn write(&mut self, ops: &[LogOp]) -> io::Result<()>;

    /// Every stream stored and not dropped, with its events: what a
    /// restarted proxy serves. A record torn by a crash is cut off, with
    /// everything after it. Called once, before any `write`.
    fn recover(&mut self) -> io::Result<Vec<StoredStream>>;

    /// The key of the proxy's identity hashes: the stored one, or `fresh`,
    /// stored durably, if there is none. Called once, before any `write`.
    fn identity_key(&mut self, fresh: [u8; 32]) -> io::Result<[u8; 32]>;

    /// Whether `write` makes anything durable; `false` lets the proxy skip
    /// the writer thread and show events to clients at once.
    fn is_durable(&self) -> bool {
        true
    }

    /// Whether clients may see events that `write` failed to make durable,
    /// for as long as it keeps failing: `true` for a storage on a server
    /// (Redis), whose outage should not stop the live streams, at the cost
    /// of losing what clients saw meanwhile if the proxy dies before the
    /// storage is back; `false` (the default) shows clients only what is
    /// durable, so they wait while it fails (a full disk).
    fn serves_while_failing(&self) -> bool {
        false
    }
}

/// No storage: logs live in memory only and die with the process (the
/// proxy's default, without `--log`).
#[derive(Clone, Copy, Debug, Default)]
pub struct MemoryLog;

impl LogStorage for MemoryLog {
    fn write(&mut self, _ops: &[LogOp]) -> io::Result<()> {
        Ok(())
    }

    fn recover(&mut self) -> io::Result<Vec<StoredStream>> {
        Ok(Vec::new())
    }

    fn identity_key(&mut self, fresh: [u8; 32]) -> io::Result<[u8; 32]> {
        Ok(fresh)
    }

    fn is_durable(&self) -> bool {
        false
    }
}

/// A map keyed by stream token, without SipHash: tokens are 128 random
/// bits that no client chooses, so their own bits hash them well, and the
/// log's writer looks one up for every event.
pub(super) type TokenMap<V> = HashMap<StreamToken, V, BuildHasherDefault<TokenHasher>>;

/// Folds the bytes written into a word (a token is written as its 16
/// bytes, after their count).
#[derive(Default)]
pub(super) struct TokenHasher(u64);

impl Hasher for TokenHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(23) ^ u64::from_le_bytes(word);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}
