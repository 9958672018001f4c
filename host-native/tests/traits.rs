//! What Rust users expect of the native host's public types: every one is
//! `Debug` (showing state, never a password), and every error is a
//! thread-safe `std::error::Error` whose cause is its `source()`.

use std::error::Error;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;
use tidemark::core::{Cursor, Millis, Store, StoreError, StreamKey};
use tidemark::demo::{DemoOptions, Verdict};
use tidemark::follow::FollowError;
use tidemark::metrics::{FollowMetrics, Format, GapReason, Limit, ProxyMetrics, StreamKind};
use tidemark::{
    FileStore, HttpBody, HttpConnector, HttpResponse, Lease, LeaseLost, NativeStore, RedisConfig,
    RedisStore, ServerConfig, SmolClock, SseServer,
};

fn assert_debug<T: Debug>() {}

fn assert_error<T: Error + Send + Sync + 'static>() {}

fn assert_shared<T: Clone + Send + Sync + 'static>() {}

/// Compile-time checks: this test does not build if a type loses `Debug`
/// or an error stops being a thread-safe `Error`.
#[test]
fn every_public_type_is_debug_and_every_error_an_error() {
    assert_debug::<DemoOptions>();
    assert_debug::<FileStore>();
    assert_debug::<HttpBody>();
    assert_debug::<HttpConnector>();
    assert_debug::<HttpResponse>();
    assert_debug::<Lease>();
    assert_debug::<NativeStore>();
    assert_debug::<RedisConfig>();
    assert_debug::<RedisStore>();
    assert_debug::<ServerConfig>();
    assert_debug::<SmolClock>();
    assert_debug::<SseServer>();
    assert_debug::<Verdict>();
    assert_debug::<ProxyMetrics>();
    assert_debug::<FollowMetrics>();
    assert_debug::<Format>();
    assert_debug::<StreamKind>();
    assert_debug::<GapReason>();
    assert_debug::<Limit>();

    assert_error::<LeaseLost>();
    assert_error::<FollowError>();

    // Handles the proxy's tasks share.
    assert_shared::<ProxyMetrics>();
    assert_shared::<FollowMetrics>();
}

#[test]
fn a_lapsed_lease_has_the_store_error_as_its_source() {
    let lapsed = LeaseLost::Lapsed(Some(StoreError::Unavailable("redis: refused".into())));
    let source = lapsed.source().and_then(|e| e.downcast_ref::<StoreError>());
    assert_eq!(
        source,
        Some(&StoreError::Unavailable("redis: refused".into()))
    );
    assert!(LeaseLost::Lapsed(None).source().is_none());
    assert!(LeaseLost::Taken.source().is_none());
}

#[test]
fn debug_shows_the_state_and_no_password() {
    let dir = tempfile::tempdir().unwrap();
    let file = FileStore::open(dir.path()).unwrap();
    let cursor = Cursor {
        key: StreamKey::new("s", "a"),
        last_event_id: "1".into(),
        seq: 1,
        at: Millis(1),
    };
    smol::block_on(file.save_batch(&[cursor])).unwrap();
    let debug = format!("{:?}", NativeStore::Left(file));
    assert!(debug.starts_with("Left(FileStore {"), "{debug}");
    assert!(debug.contains("streams: 1"), "{debug}");
    assert!(debug.contains(&format!("{:?}", dir.path())), "{debug}");

    let redis =
        Arc::new(RedisStore::new(RedisConfig::new("redis://:hunter2@127.0.0.1:1/")).unwrap());
    let lease = Lease::new(
        redis.clone(),
        &StreamKey::new("s", "a"),
        Duration::from_secs(3),
        SmolClock::new(),
    );
    let debug = format!("{lease:?} {:?}", NativeStore::Right(redis));
    assert!(!debug.contains("hunter2"), "{debug}");
    assert!(debug.contains("redis://:***@127.0.0.1:1/"), "{debug}");
    assert!(
        debug.contains(&format!("key: {:?}", lease.key())),
        "{debug}"
    );
    assert!(debug.contains("valid: false"), "{debug}");

    smol::block_on(async {
        let server = SseServer::bind(([127, 0, 0, 1], 0).into(), ServerConfig::default())
            .await
            .unwrap();
        let debug = format!("{server:?}");
        let addr = server.local_addr().unwrap();
        assert!(debug.contains(&addr.to_string()), "{debug}");
    });

    let body = format!("{:?}", HttpBody::from_bytes("x".into()));
    assert_eq!(body, "HttpBody { source: \"bytes\", .. }");
}
