//! https on loopback with a certificate generated for the test: trusted, it
//! streams; untrusted, the stream stops with a clear, permanent error.

mod support {
    pub mod tls;
}

use futures::{AsyncReadExt, AsyncWriteExt};
use futures_rustls::pki_types::CertificateDer;
use futures_rustls::rustls::RootCertStore;
use std::time::Duration;
use tidemark::{HttpConnector, SmolClock};
use tidemark_core::{
    EventTracker, Failure, GiveUp, ResumableStream, StreamConfig, StreamError, StreamKey,
};

/// An https server for `localhost` sending one event per connection.
async fn tls_server() -> (u16, CertificateDer<'static>) {
    let (acceptor, cert) = support::tls::self_signed("localhost");
    let listener = smol::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    smol::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            smol::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if tls.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let body = b"id: 1\ndata: secure\n\n";
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                     transfer-encoding: chunked\r\n\r\n{:x}\r\n",
                    body.len()
                );
                let _ = tls.write_all(response.as_bytes()).await;
                let _ = tls.write_all(body).await;
                let _ = tls.write_all(b"\r\n").await;
                let _ = tls.flush().await;
                async_io::Timer::after(Duration::from_secs(60)).await;
            })
            .detach();
        }
    })
    .detach();
    (port, cert)
}

fn stream(connector: HttpConnector, port: u16) -> ResumableStream<HttpConnector, SmolClock> {
    let tracker = EventTracker::new(StreamKey::new("t", "tls"), Default::default());
    ResumableStream::new(
        connector,
        SmolClock::new(),
        format!("https://localhost:{port}/events"),
        tracker,
        StreamConfig::default(),
    )
}

#[test]
fn https_streams_with_a_trusted_certificate_and_refuses_an_untrusted_one() {
    smol::block_on(async {
        let (port, cert) = tls_server().await;
        let mut roots = RootCertStore::empty();
        roots.add(cert).unwrap();
        let event = stream(HttpConnector::with_roots(roots), port)
            .next_event()
            .await
            .unwrap();
        assert_eq!(event.data, "secure");

        // The bundled public roots do not trust a self-signed certificate.
        let error = stream(HttpConnector::default(), port)
            .next_event()
            .await
            .unwrap_err();
        match error {
            StreamError::GaveUp(GiveUp::Permanent(Failure::Request(message))) => {
                assert!(message.contains("TLS with localhost"), "{message}");
            }
            other => panic!("expected a permanent TLS failure, got {other:?}"),
        }
    });
}
