//! What Rust users expect of the public types: every one is `Debug`, and
//! every error is a `std::error::Error + Send + Sync + 'static` whose cause
//! is its `source()`.

use futures::executor::{LocalPool, block_on};
use futures::task::LocalSpawnExt;
use std::error::Error;
use std::fmt::Debug;
use std::rc::Rc;
use tidemark_core::sse::{EncodeError, Event, Item, Limits, ParseError, Parser};
use tidemark_core::{
    Backoff, Clock, Config, ConnectRequest, Cursor, Decision, EitherStore, EntropyError,
    EventTracker, Failure, FingerprintKey, FlakyConfig, FlakyStore, FlushReport, GiveUp,
    ManualClock, ManualSleep, MemStore, Millis, Observation, PersistenceWorker, ReconnectConfig,
    ReconnectPolicy, Registry, RegistryError, Rng, ShutdownReport, Stats, Store, StoreError,
    StreamConfig, StreamError, StreamKey, StreamStats, TrackerConfig, TrackerStats, WorkerConfig,
    WorkerHandle, WorkerStats, WorkerStopped, persistence,
};

fn assert_debug<T: Debug>() {}

fn assert_error<T: Error + Send + Sync + 'static>() {}

/// Compile-time checks: this test does not build if a type loses `Debug`
/// or an error stops being a thread-safe `Error`.
#[test]
fn every_public_type_is_debug_and_every_error_an_error() {
    assert_debug::<Backoff>();
    assert_debug::<Config>();
    assert_debug::<ConnectRequest<'static>>();
    assert_debug::<Cursor>();
    assert_debug::<Decision>();
    assert_debug::<EitherStore<MemStore, Rc<MemStore>>>();
    assert_debug::<EventTracker>();
    assert_debug::<FingerprintKey>();
    assert_debug::<FlakyConfig>();
    assert_debug::<FlakyStore<MemStore, ManualClock>>();
    assert_debug::<FlushReport>();
    assert_debug::<ManualClock>();
    assert_debug::<ManualSleep>();
    assert_debug::<MemStore>();
    assert_debug::<Millis>();
    assert_debug::<Observation>();
    assert_debug::<PersistenceWorker<Rc<MemStore>, ManualClock>>();
    assert_debug::<ReconnectConfig>();
    assert_debug::<ReconnectPolicy>();
    assert_debug::<Registry<Rc<MemStore>>>();
    assert_debug::<Rng>();
    assert_debug::<ShutdownReport>();
    assert_debug::<Stats>();
    assert_debug::<StreamConfig>();
    assert_debug::<StreamKey>();
    assert_debug::<StreamStats>();
    assert_debug::<TrackerConfig>();
    assert_debug::<TrackerStats>();
    assert_debug::<WorkerConfig>();
    assert_debug::<WorkerHandle>();
    assert_debug::<WorkerStats>();
    assert_debug::<Event>();
    assert_debug::<Item>();
    assert_debug::<Limits>();
    assert_debug::<Parser>();

    assert_error::<EncodeError>();
    assert_error::<EntropyError>();
    assert_error::<Failure>();
    assert_error::<GiveUp>();
    assert_error::<ParseError>();
    assert_error::<RegistryError>();
    assert_error::<StoreError>();
    assert_error::<StreamError>();
    assert_error::<WorkerStopped>();
}

/// The messages of `error` and of every error below it.
fn chain(error: &(dyn Error + 'static)) -> Vec<String> {
    std::iter::successors(Some(error), |&e| e.source())
        .map(ToString::to_string)
        .collect()
}

#[test]
fn errors_chain_to_their_causes() {
    let network = Failure::Network("reset by peer".into());
    let exhausted = StreamError::GaveUp(GiveUp::Exhausted {
        attempts: 3,
        last: network.clone(),
    });
    assert_eq!(
        chain(&exhausted),
        [
            "connection failed: reset by peer (giving up after 3 attempts without data)",
            "connection failed: reset by peer (giving up after 3 attempts without data)",
            "connection failed: reset by peer",
        ]
    );
    let permanent = GiveUp::Permanent(Failure::Status {
        code: 404,
        retry_after: None,
    });
    assert_eq!(
        chain(&permanent).last().unwrap(),
        "server answered HTTP 404"
    );
    assert_eq!(chain(&network).len(), 1);

    let parse = StreamError::Parse(ParseError::LineTooLong { limit: 8 });
    let source = parse.source().expect("a parse error has a source");
    assert!(source.downcast_ref::<ParseError>().is_some());
    assert!(StreamError::Closed.source().is_none());

    let store = RegistryError::Store(StoreError::Unavailable("down".into()));
    let source = store.source().and_then(|e| e.downcast_ref::<StoreError>());
    assert_eq!(source, Some(&StoreError::Unavailable("down".into())));
    assert!(RegistryError::WorkerStopped.source().is_none());
}

#[test]
fn debug_shows_the_state() {
    let store = Rc::new(MemStore::new());
    let clock = ManualClock::starting_at(Millis(7));
    let (registry, worker) = persistence(store.clone(), clock.clone(), Config::default());
    let mut pool = LocalPool::new();
    pool.spawner()
        .spawn_local(async move {
            worker.run().await;
        })
        .unwrap();
    let mut tracker = pool
        .run_until(registry.open(StreamKey::new("s", "a")))
        .unwrap();
    assert!(tracker.observe(Some("1"), clock.now()).is_fresh());
    tracker.commit();
    pool.run_until_stalled();

    let registry = format!("{registry:?}");
    for part in [
        "open_streams: 1",
        "stopped: false",
        "cursors_written: 1",
        "batches: 1",
        "FingerprintKey(..)",
    ] {
        assert!(registry.contains(part), "{part} missing in {registry}");
    }
    assert!(format!("{clock:?}").contains("now: 7ms"), "{clock:?}");

    let flaky = FlakyStore::new(MemStore::new(), clock, FlakyConfig::default());
    flaky.set_down(true);
    assert!(block_on(flaky.delete(&StreamKey::new("s", "a"))).is_err());
    let flaky = format!("{flaky:?}");
    assert!(
        flaky.contains("down: true, calls: 1, failures: 1"),
        "{flaky}"
    );
}
