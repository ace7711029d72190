//! Republishing a delivery elsewhere before it is acked: to a retry tier
//! (later, maybe with the next attempt number) or to the dead-letter queue.
//!
//! Every republish waits for the broker's confirm: the original is acked
//! only once its successor is safe, so a crash between the two can double a
//! message in the queue (dedup absorbs that) but never lose one.
//!
//! Once the shutdown grace is over, the deliveries still in work go back
//! to their queues as their channels close: a republish then would only
//! add a second copy (and a retry's would spend an attempt), so the
//! forwarder refuses them and the delivery is left to its requeue.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use backon::{BackoffBuilder as _, ExponentialBuilder};
use lapin::types::AMQPValue;
use mailroom_core::amqp::{Broker, Outgoing, PublishError};
use mailroom_core::wire::{self, DEAD_QUEUE, RETRY_EXCHANGE, RetryTier, Topology, headers};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::incoming::{Incoming, long_string};
use crate::verdict::DeadReason;

/// How often a republish held by a memory or disk alarm is tried again.
const BLOCKED_PAUSE: Duration = Duration::from_secs(2);

/// Longest `mailroom-last-error` kept: enough for an SMTP reply line.
const LAST_ERROR_MAX: usize = 300;

/// Republishes deliveries through the worker's publishing connection.
#[derive(Clone)]
pub struct Forwarder {
    broker: Broker,
    closed: Arc<AtomicBool>,
}

impl Forwarder {
    /// A forwarder publishing through `broker`.
    pub fn new(broker: Broker) -> Self {
        Self {
            broker,
            closed: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Refuses every republish from now on (see the module's doc).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    /// Publishes `outgoing` unless closed, trying again a few times over
    /// some seconds (and for as long as a resource alarm lasts) before the
    /// caller gives the delivery back to its queue: a requeue would send
    /// the mail again and spend one of the deliveries the queue's
    /// `x-delivery-limit` allows, in milliseconds when the broker refuses
    /// at once. A queue of the topology found missing is declared again.
    async fn publish(&self, outgoing: Outgoing) -> Result<(), PublishError> {
        let mut pauses = ExponentialBuilder::new()
            .with_min_delay(Duration::from_millis(500))
            .with_max_delay(Duration::from_secs(4))
            .with_max_times(4)
            .with_jitter()
            .build();
        let mut failures = 0_u32;
        loop {
            if self.closed.load(Ordering::Acquire) {
                return Err(PublishError::Connection(
                    "the worker is stopping: the delivery returns to its queue as it is".to_owned(),
                ));
            }
            let err = match self.broker.publish(outgoing.clone()).await {
                Ok(()) => return Ok(()),
                Err(err) => err,
            };
            if matches!(err, PublishError::Unroutable { .. })
                && let Err(declare) = self.broker.declare(&Topology::standard()).await
            {
                tracing::warn!(error = %declare, "the topology could not be declared again");
            }
            // An alarm holds every publish until it clears; the shutdown
            // grace bounds the wait (the forwarder is closed after it).
            let pause = if matches!(err, PublishError::Blocked) {
                Some(BLOCKED_PAUSE)
            } else {
                pauses.next()
            };
            let Some(pause) = pause else {
                return Err(err);
            };
            failures += 1;
            if failures == 1 {
                tracing::warn!(error = %err, retry_in = ?pause, "republish failed: trying again");
            } else {
                tracing::debug!(error = %err, retry_in = ?pause, "republish failed again");
            }
            tokio::time::sleep(pause).await;
        }
    }

    /// Sends `incoming` back to its work queue after at least `delay`, as attempt
    /// `attempt`. Returns the tier it waits in.
    pub async fn later(
        &self,
        incoming: &Incoming,
        attempt: u32,
        delay: Duration,
        last_error: Option<&str>,
    ) -> Result<&'static RetryTier, PublishError> {
        let tier = wire::tier_for(delay);
        let mut changes = vec![
            (headers::ATTEMPT, AMQPValue::LongLongInt(i64::from(attempt))),
            (headers::CC, wire::retry_cc(incoming.queue())),
        ];
        if let Some(error) = last_error {
            changes.push((headers::LAST_ERROR, long_string(&truncate(error))));
        }
        self.publish(Outgoing {
            exchange: RETRY_EXCHANGE.to_owned(),
            routing_key: tier.name.to_owned(),
            body: incoming.body.clone(),
            properties: incoming.republish_properties(&changes),
            mandatory: true,
        })
        .await?;
        Ok(tier)
    }

    /// Moves `incoming` to the dead-letter queue with why, after how many
    /// attempts, and the last error.
    pub async fn dead_letter(
        &self,
        incoming: &Incoming,
        reason: DeadReason,
        detail: &str,
    ) -> Result<(), PublishError> {
        let now = OffsetDateTime::now_utc()
            .format(&Rfc3339)
            .unwrap_or_default();
        let changes = [
            (headers::REASON, long_string(reason.as_str())),
            (headers::LAST_ERROR, long_string(&truncate(detail))),
            (headers::DEAD_AT, long_string(&now)),
        ];
        self.publish(Outgoing {
            exchange: String::new(),
            routing_key: DEAD_QUEUE.to_owned(),
            body: incoming.body.clone(),
            properties: incoming.republish_properties(&changes),
            mandatory: true,
        })
        .await
    }
}

fn truncate(text: &str) -> String {
    if text.len() <= LAST_ERROR_MAX {
        return text.to_owned();
    }
    let mut end = LAST_ERROR_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::truncate;

    #[test]
    fn long_errors_are_cut_on_a_char_boundary() {
        let long = "é".repeat(400);
        let cut = truncate(&long);
        assert!(cut.len() <= super::LAST_ERROR_MAX + '…'.len_utf8());
        assert!(cut.ends_with('…'));
        assert_eq!(truncate("451 busy"), "451 busy");
    }
}
