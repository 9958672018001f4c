//! A dedup window as stores keep it: what a stream's window gained since the
//! last write ([`WindowChange`]), and the stored window those changes fold
//! into ([`SavedWindow`]).
//!
//! # Why changes, not whole windows
//!
//! A full window is 1024 entries of eight bytes. Rewriting every dirty
//! stream's window on every flush would multiply what a flush writes, so a
//! tracker hands its worker only the entries it added since the last
//! successful write: usually one or a few per flush. A store appends them to
//! what it has, or, where whole values are cheap to write, folds them in and
//! writes the result.
//!
//! # Positions
//!
//! Every entry a window ever adds gets the next *push index*; a change covers
//! the entries with push indexes `start..end` of one *epoch*. The epoch grows
//! whenever the window is cleared (an empty `id` reset the stream, or a
//! client restarted at a position of its own), and a change that starts a new
//! epoch, or that is the whole content, is a *reset*: it replaces what was
//! stored. So applying a change is idempotent and order-tolerant: a change
//! already applied (an older epoch, or no entry past the stored end) changes
//! nothing, and an overlap is skipped. That lets the worker retry, and a page
//! being unloaded write the same entries again beside the worker, without
//! ever doubling an entry.
//!
//! What a saved window holds is always a subset of the ids delivered to the
//! application: trackers hand over entries only at `commit`. So a stored
//! window can make the next process drop a replay, never a fresh event.
//!
//! # Encoding
//!
//! One record per change; a stored window is one reset record, and a byte
//! string of records one after another folds like the changes would (a store
//! may append records and compact them from time to time). Integers are
//! LEB128 varints; signed ones are zigzag-encoded first.
//!
//! ```text
//! record  = flags:u8 cap:varint epoch:varint seq:varint start:varint
//!           count:varint runs times?
//! flags   = bit 0: reset; bit 1: entries carry times; others zero
//! runs    = run*, covering `count` entries in order
//! run     = (len << 1 | kind):varint, then `len` entries:
//!           kind 1: fingerprints, eight bytes little-endian each;
//!           kind 0: numbers, each the zigzag delta from the previous number
//!           of the record (the first from 0)
//! times   = count zigzag deltas of milliseconds, the first from 0
//! ```
//!
//! `seq` is the sequence number of the cursor committed with the record's
//! newest entry. A store keeps it with the window; a stored cursor with a
//! higher `seq` was written by a writer that kept no window (an older
//! version, a store opened without windows), so the window is stale, and
//! the registry starts the stream with an empty one instead.
//!
//! Consecutive ids cost one byte each; a fingerprint costs eight.

use crate::clock::Millis;
use crate::cursor::StreamKey;
use crate::window::MAX_WINDOW;
use core::fmt;
use std::collections::VecDeque;

/// One remembered id: a canonical decimal number, or a keyed fingerprint.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum Entry {
    /// An id that is a canonical decimal `u64`, kept as its number.
    Number(u64),
    /// Any other id, kept as its keyed 64-bit fingerprint.
    Fingerprint(u64),
}

/// Entries with push indexes `end - len..end` of one epoch, oldest first,
/// in rings, so that dropping the oldest is O(1): sixteen bytes an entry
/// (twenty-four with times).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Span {
    /// Whether this is the whole content as of `end` (replaces what was
    /// stored) rather than entries to append.
    pub(crate) reset: bool,
    /// The window's count bound, for trimming.
    pub(crate) cap: usize,
    pub(crate) epoch: u64,
    pub(crate) end: u64,
    /// The `seq` of the cursor committed with the newest entries: a stored
    /// cursor past it was written by someone who kept no window.
    pub(crate) seq: u64,
    entries: VecDeque<Entry>,
    /// Parallel to `entries`, or empty when the entries carry no times.
    times: VecDeque<Millis>,
}

impl Span {
    /// No entries, ending at `end` of `epoch`.
    pub(crate) fn new(reset: bool, cap: usize, epoch: u64, end: u64) -> Span {
        Span {
            reset,
            cap,
            epoch,
            end,
            ..Span::default()
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn start(&self) -> u64 {
        self.end - self.len() as u64
    }

    /// The `i`th oldest entry.
    pub(crate) fn entry(&self, i: usize) -> Entry {
        self.entries[i]
    }

    /// The time of the `i`th oldest entry, if the entries carry times.
    pub(crate) fn time(&self, i: usize) -> Option<Millis> {
        self.times.get(i).copied()
    }

    /// Every entry, oldest first.
    #[cfg(test)]
    pub(crate) fn entries(&self) -> Vec<Entry> {
        self.entries.iter().copied().collect()
    }

    /// Every time, oldest first (empty if the entries carry none).
    #[cfg(test)]
    pub(crate) fn times(&self) -> Vec<Millis> {
        self.times.iter().copied().collect()
    }

    /// Appends an entry, without moving `end`. The entries carry times only
    /// while every one has one: entries from before get none (an age bound
    /// forgets them at once, which never drops a fresh event), and an entry
    /// without a time drops them all.
    #[inline]
    pub(crate) fn push(&mut self, entry: Entry, at: Option<Millis>) {
        match at {
            Some(at) => {
                if self.times.len() < self.entries.len() {
                    self.times.resize(self.entries.len(), Millis::ZERO);
                }
                self.times.push_back(at);
            }
            None if !self.times.is_empty() => self.times.clear(),
            None => {}
        }
        self.entries.push_back(entry);
    }

    /// Appends an entry to a span without times, keeping the newest `cap`.
    #[inline]
    pub(crate) fn push_one(&mut self, entry: Entry, cap: usize) {
        debug_assert!(
            self.times.is_empty(),
            "a span of a window without an age bound"
        );
        self.entries.push_back(entry);
        if self.entries.len() > cap {
            self.entries.pop_front();
            self.reset = true;
        }
    }

    #[inline]
    fn pop_front(&mut self) {
        self.entries.pop_front();
        if !self.times.is_empty() {
            self.times.pop_front();
        }
    }

    /// Folds `newer` in; see the [module docs](self).
    pub(crate) fn apply(&mut self, newer: &Span) {
        let stale = newer.epoch < self.epoch || newer.epoch == self.epoch && newer.end <= self.end;
        if stale {
            return;
        }
        if newer.reset || newer.epoch > self.epoch {
            // A change of an epoch whose reset never arrived (it went to
            // another store) cannot be placed after what is here; its own
            // entries are all that is known of that epoch.
            let (keep_reset, seq) = (self.reset, self.seq);
            *self = newer.clone();
            self.reset = keep_reset || newer.reset;
            self.seq = seq.max(newer.seq);
            return;
        }
        let skip = (self.end.saturating_sub(newer.start()) as usize).min(newer.len());
        for i in skip..newer.len() {
            self.push(newer.entry(i), newer.time(i));
        }
        self.end = newer.end;
        self.seq = self.seq.max(newer.seq);
        self.cap = newer.cap;
        self.trim();
    }

    /// Keeps the newest `cap` entries. A change that had to drop entries
    /// holds every entry the window has: it becomes a reset.
    #[inline]
    pub(crate) fn trim(&mut self) {
        let cap = self.cap.clamp(1, MAX_WINDOW);
        while self.len() > cap {
            self.pop_front();
            self.reset = true;
        }
    }

    /// Drops the entries up to `end` of `epoch`, which a store now has.
    pub(crate) fn confirm(&mut self, epoch: u64, end: u64) {
        if epoch != self.epoch || end <= self.start() && end < self.end {
            return;
        }
        // The store has the window as of `end`: what is left are entries
        // to add after it.
        let written = ((end - self.start()) as usize).min(self.len());
        for _ in 0..written {
            self.pop_front();
        }
        self.reset = false;
    }

    fn encode(&self, out: &mut Vec<u8>) {
        let timed = !self.times.is_empty();
        out.push(u8::from(self.reset) | u8::from(timed) << 1);
        put_varint(out, self.cap as u64);
        put_varint(out, self.epoch);
        put_varint(out, self.seq);
        put_varint(out, self.start());
        put_varint(out, self.len() as u64);
        let mut previous = 0u64;
        let mut i = 0;
        let is_fingerprint = |e: &Entry| matches!(e, Entry::Fingerprint(_));
        while i < self.len() {
            let fingerprints = is_fingerprint(&self.entries[i]);
            let run = self
                .entries
                .range(i..)
                .take_while(|e| is_fingerprint(e) == fingerprints)
                .count();
            put_varint(out, (run as u64) << 1 | u64::from(fingerprints));
            for entry in self.entries.range(i..i + run) {
                match *entry {
                    Entry::Fingerprint(fp) => out.extend_from_slice(&fp.to_le_bytes()),
                    Entry::Number(n) => {
                        put_varint(out, zigzag(n.wrapping_sub(previous)));
                        previous = n;
                    }
                }
            }
            i += run;
        }
        let mut previous = 0u64;
        for at in &self.times {
            put_varint(out, zigzag(at.0.wrapping_sub(previous)));
            previous = at.0;
        }
    }

    fn decode(input: &mut &[u8]) -> Result<Span, String> {
        let flags = take_byte(input)?;
        if flags & !0b11 != 0 {
            return Err(format!("unknown window record flags {flags:#04x}"));
        }
        let cap = take_varint(input)?;
        if cap == 0 || cap > MAX_WINDOW as u64 {
            return Err(format!("window bound {cap} is out of range"));
        }
        let epoch = take_varint(input)?;
        let seq = take_varint(input)?;
        let start = take_varint(input)?;
        let count = take_varint(input)?;
        if count > MAX_WINDOW as u64 {
            return Err(format!(
                "{count} window entries are more than a window holds"
            ));
        }
        let end = start
            .checked_add(count)
            .ok_or("window positions overflow")?;
        let count = count as usize;
        let mut span = Span::new(flags & 1 != 0, cap as usize, epoch, end);
        span.seq = seq;
        span.entries.reserve_exact(count);
        let mut previous = 0u64;
        while span.len() < count {
            let run = take_varint(input)?;
            let len = (run >> 1) as usize;
            if len == 0 || len > count - span.len() {
                return Err("a window run does not fit its record".into());
            }
            for _ in 0..len {
                if run & 1 == 1 {
                    let (bytes, rest) = input
                        .split_first_chunk::<8>()
                        .ok_or("window record ends inside a fingerprint")?;
                    *input = rest;
                    span.push(Entry::Fingerprint(u64::from_le_bytes(*bytes)), None);
                } else {
                    previous = previous.wrapping_add(unzigzag(take_varint(input)?));
                    span.push(Entry::Number(previous), None);
                }
            }
        }
        if flags & 0b10 != 0 {
            span.times.reserve_exact(count);
            let mut previous = 0u64;
            for _ in 0..count {
                previous = previous.wrapping_add(unzigzag(take_varint(input)?));
                span.times.push_back(Millis(previous));
            }
        }
        Ok(span)
    }
}

/// What one stream's dedup window gained since its last successful write,
/// or its whole content after it was cleared; the worker hands these to
/// [`Store::save_with_windows`](crate::Store::save_with_windows) with the
/// cursors. See the [module docs](self).
#[derive(Clone, PartialEq, Eq)]
pub struct WindowChange {
    pub(crate) key: StreamKey,
    pub(crate) span: Span,
}

impl WindowChange {
    /// The stream whose window changed.
    pub fn key(&self) -> &StreamKey {
        &self.key
    }

    /// How many entries the change carries.
    pub fn len(&self) -> usize {
        self.span.len()
    }

    /// Whether the change carries no entries (a reset to an empty window).
    pub fn is_empty(&self) -> bool {
        self.span.len() == 0
    }

    /// Whether the change replaces the stored window instead of adding to
    /// it.
    pub fn is_reset(&self) -> bool {
        self.span.reset
    }

    /// Appends the change as one record (see the [module docs](self)); the
    /// key is not part of it.
    pub fn encode(&self, out: &mut Vec<u8>) {
        self.span.encode(out);
    }
}

impl fmt::Debug for WindowChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WindowChange")
            .field("key", &self.key)
            .field("reset", &self.span.reset)
            .field("epoch", &self.span.epoch)
            .field("positions", &(self.span.start()..self.span.end))
            .finish_non_exhaustive()
    }
}

/// A stream's dedup window as a store keeps it: the fold of every
/// [`WindowChange`] written for the stream. A tracker opened from the store
/// starts with it. See the [module docs](self).
#[derive(Clone, PartialEq, Eq)]
pub struct SavedWindow {
    pub(crate) span: Span,
}

impl Default for SavedWindow {
    fn default() -> Self {
        SavedWindow::new()
    }
}

impl SavedWindow {
    /// An empty window.
    pub fn new() -> Self {
        SavedWindow {
            span: Span {
                reset: true,
                cap: MAX_WINDOW,
                ..Span::default()
            },
        }
    }

    /// How many ids it remembers.
    pub fn len(&self) -> usize {
        self.span.len()
    }

    /// Whether it remembers no id.
    pub fn is_empty(&self) -> bool {
        self.span.len() == 0
    }

    /// Folds `change` in: appends its new entries, or replaces everything
    /// for a reset; an older or repeated change changes nothing.
    pub fn apply(&mut self, change: &WindowChange) {
        self.span.apply(&change.span);
    }

    /// Appends the window as one reset record (see the [module docs](self)).
    pub fn encode(&self, out: &mut Vec<u8>) {
        self.span.encode(out);
    }

    /// The window as one record.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    /// Reads one record from the front of `input` (advancing it past the
    /// record) and folds it in.
    pub fn apply_encoded(&mut self, input: &mut &[u8]) -> Result<(), String> {
        let span = Span::decode(input)?;
        self.span.apply(&span);
        Ok(())
    }

    /// The fold of every record in `bytes`: one window, or changes appended
    /// one after another. An empty string is an empty window.
    pub fn decode(mut bytes: &[u8]) -> Result<Self, String> {
        let mut window = SavedWindow::new();
        while !bytes.is_empty() {
            window.apply_encoded(&mut bytes)?;
        }
        Ok(window)
    }
}

impl fmt::Debug for SavedWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SavedWindow")
            .field("len", &self.len())
            .field("epoch", &self.span.epoch)
            .field("end", &self.span.end)
            .finish_non_exhaustive()
    }
}

fn zigzag(n: u64) -> u64 {
    let n = n as i64;
    ((n << 1) ^ (n >> 63)) as u64
}

fn unzigzag(n: u64) -> u64 {
    (n >> 1) ^ (n & 1).wrapping_neg()
}

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push(n as u8 | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn take_byte(input: &mut &[u8]) -> Result<u8, String> {
    let (&byte, rest) = input.split_first().ok_or("window record is cut short")?;
    *input = rest;
    Ok(byte)
}

fn take_varint(input: &mut &[u8]) -> Result<u64, String> {
    let mut n = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = take_byte(input)?;
        let bits = u64::from(byte & 0x7f);
        if shift == 63 && bits > 1 {
            return Err("window record has a varint over 64 bits".into());
        }
        n |= bits << shift;
        if byte & 0x80 == 0 {
            return Ok(n);
        }
    }
    Err("window record has a varint over 64 bits".into())
}

#[cfg(test)]
mod tests;
