//! Capped exponential backoff with jitter, and the small seeded generator
//! that draws the jitter.
//!
//! The generator is seeded explicitly so that tests and simulations replay
//! exactly; the default configurations seed it from [`random_seed`].

use crate::clock::Millis;
use crate::entropy::random_u64s;

/// A small, fast, seedable pseudo-random generator (SplitMix64). Not for
/// secrets: it only spreads retries apart.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator with the given seed.
    pub const fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in `0..=max`.
    pub fn up_to(&mut self, max: u64) -> u64 {
        match max.checked_add(1) {
            Some(n) => self.next_u64() % n,
            None => self.next_u64(),
        }
    }

    /// `true` with probability `per_mille / 1000`.
    pub fn chance(&mut self, per_mille: u32) -> bool {
        self.next_u64() % 1000 < u64::from(per_mille)
    }
}

/// A fresh random seed from the platform's entropy source (the OS, or
/// `crypto.getRandomValues` in JavaScript environments); every call draws
/// anew.
///
/// Never fails: jitter is not a secret, so on a platform with no entropy
/// source at all this returns a fixed seed. The jitter then still spreads one
/// process's retries, but no longer spreads several processes apart.
pub fn random_seed() -> u64 {
    match random_u64s() {
        Ok([seed]) => seed,
        Err(_) => FALLBACK_SEED,
    }
}

/// The seed where the platform has no entropy source.
const FALLBACK_SEED: u64 = 0x7469_6465_6d61_726b;

/// Capped exponential backoff: `initial * 2^(attempt-1)`, at most `max`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// Delay before the first retry.
    pub initial: Millis,
    /// Largest delay.
    pub max: Millis,
}

impl Backoff {
    /// The un-jittered delay before retry number `attempt` (1-based).
    pub fn base_delay(&self, attempt: u32) -> Millis {
        let shift = attempt.saturating_sub(1).min(63);
        let factor = 1u64 << shift;
        Millis(self.initial.0.saturating_mul(factor)).min(self.max)
    }

    /// The delay before retry number `attempt` with "equal jitter": at least
    /// half the base delay, at most all of it. Never zero unless `initial` is.
    pub fn delay(&self, attempt: u32, rng: &mut Rng) -> Millis {
        let base = self.base_delay(attempt).0;
        let half = base / 2;
        Millis(base - half + rng.up_to(half))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap() {
        let b = Backoff {
            initial: Millis(100),
            max: Millis(1000),
        };
        let delays: Vec<u64> = (1..7).map(|a| b.base_delay(a).0).collect();
        assert_eq!(delays, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.base_delay(500), Millis(1000));
    }

    #[test]
    fn jitter_stays_within_half_and_full() {
        let b = Backoff {
            initial: Millis(100),
            max: Millis(10_000),
        };
        let mut rng = Rng::new(1);
        let mut seen = std::collections::HashSet::new();
        for attempt in 1..10 {
            let base = b.base_delay(attempt).0;
            for _ in 0..100 {
                let d = b.delay(attempt, &mut rng).0;
                assert!(
                    d >= base / 2 && d <= base,
                    "{d} outside [{}, {base}]",
                    base / 2
                );
                seen.insert(d);
            }
        }
        assert!(seen.len() > 100, "jitter spreads delays");
    }

    /// Fails if seeds came from a constant source (std's hash seed on wasm32,
    /// or the fallback) or from one draw per process.
    #[test]
    fn random_seeds_are_fresh_draws() {
        let seeds: std::collections::HashSet<u64> = (0..4).map(|_| random_seed()).collect();
        assert_eq!(seeds.len(), 4, "{seeds:?}");
        assert!(!seeds.contains(&FALLBACK_SEED));
    }

    #[test]
    fn rng_is_deterministic_per_seed() {
        let a: Vec<u64> = (0..5)
            .scan(Rng::new(3), |r, _| Some(r.next_u64()))
            .collect();
        let b: Vec<u64> = (0..5)
            .scan(Rng::new(3), |r, _| Some(r.next_u64()))
            .collect();
        assert_eq!(a, b);
        assert_ne!(Rng::new(3).next_u64(), Rng::new(4).next_u64());
        assert_eq!(Rng::new(9).up_to(0), 0);
    }
}
