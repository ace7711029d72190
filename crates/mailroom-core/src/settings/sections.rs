//! The settings sections. Every field has a default that works against a
//! local RabbitMQ, Redis and SMTP sink.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::ratelimit::Rate;

use super::Secret;
use crate::setting_enum;

/// `[amqp]`: the broker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpSettings {
    /// Broker URLs (`amqp://` or `amqps://`), tried in order: name every
    /// node of a cluster. They may hold passwords. One URL may be given as
    /// a plain string.
    #[serde(deserialize_with = "one_or_many")]
    pub urls: Vec<Secret>,
    /// A file with more URLs, one a line (a mounted secret).
    pub urls_file: Option<PathBuf>,
    /// How long one connection attempt may take.
    #[serde(with = "super::duration")]
    pub connect_timeout: Duration,
    /// How long a publish may take, sending and publisher confirm, before
    /// it is called failed (a blocked or stalled connection included).
    #[serde(with = "super::duration")]
    pub confirm_timeout: Duration,
    /// Unconfirmed messages a batch publish keeps in flight.
    pub publish_window: usize,
    /// Channels a producer keeps open, so concurrent callers don't queue on one.
    pub channels: usize,
}

impl Default for AmqpSettings {
    fn default() -> Self {
        Self {
            urls: vec![Secret::new("amqp://guest:guest@127.0.0.1:5672/%2f")],
            urls_file: None,
            connect_timeout: Duration::from_secs(5),
            confirm_timeout: Duration::from_secs(10),
            publish_window: 256,
            channels: 4,
        }
    }
}

/// `urls = "amqp://..."` as well as a list: refusing the string would
/// quote it, password and all, in the error.
fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Secret>, D::Error> {
    struct Urls;
    impl<'de> Visitor<'de> for Urls {
        type Value = Vec<Secret>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of amqp:// URLs, or one")
        }

        fn visit_str<E: de::Error>(self, url: &str) -> Result<Self::Value, E> {
            Ok(vec![Secret::new(url)])
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut urls = Vec::new();
            while let Some(url) = seq.next_element()? {
                urls.push(url);
            }
            Ok(urls)
        }
    }
    d.deserialize_any(Urls)
}

/// `[redis]`: dedup, status, rate limits, API keys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisSettings {
    /// `redis://` or `rediss://` URL; may hold a password.
    pub url: Secret,
    /// A file holding the URL (a mounted secret).
    pub url_file: Option<PathBuf>,
    /// Secret that keys the HMAC under which idempotency keys and API key
    /// hashes are stored, so Redis never holds a caller's key (which may
    /// contain an address). The same on every worker and API replica.
    pub hash_key: Secret,
    /// A file holding `hash_key` (a mounted secret).
    pub hash_key_file: Option<PathBuf>,
    /// Prefix of every key mailroom writes, so it can share a Redis.
    pub key_prefix: String,
    /// How long one command may take.
    #[serde(with = "super::duration")]
    pub timeout: Duration,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            url: Secret::new("redis://127.0.0.1:6379"),
            url_file: None,
            hash_key: Secret::default(),
            hash_key_file: None,
            key_prefix: "mailroom:".to_owned(),
            timeout: Duration::from_secs(2),
        }
    }
}

setting_enum! {
    /// How the SMTP connection is protected.
    TlsMode {
        /// Plain connect, then STARTTLS, which must succeed.
        StarttlsRequired = "starttls-required" (default),
        /// TLS from the first byte (port 465).
        Implicit = "implicit",
        /// STARTTLS when offered, plain otherwise.
        Opportunistic = "opportunistic",
        /// No TLS: only for a loopback host, or with `allow_plaintext`.
        None = "none",
    }
}

/// `[smtp]`: the relay mail is delivered to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmtpSettings {
    /// `smtp://host:port`.
    pub url: Secret,
    /// TLS mode.
    pub tls: TlsMode,
    /// Allow `tls = "none"` to a host that is not loopback.
    pub allow_plaintext: bool,
    /// AUTH user name, if the relay wants one.
    pub username: Option<String>,
    /// AUTH password.
    pub password: Secret,
    /// A file holding the password (a mounted secret).
    pub password_file: Option<PathBuf>,
    /// Name sent in EHLO; the machine's host name when unset.
    pub hello_name: Option<String>,
    /// A PEM file of CA certificates trusted for the relay, beside the
    /// system's (a private CA).
    pub ca_file: Option<PathBuf>,
    /// Connections kept open to the relay.
    pub pool_size: u32,
    /// How long connecting (and the TLS handshake) may take.
    #[serde(with = "super::duration")]
    pub connect_timeout: Duration,
    /// How long one SMTP command may wait for its reply, and a write of
    /// the message may go without progress.
    #[serde(with = "super::duration")]
    pub command_timeout: Duration,
    /// How long the reply to the end of DATA may take: the relay may be
    /// scanning the message, and giving up leaves it unknown whether the
    /// relay took it (RFC 5321 §4.5.3.2.6 asks for 10 minutes).
    #[serde(with = "super::duration")]
    pub data_timeout: Duration,
}

impl Default for SmtpSettings {
    fn default() -> Self {
        Self {
            url: Secret::new("smtp://127.0.0.1:2525"),
            tls: TlsMode::default(),
            allow_plaintext: false,
            username: None,
            password: Secret::default(),
            password_file: None,
            hello_name: None,
            ca_file: None,
            pool_size: 16,
            connect_timeout: Duration::from_secs(10),
            command_timeout: Duration::from_secs(30),
            data_timeout: Duration::from_mins(10),
        }
    }
}

/// `[seal]`: the keyring. Keys come from the environment or a file, never
/// from `mailroom.toml` in a repository.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SealSettings {
    /// `kid:base64` entries, comma separated.
    pub keys: Secret,
    /// A file of `kid:base64` lines (a mounted Kubernetes Secret).
    pub keys_file: Option<PathBuf>,
    /// The kid that seals new jobs; may be left out when one key is loaded.
    pub active: Option<String>,
}

setting_enum! {
    /// Where a worker delivers mail.
    TransportKind {
        /// Write each message as an `.eml` file into `worker.outbox_dir`: lets
        /// anyone try mailroom with no SMTP server.
        File = "file" (default),
        /// Deliver to `[smtp]`.
        Smtp = "smtp",
    }
}

setting_enum! {
    /// What to do when a send's outcome is unknown (the connection died after
    /// the end of DATA, before the reply).
    OnUncertain {
        /// Send again with the same Message-ID (receivers may collapse it).
        Retry = "retry" (default),
        /// Dead-letter with reason `uncertain` for an operator to decide.
        Park = "park",
    }
}

/// `[worker.retry]`: the backoff schedule of transient failures.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetrySettings {
    /// Delay before the second attempt.
    #[serde(with = "super::duration")]
    pub initial: Duration,
    /// Factor between successive delays.
    pub multiplier: f32,
    /// Longest delay.
    #[serde(with = "super::duration")]
    pub max_interval: Duration,
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// No retry once a job is this old.
    #[serde(with = "super::duration")]
    pub max_age: Duration,
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(5),
            multiplier: 3.0,
            max_interval: Duration::from_hours(1),
            max_attempts: 8,
            max_age: Duration::from_hours(24),
        }
    }
}

/// `[worker]`: the pool.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerSettings {
    /// Jobs processed at once.
    pub concurrency: u16,
    /// Unacked deliveries the broker may push; defaults to twice
    /// `concurrency`.
    pub prefetch: Option<u16>,
    /// Prefetch of the transactional lane's large-job queue (jobs over
    /// `wire::LARGE_JOB_BYTES` sealed; the bulk lane's takes three
    /// quarters): bounds the memory prefetched large jobs take, up to
    /// ~13.4 MiB each.
    pub large_prefetch: u16,
    /// Sealed bytes of the jobs in work at once: a job waits until its
    /// size fits, and one larger than this runs alone. Bounds the memory
    /// large messages take in work (each costs several times its size);
    /// not the prefetched deliveries, which RabbitMQ counts only by number.
    pub max_inflight_bytes: usize,
    /// Where mail goes.
    pub transport: TransportKind,
    /// Folder of the `file` transport.
    pub outbox_dir: PathBuf,
    /// How long a sent key is remembered, so a duplicate is not sent.
    #[serde(with = "super::duration")]
    pub dedup_window: Duration,
    /// How long a claim holds before another worker may take the job over.
    #[serde(with = "super::duration")]
    pub dedup_lease: Duration,
    /// Uncertain outcomes.
    pub on_uncertain: OnUncertain,
    /// Time in-flight jobs get to finish on SIGTERM.
    #[serde(with = "super::duration")]
    pub shutdown_grace: Duration,
    /// How long job statuses are kept.
    #[serde(with = "super::duration")]
    pub status_retention: Duration,
    /// Address of `/healthz`, `/readyz` and `/metrics`.
    pub health_bind: SocketAddr,
    /// Backoff schedule.
    pub retry: RetrySettings,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            concurrency: 64,
            prefetch: None,
            large_prefetch: 4,
            max_inflight_bytes: 64 * 1024 * 1024,
            transport: TransportKind::default(),
            outbox_dir: PathBuf::from("mailroom-outbox"),
            dedup_window: Duration::from_hours(24),
            dedup_lease: Duration::from_secs(30),
            on_uncertain: OnUncertain::default(),
            shutdown_grace: Duration::from_secs(25),
            status_retention: Duration::from_hours(7 * 24),
            health_bind: SocketAddr::from(([127, 0, 0, 1], 9464)),
            retry: RetrySettings::default(),
        }
    }
}

/// `[api]`: the HTTP API.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiSettings {
    /// Listen address.
    pub bind: SocketAddr,
    /// Largest request body accepted.
    pub body_limit_bytes: usize,
    /// Bytes of large request bodies (over 64 KiB) read and worked at
    /// once, across connections: such a request waits until its declared
    /// length fits (a larger one is taken alone), so a burst of large
    /// bodies cannot take the memory.
    pub max_inflight_bytes: usize,
    /// Longest a request may take.
    #[serde(with = "super::duration")]
    pub request_timeout: Duration,
    /// Longest a client may take to send a request's headers; also how
    /// long an idle keep-alive connection is kept.
    #[serde(with = "super::duration")]
    pub header_timeout: Duration,
    /// Client connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Most messages in one `POST /v1/messages/batch`.
    pub max_batch: usize,
    /// Requests a tenant may make, over all its keys, fleet-wide.
    pub tenant_rate: Rate,
    /// Requests a key may make when it was created without `--rate`.
    pub key_rate: Rate,
    /// How long an `Idempotency-Key` is remembered.
    #[serde(with = "super::duration")]
    pub idempotency_window: Duration,
    /// Proxies (CIDRs) whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<String>,
    /// Clients (CIDRs) refused whatever their key allows.
    pub deny_cidrs: Vec<String>,
    /// OAuth 2.0 bearer tokens (JWT), beside API keys; off when unset.
    pub jwt: Option<JwtSettings>,
    /// Serve HTTPS with this certificate chain (PEM); plain HTTP when unset.
    pub tls_cert_file: Option<PathBuf>,
    /// The certificate's private key (PEM).
    pub tls_key_file: Option<PathBuf>,
}

setting_enum! {
    /// The one signature algorithm JWTs must use (pinned: the token's own
    /// `alg` header never chooses).
    JwtAlgorithm {
        /// Ed25519.
        EdDsa = "EdDSA" (default),
        /// ECDSA P-256 with SHA-256.
        Es256 = "ES256",
        /// RSA PKCS#1 v1.5 with SHA-256, 2048 bits or more.
        Rs256 = "RS256",
    }
}

/// `[api.jwt]`: OAuth 2.0 access tokens as JWTs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtSettings {
    /// Required `iss`.
    pub issuer: String,
    /// Required in `aud`.
    pub audience: String,
    /// The verification keys: a JWKS file (one key or several, by `kid`).
    pub jwks_file: PathBuf,
    /// The pinned algorithm.
    pub algorithm: JwtAlgorithm,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(with = "super::duration")]
    pub leeway: Duration,
    /// The claim naming the tenant.
    pub tenant_claim: String,
}

impl Default for JwtSettings {
    fn default() -> Self {
        Self {
            issuer: String::new(),
            audience: String::new(),
            jwks_file: PathBuf::new(),
            algorithm: JwtAlgorithm::default(),
            leeway: Duration::from_secs(30),
            tenant_claim: "tenant".to_owned(),
        }
    }
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            body_limit_bytes: 16 * 1024 * 1024,
            max_inflight_bytes: 64 * 1024 * 1024,
            request_timeout: Duration::from_secs(30),
            header_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            max_batch: 100,
            tenant_rate: Rate {
                count: 500,
                period: Duration::from_secs(1),
            },
            key_rate: Rate {
                count: 100,
                period: Duration::from_secs(1),
            },
            idempotency_window: Duration::from_hours(24),
            trusted_proxies: Vec::new(),
            deny_cidrs: Vec::new(),
            jwt: None,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}
