use proptest::prelude::*;

use super::*;
use crate::job::{Attachment, EmailMessage, JobRequest, Lane};

fn ring(kids: &[&str], active: &str) -> Keyring {
    Keyring::new(
        kids.iter()
            .map(|kid| SealKey::generate(kid).expect("valid kid")),
        Some(active),
    )
    .expect("keyring")
}

fn job() -> SendJob {
    SendJob::from_request(
        JobRequest {
            message: EmailMessage {
                from: "noreply@shop.example".into(),
                to: vec!["ada@example.org".into()],
                subject: "Your receipt".into(),
                text: Some("Thanks!".into()),
                ..EmailMessage::default()
            },
            ..JobRequest::default()
        },
        "acme",
    )
}

fn open(ring: &Keyring, job: &SendJob, sealed: &Sealed) -> Result<SendJob, SealError> {
    ring.open(&sealed.kid, &job.id, &job.tenant, &sealed.body)
}

#[test]
fn round_trip() {
    let ring = ring(&["k1"], "k1");
    let job = job();
    let sealed = ring.seal(&job).expect("seals");
    assert_eq!(sealed.kid, "k1");
    assert_eq!(open(&ring, &job, &sealed), Ok(job));
}

#[test]
fn ciphertext_hides_the_message() {
    let ring = ring(&["k1"], "k1");
    let sealed = ring.seal(&job()).expect("seals");
    let text = String::from_utf8_lossy(&sealed.body);
    assert!(!text.contains("ada@example.org") && !text.contains("receipt"));
}

#[test]
fn nonces_are_fresh() {
    let ring = ring(&["k1"], "k1");
    let job = job();
    let a = ring.seal(&job).expect("seals");
    let b = ring.seal(&job).expect("seals");
    assert_ne!(a.body[1..HEADER_LEN], b.body[1..HEADER_LEN]);
}

#[test]
fn flipping_any_bit_fails() {
    let ring = ring(&["k1"], "k1");
    let job = job();
    let sealed = ring.seal(&job).expect("seals");
    for byte in 0..sealed.body.len() {
        for bit in 0..8 {
            let mut tampered = sealed.clone();
            tampered.body[byte] ^= 1 << bit;
            let err = open(&ring, &job, &tampered).expect_err("tampered body opened");
            // The version byte fails as malformed, everything else as forged.
            let expected = if byte == 0 {
                SealError::Malformed
            } else {
                SealError::Authentication
            };
            assert_eq!(err, expected, "byte {byte} bit {bit}");
        }
    }
}

#[test]
fn truncated_body_is_malformed() {
    let ring = ring(&["k1"], "k1");
    let job = job();
    let sealed = ring.seal(&job).expect("seals");
    for len in [0, 1, HEADER_LEN, HEADER_LEN + TAG_LEN - 1] {
        assert_eq!(
            ring.open("k1", &job.id, &job.tenant, &sealed.body[..len]),
            Err(SealError::Malformed)
        );
    }
    let cut = sealed.body.len() - 1;
    assert_eq!(
        ring.open("k1", &job.id, &job.tenant, &sealed.body[..cut]),
        Err(SealError::Authentication)
    );
}

#[test]
fn other_job_id_or_tenant_fails() {
    let ring = ring(&["k1"], "k1");
    let job = job();
    let sealed = ring.seal(&job).expect("seals");
    let other_id = JobId::new();
    assert_eq!(
        ring.open("k1", &other_id, &job.tenant, &sealed.body),
        Err(SealError::Authentication)
    );
    assert_eq!(
        ring.open("k1", &job.id, "evil", &sealed.body),
        Err(SealError::Authentication)
    );
}

#[test]
fn other_kid_with_same_material_fails() {
    let key = SealKey::generate("k1").expect("valid kid");
    let line = key.to_line().replacen("k1", "k2", 1);
    let ring = Keyring::load(
        Some(&format!("{},{line}", key.to_line().as_str())),
        None,
        Some("k1"),
    )
    .expect("keyring");
    let job = job();
    let sealed = ring.seal(&job).expect("seals");
    assert_eq!(
        ring.open("k2", &job.id, &job.tenant, &sealed.body),
        Err(SealError::Authentication)
    );
}

#[test]
fn rotation_keeps_old_jobs_and_retiring_drops_them() {
    let old = SealKey::generate("k2025").expect("valid kid");
    let new = SealKey::generate("k2026").expect("valid kid");
    let before = Keyring::new([old.clone()], None).expect("keyring");
    let job = job();
    let sealed_old = before.seal(&job).expect("seals");

    let during = Keyring::new([old, new.clone()], Some("k2026")).expect("keyring");
    assert_eq!(open(&during, &job, &sealed_old), Ok(job.clone()));
    let sealed_new = during.seal(&job).expect("seals");
    assert_eq!(sealed_new.kid, "k2026");

    let after = Keyring::new([new], None).expect("keyring");
    assert_eq!(open(&after, &job, &sealed_new), Ok(job.clone()));
    assert_eq!(open(&after, &job, &sealed_old), Err(SealError::UnknownKid));
}

#[test]
fn the_body_is_written_where_it_was_allocated() {
    // A buffer that grew would have left a plaintext copy behind.
    let ring = ring(&["k1"], "k1");
    for (text, encoder) in [
        ("\u{1}".repeat(2000), Encoder::Sonic),
        ("a".repeat(100_000), Encoder::SerdeJson),
    ] {
        let mut job = job();
        job.message.text = Some(text);
        job.message.to = (0..50).map(|i| format!("r{i}@example.org")).collect();
        assert_eq!(Encoder::of(&job), encoder);
        let mut body = Vec::with_capacity(encoder.room(&job));
        let (capacity, at) = (body.capacity(), body.as_ptr());
        ring.seal_into(&job, encoder, &mut body).expect("seals");
        assert_eq!((body.capacity(), body.as_ptr()), (capacity, at));
        let sealed = Sealed {
            kid: "k1".into(),
            body,
        };
        assert_eq!(open(&ring, &job, &sealed), Ok(job));
    }
}

#[test]
fn the_scratch_holds_only_ciphertext() {
    let ring = ring(&["k1"], "k1");
    let mut job = job();
    job.message.text = Some("one-time code 481516 ".repeat(100));
    let sealed = ring.seal(&job).expect("seals");
    SCRATCH.with_borrow(|scratch| {
        assert_eq!(scratch[..], sealed.body[..]);
        assert!(!scratch.windows(6).any(|w| w == b"481516"));
    });
    assert_eq!(sealed.body.capacity(), sealed.body.len());
    assert_eq!(open(&ring, &job, &sealed), Ok(job));
}

#[test]
fn errors_say_no_more_than_what_failed() {
    for (err, text) in [
        (SealError::UnknownKid, "unknown kid"),
        (SealError::Malformed, "malformed envelope"),
        (SealError::Authentication, "authentication failed"),
    ] {
        assert_eq!(err.to_string(), text);
    }
}

/// Any characters, controls, quotes and backslashes included: the body is
/// written by one JSON encoder and read by another.
fn arb_text() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            any::<char>(),
            proptest::sample::select(vec![
                '"', '\\', '\n', '\r', '\t', '\u{0}', '\u{1f}', '\u{7f}', '\u{2028}'
            ]),
        ],
        // Past the encoders' 16- and 32-byte blocks.
        0..100,
    )
    .prop_map(String::from_iter)
}

prop_compose! {
    fn arb_job()(
        tenant in "[a-z0-9._-]{1,20}",
        key in proptest::option::of(arb_text()),
        subject in arb_text(),
        text in proptest::option::of(arb_text()),
        html in proptest::option::of(arb_text()),
        to in proptest::collection::vec(arb_text(), 0..4),
        bulk in any::<bool>(),
        content in proptest::collection::vec(any::<u8>(), 0..256),
    ) -> SendJob {
        let mut job = SendJob::from_request(JobRequest {
            idempotency_key: key,
            lane: if bulk { Lane::Bulk } else { Lane::Transactional },
            message: EmailMessage {
                from: "a@b.example".into(),
                to,
                subject,
                text,
                html,
                attachments: vec![Attachment {
                    filename: "f.bin".into(),
                    content_type: "application/octet-stream".into(),
                    content,
                }],
                ..EmailMessage::default()
            },
            ..JobRequest::default()
        }, tenant);
        // Timestamps travel as RFC 3339, which keeps nanoseconds: no loss.
        job.expires_at = Some(job.created_at + time::Duration::minutes(10));
        job
    }
}

proptest! {
    #[test]
    fn any_job_round_trips(job in arb_job()) {
        let ring = ring(&["k1", "k2"], "k2");
        let sealed = ring.seal(&job).expect("seals");
        prop_assert_eq!(open(&ring, &job, &sealed), Ok(job));
    }

    #[test]
    fn sealed_json_is_serde_jsons(job in arb_job()) {
        // Sealing writes with sonic-rs for speed; the wire stays serde_json's.
        let sonic = sonic_rs::to_vec(&job).expect("sonic-rs encodes");
        let serde = serde_json::to_vec(&job).expect("serde_json encodes");
        prop_assert_eq!(String::from_utf8_lossy(&sonic), String::from_utf8_lossy(&serde));
    }

    #[test]
    fn any_garbage_fails_cleanly(body in proptest::collection::vec(any::<u8>(), 0..200)) {
        let ring = ring(&["k1"], "k1");
        let job = job();
        prop_assert!(ring.open("k1", &job.id, &job.tenant, &body).is_err());
    }
}
