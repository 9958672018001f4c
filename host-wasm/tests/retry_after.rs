//! `Retry-After` in headless Chromium: `FetchConnector` reads delta-seconds
//! and HTTP dates (`Date.parse` against `Date.now()`), and a stream waits
//! until the date. `fetch` is replaced by a function answering with real
//! `Response` objects, so no server is needed; wasm-bindgen-test runs the
//! tests of a file one at a time, so no other test sees the replacement.
#![cfg(target_arch = "wasm32")]

use futures::future::{Either, select};
use gloo_timers::future::TimeoutFuture;
use js_sys::{Array, Date, Function, Reflect};
use std::future::Future;
use tidemark_core::{
    ConnectRequest, Connector, EventTracker, Failure, Millis, ResumableStream, StreamConfig,
    StreamKey,
};
use tidemark_wasm::{BrowserClock, FetchConnector};
use wasm_bindgen::JsValue;
use wasm_bindgen_test::{wasm_bindgen_test, wasm_bindgen_test_configure};

wasm_bindgen_test_configure!(run_in_browser);

/// Never contacted: `fetch` is replaced.
const URL: &str = "http://127.0.0.1:9/events";

/// Fails the test instead of hanging when `future` does not finish in time.
async fn within<T>(ms: u32, what: &str, future: impl Future<Output = T>) -> T {
    match select(Box::pin(future), TimeoutFuture::new(ms)).await {
        Either::Left((value, _)) => value,
        Either::Right(_) => panic!("{what} did not finish within {ms} ms"),
    }
}

/// `globalThis.fetch` replaced until drop: the first `busy` calls get a 503
/// with `Retry-After: retry_after`, later ones a stream of one event.
struct FakeFetch {
    original: JsValue,
    /// `Date.now()` of every call.
    calls: Array,
}

impl FakeFetch {
    fn install(retry_after: &str, busy: u32) -> FakeFetch {
        let make = Function::new_with_args(
            "retryAfter, busy, calls",
            "return function () {
                calls.push(Date.now());
                if (calls.length <= busy) {
                    return Promise.resolve(new Response(null, {
                        status: 503,
                        headers: { 'retry-after': retryAfter },
                    }));
                }
                return Promise.resolve(new Response('id: 1\\ndata: later\\n\\n', {
                    headers: { 'content-type': 'text/event-stream' },
                }));
            };",
        );
        let calls = Array::new();
        let fake = make
            .call3(&JsValue::NULL, &retry_after.into(), &busy.into(), &calls)
            .unwrap();
        let global = js_sys::global();
        let original = Reflect::get(&global, &"fetch".into()).unwrap();
        Reflect::set(&global, &"fetch".into(), &fake).unwrap();
        FakeFetch { original, calls }
    }

    fn calls(&self) -> Vec<f64> {
        self.calls.iter().map(|at| at.as_f64().unwrap()).collect()
    }
}

impl Drop for FakeFetch {
    fn drop(&mut self) {
        Reflect::set(&js_sys::global(), &"fetch".into(), &self.original).unwrap();
    }
}

/// An HTTP date in whole seconds (they have no fractions), 2 to 3 s ahead,
/// and its time in ms since the Unix epoch.
fn date_ahead() -> (String, f64) {
    let at = (Date::now() / 1000.0).ceil() * 1000.0 + 2000.0;
    let date = Date::new(&JsValue::from_f64(at)).to_utc_string();
    (date.into(), at)
}

/// The `Retry-After` delay of a 503 with `retry_after`, as the connector
/// reads it.
async fn delay_of(retry_after: &str) -> Option<Millis> {
    let _fetch = FakeFetch::install(retry_after, u32::MAX);
    let request = ConnectRequest {
        url: URL,
        headers: &[],
        last_event_id: None,
        body: None,
    };
    let opened = within(5000, "connect", FetchConnector::new().connect(request)).await;
    match opened {
        Err(Failure::Status {
            code: 503,
            retry_after,
        }) => retry_after,
        Err(other) => panic!("expected a 503, got {other:?}"),
        Ok(_) => panic!("expected a 503, got a stream"),
    }
}

#[wasm_bindgen_test]
async fn retry_after_is_read_in_seconds_and_as_an_http_date() {
    assert_eq!(delay_of("7").await, Some(Millis(7000)));
    assert_eq!(
        delay_of("Thu, 01 Jan 2015 00:00:00 GMT").await,
        Some(Millis::ZERO),
        "a date in the past asks for no delay"
    );
    assert_eq!(delay_of("soon").await, None);
    let (date, _) = date_ahead();
    let delay = delay_of(&date).await.expect("a delay until the date");
    assert!(
        delay > Millis(1000) && delay <= Millis(3000),
        "{delay} until {date}, 2 to 3 s ahead"
    );
}

#[wasm_bindgen_test]
async fn a_stream_told_to_retry_after_a_date_retries_no_sooner() {
    let (date, at) = date_ahead();
    let fetch = FakeFetch::install(&date, 1);
    let tracker = EventTracker::new(StreamKey::new("t", "busy"), Default::default());
    // A 5 to 50 ms backoff: only the date holds the retry back.
    let mut stream = ResumableStream::new(
        FetchConnector::new(),
        BrowserClock::new(),
        URL,
        tracker,
        StreamConfig::default().with_backoff(Millis(5), Millis(50)),
    );
    let event = within(20_000, "an event", stream.next_event())
        .await
        .unwrap();
    assert_eq!(event.data, "later");
    let calls = fetch.calls();
    assert_eq!(calls.len(), 2, "one retry: {calls:?}");
    assert!(calls[0] < at);
    assert!(
        calls[1] + 100.0 >= at,
        "retried {} ms before {date}",
        at - calls[1]
    );
    assert!(
        calls[1] < at + 10_000.0,
        "retried {} ms after {date}",
        calls[1] - at
    );
}
