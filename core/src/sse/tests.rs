use super::*;
use proptest::prelude::*;
use proptest::sample::Index;

const BOM: &[u8] = b"\xEF\xBB\xBF";

fn event(event: &str, data: &str, id: Option<&str>, last_event_id: &str) -> Item {
    Item::Event(Event {
        event: event.into(),
        data: data.into(),
        id: id.map(Into::into),
        last_event_id: last_event_id.into(),
    })
}

fn message(data: &str) -> Item {
    event("message", data, None, "")
}

fn drain(parser: &mut Parser, items: &mut Vec<Item>) {
    while let Some(item) = parser.next_item() {
        items.push(item);
    }
}

/// Feeds `chunks` in order, then finishes; returns the items and the errors.
fn parse_chunks<'a>(
    mut parser: Parser,
    chunks: impl IntoIterator<Item = &'a [u8]>,
) -> (Vec<Item>, Vec<ParseError>) {
    let mut items = Vec::new();
    let mut errors = Vec::new();
    for chunk in chunks {
        if let Err(error) = parser.feed(chunk) {
            errors.push(error);
        }
        drain(&mut parser, &mut items);
    }
    parser.finish();
    drain(&mut parser, &mut items);
    (items, errors)
}

fn parse(input: &[u8]) -> Vec<Item> {
    let (items, errors) = parse_chunks(Parser::new(Limits::default()), [input]);
    assert_eq!(errors, []);
    items
}

/// Cuts `input` before each of `cuts` (positions in any order, duplicates
/// allowed, so empty chunks happen too).
fn split_at<'a>(input: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut cuts = cuts.to_vec();
    cuts.sort_unstable();
    let mut chunks = Vec::new();
    let mut start = 0;
    for cut in cuts {
        chunks.push(&input[start..cut]);
        start = cut;
    }
    chunks.push(&input[start..]);
    chunks
}

/// The specification's steps, literally: decode the whole stream, then walk
/// its lines with string buffers. No chunks, no caps, no cleverness.
fn reference(input: &[u8], initial_id: &str) -> Vec<Item> {
    let text = String::from_utf8_lossy(input.strip_prefix(BOM).unwrap_or(input)).into_owned();
    let mut items = Vec::new();
    let (mut data, mut event_type) = (String::new(), String::new());
    let mut last_event_id = initial_id.to_owned();
    let mut id_in_block = false;
    let mut rest = text.as_str();
    while let Some(end) = rest.find(['\r', '\n']) {
        let line = &rest[..end];
        rest = if rest[end..].starts_with("\r\n") {
            &rest[end + 2..]
        } else {
            &rest[end + 1..]
        };
        if line.is_empty() {
            if data.is_empty() {
                if id_in_block {
                    items.push(Item::IdOnly(last_event_id.clone()));
                }
            } else {
                data.pop();
                items.push(Item::Event(Event {
                    event: if event_type.is_empty() {
                        "message".into()
                    } else {
                        event_type.clone()
                    },
                    data: data.clone(),
                    id: id_in_block.then(|| last_event_id.clone()),
                    last_event_id: last_event_id.clone(),
                }));
            }
            data.clear();
            event_type.clear();
            id_in_block = false;
            continue;
        }
        if let Some(comment) = line.strip_prefix(':') {
            let comment = comment.strip_prefix(' ').unwrap_or(comment);
            items.push(Item::Comment(comment.into()));
            continue;
        }
        let (name, value) = match line.split_once(':') {
            Some((name, value)) => (name, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match name {
            "event" => event_type = value.into(),
            "data" => {
                data.push_str(value);
                data.push('\n');
            }
            "id" if !value.contains('\0') => {
                last_event_id = value.into();
                id_in_block = true;
            }
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                let ms = value.parse::<u64>().unwrap_or(u64::MAX);
                items.push(Item::Retry(ms));
            }
            _ => {}
        }
    }
    items
}

/// Rules of the specification, one case each: the input, and the items
/// expected at the end of the stream.
fn cases() -> Vec<(&'static str, &'static [u8], Vec<Item>)> {
    vec![
        (
            "spec: a space after the colon is optional",
            b"data:test\n\ndata: test\n\n",
            vec![message("test"), message("test")],
        ),
        (
            "spec: a name alone is a field with an empty value; the last event is not dispatched",
            b"data\n\ndata\ndata\n\ndata:",
            vec![message(""), message("\n")],
        ),
        (
            "spec: comment block, id, id reset, two leading spaces",
            b": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\ndata:  third event\n\n",
            vec![
                Item::Comment("test stream".into()),
                event("message", "first event", Some("1"), "1"),
                event("message", "second event", Some(""), ""),
                message(" third event"),
            ],
        ),
        (
            "spec: data lines are joined with LF",
            b"data: YHOO\ndata: +2\ndata: 10\n\n",
            vec![message("YHOO\n+2\n10")],
        ),
        (
            "spec: event types",
            b"event: add\ndata: 73857293\n\nevent: remove\ndata: 2153\n\nevent: add\ndata: 113411\n\n",
            vec![
                event("add", "73857293", None, ""),
                event("remove", "2153", None, ""),
                event("add", "113411", None, ""),
            ],
        ),
        (
            "a leading BOM is dropped",
            b"\xEF\xBB\xBFdata: a\n\n",
            vec![message("a")],
        ),
        (
            "only one leading BOM is dropped",
            b"\xEF\xBB\xBF\xEF\xBB\xBFdata: a\n\ndata: b\n\n",
            vec![message("b")],
        ),
        (
            "a BOM later in the stream is content",
            b"data: a\n\n\xEF\xBB\xBFdata: b\n\ndata: \xEF\xBB\xBFc\n\n",
            vec![message("a"), message("\u{FEFF}c")],
        ),
        (
            "the start of a BOM is content",
            b"\xEF\xBBdata: a\n\ndata: b\n\n",
            vec![message("b")],
        ),
        (
            "CR ends lines",
            b"data: a\rdata: b\r\rdata: c\r\r",
            vec![message("a\nb"), message("c")],
        ),
        (
            "CRLF ends lines",
            b"data: a\r\ndata: b\r\n\r\n",
            vec![message("a\nb")],
        ),
        (
            "CR then CRLF is two line ends, LF then CR too",
            b"data: a\r\r\ndata: b\n\rdata: c\n\n",
            vec![message("a"), message("b"), message("c")],
        ),
        (
            "the event type defaults to message and does not outlive its block",
            b"event: x\ndata: 1\n\ndata: 2\n\nevent: y\n\ndata: 3\n\nevent:\ndata: 4\n\nevent\ndata: 5\n\n",
            vec![
                event("x", "1", None, ""),
                message("2"),
                message("3"),
                message("4"),
                message("5"),
            ],
        ),
        (
            "an id with NUL is ignored",
            b"id: 1\n\ndata: a\nid: 2\x003\n\n",
            vec![Item::IdOnly("1".into()), event("message", "a", None, "1")],
        ),
        (
            "the last valid id of a block wins",
            b"id: 1\nid: 2\ndata: a\n\nid: 3\nid: 4\x00\ndata: b\n\n",
            vec![
                event("message", "a", Some("2"), "2"),
                event("message", "b", Some("3"), "3"),
            ],
        ),
        (
            "an empty id resets the last event id",
            b"id: 5\ndata: a\n\nid\ndata: b\n\nid: 6\n\nid:\ndata: c\n\nid: 7\n\nid: \ndata: d\n\ndata: e\n\n",
            vec![
                event("message", "a", Some("5"), "5"),
                event("message", "b", Some(""), ""),
                Item::IdOnly("6".into()),
                event("message", "c", Some(""), ""),
                Item::IdOnly("7".into()),
                event("message", "d", Some(""), ""),
                message("e"),
            ],
        ),
        (
            "the last event id carries over to events without an id",
            b"id: 1\ndata: a\n\ndata: b\n\n",
            vec![
                event("message", "a", Some("1"), "1"),
                event("message", "b", None, "1"),
            ],
        ),
        (
            "retry only when all ASCII digits",
            b"retry: 1000\nretry: 007\nretry: 10a\nretry: -1\nretry:\nretry\nretry: 1.5\nretry:  5\nretry: \xD9\xA3\nretry: 99999999999999999999999\n",
            vec![Item::Retry(1000), Item::Retry(7), Item::Retry(u64::MAX)],
        ),
        (
            "unknown fields are ignored and names are case-sensitive",
            b"foo: bar\ndata: a\nData: b\n data: c\ndata : d\n\n",
            vec![message("a")],
        ),
        (
            "only one leading space is removed, and only a space",
            b"data:  a\n\ndata:a\n\ndata:\ta\n\ndata: a:b \n\n",
            vec![message(" a"), message("a"), message("\ta"), message("a:b ")],
        ),
        (
            "a block without data dispatches nothing",
            b"event: x\n\nretry: 5\n\n: c\n\n\n\n\n",
            vec![Item::Retry(5), Item::Comment("c".into())],
        ),
        (
            "a block without data moves the last event id",
            b"id: 3\n\nid: 4\nevent: x\n\ndata: a\n\n",
            vec![
                Item::IdOnly("3".into()),
                Item::IdOnly("4".into()),
                event("message", "a", None, "4"),
            ],
        ),
        (
            "an empty data line dispatches an empty event (MCP priming)",
            b"id: 42\ndata: \n\nid: 43\ndata:\n\n",
            vec![
                event("message", "", Some("42"), "42"),
                event("message", "", Some("43"), "43"),
            ],
        ),
        (
            "comments are surfaced in order, one leading space removed",
            b":\n: ping\n:  two\n:no-space\ndata: a\n: keep\ndata: b\n\n",
            vec![
                Item::Comment("".into()),
                Item::Comment("ping".into()),
                Item::Comment(" two".into()),
                Item::Comment("no-space".into()),
                Item::Comment("keep".into()),
                message("a\nb"),
            ],
        ),
        (
            "invalid UTF-8 becomes replacement characters",
            b"data: a\xFFb\ndata: \xE2\x82\ndata: \xF0\x9F\x8C\n\nid: \xC3\n\nevent: \xC0\ndata: x\n\n",
            vec![
                message("a\u{FFFD}b\n\u{FFFD}\n\u{FFFD}"),
                Item::IdOnly("\u{FFFD}".into()),
                event("\u{FFFD}", "x", None, "\u{FFFD}"),
            ],
        ),
        (
            "multibyte UTF-8 and NUL pass through",
            "event: a\0b\ndata: héllo 🌊\0\n\n".as_bytes(),
            vec![event("a\0b", "héllo 🌊\0", None, "")],
        ),
        (
            "an event not closed by a blank line is discarded at the end",
            b"data: a\n\ndata: b\nid: 9\n",
            vec![message("a")],
        ),
        (
            "an unterminated last line is discarded at the end",
            b"data: a\n\nretry: 5",
            vec![message("a")],
        ),
    ]
}

#[test]
fn spec_cases_whole_and_in_one_byte_chunks() {
    for (name, input, expected) in cases() {
        assert_eq!(parse(input), expected, "{name} (whole)");
        let (items, errors) = parse_chunks(Parser::new(Limits::default()), input.chunks(1));
        assert_eq!(items, expected, "{name} (1-byte chunks)");
        assert_eq!(errors, [], "{name}");
        assert_eq!(reference(input, ""), expected, "{name} (reference model)");
    }
}

#[test]
fn splits_inside_bom_crlf_and_utf8() {
    let cases: &[(&[&[u8]], Vec<Item>)] = &[
        (&[b"\xEF", b"\xBB", b"\xBFdata: a\n\n"], vec![message("a")]),
        (
            &[b"\xEF\xBB", b"", b"\xBF", b"data: a\n\n"],
            vec![message("a")],
        ),
        (
            &[b"\xEF\xBB", b"data: a\n\ndata: b\n\n"],
            vec![message("b")],
        ),
        (&[b"\xEF", b"data: a\n\ndata: b\n\n"], vec![message("b")]),
        (
            &[b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"],
            vec![message("a\nb")],
        ),
        (
            &[b"data: a\r", b"", b"\n", b"\r", b"\n"],
            vec![message("a")],
        ),
        (
            &[b"data: a\r", b"\r", b"data: b\n\n"],
            vec![message("a"), message("b")],
        ),
        (
            &[b"data: \xF0", b"\x9F", b"\x8C", b"\x8A\n\n"],
            vec![message("🌊")],
        ),
        (&[b"data: \xF0\x9F", b"\n\n"], vec![message("\u{FFFD}")]),
        (&[b"dat", b"a: x\n", b"\n"], vec![message("x")]),
    ];
    for (chunks, expected) in cases {
        let (items, errors) = parse_chunks(Parser::new(Limits::default()), chunks.iter().copied());
        assert_eq!(&items, expected, "{chunks:?}");
        assert_eq!(errors, []);
    }
}

#[test]
fn resumed_parser_starts_from_the_given_id() {
    let mut parser = Parser::with_last_event_id(Limits::default(), "7");
    assert_eq!(parser.last_event_id(), "7");
    let (items, _) = parse_chunks(parser.clone(), [&b"data: a\n\nid: 8\ndata: b\n\n"[..]]);
    assert_eq!(
        items,
        [
            event("message", "a", None, "7"),
            event("message", "b", Some("8"), "8")
        ]
    );
    parser.feed(b"id\n").unwrap();
    assert_eq!(parser.last_event_id(), "7", "moves at dispatch");
    parser.feed(b"\n").unwrap();
    assert_eq!(parser.next_item(), Some(Item::IdOnly("".into())));
    assert_eq!(parser.last_event_id(), "");
}

#[test]
fn finish_discards_the_partial_event_and_readies_a_new_stream() {
    let mut parser = Parser::new(Limits::default());
    parser
        .feed(b"id: 1\n\ndata: a\nevent: x\nid: 2\ndata: b")
        .unwrap();
    assert_eq!(parser.next_item(), Some(Item::IdOnly("1".into())));
    assert_eq!(parser.next_item(), None);
    parser.finish();
    assert_eq!(parser.next_item(), None, "nothing dispatched at the end");
    assert_eq!(
        parser.last_event_id(),
        "1",
        "the id of an unfinished block does not count"
    );
    parser.feed(b"\xEF\xBB\xBFdata: c\n\n").unwrap();
    assert_eq!(
        parser.next_item(),
        Some(event("message", "c", None, "1")),
        "BOM dropped again, partial line and event type gone, last event id kept"
    );
    assert_eq!(parser.next_item(), None);
}

#[test]
fn items_queue_across_feeds_until_drained() {
    let mut parser = Parser::new(Limits::default());
    parser.feed(b"data: 1\n\n").unwrap();
    parser.feed(b"data: 2\n\nretry: 3\n").unwrap();
    assert_eq!(parser.next_item(), Some(message("1")));
    assert_eq!(parser.next_item(), Some(message("2")));
    assert_eq!(parser.next_item(), Some(Item::Retry(3)));
    assert_eq!(parser.next_item(), None);
}

fn small(max_line: usize, max_event: usize) -> Parser {
    Parser::new(Limits {
        max_line,
        max_event,
    })
}

#[test]
fn line_cap_discards_the_line_and_its_event() {
    let input = b"data: a\ndata: 0123456789abcdef\ndata: b\n\ndata: ok\n\n";
    let expected_error = ParseError::LineTooLong { limit: 16 };
    for chunks in [
        vec![&input[..]],
        input.chunks(1).collect(),
        input.chunks(7).collect(),
    ] {
        let (items, errors) = parse_chunks(small(16, 1024), chunks);
        assert_eq!(items, [message("ok")]);
        assert_eq!(errors, [expected_error], "reported once");
    }
    let (items, errors) = parse_chunks(small(16, 1024), [&b"data: 0123456789\n\n"[..]]);
    assert_eq!(
        (items, errors),
        (vec![message("0123456789")], vec![]),
        "16 bytes fit"
    );
}

#[test]
fn line_cap_on_harmless_lines_keeps_the_event() {
    for long in [
        &b": a comment far too long"[..],
        b"unknown: field far too long",
        b"retry: 1000000000000000000000",
        b"no colon and far too long",
    ] {
        let mut input = b"data: a\n".to_vec();
        input.extend_from_slice(long);
        input.extend_from_slice(b"\ndata: b\n\n");
        for chunk in [input.len(), 1, 5] {
            let (items, errors) = parse_chunks(small(16, 1024), input.chunks(chunk));
            assert_eq!(items, [message("a\nb")], "{long:?}");
            assert_eq!(errors, [ParseError::LineTooLong { limit: 16 }]);
        }
    }
}

#[test]
fn line_cap_on_an_id_keeps_the_earlier_id_moving() {
    let (items, errors) = parse_chunks(
        small(16, 1024),
        [&b"id: 1\ndata: a\nid: 0123456789abcdef\n\ndata: b\n\n"[..]],
    );
    assert_eq!(errors, [ParseError::LineTooLong { limit: 16 }]);
    assert_eq!(
        items,
        [Item::IdOnly("1".into()), event("message", "b", None, "1")]
    );
}

#[test]
fn event_cap_discards_the_event_and_parses_on() {
    let input = b"data: 1234\ndata: 567\n\ndata: 12345\ndata: 678\ndata: 9\n\nid: 5\ndata: ok\n\n";
    for chunks in [
        vec![&input[..]],
        input.chunks(1).collect(),
        input.chunks(3).collect(),
    ] {
        let (items, errors) = parse_chunks(small(1024, 8), chunks);
        assert_eq!(
            items,
            [message("1234\n567"), event("message", "ok", Some("5"), "5")],
            "8 bytes fit, 9 do not"
        );
        assert_eq!(
            errors,
            [ParseError::EventTooLarge { limit: 8 }],
            "reported once"
        );
    }
    let (items, _) = parse_chunks(small(1024, 8), [&b"id: 3\ndata: 123456789\n\n"[..]]);
    assert_eq!(
        items,
        [Item::IdOnly("3".into())],
        "the id of a dropped event still counts"
    );
}

#[test]
fn feed_consumes_the_whole_chunk_on_error() {
    let mut parser = small(8, 8);
    let error = parser.feed(b"data: 1\n\ndata: 123456789\n\ndata: 2\n\ndata: 0123456789\n\n");
    assert_eq!(
        error,
        Err(ParseError::LineTooLong { limit: 8 }),
        "the first error"
    );
    let mut items = Vec::new();
    drain(&mut parser, &mut items);
    assert_eq!(items, [message("1"), message("2")]);
    parser.feed(b"data: 3\n\n").unwrap();
    assert_eq!(parser.next_item(), Some(message("3")));
}

const CHUNK: usize = 64 << 10;

/// Feeds `first`, then `next` until `total` bytes, checking the parser's
/// buffers after every chunk; returns the errors.
fn flood(
    parser: &mut Parser,
    first: &[u8],
    next: &[u8],
    total: usize,
    bound: usize,
) -> Vec<ParseError> {
    let mut errors = Vec::new();
    let mut fed = 0;
    while fed < total {
        let chunk = if fed == 0 { first } else { next };
        if let Err(error) = parser.feed(chunk) {
            errors.push(error);
        }
        fed += chunk.len();
        assert!(
            parser.buffered() <= bound,
            "{} bytes buffered after {fed} bytes",
            parser.buffered()
        );
        assert_eq!(parser.next_item(), None);
    }
    errors
}

#[test]
fn a_line_without_end_never_grows_past_the_cap() {
    let limit = 1 << 20;
    let mut parser = small(limit, limit);
    let next = vec![b'x'; CHUNK];
    let mut first = next.clone();
    first[..6].copy_from_slice(b"data: ");
    let errors = flood(&mut parser, &first, &next, 100 << 20, limit + CHUNK);
    assert_eq!(errors, [ParseError::LineTooLong { limit }], "reported once");
    parser.feed(b"\n\ndata: ok\n\n").unwrap();
    assert_eq!(parser.next_item(), Some(message("ok")));
    assert_eq!(parser.next_item(), None);
}

#[test]
fn an_event_without_end_never_grows_past_the_cap() {
    let limit = 1 << 20;
    let mut parser = small(CHUNK, limit);
    // Every chunk is one whole `data` line.
    let mut line = b"data: ".to_vec();
    line.resize(CHUNK - 1, b'y');
    line.push(b'\n');
    let errors = flood(&mut parser, &line, &line, 100 << 20, limit + CHUNK);
    assert_eq!(
        errors,
        [ParseError::EventTooLarge { limit }],
        "reported once"
    );
    parser.feed(b"\ndata: ok\n\n").unwrap();
    assert_eq!(parser.next_item(), Some(message("ok")));
}

#[test]
fn errors_display() {
    assert_eq!(
        ParseError::LineTooLong { limit: 5 }.to_string(),
        "event-stream line longer than 5 bytes"
    );
    assert_eq!(
        ParseError::EventTooLarge { limit: 5 }.to_string(),
        "event-stream event data larger than 5 bytes"
    );
    assert_eq!(
        EncodeError::InvalidId.to_string(),
        "event id contains CR, LF or NUL"
    );
    let _: &dyn std::error::Error = &EncodeError::InvalidEventType;
}

#[test]
fn encoder_writes_the_expected_bytes() {
    let mut out = Vec::new();
    encode_event(&mut out, Some("update"), Some("7"), "a\nb\r\nc\rd").unwrap();
    encode_event(&mut out, None, Some(""), "").unwrap();
    encode_event(&mut out, None, None, " lead\n").unwrap();
    encode_comment(&mut out, "ping");
    encode_comment(&mut out, "two\nlines");
    encode_comment(&mut out, "");
    encode_retry(&mut out, 2500);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "event: update\nid: 7\ndata: a\ndata: b\ndata: c\ndata: d\n\n\
         id:\ndata:\n\n\
         data:  lead\ndata:\n\n\
         : ping\n: two\n: lines\n:\n\
         retry: 2500\n"
    );
}

#[test]
fn encoder_refuses_line_breaks_in_names_and_ids() {
    let mut out = b"kept".to_vec();
    for (event, id, error) in [
        (Some("a\nb"), None, EncodeError::InvalidEventType),
        (Some("a\r"), None, EncodeError::InvalidEventType),
        (None, Some("1\n"), EncodeError::InvalidId),
        (None, Some("\r1"), EncodeError::InvalidId),
        (None, Some("1\x002"), EncodeError::InvalidId),
    ] {
        assert_eq!(encode_event(&mut out, event, id, "x"), Err(error));
    }
    assert_eq!(out, b"kept", "nothing written on error");
    encode_event(&mut out, Some("a\0b"), None, "x").unwrap();
}

#[test]
fn line_end_search_finds_every_position() {
    let mut hay = vec![b'a'; 70];
    assert_eq!(find_line_end(&hay), None);
    for near_miss in [0x09, 0x0B, 0x0C, 0x0E, 0x8A, 0x8D, 0x00, 0xFF] {
        hay.fill(near_miss);
        assert_eq!(find_line_end(&hay), None, "{near_miss:#x}");
    }
    for len in [0, 1, 7, 8, 15, 16, 17, 31, 32, 33, 70] {
        for i in 0..len {
            for end in [b'\n', b'\r'] {
                let mut hay = vec![b'a'; len];
                hay[i] = end;
                assert_eq!(find_line_end(&hay), Some(i), "{len} {i}");
                if i + 1 < len {
                    hay[i + 1] = b'\n';
                    assert_eq!(find_line_end(&hay), Some(i), "the first of two");
                }
            }
        }
    }
}

fn piece() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => prop::sample::select(vec![
            &b"data"[..], b"data:", b"data: ", b"id", b"id:", b"id: ", b"event:", b"event: ",
            b"retry:", b"retry: ", b":", b": ", b" ", b"\n", b"\n", b"\r", b"\r\n", b"\n\n",
            BOM, b"\0", "é".as_bytes(), "🌊".as_bytes(), b"\xFF", b"\xF0\x9F", b"\xE2",
            b"\xC3", b"1", b"42",
        ])
        .prop_map(<[u8]>::to_vec),
        2 => "[a-z0-9 :]{1,12}".prop_map(String::into_bytes),
        1 => any::<u8>().prop_map(|b| vec![b]),
    ]
}

fn stream() -> impl Strategy<Value = Vec<u8>> {
    (any::<bool>(), prop::collection::vec(piece(), 0..80)).prop_map(|(bom, pieces)| {
        let mut out = if bom { BOM.to_vec() } else { Vec::new() };
        out.extend(pieces.concat());
        out
    })
}

/// A field line of a block, mostly in the shape most servers write.
fn block_line() -> impl Strategy<Value = Vec<u8>> {
    let value = prop_oneof![
        6 => "[a-z0-9{}\":]{0,10}".prop_map(String::into_bytes),
        1 => piece(),
    ];
    let name = prop::sample::select(vec![
        &b"data: "[..],
        b"data: ",
        b"data: ",
        b"data:",
        b"id: ",
        b"id: ",
        b"id:",
        b"event: ",
        b"event:",
        b": ",
        b"retry: ",
        b"other: ",
        b"data",
        b"id",
    ]);
    (name, value).prop_map(|(name, value)| [name, &value[..]].concat())
}

/// Blocks of field lines, mostly with LF line ends and mostly ended by a
/// blank line: the shapes the parser reads whole from a chunk, and the ones
/// that are nearly that shape.
fn blocks() -> impl Strategy<Value = Vec<u8>> {
    let end = prop::sample::select(vec![&b"\n"[..], b"\n", b"\n", b"\n", b"\n", b"\r", b"\r\n"]);
    let line = (block_line(), end.clone()).prop_map(|(line, end)| [&line[..], end].concat());
    let block =
        (prop::collection::vec(line, 0..4), end, any::<bool>()).prop_map(|(lines, end, blank)| {
            let mut out = lines.concat();
            if blank {
                out.extend_from_slice(end);
            }
            out
        });
    (any::<bool>(), prop::collection::vec(block, 0..20)).prop_map(|(bom, blocks)| {
        let mut out = if bom { BOM.to_vec() } else { Vec::new() };
        out.extend(blocks.concat());
        out
    })
}

/// Random pieces or whole blocks.
fn any_stream() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![stream(), blocks()]
}

#[derive(Debug, Clone)]
enum Written {
    Event(Option<String>, Option<String>, String),
    Comment(String),
    Retry(u64),
}

fn text() -> impl Strategy<Value = String> {
    "[a-c \r\n\x00:é🌊\u{FEFF}]{0,12}"
}

fn written() -> impl Strategy<Value = Written> {
    prop_oneof![
        4 => (prop::option::of(text()), prop::option::of(text()), text())
            .prop_map(|(event, id, data)| Written::Event(event, id, data)),
        1 => text().prop_map(Written::Comment),
        1 => any::<u64>().prop_map(Written::Retry),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The parser agrees with a literal reading of the specification.
    #[test]
    fn parser_matches_the_reference_model(input in any_stream(), resumed in any::<bool>()) {
        let initial = if resumed { "r" } else { "" };
        let (items, errors) = parse_chunks(Parser::with_last_event_id(Limits::default(), initial), [&input[..]]);
        prop_assert_eq!(errors, vec![]);
        prop_assert_eq!(items, reference(&input, initial));
    }

    /// How the stream is cut into chunks changes nothing, caps included.
    #[test]
    fn any_split_parses_like_the_whole(
        input in any_stream(),
        cuts in prop::collection::vec(any::<Index>(), 0..12),
        max_line in 4usize..40,
        max_event in 0usize..40,
    ) {
        let limits = Limits { max_line, max_event };
        let cuts: Vec<usize> = cuts.iter().map(|i| i.index(input.len() + 1)).collect();
        let (whole, whole_errors) = parse_chunks(Parser::new(limits), [&input[..]]);
        let (split, split_errors) = parse_chunks(Parser::new(limits), split_at(&input, &cuts));
        let (bytes, byte_errors) = parse_chunks(Parser::new(limits), input.chunks(1));
        prop_assert_eq!(&split, &whole);
        prop_assert_eq!(&bytes, &whole);
        prop_assert_eq!(whole_errors.is_empty(), split_errors.is_empty());
        prop_assert_eq!(whole_errors.is_empty(), byte_errors.is_empty());
        let (unlimited, _) = parse_chunks(Parser::new(Limits::default()), split_at(&input, &cuts));
        prop_assert_eq!(unlimited, reference(&input, ""));
    }

    /// `feed_with` hands out, borrowed, exactly the items `feed` queues,
    /// caps and errors included.
    #[test]
    fn feed_with_hands_out_what_feed_queues(
        input in any_stream(),
        cuts in prop::collection::vec(any::<Index>(), 0..12),
        max_line in 4usize..40,
        max_event in 0usize..40,
    ) {
        let limits = Limits { max_line, max_event };
        let cuts: Vec<usize> = cuts.iter().map(|i| i.index(input.len() + 1)).collect();
        let chunks = split_at(&input, &cuts);
        let (queued, queued_errors) = parse_chunks(Parser::new(limits), chunks.iter().copied());
        let mut parser = Parser::new(limits);
        let mut handed = Vec::new();
        let mut errors = Vec::new();
        for chunk in &chunks {
            if let Err(error) = parser.feed_with(chunk, |item| handed.push(item.to_item())) {
                errors.push(error);
            }
            prop_assert!(parser.next_item().is_none(), "nothing queued");
        }
        prop_assert_eq!(&handed, &queued);
        prop_assert_eq!(errors, queued_errors);
        for item in &handed {
            prop_assert_eq!(&item.as_item_ref().to_item(), item);
        }
    }

    /// What the encoder writes parses back to the same items, line ends in
    /// data and comments read as LF.
    #[test]
    fn encode_then_parse_round_trips(
        writes in prop::collection::vec(written(), 0..12),
        chunk in 1usize..64,
    ) {
        let mut out = Vec::new();
        let mut expected = Vec::new();
        let mut last_event_id = String::new();
        let lines = |text: &str| text.replace("\r\n", "\n").replace('\r', "\n");
        for write in writes {
            match write {
                Written::Event(event, id, data) => {
                    let bad_event = event.as_deref().is_some_and(|e| e.contains(['\r', '\n']));
                    let bad_id = id.as_deref().is_some_and(|i| i.contains(['\r', '\n', '\0']));
                    let result = encode_event(&mut out, event.as_deref(), id.as_deref(), &data);
                    if bad_event || bad_id {
                        prop_assert!(result.is_err());
                        continue;
                    }
                    prop_assert_eq!(result, Ok(()));
                    if let Some(id) = &id {
                        last_event_id.clone_from(id);
                    }
                    expected.push(Item::Event(Event {
                        event: event.filter(|e| !e.is_empty()).unwrap_or_else(|| "message".into()),
                        data: lines(&data),
                        id,
                        last_event_id: last_event_id.clone(),
                    }));
                }
                Written::Comment(text) => {
                    encode_comment(&mut out, &text);
                    expected.extend(lines(&text).split('\n').map(|l| Item::Comment(l.into())));
                }
                Written::Retry(ms) => {
                    encode_retry(&mut out, ms);
                    expected.push(Item::Retry(ms));
                }
            }
        }
        let (items, errors) = parse_chunks(Parser::new(Limits::default()), out.chunks(chunk));
        prop_assert_eq!(errors, vec![]);
        prop_assert_eq!(items, expected);
    }

    #[test]
    fn line_end_search_finds_the_first_cr_or_lf(hay in prop::collection::vec(
        prop_oneof![8 => any::<u8>(), 1 => Just(b'\n'), 1 => Just(b'\r')], 0..100,
    )) {
        prop_assert_eq!(find_line_end(&hay), hay.iter().position(|&b| b == b'\n' || b == b'\r'));
    }
}
