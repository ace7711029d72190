//! `mailroom send`: one job from flags, or many from a JSON / NDJSON file.

mod lines;
mod queued;

use std::fs::File;
use std::io::{BufRead, BufReader, IsTerminal as _, Read as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use mailroom_core::job::{Attachment, EmailMessage, JobRequest, Lane};
use mailroom_core::settings::Settings;
use mailroom_core::status::{JobState, StatusUpdate};
use mailroom_core::validate::json::{parse_object, values_per_job, values_within};
use mailroom_core::validate::{ContentTypeError, Limits, attachment_content_type};
use mailroom_producer::{Checked, Producer, prepare};
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::shown;
use lines::Entries;
use queued::Queued;

/// Jobs handed to the producer at once from a file: enough to keep the
/// publish window full, few enough to report progress often.
const CHUNK: usize = 2_000;

/// Longest a job read from a file waits for its chunk to fill.
const LINGER: Duration = Duration::from_millis(50);

/// Rejections printed on a terminal; the rest are counted.
const MAX_SHOWN_REJECTIONS: usize = 50;

/// Longest reason said for one refused line: a job with hundreds of bad
/// fields is not worth a screenful each.
const MAX_REASON_CHARS: usize = 1_000;

/// Files at least this large (bytes) get a progress bar on a terminal.
const PROGRESS_THRESHOLD: u64 = 1 << 20;

/// `mailroom send ...`
#[derive(Debug, Args)]
pub struct SendArgs {
    /// A JSON job, or NDJSON (one job a line); `-` reads standard input.
    /// Each job says everything itself: only --tenant goes with it.
    #[arg(long, value_name = "FILE", conflicts_with_all = [
        "from", "to", "cc", "bcc", "reply_to", "subject", "text", "text_file", "html_file",
        "attach", "header", "lane", "idempotency_key", "expires_in",
    ])]
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
    #[arg(long, value_name = "DURATION", value_parser = super::parse_lifetime)]
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
    let request = request_from_flags(args, &settings.limits)?;
    // Validate before connecting: a bad job needs no broker to be refused.
    let job = prepare(request, &args.tenant, &settings.limits)
        .map_err(|errors| anyhow::anyhow!("invalid job: {errors}"))?;
    let producer = Producer::connect(settings).await?;
    let update = StatusUpdate::new(job.job(), JobState::Queued);
    let id = producer.enqueue_checked(job).await;
    producer.close().await;
    let id = id?;
    Queued::connect(settings).await.record(&[update]).await;
    println!("{id}");
    Ok(())
}

fn request_from_flags(args: &SendArgs, limits: &Limits) -> anyhow::Result<JobRequest> {
    let text = match (&args.text, &args.text_file) {
        (Some(text), _) => Some(text.clone()),
        (None, Some(path)) => Some(read_text(path, "--text-file", limits)?),
        (None, None) => None,
    };
    let html = args
        .html_file
        .as_deref()
        .map(|path| read_text(path, "--html-file", limits))
        .transpose()?;
    if text.is_none() && html.is_none() {
        bail!("give a body: --text, --text-file or --html-file");
    }
    let attachments = args
        .attach
        .iter()
        .map(|path| attachment(path, limits))
        .collect::<anyhow::Result<_>>()?;
    let mut headers = std::collections::BTreeMap::new();
    for (index, line) in args.header.iter().enumerate() {
        // Named by its place, not its text: a header may hold an address
        // or a token.
        let place = index + 1;
        let (name, value) = line.split_once(':').with_context(|| {
            format!(
                "--header number {place}: expected \"Name: value\" (a name, a colon, then the value)"
            )
        })?;
        // A map keeps the last of two equal names; the JSON paths refuse
        // a name given twice, and so does this one.
        if headers
            .insert(name.trim().to_owned(), value.trim().to_owned())
            .is_some()
        {
            anyhow::bail!("--header number {place}: its name was given before");
        }
    }
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

fn read_text(path: &Path, flag: &str, limits: &Limits) -> anyhow::Result<String> {
    let bytes = read_bounded(
        path,
        flag,
        limits.max_message_bytes,
        "limits.max_message_bytes",
    )?;
    String::from_utf8(bytes)
        .map_err(|_| anyhow::anyhow!("{flag} {}: not UTF-8 text", path.display()))
}

/// Reads at most `max` bytes of `path`: a larger file, or an endless one
/// such as a device, is refused before it fills the memory.
fn read_bounded(path: &Path, flag: &str, max: usize, limit: &str) -> anyhow::Result<Vec<u8>> {
    let shown = || format!("{flag} {}", path.display());
    let file = File::open(path).with_context(shown)?;
    let mut content = Vec::new();
    file.take(u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1))
        .read_to_end(&mut content)
        .with_context(shown)?;
    if content.len() > max {
        bail!("{}: larger than {max} bytes ({limit})", shown());
    }
    Ok(content)
}

fn attachment(path: &Path, limits: &Limits) -> anyhow::Result<Attachment> {
    let content = read_bounded(
        path,
        "--attach",
        limits.max_attachment_bytes,
        "limits.max_attachment_bytes",
    )?;
    let filename = path
        .file_name()
        .with_context(|| format!("--attach {}: not a file name", path.display()))?
        .to_str()
        .with_context(|| {
            format!(
                "--attach {}: the file name is not UTF-8; rename the file",
                path.display()
            )
        })?
        .to_owned();
    let content_type = guessed_type(path);
    Ok(Attachment {
        filename,
        content_type,
        content,
    })
}

/// The content type a file's extension suggests. A message or multipart
/// one (`.eml` is `message/rfc822`) goes as `application/octet-stream`,
/// the only way validation takes such a file.
fn guessed_type(path: &Path) -> String {
    let guess = mime_guess::from_path(path)
        .first_or_octet_stream()
        .essence_str()
        .to_owned();
    match attachment_content_type(&guess) {
        Err(ContentTypeError::Container) => "application/octet-stream".to_owned(),
        _ => guess,
    }
}

/// Rejections, each said as it happens (a job piped in is answered at
/// once, not at the end of the input): every one when stderr goes to a
/// file or a pipe, where a script needs them all; on a terminal the first
/// [`MAX_SHOWN_REJECTIONS`], the rest counted.
struct Rejections {
    count: usize,
    shown: usize,
}

impl Default for Rejections {
    fn default() -> Self {
        use std::io::IsTerminal as _;
        let shown = if std::io::stderr().is_terminal() {
            MAX_SHOWN_REJECTIONS
        } else {
            usize::MAX
        };
        Self { count: 0, shown }
    }
}

impl Rejections {
    fn add(&mut self, line: usize, reason: &str, progress: &ProgressBar) {
        self.count += 1;
        if self.count <= self.shown {
            progress.suspend(|| eprintln!("line {line}: {}", shown(reason, MAX_REASON_CHARS)));
        }
    }

    fn print(&self) {
        if self.count > self.shown {
            eprintln!(
                "... and {} more (all are listed when stderr is not a terminal: 2> rejected.txt)",
                self.count - self.shown
            );
        }
    }
}

/// A line's job, checked, or why it is refused.
fn parse(json: &str, tenant: &str, limits: &Limits) -> Result<Checked, String> {
    if !json.trim_start().starts_with('{') {
        return Err("not a job: expected a JSON object".to_owned());
    }
    if !values_within(json.as_bytes(), values_per_job(limits)) {
        return Err("not a job: holds more list items than a job within the limits can".to_owned());
    }
    let request =
        parse_object::<JobRequest>(json.as_bytes()).map_err(|e| format!("not a job: {e}"))?;
    prepare(request, tenant, limits).map_err(|e| e.to_string())
}

/// One line's outcome from the reading thread.
struct Parsed {
    line: usize,
    job: Result<Checked, String>,
    /// Bytes of the input read so far.
    consumed: u64,
}

/// Sends the jobs of `path` (or stdin) as they are read: a thread reads
/// and checks lines while chunks of jobs are published. A chunk goes out
/// when full or once its first job has waited [`LINGER`], so jobs piped in
/// one by one are not held back.
async fn send_file(settings: &Settings, path: &Path, tenant: &str) -> anyhow::Result<()> {
    let shown = path.display().to_string();
    let (reader, size): (Box<dyn BufRead + Send>, Option<u64>) = if path == Path::new("-") {
        (Box::new(BufReader::new(std::io::stdin())), None)
    } else {
        let file = File::open(path).with_context(|| format!("--json {shown}"))?;
        let size = file
            .metadata()
            .ok()
            .filter(std::fs::Metadata::is_file)
            .map(|m| m.len());
        (Box::new(BufReader::with_capacity(1 << 16, file)), size)
    };
    let mut parsed = read_in_thread(reader, tenant.to_owned(), settings.limits.clone());
    let progress = progress_bar(size);
    let mut producer: Option<(Producer, Queued)> = None;
    let mut chunk = Vec::with_capacity(CHUNK);
    let mut rejected = Rejections::default();
    let mut enqueued = 0usize;
    let mut deadline = Instant::now();
    let mut unread = None;
    loop {
        let next = if chunk.is_empty() {
            Some(parsed.recv().await)
        } else {
            tokio::time::timeout_at(deadline, parsed.recv()).await.ok()
        };
        let mut ended = matches!(next, Some(None));
        match next.flatten() {
            // What was read is still sent and reported; the error ends it.
            Some(Err(err)) => {
                unread = Some(err);
                ended = true;
            }
            Some(Ok(item)) => {
                progress.set_position(item.consumed);
                match item.job {
                    Ok(job) => {
                        if chunk.is_empty() {
                            deadline = Instant::now() + LINGER;
                        }
                        chunk.push((item.line, job));
                    }
                    Err(reason) => rejected.add(item.line, &reason, &progress),
                }
            }
            None => {}
        }
        let due = chunk.len() >= CHUNK || ended || Instant::now() >= deadline;
        if due && !chunk.is_empty() {
            let (producer, queued) = match &mut producer {
                Some(both) => both,
                None => producer.insert((
                    Producer::connect(settings).await?,
                    Queued::connect(settings).await,
                )),
            };
            let chunk = std::mem::take(&mut chunk);
            enqueued += send_chunk(producer, queued, chunk, &mut rejected, &progress).await;
            progress.set_message(format!("{enqueued} jobs enqueued"));
        }
        if ended {
            break;
        }
    }
    progress.finish_and_clear();
    if let Some((producer, _)) = producer {
        producer.close().await;
    }
    let refused = rejected.count;
    rejected.print();
    eprintln!("enqueued {enqueued}, rejected {refused}");
    if let Some(err) = unread {
        return Err(err).with_context(|| format!("--json {shown}: reading stopped"));
    }
    if refused == 0 {
        Ok(())
    } else {
        bail!("{refused} of {} jobs not enqueued", enqueued + refused)
    }
}

/// Reads and checks the entries of `reader` on a thread of their own (the
/// reads block), handing them over in order.
fn read_in_thread(
    reader: Box<dyn BufRead + Send>,
    tenant: String,
    limits: Limits,
) -> mpsc::Receiver<std::io::Result<Parsed>> {
    let (sender, receiver) = mpsc::channel(CHUNK);
    // No valid job's JSON comes near this: every byte of a message at
    // most doubles in base64 or escapes, and six is the worst escape.
    let max_line = limits
        .max_message_bytes
        .saturating_mul(8)
        .saturating_add(1 << 20);
    tokio::task::spawn_blocking(move || {
        let mut entries = Entries::new(reader, max_line);
        loop {
            let item = match entries.next_entry() {
                Ok(None) => return,
                Ok(Some(entry)) => Ok(Parsed {
                    line: entry.line,
                    job: entry.json.and_then(|json| parse(&json, &tenant, &limits)),
                    consumed: entries.consumed(),
                }),
                Err(err) => Err(err),
            };
            let failed = item.is_err();
            // The receiver is gone when sending stopped early.
            if sender.blocking_send(item).is_err() || failed {
                return;
            }
        }
    });
    receiver
}

/// Enqueues `chunk` (checked when it was read) pipelined, printing each job's id by its line; returns
/// how many were enqueued.
async fn send_chunk(
    producer: &Producer,
    queued: &mut Queued,
    chunk: Vec<(usize, Checked)>,
    rejected: &mut Rejections,
    progress: &ProgressBar,
) -> usize {
    let (lines, jobs): (Vec<usize>, Vec<Checked>) = chunk.into_iter().unzip();
    let updates: Vec<StatusUpdate> = jobs
        .iter()
        .map(|job| StatusUpdate::new(job.job(), JobState::Queued))
        .collect();
    let mut done = Vec::with_capacity(updates.len());
    for ((line, result), update) in lines
        .into_iter()
        .zip(producer.enqueue_many_checked(jobs).await)
        .zip(updates)
    {
        match result {
            Ok(id) => {
                done.push(update);
                progress.suspend(|| println!("line {line}: {id}"));
            }
            Err(err) => rejected.add(line, &format!("not enqueued: {err}"), progress),
        }
    }
    queued.record(&done).await;
    done.len()
}

/// A bar on stderr, by bytes read, for a large file on a terminal; hidden
/// otherwise (and for standard input, whose length is unknown).
fn progress_bar(size: Option<u64>) -> ProgressBar {
    let Some(size) = size.filter(|&size| size >= PROGRESS_THRESHOLD) else {
        return ProgressBar::hidden();
    };
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(size);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes}, {msg}, eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        send: SendArgs,
    }

    /// A malformed --header is named by its place among the --header
    /// flags, never by its text, which may hold an address.
    #[test]
    fn a_malformed_header_is_named_by_its_place_not_its_text() {
        let cli = Cli::try_parse_from([
            "mailroom-send",
            "--from",
            "a@example.com",
            "--to",
            "canary.rcpt.7q3@victim-example.org",
            "--subject",
            "s",
            "--text",
            "t",
            "--header",
            "X-Fine: 1",
            "--header",
            "CANARYHDR3h-no-colon canary.rcpt.7q3@victim-example.org",
        ])
        .expect("flags parse");
        let err = request_from_flags(&cli.send, &Limits::default()).expect_err("no colon");
        let shown = format!("{err:#}");
        assert!(shown.contains("--header number 2"), "{shown}");
        assert!(shown.contains("\"Name: value\""), "{shown}");
        assert!(!shown.contains("CANARY"), "{shown}");
        assert!(!shown.contains("canary.rcpt"), "{shown}");
    }

    /// The same header name twice is refused, not settled by keeping the
    /// last.
    #[test]
    fn a_header_given_twice_is_refused() {
        let cli = Cli::try_parse_from([
            "mailroom-send",
            "--from",
            "a@example.com",
            "--to",
            "b@example.org",
            "--subject",
            "s",
            "--text",
            "t",
            "--header",
            "X-A: 1",
            "--header",
            "X-A: 2",
        ])
        .expect("flags parse");
        let err = request_from_flags(&cli.send, &Limits::default()).expect_err("twice");
        assert!(format!("{err:#}").contains("--header number 2"), "{err:#}");
    }

    /// A flag --json would ignore is refused rather than silently dropped.
    #[test]
    fn json_refuses_the_flags_it_would_ignore() {
        for flag in [
            &["--from", "a@example.com"][..],
            &["--cc", "c@example.com"],
            &["--bcc", "b@example.com"],
            &["--reply-to", "r@example.com"],
            &["--html-file", "body.html"],
            &["--attach", "file.pdf"],
            &["--header", "X-A: 1"],
            &["--lane", "bulk"],
            &["--idempotency-key", "k1"],
            &["--expires-in", "10m"],
        ] {
            let args = [&["mailroom-send", "--json", "jobs.ndjson"][..], flag].concat();
            let err = Cli::try_parse_from(&args).expect_err(flag[0]);
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::ArgumentConflict,
                "{flag:?}: {err}"
            );
        }
        let cli = Cli::try_parse_from(["mailroom-send", "--json", "-", "--tenant", "acme"])
            .expect("--tenant goes with --json");
        assert_eq!(cli.send.tenant, "acme");
        assert_eq!(cli.send.lane, Lane::Transactional);
    }

    #[test]
    fn a_message_file_is_attached_as_octet_stream() {
        for (name, content_type) in [
            ("mail.eml", "application/octet-stream"),
            ("receipt.pdf", "application/pdf"),
            ("notes.txt", "text/plain"),
            ("blob", "application/octet-stream"),
        ] {
            assert_eq!(guessed_type(Path::new(name)), content_type, "{name}");
        }
    }
}
