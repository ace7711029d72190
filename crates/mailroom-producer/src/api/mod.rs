//! The HTTP API: authenticated, rate-limited, validated job ingestion.
//!
//! Routes: `POST /v1/messages`, `POST /v1/messages/batch`,
//! `GET /v1/messages/{id}`, `GET /healthz`, `GET /readyz`. Every answer
//! that is not a success is an RFC 9457 problem document ([`problem`]).
//! A message is answered `202` only after the broker confirmed it; when the
//! broker or Redis is out of reach the answer is `503` with `Retry-After`
//! and nothing was done.
//!
//! Every request leaves one access-log line (target `mailroom::access`):
//! request id, key id, tenant, route, status, latency, client IP and job
//! ids; never a recipient, a subject, a body or a key.

mod access;
mod auth;
mod body;
mod idempotency;
pub mod jwt;
pub mod keys;
mod messages;
mod network;
pub mod openapi;
pub mod problem;
mod queued;
mod schema;
mod serve;
mod spend;
pub mod tls;

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::middleware;
use axum::routing::{get, post};
use mailroom_core::budget::FairBudget;
use mailroom_core::ratelimit::RateLimiter;
use mailroom_core::settings::{ApiSettings, Settings, SettingsError};
use mailroom_core::status::StatusStore;
use mailroom_core::store::{RedisStore, StoreError};
use mailroom_core::validate::Limits;
use tokio_util::sync::CancellationToken;

use crate::{Producer, ProducerError};
pub use access::{LogFields, LogSlot};
use auth::Touches;
use idempotency::Idempotency;
use keys::ApiKeyStore;
pub use network::{BadCidr, NetworkPolicy, canonical_net, parse_cidr};
use problem::Problem;

/// Why the API could not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A setting is missing or wrong.
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// A CIDR setting does not parse.
    #[error(transparent)]
    Cidr(#[from] BadCidr),
    /// The broker could not be reached or set up.
    #[error(transparent)]
    Producer(#[from] ProducerError),
    /// Redis could not be reached.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// `[api.jwt]` is incomplete, or its keys unreadable.
    #[error(transparent)]
    Jwt(#[from] jwt::JwtSetupError),
    /// The TLS certificate or key could not be loaded.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// Only one of `api.tls_cert_file` and `api.tls_key_file` is set.
    #[error("set both api.tls_cert_file and api.tls_key_file, or neither")]
    TlsHalf,
}

/// The certificate and key `api` names, checked to load; `None` when it
/// names neither (plain HTTP behind an ingress).
pub fn tls_files(api: &ApiSettings) -> Result<Option<tls::TlsFiles>, ApiError> {
    let files = match (&api.tls_cert_file, &api.tls_key_file) {
        (Some(cert), Some(key)) => tls::TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
        },
        (None, None) => return Ok(None),
        _ => return Err(ApiError::TlsHalf),
    };
    tls::check(&files)?;
    Ok(Some(files))
}

/// Everything a request needs, shared by all of them.
pub struct ApiState {
    producer: Producer,
    store: RedisStore,
    keys: ApiKeyStore,
    jwt: Option<jwt::JwtVerifier>,
    spender: Arc<spend::Spender>,
    statuses: StatusStore,
    queued: queued::QueuedWriter,
    idempotency: Idempotency,
    network: NetworkPolicy,
    settings: ApiSettings,
    limits: Limits,
    touches: Touches,
    tls: Option<tls::TlsFiles>,
    /// `GET /openapi.json`'s answer, made once for this server's limits.
    openapi: Bytes,
    /// Request bodies in work (`api.max_inflight_bytes`), at most half of
    /// it for one tenant.
    bodies: FairBudget,
}

/// A connected API, ready to serve.
pub struct Api {
    state: Arc<ApiState>,
}

impl Api {
    /// Connects to the broker (declaring the topology) and Redis.
    pub async fn connect(settings: &Settings) -> Result<Self, ApiError> {
        let _ = mailroom_core::telemetry::prometheus();
        let network = NetworkPolicy::new(&settings.api.trusted_proxies, &settings.api.deny_cidrs)?;
        let hash_key = settings.hash_key()?.to_vec();
        let producer = Producer::connect(settings).await?;
        let store = RedisStore::connect(&settings.redis).await?;
        store.check_setup().await?;
        Self::from_parts(producer, store, &hash_key, network, settings)
    }

    /// An API over existing connections.
    pub fn from_parts(
        producer: Producer,
        store: RedisStore,
        hash_key: &[u8],
        network: NetworkPolicy,
        settings: &Settings,
    ) -> Result<Self, ApiError> {
        let api = &settings.api;
        let jwt = api
            .jwt
            .as_ref()
            .map(jwt::JwtVerifier::from_settings)
            .transpose()?;
        let tls = tls_files(api)?;
        let statuses = StatusStore::new(store.clone(), settings.worker.status_retention);
        Ok(Self {
            state: Arc::new(ApiState {
                keys: ApiKeyStore::new(store.clone(), hash_key),
                jwt,
                spender: spend::Spender::new(RateLimiter::new(store.clone()), api.tenant_rate),
                statuses: statuses.clone(),
                queued: queued::QueuedWriter::new(statuses),
                idempotency: Idempotency::new(
                    store.clone(),
                    hash_key,
                    api.idempotency_window,
                    api.request_timeout * 2,
                ),
                producer,
                store,
                network,
                settings: api.clone(),
                limits: settings.limits.clone(),
                touches: Touches::default(),
                tls,
                openapi: openapi::document(&settings.limits, api.max_batch),
                bodies: FairBudget::new(api.max_inflight_bytes, api.body_limit_bytes),
            }),
        })
    }

    /// The API key store (for `mailroom apikey`).
    pub fn keys(&self) -> &ApiKeyStore {
        &self.state.keys
    }

    /// The routes, with the body limit, the timeout and the access log.
    pub fn router(&self) -> Router {
        let state = Arc::clone(&self.state);
        Router::new()
            .route("/v1/messages", post(messages::send_one))
            .route("/v1/messages/batch", post(messages::send_batch))
            .route("/v1/messages/{id}", get(messages::status))
            .route("/healthz", get(healthz))
            .route("/openapi.json", get(openapi::openapi_json))
            .route("/readyz", get(ready))
            .route("/metrics", get(render_metrics))
            .fallback(|| async { Problem::not_found() })
            .method_not_allowed_fallback(|| async { Problem::method_not_allowed() })
            .layer(DefaultBodyLimit::max(state.settings.body_limit_bytes))
            .layer(middleware::from_fn_with_state(
                Arc::clone(&state),
                access::access_log,
            ))
            .with_state(state)
    }

    /// Whether it serves HTTPS itself.
    pub fn serves_tls(&self) -> bool {
        self.state.tls.is_some()
    }

    /// Serves on `listener` (HTTPS when `api.tls_*` are set) until
    /// `shutdown`, then lets requests in flight finish.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let certificates = match self.state.tls.clone() {
            Some(files) => Some(
                tls::Certificates::watch(files, shutdown.clone()).map_err(std::io::Error::other)?,
            ),
            None => None,
        };
        let served = serve::serve(
            listener,
            self.router(),
            &self.state.settings,
            certificates,
            shutdown,
        )
        .await;
        self.state.queued.close().await;
        self.state.producer.close().await;
        served
    }
}

/// `/healthz`: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "service", responses((status = 200, description = "Alive")))]
async fn healthz() -> &'static str {
    "ok\n"
}

/// `/readyz`: broker and Redis reachable.
#[utoipa::path(get, path = "/readyz", tag = "service", responses(
    (status = 200, description = "Broker taking publishes, Redis taking writes"),
    (status = 503, description = "Broker down or blocked by an alarm, or Redis down or refusing writes"),
))]
async fn ready(State(state): State<Arc<ApiState>>) -> (StatusCode, String) {
    let broker = state.producer.broker().readiness();
    mailroom_core::listener::readyz(broker, state.store.takes_writes().await.is_ok())
}

/// `/metrics`: Prometheus text.
#[utoipa::path(get, path = "/metrics", tag = "service", responses((status = 200, description = "Prometheus text format")))]
async fn render_metrics() -> (StatusCode, String) {
    match mailroom_core::telemetry::prometheus() {
        Some(handle) => (StatusCode::OK, handle.render()),
        None => (
            StatusCode::NOT_FOUND,
            "metrics recorder not installed\n".to_owned(),
        ),
    }
}
