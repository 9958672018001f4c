//! Redirects over real HTTP and TLS on 127.0.0.1: `Location` resolved as
//! RFC 3986 says, the caller's headers (credentials) sent only to the
//! original origin, never a downgrade from https to http, methods changed as
//! `fetch` changes them, and a bounded chain.

mod support {
    pub mod tls;
}

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use futures_rustls::TlsAcceptor;
use futures_rustls::rustls::RootCertStore;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tidemark::{HttpConnector, Method, SmolClock};
use tidemark_core::{
    ConnectRequest, Connector, EventTracker, Failure, GiveUp, ResumableStream, StreamConfig,
    StreamError, StreamKey,
};

/// Runs a test, failing it instead of hanging past 30 s.
fn run(test: impl Future<Output = ()>) {
    smol::block_on(smol::future::or(test, async {
        async_io::Timer::after(Duration::from_secs(30)).await;
        panic!("the test did not finish within 30 s");
    }))
}

/// One request a test server received.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    target: String,
    /// Names in lower case.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What a test server answers.
enum Answer {
    /// A redirect with this status and `Location`.
    Redirect(u16, String),
    /// A 200 `text/event-stream` with one event of this data.
    Event(&'static str),
}

/// A listening socket on 127.0.0.1 and its port, bound before its server
/// starts so that servers can redirect to each other.
async fn bind() -> (smol::net::TcpListener, u16) {
    let listener = smol::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    (listener, port)
}

/// A test server: what it received, in order.
struct Server {
    seen: async_channel::Receiver<Seen>,
}

impl Server {
    /// The requests received so far. Each is recorded before it is
    /// answered, so once the client has its answer, all are here.
    fn requests(&self) -> Vec<Seen> {
        std::iter::from_fn(|| self.seen.try_recv().ok()).collect()
    }
}

/// Serves `listener`, over TLS with `tls`, answering each request (one per
/// connection) with `answer`.
fn serve(
    listener: smol::net::TcpListener,
    tls: Option<TlsAcceptor>,
    answer: impl Fn(&Seen) -> Answer + Send + Sync + 'static,
) -> Server {
    let (record, seen) = async_channel::unbounded();
    let answer = Arc::new(answer);
    smol::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (record, answer, tls) = (record.clone(), answer.clone(), tls.clone());
            smol::spawn(async move {
                match tls {
                    None => exchange(stream, &record, &*answer).await,
                    Some(acceptor) => {
                        if let Ok(stream) = acceptor.accept(stream).await {
                            exchange(stream, &record, &*answer).await;
                        }
                    }
                }
            })
            .detach();
        }
    })
    .detach();
    Server { seen }
}

/// Reads one request from `io`, records it, and answers it.
async fn exchange(
    mut io: impl AsyncRead + AsyncWrite + Unpin,
    record: &async_channel::Sender<Seen>,
    answer: &(dyn Fn(&Seen) -> Answer + Send + Sync),
) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if io.read(&mut byte).await.unwrap_or(0) == 0 {
            return;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap().split(' ');
    let method = request_line.next().unwrap().to_owned();
    let target = request_line.next().unwrap().to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    let length = headers
        .iter()
        .find(|(name, _)| name == "content-length")
        .map_or(0, |(_, value)| value.parse().unwrap());
    let mut body = vec![0u8; length];
    if io.read_exact(&mut body).await.is_err() {
        return;
    }
    let seen = Seen {
        method,
        target,
        headers,
        body,
    };
    let response = match answer(&seen) {
        Answer::Redirect(status, location) => format!(
            "HTTP/1.1 {status} Redirect\r\nlocation: {location}\r\n\
             content-length: 0\r\nconnection: close\r\n\r\n"
        ),
        Answer::Event(data) => {
            let body = format!("id: 1\ndata: {data}\n\n");
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
        }
    };
    let _ = record.send(seen).await;
    let _ = io.write_all(response.as_bytes()).await;
    let _ = io.close().await;
}

/// A TLS acceptor with a fresh certificate for 127.0.0.1, and roots that
/// trust it.
fn tls_fixture() -> (TlsAcceptor, RootCertStore) {
    let (acceptor, cert) = support::tls::self_signed("127.0.0.1");
    let mut roots = RootCertStore::empty();
    roots.add(cert).unwrap();
    (acceptor, roots)
}

fn connector(roots: RootCertStore) -> HttpConnector {
    let mut connector = HttpConnector::with_roots(roots);
    connector.connect_timeout = Duration::from_secs(5);
    connector
}

/// What the CLI's `-H` would give: an Authorization, a Cookie and an API
/// key.
fn credentials() -> Vec<(String, String)> {
    [
        ("Authorization", "Bearer secret"),
        ("Cookie", "session=s1"),
        ("X-Api-Key", "k1"),
    ]
    .map(|(name, value)| (name.to_owned(), value.to_owned()))
    .to_vec()
}

/// Connects to `url` as a stream would (with `Last-Event-ID: 7` and the
/// credentials) and reads the whole body.
async fn get(connector: &HttpConnector, url: &str) -> Result<String, Failure> {
    let headers = credentials();
    let mut body = connector
        .connect(ConnectRequest {
            url,
            headers: &headers,
            last_event_id: Some("7"),
            body: None,
        })
        .await?;
    let mut bytes = Vec::new();
    while let Some(chunk) = body.next().await {
        bytes.extend_from_slice(&chunk?);
    }
    Ok(String::from_utf8(bytes).unwrap())
}

#[track_caller]
fn assert_credentials(seen: &Seen) {
    assert_eq!(
        seen.header("authorization"),
        Some("Bearer secret"),
        "{seen:?}"
    );
    assert_eq!(seen.header("cookie"), Some("session=s1"), "{seen:?}");
    assert_eq!(seen.header("x-api-key"), Some("k1"), "{seen:?}");
}

/// No credentials, but every protocol header, `Host` naming `port`.
#[track_caller]
fn assert_protocol_only(seen: &Seen, port: u16) {
    for name in ["authorization", "cookie", "x-api-key"] {
        assert_eq!(seen.header(name), None, "{name} went to another origin");
    }
    assert_eq!(seen.header("host"), Some(&*format!("127.0.0.1:{port}")));
    assert_eq!(seen.header("accept"), Some("text/event-stream"));
    assert_eq!(seen.header("cache-control"), Some("no-cache"));
    assert_eq!(seen.header("last-event-id"), Some("7"));
}

fn targets(requests: &[Seen]) -> Vec<&str> {
    requests.iter().map(|seen| seen.target.as_str()).collect()
}

/// Follows a redirect from `start` on one plain server whose redirect
/// answers `location` with `status`, then serves `/` paths as events.
/// Returns what the client read and the targets the server saw; asserts that
/// every request carried the credentials.
async fn same_origin(status: u16, start: &str, location: &'static str) -> (String, Vec<String>) {
    let (listener, port) = bind().await;
    let start_target = start.to_owned();
    let server = serve(listener, None, move |seen| {
        if seen.target == start_target {
            Answer::Redirect(status, location.replace("{port}", &port.to_string()))
        } else {
            Answer::Event("arrived")
        }
    });
    let body = get(
        &connector(RootCertStore::empty()),
        &format!("http://127.0.0.1:{port}{start}"),
    )
    .await
    .unwrap();
    let requests = server.requests();
    for seen in &requests {
        assert_credentials(seen);
        assert_eq!(seen.header("host"), Some(&*format!("127.0.0.1:{port}")));
    }
    let targets = targets(&requests).into_iter().map(str::to_owned).collect();
    (body, targets)
}

#[test]
fn a_relative_path_replaces_the_last_segment() {
    run(async {
        let (body, targets) = same_origin(302, "/a/b/start?x=1", "next").await;
        assert!(body.contains("data: arrived"), "{body}");
        assert_eq!(targets, ["/a/b/start?x=1", "/a/b/next"]);
    });
}

#[test]
fn a_dot_dot_path_goes_up_a_segment() {
    run(async {
        let (body, targets) = same_origin(307, "/a/b/start", "../x").await;
        assert!(body.contains("data: arrived"), "{body}");
        assert_eq!(targets, ["/a/b/start", "/a/x"]);
    });
}

#[test]
fn a_query_only_reference_keeps_the_path() {
    run(async {
        let (body, targets) = same_origin(303, "/list?page=1", "?page=2").await;
        assert!(body.contains("data: arrived"), "{body}");
        assert_eq!(targets, ["/list?page=1", "/list?page=2"]);
    });
}

#[test]
fn an_absolute_url_on_the_same_origin_keeps_the_credentials() {
    run(async {
        let (body, targets) = same_origin(308, "/old", "http://127.0.0.1:{port}/new").await;
        assert!(body.contains("data: arrived"), "{body}");
        assert_eq!(targets, ["/old", "/new"]);
    });
}

#[test]
fn a_network_path_reference_to_another_port_is_another_origin() {
    run(async {
        let (first, a) = bind().await;
        let (second, b) = bind().await;
        let origin = serve(first, None, move |_| {
            Answer::Redirect(302, format!("//127.0.0.1:{b}/elsewhere?q=1"))
        });
        let other = serve(second, None, |_| Answer::Event("other"));
        let body = get(
            &connector(RootCertStore::empty()),
            &format!("http://127.0.0.1:{a}/events"),
        )
        .await
        .unwrap();
        assert!(body.contains("data: other"), "{body}");
        let asked = origin.requests();
        assert_eq!(targets(&asked), ["/events"]);
        assert_credentials(&asked[0]);
        let redirected = other.requests();
        assert_eq!(targets(&redirected), ["/elsewhere?q=1"]);
        assert_protocol_only(&redirected[0], b);
    });
}

#[test]
fn credentials_stay_behind_from_the_first_hop_off_the_origin_on() {
    run(async {
        let (first, a) = bind().await;
        let (second, b) = bind().await;
        let origin = serve(first, None, move |seen| match seen.target.as_str() {
            "/events" => Answer::Redirect(301, format!("http://127.0.0.1:{b}/hop")),
            _ => Answer::Event("back"),
        });
        let other = serve(second, None, move |_| {
            Answer::Redirect(302, format!("http://127.0.0.1:{a}/back"))
        });
        let body = get(
            &connector(RootCertStore::empty()),
            &format!("http://127.0.0.1:{a}/events"),
        )
        .await
        .unwrap();
        assert!(body.contains("data: back"), "{body}");
        let at_origin = origin.requests();
        assert_eq!(targets(&at_origin), ["/events", "/back"]);
        assert_credentials(&at_origin[0]);
        // Back on the original origin, but by way of another one: the path
        // was chosen by the other origin, so no credentials.
        assert_protocol_only(&at_origin[1], a);
        let elsewhere = other.requests();
        assert_eq!(targets(&elsewhere), ["/hop"]);
        assert_protocol_only(&elsewhere[0], b);
    });
}

#[test]
fn https_redirects_on_the_same_origin_keep_the_credentials() {
    run(async {
        let (acceptor, roots) = tls_fixture();
        let (listener, port) = bind().await;
        let server = serve(listener, Some(acceptor), move |seen| {
            match seen.target.as_str() {
                "/events" => Answer::Redirect(302, format!("https://127.0.0.1:{port}/a/b")),
                "/a/b" => Answer::Redirect(307, "c".into()),
                _ => Answer::Event("secure"),
            }
        });
        let body = get(
            &connector(roots),
            &format!("https://127.0.0.1:{port}/events"),
        )
        .await
        .unwrap();
        assert!(body.contains("data: secure"), "{body}");
        let requests = server.requests();
        assert_eq!(targets(&requests), ["/events", "/a/b", "/a/c"]);
        requests.iter().for_each(assert_credentials);
    });
}

#[test]
fn https_to_another_https_origin_drops_the_credentials() {
    run(async {
        let (acceptor, roots) = tls_fixture();
        let (first, a) = bind().await;
        let (second, b) = bind().await;
        let origin = serve(first, Some(acceptor.clone()), move |_| {
            Answer::Redirect(302, format!("https://127.0.0.1:{b}/events"))
        });
        let other = serve(second, Some(acceptor), |_| Answer::Event("other"));
        let body = get(&connector(roots), &format!("https://127.0.0.1:{a}/events"))
            .await
            .unwrap();
        assert!(body.contains("data: other"), "{body}");
        assert_credentials(&origin.requests()[0]);
        let redirected = other.requests();
        assert_eq!(targets(&redirected), ["/events"]);
        assert_protocol_only(&redirected[0], b);
    });
}

#[test]
fn https_to_http_is_refused_permanently() {
    run(async {
        let (acceptor, roots) = tls_fixture();
        let (secure, s) = bind().await;
        let (plain, p) = bind().await;
        // The same host and port in clear text, and another port.
        let origin = serve(secure, Some(acceptor), move |seen| {
            match seen.target.as_str() {
                "/same-port" => Answer::Redirect(301, format!("http://127.0.0.1:{s}/events")),
                _ => Answer::Redirect(302, format!("http://127.0.0.1:{p}/events")),
            }
        });
        let clear = serve(plain, None, |_| Answer::Event("clear text"));
        let connector = connector(roots);
        for path in ["/same-port", "/other-port"] {
            let error = get(&connector, &format!("https://127.0.0.1:{s}{path}"))
                .await
                .unwrap_err();
            let Failure::Request(message) = &error else {
                panic!("expected a request failure, got {error:?}");
            };
            assert!(
                message.starts_with("refusing a redirect from https to http: "),
                "{message}"
            );
            assert!(!error.is_retryable());
        }
        assert_eq!(targets(&origin.requests()), ["/same-port", "/other-port"]);

        // A stream stops at once instead of retrying.
        let tracker = EventTracker::new(StreamKey::new("t", "downgrade"), Default::default());
        let mut stream = ResumableStream::new(
            connector,
            SmolClock::new(),
            format!("https://127.0.0.1:{s}/events"),
            tracker,
            StreamConfig::default(),
        );
        let error = stream.next_event().await.unwrap_err();
        assert!(
            matches!(
                &error,
                StreamError::GaveUp(GiveUp::Permanent(Failure::Request(m)))
                    if m.contains("from https to http")
            ),
            "{error:?}"
        );
        assert_eq!(targets(&origin.requests()), ["/events"]);
        assert!(
            clear.requests().is_empty(),
            "nothing may be sent in clear text"
        );
    });
}

#[test]
fn a_redirect_chain_longer_than_max_redirects_fails_permanently() {
    run(async {
        let (listener, port) = bind().await;
        let server = serve(listener, None, |_| Answer::Redirect(307, "/again".into()));
        let mut connector = connector(RootCertStore::empty());
        connector.max_redirects = 3;
        let error = get(&connector, &format!("http://127.0.0.1:{port}/events"))
            .await
            .unwrap_err();
        assert!(
            matches!(&error, Failure::Request(m) if m.ends_with("more than 3 redirects")),
            "{error:?}"
        );
        assert!(!error.is_retryable());
        assert_eq!(
            targets(&server.requests()),
            ["/events", "/again", "/again", "/again"]
        );
    });
}

/// The headers `tidemark mcp` sends with a JSON-RPC POST.
fn post_headers() -> Vec<(String, String)> {
    [
        ("accept", "application/json, text/event-stream"),
        ("content-type", "application/json"),
        ("mcp-session-id", "s1"),
        ("authorization", "Bearer secret"),
    ]
    .map(|(name, value)| (name.to_owned(), value.to_owned()))
    .to_vec()
}

#[test]
fn methods_change_on_redirects_as_fetch_changes_them() {
    run(async {
        let (listener, port) = bind().await;
        let server = serve(listener, None, |seen| match seen.target.as_str() {
            "/answer" => Answer::Event("answer"),
            status => Answer::Redirect(status[1..].parse().unwrap(), "/answer".into()),
        });
        let connector = connector(RootCertStore::empty());
        let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call"}"#;
        // (method, status, the method of the request redirected to)
        let cases = [
            (Method::POST, 307, Method::POST),
            (Method::POST, 308, Method::POST),
            (Method::POST, 301, Method::GET),
            (Method::POST, 302, Method::GET),
            (Method::POST, 303, Method::GET),
            (Method::DELETE, 302, Method::DELETE),
            (Method::DELETE, 303, Method::GET),
        ];
        for (method, status, then) in cases {
            let response = connector
                .request(
                    method.clone(),
                    &format!("http://127.0.0.1:{port}/{status}"),
                    &post_headers(),
                    body.into(),
                )
                .await
                .unwrap();
            assert_eq!(response.status, 200);
            let requests = server.requests();
            let [first, redirected] = &requests[..] else {
                panic!("{method} {status}: {requests:?}");
            };
            assert_eq!(first.method, method.as_str());
            assert_eq!(first.body, body.as_bytes());
            assert_eq!(redirected.method, then.as_str(), "{method} {status}");
            if then == method {
                assert_eq!(redirected.body, body.as_bytes(), "{method} {status}");
                assert_eq!(redirected.header("content-type"), Some("application/json"));
            } else {
                assert!(redirected.body.is_empty(), "{method} {status}");
                assert_eq!(redirected.header("content-type"), None, "{method} {status}");
            }
            // Same origin: the session and the credentials go along.
            assert_eq!(redirected.header("mcp-session-id"), Some("s1"));
            assert_eq!(redirected.header("authorization"), Some("Bearer secret"));
            assert_eq!(
                redirected.header("accept"),
                Some("application/json, text/event-stream")
            );
        }
    });
}

#[test]
fn a_post_redirected_to_another_origin_keeps_its_body_but_not_its_credentials() {
    run(async {
        let (first, a) = bind().await;
        let (second, b) = bind().await;
        let _origin = serve(first, None, move |_| {
            Answer::Redirect(307, format!("http://127.0.0.1:{b}/mcp"))
        });
        let other = serve(second, None, |_| Answer::Event("answer"));
        let response = connector(RootCertStore::empty())
            .request(
                Method::POST,
                &format!("http://127.0.0.1:{a}/mcp"),
                &post_headers(),
                "{}".into(),
            )
            .await
            .unwrap();
        assert_eq!(response.status, 200);
        let requests = other.requests();
        let [redirected] = &requests[..] else {
            panic!("{requests:?}");
        };
        assert_eq!(redirected.method, "POST");
        assert_eq!(redirected.body, b"{}");
        assert_eq!(redirected.header("content-type"), Some("application/json"));
        assert_eq!(
            redirected.header("accept"),
            Some("application/json, text/event-stream")
        );
        assert_eq!(redirected.header("host"), Some(&*format!("127.0.0.1:{b}")));
        assert_eq!(redirected.header("mcp-session-id"), None);
        assert_eq!(redirected.header("authorization"), None);
    });
}

#[test]
fn a_password_in_the_url_is_refused_without_being_echoed() {
    run(async {
        let error = get(
            &connector(RootCertStore::empty()),
            "http://user:hunter2@127.0.0.1:9/events",
        )
        .await
        .unwrap_err();
        let Failure::Request(message) = &error else {
            panic!("expected a request failure, got {error:?}");
        };
        assert!(message.contains("user name or password"), "{message}");
        assert!(!message.contains("hunter2"), "{message}");
    });
}
