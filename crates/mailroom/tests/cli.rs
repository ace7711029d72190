//! The binary as an operator meets it: flags, exit codes, what it prints.

use std::process::{Command, Output};

use mailroom_core::seal::Keyring;

/// Runs `mailroom` in an empty folder with only the given `MAILROOM*` variables.
fn mailroom(args: &[&str], env: &[(&str, &str)]) -> Output {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut command = Command::new(env!("CARGO_BIN_EXE_mailroom"));
    command.args(args).current_dir(dir.path());
    for (key, _) in std::env::vars().filter(|(key, _)| key.starts_with("MAILROOM")) {
        command.env_remove(key);
    }
    command.envs(env.iter().copied());
    command.output().expect("mailroom runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn help_lists_the_subcommands() {
    let output = mailroom(&["--help"], &[]);
    assert!(output.status.success());
    let text = stdout(&output);
    for command in ["keys", "config"] {
        assert!(text.contains(command), "{command} missing from {text}");
    }
}

#[test]
fn keys_generate_prints_a_loadable_line() {
    let output = mailroom(&["keys", "generate", "--kid", "k2026a"], &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    let line = stdout(&output);
    let line = line.trim();
    assert!(line.starts_with("k2026a:"), "{line}");
    let ring = Keyring::load(Some(line), None, None).expect("the line loads");
    assert_eq!(ring.active().kid(), "k2026a");
    // Two runs never give the same key.
    let again = stdout(&mailroom(&["keys", "generate", "--kid", "k2026a"], &[]));
    assert_ne!(line, again.trim());
}

#[test]
fn keys_generate_rejects_a_bad_kid() {
    let output = mailroom(&["keys", "generate", "--kid", "no spaces"], &[]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("--kid"), "{}", stderr(&output));
    assert!(stdout(&output).is_empty());
}

#[test]
fn config_prints_settings_without_secrets() {
    let key = stdout(&mailroom(&["keys", "generate", "--kid", "k1"], &[]));
    let key = key.trim();
    let output = mailroom(
        &["config"],
        &[
            ("MAILROOM__SEAL__KEYS", key),
            (
                "MAILROOM__AMQP__URLS",
                "amqp://app:amqp-pass@rabbit:5672/%2f",
            ),
            ("MAILROOM__SMTP__PASSWORD", "smtp-pass"),
            ("MAILROOM__WORKER__CONCURRENCY", "32"),
        ],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.contains("concurrency = 32"), "{text}");
    assert!(text.contains("amqp://app:***@rabbit:5672"), "{text}");
    assert!(text.contains("sealing with k1"), "{text}");
    let (_, key_bytes) = key.split_once(':').expect("kid:base64");
    for secret in ["amqp-pass", "smtp-pass", key_bytes] {
        assert!(!text.contains(secret), "{secret} printed");
    }
}

#[test]
fn config_stops_on_a_bad_value_with_one_line() {
    let output = mailroom(&["config"], &[("MAILROOM__SMTP__TLS", "sometimes")]);
    assert!(!output.status.success());
    let text = stderr(&output);
    assert_eq!(text.trim_end().lines().count(), 1, "{text}");
    assert!(
        text.contains("smtp.tls") && text.contains("starttls-required"),
        "{text}"
    );
}

#[test]
fn config_reads_the_file_named_by_flag() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("custom.toml");
    std::fs::write(&path, "[api]\nbind = \"0.0.0.0:9000\"\n").expect("write");
    let path = path.to_str().expect("utf-8");
    let output = mailroom(&["--config", path, "config"], &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("0.0.0.0:9000"));
}
