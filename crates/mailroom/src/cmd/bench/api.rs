//! `mailroom bench api`: `POST /v1/messages` with authentication, rate
//! limits, validation, sealing and confirmed publish, over keep-alive HTTP
//! connections, against the library path (`Producer::enqueue`) at the same
//! concurrency in the same run.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use futures_util::StreamExt as _;
use mailroom_core::job::{EmailMessage, JobRequest};
use mailroom_core::ratelimit::Rate;
use mailroom_core::seal::SealKey;
use mailroom_core::settings::{Secret, Settings};
use mailroom_core::store::RedisStore;
use mailroom_producer::api::keys::{NewKey, Scope};
use mailroom_producer::api::{Api, NetworkPolicy};
use mailroom_producer::{Producer, prepare};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::measure::{Run, cpu_time, cpu_used_since, parse_size};
use super::setup::{bench_broker, body_text, clean_up, purge_queues};

/// `mailroom bench api`
#[derive(Debug, Args)]
pub struct ApiArgs {
    /// Requests (and library enqueues).
    #[arg(short = 'n', long, default_value_t = 20_000)]
    count: usize,
    /// Client connections (and enqueues in flight on the library path).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Size of each message's text body, e.g. 2KiB.
    #[arg(long, default_value = "2KiB", value_parser = parse_size)]
    size: usize,
    /// Messages a `POST /v1/messages/batch` carries in the batch run (0:
    /// no batch run).
    #[arg(long, default_value_t = 50)]
    batch: usize,
    /// Vhost the benchmark uses (made with `rabbitmqctl add_vhost`).
    #[arg(long, default_value = "mailroom-bench")]
    vhost: String,
}

/// Runs the benchmark and prints its figures.
pub async fn run(settings: &Settings, args: ApiArgs) -> anyhow::Result<()> {
    let (mut settings, _url, broker) = bench_broker(settings, &args.vhost).await?;
    settings.redis.key_prefix = format!("mailroom-bench-{}:", uuid::Uuid::now_v7().simple());
    let seal = SealKey::generate("bench").map_err(anyhow::Error::msg)?;
    settings.seal.keys = Secret::new(seal.to_line().as_str());
    settings.seal.keys_file = None;
    settings.seal.active = Some("bench".to_owned());
    if settings.hash_key().is_err() {
        let key = SealKey::generate("hash").map_err(anyhow::Error::msg)?;
        settings.redis.hash_key = Secret::new(key.to_line().as_str());
    }
    // The limits are not what is measured here.
    let unlimited = Rate {
        count: 1_000_000,
        period: Duration::from_secs(1),
    };
    settings.api.tenant_rate = unlimited;
    settings.api.jwt = None;
    let concurrency = args.concurrency.max(1);
    println!(
        "mailroom bench api: {} requests, {} B text body, {concurrency} connections, vhost {}",
        args.count, args.size, args.vhost
    );

    let store = RedisStore::connect(&settings.redis).await?;
    let producer = Producer::connect(&settings).await?;
    let api = Api::from_parts(
        producer.clone(),
        store.clone(),
        settings.hash_key()?,
        NetworkPolicy::default(),
        &settings,
    )?;
    let (key, _) = api
        .keys()
        .create(NewKey {
            tenant: "bench".to_owned(),
            scopes: vec![Scope::Send],
            allow_cidrs: Vec::new(),
            rate: Some(unlimited),
            expires_at: None,
        })
        .await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(api.serve(listener, shutdown.clone()));

    let one = request(&body_text(args.size));
    let body = serde_json::to_string(&one)?;
    let single = Post {
        label: "API: POST /v1/messages",
        path: "/v1/messages",
        body: &body,
        messages: 1,
    };
    // Warm up connections, caches and the broker's queue.
    single
        .run(address, &key, 1_000.min(args.count), concurrency)
        .await?;
    purge_queues(&broker).await?;
    let http = single.run(address, &key, args.count, concurrency).await?;
    purge_queues(&broker).await?;
    let batch_body = serde_json::to_string(&serde_json::json!({
        "messages": vec![&one; args.batch],
    }))?;
    let batch = Post {
        label: "API: POST /v1/messages/batch",
        path: "/v1/messages/batch",
        body: &batch_body,
        messages: args.batch,
    };
    let batched = match args.batch {
        0 => None,
        n => Some(
            batch
                .run(address, &key, args.count.div_ceil(n), concurrency)
                .await?,
        ),
    };
    purge_queues(&broker).await?;
    let cpu = cpu_time();
    let mut library = library(&producer, &settings, &body, args.count, concurrency).await?;
    library.cpu = cpu_used_since(cpu);
    purge_queues(&broker).await?;

    shutdown.cancel();
    let _ = server.await;
    producer.close().await;
    clean_up(&store, &settings.redis.key_prefix).await;
    broker.close().await;

    report(&http, batched.as_ref(), &library);
    Ok(())
}

fn report(http: &Run, batched: Option<&Run>, library: &Run) {
    println!("{}", http.report());
    if let Some(batched) = batched {
        println!("{}", batched.report());
    }
    println!("{}", library.report());
    println!(
        "ratio API / library: {:.2} (target >= 0.7)",
        http.rate() / library.rate()
    );
    println!(
        "CPU is this process's (user + system) a message; on the API runs it \
         includes the HTTP client's share, and the broker shares the cores"
    );
    if batched.is_some() {
        println!(
            "the batch run counts messages a second; its latencies are a \
             request's, of the whole batch"
        );
    }
}

fn request(text: &str) -> JobRequest {
    JobRequest {
        message: EmailMessage {
            from: "Bench <bench@mailroom.example>".to_owned(),
            to: vec!["Reader <reader@example.org>".to_owned()],
            subject: "mailroom bench".to_owned(),
            text: Some(text.to_owned()),
            ..EmailMessage::default()
        },
        ..JobRequest::default()
    }
}

/// One kind of POST the benchmark makes.
struct Post<'a> {
    label: &'static str,
    path: &'static str,
    body: &'a str,
    /// Messages one request carries.
    messages: usize,
}

impl Post<'_> {
    /// `count` POSTs over `concurrency` keep-alive connections; the run
    /// counts messages.
    async fn run(
        &self,
        address: SocketAddr,
        key: &str,
        count: usize,
        concurrency: usize,
    ) -> anyhow::Result<Run> {
        let per_connection = count.div_ceil(concurrency);
        let cpu = cpu_time();
        let started = Instant::now();
        let mut tasks = Vec::new();
        for connection in 0..concurrency {
            let n = per_connection.min(count.saturating_sub(connection * per_connection));
            let path = self.path;
            // Every request is the same bytes, built once, as wrk does.
            let request = format!(
                "POST {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
                self.body.len(),
                self.body
            );
            tasks.push(tokio::spawn(async move {
                let mut client = Client::connect(address).await?;
                let mut latencies = Vec::with_capacity(n);
                for _ in 0..n {
                    let start = Instant::now();
                    let status = client.send(request.as_bytes()).await?;
                    if status != 202 {
                        bail!("the API answered {status} to POST {path}");
                    }
                    latencies.push(start.elapsed());
                }
                Ok(latencies)
            }));
        }
        let mut latencies = Vec::with_capacity(count);
        for task in tasks {
            latencies.extend(task.await??);
        }
        let mut run = Run::new(self.label, latencies, started.elapsed());
        run.count *= self.messages;
        run.cpu = cpu_used_since(cpu);
        Ok(run)
    }
}

/// The same jobs through `Producer::enqueue`, `concurrency` in flight.
async fn library(
    producer: &Producer,
    settings: &Settings,
    body: &str,
    count: usize,
    concurrency: usize,
) -> anyhow::Result<Run> {
    let started = Instant::now();
    let results: Vec<anyhow::Result<Duration>> = futures_util::stream::iter(0..count)
        .map(|_| async {
            let start = Instant::now();
            let request: JobRequest = serde_json::from_str(body)?;
            let job = prepare(request, "bench", &settings.limits)
                .map_err(|errors| anyhow::anyhow!("invalid: {errors}"))?;
            producer.enqueue_checked(job).await?;
            Ok(start.elapsed())
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    Ok(Run::new(
        "library: Producer::enqueue",
        results.into_iter().collect::<Result<_, _>>()?,
        started.elapsed(),
    ))
}

/// A minimal keep-alive HTTP/1.1 client: enough to time the API without a
/// client library's costs in the figures.
struct Client {
    stream: BufReader<TcpStream>,
    line: String,
    body: Vec<u8>,
}

impl Client {
    async fn connect(address: SocketAddr) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(address).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream: BufReader::new(stream),
            line: String::new(),
            body: Vec::new(),
        })
    }

    /// Sends `request` (one write, as a client library's buffered writer
    /// makes); returns the answer's status.
    async fn send(&mut self, request: &[u8]) -> anyhow::Result<u16> {
        self.stream.get_mut().write_all(request).await?;
        self.line.clear();
        self.stream.read_line(&mut self.line).await?;
        let status: u16 = self
            .line
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .context("no HTTP status line")?;
        let mut length = 0;
        loop {
            self.line.clear();
            if self.stream.read_line(&mut self.line).await? == 0 {
                bail!("connection closed mid-response");
            }
            let header = self.line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().context("bad Content-Length")?;
            }
        }
        self.body.resize(length, 0);
        self.stream.read_exact(&mut self.body).await?;
        Ok(status)
    }
}
