//! `Idempotency-Key`: the same key from the same tenant within
//! `api.idempotency_window` gets the first response again, across replicas
//! and when two identical requests race; another body under the same key
//! is refused.
//!
//! The first request takes the key atomically (`SET NX`) as *pending* with
//! a hash of its body, and stores its response when done; a request that
//! finds the key waits for that response (or is told the first is still in
//! progress). A response that says "try again" (5xx) is not stored: the key
//! is freed so the retry can do the work.

use std::time::{Duration, Instant};

use mailroom_core::offload;
use mailroom_core::store::{KeyedHash, RedisStore, StoreError};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// How long a racing request waits for the first one's response.
const WAIT_FOR_FIRST: Duration = Duration::from_secs(10);

/// A response kept for replay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    /// HTTP status.
    pub status: u16,
    /// JSON body.
    pub body: String,
}

#[derive(Serialize, Deserialize)]
struct Entry {
    request: String,
    response: Option<Stored>,
}

/// What taking a key found.
#[derive(Debug)]
pub enum Taken {
    /// Ours: do the work, then [`Idempotency::finish`] or
    /// [`Idempotency::abandon`].
    First(Slot),
    /// Done before, with the same request: replay this.
    Replay(Stored),
    /// Used before with another request.
    Mismatch,
    /// The first request is still at work.
    InProgress,
}

/// A key this request holds.
#[derive(Debug)]
pub struct Slot {
    key: String,
    request: String,
    /// The pending entry as stored, which [`Idempotency::keep_pending`]
    /// renews only while it is still there.
    pending: String,
}

/// Renews a pending entry's expiry if it is still the one given.
const RENEW_PENDING: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// Idempotency keys in Redis.
#[derive(Clone, Debug)]
pub struct Idempotency {
    store: RedisStore,
    hash: KeyedHash,
    window: Duration,
    pending: Duration,
}

impl Idempotency {
    /// Keys under `store`'s prefix, hashed under `hash_key` (an idempotency
    /// key may hold personal data), kept for `window` once answered. A key
    /// taken by a request that never answers (its process died, or it timed
    /// out) frees itself after `pending`.
    pub fn new(store: RedisStore, hash_key: &[u8], window: Duration, pending: Duration) -> Self {
        Self {
            store,
            hash: KeyedHash::new(hash_key),
            window,
            pending,
        }
    }

    /// Takes `key` of `tenant` for a request of `route` with `body`.
    pub async fn take(
        &self,
        tenant: &str,
        key: &str,
        route: &str,
        body: &[u8],
    ) -> Result<Taken, StoreError> {
        let redis_key = self.store.key(&format!(
            "idem:{}",
            self.hash
                .hex(&[b"idempotency", tenant.as_bytes(), key.as_bytes()])
        ));
        let request = offload::heavy(body.len(), || request_hash(route, body));
        let pending = serde_json::to_string(&Entry {
            request: request.clone(),
            response: None,
        })
        .map_err(|err| StoreError::Malformed(err.to_string()))?;
        let start = Instant::now();
        // The first request usually answers within milliseconds; a slow
        // one (the broker in trouble) should not have its waiters poll
        // Redis at full speed, so the pause doubles up to a quarter second.
        let mut pause = Duration::from_millis(10);
        loop {
            let mut connection = self.store.connection();
            let set: Option<String> = redis::cmd("SET")
                .arg(&redis_key)
                .arg(&pending)
                .arg("NX")
                .arg("PX")
                .arg(millis(self.pending))
                .query_async(&mut connection)
                .await
                .map_err(|err| self.store.error(&err))?;
            if set.is_some() {
                return Ok(Taken::First(Slot {
                    key: redis_key,
                    request,
                    pending,
                }));
            }
            let existing: Option<String> = redis::cmd("GET")
                .arg(&redis_key)
                .query_async(&mut connection)
                .await
                .map_err(|err| self.store.error(&err))?;
            // Freed between the two commands: take it again.
            let Some(existing) = existing else { continue };
            let entry: Entry = serde_json::from_str(&existing)
                .map_err(|err| StoreError::Malformed(err.to_string()))?;
            if entry.request != request {
                return Ok(Taken::Mismatch);
            }
            if let Some(response) = entry.response {
                return Ok(Taken::Replay(response));
            }
            if start.elapsed() > WAIT_FOR_FIRST {
                return Ok(Taken::InProgress);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(250));
        }
    }

    /// Keeps `slot` pending for as long as this runs (it never ends: run
    /// it beside the work). A request's work may outlast the pending time
    /// (a publish waiting out a broker reconnect): without this the key
    /// would free itself, and a retry would enqueue the job again.
    pub async fn keep_pending(&self, slot: &Slot) -> std::convert::Infallible {
        let script = redis::Script::new(RENEW_PENDING);
        loop {
            tokio::time::sleep(self.pending / 3).await;
            let mut connection = self.store.connection();
            let renewed = script
                .key(&slot.key)
                .arg(&slot.pending)
                .arg(millis(self.pending))
                .invoke_async::<i64>(&mut connection)
                .await;
            if let Err(err) = renewed {
                tracing::warn!(error = %self.store.error(&err), "idempotency key not renewed");
            }
        }
    }

    /// Stores the response of the request holding `slot`.
    pub async fn finish(&self, slot: Slot, response: Stored) -> Result<(), StoreError> {
        let entry = serde_json::to_string(&Entry {
            request: slot.request,
            response: Some(response),
        })
        .map_err(|err| StoreError::Malformed(err.to_string()))?;
        let mut connection = self.store.connection();
        redis::cmd("SET")
            .arg(&slot.key)
            .arg(entry)
            .arg("PX")
            .arg(millis(self.window))
            .query_async::<()>(&mut connection)
            .await
            .map_err(|err| self.store.error(&err))
    }

    /// Frees `slot`: the request did nothing a retry should not redo.
    pub async fn abandon(&self, slot: Slot) -> Result<(), StoreError> {
        let mut connection = self.store.connection();
        redis::cmd("DEL")
            .arg(&slot.key)
            .query_async::<()>(&mut connection)
            .await
            .map_err(|err| self.store.error(&err))
    }
}

fn request_hash(route: &str, body: &[u8]) -> String {
    let mut digest = Sha256::new();
    digest.update(route.as_bytes());
    digest.update([0]);
    digest.update(body);
    hex::encode(digest.finalize())
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pending key outlives its pending time while its work runs, and
    /// frees itself once nothing renews it (its process died).
    #[tokio::test]
    async fn a_pending_key_is_kept_while_its_work_runs() {
        let prefix = mailroom_tests::redis::TestPrefix::new("idem-renew");
        let store = RedisStore::connect(&prefix.settings())
            .await
            .expect("redis");
        let pending = Duration::from_millis(300);
        let idempotency = Idempotency::new(store, b"key", Duration::from_mins(1), pending);
        let Ok(Taken::First(slot)) = idempotency.take("t", "k", "send", b"1").await else {
            panic!("a fresh key is ours");
        };
        let renewing = idempotency.keep_pending(&slot);
        let _ = tokio::time::timeout(pending * 3, renewing).await;
        let other = idempotency.take("t", "k", "send", b"2").await;
        assert!(
            matches!(other, Ok(Taken::Mismatch)),
            "still held: {other:?}"
        );
        tokio::time::sleep(pending * 2).await;
        let freed = idempotency.take("t", "k", "send", b"2").await;
        assert!(matches!(freed, Ok(Taken::First(_))), "freed: {freed:?}");
    }
}
