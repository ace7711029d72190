//! API keys: `mr_live_` + 32 random bytes (base64url), shown once.
//!
//! Only an HMAC-SHA256 of a key, under the server-side `redis.hash_key`, is
//! stored, in Redis, so every API replica sees a creation or a revocation
//! at once. A key is found by the HMAC of what the caller presents: an
//! attacker who does not hold the pepper cannot aim a guess at a stored
//! hash, and no comparison of secret bytes happens in this process.
//!
//! Layout: `apikey:<hmac>` → the key's record (expiring with the key);
//! `apikeys` → a hash of key id → the record plus its HMAC, for listing
//! and revoking.
//!
//! Each replica remembers the records it has read, with their exact text.
//! A remembered record is only ever acted on through a guarded rate-limit
//! check (see `auth`), which spends only if Redis still holds that text: a
//! revocation or rotation still takes effect on the very next request.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ipnet::IpNet;
use mailroom_core::ratelimit::Rate;
use mailroom_core::store::{KeyedHash, RedisStore, StoreError};
use redis::Script;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::network::canonical_net;

/// What a key opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// `POST /v1/messages`, `POST /v1/messages/batch`.
    Send,
    /// `GET /v1/messages/{id}`.
    Read,
}

impl std::str::FromStr for Scope {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim() {
            "send" => Ok(Self::Send),
            "read" => Ok(Self::Read),
            other => Err(format!("{other:?} is not a scope; use send, read")),
        }
    }
}

/// A key's record, as stored (never the key).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// Public id, e.g. `key_3f9a1c0b5d2e`.
    pub id: String,
    /// The tenant it sends as.
    pub tenant: String,
    /// What it may do.
    pub scopes: Vec<Scope>,
    /// Networks it may be used from; empty: anywhere (less the deny list).
    pub allow_cidrs: Vec<IpNet>,
    /// Its own rate limit; `api.key_rate` when unset.
    pub rate: Option<Rate>,
    /// When it was made.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When it stops working.
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    /// The key it was rotated to, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotated_to: Option<String>,
}

impl KeyRecord {
    /// Whether the key may be used at `now`.
    pub fn is_live(&self, now: OffsetDateTime) -> bool {
        self.expires_at.is_none_or(|at| now < at)
    }

    /// Whether `ip` (IPv4 for an IPv4-mapped address, as `client_ip`
    /// gives it) may use the key.
    pub fn allows(&self, ip: IpAddr) -> bool {
        // Canonical again here: a key stored before networks were made
        // canonical when parsed may hold a mapped one, which no client
        // address would ever be inside of.
        self.allow_cidrs.is_empty()
            || self
                .allow_cidrs
                .iter()
                .any(|net| canonical_net(*net).contains(&ip))
    }

    /// Until when the key works once rotated with a grace ending at
    /// `grace_end`: a grace never outlasts the key's own expiry.
    pub fn rotated_until(&self, grace_end: OffsetDateTime) -> OffsetDateTime {
        self.expires_at.map_or(grace_end, |own| own.min(grace_end))
    }
}

/// A key as listed: its record and when it was last used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    /// The record.
    pub record: KeyRecord,
    /// Last use, to the minute.
    pub last_used: Option<OffsetDateTime>,
}

/// What a new key needs.
#[derive(Clone, Debug)]
pub struct NewKey {
    /// Tenant.
    pub tenant: String,
    /// Scopes (at least one).
    pub scopes: Vec<Scope>,
    /// Allowed networks.
    pub allow_cidrs: Vec<IpNet>,
    /// Own rate limit.
    pub rate: Option<Rate>,
    /// Expiry.
    pub expires_at: Option<OffsetDateTime>,
}

/// Records a replica remembers at most; past that it forgets them all
/// (only keys that exist get in, so this bounds legitimate churn).
const REMEMBERED: usize = 10_000;

/// A key's record as read from Redis, with the text it was stored as.
#[derive(Debug)]
pub struct Found {
    /// The record.
    pub record: KeyRecord,
    /// Its stored text, which a guarded check compares with Redis's.
    pub json: String,
}

/// The prefix of every key; lets secret scanners recognise one.
pub const KEY_PREFIX: &str = "mr_live_";

/// ARGV: hmac, id, record JSON, index JSON, expiry (unix seconds, 0 none).
const CREATE: &str = r"
local key = KEYS[1] .. 'apikey:' .. ARGV[1]
if tonumber(ARGV[5]) > 0 then
  redis.call('SET', key, ARGV[3], 'EXAT', ARGV[5])
else
  redis.call('SET', key, ARGV[3])
end
redis.call('HSET', KEYS[1] .. 'apikeys', ARGV[2], ARGV[4])
return 1
";

/// ARGV: id. Deletes the key and its index entry; 0 if unknown.
const REVOKE: &str = r"
local entry = redis.call('HGET', KEYS[1] .. 'apikeys', ARGV[1])
if not entry then return 0 end
local hmac = cjson.decode(entry).hmac
redis.call('DEL', KEYS[1] .. 'apikey:' .. hmac)
redis.call('HDEL', KEYS[1] .. 'apikeys', ARGV[1])
redis.call('HDEL', KEYS[1] .. 'apikey-used', ARGV[1])
return 1
";

#[derive(Serialize, Deserialize)]
struct IndexEntry {
    hmac: String,
    record: KeyRecord,
}

/// API keys in Redis.
#[derive(Clone, Debug)]
pub struct ApiKeyStore {
    store: RedisStore,
    hash: KeyedHash,
    remembered: Arc<Mutex<HashMap<String, Arc<Found>>>>,
}

impl ApiKeyStore {
    /// Keys under `store`'s prefix, hashed under `hash_key`.
    pub fn new(store: RedisStore, hash_key: &[u8]) -> Self {
        Self {
            store,
            hash: KeyedHash::new(hash_key),
            remembered: Arc::default(),
        }
    }

    fn hmac(&self, secret: &str) -> String {
        self.hash.hex(&[b"apikey", secret.as_bytes()])
    }

    /// Makes a key; returns it (the only time it is seen) and its record.
    pub async fn create(&self, new: NewKey) -> Result<(String, KeyRecord), StoreError> {
        let mut secret = [0_u8; 32];
        rand::fill(&mut secret[..]);
        let key = format!("{KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(secret));
        let mut id_bytes = [0_u8; 6];
        rand::fill(&mut id_bytes[..]);
        let record = KeyRecord {
            id: format!("key_{}", hex::encode(id_bytes)),
            tenant: new.tenant,
            scopes: new.scopes,
            allow_cidrs: new.allow_cidrs,
            rate: new.rate,
            created_at: OffsetDateTime::now_utc(),
            expires_at: new.expires_at,
            rotated_to: None,
        };
        let hmac = self.hmac(&key);
        let json = to_json(&record)?;
        let index = to_json(&IndexEntry {
            hmac: hmac.clone(),
            record: record.clone(),
        })?;
        let expiry = record.expires_at.map_or(0, OffsetDateTime::unix_timestamp);
        let mut connection = self.store.connection();
        let _: i64 = Script::new(CREATE)
            .key(self.store.key(""))
            .arg(&hmac)
            .arg(&record.id)
            .arg(json)
            .arg(index)
            .arg(expiry)
            .invoke_async(&mut connection)
            .await
            .map_err(|err| self.store.error(&err))?;
        Ok((key, record))
    }

    /// Where the record of `secret` would be stored (relative to the
    /// store's prefix), if `secret` has a key's shape.
    pub fn slot(&self, secret: &str) -> Option<String> {
        (secret.starts_with(KEY_PREFIX) && secret.len() <= 128)
            .then(|| format!("apikey:{}", self.hmac(secret)))
    }

    /// The record last read from `slot`, if this replica remembers one.
    pub fn remembered(&self, slot: &str) -> Option<Arc<Found>> {
        self.memory().get(slot).cloned()
    }

    /// Reads the record at `slot` (live or not) and remembers it.
    pub async fn fetch(&self, slot: &str) -> Result<Option<Arc<Found>>, StoreError> {
        let mut connection = self.store.connection();
        let json: Option<String> = redis::cmd("GET")
            .arg(self.store.key(slot))
            .query_async(&mut connection)
            .await
            .map_err(|err| self.store.error(&err))?;
        self.remember(slot, json)
    }

    /// Remembers `json` as what `slot` holds now (`None`: nothing).
    pub fn remember(
        &self,
        slot: &str,
        json: Option<String>,
    ) -> Result<Option<Arc<Found>>, StoreError> {
        let Some(json) = json else {
            self.memory().remove(slot);
            return Ok(None);
        };
        let found = Arc::new(Found {
            record: from_json(&json)?,
            json,
        });
        let mut memory = self.memory();
        if memory.len() >= REMEMBERED {
            memory.clear();
        }
        memory.insert(slot.to_owned(), Arc::clone(&found));
        Ok(Some(found))
    }

    fn memory(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Found>>> {
        self.remembered
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Notes that key `id` was used now (callers throttle this).
    pub async fn touch(&self, id: &str) -> Result<(), StoreError> {
        let mut connection = self.store.connection();
        redis::cmd("HSET")
            .arg(self.store.key("apikey-used"))
            .arg(id)
            .arg(OffsetDateTime::now_utc().unix_timestamp())
            .query_async::<()>(&mut connection)
            .await
            .map_err(|err| self.store.error(&err))
    }

    /// Every key, oldest first.
    pub async fn list(&self) -> Result<Vec<Listed>, StoreError> {
        let mut connection = self.store.connection();
        let entries: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg(self.store.key("apikeys"))
            .query_async(&mut connection)
            .await
            .map_err(|err| self.store.error(&err))?;
        let used: std::collections::HashMap<String, i64> = redis::cmd("HGETALL")
            .arg(self.store.key("apikey-used"))
            .query_async(&mut connection)
            .await
            .map_err(|err| self.store.error(&err))?;
        let mut listed = entries
            .into_iter()
            .map(|(id, json)| {
                let entry: IndexEntry = from_json(&json)?;
                Ok(Listed {
                    last_used: used
                        .get(&id)
                        .and_then(|secs| OffsetDateTime::from_unix_timestamp(*secs).ok()),
                    record: entry.record,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        listed.sort_by_key(|l| l.record.created_at);
        Ok(listed)
    }

    /// Revokes key `id` at once, on every replica; `false` if unknown.
    pub async fn revoke(&self, id: &str) -> Result<bool, StoreError> {
        let mut connection = self.store.connection();
        let revoked: i64 = Script::new(REVOKE)
            .key(self.store.key(""))
            .arg(id)
            .invoke_async(&mut connection)
            .await
            .map_err(|err| self.store.error(&err))?;
        Ok(revoked == 1)
    }

    /// Rotation: a new key with `id`'s tenant, scopes, networks, rate and
    /// expiry; the old one keeps working until `old_expires_at` (or its own
    /// expiry, if sooner), so callers can change over. Returns the new key
    /// and its record; `None` if `id` is unknown. An expired key is refused:
    /// its index entry outlives it, and rotating would bring it back.
    pub async fn rotate(
        &self,
        id: &str,
        old_expires_at: OffsetDateTime,
    ) -> Result<Option<Rotated>, RotateError> {
        let index_key = self.store.key("apikeys");
        let mut connection = self.store.connection();
        let entry: Option<String> = redis::cmd("HGET")
            .arg(&index_key)
            .arg(id)
            .query_async(&mut connection)
            .await
            .map_err(|err| self.store.error(&err))?;
        let Some(entry) = entry else {
            return Ok(None);
        };
        let mut entry: IndexEntry = from_json(&entry)?;
        let old = &entry.record;
        if let Some(expired_at) = old.expires_at
            && !old.is_live(OffsetDateTime::now_utc())
        {
            return Err(RotateError::Expired {
                id: id.to_owned(),
                expired_at,
            });
        }
        if let Some(to) = &old.rotated_to {
            return Err(RotateError::AlreadyRotated {
                id: id.to_owned(),
                to: to.clone(),
            });
        }
        let old_expires_at = old.rotated_until(old_expires_at);
        // The new key lives as long as the old one was made to, from now.
        let now = OffsetDateTime::now_utc();
        let expires_at = old.expires_at.map(|at| now + (at - old.created_at));
        let (key, record) = self
            .create(NewKey {
                tenant: old.tenant.clone(),
                scopes: old.scopes.clone(),
                allow_cidrs: old.allow_cidrs.clone(),
                rate: old.rate,
                expires_at,
            })
            .await?;
        // Shorten the old key's life; written from here rather than in a
        // script, whose JSON encoder would turn empty lists into objects.
        entry.record.expires_at = Some(old_expires_at);
        entry.record.rotated_to = Some(record.id.clone());
        redis::pipe()
            .atomic()
            .cmd("SET")
            .arg(self.store.key(&format!("apikey:{}", entry.hmac)))
            .arg(to_json(&entry.record)?)
            .arg("EXAT")
            .arg(old_expires_at.unix_timestamp())
            // Only if it is still there: one revoked or expired since the
            // read above must stay gone.
            .arg("XX")
            .ignore()
            .cmd("HSET")
            .arg(&index_key)
            .arg(id)
            .arg(to_json(&entry)?)
            .ignore()
            .query_async::<()>(&mut connection)
            .await
            .map_err(|err| self.store.error(&err))?;
        Ok(Some(Rotated {
            key,
            record,
            old_until: old_expires_at,
        }))
    }
}

/// What a rotation made.
#[derive(Debug)]
pub struct Rotated {
    /// The new key, shown once.
    pub key: String,
    /// The new key's record.
    pub record: KeyRecord,
    /// When the old key stops working.
    pub old_until: OffsetDateTime,
}

/// Why a key was not rotated.
#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    /// The key has expired.
    #[error("key {id} expired at {expired_at}; create a new key instead")]
    Expired {
        /// The key's id.
        id: String,
        /// When it expired.
        expired_at: OffsetDateTime,
    },
    /// The key was rotated before: its successor is the one to rotate.
    #[error("key {id} was rotated to {to} already; rotate {to}")]
    AlreadyRotated {
        /// The key's id.
        id: String,
        /// Its successor's id.
        to: String,
    },
    /// Redis did not answer as asked.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn to_json<T: Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|err| StoreError::Malformed(err.to_string()))
}

fn from_json<T: serde::de::DeserializeOwned>(json: &str) -> Result<T, StoreError> {
    serde_json::from_str(json).map_err(|err| StoreError::Malformed(err.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(allow_cidrs: &[&str]) -> KeyRecord {
        KeyRecord {
            id: "key_test".to_owned(),
            tenant: "acme".to_owned(),
            scopes: vec![Scope::Send],
            allow_cidrs: allow_cidrs
                .iter()
                .map(|text| text.parse().expect("a CIDR"))
                .collect(),
            rate: None,
            created_at: OffsetDateTime::UNIX_EPOCH,
            expires_at: None,
            rotated_to: None,
        }
    }

    /// A key stored with a network in IPv4-mapped form (as keys made
    /// before parsing made it canonical were) still admits the IPv4
    /// client inside it, and no other.
    #[test]
    fn a_stored_mapped_network_admits_ipv4_clients() {
        let key = record(&["::ffff:10.0.0.0/104"]);
        assert!(key.allows("10.1.2.3".parse().expect("ip")));
        assert!(!key.allows("11.1.2.3".parse().expect("ip")));
        assert!(record(&[]).allows("11.1.2.3".parse().expect("ip")));
    }
}
