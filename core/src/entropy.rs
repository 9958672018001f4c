//! Entropy for fingerprint keys and jitter seeds, from the operating system.
//!
//! Random bits come from the `getrandom` crate: the OS source on native
//! targets, and `crypto.getRandomValues` in browsers, workers and Node on
//! `wasm32-unknown-unknown`, where this crate enables getrandom's `wasm_js`
//! backend itself, so neither hosts nor users set any `RUSTFLAGS`. (A
//! `--cfg getrandom_backend=...` flag, if a build sets one, still overrides
//! the source, as getrandom documents.)
//!
//! getrandom fails only when the platform has no source at all (for example
//! a JavaScript environment without `globalThis.crypto`).

use core::fmt;

/// The platform gave no random bits: no entropy source is available.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntropyError(getrandom::Error);

impl fmt::Display for EntropyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no entropy source available: {}", self.0)
    }
}

impl std::error::Error for EntropyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// `N` random 64-bit values.
pub(crate) fn random_u64s<const N: usize>() -> Result<[u64; N], EntropyError> {
    let mut values = [0u64; N];
    for value in &mut values {
        *value = getrandom::u64().map_err(EntropyError)?;
    }
    Ok(values)
}
