//! The `[limits]` settings section: how big a job may be, and which
//! attachment types it may not carry.

use serde::{Deserialize, Serialize};

/// The least `max_idempotency_key_chars` taken: room for the key the API
/// derives for a batch item (`batch:`, 32 hex digits, `#` and the index).
pub const MIN_IDEMPOTENCY_KEY_CHARS: usize = 64;

/// Attachment extensions refused by default (lowercase, no dot): Gmail's
/// blocked list plus macro-enabled Office formats and disk images.
pub const DEFAULT_BLOCKED_EXTENSIONS: &[&str] = &[
    "ade",
    "adp",
    "apk",
    "app",
    "appx",
    "appxbundle",
    "bat",
    "cab",
    "chm",
    "cmd",
    "com",
    "cpl",
    "diagcab",
    "diagcfg",
    "diagpack",
    "dll",
    "dmg",
    "docm",
    "dotm",
    "ex_",
    "exe",
    "hta",
    "img",
    "ins",
    "iso",
    "isp",
    "jar",
    "jnlp",
    "js",
    "jse",
    "lib",
    "lnk",
    "mde",
    "mjs",
    "msc",
    "msi",
    "msix",
    "msixbundle",
    "msp",
    "mst",
    "nsh",
    "pif",
    "potm",
    "ppam",
    "ppsm",
    "pptm",
    "ps1",
    "psm1",
    "reg",
    "scr",
    "sct",
    "shb",
    "sldm",
    "sys",
    "vb",
    "vbe",
    "vbs",
    "vhd",
    "vhdx",
    "vxd",
    "wsc",
    "wsf",
    "wsh",
    "xlam",
    "xll",
    "xlsm",
    "xltm",
];

/// Limits a job must keep to (`[limits]` in `mailroom.toml`). Every field has
/// a default; a field left out of the file keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Most recipients (to, cc and bcc together) one job may have. Default 50.
    pub max_recipients: usize,
    /// Longest subject, in characters. Default 255.
    pub max_subject_chars: usize,
    /// Largest message, in bytes: bodies, attachments (before base64),
    /// subject, addresses and custom headers. Default 10 MiB.
    pub max_message_bytes: usize,
    /// Most attachments. Default 10.
    pub max_attachments: usize,
    /// Largest single attachment, in bytes (before base64). Default 5 MiB.
    pub max_attachment_bytes: usize,
    /// Attachment extensions refused, case-insensitive, with or without the
    /// dot. Default [`DEFAULT_BLOCKED_EXTENSIONS`].
    pub blocked_extensions: Vec<String>,
    /// Longest custom header value or address, in characters. Default 998
    /// (the RFC 5322 line limit).
    pub max_header_value_chars: usize,
    /// Most custom headers. Default 20.
    pub max_custom_headers: usize,
    /// Longest idempotency key, in characters. Default 255, at least
    /// [`MIN_IDEMPOTENCY_KEY_CHARS`].
    pub max_idempotency_key_chars: usize,
    /// Longest tenant name, in characters. Default 64.
    pub max_tenant_chars: usize,
    /// Most tags. Default 20.
    pub max_tags: usize,
    /// Longest tag or metadata key, in characters. Default 64.
    pub max_tag_chars: usize,
    /// Most metadata entries. Default 20.
    pub max_metadata_entries: usize,
    /// Longest metadata value, in characters. Default 256.
    pub max_metadata_value_chars: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_recipients: 50,
            max_subject_chars: 255,
            max_message_bytes: 10 * 1024 * 1024,
            max_attachments: 10,
            max_attachment_bytes: 5 * 1024 * 1024,
            blocked_extensions: DEFAULT_BLOCKED_EXTENSIONS
                .iter()
                .map(|&ext| ext.to_owned())
                .collect(),
            max_header_value_chars: 998,
            max_custom_headers: 20,
            max_idempotency_key_chars: 255,
            max_tenant_chars: 64,
            max_tags: 20,
            max_tag_chars: 64,
            max_metadata_entries: 20,
            max_metadata_value_chars: 256,
        }
    }
}

impl Limits {
    /// Whether `extension` (lowercase, no dot) is on the blocked list.
    pub(super) fn blocks_extension(&self, extension: &str) -> bool {
        self.blocked_extensions.iter().any(|blocked| {
            blocked
                .trim()
                .trim_start_matches('.')
                .eq_ignore_ascii_case(extension)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_fields_keep_their_defaults() {
        let limits: Limits =
            serde_json::from_str(r#"{"max_recipients": 5}"#).expect("partial section parses");
        assert_eq!(limits.max_recipients, 5);
        assert_eq!(
            limits.max_message_bytes,
            Limits::default().max_message_bytes
        );
        assert!(limits.blocks_extension("exe"));
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = serde_json::from_str::<Limits>(r#"{"max_recipient": 5}"#)
            .expect_err("a typo must not pass");
        assert!(err.to_string().contains("max_recipient"), "{err}");
    }

    #[test]
    fn configured_extensions_are_normalised() {
        let limits = Limits {
            blocked_extensions: vec![".ZIP".into(), " Rar ".into()],
            ..Limits::default()
        };
        assert!(limits.blocks_extension("zip"));
        assert!(limits.blocks_extension("rar"));
        assert!(!limits.blocks_extension("exe"));
    }

    #[test]
    fn default_list_is_lowercase_sorted_and_unique() {
        let mut sorted = DEFAULT_BLOCKED_EXTENSIONS.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted, DEFAULT_BLOCKED_EXTENSIONS);
        assert!(
            DEFAULT_BLOCKED_EXTENSIONS
                .iter()
                .all(|ext| !ext.starts_with('.') && *ext == ext.to_lowercase())
        );
    }
}
