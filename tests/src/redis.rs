//! A Redis key prefix of a test's own, whose keys are deleted when dropped.

use mailroom_core::settings::{RedisSettings, Secret};

/// Where the tests' Redis listens, unless `MAILROOM_TEST_REDIS_URL` says otherwise.
pub const DEFAULT_URL: &str = "redis://127.0.0.1:6379";

/// A key prefix that is cleaned up when this value is dropped.
pub struct TestPrefix {
    url: String,
    prefix: String,
}

impl TestPrefix {
    /// A fresh prefix on the tests' Redis.
    ///
    /// # Panics
    /// When Redis is not reachable, with the command that starts it.
    pub fn new(label: &str) -> Self {
        let url =
            std::env::var("MAILROOM_TEST_REDIS_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
        let client = redis::Client::open(url.as_str()).expect("redis URL");
        let reachable = client
            .get_connection()
            .and_then(|mut connection| redis::cmd("PING").query::<String>(&mut connection));
        assert!(
            reachable.is_ok(),
            "Redis is not reachable at {url}: start it with `redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save \"\" --appendonly no` (or run .ci/run)"
        );
        Self {
            url,
            prefix: format!("{}:", crate::unique(&format!("mailroom-test-{label}"))),
        }
    }

    /// The prefix, ending in `:`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Redis settings using this prefix and a test hash key.
    pub fn settings(&self) -> RedisSettings {
        RedisSettings {
            url: Secret::new(self.url.clone()),
            key_prefix: self.prefix.clone(),
            hash_key: Secret::new("test-hash-key-0123456789abcdef"),
            ..RedisSettings::default()
        }
    }

    /// Keys under the prefix now.
    pub fn keys(&self) -> Vec<String> {
        let Ok(client) = redis::Client::open(self.url.as_str()) else {
            return Vec::new();
        };
        let Ok(mut connection) = client.get_connection() else {
            return Vec::new();
        };
        let pattern = format!("{}*", self.prefix);
        redis::cmd("KEYS")
            .arg(&pattern)
            .query(&mut connection)
            .unwrap_or_default()
    }
}

impl Drop for TestPrefix {
    fn drop(&mut self) {
        let keys = self.keys();
        if keys.is_empty() {
            return;
        }
        if let Ok(client) = redis::Client::open(self.url.as_str())
            && let Ok(mut connection) = client.get_connection()
        {
            let _: Result<(), _> = redis::cmd("DEL").arg(&keys).query(&mut connection);
        }
    }
}
