//! One connection to a relay, read and written by mailroom itself.
//!
//! lettre's `AsyncSmtpConnection` keeps its read buffer to itself, so
//! bytes a relay sent that no command asked for could not be seen: they
//! were read as the next command's reply, and outcomes went to the wrong
//! messages. Here the buffer is ours, and every write first checks that
//! nothing is waiting in it or on the socket. lettre still provides the
//! stream and its TLS.

use std::fmt::Display;

use futures_util::FutureExt as _;
use futures_util::io::{AsyncReadExt as _, AsyncWriteExt as _};
#[allow(deprecated)] // Public and kept in 0.11; the TLS upgrade lives there.
use lettre::transport::smtp::client::AsyncNetworkStream;
use lettre::transport::smtp::client::TlsParameters;

use super::reply::{self, Reply, ReplyError};

/// Bytes asked of the socket at a time.
const READ_CHUNK: usize = 8 * 1024;

/// A connection that failed: no usable reply.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Reading or writing failed.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// The relay closed the connection.
    #[error("the relay closed the connection")]
    Closed,
    /// The relay's bytes do not read as a reply.
    #[error("{0}")]
    Reply(#[from] ReplyError),
    /// The relay sent bytes no command asked for: any reply read after
    /// them would be taken for the wrong command's.
    #[error("the relay sent bytes no command asked for: the connection is out of step")]
    Unasked,
    /// The TLS handshake failed.
    #[error("TLS: {0}")]
    Tls(String),
}

/// A connection to a relay and the bytes read from it, not yet replies.
pub struct Wire {
    /// Boxed: with its TLS state it is over a kilobyte, and a session is
    /// moved (pooled, handed over) and held in every send's future.
    #[allow(deprecated)]
    stream: Box<AsyncNetworkStream>,
    unread: Vec<u8>,
    /// Kept to read into, so a read dropped at a timeout loses nothing.
    chunk: Vec<u8>,
    broken: bool,
    /// The stream is gone: lettre leaves none behind a failed TLS
    /// upgrade, and touching that (even to close it) is a bug it asserts.
    gone: bool,
}

impl Wire {
    /// A connection over `stream`.
    #[allow(deprecated)]
    pub fn new(stream: AsyncNetworkStream) -> Self {
        Self {
            stream: Box::new(stream),
            unread: Vec::new(),
            chunk: vec![0; READ_CHUNK],
            broken: false,
            gone: false,
        }
    }

    /// Whether a read or write failed: the connection is of no more use.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Whether the connection is encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.stream.is_encrypted()
    }

    /// Writes `command` and reads its reply.
    pub async fn command(&mut self, command: impl Display) -> Result<Reply, WireError> {
        self.write(command.to_string().as_bytes()).await?;
        self.read_reply().await
    }

    /// Writes `bytes`, once sure the relay sent nothing no command asked
    /// for: every write follows the last reply it was owed.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), WireError> {
        self.check_in_step()?;
        self.send(bytes).await
    }

    /// The next reply.
    pub async fn read_reply(&mut self) -> Result<Reply, WireError> {
        loop {
            match reply::parse(&self.unread) {
                Ok(Some((reply, used))) => {
                    self.unread.drain(..used);
                    return Ok(reply);
                }
                Ok(None) if self.gone => return Err(WireError::Closed),
                Ok(None) => self.fill().await?,
                Err(err) => {
                    self.broken = true;
                    return Err(err.into());
                }
            }
        }
    }

    /// `Ok` when nothing the relay sent is left unread: in the buffer, or
    /// ready on the socket (asked once, without waiting).
    pub fn check_in_step(&mut self) -> Result<(), WireError> {
        if self.gone {
            return Err(WireError::Closed);
        }
        if self.unread.is_empty() {
            match self.stream.read(&mut self.chunk).now_or_never() {
                None => return Ok(()),
                Some(read) => self.took(read)?,
            }
        }
        self.broken = true;
        Err(WireError::Unasked)
    }

    /// Switches to TLS (STARTTLS). Bytes read before it came in clear:
    /// read as replies after it, they would let a man in the middle answer
    /// for the relay, so they fail the upgrade.
    pub async fn upgrade(&mut self, parameters: TlsParameters) -> Result<(), WireError> {
        self.check_in_step()?;
        self.stream.upgrade_tls(parameters).await.map_err(|err| {
            self.broken = true;
            self.gone = true;
            WireError::Tls(err.to_string())
        })
    }

    /// QUIT, its reply, and close; only close if the connection broke.
    pub async fn quit(&mut self) {
        if !self.broken {
            // Out of step or not, QUIT ends the session.
            if self.send(b"QUIT\r\n").await.is_ok() {
                let _ = self.read_reply().await;
            }
            self.broken = true;
        }
        if !self.gone {
            let _ = self.stream.close().await;
        }
    }

    /// Writes `bytes` without [`Self::write`]'s check, for a caller that
    /// has just made it and must tell its failure from a failed write.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), WireError> {
        if self.gone {
            return Err(WireError::Closed);
        }
        let written = async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        };
        let written = written.await;
        written.map_err(|err| {
            self.broken = true;
            WireError::Io(err)
        })
    }

    /// Reads what the relay sent next, waiting for it.
    async fn fill(&mut self) -> Result<(), WireError> {
        let read = self.stream.read(&mut self.chunk).await;
        self.took(read)
    }

    /// Keeps the `read` bytes of the chunk; the end of the stream or an
    /// error breaks the connection.
    fn took(&mut self, read: std::io::Result<usize>) -> Result<(), WireError> {
        match read {
            Ok(0) => {
                self.broken = true;
                Err(WireError::Closed)
            }
            Ok(count) => {
                let count = count.min(self.chunk.len());
                self.unread.extend_from_slice(&self.chunk[..count]);
                Ok(())
            }
            Err(err) => {
                self.broken = true;
                Err(WireError::Io(err))
            }
        }
    }
}
