//! Opening a connection: each URL of `amqp.urls` in turn, each attempt
//! bounded by `amqp.connect_timeout`, whole rounds retried with `backon`'s
//! jittered exponential backoff. Refused credentials or vhost are not
//! retried: waiting does not fix them.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable as _};
use lapin::types::LongString;
use lapin::{Connection, ConnectionProperties};

use super::AmqpError;
use super::error::{Refusal, refusal};
use crate::settings::{AmqpSettings, redact_url};

/// Rounds over every URL before giving up: with the delays below, about
/// half a minute of a broker being down is ridden out.
const ROUNDS: usize = 6;

/// Connects to the first URL that answers.
pub(super) async fn connect(settings: &AmqpSettings, name: &str) -> Result<Connection, AmqpError> {
    if settings.urls.is_empty() {
        return Err(AmqpError::NoUrls);
    }
    let round = || one_round(settings, name);
    round
        .retry(
            ExponentialBuilder::new()
                .with_min_delay(Duration::from_millis(250))
                .with_max_delay(Duration::from_secs(8))
                .with_max_times(ROUNDS - 1)
                .with_jitter(),
        )
        .when(AmqpError::is_transient)
        .notify(|err, delay| {
            tracing::warn!(error = %err, retry_in = ?delay, "broker connection failed");
        })
        .await
}

async fn one_round(settings: &AmqpSettings, name: &str) -> Result<Connection, AmqpError> {
    let mut last = String::new();
    for url in &settings.urls {
        let shown = shown(url.expose());
        let properties =
            ConnectionProperties::default().with_connection_name(LongString::from(name.as_bytes()));
        tracing::debug!(url = %shown, "connecting to the broker");
        match tokio::time::timeout(
            settings.connect_timeout,
            Connection::connect(url.expose(), properties),
        )
        .await
        {
            Ok(Ok(connection)) => {
                tracing::info!(url = %shown, connection = name, "connected to the broker");
                return Ok(connection);
            }
            Ok(Err(err)) => match refusal(&err) {
                Refusal::AccessRefused => return Err(AmqpError::AccessRefused { url: shown }),
                Refusal::NotAllowed => return Err(AmqpError::NotAllowed { url: shown }),
                _ if is_uri_error(&err) => {
                    return Err(AmqpError::InvalidUrl {
                        url: shown,
                        reason: err.to_string(),
                    });
                }
                _ => last = format!("{shown}: {}", scrub(&err.to_string(), url.expose())),
            },
            Err(_) => last = format!("{shown}: no answer within {:?}", settings.connect_timeout),
        }
    }
    Err(AmqpError::Unreachable {
        urls: settings
            .urls
            .iter()
            .map(|url| shown(url.expose()))
            .collect::<Vec<_>>()
            .join(", "),
        reason: last,
    })
}

/// The URL as it may be logged.
fn shown(url: &str) -> String {
    redact_url(url).unwrap_or_else(|| "(not a URL)".to_owned())
}

/// An error text with the URL (and so its password) taken out, in case a
/// library quotes it.
fn scrub(text: &str, url: &str) -> String {
    text.replace(url, &shown(url))
}

fn is_uri_error(err: &lapin::Error) -> bool {
    matches!(err.kind(), lapin::ErrorKind::IOError(io) if io.kind() == std::io::ErrorKind::InvalidInput)
}
