//! Declaring the wire contract's topology, idempotently.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, ExchangeKind};

use super::error::{Refusal, refusal};
use super::{AmqpError, Broker};
use crate::wire::Topology;

impl Broker {
    /// Declares every exchange, queue and binding of `topology`. Declaring
    /// what exists with the same arguments is a no-op; a queue that exists
    /// with other arguments is [`AmqpError::QueueMismatch`].
    pub async fn declare(&self, topology: &Topology) -> Result<(), AmqpError> {
        // A refused declaration closes its channel: use one of our own.
        let channel = self.channel().await?;
        let result = declare_on(&channel, topology).await;
        if channel.status().connected() {
            let _ = channel.close(200, "declared".into()).await;
        }
        result
    }
}

async fn declare_on(channel: &Channel, topology: &Topology) -> Result<(), AmqpError> {
    let broker = |err: lapin::Error| AmqpError::Broker(err.to_string());
    for exchange in &topology.exchanges {
        channel
            .exchange_declare(
                (*exchange).into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(broker)?;
    }
    for queue in &topology.queues {
        channel
            .queue_declare(
                queue.name.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                queue.argument_table(),
            )
            .await
            .map_err(|err| match refusal(&err) {
                Refusal::PreconditionFailed(detail) => AmqpError::QueueMismatch {
                    queue: queue.name.clone(),
                    detail,
                },
                _ => broker(err),
            })?;
        if let Some((exchange, key)) = &queue.binding {
            channel
                .queue_bind(
                    queue.name.as_str().into(),
                    (*exchange).into(),
                    key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(broker)?;
        }
    }
    Ok(())
}
