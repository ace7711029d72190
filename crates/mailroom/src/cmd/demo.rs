//! `mailroom demo`: the whole path on this machine in one command. Starts a
//! worker pool in-process against the local RabbitMQ and Redis, enqueues a
//! handful of sample jobs through the producer (a duplicate and an invalid
//! one among them), waits for their outcomes and prints them.
//!
//! With no `[smtp]` transport configured, mail goes to `.eml` files in
//! `worker.outbox_dir`. With no sealing key or Redis hash key configured,
//! the demo makes throwaway ones for its run.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use mailroom_core::amqp::Broker;
use mailroom_core::job::{Attachment, EmailMessage, JobId, JobRequest, Lane};
use mailroom_core::seal::SealKey;
use mailroom_core::settings::{RedisSettings, Secret, Settings, TransportKind};
use mailroom_core::status::{JobState, StatusStore};
use mailroom_core::store::RedisStore;
use mailroom_core::wire;
use mailroom_producer::Producer;
use mailroom_worker::Worker;
use tokio_util::sync::CancellationToken;

/// How long the demo waits for every job to reach a final state.
const PATIENCE: Duration = Duration::from_mins(1);

/// Runs the demo.
pub async fn run(settings: &Settings) -> anyhow::Result<()> {
    let settings = demo_settings(settings)?;
    preflight(&settings).await?;
    let worker = Worker::connect(&settings)
        .await
        .context("the demo's worker could not start")?;
    eprintln!(
        "mailroom demo: worker delivering to {}",
        worker.describe_transport()
    );
    let shutdown = CancellationToken::new();
    let pool = tokio::spawn(worker.run(shutdown.clone()));

    let broker = Broker::connect_as(&settings.amqp, "mailroom-demo").await?;
    let producer = Producer::from_parts(broker, settings.keyring()?, settings.limits.clone());
    let run_tag = JobId::new().to_string();
    let mut rows = Vec::new();
    for (label, request) in samples(&run_tag) {
        match producer.prepare(request, "demo") {
            Ok(job) => {
                let id = producer.enqueue_checked(job).await.context("enqueue")?;
                rows.push(Row {
                    label,
                    id: Some(id),
                    state: None,
                    note: String::new(),
                });
            }
            Err(errors) => rows.push(Row {
                label,
                id: None,
                state: None,
                note: format!("refused before enqueue: {errors}"),
            }),
        }
    }
    producer.close().await;

    let statuses = StatusStore::new(
        RedisStore::connect(&settings.redis).await?,
        settings.worker.status_retention,
    );
    let deadline = Instant::now() + PATIENCE;
    while rows.iter().any(|row| row.id.is_some() && !row.is_final()) && Instant::now() < deadline {
        for row in rows
            .iter_mut()
            .filter(|row| row.id.is_some() && !row.is_final())
        {
            if let Some(id) = &row.id
                && let Some(status) = statuses.get(id).await?
            {
                row.state = Some(status.state);
                row.note = status.reason.or(status.last_error).unwrap_or_default();
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    shutdown.cancel();
    pool.await.context("worker pool")?;

    print!("{}", table(&rows));
    if settings.worker.transport == TransportKind::File {
        print_outbox(&settings.worker.outbox_dir, &rows);
    }
    if rows.iter().any(|row| row.id.is_some() && !row.is_final()) {
        bail!(
            "not every job reached a final state within {}s",
            PATIENCE.as_secs()
        );
    }
    Ok(())
}

/// The settings the demo runs with: the operator's, plus throwaway secrets
/// where none are configured, and the health listener on a free port.
fn demo_settings(settings: &Settings) -> anyhow::Result<Settings> {
    let mut settings = settings.clone();
    if settings.keyring().is_err() {
        let key = SealKey::generate("demo").map_err(anyhow::Error::msg)?;
        settings.seal.keys = Secret::new(key.to_line().as_str());
        settings.seal.active = Some("demo".to_owned());
        eprintln!("mailroom demo: no sealing key configured: using a throwaway key for this run");
    }
    if settings.hash_key().is_err() {
        let key = SealKey::generate("hash").map_err(anyhow::Error::msg)?;
        settings.redis.hash_key = Secret::new(key.to_line().as_str());
    }
    settings.worker.health_bind.set_port(0);
    Ok(settings)
}

/// Says which service is missing, where, and what to do about it, before
/// anything else happens; and refuses to consume someone else's jobs.
async fn preflight(settings: &Settings) -> anyhow::Result<()> {
    let url = settings
        .amqp
        .urls
        .first()
        .map(Secret::redacted)
        .unwrap_or_default();
    // Its error says where and what to do: start RabbitMQ, for the default
    // URL, else check amqp.urls.
    let broker = Broker::connect_as(&settings.amqp, "mailroom-demo-check").await?;
    broker.declare(&wire::Topology::standard()).await?;
    // Jobs waiting out a retry delay come back to the work queues, where
    // the demo's worker would take them too.
    let mut waiting = broker.work_depth().await?;
    for tier in &wire::RETRY_TIERS {
        waiting += broker.queue_depth(&tier.queue()).await?;
    }
    broker.close().await;
    if waiting > 0 {
        bail!(
            "the work and retry queues at {url} hold {waiting} jobs that the demo's worker would consume; run the demo against an empty vhost, e.g. MAILROOM__AMQP__URLS=amqp://guest:guest@127.0.0.1:5672/demo"
        );
    }
    match RedisStore::connect_once(&settings.redis).await {
        Ok(_) => Ok(()),
        Err(err) if err.is_unavailable() => Err(err).context(redis_hint(&settings.redis)),
        Err(err) => Err(err.into()),
    }
}

/// What to do about a Redis that does not answer: start one, when
/// `redis.url` is the default (a Redis on this machine); else check the
/// setting, since starting a local Redis would not help.
fn redis_hint(redis: &RedisSettings) -> String {
    if redis.url == RedisSettings::default().url {
        "Redis is not running here: start it with `redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save \"\" --appendonly no`".to_owned()
    } else {
        format!(
            "Redis is not reachable at {}: check that it runs there and that redis.url names it",
            redis.url.redacted()
        )
    }
}

fn samples(run_tag: &str) -> Vec<(&'static str, JobRequest)> {
    let message = |to: &str, subject: &str| EmailMessage {
        from: "Mailroom Demo <demo@mailroom.example>".to_owned(),
        to: vec![to.to_owned()],
        subject: subject.to_owned(),
        text: Some(format!("{subject}\n\nSent by `mailroom demo`.\n")),
        ..EmailMessage::default()
    };
    let request = |message, lane, key: Option<String>| JobRequest {
        tenant: None,
        idempotency_key: key,
        lane,
        expires_at: None,
        message,
    };
    let mut receipt = message("Ada Lovelace <ada@example.com>", "Your receipt");
    receipt.html = Some("<p>Thank you for your order.</p>".to_owned());
    receipt.attachments.push(Attachment {
        filename: "receipt.txt".to_owned(),
        content_type: "text/plain".to_owned(),
        content: b"1 x analytical engine, paid\n".to_vec(),
    });
    let order_key = format!("demo-order-{run_tag}");
    vec![
        (
            "password reset",
            request(
                message("grace@example.com", "Reset your password"),
                Lane::Transactional,
                None,
            ),
        ),
        (
            "receipt with attachment",
            request(receipt, Lane::Transactional, None),
        ),
        (
            "newsletter (bulk lane)",
            request(
                message("alan@example.org", "November news"),
                Lane::Bulk,
                None,
            ),
        ),
        (
            "order confirmation",
            request(
                message("edsger@example.net", "Order confirmed"),
                Lane::Transactional,
                Some(order_key.clone()),
            ),
        ),
        (
            "same order again (same idempotency key)",
            request(
                message("edsger@example.net", "Order confirmed"),
                Lane::Transactional,
                Some(order_key),
            ),
        ),
        (
            "invalid recipient",
            request(
                message("not an address", "Never sent"),
                Lane::Transactional,
                None,
            ),
        ),
    ]
}

struct Row {
    label: &'static str,
    id: Option<JobId>,
    state: Option<JobState>,
    note: String,
}

impl Row {
    fn is_final(&self) -> bool {
        self.state.is_some_and(JobState::is_final)
    }
}

fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "\n{:<40}  {:<36}  {:<10}  {}\n",
        "SAMPLE", "JOB", "STATUS", "NOTE"
    );
    for row in rows {
        let id = row.id.map_or_else(|| "-".to_owned(), |id| id.to_string());
        let state = row.state.map_or_else(
            || {
                if row.id.is_some() {
                    "pending".to_owned()
                } else {
                    "refused".to_owned()
                }
            },
            |state| state.to_string(),
        );
        out.push_str(&format!(
            "{:<40}  {id:<36}  {state:<10}  {}\n",
            row.label, row.note
        ));
    }
    out
}

fn print_outbox(dir: &Path, rows: &[Row]) {
    let written: Vec<_> = rows
        .iter()
        .filter(|row| row.state == Some(JobState::Sent))
        .filter_map(|row| row.id)
        .map(|id| dir.join(format!("{id}.eml")))
        .filter(|path| path.exists())
        .collect();
    println!(
        "\n{} message(s) written to {}/:",
        written.len(),
        dir.display()
    );
    for path in written {
        println!("  {}", path.display());
    }
}

#[cfg(test)]
mod tests {
    use mailroom_core::amqp::Outgoing;
    use mailroom_tests::rabbit::TestVhost;

    use super::*;

    /// A job waiting out a retry delay comes back to a work queue, where
    /// the demo's worker would take it.
    #[tokio::test]
    async fn a_job_in_a_retry_queue_stops_the_demo() {
        let vhost = TestVhost::new("demo-retry");
        let mut settings = Settings::default();
        settings.amqp = vhost.settings();
        let broker = vhost.declared().await;
        // The longest tier: the job stays put while the test runs.
        let tier = wire::RETRY_TIERS.last().expect("a tier");
        broker
            .publish(Outgoing {
                exchange: String::new(),
                routing_key: tier.queue(),
                body: b"job".to_vec(),
                properties: lapin::BasicProperties::default(),
                mandatory: true,
            })
            .await
            .expect("published");
        broker.close().await;
        let err = preflight(&settings).await.expect_err("a job waits");
        assert!(format!("{err:#}").contains("hold 1 jobs"), "{err:#}");
    }

    /// Starting a local Redis is the cure only where the default URL points.
    #[test]
    fn the_redis_hint_suggests_starting_it_only_at_the_default_address() {
        let mut redis = RedisSettings::default();
        assert!(redis_hint(&redis).contains("start it with `redis-server"));
        redis.url = Secret::new("redis://:s3cret@127.0.0.1:6390");
        let hint = redis_hint(&redis);
        assert!(!hint.contains("redis-server"), "{hint}");
        assert!(
            hint.contains("127.0.0.1:6390") && hint.contains("redis.url"),
            "{hint}"
        );
        assert!(!hint.contains("s3cret"), "{hint}");
    }
}
