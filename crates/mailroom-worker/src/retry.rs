//! The backoff schedule of transient failures: how long to wait before the
//! next attempt, and when to stop trying.
//!
//! Delays come from `backon`'s exponential builder (the `backoff` crate is
//! unmaintained, RUSTSEC-2025-0012): `initial × multiplier^(n-1)`, capped at
//! `max_interval`, plus a random jitter of up to the same again, so a burst
//! of failures (a relay that was down for a minute) does not come back as a
//! burst. The wait itself happens in a broker retry tier, not in the worker:
//! the caller rounds the delay up to a tier with [`mailroom_core::wire::tier_for`].

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use mailroom_core::settings::RetrySettings;
use time::OffsetDateTime;

/// What to do after a transient failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NextStep {
    /// Try again after this delay.
    RetryAfter(Duration),
    /// Stop: the job is dead-lettered.
    GiveUp(GiveUpReason),
}

/// Why a job is not retried again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GiveUpReason {
    /// `worker.retry.max_attempts` attempts were made.
    Attempts,
    /// The next attempt would start after `worker.retry.max_age`.
    Age,
}

impl GiveUpReason {
    /// The dead-letter reason recorded for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Attempts => "max-attempts",
            Self::Age => "max-age",
        }
    }
}

/// The schedule, built once from `[worker.retry]`.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    settings: RetrySettings,
}

impl RetryPolicy {
    /// A policy following `settings`.
    pub fn new(settings: RetrySettings) -> Self {
        Self { settings }
    }

    /// Attempts allowed in all, the first included.
    pub fn max_attempts(&self) -> u32 {
        self.settings.max_attempts
    }

    /// How long after its creation a job may still be tried.
    pub fn max_age(&self) -> Duration {
        self.settings.max_age
    }

    /// The delay before attempt `attempt + 1`, `attempt` (from 1) being the
    /// attempt that just failed.
    pub fn delay(&self, attempt: u32) -> Duration {
        let steps = usize::try_from(attempt.max(1)).unwrap_or(usize::MAX);
        ExponentialBuilder::new()
            .with_min_delay(self.settings.initial)
            .with_factor(self.settings.multiplier.max(1.0))
            .with_max_delay(self.settings.max_interval)
            .with_max_times(steps)
            .with_jitter()
            .build()
            .nth(steps - 1)
            .unwrap_or(self.settings.max_interval)
    }

    /// What follows the failure of attempt `attempt` of a job created at
    /// `created_at`, the time now being `now`.
    pub fn next(&self, attempt: u32, created_at: OffsetDateTime, now: OffsetDateTime) -> NextStep {
        if attempt >= self.settings.max_attempts {
            return NextStep::GiveUp(GiveUpReason::Attempts);
        }
        let delay = self.delay(attempt);
        // The check step turns away a job whose deadline is past what a
        // date can hold; were one to come this far, no attempt is too late
        // for a deadline that far off.
        let Some(deadline) = later_by(created_at, self.settings.max_age) else {
            return NextStep::RetryAfter(delay);
        };
        match later_by(now, delay) {
            Some(next) if next <= deadline => NextStep::RetryAfter(delay),
            _ => NextStep::GiveUp(GiveUpReason::Age),
        }
    }
}

/// `at` plus `duration`, or `None` past the last date `time` can hold.
pub(crate) fn later_by(at: OffsetDateTime, duration: Duration) -> Option<OffsetDateTime> {
    at.checked_add(time::Duration::try_from(duration).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy::new(RetrySettings {
            initial: Duration::from_secs(5),
            multiplier: 3.0,
            max_interval: Duration::from_hours(1),
            max_attempts: 8,
            max_age: Duration::from_hours(24),
        })
    }

    #[test]
    fn delays_grow_exponentially_within_their_jitter() {
        let policy = policy();
        for (attempt, base) in [(1, 5), (2, 15), (3, 45), (4, 135)] {
            for _ in 0..50 {
                let delay = policy.delay(attempt);
                assert!(
                    delay >= Duration::from_secs(base) && delay <= Duration::from_secs(2 * base),
                    "attempt {attempt}: {delay:?} outside [{base}s, {}s]",
                    2 * base
                );
            }
        }
    }

    #[test]
    fn delays_stop_growing_at_the_max_interval() {
        let policy = policy();
        let delay = policy.delay(20);
        assert!(
            delay >= Duration::from_hours(1) && delay <= Duration::from_hours(2),
            "{delay:?}"
        );
    }

    #[test]
    fn jitter_spreads_the_delays() {
        let policy = policy();
        let delays: std::collections::BTreeSet<_> = (0..20).map(|_| policy.delay(3)).collect();
        assert!(delays.len() > 1, "20 delays were all {delays:?}");
    }

    #[test]
    fn gives_up_after_max_attempts() {
        let now = OffsetDateTime::now_utc();
        let policy = policy();
        assert!(matches!(policy.next(7, now, now), NextStep::RetryAfter(_)));
        assert_eq!(
            policy.next(8, now, now),
            NextStep::GiveUp(GiveUpReason::Attempts)
        );
    }

    #[test]
    fn gives_up_when_the_next_attempt_would_be_too_old() {
        let now = OffsetDateTime::now_utc();
        let created = now - Duration::from_hours(24) + Duration::from_secs(3);
        assert_eq!(
            policy().next(1, created, now),
            NextStep::GiveUp(GiveUpReason::Age)
        );
        let young = now - Duration::from_hours(1);
        assert!(matches!(
            policy().next(1, young, now),
            NextStep::RetryAfter(_)
        ));
    }

    #[test]
    fn a_deadline_past_the_last_date_does_not_overflow() {
        let last = time::PrimitiveDateTime::MAX.assume_utc();
        assert_eq!(later_by(last, Duration::from_secs(1)), None);
        assert_eq!(later_by(last, Duration::MAX), None);
        let now = OffsetDateTime::now_utc();
        assert!(matches!(
            policy().next(1, last, now),
            NextStep::RetryAfter(_)
        ));
        let mut endless = policy();
        endless.settings.max_age = Duration::MAX;
        assert!(matches!(endless.next(1, now, now), NextStep::RetryAfter(_)));
    }
}
