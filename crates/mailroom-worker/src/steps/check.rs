//! Step 3: validate the opened job again (a worker trusts no producer) and
//! check that it has not expired.

use std::time::Duration;

use mailroom_core::job::SendJob;
use mailroom_core::validate::{Limits, validate_job};
use time::OffsetDateTime;
use time::macros::datetime;

use crate::retry::later_by;
use crate::verdict::{DeadReason, Verdict};

/// The last instant a `Date` header can carry (four-digit years).
const LAST_DATE: OffsetDateTime = datetime!(9999-12-31 23:59:59.999_999_999 UTC);

/// Checks `job` at `now`; a job is tried until `max_age` after its
/// creation.
pub fn check(
    job: &SendJob,
    limits: &Limits,
    max_age: Duration,
    now: OffsetDateTime,
) -> Result<(), Verdict> {
    let invalid = |detail: &str| Verdict::DeadLetter {
        reason: DeadReason::Invalid,
        detail: detail.to_owned(),
    };
    if let Err(errors) = validate_job(job, limits) {
        // Field paths and rules only: a rule never quotes the value.
        return Err(invalid(&errors.to_string()));
    }
    // Past the claim, a panic would requeue the job with its claim held,
    // again and again: the `Date` header cannot be written before 1970 or
    // after 9999, nor can the retry deadline be computed past 9999.
    if job.created_at < OffsetDateTime::UNIX_EPOCH {
        return Err(invalid("created_at is before 1970"));
    }
    if later_by(job.created_at, max_age).is_none_or(|deadline| deadline > LAST_DATE) {
        return Err(invalid(
            "created_at is so late that created_at + worker.retry.max_age is past the year 9999",
        ));
    }
    if job.is_expired_at(now) {
        return Err(Verdict::DeadLetter {
            reason: DeadReason::Expired,
            detail: "expires_at passed before it could be sent".to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::build_message;
    use crate::retry::RetryPolicy;
    use crate::steps::tests::sample_job;
    use mailroom_core::settings::RetrySettings;

    const MAX_AGE: Duration = Duration::from_hours(24);

    #[test]
    fn a_valid_fresh_job_passes() {
        let job = sample_job();
        assert_eq!(
            check(&job, &Limits::default(), MAX_AGE, OffsetDateTime::now_utc()),
            Ok(())
        );
    }

    #[test]
    fn an_expired_job_is_not_sent() {
        let mut job = sample_job();
        job.expires_at = Some(job.created_at + time::Duration::seconds(1));
        let later = job.created_at + time::Duration::seconds(2);
        assert!(matches!(
            check(&job, &Limits::default(), MAX_AGE, later),
            Err(Verdict::DeadLetter {
                reason: DeadReason::Expired,
                ..
            })
        ));
    }

    #[test]
    fn an_invalid_job_is_dead_lettered_with_its_field() {
        let mut job = sample_job();
        job.message.to = vec!["not an address".to_owned()];
        let detail = invalid_detail(&job, MAX_AGE);
        assert!(detail.contains("message.to[0]"), "{detail}");
        assert!(!detail.contains("not an address"), "{detail}");
    }

    fn invalid_detail(job: &SendJob, max_age: Duration) -> String {
        match check(job, &Limits::default(), max_age, OffsetDateTime::now_utc()) {
            Err(Verdict::DeadLetter {
                reason: DeadReason::Invalid,
                detail,
            }) => detail,
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn a_job_created_before_1970_is_invalid() {
        let mut job = sample_job();
        job.created_at = datetime!(1969-12-31 23:59:59 UTC);
        assert!(invalid_detail(&job, MAX_AGE).contains("before 1970"));
        // Midnight UTC is 1970, whatever the offset it is written in.
        job.created_at = datetime!(1970-01-01 01:00 +01:00);
        assert_eq!(
            check(&job, &Limits::default(), MAX_AGE, OffsetDateTime::now_utc()),
            Ok(())
        );
    }

    #[test]
    fn a_job_whose_retry_deadline_is_past_9999_is_invalid() {
        let mut job = sample_job();
        job.created_at = datetime!(9999-12-31 00:00 UTC);
        assert!(invalid_detail(&job, MAX_AGE).contains("9999"));
        // Past 9999 in UTC, though not where it was written.
        job.created_at = datetime!(9999-12-31 22:00 -05:00);
        assert!(invalid_detail(&job, Duration::ZERO).contains("9999"));
        job.created_at = sample_job().created_at;
        assert!(invalid_detail(&job, Duration::MAX).contains("9999"));
    }

    /// What the check lets through, the later steps handle without a
    /// panic: the `Date` header and the retry deadline.
    #[test]
    fn the_extreme_dates_it_passes_are_sent_and_retried() {
        let policy = RetryPolicy::new(RetrySettings {
            max_age: MAX_AGE,
            ..RetrySettings::default()
        });
        let now = OffsetDateTime::now_utc();
        for created_at in [
            OffsetDateTime::UNIX_EPOCH,
            datetime!(9999-12-30 23:59:59 UTC),
        ] {
            let mut job = sample_job();
            job.created_at = created_at;
            assert_eq!(check(&job, &Limits::default(), MAX_AGE, now), Ok(()));
            build_message(&job).expect("builds");
            let _ = policy.next(1, job.created_at, now);
        }
    }
}
