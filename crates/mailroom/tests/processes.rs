//! `mailroom` as processes: workers killed with SIGKILL mid-send, two of
//! them on one queue, SIGTERM under load, and one trace exported from the
//! API's request to the SMTP reply. Real RabbitMQ, Redis and SMTP.

use std::collections::HashSet;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use mailroom_core::job::{JobId, SendJob};
use mailroom_core::settings::OnUncertain;
use mailroom_producer::Producer;
use mailroom_producer::api::Api;
use mailroom_producer::api::keys::Scope;
use mailroom_tests::rabbit::rabbitmqctl;
use mailroom_tests::smtp::{Seen, SmtpOptions};
use mailroom_tests::stack::{Stack, new_key};
use mailroom_worker::dlq;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Bound on waits that only a broken build reaches.
const PATIENCE: Duration = Duration::from_mins(2);

/// A `mailroom` process; SIGKILLed if still running when dropped.
struct MailroomProcess {
    child: Child,
    log: std::path::PathBuf,
}

impl MailroomProcess {
    /// `mailroom worker` on `stack`.
    fn worker(stack: &Stack, dir: &Path, name: &str) -> Self {
        Self::start(stack, dir, name, "worker", &[])
    }

    /// `mailroom COMMAND` on `stack`, with `extra` variables; its stderr
    /// goes to `NAME.log` in `dir`.
    fn start(
        stack: &Stack,
        dir: &Path,
        name: &str,
        command: &str,
        extra: &[(&str, String)],
    ) -> Self {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_mailroom"))
            .arg(command)
            .current_dir(dir)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(stack.env())
            .envs(extra.iter().map(|(name, value)| (name, value)))
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("mailroom starts");
        Self { child, log }
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal}");
    }

    fn wait(&mut self, limit: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                start.elapsed() < limit,
                "mailroom did not exit; its log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for a line of the log that contains `text`; that line.
    async fn wait_for_line(&self, text: &str) -> String {
        let start = Instant::now();
        loop {
            if let Some(line) = self.log_text().lines().find(|line| line.contains(text)) {
                return line.to_owned();
            }
            assert!(
                start.elapsed() < PATIENCE,
                "no {text:?} in:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The health port's address, as the worker's start line gives it.
    async fn health_address(&self) -> String {
        let started = self.wait_for_line("worker started").await;
        let line: serde_json::Value = serde_json::from_str(&started).expect("a JSON log line");
        line["fields"]["health"]
            .as_str()
            .expect("health address")
            .to_owned()
    }

    /// The log's ERROR lines: a clean stop has none.
    fn errors(&self) -> Vec<String> {
        let text = self.log_text();
        text.lines()
            .filter(|line| line.contains(r#""level":"ERROR""#))
            .map(str::to_owned)
            .collect()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for MailroomProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn job(n: usize) -> SendJob {
    mailroom_tests::job(
        &format!("reader{n}@example.org"),
        &format!("message {n}"),
        &format!("body {n}"),
    )
}

async fn enqueue(stack: &Stack, count: usize) -> Vec<JobId> {
    let producer = Producer::connect(&stack.settings).await.expect("producer");
    let ids = producer
        .enqueue_many((0..count).map(job).collect())
        .await
        .into_iter()
        .map(|r| r.expect("enqueued"))
        .collect();
    producer.close().await;
    ids
}

/// The job ids of accepted messages, each as often as it was accepted.
fn accepted_ids(seen: &[Seen]) -> Vec<String> {
    seen.iter()
        .filter(|s| s.reply == "250")
        .filter_map(|s| s.message_id.clone())
        .map(|id| {
            id.trim_start_matches('<')
                .split('@')
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

/// Every job accepted exactly once.
fn assert_exactly_once(ids: &[JobId], seen: &[Seen]) {
    let accepted = accepted_ids(seen);
    let unique: HashSet<&String> = accepted.iter().collect();
    assert_eq!(unique.len(), accepted.len(), "a job was delivered twice");
    let wanted: HashSet<String> = ids.iter().map(ToString::to_string).collect();
    let got: HashSet<String> = accepted.into_iter().collect();
    assert_eq!(got, wanted, "every job delivered");
}

/// Starts a second worker that must deliver every job in `ids` once:
/// waits for them, waits `settle` more for a wrong repeat to show up, then
/// stops it and checks that its stop logged no error.
async fn second_worker_sends_each_once(stack: &Stack, dir: &Path, ids: &[JobId], settle: Duration) {
    let mut second = MailroomProcess::worker(stack, dir, "second");
    let accepted = stack.smtp.wait_accepted(ids.len(), PATIENCE);
    assert_eq!(accepted.len(), ids.len(), "{}", second.log_text());
    tokio::time::sleep(settle).await;
    assert_exactly_once(ids, &stack.smtp.seen());
    second.signal("TERM");
    assert!(second.wait(PATIENCE).success());
    assert_eq!(
        second.errors(),
        Vec::<String>::new(),
        "an idle stop logs no error"
    );
}

/// Starts a worker and kills it with SIGKILL once the relay has its
/// message and sits on the reply (the relay must be told to `hang`).
async fn kill_after_hand_over(stack: &Stack, dir: &Path) {
    let mut first = MailroomProcess::worker(stack, dir, "first");
    let start = Instant::now();
    while stack.smtp.seen().is_empty() {
        assert!(start.elapsed() < PATIENCE, "{}", first.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.signal("KILL");
    first.wait(PATIENCE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_redelivered_after_its_worker_was_killed_mid_send_is_delivered_once() {
    let stack = Stack::new(
        "kill9",
        &SmtpOptions {
            replies: vec!["hang"],
            ..SmtpOptions::default()
        },
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let ids = enqueue(&stack, 1).await;
    kill_after_hand_over(&stack, dir.path()).await;

    // Give a wrongly repeated send time to show up.
    second_worker_sends_each_once(&stack, dir.path(), &ids, Duration::from_secs(2)).await;
}

/// With `worker.on_uncertain = park`, a worker killed after the relay had
/// the whole message leaves a job that may have been sent: the next worker
/// parks it instead of sending it again, so does any other copy of the job
/// (a republish whose confirm was lost), and an operator's replay sends it
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_park_a_job_whose_worker_died_after_handing_it_over_is_parked_not_resent() {
    let mut stack = Stack::new(
        "kill9-park",
        &SmtpOptions {
            replies: vec!["hang"],
            ..SmtpOptions::default()
        },
    );
    stack.settings.worker.on_uncertain = OnUncertain::Park;
    let dir = tempfile::tempdir().expect("tempdir");
    let producer = Producer::connect(&stack.settings).await.expect("producer");
    let the_job = job(0);
    let id = producer.enqueue(the_job.clone()).await.expect("enqueued");
    kill_after_hand_over(&stack, dir.path()).await;

    let mut second = MailroomProcess::worker(&stack, dir.path(), "second");
    let parked = |count: usize| {
        let producer = &producer;
        let second = &second;
        async move {
            let start = Instant::now();
            loop {
                let letters = dlq::list(producer.broker(), 10).await.expect("dlq list");
                if letters.len() >= count {
                    return letters;
                }
                assert!(start.elapsed() < PATIENCE, "{}", second.log_text());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let letters = parked(1).await;
    assert_eq!(letters[0].id, id.to_string());
    assert_eq!(letters[0].reason, "uncertain");
    // A second copy of the same job is parked too.
    producer.enqueue(the_job).await.expect("enqueued again");
    let letters = parked(2).await;
    assert!(letters.iter().all(|letter| letter.reason == "uncertain"));
    assert_eq!(stack.smtp.seen().len(), 1, "not sent a second time");

    // Replaying both sends the job once.
    let replayed = dlq::replay(producer.broker(), &dlq::Selection::All, None)
        .await
        .expect("replay");
    assert_eq!(replayed.len(), 2);
    let accepted = stack.smtp.wait_accepted(1, PATIENCE);
    assert_eq!(accepted.len(), 1, "{}", second.log_text());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(stack.smtp.accepted().len(), 1, "{}", second.log_text());
    assert!(
        dlq::list(producer.broker(), 10)
            .await
            .expect("dlq")
            .is_empty()
    );
    producer.close().await;
    second.signal("TERM");
    assert!(second.wait(PATIENCE).success());
}

/// A worker whose broker went away (its vhost deleted: every reconnect is
/// refused) still stops at once on SIGTERM, with exit code 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_the_broker_gone_exits_at_once() {
    let stack = Stack::new("term-no-broker", &SmtpOptions::default());
    let dir = tempfile::tempdir().expect("tempdir");
    let mut worker = MailroomProcess::worker(&stack, dir.path(), "lonely");
    worker.wait_for_line("consuming").await;
    rabbitmqctl(&["delete_vhost", stack.vhost.name()]);
    worker.wait_for_line("consumer lost").await;
    worker.signal("TERM");
    let status = worker.wait(Duration::from_secs(10));
    assert!(status.success(), "{}", worker.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_worker_processes_on_one_queue_deliver_every_job_exactly_once() {
    let stack = Stack::new("two", &SmtpOptions::default());
    let dir = tempfile::tempdir().expect("tempdir");
    let ids = enqueue(&stack, 300).await;
    let mut a = MailroomProcess::worker(&stack, dir.path(), "a");
    let mut b = MailroomProcess::worker(&stack, dir.path(), "b");
    let accepted = stack.smtp.wait_accepted(ids.len(), PATIENCE);
    assert_eq!(
        accepted.len(),
        ids.len(),
        "{}\n{}",
        a.log_text(),
        b.log_text()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_exactly_once(&ids, &stack.smtp.seen());
    a.signal("TERM");
    b.signal("TERM");
    assert!(a.wait(PATIENCE).success(), "{}", a.log_text());
    assert!(b.wait(PATIENCE).success(), "{}", b.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_zero_and_loses_nothing() {
    let stack = Stack::new(
        "sigterm",
        &SmtpOptions {
            delay: Duration::from_millis(100),
            ..SmtpOptions::default()
        },
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let ids = enqueue(&stack, 200).await;
    let mut first = MailroomProcess::worker(&stack, dir.path(), "first");
    let start = Instant::now();
    while stack.smtp.accepted().len() < 20 {
        assert!(start.elapsed() < PATIENCE, "{}", first.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.signal("TERM");
    let status = first.wait(PATIENCE);
    assert!(
        status.success(),
        "exit {status}; log:\n{}",
        first.log_text()
    );
    let before = stack.smtp.accepted().len();
    assert!(before < ids.len(), "SIGTERM came after the work was done");
    assert_eq!(
        first.errors(),
        Vec::<String>::new(),
        "a clean stop logs no error"
    );

    second_worker_sends_each_once(&stack, dir.path(), &ids, Duration::from_secs(1)).await;
}

/// Between SIGTERM and its exit the worker still answers a liveness probe
/// and a scrape (a drain may take `worker.shutdown_grace`, and a probe
/// that failed meanwhile would have it killed mid-send), and `/readyz`
/// says it is stopping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_it_drains_the_worker_answers_probes_and_says_it_is_stopping() {
    let stack = Stack::new(
        "drain-probes",
        &SmtpOptions {
            delay: Duration::from_millis(1500),
            ..SmtpOptions::default()
        },
    );
    let dir = tempfile::tempdir().expect("tempdir");
    enqueue(&stack, 4).await;
    let mut worker = MailroomProcess::worker(&stack, dir.path(), "worker");
    let health = worker.health_address().await;
    let health = health.as_str();
    // The jobs are in the relay's hands, which answers slowly.
    tokio::time::sleep(Duration::from_millis(500)).await;
    worker.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let alive = exchange(health, &get("/healthz")).await;
    assert!(alive.starts_with("HTTP/1.1 200"), "{alive}");
    let ready = exchange(health, &get("/readyz")).await;
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    assert!(ready.ends_with("stopping\n"), "{ready}");
    let metrics = exchange(health, &get("/metrics")).await;
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(worker.wait(PATIENCE).success(), "{}", worker.log_text());
}

/// Every counter a dashboard or an alert reads is exported at 0 before its
/// first event: `increase()` over a series that appears at 1 is 0, so the
/// first dead letter after a restart would raise no alert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_worker_exports_every_counter_at_zero_and_refuses_oversized_headers() {
    let stack = Stack::new("metrics", &SmtpOptions::default());
    let dir = tempfile::tempdir().expect("tempdir");
    let mut worker = MailroomProcess::worker(&stack, dir.path(), "worker");
    let health = worker.health_address().await;
    let health = health.as_str();
    let metrics = exchange(health, &get("/metrics")).await;
    for series in [
        r#"mailroom_jobs_total{outcome="sent"} 0"#,
        r#"mailroom_jobs_total{outcome="dead"} 0"#,
        r#"mailroom_retries_total{tier="30s"} 0"#,
        r#"mailroom_dead_letters_total{reason="rejected"} 0"#,
        r#"mailroom_dead_letters_total{reason="seal"} 0"#,
        "mailroom_in_flight 0",
    ] {
        assert!(metrics.contains(series), "no {series} in:\n{metrics}");
    }
    // The health port runs on the API's hardened listener.
    let oversized = format!(
        "GET /healthz HTTP/1.1\r\nHost: worker\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let answer = exchange(health, &oversized).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    worker.signal("TERM");
    assert!(worker.wait(PATIENCE).success(), "{}", worker.log_text());
}

/// An OTLP/gRPC collector: what the processes export, kept as sent.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    /// Serves on a free port of the loopback; its endpoint URL.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        format!("http://{address}")
    }

    /// Every span received, with the service that sent it.
    fn spans(&self) -> Vec<(String, Span)> {
        let requests = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let mut spans = Vec::new();
        for resource_spans in requests.iter().flat_map(|r| &r.resource_spans) {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|resource| &resource.attributes)
                .find(|attribute| attribute.key == "service.name")
                .map(|attribute| format!("{:?}", attribute.value))
                .unwrap_or_default();
            for scope in &resource_spans.scope_spans {
                spans.extend(
                    scope
                        .spans
                        .iter()
                        .map(|span| (service.clone(), span.clone())),
                );
            }
        }
        spans
    }

    /// Everything received, as text.
    fn text(&self) -> String {
        format!(
            "{:?}",
            self.0.lock().unwrap_or_else(PoisonError::into_inner)
        )
    }
}

/// Sends `request` (one that asks to close the connection) to `address`;
/// the whole answer.
/// A `GET` of `path` on the health port, closing the connection after it.
fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: worker\r\nConnection: close\r\n\r\n")
}

async fn exchange(address: &str, request: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    // A server that refuses a request before reading all of it may reset
    // the connection after its answer: what came before the reset counts.
    let _ = stream.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// POSTs `body` to the API at `address`; the status line and the body.
async fn post(address: &str, headers: &str, body: &str) -> String {
    let request = format!(
        "POST /v1/messages HTTP/1.1\r\nHost: api\r\nConnection: close\r\n{headers}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    exchange(address, &request).await
}

/// The caller's `traceparent` starts one trace that runs through the API's
/// request, the enqueue, the worker's processing and its SMTP exchange,
/// each span the child of the one before, across two processes; and none
/// of it holds the recipient, the subject, the body or the API key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_runs_from_the_callers_request_to_the_smtp_reply() {
    let collector = Collector::default();
    let endpoint = collector.start().await;
    let stack = Stack::new("trace", &SmtpOptions::default());
    let dir = tempfile::tempdir().expect("tempdir");
    let (key, _) = Api::connect(&stack.settings)
        .await
        .expect("api")
        .keys()
        .create(new_key("acme", &[Scope::Send]))
        .await
        .expect("key");
    let otlp = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("MAILROOM__API__BIND", "127.0.0.1:0".to_owned()),
    ];
    let mut worker = MailroomProcess::start(&stack, dir.path(), "worker", "worker", &otlp);
    let mut api = MailroomProcess::start(&stack, dir.path(), "api", "api", &otlp);
    let listening = api.wait_for_line("listening on http://").await;
    let address = listening
        .rsplit("http://")
        .next()
        .expect("address")
        .trim()
        .to_owned();
    worker.wait_for_line("consuming").await;

    let (trace_id, caller_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let (recipient, subject, text) = (
        "traced.reader@example.org",
        "Your traced order",
        "traced body text",
    );
    let body = serde_json::json!({
        "message": {"from": "shop@example.com", "to": [recipient], "subject": subject, "text": text}
    })
    .to_string();
    let headers =
        format!("Authorization: Bearer {key}\r\ntraceparent: 00-{trace_id}-{caller_span}-01\r\n");
    let answer = post(&address, &headers, &body).await;
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    assert_eq!(stack.smtp.wait_accepted(1, PATIENCE).len(), 1);

    // Both export what is left when they stop.
    api.signal("TERM");
    worker.signal("TERM");
    assert!(api.wait(PATIENCE).success(), "{}", api.log_text());
    assert!(worker.wait(PATIENCE).success(), "{}", worker.log_text());

    let spans = collector.spans();
    let named = |name: &str| {
        spans
            .iter()
            .find(|(_, span)| span.name == name)
            .unwrap_or_else(|| panic!("no {name} span among {spans:#?}"))
    };
    let (api_service, http) = named("mailroom.http");
    let (_, enqueue) = named("mailroom.enqueue");
    let (worker_service, process) = named("mailroom.process");
    let (_, smtp) = named("mailroom.smtp");
    assert_ne!(api_service, worker_service, "two processes, two services");
    for (child, parent) in [
        (http, None),
        (enqueue, Some(http)),
        (process, Some(enqueue)),
        (smtp, Some(process)),
    ] {
        assert_eq!(
            hex::encode(&child.trace_id),
            trace_id,
            "{} is in the caller's trace",
            child.name
        );
        let parent_id = parent.map_or_else(
            || caller_span.to_owned(),
            |parent| hex::encode(&parent.span_id),
        );
        assert_eq!(
            hex::encode(&child.parent_span_id),
            parent_id,
            "{}'s parent",
            child.name
        );
    }
    let exported = collector.text();
    for secret in [recipient, subject, text, key.as_str()] {
        assert!(!exported.contains(secret), "{secret:?} was exported");
    }
}
