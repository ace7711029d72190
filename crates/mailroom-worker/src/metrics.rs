//! The worker's Prometheus metrics, named once here so the pipeline and the
//! dashboards agree.
//!
//! Recorded through the `metrics` facade; `mailroom_core::telemetry::prometheus`
//! installs the recorder that `/metrics` renders. Labels never carry a
//! tenant, recipient or job id: they would be personal data and would make
//! the series count unbounded.

use std::time::Duration;

use mailroom_core::wire::RETRY_TIERS;
use metrics::{counter, gauge, histogram};

use crate::verdict::DeadReason;

/// Jobs finished, by outcome (`sent`, `retry`, `deferred`, `duplicate`, `dead`).
pub const JOBS: &str = "mailroom_jobs_total";
/// Seconds from `created_at` to the relay's acceptance.
pub const END_TO_END: &str = "mailroom_end_to_end_seconds";
/// Seconds one SMTP transaction took.
pub const SMTP: &str = "mailroom_smtp_seconds";
/// Retries scheduled, by tier.
pub const RETRIES: &str = "mailroom_retries_total";
/// Dead letters, by reason.
pub const DEAD_LETTERS: &str = "mailroom_dead_letters_total";
/// Deliveries being processed now.
pub const IN_FLIGHT: &str = "mailroom_in_flight";
/// Sent jobs whose `sent` mark Redis has not taken yet (see
/// `steps::late_marks`).
pub const LATE_MARKS: &str = "mailroom_sent_marks_waiting";

/// Outcomes [`job`] counts.
const OUTCOMES: [&str; 5] = ["sent", "retry", "deferred", "duplicate", "dead"];

/// Puts every counter's series, each outcome, tier and reason, at zero, so
/// each exists from the start: Prometheus' `increase()` needs a sample
/// before the first event, or the first dead letter after a restart
/// raises no alert.
pub fn register() {
    for outcome in OUTCOMES {
        counter!(JOBS, "outcome" => outcome).increment(0);
    }
    for tier in &RETRY_TIERS {
        counter!(RETRIES, "tier" => tier.name).increment(0);
    }
    for reason in DeadReason::ALL {
        counter!(DEAD_LETTERS, "reason" => reason.as_str()).increment(0);
    }
    gauge!(IN_FLIGHT).increment(0.0);
    gauge!(LATE_MARKS).set(0.0);
}

/// Sets how many `sent` marks wait for Redis.
#[allow(clippy::cast_precision_loss)] // a count far below 2^52
pub fn late_marks(waiting: usize) {
    gauge!(LATE_MARKS).set(waiting as f64);
}

/// Counts a finished job.
pub fn job(outcome: &'static str) {
    debug_assert!(
        OUTCOMES.contains(&outcome),
        "unregistered outcome {outcome}"
    );
    counter!(JOBS, "outcome" => outcome).increment(1);
}

/// Records a delivered job's latencies.
pub fn delivered(end_to_end: Duration, smtp: Duration) {
    histogram!(END_TO_END).record(end_to_end.as_secs_f64());
    histogram!(SMTP).record(smtp.as_secs_f64());
}

/// Counts a retry through `tier`.
pub fn retry(tier: &'static str) {
    counter!(RETRIES, "tier" => tier).increment(1);
}

/// Counts a dead letter.
pub fn dead_letter(reason: &'static str) {
    counter!(DEAD_LETTERS, "reason" => reason).increment(1);
}

/// Tracks one delivery in flight for as long as the guard lives.
pub struct InFlight(());

impl InFlight {
    /// Counts a delivery in.
    pub fn enter() -> Self {
        gauge!(IN_FLIGHT).increment(1.0);
        Self(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        gauge!(IN_FLIGHT).decrement(1.0);
    }
}
