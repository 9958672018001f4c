//! Throughput of the SSE parser: `tidemark_core::sse::Parser` against the
//! `eventsource-stream` crate on the same bytes, cut into the same chunks.
//!
//! Inputs (about 1 MiB each, generated here):
//! - `mcp-small`: MCP-sized events, an `id` line and one ~200-byte `data:`
//!   line of a JSON-RPC progress notification;
//! - `large-multiline`: 64 KiB events whose data is spread over lines of 40
//!   to 160 bytes (pretty-printed JSON, logs), with an `event` and an `id`.
//!
//! Each input is fed in chunks of 8 KiB and of 64 KiB; one criterion group per
//! input and chunk size holds both parsers, with byte throughput. One
//! iteration parses the whole input with a new parser and takes ownership of
//! every event, as a client does: our parser is fed chunk by chunk and
//! drained after each; `eventsource-stream` polls an in-memory stream of the
//! same chunks under `futures::executor::block_on`. A setup pass checks that
//! both read the same events.
//!
//! Run: `cargo bench -p tidemark-core --bench parse`
//! (`cargo test -p tidemark-core --bench parse` parses every case once).
//!
//! Instruction counts: with `TIDEMARK_PARSE=<parser>:<input>:<chunk KiB>:<n>`
//! the binary skips criterion and parses the input `n` times with one parser
//! (`tidemark` or `eventsource-stream`), inside `parse::run_*`. Under callgrind,
//! collect only there and divide by `n` and by the input size:
//!
//! ```text
//! BIN=$(ls -t target/release/deps/parse-* | grep -v '\.d$' | head -1)
//! TIDEMARK_PARSE=tidemark:mcp-small:8:20 valgrind --tool=callgrind \
//!     --callgrind-out-file=/dev/null --toggle-collect='parse::run_*' $BIN
//! ```

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use eventsource_stream::Eventsource;
use futures::StreamExt;
use futures::executor::block_on;
use std::convert::Infallible;
use std::fmt::Write;
use std::hint::black_box;
use tidemark_core::sse::{Item, Limits, Parser};

/// Size of each generated input.
const INPUT: usize = 1 << 20;

/// Small MCP-style events: `id` plus one JSON-RPC notification of ~200 bytes.
fn mcp_small() -> Vec<u8> {
    let mut out = String::new();
    let mut n = 0u64;
    while out.len() < INPUT {
        write!(
            out,
            "id: 0195f3a2-7c1e-7d4b-9a60-{n:012}\n\
             data: {{\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":\
             {{\"progressToken\":\"tok-{token}\",\"progress\":{n},\"total\":1000000,\
             \"stage\":\"indexing\",\"message\":\"Processed {n} of 1000000 items in batch {batch}\"}}}}\n\n",
            token = n % 97,
            batch = n / 100,
        )
        .unwrap();
        n += 1;
    }
    out.into_bytes()
}

/// 64 KiB events over lines of 40 to 160 bytes.
fn large_multiline() -> Vec<u8> {
    let mut out = String::new();
    let mut n = 0u64;
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    while out.len() < INPUT {
        write!(out, "event: result\nid: {n}\n").unwrap();
        let mut data = 0;
        while data < 64 << 10 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = 40 + (state % 121) as usize;
            out.push_str("data:   \"field\": \"");
            let fill = len.saturating_sub(14);
            out.extend((0..fill).map(|i| (b'a' + ((n as usize + i) % 26) as u8) as char));
            out.push_str("\",\n");
            data += len + 1;
        }
        out.push('\n');
        n += 1;
    }
    out.into_bytes()
}

struct Case {
    input: &'static str,
    chunk_kib: usize,
    chunks: Vec<Vec<u8>>,
    bytes: usize,
}

fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for (input, bytes) in [
        ("mcp-small", mcp_small()),
        ("large-multiline", large_multiline()),
    ] {
        for chunk_kib in [8, 64] {
            cases.push(Case {
                input,
                chunk_kib,
                chunks: bytes.chunks(chunk_kib << 10).map(<[u8]>::to_vec).collect(),
                bytes: bytes.len(),
            });
        }
    }
    cases
}

/// Parses every chunk with our parser; returns (events, data bytes).
#[inline(never)]
fn run_tidemark(chunks: &[Vec<u8>]) -> (usize, usize) {
    let mut parser = Parser::new(Limits::default());
    let (mut events, mut data) = (0, 0);
    for chunk in chunks {
        parser.feed(chunk).expect("within limits");
        while let Some(item) = parser.next_item() {
            if let Item::Event(event) = black_box(item) {
                events += 1;
                data += event.data.len();
            }
        }
    }
    parser.finish();
    (events, data)
}

/// Parses every chunk with `eventsource-stream`; returns (events, data bytes).
#[inline(never)]
fn run_eventsource_stream(chunks: &[Vec<u8>]) -> (usize, usize) {
    let body = futures::stream::iter(chunks.iter().map(|c| Ok::<_, Infallible>(&c[..])));
    block_on(async {
        let mut events = body.eventsource();
        let (mut count, mut data) = (0, 0);
        while let Some(event) = events.next().await {
            let event = black_box(event.expect("valid stream"));
            count += 1;
            data += event.data.len();
        }
        (count, data)
    })
}

/// Both parsers read the same events.
fn check(case: &Case) {
    let mut ours = Vec::new();
    let mut parser = Parser::new(Limits::default());
    for chunk in &case.chunks {
        parser.feed(chunk).unwrap();
        while let Some(item) = parser.next_item() {
            if let Item::Event(event) = item {
                ours.push((event.event, event.data, event.id.unwrap_or_default()));
            }
        }
    }
    let body = futures::stream::iter(case.chunks.iter().map(|c| Ok::<_, Infallible>(&c[..])));
    let theirs: Vec<_> = block_on(body.eventsource().collect::<Vec<_>>())
        .into_iter()
        .map(|event| {
            let event = event.unwrap();
            (event.event, event.data, event.id)
        })
        .collect();
    assert!(ours.len() > 10, "{}: {} events", case.input, ours.len());
    assert!(ours == theirs, "{}: the parsers disagree", case.input);
}

fn parse(c: &mut Criterion) {
    for case in cases() {
        check(&case);
        let mut group = c.benchmark_group(format!("parse/{}/{}KiB", case.input, case.chunk_kib));
        group.throughput(Throughput::Bytes(case.bytes as u64));
        group.bench_with_input(
            BenchmarkId::from_parameter("tidemark"),
            &case.chunks,
            |b, chunks| b.iter(|| run_tidemark(chunks)),
        );
        group.bench_with_input(
            BenchmarkId::from_parameter("eventsource-stream"),
            &case.chunks,
            |b, chunks| b.iter(|| run_eventsource_stream(chunks)),
        );
        group.finish();
    }
}

criterion_group!(benches, parse);

/// `TIDEMARK_PARSE=<parser>:<input>:<chunk KiB>:<n>`: see the module docs.
fn instruction_count_run(spec: &str) {
    let parts: Vec<&str> = spec.split(':').collect();
    let [parser, input, chunk_kib, n] = parts[..] else {
        panic!("TIDEMARK_PARSE=<parser>:<input>:<chunk KiB>:<n>, got {spec}");
    };
    let chunk_kib: usize = chunk_kib.parse().expect("chunk KiB");
    let n: usize = n.parse().expect("n");
    let case = cases()
        .into_iter()
        .find(|c| c.input == input && c.chunk_kib == chunk_kib)
        .expect("known input and chunk size");
    let run = match parser {
        "tidemark" => run_tidemark,
        "eventsource-stream" => run_eventsource_stream,
        _ => panic!("parser is tidemark or eventsource-stream"),
    };
    let mut events = (0, 0);
    for _ in 0..n {
        events = black_box(run(black_box(&case.chunks)));
    }
    println!(
        "{parser} {input} {chunk_kib}KiB: {n} x {} bytes, {} events, {} data bytes",
        case.bytes, events.0, events.1
    );
}

fn main() {
    if let Ok(spec) = std::env::var("TIDEMARK_PARSE") {
        instruction_count_run(&spec);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
