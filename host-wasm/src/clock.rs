//! The core's clock on `performance.now()` and gloo-timers.

use gloo_timers::future::TimeoutFuture;
use std::future::Future;
use tidemark_core::{Clock, Millis};
use wasm_bindgen::{JsCast, JsValue};
use web_sys::Performance;

/// Milliseconds since the Unix epoch, read as `performance.timeOrigin +
/// performance.now()`: monotonic within a page or worker, and comparable with
/// cursor times written by earlier pages. Taken from `globalThis`, so it works
/// in windows and in workers alike.
#[derive(Clone, Debug)]
pub struct BrowserClock {
    performance: Performance,
    origin: f64,
}

impl BrowserClock {
    /// The clock of the current global scope.
    ///
    /// # Panics
    ///
    /// If the global scope has no `performance` (every browser window and
    /// worker has one).
    pub fn new() -> Self {
        let performance: Performance =
            js_sys::Reflect::get(&js_sys::global(), &JsValue::from_str("performance"))
                .ok()
                .and_then(|p| p.dyn_into().ok())
                .expect("globalThis.performance");
        let origin = performance.time_origin();
        BrowserClock {
            performance,
            origin,
        }
    }
}

impl Default for BrowserClock {
    fn default() -> Self {
        Self::new()
    }
}

/// The longest single timer: browsers clamp larger `setTimeout` delays.
const MAX_TIMEOUT_MS: u64 = i32::MAX as u64;

impl Clock for BrowserClock {
    fn now(&self) -> Millis {
        let now = self.origin + self.performance.now();
        // `as` saturates: NaN and negatives become 0.
        Millis(now as u64)
    }

    fn sleep_until(&self, deadline: Millis) -> impl Future<Output = ()> {
        let clock = self.clone();
        async move {
            loop {
                let left = deadline.as_u64().saturating_sub(clock.now().as_u64());
                if left == 0 {
                    return;
                }
                // Timers may fire a little early or late; loop until due.
                TimeoutFuture::new(left.min(MAX_TIMEOUT_MS) as u32).await;
            }
        }
    }
}
