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

/// A Redis server of a test's own, on a free port, that the test may stop
/// and start again (the shared one must never be stopped).
pub struct PrivateRedis {
    port: u16,
    child: Option<std::process::Child>,
    /// Settings after the defaults, e.g. `["--appendonly", "yes"]`.
    extra: Vec<String>,
    /// Its working folder (append-only file, cluster state).
    dir: tempfile::TempDir,
}

impl PrivateRedis {
    /// Starts one.
    ///
    /// # Panics
    /// When `redis-server` is missing, with the command that installs it.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts one with `extra` settings after the defaults (it keeps
    /// nothing on disk unless they say so).
    ///
    /// # Panics
    /// As [`start`](Self::start).
    pub fn start_with(extra: &[&str]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut redis = Self {
            port,
            child: None,
            extra: extra.iter().map(ToString::to_string).collect(),
            dir: tempfile::tempdir().expect("a folder for redis-server"),
        };
        redis.restart();
        redis
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Settings for it, with `prefix` and a test hash key.
    pub fn settings(&self, prefix: &str) -> RedisSettings {
        RedisSettings {
            url: Secret::new(self.url()),
            key_prefix: prefix.to_owned(),
            hash_key: Secret::new("test-hash-key-0123456789abcdef"),
            ..RedisSettings::default()
        }
    }

    /// Kills it (as a crash would).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port (empty, unless its settings keep
    /// an append-only file).
    pub fn restart(&mut self) {
        self.stop();
        let child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string(), "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|err| {
                panic!("redis-server could not start ({err}): apt-get install redis-server (or run .ci/run)")
            });
        self.child = Some(child);
        let client = redis::Client::open(self.url().as_str()).expect("url");
        for _ in 0..100 {
            if client
                .get_connection()
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
                .is_ok()
            {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("redis-server on port {} did not answer", self.port);
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}
