//! The DATA section of an SMTP transaction (RFC 5321 §4.5.2): every line
//! that starts with `.` gets one more, and `CRLF.CRLF` ends it.

/// `raw` as DATA carries it, end included, so the body and its end go out
/// in one write: on its own, the five-byte end costs a segment and a
/// system call on each side for every message. Bytes that are not UTF-8
/// go as they are.
///
/// Every bare CR and bare LF becomes CRLF as the dots are doubled: lettre
/// ends its own lines with CRLF but passes a lone CR in a 7bit body
/// through, and a relay that reads `<CR>.<CR><LF>` or `<LF>.<CR><LF>` as
/// the end of DATA would take what follows as commands (SMTP smuggling).
pub fn data_section(raw: &[u8]) -> Vec<u8> {
    let mut out = rebroken(raw, true);
    out.extend_from_slice(b"\r\n.\r\n");
    out
}

/// `raw` with every line break a CRLF and its dots as they are.
pub fn crlf_breaks(raw: &[u8]) -> Vec<u8> {
    rebroken(raw, false)
}

/// The [`lines`] of `raw` joined by CRLF, a dot added before each that
/// starts with one if `double_dots`.
fn rebroken(raw: &[u8], double_dots: bool) -> Vec<u8> {
    rejoined(raw, raw.len() + raw.len() / 32 + 8, |line, out| {
        if double_dots && line.first() == Some(&b'.') {
            out.push(b'.');
        }
        out.extend_from_slice(line);
    })
}

/// The [`lines`] of `raw`, each written into the output by `write`, joined
/// by CRLF; `capacity` is the output's expected size.
pub fn rejoined(
    raw: &[u8],
    capacity: usize,
    mut write: impl FnMut(&[u8], &mut Vec<u8>),
) -> Vec<u8> {
    let mut out = Vec::with_capacity(capacity);
    for (i, line) in lines(raw).enumerate() {
        if i > 0 {
            out.extend_from_slice(b"\r\n");
        }
        write(line, &mut out);
    }
    out
}

/// The lines of `raw` without their breaks, where a break is CRLF, a bare
/// CR or a bare LF; what follows the last break is one more line (empty
/// if `raw` ends with a break).
pub fn lines(raw: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(raw);
    std::iter::from_fn(move || {
        let text = rest?;
        let Some(at) = memchr::memchr2(b'\r', b'\n', text) else {
            rest = None;
            return Some(text);
        };
        let crlf = text[at] == b'\r' && text.get(at + 1) == Some(&b'\n');
        rest = Some(&text[at + if crlf { 2 } else { 1 }..]);
        Some(&text[..at])
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::{crlf_breaks, data_section};

    /// `text` with every line break (CRLF, bare CR, bare LF) a CRLF.
    fn crlf_lines(text: &str) -> String {
        text.replace("\r\n", "\n")
            .replace('\r', "\n")
            .replace('\n', "\r\n")
    }

    proptest! {
        /// Whatever the body, only the end ends the DATA, and a relay that
        /// undoes the dots reads the body back with CRLF line breaks.
        #[test]
        fn only_the_end_ends_the_data(text in "[a.\r\n]{0,40}") {
            let data = String::from_utf8(data_section(text.as_bytes())).expect("utf-8");
            let body = data.strip_suffix("\r\n.\r\n").expect("the end");
            let framed = format!("\r\n{body}\r\n");
            prop_assert!(!framed.contains("\r\n.\r\n"));
            prop_assert!(!body.replace("\r\n", "").contains(['\r', '\n']));
            let undone: Vec<&str> = body
                .split("\r\n")
                .map(|line| line.strip_prefix('.').unwrap_or(line))
                .collect();
            prop_assert_eq!(undone.join("\r\n"), crlf_lines(&text));
        }

        /// What lettre gets when the message is not UTF-8: the same
        /// breaks, no dots added (lettre adds them).
        #[test]
        fn crlf_breaks_leaves_no_bare_cr_or_lf(text in "[a.\r\n]{0,40}") {
            let broken = crlf_breaks(text.as_bytes());
            prop_assert_eq!(broken, crlf_lines(&text).into_bytes());
        }
    }

    #[test]
    fn leading_dots_are_doubled_and_the_end_added() {
        let data = data_section(b".first\r\nmiddle.\r\n.\r\n..two\r\nlast");
        assert_eq!(data, b"..first\r\nmiddle.\r\n..\r\n...two\r\nlast\r\n.\r\n");
    }

    #[test]
    fn bare_line_ends_become_crlf_so_nothing_can_end_the_data_early() {
        let data = data_section(b"a\n.\r\nb");
        assert_eq!(data, b"a\r\n..\r\nb\r\n.\r\n");
        let data = data_section(b"a\r.\r\nMAIL FROM:<x@y>\r\n");
        assert_eq!(data, b"a\r\n..\r\nMAIL FROM:<x@y>\r\n\r\n.\r\n");
        let data = data_section(b"\n.\r\r\n");
        assert_eq!(data, b"\r\n..\r\n\r\n\r\n.\r\n");
    }

    #[test]
    fn bytes_that_are_not_utf8_go_as_they_are() {
        assert_eq!(data_section(b"\xff\n.\xfe"), b"\xff\r\n..\xfe\r\n.\r\n");
    }
}
