//! The core's [`Connector`] over hyper's HTTP/1 client on smol.

use futures::Stream;
use futures::future::{Either, select};
use futures_rustls::TlsConnector;
use futures_rustls::pki_types::ServerName;
use futures_rustls::rustls::{ClientConfig, RootCertStore};
use http_body_util::Full;
use hyper::body::{Body as _, Bytes};
use hyper::header::{
    ACCEPT, CACHE_CONTROL, CONTENT_TYPE, HOST, HeaderName, HeaderValue, LOCATION, RETRY_AFTER,
};
use hyper::{Method, Request};
use smol_hyper::rt::FuturesIo;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tidemark_core::reconnect::{check_response, parse_retry_after};
use tidemark_core::{ConnectRequest, Connector, Failure, Millis};
use url::{Position, Url};

/// Opens SSE connections over HTTP/1.1, plain or TLS (rustls); its
/// [`request`](Self::request) sends the other requests a protocol needs
/// (POST, DELETE) the same way.
///
/// Sends `Accept: text/event-stream`, `Cache-Control: no-cache`, the
/// `Last-Event-ID` and the configured headers; a response other than a 200
/// `text/event-stream` becomes a [`Failure`] with the status and the delay
/// its `Retry-After` asks for (delta-seconds, or an HTTP date against the
/// system clock: [`HttpResponse::retry_after`]). Dropping the body closes
/// the connection.
///
/// # Redirects
///
/// A 301, 302, 303, 307 or 308 response with a `Location` is followed, at
/// most `max_redirects` times in a row (one more is a permanent
/// [`Failure::Request`]); any other response, other 3xx included, is the
/// answer.
///
/// - `Location` is resolved against the URL that was redirected as RFC 3986
///   says: `next`, `../x`, `?page=2`, `//host:port/path` and absolute URLs.
///   It must lead to an `http` or `https` URL without user name or password.
/// - A redirect from `https` to `http` is refused with a permanent
///   [`Failure::Request`]: the request would go out in clear text.
/// - An origin is a scheme, a host and a port (80 for `http` and 443 for
///   `https` when none is given). The headers the caller gave (the
///   [`ConnectRequest`] headers, which carry the CLI's `-H`, so
///   `Authorization`, `Cookie`, API keys and session ids) are credentials:
///   they go only to the origin of the URL asked for, and only until the
///   first redirect that leaves it. From there on, back on the original
///   origin or not, only the connector's own protocol headers are sent:
///   `Host`, `Accept`, `Cache-Control`, `Last-Event-ID` and, for a request
///   with a body, `Content-Type`.
/// - The method changes as `fetch` changes it: a 303 turns any method but
///   GET and HEAD into a GET, and a 301 or 302 turns a POST into a GET; the
///   body and its headers (`Content-Type`, `Content-Encoding`,
///   `Content-Language`, `Content-Location`) are then dropped. A 307 or 308
///   repeats the method and the body.
#[derive(Clone, Debug)]
pub struct HttpConnector {
    /// How long a TCP connect, the TLS handshake and the response headers
    /// may take.
    pub connect_timeout: Duration,
    /// How many redirects to follow before failing.
    pub max_redirects: u32,
    /// Whether to follow redirects at all; `false` hands a 3xx back as the
    /// answer (what a proxy wants).
    pub follow_redirects: bool,
    tls: Arc<ClientConfig>,
}

impl Default for HttpConnector {
    /// Trusts the bundled Mozilla root certificates (webpki-roots).
    fn default() -> Self {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        Self::with_roots(roots)
    }
}

impl HttpConnector {
    /// A connector trusting exactly `roots` for https (a private CA, or a
    /// test certificate).
    pub fn with_roots(roots: RootCertStore) -> Self {
        let provider = Arc::new(futures_rustls::rustls::crypto::ring::default_provider());
        let tls = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        HttpConnector {
            connect_timeout: Duration::from_secs(10),
            max_redirects: 5,
            follow_redirects: true,
            tls: Arc::new(tls),
        }
    }
}

/// A response body: its data chunks, and the connection they come from.
///
/// The body drives its connection itself: each poll polls hyper's
/// connection future first (reading the socket into the body's channel),
/// then the body. Socket reads, parsing and the consumer stay on the task
/// that reads the body, so no chunk crosses threads and no executor thread
/// is woken per chunk. Frames that are already in are joined into one chunk
/// (up to 64 KiB): a server that writes one HTTP chunk per event still
/// makes one chunk per read for the client loop, which flushes its output
/// once per chunk. Dropping the body drops the connection, closing the
/// socket.
pub struct HttpBody {
    source: Source,
}

impl std::fmt::Debug for HttpBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let source = match &self.source {
            Source::Bytes(_) => "bytes",
            Source::Hyper { .. } => "connection",
        };
        f.debug_struct("HttpBody")
            .field("source", &source)
            .finish_non_exhaustive()
    }
}

enum Source {
    /// A body already read; `None` once taken.
    Bytes(Option<Bytes>),
    Hyper {
        body: hyper::body::Incoming,
        /// `None` once the connection is done.
        connection: Option<Connection>,
        /// The end (`None`) or error that came right after data already
        /// returned, for the next poll.
        end: Option<Option<Failure>>,
    },
}

/// Frames that are already in (a server that writes one frame per event
/// sends many in one TCP segment) are joined into one chunk up to this
/// size, so that the client loop flushes its output once for all of them.
const COALESCE_BYTES: usize = 64 * 1024;

/// The next data frame of `body`, skipping trailers.
fn poll_data(
    body: &mut hyper::body::Incoming,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Bytes, Failure>>> {
    loop {
        return match Pin::new(&mut *body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => Poll::Ready(Some(Ok(data))),
                Err(_) => continue,
            },
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(network(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        };
    }
}

/// Polls the connection, forgetting it once it is done.
fn drive(connection: &mut Option<Connection>, cx: &mut Context<'_>) {
    if let Some(running) = connection
        && running.as_mut().poll(cx).is_ready()
    {
        *connection = None;
    }
}

/// Hyper's connection future, over plain TCP or TLS.
type Connection = Pin<Box<dyn Future<Output = ()> + Send>>;

impl HttpBody {
    /// A body of `bytes` already read: one chunk, then the end.
    pub fn from_bytes(bytes: Bytes) -> Self {
        HttpBody {
            source: Source::Bytes(Some(bytes)),
        }
    }
}

impl Stream for HttpBody {
    type Item = Result<Bytes, Failure>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let (body, connection, end) = match &mut self.source {
            Source::Bytes(bytes) => return Poll::Ready(bytes.take().map(Ok)),
            Source::Hyper {
                body,
                connection,
                end,
            } => (body, connection, end),
        };
        if let Some(end) = end.take() {
            return Poll::Ready(end.map(Err));
        }
        drive(connection, cx);
        let first = match poll_data(body, cx) {
            Poll::Ready(Some(Ok(data))) => data,
            other => return other,
        };
        let mut joined: Option<Vec<u8>> = None;
        while joined.as_ref().map_or(first.len(), Vec::len) < COALESCE_BYTES {
            drive(connection, cx);
            match poll_data(body, cx) {
                Poll::Ready(Some(Ok(data))) => joined
                    .get_or_insert_with(|| {
                        let mut joined = Vec::with_capacity(COALESCE_BYTES + data.len());
                        joined.extend_from_slice(&first);
                        joined
                    })
                    .extend_from_slice(&data),
                Poll::Ready(Some(Err(failure))) => {
                    *end = Some(Some(failure));
                    break;
                }
                Poll::Ready(None) => {
                    *end = Some(None);
                    break;
                }
                Poll::Pending => break,
            }
        }
        Poll::Ready(Some(Ok(joined.map_or(first, Bytes::from))))
    }
}

/// `time` in milliseconds since the Unix epoch, if it is after it.
fn unix_millis(time: SystemTime) -> Option<Millis> {
    let since = time.duration_since(UNIX_EPOCH).ok()?;
    Some(Millis(u64::try_from(since.as_millis()).unwrap_or(u64::MAX)))
}

fn network(error: impl std::fmt::Display) -> Failure {
    Failure::Network(error.to_string())
}

/// A response to [`HttpConnector::request`]: the head, and the body as a
/// stream of chunks.
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// The response headers.
    pub headers: hyper::HeaderMap,
    /// The body; dropping it closes the connection.
    pub body: HttpBody,
}

/// Header names only: values may carry cookies or tokens.
impl std::fmt::Debug for HttpResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpResponse")
            .field("status", &self.status)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("body", &self.body)
            .finish()
    }
}

impl HttpResponse {
    /// The value of header `name`, if present and visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The delay its `Retry-After` header asks for, in delta-seconds or as
    /// an HTTP date (from the system clock's now), if it has a valid one.
    pub fn retry_after(&self) -> Option<Millis> {
        let value = self.header(RETRY_AFTER.as_str())?;
        let now = unix_millis(SystemTime::now()).unwrap_or(Millis::ZERO);
        parse_retry_after(value, now, |date| {
            httpdate::parse_http_date(date).ok().and_then(unix_millis)
        })
    }

    /// Reads the whole body, failing with [`Failure::Request`] beyond
    /// `limit` bytes.
    pub async fn bytes(mut self, limit: usize) -> Result<Vec<u8>, Failure> {
        let mut bytes = Vec::new();
        while let Some(chunk) = futures::StreamExt::next(&mut self.body).await {
            bytes.extend_from_slice(&chunk?);
            if bytes.len() > limit {
                return Err(Failure::Request(format!(
                    "response body larger than {limit} bytes"
                )));
            }
        }
        Ok(bytes)
    }
}

impl HttpConnector {
    /// Sends one request and waits for the response head: `method` with
    /// `headers` and `body` (empty for none), following redirects as the
    /// [type's docs](HttpConnector#redirects) say. Of `headers`, `Accept`,
    /// `Cache-Control`, `Last-Event-ID` and `Content-Type` are the
    /// protocol's, sent to whichever origin a redirect leads to; all others
    /// are credentials, sent only to the original origin.
    ///
    /// This is the connector's plumbing, public for protocols that drive a
    /// stream with other requests: MCP's JSON-RPC POSTs, for one.
    pub async fn request(
        &self,
        method: Method,
        url: &str,
        headers: &[(String, String)],
        body: Bytes,
    ) -> Result<HttpResponse, Failure> {
        let (protocol, credentials): (Vec<_>, Vec<_>) = headers
            .iter()
            .cloned()
            .partition(|(name, _)| is_one_of(name, &PROTOCOL_HEADERS));
        self.send(method, url, &protocol, &credentials, body).await
    }

    /// [`request`](Self::request) with the headers already split into the
    /// protocol's and the caller's (the credentials).
    async fn send(
        &self,
        mut method: Method,
        url: &str,
        protocol: &[(String, String)],
        credentials: &[(String, String)],
        mut body: Bytes,
    ) -> Result<HttpResponse, Failure> {
        let mut url = Url::parse(url).map_err(|e| Failure::Request(format!("{url}: {e}")))?;
        let origin = url.origin();
        let mut on_origin = true;
        let mut body_dropped = false;
        let mut redirects = 0;
        let (response, connection) = loop {
            // Once a redirect has left the original origin, the credentials
            // stay behind for the rest of the chain.
            on_origin &= url.origin() == origin;
            let mut headers: Vec<&(String, String)> = protocol.iter().collect();
            if on_origin {
                headers.extend(credentials);
            }
            if body_dropped {
                headers.retain(|(name, _)| !is_one_of(name, &BODY_HEADERS));
            }
            let (response, connection) = self.open(&url, &method, &headers, body.clone()).await?;
            let status = response.status().as_u16();
            let location = response
                .headers()
                .get(LOCATION)
                .filter(|_| self.follow_redirects && matches!(status, 301 | 302 | 303 | 307 | 308));
            let Some(location) = location else {
                break (response, connection);
            };
            redirects += 1;
            if redirects > self.max_redirects {
                return Err(Failure::Request(format!(
                    "{url}: more than {} redirects",
                    self.max_redirects
                )));
            }
            let next = redirect_target(&url, location.as_bytes())?;
            let to_get = match status {
                303 => method != Method::GET && method != Method::HEAD,
                301 | 302 => method == Method::POST,
                _ => false,
            };
            if to_get {
                method = Method::GET;
                body = Bytes::new();
                body_dropped = true;
            }
            url = next;
        };
        let (head, body) = response.into_parts();
        Ok(HttpResponse {
            status: head.status.as_u16(),
            headers: head.headers,
            body: HttpBody {
                source: Source::Hyper {
                    body,
                    connection,
                    end: None,
                },
            },
        })
    }

    /// Sends one request and waits for the response headers.
    async fn open(
        &self,
        url: &Url,
        method: &Method,
        headers: &[&(String, String)],
        body: Bytes,
    ) -> Result<(hyper::Response<hyper::body::Incoming>, Option<Connection>), Failure> {
        let tls = match url.scheme() {
            "http" => false,
            "https" => true,
            _ => {
                return Err(Failure::Request(format!(
                    "{url}: only http:// and https:// URLs are supported"
                )));
            }
        };
        if !url.username().is_empty() || url.password().is_some() {
            // Not echoed: the URL holds a password.
            return Err(Failure::Request(
                "a user name or password in the URL is not supported: send an Authorization header"
                    .into(),
            ));
        }
        let host = url
            .host_str()
            .ok_or_else(|| Failure::Request(format!("{url}: no host")))?;
        let authority = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        let host = host.trim_matches(|c| c == '[' || c == ']').to_owned();
        let port = url
            .port_or_known_default()
            .unwrap_or(if tls { 443 } else { 80 });
        let path = &url[Position::BeforePath..Position::AfterQuery];

        let mut builder = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(HOST, authority);
        for (name, value) in headers {
            let name = HeaderName::try_from(name.as_str())
                .map_err(|e| Failure::Request(format!("header {name:?}: {e}")))?;
            let value = HeaderValue::try_from(value.as_str())
                .map_err(|e| Failure::Request(format!("header {name}: {e}")))?;
            builder = builder.header(name, value);
        }
        let http_request = builder
            .body(Full::new(body))
            .map_err(|e| Failure::Request(e.to_string()))?;

        let opening = async {
            let stream = smol::net::TcpStream::connect((host.as_str(), port))
                .await
                .map_err(network)?;
            stream.set_nodelay(true).map_err(network)?;
            if !tls {
                return exchange(stream, http_request).await;
            }
            let name = ServerName::try_from(host.clone())
                .map_err(|e| Failure::Request(format!("{host}: {e}")))?;
            let stream = TlsConnector::from(self.tls.clone())
                .connect(name, stream)
                .await
                .map_err(|e| tls_failure(&host, &e))?;
            exchange(stream, http_request).await
        };
        let timeout = async {
            async_io::Timer::after(self.connect_timeout).await;
            Err(Failure::Network(format!(
                "no response within {:?}",
                self.connect_timeout
            )))
        };
        smol::future::or(opening, timeout).await
    }
}

/// The headers of [`HttpConnector::request`] that are the protocol's own,
/// sent after a redirect to another origin too.
const PROTOCOL_HEADERS: [&str; 4] = ["accept", "cache-control", "last-event-id", "content-type"];

/// The headers that describe a request body, dropped with it when a redirect
/// turns the request into a GET (fetch's "request-body-header names").
const BODY_HEADERS: [&str; 4] = [
    "content-encoding",
    "content-language",
    "content-location",
    "content-type",
];

/// Whether header `name` is one of `names`, ignoring ASCII case.
pub(crate) fn is_one_of(name: &str, names: &[&str]) -> bool {
    names.iter().any(|n| name.eq_ignore_ascii_case(n))
}

/// Where a redirect from `from` to `location` leads (RFC 3986 reference
/// resolution), unless it is a downgrade from https to http.
fn redirect_target(from: &Url, location: &[u8]) -> Result<Url, Failure> {
    let bad = |e: &dyn std::fmt::Display| {
        Failure::Request(format!(
            "bad redirect from {from} to {:?}: {e}",
            String::from_utf8_lossy(location)
        ))
    };
    let location = std::str::from_utf8(location).map_err(|e| bad(&e))?;
    let to = from.join(location).map_err(|e| bad(&e))?;
    if from.scheme() == "https" && to.scheme() == "http" {
        return Err(Failure::Request(format!(
            "refusing a redirect from https to http: {from} redirected to {to}, \
             which would send the request in clear text"
        )));
    }
    Ok(to)
}

/// A certificate the connector does not trust will not become trusted by
/// retrying: that is permanent. Other TLS failures are network failures.
fn tls_failure(host: &str, error: &std::io::Error) -> Failure {
    let message = format!("TLS with {host}: {error}");
    let rustls_error = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<futures_rustls::rustls::Error>());
    match rustls_error {
        Some(futures_rustls::rustls::Error::InvalidCertificate(_)) => Failure::Request(message),
        _ => Failure::Network(message),
    }
}

/// Sends `request` over `io` and waits for the response headers, driving
/// the connection meanwhile; the returned future (`None` if the connection
/// is already done) drives it from then on.
async fn exchange<IO>(
    io: IO,
    request: Request<Full<Bytes>>,
) -> Result<(hyper::Response<hyper::body::Incoming>, Option<Connection>), Failure>
where
    IO: futures::AsyncRead + futures::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(FuturesIo::new(io))
        .await
        .map_err(network)?;
    let mut connection: Connection = Box::pin(async move {
        let _ = connection.await;
    });
    let sent = pin!(sender.send_request(request));
    let (response, connection) = match select(sent, connection.as_mut()).await {
        Either::Left((response, _)) => (response, Some(connection)),
        // The connection is done (a short response, then close), or failed
        // and the request fails with its error.
        Either::Right(((), sent)) => (sent.await, None),
    };
    Ok((response.map_err(network)?, connection))
}

impl Connector for HttpConnector {
    type Chunk = Bytes;
    type Body = HttpBody;

    async fn connect(&self, request: ConnectRequest<'_>) -> Result<HttpBody, Failure> {
        if request.body.is_some() {
            // It reads no Content-Location either: a POST stream here could
            // never be resumed.
            return Err(Failure::Request(
                "this connector opens GET streams only, not POST streams".into(),
            ));
        }
        let mut protocol = Vec::with_capacity(3);
        protocol.push((ACCEPT.to_string(), "text/event-stream".to_owned()));
        protocol.push((CACHE_CONTROL.to_string(), "no-cache".to_owned()));
        if let Some(id) = request.last_event_id {
            protocol.push(("last-event-id".to_owned(), id.to_owned()));
        }
        let response = self
            .send(
                Method::GET,
                request.url,
                &protocol,
                request.headers,
                Bytes::new(),
            )
            .await?;
        check_response(
            response.status,
            response.retry_after(),
            response.header(CONTENT_TYPE.as_str()),
        )?;
        Ok(response.body)
    }
}
