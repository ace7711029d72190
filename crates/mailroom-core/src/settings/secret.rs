//! Secret values in settings: shown redacted everywhere (Debug, and the
//! serialization that `mailroom config` prints), readable only on purpose.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

/// A secret string: a password, a key list, or a URL that may hold a password.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(Zeroizing::new(value.into()))
    }

    /// The secret itself: call only where it is used, never to show it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether no value is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// A form safe to show: a URL keeps its scheme, user and host with the
    /// password masked; anything else is `[redacted]`.
    pub fn redacted(&self) -> String {
        if self.0.is_empty() {
            return String::new();
        }
        redact_url(&self.0).unwrap_or_else(|| "[redacted]".to_owned())
    }
}

/// `scheme://user:password@host/...` with the password masked; `None` when
/// the text is not a URL, or its userinfo cannot be told apart safely.
///
/// The userinfo runs to the *last* `@`, not to the first `/`, `?` or `#`:
/// passwords from `openssl rand -base64` hold `/` and are often pasted
/// unescaped. A `@` later in the path or query only makes more be masked,
/// never less. A userinfo without `:` may be a bare token, so it is masked
/// whole.
///
/// Only the first word is ever shown, followed by `…` when more follows:
/// what comes after a space or a line break (the second line of a mounted
/// file, say) is no part of a URL and may be a secret of its own.
pub fn redact_url(text: &str) -> Option<String> {
    let (first, rest) = text.split_at(text.find(is_break).unwrap_or(text.len()));
    if rest.is_empty() {
        return redact_word(first);
    }
    // An `@` after the break may end a userinfo the break is inside of
    // (`u:pass word@host`): the first word would then show part of it.
    if rest.contains('@') {
        return None;
    }
    redact_word(first).map(|shown| format!("{shown}…"))
}

/// Whether `text` is one word: no whitespace or control characters, which
/// no URL holds unescaped.
pub(crate) fn is_one_word(text: &str) -> bool {
    !text.contains(is_break)
}

fn is_break(c: char) -> bool {
    c.is_whitespace() || c.is_control()
}

/// [`redact_url`] of text without whitespace.
fn redact_word(text: &str) -> Option<String> {
    let (scheme, rest) = text.split_once("://")?;
    if scheme.is_empty()
        || !scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '+')
    {
        return None;
    }
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return Some(text.to_owned());
    };
    let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
    // A user name holding a path or query delimiter means the `@` did not
    // end a userinfo: what is safe to show is unclear, so nothing is.
    if user.contains(['/', '?', '#']) {
        return None;
    }
    let user = if userinfo.contains(':') { user } else { "" };
    Some(format!("{scheme}://{user}:***@{host}"))
}

/// `text` (an error message) with the userinfo of every URL in it masked,
/// for messages that quote a value which may be a URL with a password.
pub(crate) fn scrub_urls(text: &str) -> String {
    text.split(' ')
        .map(|word| match word.find("://") {
            Some(at) => {
                let start = word[..at]
                    .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '+'))
                    .map_or(0, |i| i + 1);
                let (before, url) = word.split_at(start);
                let shown = redact_url(url).unwrap_or_else(|| "[redacted]".to_owned());
                format!("{before}{shown}")
            }
            None => word.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({})", self.redacted())
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Self::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_keep_host_and_lose_password() {
        let url = Secret::new("amqp://guest:hunter2@rabbit:5672/%2f");
        assert_eq!(url.redacted(), "amqp://guest:***@rabbit:5672/%2f");
        assert!(!format!("{url:?}").contains("hunter2"));
        let token_only = Secret::new("rediss://:hunter2@redis:6380");
        assert_eq!(token_only.redacted(), "rediss://:***@redis:6380");
    }

    #[test]
    fn urls_without_password_stay_whole() {
        assert_eq!(
            Secret::new("redis://127.0.0.1:6379/0").redacted(),
            "redis://127.0.0.1:6379/0"
        );
    }

    #[test]
    fn anything_else_is_redacted_whole() {
        let key = Secret::new("k1:c2VjcmV0");
        assert_eq!(key.redacted(), "[redacted]");
        assert_eq!(serde_json::to_string(&key).expect("json"), "\"[redacted]\"");
    }

    #[test]
    fn an_at_sign_in_the_password_is_still_masked() {
        assert_eq!(
            Secret::new("smtp://u:p@ss@mail:587").redacted(),
            "smtp://u:***@mail:587"
        );
    }

    /// `openssl rand -base64` passwords hold `/`, `+` and `=`, and may be
    /// pasted unescaped; `?` and `#` in one must not end the userinfo either.
    #[test]
    fn a_password_with_url_delimiters_is_still_masked() {
        for (url, shown) in [
            (
                "amqp://app:ab/cd@rabbit:5672/%2f",
                "amqp://app:***@rabbit:5672/%2f",
            ),
            ("amqp://app:x+y/z==@rabbit/%2f", "amqp://app:***@rabbit/%2f"),
            ("redis://:p?q#r@redis:6379/0", "redis://:***@redis:6379/0"),
            ("amqps://app:a/b@c/d@rabbit/vh", "amqps://app:***@rabbit/vh"),
        ] {
            assert_eq!(Secret::new(url).redacted(), shown, "{url}");
        }
    }

    #[test]
    fn a_userinfo_without_a_colon_is_masked_whole() {
        assert_eq!(
            Secret::new("redis://tok3n@redis:6379").redacted(),
            "redis://:***@redis:6379"
        );
    }

    /// Where the `@` cannot have ended a userinfo, nothing of it is shown.
    #[test]
    fn an_ambiguous_url_is_redacted_whole() {
        for url in ["redis://redis/0?note=a:b@c", "redis://redis/0#x@y"] {
            assert_eq!(Secret::new(url).redacted(), "[redacted]", "{url}");
        }
    }

    /// What follows a space, a line break or a control character is never
    /// shown: a file may hold the password again on a second line.
    #[test]
    fn only_the_first_word_is_shown() {
        for (text, shown) in [
            (
                "redis://:CanaryPw1@127.0.0.1:18496\nextra CanaryPw1",
                Some("redis://:***@127.0.0.1:18496…"),
            ),
            (
                "amqp://app:CanaryPw1@rabbit/%2f CanaryPw1",
                Some("amqp://app:***@rabbit/%2f…"),
            ),
            ("smtp://relay:587\tCanaryPw1", Some("smtp://relay:587…")),
            ("smtp://relay:587\u{1}CanaryPw1", Some("smtp://relay:587…")),
            // The break may be inside the password: nothing is safe to show.
            ("redis://:Canary Pw1@redis:6379", None),
            ("redis://:Canary@Pw1 x@redis:6379", None),
            ("CanaryPw1 redis://r", None),
        ] {
            assert_eq!(redact_url(text).as_deref(), shown, "{text:?}");
            let redacted = Secret::new(text).redacted();
            assert!(!redacted.contains("Canary"), "{text:?}: {redacted}");
            assert!(!redacted.contains("Pw1"), "{text:?}: {redacted}");
        }
        assert!(is_one_word("redis://r:6379/0"));
        assert!(!is_one_word("redis://r:6379/0\n"));
    }

    #[test]
    fn urls_in_messages_are_scrubbed() {
        let message = r#"invalid type: string "amqp://app:ab/cd@rabbit/", expected a sequence; see redis://:hunter2@r:6379 or http://docs"#;
        assert_eq!(
            scrub_urls(message),
            r#"invalid type: string "amqp://app:***@rabbit/", expected a sequence; see redis://:***@r:6379 or http://docs"#
        );
    }
}
