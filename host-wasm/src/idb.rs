//! Cursors and dedup windows in IndexedDB: [`IdbStore`].

use js_sys::{Array, Function, Object, Promise, Reflect, Uint8Array};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt;
use std::rc::Rc;
use tidemark_core::{
    Cursor, FingerprintKey, Millis, SavedWindow, Store, StoreError, StreamKey, WindowChange,
};
use wasm_bindgen::closure::Closure;
use wasm_bindgen::prelude::wasm_bindgen;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::{
    DomException, IdbDatabase, IdbFactory, IdbKeyRange, IdbObjectStore, IdbRequest, IdbTransaction,
};

#[wasm_bindgen]
extern "C" {
    /// An `IDBDatabase`, for the one binding web-sys has only behind
    /// `web_sys_unstable_apis`.
    type RawDatabase;

    /// `IDBDatabase.transaction(names, mode, options)`, `names` a string
    /// or an array of them.
    #[wasm_bindgen(method, catch, js_name = transaction)]
    fn transaction_with_options(
        this: &RawDatabase,
        store_names: &JsValue,
        mode: &str,
        options: &Object,
    ) -> Result<IdbTransaction, JsValue>;
}

/// The largest integer a JavaScript Number holds exactly: 2^53 - 1.
const MAX_SAFE_INTEGER: f64 = 9_007_199_254_740_991.0;

/// The key of the fingerprint key's record in [`IdbStore::META_STORE`].
const WINDOW_KEY_RECORD: &str = "windowKey";

const CLOSED_BY_CALLER: &str = "the store was closed";
const CLOSED_BY_VERSION_CHANGE: &str = "the database connection was closed because another tab or \
     worker is upgrading or deleting the database (a version change); reopen the store";
const CLOSED_BY_BROWSER: &str = "the browser closed the database connection (site data \
     cleared or a storage failure); reopen the store";

/// Cursors and dedup windows of every stream in one IndexedDB database.
///
/// The database has version [`IdbStore::VERSION`] and four object stores:
/// [`IdbStore::OBJECT_STORE`] for cursors, [`IdbStore::WINDOW_STORE`] for
/// dedup windows and [`IdbStore::META_STORE`] for the key that fingerprints
/// them (see [below](#dedup-windows)), and [`IdbStore::RESUME_STORE`] for
/// the resume URLs of POST streams (see [below](#resume-urls)). A
/// stream's cursor is the entry with the highest
/// `seq` under the array key `[session, stream, seq]`; its value is a plain
/// object `{ lastEventId: string, seq: number, at: number }`, readable from
/// JavaScript and DevTools. `seq` and `at` are stored as Numbers: `at` is
/// milliseconds since the Unix epoch, and a `seq` above 2^53 (about 285 years
/// at a million cursor moves per second) is not expected; larger values would
/// be rounded.
///
/// # Writes
///
/// A flush is one `readwrite` transaction for the whole batch, cursors and
/// windows together, opened with
/// `{ durability: "relaxed" }` (the data reaches the OS, not necessarily the
/// disk, before `complete` fires: a tab crash loses nothing, a power cut may
/// lose the last flush, which the core's at-least-once replay covers). For
/// each cursor it deletes the stream's entries with a lower `seq` and puts
/// its own; `load` reads the stream's entries and returns the highest. So a
/// persisted cursor never moves backwards, even when several tabs or workers
/// write the same stream, and yet a write reads nothing: every request is
/// issued at once and `transaction.commit()` is called right after (where
/// the browser has it). That is what makes the flush on `pagehide` work: a
/// page being unloaded gets no more events, so a write that waited for a
/// read to come back would never be committed (seen in Chromium: a reload
/// then replayed the last flush interval's events). A stored entry of the
/// wrong shape is reported by `load` as [`StoreError::Corrupt`] until a newer
/// cursor of that stream replaces it.
///
/// # Dedup windows
///
/// The store keeps windows ([`Store::window_key`] is `Some`): a tracker
/// opened from it after a reload drops what the server replays, not only
/// resumes from the cursor. A stream's window is kept in
/// [`IdbStore::WINDOW_STORE`] as `Uint8Array` records in the core's encoding
/// ([`SavedWindow`]: about one byte per consecutive numeric id, eight per
/// fingerprint): the whole window under the array key `[session, stream]`,
/// and after it the changes of later flushes, each under
/// `[session, stream, seq]` with the `seq` of the cursor it was written
/// with; [`Store::load_window`] folds them in key order. A flush appends
/// only what each stream's window gained, and reads nothing: the store
/// keeps in memory the window of every stream it has loaded (the registry
/// loads it when it opens a stream) or written, and once a stream's
/// appended records outweigh its whole window (or 1 KiB, or number 64) the
/// flush writes the whole window instead and deletes the records in the
/// same transaction. So a flush writes at most about twice what the windows
/// gained, and a stream has at most 65 records. A reset (the window was
/// cleared) is written whole. A stream this store never loaded only gets
/// records appended until a store loads it.
///
/// The fingerprint key is 16 random bytes from `crypto.getRandomValues`
/// ([`FingerprintKey::try_random`]), a `Uint8Array` under the key
/// `"windowKey"` in [`IdbStore::META_STORE`], made on first use: `add`ed in
/// a strictly durable transaction, then read back, so tabs opening the
/// database at once all get the one that was added first. It never leaves
/// the database (it is not derived from anything, nor sent anywhere).
///
/// Databases of versions 1 (cursors only) and 2 (with resume URLs) are
/// upgraded in place: the upgrade adds the missing object stores and keeps
/// everything else, so their cursors resume, with windows from then on.
///
/// # Resume URLs
///
/// A POST stream resumes from the URL its answer named
/// (`Content-Location`), never by posting again. That URL is stored under
/// the array key `[session, stream]` in [`IdbStore::RESUME_STORE`] as
/// `{ url: string, at: number }` ([`IdbStore::save_resume_url`]), in a
/// transaction of its own with `durability: "strict"`: it is written once
/// per POST stream, before the first event of the answer is delivered, and
/// a reload right after that event must find it.
///
/// # Connections
///
/// The factory is `globalThis.indexedDB`, so the store works in windows and in
/// Web Workers alike; where it is missing (some private modes, sandboxed
/// frames) [`IdbStore::open`] fails with [`StoreError::Unavailable`]. When
/// another tab or worker upgrades or deletes the database, the store closes
/// its connection at once, so it never blocks them, and every later operation
/// fails with [`StoreError::Unavailable`]: reopen the store (a page that is
/// being upgraded is usually about to reload anyway).
///
/// Each pending IndexedDB request is awaited through a `Promise` whose own
/// `resolve`/`reject` functions are the request's event handlers, wrapped in
/// a `JsFuture`: the store registers no Rust closure per operation, and the
/// `JsFuture`'s callbacks are freed when the request settles, so nothing
/// accumulates however many operations run.
///
/// Dropping the store closes its connection.
pub struct IdbStore {
    name: String,
    conn: Rc<Connection>,
    /// The window of every stream loaded or written through this store, as
    /// stored (or about to be).
    windows: RefCell<HashMap<StreamKey, Known>>,
    /// The fingerprint key, once read.
    key: Cell<Option<FingerprintKey>>,
    // Registered as the database's `onversionchange` and `onclose`; kept
    // alive as long as the store, unregistered on drop.
    _on_version_change: Closure<dyn FnMut(JsValue)>,
    _on_close: Closure<dyn FnMut(JsValue)>,
}

/// What an [`IdbStore`] knows of a stream's stored window.
struct Known {
    /// The fold of every record stored (or being stored).
    window: SavedWindow,
    /// Bytes of the whole window last written (or of every record loaded).
    whole: u64,
    /// Bytes and number of the change records appended since.
    appended: u64,
    records: u32,
}

impl Known {
    /// `window`, just written whole as `bytes`.
    fn whole(window: SavedWindow, bytes: &[u8]) -> Known {
        Known {
            window,
            whole: bytes.len() as u64,
            appended: 0,
            records: 0,
        }
    }
}

/// Appended change records are folded into one whole window once they
/// outweigh it, or this many bytes for a small window...
const COMPACT_BELOW: u64 = 1024;
/// ... or once there are this many.
const MAX_RECORDS: u32 = 64;

struct Connection {
    db: IdbDatabase,
    /// Why the connection is closed, once it is.
    closed: RefCell<Option<&'static str>>,
    transactions: Cell<u64>,
    cursors_written: Cell<u64>,
    windows_written: Cell<u64>,
    window_bytes_written: Cell<u64>,
}

impl Connection {
    /// The database, unless the connection is closed.
    fn db(&self, doing: &str) -> Result<&IdbDatabase, StoreError> {
        match *self.closed.borrow() {
            Some(reason) => Err(StoreError::Unavailable(format!(
                "{doing} IndexedDB database {:?}: {reason}",
                self.db.name()
            ))),
            None => Ok(&self.db),
        }
    }

    /// Records why the connection closed (the first reason wins) and closes
    /// it. Transactions already running still complete.
    fn shut(&self, reason: &'static str) {
        let mut closed = self.closed.borrow_mut();
        if closed.is_none() {
            *closed = Some(reason);
        }
        drop(closed);
        self.db.close();
    }
}

impl IdbStore {
    /// The schema version the store opens its database with: 3 since the
    /// dedup windows (version 2 added the resume URLs to version 1's
    /// cursors).
    pub const VERSION: u32 = 3;
    /// The name of the object store holding the cursors.
    pub const OBJECT_STORE: &'static str = "cursors";
    /// The name of the object store holding the resume URLs of POST
    /// streams.
    pub const RESUME_STORE: &'static str = "resume";
    /// The name of the object store holding the streams' dedup windows.
    pub const WINDOW_STORE: &'static str = "windows";
    /// The name of the object store holding the fingerprint key of the
    /// windows (under the key `"windowKey"`).
    pub const META_STORE: &'static str = "meta";

    /// Opens (creating if needed) the IndexedDB database `name`.
    ///
    /// # Errors
    ///
    /// - [`StoreError::Unavailable`] when this context has no
    ///   `globalThis.indexedDB` or may not use it, or when the open is blocked
    ///   by another connection.
    /// - [`StoreError::Corrupt`] when the database exists at a higher version
    ///   (a newer build upgraded it) or lacks the cursors' object store (it
    ///   belongs to something else). Such a database is left untouched.
    /// - Anything else IndexedDB reports, mapped as in
    ///   [`IdbStore::error_from_dom_exception`].
    pub async fn open(name: &str) -> Result<IdbStore, StoreError> {
        let factory = factory()?;
        let doing = format!("opening IndexedDB database {name:?}");
        let request = factory
            .open_with_u32(name, Self::VERSION)
            .map_err(|e| js_error(&doing, &e))?;

        // An existing database without our cursors is someone else's.
        let foreign = Rc::new(Cell::new(false));
        // Runs only when the database is new (or older than VERSION).
        let upgrade: Closure<dyn FnMut(JsValue)> = {
            let request = request.clone();
            let foreign = foreign.clone();
            Closure::once(move |event: JsValue| {
                let Ok(result) = request.result() else { return };
                let db: IdbDatabase = result.unchecked_into();
                let old_version = event
                    .dyn_ref::<web_sys::IdbVersionChangeEvent>()
                    .map_or(0.0, |e| e.old_version());
                let has = |name: &str| db.object_store_names().contains(name);
                if old_version > 0.0 && !has(Self::OBJECT_STORE) {
                    foreign.set(true);
                }
                let created = !foreign.get()
                    && [
                        Self::OBJECT_STORE,
                        Self::RESUME_STORE,
                        Self::WINDOW_STORE,
                        Self::META_STORE,
                    ]
                    .iter()
                    .all(|name| has(name) || db.create_object_store(name).is_ok());
                if !created {
                    // The open then fails with an AbortError.
                    if let Some(tx) = request.transaction() {
                        let _ = tx.abort();
                    }
                }
            })
        };
        request.set_onupgradeneeded(Some(upgrade.as_ref().unchecked_ref()));
        let settled = JsFuture::from(Promise::new(&mut |resolve, reject| {
            request.set_onsuccess(Some(&resolve));
            request.set_onerror(Some(&reject));
            request.set_onblocked(Some(&reject));
        }))
        .await;
        request.set_onblocked(None);

        match settled {
            Ok(_) => {
                clear_open_handlers(&request);
                drop(upgrade);
                let db: IdbDatabase = request
                    .result()
                    .map_err(|e| js_error(&doing, &e))?
                    .unchecked_into();
                if !db.object_store_names().contains(Self::OBJECT_STORE) {
                    db.close();
                    return Err(foreign_database(name));
                }
                Ok(IdbStore::wrap(name, db))
            }
            Err(event) if event_type(&event) == "blocked" => {
                // The open stays queued. Should it succeed later, close that
                // connection at once; the upgrade handler stays alive until
                // then so that the database is created whole.
                let closer = {
                    let request = request.clone();
                    Closure::once_into_js(move |_event: JsValue| {
                        drop(upgrade);
                        if let Ok(result) = request.result()
                            && result.is_object()
                        {
                            result.unchecked_into::<IdbDatabase>().close();
                        }
                        clear_open_handlers(&request);
                    })
                };
                request.set_onsuccess(Some(closer.unchecked_ref()));
                request.set_onerror(Some(closer.unchecked_ref()));
                Err(StoreError::Unavailable(format!(
                    "{doing}: blocked by another tab or worker that keeps an older \
                     version of the database open"
                )))
            }
            Err(_) if foreign.get() => {
                clear_open_handlers(&request);
                drop(upgrade);
                Err(foreign_database(name))
            }
            Err(_) => {
                clear_open_handlers(&request);
                drop(upgrade);
                Err(match request.error() {
                    Ok(Some(e)) if e.name() == "VersionError" => StoreError::Corrupt {
                        what: format!("IndexedDB database {name:?}"),
                        detail: format!(
                            "it is at a higher version than version {} of this build \
                             (a newer build upgraded it): {}",
                            Self::VERSION,
                            e.message()
                        ),
                    },
                    Ok(Some(e)) => classify(&doing, &e.name(), &e.message()),
                    Ok(None) => StoreError::Backend {
                        message: format!("{doing}: failed without an error"),
                        transient: true,
                    },
                    Err(e) => js_error(&doing, &e),
                })
            }
        }
    }

    fn wrap(name: &str, db: IdbDatabase) -> IdbStore {
        let conn = Rc::new(Connection {
            db,
            closed: RefCell::new(None),
            transactions: Cell::new(0),
            cursors_written: Cell::new(0),
            windows_written: Cell::new(0),
            window_bytes_written: Cell::new(0),
        });
        let on_version_change = {
            let conn = Rc::clone(&conn);
            Closure::<dyn FnMut(JsValue)>::new(move |_event: JsValue| {
                conn.shut(CLOSED_BY_VERSION_CHANGE);
            })
        };
        let on_close = {
            let conn = Rc::clone(&conn);
            Closure::<dyn FnMut(JsValue)>::new(move |_event: JsValue| {
                conn.shut(CLOSED_BY_BROWSER);
            })
        };
        conn.db
            .set_onversionchange(Some(on_version_change.as_ref().unchecked_ref()));
        conn.db.set_onclose(Some(on_close.as_ref().unchecked_ref()));
        IdbStore {
            name: name.to_owned(),
            conn,
            windows: RefCell::default(),
            key: Cell::new(None),
            _on_version_change: on_version_change,
            _on_close: on_close,
        }
    }

    /// Deletes the IndexedDB database `name` with everything in it. Open
    /// [`IdbStore`]s of it close themselves (see [`IdbStore`]).
    /// Deleting a missing database is not an error.
    ///
    /// The future finishes once every other connection to the database has
    /// closed: a connection that is closing still runs its last transactions
    /// first, so a `blocked` event is normal here and not an error. A foreign
    /// connection that never closes delays the deletion until it does; race
    /// the future with a timer if that matters.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] when this context has no IndexedDB;
    /// otherwise what IndexedDB reports.
    pub async fn delete_database(name: &str) -> Result<(), StoreError> {
        let factory = factory()?;
        let doing = format!("deleting IndexedDB database {name:?}");
        let request = factory
            .delete_database(name)
            .map_err(|e| js_error(&doing, &e))?;
        if request_done(&request).await.is_err() {
            return Err(request_error(&doing, &request));
        }
        Ok(())
    }

    /// The database name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A new connection to the same database, for a store whose connection
    /// was closed under it (see [`IdbStore::is_closed`]). It takes over the
    /// windows this store keeps in memory, so its writes keep folding into
    /// them.
    ///
    /// # Errors
    ///
    /// As [`IdbStore::open`].
    pub async fn reopen(&self) -> Result<IdbStore, StoreError> {
        let reopened = IdbStore::open(&self.name).await?;
        *reopened.windows.borrow_mut() = self.windows.take();
        if let Some(key) = self.key.get() {
            // The windows go on under this key; a database deleted and made
            // anew gets it back, unless another tab added one first.
            let _ = reopened.add_key(key).await;
            reopened.key.set(Some(key));
        }
        Ok(reopened)
    }

    /// Adds `key` as the window key unless the database has one (then the
    /// add fails, harmlessly), in a strictly durable transaction; returns
    /// what it was doing, for errors.
    async fn add_key(&self, key: FingerprintKey) -> Result<String, StoreError> {
        let doing = format!("adding a window key to IndexedDB database {:?}", self.name);
        let tx = self.readwrite_on(&doing, &Self::META_STORE.into(), "strict")?;
        let done = transaction_done(&tx);
        let added = tx.object_store(Self::META_STORE).and_then(|store| {
            store.add_with_key(
                &Uint8Array::from(&key.to_bytes()[..]),
                &WINDOW_KEY_RECORD.into(),
            )
        });
        if added.is_err() {
            let _ = tx.abort();
        }
        commit(&tx);
        if done.await.is_ok() {
            self.conn.transactions.set(self.conn.transactions.get() + 1);
        }
        Ok(doing)
    }

    /// How many `readwrite` transactions (one per non-empty flush, one per
    /// `delete`, one per resume URL written or deleted, one when the
    /// window key is made) completed.
    pub fn transactions(&self) -> u64 {
        self.conn.transactions.get()
    }

    /// How many cursors completed transactions wrote (one per stream per
    /// batch).
    pub fn cursors_written(&self) -> u64 {
        self.conn.cursors_written.get()
    }

    /// How many windows completed transactions wrote (one per stream whose
    /// window changed, per batch).
    pub fn windows_written(&self) -> u64 {
        self.conn.windows_written.get()
    }

    /// How many bytes of windows completed transactions wrote (the
    /// encoded windows, without keys).
    pub fn window_bytes_written(&self) -> u64 {
        self.conn.window_bytes_written.get()
    }

    /// Whether the connection is closed, by [`IdbStore::close`], by a
    /// version change from elsewhere, or by the browser.
    pub fn is_closed(&self) -> bool {
        self.conn.closed.borrow().is_some()
    }

    /// Closes the connection. Transactions already running complete; later
    /// operations fail with [`StoreError::Unavailable`].
    pub fn close(&self) {
        self.conn.shut(CLOSED_BY_CALLER);
    }

    /// How a `DOMException` from IndexedDB maps onto [`StoreError`]:
    ///
    /// - `QuotaExceededError` → [`StoreError::QuotaExceeded`];
    /// - `InvalidStateError` (the connection is closed or closing) and
    ///   `SecurityError` (IndexedDB is not allowed here) →
    ///   [`StoreError::Unavailable`];
    /// - anything else → a transient [`StoreError::Backend`] naming the
    ///   exception.
    pub fn error_from_dom_exception(exception: &DomException) -> StoreError {
        classify("IndexedDB", &exception.name(), &exception.message())
    }

    fn what(&self, key: &StreamKey) -> String {
        format!(
            "IndexedDB database {:?}, object store {:?}, key {key:?}",
            self.name,
            Self::OBJECT_STORE
        )
    }

    /// A `readwrite` transaction on the cursors and the windows, with
    /// relaxed durability.
    fn readwrite(&self, doing: &str) -> Result<IdbTransaction, StoreError> {
        let stores = Array::of2(&Self::OBJECT_STORE.into(), &Self::WINDOW_STORE.into());
        self.readwrite_on(doing, &stores, "relaxed")
    }

    /// A `readwrite` transaction on `stores` (a name or an array of names)
    /// with `durability`.
    fn readwrite_on(
        &self,
        doing: &str,
        stores: &JsValue,
        durability: &str,
    ) -> Result<IdbTransaction, StoreError> {
        let db = self.conn.db(doing)?;
        let options = Object::new();
        let _ = Reflect::set(&options, &"durability".into(), &durability.into());
        db.unchecked_ref::<RawDatabase>()
            .transaction_with_options(stores, "readwrite", &options)
            .map_err(|e| js_error(doing, &e))
    }

    /// One request on the windows, in a read-only transaction of its
    /// own: its result.
    async fn read(
        &self,
        doing: &str,
        request: impl FnOnce(&IdbObjectStore) -> Result<IdbRequest, JsValue>,
    ) -> Result<JsValue, StoreError> {
        self.read_from(doing, Self::WINDOW_STORE, request).await
    }

    /// One request on `store`, in a read-only transaction of its own: its
    /// result.
    async fn read_from(
        &self,
        doing: &str,
        store: &str,
        request: impl FnOnce(&IdbObjectStore) -> Result<IdbRequest, JsValue>,
    ) -> Result<JsValue, StoreError> {
        let tx = self
            .conn
            .db(doing)?
            .transaction_with_str(store)
            .map_err(|e| js_error(doing, &e))?;
        let request = tx
            .object_store(store)
            .and_then(|store| request(&store))
            .map_err(|e| js_error(doing, &e))?;
        if request_done(&request).await.is_err() {
            return Err(request_error(doing, &request));
        }
        request.result().map_err(|e| js_error(doing, &e))
    }

    /// The stored fingerprint key, if any.
    async fn read_key(&self, doing: &str) -> Result<Option<FingerprintKey>, StoreError> {
        let value = self
            .read_from(doing, Self::META_STORE, |store| {
                store.get(&WINDOW_KEY_RECORD.into())
            })
            .await?;
        if value.is_undefined() {
            return Ok(None);
        }
        let bytes: Option<[u8; 16]> = value
            .dyn_ref::<Uint8Array>()
            .and_then(|bytes| bytes.to_vec().try_into().ok());
        match bytes {
            Some(bytes) => Ok(Some(FingerprintKey::from_bytes(bytes))),
            None => Err(StoreError::Corrupt {
                what: format!(
                    "IndexedDB database {:?}, object store {:?}, key {WINDOW_KEY_RECORD:?}",
                    self.name,
                    Self::META_STORE
                ),
                detail: "expected a Uint8Array of 16 bytes".into(),
            }),
        }
    }

    /// Puts every window change of a batch: appended as a record of its
    /// own under `[session, stream, seq]` (the seq of the stream's cursor in
    /// the batch), or, for a reset and once the appended records outweigh
    /// the whole window, the whole window under `[session, stream]` in
    /// place of every record (see [Dedup windows](IdbStore#dedup-windows)).
    /// Returns how many windows and bytes it wrote. Reads nothing, like
    /// [`IdbStore::write_all`].
    fn write_windows(
        &self,
        doing: &str,
        tx: &IdbTransaction,
        cursors: &[Cursor],
        changes: &[WindowChange],
    ) -> Result<(u64, u64), StoreError> {
        if changes.is_empty() {
            return Ok((0, 0));
        }
        let store = tx
            .object_store(Self::WINDOW_STORE)
            .map_err(|e| js_error(doing, &e))?;
        let mut known = self.windows.borrow_mut();
        let mut bytes = Vec::new();
        let mut written = 0;
        for change in changes {
            let key = change.key();
            let seq = cursors.iter().find(|c| &c.key == key).map(|c| c.seq);
            bytes.clear();
            let append = match (known.get_mut(key), seq) {
                (Some(stored), Some(seq)) if !change.is_reset() => {
                    stored.window.apply(change);
                    change.encode(&mut bytes);
                    let appended = stored.appended + bytes.len() as u64;
                    if appended <= stored.whole.max(COMPACT_BELOW) && stored.records < MAX_RECORDS {
                        stored.appended = appended;
                        stored.records += 1;
                        Some(seq)
                    } else {
                        bytes.clear();
                        stored.window.encode(&mut bytes);
                        *stored = Known::whole(std::mem::take(&mut stored.window), &bytes);
                        None
                    }
                }
                // A window this store never loaded: what is stored is not
                // known here, so only a reset may replace it.
                (None, Some(seq)) if !change.is_reset() => {
                    change.encode(&mut bytes);
                    Some(seq)
                }
                (stored, _) => {
                    let mut window = stored
                        .map(|s| std::mem::take(&mut s.window))
                        .unwrap_or_default();
                    window.apply(change);
                    window.encode(&mut bytes);
                    known.insert(key.clone(), Known::whole(window, &bytes));
                    None
                }
            };
            let value = Uint8Array::from(&bytes[..]);
            let put = match append {
                Some(seq) => store.put_with_key(&value, &entry_key(key, seq)),
                None => entries_of(key)
                    .and_then(|all| store.delete(&all))
                    .and_then(|_| store.put_with_key(&value, &stream_prefix(key))),
            };
            put.map_err(|e| js_error(doing, &e))?;
            written += bytes.len() as u64;
        }
        Ok((changes.len() as u64, written))
    }

    /// The resume URL stored for the POST stream `key`, if any (see
    /// [Resume URLs](IdbStore#resume-urls)).
    ///
    /// # Errors
    ///
    /// What IndexedDB reports (see [`IdbStore::error_from_dom_exception`]);
    /// [`StoreError::Corrupt`] for a stored value of the wrong shape.
    pub async fn load_resume_url(&self, key: &StreamKey) -> Result<Option<String>, StoreError> {
        let doing = format!("loading the resume URL of {key:?} from {:?}", self.name);
        let tx = self
            .conn
            .db(&doing)?
            .transaction_with_str(Self::RESUME_STORE)
            .map_err(|e| js_error(&doing, &e))?;
        let request = tx
            .object_store(Self::RESUME_STORE)
            .and_then(|store| store.get(&stream_prefix(key)))
            .map_err(|e| js_error(&doing, &e))?;
        if request_done(&request).await.is_err() {
            return Err(request_error(&doing, &request));
        }
        let value = request.result().map_err(|e| js_error(&doing, &e))?;
        if value.is_undefined() {
            return Ok(None);
        }
        let url = Reflect::get(&value, &"url".into())
            .ok()
            .and_then(|url| url.as_string());
        match url {
            Some(url) => Ok(Some(url)),
            None => Err(StoreError::Corrupt {
                what: format!(
                    "IndexedDB database {:?}, object store {:?}, key {key:?}",
                    self.name,
                    Self::RESUME_STORE
                ),
                detail: "expected an object { url: string, at }".into(),
            }),
        }
    }

    /// Stores `url` as the resume URL of the POST stream `key`, replacing
    /// any, at `at` (milliseconds since the Unix epoch); resolves once the
    /// transaction is durably committed.
    pub async fn save_resume_url(
        &self,
        key: &StreamKey,
        url: &str,
        at: Millis,
    ) -> Result<(), StoreError> {
        let doing = format!("saving the resume URL of {key:?} to {:?}", self.name);
        let value = Object::new();
        let _ = Reflect::set(&value, &"url".into(), &url.into());
        let _ = Reflect::set(&value, &"at".into(), &(at.as_u64() as f64).into());
        self.write_resume(&doing, |store| {
            store.put_with_key(&value, &stream_prefix(key))
        })
        .await
    }

    /// Deletes the resume URL of `key`, if any.
    pub async fn delete_resume_url(&self, key: &StreamKey) -> Result<(), StoreError> {
        let doing = format!("deleting the resume URL of {key:?} from {:?}", self.name);
        self.write_resume(&doing, |store| store.delete(&stream_prefix(key)))
            .await
    }

    /// One request on the resume URLs in a strictly durable transaction.
    async fn write_resume(
        &self,
        doing: &str,
        request: impl FnOnce(&IdbObjectStore) -> Result<IdbRequest, JsValue>,
    ) -> Result<(), StoreError> {
        let tx = self.readwrite_on(doing, &Self::RESUME_STORE.into(), "strict")?;
        let done = transaction_done(&tx);
        let issued = tx
            .object_store(Self::RESUME_STORE)
            .and_then(|store| request(&store));
        if let Err(e) = issued {
            let _ = tx.abort();
            let _ = done.await;
            return Err(js_error(doing, &e));
        }
        commit(&tx);
        if done.await.is_err() {
            return Err(transaction_error(doing, &tx));
        }
        self.conn.transactions.set(self.conn.transactions.get() + 1);
        Ok(())
    }

    /// Issues, for every cursor of the batch, a delete of the stream's
    /// entries with a lower `seq` and a put of its own entry; returns how
    /// many it wrote. Nothing is read, so every request is issued before
    /// this returns (see the type's docs on `pagehide`).
    fn write_all(
        &self,
        doing: &str,
        tx: &IdbTransaction,
        batch: &[Cursor],
    ) -> Result<u64, StoreError> {
        let store = object_store(doing, tx)?;
        for cursor in batch {
            let older = IdbKeyRange::bound_with_lower_open_and_upper_open(
                &stream_prefix(&cursor.key),
                &entry_key(&cursor.key, cursor.seq),
                false,
                true,
            )
            .map_err(|e| js_error(doing, &e))?;
            store.delete(&older).map_err(|e| js_error(doing, &e))?;
            store
                .put_with_key(&encode(cursor), &entry_key(&cursor.key, cursor.seq))
                .map_err(|e| js_error(doing, &e))?;
        }
        Ok(batch.len() as u64)
    }
}

impl Drop for IdbStore {
    fn drop(&mut self) {
        self.conn.db.set_onversionchange(None);
        self.conn.db.set_onclose(None);
        self.conn.shut(CLOSED_BY_CALLER);
    }
}

impl fmt::Debug for IdbStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdbStore")
            .field("name", &self.name)
            .field("closed", &*self.conn.closed.borrow())
            .field("transactions", &self.transactions())
            .field("cursors_written", &self.cursors_written())
            .finish()
    }
}

impl Store for IdbStore {
    async fn load(&self, key: &StreamKey) -> Result<Option<Cursor>, StoreError> {
        let doing = format!("loading {key:?} from IndexedDB database {:?}", self.name);
        let tx = self
            .conn
            .db(&doing)?
            .transaction_with_str(Self::OBJECT_STORE)
            .map_err(|e| js_error(&doing, &e))?;
        let request = object_store(&doing, &tx)?
            .get_all_with_key(&entries_of(key).map_err(|e| js_error(&doing, &e))?.into())
            .map_err(|e| js_error(&doing, &e))?;
        if request_done(&request).await.is_err() {
            return Err(request_error(&doing, &request));
        }
        let values: Array = request
            .result()
            .map_err(|e| js_error(&doing, &e))?
            .unchecked_into();
        let mut newest: Option<Cursor> = None;
        for value in values.iter() {
            let cursor = decode(key, &value).map_err(|detail| StoreError::Corrupt {
                what: self.what(key),
                detail,
            })?;
            if newest.as_ref().is_none_or(|n| cursor.supersedes(n)) {
                newest = Some(cursor);
            }
        }
        Ok(newest)
    }

    async fn save_batch(&self, cursors: &[Cursor]) -> Result<(), StoreError> {
        self.save_with_windows(cursors, &[]).await
    }

    async fn delete(&self, key: &StreamKey) -> Result<(), StoreError> {
        let doing = format!("deleting {key:?} from IndexedDB database {:?}", self.name);
        let tx = self.readwrite(&doing)?;
        let done = transaction_done(&tx);
        let deleted = entries_of(key).and_then(|range| {
            object_store(&doing, &tx)
                .map_err(|e| JsValue::from_str(&e.to_string()))?
                .delete(&range)?;
            tx.object_store(Self::WINDOW_STORE)?.delete(&range)
        });
        if let Err(e) = deleted {
            let _ = tx.abort();
            let _ = done.await;
            return Err(js_error(&doing, &e));
        }
        self.windows.borrow_mut().remove(key);
        commit(&tx);
        if done.await.is_err() {
            return Err(transaction_error(&doing, &tx));
        }
        self.conn.transactions.set(self.conn.transactions.get() + 1);
        Ok(())
    }

    async fn window_key(&self) -> Result<Option<FingerprintKey>, StoreError> {
        if let Some(key) = self.key.get() {
            return Ok(Some(key));
        }
        let doing = format!(
            "reading the window key of IndexedDB database {:?}",
            self.name
        );
        let key = match self.read_key(&doing).await? {
            Some(key) => key,
            None => {
                // First use: add a key unless another tab or worker just
                // did (then the add fails), and use whichever is stored.
                let made = FingerprintKey::try_random().map_err(|e| StoreError::Backend {
                    message: format!("making the window key of {:?}: {e}", self.name),
                    transient: false,
                })?;
                let doing = self.add_key(made).await?;
                self.read_key(&doing)
                    .await?
                    .ok_or_else(|| StoreError::Backend {
                        message: format!("{doing}: the key was not stored"),
                        transient: true,
                    })?
            }
        };
        self.key.set(Some(key));
        Ok(Some(key))
    }

    async fn load_window(&self, key: &StreamKey) -> Result<Option<SavedWindow>, StoreError> {
        let doing = format!(
            "loading the window of {key:?} from IndexedDB database {:?}",
            self.name
        );
        let range = entries_of(key).map_err(|e| js_error(&doing, &e))?;
        let records: Array = self
            .read(&doing, |store| store.get_all_with_key(&range))
            .await?
            .unchecked_into();
        let corrupt = |detail: String| StoreError::Corrupt {
            what: format!(
                "IndexedDB database {:?}, object store {:?}, key {key:?}",
                self.name,
                Self::WINDOW_STORE
            ),
            detail,
        };
        // The whole window first, then the changes appended after it, in
        // the order they were written.
        let mut window = SavedWindow::new();
        let mut bytes = 0;
        for record in records.iter() {
            let record = record
                .dyn_into::<Uint8Array>()
                .map_err(|_| corrupt("expected a Uint8Array".into()))?
                .to_vec();
            bytes += record.len() as u64;
            let mut input = &record[..];
            while !input.is_empty() {
                window.apply_encoded(&mut input).map_err(corrupt)?;
            }
        }
        let mut known = self.windows.borrow_mut();
        // What this store wrote (or is writing) is folded in too: a change
        // written twice is harmless.
        if let Some(written) = known.get(key) {
            let written = written.window.to_bytes();
            window.apply_encoded(&mut &written[..]).map_err(corrupt)?;
        }
        let found = records.length() > 0 || known.contains_key(key);
        known.insert(
            key.clone(),
            Known {
                window: window.clone(),
                whole: bytes,
                appended: 0,
                records: records.length().saturating_sub(1),
            },
        );
        Ok(found.then_some(window))
    }

    async fn save_with_windows(
        &self,
        cursors: &[Cursor],
        windows: &[WindowChange],
    ) -> Result<(), StoreError> {
        // Two cursors of one key (the worker never sends them) would be
        // fine too: each deletes only what is below its own `seq`.
        if cursors.is_empty() && windows.is_empty() {
            return Ok(());
        }
        let doing = format!(
            "saving {} cursors and {} windows to IndexedDB database {:?}",
            cursors.len(),
            windows.len(),
            self.name
        );
        let tx = self.readwrite(&doing)?;
        let done = transaction_done(&tx);
        let written = self.write_all(&doing, &tx, cursors).and_then(|written| {
            let (windows, bytes) = self.write_windows(&doing, &tx, cursors, windows)?;
            Ok((written, windows, bytes))
        });
        let (cursors, windows, bytes) = match written {
            Ok(written) => written,
            Err(error) => {
                // Roll back whatever was written; fails harmlessly if the
                // transaction is already aborting.
                let _ = tx.abort();
                let _ = done.await;
                return Err(error);
            }
        };
        commit(&tx);
        if done.await.is_err() {
            return Err(transaction_error(&doing, &tx));
        }
        let conn = &self.conn;
        conn.transactions.set(conn.transactions.get() + 1);
        conn.cursors_written
            .set(conn.cursors_written.get() + cursors);
        conn.windows_written
            .set(conn.windows_written.get() + windows);
        conn.window_bytes_written
            .set(conn.window_bytes_written.get() + bytes);
        Ok(())
    }
}

/// `globalThis.indexedDB`, if this context has one.
fn factory() -> Result<IdbFactory, StoreError> {
    match Reflect::get(&js_sys::global(), &"indexedDB".into()) {
        Ok(factory) if factory.is_object() => Ok(factory.unchecked_into()),
        Ok(_) => Err(StoreError::Unavailable(
            "IndexedDB is not available in this context (globalThis.indexedDB is missing: \
             private browsing, a sandboxed frame or a runtime without IndexedDB)"
                .into(),
        )),
        Err(e) => Err(match js_error("reading globalThis.indexedDB", &e) {
            StoreError::Backend { message, .. } => StoreError::Unavailable(format!(
                "IndexedDB is not available in this context: {message}"
            )),
            other => other,
        }),
    }
}

/// What opening a database that is not ours fails with.
fn foreign_database(name: &str) -> StoreError {
    StoreError::Corrupt {
        what: format!("IndexedDB database {name:?}"),
        detail: format!(
            "it has no object store {:?}: it belongs to something else",
            IdbStore::OBJECT_STORE
        ),
    }
}

fn object_store(doing: &str, tx: &IdbTransaction) -> Result<IdbObjectStore, StoreError> {
    tx.object_store(IdbStore::OBJECT_STORE)
        .map_err(|e| js_error(doing, &e))
}

fn clear_open_handlers(request: &web_sys::IdbOpenDbRequest) {
    request.set_onsuccess(None);
    request.set_onerror(None);
    request.set_onblocked(None);
    request.set_onupgradeneeded(None);
}

/// Settles with the request: `Ok` on `success`, `Err` on `error`. The
/// promise's own resolve/reject are the handlers, so nothing is leaked.
fn request_done(request: &IdbRequest) -> JsFuture {
    JsFuture::from(Promise::new(&mut |resolve, reject| {
        request.set_onsuccess(Some(&resolve));
        request.set_onerror(Some(&reject));
    }))
}

/// Settles with the transaction: `Ok` on `complete`, `Err` on `abort`
/// (which follows every failed request that aborts it).
fn transaction_done(tx: &IdbTransaction) -> JsFuture {
    JsFuture::from(Promise::new(&mut |resolve, reject| {
        tx.set_oncomplete(Some(&resolve));
        tx.set_onabort(Some(&reject));
    }))
}

/// `transaction.commit()`, where the browser has it: sends the commit now
/// instead of when the current task ends. Errors are left to the
/// transaction's own `abort` event.
fn commit(tx: &IdbTransaction) {
    if let Ok(commit) = Reflect::get(tx, &"commit".into())
        && let Some(commit) = commit.dyn_ref::<Function>()
    {
        let _ = commit.call0(tx);
    }
}

fn request_error(doing: &str, request: &IdbRequest) -> StoreError {
    match request.error() {
        Ok(Some(e)) => classify(doing, &e.name(), &e.message()),
        Ok(None) => StoreError::Backend {
            message: format!("{doing}: request failed without an error"),
            transient: true,
        },
        Err(e) => js_error(doing, &e),
    }
}

fn transaction_error(doing: &str, tx: &IdbTransaction) -> StoreError {
    match tx.error() {
        Some(e) => classify(doing, &e.name(), &e.message()),
        None => StoreError::Backend {
            message: format!("{doing}: the transaction was aborted"),
            transient: true,
        },
    }
}

/// Maps a thrown JavaScript value: a `DOMException` or `Error` by its name,
/// anything else by its text.
fn js_error(doing: &str, error: &JsValue) -> StoreError {
    let field = |name: &str| {
        Reflect::get(error, &name.into())
            .ok()
            .and_then(|v| v.as_string())
    };
    match (field("name"), field("message")) {
        (Some(name), message) => classify(doing, &name, &message.unwrap_or_default()),
        _ => StoreError::Backend {
            message: format!(
                "{doing}: {}",
                error.as_string().unwrap_or_else(|| format!("{error:?}"))
            ),
            transient: true,
        },
    }
}

/// The one mapping from exception names to [`StoreError`].
fn classify(doing: &str, name: &str, message: &str) -> StoreError {
    let text = format!("{doing}: {name}: {message}");
    match name {
        "QuotaExceededError" => StoreError::QuotaExceeded(text),
        "InvalidStateError" => StoreError::Unavailable(format!(
            "{text} (the database connection is closed or closing)"
        )),
        "SecurityError" => {
            StoreError::Unavailable(format!("{text} (IndexedDB is not allowed in this context)"))
        }
        _ => StoreError::Backend {
            message: text,
            transient: true,
        },
    }
}

/// The `type` of an event (`"blocked"`, `"error"`, ...).
fn event_type(event: &JsValue) -> String {
    Reflect::get(event, &"type".into())
        .ok()
        .and_then(|t| t.as_string())
        .unwrap_or_default()
}

/// The key of one entry: `[session, stream, seq]`.
fn entry_key(key: &StreamKey, seq: u64) -> JsValue {
    Array::of3(
        &key.session().into(),
        &key.stream().into(),
        &(seq as f64).into(),
    )
    .into()
}

/// `[session, stream]`: sorts before every entry key of the stream (a
/// shorter array with the same prefix is smaller).
fn stream_prefix(key: &StreamKey) -> JsValue {
    Array::of2(&key.session().into(), &key.stream().into()).into()
}

/// Every entry of a stream: from `[session, stream]` to
/// `[session, stream, []]` (an array sorts after every number).
fn entries_of(key: &StreamKey) -> Result<IdbKeyRange, JsValue> {
    let above = Array::of3(&key.session().into(), &key.stream().into(), &Array::new());
    IdbKeyRange::bound(&stream_prefix(key), &above)
}

/// `{ lastEventId, seq, at }`.
fn encode(cursor: &Cursor) -> Object {
    let value = Object::new();
    // Setting data properties on a fresh plain object cannot fail.
    let _ = Reflect::set(
        &value,
        &"lastEventId".into(),
        &cursor.last_event_id.as_str().into(),
    );
    let _ = Reflect::set(&value, &"seq".into(), &(cursor.seq as f64).into());
    let _ = Reflect::set(&value, &"at".into(), &(cursor.at.as_u64() as f64).into());
    value
}

/// Reads a stored value back; `Err` says what is wrong with it.
fn decode(key: &StreamKey, value: &JsValue) -> Result<Cursor, String> {
    if !value.is_object() {
        return Err(format!(
            "expected an object {{ lastEventId, seq, at }}, found a {}",
            value
                .js_typeof()
                .as_string()
                .unwrap_or_else(|| "value".into())
        ));
    }
    let field = |name: &str| Reflect::get(value, &name.into()).unwrap_or(JsValue::UNDEFINED);
    let last_event_id = field("lastEventId")
        .as_string()
        .ok_or("lastEventId is missing or not a string")?;
    let whole = |name: &str| {
        let n = field(name)
            .as_f64()
            .ok_or_else(|| format!("{name} is missing or not a number"))?;
        if (0.0..=MAX_SAFE_INTEGER).contains(&n) && n.fract() == 0.0 {
            Ok(n as u64)
        } else {
            // JavaScript's own formatting: Rust's float formatting would
            // add 7 KB to the package for this one message.
            let shown = js_sys::Number::from(n)
                .to_string_with_radix(10)
                .map_or_else(|_| "NaN".into(), String::from);
            Err(format!(
                "{name} is {shown}, not a whole number in 0..=2^53-1"
            ))
        }
    };
    Ok(Cursor {
        key: key.clone(),
        last_event_id,
        seq: whole("seq")?,
        at: Millis(whole("at")?),
    })
}
