//! Fleet-wide rate limits: GCRA (the generic cell rate algorithm) in one
//! Redis script, so every API replica and every worker share one budget per
//! key, and a check is a single atomic round trip.
//!
//! A limit of `count` per `period` allows a burst of `count` and then one
//! request every `period / count`. The script stores one number a key (the
//! theoretical arrival time, in microseconds), expiring when idle.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use redis::Script;
use serde::{Deserialize, Serialize};

use crate::store::{RedisStore, StoreError};

/// A rate such as `100/s`, `6000/m` or `50000/h`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Rate {
    /// Requests allowed per period (and the burst).
    pub count: u32,
    /// The period.
    pub period: Duration,
}

impl Rate {
    /// Time between two requests at the steady rate.
    pub fn interval(self) -> Duration {
        self.period / self.count.max(1)
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.period.as_secs() {
            1 => "s",
            60 => "m",
            3600 => "h",
            _ => "d",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad =
            || format!("{text:?} is not a rate; use e.g. 100/s, 6000/m, 50000/h or 1000000/d");
        let (count, unit) = text.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        let period = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_mins(1),
            "h" => Duration::from_hours(1),
            "d" => Duration::from_hours(24),
            _ => return Err(bad()),
        };
        if count == 0 {
            return Err(bad());
        }
        Ok(Self { count, period })
    }
}

impl TryFrom<String> for Rate {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<Rate> for String {
    fn from(rate: Rate) -> Self {
        rate.to_string()
    }
}

/// What a check decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead.
    Allowed,
    /// Over the limit: try again after this long.
    Limited {
        /// When a request would be allowed again.
        retry_after: Duration,
    },
}

/// GCRA over Redis time, for several limits at once: a request passes only
/// if every limit allows it, and then spends from all of them. KEYS: the
/// limits' keys. ARGV: cost, then an interval (µs) and a burst tolerance
/// (µs) per key. Returns `{wait in µs (0: allowed), index of the limit}`.
const GCRA: &str = r"
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000000 + tonumber(now_parts[2])
local cost = tonumber(ARGV[1])
local new_tats = {}
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[2 * i])
  local tolerance = tonumber(ARGV[2 * i + 1])
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local new_tat = tat + interval * cost
  local allow_at = new_tat - tolerance - interval
  if allow_at > now then
    return { math.ceil(allow_at - now), i - 1 }
  end
  new_tats[i] = new_tat
end
for i, key in ipairs(KEYS) do
  local new_tat = new_tats[i]
  redis.call('SET', key, string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
end
return { 0, 0 }
";

/// Rate limits in Redis.
#[derive(Clone, Debug)]
pub struct RateLimiter {
    store: RedisStore,
    script: Arc<Script>,
}

impl RateLimiter {
    /// Limits under `store`'s prefix.
    pub fn new(store: RedisStore) -> Self {
        Self {
            store,
            script: Arc::new(Script::new(GCRA)),
        }
    }

    /// Spends `cost` requests of `rate` for `key` (e.g. `api:key:ID`), if the
    /// budget allows; otherwise says how long to wait. Nothing is spent when
    /// limited.
    pub async fn check(&self, key: &str, rate: Rate, cost: u32) -> Result<Decision, StoreError> {
        self.check_all(&[(key, rate)], cost)
            .await
            .map(|(decision, _)| decision)
    }

    /// Spends `cost` from every limit of `limits` in one round trip, or from
    /// none; when limited, also says which limit (its index) was spent.
    /// For Redis Cluster, give the keys one hash tag (e.g. `{tenant}`).
    pub async fn check_all(
        &self,
        limits: &[(&str, Rate)],
        cost: u32,
    ) -> Result<(Decision, usize), StoreError> {
        let mut invocation = self.script.prepare_invoke();
        invocation.arg(cost.max(1));
        for (key, rate) in limits {
            let interval = micros(rate.interval()).max(1);
            // A full burst of `count` fits from idle.
            let tolerance = interval * u64::from(rate.count.saturating_sub(1));
            invocation
                .key(self.store.key(&format!("rate:{key}")))
                .arg(interval)
                .arg(tolerance);
        }
        let mut connection = self.store.connection();
        let (wait, index): (u64, usize) = invocation
            .invoke_async(&mut connection)
            .await
            .map_err(|err| self.store.error(&err))?;
        let decision = if wait == 0 {
            Decision::Allowed
        } else {
            Decision::Limited {
                retry_after: Duration::from_micros(wait),
            }
        };
        Ok((decision, index))
    }
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_and_print() {
        let rate: Rate = "100/s".parse().expect("rate");
        assert_eq!(rate.interval(), Duration::from_millis(10));
        assert_eq!(rate.to_string(), "100/s");
        assert_eq!(
            "60/m".parse::<Rate>().map(Rate::interval),
            Ok(Duration::from_secs(1))
        );
        for bad in ["", "100", "0/s", "10/w", "x/s", "-1/s"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad}");
        }
    }
}
