//! `tidemark proxy`: any SSE endpoint made resumable, for any client.

mod storage;

pub use storage::{LogOp, LogStorage, MemoryLog, StoredStream, StreamKind, StreamMeta};
