//! `windows.tdm`: the dedup windows of a [`FileStore`](super::FileStore),
//! as an append-only log folded in memory.
//!
//! ```text
//! file    = header frame*
//! header  = "tidemark windows\n" version:u32 key:[u8; 16] crc:u32
//! frame   = len:u64 crc:u32 payload            (crc of len and payload)
//! payload = item*
//! item    = 1 key record-len:u32 record         a window change
//!         | 2 key                               the stream was deleted
//! key     = session-len:u32 session stream-len:u32 stream
//! ```
//!
//! Integers are little-endian; a record is one [`WindowChange`] as the core
//! encodes it. In memory, each stream keeps its records the same way
//! ([`Records`]). Each flush appends one frame and fsyncs the file; a
//! compaction writes the fold (one reset record per stream) to a
//! temporary file and renames it over the log.
//!
//! A crash can only damage the frame being appended, the last one: a last
//! frame that is cut short, fails its checksum or is zeros (a file grown
//! but not yet written) is a torn tail, dropped on open and truncated
//! before the next append. Anything else that does not check out is
//! corrupt.

use super::{Reader, io_error, replace_durably};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use tidemark_core::{FingerprintKey, SavedWindow, StoreError, StreamKey, WindowChange};

/// The log's file name in the state directory.
pub(super) const WINDOWS: &str = "windows.tdm";
const MAGIC: &[u8] = b"tidemark windows\n";
const VERSION: u32 = 1;
const HEADER_LEN: usize = MAGIC.len() + 4 + 16 + 4;
const FRAME_HEAD: usize = 8 + 4;
const CHANGE: u8 = 1;
const FORGET: u8 = 2;
/// The log is compacted once it is this many times the size of its fold...
const GROWTH: u64 = 4;
/// ...and at least this big.
const COMPACT_MIN: u64 = 1 << 20;

/// Each stream's records in `windows.tdm`, and where the next frame goes.
pub(super) struct WindowLog {
    dir: PathBuf,
    key: FingerprintKey,
    windows: HashMap<StreamKey, Records>,
    /// Bytes of the file that hold the header and whole frames.
    len: u64,
    /// Whether the file may hold bytes past `len` (a torn tail, or an
    /// append that failed), to be truncated before the next append.
    tail: bool,
    /// The size of the fold as last measured: the log is compacted when it
    /// grows [`GROWTH`] times past it.
    folded: u64,
    /// Items in the log: with fewer than two per stream a compaction
    /// cannot halve it, so the fold is not even measured.
    items: u64,
    /// See [`COMPACT_MIN`]; smaller in tests.
    compact_min: u64,
}

impl WindowLog {
    /// Reads the log in `dir`, or creates it with a new random key.
    pub(super) fn open(dir: &Path) -> Result<WindowLog, StoreError> {
        let path = dir.join(WINDOWS);
        let (key, windows, len, items, tail) = match std::fs::read(&path) {
            Ok(bytes) => {
                let decoded = decode(&bytes).map_err(|detail| StoreError::Corrupt {
                    what: path.display().to_string(),
                    detail,
                })?;
                let (key, windows, len, items) = decoded;
                (key, windows, len, items, len < bytes.len())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let key = FingerprintKey::try_random().map_err(|e| StoreError::Backend {
                    message: format!("{}: no key for the windows: {e}", path.display()),
                    transient: false,
                })?;
                let header = header(&key);
                replace_durably(dir, WINDOWS, &header).map_err(|(path, e)| io_error(&path, &e))?;
                (key, HashMap::new(), header.len(), 0, false)
            }
            Err(e) => return Err(io_error(&path, &e)),
        };
        Ok(WindowLog {
            dir: dir.to_path_buf(),
            key,
            windows,
            len: len as u64,
            tail,
            folded: 0,
            items,
            compact_min: COMPACT_MIN,
        })
    }

    /// The key that fingerprints the windows' ids.
    pub(super) fn key(&self) -> FingerprintKey {
        self.key
    }

    /// The stored window of `key`, if any.
    pub(super) fn window(&self, key: &StreamKey) -> Result<Option<SavedWindow>, StoreError> {
        let Some(records) = self.windows.get(key) else {
            return Ok(None);
        };
        let window = SavedWindow::decode(&records.bytes).map_err(|e| self.corrupt(e))?;
        Ok(Some(window))
    }

    fn corrupt(&self, detail: String) -> StoreError {
        StoreError::Corrupt {
            what: self.dir.join(WINDOWS).display().to_string(),
            detail,
        }
    }

    /// Whether `key` has a stored window.
    pub(super) fn has(&self, key: &StreamKey) -> bool {
        self.windows.contains_key(key)
    }

    /// The frame that records `changes`.
    pub(super) fn changes_frame(changes: &[WindowChange]) -> Vec<u8> {
        let mut out = frame_start(changes.len() * 64);
        for change in changes {
            item(&mut out, CHANGE, change.key(), |out| change.encode(out));
        }
        frame_end(out, 0)
    }

    /// The frame that forgets `key`.
    pub(super) fn forget_frame(key: &StreamKey) -> Vec<u8> {
        let mut out = frame_start(64);
        item(&mut out, FORGET, key, |_| {});
        frame_end(out, 0)
    }

    /// What [`append`] needs, to run off the executor.
    pub(super) fn append_to(&self) -> Append {
        Append {
            path: self.dir.join(WINDOWS),
            at: self.len,
            truncate: self.tail,
        }
    }

    /// Records how an [`append`] of `frame_len` bytes holding `items`
    /// items went.
    pub(super) fn appended(
        &mut self,
        result: &Result<(), StoreError>,
        frame_len: usize,
        items: usize,
    ) {
        match result {
            Ok(()) => {
                self.len += frame_len as u64;
                self.items += items as u64;
                self.tail = false;
            }
            Err(_) => self.tail = true,
        }
    }

    /// Adds durable changes to their streams' records.
    pub(super) fn apply(&mut self, changes: &[WindowChange]) -> Result<(), StoreError> {
        let mut record = Vec::new();
        for change in changes {
            record.clear();
            change.encode(&mut record);
            let records = self.windows.entry(change.key().clone()).or_default();
            if let Err(e) = records.push(&record) {
                return Err(self.corrupt(e));
            }
        }
        Ok(())
    }

    /// Forgets a durably deleted stream.
    pub(super) fn forget(&mut self, key: &StreamKey) {
        self.windows.remove(key);
    }

    /// The whole fold as a log, if the log has grown enough past the fold
    /// that writing it is worth it. Measuring the fold encodes it, at most
    /// once each time the log grows [`GROWTH`] times (or after a failed
    /// rewrite).
    pub(super) fn compaction(&mut self) -> Result<Option<Vec<u8>>, StoreError> {
        if self.len < self.compact_min.max(GROWTH * self.folded)
            || self.items < 2 * self.windows.len() as u64
        {
            return Ok(None);
        }
        let mut out = header(&self.key);
        let start = out.len();
        out.extend_from_slice(&[0; FRAME_HEAD]);
        let mut failed = None;
        for (key, records) in &mut self.windows {
            if let Err(e) = records.refold() {
                failed = Some(e);
                break;
            }
            item(&mut out, CHANGE, key, |out| {
                out.extend_from_slice(&records.bytes)
            });
        }
        if let Some(e) = failed {
            return Err(self.corrupt(e));
        }
        let out = frame_end(out, start);
        // Worth a rewrite only if it at least halves the log; if it does
        // not, or the rewrite fails, the next flush measures again.
        if out.len() as u64 * 2 <= self.len {
            Ok(Some(out))
        } else {
            self.folded = out.len() as u64;
            Ok(None)
        }
    }

    /// Records that the compacted log of `len` bytes replaced the file.
    pub(super) fn compacted(&mut self, len: usize) {
        self.len = len as u64;
        self.items = self.windows.len() as u64;
        self.folded = len as u64;
        self.tail = false;
    }

    #[cfg(test)]
    pub(super) fn set_compact_min(&mut self, bytes: u64) {
        self.compact_min = bytes;
    }
}

/// Where one frame is appended.
pub(super) struct Append {
    path: PathBuf,
    at: u64,
    truncate: bool,
}

/// Appends `frame` at the end of the whole frames (cutting off a torn
/// tail first) and fsyncs the file.
pub(super) fn append(to: &Append, frame: &[u8]) -> Result<(), StoreError> {
    let on = |e: io::Error| io_error(&to.path, &e);
    let mut file: File = OpenOptions::new().write(true).open(&to.path).map_err(on)?;
    if to.truncate {
        file.set_len(to.at).map_err(on)?;
    }
    file.seek(SeekFrom::Start(to.at)).map_err(on)?;
    file.write_all(frame).map_err(on)?;
    file.sync_data().map_err(on)
}

fn header(key: &FingerprintKey) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&key.to_bytes());
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn frame_start(capacity: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_HEAD + capacity);
    out.extend_from_slice(&[0; FRAME_HEAD]);
    out
}

/// Fills in the head of the frame that starts at `start` and runs to the
/// end of `out`.
fn frame_end(mut out: Vec<u8>, start: usize) -> Vec<u8> {
    let len = (out.len() - start - FRAME_HEAD) as u64;
    out[start..start + 8].copy_from_slice(&len.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&out[start..start + 8]);
    crc.update(&out[start + FRAME_HEAD..]);
    out[start + 8..start + FRAME_HEAD].copy_from_slice(&crc.finalize().to_le_bytes());
    out
}

fn item(out: &mut Vec<u8>, kind: u8, key: &StreamKey, record: impl FnOnce(&mut Vec<u8>)) {
    out.push(kind);
    for text in [key.session(), key.stream()] {
        out.extend_from_slice(&(text.len() as u32).to_le_bytes());
        out.extend_from_slice(text.as_bytes());
    }
    if kind == CHANGE {
        let at = out.len();
        out.extend_from_slice(&[0; 4]);
        record(out);
        let len = (out.len() - at - 4) as u32;
        out[at..at + 4].copy_from_slice(&len.to_le_bytes());
    }
}

/// A stream's window as the records that fold into it: its fold as of the
/// last refold, then the changes added since. Encoded, a window costs a
/// byte per consecutive decimal id and eight per other id, where a
/// [`SavedWindow`] costs sixteen and more; a stream's records are refolded
/// whenever they have doubled, so they stay within twice the fold.
#[derive(Default)]
struct Records {
    bytes: Vec<u8>,
    /// The length of `bytes` after the last refold.
    folded: usize,
}

/// Records shorter than this are not refolded.
const REFOLD_MIN: usize = 256;

impl Records {
    /// Adds one record, and refolds if the records have doubled.
    fn push(&mut self, record: &[u8]) -> Result<(), String> {
        if self.bytes.is_empty() {
            self.bytes.reserve_exact(record.len());
        }
        self.bytes.extend_from_slice(record);
        if self.bytes.len() > 2 * self.folded.max(REFOLD_MIN) {
            self.refold()?;
        }
        Ok(())
    }

    /// Replaces the records by their fold, one record.
    fn refold(&mut self) -> Result<(), String> {
        if self.bytes.len() == self.folded {
            return Ok(());
        }
        let window = SavedWindow::decode(&self.bytes)?;
        self.bytes.clear();
        window.encode(&mut self.bytes);
        self.bytes.shrink_to_fit();
        self.folded = self.bytes.len();
        Ok(())
    }
}

type Decoded = (FingerprintKey, HashMap<StreamKey, Records>, usize, u64);

/// The key, the fold, how many bytes hold whole frames (the rest is a torn
/// tail) and how many items they hold.
fn decode(bytes: &[u8]) -> Result<Decoded, String> {
    if !bytes.starts_with(MAGIC) {
        return Err("not a tidemark window file (unknown header)".into());
    }
    if bytes.len() < HEADER_LEN {
        return Err("truncated header".into());
    }
    let mut r = Reader(&bytes[MAGIC.len()..HEADER_LEN]);
    let version = r.u32()?;
    if version != VERSION {
        return Err(format!(
            "format version {version}, this build reads version {VERSION}"
        ));
    }
    let key: [u8; 16] = r.take(16)?.try_into().expect("16 bytes");
    let crc = r.u32()?;
    if crc32fast::hash(&bytes[..HEADER_LEN - 4]) != crc {
        return Err("header checksum mismatch".into());
    }
    let mut windows = HashMap::new();
    let mut at = HEADER_LEN;
    let mut items = 0;
    while at < bytes.len() {
        let rest = &bytes[at..];
        let whole = frame(rest).map_err(|detail| format!("{detail} in the frame at byte {at}"))?;
        let Some(payload) = whole else {
            break; // a torn tail
        };
        items += fold(payload, &mut windows)
            .map_err(|detail| format!("frame at byte {at}: {detail}"))?;
        at += FRAME_HEAD + payload.len();
    }
    Ok((FingerprintKey::from_bytes(key), windows, at, items))
}

/// The payload of the frame at the start of `rest`, `None` if `rest` is a
/// torn tail, or what is wrong with a frame that is not the last.
fn frame(rest: &[u8]) -> Result<Option<&[u8]>, String> {
    if rest.len() < FRAME_HEAD || rest.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    let len = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
    let stored = u32::from_le_bytes(rest[8..FRAME_HEAD].try_into().expect("4 bytes"));
    let Some(end) = usize::try_from(len)
        .ok()
        .and_then(|len| len.checked_add(FRAME_HEAD))
        .filter(|&end| end <= rest.len())
    else {
        return Ok(None); // cut short
    };
    let mut crc = crc32fast::Hasher::new();
    crc.update(&rest[..8]);
    crc.update(&rest[FRAME_HEAD..end]);
    if crc.finalize() != stored {
        return if end == rest.len() {
            Ok(None) // the last frame, not all written
        } else {
            Err("checksum mismatch".into())
        };
    }
    Ok(Some(&rest[FRAME_HEAD..end]))
}

/// Adds the items of `payload` to their streams' records, checking that
/// each record reads whole; returns how many items there were.
fn fold(payload: &[u8], windows: &mut HashMap<StreamKey, Records>) -> Result<u64, String> {
    let mut r = Reader(payload);
    let mut items = 0;
    while !r.0.is_empty() {
        items += 1;
        let kind = r.take(1)?[0];
        let key = StreamKey::new(r.text()?, r.text()?);
        match kind {
            CHANGE => {
                let len = r.u32()? as usize;
                let record = r.take(len)?;
                let mut rest = record;
                SavedWindow::new().apply_encoded(&mut rest)?;
                if !rest.is_empty() {
                    return Err("a window record is shorter than its length".into());
                }
                windows.entry(key).or_default().push(record)?;
            }
            FORGET => {
                windows.remove(&key);
            }
            _ => return Err(format!("unknown item kind {kind}")),
        }
    }
    Ok(items)
}
