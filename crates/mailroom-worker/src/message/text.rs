//! The readable parts (text and HTML), encoded here rather than by lettre.
//!
//! lettre makes a body's line breaks CRLF by inserting each missing CR
//! into the string, which moves the rest of it every time: 200,000 bare
//! LFs took 0.8 s, and a 10 MiB body of them would hold a worker thread
//! for half an hour. Its quoted-printable encoder costs about 4.6 µs for a
//! 2 KiB line, more than the rest of the message. Both are linear here,
//! and the encoding is chosen as lettre chooses it: 7bit when it can be,
//! quoted-printable while at most a third of the bytes need escaping,
//! base64 past that.

use lettre::message::header::{ContentTransferEncoding, ContentType};
use lettre::message::{Body, SinglePart};

use crate::transport::{crlf_breaks, lines};

/// Longest line a 7bit body keeps (RFC 5322 §2.1.1: SHOULD be no more than
/// 78 characters); a longer one is quoted-printable.
const MAX_7BIT_LINE: usize = 78;

/// Longest encoded line of quoted-printable, soft break included
/// (RFC 2045 §6.7, rule 5).
const MAX_QP_LINE: usize = 76;

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// A part of type `content_type` holding `text`, its line breaks (CRLF,
/// bare CR or bare LF) made CRLF.
pub fn part(text: &str, content_type: ContentType) -> SinglePart {
    SinglePart::builder().header(content_type).body(body(text))
}

fn body(text: &str) -> Body {
    if text.is_ascii() && lines(text.as_bytes()).all(|line| line.len() <= MAX_7BIT_LINE) {
        return Body::dangerous_pre_encoded(
            crlf_breaks(text.as_bytes()),
            ContentTransferEncoding::SevenBit,
        );
    }
    let escaped = text
        .bytes()
        .filter(|&b| !matches!(b, b'\t' | b' '..=b'~'))
        .count();
    if escaped <= text.len() / 3 {
        return Body::dangerous_pre_encoded(
            quoted_printable(text),
            ContentTransferEncoding::QuotedPrintable,
        );
    }
    // Bytes, not a string: lettre leaves their line breaks alone.
    Body::new(crlf_breaks(text.as_bytes()))
}

/// `text` as quoted-printable: lines break where `text`'s do (as CRLF),
/// and longer ones softly at 76 characters.
fn quoted_printable(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + text.len() / 16 + 8);
    for (i, line) in lines(text.as_bytes()).enumerate() {
        if i > 0 {
            out.extend_from_slice(b"\r\n");
        }
        encode_line(line, &mut out);
    }
    out
}

fn encode_line(line: &[u8], out: &mut Vec<u8>) {
    let mut width = 0;
    let last = line.len().saturating_sub(1);
    for (i, &byte) in line.iter().enumerate() {
        // Whitespace at a line's end would be taken for padding and
        // dropped (rule 3), so there it is escaped.
        let literal = matches!(byte, b'!'..=b'<' | b'>'..=b'~')
            || (matches!(byte, b' ' | b'\t') && i != last);
        let len = if literal { 1 } else { 3 };
        // Room is left for a soft break's `=` unless this is the end.
        let room = if i == last {
            MAX_QP_LINE
        } else {
            MAX_QP_LINE - 1
        };
        if width + len > room {
            out.extend_from_slice(b"=\r\n");
            width = 0;
        }
        if literal {
            out.push(byte);
        } else {
            out.extend_from_slice(&[
                b'=',
                HEX[usize::from(byte >> 4)],
                HEX[usize::from(byte & 15)],
            ]);
        }
        width += len;
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn encoding_of(text: &str) -> (String, String) {
        let formatted = String::from_utf8(part(text, ContentType::TEXT_PLAIN).formatted())
            .expect("a formatted part is ASCII");
        let (head, content) = formatted
            .split_once("\r\n\r\n")
            .expect("headers, then body");
        let encoding = head
            .lines()
            .find_map(|line| line.strip_prefix("Content-Transfer-Encoding: "))
            .expect("an encoding")
            .to_owned();
        // lettre ends a part with a line break of its own.
        let content = content.strip_suffix("\r\n").expect("the part's end");
        (encoding, content.to_owned())
    }

    proptest! {
        /// Decoded, the encoding is the text with CRLF breaks; no line is
        /// over 76 characters or ends in whitespace.
        #[test]
        fn quoted_printable_decodes_to_the_text(
            text in "([a =\t.\r\né€😀\u{1}]{0,12}[a-z]{0,90}){0,6}"
        ) {
            let encoded = quoted_printable(&text);
            let decoded = ::quoted_printable::decode(&encoded, ::quoted_printable::ParseMode::Strict)
                .expect("strict quoted-printable");
            prop_assert_eq!(decoded, crlf_breaks(text.as_bytes()));
            let encoded = String::from_utf8(encoded).expect("ASCII");
            for line in encoded.split("\r\n") {
                prop_assert!(line.len() <= MAX_QP_LINE, "{:?}", line);
                prop_assert!(!line.ends_with([' ', '\t']), "{:?}", line);
                prop_assert!(!line.contains(['\r', '\n']));
            }
        }
    }

    #[test]
    fn each_text_gets_the_encoding_lettre_would_choose() {
        let (encoding, content) = encoding_of("Hello,\nsee you.\n");
        assert_eq!(encoding, "7bit");
        assert_eq!(content, "Hello,\r\nsee you.\r\n");

        let long = "word ".repeat(40);
        let (encoding, content) = encoding_of(&long);
        assert_eq!(encoding, "quoted-printable");
        assert!(content.contains("=\r\n"), "broken softly: {content}");
        assert!(
            content.ends_with("=20"),
            "the last space escaped: {content}"
        );

        assert_eq!(
            encoding_of("Grüße aus Köln, bis morgen!").0,
            "quoted-printable"
        );
        let (encoding, content) = encoding_of("日本語のメール\n本文");
        assert_eq!(encoding, "base64");
        let lettre =
            String::from_utf8(SinglePart::plain("日本語のメール\r\n本文".to_owned()).formatted())
                .expect("ASCII");
        assert!(
            lettre.ends_with(&format!("{content}\r\n")),
            "lettre encodes the CRLF text alike"
        );
    }

    /// A body of nothing but line breaks, which lettre takes quadratic
    /// time over, is encoded like any other.
    #[test]
    fn a_body_of_bare_line_feeds_is_made_crlf() {
        let text = "\n".repeat(200_000);
        let (encoding, content) = encoding_of(&text);
        assert_eq!(encoding, "7bit");
        assert_eq!(content, "\r\n".repeat(200_000));
    }
}
