//! A lease on a stream in Redis: one instance of a fleet follows it at a time.
//!
//! The lease is a key `{prefix}lease:{n}:{session}:{stream}` holding the
//! owner's random token, with a Redis expiry of one TTL. An instance acquires
//! it with a script that sets the key (token, `PX ttl`) if it is absent, or
//! extends it if it already holds the instance's own token (a renewal that
//! reached Redis after the instance gave up); a standby polls that every third of a
//! TTL. The holder renews it every third of a TTL with a script that extends
//! the expiry only if the token is still its own.
//!
//! The holder also keeps its own deadline: the time it sent its last
//! successful renewal plus nine tenths of the TTL. Redis cannot expire the key
//! before the send time plus the TTL, so by the holder's deadline it has not
//! yet expired, and no other instance can hold the lease while the holder
//! still considers it valid. That assumes both clocks run at nearly the same
//! rate: the holder's clock is monotonic and counts a paused process, but on
//! Linux not a suspended machine, so a holder whose machine sleeps through
//! its deadline may go on delivering after it wakes until its next renewal
//! finds the lease taken, at most a third of a TTL. A holder past its deadline (Redis unreachable for
//! most of a TTL, or the process paused) must stop delivering at once:
//! [`Lease::is_valid`] turns false and [`Lease::keep`] returns. That is what
//! rules out two instances delivering the same stream at the same time.
//!
//! A renewal that finds no key at all while the holder's deadline has not
//! passed re-creates it: the key cannot have expired, so Redis lost it (a
//! restart without persistence). A renewal that finds another token means
//! the lease is lost, and the holder stops at once.
//!
//! All of this assumes that Redis keeps the lease key until it expires. A
//! Redis that loses it early (a restart without persistence, a failover to a
//! replica that had not received it, `FLUSHDB`, eviction under any policy
//! but `noeviction`) lets a standby take the lease while the holder's
//! deadline has not passed: both may then deliver until the holder's next
//! renewal finds the other token, at most a third of a TTL later. Leases
//! that must hold through such events need a Redis that does not lose keys
//! (AOF persistence with `appendfsync always`, `noeviction`).
//!
//! An instance that takes a stream over must load the stream's cursor only
//! after it holds the lease, and continues the cursor's sequence far above the
//! stored one ([`TAKEOVER_SEQ_GAP`]), so that a late write of the previous
//! owner (a retry still in flight when it stopped) never wins over the new
//! owner's cursors.

use crate::{RedisStore, SmolClock};
use futures::future::{Either, select};
use redis::Script;
use std::fmt;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use tidemark_core::{Clock, Millis, StoreError, StreamKey};

/// How far above the stored cursor's `seq` a new owner continues: more cursor
/// moves than a previous owner can make between its last flush and losing
/// its lease.
pub const TAKEOVER_SEQ_GAP: u64 = 1 << 32;

/// Extends the lease if it is ours; takes it if nobody holds it.
const RENEW: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
elseif not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
";

/// Deletes the lease if it is ours.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

static RENEW_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RENEW));
static RELEASE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RELEASE));

/// Why a lease ended.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseLost {
    /// Another instance holds it.
    Taken,
    /// It could not be renewed before the holder's deadline; the last error,
    /// if a renewal failed.
    Lapsed(Option<StoreError>),
}

impl fmt::Display for LeaseLost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LeaseLost::Taken => f.write_str("lost the lease: another instance holds it"),
            LeaseLost::Lapsed(None) => f.write_str("the lease lapsed before it was renewed"),
            LeaseLost::Lapsed(Some(e)) => {
                write!(f, "the lease lapsed: it could not be renewed ({e})")
            }
        }
    }
}

impl std::error::Error for LeaseLost {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LeaseLost::Lapsed(Some(e)) => Some(e),
            LeaseLost::Taken | LeaseLost::Lapsed(None) => None,
        }
    }
}

/// One instance's lease on one stream; see the [module docs](self). Clones
/// share the lease.
#[derive(Clone)]
pub struct Lease {
    store: Arc<RedisStore>,
    clock: SmolClock,
    key: String,
    token: Arc<str>,
    ttl: Duration,
    valid_until: Arc<AtomicU64>,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("key", &self.key)
            .field("token", &self.token)
            .field("ttl", &self.ttl)
            .field("valid_until", &self.valid_until())
            .field("valid", &self.is_valid())
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// A lease on `stream` with time to live `ttl` (at least 30 ms), not yet
    /// held, with a fresh random token.
    pub fn new(
        store: Arc<RedisStore>,
        stream: &StreamKey,
        ttl: Duration,
        clock: SmolClock,
    ) -> Self {
        let token = format!(
            "pid {} {:016x}",
            std::process::id(),
            tidemark_core::random_seed()
        );
        Lease {
            key: store.key("lease", stream),
            store,
            clock,
            token: token.into(),
            ttl: ttl.max(Duration::from_millis(30)),
            valid_until: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The Redis key of the lease.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// This instance's token, the value of the key while it holds the lease.
    pub fn token(&self) -> &str {
        &self.token
    }

    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX)
    }

    /// A third of the TTL: the renewal and standby polling period.
    fn period(&self) -> Millis {
        Millis(self.ttl_ms() / 3)
    }

    /// Until when this instance may act as the holder (see the module docs).
    pub fn valid_until(&self) -> Millis {
        Millis(self.valid_until.load(Relaxed))
    }

    /// Whether this instance holds the lease now. Check it before every
    /// delivery.
    pub fn is_valid(&self) -> bool {
        self.clock.now() < self.valid_until()
    }

    fn held_from(&self, sent: Millis) {
        let ttl = self.ttl_ms();
        let until = sent.saturating_add(Millis(ttl - ttl / 10));
        self.valid_until.fetch_max(until.as_u64(), Relaxed);
    }

    /// One attempt to take the lease: `true` if this instance holds it now.
    /// Finding its own token (a renewal that reached Redis after this
    /// instance gave up on it) counts as holding it.
    pub async fn try_acquire(&self) -> Result<bool, StoreError> {
        let sent = self.clock.now();
        let held = self.run_renew().await?;
        if held {
            self.held_from(sent);
        }
        Ok(held)
    }

    /// The RENEW script: extends the key if it holds this instance's token,
    /// sets it if it is absent; whether this instance holds it now.
    async fn run_renew(&self) -> Result<bool, StoreError> {
        let mut call = RENEW_SCRIPT.key(&self.key);
        call.arg(&*self.token).arg(self.ttl_ms());
        let held: i64 = self
            .store
            .run(|mut connection| {
                let call = &call;
                async move { call.invoke_async(&mut connection).await }
            })
            .await?;
        Ok(held == 1)
    }

    /// Waits until this instance holds the lease, trying every third of a
    /// TTL; `waiting` sees each failed attempt (`None`: another instance
    /// holds it).
    pub async fn acquire(&self, mut waiting: impl FnMut(Option<&StoreError>)) {
        loop {
            let attempt = self.clock.now();
            match self.try_acquire().await {
                Ok(true) => return,
                Ok(false) => waiting(None),
                Err(e) => waiting(Some(&e)),
            }
            self.clock.sleep_until(attempt + self.period()).await;
        }
    }

    /// One renewal: `Ok(false)` if another instance holds the lease (and
    /// [`is_valid`](Self::is_valid) is false from then on), or if this
    /// instance's deadline has passed (it must not take the lease back
    /// without acquiring it anew).
    pub async fn renew(&self) -> Result<bool, StoreError> {
        let sent = self.clock.now();
        if !self.is_valid() {
            return Ok(false);
        }
        let held = self.run_renew().await?;
        if held {
            self.held_from(sent);
        } else {
            // Another instance holds it: stop acting as the holder now, not
            // at the deadline.
            self.valid_until.store(0, Relaxed);
        }
        Ok(held)
    }

    /// Renews the lease every third of a TTL (sooner after a failure) until
    /// it is lost; returns at the latest at the deadline of the last
    /// successful renewal.
    pub async fn keep(&self) -> LeaseLost {
        let mut last_error = None;
        let mut next = self.clock.now() + self.period();
        loop {
            let deadline = self.valid_until();
            self.clock.sleep_until(next.min(deadline)).await;
            if !self.is_valid() {
                return LeaseLost::Lapsed(last_error);
            }
            let renew = pin!(self.renew());
            let lapse = pin!(self.clock.sleep_until(deadline));
            match select(renew, lapse).await {
                Either::Left((Ok(true), _)) => {
                    last_error = None;
                    next = self.clock.now() + self.period();
                }
                // `renew` found another token (it was valid when called:
                // checked just above).
                Either::Left((Ok(false), _)) if self.valid_until() == Millis::ZERO => {
                    return LeaseLost::Taken;
                }
                Either::Left((Ok(false), _)) | Either::Right(_) => {
                    return LeaseLost::Lapsed(last_error);
                }
                Either::Left((Err(e), _)) => {
                    last_error = Some(e);
                    next = self.clock.now() + Millis(self.period().as_u64() / 4);
                }
            }
        }
    }

    /// Gives the lease up at once, if this instance still holds it, so that
    /// a standby need not wait for it to lapse.
    pub async fn release(&self) -> Result<(), StoreError> {
        self.valid_until.store(0, Relaxed);
        let mut call = RELEASE_SCRIPT.key(&self.key);
        call.arg(&*self.token);
        self.store
            .run(|mut connection| {
                let call = &call;
                async move { call.invoke_async::<i64>(&mut connection).await }
            })
            .await
            .map(drop)
    }
}
