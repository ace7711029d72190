//! Where mail goes: an SMTP relay, or `.eml` files in a folder for trying
//! mailroom with no relay at all.
//!
//! A transport answers with the relay's code, or a [`SendError`] that says
//! which way to go: transient (retry), permanent (dead-letter), or
//! uncertain (the connection died after the end of DATA, before the reply,
//! so the relay may or may not have taken the message).

mod data;
mod file;
mod reply;
mod session;
mod smtp;
mod wire;

use std::pin::Pin;

use mailroom_core::job::JobId;
use mailroom_core::offload;
use mailroom_core::settings::{Settings, TransportKind};
use mailroom_core::telemetry::redact_error;

use crate::message::OutgoingMessage;

pub(crate) use data::{crlf_breaks, lines, rejoined};
pub use file::FileTransport;
pub use smtp::{SmtpMessage, SmtpTransport};

/// The relay took the message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivered {
    /// Its reply code (250 for the file transport).
    pub code: u16,
}

/// A send that did not end in a 2xx. Details are redacted: an SMTP reply
/// may name a recipient.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// Try again later: a 4xx, or a connection, TLS or timeout failure
    /// before the message was handed over.
    #[error("transient: {}{detail}", code.map(|c| format!("{c} ")).unwrap_or_default())]
    Transient {
        /// The reply code, when the relay answered.
        code: Option<u16>,
        /// What went wrong.
        detail: String,
    },
    /// Refused for good: a 5xx.
    #[error("rejected: {code} {detail}")]
    Permanent {
        /// The reply code.
        code: u16,
        /// The relay's words.
        detail: String,
    },
    /// The message was handed over, but no reply came.
    #[error("uncertain: {detail}")]
    Uncertain {
        /// What went wrong.
        detail: String,
    },
    /// The hand-over hook stopped the send just before the end of DATA:
    /// nothing of the message was handed over.
    #[error("withheld: {0}")]
    Withheld(Withheld),
}

/// Why a hand-over hook stopped a send before the end of DATA.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Withheld {
    /// The dedup claim's lease may have run out: another delivery may own
    /// the job, and be sending it, now.
    #[error("the dedup claim's lease may have run out")]
    LeaseLost,
    /// Redis could not take the handed marker.
    #[error("handed marker not written: {0}")]
    Unavailable(String),
    /// The worker is stopping: it hands no more messages over.
    #[error("the worker is stopping")]
    Stopping,
}

impl SendError {
    /// A transient failure with `detail`, redacted.
    pub fn transient(code: Option<u16>, detail: &str) -> Self {
        Self::Transient {
            code,
            detail: redact_error(detail),
        }
    }

    /// A permanent failure with `detail`, redacted.
    pub fn permanent(code: u16, detail: &str) -> Self {
        Self::Permanent {
            code,
            detail: redact_error(detail),
        }
    }

    /// An uncertain outcome with `detail`, redacted.
    pub fn uncertain(detail: &str) -> Self {
        Self::Uncertain {
            detail: redact_error(detail),
        }
    }
}

/// A transport could not be set up from the settings.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// `smtp.url` does not name a host and port.
    #[error("smtp.url: {0}")]
    Url(String),
    /// `tls = "none"` to a host that is not loopback.
    #[error(
        "smtp.tls = \"none\" sends mail and credentials in clear to {host}, which is not loopback; use TLS, or set smtp.allow_plaintext = true"
    )]
    PlaintextRefused {
        /// The relay's host.
        host: String,
    },
    /// `smtp.ca_file` could not be read or parsed.
    #[error("smtp.ca_file {path}: {reason}")]
    CaFile {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// TLS could not be set up for the relay.
    #[error("TLS for the SMTP relay: {0}")]
    Tls(String),
    /// The outbox folder of the file transport could not be made.
    #[error("worker.outbox_dir {path}: {source}")]
    Outbox {
        /// The folder.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Awaited just before a message is handed over whole; an error stops the
/// send before that point.
pub type HandOver<'a> = Pin<Box<dyn Future<Output = Result<(), Withheld>> + Send + 'a>>;

/// The transport of a worker.
pub enum Transport {
    /// An SMTP relay.
    Smtp(Box<SmtpTransport>),
    /// `.eml` files.
    File(FileTransport),
}

impl Transport {
    /// The transport `worker.transport` names.
    pub fn from_settings(settings: &Settings) -> Result<Self, TransportError> {
        Ok(match settings.worker.transport {
            TransportKind::Smtp => Self::Smtp(Box::new(SmtpTransport::new(&settings.smtp)?)),
            TransportKind::File => Self::File(FileTransport::new(&settings.worker.outbox_dir)?),
        })
    }

    /// Delivers `message` of job `id`; `hand_over`, if given, is awaited
    /// just before the relay gets the end of DATA, and its failure stops
    /// the send there (the file transport, whose writes are idempotent, has
    /// no such point).
    pub async fn send(
        &self,
        id: &JobId,
        message: OutgoingMessage,
        hand_over: Option<HandOver<'_>>,
    ) -> Result<Delivered, SendError> {
        match self {
            Self::Smtp(smtp) => {
                let size = message.raw.len();
                let message = offload::heavy(size, || SmtpMessage::new(message));
                smtp.send(&message, hand_over).await
            }
            Self::File(file) => file.send(id, &message).await,
        }
    }

    /// One line on where mail goes, without credentials.
    pub fn describe(&self) -> String {
        match self {
            Self::Smtp(smtp) => smtp.describe(),
            Self::File(file) => file.describe(),
        }
    }

    /// Starts no more transactions: a send not yet at the relay (waiting
    /// for a connection, or about to write its MAIL) is withheld as
    /// [`Withheld::Stopping`]. Those under way go on.
    pub fn stop_starting(&self) {
        if let Self::Smtp(smtp) = self {
            smtp.stop_starting();
        }
    }

    /// Closes idle connections politely.
    pub async fn shutdown(&self) {
        if let Self::Smtp(smtp) = self {
            smtp.shutdown().await;
        }
    }
}
