//! Per-stream event tracking: dedup and the cursor.
//!
//! # Driving contract
//!
//! An [`EventTracker`] is plain synchronous state; it never awaits, never reads
//! a clock and, once its window has grown, never allocates. For every event the
//! stream yields:
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
//! - Any other id is a duplicate if its fingerprint is in the window, fresh
//!   otherwise.

use crate::clock::Millis;
use crate::cursor::{Cursor, StreamKey};
use crate::fingerprint::FingerprintKey;
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
    /// entropy source).
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
    fingerprint_key: FingerprintKey,
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
            fingerprint_key: config.fingerprint_key,
            window: DedupWindow::new(config.window, config.max_age),
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

    /// Starts over from an id the client already has, forgetting every
    /// other id of the window: for a client whose own position is not the
    /// stored cursor it was opened with (a reloaded browser tab that kept
    /// its own), so that the events between the two are not taken for
    /// replays.
    pub fn restart_at(&mut self, id: &str, now: Millis) {
        self.window.clear();
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
            let fp = self.fingerprint_key.fingerprint(id.as_bytes());
            if !self.window.contains(fp) {
                self.window.insert(fp, now);
            }
        }
    }

    /// Whether `id` is in the window, without observing it.
    pub fn has_seen(&self, id: &str) -> bool {
        !id.is_empty()
            && self
                .window
                .contains(self.fingerprint_key.fingerprint(id.as_bytes()))
    }

    /// Classifies one event; see the [module docs](self). O(1), no await.
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
        let fp = self.fingerprint_key.fingerprint(id.as_bytes());
        if self.window.contains(fp) {
            Slot::bump(&self.slot.duplicates);
            return Observation::Duplicate;
        }
        self.window.insert(fp, now);
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
            publisher.publish(&self.slot, &self.last_event_id, self.seq, self.last_seen);
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
    }
}
