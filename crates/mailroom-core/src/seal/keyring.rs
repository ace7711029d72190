//! Named sealing keys: one active for sealing, all of them for opening, so a
//! key can rotate with no downtime and no lost job.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use zeroize::Zeroizing;

/// Length of a sealing key in bytes.
pub const KEY_LEN: usize = 32;

/// Longest key id accepted; it travels in every message's headers.
const MAX_KID_LEN: usize = 64;

/// A problem with the configured keys. Never carries key material.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyringError {
    /// An entry is not `kid:base64`.
    #[error("{source_name} entry {position}: {reason}")]
    BadEntry {
        /// Where the entry came from (`seal.keys` or the file path).
        source_name: String,
        /// 1-based position (entry number, or line number in a file).
        position: usize,
        /// What is wrong, without the key.
        reason: &'static str,
    },
    /// The same kid appears twice with different keys.
    #[error("seal: key id {0:?} is defined twice")]
    DuplicateKid(String),
    /// No key at all.
    #[error(
        "seal: no keys; set MAILROOM__SEAL__KEYS or MAILROOM__SEAL__KEYS_FILE (make one with `mailroom keys generate`)"
    )]
    NoKeys,
    /// `seal.active` names a key that is not loaded.
    #[error("seal.active: no key with id {0:?} is loaded")]
    UnknownActive(String),
    /// Several keys and no `seal.active`.
    #[error("seal.active: required when more than one key is loaded")]
    ActiveRequired,
    /// The key file could not be read.
    #[error("seal.keys_file: cannot read {path}: {reason}")]
    File {
        /// The file's path.
        path: String,
        /// The I/O error.
        reason: String,
    },
}

/// One named key. Its bytes are zeroized on drop and never shown.
#[derive(Clone)]
pub struct SealKey {
    kid: String,
    bytes: Zeroizing<[u8; KEY_LEN]>,
}

impl SealKey {
    /// A key from its id and bytes.
    pub fn new(kid: &str, bytes: [u8; KEY_LEN]) -> Result<Self, &'static str> {
        Self::from_zeroizing(kid, Zeroizing::new(bytes))
    }

    fn from_zeroizing(kid: &str, bytes: Zeroizing<[u8; KEY_LEN]>) -> Result<Self, &'static str> {
        check_kid(kid)?;
        Ok(Self {
            kid: kid.to_owned(),
            bytes,
        })
    }

    /// A fresh random key from a CSPRNG seeded by the operating system.
    pub fn generate(kid: &str) -> Result<Self, &'static str> {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        rand::fill(&mut bytes[..]);
        Self::from_zeroizing(kid, bytes)
    }

    /// The key's id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The `kid:base64` line that `MAILROOM__SEAL__KEYS` and key files take.
    /// This prints the secret: only for `mailroom keys generate`.
    pub fn to_line(&self) -> Zeroizing<String> {
        Zeroizing::new(format!("{}:{}", self.kid, STANDARD.encode(*self.bytes)))
    }

    pub(super) fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.bytes
    }
}

impl fmt::Debug for SealKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SealKey({}, [redacted])", self.kid)
    }
}

impl fmt::Display for SealKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ([redacted])", self.kid)
    }
}

impl PartialEq for SealKey {
    fn eq(&self, other: &Self) -> bool {
        self.kid == other.kid && *self.bytes == *other.bytes
    }
}

fn check_kid(kid: &str) -> Result<(), &'static str> {
    if kid.is_empty() || kid.len() > MAX_KID_LEN {
        return Err("key id must be 1 to 64 characters");
    }
    if !kid
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err("key id may hold only letters, digits, '-', '_' and '.'");
    }
    Ok(())
}

/// Parses one `kid:base64` entry.
fn parse_entry(entry: &str) -> Result<SealKey, &'static str> {
    let (kid, encoded) = entry
        .split_once(':')
        .ok_or("expected `kid:base64` (no ':' found)")?;
    let encoded = encoded.trim();
    let decoded = Zeroizing::new(
        STANDARD
            .decode(encoded)
            .or_else(|_| STANDARD_NO_PAD.decode(encoded))
            .map_err(|_| "key is not valid base64")?,
    );
    let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
    if decoded.len() != KEY_LEN {
        return Err("key must decode to exactly 32 bytes");
    }
    bytes.copy_from_slice(&decoded);
    SealKey::from_zeroizing(kid.trim(), bytes)
}

/// The keys that seal and open jobs.
#[derive(Clone, Debug)]
pub struct Keyring {
    keys: BTreeMap<String, SealKey>,
    active: String,
}

impl Keyring {
    /// A keyring from keys and the id of the one that seals.
    pub fn new(
        keys: impl IntoIterator<Item = SealKey>,
        active: Option<&str>,
    ) -> Result<Self, KeyringError> {
        let mut map = BTreeMap::new();
        let mut first = None;
        for key in keys {
            first.get_or_insert_with(|| key.kid.clone());
            if let Some(existing) = map.get(&key.kid) {
                if *existing == key {
                    continue;
                }
                return Err(KeyringError::DuplicateKid(key.kid));
            }
            map.insert(key.kid.clone(), key);
        }
        let active = match (active, first) {
            (_, None) => return Err(KeyringError::NoKeys),
            (Some(kid), _) if !map.contains_key(kid) => {
                return Err(KeyringError::UnknownActive(kid.to_owned()));
            }
            (Some(kid), _) => kid.to_owned(),
            (None, Some(only)) if map.len() == 1 => only,
            (None, Some(_)) => return Err(KeyringError::ActiveRequired),
        };
        Ok(Self { keys: map, active })
    }

    /// A keyring from settings: `keys` (`kid:base64` entries separated by
    /// commas or newlines) and/or a file of such lines (blank lines and `#`
    /// comments ignored), and the active kid.
    pub fn load(
        keys: Option<&str>,
        keys_file: Option<&Path>,
        active: Option<&str>,
    ) -> Result<Self, KeyringError> {
        let mut all = Vec::new();
        if let Some(list) = keys {
            all.extend(parse_list(list, "seal.keys", |c| c == ',' || c == '\n')?);
        }
        if let Some(path) = keys_file {
            let text =
                Zeroizing::new(
                    std::fs::read_to_string(path).map_err(|e| KeyringError::File {
                        path: path.display().to_string(),
                        reason: e.kind().to_string(),
                    })?,
                );
            let name = format!("seal.keys_file {}", path.display());
            all.extend(parse_list(&text, &name, |c| c == '\n')?);
        }
        Self::new(all, active.filter(|kid| !kid.trim().is_empty()))
    }

    /// The key that seals new jobs.
    pub fn active(&self) -> &SealKey {
        // `new` only builds a keyring whose active kid is a key of the map.
        &self.keys[&self.active]
    }

    /// The key with this id, if loaded.
    pub fn get(&self, kid: &str) -> Option<&SealKey> {
        self.keys.get(kid)
    }

    /// The ids of all loaded keys.
    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }
}

fn parse_list(
    text: &str,
    source_name: &str,
    separator: impl Fn(char) -> bool,
) -> Result<Vec<SealKey>, KeyringError> {
    text.split(separator)
        .enumerate()
        .map(|(i, entry)| (i + 1, entry.trim()))
        .filter(|(_, entry)| !entry.is_empty() && !entry.starts_with('#'))
        .map(|(position, entry)| {
            parse_entry(entry).map_err(|reason| KeyringError::BadEntry {
                source_name: source_name.to_owned(),
                position,
                reason,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    fn line(kid: &str) -> String {
        SealKey::generate(kid)
            .expect("valid kid")
            .to_line()
            .to_string()
    }

    #[test]
    fn generated_line_parses_back() {
        let key = SealKey::generate("k2026a").expect("valid kid");
        assert_eq!(parse_entry(&key.to_line()), Ok(key));
    }

    #[test]
    fn loads_env_list_and_file_together() {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        writeln!(file, "# rotated in 2025\n\n{}", line("k2025b")).expect("write");
        let ring =
            Keyring::load(Some(&line("k2026a")), Some(file.path()), Some("k2026a")).expect("loads");
        assert_eq!(ring.kids().collect::<Vec<_>>(), ["k2025b", "k2026a"]);
        assert_eq!(ring.active().kid(), "k2026a");
    }

    #[test]
    fn single_key_is_active_without_saying_so() {
        let ring = Keyring::load(Some(&line("only")), None, None).expect("loads");
        assert_eq!(ring.active().kid(), "only");
    }

    #[test]
    fn several_keys_need_an_active_one() {
        let list = format!("{},{}", line("a"), line("b"));
        assert_eq!(
            Keyring::load(Some(&list), None, None).err(),
            Some(KeyringError::ActiveRequired)
        );
        assert_eq!(
            Keyring::load(Some(&list), None, Some("c")).err(),
            Some(KeyringError::UnknownActive("c".into()))
        );
    }

    #[test]
    fn no_keys_is_an_error() {
        assert_eq!(
            Keyring::load(Some(" , "), None, None).err(),
            Some(KeyringError::NoKeys)
        );
    }

    #[test]
    fn duplicate_kid_with_other_bytes_is_an_error() {
        let list = format!("{},{}", line("a"), line("a"));
        assert_eq!(
            Keyring::load(Some(&list), None, Some("a")).err(),
            Some(KeyringError::DuplicateKid("a".into()))
        );
    }

    #[test]
    fn bad_entries_name_their_position_not_their_bytes() {
        let short = format!("ok:{}", STANDARD.encode([7u8; 16]));
        for (list, reason) in [
            ("nocolon".to_owned(), "no ':'"),
            ("k:%%%".to_owned(), "base64"),
            (short.clone(), "32 bytes"),
            (format!("bad kid:{}", STANDARD.encode([1u8; 32])), "key id"),
        ] {
            let list = format!("{},{list}", line("good"));
            let err = Keyring::load(Some(&list), None, Some("good")).expect_err("rejected");
            let shown = err.to_string();
            assert!(shown.contains("seal.keys entry 2"), "{shown}");
            assert!(shown.contains(reason), "{shown}");
            assert!(!shown.contains(&STANDARD.encode([7u8; 16])), "{shown}");
        }
    }

    #[test]
    fn missing_file_is_reported_with_its_path() {
        let err =
            Keyring::load(None, Some(Path::new("/nonexistent/keys")), None).expect_err("no file");
        assert!(err.to_string().contains("/nonexistent/keys"), "{err}");
    }

    #[test]
    fn debug_and_display_never_show_bytes() {
        let key = SealKey::new("k1", [0xAB; KEY_LEN]).expect("valid kid");
        let encoded = STANDARD.encode([0xAB; KEY_LEN]);
        for shown in [format!("{key:?}"), format!("{key}")] {
            assert!(
                shown.contains("k1") && shown.contains("redacted"),
                "{shown}"
            );
            assert!(
                !shown.contains(&encoded) && !shown.contains("171"),
                "{shown}"
            );
        }
        let ring = Keyring::new([key], None).expect("one key");
        assert!(!format!("{ring:?}").contains("171"));
    }
}
