//! A TLS acceptor with a certificate made for the test.

use futures_rustls::TlsAcceptor;
use futures_rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use futures_rustls::rustls::ServerConfig;
use std::sync::Arc;

/// An acceptor with a fresh self-signed certificate for `host`, and that
/// certificate (for the client's roots).
pub fn self_signed(host: &str) -> (TlsAcceptor, CertificateDer<'static>) {
    let certified = rcgen::generate_simple_self_signed(vec![host.into()]).unwrap();
    let cert = certified.cert.der().clone();
    let key = PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der());
    let provider = Arc::new(futures_rustls::rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key.into())
        .unwrap();
    (TlsAcceptor::from(Arc::new(config)), cert)
}
