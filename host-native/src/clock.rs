//! The core's clock on async-io timers.

use std::future::Future;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tidemark_core::{Clock, Millis};

/// Milliseconds since the Unix epoch as of construction, advanced by the
/// monotonic clock: it never goes backwards, even when the wall clock is
/// set back, and cursor times stay comparable across restarts.
#[derive(Clone, Copy, Debug)]
pub struct SmolClock {
    origin: Instant,
    origin_millis: u64,
}

impl SmolClock {
    /// A clock starting at the current wall-clock time.
    pub fn new() -> Self {
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        SmolClock {
            origin: Instant::now(),
            origin_millis: u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// The monotonic instant at which the clock reads `at`, or `None` if it
    /// is too far away to represent.
    fn instant_of(&self, at: Millis) -> Option<Instant> {
        let offset = at.as_u64().saturating_sub(self.origin_millis);
        self.origin.checked_add(Duration::from_millis(offset))
    }
}

impl Default for SmolClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SmolClock {
    fn now(&self) -> Millis {
        let elapsed = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        Millis(self.origin_millis.saturating_add(elapsed))
    }

    fn sleep_until(&self, deadline: Millis) -> impl Future<Output = ()> {
        let timer = match self.instant_of(deadline) {
            Some(at) => async_io::Timer::at(at),
            None => async_io::Timer::never(),
        };
        async move {
            timer.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wall_time_and_sleeps_until_a_deadline() {
        let clock = SmolClock::new();
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert!(clock.now().as_u64().abs_diff(wall) < 1000);
        let start = clock.now();
        smol::block_on(clock.sleep_until(start + Millis(30)));
        assert!(clock.now() >= start + Millis(30));
        // A deadline in the past completes at once.
        smol::block_on(clock.sleep_until(Millis(0)));
    }

    #[test]
    fn the_far_future_never_panics() {
        let clock = SmolClock::new();
        // "Never" (the worker's idle deadline) must not overflow the instant.
        let _ = clock.instant_of(Millis::MAX);
        let mut sleep = Box::pin(clock.sleep_until(Millis::MAX));
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(sleep.as_mut().poll(&mut cx).is_pending());
    }
}
