//! The core's [`Connector`] over hyper's HTTP/1 client on smol.

use futures::Stream;
use futures_rustls::TlsConnector;
use futures_rustls::pki_types::ServerName;
use futures_rustls::rustls::{ClientConfig, RootCertStore};
use http_body_util::{BodyStream, Full};
use hyper::body::Bytes;
use hyper::header::{
    ACCEPT, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, COOKIE, HOST, HeaderName, HeaderValue,
    LOCATION, RETRY_AFTER,
};
use hyper::{Method, Request, Uri};
use smol_hyper::rt::FuturesIo;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tidemark_core::reconnect::check_response;
use tidemark_core::{ConnectRequest, Connector, Failure};

/// Opens SSE connections over HTTP/1.1, plain or TLS (rustls); its
/// [`request`](Self::request) sends the other requests a protocol needs
/// (POST, DELETE) the same way.
///
/// Sends `Accept: text/event-stream`, `Cache-Control: no-cache`, the
/// `Last-Event-ID` and the configured headers; follows up to
/// `max_redirects` redirects (sending `Authorization` and `Cookie` only to
/// the original origin); a response other than a 200 `text/event-stream`
/// becomes a [`Failure`] with the status and its `Retry-After`. Dropping the
/// body closes the connection.
#[derive(Clone, Debug)]
pub struct HttpConnector {
    /// How long a TCP connect, the TLS handshake and the response headers
    /// may take.
    pub connect_timeout: Duration,
    /// How many redirects to follow before failing.
    pub max_redirects: u32,
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
            tls: Arc::new(tls),
        }
    }
}

/// A response body: its data chunks, and the task driving the connection
/// (cancelled, closing the socket, when the body is dropped).
pub struct HttpBody {
    chunks: Pin<Box<dyn Stream<Item = Result<Bytes, Failure>> + Send>>,
    _connection: Option<smol::Task<()>>,
}

impl std::fmt::Debug for HttpBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpBody")
            .field("connection", &self._connection.is_some())
            .finish_non_exhaustive()
    }
}

impl HttpBody {
    /// A body of `bytes` already read: one chunk, then the end.
    pub fn from_bytes(bytes: Bytes) -> Self {
        HttpBody {
            chunks: Box::pin(futures::stream::once(async move { Ok(bytes) })),
            _connection: None,
        }
    }
}

impl Stream for HttpBody {
    type Item = Result<Bytes, Failure>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.chunks.as_mut().poll_next(cx)
    }
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
    /// `headers` and `body` (empty for none). Only a GET follows redirects
    /// (up to `max_redirects`, sending `Authorization` and `Cookie` only to
    /// the original origin); other methods get the redirect back as it is.
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
        let mut uri: Uri = url
            .parse()
            .map_err(|e| Failure::Request(format!("{url}: {e}")))?;
        let origin = uri.authority().cloned();
        let mut redirects = 0;
        let (response, task) = loop {
            // Credentials go only to the origin the caller named.
            let same_origin = uri.authority() == origin.as_ref();
            let (response, task) = self
                .open(&uri, &method, headers, body.clone(), same_origin)
                .await?;
            let location = response
                .headers()
                .get(LOCATION)
                .and_then(|v| v.to_str().ok())
                .filter(|_| method == Method::GET && response.status().is_redirection());
            let Some(location) = location else {
                break (response, task);
            };
            redirects += 1;
            if redirects > self.max_redirects {
                return Err(Failure::Request(format!(
                    "{url}: more than {} redirects",
                    self.max_redirects
                )));
            }
            uri = resolve(&uri, location)
                .ok_or_else(|| Failure::Request(format!("bad redirect to {location:?}")))?;
        };
        let (head, body) = response.into_parts();
        let chunks = futures::StreamExt::filter_map(BodyStream::new(body), |frame| async move {
            match frame {
                Ok(frame) => frame.into_data().ok().map(Ok),
                Err(e) => Some(Err(network(e))),
            }
        });
        Ok(HttpResponse {
            status: head.status.as_u16(),
            headers: head.headers,
            body: HttpBody {
                chunks: Box::pin(chunks),
                _connection: Some(task),
            },
        })
    }

    /// Sends one request and waits for the response headers.
    async fn open(
        &self,
        uri: &Uri,
        method: &Method,
        headers: &[(String, String)],
        body: Bytes,
        same_origin: bool,
    ) -> Result<(hyper::Response<hyper::body::Incoming>, smol::Task<()>), Failure> {
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => {
                return Err(Failure::Request(format!(
                    "{uri}: only http:// and https:// URLs are supported"
                )));
            }
        };
        let host = uri
            .host()
            .ok_or_else(|| Failure::Request(format!("{uri}: no host")))?
            .trim_matches(|c| c == '[' || c == ']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let authority = uri.authority().map(|a| a.to_string()).unwrap_or_default();
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();

        let mut builder = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(HOST, authority);
        for (name, value) in headers {
            let name = HeaderName::try_from(name.as_str())
                .map_err(|e| Failure::Request(format!("header {name:?}: {e}")))?;
            if !same_origin && (name == AUTHORIZATION || name == COOKIE) {
                continue;
            }
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

/// Sends `request` over `io` and waits for the response headers; the
/// returned task drives the connection.
async fn exchange<IO>(
    io: IO,
    request: Request<Full<Bytes>>,
) -> Result<(hyper::Response<hyper::body::Incoming>, smol::Task<()>), Failure>
where
    IO: futures::AsyncRead + futures::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(FuturesIo::new(io))
        .await
        .map_err(network)?;
    let task = smol::spawn(async move {
        let _ = connection.await;
    });
    let response = sender.send_request(request).await.map_err(network)?;
    Ok((response, task))
}

/// `location` (absolute, or a path) relative to `base`.
fn resolve(base: &Uri, location: &str) -> Option<Uri> {
    let target: Uri = location.parse().ok()?;
    if target.scheme().is_some() {
        return Some(target);
    }
    let path = target.path_and_query()?.as_str();
    if !path.starts_with('/') {
        return None;
    }
    Uri::builder()
        .scheme(base.scheme()?.clone())
        .authority(base.authority()?.clone())
        .path_and_query(path)
        .build()
        .ok()
}

impl Connector for HttpConnector {
    type Chunk = Bytes;
    type Body = HttpBody;

    async fn connect(&self, request: ConnectRequest<'_>) -> Result<HttpBody, Failure> {
        let mut headers = Vec::with_capacity(request.headers.len() + 3);
        headers.push((ACCEPT.to_string(), "text/event-stream".to_owned()));
        headers.push((CACHE_CONTROL.to_string(), "no-cache".to_owned()));
        if let Some(id) = request.last_event_id {
            headers.push(("last-event-id".to_owned(), id.to_owned()));
        }
        headers.extend_from_slice(request.headers);
        let response = self
            .request(Method::GET, request.url, &headers, Bytes::new())
            .await?;
        check_response(
            response.status,
            response.header(RETRY_AFTER.as_str()),
            response.header(CONTENT_TYPE.as_str()),
        )?;
        Ok(response.body)
    }
}
