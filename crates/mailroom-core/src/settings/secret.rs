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
/// the text is not a URL.
pub fn redact_url(text: &str) -> Option<String> {
    let (scheme, rest) = text.split_once("://")?;
    if scheme.is_empty()
        || !scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '+')
    {
        return None;
    }
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let shown = match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
            format!("{user}:***@{host}")
        }
        None => authority.to_owned(),
    };
    Some(format!("{scheme}://{shown}{path}"))
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
}
