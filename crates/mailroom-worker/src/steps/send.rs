//! Step 7: build the MIME message and hand it to the transport; turn the
//! reply into a verdict.
//!
//! 2xx is sent; 4xx, connection and TLS errors and timeouts are retried;
//! 5xx is rejected for good. An *uncertain* outcome (the connection died
//! after the end of DATA, before the reply) follows `worker.on_uncertain`:
//! retried with the same Message-ID, or parked in the dead-letter queue for
//! an operator. A send withheld before the end of DATA (the claim's lease
//! may be gone, or Redis could not take the handed marker) is deferred
//! without spending an attempt: neither is the message's fault.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use mailroom_core::job::{EmailMessage, SendJob};
use mailroom_core::offload;
use mailroom_core::settings::OnUncertain;
use mailroom_core::telemetry::hide_known;
use mailroom_core::validate::parse_mailbox;

use crate::message::build_message;
use crate::pipeline::{HELD_RECHECK, REDIS_DOWN_DELAY};
use crate::transport::{HandOver, SendError, Transport, Withheld};
use crate::verdict::{DeadReason, Verdict};

/// What a send came to, and how long the SMTP part took.
#[derive(Debug)]
pub struct Sent {
    /// The verdict.
    pub verdict: Verdict,
    /// Time spent in the transport.
    pub elapsed: Duration,
}

/// Sends `job`, which came in `size` bytes, through `transport`.
pub async fn send(
    transport: &Transport,
    job: &SendJob,
    size: usize,
    on_uncertain: OnUncertain,
    hand_over: Option<HandOver<'_>>,
) -> Sent {
    let message = match offload::heavy(size, || build_message(job)) {
        Ok(message) => message,
        Err(err) => {
            return Sent {
                verdict: Verdict::DeadLetter {
                    reason: DeadReason::Invalid,
                    detail: format!("message could not be built: {err}"),
                },
                elapsed: Duration::ZERO,
            };
        }
    };
    let start = Instant::now();
    let result = transport.send(&job.id, message, hand_over).await;
    let elapsed = start.elapsed();
    Sent {
        verdict: hide_personal(
            verdict_of(result.map(|delivered| delivered.code), on_uncertain),
            job,
        ),
        elapsed,
    }
}

/// `verdict` with what the relay's words may quote of `job` hidden (its
/// text is kept in statuses, dead letters and logs).
fn hide_personal(verdict: Verdict, job: &SendJob) -> Verdict {
    let hidden = |text: &str| {
        let text = hide_known(text, personal_words(job).iter().map(String::as_str));
        hide_quoted_content(&text, &job.message)
    };
    match verdict {
        Verdict::Retry { error } => Verdict::Retry {
            error: hidden(&error),
        },
        Verdict::DeadLetter { reason, detail } => Verdict::DeadLetter {
            reason,
            detail: hidden(&detail),
        },
        other => other,
    }
}

/// What of `job` a relay may quote back in words no pattern catches: each
/// address's local part and display name, whole and word by word, and the
/// subject, whole and word by word. Words under 4 characters of a local
/// part or the subject are left out: they would hide the relay's own
/// words (`ada`, `the`); a display name's are kept from 3.
fn personal_words(job: &SendJob) -> Vec<String> {
    let message = &job.message;
    let mut words = Vec::new();
    let addresses = std::iter::once(&message.from)
        .chain(&message.reply_to)
        .chain(&message.to)
        .chain(&message.cc)
        .chain(&message.bcc);
    // Parsed as the message builder parses them: a display name may hold
    // `<` or `@` inside its quotes.
    for mailbox in addresses.filter_map(|address| parse_mailbox(address).ok()) {
        let local = mailbox.email.user().trim_matches('"');
        words.push(local.to_owned());
        words.extend(
            words_of(local)
                .filter(|word| word.len() >= 4)
                .map(str::to_owned),
        );
        let display = mailbox.name.as_deref().unwrap_or_default();
        words.extend(
            words_of(display)
                .filter(|word| word.chars().count() >= 3)
                .map(str::to_owned),
        );
    }
    words.push(message.subject.trim().to_owned());
    words.extend(
        words_of(&message.subject)
            .filter(|word| word.chars().count() >= 4)
            .map(str::to_owned),
    );
    words
}

/// `text` with every word of 3 characters or more after the reply's code
/// hidden that the message's content also holds: its text and HTML, its
/// headers' values, its attachments' names and text. A content filter
/// quotes the line or file name it refused (`550 5.7.1 Refused body line:
/// your reset code is 839201`), which no pattern tells from the relay's
/// own words. Case-blind; the relay's words the content happens to share
/// are hidden too.
fn hide_quoted_content(text: &str, message: &EmailMessage) -> String {
    let (code, quoted) = text.split_at(after_reply_code(text));
    let candidates: HashSet<String> = words_of(quoted)
        .filter(|word| word.chars().count() >= 3)
        .map(str::to_lowercase)
        .collect();
    if candidates.is_empty() {
        return text.to_owned();
    }
    let lengths: HashSet<usize> = candidates.iter().map(String::len).collect();
    let attachments = message.attachments.iter().flat_map(|attachment| {
        [
            Some(attachment.filename.as_str()),
            std::str::from_utf8(&attachment.content).ok(),
        ]
    });
    let content = [message.text.as_deref(), message.html.as_deref()]
        .into_iter()
        .chain(message.headers.values().map(|value| Some(value.as_str())))
        .chain(attachments)
        .flatten();
    let mut found = HashSet::new();
    for word in content.flat_map(words_of) {
        // Most words differ in length from every candidate: no lowering.
        if lengths.contains(&word.len()) {
            let word = word.to_lowercase();
            if candidates.contains(&word) {
                found.insert(word);
            }
        }
    }
    if found.is_empty() {
        return text.to_owned();
    }
    format!(
        "{code}{}",
        hide_known(quoted, found.iter().map(String::as_str))
    )
}

/// Where the words after a reply's code (`550`) and enhanced code
/// (`5.7.1`) begin in `text`; 0 if it quotes no reply.
fn after_reply_code(text: &str) -> usize {
    let mut tokens = text
        .split_whitespace()
        .map(|token| (token.as_ptr() as usize - text.as_ptr() as usize, token));
    let is_code = |token: &str| {
        token.len() == 3
            && token.bytes().all(|b| b.is_ascii_digit())
            && (b'2'..=b'5').contains(&token.as_bytes()[0])
    };
    let Some((at, code)) = tokens.find(|(_, token)| is_code(token)) else {
        return 0;
    };
    let mut end = at + code.len();
    if let Some((at, enhanced)) = tokens.next()
        && enhanced.split('.').count() == 3
        && enhanced
            .split('.')
            .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
    {
        end = at + enhanced.len();
    }
    end
}

/// The runs of letters and digits in `text`.
fn words_of(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|word| !word.is_empty())
}

/// The verdict for a transport result.
pub fn verdict_of(result: Result<u16, SendError>, on_uncertain: OnUncertain) -> Verdict {
    match result {
        Ok(code) => Verdict::Sent { code },
        Err(err @ SendError::Transient { .. }) => Verdict::Retry {
            error: err.to_string(),
        },
        Err(err @ SendError::Permanent { .. }) => Verdict::DeadLetter {
            reason: DeadReason::Rejected,
            detail: err.to_string(),
        },
        Err(err @ SendError::Uncertain { .. }) => match on_uncertain {
            OnUncertain::Retry => Verdict::Retry {
                error: err.to_string(),
            },
            OnUncertain::Park => Verdict::DeadLetter {
                reason: DeadReason::Uncertain,
                detail: err.to_string(),
            },
        },
        // Whoever holds the claim now finishes the job; this copy comes
        // back to find it sent, or the claim free again.
        Err(SendError::Withheld(Withheld::LeaseLost)) => Verdict::Defer {
            delay: HELD_RECHECK,
            why: "claim lease lost",
        },
        Err(SendError::Withheld(Withheld::Unavailable(_))) => Verdict::Defer {
            delay: REDIS_DOWN_DELAY,
            why: "redis unavailable",
        },
        Err(SendError::Withheld(Withheld::Stopping)) => Verdict::Return,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_withheld_send_is_deferred_without_spending_an_attempt() {
        for on_uncertain in [OnUncertain::Retry, OnUncertain::Park] {
            assert_eq!(
                verdict_of(
                    Err(SendError::Withheld(Withheld::Unavailable(
                        "connection refused".to_owned()
                    ))),
                    on_uncertain
                ),
                Verdict::Defer {
                    delay: REDIS_DOWN_DELAY,
                    why: "redis unavailable"
                }
            );
            assert!(matches!(
                verdict_of(Err(SendError::Withheld(Withheld::LeaseLost)), on_uncertain),
                Verdict::Defer { .. }
            ));
        }
    }

    /// A content filter's refusal quoting the body and an attachment's
    /// name (Postfix `body_checks` and `mime_header_checks` with `${1}`).
    #[test]
    fn relay_words_quoting_the_content_are_hidden() {
        let mut job = crate::steps::tests::sample_job();
        job.message.text = Some("Hello,\nBodyReject your reset code is 839201\nbye\n".to_owned());
        job.message.attachments = vec![mailroom_core::job::Attachment {
            filename: "Gehaltsabrechnung_Max_Mustermann.pdf".to_owned(),
            content_type: "application/pdf".to_owned(),
            content: b"%PDF-1.4".to_vec(),
        }];
        for (reply, canaries) in [
            (
                "550 5.7.1 Refused body line: BodyReject your reset code is 839201",
                &["BodyReject", "839201", "reset"][..],
            ),
            (
                "550 5.7.1 Attachment refused: Gehaltsabrechnung_Max_Mustermann.pdf",
                &["Gehaltsabrechnung", "Mustermann", "Max"][..],
            ),
        ] {
            let verdict = hide_personal(
                verdict_of(Err(SendError::permanent(550, reply)), OnUncertain::Retry),
                &job,
            );
            let Verdict::DeadLetter { detail, .. } = verdict else {
                panic!("{verdict:?}");
            };
            for canary in canaries {
                assert!(!detail.contains(canary), "{canary}: {detail}");
            }
            assert!(detail.contains("550 5.7.1 "), "the codes stay: {detail}");
        }
    }

    /// The sendmail-style refusals a black-box run saw stored verbatim:
    /// a local part without its domain, a display name and the subject.
    #[test]
    fn relay_words_quoting_the_message_are_hidden() {
        let mut job = crate::steps::tests::sample_job();
        job.message.to = vec!["\"Ada Lovelace\" <canary.rcpt.7q3@victim.org>".to_owned()];
        job.message.subject = "CANARYSUBJ9x for you".to_owned();
        let reply = "550 5.1.1 user canary.rcpt.7q3 at victim.org (Lovelace) subject CANARYSUBJ9x";
        let verdict = hide_personal(
            verdict_of(Err(SendError::permanent(550, reply)), OnUncertain::Retry),
            &job,
        );
        let Verdict::DeadLetter { detail, .. } = verdict else {
            panic!("{verdict:?}");
        };
        for canary in ["canary", "7q3", "Lovelace", "CANARYSUBJ9x"] {
            assert!(!detail.contains(canary), "{canary}: {detail}");
        }
        assert!(
            detail.contains("550 5.1.1 user *** at victim.org"),
            "{detail}"
        );
    }
}
