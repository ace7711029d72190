//! Job-level rules: start from a valid job, break exactly one thing, and
//! expect exactly that field and rule back.

use std::collections::BTreeMap;

use time::Duration;
use time::macros::datetime;

use super::*;
use crate::job::{Attachment, JobId, Lane};

fn valid_job() -> SendJob {
    let created_at = datetime!(2030-01-01 00:00 UTC);
    SendJob {
        schema: SCHEMA_VERSION,
        id: JobId::new(),
        tenant: "acme-prod_1.eu".into(),
        idempotency_key: Some("order-1042-receipt".into()),
        created_at,
        expires_at: Some(created_at + Duration::hours(1)),
        lane: Lane::Transactional,
        message: EmailMessage {
            from: "Shop <noreply@shop.example>".into(),
            reply_to: vec![r#""Support, Shop" <help@shop.example>"#.into()],
            to: vec![
                "Ada Lovelace <ada@example.org>".into(),
                "user@bücher.example".into(),
            ],
            cc: vec![r#""john doe"@example.com"#.into()],
            bcc: vec!["audit@shop.example".into()],
            subject: "Your receipt".into(),
            text: Some("Thanks!".into()),
            html: Some("<p>Thanks!</p>".into()),
            headers: BTreeMap::from([
                (
                    "List-Unsubscribe".into(),
                    "<https://shop.example/u/1>".into(),
                ),
                ("X-Entity-Ref-ID".into(), "order-1042".into()),
            ]),
            attachments: vec![Attachment {
                filename: "receipt.pdf".into(),
                content_type: "application/pdf".into(),
                content: b"%PDF-1.4\n".to_vec(),
            }],
            tags: vec!["receipt".into()],
            metadata: BTreeMap::from([("order".into(), "1042".into())]),
        },
    }
}

fn valid_request() -> (JobRequest, OffsetDateTime) {
    let job = valid_job();
    let request = JobRequest {
        tenant: None,
        idempotency_key: job.idempotency_key,
        lane: job.lane,
        expires_at: job.expires_at,
        message: job.message,
    };
    (request, job.created_at)
}

fn errors_with(job: &SendJob, limits: &Limits) -> Vec<(String, String)> {
    match validate_job(job, limits) {
        Ok(()) => Vec::new(),
        Err(errors) => errors.into_iter().map(|e| (e.path, e.rule)).collect(),
    }
}

/// The job, validated with default limits, breaks exactly this one rule.
#[track_caller]
fn assert_only(job: &SendJob, path: &str, rule: &str) {
    assert_only_with(job, &Limits::default(), path, rule);
}

#[track_caller]
fn assert_only_with(job: &SendJob, limits: &Limits, path: &str, rule: &str) {
    assert_eq!(
        errors_with(job, limits),
        [(path.to_owned(), rule.to_owned())]
    );
}

/// `valid_job()` changed by `f`.
fn job(f: impl FnOnce(&mut SendJob)) -> SendJob {
    let mut job = valid_job();
    f(&mut job);
    job
}

const NOT_A_MAILBOX: &str = "not a valid mailbox";
const CONTROL: &str = "must not contain control characters";
const LINE_BREAK: &str = "must not contain line breaks (CR, LF), NUL or control characters";
const EMPTY: &str = "must not be empty";

#[test]
fn valid_job_passes() {
    assert_eq!(validate_job(&valid_job(), &Limits::default()), Ok(()));
}

#[test]
fn valid_request_passes() {
    let (request, now) = valid_request();
    assert_eq!(validate_request(&request, &Limits::default(), now), Ok(()));
}

#[test]
fn schema_must_be_current() {
    assert_only(
        &job(|j| j.schema = SCHEMA_VERSION + 1),
        "schema",
        "unsupported schema version (expected 1)",
    );
}

#[test]
fn tenant_rules() {
    assert_only(&job(|j| j.tenant.clear()), "tenant", EMPTY);
    assert_only(
        &job(|j| j.tenant = "a".repeat(65)),
        "tenant",
        "longer than 64 characters",
    );
    for bad in ["acme:prod", "ac me", "acmé", "{acme}", "acme\r\n"] {
        assert_only(
            &job(|j| j.tenant = bad.into()),
            "tenant",
            "may contain only A-Z, a-z, 0-9, '.', '_' and '-'",
        );
    }
}

#[test]
fn idempotency_key_rules() {
    assert_only(
        &job(|j| j.idempotency_key = Some(String::new())),
        "idempotency_key",
        EMPTY,
    );
    assert_only(
        &job(|j| j.idempotency_key = Some("k".repeat(256))),
        "idempotency_key",
        "longer than 255 characters",
    );
    assert_only(
        &job(|j| j.idempotency_key = Some("order\n1".into())),
        "idempotency_key",
        CONTROL,
    );
    assert_eq!(
        validate_job(&job(|j| j.idempotency_key = None), &Limits::default()),
        Ok(())
    );
}

#[test]
fn job_expires_after_creation() {
    let same = job(|j| j.expires_at = Some(j.created_at));
    assert_only(&same, "expires_at", "must be after created_at");
    let before = job(|j| j.expires_at = Some(j.created_at - Duration::seconds(1)));
    assert_only(&before, "expires_at", "must be after created_at");
    assert_eq!(
        validate_job(&job(|j| j.expires_at = None), &Limits::default()),
        Ok(())
    );
}

#[test]
fn request_expires_in_the_future() {
    let (mut request, now) = valid_request();
    request.expires_at = Some(now);
    let errors = validate_request(&request, &Limits::default(), now).expect_err("expired");
    assert_eq!(
        errors.errors(),
        [FieldError {
            path: "expires_at".into(),
            rule: "must be in the future".into(),
        }]
    );
}

#[test]
fn request_checks_tenant_only_when_given_and_the_message_always() {
    let (mut request, now) = valid_request();
    request.tenant = Some("acme".into());
    assert_eq!(validate_request(&request, &Limits::default(), now), Ok(()));
    request.tenant = Some("acme/prod".into());
    request.message.to[1] = "nobody".into();
    let errors = validate_request(&request, &Limits::default(), now).expect_err("invalid");
    let paths: Vec<_> = errors.errors().iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["tenant", "message.to[1]"]);
}

#[test]
fn every_address_field_is_parsed() {
    assert_only(
        &job(|j| j.message.from = "noreply".into()),
        "message.from",
        NOT_A_MAILBOX,
    );
    assert_only(
        &job(|j| j.message.reply_to[0] = "help@".into()),
        "message.reply_to[0]",
        NOT_A_MAILBOX,
    );
    assert_only(
        &job(|j| j.message.to.push("a@b.example, c@d.example".into())),
        "message.to[2]",
        NOT_A_MAILBOX,
    );
    assert_only(
        &job(|j| j.message.cc[0] = "a@b.example junk".into()),
        "message.cc[0]",
        NOT_A_MAILBOX,
    );
    assert_only(
        &job(|j| j.message.bcc[0] = "audit@shop.example\r\nBcc: x@evil.example".into()),
        "message.bcc[0]",
        "must not contain control characters",
    );
    assert_only(
        &job(|j| j.message.to[0] = "a\0@example.org".into()),
        "message.to[0]",
        "must not contain control characters",
    );
    assert_only(
        &job(|j| j.message.to[0] = " ".into()),
        "message.to[0]",
        EMPTY,
    );
}

#[test]
fn direction_overrides_are_refused_in_every_address() {
    let rule =
        "must not contain direction-override characters (U+202A to U+202E, U+2066 to U+2069)";
    assert_only(
        &job(|j| j.message.from = "\u{202e}knaB <noreply@shop.example>".into()),
        "message.from",
        rule,
    );
    assert_only(
        &job(|j| j.message.reply_to[0] = "\"Support \u{2066}x\" <help@shop.example>".into()),
        "message.reply_to[0]",
        rule,
    );
    assert_only(
        &job(|j| j.message.to[0] = "Ada\u{202b} <ada@example.org>".into()),
        "message.to[0]",
        rule,
    );
    assert_only(
        &job(|j| j.message.cc[0] = "\u{2069}Copy <copy@example.org>".into()),
        "message.cc[0]",
        rule,
    );
    // The subject is text, not a name: it keeps them.
    let subject = job(|j| j.message.subject = "\u{202e}txet".into());
    assert_eq!(validate_job(&subject, &Limits::default()), Ok(()));
}

#[test]
fn addresses_have_a_length_limit() {
    let long = format!("{} <ada@example.org>", "a".repeat(990));
    assert_only(
        &job(|j| j.message.to[0] = long),
        "message.to[0]",
        "longer than 998 characters",
    );
}

#[test]
fn at_least_one_recipient() {
    let none = job(|j| {
        j.message.to.clear();
        j.message.cc.clear();
        j.message.bcc.clear();
    });
    assert_only(
        &none,
        "message.to",
        "at least one recipient (to, cc or bcc) is required",
    );
    let bcc_only = job(|j| {
        j.message.to.clear();
        j.message.cc.clear();
    });
    assert_eq!(validate_job(&bcc_only, &Limits::default()), Ok(()));
}

#[test]
fn recipients_are_counted_together() {
    let limits = Limits {
        max_recipients: 3,
        ..Limits::default()
    };
    assert_only_with(
        &valid_job(),
        &limits,
        "message",
        "at most 3 recipients (to, cc and bcc together)",
    );
}

#[test]
fn subject_rules() {
    assert_only(
        &job(|j| j.message.subject.clear()),
        "message.subject",
        EMPTY,
    );
    assert_only(
        &job(|j| j.message.subject = "  ".into()),
        "message.subject",
        EMPTY,
    );
    // Characters, not bytes: 255 two-byte characters fit.
    let at_limit = job(|j| j.message.subject = "é".repeat(255));
    assert_eq!(validate_job(&at_limit, &Limits::default()), Ok(()));
    assert_only(
        &job(|j| j.message.subject = "é".repeat(256)),
        "message.subject",
        "longer than 255 characters",
    );
    for injected in ["Hi\r\nBcc: x@evil.example", "Hi\nthere", "Hi\0"] {
        assert_only(
            &job(|j| j.message.subject = injected.into()),
            "message.subject",
            LINE_BREAK,
        );
    }
}

#[test]
fn a_body_is_required_and_not_empty() {
    assert_only(
        &job(|j| {
            j.message.text = None;
            j.message.html = None;
        }),
        "message",
        "a text or html body is required",
    );
    assert_only(
        &job(|j| j.message.text = Some(String::new())),
        "message.text",
        EMPTY,
    );
    assert_only(
        &job(|j| j.message.html = Some(" \n".into())),
        "message.html",
        EMPTY,
    );
    assert_only(
        &job(|j| j.message.text = Some("a\0b".into())),
        "message.text",
        "must not contain NUL characters",
    );
    assert_eq!(
        validate_job(&job(|j| j.message.html = None), &Limits::default()),
        Ok(())
    );
}

fn with_header(name: &str, value: &str) -> SendJob {
    job(|j| {
        j.message.headers.insert(name.into(), value.into());
    })
}

#[test]
fn header_names_come_from_the_allow_list() {
    for name in ["Bcc", "content-transfer-encoding", "From", "ARC-Seal"] {
        assert_only(
            &with_header(name, "x"),
            &format!("message.headers[\"{name}\"]"),
            "header is set by mailroom and cannot be overridden",
        );
    }
    for name in ["X-Original-To", "Foo"] {
        assert_only(
            &with_header(name, "x"),
            &format!("message.headers[\"{name}\"]"),
            "header is not in the allow-list",
        );
    }
    assert_eq!(
        validate_job(&with_header("x-campaign", "spring"), &Limits::default()),
        Ok(())
    );
}

#[test]
fn header_names_are_field_names() {
    assert_only(
        &with_header("X-Foo\r\nBcc", "x@evil.example"),
        r#"message.headers["X-Foo\r\nBcc"]"#,
        "not a valid header field name",
    );
    assert_only(
        &with_header("X-Foo:", "x"),
        r#"message.headers["X-Foo:"]"#,
        "not a valid header field name",
    );
}

#[test]
fn header_names_are_unique_without_case() {
    assert_only(
        &with_header("x-entity-ref-id", "other"),
        r#"message.headers["x-entity-ref-id"]"#,
        "duplicate header name (names are case-insensitive)",
    );
}

#[test]
fn header_value_rules() {
    let path = r#"message.headers["X-Foo"]"#;
    assert_only(
        &with_header("X-Foo", "a\r\nBcc: x@evil.example"),
        path,
        LINE_BREAK,
    );
    assert_only(&with_header("X-Foo", "a\0"), path, LINE_BREAK);
    assert_only(&with_header("X-Foo", " "), path, EMPTY);
    assert_only(
        &with_header("X-Foo", &"v".repeat(999)),
        path,
        "longer than 998 characters",
    );
    assert_eq!(
        validate_job(&with_header("X-Foo", "a\tb"), &Limits::default()),
        Ok(())
    );
}

#[test]
fn custom_headers_are_limited_in_number() {
    let limits = Limits {
        max_custom_headers: 1,
        ..Limits::default()
    };
    assert_only_with(
        &valid_job(),
        &limits,
        "message.headers",
        "at most 1 custom headers",
    );
}

fn with_attachment(filename: &str, content_type: &str) -> SendJob {
    job(|j| {
        j.message.attachments[0].filename = filename.into();
        j.message.attachments[0].content_type = content_type.into();
    })
}

#[test]
fn attachment_filename_rules() {
    let path = "message.attachments[0].filename";
    let pdf = "application/pdf";
    assert_only(&with_attachment("", pdf), path, EMPTY);
    assert_only(
        &with_attachment("../etc/passwd", pdf),
        path,
        "must not contain a path separator",
    );
    assert_only(
        &with_attachment("C:\\temp\\a.pdf", pdf),
        path,
        "must not contain a path separator",
    );
    assert_only(&with_attachment("..", pdf), path, "not a valid file name");
    assert_only(
        &with_attachment("a\r\nContent-Type: x.pdf", pdf),
        path,
        "must not contain control or bidirectional formatting characters",
    );
    assert_only(
        &with_attachment(&format!("{}.pdf", "a".repeat(252)), pdf),
        path,
        "longer than 255 characters",
    );
    for blocked in ["invoice.pdf.exe", "x.EXE", "a.exe.", "a.exe ", "a.js"] {
        assert_only(&with_attachment(blocked, pdf), path, "file type is blocked");
    }
}

#[test]
fn blocked_extensions_follow_the_limits() {
    let limits = Limits {
        blocked_extensions: vec!["pdf".into()],
        ..Limits::default()
    };
    assert_only_with(
        &valid_job(),
        &limits,
        "message.attachments[0].filename",
        "file type is blocked",
    );
}

#[test]
fn attachment_content_type_rules() {
    let path = "message.attachments[0].content_type";
    assert_only(
        &with_attachment("a.pdf", "pdf"),
        path,
        "not a valid MIME type (type/subtype)",
    );
    assert_only(
        &with_attachment("a.pdf", "application/pdf\r\nBcc: x@evil.example"),
        path,
        LINE_BREAK,
    );
    let container =
        "a message or multipart type cannot be an attachment; send it as application/octet-stream";
    for content_type in [
        "multipart/mixed; boundary=x",
        "message/rfc822",
        "Message/Global",
    ] {
        assert_only(&with_attachment("a.pdf", content_type), path, container);
    }
}

#[test]
fn an_attachment_type_gives_the_file_no_second_name() {
    let path = "message.attachments[0].content_type";
    let rule = "must be type/subtype, with no parameter but charset";
    for content_type in [
        "application/pdf; name=\"invoice.exe\"",
        "application/octet-stream; name*=UTF-8''invoice.exe",
        "application/pdf; filename=invoice.exe",
        "text/plain; charset=utf-8; name=a.exe",
        "text/plain; charset=\"utf 8\"",
    ] {
        assert_only(&with_attachment("invoice.pdf", content_type), path, rule);
    }
    let plain = with_attachment("notes.txt", "text/plain; charset=utf-8");
    assert_eq!(validate_job(&plain, &Limits::default()), Ok(()));
}

#[test]
fn attachments_are_limited_in_number_and_size() {
    let none_allowed = Limits {
        max_attachments: 0,
        ..Limits::default()
    };
    assert_only_with(
        &valid_job(),
        &none_allowed,
        "message.attachments",
        "at most 0 attachments",
    );
    let tiny = Limits {
        max_attachment_bytes: 8,
        ..Limits::default()
    };
    assert_only_with(
        &valid_job(),
        &tiny,
        "message.attachments[0].content",
        "larger than 8 bytes",
    );
}

#[test]
fn total_size_counts_bodies_headers_and_attachments() {
    let size = valid_job().message.size();
    let limits = Limits {
        max_message_bytes: size,
        ..Limits::default()
    };
    assert_eq!(validate_job(&valid_job(), &limits), Ok(()));
    let rule = format!("larger than {size} bytes in total");
    let mut grown = [
        job(|j| j.message.attachments[0].content.push(b'x')),
        job(|j| j.message.text = Some("Thanks!!".into())),
        job(|j| {
            j.message
                .headers
                .insert("X-Entity-Ref-ID".into(), "order-10420".into());
        }),
        job(|j| j.message.subject.push('!')),
    ];
    for job in &mut grown {
        assert_only_with(job, &limits, "message", &rule);
    }
}

#[test]
fn tag_rules() {
    assert_only_with(
        &valid_job(),
        &Limits {
            max_tags: 0,
            ..Limits::default()
        },
        "message.tags",
        "at most 0 tags",
    );
    assert_only(
        &job(|j| j.message.tags.push(String::new())),
        "message.tags[1]",
        EMPTY,
    );
    assert_only(
        &job(|j| j.message.tags[0] = "t".repeat(65)),
        "message.tags[0]",
        "longer than 64 characters",
    );
    assert_only(
        &job(|j| j.message.tags[0] = "a\u{1b}[31m".into()),
        "message.tags[0]",
        CONTROL,
    );
}

#[test]
fn metadata_rules() {
    assert_only_with(
        &valid_job(),
        &Limits {
            max_metadata_entries: 0,
            ..Limits::default()
        },
        "message.metadata",
        "at most 0 entries",
    );
    let set = |k: &str, v: &str| {
        job(|j| {
            j.message.metadata.insert(k.into(), v.into());
        })
    };
    assert_only(&set("", "v"), r#"message.metadata[""]"#, EMPTY);
    assert_only(
        &set("ada@example.org", "1\r\n"),
        r#"message.metadata["a***@example.org"]"#,
        CONTROL,
    );
    assert_only(&set("k\n", "v"), r#"message.metadata["k\n"]"#, CONTROL);
    assert_only(
        &set("order", "1\r\n"),
        r#"message.metadata["order"]"#,
        CONTROL,
    );
    assert_only(
        &set("order", &"v".repeat(257)),
        r#"message.metadata["order"]"#,
        "longer than 256 characters",
    );
    let long_key = "k".repeat(100);
    let errors = errors_with(&set(&long_key, "v"), &Limits::default());
    assert_eq!(
        errors,
        [(
            format!("message.metadata[\"{}\"…]", "k".repeat(80)),
            "longer than 64 characters".to_owned()
        )]
    );
}

#[test]
fn all_problems_are_reported_at_once() {
    let broken = job(|j| {
        j.tenant = "acme prod".into();
        j.expires_at = Some(j.created_at);
        j.message.from = "secret-sender".into();
        j.message.to.push("secret@example.org junk".into());
        j.message.subject = "secret\r\nBcc: x@evil.example".into();
        j.message
            .headers
            .insert("Bcc".into(), "x@evil.example".into());
        j.message.attachments[0].filename = "secret.exe".into();
    });
    let errors = validate_job(&broken, &Limits::default()).expect_err("broken");
    let paths: Vec<_> = errors.errors().iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "tenant",
            "expires_at",
            "message.from",
            "message.to[2]",
            "message.subject",
            r#"message.headers["Bcc"]"#,
            "message.attachments[0].filename",
        ]
    );
    assert_eq!(errors.len(), 7);
    assert!(!errors.is_empty());
    assert_eq!((&errors).into_iter().count(), 7);
    let shown = errors.to_string();
    assert!(
        shown.starts_with(
            "tenant: may contain only A-Z, a-z, 0-9, '.', '_' and '-'; expires_at: must be after created_at; message.from: not a valid mailbox; "
        ),
        "{shown}"
    );
    for personal in ["secret", "evil"] {
        assert!(!shown.contains(personal), "{personal} echoed in {shown}");
    }
}

#[test]
fn field_error_display() {
    let error = FieldError {
        path: "message.to[2]".into(),
        rule: NOT_A_MAILBOX.into(),
    };
    assert_eq!(error.to_string(), "message.to[2]: not a valid mailbox");
}

#[test]
fn limits_count_characters_not_bytes() {
    let ten = "é".repeat(10);
    assert!(!exceeds_chars(&ten, 10), "20 bytes, 10 characters");
    assert!(exceeds_chars(&ten, 9));
    assert!(!exceeds_chars("", 0));
    assert!(exceeds_chars("a", 0));
}
