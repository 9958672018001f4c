//! `tidemark`: the native host of tidemark, on `smol`.
//!
//! It supplies what the runtime-agnostic core leaves to hosts:
//!
//! - [`SmolClock`]: the core's [`Clock`](tidemark_core::Clock) on async-io
//!   timers, counting milliseconds since the Unix epoch so that persisted
//!   cursor times mean something across restarts.
//! - [`FileStore`]: a crash-safe [`Store`](tidemark_core::Store) in one state
//!   directory.
//!
//! The HTTP connector, the SSE server and the `tidemark` binary (`follow`,
//! `serve`, `demo`) come next.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod clock;
mod file_store;

pub use clock::SmolClock;
pub use file_store::FileStore;
pub use tidemark_core as core;
