//! The JavaScript API, exported with wasm-bindgen and wrapped by
//! `js/index.js` into `ResumableEventSource` and `openTracker`.

mod js;
mod post;
mod runtime;
mod shared;
mod source;
mod tracker;

pub use post::forget_stream;
pub use source::EventSourceDriver;
pub use tracker::{Tracker, open_tracker};

use wasm_bindgen::prelude::*;

/// Writes the cursors of every stream of this page now (the package does
/// this on `pagehide` by itself); rejects when a write failed (it is
/// retried).
#[wasm_bindgen(js_name = flushAll)]
pub async fn flush_all() -> Result<(), JsError> {
    runtime::flush_every().await
}
