//! A store wrapper that injects failures and latency, for tests.

use crate::backoff::Rng;
use crate::clock::{Clock, Millis};
use crate::cursor::{Cursor, StreamKey};
use crate::fingerprint::FingerprintKey;
use crate::saved_window::{SavedWindow, WindowChange};
use crate::store::{Store, StoreError};
use std::sync::Mutex;

/// What a [`FlakyStore`] injects; all draws come from one seeded generator,
/// so a run replays exactly.
#[derive(Clone, Debug, Default)]
pub struct FlakyConfig {
    /// Seed of the generator.
    pub seed: u64,
    /// Chance per call, in thousandths, that a call fails without writing.
    pub fail_per_mille: u32,
    /// Chance per `save_batch`, in thousandths, that the write happens but the
    /// caller is told it failed (a lost acknowledgement).
    pub lost_ack_per_mille: u32,
    /// Latency of each call, drawn uniformly from this range.
    pub latency: (Millis, Millis),
}

/// Wraps a store with seeded failures, lost acknowledgements, latency and
/// explicit outages.
pub struct FlakyStore<S, C> {
    inner: S,
    clock: C,
    state: Mutex<State>,
}

struct State {
    config: FlakyConfig,
    rng: Rng,
    down: bool,
    calls: u64,
    failures: u64,
}

impl<S: core::fmt::Debug, C> core::fmt::Debug for FlakyStore<S, C> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let state = self.state();
        f.debug_struct("FlakyStore")
            .field("inner", &self.inner)
            .field("config", &state.config)
            .field("down", &state.down)
            .field("calls", &state.calls)
            .field("failures", &state.failures)
            .finish_non_exhaustive()
    }
}

impl<S, C> FlakyStore<S, C> {
    /// Wraps `inner`; latency is slept on `clock`.
    pub fn new(inner: S, clock: C, config: FlakyConfig) -> Self {
        FlakyStore {
            inner,
            clock,
            state: Mutex::new(State {
                rng: Rng::new(config.seed),
                config,
                down: false,
                calls: 0,
                failures: 0,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts (`true`) or ends (`false`) an outage: every call fails.
    pub fn set_down(&self, down: bool) {
        self.state().down = down;
    }

    /// Changes what is injected from now on (the generator keeps going).
    pub fn set_config(&self, config: FlakyConfig) {
        self.state().config = config;
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Calls made so far.
    pub fn calls(&self) -> u64 {
        self.state().calls
    }

    /// Calls that reported a failure so far.
    pub fn failures(&self) -> u64 {
        self.state().failures
    }

    /// Draws this call's latency and fate.
    fn draw(&self) -> (Millis, bool, bool) {
        let mut guard = self.state();
        let state = &mut *guard;
        state.calls += 1;
        let (lo, hi) = state.config.latency;
        let latency = Millis(lo.0 + state.rng.up_to(hi.0.saturating_sub(lo.0)));
        let fail = state.rng.chance(state.config.fail_per_mille) || state.down;
        let lost_ack = state.rng.chance(state.config.lost_ack_per_mille);
        if fail || lost_ack {
            state.failures += 1;
        }
        (latency, fail, lost_ack)
    }
}

impl<S: Store, C: Clock> FlakyStore<S, C> {
    async fn before(&self) -> Result<bool, StoreError> {
        let (latency, fail, lost_ack) = self.draw();
        if latency > Millis::ZERO {
            let now = self.clock.now();
            self.clock.sleep_until(now.saturating_add(latency)).await;
        }
        if fail {
            return Err(StoreError::Unavailable("injected failure".into()));
        }
        Ok(lost_ack)
    }
}

impl<S: Store, C: Clock> Store for FlakyStore<S, C> {
    async fn load(&self, key: &StreamKey) -> Result<Option<Cursor>, StoreError> {
        self.before().await?;
        self.inner.load(key).await
    }

    async fn save_batch(&self, cursors: &[Cursor]) -> Result<(), StoreError> {
        let lost_ack = self.before().await?;
        self.inner.save_batch(cursors).await?;
        if lost_ack {
            return Err(StoreError::Unavailable(
                "injected lost acknowledgement".into(),
            ));
        }
        Ok(())
    }

    async fn delete(&self, key: &StreamKey) -> Result<(), StoreError> {
        self.before().await?;
        self.inner.delete(key).await
    }
    async fn window_key(&self) -> Result<Option<FingerprintKey>, StoreError> {
        self.before().await?;
        self.inner.window_key().await
    }

    async fn load_window(&self, key: &StreamKey) -> Result<Option<SavedWindow>, StoreError> {
        self.before().await?;
        self.inner.load_window(key).await
    }

    async fn save_with_windows(
        &self,
        cursors: &[Cursor],
        windows: &[WindowChange],
    ) -> Result<(), StoreError> {
        let lost_ack = self.before().await?;
        self.inner.save_with_windows(cursors, windows).await?;
        if lost_ack {
            return Err(StoreError::Unavailable(
                "injected lost acknowledgement".into(),
            ));
        }
        Ok(())
    }
}
