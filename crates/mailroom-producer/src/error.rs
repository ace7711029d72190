//! The producer's errors.

use mailroom_core::amqp::{AmqpError, PublishError};
use mailroom_core::seal::SealError;
use mailroom_core::settings::SettingsError;
use mailroom_core::validate::ValidationErrors;

/// A producer could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ProducerError {
    /// A setting is missing or wrong (e.g. no sealing key).
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// The broker could not be reached or set up.
    #[error(transparent)]
    Amqp(#[from] AmqpError),
}

/// A job was not enqueued. Nothing was published for it, or the broker did
/// not confirm what was: either way, the caller must not count it as sent.
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    /// The job breaks validation rules; nothing was published.
    #[error("invalid job: {0}")]
    Invalid(ValidationErrors),
    /// The job could not be sealed; nothing was published.
    #[error("sealing failed: {0}")]
    Seal(#[from] SealError),
    /// The broker did not confirm it.
    #[error("not confirmed by the broker: {0}")]
    Publish(#[from] PublishError),
}

impl EnqueueError {
    /// Whether enqueueing the same job again may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Publish(err) => err.is_retryable(),
            Self::Invalid(_) | Self::Seal(_) => false,
        }
    }
}
