//! The durable record of an unfinished call: what to resume, in which
//! session, kept in the state directory until the result arrives.

use crate::file_store::{io_error, replace_durably};
use crate::private::{Redacted, private_dir};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use tidemark_core::{StoreError, StreamKey};

/// The record of an unfinished call, as JSON in `mcp/<hash>.json` (mode
/// `0600` in a `0700` directory: the session id works like a bearer token).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Record {
    /// The MCP endpoint.
    pub(super) url: String,
    /// The call's name (`--name`).
    pub(super) name: String,
    /// The tool called.
    pub(super) tool: String,
    /// Its arguments.
    pub(super) arguments: Value,
    /// The `Mcp-Session-Id` the server gave, if any.
    #[serde(default)]
    pub(super) session: Option<String>,
    /// The protocol revision the server answered `initialize` with.
    pub(super) protocol_version: String,
}

/// The session id as a prefix only.
impl fmt::Debug for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Record")
            .field("url", &self.url)
            .field("name", &self.name)
            .field("tool", &self.tool)
            .field("arguments", &self.arguments)
            .field("session", &self.session.as_deref().map(Redacted))
            .field("protocol_version", &self.protocol_version)
            .finish()
    }
}

impl Record {
    /// The headers of every request after `initialize`: the session, the
    /// protocol version, then the user's.
    pub(super) fn session_headers(&self, extra: &[(String, String)]) -> Vec<(String, String)> {
        let mut headers = Vec::with_capacity(extra.len() + 2);
        if let Some(session) = &self.session {
            headers.push(("mcp-session-id".to_owned(), session.clone()));
        }
        headers.push((
            "mcp-protocol-version".to_owned(),
            self.protocol_version.clone(),
        ));
        headers.extend_from_slice(extra);
        headers
    }

    /// The key of the call's cursor.
    pub(super) fn stream_key(&self) -> StreamKey {
        StreamKey::new(
            &self.url,
            format!(
                "mcp {} {} {}",
                self.name,
                self.session.as_deref().unwrap_or("-"),
                self.tool
            ),
        )
    }
}

/// Where the record of the call named `name` on `url` lives: `mcp/` in the
/// state directory, under a stable 64-bit FNV-1a hash of both.
pub(super) fn record_path(state: &Path, url: &str, name: &str) -> PathBuf {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in url.bytes().chain([0]).chain(name.bytes()) {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    state.join("mcp").join(format!("{hash:016x}.json"))
}

/// The record at `path`, if there is one; a damaged one is an error, never
/// ignored (ignoring it could call the tool twice).
pub(super) fn read_record(path: &Path) -> Result<Option<Record>, StoreError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(path, &e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| StoreError::Corrupt {
            what: path.display().to_string(),
            detail: format!("not the record of an MCP call: {e}"),
        })
}

/// Writes `record` durably (temp file, fsync, rename), privately: the
/// directory `0700` if it is new (a warning if it exists and is open to
/// others), the file `0600`.
pub(super) fn write_record(path: &Path, record: &Record) -> Result<(), StoreError> {
    let dir = path.parent().expect("a record path has a directory");
    private_dir(dir).map_err(|e| io_error(dir, &e))?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .expect("record names are ASCII");
    let bytes = serde_json::to_vec_pretty(record).expect("records serialize");
    replace_durably(dir, name, &bytes).map_err(|(path, e)| io_error(&path, &e))
}

/// Removes the record at `path`, if there is one.
pub(super) fn remove_record(path: &Path) -> Result<(), StoreError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_error(path, &e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    pub(crate) fn record() -> Record {
        Record {
            url: "http://127.0.0.1:1/mcp".into(),
            name: "default".into(),
            tool: "progress".into(),
            arguments: json!({ "count": 3 }),
            session: Some("abc".into()),
            protocol_version: "2025-11-25".into(),
        }
    }

    #[test]
    fn a_record_survives_a_write_and_a_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = record_path(dir.path(), "http://127.0.0.1:1/mcp", "default");
        assert_eq!(read_record(&path).unwrap(), None);
        write_record(&path, &record()).unwrap();
        assert_eq!(read_record(&path).unwrap(), Some(record()));
        remove_record(&path).unwrap();
        assert_eq!(read_record(&path).unwrap(), None);
        remove_record(&path).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn a_record_is_0600_in_a_0700_directory() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let dir = tempfile::tempdir().unwrap();
        let path = record_path(dir.path(), "u", "n");
        write_record(&path, &record()).unwrap();
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn debug_shows_a_prefix_of_the_session_only() {
        let record = Record {
            session: Some("0123456789abcdef-secret".into()),
            ..record()
        };
        let shown = format!("{record:?}");
        assert!(shown.contains("01234567…"), "{shown}");
        assert!(!shown.contains("89abcdef"), "{shown}");
    }

    #[test]
    fn the_format_is_the_one_earlier_versions_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let path = record_path(dir.path(), "u", "n");
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let written = json!({
            "url": "http://127.0.0.1:1/mcp",
            "name": "default",
            "tool": "progress",
            "arguments": { "count": 3 },
            "session": "abc",
            "protocolVersion": "2025-11-25",
        });
        fs::write(&path, written.to_string()).unwrap();
        assert_eq!(read_record(&path).unwrap(), Some(record()));
        write_record(&path, &record()).unwrap();
        let back: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(back, written);
        // Without a session (a server that gives none).
        let sessionless = json!({
            "url": "u", "name": "n", "tool": "t", "arguments": {},
            "protocolVersion": "2025-06-18",
        });
        fs::write(&path, sessionless.to_string()).unwrap();
        assert_eq!(read_record(&path).unwrap().unwrap().session, None);
    }

    #[test]
    fn a_damaged_record_is_reported_not_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = record_path(dir.path(), "u", "n");
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, b"{\"url\": 1}").unwrap();
        let error = read_record(&path).unwrap_err();
        assert!(matches!(error, StoreError::Corrupt { .. }), "{error}");
    }

    #[test]
    fn record_paths_differ_by_url_and_name_and_are_stable() {
        let dir = Path::new("state");
        let a = record_path(dir, "http://a/mcp", "x");
        assert_ne!(a, record_path(dir, "http://a/mcp", "y"));
        assert_ne!(a, record_path(dir, "http://a/mcpx", ""));
        // The FNV-1a 64 of "u\0n": a record written by one version is found
        // by the next.
        assert_eq!(
            record_path(dir, "u", "n"),
            dir.join("mcp").join("4dc4a9193f06d7da.json")
        );
    }

    #[test]
    fn session_headers_carry_the_session_and_version_first() {
        let extra = [("authorization".to_owned(), "Bearer t".to_owned())];
        let headers = record().session_headers(&extra);
        assert_eq!(
            headers,
            [
                ("mcp-session-id".to_owned(), "abc".to_owned()),
                ("mcp-protocol-version".to_owned(), "2025-11-25".to_owned()),
                ("authorization".to_owned(), "Bearer t".to_owned()),
            ]
        );
    }
}
