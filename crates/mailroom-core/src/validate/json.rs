//! JSON text from outside, before and after parsing: a bound on how many
//! values it holds, checked before it is parsed (a parsed value costs far
//! more memory than its text: `0,` is two bytes, a `serde_json::Value` 32
//! and a `String` 24, so a body within any byte limit could otherwise
//! become hundreds of MiB of lists), and parse errors without the values
//! they quote.

use serde::de::DeserializeOwned;
use serde_path_to_error::Segment;

use super::Limits;
use crate::job::Object;

/// Fields a message has besides its lists, with room for nesting.
const FIXED_VALUES: usize = 64;

/// Values one job may need: its lists at their limits (an attachment
/// is an object of a few fields), reply-to as long as the recipients.
pub fn values_per_job(limits: &Limits) -> usize {
    [
        limits.max_recipients.saturating_mul(2),
        limits.max_tags,
        limits.max_attachments.saturating_mul(5),
        limits.max_custom_headers,
        limits.max_metadata_entries,
        FIXED_VALUES,
    ]
    .into_iter()
    .fold(0, usize::saturating_add)
}

/// Whether `body` holds at most about `most` values in arrays and
/// objects. It counts the commas outside strings: every item of an array
/// or member of an object past the first follows one, and the first ones
/// are bounded by the parser's nesting limit. Linear, and fast inside
/// strings (an attachment's base64), where it only looks for the closing
/// quote.
pub fn values_within(body: &[u8], most: usize) -> bool {
    let mut commas = 0usize;
    let mut at = 0;
    while let Some(found) = memchr::memchr2(b'"', b',', &body[at..]) {
        let index = at + found;
        if body[index] == b'"' {
            let Some(end) = string_end(body, index + 1) else {
                // Unterminated: the parser will refuse it.
                return true;
            };
            at = end + 1;
            continue;
        }
        commas += 1;
        if commas > most {
            return false;
        }
        at = index + 1;
    }
    true
}

/// The index of the quote that closes a string whose text starts at
/// `from`, skipping escaped characters.
fn string_end(body: &[u8], from: usize) -> Option<usize> {
    let mut at = from;
    loop {
        let found = at + memchr::memchr2(b'"', b'\\', body.get(at..)?)?;
        if body[found] == b'"' {
            return Some(found);
        }
        at = found + 2;
    }
}

/// Parses a caller's `T` (a job, a batch), which must be a JSON object
/// (see [`Object`]). The error is redacted ([`redacted_error`]) and says
/// where in the document it is: `message.to[1]: invalid type: integer,
/// expected a string at line 1 column 40`. The path is found by parsing
/// again, only when the first parse failed.
pub fn parse_object<T: DeserializeOwned>(text: &[u8]) -> Result<T, String> {
    serde_json::from_slice::<Object<T>>(text)
        .map(Object::into_inner)
        .map_err(|err| format!("{}{}", path_of::<T>(text), redacted_error(&err)))
}

/// Where parsing `text` as `T` fails, as `message.to[1]: `, or nothing.
/// Names the caller chose (a header's or metadata's) show as `[…]`.
fn path_of<T: DeserializeOwned>(text: &[u8]) -> String {
    let mut parser = serde_json::Deserializer::from_slice(text);
    let Err(err) = serde_path_to_error::deserialize::<_, Object<T>>(&mut parser) else {
        return String::new();
    };
    let mut path = String::new();
    for segment in err.path() {
        match segment {
            Segment::Seq { index } => path.push_str(&format!("[{index}]")),
            Segment::Map { key } if FIELDS.contains(&key.as_str()) => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
            }
            Segment::Map { .. } => path.push_str("[…]"),
            Segment::Enum { .. } | Segment::Unknown => {}
        }
    }
    if path.is_empty() {
        path
    } else {
        format!("{path}: ")
    }
}

/// The field names of a job and a batch: a path may name them.
const FIELDS: &[&str] = &[
    "tenant",
    "idempotency_key",
    "lane",
    "expires_at",
    "message",
    "from",
    "reply_to",
    "to",
    "cc",
    "bcc",
    "subject",
    "text",
    "html",
    "headers",
    "attachments",
    "tags",
    "metadata",
    "filename",
    "content_type",
    "content",
    "messages",
];

/// A serde error without the values it may quote (they may be personal
/// data), its position kept. serde and serde_json put caller input in a
/// few places: the value in ``invalid type: integer `4915112345678`,
/// expected a string`` (strings in double quotes, numbers, booleans and
/// characters in backticks), the name in ``unknown field `x` `` and
/// ``unknown variant `x` ``, and the count in `invalid length 3, expected
/// ...`. Each of those gives only its kind; what serde expects (type,
/// field and variant names) stays. A message of another form (a library's
/// own error) loses everything between its first quote and its last.
pub fn redacted_error(err: &serde_json::Error) -> String {
    let text = err.to_string();
    let position = format!(" at line {} column {}", err.line(), err.column());
    match text.strip_suffix(&position) {
        Some(message) if err.line() > 0 => format!("{}{position}", redacted_message(message)),
        _ => redacted_message(&text),
    }
}

/// Where what serde expected starts, in the messages that name it after
/// what it found.
const EXPECTED: &str = ", expected ";

/// Messages of serde_json's syntax errors that hold backticks, none of
/// them the caller's.
const SYNTAX_WITH_QUOTES: &[&str] = &[
    "expected `:`",
    "expected `,` or `]`",
    "expected `,` or `}`",
    "expected `\"`",
];

/// A message without its position: see [`redacted_error`].
fn redacted_message(message: &str) -> String {
    for lead in ["invalid type: ", "invalid value: "] {
        // The last `, expected`: a string value may hold the words too.
        if let Some(rest) = message.strip_prefix(lead)
            && let Some(at) = rest.rfind(EXPECTED)
        {
            return format!("{lead}{}{}", unexpected_kind(&rest[..at]), &rest[at..]);
        }
    }
    if let Some(rest) = message.strip_prefix("invalid length ")
        && let Some(at) = rest.rfind(EXPECTED)
    {
        return format!("invalid length{}", &rest[at..]);
    }
    for (lead, none) in [
        ("unknown field ", ", there are no fields"),
        ("unknown variant ", ", there are no variants"),
    ] {
        if let Some(rest) = message.strip_prefix(lead) {
            // The name is quoted but not escaped: only the list of names
            // serde expects, always last, can be told from it.
            let expected = if rest.ends_with(none) {
                none
            } else {
                rest.rfind(EXPECTED).map_or("", |at| &rest[at..])
            };
            return format!("{lead}`…`{expected}");
        }
    }
    // Fields serde looks for, named by the type: never the caller's.
    let own_names =
        message.starts_with("missing field `") || message.starts_with("duplicate field `");
    if own_names || SYNTAX_WITH_QUOTES.contains(&message) {
        return message.to_owned();
    }
    without_quoted(message)
}

/// What serde found, as its kind alone: `integer` for
/// ``integer `4915112345678` ``, `string` for `string "ada"`. An unknown
/// description becomes `value`.
fn unexpected_kind(found: &str) -> &'static str {
    const KINDS: &[&str] = &[
        "string",
        "integer",
        "floating point",
        "boolean",
        "character",
        "null",
        "number",
        "byte array",
        "unit value",
        "Option value",
        "newtype struct",
        "sequence",
        "map",
        "enum",
        "unit variant",
        "newtype variant",
        "tuple variant",
        "struct variant",
    ];
    KINDS
        .iter()
        .find(|kind| {
            found
                .strip_prefix(**kind)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(' '))
        })
        .copied()
        .unwrap_or("value")
}

/// `message` with everything from its first quote (double or backtick)
/// to its last cut out, or to its end if it has only one.
fn without_quoted(message: &str) -> String {
    let is_quote = |c: char| c == '"' || c == '`';
    match (message.find(is_quote), message.rfind(is_quote)) {
        (Some(first), Some(last)) if last > first => {
            format!("{}…{}", &message[..first], &message[last + 1..])
        }
        (Some(first), _) => format!("{}…", &message[..first]),
        _ => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::JobRequest;

    #[test]
    fn a_parse_error_says_where_without_the_callers_names() {
        let err = |json: &str| parse_object::<JobRequest>(json.as_bytes()).expect_err("refused");
        let msg = r#""from": "shop@example.com", "subject": "s""#;
        let shown = err(&format!(
            r#"{{"message": {{{msg}, "to": ["a@example.org", 5]}}}}"#
        ));
        assert!(
            shown.starts_with("message.to[1]: invalid type: integer, expected a string"),
            "{shown}"
        );
        let shown = err(&format!(
            r#"{{"expires_at": "tomorrow", "message": {{{msg}}}}}"#
        ));
        assert!(shown.starts_with("expires_at: "), "{shown}");
        let shown = err(&format!(
            r#"{{"message": {{{msg}, "metadata": {{"ada.lovelace@example.org": 5}}}}}}"#
        ));
        assert!(
            shown.starts_with("message.metadata[…]: invalid type"),
            "{shown}"
        );
        assert!(!shown.contains("lovelace"), "{shown}");
        let shown = err("{\"message\": {");
        assert!(shown.contains("EOF"), "{shown}");
    }

    #[test]
    fn counts_items_outside_strings_only() {
        assert!(values_within(br#"{"a": [1, 2, 3]}"#, 2));
        assert!(!values_within(br#"{"a": [1, 2, 3]}"#, 1));
        // Commas and brackets inside strings, escaped quotes included.
        assert!(values_within(br#"{"a": "x,[,]\",,,,"}"#, 0));
        assert!(values_within(br#"{"a": "\\", "b": 1}"#, 1));
        assert!(!values_within(br#"{"a": "\\", "b": [1, 2]}"#, 1));
        // Unterminated strings and escapes at the end do not panic.
        assert!(values_within(br#"{"a": "\"#, 0));
        assert!(values_within(br#"{"a": "abc"#, 0));
        assert!(values_within(b"\"", 0));
    }

    #[test]
    fn a_flood_of_tiny_values_is_refused() {
        let limits = Limits::default();
        let flood = format!("{{\"messages\": [{}0]}}", "0,".repeat(1_000_000));
        assert!(!values_within(
            flood.as_bytes(),
            100 * values_per_job(&limits)
        ));
        let one = br#"{"message": {"from": "a@example.org", "to": ["b@example.org"], "subject": "s", "text": "t"}}"#;
        assert!(values_within(one, values_per_job(&limits)));
    }

    #[test]
    fn json_errors_keep_names_and_drop_values() {
        let err = serde_json::from_str::<JobRequest>(r#"{"message": {"to": "ada@example.org"}}"#)
            .expect_err("a string is not a list");
        let text = redacted_error(&err);
        assert!(!text.contains("ada@"), "{text}");
        assert!(text.contains("line 1"), "{text}");
        // An escaped quote inside a value must not end the redaction.
        let err =
            serde_json::from_str::<JobRequest>(r#"{"message": {"to": "x\" ada@example.org"}}"#)
                .expect_err("a string is not a list");
        let text = redacted_error(&err);
        assert!(!text.contains("ada"), "{text}");
        let err =
            serde_json::from_str::<JobRequest>(r#"{"secret_name": 1}"#).expect_err("unknown field");
        let text = redacted_error(&err);
        assert!(!text.contains("secret_name"), "{text}");
        assert!(text.contains("`message`"), "{text}");
        let err = serde_json::from_str::<JobRequest>(r#"{"lane": "ada"}"#).expect_err("variant");
        let text = redacted_error(&err);
        assert!(!text.contains("ada"), "{text}");
        assert!(text.contains("`bulk`"), "{text}");
    }

    /// `json` parsed as a `T` fails; its redacted message.
    fn redacted<T: serde::de::DeserializeOwned + std::fmt::Debug>(json: &str) -> String {
        redacted_error(&serde_json::from_str::<T>(json).expect_err("a bad request"))
    }

    /// A request whose message has `field` set to `value` (JSON text), and
    /// a subject; the fields it lacks are missed only after `value`.
    fn with_field(field: &str, value: &str) -> String {
        format!(r#"{{"message": {{"subject": "s", "{field}": {value}}}}}"#)
    }

    #[test]
    fn values_of_every_kind_go_and_their_kind_and_position_stay() {
        for (field, value, kind, canary) in [
            ("from", "4915112345678", "integer", "4915112345678"),
            ("from", "-4915112345678", "integer", "4915112345678"),
            ("from", "31415.9265", "floating point", "31415"),
            ("from", "1e300", "floating point", "e300"),
            ("from", "true", "boolean", "true"),
            ("to", r#""ada@example.org""#, "string", "ada"),
            ("to", r#""ada`, expected x""#, "string", "ada"),
            ("to", r#""x\", expected ada""#, "string", "ada"),
            (
                "metadata",
                r#"{"k": 4915112345678}"#,
                "integer",
                "4915112345678",
            ),
            ("headers", r#"{"X-A": ["ada"]}"#, "sequence", "ada"),
        ] {
            let text = redacted::<JobRequest>(&with_field(field, value));
            assert!(!text.contains(canary), "{value}: {text}");
            assert!(
                text.starts_with(&format!("invalid type: {kind}, expected ")),
                "{value}: {text}"
            );
            assert!(text.contains(" at line 1 column "), "{value}: {text}");
        }
        let text = redacted::<JobRequest>(&with_field("from", "null"));
        assert!(
            text.starts_with("invalid type: null, expected a string at line 1"),
            "{text}"
        );
    }

    #[test]
    fn out_of_range_numbers_give_only_their_kind() {
        let job = |schema: &str| {
            format!(
                r#"{{"schema": {schema}, "id": "0190b6f0-0000-7000-8000-000000000000", "tenant": "t", "created_at": "2030-01-01T00:00:00Z", "lane": "bulk", "message": {{"from": "a@b.example", "subject": "s"}}}}"#
            )
        };
        let text = redacted::<crate::job::SendJob>(&job("4915112345678"));
        assert!(
            text.starts_with("invalid value: integer, expected u16 at line 1"),
            "{text}"
        );
        let text = redacted::<crate::job::SendJob>(&job("-49151"));
        assert!(!text.contains("49151"), "{text}");
    }

    #[test]
    fn unknown_names_go_and_the_expected_ones_stay() {
        // A name with backticks and the words serde uses cannot pass for
        // the list of expected names.
        for json in [
            r#"{"secret_name": 1}"#,
            r#"{"secret`, expected `x": 1}"#,
            r#"{"secret`, there are no fields": 1}"#,
        ] {
            let text = redacted::<JobRequest>(json);
            assert!(!text.contains("secret"), "{text}");
            assert!(
                text.starts_with("unknown field `…`, expected one of `tenant`, "),
                "{text}"
            );
            assert!(text.contains("`message` at line 1 column "), "{text}");
        }
        let text = redacted::<JobRequest>(&with_field("attachments", r#"[{"secret": 1}]"#));
        assert!(
            text.starts_with("unknown field `…`, expected one of `filename`, "),
            "{text}"
        );
        for lane in ["ada", "ada`, expected `bulk"] {
            let text = redacted::<JobRequest>(&format!(r#"{{"lane": "{lane}"}}"#));
            assert!(!text.contains("ada"), "{text}");
            assert!(
                text.starts_with(
                    "unknown variant `…`, expected `transactional` or `bulk` at line 1"
                ),
                "{text}"
            );
        }
    }

    #[test]
    fn errors_that_hold_no_input_are_kept_whole() {
        let text = redacted::<JobRequest>(r#"{"message": {}}"#);
        assert!(text.starts_with("missing field `from` at line 1"), "{text}");
        let text = redacted::<JobRequest>(r#"{"lane": "bulk", "lane": "bulk"}"#);
        assert!(
            text.starts_with("duplicate field `lane` at line 1"),
            "{text}"
        );
        let text = redacted::<JobRequest>(r#"{"lane" "bulk"}"#);
        assert_eq!(text, "expected `:` at line 1 column 9");
        let text = redacted::<JobRequest>(r#"{"lane": "bulk" "message": 1}"#);
        assert_eq!(text, "expected `,` or `}` at line 1 column 17");
    }

    #[test]
    fn kinds_json_cannot_give_are_hidden_too() {
        use serde::de::{Error as _, Unexpected};
        let made = |err: serde_json::Error| redacted_error(&err);
        let text = made(serde_json::Error::invalid_type(
            Unexpected::Char('§'),
            &"a string",
        ));
        assert_eq!(text, "invalid type: character, expected a string");
        let text = made(serde_json::Error::invalid_value(
            Unexpected::Other("integer `4915112345678` as i128"),
            &"a small number",
        ));
        assert_eq!(text, "invalid value: integer, expected a small number");
        let text = made(serde_json::Error::invalid_value(
            Unexpected::Other("ada's own words"),
            &"a word",
        ));
        assert_eq!(text, "invalid value: value, expected a word");
        let text = made(serde_json::Error::invalid_length(4915, &"two names"));
        assert_eq!(text, "invalid length, expected two names");
        let text = made(serde_json::Error::unknown_variant("ada", &[]));
        assert_eq!(text, "unknown variant `…`, there are no variants");
        // Another library's message, with its value in backticks.
        let text = made(serde_json::Error::custom(
            "found `ada` here, and `ada` there",
        ));
        assert_eq!(text, "found … there");
        let text = made(serde_json::Error::custom("a lone ` then ada"));
        assert_eq!(text, "a lone …");
    }
}
