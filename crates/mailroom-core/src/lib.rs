//! mailroom's shared core: what the producer, the worker and the binary all
//! stand on.
//!
//! - [`job`]: the job schema ([`job::SendJob`], [`job::EmailMessage`]).
//! - [`telemetry`]: logging, span export, trace context across the queue
//!   ([`telemetry::init`], [`telemetry::inject_context`],
//!   [`telemetry::extract_context`], [`telemetry::mask_email`]).

pub mod job;
pub mod telemetry;
