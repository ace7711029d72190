//! `mailroom config`: the effective settings, as TOML, secrets redacted;
//! then the checks the roles make at start that loading the settings does
//! not (sealing keys, CIDRs, the SMTP relay, JWT keys), so a setting that
//! would stop a worker or the API exits non-zero here too.

use std::path::Path;

use anyhow::bail;
use mailroom_core::settings::{Settings, TransportKind};
use mailroom_producer::api::jwt::JwtVerifier;
use mailroom_producer::api::{NetworkPolicy, tls_files};
use mailroom_worker::transport::SmtpTransport;

/// Prints the settings that `path`, `mailroom.toml` and the environment make.
pub fn run(path: Option<&Path>) -> anyhow::Result<()> {
    let settings = Settings::load(path)?;
    // Secrets serialize redacted, so the whole document is safe to print.
    print!("{}", toml::to_string_pretty(&settings)?);
    if let Ok(ring) = settings.keyring() {
        println!(
            "\n# seal: keys loaded: {}; sealing with {}",
            ring.kids().collect::<Vec<_>>().join(", "),
            ring.active().kid()
        );
    }
    let problems = problems(&settings);
    for problem in &problems {
        eprintln!("mailroom: {problem}");
    }
    if !problems.is_empty() {
        bail!(
            "{} setting(s) would stop a worker or the API (see above)",
            problems.len()
        );
    }
    Ok(())
}

/// What the roles would refuse at start, beyond what loading checks:
/// each the error of the function the role itself calls.
fn problems(settings: &Settings) -> Vec<String> {
    let mut problems = Vec::new();
    // `demo` makes keys of its own; a worker or the API needs them.
    if let Err(err) = settings.keyring() {
        problems.push(err.to_string());
    }
    if let Err(err) = settings.hash_key() {
        problems.push(err.to_string());
    }
    if let Err(err) = mailroom_core::telemetry::check_log_filter(&settings.telemetry) {
        problems.push(err.to_string());
    }
    if let Err(err) = tls_files(&settings.api) {
        problems.push(err.to_string());
    }
    if let Err(err) = NetworkPolicy::new(&settings.api.trusted_proxies, &settings.api.deny_cidrs) {
        problems.push(err.to_string());
    }
    if let Some(jwt) = &settings.api.jwt
        && let Err(err) = JwtVerifier::from_settings(jwt)
    {
        problems.push(format!("api.jwt: {err}"));
    }
    if settings.worker.transport == TransportKind::Smtp
        && let Err(err) = SmtpTransport::new(&settings.smtp)
    {
        problems.push(err.to_string());
    }
    problems
}

#[cfg(test)]
mod tests {
    use mailroom_core::settings::Secret;

    use super::*;

    #[test]
    fn settings_the_roles_would_refuse_are_problems() {
        let mut settings = Settings::default();
        let problems_of = |settings: &Settings| problems(settings).join("\n");
        let none = problems_of(&settings);
        assert!(none.contains("MAILROOM__SEAL__KEYS"), "no keys: {none}");
        assert!(none.contains("redis.hash_key"), "no hash key: {none}");
        settings.seal.keys = Secret::new(format!("k1:{}", "A".repeat(43) + "="));
        settings.redis.hash_key = Secret::new("0123456789abcdef0123");
        assert_eq!(problems(&settings), Vec::<String>::new());
        settings.telemetry.log_filter = Some("info,[[[".to_owned());
        settings.api.tls_cert_file = Some("/nonexistent/cert.pem".into());
        let half = problems_of(&settings);
        // RUST_LOG, when set, is the filter a role runs with.
        if std::env::var_os("RUST_LOG").is_none() {
            assert!(half.contains("log_filter"), "{half}");
        }
        assert!(
            half.contains("api.tls_cert_file and api.tls_key_file"),
            "{half}"
        );
        settings.api.tls_key_file = Some("/nonexistent/key.pem".into());
        assert!(problems_of(&settings).contains("/nonexistent/cert.pem"));
        settings.telemetry.log_filter = None;
        settings.api.tls_cert_file = None;
        settings.api.tls_key_file = None;
        settings.seal.keys = Secret::new("k1:not-base64!");
        settings.api.deny_cidrs = vec!["garbage".to_owned()];
        settings.worker.transport = TransportKind::Smtp;
        settings.smtp.url = Secret::new("smtp://relay:smtp");
        let problems = problems(&settings);
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].contains("seal.keys entry 1"), "{problems:?}");
        assert!(problems[1].contains("api.deny_cidrs"), "{problems:?}");
        assert!(
            problems[2].contains("smtp.url") && problems[2].contains("port"),
            "{problems:?}"
        );
    }
}
