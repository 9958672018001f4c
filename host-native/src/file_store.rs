//! A crash-safe cursor store in one state directory.
//!
//! All cursors live in one file, `cursors.tdm`, rewritten whole on every
//! flush: the new state goes to `cursors.tdm.tmp`, is fsynced, renamed over
//! the old file, and the directory is fsynced. A crash at any instant leaves
//! either the previous state or the new one, never a torn or empty file. The
//! persistence worker writes at most once per flush interval for all dirty
//! streams, so this costs one file write per flush, not one per event.
//!
//! The file is binary and self-checking: a magic line, a format version, the
//! cursors, and a CRC-32 of everything before it. A file that is not ours, is
//! from a newer version, or fails its checksum is reported as
//! [`StoreError::Corrupt`] naming the file, and the store refuses to write
//! over it: someone has to look at it first.
//!
//! The directory is private: created `0700`, its files `0600` (see the
//! crate's `private` module); an existing directory open to other users is
//! warned about on stderr, not changed.

use crate::private::{private_dir, private_file};
use smol::lock::Mutex as AsyncMutex;
use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use tidemark_core::{Cursor, Millis, Store, StoreError, StreamKey, merge_newest};

const MAGIC: &[u8] = b"tidemark cursors\n";
const VERSION: u32 = 1;
const STATE: &str = "cursors.tdm";
const TEMP: &str = "cursors.tdm.tmp";

/// Cursors of every stream in one crash-safe file; see the
/// [module docs](self).
pub struct FileStore {
    dir: PathBuf,
    state: Mutex<HashMap<StreamKey, Cursor>>,
    /// Serializes rewrites so that an older snapshot never lands after a
    /// newer one.
    writing: AsyncMutex<()>,
}

impl fmt::Debug for FileStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileStore")
            .field("dir", &self.dir)
            .field("streams", &self.state().len())
            .finish_non_exhaustive()
    }
}

impl FileStore {
    /// Opens (creating if needed) the state directory `dir` and reads its
    /// cursors. A leftover temporary file from a crash is removed.
    ///
    /// A new directory is created `0700` and the cursor file `0600`; an
    /// existing directory that grants its group or others any permission
    /// keeps its mode and gets a warning on stderr (`chmod 700 DIR`).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, StoreError> {
        let dir = dir.as_ref().to_path_buf();
        private_dir(&dir).map_err(|e| io_error(&dir, &e))?;
        let temp = dir.join(TEMP);
        match fs::remove_file(&temp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(&temp, &e)),
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
        let state = cursors.into_iter().map(|c| (c.key.clone(), c)).collect();
        Ok(FileStore {
            dir,
            state: Mutex::new(state),
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
    /// only once it is durable.
    async fn rewrite(
        &self,
        change: impl FnOnce(&mut HashMap<StreamKey, Cursor>),
    ) -> Result<(), StoreError> {
        let _writing = self.writing.lock().await;
        let mut next = self.state().clone();
        change(&mut next);
        let bytes = encode(next.values());
        let dir = self.dir.clone();
        smol::unblock(move || {
            replace_durably(&dir, STATE, &bytes).map_err(|(path, e)| io_error(&path, &e))
        })
        .await?;
        *self.state() = next;
        Ok(())
    }
}

impl Store for FileStore {
    async fn load(&self, key: &StreamKey) -> Result<Option<Cursor>, StoreError> {
        Ok(self.state().get(key).cloned())
    }

    async fn save_batch(&self, cursors: &[Cursor]) -> Result<(), StoreError> {
        self.rewrite(|state| merge_newest(state, cursors)).await
    }

    async fn delete(&self, key: &StreamKey) -> Result<(), StoreError> {
        if !self.state().contains_key(key) {
            return Ok(());
        }
        self.rewrite(|state| {
            state.remove(key);
        })
        .await
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
    let crc = crc32(&out);
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
    if crc32(content) != stored {
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

/// CRC-32 (IEEE 802.3), bitwise: the state file is small and written at most
/// a few times per second, so a table is not worth its memory.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
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
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
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
        assert_eq!(names, [STATE], "no temporary file is left behind");
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
        let crc = crc32(&bytes[..n - 4]);
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
}
