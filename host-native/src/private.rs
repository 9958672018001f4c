//! State on disk that only its owner can read, and secrets that are never
//! printed whole.
//!
//! The state directory of `follow` and `mcp` holds cursors and the records
//! of unfinished MCP calls, which carry the `Mcp-Session-Id` (it works like
//! a bearer token); the proxy's `--log` directory holds events and the key
//! of its identity hashes. So:
//!
//! - [`private_dir`] creates such a directory (and any missing parent) with
//!   mode `0700`. A directory that already exists keeps its mode: if it
//!   grants its group or others any permission, one warning on stderr names
//!   it, its mode and the fix (`chmod 700 DIR`).
//! - [`private_file`] gives the options of a file created `0600`, so the
//!   mode is set when the file is created, before anything is written to it.
//!   The process umask can only remove bits from both.
//! - [`Redacted`] prints a secret (a session id) as a short prefix and `…`:
//!   enough to tell sessions apart, never the whole value. Header values are
//!   never printed at all; [`HeaderNames`] shows the names only.

use std::collections::BTreeSet;
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The mode of a new private directory.
pub(crate) const DIR_MODE: u32 = 0o700;
/// The mode of a new private file.
pub(crate) const FILE_MODE: u32 = 0o600;
/// The most characters of a secret [`Redacted`] shows.
const SHOWN: usize = 8;

/// Creates `dir` (and any missing parent) with mode `0700`, or, if it is
/// there already, leaves its mode alone and warns once per process on
/// stderr when the mode lets its group or others in.
pub(crate) fn private_dir(dir: &Path) -> io::Result<()> {
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {
            if let Some(warning) = shared_warning(dir, &meta) {
                warn_once(dir, &warning);
            }
            Ok(())
        }
        // Not a directory: creating it says so.
        Ok(_) => create(dir),
        Err(e) if e.kind() == io::ErrorKind::NotFound => create(dir),
        Err(e) => Err(e),
    }
}

#[cfg(unix)]
fn create(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
}

#[cfg(not(unix))]
fn create(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)
}

/// The warning for an existing directory `dir` whose mode lets its group or
/// others in; `None` if only its owner may use it.
#[cfg(unix)]
fn shared_warning(dir: &Path, meta: &fs::Metadata) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o7777;
    (mode & 0o077 != 0).then(|| {
        format!(
            "tidemark: warning: {} is open to other users (mode {mode:04o}); it holds session \
             ids, cursors and keys: run chmod 700 {}",
            dir.display(),
            dir.display()
        )
    })
}

#[cfg(not(unix))]
fn shared_warning(_: &Path, _: &fs::Metadata) -> Option<String> {
    None
}

/// Prints `warning` unless one was printed for `dir` already.
fn warn_once(dir: &Path, warning: &str) {
    static WARNED: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());
    let first = WARNED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(dir.to_path_buf());
    if first {
        eprintln!("{warning}");
    }
}

/// Options that create a file with mode `0600` (set with the file, before
/// anything is written; an existing file keeps its mode, so a file that
/// receives a secret is created new: see
/// [`replace_durably`](crate::file_store::replace_durably)).
pub(crate) fn private_file() -> OpenOptions {
    #[cfg_attr(not(unix), allow(unused_mut))]
    let mut options = OpenOptions::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(FILE_MODE);
    }
    options
}

/// A secret for messages: at most its first 8 characters, and never more
/// than half of it, then `…` (a 36-character session id shows 8).
#[derive(Clone, Copy)]
pub(crate) struct Redacted<'a>(pub(crate) &'a str);

impl fmt::Display for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = SHOWN.min(self.0.chars().count() / 2);
        let end = self.0.char_indices().nth(shown).map_or(0, |(i, _)| i);
        write!(f, "{}…", &self.0[..end])
    }
}

impl fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// Request headers for `Debug`: their names only, the values may be
/// credentials.
pub(crate) struct HeaderNames<'a>(pub(crate) &'a [(String, String)]);

impl fmt::Debug for HeaderNames<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        for (name, _) in self.0 {
            list.entry(&format_args!("{name}: <redacted>"));
        }
        list.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_shows_a_prefix_only() {
        let id = "3f2a9c1e-7b4d-4e8a-9f00-1234567890ab";
        assert_eq!(Redacted(id).to_string(), "3f2a9c1e…");
        assert_eq!(format!("{:?}", Redacted(id)), "\"3f2a9c1e…\"");
        // Short secrets: never more than half.
        assert_eq!(Redacted("abcdefgh").to_string(), "abcd…");
        assert_eq!(Redacted("abc").to_string(), "a…");
        assert_eq!(Redacted("a").to_string(), "…");
        assert_eq!(Redacted("").to_string(), "…");
        // Characters, not bytes.
        assert_eq!(Redacted("ééééééééééééééééé").to_string(), "éééééééé…");
    }

    #[test]
    fn header_values_are_not_in_debug() {
        let headers = [("Authorization".to_owned(), "Bearer s3cr3t".to_owned())];
        let shown = format!("{:?}", HeaderNames(&headers));
        assert_eq!(shown, "[Authorization: <redacted>]");
    }

    #[cfg(unix)]
    #[test]
    fn a_new_dir_is_0700_with_its_parents_and_files_are_0600() {
        use std::io::Write;
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/b");
        private_dir(&dir).unwrap();
        assert_eq!(mode(&root.path().join("a")), 0o700);
        assert_eq!(mode(&dir), 0o700);
        let path = dir.join("f");
        let mut file = private_file()
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        file.write_all(b"secret").unwrap();
        assert_eq!(mode(&path), 0o600);
    }

    #[cfg(unix)]
    #[test]
    fn an_open_dir_is_warned_about_and_left_alone() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("state");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o750)).unwrap();
        let meta = fs::metadata(&dir).unwrap();
        let warning = shared_warning(&dir, &meta).expect("a warning");
        assert!(warning.contains("mode 0750"), "{warning}");
        assert!(
            warning.contains(&format!("chmod 700 {}", dir.display())),
            "{warning}"
        );
        private_dir(&dir).unwrap();
        let mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o750, "an existing directory keeps its mode");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(shared_warning(&dir, &fs::metadata(&dir).unwrap()), None);
    }
}
