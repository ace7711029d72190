//! The worker end to end, in process: a real RabbitMQ vhost, a real Redis
//! prefix and a real SMTP server (aiosmtpd) per test.

use std::time::{Duration, Instant};

use base64::Engine as _;
use lapin::options::BasicGetOptions;
use mailroom_core::amqp::{Broker, Outgoing};
use mailroom_core::job::{Attachment, JobId, Lane, SendJob};
use mailroom_core::settings::{OnUncertain, Secret, Settings};
use mailroom_core::status::{JobState, JobStatus, StatusStore, StatusUpdate};
use mailroom_core::store::RedisStore;
use mailroom_core::wire;
use mailroom_producer::Producer;
use mailroom_tests::rabbit::RewritingProxy;
use mailroom_tests::redis::TestPrefix;
use mailroom_tests::smtp::SmtpOptions;
use mailroom_tests::stack::Stack;
use mailroom_worker::Worker;
use mailroom_worker::dlq;
use mailroom_worker::pool::Drained;
use mailroom_worker::steps::dedup::{Claim, Dedup};
use time::OffsetDateTime;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Long enough for any of these tests' jobs to settle on a loaded machine;
/// reached only when something is broken.
const PATIENCE: Duration = Duration::from_mins(1);

/// An attachment that is not text, so it must travel base64-encoded.
const RECEIPT: &[u8] = b"%PDF-1.4\n\x00\x01\x02\xff\xfe binary receipt";

struct Running {
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("worker task");
    }
}

/// SMTP options with scripted replies.
fn replies(replies: &[&'static str]) -> SmtpOptions {
    SmtpOptions {
        replies: replies.to_vec(),
        ..SmtpOptions::default()
    }
}

/// A producer and a running worker for `settings`.
async fn start(settings: &Settings) -> (Producer, Running) {
    let producer = Producer::connect(settings).await.expect("producer");
    (producer, start_worker(settings).await)
}

/// Stops what [`start`] started.
async fn stop(worker: Running, producer: Producer) {
    worker.stop().await;
    producer.close().await;
}

async fn start_worker(settings: &Settings) -> Running {
    let worker = Worker::connect(settings).await.expect("worker connects");
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        let drained = worker.run(token).await;
        assert!(drained.clean, "worker drained cleanly");
    });
    Running { shutdown, task }
}

fn job(subject: &str) -> SendJob {
    mailroom_tests::job(
        "Ada <ada@example.org>",
        subject,
        &format!("Body of {subject}"),
    )
}

/// Enqueues `jobs` pipelined; their ids, in order.
async fn enqueue_all(producer: &Producer, jobs: Vec<SendJob>) -> Vec<JobId> {
    producer
        .enqueue_many(jobs)
        .await
        .into_iter()
        .map(|r| r.expect("enqueued"))
        .collect()
}

async fn statuses(settings: &Settings) -> StatusStore {
    let store = RedisStore::connect(&settings.redis).await.expect("redis");
    StatusStore::new(store, Duration::from_mins(10))
}

/// Waits until `id`'s status is final.
async fn settled(store: &StatusStore, id: &JobId) -> JobStatus {
    status_once(store, id, "settled", JobState::is_final).await
}

/// Waits until `id`'s status is `state`; that status.
async fn reached(store: &StatusStore, id: &JobId, state: JobState) -> JobStatus {
    status_once(store, id, &format!("became {state}"), |now| now == state).await
}

/// Polls `id`'s status until its state passes `wanted` (`what` names that
/// in the failure); that status.
async fn status_once(
    store: &StatusStore,
    id: &JobId,
    what: &str,
    wanted: impl Fn(JobState) -> bool,
) -> JobStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = store.get(id).await.expect("status")
            && wanted(status.state)
        {
            return status;
        }
        assert!(start.elapsed() < PATIENCE, "job {id} never {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn dead_letters(producer: &Producer) -> Vec<dlq::DeadLetter> {
    dlq::list(producer.broker(), 100).await.expect("dlq list")
}

/// The dead letters once there are at least `n` (or patience ran out:
/// the caller checks how many).
async fn dead_lettered(producer: &Producer, n: usize) -> Vec<dlq::DeadLetter> {
    let start = Instant::now();
    loop {
        let letters = dead_letters(producer).await;
        if letters.len() >= n || start.elapsed() > PATIENCE {
            return letters;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_message_arrives_intact_over_starttls_with_auth() {
    let stack = Stack::new(
        "intact",
        &SmtpOptions {
            auth: Some(("mailer", "s3cret-pass")),
            ..SmtpOptions::default()
        },
    );
    let (producer, worker) = start(&stack.settings).await;
    let mut job = job("Your receipt");
    job.message.html = Some("<p>Thanks for <b>your order</b></p>".to_owned());
    job.message.cc = vec!["grace@example.net".to_owned()];
    job.message.bcc = vec!["audit@example.com".to_owned()];
    job.message
        .headers
        .insert("X-Campaign".to_owned(), "spring-sale".to_owned());
    job.message.attachments = vec![Attachment {
        filename: "receipt.pdf".to_owned(),
        content_type: "application/pdf".to_owned(),
        content: RECEIPT.to_vec(),
    }];
    let id = producer.enqueue(job).await.expect("enqueued");
    let status = settled(&statuses(&stack.settings).await, &id).await;
    assert_eq!(status.state, JobState::Sent);
    assert_eq!(status.attempts, 1);

    let accepted = stack.smtp.wait_accepted(1, PATIENCE);
    assert_eq!(accepted.len(), 1);
    let seen = &accepted[0];
    assert!(seen.tls, "STARTTLS was used");
    assert_eq!(seen.auth.as_deref(), Some("mailer"));
    assert_eq!(seen.mail_from, "shop@example.com");
    assert_eq!(
        seen.rcpt_tos,
        ["ada@example.org", "grace@example.net", "audit@example.com"]
    );
    assert_eq!(
        seen.message_id.as_deref(),
        Some(format!("<{id}@example.com>").as_str())
    );
    let raw = String::from_utf8(seen.raw.clone().expect("raw")).expect("utf-8");
    for needle in [
        "Subject: Your receipt",
        "X-Campaign: spring-sale",
        "Body of Your receipt",
        "your order",
        "filename=\"receipt.pdf\"",
        "Content-Type: application/pdf",
        "Cc: grace@example.net",
    ] {
        assert!(raw.contains(needle), "{needle:?} missing from\n{raw}");
    }
    assert!(
        !raw.contains("audit@example.com"),
        "Bcc leaked into headers"
    );
    // Binary content travels base64-encoded, byte for byte.
    let encoded = base64::engine::general_purpose::STANDARD.encode(RECEIPT);
    assert!(raw.contains(&encoded), "{raw}");
    stop(worker, producer).await;
}

/// Internationalized domains go out in their ASCII form, so a relay
/// without SMTPUTF8 (as this one) takes them: envelope and headers alike.
#[tokio::test]
async fn an_internationalized_domain_reaches_a_relay_without_smtputf8() {
    let stack = Stack::new("idn", &SmtpOptions::default());
    let (producer, worker) = start(&stack.settings).await;
    let mut job = job("IDN");
    job.message.from = "Shop <shop@bücher.example>".to_owned();
    job.message.to = vec!["Zoë <zoe@bücher.example>".to_owned()];
    let id = producer.enqueue(job).await.expect("enqueued");
    let status = settled(&statuses(&stack.settings).await, &id).await;
    assert_eq!(status.state, JobState::Sent, "{status:?}");

    let accepted = stack.smtp.wait_accepted(1, PATIENCE);
    let seen = &accepted[0];
    assert_eq!(seen.mail_from, "shop@xn--bcher-kva.example");
    assert_eq!(seen.rcpt_tos, ["zoe@xn--bcher-kva.example"]);
    assert_eq!(
        seen.message_id.as_deref(),
        Some(format!("<{id}@xn--bcher-kva.example>").as_str())
    );
    let raw = String::from_utf8(seen.raw.clone().expect("raw")).expect("utf-8");
    assert!(raw.is_ascii(), "{raw}");
    assert!(raw.contains("<zoe@xn--bcher-kva.example>"), "{raw}");
    stop(worker, producer).await;
}

#[tokio::test]
async fn an_untrusted_relay_is_never_sent_to() {
    // STARTTLS is required and the relay's certificate is not trusted: the
    // handshake fails, the job waits for a retry, nothing goes out in clear.
    let stack = Stack::new("plain", &SmtpOptions::default());
    let mut settings = stack.settings.clone();
    settings.smtp.ca_file = None; // the relay's certificate is not trusted
    let (producer, worker) = start(&settings).await;
    let id = producer.enqueue(job("untrusted")).await.expect("enqueued");
    let store = statuses(&settings).await;
    let status = reached(&store, &id, JobState::Retrying).await;
    let error = status.last_error.unwrap_or_default();
    assert!(
        error.contains("STARTTLS") || error.contains("tls"),
        "{error}"
    );
    assert!(stack.smtp.seen().is_empty(), "nothing reached DATA");
    stop(worker, producer).await;
}

#[tokio::test]
async fn the_same_idempotency_key_three_times_is_delivered_once() {
    let stack = Stack::new("idem", &SmtpOptions::default());
    let (producer, worker) = start(&stack.settings).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let mut job = job("Order 42 confirmed");
        job.idempotency_key = Some("order-42".to_owned());
        ids.push(producer.enqueue(job).await.expect("enqueued"));
    }
    let store = statuses(&stack.settings).await;
    let mut states = Vec::new();
    for id in &ids {
        states.push(settled(&store, id).await.state);
    }
    states.sort_by_key(|s| s.as_str());
    assert_eq!(
        states,
        [JobState::Duplicate, JobState::Duplicate, JobState::Sent]
    );
    assert_eq!(stack.smtp.accepted().len(), 1);
    stop(worker, producer).await;
}

/// A job larger than `worker.max_inflight_bytes` takes the whole budget
/// and runs alone; it does not wait forever for more than there is. The
/// jobs are over `offload::INLINE_MAX`, on a multi-thread runtime, so
/// their steps run handed off the async threads, and arrive whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_larger_than_the_byte_budget_all_arrive() {
    let mut stack = Stack::new("budget", &SmtpOptions::default());
    stack.settings.worker.max_inflight_bytes = 1024;
    let (producer, worker) = start(&stack.settings).await;
    let line = "a line of a long letter\n";
    let text = line.repeat(3_000);
    assert!(text.len() > mailroom_core::offload::INLINE_MAX);
    let mut ids = Vec::new();
    for i in 0..4 {
        let mut job = job(&format!("Long letter {i}"));
        job.message.text = Some(text.clone());
        ids.push(producer.enqueue(job).await.expect("enqueued"));
    }
    let store = statuses(&stack.settings).await;
    for id in &ids {
        assert_eq!(settled(&store, id).await.state, JobState::Sent);
    }
    let accepted = stack.smtp.accepted();
    assert_eq!(accepted.len(), 4);
    let crlf_line = line.replace('\n', "\r\n");
    for seen in accepted {
        let raw = String::from_utf8(seen.raw.expect("accepted")).expect("7-bit");
        assert_eq!(raw.matches(&crlf_line).count(), 3_000);
    }
    stop(worker, producer).await;
}

/// A body with a lone CR before a dot (`<CR>.<CR><LF>`, which some
/// relays read as the end of DATA) cannot end the message early and smuggle
/// the lines after it in as SMTP commands: the relay gets one message, whole.
#[tokio::test]
async fn a_body_that_tries_to_end_data_early_arrives_as_one_message() {
    let stack = Stack::new("smuggle", &SmtpOptions::default());
    let (producer, worker) = start(&stack.settings).await;
    let mut job = job("Smuggler");
    job.message.text = Some(
        "first\r.\r\nMAIL FROM:<evil@example.net>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\nlast"
            .to_owned(),
    );
    let id = producer.enqueue(job).await.expect("enqueued");
    let store = statuses(&stack.settings).await;
    assert_eq!(settled(&store, &id).await.state, JobState::Sent);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = stack.smtp.seen();
    assert_eq!(seen.len(), 1, "one message, no smuggled second one");
    assert_eq!(seen[0].rcpt_tos, ["ada@example.org"]);
    let raw = seen[0].raw.clone().expect("accepted");
    // What a lenient relay would misread never reaches one: every CR on
    // the wire is followed by LF, every LF preceded by CR.
    let bare = raw.iter().enumerate().any(|(i, &b)| {
        (b == b'\r' && raw.get(i + 1) != Some(&b'\n'))
            || (b == b'\n' && (i == 0 || raw[i - 1] != b'\r'))
    });
    let text = String::from_utf8_lossy(&raw);
    assert!(!bare, "a bare CR or LF reached the relay: {text:?}");
    assert!(
        text.contains("first\r\n.\r\nMAIL FROM:<evil@example.net>"),
        "{text:?}"
    );
    assert!(text.contains("last"), "{text:?}");
    stop(worker, producer).await;
}

#[tokio::test]
async fn two_transient_failures_then_delivered_once_on_attempt_three() {
    let stack = Stack::new("retry", &replies(&["451", "451", "250"]));
    let (producer, worker) = start(&stack.settings).await;
    let id = producer.enqueue(job("retry me")).await.expect("enqueued");
    let status = settled(&statuses(&stack.settings).await, &id).await;
    assert_eq!(status.state, JobState::Sent);
    assert_eq!(status.attempts, 3);
    let seen = stack.smtp.seen();
    let replies: Vec<_> = seen.iter().map(|s| s.reply.as_str()).collect();
    assert_eq!(replies, ["451", "451", "250"]);
    let message_id = format!("<{id}@example.com>");
    assert!(
        seen.iter()
            .all(|s| s.message_id.as_deref() == Some(message_id.as_str())),
        "every attempt carries the same Message-ID"
    );
    stop(worker, producer).await;
}

/// Waits until the large-job queue of the transactional lane holds `n`
/// jobs, and checks that its other queue holds none.
async fn waiting_in_large_queue(producer: &Producer, n: u32) {
    let large = wire::WorkQueue::of(Lane::Transactional, wire::LARGE_JOB_BYTES + 1).name();
    let start = Instant::now();
    while producer.broker().queue_depth(&large).await.expect("depth") != n {
        assert!(start.elapsed() < PATIENCE, "{large} never held {n}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let small = wire::work_queue(Lane::Transactional);
    assert_eq!(
        producer.broker().queue_depth(&small).await.expect("depth"),
        0
    );
}

/// A job over `wire::LARGE_JOB_BYTES` sealed is worked from its lane's
/// large-job queue, consumed with the small `worker.large_prefetch`, and
/// goes back there from a retry tier and from a dead-letter replay.
#[tokio::test]
async fn a_large_job_keeps_to_the_large_job_queue_through_retry_and_replay() {
    let mut stack = Stack::new("large", &replies(&["451", "550"]));
    stack.settings.worker.large_prefetch = 3;
    let (producer, worker) = start(&stack.settings).await;
    // The worker's consumers register as it starts: wait for all four.
    let start_at = Instant::now();
    let prefetch = loop {
        let listing = listed(&stack, "list_consumers", "queue_name", "prefetch_count");
        if listing.len() >= wire::WorkQueue::ALL.len() {
            break listing;
        }
        assert!(start_at.elapsed() < PATIENCE, "consumers: {listing:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let prefetch_of = |queue: &str| {
        prefetch
            .iter()
            .find(|(name, _)| name == queue)
            .map(|(_, count)| count.clone())
    };
    assert_eq!(
        prefetch_of("mailroom.send.transactional.large").as_deref(),
        Some("3")
    );
    assert_eq!(
        prefetch_of("mailroom.send.bulk.large").as_deref(),
        Some("2")
    );
    let prefetch = stack.settings.worker_prefetch().to_string();
    assert_eq!(
        prefetch_of("mailroom.send.transactional"),
        Some(prefetch),
        "jobs up to the threshold keep the pool's prefetch"
    );

    let mut large = job("Large letter");
    large.message.text = Some("a line of a long letter\n".repeat(12_000));
    let store = statuses(&stack.settings).await;
    let id = producer.enqueue(large).await.expect("enqueued");
    // The 451 sends it to a retry tier; with the worker stopped, it comes
    // back from there to wait in the large-job queue.
    reached(&store, &id, JobState::Retrying).await;
    worker.stop().await;
    waiting_in_large_queue(&producer, 1).await;

    let worker = start_worker(&stack.settings).await;
    assert_eq!(settled(&store, &id).await.state, JobState::Failed);
    worker.stop().await;
    let replayed = dlq::replay(
        producer.broker(),
        &dlq::Selection::Id(id.to_string()),
        Some(&store),
    )
    .await
    .expect("replay");
    assert_eq!(replayed.len(), 1);
    waiting_in_large_queue(&producer, 1).await;
    let requeued = store.get(&id).await.expect("status").expect("kept");
    assert_eq!(requeued.state, JobState::Queued);
    let worker = start_worker(&stack.settings).await;
    assert_eq!(settled(&store, &id).await.state, JobState::Sent);
    let replies: Vec<_> = stack.smtp.seen().into_iter().map(|s| s.reply).collect();
    assert_eq!(replies, ["451", "550", "250"]);
    stop(worker, producer).await;
}

/// With every pooled connection busy, the next deliveries wait, and the
/// holder writes the first one's MAIL, RCPT and DATA right after its own
/// end of DATA, then hands the connection over: the relay sees the next
/// commands before it answers, and every outcome (a retry, a rejection,
/// a connection dropped with the next commands written on it) still lands
/// on its own job, each message whole and sent once.
#[tokio::test]
async fn a_busy_connection_is_handed_over_with_the_next_commands_written() {
    let mut stack = Stack::new(
        "handover",
        &SmtpOptions {
            replies: vec!["250", "451", "250", "550", "250", "drop"],
            delay: Duration::from_millis(100),
            ..SmtpOptions::default()
        },
    );
    stack.settings.smtp.pool_size = 1;
    stack.settings.worker.retry.initial = Duration::from_secs(1);
    let (producer, worker) = start(&stack.settings).await;
    let jobs: Vec<SendJob> = (0..8).map(|i| job(&format!("Queued {i}"))).collect();
    let ids: Vec<JobId> = enqueue_all(&producer, jobs).await;
    let store = statuses(&stack.settings).await;
    let mut states = Vec::new();
    for id in &ids {
        states.push(settled(&store, id).await);
    }
    let seen = stack.smtp.seen();
    let sent: Vec<_> = states
        .iter()
        .filter(|s| s.state == JobState::Sent)
        .collect();
    let failed: Vec<_> = states
        .iter()
        .filter(|s| s.state == JobState::Failed)
        .collect();
    assert_eq!((sent.len(), failed.len()), (7, 1), "{states:?}");
    assert_eq!(
        sent.iter().filter(|s| s.attempts == 2).count(),
        2,
        "the 451 and the dropped one were retried: {states:?}"
    );
    let accepted = stack.smtp.accepted();
    assert_eq!(accepted.len(), 7, "each sent job once: {seen:?}");
    for message in &accepted {
        let raw = String::from_utf8(message.raw.clone().expect("accepted")).expect("7-bit");
        let subject = raw
            .lines()
            .find_map(|line| line.strip_prefix("Subject: "))
            .expect("subject");
        assert!(raw.contains(&format!("Body of {subject}")), "{raw}");
    }
    let dropped = seen.iter().find(|s| s.reply == "drop").expect("dropped");
    assert!(
        dropped.pipelined_after,
        "the connection dropped had the next commands on it"
    );
    let handed = seen.iter().filter(|s| s.pipelined_after).count();
    assert!(
        handed >= 3,
        "commands written after the end of DATA: {handed} of {}",
        seen.len()
    );
    stop(worker, producer).await;
}

#[tokio::test]
async fn a_permanent_rejection_is_dead_lettered_after_one_attempt() {
    let stack = Stack::new(
        "reject",
        &SmtpOptions {
            replies: vec!["550"],
            // Commands one by one here; the other tests pipeline them.
            no_pipelining: true,
            ..SmtpOptions::default()
        },
    );
    let (producer, worker) = start(&stack.settings).await;
    let id = producer.enqueue(job("bounce")).await.expect("enqueued");
    let status = settled(&statuses(&stack.settings).await, &id).await;
    assert_eq!(status.state, JobState::Failed);
    assert_eq!(status.attempts, 1);
    assert_eq!(status.reason.as_deref(), Some("rejected"));
    assert_eq!(stack.smtp.seen().len(), 1);
    let letters = dead_letters(&producer).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].id, id.to_string());
    assert_eq!(letters[0].reason, "rejected");
    assert!(letters[0].last_error.contains("550"), "{:?}", letters[0]);
    stop(worker, producer).await;
}

/// The next message of the transactional work queue, taken off it.
async fn take_queued(producer: &Producer) -> lapin::message::BasicGetMessage {
    let channel = producer.broker().channel().await.expect("channel");
    channel
        .basic_get(
            wire::work_queue(Lane::Transactional).into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .expect("get")
        .expect("the job")
}

/// A sealed job whose attempt header was rewritten to something no
/// producer writes is refused, not read as attempt 1 (which would reset its
/// retry budget); its replay, with the attempt reset, is sent.
#[tokio::test]
async fn a_job_with_a_bad_attempt_header_is_dead_lettered_invalid() {
    let stack = Stack::new("bad-attempt", &SmtpOptions::default());
    let producer = Producer::connect(&stack.settings).await.expect("producer");
    let id = producer
        .enqueue(job("odd attempt"))
        .await
        .expect("enqueued");
    let message = take_queued(&producer).await;
    let mut headers = message
        .delivery
        .properties
        .headers()
        .clone()
        .unwrap_or_default();
    headers.insert(
        wire::headers::ATTEMPT.into(),
        lapin::types::AMQPValue::LongString("abc".as_bytes().into()),
    );
    producer
        .broker()
        .publish(Outgoing {
            exchange: wire::JOBS_EXCHANGE.to_owned(),
            routing_key: Lane::Transactional.as_str().to_owned(),
            body: message.delivery.data.clone(),
            properties: message.delivery.properties.clone().with_headers(headers),
            mandatory: true,
        })
        .await
        .expect("republished");

    let worker = start_worker(&stack.settings).await;
    let letters = dead_lettered(&producer, 1).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].id, id.to_string());
    assert_eq!(letters[0].reason, "invalid");
    assert!(
        letters[0].last_error.contains("mailroom-attempt"),
        "{:?}",
        letters[0]
    );
    assert!(stack.smtp.seen().is_empty(), "not sent");
    let store = statuses(&stack.settings).await;
    dlq::replay(producer.broker(), &dlq::Selection::All, Some(&store))
        .await
        .expect("replay");
    assert_eq!(reached(&store, &id, JobState::Sent).await.attempts, 1);
    stop(worker, producer).await;
}

#[tokio::test]
async fn a_tampered_body_is_dead_lettered_and_the_worker_goes_on() {
    let stack = Stack::new("tamper", &SmtpOptions::default());
    let producer = Producer::connect(&stack.settings).await.expect("producer");
    let bad = producer.enqueue(job("tampered")).await.expect("enqueued");
    // Take it off the queue, flip one bit, put it back.
    let message = take_queued(&producer).await;
    let mut body = message.delivery.data.clone();
    let middle = body.len() / 2;
    body[middle] ^= 0x01;
    producer
        .broker()
        .publish(Outgoing {
            exchange: wire::JOBS_EXCHANGE.to_owned(),
            routing_key: Lane::Transactional.as_str().to_owned(),
            body,
            properties: message.delivery.properties.clone(),
            mandatory: true,
        })
        .await
        .expect("republished");
    let good = producer.enqueue(job("intact")).await.expect("enqueued");

    let worker = start_worker(&stack.settings).await;
    let status = settled(&statuses(&stack.settings).await, &good).await;
    assert_eq!(status.state, JobState::Sent);
    let letters = dead_lettered(&producer, 1).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].id, bad.to_string());
    assert_eq!(letters[0].reason, "seal");
    assert_eq!(
        stack.smtp.accepted().len(),
        1,
        "only the intact job went out"
    );
    stop(worker, producer).await;
}

#[tokio::test]
async fn an_expired_job_is_not_sent() {
    let stack = Stack::new("expired", &SmtpOptions::default());
    let producer = Producer::connect(&stack.settings).await.expect("producer");
    let mut job = job("too late");
    job.expires_at = Some(OffsetDateTime::now_utc() + Duration::from_millis(500));
    let id = producer.enqueue(job).await.expect("enqueued");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let worker = start_worker(&stack.settings).await;
    let status = settled(&statuses(&stack.settings).await, &id).await;
    assert_eq!(status.state, JobState::Expired);
    assert!(stack.smtp.seen().is_empty());
    let letters = dead_letters(&producer).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason, "expired");
    stop(worker, producer).await;
}

#[tokio::test]
async fn a_connection_lost_after_data_is_parked_when_asked() {
    let stack = Stack::new("uncertain", &replies(&["drop"]));
    let mut settings = stack.settings.clone();
    settings.worker.on_uncertain = OnUncertain::Park;
    let (producer, worker) = start(&settings).await;
    let id = producer.enqueue(job("maybe sent")).await.expect("enqueued");
    let status = settled(&statuses(&settings).await, &id).await;
    assert_eq!(status.state, JobState::Dead);
    assert_eq!(status.reason.as_deref(), Some("uncertain"));
    let letters = dead_letters(&producer).await;
    assert_eq!(letters[0].reason, "uncertain");
    assert_eq!(stack.smtp.seen().len(), 1, "not sent again");
    stop(worker, producer).await;
}

#[tokio::test]
async fn a_connection_lost_after_data_is_retried_with_the_same_message_id_by_default() {
    let stack = Stack::new("uncertain-retry", &replies(&["drop"]));
    let (producer, worker) = start(&stack.settings).await;
    let id = producer.enqueue(job("maybe sent")).await.expect("enqueued");
    let status = settled(&statuses(&stack.settings).await, &id).await;
    assert_eq!(status.state, JobState::Sent);
    assert_eq!(status.attempts, 2);
    let seen = stack.smtp.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].message_id, seen[1].message_id);
    stop(worker, producer).await;
}

/// A relay slow to answer the end of DATA (scanning, say) is waited for
/// up to `smtp.data_timeout`, not `smtp.command_timeout`: giving up there
/// leaves it unknown whether the relay took the message, and sending it
/// again would double it.
#[tokio::test]
async fn a_slow_reply_to_the_end_of_data_is_waited_for() {
    let stack = Stack::new(
        "worker-slow-data",
        &SmtpOptions {
            hold: Duration::from_secs(3),
            ..SmtpOptions::default()
        },
    );
    let mut settings = stack.settings.clone();
    settings.smtp.command_timeout = Duration::from_secs(1);
    let (producer, worker) = start(&settings).await;
    let id = producer
        .enqueue(job("scanned slowly"))
        .await
        .expect("enqueued");
    let status = settled(&statuses(&settings).await, &id).await;
    assert_eq!(status.state, JobState::Sent);
    assert_eq!(status.attempts, 1, "{status:?}");
    assert_eq!(stack.smtp.seen().len(), 1, "sent once");
    stop(worker, producer).await;
}

/// A relay's `250` to the end of DATA that runs on past the 64 KiB a
/// reply may take still says the message was accepted (every line of a
/// reply carries its code): it is not sent again, and the message queued
/// behind it on that connection goes on another.
#[tokio::test]
async fn an_overlong_acceptance_of_the_end_of_data_is_not_sent_again() {
    let mut stack = Stack::new("worker-long-reply", &replies(&["250-long"]));
    stack.settings.smtp.pool_size = 1;
    let (producer, worker) = start(&stack.settings).await;
    let jobs: Vec<SendJob> = (0..2).map(|i| job(&format!("long reply {i}"))).collect();
    let ids: Vec<JobId> = enqueue_all(&producer, jobs).await;
    let store = statuses(&stack.settings).await;
    for id in &ids {
        let status = settled(&store, id).await;
        assert_eq!(status.state, JobState::Sent, "{status:?}");
        assert_eq!(status.attempts, 1, "{status:?}");
    }
    let seen = stack.smtp.seen();
    assert_eq!(seen.len(), 2, "each once: {seen:?}");
    assert_eq!(seen[0].reply, "250-long");
    stop(worker, producer).await;
}

#[tokio::test]
async fn a_refused_recipient_in_a_pipelined_group_sends_no_body() {
    let stack = Stack::new(
        "rcpt",
        &SmtpOptions {
            reject_rcpt: Some("nobody@example.org"),
            ..SmtpOptions::default()
        },
    );
    let (producer, worker) = start(&stack.settings).await;
    let mut job = job("two recipients");
    job.message.to.push("nobody@example.org".to_owned());
    let id = producer.enqueue(job).await.expect("enqueued");
    let status = settled(&statuses(&stack.settings).await, &id).await;
    assert_eq!(status.state, JobState::Failed);
    assert_eq!(status.reason.as_deref(), Some("rejected"));
    let error = status.last_error.unwrap_or_default();
    assert!(error.contains("550"), "{error}");
    assert!(!error.contains("nobody@"), "address not masked: {error}");
    assert!(stack.smtp.seen().is_empty(), "no message body was sent");
    stop(worker, producer).await;
}

#[tokio::test]
async fn a_replayed_dead_letter_is_delivered_and_its_status_follows() {
    let stack = Stack::new("replay", &replies(&["550"]));
    let (producer, worker) = start(&stack.settings).await;
    let id = producer
        .enqueue(job("second chance"))
        .await
        .expect("enqueued");
    let store = statuses(&stack.settings).await;
    assert_eq!(settled(&store, &id).await.state, JobState::Failed);

    let replayed = dlq::replay(
        producer.broker(),
        &dlq::Selection::Id(id.to_string()),
        Some(&store),
    )
    .await
    .expect("replay");
    assert_eq!(replayed.len(), 1);
    let start = Instant::now();
    let status = loop {
        let status = store.get(&id).await.expect("status").expect("kept");
        if status.state == JobState::Sent {
            break status;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "replay not delivered: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.attempts, 1, "attempts were reset");
    assert_eq!(stack.smtp.accepted().len(), 1);
    assert!(dead_letters(&producer).await.is_empty());
    stop(worker, producer).await;
}

/// A replay is marked `queued` before it is published, so a worker that
/// fails it again at once is not overwritten by the mark: each time the
/// status ends `failed`, beside its dead letter.
#[tokio::test]
async fn a_replay_that_fails_again_is_shown_failed() {
    let stack = Stack::new("replay-fails", &replies(&["550"; 4]));
    let (producer, worker) = start(&stack.settings).await;
    let id = producer.enqueue(job("no luck")).await.expect("enqueued");
    let store = statuses(&stack.settings).await;
    assert_eq!(settled(&store, &id).await.state, JobState::Failed);
    for round in 1..4 {
        assert_eq!(dead_lettered(&producer, 1).await.len(), 1);
        let replayed = dlq::replay(producer.broker(), &dlq::Selection::All, Some(&store))
            .await
            .expect("replay");
        assert_eq!(replayed.len(), 1);
        // Back in the dead letters: the worker failed it again.
        assert_eq!(dead_lettered(&producer, 1).await.len(), 1);
        let status = settled(&store, &id).await;
        assert_eq!(status.state, JobState::Failed, "round {round}: {status:?}");
    }
    assert_eq!(stack.smtp.seen().len(), 4);
    stop(worker, producer).await;
}

/// A replay the broker does not take leaves the status as it was: it was
/// marked `queued` before the publish, and is put back.
#[tokio::test]
async fn a_replay_not_published_puts_the_status_back() {
    let stack = Stack::new("replay-refused", &replies(&["550"]));
    let (producer, worker) = start(&stack.settings).await;
    let id = producer.enqueue(job("stays dead")).await.expect("enqueued");
    let store = statuses(&stack.settings).await;
    assert_eq!(settled(&store, &id).await.state, JobState::Failed);
    assert_eq!(dead_lettered(&producer, 1).await.len(), 1);
    worker.stop().await;
    let channel = producer.broker().channel().await.expect("channel");
    channel
        .exchange_delete(
            wire::JOBS_EXCHANGE.into(),
            lapin::options::ExchangeDeleteOptions::default(),
        )
        .await
        .expect("exchange deleted");
    dlq::replay(producer.broker(), &dlq::Selection::All, Some(&store))
        .await
        .expect_err("nowhere to publish");
    let status = store.get(&id).await.expect("status").expect("kept");
    assert_eq!(status.state, JobState::Failed, "{status:?}");
    producer.close().await;
}

/// `dlq list`, and a `dlq replay` that passes letters over, return only once
/// the letters they held are back in the queue (a quorum queue requeues
/// after answering the channel's close), so a command right after sees all.
#[tokio::test]
async fn dead_letters_are_back_in_place_when_list_and_replay_return() {
    let stack = Stack::new("dlq-back", &replies(&["550"; 5]));
    let (producer, worker) = start(&stack.settings).await;
    let jobs = (0..5).map(|n| job(&format!("bounce {n}"))).collect();
    let ids = enqueue_all(&producer, jobs).await;
    let store = statuses(&stack.settings).await;
    for id in &ids {
        settled(&store, id).await;
    }
    worker.stop().await;
    // Settled is recorded before the letter reaches the queue.
    assert_eq!(dead_lettered(&producer, ids.len()).await.len(), ids.len());
    for _ in 0..10 {
        assert_eq!(dead_letters(&producer).await.len(), ids.len());
        let none = dlq::Selection::Reason("no such reason".to_owned());
        let replayed = dlq::replay(producer.broker(), &none, None)
            .await
            .expect("replay");
        assert!(replayed.is_empty());
    }
    assert_eq!(dead_letters(&producer).await.len(), ids.len());
    let replayed = dlq::replay(producer.broker(), &dlq::Selection::All, Some(&store))
        .await
        .expect("replay");
    assert_eq!(replayed.len(), ids.len());
    producer.close().await;
}

#[tokio::test]
async fn the_worker_survives_its_broker_connection_being_closed() {
    let stack = Stack::new("worker-reconnect", &SmtpOptions::default());
    let (producer, worker) = start(&stack.settings).await;
    let first = producer.enqueue(job("before")).await.expect("enqueued");
    let store = statuses(&stack.settings).await;
    assert_eq!(settled(&store, &first).await.state, JobState::Sent);

    // As a broker restart or a network cut would.
    let closed = stack.vhost.close_connections("mailroom-worker");
    assert!(closed >= 1, "the worker's connection was not found");
    let second = producer.enqueue(job("after")).await.expect("enqueued");
    assert_eq!(settled(&store, &second).await.state, JobState::Sent);
    assert_eq!(stack.smtp.accepted().len(), 2);
    stop(worker, producer).await;
}

#[tokio::test]
async fn garbage_without_headers_is_dead_lettered_and_the_worker_goes_on() {
    let stack = Stack::new("worker-garbage", &SmtpOptions::default());
    let (producer, worker) = start(&stack.settings).await;
    for body in [
        Vec::new(),
        b"not sealed at all".to_vec(),
        vec![0xff; 70_000],
    ] {
        producer
            .broker()
            .publish(Outgoing {
                exchange: wire::JOBS_EXCHANGE.to_owned(),
                routing_key: Lane::Transactional.as_str().to_owned(),
                body,
                properties: lapin::BasicProperties::default(),
                mandatory: true,
            })
            .await
            .expect("published");
    }
    let good = producer
        .enqueue(job("still works"))
        .await
        .expect("enqueued");
    assert_eq!(
        settled(&statuses(&stack.settings).await, &good).await.state,
        JobState::Sent
    );
    let letters = dead_lettered(&producer, 3).await;
    assert_eq!(letters.len(), 3, "{letters:?}");
    assert!(
        letters
            .iter()
            .all(|l| l.reason == "seal" || l.reason == "invalid"),
        "{letters:?}"
    );
    stop(worker, producer).await;
}

/// A message id that is not UTF-8 (RabbitMQ passes a publisher's bytes on
/// unchecked) is read with `?` for each bad byte and dead-lettered like
/// any other message that is not a sealed job. lapin used to fail the
/// frame and drop the worker's connection at each delivery of it, with
/// every delivery in flight on it, and `dlq list` could not read past it.
#[tokio::test]
async fn a_property_not_utf8_is_dead_lettered_alone() {
    let stack = Stack::new("worker-not-utf8", &SmtpOptions::default());
    let (producer, worker) = start(&stack.settings).await;
    let proxy = RewritingProxy::start(b"zzPOISONzz", b"\xff\xfePOISON\xff\xfe").await;
    let mut through_proxy = stack.settings.amqp.clone();
    through_proxy.urls = vec![Secret::new(stack.vhost.url_via(&proxy))];
    let poisoner = Broker::connect(&through_proxy)
        .await
        .expect("through the proxy");
    let mut ids = enqueue_all(
        &producer,
        (0..20).map(|i| job(&format!("before {i}"))).collect(),
    )
    .await;
    poisoner
        .publish(Outgoing {
            exchange: wire::JOBS_EXCHANGE.to_owned(),
            routing_key: Lane::Transactional.as_str().to_owned(),
            body: b"not a job".to_vec(),
            properties: lapin::BasicProperties::default()
                .with_message_id("zzPOISONzz-poison".into()),
            mandatory: true,
        })
        .await
        .expect("published");
    ids.extend(
        enqueue_all(
            &producer,
            (0..20).map(|i| job(&format!("after {i}"))).collect(),
        )
        .await,
    );
    let store = statuses(&stack.settings).await;
    for id in &ids {
        assert_eq!(settled(&store, id).await.state, JobState::Sent);
    }
    let letters = dead_lettered(&producer, 1).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].id, "??POISON??-poison");
    assert_eq!(letters[0].reason, "seal", "{letters:?}");
    poisoner.close().await;
    stop(worker, producer).await;
}

#[tokio::test]
async fn with_redis_gone_nothing_is_sent_blind_and_it_is_sent_once_redis_is_back() {
    let mut stack = Stack::new("worker-redis-down", &SmtpOptions::default());
    let mut redis = mailroom_tests::redis::PrivateRedis::start();
    stack.settings.redis = redis.settings("mailroom-test:");
    let (producer, worker) = start(&stack.settings).await;
    let before = producer.enqueue(job("before")).await.expect("enqueued");
    assert_eq!(
        settled(&statuses(&stack.settings).await, &before)
            .await
            .state,
        JobState::Sent
    );

    redis.stop();
    let during = producer.enqueue(job("during")).await.expect("enqueued");
    // The worker cannot ask Redis whether it was sent: it must wait.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        stack.smtp.accepted().len(),
        1,
        "a job was sent without its dedup claim"
    );

    redis.restart();
    let store = statuses(&stack.settings).await;
    let status = settled(&store, &during).await;
    assert_eq!(status.state, JobState::Sent);
    assert_eq!(stack.smtp.accepted().len(), 2);
    stop(worker, producer).await;
}

#[tokio::test]
async fn a_sent_mark_redis_refused_is_written_once_it_takes_writes() {
    let slow = SmtpOptions {
        delay: Duration::from_secs(2),
        ..SmtpOptions::default()
    };
    let mut stack = Stack::new("worker-late-mark", &slow);
    let redis = mailroom_tests::redis::PrivateRedis::start();
    stack.settings.redis = redis.settings("mailroom-test:");
    let (producer, worker) = start(&stack.settings).await;
    let keyed = |subject: &str| {
        let mut job = job(subject);
        job.idempotency_key = Some("late-mark".to_owned());
        job
    };
    let first = producer.enqueue(keyed("first")).await.expect("enqueued");
    let store = statuses(&stack.settings).await;
    reached(&store, &first, JobState::Sending).await;

    // The relay has the message in hand; from now on Redis refuses every
    // write (a replica of nothing is read-only), so the mail goes and its
    // `sent` mark does not.
    let admin = redis::Client::open(redis.url()).expect("url");
    let mut admin = admin
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let replica_of = |host: &'static str, port: &'static str| {
        let mut command = redis::cmd("REPLICAOF");
        command.arg(host).arg(port);
        command
    };
    let _: () = replica_of("127.0.0.1", "1")
        .query_async(&mut admin)
        .await
        .expect("read-only");
    stack.smtp.wait_accepted(1, PATIENCE);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        store.get(&first).await.expect("status").map(|s| s.state),
        Some(JobState::Sending),
        "Redis took no write"
    );

    let _: () = replica_of("NO", "ONE")
        .query_async(&mut admin)
        .await
        .expect("writable");
    assert_eq!(settled(&store, &first).await.state, JobState::Sent);
    let again = producer.enqueue(keyed("again")).await.expect("enqueued");
    assert_eq!(settled(&store, &again).await.state, JobState::Duplicate);
    assert_eq!(stack.smtp.accepted().len(), 1, "the mail went once");
    stop(worker, producer).await;
}

#[tokio::test]
async fn a_retry_tier_deleted_under_the_worker_is_declared_again_and_the_retry_goes_through() {
    let stack = Stack::new("worker-tier-gone", &replies(&["451", "250"]));
    let (producer, worker) = start(&stack.settings).await;
    // The first retry waits 1-2 s: one of these two tiers.
    for tier in ["mailroom.retry.1s", "mailroom.retry.5s"] {
        mailroom_tests::rabbit::rabbitmqctl(&["delete_queue", "-p", stack.vhost.name(), tier]);
    }
    let id = producer.enqueue(job("retried")).await.expect("enqueued");
    let status = settled(&statuses(&stack.settings).await, &id).await;
    assert_eq!(status.state, JobState::Sent);
    assert_eq!(status.attempts, 2);
    let replies: Vec<_> = stack.smtp.seen().into_iter().map(|s| s.reply).collect();
    assert_eq!(replies, ["451", "250"], "one send an attempt, none burnt");
    stop(worker, producer).await;
}

#[tokio::test]
async fn a_work_queue_deleted_under_the_worker_is_declared_again_and_consumed() {
    let stack = Stack::new("worker-queue-gone", &SmtpOptions::default());
    let (producer, worker) = start(&stack.settings).await;
    let queue = mailroom_core::wire::WorkQueue::ALL[0].name();
    mailroom_tests::rabbit::rabbitmqctl(&["delete_queue", "-p", stack.vhost.name(), &queue]);
    let start = Instant::now();
    while !mailroom_tests::rabbit::rabbitmqctl(&["list_queues", "-p", stack.vhost.name(), "name"])
        .lines()
        .any(|line| line.trim() == queue)
    {
        assert!(start.elapsed() < PATIENCE, "{queue} was not declared again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let id = producer.enqueue(job("after")).await.expect("enqueued");
    assert_eq!(
        settled(&statuses(&stack.settings).await, &id).await.state,
        JobState::Sent
    );
    stop(worker, producer).await;
}

#[tokio::test]
async fn a_stopping_worker_hands_no_more_messages_over_so_none_is_cut_off_and_sent_twice() {
    let slow = SmtpOptions {
        hold: Duration::from_secs(2),
        ..SmtpOptions::default()
    };
    let mut stack = Stack::new("worker-stop-handing", &slow);
    // One connection: the jobs queue for it, each handed over in turn.
    stack.settings.smtp.pool_size = 1;
    stack.settings.worker.shutdown_grace = Duration::from_secs(3);
    let producer = Producer::connect(&stack.settings).await.expect("producer");
    let shutdown = CancellationToken::new();
    // A runtime of its own, dropped once the worker's run returns: what is
    // still in work then stops mid-step, as at a process's exit.
    let running = {
        let (settings, shutdown) = (stack.settings.clone(), shutdown.clone());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().expect("a runtime");
            runtime.block_on(async {
                let worker = Worker::connect(&settings).await.expect("worker");
                worker.run(shutdown).await
            })
        })
    };
    let ids = enqueue_all(
        &producer,
        (0..4).map(|i| job(&format!("queued {i}"))).collect(),
    )
    .await;
    let store = statuses(&stack.settings).await;
    let start = Instant::now();
    'sending: loop {
        for id in &ids {
            if store.get(id).await.expect("status").map(|s| s.state) == Some(JobState::Sending) {
                break 'sending;
            }
        }
        assert!(start.elapsed() < PATIENCE, "nothing was sent");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The first is with the relay (its reply 2 s away, within the grace);
    // before the stop, the next would have been handed over after it and
    // cut off by the grace's end, to be sent again by the next worker.
    tokio::time::sleep(Duration::from_millis(500)).await;
    shutdown.cancel();
    let drained = tokio::task::spawn_blocking(move || running.join())
        .await
        .expect("joined")
        .expect("the worker stops");
    // The jobs waiting for the connection went back at once, and the one
    // with the relay had its reply within the grace.
    assert!(drained.clean, "drained within the grace");
    let worker = start_worker(&stack.settings).await;
    for id in &ids {
        assert_eq!(settled(&store, id).await.state, JobState::Sent);
    }
    let mut message_ids: Vec<_> = stack
        .smtp
        .accepted()
        .into_iter()
        .filter_map(|seen| seen.message_id)
        .collect();
    message_ids.sort();
    message_ids.dedup();
    assert_eq!(stack.smtp.accepted().len(), 4, "each sent once");
    assert_eq!(message_ids.len(), 4);
    stop(worker, producer).await;
}

#[tokio::test]
async fn a_flood_of_duplicates_sends_each_key_once() {
    let stack = Stack::new("worker-flood", &SmtpOptions::default());
    let (producer, worker) = start(&stack.settings).await;
    let jobs: Vec<SendJob> = (0..200)
        .map(|i| {
            let mut job = job(&format!("key {}", i % 20));
            job.idempotency_key = Some(format!("flood-{}", i % 20));
            job
        })
        .collect();
    let ids: Vec<JobId> = enqueue_all(&producer, jobs).await;
    let store = statuses(&stack.settings).await;
    let mut sent = 0;
    for id in &ids {
        match settled(&store, id).await.state {
            JobState::Sent => sent += 1,
            JobState::Duplicate => {}
            other => panic!("job {id} ended {other}"),
        }
    }
    assert_eq!(sent, 20);
    let accepted = stack.smtp.accepted();
    assert_eq!(accepted.len(), 20);
    let mut subjects: Vec<String> = accepted
        .iter()
        .filter_map(|seen| seen.raw.as_ref())
        .filter_map(|raw| {
            String::from_utf8_lossy(raw)
                .lines()
                .find_map(|line| line.strip_prefix("Subject: ").map(str::to_owned))
        })
        .collect();
    subjects.sort();
    subjects.dedup();
    assert_eq!(subjects.len(), 20, "each key went out once");
    stop(worker, producer).await;
}

/// `rabbitmqctl LIST -p VHOST NAME FIELD` in the stack's vhost, as
/// (name, field) pairs.
fn listed(stack: &Stack, list: &str, name: &str, field: &str) -> Vec<(String, String)> {
    mailroom_tests::rabbit::rabbitmqctl(&[list, "-p", stack.vhost.name(), name, field])
        .lines()
        .filter_map(|line| {
            let (name, value) = line.split_once('\t')?;
            Some((name.trim().to_owned(), value.trim().to_owned()))
        })
        .collect()
}

/// Deliveries of `queue` in the stack's vhost that the broker has handed
/// out and not yet seen acked.
fn unacked(stack: &Stack, queue: &str) -> Option<u64> {
    listed(stack, "list_queues", "name", "messages_unacknowledged")
        .into_iter()
        .find(|(name, _)| name == queue)
        .and_then(|(_, count)| count.parse().ok())
}

/// How often the broker refreshes the queue figures `rabbitmqctl` shows
/// (`collect_statistics_interval`, 5 s by default), with a margin.
const STATS_REFRESH: Duration = Duration::from_secs(6);

#[tokio::test]
async fn a_hung_send_does_not_keep_the_jobs_after_it_unacked() {
    // Acks go out in batches up to the oldest job in work; the jobs done
    // behind a hung one must still be acked, or they would fill the
    // prefetch window until it times out (and be redelivered if the
    // worker died meanwhile).
    let mut stack = Stack::new("worker-hol", &replies(&["hang"]));
    stack.settings.smtp.data_timeout = STATS_REFRESH * 2;
    let (producer, worker) = start(&stack.settings).await;
    let hung = producer.enqueue(job("hung")).await.expect("enqueued");
    let start = Instant::now();
    while stack.smtp.seen().is_empty() {
        assert!(
            start.elapsed() < PATIENCE,
            "the first job never reached DATA"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after: Vec<JobId> = enqueue_all(
        &producer,
        (0..5).map(|i| job(&format!("after {i}"))).collect(),
    )
    .await;
    let store = statuses(&stack.settings).await;
    for id in &after {
        assert_eq!(settled(&store, id).await.state, JobState::Sent);
    }
    tokio::time::sleep(STATS_REFRESH).await;
    assert_eq!(
        store.get(&hung).await.expect("status").map(|s| s.state),
        Some(JobState::Sending),
        "still hung"
    );
    let queue = wire::work_queue(Lane::Transactional);
    assert_eq!(
        unacked(&stack, &queue),
        Some(1),
        "only the hung job is unacked"
    );
    // The relay never answers: the send times out as uncertain, the QUIT
    // after it is not waited for, and the retry goes through.
    let status = settled(&store, &hung).await;
    assert_eq!((status.state, status.attempts), (JobState::Sent, 2));
    stop(worker, producer).await;
}

/// A dedup of its own Redis prefix, with a lease of `lease`, and the
/// `sending` status a claim of `job` records.
async fn dedup_for(
    redis: &TestPrefix,
    lease: Duration,
    job: &SendJob,
) -> (Dedup, mailroom_core::status::PreparedStatus) {
    let store = RedisStore::connect(&redis.settings()).await.expect("redis");
    let dedup = Dedup::new(
        store.clone(),
        b"test-hash-key",
        Duration::from_mins(10),
        lease,
    );
    let sending = StatusStore::new(store, Duration::from_mins(10))
        .prepare(&StatusUpdate::new(job, JobState::Sending))
        .expect("status");
    (dedup, sending)
}

/// A claim's lease short enough for a test to wait out.
const SHORT_LEASE: Duration = Duration::from_millis(200);

#[tokio::test]
async fn a_replay_never_claims_past_a_dead_owners_handed_marker() {
    let redis = TestPrefix::new("dedup-replay-marker");
    let job = job("replayed");
    let (dedup, sending) = dedup_for(&redis, SHORT_LEASE, &job).await;
    // An operator's replay is claimed, handed to the relay, and its worker
    // is killed before the reply.
    let first = dedup.token("worker-a/1", &job);
    assert_eq!(
        dedup.claim(&first, true, &sending).await.expect("claim"),
        Claim::Acquired
    );
    assert!(dedup.hand_over(&first).await.expect("hand over"));
    tokio::time::sleep(SHORT_LEASE * 2).await;
    // Its redelivery, still marked replayed, may have been sent already.
    let again = dedup.token("worker-b/1", &job);
    assert_eq!(
        dedup.claim(&again, true, &sending).await.expect("claim"),
        Claim::Uncertain
    );
    let copy = dedup.token("worker-c/1", &job);
    assert_eq!(
        dedup.claim(&copy, false, &sending).await.expect("claim"),
        Claim::Uncertain
    );
    // Parked without a marker now: the operator's next replay is sent.
    let replay = dedup.token("worker-d/1", &job);
    assert_eq!(
        dedup.claim(&replay, true, &sending).await.expect("claim"),
        Claim::Acquired
    );
}

#[tokio::test]
async fn the_handed_marker_is_written_only_while_the_claim_is_ours() {
    let redis = TestPrefix::new("dedup-hand-over");
    let job = job("slow");
    let (dedup, sending) = dedup_for(&redis, SHORT_LEASE, &job).await;
    let slow = dedup.token("worker-a/1", &job);
    assert_eq!(
        dedup.claim(&slow, false, &sending).await.expect("claim"),
        Claim::Acquired
    );
    tokio::time::sleep(SHORT_LEASE * 2).await;
    let next = dedup.token("worker-b/1", &job);
    assert_eq!(
        dedup.claim(&next, false, &sending).await.expect("claim"),
        Claim::Acquired
    );
    // The first owner's lease ran out: it must not hand the message over.
    assert!(!dedup.hand_over(&slow).await.expect("hand over"));
    assert!(dedup.hand_over(&next).await.expect("hand over"));
    // The marker is the live owner's, so the claim stays with it.
    assert!(dedup.renew(&next).await.expect("renew"));
}

#[tokio::test]
async fn a_free_key_is_claimed_and_a_sent_one_found_without_a_script() {
    let redis = TestPrefix::new("dedup-free");
    let job = job("free");
    let (dedup, sending) = dedup_for(&redis, SHORT_LEASE, &job).await;
    let statuses = StatusStore::new(
        RedisStore::connect(&redis.settings()).await.expect("redis"),
        Duration::from_mins(10),
    );
    let first = dedup.token("worker-a/1", &job);
    assert_eq!(
        dedup.claim_plain(&first).await.expect("claim"),
        Some(Claim::Acquired)
    );
    assert_eq!(
        statuses.get(&job.id).await.expect("status"),
        None,
        "the sending status waits for a slow send"
    );
    // Held: the transaction leaves it as it is, and the script says so.
    let copy = dedup.token("worker-b/1", &job);
    assert_eq!(dedup.claim_plain(&copy).await.expect("claim"), None);
    assert!(matches!(
        dedup.claim(&copy, false, &sending).await.expect("claim"),
        Claim::HeldByOther { .. }
    ));
    assert!(dedup.renew(&first).await.expect("still ours"));
    // Sent: a duplicate.
    dedup.mark_sent(&first, None, false).await.expect("mark");
    let later = dedup.token("worker-c/1", &job);
    let duplicate = Claim::AlreadySent {
        job_id: job.id.to_string(),
    };
    assert_eq!(
        dedup.claim_plain(&later).await.expect("claim"),
        Some(duplicate.clone())
    );
    assert_eq!(
        dedup.claim(&later, false, &sending).await.expect("claim"),
        duplicate
    );
}

#[tokio::test]
async fn a_free_key_beside_a_dead_owners_marker_is_parked_not_claimed() {
    let redis = TestPrefix::new("dedup-free-marker");
    let job = job("handed");
    let (dedup, sending) = dedup_for(&redis, SHORT_LEASE, &job).await;
    let dead = dedup.token("worker-a/1", &job);
    assert_eq!(
        dedup.claim_plain(&dead).await.expect("claim"),
        Some(Claim::Acquired)
    );
    assert!(dedup.hand_over(&dead).await.expect("hand over"));
    tokio::time::sleep(SHORT_LEASE * 2).await;
    // The key is free again, but the marker says the relay may have the
    // message: the transaction takes the key, and the script parks it.
    let next = dedup.token("worker-b/1", &job);
    assert_eq!(dedup.claim_plain(&next).await.expect("claim"), None);
    assert_eq!(
        dedup.claim(&next, false, &sending).await.expect("claim"),
        Claim::Uncertain
    );
    let copy = dedup.token("worker-c/1", &job);
    assert_eq!(dedup.claim_plain(&copy).await.expect("claim"), None);
    assert_eq!(
        dedup.claim(&copy, false, &sending).await.expect("claim"),
        Claim::Uncertain
    );
    let replay = dedup.token("worker-d/1", &job);
    assert_eq!(dedup.claim_plain(&replay).await.expect("claim"), None);
    assert_eq!(
        dedup.claim(&replay, true, &sending).await.expect("claim"),
        Claim::Acquired
    );
}

/// A TCP relay to the broker that can be frozen: from then on it passes
/// nothing either way, as a broker that stopped answering but kept its
/// connections would.
struct FreezableBroker {
    port: u16,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FreezableBroker {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("address").port();
        let frozen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let pumps = std::sync::Arc::clone(&frozen);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let broker = tokio::net::TcpStream::connect(mailroom_tests::rabbit::BROKER)
                    .await
                    .expect("broker");
                let (client_read, client_write) = client.into_split();
                let (broker_read, broker_write) = broker.into_split();
                tokio::spawn(pump(
                    client_read,
                    broker_write,
                    std::sync::Arc::clone(&pumps),
                ));
                tokio::spawn(pump(
                    broker_read,
                    client_write,
                    std::sync::Arc::clone(&pumps),
                ));
            }
        });
        Self { port, frozen }
    }

    fn freeze(&self) {
        self.frozen.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut buffer = vec![0; 64 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buffer).await {
        if frozen.load(std::sync::atomic::Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

/// A worker of `settings`, its run's outcome left to the caller.
async fn spawn_worker(settings: &Settings) -> (CancellationToken, JoinHandle<Drained>) {
    let worker = Worker::connect(settings).await.expect("worker connects");
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(worker.run(shutdown.clone()));
    (shutdown, task)
}

#[tokio::test]
async fn a_broker_that_stops_answering_does_not_hold_the_shutdown() {
    let stack = Stack::new("worker-frozen-broker", &SmtpOptions::default());
    let broker = FreezableBroker::start().await;
    let mut settings = stack.settings.clone();
    settings.worker.shutdown_grace = Duration::from_secs(3);
    settings.amqp.urls = vec![mailroom_core::settings::Secret::new(
        stack.vhost.url().replace(
            mailroom_tests::rabbit::BROKER,
            &format!("127.0.0.1:{}", broker.port),
        ),
    )];
    let producer = Producer::connect(&stack.settings).await.expect("producer");
    let (shutdown, task) = spawn_worker(&settings).await;
    let id = producer.enqueue(job("before")).await.expect("enqueued");
    let store = statuses(&stack.settings).await;
    assert_eq!(settled(&store, &id).await.state, JobState::Sent);

    broker.freeze();
    let start = Instant::now();
    shutdown.cancel();
    // The grace, the consumers' cancel and the channels' close (2 s each),
    // the connection's close (amqp.connect_timeout), and a margin.
    let bound = settings.worker.shutdown_grace
        + Duration::from_secs(4)
        + settings.amqp.connect_timeout
        + Duration::from_secs(3);
    let stopped = tokio::time::timeout(bound, task).await;
    assert!(
        stopped.is_ok(),
        "shutdown still waiting on the broker after {:?}",
        start.elapsed()
    );
    producer.close().await;
}

#[tokio::test]
async fn a_job_still_in_work_after_the_grace_is_left_to_its_requeue() {
    let mut stack = Stack::new("worker-after-grace", &replies(&["hang"]));
    stack.settings.smtp.data_timeout = Duration::from_secs(2);
    stack.settings.worker.shutdown_grace = Duration::from_millis(500);
    let producer = Producer::connect(&stack.settings).await.expect("producer");
    let (shutdown, task) = spawn_worker(&stack.settings).await;
    let id = producer.enqueue(job("hung")).await.expect("enqueued");
    let start = Instant::now();
    while stack.smtp.seen().is_empty() {
        assert!(start.elapsed() < PATIENCE, "the job never reached DATA");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    let drained = task.await.expect("worker task");
    assert!(!drained.clean, "the hung job outlasted the grace");
    // Its channel closed, the broker has it back as it was; the send then
    // times out (uncertain, so a retry), and publishing that retry too
    // would make a second copy and spend an attempt.
    tokio::time::sleep(stack.settings.smtp.data_timeout + Duration::from_secs(1)).await;
    let status = statuses(&stack.settings)
        .await
        .get(&id)
        .await
        .expect("status")
        .expect("kept");
    assert_eq!(
        (status.state, status.attempts),
        (JobState::Sending, 1),
        "{status:?}"
    );
    // Any retry copy would be back from its tier (5 s at most) by now.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(stack.vhost.work_depth().await, 1);
    producer.close().await;
}

/// The claim's transaction, refused for memory, fails readiness as a
/// refused script did: Redis may still take the probe's small write.
#[tokio::test]
async fn a_claim_refused_for_memory_fails_readiness_for_a_moment() {
    let redis = mailroom_tests::redis::PrivateRedis::start();
    let store = RedisStore::connect(&redis.settings("mailroom-test:"))
        .await
        .expect("redis");
    let dedup = Dedup::new(
        store.clone(),
        b"test-hash-key",
        Duration::from_mins(10),
        SHORT_LEASE,
    );
    let job = job("refused");
    let token = dedup.token("worker-a/1", &job);
    let set = |value: &'static str| {
        let mut command = redis::cmd("CONFIG");
        command.arg("SET").arg("maxmemory").arg(value);
        command
    };
    let mut admin = store.connection();
    let _: () = set("1").query_async(&mut admin).await.expect("config");
    let err = dedup.claim_plain(&token).await.expect_err("out of memory");
    let _: () = set("0").query_async(&mut admin).await.expect("config");
    let refused = store
        .takes_writes()
        .await
        .expect_err("refused a moment ago");
    assert!(refused.to_string().contains("OOM"), "{err} / {refused}");
}
