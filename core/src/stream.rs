//! The resumable stream: the client loop both hosts share.
//!
//! [`ResumableStream`] connects through a host [`Connector`] (native HTTP,
//! browser `fetch`), sends the tracker's last event id as `Last-Event-ID`,
//! parses the body, passes every event through the stream's
//! [`EventTracker`], and yields only fresh events. When the connection fails
//! it drops (aborts) it, asks the [`ReconnectPolicy`] when to try again,
//! sleeps on the [`Clock`], and reconnects from the current cursor.
//!
//! # Driving contract
//!
//! Call [`ResumableStream::next`] in a loop. It yields a [`StreamItem`]:
//! every effect of the stream is a value, the way quinn-proto's `poll`
//! returns events and str0m's `poll_output` returns outputs, so a host
//! reconstructs nothing from counters:
//!
//! - [`StreamItem::Open`]: a connection is up (a 200 `text/event-stream`
//!   answer), with the `Last-Event-ID` it was opened with;
//! - [`StreamItem::Resumable`]: only for a POST stream, right after the
//!   `Open` of the POST's answer when it carries a `Content-Location`: the
//!   URL the stream resumes from, for the host to store (durably, before it
//!   asks for the next item) so that a later run resumes there instead of
//!   sending the POST again;
//! - [`StreamItem::Event`]: a fresh event, to hand to the application;
//! - [`StreamItem::Reconnecting`]: the connection failed or could not be
//!   made, why, when the next attempt is due, and which attempt in a row it
//!   will be.
//!
//! For one connection the order is always `Open`, then its events, then
//! `Reconnecting`; an attempt that fails before its headers yields only
//! `Reconnecting`. A final error (`Err`) ends the sequence.
//!
//! # POST streams
//!
//! With a body ([`StreamConfig::body`]) the first request is a POST of it
//! (no `Last-Event-ID`: it starts a new answer). A POST is never sent
//! twice once the server may have acted on it:
//!
//! - its answer has a `Content-Location` ([`Connector::content_location`],
//!   what `tidemark proxy` adds): the stream yields
//!   [`StreamItem::Resumable`] and from then on resumes with a GET of that
//!   URL with `Last-Event-ID`, like any GET stream. A clean end of a
//!   connection that received data is confirmed at once (no backoff, no
//!   `Reconnecting`) by such a GET; a `204 No Content` to it ends the
//!   stream with [`StreamError::Done`]. A stream made with
//!   [`ResumableStream::with_resume_url`] (the URL a previous run stored)
//!   starts with that GET and never POSTs;
//! - its answer has none: the stream cannot be resumed. The clean end of
//!   the answer is [`StreamError::Done`], a broken connection
//!   [`StreamError::Unresumable`];
//! - it got no answer (a network failure before the response): the server
//!   may have acted on it, so it ends with [`StreamError::Unanswered`].
//!   Only answers saying it was not acted on (408, 429, 503; see
//!   [`Failure::may_resend_body`]) let the policy send it again. A 204 to
//!   the POST is [`StreamError::Done`] too.
//!
//! The next call to `next` (or an explicit [`ResumableStream::commit`])
//! declares the previous event delivered and moves the cursor: a crash
//! between receiving and handling an event repeats it, never skips it.
//! Hosts that deliver in groups take the other events already parsed with
//! [`ResumableStream::next_ready`] (no wait, no commit), hand them all over,
//! and the next call to `next` commits the whole group. Hosts that take
//! events borrowed, a chunk at a time, call [`ResumableStream::next_with`]:
//! each chunk's fresh events go to a closure, without a copy, and the call
//! yields [`StreamItem::Delivered`] with their count; the next call commits
//! them.
//! `next` is cancel-safe: dropping its future (to select on a shutdown
//! signal, say) loses nothing; the next call carries on. Every item is
//! yielded in the same poll that changes the state it reports, so a dropped
//! future never swallows one. Hosts that only want events call
//! [`ResumableStream::next_event`].
//!
//! The cursor survives connections: a resumed connection that drops before
//! any new id arrives resumes from the same id again, and events without an
//! id never move it. Replays the server sends anyway (a server that rewinds,
//! or one that ignores `Last-Event-ID` and starts over) are dropped as
//! duplicates inside the tracker's window.

use crate::clock::{Clock, Millis};
use crate::reconnect::{Decision, Failure, GiveUp, ReconnectConfig, ReconnectPolicy};
use crate::sse::{Event, EventRef, Item, ItemRef, Limits, ParseError, Parser};
use crate::tracker::EventTracker;
use core::fmt;
use futures::future::{Either, select};
use futures::{Stream, StreamExt};
use std::pin::pin;

/// What a connector is asked to open.
#[derive(Clone, Copy, Debug)]
pub struct ConnectRequest<'a> {
    /// The stream's URL.
    pub url: &'a str,
    /// Extra request headers (authorization, MCP session id, ...).
    pub headers: &'a [(String, String)],
    /// The `Last-Event-ID` header to send, if any.
    pub last_event_id: Option<&'a str>,
    /// The request body: `Some` makes the request a POST of these bytes
    /// (the first request of a POST stream), `None` a GET. Connectors that
    /// cannot send a body fail such a request with [`Failure::Request`].
    pub body: Option<&'a [u8]>,
}

/// Opens SSE connections for a [`ResumableStream`]; implemented by hosts.
///
/// `connect` resolves once the response headers are in: with the body for a
/// 200 `text/event-stream` response, or with a [`Failure`] (`Status` with
/// its `Retry-After`, `ContentType`, `Network`). Dropping the body must abort
/// the connection. No `Send` bound: browser futures are `!Send`.
#[allow(async_fn_in_trait)]
pub trait Connector {
    /// A chunk of body bytes.
    type Chunk: AsRef<[u8]>;
    /// The response body; ends when the server closes the stream.
    type Body: Stream<Item = Result<Self::Chunk, Failure>> + Unpin;

    /// Opens a connection.
    async fn connect(&self, request: ConnectRequest<'_>) -> Result<Self::Body, Failure>;

    /// The `Content-Location` of the response `body` belongs to, as an
    /// absolute URL (resolved against the response's URL), if it has one.
    /// Read only for the answer to a POST: the stream resumes with a GET of
    /// it (see the [module docs](self)). The default is `None`, for
    /// connectors that send only GETs.
    fn content_location(&self, body: &Self::Body) -> Option<String> {
        let _ = body;
        None
    }
}

/// Why a [`ResumableStream`] stopped.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamError {
    /// The reconnect policy gave up.
    GaveUp(GiveUp),
    /// The server sent something that breaks the configured limits.
    Parse(ParseError),
    /// The stream was closed by [`ResumableStream::close`].
    Closed,
    /// The server says the stream is complete: a `204 No Content` to a POST
    /// stream's resume (or to the POST), or the clean end of a POST's
    /// answer that cannot be resumed.
    Done,
    /// A POST's answer without a `Content-Location` broke: it cannot be
    /// resumed, and the POST is never sent again.
    Unresumable(Failure),
    /// A POST got no answer (the failure): the server may have acted on
    /// it, so it is not sent again.
    Unanswered(Failure),
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamError::GaveUp(g) => write!(f, "{g}"),
            StreamError::Parse(e) => write!(f, "malformed stream: {e}"),
            StreamError::Closed => f.write_str("stream closed"),
            StreamError::Done => f.write_str("the server ended the stream"),
            StreamError::Unresumable(failure) => write!(
                f,
                "{failure}; cannot resume: the answer to the POST had no Content-Location"
            ),
            StreamError::Unanswered(failure) => write!(
                f,
                "{failure}; the POST got no answer and is not sent again \
                 (the server may have acted on it)"
            ),
        }
    }
}

impl StreamError {
    /// The connection failure that ended the stream, if one did.
    pub fn failure(&self) -> Option<&Failure> {
        match self {
            StreamError::GaveUp(GiveUp::Permanent(failure))
            | StreamError::GaveUp(GiveUp::Exhausted { last: failure, .. })
            | StreamError::Unresumable(failure)
            | StreamError::Unanswered(failure) => Some(failure),
            StreamError::Parse(_) | StreamError::Closed | StreamError::Done => None,
        }
    }
}

impl std::error::Error for StreamError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StreamError::GaveUp(give_up) => Some(give_up),
            StreamError::Parse(error) => Some(error),
            StreamError::Unresumable(failure) | StreamError::Unanswered(failure) => Some(failure),
            StreamError::Closed | StreamError::Done => None,
        }
    }
}

/// Settings of a [`ResumableStream`].
#[derive(Clone, Debug, Default)]
pub struct StreamConfig {
    /// Extra request headers sent on every connection.
    pub headers: Vec<(String, String)>,
    /// When to reconnect and when to give up.
    pub reconnect: ReconnectConfig,
    /// Parser limits on line and event size.
    pub limits: Limits,
    /// Go on past a line or event over `limits` (the parser discards it),
    /// yielding [`StreamItem::Skipped`], instead of ending the stream with
    /// [`StreamError::Parse`] (the default).
    pub skip_oversized: bool,
    /// A body to POST: the stream then starts with a POST of it and never
    /// sends it twice (see [POST streams](self#post-streams)). `None` (the
    /// default): a GET stream.
    pub body: Option<Vec<u8>>,
}

impl StreamConfig {
    /// These settings with reconnect delays from `initial`, doubling up to
    /// `max` (tests and local servers want milliseconds, not the default
    /// 250 ms to 30 s).
    pub fn with_backoff(mut self, initial: Millis, max: Millis) -> Self {
        self.reconnect.backoff = crate::Backoff { initial, max };
        self
    }
}

/// What [`ResumableStream::next`] yields; see the [module docs](self).
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamItem {
    /// A connection is open: the server answered 200 `text/event-stream`.
    Open {
        /// The `Last-Event-ID` the connection was opened with; `None` from
        /// the start of the stream.
        last_event_id: Option<String>,
    },
    /// A POST's answer carries a `Content-Location`: the stream resumes
    /// from `url` (absolute) from now on. Yielded right after its `Open`,
    /// before any event of it; a host that resumes across runs stores the
    /// URL (see [`ResumableStream::with_resume_url`]) before it asks for the
    /// next item.
    Resumable {
        /// The URL to resume from.
        url: String,
    },
    /// A fresh event, to hand to the application.
    Event(Event),
    /// The connection failed, or an attempt to open one did; the stream
    /// connects again at `retry_at` (on the stream's [`Clock`]) when `next`
    /// is called then.
    Reconnecting {
        /// Why.
        failure: Failure,
        /// When the next attempt is due.
        retry_at: Millis,
        /// Which attempt in a row the next one is: 1 after a connection
        /// that received data, counting up while attempts receive nothing.
        attempt: u32,
    },
    /// Only from [`ResumableStream::next_with`]: this many fresh events
    /// (at least one) were handed to its sink.
    Delivered {
        /// How many.
        events: usize,
    },
    /// With [`StreamConfig::skip_oversized`]: a line or event over the
    /// limits was discarded (yielded after the events parsed from the same
    /// chunk); the stream goes on.
    Skipped {
        /// Which limit.
        error: ParseError,
    },
}

/// Counters of one resumable stream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Connections opened.
    pub connects: u64,
    /// Reconnects scheduled after a failure.
    pub reconnects: u64,
    /// Fresh events handed out.
    pub delivered: u64,
    /// Replayed events dropped.
    pub duplicates: u64,
    /// Comment lines (keep-alives) received.
    pub comments: u64,
    /// Body bytes received.
    pub bytes: u64,
    /// The last connection failure.
    pub last_failure: Option<Failure>,
}

enum State<B> {
    Connect,
    Wait(Millis),
    Open(B, Parser),
    Stopped(StreamError),
}

/// A stream that resumes across drops; see the [module docs](self).
pub struct ResumableStream<C: Connector, K> {
    connector: C,
    clock: K,
    tracker: EventTracker,
    policy: ReconnectPolicy,
    url: String,
    headers: Vec<(String, String)>,
    limits: Limits,
    state: State<C::Body>,
    stats: StreamStats,
    /// Failures since the last connection that received a byte.
    failures: u32,
    /// When the last chunk was read: the time `next_ready` observes its
    /// events at, without a clock read per event.
    read_at: Millis,
    /// See [`StreamConfig::skip_oversized`].
    skip_oversized: bool,
    /// A discarded line or event not yet reported.
    skipped: Option<ParseError>,
    /// The body of a POST stream.
    body: Option<Vec<u8>>,
    /// Where a POST stream resumes (a GET), once known.
    resume_url: Option<String>,
    /// The POST got an answer (headers): it is never sent again.
    answered: bool,
    /// A [`StreamItem::Resumable`] is due before anything else.
    announce: bool,
    /// `stats.bytes` when the current connection opened.
    bytes_at_open: u64,
}

impl<C: Connector, K> fmt::Debug for ResumableStream<C, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Connect => "connecting",
            State::Wait(_) => "waiting to reconnect",
            State::Open(..) => "open",
            State::Stopped(_) => "stopped",
        };
        // Headers are left out: they carry credentials.
        f.debug_struct("ResumableStream")
            .field("url", &self.url)
            .field("state", &state)
            .field("last_event_id", &self.tracker.last_event_id())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl<C: Connector, K: Clock> ResumableStream<C, K> {
    /// A stream of `url` resuming from `tracker`'s cursor. Nothing happens
    /// until the first [`next`](Self::next).
    pub fn new(
        connector: C,
        clock: K,
        url: impl Into<String>,
        tracker: EventTracker,
        config: StreamConfig,
    ) -> Self {
        ResumableStream {
            connector,
            clock,
            tracker,
            policy: ReconnectPolicy::new(config.reconnect),
            url: url.into(),
            headers: config.headers,
            limits: config.limits,
            state: State::Connect,
            stats: StreamStats::default(),
            failures: 0,
            read_at: Millis::ZERO,
            skip_oversized: config.skip_oversized,
            skipped: None,
            body: config.body,
            resume_url: None,
            answered: false,
            announce: false,
            bytes_at_open: 0,
        }
    }

    /// This stream resuming from `url`, the [`StreamItem::Resumable`] URL
    /// of an earlier run of the same POST stream: it starts with a GET of
    /// `url` with the tracker's `Last-Event-ID` and never sends its body.
    pub fn with_resume_url(mut self, url: impl Into<String>) -> Self {
        self.resume_url = Some(url.into());
        self.answered = true;
        self
    }

    /// Where this POST stream resumes from, once known (from the answer's
    /// `Content-Location`, or [`with_resume_url`](Self::with_resume_url)).
    pub fn resume_url(&self) -> Option<&str> {
        self.resume_url.as_deref()
    }

    /// Whether the stream can be resumed: `Some(true)` for a GET stream and
    /// for a POST stream with a resume URL, `Some(false)` for a POST whose
    /// answer had no `Content-Location`, `None` while a POST has no answer.
    pub fn resumable(&self) -> Option<bool> {
        match (&self.body, &self.resume_url) {
            (None, _) | (Some(_), Some(_)) => Some(true),
            (Some(_), None) => self.answered.then_some(false),
        }
    }

    /// Whether the next request is the POST of the stream's body.
    fn posting(&self) -> bool {
        self.body.is_some() && self.resume_url.is_none()
    }

    /// Declares every event handed out so far delivered and moves the cursor.
    /// `next` does this by itself for the previous event.
    pub fn commit(&mut self) {
        self.tracker.commit();
    }

    /// The next item: a fresh event, or a change of the connection (see the
    /// [module docs](self)). Errors are final: once the policy gives up or
    /// the stream breaks its limits, every later call returns the same
    /// error.
    pub async fn next(&mut self) -> Result<StreamItem, StreamError> {
        self.advance::<fn(EventRef<'_>)>(None).await
    }

    /// [`next`](Self::next) for hosts that take events borrowed, a chunk at
    /// a time, with no copy of each: the fresh events of each chunk read go
    /// to `sink` as they are parsed, and the call then yields
    /// [`StreamItem::Delivered`] with their count. The other items, the
    /// commit of the previous call's events and cancel safety are those of
    /// `next` (the sink is called only inside the poll that reads a chunk,
    /// and all of that chunk's events go to it).
    pub async fn next_with(
        &mut self,
        mut sink: impl FnMut(EventRef<'_>),
    ) -> Result<StreamItem, StreamError> {
        self.advance(Some(&mut sink)).await
    }

    /// `next` without a sink, `next_with` with one. Generic rather than
    /// `dyn`, so that the future is `Send` when the sink is.
    async fn advance<F: FnMut(EventRef<'_>)>(
        &mut self,
        mut sink: Option<&mut F>,
    ) -> Result<StreamItem, StreamError> {
        self.tracker.commit();
        loop {
            match std::mem::replace(&mut self.state, State::Connect) {
                State::Stopped(error) => {
                    self.state = State::Stopped(error.clone());
                    return Err(error);
                }
                State::Wait(at) => {
                    self.state = State::Wait(at);
                    if self.clock.now() < at {
                        self.clock.sleep_until(at).await;
                    }
                    self.state = State::Connect;
                }
                State::Connect => {
                    let posting = self.posting();
                    let request = ConnectRequest {
                        url: self.resume_url.as_deref().unwrap_or(&self.url),
                        headers: &self.headers,
                        last_event_id: self.tracker.last_event_id().filter(|_| !posting),
                        body: self.body.as_deref().filter(|_| posting),
                    };
                    let connected = self.connector.connect(request).await;
                    let now = self.clock.now();
                    match connected {
                        Ok(body) => {
                            self.stats.connects += 1;
                            self.bytes_at_open = self.stats.bytes;
                            self.policy.on_connected(now);
                            if posting {
                                self.answered = true;
                                self.resume_url = self.connector.content_location(&body);
                                self.announce = self.resume_url.is_some();
                            }
                            let last_event_id = self
                                .tracker
                                .last_event_id()
                                .filter(|_| !posting)
                                .map(str::to_owned);
                            let parser = match &last_event_id {
                                Some(id) => Parser::with_last_event_id(self.limits, id),
                                None => Parser::new(self.limits),
                            };
                            self.state = State::Open(body, parser);
                            return Ok(StreamItem::Open { last_event_id });
                        }
                        Err(failure) => return self.fail(now, failure),
                    }
                }
                State::Open(body, mut parser) => {
                    if self.announce
                        && let Some(url) = &self.resume_url
                    {
                        self.announce = false;
                        let url = url.clone();
                        self.state = State::Open(body, parser);
                        return Ok(StreamItem::Resumable { url });
                    }
                    let now = self.clock.now();
                    let drained = match sink.as_deref_mut() {
                        None => self.drain(&mut parser, now, true).map(StreamItem::Event),
                        Some(sink) => self.drain_into(&mut parser, now, sink),
                    };
                    if let Some(item) = drained {
                        self.state = State::Open(body, parser);
                        return Ok(item);
                    }
                    if let Some(error) = self.skipped.take() {
                        self.state = State::Open(body, parser);
                        return Ok(StreamItem::Skipped { error });
                    }
                    let deadline = self.policy.idle_deadline().unwrap_or(Millis::MAX);
                    // Keep the connection in place while waiting, so that a
                    // cancelled `next` finds it again.
                    self.state = State::Open(body, parser);
                    let State::Open(body, _) = &mut self.state else {
                        unreachable!("just set")
                    };
                    let read = {
                        let chunk = body.next();
                        let idle = pin!(self.clock.sleep_until(deadline));
                        match select(chunk, idle).await {
                            Either::Left((chunk, _)) => Some(chunk),
                            Either::Right(((), _)) => None,
                        }
                    };
                    let now = self.clock.now();
                    let State::Open(body, mut parser) =
                        std::mem::replace(&mut self.state, State::Connect)
                    else {
                        unreachable!("only this arm changes the state")
                    };
                    match read {
                        Some(Some(Ok(chunk))) => {
                            let bytes = chunk.as_ref();
                            self.stats.bytes += bytes.len() as u64;
                            self.read_at = now;
                            self.policy.on_bytes(now);
                            self.failures = 0;
                            let mut delivered = 0;
                            let fed = match sink.as_deref_mut() {
                                None => parser.feed(bytes),
                                Some(sink) => parser.feed_with(bytes, |item| {
                                    if let Some(event) = self.route(item, now, delivered == 0) {
                                        delivered += 1;
                                        sink(event);
                                    }
                                }),
                            };
                            if let Err(error) = fed {
                                if !self.skip_oversized {
                                    drop(body);
                                    self.state = State::Stopped(StreamError::Parse(error));
                                    return Err(StreamError::Parse(error));
                                }
                                self.skipped.get_or_insert(error);
                            }
                            self.state = State::Open(body, parser);
                            if delivered > 0 {
                                return Ok(StreamItem::Delivered { events: delivered });
                            }
                        }
                        Some(Some(Err(failure))) => {
                            drop(body);
                            return self.fail(now, failure);
                        }
                        Some(None) => {
                            // Every complete event was drained before this
                            // read; an incomplete one at the end is dropped,
                            // as the specification says.
                            drop((body, parser));
                            if self.body.is_some() {
                                if self.resume_url.is_none() {
                                    return self.stop(StreamError::Done);
                                }
                                if self.stats.bytes > self.bytes_at_open {
                                    // Most likely the end: a GET of the
                                    // resume URL confirms it (204) at once.
                                    continue;
                                }
                            }
                            let closed = Failure::Network("the server closed the stream".into());
                            return self.fail(now, closed);
                        }
                        None => {
                            drop(body);
                            let idle = Failure::Idle(self.policy.idle_timeout());
                            return self.fail(now, idle);
                        }
                    }
                }
            }
        }
    }

    /// The next fresh event, reconnecting as needed and skipping the other
    /// items; for applications that do not report the connection's state.
    /// Cancel-safe and final on errors, like [`next`](Self::next).
    pub async fn next_event(&mut self) -> Result<Event, StreamError> {
        loop {
            if let StreamItem::Event(event) = self.next().await? {
                return Ok(event);
            }
        }
    }

    /// A fresh event the stream already has in hand (parsed from the chunk
    /// last read), without waiting, reading or committing; `None` when the
    /// next one needs a read (or the stream is not open). It is observed at
    /// the time that chunk was read: no clock read per event.
    ///
    /// For group commit: after [`next`](Self::next) yields an event, a host
    /// takes the rest of the chunk's events with `next_ready`, hands them
    /// all to the application (writes every line, flushes once), and then
    /// calls `next` (or [`commit`](Self::commit)), which declares all of them
    /// delivered at once. Nothing is committed before that call, not even
    /// the cursor of an id-only event, which moves with the group.
    pub fn next_ready(&mut self) -> Option<Event> {
        if self.announce {
            return None;
        }
        match std::mem::replace(&mut self.state, State::Connect) {
            State::Open(body, mut parser) => {
                let event = self.drain(&mut parser, self.read_at, false);
                self.state = State::Open(body, parser);
                event
            }
            other => {
                self.state = other;
                None
            }
        }
    }

    /// Runs parsed items through the tracker (at `now`) until a fresh event
    /// comes out. A fresh id-only event is committed at once if `commit_ids` (nothing
    /// handed out is pending then), else it waits for the next commit.
    fn drain(&mut self, parser: &mut Parser, now: Millis, commit_ids: bool) -> Option<Event> {
        while let Some(item) = parser.next_item() {
            if self.route(item.as_item_ref(), now, commit_ids).is_some() {
                let Item::Event(event) = item else {
                    unreachable!("only events are fresh")
                };
                return Some(event);
            }
        }
        None
    }

    /// [`drain`](Self::drain) into a sink: every queued item (left by
    /// `next` before a `next_with`), the fresh events to `sink`.
    fn drain_into(
        &mut self,
        parser: &mut Parser,
        now: Millis,
        sink: &mut impl FnMut(EventRef<'_>),
    ) -> Option<StreamItem> {
        let mut events = 0;
        while let Some(item) = parser.next_item() {
            if let Some(event) = self.route(item.as_item_ref(), now, events == 0) {
                events += 1;
                sink(event);
            }
        }
        (events > 0).then_some(StreamItem::Delivered { events })
    }

    /// Runs one parsed item through the tracker at `now`: the event, if it
    /// is a fresh one. A fresh id-only event is committed at once if
    /// `commit_ids` (nothing handed out is pending then), else it waits for
    /// the next commit.
    fn route<'a>(
        &mut self,
        item: ItemRef<'a>,
        now: Millis,
        commit_ids: bool,
    ) -> Option<EventRef<'a>> {
        match item {
            ItemRef::Event(event) => {
                if self.tracker.observe(event.id, now).is_fresh() {
                    self.stats.delivered += 1;
                    return Some(event);
                }
                self.stats.duplicates += 1;
            }
            ItemRef::IdOnly(id) => {
                // Nothing to deliver, but the cursor moves.
                if self.tracker.observe(Some(id), now).is_fresh() && commit_ids {
                    self.tracker.commit();
                }
            }
            ItemRef::Comment(_) => self.stats.comments += 1,
            ItemRef::Retry(ms) => self.policy.on_retry_hint(ms),
        }
        None
    }

    /// The connection is gone (already dropped): schedule a retry and say
    /// so, or stop.
    fn fail(&mut self, now: Millis, failure: Failure) -> Result<StreamItem, StreamError> {
        self.stats.last_failure = Some(failure.clone());
        if let Some(error) = self.post_ends(&failure) {
            return self.stop(error);
        }
        self.failures = self.failures.saturating_add(1);
        match self.policy.on_failure(now, failure.clone()) {
            Decision::RetryAt(retry_at) => {
                self.stats.reconnects += 1;
                self.state = State::Wait(retry_at);
                Ok(StreamItem::Reconnecting {
                    failure,
                    retry_at,
                    attempt: self.failures,
                })
            }
            Decision::GiveUp(give_up) => {
                let error = StreamError::GaveUp(give_up);
                self.state = State::Stopped(error.clone());
                Err(error)
            }
        }
    }

    /// How `failure` ends a POST stream, if it does (see [POST
    /// streams](self#post-streams)); `None` for a GET stream.
    fn post_ends(&self, failure: &Failure) -> Option<StreamError> {
        self.body.as_ref()?;
        if let Failure::Status { code: 204, .. } = failure {
            return Some(StreamError::Done);
        }
        if self.resume_url.is_some() {
            return None;
        }
        if self.answered {
            return Some(StreamError::Unresumable(failure.clone()));
        }
        match failure {
            _ if failure.may_resend_body() => None,
            Failure::Network(_) | Failure::Idle(_) => {
                Some(StreamError::Unanswered(failure.clone()))
            }
            _ => Some(StreamError::GaveUp(GiveUp::Permanent(failure.clone()))),
        }
    }

    /// Stops the stream for good with `error`.
    fn stop(&mut self, error: StreamError) -> Result<StreamItem, StreamError> {
        self.state = State::Stopped(error.clone());
        Err(error)
    }

    /// Drops the connection; later calls to `next` return
    /// [`StreamError::Closed`]. The tracker keeps its cursor.
    pub fn close(&mut self) {
        self.state = State::Stopped(StreamError::Closed);
    }

    /// The id a reconnect would send as `Last-Event-ID`.
    pub fn last_event_id(&self) -> Option<&str> {
        self.tracker.last_event_id()
    }

    /// The stream's tracker.
    pub fn tracker(&self) -> &EventTracker {
        &self.tracker
    }

    /// Closes the stream and hands back its tracker (to commit, inspect or
    /// reuse it).
    pub fn into_tracker(self) -> EventTracker {
        self.tracker
    }

    /// This stream's counters.
    pub fn stats(&self) -> &StreamStats {
        &self.stats
    }

    /// The current `retry:` floor sent by the server.
    pub fn retry_floor(&self) -> Millis {
        self.policy.retry_floor()
    }

    /// Whether a connection is open right now.
    pub fn is_connected(&self) -> bool {
        matches!(self.state, State::Open(..))
    }
}

#[cfg(test)]
mod tests;
