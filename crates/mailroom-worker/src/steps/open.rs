//! Step 2: open the seal. A body that does not open is dead-lettered with
//! reason `seal`; what it held is never logged.

use mailroom_core::job::{JobId, SendJob};
use mailroom_core::seal::Keyring;

use crate::incoming::Incoming;
use crate::verdict::{DeadReason, Verdict};

/// Opens the job an incoming message carries.
pub fn open(keyring: &Keyring, incoming: &Incoming) -> Result<SendJob, Verdict> {
    let refuse = |detail: &str| Verdict::DeadLetter {
        reason: DeadReason::Seal,
        detail: detail.to_owned(),
    };
    let kid = incoming
        .kid
        .as_deref()
        .ok_or_else(|| refuse("no mailroom-kid header, or not text"))?;
    let tenant = incoming
        .tenant
        .as_deref()
        .ok_or_else(|| refuse("no mailroom-tenant header, or not text"))?;
    let id: JobId = incoming
        .message_id
        .as_deref()
        .and_then(|id| id.parse().ok())
        .ok_or_else(|| refuse("message_id is not a job id"))?;
    let job = keyring
        .open(kid, &id, tenant, &incoming.body)
        .map_err(|err| refuse(&err.to_string()))?;
    // The seal binds id and tenant; a job claiming others inside was
    // sealed by someone who held a key and lied: refuse it the same way.
    if job.id != id || job.tenant != tenant {
        return Err(refuse("authentication failed"));
    }
    Ok(job)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::steps::tests::{incoming_for, sample_job};
    use mailroom_core::seal::SealKey;

    fn keyring() -> Keyring {
        Keyring::new(vec![SealKey::generate("k1").expect("kid")], None).expect("keyring")
    }

    fn reason(verdict: Verdict) -> String {
        match verdict {
            Verdict::DeadLetter { reason, detail } => format!("{reason}: {detail}"),
            other => panic!("expected a dead letter, got {other:?}"),
        }
    }

    #[test]
    fn opens_what_was_sealed() {
        let keyring = keyring();
        let job = sample_job();
        let incoming = incoming_for(&keyring, &job);
        assert_eq!(open(&keyring, &incoming).expect("opens"), job);
    }

    #[test]
    fn a_flipped_bit_is_a_seal_dead_letter() {
        let keyring = keyring();
        let mut incoming = incoming_for(&keyring, &sample_job());
        let last = incoming.body.len() - 1;
        incoming.body[last] ^= 1;
        assert_eq!(
            reason(open(&keyring, &incoming).expect_err("tampered")),
            "seal: authentication failed"
        );
    }

    #[test]
    fn another_tenant_or_id_does_not_open() {
        let keyring = keyring();
        let mut incoming = incoming_for(&keyring, &sample_job());
        incoming.tenant = Some("mallory".to_owned());
        assert!(reason(open(&keyring, &incoming).expect_err("moved")).starts_with("seal"));
        let mut incoming = incoming_for(&keyring, &sample_job());
        incoming.message_id = Some(JobId::new().to_string());
        assert!(reason(open(&keyring, &incoming).expect_err("moved")).starts_with("seal"));
    }

    #[test]
    fn missing_headers_and_unknown_keys_are_named() {
        let keyring = keyring();
        let mut incoming = incoming_for(&keyring, &sample_job());
        incoming.kid = None;
        assert_eq!(
            reason(open(&keyring, &incoming).expect_err("no kid")),
            "seal: no mailroom-kid header, or not text"
        );
        incoming.kid = Some("retired".to_owned());
        assert_eq!(
            reason(open(&keyring, &incoming).expect_err("unknown")),
            "seal: unknown kid"
        );
        incoming.kid = Some("k1".to_owned());
        incoming.message_id = Some("not-a-uuid".to_owned());
        assert_eq!(
            reason(open(&keyring, &incoming).expect_err("bad id")),
            "seal: message_id is not a job id"
        );
    }
}
