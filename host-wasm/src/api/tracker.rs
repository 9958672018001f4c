//! The low-level tracker, for apps that bring their own transport.

use super::js;
use super::runtime::{Runtime, StoreSpec, runtime, task_now};
use std::rc::Rc;
use tidemark_core::{EventTracker, RegistryError, StreamKey};
use wasm_bindgen::prelude::*;

/// Opens the tracker of a stream: its cursor loaded from the store, its
/// commits persisted by the page's shared worker.
///
/// `options`: `{ store?: "indexeddb" | "memory", database?: string }`.
#[wasm_bindgen(js_name = openTracker)]
pub async fn open_tracker(stream_key: String, options: JsValue) -> Result<Tracker, JsError> {
    let spec = StoreSpec::from_options(&options)?;
    let runtime = runtime(spec).await?;
    let inner = runtime
        .registry
        .open(stream_key_of(&stream_key))
        .await
        .map_err(|e| match e {
            RegistryError::AlreadyOpen(_) => JsError::new(&format!(
                "streamKey {stream_key:?} is already open in this page (close its tracker or \
                 ResumableEventSource first)"
            )),
            e => JsError::new(&e.to_string()),
        })?;
    let committed = inner.last_event_id().map(str::to_owned);
    Ok(Tracker {
        inner: Some(inner),
        committed,
        runtime,
    })
}

/// The core key of a JavaScript stream key.
pub(crate) fn stream_key_of(key: &str) -> StreamKey {
    StreamKey::new(key, "")
}

/// Dedup window and cursor of one stream, driven as the core's
/// [`EventTracker`]: `observe(id)` tells whether an event is fresh, the
/// application handles it, then `commit()` declares it delivered, and only
/// then does the cursor move (persisted in the background). A page that
/// dies between the two repeats the event after a reload, never skips it.
#[wasm_bindgen]
pub struct Tracker {
    inner: Option<EventTracker>,
    /// The id of the last commit (what the store gets), kept after
    /// `close()`.
    committed: Option<String>,
    runtime: Rc<Runtime>,
}

#[wasm_bindgen]
impl Tracker {
    fn open(&mut self) -> Result<&mut EventTracker, JsError> {
        self.inner.as_mut().ok_or_else(closed)
    }

    /// Whether the event with this id is fresh (not a replay); an event
    /// without an id is always fresh. A fresh id counts as seen at once (a
    /// second `observe` of it is a duplicate) and becomes `lastEventId`, but
    /// the stored cursor moves only at `commit()`. Throws after `close()`.
    pub fn observe(&mut self, id: Option<String>) -> Result<bool, JsError> {
        let now = task_now(&self.runtime.clock);
        let tracker = self.open()?;
        Ok(tracker.observe(id.as_deref(), now).is_fresh())
    }

    /// Declares every event observed so far handled: the cursor moves to
    /// the last fresh id and is persisted in the background. Does nothing
    /// when nothing was observed since the last commit. Throws after
    /// `close()`.
    pub fn commit(&mut self) -> Result<(), JsError> {
        let tracker = self.inner.as_mut().ok_or_else(closed)?;
        if !tracker.has_uncommitted() {
            return Ok(());
        }
        tracker.commit();
        match (&mut self.committed, tracker.last_event_id()) {
            (Some(ours), Some(id)) => id.clone_into(ours),
            (ours, id) => *ours = id.map(str::to_owned),
        }
        Ok(())
    }

    /// `observe` for many ids at once, joined by `"\n"`: one call across
    /// the JavaScript/wasm boundary. Returns one byte per id, 1 for fresh;
    /// a `commit()` afterwards moves the cursor to the last fresh one.
    /// Throws after `close()`, and when the ids do not split into `count`
    /// (an id with a line break, which SSE ids never have).
    #[wasm_bindgen(js_name = observeJoined)]
    pub fn observe_joined(&mut self, ids: &str, count: usize) -> Result<Vec<u8>, JsError> {
        if ids.split('\n').count() != count {
            return Err(JsError::new("event ids cannot contain line breaks"));
        }
        let now = task_now(&self.runtime.clock);
        let tracker = self.open()?;
        let fresh: Vec<u8> = ids
            .split('\n')
            .map(|id| u8::from(tracker.observe(Some(id), now).is_fresh()))
            .collect();
        Ok(fresh)
    }

    /// The id to send as `Last-Event-ID` (or an MCP resumption token) when
    /// this page reconnects: the last fresh id observed. `undefined` when
    /// the stream starts from the beginning. After `close()`, the last
    /// committed id: where a reopen resumes.
    #[wasm_bindgen(getter, js_name = lastEventId)]
    pub fn last_event_id(&self) -> Option<String> {
        match &self.inner {
            Some(tracker) => tracker.last_event_id().map(str::to_owned),
            None => self.committed.clone(),
        }
    }

    /// Counters of this stream, its store and the shared worker.
    pub fn stats(&self) -> js_sys::Object {
        let (observed, duplicates) = self
            .inner
            .as_ref()
            .map_or((0, 0), |t| (t.stats().observed, t.stats().duplicates));
        js::Fields::new()
            .set("observed", observed as f64)
            .set("duplicates", duplicates as f64)
            .set("lastEventId", js::opt_str(self.last_event_id()))
            .extend(&self.runtime.stats())
            .build()
    }

    /// Writes the cursor now instead of at the next flush interval; rejects
    /// when the write failed (it is retried). Returns a promise without
    /// holding the tracker, so `observe` may go on meanwhile.
    pub fn flush(&self) -> js_sys::Promise {
        let runtime = self.runtime.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            flush(&runtime)
                .await
                .map(|()| JsValue::UNDEFINED)
                .map_err(Into::into)
        })
    }

    /// Closes the stream and writes its committed cursor (see `flush`);
    /// events observed since the last `commit()` are not delivered, and a
    /// reopen resumes before them. The stream key can be opened again at
    /// once. Later calls to `observe` and `commit` throw.
    pub fn close(&mut self) -> js_sys::Promise {
        self.inner = None;
        self.flush()
    }
}

fn closed() -> JsError {
    JsError::new("the tracker is closed")
}

/// Flushes a runtime and reports a failed write as an error.
pub(crate) async fn flush(runtime: &Runtime) -> Result<(), JsError> {
    let report = runtime
        .registry
        .worker()
        .flush()
        .await
        .map_err(|_| JsError::new("the persistence worker has stopped"))?;
    match report.error {
        Some(error) => Err(JsError::new(&format!(
            "the cursor is not saved yet (it will be retried): {error}"
        ))),
        None => Ok(()),
    }
}
