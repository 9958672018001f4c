//! `tidemark`: the native host of tidemark, on `smol`.
//!
//! It supplies what the runtime-agnostic core leaves to hosts:
//!
//! - [`SmolClock`]: the core's [`Clock`](tidemark_core::Clock) on async-io
//!   timers, counting milliseconds since the Unix epoch so that persisted
//!   cursor times mean something across restarts.
//! - [`FileStore`]: a crash-safe [`Store`](tidemark_core::Store) of cursors
//!   and dedup windows in one state directory.
//! - [`RedisStore`]: cursors in Redis, shared by a fleet of instances, with
//!   [`Lease`]s so that one instance at a time follows a stream;
//!   [`NativeStore`] is either store.
//!
//! - [`HttpConnector`]: the core's `Connector` over hyper's HTTP/1 client,
//!   `http://` and `https://` (rustls with the bundled Mozilla roots, or your
//!   own), bounded redirects that keep credentials on their origin and
//!   never downgrade https, timeouts.
//! - [`SseServer`]: a small SSE source with replay after `Last-Event-ID`,
//!   keep-alives, a `retry:` hint and optional dropped connections.
//!
//! - [`follow`]: `tidemark follow`, one resumable stream printed as JSON lines.
//! - [`mcp`]: `tidemark mcp`, one MCP tool call over Streamable HTTP that
//!   resumes across dropped streams and restarts.
//! - [`metrics`]: Prometheus metrics of the proxy and of `follow`, and a
//!   small server for `GET /metrics`.
//! - [`raise_open_files_limit`]: the soft open-files limit up to the hard one.
//! - [`demo`]: `tidemark demo`, a chaotic server and a follower with a live
//!   display and a lost/duplicated verdict.
//!
//! The binary's `main` only parses arguments and wires these together.

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations)]

mod client;
mod clock;
mod connector;
pub mod demo;
mod file_store;
pub mod follow;
mod lease;
pub mod mcp;
pub mod metrics;
mod native_store;
mod private;
pub mod proxy;
mod redis_conn;
mod redis_store;
mod rlimit;
pub mod server;

pub use client::default_state_dir;
pub use clock::SmolClock;
pub use connector::{HttpBody, HttpConnector, HttpResponse};
pub use file_store::FileStore;
pub use hyper::{HeaderMap, Method};
pub use lease::{Lease, LeaseLost};
pub use native_store::NativeStore;
pub use redis_store::{CURSORS_PER_ROUND_TRIP, CURSORS_PER_SCRIPT, RedisConfig, RedisStore};
pub use rlimit::raise_open_files_limit;
pub use server::{ServerConfig, SseServer};
pub use tidemark_core as core;
