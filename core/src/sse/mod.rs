//! Server-Sent-Events codec: a sans-I/O parser and an encoder.
//!
//! The [`Parser`] follows the WHATWG HTML "event stream interpretation"
//! (<https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation>)
//! and takes bytes as they arrive, in chunks of any size: it reads nothing,
//! spawns nothing and keeps no clock. The [`encode`] functions write the same
//! format for servers.
//!
//! # Driving contract
//!
//! 1. Create one parser per connection: [`Parser::new`] for a fresh stream,
//!    [`Parser::with_last_event_id`] for a resumed one (the id sent as
//!    `Last-Event-ID`).
//! 2. For every chunk of the response body, call [`Parser::feed`], then drain
//!    [`Parser::next_item`] until it returns `None`. `feed` always consumes the
//!    whole chunk; items wait in the parser until drained, in stream order.
//!    Hosts that handle each item at once call [`Parser::feed_with`] instead:
//!    it hands the same items, in the same order, to a closure, borrowed
//!    from the parser's buffers ([`ItemRef`]), so no event is copied (the
//!    proxy's path: a chunk of a thousand events costs no allocation).
//! 3. When the body ends, call [`Parser::finish`] and drain again. Per the
//!    specification an event that was not terminated by a blank line is
//!    discarded: the end of the stream does not dispatch it.
//!
//! How a stream is cut into chunks never changes the items: a BOM, a CRLF or a
//! UTF-8 sequence split over two chunks reads the same as in one.
//!
//! # What the parser yields
//!
//! - [`Item::Event`] for every block with at least one `data` line, even an
//!   empty one (`id: 7` + `data:` is an MCP priming event with empty data).
//!   [`Event::id`] tells whether this block carried a valid `id` field
//!   (`Some("")` resets the last event id); [`Event::last_event_id`] is the
//!   parser's last event id at dispatch, like a browser's
//!   `MessageEvent.lastEventId`.
//! - [`Item::IdOnly`] for a block without data whose `id` field set the last
//!   event id: nothing is dispatched, but a client's cursor must move (the
//!   browser's `EventSource` moves its last event id here too).
//! - [`Item::Comment`] for every `:` line, so that keep-alives count as
//!   liveness.
//! - [`Item::Retry`] for a valid `retry` field, as soon as its line ends.
//!
//! Text is decoded as UTF-8 with replacement characters for invalid bytes, as
//! browsers do; it never fails.
//!
//! # Caps
//!
//! A hostile or broken server must not make the client buffer without bound.
//! [`Limits`] caps the length of one line and the size of one event's data.
//! Past a cap the parser keeps no more bytes: it returns a [`ParseError`] from
//! the `feed` call that crossed the cap, discards the rest of the line (and,
//! for a line that may be a `data`, `event` or `id` field, the whole event
//! it belongs to, which then dispatches nothing), and parses on after it. A
//! caller that treats the error as fatal drops the connection; one that does
//! not simply keeps feeding and loses only the oversized event. Each oversized
//! line or event is reported once.
//!
//! # Example
//!
//! ```
//! use tidemark_core::sse::{encode, Item, Limits, Parser};
//!
//! // A server writes a keep-alive and two events...
//! let mut body = Vec::new();
//! encode::encode_comment(&mut body, "ping");
//! encode::encode_event(&mut body, None, Some("1"), "{\"n\":1}").unwrap();
//! encode::encode_event(&mut body, Some("update"), Some("2"), "line one\nline two").unwrap();
//!
//! // ...which a client resuming after id 0 reads in arbitrary pieces.
//! let mut parser = Parser::with_last_event_id(Limits::default(), "0");
//! let mut items = Vec::new();
//! for chunk in body.chunks(5) {
//!     parser.feed(chunk).unwrap();
//!     while let Some(item) = parser.next_item() {
//!         items.push(item);
//!     }
//! }
//! parser.finish();
//! assert!(parser.next_item().is_none());
//!
//! assert_eq!(items[0], Item::Comment("ping".into()));
//! let Item::Event(event) = &items[2] else { panic!() };
//! assert_eq!(event.event, "update");
//! assert_eq!(event.id.as_deref(), Some("2"));
//! assert_eq!(event.data, "line one\nline two");
//! assert_eq!(parser.last_event_id(), "2");
//! ```

pub mod encode;
mod parse;
#[cfg(test)]
mod tests;

pub use encode::{EncodeError, encode_comment, encode_event, encode_retry};
pub use parse::{Event, EventRef, Item, ItemRef, Limits, ParseError, Parser};

/// Position of the first CR or LF in `hay`.
///
/// Lines are what the parser scans most, so this looks at 16 bytes at a time
/// with word-wide arithmetic (no `unsafe`, no dependency, portable to wasm):
/// for each 64-bit word, a byte equal to CR or LF becomes zero after an XOR and
/// the classic "has a zero byte" test flags it. The lowest flagged byte is
/// always exact, which is the one we want.
#[inline]
pub(crate) fn find_line_end(hay: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    const CRS: u64 = u64::from_ne_bytes([b'\r'; 8]);
    const LFS: u64 = u64::from_ne_bytes([b'\n'; 8]);
    #[inline(always)]
    fn flags(word: u64) -> u64 {
        let cr = word ^ CRS;
        let lf = word ^ LFS;
        (cr.wrapping_sub(ONES) & !cr | lf.wrapping_sub(ONES) & !lf) & HIGHS
    }
    #[inline(always)]
    fn word(bytes: &[u8]) -> u64 {
        u64::from_le_bytes(bytes.try_into().expect("8 bytes"))
    }

    let mut offset = 0;
    let mut blocks = hay.chunks_exact(16);
    for block in &mut blocks {
        let (a, b) = (flags(word(&block[..8])), flags(word(&block[8..])));
        if a | b != 0 {
            let bit = if a != 0 {
                a.trailing_zeros()
            } else {
                64 + b.trailing_zeros()
            };
            return Some(offset + bit as usize / 8);
        }
        offset += 16;
    }
    blocks
        .remainder()
        .iter()
        .position(|&b| b == b'\n' || b == b'\r')
        .map(|i| offset + i)
}

/// Splits `text` at CR, LF and CRLF, the way the parser ends lines.
pub(crate) fn split_lines(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        let current = rest?;
        match find_line_end(current.as_bytes()) {
            None => {
                rest = None;
                Some(current)
            }
            Some(i) => {
                let bytes = current.as_bytes();
                let next = if bytes[i] == b'\r' && bytes.get(i + 1) == Some(&b'\n') {
                    i + 2
                } else {
                    i + 1
                };
                rest = Some(&current[next..]);
                Some(&current[..i])
            }
        }
    })
}
