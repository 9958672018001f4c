//! One stream shared by several consumers: the rules.
//!
//! The browser package lets the tabs and workers of one origin that open the
//! same stream key share one connection: one of them, the *leader*, follows
//! the stream and sends the fresh events it delivers to the others, the
//! *followers*, which deliver them to their own listeners. This module holds
//! the rules that make that exactly-once and in order in every consumer that
//! stays open, across leader changes; the host supplies the election (Web
//! Locks) and the messages (`BroadcastChannel`) and reasons about order
//! nowhere else.
//!
//! # The rules
//!
//! - **Every event sent names the one before it.** A [`Frame`] is an event
//!   and `prev`, the `lastEventId` before it in the sender's order of
//!   delivery. Ids need not be ordered: a consumer knows it has the event
//!   before a frame when `prev` is its own last id.
//! - **Every consumer runs its frames through a [`Sequencer`]** with its own
//!   [`EventTracker`], whichever role it has: a frame that follows what it
//!   delivered last is delivered; one whose id it has is dropped; any other
//!   is held until the chain reaches it (frames of another sender that
//!   arrive out of turn) or until it is overdue. An overdue frame is dropped
//!   if the consumer's stream moved on while it was held (it was a replay
//!   from before the consumer's position) and delivered otherwise (the
//!   events between were missed for good: a gap, taken rather than
//!   stalling).
//! - **Every consumer keeps its last delivered frames** ([`Recent`]),
//!   bounded in count and bytes, whichever role it had.
//! - **A consumer that joins while another leads** asks the leader for what
//!   came after its last id, and so does one whose frames start to wait
//!   ([`Sequencer::should_ask`]: the chain broke between two leaders). The
//!   leader answers from its [`Recent`] ([`Recent::catch_up`]); the answer
//!   chains on from the asker's last id, so its sequencer delivers it and
//!   then the live frames it held meanwhile, in order. A leader that does
//!   not have that id answers `None`; what waits is then settled when it
//!   is overdue (a joiner starts live, at most one wait late).
//! - **A follower promoted to leader** first delivers the frames it already
//!   received, forgets those that still wait ([`Sequencer::discard`]), and
//!   then resumes from its own last id, not from the stored cursor:
//!   everything after what it delivered comes from the server. Only when it has delivered nothing and has no
//!   cursor of its own does it resume from the stored cursor.
//! - **Only the leader commits** (moves the stored cursor); a promoted
//!   follower first continues the sequence of the cursor the previous leader
//!   stored ([`EventTracker::continue_after`]).

use crate::clock::Millis;
use crate::sse::Event;
use crate::tracker::EventTracker;
use std::collections::VecDeque;

/// An event sent by a leader, and the `lastEventId` before it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The `lastEventId` of the event the sender delivered before this
    /// one (empty if none, or after a reset).
    pub prev: String,
    /// The event.
    pub event: Event,
}

/// The last frames a consumer delivered, for consumers that join later;
/// bounded by a number of frames and of bytes (the oldest go first; the
/// newest frame always stays).
#[derive(Clone, Debug)]
pub struct Recent {
    frames: VecDeque<Frame>,
    bytes: usize,
    max_frames: usize,
    max_bytes: usize,
}

impl Recent {
    /// Default bounds of the browser host: 1024 frames...
    pub const DEFAULT_FRAMES: usize = 1024;
    /// ... and 1 MiB.
    pub const DEFAULT_BYTES: usize = 1 << 20;

    /// Empty, keeping at most `max_frames` frames (at least one) and about
    /// `max_bytes` bytes.
    pub fn new(max_frames: usize, max_bytes: usize) -> Self {
        Recent {
            frames: VecDeque::new(),
            bytes: 0,
            max_frames: max_frames.max(1),
            max_bytes,
        }
    }

    /// Keeps `frame`, forgetting the oldest beyond the bounds.
    pub fn push(&mut self, frame: Frame) {
        self.bytes += size_of(&frame);
        self.frames.push_back(frame);
        while self.frames.len() > self.max_frames
            || (self.bytes > self.max_bytes && self.frames.len() > 1)
        {
            if let Some(old) = self.frames.pop_front() {
                self.bytes -= size_of(&old);
            }
        }
    }

    /// How many frames are kept.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// The answer to a consumer joining with `after` as its last event id:
    /// the kept frames after the last one with that id, oldest first;
    /// `None` when it has no id, or one no longer kept (it then starts
    /// live).
    pub fn catch_up(&self, after: Option<&str>) -> Option<Vec<Frame>> {
        let after = after.filter(|id| !id.is_empty())?;
        let at = self
            .frames
            .iter()
            .rposition(|f| f.event.id.as_deref() == Some(after))?;
        Some(self.frames.iter().skip(at + 1).cloned().collect())
    }
}

/// What a frame costs in a [`Recent`]: its strings, and a little for the
/// rest.
fn size_of(frame: &Frame) -> usize {
    let e = &frame.event;
    64 + frame.prev.len()
        + e.event.len()
        + e.data.len()
        + e.last_event_id.len()
        + e.id.as_ref().map_or(0, String::len)
}

/// A frame waiting for the chain to reach it.
#[derive(Clone, Debug)]
struct Held {
    frame: Frame,
    since: Millis,
    /// Whether the consumer delivered anything since it was held.
    moved: bool,
}

/// What to do with a frame now.
enum Verdict {
    /// It follows the last delivered event (or the consumer has none yet).
    Next,
    /// The consumer has its id.
    Seen,
    /// Neither, yet.
    Wait,
}

/// Puts one consumer's frames in order; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct Sequencer {
    /// The `lastEventId` of the last event delivered (or the cursor it
    /// started from); `None` until the first, when any frame will do.
    last: Option<String>,
    held: VecDeque<Held>,
    max_wait: Millis,
    max_held: usize,
    /// The last catch-up request made.
    request: Option<Request>,
}

/// A consumer's catch-up request.
#[derive(Clone, Debug)]
struct Request {
    /// The position it asked from.
    after: Option<String>,
    at: Millis,
    answered: bool,
}

impl Sequencer {
    /// How long a frame is held at most, by default.
    pub const DEFAULT_WAIT: Millis = Millis(1000);
    /// How many frames are held at most, by default.
    pub const DEFAULT_HELD: usize = 4096;

    /// A consumer whose last event id is `last` (its cursor; `None` for a
    /// consumer with none, which takes the first frame it gets), holding
    /// frames up to `max_wait` and at most `max_held` (at least one) of
    /// them.
    pub fn new(last: Option<&str>, max_wait: Millis, max_held: usize) -> Self {
        Sequencer {
            last: last.map(str::to_owned),
            held: VecDeque::new(),
            max_wait,
            max_held: max_held.max(1),
            request: None,
        }
    }

    /// Notes that the host asked the leader at `now` for what follows
    /// [`last`](Self::last) by itself (when it joined).
    pub fn asked(&mut self, now: Millis) {
        self.request = Some(Request {
            after: self.last.clone(),
            at: now,
            answered: false,
        });
    }

    /// Whether to ask the leader at `now` for what follows
    /// [`last`](Self::last): when frames wait (the chain broke: a frame went
    /// missing between two leaders) and no request was made for this
    /// position, or the one made is unanswered after a quarter of the wait
    /// (the leader it went to may be gone). After an answer for the current
    /// position, waiting frames are left to [`expire`](Self::expire).
    pub fn should_ask(&mut self, now: Millis) -> bool {
        if self.held.is_empty() {
            if self.request.as_ref().is_some_and(|r| r.answered) {
                self.request = None;
            }
            return false;
        }
        let due = match &self.request {
            None => true,
            Some(r) if r.after != self.last => true,
            Some(r) => !r.answered && now >= r.at + self.retry(),
        };
        if due {
            self.asked(now);
        }
        due
    }

    fn retry(&self) -> Millis {
        Millis(self.max_wait.0 / 4)
    }

    /// Takes the leader's answer to a request for what follows `after`
    /// ([`Recent::catch_up`]): its frames, which chain on from `after`.
    /// Without any (the leader does not have that id) what waits is left to
    /// [`expire`](Self::expire): the leader may be behind this consumer (it
    /// joined late, and leads now), and then its frames reach this
    /// consumer's position before the wait is over.
    pub fn answer(
        &mut self,
        after: Option<&str>,
        frames: Option<Vec<Frame>>,
        tracker: &mut EventTracker,
        now: Millis,
        out: &mut Vec<Frame>,
    ) {
        if let Some(r) = &mut self.request
            && r.after.as_deref() == after
        {
            r.answered = true;
        }
        for frame in frames.into_iter().flatten() {
            self.offer(frame, tracker, now, out);
        }
    }

    /// The `lastEventId` of the last event delivered, or the cursor it
    /// started from.
    pub fn last(&self) -> Option<&str> {
        self.last.as_deref()
    }

    /// How many frames are held.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// When to call [`expire`](Self::expire) and
    /// [`should_ask`](Self::should_ask) next: when the oldest held frame is
    /// overdue, or an unanswered request is due again.
    pub fn deadline(&self) -> Option<Millis> {
        let overdue = self.held.front()?.since + self.max_wait;
        let ask = self
            .request
            .as_ref()
            .filter(|r| !r.answered)
            .map_or(Millis::MAX, |r| r.at + self.retry());
        Some(overdue.min(ask))
    }

    /// The frame of an event this consumer delivers itself, as leader (it
    /// came out of its own stream, already through its tracker).
    pub fn frame(&mut self, event: Event) -> Frame {
        let prev = self
            .last
            .replace(event.last_event_id.clone())
            .unwrap_or_default();
        Frame { prev, event }
    }

    /// Takes a frame received from the leader at `now`; appends to `out`,
    /// in order, the frames to deliver now (already observed by `tracker`:
    /// hand them over, and the caller's own rules say when to commit).
    pub fn offer(
        &mut self,
        frame: Frame,
        tracker: &mut EventTracker,
        now: Millis,
        out: &mut Vec<Frame>,
    ) {
        match self.verdict(&frame, tracker) {
            Verdict::Seen => {
                // The sender reached this consumer's position: what it sent
                // before came from before it.
                if frame.event.id.is_some() && frame.event.id == self.last {
                    for held in &mut self.held {
                        held.moved = true;
                    }
                }
            }
            Verdict::Next => {
                self.deliver(frame, tracker, now, out);
                self.unblock(tracker, now, out);
            }
            Verdict::Wait => {
                self.held.push_back(Held {
                    frame,
                    since: now,
                    moved: false,
                });
                if self.held.len() > self.max_held {
                    self.settle_front(tracker, now, out);
                }
            }
        }
        self.expire(tracker, now, out);
    }

    /// Settles the frames held past their wait at `now`: dropped if the
    /// consumer delivered anything since it was held (it came from before
    /// the consumer's position), delivered otherwise (a gap).
    pub fn expire(&mut self, tracker: &mut EventTracker, now: Millis, out: &mut Vec<Frame>) {
        while self
            .held
            .front()
            .is_some_and(|h| h.since + self.max_wait <= now)
        {
            self.settle_front(tracker, now, out);
        }
    }

    /// Forgets the frames that wait: for a consumer that leads from now on,
    /// whose own connection brings everything after its last event (the
    /// frames that wait are older, or come again).
    pub fn discard(&mut self) {
        self.held.clear();
        self.request = None;
    }

    fn settle_front(&mut self, tracker: &mut EventTracker, now: Millis, out: &mut Vec<Frame>) {
        let Some(held) = self.held.pop_front() else {
            return;
        };
        if !held.moved && !matches!(self.verdict(&held.frame, tracker), Verdict::Seen) {
            self.deliver(held.frame, tracker, now, out);
        }
        self.unblock(tracker, now, out);
    }

    fn verdict(&self, frame: &Frame, tracker: &EventTracker) -> Verdict {
        if frame
            .event
            .id
            .as_deref()
            .is_some_and(|id| tracker.has_seen(id))
        {
            return Verdict::Seen;
        }
        match &self.last {
            Some(last) if *last != frame.prev => Verdict::Wait,
            _ => Verdict::Next,
        }
    }

    fn deliver(
        &mut self,
        frame: Frame,
        tracker: &mut EventTracker,
        now: Millis,
        out: &mut Vec<Frame>,
    ) {
        if tracker.observe(frame.event.id.as_deref(), now).is_fresh() {
            frame
                .event
                .last_event_id
                .clone_into(self.last.get_or_insert_default());
            for held in &mut self.held {
                held.moved = true;
            }
            out.push(frame);
        }
    }

    /// Delivers the held frames the chain now reaches, drops those seen.
    fn unblock(&mut self, tracker: &mut EventTracker, now: Millis, out: &mut Vec<Frame>) {
        while let Some(at) = self
            .held
            .iter()
            .position(|h| !matches!(self.verdict(&h.frame, tracker), Verdict::Wait))
        {
            let Some(held) = self.held.remove(at) else {
                break;
            };
            if matches!(self.verdict(&held.frame, tracker), Verdict::Next) {
                self.deliver(held.frame, tracker, now, out);
            }
        }
    }
}

#[cfg(test)]
mod tests;
