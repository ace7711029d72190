//! The worker's small HTTP listener: `/healthz` (the process answers),
//! `/readyz` (broker taking publishes, Redis taking writes) and
//! `/metrics` (Prometheus text).
//! It is often bound to every interface (for the kubelet and Prometheus),
//! so it runs on core's hardened listener: a client that never finishes a
//! request, or opens hundreds of connections, cannot take the descriptors
//! the worker's SMTP, broker and Redis connections need.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use mailroom_core::amqp::{Broker, Readiness};
use mailroom_core::listener::{self, Limits, Plain};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use mailroom_core::store::RedisStore;

/// Probes and scrapes need few connections, and answer at once.
const LIMITS: Limits = Limits {
    max_connections: 128,
    header_timeout: Duration::from_secs(10),
};

#[derive(Clone)]
struct Probe {
    consumer: Broker,
    publisher: Broker,
    store: RedisStore,
    metrics: Option<PrometheusHandle>,
    stopping: CancellationToken,
}

/// Where the health endpoints listen, and until when.
pub struct Serve {
    /// The address to bind (port 0 picks a free one).
    pub bind: SocketAddr,
    /// Cancelled when the worker starts to stop: `/readyz` says so from
    /// then on, while `/healthz` and `/metrics` still answer.
    pub stopping: CancellationToken,
    /// Cancelled once the worker has stopped: the listener closes.
    pub stopped: CancellationToken,
}

/// Serves the health endpoints as `serve` says. Returns the address bound.
pub async fn serve(
    serve: Serve,
    consumer: Broker,
    publisher: Broker,
    store: RedisStore,
    metrics: Option<PrometheusHandle>,
) -> std::io::Result<SocketAddr> {
    let Serve {
        bind,
        stopping,
        stopped,
    } = serve;
    let listener = tokio::net::TcpListener::bind(bind).await?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(render))
        .with_state(Probe {
            consumer,
            publisher,
            store,
            metrics,
            stopping,
        });
    tokio::spawn(async move {
        if let Err(err) = listener::serve(listener, app, LIMITS, Plain, stopped).await {
            tracing::error!(error = %err, "health listener stopped");
        }
    });
    Ok(local)
}

async fn ready(State(probe): State<Probe>) -> (StatusCode, String) {
    // Draining: in-flight jobs finish, no new ones are taken.
    if probe.stopping.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "stopping\n".to_owned());
    }
    // The pool reconnects its consumers itself; republishing needs the
    // other connection.
    let broker = if probe.consumer.is_connected() {
        probe.publisher.readiness()
    } else {
        Readiness::Down
    };
    listener::readyz(broker, probe.store.takes_writes().await.is_ok())
}

async fn render(State(probe): State<Probe>) -> (StatusCode, String) {
    match &probe.metrics {
        Some(handle) => (StatusCode::OK, handle.render()),
        None => (
            StatusCode::NOT_FOUND,
            "metrics recorder not installed\n".to_owned(),
        ),
    }
}
