//! `mailroom`: the one binary. It parses flags and hands each subcommand to
//! its file under `cmd/`; everything a library user would need lives in the
//! crates it wires together.

mod cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    /// Sealing keys.
    #[command(subcommand)]
    Keys(cmd::keys::KeysCommand),
    /// Print the effective settings, every secret redacted.
    Config,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Keys(command) => cmd::keys::run(&command),
        Command::Config => cmd::config::run(cli.config.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("mailroom: {err:#}");
            ExitCode::FAILURE
        }
    }
}
