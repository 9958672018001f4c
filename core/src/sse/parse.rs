//! The event-stream parser. See the [module docs](super) for the driving
//! contract.
//!
//! Lines that lie whole inside a chunk are interpreted in place; only a line
//! cut by a chunk boundary is copied into the line buffer until its end
//! arrives. `data` values are appended as raw bytes and decoded once, at
//! dispatch: a replacement character can only span bytes between two line
//! ends, and CR, LF and `:` never occur inside a UTF-8 sequence, so decoding
//! each line, each field or the whole data buffer gives the same text as
//! decoding the whole stream.

use super::find_line_end;
use std::borrow::Cow;
use std::collections::VecDeque;
use std::fmt;

const BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];
/// A data buffer larger than this is freed after its event, so that one huge
/// event does not pin its memory for the rest of the stream.
const KEEP_DATA_BUFFER: usize = 1 << 20;

/// Caps on what one connection may make the parser hold.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest line, in bytes, without its line end (field name included).
    pub max_line: usize,
    /// Largest event data, in bytes, after joining its `data` lines with LF.
    pub max_event: usize,
}

impl Default for Limits {
    /// 16 MiB for both: far above any sane event, small enough that a broken
    /// stream cannot exhaust memory.
    fn default() -> Self {
        Limits {
            max_line: 16 << 20,
            max_event: 16 << 20,
        }
    }
}

/// What the parser yields, in stream order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    /// A dispatched event.
    Event(Event),
    /// A comment line (`:` and what follows, one leading space removed):
    /// typically a keep-alive.
    Comment(String),
    /// A valid `retry` field: the server's reconnection time in milliseconds
    /// (saturating at `u64::MAX`).
    Retry(u64),
    /// A block without data whose `id` field set the last event id (`""`
    /// resets it), or an event discarded for exceeding a cap whose block had
    /// an `id`. Nothing was dispatched, but the cursor must move.
    IdOnly(String),
}

/// An [`Item`] borrowed from the parser's buffers, for
/// [`Parser::feed_with`]: the same items, without a copy of each.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ItemRef<'a> {
    /// See [`Item::Event`].
    Event(EventRef<'a>),
    /// See [`Item::Comment`].
    Comment(&'a str),
    /// See [`Item::Retry`].
    Retry(u64),
    /// See [`Item::IdOnly`].
    IdOnly(&'a str),
}

impl ItemRef<'_> {
    /// The owned item.
    pub fn to_item(self) -> Item {
        match self {
            ItemRef::Event(event) => Item::Event(event.to_event()),
            ItemRef::Comment(text) => Item::Comment(text.to_owned()),
            ItemRef::Retry(ms) => Item::Retry(ms),
            ItemRef::IdOnly(id) => Item::IdOnly(id.to_owned()),
        }
    }
}

impl Item {
    /// The item borrowed.
    pub fn as_item_ref(&self) -> ItemRef<'_> {
        match self {
            Item::Event(event) => ItemRef::Event(event.as_event_ref()),
            Item::Comment(text) => ItemRef::Comment(text),
            Item::Retry(ms) => ItemRef::Retry(*ms),
            Item::IdOnly(id) => ItemRef::IdOnly(id),
        }
    }
}

/// An [`Event`] borrowed from the parser's buffers; the fields mean the
/// same.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct EventRef<'a> {
    /// See [`Event::event`].
    pub event: &'a str,
    /// See [`Event::data`].
    pub data: &'a str,
    /// See [`Event::id`].
    pub id: Option<&'a str>,
    /// See [`Event::last_event_id`].
    pub last_event_id: &'a str,
}

impl EventRef<'_> {
    /// The owned event.
    pub fn to_event(self) -> Event {
        Event {
            event: self.event.to_owned(),
            data: self.data.to_owned(),
            id: self.id.map(str::to_owned),
            last_event_id: self.last_event_id.to_owned(),
        }
    }
}

impl Event {
    /// The event borrowed.
    pub fn as_event_ref(&self) -> EventRef<'_> {
        EventRef {
            event: &self.event,
            data: &self.data,
            id: self.id.as_deref(),
            last_event_id: &self.last_event_id,
        }
    }
}

/// One dispatched event.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Event {
    /// The event type: the `event` field, or `"message"` when it was absent or
    /// empty.
    pub event: String,
    /// The `data` lines joined with LF.
    pub data: String,
    /// `Some` iff this block had a valid `id` field (the last one wins);
    /// `Some("")` resets the last event id.
    pub id: Option<String>,
    /// The last event id at dispatch, set by this block or an earlier one
    /// (like a browser's `MessageEvent.lastEventId`).
    pub last_event_id: String,
}

/// A stream exceeded one of its [`Limits`]. The parser has discarded the
/// oversized part and can go on (see the [module docs](super#caps)).
#[non_exhaustive]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// A line was longer than [`Limits::max_line`].
    LineTooLong {
        /// The limit in force.
        limit: usize,
    },
    /// An event's data grew beyond [`Limits::max_event`].
    EventTooLarge {
        /// The limit in force.
        limit: usize,
    },
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::LineTooLong { limit } => {
                write!(f, "event-stream line longer than {limit} bytes")
            }
            ParseError::EventTooLarge { limit } => {
                write!(f, "event-stream event data larger than {limit} bytes")
            }
        }
    }
}

impl std::error::Error for ParseError {}

/// Sans-I/O event-stream parser. See the [module docs](super).
#[derive(Clone, Debug)]
pub struct Parser {
    limits: Limits,
    /// How many bytes of a leading BOM have matched; 3 once decided.
    bom: u8,
    /// The last chunk ended with CR: an LF opening the next one belongs to it.
    after_cr: bool,
    /// Discarding the rest of an oversized line.
    skipping_line: bool,
    /// A line that was cut by a chunk boundary, at most `max_line` bytes.
    line: Vec<u8>,
    /// The data buffer without its trailing LF, decoded line by line (the
    /// same text as decoding it whole: see the module docs).
    data: String,
    /// Bytes of the data buffer as received, at most `max_event`.
    data_len: usize,
    has_data: bool,
    event_type: String,
    /// The event source's "last event ID string": the specification's last
    /// event ID buffer as of the last dispatch, which is what a reconnection
    /// sends.
    last_event_id: String,
    /// The value of this block's last valid `id` field, if `id_in_block`: the
    /// buffer when it differs from `last_event_id`.
    id_buffer: String,
    /// This block had a valid `id` field.
    id_in_block: bool,
    /// This block lost a line or its data to a cap: it dispatches no event.
    poisoned: bool,
    items: VecDeque<Item>,
    /// The first error of the current `feed`.
    error: Option<ParseError>,
}

impl Parser {
    /// A parser for a new stream, with an empty last event id.
    pub fn new(limits: Limits) -> Self {
        Parser {
            limits,
            bom: 0,
            after_cr: false,
            skipping_line: false,
            line: Vec::new(),
            data: String::new(),
            data_len: 0,
            has_data: false,
            event_type: String::new(),
            id_buffer: String::new(),
            last_event_id: String::new(),
            id_in_block: false,
            poisoned: false,
            items: VecDeque::new(),
            error: None,
        }
    }

    /// A parser for a resumed stream: the last event id starts at `id`, the
    /// one sent as `Last-Event-ID`, so that events without an `id` field
    /// report it as their [`Event::last_event_id`].
    pub fn with_last_event_id(limits: Limits, id: &str) -> Self {
        let mut parser = Parser::new(limits);
        parser.last_event_id.push_str(id);
        parser
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The last event id as of the last dispatched block (or the one the
    /// parser was created with): what a reconnection sends as
    /// `Last-Event-ID`. An `id` field in a block that has not ended yet does
    /// not count, as in a browser.
    pub fn last_event_id(&self) -> &str {
        &self.last_event_id
    }

    /// Parses one chunk of the stream and queues the items it completes; drain
    /// them with [`next_item`](Self::next_item).
    ///
    /// The whole chunk is always consumed. On error (a cap was exceeded) the
    /// oversized line or event is discarded, everything else in the chunk is
    /// parsed and queued as usual, and the first error met in this chunk is
    /// returned; the caller may keep feeding.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), ParseError> {
        let mut items = std::mem::take(&mut self.items);
        let fed = self.feed_with(chunk, |item| items.push_back(item.to_item()));
        self.items = items;
        fed
    }

    /// [`feed`](Self::feed) for hosts that take each item as it completes,
    /// borrowed from the parser's buffers: `sink` gets every item the chunk
    /// completes, in order, and nothing is queued (nor copied). Items
    /// already queued by `feed` stay queued.
    pub fn feed_with(
        &mut self,
        chunk: &[u8],
        mut sink: impl FnMut(ItemRef<'_>),
    ) -> Result<(), ParseError> {
        let sink = &mut sink;
        let mut rest = chunk;
        if self.bom < 3 {
            rest = self.skip_bom(rest);
        }
        if self.after_cr && !rest.is_empty() {
            self.after_cr = false;
            if rest[0] == b'\n' {
                rest = &rest[1..];
            }
        }
        // The chunk's text, validated once (up to a sequence the next chunk
        // completes, or the first invalid byte): lines inside it need no
        // decoding of their own.
        let mut text = match std::str::from_utf8(rest) {
            Ok(text) => text,
            Err(e) => std::str::from_utf8(&rest[..e.valid_up_to()]).expect("valid up to there"),
        };
        loop {
            if self.at_block_start()
                && let Some((len, event)) = self.whole_event(rest, text)
            {
                self.dispatch_whole(event, sink);
                rest = &rest[len..];
                text = &text[len..];
                continue;
            }
            let Some(end) = find_line_end(rest) else {
                break;
            };
            let line = &rest[..end];
            let mut next = end + 1;
            if rest[end] == b'\r' {
                match rest.get(next) {
                    Some(b'\n') => next += 1,
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            // Both cuts follow an ASCII byte, so they are char boundaries.
            self.end_line(line, text.get(..end), sink);
            rest = &rest[next..];
            text = text.get(next..).unwrap_or("");
        }
        if !rest.is_empty() {
            self.carry(rest);
        }
        self.error.take().map_or(Ok(()), Err)
    }

    /// The next queued item, oldest first.
    pub fn next_item(&mut self) -> Option<Item> {
        self.items.pop_front()
    }

    /// Ends the stream: an unterminated last line and an event not closed by a
    /// blank line are discarded, as the specification requires. Queued items
    /// stay queued.
    ///
    /// The parser is then ready for the next stream (a reconnection): a BOM is
    /// accepted again, and the last event id is kept, as a browser keeps it
    /// across reconnections.
    pub fn finish(&mut self) {
        self.bom = 0;
        self.after_cr = false;
        self.skipping_line = false;
        self.line.clear();
        self.reset_block();
    }

    /// Bytes of capacity held by the parser's buffers (queued items aside).
    #[doc(hidden)]
    pub fn buffered(&self) -> usize {
        self.line.capacity()
            + self.data.capacity()
            + self.event_type.capacity()
            + self.id_buffer.capacity()
            + self.last_event_id.capacity()
    }

    /// Whether no line or field of a block is pending: the next byte
    /// starts a block.
    #[inline]
    fn at_block_start(&self) -> bool {
        self.line.is_empty()
            && !self.skipping_line
            && !self.has_data
            && !self.id_in_block
            && !self.poisoned
            && self.event_type.is_empty()
    }

    /// The block at the start of `rest`, if it lies whole in the validated
    /// `text` and has the shape of nearly every event: LF line ends, one
    /// `data` line, any `id` and `event` lines, no other line, nothing over
    /// a cap. Its length (blank line included) and fields, borrowed from
    /// the chunk. Any other block is `None` and goes through the lines one
    /// by one; the two give the same items (the split property tests compare
    /// whole chunks with one-byte chunks, which never hold a whole block).
    #[inline]
    fn whole_event<'a>(&self, rest: &'a [u8], text: &'a str) -> Option<(usize, WholeEvent<'a>)> {
        let mut event = WholeEvent {
            event: "",
            data: None,
            id: None,
        };
        let mut at = 0;
        loop {
            let tail = rest.get(at..)?;
            let end = find_line_end(tail)?;
            if tail[end] != b'\n' {
                return None;
            }
            if end == 0 {
                event.data?;
                return Some((at + 1, event));
            }
            if end > self.limits.max_line {
                return None;
            }
            let line = &tail[..end];
            let (field, name) = if line.starts_with(b"data:") {
                (Field::Data, 5)
            } else if line.starts_with(b"id:") {
                (Field::Id, 3)
            } else if line.starts_with(b"event:") {
                (Field::Event, 6)
            } else {
                return None;
            };
            let start = name + usize::from(line.get(name) == Some(&b' '));
            let value = text.get(at + start..at + end)?;
            match field {
                Field::Data if event.data.is_none() && value.len() <= self.limits.max_event => {
                    event.data = Some(value);
                }
                Field::Id
                    if !value
                        .as_bytes()
                        .iter()
                        .fold(false, |nul, &b| nul | (b == 0)) =>
                {
                    event.id = Some(value);
                }
                Field::Event => event.event = value,
                _ => return None,
            }
            at += end + 1;
        }
    }

    /// Dispatches a block [`whole_event`](Self::whole_event) read, as
    /// [`dispatch`](Self::dispatch) would have.
    #[inline]
    fn dispatch_whole(&mut self, event: WholeEvent<'_>, sink: &mut impl FnMut(ItemRef<'_>)) {
        if let Some(id) = event.id {
            self.last_event_id.clear();
            self.last_event_id.push_str(id);
        }
        sink(ItemRef::Event(EventRef {
            event: if event.event.is_empty() {
                "message"
            } else {
                event.event
            },
            data: event.data.unwrap_or_default(),
            id: event.id.map(|_| self.last_event_id.as_str()),
            last_event_id: &self.last_event_id,
        }));
    }

    /// Drops a leading UTF-8 BOM, even one split over several chunks.
    fn skip_bom<'a>(&mut self, mut rest: &'a [u8]) -> &'a [u8] {
        while let Some((&byte, tail)) = rest.split_first() {
            let matched = usize::from(self.bom);
            if byte != BOM[matched] {
                self.bom = 3;
                // Not a BOM after all: what matched so far is line content.
                if matched > 0 {
                    self.carry(&BOM[..matched]);
                }
                return rest;
            }
            self.bom += 1;
            rest = tail;
            if self.bom == 3 {
                break;
            }
        }
        rest
    }

    /// Keeps the start of a line whose end is in a later chunk.
    fn carry(&mut self, piece: &[u8]) {
        if self.skipping_line {
            return;
        }
        if self.line.len() + piece.len() > self.limits.max_line {
            self.line_too_long(piece);
            self.skipping_line = true;
            return;
        }
        reserve_capped(&mut self.line, piece.len(), self.limits.max_line);
        self.line.extend_from_slice(piece);
    }

    /// A line end was found; `tail` is the part of the line in this chunk.
    /// `tail_text` is `tail` as text, when the chunk's validation covered it.
    fn end_line(
        &mut self,
        tail: &[u8],
        tail_text: Option<&str>,
        sink: &mut impl FnMut(ItemRef<'_>),
    ) {
        if self.skipping_line {
            self.skipping_line = false;
            return;
        }
        if self.line.is_empty() {
            if tail.len() > self.limits.max_line {
                self.line_too_long(tail);
            } else {
                self.interpret(tail, tail_text, sink);
            }
            return;
        }
        if self.line.len() + tail.len() > self.limits.max_line {
            self.line_too_long(tail);
            return;
        }
        self.line.extend_from_slice(tail);
        let line = std::mem::take(&mut self.line);
        self.interpret(&line, None, sink);
        self.line = line;
        self.line.clear();
    }

    /// Reports an oversized line (the line buffer plus `more`) and discards
    /// it, and with it its event if the line may have been one of its fields.
    fn line_too_long(&mut self, more: &[u8]) {
        let max = self.limits.max_line;
        let take = max.saturating_sub(self.line.len()).min(more.len());
        let shapes_event = if self.line.is_empty() {
            may_shape_event(&more[..take])
        } else {
            reserve_capped(&mut self.line, take, max);
            self.line.extend_from_slice(&more[..take]);
            may_shape_event(&self.line)
        };
        if shapes_event {
            self.poison();
        }
        // Free the buffer: an oversized line is an anomaly, not a pattern.
        self.line = Vec::new();
        self.fail(ParseError::LineTooLong { limit: max });
    }

    fn fail(&mut self, error: ParseError) {
        self.error.get_or_insert(error);
    }

    fn poison(&mut self) {
        self.poisoned = true;
        self.has_data = false;
        self.data = String::new();
        self.data_len = 0;
    }

    /// The "process the line" steps of the specification, for one complete
    /// line without its line end; `text` is the line as text, if it has been
    /// validated already.
    fn interpret(&mut self, line: &[u8], text: Option<&str>, sink: &mut impl FnMut(ItemRef<'_>)) {
        if line.is_empty() {
            self.dispatch(sink);
            return;
        }
        // The two fields of nearly every event first, without a search.
        let (name, start) = if line.starts_with(b"data:") {
            (&b"data"[..], 5)
        } else if line.starts_with(b"id:") {
            (&b"id"[..], 3)
        } else {
            match line.iter().position(|&b| b == b':') {
                Some(colon) => (&line[..colon], colon + 1),
                None => (line, line.len()),
            }
        };
        let start = start + usize::from(line.get(start) == Some(&b' '));
        let value = &line[start..];
        // Decoded only if the chunk's validation did not cover it.
        let value_text = || text.map_or_else(|| decode(value), |t| Cow::Borrowed(&t[start..]));
        match name {
            b"" => sink(ItemRef::Comment(&value_text())),
            b"data" => self.append_data(value.len(), value_text),
            b"event" => {
                self.event_type.clear();
                self.event_type.push_str(&value_text());
            }
            // The NUL test has no early exit: for short ids it compiles to a
            // few wide compares, cheaper than a call to `memchr`.
            b"id" if !value.iter().fold(false, |nul, &b| nul | (b == 0)) => {
                self.id_buffer.clear();
                self.id_buffer.push_str(&value_text());
                self.id_in_block = true;
            }
            b"retry" if !value.is_empty() && value.iter().all(u8::is_ascii_digit) => {
                let ms = value.iter().fold(0u64, |ms, &digit| {
                    ms.saturating_mul(10)
                        .saturating_add(u64::from(digit - b'0'))
                });
                sink(ItemRef::Retry(ms));
            }
            _ => {}
        }
    }

    /// Appends a `data` value of `len` bytes as received, whose text is
    /// `text()`.
    fn append_data<'a>(&mut self, len: usize, text: impl FnOnce() -> Cow<'a, str>) {
        if self.poisoned {
            return;
        }
        let separator = usize::from(self.has_data);
        let max = self.limits.max_event;
        if self.data_len + separator + len > max {
            self.poison();
            self.fail(ParseError::EventTooLarge { limit: max });
            return;
        }
        let text = text();
        // Capped as received; a replacement character may make the text a
        // little longer than that.
        let data = &mut self.data;
        if let Some(more) = capped_growth(data.len(), data.capacity(), separator + text.len(), max)
        {
            data.reserve_exact(more);
        }
        if self.has_data {
            self.data.push('\n');
        }
        self.data.push_str(&text);
        self.data_len += separator + len;
        self.has_data = true;
    }

    /// The "dispatch the event" steps of the specification, at a blank line.
    fn dispatch(&mut self, sink: &mut impl FnMut(ItemRef<'_>)) {
        let id_in_block = std::mem::take(&mut self.id_in_block);
        if id_in_block {
            // No copy: the buffer is not read again before the next `id`
            // field clears it.
            std::mem::swap(&mut self.last_event_id, &mut self.id_buffer);
        }
        if !self.has_data {
            if id_in_block {
                sink(ItemRef::IdOnly(&self.last_event_id));
            }
            self.reset_block();
            return;
        }
        self.has_data = false;
        sink(ItemRef::Event(EventRef {
            event: if self.event_type.is_empty() {
                "message"
            } else {
                &self.event_type
            },
            data: &self.data,
            id: id_in_block.then_some(self.last_event_id.as_str()),
            last_event_id: &self.last_event_id,
        }));
        // The buffers are reused, so a multi-line event never reallocates
        // once the parser has seen one as large.
        self.data.clear();
        self.data_len = 0;
        if self.data.capacity() > KEEP_DATA_BUFFER {
            self.data = String::new();
        }
        self.event_type.clear();
    }

    fn reset_block(&mut self) {
        self.id_in_block = false;
        self.poisoned = false;
        self.has_data = false;
        self.data.clear();
        self.data_len = 0;
        self.event_type.clear();
    }
}

/// The fields of a block read whole from a chunk.
struct WholeEvent<'a> {
    event: &'a str,
    data: Option<&'a str>,
    id: Option<&'a str>,
}

/// The fields [`Parser::whole_event`] reads.
#[derive(Copy, Clone)]
enum Field {
    Data,
    Id,
    Event,
}

/// Grows `buf` for `additional` more bytes, doubling as usual but never past
/// `cap` (the caller has checked that `len + additional <= cap`), so that a
/// capped buffer's memory is capped too.
#[inline]
fn reserve_capped(buf: &mut Vec<u8>, additional: usize, cap: usize) {
    if let Some(more) = capped_growth(buf.len(), buf.capacity(), additional, cap) {
        buf.reserve_exact(more);
    }
}

/// What to reserve for `additional` more bytes in a buffer of `len` bytes
/// and `capacity`: `None` if they fit, else doubling but not past `cap`
/// (nor below what is needed).
#[inline]
fn capped_growth(len: usize, capacity: usize, additional: usize, cap: usize) -> Option<usize> {
    let needed = len + additional;
    (needed > capacity).then(|| (capacity * 2).min(cap).max(needed) - len)
}

/// Whether an oversized line whose first `max_line` bytes are `head` may be a
/// `data`, `event` or `id` field, whose loss would corrupt its event. Only
/// the head is looked at, so that the answer does not depend on where chunks
/// were cut.
fn may_shape_event(head: &[u8]) -> bool {
    match head.iter().position(|&b| b == b':') {
        Some(colon) => matches!(&head[..colon], b"data" | b"event" | b"id"),
        // The name may run past `head` (only with a tiny `max_line`).
        None => [&b"data"[..], b"event", b"id"]
            .iter()
            .any(|name| name.starts_with(head)),
    }
}

/// `String::from_utf8_lossy`, with the fast validation of `from_utf8` for the
/// common valid case (the lossy path walks the bytes one sequence at a time).
#[inline]
fn decode(bytes: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(text) => Cow::Borrowed(text),
        Err(_) => String::from_utf8_lossy(bytes),
    }
}
