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

mod auth;
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

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use mailroom_core::budget::FairBudget;
use mailroom_core::job::JobId;
use mailroom_core::ratelimit::RateLimiter;
use mailroom_core::settings::{ApiSettings, Settings, SettingsError};
use mailroom_core::status::StatusStore;
use mailroom_core::store::{RedisStore, StoreError};
use mailroom_core::telemetry::extract_traceparent;
use mailroom_core::validate::Limits;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::{Producer, ProducerError};
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

/// What the access log says about a request, filled in by its handler.
#[derive(Clone, Debug, Default)]
pub struct LogFields {
    /// The key's public id.
    pub key_id: Option<String>,
    /// The tenant.
    pub tenant: Option<String>,
    /// Jobs the request enqueued or read.
    pub job_ids: Vec<JobId>,
}

/// Who the access log names, set by a handler once it knows the caller,
/// so a request cut short by `api.request_timeout` is still logged with
/// its key and tenant.
#[derive(Clone, Debug, Default)]
pub struct LogSlot(Arc<std::sync::Mutex<LogFields>>);

impl LogSlot {
    /// Records `fields` (the caller; job ids come with the answer).
    pub fn set(&self, fields: LogFields) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = fields;
    }

    fn take(&self) -> LogFields {
        std::mem::take(
            &mut *self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
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
        let tls = match (&api.tls_cert_file, &api.tls_key_file) {
            (Some(cert), Some(key)) => Some(tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            }),
            (None, None) => None,
            _ => return Err(ApiError::TlsHalf),
        };
        if let Some(files) = &tls {
            tls::check(files)?;
        }
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
                access_log,
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

/// The request timeout, the request id and one access-log line a request.
///
/// A request runs to its end in a task of its own: a client that goes
/// away mid-request takes away only the wait for the answer, not the work
/// (a job it published still gets its `Idempotency-Key` answer stored,
/// and its log line).
async fn access_log(
    State(state): State<Arc<ApiState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    let (answer, answered) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _ = answer.send(run_and_log(state, peer, request, next).await);
    });
    answered
        .await
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// [`access_log`]'s work: the request within its timeout, then its line.
async fn run_and_log(
    state: Arc<ApiState>,
    peer: SocketAddr,
    mut request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let request_id = uuid::Uuid::now_v7().to_string();
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "(unmatched)".to_owned(), |path| path.as_str().to_owned());
    let client_ip = state.network.client_ip(peer, request.headers());
    // The request's span continues the caller's trace (`traceparent`), so
    // one trace runs from the caller through enqueue, worker and SMTP. It
    // is DEBUG, as the other hot-path spans: the exporter takes it, the log
    // does not format it for every request (the access line says it all).
    let span = tracing::debug_span!(
        "mailroom.http",
        otel.kind = "server",
        http.request.method = %method,
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
    );
    let parent = {
        let header = |name| {
            request
                .headers()
                .get(name)
                .and_then(|v: &HeaderValue| v.to_str().ok())
        };
        extract_traceparent(header("traceparent"), header("tracestate"))
    };
    // Fails only when no OpenTelemetry layer is installed: nothing to link.
    let _ = span.set_parent(parent);
    let slot = LogSlot::default();
    request.extensions_mut().insert(slot.clone());
    let timeout: Duration = state.settings.request_timeout;
    let mut response = if client_ip.is_some_and(|ip| state.network.denies(ip)) {
        // Every route: `/metrics` and `/openapi.json` are nobody's business
        // on a network the operator shut out.
        Problem::forbidden("requests from this network are refused").into_response()
    } else {
        tokio::time::timeout(timeout, next.run(request).instrument(span.clone()))
            .await
            .unwrap_or_else(|_| Problem::timeout().into_response())
    };
    span.record("http.response.status_code", response.status().as_u16());
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", value);
    }
    let fields = response
        .extensions()
        .get::<LogFields>()
        .cloned()
        .unwrap_or_else(|| slot.take());
    let status = response.status().as_u16();
    let labels = [("route", route.clone()), ("status", status.to_string())];
    metrics::counter!("mailroom_api_requests_total", &labels).increment(1);
    metrics::histogram!("mailroom_api_request_seconds", "route" => route.clone())
        .record(started.elapsed().as_secs_f64());
    let job_ids: Vec<String> = fields.job_ids.iter().map(ToString::to_string).collect();
    tracing::info!(
        target: "mailroom::access",
        request_id,
        method = %method,
        route,
        status,
        latency_ms = started.elapsed().as_secs_f64() * 1e3,
        client_ip = client_ip.map(|ip| ip.to_string()).unwrap_or_default(),
        key_id = fields.key_id.unwrap_or_default(),
        tenant = fields.tenant.unwrap_or_default(),
        job_ids = job_ids.join(","),
        "request"
    );
    response
}
