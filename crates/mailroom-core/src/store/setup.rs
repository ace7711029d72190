//! What of the Redis server's set-up bears on mailroom's guarantees: it
//! must be one server, since the scripts touch several keys at once, of
//! [`MINIMUM_VERSION`] or later, and
//! it should keep what it was told (dedup markers, API keys, statuses)
//! through memory pressure and restarts.

use super::{RedisStore, StoreError};

/// The oldest Redis whose commands mailroom uses throughout (`SET … GET`,
/// `EXAT`): on an older one, marking a job sent would fail after the send,
/// and a duplicate could go out.
pub const MINIMUM_VERSION: (u32, u32) = (6, 2);

/// How often a running worker or API reads the Redis set-up again.
pub const SETUP_RECHECK: std::time::Duration = std::time::Duration::from_mins(1);

/// A set-up that weakens mailroom's guarantees without breaking it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Risk {
    /// An eviction policy other than `noeviction`.
    #[error(
        "Redis maxmemory-policy is {0}: when memory runs short it may evict dedup markers \
         (a redelivered job could then be sent twice), API keys and statuses; \
         set maxmemory-policy noeviction"
    )]
    Eviction(String),
    /// No append-only file.
    #[error(
        "Redis appendonly is off: a restart forgets what was written since its last snapshot (if any), \
         dedup markers and API keys included (a redelivered job could then be sent twice); \
         set appendonly yes"
    )]
    NoAppendLog,
}

impl RedisStore {
    /// Reads the server's `INFO`: an error for Redis Cluster, which the
    /// scripts cannot use, else the risks of its set-up. A server that
    /// refuses `INFO` (an ACL) is taken as it is.
    pub async fn setup_risks(&self) -> Result<Vec<Risk>, StoreError> {
        let mut connection = self.connection();
        let info: String = match redis::cmd("INFO").query_async(&mut connection).await {
            Ok(info) => info,
            Err(err) => {
                let err = self.error(&err);
                if err.is_unavailable() {
                    return Err(err);
                }
                tracing::debug!(error = %err, "Redis refused INFO: its set-up is not checked");
                return Ok(Vec::new());
            }
        };
        let fields = Info(&info);
        if fields.get("cluster_enabled") == Some("1") {
            return Err(StoreError::Cluster {
                url: self.url.to_string(),
            });
        }
        if let Some(version) = fields.get("redis_version").filter(|v| too_old(v)) {
            return Err(StoreError::TooOld {
                url: self.url.to_string(),
                version: version.to_owned(),
            });
        }
        Ok(fields.risks())
    }

    /// [`setup_risks`](Self::setup_risks), each risk logged as a warning;
    /// then the same again every [`SETUP_RECHECK`] in the background, each
    /// risk that was not there before logged in turn: an eviction policy
    /// set with `CONFIG SET` at run time weakens dedup as much as one set
    /// at start.
    pub async fn check_setup(&self) -> Result<(), StoreError> {
        let mut known = self.setup_risks().await?;
        for risk in &known {
            tracing::warn!("{risk}");
        }
        let store = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(SETUP_RECHECK).await;
                match store.setup_risks().await {
                    Ok(risks) => {
                        for risk in risks.iter().filter(|risk| !known.contains(risk)) {
                            tracing::warn!("{risk}");
                        }
                        known = risks;
                    }
                    Err(err) => tracing::debug!(error = %err, "Redis set-up not checked"),
                }
            }
        });
        Ok(())
    }
}

/// Whether `version` is older than [`MINIMUM_VERSION`]; one that does not
/// parse is given the benefit of the doubt.
fn too_old(version: &str) -> bool {
    let mut parts = version.split('.').map(str::parse::<u32>);
    match (parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => (major, minor) < MINIMUM_VERSION,
        _ => false,
    }
}

/// The `field:value` lines of an `INFO` answer.
struct Info<'a>(&'a str);

impl<'a> Info<'a> {
    fn get(&self, field: &str) -> Option<&'a str> {
        self.0.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            (name == field).then(|| value.trim())
        })
    }

    fn risks(&self) -> Vec<Risk> {
        let mut risks = Vec::new();
        if let Some(policy) = self.get("maxmemory_policy")
            && policy != "noeviction"
        {
            risks.push(Risk::Eviction(policy.to_owned()));
        }
        if self.get("aof_enabled") == Some("0") {
            risks.push(Risk::NoAppendLog);
        }
        risks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAFE: &str = "# Memory\r\nused_memory:1000\r\nmaxmemory_policy:noeviction\r\n\r\n\
                        # Persistence\r\naof_enabled:1\r\n\r\n# Cluster\r\ncluster_enabled:0\r\n";

    #[test]
    fn a_durable_server_without_eviction_has_no_risk() {
        assert_eq!(Info(SAFE).risks(), Vec::new());
        assert_eq!(Info(SAFE).get("cluster_enabled"), Some("0"));
    }

    #[test]
    fn eviction_and_a_missing_append_log_are_risks() {
        let info = SAFE
            .replace("noeviction", "volatile-lru")
            .replace("aof_enabled:1", "aof_enabled:0");
        assert_eq!(
            Info(&info).risks(),
            vec![Risk::Eviction("volatile-lru".to_owned()), Risk::NoAppendLog]
        );
    }

    #[test]
    fn versions_before_6_2_are_too_old() {
        for old in ["6.0.16", "5.0.7", "6.1.0"] {
            assert!(too_old(old), "{old}");
        }
        for fine in ["6.2.0", "7.0.15", "8.2.1", "255.255.255", "unstable"] {
            assert!(!too_old(fine), "{fine}");
        }
        assert_eq!(
            Info("# Server\r\nredis_version:6.0.16\r\n").get("redis_version"),
            Some("6.0.16")
        );
        let refused = StoreError::TooOld {
            url: "redis://redis:6379".to_owned(),
            version: "6.0.16".to_owned(),
        };
        assert!(
            refused
                .to_string()
                .contains("is version 6.0.16; mailroom needs 6.2 or later")
        );
    }

    #[test]
    fn fields_an_old_server_lacks_are_no_risk() {
        assert_eq!(
            Info("# Server\r\nredis_version:6.2.0\r\n").risks(),
            Vec::new()
        );
    }
}
