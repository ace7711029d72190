//! A real SMTP server that is not ours: `fixtures/smtp_server.py`
//! (Python's aiosmtpd) in a subprocess, with STARTTLS on a certificate made
//! here by a throwaway CA, optional AUTH, and scripted replies.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mailroom_core::settings::{Secret, SmtpSettings, TlsMode};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

/// How a test server behaves.
#[derive(Clone, Debug, Default)]
pub struct SmtpOptions {
    /// Replies to the end of DATA, one per message (`250`, `451`, `550`,
    /// `drop`, `hang`); `250` once they run out.
    pub replies: Vec<&'static str>,
    /// Require AUTH with this user and password.
    pub auth: Option<(&'static str, &'static str)>,
    /// Offer STARTTLS but do not insist on it (the client must).
    pub tls_optional: bool,
    /// Wait this long before answering each end of DATA (a slow relay).
    pub delay: Duration,
    /// Take each message (it counts as seen), then wait this long before
    /// answering its end of DATA: a client cut off meanwhile has handed it
    /// over.
    pub hold: Duration,
    /// Do not advertise PIPELINING (commands then go one by one).
    pub no_pipelining: bool,
    /// Answer 550 to `RCPT TO` this address.
    pub reject_rcpt: Option<&'static str>,
}

/// One message the server saw.
#[derive(Clone, Debug)]
pub struct Seen {
    /// The reply it got.
    pub reply: String,
    /// MAIL FROM.
    pub mail_from: String,
    /// RCPT TO, in order.
    pub rcpt_tos: Vec<String>,
    /// Whether the session was under TLS.
    pub tls: bool,
    /// The AUTH user, if any.
    pub auth: Option<String>,
    /// The Message-ID header.
    pub message_id: Option<String>,
    /// The raw message, when accepted.
    pub raw: Option<Vec<u8>>,
    /// Whether the client had sent more commands (the next message's)
    /// before the reply to this one's end of DATA.
    pub pipelined_after: bool,
}

/// A running server; killed when dropped.
pub struct SmtpServer {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    ca: PathBuf,
}

impl SmtpServer {
    /// Starts a server.
    ///
    /// # Panics
    /// When Python or aiosmtpd is missing, with the command that installs it.
    pub fn start(options: &SmtpOptions) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ca, cert, key) = certificates(dir.path());
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/smtp_server.py");
        let mut command = Command::new("python3");
        command
            .arg(&script)
            .arg("--out")
            .arg(dir.path().join("out"))
            .arg("--cert")
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .arg("--replies")
            .arg(options.replies.join(","))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if !options.delay.is_zero() {
            command
                .arg("--delay-ms")
                .arg(options.delay.as_millis().to_string());
        }
        if !options.hold.is_zero() {
            command
                .arg("--hold-ms")
                .arg(options.hold.as_millis().to_string());
        }
        if options.no_pipelining {
            command.arg("--no-pipelining");
        }
        if let Some(address) = options.reject_rcpt {
            command.arg("--reject-rcpt").arg(address);
        }
        if !options.tls_optional {
            command.arg("--require-tls");
        }
        if let Some((user, password)) = options.auth {
            command.arg("--auth").arg(format!("{user}:{password}"));
        }
        let mut child = command.spawn().unwrap_or_else(|err| {
            panic!("python3 could not start ({err}): install it, then `pip install aiosmtpd` (or run .ci/run)")
        });
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("read");
        let Some(port) = line
            .trim()
            .strip_prefix("READY ")
            .and_then(|p| p.parse().ok())
        else {
            let _ = child.kill();
            panic!(
                "the test SMTP server did not start (said {line:?}); is aiosmtpd installed? `pip install aiosmtpd` (or run .ci/run)"
            );
        };
        Self {
            child,
            port,
            dir,
            ca,
        }
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// SMTP settings that reach this server with STARTTLS required, trusting
    /// its CA, with `auth` when given.
    pub fn settings(&self, auth: Option<(&str, &str)>) -> SmtpSettings {
        SmtpSettings {
            url: Secret::new(format!("smtp://localhost:{}", self.port)),
            tls: TlsMode::StarttlsRequired,
            ca_file: Some(self.ca.clone()),
            username: auth.map(|(user, _)| user.to_owned()),
            password: Secret::new(auth.map(|(_, p)| p).unwrap_or_default()),
            hello_name: Some("mailroom-test".to_owned()),
            connect_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(5),
            pool_size: 4,
            ..SmtpSettings::default()
        }
    }

    /// Every message seen so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        let Ok(log) = std::fs::read_to_string(self.dir.path().join("out/log.jsonl")) else {
            return Vec::new();
        };
        log.lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .map(|record| {
                let text = |key: &str| record[key].as_str().map(str::to_owned);
                Seen {
                    reply: text("reply").unwrap_or_default(),
                    mail_from: text("mail_from").unwrap_or_default(),
                    rcpt_tos: record["rcpt_tos"]
                        .as_array()
                        .map(|list| {
                            list.iter()
                                .filter_map(|v| v.as_str().map(str::to_owned))
                                .collect()
                        })
                        .unwrap_or_default(),
                    tls: record["tls"].as_bool().unwrap_or(false),
                    auth: text("auth"),
                    message_id: text("message_id"),
                    raw: text("file").and_then(|path| std::fs::read(path).ok()),
                    pipelined_after: record["pipelined_after"].as_bool().unwrap_or(false),
                }
            })
            .collect()
    }

    /// Messages accepted (250) so far.
    pub fn accepted(&self) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|seen| seen.reply.starts_with("250"))
            .collect()
    }

    /// Waits until `accepted()` holds at least `n` messages, or `limit`.
    pub fn wait_accepted(&self, n: usize, limit: Duration) -> Vec<Seen> {
        let start = Instant::now();
        loop {
            let accepted = self.accepted();
            if accepted.len() >= n || start.elapsed() > limit {
                return accepted;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A throwaway CA and a certificate for `localhost` and 127.0.0.1 signed
/// by it, as PEM files in `dir`: (ca, cert, key).
pub fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "mailroom test CA");
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA cert");
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().expect("key");
    let params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .expect("params");
    let cert = params.signed_by(&key, &issuer).expect("cert");
    let write = |name: &str, pem: String| {
        let path = dir.join(name);
        std::fs::write(&path, pem).expect("write pem");
        path
    };
    (
        write("ca.pem", ca_cert.pem()),
        write("cert.pem", cert.pem()),
        write("key.pem", key.serialize_pem()),
    )
}
