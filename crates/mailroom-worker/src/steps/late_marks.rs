//! `sent` marks that Redis refused when the mail went (down, read-only,
//! out of memory, too slow), written again in the background until it
//! takes them.
//!
//! The delivery is acked meanwhile: sending again would be worse. But the
//! mark is what keeps a later copy of the job (the same idempotency key
//! enqueued again) from being sent once the claim's lease runs out, and
//! what turns its status from `sending` to `sent`; so it is written as
//! soon as Redis takes writes again, until the dedup window it would have
//! guarded has passed. The marks live in this process only: a worker
//! killed with some waiting loses them, and one that stops cleanly says
//! how many it could not write.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use mailroom_core::status::PreparedStatus;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::metrics;
use crate::steps::dedup::{ClaimToken, Dedup, MarkOutcome};

/// Marks kept waiting at most (a few hundred bytes each); past it the
/// oldest is given up, loudly.
const MOST: usize = 10_000;

/// The first wait before writing again, doubled after each failure up to
/// [`LONGEST_WAIT`]: short, because a copy of the job deferred while Redis
/// was away comes back within seconds of it.
const FIRST_WAIT: Duration = Duration::from_millis(250);
const LONGEST_WAIT: Duration = Duration::from_secs(2);

/// One mark to write.
struct Late {
    token: ClaimToken,
    sent: Option<PreparedStatus>,
    hand_over: bool,
    /// When the dedup window it guards has passed: no use writing it then.
    moot_at: Instant,
}

/// The marks waiting, and the task writing them (started with the first).
pub struct LateMarks {
    dedup: Dedup,
    writer: Mutex<Option<Writer>>,
    waiting: Arc<AtomicUsize>,
}

struct Writer {
    sender: mpsc::UnboundedSender<Late>,
    task: JoinHandle<()>,
}

impl LateMarks {
    /// Marks written through `dedup`, each for as long as its dedup
    /// window lasts from when it is handed over.
    pub fn new(dedup: Dedup) -> Self {
        Self {
            dedup,
            writer: Mutex::new(None),
            waiting: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Writes the `sent` mark of `token` (and the `sent` status) once Redis
    /// takes it.
    pub fn hand(&self, token: ClaimToken, sent: Option<PreparedStatus>, hand_over: bool) {
        let late = Late {
            token,
            sent,
            hand_over,
            moot_at: Instant::now() + self.dedup.window(),
        };
        let mut writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let writer = writer.get_or_insert_with(|| {
            let (sender, receiver) = mpsc::unbounded_channel();
            let task = tokio::spawn(write(
                self.dedup.clone(),
                receiver,
                Arc::clone(&self.waiting),
            ));
            Writer { sender, task }
        });
        self.waiting.fetch_add(1, Ordering::Relaxed);
        metrics::late_marks(self.waiting.load(Ordering::Relaxed));
        if writer.sender.send(late).is_err() {
            // Only after `close`, when no delivery is left to hand one.
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            tracing::error!("sent, but not marked sent in Redis: the worker is stopping");
        }
    }

    /// Marks still waiting.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Gives the marks still waiting up to `within` to be written, then
    /// says how many were not.
    pub async fn close(&self, within: Duration) {
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(Writer { sender, mut task }) = writer else {
            return;
        };
        drop(sender);
        if tokio::time::timeout(within, &mut task).await.is_err() {
            task.abort();
        }
        let left = self.waiting();
        if left > 0 {
            tracing::error!(
                left,
                "stopped with sent marks Redis did not take: a copy of those jobs enqueued again may be sent again"
            );
        }
    }
}

/// Writes what comes through `receiver`, oldest first, waiting longer
/// between tries while Redis refuses; ends once `receiver` is closed and
/// nothing is left.
async fn write(dedup: Dedup, mut receiver: mpsc::UnboundedReceiver<Late>, count: Arc<AtomicUsize>) {
    let mut waiting: VecDeque<Late> = VecDeque::new();
    let mut open = true;
    let mut wait = FIRST_WAIT;
    let mut next_try = Instant::now();
    loop {
        tokio::select! {
            biased;
            late = receiver.recv(), if open => {
                if let Some(late) = late {
                    if waiting.is_empty() {
                        next_try = Instant::now() + FIRST_WAIT;
                    }
                    waiting.push_back(late);
                    if waiting.len() > MOST {
                        waiting.pop_front();
                        count.fetch_sub(1, Ordering::Relaxed);
                        tracing::error!(
                            most = MOST,
                            "too many sent marks waiting for Redis: the oldest given up"
                        );
                    }
                } else {
                    // Stopping: one more try at once.
                    open = false;
                    next_try = Instant::now();
                }
                continue;
            }
            () = tokio::time::sleep_until(next_try), if !waiting.is_empty() => {}
            else => return,
        }
        while let Some(late) = waiting.front() {
            if late.moot_at > Instant::now() {
                match dedup
                    .mark_sent(&late.token, late.sent.as_ref(), late.hand_over)
                    .await
                {
                    Ok(MarkOutcome::Marked | MarkOutcome::LeaseLost) => {
                        tracing::info!("sent mark written late");
                    }
                    Ok(MarkOutcome::AlreadySent) => {}
                    Err(_) => break,
                }
            }
            waiting.pop_front();
            count.fetch_sub(1, Ordering::Relaxed);
        }
        metrics::late_marks(count.load(Ordering::Relaxed));
        if waiting.is_empty() {
            wait = FIRST_WAIT;
        } else {
            next_try = Instant::now() + wait;
            wait = (wait * 2).min(LONGEST_WAIT);
        }
    }
}
