//! mailroom's shared core: what the producer, the worker and the binary all
//! stand on.
//!
//! - [`job`]: the job schema ([`job::SendJob`], [`job::EmailMessage`]).
//! - [`validate`]: the rules a job must pass, each failure with its field path.

pub mod job;
pub mod validate;
