//! The steps of DESIGN.md's worker pipeline, in order, for one delivery:
//!
//! 1. extract the trace context; `mailroom.process` span (consumer kind)
//! 2. [`open`](crate::steps::open) the seal
//! 3. [`check`](crate::steps::check): validate, expiry
//! 4. suppression list (comes with the next issue)
//! 5. [`dedup`](crate::steps::dedup) claim
//! 6. rate limits (comes with the next issue)
//! 7. [`send`](crate::steps::send)
//! 8. [`outcome`](crate::steps::outcome): make the verdict durable, then
//!    say whether to ack.
//!
//! Each step returns either its result or a [`Verdict`] that ends the trip;
//! the outcome step then publishes, marks and records what the verdict
//! needs before the pool acks.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mailroom_core::job::SendJob;
use mailroom_core::offload;
use mailroom_core::seal::Keyring;
use mailroom_core::settings::OnUncertain;
use mailroom_core::telemetry::{OncePerSecond, extract_context};
use mailroom_core::validate::Limits;
use time::OffsetDateTime;
use tracing::{Instrument as _, debug_span, field, info_span};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::forward::Forwarder;
use crate::incoming::Incoming;
use crate::retry::RetryPolicy;
use crate::steps::dedup::{Claim, ClaimToken, Dedup, Lease};
use crate::steps::late_marks::LateMarks;
use crate::steps::{check, open, outcome, send};
use crate::transport::{HandOver, Transport, Withheld};
use crate::verdict::{DeadReason, Verdict};
use mailroom_core::status::{JobState, PreparedStatus, StatusStore, StatusUpdate};

/// How long a job waits when Redis cannot be asked whether it was sent:
/// never send blind.
pub const REDIS_DOWN_DELAY: Duration = Duration::from_secs(5);

/// Longest a job held by another worker waits before it looks again. The
/// holder usually finishes in milliseconds; a killed holder's lease runs
/// out in `worker.dedup_lease`, and the job is then claimed here.
pub const HELD_RECHECK: Duration = Duration::from_secs(1);

/// How long a send goes on before its `sending` status is written, where
/// the claim did not write it: a quick send goes from `queued` (or
/// `retrying`) straight to `sent`, and spares Redis a write a message that
/// nobody would see; a slow or stuck one shows `sending`.
pub const SENDING_AFTER: Duration = Duration::from_millis(250);

/// A claim of ours, and whether its `sending` status is still to write.
struct Claimed {
    lease: Lease,
    status_waits: bool,
}

/// What the pool does with a delivery once the pipeline is done with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// The outcome is durable: ack.
    Ack,
    /// The outcome could not be made durable (the broker refused the
    /// republish): requeue, so the job is not lost. Quorum queues count
    /// these, so a job that never settles ends in the dead-letter queue.
    Requeue,
}

/// Everything the steps need, shared by every delivery of a pool.
pub struct Pipeline {
    pub(crate) keyring: Keyring,
    pub(crate) limits: Limits,
    pub(crate) dedup: Dedup,
    pub(crate) late_marks: LateMarks,
    pub(crate) status: StatusStore,
    pub(crate) transport: Transport,
    pub(crate) retry: RetryPolicy,
    pub(crate) on_uncertain: OnUncertain,
    pub(crate) forward: Forwarder,
    /// Unique to this process, so a claim left by a killed worker is never
    /// mistaken for ours.
    pub(crate) worker_id: String,
    deliveries: AtomicU64,
    /// Set when the worker starts stopping: from then on no message is
    /// handed to the relay, so the shutdown grace is spent on the replies
    /// to those already handed over, and none is cut off between its end
    /// of DATA and its reply (which would send it again).
    stopping: AtomicBool,
}

/// A trip through the steps: the job if it opened, the claim if one was
/// taken, and how it ended.
pub struct Trip {
    /// The opened job.
    pub job: Option<SendJob>,
    /// Our claim on the job's dedup key, if taken.
    pub claim: Option<ClaimToken>,
    /// How it ended.
    pub verdict: Verdict,
    /// Time spent in SMTP, when a send was made.
    pub smtp: Option<Duration>,
}

impl Pipeline {
    /// Assembles a pipeline.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        keyring: Keyring,
        limits: Limits,
        dedup: Dedup,
        status: StatusStore,
        transport: Transport,
        retry: RetryPolicy,
        on_uncertain: OnUncertain,
        forward: Forwarder,
    ) -> Arc<Self> {
        Arc::new(Self {
            keyring,
            limits,
            late_marks: LateMarks::new(dedup.clone()),
            dedup,
            status,
            transport,
            retry,
            on_uncertain,
            forward,
            worker_id: format!("worker-{}", uuid::Uuid::now_v7()),
            deliveries: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
        })
    }

    /// Hands no more messages to the relay (see `stopping`).
    pub(crate) fn stop_sending(&self) {
        self.stopping.store(true, Ordering::Release);
        self.transport.stop_starting();
    }

    fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// The transport deliveries go through.
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// Runs one delivery through every step and makes its outcome durable.
    pub async fn process(&self, incoming: Incoming) -> Disposition {
        let span = info_span!(
            "mailroom.process",
            otel.kind = "consumer",
            messaging.system = "rabbitmq",
            messaging.operation.type = "process",
            messaging.destination.name = %incoming.queue().name(),
            messaging.message.id = incoming.message_id.as_deref().unwrap_or(""),
            mailroom.attempt = incoming.attempt,
            mailroom.outcome = field::Empty,
        );
        // Fails only when no OpenTelemetry layer is installed: nothing to link.
        let _ = span.set_parent(extract_context(&incoming.headers()));
        async {
            let trip = self.run(&incoming).await;
            outcome::settle(self, &incoming, trip).await
        }
        .instrument(span)
        .await
    }

    async fn run(&self, incoming: &Incoming) -> Trip {
        let end = |job, claim, verdict| Trip {
            job,
            claim,
            verdict,
            smtp: None,
        };
        let size = incoming.body.len();
        let opened = debug_span!("mailroom.open")
            .in_scope(|| offload::heavy(size, || open::open(&self.keyring, incoming)));
        let job = match opened {
            Ok(job) => job,
            Err(verdict) => return end(None, None, verdict),
        };
        if let Some(bad) = incoming.bad_header {
            let verdict = Verdict::DeadLetter {
                reason: DeadReason::Invalid,
                detail: bad.to_owned(),
            };
            return end(Some(job), None, verdict);
        }
        let checked = offload::heavy(size, || {
            check::check(
                &job,
                &self.limits,
                self.retry.max_age(),
                OffsetDateTime::now_utc(),
            )
        });
        if let Err(verdict) = checked {
            return end(Some(job), None, verdict);
        }
        if self.is_stopping() {
            return end(Some(job), None, Verdict::Return);
        }
        // Step 4, the suppression list, comes with the next issue.
        let token = self.dedup.token(&self.delivery_owner(), &job);
        let claimed = match self
            .claim(&job, &token, incoming)
            .instrument(debug_span!("mailroom.dedup"))
            .await
        {
            Ok(claimed) => claimed,
            Err(verdict) => return end(Some(job), None, verdict),
        };
        // Step 6, rate limits, comes with the next issue.
        let sent = self
            .send_holding_claim(&job, size, &token, &claimed, incoming.attempt)
            .await;
        Trip {
            job: Some(job),
            claim: Some(token),
            verdict: sent.verdict,
            smtp: Some(sent.elapsed),
        }
    }

    /// Step 5: claims `job` for this delivery. A free key is taken, and a
    /// sent one found, without a script; the `sending` status then waits
    /// (see [`SENDING_AFTER`]). Otherwise the script decides, and records
    /// `sending` with the claim. Any outcome but a claim of ours ends the
    /// trip with its verdict.
    async fn claim(
        &self,
        job: &SendJob,
        token: &ClaimToken,
        incoming: &Incoming,
    ) -> Result<Claimed, Verdict> {
        let asked = Instant::now();
        let (claim, status_waits) = match self.dedup.claim_plain(token).await {
            Ok(Some(claim)) => (Ok(claim), true),
            Ok(None) => {
                let sending = self.prepare(job, JobState::Sending, incoming.attempt)?;
                let claim = self.dedup.claim(token, incoming.replayed, &sending).await;
                (claim, false)
            }
            Err(err) => (Err(err), false),
        };
        match claim {
            Ok(Claim::Acquired) => Ok(Claimed {
                lease: Lease::new(asked, self.dedup.lease()),
                status_waits,
            }),
            Ok(Claim::AlreadySent { job_id }) => Err(Verdict::Duplicate { first: job_id }),
            Ok(Claim::Uncertain) => Err(Verdict::DeadLetter {
                reason: DeadReason::Uncertain,
                detail: "an earlier delivery stopped after handing the message to the relay, \
                         before its reply: replay it to send it"
                    .to_owned(),
            }),
            Ok(Claim::HeldByOther { retry_after }) => Err(Verdict::Defer {
                delay: retry_after.min(HELD_RECHECK),
                why: "claimed by another worker",
            }),
            Err(err) => {
                static THROTTLE: OncePerSecond = OncePerSecond::new();
                if let Some(held) = THROTTLE.pass() {
                    tracing::warn!(error = %err, held, "Redis unavailable: job deferred, not sent blind");
                }
                Err(Verdict::Defer {
                    delay: REDIS_DOWN_DELAY,
                    why: "redis unavailable",
                })
            }
        }
    }

    /// Sends while renewing the claim's lease, so a slow relay does not let
    /// another worker take the job over mid-send.
    async fn send_holding_claim(
        &self,
        job: &SendJob,
        size: usize,
        token: &ClaimToken,
        claimed: &Claimed,
        attempt: u32,
    ) -> send::Sent {
        let hand_over: HandOver<'_> = Box::pin(self.before_end_of_data(token, &claimed.lease));
        let sending = send::send(
            &self.transport,
            job,
            size,
            self.on_uncertain,
            Some(hand_over),
        )
        .instrument(debug_span!("mailroom.smtp", otel.kind = "client"));
        tokio::pin!(sending);
        let mut status_waits = claimed.status_waits;
        let status = async {
            tokio::time::sleep(SENDING_AFTER).await;
            self.record(StatusUpdate::new(job, JobState::Sending).attempts(attempt))
                .await;
        };
        tokio::pin!(status);
        let mut renew = tokio::time::interval(self.dedup.lease() / 3);
        renew.tick().await;
        loop {
            tokio::select! {
                sent = &mut sending => return sent,
                () = &mut status, if status_waits => status_waits = false,
                _ = renew.tick() => {
                    let asked = Instant::now();
                    match self.dedup.renew(token).await {
                        Ok(true) => claimed.lease.renewed(asked),
                        Ok(false) => {
                            tracing::warn!("claim lease lost: another delivery may own the job");
                            claimed.lease.lost();
                        }
                        Err(err) => tracing::warn!(error = %err, "claim lease not renewed"),
                    }
                }
            }
        }
    }

    /// Just before the end of DATA is the last point where a send can stop
    /// with nothing handed over. A worker stopping stops it there, and so
    /// does a claim that may have passed to another delivery (known here,
    /// no round trip); in park mode
    /// the handed marker is written there, by a script that checks the
    /// claim again.
    async fn before_end_of_data(&self, token: &ClaimToken, lease: &Lease) -> Result<(), Withheld> {
        if self.is_stopping() {
            return Err(Withheld::Stopping);
        }
        if !lease.holds_at(Instant::now()) {
            tracing::warn!("claim lease lost before the end of DATA: not handed over");
            return Err(Withheld::LeaseLost);
        }
        if self.on_uncertain == OnUncertain::Park {
            match self.dedup.hand_over(token).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!("claim lost before the end of DATA: not handed over");
                    return Err(Withheld::LeaseLost);
                }
                Err(err) => {
                    tracing::warn!(error = %err, "Redis unavailable: not handed over blind");
                    return Err(Withheld::Unavailable(err.to_string()));
                }
            }
        }
        Ok(())
    }

    /// A claim owner unique to this delivery: a redelivery of a job this
    /// process is still sending (after a broker reconnect) must not
    /// re-acquire the claim and send a second time.
    fn delivery_owner(&self) -> String {
        let n = self.deliveries.fetch_add(1, Ordering::Relaxed);
        format!("{}/{n}", self.worker_id)
    }

    /// The status `job` takes in `state`, made ready for a dedup script
    /// that records it in the same step. It fails only for a job whose
    /// timestamps cannot be written, which no valid job has.
    pub(crate) fn prepare(
        &self,
        job: &SendJob,
        state: JobState,
        attempt: u32,
    ) -> Result<PreparedStatus, Verdict> {
        self.status
            .prepare(&StatusUpdate::new(job, state).attempts(attempt))
            .map_err(|err| Verdict::DeadLetter {
                reason: DeadReason::Invalid,
                detail: format!("status not writable: {err}"),
            })
    }

    /// Records a status change; a failure is logged, never fatal: statuses
    /// inform, the queue and the dedup key are what must be durable.
    pub(crate) async fn record(&self, update: StatusUpdate) {
        if let Err(err) = self.status.record(&update).await {
            static THROTTLE: OncePerSecond = OncePerSecond::new();
            if let Some(held) = THROTTLE.pass() {
                tracing::warn!(error = %err, held, "job status not recorded");
            }
        }
    }
}
