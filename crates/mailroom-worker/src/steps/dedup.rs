//! Step 5: the dedup claim, which makes sending exactly-once in effect.
//!
//! One key per (tenant, idempotency key or job id), stored as an HMAC under
//! `redis.hash_key` (the idempotency key may hold an address). Each change
//! is one atomic step: a script, a transaction, or a single `SET … GET`.
//! A claim finds one of these (a free key and a `sent` one through a
//! transaction of plain commands, the rest through the script):
//!
//! - absent (or released, or its lease ran out) → `sending`, owned by this
//!   delivery, for `worker.dedup_lease`;
//! - `sending` by another delivery → held: look again later;
//! - `sent` → a duplicate: ack without sending.
//!
//! After a 2xx the key becomes `sent` for `worker.dedup_window`; after a
//! failure it is released so the retry can claim it. A worker killed
//! mid-send leaves `sending` behind until its lease runs out; then the
//! redelivered job is claimed and sent again.
//!
//! That resend is a double when the worker died after the relay had the
//! whole message, before its reply. With `worker.on_uncertain = park`, a
//! *handed* marker (kept for the dedup window) is written just before the
//! end of DATA and cleared by every outcome; a claim that finds a dead
//! owner's marker turns the key `parked`. A parked key makes every copy of
//! the job uncertain (to be dead-lettered, not sent), except one an
//! operator replayed from the dead letters, which claims it. A marker
//! parks the key even for a replayed copy: it may be that copy's own
//! earlier delivery, killed after the relay had the message.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use mailroom_core::job::SendJob;
use mailroom_core::status::{PreparedStatus, RECORD_FN};
use mailroom_core::store::{KeyedHash, RedisStore, StoreError};
use redis::Script;

/// KEYS: dedup key, handed marker, status key. ARGV: our claim's value
/// (see [`ClaimToken::value`]), lease (ms), `1` for an operator's replay,
/// the dedup window (ms), then the `sending` status (JSON, state, TTL),
/// recorded only when the claim is taken. A claim that holds our own value
/// (a redelivery to this owner) is taken again. A replay may take a
/// `parked` key, never one with another owner's handed marker: that owner
/// died after handing the message over, and the replay itself may be the
/// one it was sending. Returns `{outcome, detail}`.
const CLAIM: &str = r"
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[1] then
  local state, rest = string.match(held, '^(%a+) (.*)$')
  if state == 'sent' then
    return { 'sent', rest }
  end
  if state == 'sending' then
    return { 'held', tostring(redis.call('PTTL', KEYS[1])) }
  end
  if state == 'parked' and ARGV[3] ~= '1' then
    return { 'uncertain', '' }
  end
end
local handed = redis.call('GET', KEYS[2])
if handed and handed ~= ARGV[1] then
  redis.call('DEL', KEYS[2])
  redis.call('SET', KEYS[1], 'parked ' .. handed, 'PX', ARGV[4])
  return { 'uncertain', '' }
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
record_status(KEYS[3], ARGV[5], ARGV[6], ARGV[7])
return { 'acquired', '' }
";

/// KEYS: dedup key (the handed marker, second, is not used). ARGV: our
/// claim's value, lease (ms). Returns 1 if the lease was ours and renewed.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// KEYS: dedup key, handed marker. ARGV: our claim's value, the dedup
/// window (ms). Writes the marker only while the claim is ours: once the
/// lease has passed to another delivery, that one may be sending too.
/// Returns 1 if written.
const HAND_OVER: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
";

/// KEYS: dedup key, handed marker. ARGV: our claim's value, then the dedup
/// window (ms) to park the key for, or nothing to delete it. Touches the
/// claim and the marker only where they are ours.
const RELEASE: &str = r"
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  if ARGV[2] then
    redis.call('SET', KEYS[1], 'parked ' .. ARGV[1], 'PX', ARGV[2])
    return 1
  end
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// What a claim found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// Ours: send.
    Acquired,
    /// Already sent, by the job named: do not send.
    AlreadySent {
        /// The job that was sent (may be this one, redelivered).
        job_id: String,
    },
    /// Another delivery is sending it now.
    HeldByOther {
        /// When its lease runs out, at the latest.
        retry_after: Duration,
    },
    /// A delivery handed the message to the relay and died before it knew
    /// the outcome, or the job was parked for that: it may have been sent.
    /// The key is `parked` now.
    Uncertain,
}

/// What marking a job sent found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MarkOutcome {
    /// The claim was ours; it is now `sent`.
    Marked,
    /// Our lease had run out (and maybe another delivery claimed it); the
    /// key is `sent` now all the same.
    LeaseLost,
    /// It was already `sent`.
    AlreadySent,
}

/// Who holds a claim: one delivery of one job, with the Redis keys it
/// touches, hashed once (see [`Dedup::token`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimToken {
    /// The dedup key.
    key: String,
    /// The handed marker beside it.
    handed: String,
    /// What the dedup key holds while this claim is held: `sending OWNER
    /// JOB` (a sent key holds `sent JOB`; owners and job ids hold no
    /// spaces).
    value: String,
    /// What the dedup key holds once the job is sent: `sent JOB`.
    sent: String,
}

/// What a delivery knows of its claim's lease while it sends: until when
/// the claim surely holds, or that it was lost. Counted from when the
/// claim (or the last renewal that took) was asked for, so a slow reply
/// shortens it rather than stretching it.
#[derive(Debug)]
pub struct Lease {
    length: Duration,
    /// `None` once Redis said the claim is no longer ours.
    until: Mutex<Option<Instant>>,
}

impl Lease {
    /// A claim of `length` asked for at `asked`, and taken.
    pub fn new(asked: Instant, length: Duration) -> Self {
        Self {
            length,
            until: Mutex::new(Some(asked + length)),
        }
    }

    /// A renewal asked for at `asked` took.
    pub fn renewed(&self, asked: Instant) {
        if let Some(until) = self.lock().as_mut() {
            *until = (*until).max(asked + self.length);
        }
    }

    /// Redis said the claim is no longer ours.
    pub fn lost(&self) {
        *self.lock() = None;
    }

    /// Whether the claim is surely still ours at `now`: not lost, and its
    /// last renewal (which may have failed since) has not run out.
    pub fn holds_at(&self, now: Instant) -> bool {
        self.lock().is_some_and(|until| now < until)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        // A plain value, valid after any panic.
        self.until.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct Scripts {
    claim: Script,
    renew: Script,
    hand_over: Script,
    release: Script,
}

/// Dedup claims in Redis.
#[derive(Clone)]
pub struct Dedup {
    store: RedisStore,
    hash: KeyedHash,
    window: Duration,
    lease: Duration,
    scripts: Arc<Scripts>,
}

impl Dedup {
    /// Claims under `store`'s prefix; keys hashed under `hash_key`; `sent`
    /// kept for `window`; a claim held for `lease` unless renewed.
    pub fn new(store: RedisStore, hash_key: &[u8], window: Duration, lease: Duration) -> Self {
        Self {
            store,
            hash: KeyedHash::new(hash_key),
            window,
            lease,
            scripts: Arc::new(Scripts {
                claim: Script::new(&format!("{RECORD_FN}{CLAIM}")),
                renew: Script::new(RENEW),
                hand_over: Script::new(HAND_OVER),
                release: Script::new(RELEASE),
            }),
        }
    }

    /// How long a `sent` mark is kept.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// How long a claim holds unless renewed.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// The token of `owner` (unique to one delivery) for `job`'s dedup key.
    pub fn token(&self, owner: &str, job: &SendJob) -> ClaimToken {
        let digest = self
            .hash
            .hex(&[b"dedup", job.tenant.as_bytes(), job.dedup_key().as_bytes()]);
        let key = self.store.key(&format!("claim:{digest}"));
        ClaimToken {
            handed: format!("{key}:handed"),
            key,
            value: format!("sending {owner} {}", job.id),
            sent: format!("sent {}", job.id),
        }
    }

    /// Notes that `token`'s delivery is about to hand the whole message to
    /// the relay: from here until an outcome clears it, a claim by another
    /// delivery is uncertain. `false` if the claim is no longer ours: the
    /// message must not be handed over.
    pub async fn hand_over(&self, token: &ClaimToken) -> Result<bool, StoreError> {
        let written: i64 = self
            .invoke(
                &self.scripts.hand_over,
                token,
                &[&token.value, &millis(self.window)],
                None,
            )
            .await?;
        Ok(written == 1)
    }

    /// Parks our claim after an uncertain outcome: until an operator
    /// replays the job, no copy of it is sent.
    pub async fn park(&self, token: &ClaimToken) -> Result<(), StoreError> {
        let _: i64 = self
            .invoke(
                &self.scripts.release,
                token,
                &[&token.value, &millis(self.window)],
                None,
            )
            .await?;
        Ok(())
    }

    /// Claims `token`'s key with plain commands where they suffice, as
    /// they do for nearly every delivery: one transaction, a fraction of
    /// the script's cost to Redis. A free key (nothing held, no handed
    /// marker beside it) is taken, without a status; a `sent` one is a
    /// duplicate. `None`: [`Dedup::claim`] decides. It may then find the
    /// key holding our own claim (taken here beside another's marker),
    /// which it treats as it would an absent one, so the two steps decide
    /// as the script alone.
    pub async fn claim_plain(&self, token: &ClaimToken) -> Result<Option<Claim>, StoreError> {
        // `SET … NX GET` would save the second `GET`, but needs Redis 7.
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("GET")
            .arg(&token.handed)
            .cmd("GET")
            .arg(&token.key)
            .cmd("SET")
            .arg(&token.key)
            .arg(&token.value)
            .arg("NX")
            .arg("PX")
            .arg(millis(self.lease))
            .ignore();
        let mut connection = self.store.connection();
        let (handed, held): (Option<String>, Option<String>) = pipe
            .query_async(&mut connection)
            .await
            .map_err(|err| self.store.error(&err))?;
        Ok(match (handed, held) {
            (None, None) => Some(Claim::Acquired),
            (_, Some(held)) => held.strip_prefix("sent ").map(|job_id| Claim::AlreadySent {
                job_id: job_id.to_owned(),
            }),
            (Some(_), None) => None,
        })
    }

    /// Claims `job` for `token`; once it is ours, records `sending` in the
    /// same step. A `replayed` delivery may claim a parked key.
    pub async fn claim(
        &self,
        token: &ClaimToken,
        replayed: bool,
        sending: &PreparedStatus,
    ) -> Result<Claim, StoreError> {
        let (outcome, detail): (String, String) = self
            .invoke(
                &self.scripts.claim,
                token,
                &[
                    &token.value,
                    &millis(self.lease),
                    if replayed { "1" } else { "0" },
                    &millis(self.window),
                ],
                Some(sending),
            )
            .await?;
        match outcome.as_str() {
            "acquired" => Ok(Claim::Acquired),
            "uncertain" => Ok(Claim::Uncertain),
            "sent" => Ok(Claim::AlreadySent { job_id: detail }),
            "held" => {
                // PTTL is -1 for a key without expiry, which the scripts
                // never leave; treat it as a full lease.
                let ms = detail
                    .parse::<u64>()
                    .map_or(self.lease, Duration::from_millis);
                Ok(Claim::HeldByOther { retry_after: ms })
            }
            other => Err(StoreError::Malformed(format!(
                "dedup claim answered {other:?}"
            ))),
        }
    }

    /// Extends our claim's lease; `false` if it is no longer ours.
    pub async fn renew(&self, token: &ClaimToken) -> Result<bool, StoreError> {
        let renewed: i64 = self
            .invoke(
                &self.scripts.renew,
                token,
                &[&token.value, &millis(self.lease)],
                None,
            )
            .await?;
        Ok(renewed == 1)
    }

    /// Marks `job` sent for the dedup window, and records the `sent`
    /// status in the same round trip. The mail has gone: the key becomes
    /// `sent` whatever it held, so nobody sends it again, and so does the
    /// status (no script needed: both are plain writes, and the key's old
    /// value says whether the claim was still ours). With `hand_over`, the
    /// handed marker is cleared too.
    pub async fn mark_sent(
        &self,
        token: &ClaimToken,
        sent: Option<&PreparedStatus>,
        hand_over: bool,
    ) -> Result<MarkOutcome, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(&token.key)
            .arg(&token.sent)
            .arg("PX")
            .arg(millis(self.window))
            .arg("GET");
        if hand_over {
            pipe.cmd("DEL").arg(&token.handed).ignore();
        }
        if let Some(status) = sent {
            pipe.add_command(status.set()).ignore();
        }
        let mut connection = self.store.connection();
        let (before,): (Option<String>,) = pipe
            .query_async(&mut connection)
            .await
            .map_err(|err| self.store.error(&err))?;
        Ok(match before {
            Some(held) if held == token.value => MarkOutcome::Marked,
            Some(held) if held.starts_with("sent ") => MarkOutcome::AlreadySent,
            _ => MarkOutcome::LeaseLost,
        })
    }

    /// Releases our claim, so a retry can take it at once.
    pub async fn release(&self, token: &ClaimToken) -> Result<(), StoreError> {
        let _: i64 = self
            .invoke(&self.scripts.release, token, &[&token.value], None)
            .await?;
        Ok(())
    }

    async fn invoke<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        token: &ClaimToken,
        args: &[&str],
        status: Option<&PreparedStatus>,
    ) -> Result<T, StoreError> {
        // Every script gets the dedup key and its handed marker, in that
        // order.
        let mut invocation = script.key(&token.key);
        invocation.key(&token.handed);
        for arg in args {
            invocation.arg(*arg);
        }
        if let Some(status) = status {
            invocation.key(status.key());
            for arg in status.args() {
                invocation.arg(arg);
            }
        }
        let mut connection = self.store.connection();
        invocation
            .invoke_async(&mut connection)
            .await
            .map_err(|err| self.store.error(&err))
    }
}

fn millis(duration: Duration) -> String {
    duration.as_millis().max(1).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_holds_until_it_runs_out_unless_renewed() {
        let asked = Instant::now();
        let lease = Lease::new(asked, Duration::from_secs(30));
        assert!(lease.holds_at(asked + Duration::from_secs(29)));
        // Renewals that failed change nothing: at its end it may be gone.
        assert!(!lease.holds_at(asked + Duration::from_secs(30)));
        lease.renewed(asked + Duration::from_secs(10));
        assert!(lease.holds_at(asked + Duration::from_secs(39)));
        assert!(!lease.holds_at(asked + Duration::from_secs(40)));
        // An older renewal never shortens it.
        lease.renewed(asked + Duration::from_secs(5));
        assert!(lease.holds_at(asked + Duration::from_secs(39)));
    }

    #[test]
    fn a_lost_lease_stays_lost() {
        let asked = Instant::now();
        let lease = Lease::new(asked, Duration::from_secs(30));
        lease.lost();
        assert!(!lease.holds_at(asked));
        lease.renewed(asked);
        assert!(!lease.holds_at(asked));
    }
}
