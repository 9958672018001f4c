//! The low-level tracker, for apps that bring their own transport.

use super::js;
use super::runtime::{Runtime, StoreSpec, runtime, task_now};
use std::rc::Rc;
use tidemark_core::{EventTracker, StreamKey};
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
        .map_err(|e| JsError::new(&e.to_string()))?;
    Ok(Tracker {
        inner: Some(inner),
        runtime,
    })
}

/// The core key of a JavaScript stream key.
pub(crate) fn stream_key_of(key: &str) -> StreamKey {
    StreamKey::new(key, "")
}

/// Dedup window and cursor of one stream. `observe(id)` tells whether an
/// event is fresh and, if so, records it as delivered: the cursor moves and
/// is persisted in the background.
#[wasm_bindgen]
pub struct Tracker {
    inner: Option<EventTracker>,
    runtime: Rc<Runtime>,
}

#[wasm_bindgen]
impl Tracker {
    /// Whether the event with this id is fresh (not a replay). A fresh event
    /// moves the cursor; an event without an id is always fresh and moves
    /// nothing. After `close()`, every event counts as fresh.
    pub fn observe(&mut self, id: Option<String>) -> bool {
        let now = task_now(&self.runtime.clock);
        match &mut self.inner {
            Some(tracker) => {
                let fresh = tracker.observe(id.as_deref(), now).is_fresh();
                if fresh {
                    tracker.commit();
                }
                fresh
            }
            None => true,
        }
    }

    /// `observe` for many ids at once, joined by `"\n"` (ids never contain
    /// a line break): one call across the JavaScript/wasm boundary. Returns
    /// one byte per id, 1 for fresh.
    #[wasm_bindgen(js_name = observeJoined)]
    pub fn observe_joined(&mut self, ids: &str) -> Vec<u8> {
        let now = task_now(&self.runtime.clock);
        let Some(tracker) = &mut self.inner else {
            return vec![1; ids.split('\n').count()];
        };
        let fresh: Vec<u8> = ids
            .split('\n')
            .map(|id| u8::from(tracker.observe(Some(id), now).is_fresh()))
            .collect();
        tracker.commit();
        fresh
    }

    /// The id to send as `Last-Event-ID` (or an MCP resumption token), or
    /// `undefined` when the stream starts from the beginning.
    #[wasm_bindgen(getter, js_name = lastEventId)]
    pub fn last_event_id(&self) -> Option<String> {
        self.inner
            .as_ref()
            .and_then(|t| t.last_event_id())
            .map(str::to_owned)
    }

    /// The stream key this tracker was opened with.
    #[wasm_bindgen(getter, js_name = streamKey)]
    pub fn stream_key(&self) -> Option<String> {
        self.inner.as_ref().map(|t| t.key().session().to_owned())
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

    /// Writes the cursor now instead of at the next flush interval.
    pub async fn flush(&self) -> Result<(), JsError> {
        flush(&self.runtime).await
    }

    /// Closes the stream and writes its cursor; the stream key can be opened
    /// again once this resolves.
    pub async fn close(&mut self) -> Result<(), JsError> {
        self.inner = None;
        flush(&self.runtime).await
    }
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
