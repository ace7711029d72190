//! The job: what a producer hands to the queue and a worker delivers.
//!
//! [`JobRequest`] is the form callers write (by hand, in JSON, or through the
//! library); [`SendJob`] is the full job the producer makes of it by giving it
//! an id, a tenant and a creation time. Addresses are kept as strings here so
//! that validation can report every bad one at once, with its field path.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

/// Version of the job schema; bound into every seal so a body of another
/// version never opens as this one.
pub const SCHEMA_VERSION: u16 = 1;

/// A job's id: a UUIDv7, so ids sort by creation time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(Uuid);

impl JobId {
    /// A fresh, time-ordered id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// The id as a UUID.
    pub fn as_uuid(&self) -> &Uuid {
        &self.0
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl From<Uuid> for JobId {
    fn from(value: Uuid) -> Self {
        Self(value)
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for JobId {
    type Err = uuid::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(Self)
    }
}

/// Which work queue a job travels on: a newsletter never delays a password reset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Lane {
    /// Mail a person is waiting for (password resets, receipts, OTPs).
    #[default]
    Transactional,
    /// Mail nobody waits for (newsletters, digests).
    Bulk,
}

impl Lane {
    /// Every lane, in priority order.
    pub const ALL: [Lane; 2] = [Lane::Transactional, Lane::Bulk];

    /// The lane's name on the wire (routing key, header value).
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Transactional => "transactional",
            Lane::Bulk => "bulk",
        }
    }
}

impl fmt::Display for Lane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A lane name that is neither `transactional` nor `bulk`.
#[derive(Debug, thiserror::Error)]
#[error("unknown lane {0:?}: expected `transactional` or `bulk`")]
pub struct UnknownLane(String);

impl FromStr for Lane {
    type Err = UnknownLane;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "transactional" => Ok(Lane::Transactional),
            "bulk" => Ok(Lane::Bulk),
            other => Err(UnknownLane(other.to_owned())),
        }
    }
}

/// One file attached to a message.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attachment {
    /// File name shown to the recipient.
    pub filename: String,
    /// MIME type, e.g. `application/pdf`.
    pub content_type: String,
    /// The file's bytes; standard base64 in JSON.
    #[serde(with = "base64_bytes")]
    pub content: Vec<u8>,
}

impl fmt::Debug for Attachment {
    // Never print the content: it is the sender's data.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Attachment")
            .field("filename", &self.filename)
            .field("content_type", &self.content_type)
            .field("len", &self.content.len())
            .finish()
    }
}

/// The email itself.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailMessage {
    /// Sender mailbox, e.g. `Shop <noreply@shop.example>`.
    pub from: String,
    /// Reply-To mailboxes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reply_to: Vec<String>,
    /// To mailboxes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<String>,
    /// Cc mailboxes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cc: Vec<String>,
    /// Bcc mailboxes: receive the mail, never appear in its headers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bcc: Vec<String>,
    /// Subject line.
    pub subject: String,
    /// Plain-text body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// HTML body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html: Option<String>,
    /// Extra headers, from the allow-list in [`crate::validate`].
    #[serde(
        default,
        deserialize_with = "unique_keys::headers",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub headers: BTreeMap<String, String>,
    /// Attached files.
    #[serde(
        default,
        deserialize_with = "objects::many",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub attachments: Vec<Attachment>,
    /// Free labels for the caller's reporting; never sent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Free key/value data for the caller; never sent.
    #[serde(
        default,
        deserialize_with = "unique_keys::metadata",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub metadata: BTreeMap<String, String>,
}

impl EmailMessage {
    /// Roughly how many bytes the message takes written out, to size a
    /// buffer once: [`EmailMessage::size`], plus one byte in `escapes` of
    /// the bodies (for their escapes) and half the attachments (for
    /// base64 and its line breaks).
    pub fn written_len_hint(&self, escapes: usize) -> usize {
        let bodies = [&self.text, &self.html]
            .into_iter()
            .map(|b| b.as_ref().map_or(0, String::len))
            .fold(0, usize::saturating_add);
        let attachments = self
            .attachments
            .iter()
            .map(|a| a.content.len())
            .fold(0, usize::saturating_add);
        self.size()
            .saturating_add(bodies / escapes.max(1))
            .saturating_add(attachments / 2)
            .saturating_add(1024)
    }

    /// The message's size as counted against
    /// [`crate::validate::Limits::max_message_bytes`]: bodies, attachments
    /// (before base64), and everything that becomes a header.
    pub fn size(&self) -> usize {
        let addresses = std::iter::once(&self.from)
            .chain(&self.reply_to)
            .chain(&self.to)
            .chain(&self.cc)
            .chain(&self.bcc)
            .map(String::len);
        let headers = self.headers.iter().map(|(n, v)| n.len() + v.len());
        let attachments = self
            .attachments
            .iter()
            .map(|a| a.content.len() + a.filename.len() + a.content_type.len());
        let bodies = [&self.text, &self.html]
            .into_iter()
            .map(|b| b.as_ref().map_or(0, String::len));
        addresses
            .chain(headers)
            .chain(attachments)
            .chain(bodies)
            .chain(std::iter::once(self.subject.len()))
            .fold(0, usize::saturating_add)
    }

    /// Every envelope recipient: to, cc and bcc.
    pub fn recipients(&self) -> impl Iterator<Item = &str> {
        self.to
            .iter()
            .chain(&self.cc)
            .chain(&self.bcc)
            .map(String::as_str)
    }
}

impl fmt::Debug for EmailMessage {
    // Addresses, subject and bodies are personal data: show only their shape.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmailMessage")
            .field("recipients", &self.recipients().count())
            .field("has_text", &self.text.is_some())
            .field("has_html", &self.html.is_some())
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("attachments", &self.attachments)
            .finish_non_exhaustive()
    }
}

/// What a caller asks for: a message and how to send it. The producer turns
/// it into a [`SendJob`].
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    /// Sending tenant; the API sets it from the credential and ignores this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Caller's key: the same (tenant, key) is sent at most once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Work lane; `transactional` unless said.
    #[serde(default)]
    pub lane: Lane,
    /// Do not send after this instant (RFC 3339).
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub expires_at: Option<OffsetDateTime>,
    /// The email.
    #[serde(deserialize_with = "objects::one")]
    pub message: EmailMessage,
}

/// A job as it travels through the queue (inside the seal).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendJob {
    /// Schema version; [`SCHEMA_VERSION`] for jobs made by this code.
    pub schema: u16,
    /// Unique id, also the AMQP `message_id`.
    pub id: JobId,
    /// Who sends.
    pub tenant: String,
    /// Dedup is on (tenant, key) when set, else on the id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// When the producer accepted it.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Not sent after this instant.
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub expires_at: Option<OffsetDateTime>,
    /// Work lane.
    pub lane: Lane,
    /// The email.
    pub message: EmailMessage,
}

impl SendJob {
    /// A new job for `tenant` made from a request, with a fresh id, created now.
    /// The request's own `tenant` is ignored: the caller decides who sends.
    pub fn from_request(request: JobRequest, tenant: impl Into<String>) -> Self {
        Self {
            schema: SCHEMA_VERSION,
            id: JobId::new(),
            tenant: tenant.into(),
            idempotency_key: request.idempotency_key,
            created_at: OffsetDateTime::now_utc(),
            expires_at: request.expires_at,
            lane: request.lane,
            message: request.message,
        }
    }

    /// The key dedup claims: the idempotency key when given, else the id.
    pub fn dedup_key(&self) -> String {
        self.idempotency_key
            .clone()
            .unwrap_or_else(|| self.id.to_string())
    }

    /// Whether the job may no longer be sent at `now`.
    pub fn is_expired_at(&self, now: OffsetDateTime) -> bool {
        self.expires_at.is_some_and(|at| now >= at)
    }
}

/// Deserializing a map of names to text that refuses a name given twice:
/// a JSON object may repeat a key, and serde would keep the last value
/// without a word. The error does not say which name: it is the caller's.
/// A JSON object and nothing else: serde's derived structs also take an
/// array, filling the fields in their declared order, which no document
/// promises. Parse a caller's job as `Object<JobRequest>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Object<T>(pub T);

impl<T> Object<T> {
    /// The value.
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        objects::one(d).map(Object)
    }
}

mod objects {
    use std::fmt;
    use std::marker::PhantomData;

    use serde::de::value::MapAccessDeserializer;
    use serde::de::{MapAccess, SeqAccess, Visitor};
    use serde::{Deserialize, Deserializer};

    use super::Object;

    /// A `T` given as an object.
    pub fn one<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<T, D::Error> {
        d.deserialize_map(OneObject(PhantomData))
    }

    /// `T`s each given as an object.
    pub fn many<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
        d.deserialize_seq(ManyObjects(PhantomData))
    }

    struct OneObject<T>(PhantomData<T>);

    impl<'de, T: Deserialize<'de>> Visitor<'de> for OneObject<T> {
        type Value = T;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an object")
        }

        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
            T::deserialize(MapAccessDeserializer::new(map))
        }
    }

    struct ManyObjects<T>(PhantomData<T>);

    impl<'de, T: Deserialize<'de>> Visitor<'de> for ManyObjects<T> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an array of objects")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
            while let Some(Object(item)) = seq.next_element::<Object<T>>()? {
                items.push(item);
            }
            Ok(items)
        }
    }
}

mod unique_keys {
    use std::collections::BTreeMap;
    use std::collections::btree_map::Entry;
    use std::fmt;

    use serde::Deserializer;
    use serde::de::{Error as _, MapAccess, Visitor};

    /// `headers`, each name at most once.
    pub fn headers<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
        d.deserialize_map(UniqueKeys("headers"))
    }

    /// `metadata`, each key at most once.
    pub fn metadata<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
        d.deserialize_map(UniqueKeys("metadata"))
    }

    /// The visitor; holds the field's name for the error.
    struct UniqueKeys(&'static str);

    impl<'de> Visitor<'de> for UniqueKeys {
        type Value = BTreeMap<String, String>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an object of names to strings")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut entries = BTreeMap::new();
            while let Some((name, value)) = map.next_entry::<String, String>()? {
                match entries.entry(name) {
                    Entry::Vacant(entry) => {
                        entry.insert(value);
                    }
                    Entry::Occupied(_) => {
                        return Err(A::Error::custom(format_args!(
                            "a name appears twice in {}",
                            self.0
                        )));
                    }
                }
            }
            Ok(entries)
        }
    }
}

/// Serde for `Vec<u8>` as standard base64 text.
mod base64_bytes {
    use base64::alphabet;
    use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
    use base64::{DecodeError, Engine as _};
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    /// Standard base64 that also takes non-zero bits after the last full
    /// byte (`QR==` as well as `QQ==`), as Python's and most other decoders
    /// do: they carry no data, and refusing them refuses a sender's file
    /// for its encoder's rounding.
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true),
    );

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        LENIENT
            .decode(text.as_bytes())
            .map_err(|e| D::Error::custom(reason(&e)))
    }

    /// What is wrong, without the byte or offset base64's own message
    /// names: those are the sender's file.
    fn reason(err: &DecodeError) -> &'static str {
        match err {
            DecodeError::InvalidByte(..) => {
                "content is not valid base64: a character outside the base64 alphabet"
            }
            DecodeError::InvalidLength(_) => "content is not valid base64: wrong length",
            DecodeError::InvalidLastSymbol { .. } => {
                "content is not valid base64: the last character is wrong"
            }
            DecodeError::InvalidPadding => "content is not valid base64: wrong padding",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_and_its_parts_are_objects_not_arrays() {
        let parse =
            |json: &str| serde_json::from_str::<Object<JobRequest>>(json).map(Object::into_inner);
        assert!(parse(sample_json()).is_ok());
        for json in [
            r#"[null, null, "transactional", null, {"from": "a@example.com", "subject": "s"}]"#,
            r#"{"message": ["a@example.com", [], ["b@example.org"], [], [], "s", "t"]}"#,
            r#"{"message": {"from": "a@example.com", "subject": "s",
                "attachments": [["a.pdf", "application/pdf", "aGk="]]}}"#,
        ] {
            let err = parse(json).expect_err("an array where an object goes");
            assert!(err.to_string().contains("expected an object"), "{err}");
        }
    }

    fn sample_json() -> &'static str {
        r#"{
          "idempotency_key": "order-1042-receipt",
          "lane": "transactional",
          "expires_at": "2030-01-01T00:00:00Z",
          "message": {
            "from": "Shop <noreply@shop.example>",
            "to": ["Ada Lovelace <ada@example.org>"],
            "subject": "Your receipt",
            "text": "Thanks!",
            "attachments": [
              {"filename": "receipt.pdf", "content_type": "application/pdf", "content": "JVBERi0xLjQK"}
            ]
          }
        }"#
    }

    #[test]
    fn hand_written_request_parses() {
        let request: JobRequest = serde_json::from_str(sample_json()).expect("parses");
        assert_eq!(request.lane, Lane::Transactional);
        assert_eq!(request.message.attachments[0].content, b"%PDF-1.4\n");
        assert!(request.expires_at.is_some());
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = serde_json::from_str::<JobRequest>(
            r#"{"message": {"from": "a@b.example", "subject": "s", "too": ["x@y.example"]}}"#,
        )
        .expect_err("typo must not pass");
        assert!(err.to_string().contains("too"), "{err}");
    }

    #[test]
    fn bad_base64_is_rejected() {
        let err = serde_json::from_str::<Attachment>(
            r#"{"filename": "a.txt", "content_type": "text/plain", "content": "***"}"#,
        )
        .expect_err("not base64");
        assert!(err.to_string().contains("base64"), "{err}");
    }

    #[test]
    fn bad_base64_names_no_byte_and_no_offset() {
        let attachment = |content: &str| {
            let json = format!(
                r#"{{"filename": "a.txt", "content_type": "text/plain", "content": "{content}"}}"#
            );
            serde_json::from_str::<Attachment>(&json)
                .expect_err("not base64")
                .to_string()
        };
        // `!` is byte 33, at offset 14.
        let shown = attachment("JVBERi0xLjQKJV!x");
        assert!(
            shown.starts_with(
                "content is not valid base64: a character outside the base64 alphabet at line 1"
            ),
            "{shown}"
        );
        assert!(!shown.contains("33") && !shown.contains("14"), "{shown}");
        let shown = attachment("JVBERi0xLjQKJ");
        assert!(
            shown.starts_with("content is not valid base64: wrong length at"),
            "{shown}"
        );
    }

    #[test]
    fn a_name_given_twice_is_refused() {
        for (field, object) in [
            ("headers", r#"{"X-A": "1", "X-A": "2"}"#),
            (
                "metadata",
                r#"{"secret-key": "1", "b": "2", "secret-key": "3"}"#,
            ),
        ] {
            let json = format!(
                r#"{{"message": {{"from": "a@b.example", "subject": "s", "{field}": {object}}}}}"#
            );
            let err = serde_json::from_str::<JobRequest>(&json).expect_err("a name twice");
            let shown = err.to_string();
            assert!(
                shown.starts_with(&format!("a name appears twice in {field} at line 1")),
                "{shown}"
            );
            assert!(
                !shown.contains("secret") && !shown.contains("X-A"),
                "{shown}"
            );
        }
        // Different names, and maps left out, still parse.
        let request: JobRequest = serde_json::from_str(
            r#"{"message": {"from": "a@b.example", "subject": "s", "headers": {"X-A": "1", "X-B": "2"}}}"#,
        )
        .expect("distinct names");
        assert_eq!(request.message.headers.len(), 2);
        assert!(request.message.metadata.is_empty());
    }

    #[test]
    fn base64_with_stray_trailing_bits_is_taken() {
        // `QR==` is `QQ==` (the byte `A`) with bits set after the byte.
        let attachment = serde_json::from_str::<Attachment>(
            r#"{"filename": "a.txt", "content_type": "text/plain", "content": "QR=="}"#,
        )
        .expect("lenient about trailing bits");
        assert_eq!(attachment.content, b"A");
    }

    #[test]
    fn job_round_trips_through_json() {
        let request: JobRequest = serde_json::from_str(sample_json()).expect("parses");
        let job = SendJob::from_request(request, "acme");
        let json = serde_json::to_string(&job).expect("serializes");
        let back: SendJob = serde_json::from_str(&json).expect("parses back");
        assert_eq!(job, back);
        assert_eq!(back.id.as_uuid().get_version_num(), 7);
    }

    #[test]
    fn debug_hides_personal_data() {
        let request: JobRequest = serde_json::from_str(sample_json()).expect("parses");
        let shown = format!("{:?}", SendJob::from_request(request, "acme"));
        for secret in ["ada@example.org", "Your receipt", "Thanks!", "JVBER"] {
            assert!(!shown.contains(secret), "{secret} leaked in {shown}");
        }
    }

    #[test]
    fn dedup_key_falls_back_to_id() {
        let mut job = SendJob::from_request(JobRequest::default(), "acme");
        assert_eq!(job.dedup_key(), job.id.to_string());
        job.idempotency_key = Some("k".into());
        assert_eq!(job.dedup_key(), "k");
    }

    #[test]
    fn expiry_is_inclusive() {
        let mut job = SendJob::from_request(JobRequest::default(), "acme");
        let now = OffsetDateTime::now_utc();
        assert!(!job.is_expired_at(now));
        job.expires_at = Some(now);
        assert!(job.is_expired_at(now));
    }
}
