//! Cross-crate integration and simulation tests of tidemark; the tests live
//! in `tests/`. This library holds what they share.

use futures::executor::LocalPool;
use futures::task::LocalSpawnExt;
use tidemark_core::{Config, ManualClock, Registry, Store, persistence};

/// A registry over `store` on virtual time, with its worker spawned on the
/// returned pool (it runs whenever the pool does).
pub fn start_persistence<S: Store + Clone + 'static>(
    store: S,
    clock: &ManualClock,
    config: Config,
) -> (Registry<S>, LocalPool) {
    let (registry, worker) = persistence(store, clock.clone(), config);
    let pool = LocalPool::new();
    pool.spawner()
        .spawn_local(async move {
            worker.run().await;
        })
        .expect("a new pool accepts tasks");
    (registry, pool)
}
