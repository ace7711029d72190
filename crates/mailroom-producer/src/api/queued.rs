//! The `queued` status of accepted jobs, written off the request's path by
//! one task that pipelines whatever has piled up while its last write was
//! in flight: under load, one Redis round trip serves many requests.

use std::sync::OnceLock;

use mailroom_core::status::{StatusStore, StatusUpdate};
use tokio::sync::mpsc;

/// Statuses waiting to be written, at most; past that a request writes
/// its own.
const BACKLOG: usize = 4_096;

/// Statuses one write carries at most.
const MOST: usize = 256;

/// Writes `queued` statuses.
pub struct QueuedWriter {
    statuses: StatusStore,
    /// Started on first use, inside the runtime that serves requests.
    sender: OnceLock<mpsc::Sender<StatusUpdate>>,
}

impl QueuedWriter {
    /// Writes into `statuses`.
    pub fn new(statuses: StatusStore) -> Self {
        Self {
            statuses,
            sender: OnceLock::new(),
        }
    }

    /// Records `update` soon. It is informative only, so nobody waits for
    /// it: the job is enqueued whatever happens here, and a worker that was
    /// quicker is never overwritten.
    pub fn record(&self, update: StatusUpdate) {
        let sender = self.sender.get_or_init(|| {
            let (sender, receiver) = mpsc::channel(BACKLOG);
            tokio::spawn(write_all(self.statuses.clone(), receiver));
            sender
        });
        if let Err(err) = sender.try_send(update) {
            let update = err.into_inner();
            let statuses = self.statuses.clone();
            tokio::spawn(async move {
                if let Err(err) = statuses.record_queued(&update).await {
                    tracing::warn!(error = %err, job_id = %update.status().job_id, "queued status not recorded");
                }
            });
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
