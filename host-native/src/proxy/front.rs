//! The proxy's own HTTP/1.1 front. It reads each request head itself and
//! answers a `GET` without a body (HTTP/1.1, no `Expect`, no `Upgrade`)
//! without hyper, so that an idle client of a logged stream costs its
//! socket, its task and its reader, not hyper's two 8 KiB buffers per
//! connection. Everything else goes to hyper, with the bytes read so far
//! replayed first, for the rest of the connection.
//!
//! A connection stays with the front while it sends such GETs one after
//! the other (keep-alive), and goes to hyper at the first request that is
//! not one. While a response streams, the front only waits for the socket
//! to become readable: the client leaving (end of file, an error) ends the
//! response at once; bytes the client sends meanwhile (a pipelined request)
//! are discarded, and the connection is closed once the response is over.

use super::http::{self, Body};
use super::hub::Hub;
use crate::metrics::Limit;
use async_io::{Async, Timer};
use futures::future::{Either, FutureExt, select};
use futures::io::{AsyncRead, AsyncWrite};
use http_body_util::BodyExt;
use hyper::body::Body as _;
use hyper::header::{
    CONNECTION, CONTENT_LENGTH, DATE, EXPECT, HeaderMap, HeaderName, HeaderValue,
    TRANSFER_ENCODING, UPGRADE,
};
use hyper::service::service_fn;
use hyper::{Response, StatusCode, Uri};
use smol_hyper::rt::{FuturesIo, SmolTimer};
use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

/// How long a client may take to send a whole request head (hyper's
/// `header_read_timeout` on the connections it serves).
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// The most header fields a request head may have (hyper's default; a head
/// with more goes to hyper, which refuses it).
const MAX_HEADERS: usize = 100;

/// The first read of a head; it grows from there up to the cap.
const FIRST_READ: usize = 1024;

/// What hyper answers to a head over its buffer.
const TOO_LARGE: &[u8] =
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

/// Serves one accepted connection until it closes.
pub(super) async fn serve(hub: Arc<Hub>, socket: Async<TcpStream>) {
    // Bytes read and not answered yet: a head being read, or what came
    // after the last one.
    let mut buffered = Vec::new();
    let cap = header_cap(&hub);
    loop {
        let request = match read_head(&socket, &mut buffered, cap).await {
            Ok(Head::Direct(request)) => request,
            Ok(Head::Other) => {
                // Boxed: hyper's connection future is large, and this one
                // lives as long as a direct client does.
                let io = Replay {
                    buffered,
                    at: 0,
                    socket,
                };
                return Box::pin(with_hyper(hub, io)).await;
            }
            Ok(Head::TooLarge) => {
                hub.metrics.refused(Limit::HeaderBytes);
                if write_all(&socket, &mut [IoSlice::new(TOO_LARGE)])
                    .await
                    .is_ok()
                {
                    linger(&socket).await;
                }
                return;
            }
            // Closed, timed out, failed: nothing to answer.
            Ok(Head::Closed) | Err(_) => return,
        };
        // What follows the head stays for the next request; usually
        // nothing, and then the buffer is freed for the response's life.
        buffered.drain(..request.len);
        if buffered.is_empty() {
            buffered = Vec::new();
        } else {
            buffered.shrink_to_fit();
        }
        // Boxed: the GET logic's future is large (kilobytes) and is done
        // once the response starts.
        let response = Box::pin(http::handle_get(
            hub.clone(),
            request.target,
            &request.headers,
        ))
        .await;
        drop(request.headers);
        match respond(&socket, response, request.close).await {
            Ok(true) => {}
            Ok(false) | Err(_) => return,
        }
    }
}

/// The largest head read before `431`: what hyper's buffer holds.
fn header_cap(hub: &Hub) -> usize {
    hub.config.limits.max_header_bytes.max(8192)
}

/// Serves the rest of a connection with hyper, as the proxy did before it
/// had a front of its own.
async fn with_hyper(hub: Arc<Hub>, io: Replay) {
    // Boxed: hyper keeps the allocation of a connection's request future
    // for as long as the connection lives, and `handle`'s future is large.
    let service = service_fn(|request| Box::pin(http::handle(hub.clone(), request)));
    let served = hyper::server::conn::http1::Builder::new()
        .timer(SmolTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(header_cap(&hub))
        .serve_connection(FuturesIo::new(io), service)
        .await;
    // hyper answered 431 itself (a later request on the connection).
    if served.is_err_and(|e| e.is_parse_too_large()) {
        hub.metrics.refused(Limit::HeaderBytes);
    }
}

/// A request the front answers itself.
#[derive(Debug)]
struct Direct {
    /// Its path and query.
    target: String,
    headers: HeaderMap,
    /// The client asked to close the connection after the response.
    close: bool,
    /// The length of its head.
    len: usize,
}

/// What a connection sent next.
#[derive(Debug)]
enum Head {
    Direct(Direct),
    /// A request for hyper (or bytes that are no request: hyper answers).
    Other,
    /// No whole head within the cap.
    TooLarge,
    /// The connection ended between requests.
    Closed,
}

/// Reads into `buffered` until it holds a whole head (or `cap` bytes
/// without one), within [`HEAD_TIMEOUT`].
async fn read_head(
    socket: &Async<TcpStream>,
    buffered: &mut Vec<u8>,
    cap: usize,
) -> io::Result<Head> {
    let read = async {
        loop {
            if !buffered.is_empty() {
                match parse(buffered) {
                    Parsed::Direct(request) => return Ok(Head::Direct(request)),
                    Parsed::Other => return Ok(Head::Other),
                    Parsed::Partial if buffered.len() >= cap => return Ok(Head::TooLarge),
                    Parsed::Partial => {}
                }
            }
            let len = buffered.len();
            let want = len.max(FIRST_READ).min(cap - len);
            buffered.resize(len + want, 0);
            let read = socket.read_with(|mut s| s.read(&mut buffered[len..])).await;
            buffered.truncate(len + *read.as_ref().unwrap_or(&0));
            match read? {
                // Between requests, a close is the client done; inside a
                // head, hyper answers what it makes of it.
                0 if len == 0 => return Ok(Head::Closed),
                0 => return Ok(Head::Other),
                _ => {}
            }
        }
    };
    let timeout = async {
        Timer::after(HEAD_TIMEOUT).await;
        Err(io::Error::from(io::ErrorKind::TimedOut))
    };
    smol::future::or(read, timeout).await
}

enum Parsed {
    Direct(Direct),
    Other,
    Partial,
}

/// Parses the head at the start of `bytes`.
fn parse(bytes: &[u8]) -> Parsed {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut fields);
    match request.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => {
            direct(&request, len).map_or(Parsed::Other, Parsed::Direct)
        }
        Ok(httparse::Status::Partial) => Parsed::Partial,
        Err(_) => Parsed::Other,
    }
}

/// The request, if the front answers it: an HTTP/1.1 `GET` of a path,
/// without a body, `Expect` or `Upgrade`, every field valid.
fn direct(request: &httparse::Request<'_, '_>, len: usize) -> Option<Direct> {
    if request.method != Some("GET") || request.version != Some(1) {
        return None;
    }
    let path = request.path.filter(|p| p.starts_with('/'))?;
    // As hyper reads it, so both fronts agree on every target.
    let uri: Uri = path.parse().ok()?;
    let target = uri.path_and_query()?.as_str().to_owned();
    let mut headers = HeaderMap::with_capacity(request.headers.len());
    for field in request.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(field.value).ok()?;
        headers.append(name, value);
    }
    let body = headers.contains_key(TRANSFER_ENCODING)
        || headers.get_all(CONTENT_LENGTH).iter().any(|v| v != "0");
    if body || headers.contains_key(EXPECT) || headers.contains_key(UPGRADE) {
        return None;
    }
    let close = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("close"));
    Some(Direct {
        target,
        headers,
        close,
        len,
    })
}

/// How a response body is delimited.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Framing {
    /// No body (`204`, `304`).
    None,
    /// Its `Content-Length`.
    Length(u64),
    /// Chunked: every frame a chunk, then `0\r\n\r\n`.
    Chunked,
}

/// Writes `response`, its body as it comes, and whether the connection may
/// carry another request.
async fn respond(
    socket: &Async<TcpStream>,
    response: Response<Body>,
    close: bool,
) -> io::Result<bool> {
    let (parts, mut body) = response.into_parts();
    let status = parts.status;
    let given = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
    let framing = if status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::None
    } else if let Some(length) = given.or(body.size_hint().exact()) {
        Framing::Length(length)
    } else {
        Framing::Chunked
    };
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    let mut field = |name: &[u8], value: &[u8]| {
        head.extend_from_slice(name);
        head.extend_from_slice(b": ");
        head.extend_from_slice(value);
        head.extend_from_slice(b"\r\n");
    };
    for (name, value) in &parts.headers {
        field(name.as_str().as_bytes(), value.as_bytes());
    }
    match framing {
        Framing::Length(length) if given.is_none() => {
            field(b"content-length", length.to_string().as_bytes());
        }
        Framing::Chunked => field(b"transfer-encoding", b"chunked"),
        _ => {}
    }
    if !parts.headers.contains_key(DATE) {
        field(
            b"date",
            httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes(),
        );
    }
    if close {
        field(b"connection", b"close");
    }
    head.extend_from_slice(b"\r\n");
    drop(parts);

    let mut pipelined = false;
    let whole = send_body(socket, &mut body, head, framing, &mut pipelined).await?;
    Ok(whole && !close && !pipelined)
}

/// Writes `head`, then `body` framed as `framing` while watching for the
/// client's leaving; whether all of it went out.
async fn send_body(
    socket: &Async<TcpStream>,
    body: &mut Body,
    mut head: Vec<u8>,
    framing: Framing,
    pipelined: &mut bool,
) -> io::Result<bool> {
    // One watch for the whole body, so that the socket's interest in
    // reading stays registered from one frame to the next.
    let mut left = pin!(client_left(socket, pipelined));
    let mut written = 0u64;
    loop {
        // The head goes out with the first data when that is ready at once
        // (a stream's `retry:` hint always is), else on its own first.
        let ready = if head.is_empty() {
            None
        } else {
            body.frame().now_or_never()
        };
        let frame = match ready {
            Some(frame) => frame,
            None => {
                if !head.is_empty() {
                    write_all(socket, &mut [IoSlice::new(&head)]).await?;
                    head = Vec::new();
                }
                match select(body.frame(), left.as_mut()).await {
                    Either::Left((frame, _)) => frame,
                    // Gone: the body (a client of a log) is dropped with
                    // the connection, which counts it out.
                    Either::Right(_) => return Ok(false),
                }
            }
        };
        let data = match frame {
            None => break,
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                // Trailers: not sent.
                Err(_) => continue,
            },
            // The upstream failed mid-body: the client must not take what
            // it got for the whole, so the connection is cut.
            Some(Err(_)) => return Ok(false),
        };
        if data.is_empty() {
            continue;
        }
        let mut size = [0u8; 20];
        let (prefix, suffix): (&[u8], &[u8]) = match framing {
            Framing::Chunked => {
                let mut line = &mut size[..];
                write!(line, "{:x}\r\n", data.len())?;
                let used = 20 - line.len();
                (&size[..used], b"\r\n")
            }
            Framing::Length(length) => {
                written += data.len() as u64;
                if written > length {
                    // More than it said: cut, as hyper would.
                    return Ok(false);
                }
                (&[], &[])
            }
            Framing::None => continue,
        };
        let mut slices = [
            IoSlice::new(&head),
            IoSlice::new(prefix),
            IoSlice::new(&data),
            IoSlice::new(suffix),
        ];
        write_all(socket, &mut slices).await?;
        head = Vec::new();
    }
    let end: &[u8] = match framing {
        Framing::Chunked => b"0\r\n\r\n",
        _ => b"",
    };
    write_all(socket, &mut [IoSlice::new(&head), IoSlice::new(end)]).await?;
    Ok(match framing {
        Framing::Length(length) => written == length,
        _ => true,
    })
}

/// Completes when the client has left (end of file, an error), without a
/// read buffer of its own while it waits; what it sends meanwhile is read
/// and discarded, and `pipelined` set.
async fn client_left(socket: &Async<TcpStream>, pipelined: &mut bool) {
    loop {
        if socket.readable().await.is_err() {
            return;
        }
        match discard(socket.get_ref()) {
            Ok(0) => return,
            Ok(_) => *pipelined = true,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return,
        }
    }
}

/// Before closing a connection with bytes still coming (the rest of a
/// refused head): stops writing and reads what comes for a moment, so the
/// close does not reset the connection before the client has read the
/// answer.
async fn linger(socket: &Async<TcpStream>) {
    let _ = socket.get_ref().shutdown(std::net::Shutdown::Write);
    let drain = async { while let Ok(1..) = socket.read_with(discard).await {} };
    smol::future::or(drain, async {
        Timer::after(Duration::from_secs(1)).await;
    })
    .await;
}

/// Reads what the socket has and drops it; no buffer is kept.
fn discard(mut socket: &TcpStream) -> io::Result<usize> {
    let mut scratch = [0u8; 1024];
    socket.read(&mut scratch)
}

/// Writes all of `slices`, in as few writes as the socket takes.
async fn write_all(socket: &Async<TcpStream>, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        let n = socket.write_with(|mut s| s.write_vectored(slices)).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

/// A connection handed to hyper: the bytes the front read first, then the
/// socket.
struct Replay {
    buffered: Vec<u8>,
    at: usize,
    socket: Async<TcpStream>,
}

impl AsyncRead for Replay {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.at < this.buffered.len() {
            let n = buf.len().min(this.buffered.len() - this.at);
            buf[..n].copy_from_slice(&this.buffered[this.at..this.at + n]);
            this.at += n;
            if this.at == this.buffered.len() {
                this.buffered = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(n));
        }
        Pin::new(&mut this.socket).poll_read(cx, buf)
    }
}

impl AsyncWrite for Replay {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.socket).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.socket).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.socket).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.socket).poll_close(cx)
    }
}
