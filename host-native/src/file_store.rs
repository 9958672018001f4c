//! A crash-safe store of cursors and dedup windows in one state directory.
//!
//! # Cursors
//!
//! All cursors live in one file, `cursors.tdm`, rewritten whole on every
//! flush: the new state goes to `cursors.tdm.tmp`, is fsynced, renamed over
//! the old file, and the directory is fsynced. A crash at any instant leaves
//! either the previous state or the new one, never a torn or empty file. The
//! persistence worker writes at most once per flush interval for all dirty
//! streams, so this costs one file write per flush, not one per event.
//!
//! The file is binary and self-checking: a magic line, a format version, the
//! cursors, and a CRC-32 of everything before it.
//!
//! # Windows
//!
//! By default ([`FileStore::open`]) the store also keeps every stream's
//! dedup window, so that a tracker opened after a restart drops what the
//! server replays, not only resumes from the cursor. Rewriting whole
//! windows on every flush would cost far too much for many streams, so they
//! go to a second file, `windows.tdm`: an append-only log of what each
//! window gained since the last flush ([`WindowChange`] records, one
//! appended frame and one fsync per flush, before the cursors are
//! written). In memory each stream keeps its records encoded (a byte per
//! consecutive decimal id, eight per other id), folded into one record
//! whenever they double, and decoded into a [`SavedWindow`] when a tracker
//! opens the stream. Once the log has grown to four times the size of its
//! fold (and past 1 MiB, with at least two records per stream), a flush
//! compacts it: the fold, one record per stream, goes to `windows.tdm.tmp`,
//! which is fsynced and renamed over the log. Deleting a stream appends a
//! record that forgets its window.
//!
//! The log's header holds the random key that fingerprints the windows'
//! ids ([`Store::window_key`]), made from the OS's entropy the first time a
//! directory is opened with windows and never written anywhere else. A
//! directory written by a version that kept no windows (only
//! `cursors.tdm`) opens and resumes; it gets its key and its log then.
//!
//! A crash can only damage the frame being appended: a torn last frame
//! (cut short, failing its checksum, or zeros) is dropped on open and cut
//! off before the next append, so a crash loses at most the windows of the
//! flush it interrupted, never more than what arrived since the last
//! successful one.
//!
//! [`FileStore::open_cursors_only`] keeps cursors only, as stores did
//! before windows were kept: trackers opened from it start with only the
//! cursor's id. Its first write deletes a `windows.tdm` left by a store
//! that kept windows, which would be stale afterwards.
//!
//! # Damage, and privacy
//!
//! A file that is not ours, is from a newer version, or fails a checksum
//! (anywhere but a torn tail of the log) is reported as
//! [`StoreError::Corrupt`] naming the file, and the store refuses to open,
//! so nothing writes over it: someone has to look at it first.
//!
//! The directory is private: created `0700`, its files `0600` (see the
//! crate's `private` module); an existing directory open to other users is
//! warned about on stderr, not changed.

mod window_log;

use crate::private::{private_dir, private_file};
use smol::lock::Mutex as AsyncMutex;
use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard};
use tidemark_core::{
    Cursor, FingerprintKey, Millis, SavedWindow, Store, StoreError, StreamKey, WindowChange,
    merge_newest,
};
use window_log::{WINDOWS, WindowLog};

const MAGIC: &[u8] = b"tidemark cursors\n";
const VERSION: u32 = 1;
const STATE: &str = "cursors.tdm";
const TEMP: &str = "cursors.tdm.tmp";

/// Cursors and dedup windows of every stream in one state directory; see
/// the [module docs](self).
pub struct FileStore {
    dir: PathBuf,
    state: Mutex<HashMap<StreamKey, Cursor>>,
    /// The window log, unless the store keeps cursors only.
    windows: Option<Windows>,
    /// A store that keeps cursors only found a `windows.tdm` it has not
    /// deleted yet.
    stale_windows: AtomicBool,
    /// Serializes writes so that an older snapshot never lands after a
    /// newer one, and frames are appended one at a time.
    writing: AsyncMutex<()>,
}

struct Windows {
    key: FingerprintKey,
    log: Mutex<WindowLog>,
}

impl Windows {
    fn log(&self) -> MutexGuard<'_, WindowLog> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl fmt::Debug for FileStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileStore")
            .field("dir", &self.dir)
            .field("streams", &self.state().len())
            .field("keeps_windows", &self.windows.is_some())
            .finish_non_exhaustive()
    }
}

impl FileStore {
    /// Opens (creating if needed) the state directory `dir` and reads its
    /// cursors and windows; the store keeps both. A directory without
    /// windows yet gets its window log and key now. Leftover temporary
    /// files from a crash are removed, and a torn tail of the window log is
    /// dropped.
    ///
    /// A new directory is created `0700` and its files `0600`; an existing
    /// directory that grants its group or others any permission keeps its
    /// mode and gets a warning on stderr (`chmod 700 DIR`).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(dir.as_ref(), true)
    }

    /// Opens the state directory `dir` like [`FileStore::open`], but keeps
    /// cursors only (no [`Store::window_key`]): trackers opened from it
    /// start with only the cursor's id in their window, as before windows
    /// were kept. A `windows.tdm` in the directory is not read, and is
    /// deleted by the first write, since it would no longer match the
    /// cursors.
    pub fn open_cursors_only(dir: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(dir.as_ref(), false)
    }

    fn open_with(dir: &Path, keep_windows: bool) -> Result<Self, StoreError> {
        let dir = dir.to_path_buf();
        private_dir(&dir).map_err(|e| io_error(&dir, &e))?;
        for temp in [TEMP.to_owned(), format!("{WINDOWS}.tmp")] {
            let temp = dir.join(temp);
            match fs::remove_file(&temp) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error(&temp, &e)),
            }
        }
        let path = dir.join(STATE);
        let cursors = match fs::read(&path) {
            Ok(bytes) => decode(&bytes).map_err(|detail| StoreError::Corrupt {
                what: path.display().to_string(),
                detail,
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_error(&path, &e)),
        };
        let windows = if keep_windows {
            let log = WindowLog::open(&dir)?;
            Some(Windows {
                key: log.key(),
                log: Mutex::new(log),
            })
        } else {
            None
        };
        let stale_windows = !keep_windows && dir.join(WINDOWS).exists();
        let state = cursors.into_iter().map(|c| (c.key.clone(), c)).collect();
        Ok(FileStore {
            dir,
            state: Mutex::new(state),
            windows,
            stale_windows: AtomicBool::new(stale_windows),
            writing: AsyncMutex::new(()),
        })
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file holding the cursors.
    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE)
    }

    /// The file holding the windows (there only once a store that keeps
    /// windows opened the directory).
    pub fn windows_path(&self) -> PathBuf {
        self.dir.join(WINDOWS)
    }

    /// How many streams have a stored cursor.
    pub fn len(&self) -> usize {
        self.state().len()
    }

    /// Whether no stream has a stored cursor.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn state(&self) -> MutexGuard<'_, HashMap<StreamKey, Cursor>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies `change` to a copy of the state, writes the copy, and keeps it
    /// only once it is durable. The caller holds `writing`.
    async fn rewrite(
        &self,
        change: impl FnOnce(&mut HashMap<StreamKey, Cursor>),
    ) -> Result<(), StoreError> {
        let next = self.next_state(change);
        self.write_state(next, || Ok(())).await
    }

    /// A copy of the state with `change` applied, and its encoding.
    fn next_state(
        &self,
        change: impl FnOnce(&mut HashMap<StreamKey, Cursor>),
    ) -> (HashMap<StreamKey, Cursor>, Vec<u8>) {
        let mut next = self.state().clone();
        change(&mut next);
        let bytes = encode(next.values());
        (next, bytes)
    }

    /// Writes a [`next_state`](Self::next_state) and keeps it once it is
    /// durable; `meanwhile` runs while the file is written. The caller
    /// holds `writing`.
    async fn write_state(
        &self,
        (next, bytes): (HashMap<StreamKey, Cursor>, Vec<u8>),
        meanwhile: impl FnOnce() -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let dir = self.dir.clone();
        let stale = self.stale_windows.load(Relaxed);
        let writing = smol::unblock(move || {
            if stale {
                // The directory fsync after the rename makes this durable.
                let path = dir.join(WINDOWS);
                match fs::remove_file(&path) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        return Err(io_error(&path, &e));
                    }
                    _ => {}
                }
            }
            replace_durably(&dir, STATE, &bytes).map_err(|(path, e)| io_error(&path, &e))
        });
        let meanwhile = meanwhile();
        writing.await?;
        self.stale_windows.store(false, Relaxed);
        *self.state() = next;
        meanwhile
    }

    /// Appends the frame that forgets `key` to the window log and, once it
    /// is durable, forgets the window. The caller holds `writing`.
    async fn forget(&self, windows: &Windows, key: &StreamKey) -> Result<(), StoreError> {
        let frame = WindowLog::forget_frame(key);
        let to = windows.log().append_to();
        let len = frame.len();
        let result = smol::unblock(move || window_log::append(&to, &frame)).await;
        let mut log = windows.log();
        log.appended(&result, len, 1);
        result?;
        log.forget(key);
        Ok(())
    }

    /// Rewrites the window log as its fold if it has grown enough past it.
    /// The caller holds `writing`.
    async fn compact(&self, windows: &Windows) -> Result<(), StoreError> {
        let Some(bytes) = windows.log().compaction()? else {
            return Ok(());
        };
        let dir = self.dir.clone();
        let len = bytes.len();
        smol::unblock(move || {
            replace_durably(&dir, WINDOWS, &bytes).map_err(|(path, e)| io_error(&path, &e))
        })
        .await?;
        windows.log().compacted(len);
        Ok(())
    }
}

impl Store for FileStore {
    async fn load(&self, key: &StreamKey) -> Result<Option<Cursor>, StoreError> {
        Ok(self.state().get(key).cloned())
    }

    async fn save_batch(&self, cursors: &[Cursor]) -> Result<(), StoreError> {
        let _writing = self.writing.lock().await;
        self.rewrite(|state| merge_newest(state, cursors)).await
    }

    async fn delete(&self, key: &StreamKey) -> Result<(), StoreError> {
        let _writing = self.writing.lock().await;
        if let Some(windows) = &self.windows
            && windows.log().has(key)
        {
            self.forget(windows, key).await?;
        }
        if !self.state().contains_key(key) {
            return Ok(());
        }
        self.rewrite(|state| {
            state.remove(key);
        })
        .await
    }

    async fn window_key(&self) -> Result<Option<FingerprintKey>, StoreError> {
        Ok(self.windows.as_ref().map(|w| w.key))
    }

    async fn load_window(&self, key: &StreamKey) -> Result<Option<SavedWindow>, StoreError> {
        match &self.windows {
            Some(windows) => windows.log().window(key),
            None => Ok(None),
        }
    }

    /// Appends the window changes to the log (one frame, one fsync), then
    /// rewrites the cursors, then compacts the log if it is time to: a
    /// crash in between leaves windows ahead of their cursors, which only
    /// drops more of a replay, never a fresh event.
    async fn save_with_windows(
        &self,
        cursors: &[Cursor],
        changes: &[WindowChange],
    ) -> Result<(), StoreError> {
        let _writing = self.writing.lock().await;
        let Some(windows) = self.windows.as_ref().filter(|_| !changes.is_empty()) else {
            return self.rewrite(|state| merge_newest(state, cursors)).await;
        };
        // The two files are written one after the other, the work around
        // them meanwhile: the cursors are encoded while the frame is
        // appended, the changes folded in while the cursors are written.
        let frame = WindowLog::changes_frame(changes);
        let to = windows.log().append_to();
        let len = frame.len();
        let appending = smol::unblock(move || window_log::append(&to, &frame));
        let next = self.next_state(|state| merge_newest(state, cursors));
        let appended = appending.await;
        windows.log().appended(&appended, len, changes.len());
        appended?;
        self.write_state(next, || windows.log().apply(changes))
            .await?;
        self.compact(windows).await
    }
}

/// Replaces the file `name` in `dir` with `bytes`, so that a crash at any
/// instant leaves the old content or the new one: write `name.tmp`, fsync,
/// rename it over `name`, fsync the directory. A failure says which path
/// failed.
///
/// The file is private: `name.tmp` is created new with mode `0600` before
/// the bytes go in (a leftover one, which may have another mode, is
/// removed first), and the rename keeps that mode.
pub(crate) fn replace_durably(
    dir: &Path,
    name: &str,
    bytes: &[u8],
) -> Result<(), (PathBuf, io::Error)> {
    let temp = dir.join(format!("{name}.tmp"));
    let path = dir.join(name);
    let on = |path: &Path| {
        let path = path.to_path_buf();
        move |e| (path, e)
    };
    match fs::remove_file(&temp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err((temp, e)),
        _ => {}
    }
    let mut file = private_file()
        .write(true)
        .create_new(true)
        .open(&temp)
        .map_err(on(&temp))?;
    file.write_all(bytes).map_err(on(&temp))?;
    file.sync_all().map_err(on(&temp))?;
    drop(file);
    fs::rename(&temp, &path).map_err(on(&path))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(on(dir))
}

/// A failed file operation on `path` as a store error: out of space or
/// quota, or another (transient) backend failure.
pub(crate) fn io_error(path: &Path, error: &io::Error) -> StoreError {
    let message = format!("{}: {error}", path.display());
    match error.raw_os_error() {
        // ENOSPC, EDQUOT: space may be freed.
        Some(28) | Some(122) => StoreError::QuotaExceeded(message),
        _ => StoreError::Backend {
            message,
            transient: true,
        },
    }
}

fn encode<'a>(cursors: impl Iterator<Item = &'a Cursor>) -> Vec<u8> {
    let cursors: Vec<&Cursor> = cursors.collect();
    let mut out = Vec::with_capacity(64 + cursors.len() * 64);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(cursors.len() as u64).to_le_bytes());
    for cursor in cursors {
        for text in [
            cursor.key.session(),
            cursor.key.stream(),
            cursor.last_event_id.as_str(),
        ] {
            out.extend_from_slice(&(text.len() as u32).to_le_bytes());
            out.extend_from_slice(text.as_bytes());
        }
        out.extend_from_slice(&cursor.seq.to_le_bytes());
        out.extend_from_slice(&cursor.at.as_u64().to_le_bytes());
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn decode(bytes: &[u8]) -> Result<Vec<Cursor>, String> {
    let Some(body) = bytes.strip_prefix(MAGIC) else {
        return Err("not a tidemark state file (unknown header)".into());
    };
    if bytes.len() < MAGIC.len() + 4 + 8 + 4 {
        return Err("truncated".into());
    }
    let (content, crc) = bytes.split_at(bytes.len() - 4);
    let stored = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
    let mut r = Reader(&body[..body.len() - 4]);
    let version = r.u32()?;
    if version != VERSION {
        return Err(format!(
            "format version {version}, this build reads version {VERSION}"
        ));
    }
    if crc32fast::hash(content) != stored {
        return Err("checksum mismatch".into());
    }
    let count = r.u64()?;
    let mut cursors = Vec::new();
    for _ in 0..count {
        let session = r.text()?;
        let stream = r.text()?;
        let last_event_id = r.text()?.to_owned();
        let seq = r.u64()?;
        let at = Millis(r.u64()?);
        cursors.push(Cursor {
            key: StreamKey::new(session, stream),
            last_event_id,
            seq,
            at,
        });
    }
    if !r.0.is_empty() {
        return Err("trailing bytes after the cursors".into());
    }
    Ok(cursors)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("truncated".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn text(&mut self) -> Result<&'a str, String> {
        let len = self.u32()? as usize;
        std::str::from_utf8(self.take(len)?).map_err(|_| "invalid UTF-8 in a key or id".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cursor(stream: &str, id: &str, seq: u64) -> Cursor {
        Cursor {
            key: StreamKey::new("session", stream),
            last_event_id: id.into(),
            seq,
            at: Millis(1_700_000_000_000 + seq),
        }
    }

    fn load(store: &FileStore, stream: &str) -> Option<Cursor> {
        smol::block_on(store.load(&StreamKey::new("session", stream))).unwrap()
    }

    #[test]
    fn cursors_survive_a_reopen_and_never_move_backwards() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        assert!(store.is_empty());
        smol::block_on(store.save_batch(&[cursor("a", "5", 5), cursor("b", "ü-1", 1)])).unwrap();
        smol::block_on(store.save_batch(&[cursor("a", "3", 3)])).unwrap();
        drop(store);

        let store = FileStore::open(dir.path()).unwrap();
        assert_eq!(store.len(), 2);
        assert_eq!(load(&store, "a"), Some(cursor("a", "5", 5)));
        assert_eq!(load(&store, "b"), Some(cursor("b", "ü-1", 1)));
        smol::block_on(store.delete(&StreamKey::new("session", "a"))).unwrap();
        drop(store);
        let store = FileStore::open(dir.path()).unwrap();
        assert_eq!(load(&store, "a"), None);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        let mut names = names;
        names.sort();
        assert_eq!(names, [STATE, WINDOWS], "no temporary file is left behind");
    }

    #[test]
    fn a_foreign_file_is_reported_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE);
        fs::write(&path, b"{\"not\": \"ours\"}").unwrap();
        let Err(StoreError::Corrupt { what, detail }) = FileStore::open(dir.path()) else {
            panic!("a foreign file must not open");
        };
        assert_eq!(what, path.display().to_string());
        assert!(detail.contains("not a tidemark state file"), "{detail}");
        assert_eq!(fs::read(&path).unwrap(), b"{\"not\": \"ours\"}");
    }

    #[test]
    fn a_damaged_file_fails_its_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        smol::block_on(store.save_batch(&[cursor("a", "5", 5)])).unwrap();
        drop(store);
        let path = dir.path().join(STATE);
        let mut bytes = fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 10] ^= 0x40;
        fs::write(&path, &bytes).unwrap();
        let Err(StoreError::Corrupt { detail, .. }) = FileStore::open(dir.path()) else {
            panic!("a damaged file must not open");
        };
        assert_eq!(detail, "checksum mismatch");
        bytes.truncate(n - 7);
        fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            FileStore::open(dir.path()),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_newer_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = encode(std::iter::empty());
        bytes[MAGIC.len()] = 2;
        let n = bytes.len();
        let crc = crc32fast::hash(&bytes[..n - 4]);
        bytes[n - 4..].copy_from_slice(&crc.to_le_bytes());
        fs::write(dir.path().join(STATE), &bytes).unwrap();
        let Err(StoreError::Corrupt { detail, .. }) = FileStore::open(dir.path()) else {
            panic!("a newer format must not open");
        };
        assert!(detail.contains("version 2"), "{detail}");
    }

    #[test]
    fn a_leftover_temporary_file_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        smol::block_on(store.save_batch(&[cursor("a", "5", 5)])).unwrap();
        drop(store);
        fs::write(dir.path().join(TEMP), b"half a write").unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        assert_eq!(load(&store, "a"), Some(cursor("a", "5", 5)));
        assert!(!dir.path().join(TEMP).exists());
    }

    #[cfg(unix)]
    #[test]
    fn the_directory_is_0700_and_the_file_0600_even_over_a_wider_leftover() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("state");
        let store = FileStore::open(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        smol::block_on(store.save_batch(&[cursor("a", "5", 5)])).unwrap();
        assert_eq!(mode(&store.path()), 0o600);
        // A temporary file left with a wider mode is not written into.
        let temp = dir.join("x.tmp");
        fs::write(&temp, b"old").unwrap();
        fs::set_permissions(&temp, fs::Permissions::from_mode(0o644)).unwrap();
        replace_durably(&dir, "x", b"secret").unwrap();
        assert_eq!(fs::read(dir.join("x")).unwrap(), b"secret");
        assert_eq!(mode(&dir.join("x")), 0o600);
    }

    #[test]
    fn a_failed_write_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        smol::block_on(store.save_batch(&[cursor("a", "5", 5)])).unwrap();
        // A directory where the temporary file must go makes the write fail.
        fs::create_dir(dir.path().join(TEMP)).unwrap();
        let error = smol::block_on(store.save_batch(&[cursor("a", "6", 6)])).unwrap_err();
        assert!(error.is_transient(), "{error}");
        assert!(error.to_string().contains(TEMP), "{error}");
        assert_eq!(load(&store, "a"), Some(cursor("a", "5", 5)));
        fs::remove_dir(dir.path().join(TEMP)).unwrap();
        smol::block_on(store.save_batch(&[cursor("a", "6", 6)])).unwrap();
        drop(store);
        assert_eq!(
            load(&FileStore::open(dir.path()).unwrap(), "a"),
            Some(cursor("a", "6", 6))
        );
    }

    /// Streams of one process on a store: trackers from a registry, their
    /// worker flushing only when asked (and at the graceful stop).
    mod windows {
        use super::*;
        use crate::SmolClock;
        use std::sync::Arc;
        use tidemark_core::{Clock, Config, WorkerConfig, persistence};

        fn key(stream: &str) -> StreamKey {
            StreamKey::new("session", stream)
        }

        fn config() -> Config {
            Config {
                worker: WorkerConfig {
                    flush_interval: Millis::from_secs(3600),
                    ..WorkerConfig::default()
                },
                ..Config::default()
            }
        }

        /// Feeds `ids` to `stream` as a server sends them, flushing after
        /// every `per_flush` ids, then stops gracefully; returns the ids
        /// delivered. The worker starts at the first flush, so that what
        /// each flush writes does not depend on timing.
        fn run_flushing(
            store: &Arc<FileStore>,
            stream: &str,
            ids: impl IntoIterator<Item = u64>,
            per_flush: usize,
        ) -> Vec<u64> {
            let clock = SmolClock::new();
            let (registry, worker) = persistence(store.clone(), clock, config());
            smol::block_on(async {
                let mut worker = Some(worker);
                let mut running = None;
                let mut tracker = registry.open(key(stream)).await.unwrap();
                let mut delivered = Vec::new();
                for (n, id) in ids.into_iter().enumerate() {
                    if tracker
                        .observe(Some(&id.to_string()), clock.now())
                        .is_fresh()
                    {
                        delivered.push(id);
                        tracker.commit();
                    }
                    if (n + 1) % per_flush == 0 {
                        if let Some(worker) = worker.take() {
                            running = Some(smol::spawn(worker.run()));
                        }
                        registry.worker().flush().await.unwrap();
                    }
                }
                drop(tracker);
                let running = running.unwrap_or_else(|| smol::spawn(worker.unwrap().run()));
                let report = registry
                    .shutdown(clock.now() + Millis::from_secs(10))
                    .await
                    .unwrap();
                assert!(report.is_complete(), "{report:?}");
                running.await;
                delivered
            })
        }

        fn run(
            store: &Arc<FileStore>,
            stream: &str,
            ids: std::ops::RangeInclusive<u64>,
        ) -> Vec<u64> {
            run_flushing(store, stream, ids, usize::MAX)
        }

        fn open(dir: &Path) -> Arc<FileStore> {
            Arc::new(FileStore::open(dir).unwrap())
        }

        fn range(ids: std::ops::RangeInclusive<u64>) -> Vec<u64> {
            ids.collect()
        }

        fn log_len(store: &FileStore) -> u64 {
            fs::metadata(store.windows_path()).unwrap().len()
        }

        #[test]
        fn windows_survive_a_reopen_so_a_replay_is_dropped() {
            let dir = tempfile::tempdir().unwrap();
            assert_eq!(run(&open(dir.path()), "a", 1..=100), range(1..=100));
            // The server replays 30 events before the cursor.
            assert_eq!(run(&open(dir.path()), "a", 71..=150), range(101..=150));
            let store = open(dir.path());
            assert_eq!(
                smol::block_on(store.load_window(&key("a")))
                    .unwrap()
                    .unwrap()
                    .len(),
                150
            );

            // Cursors only, the same replay repeats all but the cursor's id.
            let old = tempfile::tempdir().unwrap();
            let store = Arc::new(FileStore::open_cursors_only(old.path()).unwrap());
            assert_eq!(smol::block_on(store.window_key()).unwrap(), None);
            assert_eq!(run(&store, "a", 1..=100), range(1..=100));
            let store = Arc::new(FileStore::open_cursors_only(old.path()).unwrap());
            let again = run(&store, "a", 71..=150);
            assert_eq!(again.len(), 79, "{again:?}");
            assert!(!store.windows_path().exists());
        }

        #[test]
        fn the_key_is_kept_and_differs_between_directories() {
            let one = tempfile::tempdir().unwrap();
            let two = tempfile::tempdir().unwrap();
            let key_of = |dir: &Path| smol::block_on(open(dir).window_key()).unwrap().unwrap();
            let first = key_of(one.path());
            assert_eq!(run(&open(one.path()), "a", 1..=10), range(1..=10));
            assert_eq!(key_of(one.path()).to_bytes(), first.to_bytes());
            assert_ne!(key_of(two.path()).to_bytes(), first.to_bytes());
            // The key is in the log's header, not derived from the path.
            let bytes = fs::read(one.path().join(WINDOWS)).unwrap();
            assert_eq!(&bytes[MAGIC_LEN_OF_WINDOWS + 4..][..16], first.to_bytes());
        }

        const MAGIC_LEN_OF_WINDOWS: usize = b"tidemark windows\n".len();

        #[test]
        fn a_torn_tail_is_dropped_and_cut_off_before_the_next_append() {
            let dir = tempfile::tempdir().unwrap();
            assert_eq!(run(&open(dir.path()), "a", 1..=50), range(1..=50));
            let first = log_len(&open(dir.path()));
            // A flush appends the windows' frame, then writes the cursors: a
            // crash that tears the frame leaves the cursors of before it.
            let first_cursors = fs::read(dir.path().join(STATE)).unwrap();
            assert_eq!(run(&open(dir.path()), "a", 51..=100), range(51..=100));
            fs::write(dir.path().join(STATE), &first_cursors).unwrap();
            let path = dir.path().join(WINDOWS);
            let whole = fs::read(&path).unwrap();
            let mut half_written = whole.clone();
            let n = half_written.len();
            half_written[n - 2] ^= 0x55;
            for (torn, kept) in [
                (whole[..first as usize + 5].to_vec(), 50), // inside a frame head
                ([&whole[..], &[0u8; 100][..]].concat(), 100), // grown, never written
                (whole[..whole.len() - 3].to_vec(), 50),    // cut short
                (half_written, 50),                         // failing its checksum
            ] {
                fs::write(&path, &torn).unwrap();
                let store = open(dir.path());
                let window = smol::block_on(store.load_window(&key("a")))
                    .unwrap()
                    .unwrap();
                assert_eq!(window.len(), kept, "torn at {}", torn.len());
                drop(store);
                assert_eq!(fs::read(&path).unwrap(), torn, "opening writes nothing");
            }
            // The last frame was lost with its cursors: the window is back
            // to the cursor's, and the replay before it is dropped.
            let store = open(dir.path());
            assert_eq!(run(&store, "a", 41..=120), range(51..=120));
            // The append went where the torn frame began.
            let bytes = fs::read(&path).unwrap();
            assert_eq!(&bytes[..first as usize], &whole[..first as usize]);
            assert_eq!(run(&open(dir.path()), "a", 1..=130), range(121..=130));
        }

        #[test]
        fn a_failed_append_is_cut_off_before_the_next_one() {
            let dir = tempfile::tempdir().unwrap();
            let store = open(dir.path());
            assert_eq!(run(&store, "a", 1..=10), range(1..=10));
            let path = store.windows_path();
            let good = fs::read(&path).unwrap();
            // A directory where the log was: every append fails.
            fs::remove_file(&path).unwrap();
            fs::create_dir(&path).unwrap();
            let clock = SmolClock::new();
            let (registry, worker) = persistence(store.clone(), clock, config());
            smol::block_on(async {
                let worker = smol::spawn(worker.run());
                let mut tracker = registry.open(key("a")).await.unwrap();
                assert!(tracker.observe(Some("11"), clock.now()).is_fresh());
                tracker.commit();
                drop(tracker);
                let report = registry
                    .shutdown(clock.now() + Millis::from_secs(1))
                    .await
                    .unwrap();
                assert!(!report.is_complete(), "{report:?}");
                worker.await;
            });
            assert_eq!(load(&store, "a").unwrap().last_event_id, "10");
            // The log is back, with what a half-done append left.
            fs::remove_dir(&path).unwrap();
            fs::write(&path, [&good[..], &[0xab; 5000][..]].concat()).unwrap();
            assert_eq!(run(&store, "a", 1..=20), range(11..=20));
            let bytes = fs::read(&path).unwrap();
            assert_eq!(&bytes[..good.len()], &good[..]);
            assert!(bytes.len() < good.len() + 1000, "{} bytes", bytes.len());
            assert_eq!(run(&open(dir.path()), "a", 1..=21), [21]);
        }

        #[test]
        fn damage_before_the_last_frame_is_corrupt_and_left_alone() {
            let dir = tempfile::tempdir().unwrap();
            assert_eq!(run(&open(dir.path()), "a", 1..=50), range(1..=50));
            let first = log_len(&open(dir.path())) as usize;
            assert_eq!(run(&open(dir.path()), "a", 51..=100), range(51..=100));
            let path = dir.path().join(WINDOWS);
            let whole = fs::read(&path).unwrap();
            let refused = |bytes: &[u8], needle: &str| {
                fs::write(&path, bytes).unwrap();
                let Err(StoreError::Corrupt { what, detail }) = FileStore::open(dir.path()) else {
                    panic!("{needle}: must not open");
                };
                assert_eq!(what, path.display().to_string());
                assert!(detail.contains(needle), "{detail}");
                assert_eq!(fs::read(&path).unwrap(), bytes, "left as it was");
            };
            let mut bad = whole.clone();
            bad[first - 3] ^= 0x01;
            refused(&bad, "checksum mismatch in the frame at byte");
            refused(b"{\"not\": \"ours\"}", "not a tidemark window file");
            let mut newer = whole.clone();
            newer[MAGIC_LEN_OF_WINDOWS] = 2;
            refused(&newer, "version 2");
            let mut header = whole.clone();
            header[MAGIC_LEN_OF_WINDOWS + 6] ^= 0x10;
            refused(&header, "header checksum mismatch");
            refused(&whole[..MAGIC_LEN_OF_WINDOWS + 7], "truncated");
            // The store does not start over either: its cursors stay too.
            assert!(load(&FileStore::open_cursors_only(dir.path()).unwrap(), "a").is_some());
        }

        #[test]
        fn compaction_keeps_the_windows_and_shrinks_the_log() {
            let dir = tempfile::tempdir().unwrap();
            let store = open(dir.path());
            store.windows.as_ref().unwrap().log().set_compact_min(0);
            let mut sizes = Vec::new();
            for round in 0..20u64 {
                let ids = round * 100 + 1..=round * 100 + 100;
                assert_eq!(run_flushing(&store, "a", ids.clone(), 5), range(ids));
                sizes.push(log_len(&store));
            }
            // Two streams, one deleted: the fold drops it.
            assert_eq!(run_flushing(&store, "b", 1..=200, 5), range(1..=200));
            let grown = sizes.iter().copied().max().unwrap();
            assert!(
                sizes.windows(2).any(|w| w[1] < w[0]),
                "never compacted: {sizes:?}"
            );
            let kept = smol::block_on(store.load_window(&key("a")))
                .unwrap()
                .unwrap();
            assert_eq!(kept.len(), 1024, "the newest 1,024 of 2,000 ids");
            // 20 rounds x 20 flushes of 5 ids appended one record each;
            // a compacted window is one record.
            assert!(grown < 20 * 20 * 60, "{sizes:?}");
            drop(store);
            let store = open(dir.path());
            assert_eq!(
                smol::block_on(store.load_window(&key("a"))).unwrap(),
                Some(kept)
            );
            assert_eq!(run(&store, "a", 1001..=2010), range(2001..=2010));
            assert_eq!(run(&store, "b", 150..=210), range(201..=210));
        }

        #[test]
        fn a_deleted_stream_forgets_its_window_and_can_store_again() {
            let dir = tempfile::tempdir().unwrap();
            let store = open(dir.path());
            assert_eq!(run(&store, "a", 1..=50), range(1..=50));
            assert_eq!(run(&store, "b", 1..=5), range(1..=5));
            let clock = SmolClock::new();
            let (registry, worker) = persistence(store.clone(), clock, config());
            smol::block_on(async {
                let worker = smol::spawn(worker.run());
                registry.remove(&key("a")).await.unwrap();
                registry
                    .shutdown(clock.now() + Millis::from_secs(5))
                    .await
                    .unwrap();
                worker.await;
            });
            drop((registry, store));
            let store = open(dir.path());
            assert_eq!(load(&store, "a"), None);
            assert_eq!(smol::block_on(store.load_window(&key("a"))).unwrap(), None);
            assert_eq!(
                smol::block_on(store.load_window(&key("b")))
                    .unwrap()
                    .unwrap()
                    .len(),
                5
            );
            // A new stream of the same name: nothing of the old one drops.
            assert_eq!(run(&store, "a", 1..=20), range(1..=20));
            assert_eq!(run(&open(dir.path()), "a", 1..=30), range(21..=30));
            // Deleting a stream that has no window is a cursor write only.
            let len = log_len(&store);
            smol::block_on(store.delete(&key("nothing"))).unwrap();
            assert_eq!(log_len(&store), len);
        }

        #[test]
        fn a_directory_of_cursors_only_opens_resumes_and_gets_a_key() {
            let dir = tempfile::tempdir().unwrap();
            // As today's version writes it: cursors.tdm alone.
            fs::write(
                dir.path().join(STATE),
                encode([cursor("a", "40", 40)].iter()),
            )
            .unwrap();
            let store = open(dir.path());
            assert!(smol::block_on(store.window_key()).unwrap().is_some());
            assert!(store.windows_path().exists());
            assert_eq!(smol::block_on(store.load_window(&key("a"))).unwrap(), None);
            // Only the cursor's id is known at first...
            assert_eq!(
                run(&store, "a", 35..=60),
                [range(35..=39), range(41..=60)].concat()
            );
            // ...and from then on the window too.
            assert_eq!(run(&open(dir.path()), "a", 35..=70), range(61..=70));
        }

        #[test]
        fn a_cursors_only_store_deletes_a_log_that_would_go_stale() {
            let dir = tempfile::tempdir().unwrap();
            assert_eq!(run(&open(dir.path()), "a", 1..=10), range(1..=10));
            let store = FileStore::open_cursors_only(dir.path()).unwrap();
            assert!(store.windows_path().exists(), "opening deletes nothing");
            smol::block_on(store.save_batch(&[cursor("a", "11", 11)])).unwrap();
            assert!(!store.windows_path().exists());
        }

        #[cfg(unix)]
        #[test]
        fn the_log_is_0600_when_made_appended_and_compacted() {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
            let root = tempfile::tempdir().unwrap();
            let dir = root.path().join("state");
            let store = open(&dir);
            assert_eq!(mode(&dir), 0o700);
            assert_eq!(mode(&store.windows_path()), 0o600);
            store.windows.as_ref().unwrap().log().set_compact_min(0);
            let mut sizes = Vec::new();
            for round in 0..10u64 {
                run_flushing(&store, "a", round * 50 + 1..=round * 50 + 50, 5);
                assert_eq!(mode(&store.windows_path()), 0o600);
                sizes.push(log_len(&store));
            }
            assert!(sizes.windows(2).any(|w| w[1] < w[0]), "{sizes:?}");
            assert_eq!(mode(&store.path()), 0o600);
        }
    }
}
