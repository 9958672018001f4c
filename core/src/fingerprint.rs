//! Fixed-size keyed fingerprints of event ids.
//!
//! The dedup window stores 64-bit fingerprints instead of id strings: eight
//! bytes per remembered event whatever the id length, and no allocation.
//! (Canonical decimal ids that increase, the common case, it keeps as their
//! numbers instead, which is exact and skips this hash; see `window.rs`. It
//! fingerprints them, from their decimal strings, once any other id arrives.) The
//! fingerprint is SipHash-1-3 under a 128-bit secret key, so a server (or
//! anyone who can inject events) cannot craft two ids that collide and make a
//! fresh event look like a duplicate. An accidental collision inside a window
//! of 1024 ids has probability about 2^-54 per event.
//!
//! The key must be secret and random per process. [`FingerprintKey::random`]
//! (and so `TrackerConfig::default()`) draws it from the platform's entropy
//! source through `getrandom`: the OS on native targets,
//! `crypto.getRandomValues` on `wasm32-unknown-unknown`, with nothing for
//! hosts or users to configure.

use crate::entropy::{EntropyError, random_u64s};

/// A 128-bit secret key for event-id fingerprints.
#[derive(Copy, Clone, PartialEq, Eq)]
pub struct FingerprintKey {
    k0: u64,
    k1: u64,
}

impl core::fmt::Debug for FingerprintKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("FingerprintKey(..)")
    }
}

impl FingerprintKey {
    /// A key from explicit bits (for hosts with their own randomness, and for
    /// deterministic tests).
    pub const fn new(k0: u64, k1: u64) -> Self {
        FingerprintKey { k0, k1 }
    }

    /// A random key from the platform's entropy source (the OS, or
    /// `crypto.getRandomValues` in JavaScript environments).
    ///
    /// # Panics
    ///
    /// If the platform has no entropy source at all (a JavaScript
    /// environment without `globalThis.crypto`): a fixed or guessable key
    /// would let a server craft ids that collide. Hosts that must report
    /// this instead use [`FingerprintKey::try_random`].
    pub fn random() -> Self {
        Self::try_random().unwrap_or_else(|e| {
            panic!("tidemark: cannot make a fingerprint key ({e}); pass one to FingerprintKey::new")
        })
    }

    /// A random key from the platform's entropy source, or why there is
    /// none.
    pub fn try_random() -> Result<Self, EntropyError> {
        let [k0, k1] = random_u64s()?;
        Ok(FingerprintKey { k0, k1 })
    }

    /// The key as 16 bytes, for a store that keeps it (see
    /// [`Store::window_key`](crate::Store::window_key)); the inverse of
    /// [`FingerprintKey::from_bytes`].
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut bytes = [0; 16];
        bytes[..8].copy_from_slice(&self.k0.to_le_bytes());
        bytes[8..].copy_from_slice(&self.k1.to_le_bytes());
        bytes
    }

    /// The key of 16 bytes that [`FingerprintKey::to_bytes`] gave.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        let (k0, k1) = bytes.split_at(8);
        FingerprintKey {
            k0: u64::from_le_bytes(k0.try_into().expect("8 bytes")),
            k1: u64::from_le_bytes(k1.try_into().expect("8 bytes")),
        }
    }

    /// The fingerprint of `id` under this key.
    #[inline]
    pub fn fingerprint(&self, id: &[u8]) -> u64 {
        siphash13(self.k0, self.k1, id)
    }
}

#[inline(always)]
fn sipround(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13);
    v[1] ^= v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16);
    v[3] ^= v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21);
    v[3] ^= v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17);
    v[1] ^= v[2];
    v[2] = v[2].rotate_left(32);
}

/// SipHash-1-3 (one compression round, three finalization rounds), the
/// variant the standard library uses for `HashMap`.
fn siphash13(k0: u64, k1: u64, data: &[u8]) -> u64 {
    let mut v = [
        k0 ^ 0x736f_6d65_7073_6575,
        k1 ^ 0x646f_7261_6e64_6f6d,
        k0 ^ 0x6c79_6765_6e65_7261,
        k1 ^ 0x7465_6462_7974_6573,
    ];
    let mut chunks = data.chunks_exact(8);
    for chunk in &mut chunks {
        let m = u64::from_le_bytes(chunk.try_into().expect("chunks_exact(8)"));
        v[3] ^= m;
        sipround(&mut v);
        v[0] ^= m;
    }
    let rest = chunks.remainder();
    let mut last = (data.len() as u64) << 56;
    for (i, byte) in rest.iter().enumerate() {
        last |= u64::from(*byte) << (8 * i);
    }
    v[3] ^= last;
    sipround(&mut v);
    v[0] ^= last;
    v[2] ^= 0xff;
    sipround(&mut v);
    sipround(&mut v);
    sipround(&mut v);
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::Hasher;

    /// The standard library's `DefaultHasher::new()` is SipHash-1-3 with a zero
    /// key; `write` feeds bytes without a length prefix, so the outputs match.
    #[test]
    fn matches_std_siphash13_with_zero_key() {
        for len in 0..40 {
            let data: Vec<u8> = (0..len as u8).map(|b| b.wrapping_mul(37)).collect();
            let mut std_hasher = std::hash::DefaultHasher::new();
            std_hasher.write(&data);
            assert_eq!(siphash13(0, 0, &data), std_hasher.finish(), "len {len}");
        }
    }

    #[test]
    fn bytes_round_trip() {
        let key = FingerprintKey::new(0x0102_0304_0506_0708, u64::MAX - 5);
        assert_eq!(FingerprintKey::from_bytes(key.to_bytes()), key);
        assert_eq!(key.to_bytes()[0], 0x08);
        assert_ne!(key.to_bytes(), FingerprintKey::new(1, 2).to_bytes());
    }

    #[test]
    fn key_changes_fingerprint() {
        let a = FingerprintKey::new(1, 2);
        let b = FingerprintKey::new(1, 3);
        assert_ne!(a.fingerprint(b"42"), b.fingerprint(b"42"));
        assert_eq!(a.fingerprint(b"42"), a.fingerprint(b"42"));
        assert_ne!(a.fingerprint(b"42"), a.fingerprint(b"43"));
    }

    /// Fails if keys came from a constant source or were drawn once per
    /// process: two draws of 128 random bits are equal with probability
    /// 2^-128. (That they come from the platform's source, not from a
    /// sequence fixed per build as std's hash seeds are on wasm32, is
    /// checked in a browser: host-wasm/tests/entropy.rs.)
    #[test]
    fn random_keys_are_fresh_draws() {
        let fixed = FingerprintKey::new(0, 0);
        let a = FingerprintKey::random();
        let b = FingerprintKey::try_random().unwrap();
        assert_ne!(a, b);
        assert_ne!(a, fixed);
        assert_ne!(b, fixed);
        assert_ne!(a.fingerprint(b"42"), b.fingerprint(b"42"));
        let default = crate::TrackerConfig::default().fingerprint_key;
        assert_ne!(default, crate::TrackerConfig::default().fingerprint_key);
        assert_ne!(default, a);
    }
}
