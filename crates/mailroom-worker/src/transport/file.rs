//! The `file` transport: each message becomes `<job id>.eml` in a folder.
//! The file appears whole or not at all (written aside, then renamed), and
//! a retry of the same job overwrites it with the same bytes.

use std::path::{Path, PathBuf};

use mailroom_core::job::JobId;

use super::{Delivered, SendError, TransportError};
use crate::message::OutgoingMessage;

/// Writes `.eml` files into a folder.
pub struct FileTransport {
    dir: PathBuf,
}

impl FileTransport {
    /// Writes into `dir`, made if missing.
    pub fn new(dir: &Path) -> Result<Self, TransportError> {
        let outbox = |source| TransportError::Outbox {
            path: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(outbox)?;
        let dir = std::fs::canonicalize(dir).map_err(outbox)?;
        Ok(Self { dir })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `message` as `<id>.eml`.
    pub async fn send(
        &self,
        id: &JobId,
        message: &OutgoingMessage,
    ) -> Result<Delivered, SendError> {
        let path = self.dir.join(format!("{id}.eml"));
        let partial = self.dir.join(format!(".{id}.eml.partial"));
        let written = async {
            tokio::fs::write(&partial, &message.raw).await?;
            tokio::fs::rename(&partial, &path).await
        }
        .await;
        written.map(|()| Delivered { code: 250 }).map_err(|err| {
            SendError::transient(None, &format!("writing {}: {err}", path.display()))
        })
    }

    /// One line for the start-up log.
    pub fn describe(&self) -> String {
        format!(
            "file transport: each message is written to {}/<job id>.eml; no mail leaves this machine (set worker.transport = \"smtp\" to deliver)",
            self.dir.display()
        )
    }
}
