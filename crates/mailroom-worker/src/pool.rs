//! The pool: consumers for both lanes, bounded concurrency, reconnection,
//! and the drain on shutdown.
//!
//! **Lanes.** Each work queue (two a lane: jobs up to
//! `wire::LARGE_JOB_BYTES` sealed, and larger ones) has its own consumer
//! and channel prefetch; a large-job queue's is small
//! (`worker.large_prefetch`), since RabbitMQ counts prefetch only by
//! number and each of those deliveries may hold ~13 MiB. Every
//! delivery takes a permit of the pool's `concurrency`; a `bulk` delivery
//! must also take one of a smaller `bulk` allowance (three quarters of it),
//! so a newsletter backlog can never occupy the permits a password reset
//! needs: at least a quarter of the pool is always free for
//! `transactional`.
//!
//! **Bytes.** A delivery also takes its size (in KiB) of the pool's
//! `worker.max_inflight_bytes`, so a burst of large messages is worked a
//! few at a time; one larger than the whole budget takes all of it and
//! runs alone. Small jobs never notice: 64 of 2 KiB use 0.2 % of the
//! default.
//!
//! **Connection loss.** A consumer whose channel or connection dies starts
//! again on a fresh one after a jittered backoff; the broker requeues what
//! it had not seen acked, and the dedup claim keeps a job from being sent
//! twice when it comes back.
//!
//! **Shutdown.** On cancel the consumers are cancelled, in-flight jobs get
//! `worker.shutdown_grace` to finish, and whatever is left unacked returns
//! to the queue when the connection closes. The grace counts from the
//! cancel, and every wait on the broker is bounded: a broker that stopped
//! answering adds at most [`CONSUMER_CANCEL`] and [`CHANNEL_CLOSE`] to it.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder as _, ExponentialBuilder};
use futures_util::{FutureExt as _, StreamExt as _};
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, options::BasicCancelOptions};
use mailroom_core::amqp::Broker;
use mailroom_core::budget::{ByteBudget, Share};
use mailroom_core::job::Lane;
use mailroom_core::wire::{Topology, WorkQueue};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::acks::Acks;
use crate::incoming::Incoming;
use crate::metrics;
use crate::pipeline::{Disposition, Pipeline};

/// How the pool is sized.
#[derive(Clone, Copy, Debug)]
pub struct PoolSize {
    /// Jobs processed at once.
    pub concurrency: usize,
    /// Channel prefetch of the transactional lane.
    pub prefetch: u16,
    /// Channel prefetch of the transactional lane's large-job queue.
    pub large_prefetch: u16,
    /// Sealed bytes in work at once (see the module's doc).
    pub inflight_bytes: usize,
    /// Time in-flight jobs get on shutdown.
    pub grace: Duration,
}

/// Consumes both lanes through a pipeline until cancelled.
pub struct Pool {
    broker: Broker,
    pipeline: Arc<Pipeline>,
    size: PoolSize,
    all: Arc<Semaphore>,
    bulk: Arc<Semaphore>,
    bytes: ByteBudget,
    tracker: TaskTracker,
}

/// How a pool run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Drained {
    /// Whether every in-flight job finished within the grace period.
    pub clean: bool,
}

impl Pool {
    /// A pool consuming through `broker` into `pipeline`.
    pub fn new(broker: Broker, pipeline: Arc<Pipeline>, size: PoolSize) -> Self {
        let concurrency = size.concurrency.max(1);
        Self {
            broker,
            pipeline,
            size,
            all: Arc::new(Semaphore::new(concurrency)),
            bulk: Arc::new(Semaphore::new(bulk_share(concurrency))),
            bytes: ByteBudget::new(size.inflight_bytes),
            tracker: TaskTracker::new(),
        }
    }

    /// Runs until `shutdown` is cancelled, then drains.
    pub async fn run(self, shutdown: CancellationToken) -> Drained {
        let this = Arc::new(self);
        let consumers: Vec<_> = WorkQueue::ALL
            .into_iter()
            .map(|queue| tokio::spawn(Arc::clone(&this).consume(queue, shutdown.clone())))
            .collect();
        shutdown.cancelled().await;
        this.pipeline.stop_sending();
        let deadline = tokio::time::Instant::now() + this.size.grace;
        let mut channels = Vec::new();
        for consumer in consumers {
            match consumer.await {
                Ok(channel) => channels.extend(channel),
                Err(err) => {
                    tracing::error!(error = %err, "a work queue's consumer stopped abnormally");
                }
            }
        }
        this.tracker.close();
        let in_flight = this.tracker.len();
        tracing::info!(in_flight, grace = ?this.size.grace, "draining");
        let clean = tokio::time::timeout_at(deadline, this.tracker.wait())
            .await
            .is_ok();
        if !clean {
            tracing::warn!(
                left = this.tracker.len(),
                "grace period over: unfinished jobs return to the queue"
            );
        }
        // The channels' close puts the unfinished jobs back as they came:
        // a retry or dead letter they publish after it would be a copy.
        this.pipeline.forward.close();
        // Closed here, each waiting for its close-ok: a channel left to
        // close itself when dropped races the connection's close, and
        // lapin then logs a connection error on a clean stop.
        let closing = channels
            .iter()
            .map(|channel| channel.close(200, "worker stopping".into()));
        if tokio::time::timeout(CHANNEL_CLOSE, futures_util::future::join_all(closing))
            .await
            .is_err()
        {
            tracing::debug!("the broker did not answer the consumer channels' close");
        }
        Drained { clean }
    }

    /// Keeps one work queue consumed, starting again after a lost channel.
    /// Returns the channel open at shutdown.
    async fn consume(
        self: Arc<Self>,
        queue: WorkQueue,
        shutdown: CancellationToken,
    ) -> Option<Channel> {
        let reconnect = || {
            ExponentialBuilder::new()
                .with_min_delay(Duration::from_millis(200))
                .with_max_delay(Duration::from_secs(10))
                .with_jitter()
                .without_max_times()
                .build()
        };
        let mut delays = reconnect();
        while !shutdown.is_cancelled() {
            match self.consume_once(queue, &shutdown).await {
                Ok(Ended::Shutdown(channel)) => return channel,
                Ok(Ended::Consumed) => delays = reconnect(),
                Err(err) => {
                    tracing::warn!(queue = %queue.name(), error = %err, "consumer lost");
                    if is_not_found(err.as_ref()) {
                        // Deleted under the worker: declared again, it is
                        // consumed again.
                        let topology = Topology::standard();
                        let declare = self.broker.declare(&topology);
                        tokio::select! {
                            () = shutdown.cancelled() => return None,
                            declared = declare => if let Err(err) = declared {
                                tracing::warn!(error = %err, "the topology could not be declared again");
                            },
                        }
                    }
                }
            }
            let delay = delays.next().unwrap_or(Duration::from_secs(10));
            tokio::select! {
                () = shutdown.cancelled() => return None,
                () = tokio::time::sleep(delay) => {}
            }
        }
        None
    }

    async fn consume_once(
        &self,
        queue: WorkQueue,
        shutdown: &CancellationToken,
    ) -> Result<Ended, Box<dyn std::error::Error + Send + Sync>> {
        // Reconnecting can take a while with the broker down; a shutdown
        // does not wait for it.
        let channel = tokio::select! {
            biased;
            () = shutdown.cancelled() => return Ok(Ended::Shutdown(None)),
            channel = self.broker.channel() => channel?,
        };
        let lane = queue.lane;
        let transactional = if queue.large {
            self.size.large_prefetch
        } else {
            self.size.prefetch
        };
        let prefetch = match lane {
            Lane::Transactional => transactional,
            Lane::Bulk => {
                u16::try_from(bulk_share(usize::from(transactional))).unwrap_or(transactional)
            }
        };
        let setup = async {
            channel
                .basic_qos(prefetch.max(1), BasicQosOptions::default())
                .await?;
            channel
                .basic_consume(
                    queue.name().into(),
                    format!("{}/{}", self.pipeline.worker_id, queue.routing_key()).into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
        };
        // Nor for a broker slow to set the consumer up.
        let mut consumer = tokio::select! {
            biased;
            () = shutdown.cancelled() => return Ok(Ended::Shutdown(Some(channel.clone()))),
            consumer = setup => consumer?,
        };
        tracing::info!(queue = %queue.name(), prefetch, "consuming");
        // Stops the ack sender when this consumer ends, for whatever
        // reason; jobs still in work then ack at once.
        let closing = shutdown.child_token();
        let _closing = closing.clone().drop_guard();
        let acks = Acks::new(closing);
        // Tracked, so a shutdown waits for its last acks to go out before
        // the connection closes.
        self.tracker.spawn(Arc::clone(&acks).run());
        let mut received_any = false;
        loop {
            let next = tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    stop(&channel, consumer.tag()).await;
                    return Ok(Ended::Shutdown(Some(channel)));
                }
                next = consumer.next() => next,
            };
            let delivery = match next {
                Some(Ok(delivery)) => delivery,
                Some(Err(err)) => return Err(err.into()),
                None if received_any => return Ok(Ended::Consumed),
                None => return Err("consumer closed".into()),
            };
            received_any = true;
            // Registered before the wait, so no batched ack can reach past
            // it while it waits for a permit.
            acks.begin(delivery.delivery_tag);
            let permits = tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    requeue(&acks, delivery).await;
                    stop(&channel, consumer.tag()).await;
                    return Ok(Ended::Shutdown(Some(channel)));
                }
                permits = self.permits(lane, delivery.data.len()) => permits,
            };
            let Some(permits) = permits else {
                requeue(&acks, delivery).await;
                return Ok(Ended::Shutdown(Some(channel)));
            };
            let pipeline = Arc::clone(&self.pipeline);
            // Boxed: the pipeline's future is large, and tokio moves a
            // task's future several times as it spawns and ends it.
            self.tracker.spawn(Box::pin(handle(
                pipeline,
                delivery,
                permits,
                Arc::clone(&acks),
                channel.clone(),
            )));
        }
    }

    async fn permits(&self, lane: Lane, bytes: usize) -> Option<Permits> {
        let mut slots = Vec::with_capacity(2);
        if lane == Lane::Bulk {
            slots.push(Arc::clone(&self.bulk).acquire_owned().await.ok()?);
        }
        slots.push(Arc::clone(&self.all).acquire_owned().await.ok()?);
        let bytes = self.bytes.reserve(bytes).await;
        Some(Permits {
            _slots: slots,
            _bytes: bytes,
        })
    }
}

/// What a delivery holds while it is worked.
struct Permits {
    _slots: Vec<OwnedSemaphorePermit>,
    _bytes: Share,
}

/// Why a consumer loop returned without an error.
enum Ended {
    /// Shutdown was asked for; the consumer's channel, if it had one, is
    /// to be closed once the jobs still in work have acked on it.
    Shutdown(Option<Channel>),
    /// The broker cancelled the consumer after it had delivered (e.g. the
    /// queue was deleted); start again.
    Consumed,
}

/// How long closing the consumer channels may take at shutdown (they
/// close together).
const CHANNEL_CLOSE: Duration = Duration::from_secs(2);

/// How long a consumer's cancel may wait for the broker's answer at
/// shutdown; without one, closing its channel stops it all the same.
const CONSUMER_CANCEL: Duration = Duration::from_secs(2);

/// The share of the pool bulk may hold.
fn bulk_share(n: usize) -> usize {
    (n * 3 / 4).max(1)
}

async fn stop(channel: &Channel, tag: lapin::types::ShortString) {
    let cancel = channel.basic_cancel(tag, BasicCancelOptions::default());
    match tokio::time::timeout(CONSUMER_CANCEL, cancel).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => {
            tracing::debug!(error = %err, "consumer cancel failed; closing the channel requeues");
        }
        Err(_) => tracing::warn!("the broker did not answer the consumer's cancel"),
    }
}

async fn requeue(acks: &Acks, delivery: Delivery) {
    acks.settle(delivery.delivery_tag, delivery.acker, Disposition::Requeue)
        .await;
}

/// Runs one delivery and acks or requeues it. The channel is held so it
/// stays open until the ack is sent.
async fn handle(
    pipeline: Arc<Pipeline>,
    delivery: Delivery,
    _permits: Permits,
    acks: Arc<Acks>,
    _channel: Channel,
) {
    let _in_flight = metrics::InFlight::enter();
    let Delivery {
        delivery_tag,
        acker,
        properties,
        data,
        ..
    } = delivery;
    let incoming = Incoming::new(properties, data);
    let disposition = AssertUnwindSafe(pipeline.process(incoming))
        .catch_unwind()
        .await
        .unwrap_or_else(|_| {
            // Requeued, the broker's delivery limit dead-letters a job
            // that keeps doing this.
            tracing::error!("the pipeline panicked on a delivery: requeued");
            Disposition::Requeue
        });
    acks.settle(delivery_tag, acker, disposition).await;
}

/// Whether `err` is the broker's `NOT_FOUND` (a queue that does not exist).
fn is_not_found(err: &(dyn std::error::Error + 'static)) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    err.downcast_ref::<lapin::Error>().is_some_and(|err| {
        matches!(err.kind(), lapin::ErrorKind::ProtocolError(amqp)
            if *amqp.kind() == AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
    })
}

#[cfg(test)]
mod tests {
    use super::bulk_share;

    #[test]
    fn bulk_never_takes_the_whole_pool() {
        assert_eq!(bulk_share(64), 48);
        assert_eq!(bulk_share(4), 3);
        assert_eq!(bulk_share(1), 1);
    }
}
