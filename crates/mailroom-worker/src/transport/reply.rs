//! SMTP replies as mailroom reads them (RFC 5321 §4.2):
//! `Reply-code [ SP textstring ] CRLF`, with `Reply-code "-" [ textstring ]
//! CRLF` for each line but the last of a multi-line reply.
//!
//! lettre's parser wants text after every code and refuses a line over
//! 1,000 bytes; either made a relay's `250` after the end of DATA read as a
//! lost connection, so an accepted message was sent again. For the same
//! reason a line ending in a bare LF is taken as ended: a relay that ends
//! its replies so had each accepted message sent `max_attempts` times.

use std::fmt;

/// Most bytes one reply may take, all its lines together. RFC 5321 caps a
/// line at 512 octets, but relays exceed it (long queue ids, EHLO lines of
/// 900 characters), and a reply that carries a code must not read as a
/// lost connection. The bound only keeps a relay that never ends its reply
/// from filling memory.
pub const MAX_REPLY: usize = 64 * 1024;

/// Characters kept of each line's text: enough for an error message or an
/// EHLO keyword, and the rest would only swell logs and job records.
const KEPT_LINE_CHARS: usize = 512;

/// Lines kept of a reply (an EHLO lists one extension a line).
const KEPT_LINES: usize = 128;

/// One reply: its code and the text of its lines, each cut to
/// [`KEPT_LINE_CHARS`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    code: u16,
    lines: Vec<String>,
}

/// Bytes that do not read as a reply.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// No reply ended within [`MAX_REPLY`] bytes. `code` is the one its
    /// complete lines gave, if any did: every line of a reply carries the
    /// reply's code (RFC 5321 §4.2.1), so it is known before the end.
    #[error("a reply over {MAX_REPLY} bytes")]
    TooLong {
        /// The code of the lines read in full.
        code: Option<u16>,
    },
    /// A line that does not start with a reply code and ` `, `-` or its
    /// end.
    #[error("not a reply line: {0:?}")]
    Malformed(String),
    /// A multi-line reply whose lines give different codes.
    #[error("a multi-line reply changes its code from {first} to {then}")]
    MixedCodes {
        /// The first line's code.
        first: u16,
        /// The code that differs.
        then: u16,
    },
}

impl Reply {
    /// The reply code.
    pub fn code(&self) -> u16 {
        self.code
    }

    /// Whether the code is in class `class` (2 for 2xx, ...).
    pub fn is(&self, class: u16) -> bool {
        self.code / 100 == class
    }

    /// The text of each line, possibly empty.
    pub fn lines(&self) -> impl Iterator<Item = &str> {
        self.lines.iter().map(String::as_str)
    }

    /// A reply known only by its code: the first 64 KiB of one that went on
    /// longer.
    pub fn cut(code: u16) -> Self {
        Self {
            code,
            lines: vec![format!("(a reply over {MAX_REPLY} bytes, cut)")],
        }
    }

    /// The lines' text, joined by spaces.
    pub fn text(&self) -> String {
        self.lines.join(" ").trim().to_owned()
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.text();
        if text.is_empty() {
            write!(f, "{}", self.code)
        } else {
            write!(f, "{} {text}", self.code)
        }
    }
}

/// The reply `input` starts with and the bytes it took; `None` while its
/// last line has not all come.
pub fn parse(input: &[u8]) -> Result<Option<(Reply, usize)>, ReplyError> {
    let mut code = None;
    let mut lines = Vec::new();
    let mut at = 0;
    loop {
        let Some(end) = memchr::memchr(b'\n', &input[at..]).map(|end| at + end) else {
            return if input.len() > MAX_REPLY {
                Err(ReplyError::TooLong { code })
            } else {
                Ok(None)
            };
        };
        if end + 1 > MAX_REPLY {
            return Err(ReplyError::TooLong { code });
        }
        let line = &input[at..end];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let (line_code, last, text) = parse_line(line)?;
        match code {
            None => code = Some(line_code),
            Some(first) if first != line_code => {
                return Err(ReplyError::MixedCodes {
                    first,
                    then: line_code,
                });
            }
            Some(_) => {}
        }
        if lines.len() < KEPT_LINES {
            lines.push(kept(text));
        }
        at = end + 1;
        if last {
            let code = line_code;
            return Ok(Some((Reply { code, lines }, at)));
        }
    }
}

/// A line's code, whether it is the reply's last, and its text.
fn parse_line(line: &[u8]) -> Result<(u16, bool, &[u8]), ReplyError> {
    let malformed = || ReplyError::Malformed(kept(&line[..line.len().min(40)]));
    let (digits, rest) = line.split_at_checked(3).ok_or_else(malformed)?;
    let code = reply_code(digits).ok_or_else(malformed)?;
    match rest.split_first() {
        None => Ok((code, true, rest)),
        Some((b' ', text)) => Ok((code, true, text)),
        Some((b'-', text)) => Ok((code, false, text)),
        Some(_) => Err(malformed()),
    }
}

/// The code three digits give: RFC 5321 §4.2 has 2 to 5 first, 0 to 5
/// second; anything else is not a reply.
fn reply_code(digits: &[u8]) -> Option<u16> {
    let [
        first @ b'2'..=b'5',
        second @ b'0'..=b'5',
        third @ b'0'..=b'9',
    ] = *digits
    else {
        return None;
    };
    Some(
        [first, second, third]
            .iter()
            .fold(0, |code, digit| code * 10 + u16::from(digit - b'0')),
    )
}

/// `text` as a string, cut to [`KEPT_LINE_CHARS`].
fn kept(text: &[u8]) -> String {
    String::from_utf8_lossy(text)
        .chars()
        .take(KEPT_LINE_CHARS)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(input: &str) -> Reply {
        let (reply, used) = parse(input.as_bytes()).expect("parses").expect("complete");
        assert_eq!(used, input.len());
        reply
    }

    #[test]
    fn a_bare_code_is_a_reply() {
        let reply = whole("250\r\n");
        assert_eq!(reply.code(), 250);
        assert_eq!(reply.text(), "");
        assert_eq!(reply.to_string(), "250");
        let reply = whole("250-\r\n250-SIZE 10\r\n250\r\n");
        assert_eq!(reply.lines().collect::<Vec<_>>(), ["", "SIZE 10", ""]);
        assert_eq!(whole("354 \r\n").code(), 354);
    }

    #[test]
    fn a_reply_ends_at_its_last_line() {
        let input = b"250-a\r\n250 b\r\n250 next\r\n";
        let (reply, used) = parse(input).expect("parses").expect("complete");
        assert_eq!(reply.to_string(), "250 a b");
        assert_eq!(&input[used..], b"250 next\r\n");
        assert_eq!(parse(b"250-a\r\n250 b"), Ok(None));
        assert_eq!(parse(b""), Ok(None));
    }

    #[test]
    fn a_bare_line_feed_ends_a_line() {
        let input = b"250-2.0.0 a\n250 2.0.0 queued\n250 next\r\n";
        let (reply, used) = parse(input).expect("parses").expect("complete");
        assert_eq!(reply.to_string(), "250 2.0.0 a 2.0.0 queued");
        assert_eq!(&input[used..], b"250 next\r\n");
        assert_eq!(whole("354 go on\n").code(), 354);
        assert_eq!(parse(b"250 ok\r"), Ok(None), "its end may be on the way");
    }

    #[test]
    fn long_lines_keep_their_code_and_a_cut_text() {
        let long = "A".repeat(5000);
        let reply = whole(&format!("250-{long}\r\n250 2.0.0 {long}\r\n"));
        assert_eq!(reply.code(), 250);
        assert!(
            reply
                .lines()
                .all(|line| line.chars().count() <= KEPT_LINE_CHARS)
        );
        let boundless = format!("250-{long}\r\n").repeat(20);
        assert_eq!(
            parse(boundless.as_bytes()),
            Err(ReplyError::TooLong { code: Some(250) })
        );
        let unended = "2".repeat(MAX_REPLY + 1);
        assert_eq!(
            parse(unended.as_bytes()),
            Err(ReplyError::TooLong { code: None })
        );
    }

    #[test]
    fn what_is_not_a_reply_is_refused() {
        for input in [
            "HELLO WORLD\r\n",
            "999 what\r\n",
            "25\r\n",
            "250x\r\n",
            "190 x\r\n",
        ] {
            assert!(
                matches!(parse(input.as_bytes()), Err(ReplyError::Malformed(_))),
                "{input:?}"
            );
        }
        assert_eq!(
            parse(b"250-2.1.5 Ok\r\n251 2.1.5 mixed\r\n"),
            Err(ReplyError::MixedCodes {
                first: 250,
                then: 251
            })
        );
    }
}
