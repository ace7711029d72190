//! mailroom's producer: turns requests into sealed jobs on the queue.
//!
//! [`Producer`] validates a job with core's rules, seals it under the
//! active key, and publishes it persistent and `mandatory` to
//! `mailroom.jobs` with the headers of the wire contract. A job id is
//! returned only once the broker confirmed the message; a nack, a return,
//! a timeout or a lost connection is an [`EnqueueError`].
//!
//! [`api`] is the HTTP API on top of it.

mod ahead;
pub mod api;
mod enqueue;
mod error;

pub use ahead::seal_ahead;
pub use enqueue::{Checked, Producer, ReadyJob, prepare};
pub use error::{EnqueueError, ProducerError};
