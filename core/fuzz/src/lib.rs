//! Fuzz checks of `tidemark-core`, shared by the libFuzzer targets and the
//! stable `replay` binary.

#![forbid(unsafe_code)]

use tidemark_core::sse::{Event, Item, Limits, Parser, encode_event};

/// Record separator for the round trip: records are events.
const RECORD: char = '\u{1E}';
/// Unit separator inside a record: data, then event type, then id.
const UNIT: char = '\u{1F}';

/// The `parse` target. Input: two bytes choosing a split point, one byte
/// choosing the limits, then the stream. Checks that the parser
///
/// - never panics, whatever the bytes and limits;
/// - reads the stream the same whole and cut in two at the split point (items,
///   and whether a cap was exceeded);
/// - reads back what the encoder writes for events made from the stream's
///   text (records split at U+001E into data, type and id at U+001F).
pub fn check_parse(data: &[u8]) {
    let Some((&[a, b, mode], stream)) = data.split_first_chunk::<3>() else {
        return;
    };
    let split = usize::from(u16::from_le_bytes([a, b])) % (stream.len() + 1);
    let limits = if mode & 1 == 0 {
        Limits::default()
    } else {
        let n = usize::from(mode >> 1);
        Limits {
            max_line: 1 + n,
            max_event: n * 2,
        }
    };
    let whole = parse(limits, &[stream]);
    let (head, tail) = stream.split_at(split);
    let parts = parse(limits, &[head, tail]);
    assert_eq!(whole, parts, "split at {split} changed the items");
    round_trip(stream, split);
}

/// Items and whether any feed failed.
fn parse(limits: Limits, chunks: &[&[u8]]) -> (Vec<Item>, bool) {
    let mut parser = Parser::new(limits);
    let mut items = Vec::new();
    let mut failed = false;
    for chunk in chunks {
        failed |= parser.feed(chunk).is_err();
        while let Some(item) = parser.next_item() {
            items.push(item);
        }
    }
    parser.finish();
    items.extend(std::iter::from_fn(|| parser.next_item()));
    (items, failed)
}

fn round_trip(stream: &[u8], split: usize) {
    let text = String::from_utf8_lossy(stream);
    let mut out = Vec::new();
    let mut expected = Vec::new();
    let mut last_event_id = String::new();
    for record in text.split(RECORD) {
        let mut units = record.splitn(3, UNIT);
        let data = units.next().unwrap_or_default();
        let event = units.next();
        let id = units.next();
        let valid = !event.is_some_and(|e| e.contains(['\r', '\n']))
            && !id.is_some_and(|i| i.contains(['\r', '\n', '\0']));
        let result = encode_event(&mut out, event, id, data);
        assert_eq!(result.is_ok(), valid, "{event:?} {id:?}");
        if !valid {
            continue;
        }
        if let Some(id) = id {
            last_event_id = id.to_owned();
        }
        expected.push(Item::Event(Event {
            event: event
                .filter(|e| !e.is_empty())
                .unwrap_or("message")
                .to_owned(),
            data: data.replace("\r\n", "\n").replace('\r', "\n"),
            id: id.map(str::to_owned),
            last_event_id: last_event_id.clone(),
        }));
    }
    let split = split.min(out.len());
    let (items, failed) = parse(Limits::default(), &[&out[..split], &out[split..]]);
    assert!(!failed);
    assert_eq!(
        items,
        expected,
        "encoded: {:?}",
        String::from_utf8_lossy(&out)
    );
}
