//! `mailroom worker` as processes: killed with SIGKILL mid-send, two of
//! them on one queue, SIGTERM under load. Real RabbitMQ, Redis and SMTP.

use std::collections::HashSet;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use mailroom_core::job::{EmailMessage, JobId, JobRequest, SendJob};
use mailroom_core::settings::OnUncertain;
use mailroom_producer::Producer;
use mailroom_tests::rabbit::rabbitmqctl;
use mailroom_tests::smtp::{Seen, SmtpOptions};
use mailroom_tests::stack::Stack;
use mailroom_worker::dlq;

/// Bound on waits that only a broken build reaches.
const PATIENCE: Duration = Duration::from_mins(2);

/// A `mailroom worker` process; SIGKILLed if still running when dropped.
struct WorkerProcess {
    child: Child,
    log: std::path::PathBuf,
}

impl WorkerProcess {
    fn start(stack: &Stack, dir: &Path, name: &str) -> Self {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_mailroom"))
            .arg("worker")
            .current_dir(dir)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(stack.env())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("mailroom worker starts");
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
                "worker did not exit; its log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn job(n: usize) -> SendJob {
    SendJob::from_request(
        JobRequest {
            message: EmailMessage {
                from: "Shop <shop@example.com>".to_owned(),
                to: vec![format!("reader{n}@example.org")],
                subject: format!("message {n}"),
                text: Some(format!("body {n}")),
                ..EmailMessage::default()
            },
            ..JobRequest::default()
        },
        "acme",
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

/// Starts a worker and kills it with SIGKILL once the relay has its
/// message and sits on the reply (the relay must be told to `hang`).
async fn kill_after_hand_over(stack: &Stack, dir: &Path) {
    let mut first = WorkerProcess::start(stack, dir, "first");
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

    let mut second = WorkerProcess::start(&stack, dir.path(), "second");
    let accepted = stack.smtp.wait_accepted(1, PATIENCE);
    assert_eq!(accepted.len(), 1, "{}", second.log_text());
    // Give a wrongly repeated send time to show up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_exactly_once(&ids, &stack.smtp.seen());
    second.signal("TERM");
    assert!(second.wait(PATIENCE).success());
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

    let mut second = WorkerProcess::start(&stack, dir.path(), "second");
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
    let replayed = dlq::replay(producer.broker(), &dlq::Selection::All)
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
    let mut worker = WorkerProcess::start(&stack, dir.path(), "lonely");
    let start = Instant::now();
    while !worker.log_text().contains("consuming") {
        assert!(start.elapsed() < PATIENCE, "{}", worker.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rabbitmqctl(&["delete_vhost", stack.vhost.name()]);
    while !worker.log_text().contains("consumer lost") {
        assert!(start.elapsed() < PATIENCE, "{}", worker.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    worker.signal("TERM");
    let status = worker.wait(Duration::from_secs(10));
    assert!(status.success(), "{}", worker.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_worker_processes_on_one_queue_deliver_every_job_exactly_once() {
    let stack = Stack::new("two", &SmtpOptions::default());
    let dir = tempfile::tempdir().expect("tempdir");
    let ids = enqueue(&stack, 300).await;
    let mut a = WorkerProcess::start(&stack, dir.path(), "a");
    let mut b = WorkerProcess::start(&stack, dir.path(), "b");
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
    let mut first = WorkerProcess::start(&stack, dir.path(), "first");
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

    let mut second = WorkerProcess::start(&stack, dir.path(), "second");
    let accepted = stack.smtp.wait_accepted(ids.len(), PATIENCE);
    assert_eq!(accepted.len(), ids.len(), "{}", second.log_text());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_exactly_once(&ids, &stack.smtp.seen());
    second.signal("TERM");
    assert!(second.wait(PATIENCE).success());
}
