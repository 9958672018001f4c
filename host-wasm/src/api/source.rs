//! The engine behind `ResumableEventSource` (see `js/index.js`).

use super::js;
use super::post::{self, PostState};
use super::runtime::{Runtime, StoreSpec, runtime};
use super::shared::{Followed, ShareStats, Shared};
use super::tracker::{flush, stream_key_of};
use crate::{CredentialsMode, FetchConnector};
use futures::channel::oneshot;
use futures::future::{Either, select};
use std::cell::RefCell;
use std::pin::pin;
use std::rc::Rc;
use tidemark_core::sse::Event;
use tidemark_core::{
    Backoff, Clock, Failure, Millis, ReconnectConfig, RegistryError, ResumableStream, StreamConfig,
    StreamError, StreamItem, StreamStats,
};
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::spawn_local;
use web_sys::RequestCredentials;

/// Settings read from the constructor's options.
struct Settings {
    spec: StoreSpec,
    stream_key: String,
    config: StreamConfig,
    credentials: RequestCredentials,
    /// One connection for every context of the origin (`shared: true`).
    shared: bool,
    /// The page's own `fetch` (option `fetch`).
    fetch: Option<js_sys::Function>,
    /// The query parameter for the cursor (option `lastEventIdParam`).
    last_event_id_param: Option<String>,
}

impl Settings {
    fn from_options(url: &str, options: &JsValue) -> Result<Settings, JsError> {
        let spec = StoreSpec::from_options(options)?;
        let stream_key = js::get_string(options, "streamKey")?.unwrap_or_else(|| url.to_owned());
        let headers = match js::get(options, "headers") {
            Some(h) => js::headers(&h)?,
            None => Vec::new(),
        };
        let credentials = match (
            js::get_string(options, "credentials")?,
            js::get_bool(options, "withCredentials")?,
        ) {
            (Some(mode), _) => mode.as_str().to_mode().map_err(|_| {
                JsError::new(&format!(
                    "option `credentials` must be \"omit\", \"same-origin\" or \"include\", not {mode:?}"
                ))
            })?,
            (None, Some(true)) => RequestCredentials::Include,
            (None, _) => RequestCredentials::SameOrigin,
        };
        let mut reconnect = ReconnectConfig::default();
        if let Some(r) = js::get(options, "reconnect") {
            let default = reconnect.backoff;
            reconnect.backoff = Backoff {
                initial: js::get_u64(&r, "initialDelay")?.map_or(default.initial, Millis),
                max: js::get_u64(&r, "maxDelay")?.map_or(default.max, Millis),
            };
            if js::is_null(&r, "maxAttempts") {
                reconnect.max_attempts = None;
            } else if let Some(n) = js::get_u64(&r, "maxAttempts")? {
                reconnect.max_attempts = Some(u32::try_from(n).unwrap_or(u32::MAX));
            }
            if let Some(idle) = js::get_u64(&r, "idleTimeout")? {
                reconnect.idle_timeout = Millis(idle);
            }
        }
        let fetch = match js::get(options, "fetch") {
            Some(f) => Some(f.dyn_into::<js_sys::Function>().map_err(|_| {
                JsError::new("option `fetch` must be a function, called like fetch(url, init)")
            })?),
            None => None,
        };
        let last_event_id_param = match js::get(options, "lastEventIdParam") {
            Some(v) if v.as_bool() == Some(true) => Some("lastEventID".to_owned()),
            Some(v) if v.as_bool() == Some(false) => None,
            Some(v) => match v.as_string() {
                Some(name) if !name.is_empty() => Some(name),
                _ => {
                    return Err(JsError::new(
                        "option `lastEventIdParam` must be a query parameter name, or true                          for \"lastEventID\"",
                    ));
                }
            },
            None => None,
        };
        let body = post::body_of(options)?;
        let shared = js::get_bool(options, "shared")?.unwrap_or(false);
        if shared && body.is_some() {
            // Another context taking it over could only POST again, or
            // guess whether the first POST was answered.
            return Err(JsError::new(
                "option `shared` is for GET streams: a POST stream belongs to the context \
                 that sent it (a reload of that page resumes it)",
            ));
        }
        Ok(Settings {
            spec,
            stream_key,
            config: StreamConfig {
                headers,
                reconnect,
                body,
                ..StreamConfig::default()
            },
            credentials,
            shared,
            fetch,
            last_event_id_param,
        })
    }
}

/// Why a stream stopped for good: the `error` event's `message`, and its
/// `code` (the HTTP status, when the server answered with one).
pub(crate) struct Ending {
    pub(crate) message: String,
    pub(crate) code: Option<u16>,
}

impl Ending {
    fn of(error: &StreamError) -> Self {
        Ending {
            message: error.to_string(),
            code: error.failure().and_then(Failure::status),
        }
    }

    fn message(message: String) -> Self {
        Ending {
            message,
            code: None,
        }
    }

    /// `{ message, code }` (`code` `null` without a status).
    pub(crate) fn to_js(&self) -> JsValue {
        js::Fields::new()
            .set("message", self.message.as_str())
            .set("code", self.code.map_or(JsValue::NULL, JsValue::from))
            .build()
            .into()
    }

    /// The other way round (a leader's `end` message).
    pub(crate) fn from_js(value: &JsValue) -> Self {
        Ending {
            message: js::get_string(value, "message")
                .ok()
                .flatten()
                .unwrap_or_default(),
            code: js::get_u64(value, "code")
                .ok()
                .flatten()
                .and_then(|c| u16::try_from(c).ok()),
        }
    }
}

/// What the driver shares with its task.
#[derive(Default)]
struct State {
    /// The stream's counters and cursor as of its latest item.
    stats: StreamStats,
    last_event_id: Option<String>,
    runtime: Option<Rc<Runtime>>,
    close: Option<oneshot::Sender<()>>,
    /// Sharing.
    share: ShareStats,
    /// See [`PostState`].
    post: PostState,
}

/// Drives one resumable stream and reports its items to JavaScript
/// callbacks: `onEvent(type, data, lastEventId)` for each fresh event (the
/// cursor moves as soon as it returns), `onState(kind, detail)` with
/// `"open"` (a connection is up; `detail` is `null`), `"error"` (a
/// connection failed or could not be made; `detail` is `{ message,
/// retryDelay, attempt }`: why, the milliseconds until the next attempt, and
/// which attempt in a row that is), and `"closed"` (final; `detail` says why,
/// `null` after `close()`). A permanent failure is only `"closed"`.
#[wasm_bindgen]
pub struct EventSourceDriver {
    state: Rc<RefCell<State>>,
    closed: RefCell<Option<oneshot::Receiver<()>>>,
}

#[wasm_bindgen]
impl EventSourceDriver {
    /// Starts following `url`; see `ResumableEventSourceOptions` for
    /// `options`.
    pub fn start(
        url: String,
        options: JsValue,
        on_event: js_sys::Function,
        on_state: js_sys::Function,
    ) -> Result<EventSourceDriver, JsError> {
        let settings = Settings::from_options(&url, &options)?;
        let (close_tx, close_rx) = oneshot::channel();
        let (done_tx, done_rx) = oneshot::channel();
        let state = Rc::new(RefCell::new(State {
            close: Some(close_tx),
            post: PostState::new(settings.config.body.is_some()),
            ..State::default()
        }));
        let task_state = state.clone();
        spawn_local(async move {
            let reason = drive(url, settings, task_state, close_rx, on_event, &on_state).await;
            let detail = reason.map_or(JsValue::NULL, |r| r.to_js());
            let _ = on_state.call2(&JsValue::NULL, &"closed".into(), &detail);
            let _ = done_tx.send(());
        });
        Ok(EventSourceDriver {
            state,
            closed: RefCell::new(Some(done_rx)),
        })
    }

    /// Stops the stream at once (no event is delivered after this call, even
    /// one already received); the promise resolves once its cursor is
    /// written, or the write failed and waits for a retry.
    pub fn close(&self) -> js_sys::Promise {
        let close = self.state.borrow_mut().close.take();
        if let Some(close) = close {
            let _ = close.send(());
        }
        let done = self.closed.borrow_mut().take();
        wasm_bindgen_futures::future_to_promise(async move {
            if let Some(done) = done {
                let _ = done.await;
            }
            Ok(JsValue::UNDEFINED)
        })
    }

    /// The id a reconnect would send as `Last-Event-ID`.
    #[wasm_bindgen(getter, js_name = lastEventId)]
    pub fn last_event_id(&self) -> Option<String> {
        self.state.borrow().last_event_id.clone()
    }

    /// Counters of the stream, its store and the shared worker.
    pub fn stats(&self) -> js_sys::Object {
        let state = self.state.borrow();
        let s = &state.stats;
        let fields = js::Fields::new()
            .set("connects", s.connects as f64)
            .set("reconnects", s.reconnects as f64)
            .set("delivered", s.delivered as f64)
            .set("duplicates", s.duplicates as f64)
            .set("comments", s.comments as f64)
            .set("bytes", s.bytes as f64)
            .set(
                "lastFailure",
                js::opt_str(s.last_failure.as_ref().map(ToString::to_string)),
            )
            .set("lastEventId", js::opt_str(state.last_event_id.as_ref()));
        let fields = state.share.fields(state.post.stats(fields));
        match &state.runtime {
            Some(runtime) => fields.extend(&runtime.stats()).build(),
            None => fields.build(),
        }
    }
}

/// The stream's task. Returns why it stopped (`None` after `close()`).
async fn drive(
    url: String,
    settings: Settings,
    state: Rc<RefCell<State>>,
    mut close: oneshot::Receiver<()>,
    on_event: js_sys::Function,
    on_state: &js_sys::Function,
) -> Option<Ending> {
    let runtime = match runtime(settings.spec.clone()).await {
        Ok(r) => r,
        Err(e) => return Some(Ending::message(js::message(&e.into()))),
    };
    let key = stream_key_of(&settings.stream_key);
    let resume_url = match settings.config.body {
        Some(_) => match post::prepare(&runtime, &key).await {
            Ok(url) => url,
            Err(e) => return Some(Ending::message(e)),
        },
        None => None,
    };
    let mut tracker = match runtime.registry.open(key.clone()).await {
        Ok(t) => t,
        Err(RegistryError::AlreadyOpen(_)) => {
            return Some(Ending::message(format!(
                "streamKey {:?} is already in use by another ResumableEventSource or tracker \
                 of this page; give each stream its own streamKey",
                settings.stream_key
            )));
        }
        Err(e) => return Some(Ending::message(e.to_string())),
    };
    let clock = runtime.clock.clone();
    state.borrow_mut().runtime = Some(runtime.clone());
    let mut shared = None;
    if settings.shared {
        let now = clock.now();
        match Shared::join(
            &settings.spec.database,
            &settings.stream_key,
            &mut tracker,
            now,
        ) {
            Ok(joined) => shared = Some(joined),
            Err(warning) => state.borrow_mut().share = ShareStats::unshared(warning),
        }
    }
    if let Some(shared) = &mut shared {
        state.borrow_mut().share = shared.stats();
        let mut deliver = |event: &Event| {
            {
                let mut state = state.borrow_mut();
                state.stats.delivered += 1;
                state.last_event_id = Some(event.last_event_id.clone());
            }
            dispatch(&on_event, event);
        };
        let report = |kind: &str, detail: &JsValue| {
            let _ = on_state.call2(&JsValue::NULL, &kind.into(), detail);
        };
        match shared
            .follow(tracker, &runtime, &mut close, &mut deliver, &report)
            .await
        {
            Followed::Lead(ours) => tracker = ours,
            Followed::Stop(reason) => return reason,
        }
    }
    let mut connector = FetchConnector::new().credentials(settings.credentials);
    if let Some(fetch) = settings.fetch {
        connector = connector.fetch(fetch);
    }
    if let Some(param) = settings.last_event_id_param {
        connector = connector.last_event_id_param(param);
    }
    let origin_of = connector.clone();
    let mut stream = ResumableStream::new(connector, clock.clone(), url, tracker, settings.config);
    if let Some(resume_url) = resume_url {
        stream = stream.with_resume_url(resume_url);
    }
    let sync = |stream: &ResumableStream<_, _>| {
        let mut state = state.borrow_mut();
        state.stats.clone_from(stream.stats());
        match (&mut state.last_event_id, stream.last_event_id()) {
            (Some(ours), Some(id)) => id.clone_into(ours),
            (ours, id) => *ours = id.map(str::to_owned),
        }
        state.post.sync(stream);
    };
    sync(&stream);
    // close() may come from a listener, between two events of one chunk.
    let closed = |close: &mut oneshot::Receiver<()>| !matches!(close.try_recv(), Ok(None));
    let reason = loop {
        if closed(&mut close) {
            break None;
        }
        let next = {
            let next = pin!(stream.next());
            // While waiting, a leader answers the other contexts.
            let closing = async {
                match &mut shared {
                    Some(shared) => {
                        let _ = select(&mut close, pin!(shared.serve())).await;
                    }
                    None => {
                        let _ = (&mut close).await;
                    }
                }
            };
            match select(next, pin!(closing)).await {
                Either::Left((next, _)) => next,
                Either::Right(_) => break None,
            }
        };
        let item = match next {
            Ok(_) if closed(&mut close) => break None,
            Ok(item) => item,
            Err(StreamError::Closed) => break None,
            Err(StreamError::Done) => {
                sync(&stream);
                let _ = on_state.call2(&JsValue::NULL, &"done".into(), &JsValue::NULL);
                break None;
            }
            Err(error) => break Some(Ending::of(&error)),
        };
        // Listeners read the counters of the item they hear about.
        sync(&stream);
        match item {
            StreamItem::Event(event) => {
                dispatch(&on_event, &event);
                // Listeners ran synchronously: the event is delivered.
                stream.commit();
                if let Some(shared) = &mut shared {
                    shared.sent(event);
                }
            }
            StreamItem::Open { .. } => {
                // Messages come from the origin of the final URL, after
                // redirects.
                let origin = origin_of
                    .final_url()
                    .and_then(|url| web_sys::Url::new(&url).ok())
                    .map(|url| url.origin());
                let detail: JsValue = js::Fields::new()
                    .set("origin", js::opt_str(origin))
                    .build()
                    .into();
                let _ = on_state.call2(&JsValue::NULL, &"open".into(), &detail);
                if let Some(shared) = &mut shared {
                    shared.state("open", &detail);
                }
            }
            StreamItem::Reconnecting {
                failure,
                retry_at,
                attempt,
            } => {
                let detail = js::Fields::new()
                    .set("message", failure.to_string())
                    .set(
                        "code",
                        failure.status().map_or(JsValue::NULL, JsValue::from),
                    )
                    .set("retryDelay", retry_at.saturating_sub(clock.now()).0 as f64)
                    .set("attempt", attempt)
                    .build();
                let _ = on_state.call2(&JsValue::NULL, &"error".into(), &detail);
                if let Some(shared) = &mut shared {
                    shared.state("error", &detail);
                }
            }
            // Stored before the answer's first event is delivered.
            StreamItem::Resumable { url } => post::persist(&runtime, &key, &url).await,
            // An item of a newer core: nothing to report.
            _ => {}
        }
    };
    if let Some(shared) = &mut shared {
        shared.stopped(reason.as_ref());
    }
    stream.commit();
    sync(&stream);
    drop(stream);
    let _ = flush(&runtime).await;
    // Only now may another context lead: it continues this one's cursor.
    drop(shared);
    reason
}

/// Hands a fresh event to the page's listeners (`onEvent`).
fn dispatch(on_event: &js_sys::Function, event: &Event) {
    let kind = JsValue::from_str(&event.event);
    let id = JsValue::from_str(&event.last_event_id);
    let _ = on_event.call3(&JsValue::NULL, &kind, &JsValue::from_str(&event.data), &id);
}
