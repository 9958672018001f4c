//! One persistence runtime per store: a registry, its worker, the store.
//!
//! Every stream of a page (or worker) that uses the same store shares one
//! [`Registry`] and one persistence worker, so a page with many streams still
//! makes at most one IndexedDB transaction per flush interval. Runtimes live
//! as long as the page; on `pagehide` (and when the page is hidden) every
//! runtime flushes cursors and dedup windows, so a reload loses nothing that
//! was delivered and repeats nothing.

use super::js;
use crate::{BrowserClock, IdbStore};
use futures::FutureExt;
use futures::future::{LocalBoxFuture, Shared};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use tidemark_core::{
    Clock, Config, Cursor, EitherStore, FingerprintKey, MemStore, Millis, Registry, SavedWindow,
    Stats, Store, StoreError, StreamKey, TrackerConfig, WindowChange, persistence,
};
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::spawn_local;

/// The database used when the options name none.
pub(crate) const DEFAULT_DATABASE: &str = "tidemark";

/// Where cursors go, as chosen by the `store` and `database` options.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub(crate) struct StoreSpec {
    /// `true` for `store: "memory"`: dedup without durability.
    pub(crate) memory: bool,
    /// The IndexedDB database name.
    pub(crate) database: String,
}

impl StoreSpec {
    /// Reads `store` (`"indexeddb"`, the default, or `"memory"`) and
    /// `database` from an options object.
    pub(crate) fn from_options(options: &JsValue) -> Result<Self, JsError> {
        let memory = match js::get_string(options, "store")?.as_deref() {
            None | Some("indexeddb") => false,
            Some("memory") => true,
            Some(other) => {
                return Err(JsError::new(&format!(
                    "option `store` must be \"indexeddb\" or \"memory\", not {other:?}"
                )));
            }
        };
        let database =
            js::get_string(options, "database")?.unwrap_or_else(|| DEFAULT_DATABASE.into());
        Ok(StoreSpec { memory, database })
    }
}

/// The store behind a runtime: IndexedDB ([`EitherStore::Left`]), or memory
/// ([`EitherStore::Right`]) when asked for or when IndexedDB cannot be opened.
type AnyStore = EitherStore<IdbStore, MemStore>;

/// A runtime's store. It reopens an IndexedDB connection that was closed
/// under it (another tab upgraded or deleted the database, or the browser
/// closed it), so the stream's cursor catches up once the database is
/// usable again, and it says once on the console when writes start failing
/// (failures and recovery show in `stats()`).
pub(crate) struct PageStore {
    inner: RefCell<Rc<AnyStore>>,
    warned: Cell<bool>,
    /// Resume URLs of POST streams while the store is memory.
    resume_urls: RefCell<HashMap<StreamKey, String>>,
}

impl PageStore {
    fn new(store: AnyStore) -> Self {
        PageStore {
            inner: RefCell::new(Rc::new(store)),
            warned: Cell::new(false),
            resume_urls: RefCell::default(),
        }
    }

    /// The stored resume URL of the POST stream `key` (see
    /// [`IdbStore::load_resume_url`]).
    pub(crate) async fn load_resume_url(
        &self,
        key: &StreamKey,
    ) -> Result<Option<String>, StoreError> {
        match &*self.current().await {
            AnyStore::Left(idb) => idb.load_resume_url(key).await,
            AnyStore::Right(_) => Ok(self.resume_urls.borrow().get(key).cloned()),
        }
    }

    /// Stores the resume URL of the POST stream `key`, durably when the
    /// store is IndexedDB.
    pub(crate) async fn save_resume_url(
        &self,
        key: &StreamKey,
        url: &str,
        at: Millis,
    ) -> Result<(), StoreError> {
        match &*self.current().await {
            AnyStore::Left(idb) => idb.save_resume_url(key, url, at).await,
            AnyStore::Right(_) => {
                self.resume_urls
                    .borrow_mut()
                    .insert(key.clone(), url.to_owned());
                Ok(())
            }
        }
    }

    /// Deletes the resume URL of `key`, if any.
    pub(crate) async fn delete_resume_url(&self, key: &StreamKey) -> Result<(), StoreError> {
        match &*self.current().await {
            AnyStore::Left(idb) => idb.delete_resume_url(key).await,
            AnyStore::Right(_) => {
                self.resume_urls.borrow_mut().remove(key);
                Ok(())
            }
        }
    }

    /// The store to use now: the current one, or a fresh connection when the
    /// current one was closed (if it can be opened).
    async fn current(&self) -> Rc<AnyStore> {
        let current = self.inner.borrow().clone();
        if let AnyStore::Left(idb) = &*current
            && idb.is_closed()
            && let Ok(reopened) = idb.reopen().await
        {
            let reopened = Rc::new(AnyStore::Left(reopened));
            *self.inner.borrow_mut() = reopened.clone();
            return reopened;
        }
        current
    }
}

impl PageStore {
    /// Says once on the console that writes fail.
    fn warn_once(&self, result: &Result<(), StoreError>) {
        if let Err(error) = result
            && !self.warned.replace(true)
        {
            web_sys::console::warn_1(&JsValue::from_str(&format!(
                "tidemark: cursors cannot be written ({error}); the stream goes on, \
                 the newest cursors stay in memory and are retried"
            )));
        }
    }
}

impl Store for PageStore {
    async fn load(&self, key: &StreamKey) -> Result<Option<Cursor>, StoreError> {
        self.current().await.load(key).await
    }

    async fn save_batch(&self, cursors: &[Cursor]) -> Result<(), StoreError> {
        let result = self.current().await.save_batch(cursors).await;
        self.warn_once(&result);
        result
    }

    async fn delete(&self, key: &StreamKey) -> Result<(), StoreError> {
        self.current().await.delete(key).await
    }

    async fn window_key(&self) -> Result<Option<FingerprintKey>, StoreError> {
        self.current().await.window_key().await
    }

    async fn load_window(&self, key: &StreamKey) -> Result<Option<SavedWindow>, StoreError> {
        self.current().await.load_window(key).await
    }

    async fn save_with_windows(
        &self,
        cursors: &[Cursor],
        windows: &[WindowChange],
    ) -> Result<(), StoreError> {
        let result = self
            .current()
            .await
            .save_with_windows(cursors, windows)
            .await;
        self.warn_once(&result);
        result
    }
}

/// A registry, its running worker, and what the store turned out to be.
pub(crate) struct Runtime {
    pub(crate) registry: Registry<Rc<PageStore>>,
    pub(crate) clock: BrowserClock,
    pub(crate) spec: StoreSpec,
    /// Why the runtime runs on memory although IndexedDB was asked for.
    pub(crate) warning: Option<String>,
}

impl Runtime {
    async fn start(spec: StoreSpec) -> Result<Rc<Runtime>, String> {
        let (store, warning) = if spec.memory {
            (AnyStore::Right(MemStore::new()), None)
        } else {
            match IdbStore::open(&spec.database).await {
                Ok(store) => (AnyStore::Left(store), None),
                Err(error) => {
                    let warning = format!(
                        "tidemark: cursors are kept in memory only, so they will not survive a reload: {error}"
                    );
                    web_sys::console::warn_1(&JsValue::from_str(&warning));
                    (AnyStore::Right(MemStore::new()), Some(error.to_string()))
                }
            }
        };
        // Both stores fingerprint with a key of their own (the registry
        // asks them); a tracker config still needs one. The default comes
        // from `crypto.getRandomValues` too, but panics (an abort in the
        // package) where there is none: say so as an error instead.
        let fingerprint_key = FingerprintKey::try_random().map_err(|e| e.to_string())?;
        let config = Config {
            tracker: TrackerConfig {
                fingerprint_key,
                ..TrackerConfig::default()
            },
            ..Config::default()
        };
        let clock = BrowserClock::new();
        let store = PageStore::new(store);
        let (registry, worker) = persistence(Rc::new(store), clock.clone(), config);
        spawn_local(async move {
            worker.run().await;
        });
        flush_on_pagehide();
        Ok(Rc::new(Runtime {
            registry,
            clock,
            spec,
            warning,
        }))
    }

    /// Writes the newest cursor and window of every stream now, in this
    /// task's microtasks: straight to the store, because the worker may be
    /// waiting for a write in progress, whose answer a page being unloaded
    /// never gets; and through the worker too, which then knows they are
    /// written.
    pub(crate) fn write_now(&self) {
        let cursors = self.registry.newest_cursors();
        let windows = self.registry.newest_windows();
        if !cursors.is_empty() || !windows.is_empty() {
            let store = self.registry.store().clone();
            spawn_local(async move {
                let _ = store.save_with_windows(&cursors, &windows).await;
            });
        }
        let handle = self.registry.worker().clone();
        spawn_local(async move {
            let _ = handle.flush().await;
        });
    }

    /// `stats()` fields of the runtime: the store and the worker.
    pub(crate) fn stats(&self) -> js_sys::Object {
        let Stats {
            open_streams,
            events_observed,
            duplicates_dropped,
            rejected_commits,
            worker,
        } = self.registry.stats();
        let (store, transactions, window_bytes) = match &**self.registry.store().inner.borrow() {
            AnyStore::Left(s) => (
                "indexeddb",
                s.transactions(),
                Some(s.window_bytes_written()),
            ),
            AnyStore::Right(s) => ("memory", s.batches(), None),
        };
        js::Fields::new()
            .set("store", store)
            .set("database", self.spec.database.as_str())
            .set("storeWarning", js::opt_str(self.warning.as_ref()))
            .set("storeTransactions", transactions as f64)
            .set("windowBytesWritten", window_bytes.map(|b| b as f64))
            .set("openStreams", open_streams as f64)
            .set("eventsObserved", events_observed as f64)
            .set("duplicatesDropped", duplicates_dropped as f64)
            .set("rejectedCommits", rejected_commits as f64)
            .set("cursorsWritten", worker.cursors_written as f64)
            .set("batches", worker.batches as f64)
            .set("failedBatches", worker.failed_batches as f64)
            .set("retriesPending", worker.retries_pending as f64)
            .set("consecutiveFailures", worker.consecutive_failures as f64)
            .set(
                "lastStoreError",
                js::opt_str(worker.last_error.map(|e| e.to_string())),
            )
            .build()
    }
}

type Starting = Shared<LocalBoxFuture<'static, Result<Rc<Runtime>, String>>>;

#[wasm_bindgen]
extern "C" {
    /// The global `queueMicrotask`, in windows and workers alike.
    #[wasm_bindgen(js_name = queueMicrotask)]
    fn queue_microtask(callback: &js_sys::Function);
}

thread_local! {
    /// The time of the current task, once read (see [`task_now`]).
    static TASK_NOW: Cell<Option<Millis>> = const { Cell::new(None) };
    /// Forgets `TASK_NOW` when the current task's microtasks run.
    static FORGET_TASK_NOW: Closure<dyn Fn()> = Closure::new(|| TASK_NOW.set(None));
    static RUNTIMES: RefCell<HashMap<StoreSpec, Starting>> = RefCell::new(HashMap::new());
    static PAGEHIDE: Cell<bool> = const { Cell::new(false) };
}

/// The clock read once per JavaScript task: the first call in a task reads
/// `clock`, later calls in the same task get the same time. Events handed
/// over in one task are observed at one instant anyway, and a loop over many
/// ids then pays for one clock read instead of one each (a call out of
/// WebAssembly per event).
pub(crate) fn task_now(clock: &BrowserClock) -> Millis {
    if let Some(now) = TASK_NOW.get() {
        return now;
    }
    let now = clock.now();
    TASK_NOW.set(Some(now));
    FORGET_TASK_NOW.with(|forget| queue_microtask(forget.as_ref().unchecked_ref()));
    now
}

/// The runtime of `spec`, started on first use; concurrent callers share
/// one start.
pub(crate) async fn runtime(spec: StoreSpec) -> Result<Rc<Runtime>, JsError> {
    let starting = RUNTIMES.with(|runtimes| {
        runtimes
            .borrow_mut()
            .entry(spec.clone())
            .or_insert_with(|| Runtime::start(spec).boxed_local().shared())
            .clone()
    });
    starting.await.map_err(|e| JsError::new(&e))
}

/// Writes the cursors of every started runtime now; fails with the first
/// failed write.
pub(crate) async fn flush_every() -> Result<(), JsError> {
    let runtimes: Vec<Rc<Runtime>> = RUNTIMES.with(|runtimes| {
        runtimes
            .borrow()
            .values()
            .filter_map(|starting| starting.peek().and_then(|r| r.as_ref().ok()).cloned())
            .collect()
    });
    let flushes = runtimes
        .iter()
        .map(|runtime| super::tracker::flush(runtime));
    futures::future::join_all(flushes)
        .await
        .into_iter()
        .collect()
}

/// Writes the cursors of every started runtime now (`pagehide`).
fn write_all_now() {
    RUNTIMES.with(|runtimes| {
        for starting in runtimes.borrow().values() {
            if let Some(Ok(runtime)) = starting.peek() {
                runtime.write_now();
            }
        }
    });
}

/// Installs, once, listeners that flush every runtime when the page is
/// hidden or unloaded. The flush starts within the event's task: the
/// worker's write and the IndexedDB requests are issued in microtasks
/// before the page goes away. Workers have neither event; their streams
/// flush on `close()` and every flush interval.
fn flush_on_pagehide() {
    if PAGEHIDE.with(|done| done.replace(true)) {
        return;
    }
    let global: web_sys::EventTarget = js_sys::global().unchecked_into();
    let flush = Closure::<dyn Fn(web_sys::Event)>::new(|_event: web_sys::Event| write_all_now());
    let _ = global.add_event_listener_with_callback("pagehide", flush.as_ref().unchecked_ref());
    if let Some(document) = js::get(&js_sys::global(), "document") {
        let document: web_sys::EventTarget = document.unchecked_into();
        let _ = document
            .add_event_listener_with_callback("visibilitychange", flush.as_ref().unchecked_ref());
    }
    // One listener for the page's lifetime.
    flush.forget();
}
