//! The core's registry and worker on smol with the real clock and a
//! `FileStore`: what a graceful stop wrote is there after a restart.

use std::sync::Arc;
use tidemark::{FileStore, SmolClock};
use tidemark_core::{Clock, Config, Millis, StreamKey, persistence};

#[test]
fn a_graceful_stop_persists_every_stream_to_disk() {
    let dir = tempfile::tempdir().unwrap();
    let clock = SmolClock::new();
    smol::block_on(async {
        let store = Arc::new(FileStore::open(dir.path()).unwrap());
        let (registry, worker) = persistence(store, clock, Config::default());
        let worker = smol::spawn(worker.run());
        for s in 0..20 {
            let mut tracker = registry
                .open(StreamKey::new("s", format!("{s}")))
                .await
                .unwrap();
            for id in 1..=100 {
                let fresh = tracker.observe(Some(&id.to_string()), clock.now());
                assert!(fresh.is_fresh());
                tracker.commit();
            }
        }
        let report = registry
            .shutdown(clock.now() + Millis::from_secs(5))
            .await
            .unwrap();
        assert!(report.is_complete(), "{report:?}");
        assert!(worker.await.is_complete());
    });

    let store = Arc::new(FileStore::open(dir.path()).unwrap());
    assert_eq!(store.len(), 20);
    let (registry, _worker) = persistence(store, clock, Config::default());
    for s in 0..20 {
        let tracker = smol::block_on(registry.open(StreamKey::new("s", format!("{s}")))).unwrap();
        assert_eq!(tracker.last_event_id(), Some("100"));
        assert_eq!(tracker.seq(), 100);
    }
}
