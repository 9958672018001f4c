//! Hostile and broken servers over real TCP on loopback: each gets the
//! defined behaviour of the core policy, with bounded memory.

use futures::{AsyncReadExt, AsyncWriteExt};
use std::net::SocketAddr;
use std::time::Duration;
use tidemark::{HttpConnector, SmolClock};
use tidemark_core::reconnect::ReconnectConfig;
use tidemark_core::sse::{Limits, ParseError};
use tidemark_core::{
    Backoff, EventTracker, Failure, GiveUp, Millis, ResumableStream, StreamConfig, StreamError,
    StreamKey,
};

const SSE_HEADERS: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";

/// Writes `data` as one HTTP/1.1 chunk.
async fn chunk(stream: &mut smol::net::TcpStream, data: &[u8]) -> std::io::Result<()> {
    stream
        .write_all(format!("{:x}\r\n", data.len()).as_bytes())
        .await?;
    stream.write_all(data).await?;
    stream.write_all(b"\r\n").await
}

/// A server that answers every connection with `respond`, given the request
/// head.
async fn raw_server<F, Fut>(respond: F) -> SocketAddr
where
    F: Fn(smol::net::TcpStream, String) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = smol::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    smol::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                    break;
                }
                head.push(byte[0]);
            }
            let head = String::from_utf8_lossy(&head).into_owned();
            smol::spawn(respond(stream, head)).detach();
        }
    })
    .detach();
    addr
}

fn stream_of(addr: SocketAddr, config: StreamConfig) -> ResumableStream<HttpConnector, SmolClock> {
    let tracker = EventTracker::new(StreamKey::new("t", "hostile"), Default::default());
    ResumableStream::new(
        HttpConnector::default(),
        SmolClock::new(),
        format!("http://{addr}/events"),
        tracker,
        config,
    )
}

fn quick(max_attempts: u32, idle: Millis) -> StreamConfig {
    StreamConfig {
        reconnect: ReconnectConfig {
            backoff: Backoff {
                initial: Millis(5),
                max: Millis(20),
            },
            max_attempts: Some(max_attempts),
            idle_timeout: idle,
            ..ReconnectConfig::default()
        },
        ..StreamConfig::default()
    }
}

#[test]
fn a_wrong_content_type_stops_at_once() {
    smol::block_on(async {
        let addr = raw_server(|mut s, _| async move {
            let _ = s
                .write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: 2\r\n\r\nhi",
                )
                .await;
        })
        .await;
        let error = stream_of(addr, quick(3, Millis(1000)))
            .next()
            .await
            .unwrap_err();
        assert_eq!(
            error,
            StreamError::GaveUp(GiveUp::Permanent(Failure::ContentType("text/html".into())))
        );
    });
}

#[test]
fn a_server_that_sends_nothing_is_dropped_by_the_watchdog_then_given_up() {
    smol::block_on(async {
        let addr = raw_server(|mut s, _| async move {
            let _ = s.write_all(SSE_HEADERS).await;
            async_io::Timer::after(Duration::from_secs(60)).await;
        })
        .await;
        let mut stream = stream_of(addr, quick(2, Millis(150)));
        let error = stream.next().await.unwrap_err();
        match error {
            StreamError::GaveUp(GiveUp::Exhausted { attempts, last }) => {
                assert_eq!(attempts, 2);
                assert_eq!(last, Failure::Idle(Millis(150)));
            }
            other => panic!("expected to give up on a silent server, got {other:?}"),
        }
        assert_eq!(stream.stats().connects, 2);
    });
}

#[test]
fn a_line_that_never_ends_stops_the_stream_at_the_cap() {
    smol::block_on(async {
        let addr = raw_server(|mut s, _| async move {
            let _ = s.write_all(SSE_HEADERS).await;
            let _ = chunk(&mut s, b"id: 1\ndata: fine\n\ndata: ").await;
            let block = vec![b'x'; 64 * 1024];
            // 64 MiB at most: the client must give up long before.
            for _ in 0..1024 {
                if chunk(&mut s, &block).await.is_err() {
                    return;
                }
            }
        })
        .await;
        let mut config = quick(3, Millis(5000));
        config.limits = Limits {
            max_line: 1 << 20,
            max_event: 1 << 20,
        };
        let mut stream = stream_of(addr, config);
        assert_eq!(stream.next().await.unwrap().data, "fine");
        let error = stream.next().await.unwrap_err();
        assert!(
            matches!(
                error,
                StreamError::Parse(ParseError::LineTooLong { limit: 1048576 })
            ),
            "{error:?}"
        );
        assert!(
            stream.stats().bytes < 4 << 20,
            "stopped soon after the cap: {} bytes read",
            stream.stats().bytes
        );
        assert_eq!(
            stream.last_event_id(),
            Some("1"),
            "the cursor stays before the bad data"
        );
    });
}

#[test]
fn invalid_utf8_arrives_with_replacement_characters() {
    smol::block_on(async {
        let addr = raw_server(|mut s, _| async move {
            let _ = s.write_all(SSE_HEADERS).await;
            let _ = chunk(&mut s, b"id: 1\ndata: \xff\xfe ok\n\n").await;
            async_io::Timer::after(Duration::from_secs(60)).await;
        })
        .await;
        let event = stream_of(addr, quick(3, Millis(5000)))
            .next()
            .await
            .unwrap();
        assert_eq!(event.data, "\u{FFFD}\u{FFFD} ok");
    });
}
