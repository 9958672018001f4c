//! The bounded dedup window: a FIFO set of the last distinct event ids, each
//! kept in eight bytes, as its number or as its keyed 64-bit fingerprint.
//!
//! # Why two representations
//!
//! Nearly every real stream's ids are canonical decimal integers that
//! strictly increase (counters, sequence numbers, timestamps in ms). For those
//! the window needs no hash at all: kept as numbers in arrival order, the ring
//! is sorted, so a fresh id is one comparison with the newest and a push, and
//! a replay is a binary search. That skips the SipHash of every id and the
//! index upkeep (the tracker's main per-event cost), and is exact: two numbers
//! never collide. Any other id is fingerprinted ([`crate::fingerprint`]) and
//! found through an index, as a general window must.
//!
//! An id is *numeric* if it is a canonical decimal `u64`: 1 to 20 ASCII
//! digits, no sign, no leading zero unless it is `0`, and at most `u64::MAX`.
//! Being canonical, a number names exactly one id string, so it can be turned
//! back into that string's fingerprint.
//!
//! # Layout
//!
//! One ring in arrival order, eight bytes an entry. Its oldest `hashed`
//! entries are fingerprints; the rest, the *run*, are numbers, each greater
//! than the one before. An open-addressing index of `u16` ring positions with
//! linear probing, sized to at most half full, covers the fingerprints only;
//! it is allocated the first time an id is fingerprinted. A full window of
//! 1024 ids takes 8 KiB of ring, plus 4 KiB of index once an id has needed it.
//! The ring grows by doubling from a small start, so an idle or quiet stream
//! does not pay for a full window; once grown it never allocates again.
//!
//! # Modes
//!
//! - *Sorted* (no fingerprints; the start, and after [`DedupWindow::clear`]):
//!   a numeric id greater than the newest is fresh at once and pushed; a
//!   smaller one is looked up by binary search.
//! - *Hashed* (some fingerprints): an id that cannot extend the run (not
//!   numeric, or numeric, not greater than the newest and not in the window)
//!   first turns the whole run into the fingerprints of its decimal strings and
//!   indexes them, then is fingerprinted itself. That costs O(run), but each
//!   entry is converted at most once, so it is O(1) amortized. Lookups then
//!   probe the index (and the run, for a numeric id), with the collision
//!   semantics of keyed fingerprints. Increasing numeric ids still extend a new
//!   run after the fingerprints without being hashed into the window (only
//!   looked up), so once every fingerprint has aged out the window is sorted
//!   again.
//!
//! Eviction removes the oldest entry when the count bound is reached, and, when
//! an age bound is set, every entry older than it. Deleting from the index uses
//! backward-shift deletion, so there are no tombstones and probe lengths stay
//! short however long the stream runs.

use crate::clock::Millis;
use crate::fingerprint::FingerprintKey;
use crate::saved_window::{Entry, Span};

/// The largest window a tracker supports: ring positions are stored as `u16`,
/// with `u16::MAX` meaning "empty".
pub const MAX_WINDOW: usize = u16::MAX as usize;

const EMPTY: u16 = u16::MAX;
const FIRST_RING: usize = 8;

#[derive(Clone)]
pub(crate) struct DedupWindow {
    cap: usize,
    max_age: Option<Millis>,
    key: FingerprintKey,
    /// Fingerprints (the oldest `hashed` entries), then numbers (the run).
    ring: Box<[u64]>,
    times: Box<[Millis]>,
    head: usize,
    len: usize,
    hashed: usize,
    /// Ring positions of the fingerprints; empty until the first one.
    index: Box<[u16]>,
    /// How many times the window was cleared, and how many entries it ever
    /// added: where its content stands, for persistence (see
    /// `saved_window.rs`).
    epoch: u64,
    pushed: u64,
}

impl DedupWindow {
    /// A window of at most `cap` ids (clamped to 1..=[`MAX_WINDOW`]),
    /// optionally also forgetting entries older than `max_age`, fingerprinting
    /// ids under `key` where it must.
    pub(crate) fn new(cap: usize, max_age: Option<Millis>, key: FingerprintKey) -> Self {
        DedupWindow {
            cap: cap.clamp(1, MAX_WINDOW),
            max_age,
            key,
            ring: Box::default(),
            times: Box::default(),
            head: 0,
            len: 0,
            hashed: 0,
            index: Box::default(),
            epoch: 0,
            pushed: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Forgets every id; the window is sorted again.
    pub(crate) fn clear(&mut self) {
        if self.hashed > 0 {
            self.index.fill(EMPTY);
        }
        self.head = 0;
        self.len = 0;
        self.hashed = 0;
        self.epoch += 1;
    }

    /// Forgets the ids added after `id`, keeping `id` and every id before
    /// it, or forgets every id when `id` is not in the window. A window
    /// that lost ids starts a new epoch, so stores replace what they keep.
    pub(crate) fn keep_through(&mut self, id: &[u8]) {
        let number = numeric(id);
        let fp = self.key.fingerprint(id);
        let found = (0..self.len).rev().find(|&k| {
            let value = self.at(k);
            if k < self.hashed {
                value == fp
            } else {
                Some(value) == number
            }
        });
        let Some(last) = found else {
            self.clear();
            return;
        };
        if last + 1 == self.len {
            return;
        }
        // Drop the newest entries: the run's numbers, then fingerprints.
        while self.len > last + 1 {
            let k = self.len - 1;
            if k < self.hashed {
                self.unindex(wrap(self.head + k, self.ring.len()));
            }
            self.len -= 1;
        }
        self.epoch += 1;
    }

    /// The count bound.
    pub(crate) fn cap(&self) -> usize {
        self.cap
    }

    /// Whether entries carry times (there is an age bound).
    #[inline]
    fn timed(&self) -> bool {
        self.max_age.is_some()
    }

    /// The epoch (clears so far) and push count: the window's position.
    pub(crate) fn marks(&self) -> (u64, u64) {
        (self.epoch, self.pushed)
    }

    /// Adds to `pending` (the change not yet written, which ends where the
    /// window stood at the last export) the entries added since: the newest
    /// entries, or, when the window was cleared since or has already dropped
    /// some of them, its whole content as a reset. `pending` never
    /// holds more than the window's bound: when it would, it becomes the
    /// window itself, a reset. The usual case, one entry after those
    /// `pending` ends with, is an O(1) append that does not allocate once
    /// `pending` has grown.
    #[inline]
    pub(crate) fn export(&self, pending: &mut Option<Box<Span>>) {
        if let Some(p) = pending
            && p.end.wrapping_add(1) == self.pushed
            && p.epoch == self.epoch
            && p.cap == self.cap
            && !self.timed()
        {
            let k = self.len - 1;
            let value = self.at(k);
            let entry = if k < self.hashed {
                Entry::Fingerprint(value)
            } else {
                Entry::Number(value)
            };
            p.push_one(entry, self.cap);
            p.end = self.pushed;
            return;
        }
        self.export_any(pending);
    }

    #[cold]
    fn export_any(&self, pending: &mut Option<Box<Span>>) {
        // Where the window stood at the last export: where `pending` ends
        // (no `pending`: everything, as a reset).
        let since = pending.as_ref().map_or((u64::MAX, 0), |p| (p.epoch, p.end));
        let (epoch, pushed) = since;
        let added = self.pushed - pushed;
        if epoch == self.epoch && added == 0 {
            return;
        }
        let reset = epoch != self.epoch || added > self.len as u64;
        let first = if reset { 0 } else { self.len - added as usize };
        match pending {
            Some(p) if !reset && (p.epoch, p.end) == since => self.push_entries(first, p),
            _ => {
                let mut span = Span::new(reset, self.cap, self.epoch, pushed);
                self.push_entries(first, &mut span);
                match pending {
                    Some(p) => p.apply(&span),
                    None => *pending = Some(Box::new(span)),
                }
            }
        }
    }

    /// Appends the entries from the `first` oldest on to `span`, moving its
    /// end to the window's, and keeps it within the window's bound.
    #[inline]
    fn push_entries(&self, first: usize, span: &mut Span) {
        for k in first..self.len {
            let pos = wrap(self.head + k, self.ring.len());
            let value = self.ring[pos];
            let entry = if k < self.hashed {
                Entry::Fingerprint(value)
            } else {
                Entry::Number(value)
            };
            span.push(entry, self.timed().then(|| self.times[pos]));
        }
        span.end = self.pushed;
        span.cap = self.cap;
        span.trim();
    }

    /// Replaces the content with a saved window's, oldest entry first, and
    /// takes its position. Entries saved without times count as ancient
    /// under an age bound, so they are forgotten at the next `expire`.
    pub(crate) fn restore(&mut self, saved: &Span) {
        self.clear();
        let mut digits = [0; 20];
        for k in 0..saved.len() {
            let at = saved.time(k).unwrap_or(Millis::ZERO);
            // As the window did when the entry came: an id that aged out
            // and came again is in the saved window twice.
            self.expire(at);
            match saved.entry(k) {
                Entry::Number(n) => {
                    let _ = self.insert(decimal(n, &mut digits), at);
                }
                Entry::Fingerprint(fp) => {
                    let _ = self.insert_fingerprint(fp, at);
                }
            }
        }
        self.epoch = saved.epoch;
        self.pushed = saved.end;
    }

    /// Whether `id` is in the window.
    pub(crate) fn contains(&self, id: &[u8]) -> bool {
        if let Some(n) = numeric(id)
            && self.run_contains(n)
        {
            return true;
        }
        self.hashed > 0 && self.index_contains(self.key.fingerprint(id))
    }

    /// Adds `id` unless it is in the window, evicting the oldest entry when
    /// the count bound is reached. Returns whether it was added (fresh).
    #[inline]
    pub(crate) fn insert(&mut self, id: &[u8], now: Millis) -> bool {
        if let Some(n) = numeric(id) {
            if self.hashed == self.len || n > self.at(self.len - 1) {
                // Extends the run: fresh unless a fingerprint matches.
                if self.hashed > 0 && self.index_contains(self.key.fingerprint(id)) {
                    return false;
                }
                let pos = self.make_room();
                self.put(pos, n, now);
                return true;
            }
            if self.run_contains(n) {
                return false;
            }
        }
        self.insert_fingerprint(self.key.fingerprint(id), now)
    }

    /// Adds the fingerprint `fp` unless it is in the window.
    fn insert_fingerprint(&mut self, fp: u64, now: Millis) -> bool {
        if self.hashed > 0 && self.index_contains(fp) {
            return false;
        }
        let pos = self.make_room();
        if self.index.is_empty() {
            self.make_index();
        }
        if self.hashed < self.len {
            self.hash_run();
        }
        self.put(pos, fp, now);
        self.hashed += 1;
        self.index_insert(fp, pos as u16);
        true
    }

    /// Forgets entries older than the age bound, if there is one.
    #[inline]
    pub(crate) fn expire(&mut self, now: Millis) {
        if let Some(max_age) = self.max_age {
            while self.len > 0 && self.times[self.head].saturating_add(max_age) <= now {
                self.evict_oldest();
            }
        }
    }

    /// The `k`th oldest entry.
    #[inline]
    fn at(&self, k: usize) -> u64 {
        self.ring[wrap(self.head + k, self.ring.len())]
    }

    /// Whether the run holds `n`: nothing above its newest, else a binary
    /// search (the run is sorted).
    fn run_contains(&self, n: u64) -> bool {
        let (mut lo, mut hi) = (self.hashed, self.len);
        if lo == hi || n > self.at(hi - 1) {
            return false;
        }
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let m = self.at(mid);
            if m == n {
                return true;
            }
            if m < n {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        false
    }

    /// Evicts or grows so that one more entry fits; returns its ring position.
    #[inline]
    fn make_room(&mut self) -> usize {
        if self.len == self.cap {
            self.evict_oldest();
        } else if self.len == self.ring.len() {
            self.grow();
        }
        wrap(self.head + self.len, self.ring.len())
    }

    /// Appends `value` at `pos`, the position [`Self::make_room`] gave.
    #[inline]
    fn put(&mut self, pos: usize, value: u64, now: Millis) {
        self.ring[pos] = value;
        if self.timed() {
            self.times[pos] = now;
        }
        self.len += 1;
        self.pushed += 1;
    }

    /// Allocates the index, for the first fingerprint.
    #[cold]
    fn make_index(&mut self) {
        self.index = vec![EMPTY; index_len(self.ring.len())].into_boxed_slice();
    }

    /// Turns the run into the fingerprints of its ids and indexes them.
    #[cold]
    fn hash_run(&mut self) {
        let mut digits = [0; 20];
        for k in self.hashed..self.len {
            let pos = wrap(self.head + k, self.ring.len());
            let fp = self.key.fingerprint(decimal(self.ring[pos], &mut digits));
            self.ring[pos] = fp;
            self.index_insert(fp, pos as u16);
        }
        self.hashed = self.len;
    }

    #[inline]
    fn mask(&self) -> usize {
        self.index.len() - 1
    }

    #[inline]
    fn home(&self, fp: u64) -> usize {
        // SipHash output is uniform; the high bits are as good as any.
        (fp >> 32) as usize & self.mask()
    }

    /// Whether a fingerprint equals `fp`. Only with fingerprints present.
    #[inline]
    fn index_contains(&self, fp: u64) -> bool {
        let mask = self.mask();
        let mut i = self.home(fp);
        loop {
            let pos = self.index[i];
            if pos == EMPTY {
                return false;
            }
            if self.ring[pos as usize] == fp {
                return true;
            }
            i = (i + 1) & mask;
        }
    }

    fn index_insert(&mut self, fp: u64, pos: u16) {
        let mask = self.mask();
        let mut i = self.home(fp);
        while self.index[i] != EMPTY {
            i = (i + 1) & mask;
        }
        self.index[i] = pos;
    }

    #[inline]
    fn evict_oldest(&mut self) {
        if self.hashed > 0 {
            self.unindex_oldest();
        }
        self.head = wrap(self.head + 1, self.ring.len());
        self.len -= 1;
    }

    /// Removes the oldest entry, a fingerprint, from the index.
    fn unindex_oldest(&mut self) {
        self.unindex(self.head);
    }

    /// Removes the fingerprint at ring position `pos` from the index.
    fn unindex(&mut self, pos: usize) {
        let mask = self.mask();
        let mut i = self.home(self.ring[pos]);
        while self.index[i] != pos as u16 {
            i = (i + 1) & mask;
        }
        self.index_remove(i);
        self.hashed -= 1;
    }

    /// Backward-shift deletion: pull later entries of the probe run into the
    /// hole unless that would move them before their home slot.
    fn index_remove(&mut self, mut hole: usize) {
        let mask = self.mask();
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let pos = self.index[j];
            if pos == EMPTY {
                break;
            }
            let home = self.home(self.ring[pos as usize]);
            // The entry at j may move to the hole iff its home is not
            // cyclically within (hole, j].
            let stays = if hole <= j {
                hole < home && home <= j
            } else {
                hole < home || home <= j
            };
            if !stays {
                self.index[hole] = pos;
                hole = j;
            }
        }
        self.index[hole] = EMPTY;
    }

    /// Doubles the ring (up to `cap`), laying entries out oldest first, and
    /// rebuilds the index, if there is one, at twice the ring size.
    #[cold]
    fn grow(&mut self) {
        let new_len = (self.ring.len() * 2).clamp(FIRST_RING.min(self.cap), self.cap);
        let mut ring = Vec::with_capacity(new_len);
        let mut times = Vec::new();
        for k in 0..self.len {
            ring.push(self.at(k));
        }
        ring.resize(new_len, 0);
        if self.timed() {
            times.reserve_exact(new_len);
            for k in 0..self.len {
                times.push(self.times[wrap(self.head + k, self.times.len())]);
            }
            times.resize(new_len, Millis::ZERO);
        }
        self.ring = ring.into_boxed_slice();
        self.times = times.into_boxed_slice();
        self.head = 0;
        if !self.index.is_empty() {
            self.index = vec![EMPTY; index_len(new_len)].into_boxed_slice();
            for pos in 0..self.hashed {
                self.index_insert(self.ring[pos], pos as u16);
            }
        }
    }

    /// Whether the window holds no fingerprints (sorted mode), for tests.
    #[cfg(test)]
    pub(crate) fn is_sorted(&self) -> bool {
        self.hashed == 0
    }

    /// Heap bytes held, for memory accounting in tests.
    #[cfg(test)]
    pub(crate) fn heap_bytes(&self) -> usize {
        self.ring.len() * 8 + self.times.len() * 8 + self.index.len() * 2
    }
}

/// Index slots for a ring of `ring_len`: at most half full.
fn index_len(ring_len: usize) -> usize {
    (ring_len * 2).next_power_of_two()
}

/// The number a canonical decimal `u64` id names, if it is one (also the
/// sequence numbers of the replay log's ids).
#[inline]
pub(crate) fn numeric(id: &[u8]) -> Option<u64> {
    let valid_start = match id {
        [b'0'] => true,
        [b'1'..=b'9', ..] => id.len() < 20 || (id.len() == 20 && id <= U64_MAX_DECIMAL),
        _ => false,
    };
    if !valid_start {
        return None;
    }
    // At most `u64::MAX` if every byte is a digit (for 20 bytes, digits
    // compare as their numbers do), so this does not overflow.
    let mut n: u64 = 0;
    for &b in id {
        let digit = b.wrapping_sub(b'0');
        if digit > 9 {
            return None;
        }
        n = n.wrapping_mul(10).wrapping_add(u64::from(digit));
    }
    Some(n)
}

/// `u64::MAX` in decimal: 20 digits.
const U64_MAX_DECIMAL: &[u8] = b"18446744073709551615";

/// The canonical decimal string of `n`, written at the end of `buf`.
pub(crate) fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// `i % n` for `i < 2 * n`, without a division on the hot path.
#[inline]
fn wrap(i: usize, n: usize) -> usize {
    if i >= n { i - n } else { i }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    fn window(cap: usize, max_age: Option<Millis>) -> DedupWindow {
        DedupWindow::new(cap, max_age, FingerprintKey::new(7, 9))
    }

    fn add(w: &mut DedupWindow, id: &str) -> bool {
        w.insert(id.as_bytes(), Millis::ZERO)
    }

    #[test]
    fn numeric_ids_are_canonical_u64_decimals() {
        for (id, n) in [
            ("0", 0),
            ("7", 7),
            ("10", 10),
            ("18446744073709551615", u64::MAX),
        ] {
            assert_eq!(numeric(id.as_bytes()), Some(n), "{id}");
        }
        for id in [
            "",
            "00",
            "007",
            "+1",
            "-1",
            " 1",
            "1 ",
            "1a",
            "a1",
            "1.0",
            "18446744073709551616",
            "99999999999999999999",
            "100000000000000000000",
        ] {
            assert_eq!(numeric(id.as_bytes()), None, "{id:?}");
        }
    }

    #[test]
    fn decimal_is_the_canonical_string() {
        let mut buf = [0; 20];
        for n in [
            0,
            1,
            9,
            10,
            99,
            100,
            12345,
            u64::MAX / 10,
            u64::MAX - 1,
            u64::MAX,
        ] {
            let s = decimal(n, &mut buf);
            assert_eq!(s, n.to_string().as_bytes());
            assert_eq!(numeric(s), Some(n));
        }
    }

    #[test]
    fn remembers_up_to_cap_then_forgets_oldest() {
        for ids in [["1", "2", "3", "4", "5"], ["a", "b", "c", "d", "e"]] {
            let mut w = window(4, None);
            for id in &ids[..4] {
                assert!(!w.contains(id.as_bytes()));
                assert!(add(&mut w, id));
            }
            assert!(ids[..4].iter().all(|id| w.contains(id.as_bytes())));
            assert!(!add(&mut w, ids[2]), "a replay is not added");
            assert!(add(&mut w, ids[4]));
            assert!(!w.contains(ids[0].as_bytes()));
            assert!(ids[1..].iter().all(|id| w.contains(id.as_bytes())));
            assert_eq!(w.len(), 4);
        }
    }

    #[test]
    fn increasing_numbers_stay_sorted_until_an_id_breaks_the_run() {
        let mut w = window(8, None);
        for n in (100..120).step_by(3) {
            assert!(add(&mut w, &n.to_string()));
        }
        assert!(!add(&mut w, "103"), "a replay of a number in the window");
        assert!(add(&mut w, "104"), "a smaller number in no entry");
        assert!(!w.is_sorted());
        assert!(!add(&mut w, "103"));
        assert!(!add(&mut w, "118"));
        assert!(!add(&mut w, "104"));
        assert!(add(&mut w, "119"), "greater than the newest");
        assert!(!w.contains(b"100"), "evicted by the count bound");

        // Seven fingerprints (103..=118 and 104) and a run (119) are left;
        // seven more increasing ids push the fingerprints out.
        for n in 200..206 {
            assert!(add(&mut w, &n.to_string()));
            assert!(!w.is_sorted());
        }
        assert!(add(&mut w, "206"));
        assert!(w.is_sorted());
        assert!((200..207).all(|n| w.contains(n.to_string().as_bytes())));
        assert!(w.contains(b"119") && !w.contains(b"104"));

        assert!(add(&mut w, "x"), "a string");
        assert!(!w.is_sorted());
        assert!((200..207).all(|n| w.contains(n.to_string().as_bytes())));
        assert!(!w.contains(b"119"));
        assert!(w.contains(b"x") && !add(&mut w, "x"));
        w.clear();
        assert!(w.is_sorted());
        assert_eq!(w.len(), 0);
        assert!(!w.contains(b"x") && !w.contains(b"207"));
    }

    #[test]
    fn age_bound_forgets_old_entries() {
        for (a, b, c) in [("1", "2", "3"), ("1", "b", "3"), ("a", "b", "c")] {
            let mut w = window(100, Some(Millis(1000)));
            assert!(w.insert(a.as_bytes(), Millis(0)));
            assert!(w.insert(b.as_bytes(), Millis(500)));
            w.expire(Millis(999));
            assert!(w.contains(a.as_bytes()));
            w.expire(Millis(1000));
            assert!(!w.contains(a.as_bytes()));
            assert!(w.contains(b.as_bytes()));
            w.expire(Millis(10_000));
            assert_eq!(w.len(), 0);
            assert!(w.insert(c.as_bytes(), Millis(10_000)));
            assert!(w.contains(c.as_bytes()));
        }
    }

    #[test]
    fn full_default_window_fits_in_12_kib() {
        let mut w = window(1024, None);
        assert_eq!(w.heap_bytes(), 0, "an unused window allocates nothing");
        for n in 0..5000u64 {
            add(&mut w, &(n * 7).to_string());
        }
        assert!(w.is_sorted());
        assert_eq!(w.heap_bytes(), 1024 * 8, "sorted: the ring alone");
        for n in 0..5000u64 {
            add(&mut w, &format!("id-{n}"));
        }
        assert!(!w.is_sorted());
        assert_eq!(w.heap_bytes(), 1024 * 8 + 2048 * 2);
        for n in 5000..10_000u64 {
            add(&mut w, &n.to_string());
        }
        assert!(w.is_sorted());
        assert_eq!(w.heap_bytes(), 1024 * 8 + 2048 * 2, "the index is kept");
    }

    #[test]
    fn growing_keeps_fingerprints_and_run() {
        let mut w = window(40, None);
        let ids: Vec<String> = (0..40)
            .map(|n| {
                if n % 5 == 0 {
                    format!("s{n}")
                } else {
                    (n * 10).to_string()
                }
            })
            .collect();
        for (k, id) in ids.iter().enumerate() {
            assert!(add(&mut w, id));
            assert!(ids[..=k].iter().all(|id| w.contains(id.as_bytes())));
        }
        assert_eq!(w.len(), 40);
    }

    /// An id of a small universe: numbers (a few non-canonical spellings
    /// among them) and strings.
    fn id(n: u16) -> String {
        match n % 8 {
            0 => format!("e{}", n / 8 % 16),
            1 => format!("0{}", n / 8 % 16),
            _ => (n / 2).to_string(),
        }
    }

    proptest! {
        /// The window behaves exactly like a FIFO set of the last `cap`
        /// distinct ids, whatever the mix of numbers and strings.
        #[test]
        fn matches_fifo_model(
            cap in 1usize..40,
            ops in prop::collection::vec(
                prop_oneof![3 => Just(None), 1 => (0u16..400).prop_map(Some)],
                0..600,
            ),
        ) {
            let mut w = window(cap, None);
            let mut model: VecDeque<String> = VecDeque::new();
            let mut next = 0u64;
            for op in ops {
                // Mostly increasing numbers, else any id of the universe.
                let id = match op {
                    None => {
                        next += 1 + next % 3;
                        next.to_string()
                    }
                    Some(n) => id(n),
                };
                let known = model.contains(&id);
                prop_assert_eq!(w.contains(id.as_bytes()), known);
                prop_assert_eq!(add(&mut w, &id), !known);
                if !known {
                    model.push_back(id);
                    if model.len() > cap {
                        model.pop_front();
                    }
                }
                prop_assert_eq!(w.len(), model.len());
            }
            for n in 0..400 {
                let id = id(n);
                prop_assert_eq!(w.contains(id.as_bytes()), model.contains(&id));
            }
            for id in &model {
                prop_assert!(w.contains(id.as_bytes()));
            }
        }

        /// With an age bound, exactly the entries younger than it remain.
        #[test]
        fn matches_age_model(
            steps in prop::collection::vec((0u16..80, 0u64..50), 0..300),
            max_age in 1u64..200,
        ) {
            let mut w = window(16, Some(Millis(max_age)));
            let mut model: VecDeque<(String, u64)> = VecDeque::new();
            let mut now = 0;
            for (n, dt) in steps {
                now += dt;
                w.expire(Millis(now));
                while model.front().is_some_and(|&(_, t)| t + max_age <= now) {
                    model.pop_front();
                }
                let id = id(n);
                let known = model.iter().any(|(m, _)| *m == id);
                prop_assert_eq!(w.insert(id.as_bytes(), Millis(now)), !known);
                if !known {
                    model.push_back((id, now));
                    if model.len() > 16 {
                        model.pop_front();
                    }
                }
                prop_assert_eq!(w.len(), model.len());
            }
        }
    }
}
