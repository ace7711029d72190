use std::io::Write as _;
use std::time::Duration;

use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn load(pairs: &[(&str, &str)]) -> Result<Settings, SettingsError> {
    Settings::load_with_env(None, env(pairs))
}

fn toml_file(text: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("temp file");
    file.write_all(text.as_bytes()).expect("write");
    file
}

#[test]
fn defaults_work_locally() {
    let settings = load(&[]).expect("defaults load");
    assert_eq!(settings, Settings::default());
    assert_eq!(settings.worker.concurrency, 64);
    assert_eq!(settings.worker_prefetch(), 128);
    assert_eq!(settings.worker.large_prefetch, 4);
    assert_eq!(
        settings.amqp.urls[0].expose(),
        "amqp://guest:guest@127.0.0.1:5672/%2f"
    );
}

#[test]
fn environment_overrides_file_overrides_defaults() {
    let file = toml_file(
        "[worker]\nconcurrency = 8\nshutdown_grace = \"10s\"\n[smtp]\ntls = \"implicit\"\n",
    );
    let settings = Settings::load_with_env(
        Some(file.path()),
        env(&[
            ("MAILROOM__WORKER__CONCURRENCY", "16"),
            ("OTHER__WORKER__CONCURRENCY", "2"),
        ]),
    )
    .expect("loads");
    assert_eq!(settings.worker.concurrency, 16);
    assert_eq!(settings.worker.shutdown_grace, Duration::from_secs(10));
    assert_eq!(settings.smtp.tls, TlsMode::Implicit);
    assert_eq!(settings.worker.retry, RetrySettings::default());
}

#[test]
fn nested_sections_and_lists_come_from_the_environment() {
    let settings = load(&[
        ("MAILROOM__WORKER__RETRY__MAX_ATTEMPTS", "3"),
        (
            "MAILROOM__AMQP__URLS",
            "amqp://a:1@r1:5672,amqps://a:1@r2:5671",
        ),
        ("MAILROOM__SEAL__ACTIVE", "2026"),
        ("MAILROOM__LIMITS__BLOCKED_EXTENSIONS", "exe,zip"),
        ("MAILROOM__LIMITS__MAX_RECIPIENTS", "5"),
    ])
    .expect("loads");
    assert_eq!(settings.limits.blocked_extensions, ["exe", "zip"]);
    assert_eq!(settings.limits.max_recipients, 5);
    assert_eq!(settings.worker.retry.max_attempts, 3);
    assert_eq!(settings.amqp.urls.len(), 2);
    assert_eq!(settings.seal.active.as_deref(), Some("2026"));
}

#[test]
fn secrets_come_from_files() {
    let password = toml_file("s3cret\n");
    let urls = toml_file("amqp://u:p@r1\namqp://u:p@r2\n");
    let settings = load(&[
        (
            "MAILROOM__SMTP__PASSWORD_FILE",
            password.path().to_str().expect("utf-8"),
        ),
        (
            "MAILROOM__AMQP__URLS_FILE",
            urls.path().to_str().expect("utf-8"),
        ),
    ])
    .expect("loads");
    assert_eq!(settings.smtp.password.expose(), "s3cret");
    assert_eq!(settings.amqp.urls.len(), 2);
}

#[test]
fn missing_secret_file_names_the_setting() {
    let err = load(&[("MAILROOM__REDIS__URL_FILE", "/nonexistent/url")]).expect_err("no file");
    let shown = err.to_string();
    assert!(
        shown.contains("redis.url_file") && shown.contains("/nonexistent/url"),
        "{shown}"
    );
}

#[test]
fn missing_config_file_is_an_error() {
    let err = Settings::load_with_env(Some(Path::new("/nonexistent.toml")), env(&[]))
        .expect_err("no file");
    assert!(err.to_string().contains("/nonexistent.toml"), "{err}");
}

/// Each bad value stops start-up with one line naming the key and what is allowed.
#[test]
fn bad_values_name_the_setting_and_what_is_allowed() {
    for (key, value, named, allowed) in [
        (
            "MAILROOM__WORKER__CONCURRENCY",
            "lots",
            "worker.concurrency",
            "integer",
        ),
        (
            "MAILROOM__WORKER__CONCURRENCY",
            "0",
            "worker.concurrency",
            "1 to 4096",
        ),
        (
            "MAILROOM__WORKER__LARGE_PREFETCH",
            "0",
            "worker.large_prefetch",
            "1 to 65535",
        ),
        (
            "MAILROOM__WORKER__MAX_INFLIGHT_BYTES",
            "100",
            "worker.max_inflight_bytes",
            "from 1024",
        ),
        (
            "MAILROOM__SMTP__TLS",
            "maybe",
            "smtp.tls",
            "starttls-required",
        ),
        (
            "MAILROOM__WORKER__SHUTDOWN_GRACE",
            "soon",
            "worker.shutdown_grace",
            "30s",
        ),
        (
            "MAILROOM__API__HEADER_TIMEOUT",
            "0s",
            "api.header_timeout",
            "at least 1ms",
        ),
        (
            "MAILROOM__API__MAX_CONNECTIONS",
            "0",
            "api.max_connections",
            "1 to 1000000",
        ),
        (
            "MAILROOM__WORKER__RETRY__MULTIPLIER",
            "0.5",
            "worker.retry.multiplier",
            "1.0 to 100.0",
        ),
        (
            "MAILROOM__AMQP__URLS",
            "http://rabbit",
            "amqp.urls",
            "amqp://",
        ),
        (
            "MAILROOM__REDIS__URL",
            "localhost:6379",
            "redis.url",
            "redis://",
        ),
        (
            "MAILROOM__API__BIND",
            "everywhere",
            "api.bind",
            "socket address",
        ),
        (
            "MAILROOM__WORKER__ON_UNCERTAIN",
            "guess",
            "worker.on_uncertain",
            "park",
        ),
        ("MAILROOM__WORKER__TYPO", "1", "typo", "expected one of"),
        (
            "MAILROOM__TELEMETRY__LOG_FORMAT",
            "xml",
            "telemetry.log_format",
            "auto, json, pretty",
        ),
    ] {
        assert_refused(key, value, named, allowed);
    }
}

/// A zero, or a window Redis cannot keep, stops start-up too.
#[test]
fn values_below_their_minimum_name_the_minimum() {
    for (key, value, named, allowed) in [
        (
            "MAILROOM__WORKER__DEDUP_LEASE",
            "0s",
            "worker.dedup_lease",
            "at least 1s",
        ),
        (
            "MAILROOM__WORKER__DEDUP_WINDOW",
            "500ms",
            "worker.dedup_window",
            "at least 1s",
        ),
        (
            "MAILROOM__AMQP__CONFIRM_TIMEOUT",
            "0s",
            "amqp.confirm_timeout",
            "at least 1ms",
        ),
        (
            "MAILROOM__LIMITS__MAX_MESSAGE_BYTES",
            "0",
            "limits.max_message_bytes",
            "at least 1024",
        ),
        (
            "MAILROOM__API__MAX_BATCH",
            "0",
            "api.max_batch",
            "at least 1",
        ),
        (
            "MAILROOM__LIMITS__MAX_IDEMPOTENCY_KEY_CHARS",
            "63",
            "limits.max_idempotency_key_chars",
            "at least 64",
        ),
    ] {
        assert_refused(key, value, named, allowed);
    }
}

/// `key=value` stops start-up with one line naming `named` and `allowed`.
fn assert_refused(key: &str, value: &str, named: &str, allowed: &str) {
    let err = load(&[(key, value)]).expect_err(key);
    let shown = err.to_string();
    assert!(!shown.contains('\n'), "{shown}");
    assert!(shown.contains(named), "{key}: {shown}");
    assert!(shown.contains(allowed), "{key}: {shown}");
}

#[test]
fn bad_values_do_not_echo_secrets() {
    let err = load(&[("MAILROOM__REDIS__URL", "tcp://:hunter2@redis")]).expect_err("bad scheme");
    assert!(!err.to_string().contains("hunter2"), "{err}");
}

#[test]
fn printed_settings_redact_every_secret() {
    let keys = crate::seal::SealKey::generate("k1").expect("kid").to_line();
    let settings = load(&[
        (
            "MAILROOM__AMQP__URLS",
            "amqp://app:amqp-pass@rabbit:5672/%2f",
        ),
        ("MAILROOM__REDIS__URL", "redis://:redis-pass@redis:6379"),
        ("MAILROOM__SMTP__PASSWORD", "smtp-pass"),
        ("MAILROOM__SEAL__KEYS", keys.as_str()),
    ])
    .expect("loads");
    let shown = serde_json::to_string(&settings).expect("json");
    for secret in ["amqp-pass", "redis-pass", "smtp-pass", &keys[3..]] {
        assert!(!shown.contains(secret), "{secret} in {shown}");
    }
    assert!(
        shown.contains("rabbit:5672") && shown.contains("[redacted]"),
        "{shown}"
    );
    assert!(!format!("{settings:?}").contains("smtp-pass"));
}

#[test]
fn keyring_comes_from_seal_settings() {
    let line = crate::seal::SealKey::generate("k1").expect("kid").to_line();
    let settings = load(&[("MAILROOM__SEAL__KEYS", line.as_str())]).expect("loads");
    assert_eq!(settings.keyring().expect("keyring").active().kid(), "k1");
    let err = load(&[]).expect("loads").keyring().expect_err("no keys");
    assert!(err.to_string().contains("MAILROOM__SEAL__KEYS"), "{err}");
}

#[test]
fn hash_key_is_required_where_used_and_comes_from_a_file() {
    let err = load(&[]).expect("loads").hash_key().expect_err("unset");
    assert!(
        err.to_string().contains("MAILROOM__REDIS__HASH_KEY"),
        "{err}"
    );
    let short = load(&[("MAILROOM__REDIS__HASH_KEY", "short")]).expect("loads");
    assert!(short.hash_key().is_err());
    let file = toml_file("0123456789abcdef0123\n");
    let settings = load(&[(
        "MAILROOM__REDIS__HASH_KEY_FILE",
        file.path().to_str().expect("utf-8"),
    )])
    .expect("loads");
    assert_eq!(settings.hash_key().expect("set"), b"0123456789abcdef0123");
}

/// The environment source guesses at types: secrets must not be changed by it.
#[test]
fn secrets_from_the_environment_keep_their_exact_text() {
    let settings = load(&[
        ("MAILROOM__SMTP__PASSWORD", "0071234"),
        ("MAILROOM__REDIS__HASH_KEY", "TRUE"),
        ("MAILROOM__SEAL__KEYS", "1e3"),
        ("MAILROOM__SMTP__URL", "smtp://relay:587"),
    ])
    .expect("loads");
    assert_eq!(settings.smtp.password.expose(), "0071234");
    assert_eq!(settings.redis.hash_key.expose(), "TRUE");
    assert_eq!(settings.seal.keys.expose(), "1e3");
    assert_eq!(settings.smtp.url.expose(), "smtp://relay:587");
    // A `_FILE` still wins over the variable, as before.
    let file = toml_file("from-file\n");
    let settings = load(&[
        ("MAILROOM__SMTP__PASSWORD", "0071234"),
        (
            "MAILROOM__SMTP__PASSWORD_FILE",
            file.path().to_str().expect("utf-8"),
        ),
    ])
    .expect("loads");
    assert_eq!(settings.smtp.password.expose(), "from-file");
}

#[test]
fn one_amqp_url_may_be_a_plain_string() {
    let file = toml_file("[amqp]\nurls = \"amqp://app:s3cret@rabbit/%2f\"\n");
    let settings = Settings::load_with_env(Some(file.path()), env(&[])).expect("loads");
    assert_eq!(settings.amqp.urls.len(), 1);
    assert_eq!(
        settings.amqp.urls[0].expose(),
        "amqp://app:s3cret@rabbit/%2f"
    );
    let file = toml_file("[amqp]\nurls = 5\n");
    let err = Settings::load_with_env(Some(file.path()), env(&[])).expect_err("a number");
    assert!(err.to_string().contains("amqp.urls"), "{err}");
}

/// The config crate quotes a bad value in its message; a URL's password
/// must not come along.
#[test]
fn parse_errors_do_not_quote_url_passwords() {
    let file = toml_file("[worker]\nconcurrency = \"amqp://app:ab/s3cret@rabbit/%2f\"\n");
    let err = Settings::load_with_env(Some(file.path()), env(&[])).expect_err("not a number");
    let shown = err.to_string();
    assert!(shown.contains("worker.concurrency"), "{shown}");
    assert!(!shown.contains("s3cret"), "{shown}");
}

/// The environment source reads a number beyond i64 as a float, which the
/// config crate rounded and saturated: 99999999999999999999 bytes became
/// 18446744073709551615, a limit of no limit.
#[test]
fn numbers_that_do_not_fit_are_refused_not_saturated() {
    for (key, value, named) in [
        (
            "MAILROOM__LIMITS__MAX_MESSAGE_BYTES",
            "99999999999999999999",
            "limits.max_message_bytes",
        ),
        (
            "MAILROOM__API__BODY_LIMIT_BYTES",
            "18446744073709551615",
            "api.body_limit_bytes",
        ),
        ("MAILROOM__API__MAX_BATCH", "1.5", "api.max_batch"),
        (
            "MAILROOM__LIMITS__MAX_RECIPIENTS",
            "-2.0",
            "limits.max_recipients",
        ),
    ] {
        let err = load(&[(key, value)]).expect_err(key);
        let shown = err.to_string();
        assert!(
            shown.contains(&format!("{named} in the environment: a whole number")),
            "{shown}"
        );
    }
    let file = toml_file("[limits]\nmax_recipients = 1e30\n");
    let err = Settings::load_with_env(Some(file.path()), env(&[])).expect_err("too large");
    let shown = err.to_string();
    assert!(shown.contains("limits.max_recipients in "), "{shown}");
    assert!(shown.contains(".toml: a whole number"), "{shown}");
    // A float setting still takes a fraction, and a whole float is whole.
    let settings = load(&[
        ("MAILROOM__WORKER__RETRY__MULTIPLIER", "2.5"),
        ("MAILROOM__LIMITS__MAX_RECIPIENTS", "5.0"),
    ])
    .expect("loads");
    assert!((settings.worker.retry.multiplier - 2.5).abs() < f32::EPSILON);
    assert_eq!(settings.limits.max_recipients, 5);
}

/// A message must fit in a broker message once sealed, and the CLI reads
/// a file up to the limit.
#[test]
fn message_limits_are_bounded() {
    for (pairs, named, allowed) in [
        (
            &[("MAILROOM__LIMITS__MAX_MESSAGE_BYTES", "67108865")][..],
            "limits.max_message_bytes",
            "from 1024 to 67108864",
        ),
        (
            &[
                ("MAILROOM__LIMITS__MAX_MESSAGE_BYTES", "1048576"),
                ("MAILROOM__LIMITS__MAX_ATTACHMENT_BYTES", "2097152"),
            ][..],
            "limits.max_attachment_bytes",
            "not above limits.max_message_bytes (1048576)",
        ),
    ] {
        let err = load(pairs).expect_err(named);
        let shown = err.to_string();
        assert!(shown.contains(named) && shown.contains(allowed), "{shown}");
    }
    let settings = load(&[("MAILROOM__LIMITS__MAX_MESSAGE_BYTES", "67108864")]).expect("64 MiB");
    assert_eq!(settings.limits.max_message_bytes, MAX_MESSAGE_BYTES);
}

/// serde names the unknown key but not where it was set.
#[test]
fn an_unknown_key_is_named_with_its_file() {
    let file = toml_file("[worker]\nconcurency = 3\n");
    let err = Settings::load_with_env(Some(file.path()), env(&[])).expect_err("a typo");
    let shown = err.to_string();
    let path = file.path().display().to_string();
    let name = path.rsplit('/').next().expect("a name");
    assert!(shown.contains("worker.concurency in "), "{shown}");
    assert!(shown.contains(name), "{shown}");
    assert!(shown.contains("expected one of concurrency,"), "{shown}");
    let file = toml_file("color = 1\n");
    let err = Settings::load_with_env(Some(file.path()), env(&[])).expect_err("a typo");
    assert!(err.to_string().contains("bad setting color in "), "{err}");
}

#[test]
fn a_config_folder_is_not_a_file() {
    let dir = tempfile::tempdir().expect("dir");
    let err = Settings::load_with_env(Some(dir.path()), env(&[])).expect_err("a folder");
    let shown = err.to_string();
    assert!(shown.contains("not a file"), "{shown}");
    assert!(!shown.contains("no such file"), "{shown}");
}

/// `a, b` in the environment leaves a space before `b`; a URL that does
/// not parse is named by its place in the list, password masked, with
/// the likely cause of a `/` in the password.
#[test]
fn amqp_urls_are_trimmed_and_a_bad_one_is_named() {
    let settings = load(&[("MAILROOM__AMQP__URLS", "amqp://a@h1, amqp://b@h2 ,")]).expect("loads");
    let urls: Vec<&str> = settings.amqp.urls.iter().map(Secret::expose).collect();
    assert_eq!(urls, ["amqp://a@h1", "amqp://b@h2"]);

    let err = load(&[("MAILROOM__AMQP__URLS", "amqp://a@h1,http://b:s3cret@h2")])
        .expect_err("a bad scheme");
    let shown = err.to_string();
    assert!(
        shown.contains("amqp.urls: entry 2 (http://b:***@h2)"),
        "{shown}"
    );
    assert!(!shown.contains("s3cret"), "{shown}");

    let err = load(&[("MAILROOM__AMQP__URLS", "amqp://u:p/ss3cret@rabbit/")]).expect_err("a /");
    let shown = err.to_string();
    assert!(
        shown.contains("amqp.urls entry 1: amqp://u:***@rabbit/"),
        "{shown}"
    );
    assert!(shown.contains("invalid port number"), "{shown}");
    assert!(shown.contains("e.g. / as %2F"), "{shown}");
    assert!(!shown.contains("ss3cret"), "{shown}");
}

#[test]
fn a_redis_url_that_does_not_parse_is_refused() {
    let err = load(&[("MAILROOM__REDIS__URL", "redis://:s3cret@redis:port")]).expect_err("a port");
    let shown = err.to_string();
    assert!(
        shown.contains("redis.url redis://:***@redis:port"),
        "{shown}"
    );
    assert!(!shown.contains("s3cret"), "{shown}");
}

/// Every name of every settings enum parses as written, in lower case and
/// in upper case: `EdDSA` was refused whatever its case, because the input
/// was lowered and compared with names that are not all lower case.
#[test]
fn every_enum_name_parses_in_any_case() {
    fn each<T>(names: &[&str], all: &[T])
    where
        T: TryFrom<String, Error = String> + PartialEq + std::fmt::Debug,
    {
        assert_eq!(names.len(), all.len());
        for (name, value) in names.iter().zip(all) {
            for text in [
                (*name).to_owned(),
                name.to_ascii_lowercase(),
                name.to_ascii_uppercase(),
            ] {
                assert_eq!(T::try_from(text.clone()).as_ref(), Ok(value), "{text}");
            }
        }
    }
    each(JwtAlgorithm::NAMES, JwtAlgorithm::ALL);
    each(TlsMode::NAMES, TlsMode::ALL);
    each(TransportKind::NAMES, TransportKind::ALL);
    each(OnUncertain::NAMES, OnUncertain::ALL);
    each(
        crate::telemetry::LogFormat::NAMES,
        crate::telemetry::LogFormat::ALL,
    );
    let err = JwtAlgorithm::try_from("HS256".to_owned()).expect_err("not allowed");
    assert!(err.contains("EdDSA, ES256, RS256"), "{err}");
}

#[test]
fn the_jwt_algorithm_comes_from_the_environment() {
    for (text, algorithm) in [
        ("ES256", JwtAlgorithm::Es256),
        ("EdDSA", JwtAlgorithm::EdDsa),
        ("rs256", JwtAlgorithm::Rs256),
    ] {
        let settings = load(&[("MAILROOM__API__JWT__ALGORITHM", text)]).expect(text);
        let jwt = settings.api.jwt.expect("[api.jwt] set");
        assert_eq!(jwt.algorithm, algorithm, "{text}");
    }
}

/// What `mailroom config` prints (TOML, enums by their names) loads back.
#[test]
fn printed_enums_load_back() {
    let mut settings = Settings::default();
    settings.api.jwt = Some(JwtSettings {
        algorithm: JwtAlgorithm::Es256,
        ..JwtSettings::default()
    });
    settings.smtp.tls = TlsMode::Opportunistic;
    let printed = toml::to_string_pretty(&settings).expect("toml");
    assert!(printed.contains("algorithm = \"ES256\""), "{printed}");
    let file = toml_file(&printed);
    let loaded = Settings::load_with_env(Some(file.path()), env(&[])).expect("loads back");
    assert_eq!(
        loaded.api.jwt.map(|jwt| jwt.algorithm),
        Some(JwtAlgorithm::Es256)
    );
    assert_eq!(loaded.smtp.tls, TlsMode::Opportunistic);
}

/// A file that is not TOML is named with its line, column and the
/// parser's reason; the line itself, which may hold a password, is not
/// shown (nor anywhere in the error's source chain).
#[test]
fn a_file_that_is_not_toml_does_not_echo_its_text() {
    for (text, line, column) in [
        ("[smtp]\npassword = \"Canary\\Pass3r\"\n", 2, 20),
        ("[smtp]\npassword = \"CanaryPass3r\n", 2, 25),
        ("[smtp]\npassword = CanaryPass3r\n", 2, 12),
        ("[smtp]\nCanaryPass3r\n", 2, 13),
        ("[smtp]\npassword = \"CanaryPass3r\" x\n", 2, 27),
    ] {
        let file = toml_file(text);
        let err = Settings::load_with_env(Some(file.path()), env(&[])).expect_err(text);
        let shown = err.to_string();
        let place = format!("{} line {line}, column {column}: ", file.path().display());
        assert!(shown.contains(&place), "{text:?}: {shown}");
        let mut source: Option<&dyn std::error::Error> = Some(&err);
        while let Some(error) = source {
            let shown = error.to_string();
            assert!(!shown.contains("CanaryPass3r"), "{text:?}: {shown}");
            assert!(!shown.contains("Canary\\Pass3r"), "{text:?}: {shown}");
            assert!(
                !format!("{error:?}").contains("Pass3r"),
                "{text:?}: {error:?}"
            );
            source = error.source();
        }
    }
}

#[test]
fn lines_and_columns_count_characters_from_one() {
    assert_eq!(line_and_column("ab", 0), (1, 1));
    assert_eq!(line_and_column("a\nbé c", 6), (2, 4));
}

/// A URL setting holding a second line or word is refused without
/// showing anything after the first: that part may be the password again.
#[test]
fn a_url_of_more_than_one_word_shows_only_the_first() {
    let redis = toml_file("redis://:CanaryRedisPw1@127.0.0.1:18496\nextra CanaryRedisPw1\n");
    let amqp = toml_file("amqp://app:CanaryAmqpPw1@rabbit/%2f CanaryAmqpPw1\n");
    let redis_file = redis.path().to_str().expect("UTF-8 path");
    let amqp_file = amqp.path().to_str().expect("UTF-8 path");
    for (key, value, named, shown) in [
        (
            "MAILROOM__REDIS__URL_FILE",
            redis_file,
            "redis.url",
            "(redis://:***@127.0.0.1:18496…)",
        ),
        (
            "MAILROOM__REDIS__URL",
            "redis://:CanaryRedisPw1@r:6379 CanaryRedisPw1",
            "redis.url",
            "(redis://:***@r:6379…)",
        ),
        (
            "MAILROOM__AMQP__URLS_FILE",
            amqp_file,
            "amqp.urls",
            "entry 1 (amqp://app:***@rabbit/%2f…)",
        ),
        (
            "MAILROOM__AMQP__URLS",
            "amqp://a@h1,amqp://app:CanaryAmqpPw1@rabbit/%2f\tCanaryAmqpPw1",
            "amqp.urls",
            "entry 2 (amqp://app:***@rabbit/%2f…)",
        ),
        (
            "MAILROOM__SMTP__URL",
            "smtp://relay:587\nCanarySmtpPw1",
            "smtp.url",
            "(smtp://relay:587…)",
        ),
        (
            "MAILROOM__SMTP__URL",
            "smtp://u:Canary SmtpPw1@relay:587",
            "smtp.url",
            "([redacted])",
        ),
    ] {
        let err = load(&[(key, value)]).expect_err(key);
        let text = err.to_string();
        assert!(
            text.contains(named) && text.contains(shown),
            "{key}: {text}"
        );
        assert!(text.contains("more than one line or word"), "{key}: {text}");
        assert!(
            !text.contains("Canary") && !text.contains("Pw1"),
            "{key}: {text}"
        );
        assert!(!text.contains('\n'), "{key}: {text}");
    }
    // A space after the URL is not a second word.
    let settings = load(&[("MAILROOM__REDIS__URL", "redis://127.0.0.1:6379/0 ")]).expect("loads");
    assert_eq!(settings.redis.url.expose(), "redis://127.0.0.1:6379/0 ");
}

/// `config` prints what the worker does: an `smtps://` relay is implicit
/// TLS; asking it for none or opportunistic is a contradiction.
#[test]
fn an_smtps_url_is_implicit_tls() {
    let settings = load(&[("MAILROOM__SMTP__URL", "smtps://relay.example")]).expect("loads");
    assert_eq!(settings.smtp.tls, TlsMode::Implicit);
    let err = load(&[
        ("MAILROOM__SMTP__URL", "smtps://relay.example"),
        ("MAILROOM__SMTP__TLS", "none"),
    ])
    .expect_err("a contradiction");
    assert!(err.to_string().contains("smtp.tls"), "{err}");
}
