//! GCRA limits against the real Redis.

use std::time::Duration;

use mailroom_core::ratelimit::{Decision, Guard, Guarded, Rate, RateLimiter};
use mailroom_core::store::RedisStore;
use mailroom_tests::redis::TestPrefix;

async fn limiter(prefix: &TestPrefix) -> RateLimiter {
    RateLimiter::new(store(prefix).await)
}

async fn store(prefix: &TestPrefix) -> RedisStore {
    RedisStore::connect(&prefix.settings())
        .await
        .expect("redis")
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

#[tokio::test]
async fn requests_checked_together_are_decided_in_order_as_if_alone() {
    let prefix = TestPrefix::new("gcra-each");
    let limiter = limiter(&prefix).await;
    let rate: Rate = "3/m".parse().expect("rate");
    let limits = [("k", rate)];
    let decided = limiter
        .check_each_guarded(None, &limits, &[1, 5, 1, 1, 1])
        .await
        .expect("check");
    let Guarded::Decided(decisions) = decided else {
        panic!("no guard, yet {decided:?}");
    };
    let allowed: Vec<bool> = decisions
        .iter()
        .map(|(decision, _)| *decision == Decision::Allowed)
        .collect();
    // The 5 is more than the burst; those after it still fit, until the
    // budget of 3 is spent.
    assert_eq!(allowed, [true, false, true, true, false]);
    assert!(matches!(
        limiter.check("k", rate, 1).await.expect("check"),
        Decision::Limited { .. }
    ));
}

#[tokio::test]
async fn a_guarded_check_spends_only_while_its_guard_holds() {
    let prefix = TestPrefix::new("gcra-guard");
    let store = store(&prefix).await;
    let limiter = RateLimiter::new(store.clone());
    let rate: Rate = "2/m".parse().expect("rate");
    let limits = [("k", rate)];
    let guard = |expected| Guard {
        key: "record",
        expected,
    };
    let absent = limiter
        .check_each_guarded(Some(guard("v1")), &limits, &[1])
        .await
        .expect("check");
    assert_eq!(absent, Guarded::Changed(None));
    redis::cmd("SET")
        .arg(store.key("record"))
        .arg("v1")
        .query_async::<()>(&mut store.connection())
        .await
        .expect("set");
    let stale = limiter
        .check_each_guarded(Some(guard("v0")), &limits, &[1])
        .await
        .expect("check");
    assert_eq!(stale, Guarded::Changed(Some("v1".to_owned())));
    // Neither spent anything: the whole budget is still there.
    let held = limiter
        .check_each_guarded(Some(guard("v1")), &limits, &[1, 1, 1])
        .await
        .expect("check");
    let Guarded::Decided(decisions) = held else {
        panic!("the guard holds, yet {held:?}");
    };
    let allowed = decisions
        .iter()
        .filter(|(decision, _)| *decision == Decision::Allowed)
        .count();
    assert_eq!(allowed, 2);
}
