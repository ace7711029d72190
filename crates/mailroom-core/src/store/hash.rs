//! Keys derived from secrets or personal data (idempotency keys, API keys)
//! are stored as an HMAC-SHA256 under `redis.hash_key`, never as given: an
//! idempotency key may hold an address, an API key is a credential.

use hmac::{Hmac, KeyInit as _, Mac as _};
use sha2::Sha256;
use zeroize::Zeroizing;

/// HMAC-SHA256 under a server-side secret.
#[derive(Clone)]
pub struct KeyedHash {
    key: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for KeyedHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyedHash(..)")
    }
}

impl KeyedHash {
    /// A hasher under `key` (see `Settings::hash_key`).
    pub fn new(key: &[u8]) -> Self {
        Self {
            key: Zeroizing::new(key.to_vec()),
        }
    }

    /// The hex HMAC of `parts`, each length-prefixed so that `("ab", "c")`
    /// and `("a", "bc")` differ.
    pub fn hex(&self, parts: &[&[u8]]) -> String {
        let mut mac = <Hmac<Sha256>>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        for part in parts {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        hex::encode(mac.finalize().into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_delimited_and_keys_matter() {
        let hash = KeyedHash::new(b"0123456789abcdef0123456789abcdef");
        assert_ne!(hash.hex(&[b"ab", b"c"]), hash.hex(&[b"a", b"bc"]));
        assert_eq!(hash.hex(&[b"ab", b"c"]), hash.hex(&[b"ab", b"c"]));
        let other = KeyedHash::new(b"another key, just as long as that");
        assert_ne!(hash.hex(&[b"ab"]), other.hex(&[b"ab"]));
        assert_eq!(hash.hex(&[b"x"]).len(), 64);
    }
}
