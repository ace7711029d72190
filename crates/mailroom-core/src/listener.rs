//! The HTTP/1.1 listener behind the API and the worker's health port:
//! accepts at most `max_connections` connections at once, completes a
//! [`Handshake`] (TLS for the API when it serves HTTPS itself), and serves
//! each with a deadline for every request's headers and a cap on what it
//! buffers. The deadline also closes an idle keep-alive connection, so a
//! client that sends slowly, or not at all, cannot hold a connection (and a
//! descriptor) for ever; the cap keeps oversized headers from pinning
//! memory. Writes that make no progress for as long fail too, so neither
//! can a client that stops reading its answers.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The most a connection buffers while reading: a request line and headers
/// larger than this are answered 431 (16 KiB, Node.js's default too).
/// hyper's default (~400 KiB) would let many clients pin gigabytes with
/// oversized headers; bodies stream through the buffer.
const MAX_BUFFER: usize = 16 * 1024;

/// Requests in flight get this long to finish on shutdown.
const DRAIN: Duration = Duration::from_secs(25);

/// What a listener allows its clients.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// How long a client has to send a request's headers, how long an
    /// idle keep-alive connection is kept, and how long an answer may wait
    /// for the client to read it.
    pub header_timeout: Duration,
}

/// What is done with an accepted connection before HTTP is spoken on it.
pub trait Handshake: Send + Sync + 'static {
    /// The stream HTTP runs over.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The stream for `tcp`, or `None` to drop the connection.
    fn handshake(&self, tcp: TcpStream) -> impl Future<Output = Option<Self::Io>> + Send;
}

/// Plain HTTP: no handshake.
#[derive(Clone, Copy, Debug)]
pub struct Plain;

impl Handshake for Plain {
    type Io = TcpStream;

    async fn handshake(&self, tcp: TcpStream) -> Option<TcpStream> {
        Some(tcp)
    }
}

/// Serves `router` on `listener` until `shutdown`, then lets requests in
/// flight finish (for up to 25 s). Handlers see the peer as
/// `ConnectInfo<SocketAddr>`.
pub async fn serve<H: Handshake>(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    handshake: H,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let handshake = Arc::new(handshake);
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
        let service = router
            .clone()
            .layer(axum::Extension(ConnectInfo::<SocketAddr>(peer)));
        let (handshake, shutdown) = (Arc::clone(&handshake), shutdown.clone());
        connections.spawn(async move {
            let _slot = slot;
            if let Some(io) = handshake.handshake(tcp).await {
                serve_connection(io, service, limits.header_timeout, shutdown).await;
            }
        });
    }
    connections.close();
    let _ = tokio::time::timeout(DRAIN, connections.wait()).await;
    Ok(())
}

async fn serve_connection<I>(
    io: I,
    service: Router,
    header_timeout: Duration,
    shutdown: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(MAX_BUFFER)
        .serve_connection(
            TokioIo::new(WriteDeadline::new(io, header_timeout)),
            TowerToHyperService::new(service),
        );
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        () = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}

/// A stream whose writes fail once they have made no progress for `limit`.
/// Without it a client that sends pipelined requests and never reads the
/// answers holds its connection, and the kernel's send buffer (megabytes),
/// for as long as it likes: no other timeout covers a stalled write.
struct WriteDeadline<I> {
    io: I,
    limit: Duration,
    /// Running while a write waits.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<I> WriteDeadline<I> {
    fn new(io: I, limit: Duration) -> Self {
        Self {
            io,
            limit,
            stalled: None,
        }
    }

    /// What a write that returned `polled` gives: its result once it made
    /// progress, an error once it has waited `limit`.
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let limit = self.limit;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client stopped reading its answers",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for WriteDeadline<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.watch(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.watch(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_shutdown(cx);
        self.watch(cx, polled)
    }
}

/// The answer of `/readyz` (the API's and the worker's): `200` when the
/// broker takes publishes and Redis takes writes, else `503`; the body
/// says which is which.
pub fn readyz(broker: crate::amqp::Readiness, redis: bool) -> (axum::http::StatusCode, String) {
    let ready = broker == crate::amqp::Readiness::Up && redis;
    let status = if ready {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    };
    let redis = if redis { "up" } else { "down" };
    (
        status,
        format!("broker {}\nredis {redis}\n", broker.as_str()),
    )
}
