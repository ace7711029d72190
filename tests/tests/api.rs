//! The HTTP API against the real Redis and RabbitMQ: every rejection path,
//! the happy path, idempotency races, revocation across replicas, and what
//! the access log may say.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::connect_info::MockConnectInfo;
use axum::http::{Request, StatusCode};
use lapin::options::BasicGetOptions;
use mailroom_core::job::{JobId, Lane};
use mailroom_core::ratelimit::Rate;
use mailroom_core::settings::Settings;
use mailroom_core::store::RedisStore;
use mailroom_core::wire::{self, headers};
use mailroom_producer::Producer;
use mailroom_producer::api::keys::{KeyRecord, NewKey, RotateError, Rotated, Scope};
use mailroom_producer::api::{Api, NetworkPolicy, parse_cidr};
use mailroom_tests::logs::Captured;
use mailroom_tests::rabbit::{TestVhost, rabbitmqctl};
use mailroom_tests::redis::TestPrefix;
use mailroom_tests::stack::{base_settings, new_key};
use serde_json::{Value, json};
use time::OffsetDateTime;
use tower::ServiceExt as _;

struct Stack {
    vhost: TestVhost,
    _redis: TestPrefix,
    settings: Settings,
}

impl Stack {
    fn new(label: &str) -> Self {
        let vhost = TestVhost::new(label);
        let redis = TestPrefix::new(label);
        let settings = base_settings(&vhost, &redis);
        Self {
            vhost,
            _redis: redis,
            settings,
        }
    }

    async fn api(&self) -> Api {
        self.api_with(&self.settings).await
    }

    async fn api_with(&self, settings: &Settings) -> Api {
        let network = NetworkPolicy::new(&settings.api.trusted_proxies, &settings.api.deny_cidrs)
            .expect("network policy");
        let producer = Producer::connect(settings).await.expect("producer");
        let store = RedisStore::connect(&settings.redis).await.expect("redis");
        Api::from_parts(
            producer,
            store,
            settings.hash_key().expect("hash key"),
            network,
            settings,
        )
        .expect("api")
    }
}

async fn key(api: &Api, tenant: &str) -> String {
    api.keys()
        .create(new_key(tenant, &[Scope::Send, Scope::Read]))
        .await
        .expect("key")
        .0
}

/// A response: status, headers, JSON body.
struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Value,
}

async fn call(router: &Router, peer: &str, request: Request<Body>) -> Answer {
    let peer: SocketAddr = format!("{peer}:50000").parse().expect("peer");
    let response = router
        .clone()
        .layer(MockConnectInfo(peer))
        .oneshot(request)
        .await
        .expect("infallible");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("body");
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        body,
    }
}

fn post(path: &str, key: Option<&str>, body: &Value) -> Request<Body> {
    let mut request = Request::post(path).header("content-type", "application/json");
    if let Some(key) = key {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    request.body(Body::from(body.to_string())).expect("request")
}

fn message(subject: &str) -> Value {
    json!({
        "message": {
            "from": "Shop <shop@example.com>",
            "to": ["Ada Lovelace <ada@example.org>"],
            "subject": subject,
            "text": "Your secret order body"
        }
    })
}

const LOCAL: &str = "127.0.0.1";

/// POSTs an ordinary message as `key` from loopback.
async fn send_as(router: &Router, key: &str) -> Answer {
    call(
        router,
        LOCAL,
        post("/v1/messages", Some(key), &message("x")),
    )
    .await
}

#[tokio::test]
async fn an_accepted_message_is_in_the_queue_sealed_for_the_keys_tenant() {
    let stack = Stack::new("api-happy");
    let api = stack.api().await;
    let key = key(&api, "acme").await;
    let router = api.router();
    let answer = call(
        &router,
        LOCAL,
        post("/v1/messages", Some(&key), &message("Receipt")),
    )
    .await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.body);
    let id: JobId = answer.body["id"]
        .as_str()
        .expect("id")
        .parse()
        .expect("job id");

    let producer = Producer::connect(&stack.settings).await.expect("producer");
    let channel = producer.broker().channel().await.expect("channel");
    let got = channel
        .basic_get(
            wire::work_queue(Lane::Transactional).into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .expect("get")
        .expect("the job is queued");
    let table = got.delivery.properties.headers().clone().expect("headers");
    let tenant = match table.inner().get(headers::TENANT) {
        Some(lapin::types::AMQPValue::LongString(text)) => text.to_string(),
        other => panic!("tenant header: {other:?}"),
    };
    assert_eq!(tenant, "acme");
    let kid = match table.inner().get(headers::KID) {
        Some(lapin::types::AMQPValue::LongString(text)) => text.to_string(),
        other => panic!("kid header: {other:?}"),
    };
    let keyring = stack.settings.keyring().expect("keyring");
    let job = keyring
        .open(&kid, &id, "acme", &got.delivery.data)
        .expect("opens as acme's job");
    assert_eq!(job.message.subject, "Receipt");
    assert!(!String::from_utf8_lossy(&got.delivery.data).contains("secret order"));

    // The owner reads its status; another tenant cannot see it exists.
    let read = Request::get(format!("/v1/messages/{id}"))
        .header("authorization", format!("Bearer {key}"))
        .body(Body::empty())
        .expect("request");
    let answer = call(&router, LOCAL, read).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(answer.body["state"], "queued");
    assert_eq!(answer.body["recipients"][0], "a***@example.org");
    let other = key_for(&api, "globex").await;
    let read = Request::get(format!("/v1/messages/{id}"))
        .header("authorization", format!("Bearer {other}"))
        .body(Body::empty())
        .expect("request");
    assert_eq!(
        call(&router, LOCAL, read).await.status,
        StatusCode::NOT_FOUND
    );
    producer.close().await;
}

/// A send key of tenant `acme` that expires at `at`, and its record.
async fn key_expiring_at(api: &Api, at: OffsetDateTime) -> (String, KeyRecord) {
    api.keys()
        .create(NewKey {
            expires_at: Some(at),
            ..new_key("acme", &[Scope::Send])
        })
        .await
        .expect("key")
}

async fn key_for(api: &Api, tenant: &str) -> String {
    key(api, tenant).await
}

#[tokio::test]
async fn every_bad_credential_gets_the_same_401() {
    let stack = Stack::new("api-401");
    let api = stack.api().await;
    let router = api.router();
    let (expiring, _) =
        key_expiring_at(&api, OffsetDateTime::now_utc() + Duration::from_secs(1)).await;
    let (revoked, record) = api
        .keys()
        .create(new_key("acme", &[Scope::Send]))
        .await
        .expect("key");
    assert!(api.keys().revoke(&record.id).await.expect("revoke"));
    tokio::time::sleep(Duration::from_millis(1_100)).await;

    let mut bodies = Vec::new();
    for credential in [
        None,
        Some("mr_live_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
        Some("not-even-a-key"),
        Some(expiring.as_str()),
        Some(revoked.as_str()),
    ] {
        let answer = call(
            &router,
            LOCAL,
            post("/v1/messages", credential, &message("x")),
        )
        .await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{credential:?}");
        assert_eq!(
            answer
                .headers
                .get("content-type")
                .map(|v| v.to_str().unwrap_or("")),
            Some("application/problem+json")
        );
        bodies.push(answer.body.to_string());
    }
    bodies.dedup();
    assert_eq!(bodies.len(), 1, "401s differ: {bodies:?}");

    // The body of an unknown caller is never read (so it cannot make the
    // API buffer megabytes).
    let polled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = std::sync::Arc::clone(&polled);
    let watched = futures_util::stream::once(async move {
        seen.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok::<_, std::io::Error>(Bytes::from(message("x").to_string()))
    });
    let request = Request::post("/v1/messages")
        .header("content-type", "application/json")
        .header("authorization", "Bearer mr_live_unknown")
        .body(Body::from_stream(watched))
        .expect("request");
    let answer = call(&router, LOCAL, request).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert!(!polled.load(std::sync::atomic::Ordering::SeqCst));
}

#[tokio::test]
async fn scope_and_network_rules_give_403() {
    let stack = Stack::new("api-403");
    let mut settings = stack.settings.clone();
    settings.api.deny_cidrs = vec!["192.0.2.0/24".to_owned()];
    settings.api.trusted_proxies = vec!["10.0.0.0/8".to_owned()];
    let api = stack.api_with(&settings).await;
    let router = api.router();
    let (read_only, _) = api
        .keys()
        .create(new_key("acme", &[Scope::Read]))
        .await
        .expect("key");
    let answer = send_as(&router, &read_only).await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);

    let (office_only, _) = api
        .keys()
        .create(NewKey {
            allow_cidrs: vec![parse_cidr("198.51.100.0/24").expect("cidr")],
            ..new_key("acme", &[Scope::Send])
        })
        .await
        .expect("key");
    let answer = call(
        &router,
        "203.0.113.5",
        post("/v1/messages", Some(&office_only), &message("x")),
    )
    .await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    let answer = call(
        &router,
        "198.51.100.7",
        post("/v1/messages", Some(&office_only), &message("x")),
    )
    .await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.body);
    // X-Forwarded-For counts only from a trusted proxy.
    let mut spoofed = post("/v1/messages", Some(&office_only), &message("x"));
    spoofed
        .headers_mut()
        .insert("x-forwarded-for", "198.51.100.7".parse().expect("value"));
    assert_eq!(
        call(&router, "203.0.113.5", spoofed).await.status,
        StatusCode::FORBIDDEN
    );
    let mut proxied = post("/v1/messages", Some(&office_only), &message("x"));
    proxied
        .headers_mut()
        .insert("x-forwarded-for", "198.51.100.7".parse().expect("value"));
    assert_eq!(
        call(&router, "10.1.2.3", proxied).await.status,
        StatusCode::ACCEPTED
    );

    let any = key(&api, "acme").await;
    let answer = call(
        &router,
        "192.0.2.10",
        post("/v1/messages", Some(&any), &message("x")),
    )
    .await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    // The deny list covers every route, the service ones too.
    for path in ["/healthz", "/metrics", "/openapi.json", "/v1/nothing"] {
        let request = Request::get(path).body(Body::empty()).expect("request");
        let answer = call(&router, "192.0.2.10", request).await;
        assert_eq!(answer.status, StatusCode::FORBIDDEN, "{path}");
    }
}

/// An API whose `api.max_inflight_bytes` is 1 KiB, and a key for it.
async fn api_with_tiny_budget(stack: &Stack) -> (Router, String) {
    let mut settings = stack.settings.clone();
    settings.api.max_inflight_bytes = 1024;
    let api = stack.api_with(&settings).await;
    let key = key(&api, "acme").await;
    (api.router(), key)
}

/// `POST /v1/messages` as `key` with `body`, declaring `length` (none:
/// chunked).
fn post_body(key: &str, length: Option<usize>, body: Body) -> Request<Body> {
    let mut request = Request::post("/v1/messages")
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {key}"));
    if let Some(length) = length {
        request = request.header("content-length", length);
    }
    request.body(body).expect("request")
}

/// Bodies larger than `api.max_inflight_bytes` wait for the whole budget
/// and are taken alone; they are not refused and never wait forever. On a
/// multi-thread runtime, so their parsing, validation and sealing (over
/// `offload::INLINE_MAX`) run handed off the async threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_beyond_the_byte_budget_are_all_accepted() {
    let stack = Stack::new("api-budget");
    let (router, key) = api_with_tiny_budget(&stack).await;
    let mut large = message("large");
    large["message"]["text"] = Value::from("a long line of a long letter\n".repeat(4000));
    let request = || {
        let body = large.to_string();
        post_body(&key, Some(body.len()), Body::from(body))
    };
    let answers = tokio::time::timeout(
        Duration::from_secs(30),
        futures_util::future::join_all((0..3).map(|_| call(&router, LOCAL, request()))),
    )
    .await
    .expect("no request waits forever for the budget");
    for answer in answers {
        assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.body);
    }
}

/// Starts a `POST` as `key` declaring a body of `length` bytes, of which
/// only `{` comes until the sender is dropped or sent to.
fn trickle(
    router: &Router,
    key: &str,
    length: usize,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Answer>,
) {
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let first = futures_util::stream::once(async { Ok::<_, std::io::Error>(Bytes::from("{")) });
    let rest = futures_util::stream::once(async move {
        let _ = released.await;
        Ok::<_, std::io::Error>(Bytes::from("}"))
    });
    let trickled = post_body(
        key,
        Some(length),
        Body::from_stream(futures_util::StreamExt::chain(first, rest)),
    );
    let router = router.clone();
    let holder = tokio::spawn(async move { call(&router, LOCAL, trickled).await });
    (release, holder)
}

/// Lets the trickled requests end; each is refused (`{}` is no job).
async fn release_all(
    trickles: Vec<(
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<Answer>,
    )>,
) {
    for (release, holder) in trickles {
        let _ = release.send(());
        let held = holder.await.expect("the trickled request ends");
        assert!(held.status.is_client_error(), "{}", held.status);
    }
}

/// Bodies of every size count against `api.max_inflight_bytes` (ten
/// thousand connections of 64 KiB each held over a gigabyte when small
/// ones went by): with a tenant's half held by trickled bodies, its next
/// small body waits, declared or chunked, and another tenant's goes by.
#[tokio::test]
async fn every_body_counts_against_the_byte_budget() {
    let stack = Stack::new("api-trickle");
    let mut settings = stack.settings.clone();
    settings.api.max_inflight_bytes = 256 * 1024;
    settings.api.body_limit_bytes = 64 * 1024;
    let api = stack.api_with(&settings).await;
    let (hog, other) = (key(&api, "hog").await, key(&api, "other").await);
    let router = api.router();
    let trickles: Vec<_> = (0..2).map(|_| trickle(&router, &hog, 64 * 1024)).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let small = message("small").to_string();
    let declared = |key: &str| post_body(key, Some(small.len()), Body::from(small.clone()));
    let chunked = |key: &str| {
        let small = small.clone();
        let once =
            futures_util::stream::once(async move { Ok::<_, std::io::Error>(Bytes::from(small)) });
        post_body(key, None, Body::from_stream(once))
    };
    for request in [declared(&hog), chunked(&hog)] {
        let waiting =
            tokio::time::timeout(Duration::from_millis(300), call(&router, LOCAL, request));
        assert!(waiting.await.is_err(), "the hog's small body waits");
    }
    for request in [declared(&other), chunked(&other)] {
        let answer = tokio::time::timeout(Duration::from_secs(10), call(&router, LOCAL, request))
            .await
            .expect("another tenant's small body goes by");
        assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.body);
    }
    release_all(trickles).await;
    let answer = call(&router, LOCAL, declared(&hog)).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.body);
}

/// A tenant trickling large bodies holds at most half of
/// `api.max_inflight_bytes`: another tenant's large body still goes
/// through, while the first tenant's next one waits.
#[tokio::test]
async fn a_tenant_holds_at_most_half_the_byte_budget() {
    let stack = Stack::new("api-fair");
    let mut settings = stack.settings.clone();
    settings.api.max_inflight_bytes = 4 << 20;
    settings.api.body_limit_bytes = 1 << 20;
    let api = stack.api_with(&settings).await;
    let (hog, other) = (key(&api, "hog").await, key(&api, "other").await);
    let router = api.router();
    let trickles: Vec<_> = (0..4).map(|_| trickle(&router, &hog, 1 << 20)).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let large = |key: &str| post_body(key, Some(1 << 20), Body::from(message("large").to_string()));
    let answer = tokio::time::timeout(Duration::from_secs(10), call(&router, LOCAL, large(&other)))
        .await
        .expect("another tenant's large body is not held up by the hog");
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.body);
    let waiting = tokio::time::timeout(
        Duration::from_millis(300),
        call(&router, LOCAL, large(&hog)),
    );
    assert!(waiting.await.is_err(), "the hog's next large body waits");

    release_all(trickles).await;
}

/// RFC 8259 lets a parser ignore a byte-order mark; Windows tools send one.
#[tokio::test]
async fn a_body_with_a_byte_order_mark_is_accepted() {
    let stack = Stack::new("api-bom");
    let api = stack.api().await;
    let key = key(&api, "acme").await;
    let mut with_bom = b"\xEF\xBB\xBF".to_vec();
    with_bom.extend_from_slice(message("bom").to_string().as_bytes());
    let request = post_body(&key, None, Body::from(with_bom));
    let answer = call(&api.router(), LOCAL, request).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.body);
    assert_eq!(queued_jobs(&stack, "acme").await.len(), 1);
}

/// serde's derived structs also take arrays (fields by position): a job,
/// its message, an attachment and a batch are objects and nothing else.
#[tokio::test]
async fn arrays_where_objects_go_are_refused() {
    let stack = Stack::new("api-arrays");
    let api = stack.api().await;
    let router = api.router();
    let key = key(&api, "acme").await;
    let job = json!({"message": ["shop@example.com", [], ["ada@example.org"], [], [], "Hi", "T"]});
    let answer = call(&router, LOCAL, post("/v1/messages", Some(&key), &job)).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.body);
    assert!(
        answer.body.to_string().contains("expected an object"),
        "{}",
        answer.body
    );
    let whole =
        json!([null, null, "transactional", null, {"from": "a@example.com", "subject": "s"}]);
    let answer = call(&router, LOCAL, post("/v1/messages", Some(&key), &whole)).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.body);
    let batch = json!([[message("x")]]);
    let answer = call(
        &router,
        LOCAL,
        post("/v1/messages/batch", Some(&key), &batch),
    )
    .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.body);
    assert_eq!(stack.vhost.work_depth().await, 0, "nothing enqueued");
}

#[tokio::test]
async fn bodies_not_json_in_utf8_unencoded_are_415() {
    let stack = Stack::new("api-media");
    let api = stack.api().await;
    let router = api.router();
    let key = key(&api, "acme").await;

    let labelled = |content_type: &str| {
        let mut request = post("/v1/messages", Some(&key), &message("x"));
        request
            .headers_mut()
            .insert("content-type", content_type.parse().expect("value"));
        request
    };
    assert_eq!(
        call(&router, LOCAL, labelled("text/plain")).await.status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
    let answer = call(&router, LOCAL, labelled("application/json; charset=latin1")).await;
    assert_eq!(answer.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(answer.body["title"], "Send JSON in UTF-8");
    // A compressed body is refused as such, not read as bad JSON.
    let mut gzipped = post("/v1/messages", Some(&key), &message("x"));
    gzipped
        .headers_mut()
        .insert("content-encoding", "gzip".parse().expect("value"));
    let answer = call(&router, LOCAL, gzipped).await;
    assert_eq!(answer.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(
        answer.body["title"],
        "Send the body without Content-Encoding"
    );
}

#[tokio::test]
async fn bad_bodies_are_refused_with_problems() {
    let stack = Stack::new("api-bodies");
    let mut settings = stack.settings.clone();
    settings.api.body_limit_bytes = 4 * 1024;
    let api = stack.api_with(&settings).await;
    let router = api.router();
    let key = key(&api, "acme").await;

    let invalid = json!({"message": {"from": "nope", "to": ["a@b.example", "bad"], "subject": "s\r\nBcc: x@y.example"}});
    let answer = call(&router, LOCAL, post("/v1/messages", Some(&key), &invalid)).await;
    assert_eq!(answer.status, StatusCode::UNPROCESSABLE_ENTITY);
    let fields: Vec<&str> = answer.body["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .filter_map(|e| e["field"].as_str())
        .collect();
    assert!(fields.contains(&"message.from"), "{fields:?}");
    assert!(fields.contains(&"message.to[1]"), "{fields:?}");
    assert!(fields.contains(&"message.subject"), "{fields:?}");

    let other_tenant = json!({"tenant": "globex", "message": message("x")["message"]});
    let answer = call(
        &router,
        LOCAL,
        post("/v1/messages", Some(&key), &other_tenant),
    )
    .await;
    assert_eq!(answer.status, StatusCode::UNPROCESSABLE_ENTITY);

    let raw = Request::post("/v1/messages")
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {key}"))
        .body(Body::from("{not json"))
        .expect("request");
    assert_eq!(
        call(&router, LOCAL, raw).await.status,
        StatusCode::BAD_REQUEST
    );

    // Two credentials, one of them good, are no credential.
    let mut doubled = post("/v1/messages", Some(&key), &message("x"));
    doubled.headers_mut().append(
        "authorization",
        "Bearer mr_live_other".parse().expect("value"),
    );
    assert_eq!(
        call(&router, LOCAL, doubled).await.status,
        StatusCode::UNAUTHORIZED
    );

    let mut big = message("big");
    big["message"]["text"] = Value::String("x".repeat(8 * 1024));
    let answer = call(&router, LOCAL, post("/v1/messages", Some(&key), &big)).await;
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);

    let mut invalid_item = message("two");
    invalid_item["message"]["to"] = json!(["not an address"]);
    let batch = json!({"messages": [message("one"), invalid_item, {"message": 7}]});
    let answer = call(
        &router,
        LOCAL,
        post("/v1/messages/batch", Some(&key), &batch),
    )
    .await;
    assert_eq!(answer.status, StatusCode::MULTI_STATUS, "{}", answer.body);
    assert_eq!(answer.body["accepted"], 1);
    assert_eq!(answer.body["results"][0]["status"], 202);
    assert_eq!(answer.body["results"][1]["status"], 422);
    assert_eq!(
        answer.body["results"][1]["problem"]["errors"][0]["field"],
        "message.to[0]"
    );
    assert_eq!(answer.body["results"][2]["status"], 400);

    let delete = Request::delete("/v1/messages")
        .body(Body::empty())
        .expect("request");
    let answer = call(&router, LOCAL, delete).await;
    assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(answer.headers["allow"], "POST");
    assert_eq!(answer.headers["content-type"], "application/problem+json");
    assert_eq!(answer.body["status"], 405);
}

/// `POST path` as `key` with the JSON text `body` as it is (`json!` would
/// keep one of a key given twice).
fn post_text(path: &str, key: &str, body: &str) -> Request<Body> {
    Request::post(path)
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {key}"))
        .body(Body::from(body.to_owned()))
        .expect("request")
}

/// A name given twice in `headers` or `metadata` is refused, alone and in
/// a batch; an attachment type with a second file name is refused; and a
/// 400 names no value the caller sent.
#[tokio::test]
async fn names_twice_second_file_names_and_echoed_values_are_refused() {
    let stack = Stack::new("api-twice");
    let api = stack.api().await;
    let router = api.router();
    let key = key(&api, "acme").await;
    let item = |extra: &str| {
        format!(
            r#"{{"message": {{"from": "shop@example.com", "to": ["ada@example.org"], "subject": "s", "text": "t", {extra}}}}}"#
        )
    };

    let twice = item(r#""headers": {"X-A": "1", "X-A": "2"}"#);
    let answer = call(&router, LOCAL, post_text("/v1/messages", &key, &twice)).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.body);
    let detail = answer.body["detail"].as_str().expect("detail");
    assert!(
        detail.starts_with("message.headers: a name appears twice in headers"),
        "{detail}"
    );

    let batch = format!(
        r#"{{"messages": [{}, {}]}}"#,
        item(r#""metadata": {"secret-key": "1", "secret-key": "2"}"#),
        item(r#""metadata": {"a": "1", "b": "2"}"#),
    );
    let answer = call(
        &router,
        LOCAL,
        post_text("/v1/messages/batch", &key, &batch),
    )
    .await;
    assert_eq!(answer.status, StatusCode::MULTI_STATUS, "{}", answer.body);
    assert_eq!(answer.body["results"][0]["status"], 400, "{}", answer.body);
    assert_eq!(answer.body["results"][1]["status"], 202, "{}", answer.body);
    let detail = answer.body["results"][0]["problem"]["detail"]
        .as_str()
        .expect("detail");
    assert!(
        detail.starts_with("message.metadata: a name appears twice in metadata"),
        "{detail}"
    );
    assert!(!detail.contains("secret"), "{detail}");

    let renamed = item(
        r#""attachments": [{"filename": "invoice.pdf", "content_type": "application/pdf; name=\"invoice.exe\"", "content": "JVBERi0xLjQK"}]"#,
    );
    let answer = call(&router, LOCAL, post_text("/v1/messages", &key, &renamed)).await;
    assert_invalid(&answer, "message.attachments[0].content_type");
    assert_eq!(
        answer.body["errors"][0]["rule"], "must be type/subtype, with no parameter but charset",
        "{}",
        answer.body
    );

    let number = item(r#""metadata": {"phone": 4915112345678}"#);
    let answer = call(&router, LOCAL, post_text("/v1/messages", &key, &number)).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.body);
    let detail = answer.body["detail"].as_str().expect("detail");
    assert!(!detail.contains("4915112345678"), "{detail}");
    // Where, with the caller's own name left out.
    assert!(
        detail.starts_with("message.metadata[…]: invalid type: integer, expected a string"),
        "{detail}"
    );
}

/// A send key of tenant `acme` limited to `rate`.
async fn limited_key(api: &Api, rate: &str) -> String {
    let (key, _) = api
        .keys()
        .create(NewKey {
            rate: Some(rate.parse::<Rate>().expect("rate")),
            ..new_key("acme", &[Scope::Send])
        })
        .await
        .expect("key");
    key
}

#[tokio::test]
async fn a_spent_rate_limit_answers_429_with_retry_after() {
    let stack = Stack::new("api-429");
    let api = stack.api().await;
    let router = api.router();
    let key = limited_key(&api, "2/m").await;
    for _ in 0..2 {
        let answer = send_as(&router, &key).await;
        assert_eq!(answer.status, StatusCode::ACCEPTED);
    }
    let answer = send_as(&router, &key).await;
    assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = answer.headers["retry-after"]
        .to_str()
        .expect("text")
        .parse()
        .expect("seconds");
    assert!((1..=30).contains(&retry), "{retry}");
}

/// POSTs a batch of `count` ordinary messages as `key` from loopback.
async fn send_batch(router: &Router, key: &str, count: usize) -> Answer {
    let batch = json!({"messages": vec![message("one"); count]});
    call(router, LOCAL, post("/v1/messages/batch", Some(key), &batch)).await
}

/// A 422 whose first error is about `field`.
fn assert_invalid(answer: &Answer, field: &str) {
    assert_eq!(
        answer.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        answer.body
    );
    assert_eq!(answer.body["errors"][0]["field"], field);
}

/// A batch over `api.max_batch` is 422 and costs one request, not its
/// length: a 429 would have its client retry what can never pass.
#[tokio::test]
async fn an_oversized_batch_is_422_and_costs_one_request() {
    let stack = Stack::new("api-batch-max");
    let api = stack.api().await;
    let router = api.router();
    let key = limited_key(&api, "3/m").await;
    let max = stack.settings.api.max_batch;
    assert_invalid(&send_batch(&router, &key, max + 1).await, "messages");
    for _ in 0..2 {
        assert_eq!(send_as(&router, &key).await.status, StatusCode::ACCEPTED);
    }
    assert_eq!(
        send_as(&router, &key).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[tokio::test]
async fn concurrent_requests_on_two_replicas_get_exactly_the_budget() {
    let stack = Stack::new("api-429-race");
    let (first, second) = (stack.api().await, stack.api().await);
    let key = limited_key(&first, "5/m").await;
    let routers = [first.router(), second.router()];
    let calls = (0..24).map(|i| send_as(&routers[i % 2], &key));
    let statuses: Vec<StatusCode> = futures_util::future::join_all(calls)
        .await
        .into_iter()
        .map(|answer| answer.status)
        .collect();
    let accepted = statuses
        .iter()
        .filter(|status| **status == StatusCode::ACCEPTED)
        .count();
    let limited = statuses
        .iter()
        .filter(|status| **status == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!((accepted, limited), (5, 19), "{statuses:?}");
}

#[tokio::test]
async fn idempotency_keys_replay_race_and_refuse_other_bodies() {
    let stack = Stack::new("api-idem");
    let api = stack.api().await;
    let router = api.router();
    let key = key(&api, "acme").await;
    let with_key = |body: &Value| {
        let mut request = post("/v1/messages", Some(&key), body);
        request
            .headers_mut()
            .insert("idempotency-key", "order-42".parse().expect("value"));
        request
    };
    let requests: Vec<_> = (0..10).map(|_| with_key(&message("Order 42"))).collect();
    let answers = futures_util::future::join_all(
        requests
            .into_iter()
            .map(|request| call(&router, LOCAL, request)),
    )
    .await;
    let ids: Vec<&str> = answers
        .iter()
        .map(|a| {
            assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
            a.body["id"].as_str().expect("id")
        })
        .collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    let replayed = answers
        .iter()
        .filter(|a| a.headers.get("idempotent-replayed").is_some())
        .count();
    assert_eq!(replayed, 9);
    assert_eq!(
        stack.vhost.work_depth().await,
        1,
        "one job for ten requests"
    );
    let answer = call(&router, LOCAL, with_key(&message("Another body"))).await;
    assert_eq!(answer.status, StatusCode::UNPROCESSABLE_ENTITY);
}

/// Takes every job from the transactional queue and opens it.
async fn queued_jobs(stack: &Stack, tenant: &str) -> Vec<mailroom_core::job::SendJob> {
    let producer = Producer::connect(&stack.settings).await.expect("producer");
    let channel = producer.broker().channel().await.expect("channel");
    let keyring = stack.settings.keyring().expect("keyring");
    let mut jobs = Vec::new();
    while let Some(got) = channel
        .basic_get(
            wire::work_queue(Lane::Transactional).into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .expect("get")
    {
        let properties = &got.delivery.properties;
        let id: JobId = properties
            .message_id()
            .as_ref()
            .expect("message id")
            .as_str()
            .parse()
            .expect("job id");
        let table = properties.headers().clone().expect("headers");
        let kid = match table.inner().get(headers::KID) {
            Some(lapin::types::AMQPValue::LongString(text)) => text.to_string(),
            other => panic!("kid header: {other:?}"),
        };
        jobs.push(
            keyring
                .open(&kid, &id, tenant, &got.delivery.data)
                .expect("opens"),
        );
    }
    producer.close().await;
    jobs
}

/// A client whose request failed with 503 retries it with the same
/// `Idempotency-Key`; the first publish may have reached the queue all the
/// same. The key goes into the jobs, so the worker sends one of them.
#[tokio::test]
async fn the_idempotency_key_header_becomes_the_jobs_key() {
    let stack = Stack::new("api-idem-job");
    let api = stack.api().await;
    let router = api.router();
    let key = key(&api, "acme").await;
    let with_header = |path: &str, body: &Value, header: &str| {
        let mut request = post(path, Some(&key), body);
        request
            .headers_mut()
            .insert("idempotency-key", header.parse().expect("value"));
        request
    };
    let own = json!({
        "message": message("Own key")["message"],
        "idempotency_key": "chosen-by-the-job"
    });
    for request in [
        with_header("/v1/messages", &message("Single"), "order-7"),
        with_header("/v1/messages", &own, "order-8"),
        with_header("/v1/messages", &message("Lookalike"), "batch-9#0"),
        with_header(
            "/v1/messages/batch",
            &json!({"messages": [message("First"), message("Second")]}),
            "batch-9",
        ),
        post("/v1/messages", Some(&key), &message("No header")),
    ] {
        let answer = call(&router, LOCAL, request).await;
        assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.body);
    }
    let mut keys: Vec<(String, Option<String>)> = queued_jobs(&stack, "acme")
        .await
        .into_iter()
        .map(|job| (job.message.subject, job.idempotency_key))
        .collect();
    keys.sort();
    // A batch item's key is derived apart from any chosen by hand (the
    // `Lookalike`'s), so neither is deduplicated away by the other.
    let item = |index: usize| {
        let (_, key) = &keys[if index == 0 { 0 } else { 4 }];
        let key = key.clone().expect("an item's key");
        let stem = key.strip_suffix(&format!("#{index}")).expect("#index");
        assert!(stem.starts_with("batch:") && stem.len() == 38, "{key}");
        stem.to_owned()
    };
    assert_eq!(item(0), item(1), "one batch, one stem");
    let some = |text: &str| Some(text.to_owned());
    assert_eq!(
        keys.iter()
            .map(|(subject, key)| (subject.as_str(), key.clone()))
            .filter(|(subject, _)| !["First", "Second"].contains(subject))
            .collect::<Vec<_>>(),
        vec![
            ("Lookalike", some("batch-9#0")),
            ("No header", None),
            ("Own key", some("chosen-by-the-job")),
            ("Single", some("order-7")),
        ]
    );
}

#[tokio::test]
async fn revocation_takes_effect_on_another_replica_at_once() {
    let stack = Stack::new("api-revoke");
    let first = stack.api().await;
    let second = stack.api().await;
    let (key, record) = first
        .keys()
        .create(new_key("acme", &[Scope::Send]))
        .await
        .expect("key");
    let router = second.router();
    assert_eq!(send_as(&router, &key).await.status, StatusCode::ACCEPTED);
    assert!(first.keys().revoke(&record.id).await.expect("revoke"));
    assert_eq!(
        send_as(&router, &key).await.status,
        StatusCode::UNAUTHORIZED
    );
}

/// A 503 that says when to come back.
fn assert_unavailable(answer: &Answer) {
    assert_eq!(
        answer.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        answer.body
    );
    assert!(answer.headers.contains_key("retry-after"));
}

/// A full work queue (the broker nacks) is a 503 that says so, not a
/// broker "unavailable"; once it takes messages again, so does the API.
#[tokio::test]
async fn a_full_work_queue_is_503_saying_so_and_passes() {
    let stack = Stack::new("api-full");
    let api = stack.api().await;
    let router = api.router();
    let key = key(&api, "acme").await;
    let queue = mailroom_core::wire::work_queue(mailroom_core::job::Lane::Transactional);
    rabbitmqctl(&[
        "set_policy",
        "-p",
        stack.vhost.name(),
        "full",
        &format!("^{queue}$"),
        r#"{"max-length":0,"overflow":"reject-publish"}"#,
        "--apply-to",
        "queues",
    ]);
    let start = std::time::Instant::now();
    let refused = loop {
        let answer = send_as(&router, &key).await;
        if answer.status != StatusCode::ACCEPTED {
            break answer;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "never refused");
    };
    assert_unavailable(&refused);
    let detail = refused.body["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("refused the job"), "{detail}");
    rabbitmqctl(&["clear_policy", "-p", stack.vhost.name(), "full"]);
    let start = std::time::Instant::now();
    while send_as(&router, &key).await.status != StatusCode::ACCEPTED {
        assert!(start.elapsed() < Duration::from_secs(20), "still refused");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn the_broker_out_of_reach_is_503_with_retry_after_and_nothing_done() {
    let stack = Stack::new("api-503");
    let api = stack.api().await;
    let router = api.router();
    let key = key(&api, "acme").await;
    assert_eq!(send_as(&router, &key).await.status, StatusCode::ACCEPTED);
    // The broker refuses the producer from now on.
    rabbitmqctl(&["clear_permissions", "-p", stack.vhost.name(), "guest"]);
    stack.vhost.close_connections("mailroom-producer");
    assert_unavailable(&send_as(&router, &key).await);
    // A batch none of which got through is a 503 too, and its answer is
    // not kept for its Idempotency-Key: the retry must do the work.
    let batch = || {
        let mut request = post(
            "/v1/messages/batch",
            Some(&key),
            &json!({"messages": [message("one"), message("two")]}),
        );
        request
            .headers_mut()
            .insert("idempotency-key", "batch-1".parse().expect("value"));
        request
    };
    assert_unavailable(&call(&router, LOCAL, batch()).await);
    rabbitmqctl(&[
        "set_permissions",
        "-p",
        stack.vhost.name(),
        "guest",
        ".*",
        ".*",
        ".*",
    ]);
    // A failed reconnect's error is handed out for a second before the
    // next attempt, so the first tries after the broker is back may still
    // be refused, each with nothing done.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut answer = send_as(&router, &key).await;
    while answer.status != StatusCode::ACCEPTED && tokio::time::Instant::now() < deadline {
        assert_unavailable(&answer);
        tokio::time::sleep(Duration::from_millis(200)).await;
        answer = send_as(&router, &key).await;
    }
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.body);
    let answer = call(&router, LOCAL, batch()).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.body);
    assert!(!answer.headers.contains_key("idempotent-replayed"));
    assert_eq!(
        stack.vhost.work_depth().await,
        4,
        "the refused requests left nothing behind"
    );
}

#[tokio::test]
async fn readiness_comes_back_after_a_lost_broker_connection_without_a_request() {
    let stack = Stack::new("api-ready");
    let api = stack.api().await;
    let router = api.router();
    let ready = || async {
        let request = Request::get("/readyz")
            .body(Body::empty())
            .expect("request");
        call(&router, LOCAL, request).await
    };
    assert_eq!(ready().await.status, StatusCode::OK);
    assert!(stack.vhost.close_connections("mailroom-producer") >= 1);
    // Until a probe finds the connection dead, nothing reconnects it: only
    // a probe may, since no request comes.
    let until = |wanted: StatusCode, within: u64| {
        let ready = &ready;
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(within);
            let mut answer = ready().await;
            while answer.status != wanted && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
                answer = ready().await;
            }
            answer
        }
    };
    let answer = until(StatusCode::SERVICE_UNAVAILABLE, 5).await;
    assert_eq!(
        answer.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "the close was not seen"
    );
    let answer = until(StatusCode::OK, 15).await;
    assert_eq!(answer.status, StatusCode::OK);
}

#[tokio::test]
async fn redis_out_of_reach_is_503_with_retry_after_and_nothing_enqueued() {
    let mut stack = Stack::new("api-503-redis");
    let mut redis = mailroom_tests::redis::PrivateRedis::start();
    stack.settings.redis = redis.settings("mailroom-test:");
    stack.settings.redis.timeout = Duration::from_millis(500);
    let api = stack.api().await;
    let router = api.router();
    let known = key(&api, "acme").await;
    // Remembered by this replica: only the rate-limit check needs Redis.
    assert_eq!(send_as(&router, &known).await.status, StatusCode::ACCEPTED);
    let unknown = "mr_live_BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB";

    redis.stop();
    for key in [known.as_str(), unknown] {
        assert_unavailable(&send_as(&router, key).await);
    }
    assert_eq!(
        stack.vhost.work_depth().await,
        1,
        "a refused request left nothing behind"
    );

    // Back, empty (it keeps nothing on disk): the old key is gone, a new
    // one works.
    redis.restart();
    let answer = send_as(&router, &known).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{}", answer.body);
    let fresh = key(&api, "acme").await;
    assert_eq!(send_as(&router, &fresh).await.status, StatusCode::ACCEPTED);
}

/// A client that goes away mid-request: the work it started runs to its
/// end, so its `Idempotency-Key` is not left pending (a retry got 409 for a
/// minute) and its jobs are enqueued once, whether the retry finds them
/// done (a replay) or finds nothing done; it is logged as 499, with its
/// caller.
#[tokio::test]
async fn a_request_whose_client_went_away_leaves_no_key_pending_and_is_logged() {
    let stack = Stack::new("api-gone");
    let api = stack.api().await;
    let router = api.router();
    let key = key(&api, "acme").await;
    let captured = Captured::default();
    let _guard = captured.install();
    let messages: Vec<Value> = (0..50).map(|i| message(&format!("m{i}"))).collect();
    let batch = || {
        let mut request = post(
            "/v1/messages/batch",
            Some(&key),
            &json!({ "messages": messages }),
        );
        request
            .headers_mut()
            .insert("idempotency-key", "gone-1".parse().expect("value"));
        request
    };
    // The client leaves once its request took the idempotency key: it was
    // authenticated and its work begun. A fixed wait could end before
    // either on a loaded machine, and leave nothing to test.
    let store = RedisStore::connect(&stack.settings.redis)
        .await
        .expect("redis");
    let mut redis = store.connection();
    let pattern = store.key("idem:*");
    let begun = async {
        loop {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(&pattern)
                .query_async(&mut redis)
                .await
                .expect("keys");
            if !keys.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::select! {
        answer = call(&router, LOCAL, batch()) => {
            panic!("the client was to leave before its answer: {}", answer.status)
        }
        () = begun => {}
    }
    let started = tokio::time::Instant::now();
    let retry = call(&router, LOCAL, batch()).await;
    assert_eq!(retry.status, StatusCode::ACCEPTED, "{}", retry.body);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(stack.vhost.work_depth().await, 50, "enqueued once");
    let lines = captured.access_lines();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["status"], 499, "{lines:?}");
    assert_eq!(lines[1]["status"], 202, "{lines:?}");
    // Both name the caller, the answered one its jobs too.
    assert!(
        lines.iter().all(|line| line["tenant"] == "acme"),
        "{lines:?}"
    );
    let named = lines[1]["job_ids"]
        .as_str()
        .map(|ids| ids.split(',').count());
    assert_eq!(named, Some(50), "{lines:?}");
}

/// A refused credential is a bare `401` to the client; the access log
/// says why.
#[tokio::test]
async fn a_refused_key_is_logged_with_why() {
    let stack = Stack::new("api-refusal-log");
    let api = stack.api().await;
    let router = api.router();
    let captured = Captured::default();
    let _guard = captured.install();
    let unknown = format!("mr_live_{}", "A".repeat(43));
    let answer = call(
        &router,
        LOCAL,
        post("/v1/messages", Some(&unknown), &message("x")),
    )
    .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert!(
        !answer.body.to_string().contains("unknown"),
        "{}",
        answer.body
    );
    let answer = call(&router, LOCAL, post("/v1/messages", None, &message("x"))).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    let lines = captured.access_lines();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["refusal"], "unknown API key", "{lines:?}");
    assert_eq!(lines[1]["refusal"], "no bearer credential", "{lines:?}");
}

/// A request cut short by `api.request_timeout` (a body that never
/// ends) is logged with the caller it was authenticated as.
#[tokio::test]
async fn a_timed_out_request_is_logged_with_its_caller() {
    let stack = Stack::new("api-timeout-log");
    let mut settings = stack.settings.clone();
    settings.api.request_timeout = Duration::from_millis(300);
    let api = stack.api_with(&settings).await;
    let router = api.router();
    let key = key(&api, "acme").await;
    let captured = Captured::default();
    let _guard = captured.install();
    let (release, holder) = trickle(&router, &key, 1024);
    let answer = holder.await.expect("the request ends");
    drop(release);
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    let lines = captured.access_lines();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["tenant"], "acme", "{lines:?}");
    assert!(
        lines[0]["key_id"]
            .as_str()
            .is_some_and(|id| id.starts_with("key_")),
        "{lines:?}"
    );
}

#[tokio::test]
async fn the_access_log_names_no_recipient_subject_body_or_key() {
    let stack = Stack::new("api-log");
    let api = stack.api().await;
    let router = api.router();
    let key = key(&api, "acme").await;
    let captured = Captured::default();
    let _guard = captured.install();
    let answer = call(
        &router,
        LOCAL,
        post("/v1/messages", Some(&key), &message("Quarterly secrets")),
    )
    .await;
    assert_eq!(answer.status, StatusCode::ACCEPTED);
    let invalid = json!({"message": {"from": "grace@example.net", "to": ["bad address"], "subject": "Hidden", "text": "t"}});
    call(&router, LOCAL, post("/v1/messages", Some(&key), &invalid)).await;
    let log = captured.text();
    assert!(log.contains("mailroom::access"), "no access log: {log}");
    assert!(
        log.contains(answer.body["id"].as_str().expect("id")),
        "job id missing: {log}"
    );
    for secret in [
        "ada@example.org",
        "Lovelace",
        "grace@example.net",
        "Quarterly secrets",
        "Hidden",
        "secret order body",
        key.as_str(),
        &key[8..],
    ] {
        assert!(!log.contains(secret), "{secret:?} in the log:\n{log}");
    }
}

#[test]
fn arbitrary_bodies_get_an_answer_and_never_a_panic() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let stack = Stack::new("api-fuzz");
    let (router, key) = runtime.block_on(async {
        let api = stack.api().await;
        let key = key(&api, "fuzz").await;
        (api.router(), key)
    });
    let strategy = (
        proptest::collection::vec(any::<u8>(), 0..512),
        "[{}\\[\\]\":,a-z0-9 @.-]{0,200}",
    );
    let mut runner = TestRunner::new(Config {
        cases: 128,
        ..Config::default()
    });
    runner
        .run(&strategy, |(bytes, json_like)| {
            runtime.block_on(async {
                for payload in [bytes.clone(), json_like.clone().into_bytes()] {
                    for path in ["/v1/messages", "/v1/messages/batch"] {
                        let request = Request::post(path)
                            .header("content-type", "application/json")
                            .header("authorization", format!("Bearer {key}"))
                            .body(Body::from(payload.clone()))
                            .expect("request");
                        let answer = call(&router, LOCAL, request).await;
                        prop_assert!(
                            answer.status.is_client_error()
                                || answer.status == StatusCode::ACCEPTED,
                            "{}",
                            answer.status
                        );
                    }
                }
                Ok(())
            })
        })
        .expect("every body gets an answer");
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_status() {
    let stack = Stack::new("api-metrics");
    let _ = mailroom_core::telemetry::prometheus();
    let api = stack.api().await;
    let router = api.router();
    call(&router, LOCAL, post("/v1/messages", None, &message("x"))).await;
    let request = Request::get("/metrics")
        .body(Body::empty())
        .expect("request");
    let response = router
        .clone()
        .layer(MockConnectInfo(
            "127.0.0.1:1".parse::<SocketAddr>().expect("addr"),
        ))
        .oneshot(request)
        .await
        .expect("infallible");
    assert_eq!(response.status(), StatusCode::OK);
    let text = String::from_utf8(
        axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("body")
            .to_vec(),
    )
    .expect("utf-8");
    assert!(
        text.contains(r#"mailroom_api_requests_total{route="/v1/messages",status="401"}"#),
        "{text}"
    );
    assert!(
        text.contains("mailroom_api_request_seconds_bucket"),
        "{text}"
    );
}

#[tokio::test]
async fn the_openapi_document_parses_and_covers_every_route() {
    use mailroom_producer::api::openapi::ROUTES;

    let stack = Stack::new("api-openapi");
    let api = stack.api().await;
    let router = api.router();
    let request = Request::get("/openapi.json")
        .body(Body::empty())
        .expect("request");
    let answer = call(&router, LOCAL, request).await;
    assert_eq!(answer.status, StatusCode::OK);
    let doc = answer.body;
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "{doc}"
    );
    let paths = doc["paths"].as_object().expect("paths");
    for (method, path) in ROUTES {
        assert!(
            paths
                .get(*path)
                .and_then(|item| item.get(*method))
                .is_some(),
            "{method} {path} undocumented"
        );
    }
    let documented: usize = paths
        .values()
        .map(|item| item.as_object().map_or(0, serde_json::Map::len))
        .sum();
    assert_eq!(
        documented,
        ROUTES.len(),
        "the document has operations the router lacks"
    );
    // The bodies are described, not free-form: a client can generate them.
    for (path, schema) in [
        ("/v1/messages", "JobRequest"),
        ("/v1/messages/batch", "Batch"),
    ] {
        let body = &paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"];
        assert_eq!(body["$ref"], format!("#/components/schemas/{schema}"));
        assert_eq!(doc["components"]["schemas"][schema]["type"], "object");
    }
    // Every documented route is served (the fallback answers 404 "Not found"
    // with no route; a served one never says that without a reason).
    for (method, path) in ROUTES {
        let uri = path.replace("{id}", "01a20000-0000-7000-8000-000000000000");
        let request = Request::builder()
            .method(method.to_uppercase().as_str())
            .uri(uri)
            .header("content-type", "application/json")
            .body(Body::from("{}"))
            .expect("request");
        let answer = call(&router, LOCAL, request).await;
        assert_ne!(
            answer.status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}"
        );
        assert!(
            answer.status != StatusCode::NOT_FOUND || *path == "/v1/messages/{id}",
            "{method} {path} is not routed"
        );
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    for status in ["202", "401", "413", "422", "429", "503"] {
        assert!(
            doc["paths"]["/v1/messages"]["post"]["responses"][status].is_object(),
            "{status} undocumented"
        );
    }
}

#[tokio::test]
async fn a_rotated_key_works_beside_the_old_one_until_its_grace_ends() {
    let stack = Stack::new("api-rotate");
    let api = stack.api().await;
    // Another replica rotates: the one serving remembers the old record.
    let other = stack.api().await;
    let router = api.router();
    let (old, record) = api
        .keys()
        .create(new_key("acme", &[Scope::Send]))
        .await
        .expect("key");
    assert_eq!(send_as(&router, &old).await.status, StatusCode::ACCEPTED);
    // Long enough for the two sends below on a loaded machine.
    let grace_end = OffsetDateTime::now_utc() + Duration::from_secs(4);
    let Rotated {
        key: new,
        record: rotated,
        ..
    } = other
        .keys()
        .rotate(&record.id, grace_end)
        .await
        .expect("rotate")
        .expect("the key exists");
    assert_eq!(rotated.tenant, "acme");
    assert_ne!(rotated.id, record.id);
    for key in [&old, &new] {
        let answer = send_as(&router, key).await;
        assert_eq!(answer.status, StatusCode::ACCEPTED);
    }
    let left = grace_end - OffsetDateTime::now_utc() + Duration::from_millis(500);
    tokio::time::sleep(left.try_into().unwrap_or_default()).await;
    let answer = send_as(&router, &old).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    let answer = send_as(&router, &new).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED);
    assert!(
        api.keys()
            .rotate("key_unknown", grace_end)
            .await
            .expect("rotate")
            .is_none()
    );
}

/// A body within the byte limit that would parse into far more memory
/// than its size (millions of tiny list items) is refused before parsing.
#[tokio::test]
async fn a_body_of_a_million_tiny_values_is_413() {
    let stack = Stack::new("api-values");
    let api = stack.api().await;
    let router = api.router();
    let key = key(&api, "acme").await;
    let recipients = format!("[{}\"\"]", "\"\",".repeat(1_000_000));
    let single = format!(
        r#"{{"message": {{"from": "shop@example.com", "to": {recipients}, "subject": "s", "text": "t"}}}}"#
    );
    let batch = format!(r#"{{"messages": [{}0]}}"#, "0,".repeat(1_000_000));
    for (path, body) in [("/v1/messages", single), ("/v1/messages/batch", batch)] {
        let request = Request::post(path)
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {key}"))
            .body(Body::from(body))
            .expect("request");
        let answer = call(&router, LOCAL, request).await;
        assert_eq!(
            answer.status,
            StatusCode::PAYLOAD_TOO_LARGE,
            "{path}: {}",
            answer.body
        );
    }
    assert_eq!(stack.vhost.work_depth().await, 0);
}

/// A batch larger than the key's burst could never pass: 422, not a 429
/// whose `Retry-After` would send the client round for ever.
#[tokio::test]
async fn a_batch_over_the_rate_limits_burst_is_422() {
    let stack = Stack::new("api-burst");
    let api = stack.api().await;
    let router = api.router();
    let key = limited_key(&api, "3/m").await;
    assert_invalid(&send_batch(&router, &key, 4).await, "messages");
    let answer = send_batch(&router, &key, 3).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.body);
}

/// Rotation never lengthens the old key's life, gives the new key the
/// old one's lifetime from now, refuses a key rotated before (its
/// successor's life would have been the grace), and never brings back an
/// expired key (whose index entry outlives it).
#[tokio::test]
async fn rotation_keeps_the_old_keys_earlier_expiry_and_refuses_an_expired_key() {
    let stack = Stack::new("api-rotate-expiry");
    let api = stack.api().await;
    let router = api.router();
    let soon = OffsetDateTime::now_utc() + Duration::from_hours(1);
    let (_, record) = key_expiring_at(&api, soon).await;
    let lifetime = soon - record.created_at;
    let grace_end = OffsetDateTime::now_utc() + Duration::from_hours(7 * 24);
    let rotated = api
        .keys()
        .rotate(&record.id, grace_end)
        .await
        .expect("rotate")
        .expect("the key exists");
    assert_eq!(rotated.old_until, soon);
    let new_expiry = rotated.record.expires_at.expect("an expiry");
    let drift = (new_expiry - rotated.record.created_at - lifetime).abs();
    assert!(drift < time::Duration::SECOND, "a fresh lifetime: {drift}");
    let listed = api.keys().list().await.expect("list");
    let old = listed
        .iter()
        .find(|l| l.record.id == record.id)
        .expect("old key listed");
    assert_eq!(old.record.expires_at, Some(soon), "grace lengthened it");
    match api.keys().rotate(&record.id, grace_end).await {
        Err(RotateError::AlreadyRotated { to, .. }) => assert_eq!(to, rotated.record.id),
        other => panic!("rotated a rotated key again: {other:?}"),
    }

    let (expired, record) =
        key_expiring_at(&api, OffsetDateTime::now_utc() + Duration::from_secs(1)).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let keys_before = api.keys().list().await.expect("list").len();
    match api.keys().rotate(&record.id, grace_end).await {
        Err(RotateError::Expired { id, .. }) => assert_eq!(id, record.id),
        other => panic!("rotated an expired key: {other:?}"),
    }
    assert_eq!(
        api.keys().list().await.expect("list").len(),
        keys_before,
        "a successor was made"
    );
    let answer = send_as(&router, &expired).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
}
