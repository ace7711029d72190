//! `mailroom bench`: throughput and latency figures measured on this machine,
//! printed beside the ceilings of the parts mailroom stands on.

mod enqueue;
mod measure;

use clap::Subcommand;
use mailroom_core::settings::Settings;

pub use enqueue::EnqueueArgs;

/// `mailroom bench ...`
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Producer: validated, sealed, confirmed publishes per second, against a
    /// plain lapin publisher with the same window and body size.
    Enqueue(EnqueueArgs),
}

/// Runs a benchmark.
pub async fn run(settings: &Settings, command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Enqueue(args) => enqueue::run(settings, args).await,
    }
}
