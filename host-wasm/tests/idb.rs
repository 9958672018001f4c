//! `IdbStore` against the real IndexedDB of headless Chromium.
#![cfg(target_arch = "wasm32")]

use futures::future::{Either, select};
use gloo_timers::future::TimeoutFuture;
use js_sys::{Array, Function, Object, Promise, Reflect};
use std::cell::Cell;
use std::future::Future;
use std::rc::Rc;
use tidemark_core::{
    Clock, Config, Cursor, EventTracker, Millis, Registry, Store, StoreError, StreamKey,
    TrackerConfig, persistence,
};
use tidemark_wasm::{BrowserClock, IdbStore};
use wasm_bindgen::closure::Closure;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use wasm_bindgen_futures::spawn_local;
use wasm_bindgen_test::{wasm_bindgen_test, wasm_bindgen_test_configure};
use web_sys::{DomException, IdbDatabase, IdbFactory, IdbRequest};

wasm_bindgen_test_configure!(run_in_browser);

/// A database name no other test (or earlier run) uses.
fn unique(test: &str) -> String {
    format!(
        "tidemark-test-{test}-{}",
        (js_sys::Math::random() * 1e15) as u64
    )
}

fn key(stream: &str) -> StreamKey {
    StreamKey::new("session-1", stream)
}

fn cursor(stream: &str, id: &str, seq: u64) -> Cursor {
    Cursor {
        key: key(stream),
        last_event_id: id.into(),
        seq,
        at: Millis(1_700_000_000_000 + seq),
    }
}

/// Fails the test instead of hanging when `future` does not finish in time.
async fn within<T>(ms: u32, what: &str, future: impl Future<Output = T>) -> T {
    match select(Box::pin(future), TimeoutFuture::new(ms)).await {
        Either::Left((value, _)) => value,
        Either::Right(_) => panic!("{what} did not finish within {ms} ms"),
    }
}

fn factory() -> IdbFactory {
    Reflect::get(&js_sys::global(), &"indexedDB".into())
        .unwrap()
        .unchecked_into()
}

/// Waits for `success` (Ok) or `error` (Err) of a request.
async fn settle(request: &IdbRequest) -> Result<JsValue, JsValue> {
    JsFuture::from(Promise::new(&mut |resolve, reject| {
        request.set_onsuccess(Some(&resolve));
        request.set_onerror(Some(&reject));
    }))
    .await?;
    request.result()
}

/// Opens `name` at `version` with plain web-sys, creating `stores` on
/// upgrade. Returns the connection and whether a `blocked` event fired.
async fn raw_open(name: &str, version: u32, stores: &[&'static str]) -> (IdbDatabase, bool) {
    let request = factory().open_with_u32(name, version).unwrap();
    let stores = stores.to_vec();
    let upgrade = {
        let request = request.clone();
        Closure::<dyn FnMut(JsValue)>::once(move |_event: JsValue| {
            let db: IdbDatabase = request.result().unwrap().unchecked_into();
            for store in stores {
                if !db.object_store_names().contains(store) {
                    db.create_object_store(store).unwrap();
                }
            }
        })
    };
    let blocked = Rc::new(Cell::new(false));
    let on_blocked = {
        let blocked = blocked.clone();
        Closure::<dyn FnMut(JsValue)>::new(move |_event: JsValue| blocked.set(true))
    };
    request.set_onupgradeneeded(Some(upgrade.as_ref().unchecked_ref()));
    request.set_onblocked(Some(on_blocked.as_ref().unchecked_ref()));
    let db = within(5000, "raw open", settle(&request))
        .await
        .expect("raw open");
    request.set_onupgradeneeded(None);
    request.set_onblocked(None);
    (db.unchecked_into(), blocked.get())
}

/// Runs one request in its own transaction on `db` and returns its result.
async fn raw_request(
    db: &IdbDatabase,
    readwrite: bool,
    run: impl FnOnce(&web_sys::IdbObjectStore) -> IdbRequest,
) -> JsValue {
    let tx = if readwrite {
        db.transaction_with_str_and_mode(
            IdbStore::OBJECT_STORE,
            web_sys::IdbTransactionMode::Readwrite,
        )
    } else {
        db.transaction_with_str(IdbStore::OBJECT_STORE)
    }
    .unwrap();
    let request = run(&tx.object_store(IdbStore::OBJECT_STORE).unwrap());
    settle(&request).await.expect("raw request")
}

/// The key of a stored entry: `[session, stream, seq]`.
fn raw_key(stream: &str, seq: u32) -> JsValue {
    Array::of3(&"session-1".into(), &stream.into(), &seq.into()).into()
}

fn object(fields: &[(&str, JsValue)]) -> JsValue {
    let object = Object::new();
    for (name, value) in fields {
        Reflect::set(&object, &(*name).into(), value).unwrap();
    }
    object.into()
}

/// Deletes a test database; fails when a connection keeps blocking it.
async fn delete_db(name: &str) {
    within(
        5000,
        "deleting the database",
        IdbStore::delete_database(name),
    )
    .await
    .expect("delete database");
}

#[wasm_bindgen_test]
async fn save_load_delete_round_trip() {
    let name = unique("round-trip");
    let store = IdbStore::open(&name).await.unwrap();
    assert_eq!(store.name(), name);
    assert_eq!(store.load(&key("a")).await.unwrap(), None);

    let a = cursor("a", "evt-ü-1", 1);
    let b = cursor("b", "", 2);
    store.save_batch(&[a.clone(), b.clone()]).await.unwrap();
    assert_eq!(store.load(&key("a")).await.unwrap(), Some(a));
    assert_eq!(store.load(&key("b")).await.unwrap(), Some(b.clone()));
    // The key is the pair, not either half.
    assert_eq!(
        store.load(&StreamKey::new("session-2", "a")).await.unwrap(),
        None
    );

    store.delete(&key("a")).await.unwrap();
    assert_eq!(store.load(&key("a")).await.unwrap(), None);
    assert_eq!(store.load(&key("b")).await.unwrap(), Some(b));
    // Deleting a missing key is not an error.
    store.delete(&key("missing")).await.unwrap();
    assert_eq!(store.transactions(), 3);
    assert_eq!(store.cursors_written(), 2);
    // An empty batch opens no transaction.
    store.save_batch(&[]).await.unwrap();
    assert_eq!(store.transactions(), 3);

    // The stored value is the documented plain object.
    drop(store);
    let (db, _) = raw_open(&name, IdbStore::VERSION, &[]).await;
    let raw = raw_request(&db, false, |s| s.get(&raw_key("b", 2)).unwrap()).await;
    assert_eq!(
        Reflect::get(&raw, &"lastEventId".into()).unwrap(),
        JsValue::from_str("")
    );
    assert_eq!(Reflect::get(&raw, &"seq".into()).unwrap(), 2.0);
    assert_eq!(
        Reflect::get(&raw, &"at".into()).unwrap(),
        1_700_000_000_002.0
    );
    db.close();
    delete_db(&name).await;
}

#[wasm_bindgen_test]
async fn an_older_seq_never_overwrites_a_newer_one() {
    let name = unique("seq-guard");
    let store = IdbStore::open(&name).await.unwrap();
    store.save_batch(&[cursor("a", "5", 5)]).await.unwrap();
    store.save_batch(&[cursor("a", "3", 3)]).await.unwrap();
    assert_eq!(
        store.load(&key("a")).await.unwrap(),
        Some(cursor("a", "5", 5))
    );
    // Mixed batch: the stale cursor stays hidden, the fresh one is written.
    store
        .save_batch(&[cursor("a", "4", 4), cursor("b", "1", 1)])
        .await
        .unwrap();
    assert_eq!(
        store.load(&key("a")).await.unwrap(),
        Some(cursor("a", "5", 5))
    );
    assert_eq!(
        store.load(&key("b")).await.unwrap(),
        Some(cursor("b", "1", 1))
    );
    store.save_batch(&[cursor("a", "6", 6)]).await.unwrap();
    assert_eq!(
        store.load(&key("a")).await.unwrap(),
        Some(cursor("a", "6", 6))
    );
    // Two cursors of one key in a batch: the higher seq wins, in any order.
    store
        .save_batch(&[cursor("a", "9", 9), cursor("a", "8", 8)])
        .await
        .unwrap();
    assert_eq!(
        store.load(&key("a")).await.unwrap(),
        Some(cursor("a", "9", 9))
    );
    assert_eq!(store.transactions(), 5);
    assert_eq!(store.cursors_written(), 7, "a5, a3, a4, b1, a6, a9, a8");
    // What is left: older entries are deleted by the write of a newer one
    // (a8, written after a9 in the same batch, stays until the next write).
    drop(store);
    let (db, _) = raw_open(&name, IdbStore::VERSION, &[]).await;
    let all = raw_request(&db, false, |s| s.get_all_keys().unwrap()).await;
    assert_eq!(Array::from(&all).length(), 3, "a8, a9, b1: {all:?}");
    db.close();
    delete_db(&name).await;
}

#[wasm_bindgen_test]
async fn concurrent_batches_keep_the_highest_seq() {
    let name = unique("concurrent");
    let first = IdbStore::open(&name).await.unwrap();
    let second = IdbStore::open(&name).await.unwrap();
    // Issued together from two connections: IndexedDB runs them one after
    // the other, and the guard holds whichever runs last.
    let newer = [cursor("a", "10", 10)];
    let older = [cursor("a", "7", 7)];
    let (x, y) = futures::future::join(first.save_batch(&newer), second.save_batch(&older)).await;
    x.unwrap();
    y.unwrap();
    assert_eq!(
        second.load(&key("a")).await.unwrap(),
        Some(cursor("a", "10", 10))
    );
    drop((first, second));
    delete_db(&name).await;
}

#[wasm_bindgen_test]
async fn a_batch_of_many_cursors_is_one_transaction() {
    let name = unique("batch");
    let store = IdbStore::open(&name).await.unwrap();
    let batch: Vec<Cursor> = (0..300)
        .map(|i| cursor(&format!("stream-{i}"), &format!("id-{i}"), i + 1))
        .collect();
    store.save_batch(&batch).await.unwrap();
    assert_eq!(store.transactions(), 1);
    assert_eq!(store.cursors_written(), 300);
    for expected in &batch {
        assert_eq!(
            store.load(&expected.key).await.unwrap().as_ref(),
            Some(expected)
        );
    }
    // Read-only loads are not counted.
    assert_eq!(store.transactions(), 1);

    // Every cursor moved: still one transaction for the batch.
    let next: Vec<Cursor> = batch
        .iter()
        .map(|c| Cursor {
            seq: c.seq + 1000,
            ..c.clone()
        })
        .collect();
    store.save_batch(&next).await.unwrap();
    assert_eq!(store.transactions(), 2);
    assert_eq!(store.cursors_written(), 600);
    assert_eq!(
        store.load(&next[150].key).await.unwrap(),
        Some(next[150].clone())
    );
    drop(store);
    delete_db(&name).await;
}

#[wasm_bindgen_test]
async fn a_closed_store_errors_and_a_reopened_one_sees_the_data() {
    let name = unique("reopen");
    let store = IdbStore::open(&name).await.unwrap();
    store.save_batch(&[cursor("a", "42", 42)]).await.unwrap();
    assert!(!store.is_closed());
    store.close();
    assert!(store.is_closed());
    for error in [
        store
            .save_batch(&[cursor("a", "43", 43)])
            .await
            .unwrap_err(),
        store.load(&key("a")).await.unwrap_err(),
        store.delete(&key("a")).await.unwrap_err(),
    ] {
        let StoreError::Unavailable(message) = &error else {
            panic!("expected Unavailable, got {error:?}");
        };
        assert!(message.contains("the store was closed"), "{message}");
        assert!(error.is_transient());
    }
    drop(store);

    let store = IdbStore::open(&name).await.unwrap();
    assert_eq!(
        store.load(&key("a")).await.unwrap(),
        Some(cursor("a", "42", 42))
    );
    drop(store);
    delete_db(&name).await;
}

#[wasm_bindgen_test]
async fn dropping_the_store_closes_its_connection() {
    let name = unique("drop");
    let store = IdbStore::open(&name).await.unwrap();
    store.save_batch(&[cursor("a", "1", 1)]).await.unwrap();
    drop(store);
    // Drop also unregisters onversionchange: only an actual close lets this
    // upgrade through without a `blocked` event.
    let (db, blocked) = raw_open(&name, IdbStore::VERSION + 1, &[]).await;
    assert!(!blocked, "a dropped store must not block an upgrade");
    assert_eq!(db.version(), f64::from(IdbStore::VERSION + 1));
    db.close();
    delete_db(&name).await;
}

#[wasm_bindgen_test]
async fn stores_on_distinct_databases_are_independent() {
    let (one, two) = (unique("one"), unique("two"));
    let first = IdbStore::open(&one).await.unwrap();
    let second = IdbStore::open(&two).await.unwrap();
    first.save_batch(&[cursor("a", "1", 1)]).await.unwrap();
    second.save_batch(&[cursor("a", "2", 2)]).await.unwrap();
    second.save_batch(&[cursor("b", "3", 3)]).await.unwrap();
    assert_eq!(
        first.load(&key("a")).await.unwrap(),
        Some(cursor("a", "1", 1))
    );
    assert_eq!(
        second.load(&key("a")).await.unwrap(),
        Some(cursor("a", "2", 2))
    );
    assert_eq!(first.load(&key("b")).await.unwrap(), None);
    first.delete(&key("a")).await.unwrap();
    assert_eq!(
        second.load(&key("a")).await.unwrap(),
        Some(cursor("a", "2", 2))
    );
    assert_eq!((first.transactions(), second.transactions()), (2, 2));
    // Closing one leaves the other working.
    first.close();
    second.save_batch(&[cursor("a", "4", 4)]).await.unwrap();
    drop((first, second));
    delete_db(&one).await;
    delete_db(&two).await;
}

#[wasm_bindgen_test]
async fn a_database_at_a_higher_version_is_refused_clearly() {
    let name = unique("newer");
    let (db, _) = raw_open(&name, IdbStore::VERSION + 1, &[IdbStore::OBJECT_STORE]).await;
    db.close();
    let error = IdbStore::open(&name).await.unwrap_err();
    let StoreError::Corrupt { what, detail } = &error else {
        panic!("expected Corrupt, got {error:?}");
    };
    assert!(what.contains(&name), "{what}");
    assert!(detail.contains("higher version"), "{detail}");
    assert!(!error.is_transient());
    // Left untouched.
    let (db, _) = raw_open(&name, IdbStore::VERSION + 1, &[]).await;
    assert_eq!(db.version(), f64::from(IdbStore::VERSION + 1));
    db.close();
    delete_db(&name).await;
}

#[wasm_bindgen_test]
async fn a_foreign_database_without_the_object_store_is_refused() {
    let name = unique("foreign");
    let (db, _) = raw_open(&name, 1, &["something-else"]).await;
    db.close();
    let error = IdbStore::open(&name).await.unwrap_err();
    let StoreError::Corrupt { detail, .. } = &error else {
        panic!("expected Corrupt, got {error:?}");
    };
    assert!(detail.contains("no object store"), "{detail}");
    // Left untouched: not upgraded to our version, nothing of ours added.
    let (db, _) = raw_open(&name, 1, &[]).await;
    assert_eq!(db.version(), 1.0);
    assert!(!db.object_store_names().contains(IdbStore::RESUME_STORE));
    db.close();
    // Our connection was closed: deleting is not blocked.
    within(5000, "delete", delete_db(&name)).await;
}

#[wasm_bindgen_test]
async fn wrongly_shaped_values_are_corrupt_until_a_newer_cursor_replaces_them() {
    let name = unique("corrupt");
    let store = IdbStore::open(&name).await.unwrap();
    drop(store);
    let (db, _) = raw_open(&name, IdbStore::VERSION, &[]).await;
    let shapes: [(&str, JsValue); 6] = [
        ("string", JsValue::from_str("not an object")),
        (
            "id-number",
            object(&[
                ("lastEventId", 5.into()),
                ("seq", 1.into()),
                ("at", 1.into()),
            ]),
        ),
        (
            "seq-string",
            object(&[
                ("lastEventId", "x".into()),
                ("seq", "1".into()),
                ("at", 1.into()),
            ]),
        ),
        (
            "seq-negative",
            object(&[
                ("lastEventId", "x".into()),
                ("seq", (-1).into()),
                ("at", 1.into()),
            ]),
        ),
        (
            "seq-fraction",
            object(&[
                ("lastEventId", "x".into()),
                ("seq", 1.5.into()),
                ("at", 1.into()),
            ]),
        ),
        (
            "at-missing",
            object(&[("lastEventId", "x".into()), ("seq", 1.into())]),
        ),
    ];
    for (stream, value) in &shapes {
        raw_request(&db, true, |s| {
            s.put_with_key(value, &raw_key(stream, 1)).unwrap()
        })
        .await;
    }
    db.close();

    let store = IdbStore::open(&name).await.unwrap();
    for (stream, _) in &shapes {
        let error = store.load(&key(stream)).await.unwrap_err();
        let StoreError::Corrupt { what, detail } = &error else {
            panic!("{stream}: expected Corrupt, got {error:?}");
        };
        assert!(what.contains(stream), "{what}");
        assert!(!detail.is_empty());
    }
    // Writes never read (so that a flush on `pagehide` is issued at
    // once): a newer cursor replaces the unreadable entry below it, and
    // the other corrupt entries stay for someone to see.
    store
        .save_batch(&[cursor("fresh", "1", 1), cursor("seq-string", "9", 9)])
        .await
        .unwrap();
    assert_eq!(
        store.load(&key("seq-string")).await.unwrap(),
        Some(cursor("seq-string", "9", 9))
    );
    assert_eq!(
        store.load(&key("fresh")).await.unwrap(),
        Some(cursor("fresh", "1", 1))
    );
    assert!(matches!(
        store.load(&key("seq-negative")).await,
        Err(StoreError::Corrupt { .. })
    ));
    drop(store);
    delete_db(&name).await;
}

#[wasm_bindgen_test]
async fn a_missing_indexeddb_is_reported_as_unavailable() {
    let global: Object = js_sys::global();
    let name = JsValue::from_str("indexedDB");
    let own = Object::get_own_property_descriptor(&global, &name);
    // In Chromium `indexedDB` is an own, configurable accessor of the global
    // object (window or worker scope), so it can be shadowed and restored.
    assert!(own.is_object(), "indexedDB is not an own property here");
    assert_eq!(
        Reflect::get(&own, &"configurable".into()).unwrap(),
        JsValue::TRUE
    );
    let undefined = object(&[
        ("value", JsValue::UNDEFINED),
        ("configurable", JsValue::TRUE),
        ("writable", JsValue::TRUE),
    ]);
    Object::define_property(&global, &name, undefined.unchecked_ref());
    assert!(
        Reflect::get(&global, &name).unwrap().is_undefined(),
        "indexedDB was not hidden"
    );
    let result = IdbStore::open(&unique("missing")).await;
    let deleted = IdbStore::delete_database("tidemark-never-created").await;
    Object::define_property(&global, &name, own.unchecked_ref());
    assert!(
        Reflect::get(&global, &name).unwrap().is_object(),
        "restored"
    );

    let error = result.unwrap_err();
    let StoreError::Unavailable(message) = &error else {
        panic!("expected Unavailable, got {error:?}");
    };
    assert!(
        message.contains("IndexedDB is not available in this context"),
        "{message}"
    );
    assert!(
        matches!(deleted, Err(StoreError::Unavailable(_))),
        "{deleted:?}"
    );
}

#[wasm_bindgen_test]
async fn an_upgrade_elsewhere_closes_the_store_without_being_blocked() {
    let name = unique("versionchange");
    let store = IdbStore::open(&name).await.unwrap();
    store.save_batch(&[cursor("a", "1", 1)]).await.unwrap();

    // "Another tab": a second connection asking for the next version.
    let (db, blocked) = within(
        5000,
        "upgrade",
        raw_open(&name, IdbStore::VERSION + 1, &["more"]),
    )
    .await;
    assert!(
        !blocked,
        "the store must close before the upgrade is blocked"
    );
    assert_eq!(db.version(), f64::from(IdbStore::VERSION + 1));
    assert!(store.is_closed());

    let error = store.save_batch(&[cursor("a", "2", 2)]).await.unwrap_err();
    let StoreError::Unavailable(message) = &error else {
        panic!("expected Unavailable, got {error:?}");
    };
    assert!(message.contains("version change"), "{message}");
    assert!(matches!(
        store.load(&key("a")).await,
        Err(StoreError::Unavailable(_))
    ));
    // The upgrade kept the data.
    let raw = raw_request(&db, false, |s| s.get(&raw_key("a", 1)).unwrap()).await;
    assert_eq!(Reflect::get(&raw, &"seq".into()).unwrap(), 1.0);
    db.close();
    drop(store);
    delete_db(&name).await;
}

#[wasm_bindgen_test]
async fn deleting_the_database_closes_open_stores() {
    let name = unique("delete-db");
    let store = IdbStore::open(&name).await.unwrap();
    store.save_batch(&[cursor("a", "1", 1)]).await.unwrap();
    within(5000, "delete", IdbStore::delete_database(&name))
        .await
        .unwrap();
    assert!(store.is_closed());
    let store = IdbStore::open(&name).await.unwrap();
    assert_eq!(store.load(&key("a")).await.unwrap(), None);
    drop(store);
    delete_db(&name).await;
}

#[wasm_bindgen_test]
fn dom_exceptions_map_onto_store_errors() {
    let map = |name: &str, message: &str| {
        let exception = DomException::new_with_message_and_name(message, name).unwrap();
        assert_eq!(exception.name(), name);
        IdbStore::error_from_dom_exception(&exception)
    };
    let StoreError::QuotaExceeded(message) = map("QuotaExceededError", "disk full") else {
        panic!("QuotaExceededError must map to QuotaExceeded");
    };
    assert!(message.contains("disk full"), "{message}");

    let error = map("InvalidStateError", "The database connection is closing.");
    let StoreError::Unavailable(message) = &error else {
        panic!("InvalidStateError must map to Unavailable, got {error:?}");
    };
    assert!(message.contains("connection is closing"), "{message}");
    assert!(matches!(
        map("SecurityError", "denied"),
        StoreError::Unavailable(_)
    ));

    for name in [
        "UnknownError",
        "AbortError",
        "DataError",
        "TransactionInactiveError",
    ] {
        let error = map(name, "something broke");
        let StoreError::Backend { message, transient } = &error else {
            panic!("{name} must map to Backend, got {error:?}");
        };
        assert!(*transient, "{name}");
        assert!(message.contains(name), "{message}");
        assert!(message.contains("something broke"), "{message}");
    }
}

/// Documents what the store relies on: Chromium takes the `durability`
/// option and has `IDBTransaction.commit()`.
#[wasm_bindgen_test]
async fn chromium_has_relaxed_durability_and_commit() {
    let name = unique("features");
    let store = IdbStore::open(&name).await.unwrap();
    drop(store);
    let (db, _) = raw_open(&name, IdbStore::VERSION, &[]).await;
    let transaction: Function = Reflect::get(&db, &"transaction".into())
        .unwrap()
        .unchecked_into();
    let options = object(&[("durability", "relaxed".into())]);
    let tx = transaction
        .call3(
            &db,
            &IdbStore::OBJECT_STORE.into(),
            &"readwrite".into(),
            &options,
        )
        .unwrap();
    assert_eq!(
        Reflect::get(&tx, &"durability".into()).unwrap(),
        JsValue::from_str("relaxed")
    );
    assert!(Reflect::get(&tx, &"commit".into()).unwrap().is_function());
    db.close();
    delete_db(&name).await;
}

#[wasm_bindgen_test]
async fn resume_urls_round_trip_and_are_kept_apart_from_cursors() {
    let name = unique("resume");
    let store = IdbStore::open(&name).await.unwrap();
    assert_eq!(store.load_resume_url(&key("a")).await.unwrap(), None);
    let url = "http://127.0.0.1:1/_tidemark/streams/t1";
    store
        .save_resume_url(&key("a"), url, Millis(1_700_000_000_000))
        .await
        .unwrap();
    store.save_batch(&[cursor("a", "t1-3", 3)]).await.unwrap();
    assert_eq!(
        store.load_resume_url(&key("a")).await.unwrap().as_deref(),
        Some(url)
    );
    assert_eq!(store.load_resume_url(&key("b")).await.unwrap(), None);
    assert_eq!(
        store.load(&key("a")).await.unwrap(),
        Some(cursor("a", "t1-3", 3)),
        "the resume URL is no cursor entry"
    );
    // Another connection (the next page) reads it.
    drop(store);
    let store = IdbStore::open(&name).await.unwrap();
    assert_eq!(
        store.load_resume_url(&key("a")).await.unwrap().as_deref(),
        Some(url)
    );
    store
        .save_resume_url(&key("a"), "http://x/2", Millis(1))
        .await
        .unwrap();
    assert_eq!(
        store.load_resume_url(&key("a")).await.unwrap().as_deref(),
        Some("http://x/2"),
        "replaced"
    );
    store.delete_resume_url(&key("a")).await.unwrap();
    assert_eq!(store.load_resume_url(&key("a")).await.unwrap(), None);
    assert_eq!(
        store.load(&key("a")).await.unwrap(),
        Some(cursor("a", "t1-3", 3)),
        "deleting the resume URL leaves the cursor"
    );
    drop(store);
    delete_db(&name).await;
}

#[wasm_bindgen_test]
async fn a_version_1_database_is_upgraded_with_its_cursors_kept() {
    let name = unique("upgrade");
    // What an earlier build made: version 1, cursors only, one cursor.
    let (db, _) = raw_open(&name, 1, &[IdbStore::OBJECT_STORE]).await;
    let value = object(&[
        ("lastEventId", "7".into()),
        ("seq", 4.into()),
        ("at", 1_700_000_000_004.0.into()),
    ]);
    let tx = db
        .transaction_with_str_and_mode(
            IdbStore::OBJECT_STORE,
            web_sys::IdbTransactionMode::Readwrite,
        )
        .unwrap();
    tx.object_store(IdbStore::OBJECT_STORE)
        .unwrap()
        .put_with_key(&value, &raw_key("a", 4))
        .unwrap();
    // Closed only once the write is done: a connection closing with a
    // transaction still running blocks the upgrade.
    JsFuture::from(Promise::new(&mut |resolve, reject| {
        tx.set_oncomplete(Some(&resolve));
        tx.set_onabort(Some(&reject));
    }))
    .await
    .expect("the version 1 write");
    db.close();

    let store = IdbStore::open(&name).await.unwrap();
    assert_eq!(
        store.load(&key("a")).await.unwrap(),
        Some(cursor("a", "7", 4)),
        "the cursor survives the upgrade"
    );
    assert_eq!(store.load_resume_url(&key("a")).await.unwrap(), None);
    store
        .save_resume_url(&key("a"), "http://x/r", Millis(5))
        .await
        .unwrap();
    drop(store);
    let (db, _) = raw_open(&name, IdbStore::VERSION, &[]).await;
    assert_eq!(db.version(), f64::from(IdbStore::VERSION));
    assert!(db.object_store_names().contains(IdbStore::RESUME_STORE));
    let tx = db.transaction_with_str(IdbStore::RESUME_STORE).unwrap();
    let request = tx
        .object_store(IdbStore::RESUME_STORE)
        .unwrap()
        .get(&Array::of2(&"session-1".into(), &"a".into()))
        .unwrap();
    let raw = settle(&request).await.unwrap();
    assert_eq!(
        Reflect::get(&raw, &"url".into())
            .unwrap()
            .as_string()
            .as_deref(),
        Some("http://x/r"),
        "stored as {{ url, at }} under [session, stream]"
    );
    db.close();
    delete_db(&name).await;
}

/// One page's persistence: a registry over an `IdbStore` of `name`, its
/// worker running.
struct Page {
    store: Rc<IdbStore>,
    registry: Registry<Rc<IdbStore>>,
    clock: BrowserClock,
}

impl Page {
    async fn start(name: &str) -> Page {
        let store = Rc::new(IdbStore::open(name).await.unwrap());
        let clock = BrowserClock::new();
        let (registry, worker) = persistence(store.clone(), clock.clone(), Config::default());
        spawn_local(async move {
            worker.run().await;
        });
        Page {
            store,
            registry,
            clock,
        }
    }

    /// Feeds `ids` as a server sends them; returns those delivered.
    fn feed(&self, tracker: &mut EventTracker, ids: &[String]) -> Vec<String> {
        let mut delivered = Vec::new();
        for id in ids {
            if tracker.observe(Some(id), self.clock.now()).is_fresh() {
                delivered.push(id.clone());
                tracker.commit();
            }
        }
        delivered
    }

    /// A graceful stop: everything committed is written.
    async fn stop(self) -> Rc<IdbStore> {
        let deadline = self.clock.now() + Millis(5000);
        let report = within(6000, "shutdown", self.registry.shutdown(deadline))
            .await
            .unwrap();
        assert!(report.is_complete());
        self.store
    }
}

fn ids(range: std::ops::RangeInclusive<u64>) -> Vec<String> {
    range.map(|n| n.to_string()).collect()
}

/// Ids that are not decimal numbers: the window keeps their fingerprints.
fn uuids(range: std::ops::RangeInclusive<u64>) -> Vec<String> {
    range
        .map(|n| format!("5f0c{n:04x}-4b1e-4c7a-9d2e-{:012x}", n * 2_654_435_761))
        .collect()
}

#[wasm_bindgen_test]
async fn a_window_survives_a_reopen_so_a_rewinding_server_repeats_nothing() {
    let name = unique("window");
    for make in [ids as fn(_) -> Vec<String>, uuids] {
        IdbStore::delete_database(&name).await.unwrap();
        let page = Page::start(&name).await;
        let mut tracker = page.registry.open(key("a")).await.unwrap();
        assert_eq!(page.feed(&mut tracker, &make(1..=100)), make(1..=100));
        let before = page.store.transactions();
        page.registry.worker().flush().await.unwrap();
        assert_eq!(
            page.store.transactions(),
            before + 1,
            "cursors and windows in one transaction"
        );
        assert!(page.store.windows_written() >= 1);
        drop(tracker);
        let store = page.stop().await;
        let bytes = store.window_bytes_written();
        assert!(bytes > 0);
        drop(store);

        // The next page: the server sends the last 30 again, then more.
        let page = Page::start(&name).await;
        let mut tracker = page.registry.open(key("a")).await.unwrap();
        assert_eq!(
            tracker.last_event_id(),
            make(100..=100).first().map(|s| &**s)
        );
        let delivered = page.feed(&mut tracker, &[make(71..=100), make(101..=110)].concat());
        assert_eq!(delivered, make(101..=110), "no replay delivered again");
        drop(tracker);
        drop(page.stop().await);
    }
    delete_db(&name).await;
}

#[wasm_bindgen_test]
async fn without_its_window_a_reopened_stream_would_repeat_the_replay() {
    // The test above can fail: a tracker resuming from the cursor alone
    // (what the store did before windows) delivers the replay again.
    let name = unique("no-window");
    let page = Page::start(&name).await;
    let mut tracker = page.registry.open(key("a")).await.unwrap();
    page.feed(&mut tracker, &ids(1..=100));
    drop(tracker);
    let store = page.stop().await;
    let cursor = store.load(&key("a")).await.unwrap().unwrap();
    let mut bare = EventTracker::new(key("a"), TrackerConfig::default());
    bare.seed(&cursor);
    let delivered: Vec<String> = ids(71..=100)
        .into_iter()
        .filter(|id| bare.observe(Some(id), Millis(1)).is_fresh())
        .collect();
    assert_eq!(delivered, ids(71..=99));
    drop(store);
    delete_db(&name).await;
}

#[wasm_bindgen_test]
async fn delete_forgets_the_window() {
    let name = unique("window-delete");
    let page = Page::start(&name).await;
    let mut tracker = page.registry.open(key("a")).await.unwrap();
    page.feed(&mut tracker, &ids(1..=10));
    drop(tracker);
    let store = page.stop().await;
    assert_eq!(
        store.load_window(&key("a")).await.unwrap().unwrap().len(),
        10
    );
    store.delete(&key("a")).await.unwrap();
    assert_eq!(store.load_window(&key("a")).await.unwrap(), None);
    drop(store);
    let store = IdbStore::open(&name).await.unwrap();
    assert_eq!(store.load_window(&key("a")).await.unwrap(), None);
    assert_eq!(store.load(&key("a")).await.unwrap(), None);
    drop(store);
    delete_db(&name).await;
}

#[wasm_bindgen_test]
async fn the_window_key_is_made_once_and_stays_across_reopens() {
    let name = unique("window-key");
    // Two tabs opening the new database at once agree on one key.
    let (first, second) = futures::future::join(IdbStore::open(&name), IdbStore::open(&name)).await;
    let (first, second) = (first.unwrap(), second.unwrap());
    let (a, b) = futures::future::join(first.window_key(), second.window_key()).await;
    let key = a.unwrap().expect("IdbStore keeps windows");
    assert_eq!(b.unwrap(), Some(key));
    drop((first, second));
    let store = IdbStore::open(&name).await.unwrap();
    assert_eq!(store.window_key().await.unwrap(), Some(key));
    drop(store);
    // Stored as 16 bytes under "windowKey", and nowhere else.
    let (db, _) = raw_open(&name, IdbStore::VERSION, &[]).await;
    let tx = db.transaction_with_str(IdbStore::META_STORE).unwrap();
    let meta = tx.object_store(IdbStore::META_STORE).unwrap();
    let raw = settle(&meta.get(&"windowKey".into()).unwrap())
        .await
        .unwrap();
    let bytes: Vec<u8> = raw.unchecked_into::<js_sys::Uint8Array>().to_vec();
    assert_eq!(bytes, key.to_bytes());
    let count = settle(&meta.count().unwrap()).await.unwrap();
    assert_eq!(count.as_f64(), Some(1.0));
    db.close();
    // A new database has a new key.
    delete_db(&name).await;
    let store = IdbStore::open(&name).await.unwrap();
    assert_ne!(store.window_key().await.unwrap(), Some(key));
    drop(store);
    delete_db(&name).await;
}

#[wasm_bindgen_test]
async fn a_version_2_database_is_upgraded_and_its_windowless_cursor_resumes() {
    let name = unique("upgrade-2");
    // What the previous build made: version 2, cursors and resume URLs.
    let (db, _) = raw_open(&name, 2, &[IdbStore::OBJECT_STORE, IdbStore::RESUME_STORE]).await;
    let value = object(&[
        ("lastEventId", "40".into()),
        ("seq", 40.into()),
        ("at", 1_700_000_000_040.0.into()),
    ]);
    let tx = db
        .transaction_with_str_and_mode(
            IdbStore::OBJECT_STORE,
            web_sys::IdbTransactionMode::Readwrite,
        )
        .unwrap();
    tx.object_store(IdbStore::OBJECT_STORE)
        .unwrap()
        .put_with_key(&value, &raw_key("a", 40))
        .unwrap();
    // Closed only once the write is done (see the version 1 test).
    JsFuture::from(Promise::new(&mut |resolve, reject| {
        tx.set_oncomplete(Some(&resolve));
        tx.set_onabort(Some(&reject));
    }))
    .await
    .expect("the version 2 write");
    db.close();

    let page = Page::start(&name).await;
    assert!(page.store.window_key().await.unwrap().is_some());
    assert_eq!(page.store.load_window(&key("a")).await.unwrap(), None);
    let mut tracker = page.registry.open(key("a")).await.unwrap();
    assert_eq!(tracker.last_event_id(), Some("40"));
    // Resumes: the cursor's id is known, what follows is delivered.
    assert_eq!(page.feed(&mut tracker, &ids(40..=50)), ids(41..=50));
    drop(tracker);
    drop(page.stop().await);

    // From now on it keeps the window.
    let page = Page::start(&name).await;
    let mut tracker = page.registry.open(key("a")).await.unwrap();
    assert_eq!(page.feed(&mut tracker, &ids(41..=55)), ids(51..=55));
    drop(tracker);
    drop(page.stop().await);
    let (db, _) = raw_open(&name, IdbStore::VERSION, &[]).await;
    assert_eq!(db.version(), 3.0);
    for store in [
        IdbStore::WINDOW_STORE,
        IdbStore::META_STORE,
        IdbStore::RESUME_STORE,
    ] {
        assert!(db.object_store_names().contains(store), "{store}");
    }
    db.close();
    delete_db(&name).await;
}

#[wasm_bindgen_test]
async fn a_stored_window_of_the_wrong_shape_is_corrupt() {
    let name = unique("window-corrupt");
    drop(IdbStore::open(&name).await.unwrap());
    let (db, _) = raw_open(&name, IdbStore::VERSION, &[]).await;
    let tx = db
        .transaction_with_str_and_mode(
            IdbStore::WINDOW_STORE,
            web_sys::IdbTransactionMode::Readwrite,
        )
        .unwrap();
    let windows = tx.object_store(IdbStore::WINDOW_STORE).unwrap();
    let prefix = |s: &str| JsValue::from(Array::of2(&"session-1".into(), &s.into()));
    settle(&windows.put_with_key(&"text".into(), &prefix("a")).unwrap())
        .await
        .unwrap();
    let torn = js_sys::Uint8Array::from(&[1u8, 0x80][..]);
    settle(&windows.put_with_key(&torn, &prefix("b")).unwrap())
        .await
        .unwrap();
    db.close();
    let store = IdbStore::open(&name).await.unwrap();
    for stream in ["a", "b"] {
        let error = store.load_window(&key(stream)).await.unwrap_err();
        assert!(matches!(error, StoreError::Corrupt { .. }), "{error:?}");
    }
    drop(store);
    delete_db(&name).await;
}

#[wasm_bindgen_test]
async fn flushes_append_what_changed_and_fold_it_into_few_records() {
    let name = unique("window-records");
    let page = Page::start(&name).await;
    let mut tracker = page.registry.open(key("a")).await.unwrap();
    let mut per_flush = Vec::new();
    for n in 1..=300u64 {
        page.feed(&mut tracker, &ids(n..=n));
        let before = page.store.window_bytes_written();
        page.registry.worker().flush().await.unwrap();
        per_flush.push(page.store.window_bytes_written() - before);
    }
    // One new id per flush: a record of a few bytes, and now and then the
    // whole window.
    per_flush.sort_unstable();
    assert!(
        per_flush[150] < 16,
        "median bytes per flush {}",
        per_flush[150]
    );
    assert!(per_flush[299] >= 64, "the whole window is written at times");
    drop(tracker);
    drop(page.stop().await);
    let (db, _) = raw_open(&name, IdbStore::VERSION, &[]).await;
    let tx = db.transaction_with_str(IdbStore::WINDOW_STORE).unwrap();
    let count = settle(
        &tx.object_store(IdbStore::WINDOW_STORE)
            .unwrap()
            .count()
            .unwrap(),
    )
    .await
    .unwrap();
    assert!(count.as_f64().unwrap() <= 65.0, "{count:?} records");
    db.close();

    let page = Page::start(&name).await;
    let mut tracker = page.registry.open(key("a")).await.unwrap();
    assert_eq!(page.feed(&mut tracker, &ids(1..=305)), ids(301..=305));
    drop(tracker);
    drop(page.stop().await);
    delete_db(&name).await;
}

#[wasm_bindgen_test]
async fn a_reopened_store_keeps_its_key_even_in_a_database_made_anew() {
    let name = unique("window-reopen");
    let store = IdbStore::open(&name).await.unwrap();
    let key = store.window_key().await.unwrap().unwrap();
    // Another tab deletes the database: the store closes; a reopen makes it
    // anew, with the key the store's windows go on under.
    within(5000, "delete", IdbStore::delete_database(&name))
        .await
        .unwrap();
    assert!(store.is_closed());
    let reopened = store.reopen().await.unwrap();
    assert_eq!(reopened.window_key().await.unwrap(), Some(key));
    drop((store, reopened));
    let fresh = IdbStore::open(&name).await.unwrap();
    assert_eq!(fresh.window_key().await.unwrap(), Some(key));
    drop(fresh);
    delete_db(&name).await;
}
