//! Validation: whether a job may be queued and sent, and if not, every reason
//! why, each with the path of the field at fault (`message.to[2]`,
//! `message.headers["X-Foo"]`, `expires_at`).
//!
//! Every entry point calls it (API, library, CLI) and the worker calls it
//! again after opening a seal. It guards three things: the mail itself
//! (addresses parse as RFC 5322 mailboxes, nothing a header carries can break
//! a line, custom headers come from an allow-list), the systems a job passes
//! through (tenant names fit Redis keys and AMQP headers) and the size of it
//! all ([`Limits`]). Rules never repeat the value they refuse: addresses,
//! subjects and file names are personal data.

mod address;
mod attachments;
mod headers;
pub mod json;
mod limits;
#[cfg(test)]
mod tests;

use std::fmt;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

pub use address::{MailboxError, parse_mailbox};
pub use attachments::{ContentTypeError, attachment_content_type};
pub use headers::{
    ALLOWED_HEADER_PREFIXES, ALLOWED_HEADERS, DENIED_HEADER_PREFIXES, RESERVED_HEADER_PREFIXES,
    RESERVED_HEADERS, is_allowed_header,
};
pub use limits::{DEFAULT_BLOCKED_EXTENSIONS, Limits, MIN_IDEMPOTENCY_KEY_CHARS};

use crate::job::{EmailMessage, JobRequest, SCHEMA_VERSION, SendJob};

/// One rule one field breaks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    /// Where: `message.to[2]`, `message.attachments[0].filename`, `tenant`.
    pub path: String,
    /// What is wrong, without the value: `not a valid mailbox`.
    pub rule: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.rule)
    }
}

/// Every rule a job breaks, in field order; never empty when returned as an
/// error.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", join(.0))]
pub struct ValidationErrors(Vec<FieldError>);

fn join(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl ValidationErrors {
    /// The broken rules.
    pub fn errors(&self) -> &[FieldError] {
        &self.0
    }

    /// How many rules are broken.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether none is (never, for one returned by a `validate_*`).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The broken rules, in field order.
    pub fn iter(&self) -> std::slice::Iter<'_, FieldError> {
        self.0.iter()
    }
}

impl IntoIterator for ValidationErrors {
    type Item = FieldError;
    type IntoIter = std::vec::IntoIter<FieldError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a ValidationErrors {
    type Item = &'a FieldError;
    type IntoIter = std::slice::Iter<'a, FieldError>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// Checks a job as it travels the queue: schema version, tenant, idempotency
/// key, `expires_at` after `created_at`, and the message. Whether it has
/// expired by now is the worker's question, not this one.
pub fn validate_job(job: &SendJob, limits: &Limits) -> Result<(), ValidationErrors> {
    let mut report = Report::default();
    if job.schema != SCHEMA_VERSION {
        report.add(
            "schema",
            format!("unsupported schema version (expected {SCHEMA_VERSION})"),
        );
    }
    check_tenant(&job.tenant, limits, &mut report);
    check_idempotency_key(job.idempotency_key.as_deref(), limits, &mut report);
    if job.expires_at.is_some_and(|at| at <= job.created_at) {
        report.add("expires_at", "must be after created_at");
    }
    check_message(&job.message, limits, &mut report);
    report.finish()
}

/// Checks a caller's request before it becomes a job: the same message rules
/// as [`validate_job`], and `expires_at` after `now`. The tenant is checked
/// only when given.
pub fn validate_request(
    req: &JobRequest,
    limits: &Limits,
    now: OffsetDateTime,
) -> Result<(), ValidationErrors> {
    let mut report = Report::default();
    if let Some(tenant) = &req.tenant {
        check_tenant(tenant, limits, &mut report);
    }
    check_idempotency_key(req.idempotency_key.as_deref(), limits, &mut report);
    if req.expires_at.is_some_and(|at| at <= now) {
        report.add("expires_at", "must be in the future");
    }
    check_message(&req.message, limits, &mut report);
    report.finish()
}

/// Checks a tenant name on its own (one that did not come in a request,
/// e.g. from a credential or a command-line flag).
pub fn validate_tenant(tenant: &str, limits: &Limits) -> Result<(), ValidationErrors> {
    let mut report = Report::default();
    check_tenant(tenant, limits, &mut report);
    report.finish()
}

/// The errors found so far.
#[derive(Default)]
struct Report(Vec<FieldError>);

impl Report {
    fn add(&mut self, path: impl Into<String>, rule: impl Into<String>) {
        self.0.push(FieldError {
            path: path.into(),
            rule: rule.into(),
        });
    }

    fn finish(self) -> Result<(), ValidationErrors> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ValidationErrors(self.0))
        }
    }
}

const RULE_EMPTY: &str = "must not be empty";
const RULE_CONTROL: &str = "must not contain control characters";
const RULE_LINE_BREAK: &str = "must not contain line breaks (CR, LF), NUL or control characters";

/// `prefix["key"]`, the key escaped (a CR shows as `\r`) and cut short, so a
/// path neither breaks a line nor grows without bound; a key with an `@`
/// masked as an address is (a caller may key metadata by recipient).
fn keyed_path(prefix: &str, key: &str) -> String {
    const SHOWN_CHARS: usize = 80;
    let masked;
    let key = if key.contains('@') {
        masked = crate::telemetry::mask_email(key);
        masked.as_str()
    } else {
        key
    };
    let shown: String = key.chars().take(SHOWN_CHARS).collect();
    let more = if exceeds_chars(key, SHOWN_CHARS) {
        "…"
    } else {
        ""
    };
    format!("{prefix}[{shown:?}{more}]")
}

/// Characters that override or isolate the direction of the text after
/// them (U+202A to U+202E, U+2066 to U+2069): `\u{202e}knaB` shows as
/// `Bank`, and `invoice\u{202e}fdp.exe` as `invoiceexe.pdf`.
fn is_direction_override(c: char) -> bool {
    matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

fn longer_than(max: usize) -> String {
    format!("longer than {max} characters")
}

fn exceeds_chars(value: &str, max: usize) -> bool {
    // No more characters than bytes: most values need no count.
    value.len() > max && value.chars().nth(max).is_some()
}

/// Checks text bound for a header: no CR, LF, NUL or other control character
/// but tab, at most `max` characters. Returns whether it passed.
fn check_header_text(report: &mut Report, path: &str, value: &str, max: usize) -> bool {
    let mut ok = true;
    if value.chars().any(|c| c.is_control() && c != '\t') {
        report.add(path, RULE_LINE_BREAK);
        ok = false;
    }
    if exceeds_chars(value, max) {
        report.add(path, longer_than(max));
        ok = false;
    }
    ok
}

/// Checks a short caller label (idempotency key, tag, metadata key): not
/// empty, at most `max` characters, no control characters.
fn check_label(report: &mut Report, path: &str, value: &str, max: usize) {
    if value.is_empty() {
        report.add(path, RULE_EMPTY);
    }
    if exceeds_chars(value, max) {
        report.add(path, longer_than(max));
    }
    if value.chars().any(char::is_control) {
        report.add(path, RULE_CONTROL);
    }
}

/// Tenants go into Redis keys and AMQP headers: a short, plain name.
fn check_tenant(tenant: &str, limits: &Limits, report: &mut Report) {
    if tenant.is_empty() {
        report.add("tenant", RULE_EMPTY);
    }
    if exceeds_chars(tenant, limits.max_tenant_chars) {
        report.add("tenant", longer_than(limits.max_tenant_chars));
    }
    if !tenant
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        report.add("tenant", "may contain only A-Z, a-z, 0-9, '.', '_' and '-'");
    }
}

fn check_idempotency_key(key: Option<&str>, limits: &Limits, report: &mut Report) {
    if let Some(key) = key {
        check_label(
            report,
            "idempotency_key",
            key,
            limits.max_idempotency_key_chars,
        );
    }
}

fn check_message(message: &EmailMessage, limits: &Limits, report: &mut Report) {
    check_address(report, || "message.from".to_owned(), &message.from, limits);
    for (field, list) in [
        ("reply_to", &message.reply_to),
        ("to", &message.to),
        ("cc", &message.cc),
        ("bcc", &message.bcc),
    ] {
        for (i, address) in list.iter().enumerate() {
            check_address(report, || format!("message.{field}[{i}]"), address, limits);
        }
    }
    let recipients = message.recipients().count();
    if recipients == 0 {
        report.add(
            "message.to",
            "at least one recipient (to, cc or bcc) is required",
        );
    } else if recipients > limits.max_recipients {
        report.add(
            "message",
            format!(
                "at most {} recipients (to, cc and bcc together)",
                limits.max_recipients
            ),
        );
    }

    if message.subject.trim().is_empty() {
        report.add("message.subject", RULE_EMPTY);
    }
    check_header_text(
        report,
        "message.subject",
        &message.subject,
        limits.max_subject_chars,
    );

    check_bodies(message, report);
    headers::check_headers(&message.headers, limits, report);
    attachments::check_attachments(&message.attachments, limits, report);
    check_tags_and_metadata(message, limits, report);

    if message.size() > limits.max_message_bytes {
        report.add(
            "message",
            format!("larger than {} bytes in total", limits.max_message_bytes),
        );
    }
}

/// `path` is made only for a problem: most addresses have none.
fn check_address(report: &mut Report, path: impl Fn() -> String, address: &str, limits: &Limits) {
    if let Err(e) = parse_mailbox(address) {
        report.add(path(), e.to_string());
    }
    if exceeds_chars(address, limits.max_header_value_chars) {
        report.add(path(), longer_than(limits.max_header_value_chars));
    }
}

fn check_bodies(message: &EmailMessage, report: &mut Report) {
    if message.text.is_none() && message.html.is_none() {
        report.add("message", "a text or html body is required");
    }
    for (path, body) in [
        ("message.text", &message.text),
        ("message.html", &message.html),
    ] {
        if body.as_deref().is_some_and(|b| b.trim().is_empty()) {
            report.add(path, RULE_EMPTY);
        }
        // SMTP forbids NUL in a message, and a 7bit body carries it raw.
        if body
            .as_deref()
            .is_some_and(|b| memchr::memchr(0, b.as_bytes()).is_some())
        {
            report.add(path, "must not contain NUL characters");
        }
    }
}

fn check_tags_and_metadata(message: &EmailMessage, limits: &Limits, report: &mut Report) {
    if message.tags.len() > limits.max_tags {
        report.add("message.tags", format!("at most {} tags", limits.max_tags));
    }
    for (i, tag) in message.tags.iter().enumerate() {
        check_label(
            report,
            &format!("message.tags[{i}]"),
            tag,
            limits.max_tag_chars,
        );
    }
    if message.metadata.len() > limits.max_metadata_entries {
        report.add(
            "message.metadata",
            format!("at most {} entries", limits.max_metadata_entries),
        );
    }
    for (key, value) in &message.metadata {
        let path = keyed_path("message.metadata", key);
        check_label(report, &path, key, limits.max_tag_chars);
        if exceeds_chars(value, limits.max_metadata_value_chars) {
            report.add(&path, longer_than(limits.max_metadata_value_chars));
        }
        if value.chars().any(char::is_control) {
            report.add(&path, RULE_CONTROL);
        }
    }
}
