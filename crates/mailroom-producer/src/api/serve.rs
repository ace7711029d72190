//! The listener: accepts at most `api.max_connections` connections at once,
//! completes a TLS handshake when the API serves HTTPS itself, and serves
//! HTTP/1.1 on each with a deadline for every request's headers. The same
//! deadline closes an idle keep-alive connection, so a client that sends
//! slowly, or not at all, cannot hold a connection (and a descriptor) for
//! ever.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use mailroom_core::settings::ApiSettings;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::tls::Certificates;

/// A client has this long to finish its TLS handshake.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// The most a connection buffers while reading: a request line and headers
/// larger than this are answered 431 (16 KiB, Node.js's default too).
/// hyper's default (~400 KiB) would let `api.max_connections` clients pin
/// gigabytes with oversized headers; bodies stream through the buffer and
/// are limited by `body_limit_bytes`.
const MAX_BUFFER: usize = 16 * 1024;

/// Requests in flight get this long to finish on shutdown.
const DRAIN: Duration = Duration::from_secs(25);

/// Serves `router` on `listener` (over TLS with `tls`) until `shutdown`,
/// then lets requests in flight finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    settings: &ApiSettings,
    tls: Option<Certificates>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(settings.max_connections.max(1)));
    let header_timeout = settings.header_timeout;
    let connections = TaskTracker::new();
    loop {
        let slot = tokio::select! {
            () = shutdown.cancelled() => break,
            slot = Arc::clone(&slots).acquire_owned() => slot.map_err(std::io::Error::other)?,
        };
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of descriptors and the like: back off, keep serving.
                tracing::warn!(error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Answers go out whole in one write; nothing gains from Nagle.
        let _ = tcp.set_nodelay(true);
        let connection = Connection {
            router: router.clone(),
            peer,
            header_timeout,
            shutdown: shutdown.clone(),
        };
        let acceptor = tls.as_ref().map(Certificates::acceptor);
        connections.spawn(async move {
            let _slot = slot;
            match acceptor {
                None => connection.serve(tcp).await,
                Some(acceptor) => {
                    if let Ok(Ok(tls)) = tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await
                    {
                        connection.serve(tls).await;
                    }
                }
            }
        });
    }
    connections.close();
    let _ = tokio::time::timeout(DRAIN, connections.wait()).await;
    Ok(())
}

/// One client connection.
struct Connection {
    router: Router,
    peer: SocketAddr,
    header_timeout: Duration,
    shutdown: CancellationToken,
}

impl Connection {
    async fn serve<I>(self, io: I)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let service = self
            .router
            .layer(axum::Extension(ConnectInfo::<SocketAddr>(self.peer)));
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_timeout)
            .max_buf_size(MAX_BUFFER)
            .serve_connection(TokioIo::new(io), TowerToHyperService::new(service));
        tokio::pin!(connection);
        tokio::select! {
            _ = connection.as_mut() => {}
            () = self.shutdown.cancelled() => {
                connection.as_mut().graceful_shutdown();
                let _ = connection.await;
            }
        }
    }
}
