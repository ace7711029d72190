//! Step 3: validate the opened job again (a worker trusts no producer) and
//! check that it has not expired.

use mailroom_core::job::SendJob;
use mailroom_core::validate::{Limits, validate_job};
use time::OffsetDateTime;

use crate::verdict::{DeadReason, Verdict};

/// Checks `job` at `now`.
pub fn check(job: &SendJob, limits: &Limits, now: OffsetDateTime) -> Result<(), Verdict> {
    if let Err(errors) = validate_job(job, limits) {
        // Field paths and rules only: a rule never quotes the value.
        let detail = errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        return Err(Verdict::DeadLetter {
            reason: DeadReason::Invalid,
            detail,
        });
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
    use crate::steps::tests::sample_job;

    #[test]
    fn a_valid_fresh_job_passes() {
        let job = sample_job();
        assert_eq!(
            check(&job, &Limits::default(), OffsetDateTime::now_utc()),
            Ok(())
        );
    }

    #[test]
    fn an_expired_job_is_not_sent() {
        let mut job = sample_job();
        job.expires_at = Some(job.created_at + time::Duration::seconds(1));
        let later = job.created_at + time::Duration::seconds(2);
        assert!(matches!(
            check(&job, &Limits::default(), later),
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
        match check(&job, &Limits::default(), OffsetDateTime::now_utc()) {
            Err(Verdict::DeadLetter {
                reason: DeadReason::Invalid,
                detail,
            }) => {
                assert!(detail.contains("message.to[0]"), "{detail}");
                assert!(!detail.contains("not an address"), "{detail}");
            }
            other => panic!("expected invalid, got {other:?}"),
        }
    }
}
