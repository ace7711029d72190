//! The dead-letter queue, for an operator: list what is there (never a
//! body), replay it to its work queue with attempts reset, or purge it.
//!
//! Listing and replay read with `basic.get` and hold every message unacked
//! until they are done, so a message is seen once per pass and whatever is
//! not replayed goes back to the queue, in order, when the channel closes;
//! both return only once the broker shows it back in the queue.

use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions, QueuePurgeOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use mailroom_core::amqp::{AmqpError, Broker, Outgoing, PublishError};
use mailroom_core::job::{JobId, Lane};
use mailroom_core::status::{Requeued, StatusStore};
use mailroom_core::wire::{DEAD_QUEUE, JOBS_EXCHANGE, headers};
use std::time::{Duration, Instant};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::incoming::{Incoming, integer, long_string, text};

/// One dead letter, as `dlq list` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    /// The job id (AMQP `message_id`).
    pub id: String,
    /// The tenant header.
    pub tenant: String,
    /// Why: mailroom's reason, or the broker's (`delivery_limit` for a
    /// poison message that used up its deliveries).
    pub reason: String,
    /// Attempts made.
    pub attempts: u32,
    /// The last error, redacted when it was recorded.
    pub last_error: String,
    /// When it was dead-lettered, if known.
    pub dead_at: Option<OffsetDateTime>,
    /// The lane it came from.
    pub lane: Lane,
}

impl DeadLetter {
    fn read(properties: &BasicProperties) -> Self {
        let table = properties.headers().clone().unwrap_or_default();
        let incoming = Incoming::new(properties.clone(), Vec::new());
        let reason = text(&table, headers::REASON)
            .or_else(|| text(&table, "x-first-death-reason"))
            .unwrap_or_else(|| "unknown".to_owned());
        let dead_at = text(&table, headers::DEAD_AT)
            .and_then(|at| OffsetDateTime::parse(&at, &Rfc3339).ok())
            .or_else(|| first_death_time(&table));
        Self {
            id: incoming.message_id.unwrap_or_default(),
            tenant: incoming.tenant.unwrap_or_default(),
            reason,
            attempts: incoming.attempt,
            last_error: text(&table, headers::LAST_ERROR).unwrap_or_default(),
            dead_at,
            lane: incoming.lane,
        }
    }
}

fn first_death_time(table: &FieldTable) -> Option<OffsetDateTime> {
    let AMQPValue::FieldArray(deaths) = table.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else {
        return None;
    };
    match first.inner().get("time")? {
        AMQPValue::Timestamp(secs) => {
            OffsetDateTime::from_unix_timestamp(i64::try_from(*secs).ok()?).ok()
        }
        _ => integer(first, "time").and_then(|secs| OffsetDateTime::from_unix_timestamp(secs).ok()),
    }
}

/// Which dead letters a replay takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selection {
    /// The one with this job id.
    Id(String),
    /// Those dead-lettered for this reason.
    Reason(String),
    /// All of them.
    All,
}

impl Selection {
    fn takes(&self, letter: &DeadLetter) -> bool {
        match self {
            Self::Id(id) => letter.id == *id,
            Self::Reason(reason) => letter.reason == *reason,
            Self::All => true,
        }
    }
}

/// Why a dead-letter operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    /// The broker could not be reached.
    #[error(transparent)]
    Amqp(#[from] AmqpError),
    /// A queue or exchange of mailroom's is missing from the vhost.
    #[error(
        "{0}: mailroom's topology is not declared in this vhost (`mailroom topology --declare`, or start a worker), or amqp.urls names another vhost"
    )]
    Missing(String),
    /// A broker operation failed.
    #[error("dead-letter queue: {0}")]
    Broker(lapin::Error),
    /// The broker did not hand over the next dead letter in time.
    #[error(
        "dead-letter queue: no answer within {0:?} while reading a dead letter (the connection may have been lost; see the log)"
    )]
    Stalled(Duration),
    /// A replayed message was not confirmed; it stays in the dead-letter queue.
    #[error("replay of {id} not confirmed: {source}")]
    Replay {
        /// The job id.
        id: String,
        /// Why.
        source: PublishError,
    },
}

impl From<lapin::Error> for DlqError {
    /// A 404 names what is missing: every operation here is on mailroom's
    /// own queues and exchange, so the topology is missing.
    fn from(err: lapin::Error) -> Self {
        match err.kind() {
            lapin::ErrorKind::ProtocolError(amqp)
                if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)) =>
            {
                Self::Missing(amqp.get_message().to_string())
            }
            _ => Self::Broker(err),
        }
    }
}

/// How long the broker may take to hand over one dead letter.
const GET_TIMEOUT: Duration = Duration::from_secs(10);

/// The next dead letter, taken (unacked) from the queue: a lost connection
/// must end the command, not leave it waiting for an answer that never
/// comes.
async fn next_letter(
    channel: &Channel,
) -> Result<Option<lapin::message::BasicGetMessage>, DlqError> {
    tokio::time::timeout(
        GET_TIMEOUT,
        channel.basic_get(DEAD_QUEUE.into(), BasicGetOptions::default()),
    )
    .await
    .map_err(|_| DlqError::Stalled(GET_TIMEOUT))?
    .map_err(DlqError::from)
}

/// Lists up to `limit` dead letters, oldest first, leaving them in place.
pub async fn list(broker: &Broker, limit: usize) -> Result<Vec<DeadLetter>, DlqError> {
    let channel = broker.channel().await?;
    let depth = depth(&channel).await?;
    let mut letters = Vec::new();
    for _ in 0..depth.min(limit) {
        let Some(message) = next_letter(&channel).await? else {
            break;
        };
        letters.push(DeadLetter::read(&message.delivery.properties));
    }
    give_back(broker, &channel, letters.len()).await?;
    Ok(letters)
}

/// Replays the selected dead letters to their work queues with attempts
/// reset to 1, each marked `queued` in `statuses` (if given) before it is
/// published: a worker may take it at once, and what it records must not
/// be overwritten. Returns the replayed ones.
pub async fn replay(
    broker: &Broker,
    selection: &Selection,
    statuses: Option<&StatusStore>,
) -> Result<Vec<DeadLetter>, DlqError> {
    let channel = broker.channel().await?;
    let depth = depth(&channel).await?;
    let mut replayed = Vec::new();
    let mut held = 0;
    let mut result = Ok(());
    for _ in 0..depth {
        let Some(message) = next_letter(&channel).await? else {
            break;
        };
        let delivery = message.delivery;
        let letter = DeadLetter::read(&delivery.properties);
        if !selection.takes(&letter) {
            held += 1;
            continue;
        }
        let incoming = Incoming::new(delivery.properties.clone(), delivery.data);
        let mut properties = incoming.republish_properties(&[
            (headers::ATTEMPT, AMQPValue::LongLongInt(1)),
            (headers::REPLAYED, AMQPValue::Boolean(true)),
            // What it is routed by: a lane header that named none is
            // replaced, or the replay would be refused for it again.
            (headers::LANE, long_string(incoming.lane.as_str())),
        ]);
        properties = strip(
            properties,
            &[headers::REASON, headers::LAST_ERROR, headers::DEAD_AT],
        );
        let requeued = match statuses {
            Some(statuses) => requeue_status(statuses, &letter).await,
            None => None,
        };
        let published = broker
            .publish(Outgoing {
                exchange: JOBS_EXCHANGE.to_owned(),
                routing_key: incoming.queue().routing_key().to_owned(),
                body: incoming.body,
                properties,
                mandatory: true,
            })
            .await;
        if let Err(source) = published {
            if let (Some(statuses), Some(requeued)) = (statuses, &requeued)
                && let Err(err) = statuses.restore(requeued).await
            {
                tracing::warn!(error = %err, job_id = %letter.id, "status left queued after a failed replay");
            }
            held += 1;
            result = Err(DlqError::Replay {
                id: letter.id.clone(),
                source,
            });
            break;
        }
        delivery.acker.ack(BasicAckOptions::default()).await?;
        tracing::info!(job_id = %letter.id, reason = %letter.reason, "dead letter replayed");
        replayed.push(letter);
        if matches!(selection, Selection::Id(_)) {
            break;
        }
    }
    give_back(broker, &channel, held).await?;
    result.map(|()| replayed)
}

/// Marks `letter`'s job queued again; a Redis problem is a warning, since
/// statuses only inform and the replay goes ahead.
async fn requeue_status(statuses: &StatusStore, letter: &DeadLetter) -> Option<Requeued> {
    let id = letter.id.parse::<JobId>().ok()?;
    statuses.requeue(&id).await.unwrap_or_else(|err| {
        tracing::warn!(error = %err, job_id = %letter.id, "status not updated for the replay");
        None
    })
}

/// Deletes every dead letter. Returns how many there were.
pub async fn purge(broker: &Broker) -> Result<u32, DlqError> {
    let channel = broker.channel().await?;
    let purged = channel
        .queue_purge(DEAD_QUEUE.into(), QueuePurgeOptions::default())
        .await?;
    close(&channel).await;
    Ok(purged)
}

async fn depth(channel: &Channel) -> Result<usize, DlqError> {
    let queue = channel
        .queue_declare(
            DEAD_QUEUE.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(usize::try_from(queue.message_count()).unwrap_or(usize::MAX))
}

/// How long [`give_back`] waits for the broker to requeue what it held.
const GIVE_BACK_PATIENCE: Duration = Duration::from_secs(5);

/// Closes a channel holding `held` dead letters unacked, which returns them
/// to the queue, and waits until the queue shows them again. A quorum queue
/// requeues them only after it has answered the close, so without the wait a
/// `replay` right after a `list` could find the queue empty and replay
/// nothing. Gives up quietly after [`GIVE_BACK_PATIENCE`], since another
/// operator may have taken them meanwhile.
async fn give_back(broker: &Broker, channel: &Channel, held: usize) -> Result<(), DlqError> {
    if held == 0 {
        close(channel).await;
        return Ok(());
    }
    let ready = depth(channel).await;
    close(channel).await;
    let wanted = ready?.saturating_add(held);
    let watch = broker.channel().await?;
    let start = Instant::now();
    while depth(&watch).await? < wanted && start.elapsed() < GIVE_BACK_PATIENCE {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    close(&watch).await;
    Ok(())
}

async fn close(channel: &Channel) {
    if let Err(err) = channel.close(200, "done".into()).await {
        tracing::debug!(error = %err, "dead-letter channel close");
    }
}

fn strip(properties: BasicProperties, names: &[&str]) -> BasicProperties {
    let table: FieldTable = properties
        .headers()
        .clone()
        .unwrap_or_default()
        .inner()
        .iter()
        .filter(|(name, _)| !names.contains(&name.as_str()))
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect::<std::collections::BTreeMap<_, _>>()
        .into();
    properties.with_headers(table)
}
