//! Mailbox parsing: one RFC 5322 mailbox, the whole input, nothing else,
//! and no character that turns text around on screen.
//!
//! lettre's parser does the grammar (display names, IDN domains) and insists
//! on the end of input, so `a@b.example, c@d.example` is refused. Two gaps are
//! closed here: it lets control characters through (in a quoted display name,
//! and as trailing whitespace such as `\n`), and it unquotes a quoted local
//! part before checking it, so `"john doe"@example.com` fails. Control
//! characters are refused up front; a quoted local part is parsed with a
//! placeholder in its place and checked on its own, quotes kept.
//!
//! An internationalized domain comes back in its ASCII form (IDNA A-label,
//! `bücher.example` → `xn--bcher-kva.example`): every relay takes that,
//! where the raw UTF-8 form needs SMTPUTF8. Only a non-ASCII local part,
//! which has no ASCII form, still needs it.

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
    /// A character that overrides the direction of the text after it
    /// (U+202A to U+202E, U+2066 to U+2069): a display name could show
    /// as another sender's.
    #[error("must not contain direction-override characters (U+202A to U+202E, U+2066 to U+2069)")]
    DirectionOverride,
    /// Not one RFC 5322 mailbox.
    #[error("not a valid mailbox")]
    Invalid,
}

/// Parses one RFC 5322 mailbox (`ada@example.org`, `Ada <ada@example.org>`,
/// `"Lovelace, Ada" <ada@example.org>`, `user@bücher.example`,
/// `"john doe"@example.com`). Refuses lists, trailing input, control
/// characters and a domain that has no IDNA form.
pub fn parse_mailbox(s: &str) -> Result<Mailbox, MailboxError> {
    let mailbox = parse_any_domain(s)?;
    if mailbox.email.domain().is_ascii() {
        return Ok(mailbox);
    }
    let ascii = idna::domain_to_ascii(mailbox.email.domain()).map_err(|_| MailboxError::Invalid)?;
    let address = Address::new(mailbox.email.user(), ascii).map_err(|_| MailboxError::Invalid)?;
    Ok(Mailbox::new(mailbox.name, address))
}

fn parse_any_domain(s: &str) -> Result<Mailbox, MailboxError> {
    if s.trim().is_empty() {
        return Err(MailboxError::Empty);
    }
    if s.chars().any(char::is_control) {
        return Err(MailboxError::ControlCharacter);
    }
    if s.chars().any(super::is_direction_override) {
        return Err(MailboxError::DirectionOverride);
    }
    if let Some(mailbox) = plain_mailbox(s) {
        return Ok(mailbox);
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

/// The two shapes nearly every address has, `user@example.org` and
/// `Name Surname <user@example.org>`, with atoms only (no quotes,
/// comments or encoded words): parsed directly, as lettre's grammar would,
/// for a fraction of its cost. Anything else gives `None` and goes to the
/// full grammar; so does a plain shape lettre's address check refuses.
fn plain_mailbox(s: &str) -> Option<Mailbox> {
    let (name, address) = match s.strip_suffix('>') {
        Some(rest) => {
            let (name, address) = rest.split_once(" <")?;
            (Some(name), address)
        }
        None => (None, s),
    };
    let (user, domain) = address.split_once('@')?;
    let words = |text: &str, separator: char| {
        !text.is_empty()
            && text
                .split(separator)
                .all(|word| !word.is_empty() && word.bytes().all(is_atext))
    };
    let plain = name.is_none_or(|name| words(name, ' '))
        && words(user, '.')
        && domain
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if !plain {
        return None;
    }
    // Checked as `Address::new(user, domain)` checks it (the text holds one
    // `@`), without its `format!`.
    let address: Address = address.parse().ok()?;
    Some(Mailbox::new(name.map(str::to_owned), address))
}

/// RFC 5322 `atext`.
fn is_atext(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b)
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
    fn idn_domain_comes_back_as_its_a_label() {
        assert_eq!(
            accepts("Zoë <user@bücher.example>").email.to_string(),
            "user@xn--bcher-kva.example"
        );
        assert_eq!(
            accepts("user@BÜCHER.example").email.domain(),
            "xn--bcher-kva.example"
        );
        // A non-ASCII local part has no ASCII form: kept as it is.
        assert_eq!(
            accepts("jösé@bücher.example").email.to_string(),
            "jösé@xn--bcher-kva.example"
        );
    }

    #[test]
    fn a_domain_without_an_idna_form_is_refused() {
        // U+2488 maps to "1.", leaving an empty label; a right-to-left
        // label may not start with a digit (the bidi rule).
        for input in ["user@\u{2488}ü.example", "user@1\u{05d0}.example"] {
            assert!(parse_any_domain(input).is_ok(), "lettre takes {input:?}");
            assert_eq!(
                parse_mailbox(input),
                Err(MailboxError::Invalid),
                "{input:?}"
            );
        }
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
    fn direction_overrides_are_refused() {
        for input in [
            "\u{202e}knaB <bank@example.org>",
            "\"Support \u{2067}x\" <s@example.org>",
            "Ada\u{202a} <ada@example.org>",
            "Ada \u{2069}Lovelace <ada@example.org>",
            "ada\u{202d}@example.org",
        ] {
            assert_eq!(refuses(input), MailboxError::DirectionOverride, "{input:?}");
        }
        // Right-to-left text itself is a name like any other.
        assert_eq!(
            accepts("\u{05d3}\u{05e0}\u{05d4} <d@example.org>")
                .name
                .as_deref(),
            Some("\u{05d3}\u{05e0}\u{05d4}")
        );
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
    fn the_plain_shapes_parse_as_the_full_grammar_does() {
        for input in [
            "ada@example.org",
            "Ada <ada@example.org>",
            "Ada King Lovelace <ada.king+tag@mail.example.org>",
            "o'brien@example.ie",
            "x-y_z!#$%&*/=?^`{|}~@a-b.example",
        ] {
            let fast = plain_mailbox(input).unwrap_or_else(|| panic!("{input:?}: not plain"));
            let full: Mailbox = input.parse().expect("lettre parses it");
            assert_eq!(fast, full, "{input:?}");
        }
    }

    #[test]
    fn other_shapes_go_to_the_full_grammar() {
        for input in [
            "\"Lovelace, Ada\" <ada@example.org>",
            "Ada  Lovelace <ada@example.org>",
            "Ada<ada@example.org>",
            "Jürgen <j@example.de>",
            "user@bücher.example",
            "a..b@example.org",
            ".a@example.org",
            "a@b.example, c@d.example",
            "a@[127.0.0.1]",
            "(comment) a@example.org",
        ] {
            assert!(plain_mailbox(input).is_none(), "{input:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn the_plain_path_never_disagrees_with_the_grammar(
            input in "([a-zA-Z'.\"-]{1,6}( {1,2}[a-zA-Z.,]{0,5})? ?<)?[a-z0-9.+'_\"-]{1,8}@[a-z0-9.-]{1,10}>?"
        ) {
            if let Some(fast) = plain_mailbox(&input) {
                let full: Result<Mailbox, _> = input.parse();
                proptest::prop_assert_eq!(Ok(fast), full.map_err(|_| ()));
            }
        }
    }

    #[test]
    fn errors_do_not_echo_the_input() {
        let shown = refuses("secret-person@example.org junk").to_string();
        assert!(!shown.contains("secret"), "{shown}");
    }
}
