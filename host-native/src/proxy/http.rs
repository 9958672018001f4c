//! One request through the proxy: forwarded upstream, its answer passed
//! through unchanged unless it is an event stream, which becomes (or
//! joins) a logged stream served from the log.

use super::client;
use super::fleet;
use super::hub::{GetKey, Hub, LoggedStream, Upstream, Who, default_headers};
use super::mcp::Mcp;
use super::storage::{StreamKind, StreamMeta};
use super::upstream::{follow_get, read_post};
use crate::HttpResponse;
use crate::connector::is_one_of;
use crate::metrics::Limit;
use futures::StreamExt;
use http_body_util::{BodyExt, Empty, Full, Limited, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::header::{
    CONTENT_LOCATION, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER,
};
use hyper::{Method, Request, Response, StatusCode};
use std::convert::Infallible;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tidemark_core::Clock;
use tidemark_core::replay::{Identity, Start, StreamToken, parse_event_id};
use tidemark_core::sse::encode_comment;

/// A response body: from the log, from the upstream, or fixed.
pub(super) type Body = UnsyncBoxBody<Bytes, io::Error>;

/// Where POST streams are resumed: `/_tidemark/streams/<token>`.
pub const STREAMS_PATH: &str = "/_tidemark/streams/";

/// Headers that belong to one connection (RFC 9110 section 7.6.1), never
/// forwarded either way, and those the proxy sets itself.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Answers one request that hyper read.
pub(super) async fn handle(
    hub: Arc<Hub>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let target = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    if request.uri().path().starts_with(STREAMS_PATH) {
        if request.method() != Method::GET {
            return Ok(status(StatusCode::METHOD_NOT_ALLOWED, "resume with GET"));
        }
        return Ok(handle_get(hub, target, request.headers()).await);
    }
    let (parts, body) = request.into_parts();
    let limit = hub.config.limits.max_body_bytes;
    let body = match Limited::new(body, limit).collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            hub.metrics.refused(Limit::BodyBytes);
            return Ok(status(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("request body larger than {limit} bytes"),
            ));
        }
        Err(e) => return Ok(status(StatusCode::BAD_REQUEST, &e.to_string())),
    };
    let method = parts.method;
    if method == Method::GET && body.is_empty() {
        return Ok(handle_get(hub, target, &parts.headers).await);
    }
    let identity = who(&hub, &parts.headers).owner;
    let mcp = Mcp::of(&parts.headers);
    let headers = forwarded(&parts.headers);
    let response = match forward(&hub, method.clone(), &target, &headers, body).await {
        Ok(response) => response,
        Err(answer) => return Ok(answer),
    };
    if mcp.session {
        session_answered(&hub, &method, identity, response.status);
    }
    if method == Method::HEAD || response.status != 200 || !is_event_stream(&response) {
        return Ok(pass_through(response));
    }
    if mcp.passes_through() {
        return Ok(kept_alive(response, hub.config.keep_alive));
    }
    let stream = match hub.post_stream(target, identity) {
        Ok(stream) => stream,
        // Logging it is refused, but the request was made: pass the answer
        // on as it is, not resumable, rather than lose it.
        Err(_) => return Ok(pass_through(response)),
    };
    stream.set_headers(stream_headers(&response.headers));
    stream.state().upstream = Upstream::Live;
    // In a fleet, its reader holds its lease: the others know it is read.
    let lease = match &hub.fleet {
        Some(fleet) => {
            let lease = fleet.lease(stream.meta.token);
            let _ = lease.try_acquire().await;
            Some(lease)
        }
        None => None,
    };
    hub.executor
        .spawn(read_post(hub.clone(), stream.clone(), response.body, lease))
        .detach();
    let location = format!("{STREAMS_PATH}{}", stream.meta.token);
    let start = stream.state().log.start(None);
    let mut response = serve(&hub, stream, start, mcp.primes());
    if let Ok(location) = HeaderValue::try_from(location) {
        response.headers_mut().insert(CONTENT_LOCATION, location);
    }
    Ok(response)
}

/// Answers a `GET` without a body of `target` (its path and query), read
/// by hyper or by the proxy's own front: a resume at [`STREAMS_PATH`], or
/// a GET stream joined or opened, or the upstream's answer passed through.
pub(super) async fn handle_get(
    hub: Arc<Hub>,
    target: String,
    headers: &HeaderMap,
) -> Response<Body> {
    let who = who(&hub, headers);
    let mcp = Mcp::of(headers);
    let last_event_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let path = target
        .split_once('?')
        .map_or(target.as_str(), |(path, _)| path);
    if let Some(token) = path.strip_prefix(STREAMS_PATH) {
        let found = match StreamToken::parse(token) {
            Some(token) => find(&hub, token, who.owner).await,
            None => Ok(None),
        };
        return match found {
            Ok(Some(stream)) => resume(&hub, stream, last_event_id.as_deref(), mcp),
            Ok(None) => no_such_stream(),
            Err(answer) => answer,
        };
    }
    let mut upstream_headers = forwarded(headers);
    if mcp.passes_through() {
        // No ids to resume with in this revision: the stream as it comes.
        let response =
            match forward(&hub, Method::GET, &target, &upstream_headers, Bytes::new()).await {
                Ok(response) => response,
                Err(answer) => return answer,
            };
        if mcp.session {
            session_answered(&hub, &Method::GET, who.owner, response.status);
        }
        return if response.status == 200 && is_event_stream(&response) {
            kept_alive(response, hub.config.keep_alive)
        } else {
            pass_through(response)
        };
    }
    // The client's Last-Event-ID is one of the proxy's ids, never the
    // upstream's.
    upstream_headers.retain(|(name, _)| !name.eq_ignore_ascii_case("last-event-id"));
    // An id names its stream: resume that one, whichever key it was shared
    // by (an MCP session resumes any of its streams so, by id alone).
    let named = match last_event_id.as_deref().and_then(parse_event_id) {
        Some((token, _)) => match find(&hub, token, who.owner).await {
            Ok(found) => found,
            Err(answer) => return answer,
        },
        None => None,
    }
    .filter(|s| mcp.session || (s.meta.kind == StreamKind::Get && s.meta.target == target));
    let wants_stream = headers.get_all(hyper::header::ACCEPT).iter().any(|v| {
        v.as_bytes()
            .windows(17)
            .any(|w| w.eq_ignore_ascii_case(b"text/event-stream"))
    });
    let mut request = GetRequest {
        key: (target, who.sharing),
        owner: who.owner,
        url: String::new(),
        headers: upstream_headers,
        last_event_id,
        mcp,
        wants_stream,
    };
    match named {
        Some(stream) => resume_named(hub, stream, request).await,
        None if mcp.session && request.last_event_id.is_some() => no_such_stream(),
        None => {
            request.url = hub.config.upstream_url(&request.key.0);
            get(hub, request).await
        }
    }
}

/// A GET whose `Last-Event-ID` names `stream`: a POST answer, or a GET
/// stream that ended, served as logged; a GET stream joined (revived if
/// idle) by the key it is shared by.
async fn resume_named(
    hub: Arc<Hub>,
    stream: Arc<LoggedStream>,
    mut request: GetRequest,
) -> Response<Body> {
    let shared = match &stream.key {
        Some(key) if !stream.state().log.is_ended() => Some(key.clone()),
        _ => None,
    };
    let Some(key) = shared else {
        return resume(&hub, stream, request.last_event_id.as_deref(), request.mcp);
    };
    request.url = hub.config.upstream_url(&key.0);
    request.key = key;
    get(hub, request).await
}

/// Sends a request upstream; on failure, the answer for the client.
async fn forward(
    hub: &Hub,
    method: Method,
    target: &str,
    headers: &[(String, String)],
    body: Bytes,
) -> Result<HttpResponse, Response<Body>> {
    let url = hub.config.upstream_url(target);
    hub.request_connector
        .request(method, &url, headers, body)
        .await
        .map_err(|e| {
            hub.metrics.upstream_failure();
            status(StatusCode::BAD_GATEWAY, &e.to_string())
        })
}

/// What the upstream's answer to a request of an MCP session says of the
/// session: a `DELETE` it accepted drops the session's logs, a `404` (it
/// does not know the session) ends them.
fn session_answered(hub: &Hub, method: &Method, identity: Identity, status: u16) {
    if *method == Method::DELETE && (200..300).contains(&status) {
        hub.end_identity(identity, true);
    } else if status == 404 {
        hub.end_identity(identity, false);
    }
}

/// A GET of a stream path, as [`get`] takes it.
struct GetRequest {
    key: GetKey,
    owner: Identity,
    url: String,
    headers: Vec<(String, String)>,
    last_event_id: Option<String>,
    mcp: Mcp,
    /// It accepts `text/event-stream`: in a fleet, it agrees on the
    /// stream's token with the other instances before asking upstream.
    wants_stream: bool,
}

/// A GET of `key`: joins its live stream, or asks the upstream (once for
/// all requests that arrive meanwhile) and logs the answer if it is a
/// stream.
async fn get(hub: Arc<Hub>, request: GetRequest) -> Response<Body> {
    enum Next {
        Join,
        Wait(event_listener::EventListener),
        Open(Option<String>),
    }
    loop {
        let stream = match stream_of(&hub, &request).await {
            Ok(stream) => stream,
            Err(answer) => return answer,
        };
        let next = {
            let mut state = stream.state();
            match state.upstream {
                Upstream::Live if !state.stop => Next::Join,
                Upstream::Mirrored => Next::Join,
                Upstream::Live | Upstream::Opening => Next::Wait(stream.changed.listen()),
                Upstream::Idle => {
                    state.upstream = Upstream::Opening;
                    Next::Open(state.log.upstream_id().map(str::to_owned))
                }
            }
        };
        match next {
            Next::Join => {
                if request.last_event_id.is_some() {
                    hub.metrics.resume();
                }
                let start = start_of(&stream, request.last_event_id.as_deref());
                return serve(&hub, stream, start, request.mcp.primes());
            }
            Next::Wait(listener) => listener.await,
            Next::Open(upstream_id) => return open(&hub, stream, request, upstream_id).await,
        }
    }
}

/// The stream of a GET: this instance's, else in a fleet the one the
/// fleet agrees on (taken in from Redis if it was logged there), else a
/// new one.
async fn stream_of(hub: &Hub, request: &GetRequest) -> Result<Arc<LoggedStream>, Response<Body>> {
    let mut token = None;
    if let Some(fleet) = &hub.fleet
        && request.wants_stream
        && hub.local_get(&request.key).is_none()
    {
        let fresh = StreamToken::random()
            .map_err(|e| status(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()))?;
        let meta = StreamMeta {
            token: fresh,
            kind: StreamKind::Get,
            target: request.key.0.clone(),
            identity: request.owner,
            created: hub.clock.now(),
        };
        let agreed = fleet
            .agree(hub, &request.key, &meta)
            .await
            .map_err(fleet_down)?;
        if agreed != fresh
            && let Some(stored) = fleet.load(agreed).await.map_err(fleet_down)?
        {
            return Ok(hub.adopt(stored, Some(request.key.clone())));
        }
        token = Some(agreed);
    }
    hub.get_stream(&request.key, request.owner, token)
        .map_err(refused)
}

/// The stream of `token` if it is `owner`'s: this instance's, else in a
/// fleet the one in Redis, taken in (and mirrored, if it is a POST answer
/// still being read elsewhere).
async fn find(
    hub: &Arc<Hub>,
    token: StreamToken,
    owner: Identity,
) -> Result<Option<Arc<LoggedStream>>, Response<Body>> {
    if let Some(stream) = hub.find(token, owner) {
        return Ok(Some(stream));
    }
    let Some(fleet) = &hub.fleet else {
        return Ok(None);
    };
    let Some(stored) = fleet.load(token).await.map_err(fleet_down)? else {
        return Ok(None);
    };
    if stored.meta.identity != owner {
        return Ok(None);
    }
    let key = (stored.meta.kind == StreamKind::Get).then(|| (stored.meta.target.clone(), owner));
    let stream = hub.adopt(stored, key);
    if stream.meta.kind == StreamKind::Post && !stream.state().log.is_ended() {
        fleet::mirror(hub, fleet, &stream, None);
    }
    Ok(Some(stream))
}

/// What a request that needs the fleet's log gets while Redis is down.
fn fleet_down(e: io::Error) -> Response<Body> {
    let mut response = status(
        StatusCode::SERVICE_UNAVAILABLE,
        &format!("the fleet's log is unreachable ({e})"),
    );
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

/// Where a client of a GET stream starts: after its `Last-Event-ID`, or
/// live without one.
fn start_of(stream: &LoggedStream, last_event_id: Option<&str>) -> Start {
    let state = stream.state();
    match last_event_id {
        Some(id) => state.log.start(Some(id)),
        None => state.log.start_live(),
    }
}

/// Asks the upstream for a GET stream this request found idle.
async fn open(
    hub: &Arc<Hub>,
    stream: Arc<LoggedStream>,
    request: GetRequest,
    upstream_id: Option<String>,
) -> Response<Body> {
    let GetRequest {
        key: _,
        owner: identity,
        url,
        headers,
        last_event_id,
        mcp,
        wants_stream: _,
    } = request;
    // The first request goes as the client sent it (it may not be for a
    // stream at all); the follower's reconnects send the connector's own
    // Accept and Cache-Control.
    let mut request_headers = headers.clone();
    let mut headers = headers;
    headers.retain(|(name, _)| !is_one_of(name, &["accept", "cache-control"]));
    // Whatever ends this request before the stream is live (an answer that
    // is no stream, a failure, the client leaving while the upstream
    // thinks) puts the stream back to idle and wakes those waiting on it.
    let mut opening = Opening {
        hub: hub.clone(),
        stream: stream.clone(),
        live: false,
    };
    // In a fleet, the instance holding the stream's lease follows the
    // upstream; the others mirror the stream from Redis.
    let mut lease = None;
    if let Some(fleet) = &hub.fleet {
        let held = fleet.lease(stream.meta.token);
        match held.try_acquire().await {
            Ok(true) => {
                if let Err(e) = fleet.catch_up(&stream).await {
                    let _ = held.release().await;
                    return fleet_down(e);
                }
                let mut state = stream.state();
                state.writes = true;
                state.stored_upto = state.log.next_seq() - 1;
                drop(state);
                lease = Some(held);
            }
            Ok(false) => {
                let start = start_of(&stream, last_event_id.as_deref());
                opening.live = true;
                fleet::mirror(hub, fleet, &stream, Some((url, headers)));
                return serve(hub, stream, start, mcp.primes());
            }
            Err(e) => return fleet_down(io::Error::other(e)),
        }
    }
    let upstream_id = match &lease {
        // What the fleet logged meanwhile may have a newer upstream id.
        Some(_) => stream.state().log.upstream_id().map(str::to_owned),
        None => upstream_id,
    };
    if let Some(id) = &upstream_id {
        request_headers.push(("last-event-id".into(), id.clone()));
    }
    let answer = hub
        .get_connector
        .request(Method::GET, &url, &request_headers, Bytes::new())
        .await;
    let give_back = |lease: Option<crate::Lease>| async move {
        if let Some(lease) = lease {
            let _ = lease.release().await;
        }
    };
    let stored = stream.state().stored;
    if mcp.session
        && let Ok(response) = &answer
    {
        session_answered(hub, &Method::GET, identity, response.status);
    }
    let body = match answer {
        Ok(response) if response.status == 200 && is_event_stream(&response) => {
            stream.set_headers(stream_headers(&response.headers));
            Some(response.body)
        }
        // A stream that was logged before, whose upstream is down or busy
        // (a restart, a deploy): its clients are served from the log while
        // the follower retries with backoff. A plain EventSource would
        // stop for good on a 502.
        Ok(response) if stored && (response.status >= 500 || response.status == 429) => None,
        Err(_) if stored => {
            hub.metrics.upstream_failure();
            None
        }
        Ok(response) => {
            give_back(lease).await;
            return pass_through(response);
        }
        Err(e) => {
            give_back(lease).await;
            hub.metrics.upstream_failure();
            return status(StatusCode::BAD_GATEWAY, &e.to_string());
        }
    };
    if !stored && let Err(limit) = hub.log_open(&stream) {
        give_back(lease).await;
        return refused(limit);
    }
    // Where this client starts, before the follower can append: it gets
    // the stream from the follower's first event (computed after the spawn,
    // a follower on another thread could log events it would then miss).
    let start = start_of(&stream, last_event_id.as_deref());
    stream.state().upstream = Upstream::Live;
    opening.live = true;
    stream.changed.notify(usize::MAX);
    hub.executor
        .spawn(follow_get(
            hub.clone(),
            stream.clone(),
            url,
            headers,
            body,
            lease,
        ))
        .detach();
    if last_event_id.is_some() {
        hub.metrics.resume();
    }
    serve(hub, stream, start, mcp.primes())
}

/// A GET stream being opened by a request; dropped before it is live, it
/// goes back to idle.
struct Opening {
    hub: Arc<Hub>,
    stream: Arc<LoggedStream>,
    /// Set once the stream is live: nothing to undo.
    live: bool,
}

impl Drop for Opening {
    fn drop(&mut self) {
        if self.live {
            return;
        }
        self.stream.state().upstream = Upstream::Idle;
        self.stream.changed.notify(usize::MAX);
        self.hub.discard_if_empty(&self.stream);
    }
}

/// A resume of a POST stream (`GET /_tidemark/streams/<token>`, or an
/// MCP session's GET by id) after `Last-Event-ID` (from its first event
/// without one); `204` when it has ended and the client has it all.
fn resume(
    hub: &Arc<Hub>,
    stream: Arc<LoggedStream>,
    last_event_id: Option<&str>,
    mcp: Mcp,
) -> Response<Body> {
    if last_event_id.is_some() {
        hub.metrics.resume();
    }
    let start = stream.state().log.start(last_event_id);
    if start.gap.is_none() && stream.state().log.is_complete(start.next) {
        return empty(StatusCode::NO_CONTENT);
    }
    serve(hub, stream, start, mcp.primes())
}

/// What a resume of a stream that is unknown, or another identity's, gets.
fn no_such_stream() -> Response<Body> {
    status(StatusCode::NOT_FOUND, "no such stream")
}

/// A client of a logged stream, from `start`, primed if `priming`.
fn serve(hub: &Arc<Hub>, stream: Arc<LoggedStream>, start: Start, priming: bool) -> Response<Body> {
    if let Err(limit) = hub.client_in(&stream) {
        return refused(limit);
    }
    if let Some(gap) = start.gap {
        hub.metrics.gap(gap.reason);
    }
    let headers = stream.headers();
    let body =
        client::body(hub.clone(), stream, start, priming).map(|bytes| Ok(Frame::data(bytes)));
    let mut response = Response::new(BodyExt::boxed_unsync(StreamBody::new(body)));
    *response.headers_mut() = headers;
    response
}

/// The upstream's answer as it is, but for the headers of its connection.
fn pass_through(response: HttpResponse) -> Response<Body> {
    let HttpResponse {
        status,
        headers,
        body,
    } = response;
    let body = body.map(|chunk| chunk.map(Frame::data).map_err(io::Error::other));
    relayed(
        status,
        headers,
        BodyExt::boxed_unsync(StreamBody::new(body)),
    )
}

/// An upstream answer's status and headers (but for those of its
/// connection) with `body`.
fn relayed(status: u16, mut headers: HeaderMap, body: Body) -> Response<Body> {
    strip_hop_by_hop(&mut headers);
    let mut out = Response::new(body);
    *out.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    *out.headers_mut() = headers;
    out
}

/// An upstream event stream passed through unchanged but for a keep-alive
/// comment after a line end whenever nothing came for `every` (a comment
/// line inside an event is ignored, so it changes no event; after a bare
/// CR it could end a line early, so none is added there).
fn kept_alive(response: HttpResponse, every: Duration) -> Response<Body> {
    let HttpResponse {
        status,
        headers,
        body,
    } = response;
    struct State {
        body: crate::HttpBody,
        timer: async_io::Timer,
        at_line_start: bool,
    }
    let state = State {
        body,
        timer: async_io::Timer::after(every),
        at_line_start: true,
    };
    let body = futures::stream::unfold(state, move |mut s| async move {
        loop {
            match futures::future::select(s.body.next(), &mut s.timer).await {
                futures::future::Either::Left((chunk, _)) => {
                    let chunk = chunk?.map_err(io::Error::other);
                    if let Ok(bytes) = &chunk
                        && let Some(&last) = bytes.last()
                    {
                        s.at_line_start = last == b'\n';
                    }
                    s.timer.set_after(every);
                    return Some((chunk.map(Frame::data), s));
                }
                futures::future::Either::Right(_) => {
                    s.timer.set_after(every);
                    if s.at_line_start {
                        let mut comment = Vec::new();
                        encode_comment(&mut comment, "keep-alive");
                        return Some((Ok(Frame::data(Bytes::from(comment))), s));
                    }
                }
            }
        }
    });
    relayed(
        status,
        headers,
        BodyExt::boxed_unsync(StreamBody::new(body)),
    )
}

/// The headers every client of a stream gets: the upstream's, but for
/// those of its connection and its body's length, and the proxy's own.
fn stream_headers(upstream: &HeaderMap) -> HeaderMap {
    let mut headers = upstream.clone();
    strip_hop_by_hop(&mut headers);
    headers.remove(hyper::header::CONTENT_LENGTH);
    headers.extend(default_headers());
    headers
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// The request headers to send upstream: all but those of the client's
/// connection, `Host` (the connector sets the upstream's) and
/// `Accept-Encoding` (the proxy reads streams as they are, uncompressed).
fn forwarded(headers: &HeaderMap) -> Vec<(String, String)> {
    let mut headers = headers.clone();
    strip_hop_by_hop(&mut headers);
    headers.remove(hyper::header::HOST);
    headers.remove(hyper::header::ACCEPT_ENCODING);
    headers.remove(hyper::header::CONTENT_LENGTH);
    headers
        .iter()
        .filter_map(|(name, value)| Some((name.to_string(), value.to_str().ok()?.to_owned())))
        .collect()
}

/// Who sent a request: the keyed hash of its `Authorization`, `Cookie`,
/// `Mcp-Session-Id` and `--identity-header`s, and that with its `Origin`.
fn who(hub: &Hub, headers: &HeaderMap) -> Who {
    let value = |name: &HeaderName| {
        let mut joined = Vec::new();
        for (i, value) in headers.get_all(name).iter().enumerate() {
            if i > 0 {
                joined.push(b'\n');
            }
            joined.extend_from_slice(value.as_bytes());
        }
        joined
    };
    let mut parts = vec![
        value(&hyper::header::AUTHORIZATION),
        value(&hyper::header::COOKIE),
        value(&HeaderName::from_static("mcp-session-id")),
    ];
    for name in &hub.config.identity_headers {
        parts.push(value(name));
    }
    let owner = hub.key.identity(parts.iter().map(Vec::as_slice));
    let sharing = if headers.contains_key(hyper::header::ORIGIN) {
        parts.push(value(&hyper::header::ORIGIN));
        hub.key.identity(parts.iter().map(Vec::as_slice))
    } else {
        owner
    };
    Who { owner, sharing }
}

fn is_event_stream(response: &HttpResponse) -> bool {
    response
        .header(CONTENT_TYPE.as_str())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("text/event-stream"))
}

fn refused(limit: Limit) -> Response<Body> {
    let what = match limit {
        Limit::Streams => "too many streams (--max-streams)",
        Limit::Clients => "too many clients (--max-clients)",
        Limit::HeaderBytes => "request head too large (--max-header-bytes)",
        Limit::BodyBytes => "request body too large (--max-body-bytes)",
    };
    let mut response = status(StatusCode::SERVICE_UNAVAILABLE, what);
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

/// A short text answer.
pub(super) fn status(code: StatusCode, message: &str) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(format!("tidemark proxy: {message}\n")))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = code;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn empty(code: StatusCode) -> Response<Body> {
    let mut response = Response::new(Empty::new().map_err(|never| match never {}).boxed_unsync());
    *response.status_mut() = code;
    response
}
