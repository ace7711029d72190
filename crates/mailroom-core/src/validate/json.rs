//! JSON text from outside, before and after parsing: a bound on how many
//! values it holds, checked before it is parsed (a parsed value costs far
//! more memory than its text: `0,` is two bytes, a `serde_json::Value` 32
//! and a `String` 24, so a body within any byte limit could otherwise
//! become hundreds of MiB of lists), and parse errors without the values
//! they quote.

use super::Limits;

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

/// A serde error without the values it may quote (they may be personal
/// data): everything from the first double quote to the last goes, so an
/// escaped quote inside a value cannot end the cut early, and so does the
/// name of an unknown field or variant (the caller's text). Field names
/// serde expects, and the position, stay.
pub fn redacted_error(err: &serde_json::Error) -> String {
    let text = err.to_string();
    let mut text = match (text.find('"'), text.rfind('"')) {
        (Some(first), Some(last)) if last > first => {
            format!("{}\"…\"{}", &text[..first], &text[last + 1..])
        }
        _ => text,
    };
    if text.starts_with("unknown ")
        && let Some(open) = text.find('`')
        && let Some(close) = text[open + 1..].find('`')
    {
        text.replace_range(open..=open + 1 + close, "`…`");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::JobRequest;

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
}
