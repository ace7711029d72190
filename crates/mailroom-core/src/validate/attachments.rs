//! Attachments: how many, how big, what they are called and what type they
//! say they are.
//!
//! A file name is refused when any of its extensions is blocked, not only the
//! last (`invoice.pdf.exe`, `invoice.exe.pdf`), compared without case and
//! with the trailing dots and spaces Windows drops (`a.exe.`, `a.exe `) cut off.

use lettre::message::header::ContentType;

use super::{Limits, Report, check_header_text};
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

/// Characters that reorder text on screen (`invoice\u{202e}fdp.exe` shows as
/// `invoiceexe.pdf`).
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

fn check_content_type(content_type: &str, path: &str, report: &mut Report) {
    if !check_header_text(report, path, content_type, MAX_CONTENT_TYPE_CHARS) {
        return;
    }
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        report.add(path, RULE_MIME);
        return;
    };
    // lettre's parser takes `application/` (no subtype); the token check does not.
    if !is_token(kind) || !is_token(subtype) || ContentType::parse(content_type).is_err() {
        report.add(path, RULE_MIME);
    } else if kind.eq_ignore_ascii_case("multipart") {
        report.add(path, "a multipart type cannot be an attachment");
    }
}

const RULE_MIME: &str = "not a valid MIME type (type/subtype)";

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

    #[test]
    fn content_types() {
        let rules = |ct: &str| {
            let mut report = Report::default();
            check_content_type(ct, "c", &mut report);
            report.0.into_iter().map(|e| e.rule).collect::<Vec<_>>()
        };
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
            "text/plain; charset",
            "text/(plain)",
        ] {
            assert_eq!(
                rules(bad),
                ["not a valid MIME type (type/subtype)"],
                "{bad}"
            );
        }
        assert_eq!(
            rules("Multipart/Mixed; boundary=x"),
            ["a multipart type cannot be an attachment"]
        );
    }
}
