//! The request side of the benches' hand-written upstreams.

use std::io::Read;

/// Reads a request head up to its blank line, byte by byte (the request has
/// no body); `None` if the client went away or timed out first.
pub fn read_head(stream: &mut impl Read) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    Some(head)
}
