//! Opening a connection: each URL of `amqp.urls` in turn, each attempt
//! bounded by `amqp.connect_timeout`, whole rounds retried with `backon`'s
//! jittered exponential backoff. Refused credentials or vhost are not
//! retried: waiting does not fix them.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable as _};
use lapin::types::LongString;
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};

use super::AmqpError;
use super::error::{Refusal, refusal};
use crate::settings::{AmqpSettings, redact_url};

/// Rounds over every URL before giving up: with the delays below, about
/// half a minute of a broker being down is ridden out.
const ROUNDS: usize = 6;

/// Connects to the first URL that answers.
pub(super) async fn connect(settings: &AmqpSettings, name: &str) -> Result<Connection, AmqpError> {
    // Parsed up front: lapin reports a URL that does not parse as an I/O
    // error, which would be retried as a broker that is down.
    let targets = targets(settings)?;
    let hint = unreachable_hint(settings);
    let round = || one_round(&targets, settings.connect_timeout, name, hint);
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

impl AmqpSettings {
    /// Whether every URL of `urls` parses as connecting parses it, so a
    /// settings check (and `mailroom config`) refuses what a connection
    /// would.
    pub fn check_urls(&self) -> Result<(), AmqpError> {
        targets(self).map(drop)
    }
}

fn targets(settings: &AmqpSettings) -> Result<Vec<Target>, AmqpError> {
    if settings.urls.is_empty() {
        return Err(AmqpError::NoUrls);
    }
    settings
        .urls
        .iter()
        .enumerate()
        .map(|(index, url)| Target::parse(url.expose(), index + 1))
        .collect()
}

/// One URL of `amqp.urls`, parsed.
struct Target {
    uri: AMQPUri,
    /// The URL as it may be logged.
    shown: String,
}

impl Target {
    /// `url`, the `position`th (from 1) of `amqp.urls`.
    fn parse(url: &str, position: usize) -> Result<Self, AmqpError> {
        let shown = redact_url(url).unwrap_or_else(|| "(not a URL)".to_owned());
        match url.parse::<AMQPUri>() {
            Ok(uri) => Ok(Self { uri, shown }),
            // The parser quotes the whole URL in some of its messages.
            Err(reason) => Err(AmqpError::InvalidUrl {
                position,
                reason: reason.replace(url, &shown),
                url: shown,
            }),
        }
    }
}

/// What to do when no broker answers: start one, when `amqp.urls` is the
/// default (a RabbitMQ on this machine); else check the setting, since
/// starting a local broker would not help.
fn unreachable_hint(settings: &AmqpSettings) -> &'static str {
    if settings.urls == AmqpSettings::default().urls {
        "start it with `rabbitmq-server -detached`"
    } else {
        "check that it runs there and that amqp.urls names it"
    }
}

async fn one_round(
    targets: &[Target],
    timeout: Duration,
    name: &str,
    hint: &'static str,
) -> Result<Connection, AmqpError> {
    let mut last = String::new();
    // With one URL, the error names it already.
    let which = |shown: &str| {
        if targets.len() > 1 {
            format!("{shown}: ")
        } else {
            String::new()
        }
    };
    for Target { uri, shown } in targets {
        let properties =
            ConnectionProperties::default().with_connection_name(LongString::from(name.as_bytes()));
        tracing::debug!(url = %shown, "connecting to the broker");
        match tokio::time::timeout(timeout, Connection::connect_uri(uri.clone(), properties)).await
        {
            Ok(Ok(connection)) => {
                tracing::info!(url = %shown, connection = name, "connected to the broker");
                return Ok(connection);
            }
            Ok(Err(err)) => match refusal(&err) {
                Refusal::AccessRefused => {
                    return Err(AmqpError::AccessRefused { url: shown.clone() });
                }
                Refusal::NotAllowed(reason) => {
                    return Err(AmqpError::NotAllowed {
                        url: shown.clone(),
                        reason,
                    });
                }
                // Connecting from the parsed URI, lapin's errors are the
                // socket's, TLS's or the broker's: none quotes the URL.
                _ => last = format!("{}{err}", which(shown)),
            },
            Err(_) => last = format!("{}no answer within {timeout:?}", which(shown)),
        }
    }
    Err(AmqpError::Unreachable {
        urls: targets
            .iter()
            .map(|target| target.shown.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        reason: format!("{last} ({hint})"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Secret;

    /// A URL that does not parse fails at once, not after rounds of retries
    /// with a hint to start RabbitMQ; its password is not in the error.
    #[tokio::test]
    async fn a_malformed_url_is_refused_at_once() {
        let settings = AmqpSettings {
            urls: vec![
                Secret::new("amqp://guest:guest@127.0.0.1:1/%2f"),
                Secret::new("amqp://app:ab/s3cret@rabbit:5672/%2f"),
            ],
            connect_timeout: Duration::from_millis(200),
            ..AmqpSettings::default()
        };
        let start = std::time::Instant::now();
        let err = connect(&settings, "test").await.expect_err("refused");
        assert!(matches!(err, AmqpError::InvalidUrl { .. }), "{err:?}");
        assert!(!err.is_transient());
        let text = err.to_string();
        assert!(text.contains("entry 2: amqp://app:***@rabbit"), "{text}");
        assert!(!text.contains("s3cret"), "{text}");
        // The likely cause, a `/` in the password, is named with its cure.
        assert!(text.contains("invalid port number"), "{text}");
        assert!(text.contains("percent-encoded, e.g. / as %2F"), "{text}");
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
    }

    /// Starting a local broker is the cure only where the default URL points.
    #[test]
    fn only_the_default_url_is_told_to_start_rabbitmq() {
        let mut settings = AmqpSettings::default();
        assert!(unreachable_hint(&settings).contains("rabbitmq-server"));
        settings.urls = vec![Secret::new("amqp://guest:guest@127.0.0.1:5673/%2f")];
        assert!(unreachable_hint(&settings).contains("amqp.urls"));
    }

    #[test]
    fn a_parser_message_quoting_the_url_is_scrubbed() {
        let Err(AmqpError::InvalidUrl { url, reason, .. }) = Target::parse("amqp:s3cret@rabbit", 1)
        else {
            panic!("parsed");
        };
        assert!(
            !url.contains("s3cret") && !reason.contains("s3cret"),
            "{url}: {reason}"
        );
    }
}
