//! Hostile, broken and busy servers over real TCP on loopback: each gets the
//! defined behaviour of the core policy, with bounded memory.

use futures::{AsyncReadExt, AsyncWriteExt};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tidemark::{HttpConnector, SmolClock};
use tidemark_core::reconnect::ReconnectConfig;
use tidemark_core::sse::{Limits, ParseError};
use tidemark_core::{
    Backoff, ConnectRequest, Connector, EventTracker, Failure, GiveUp, Millis, ResumableStream,
    StreamConfig, StreamError, StreamKey,
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
            .next_event()
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
        let error = stream.next_event().await.unwrap_err();
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
        assert_eq!(stream.next_event().await.unwrap().data, "fine");
        let error = stream.next_event().await.unwrap_err();
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
            .next_event()
            .await
            .unwrap();
        assert_eq!(event.data, "\u{FFFD}\u{FFFD} ok");
    });
}

#[test]
fn a_503_with_an_http_date_in_retry_after_is_retried_no_sooner() {
    smol::block_on(async {
        // Whole seconds (HTTP dates have no fractions), 2 to 3 s ahead.
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let date = UNIX_EPOCH + Duration::from_secs(now.as_secs() + 3);
        let (arrivals, arrived) = async_channel::unbounded::<SystemTime>();
        let addr = raw_server(move |mut s, _| {
            let arrivals = arrivals.clone();
            async move {
                let at = SystemTime::now();
                let _ = arrivals.send(at).await;
                if at < date {
                    let busy = format!(
                        "HTTP/1.1 503 Service Unavailable\r\nretry-after: {}\r\n\
                         content-length: 0\r\n\r\n",
                        httpdate::fmt_http_date(date)
                    );
                    let _ = s.write_all(busy.as_bytes()).await;
                    return;
                }
                let _ = s.write_all(SSE_HEADERS).await;
                let _ = chunk(&mut s, b"id: 1\ndata: later\n\n").await;
                async_io::Timer::after(Duration::from_secs(60)).await;
            }
        })
        .await;

        // The connector turns the date into a delay from now.
        let failure = HttpConnector::default()
            .connect(ConnectRequest {
                url: &format!("http://{addr}/events"),
                headers: &[],
                last_event_id: None,
                body: None,
            })
            .await
            .expect_err("a 503");
        let Failure::Status {
            code: 503,
            retry_after: Some(delay),
        } = failure
        else {
            panic!("expected a 503 with a delay, got {failure:?}");
        };
        assert!(
            delay > Millis(1000) && delay <= Millis(3000),
            "{delay} until a date 2 to 3 s ahead"
        );
        arrived.recv().await.unwrap();

        // The stream's backoff is 5 to 20 ms: only the date holds it back.
        let event = smol::future::or(
            stream_of(addr, quick(3, Millis(5000))).next_event(),
            async {
                async_io::Timer::after(Duration::from_secs(20)).await;
                panic!("no event within 20 s");
            },
        )
        .await
        .unwrap();
        assert_eq!(event.data, "later");
        let first = arrived.recv().await.unwrap();
        let second = arrived.recv().await.unwrap();
        assert!(first < date);
        assert!(
            second + Duration::from_millis(100) >= date,
            "retried {:?} before the date",
            date.duration_since(second).unwrap_or_default()
        );
        assert!(
            second < date + Duration::from_secs(10),
            "retried {:?} after the date",
            second.duration_since(date).unwrap_or_default()
        );
        assert!(arrived.is_empty(), "one retry, at the date");
    });
}
