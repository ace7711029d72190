//! The `queued` status of accepted jobs, written off the request's path by
//! one task that pipelines whatever has piled up while its last write was
//! in flight: under load, one Redis round trip serves many requests.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use mailroom_core::status::{StatusStore, StatusUpdate};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Statuses waiting to be written, at most; past that a request writes
/// its own.
const BACKLOG: usize = 4_096;

/// Statuses one write carries at most.
const MOST: usize = 256;

/// How long [`QueuedWriter::close`] waits for the last writes.
const FLUSH: Duration = Duration::from_secs(2);

/// Writes `queued` statuses.
pub struct QueuedWriter {
    statuses: StatusStore,
    /// Started on first use, inside the runtime that serves requests.
    writer: Mutex<Option<Writer>>,
}

struct Writer {
    sender: mpsc::Sender<StatusUpdate>,
    task: JoinHandle<()>,
}

impl QueuedWriter {
    /// Writes into `statuses`.
    pub fn new(statuses: StatusStore) -> Self {
        Self {
            statuses,
            writer: Mutex::new(None),
        }
    }

    /// Records `update` soon. It is informative only, so nobody waits for
    /// it: the job is enqueued whatever happens here, and a worker that was
    /// quicker is never overwritten.
    pub fn record(&self, update: StatusUpdate) {
        let sent = {
            let mut writer_slot = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
            let writer = writer_slot.get_or_insert_with(|| {
                let (sender, receiver) = mpsc::channel(BACKLOG);
                let task = tokio::spawn(write_all(self.statuses.clone(), receiver));
                Writer { sender, task }
            });
            let sent = writer.sender.try_send(update);
            if matches!(sent, Err(mpsc::error::TrySendError::Closed(_))) {
                // The writer is gone (it never should be): start anew.
                *writer_slot = None;
            }
            sent
        };
        if let Err(err) = sent {
            let update = err.into_inner();
            let statuses = self.statuses.clone();
            tokio::spawn(async move {
                if let Err(err) = statuses.record_queued(&update).await {
                    tracing::warn!(error = %err, job_id = %update.status().job_id, "queued status not recorded");
                }
            });
        }
    }

    /// Writes what is still waiting (for up to two seconds), for a clean
    /// shutdown; a later [`QueuedWriter::record`] starts a new writer.
    pub async fn close(&self) {
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(Writer { sender, task }) = writer {
            drop(sender);
            if tokio::time::timeout(FLUSH, task).await.is_err() {
                tracing::warn!("queued statuses still unwritten at shutdown");
            }
        }
    }
}

/// Writes what arrives until every sender is gone.
async fn write_all(statuses: StatusStore, mut receiver: mpsc::Receiver<StatusUpdate>) {
    let mut batch = Vec::with_capacity(MOST);
    while receiver.recv_many(&mut batch, MOST).await > 0 {
        if let Err(err) = statuses.record_queued_all(&batch).await {
            tracing::warn!(error = %err, jobs = batch.len(), "queued statuses not recorded");
        }
        batch.clear();
    }
}
