//! `mailroom`: the one binary. It parses flags and hands each subcommand to
//! its file under `cmd/`; everything a library user would need lives in the
//! crates it wires together.

mod cmd;

/// jemalloc instead of glibc's malloc: the producer and the worker allocate
/// and free a few buffers per message across threads, where glibc's arenas
/// cost measurably more (see the README's benchmarks).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mailroom_core::settings::Settings;
use mailroom_core::telemetry;

/// mailroom: a queue-backed email sending service.
#[derive(Debug, Parser)]
#[command(name = "mailroom", version, about, long_about = None)]
struct Cli {
    /// Settings file; `mailroom.toml` in the working folder is read when it exists.
    #[arg(long, global = true, env = "MAILROOM_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the HTTP API. Stops cleanly on SIGTERM/SIGINT.
    Api,
    /// API keys: create, list, rotate, revoke.
    #[command(subcommand)]
    Apikey(cmd::apikey::ApiKeyCommand),
    /// Run a worker pool: consume, deliver, retry, dead-letter. Stops
    /// cleanly on SIGTERM/SIGINT.
    Worker,
    /// Try the whole path here: a worker in-process, sample jobs through
    /// the producer, their outcomes in a table.
    Demo,
    /// Enqueue mail: one message from flags, or many from JSON / NDJSON.
    Send(Box<cmd::send::SendArgs>),
    /// Print the RabbitMQ topology; `--declare` declares it.
    Topology {
        /// Declare it on the broker (idempotent).
        #[arg(long)]
        declare: bool,
    },
    /// What became of a job (no body; recipients masked).
    Status {
        /// The job id printed by `send`.
        job_id: String,
    },
    /// Dead letters: list, replay, purge.
    #[command(subcommand)]
    Dlq(cmd::dlq::DlqCommand),
    /// Measure throughput and latency on this machine.
    #[command(subcommand)]
    Bench(cmd::bench::BenchCommand),
    /// Sealing keys.
    #[command(subcommand)]
    Keys(cmd::keys::KeysCommand),
    /// Print the effective settings, every secret redacted.
    Config,
}

fn main() -> ExitCode {
    deepen_thread_stacks();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("mailroom: {}", report(&err));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each once: many errors (lapin's, and ours
/// that wrap one) print their source in their own message too, which
/// `{:#}` would print again.
fn report(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

/// Gives threads spawned without a stack size of their own 64 MiB (an
/// address range; only the pages used take memory) unless
/// `RUST_MIN_STACK` says otherwise. lapin's I/O thread parses a message's
/// header table recursively, a frame a level, and a publisher can nest
/// tables some 20,000 deep within one 128 KiB frame: on the default 2 MiB
/// that overflowed and aborted the worker on every delivery of it.
#[expect(
    unsafe_code,
    reason = "the environment is written before any other thread exists"
)]
fn deepen_thread_stacks() {
    if std::env::var_os("RUST_MIN_STACK").is_none() {
        // SAFETY: called first thing in `main`, while this is the only
        // thread, so nothing reads the environment meanwhile.
        unsafe { std::env::set_var("RUST_MIN_STACK", "67108864") };
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let command = match cli.command {
        Command::Keys(command) => return cmd::keys::run(&command),
        Command::Config => return cmd::config::run(cli.config.as_deref()),
        other => other,
    };
    let settings = Settings::load(cli.config.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(async move {
        let role = match command {
            Command::Worker => "worker",
            Command::Api => "api",
            _ => "cli",
        };
        let telemetry = telemetry::init(role, &settings.telemetry)?;
        let result = match command {
            Command::Worker => cmd::worker::run(&settings).await,
            Command::Api => cmd::api::run(&settings).await,
            Command::Apikey(command) => cmd::apikey::run(&settings, command).await,
            Command::Demo => cmd::demo::run(&settings).await,
            Command::Status { job_id } => cmd::status::run(&settings, &job_id).await,
            Command::Dlq(command) => cmd::dlq::run(&settings, command).await,
            Command::Send(args) => cmd::send::run(&settings, *args).await,
            Command::Topology { declare } => cmd::topology::run(&settings, declare).await,
            Command::Bench(command) => cmd::bench::run(&settings, command).await,
            Command::Keys(_) | Command::Config => Ok(()),
        };
        // Flush spans even when the command failed: its trace is the one
        // worth reading.
        if let Err(err) = telemetry.shutdown() {
            eprintln!("mailroom: telemetry: {err}");
        }
        result
    });
    // Dropping a runtime waits for every blocking task without a limit; one
    // stuck on a dead peer must not keep a stopped worker from exiting.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
    result
}

/// How long blocking tasks get to end once a command is done.
const RUNTIME_SHUTDOWN: std::time::Duration = std::time::Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    /// Prints its source in its own message, as many errors do.
    #[derive(Debug)]
    struct Wrapping(std::io::Error);

    impl std::fmt::Display for Wrapping {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "dead-letter queue: {}", self.0)
        }
    }

    impl std::error::Error for Wrapping {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn each_cause_is_printed_once() {
        let refused = || std::io::Error::other("connection refused");
        let err = anyhow::Error::new(Wrapping(refused())).context("dlq list");
        assert_eq!(
            report(&err),
            "dlq list: dead-letter queue: connection refused"
        );
        let err = anyhow::Error::new(refused()).context("reading jobs.ndjson");
        assert_eq!(report(&err), "reading jobs.ndjson: connection refused");
    }
}
