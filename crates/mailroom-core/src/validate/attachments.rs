//! Attachments: how many, how big, what they are called and what type they
//! say they are.
//!
//! A file name is refused when any of its extensions is blocked, not only the
//! last (`invoice.pdf.exe`, `invoice.exe.pdf`), compared without case and
//! with the trailing dots and spaces Windows drops (`a.exe.`, `a.exe `) cut off.
//! The content type is `type/subtype` with at most a `charset`: a `name=`
//! parameter is a second file name, one mail clients save the file under.

use lettre::message::header::ContentType;

use super::{Limits, Report, check_header_text, is_direction_override};
use crate::job::Attachment;

/// Longest file name most file systems keep.
const MAX_FILENAME_CHARS: usize = 255;
/// Longest content type: RFC 6838 names run to 127 characters a side, and
/// parameters are short; longer would only make a header line no relay takes.
const MAX_CONTENT_TYPE_CHARS: usize = 255;

pub(super) fn check_attachments(attachments: &[Attachment], limits: &Limits, report: &mut Report) {
    if attachments.len() > limits.max_attachments {
        report.add(
            "message.attachments",
            format!("at most {} attachments", limits.max_attachments),
        );
    }
    for (i, attachment) in attachments.iter().enumerate() {
        let path = format!("message.attachments[{i}]");
        check_filename(
            &attachment.filename,
            limits,
            &format!("{path}.filename"),
            report,
        );
        check_content_type(
            &attachment.content_type,
            &format!("{path}.content_type"),
            report,
        );
        if attachment.content.len() > limits.max_attachment_bytes {
            report.add(
                format!("{path}.content"),
                format!("larger than {} bytes", limits.max_attachment_bytes),
            );
        }
    }
}

fn check_filename(name: &str, limits: &Limits, path: &str, report: &mut Report) {
    if name.trim().is_empty() {
        report.add(path, "must not be empty");
        return;
    }
    if name.chars().any(|c| c.is_control() || is_bidi_control(c)) {
        report.add(
            path,
            "must not contain control or bidirectional formatting characters",
        );
    }
    if name.contains(['/', '\\']) {
        report.add(path, "must not contain a path separator");
    }
    if name.trim_end_matches(['.', ' ']).trim().is_empty() {
        report.add(path, "not a valid file name");
    }
    if name.chars().count() > MAX_FILENAME_CHARS {
        report.add(path, format!("longer than {MAX_FILENAME_CHARS} characters"));
    }
    if extensions(name).any(|ext| limits.blocks_extension(&ext)) {
        report.add(path, "file type is blocked");
    }
}

/// Every extension in `name`, lowercase and trimmed: for `Invoice.PDF.exe `
/// that is `pdf`, `exe`. A `:` (an NTFS stream name) also ends one.
fn extensions(name: &str) -> impl Iterator<Item = String> {
    name.split(['.', ':'])
        .skip(1)
        .map(|ext| ext.trim().to_lowercase())
        .filter(|ext| !ext.is_empty())
        .collect::<Vec<_>>()
        .into_iter()
}

/// Characters that reorder text on screen: the direction overrides, and
/// the left-to-right and right-to-left marks.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{200e}' | '\u{200f}') || is_direction_override(c)
}

fn check_content_type(content_type: &str, path: &str, report: &mut Report) {
    if !check_header_text(report, path, content_type, MAX_CONTENT_TYPE_CHARS) {
        return;
    }
    if let Err(e) = attachment_content_type(content_type) {
        report.add(path, e.to_string());
    }
}

/// Why an attachment's content type is refused. The messages never repeat
/// the value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ContentTypeError {
    /// Not `type/subtype` made of RFC 2045 tokens.
    #[error("not a valid MIME type (type/subtype)")]
    Invalid,
    /// A parameter other than `charset`, or a `charset` that is not a
    /// token: a `name=` would give the file a second name, one the
    /// blocked-extension rule never saw and many mail clients save it under.
    #[error("must be type/subtype, with no parameter but charset")]
    Parameter,
    /// `message/*` or `multipart/*`: an attachment is sent base64, which
    /// RFC 2046 forbids for `message/*`, and either would nest parts no
    /// rule checked.
    #[error(
        "a message or multipart type cannot be an attachment; send it as application/octet-stream"
    )]
    Container,
}

/// The `Content-Type` an attachment is sent with, made from what a caller
/// gave: `type/subtype`, then `; charset=VALUE` if one was given, and
/// nothing else. Validation and the worker both use it, so no other
/// parameter (a `name=` above all) can reach a message.
pub fn attachment_content_type(content_type: &str) -> Result<String, ContentTypeError> {
    let mut parts = content_type.split(';');
    let essence = parts.next().unwrap_or_default().trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return Err(ContentTypeError::Invalid);
    };
    // `*/*` or `application/*` is a pattern for Accept, not a type.
    if !is_token(kind) || !is_token(subtype) || kind == "*" || subtype == "*" {
        return Err(ContentTypeError::Invalid);
    }
    if kind.eq_ignore_ascii_case("message") || kind.eq_ignore_ascii_case("multipart") {
        return Err(ContentTypeError::Container);
    }
    let mut charset = None;
    for parameter in parts {
        let value = parameter
            .split_once('=')
            .filter(|(name, _)| name.trim().eq_ignore_ascii_case("charset"))
            .map(|(_, value)| value.trim())
            // RFC 2045 lets a value be quoted: `charset="UTF-8"`.
            .map(|value| {
                value
                    .strip_prefix('"')
                    .and_then(|inner| inner.strip_suffix('"'))
                    .unwrap_or(value)
            })
            .filter(|value| is_token(value));
        match (value, charset) {
            (Some(value), None) => charset = Some(value),
            _ => return Err(ContentTypeError::Parameter),
        }
    }
    let written = match charset {
        Some(charset) => format!("{essence}; charset={charset}"),
        None => essence.to_owned(),
    };
    // lettre's parser is stricter than RFC 2045 (no `{` in a token): what
    // it refuses, the worker could not send.
    ContentType::parse(&written).map_err(|_| ContentTypeError::Invalid)?;
    Ok(written)
}

/// An RFC 2045 token: printable ASCII but space and tspecials.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| matches!(b, 33..=126) && !br#"()<>@,;:\"/[]?="#.contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filename_rules(name: &str) -> Vec<String> {
        let mut report = Report::default();
        check_filename(name, &Limits::default(), "f", &mut report);
        report.0.into_iter().map(|e| e.rule).collect()
    }

    #[test]
    fn ordinary_names_pass() {
        for name in [
            "receipt.pdf",
            "Report 2024.xlsx",
            "notes",
            "photo.JPG",
            "straße.txt",
        ] {
            assert_eq!(filename_rules(name), Vec::<String>::new(), "{name}");
        }
    }

    #[test]
    fn blocked_extensions_do_not_slip_through() {
        for name in [
            "x.exe",
            "x.EXE",
            "invoice.pdf.exe",
            "invoice.exe.pdf",
            "a.exe.",
            "a.exe ",
            "a.exe. . ",
            "a. exe",
            ".exe",
            "a.exe:Zone.Identifier",
            "macro.Docm",
        ] {
            assert_eq!(filename_rules(name), ["file type is blocked"], "{name:?}");
        }
    }

    #[test]
    fn bidi_override_is_refused() {
        assert!(
            filename_rules("invoice\u{202e}fdp.txt").contains(
                &"must not contain control or bidirectional formatting characters".into()
            )
        );
    }

    #[test]
    fn dot_names_are_refused() {
        for name in [".", "..", "...", ". ."] {
            assert_eq!(filename_rules(name), ["not a valid file name"], "{name:?}");
        }
    }

    fn content_type_rules(ct: &str) -> Vec<String> {
        let mut report = Report::default();
        check_content_type(ct, "c", &mut report);
        report.0.into_iter().map(|e| e.rule).collect()
    }

    #[test]
    fn content_types() {
        let rules = content_type_rules;
        assert!(rules("application/pdf").is_empty());
        assert!(rules("text/plain; charset=utf-8").is_empty());
        let longest = format!("application/{}", "x".repeat(MAX_CONTENT_TYPE_CHARS - 12));
        assert!(rules(&longest).is_empty());
        assert_eq!(
            rules(&format!("{longest}x")),
            ["longer than 255 characters"]
        );
        for bad in [
            "pdf",
            "application/",
            "/pdf",
            "application pdf",
            "a/b/c",
            "text/(plain)",
            "application/x{y}",
        ] {
            assert_eq!(
                rules(bad),
                ["not a valid MIME type (type/subtype)"],
                "{bad}"
            );
        }
    }

    #[test]
    fn no_parameter_but_charset_is_taken() {
        for bad in [
            "application/pdf; name=\"invoice.exe\"",
            "application/pdf; name=invoice.exe",
            "application/octet-stream; name*=UTF-8''invoice.exe",
            "application/octet-stream; NAME*0=invoice; name*1=.exe",
            "text/plain; charset=utf-8; name=a.exe",
            "text/plain; charset=utf-8; charset=ascii",
            "text/plain; charset=\"utf 8\"",
            "text/plain; charset=\"\"",
            "text/plain; charset=",
            "text/plain; charset",
            "text/plain;",
            "application/pdf; x=1",
        ] {
            assert_eq!(
                content_type_rules(bad),
                ["must be type/subtype, with no parameter but charset"],
                "{bad}"
            );
        }
    }

    #[test]
    fn only_type_and_charset_are_written() {
        assert_eq!(
            attachment_content_type("application/pdf").as_deref(),
            Ok("application/pdf")
        );
        assert_eq!(
            attachment_content_type(" text/csv ;  Charset = UTF-8 ").as_deref(),
            Ok("text/csv; charset=UTF-8")
        );
        assert_eq!(
            attachment_content_type("text/plain;charset=\"UTF-8\"").as_deref(),
            Ok("text/plain; charset=UTF-8"),
            "a quoted value is RFC 2045's too"
        );
        assert_eq!(
            attachment_content_type("application/pdf; name=\"invoice.exe\""),
            Err(ContentTypeError::Parameter)
        );
        for pattern in ["*/*", "application/*", "*/pdf"] {
            assert_eq!(
                attachment_content_type(pattern),
                Err(ContentTypeError::Invalid),
                "{pattern}"
            );
        }
    }

    #[test]
    fn message_and_multipart_types_are_refused() {
        for bad in [
            "message/rfc822",
            "Message/Partial; id=x",
            "multipart/mixed",
            "Multipart/Mixed; boundary=x",
        ] {
            assert_eq!(
                content_type_rules(bad),
                [
                    "a message or multipart type cannot be an attachment; send it as application/octet-stream"
                ],
                "{bad}"
            );
        }
    }
}
