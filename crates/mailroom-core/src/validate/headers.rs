//! Custom headers: which names a caller may set, and what their values may
//! hold.
//!
//! A name is allowed when it is in [`ALLOWED_HEADERS`], or starts with one of
//! [`ALLOWED_HEADER_PREFIXES`] and none of [`DENIED_HEADER_PREFIXES`]. Names in
//! [`RESERVED_HEADERS`] or starting with [`RESERVED_HEADER_PREFIXES`] are
//! mailroom's own (addressing, MIME structure, trace and authentication
//! headers) and always refused. Every comparison ignores ASCII case.

use std::collections::{BTreeMap, HashSet};

use super::{Limits, Report, check_header_text, keyed_path};

/// Header names a caller may set, besides the `X-` ones.
pub const ALLOWED_HEADERS: &[&str] = &[
    "Auto-Submitted",
    "Comments",
    "Feedback-ID",
    "Importance",
    "In-Reply-To",
    "Keywords",
    "List-Archive",
    "List-Help",
    "List-Id",
    "List-Owner",
    "List-Post",
    "List-Subscribe",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "Organization",
    "Precedence",
    "Priority",
    "References",
];

/// Prefixes a caller may use freely (`X-Entity-Ref-ID`, `X-Priority`, ...),
/// except those in [`DENIED_HEADER_PREFIXES`].
pub const ALLOWED_HEADER_PREFIXES: &[&str] = &["X-"];

/// `X-` headers a caller may not set: mailroom's own, and those that
/// receiving systems read as trace, routing or spam verdicts.
pub const DENIED_HEADER_PREFIXES: &[&str] = &[
    "X-Authenticated-",
    "X-Envelope-",
    "X-Forwarded-",
    "X-Google-",
    "X-Mailroom-",
    "X-MS-Exchange-",
    "X-Original-",
    "X-Originating-",
    "X-Received",
    "X-Sender",
    "X-Spam-",
    "X-Virus-",
];

/// Headers mailroom sets itself; never taken from a caller.
pub const RESERVED_HEADERS: &[&str] = &[
    "Authentication-Results",
    "Bcc",
    "Cc",
    "Date",
    "Delivered-To",
    "DKIM-Signature",
    "Errors-To",
    "From",
    "Message-ID",
    "MIME-Version",
    "Received",
    "Received-SPF",
    "Reply-To",
    "Return-Path",
    "Sender",
    "Subject",
    "To",
];

/// Prefixes of headers mailroom sets itself (`Content-Type`,
/// `Content-Transfer-Encoding`, `Resent-From`, `ARC-Seal`, ...).
pub const RESERVED_HEADER_PREFIXES: &[&str] = &["ARC-", "Content-", "Resent-"];

/// Longest header name lettre will emit.
const MAX_HEADER_NAME_BYTES: usize = 76;

const RULE_INVALID_NAME: &str = "not a valid header field name";
const RULE_RESERVED: &str = "header is set by mailroom and cannot be overridden";
const RULE_NOT_ALLOWED: &str = "header is not in the allow-list";
const RULE_DUPLICATE: &str = "duplicate header name (names are case-insensitive)";

/// Whether a caller may set the header `name`: a valid field name that is
/// allowed and not reserved.
pub fn is_allowed_header(name: &str) -> bool {
    header_name_rule(name).is_none()
}

pub(super) fn check_headers(
    headers: &BTreeMap<String, String>,
    limits: &Limits,
    report: &mut Report,
) {
    if headers.len() > limits.max_custom_headers {
        report.add(
            "message.headers",
            format!("at most {} custom headers", limits.max_custom_headers),
        );
    }
    let mut seen = HashSet::new();
    for (name, value) in headers {
        let path = keyed_path("message.headers", name);
        if let Some(rule) = header_name_rule(name) {
            report.add(&path, rule);
        }
        if !seen.insert(name.to_ascii_lowercase()) {
            report.add(&path, RULE_DUPLICATE);
        }
        if value.trim().is_empty() {
            report.add(&path, "must not be empty");
        }
        check_header_text(report, &path, value, limits.max_header_value_chars);
    }
}

/// Why `name` may not be set, or `None` if it may.
fn header_name_rule(name: &str) -> Option<&'static str> {
    let valid = !name.is_empty()
        && name.len() <= MAX_HEADER_NAME_BYTES
        && name.bytes().all(|b| matches!(b, 33..=126) && b != b':');
    if !valid {
        return Some(RULE_INVALID_NAME);
    }
    if RESERVED_HEADERS
        .iter()
        .any(|r| r.eq_ignore_ascii_case(name))
        || has_prefix(name, RESERVED_HEADER_PREFIXES)
    {
        return Some(RULE_RESERVED);
    }
    let allowed = ALLOWED_HEADERS.iter().any(|a| a.eq_ignore_ascii_case(name))
        || (has_prefix(name, ALLOWED_HEADER_PREFIXES) && !has_prefix(name, DENIED_HEADER_PREFIXES));
    (!allowed).then_some(RULE_NOT_ALLOWED)
}

fn has_prefix(name: &str, prefixes: &[&str]) -> bool {
    prefixes.iter().any(|prefix| {
        name.as_bytes()
            .get(..prefix.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(prefix.as_bytes()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list_and_x_headers_pass_in_any_case() {
        for name in [
            "List-Unsubscribe",
            "list-unsubscribe-post",
            "PRECEDENCE",
            "X-Entity-Ref-ID",
            "x-priority",
            "X-Campaign",
        ] {
            assert!(is_allowed_header(name), "{name}");
        }
    }

    #[test]
    fn reserved_headers_are_refused() {
        for name in [
            "Bcc",
            "cc",
            "To",
            "From",
            "Sender",
            "Reply-To",
            "Subject",
            "Date",
            "Message-ID",
            "Return-Path",
            "Received",
            "Content-Type",
            "content-transfer-encoding",
            "Content-Disposition",
            "MIME-Version",
            "DKIM-Signature",
            "ARC-Seal",
            "arc-message-signature",
            "Authentication-Results",
            "Received-SPF",
            "Resent-To",
        ] {
            assert_eq!(header_name_rule(name), Some(RULE_RESERVED), "{name}");
        }
    }

    #[test]
    fn denied_and_unknown_headers_are_refused() {
        for name in [
            "X-Original-To",
            "X-Forwarded-For",
            "x-mailroom-tenant",
            "X-Spam-Status",
            "X-Received",
            "Foo",
            "Disposition-Notification-To",
            "X",
        ] {
            assert_eq!(header_name_rule(name), Some(RULE_NOT_ALLOWED), "{name}");
        }
    }

    #[test]
    fn malformed_names_are_refused() {
        let long = format!("X-{}", "a".repeat(MAX_HEADER_NAME_BYTES));
        for name in [
            "",
            "X-Foo:",
            "X Foo",
            "X-Foo\r\nBcc",
            "X-Foo\0",
            "X-Fo\u{7f}o",
            "X-Föo",
            "X-Foo\t",
            long.as_str(),
        ] {
            assert_eq!(header_name_rule(name), Some(RULE_INVALID_NAME), "{name:?}");
        }
    }
}
