//! `mailroom config`: the effective settings, as TOML, secrets redacted;
//! then the checks the roles make at start that loading the settings does
//! not (sealing keys, CIDRs, the SMTP relay, JWT keys), so a setting that
//! would stop a worker or the API exits non-zero here too.

use std::path::Path;

use anyhow::bail;
use mailroom_core::seal::KeyringError;
use mailroom_core::settings::{Settings, SettingsError, TransportKind};
use mailroom_producer::api::NetworkPolicy;
use mailroom_producer::api::jwt::JwtVerifier;
use mailroom_worker::transport::SmtpTransport;

/// Prints the settings that `path`, `mailroom.toml` and the environment make.
pub fn run(path: Option<&Path>) -> anyhow::Result<()> {
    let settings = Settings::load(path)?;
    // Secrets serialize redacted, so the whole document is safe to print.
    print!("{}", toml::to_string_pretty(&settings)?);
    match settings.keyring() {
        Ok(ring) => println!(
            "\n# seal: keys loaded: {}; sealing with {}",
            ring.kids().collect::<Vec<_>>().join(", "),
            ring.active().kid()
        ),
        // Not a problem here: `demo` makes a throwaway key, and the roles
        // that seal or open say so at start.
        Err(err @ SettingsError::Keyring(KeyringError::NoKeys)) => {
            println!("\n# seal: not usable: {err}");
        }
        // A problem, reported with the others.
        Err(_) => {}
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
    match settings.keyring() {
        Ok(_) | Err(SettingsError::Keyring(KeyringError::NoKeys)) => {}
        Err(err) => problems.push(err.to_string()),
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
        assert_eq!(
            problems(&settings),
            Vec::<String>::new(),
            "no keys is no problem here"
        );
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
