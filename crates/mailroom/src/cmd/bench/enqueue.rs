//! `mailroom bench enqueue`: the producer's rate against the broker's ceiling.
//!
//! Both runs publish persistent, mandatory messages with publisher confirms,
//! the same window of unconfirmed messages and the same number of channels,
//! into an empty quorum queue of a vhost of their own, so the production
//! queues are never touched. mailroom's run also builds, validates and seals
//! every job; the plain run publishes bodies of the sealed size as they are.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use futures_util::StreamExt as _;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use mailroom_core::amqp::Broker;
use mailroom_core::job::{EmailMessage, JobRequest, Lane, SendJob};
use mailroom_core::seal::{Keyring, SealKey};
use mailroom_core::settings::{Secret, Settings};
use mailroom_core::wire::{self, Topology, work_queue};
use mailroom_producer::Producer;

use super::measure::{Run, cpu_time, cpu_used_since, parse_size, peak_rss_kib, reset_peak_rss};

/// Jobs published before timing starts, to open channels and warm caches.
const WARM_UP: usize = 1_000;

/// `mailroom bench enqueue`
#[derive(Debug, Args)]
pub struct EnqueueArgs {
    /// Jobs to publish.
    #[arg(short = 'n', long, default_value_t = 100_000)]
    count: usize,
    /// Size of each job's text body, e.g. 2KiB.
    #[arg(long, default_value = "2KiB", value_parser = parse_size)]
    size: usize,
    /// Unconfirmed messages in flight; `amqp.publish_window` by default.
    #[arg(long)]
    window: Option<usize>,
    /// Vhost the benchmark publishes into (made with `rabbitmqctl add_vhost`).
    #[arg(long, default_value = "mailroom-bench")]
    vhost: String,
}

/// Runs the benchmark and prints its figures.
pub async fn run(settings: &Settings, args: EnqueueArgs) -> anyhow::Result<()> {
    let mut settings = settings.clone();
    let window = args.window.unwrap_or(settings.amqp.publish_window).max(1);
    settings.amqp.publish_window = window;
    let url = settings
        .amqp
        .urls
        .first()
        .context("amqp.urls is empty")?
        .expose()
        .to_owned();
    let url = with_vhost(&url, &args.vhost);
    settings.amqp.urls = vec![Secret::new(url.clone())];

    let broker = Broker::connect(&settings.amqp).await.with_context(|| {
        format!(
            "connecting to vhost {0:?}; create it with: rabbitmqctl add_vhost {0} && rabbitmqctl set_permissions -p {0} guest '.*' '.*' '.*'",
            args.vhost
        )
    })?;
    let keyring = Keyring::new(
        [SealKey::generate("bench").map_err(anyhow::Error::msg)?],
        None,
    )?;
    broker.declare(&Topology::standard()).await?;
    let producer = Producer::from_parts(broker.clone(), keyring.clone(), settings.limits.clone());
    purge_work_queues(&broker).await?;

    println!(
        "mailroom bench enqueue: {} jobs, {} B text body, window {window}, {} channels, vhost {}",
        args.count, args.size, settings.amqp.channels, args.vhost
    );
    let body = Arc::<str>::from(body_text(args.size));
    let sealed_len = keyring.seal(&job(&body)).map(|sealed| sealed.body.len())?;

    run_mailroom(&producer, &body, WARM_UP, window).await?;
    purge_work_queues(&broker).await?;
    reset_peak_rss();
    let cpu = cpu_time();
    let mut ours = run_mailroom(&producer, &body, args.count, window).await?;
    ours.peak_rss_kib = peak_rss_kib();
    ours.cpu = cpu_used_since(cpu);
    purge_work_queues(&broker).await?;

    let contract = Shape {
        label: "plain lapin, same headers",
        exchange: wire::JOBS_EXCHANGE,
        routing_key: Lane::Transactional.as_str(),
        properties: sample_properties(&producer, &broker, &body).await?,
    };
    producer.close().await;
    let bare = Shape {
        label: "plain lapin, bare",
        exchange: "",
        routing_key: PLAIN_QUEUE,
        properties: BasicProperties::default().with_delivery_mode(2),
    };
    let mut ceilings = Vec::new();
    for shape in [contract, bare] {
        reset_peak_rss();
        let cpu = cpu_time();
        let mut run = run_plain(
            &url,
            &shape,
            sealed_len,
            args.count,
            window,
            settings.amqp.channels,
        )
        .await?;
        run.peak_rss_kib = peak_rss_kib();
        run.cpu = cpu_used_since(cpu);
        purge_work_queues(&broker).await?;
        ceilings.push(run);
    }
    broker.close().await;

    println!("{}", ours.report());
    println!(
        "  of which validate + seal (no broker, one core): {:.1} us/job",
        local_work(&keyring, &settings.limits, &body)?.as_secs_f64() * 1e6
    );
    for ceiling in &mut ceilings {
        println!("{}", ceiling.report());
    }
    for ceiling in &ceilings {
        println!(
            "ratio mailroom / {}: {:.2} (target >= 0.85)",
            ceiling.label,
            ours.rate() / ceiling.rate()
        );
    }
    println!("sealed body {sealed_len} B; plain runs publish unsealed bodies of that size");
    Ok(())
}

/// Time per job of the work mailroom adds before publishing: building,
/// validating and sealing, on one core.
fn local_work(
    keyring: &Keyring,
    limits: &mailroom_core::validate::Limits,
    body: &str,
) -> anyhow::Result<Duration> {
    const ROUNDS: u32 = 5_000;
    let start = Instant::now();
    for _ in 0..ROUNDS {
        let job = job(body);
        mailroom_core::validate::validate_job(&job, limits)?;
        std::hint::black_box(keyring.seal(&job)?);
    }
    Ok(start.elapsed() / ROUNDS)
}

/// `url` with its vhost replaced.
fn with_vhost(url: &str, vhost: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("amqp", url));
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    let query = rest.find('?').map_or("", |at| &rest[at..]);
    let encoded: String = vhost
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    format!("{scheme}://{authority}/{encoded}{query}")
}

fn body_text(size: usize) -> String {
    const WORDS: &str = "the quick brown fox jumps over the lazy dog; ";
    WORDS.chars().cycle().take(size).collect()
}

fn job(body: &str) -> SendJob {
    SendJob::from_request(
        JobRequest {
            lane: Lane::Transactional,
            message: EmailMessage {
                from: "Bench <bench@mailroom.example>".to_owned(),
                to: vec!["Reader <reader@example.org>".to_owned()],
                subject: "mailroom bench".to_owned(),
                text: Some(body.to_owned()),
                ..EmailMessage::default()
            },
            ..JobRequest::default()
        },
        "bench",
    )
}

async fn purge_work_queues(broker: &Broker) -> anyhow::Result<()> {
    let channel = broker.channel().await?;
    for lane in Lane::ALL {
        channel
            .queue_purge(
                work_queue(lane).as_str().into(),
                QueuePurgeOptions::default(),
            )
            .await?;
    }
    let _ = channel.close(200, "bench done".into()).await;
    Ok(())
}

async fn run_mailroom(
    producer: &Producer,
    body: &Arc<str>,
    count: usize,
    window: usize,
) -> anyhow::Result<Run> {
    let started = Instant::now();
    let results: Vec<_> = futures_util::stream::iter(0..count)
        .map(|_| {
            let job = job(body);
            async move {
                let start = Instant::now();
                producer.enqueue(job).await.map(|_| start.elapsed())
            }
        })
        .buffer_unordered(window)
        .collect()
        .await;
    let elapsed = started.elapsed();
    let latencies = results.into_iter().collect::<Result<Vec<_>, _>>()?;
    Ok(Run {
        label: "mailroom enqueue (sealed)",
        latencies,
        elapsed,
        peak_rss_kib: None,
        cpu: None,
    })
}

/// Where and how a plain run publishes.
struct Shape {
    label: &'static str,
    exchange: &'static str,
    routing_key: &'static str,
    properties: BasicProperties,
}

/// Queue of the bare plain run, declared like a work queue.
const PLAIN_QUEUE: &str = "mailroom.bench.plain";

/// The properties and headers mailroom gives a job: one job enqueued and
/// fetched back.
async fn sample_properties(
    producer: &Producer,
    broker: &Broker,
    body: &str,
) -> anyhow::Result<BasicProperties> {
    producer.enqueue(job(body)).await?;
    let channel = broker.channel().await?;
    let message = channel
        .basic_get(
            work_queue(Lane::Transactional).as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await?
        .context("the sample job did not arrive")?;
    let _ = channel.close(200, "sampled".into()).await;
    Ok(message.delivery.properties.clone())
}

/// A plain lapin publisher: confirms, the same window and channel count,
/// bodies of the sealed size, nothing validated or sealed.
async fn run_plain(
    url: &str,
    shape: &Shape,
    body_len: usize,
    count: usize,
    window: usize,
    channels: usize,
) -> anyhow::Result<Run> {
    let connection = Connection::connect(url, ConnectionProperties::default()).await?;
    let mut pool = Vec::new();
    for _ in 0..channels.max(1) {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        pool.push(channel);
    }
    let spec = Topology::standard()
        .queues
        .into_iter()
        .find(|spec| spec.name == work_queue(Lane::Transactional))
        .context("topology has no transactional queue")?;
    pool[0]
        .queue_declare(
            PLAIN_QUEUE.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            spec.argument_table(),
        )
        .await?;
    pool[0]
        .queue_purge(PLAIN_QUEUE.into(), QueuePurgeOptions::default())
        .await?;
    let body = vec![b'x'; body_len];
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    let results: Vec<Result<Duration, anyhow::Error>> = futures_util::stream::iter(0..count)
        .map(|_| {
            let channel = &pool[next.fetch_add(1, Ordering::Relaxed) % pool.len()];
            let body = &body;
            async move {
                let start = Instant::now();
                let confirm = channel
                    .basic_publish(
                        shape.exchange.into(),
                        shape.routing_key.into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        body,
                        shape.properties.clone(),
                    )
                    .await?
                    .await?;
                anyhow::ensure!(
                    matches!(confirm, lapin::Confirmation::Ack(None)),
                    "plain publish not acked"
                );
                Ok(start.elapsed())
            }
        })
        .buffer_unordered(window)
        .collect()
        .await;
    let elapsed = started.elapsed();
    pool[0]
        .queue_delete(PLAIN_QUEUE.into(), QueueDeleteOptions::default())
        .await?;
    let _ = connection.close(200, "bench done".into()).await;
    Ok(Run {
        label: shape.label,
        latencies: results.into_iter().collect::<Result<_, _>>()?,
        elapsed,
        peak_rss_kib: None,
        cpu: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vhost_is_replaced_and_encoded() {
        assert_eq!(
            with_vhost("amqp://guest:guest@127.0.0.1:5672/%2f", "mailroom-bench"),
            "amqp://guest:guest@127.0.0.1:5672/mailroom-bench"
        );
        assert_eq!(with_vhost("amqps://h", "a b"), "amqps://h/a%20b");
        assert_eq!(
            with_vhost("amqp://h:1/x?heartbeat=5", "v"),
            "amqp://h:1/v?heartbeat=5"
        );
    }
}
