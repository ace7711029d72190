//! `POST /v1/messages`, `POST /v1/messages/batch`, `GET /v1/messages/{id}`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, Extension, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use mailroom_core::amqp::PublishError;
use mailroom_core::job::{JobId, JobRequest};
use mailroom_core::offload;
use mailroom_core::settings::ApiSettings;
use mailroom_core::status::{JobState, StatusUpdate};
use mailroom_core::validate::json::{parse_object, values_per_job, values_within};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest as _, Sha256};

use super::auth::{Principal, Refusal, authenticate, authorize, charge, one_header};
use super::body::read_json_body;
use super::idempotency::{Stored, Taken};
use super::keys::Scope;
use super::problem::Problem;
use super::{ApiState, LogFields, LogSlot};
use crate::{EnqueueError, prepare};

/// The longest `Idempotency-Key` taken.
const MAX_IDEMPOTENCY_KEY: usize = 255;

/// `202` answer to an accepted message.
#[derive(Debug, Serialize)]
struct Accepted {
    id: JobId,
    status: &'static str,
    status_url: String,
}

impl Accepted {
    fn new(id: JobId) -> Self {
        Self {
            id,
            status: "queued",
            status_url: format!("/v1/messages/{id}"),
        }
    }
}

/// A batch request. Each item stays text until it is parsed on its own:
/// a parsed `Value` would keep the last of a key given twice, and the
/// item's `headers` or `metadata` would pass a name twice.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Batch {
    messages: Vec<Box<RawValue>>,
}

/// One item of a batch answer.
#[derive(Debug, Serialize)]
struct ItemResult {
    index: usize,
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<JobId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    problem: Option<Problem>,
}

/// The answer to a batch.
#[derive(Debug, Serialize)]
struct Answer {
    accepted: usize,
    rejected: usize,
    results: Vec<ItemResult>,
}

/// What a handler produced: a status and a JSON body, and what the access
/// log may say about it.
struct Outcome {
    status: StatusCode,
    body: String,
    job_ids: Vec<JobId>,
    /// Some of the work failed for a reason of ours (a batch item's 503):
    /// the answer must not be replayed for the `Idempotency-Key`, or the
    /// client's retry would get the same failure for the whole window.
    transient: bool,
}

impl Outcome {
    fn json<T: Serialize>(status: StatusCode, value: &T, job_ids: Vec<JobId>) -> Self {
        Self {
            status,
            body: serde_json::to_string(value).unwrap_or_default(),
            job_ids,
            transient: status.is_server_error(),
        }
    }

    fn problem(problem: &Problem) -> Self {
        Self::json(problem.status_code(), problem, Vec::new())
    }
}

/// The refusals both POST routes document (all `application/problem+json`).
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
enum PostRefusals {
    /// 400.
    #[response(status = 400, description = "The body is not a valid request")]
    BadJson,
    /// 401.
    #[response(status = 401, description = "Missing or invalid credentials")]
    Unauthorized,
    /// 403.
    #[response(status = 403, description = "Scope or network refused")]
    Forbidden,
    /// 413.
    #[response(status = 413, description = "Body too large")]
    TooLarge,
    /// 415.
    #[response(
        status = 415,
        description = "Not application/json, a charset other than UTF-8, or sent with a Content-Encoding"
    )]
    NotJson,
    /// 422.
    #[response(
        status = 422,
        description = "Invalid message (field errors), or an Idempotency-Key reused with another body"
    )]
    Invalid,
    /// 429.
    #[response(status = 429, description = "Rate limit spent; see Retry-After")]
    RateLimited,
    /// 503.
    #[response(
        status = 503,
        description = "Broker or Redis unavailable; nothing done; see Retry-After"
    )]
    Unavailable,
    /// 504.
    #[response(
        status = 504,
        description = "The request took longer than api.request_timeout"
    )]
    TimedOut,
}

/// `POST /v1/messages`
#[utoipa::path(
    post,
    path = "/v1/messages",
    request_body(content = Object, content_type = "application/json", description = "One JSON job (see the README's job format)"),
    params(("Idempotency-Key" = Option<String>, Header, description = "The same key from the same tenant answers the first response again")),
    responses(
        (status = 202, description = "Enqueued and confirmed by the broker: {id, status, status_url}", content_type = "application/json"),
        PostRefusals,
    ),
    security(("bearer" = []))
)]
pub async fn send_one(
    State(state): State<Arc<ApiState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(log): Extension<LogSlot>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let route = Route {
        name: "send",
        cost: |_, _| 1,
        work: enqueue_one,
    };
    handle(&state, peer, &log, &headers, body, route).await
}

/// `POST /v1/messages/batch`
#[utoipa::path(
    post,
    path = "/v1/messages/batch",
    request_body(content = Object, content_type = "application/json", description = "{\"messages\": [job, ...]}, up to api.max_batch"),
    params(("Idempotency-Key" = Option<String>, Header, description = "The same key from the same tenant answers the first response again")),
    responses(
        (status = 202, description = "All enqueued: {accepted, rejected, results}", content_type = "application/json"),
        (status = 207, description = "Some refused: a result per item", content_type = "application/json"),
        PostRefusals,
    ),
    security(("bearer" = []))
)]
pub async fn send_batch(
    State(state): State<Arc<ApiState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(log): Extension<LogSlot>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let route = Route {
        name: "batch",
        cost: batch_cost,
        work: enqueue_batch,
    };
    handle(&state, peer, &log, &headers, body, route).await
}

/// Rate limits count messages: a batch's cost is its length, counted
/// without building the messages. A body that is not a batch, or one over
/// `api.max_batch`, costs one: it is refused with 422, and a 429 would only
/// send its client to retry what can never pass.
fn batch_cost(settings: &ApiSettings, body: &[u8]) -> u32 {
    #[derive(Deserialize)]
    struct Count {
        messages: Vec<serde::de::IgnoredAny>,
    }
    serde_json::from_slice::<Count>(body)
        .ok()
        .map(|count| count.messages.len())
        .filter(|&len| len <= settings.max_batch)
        .map_or(1, |len| u32::try_from(len).unwrap_or(u32::MAX).max(1))
}

/// The work of a route, once the request is authorized and its body read.
/// The request's `Idempotency-Key`, if any, is passed on (see
/// [`accept`]).
type Work = for<'a> fn(&'a ApiState, &'a Principal, &'a [u8], Option<&'a str>) -> Pending<'a>;

/// A route's work in progress.
type Pending<'a> = std::pin::Pin<Box<dyn Future<Output = Outcome> + Send + 'a>>;

/// What a POST route does once the request is its own.
#[derive(Clone, Copy)]
struct Route {
    /// Its name among `Idempotency-Key` answers.
    name: &'static str,
    /// What its body costs of the rate limits.
    cost: fn(&ApiSettings, &[u8]) -> u32,
    /// Its work.
    work: Work,
}

/// What both POST routes share: authorization, the body's type and size
/// (read only once the caller is known, so an anonymous one cannot make the
/// API buffer large bodies), the rate limits (`cost` of the body) and
/// `Idempotency-Key`.
async fn handle(
    state: &Arc<ApiState>,
    peer: SocketAddr,
    log: &LogSlot,
    headers: &HeaderMap,
    body: Body,
    route: Route,
) -> Response {
    let Some(ip) = state.network.client_ip(peer, headers) else {
        return refused(log, unknown_client());
    };
    let caller = match authenticate(state, headers, ip, Scope::Send).await {
        Ok(caller) => caller,
        Err(refusal) => return refused(log, refusal),
    };
    log.set(LogFields::caller(caller.key_id(), caller.tenant()));
    let Route { name, cost, work } = route;
    // Held until the answer, as the body and what is made of it are.
    let mut shares = Vec::new();
    let bodies = (&state.bodies, caller.tenant());
    let body = read_json_body(headers, body, &state.settings, bodies, &mut shares).await;
    // A refused body still costs one request.
    let spent = body.as_ref().map_or(1, |body| cost(&state.settings, body));
    let principal = match charge(state, caller, Scope::Send, ip, spent).await {
        Ok(principal) => principal,
        Err(refusal) => return refused(log, refusal),
    };
    let body = match body {
        Ok(body) => body,
        Err(problem) => return problem.into_response(),
    };
    let idempotency_key = match idempotency_key(headers) {
        Ok(key) => key,
        Err(problem) => return problem.into_response(),
    };
    let Some(key) = idempotency_key else {
        let outcome = work(state, &principal, &body, None).await;
        return respond(log, outcome, false);
    };
    // From taking the key's slot on, the work runs in a task of its own,
    // which neither a timeout nor a client that goes away cuts short: a
    // slot left pending would hold the client's retries off with 409s
    // while a job it published waits unanswered.
    let state = Arc::clone(state);
    let working = tokio::spawn(async move {
        let taken = state
            .idempotency
            .take(&principal.tenant, &key, name, &body)
            .await;
        let slot = match taken {
            Ok(Taken::First(slot)) => slot,
            Ok(Taken::Replay(stored)) => {
                let outcome = Outcome {
                    status: StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK),
                    job_ids: replayed_ids(&stored.body),
                    body: stored.body,
                    transient: false,
                };
                return Ok((outcome, true));
            }
            Ok(Taken::Mismatch) => return Err(Problem::idempotency_mismatch()),
            Ok(Taken::InProgress) => return Err(Problem::in_progress()),
            Err(err) => return Err(Problem::unavailable_because("the idempotency store", &err)),
        };
        let outcome = tokio::select! {
            outcome = work(&state, &principal, &body, Some(&key)) => outcome,
            never = state.idempotency.keep_pending(&slot) => match never {},
        };
        // Items of a batch that did get through are sent once even if the
        // retry enqueues them again: each carries a key derived from the
        // header (`item_key`) for the worker's dedup.
        let kept = if outcome.transient {
            state.idempotency.abandon(slot).await
        } else {
            let stored = Stored {
                status: outcome.status.as_u16(),
                body: outcome.body.clone(),
            };
            state.idempotency.finish(slot, stored).await
        };
        if let Err(err) = kept {
            // The work is done and answered; a replay may redo it, which the
            // worker's dedup absorbs if the job itself has an idempotency key.
            tracing::warn!(error = %err, "idempotent response not stored");
        }
        Ok((outcome, false))
    });
    match working.await {
        Ok(Ok((outcome, replayed))) => respond(log, outcome, replayed),
        Ok(Err(problem)) => problem.into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

fn respond(log: &LogSlot, outcome: Outcome, replayed: bool) -> Response {
    log.name_jobs(outcome.job_ids);
    let mut response = (outcome.status, outcome.body).into_response();
    let content_type = if outcome.status.is_client_error() || outcome.status.is_server_error() {
        "application/problem+json"
    } else {
        "application/json"
    };
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    if outcome.status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    }
    response
}

/// What the access log says about an authorized caller.
fn fields_of(principal: &Principal) -> LogFields {
    LogFields::caller(&principal.key_id, &principal.tenant)
}

/// The answer to a refused request, logged with the caller if known.
/// A trusted proxy forwarded a client address that is not one.
fn unknown_client() -> Refusal {
    Problem::forbidden("the client's address in X-Forwarded-For could not be read").into()
}

fn refused(log: &LogSlot, refusal: Refusal) -> Response {
    if let Some(caller) = &refusal.caller {
        log.set(fields_of(caller));
    }
    if let Some(why) = refusal.problem.refusal {
        log.refusal(why);
    }
    refusal.problem.into_response()
}

/// Job ids of a stored answer, for the access log of a replay.
fn replayed_ids(body: &str) -> Vec<JobId> {
    #[derive(Deserialize)]
    struct Ids {
        id: Option<JobId>,
        #[serde(default)]
        results: Vec<Ids>,
    }
    serde_json::from_str::<Ids>(body).map_or_else(
        |_| Vec::new(),
        |ids| {
            ids.id
                .into_iter()
                .chain(ids.results.into_iter().filter_map(|r| r.id))
                .collect()
        },
    )
}

/// The `Idempotency-Key` header, if sent and well-formed.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, Problem> {
    let Some(value) = one_header(headers, "idempotency-key")
        .map_err(|()| Problem::invalid_field("Idempotency-Key", "sent more than once"))?
    else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .ok()
        .filter(|text| {
            !text.is_empty()
                && text.len() <= MAX_IDEMPOTENCY_KEY
                && text.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
        })
        .ok_or_else(|| {
            Problem::invalid_field(
                "Idempotency-Key",
                "must be 1 to 255 printable ASCII characters",
            )
        })?;
    Ok(Some(text.to_owned()))
}

/// Parses, checks and enqueues one request for `principal`.
///
/// A request without an idempotency key of its own takes `key`, from the
/// `Idempotency-Key` header: a publish that failed (503) may still have
/// reached the queue, and the client's retry of the same request is a new
/// job; with the key, the worker's dedup sends only one of them.
async fn accept(
    state: &ApiState,
    principal: &Principal,
    mut request: JobRequest,
    key: Option<String>,
) -> Result<JobId, Problem> {
    if request.idempotency_key.is_none() {
        request.idempotency_key = key;
    }
    if request
        .tenant
        .as_ref()
        .is_some_and(|tenant| *tenant != principal.tenant)
    {
        return Err(Problem::invalid_field(
            "tenant",
            "is set by the credential; leave it out",
        ));
    }
    let job = prepare(request, &principal.tenant, &state.limits)
        .map_err(|errors| Problem::invalid(&errors))?;
    let queued = StatusUpdate::new(job.job(), JobState::Queued);
    let id = state
        .producer
        .enqueue_checked(job)
        .await
        .map_err(|err| match err {
            EnqueueError::Invalid(errors) => Problem::invalid(&errors),
            EnqueueError::Publish(err) => {
                // Said as the client can act on it; the log has the rest.
                let what = match err {
                    PublishError::Nacked => "the broker's work queue (it refused the job: full?)",
                    PublishError::Unroutable { .. } => {
                        "the broker's work queue (none is bound for the job)"
                    }
                    PublishError::Blocked => "the broker (a memory or disk alarm)",
                    _ => "the broker",
                };
                Problem::unavailable_because(what, &err)
            }
            EnqueueError::Seal(_) => {
                tracing::error!(error = %err, "a job could not be sealed");
                Problem::unavailable("sealing")
            }
        })?;
    state.queued.record(queued);
    Ok(id)
}

fn enqueue_one<'a>(
    state: &'a ApiState,
    principal: &'a Principal,
    body: &'a [u8],
    key: Option<&'a str>,
) -> Pending<'a> {
    Box::pin(async move {
        let most = values_per_job(&state.limits);
        let parsed = offload::heavy(body.len(), || {
            values_within(body, most).then(|| parse_object::<JobRequest>(body))
        });
        let request = match parsed {
            Some(Ok(request)) => request,
            Some(Err(err)) => return Outcome::problem(&Problem::bad_json(err)),
            None => return Outcome::problem(&Problem::too_many_values(1)),
        };
        match accept(state, principal, request, key.map(str::to_owned)).await {
            Ok(id) => Outcome::json(StatusCode::ACCEPTED, &Accepted::new(id), vec![id]),
            Err(problem) => Outcome::problem(&problem),
        }
    })
}

fn enqueue_batch<'a>(
    state: &'a ApiState,
    principal: &'a Principal,
    body: &'a [u8],
    key: Option<&'a str>,
) -> Pending<'a> {
    Box::pin(async move {
        let max = state.settings.max_batch;
        let most = values_per_job(&state.limits).saturating_mul(max);
        let parsed = offload::heavy(body.len(), || {
            values_within(body, most).then(|| parse_object::<Batch>(body))
        });
        let batch = match parsed {
            Some(Ok(batch)) => batch,
            Some(Err(err)) => return Outcome::problem(&Problem::bad_json(err)),
            None => return Outcome::problem(&Problem::too_many_values(max)),
        };
        if batch.messages.is_empty() || batch.messages.len() > max {
            return Outcome::problem(&Problem::invalid_field(
                "messages",
                &format!("must hold 1 to {max} messages"),
            ));
        }
        let accepted = futures_util::future::join_all(batch.messages.into_iter().enumerate().map(
            |(index, value)| async move {
                let result = match parse_object::<JobRequest>(value.get().as_bytes()) {
                    Ok(request) => {
                        let key = key.map(|key| item_key(key, index));
                        accept(state, principal, request, key).await
                    }
                    Err(err) => Err(Problem::bad_json(err)),
                };
                match result {
                    Ok(id) => ItemResult {
                        index,
                        status: StatusCode::ACCEPTED.as_u16(),
                        id: Some(id),
                        problem: None,
                    },
                    Err(problem) => ItemResult {
                        index,
                        status: problem.status,
                        id: None,
                        problem: Some(problem),
                    },
                }
            },
        ))
        .await;
        let job_ids: Vec<JobId> = accepted.iter().filter_map(|item| item.id).collect();
        let transient = accepted.iter().any(|item| item.status >= 500);
        if job_ids.is_empty() && transient {
            // Nothing got through and some of it only for our reasons: the
            // whole request is the retryable 503 (with `Retry-After`), not
            // a 207 a client would not retry.
            if let Some(problem) = accepted
                .into_iter()
                .filter_map(|item| item.problem)
                .find(|problem| problem.status >= 500)
            {
                return Outcome::problem(&problem);
            }
            return Outcome::problem(&Problem::unavailable("the broker"));
        }
        let status = if job_ids.len() == accepted.len() {
            StatusCode::ACCEPTED
        } else {
            StatusCode::MULTI_STATUS
        };
        let answer = Answer {
            accepted: job_ids.len(),
            rejected: accepted.len() - job_ids.len(),
            results: accepted,
        };
        Outcome {
            transient,
            ..Outcome::json(status, &answer, job_ids)
        }
    })
}

/// The idempotency key of item `index` of a batch sent with `key`:
/// `batch:` and a digest of `key`, then `#INDEX`. The digest keeps it
/// apart from any key a caller would choose by hand (a single request's
/// `KEY#0` must not dedup away item 0 of a batch sent as `KEY`), and within
/// the least `limits.max_idempotency_key_chars`.
fn item_key(key: &str, index: usize) -> String {
    let digest = Sha256::digest(key.as_bytes());
    format!("batch:{}#{index}", hex::encode(&digest[..16]))
}

/// `GET /v1/messages/{id}`: the status, to the owning tenant only; another
/// tenant's job reads as not found.
#[utoipa::path(
    get,
    path = "/v1/messages/{id}",
    params(("id" = uuid::Uuid, Path, description = "The job id")),
    responses(
        (status = 200, description = "{job_id, tenant, state, attempts, recipients (masked), created_at, updated_at, last_error, reason}", content_type = "application/json"),
        (status = 401, description = "Missing or invalid credentials", content_type = "application/problem+json"),
        (status = 403, description = "Scope or network refused", content_type = "application/problem+json"),
        (status = 404, description = "No such job for this tenant", content_type = "application/problem+json"),
        (status = 429, description = "Rate limit spent; see Retry-After", content_type = "application/problem+json"),
        (status = 503, description = "Redis unavailable", content_type = "application/problem+json"),
        (status = 504, description = "The request took longer than api.request_timeout", content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn status(
    State(state): State<Arc<ApiState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(log): Extension<LogSlot>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let Some(ip) = state.network.client_ip(peer, &headers) else {
        return refused(&log, unknown_client());
    };
    let principal = match authorize(&state, &headers, ip, Scope::Read, 1).await {
        Ok(principal) => principal,
        Err(refusal) => return refused(&log, refusal),
    };
    log.set(fields_of(&principal));
    let Ok(id) = id.parse::<JobId>() else {
        return Problem::not_found().into_response();
    };
    match state.statuses.get(&id).await {
        Ok(Some(status)) if status.tenant == principal.tenant => {
            let outcome = Outcome::json(StatusCode::OK, &status, vec![id]);
            respond(&log, outcome, false)
        }
        Ok(_) => Problem::not_found().into_response(),
        Err(err) => Problem::unavailable_because("the status store", &err).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_items_get_keys_of_their_own_apart_from_chosen_ones() {
        let derived = item_key("order-1", 3);
        assert!(derived.starts_with("batch:") && derived.ends_with("#3"));
        assert_ne!(derived, "order-1#3");
        assert_ne!(item_key("order-2", 3), derived);
        assert_ne!(item_key("order-1", 4), derived);
        let longest = item_key(&"k".repeat(255), usize::MAX);
        assert!(
            longest.len() <= mailroom_core::validate::MIN_IDEMPOTENCY_KEY_CHARS,
            "{}",
            longest.len()
        );
    }

    #[test]
    fn idempotency_keys_are_checked() {
        let mut headers = HeaderMap::new();
        assert_eq!(idempotency_key(&headers).ok(), Some(None));
        headers.insert("idempotency-key", HeaderValue::from_static("order-1"));
        assert_eq!(
            idempotency_key(&headers).ok(),
            Some(Some("order-1".to_owned()))
        );
        headers.insert("idempotency-key", HeaderValue::from_static(""));
        assert!(idempotency_key(&headers).is_err());
        let long = "k".repeat(256);
        headers.insert(
            "idempotency-key",
            HeaderValue::from_str(&long).expect("value"),
        );
        assert!(idempotency_key(&headers).is_err());
        headers.insert("idempotency-key", HeaderValue::from_static("order-1"));
        headers.append("idempotency-key", HeaderValue::from_static("order-2"));
        assert!(idempotency_key(&headers).is_err(), "which one is a guess");
    }
}
