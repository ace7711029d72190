//! A worker assembled from settings: broker, Redis, transport and the
//! pipeline, ready to run as a pool.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mailroom_core::amqp::{AmqpError, Broker};
use mailroom_core::settings::{Settings, SettingsError};
use mailroom_core::wire::Topology;
use tokio_util::sync::CancellationToken;

use crate::forward::Forwarder;
use crate::health;
use crate::pipeline::Pipeline;
use crate::pool::{Drained, Pool, PoolSize};
use crate::retry::RetryPolicy;
use crate::steps::dedup::Dedup;
use crate::transport::{Transport, TransportError};
use mailroom_core::status::StatusStore;
use mailroom_core::store::{RedisStore, StoreError};

/// Why a worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A setting is missing or wrong.
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// The broker could not be reached or set up.
    #[error(transparent)]
    Amqp(#[from] AmqpError),
    /// Redis could not be reached.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The transport could not be set up.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The health listener could not bind.
    #[error("health listener on {bind}: {source}")]
    Health {
        /// The address.
        bind: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// How long `sent` marks that Redis refused get at shutdown (see
/// [`LateMarks`](crate::steps::late_marks::LateMarks)).
const LATE_MARKS_AT_STOP: Duration = Duration::from_secs(3);

/// A connected worker.
pub struct Worker {
    broker: Broker,
    publisher: Broker,
    store: RedisStore,
    pipeline: Arc<Pipeline>,
    size: PoolSize,
    health_bind: SocketAddr,
}

impl Worker {
    /// Connects to the broker (declaring the topology), Redis and the
    /// transport named by `settings`.
    pub async fn connect(settings: &Settings) -> Result<Self, WorkerError> {
        let keyring = settings.keyring()?;
        let hash_key = settings.hash_key()?.to_vec();
        let broker = Broker::connect_as(&settings.amqp, "mailroom-worker").await?;
        broker.declare(&Topology::standard()).await?;
        // Retries and dead letters go out on a connection of their own: a
        // broker's memory or disk alarm blocks a connection that publishes,
        // reads included, and the consumers' acks must still get through.
        let publisher = Broker::connect_as(&settings.amqp, "mailroom-worker-republish").await?;
        let store = RedisStore::connect(&settings.redis).await?;
        store.check_setup().await?;
        let transport = Transport::from_settings(settings)?;
        let worker = &settings.worker;
        let pipeline = Pipeline::new(
            keyring,
            settings.limits.clone(),
            Dedup::new(
                store.clone(),
                &hash_key,
                worker.dedup_window,
                worker.dedup_lease,
            ),
            StatusStore::new(store.clone(), worker.status_retention),
            transport,
            RetryPolicy::new(worker.retry.clone()),
            worker.on_uncertain,
            Forwarder::new(publisher.clone()),
        );
        Ok(Self {
            broker,
            publisher,
            store,
            pipeline,
            size: PoolSize {
                concurrency: usize::from(worker.concurrency),
                prefetch: settings.worker_prefetch(),
                large_prefetch: settings.worker.large_prefetch,
                inflight_bytes: worker.max_inflight_bytes,
                grace: worker.shutdown_grace,
            },
            health_bind: worker.health_bind,
        })
    }

    /// Where mail goes, for the start-up line.
    pub fn describe_transport(&self) -> String {
        self.pipeline.transport().describe()
    }

    /// Serves `/healthz`, `/readyz` and `/metrics`: all of them until
    /// `stopped`, and `/readyz` says the worker is stopping once
    /// `stopping` is cancelled (the drain may take `worker.shutdown_grace`,
    /// during which a liveness probe and a scrape still get answers).
    pub async fn serve_health(
        &self,
        stopping: CancellationToken,
        stopped: CancellationToken,
    ) -> Result<SocketAddr, WorkerError> {
        // Installs the recorder, which must exist before the series are put in it.
        let recorder = mailroom_core::telemetry::prometheus();
        crate::metrics::register();
        let serve = health::Serve {
            bind: self.health_bind,
            stopping,
            stopped,
        };
        health::serve(
            serve,
            self.broker.clone(),
            self.publisher.clone(),
            self.store.clone(),
            recorder,
        )
        .await
        .map_err(|source| WorkerError::Health {
            bind: self.health_bind,
            source,
        })
    }

    /// Consumes until `shutdown` is cancelled, drains, and closes.
    pub async fn run(self, shutdown: CancellationToken) -> Drained {
        let drained = Pool::new(self.broker.clone(), Arc::clone(&self.pipeline), self.size)
            .run(shutdown)
            .await;
        self.pipeline.transport().shutdown().await;
        self.pipeline.late_marks.close(LATE_MARKS_AT_STOP).await;
        tokio::join!(self.broker.close(), self.publisher.close());
        drained
    }
}
