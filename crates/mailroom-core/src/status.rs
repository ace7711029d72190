//! What became of each job, kept in Redis for a retention window and read by
//! `mailroom status` and the API. A status holds no body and no address in
//! clear: recipients are masked, errors redacted.
//!
//! States move `queued` → `sending` → `sent` | `retrying` | `failed` | `dead`
//! | `duplicate` | `suppressed` | `expired`; `retrying` goes back to
//! `sending`. A worker may skip `sending` for a send that is over quickly
//! (see the worker's pipeline). A final state stays, so a late or
//! duplicate delivery of the same job cannot turn `sent` into `duplicate`;
//! only an operator's replay ([`StatusStore::requeue`]) moves `failed`,
//! `dead` or `expired` back to `queued`. `queued` is written only where
//! there is no status yet (the API writes it on acceptance, and a fast
//! worker may have been quicker). The check and the write are one Redis
//! script, so racing writers cannot interleave them.

use std::fmt;
use std::time::Duration;

use redis::Script;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::job::{JobId, SendJob};
use crate::store::{RedisStore, StoreError};
use crate::telemetry::{mask_email, redact_error};
use crate::validate::parse_mailbox;

/// Where a job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Enqueued (or replayed), not yet picked up.
    Queued,
    /// A worker claimed it and is delivering it.
    Sending,
    /// The relay accepted it.
    Sent,
    /// A transient failure; another attempt is scheduled.
    Retrying,
    /// Rejected for good, or out of attempts or age.
    Failed,
    /// Dead-lettered for a reason other than delivery (seal, invalid,
    /// uncertain outcome).
    Dead,
    /// Its dedup key was already sent: not sent again.
    Duplicate,
    /// A recipient is on the suppression list.
    Suppressed,
    /// It expired before it could be sent.
    Expired,
}

impl JobState {
    /// The state's name, as stored and printed.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Sending => "sending",
            Self::Sent => "sent",
            Self::Retrying => "retrying",
            Self::Failed => "failed",
            Self::Dead => "dead",
            Self::Duplicate => "duplicate",
            Self::Suppressed => "suppressed",
            Self::Expired => "expired",
        }
    }

    /// Whether nothing more will happen to the job on its own.
    pub fn is_final(self) -> bool {
        !matches!(self, Self::Queued | Self::Sending | Self::Retrying)
    }

    /// Whether a job in this state may move to `next`.
    pub fn may_become(self, next: Self) -> bool {
        if next == Self::Queued {
            // A replay; a first `queued` is written only where no status is.
            return matches!(self, Self::Failed | Self::Dead | Self::Expired);
        }
        !self.is_final()
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A job's status as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStatus {
    /// The job.
    pub job_id: JobId,
    /// Its tenant: only that tenant may read the status through the API.
    pub tenant: String,
    /// Where it is.
    pub state: JobState,
    /// Attempts made so far (the current one included).
    pub attempts: u32,
    /// Recipients, masked (`a***@example.org`).
    pub recipients: Vec<String>,
    /// When the job was created.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When this status was written.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    /// The last error, addresses masked, cut short.
    pub last_error: Option<String>,
    /// Why it was dead-lettered, when it was.
    pub reason: Option<String>,
}

/// A change of status, built from the job it concerns.
#[derive(Clone, Debug)]
pub struct StatusUpdate {
    status: JobStatus,
}

impl StatusUpdate {
    /// `job` is now in `state`.
    pub fn new(job: &SendJob, state: JobState) -> Self {
        let recipients = job
            .message
            .recipients()
            .map(|r| {
                parse_mailbox(r).map_or_else(|_| "***".to_owned(), |m| mask_email(m.email.as_ref()))
            })
            .collect();
        Self {
            status: JobStatus {
                job_id: job.id,
                tenant: job.tenant.clone(),
                state,
                attempts: 0,
                recipients,
                created_at: job.created_at,
                updated_at: OffsetDateTime::now_utc(),
                last_error: None,
                reason: None,
            },
        }
    }

    /// Attempts made so far.
    #[must_use]
    pub fn attempts(mut self, attempts: u32) -> Self {
        self.status.attempts = attempts;
        self
    }

    /// The last error (redacted here).
    #[must_use]
    pub fn error(mut self, error: &str) -> Self {
        self.status.last_error = Some(redact_error(error));
        self
    }

    /// The dead-letter reason.
    #[must_use]
    pub fn reason(mut self, reason: &str) -> Self {
        self.status.reason = Some(reason.to_owned());
        self
    }

    /// The status this update writes.
    pub fn status(&self) -> &JobStatus {
        &self.status
    }
}

/// Lua function `record_status(key, json, state, ttl)`: writes a status
/// unless the stored one may not become it; 1 if written. Shared by
/// [`StatusStore::record`] and the worker's dedup scripts, which record a
/// status in the same step as the claim it goes with.
///
/// The stored state is read with a pattern, not `cjson`: serde writes the
/// `state` key once, and inside a JSON string every `"` is escaped, so no
/// other text can match `"state":"`.
pub const RECORD_FN: &str = r#"
local function record_status(key, json, state, ttl)
  local current = redis.call('GET', key)
  if current then
    -- `queued` is written once, on acceptance; a worker may have moved on
    -- already, and a replay comes through `requeue`.
    if state == 'queued' then return 0 end
    local old = string.match(current, '"state":"(%a+)"')
    local final = { sent = true, failed = true, dead = true, duplicate = true,
                    suppressed = true, expired = true }
    if final[old] then return 0 end
  end
  redis.call('SET', key, json, 'EX', ttl)
  return 1
end
"#;

/// Moves a final failed/dead/expired status back to `queued` (a replay).
/// ARGV: the time of the change (RFC 3339). Returns `{before, after}` (the
/// JSON replaced and written), or `false` if nothing changed.
const REQUEUE: &str = r"
local current = redis.call('GET', KEYS[1])
if not current then return false end
local status = cjson.decode(current)
if status.state ~= 'failed' and status.state ~= 'dead' and status.state ~= 'expired' then
  return false
end
status.state = 'queued'
status.updated_at = ARGV[1]
status.attempts = 0
local written = cjson.encode(status)
redis.call('SET', KEYS[1], written, 'KEEPTTL')
return { current, written }
";

/// Undoes a [`REQUEUE`] whose replay failed, if nothing changed the status
/// since. ARGV: the JSON it replaced, the JSON it wrote.
const RESTORE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[2] then
  redis.call('SET', KEYS[1], ARGV[1], 'KEEPTTL')
  return 1
end
return 0
";

/// A status [`StatusStore::requeue`] moved back to `queued`, to restore if
/// the replay does not happen.
#[derive(Clone, Debug)]
pub struct Requeued {
    id: JobId,
    before: String,
    after: String,
}

/// Job statuses in Redis.
#[derive(Clone, Debug)]
pub struct StatusStore {
    store: RedisStore,
    retention: Duration,
    script: std::sync::Arc<Script>,
}

/// A status write made ready for a script that records it along with
/// something else (see [`RECORD_FN`]).
#[derive(Clone, Debug)]
pub struct PreparedStatus {
    key: String,
    args: [String; 3],
}

impl PreparedStatus {
    /// The status key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// `record_status`'s arguments after the key: JSON, state, TTL (s).
    pub fn args(&self) -> &[String; 3] {
        &self.args
    }

    /// `SET key json EX ttl`: the status written whatever is stored (add
    /// `NX` to write it only where none is).
    pub fn set(&self) -> redis::Cmd {
        let [json, _, ttl] = &self.args;
        let mut set = redis::cmd("SET");
        set.arg(&self.key).arg(json).arg("EX").arg(ttl);
        set
    }
}

impl StatusStore {
    /// Statuses under `store`'s prefix, each kept for `retention` after its
    /// last change.
    pub fn new(store: RedisStore, retention: Duration) -> Self {
        Self {
            store,
            retention,
            script: std::sync::Arc::new(Script::new(&format!(
                "{RECORD_FN}\nreturn record_status(KEYS[1], ARGV[1], ARGV[2], ARGV[3])"
            ))),
        }
    }

    fn key(&self, id: &JobId) -> String {
        self.store.key(&format!("status:{id}"))
    }

    /// Records a first `queued` status, where none is kept yet (one plain
    /// `SET NX`: the API writes it on every acceptance).
    pub async fn record_queued(&self, update: &StatusUpdate) -> Result<bool, StoreError> {
        let mut connection = self.store.connection();
        let set: Option<String> = self
            .prepare(update)?
            .set()
            .arg("NX")
            .query_async(&mut connection)
            .await
            .map_err(|err| self.store.error(&err))?;
        Ok(set.is_some())
    }

    /// [`StatusStore::record_queued`] for many jobs in one round trip.
    pub async fn record_queued_all(&self, updates: &[StatusUpdate]) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        for update in updates {
            pipe.add_command(self.prepare(update)?.set().arg("NX").to_owned())
                .ignore();
        }
        let mut connection = self.store.connection();
        pipe.query_async::<()>(&mut connection)
            .await
            .map_err(|err| self.store.error(&err))
    }

    /// `update` as the key and arguments of `record_status`.
    pub fn prepare(&self, update: &StatusUpdate) -> Result<PreparedStatus, StoreError> {
        let json = serde_json::to_string(&update.status)
            .map_err(|err| StoreError::Malformed(err.to_string()))?;
        Ok(PreparedStatus {
            key: self.key(&update.status.job_id),
            args: [
                json,
                update.status.state.as_str().to_owned(),
                self.retention.as_secs().max(1).to_string(),
            ],
        })
    }

    /// Records `update`; returns whether it was written (`false` when the
    /// stored state is final and may not become the new one).
    pub async fn record(&self, update: &StatusUpdate) -> Result<bool, StoreError> {
        let prepared = self.prepare(update)?;
        let mut invocation = self.script.key(&prepared.key);
        for arg in &prepared.args {
            invocation.arg(arg);
        }
        let mut connection = self.store.connection();
        let written: i64 = invocation
            .invoke_async(&mut connection)
            .await
            .map_err(|err| self.store.error(&err))?;
        Ok(written == 1)
    }

    /// Marks `id` queued again for an operator's replay of its dead letter;
    /// `None` if it has no failed, dead or expired status. Called before the
    /// job is published again, so whatever a worker records of the replay
    /// comes after it.
    pub async fn requeue(&self, id: &JobId) -> Result<Option<Requeued>, StoreError> {
        let now = OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .map_err(|err| StoreError::Malformed(err.to_string()))?;
        let mut connection = self.store.connection();
        let changed: Option<(String, String)> = Script::new(REQUEUE)
            .key(self.key(id))
            .arg(now)
            .invoke_async(&mut connection)
            .await
            .map_err(|err| self.store.error(&err))?;
        Ok(changed.map(|(before, after)| Requeued {
            id: *id,
            before,
            after,
        }))
    }

    /// Puts back the status `requeued` replaced, unless it changed since;
    /// for a replay that was not published.
    pub async fn restore(&self, requeued: &Requeued) -> Result<bool, StoreError> {
        let mut connection = self.store.connection();
        let restored: i64 = Script::new(RESTORE)
            .key(self.key(&requeued.id))
            .arg(&requeued.before)
            .arg(&requeued.after)
            .invoke_async(&mut connection)
            .await
            .map_err(|err| self.store.error(&err))?;
        Ok(restored == 1)
    }

    /// The status of `id`, if one is kept.
    pub async fn get(&self, id: &JobId) -> Result<Option<JobStatus>, StoreError> {
        let mut connection = self.store.connection();
        let json: Option<String> = redis::cmd("GET")
            .arg(self.key(id))
            .query_async(&mut connection)
            .await
            .map_err(|err| self.store.error(&err))?;
        json.map(|json| {
            serde_json::from_str(&json).map_err(|err| StoreError::Malformed(err.to_string()))
        })
        .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{EmailMessage, JobRequest};

    #[test]
    fn final_states_stay_except_for_a_replay() {
        use JobState::*;
        assert!(Queued.may_become(Sending));
        assert!(Sending.may_become(Sent));
        assert!(Retrying.may_become(Sending));
        assert!(!Sent.may_become(Duplicate));
        assert!(!Sent.may_become(Queued));
        assert!(!Duplicate.may_become(Sent));
        assert!(Dead.may_become(Queued));
        assert!(Failed.may_become(Queued));
        assert!(!Dead.may_become(Sending));
    }

    #[test]
    fn an_update_masks_recipients_and_redacts_errors() {
        let job = SendJob::from_request(
            JobRequest {
                message: EmailMessage {
                    from: "shop@example.com".to_owned(),
                    to: vec!["Ada Lovelace <ada@example.org>".to_owned()],
                    bcc: vec!["grace@example.net".to_owned()],
                    subject: "s".to_owned(),
                    text: Some("t".to_owned()),
                    ..EmailMessage::default()
                },
                ..JobRequest::default()
            },
            "acme",
        );
        let update = StatusUpdate::new(&job, JobState::Failed)
            .attempts(2)
            .error("550 <ada@example.org> unknown");
        let status = update.status();
        assert_eq!(status.recipients, ["a***@example.org", "g***@example.net"]);
        assert_eq!(
            status.last_error.as_deref(),
            Some("550 <a***@example.org> unknown")
        );
        let json = serde_json::to_string(status).expect("json");
        assert!(!json.contains("ada@"), "{json}");
        assert!(!json.contains("Lovelace"), "{json}");
        assert!(json.contains("\"state\":\"failed\""), "{json}");
    }
}
