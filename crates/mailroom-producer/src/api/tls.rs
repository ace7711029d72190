//! HTTPS served by the API itself: rustls with the certificate and key from
//! files, reloaded on SIGHUP and when the files change (a renewed
//! certificate is picked up without a restart). A reload that fails keeps
//! the old certificate and says why.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// How often the files are checked for a change.
const CHECK_EVERY: Duration = Duration::from_secs(5);

/// The certificate could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("api.tls_cert_file / api.tls_key_file: {0}")]
pub struct TlsError(String);

/// Where the certificate and key are.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// Certificate chain, PEM.
    pub cert: PathBuf,
    /// Private key, PEM.
    pub key: PathBuf,
}

impl TlsFiles {
    fn load(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.cert)
            .and_then(Iterator::collect)
            .map_err(|err| TlsError(format!("{}: {err}", self.cert.display())))?;
        if certs.is_empty() {
            return Err(TlsError(format!("{}: no certificate", self.cert.display())));
        }
        // The key's own error could quote key material: say only where.
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .map_err(|_| TlsError(format!("{}: no readable private key", self.key.display())))?;
        let mut config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|err| TlsError(err.to_string()))?
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .map_err(|err| TlsError(err.to_string()))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    fn modified(&self) -> Option<(SystemTime, SystemTime)> {
        let time = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
        Some((time(&self.cert)?, time(&self.key)?))
    }
}

/// Checks that the files load (at start-up, before anything is served).
pub fn check(files: &TlsFiles) -> Result<(), TlsError> {
    files.load().map(drop)
}

/// The certificate being served, replaced when the files change.
#[derive(Clone)]
pub struct Certificates(Arc<RwLock<Arc<ServerConfig>>>);

impl Certificates {
    /// Loads `files` and keeps them reloaded until `shutdown`.
    pub fn watch(files: TlsFiles, shutdown: CancellationToken) -> Result<Self, TlsError> {
        let certificates = Self(Arc::new(RwLock::new(files.load()?)));
        tokio::spawn(reload(files, Arc::clone(&certificates.0), shutdown));
        Ok(certificates)
    }

    /// An acceptor with the current certificate.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(Arc::clone(
            &self
                .0
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        ))
    }
}

/// Reloads the certificate on SIGHUP and when the files change.
async fn reload(
    files: TlsFiles,
    config: Arc<RwLock<Arc<ServerConfig>>>,
    shutdown: CancellationToken,
) {
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut seen = files.modified();
    loop {
        let signalled = tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(CHECK_EVERY) => false,
            Some(()) = async {
                match hangup.as_mut() {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            } => true,
        };
        let now = files.modified();
        if !signalled && now == seen {
            continue;
        }
        seen = now;
        match files.load() {
            Ok(fresh) => {
                *config
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = fresh;
                tracing::info!(signalled, "TLS certificate reloaded");
            }
            Err(err) => {
                tracing::warn!(error = %err, "TLS certificate not reloaded; keeping the old one");
            }
        }
    }
}
