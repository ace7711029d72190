//! One reconnect at a time, whose outcome serves everyone who waited for
//! it. A failed attempt takes its whole backoff (about half a minute): were
//! each waiting publisher to run its own after it, hundreds of them would
//! keep a caller waiting for hours while the broker is down.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

use super::AmqpError;

/// How long a failed attempt's error is handed to new callers before
/// another attempt starts: a burst of publishes after a failure costs one
/// attempt, not one each.
const COOL_DOWN: Duration = Duration::from_secs(1);

#[derive(Default)]
pub(super) struct Reconnects {
    /// Attempts finished, read before queuing: a caller that finds it moved
    /// once it holds the lock waited through an attempt.
    finished: AtomicU64,
    /// Held during an attempt; the last attempt's failure, if it failed.
    last: Mutex<Option<Failure>>,
}

struct Failure {
    at: Instant,
    error: AmqpError,
}

impl Reconnects {
    /// What `current` gives, if it gives something once no attempt runs;
    /// otherwise the error of an attempt this caller waited through (or that
    /// failed within [`COOL_DOWN`]); otherwise what `attempt` gives. Both
    /// are awaited only then, if at all.
    pub(super) async fn run<T>(
        &self,
        current: impl Future<Output = Option<T>>,
        attempt: impl Future<Output = Result<T, AmqpError>>,
    ) -> Result<T, AmqpError> {
        let seen = self.finished.load(Ordering::Acquire);
        let mut last = self.last.lock().await;
        // Someone else may have reconnected while we waited.
        if let Some(current) = current.await {
            return Ok(current);
        }
        if let Some(failure) = last.as_ref()
            && (self.finished.load(Ordering::Acquire) != seen || failure.at.elapsed() < COOL_DOWN)
        {
            return Err(failure.error.clone());
        }
        let outcome = attempt.await;
        *last = outcome.as_ref().err().map(|error| Failure {
            at: Instant::now(),
            error: error.clone(),
        });
        self.finished.fetch_add(1, Ordering::Release);
        outcome
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// An attempt that takes `took` and fails, counting itself.
    async fn failing(attempts: &AtomicUsize, took: Duration) -> Result<u32, AmqpError> {
        attempts.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(took).await;
        Err(AmqpError::Unreachable {
            urls: "amqp://rabbit".to_owned(),
            reason: "refused".to_owned(),
        })
    }

    #[tokio::test]
    async fn callers_waiting_through_a_failed_attempt_share_its_error() {
        let reconnects = Arc::new(Reconnects::default());
        let attempts = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        let callers: Vec<_> = (0..64)
            .map(|_| {
                let reconnects = Arc::clone(&reconnects);
                let attempts = Arc::clone(&attempts);
                tokio::spawn(async move {
                    reconnects
                        .run(
                            async { None },
                            failing(&attempts, Duration::from_millis(300)),
                        )
                        .await
                })
            })
            .collect();
        for caller in callers {
            let outcome = caller.await.expect("joined");
            assert!(matches!(outcome, Err(AmqpError::Unreachable { .. })));
        }
        assert_eq!(attempts.load(Ordering::SeqCst), 1);
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );

        // Once the cool-down is over, the next caller tries again.
        tokio::time::sleep(COOL_DOWN).await;
        let again = reconnects
            .run(
                async { None },
                failing(&attempts, Duration::from_millis(10)),
            )
            .await;
        assert!(again.is_err());
        assert_eq!(attempts.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn after_a_success_callers_take_what_it_made() {
        let reconnects = Reconnects::default();
        let made = std::sync::Mutex::new(None);
        let current = || async { *made.lock().expect("lock") };
        let attempt = async {
            *made.lock().expect("lock") = Some(7);
            Ok(7)
        };
        assert_eq!(reconnects.run(current(), attempt).await.expect("made"), 7);
        let never = async { panic!("no second attempt") };
        assert_eq!(reconnects.run(current(), never).await.expect("made"), 7);
    }
}
