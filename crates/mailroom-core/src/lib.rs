//! mailroom's shared core: what the producer, the worker and the binary all
//! stand on.
//!
//! - [`job`]: the job schema ([`job::SendJob`], [`job::EmailMessage`]).

pub mod job;
