//! The core's [`Connector`] on the browser's `fetch`: [`FetchConnector`].

use futures::Stream;
use futures::future::{Either, select};
use gloo_timers::future::TimeoutFuture;
use js_sys::{Function, Promise, Reflect, Uint8Array};
use std::cell::RefCell;
use std::fmt;
use std::future::Future;
use std::pin::{Pin, pin};
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;
use tidemark_core::reconnect::{check_response, parse_retry_after};
use tidemark_core::{ConnectRequest, Connector, Failure};
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::{
    AbortController, Headers, ReadableStreamDefaultReader, RequestCache, RequestCredentials,
    RequestInit, RequestMode, RequestRedirect, Response,
};

/// A credentials mode for [`FetchConnector::credentials`]: a
/// [`RequestCredentials`], or its name as `fetch` spells it (`"omit"`,
/// `"same-origin"`, `"include"`).
pub trait CredentialsMode {
    /// The mode, or the unknown name.
    fn to_mode(&self) -> Result<RequestCredentials, String>;
}

impl CredentialsMode for RequestCredentials {
    fn to_mode(&self) -> Result<RequestCredentials, String> {
        Ok(*self)
    }
}

impl CredentialsMode for str {
    fn to_mode(&self) -> Result<RequestCredentials, String> {
        match self {
            "omit" => Ok(RequestCredentials::Omit),
            "same-origin" => Ok(RequestCredentials::SameOrigin),
            "include" => Ok(RequestCredentials::Include),
            other => Err(other.to_owned()),
        }
    }
}

impl CredentialsMode for String {
    fn to_mode(&self) -> Result<RequestCredentials, String> {
        self.as_str().to_mode()
    }
}

impl<T: CredentialsMode + ?Sized> CredentialsMode for &T {
    fn to_mode(&self) -> Result<RequestCredentials, String> {
        (**self).to_mode()
    }
}

/// Opens SSE connections with `fetch`.
///
/// Each attempt is one `fetch` with its own `AbortController`: `GET` with
/// `Accept: text/event-stream`, `Last-Event-ID` when resuming (or the query
/// parameter of [`FetchConnector::last_event_id_param`]), the stream's extra
/// headers, `cache: "no-store"` and the configured credentials mode; no
/// other header. It resolves when the response headers are
/// in; the body is read with `response.body.getReader()`. Dropping the body,
/// or the `connect` future before it resolves, aborts the request, so a
/// connection the core gives up on never lingers (browsers allow only six
/// HTTP/1.1 connections per server).
///
/// # POST streams
///
/// A request with a body ([`ConnectRequest::body`]) is a `POST` of those
/// bytes (no `Content-Type` is added: pass it among the headers). The
/// answer's `Content-Location`, resolved against the response's URL, is
/// [`FetchBody::content_location`], which the core resumes from (what
/// `tidemark proxy` answers a POST stream with). The connect timeout does
/// not apply to a POST (see [`FetchConnector::connect_timeout`]).
/// Cross-origin, a script
/// reads `Content-Location` only if the server lists it in
/// `Access-Control-Expose-Headers`; without that the stream cannot be
/// resumed.
///
/// # Globals, workers, hidden tabs
///
/// `fetch` and `AbortController` come from `globalThis`, never from `window`
/// or `document`: the connector works in windows and in Web Workers alike.
/// Nothing depends on page visibility: unlike `fetch-event-source`, which
/// closes its stream while the tab is hidden by default, the stream stays
/// open in a hidden tab (the browser may throttle its timers, which only
/// delays reconnects).
///
/// # Cross-origin servers
///
/// A first connect sends only CORS-safelisted headers (`Accept`), so it
/// needs no preflight: a server that answers with
/// `Access-Control-Allow-Origin`, all an `EventSource` needs, is enough.
/// `Last-Event-ID` is not safelisted: a cross-origin resume that sends it is
/// preceded by a preflight, which the server must allow
/// (`Access-Control-Allow-Headers: Last-Event-ID`), as must every extra
/// header. For a server that does not, [`FetchConnector::last_event_id_param`]
/// carries the cursor in the URL instead. A request the browser refuses
/// for CORS fails like a network error ([`Failure::Network`]): browsers do
/// not tell scripts why. `Retry-After` is readable on a cross-origin
/// response only if the server lists it in `Access-Control-Expose-Headers`.
/// Headers the browser forbids scripts to set (`Cookie`, `Host`, ...) are
/// silently left out by the browser.
///
/// # Failures
///
/// A response other than a 200 `text/event-stream` becomes a [`Failure`]
/// with the status and its `Retry-After` (delta-seconds, or an HTTP date read
/// with `Date.parse` against `Date.now()`; checked by the core's
/// [`check_response`], like the native connector). A rejected `fetch`
/// (network error, refused connection, CORS) is a [`Failure::Network`]; a
/// request the browser cannot even build (malformed URL, invalid header
/// name or value, a scheme other than http and https, an unknown
/// credentials mode) is a permanent [`Failure::Request`].
///
/// # The connection's lifecycle
///
/// The connector reports nothing by itself: a [`ResumableStream`] over it
/// yields every change as a [`StreamItem`] (`Open`, `Reconnecting`), and the
/// JavaScript API's `open` and `error` events come from those.
///
/// [`ResumableStream`]: tidemark_core::ResumableStream
/// [`StreamItem`]: tidemark_core::StreamItem
#[derive(Clone, Debug)]
pub struct FetchConnector {
    credentials: Result<RequestCredentials, String>,
    connect_timeout: Duration,
    /// The page's own `fetch` function, if it gave one.
    fetch: Option<Function>,
    /// The query parameter that carries the cursor instead of the
    /// `Last-Event-ID` header, if any.
    last_event_id_param: Option<String>,
    /// The URL of the latest response, after redirects (shared by clones).
    final_url: Rc<RefCell<Option<String>>>,
}

impl Default for FetchConnector {
    fn default() -> Self {
        Self::new()
    }
}

impl FetchConnector {
    /// A connector with credentials mode `same-origin` (what `EventSource`
    /// uses without `withCredentials`) and a 10 s connect timeout.
    pub fn new() -> Self {
        FetchConnector {
            credentials: Ok(RequestCredentials::SameOrigin),
            connect_timeout: Duration::from_secs(10),
            fetch: None,
            last_event_id_param: None,
            final_url: Rc::default(),
        }
    }

    /// Sends every request through `fetch` instead of the global one,
    /// called as `fetch(url, init)` like the global: `url` a string, `init`
    /// a plain object with `method`, `headers` (a plain object of names and
    /// values), `body` (POST only), `cache`, `credentials`, `mode`,
    /// `redirect` and `signal`. It must resolve to a `Response` with a
    /// streaming body; anything else is a permanent [`Failure::Request`],
    /// and a rejection a [`Failure::Network`].
    pub fn fetch(mut self, fetch: Function) -> Self {
        self.fetch = Some(fetch);
        self
    }

    /// Sends the cursor of a resumed GET as the query parameter `name`
    /// (set on the URL, replacing one of that name) instead of the
    /// `Last-Event-ID` header, which is not CORS-safelisted: for servers
    /// that take the cursor there (Mercure's hub reads `lastEventID`) and do
    /// not allow the header in a preflight.
    pub fn last_event_id_param(mut self, name: impl Into<String>) -> Self {
        self.last_event_id_param = Some(name.into());
        self
    }

    /// The URL of the latest response this connector (or a clone of it)
    /// received, after redirects: where the stream really comes from.
    pub fn final_url(&self) -> Option<String> {
        self.final_url.borrow().clone()
    }

    /// Sets the credentials mode: `omit`, `same-origin` or `include` (what
    /// `EventSource` uses with `withCredentials: true`), as a
    /// [`RequestCredentials`] or by name. An unknown name makes every
    /// `connect` fail with a permanent [`Failure::Request`].
    pub fn credentials(mut self, mode: impl CredentialsMode) -> Self {
        self.credentials = mode.to_mode();
        self
    }

    /// Sets how long `connect` waits for the response headers before it
    /// aborts the request and fails with [`Failure::Network`] (default
    /// 10 s). Not for a POST: it waits for its answer as long as that takes
    /// (a service may think before it answers, and a POST given up on is
    /// never sent again).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Builds and sends the request; resolves with the checked response.
    async fn open(&self, request: ConnectRequest<'_>) -> Result<FetchBody, Failure> {
        let credentials = self.credentials.clone().map_err(|name| {
            Failure::Request(format!(
                "credentials mode {name:?}: expected \"omit\", \"same-origin\" or \"include\""
            ))
        })?;
        let global = js_sys::global();
        let fetch: Function = match &self.fetch {
            Some(fetch) => fetch.clone(),
            None => Reflect::get(&global, &JsValue::from_str("fetch"))
                .ok()
                .and_then(|f| f.dyn_into().ok())
                .ok_or_else(|| Failure::Request("no fetch in this global scope".into()))?,
        };
        let url = web_sys::Url::new(request.url)
            .map_err(|e| Failure::Request(format!("{}: {}", request.url, describe(&e))))?;
        if !matches!(url.protocol().as_str(), "http:" | "https:") {
            return Err(Failure::Request(format!(
                "{}: only http:// and https:// URLs are supported",
                request.url
            )));
        }
        // Only headers the user asked for, and `Accept`, which is
        // CORS-safelisted: a first connect needs no preflight (`cache:
        // "no-store"` does what `Cache-Control: no-cache` would).
        let mut fields: Vec<(&str, &str)> = vec![("Accept", "text/event-stream")];
        match (request.last_event_id, &self.last_event_id_param) {
            (Some(id), Some(param)) => url.search_params().set(param, id),
            (Some(id), None) => fields.push(("Last-Event-ID", id)),
            (None, _) => {}
        }
        fields.extend(
            request
                .headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str())),
        );
        // Checked as `Headers` would (an invalid one is permanent), handed
        // over as a plain object, which a page's own `fetch` can spread.
        let check = Headers::new().map_err(|e| Failure::Request(describe(&e)))?;
        let headers = js_sys::Object::new();
        for (name, value) in fields {
            check
                .append(name, value)
                .map_err(|e| Failure::Request(format!("header {name:?}: {}", describe(&e))))?;
            let _ = Reflect::set(&headers, &name.into(), &value.into());
        }

        let controller = AbortController::new().map_err(|e| Failure::Request(describe(&e)))?;
        // Aborts the request on every way out but success, including the
        // caller dropping this future.
        let mut guard = AbortOnDrop(Some(controller.clone()));
        let init = RequestInit::new();
        match request.body {
            Some(body) => {
                init.set_method("POST");
                init.set_body(&Uint8Array::from(body).into());
            }
            None => init.set_method("GET"),
        }
        init.set_headers(&headers);
        init.set_cache(RequestCache::NoStore);
        init.set_credentials(credentials);
        init.set_mode(RequestMode::Cors);
        init.set_redirect(RequestRedirect::Follow);
        init.set_signal(Some(&controller.signal()));

        let promise: Promise = fetch
            .call2(&global, &url.href().into(), &init)
            .map_err(|e| Failure::Request(describe(&e)))?
            .dyn_into()
            .map_err(|_| Failure::Request("fetch did not return a promise".into()))?;
        let timeout_ms = self.connect_timeout.as_millis().min(i32::MAX as u128) as u32;
        let response = if request.body.is_some() {
            JsFuture::from(promise).await
        } else {
            let response = pin!(JsFuture::from(promise));
            match select(response, TimeoutFuture::new(timeout_ms)).await {
                Either::Left((response, _)) => response,
                Either::Right(((), _)) => {
                    return Err(Failure::Network(format!(
                        "no response within {:?}",
                        self.connect_timeout
                    )));
                }
            }
        };
        let response: Response = response
            .map_err(|e| Failure::Network(describe(&e)))?
            .dyn_into()
            .map_err(|other| {
                Failure::Request(format!(
                    "fetch resolved with {}, not a Response",
                    describe(&other)
                ))
            })?;
        // A synthetic Response has no URL: it comes from where it was asked.
        let final_url = Some(response.url())
            .filter(|url| !url.is_empty())
            .unwrap_or_else(|| url.href());

        let response_headers = response.headers();
        let header = |name: &str| response_headers.get(name).ok().flatten();
        check_response(
            response.status(),
            header("retry-after").and_then(|value| {
                let now = tidemark_core::Millis(js_sys::Date::now() as u64);
                parse_retry_after(&value, now, |date| {
                    // NaN for what is not a date (and none before 1970).
                    let at = js_sys::Date::parse(date);
                    (at >= 0.0).then_some(tidemark_core::Millis(at as u64))
                })
            }),
            header("content-type").as_deref(),
        )?;
        let content_location = header("content-location")
            .and_then(|location| web_sys::Url::new_with_base(&location, &final_url).ok())
            .map(|url| url.href());
        let body = response.body().ok_or_else(|| {
            Failure::Request("the response has no streaming body (a null `body`)".into())
        })?;
        let reader: ReadableStreamDefaultReader = body
            .get_reader()
            .dyn_into()
            .map_err(|_| Failure::Request("the response body has no default reader".into()))?;
        guard.0 = None;
        *self.final_url.borrow_mut() = Some(final_url);
        Ok(FetchBody {
            reader,
            controller,
            pending: None,
            ended: false,
            content_location,
        })
    }
}

impl Connector for FetchConnector {
    type Chunk = Vec<u8>;
    type Body = FetchBody;

    async fn connect(&self, request: ConnectRequest<'_>) -> Result<FetchBody, Failure> {
        self.open(request).await
    }

    fn content_location(&self, body: &FetchBody) -> Option<String> {
        body.content_location().map(str::to_owned)
    }
}

/// Aborts the controller it holds when dropped.
struct AbortOnDrop(Option<AbortController>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(controller) = &self.0 {
            controller.abort();
        }
    }
}

/// The body of a `fetch` response, read chunk by chunk from its reader.
///
/// Ends (`None`) when the server closes the stream; a failed read is a
/// [`Failure::Network`], after which the body ends. Dropping it cancels the
/// reader and aborts the request.
pub struct FetchBody {
    reader: ReadableStreamDefaultReader,
    controller: AbortController,
    /// The `read()` in flight.
    pending: Option<JsFuture>,
    /// The stream ended or failed.
    ended: bool,
    /// The response's `Content-Location`, absolute.
    content_location: Option<String>,
}

impl FetchBody {
    /// The response's `Content-Location` header resolved against the
    /// response's URL (after redirects), if it has one that is a URL.
    pub fn content_location(&self) -> Option<&str> {
        self.content_location.as_deref()
    }
}

impl fmt::Debug for FetchBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FetchBody")
            .field("reading", &self.pending.is_some())
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl Stream for FetchBody {
    type Item = Result<Vec<u8>, Failure>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        let read = this
            .pending
            .get_or_insert_with(|| JsFuture::from(this.reader.read()));
        let Poll::Ready(result) = Pin::new(read).poll(cx) else {
            return Poll::Pending;
        };
        this.pending = None;
        let chunk = result.map_err(|e| describe(&e)).and_then(|result| {
            let field = |name: &str| Reflect::get(&result, &JsValue::from_str(name));
            if field("done").map_err(|e| describe(&e))?.is_truthy() {
                return Ok(None);
            }
            let value = field("value").map_err(|e| describe(&e))?;
            let bytes = value
                .dyn_ref::<Uint8Array>()
                .ok_or("the body yielded something other than bytes")?;
            Ok(Some(bytes.to_vec()))
        });
        match chunk {
            Ok(Some(bytes)) => Poll::Ready(Some(Ok(bytes))),
            Ok(None) => {
                this.ended = true;
                Poll::Ready(None)
            }
            Err(message) => {
                this.ended = true;
                Poll::Ready(Some(Err(Failure::Network(message))))
            }
        }
    }
}

impl Drop for FetchBody {
    fn drop(&mut self) {
        // `cancel()` settles later; a JsFuture handles a rejection even when
        // dropped at once. Aborting also errors a pending `read()`, which
        // its (dropped) JsFuture absorbs too.
        drop(JsFuture::from(self.reader.cancel()));
        self.controller.abort();
    }
}

/// A readable description of a thrown JavaScript value.
fn describe(error: &JsValue) -> String {
    if let Some(error) = error.dyn_ref::<js_sys::Error>() {
        let name = String::from(error.name());
        let message = String::from(error.message());
        return if message.is_empty() {
            name
        } else {
            format!("{name}: {message}")
        };
    }
    error.as_string().unwrap_or_else(|| format!("{error:?}"))
}
