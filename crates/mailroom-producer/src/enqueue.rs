//! Validating, sealing and publishing jobs.

use std::sync::Arc;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use mailroom_core::amqp::{Broker, Outgoing};
use mailroom_core::job::{JobId, JobRequest, SendJob};
use mailroom_core::offload;
use mailroom_core::seal::Keyring;
use mailroom_core::settings::Settings;
use mailroom_core::telemetry::inject_span;
use mailroom_core::validate::{
    Limits, ValidationErrors, validate_job, validate_request, validate_tenant,
};
use mailroom_core::wire::{CONTENT_TYPE, JOBS_EXCHANGE, PERSISTENT, Topology, WorkQueue, headers};
use time::OffsetDateTime;
use tracing::Instrument as _;

use crate::ahead::seal_ahead;
use crate::{EnqueueError, ProducerError};

/// Publishes jobs. Cheap to clone; share one per process.
#[derive(Clone)]
pub struct Producer {
    inner: Arc<Inner>,
}

struct Inner {
    broker: Broker,
    keyring: Keyring,
    limits: Limits,
}

/// A job sealed and addressed by [`Producer::seal`], for
/// [`Producer::publish`].
pub struct ReadyJob {
    id: JobId,
    span: tracing::Span,
    outgoing: Outgoing,
}

impl ReadyJob {
    /// Size of the sealed body in bytes.
    pub fn bytes(&self) -> usize {
        self.outgoing.body.len()
    }
}

impl std::fmt::Debug for ReadyJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the body: even sealed, kilobytes of it say nothing here.
        f.debug_struct("ReadyJob")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// A job that passed validation, so [`Producer::enqueue_checked`] need not
/// check it again. Made only by [`prepare`].
#[derive(Clone, Debug)]
pub struct Checked(SendJob);

impl Checked {
    /// The job.
    pub fn job(&self) -> &SendJob {
        &self.0
    }

    /// The job, to own.
    pub fn into_job(self) -> SendJob {
        self.0
    }
}

/// Turns a caller's request into a job for `tenant` (unless the request
/// names one), checked against `limits`. Every problem is reported at
/// once; nothing is published.
pub fn prepare(
    request: JobRequest,
    tenant: &str,
    limits: &Limits,
) -> Result<Checked, ValidationErrors> {
    offload::heavy(request.message.size(), || {
        validate_request(&request, limits, OffsetDateTime::now_utc())
    })?;
    let tenant = request.tenant.clone().unwrap_or_else(|| tenant.to_owned());
    // The request's own tenant was checked with it; a given one is checked
    // here. `validate_job` would check nothing else: the rest is the
    // request's, and the producer just set `schema` and `created_at`.
    if request.tenant.is_none() {
        validate_tenant(&tenant, limits)?;
    }
    Ok(Checked(SendJob::from_request(request, tenant)))
}

impl Producer {
    /// Connects to the broker named by `settings`, declares the topology,
    /// and loads the keyring.
    pub async fn connect(settings: &Settings) -> Result<Self, ProducerError> {
        let keyring = settings.keyring()?;
        let broker = Broker::connect_as(&settings.amqp, "mailroom-producer").await?;
        broker.declare(&Topology::standard()).await?;
        Ok(Self::from_parts(broker, keyring, settings.limits.clone()))
    }

    /// A producer over an existing broker connection (the topology is the
    /// caller's business).
    pub fn from_parts(broker: Broker, keyring: Keyring, limits: Limits) -> Self {
        Self {
            inner: Arc::new(Inner {
                broker,
                keyring,
                limits,
            }),
        }
    }

    /// [`prepare`] with this producer's limits.
    pub fn prepare(&self, request: JobRequest, tenant: &str) -> Result<Checked, ValidationErrors> {
        prepare(request, tenant, &self.inner.limits)
    }

    /// The broker connection.
    pub fn broker(&self) -> &Broker {
        &self.inner.broker
    }

    /// Validates, seals and publishes `job`; returns its id once the broker
    /// confirmed it.
    ///
    /// After the connection was lost, the call that finds out fails with a
    /// retryable error and a later one reconnects: a job is never reported
    /// enqueued when it was not, and an error may be retried as it is (the
    /// worker's dedup absorbs a job published twice).
    pub async fn enqueue(&self, job: SendJob) -> Result<JobId, EnqueueError> {
        let ready = self.check(job).and_then(|job| self.seal(job))?;
        self.publish(ready).await
    }

    /// [`Producer::enqueue`] for a job [`prepare`] checked already.
    pub async fn enqueue_checked(&self, job: Checked) -> Result<JobId, EnqueueError> {
        let ready = self.seal(job)?;
        self.publish(ready).await
    }

    /// Validates `job` against this producer's limits.
    pub fn check(&self, job: SendJob) -> Result<Checked, EnqueueError> {
        offload::heavy(job.message.size(), || {
            validate_job(&job, &self.inner.limits)
        })
        .map_err(EnqueueError::Invalid)?;
        Ok(Checked(job))
    }

    /// The first half of an enqueue, all CPU: seals `job` and makes its
    /// message, under a `mailroom.enqueue` span that [`Producer::publish`]
    /// continues. Apart so that a batch can be sealed first and then
    /// published back to back (see [`Producer::enqueue_many`]).
    pub fn seal(&self, job: Checked) -> Result<ReadyJob, EnqueueError> {
        let job = job.0;
        let span = tracing::debug_span!(
            "mailroom.enqueue",
            otel.kind = "producer",
            messaging.system = "rabbitmq",
            messaging.operation.type = "send",
            messaging.destination.name = JOBS_EXCHANGE,
            messaging.rabbitmq.destination.routing_key = tracing::field::Empty,
            messaging.message.id = %job.id,
        );
        let outgoing = span.in_scope(|| self.outgoing(&job))?;
        Ok(ReadyJob {
            id: job.id,
            span,
            outgoing,
        })
    }

    /// The message that carries `job`, sealed, with the wire contract's
    /// properties and headers and the current span's context.
    fn outgoing(&self, job: &SendJob) -> Result<Outgoing, EnqueueError> {
        let sealed = offload::heavy(job.message.size(), || self.inner.keyring.seal(job))?;
        let routing_key = WorkQueue::of(job.lane, sealed.body.len()).routing_key();
        tracing::Span::current().record("messaging.rabbitmq.destination.routing_key", routing_key);
        let mut table = FieldTable::default();
        table.insert(
            ShortString::from(headers::KID),
            AMQPValue::LongString(LongString::from(sealed.kid.as_bytes())),
        );
        table.insert(
            ShortString::from(headers::ATTEMPT),
            AMQPValue::LongLongInt(1),
        );
        table.insert(
            ShortString::from(headers::TENANT),
            AMQPValue::LongString(LongString::from(job.tenant.as_bytes())),
        );
        table.insert(
            ShortString::from(headers::LANE),
            AMQPValue::LongString(LongString::from(job.lane.as_str().as_bytes())),
        );
        inject_span(&tracing::Span::current(), &mut table);
        let properties = BasicProperties::default()
            .with_delivery_mode(PERSISTENT)
            .with_message_id(ShortString::from(job.id.to_string()))
            .with_content_type(ShortString::from(CONTENT_TYPE))
            .with_timestamp(u64::try_from(job.created_at.unix_timestamp()).unwrap_or(0))
            .with_headers(table);
        Ok(Outgoing {
            exchange: JOBS_EXCHANGE.to_owned(),
            routing_key: routing_key.to_owned(),
            body: sealed.body,
            properties,
            mandatory: true,
        })
    }

    /// The second half of an enqueue: publishes a sealed job and returns
    /// its id once the broker confirmed it (see [`Producer::enqueue`]).
    pub async fn publish(&self, ready: ReadyJob) -> Result<JobId, EnqueueError> {
        let ReadyJob { id, span, outgoing } = ready;
        self.inner.broker.publish(outgoing).instrument(span).await?;
        Ok(id)
    }

    /// Enqueues many jobs, keeping up to `amqp.publish_window` unconfirmed
    /// at once. One result a job, in order.
    pub async fn enqueue_many(&self, jobs: Vec<SendJob>) -> Vec<Result<JobId, EnqueueError>> {
        self.pipelined(jobs, |job| self.check(job)).await
    }

    /// [`Producer::enqueue_many`] for jobs [`prepare`] checked already.
    pub async fn enqueue_many_checked(
        &self,
        jobs: Vec<Checked>,
    ) -> Vec<Result<JobId, EnqueueError>> {
        self.pipelined(jobs, Ok).await
    }

    /// Checks and seals each job, and publishes it, up to
    /// `amqp.publish_window` unconfirmed at once, a few jobs sealed ahead
    /// of the window (see [`seal_ahead`]); the results in the jobs' order.
    async fn pipelined<T>(
        &self,
        jobs: Vec<T>,
        mut check: impl FnMut(T) -> Result<Checked, EnqueueError>,
    ) -> Vec<Result<JobId, EnqueueError>> {
        seal_ahead(
            jobs,
            self.inner.broker.publish_window(),
            |job| {
                let ready = check(job).and_then(|job| self.seal(job));
                let bytes = ready.as_ref().map_or(0, ReadyJob::bytes);
                (ready, bytes)
            },
            |ready| async move { self.publish(ready?).await },
        )
        .await
    }

    /// Closes the broker connection.
    pub async fn close(&self) {
        self.inner.broker.close().await;
    }
}
