//! A small blocking HTTP/1.1 client on raw TCP for the proxy tests: the
//! request exactly as the test writes it (hop-by-hop headers included), the
//! response head as received, the body decoded (chunked, `Content-Length`
//! or until close), and [`Sse`], an event-stream reader that also shows
//! comments and `retry:` lines. Every read has a timeout, so a test that
//! waits for something that never comes fails instead of hanging.

#![allow(dead_code)] // each test binary uses its own part

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// How long any read waits before the test fails.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// A response: the head, and the body still on the socket.
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The header fields in order, names in lower case.
    pub headers: Vec<(String, String)>,
    body: Body,
    /// The socket, to shut it down or change its timeout.
    pub socket: TcpStream,
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Response")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .finish()
    }
}

/// Sends `method path` to `addr` with `headers` (plus `Host` and, with a
/// body, `Content-Length`) and reads the response head.
pub fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Response {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = body {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body.unwrap_or_default());
    raw(addr, &bytes)
}

/// A `GET` of `path`.
pub fn get(addr: &str, path: &str, headers: &[(&str, &str)]) -> Response {
    request(addr, "GET", path, headers, None)
}

/// A `GET` of an event stream (`Accept: text/event-stream` and `headers`).
pub fn get_sse(addr: &str, path: &str, headers: &[(&str, &str)]) -> Response {
    let mut all = vec![("Accept", "text/event-stream")];
    all.extend_from_slice(headers);
    get(addr, path, &all)
}

/// Writes `bytes` (a whole request, as the test wrote it) to `addr` and
/// reads the response head. A write the server cut short is not an error
/// (a server may answer and close before reading everything); the response
/// is what counts.
pub fn raw(addr: &str, bytes: &[u8]) -> Response {
    let mut socket =
        TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    socket.set_read_timeout(Some(TIMEOUT)).unwrap();
    socket.set_write_timeout(Some(TIMEOUT)).unwrap();
    socket.set_nodelay(true).unwrap();
    let _ = socket.write_all(bytes);
    read_response(socket)
}

/// Reads a response head from `socket`.
pub fn read_response(socket: TcpStream) -> Response {
    let mut reader = BufReader::new(socket.try_clone().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        read_line(&mut reader, &mut line, "the status line");
        // Skip 1xx interim responses.
        if line.trim().is_empty() {
            continue;
        }
        let status = parse_status(&line);
        let headers = read_headers(&mut reader);
        if (100..200).contains(&status) {
            continue;
        }
        let framing = if status == 204 || status == 304 {
            Framing::Done
        } else if header_of(&headers, "transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
        {
            Framing::Chunked { remaining: 0 }
        } else if let Some(length) = header_of(&headers, "content-length") {
            Framing::Length(length.trim().parse().expect("a numeric Content-Length"))
        } else {
            Framing::Close
        };
        return Response {
            status,
            headers,
            body: Body { reader, framing },
            socket,
        };
    }
}

fn read_line(reader: &mut impl BufRead, line: &mut String, what: &str) {
    match reader.read_line(line) {
        Ok(0) => panic!("the connection ended while reading {what}"),
        Ok(_) => {}
        Err(e) => panic!("reading {what}: {e}"),
    }
}

fn parse_status(line: &str) -> u16 {
    let mut parts = line.split_whitespace();
    let version = parts.next().unwrap_or_default();
    assert!(version.starts_with("HTTP/1."), "status line {line:?}");
    parts
        .next()
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("status line {line:?}"))
}

fn read_headers(reader: &mut impl BufRead) -> Vec<(String, String)> {
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        read_line(reader, &mut line, "the response headers");
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            return headers;
        }
        let (name, value) = line
            .split_once(':')
            .unwrap_or_else(|| panic!("header line {line:?}"));
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
}

fn header_of<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

impl Response {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        header_of(&self.headers, name)
    }

    /// Whether the response is an event stream.
    pub fn is_sse(&self) -> bool {
        self.header("content-type")
            .is_some_and(|v| v.starts_with("text/event-stream"))
    }

    /// The whole body.
    pub fn body(mut self) -> Vec<u8> {
        let mut body = Vec::new();
        self.body
            .read_to_end(&mut body)
            .unwrap_or_else(|e| panic!("reading the body of a {}: {e}", self.status));
        body
    }

    /// The whole body as UTF-8.
    pub fn text(self) -> String {
        String::from_utf8(self.body()).expect("a UTF-8 body")
    }

    /// The body as an event stream.
    pub fn sse(self) -> Sse {
        Sse {
            status: self.status,
            socket: self.socket,
            lines: BufReader::with_capacity(256 * 1024, self.body),
            pending: Pending::default(),
        }
    }
}

enum Framing {
    Chunked { remaining: u64 },
    Length(u64),
    Close,
    Done,
}

/// The decoded body.
struct Body {
    reader: BufReader<TcpStream>,
    framing: Framing,
}

impl Read for Body {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.framing {
            Framing::Done => Ok(0),
            Framing::Close => self.reader.read(buf),
            Framing::Length(left) => {
                if *left == 0 {
                    return Ok(0);
                }
                let max = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                let n = self.reader.read(&mut buf[..max])?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the body ended before its Content-Length",
                    ));
                }
                *left -= n as u64;
                Ok(n)
            }
            Framing::Chunked { remaining } => {
                if *remaining == 0 {
                    let mut line = String::new();
                    if self.reader.read_line(&mut line)? == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the chunked body ended without its last chunk",
                        ));
                    }
                    let size = line.trim().split(';').next().unwrap_or_default();
                    let size = u64::from_str_radix(size.trim(), 16).map_err(|_| {
                        io::Error::new(io::ErrorKind::InvalidData, format!("chunk size {line:?}"))
                    })?;
                    if size == 0 {
                        // Trailers, up to the empty line.
                        loop {
                            let mut trailer = String::new();
                            if self.reader.read_line(&mut trailer)? == 0
                                || trailer.trim().is_empty()
                            {
                                break;
                            }
                        }
                        self.framing = Framing::Done;
                        return Ok(0);
                    }
                    *remaining = size;
                }
                let max = buf
                    .len()
                    .min(usize::try_from(*remaining).unwrap_or(usize::MAX));
                let n = self.reader.read(&mut buf[..max])?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the connection ended inside a chunk",
                    ));
                }
                *remaining -= n as u64;
                if *remaining == 0 {
                    let mut crlf = [0u8; 2];
                    self.reader.read_exact(&mut crlf)?;
                }
                Ok(n)
            }
        }
    }
}

/// One event of a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// The `id:` field, if it had one.
    pub id: Option<String>,
    /// The `event:` field, if it had one.
    pub event: Option<String>,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

impl Event {
    /// The id, which the test expects.
    pub fn id(&self) -> &str {
        self.id
            .as_deref()
            .unwrap_or_else(|| panic!("an event without id: {self:?}"))
    }
}

/// What a stream carries, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    /// An event (dispatched at its empty line).
    Event(Event),
    /// A comment line, without its `:` and one leading space.
    Comment(String),
    /// A `retry:` line.
    Retry(u64),
}

#[derive(Default)]
struct Pending {
    id: Option<String>,
    event: Option<String>,
    data: Option<String>,
}

/// An event stream read line by line.
pub struct Sse {
    /// The response status.
    pub status: u16,
    /// The socket, to shut it down or change its timeout.
    pub socket: TcpStream,
    lines: BufReader<Body>,
    pending: Pending,
}

impl std::fmt::Debug for Sse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sse").field("status", &self.status).finish()
    }
}

impl Sse {
    /// The next item; `Ok(None)` at the end of the body; the read error
    /// (a timeout: `WouldBlock` or `TimedOut`) otherwise.
    pub fn try_item(&mut self) -> io::Result<Option<Item>> {
        loop {
            let mut line = Vec::new();
            if self.lines.read_until(b'\n', &mut line)? == 0 {
                return Ok(None);
            }
            if line.last() != Some(&b'\n') {
                // A torn last line: the stream ended inside it.
                return Ok(None);
            }
            let line = String::from_utf8(line).expect("UTF-8 stream");
            let line = line.trim_end_matches('\n').trim_end_matches('\r');
            if line.is_empty() {
                let pending = std::mem::take(&mut self.pending);
                if pending.id.is_some() || pending.event.is_some() || pending.data.is_some() {
                    return Ok(Some(Item::Event(Event {
                        id: pending.id,
                        event: pending.event,
                        data: pending.data.unwrap_or_default(),
                    })));
                }
                continue;
            }
            if let Some(comment) = line.strip_prefix(':') {
                return Ok(Some(Item::Comment(
                    comment.strip_prefix(' ').unwrap_or(comment).to_owned(),
                )));
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "id" => self.pending.id = Some(value.to_owned()),
                "event" => self.pending.event = Some(value.to_owned()),
                "data" => match &mut self.pending.data {
                    Some(data) => {
                        data.push('\n');
                        data.push_str(value);
                    }
                    None => self.pending.data = Some(value.to_owned()),
                },
                "retry" => {
                    if let Ok(ms) = value.parse() {
                        return Ok(Some(Item::Retry(ms)));
                    }
                }
                _ => {}
            }
        }
    }

    /// The next item, `None` at the end; fails the test after [`TIMEOUT`].
    pub fn next_item(&mut self) -> Option<Item> {
        self.try_item()
            .unwrap_or_else(|e| panic!("reading the event stream: {e}"))
    }

    /// The next event, skipping comments and `retry:`; `None` at the end.
    /// Fails the test after [`TIMEOUT`] without one, keep-alives or not.
    pub fn next_event(&mut self) -> Option<Event> {
        let deadline = std::time::Instant::now() + TIMEOUT;
        loop {
            match self.next_item()? {
                Item::Event(event) => return Some(event),
                Item::Comment(_) | Item::Retry(_) => assert!(
                    std::time::Instant::now() < deadline,
                    "no event within {TIMEOUT:?}, only comments"
                ),
            }
        }
    }

    /// The next `n` events; fails the test if the stream ends first.
    pub fn events(&mut self, n: usize) -> Vec<Event> {
        (0..n)
            .map(|i| {
                self.next_event()
                    .unwrap_or_else(|| panic!("the stream ended after {i} of {n} events"))
            })
            .collect()
    }

    /// Every event up to the end of the stream.
    pub fn rest(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.next_event()).collect()
    }

    /// Changes how long reads wait.
    pub fn set_timeout(&self, timeout: Duration) {
        self.socket.set_read_timeout(Some(timeout)).unwrap();
    }
}

/// A proxy id `<token>-<seq>`, split; fails the test if it is not one (the
/// token must be 32 lowercase hex digits, the seq a plain decimal: digits
/// only, no sign, no leading zero).
pub fn proxy_id(id: &str) -> (String, u64) {
    let (token, seq) = id
        .rsplit_once('-')
        .unwrap_or_else(|| panic!("{id:?} is not <token>-<seq>"));
    assert!(
        token.len() == 32
            && token
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "the token of {id:?} is not 32 lowercase hex digits"
    );
    assert!(
        !seq.is_empty()
            && seq.bytes().all(|b| b.is_ascii_digit())
            && (seq == "0" || !seq.starts_with('0')),
        "the seq of {id:?} is not a plain decimal"
    );
    let seq = seq
        .parse()
        .unwrap_or_else(|_| panic!("the seq of {id:?} is not a number"));
    (token.to_owned(), seq)
}
