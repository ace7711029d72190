//! What can go wrong talking to the broker, said without passwords.

use lapin::ErrorKind;
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};

/// Connecting to, or setting up, the broker failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum AmqpError {
    /// `amqp.urls` is empty.
    #[error("amqp.urls names no broker")]
    NoUrls,
    /// A URL does not parse.
    #[error(
        "amqp.urls entry {position}: {url} is not a valid AMQP URL: {reason} \
         (in a user name or password, the characters / ? # @ : must be percent-encoded, e.g. / as %2F)"
    )]
    InvalidUrl {
        /// Which entry of `amqp.urls`, from 1.
        position: usize,
        /// The URL, password masked.
        url: String,
        /// Why.
        reason: String,
    },
    /// The broker refused the user name or password.
    #[error("RabbitMQ at {url} refused the credentials (check the user and password in amqp.urls)")]
    AccessRefused {
        /// The URL, password masked.
        url: String,
    },
    /// The broker refused the vhost: the user has no permissions there,
    /// or the vhost (or user) is at its connection limit.
    #[error(
        "RabbitMQ at {url} refused the vhost: {reason} (permissions: rabbitmqctl \
         set_permissions; a connection limit: rabbitmqctl list_vhost_limits)"
    )]
    NotAllowed {
        /// The URL, password masked.
        url: String,
        /// The broker's words (they name the user and the vhost).
        reason: String,
    },
    /// No broker answered.
    #[error("RabbitMQ unreachable at {urls}: {reason}")]
    Unreachable {
        /// The URLs tried, passwords masked.
        urls: String,
        /// The last failure, and what to do about it.
        reason: String,
    },
    /// A queue exists with other arguments than mailroom declares.
    #[error(
        "queue {queue} exists with other arguments ({detail}); mailroom needs the ones `mailroom topology` prints: move its messages elsewhere and delete it, or use another vhost"
    )]
    QueueMismatch {
        /// The queue.
        queue: String,
        /// The broker's words.
        detail: String,
    },
    /// Another broker error.
    #[error("RabbitMQ: {0}")]
    Broker(String),
}

impl AmqpError {
    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable { .. } | Self::Broker(_) => true,
            // A connection frees a place under the limit when it closes.
            Self::NotAllowed { reason, .. } => reason.contains("limit"),
            _ => false,
        }
    }
}

/// A message was not confirmed by the broker: the caller must not count it
/// as published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// No queue is bound for the routing key (a `mandatory` publish came back).
    #[error("unroutable: no queue bound to {exchange:?} with key {routing_key:?}")]
    Unroutable {
        /// Exchange published to.
        exchange: String,
        /// Routing key.
        routing_key: String,
    },
    /// The broker blocks publishers (a memory or disk alarm); nothing was
    /// sent, or it may not be queued yet.
    #[error("the broker is blocking publishers (a memory or disk alarm on RabbitMQ)")]
    Blocked,
    /// The broker refused to take the message (nack), e.g. a full queue.
    #[error("the broker refused the message (nack)")]
    Nacked,
    /// No confirm arrived in time; the message may or may not be queued.
    #[error("no publisher confirm within {0:?}")]
    ConfirmTimeout(std::time::Duration),
    /// The channel or connection failed.
    #[error("broker connection: {0}")]
    Connection(String),
    /// The connection could not be (re)opened.
    #[error(transparent)]
    Amqp(#[from] AmqpError),
}

impl PublishError {
    /// Whether publishing again may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Blocked | Self::Nacked | Self::ConfirmTimeout(_) | Self::Connection(_) => true,
            Self::Amqp(err) => err.is_transient(),
            Self::Unroutable { .. } => false,
        }
    }
}

/// How the broker answered an operation, for deciding what to do.
pub(crate) enum Refusal {
    /// Wrong user name or password.
    AccessRefused,
    /// The broker refused the vhost, for the reason given.
    NotAllowed(String),
    /// A declaration clashed with what exists.
    PreconditionFailed(String),
    /// Anything else.
    Other,
}

pub(crate) fn refusal(err: &lapin::Error) -> Refusal {
    match err.kind() {
        ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => Refusal::AccessRefused,
            AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => {
                Refusal::NotAllowed(amqp.get_message().to_string())
            }
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) => {
                Refusal::PreconditionFailed(amqp.get_message().to_string())
            }
            _ => Refusal::Other,
        },
        ErrorKind::AuthProviderError(_) => Refusal::AccessRefused,
        _ => Refusal::Other,
    }
}
