//! The core's randomness in headless Chromium: on `wasm32-unknown-unknown`
//! the standard library's hash seed is a constant, so keys and seeds must come
//! from `crypto.getRandomValues` (getrandom's `wasm_js` backend).
#![cfg(target_arch = "wasm32")]

use js_sys::{Function, Reflect};
use tidemark_core::{FingerprintKey, ReconnectConfig, TrackerConfig, WorkerConfig, random_seed};
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_test::{wasm_bindgen_test, wasm_bindgen_test_configure};

wasm_bindgen_test_configure!(run_in_browser);

#[wasm_bindgen_test]
fn fingerprint_keys_are_random_in_a_browser() {
    let a = FingerprintKey::random();
    let b = FingerprintKey::try_random().unwrap();
    assert_ne!(a, b);
    assert_ne!(a, FingerprintKey::new(0, 0));
    assert_ne!(a.fingerprint(b"42"), b.fingerprint(b"42"));
    let default = TrackerConfig::default().fingerprint_key;
    assert_ne!(default, TrackerConfig::default().fingerprint_key);
    assert_ne!(default, a);
}

#[wasm_bindgen_test]
fn jitter_seeds_are_random_in_a_browser() {
    let seeds = [
        random_seed(),
        random_seed(),
        WorkerConfig::default().seed,
        ReconnectConfig::default().seed,
    ];
    for (i, a) in seeds.iter().enumerate() {
        for b in &seeds[i + 1..] {
            assert_ne!(a, b, "{seeds:?}");
        }
    }
}

/// Runs `f` with `crypto.getRandomValues` replaced by a function with
/// `body` (argument `a`, the array to fill), then restores it.
fn with_get_random_values<T>(body: &str, f: impl FnOnce() -> T) -> T {
    let crypto = Reflect::get(&js_sys::global(), &JsValue::from_str("crypto")).unwrap();
    let name = JsValue::from_str("getRandomValues");
    Reflect::set(&crypto, &name, &Function::new_with_args("a", body)).unwrap();
    let result = f();
    Reflect::delete_property(crypto.unchecked_ref::<js_sys::Object>(), &name).unwrap();
    result
}

/// What the page's `crypto.getRandomValues` gives is the key: the bits come
/// from the browser's entropy source, not from anything fixed per build.
#[wasm_bindgen_test]
fn keys_and_seeds_come_from_crypto_get_random_values() {
    let (key, seed) = with_get_random_values("a.fill(0x42); return a;", || {
        (FingerprintKey::try_random().unwrap(), random_seed())
    });
    let bits = u64::from_ne_bytes([0x42; 8]);
    assert_eq!(key, FingerprintKey::new(bits, bits));
    assert_eq!(seed, bits);
    assert_ne!(FingerprintKey::random(), key, "restored");
}

/// Without a source, the key is an error (the runtime reports it to
/// JavaScript) and the jitter seed falls back to a fixed one.
#[wasm_bindgen_test]
fn no_source_is_an_error_for_keys_and_a_fixed_seed_for_jitter() {
    let (key, seeds) = with_get_random_values("throw new Error('no entropy here');", || {
        (FingerprintKey::try_random(), [random_seed(), random_seed()])
    });
    let error = key.unwrap_err();
    assert!(
        error.to_string().starts_with("no entropy source available"),
        "{error}"
    );
    assert_eq!(seeds[0], seeds[1]);
    assert!(FingerprintKey::try_random().is_ok(), "restored");
}
