//! Redis, as both roles use it: one multiplexed connection that reconnects
//! on its own, every key under `redis.key_prefix`, and errors that say
//! whether Redis was unreachable (try later, never act blind), refused the
//! login (waiting does not fix that) or refused a command.

mod hash;
mod setup;

use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable as _};
use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::settings::RedisSettings;

pub use hash::KeyedHash;
pub use setup::{MINIMUM_VERSION, Risk};

/// Why Redis did not answer as asked. Messages never hold the URL's
/// password.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `redis.url` is not a Redis URL.
    #[error("redis.url {url} is not a valid Redis URL: {reason}")]
    InvalidUrl {
        /// The URL, password redacted.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Redis could not be reached, or did not answer in time.
    #[error("Redis at {url} is unreachable: {reason}")]
    Unavailable {
        /// The URL, password redacted.
        url: String,
        /// What the connection said.
        reason: String,
    },
    /// Redis refused the user name or password (or wants one).
    #[error(
        "Redis at {url} refused the login: {reason} (check the user and password in redis.url)"
    )]
    AuthFailed {
        /// The URL, password redacted.
        url: String,
        /// What Redis said.
        reason: String,
    },
    /// Redis answered with an error.
    #[error("Redis refused a command: {0}")]
    Command(String),
    /// Redis runs as a cluster: the scripts touch several keys at once, which
    /// a cluster refuses unless they share a slot.
    #[error(
        "Redis at {url} runs in cluster mode; mailroom needs a single Redis server \
         (its scripts touch several keys at once)"
    )]
    Cluster {
        /// The URL, password redacted.
        url: String,
    },
    /// Redis is older than mailroom's commands need.
    #[error(
        "Redis at {url} is version {version}; mailroom needs {}.{} or later \
         (it uses SET ... GET and EXAT)",
        MINIMUM_VERSION.0,
        MINIMUM_VERSION.1
    )]
    TooOld {
        /// The URL, password redacted.
        url: String,
        /// What the server says it is.
        version: String,
    },
    /// A stored value could not be read back.
    #[error("a stored value is malformed: {0}")]
    Malformed(String),
}

impl StoreError {
    /// Whether Redis was out of reach (as opposed to refusing a command):
    /// the caller should wait and try again, never act as if it had answered.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

/// A Redis connection shared by every task of a process, and the key prefix.
#[derive(Clone)]
pub struct RedisStore {
    manager: ConnectionManager,
    prefix: Arc<str>,
    url: Arc<str>,
    /// The last write Redis refused (out of memory, read-only, ...), and
    /// when: see [`RedisStore::takes_writes`].
    refused: Arc<std::sync::Mutex<Option<(Instant, String)>>>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.url)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects to `settings.url`, retrying a few times with jittered
    /// backoff so a Redis that is still starting is waited for (not one
    /// that refused the login). Once connected, a lost connection is
    /// re-established on the next command.
    pub async fn connect(settings: &RedisSettings) -> Result<Self, StoreError> {
        let store = Self::lazy(settings, 2)?;
        (|| store.ping())
            .retry(
                ExponentialBuilder::new()
                    .with_min_delay(Duration::from_millis(250))
                    .with_max_delay(Duration::from_secs(4))
                    .with_max_times(5)
                    .with_jitter(),
            )
            .when(StoreError::is_unavailable)
            .notify(|err, wait| {
                tracing::warn!(error = %err, retry_in = ?wait, "Redis not reachable yet");
            })
            .await?;
        Ok(store)
    }

    /// Connects once, for a command someone waits on: a Redis out of reach
    /// fails it within `redis.timeout` (a service waits, see
    /// [`connect`](Self::connect)).
    pub async fn connect_once(settings: &RedisSettings) -> Result<Self, StoreError> {
        let store = Self::lazy(settings, 0)?;
        store.ping().await?;
        Ok(store)
    }

    /// A store whose connection is made by its first command, and made
    /// again up to `retries` times within a command that finds it lost.
    fn lazy(settings: &RedisSettings, retries: usize) -> Result<Self, StoreError> {
        let client = settings.client()?;
        let url: Arc<str> = settings.url.redacted().into();
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.timeout))
            .set_response_timeout(Some(settings.timeout))
            .set_number_of_retries(retries)
            .set_max_delay(Duration::from_secs(1));
        let manager = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|err| classify(&url, &err))?;
        Ok(Self {
            manager,
            prefix: settings.key_prefix.as_str().into(),
            url,
            refused: Arc::default(),
        })
    }

    /// `PING`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut connection = self.manager.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
            .map(drop)
            .map_err(|err| self.error(&err))
    }

    /// Whether Redis takes a scripted write now, as the worker's and the
    /// API's every step needs: a Redis that answers `PING` but is out of
    /// memory, read-only, or refuses scripts to this user fails it. So does
    /// one that refused a write of the work in the last [`REFUSALS_KEPT`]:
    /// right at its memory limit, Redis took this small overwrite on a
    /// busy connection while it refused every claim (a black-box run,
    /// 2026-12-06).
    pub async fn takes_writes(&self) -> Result<(), StoreError> {
        let probe = Script::new("return redis.call('SET', KEYS[1], '1', 'PX', 60000)");
        let mut connection = self.manager.clone();
        probe
            .key(self.key("ready"))
            .invoke_async::<()>(&mut connection)
            .await
            .map_err(|err| classify(&self.url, &err))?;
        let refused = self.lock_refused().clone();
        match refused {
            Some((at, why)) if at.elapsed() < REFUSALS_KEPT => Err(StoreError::Command(format!(
                "a write was refused {} ms ago: {why}",
                at.elapsed().as_millis()
            ))),
            _ => Ok(()),
        }
    }

    fn lock_refused(&self) -> std::sync::MutexGuard<'_, Option<(Instant, String)>> {
        self.refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The full key for `name`, under the prefix.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// The connection, for commands and scripts (cheap to clone).
    pub fn connection(&self) -> ConnectionManager {
        self.manager.clone()
    }

    /// `err` as a [`StoreError`] naming this store's (redacted) URL; a
    /// refused write is remembered for [`RedisStore::takes_writes`].
    pub fn error(&self, err: &redis::RedisError) -> StoreError {
        if refuses_write(err) {
            *self.lock_refused() = Some((Instant::now(), err.to_string()));
        }
        classify(&self.url, err)
    }
}

/// Whether `err` is Redis refusing a write: its own code, or for a
/// transaction Redis aborted (`EXECABORT`), the code of a command in it.
fn refuses_write(err: &redis::RedisError) -> bool {
    let refusal = |code: &str| {
        matches!(
            code,
            "OOM" | "READONLY" | "MISCONF" | "NOPERM" | "NOAUTH" | "NOREPLICAS"
        )
    };
    err.code().is_some_and(refusal)
        || err
            .clone()
            .into_server_errors()
            .is_some_and(|errors| errors.iter().any(|(_, error)| refusal(error.code())))
}

impl RedisSettings {
    /// A client for `url`, which is parsed, not connected to: a settings
    /// check (and `mailroom config`) refuses what a connection would.
    pub fn client(&self) -> Result<redis::Client, StoreError> {
        redis::Client::open(self.url.expose()).map_err(|err| StoreError::InvalidUrl {
            // Never the raw text: a value that is not a URL may be the secret itself.
            url: self.url.redacted(),
            reason: err.to_string(),
        })
    }
}

/// How long a refused write keeps [`RedisStore::takes_writes`] failing.
pub const REFUSALS_KEPT: Duration = Duration::from_secs(2);

fn classify(url: &str, err: &redis::RedisError) -> StoreError {
    // Before the reachability tests: the client counts a refused login as
    // a reason to reconnect.
    // A Redis that began to want a password closes the connection of a
    // client that sends it a long command unauthenticated, and says so.
    if err.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(err.code(), Some("NOAUTH" | "WRONGPASS"))
        || err.to_string().contains("unauthenticated")
    {
        return StoreError::AuthFailed {
            url: url.to_owned(),
            reason: err.to_string(),
        };
    }
    if err.is_io_error()
        || err.is_timeout()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_unrecoverable_error()
    {
        StoreError::Unavailable {
            url: url.to_owned(),
            reason: err.to_string(),
        }
    } else {
        StoreError::Command(err.to_string())
    }
}
