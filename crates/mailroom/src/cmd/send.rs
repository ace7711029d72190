//! `mailroom send`: one job from flags, or many from a JSON / NDJSON file.

use std::io::{IsTerminal as _, Read as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use mailroom_core::job::{Attachment, EmailMessage, JobRequest, Lane, SendJob};
use mailroom_core::settings::Settings;
use mailroom_producer::{Checked, Producer, prepare};
use time::OffsetDateTime;

/// Jobs handed to the producer at once from a file: enough to keep the
/// publish window full, few enough to report progress often.
const CHUNK: usize = 2_000;

/// Rejections printed in full; the rest are counted.
const MAX_SHOWN_REJECTIONS: usize = 50;

/// Files at least this large get a progress bar on a terminal.
const PROGRESS_THRESHOLD: usize = 1_000;

/// `mailroom send ...`
#[derive(Debug, Args)]
pub struct SendArgs {
    /// A JSON job, or NDJSON (one job a line); `-` reads standard input.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["from", "to", "subject", "text", "text_file"])]
    json: Option<PathBuf>,
    /// Sender mailbox, e.g. "Shop <noreply@shop.example>".
    #[arg(long, required_unless_present = "json")]
    from: Option<String>,
    /// Recipient (repeat for more).
    #[arg(long, required_unless_present = "json")]
    to: Vec<String>,
    /// Cc recipient (repeat for more).
    #[arg(long)]
    cc: Vec<String>,
    /// Bcc recipient (repeat for more).
    #[arg(long)]
    bcc: Vec<String>,
    /// Reply-To mailbox (repeat for more).
    #[arg(long)]
    reply_to: Vec<String>,
    /// Subject line.
    #[arg(long, required_unless_present = "json")]
    subject: Option<String>,
    /// Plain-text body.
    #[arg(long, conflicts_with = "text_file")]
    text: Option<String>,
    /// Plain-text body from a file.
    #[arg(long, value_name = "FILE")]
    text_file: Option<PathBuf>,
    /// HTML body from a file.
    #[arg(long, value_name = "FILE")]
    html_file: Option<PathBuf>,
    /// Attach a file (repeat for more); its type follows its extension.
    #[arg(long, value_name = "PATH")]
    attach: Vec<PathBuf>,
    /// Extra header, "Name: value" (repeat for more).
    #[arg(long, value_name = "NAME: VALUE")]
    header: Vec<String>,
    /// Work lane.
    #[arg(long, default_value = "transactional", value_parser = parse_lane)]
    lane: Lane,
    /// The same key (for the same tenant) is sent at most once.
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,
    /// Do not send after this long, e.g. 10m, 2h.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    expires_in: Option<Duration>,
    /// Sending tenant (a JSON job's own `tenant` wins).
    #[arg(long, default_value = "default")]
    tenant: String,
}

fn parse_lane(text: &str) -> Result<Lane, String> {
    text.parse().map_err(|e| format!("{e}"))
}

/// Runs `send`.
pub async fn run(settings: &Settings, args: SendArgs) -> anyhow::Result<()> {
    match &args.json {
        Some(path) => send_file(settings, path, &args.tenant).await,
        None => send_one(settings, &args).await,
    }
}

async fn send_one(settings: &Settings, args: &SendArgs) -> anyhow::Result<()> {
    let request = request_from_flags(args)?;
    // Validate before connecting: a bad job needs no broker to be refused.
    let job = prepare(request, &args.tenant, &settings.limits)
        .map_err(|errors| anyhow::anyhow!("invalid job: {errors}"))?;
    let producer = Producer::connect(settings).await?;
    let id = producer.enqueue_checked(job).await;
    producer.close().await;
    println!("{}", id?);
    Ok(())
}

fn request_from_flags(args: &SendArgs) -> anyhow::Result<JobRequest> {
    let text = match (&args.text, &args.text_file) {
        (Some(text), _) => Some(text.clone()),
        (None, Some(path)) => Some(read_text(path, "--text-file")?),
        (None, None) => None,
    };
    let html = args
        .html_file
        .as_deref()
        .map(|path| read_text(path, "--html-file"))
        .transpose()?;
    if text.is_none() && html.is_none() {
        bail!("give a body: --text, --text-file or --html-file");
    }
    let attachments = args
        .attach
        .iter()
        .map(|path| attachment(path))
        .collect::<anyhow::Result<_>>()?;
    let headers = args
        .header
        .iter()
        .map(|line| {
            line.split_once(':')
                .map(|(name, value)| (name.trim().to_owned(), value.trim().to_owned()))
                .with_context(|| format!("--header {line:?}: expected \"Name: value\""))
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(JobRequest {
        tenant: None,
        idempotency_key: args.idempotency_key.clone(),
        lane: args.lane,
        expires_at: args.expires_in.map(|d| OffsetDateTime::now_utc() + d),
        message: EmailMessage {
            from: args.from.clone().unwrap_or_default(),
            reply_to: args.reply_to.clone(),
            to: args.to.clone(),
            cc: args.cc.clone(),
            bcc: args.bcc.clone(),
            subject: args.subject.clone().unwrap_or_default(),
            text,
            html,
            headers,
            attachments,
            ..EmailMessage::default()
        },
    })
}

fn read_text(path: &Path, flag: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("{flag} {}", path.display()))
}

fn attachment(path: &Path) -> anyhow::Result<Attachment> {
    let content = std::fs::read(path).with_context(|| format!("--attach {}", path.display()))?;
    let filename = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .with_context(|| format!("--attach {}: not a file name", path.display()))?;
    let content_type = mime_guess::from_path(path)
        .first_or_octet_stream()
        .essence_str()
        .to_owned();
    Ok(Attachment {
        filename,
        content_type,
        content,
    })
}

/// One job of a file: where it starts, and the job or why not.
struct Item {
    line: usize,
    job: Result<SendJob, String>,
}

/// Reads `path` (or stdin) as one JSON job, or as NDJSON, one job a line.
fn read_items(settings: &Settings, path: &Path, tenant: &str) -> anyhow::Result<Vec<Item>> {
    let mut text = String::new();
    if path == Path::new("-") {
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading standard input")?;
    } else {
        text =
            std::fs::read_to_string(path).with_context(|| format!("--json {}", path.display()))?;
    }
    let parse = |line: usize, json: &str| Item {
        line,
        job: serde_json::from_str::<JobRequest>(json)
            .map_err(|e| format!("not a job: {e}"))
            .and_then(|request| {
                prepare(request, tenant, &settings.limits)
                    .map(Checked::into_job)
                    .map_err(|e| e.to_string())
            }),
    };
    // A pretty-printed single job spans lines; NDJSON is one job a line.
    if text.trim_start().starts_with('{')
        && serde_json::from_str::<serde_json::Value>(&text).is_ok()
    {
        return Ok(vec![parse(1, &text)]);
    }
    Ok(text
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| parse(i + 1, line))
        .collect())
}

async fn send_file(settings: &Settings, path: &Path, tenant: &str) -> anyhow::Result<()> {
    let items = read_items(settings, path, tenant)?;
    let mut rejected: Vec<(usize, String)> = Vec::new();
    let mut valid = Vec::new();
    for item in items {
        match item.job {
            Ok(job) => valid.push((item.line, job)),
            Err(reason) => rejected.push((item.line, reason)),
        }
    }
    let mut enqueued = 0usize;
    if !valid.is_empty() {
        let producer = Producer::connect(settings).await?;
        let progress = progress_bar(valid.len());
        while !valid.is_empty() {
            let rest = valid.split_off(valid.len().min(CHUNK));
            let chunk = std::mem::replace(&mut valid, rest);
            let (lines, jobs): (Vec<usize>, Vec<SendJob>) = chunk.into_iter().unzip();
            let results = producer.enqueue_many(jobs).await;
            for (line, result) in lines.into_iter().zip(results) {
                match result {
                    Ok(id) => {
                        enqueued += 1;
                        progress.suspend(|| println!("line {line}: {id}"));
                    }
                    Err(err) => rejected.push((line, format!("not enqueued: {err}"))),
                }
                progress.inc(1);
            }
        }
        progress.finish_and_clear();
        producer.close().await;
    }
    rejected.sort_by_key(|(line, _)| *line);
    for (line, reason) in rejected.iter().take(MAX_SHOWN_REJECTIONS) {
        eprintln!("line {line}: {reason}");
    }
    if rejected.len() > MAX_SHOWN_REJECTIONS {
        eprintln!("... and {} more", rejected.len() - MAX_SHOWN_REJECTIONS);
    }
    eprintln!("enqueued {enqueued}, rejected {}", rejected.len());
    if rejected.is_empty() {
        Ok(())
    } else {
        bail!(
            "{} of {} jobs not enqueued",
            rejected.len(),
            enqueued + rejected.len()
        )
    }
}

/// A bar on stderr for large files on a terminal; hidden otherwise.
fn progress_bar(len: usize) -> ProgressBar {
    if len < PROGRESS_THRESHOLD || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} jobs, {per_sec}, eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}
