//! `mailroom bench enqueue`: the producer's rate against the broker's ceiling.
//!
//! Both runs publish persistent, mandatory messages with publisher confirms,
//! the same window of unconfirmed messages and the same number of channels,
//! into an empty quorum queue of a vhost of their own, so the production
//! queues are never touched. mailroom's run also builds, validates and seals
//! every job; the plain run publishes bodies of the sealed size as they are.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use lapin::BasicProperties;
use mailroom_core::job::Lane;
use mailroom_core::seal::{Keyring, SealKey};
use mailroom_core::settings::Settings;
use mailroom_core::wire;
use mailroom_producer::{Producer, ReadyJob, seal_ahead};

use super::measure::{
    Run, cpu_time, cpu_used_since, parse_size, peak_rss_kib, print_rates, print_ratios,
    reset_peak_rss,
};
use super::plain::{PLAIN_QUEUE, Plain, Shape};
use super::setup::{bench_broker, body_text, job, purge_queues, sample_properties};

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
    /// Rounds; each runs mailroom and both plain publishers once, in a
    /// rotating order, so drift in the broker's state favours none.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

/// Runs the benchmark and prints its figures.
pub async fn run(settings: &Settings, args: EnqueueArgs) -> anyhow::Result<()> {
    let (mut settings, url, broker) = bench_broker(settings, &args.vhost).await?;
    let window = args.window.unwrap_or(settings.amqp.publish_window).max(1);
    settings.amqp.publish_window = window;
    let keyring = Keyring::new(
        [SealKey::generate("bench").map_err(anyhow::Error::msg)?],
        None,
    )?;
    let producer = Producer::from_parts(broker.clone(), keyring.clone(), settings.limits.clone());

    println!(
        "mailroom bench enqueue: {} jobs, {} B text body, window {window}, {} channels, vhost {}",
        args.count, args.size, settings.amqp.channels, args.vhost
    );
    let body = Arc::<str>::from(body_text(args.size));
    let sealed_len = keyring.seal(&job(&body)).map(|sealed| sealed.body.len())?;

    run_mailroom(&producer, &body, WARM_UP, window).await?;
    purge_queues(&broker).await?;
    let contract = Shape {
        label: "plain lapin, same headers",
        exchange: wire::JOBS_EXCHANGE,
        routing_key: Lane::Transactional.as_str(),
        properties: sample_properties(&producer, &body).await?,
    };
    let bare = Shape {
        label: "plain lapin, bare",
        exchange: "",
        routing_key: PLAIN_QUEUE,
        properties: BasicProperties::default().with_delivery_mode(2),
    };
    let plain = Plain::open(&url, settings.amqp.channels).await?;
    let mut runs: [Vec<Run>; 3] = Default::default();
    for round in 0..args.rounds.max(1) {
        for step in 0..3 {
            let which = (round + step) % 3;
            reset_peak_rss();
            let cpu = cpu_time();
            let mut run = match which {
                0 => run_mailroom(&producer, &body, args.count, window).await?,
                1 => {
                    plain
                        .publish(&contract, sealed_len, args.count, window)
                        .await?
                }
                _ => plain.publish(&bare, sealed_len, args.count, window).await?,
            };
            run.peak_rss_kib = peak_rss_kib();
            run.cpu = cpu_used_since(cpu);
            purge_queues(&broker).await?;
            runs[which].push(run);
        }
    }
    producer.close().await;
    plain.close().await?;
    broker.close().await;
    print_rounds(&runs);
    let [ours, same, bare_runs] = runs;
    let ours = Run::merge("mailroom enqueue (sealed)", ours);
    let ceilings = [
        Run::merge("plain lapin, same headers", same),
        Run::merge("plain lapin, bare", bare_runs),
    ];

    println!("{}", ours.report());
    println!(
        "  of which build + validate + seal (no broker, one core): {:.1} us/job",
        local_work(&keyring, &settings.limits, &body)?.as_secs_f64() * 1e6
    );
    for ceiling in &ceilings {
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

/// Each round's rates, and mailroom's ratio to each plain publisher round
/// by round.
fn print_rounds(runs: &[Vec<Run>; 3]) {
    for (kind, list) in runs.iter().enumerate() {
        print_rates(["mailroom", "same headers", "bare"][kind], list);
    }
    for (kind, name) in [(1, "same headers"), (2, "bare")] {
        let ceilings: Vec<f64> = runs[kind].iter().map(Run::rate).collect();
        print_ratios(name, &runs[0], &ceilings);
    }
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

async fn run_mailroom(
    producer: &Producer,
    body: &Arc<str>,
    count: usize,
    window: usize,
) -> anyhow::Result<Run> {
    let started = Instant::now();
    // `Producer::enqueue_many`'s way, with each confirm timed from its
    // publish, as the plain publishers time theirs.
    let results = seal_ahead(
        0..count,
        window,
        |_| {
            let ready = producer.check(job(body)).and_then(|job| producer.seal(job));
            let bytes = ready.as_ref().map_or(0, ReadyJob::bytes);
            (ready, bytes)
        },
        |ready| async move {
            let start = Instant::now();
            producer.publish(ready?).await?;
            anyhow::Ok(start.elapsed())
        },
    )
    .await;
    let elapsed = started.elapsed();
    let latencies = results.into_iter().collect::<Result<Vec<_>, _>>()?;
    Ok(Run::new("mailroom enqueue (sealed)", latencies, elapsed))
}
