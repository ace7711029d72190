//! The API's listener: core's [`listener`], with a TLS handshake when the
//! API serves HTTPS itself.

use std::time::Duration;

use axum::Router;
use mailroom_core::listener::{self, Handshake, Limits};
use mailroom_core::settings::ApiSettings;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;

use super::tls::Certificates;

/// A client has this long to finish its TLS handshake.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// Serves `router` on `listener` (over TLS with `tls`) until `shutdown`,
/// then lets requests in flight finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    settings: &ApiSettings,
    tls: Option<Certificates>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let limits = Limits {
        max_connections: settings.max_connections,
        header_timeout: settings.header_timeout,
    };
    listener::serve(listener, router, limits, MaybeTls(tls), shutdown).await
}

/// TLS with the certificates as they are now, or plain HTTP.
struct MaybeTls(Option<Certificates>);

impl Handshake for MaybeTls {
    type Io = Either<TcpStream, TlsStream<TcpStream>>;

    async fn handshake(&self, tcp: TcpStream) -> Option<Self::Io> {
        let Some(certificates) = &self.0 else {
            return Some(Either::Left(tcp));
        };
        let accept = certificates.acceptor().accept(tcp);
        match tokio::time::timeout(HANDSHAKE, accept).await {
            Ok(Ok(tls)) => Some(Either::Right(tls)),
            _ => None,
        }
    }
}
