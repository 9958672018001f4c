//! The replay log's rules, for a proxy that makes streams resumable.
//!
//! A proxy in front of a server that cannot replay keeps, per stream, a log
//! of the events it carried and serves every client from it. This module is
//! that log's logic, sans-I/O like the tracker: plain synchronous code with
//! `now: Millis` passed in, no clock reads, no storage.
//!
//! - **Ids.** The log assigns ids `<token>-<seq>`: the stream's
//!   [`StreamToken`] (128 random bits as 32 lowercase hex digits) and a
//!   sequence number counting from 1. Ids are strictly increasing per stream
//!   and name their stream, so a `Last-Event-ID` alone says which stream a
//!   client resumes. The upstream's own id of each event is kept beside it.
//! - **Frames.** Each event is encoded once, as the SSE frame every client
//!   gets ([`LogRecord::frame`]); a client's next read is a copy of the
//!   frames after its offset ([`ReplayLog::read`]). Events read from one
//!   upstream chunk are appended together ([`LogBatch`],
//!   [`ReplayLog::append_batch`]) into one shared block: one allocation per
//!   batch, and a client's read copies whole runs of a block. The log
//!   keeps each batch as a segment (its block and a few bytes per event)
//!   and makes a [`LogRecord`] of an event only when one is asked for
//!   ([`ReplayLog::records`], [`ReplayLog::since`]), for storage.
//! - **Retention** ([`Retention`]): at most `max_events` events and
//!   `max_bytes` bytes of frames per stream, the oldest dropped first; a
//!   stream expires `idle` after its last event (or its start, if it has
//!   none).
//! - **Durability.** A log may hold events its storage has not yet made
//!   durable; clients see only what [`ReplayLog::mark_durable`] allowed, so
//!   what a client saw survives a crash.
//! - **Gaps are never silent.** A client asking to resume from an id the log
//!   no longer holds, or from an id it never issued (another stream's, a lost
//!   log's, garbage), first gets a gap event ([`GAP_EVENT`], see
//!   [`encode_gap`]) saying what was lost, then the oldest retained event
//!   onward. A connected client that falls behind the retained log gets the
//!   same signal on its next read.
//! - **Identity.** A stream belongs to a keyed hash of the credentials it
//!   was opened with ([`IdentityKey::identity`]); the proxy keeps the hash,
//!   never the credentials.

use crate::clock::Millis;
use crate::entropy::{EntropyError, random_u64s};
use crate::fingerprint::FingerprintKey;
use crate::sse::{EncodeError, encode_event, find_line_end};
use crate::window::{decimal, numeric};
use core::fmt;
use std::collections::VecDeque;
use std::sync::Arc;

/// The event type of the gap signal.
pub const GAP_EVENT: &str = "tidemark-gap";

/// The bytes of one batch: its frames, then its upstream ids, shared by
/// its segment and the records made from it. An `Arc` of the `Vec` the
/// batch was written into, so that making it copies nothing.
type Block = Arc<Vec<u8>>;

/// The random name of one logged stream: 128 bits, written as 32 lowercase
/// hex digits in ids and paths.
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamToken([u8; 16]);

impl StreamToken {
    /// A fresh token from the platform's entropy source.
    pub fn random() -> Result<Self, EntropyError> {
        let [a, b] = random_u64s()?;
        let mut bytes = [0; 16];
        bytes[..8].copy_from_slice(&a.to_le_bytes());
        bytes[8..].copy_from_slice(&b.to_le_bytes());
        Ok(StreamToken(bytes))
    }

    /// The token with these bits (from storage).
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        StreamToken(bytes)
    }

    /// The token's bits.
    pub const fn to_bytes(self) -> [u8; 16] {
        self.0
    }

    /// The token written as `s` (32 lowercase hex digits), if it is one.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.as_bytes();
        if s.len() != 32 {
            return None;
        }
        let mut bytes = [0; 16];
        for (byte, pair) in bytes.iter_mut().zip(s.chunks_exact(2)) {
            *byte = (hex_value(pair[0])? << 4) | hex_value(pair[1])?;
        }
        Some(StreamToken(bytes))
    }

    /// Appends the 32 hex digits to `out`.
    fn write_hex(&self, out: &mut Vec<u8>) {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        for byte in self.0 {
            out.push(DIGITS[usize::from(byte >> 4)]);
            out.push(DIGITS[usize::from(byte & 15)]);
        }
    }
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        _ => None,
    }
}

impl fmt::Display for StreamToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut hex = Vec::with_capacity(32);
        self.write_hex(&mut hex);
        f.write_str(core::str::from_utf8(&hex).expect("hex digits are ASCII"))
    }
}

impl fmt::Debug for StreamToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StreamToken({self})")
    }
}

/// The id the log gives event `seq` of stream `token`: `<token>-<seq>`.
pub fn event_id(token: StreamToken, seq: u64) -> String {
    let mut id = Vec::with_capacity(53);
    write_id(&mut id, token, seq);
    String::from_utf8(id).expect("hex digits, a dash and decimal digits are ASCII")
}

fn write_id(out: &mut Vec<u8>, token: StreamToken, seq: u64) {
    token.write_hex(out);
    out.push(b'-');
    write_decimal(out, seq);
}

/// How many decimal digits `n` has.
fn decimal_len(n: u64) -> usize {
    n.checked_ilog10().map_or(1, |log| log as usize + 1)
}

fn write_decimal(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(decimal(n, &mut [0; 20]));
}

/// The stream and sequence number an id names, if it is one of the log's
/// ids (`<32 hex digits>-<decimal>`, no sign, no leading zeros but for 0).
pub fn parse_event_id(id: &str) -> Option<(StreamToken, u64)> {
    let (token, seq) = id.split_once('-')?;
    Some((StreamToken::parse(token)?, numeric(seq.as_bytes())?))
}

/// A keyed 128-bit hash of credentials: which identity a stream belongs to.
#[derive(Copy, Clone, PartialEq, Eq, Hash)]
pub struct Identity([u8; 16]);

impl Identity {
    /// The identity with these bits (from storage).
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Identity(bytes)
    }

    /// The identity's bits.
    pub const fn to_bytes(self) -> [u8; 16] {
        self.0
    }
}

/// Hash values only, never the credentials: this prints no bits at all.
impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Identity(..)")
    }
}

/// The secret key of [`Identity`] hashes: two independent SipHash keys, 256
/// bits, giving two independent 64-bit hashes of the same input.
///
/// Without the key nobody can tell whether two credentials hash alike, so a
/// client cannot search for another identity's hash; a host that keeps
/// identities across restarts keeps the key with them.
#[derive(Copy, Clone, PartialEq, Eq)]
pub struct IdentityKey([FingerprintKey; 2]);

impl fmt::Debug for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IdentityKey(..)")
    }
}

impl IdentityKey {
    /// A random key from the platform's entropy source.
    pub fn random() -> Result<Self, EntropyError> {
        Ok(Self::from_bytes(random_bytes()?))
    }

    /// The key with these bits (from storage).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        let word =
            |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        IdentityKey([
            FingerprintKey::new(word(0), word(1)),
            FingerprintKey::new(word(2), word(3)),
        ])
    }

    /// The identity of a request whose credentials are `parts`, in a fixed
    /// order (a missing credential as an empty part). Each part is
    /// length-prefixed, so moving bytes from one part to the next changes
    /// the hash.
    pub fn identity<'a>(&self, parts: impl IntoIterator<Item = &'a [u8]>) -> Identity {
        let mut input = Vec::with_capacity(128);
        for part in parts {
            input.extend_from_slice(&(part.len() as u64).to_le_bytes());
            input.extend_from_slice(part);
        }
        let mut bytes = [0; 16];
        bytes[..8].copy_from_slice(&self.0[0].fingerprint(&input).to_le_bytes());
        bytes[8..].copy_from_slice(&self.0[1].fingerprint(&input).to_le_bytes());
        Identity(bytes)
    }
}

/// 32 random bytes, for a fresh [`IdentityKey`] a host wants to store.
pub fn random_bytes() -> Result<[u8; 32], EntropyError> {
    let words: [u64; 4] = random_u64s()?;
    let mut bytes = [0; 32];
    for (chunk, word) in bytes.chunks_exact_mut(8).zip(words) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    Ok(bytes)
}

/// How much of a stream the log keeps, and for how long.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Most events kept per stream (at least one is always kept).
    pub max_events: usize,
    /// Most bytes of frames kept per stream (the newest event is kept even
    /// when it alone is larger).
    pub max_bytes: usize,
    /// How long a stream is kept after its last event.
    pub idle: Millis,
}

impl Default for Retention {
    /// 10,000 events, 64 MiB, 300 s.
    fn default() -> Self {
        Retention {
            max_events: 10_000,
            max_bytes: 64 << 20,
            idle: Millis::from_secs(300),
        }
    }
}

/// One logged event, as storage gets and gives it.
///
/// Its bytes live in a block shared with the other events appended in the
/// same batch ([`ReplayLog::append_batch`]): the frames one after the other,
/// then their upstream ids. A record the log hands out shares that block;
/// a block is freed once the log has dropped the last of its events and no
/// record points into it, so retention may hold up to one batch's bytes
/// more than it counts.
#[derive(Clone)]
pub struct LogRecord {
    /// Its sequence number in the stream (the id's tail).
    pub seq: u64,
    /// When it was appended.
    pub time: Millis,
    block: Block,
    /// Where its frame lies in `block`.
    frame: (usize, usize),
    /// Where its upstream id lies in `block`, if it had one.
    upstream_id: Option<(usize, usize)>,
}

impl LogRecord {
    /// A record of its own (from storage): event `seq`, appended at `time`,
    /// with the upstream's id and the frame clients get.
    pub fn new(seq: u64, time: Millis, upstream_id: Option<&str>, frame: &[u8]) -> Self {
        let id = upstream_id.unwrap_or("");
        let mut block = Vec::with_capacity(frame.len() + id.len());
        block.extend_from_slice(frame);
        block.extend_from_slice(id.as_bytes());
        LogRecord {
            seq,
            time,
            block: Arc::new(block),
            frame: (0, frame.len()),
            upstream_id: upstream_id.map(|id| (frame.len(), frame.len() + id.len())),
        }
    }

    /// The SSE frame clients get: `id: <token>-<seq>`, the event type
    /// unless `message`, the data lines, the blank line.
    pub fn frame(&self) -> &[u8] {
        &self.block[self.frame.0..self.frame.1]
    }

    /// The upstream's id of the event, if it had one.
    pub fn upstream_id(&self) -> Option<&str> {
        let (start, end) = self.upstream_id?;
        Some(core::str::from_utf8(&self.block[start..end]).expect("stored from a str"))
    }
}

impl PartialEq for LogRecord {
    fn eq(&self, other: &Self) -> bool {
        self.seq == other.seq
            && self.time == other.time
            && self.frame() == other.frame()
            && self.upstream_id() == other.upstream_id()
    }
}

impl Eq for LogRecord {}

impl fmt::Debug for LogRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogRecord")
            .field("seq", &self.seq)
            .field("time", &self.time)
            .field("upstream_id", &self.upstream_id())
            .field("frame", &String::from_utf8_lossy(self.frame()))
            .finish()
    }
}

/// Events read from upstream but not yet in the log: what
/// [`ReplayLog::append_batch`] appends in one go. Each is encoded as it is
/// pushed (its frame without the id line, which the log writes once it
/// assigns the id), so a host builds a batch without holding the log.
#[derive(Clone, Debug, Default)]
pub struct LogBatch {
    /// The frames without their id lines, one after the other.
    bodies: Vec<u8>,
    /// The upstream ids, one after the other.
    ids: Vec<u8>,
    /// Per event: where its body ends in `bodies`, and where its upstream
    /// id ends in `ids` if it had one (each starts where the one before
    /// ended).
    events: Vec<(usize, Option<usize>)>,
}

impl LogBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an event of type `event` (`message` or empty: none written) with
    /// `data` and the upstream's id. An event type with a line end is
    /// refused and nothing is added.
    pub fn push(
        &mut self,
        upstream_id: Option<&str>,
        event: &str,
        data: &str,
    ) -> Result<(), EncodeError> {
        let event = (event != "message" && !event.is_empty()).then_some(event);
        if event.is_none() && !data.is_empty() && find_line_end(data.as_bytes()).is_none() {
            // A message of one line, as nearly all are: `encode_event`'s
            // bytes, written directly.
            let bodies = &mut self.bodies;
            bodies.reserve(data.len() + 8);
            bodies.extend_from_slice(b"data: ");
            bodies.extend_from_slice(data.as_bytes());
            bodies.extend_from_slice(b"\n\n");
        } else {
            encode_event(&mut self.bodies, event, None, data)?;
        }
        let id_end = upstream_id.map(|id| {
            self.ids.extend_from_slice(id.as_bytes());
            self.ids.len()
        });
        self.events.push((self.bodies.len(), id_end));
        Ok(())
    }

    /// Events in the batch.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether the batch has no event.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Empties the batch, keeping its buffers (one huge batch does not pin
    /// its size, though).
    pub fn clear(&mut self) {
        for buffer in [&mut self.bodies, &mut self.ids] {
            buffer.clear();
            if buffer.capacity() > KEEP_BATCH_BUFFER {
                *buffer = Vec::new();
            }
        }
        self.events.clear();
    }
}

/// A batch buffer larger than this is freed once appended.
const KEEP_BATCH_BUFFER: usize = 1 << 20;

/// Why a client's resume point was not in the log.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum GapReason {
    /// The events after the client's id were dropped by retention.
    Retention,
    /// The id was never issued by this stream: another stream's, a log that
    /// was lost, or not an id of the log at all.
    Unknown,
    /// The upstream sent an event (or line) over the proxy's size cap; it
    /// was dropped, and a gap event stands in the log in its place.
    TooLarge,
}

impl GapReason {
    /// `"retention"`, `"unknown"` or `"too_large"`, as in the gap event's
    /// data.
    pub const fn as_str(self) -> &'static str {
        match self {
            GapReason::Retention => "retention",
            GapReason::Unknown => "unknown",
            GapReason::TooLarge => "too_large",
        }
    }
}

/// What a client missed: the gap signal it gets before the events.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Gap {
    /// Why.
    pub reason: GapReason,
    /// How many events were lost, when known.
    pub lost: Option<u64>,
}

/// Where a client starts reading a stream.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Start {
    /// The sequence number of the first event the client gets.
    pub next: u64,
    /// The gap signal to send first, if the client's id was not resumable.
    pub gap: Option<Gap>,
}

/// What one [`ReplayLog::read`] wrote.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Read {
    /// Events written.
    pub events: u64,
    /// The gap the client fell into (it fell behind retention), if any.
    pub gap: Option<Gap>,
}

/// What [`ReplayLog::append`] or [`ReplayLog::append_batch`] did.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Appended {
    /// The sequence number of the last event appended (of the one before,
    /// if none was).
    pub seq: u64,
    /// How many events were appended.
    pub events: usize,
    /// Bytes of frames the log holds now minus before (negative when
    /// retention dropped more than was added).
    pub bytes_delta: i64,
    /// The first sequence number the log still holds, if retention dropped
    /// events (storage may forget everything before it).
    pub trimmed_to: Option<u64>,
}

/// One stream's log: its events in order, the ids, retention, what clients
/// may see, and where each client goes next. See the [module docs](self).
///
/// The events are kept as segments, one per appended batch (or stored
/// record): a segment holds the batch's block, its first retained sequence
/// number and its time; per event the log keeps only where its frame and
/// its upstream id end in the block (16 bytes on 64-bit targets).
/// Appending, reading and trimming touch no reference count per event: a
/// block's count changes when its segment comes and goes, and when a
/// [`LogRecord`] is handed out.
#[derive(Clone, Debug)]
pub struct ReplayLog {
    token: StreamToken,
    retention: Retention,
    /// The retained events' batches, oldest first; none is empty, and each
    /// runs up to the next one's `seq` (the last one up to `next_seq`).
    segments: VecDeque<Segment>,
    /// Per retained event, oldest first: event `first_seq() + i` is
    /// `ends[i]`.
    ends: VecDeque<Ends>,
    next_seq: u64,
    durable: u64,
    bytes: usize,
    last_event_at: Millis,
    ended: bool,
    /// Reused for [`append`](Self::append)'s one-event batch.
    single: LogBatch,
    /// `id: <token>-<seq>` and LF, the first line of the frame of event
    /// `id_line_seq`: the next one's is an increment of its digits.
    id_line: Vec<u8>,
    id_line_seq: u64,
}

/// Events of one block, from its first retained one on.
#[derive(Clone)]
struct Segment {
    /// The sequence number of its first retained event.
    seq: u64,
    /// When its events were appended.
    time: Millis,
    block: Block,
    /// Where its first retained frame starts in `block` (each later one
    /// starts where the one before ended).
    frame_start: usize,
    /// Where the upstream ids start in `block`: upstream id offsets
    /// ([`Ends::id`], `id_start`) count from here.
    ids_at: usize,
    /// Where its first retained event's upstream id starts (had it one),
    /// from `ids_at`.
    id_start: usize,
    /// The sequence number of its newest event with an upstream id, if it
    /// had one (retained only if not below `seq`).
    last_id: Option<u64>,
}

impl fmt::Debug for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Segment")
            .field("seq", &self.seq)
            .field("time", &self.time)
            .field("block_len", &self.block.len())
            .field("frame_start", &self.frame_start)
            .finish_non_exhaustive()
    }
}

/// Where one event's bytes end in its segment's block.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
struct Ends {
    /// Where its frame ends in the block.
    frame: usize,
    /// Where its upstream id ends, from the segment's `ids_at`, with
    /// [`HAS_ID`] set if it had one (without one, where the one before
    /// ended).
    id: usize,
}

/// The flag of [`Ends::id`] that says the event had an upstream id (offsets
/// into a block never reach it: allocations are at most `isize::MAX` bytes).
const HAS_ID: usize = 1 << (usize::BITS - 1);

/// Where the sequence number starts in an id line: after `id: `, 32 hex
/// digits and the dash.
const SEQ_AT: usize = 4 + 32 + 1;

impl ReplayLog {
    /// An empty log for stream `token`, started at `now`.
    pub fn new(token: StreamToken, retention: Retention, now: Millis) -> Self {
        ReplayLog {
            token,
            retention,
            segments: VecDeque::new(),
            ends: VecDeque::new(),
            next_seq: 1,
            durable: 0,
            bytes: 0,
            last_event_at: now,
            ended: false,
            single: LogBatch::new(),
            id_line: Vec::new(),
            id_line_seq: u64::MAX,
        }
    }

    /// A log rebuilt from stored `records` (in any order; if their sequence
    /// numbers do not run without a hole, only the run after the last hole
    /// is kept), all of them durable. `ended` says whether the stream had
    /// ended; `now` counts as the last activity if there are no records.
    pub fn restore(
        token: StreamToken,
        retention: Retention,
        records: impl IntoIterator<Item = LogRecord>,
        ended: bool,
        now: Millis,
    ) -> Self {
        let mut sorted: Vec<LogRecord> = records.into_iter().collect();
        sorted.sort_by_key(|r| r.seq);
        sorted.dedup_by_key(|r| r.seq);
        let run_start = sorted
            .windows(2)
            .rposition(|pair| pair[1].seq != pair[0].seq + 1)
            .map_or(0, |i| i + 1);
        let mut log = ReplayLog::new(token, retention, now);
        for record in sorted.drain(run_start..) {
            log.push_record(record);
        }
        log.durable = log.next_seq - 1;
        log.ended = ended;
        log.trim();
        log
    }

    /// The stream's token.
    pub fn token(&self) -> StreamToken {
        self.token
    }

    /// Encodes and appends one event at `now`, gives it the next id, and
    /// applies retention. Clients see it once [`mark_durable`](Self::mark_durable)
    /// covers it.
    pub fn append(
        &mut self,
        now: Millis,
        upstream_id: Option<&str>,
        event: &str,
        data: &str,
    ) -> Result<Appended, EncodeError> {
        let mut single = std::mem::take(&mut self.single);
        single.clear();
        let pushed = single.push(upstream_id, event, data);
        let appended = pushed.map(|()| self.append_batch(now, &single));
        self.single = single;
        appended
    }

    /// Appends every event of `batch` at `now`, in order, with the next
    /// ids, and applies retention: one allocation for the whole batch.
    /// Clients see them once [`mark_durable`](Self::mark_durable) covers
    /// them.
    pub fn append_batch(&mut self, now: Millis, batch: &LogBatch) -> Appended {
        let first = self.first_seq();
        let before = self.bytes as i64;
        if batch.is_empty() {
            return Appended {
                seq: self.next_seq - 1,
                events: 0,
                bytes_delta: 0,
                trimmed_to: None,
            };
        }
        // What retention will drop for the count, dropped first: the ends
        // never hold more than `max_events` or the batch.
        let over = self.ends.len() + batch.len();
        let over = over.saturating_sub(self.retention.max_events.max(1));
        self.drop_oldest(over.min(self.ends.len()));
        // Exactly the block's size, so that it is moved into the segment as
        // it is: no copy, no spare capacity held for the log's life.
        let id_lines: usize = (0..batch.len() as u64)
            .map(|i| SEQ_AT + 1 + decimal_len(self.next_seq + i))
            .sum();
        let mut block = Vec::with_capacity(id_lines + batch.bodies.len() + batch.ids.len());
        self.ends.reserve(batch.len());
        let (mut body_start, mut id_before) = (0, 0);
        let mut last_id = None;
        for (i, &(body_end, id_end)) in batch.events.iter().enumerate() {
            let seq = self.next_seq + i as u64;
            self.advance_id_line(seq);
            block.extend_from_slice(&self.id_line);
            block.extend_from_slice(&batch.bodies[body_start..body_end]);
            body_start = body_end;
            let id = match id_end {
                Some(end) => {
                    last_id = Some(seq);
                    id_before = end;
                    end | HAS_ID
                }
                None => id_before,
            };
            self.ends.push_back(Ends {
                frame: block.len(),
                id,
            });
        }
        let ids_at = block.len();
        block.extend_from_slice(&batch.ids);
        debug_assert_eq!(block.len(), block.capacity(), "the block is sized exactly");
        self.bytes += ids_at;
        self.segments.push_back(Segment {
            seq: self.next_seq,
            time: now,
            block: Arc::new(block),
            frame_start: 0,
            ids_at,
            id_start: 0,
            last_id,
        });
        self.next_seq += batch.len() as u64;
        self.last_event_at = now;
        self.trim();
        Appended {
            seq: self.next_seq - 1,
            events: batch.len(),
            bytes_delta: self.bytes as i64 - before,
            trimmed_to: (self.first_seq() != first).then(|| self.first_seq()),
        }
    }

    /// Appends a record another writer of the stream logged (a proxy of a
    /// fleet mirrors the stream's shared log), durable at once, and applies
    /// retention. A record this log already has is ignored (`None`); one
    /// past a hole (the shared log dropped records before this log read
    /// them) starts the log anew at its sequence number, so that clients
    /// behind it get the retention gap.
    pub fn append_stored(&mut self, record: LogRecord) -> Option<Appended> {
        if record.seq < self.next_seq {
            return None;
        }
        let first = self.first_seq();
        let before = self.bytes as i64;
        if record.seq > self.next_seq {
            self.segments.clear();
            self.ends.clear();
            self.bytes = 0;
        }
        self.push_record(record);
        self.durable = self.next_seq - 1;
        self.trim();
        Some(Appended {
            seq: self.next_seq - 1,
            events: 1,
            bytes_delta: self.bytes as i64 - before,
            trimmed_to: (self.first_seq() != first).then(|| self.first_seq()),
        })
    }

    /// Appends `record` as the next event (its sequence number is
    /// `next_seq`, or the log is empty), a segment of its own: its block
    /// is the record's.
    fn push_record(&mut self, record: LogRecord) {
        let (frame_start, frame_end) = record.frame;
        // The upstream id's offsets count from the block's start.
        let (id_start, id) = match record.upstream_id {
            Some((start, end)) => (start, end | HAS_ID),
            None => (0, 0),
        };
        self.segments.push_back(Segment {
            seq: record.seq,
            time: record.time,
            block: record.block,
            frame_start,
            ids_at: 0,
            id_start,
            last_id: record.upstream_id.map(|_| record.seq),
        });
        self.ends.push_back(Ends {
            frame: frame_end,
            id,
        });
        self.bytes += frame_end - frame_start;
        self.next_seq = record.seq + 1;
        self.last_event_at = record.time;
    }

    /// Makes `id_line` the id line of event `seq`: an increment of the
    /// previous one's digits, or written anew.
    fn advance_id_line(&mut self, seq: u64) {
        if self.id_line_seq.wrapping_add(1) != seq || self.id_line.len() <= SEQ_AT {
            self.id_line.clear();
            self.id_line.extend_from_slice(b"id: ");
            write_id(&mut self.id_line, self.token, seq);
            self.id_line.push(b'\n');
            self.id_line_seq = seq;
            return;
        }
        self.id_line_seq = seq;
        let digits = &mut self.id_line[SEQ_AT..];
        let last = digits.len() - 1; // the LF
        for digit in digits[..last].iter_mut().rev() {
            if *digit != b'9' {
                *digit += 1;
                return;
            }
            *digit = b'0';
        }
        // All nines: one digit more.
        self.id_line.insert(SEQ_AT, b'1');
    }

    /// Drops the oldest events past `max_events`, then the oldest while
    /// frames are over `max_bytes`, always keeping the newest.
    fn trim(&mut self) {
        self.drop_oldest(
            self.ends
                .len()
                .saturating_sub(self.retention.max_events.max(1)),
        );
        while self.bytes > self.retention.max_bytes && self.ends.len() > 1 {
            self.drop_front(1);
        }
    }

    /// Drops the `n` oldest events (`n` at most how many there are).
    fn drop_oldest(&mut self, mut n: usize) {
        while n > 0 {
            let in_front = self.segment_len(0).min(n);
            self.drop_front(in_front);
            n -= in_front;
        }
    }

    /// Drops the `n` oldest events, all in the front segment (`n` is at
    /// least one and at most its length); the segment goes, and with it
    /// the reference to its block, when its last event does.
    fn drop_front(&mut self, n: usize) {
        let whole = n == self.segment_len(0);
        let last = self.ends[n - 1];
        let front = self.segments.front_mut().expect("an event to drop");
        self.bytes -= last.frame - front.frame_start;
        if whole {
            self.segments.pop_front();
        } else {
            front.seq += n as u64;
            front.frame_start = last.frame;
            front.id_start = last.id & !HAS_ID;
        }
        self.ends.drain(..n);
    }

    /// Events retained in segment `i`.
    fn segment_len(&self, i: usize) -> usize {
        let end = self.segments.get(i + 1).map_or(self.next_seq, |s| s.seq);
        (end - self.segments[i].seq) as usize
    }

    /// The segment that holds retained event `seq`.
    fn segment_of(&self, seq: u64) -> usize {
        self.segments.partition_point(|s| s.seq <= seq) - 1
    }

    /// Where retained event `seq` of segment `seg` starts in the block: its
    /// frame, and its upstream id from the segment's `ids_at`.
    fn starts(&self, seg: &Segment, seq: u64) -> (usize, usize) {
        if seq == seg.seq {
            return (seg.frame_start, seg.id_start);
        }
        let before = self.ends[(seq - self.first_seq()) as usize - 1];
        (before.frame, before.id & !HAS_ID)
    }

    /// Retained event `seq`, as a record of its own that shares the block.
    fn record(&self, seq: u64) -> LogRecord {
        let seg = &self.segments[self.segment_of(seq)];
        let (frame_start, id_start) = self.starts(seg, seq);
        let ends = self.ends[(seq - self.first_seq()) as usize];
        LogRecord {
            seq,
            time: seg.time,
            block: seg.block.clone(),
            frame: (frame_start, ends.frame),
            upstream_id: (ends.id & HAS_ID != 0)
                .then(|| (seg.ids_at + id_start, seg.ids_at + (ends.id & !HAS_ID))),
        }
    }

    /// The retained events, oldest first, each made when asked for (a
    /// [`LogRecord`] sharing its batch's block).
    pub fn records(&self) -> impl DoubleEndedIterator<Item = LogRecord> + ExactSizeIterator + '_ {
        self.since(self.first_seq())
    }

    /// The last appended event, to hand to storage.
    pub fn last(&self) -> Option<LogRecord> {
        self.records().next_back()
    }

    /// The retained events from sequence number `seq` on (the ones just
    /// appended, to hand to storage), each made when asked for.
    pub fn since(
        &self,
        seq: u64,
    ) -> impl DoubleEndedIterator<Item = LogRecord> + ExactSizeIterator + '_ {
        let first = self.first_seq();
        let skip = (seq.saturating_sub(first) as usize).min(self.ends.len());
        (skip..self.ends.len()).map(move |i| self.record(first + i as u64))
    }

    /// Lets clients see every event up to `seq` (storage has made them
    /// durable). Never moves back.
    pub fn mark_durable(&mut self, seq: u64) {
        self.durable = self.durable.max(seq.min(self.next_seq - 1));
    }

    /// The newest event clients may see.
    pub fn durable(&self) -> u64 {
        self.durable
    }

    /// The upstream ended the stream: nothing more will be appended.
    pub fn end(&mut self) {
        self.ended = true;
    }

    /// Whether the stream has ended upstream.
    pub fn is_ended(&self) -> bool {
        self.ended
    }

    /// The sequence number of the oldest retained event (the next one's if
    /// the log is empty).
    pub fn first_seq(&self) -> u64 {
        self.segments.front().map_or(self.next_seq, |s| s.seq)
    }

    /// The sequence number the next appended event gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Events retained.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether no event is retained.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Bytes of frames retained.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The upstream id of the newest retained event that had one: where to
    /// resume the upstream from. Looks at segments from the newest, not at
    /// every event.
    pub fn upstream_id(&self) -> Option<&str> {
        let (seg, seq) = self.segments.iter().rev().find_map(|seg| {
            seg.last_id
                .filter(|&seq| seq >= seg.seq)
                .map(|seq| (seg, seq))
        })?;
        let (_, start) = self.starts(seg, seq);
        let end = self.ends[(seq - self.first_seq()) as usize].id & !HAS_ID;
        let id = &seg.block[seg.ids_at + start..seg.ids_at + end];
        Some(core::str::from_utf8(id).expect("stored from a str"))
    }

    /// When the last event was appended (or the log started).
    pub fn last_event_at(&self) -> Millis {
        self.last_event_at
    }

    /// Whether the stream is past retention at `now`: `idle` after its last
    /// event. The host drops an expired stream once nothing uses it.
    pub fn is_expired(&self, now: Millis) -> bool {
        now >= self.last_event_at.saturating_add(self.retention.idle)
    }

    /// Where a new client joining live starts: the next event appended.
    pub fn start_live(&self) -> Start {
        Start {
            next: self.next_seq,
            gap: None,
        }
    }

    /// Where a client starts that sent `last_event_id` (`None`: it wants the
    /// stream from its first event).
    ///
    /// - One of this log's ids still retained, or the one just before the
    ///   oldest: right after it.
    /// - One of this log's ids older than that: a [`GapReason::Retention`]
    ///   gap with the count lost, then the oldest retained event.
    /// - Anything else (another stream's id, an id this log has not issued
    ///   or not yet let clients see, not an id at all): a
    ///   [`GapReason::Unknown`] gap, then the oldest retained event.
    /// - `None`: the oldest retained event, after a retention gap if events
    ///   were already dropped.
    pub fn start(&self, last_event_id: Option<&str>) -> Start {
        let first = self.first_seq();
        let after = match last_event_id {
            None => 0,
            Some(id) => match parse_event_id(id) {
                Some((token, seq)) if token == self.token && seq <= self.durable => seq,
                _ => {
                    return Start {
                        next: first,
                        gap: Some(Gap {
                            reason: GapReason::Unknown,
                            lost: None,
                        }),
                    };
                }
            },
        };
        if after + 1 >= first {
            return Start {
                next: after + 1,
                gap: None,
            };
        }
        Start {
            next: first,
            gap: Some(Gap {
                reason: GapReason::Retention,
                lost: Some(first - after - 1),
            }),
        }
    }

    /// Appends to `out` the frames from sequence number `*next` on that
    /// clients may see, whole frames only, stopping once `out` has grown by
    /// `budget` bytes (at least one frame is written if any is due), and
    /// moves `*next` past them. A client that fell behind the retained log
    /// gets the gap signal first ([`encode_gap`]) and goes on from the
    /// oldest retained event.
    pub fn read(&self, next: &mut u64, budget: usize, out: &mut Vec<u8>) -> Read {
        let mut read = Read::default();
        let first = self.first_seq();
        if *next < first {
            let gap = Gap {
                reason: GapReason::Retention,
                lost: Some(first - *next),
            };
            encode_gap(out, self.token, first, gap);
            read.gap = Some(gap);
            *next = first;
        }
        if *next > self.durable {
            return read;
        }
        let mut written = 0;
        // Frames of one segment lie one after the other in its block: copy
        // runs, not frames.
        let mut at = self.segment_of(*next);
        while *next <= self.durable && (written < budget || read.events == 0) {
            let seg = &self.segments[at];
            let seg_end = self.segments.get(at + 1).map_or(self.next_seq, |s| s.seq);
            let (start, _) = self.starts(seg, *next);
            let from = (*next - first) as usize;
            let mut to = (self.durable.min(seg_end - 1) - first) as usize;
            // An event is written if what was written before it is under
            // budget (the first one always): all of the run, or up to the
            // first one that starts past the budget.
            let starts_past = |k: usize| written + (self.ends[k - 1].frame - start) >= budget;
            if to > from && starts_past(to) {
                to = (from + 1..to).find(|&k| starts_past(k)).unwrap_or(to) - 1;
            }
            let end = self.ends[to].frame;
            out.extend_from_slice(&seg.block[start..end]);
            written += end - start;
            read.events += (to - from + 1) as u64;
            *next += (to - from + 1) as u64;
            at += 1;
        }
        read
    }

    /// Whether a client whose next event would be `next` has everything and
    /// will get nothing more: the stream ended and all of it was sent.
    pub fn is_complete(&self, next: u64) -> bool {
        self.ended && next >= self.next_seq && self.durable + 1 >= self.next_seq
    }
}

/// Appends the gap signal to `out`: an event of type [`GAP_EVENT`] with the
/// id just before `next` (so a client that reconnects right after it resumes
/// at `next` and is not told again) and the data of [`gap_data`].
pub fn encode_gap(out: &mut Vec<u8>, token: StreamToken, next: u64, gap: Gap) {
    let id = event_id(token, next.saturating_sub(1));
    encode_event(out, Some(GAP_EVENT), Some(&id), &gap_data(gap))
        .expect("a valid type, id and data");
}

/// The data of a gap event: `{"reason":"retention","lost":N}`, or
/// `{"reason":"unknown","lost":null}` when the count is not known.
pub fn gap_data(gap: Gap) -> String {
    match gap.lost {
        Some(lost) => format!("{{\"reason\":\"{}\",\"lost\":{lost}}}", gap.reason.as_str()),
        None => format!("{{\"reason\":\"{}\",\"lost\":null}}", gap.reason.as_str()),
    }
}

#[cfg(test)]
mod tests;
