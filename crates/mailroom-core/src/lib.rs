//! mailroom's shared core: what the producer, the worker and the binary all
//! stand on.
//!
//! - [`job`]: the job schema ([`job::SendJob`], [`job::EmailMessage`]).
//! - [`validate`]: the rules a job must pass, each failure with its field path.
//! - [`seal`]: authenticated encryption of jobs under a rotating keyring.
//! - [`wire`]: the RabbitMQ wire contract as data: names, headers, queue arguments, retry tiers.
//! - [`amqp`]: the broker plumbing both roles use: connect, reconnect, declare, confirmed publish.
//! - [`budget`]: bytes large messages may take in work at once (worker and API).
//! - [`offload`]: CPU-heavy steps on large messages, kept off the async threads' queues.
//! - [`ratelimit`]: fleet-wide GCRA rate limits in Redis, shared by the API and the worker.
//! - [`store`]: Redis as both roles use it, and keyed hashes of what must not be stored as given.
//! - [`status`]: what became of each job, kept in Redis for a retention window.
//! - [`settings`]: layered settings (defaults, `mailroom.toml`, `MAILROOM__*` environment), secrets redacted.
//! - [`telemetry`]: logging, span export, trace context across the queue
//!   ([`telemetry::init`], [`telemetry::inject_context`],
//!   [`telemetry::extract_context`], [`telemetry::mask_email`]).

pub mod amqp;
pub mod budget;
pub mod job;
pub mod listener;
pub mod offload;
pub mod ratelimit;
pub mod seal;
pub mod settings;
pub mod status;
pub mod store;
pub mod telemetry;
pub mod validate;
pub mod wire;
