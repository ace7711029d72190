//! How a delivery ends: what each pipeline step may decide, and what the
//! outcome step then makes durable before the delivery is acked.

use std::fmt;
use std::time::Duration;

/// The end of one delivery's trip through the pipeline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The relay accepted the mail.
    Sent {
        /// SMTP reply code.
        code: u16,
    },
    /// The job was sent before (same tenant and idempotency key, or a
    /// redelivery): acked without sending.
    Duplicate {
        /// The job that was sent.
        first: String,
    },
    /// A transient failure: try again after a backoff, spending an attempt.
    Retry {
        /// What went wrong, already redacted.
        error: String,
    },
    /// Not now, and not the job's fault (another worker holds its claim,
    /// Redis is unreachable, a rate limit): come back after `delay` without
    /// spending an attempt.
    Defer {
        /// How long to wait at least.
        delay: Duration,
        /// Why, for logs and metrics.
        why: &'static str,
    },
    /// The worker is stopping and had not handed the message to the relay:
    /// the claim is released and the delivery goes back to its queue as it
    /// came, for the next worker.
    Return,
    /// Give up: the job goes to the dead-letter queue.
    DeadLetter {
        /// Why, as recorded in the `mailroom-reason` header.
        reason: DeadReason,
        /// Detail, already redacted.
        detail: String,
    },
}

/// Why a job was dead-lettered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeadReason {
    /// The body did not open (unknown kid, malformed, tampered) or its
    /// headers were missing.
    Seal,
    /// The job fails validation.
    Invalid,
    /// `expires_at` passed before it could be sent.
    Expired,
    /// The relay refused it for good (5xx).
    Rejected,
    /// The send's outcome is unknown and `worker.on_uncertain = "park"`.
    Uncertain,
    /// Out of attempts.
    MaxAttempts,
    /// Too old to try again.
    MaxAge,
}

impl DeadReason {
    /// Every reason, for listing and replay filters.
    pub const ALL: [DeadReason; 7] = [
        Self::Seal,
        Self::Invalid,
        Self::Expired,
        Self::Rejected,
        Self::Uncertain,
        Self::MaxAttempts,
        Self::MaxAge,
    ];

    /// The reason as written in the `mailroom-reason` header.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Seal => "seal",
            Self::Invalid => "invalid",
            Self::Expired => "expired",
            Self::Rejected => "rejected",
            Self::Uncertain => "uncertain",
            Self::MaxAttempts => "max-attempts",
            Self::MaxAge => "max-age",
        }
    }
}

impl fmt::Display for DeadReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
