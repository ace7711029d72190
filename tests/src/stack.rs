//! The whole stack a worker test needs: a vhost, a Redis prefix, an SMTP
//! server, fresh keys, and the settings (or environment) that join them.

use std::time::Duration;

use mailroom_core::seal::SealKey;
use mailroom_core::settings::{Secret, Settings, TransportKind};
use mailroom_producer::api::Api;
use mailroom_producer::api::keys::{NewKey, Scope};
use tokio_util::sync::CancellationToken;

use crate::rabbit::TestVhost;
use crate::redis::TestPrefix;
use crate::smtp::{SmtpOptions, SmtpServer};

/// Quick retries and a short lease, so tests about them finish in seconds.
pub const TEST_LEASE: Duration = Duration::from_secs(3);

/// Settings for `vhost` and `redis`, with a fresh sealing key `test` (the
/// only key, so active).
pub fn base_settings(vhost: &TestVhost, redis: &TestPrefix) -> Settings {
    let key = SealKey::generate("test").expect("seal key");
    let mut settings = Settings::default();
    settings.amqp = vhost.settings();
    settings.redis = redis.settings();
    settings.seal.keys = Secret::new(key.to_line().as_str());
    settings.seal.active = Some("test".to_owned());
    settings
}

/// A vhost, a prefix, an SMTP server and settings pointing at them.
pub struct Stack {
    /// The broker vhost.
    pub vhost: TestVhost,
    /// The Redis prefix.
    pub redis: TestPrefix,
    /// The SMTP server.
    pub smtp: SmtpServer,
    /// Settings for a worker or producer of this stack.
    pub settings: Settings,
    seal_line: String,
}

impl Stack {
    /// A new stack; `label` names the vhost and prefix.
    pub fn new(label: &str, smtp: &SmtpOptions) -> Self {
        let vhost = TestVhost::new(label);
        let redis = TestPrefix::new(label);
        let server = SmtpServer::start(smtp);
        let mut settings = base_settings(&vhost, &redis);
        let seal_line = settings.seal.keys.expose().to_owned();
        settings.smtp = server.settings(smtp.auth);
        settings.worker.transport = TransportKind::Smtp;
        settings.worker.concurrency = 8;
        settings.worker.dedup_lease = TEST_LEASE;
        settings.worker.shutdown_grace = Duration::from_secs(10);
        settings.worker.health_bind.set_port(0);
        settings.worker.retry.initial = Duration::from_secs(1);
        settings.worker.retry.multiplier = 1.0;
        settings.worker.retry.max_attempts = 4;
        Self {
            vhost,
            redis,
            smtp: server,
            settings,
            seal_line,
        }
    }

    /// The same settings as `MAILROOM__*` variables, for a `mailroom`
    /// process.
    pub fn env(&self) -> Vec<(String, String)> {
        let s = &self.settings;
        let mut env = vec![
            ("MAILROOM__AMQP__URLS", s.amqp.urls[0].expose().to_owned()),
            ("MAILROOM__REDIS__URL", s.redis.url.expose().to_owned()),
            ("MAILROOM__REDIS__KEY_PREFIX", s.redis.key_prefix.clone()),
            (
                "MAILROOM__REDIS__HASH_KEY",
                s.redis.hash_key.expose().to_owned(),
            ),
            ("MAILROOM__SEAL__KEYS", self.seal_line.clone()),
            ("MAILROOM__SEAL__ACTIVE", "test".to_owned()),
            ("MAILROOM__SMTP__URL", s.smtp.url.expose().to_owned()),
            ("MAILROOM__SMTP__HELLO_NAME", "mailroom-test".to_owned()),
            ("MAILROOM__WORKER__TRANSPORT", "smtp".to_owned()),
            (
                "MAILROOM__WORKER__CONCURRENCY",
                s.worker.concurrency.to_string(),
            ),
            (
                "MAILROOM__WORKER__DEDUP_LEASE",
                format!("{}s", s.worker.dedup_lease.as_secs()),
            ),
            (
                "MAILROOM__WORKER__SHUTDOWN_GRACE",
                format!("{}s", s.worker.shutdown_grace.as_secs()),
            ),
            (
                "MAILROOM__WORKER__ON_UNCERTAIN",
                s.worker.on_uncertain.as_str().to_owned(),
            ),
            ("MAILROOM__WORKER__HEALTH_BIND", "127.0.0.1:0".to_owned()),
            ("MAILROOM__WORKER__RETRY__INITIAL", "1s".to_owned()),
            ("MAILROOM__WORKER__RETRY__MULTIPLIER", "1.0".to_owned()),
            ("RUST_LOG", "info".to_owned()),
        ];
        if let Some(ca) = &s.smtp.ca_file {
            env.push(("MAILROOM__SMTP__CA_FILE", ca.display().to_string()));
        }
        env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
    }
}

/// An API key for `tenant` with `scopes`, no network or rate limits of its
/// own, never expiring.
pub fn new_key(tenant: &str, scopes: &[Scope]) -> NewKey {
    NewKey {
        tenant: tenant.to_owned(),
        scopes: scopes.to_vec(),
        allow_cidrs: Vec::new(),
        rate: None,
        expires_at: None,
    }
}

/// Serves `api` on a free port until the token is cancelled.
pub async fn serve_api(api: Api) -> (u16, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let shutdown = CancellationToken::new();
    tokio::spawn(api.serve(listener, shutdown.clone()));
    (port, shutdown)
}

/// An API made with `settings`, and a send key of tenant `acme`.
pub async fn api_with_key(settings: &Settings) -> (Api, String) {
    let api = Api::connect(settings).await.expect("api");
    let (key, _) = api
        .keys()
        .create(new_key("acme", &[Scope::Send]))
        .await
        .expect("key");
    (api, key)
}
