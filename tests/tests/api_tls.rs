//! The API serving HTTPS itself, and picking up a renewed certificate.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mailroom_producer::api::Api;
use mailroom_tests::rabbit::TestVhost;
use mailroom_tests::redis::TestPrefix;
use mailroom_tests::smtp::certificates;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

/// GET /healthz over TLS trusting only `ca`; the response, or the error.
async fn get_healthz(port: u16, ca: &std::path::Path) -> Result<String, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| e.to_string())? {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut response = String::new();
    tls.read_to_string(&mut response)
        .await
        .map_err(|e| e.to_string())?;
    Ok(response)
}

#[tokio::test]
async fn the_api_serves_https_and_reloads_a_renewed_certificate() {
    let vhost = TestVhost::new("api-tls");
    let redis = TestPrefix::new("api-tls");
    let dir = tempfile::tempdir().expect("dir");
    let first = tempfile::tempdir().expect("dir");
    let (ca, cert, key) = certificates(first.path());
    let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::copy(&cert, &cert_path).expect("copy");
    std::fs::copy(&key, &key_path).expect("copy");

    let mut settings = mailroom_tests::stack::base_settings(&vhost, &redis);
    settings.api.tls_cert_file = Some(cert_path.clone());
    settings.api.tls_key_file = Some(key_path.clone());
    let api = Api::connect(&settings).await.expect("api");
    assert!(api.serves_tls());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(api.serve(listener, shutdown.clone()));

    let response = get_healthz(port, &ca).await.expect("https works");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    // Renew: a certificate from another CA replaces the files.
    let second = tempfile::tempdir().expect("dir");
    let (new_ca, new_cert, new_key) = certificates(second.path());
    std::fs::copy(&new_cert, &cert_path).expect("copy");
    std::fs::copy(&new_key, &key_path).expect("copy");
    let start = Instant::now();
    loop {
        if get_healthz(port, &new_ca).await.is_ok() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "renewed certificate not picked up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        get_healthz(port, &ca).await.is_err(),
        "the old certificate is still served"
    );

    shutdown.cancel();
    server.await.expect("join").expect("served");
}

#[tokio::test]
async fn half_a_tls_setting_or_a_bad_file_stops_start_up() {
    let vhost = TestVhost::new("api-tls-bad");
    let redis = TestPrefix::new("api-tls-bad");
    let dir = tempfile::tempdir().expect("dir");
    let mut settings = mailroom_tests::stack::base_settings(&vhost, &redis);
    settings.api.tls_cert_file = Some(dir.path().join("missing.crt"));
    let half = Api::connect(&settings)
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(half.contains("both"), "{half}");
    settings.api.tls_key_file = Some(dir.path().join("missing.key"));
    let missing = Api::connect(&settings)
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(missing.contains("missing.crt"), "{missing}");
}
