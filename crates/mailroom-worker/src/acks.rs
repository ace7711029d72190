//! Acknowledging a channel's deliveries in batches.
//!
//! A `basic.ack` a message costs the broker more than the delivery itself
//! (on a quorum queue every ack is a log entry): one ack with `multiple`
//! set for a run of settled deliveries is most of the broker's work saved.
//! Jobs finish out of order, so a multiple ack may only reach up to the
//! oldest delivery still being processed; deliveries settled behind a slow
//! one are acked one by one once they have waited [`HOLD`], so a stuck job
//! never holds the prefetch window hostage.
//!
//! An ack waits at most [`LINGER`] (plus [`HOLD`] behind a slow job). It is
//! sent only after the outcome is durable, as before; a crash before it is
//! sent means a redelivery, which the dedup claim absorbs. Requeues are
//! sent at once. Once the consumer stops, everything settled is acked
//! without waiting.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use lapin::Acker;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::pipeline::Disposition;

/// How long a settled delivery waits for others to share its ack.
pub const LINGER: Duration = Duration::from_millis(2);

/// How long a settled delivery waits behind an older one still in work
/// before it is acked on its own.
pub const HOLD: Duration = Duration::from_millis(50);

/// The acks of one channel.
pub struct Acks {
    state: Mutex<Pending<Acker>>,
    /// Held while a batch is taken and sent: a multiple ack that reached
    /// the broker after a later one would name a tag already acked, which
    /// closes the channel.
    sending: tokio::sync::Mutex<()>,
    wake: Notify,
    closing: CancellationToken,
}

impl Acks {
    /// Acks for a channel whose consumer stops when `closing` is cancelled;
    /// [`Acks::run`] must be spawned to send them.
    pub fn new(closing: CancellationToken) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(Pending::default()),
            sending: tokio::sync::Mutex::new(()),
            wake: Notify::new(),
            closing,
        })
    }

    /// `tag` was delivered and is being processed.
    pub fn begin(&self, tag: u64) {
        self.lock().begin(tag);
    }

    /// `tag`'s outcome is durable: ack it (soon) or requeue it (now).
    pub async fn settle(&self, tag: u64, acker: Acker, disposition: Disposition) {
        match disposition {
            Disposition::Ack => {
                self.lock().done(tag, acker, Instant::now());
                if self.closing.is_cancelled() {
                    let _held = self.flush().await;
                } else {
                    self.wake.notify_one();
                }
            }
            Disposition::Requeue => {
                // Under the send lock, so no multiple ack taken after `tag`
                // left the work set reaches the broker before this nack:
                // it would ack the job instead of requeueing it.
                let _sending = self.sending.lock().await;
                self.lock().abandon(tag);
                let options = BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                };
                if let Err(err) = acker.nack(options).await {
                    tracing::warn!(error = %err, "requeue not sent: the broker will redeliver");
                }
            }
        }
    }

    /// Sends acks as deliveries settle, until the consumer stops; then
    /// sends what is left.
    pub async fn run(self: Arc<Self>) {
        loop {
            // Deliveries held behind a job in work are looked at again
            // after `HOLD`, even if nothing else settles meanwhile.
            let held = self.flush().await;
            tokio::select! {
                () = self.wake.notified() => tokio::time::sleep(LINGER).await,
                () = tokio::time::sleep(HOLD), if held => {}
                () = self.closing.cancelled() => break,
            }
        }
        self.flush().await;
    }

    /// Sends what may be acked now; `true` if settled deliveries are
    /// still held.
    async fn flush(&self) -> bool {
        let _sending = self.sending.lock().await;
        let wait = if self.closing.is_cancelled() {
            Duration::ZERO
        } else {
            HOLD
        };
        let (Batch { multiple, single }, held) = {
            let mut pending = self.lock();
            let batch = pending.take(Instant::now(), wait);
            (batch, !pending.settled.is_empty())
        };
        let multiple = multiple
            .map(|acker| async move { acker.ack(BasicAckOptions { multiple: true }).await });
        let single = single
            .into_iter()
            .map(|acker| async move { acker.ack(BasicAckOptions::default()).await });
        let results = futures_util::join!(join_all(multiple), join_all(single));
        for result in results.0.into_iter().chain(results.1) {
            if let Err(err) = result {
                tracing::warn!(error = %err, "ack not sent: the broker will redeliver, dedup absorbs it");
            }
        }
        held
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending<Acker>> {
        // The state is a pair of sets, valid after any panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Deliveries in work and settled ones not yet acked, by tag.
#[derive(Debug)]
struct Pending<A> {
    in_work: BTreeSet<u64>,
    settled: BTreeMap<u64, (A, Instant)>,
}

impl<A> Default for Pending<A> {
    fn default() -> Self {
        Self {
            in_work: BTreeSet::new(),
            settled: BTreeMap::new(),
        }
    }
}

/// What one flush sends.
#[derive(Debug)]
struct Batch<A> {
    /// Acked with `multiple`: it and every settled delivery before it.
    multiple: Option<A>,
    /// Acked alone: settled behind a delivery still in work.
    single: Vec<A>,
}

impl<A> Pending<A> {
    fn begin(&mut self, tag: u64) {
        self.in_work.insert(tag);
    }

    fn done(&mut self, tag: u64, acker: A, at: Instant) {
        self.in_work.remove(&tag);
        self.settled.insert(tag, (acker, at));
    }

    fn abandon(&mut self, tag: u64) {
        self.in_work.remove(&tag);
    }

    /// Everything settled before the oldest delivery in work goes in one
    /// multiple ack; of the rest, what has waited `hold` goes alone.
    fn take(&mut self, now: Instant, hold: Duration) -> Batch<A> {
        let behind = match self.in_work.first() {
            Some(&oldest) => self.settled.split_off(&oldest),
            None => BTreeMap::new(),
        };
        let multiple = std::mem::replace(&mut self.settled, behind)
            .into_values()
            .next_back()
            .map(|(acker, _)| acker);
        let (single, young): (Vec<_>, Vec<_>) = std::mem::take(&mut self.settled)
            .into_iter()
            .partition(|(_, (_, at))| now.duration_since(*at) >= hold);
        self.settled = young.into_iter().collect();
        Batch {
            multiple,
            single: single.into_iter().map(|(_, (acker, _))| acker).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(in_work: &[u64], settled: &[(u64, Instant)]) -> Pending<u64> {
        let mut pending = Pending::default();
        for &tag in in_work.iter().chain(settled.iter().map(|(tag, _)| tag)) {
            pending.begin(tag);
        }
        for &(tag, at) in settled {
            pending.done(tag, tag, at);
        }
        pending
    }

    #[test]
    fn a_settled_run_is_one_multiple_ack() {
        let now = Instant::now();
        let mut pending = pending(&[], &[(1, now), (2, now), (3, now)]);
        let batch = pending.take(now, HOLD);
        assert_eq!(batch.multiple, Some(3));
        assert!(batch.single.is_empty());
        assert!(pending.settled.is_empty());
    }

    #[test]
    fn a_multiple_ack_stops_before_the_oldest_job_in_work() {
        let now = Instant::now();
        let mut pending = pending(&[3], &[(1, now), (2, now), (4, now), (5, now)]);
        let batch = pending.take(now, HOLD);
        assert_eq!(batch.multiple, Some(2));
        assert!(batch.single.is_empty(), "4 and 5 wait for 3");
        assert_eq!(pending.settled.keys().copied().collect::<Vec<_>>(), [4, 5]);

        pending.done(3, 3, now);
        let batch = pending.take(now, HOLD);
        assert_eq!(batch.multiple, Some(5));
        assert!(pending.settled.is_empty());
    }

    #[test]
    fn a_slow_job_does_not_hold_the_others_past_hold() {
        let long_ago = Instant::now();
        let now = long_ago + HOLD;
        let mut pending = pending(&[1], &[(2, long_ago), (3, now)]);
        let batch = pending.take(now, HOLD);
        assert_eq!(batch.multiple, None);
        assert_eq!(batch.single, [2]);
        assert_eq!(pending.settled.keys().copied().collect::<Vec<_>>(), [3]);
    }

    #[test]
    fn on_closing_nothing_waits() {
        let now = Instant::now();
        let mut pending = pending(&[1], &[(2, now), (3, now)]);
        let batch = pending.take(now, Duration::ZERO);
        assert_eq!(batch.single, [2, 3]);
        assert!(pending.settled.is_empty());
    }

    #[test]
    fn a_requeued_job_no_longer_blocks() {
        let now = Instant::now();
        let mut pending = pending(&[1], &[(2, now)]);
        pending.abandon(1);
        assert_eq!(pending.take(now, HOLD).multiple, Some(2));
    }
}
