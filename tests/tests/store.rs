//! The Redis server's set-up, read from real servers started with the
//! settings in question: what weakens the dedup guarantee is reported, and
//! a cluster, which the scripts cannot use, stops the worker and the API
//! at start rather than deferring every job.

use mailroom_core::store::{RedisStore, Risk, StoreError};
use mailroom_tests::rabbit::TestVhost;
use mailroom_tests::redis::{PrivateRedis, TestPrefix};
use mailroom_tests::stack::base_settings;

async fn risks(redis: &PrivateRedis) -> Result<Vec<Risk>, StoreError> {
    let store = RedisStore::connect(&redis.settings("mailroom-test:"))
        .await
        .expect("connected");
    store.setup_risks().await
}

#[tokio::test]
async fn a_server_that_keeps_nothing_on_disk_is_a_risk() {
    let redis = PrivateRedis::start();
    assert_eq!(risks(&redis).await.expect("read"), vec![Risk::NoAppendLog]);
}

#[tokio::test]
async fn an_append_log_and_no_eviction_are_no_risk() {
    let redis =
        PrivateRedis::start_with(&["--appendonly", "yes", "--maxmemory-policy", "noeviction"]);
    assert_eq!(risks(&redis).await.expect("read"), Vec::new());
}

#[tokio::test]
async fn an_evicting_policy_is_a_risk() {
    let redis =
        PrivateRedis::start_with(&["--appendonly", "yes", "--maxmemory-policy", "volatile-lru"]);
    assert_eq!(
        risks(&redis).await.expect("read"),
        vec![Risk::Eviction("volatile-lru".to_owned())]
    );
}

#[tokio::test]
async fn a_cluster_is_refused_by_the_worker_and_the_api() {
    let redis = PrivateRedis::start_with(&["--cluster-enabled", "yes"]);
    assert!(matches!(
        risks(&redis).await,
        Err(StoreError::Cluster { .. })
    ));

    let vhost = TestVhost::new("store-cluster");
    let unused = TestPrefix::new("store-cluster");
    let mut settings = base_settings(&vhost, &unused);
    settings.redis = redis.settings("mailroom-test:");
    let refused = |err: String| {
        assert!(err.contains("cluster mode"), "{err}");
        assert!(!err.contains("test-hash-key"), "{err}");
    };
    match mailroom_worker::Worker::connect(&settings).await {
        Ok(_) => panic!("a worker started on a Redis cluster"),
        Err(err) => refused(err.to_string()),
    }
    match mailroom_producer::api::Api::connect(&settings).await {
        Ok(_) => panic!("the API started on a Redis cluster"),
        Err(err) => refused(err.to_string()),
    }
}
