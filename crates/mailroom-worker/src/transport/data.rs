//! The DATA section of an SMTP transaction (RFC 5321 §4.5.2): every line
//! that starts with `.` gets one more, and `CRLF.CRLF` ends it.

use std::borrow::Cow;

/// `raw` as DATA carries it, end included, so the body and its end go out
/// in one write: on its own, the five-byte end costs a segment and a
/// system call on each side for every message. `None` when `raw` is not
/// UTF-8, which lettre's encoded messages always are (the caller then
/// lets lettre write it).
///
/// Every bare CR and bare LF becomes CRLF before the dots are doubled:
/// lettre ends its own lines with CRLF but passes a lone CR in a 7bit body
/// through, and a relay that reads `<CR>.<CR><LF>` or `<LF>.<CR><LF>` as
/// the end of DATA would take what follows as commands (SMTP smuggling).
pub fn data_section(raw: &[u8]) -> Option<String> {
    let text = crlf_only(std::str::from_utf8(raw).ok()?);
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

/// `text` with every line break a CRLF; borrowed when it already is.
fn crlf_only(text: &str) -> Cow<'_, str> {
    let bytes = text.as_bytes();
    let bare_cr = text
        .match_indices('\r')
        .any(|(i, _)| bytes.get(i + 1) != Some(&b'\n'));
    let bare_lf = text
        .match_indices('\n')
        .any(|(i, _)| i == 0 || bytes[i - 1] != b'\r');
    if !bare_cr && !bare_lf {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    let mut after_cr = false;
    for c in text.chars() {
        match c {
            '\n' if after_cr => {}
            '\r' | '\n' => out.push_str("\r\n"),
            c => out.push(c),
        }
        after_cr = c == '\r';
    }
    Cow::Owned(out)
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
    fn bare_line_ends_become_crlf_so_nothing_can_end_the_data_early() {
        let data = data_section(b"a\n.\r\nb").expect("utf-8");
        assert_eq!(data, "a\r\n..\r\nb\r\n.\r\n");
        let data = data_section(b"a\r.\r\nMAIL FROM:<x@y>\r\n").expect("utf-8");
        assert_eq!(data, "a\r\n..\r\nMAIL FROM:<x@y>\r\n\r\n.\r\n");
        let data = data_section(b"\n.\r\r\n").expect("utf-8");
        assert_eq!(data, "\r\n..\r\n\r\n\r\n.\r\n");
    }

    #[test]
    fn non_utf8_is_left_to_lettre() {
        assert_eq!(data_section(b"\xff\r\n"), None);
    }
}
