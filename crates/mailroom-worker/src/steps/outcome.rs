//! Step 8: make the verdict durable, then tell the pool whether to ack.
//!
//! - sent: mark the dedup key `sent` (kept for the dedup window), ack;
//! - duplicate: ack, status `duplicate`;
//! - retry: release the claim, republish to the retry tier ≥ the backoff
//!   delay with the next attempt number (confirmed), ack; out of attempts
//!   or age: dead-letter;
//! - defer: republish to a tier with the same attempt number, ack; a claim
//!   taken before is left to its lease (a send withheld because the lease
//!   may be gone must not free a claim that may be another's now);
//! - dead letter: release the claim, publish to `mailroom.dead` with the
//!   reason (confirmed), ack;
//! - return (the worker is stopping, nothing handed to the relay): release
//!   the claim, requeue.
//!
//! A republish the broker does not confirm means no ack: the delivery is
//! requeued and tried again, so nothing is lost.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable as _};
use mailroom_core::job::SendJob;
use mailroom_core::settings::OnUncertain;
use time::OffsetDateTime;

use crate::incoming::Incoming;
use crate::metrics;
use crate::pipeline::{Disposition, Pipeline, Trip};
use crate::retry::NextStep;
use crate::steps::dedup::{ClaimToken, MarkOutcome};
use crate::verdict::{DeadReason, Verdict};
use mailroom_core::status::{JobState, StatusUpdate};

/// Makes `trip`'s verdict durable.
pub async fn settle(pipeline: &Pipeline, incoming: &Incoming, trip: Trip) -> Disposition {
    let Trip {
        job,
        claim,
        verdict,
        smtp,
    } = trip;
    match verdict {
        Verdict::Sent { code } => sent(pipeline, incoming, job, claim, smtp, code).await,
        // Boxed: the other outcomes republish through the broker, a large
        // future the common path, inline, would carry and move every time.
        verdict => Box::pin(unsent(pipeline, incoming, job, claim, smtp, verdict)).await,
    }
}

/// Makes a `Sent` verdict durable: the claim becomes `sent`.
async fn sent(
    pipeline: &Pipeline,
    incoming: &Incoming,
    job: Option<SendJob>,
    claim: Option<ClaimToken>,
    smtp: Option<Duration>,
    code: u16,
) -> Disposition {
    tracing::Span::current().record("mailroom.outcome", "sent");
    if let (Some(job), Some(token)) = (&job, claim) {
        mark_sent(pipeline, job, token, incoming.attempt).await;
        let end_to_end = (OffsetDateTime::now_utc() - job.created_at)
            .try_into()
            .unwrap_or(Duration::ZERO);
        metrics::delivered(end_to_end, smtp.unwrap_or_default());
    }
    tracing::info!(code, attempt = incoming.attempt, "sent");
    metrics::job("sent");
    Disposition::Ack
}

/// Makes a verdict other than `Sent` durable.
async fn unsent(
    pipeline: &Pipeline,
    incoming: &Incoming,
    job: Option<SendJob>,
    claim: Option<ClaimToken>,
    smtp: Option<Duration>,
    verdict: Verdict,
) -> Disposition {
    let span = tracing::Span::current();
    match verdict {
        Verdict::Sent { code } => sent(pipeline, incoming, job, claim, smtp, code).await,
        Verdict::Duplicate { first } => {
            span.record("mailroom.outcome", "duplicate");
            if let Some(job) = &job {
                pipeline
                    .record(StatusUpdate::new(job, JobState::Duplicate).attempts(incoming.attempt))
                    .await;
            }
            tracing::info!(first_job = %first, "duplicate: not sent again");
            metrics::job("duplicate");
            Disposition::Ack
        }
        Verdict::Retry { error } => {
            release(pipeline, claim.as_ref()).await;
            let Some(job) = job else {
                // A retry needs an opened job; no step decides one without.
                return dead_letter(pipeline, incoming, None, DeadReason::Seal, &error).await;
            };
            let now = OffsetDateTime::now_utc();
            match pipeline.retry.next(incoming.attempt, job.created_at, now) {
                NextStep::RetryAfter(delay) => retry(pipeline, incoming, &job, delay, &error).await,
                NextStep::GiveUp(why) => {
                    let reason = match why {
                        crate::retry::GiveUpReason::Attempts => DeadReason::MaxAttempts,
                        crate::retry::GiveUpReason::Age => DeadReason::MaxAge,
                    };
                    dead_letter(pipeline, incoming, Some(&job), reason, &error).await
                }
            }
        }
        Verdict::Defer { delay, why } => {
            span.record("mailroom.outcome", "deferred");
            match pipeline
                .forward
                .later(incoming, incoming.attempt, delay, None)
                .await
            {
                Ok(tier) => {
                    tracing::info!(why, tier = tier.name, "deferred");
                    metrics::job("deferred");
                    Disposition::Ack
                }
                Err(err) => {
                    tracing::warn!(error = %err, why, "defer not confirmed: requeued");
                    Disposition::Requeue
                }
            }
        }
        Verdict::Return => {
            span.record("mailroom.outcome", "returned");
            release(pipeline, claim.as_ref()).await;
            tracing::info!("worker stopping: returned to the queue unsent");
            Disposition::Requeue
        }
        Verdict::DeadLetter { reason, detail } => {
            if reason == DeadReason::Uncertain {
                park(pipeline, claim.as_ref()).await;
            } else {
                release(pipeline, claim.as_ref()).await;
            }
            dead_letter(pipeline, incoming, job.as_ref(), reason, &detail).await
        }
    }
}

async fn retry(
    pipeline: &Pipeline,
    incoming: &Incoming,
    job: &SendJob,
    delay: Duration,
    error: &str,
) -> Disposition {
    tracing::Span::current().record("mailroom.outcome", "retry");
    let next = incoming.attempt + 1;
    match pipeline
        .forward
        .later(incoming, next, delay, Some(error))
        .await
    {
        Ok(tier) => {
            tracing::info!(
                error,
                next_attempt = next,
                tier = tier.name,
                "retry scheduled"
            );
            metrics::retry(tier.name);
            metrics::job("retry");
            pipeline
                .record(
                    StatusUpdate::new(job, JobState::Retrying)
                        .attempts(incoming.attempt)
                        .error(error),
                )
                .await;
            Disposition::Ack
        }
        Err(err) => {
            tracing::warn!(error = %err, "retry not confirmed: requeued");
            Disposition::Requeue
        }
    }
}

async fn dead_letter(
    pipeline: &Pipeline,
    incoming: &Incoming,
    job: Option<&SendJob>,
    reason: DeadReason,
    detail: &str,
) -> Disposition {
    tracing::Span::current().record("mailroom.outcome", "dead");
    if let Err(err) = pipeline.forward.dead_letter(incoming, reason, detail).await {
        tracing::warn!(error = %err, %reason, "dead letter not confirmed: requeued");
        return Disposition::Requeue;
    }
    tracing::warn!(%reason, detail, attempt = incoming.attempt, "dead-lettered");
    metrics::dead_letter(reason.as_str());
    metrics::job("dead");
    if let Some(job) = job {
        let state = match reason {
            DeadReason::Expired => JobState::Expired,
            DeadReason::Rejected | DeadReason::MaxAttempts | DeadReason::MaxAge => JobState::Failed,
            DeadReason::Seal | DeadReason::Invalid | DeadReason::Uncertain => JobState::Dead,
        };
        pipeline
            .record(
                StatusUpdate::new(job, state)
                    .attempts(incoming.attempt)
                    .error(detail)
                    .reason(reason.as_str()),
            )
            .await;
    }
    Disposition::Ack
}

/// Marks the job sent (and its status), trying a few times: the mail has
/// gone, so the one thing that must not happen is another send because
/// Redis blinked. If it still fails, the delivery is acked anyway
/// (resending would be worse) and the mark is handed to
/// [`LateMarks`](crate::steps::late_marks::LateMarks), which writes it once
/// Redis takes writes again; until then the claim's lease keeps duplicates
/// out.
async fn mark_sent(pipeline: &Pipeline, job: &SendJob, token: ClaimToken, attempt: u32) {
    let update = StatusUpdate::new(job, JobState::Sent).attempts(attempt);
    // Fails only where `sending` could not be prepared either, which ended
    // the trip before the send; the dedup key matters more than the status.
    let sent = pipeline
        .status
        .prepare(&update)
        .inspect_err(|err| tracing::error!(error = %err, "sent, but its status cannot be written"))
        .ok();
    let hand_over = pipeline.on_uncertain == OnUncertain::Park;
    let mut tries = 0_u32;
    let attempt = || {
        tries += 1;
        pipeline.dedup.mark_sent(&token, sent.as_ref(), hand_over)
    };
    let result = attempt
        .retry(
            ExponentialBuilder::new()
                .with_min_delay(Duration::from_millis(50))
                .with_max_delay(Duration::from_millis(500))
                .with_max_times(4)
                .with_jitter(),
        )
        .await;
    match result {
        Ok(MarkOutcome::Marked) => {}
        // A try whose reply was lost (Redis slow, a timeout) did mark it.
        Ok(MarkOutcome::AlreadySent) if tries > 1 => {
            tracing::debug!("marked sent by an earlier try");
        }
        Ok(other) => tracing::warn!(outcome = ?other, "sent, but the claim had changed hands"),
        Err(err) => {
            tracing::warn!(error = %err, "sent, but not marked sent in Redis yet: written once it takes writes");
            pipeline.late_marks.hand(token, sent, hand_over);
        }
    }
}

/// Parks our claim after an uncertain outcome, so no other copy of the job
/// is sent until an operator replays it.
async fn park(pipeline: &Pipeline, claim: Option<&ClaimToken>) {
    if let Some(token) = claim
        && let Err(err) = pipeline.dedup.park(token).await
    {
        // The lease runs out on its own and the marker stays: a copy that
        // claims it later is parked as well.
        tracing::warn!(error = %err, "claim not parked");
    }
}

/// Releases our claim so the retry (or an operator's replay) can take it.
async fn release(pipeline: &Pipeline, claim: Option<&ClaimToken>) {
    if let Some(token) = claim
        && let Err(err) = pipeline.dedup.release(token).await
    {
        // The lease runs out on its own; until then the retry is deferred.
        tracing::warn!(error = %err, "claim not released");
    }
}
