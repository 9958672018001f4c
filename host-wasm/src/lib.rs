//! tidemark in the browser: the host behind the `tidemark` npm package.
//!
//! - [`BrowserClock`]: `performance.now()` and gloo-timers.
//! - [`IdbStore`]: cursors and dedup windows in IndexedDB, one readwrite
//!   transaction per flush, and the resume URLs of POST streams.
//! - [`FetchConnector`]: `fetch` with a streaming body, one `AbortController`
//!   per attempt.
//! - The JavaScript API (`ResumableEventSource`, `openTracker`,
//!   `forgetStream`), exported with wasm-bindgen and wrapped by
//!   `js/index.js`.
//!
//! Everything takes its globals from `globalThis`, never from `window` or
//! `document`, so it runs in windows and in Web Workers alike. The crate is
//! empty on targets other than `wasm32`.
#![cfg(target_arch = "wasm32")]

mod api;
mod clock;
mod fetch;
mod idb;

pub use api::{EventSourceDriver, Tracker, flush_all, forget_stream, open_tracker};
pub use clock::BrowserClock;
pub use fetch::{CredentialsMode, FetchBody, FetchConnector};
pub use idb::IdbStore;
