//! `mailroom bench`: throughput and latency figures measured on this machine,
//! printed beside the ceilings of the parts mailroom stands on.

// Counts, rates and ranks here are far below 2^52; float arithmetic on them
// is exact enough for figures printed with a decimal or two.
#![allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]

mod api;
mod e2e;
mod enqueue;
mod measure;
mod plain;
mod setup;
mod split;

use clap::Subcommand;
use mailroom_core::settings::Settings;

pub use api::ApiArgs;
pub use e2e::E2eArgs;
pub use enqueue::EnqueueArgs;

/// `mailroom bench ...`
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Producer: validated, sealed, confirmed publishes per second, against a
    /// plain lapin publisher with the same window and body size.
    Enqueue(EnqueueArgs),
    /// The whole path: enqueue, worker, SMTP sink; against the broker's and
    /// the sink's ceilings.
    E2e(E2eArgs),
    /// The HTTP API: authenticated, validated, sealed, confirmed POSTs,
    /// against the library path at the same concurrency.
    Api(ApiArgs),
}

/// Runs a benchmark.
pub async fn run(settings: &Settings, command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Enqueue(args) => enqueue::run(settings, args).await,
        BenchCommand::E2e(args) => e2e::run(settings, args).await,
        BenchCommand::Api(args) => api::run(settings, args).await,
    }
}
