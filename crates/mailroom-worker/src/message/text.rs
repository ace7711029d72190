//! The readable parts (text and HTML), encoded here rather than by lettre.
//!
//! lettre makes a body's line breaks CRLF by inserting each missing CR
//! into the string, which moves the rest of it every time: 200,000 bare
//! LFs took 0.8 s, and a 10 MiB body of them would hold a worker thread
//! for half an hour. Its quoted-printable encoder took 4.6 µs for a 2 KiB
//! line, this one 1.6 µs, copying runs of plain bytes whole. Both are
//! linear here, and the encoding is chosen as lettre chooses it: 7bit
//! when it can be, quoted-printable while at most a third of the bytes
//! need escaping, base64 past that.

use lettre::message::header::{ContentTransferEncoding, ContentType};
use lettre::message::{Body, SinglePart};

use crate::transport::{crlf_breaks, lines, rejoined};

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
    if unprintable(text.as_bytes()) <= text.len() / 3 {
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
    rejoined(
        text.as_bytes(),
        text.len() + text.len() / 16 + 8,
        encode_line,
    )
}

fn encode_line(line: &[u8], out: &mut Vec<u8>) {
    // The last byte is apart: whitespace there is escaped (rule 3: it
    // would be taken for padding), and it needs no room for a soft break.
    let Some((&end, mut rest)) = line.split_last() else {
        return;
    };
    let mut width = 0;
    while let Some(&first) = rest.first() {
        // One column is kept for a soft break's `=`.
        let room = MAX_QP_LINE - 1 - width;
        let fits = rest.len().min(room);
        let run = literal_run(&rest[..fits]);
        if run > 0 {
            out.extend_from_slice(&rest[..run]);
            width += run;
            rest = &rest[run..];
        } else if room < 3 {
            out.extend_from_slice(b"=\r\n");
            width = 0;
        } else {
            escape(first, out);
            width += 3;
            rest = &rest[1..];
        }
    }
    let literal = matches!(end, b'!'..=b'<' | b'>'..=b'~');
    if width + if literal { 1 } else { 3 } > MAX_QP_LINE {
        out.extend_from_slice(b"=\r\n");
    }
    if literal {
        out.push(end);
    } else {
        escape(end, out);
    }
}

/// How many bytes at the start of `bytes` stand for themselves. Checked
/// 16 at a time without an early exit, which the compiler vectorizes: a
/// byte-wise search was a fifth of building the bench's 2 KiB message.
fn literal_run(bytes: &[u8]) -> usize {
    let mut run = 0;
    for chunk in bytes.chunks_exact(16) {
        if !chunk.iter().fold(true, |all, &b| all & is_literal(b)) {
            break;
        }
        run += 16;
    }
    let tail = &bytes[run..];
    run + tail
        .iter()
        .position(|&b| !is_literal(b))
        .unwrap_or(tail.len())
}

/// Whether `byte` stands for itself inside a quoted-printable line.
fn is_literal(byte: u8) -> bool {
    matches!(byte, b' '..=b'<' | b'>'..=b'~' | b'\t')
}

fn escape(byte: u8, out: &mut Vec<u8>) {
    out.extend_from_slice(&escaped(byte));
}

/// `byte` as `=XX`: quoted-printable's escape, and Q encoding's in
/// headers.
pub(super) fn escaped(byte: u8) -> [u8; 3] {
    [
        b'=',
        HEX[usize::from(byte >> 4)],
        HEX[usize::from(byte & 15)],
    ]
}

/// Bytes other than tab and printable ASCII, which lettre counts to choose
/// between quoted-printable and base64. Counted in chunks whose sum fits a
/// byte, which the compiler vectorizes (ten times faster than one sum).
fn unprintable(bytes: &[u8]) -> usize {
    bytes
        .chunks(usize::from(u8::MAX))
        .map(|chunk| {
            let count = chunk.iter().fold(0u8, |count, &b| {
                count + u8::from(!(b == b'\t' || (b' '..=b'~').contains(&b)))
            });
            usize::from(count)
        })
        .sum()
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
            // Long plain runs, and escapes dense enough to meet every column.
            text in "([a =\t.\r\né€😀\u{1}]{0,12}[a-z]{0,90}){0,6}|[a =é\t\n]{0,300}"
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

        #[test]
        fn unprintable_counts_as_one_sum_would(bytes in proptest::collection::vec(any::<u8>(), 0..1000)) {
            let expected = bytes.iter().filter(|&&b| !matches!(b, b'\t' | b' '..=b'~')).count();
            prop_assert_eq!(unprintable(&bytes), expected);
        }

        #[test]
        fn a_literal_run_ends_at_the_first_byte_to_escape(
            // Mostly literal, so runs cross the 16-byte chunks.
            bytes in proptest::collection::vec(prop_oneof![20 => 32u8..127, 1 => any::<u8>()], 0..200)
        ) {
            let expected = bytes.iter().position(|&b| !is_literal(b)).unwrap_or(bytes.len());
            prop_assert_eq!(literal_run(&bytes), expected);
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
