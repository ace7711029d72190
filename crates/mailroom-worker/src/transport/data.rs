//! The DATA section of an SMTP transaction (RFC 5321 §4.5.2): every line
//! that starts with `.` gets one more, and `CRLF.CRLF` ends it.

/// `raw` as DATA carries it, end included, so the body and its end go out
/// in one write: on its own, the five-byte end costs a segment and a
/// system call on each side for every message. `None` when `raw` is not
/// UTF-8, which lettre's encoded messages always are (the caller then
/// lets lettre write it).
///
/// A dot is added after every LF, not only after CRLF: lettre ends every
/// line with CRLF, and a bare LF followed by `.` must not read as the end
/// of DATA to a lenient relay (SMTP smuggling).
pub fn data_section(raw: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(raw).ok()?;
    let mut out = String::with_capacity(text.len() + 8);
    let mut line_start = true;
    for piece in text.split_inclusive('\n') {
        if line_start && piece.starts_with('.') {
            out.push('.');
        }
        out.push_str(piece);
        line_start = piece.ends_with('\n');
    }
    out.push_str("\r\n.\r\n");
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::data_section;

    #[test]
    fn leading_dots_are_doubled_and_the_end_added() {
        let data = data_section(b".first\r\nmiddle.\r\n.\r\n..two\r\nlast").expect("utf-8");
        assert_eq!(data, "..first\r\nmiddle.\r\n..\r\n...two\r\nlast\r\n.\r\n");
    }

    #[test]
    fn a_bare_lf_cannot_end_the_data_early() {
        let data = data_section(b"a\n.\r\nb").expect("utf-8");
        assert_eq!(data, "a\n..\r\nb\r\n.\r\n");
    }

    #[test]
    fn non_utf8_is_left_to_lettre() {
        assert_eq!(data_section(b"\xff\r\n"), None);
    }
}
