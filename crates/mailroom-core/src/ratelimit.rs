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

/// GCRA over Redis time, for several limits at once and several requests
/// in a row: a request passes only if every limit allows it, and then
/// spends from all of them; the requests are taken in order, as if each
/// had made its own check.
///
/// ARGV[1] is the number of guards (0 or 1). A guard is a key that must
/// still hold an expected value (KEYS[1], ARGV[2]), checked in the same
/// atomic step: a caller that decided on a cached copy of that value spends
/// only if the copy is current. Then KEYS: the limits' keys; ARGV: the
/// number of requests, each one's cost, then an interval (µs) and a burst
/// tolerance (µs) per limit.
///
/// Returns `{wait in µs (0: allowed), index of the refusing limit}` per
/// request, flattened (the wait is the longest of the limits' waits, so a
/// client that waits it is not refused by the next limit), or `{-1, current value of the guard}` when the guard
/// does not hold (then nothing is spent).
const GCRA: &str = r"
local guards = tonumber(ARGV[1])
if guards == 1 then
  local current = redis.call('GET', KEYS[1])
  if current ~= ARGV[2] then return { -1, current } end
end
local a = 2 + guards
local n = tonumber(ARGV[a])
local limits = #KEYS - guards
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000000 + tonumber(now_parts[2])
local tats, intervals, tolerances = {}, {}, {}
for i = 1, limits do
  intervals[i] = tonumber(ARGV[a + n + 2 * i - 1])
  tolerances[i] = tonumber(ARGV[a + n + 2 * i])
  local tat = tonumber(redis.call('GET', KEYS[guards + i]) or now)
  if tat < now then tat = now end
  tats[i] = tat
end
local answer = {}
local spent = false
for j = 1, n do
  local cost = tonumber(ARGV[a + j])
  local wait, which = 0, 0
  for i = 1, limits do
    local allow_at = tats[i] + intervals[i] * (cost - 1) - tolerances[i]
    if allow_at - now > wait then
      wait, which = math.ceil(allow_at - now), i - 1
    end
  end
  if wait == 0 then
    for i = 1, limits do tats[i] = tats[i] + intervals[i] * cost end
    spent = true
  end
  answer[2 * j - 1] = wait
  answer[2 * j] = which
end
if spent then
  for i = 1, limits do
    redis.call('SET', KEYS[guards + i], string.format('%.0f', tats[i]), 'PX', math.ceil((tats[i] - now) / 1000) + 1)
  end
end
return answer
";

/// A key that must still hold a value for a guarded check to spend (see
/// [`RateLimiter::check_each_guarded`]).
#[derive(Clone, Copy, Debug)]
pub struct Guard<'a> {
    /// The key, under the store's prefix.
    pub key: &'a str,
    /// The value it must hold.
    pub expected: &'a str,
}

/// What a guarded check found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Guarded {
    /// The guard held; the limits decided each request (and gave the index
    /// of the limit that refused, if one did).
    Decided(Vec<(Decision, usize)>),
    /// The guard's key holds something else now (`None`: nothing); nothing
    /// was spent.
    Changed(Option<String>),
}

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
        match self.check_each_guarded(None, limits, &[cost]).await? {
            Guarded::Decided(decisions) => decisions.into_iter().next(),
            Guarded::Changed(_) => None,
        }
        .ok_or_else(|| StoreError::Malformed("a rate limit check answered nothing".to_owned()))
    }

    /// Decides several requests (`costs`, in order) against every limit of
    /// `limits` in one round trip, each as [`RateLimiter::check_all`] would,
    /// but only if `guard`'s key still holds its expected value, checked in
    /// the same atomic step. This lets a caller that decided on a cached
    /// value (an API key's record) skip reading it first without ever
    /// acting on a stale one, and lets concurrent requests share a check.
    pub async fn check_each_guarded(
        &self,
        guard: Option<Guard<'_>>,
        limits: &[(&str, Rate)],
        costs: &[u32],
    ) -> Result<Guarded, StoreError> {
        let mut invocation = self.script.prepare_invoke();
        match guard {
            Some(guard) => {
                invocation
                    .key(self.store.key(guard.key))
                    .arg(1)
                    .arg(guard.expected);
            }
            None => {
                invocation.arg(0);
            }
        }
        invocation.arg(costs.len());
        for cost in costs {
            invocation.arg(cost.max(&1));
        }
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
        let answer: Vec<redis::Value> = invocation
            .invoke_async(&mut connection)
            .await
            .map_err(|err| self.store.error(&err))?;
        parse_answer(answer, costs.len())
    }
}

/// Reads the script's answer for `requests` requests.
fn parse_answer(answer: Vec<redis::Value>, requests: usize) -> Result<Guarded, StoreError> {
    let malformed = || StoreError::Malformed("a rate limit check's answer".to_owned());
    let mut values = answer.into_iter();
    if let [redis::Value::Int(-1), _] = values.as_slice() {
        let current = values.nth(1).ok_or_else(malformed)?;
        let current = redis::from_redis_value(current).map_err(|_| malformed())?;
        return Ok(Guarded::Changed(current));
    }
    let mut decisions = Vec::with_capacity(requests);
    while let (Some(wait), Some(index)) = (values.next(), values.next()) {
        let wait: u64 = redis::from_redis_value(wait).map_err(|_| malformed())?;
        let index: usize = redis::from_redis_value(index).map_err(|_| malformed())?;
        let decision = if wait == 0 {
            Decision::Allowed
        } else {
            Decision::Limited {
                retry_after: Duration::from_micros(wait),
            }
        };
        decisions.push((decision, index));
    }
    if decisions.len() != requests {
        return Err(malformed());
    }
    Ok(Guarded::Decided(decisions))
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
