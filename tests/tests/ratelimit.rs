//! GCRA limits against the real Redis.

use std::time::Duration;

use mailroom_core::ratelimit::{Decision, Rate, RateLimiter};
use mailroom_core::store::RedisStore;
use mailroom_tests::redis::TestPrefix;

async fn limiter(prefix: &TestPrefix) -> RateLimiter {
    RateLimiter::new(
        RedisStore::connect(&prefix.settings())
            .await
            .expect("redis"),
    )
}

#[tokio::test]
async fn a_burst_is_allowed_then_limited_with_a_wait() {
    let prefix = TestPrefix::new("gcra");
    let limiter = limiter(&prefix).await;
    let rate: Rate = "5/s".parse().expect("rate");
    for i in 0..5 {
        assert_eq!(
            limiter.check("k", rate, 1).await.expect("check"),
            Decision::Allowed,
            "request {i}"
        );
    }
    match limiter.check("k", rate, 1).await.expect("check") {
        Decision::Limited { retry_after } => {
            assert!(
                retry_after > Duration::ZERO && retry_after <= Duration::from_millis(200),
                "{retry_after:?}"
            );
            tokio::time::sleep(retry_after + Duration::from_millis(5)).await;
        }
        Decision::Allowed => panic!("the sixth request passed"),
    }
    assert_eq!(
        limiter.check("k", rate, 1).await.expect("check"),
        Decision::Allowed
    );
    // Another key has its own budget.
    assert_eq!(
        limiter.check("other", rate, 1).await.expect("check"),
        Decision::Allowed
    );
}

#[tokio::test]
async fn two_limiters_share_one_budget() {
    let prefix = TestPrefix::new("gcra-shared");
    let (a, b) = (limiter(&prefix).await, limiter(&prefix).await);
    let rate: Rate = "4/m".parse().expect("rate");
    let mut allowed = 0;
    for i in 0..8 {
        let limiter = if i % 2 == 0 { &a } else { &b };
        if limiter.check("tenant", rate, 1).await.expect("check") == Decision::Allowed {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 4);
    assert!(matches!(
        a.check("tenant", rate, 1).await.expect("check"),
        Decision::Limited { retry_after } if retry_after > Duration::from_secs(10)
    ));
}
