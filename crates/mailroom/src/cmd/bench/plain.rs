//! Plain lapin, nothing of mailroom's: the broker's ceiling on this
//! machine, publishing with confirms and consuming with acks.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use mailroom_core::job::Lane;
use mailroom_core::wire::{Topology, work_queue};

use super::measure::Run;

/// Where and how a plain run publishes.
pub struct Shape {
    /// Printed name of the run.
    pub label: &'static str,
    /// Exchange (`""`: the default exchange).
    pub exchange: &'static str,
    /// Routing key.
    pub routing_key: &'static str,
    /// Properties and headers of every message.
    pub properties: BasicProperties,
}

/// Queue of the plain runs, declared like a work queue.
pub const PLAIN_QUEUE: &str = "mailroom.bench.plain";

/// A plain connection with a pool of confirm channels.
pub struct Plain {
    connection: Connection,
    pool: Vec<Channel>,
}

impl Plain {
    /// Connects and declares [`PLAIN_QUEUE`] (empty).
    pub async fn open(url: &str, channels: usize) -> anyhow::Result<Self> {
        let connection = Connection::connect(url, ConnectionProperties::default()).await?;
        let mut pool = Vec::new();
        for _ in 0..channels.max(1) {
            let channel = connection.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            pool.push(channel);
        }
        let spec = Topology::standard()
            .queues
            .into_iter()
            .find(|spec| spec.name == work_queue(Lane::Transactional))
            .context("topology has no transactional queue")?;
        pool[0]
            .queue_declare(
                PLAIN_QUEUE.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                spec.argument_table(),
            )
            .await?;
        pool[0]
            .queue_purge(PLAIN_QUEUE.into(), QueuePurgeOptions::default())
            .await?;
        Ok(Self { connection, pool })
    }

    /// Publishes `count` bodies of `body_len` bytes as `shape` says, keeping
    /// `window` unconfirmed.
    pub async fn publish(
        &self,
        shape: &Shape,
        body_len: usize,
        count: usize,
        window: usize,
    ) -> anyhow::Result<Run> {
        let body = vec![b'x'; body_len];
        let next = AtomicUsize::new(0);
        let started = Instant::now();
        let results: Vec<anyhow::Result<Duration>> = futures_util::stream::iter(0..count)
            .map(|_| {
                let channel = &self.pool[next.fetch_add(1, Ordering::Relaxed) % self.pool.len()];
                let body = &body;
                async move {
                    let start = Instant::now();
                    let confirm = channel
                        .basic_publish(
                            shape.exchange.into(),
                            shape.routing_key.into(),
                            BasicPublishOptions {
                                mandatory: true,
                                ..BasicPublishOptions::default()
                            },
                            body,
                            shape.properties.clone(),
                        )
                        .await?
                        .await?;
                    anyhow::ensure!(
                        matches!(confirm, lapin::Confirmation::Ack(None)),
                        "plain publish not acked"
                    );
                    Ok(start.elapsed())
                }
            })
            .buffer_unordered(window.max(1))
            .collect()
            .await;
        Ok(Run::new(
            shape.label,
            results.into_iter().collect::<Result<_, _>>()?,
            started.elapsed(),
        ))
    }

    /// Consumes `count` messages from [`PLAIN_QUEUE`] with `prefetch`,
    /// acking every `ack_every`-th with `multiple` (1: each on its own).
    pub async fn consume(
        &self,
        label: &'static str,
        count: usize,
        prefetch: u16,
        ack_every: usize,
    ) -> anyhow::Result<Run> {
        let channel = self.connection.create_channel().await?;
        channel
            .basic_qos(prefetch.max(1), BasicQosOptions::default())
            .await?;
        let mut consumer = channel
            .basic_consume(
                PLAIN_QUEUE.into(),
                "bench".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let started = Instant::now();
        let mut seen = 0;
        while seen < count {
            let delivery = consumer.next().await.context("consumer ended early")??;
            seen += 1;
            if seen % ack_every.max(1) == 0 || seen == count {
                let multiple = ack_every > 1;
                delivery.ack(BasicAckOptions { multiple }).await?;
            }
        }
        let elapsed = started.elapsed();
        let _ = channel.close(200, "bench done".into()).await;
        Ok(Run::counted(label, seen, elapsed))
    }

    /// Deletes [`PLAIN_QUEUE`] and closes.
    pub async fn close(self) -> anyhow::Result<()> {
        self.pool[0]
            .queue_delete(PLAIN_QUEUE.into(), QueueDeleteOptions::default())
            .await?;
        let _ = self.connection.close(200, "bench done".into()).await;
        Ok(())
    }
}
