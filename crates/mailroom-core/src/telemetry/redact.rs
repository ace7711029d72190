//! What may be said of a message in logs, spans, statuses and headers:
//! addresses masked, and what a relay's free text may quote of the message
//! hidden.

use std::borrow::Cow;

/// Masks an email address for logs and spans: the first character of the
/// local part and the domain stay, so `ada@example.org` becomes
/// `a***@example.org`. Anything without an `@` becomes `***`.
pub fn mask_email(addr: &str) -> String {
    match addr.rsplit_once('@') {
        Some((local, domain)) => {
            let first = local.chars().next().map(String::from).unwrap_or_default();
            format!("{first}***@{domain}")
        }
        None => "***".to_owned(),
    }
}

/// Longest error text kept in a status, a header or a log field.
pub const ERROR_TEXT_MAX: usize = 300;

/// An error text fit to keep, cut to [`ERROR_TEXT_MAX`] bytes at a
/// character boundary. An SMTP reply is a relay's free text, and relays
/// quote what they refuse, so each word is judged:
/// - an address-like word is masked (`550 <ada@example.org>: no such user`
///   keeps `a***@example.org`);
/// - what stands in double quotes, in single quotes around words, or in
///   angle brackets without an `@` is hidden (a quoted local part,
///   `"ada lovelace"@…`; sendmail's `<ada>: User unknown`);
/// - a URL keeps its scheme and host only, a `key=value` its key (a link
///   to a refusal's reason may carry `?rcpt=ada%40example.org`), and a
///   word with an encoded `@` (`%40`) is hidden whole.
///
/// What no pattern tells apart (a local part quoted bare, a subject) is
/// for [`hide_known`], given the message.
pub fn redact_error(text: &str) -> String {
    let text = hide_enclosed(text);
    let mut out = String::with_capacity(text.len().min(ERROR_TEXT_MAX + 4));
    for (i, word) in text.split(' ').enumerate() {
        if i > 0 {
            out.push(' ');
        }
        redact_word(word, &mut out);
    }
    if out.len() > ERROR_TEXT_MAX {
        let mut end = ERROR_TEXT_MAX;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
        out.push('…');
    }
    out
}

/// One word of [`redact_error`], pushed to `out`.
fn redact_word(word: &str, out: &mut String) {
    if let Some(scheme_end) = word.find("://") {
        let host_start = scheme_end + 3;
        let host_end = word[host_start..]
            .find(['/', '?', '#', '@'])
            .map_or(word.len(), |at| host_start + at);
        if word[host_start..host_end].is_empty() || word[host_end..].starts_with('@') {
            out.push_str("***");
        } else {
            out.push_str(&word[..host_end]);
            if host_end < word.len() {
                out.push_str("/…");
            }
        }
    } else if word.to_ascii_lowercase().contains("%40") {
        out.push_str("***");
    } else if word.contains('@') {
        // Keep the brackets and punctuation around the address.
        let start = word
            .find(|c: char| c.is_alphanumeric() || c == '"')
            .unwrap_or(0);
        let end = word
            .rfind(|c: char| c.is_alphanumeric())
            .map_or(word.len(), |at| at + 1);
        if start < end {
            out.push_str(&word[..start]);
            out.push_str(&mask_email(&word[start..end]));
            out.push_str(&word[end..]);
        } else {
            out.push_str("***");
        }
    } else if let Some(eq) = word.find('=').filter(|&at| at > 0) {
        out.push_str(&word[..=eq]);
        out.push_str("***");
    } else {
        out.push_str(word);
    }
}

/// `text` with what stands between double quotes, between single quotes
/// that open and close words (not an apostrophe: `don't`), and between
/// angle brackets with no `@` inside replaced by `***`. An unclosed double
/// quote hides the rest.
fn hide_enclosed(text: &str) -> Cow<'_, str> {
    if !text.contains(['"', '\'', '<']) {
        return text.into();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut before: Option<char> = None;
    while let Some(c) = rest.chars().next() {
        let after = &rest[c.len_utf8()..];
        let closing = match c {
            '"' => Some(after.find('"').unwrap_or(after.len())),
            '\'' if !before.is_some_and(char::is_alphanumeric) => closing_quote(after),
            '<' => after.find('>').filter(|&end| !after[..end].contains('@')),
            _ => None,
        };
        out.push(c);
        if let Some(end) = closing {
            let close = &after[end..];
            let close_len = close.chars().next().map_or(0, char::len_utf8);
            out.push_str("***");
            out.push_str(&close[..close_len]);
            before = close[..close_len].chars().next();
            rest = &close[close_len..];
        } else {
            before = Some(c);
            rest = after;
        }
    }
    out.into()
}

/// Where the single quote that closes a quoted word is in `after`: one
/// that no letter or digit follows.
fn closing_quote(after: &str) -> Option<usize> {
    after.match_indices('\'').map(|(at, _)| at).find(|&at| {
        !after[at + 1..]
            .chars()
            .next()
            .is_some_and(char::is_alphanumeric)
    })
}

/// `text` with every whole-word occurrence (ASCII case ignored) of each of
/// `known` replaced by `***`: what a relay may quote back of a message
/// that no pattern tells apart, such as a local part without its domain
/// (`user ada.lovelace at example.org`), a display name or the subject.
/// Strings under 3 characters are left alone: they would hide too much of
/// the relay's own words.
pub fn hide_known<'a>(text: &str, known: impl IntoIterator<Item = &'a str>) -> String {
    let mut out = text.to_owned();
    for needle in known {
        if needle.chars().count() < 3 {
            continue;
        }
        out = hide_word(&out, needle);
    }
    out
}

/// `text` with each whole-word, ASCII-case-blind occurrence of `needle`
/// replaced by `***`.
fn hide_word(text: &str, needle: &str) -> String {
    // ASCII lowering keeps every byte offset.
    let (haystack, needle) = (text.to_ascii_lowercase(), needle.to_ascii_lowercase());
    let is_word = |c: Option<char>| c.is_some_and(char::is_alphanumeric);
    let mut out = String::with_capacity(text.len());
    let mut from = 0;
    let mut search = 0;
    while let Some(found) = haystack[search..].find(&needle) {
        let at = search + found;
        let end = at + needle.len();
        if !is_word(haystack[..at].chars().next_back()) && !is_word(haystack[end..].chars().next())
        {
            out.push_str(&text[from..at]);
            out.push_str("***");
            from = end;
        }
        search = at + needle.chars().next().map_or(1, char::len_utf8);
    }
    out.push_str(&text[from..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_email_keeps_first_character_and_domain() {
        assert_eq!(mask_email("ada@example.org"), "a***@example.org");
        assert_eq!(mask_email("a@example.org"), "a***@example.org");
        assert_eq!(mask_email("@example.org"), "***@example.org");
        assert_eq!(mask_email("élodie@exemple.fr"), "é***@exemple.fr");
        assert_eq!(mask_email("\"a@b\"@example.org"), "\"***@example.org");
    }

    #[test]
    fn redact_error_masks_addresses_and_cuts_long_text() {
        assert_eq!(
            redact_error("550 5.1.1 <ada@example.org>: no such user"),
            "550 5.1.1 <a***@example.org>: no such user"
        );
        assert_eq!(redact_error("451 busy"), "451 busy");
        let quoted = redact_error("550 <\"ada lovelace\"@example.org>: no such user");
        assert!(
            !quoted.contains("ada") && !quoted.contains("lovelace"),
            "{quoted}"
        );
        assert!(quoted.contains("@example.org"), "{quoted}");
        assert!(!redact_error("550 \"ada lovelace").contains("ada"));
        let long = "é".repeat(400);
        let cut = redact_error(&long);
        assert!(cut.len() <= ERROR_TEXT_MAX + '…'.len_utf8());
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn mask_email_hides_what_is_not_an_address() {
        assert_eq!(mask_email("not an address"), "***");
        assert_eq!(mask_email(""), "***");
    }

    #[test]
    fn relay_words_that_quote_the_message_are_hidden() {
        for (reply, kept) in [
            (
                "550 5.1.1 <canary.rcpt>: User unknown in local recipient table",
                "550 5.1.1 <***>: User unknown in local recipient table",
            ),
            (
                "550 5.7.1 blocked see https://relay.example/why?rcpt=canary.rcpt%40victim.org",
                "550 5.7.1 blocked see https://relay.example/…",
            ),
            ("550 see http://user:pw@relay.example/x", "550 see ***"),
            ("550 5.7.1 id=CANARY123 refused", "550 5.7.1 id=*** refused"),
            (
                "550 'canary words' refused, don't retry",
                "550 '***' refused, don't retry",
            ),
            ("550 rcpt=canary.rcpt%40victim.org", "550 ***"),
            ("451 busy", "451 busy"),
        ] {
            assert_eq!(redact_error(reply), kept, "{reply}");
        }
    }

    #[test]
    fn known_words_are_hidden_whole_and_case_blind() {
        let known = ["canary.rcpt", "Lovelace", "ab", "CANARYSUBJ"];
        assert_eq!(
            hide_known(
                "user CANARY.RCPT at victim.org: lovelace, canarysubj, Canada ab",
                known
            ),
            "user *** at victim.org: ***, ***, Canada ab"
        );
        assert_eq!(hide_known("ada adaada ada", ["ada"]), "*** adaada ***");
        assert_eq!(hide_known("é ada é", ["ada"]), "é *** é");
    }
}
