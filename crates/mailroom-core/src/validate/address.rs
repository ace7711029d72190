//! Mailbox parsing: one RFC 5322 mailbox, the whole input, nothing else.
//!
//! lettre's parser does the grammar (display names, IDN domains) and insists
//! on the end of input, so `a@b.example, c@d.example` is refused. Two gaps are
//! closed here: it lets control characters through (in a quoted display name,
//! and as trailing whitespace such as `\n`), and it unquotes a quoted local
//! part before checking it, so `"john doe"@example.com` fails. Control
//! characters are refused up front; a quoted local part is parsed with a
//! placeholder in its place and checked on its own, quotes kept.

use lettre::Address;
use lettre::message::Mailbox;

/// Why a string is not a mailbox. The messages never repeat the input: an
/// address is personal data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MailboxError {
    /// Nothing but whitespace.
    #[error("must not be empty")]
    Empty,
    /// CR, LF, NUL or another control character: header injection.
    #[error("must not contain control characters")]
    ControlCharacter,
    /// Not one RFC 5322 mailbox.
    #[error("not a valid mailbox")]
    Invalid,
}

/// Parses one RFC 5322 mailbox (`ada@example.org`, `Ada <ada@example.org>`,
/// `"Lovelace, Ada" <ada@example.org>`, `user@bücher.example`,
/// `"john doe"@example.com`). Refuses lists, trailing input and control
/// characters.
pub fn parse_mailbox(s: &str) -> Result<Mailbox, MailboxError> {
    if s.trim().is_empty() {
        return Err(MailboxError::Empty);
    }
    if s.chars().any(char::is_control) {
        return Err(MailboxError::ControlCharacter);
    }
    match quoted_local_part(s) {
        None => s.parse().map_err(|_| MailboxError::Invalid),
        Some((start, end)) => {
            let placeholder = format!("{}q{}", &s[..start], &s[end..]);
            let mailbox: Mailbox = placeholder.parse().map_err(|_| MailboxError::Invalid)?;
            if mailbox.email.user() != "q" {
                // The quoted string was only part of an obsolete local part.
                return Err(MailboxError::Invalid);
            }
            let address: Address = format!("{}@{}", &s[start..end], mailbox.email.domain())
                .parse()
                .map_err(|_| MailboxError::Invalid)?;
            Ok(Mailbox::new(mailbox.name, address))
        }
    }
}

/// The byte span (quotes included) of the quoted string directly followed by
/// `@`, if there is exactly one. Several, or an unterminated quote, give
/// `None` and leave the verdict to lettre, which refuses them.
fn quoted_local_part(s: &str) -> Option<(usize, usize)> {
    let mut found = None;
    let mut chars = s.char_indices().peekable();
    while let Some((start, c)) = chars.next() {
        if c != '"' {
            continue;
        }
        let end = loop {
            match chars.next()? {
                (_, '\\') => {
                    chars.next()?;
                }
                (at, '"') => break at + 1,
                _ => {}
            }
        };
        if chars.peek().is_some_and(|&(_, next)| next == '@') {
            if found.is_some() {
                return None;
            }
            found = Some((start, end));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepts(input: &str) -> Mailbox {
        parse_mailbox(input).unwrap_or_else(|e| panic!("{input:?} refused: {e}"))
    }

    fn refuses(input: &str) -> MailboxError {
        match parse_mailbox(input) {
            Ok(mailbox) => panic!("{input:?} accepted as {mailbox}"),
            Err(e) => e,
        }
    }

    #[test]
    fn plain_address() {
        let mailbox = accepts("ada@example.org");
        assert_eq!(mailbox.name, None);
        assert_eq!(mailbox.email.to_string(), "ada@example.org");
    }

    #[test]
    fn display_names() {
        assert_eq!(
            accepts("Ada <ada@example.org>").name.as_deref(),
            Some("Ada")
        );
        let quoted = accepts(r#""Lovelace, Ada" <ada@example.org>"#);
        assert_eq!(quoted.name.as_deref(), Some("Lovelace, Ada"));
        assert_eq!(quoted.email.to_string(), "ada@example.org");
    }

    #[test]
    fn idn_domain() {
        assert_eq!(
            accepts("user@bücher.example").email.domain(),
            "bücher.example"
        );
    }

    #[test]
    fn quoted_local_part_keeps_its_quotes() {
        let bare = accepts(r#""john doe"@example.com"#);
        assert_eq!(bare.email.to_string(), r#""john doe"@example.com"#);
        let named = accepts(r#""Doe, John" <"john doe"@example.com>"#);
        assert_eq!(named.name.as_deref(), Some("Doe, John"));
        assert_eq!(named.email.user(), r#""john doe""#);
        assert_eq!(named.email.domain(), "example.com");
    }

    #[test]
    fn quoted_local_part_still_needs_a_valid_domain_and_no_trailing_input() {
        for input in [
            r#""john doe"@"#,
            r#""john doe"@exa mple.com"#,
            r#""john doe"@example.com junk"#,
            r#""a"@example.com, "b"@example.com"#,
            r#""unterminated@example.com"#,
            r#""a"."b"@example.com"#,
        ] {
            assert_eq!(refuses(input), MailboxError::Invalid, "{input:?}");
        }
    }

    #[test]
    fn trailing_input_is_refused() {
        for input in [
            "a@b.example junk",
            "Ada <ada@example.org> junk",
            "<ada@example.org>>",
        ] {
            assert_eq!(refuses(input), MailboxError::Invalid, "{input:?}");
        }
    }

    #[test]
    fn lists_are_refused() {
        for input in [
            "a@b.example, c@d.example",
            "a@b.example,c@d.example",
            "Ada <ada@example.org>, c@d.example",
            "a@b.example; c@d.example",
        ] {
            assert_eq!(refuses(input), MailboxError::Invalid, "{input:?}");
        }
    }

    #[test]
    fn control_characters_are_refused() {
        for input in [
            "a@b.example\r\nBcc: victim@c.example",
            "a@b.example\n",
            "a@b.example\r",
            "a\0@b.example",
            "\"Ada\u{1}\" <ada@example.org>",
            "Ada\r\n <ada@example.org>",
            "\"john\ndoe\"@example.com",
        ] {
            assert_eq!(refuses(input), MailboxError::ControlCharacter, "{input:?}");
        }
    }

    #[test]
    fn empty_and_malformed_are_refused() {
        assert_eq!(refuses(""), MailboxError::Empty);
        assert_eq!(refuses("   "), MailboxError::Empty);
        for input in [
            "ada",
            "@example.org",
            "ada@",
            "ada@@example.org",
            "Ada <ada>",
        ] {
            assert_eq!(refuses(input), MailboxError::Invalid, "{input:?}");
        }
    }

    #[test]
    fn errors_do_not_echo_the_input() {
        let shown = refuses("secret-person@example.org junk").to_string();
        assert!(!shown.contains("secret"), "{shown}");
    }
}
