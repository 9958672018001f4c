//! `tidemark proxy`: any SSE endpoint made resumable, for any client.

mod file_log;
mod storage;

pub use file_log::FileLog;
pub use storage::{LogOp, LogStorage, MemoryLog, StoredStream, StreamKind, StreamMeta};
