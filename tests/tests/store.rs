//! The Redis server's set-up, read from real servers started with the
//! settings in question: what weakens the dedup guarantee is reported, and
//! a cluster, which the scripts cannot use, stops the worker and the API
//! at start rather than deferring every job.

use mailroom_core::store::{RedisStore, Risk, StoreError};
use mailroom_tests::rabbit::TestVhost;
use mailroom_tests::redis::{PrivateRedis, TestPrefix};
use mailroom_tests::stack::base_settings;

async fn risks(redis: &PrivateRedis) -> Result<Vec<Risk>, StoreError> {
    connected(redis).await.setup_risks().await
}

async fn connected(redis: &PrivateRedis) -> RedisStore {
    RedisStore::connect(&redis.settings("mailroom-test:"))
        .await
        .expect("connected")
}

/// `CONFIG SET setting value` on the server behind `store`.
async fn config_set(store: &RedisStore, setting: &str, value: &str) {
    let mut admin = store.connection();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg(setting)
        .arg(value)
        .query_async(&mut admin)
        .await
        .expect("CONFIG SET");
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

/// A refused login is said as such, at once: waiting does not fix it, and
/// "unreachable" sent people looking at the network for a quarter minute.
#[tokio::test]
async fn a_refused_login_fails_at_once_and_says_so() {
    let redis = PrivateRedis::start();
    let client = redis::Client::open(redis.url()).expect("url");
    let mut connection = client.get_connection().expect("connected");
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("right-pass")
        .query::<()>(&mut connection)
        .expect("a password set");
    let port = redis.url().rsplit(':').next().expect("a port").to_owned();
    for url in [
        format!("redis://:wr0ng-pass@127.0.0.1:{port}"),
        format!("redis://nobody:wr0ng-pass@127.0.0.1:{port}"),
        format!("redis://127.0.0.1:{port}"),
    ] {
        let mut settings = redis.settings("mailroom-test:");
        settings.url = mailroom_core::settings::Secret::new(url.as_str());
        let start = std::time::Instant::now();
        let err = RedisStore::connect(&settings)
            .await
            .expect_err("a wrong password");
        assert!(
            matches!(err, StoreError::AuthFailed { .. }),
            "{url}: {err:?}"
        );
        let shown = err.to_string();
        assert!(
            shown.contains("refused the login")
                && shown.contains("check the user and password in redis.url"),
            "{shown}"
        );
        assert!(!shown.contains("wr0ng-pass"), "{shown}");
        assert!(
            start.elapsed() < std::time::Duration::from_secs(2),
            "{url}: {:?}",
            start.elapsed()
        );
    }
    let mut settings = redis.settings("mailroom-test:");
    settings.url =
        mailroom_core::settings::Secret::new(format!("redis://:right-pass@127.0.0.1:{port}"));
    RedisStore::connect(&settings)
        .await
        .expect("the right password");
}

#[tokio::test]
async fn readiness_needs_a_redis_that_takes_writes_not_one_that_answers_ping() {
    let redis = PrivateRedis::start();
    let store = connected(&redis).await;
    store
        .takes_writes()
        .await
        .expect("a plain server takes writes");
    for (setting, value, then) in [
        // Out of memory: PING answers, every write is refused.
        ("maxmemory", "1", "0"),
        // A script may not write while a replica the setting asks for is
        // missing.
        ("min-replicas-to-write", "1", "0"),
    ] {
        config_set(&store, setting, value).await;
        store.ping().await.expect("it still answers PING");
        let err = store.takes_writes().await.expect_err(setting);
        assert!(matches!(err, StoreError::Command(_)), "{setting}: {err:?}");
        config_set(&store, setting, then).await;
        store.takes_writes().await.expect(setting);
    }
}

#[tokio::test]
async fn a_command_line_connection_fails_at_once_when_redis_is_away() {
    let mut redis = PrivateRedis::start();
    let settings = redis.settings("mailroom-test:");
    redis.stop();
    let start = std::time::Instant::now();
    let err = RedisStore::connect_once(&settings)
        .await
        .expect_err("nothing listens");
    assert!(err.is_unavailable(), "{err:?}");
    assert!(
        start.elapsed() < settings.timeout,
        "{:?} to fail",
        start.elapsed()
    );
}

/// A write of the work that Redis refused keeps readiness failing for a
/// moment even where the probe's own small write goes through: right at
/// its memory limit, Redis took the probe on a busy connection while it
/// refused every claim.
#[tokio::test]
async fn a_refused_write_of_the_work_fails_readiness_for_a_moment() {
    let redis = PrivateRedis::start();
    let store = connected(&redis).await;
    let statuses =
        mailroom_core::status::StatusStore::new(store.clone(), std::time::Duration::from_mins(1));
    config_set(&store, "maxmemory", "1").await;
    let job = mailroom_tests::job("ada@example.org", "hi", "hi");
    let update =
        mailroom_core::status::StatusUpdate::new(&job, mailroom_core::status::JobState::Queued);
    statuses.record(&update).await.expect_err("out of memory");
    config_set(&store, "maxmemory", "0").await;
    let err = store
        .takes_writes()
        .await
        .expect_err("refused a moment ago");
    assert!(err.to_string().contains("OOM"), "{err}");
    tokio::time::sleep(mailroom_core::store::REFUSALS_KEPT).await;
    store.takes_writes().await.expect("taking writes again");
}
