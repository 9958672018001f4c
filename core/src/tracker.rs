//! Per-stream event tracking: dedup and the cursor.
//!
//! # Driving contract
//!
//! An [`EventTracker`] is plain synchronous state; it never awaits, never reads
//! a clock and, once its window has grown (and made its index, if a
//! non-decimal id needed one), never allocates. For every event the stream
//! yields:
//!
//! 1. call [`EventTracker::observe`] with the event's id (`None` when the event
//!    had no `id` field) and the current time;
//! 2. if it answers [`Observation::Fresh`], hand the event to the application;
//!    drop it on [`Observation::Duplicate`];
//! 3. once the application has taken the event (the line written and flushed,
//!    the callback returned), call [`EventTracker::commit`].
//!
//! `commit` declares every event observed so far delivered and moves the
//! cursor; only then does the persistence worker learn of it. So a crash
//! between observing and delivering repeats the event after restart, and never
//! skips it. [`EventTracker::last_event_id`] already moves at `observe`: it is
//! the id to send as `Last-Event-ID` when this process reconnects, since the
//! observed event is in this process's hands.
//!
//! # Ids
//!
//! - An event without an id is fresh and does not touch the cursor.
//! - An event with an empty id is fresh and resets the cursor, as the SSE
//!   specification resets the last event id: the next reconnect sends no
//!   `Last-Event-ID`. The dedup window is cleared too, because a server that
//!   resets its ids may reuse them, and dropping a fresh event is worse than
//!   delivering a duplicate.
//! - Any other id is a duplicate if it is in the window, fresh otherwise.
//!   The window keeps the last distinct ids in eight bytes each. Canonical
//!   decimal ids that increase, nearly every real stream's, are kept as their
//!   numbers: exact, and found without hashing, since the tracker's per-event
//!   cost was mostly hashing. Any other id is kept as its keyed 64-bit
//!   fingerprint, and from then on so are the ids that were in the window
//!   with it, until they age out or the window is cleared.

use crate::clock::Millis;
use crate::cursor::{Cursor, StreamKey};
use crate::fingerprint::FingerprintKey;
use crate::saved_window::Span;
use crate::slot::{Publisher, Slot};
use crate::window::DedupWindow;
use std::sync::Arc;

/// Settings of a tracker's dedup window.
#[derive(Clone, Debug)]
pub struct TrackerConfig {
    /// How many distinct ids the window remembers (default 1024, at most
    /// [`MAX_WINDOW`](crate::MAX_WINDOW)).
    pub window: usize,
    /// Also forget ids older than this (default: no age bound).
    pub max_age: Option<Millis>,
    /// The fingerprint key; share one key per process. Default: a random key
    /// ([`FingerprintKey::random`], which panics where the platform has no
    /// entropy source). A [`Registry`](crate::Registry) over a store that
    /// keeps windows uses the store's key instead, so that stored windows
    /// mean the same after a restart.
    pub fingerprint_key: FingerprintKey,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        TrackerConfig {
            window: 1024,
            max_age: None,
            fingerprint_key: FingerprintKey::random(),
        }
    }
}

/// Whether an observed event should be delivered.
#[must_use]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Observation {
    /// Not seen before (or carries no id): deliver it, then commit.
    Fresh,
    /// Already seen inside the window: drop it.
    Duplicate,
}

impl Observation {
    /// `true` for [`Observation::Fresh`].
    pub fn is_fresh(self) -> bool {
        self == Observation::Fresh
    }
}

/// Counters of one tracker.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct TrackerStats {
    /// Events passed to `observe`.
    pub observed: u64,
    /// Events rejected as duplicates.
    pub duplicates: u64,
}

/// Dedup window and cursor of one stream. See the [module docs](self).
pub struct EventTracker {
    window: DedupWindow,
    last_event_id: String,
    seq: u64,
    uncommitted: bool,
    last_seen: Millis,
    slot: Arc<Slot>,
    publisher: Option<Publisher>,
}

impl EventTracker {
    /// A tracker with no persistence: dedup and cursor live in memory only.
    /// Trackers that persist come from a [`Registry`](crate::Registry).
    pub fn new(key: StreamKey, config: TrackerConfig) -> Self {
        Self::with_slot(config, Arc::new(Slot::new(key)), None)
    }

    pub(crate) fn with_slot(
        config: TrackerConfig,
        slot: Arc<Slot>,
        publisher: Option<Publisher>,
    ) -> Self {
        EventTracker {
            window: DedupWindow::new(config.window, config.max_age, config.fingerprint_key),
            last_event_id: String::new(),
            seq: 0,
            uncommitted: false,
            last_seen: Millis::ZERO,
            slot,
            publisher,
        }
    }

    /// The stream this tracker follows.
    pub fn key(&self) -> &StreamKey {
        &self.slot.key
    }

    /// Starts with a stored window: its ids count as seen, and the entries
    /// handed to the store from now on continue it.
    pub(crate) fn restore_window(&mut self, saved: &Span) {
        self.window.restore(saved);
        self.slot
            .start_window(self.window.marks(), self.window.cap());
    }

    /// Starts from a stored cursor: its id counts as seen, and new cursors
    /// continue its sequence.
    pub fn seed(&mut self, cursor: &Cursor) {
        self.seq = self.seq.max(cursor.seq);
        self.last_seen = self.last_seen.max(cursor.at);
        self.set_last_event_id(&cursor.last_event_id, cursor.at);
    }

    /// Starts from an id the client already has (for example a
    /// `Last-Event-ID` supplied by the application): it counts as seen and
    /// becomes the id to resume from. The cursor is not persisted until the
    /// next commit.
    pub fn seed_last_event_id(&mut self, id: &str, now: Millis) {
        self.set_last_event_id(id, now);
    }

    /// Starts over from an id the client already has, forgetting the ids
    /// the window got after it (every other id, if it is not in the
    /// window): for a client whose own position is not the stored cursor it
    /// was opened with (a reloaded browser tab that kept its own), so that
    /// the events between the two are not taken for replays, while replays
    /// of what came before it still are.
    pub fn restart_at(&mut self, id: &str, now: Millis) {
        self.window.keep_through(id.as_bytes());
        self.set_last_event_id(id, now);
    }

    /// Continues the sequence of `stored`, a cursor another writer of the
    /// same stream stored (the tab that led a shared stream before this
    /// one), keeping this tracker's own position and window: its next
    /// commit supersedes `stored`.
    pub fn continue_after(&mut self, stored: &Cursor) {
        self.seq = self.seq.max(stored.seq);
    }

    fn set_last_event_id(&mut self, id: &str, now: Millis) {
        self.last_event_id.clear();
        self.last_event_id.push_str(id);
        if !id.is_empty() {
            // Already in the window or not, the id is in it now.
            let _ = self.window.insert(id.as_bytes(), now);
        }
    }

    /// Whether `id` is in the window, without observing it.
    pub fn has_seen(&self, id: &str) -> bool {
        !id.is_empty() && self.window.contains(id.as_bytes())
    }

    /// Classifies one event; see the [module docs](self). O(1) amortized
    /// (a replayed decimal id: a binary search of the window), no await.
    #[inline]
    pub fn observe(&mut self, id: Option<&str>, now: Millis) -> Observation {
        Slot::bump(&self.slot.observed);
        self.last_seen = self.last_seen.max(now);
        self.window.expire(now);
        let Some(id) = id else {
            return Observation::Fresh;
        };
        if id.is_empty() {
            self.window.clear();
            self.last_event_id.clear();
            self.uncommitted = true;
            return Observation::Fresh;
        }
        if !self.window.insert(id.as_bytes(), now) {
            Slot::bump(&self.slot.duplicates);
            return Observation::Duplicate;
        }
        self.last_event_id.clear();
        self.last_event_id.push_str(id);
        self.uncommitted = true;
        Observation::Fresh
    }

    /// Declares every event observed so far delivered to the application and
    /// moves the cursor, handing it to the persistence worker if there is one.
    /// Does nothing if no id-bearing event was observed since the last commit.
    #[inline]
    pub fn commit(&mut self) {
        if !std::mem::take(&mut self.uncommitted) {
            return;
        }
        self.seq += 1;
        if let Some(publisher) = &self.publisher {
            let window = Some(&self.window);
            publisher.publish(
                &self.slot,
                &self.last_event_id,
                self.seq,
                self.last_seen,
                window,
            );
        }
    }

    /// The id to send as `Last-Event-ID` when reconnecting, if any.
    pub fn last_event_id(&self) -> Option<&str> {
        (!self.last_event_id.is_empty()).then_some(self.last_event_id.as_str())
    }

    /// The sequence number of the last committed cursor move.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Whether events have been observed since the last commit.
    pub fn has_uncommitted(&self) -> bool {
        self.uncommitted
    }

    /// The cursor as of the last commit, or as observed if nothing is
    /// uncommitted.
    pub fn cursor(&self) -> Cursor {
        Cursor {
            key: self.slot.key.clone(),
            last_event_id: self.last_event_id.clone(),
            seq: self.seq,
            at: self.last_seen,
        }
    }

    /// How many ids the window currently remembers.
    pub fn window_len(&self) -> usize {
        self.window.len()
    }

    /// This tracker's counters.
    pub fn stats(&self) -> TrackerStats {
        use std::sync::atomic::Ordering::Relaxed;
        TrackerStats {
            observed: self.slot.observed.load(Relaxed),
            duplicates: self.slot.duplicates.load(Relaxed),
        }
    }
}

impl Drop for EventTracker {
    fn drop(&mut self) {
        if let Some(publisher) = &self.publisher {
            publisher.registry.close(&self.slot);
        }
    }
}

impl core::fmt::Debug for EventTracker {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("EventTracker")
            .field("key", &self.slot.key)
            .field("last_event_id", &self.last_event_id)
            .field("seq", &self.seq)
            .field("window_len", &self.window.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::TestCaseError;
    use std::collections::VecDeque;

    fn tracker(window: usize) -> EventTracker {
        EventTracker::new(
            StreamKey::new("s", "1"),
            TrackerConfig {
                window,
                max_age: None,
                fingerprint_key: FingerprintKey::new(7, 9),
            },
        )
    }

    #[test]
    fn fresh_then_duplicate() {
        let mut t = tracker(16);
        assert_eq!(t.observe(Some("a"), Millis(1)), Observation::Fresh);
        assert_eq!(t.observe(Some("a"), Millis(2)), Observation::Duplicate);
        assert_eq!(t.observe(Some("b"), Millis(3)), Observation::Fresh);
        assert_eq!(t.last_event_id(), Some("b"));
        assert_eq!(
            t.stats(),
            TrackerStats {
                observed: 3,
                duplicates: 1
            }
        );
    }

    #[test]
    fn continue_after_takes_the_sequence_not_the_position() {
        let mut t = tracker(16);
        assert!(t.observe(Some("a"), Millis(1)).is_fresh());
        t.commit();
        let stored = Cursor {
            key: StreamKey::new("s", "1"),
            last_event_id: "z".into(),
            seq: 40,
            at: Millis(9),
        };
        t.continue_after(&stored);
        assert_eq!(t.last_event_id(), Some("a"));
        assert!(!t.has_seen("z"));
        t.restart_at("b", Millis(1));
        assert!(!t.has_seen("a") && t.has_seen("b"));
        assert_eq!(t.last_event_id(), Some("b"));
        t.restart_at("a", Millis(1));
        assert!(t.observe(Some("z"), Millis(2)).is_fresh());
        assert!(t.has_seen("z") && t.has_seen("a") && !t.has_seen(""));
        t.commit();
        assert_eq!(t.seq(), 41);
        // A stored cursor behind this tracker changes nothing.
        t.continue_after(&Cursor { seq: 3, ..stored });
        assert_eq!(t.seq(), 41);
    }

    #[test]
    fn restart_at_keeps_what_came_before_the_id() {
        for ids in [["7", "8", "9", "10"], ["u-a", "8", "u-c", "10"]] {
            let mut t = tracker(16);
            for id in ids {
                assert!(t.observe(Some(id), Millis(1)).is_fresh());
            }
            t.commit();
            t.restart_at(ids[1], Millis(2));
            assert!(t.has_seen(ids[0]) && t.has_seen(ids[1]), "{ids:?}");
            assert!(!t.has_seen(ids[2]) && !t.has_seen(ids[3]), "{ids:?}");
            assert_eq!(t.last_event_id(), Some(ids[1]));
            // The newest id: nothing to forget.
            t.restart_at(ids[1], Millis(2));
            assert!(t.has_seen(ids[0]));
            assert!(t.observe(Some(ids[2]), Millis(3)).is_fresh());
        }
    }

    #[test]
    fn events_without_id_are_fresh_and_keep_the_cursor() {
        let mut t = tracker(16);
        assert!(t.observe(Some("7"), Millis(1)).is_fresh());
        t.commit();
        assert!(t.observe(None, Millis(2)).is_fresh());
        assert!(t.observe(None, Millis(3)).is_fresh());
        assert!(!t.has_uncommitted());
        t.commit();
        assert_eq!(t.seq(), 1);
        assert_eq!(t.last_event_id(), Some("7"));
    }

    #[test]
    fn empty_id_resets_cursor_and_window() {
        let mut t = tracker(16);
        assert!(t.observe(Some("1"), Millis(1)).is_fresh());
        t.commit();
        assert!(t.observe(Some(""), Millis(2)).is_fresh());
        assert_eq!(t.last_event_id(), None);
        t.commit();
        assert_eq!(t.seq(), 2);
        assert_eq!(t.cursor().last_event_id, "");
        assert!(
            t.observe(Some("1"), Millis(3)).is_fresh(),
            "ids from before a reset are fresh again"
        );
    }

    #[test]
    fn commit_moves_the_sequence_once() {
        let mut t = tracker(16);
        t.commit();
        assert_eq!(t.seq(), 0, "nothing observed, nothing to commit");
        let _ = t.observe(Some("1"), Millis(1));
        let _ = t.observe(Some("2"), Millis(2));
        t.commit();
        t.commit();
        assert_eq!(t.seq(), 1);
        assert_eq!(t.cursor().last_event_id, "2");
    }

    #[test]
    fn seeding_counts_the_id_as_seen() {
        let mut t = tracker(16);
        t.seed(&Cursor {
            key: StreamKey::new("s", "1"),
            last_event_id: "41".into(),
            seq: 10,
            at: Millis(5),
        });
        assert_eq!(t.last_event_id(), Some("41"));
        assert_eq!(t.observe(Some("41"), Millis(6)), Observation::Duplicate);
        assert!(t.observe(Some("42"), Millis(7)).is_fresh());
        t.commit();
        assert_eq!(t.seq(), 11);

        let mut u = tracker(16);
        u.seed_last_event_id("9", Millis(1));
        assert_eq!(u.observe(Some("9"), Millis(2)), Observation::Duplicate);
        assert_eq!(u.last_event_id(), Some("9"));
    }

    #[test]
    fn age_bound_is_applied_at_observe() {
        let mut t = EventTracker::new(
            StreamKey::new("s", "1"),
            TrackerConfig {
                window: 1024,
                max_age: Some(Millis(100)),
                fingerprint_key: FingerprintKey::new(1, 1),
            },
        );
        assert!(t.observe(Some("x"), Millis(0)).is_fresh());
        assert!(!t.observe(Some("x"), Millis(99)).is_fresh());
        assert!(t.observe(Some("x"), Millis(100)).is_fresh());
    }

    /// The reference model: a FIFO of the last `cap` distinct id strings
    /// with their times, the age bound applied from the oldest, and the
    /// cursor fields the tracker reports.
    struct Model {
        cap: usize,
        max_age: Option<u64>,
        window: VecDeque<(String, u64)>,
        last_event_id: String,
        seq: u64,
        uncommitted: bool,
        last_seen: u64,
        observed: u64,
        duplicates: u64,
    }

    impl Model {
        fn new(cap: usize, max_age: Option<u64>) -> Self {
            Model {
                cap,
                max_age,
                window: VecDeque::new(),
                last_event_id: String::new(),
                seq: 0,
                uncommitted: false,
                last_seen: 0,
                observed: 0,
                duplicates: 0,
            }
        }

        fn has_seen(&self, id: &str) -> bool {
            self.window.iter().any(|(seen, _)| seen == id)
        }

        fn add(&mut self, id: &str, at: u64) {
            self.window.push_back((id.to_owned(), at));
            if self.window.len() > self.cap {
                self.window.pop_front();
            }
        }

        fn set_last_event_id(&mut self, id: &str, at: u64) {
            self.last_event_id = id.to_owned();
            if !id.is_empty() && !self.has_seen(id) {
                self.add(id, at);
            }
        }

        fn observe(&mut self, id: Option<&str>, now: u64) -> Observation {
            self.observed += 1;
            self.last_seen = self.last_seen.max(now);
            if let Some(max_age) = self.max_age {
                while self
                    .window
                    .front()
                    .is_some_and(|&(_, at)| at.saturating_add(max_age) <= now)
                {
                    self.window.pop_front();
                }
            }
            match id {
                None => {}
                Some("") => {
                    self.window.clear();
                    self.last_event_id.clear();
                    self.uncommitted = true;
                }
                Some(id) if self.has_seen(id) => {
                    self.duplicates += 1;
                    return Observation::Duplicate;
                }
                Some(id) => {
                    self.add(id, now);
                    self.last_event_id = id.to_owned();
                    self.uncommitted = true;
                }
            }
            Observation::Fresh
        }
    }

    /// Ids that are numbers only to a lax parser, and strings.
    const ODD: [&str; 12] = [
        "007",
        "00",
        "01",
        "+1",
        "-1",
        " 5",
        "5 ",
        "1e3",
        "0x10",
        "18446744073709551616",
        "99999999999999999999",
        "184467440737095516150",
    ];

    /// How a step picks its id; resolved against the ids so far.
    #[derive(Clone, Debug)]
    enum Pick {
        /// The counter, moved up by this gap (0: the current counter).
        Next(u64),
        /// The counter set to `u64::MAX` minus this.
        NearMax(u64),
        /// The id this many picks back.
        Back(usize),
        /// This much below the counter (which stays).
        Below(u64),
        /// One of [`ODD`].
        Odd(usize),
        /// One of a few non-numeric strings.
        Text(u8),
    }

    #[derive(Clone, Debug)]
    enum Step {
        Observe(Pick),
        NoId,
        EmptyId,
        Wait(u64),
        Commit,
        /// `seed` with a cursor of this id, sequence and age.
        Seed(Pick, u64, u64),
        SeedLastEventId(Pick),
        RestartAt(Pick),
        ContinueAfter(u64),
    }

    #[derive(Default)]
    struct Ids {
        counter: u64,
        history: Vec<String>,
    }

    impl Ids {
        fn resolve(&mut self, pick: &Pick) -> String {
            let id = match *pick {
                Pick::Next(gap) => {
                    self.counter = self.counter.saturating_add(gap);
                    self.counter.to_string()
                }
                Pick::NearMax(d) => {
                    self.counter = u64::MAX - d;
                    self.counter.to_string()
                }
                Pick::Back(k) if !self.history.is_empty() => {
                    self.history[self.history.len() - 1 - k % self.history.len()].clone()
                }
                Pick::Back(_) => "0".to_owned(),
                Pick::Below(d) => self.counter.saturating_sub(d).to_string(),
                Pick::Odd(i) => ODD[i % ODD.len()].to_owned(),
                Pick::Text(k) => format!("ev-{}", k % 6),
            };
            self.history.push(id.clone());
            id
        }

        /// Ids worth asking `has_seen` about: recent ones, neighbours of the
        /// counter, and the odd ones.
        fn probes(&self) -> Vec<String> {
            let mut probes: Vec<String> = self.history.iter().rev().take(48).cloned().collect();
            for d in 0..4 {
                probes.push(self.counter.saturating_sub(d).to_string());
                probes.push(self.counter.saturating_add(d).to_string());
            }
            probes.extend(ODD.iter().map(|s| s.to_string()));
            probes.extend((0..6).map(|k| format!("ev-{k}")));
            probes.extend(["0", "", "1"].map(String::from));
            probes
        }
    }

    /// Runs `steps` through a tracker and the model, comparing everything
    /// observable after every step.
    fn check_against_model(
        cap: usize,
        max_age: Option<u64>,
        steps: &[Step],
    ) -> Result<(), TestCaseError> {
        let mut t = EventTracker::new(
            StreamKey::new("s", "1"),
            TrackerConfig {
                window: cap,
                max_age: max_age.map(Millis),
                fingerprint_key: FingerprintKey::new(7, 9),
            },
        );
        let mut m = Model::new(cap, max_age);
        let mut ids = Ids::default();
        let mut now = 0u64;
        for (n, step) in steps.iter().enumerate() {
            match step {
                Step::Observe(pick) => {
                    let id = ids.resolve(pick);
                    prop_assert_eq!(
                        t.observe(Some(&id), Millis(now)),
                        m.observe(Some(&id), now),
                        "step {} observes {:?}",
                        n,
                        id
                    );
                }
                Step::NoId => {
                    prop_assert_eq!(t.observe(None, Millis(now)), m.observe(None, now));
                }
                Step::EmptyId => {
                    prop_assert_eq!(t.observe(Some(""), Millis(now)), m.observe(Some(""), now));
                }
                Step::Wait(dt) => now += dt,
                Step::Commit => {
                    t.commit();
                    if std::mem::take(&mut m.uncommitted) {
                        m.seq += 1;
                    }
                }
                Step::Seed(pick, seq, age) => {
                    let id = ids.resolve(pick);
                    let at = now.saturating_sub(*age);
                    t.seed(&Cursor {
                        key: StreamKey::new("s", "1"),
                        last_event_id: id.clone(),
                        seq: *seq,
                        at: Millis(at),
                    });
                    m.seq = m.seq.max(*seq);
                    m.last_seen = m.last_seen.max(at);
                    m.set_last_event_id(&id, at);
                }
                Step::SeedLastEventId(pick) => {
                    let id = ids.resolve(pick);
                    t.seed_last_event_id(&id, Millis(now));
                    m.set_last_event_id(&id, now);
                }
                Step::RestartAt(pick) => {
                    let id = ids.resolve(pick);
                    t.restart_at(&id, Millis(now));
                    match m.window.iter().rposition(|(seen, _)| *seen == id) {
                        Some(at) => m.window.truncate(at + 1),
                        None => m.window.clear(),
                    }
                    m.set_last_event_id(&id, now);
                }
                Step::ContinueAfter(seq) => {
                    t.continue_after(&Cursor {
                        key: StreamKey::new("s", "1"),
                        last_event_id: "elsewhere".into(),
                        seq: *seq,
                        at: Millis(now),
                    });
                    m.seq = m.seq.max(*seq);
                }
            }
            prop_assert_eq!(
                t.window_len(),
                m.window.len(),
                "window_len after step {}",
                n
            );
            for probe in ids.probes() {
                prop_assert_eq!(
                    t.has_seen(&probe),
                    m.has_seen(&probe),
                    "has_seen({:?}) after step {}",
                    probe,
                    n
                );
            }
            for (id, _) in &m.window {
                prop_assert!(t.has_seen(id), "{:?} in the model's window", id);
            }
            let expected_id = (!m.last_event_id.is_empty()).then_some(m.last_event_id.as_str());
            prop_assert_eq!(t.last_event_id(), expected_id);
            prop_assert_eq!(t.seq(), m.seq);
            prop_assert_eq!(t.has_uncommitted(), m.uncommitted);
            prop_assert_eq!(t.cursor().at, Millis(m.last_seen));
            prop_assert_eq!(
                t.stats(),
                TrackerStats {
                    observed: m.observed,
                    duplicates: m.duplicates
                }
            );
        }
        Ok(())
    }

    fn pick() -> impl Strategy<Value = Pick> {
        prop_oneof![
            12 => (1u64..4).prop_map(Pick::Next),
            3 => (0u64..1_000_000).prop_map(Pick::Next),
            4 => (0usize..80).prop_map(Pick::Back),
            2 => (1u64..60).prop_map(Pick::Below),
            1 => (0u64..30).prop_map(Pick::NearMax),
            1 => any::<usize>().prop_map(Pick::Odd),
            1 => any::<u8>().prop_map(Pick::Text),
        ]
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            40 => pick().prop_map(Step::Observe),
            1 => Just(Step::NoId),
            1 => Just(Step::EmptyId),
            4 => (0u64..40).prop_map(Step::Wait),
            4 => Just(Step::Commit),
            1 => (pick(), 0u64..100, 0u64..100).prop_map(|(p, s, a)| Step::Seed(p, s, a)),
            1 => pick().prop_map(Step::SeedLastEventId),
            1 => pick().prop_map(Step::RestartAt),
            1 => (0u64..100).prop_map(Step::ContinueAfter),
        ]
    }

    /// Sequences that leave the sorted mode at chosen points: short of a
    /// full window, exactly full, after the ring has wrapped; with small
    /// caps; by every kind of id that breaks the run.
    #[test]
    fn switching_modes_matches_the_model() {
        let breakers = [
            Step::Observe(Pick::Text(0)),
            Step::Observe(Pick::Odd(0)),
            Step::Observe(Pick::Odd(9)),
            Step::Observe(Pick::Below(1)),
            Step::Observe(Pick::Back(0)),
            Step::Observe(Pick::Back(1)),
            Step::EmptyId,
            Step::RestartAt(Pick::Below(2)),
            Step::SeedLastEventId(Pick::Text(1)),
            Step::Seed(Pick::Below(3), 5, 0),
        ];
        for cap in [1, 2, 3, 4, 5, 8, 9, 17, 40] {
            for max_age in [None, Some(25)] {
                for fill in [0, 1, cap - 1, cap, cap + 1, cap + cap / 2, 3 * cap + 1] {
                    for breaker in &breakers {
                        let mut steps = Vec::new();
                        for k in 0..fill {
                            steps.push(Step::Observe(Pick::Next(1 + k as u64 % 3)));
                            steps.push(Step::Wait(2));
                        }
                        // Below by the gap of the last two is in no entry
                        // only if that gap was more than one.
                        steps.push(Step::Observe(Pick::Next(2)));
                        steps.push(breaker.clone());
                        for k in 0..2 * cap + 2 {
                            steps.push(if k % 4 == 3 {
                                Step::Observe(Pick::Back(k % 5))
                            } else {
                                Step::Observe(Pick::Next(1 + k as u64 % 2))
                            });
                            steps.push(Step::Wait(3));
                        }
                        steps.push(breaker.clone());
                        steps.push(Step::Observe(Pick::Text(3)));
                        steps.push(Step::Observe(Pick::Below(1)));
                        if let Err(e) = check_against_model(cap, max_age, &steps) {
                            panic!("cap {cap}, max_age {max_age:?}, fill {fill}, {breaker:?}: {e}");
                        }
                    }
                }
            }
        }
    }

    proptest! {
        /// A replay of an id within the last `window` distinct ids is always
        /// rejected; one older than that is accepted again.
        #[test]
        fn duplicate_inside_window_rejected_outside_accepted(
            window in 1usize..64,
            count in 1usize..200,
            back in 0usize..200,
        ) {
            let mut t = tracker(window);
            for n in 0..count {
                prop_assert!(t.observe(Some(&n.to_string()), Millis(n as u64)).is_fresh());
            }
            if back < count {
                let id = (count - 1 - back).to_string();
                let expected = if back < window { Observation::Duplicate } else { Observation::Fresh };
                prop_assert_eq!(t.observe(Some(&id), Millis(0)), expected);
            }
        }

        /// The tracker against the reference model over mixed id sequences.
        #[test]
        fn matches_reference_model(
            cap in prop_oneof![1usize..4, 1usize..48],
            max_age in prop::option::of(1u64..300),
            steps in prop::collection::vec(step(), 0..400),
        ) {
            check_against_model(cap, max_age, &steps)?;
        }
    }
}
