//! Sealing: jobs are encrypted by the producer and opened only by a worker,
//! so RabbitMQ, its disk and its management UI see only ciphertext.
//!
//! XChaCha20-Poly1305 with a fresh 24-byte random nonce per job (random
//! 96-bit nonces, as in AES-GCM, wear out near 2^32 messages a key). The
//! associated data binds the ciphertext to the schema version, the key id,
//! the job id and the tenant, so a body moved to another message or tenant
//! does not open.
//!
//! Body layout: `version (1 byte) | nonce (24) | ciphertext | tag (16)`.

mod keyring;
mod xchacha;

use xchacha::{NONCE_LEN, TAG_LEN};
use zeroize::{Zeroize as _, Zeroizing};

pub use keyring::{KEY_LEN, Keyring, KeyringError, SealKey};

use crate::job::{JobId, SCHEMA_VERSION, SendJob};

const HEADER_LEN: usize = 1 + NONCE_LEN;

/// Jobs up to this size are written with sonic-rs, whose worst-case
/// reservation (6 bytes a character) is then at most a few hundred KiB;
/// larger ones with serde_json, into a buffer of about their size.
const SONIC_MAX: usize = 64 * 1024;

/// Why a body did not open. Deliberately says no more than which of three
/// things went wrong: details would help an attacker, not an operator.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    /// The body names a key this keyring does not hold (retired, or never ours).
    #[error("unknown kid")]
    UnknownKid,
    /// The body is not a sealed job of a version we read.
    #[error("malformed envelope")]
    Malformed,
    /// The body, or its context (kid, job id, tenant), was altered.
    #[error("authentication failed")]
    Authentication,
    /// The job could not be encoded for sealing.
    #[error("job could not be encoded")]
    Encode,
}

/// A sealed job: the body and the id of the key that sealed it, which
/// travels beside it in the `mailroom-kid` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sealed {
    /// Id of the sealing key.
    pub kid: String,
    /// `version | nonce | ciphertext | tag`.
    pub body: Vec<u8>,
}

/// Associated data: what the ciphertext is bound to. Every variable-length
/// part is length-prefixed, so no two contexts encode alike.
fn associated_data(version: u8, kid: &str, id: &JobId, tenant: &str) -> Vec<u8> {
    let mut ad = Vec::with_capacity(32 + kid.len() + tenant.len());
    ad.extend_from_slice(b"mailroom-seal\0");
    ad.push(version);
    for part in [kid.as_bytes(), id.as_uuid().as_bytes(), tenant.as_bytes()] {
        // Parts are bounded by validation far below u32::MAX.
        ad.extend_from_slice(&u32::try_from(part.len()).unwrap_or(u32::MAX).to_be_bytes());
        ad.extend_from_slice(part);
    }
    ad
}

thread_local! {
    /// Where jobs up to `SONIC_MAX` are written and sealed, then copied
    /// out at their size: the room sonic-rs wants (6 bytes a character) is
    /// a large allocation each seal would otherwise make and free. Between
    /// seals it holds only ciphertext, as it is encrypted in place.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// How a job is written. Both write the same JSON, and the worker reads it
/// with serde_json; sonic-rs escapes text with SIMD, about 4x faster, which
/// is most of a producer's own CPU a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Encoder {
    /// Jobs up to `SONIC_MAX`.
    Sonic,
    /// Larger ones, into a buffer of about their size.
    SerdeJson,
}

impl Encoder {
    fn of(job: &SendJob) -> Self {
        if job.message.size() <= SONIC_MAX {
            Self::Sonic
        } else {
            Self::SerdeJson
        }
    }

    /// The room `seal_into` needs for `job`, so it never grows its buffer.
    fn room(self, job: &SendJob) -> usize {
        // JSON escapes (quotes, line breaks) grow a text a little.
        let hint = job.message.written_len_hint(8);
        let hint = match self {
            // sonic-rs reserves room for every character of a string
            // escaped (6 bytes each) before it writes one.
            Self::Sonic => hint.saturating_mul(6),
            Self::SerdeJson => hint,
        };
        HEADER_LEN + hint + TAG_LEN
    }
}

impl Keyring {
    /// Seals `job` under the active key.
    pub fn seal(&self, job: &SendJob) -> Result<Sealed, SealError> {
        let encoder = Encoder::of(job);
        let room = encoder.room(job);
        match encoder {
            Encoder::Sonic => SCRATCH.with_borrow_mut(|scratch| {
                scratch.clear();
                scratch.reserve(room);
                let kid = self.seal_into(job, encoder, scratch)?.to_owned();
                Ok(Sealed {
                    kid,
                    // A clone is allocated at its length, not the scratch's room.
                    body: scratch.clone(),
                })
            }),
            Encoder::SerdeJson => {
                let mut body = Vec::with_capacity(room);
                let kid = self.seal_into(job, encoder, &mut body)?.to_owned();
                Ok(Sealed { kid, body })
            }
        }
    }

    /// Appends `job` sealed to `body`, which has `encoder.room(job)` to
    /// spare: the job is encoded straight into it and encrypted where it
    /// lies, so no plaintext copy is left behind by a buffer that grew and
    /// moved. Returns the id of the key that sealed it.
    fn seal_into(
        &self,
        job: &SendJob,
        encoder: Encoder,
        body: &mut Vec<u8>,
    ) -> Result<&str, SealError> {
        let version = u8::try_from(job.schema).map_err(|_| SealError::Encode)?;
        let key = self.active();
        // From the thread's CSPRNG (ChaCha, reseeded from the OS): a
        // system call a job would cost more than the sealing itself.
        let mut nonce = [0u8; NONCE_LEN];
        rand::fill(&mut nonce[..]);
        let ad = associated_data(version, key.kid(), &job.id, &job.tenant);
        let start = body.len();
        body.push(version);
        body.extend_from_slice(&nonce);
        let written = match encoder {
            Encoder::Sonic => sonic_rs::to_writer(&mut *body, job).is_ok(),
            Encoder::SerdeJson => serde_json::to_writer(&mut *body, job).is_ok(),
        };
        let tag = if written {
            xchacha::seal(key.bytes(), &nonce, &ad, &mut body[start + HEADER_LEN..])
        } else {
            None
        };
        let Some(tag) = tag else {
            body[start..].zeroize();
            body.truncate(start);
            return Err(SealError::Encode);
        };
        body.extend_from_slice(&tag);
        Ok(key.kid())
    }

    /// Opens a body sealed for job `id` of `tenant` under key `kid`.
    pub fn open(
        &self,
        kid: &str,
        id: &JobId,
        tenant: &str,
        body: &[u8],
    ) -> Result<SendJob, SealError> {
        let key = self.get(kid).ok_or(SealError::UnknownKid)?;
        if body.len() < HEADER_LEN + TAG_LEN {
            return Err(SealError::Malformed);
        }
        let version = body[0];
        if u16::from(version) != SCHEMA_VERSION {
            return Err(SealError::Malformed);
        }
        let nonce: [u8; NONCE_LEN] = body[1..HEADER_LEN]
            .try_into()
            .map_err(|_| SealError::Malformed)?;
        let ad = associated_data(version, kid, id, tenant);
        let mut opened = Zeroizing::new(body[HEADER_LEN..].to_vec());
        let plaintext = xchacha::open(key.bytes(), &nonce, &ad, &mut opened)
            .ok_or(SealError::Authentication)?;
        let job: SendJob = serde_json::from_slice(plaintext).map_err(|_| SealError::Malformed)?;
        // Authenticated, so ours; a mismatch here means a producer bug.
        if job.id != *id || job.tenant != tenant || job.schema != SCHEMA_VERSION {
            return Err(SealError::Malformed);
        }
        Ok(job)
    }
}

#[cfg(test)]
mod tests;
