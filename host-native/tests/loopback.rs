//! The resumable stream over real HTTP on loopback: a server that drops every
//! connection after a few events, a follower that resumes with
//! `Last-Event-ID` and persists to a `FileStore`, and a restart in between.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tidemark::{FileStore, HttpConnector, ServerConfig, SmolClock, SseServer};
use tidemark_core::{
    Clock, Config, Failure, GiveUp, Millis, ResumableStream, StreamConfig, StreamError, StreamKey,
    persistence,
};

fn fast_reconnect() -> StreamConfig {
    StreamConfig::default().with_backoff(Millis(5), Millis(50))
}

async fn start_server(
    config: ServerConfig,
) -> (SocketAddr, smol::Task<()>, async_channel::Sender<()>) {
    let server = SseServer::bind("127.0.0.1:0".parse().unwrap(), config)
        .await
        .unwrap();
    let addr = server.local_addr().unwrap();
    let (stop, stopped) = async_channel::bounded::<()>(1);
    let task = smol::spawn(async move {
        server
            .run(async move {
                let _ = stopped.recv().await;
            })
            .await
            .unwrap();
    });
    (addr, task, stop)
}

/// Follows `url` for `n` events with a tracker from a registry over `dir`,
/// then shuts down gracefully; returns the ids delivered.
async fn follow(url: &str, dir: &std::path::Path, n: usize) -> (Vec<u64>, u64) {
    let clock = SmolClock::new();
    let store = Arc::new(FileStore::open(dir).unwrap());
    let (registry, worker) = persistence(store, clock, Config::default());
    let worker = smol::spawn(worker.run());
    let tracker = registry
        .open(StreamKey::new("test", "events"))
        .await
        .unwrap();
    let mut stream = ResumableStream::new(
        HttpConnector::default(),
        clock,
        url,
        tracker,
        fast_reconnect(),
    );
    let mut ids = Vec::new();
    while ids.len() < n {
        let event = stream.next_event().await.expect("an event");
        ids.push(event.data.parse().unwrap());
    }
    stream.commit();
    let reconnects = stream.stats().reconnects;
    drop(stream);
    let report = registry
        .shutdown(clock.now() + Millis::from_secs(5))
        .await
        .unwrap();
    assert!(report.is_complete());
    worker.await;
    (ids, reconnects)
}

#[test]
fn drops_and_a_restart_deliver_every_id_exactly_once() {
    smol::block_on(async {
        let (addr, server, stop) = start_server(ServerConfig {
            count: Some(120),
            interval: Duration::from_millis(1),
            drop_every: Some(17),
            retry_ms: Some(5),
            ..ServerConfig::default()
        })
        .await;
        let url = format!("http://{addr}/events");
        let dir = tempfile::tempdir().unwrap();
        let (first, reconnects) = follow(&url, dir.path(), 50).await;
        assert!(reconnects >= 2, "the server dropped us {reconnects} times");
        let (second, _) = follow(&url, dir.path(), 70).await;
        let all: Vec<u64> = first.into_iter().chain(second).collect();
        assert_eq!(all, (1..=120).collect::<Vec<_>>());
        drop(stop);
        server.await;
    });
}

#[test]
fn permanent_failures_stop_the_stream() {
    smol::block_on(async {
        let (addr, _server, _stop) = start_server(ServerConfig::default()).await;
        let clock = SmolClock::new();
        let tracker =
            tidemark_core::EventTracker::new(StreamKey::new("t", "x"), Default::default());
        let url = format!("http://{addr}/nowhere");
        let mut stream = ResumableStream::new(
            HttpConnector::default(),
            clock,
            url,
            tracker,
            fast_reconnect(),
        );
        let error = stream.next_event().await.unwrap_err();
        assert_eq!(
            error,
            StreamError::GaveUp(GiveUp::Permanent(Failure::Status {
                code: 404,
                retry_after: None
            }))
        );

        let tracker =
            tidemark_core::EventTracker::new(StreamKey::new("t", "x"), Default::default());
        let mut stream = ResumableStream::new(
            HttpConnector::default(),
            clock,
            "ftp://127.0.0.1/events",
            tracker,
            fast_reconnect(),
        );
        assert!(matches!(
            stream.next_event().await.unwrap_err(),
            StreamError::GaveUp(GiveUp::Permanent(Failure::Request(_)))
        ));
    });
}

#[test]
fn long_gaps_between_events_carry_keep_alives() {
    smol::block_on(async {
        let (addr, _server, _stop) = start_server(ServerConfig {
            count: Some(2),
            interval: Duration::from_millis(100),
            keep_alive: Duration::from_millis(30),
            retry_ms: None,
            ..ServerConfig::default()
        })
        .await;
        let clock = SmolClock::new();
        let tracker =
            tidemark_core::EventTracker::new(StreamKey::new("t", "k"), Default::default());
        let url = format!("http://{addr}/events");
        let mut stream = ResumableStream::new(
            HttpConnector::default(),
            clock,
            url,
            tracker,
            fast_reconnect(),
        );
        assert_eq!(stream.next_event().await.unwrap().data, "1");
        assert_eq!(stream.next_event().await.unwrap().data, "2");
        assert!(stream.stats().comments >= 4, "{:?}", stream.stats());
        assert_eq!(stream.stats().connects, 1);
    });
}

/// A server that writes one HTTP chunk per event, all in one write: the
/// body hands them over as one chunk, so the client loop flushes once.
#[test]
fn frames_already_in_come_as_one_chunk() {
    use futures::StreamExt;
    use std::io::{Read, Write};
    use tidemark_core::{ConnectRequest, Connector};

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut socket, _) = listener.accept().unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            socket.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        let mut response = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
            transfer-encoding: chunked\r\n\r\n"
            .to_vec();
        for id in 1..=3 {
            let event = format!("id: {id}\ndata: {id}\n\n");
            write!(response, "{:x}\r\n{event}\r\n", event.len()).unwrap();
        }
        socket.write_all(&response).unwrap();
        // Hold the connection open until the client is done.
        let _ = socket.read(&mut byte);
    });
    let chunk = smol::block_on(async {
        let url = format!("http://{addr}/events");
        let request = ConnectRequest {
            url: &url,
            headers: &[],
            last_event_id: None,
            body: None,
        };
        let mut body = HttpConnector::default().connect(request).await.unwrap();
        body.next().await.unwrap().unwrap()
    });
    assert_eq!(
        &chunk[..],
        b"id: 1\ndata: 1\n\nid: 2\ndata: 2\n\nid: 3\ndata: 3\n\n"
    );
    server.join().unwrap();
}
