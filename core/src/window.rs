//! The bounded dedup window: a FIFO set of 64-bit fingerprints.
//!
//! Layout: a ring of fingerprints in arrival order (eight bytes each) plus an
//! open-addressing index of `u16` ring positions with linear probing, sized to
//! at most half full. A full window of 1024 ids takes 8 KiB of ring and 4 KiB of
//! index. Lookups, inserts and evictions are O(1) and never allocate once the
//! ring has grown to its capacity; it grows by doubling from a small start, so
//! an idle or quiet stream does not pay for a full window.
//!
//! Eviction removes the oldest entry when the count bound is reached, and, when
//! an age bound is set, every entry older than it. Deleting from the index uses
//! backward-shift deletion, so there are no tombstones and probe lengths stay
//! short however long the stream runs.

use crate::clock::Millis;

/// The largest window a tracker supports: ring positions are stored as `u16`,
/// with `u16::MAX` meaning "empty".
pub const MAX_WINDOW: usize = u16::MAX as usize;

const EMPTY: u16 = u16::MAX;
const FIRST_RING: usize = 8;

#[derive(Clone)]
pub(crate) struct DedupWindow {
    cap: usize,
    max_age: Option<Millis>,
    ring: Box<[u64]>,
    times: Box<[Millis]>,
    head: usize,
    len: usize,
    index: Box<[u16]>,
}

impl DedupWindow {
    /// A window of at most `cap` fingerprints (clamped to 1..=[`MAX_WINDOW`]),
    /// optionally also forgetting entries older than `max_age`.
    pub(crate) fn new(cap: usize, max_age: Option<Millis>) -> Self {
        DedupWindow {
            cap: cap.clamp(1, MAX_WINDOW),
            max_age,
            ring: Box::default(),
            times: Box::default(),
            head: 0,
            len: 0,
            index: Box::default(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn clear(&mut self) {
        self.head = 0;
        self.len = 0;
        self.index.fill(EMPTY);
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

    /// Whether `fp` is in the window.
    #[inline]
    pub(crate) fn contains(&self, fp: u64) -> bool {
        if self.len == 0 {
            return false;
        }
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

    /// Forgets entries older than the age bound, if there is one.
    #[inline]
    pub(crate) fn expire(&mut self, now: Millis) {
        if let Some(max_age) = self.max_age {
            while self.len > 0 && self.times[self.head].saturating_add(max_age) <= now {
                self.evict_oldest();
            }
        }
    }

    /// Adds `fp`, which must not be in the window, evicting the oldest entry
    /// when the count bound is reached.
    #[inline]
    pub(crate) fn insert(&mut self, fp: u64, now: Millis) {
        if self.len == self.cap {
            self.evict_oldest();
        } else if self.len == self.ring.len() {
            self.grow();
        }
        let pos = wrap(self.head + self.len, self.ring.len());
        self.ring[pos] = fp;
        if self.max_age.is_some() {
            self.times[pos] = now;
        }
        self.len += 1;
        self.index_insert(fp, pos as u16);
    }

    fn index_insert(&mut self, fp: u64, pos: u16) {
        let mask = self.mask();
        let mut i = self.home(fp);
        while self.index[i] != EMPTY {
            i = (i + 1) & mask;
        }
        self.index[i] = pos;
    }

    fn evict_oldest(&mut self) {
        let pos = self.head;
        let fp = self.ring[pos];
        let mask = self.mask();
        let mut i = self.home(fp);
        while self.index[i] != pos as u16 {
            i = (i + 1) & mask;
        }
        self.index_remove(i);
        self.head = wrap(self.head + 1, self.ring.len());
        self.len -= 1;
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
    /// rebuilds the index at twice the ring size.
    #[cold]
    fn grow(&mut self) {
        let new_len = (self.ring.len() * 2).clamp(FIRST_RING.min(self.cap), self.cap);
        let mut ring = Vec::with_capacity(new_len);
        let mut times = Vec::new();
        for k in 0..self.len {
            ring.push(self.ring[(self.head + k) % self.ring.len()]);
        }
        ring.resize(new_len, 0);
        if self.max_age.is_some() {
            times.reserve_exact(new_len);
            for k in 0..self.len {
                times.push(self.times[(self.head + k) % self.times.len()]);
            }
            times.resize(new_len, Millis::ZERO);
        }
        self.ring = ring.into_boxed_slice();
        self.times = times.into_boxed_slice();
        self.head = 0;
        self.index = vec![EMPTY; (new_len * 2).next_power_of_two()].into_boxed_slice();
        for pos in 0..self.len {
            self.index_insert(self.ring[pos], pos as u16);
        }
    }

    /// Heap bytes held, for memory accounting in tests.
    #[cfg(test)]
    pub(crate) fn heap_bytes(&self) -> usize {
        self.ring.len() * 8 + self.times.len() * 8 + self.index.len() * 2
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

    /// A window of small fingerprints, so that many share a home slot and the
    /// probing and backward-shift paths get exercised.
    fn fp(n: u64) -> u64 {
        (n % 7) << 32 | n
    }

    #[test]
    fn remembers_up_to_cap_then_forgets_oldest() {
        let mut w = DedupWindow::new(4, None);
        for n in 0..4 {
            assert!(!w.contains(fp(n)));
            w.insert(fp(n), Millis::ZERO);
        }
        assert!((0..4).all(|n| w.contains(fp(n))));
        w.insert(fp(4), Millis::ZERO);
        assert!(!w.contains(fp(0)));
        assert!((1..5).all(|n| w.contains(fp(n))));
        assert_eq!(w.len(), 4);
    }

    #[test]
    fn age_bound_forgets_old_entries() {
        let mut w = DedupWindow::new(100, Some(Millis(1000)));
        w.insert(fp(1), Millis(0));
        w.insert(fp(2), Millis(500));
        w.expire(Millis(999));
        assert!(w.contains(fp(1)));
        w.expire(Millis(1000));
        assert!(!w.contains(fp(1)));
        assert!(w.contains(fp(2)));
        w.expire(Millis(10_000));
        assert_eq!(w.len(), 0);
        w.insert(fp(3), Millis(10_000));
        assert!(w.contains(fp(3)));
    }

    #[test]
    fn full_default_window_fits_in_12_kib() {
        let mut w = DedupWindow::new(1024, None);
        assert_eq!(w.heap_bytes(), 0, "an unused window allocates nothing");
        for n in 0..5000u64 {
            w.insert(n.wrapping_mul(0x9e37_79b9_7f4a_7c15), Millis::ZERO);
        }
        assert_eq!(w.heap_bytes(), 1024 * 8 + 2048 * 2);
    }

    #[test]
    fn clear_forgets_everything() {
        let mut w = DedupWindow::new(8, None);
        (0..6).for_each(|n| w.insert(fp(n), Millis::ZERO));
        w.clear();
        assert!((0..6).all(|n| !w.contains(fp(n))));
        (0..20).for_each(|n| w.insert(fp(n), Millis::ZERO));
        assert!((12..20).all(|n| w.contains(fp(n))));
    }

    proptest! {
        /// The window behaves exactly like a FIFO set of the last `cap`
        /// distinct values, whatever the collisions in the index.
        #[test]
        fn matches_fifo_model(cap in 1usize..40, ops in prop::collection::vec(0u64..60, 0..600)) {
            let mut w = DedupWindow::new(cap, None);
            let mut model: VecDeque<u64> = VecDeque::new();
            for n in ops {
                let f = fp(n);
                prop_assert_eq!(w.contains(f), model.contains(&f));
                if !model.contains(&f) {
                    w.insert(f, Millis::ZERO);
                    model.push_back(f);
                    if model.len() > cap {
                        model.pop_front();
                    }
                }
                prop_assert_eq!(w.len(), model.len());
            }
            for n in 0..60 {
                prop_assert_eq!(w.contains(fp(n)), model.contains(&fp(n)));
            }
        }

        /// With an age bound, exactly the entries younger than it remain.
        #[test]
        fn matches_age_model(
            steps in prop::collection::vec((0u64..40, 0u64..50), 0..300),
            max_age in 1u64..200,
        ) {
            let mut w = DedupWindow::new(16, Some(Millis(max_age)));
            let mut model: VecDeque<(u64, u64)> = VecDeque::new();
            let mut now = 0;
            for (n, dt) in steps {
                now += dt;
                w.expire(Millis(now));
                model.retain(|&(_, t)| t + max_age > now);
                let f = fp(n);
                let known = model.iter().any(|&(m, _)| m == f);
                prop_assert_eq!(w.contains(f), known);
                if !known {
                    w.insert(f, Millis(now));
                    model.push_back((f, now));
                    if model.len() > 16 {
                        model.pop_front();
                    }
                }
            }
        }
    }
}
