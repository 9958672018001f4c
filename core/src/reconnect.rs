//! When to reconnect, and when to stop trying.
//!
//! [`ReconnectPolicy`] is sans-I/O: it is told what happened (connected, a
//! byte arrived, the server sent `retry:`, the attempt failed) with the time,
//! and answers with a decision. The resumable stream driver calls it; hosts
//! with their own loop can too.
//!
//! - **Backoff**: capped exponential with additive jitter (up to half
//!   again). Once the server has sent `retry:`, that value is the first
//!   step, as in a browser's `EventSource`: the reconnect after a stream
//!   that delivered data waits the server's `retry:` plus jitter, even below
//!   the configured first delay, and attempts in a row that fail double it
//!   from there (so no delay is ever below it). A `retry:` below
//!   [`MIN_RETRY`] counts as that, so that no server can make clients
//!   reconnect in a tight loop. `Retry-After` on a 429 or
//!   503 is honoured the same way: hosts read it with [`parse_retry_after`],
//!   which takes delta-seconds itself and leaves the HTTP-date form to a
//!   date parser and a wall-clock time that the host passes in (the core
//!   reads no clock), then hand the delay to [`check_response`].
//! - **Progress**: any received byte, keep-alive comments included, counts as
//!   progress and refills the budget of attempts; a stream that gets nothing
//!   for `max_attempts` attempts in a row stops with an error.
//! - **Reset**: a connection that received anything, or stayed up for
//!   `healthy_after`, starts the backoff over at its first step, so a server
//!   that closes streams routinely (proxies, MCP servers ending a response
//!   stream) is rejoined promptly; only attempts in a row that receive
//!   nothing back off exponentially.
//! - **Idle watchdog**: no byte for `idle_timeout` (default 45 s, three
//!   missed 15 s keep-alives) means the connection is dead.
//! - **Requests with a body** (a POST stream's first request) are sent
//!   again only after an answer saying the server did not act on them
//!   ([`Failure::may_resend_body`]: 408, 429, 503); the resumable stream
//!   ends on any other failure of such a request instead of repeating it.
//! - **Permanent failures** (401, 403, 404, 405, 410 and other 4xx except 408
//!   and 429, 204 No Content, a wrong content type) stop at once with a clear
//!   error instead of looping.

use crate::backoff::{Backoff, Rng, random_seed};
use crate::clock::Millis;
use core::fmt;

/// The shortest reconnect delay a server's `retry:` can ask for: 50 ms.
pub const MIN_RETRY: Millis = Millis(50);

/// Settings of a [`ReconnectPolicy`].
#[derive(Clone, Debug)]
pub struct ReconnectConfig {
    /// Backoff between attempts (default 250 ms doubling to 30 s).
    pub backoff: Backoff,
    /// Attempts in a row without receiving a single byte before giving up
    /// (default 10; `None`: never give up).
    pub max_attempts: Option<u32>,
    /// A connection without any byte for this long is dead (default 45 s).
    pub idle_timeout: Millis,
    /// A connection that lasted this long resets the backoff even if it
    /// received nothing (default 30 s).
    pub healthy_after: Millis,
    /// Seed of the jitter. Default: random per process.
    pub seed: u64,
}

impl Default for ReconnectConfig {
    fn default() -> Self {
        ReconnectConfig {
            backoff: Backoff {
                initial: Millis(250),
                max: Millis::from_secs(30),
            },
            max_attempts: Some(10),
            idle_timeout: Millis::from_secs(45),
            healthy_after: Millis::from_secs(30),
            seed: random_seed(),
        }
    }
}

/// Why a connection attempt or a connection failed.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The server answered with a non-200 status.
    Status {
        /// The HTTP status code.
        code: u16,
        /// The `Retry-After` delay, if the server sent one.
        retry_after: Option<Millis>,
    },
    /// The server answered 200 with a content type other than
    /// `text/event-stream`.
    ContentType(String),
    /// The connection could not be made or broke (DNS, refused, reset, TLS,
    /// the stream ended).
    Network(String),
    /// No byte arrived for the idle timeout.
    Idle(Millis),
    /// The request itself cannot work (a malformed URL, an unsupported
    /// scheme, an invalid header). Permanent.
    Request(String),
}

impl Failure {
    /// The HTTP status, if the server answered with one.
    pub fn status(&self) -> Option<u16> {
        match self {
            Failure::Status { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether retrying can help. Client errors other than 408 and 429, 204
    /// No Content (the server's way of saying "stop") and a wrong content
    /// type are permanent.
    pub fn is_retryable(&self) -> bool {
        match self {
            Failure::Status { code, .. } => match code {
                204 => false,
                408 | 429 => true,
                400..=499 => false,
                _ => true,
            },
            Failure::ContentType(_) | Failure::Request(_) => false,
            Failure::Network(_) | Failure::Idle(_) => true,
        }
    }
}

impl Failure {
    /// Whether a request with a body (a POST) that failed this way may be
    /// sent again. Only when the server said it did not act on it: 408
    /// (it did not receive the whole request), 429 (too many requests) and
    /// 503 (unavailable), and a request the browser or client could not
    /// even build. Not after a network failure (the request may have
    /// arrived and been acted on, with the answer lost), nor after other
    /// 5xx (a 500, or a 502/504 from a gateway, says nothing about whether
    /// the service acted). The [`ReconnectPolicy`] still decides when, and
    /// whether the budget of attempts allows it.
    pub fn may_resend_body(&self) -> bool {
        matches!(
            self,
            Failure::Status {
                code: 408 | 429 | 503,
                ..
            } | Failure::Request(_)
        )
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Status { code, .. } => write!(f, "server answered HTTP {code}"),
            Failure::ContentType(ct) => {
                write!(
                    f,
                    "server answered with content type {ct:?}, not text/event-stream"
                )
            }
            Failure::Network(m) => write!(f, "connection failed: {m}"),
            Failure::Idle(t) => write!(f, "no data for {t}, connection presumed dead"),
            Failure::Request(m) => write!(f, "invalid request: {m}"),
        }
    }
}

impl std::error::Error for Failure {}

/// Why the stream stopped reconnecting.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GiveUp {
    /// The failure cannot be fixed by retrying.
    Permanent(Failure),
    /// The budget of attempts without progress ran out; the last failure.
    Exhausted {
        /// Attempts made in a row without receiving a byte.
        attempts: u32,
        /// The last failure.
        last: Failure,
    },
}

impl fmt::Display for GiveUp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GiveUp::Permanent(failure) => write!(f, "{failure} (not retrying)"),
            GiveUp::Exhausted { attempts, last } => {
                write!(
                    f,
                    "{last} (giving up after {attempts} attempts without data)"
                )
            }
        }
    }
}

impl std::error::Error for GiveUp {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            GiveUp::Permanent(failure) | GiveUp::Exhausted { last: failure, .. } => Some(failure),
        }
    }
}

/// What to do after a failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Reconnect at this time.
    RetryAt(Millis),
    /// Stop.
    GiveUp(GiveUp),
}

/// Reconnection state of one stream; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct ReconnectPolicy {
    config: ReconnectConfig,
    rng: Rng,
    /// Backoff step of the next retry (1-based).
    step: u32,
    /// Attempts in a row that received nothing.
    barren: u32,
    /// The server's `retry:`, if it sent one.
    floor: Option<Millis>,
    connected_at: Option<Millis>,
    last_byte: Millis,
    got_bytes: bool,
}

impl ReconnectPolicy {
    /// A policy with no history.
    pub fn new(config: ReconnectConfig) -> Self {
        ReconnectPolicy {
            rng: Rng::new(config.seed),
            config,
            step: 1,
            barren: 0,
            floor: None,
            connected_at: None,
            last_byte: Millis::ZERO,
            got_bytes: false,
        }
    }

    /// A connection was established (the response headers were good).
    pub fn on_connected(&mut self, now: Millis) {
        self.connected_at = Some(now);
        self.last_byte = now;
        self.got_bytes = false;
    }

    /// Bytes arrived on the connection (any bytes, comments included).
    pub fn on_bytes(&mut self, now: Millis) {
        self.last_byte = now;
        self.got_bytes = true;
        self.barren = 0;
    }

    /// The server sent `retry: ms`: the first backoff step from now on, and
    /// so the floor of every later delay (at least [`MIN_RETRY`]).
    pub fn on_retry_hint(&mut self, ms: u64) {
        self.floor = Some(Millis(ms).max(MIN_RETRY));
    }

    /// The server's current `retry:` floor (zero until it sends one).
    pub fn retry_floor(&self) -> Millis {
        self.floor.unwrap_or(Millis::ZERO)
    }

    /// When the idle watchdog fires, while connected.
    pub fn idle_deadline(&self) -> Option<Millis> {
        self.connected_at
            .map(|_| self.last_byte.saturating_add(self.config.idle_timeout))
    }

    /// The idle timeout.
    pub fn idle_timeout(&self) -> Millis {
        self.config.idle_timeout
    }

    /// The connection or the attempt failed at `now`: reconnect when, or stop.
    pub fn on_failure(&mut self, now: Millis, failure: Failure) -> Decision {
        let connected_at = self.connected_at.take();
        if !failure.is_retryable() {
            return Decision::GiveUp(GiveUp::Permanent(failure));
        }
        let healthy =
            connected_at.is_some_and(|at| now.saturating_sub(at) >= self.config.healthy_after);
        if healthy || self.got_bytes {
            self.step = 1;
        }
        if !self.got_bytes {
            self.barren += 1;
        }
        self.got_bytes = false;
        if let Some(max) = self.config.max_attempts
            && self.barren >= max
        {
            return Decision::GiveUp(GiveUp::Exhausted {
                attempts: self.barren,
                last: failure,
            });
        }
        let configured = self.config.backoff;
        let steps = match self.floor {
            Some(floor) => Backoff {
                initial: floor,
                max: configured.max.max(floor),
            },
            None => configured,
        };
        let backoff = steps.base_delay(self.step);
        self.step = self.step.saturating_add(1);
        let asked = match failure {
            Failure::Status { retry_after, .. } => retry_after.unwrap_or(Millis::ZERO),
            _ => Millis::ZERO,
        };
        let base = backoff.max(asked);
        let jitter = self.rng.up_to(base.0 / 2);
        Decision::RetryAt(now.saturating_add(base).saturating_add(Millis(jitter)))
    }
}

/// Checks the head of a response to an SSE request, for hosts' connectors: a
/// 200 whose content type is `text/event-stream` (parameters and case
/// ignored) is a stream; another status is a [`Failure::Status`] with
/// `retry_after`, the delay its `Retry-After` header asks for (see
/// [`parse_retry_after`]); a 200 of another content type (or none) is a
/// [`Failure::ContentType`].
pub fn check_response(
    status: u16,
    retry_after: Option<Millis>,
    content_type: Option<&str>,
) -> Result<(), Failure> {
    if status != 200 {
        return Err(Failure::Status {
            code: status,
            retry_after,
        });
    }
    let content_type = content_type.unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if !essence.eq_ignore_ascii_case("text/event-stream") {
        return Err(Failure::ContentType(content_type.to_owned()));
    }
    Ok(())
}

/// The delay a `Retry-After` header `value` asks for, at `now_unix` (the
/// wall clock, in milliseconds since the Unix epoch), or `None` if the value
/// is neither form (RFC 9110, section 10.2.3):
///
/// - delta-seconds (`120`): that many seconds (`None` past `u64::MAX`);
/// - an HTTP date (`Wed, 21 Oct 2015 07:28:00 GMT`): the time from
///   `now_unix` until then, zero for a date in the past. The core parses no
///   dates: `parse_date` is the host's parser, called with the trimmed value
///   and answering with the date in milliseconds since the Unix epoch, or
///   `None` for what is not a date. `now_unix` must come from the same
///   wall clock as the dates (the native host uses `SystemTime` and
///   `httpdate`, the browser `Date.now()` and `Date.parse`).
///
/// ```
/// use tidemark_core::Millis;
/// use tidemark_core::reconnect::parse_retry_after;
///
/// let no_dates = |_: &str| None;
/// assert_eq!(parse_retry_after("120", Millis(0), no_dates), Some(Millis::from_secs(120)));
///
/// let date = "Wed, 21 Oct 2015 07:28:00 GMT";
/// let parse = |value: &str| (value == date).then_some(Millis(1_445_412_480_000));
/// let now = Millis(1_445_412_470_000);
/// assert_eq!(parse_retry_after(date, now, parse), Some(Millis::from_secs(10)));
/// ```
pub fn parse_retry_after(
    value: &str,
    now_unix: Millis,
    parse_date: impl FnOnce(&str) -> Option<Millis>,
) -> Option<Millis> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    if value.bytes().all(|b| b.is_ascii_digit()) {
        return value.parse::<u64>().ok().map(Millis::from_secs);
    }
    parse_date(value).map(|date| date.saturating_sub(now_unix))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> ReconnectPolicy {
        ReconnectPolicy::new(ReconnectConfig {
            backoff: Backoff {
                initial: Millis(1000),
                max: Millis(8000),
            },
            max_attempts: Some(4),
            idle_timeout: Millis(45_000),
            healthy_after: Millis(30_000),
            seed: 5,
        })
    }

    fn retry_at(d: Decision) -> Millis {
        match d {
            Decision::RetryAt(at) => at,
            other => panic!("expected a retry, got {other:?}"),
        }
    }

    fn net() -> Failure {
        Failure::Network("reset".into())
    }

    #[test]
    fn backoff_grows_with_additive_jitter_and_caps() {
        let mut p = policy();
        p.config.max_attempts = None;
        let mut now = Millis(0);
        let mut bases = Vec::new();
        for _ in 0..6 {
            p.on_connected(now);
            let at = retry_at(p.on_failure(now, net()));
            let delay = at - now;
            let base = *[1000, 2000, 4000, 8000, 8000, 8000]
                .get(bases.len())
                .unwrap();
            assert!(
                delay >= Millis(base) && delay <= Millis(base + base / 2),
                "{delay} for base {base}"
            );
            bases.push(base);
            now = at;
        }
    }

    #[test]
    fn server_retry_is_a_floor_that_jitter_only_adds_to() {
        let mut p = policy();
        p.on_retry_hint(20_000);
        for _ in 0..20 {
            p.on_connected(Millis(0));
            p.on_bytes(Millis(0));
            let delay = retry_at(p.on_failure(Millis(0), net()));
            assert!(
                delay >= Millis(20_000) && delay <= Millis(30_000),
                "{delay}"
            );
        }
        assert_eq!(p.retry_floor(), Millis(20_000));
    }

    #[test]
    fn server_retry_below_the_first_delay_is_the_first_step() {
        // policy(): 1 s first delay, 8 s cap.
        let mut p = policy();
        p.config.max_attempts = None;
        p.on_retry_hint(100);
        let mut now = Millis(0);
        // After a stream that delivered data: the server's 100 ms, not 1 s.
        p.on_connected(now);
        p.on_bytes(now);
        let delay = retry_at(p.on_failure(now, net())) - now;
        assert!(delay >= Millis(100) && delay <= Millis(150), "{delay}");
        now = now.saturating_add(delay);
        // Attempts in a row that fail double from there.
        for base in [200, 400, 800, 1600, 3200, 6400, 8000, 8000] {
            let delay = retry_at(p.on_failure(now, net())) - now;
            assert!(
                delay >= Millis(base) && delay <= Millis(base + base / 2),
                "{delay} for base {base}"
            );
            now = now.saturating_add(delay);
        }
        // Data again: back to the server's value.
        p.on_connected(now);
        p.on_bytes(now);
        let delay = retry_at(p.on_failure(now, net())) - now;
        assert!(delay >= Millis(100) && delay <= Millis(150), "{delay}");
    }

    #[test]
    fn server_retry_has_a_lower_bound() {
        let mut p = policy();
        for ms in [0, 1, 49] {
            p.on_retry_hint(ms);
            assert_eq!(p.retry_floor(), MIN_RETRY);
            p.on_connected(Millis(0));
            p.on_bytes(Millis(0));
            let delay = retry_at(p.on_failure(Millis(0), net()));
            assert!(delay >= MIN_RETRY && delay <= Millis(75), "{delay}");
        }
    }

    #[test]
    fn retry_after_is_a_floor_under_a_short_server_retry() {
        let mut p = policy();
        p.on_retry_hint(100);
        p.on_connected(Millis(0));
        p.on_bytes(Millis(0));
        let busy = Failure::Status {
            code: 503,
            retry_after: Some(Millis(3_000)),
        };
        let delay = retry_at(p.on_failure(Millis(0), busy));
        assert!(delay >= Millis(3_000) && delay <= Millis(4_500), "{delay}");
    }

    #[test]
    fn retry_after_is_honoured() {
        let mut p = policy();
        let failure = Failure::Status {
            code: 503,
            retry_after: Some(Millis(120_000)),
        };
        assert!(retry_at(p.on_failure(Millis(0), failure)) >= Millis(120_000));
        let too_many = Failure::Status {
            code: 429,
            retry_after: Some(Millis(5_000)),
        };
        assert!(retry_at(p.on_failure(Millis(0), too_many)) >= Millis(5_000));
    }

    #[test]
    fn permanent_failures_stop_at_once() {
        for code in [204, 400, 401, 403, 404, 405, 410] {
            let failure = Failure::Status {
                code,
                retry_after: None,
            };
            assert_eq!(
                policy().on_failure(Millis(0), failure.clone()),
                Decision::GiveUp(GiveUp::Permanent(failure))
            );
        }
        let bad = Failure::Request("unsupported scheme ftp".into());
        assert!(!bad.is_retryable());
        let ct = Failure::ContentType("text/html".into());
        assert!(matches!(
            policy().on_failure(Millis(0), ct),
            Decision::GiveUp(GiveUp::Permanent(_))
        ));
        for code in [408, 429, 500, 502, 503, 504] {
            let failure = Failure::Status {
                code,
                retry_after: None,
            };
            assert!(failure.is_retryable(), "{code}");
        }
    }

    #[test]
    fn budget_counts_only_attempts_without_bytes() {
        let mut p = policy();
        for _ in 0..3 {
            retry_at(p.on_failure(Millis(0), net()));
        }
        // A connection that delivered even one keep-alive byte refills it.
        p.on_connected(Millis(0));
        p.on_bytes(Millis(1));
        retry_at(p.on_failure(Millis(2), net()));
        for _ in 0..3 {
            retry_at(p.on_failure(Millis(0), net()));
        }
        match p.on_failure(Millis(0), net()) {
            Decision::GiveUp(GiveUp::Exhausted { attempts, .. }) => assert_eq!(attempts, 4),
            other => panic!("expected to give up, got {other:?}"),
        }
    }

    #[test]
    fn a_healthy_period_resets_the_backoff() {
        let mut p = policy();
        p.config.max_attempts = None;
        for _ in 0..3 {
            retry_at(p.on_failure(Millis(0), net()));
        }
        p.on_connected(Millis(100_000));
        let delay = retry_at(p.on_failure(Millis(130_000), net())) - Millis(130_000);
        assert!(
            delay <= Millis(1500),
            "reset to the first step, got {delay}"
        );

        let mut q = policy();
        q.config.max_attempts = None;
        for _ in 0..3 {
            retry_at(q.on_failure(Millis(0), net()));
        }
        q.on_connected(Millis(100_000));
        let delay = retry_at(q.on_failure(Millis(110_000), net())) - Millis(110_000);
        assert!(
            delay >= Millis(8000),
            "a short connection that received nothing keeps backing off"
        );
    }

    #[test]
    fn a_connection_that_received_data_resets_the_backoff() {
        let mut p = policy();
        for _ in 0..3 {
            retry_at(p.on_failure(Millis(0), net()));
        }
        p.on_connected(Millis(50_000));
        p.on_bytes(Millis(50_001));
        let delay = retry_at(p.on_failure(Millis(50_002), net())) - Millis(50_002);
        assert!(delay <= Millis(1500), "back to the first step, got {delay}");
    }

    #[test]
    fn idle_deadline_follows_the_last_byte() {
        let mut p = policy();
        assert_eq!(p.idle_deadline(), None);
        p.on_connected(Millis(1000));
        assert_eq!(p.idle_deadline(), Some(Millis(46_000)));
        p.on_bytes(Millis(5000));
        assert_eq!(p.idle_deadline(), Some(Millis(50_000)));
        let _ = p.on_failure(Millis(50_000), Failure::Idle(Millis(45_000)));
        assert_eq!(p.idle_deadline(), None);
    }

    #[test]
    fn response_heads() {
        let sse = Some("text/event-stream");
        assert_eq!(check_response(200, None, sse), Ok(()));
        assert_eq!(
            check_response(
                200,
                Some(Millis(5000)),
                Some(" Text/Event-Stream ; charset=utf-8")
            ),
            Ok(())
        );
        assert_eq!(
            check_response(503, Some(Millis(7000)), sse),
            Err(Failure::Status {
                code: 503,
                retry_after: Some(Millis(7000))
            })
        );
        assert_eq!(
            check_response(404, None, None),
            Err(Failure::Status {
                code: 404,
                retry_after: None
            })
        );
        assert_eq!(
            check_response(200, None, Some("text/html; charset=utf-8")),
            Err(Failure::ContentType("text/html; charset=utf-8".into()))
        );
        assert_eq!(
            check_response(200, None, None),
            Err(Failure::ContentType(String::new()))
        );
    }

    /// 2015-10-21 07:28:00 UTC.
    const DATE: &str = "Wed, 21 Oct 2015 07:28:00 GMT";
    const DATE_UNIX: Millis = Millis(1_445_412_480_000);

    /// A host's date parser that knows one date.
    fn one_date(value: &str) -> Option<Millis> {
        (value == DATE).then_some(DATE_UNIX)
    }

    fn never_called(value: &str) -> Option<Millis> {
        panic!("{value:?} is not for the date parser")
    }

    #[test]
    fn retry_after_in_delta_seconds() {
        assert_eq!(
            parse_retry_after(" 120 ", DATE_UNIX, never_called),
            Some(Millis(120_000))
        );
        assert_eq!(
            parse_retry_after("0", DATE_UNIX, never_called),
            Some(Millis::ZERO)
        );
        assert_eq!(
            parse_retry_after("99999999999999999999", DATE_UNIX, never_called),
            None
        );
        assert_eq!(parse_retry_after("", DATE_UNIX, never_called), None);
        assert_eq!(parse_retry_after("  ", DATE_UNIX, never_called), None);
    }

    #[test]
    fn retry_after_as_an_http_date() {
        let before = DATE_UNIX - Millis(2500);
        assert_eq!(
            parse_retry_after(DATE, before, one_date),
            Some(Millis(2500))
        );
        assert_eq!(
            parse_retry_after(&format!("  {DATE}\t"), before, one_date),
            Some(Millis(2500)),
            "the parser gets the trimmed value"
        );
        assert_eq!(
            parse_retry_after(DATE, DATE_UNIX, one_date),
            Some(Millis::ZERO)
        );
        let after = DATE_UNIX + Millis::from_secs(3600);
        assert_eq!(
            parse_retry_after(DATE, after, one_date),
            Some(Millis::ZERO),
            "a date in the past asks for no delay"
        );
    }

    #[test]
    fn retry_after_that_is_neither_form_is_ignored() {
        for garbage in ["soon", "-1", "1.5", "Wed, 21 Oct 2015"] {
            assert_eq!(parse_retry_after(garbage, DATE_UNIX, one_date), None);
        }
    }
}
