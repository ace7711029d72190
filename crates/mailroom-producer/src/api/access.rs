//! One access-log line a request (target `mailroom::access`), its span,
//! its metrics, the request timeout and the deny list, as the layer every
//! route sits in.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use mailroom_core::job::JobId;
use mailroom_core::telemetry::extract_traceparent;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::ApiState;
use super::problem::Problem;

/// What the access log says about a request, filled in by its handler.
#[derive(Clone, Debug, Default)]
pub struct LogFields {
    /// The key's public id.
    pub key_id: Option<String>,
    /// The tenant.
    pub tenant: Option<String>,
    /// Jobs the request enqueued or read.
    pub job_ids: Vec<JobId>,
    /// Why its credential was refused (`JWT expired`, `unknown API key`):
    /// the client gets a bare `401`, the operator this.
    pub refusal: Option<&'static str>,
}

impl LogFields {
    /// A caller's, before any job.
    pub fn caller(key_id: &str, tenant: &str) -> Self {
        Self {
            key_id: Some(key_id.to_owned()),
            tenant: Some(tenant.to_owned()),
            job_ids: Vec::new(),
            refusal: None,
        }
    }
}

/// Who the access log names, set by a handler once it knows the caller,
/// so a request cut short (by `api.request_timeout`, or by a client that
/// went away) is still logged with its key and tenant.
#[derive(Clone, Debug, Default)]
pub struct LogSlot(Arc<Mutex<LogFields>>);

impl LogSlot {
    /// Records `fields` (the caller; job ids come with the answer).
    pub fn set(&self, fields: LogFields) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = fields;
    }

    /// Records why the credential was refused.
    pub fn refusal(&self, why: &'static str) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .refusal = Some(why);
    }

    /// Records the jobs the answer names.
    pub fn name_jobs(&self, job_ids: Vec<JobId>) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .job_ids = job_ids;
    }

    fn take(&self) -> LogFields {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// A request's line, written when it is dropped: at the answer, or when
/// the client went away first and hyper dropped the request (status 499,
/// as nginx logs it: the caller is known, its answer is not).
struct Line {
    started: Instant,
    request_id: String,
    method: Method,
    route: String,
    client_ip: Option<std::net::IpAddr>,
    slot: LogSlot,
    /// The answer's status, once answered.
    answered: Option<u16>,
}

impl Drop for Line {
    fn drop(&mut self) {
        let status = self.answered.unwrap_or(499);
        let fields = self.slot.take();
        let elapsed = self.started.elapsed().as_secs_f64();
        let route = std::mem::take(&mut self.route);
        let labels = [("route", route.clone()), ("status", status.to_string())];
        metrics::counter!("mailroom_api_requests_total", &labels).increment(1);
        metrics::histogram!("mailroom_api_request_seconds", "route" => route.clone())
            .record(elapsed);
        let job_ids: Vec<String> = fields.job_ids.iter().map(ToString::to_string).collect();
        tracing::info!(
            target: "mailroom::access",
            request_id = self.request_id,
            method = %self.method,
            route,
            status,
            latency_ms = elapsed * 1e3,
            client_ip = self.client_ip.map(|ip| ip.to_string()).unwrap_or_default(),
            key_id = fields.key_id.unwrap_or_default(),
            tenant = fields.tenant.unwrap_or_default(),
            job_ids = job_ids.join(","),
            refusal = fields.refusal.unwrap_or_default(),
            "request"
        );
    }
}

/// The layer: the deny list (on every route: `/metrics` and
/// `/openapi.json` are nobody's business on a network the operator shut
/// out), the request timeout, the request id, the span and the line.
pub async fn access_log(
    State(state): State<Arc<ApiState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut request: Request,
    next: Next,
) -> Response {
    let client_ip = state.network.client_ip(peer, request.headers());
    let slot = LogSlot::default();
    let mut line = Line {
        started: Instant::now(),
        request_id: uuid::Uuid::now_v7().to_string(),
        method: request.method().clone(),
        route: request
            .extensions()
            .get::<MatchedPath>()
            .map_or_else(|| "(unmatched)".to_owned(), |path| path.as_str().to_owned()),
        client_ip,
        slot: slot.clone(),
        answered: None,
    };
    // The request's span continues the caller's trace (`traceparent`), so
    // one trace runs from the caller through enqueue, worker and SMTP. It
    // is DEBUG, as the other hot-path spans: the exporter takes it, the log
    // does not format it for every request (the access line says it all).
    let span = tracing::debug_span!(
        "mailroom.http",
        otel.kind = "server",
        http.request.method = %line.method,
        http.route = %line.route,
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
    request.extensions_mut().insert(slot);
    let mut response = if client_ip.is_some_and(|ip| state.network.denies(ip)) {
        Problem::forbidden("requests from this network are refused").into_response()
    } else {
        let timeout = state.settings.request_timeout;
        tokio::time::timeout(timeout, next.run(request).instrument(span.clone()))
            .await
            .unwrap_or_else(|_| Problem::timeout().into_response())
    };
    let status = response.status().as_u16();
    span.record("http.response.status_code", status);
    if let Ok(value) = HeaderValue::from_str(&line.request_id) {
        response.headers_mut().insert("x-request-id", value);
    }
    line.answered = Some(status);
    response
}
