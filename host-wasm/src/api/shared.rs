//! One connection per stream for every tab and worker of an origin (the
//! `shared` option of `ResumableEventSource`).
//!
//! The contexts that open the same stream key (in the same database) ask
//! for one Web Lock named after it; the one that holds it leads: it follows
//! the stream and posts each batch of fresh events to a `BroadcastChannel`
//! of the same name; the others follow: they deliver what it posts to
//! their own listeners. The rules that keep that exactly-once and in order
//! across leader changes are the core's ([`tidemark_core::fanout`]); this
//! module carries their messages:
//!
//! - `{t: "frames", frames}`: a batch of the leader's fresh events, each
//!   `[prev, type, data, id | null, lastEventId]`;
//! - `{t: "ask", from, after}`: a follower asks for what follows its last
//!   id (when it joins, and when its chain breaks);
//! - `{t: "answer", to, after, frames | null, open, detail}`: the leader's
//!   answer from its recent events, whether its connection is open, and the
//!   detail of its `open` (the stream's origin);
//! - `{t: "state", kind, detail}`: the leader's connection opened
//!   (`"open"`) or failed (`"error"`, with the detail of the error event);
//! - `{t: "end", reason: {message, code}}`: the leader's stream stopped for
//!   good (a 404, the reconnect policy gave up): every follower stops with
//!   it;
//! - `{t: "bye"}`: a follower left (the leader recounts its followers).
//!
//! The leader knows its followers from the lock's queue: each follower's
//! request waits there (`navigator.locks.query()`), and a context that
//! dies leaves it, so the count needs no heartbeat.
//!
//! A window context also keeps its own last delivered id in
//! `sessionStorage` when the page is hidden or unloaded, so that a reload
//! asks for what it missed from exactly where it was, rather than from the
//! stored cursor, which the leader writes in the background.

use super::js;
use super::runtime::Runtime;
use super::source::Ending;
use futures::StreamExt;
use futures::channel::{mpsc, oneshot};
use gloo_timers::future::TimeoutFuture;
use js_sys::{Array, Function, Promise, Reflect};
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use tidemark_core::fanout::{Frame, Recent, Sequencer};
use tidemark_core::sse::Event;
use tidemark_core::{Clock, EventTracker, Millis, Store, StreamKey};
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::{JsFuture, spawn_local};
use web_sys::{AbortController, BroadcastChannel, MessageEvent};

#[wasm_bindgen]
extern "C" {
    /// `navigator.locks`.
    type LockManager;
    #[wasm_bindgen(method)]
    fn request(this: &LockManager, name: &str, options: &JsValue, callback: &Function) -> Promise;
    #[wasm_bindgen(method)]
    fn query(this: &LockManager) -> Promise;
}

/// How often a leader counts its followers.
const RECOUNT_MS: u32 = 1000;

thread_local! {
    /// Whether the fallback warning was printed in this context.
    static WARNED: Cell<bool> = const { Cell::new(false) };
}

/// What `stats()` shows of sharing, live.
#[derive(Clone, Debug, Default)]
pub(crate) struct ShareStats {
    /// Sharing is in effect (asked for, and the APIs are there).
    shared: bool,
    leading: Rc<Cell<bool>>,
    followers: Rc<Cell<u32>>,
    /// Why the stream is not shared although it was asked to be.
    warning: Option<String>,
}

impl ShareStats {
    /// Not shared, because of `warning`.
    pub(crate) fn unshared(warning: String) -> Self {
        ShareStats {
            warning: Some(warning),
            ..ShareStats::default()
        }
    }

    /// The `stats()` fields `shared`, `leader`, `followers` (the leader's
    /// count, `null` elsewhere) and `sharingWarning`.
    pub(crate) fn fields(&self, fields: js::Fields) -> js::Fields {
        let leader = self.leading.get();
        let followers = if leader {
            JsValue::from(self.followers.get())
        } else {
            JsValue::NULL
        };
        fields
            .set("shared", self.shared)
            .set("leader", leader)
            .set("followers", followers)
            .set("sharingWarning", js::opt_str(self.warning.as_ref()))
    }
}

/// The name of a stream's lock, channel and `sessionStorage` entry.
fn name_of(database: &str, stream_key: &str) -> String {
    format!("tidemark:{database}:{stream_key}")
}

/// Why sharing is not possible in this context, warned about once.
pub(crate) fn unavailable(why: &str) -> String {
    let warning = format!(
        "tidemark: shared streams need Web Locks and BroadcastChannel ({why}); \
         each context opens its own connection"
    );
    if !WARNED.replace(true) {
        web_sys::console::warn_1(&JsValue::from_str(&warning));
    }
    warning
}

/// What ended a follower's part.
pub(crate) enum Followed {
    /// The lock is this context's: lead, with this tracker.
    Lead(EventTracker),
    /// The stream stopped: `close()` (`None`) or the leader's reason.
    Stop(Option<Ending>),
}

/// The lock request of one context: granted once, held until dropped.
struct LockRequest {
    granted: oneshot::Receiver<()>,
    release: Rc<RefCell<Option<Function>>>,
    given_up: Rc<Cell<bool>>,
    abort: AbortController,
    _callback: Closure<dyn FnMut(JsValue) -> Promise>,
}

impl LockRequest {
    fn new(locks: &LockManager, name: &str) -> Result<LockRequest, String> {
        let (grant, granted) = oneshot::channel();
        let mut grant = Some(grant);
        let release: Rc<RefCell<Option<Function>>> = Rc::default();
        let given_up = Rc::new(Cell::new(false));
        let (held, gone) = (release.clone(), given_up.clone());
        let callback = Closure::<dyn FnMut(JsValue) -> Promise>::new(move |_lock| {
            if gone.get() {
                // Closed while waiting: hand it on at once.
                return Promise::resolve(&JsValue::UNDEFINED);
            }
            if let Some(grant) = grant.take() {
                let _ = grant.send(());
            }
            // Held until the promise resolves: when this context stops.
            Promise::new(&mut |resolve, _reject| *held.borrow_mut() = Some(resolve))
        });
        let abort = AbortController::new().map_err(|e| js::message(&e))?;
        let options = js::Fields::new().set("signal", abort.signal()).build();
        let pending = locks.request(name, &options, callback.as_ref().unchecked_ref());
        // Rejected when aborted (the context stopped while waiting).
        spawn_local(async move {
            let _ = JsFuture::from(pending).await;
        });
        Ok(LockRequest {
            granted,
            release,
            given_up,
            abort,
            _callback: callback,
        })
    }
}

impl Drop for LockRequest {
    fn drop(&mut self) {
        self.given_up.set(true);
        self.abort.abort();
        if let Some(resolve) = self.release.borrow_mut().take() {
            let _ = resolve.call0(&JsValue::UNDEFINED);
        }
    }
}

/// A shared stream's part in this context, across its roles.
pub(crate) struct Shared {
    name: String,
    me: String,
    key: StreamKey,
    channel: BroadcastChannel,
    locks: LockManager,
    inbox: mpsc::UnboundedReceiver<JsValue>,
    _onmessage: Closure<dyn FnMut(MessageEvent)>,
    lock: Option<LockRequest>,
    sequencer: Sequencer,
    recent: Recent,
    /// Frames delivered as leader, not posted yet.
    unsent: Vec<Frame>,
    /// Whether the leader's connection is open.
    open: bool,
    /// The detail of the leader's last `open` (its origin), for late joiners.
    open_detail: JsValue,
    followers: Rc<Cell<u32>>,
    leading: Rc<Cell<bool>>,
    /// When the leader counts its followers again (they may leave without
    /// a word, and a new one's lock request may reach the browser after
    /// its first message).
    recount: Option<TimeoutFuture>,
    /// Keeps the position in `sessionStorage` (windows only).
    keep: Option<Keep>,
    position: Rc<RefCell<Option<String>>>,
}

/// Writes a context's last delivered id to `sessionStorage` on `pagehide`
/// and when the stream closes.
struct Keep {
    target: web_sys::EventTarget,
    save: Closure<dyn Fn()>,
}

impl Shared {
    /// Joins the stream `key` named `stream_key` in `database`, whose
    /// tracker (seeded from the stored cursor) is `tracker`; `Err` with the
    /// warning when this context cannot share.
    pub(crate) fn join(
        database: &str,
        stream_key: &str,
        tracker: &mut EventTracker,
        now: Millis,
    ) -> Result<Shared, String> {
        let global = js_sys::global();
        let locks = js::get(&global, "navigator")
            .and_then(|n| js::get(&n, "locks"))
            .ok_or_else(|| unavailable("no navigator.locks"))?
            .unchecked_into::<LockManager>();
        let name = name_of(database, stream_key);
        // A request given up (dropped) on the way out below is aborted.
        let lock = LockRequest::new(&locks, &name).map_err(|e| unavailable(&e))?;
        let channel = BroadcastChannel::new(&name)
            .map_err(|e| unavailable(&format!("BroadcastChannel: {}", js::message(&e))))?;
        // Nothing below fails: the channel's handler lives as long as
        // `Shared`, which closes the channel first.
        let (inbox_tx, inbox) = mpsc::unbounded();
        let onmessage = Closure::<dyn FnMut(MessageEvent)>::new(move |m: MessageEvent| {
            let _ = inbox_tx.unbounded_send(m.data());
        });
        channel.set_onmessage(Some(onmessage.as_ref().unchecked_ref()));
        // A reloaded page goes on from where it was.
        let position: Rc<RefCell<Option<String>>> = Rc::default();
        let keep = session_storage().map(|storage| {
            if let Ok(Some(id)) = storage.get_item(&name)
                && !id.is_empty()
            {
                // Not the stored cursor: the leader wrote it, maybe ahead.
                tracker.restart_at(&id, now);
            }
            let (key, position) = (name.clone(), position.clone());
            let save = Closure::<dyn Fn()>::new(move || {
                if let Some(id) = &*position.borrow() {
                    let _ = storage.set_item(&key, id);
                }
            });
            let target: web_sys::EventTarget = global.clone().unchecked_into();
            let _ =
                target.add_event_listener_with_callback("pagehide", save.as_ref().unchecked_ref());
            Keep { target, save }
        });
        let me = format!(
            "{:x}",
            (js_sys::Math::random() * 9_007_199_254_740_991.0) as u64
        );
        let sequencer = Sequencer::new(
            tracker.last_event_id(),
            Sequencer::DEFAULT_WAIT,
            Sequencer::DEFAULT_HELD,
        );
        let mut shared = Shared {
            name,
            me,
            key: tracker.key().clone(),
            channel,
            locks,
            inbox,
            _onmessage: onmessage,
            lock: Some(lock),
            sequencer,
            recent: Recent::new(Recent::DEFAULT_FRAMES, Recent::DEFAULT_BYTES),
            unsent: Vec::new(),
            open: false,
            open_detail: JsValue::NULL,
            followers: Rc::default(),
            leading: Rc::default(),
            recount: None,
            keep,
            position,
        };
        shared.ask();
        shared.sequencer.asked(now);
        Ok(shared)
    }

    /// What `stats()` shows.
    pub(crate) fn stats(&self) -> ShareStats {
        ShareStats {
            shared: true,
            leading: self.leading.clone(),
            followers: self.followers.clone(),
            warning: None,
        }
    }

    /// Handles the messages that come while leading; never completes.
    pub(crate) fn serve(&mut self) -> impl Future<Output = ()> + '_ {
        futures::future::poll_fn(move |cx| {
            self.poll_leader(cx);
            Poll::Pending
        })
    }

    fn post(&self, message: &js_sys::Object) {
        // Fails only for a closed channel or a value that cannot be
        // cloned; ours are plain objects of strings.
        let _ = self.channel.post_message(message);
    }

    fn ask(&self) {
        let after = js::opt_str(self.sequencer.last());
        self.post(
            &js::Fields::new()
                .set("t", "ask")
                .set("from", self.me.as_str())
                .set("after", after)
                .build(),
        );
    }

    /// Follows the leader until this context takes the lock (then it has
    /// delivered every frame it received, and its tracker resumes after
    /// the last) or the stream stops. `deliver` hands a fresh event to the
    /// listeners; `on_state` reports the leader's connection.
    pub(crate) async fn follow(
        &mut self,
        mut tracker: EventTracker,
        runtime: &Runtime,
        close: &mut oneshot::Receiver<()>,
        deliver: &mut dyn FnMut(&Event),
        on_state: &dyn Fn(&str, &JsValue),
    ) -> Followed {
        let clock = runtime.clock.clone();
        let Some(mut lock) = self.lock.take() else {
            return Followed::Lead(tracker);
        };
        loop {
            let now = clock.now();
            let timer = self
                .sequencer
                .deadline()
                .map(|at| TimeoutFuture::new(at.saturating_sub(now).0.min(u32::MAX as u64) as u32));
            let woke = Wake {
                inbox: &mut self.inbox,
                granted: &mut lock.granted,
                close: &mut *close,
                timer,
            }
            .await;
            let now = clock.now();
            let mut out = Vec::new();
            match woke {
                Woken::Closed => {
                    self.post(&js::Fields::new().set("t", "bye").build());
                    return Followed::Stop(None);
                }
                Woken::Granted => break,
                Woken::Timer => self.sequencer.expire(&mut tracker, now, &mut out),
                Woken::Message(message) => {
                    if let Some(stop) =
                        self.on_follower_message(&message, &mut tracker, now, &mut out, on_state)
                    {
                        self.deliver(out, deliver);
                        return Followed::Stop(stop);
                    }
                }
            }
            self.deliver(out, deliver);
            if self.sequencer.should_ask(now) {
                self.ask();
            }
            if !matches!(close.try_recv(), Ok(None)) {
                return Followed::Stop(None);
            }
        }
        // Promoted. First what already arrived, as a follower: let the
        // messages queued for this context in, and deliver them.
        TimeoutFuture::new(0).await;
        let now = clock.now();
        let mut asks = Vec::new();
        let mut out = Vec::new();
        while let Ok(message) = self.inbox.try_recv() {
            if js::get_string(&message, "t").ok().flatten().as_deref() == Some("ask") {
                asks.push(message);
            } else if let Some(stop) =
                self.on_follower_message(&message, &mut tracker, now, &mut out, on_state)
            {
                self.deliver(out, deliver);
                return Followed::Stop(stop);
            }
        }
        self.deliver(out, deliver);
        // What still waits is older, or comes again from the connection.
        self.sequencer.discard();
        // The stored cursor's sequence goes on; with nothing of its own, it
        // resumes from there.
        if let Ok(Some(stored)) = runtime.registry.store().load(&self.key).await {
            tracker.continue_after(&stored);
            if self.sequencer.last().is_none() {
                tracker.seed(&stored);
                self.sequencer = Sequencer::new(
                    tracker.last_event_id(),
                    Sequencer::DEFAULT_WAIT,
                    Sequencer::DEFAULT_HELD,
                );
            }
        }
        self.lock = Some(lock);
        self.leading.set(true);
        self.count_followers();
        for ask in asks {
            self.on_leader_message(&ask);
        }
        Followed::Lead(tracker)
    }

    /// Hands frames to the listeners and keeps them for joiners.
    fn deliver(&mut self, frames: Vec<Frame>, deliver: &mut dyn FnMut(&Event)) {
        for frame in frames {
            deliver(&frame.event);
            self.recent.push(frame);
        }
        self.note_position();
    }

    fn note_position(&self) {
        if let Some(last) = self.sequencer.last() {
            let mut position = self.position.borrow_mut();
            match &mut *position {
                Some(p) => last.clone_into(p),
                None => *position = Some(last.to_owned()),
            }
        }
    }

    /// A follower's message; `Some` when the stream stops (the leader's
    /// reason).
    fn on_follower_message(
        &mut self,
        message: &JsValue,
        tracker: &mut EventTracker,
        now: Millis,
        out: &mut Vec<Frame>,
        on_state: &dyn Fn(&str, &JsValue),
    ) -> Option<Option<Ending>> {
        match js::get_string(message, "t").ok().flatten().as_deref() {
            Some("frames") => {
                for frame in js::get(message, "frames")
                    .map(|f| decode(&f))
                    .unwrap_or_default()
                {
                    self.sequencer.offer(frame, tracker, now, out);
                }
            }
            Some("answer")
                if js::get_string(message, "to").ok().flatten() == Some(self.me.clone()) =>
            {
                let after = js::get_string(message, "after").ok().flatten();
                let frames = js::get(message, "frames").map(|f| decode(&f));
                self.sequencer
                    .answer(after.as_deref(), frames, tracker, now, out);
                let open = js::get_bool(message, "open").ok().flatten() == Some(true);
                if open && !self.open {
                    self.open = true;
                    let detail = js::get(message, "detail").unwrap_or(JsValue::NULL);
                    on_state("open", &detail);
                }
            }
            Some("state") => {
                let kind = js::get_string(message, "kind")
                    .ok()
                    .flatten()
                    .unwrap_or_default();
                let detail = js::get(message, "detail").unwrap_or(JsValue::NULL);
                self.open = kind == "open";
                on_state(&kind, &detail);
            }
            Some("end") => {
                return Some(js::get(message, "reason").map(|r| Ending::from_js(&r)));
            }
            _ => {}
        }
        None
    }

    /// A leader's message: answers asks, recounts followers.
    fn on_leader_message(&mut self, message: &JsValue) {
        match js::get_string(message, "t").ok().flatten().as_deref() {
            Some("ask") => {
                let after = js::get_string(message, "after").ok().flatten();
                let frames = self.recent.catch_up(after.as_deref());
                let to = js::get(message, "from").unwrap_or(JsValue::NULL);
                self.post(
                    &js::Fields::new()
                        .set("t", "answer")
                        .set("to", to)
                        .set("after", js::opt_str(after))
                        .set(
                            "frames",
                            frames.map_or(JsValue::NULL, |f| encode(&f).into()),
                        )
                        .set("open", self.open)
                        .set("detail", self.open_detail.clone())
                        .build(),
                );
                self.count_followers();
            }
            Some("bye") => self.count_followers(),
            // Frames of an earlier leader still in flight: the server sends
            // those events again after this context's own last id.
            _ => {}
        }
    }

    /// Handles the messages waiting, as leader, then says whether any
    /// unsent frames must go out (posted now). Call it from the leader's
    /// wait.
    pub(crate) fn poll_leader(&mut self, cx: &mut Context<'_>) {
        if !self.unsent.is_empty() {
            let frames = std::mem::take(&mut self.unsent);
            self.post(
                &js::Fields::new()
                    .set("t", "frames")
                    .set("frames", encode(&frames))
                    .build(),
            );
        }
        while let Poll::Ready(Some(message)) = self.inbox.poll_next_unpin(cx) {
            self.on_leader_message(&message);
        }
        let recount = self
            .recount
            .get_or_insert_with(|| TimeoutFuture::new(RECOUNT_MS));
        if Pin::new(recount).poll(cx).is_ready() {
            self.count_followers();
            let mut next = TimeoutFuture::new(RECOUNT_MS);
            // Registers the wake-up.
            let _ = Pin::new(&mut next).poll(cx);
            self.recount = Some(next);
        }
    }

    /// An event the leader delivered: posted to the followers with the
    /// others of its chunk.
    pub(crate) fn sent(&mut self, event: Event) {
        let frame = self.sequencer.frame(event);
        self.recent.push(frame.clone());
        self.unsent.push(frame);
        self.note_position();
    }

    /// The leader's connection opened or failed.
    pub(crate) fn state(&mut self, kind: &str, detail: &JsValue) {
        self.open = kind == "open";
        if self.open {
            self.open_detail = detail.clone();
        }
        self.post(
            &js::Fields::new()
                .set("t", "state")
                .set("kind", kind)
                .set("detail", detail.clone())
                .build(),
        );
    }

    /// The leader stopped; `reason` is `None` after `close()` (another
    /// context takes over), else every follower stops with it.
    pub(crate) fn stopped(&mut self, reason: Option<&Ending>) {
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        self.poll_leader(&mut cx);
        if let Some(reason) = reason {
            self.post(
                &js::Fields::new()
                    .set("t", "end")
                    .set("reason", reason.to_js())
                    .build(),
            );
        }
    }

    /// Counts the lock's waiting requests: this stream's followers.
    fn count_followers(&self) {
        let query = self.locks.query();
        let (name, followers) = (self.name.clone(), self.followers.clone());
        spawn_local(async move {
            let Ok(snapshot) = JsFuture::from(query).await else {
                return;
            };
            let pending: Array = js::get(&snapshot, "pending")
                .map(|p| p.unchecked_into())
                .unwrap_or_default();
            let n = pending
                .iter()
                .filter(|info| {
                    js::get_string(info, "name").ok().flatten().as_deref() == Some(&name)
                })
                .count();
            followers.set(n as u32);
        });
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(Keep { target, save }) = &self.keep {
            let save: &Function = save.as_ref().unchecked_ref();
            let _ = save.call0(&JsValue::NULL);
            let _ = target.remove_event_listener_with_callback("pagehide", save);
        }
        self.channel.set_onmessage(None);
        self.channel.close();
        // The lock goes with `lock`'s drop, after the last post.
    }
}

/// `sessionStorage`, in a window that has one.
fn session_storage() -> Option<web_sys::Storage> {
    // Reading it throws in some sandboxed frames.
    let storage = Reflect::get(&js_sys::global(), &JsValue::from_str("sessionStorage")).ok()?;
    storage.dyn_into().ok()
}

/// Frames as posted: `[prev, type, data, id | null, lastEventId]` each.
fn encode(frames: &[Frame]) -> Array {
    frames
        .iter()
        .map(|f| {
            let e = &f.event;
            Array::of5(
                &JsValue::from_str(&f.prev),
                &JsValue::from_str(&e.event),
                &JsValue::from_str(&e.data),
                &js::opt_str(e.id.as_ref()),
                &JsValue::from_str(&e.last_event_id),
            )
        })
        .collect::<Array>()
}

/// Frames as posted; malformed entries (another version's) are skipped.
fn decode(value: &JsValue) -> Vec<Frame> {
    let Some(frames) = value.dyn_ref::<Array>() else {
        return Vec::new();
    };
    frames
        .iter()
        .filter_map(|f| {
            let f: Array = f.dyn_into().ok()?;
            Some(Frame {
                prev: f.get(0).as_string()?,
                event: Event {
                    event: f.get(1).as_string()?,
                    data: f.get(2).as_string()?,
                    id: f.get(3).as_string(),
                    last_event_id: f.get(4).as_string()?,
                },
            })
        })
        .collect()
}

/// What woke a follower.
enum Woken {
    Message(JsValue),
    Granted,
    Closed,
    Timer,
}

/// A follower's wait: a message, the lock, `close()`, or its sequencer's
/// deadline.
struct Wake<'a> {
    inbox: &'a mut mpsc::UnboundedReceiver<JsValue>,
    granted: &'a mut oneshot::Receiver<()>,
    close: &'a mut oneshot::Receiver<()>,
    timer: Option<TimeoutFuture>,
}

impl Future for Wake<'_> {
    type Output = Woken;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Woken> {
        let this = self.get_mut();
        if Pin::new(&mut *this.close).poll(cx).is_ready() {
            return Poll::Ready(Woken::Closed);
        }
        if let Poll::Ready(Some(message)) = this.inbox.poll_next_unpin(cx) {
            return Poll::Ready(Woken::Message(message));
        }
        if let Poll::Ready(Ok(())) = Pin::new(&mut *this.granted).poll(cx) {
            return Poll::Ready(Woken::Granted);
        }
        if let Some(timer) = &mut this.timer
            && Pin::new(timer).poll(cx).is_ready()
        {
            return Poll::Ready(Woken::Timer);
        }
        Poll::Pending
    }
}
