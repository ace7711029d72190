//! mailroom's worker: consumes sealed jobs and delivers them, exactly once
//! in effect.
//!
//! A [`Worker`] runs a pool ([`pool`]) that takes each delivery through the
//! steps of [`pipeline`]: open the seal, check it, claim its dedup key in
//! Redis, send it over the [`transport`], and make the outcome durable
//! (mark sent, schedule a retry through a delay tier, or dead-letter it)
//! before the delivery is acked. [`dlq`] lists and replays dead letters.

pub mod acks;
pub mod dlq;
pub mod forward;
pub mod health;
pub mod incoming;
pub mod message;
pub mod metrics;
pub mod pipeline;
pub mod pool;
pub mod retry;
pub mod steps;
pub mod transport;
pub mod verdict;
mod worker;

pub use worker::{Worker, WorkerError};
