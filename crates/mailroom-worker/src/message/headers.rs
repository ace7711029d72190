//! Header values encoded and folded here rather than by lettre.
//!
//! lettre writes an address list on one line, and an unstructured value
//! folds only at spaces: 30 addresses made a 1543-octet `To` line, and a
//! 998-character value with no space a 1007-octet one, which strict
//! servers refuse (RFC 5322 §2.1.1: at most 998). It also parses an address
//! header back to add to it, and its parser cannot read a quoted local part
//! (`"john doe"@example.org`): the address was dropped from `To`, and a
//! `From` holding one failed the build.
//!
//! A value is cut into tokens, each one the whitespace before it and its
//! text. Lines break before a token's whitespace (CRLF + WSP, RFC 5322
//! §2.2.3) once they pass [`FOLD_AT`] octets. A token too long for any line,
//! or not ASCII, is sent as RFC 2047 encoded-words, which can break between
//! any two characters. Addresses are never encoded, nor need to be: lettre
//! takes a local part of at most 64 octets and a domain of at most 254.

use lettre::message::Mailbox;
use lettre::message::header::{HeaderName, HeaderValue};

/// Lines are folded past this length where they can be: RFC 5322 §2.1.1
/// says 78 characters, and RFC 2047 §2 76 for a line holding an
/// encoded-word.
const FOLD_AT: usize = 76;

/// The hard limit on a line, CRLF excluded (RFC 5322 §2.1.1).
const MAX_LINE: usize = 998;

/// Room a token may need besides its own octets: the longest header name
/// lettre takes (76), `: ` before the first token, and a `,` after a
/// mailbox. A token longer than `MAX_LINE - HEAD_ROOM` is encoded.
const HEAD_ROOM: usize = 76 + 2 + 1;

/// An encoded-word's start (RFC 2047 §2; Q encoding, §4.2, keeps ASCII
/// readable).
const WORD_START: &str = "=?utf-8?q?";
const WORD_END: &str = "?=";

/// Longest encoded-word (RFC 2047 §2).
const MAX_WORD: usize = 75;

/// A piece of a value a line may break before: the whitespace that
/// separates it from the previous one (empty for the first), then its text.
#[derive(Debug)]
struct Token {
    space: String,
    text: String,
}

/// An address-list header (`From`, `To`, `Cc`, `Reply-To`) holding
/// `mailboxes`, folded after commas.
pub fn address_list(name: &'static str, mailboxes: &[Mailbox]) -> HeaderValue {
    let mut tokens: Vec<Token> = Vec::new();
    for mailbox in mailboxes {
        if let Some(last) = tokens.last_mut() {
            last.text.push(',');
        }
        let start = tokens.len();
        if let Some(display) = mailbox.name.as_deref().filter(|n| !n.trim().is_empty()) {
            let room = if start == 0 {
                FOLD_AT.saturating_sub(name.len() + 2)
            } else {
                MAX_WORD
            };
            tokens.extend(phrase(display, room));
        }
        tokens.push(Token {
            space: " ".to_owned(),
            text: if start == tokens.len() {
                mailbox.email.to_string()
            } else {
                format!("<{}>", mailbox.email)
            },
        });
    }
    if let Some(first) = tokens.first_mut() {
        first.space.clear();
    }
    let display = mailboxes
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    pre_encoded(HeaderName::new_from_ascii_str(name), display, &tokens)
}

/// An unstructured header (RFC 5322 §3.2.5) holding `value`, folded at its
/// whitespace.
pub fn unstructured(name: HeaderName, value: &str) -> HeaderValue {
    let mut tokens = Vec::new();
    let mut group: Option<Token> = None;
    // The first encoded-word may have to share the first line with the name.
    let first_room = FOLD_AT.saturating_sub(name.len() + 2);
    let room = |tokens: &Vec<Token>| {
        if tokens.is_empty() {
            first_room
        } else {
            MAX_WORD
        }
    };
    for token in split_at_whitespace(value) {
        if is_plain(&token.text, token.space.len()) {
            if let Some(group) = group.take() {
                tokens.extend(encoded(&group, room(&tokens)));
            }
            tokens.push(token);
        } else if let Some(group) = group.as_mut() {
            // Whitespace between two encoded-words is dropped when they are
            // decoded (RFC 2047 §6.2): it goes inside them.
            group.text.push_str(&token.space);
            group.text.push_str(&token.text);
        } else {
            group = Some(token);
        }
    }
    if let Some(group) = group {
        tokens.extend(encoded(&group, room(&tokens)));
    }
    pre_encoded(name, value.to_owned(), &tokens)
}

/// `value` cut before each run of whitespace that a word follows; trailing
/// whitespace stays with the last word, leading with the first.
fn split_at_whitespace(value: &str) -> Vec<Token> {
    let is_space = |c: char| c == ' ' || c == '\t';
    let mut tokens = Vec::new();
    let mut rest = value;
    while !rest.is_empty() {
        let word_start = rest.find(|c| !is_space(c)).unwrap_or(rest.len());
        let word_end = rest[word_start..]
            .find(is_space)
            .map_or(rest.len(), |end| word_start + end);
        let (space, text) = rest[..word_end].split_at(word_start);
        match tokens.last_mut() {
            // Only whitespace is left: a line may not hold nothing else.
            Some(Token { text: last, .. }) if text.is_empty() => last.push_str(space),
            None => tokens.push(Token {
                space: String::new(),
                text: rest[..word_end].to_owned(),
            }),
            Some(_) => tokens.push(Token {
                space: space.to_owned(),
                text: text.to_owned(),
            }),
        }
        rest = &rest[word_end..];
    }
    tokens
}

/// A display name (RFC 5322 `phrase`): as it is when it is only letters,
/// digits and `-_.`, quoted when it is other printable ASCII, and encoded
/// when it is not ASCII or a part of it would not fit on a line.
/// `first_room` is the longest the first encoded-word may be.
fn phrase(name: &str, first_room: usize) -> Vec<Token> {
    if name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && is_plain(name, 1)
    {
        return vec![Token {
            space: " ".to_owned(),
            text: name.to_owned(),
        }];
    }
    if name.bytes().all(|b| matches!(b, b' '..=b'~')) {
        let quoted = format!("\"{}\"", name.replace('\\', "\\\\").replace('"', "\\\""));
        // Folding whitespace may stand inside a quoted string (RFC 5322
        // §3.2.4), and unfolding gives it back.
        let mut tokens = split_at_whitespace(&quoted);
        if tokens.iter().all(|t| is_plain(&t.text, t.space.len())) {
            if let Some(first) = tokens.first_mut() {
                " ".clone_into(&mut first.space);
            }
            return tokens;
        }
    }
    encoded(
        &Token {
            space: " ".to_owned(),
            text: name.to_owned(),
        },
        first_room,
    )
}

/// Whether `text`, after `space` octets of whitespace, can be sent as it is
/// on any line: printable ASCII, short enough.
fn is_plain(text: &str, space: usize) -> bool {
    space + text.len() + HEAD_ROOM <= MAX_LINE
        && text.bytes().all(|b| matches!(b, b' '..=b'~' | b'\t'))
}

/// `token`'s text as encoded-words. The first follows one character of
/// `token`'s whitespace; the rest of it, which could be too long for a
/// line, is encoded with the text. The first word is at most `first_room`
/// octets long, or holds one character if that is less.
fn encoded(token: &Token, first_room: usize) -> Vec<Token> {
    let separator = token.space.chars().next().map(String::from);
    let leading = separator.as_ref().map_or("", |s| &token.space[s.len()..]);
    let mut words = Vec::new();
    let mut word = String::from(WORD_START);
    let mut buf = [0; 4];
    let mut limit = first_room.min(MAX_WORD);
    for c in leading.chars().chain(token.text.chars()) {
        let mut encoded = String::new();
        for &byte in c.encode_utf8(&mut buf).as_bytes() {
            q_encode(byte, &mut encoded);
        }
        // A character is never split between words (RFC 2047 §5).
        if word.len() > WORD_START.len() && word.len() + encoded.len() + WORD_END.len() > limit {
            words.push(std::mem::replace(&mut word, String::from(WORD_START)) + WORD_END);
            limit = MAX_WORD;
        }
        word.push_str(&encoded);
    }
    if word.len() > WORD_START.len() {
        words.push(word + WORD_END);
    }
    words
        .into_iter()
        .enumerate()
        .map(|(i, text)| Token {
            space: match (i, &separator) {
                (0, Some(separator)) => separator.clone(),
                (0, None) => String::new(),
                _ => " ".to_owned(),
            },
            text,
        })
        .collect()
}

/// `byte` in Q encoding, kept to the characters a phrase may hold
/// (RFC 2047 §5, rule 3) so that one encoder serves every header.
fn q_encode(byte: u8, out: &mut String) {
    match byte {
        b' ' => out.push('_'),
        b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z' | b'!' | b'*' | b'+' | b'-' | b'/' => {
            out.push(char::from(byte));
        }
        _ => out.extend(super::text::escaped(byte).map(char::from)),
    }
}

/// `tokens` laid out after `name: `, a line broken before a token (at its
/// whitespace) when the token would take it past [`FOLD_AT`].
fn pre_encoded(name: HeaderName, raw: String, tokens: &[Token]) -> HeaderValue {
    let mut out = String::new();
    let mut column = name.len() + 2;
    for (i, token) in tokens.iter().enumerate() {
        let width = token.space.len() + token.text.len();
        if i > 0 && !token.space.is_empty() && column + width > FOLD_AT {
            out.push_str("\r\n");
            column = 0;
        }
        out.push_str(&token.space);
        out.push_str(&token.text);
        column += width;
    }
    // Only whitespace follows a CRLF, and no token holds a control
    // character (text is encoded unless it is printable ASCII; addresses
    // are parsed, and kept as they are: a non-ASCII local part needs
    // SMTPUTF8 as it did with lettre): nothing can be injected.
    HeaderValue::dangerous_new_pre_encoded(name, raw, out)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The value of a formatted `header`: unfolded, its encoded-words
    /// decoded (whitespace between two of them dropped, RFC 2047 §6.2).
    fn decoded(header: &HeaderValue) -> String {
        let unfolded = lines(header).concat();
        let (_, value) = unfolded.split_once(": ").expect("name: value");
        let mut out = Vec::new();
        let mut space = "";
        let mut after_word = false;
        for run in runs(value) {
            if run.starts_with([' ', '\t']) {
                space = run;
                continue;
            }
            let word = run
                .strip_prefix(WORD_START)
                .and_then(|word| word.strip_suffix(WORD_END));
            if !(after_word && word.is_some()) {
                out.extend_from_slice(space.as_bytes());
            }
            space = "";
            after_word = word.is_some();
            match word {
                Some(word) => out.extend(q_decode(word)),
                None => out.extend_from_slice(run.as_bytes()),
            }
        }
        out.extend_from_slice(space.as_bytes());
        String::from_utf8(out).expect("UTF-8")
    }

    /// `value` cut into runs of whitespace and of anything else.
    fn runs(value: &str) -> Vec<&str> {
        let is_space = |c: char| c == ' ' || c == '\t';
        let mut runs = Vec::new();
        let mut rest = value;
        while let Some(first) = rest.chars().next() {
            let end = rest
                .find(|c| is_space(c) != is_space(first))
                .unwrap_or(rest.len());
            runs.push(&rest[..end]);
            rest = &rest[end..];
        }
        runs
    }

    fn q_decode(word: &str) -> Vec<u8> {
        let mut out = Vec::new();
        let mut bytes = word.bytes();
        while let Some(b) = bytes.next() {
            match b {
                b'_' => out.push(b' '),
                b'=' => {
                    let hex: String = bytes.by_ref().take(2).map(char::from).collect();
                    out.push(u8::from_str_radix(&hex, 16).expect("hex"));
                }
                _ => out.push(b),
            }
        }
        out
    }

    fn lines(header: &HeaderValue) -> Vec<String> {
        let mut headers = lettre::message::header::Headers::new();
        headers.insert_raw(header.clone());
        let text = headers.to_string();
        text.strip_suffix("\r\n")
            .expect("CRLF")
            .split("\r\n")
            .map(str::to_owned)
            .collect()
    }

    fn assert_lines_fit(header: &HeaderValue) {
        for line in lines(header) {
            assert!(line.len() <= MAX_LINE, "{} octets: {line}", line.len());
            assert!(!line.trim().is_empty(), "a line of only whitespace");
            assert!(
                line.bytes().all(|b| matches!(b, b' '..=b'~' | b'\t')),
                "{line}"
            );
        }
    }

    proptest! {
        /// Any value validation takes (998 characters, no control
        /// character but tab) fits the lines and decodes to itself.
        #[test]
        fn an_unstructured_value_decodes_to_itself(
            value in "([a-z]{0,400}|[ \t]{1,300}|[é€😀_=?]{1,50}|[!-~]{1,10}){1,8}"
        ) {
            let value: String = value.chars().take(998).collect();
            let header = unstructured(HeaderName::new_from_ascii_str("X-Test"), &value);
            assert_lines_fit(&header);
            prop_assert_eq!(decoded(&header), value);
        }
    }

    #[test]
    fn whitespace_too_long_for_a_line_is_encoded() {
        let value = format!("a{}b", " ".repeat(996));
        let header = unstructured(HeaderName::new_from_ascii_str("X-Spaces"), &value);
        assert_lines_fit(&header);
        assert_eq!(decoded(&header), value);
    }

    #[test]
    fn a_word_too_long_for_a_line_is_encoded() {
        let value = "a".repeat(998);
        let header = unstructured(HeaderName::new_from_ascii_str("X-Long"), &value);
        assert_lines_fit(&header);
        assert!(lines(&header).iter().all(|line| line.len() <= FOLD_AT));
        assert_eq!(decoded(&header), value);
    }

    #[test]
    fn display_names_are_quoted_or_encoded_as_needed() {
        let mailbox = |name: &str| {
            Mailbox::new(
                Some(name.to_owned()),
                "a@example.org".parse().expect("address"),
            )
        };
        let header = address_list(
            "To",
            &[mailbox("Ada"), mailbox("Lovelace, \"Ada\""), mailbox("Zoë")],
        );
        assert_eq!(
            lines(&header).concat(),
            "To: Ada <a@example.org>, \"Lovelace, \\\"Ada\\\"\" <a@example.org>, =?utf-8?q?Zo=C3=AB?= <a@example.org>"
        );
        let long = mailbox(&"é".repeat(900));
        let header = address_list("To", &[long.clone(), long]);
        assert_lines_fit(&header);
    }
}
