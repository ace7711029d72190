//! The CLI as a user runs it: `send` from flags and from NDJSON, refusals,
//! `topology`, `status`, `apikey`. Real RabbitMQ and Redis.

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use mailroom_core::seal::SealKey;
use mailroom_tests::rabbit::TestVhost;
use mailroom_tests::redis::TestPrefix;

struct Env {
    vhost: TestVhost,
    redis: TestPrefix,
    seal: String,
    dir: tempfile::TempDir,
}

impl Env {
    fn new(label: &str) -> Self {
        Self {
            vhost: TestVhost::new(label),
            redis: TestPrefix::new(label),
            seal: SealKey::generate("cli").expect("key").to_line().to_string(),
            dir: tempfile::tempdir().expect("dir"),
        }
    }

    fn run(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = self.spawn(args);
        if let Some(text) = stdin {
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(text.as_bytes())
                .expect("write");
        }
        drop(child.stdin.take());
        child.wait_with_output().expect("output")
    }

    /// `mailroom args` with every standard stream piped.
    fn spawn(&self, args: &[&str]) -> Child {
        self.command(args).spawn().expect("mailroom runs")
    }

    /// `mailroom args` in this test's vhost, Redis prefix and folder.
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_mailroom"));
        command
            .args(args)
            .current_dir(self.dir.path())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("MAILROOM__AMQP__URLS", self.vhost.url())
            .env("MAILROOM__REDIS__KEY_PREFIX", self.redis.prefix())
            .env(
                "MAILROOM__REDIS__HASH_KEY",
                "cli-test-hash-key-0123456789abcdef",
            )
            .env("MAILROOM__SEAL__KEYS", &self.seal)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    }
}

/// One valid job as a JSON line.
const GOOD_JOB: &str =
    r#"{"message":{"from":"a@example.com","to":["b@example.org"],"subject":"s","text":"t"}}"#;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_from_flags_prints_the_job_id() {
    let env = Env::new("cli-send");
    let out = env.run(
        &[
            "send",
            "--from",
            "Shop <shop@example.com>",
            "--to",
            "ada@example.org",
            "--subject",
            "Hi",
            "--text",
            "Hello",
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_owned();
    assert!(
        id.parse::<mailroom_core::job::JobId>().is_ok(),
        "not a job id: {id:?}"
    );
    assert_eq!(env.vhost.work_depth().await, 1);

    // `send` wrote `queued`, as the API does; no worker ran yet.
    let out = env.run(&["status", &id], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("queued"),
        "{}",
        text(&out.stdout)
    );
    let unknown = mailroom_core::job::JobId::new().to_string();
    let out = env.run(&["status", &unknown], None);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no status for job"),
        "{}",
        text(&out.stderr)
    );
    let out = env.run(&["status", "not-a-uuid"], None);
    assert!(
        text(&out.stderr).contains("is not a job id"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_message_exits_non_zero_and_publishes_nothing() {
    let env = Env::new("cli-invalid");
    let out = env.run(
        &[
            "send",
            "--from",
            "nope",
            "--to",
            "ada@example.org",
            "--subject",
            "Hi\r\nBcc: x@y.example",
            "--text",
            "t",
        ],
        None,
    );
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("message.from"), "{stderr}");
    assert!(stderr.contains("message.subject"), "{stderr}");

    // An endless file is refused at the limit, not read into memory.
    for (extra, limit) in [
        (
            &["--text-file", "/dev/zero"][..],
            "limits.max_message_bytes",
        ),
        (
            &["--text", "t", "--attach", "/dev/zero"][..],
            "limits.max_attachment_bytes",
        ),
    ] {
        let mut args = vec!["send", "--from", "a@example.com", "--to", "b@example.org"];
        args.extend(["--subject", "s"]);
        args.extend_from_slice(extra);
        let out = env.run(&args, None);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(
            stderr.contains("larger than") && stderr.contains(limit),
            "{stderr}"
        );
    }
    assert_eq!(env.vhost.work_depth().await, 0);
}

/// With stderr captured, as a script has it, every rejected line is
/// named, not the first 50.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rejected_line_is_named_to_a_script() {
    let env = Env::new("cli-rejections");
    let input = "not json\n".repeat(120);
    let out = env.run(&["send", "--json", "-"], Some(&input));
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    for line in [1, 50, 51, 120] {
        assert!(
            stderr.contains(&format!("line {line}: ")),
            "line {line}: {stderr}"
        );
    }
    assert!(!stderr.contains("more"), "{stderr}");
    assert!(stderr.contains("enqueued 0, rejected 120"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ndjson_is_sent_with_a_summary_by_line() {
    let env = Env::new("cli-ndjson");
    let bad =
        r#"{"message":{"from":"a@example.com","to":["not an address"],"subject":"s","text":"t"}}"#;
    let input = format!("{GOOD_JOB}\n{bad}\n\n{GOOD_JOB}\nnot json\n");
    let out = env.run(&["send", "--json", "-"], Some(&input));
    assert!(
        !out.status.success(),
        "a rejected line makes the exit non-zero"
    );
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("line 2: ") && stderr.contains("message.to[0]"),
        "{stderr}"
    );
    assert!(stderr.contains("line 5: not a job"), "{stderr}");
    assert!(stderr.contains("enqueued 2, rejected 2"), "{stderr}");
    assert_eq!(
        text(&out.stdout).lines().count(),
        2,
        "one id per enqueued line"
    );
    assert_eq!(env.vhost.work_depth().await, 2);
    let stdout = text(&out.stdout);
    let id = stdout
        .lines()
        .next()
        .and_then(|line| line.rsplit(' ').next())
        .expect("line N: ID");
    let out = env.run(&["status", id], None);
    assert!(
        text(&out.stdout).contains("queued"),
        "{}",
        text(&out.stderr)
    );
}

/// A refused line's reason never quotes what the line held, and a line of
/// a million tiny list items is refused before it is parsed (it would
/// take gigabytes as values, and its errors a screen each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_quote_no_value_and_floods_are_not_parsed() {
    let env = Env::new("cli-refusals");
    let quoted = r#"{"message":"Dear Ada, your password is hunter2"}"#;
    let flood = format!(
        r#"{{"message":{{"from":"a@example.com","to":["b@example.org"],"subject":"s","text":"t","tags":[{}""]}}}}"#,
        "\"\",".repeat(1_000_000)
    );
    let input = format!("{quoted}\n{flood}\n{GOOD_JOB}\n");
    let out = env.run(&["send", "--json", "-"], Some(&input));
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("hunter2"), "{stderr}");
    assert!(stderr.contains("line 1: not a job"), "{stderr}");
    assert!(
        stderr.contains("line 2: not a job: holds more list items"),
        "{stderr}"
    );
    assert!(stderr.len() < 2_000, "{} bytes of refusals", stderr.len());
    assert_eq!(env.vhost.work_depth().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_windows_file_with_a_line_of_binary_sends_its_good_lines() {
    let env = Env::new("cli-bytes");
    let mut input = b"\xEF\xBB\xBF".to_vec();
    input.extend_from_slice(format!("{GOOD_JOB}\r\n\r\n").as_bytes());
    input.extend_from_slice(b"{\"message\": \"\xFF\xFE\"}\r\n[1, 2]\r\n");
    input.extend_from_slice(format!("{GOOD_JOB}\r\n").as_bytes());
    let path = env.dir.path().join("jobs.ndjson");
    std::fs::write(&path, input).expect("write the file");
    let out = env.run(&["send", "--json", "jobs.ndjson"], None);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("line 3: not UTF-8 text"), "{stderr}");
    assert!(
        stderr.contains("line 4: not a job: expected a JSON object"),
        "{stderr}"
    );
    assert!(stderr.contains("enqueued 2, rejected 2"), "{stderr}");
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("line 1: ") && stdout.contains("line 5: "),
        "{stdout}"
    );
    assert_eq!(env.vhost.work_depth().await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_piped_in_is_sent_before_the_input_ends() {
    let env = Env::new("cli-pipe");
    let mut child = env.spawn(&["send", "--json", "-"]);
    let mut stdin = child.stdin.take().expect("stdin");
    writeln!(stdin, "{GOOD_JOB}").expect("write");
    let stdout = child.stdout.take().expect("stdout");
    let (lines, first) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if lines.send(line.unwrap_or_default()).is_err() {
                return;
            }
        }
    });
    // The input is still open: the job must not wait for its end.
    let id = first
        .recv_timeout(Duration::from_mins(1))
        .expect("the first job's id while the input is open");
    assert!(id.starts_with("line 1: "), "{id}");
    writeln!(stdin, "{GOOD_JOB}").expect("write");
    drop(stdin);
    let out = child.wait_with_output().expect("output");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let second = first
        .recv_timeout(Duration::from_secs(5))
        .expect("second id");
    assert!(second.starts_with("line 2: "), "{second}");
    assert_eq!(env.vhost.work_depth().await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_and_apikey_commands_work() {
    let env = Env::new("cli-misc");
    let out = env.run(&["topology", "--declare"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("mailroom.send.transactional"));

    let out = env.run(
        &["apikey", "create", "--tenant", "acme", "--scopes", "send"],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let key = text(&out.stdout).trim().to_owned();
    assert!(key.starts_with("mr_live_") && key.len() > 40, "{key}");
    let out = env.run(&["apikey", "list"], None);
    let listing = text(&out.stdout);
    assert!(
        listing.contains("acme") && !listing.contains(&key),
        "{listing}"
    );
    let id = listing
        .lines()
        .find(|line| line.contains("acme"))
        .and_then(|line| line.split_whitespace().next())
        .expect("a key line")
        .to_owned();
    assert!(env.run(&["apikey", "revoke", &id], None).status.success());
    assert!(
        !env.run(&["apikey", "revoke", &id], None).status.success(),
        "revoking twice fails"
    );
    let out = env.run(&["apikey", "create", "--tenant", "bad tenant!"], None);
    assert!(!out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_says_when_the_topology_is_missing_and_refuses_unknown_reasons() {
    let env = Env::new("cli-dlq");
    let out = env.run(&["dlq", "list"], None);
    let stderr = text(&out.stderr);
    let said = stderr
        .lines()
        .find(|line| line.starts_with("mailroom: "))
        .unwrap_or_default();
    assert!(!out.status.success());
    assert!(said.contains("mailroom topology --declare"), "{stderr}");
    assert_eq!(
        said.matches("no queue 'mailroom.dead'").count(),
        1,
        "{said}"
    );

    let out = env.run(&["dlq", "replay", "--reason", "rejectd"], None);
    assert_eq!(out.status.code(), Some(2), "a usage error");
    assert!(text(&out.stderr).contains("possible values"));

    assert!(env.run(&["topology", "--declare"], None).status.success());
    let out = env.run(&["dlq", "list"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// A queue in the way is named once, in mailroom's words with the broker's
/// reason, not a second time as lapin's raw protocol frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clashing_queue_is_reported_once_with_the_brokers_reason() {
    let env = Env::new("cli-clash");
    env.vhost
        .declare_classic_queue(
            mailroom_core::wire::work_queue(mailroom_core::job::Lane::Bulk).as_str(),
        )
        .await;

    // The default log filter, as a user has it.
    let out = env
        .command(&["topology", "--declare"])
        .env_remove("RUST_LOG")
        .output()
        .expect("mailroom runs");
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("mailroom.send.bulk exists with other arguments")
            && stderr.contains("PRECONDITION_FAILED"),
        "{stderr}"
    );
    assert!(!stderr.contains("Channel closed"), "{stderr}");
}
