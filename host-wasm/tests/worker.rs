//! The browser host inside a dedicated Web Worker: no `window`, no
//! `document`, only `globalThis`.
#![cfg(target_arch = "wasm32")]

use js_sys::Reflect;
use tidemark_core::{Clock, Cursor, FingerprintKey, Millis, Store, StoreError, StreamKey};
use tidemark_wasm::{BrowserClock, IdbStore};
use wasm_bindgen::JsValue;
use wasm_bindgen_test::{wasm_bindgen_test, wasm_bindgen_test_configure};

wasm_bindgen_test_configure!(run_in_dedicated_worker);

fn assert_in_a_worker() {
    let global = js_sys::global();
    for name in ["window", "document"] {
        assert!(
            Reflect::get(&global, &JsValue::from_str(name))
                .unwrap()
                .is_undefined(),
            "{name} exists: not in a worker"
        );
    }
    assert!(
        Reflect::get(&global, &JsValue::from_str("importScripts"))
            .unwrap()
            .is_function(),
        "no importScripts: not in a worker"
    );
}

fn cursor(stream: &str, id: &str, seq: u64) -> Cursor {
    Cursor {
        key: StreamKey::new("worker-session", stream),
        last_event_id: id.into(),
        seq,
        at: Millis(seq),
    }
}

#[wasm_bindgen_test]
fn fingerprint_keys_are_random_in_a_worker() {
    assert_in_a_worker();
    let key = FingerprintKey::try_random().unwrap();
    assert_ne!(key, FingerprintKey::try_random().unwrap());
    assert_ne!(key, FingerprintKey::new(0, 0));
}

#[wasm_bindgen_test]
async fn idb_store_round_trip_in_a_worker() {
    assert_in_a_worker();
    let name = format!("tidemark-worker-{}", (js_sys::Math::random() * 1e15) as u64);
    let store = IdbStore::open(&name).await.unwrap();
    store
        .save_batch(&[cursor("a", "7", 7), cursor("b", "1", 1)])
        .await
        .unwrap();
    store.save_batch(&[cursor("a", "6", 6)]).await.unwrap();
    assert_eq!(store.transactions(), 2);
    assert_eq!(
        store.load(&cursor("a", "", 0).key).await.unwrap(),
        Some(cursor("a", "7", 7))
    );
    store.delete(&cursor("b", "", 0).key).await.unwrap();
    assert_eq!(store.load(&cursor("b", "", 0).key).await.unwrap(), None);
    store.close();
    assert!(matches!(
        store.load(&cursor("a", "", 0).key).await,
        Err(StoreError::Unavailable(_))
    ));
    drop(store);

    let store = IdbStore::open(&name).await.unwrap();
    assert_eq!(
        store.load(&cursor("a", "", 0).key).await.unwrap(),
        Some(cursor("a", "7", 7))
    );
    drop(store);
    IdbStore::delete_database(&name).await.unwrap();
}

#[wasm_bindgen_test]
fn browser_clock_reads_wall_time_in_a_worker() {
    assert_in_a_worker();
    let clock = BrowserClock::new();
    let now = clock.now().as_u64() as f64;
    let date = js_sys::Date::now();
    // timeOrigin + performance.now() and Date.now() read the same wall
    // clock, apart from drift and rounding.
    assert!(
        (now - date).abs() < 1000.0,
        "clock {now} vs Date.now() {date}"
    );
    assert!(clock.now() >= Millis(now as u64), "monotonic");
}

#[wasm_bindgen_test]
async fn browser_clock_sleeps_at_least_until_the_deadline_in_a_worker() {
    assert_in_a_worker();
    let clock = BrowserClock::default();
    for delay in [0, 1, 30, 120] {
        let start_date = js_sys::Date::now();
        let deadline = clock.now() + Millis(delay);
        clock.sleep_until(deadline).await;
        let woke = clock.now();
        assert!(woke >= deadline, "woke at {woke:?}, before {deadline:?}");
        let waited = js_sys::Date::now() - start_date;
        // Date.now() has millisecond resolution: allow one tick of rounding.
        assert!(
            waited + 1.0 >= delay as f64,
            "slept {waited} ms for a {delay} ms delay"
        );
        assert!(waited < delay as f64 + 2000.0, "slept {waited} ms");
    }
    // A deadline in the past returns at once.
    let before = clock.now();
    clock.sleep_until(Millis(0)).await;
    assert!(clock.now() - before < Millis(50));
}
