//! MCP's Streamable HTTP transport, recognised by its headers.
//!
//! In front of an MCP server the proxy needs no flag: a request that
//! carries `Mcp-Session-Id` belongs to a session (and the session id is
//! part of its identity, so nothing crosses sessions), and
//! `MCP-Protocol-Version` says which revision the client negotiated.
//!
//! - **Resume by id alone** (revisions 2025-03-26 to 2025-11-25): the
//!   transport resumes a broken stream with a GET of the MCP endpoint that
//!   carries the session and the `Last-Event-ID` of the stream, whichever
//!   stream that was (a POST's answer or the standalone GET stream). The
//!   proxy's ids name their stream, so it resumes that stream of that
//!   session, or answers `404` when the id names no stream of the session.
//! - **Priming** (2025-11-25): every logged stream begins with an event of
//!   an id and empty data, so a stream cut before its first message can
//!   still be resumed.
//! - **The end of a session**: a `DELETE` the upstream accepts drops the
//!   session's logs; an upstream `404` for the session (it forgot it) ends
//!   them, what was logged staying resumable until retention drops it.
//! - **2026-07-28 and later** (SEP-2575 removed SSE resumability): streams
//!   pass through unchanged, with keep-alive comments added.

use hyper::HeaderMap;

/// The first revision whose clients expect a priming event.
const PRIMING_FROM: &str = "2025-11-25";

/// The first revision without SSE resumability (SEP-2575).
const UNRESUMABLE_FROM: &str = "2026-07-28";

/// What a request's headers say about MCP.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Mcp {
    /// It carries `Mcp-Session-Id`.
    pub session: bool,
    /// Its `MCP-Protocol-Version`, when that is a revision date.
    revision: Option<[u8; 10]>,
}

impl Mcp {
    /// What `headers` say.
    pub fn of(headers: &HeaderMap) -> Mcp {
        let revision = headers
            .get("mcp-protocol-version")
            .and_then(|v| <[u8; 10]>::try_from(v.as_bytes().trim_ascii()).ok())
            .filter(is_revision);
        Mcp {
            session: headers.contains_key("mcp-session-id"),
            revision,
        }
    }

    fn at_least(&self, revision: &str) -> bool {
        self.revision
            .is_some_and(|r| r.as_slice() >= revision.as_bytes())
    }

    /// Whether the client expects a priming event first on every stream.
    pub fn primes(&self) -> bool {
        self.at_least(PRIMING_FROM) && !self.passes_through()
    }

    /// Whether the client's revision has no SSE resumability: its streams
    /// pass through, not logged.
    pub fn passes_through(&self) -> bool {
        self.at_least(UNRESUMABLE_FROM)
    }
}

/// `YYYY-MM-DD`: such dates compare as their bytes do.
fn is_revision(r: &[u8; 10]) -> bool {
    r.iter().enumerate().all(|(i, &b)| {
        if i == 4 || i == 7 {
            b == b'-'
        } else {
            b.is_ascii_digit()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mcp(pairs: &[(&'static str, &'static str)]) -> Mcp {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, value.parse().unwrap());
        }
        Mcp::of(&headers)
    }

    #[test]
    fn revisions_decide_priming_and_pass_through() {
        let none = mcp(&[]);
        assert!(!none.session && !none.primes() && !none.passes_through());
        let old = mcp(&[
            ("mcp-session-id", "s"),
            ("mcp-protocol-version", "2025-06-18"),
        ]);
        assert!(old.session && !old.primes() && !old.passes_through());
        let priming = mcp(&[("mcp-protocol-version", "2025-11-25")]);
        assert!(priming.primes() && !priming.passes_through());
        let later = mcp(&[("mcp-protocol-version", " 2026-01-01 ")]);
        assert!(later.primes() && !later.passes_through());
        let unresumable = mcp(&[("mcp-protocol-version", "2026-07-28")]);
        assert!(!unresumable.primes() && unresumable.passes_through());
        let future = mcp(&[("mcp-protocol-version", "2027-03-01")]);
        assert!(future.passes_through());
    }

    #[test]
    fn a_version_that_is_not_a_date_is_no_revision() {
        for odd in ["2025-11-2", "2025/11/25", "latest", "2025-11-25x"] {
            let m = mcp(&[("mcp-protocol-version", odd)]);
            assert!(!m.primes() && !m.passes_through(), "{odd}");
        }
    }
}
