//! The MIME message a job becomes, and its SMTP envelope.
//!
//! The `Message-ID` is derived from the job id (`<JOB_ID@sender-domain>`)
//! and the `Date` from the job's creation, so every attempt of a job is the
//! same message: a receiver that sees a retry after an uncertain outcome
//! can tell it is one. Bcc recipients are in the envelope, not the headers.

use std::time::SystemTime;

use lettre::Message;
use lettre::address::Envelope;
use lettre::message::header::{ContentType, HeaderName, HeaderValue};
use lettre::message::{Attachment, Mailbox, MultiPart, SinglePart};
use mailroom_core::job::SendJob;
use mailroom_core::validate::parse_mailbox;

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
pub fn build_message(job: &SendJob) -> Result<OutgoingMessage, MessageError> {
    let message = &job.message;
    let from = mailbox("from", &message.from)?;
    let message_id = format!("<{}@{}>", job.id, from.email.domain());
    let sender = from.email.clone();
    let mut recipients = Vec::new();
    let mut builder = Message::builder()
        .from(from)
        .subject(message.subject.clone())
        .message_id(Some(message_id.clone()))
        .date(SystemTime::from(job.created_at));
    for (field, list) in [
        ("to", &message.to),
        ("cc", &message.cc),
        ("bcc", &message.bcc),
        ("reply_to", &message.reply_to),
    ] {
        for (i, text) in list.iter().enumerate() {
            let parsed = mailbox(&format!("{field}[{i}]"), text)?;
            if field != "reply_to" {
                recipients.push(parsed.email.clone());
            }
            builder = match field {
                "to" => builder.to(parsed),
                "cc" => builder.cc(parsed),
                "bcc" => builder.bcc(parsed),
                _ => builder.reply_to(parsed),
            };
        }
    }
    for (name, value) in &message.headers {
        let header = HeaderName::new_from_ascii(name.clone())
            .map_err(|_| MessageError::Header(name.clone()))?;
        builder = builder.raw_header(HeaderValue::new(header, value.clone()));
    }
    // Given rather than left to lettre, which would parse the headers it
    // was just given back into addresses (`Sender` is reserved, so the
    // envelope's sender is always `From`).
    let envelope = Envelope::new(Some(sender), recipients)
        .map_err(|err| MessageError::Build(err.to_string()))?;
    builder = builder.envelope(envelope);
    let plain = |text: &str| text::part(text, ContentType::TEXT_PLAIN);
    let html = |html: &str| text::part(html, ContentType::TEXT_HTML);
    let body = match (&message.text, &message.html) {
        (Some(text), Some(markup)) => Body::Alternative(
            MultiPart::alternative()
                .singlepart(plain(text))
                .singlepart(html(markup)),
        ),
        (None, Some(markup)) => Body::Single(html(markup)),
        (text, None) => Body::Single(plain(text.as_deref().unwrap_or_default())),
    };
    let built = if message.attachments.is_empty() {
        match body {
            Body::Single(part) => builder.singlepart(part),
            Body::Alternative(parts) => builder.multipart(parts),
        }
    } else {
        let mut mixed = match body {
            Body::Single(part) => MultiPart::mixed().singlepart(part),
            Body::Alternative(parts) => MultiPart::mixed().multipart(parts),
        };
        for (i, attachment) in message.attachments.iter().enumerate() {
            let content_type = ContentType::parse(&attachment.content_type)
                .map_err(|_| MessageError::ContentType(i))?;
            mixed = mixed.singlepart(
                Attachment::new(attachment.filename.clone())
                    .body(attachment.content.clone(), content_type),
            );
        }
        builder.multipart(mixed)
    }
    .map_err(|err| MessageError::Build(err.to_string()))?;
    Ok(OutgoingMessage {
        envelope: built.envelope().clone(),
        message_id,
        raw: built.formatted(),
    })
}

/// The readable part of a message: one body, or text and HTML alternatives.
enum Body {
    Single(SinglePart),
    Alternative(MultiPart),
}

fn mailbox(field: &str, text: &str) -> Result<Mailbox, MessageError> {
    parse_mailbox(text).map_err(|_| MessageError::Mailbox {
        field: field.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use mailroom_core::job::Attachment as JobAttachment;

    use super::*;
    use crate::steps::tests::sample_job;

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
}
