//! Fixed-size keyed fingerprints of event ids.
//!
//! The dedup window stores 64-bit fingerprints instead of id strings: eight
//! bytes per remembered event whatever the id length, and no allocation. The
//! fingerprint is SipHash-1-3 under a 128-bit secret key, so a server (or
//! anyone who can inject events) cannot craft two ids that collide and make a
//! fresh event look like a duplicate. An accidental collision inside a window
//! of 1024 ids has probability about 2^-54 per event.
//!
//! The key must be random per process. [`FingerprintKey::random`] uses the
//! standard library's per-process hash seed, which is random on native
//! targets; browser hosts must pass a key from `crypto.getRandomValues`
//! instead, because `wasm32-unknown-unknown` has no OS randomness.

use std::hash::{BuildHasher, Hasher};

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

    /// A key from the standard library's per-process random hash seed.
    ///
    /// Random on native targets. On `wasm32-unknown-unknown` the standard
    /// library has no entropy source, so browser hosts should use
    /// [`FingerprintKey::new`] with bytes from `crypto.getRandomValues`.
    pub fn random() -> Self {
        let (k0, k1) = random_pair();
        FingerprintKey { k0, k1 }
    }

    /// The fingerprint of `id` under this key.
    #[inline]
    pub fn fingerprint(&self, id: &[u8]) -> u64 {
        siphash13(self.k0, self.k1, id)
    }
}

/// Two 64-bit values from the standard library's random hash seed.
pub(crate) fn random_pair() -> (u64, u64) {
    let state = std::collections::hash_map::RandomState::new();
    let mut a = state.build_hasher();
    a.write_u64(0x7469_6465_6d61_726b);
    let mut b = state.build_hasher();
    b.write_u64(0x6b72_616d_6564_6974);
    (a.finish(), b.finish())
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
    fn key_changes_fingerprint() {
        let a = FingerprintKey::new(1, 2);
        let b = FingerprintKey::new(1, 3);
        assert_ne!(a.fingerprint(b"42"), b.fingerprint(b"42"));
        assert_eq!(a.fingerprint(b"42"), a.fingerprint(b"42"));
        assert_ne!(a.fingerprint(b"42"), a.fingerprint(b"43"));
    }

    #[test]
    fn random_keys_differ_between_states() {
        assert_ne!(FingerprintKey::random(), FingerprintKey::random());
    }
}
