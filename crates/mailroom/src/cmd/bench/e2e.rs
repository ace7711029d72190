//! `mailroom bench e2e`: the whole path (enqueue, a `mailroom worker`
//! process, an SMTP sink on loopback) against two ceilings measured in the
//! same run: the broker's (a plain lapin consumer acking messages of the
//! same size and properties, mailroom's header table included, each on its
//! own) and the sink's (the same messages over the same concurrency,
//! connections reused, no queue).
//!
//! The throughput runs go in rounds, each of the two ceilings and the
//! worker alone draining a backlog (a worker process started after the
//! backlog was enqueued), in an order that rotates from round to round: the
//! broker slows as a run loads it, so whatever ran first would be favoured.
//! The plain consumer then runs twice more, for comparison: on bare
//! messages, and acking in batches as the worker does.
//!
//! Then the latency phases, on a worker process of their own:
//! - enqueue and delivery at once, as fast as they go: the most the whole
//!   path sustains, with the producer on the same cores;
//! - paced at half that rate, then at half the drain rate: the latency from
//!   a job's creation to the relay's acceptance, as its status records it.
//!   The target is read at half the rate of the workload the phase runs
//!   (enqueue and delivery at once); half the drain rate is most of what
//!   that workload sustains on a shared 2-core machine, so it is printed
//!   for comparison, as the load near saturation.
//!
//! The workers run as processes of their own, so their RSS is their own.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs as _};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use lapin::BasicProperties;
use mailroom_core::job::{JobId, SendJob};
use mailroom_core::seal::SealKey;
use mailroom_core::settings::{Secret, Settings, TlsMode, TransportKind};
use mailroom_core::status::{JobState, StatusStore};
use mailroom_core::store::RedisStore;
use mailroom_producer::Producer;
use mailroom_worker::message::build_message;
use mailroom_worker::transport::{SmtpMessage, SmtpTransport};

use super::measure::{Run, cpu_time_of, parse_size, peak_rss_kib_of, print_rates, print_ratios};
use super::plain::{PLAIN_QUEUE, Plain, Shape};
use super::setup::{bench_broker, body_text, clean_up, job, purge_queues, sample_properties};
use super::split::CpuSplit;

/// Pause between the two mailroom phases.
const SETTLE: Duration = Duration::from_secs(3);

/// The plain consumer's second run acks every this many with `multiple`,
/// as the worker batches its acks: shown for comparison; the ceiling the
/// target is set against is the first run, acking each message.
const BATCHED_ACKS: usize = 32;

/// No progress for this long means something is broken: stop and say so.
const STALL: Duration = Duration::from_secs(30);

/// `mailroom bench e2e`
#[derive(Debug, Args)]
pub struct E2eArgs {
    /// Jobs in the throughput phase (and messages in each ceiling).
    #[arg(short = 'n', long, default_value_t = 50_000)]
    count: usize,
    /// Worker concurrency (and consumer prefetch), and sends in flight in
    /// the sink's ceiling; both use a quarter of it in SMTP connections,
    /// on which the sends behind a busy one are handed over.
    #[arg(long, default_value_t = 256)]
    concurrency: u16,
    /// Size of each job's text body, e.g. 2KiB.
    #[arg(long, default_value = "2KiB", value_parser = parse_size)]
    size: usize,
    /// The SMTP sink (plain SMTP on loopback), e.g. postfix's `smtp-sink`.
    #[arg(long, default_value = "smtp://127.0.0.1:2525")]
    smtp: String,
    /// Length of the paced (latency) phase.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    paced: Duration,
    /// Vhost the benchmark uses (made with `rabbitmqctl add_vhost`).
    #[arg(long, default_value = "mailroom-bench")]
    vhost: String,
    /// Rounds of the throughput runs (the two ceilings and the worker's
    /// drain), each round in a rotating order, so that the broker's drift
    /// over the run favours none of them.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// SMTP connections, of the worker and of the sink's ceiling alike; a
    /// quarter of the concurrency by default.
    #[arg(long)]
    connections: Option<u32>,
}

/// Runs the benchmark and prints its figures.
pub async fn run(settings: &Settings, args: E2eArgs) -> anyhow::Result<()> {
    let (mut settings, url, broker) = bench_broker(settings, &args.vhost).await?;
    let seal_line = configure(&mut settings, &args)?;
    check_sink(&args.smtp)?;
    let keyring = settings.keyring()?;
    let body = body_text(args.size);
    let sealed_len = keyring.seal(&job(&body))?.body.len();
    println!(
        "mailroom bench e2e: {} jobs, {} B text body ({sealed_len} B sealed), concurrency {}, {} SMTP connections, sink {}, vhost {}, {} rounds",
        args.count,
        args.size,
        args.concurrency,
        settings.smtp.pool_size,
        args.smtp,
        args.vhost,
        args.rounds.max(1)
    );
    let store = RedisStore::connect(&settings.redis).await?;
    let bench = Bench {
        settings: &settings,
        seal_line: &seal_line,
        producer: Producer::from_parts(broker.clone(), keyring, settings.limits.clone()),
        body: &body,
        args: &args,
        workers: Vec::new(),
        splits: Vec::new(),
    };
    let outcome = bench.run(&url, sealed_len, &store).await;
    clean_up(&store, &settings.redis.key_prefix).await;
    purge_queues(&broker).await?;
    broker.close().await;
    outcome
}

/// What the runs share.
struct Bench<'a> {
    settings: &'a Settings,
    seal_line: &'a str,
    producer: Producer,
    body: &'a str,
    args: &'a E2eArgs,
    /// Each worker process's figures, taken just before it stopped.
    workers: Vec<Run>,
    /// Where the machine's CPU went in each drain.
    splits: Vec<CpuSplit>,
}

/// The throughput runs: drains, sink ceilings and plain consumers by
/// round, and the plain consumer's two runs for comparison.
struct Throughput {
    runs: [Vec<Run>; 3],
    bare: Run,
    batched: Run,
}

impl Bench<'_> {
    /// The rounds of the throughput runs, then the latency phases.
    async fn run(mut self, url: &str, sealed_len: usize, store: &RedisStore) -> anyhow::Result<()> {
        let args = self.args;
        let plain = Plain::open(url, self.settings.amqp.channels).await?;
        let measured = self.throughput(&plain, sealed_len).await;
        // The plain queue goes whatever happened, so a failed run leaves
        // nothing behind in the vhost.
        plain.close().await?;
        let Throughput {
            runs,
            bare,
            batched,
        } = measured?;

        let [drains, sinks, consumers] = runs;
        print_rates("drain", &drains);
        print_rates("sink", &sinks);
        print_rates("plain consumer", &consumers);
        let lower: Vec<f64> = sinks
            .iter()
            .zip(&consumers)
            .map(|(sink, consumer)| sink.rate().min(consumer.rate()))
            .collect();
        print_ratios("the lower ceiling", &drains, &lower);
        let mut cpu = CpuSplit::default();
        for split in &self.splits {
            println!("  CPU in a drain: {}", split.per_job(args.count));
            cpu.add(split);
        }
        let sink = Run::merge("sink ceiling: SMTP, no queue", sinks);
        let consumer = Run::merge("broker ceiling: plain consumer", consumers);
        let drained = Run::merge("mailroom worker, backlog drained", drains);
        for run in [&sink, &consumer, &bare, &batched] {
            println!("{}", run.report());
        }
        if !self.splits.is_empty() {
            println!(
                "CPU in the drains: {}",
                cpu.per_job(args.count * self.splits.len())
            );
        }

        let mut worker = WorkerProcess::spawn(self.settings, self.seal_line)?;
        let phases = self.latency_phases(&mut worker, &drained, store).await;
        let sent = phases.as_ref().map_or(0, Phases::sent);
        self.workers.push(worker.figures(sent));
        worker.stop();
        report(
            sink.rate().min(consumer.rate()),
            [&bare, &batched],
            &drained,
            &phases?,
            &Run::merge("worker processes", self.workers),
        );
        Ok(())
    }

    /// The rounds of the two ceilings and the drain, then the plain
    /// consumer's two runs for comparison.
    async fn throughput(&mut self, plain: &Plain, sealed_len: usize) -> anyhow::Result<Throughput> {
        let args = self.args;
        // The broker's ceiling is taken on messages like the worker's: the
        // wire contract's properties and header table cost the broker a
        // delivery more than a bare message (see the README).
        let contract = Shape {
            label: "plain publish, mailroom's headers",
            exchange: "",
            routing_key: PLAIN_QUEUE,
            properties: sample_properties(&self.producer, self.body).await?,
        };
        let bare = Shape {
            label: "plain publish",
            exchange: "",
            routing_key: PLAIN_QUEUE,
            properties: BasicProperties::default().with_delivery_mode(2),
        };
        let window = self.settings.amqp.publish_window;
        let consume = async |shape: &Shape, label, ack_every| {
            plain.publish(shape, sealed_len, args.count, window).await?;
            plain
                .consume(label, args.count, args.concurrency, ack_every)
                .await
        };
        let mut runs: [Vec<Run>; 3] = Default::default();
        for round in 0..args.rounds.max(1) {
            for step in 0..3 {
                let which = (round + step) % 3;
                let run = match which {
                    0 => self.drain().await?,
                    1 => {
                        sink_ceiling(self.settings, &job(self.body), args.count, args.concurrency)
                            .await?
                    }
                    _ => consume(&contract, "broker ceiling: plain consumer", 1).await?,
                };
                runs[which].push(run);
            }
        }
        Ok(Throughput {
            runs,
            bare: consume(&bare, "plain consumer, bare messages", 1).await?,
            batched: consume(&contract, "plain consumer, batched acks", BATCHED_ACKS).await?,
        })
    }

    /// A backlog of `count` jobs, enqueued first, drained by a worker
    /// process started afterwards: the worker alone, like the two ceilings,
    /// which are a consumer alone and a sender alone.
    async fn drain(&mut self) -> anyhow::Result<Run> {
        let count = self.args.count;
        enqueue_all(&self.producer, self.body, count).await?;
        let mut worker = WorkerProcess::spawn(self.settings, self.seal_line)?;
        worker.wait_ready()?;
        let before = CpuSplit::read(worker.child.id());
        let started = Instant::now();
        worker.wait_sent(count)?;
        let drained = Run::counted("mailroom worker, backlog drained", count, started.elapsed());
        if let (Some(before), Some(after)) = (before, CpuSplit::read(worker.child.id())) {
            self.splits.push(after.since(&before));
        }
        self.workers.push(worker.figures(count));
        worker.stop();
        // Nothing is left but what a stopping worker may not have acked:
        // sent already, it would only come back as a duplicate.
        purge_queues(self.producer.broker()).await?;
        Ok(drained)
    }

    /// The latency phases, on a worker of their own: enqueue and delivery
    /// at once, then the two paced phases.
    async fn latency_phases(
        &self,
        worker: &mut WorkerProcess,
        drained: &Run,
        store: &RedisStore,
    ) -> anyhow::Result<Phases> {
        worker.wait_ready()?;
        // Each phase starts after the broker finished the last one's
        // housekeeping (quorum-queue segment clean-up), in a steady state.
        tokio::time::sleep(SETTLE).await;
        let both = (self.args.count / 2).max(1);
        let started = Instant::now();
        enqueue_all(&self.producer, self.body, both).await?;
        worker.wait_sent(both)?;
        let at_once = Run::counted("mailroom, enqueue + send at once", both, started.elapsed());
        let mut sent = both;

        let path = Path {
            producer: &self.producer,
            body: self.body,
            statuses: StatusStore::new(store.clone(), self.settings.worker.status_retention),
            length: self.args.paced,
        };
        let half_at_once = path
            .paced(
                worker,
                sent,
                at_once.rate() / 2.0,
                "mailroom at half the at-once rate",
            )
            .await?;
        sent += half_at_once.end_to_end.count;
        let half_drained = path
            .paced(
                worker,
                sent,
                drained.rate() / 2.0,
                "mailroom at half the drain rate",
            )
            .await?;
        Ok(Phases {
            at_once,
            half_at_once,
            half_drained,
        })
    }
}

/// Prints the mailroom runs' figures and the targets' ratios.
fn report(lower: f64, others: [&Run; 2], drained: &Run, phases: &Phases, workers: &Run) {
    println!("{}", drained.report());
    println!("{}", phases.at_once.report());
    for latency in [&phases.half_at_once, &phases.half_drained] {
        println!("{}", latency.end_to_end.report());
        println!("{}", latency.confirms.report());
        println!(
            "  longest pause: {:.0} ms between two confirms, {:.0} ms between two sends",
            latency.pauses.confirms.as_secs_f64() * 1e3,
            latency.pauses.sends.as_secs_f64() * 1e3
        );
    }
    let rss_mib = workers.peak_rss_kib.map(|kib| kib as f64 / 1024.0);
    println!(
        "worker peak RSS: {}",
        rss_mib.map_or_else(|| "n/a".to_owned(), |mib| format!("{mib:.1} MiB"))
    );
    if let Some(cpu) = workers.cpu {
        println!(
            "worker CPU: {:.0} us/job (user + system, every worker process of the run)",
            cpu.as_secs_f64() * 1e6 / workers.count.max(1) as f64
        );
    }
    println!(
        "ratio mailroom (drain) / lower ceiling ({:.0} /s): {:.2} (target >= 0.6)",
        lower,
        drained.rate() / lower
    );
    for (other, why) in others.into_iter().zip([
        "for comparison: messages without mailroom's headers",
        "for comparison: the worker batches its acks too",
    ]) {
        println!(
            "ratio mailroom / {} ({:.0} /s): {:.2} ({why})",
            other.label,
            other.rate(),
            drained.rate() / other.rate()
        );
    }
    let p99 = |latency: &Latency| {
        latency.end_to_end.percentile(99.0).map_or_else(
            || "n/a".to_owned(),
            |p| format!("{:.1} ms", p.as_secs_f64() * 1e3),
        )
    };
    println!(
        "p99 at half the at-once rate: {} (target < 100 ms); at half the drain rate: {} (the whole path at {:.0} % of what it sustains); worker RSS target < 64 MiB",
        p99(&phases.half_at_once),
        p99(&phases.half_drained),
        100.0 * drained.rate() / 2.0 / phases.at_once.rate()
    );
}

/// Points the settings at the sink, a key prefix of this run's own and a
/// fresh sealing key. Returns the key's line for the worker process.
fn configure(settings: &mut Settings, args: &E2eArgs) -> anyhow::Result<String> {
    settings.worker.transport = TransportKind::Smtp;
    settings.worker.concurrency = args.concurrency;
    settings.worker.prefetch = None;
    settings.smtp.url = Secret::new(args.smtp.clone());
    settings.smtp.tls = TlsMode::None;
    settings.smtp.username = None;
    // Measured with 256 in flight: 16, 32, 64 and 256 connections gave a
    // sink ceiling of 66.8k, 60.7k, 69.8k and 37.5k messages/s and a drain
    // of 14.0k, 15.9k, 16.9k and 14.7k jobs/s (one run each).
    settings.smtp.pool_size = args
        .connections
        .unwrap_or_else(|| u32::from(args.concurrency.div_ceil(4)))
        .max(1);
    settings.redis.key_prefix = format!("mailroom-bench-{}:", uuid_simple());
    let key = SealKey::generate("bench").map_err(anyhow::Error::msg)?;
    let line = key.to_line().to_string();
    settings.seal.keys = Secret::new(line.clone());
    settings.seal.keys_file = None;
    settings.seal.active = Some("bench".to_owned());
    if settings.hash_key().is_err() {
        let key = SealKey::generate("hash").map_err(anyhow::Error::msg)?;
        settings.redis.hash_key = Secret::new(key.to_line().as_str());
    }
    Ok(line)
}

fn uuid_simple() -> String {
    JobId::new().to_string().replace('-', "")
}

/// Fails early, with the command that starts one, when no sink listens.
fn check_sink(url: &str) -> anyhow::Result<()> {
    let authority = url
        .split_once("://")
        .map_or(url, |(_, rest)| rest)
        .trim_end_matches('/');
    let address: SocketAddr = authority
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .with_context(|| format!("--smtp {url}: expected smtp://host:port"))?;
    TcpStream::connect_timeout(&address, Duration::from_secs(2)).with_context(|| {
        format!(
            "no SMTP sink at {address}: start one with `/usr/sbin/smtp-sink -u postfix {address} 1024 &` (Debian package postfix)"
        )
    })?;
    Ok(())
}

/// The sink's ceiling: `count` messages, `concurrency` in flight over the
/// transport's reused connections (as many as the worker's), straight from
/// memory.
async fn sink_ceiling(
    settings: &Settings,
    sample: &SendJob,
    count: usize,
    concurrency: u16,
) -> anyhow::Result<Run> {
    let transport = SmtpTransport::new(&settings.smtp)?;
    let message = SmtpMessage::new(build_message(sample)?);
    let started = Instant::now();
    let results: Vec<anyhow::Result<Duration>> = futures_util::stream::iter(0..count)
        .map(|_| async {
            let start = Instant::now();
            transport.send(&message, None).await?;
            Ok(start.elapsed())
        })
        .buffer_unordered(usize::from(concurrency))
        .collect()
        .await;
    let elapsed = started.elapsed();
    transport.shutdown().await;
    Ok(Run::new(
        "sink ceiling: SMTP, no queue",
        results.into_iter().collect::<Result<_, _>>()?,
        elapsed,
    ))
}

/// Enqueues `count` jobs pipelined; fails on the first that was not.
async fn enqueue_all(producer: &Producer, body: &str, count: usize) -> anyhow::Result<()> {
    for result in producer
        .enqueue_many((0..count).map(|_| job(body)).collect())
        .await
    {
        result?;
    }
    Ok(())
}

/// What the latency phases measured.
struct Phases {
    /// Enqueue and delivery at once, flat out: the most the whole path
    /// (the paced phases' workload) sustains on this machine.
    at_once: Run,
    /// Paced at half of `at_once`: the latency target's load.
    half_at_once: Latency,
    /// Paced at half the drain rate, for comparison: with the producer
    /// sharing the cores, that is most of what the machine sustains.
    half_drained: Latency,
}

impl Phases {
    /// Jobs the phases' worker sent.
    fn sent(&self) -> usize {
        self.at_once.count + self.half_at_once.end_to_end.count + self.half_drained.end_to_end.count
    }
}

/// A paced phase's figures.
struct Latency {
    /// From each job's creation to the relay's acceptance.
    end_to_end: Run,
    /// From each job's creation to the broker's confirm.
    confirms: Run,
    /// The longest pauses: one in both is the broker's.
    pauses: Pauses,
}

/// What a paced phase needs.
struct Path<'a> {
    producer: &'a Producer,
    body: &'a str,
    statuses: StatusStore,
    length: Duration,
}

impl Path<'_> {
    /// Enqueues at `rate` for the phase's length once the broker settled,
    /// waits until the worker sent them all (`sent_before` sent earlier),
    /// and reads their latencies from their statuses.
    async fn paced(
        &self,
        worker: &mut WorkerProcess,
        sent_before: usize,
        rate: f64,
        label: &'static str,
    ) -> anyhow::Result<Latency> {
        tokio::time::sleep(SETTLE).await;
        let phase = paced(self.producer, self.body, rate, self.length).await?;
        worker.wait_sent(sent_before + phase.ids.len())?;
        latency_of(&self.statuses, phase, self.length, label).await
    }
}

/// The latencies of a paced phase's jobs, as their statuses recorded them.
async fn latency_of(
    statuses: &StatusStore,
    phase: Paced,
    length: Duration,
    label: &'static str,
) -> anyhow::Result<Latency> {
    let mut latencies = Vec::with_capacity(phase.ids.len());
    let mut sent_at = Vec::with_capacity(phase.ids.len());
    for id in &phase.ids {
        let status = statuses
            .get(id)
            .await?
            .with_context(|| format!("no status for job {id}"))?;
        if status.state == JobState::Sent {
            latencies.push(
                (status.updated_at - status.created_at)
                    .try_into()
                    .unwrap_or_default(),
            );
            sent_at.push(
                (status.updated_at - time::OffsetDateTime::UNIX_EPOCH)
                    .try_into()
                    .unwrap_or_default(),
            );
        }
    }
    let mut end_to_end = Run::new(label, latencies, length);
    end_to_end.count = phase.ids.len();
    Ok(Latency {
        end_to_end,
        confirms: Run::new("  of which enqueue, to its confirm", phase.confirms, length),
        pauses: Pauses {
            confirms: longest_pause(phase.confirmed_at),
            sends: longest_pause(sent_at),
        },
    })
}

/// The longest pauses of the paced phase: one in both is the broker's.
struct Pauses {
    confirms: Duration,
    sends: Duration,
}

/// What the paced phase enqueued.
struct Paced {
    ids: Vec<JobId>,
    /// Each job's time from its creation to the broker's confirm (the
    /// producer's and the broker's share of the end-to-end latency).
    confirms: Vec<Duration>,
    /// When each confirm came, from the phase's start.
    confirmed_at: Vec<Duration>,
}

/// Enqueues at `rate` jobs a second for `length`.
async fn paced(
    producer: &Producer,
    body: &str,
    rate: f64,
    length: Duration,
) -> anyhow::Result<Paced> {
    const TICK: Duration = Duration::from_millis(10);
    let mut ticker = tokio::time::interval(TICK);
    let started = Instant::now();
    let mut sent = 0_usize;
    let mut pending = FuturesUnordered::new();
    let mut done = Paced {
        ids: Vec::new(),
        confirms: Vec::new(),
        confirmed_at: Vec::new(),
    };
    let timed = |job| async {
        let created = Instant::now();
        let id = producer.enqueue(job).await?;
        anyhow::Ok((id, created.elapsed(), started.elapsed()))
    };
    let mut record = |(id, took, at)| {
        done.ids.push(id);
        done.confirms.push(took);
        done.confirmed_at.push(at);
    };
    // The enqueues in flight are polled all the time, not once a tick: a
    // confirm must be seen when it comes, and a tick's new jobs must all
    // start at once (FuturesUnordered polls 32 before it yields).
    while started.elapsed() < length {
        tokio::select! {
            _ = ticker.tick() => {
                let due = rate * started.elapsed().as_secs_f64();
                while (sent as f64) < due {
                    pending.push(timed(job(body)));
                    sent += 1;
                }
            }
            Some(result) = pending.next() => record(result?),
        }
    }
    while let Some(result) = pending.next().await {
        record(result?);
    }
    Ok(done)
}

/// The longest wait between two consecutive events of `times`: a pause of
/// the whole phase, where a slow job alone would not show.
fn longest_pause(mut times: Vec<Duration>) -> Duration {
    times.sort_unstable();
    times
        .windows(2)
        .map(|pair| pair[1].saturating_sub(pair[0]))
        .max()
        .unwrap_or_default()
}

/// A `mailroom worker` child process with a health port of its own.
struct WorkerProcess {
    child: Child,
    health: SocketAddr,
    log: PathBuf,
}

impl WorkerProcess {
    fn spawn(settings: &Settings, seal_line: &str) -> anyhow::Result<Self> {
        let health = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let log =
            std::env::temp_dir().join(format!("mailroom-bench-worker-{}.log", std::process::id()));
        let file = std::fs::File::create(&log)?;
        let s = settings;
        let child = Command::new(std::env::current_exe()?)
            .arg("worker")
            .env("MAILROOM__AMQP__URLS", s.amqp.urls[0].expose())
            .env("MAILROOM__REDIS__URL", s.redis.url.expose())
            .env("MAILROOM__REDIS__KEY_PREFIX", &s.redis.key_prefix)
            .env("MAILROOM__REDIS__HASH_KEY", s.redis.hash_key.expose())
            .env("MAILROOM__SEAL__KEYS", seal_line)
            .env_remove("MAILROOM__SEAL__KEYS_FILE")
            .env("MAILROOM__SEAL__ACTIVE", "bench")
            .env("MAILROOM__SMTP__URL", s.smtp.url.expose())
            .env("MAILROOM__SMTP__TLS", "none")
            .env("MAILROOM__SMTP__POOL_SIZE", s.smtp.pool_size.to_string())
            .env("MAILROOM__WORKER__TRANSPORT", "smtp")
            .env(
                "MAILROOM__WORKER__CONCURRENCY",
                s.worker.concurrency.to_string(),
            )
            .env("MAILROOM__WORKER__HEALTH_BIND", health.to_string())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .context("starting `mailroom worker`")?;
        Ok(Self { child, health, log })
    }

    fn http_get(&self, path: &str) -> Option<String> {
        let mut stream = TcpStream::connect_timeout(&self.health, Duration::from_secs(1)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let ok = response
            .lines()
            .next()
            .is_some_and(|status| status.contains(" 200 "));
        ok.then_some(response)
    }

    fn alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "the worker exited ({status}); its log:\n{}",
                self.log_tail()
            );
        }
        Ok(())
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let start = Instant::now();
        while self.http_get("/readyz").is_none() {
            self.alive()?;
            if start.elapsed() > STALL {
                bail!(
                    "the worker did not become ready; its log:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Jobs the worker counted as sent so far.
    fn sent(&self) -> Option<usize> {
        let metrics = self.http_get("/metrics")?;
        let line = metrics
            .lines()
            .find(|line| line.starts_with("mailroom_jobs_total{outcome=\"sent\"}"));
        Some(
            line.and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
                .map_or(0, |v| v as usize),
        )
    }

    fn wait_sent(&mut self, count: usize) -> anyhow::Result<()> {
        let mut last = (0, Instant::now());
        loop {
            self.alive()?;
            let sent = self.sent().unwrap_or(last.0);
            if sent >= count {
                return Ok(());
            }
            if sent > last.0 {
                last = (sent, Instant::now());
            } else if last.1.elapsed() > STALL {
                bail!(
                    "stalled at {sent} of {count} sent; the worker's log:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its deliveries, peak RSS and CPU so far, as a run to merge.
    fn figures(&self, sent: usize) -> Run {
        let pid = self.child.id().to_string();
        let mut run = Run::counted("worker process", sent, Duration::ZERO);
        run.peak_rss_kib = peak_rss_kib_of(&pid);
        run.cpu = cpu_time_of(&pid);
        run
    }

    fn stop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_pause_is_the_widest_gap_in_time_order() {
        let ms = Duration::from_millis;
        assert_eq!(longest_pause(vec![ms(5), ms(1), ms(40), ms(2)]), ms(35));
        assert_eq!(longest_pause(vec![ms(7)]), Duration::ZERO);
        assert_eq!(longest_pause(Vec::new()), Duration::ZERO);
    }
}
