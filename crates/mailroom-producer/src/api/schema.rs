//! The JSON Schema of a request body, written from the validation rules and
//! this server's limits, so a client (or a fuzzer) generating from the
//! OpenAPI document makes requests the API accepts.
//!
//! Types, required fields, unknown fields, lengths and counts are exact.
//! Rules that JSON Schema cannot say exactly are narrowed to a shape that
//! always passes: addresses to the two shapes nearly every one has
//! (`ada@example.org`, `Ada Lovelace <ada@example.org>`), header names to
//! the allow-list and `X-` names, file names to plain ones. The server
//! accepts more than that (quoted names, IDN domains); the descriptions say
//! so. What no schema can say (`expires_at` in the future, every recipient
//! together within the limit) is in the descriptions.

use mailroom_core::validate::Limits;
use mailroom_core::validate::{ALLOWED_HEADER_PREFIXES, ALLOWED_HEADERS, DENIED_HEADER_PREFIXES};
use serde_json::{Value, json};

/// Characters a header value may not hold: controls but tab.
const NO_CONTROLS: &str = r"^[^\u0000-\u0008\u000A-\u001F\u007F-\u009F]*$";

/// A label (idempotency key, tag, metadata key): no control character.
const LABEL: &str = r"^[^\u0000-\u001F\u007F-\u009F]*$";

/// Text with something other than whitespace in it.
const NOT_BLANK: &str = r"\S";

/// `user@example.org`, dot-atoms of plain characters.
const ADDRESS: &str = r"[A-Za-z0-9_+-]{1,32}(\.[A-Za-z0-9_+-]{1,15}){0,2}@([A-Za-z0-9]([A-Za-z0-9-]{0,20}[A-Za-z0-9])?\.){1,3}[A-Za-z]{2,12}";

/// The schema of `POST /v1/messages`'s body under `limits`.
pub fn job_request(limits: &Limits) -> Value {
    json!({
        "type": "object",
        "description": "A message to send. The tenant is the credential's: a `tenant` field is refused.",
        "additionalProperties": false,
        "required": ["message"],
        "properties": {
            "idempotency_key": {
                "type": "string",
                "description": "The same key from the same tenant is sent at most once (for the worker's dedup window).",
                "minLength": 1,
                "maxLength": limits.max_idempotency_key_chars,
                "pattern": LABEL,
            },
            "lane": {
                "type": "string",
                "enum": ["transactional", "bulk"],
                "default": "transactional",
                "description": "Work queue: `bulk` mail never delays `transactional` mail.",
            },
            "expires_at": {
                "type": "string",
                "format": "date-time",
                "description": "RFC 3339; must be in the future. Not sent after this time.",
            },
            "message": message(limits),
        },
    })
}

/// The schema of `POST /v1/messages/batch`'s body.
pub fn batch(max_batch: usize) -> Value {
    json!({
        "type": "object",
        "additionalProperties": false,
        "required": ["messages"],
        "properties": {
            "messages": {
                "type": "array",
                "minItems": 1,
                "maxItems": max_batch,
                "description": "Each item is checked and enqueued on its own; the answer has a result per item.",
                "items": { "$ref": "#/components/schemas/JobRequest" },
            },
        },
    })
}

fn message(limits: &Limits) -> Value {
    let mailboxes = |description: &str| {
        json!({
            "type": "array",
            "maxItems": limits.max_recipients,
            "description": description,
            "items": mailbox(limits),
        })
    };
    let non_empty = |name: &str| {
        json!({
            "required": [name],
            "properties": { name: { "minItems": 1 } },
        })
    };
    json!({
        "type": "object",
        "additionalProperties": false,
        "required": ["from", "subject"],
        "anyOf": [non_empty("to"), non_empty("cc"), non_empty("bcc")],
        "allOf": [{ "anyOf": [{ "required": ["text"] }, { "required": ["html"] }] }],
        "properties": {
            "from": mailbox(limits),
            "reply_to": mailboxes("Reply-To mailboxes."),
            "to": mailboxes(&format!("At least one recipient in to, cc or bcc; at most {} in all.", limits.max_recipients)),
            "cc": mailboxes("Cc recipients."),
            "bcc": mailboxes("Bcc recipients (never shown in the message)."),
            "subject": {
                "type": "string",
                "minLength": 1,
                "maxLength": limits.max_subject_chars,
                "allOf": [{ "pattern": NO_CONTROLS }, { "pattern": NOT_BLANK }],
            },
            "text": body("The text/plain body. A text or html body is required."),
            "html": body("The text/html body."),
            "headers": headers(limits),
            "attachments": {
                "type": "array",
                "maxItems": limits.max_attachments,
                "items": attachment(limits),
            },
            "tags": {
                "type": "array",
                "maxItems": limits.max_tags,
                "items": label(limits.max_tag_chars),
            },
            "metadata": {
                "type": "object",
                "maxProperties": limits.max_metadata_entries,
                "propertyNames": label(limits.max_tag_chars),
                "additionalProperties": {
                    "type": "string",
                    "maxLength": limits.max_metadata_value_chars,
                    "pattern": LABEL,
                },
            },
        },
    })
}

fn mailbox(limits: &Limits) -> Value {
    json!({
        "type": "string",
        "maxLength": limits.max_header_value_chars,
        "pattern": format!("^({ADDRESS}|[A-Za-z0-9]{{1,20}}( [A-Za-z0-9]{{1,20}}){{0,3}} <{ADDRESS}>)$"),
        "description": "One RFC 5322 mailbox. The pattern shows the usual shapes; quoted display names, quoted local parts and IDN domains are accepted too.",
        "example": "Ada Lovelace <ada@example.org>",
    })
}

fn body(description: &str) -> Value {
    json!({
        "type": "string",
        "description": description,
        "allOf": [{ "pattern": r"^[^\u0000]*$" }, { "pattern": NOT_BLANK }],
    })
}

fn label(max: usize) -> Value {
    json!({ "type": "string", "minLength": 1, "maxLength": max, "pattern": LABEL })
}

fn headers(limits: &Limits) -> Value {
    let allowed = any_case_of(ALLOWED_HEADER_PREFIXES.iter().copied());
    let denied = any_case_of(DENIED_HEADER_PREFIXES.iter().copied());
    json!({
        "type": "object",
        "maxProperties": limits.max_custom_headers,
        "description": "Extra header fields: the allow-list, or an `X-` name outside the reserved X- prefixes. Names are case-insensitive and must not repeat.",
        "propertyNames": {
            "anyOf": [
                { "enum": ALLOWED_HEADERS },
                { "pattern": format!("^({allowed})[A-Za-z0-9]{{1,20}}(-[A-Za-z0-9]{{1,20}}){{0,2}}$") },
            ],
            "not": { "pattern": format!("^({denied})") },
        },
        "additionalProperties": {
            "type": "string",
            "minLength": 1,
            "maxLength": limits.max_header_value_chars,
            "allOf": [{ "pattern": NO_CONTROLS }, { "pattern": NOT_BLANK }],
        },
    })
}

fn attachment(limits: &Limits) -> Value {
    // Every dot-separated part is an extension to the check; the pattern
    // allows one, and not a blocked one.
    let blocked = any_case_of(
        limits
            .blocked_extensions
            .iter()
            .map(|ext| ext.trim_start_matches('.')),
    );
    json!({
        "type": "object",
        "additionalProperties": false,
        "required": ["filename", "content_type", "content"],
        "properties": {
            "filename": {
                "type": "string",
                "pattern": r"^[A-Za-z0-9_-]{1,64}(\.[A-Za-z0-9]{1,8})?$",
                "not": { "pattern": format!(r"\.({blocked})$") },
                "description": "A plain file name; blocked types (executables, scripts) are refused.",
                "example": "receipt.pdf",
            },
            "content_type": {
                "type": "string",
                "pattern": r"^[A-Za-z0-9!#$&^_.+-]{1,32}/[A-Za-z0-9!#$&^_.+-]{1,64}$",
                "not": { "pattern": "^([Mm][Uu][Ll][Tt][Ii][Pp][Aa][Rr][Tt]|[Mm][Ee][Ss][Ss][Aa][Gg][Ee])/" },
                "description": "type/subtype; a message or multipart file goes as application/octet-stream.",
                "example": "application/pdf",
            },
            "content": {
                "type": "string",
                "contentEncoding": "base64",
                "maxLength": limits.max_attachment_bytes.div_ceil(3) * 4,
                "pattern": "^([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$",
                "description": "The file's bytes, standard base64.",
            },
        },
    })
}

/// An alternation matching any of `words` in any case (`exe|bat` as
/// `[Ee][Xx][Ee]|[Bb][Aa][Tt]`).
fn any_case_of<'a>(words: impl Iterator<Item = &'a str>) -> String {
    words.map(case_insensitive).collect::<Vec<_>>().join("|")
}

/// `exe` as `[Ee][Xx][Ee]`: ECMA-262 patterns have no inline flags.
fn case_insensitive(text: &str) -> String {
    text.chars()
        .map(|c| {
            let (lower, upper) = (c.to_ascii_lowercase(), c.to_ascii_uppercase());
            if lower == upper {
                regex_char(c)
            } else {
                format!("[{upper}{lower}]")
            }
        })
        .collect()
}

/// `c` in a pattern: escaped only if it is syntax (an escaped `-` is an
/// error in Unicode mode).
fn regex_char(c: char) -> String {
    if r"\^$.|?*+()[]{}/".contains(c) {
        format!("\\{c}")
    } else {
        c.to_string()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use mailroom_core::job::{Attachment, EmailMessage, JobRequest, Lane};
    use time::OffsetDateTime;

    use super::*;

    fn keys(value: &Value) -> BTreeSet<String> {
        value
            .as_object()
            .map(|map| map.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The schema names every field the types take, and no other: a field
    /// added to the job without its schema fails here.
    #[test]
    fn the_schema_names_every_field_of_a_request() {
        let one = |s: &str| vec![s.to_owned()];
        let pairs = BTreeMap::from([("X-Campaign".to_owned(), "spring".to_owned())]);
        let request = JobRequest {
            tenant: Some("acme".to_owned()),
            idempotency_key: Some("k".to_owned()),
            lane: Lane::Bulk,
            expires_at: Some(OffsetDateTime::now_utc()),
            message: EmailMessage {
                from: "a@example.org".to_owned(),
                reply_to: one("a@example.org"),
                to: one("b@example.org"),
                cc: one("c@example.org"),
                bcc: one("d@example.org"),
                subject: "s".to_owned(),
                text: Some("t".to_owned()),
                html: Some("h".to_owned()),
                headers: pairs.clone(),
                attachments: vec![Attachment {
                    filename: "a.txt".to_owned(),
                    content_type: "text/plain".to_owned(),
                    content: b"a".to_vec(),
                }],
                tags: one("t"),
                metadata: pairs,
            },
        };
        let json = serde_json::to_value(&request).expect("serializes");
        let schema = job_request(&Limits::default());

        let mut fields = keys(&json);
        // Set by the credential, refused in a request body.
        fields.remove("tenant");
        assert_eq!(keys(&schema["properties"]), fields);
        let message = &schema["properties"]["message"];
        assert_eq!(keys(&message["properties"]), keys(&json["message"]));
        assert_eq!(
            keys(&message["properties"]["attachments"]["items"]["properties"]),
            keys(&json["message"]["attachments"][0]),
        );
    }

    /// Whether the schema's `propertyNames` takes `name`.
    fn schema_takes(names: &Value, name: &str) -> bool {
        let matches = |pattern: &Value| {
            let pattern = pattern.as_str().expect("a pattern");
            regex_automata::meta::Regex::new(pattern)
                .expect("the pattern compiles")
                .is_match(name)
        };
        let listed = names["anyOf"][0]["enum"]
            .as_array()
            .expect("the allow-list")
            .iter()
            .any(|allowed| allowed == name);
        (listed || matches(&names["anyOf"][1]["pattern"])) && !matches(&names["not"]["pattern"])
    }

    /// A header name the schema takes is one the server takes: a client
    /// generated from the document never meets a 400 for a name.
    #[test]
    fn header_names_the_schema_takes_pass_validation() {
        let schema = job_request(&Limits::default());
        let names = &schema["properties"]["message"]["properties"]["headers"]["propertyNames"];
        for name in [
            "X-Campaign",
            "x-campaign",
            "X-Campaign-Id-2",
            "List-Unsubscribe",
            "X-Spam-Flag",
            "x-spam-status",
            "X-Mailroom-Job",
            "X-Received",
            "X-Receivedx",
            "Bcc",
            "Subject",
            "Received",
            "X-",
            "X-a:b",
        ] {
            if schema_takes(names, name) {
                assert!(
                    mailroom_core::validate::is_allowed_header(name),
                    "the schema takes {name}, the server does not"
                );
            }
        }
        for name in ["X-Campaign", "x-campaign", "List-Unsubscribe"] {
            assert!(schema_takes(names, name), "the schema refuses {name}");
        }
    }

    #[test]
    fn blocked_extensions_are_matched_in_any_case() {
        assert_eq!(case_insensitive("exe"), "[Ee][Xx][Ee]");
        assert_eq!(case_insensitive("7z"), "7[Zz]");
        assert_eq!(case_insensitive("X-Spam-"), "[Xx]-[Ss][Pp][Aa][Mm]-");
        assert_eq!(case_insensitive("a.b"), "[Aa]\\.[Bb]");
        assert_eq!(any_case_of(["exe", "7z"].into_iter()), "[Ee][Xx][Ee]|7[Zz]");
    }
}
