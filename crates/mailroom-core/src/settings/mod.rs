//! Settings: built-in defaults < `mailroom.toml` (or `--config PATH`) <
//! `MAILROOM__SECTION__KEY` environment variables. Secrets may be given as
//! files (`..._FILE`), for mounted Kubernetes Secrets. A bad value stops
//! start-up with one line that names the setting and what is allowed.

pub(crate) mod duration;
mod enums;
mod secret;
mod sections;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{Config, Environment, File, FileFormat, ValueKind};
use serde::{Deserialize, Serialize};

pub use secret::{Secret, redact_url};
use secret::{is_one_word, scrub_urls};
pub use sections::{
    AmqpSettings, ApiSettings, JwtAlgorithm, JwtSettings, OnUncertain, RedisSettings,
    RetrySettings, SealSettings, SmtpSettings, TlsMode, TransportKind, WorkerSettings,
};

use crate::amqp::AmqpError;
use crate::seal::{Keyring, KeyringError};
use crate::store::StoreError;
use crate::telemetry::TelemetrySettings;
use crate::validate::Limits;

/// The file read when no `--config` is given, if it exists.
pub const DEFAULT_FILE: &str = "mailroom.toml";

/// Environment variables that configure mailroom start with this.
pub const ENV_PREFIX: &str = "MAILROOM";

/// Shortest `redis.hash_key` accepted: below this an HMAC key is guessable.
const MIN_HASH_KEY_LEN: usize = 16;

/// Largest `limits.max_message_bytes` accepted: a sealed job is about 1.4
/// times its message (base64, then the seal), and RabbitMQ refuses
/// messages over its `max_message_size`, 128 MiB by default.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Keys whose environment value is a comma-separated list.
const LIST_KEYS: [&str; 4] = [
    "amqp.urls",
    "limits.blocked_extensions",
    "api.trusted_proxies",
    "api.deny_cidrs",
];

/// Where in [`Settings`] a secret goes.
type SecretSlot = fn(&mut Settings) -> &mut Secret;

/// Secret settings an environment variable may set, each with where it goes.
/// They are taken from the environment as they are written, after the rest:
/// the environment source's type guessing would turn a password `0071234`
/// into `71234`, or `TRUE` into `true`. (`amqp.urls` is split as a list,
/// whose items are never guessed at.)
const ENV_SECRETS: [(&str, SecretSlot); 5] = [
    ("redis.url", |s| &mut s.redis.url),
    ("redis.hash_key", |s| &mut s.redis.hash_key),
    ("smtp.url", |s| &mut s.smtp.url),
    ("smtp.password", |s| &mut s.smtp.password),
    ("seal.keys", |s| &mut s.seal.keys),
];

/// All of mailroom's settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// The broker.
    pub amqp: AmqpSettings,
    /// Redis.
    pub redis: RedisSettings,
    /// The SMTP relay.
    pub smtp: SmtpSettings,
    /// Sealing keys.
    pub seal: SealSettings,
    /// The worker pool.
    pub worker: WorkerSettings,
    /// The HTTP API.
    pub api: ApiSettings,
    /// Logs and traces.
    pub telemetry: TelemetrySettings,
    /// What a job may hold.
    pub limits: Limits,
}

/// A setting that stops start-up.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// A value has the wrong type or form.
    #[error("bad setting: {0}")]
    Parse(String),
    /// A key that is no setting, or a number its setting cannot hold;
    /// named with where it was set, which the config crate does not say.
    #[error("bad setting {key}{}: {problem}", place(.origin.as_deref()))]
    Value {
        /// Dotted key, e.g. `worker.concurrency`.
        key: String,
        /// Where it was set: a file, or the environment.
        origin: Option<String>,
        /// What is wrong, and what is allowed.
        problem: String,
    },
    /// A value is out of its allowed range.
    #[error("bad setting {key}: {allowed}")]
    Invalid {
        /// Dotted key, e.g. `worker.concurrency`.
        key: &'static str,
        /// What is allowed.
        allowed: String,
    },
    /// A settings file is not TOML. Only where and why: the parser's own
    /// message quotes the line, which may hold a password.
    #[error("bad setting: {} line {line}, column {column}: {reason}", .path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// Line, from 1.
        line: usize,
        /// Column (in characters), from 1.
        column: usize,
        /// The parser's reason, without the text it found.
        reason: String,
    },
    /// A `--config` file or a secret file could not be read.
    #[error("bad setting {key}: cannot read {path}: {reason}")]
    File {
        /// Dotted key of the file setting.
        key: &'static str,
        /// The path.
        path: PathBuf,
        /// The I/O error.
        reason: String,
    },
    /// The sealing keys.
    #[error(transparent)]
    Keyring(#[from] KeyringError),
    /// A URL of `amqp.urls` does not parse.
    #[error("bad setting {0}")]
    Amqp(#[from] AmqpError),
    /// `redis.url` does not parse.
    #[error("bad setting {0}")]
    Redis(#[from] StoreError),
}

/// ` in PLACE`, or nothing when the place is unknown.
fn place(origin: Option<&str>) -> String {
    origin
        .map(|origin| format!(" in {origin}"))
        .unwrap_or_default()
}

impl Settings {
    /// Loads settings from `mailroom.toml` (or `path`, which must exist) and
    /// the process environment.
    pub fn load(path: Option<&Path>) -> Result<Self, SettingsError> {
        Self::load_with_env(path, std::env::vars())
    }

    /// Loads settings with `env` standing in for the process environment.
    pub fn load_with_env(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, SettingsError> {
        let env: HashMap<String, String> = env
            .into_iter()
            .filter(|(key, _)| key.starts_with(ENV_PREFIX))
            .collect();
        let raw_secrets = env_secrets(&env);
        let file = match path {
            Some(path) => {
                let refused = match std::fs::metadata(path) {
                    Ok(meta) if meta.is_file() => None,
                    Ok(_) => Some("not a file".to_owned()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        Some("no such file".to_owned())
                    }
                    Err(e) => Some(e.kind().to_string()),
                };
                if let Some(reason) = refused {
                    return Err(SettingsError::File {
                        key: "--config",
                        path: path.to_owned(),
                        reason,
                    });
                }
                File::from(path).format(FileFormat::Toml).required(true)
            }
            None => File::new(DEFAULT_FILE, FileFormat::Toml).required(false),
        };
        let default = Some(Path::new(DEFAULT_FILE)).filter(|default| default.is_file());
        if let Some(read) = path.or(default) {
            check_toml(read)?;
        }
        let mut environment = Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .list_separator(",")
            .try_parsing(true)
            .source(Some(env.into_iter().collect()));
        for key in LIST_KEYS {
            environment = environment.with_list_parse_key(key);
        }
        let parse_error = |e: config::ConfigError| match e {
            // Its cause quotes the line (`check_toml` reports such a file
            // first; this is in case the two parsers ever disagree).
            config::ConfigError::FileParse { uri, .. } => SettingsError::Parse(format!(
                "{}: not valid TOML",
                uri.as_deref().unwrap_or(DEFAULT_FILE)
            )),
            e => SettingsError::Parse(scrub_urls(&one_line(&e.to_string()))),
        };
        let config = Config::builder()
            .add_source(file)
            .add_source(environment)
            .build()
            .map_err(parse_error)?;
        let defaults = serde_json::to_value(Settings::default())
            .map_err(|e| SettingsError::Parse(e.to_string()))?;
        check_shape(&config.cache, &defaults, "")?;
        let mut settings: Settings = config.try_deserialize().map_err(parse_error)?;
        for (slot, value) in raw_secrets {
            *slot(&mut settings) = value;
        }
        // A list from the environment is split at commas only: the space
        // of `a, b` would stay in front of the second URL.
        settings.amqp.urls = trimmed(&settings.amqp.urls);
        settings.read_secret_files()?;
        settings.check()?;
        settings.smtp.tls = settings.smtp_tls()?;
        Ok(settings)
    }

    /// The TLS mode an `smtps://` URL implies (TLS from the first byte):
    /// `implicit`, whatever `smtp.tls` says short of a contradiction, so
    /// what `config` prints is what the worker does.
    fn smtp_tls(&self) -> Result<TlsMode, SettingsError> {
        if !has_scheme(&self.smtp.url, &["smtps"]) {
            return Ok(self.smtp.tls);
        }
        match self.smtp.tls {
            TlsMode::StarttlsRequired | TlsMode::Implicit => Ok(TlsMode::Implicit),
            TlsMode::Opportunistic | TlsMode::None => Err(SettingsError::Invalid {
                key: "smtp.tls",
                allowed: "implicit (or unset) with an smtps:// URL, which is TLS from the first \
                          byte; use smtp:// for opportunistic or none"
                    .to_owned(),
            }),
        }
    }

    /// Replaces each secret that has a `*_file` setting with that file's content.
    fn read_secret_files(&mut self) -> Result<(), SettingsError> {
        if let Some(path) = &self.amqp.urls_file {
            let text = read_secret(path, "amqp.urls_file")?;
            let urls: Vec<Secret> = text.expose().split(['\n', ',']).map(Secret::new).collect();
            self.amqp.urls = trimmed(&urls);
        }
        if let Some(path) = &self.redis.url_file {
            self.redis.url = read_secret(path, "redis.url_file")?;
        }
        if let Some(path) = &self.redis.hash_key_file {
            self.redis.hash_key = read_secret(path, "redis.hash_key_file")?;
        }
        if let Some(path) = &self.smtp.password_file {
            self.smtp.password = read_secret(path, "smtp.password_file")?;
        }
        Ok(())
    }

    /// Checks serde cannot express: ranges, and the broker and Redis URLs
    /// parsed as connecting parses them.
    fn check(&self) -> Result<(), SettingsError> {
        let invalid = |key, allowed: &str| {
            Err(SettingsError::Invalid {
                key,
                allowed: allowed.to_owned(),
            })
        };
        self.check_urls_are_one_word()?;
        if self.amqp.urls.is_empty() {
            return invalid("amqp.urls", "at least one amqp:// or amqps:// URL");
        }
        if let Some(position) = self
            .amqp
            .urls
            .iter()
            .position(|url| !has_scheme(url, &["amqp", "amqps"]))
        {
            return Err(SettingsError::Invalid {
                key: "amqp.urls",
                allowed: format!(
                    "entry {} ({}): URLs must start with amqp:// or amqps://",
                    position + 1,
                    self.amqp.urls[position].redacted()
                ),
            });
        }
        self.amqp.check_urls()?;
        if !has_scheme(&self.redis.url, &["redis", "rediss"]) {
            return invalid("redis.url", "a URL starting with redis:// or rediss://");
        }
        self.redis.client()?;
        if !has_scheme(&self.smtp.url, &["smtp", "smtps"]) {
            return invalid(
                "smtp.url",
                "a URL starting with smtp:// (e.g. smtp://relay:587)",
            );
        }
        if !(1..=65_535).contains(&self.amqp.publish_window) {
            return invalid("amqp.publish_window", "a whole number from 1 to 65535");
        }
        if !(1..=64).contains(&self.amqp.channels) {
            return invalid("amqp.channels", "a whole number from 1 to 64");
        }
        self.check_minimums()?;
        if !(1..=1_000_000).contains(&self.api.max_connections) {
            return invalid("api.max_connections", "a whole number from 1 to 1000000");
        }
        if !(1..=1024).contains(&self.smtp.pool_size) {
            return invalid("smtp.pool_size", "a whole number from 1 to 1024");
        }
        if !(1..=4096).contains(&self.worker.concurrency) {
            return invalid("worker.concurrency", "a whole number from 1 to 4096");
        }
        self.check_limits()?;
        for (key, bytes) in [
            ("worker.max_inflight_bytes", self.worker.max_inflight_bytes),
            ("api.max_inflight_bytes", self.api.max_inflight_bytes),
        ] {
            if !(1024..=1 << 40).contains(&bytes) {
                return invalid(key, "a number of bytes from 1024 to 1099511627776");
            }
        }
        if self.worker.large_prefetch == 0 {
            return invalid("worker.large_prefetch", "a whole number from 1 to 65535");
        }
        if self.worker.prefetch == Some(0) {
            return invalid(
                "worker.prefetch",
                "a whole number from 1 to 65535, or unset",
            );
        }
        let retry = &self.worker.retry;
        if !(retry.multiplier.is_finite() && (1.0..=100.0).contains(&retry.multiplier)) {
            return invalid("worker.retry.multiplier", "a number from 1.0 to 100.0");
        }
        if retry.max_attempts == 0 {
            return invalid("worker.retry.max_attempts", "a whole number of at least 1");
        }
        if retry.initial.is_zero() || retry.initial > retry.max_interval {
            return invalid(
                "worker.retry.initial",
                "a duration above zero and not above worker.retry.max_interval",
            );
        }
        if self.redis.key_prefix.chars().any(char::is_whitespace) {
            return invalid(
                "redis.key_prefix",
                "text without spaces, e.g. \"mailroom:\"",
            );
        }
        Ok(())
    }

    /// Refuses a URL setting with a space, a line break or a control
    /// character inside, before any URL parser sees it: their messages
    /// quote the value, and what follows the break (a second line of a
    /// mounted file, say) may be a password of its own.
    fn check_urls_are_one_word(&self) -> Result<(), SettingsError> {
        let amqp = self.amqp.urls.iter().enumerate();
        let urls = amqp
            .map(|(index, url)| ("amqp.urls", Some(index + 1), url))
            .chain([
                ("redis.url", None, &self.redis.url),
                ("smtp.url", None, &self.smtp.url),
            ]);
        for (key, position, url) in urls {
            // Spaces around the URL are harmless: URL parsers drop them.
            let text = url.expose().trim();
            if is_one_word(text) {
                continue;
            }
            let shown = redact_url(text).unwrap_or_else(|| "[redacted]".to_owned());
            let entry = position.map_or(String::new(), |position| format!("entry {position} "));
            return Err(SettingsError::Invalid {
                key,
                allowed: format!(
                    "{entry}({shown}) holds more than one line or word (not shown); give one URL"
                ),
            });
        }
        Ok(())
    }

    /// Values a zero would break: every connect or publish timing out at
    /// once, a claim lease renewed in a busy loop, keys Redis refuses (it
    /// keeps them a whole second or more), every message refused.
    fn check_minimums(&self) -> Result<(), SettingsError> {
        const ABOVE_ZERO: Duration = Duration::from_millis(1);
        const SECOND: Duration = Duration::from_secs(1);
        for (key, value, least) in [
            (
                "amqp.connect_timeout",
                self.amqp.connect_timeout,
                ABOVE_ZERO,
            ),
            (
                "amqp.confirm_timeout",
                self.amqp.confirm_timeout,
                ABOVE_ZERO,
            ),
            ("redis.timeout", self.redis.timeout, ABOVE_ZERO),
            (
                "smtp.connect_timeout",
                self.smtp.connect_timeout,
                ABOVE_ZERO,
            ),
            (
                "smtp.command_timeout",
                self.smtp.command_timeout,
                ABOVE_ZERO,
            ),
            ("smtp.data_timeout", self.smtp.data_timeout, ABOVE_ZERO),
            ("api.request_timeout", self.api.request_timeout, ABOVE_ZERO),
            ("api.header_timeout", self.api.header_timeout, ABOVE_ZERO),
            (
                "api.idempotency_window",
                self.api.idempotency_window,
                SECOND,
            ),
            ("worker.dedup_window", self.worker.dedup_window, SECOND),
            ("worker.dedup_lease", self.worker.dedup_lease, SECOND),
            (
                "worker.status_retention",
                self.worker.status_retention,
                SECOND,
            ),
        ] {
            if value < least {
                return Err(SettingsError::Invalid {
                    key,
                    allowed: format!(
                        "a duration of at least {}, e.g. 30s",
                        humantime::format_duration(least)
                    ),
                });
            }
        }
        let limits = &self.limits;
        for (key, value, least) in [
            ("api.body_limit_bytes", self.api.body_limit_bytes, 1024),
            ("api.max_batch", self.api.max_batch, 1),
            ("limits.max_message_bytes", limits.max_message_bytes, 1024),
            ("limits.max_recipients", limits.max_recipients, 1),
            ("limits.max_subject_chars", limits.max_subject_chars, 1),
            (
                "limits.max_header_value_chars",
                limits.max_header_value_chars,
                1,
            ),
            (
                "limits.max_idempotency_key_chars",
                limits.max_idempotency_key_chars,
                crate::validate::MIN_IDEMPOTENCY_KEY_CHARS,
            ),
            ("limits.max_tenant_chars", limits.max_tenant_chars, 1),
        ] {
            if value < least {
                return Err(SettingsError::Invalid {
                    key,
                    allowed: format!("a whole number of at least {least}"),
                });
            }
        }
        Ok(())
    }

    /// Upper bounds of `[limits]` (`check_minimums` has the lower ones):
    /// the CLI reads a file up to them, and a job must fit in a broker
    /// message.
    fn check_limits(&self) -> Result<(), SettingsError> {
        let limits = &self.limits;
        if limits.max_message_bytes > MAX_MESSAGE_BYTES {
            return Err(SettingsError::Invalid {
                key: "limits.max_message_bytes",
                allowed: format!(
                    "a number of bytes from 1024 to {MAX_MESSAGE_BYTES} (64 MiB: a sealed job is \
                     about 1.4 times its message, and RabbitMQ refuses messages over 128 MiB by default)"
                ),
            });
        }
        if limits.max_attachment_bytes > limits.max_message_bytes {
            return Err(SettingsError::Invalid {
                key: "limits.max_attachment_bytes",
                allowed: format!(
                    "a number of bytes not above limits.max_message_bytes ({})",
                    limits.max_message_bytes
                ),
            });
        }
        Ok(())
    }

    /// The sealing keyring from `[seal]`.
    pub fn keyring(&self) -> Result<Keyring, SettingsError> {
        let keys = (!self.seal.keys.is_empty()).then(|| self.seal.keys.expose());
        Ok(Keyring::load(
            keys,
            self.seal.keys_file.as_deref(),
            self.seal.active.as_deref(),
        )?)
    }

    /// The secret keying Redis hashes; roles that store keyed hashes
    /// (worker dedup, API keys) call this at start and stop when it is unset.
    pub fn hash_key(&self) -> Result<&[u8], SettingsError> {
        let key = self.redis.hash_key.expose().as_bytes();
        if key.len() < MIN_HASH_KEY_LEN {
            return Err(SettingsError::Invalid {
                key: "redis.hash_key",
                allowed: format!(
                    "a secret of at least {MIN_HASH_KEY_LEN} bytes, the same on every worker and API replica (e.g. from `openssl rand -base64 32`); set MAILROOM__REDIS__HASH_KEY or MAILROOM__REDIS__HASH_KEY_FILE"
                ),
            });
        }
        Ok(key)
    }

    /// Prefetch the worker asks of the broker: by default twice
    /// `worker.concurrency`, because acks go out in batches and a delivery
    /// that is done but not yet acked still holds its place in the window.
    /// With a quarter more, that window was full at most acks of a drain
    /// and the pool short of work: twice drained ~6 % faster and left the
    /// cores idle 5–7 % of the time instead of 8–10 % (README, "Found
    /// through this benchmark"). Only jobs up to `wire::LARGE_JOB_BYTES`
    /// sealed are prefetched this many; larger ones have
    /// `worker.large_prefetch`.
    pub fn worker_prefetch(&self) -> u16 {
        let concurrency = self.worker.concurrency;
        self.worker
            .prefetch
            .unwrap_or_else(|| concurrency.saturating_mul(2))
    }
}

/// The secret settings `env` sets, with their text as it is there. Keys are
/// matched as the environment source matches them: any case, `__` for `.`.
fn env_secrets(env: &HashMap<String, String>) -> Vec<(SecretSlot, Secret)> {
    let prefix = format!("{ENV_PREFIX}__").to_lowercase();
    env.iter()
        .filter_map(|(key, value)| {
            let dotted = key.to_lowercase().strip_prefix(&prefix)?.replace("__", ".");
            ENV_SECRETS
                .iter()
                .find(|(name, _)| *name == dotted)
                .map(|(_, slot)| (*slot, Secret::new(value.as_str())))
        })
        .collect()
}

/// What the sources set, checked against the shape of the defaults where
/// the config crate is lenient: a key that is no setting is named with the
/// file (or the environment) it came from, which serde's message leaves
/// out; and a fraction, or a number beyond 64 bits, is refused where a
/// whole number goes. (The environment source reads
/// `99999999999999999999` as a float, which the config crate then rounds
/// and saturates to 18446744073709551615: a limit of no limit.)
fn check_shape(
    set: &config::Value,
    default: &serde_json::Value,
    key: &str,
) -> Result<(), SettingsError> {
    let refuse = |key: String, value: &config::Value, problem: String| {
        Err(SettingsError::Value {
            key,
            origin: value.origin().map(ToOwned::to_owned),
            problem,
        })
    };
    match (&set.kind, default) {
        (ValueKind::Table(table), serde_json::Value::Object(known)) => {
            for (name, value) in table {
                let key = if key.is_empty() {
                    name.clone()
                } else {
                    format!("{key}.{name}")
                };
                let Some(default) = known.get(name) else {
                    let names: Vec<&str> = known.keys().map(String::as_str).collect();
                    return refuse(
                        key,
                        value,
                        format!("no such setting; expected one of {}", names.join(", ")),
                    );
                };
                check_shape(value, default, &key)?;
            }
            Ok(())
        }
        (ValueKind::Float(number), default) if default.is_u64() || default.is_i64() => {
            // 2^63: the environment source reads anything up to i64::MAX as an integer.
            let whole =
                number.fract() == 0.0 && (0.0..9_223_372_036_854_775_808.0).contains(number);
            if whole {
                return Ok(());
            }
            refuse(
                key.to_owned(),
                set,
                format!("a whole number from 0 to {}, not {number}", i64::MAX),
            )
        }
        _ => Ok(()),
    }
}

/// `urls` trimmed, empty ones left out.
fn trimmed(urls: &[Secret]) -> Vec<Secret> {
    urls.iter()
        .map(|url| url.expose().trim())
        .filter(|url| !url.is_empty())
        .map(Secret::new)
        .collect()
}

fn has_scheme(url: &Secret, schemes: &[&str]) -> bool {
    url.expose()
        .split_once("://")
        .is_some_and(|(scheme, rest)| schemes.contains(&scheme) && !rest.is_empty())
}

fn read_secret(path: &Path, key: &'static str) -> Result<Secret, SettingsError> {
    std::fs::read_to_string(path)
        .map(|text| Secret::new(text.trim_end_matches(['\n', '\r'])))
        .map_err(|e| SettingsError::File {
            key,
            path: path.to_owned(),
            reason: e.kind().to_string(),
        })
}

/// Refuses a settings file that is not TOML, saying only where and why: the
/// config crate's message would quote the line, a password and all.
fn check_toml(path: &Path) -> Result<(), SettingsError> {
    let text = std::fs::read_to_string(path).map_err(|e| SettingsError::File {
        key: "--config",
        path: path.to_owned(),
        reason: e.kind().to_string(),
    })?;
    let Err(err) = toml::from_str::<toml::Table>(&text) else {
        return Ok(());
    };
    let (line, column) = err
        .span()
        .map_or((1, 1), |span| line_and_column(&text, span.start));
    Err(SettingsError::Syntax {
        path: path.to_owned(),
        line,
        column,
        reason: one_line(err.message()),
    })
}

/// Line and column (in characters), both from 1, of byte `at` in `text`.
fn line_and_column(text: &str, at: usize) -> (usize, usize) {
    let before = text.get(..at).unwrap_or(text);
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (
        before.matches('\n').count() + 1,
        before[line_start..].chars().count() + 1,
    )
}

/// The config crate's messages may span lines; start-up errors are one line.
fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests;
