//! `mailroom api`: serve the HTTP API until SIGTERM or SIGINT.

use anyhow::Context as _;
use mailroom_core::settings::Settings;
use mailroom_producer::api::Api;
use tokio_util::sync::CancellationToken;

use super::signal::cancel_on_signal;

/// Runs the API.
pub async fn run(settings: &Settings) -> anyhow::Result<()> {
    let api = Api::connect(settings)
        .await
        .context("the API could not start")?;
    let listener = tokio::net::TcpListener::bind(settings.api.bind)
        .await
        .with_context(|| format!("api.bind {}", settings.api.bind))?;
    let bound = listener.local_addr()?;
    tracing::info!(bind = %bound, "API listening");
    let scheme = if api.serves_tls() { "https" } else { "http" };
    eprintln!("mailroom api: listening on {scheme}://{bound}");
    let shutdown = CancellationToken::new();
    let signals = tokio::spawn(cancel_on_signal(shutdown.clone()));
    api.serve(listener, shutdown).await?;
    signals.abort();
    Ok(())
}
