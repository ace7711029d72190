//! `mailroom worker`: run a pool until SIGTERM or SIGINT, then drain.

use anyhow::Context as _;
use mailroom_core::settings::Settings;
use mailroom_worker::Worker;
use tokio_util::sync::CancellationToken;

use super::signal::cancel_on_signal;

/// Runs the worker pool.
pub async fn run(settings: &Settings) -> anyhow::Result<()> {
    let worker = Worker::connect(settings)
        .await
        .context("worker could not start")?;
    let shutdown = CancellationToken::new();
    let stopped = CancellationToken::new();
    let health = worker
        .serve_health(shutdown.clone(), stopped.clone())
        .await?;
    tracing::info!(
        transport = %worker.describe_transport(),
        concurrency = settings.worker.concurrency,
        health = %health,
        "worker started"
    );
    eprintln!(
        "mailroom worker: delivering to {}",
        worker.describe_transport()
    );
    let signals = tokio::spawn(cancel_on_signal(shutdown.clone()));
    let drained = worker.run(shutdown.clone()).await;
    shutdown.cancel();
    stopped.cancel();
    signals.abort();
    tracing::info!(clean = drained.clean, "worker stopped");
    Ok(())
}
