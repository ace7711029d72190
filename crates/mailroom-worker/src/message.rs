//! The MIME message a job becomes, and its SMTP envelope.
//!
//! The `Message-ID` is derived from the job id (`<JOB_ID@sender-domain>`)
//! and the `Date` from the job's creation, so every attempt of a job is the
//! same message: a receiver that sees a retry after an uncertain outcome
//! can tell it is one. Bcc recipients are in the envelope, not the headers.

use std::io::Write as _;
use std::time::SystemTime;

use lettre::address::{Address, Envelope};
use lettre::message::header::{self, ContentTransferEncoding, ContentType, HeaderName, Headers};
use lettre::message::{Attachment, Body as PartBody, Mailbox, MaybeString, MultiPart, SinglePart};
use mailroom_core::job::{Attachment as JobAttachment, SendJob};
use mailroom_core::validate::{attachment_content_type, parse_mailbox};

mod headers;
mod text;

/// A job that cannot become a message. Validation refuses these before
/// they are queued; this is the last guard.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    /// An address that does not parse, by field.
    #[error("{field}: not a valid mailbox")]
    Mailbox {
        /// `from`, `to[1]`, ...
        field: String,
    },
    /// A header that lettre refuses, by name.
    #[error("header {0}: not a valid header name")]
    Header(String),
    /// An attachment's content type does not parse.
    #[error("attachments[{0}]: not a valid content type")]
    ContentType(usize),
    /// lettre refused the message (e.g. no recipient).
    #[error("message refused: {0}")]
    Build(String),
}

/// A message ready for a transport.
#[derive(Clone, Debug)]
pub struct OutgoingMessage {
    /// SMTP envelope: sender and every recipient (Bcc included).
    pub envelope: Envelope,
    /// The `Message-ID` header's value, brackets included.
    pub message_id: String,
    /// The message as sent (CRLF line ends, no Bcc header).
    pub raw: Vec<u8>,
}

/// Builds `job`'s message.
///
/// The headers are put together here, not by lettre's message builder: it
/// parses each address header back to add to it or to check it, and its
/// parser cannot read a quoted local part (`"john doe"@example.org`), so
/// such an address vanished from `To` and such a sender failed the build.
pub fn build_message(job: &SendJob) -> Result<OutgoingMessage, MessageError> {
    let message = &job.message;
    let from = mailbox(&message.from, || "from".to_owned())?;
    let message_id = format!("<{}@{}>", job.id, from.email.domain());
    let to = mailboxes("to", &message.to)?;
    let cc = mailboxes("cc", &message.cc)?;
    let bcc = mailboxes("bcc", &message.bcc)?;
    let reply_to = mailboxes("reply_to", &message.reply_to)?;
    // `Sender` is reserved, so the envelope's sender is always `From`.
    let recipients: Vec<Address> = [&to, &cc, &bcc]
        .into_iter()
        .flatten()
        .map(|mailbox| mailbox.email.clone())
        .collect();
    let envelope = Envelope::new(Some(from.email.clone()), recipients)
        .map_err(|err| MessageError::Build(err.to_string()))?;

    let mut head = Headers::new();
    head.insert_raw(headers::address_list("From", std::slice::from_ref(&from)));
    head.insert_raw(headers::unstructured(
        HeaderName::new_from_ascii_str("Subject"),
        &message.subject,
    ));
    head.set(header::MessageId::from(message_id.clone()));
    head.set(header::Date::new(SystemTime::from(job.created_at)));
    for (name, list) in [("To", &to), ("Cc", &cc), ("Reply-To", &reply_to)] {
        if !list.is_empty() {
            head.insert_raw(headers::address_list(name, list));
        }
    }
    for (name, value) in &message.headers {
        let header = HeaderName::new_from_ascii(name.clone())
            .map_err(|_| MessageError::Header(name.clone()))?;
        head.insert_raw(headers::unstructured(header, value));
    }
    head.set(header::MIME_VERSION_1_0);

    // Quoted-printable escapes a third of a text at most.
    let mut raw = Vec::with_capacity(message.written_len_hint(3));
    // Writing into a Vec cannot fail.
    let _ = write!(raw, "{head}");
    body(
        message.text.as_deref(),
        message.html.as_deref(),
        &message.attachments,
        &mut raw,
    )?;
    Ok(OutgoingMessage {
        envelope,
        message_id,
        raw,
    })
}

/// Writes the MIME body onto `raw`, its own headers first: the readable
/// part or parts, then the attachments.
fn body(
    text: Option<&str>,
    html: Option<&str>,
    attachments: &[JobAttachment],
    raw: &mut Vec<u8>,
) -> Result<(), MessageError> {
    let plain = |text: &str| text::part(text, ContentType::TEXT_PLAIN);
    let html_part = |html: &str| text::part(html, ContentType::TEXT_HTML);
    let readable = match (text, html) {
        (Some(text), Some(markup)) => Body::Alternative(
            MultiPart::alternative()
                .singlepart(plain(text))
                .singlepart(html_part(markup)),
        ),
        (None, Some(markup)) => Body::Single(html_part(markup)),
        (text, None) => Body::Single(plain(text.unwrap_or_default())),
    };
    if attachments.is_empty() {
        match readable {
            Body::Single(part) => format_single(&part, raw),
            Body::Alternative(parts) => raw.extend(parts.formatted()),
        }
        return Ok(());
    }
    let mut mixed = match readable {
        Body::Single(part) => MultiPart::mixed().singlepart(part),
        Body::Alternative(parts) => MultiPart::mixed().multipart(parts),
    };
    for (i, attachment) in attachments.iter().enumerate() {
        mixed = mixed.singlepart(attachment_part(i, attachment)?);
    }
    raw.extend(mixed.formatted());
    Ok(())
}

/// `part` formatted onto the end of `out`: the bytes of lettre's
/// `SinglePart::formatted`, without the buffer it grows from empty and the
/// copy into `out` (the readable part of most messages).
fn format_single(part: &SinglePart, out: &mut Vec<u8>) {
    // Writing into a Vec cannot fail.
    let _ = write!(out, "{}\r\n", part.headers());
    out.extend_from_slice(part.raw_body());
    out.extend_from_slice(b"\r\n");
}

/// An attachment, always base64: its bytes arrive as they were. lettre
/// sends bytes that happen to be ASCII as 7bit, whose line ends relays
/// and the transport make CRLF, changing the file. Its type is written
/// as validation passes it, `type/subtype` and a charset at most: a
/// `name=` parameter would name the file apart from its checked file name.
fn attachment_part(i: usize, attachment: &JobAttachment) -> Result<SinglePart, MessageError> {
    let content_type = attachment_content_type(&attachment.content_type)
        .ok()
        .and_then(|written| ContentType::parse(&written).ok())
        .ok_or(MessageError::ContentType(i))?;
    // `Binary`: a string would have its line ends made CRLF first.
    let bytes = MaybeString::Binary(attachment.content.clone());
    let body = PartBody::new_with_encoding(bytes, ContentTransferEncoding::Base64)
        .map_err(|_| MessageError::Build(format!("attachments[{i}]: not encodable")))?;
    Ok(Attachment::new(attachment.filename.clone()).body(body, content_type))
}

/// The readable part of a message: one body, or text and HTML alternatives.
enum Body {
    Single(SinglePart),
    Alternative(MultiPart),
}

/// `text` parsed; `field` names it only if it does not parse, so an
/// address that does costs no name.
fn mailbox(text: &str, field: impl FnOnce() -> String) -> Result<Mailbox, MessageError> {
    parse_mailbox(text).map_err(|_| MessageError::Mailbox { field: field() })
}

/// Every mailbox of the list `field`.
fn mailboxes(field: &str, list: &[String]) -> Result<Vec<Mailbox>, MessageError> {
    list.iter()
        .enumerate()
        .map(|(i, text)| mailbox(text, || format!("{field}[{i}]")))
        .collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::steps::tests::sample_job;

    proptest! {
        #[test]
        fn a_single_part_is_formatted_as_lettre_formats_it(
            body in "[a =\t.\r\né€😀\u{1}]{0,200}|[a-z \n]{0,300}",
            html in any::<bool>(),
        ) {
            let kind = if html { ContentType::TEXT_HTML } else { ContentType::TEXT_PLAIN };
            let part = text::part(&body, kind);
            let mut out = b"head".to_vec();
            format_single(&part, &mut out);
            let mut expected = b"head".to_vec();
            expected.extend(part.formatted());
            prop_assert_eq!(out, expected);
        }
    }

    fn text(message: &OutgoingMessage) -> String {
        String::from_utf8_lossy(&message.raw).into_owned()
    }

    #[test]
    fn message_id_and_date_come_from_the_job() {
        let job = sample_job();
        let first = build_message(&job).expect("build");
        let again = build_message(&job).expect("build");
        assert_eq!(first.message_id, format!("<{}@example.com>", job.id));
        assert!(text(&first).contains(&format!("Message-ID: <{}@example.com>", job.id)));
        assert_eq!(first.raw, again.raw, "every attempt is the same message");
    }

    #[test]
    fn bcc_is_in_the_envelope_only() {
        let mut job = sample_job();
        job.message.bcc = vec!["hidden@example.net".to_owned()];
        job.message.cc = vec!["Copy <copy@example.net>".to_owned()];
        job.message.reply_to = vec!["answers@example.com".to_owned()];
        let message = build_message(&job).expect("build");
        assert!(!text(&message).contains("hidden@example.net"));
        let to: Vec<String> = message
            .envelope
            .to()
            .iter()
            .map(ToString::to_string)
            .collect();
        let mut expected: Vec<String> = job
            .message
            .to
            .iter()
            .map(|to| parse_mailbox(to).expect("mailbox").email.to_string())
            .collect();
        expected.extend([
            "copy@example.net".to_owned(),
            "hidden@example.net".to_owned(),
        ]);
        assert_eq!(to, expected, "to, cc and bcc; never reply-to");
        assert_eq!(
            message.envelope.from().map(ToString::to_string),
            Some(
                parse_mailbox(&job.message.from)
                    .expect("from")
                    .email
                    .to_string()
            )
        );
    }

    #[test]
    fn attachments_and_both_bodies_are_kept() {
        let mut job = sample_job();
        job.message.html = Some("<p>Thanks</p>".to_owned());
        job.message
            .headers
            .insert("X-Campaign".to_owned(), "spring".to_owned());
        job.message.attachments = vec![JobAttachment {
            filename: "receipt.pdf".to_owned(),
            content_type: "application/pdf".to_owned(),
            content: b"%PDF-1.4 fake".to_vec(),
        }];
        let raw = text(&build_message(&job).expect("build"));
        assert!(raw.contains("multipart/mixed"), "{raw}");
        assert!(raw.contains("multipart/alternative"), "{raw}");
        assert!(raw.contains("filename=\"receipt.pdf\""), "{raw}");
        assert!(raw.contains("X-Campaign: spring"), "{raw}");
        assert!(raw.contains("Thanks"), "{raw}");
    }

    /// The header section, as lines without their CRLF.
    fn header_lines(message: &OutgoingMessage) -> Vec<String> {
        let raw = text(message);
        let (head, _) = raw.split_once("\r\n\r\n").expect("headers, then body");
        head.split("\r\n").map(str::to_owned).collect()
    }

    /// Header `name`'s value, unfolded (RFC 5322 §2.2.3: CRLF removed).
    fn header(message: &OutgoingMessage, name: &str) -> Option<String> {
        let raw = text(message);
        let (head, _) = raw.split_once("\r\n\r\n").expect("headers, then body");
        let unfolded = head.replace("\r\n ", " ").replace("\r\n\t", "\t");
        let prefix = format!("{name}: ");
        unfolded
            .split("\r\n")
            .find_map(|line| line.strip_prefix(&prefix).map(str::to_owned))
    }

    /// A job with every header as long as validation lets it be.
    fn longest_headers_job() -> SendJob {
        let mut job = sample_job();
        let address = |i: usize| format!("user{i}.with.a.longish.name@subdomain{i}.example.org");
        job.message.to = (0..30).map(address).collect();
        job.message.cc = (30..50)
            .map(|i| format!("\"Lovelace, Ada {i}\" <{}>", address(i)))
            .collect();
        job.message.reply_to = vec![
            format!("{} <answers@example.com>", "Name".repeat(240)),
            format!("\"{}\" <answers@example.com>", "a".repeat(980)),
            format!("\"{}\" <answers@example.com>", "a b,".repeat(245)),
            format!("{} <answers@example.com>", "é".repeat(970)),
        ];
        let headers = [
            ("X-Long", "a".repeat(998)),
            ("X-Words", "word ".repeat(200).trim_end().to_owned()),
            ("X-Utf", "é".repeat(998)),
            (
                "X-Mixed",
                format!("{} {}", "b".repeat(500), "ü".repeat(497)),
            ),
            ("X-Spaces", format!("a{}b", " ".repeat(996))),
            ("X-Tabs", "c\t".repeat(499)),
        ];
        for (name, value) in headers {
            job.message.headers.insert(name.to_owned(), value);
        }
        job
    }

    #[test]
    fn no_header_line_is_over_998_octets() {
        let message = build_message(&longest_headers_job()).expect("build");
        for line in header_lines(&message) {
            assert!(line.len() <= 998, "{} octets: {line}", line.len());
            assert!(!line.trim().is_empty(), "a line of only whitespace");
        }
    }

    #[test]
    fn address_lists_fold_after_commas() {
        let job = longest_headers_job();
        let message = build_message(&job).expect("build");
        let lines = header_lines(&message);
        let to_lines = lines
            .iter()
            .skip_while(|line| !line.starts_with("To: "))
            .take_while(|line| line.starts_with("To: ") || line.starts_with(' '));
        for line in to_lines {
            assert!(line.len() <= 78, "{line}");
        }
        assert_eq!(
            header(&message, "To").as_deref(),
            Some(job.message.to.join(", ").as_str())
        );
        assert_eq!(
            header(&message, "Cc").as_deref(),
            Some(job.message.cc.join(", ").as_str())
        );
    }

    #[test]
    fn a_long_custom_value_folds_at_its_whitespace() {
        let job = longest_headers_job();
        let message = build_message(&job).expect("build");
        for name in ["X-Words", "X-Tabs"] {
            assert_eq!(
                header(&message, name).as_ref(),
                job.message.headers.get(name),
                "{name}: unfolding gives the value back"
            );
        }
        let words = header_lines(&message)
            .into_iter()
            .skip_while(|line| !line.starts_with("X-Words: "))
            .take_while(|line| line.starts_with("X-Words: ") || line.starts_with(' '))
            .collect::<Vec<_>>();
        assert!(words.len() > 1, "folded");
        assert!(words.iter().all(|line| line.len() <= 78), "{words:?}");
    }

    #[test]
    fn a_bare_quoted_local_part_is_kept_in_its_header() {
        let mut job = sample_job();
        job.message.to = vec![
            "\"john doe\"@example.org".to_owned(),
            "bob@example.org".to_owned(),
        ];
        job.message.cc = vec![
            "\"jane doe\"@example.org".to_owned(),
            "\"Lovelace, Ada\" <ada@example.org>".to_owned(),
        ];
        let message = build_message(&job).expect("build");
        assert_eq!(
            header(&message, "To").as_deref(),
            Some("\"john doe\"@example.org, bob@example.org")
        );
        assert_eq!(
            header(&message, "Cc").as_deref(),
            Some("\"jane doe\"@example.org, \"Lovelace, Ada\" <ada@example.org>")
        );
    }

    #[test]
    fn a_sender_with_a_quoted_local_part_is_sent() {
        let mut job = sample_job();
        job.message.from = "\"no reply\"@shop.example".to_owned();
        let message = build_message(&job).expect("build");
        assert_eq!(
            message.envelope.from().map(ToString::to_string).as_deref(),
            Some("\"no reply\"@shop.example")
        );
        assert_eq!(
            header(&message, "From").as_deref(),
            Some("\"no reply\"@shop.example")
        );
        assert_eq!(message.message_id, format!("<{}@shop.example>", job.id));
    }

    #[test]
    fn no_attachment_header_line_is_over_998_octets() {
        let mut job = sample_job();
        // The longest name and type validation lets through.
        job.message.attachments = vec![
            JobAttachment {
                filename: format!("{}.pdf", "é".repeat(251)),
                content_type: "application/pdf".to_owned(),
                content: b"%PDF".to_vec(),
            },
            JobAttachment {
                filename: format!("{}.pdf", "n".repeat(251)),
                content_type: format!("application/{}", "x".repeat(243)),
                content: b"%PDF".to_vec(),
            },
        ];
        let raw = text(&build_message(&job).expect("build"));
        for line in raw.split("\r\n") {
            assert!(line.len() <= 998, "{} octets: {line}", line.len());
        }
    }

    #[test]
    fn an_attachment_type_carries_no_second_file_name() {
        let mut job = sample_job();
        job.message.attachments = vec![JobAttachment {
            filename: "notes.txt".to_owned(),
            content_type: "text/plain; charset=utf-8".to_owned(),
            content: b"hello".to_vec(),
        }];
        let raw = text(&build_message(&job).expect("build"));
        assert!(
            raw.contains("Content-Type: text/plain; charset=utf-8\r\n"),
            "{raw}"
        );
        assert!(
            raw.contains("Content-Disposition: attachment; filename=\"notes.txt\"\r\n"),
            "{raw}"
        );
        for content_type in [
            "application/pdf; name=\"invoice.exe\"",
            "application/octet-stream; name*=UTF-8''invoice.exe",
        ] {
            job.message.attachments[0].content_type = content_type.to_owned();
            assert!(
                matches!(build_message(&job), Err(MessageError::ContentType(0))),
                "{content_type}: a name= parameter is never written"
            );
        }
    }

    #[test]
    fn attachments_keep_their_exact_bytes() {
        let mut job = sample_job();
        // Name, type, bytes, and the bytes in base64.
        let files: [(&str, &str, &[u8], &str); 3] = [
            (
                "a.bin",
                "application/octet-stream",
                b"hello\nworld\n",
                "aGVsbG8Kd29ybGQK",
            ),
            (
                "b.bin",
                "application/octet-stream",
                b"line1\r\nline2\nline3\rend",
                "bGluZTENCmxpbmUyCmxpbmUzDWVuZA==",
            ),
            ("c.csv", "text/csv", b"a,b\nc,d\n", "YSxiCmMsZAo="),
        ];
        job.message.attachments = files
            .iter()
            .map(|&(filename, content_type, content, _)| JobAttachment {
                filename: filename.to_owned(),
                content_type: content_type.to_owned(),
                content: content.to_vec(),
            })
            .collect();
        let raw = text(&build_message(&job).expect("build"));
        for (filename, _, _, base64) in files {
            let start = raw
                .find(&format!("filename=\"{filename}\""))
                .expect("the attachment");
            let part = &raw[raw[..start].rfind("\r\n--").expect("its boundary")..];
            let (head, body) = part.split_once("\r\n\r\n").expect("head, then body");
            assert!(
                head.contains("Content-Transfer-Encoding: base64"),
                "{filename}: {head}"
            );
            assert!(
                body.starts_with(&format!("{base64}\r\n")),
                "{filename}: {body}"
            );
        }
    }
}
