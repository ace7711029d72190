//! A bound on how many JSON values a body holds, checked before it is
//! parsed: a parsed value costs far more memory than its text (`0,` is two
//! bytes, a `serde_json::Value` 32 and a `String` 24), so a body within
//! the byte limit could otherwise make hundreds of MiB of lists.

use mailroom_core::validate::Limits;

/// Fields a message has besides its lists, with room for nesting.
const FIXED_VALUES: usize = 64;

/// Values one message may need: its lists at their limits (an attachment
/// is an object of a few fields), reply-to as long as the recipients.
pub fn per_message(limits: &Limits) -> usize {
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
pub fn within(body: &[u8], most: usize) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_items_outside_strings_only() {
        assert!(within(br#"{"a": [1, 2, 3]}"#, 2));
        assert!(!within(br#"{"a": [1, 2, 3]}"#, 1));
        // Commas and brackets inside strings, escaped quotes included.
        assert!(within(br#"{"a": "x,[,]\",,,,"}"#, 0));
        assert!(within(br#"{"a": "\\", "b": 1}"#, 1));
        assert!(!within(br#"{"a": "\\", "b": [1, 2]}"#, 1));
        // Unterminated strings and escapes at the end do not panic.
        assert!(within(br#"{"a": "\"#, 0));
        assert!(within(br#"{"a": "abc"#, 0));
        assert!(within(b"\"", 0));
    }

    #[test]
    fn a_flood_of_tiny_values_is_refused() {
        let limits = Limits::default();
        let flood = format!("{{\"messages\": [{}0]}}", "0,".repeat(1_000_000));
        assert!(!within(flood.as_bytes(), 100 * per_message(&limits)));
        let one = br#"{"message": {"from": "a@example.org", "to": ["b@example.org"], "subject": "s", "text": "t"}}"#;
        assert!(within(one, per_message(&limits)));
    }
}
