//! The per-stream hand-off point between a tracker and the worker.
//!
//! A tracker writes its newest committed cursor into its slot. Only the write
//! that finds the slot clean (not yet queued) sends the slot over the channel,
//! so the worker's queue holds at most one message per live stream however fast
//! events arrive, and the tracker never waits: the channel is unbounded and the
//! lock is held only to copy a few bytes. The worker snapshots the slot when it
//! flushes, which marks it clean again. Coalescing is therefore free: whatever
//! was written last before the snapshot is what gets persisted.
//!
//! When the store keeps windows, a commit also adds the window's new entries
//! to the slot's window change, which keeps everything not yet written
//! (through failed writes too) until the worker confirms a write of it; a
//! change that outgrows the window collapses to the window itself. See
//! `saved_window.rs`.
//!
//! The worker holds a slot from the moment it is queued until its cursor is
//! written (through failed attempts and retries too). The registry keeps only
//! a weak reference, so while a closed stream still has an unwritten cursor
//! its slot is alive, and reopening the stream picks the slot up again instead
//! of seeding from the store, which does not have that cursor yet.

use crate::clock::Millis;
use crate::cursor::{Cursor, StreamKey};
use crate::saved_window::{Span, WindowChange};
use crate::window::DedupWindow;
use crate::worker::Msg;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

pub(crate) struct Slot {
    pub(crate) key: StreamKey,
    state: Mutex<SlotState>,
    /// Events seen by the stream's tracker (written only by the tracker).
    pub(crate) observed: AtomicU64,
    /// Duplicates dropped by the stream's tracker (written only by the tracker).
    pub(crate) duplicates: AtomicU64,
    /// Whether a tracker of a registry holds this slot.
    pub(crate) open: AtomicBool,
}

#[derive(Default)]
struct SlotState {
    last_event_id: String,
    seq: u64,
    at: Millis,
    queued: bool,
    /// The window's entries not yet written; it ends where the window stood
    /// at the last commit. `None` when the store keeps no windows (the
    /// registry starts it when it does, [`Slot::start_window`]). Boxed, to
    /// keep an idle slot small.
    window: Option<Box<Span>>,
}

impl Slot {
    pub(crate) fn new(key: StreamKey) -> Self {
        Slot {
            key,
            state: Mutex::new(SlotState::default()),
            observed: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            open: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SlotState> {
        // The lock is only held to copy plain data, so a panic cannot leave
        // the state half-written; recover from poisoning.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores the newest cursor; returns true when the slot was clean and the
    /// caller must queue it. Reuses the id buffer, so a warm slot does not
    /// allocate.
    /// If the slot keeps a window change (the store keeps windows), also
    /// adds `window`'s entries since the last commit to it (see
    /// [`DedupWindow::export`]).
    pub(crate) fn publish(
        &self,
        last_event_id: &str,
        seq: u64,
        at: Millis,
        window: Option<&DedupWindow>,
    ) -> bool {
        let mut state = self.lock();
        if let Some(window) = window
            && state.window.is_some()
        {
            window.export(&mut state.window);
            if let Some(change) = &mut state.window {
                change.seq = seq;
            }
        }
        state.last_event_id.clear();
        state.last_event_id.push_str(last_event_id);
        state.seq = seq;
        state.at = at;
        !std::mem::replace(&mut state.queued, true)
    }

    /// The newest cursor, leaving the slot as it is.
    pub(crate) fn peek(&self) -> Cursor {
        self.cursor(&self.lock())
    }

    fn cursor(&self, state: &SlotState) -> Cursor {
        Cursor {
            key: self.key.clone(),
            last_event_id: state.last_event_id.clone(),
            seq: state.seq,
            at: state.at,
        }
    }

    fn window(&self, state: &SlotState) -> Option<WindowChange> {
        let span = state.window.as_ref()?;
        if !span.reset && span.len() == 0 {
            return None;
        }
        Some(WindowChange {
            key: self.key.clone(),
            span: (**span).clone(),
        })
    }

    /// Starts the window change of a tracker opened with a window standing
    /// at `marks` (epoch, entries pushed), unless the slot still has one
    /// not written, which ends there.
    pub(crate) fn start_window(&self, (epoch, end): (u64, u64), cap: usize) {
        self.lock()
            .window
            .get_or_insert_with(|| Box::new(Span::new(false, cap, epoch, end)));
    }

    /// The newest cursor and the window change not yet written as of it
    /// (one moment: the window is never ahead of the cursor), leaving the
    /// slot as it is.
    pub(crate) fn peek_with_window(&self) -> (Cursor, Option<WindowChange>) {
        let state = self.lock();
        (self.cursor(&state), self.window(&state))
    }

    /// The newest cursor, if the stream ever committed or was seeded.
    pub(crate) fn committed(&self) -> Option<Cursor> {
        let cursor = self.peek();
        (cursor.seq > 0).then_some(cursor)
    }

    /// The window change not yet written, if any.
    pub(crate) fn window_change(&self) -> Option<WindowChange> {
        self.window(&self.lock())
    }

    /// The unwritten window entries, for a tracker reopening the stream.
    pub(crate) fn unwritten_window(&self) -> Option<Span> {
        self.window(&self.lock()).map(|change| change.span)
    }

    /// Forgets the window entries a store now has: those of `change`. The
    /// emptied change keeps its buffer for the next commits.
    pub(crate) fn confirm_window(&self, change: &WindowChange) {
        if let Some(pending) = &mut self.lock().window {
            pending.confirm(change.span.epoch, change.span.end);
        }
    }

    /// Takes the newest cursor, with the window change not yet written as
    /// of it, and marks the slot clean.
    pub(crate) fn snapshot(&self) -> (Cursor, Option<WindowChange>) {
        let mut state = self.lock();
        state.queued = false;
        (self.cursor(&state), self.window(&state))
    }

    /// Bumps a single-writer counter without a read-modify-write instruction.
    #[inline]
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }
}

/// A tracker's link to the persistence worker and its registry.
pub(crate) struct Publisher {
    pub(crate) tx: async_channel::Sender<Msg>,
    pub(crate) registry: Arc<crate::registry::Shared>,
}

impl Publisher {
    pub(crate) fn publish(
        &self,
        slot: &Arc<Slot>,
        last_event_id: &str,
        seq: u64,
        at: Millis,
        window: Option<&DedupWindow>,
    ) {
        if slot.publish(last_event_id, seq, at, window)
            && self.tx.try_send(Msg::Dirty(slot.clone())).is_err()
        {
            self.registry.note_rejected();
        }
    }
}
