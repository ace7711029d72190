//! Errors as RFC 9457 problem documents (`application/problem+json`).
//!
//! Every refusal the API makes goes through [`Problem`]: a status, a short
//! title, a detail that never repeats what the caller sent, and for a
//! validation failure the field-level errors from core. Authentication
//! failures all read alike, so a caller cannot tell a missing key from an
//! unknown, expired or revoked one.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use mailroom_core::telemetry::OncePerSecond;
use mailroom_core::validate::ValidationErrors;
use serde::Serialize;

/// One field that broke a rule.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct FieldProblem {
    /// Where, e.g. `message.to[2]`.
    pub field: String,
    /// What rule, e.g. `not a valid mailbox`.
    pub rule: String,
}

/// A refusal.
#[derive(Clone, Debug, Serialize)]
pub struct Problem {
    /// A URI naming the kind of problem.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// A short summary, the same for every instance of this kind.
    pub title: &'static str,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Field-level validation errors.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldProblem>,
    #[serde(skip)]
    retry_after: Option<Duration>,
    /// Why a credential was refused, for the access log only: the client
    /// is told no more than `401`.
    #[serde(skip)]
    pub refusal: Option<&'static str>,
}

impl Problem {
    fn new(status: StatusCode, kind: &'static str, title: &'static str) -> Self {
        Self {
            kind,
            title,
            status: status.as_u16(),
            detail: None,
            errors: Vec::new(),
            retry_after: None,
            refusal: None,
        }
    }

    /// 401 for `why` (logged, never answered).
    pub fn refused(why: &'static str) -> Self {
        Self {
            refusal: Some(why),
            ..Self::unauthorized()
        }
    }

    /// Adds a detail.
    #[must_use]
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// 401: no usable credential. The same for every reason.
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "https://mailroom.dev/problems/unauthorized",
            "Missing or invalid credentials",
        )
    }

    /// 403: the credential may not do this, or not from here.
    pub fn forbidden(detail: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "https://mailroom.dev/problems/forbidden",
            "Forbidden",
        )
        .detail(detail)
    }

    /// 404.
    pub fn not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "https://mailroom.dev/problems/not-found",
            "Not found",
        )
    }

    /// 405: the route exists, not with this method (axum adds `Allow`).
    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "https://mailroom.dev/problems/method-not-allowed",
            "Method not allowed",
        )
    }

    /// 499 (nginx's "client closed request"): the client went away before
    /// its body ended. Nobody reads it; the log and the metrics do.
    pub fn client_closed() -> Self {
        Self::new(
            StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            "https://mailroom.dev/problems/client-closed",
            "The client closed the connection before its request was read",
        )
    }

    /// 409: the first request with this key has not answered yet.
    pub fn in_progress() -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "https://mailroom.dev/problems/idempotency-in-progress",
            "A request with this Idempotency-Key is in progress",
        )
    }

    /// 413.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "https://mailroom.dev/problems/too-large",
            "Request body too large",
        )
        .detail(format!("the limit is {limit} bytes"))
    }

    /// 413, for a body within the byte limit that holds more JSON values
    /// than `messages` messages could need.
    pub fn too_many_values(messages: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "https://mailroom.dev/problems/too-large",
            "Request body too large",
        )
        .detail(format!(
            "the body holds more list items than {messages} message(s) within the limits can"
        ))
    }

    /// 422, for a batch larger than the rate limits let through at once.
    pub fn over_burst(messages: u32, burst: u32) -> Self {
        Self::invalid_field(
            "messages",
            &format!(
                "holds {messages} messages; the rate limits let at most {burst} through at once: split the batch"
            ),
        )
    }

    /// 415.
    pub fn unsupported_media_type() -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "https://mailroom.dev/problems/unsupported-media-type",
            "Send application/json",
        )
    }

    /// 415: a charset other than UTF-8.
    pub fn unsupported_charset() -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "https://mailroom.dev/problems/unsupported-media-type",
            "Send JSON in UTF-8",
        )
        .detail("the Content-Type names another charset; JSON is UTF-8 (RFC 8259)")
    }

    /// 415: a `Content-Encoding` (gzip and the like) the API does not
    /// decode.
    pub fn unsupported_encoding() -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "https://mailroom.dev/problems/unsupported-media-type",
            "Send the body without Content-Encoding",
        )
    }

    /// 400: the body is not the JSON expected.
    pub fn bad_json(detail: String) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "https://mailroom.dev/problems/bad-json",
            "The body is not a valid request",
        )
        .detail(detail)
    }

    /// 422 with the field errors of `errors`.
    pub fn invalid(errors: &ValidationErrors) -> Self {
        let mut problem = Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "https://mailroom.dev/problems/invalid",
            "The message is invalid",
        );
        problem.errors = errors
            .iter()
            .map(|error| FieldProblem {
                field: error.path.clone(),
                rule: error.rule.clone(),
            })
            .collect();
        problem
    }

    /// 422 about one field.
    pub fn invalid_field(field: &str, rule: &str) -> Self {
        let mut problem = Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "https://mailroom.dev/problems/invalid",
            "The request is invalid",
        );
        problem.errors = vec![FieldProblem {
            field: field.to_owned(),
            rule: rule.to_owned(),
        }];
        problem
    }

    /// 422: an idempotency key reused with another body.
    pub fn idempotency_mismatch() -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "https://mailroom.dev/problems/idempotency-mismatch",
            "Idempotency-Key reused with a different request",
        )
    }

    /// 429 with `Retry-After`.
    pub fn rate_limited(retry_after: Duration, which: &str) -> Self {
        let mut problem = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "https://mailroom.dev/problems/rate-limited",
            "Too many requests",
        )
        .detail(format!("the {which} rate limit is spent"));
        problem.retry_after = Some(retry_after);
        problem
    }

    /// [`unavailable`](Self::unavailable), saying in the log why: at most
    /// a line a second, since an outage fails every request alike.
    pub fn unavailable_because(what: &str, cause: &dyn std::fmt::Display) -> Self {
        static THROTTLE: OncePerSecond = OncePerSecond::new();
        if let Some(held) = THROTTLE.pass() {
            tracing::warn!(error = %cause, held, "{what} is unavailable: answering 503");
        }
        Self::unavailable(what)
    }

    /// 503 with `Retry-After`: the broker or Redis is out of reach; nothing
    /// was done.
    pub fn unavailable(what: &str) -> Self {
        let mut problem = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "https://mailroom.dev/problems/unavailable",
            "Temporarily unavailable",
        )
        .detail(format!(
            "{what} is unavailable; nothing was done, try again"
        ));
        problem.retry_after = Some(Duration::from_secs(5));
        problem
    }

    /// 504: the request took longer than `api.request_timeout`.
    pub fn timeout() -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "https://mailroom.dev/problems/timeout",
            "The request timed out",
        )
    }

    /// The status as a `StatusCode`.
    pub fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = self.status_code();
        let retry_after = self.retry_after;
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(wait) = retry_after {
            // Whole seconds, rounded up, at least one.
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            if let Ok(value) = HeaderValue::from_str(&secs.max(1).to_string()) {
                headers.insert(header::RETRY_AFTER, value);
            }
        }
        response
    }
}
