//! Injected time.
//!
//! The core never reads a clock. Everything that depends on time takes a
//! [`Millis`] argument, and the one async driver (the persistence worker) gets
//! both halves of time, "what time is it" and "wake me at", from one [`Clock`]
//! the host provides. `std::time::Instant::now()` would panic on
//! `wasm32-unknown-unknown`, so hosts map their own timers onto `Millis`:
//! async-io `Timer` natively, `performance.now()` and gloo-timers in browsers.

use core::fmt;
use core::future::Future;
use core::ops::{Add, Sub};

/// A point in time or a duration, in milliseconds since an arbitrary epoch
/// chosen by the [`Clock`].
///
/// Arithmetic saturates: time never wraps around and never goes below zero.
#[derive(Copy, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(transparent))]
pub struct Millis(pub u64);

impl Millis {
    /// Zero: the clock's epoch, or an empty duration.
    pub const ZERO: Millis = Millis(0);
    /// The far future; used as "never".
    pub const MAX: Millis = Millis(u64::MAX);

    /// A duration of `secs` seconds.
    pub const fn from_secs(secs: u64) -> Millis {
        Millis(secs.saturating_mul(1000))
    }

    /// The raw number of milliseconds.
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// `self + rhs`, stopping at [`Millis::MAX`].
    pub const fn saturating_add(self, rhs: Millis) -> Millis {
        Millis(self.0.saturating_add(rhs.0))
    }

    /// `self - rhs`, stopping at zero.
    pub const fn saturating_sub(self, rhs: Millis) -> Millis {
        Millis(self.0.saturating_sub(rhs.0))
    }
}

impl Add for Millis {
    type Output = Millis;
    fn add(self, rhs: Millis) -> Millis {
        self.saturating_add(rhs)
    }
}

impl Sub for Millis {
    type Output = Millis;
    fn sub(self, rhs: Millis) -> Millis {
        self.saturating_sub(rhs)
    }
}

impl fmt::Debug for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}ms", self.0)
    }
}

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}ms", self.0)
    }
}

/// A source of time that can also put a task to sleep.
///
/// `now` must never go backwards. `sleep_until` must complete once `now()` has
/// reached the deadline (immediately if it already has). There is no `Send`
/// bound: browser timers are `!Send`, and a host that needs `Send` futures gets
/// them by using a clock whose futures are `Send`.
pub trait Clock {
    /// The current time.
    fn now(&self) -> Millis;

    /// A future that completes at or after `deadline`.
    fn sleep_until(&self, deadline: Millis) -> impl Future<Output = ()>;
}

impl<C: Clock + ?Sized> Clock for &C {
    fn now(&self) -> Millis {
        (**self).now()
    }
    fn sleep_until(&self, deadline: Millis) -> impl Future<Output = ()> {
        (**self).sleep_until(deadline)
    }
}

impl<C: Clock + ?Sized> Clock for std::sync::Arc<C> {
    fn now(&self) -> Millis {
        (**self).now()
    }
    fn sleep_until(&self, deadline: Millis) -> impl Future<Output = ()> {
        (**self).sleep_until(deadline)
    }
}

#[cfg(any(test, feature = "test-util"))]
pub use manual::{ManualClock, ManualSleep};

#[cfg(any(test, feature = "test-util"))]
mod manual {
    use super::{Clock, Millis};
    use core::future::Future;
    use core::pin::Pin;
    use core::task::{Context, Poll, Waker};
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    /// Virtual time for tests: it only moves when told to.
    ///
    /// [`ManualClock::advance`] wakes every sleeper whose deadline has been
    /// reached, so a test drives timers and `now()` from one source. Clones
    /// share the same time.
    #[derive(Clone, Default)]
    pub struct ManualClock {
        inner: Arc<Mutex<Inner>>,
    }

    #[derive(Default)]
    struct Inner {
        now: Millis,
        next_id: u64,
        sleepers: BTreeMap<u64, (Millis, Waker)>,
    }

    impl core::fmt::Debug for ManualClock {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            f.debug_struct("ManualClock")
                .field("now", &inner.now)
                .field("sleepers", &inner.sleepers.len())
                .finish()
        }
    }

    impl ManualClock {
        /// A clock standing at time zero.
        pub fn new() -> Self {
            Self::default()
        }

        /// A clock standing at `now`.
        pub fn starting_at(now: Millis) -> Self {
            let clock = Self::new();
            clock.inner.lock().unwrap().now = now;
            clock
        }

        /// Moves time forward by `by` and wakes every sleeper that is due.
        pub fn advance(&self, by: Millis) {
            let now = self.now().saturating_add(by);
            self.set(now);
        }

        /// Moves time forward to `to` (never backwards) and wakes every sleeper
        /// that is due.
        pub fn set(&self, to: Millis) {
            let due: Vec<Waker> = {
                let mut inner = self.inner.lock().unwrap();
                inner.now = inner.now.max(to);
                let now = inner.now;
                let ids: Vec<u64> = inner
                    .sleepers
                    .iter()
                    .filter(|(_, (deadline, _))| *deadline <= now)
                    .map(|(id, _)| *id)
                    .collect();
                ids.iter()
                    .filter_map(|id| inner.sleepers.remove(id))
                    .map(|(_, waker)| waker)
                    .collect()
            };
            due.into_iter().for_each(Waker::wake);
        }

        /// The earliest deadline any pending sleeper waits for.
        pub fn next_deadline(&self) -> Option<Millis> {
            let inner = self.inner.lock().unwrap();
            inner.sleepers.values().map(|(deadline, _)| *deadline).min()
        }

        /// How many sleepers are waiting.
        pub fn sleepers(&self) -> usize {
            self.inner.lock().unwrap().sleepers.len()
        }
    }

    impl Clock for ManualClock {
        fn now(&self) -> Millis {
            self.inner.lock().unwrap().now
        }

        fn sleep_until(&self, deadline: Millis) -> impl Future<Output = ()> {
            ManualSleep {
                clock: self.clone(),
                deadline,
                id: None,
            }
        }
    }

    /// The future returned by [`ManualClock`]'s `sleep_until`.
    #[derive(Debug)]
    pub struct ManualSleep {
        clock: ManualClock,
        deadline: Millis,
        id: Option<u64>,
    }

    impl Future for ManualSleep {
        type Output = ();

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            let this = &mut *self;
            let mut inner = this.clock.inner.lock().unwrap();
            if inner.now >= this.deadline {
                if let Some(id) = this.id.take() {
                    inner.sleepers.remove(&id);
                }
                return Poll::Ready(());
            }
            let id = *this.id.get_or_insert_with(|| {
                inner.next_id += 1;
                inner.next_id
            });
            inner
                .sleepers
                .insert(id, (this.deadline, cx.waker().clone()));
            Poll::Pending
        }
    }

    impl Drop for ManualSleep {
        fn drop(&mut self) {
            if let Some(id) = self.id
                && let Ok(mut inner) = self.clock.inner.lock()
            {
                inner.sleepers.remove(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::LocalPool;
    use futures::task::LocalSpawnExt;
    use std::cell::Cell;
    use std::rc::Rc;

    #[test]
    fn arithmetic_saturates() {
        assert_eq!(Millis(5) - Millis(9), Millis::ZERO);
        assert_eq!(Millis::MAX + Millis(1), Millis::MAX);
        assert_eq!(Millis::from_secs(3), Millis(3000));
    }

    #[test]
    fn advance_wakes_only_due_sleepers() {
        let clock = ManualClock::new();
        let mut pool = LocalPool::new();
        let woke = Rc::new(Cell::new(Vec::new()));
        for deadline in [30, 10, 20] {
            let (clock, woke) = (clock.clone(), woke.clone());
            pool.spawner()
                .spawn_local(async move {
                    clock.sleep_until(Millis(deadline)).await;
                    let mut seen = woke.take();
                    seen.push(deadline);
                    woke.set(seen);
                })
                .unwrap();
        }
        pool.run_until_stalled();
        assert_eq!(clock.sleepers(), 3);
        assert_eq!(clock.next_deadline(), Some(Millis(10)));
        clock.advance(Millis(20));
        pool.run_until_stalled();
        assert_eq!(woke.take(), vec![10, 20]);
        assert_eq!(clock.sleepers(), 1);
        clock.set(Millis(5));
        assert_eq!(clock.now(), Millis(20), "time never goes backwards");
        clock.advance(Millis(10));
        pool.run_until_stalled();
        assert_eq!(woke.take(), vec![30]);
        assert_eq!(clock.sleepers(), 0);
    }

    #[test]
    fn dropped_sleeper_unregisters() {
        let clock = ManualClock::new();
        let mut fut = Box::pin(clock.sleep_until(Millis(10)));
        let waker = futures::task::noop_waker();
        let mut cx = core::task::Context::from_waker(&waker);
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        assert_eq!(clock.sleepers(), 1);
        drop(fut);
        assert_eq!(clock.sleepers(), 0);
    }
}
