//! CORS in `SseServer` over real HTTP on loopback: browsers on other origins
//! get `Access-Control-Allow-Origin: *` on every response and an answer to
//! their preflight; other methods stay 405.

use futures::{AsyncReadExt, AsyncWriteExt};
use std::net::SocketAddr;
use std::time::Duration;
use tidemark::{ServerConfig, SseServer};

/// Starts a server on a free port; it runs until the test process ends.
async fn start() -> SocketAddr {
    let config = ServerConfig {
        count: Some(3),
        interval: Duration::from_millis(1),
        ..ServerConfig::default()
    };
    let server = SseServer::bind("127.0.0.1:0".parse().unwrap(), config)
        .await
        .unwrap();
    let addr = server.local_addr().unwrap();
    smol::spawn(async move {
        server.run(futures::future::pending()).await.unwrap();
    })
    .detach();
    addr
}

/// Sends `head` (a request without body) and returns the status code and
/// the lowercased response header lines.
async fn exchange(addr: SocketAddr, head: &str) -> (u16, Vec<(String, String)>) {
    let mut stream = smol::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let mut byte = [0u8; 1];
    while !response.ends_with(b"\r\n\r\n") {
        let n = smol::future::or(stream.read(&mut byte), async {
            async_io::Timer::after(Duration::from_secs(5)).await;
            Ok(0)
        })
        .await
        .unwrap();
        assert_eq!(n, 1, "response head cut short: {response:?}");
        response.push(byte[0]);
    }
    let text = String::from_utf8(response).unwrap();
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap();
    let code = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    (code, headers)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

#[test]
fn preflight_is_answered_for_get_with_the_sse_and_mcp_headers() {
    smol::block_on(async {
        let addr = start().await;
        let (code, headers) = exchange(
            addr,
            "OPTIONS /events HTTP/1.1\r\nhost: x\r\norigin: http://127.0.0.1:9\r\n\
             access-control-request-method: GET\r\n\
             access-control-request-headers: last-event-id,authorization\r\n\r\n",
        )
        .await;
        assert_eq!(code, 204);
        assert_eq!(header(&headers, "access-control-allow-origin"), Some("*"));
        assert_eq!(
            header(&headers, "access-control-allow-methods"),
            Some("GET")
        );
        let allowed: Vec<String> = header(&headers, "access-control-allow-headers")
            .expect("allowed headers")
            .split(',')
            .map(|h| h.trim().to_ascii_lowercase())
            .collect();
        for needed in [
            "last-event-id",
            "authorization",
            "content-type",
            "cache-control",
            "mcp-session-id",
            "mcp-protocol-version",
        ] {
            assert!(allowed.iter().any(|h| h == needed), "{needed}: {allowed:?}");
        }
        let max_age: u64 = header(&headers, "access-control-max-age")
            .expect("max age")
            .parse()
            .unwrap();
        assert!(max_age > 0);
    });
}

#[test]
fn every_response_allows_any_origin() {
    smol::block_on(async {
        let addr = start().await;
        let (code, headers) = exchange(
            addr,
            "GET /events HTTP/1.1\r\nhost: x\r\norigin: http://127.0.0.1:9\r\n\r\n",
        )
        .await;
        assert_eq!(code, 200);
        assert_eq!(header(&headers, "content-type"), Some("text/event-stream"));
        assert_eq!(header(&headers, "access-control-allow-origin"), Some("*"));

        let (code, headers) = exchange(addr, "GET /nope HTTP/1.1\r\nhost: x\r\n\r\n").await;
        assert_eq!(code, 404);
        assert_eq!(header(&headers, "access-control-allow-origin"), Some("*"));

        // Methods other than GET and OPTIONS stay refused.
        let (code, headers) = exchange(
            addr,
            "POST /events HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n",
        )
        .await;
        assert_eq!(code, 405);
        assert_eq!(header(&headers, "access-control-allow-origin"), Some("*"));
    });
}
