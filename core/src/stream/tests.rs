use super::*;
use crate::backoff::Backoff;
use crate::clock::ManualClock;
use crate::cursor::StreamKey;
use crate::fingerprint::FingerprintKey;
use crate::tracker::TrackerConfig;
use futures::stream::{self, LocalBoxStream};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;

/// One step of a scripted response body.
#[derive(Clone, Debug)]
enum Step {
    Bytes(&'static str),
    Wait(u64),
    Fail(&'static str),
    Hang,
}

/// What a scripted connection attempt answers.
enum Answer {
    Body(Vec<Step>),
    /// A body whose response has this `Content-Location`.
    Located(&'static str, Vec<Step>),
    Refuse(Failure),
}

/// A connector that plays a script and records what it was asked.
#[derive(Clone)]
struct Scripted {
    clock: ManualClock,
    answers: Rc<RefCell<VecDeque<Answer>>>,
    requests: Rc<RefCell<Vec<Request>>>,
    open_bodies: Rc<Cell<usize>>,
    /// The `Content-Location` of the last answer.
    location: Rc<RefCell<Option<String>>>,
}

/// One connection attempt as the connector saw it.
struct Request {
    at: Millis,
    url: String,
    body: Option<Vec<u8>>,
    last_event_id: Option<String>,
    /// Bodies still open when the attempt was made.
    open_bodies: usize,
}

/// Counts live bodies, so tests can see that a connection was dropped.
struct Live(Rc<Cell<usize>>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

impl Scripted {
    fn new(clock: &ManualClock, answers: Vec<Answer>) -> Self {
        Scripted {
            clock: clock.clone(),
            answers: Rc::new(RefCell::new(answers.into())),
            requests: Rc::default(),
            open_bodies: Rc::default(),
            location: Rc::default(),
        }
    }

    /// Each request as `METHOD url [Last-Event-ID]`, and its body if any.
    fn sent(&self) -> Vec<String> {
        self.requests
            .borrow()
            .iter()
            .map(|r| {
                let mut line = match &r.body {
                    Some(body) => format!("POST {} {}", r.url, String::from_utf8_lossy(body)),
                    None => format!("GET {}", r.url),
                };
                if let Some(id) = &r.last_event_id {
                    line += &format!(" after {id}");
                }
                line
            })
            .collect()
    }

    fn last_event_ids(&self) -> Vec<Option<String>> {
        self.requests
            .borrow()
            .iter()
            .map(|r| r.last_event_id.clone())
            .collect()
    }

    fn connect_times(&self) -> Vec<Millis> {
        self.requests.borrow().iter().map(|r| r.at).collect()
    }
}

impl Connector for Scripted {
    type Chunk = Vec<u8>;
    type Body = LocalBoxStream<'static, Result<Vec<u8>, Failure>>;

    async fn connect(&self, request: ConnectRequest<'_>) -> Result<Self::Body, Failure> {
        self.requests.borrow_mut().push(Request {
            at: self.clock.now(),
            url: request.url.to_owned(),
            body: request.body.map(<[u8]>::to_vec),
            last_event_id: request.last_event_id.map(str::to_owned),
            open_bodies: self.open_bodies.get(),
        });
        let answer = self
            .answers
            .borrow_mut()
            .pop_front()
            .unwrap_or(Answer::Body(vec![Step::Hang]));
        let (location, steps) = match answer {
            Answer::Refuse(failure) => return Err(failure),
            Answer::Body(steps) => (None, steps),
            Answer::Located(url, steps) => (Some(url.to_owned()), steps),
        };
        *self.location.borrow_mut() = location;
        self.open_bodies.set(self.open_bodies.get() + 1);
        let live = Live(self.open_bodies.clone());
        let clock = self.clock.clone();
        let body = stream::unfold(
            (VecDeque::from(steps), clock, live),
            |(mut steps, clock, live)| async move {
                loop {
                    match steps.pop_front()? {
                        Step::Bytes(s) => {
                            return Some((Ok(s.as_bytes().to_vec()), (steps, clock, live)));
                        }
                        Step::Fail(m) => {
                            return Some((Err(Failure::Network(m.into())), (steps, clock, live)));
                        }
                        Step::Wait(ms) => {
                            let until = clock.now() + Millis(ms);
                            clock.sleep_until(until).await;
                        }
                        Step::Hang => futures::future::pending::<()>().await,
                    }
                }
            },
        );
        Ok(Box::pin(body))
    }

    fn content_location(&self, _body: &Self::Body) -> Option<String> {
        self.location.borrow().clone()
    }
}

fn tracker(window: usize) -> EventTracker {
    EventTracker::new(
        StreamKey::new("s", "1"),
        TrackerConfig {
            window,
            max_age: None,
            fingerprint_key: FingerprintKey::new(1, 2),
        },
    )
}

fn config() -> StreamConfig {
    StreamConfig {
        headers: vec![("Authorization".into(), "Bearer t".into())],
        reconnect: ReconnectConfig {
            backoff: Backoff {
                initial: Millis(1000),
                max: Millis(8000),
            },
            max_attempts: Some(3),
            idle_timeout: Millis(45_000),
            healthy_after: Millis(30_000),
            seed: 3,
        },
        limits: Limits::default(),
        skip_oversized: false,
        body: None,
    }
}

/// Drives `fut` to completion, jumping virtual time to the next timer
/// whenever everything waits.
fn run<F: std::future::Future>(clock: &ManualClock, fut: F) -> F::Output {
    let mut fut = pin!(fut);
    let waker = futures::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    loop {
        if let std::task::Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return out;
        }
        let next = clock.next_deadline().expect("stuck: nothing to wait for");
        clock.set(next);
    }
}

/// Collects `n` event ids (or data, for events without id).
fn take(
    clock: &ManualClock,
    stream: &mut ResumableStream<Scripted, ManualClock>,
    n: usize,
) -> Vec<String> {
    (0..n)
        .map(|_| {
            let event = run(clock, stream.next_event()).expect("an event");
            event.id.unwrap_or(event.data)
        })
        .collect()
}

fn body(steps: &[Step]) -> Answer {
    Answer::Body(steps.to_vec())
}

fn setup(
    answers: Vec<Answer>,
    window: usize,
) -> (
    ManualClock,
    Scripted,
    ResumableStream<Scripted, ManualClock>,
) {
    let clock = ManualClock::new();
    let connector = Scripted::new(&clock, answers);
    let stream = ResumableStream::new(
        connector.clone(),
        clock.clone(),
        "http://x/sse",
        tracker(window),
        config(),
    );
    (clock, connector, stream)
}

#[test]
fn delivers_events_and_commits_each_on_the_next_call() {
    let (clock, _, mut s) = setup(
        vec![body(&[
            Step::Bytes("id: 1\ndata: a\n\nid: 2\ndata: b\n\n"),
            Step::Hang,
        ])],
        64,
    );
    let first = run(&clock, s.next_event()).unwrap();
    assert_eq!((first.id.as_deref(), first.data.as_str()), (Some("1"), "a"));
    assert_eq!(s.tracker().seq(), 0, "not committed before it is handled");
    let second = run(&clock, s.next_event()).unwrap();
    assert_eq!(second.id.as_deref(), Some("2"));
    assert_eq!(s.tracker().seq(), 1);
    s.commit();
    assert_eq!(s.tracker().seq(), 2);
    assert_eq!(s.last_event_id(), Some("2"));
}

#[test]
fn next_ready_takes_the_rest_of_a_chunk_without_committing() {
    let (clock, conn, mut s) = setup(
        vec![body(&[
            Step::Bytes("id: 1\ndata: a\n\nid: 2\ndata: b\n\nid: 3\n\nid: 4\ndata: d\n\nid: 5\nda"),
            Step::Bytes("ta: e\n\n"),
            Step::Hang,
        ])],
        64,
    );
    assert!(s.next_ready().is_none(), "nothing before the first read");
    let first = run(&clock, s.next_event()).unwrap();
    assert_eq!(first.id.as_deref(), Some("1"));
    let second = s.next_ready().expect("parsed from the same chunk");
    assert_eq!(second.id.as_deref(), Some("2"));
    // Past the id-only event 3: its cursor waits for the group's commit.
    let fourth = s.next_ready().expect("parsed from the same chunk");
    assert_eq!(fourth.id.as_deref(), Some("4"));
    assert!(s.next_ready().is_none(), "event 5 needs a read");
    assert_eq!(
        s.tracker().seq(),
        0,
        "nothing committed before the next call"
    );
    assert!(s.tracker().has_uncommitted());
    assert_eq!(s.stats().delivered, 3);
    // The next call commits the whole group at once, then reads on.
    let fifth = run(&clock, s.next_event()).unwrap();
    assert_eq!(fifth.id.as_deref(), Some("5"));
    assert_eq!(s.tracker().seq(), 1, "one commit for the whole group");
    s.commit();
    assert_eq!(s.last_event_id(), Some("5"));
    assert_eq!(conn.last_event_ids(), [None]);
}

#[test]
fn next_ready_is_none_unless_open_and_keeps_the_state() {
    let (clock, _, mut s) = setup(
        vec![
            Answer::Refuse(Failure::Network("refused".into())),
            body(&[Step::Bytes("id: 1\ndata: a\n\n"), Step::Hang]),
        ],
        64,
    );
    let item = run(&clock, s.next()).unwrap();
    assert!(matches!(item, StreamItem::Reconnecting { .. }));
    assert!(s.next_ready().is_none(), "waiting to reconnect");
    assert!(!s.is_connected());
    let item = run(&clock, s.next()).unwrap();
    assert!(matches!(item, StreamItem::Open { .. }));
    assert!(s.next_ready().is_none(), "open, nothing read yet");
    assert!(s.is_connected(), "still open");
    assert_eq!(take(&clock, &mut s, 1), ["1"]);
    s.close();
    assert!(s.next_ready().is_none());
    assert_eq!(run(&clock, s.next()), Err(StreamError::Closed));
}

#[test]
fn a_drop_mid_event_resumes_from_the_last_complete_event() {
    let (clock, conn, mut s) = setup(
        vec![
            body(&[
                Step::Bytes("id: 1\ndata: a\n\nid: 2\ndata: b\n\nid: 3\nda"),
                Step::Fail("reset"),
            ]),
            body(&[Step::Bytes("id: 3\ndata: c\n\n"), Step::Hang]),
        ],
        64,
    );
    assert_eq!(take(&clock, &mut s, 3), ["1", "2", "3"]);
    assert_eq!(conn.last_event_ids(), [None, Some("2".into())]);
    assert_eq!(s.stats().reconnects, 1);
}

#[test]
fn replayed_events_are_dropped() {
    let (clock, _, mut s) = setup(
        vec![
            body(&[Step::Bytes(
                "id: 1\ndata: a\n\nid: 2\ndata: b\n\nid: 3\ndata: c\n\n",
            )]),
            body(&[
                Step::Bytes("id: 2\ndata: b\n\nid: 3\ndata: c\n\nid: 4\ndata: d\n\n"),
                Step::Hang,
            ]),
        ],
        64,
    );
    assert_eq!(take(&clock, &mut s, 4), ["1", "2", "3", "4"]);
    assert_eq!(s.stats().duplicates, 2);
}

#[test]
fn a_server_that_ignores_last_event_id_and_starts_over_is_deduplicated() {
    let all = "id: 1\ndata: a\n\nid: 2\ndata: b\n\nid: 3\ndata: c\n\nid: 4\ndata: d\n\n";
    let (clock, conn, mut s) = setup(
        vec![
            body(&[Step::Bytes("id: 1\ndata: a\n\nid: 2\ndata: b\n\n")]),
            body(&[Step::Bytes(all), Step::Hang]),
        ],
        64,
    );
    assert_eq!(take(&clock, &mut s, 4), ["1", "2", "3", "4"]);
    assert_eq!(conn.last_event_ids()[1].as_deref(), Some("2"));
    assert_eq!(s.stats().duplicates, 2);
}

#[test]
fn a_resumed_connection_that_drops_before_a_new_id_keeps_the_cursor() {
    let (clock, conn, mut s) = setup(
        vec![
            body(&[Step::Bytes("id: 7\ndata: a\n\n")]),
            body(&[Step::Bytes(": keep-alive\n\ndata: no id\n\n")]),
            body(&[Step::Bytes("id: 8\ndata: b\n\n"), Step::Hang]),
        ],
        64,
    );
    assert_eq!(take(&clock, &mut s, 3), ["7", "no id", "8"]);
    assert_eq!(
        conn.last_event_ids(),
        [None, Some("7".into()), Some("7".into())]
    );
    assert_eq!(s.stats().comments, 1);
}

#[test]
fn an_empty_id_resets_the_cursor() {
    let (clock, conn, mut s) = setup(
        vec![
            body(&[Step::Bytes("id: 7\ndata: a\n\nid\ndata: b\n\n")]),
            body(&[Step::Bytes("id: 1\ndata: c\n\n"), Step::Hang]),
        ],
        64,
    );
    let ids: Vec<_> = (0..3)
        .map(|_| run(&clock, s.next_event()).unwrap().data)
        .collect();
    assert_eq!(ids, ["a", "b", "c"]);
    assert_eq!(conn.last_event_ids(), [None, None]);
}

#[test]
fn an_id_only_block_moves_the_cursor() {
    let (clock, conn, mut s) = setup(
        vec![
            body(&[Step::Bytes("id: 1\ndata: a\n\nid: 5\n\n")]),
            body(&[Step::Bytes("id: 6\ndata: b\n\n"), Step::Hang]),
        ],
        64,
    );
    assert_eq!(take(&clock, &mut s, 2), ["1", "6"]);
    assert_eq!(conn.last_event_ids()[1].as_deref(), Some("5"));
}

#[test]
fn the_server_retry_value_sets_the_reconnect_floor() {
    let (clock, conn, mut s) = setup(
        vec![
            body(&[Step::Bytes("retry: 20000\nid: 1\ndata: a\n\n")]),
            body(&[Step::Bytes("retry: 2500\n\nid: 2\ndata: b\n\n")]),
            body(&[Step::Bytes("id: 3\ndata: c\n\n"), Step::Hang]),
        ],
        64,
    );
    assert_eq!(take(&clock, &mut s, 3), ["1", "2", "3"]);
    let times = conn.connect_times();
    let first_gap = times[1] - times[0];
    assert!(
        (Millis(20_000)..=Millis(30_000)).contains(&first_gap),
        "{first_gap}"
    );
    let second_gap = times[2] - times[1];
    assert!(
        (Millis(2500)..=Millis(3750)).contains(&second_gap),
        "the floor changed, the backoff is at 2 s: {second_gap}"
    );
}

#[test]
fn status_503_with_retry_after_is_honoured() {
    let (clock, conn, mut s) = setup(
        vec![
            Answer::Refuse(Failure::Status {
                code: 503,
                retry_after: Some(Millis::from_secs(60)),
            }),
            body(&[Step::Bytes("id: 1\ndata: a\n\n"), Step::Hang]),
        ],
        64,
    );
    assert_eq!(take(&clock, &mut s, 1), ["1"]);
    assert!(conn.connect_times()[1] >= Millis::from_secs(60));
}

#[test]
fn a_dead_connection_is_detected_and_dropped_before_the_retry() {
    let (clock, conn, mut s) = setup(
        vec![
            body(&[Step::Bytes("id: 1\ndata: a\n\n"), Step::Hang]),
            body(&[Step::Bytes("id: 2\ndata: b\n\n"), Step::Hang]),
        ],
        64,
    );
    assert_eq!(take(&clock, &mut s, 2), ["1", "2"]);
    let requests = conn.requests.borrow();
    assert!(requests[1].at >= Millis(45_000), "idle timeout is 45 s");
    assert_eq!(
        requests[1].open_bodies, 0,
        "the dead body was dropped before reconnecting"
    );
    assert_eq!(s.stats().last_failure, Some(Failure::Idle(Millis(45_000))));
}

#[test]
fn keep_alives_keep_a_connection_alive() {
    let (clock, conn, mut s) = setup(
        vec![body(&[
            Step::Wait(30_000),
            Step::Bytes(":\n"),
            Step::Wait(30_000),
            Step::Bytes(":\n"),
            Step::Wait(30_000),
            Step::Bytes("id: 1\ndata: a\n\n"),
            Step::Hang,
        ])],
        64,
    );
    assert_eq!(take(&clock, &mut s, 1), ["1"]);
    assert_eq!(conn.requests.borrow().len(), 1);
}

#[test]
fn permanent_failures_stop_with_a_clear_error() {
    for failure in [
        Failure::Status {
            code: 404,
            retry_after: None,
        },
        Failure::Status {
            code: 401,
            retry_after: None,
        },
        Failure::ContentType("text/html".into()),
    ] {
        let (clock, conn, mut s) = setup(vec![Answer::Refuse(failure.clone())], 64);
        let error = run(&clock, s.next_event()).unwrap_err();
        assert_eq!(error, StreamError::GaveUp(GiveUp::Permanent(failure)));
        assert_eq!(
            run(&clock, s.next_event()).unwrap_err(),
            error,
            "errors are final"
        );
        assert_eq!(conn.requests.borrow().len(), 1);
    }
}

#[test]
fn the_budget_of_attempts_without_data_runs_out() {
    let refuse = || Answer::Refuse(Failure::Network("refused".into()));
    let (clock, conn, mut s) = setup(vec![refuse(), refuse(), refuse(), refuse()], 64);
    let error = run(&clock, s.next_event()).unwrap_err();
    assert!(
        matches!(
            error,
            StreamError::GaveUp(GiveUp::Exhausted { attempts: 3, .. })
        ),
        "{error:?}"
    );
    assert_eq!(conn.requests.borrow().len(), 3);
    assert!(error.to_string().contains("refused"));
}

#[test]
fn oversized_lines_stop_the_stream_with_bounded_memory() {
    let clock = ManualClock::new();
    let conn = Scripted::new(
        &clock,
        vec![body(&[
            Step::Bytes("id: 1\ndata: a\n\ndata: "),
            Step::Bytes("xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"),
            Step::Bytes("xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"),
            Step::Hang,
        ])],
    );
    let mut cfg = config();
    cfg.limits = Limits {
        max_line: 64,
        max_event: 64,
    };
    let mut s = ResumableStream::new(conn, clock.clone(), "http://x", tracker(8), cfg);
    assert_eq!(run(&clock, s.next_event()).unwrap().data, "a");
    assert!(matches!(
        run(&clock, s.next_event()).unwrap_err(),
        StreamError::Parse(_)
    ));
}

/// A stream of one connection playing `steps`, with 64-byte caps and
/// [`StreamConfig::skip_oversized`].
fn skipping(clock: &ManualClock, steps: &[Step]) -> ResumableStream<Scripted, ManualClock> {
    let conn = Scripted::new(clock, vec![body(steps)]);
    let mut cfg = config();
    cfg.limits = Limits {
        max_line: 64,
        max_event: 64,
    };
    cfg.skip_oversized = true;
    ResumableStream::new(conn, clock.clone(), "http://x", tracker(8), cfg)
}

#[test]
fn skip_oversized_goes_on_past_an_oversized_event_and_says_so() {
    let clock = ManualClock::new();
    let mut s = skipping(
        &clock,
        &[
            Step::Bytes("id: 1\ndata: a\n\nid: 2\ndata: "),
            Step::Bytes("xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"),
            Step::Bytes("xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\n\n"),
            Step::Bytes("id: 3\ndata: c\n\n"),
            Step::Hang,
        ],
    );
    let items = items(&clock, &mut s, 4);
    assert_eq!(items[..2], ["open -", "1"]);
    assert!(items[2].starts_with("skipped: "), "{items:?}");
    assert_eq!(items[3], "3", "the stream goes on after it");
    assert_eq!(s.last_event_id(), Some("3"));
}

#[test]
fn next_is_cancel_safe() {
    let (clock, _, mut s) = setup(
        vec![body(&[
            Step::Wait(1000),
            Step::Bytes("id: 1\ndata: a\n\n"),
            Step::Hang,
        ])],
        64,
    );
    {
        let mut fut = Box::pin(s.next_event());
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(fut.as_mut().poll(&mut cx).is_pending());
    }
    assert!(s.is_connected(), "the connection survives a dropped next()");
    assert_eq!(take(&clock, &mut s, 1), ["1"]);
}

#[test]
fn close_stops_the_stream() {
    let (clock, conn, mut s) = setup(
        vec![body(&[Step::Bytes("id: 1\ndata: a\n\n"), Step::Hang])],
        64,
    );
    assert_eq!(take(&clock, &mut s, 1), ["1"]);
    s.close();
    assert_eq!(conn.open_bodies.get(), 0);
    assert_eq!(
        run(&clock, s.next_event()).unwrap_err(),
        StreamError::Closed
    );
    assert_eq!(s.into_tracker().seq(), 1);
}

/// The next `n` items, without their event bodies: `open <id>`, the id (or
/// data) of an event, `retry <attempt> at <ms>: <failure>`.
fn items(
    clock: &ManualClock,
    stream: &mut ResumableStream<Scripted, ManualClock>,
    n: usize,
) -> Vec<String> {
    (0..n)
        .map(|_| match run(clock, stream.next()).expect("an item") {
            StreamItem::Open { last_event_id } => {
                format!("open {}", last_event_id.as_deref().unwrap_or("-"))
            }
            StreamItem::Event(event) => event.id.unwrap_or(event.data),
            StreamItem::Reconnecting {
                failure,
                retry_at,
                attempt,
            } => format!("retry {attempt} at {}: {failure}", retry_at.0),
            StreamItem::Skipped { error } => format!("skipped: {error}"),
            StreamItem::Delivered { events } => format!("delivered {events}"),
            StreamItem::Resumable { url } => format!("resumable {url}"),
        })
        .collect()
}

/// `items` through `next_with`: each `Delivered` becomes the ids (or data)
/// its sink got, checked against its count, one string per event.
fn items_with(
    clock: &ManualClock,
    stream: &mut ResumableStream<Scripted, ManualClock>,
    n: usize,
) -> Vec<String> {
    let mut out = Vec::new();
    while out.len() < n {
        let mut got = Vec::new();
        let item = run(
            clock,
            stream.next_with(|event| got.push(event.id.unwrap_or(event.data).to_owned())),
        )
        .expect("an item");
        match item {
            StreamItem::Delivered { events } => {
                assert_eq!(events, got.len(), "the count is what the sink got");
                out.extend(got);
            }
            other => {
                assert!(got.is_empty(), "only Delivered hands out events");
                out.extend(items_of(other));
            }
        }
    }
    out
}

fn items_of(item: StreamItem) -> Option<String> {
    Some(match item {
        StreamItem::Open { last_event_id } => {
            format!("open {}", last_event_id.as_deref().unwrap_or("-"))
        }
        StreamItem::Reconnecting {
            failure,
            retry_at,
            attempt,
        } => format!("retry {attempt} at {}: {failure}", retry_at.0),
        StreamItem::Skipped { error } => format!("skipped: {error}"),
        StreamItem::Event(event) => event.id.unwrap_or(event.data),
        StreamItem::Resumable { url } => format!("resumable {url}"),
        StreamItem::Delivered { .. } => unreachable!("handled by the caller"),
    })
}

#[test]
fn next_with_hands_a_chunk_to_the_sink_and_commits_it_on_the_next_call() {
    let (clock, conn, mut s) = setup(
        vec![
            body(&[
                Step::Bytes("id: 1\ndata: a\n\nid: 2\ndata: b\n\n: keep\n\nid: 3\nda"),
                Step::Bytes("ta: c\n\n"),
                Step::Fail("reset"),
            ]),
            body(&[
                Step::Bytes("id: 2\ndata: b\n\nid: 3\ndata: c\n\nid: 4\ndata: d\n\n"),
                Step::Hang,
            ]),
        ],
        64,
    );
    let mut got = Vec::new();
    let mut next = |s: &mut ResumableStream<Scripted, ManualClock>| {
        let mut chunk = Vec::new();
        let item = run(
            &clock,
            s.next_with(|event| chunk.push((event.id.map(str::to_owned), event.data.to_owned()))),
        );
        got.push(chunk);
        item.expect("an item")
    };
    assert!(matches!(next(&mut s), StreamItem::Open { .. }));
    assert_eq!(next(&mut s), StreamItem::Delivered { events: 2 });
    assert_eq!(s.tracker().seq(), 0, "not committed before the next call");
    assert_eq!(next(&mut s), StreamItem::Delivered { events: 1 });
    assert_eq!(
        s.tracker().seq(),
        1,
        "the first chunk's events in one commit"
    );
    assert!(matches!(next(&mut s), StreamItem::Reconnecting { .. }));
    assert!(matches!(next(&mut s), StreamItem::Open { .. }));
    assert_eq!(next(&mut s), StreamItem::Delivered { events: 1 });
    let events: Vec<_> = got.concat();
    assert_eq!(
        events,
        [
            (Some("1".into()), "a".into()),
            (Some("2".into()), "b".into()),
            (Some("3".into()), "c".into()),
            (Some("4".into()), "d".into()),
        ]
    );
    assert_eq!(conn.last_event_ids()[1].as_deref(), Some("3"));
    assert_eq!(s.stats().duplicates, 2);
    assert_eq!(s.stats().comments, 1);
}

#[test]
fn next_with_takes_what_next_left_queued() {
    let (clock, _, mut s) = setup(
        vec![body(&[
            Step::Bytes("id: 1\ndata: a\n\nid: 2\ndata: b\n\nid: 3\ndata: c\n\n"),
            Step::Hang,
        ])],
        64,
    );
    assert_eq!(items(&clock, &mut s, 2), ["open -", "1"]);
    assert_eq!(items_with(&clock, &mut s, 2), ["2", "3"]);
}

#[test]
fn next_with_reports_a_skipped_event_after_the_chunk_it_was_in() {
    let clock = ManualClock::new();
    let mut s = skipping(
        &clock,
        &[
            Step::Bytes(
                "id: 1\ndata: a\n\nid: 2\ndata: xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\n\nid: 3\ndata: c\n\n",
            ),
            Step::Bytes("id: 4\ndata: d\n\n"),
            Step::Hang,
        ],
    );
    let items = items_with(&clock, &mut s, 5);
    assert_eq!(items[..3], ["open -", "1", "3"]);
    assert!(items[3].starts_with("skipped: "), "{items:?}");
    assert_eq!(items[4], "4");
}

proptest::proptest! {
    /// Whatever the chunking, replays and drops, `next_with` hands out
    /// exactly the events `next` yields, with the same other items.
    #[test]
    fn next_with_yields_what_next_yields(
        events in proptest::collection::vec((0u8..12, proptest::bool::ANY), 1..30),
        cuts in proptest::collection::vec(0usize..400, 0..8),
        drop_at in 0usize..30,
    ) {
        let mut text = String::new();
        for (i, (id, comment)) in events.iter().enumerate() {
            if *comment {
                text.push_str(": ping\n\n");
            }
            if i % 5 == 4 {
                text.push_str(&format!("id: {id}\n\n"));
            } else {
                text.push_str(&format!("id: {id}\ndata: e{i}\n\n"));
            }
        }
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(text.len())).collect();
        cuts.push(text.len());
        cuts.sort_unstable();
        let script = |text: &str| {
            let mut steps = Vec::new();
            let mut at = 0;
            for &cut in &cuts {
                if cut > at {
                    let piece: &'static str = Box::leak(text[at..cut].to_owned().into_boxed_str());
                    steps.push(Step::Bytes(piece));
                    at = cut;
                }
            }
            steps
        };
        let mut first = script(&text);
        first.truncate(drop_at.min(first.len()));
        first.push(Step::Fail("reset"));
        let mut second = script(&text);
        second.push(Step::Hang);
        let answers = || vec![body(&first), body(&second)];
        let count = {
            // How many items `next` yields before the policy gives up (the
            // connections after the second only hang).
            let (clock, _, mut s) = setup(answers(), 64);
            let mut n = 0;
            while run(&clock, s.next()).is_ok() {
                n += 1;
            }
            n
        };
        let (clock, conn_a, mut a) = setup(answers(), 64);
        let by_next = items(&clock, &mut a, count);
        let (clock, conn_b, mut b) = setup(answers(), 64);
        let events = by_next.iter().filter(|i| !i.starts_with("open ") && !i.starts_with("retry ")).count();
        let by_next_with = items_with(&clock, &mut b, count);
        proptest::prop_assert_eq!(&by_next, &by_next_with);
        proptest::prop_assert_eq!(b.stats(), a.stats());
        proptest::prop_assert_eq!(conn_a.last_event_ids(), conn_b.last_event_ids());
        proptest::prop_assert_eq!(a.stats().delivered as usize, events);
    }
}

#[test]
fn the_lifecycle_is_open_events_reconnecting_in_order() {
    let (clock, conn, mut s) = setup(
        vec![
            body(&[
                Step::Bytes("id: 1\ndata: a\n\nid: 2\ndata: b\n\n"),
                Step::Wait(500),
                Step::Fail("reset"),
            ]),
            Answer::Refuse(Failure::Network("refused".into())),
            Answer::Refuse(Failure::Status {
                code: 502,
                retry_after: None,
            }),
            body(&[Step::Bytes("id: 3\ndata: c\n\n"), Step::Hang]),
        ],
        64,
    );
    let seen = items(&clock, &mut s, 8);
    let times = conn.connect_times();
    // Retry times are what the policy decided: the connects happened then.
    assert_eq!(
        seen,
        [
            "open -".to_owned(),
            "1".into(),
            "2".into(),
            format!("retry 1 at {}: connection failed: reset", times[1].0),
            format!("retry 2 at {}: connection failed: refused", times[2].0),
            format!("retry 3 at {}: server answered HTTP 502", times[3].0),
            "open 2".into(),
            "3".into(),
        ]
    );
    assert_eq!(times[0], Millis(0));
    assert!(times[1] >= Millis(1500), "the failure came at 500 ms");
    assert_eq!(s.stats().connects, 2);
    assert_eq!(s.stats().reconnects, 3);
}

#[test]
fn reconnecting_is_yielded_when_the_connection_is_lost_not_when_it_is_back() {
    let (clock, conn, mut s) = setup(
        vec![
            body(&[Step::Bytes("id: 1\ndata: a\n\n"), Step::Fail("reset")]),
            body(&[Step::Bytes("id: 2\ndata: b\n\n"), Step::Hang]),
        ],
        64,
    );
    assert_eq!(items(&clock, &mut s, 2), ["open -", "1"]);
    let Ok(StreamItem::Reconnecting { retry_at, .. }) = run(&clock, s.next()) else {
        panic!("expected the loss of the connection");
    };
    assert_eq!(clock.now(), Millis(0), "reported at once, before any wait");
    assert_eq!(conn.requests.borrow().len(), 1, "no new attempt yet");
    assert!(!s.is_connected());
    assert_eq!(items(&clock, &mut s, 1), ["open 1"]);
    assert_eq!(clock.now(), retry_at, "the attempt came when it said");
}

#[test]
fn an_idle_connection_is_reported_with_its_timeout() {
    let (clock, _, mut s) = setup(
        vec![body(&[Step::Bytes("id: 1\ndata: a\n\n"), Step::Hang])],
        64,
    );
    assert_eq!(items(&clock, &mut s, 2), ["open -", "1"]);
    match run(&clock, s.next()).unwrap() {
        StreamItem::Reconnecting {
            failure, attempt, ..
        } => {
            assert_eq!(failure, Failure::Idle(Millis(45_000)));
            assert_eq!(attempt, 1);
        }
        other => panic!("expected reconnecting, got {other:?}"),
    }
    assert_eq!(clock.now(), Millis(45_000));
}

#[test]
fn a_permanent_failure_ends_the_items_with_an_error_not_reconnecting() {
    let (clock, _, mut s) = setup(
        vec![
            body(&[Step::Bytes("id: 1\ndata: a\n\n")]),
            Answer::Refuse(Failure::Status {
                code: 410,
                retry_after: None,
            }),
        ],
        64,
    );
    assert_eq!(items(&clock, &mut s, 3)[..2], ["open -", "1"]);
    let error = run(&clock, s.next()).unwrap_err();
    assert!(matches!(error, StreamError::GaveUp(GiveUp::Permanent(_))));
    assert!(std::error::Error::source(&error).is_some());
}

#[test]
fn attempts_count_up_without_data_and_restart_after_data() {
    let refuse = || Answer::Refuse(Failure::Network("refused".into()));
    let (clock, _, mut s) = setup(
        vec![
            refuse(),
            refuse(),
            body(&[Step::Bytes(": hi\n")]),
            refuse(),
            body(&[Step::Bytes("id: 1\ndata: a\n\n"), Step::Hang]),
        ],
        64,
    );
    let attempts: Vec<String> = items(&clock, &mut s, 7)
        .into_iter()
        .map(|item| item.split(" at ").next().unwrap().to_owned())
        .collect();
    assert_eq!(
        attempts,
        [
            "retry 1", "retry 2", "open -", "retry 1", "retry 2", "open -", "1"
        ]
    );
}

#[test]
fn next_is_cancel_safe_between_items() {
    let (clock, _, mut s) = setup(
        vec![
            body(&[Step::Bytes("id: 1\ndata: a\n\n"), Step::Fail("reset")]),
            body(&[
                Step::Wait(10),
                Step::Bytes("id: 2\ndata: b\n\n"),
                Step::Hang,
            ]),
        ],
        64,
    );
    assert_eq!(items(&clock, &mut s, 2), ["open -", "1"]);
    let Ok(StreamItem::Reconnecting { retry_at, .. }) = run(&clock, s.next()) else {
        panic!("expected the loss of the connection");
    };
    // Dropped while waiting to reconnect, then while reading: nothing is
    // lost or repeated, and the item for the open connection comes once.
    let waker = futures::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    {
        let mut fut = Box::pin(s.next());
        assert!(fut.as_mut().poll(&mut cx).is_pending());
    }
    clock.set(retry_at);
    assert_eq!(items(&clock, &mut s, 1), ["open 1"]);
    {
        let mut fut = Box::pin(s.next());
        assert!(fut.as_mut().poll(&mut cx).is_pending());
    }
    assert_eq!(items(&clock, &mut s, 1), ["2"]);
}

const RESUME: &str = "http://x/_tidemark/streams/t1";

/// `items` without the jittered retry times.
fn untimed(
    clock: &ManualClock,
    stream: &mut ResumableStream<Scripted, ManualClock>,
    n: usize,
) -> Vec<String> {
    items(clock, stream, n)
        .into_iter()
        .map(|item| match item.strip_prefix("retry ") {
            Some(rest) => {
                let (attempt, rest) = rest.split_once(" at ").expect("a retry time");
                let (_, failure) = rest.split_once(": ").expect("a failure");
                format!("retry {attempt}: {failure}")
            }
            None => item,
        })
        .collect()
}

/// A POST stream of `{"q":1}` to `http://x/sse`, resuming from `resume`
/// if given (as a later run would), its tracker at `last_id` if given.
fn post(
    answers: Vec<Answer>,
    resume: Option<&str>,
    last_id: Option<&str>,
) -> (
    ManualClock,
    Scripted,
    ResumableStream<Scripted, ManualClock>,
) {
    let clock = ManualClock::new();
    let connector = Scripted::new(&clock, answers);
    let mut tracker = tracker(64);
    if let Some(id) = last_id {
        assert!(tracker.observe(Some(id), Millis::ZERO).is_fresh());
        tracker.commit();
    }
    let config = StreamConfig {
        body: Some(br#"{"q":1}"#.to_vec()),
        ..config()
    };
    let mut stream = ResumableStream::new(
        connector.clone(),
        clock.clone(),
        "http://x/sse",
        tracker,
        config,
    );
    if let Some(url) = resume {
        stream = stream.with_resume_url(url);
    }
    (clock, connector, stream)
}

#[test]
fn a_post_stream_posts_once_then_resumes_with_a_get_of_its_content_location() {
    let (clock, conn, mut s) = post(
        vec![
            Answer::Located(
                RESUME,
                vec![
                    Step::Bytes("id: 1\ndata: a\n\nid: 2\ndata: b\n\n"),
                    Step::Fail("reset"),
                ],
            ),
            body(&[Step::Bytes("id: 3\ndata: c\n\n"), Step::Hang]),
        ],
        None,
        None,
    );
    assert_eq!(s.resumable(), None, "nothing is known before the answer");
    assert_eq!(
        untimed(&clock, &mut s, 7),
        [
            "open -".to_owned(),
            format!("resumable {RESUME}"),
            "1".into(),
            "2".into(),
            "retry 1: connection failed: reset".into(),
            "open 2".into(),
            "3".into(),
        ]
    );
    assert_eq!(
        conn.sent(),
        [
            r#"POST http://x/sse {"q":1}"#.to_owned(),
            format!("GET {RESUME} after 2")
        ]
    );
    assert_eq!((s.resumable(), s.resume_url()), (Some(true), Some(RESUME)));
}

#[test]
fn the_resume_url_comes_before_any_event_of_the_answer() {
    let (clock, _, mut s) = post(
        vec![Answer::Located(
            RESUME,
            vec![
                Step::Bytes("id: 1\ndata: a\n\nid: 2\ndata: b\n\n"),
                Step::Hang,
            ],
        )],
        None,
        None,
    );
    assert!(matches!(run(&clock, s.next()), Ok(StreamItem::Open { .. })));
    assert!(s.next_ready().is_none(), "no event before the resume URL");
    assert_eq!(
        run(&clock, s.next()),
        Ok(StreamItem::Resumable { url: RESUME.into() })
    );
    assert_eq!(s.tracker().seq(), 0, "nothing delivered yet");
    assert_eq!(take(&clock, &mut s, 2), ["1", "2"]);
}

#[test]
fn the_clean_end_is_confirmed_at_once_and_a_204_to_the_resume_is_done() {
    let (clock, conn, mut s) = post(
        vec![
            Answer::Located(RESUME, vec![Step::Bytes("id: 1\ndata: a\n\n")]),
            Answer::Refuse(Failure::Status {
                code: 204,
                retry_after: None,
            }),
        ],
        None,
        None,
    );
    assert_eq!(
        untimed(&clock, &mut s, 3),
        ["open -", &format!("resumable {RESUME}"), "1"]
    );
    assert_eq!(run(&clock, s.next()), Err(StreamError::Done));
    assert_eq!(run(&clock, s.next()), Err(StreamError::Done), "final");
    assert_eq!(conn.sent()[1], format!("GET {RESUME} after 1"));
    assert_eq!(
        conn.connect_times(),
        [Millis::ZERO, Millis::ZERO],
        "no backoff before confirming the end"
    );
    assert_eq!(s.stats().reconnects, 0);
}

#[test]
fn a_clean_end_without_data_backs_off_before_the_next_resume() {
    let (clock, conn, mut s) = post(
        vec![body(&[]), body(&[Step::Hang])],
        Some(RESUME),
        Some("9"),
    );
    assert_eq!(
        untimed(&clock, &mut s, 3),
        [
            "open 9",
            "retry 1: connection failed: the server closed the stream",
            "open 9"
        ]
    );
    assert!(conn.connect_times()[1] >= Millis(1000), "backed off");
}

#[test]
fn a_stored_resume_url_is_resumed_and_the_body_never_posted() {
    let (clock, conn, mut s) = post(
        vec![
            Answer::Refuse(Failure::Network("refused".into())),
            body(&[Step::Bytes("id: 8\ndata: h\n\n"), Step::Fail("reset")]),
            Answer::Refuse(Failure::Status {
                code: 204,
                retry_after: None,
            }),
        ],
        Some(RESUME),
        Some("7"),
    );
    assert_eq!(s.resumable(), Some(true));
    assert_eq!(
        untimed(&clock, &mut s, 4),
        [
            "retry 1: connection failed: refused",
            "open 7",
            "8",
            "retry 1: connection failed: reset"
        ]
    );
    assert_eq!(run(&clock, s.next()), Err(StreamError::Done));
    assert_eq!(
        conn.sent(),
        [
            format!("GET {RESUME} after 7"),
            format!("GET {RESUME} after 7"),
            format!("GET {RESUME} after 8"),
        ]
    );
}

#[test]
fn a_post_starts_a_new_answer_without_last_event_id() {
    let (clock, conn, mut s) = post(
        vec![Answer::Located(RESUME, vec![Step::Hang])],
        None,
        Some("old-5"),
    );
    assert_eq!(
        untimed(&clock, &mut s, 2),
        ["open -", &format!("resumable {RESUME}")]
    );
    assert_eq!(conn.sent(), [r#"POST http://x/sse {"q":1}"#]);
}

#[test]
fn a_post_without_an_answer_is_not_sent_again() {
    let (clock, conn, mut s) = post(
        vec![Answer::Refuse(Failure::Network("reset".into()))],
        None,
        None,
    );
    let error = run(&clock, s.next()).unwrap_err();
    assert_eq!(
        error,
        StreamError::Unanswered(Failure::Network("reset".into()))
    );
    assert!(error.to_string().contains("not sent again"), "{error}");
    assert_eq!(run(&clock, s.next()), Err(error), "final");
    assert_eq!(conn.sent().len(), 1);
    assert_eq!(s.resumable(), None);
}

#[test]
fn a_post_is_sent_again_only_after_an_answer_saying_it_was_not_acted_on() {
    let busy = Failure::Status {
        code: 503,
        retry_after: Some(Millis(5000)),
    };
    let (clock, conn, mut s) = post(
        vec![
            Answer::Refuse(busy.clone()),
            Answer::Refuse(Failure::Status {
                code: 429,
                retry_after: None,
            }),
            Answer::Located(RESUME, vec![Step::Hang]),
        ],
        None,
        None,
    );
    let got = untimed(&clock, &mut s, 4);
    assert!(got[0].starts_with("retry 1: "), "{got:?}");
    assert!(got[1].starts_with("retry 2: "), "{got:?}");
    assert_eq!(
        got[2..],
        ["open -".to_owned(), format!("resumable {RESUME}")]
    );
    assert!(
        conn.connect_times()[1] >= Millis(5000),
        "Retry-After honoured"
    );
    assert_eq!(conn.sent(), [r#"POST http://x/sse {"q":1}"#; 3]);

    for code in [500, 502, 504] {
        let failure = Failure::Status {
            code,
            retry_after: None,
        };
        let (clock, conn, mut s) = post(vec![Answer::Refuse(failure.clone())], None, None);
        assert_eq!(
            run(&clock, s.next()),
            Err(StreamError::GaveUp(GiveUp::Permanent(failure))),
            "{code} may have been acted on"
        );
        assert_eq!(conn.sent().len(), 1);
    }
}

#[test]
fn a_post_answer_without_content_location_ends_cleanly_or_cannot_resume() {
    let (clock, conn, mut s) = post(
        vec![body(&[Step::Bytes("data: a\n\ndata: b\n\n")])],
        None,
        None,
    );
    assert_eq!(untimed(&clock, &mut s, 3), ["open -", "a", "b"]);
    assert_eq!(s.resumable(), Some(false));
    assert_eq!(run(&clock, s.next()), Err(StreamError::Done));
    assert_eq!(conn.sent().len(), 1);

    let (clock, conn, mut s) = post(
        vec![body(&[Step::Bytes("data: a\n\n"), Step::Fail("reset")])],
        None,
        None,
    );
    assert_eq!(untimed(&clock, &mut s, 2), ["open -", "a"]);
    let error = run(&clock, s.next()).unwrap_err();
    assert_eq!(
        error,
        StreamError::Unresumable(Failure::Network("reset".into()))
    );
    assert!(error.to_string().contains("no Content-Location"), "{error}");
    assert_eq!(conn.sent().len(), 1, "never POSTs again");
    assert_eq!((s.resumable(), s.resume_url()), (Some(false), None));
}

#[test]
fn a_get_stream_ignores_content_location_and_204_stays_a_failure() {
    let (clock, conn, mut s) = setup(
        vec![
            Answer::Located(RESUME, vec![Step::Bytes("id: 1\ndata: a\n\n")]),
            Answer::Refuse(Failure::Status {
                code: 204,
                retry_after: None,
            }),
        ],
        64,
    );
    assert_eq!(untimed(&clock, &mut s, 3)[..2], ["open -", "1"]);
    assert!(matches!(
        run(&clock, s.next()),
        Err(StreamError::GaveUp(GiveUp::Permanent(_)))
    ));
    assert_eq!(conn.sent()[1], "GET http://x/sse after 1");
    assert_eq!((s.resumable(), s.resume_url()), (Some(true), None));
}

#[test]
fn next_with_yields_the_resume_url_before_handing_out_the_answer() {
    let (clock, _, mut s) = post(
        vec![Answer::Located(
            RESUME,
            vec![
                Step::Bytes("id: 1\ndata: a\n\nid: 2\ndata: b\n\n"),
                Step::Hang,
            ],
        )],
        None,
        None,
    );
    assert_eq!(
        items_with(&clock, &mut s, 4),
        [
            "open -".to_owned(),
            format!("resumable {RESUME}"),
            "1".into(),
            "2".into()
        ]
    );
}
