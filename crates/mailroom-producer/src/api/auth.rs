//! Who is calling, and may they: the bearer credential, its scope, the
//! networks it may come from, and the fleet-wide rate limits of the key and
//! the tenant.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue, header};
use mailroom_core::ratelimit::Rate;
use mailroom_core::store::StoreError;
use time::OffsetDateTime;

use super::ApiState;
use super::jwt::TokenRefused;
use super::keys::{Found, KEY_PREFIX, KeyRecord, Scope};
use super::problem::Problem;
use super::spend::Spent;

/// How often a key's `last used` time is written, at most.
const TOUCH_EVERY: Duration = Duration::from_mins(1);

/// An authenticated caller.
#[derive(Clone, Debug)]
pub struct Principal {
    /// The key's public id.
    pub key_id: String,
    /// The tenant it acts for.
    pub tenant: String,
    /// The credential's own rate limit.
    pub rate: Rate,
}

/// Remembers when each key's use was last written, so a busy key costs one
/// Redis write a minute, not one a request.
#[derive(Debug, Default)]
pub struct Touches(Mutex<HashMap<String, Instant>>);

impl Touches {
    fn due(&self, id: &str) -> bool {
        let mut seen = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match seen.get(id) {
            Some(at) if at.elapsed() < TOUCH_EVERY => false,
            _ => {
                seen.insert(id.to_owned(), Instant::now());
                true
            }
        }
    }
}

/// The bearer token of `headers`, if any. Two `Authorization` headers give
/// none: which one a proxy checked and which one would be used could
/// differ.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = one_header(headers, header::AUTHORIZATION.as_str())
        .ok()??
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|token| !token.is_empty())
}

/// The one value of header `name`, if sent; `Err` if sent more than once
/// (which of them a proxy in front checked is not to be guessed).
pub(super) fn one_header<'h>(
    headers: &'h HeaderMap,
    name: &str,
) -> Result<Option<&'h HeaderValue>, ()> {
    let mut values = headers.get_all(name).iter();
    let first = values.next();
    match values.next() {
        Some(_) => Err(()),
        None => Ok(first),
    }
}

/// A refused request: the answer, and the caller when it was known by
/// then (for the access log).
#[derive(Debug)]
pub struct Refusal {
    /// The answer.
    pub problem: Problem,
    /// Who asked, if the credential was good.
    pub caller: Option<Principal>,
}

impl From<Problem> for Refusal {
    fn from(problem: Problem) -> Self {
        Self {
            problem,
            caller: None,
        }
    }
}

/// A caller whose credential passed its checks, not yet charged.
pub enum Caller {
    /// An API key: where its record is, and the record checked.
    Key {
        /// The record's place in Redis.
        slot: String,
        /// The record.
        found: Arc<Found>,
    },
    /// A JWT.
    Token(Principal),
}

impl Caller {
    /// The credential's public id.
    pub fn key_id(&self) -> &str {
        match self {
            Self::Key { found, .. } => &found.record.id,
            Self::Token(principal) => &principal.key_id,
        }
    }

    /// The tenant it acts for.
    pub fn tenant(&self) -> &str {
        match self {
            Self::Key { found, .. } => &found.record.tenant,
            Self::Token(principal) => &principal.tenant,
        }
    }
}

/// [`authenticate`], then [`charge`] `cost`.
pub async fn authorize(
    state: &ApiState,
    headers: &HeaderMap,
    ip: IpAddr,
    scope: Scope,
    cost: u32,
) -> Result<Principal, Refusal> {
    let caller = authenticate(state, headers, ip, scope).await?;
    charge(state, caller, scope, ip, cost).await
}

/// Checks the credential of a request from `ip` that needs `scope`,
/// spending nothing yet, so a body is read only for a known caller.
///
/// An API key is checked against the record this replica last read; only
/// if that refuses is Redis asked again (a refusal is always decided on a
/// fresh read). [`charge`] makes sure the record checked is still current.
pub async fn authenticate(
    state: &ApiState,
    headers: &HeaderMap,
    ip: IpAddr,
    scope: Scope,
) -> Result<Caller, Refusal> {
    let token = bearer(headers).ok_or_else(|| Problem::refused("no bearer credential"))?;
    if !token.starts_with(KEY_PREFIX) {
        return Ok(Caller::Token(authenticate_token(state, token, scope)?));
    }
    let slot = state
        .keys
        .slot(token)
        .ok_or_else(|| Problem::refused("malformed API key"))?;
    if let Some(found) = state.keys.remembered(&slot)
        && check(&found.record, scope, ip).is_ok()
    {
        return Ok(Caller::Key { slot, found });
    }
    let found = state
        .keys
        .fetch(&slot)
        .await
        .map_err(|err| key_store(&err))?
        .ok_or_else(|| Problem::refused("unknown API key"))?;
    check(&found.record, scope, ip)?;
    Ok(Caller::Key { slot, found })
}

/// Spends `cost` of the caller's key and tenant limits. For an API key
/// this is the request's one Redis round trip: the script spends only if
/// Redis still holds exactly the record that was checked; else it answers
/// the current one, which is checked in turn.
pub async fn charge(
    state: &ApiState,
    caller: Caller,
    scope: Scope,
    ip: IpAddr,
    cost: u32,
) -> Result<Principal, Refusal> {
    let (slot, mut found) = match caller {
        Caller::Token(principal) => {
            return match state.spender.spend(&principal, cost).await {
                Ok(Spent::Done) => Ok(principal),
                // An unguarded check has nothing to go stale.
                Ok(Spent::Stale(_)) => Err(Problem::unavailable("the rate limiter").into()),
                Err(problem) => Err(Refusal {
                    problem,
                    caller: Some(principal),
                }),
            };
        }
        Caller::Key { slot, found } => (slot, found),
    };
    // Records change only on rotation or revocation, so a second try is
    // rare and a third rarer still.
    for _ in 0..3 {
        let principal = Principal {
            rate: found.record.rate.unwrap_or(state.settings.key_rate),
            key_id: found.record.id.clone(),
            tenant: found.record.tenant.clone(),
        };
        match state
            .spender
            .spend_guarded(&slot, &found, &principal, cost)
            .await
        {
            Ok(Spent::Done) => {
                touch(state, &principal.key_id);
                return Ok(principal);
            }
            Ok(Spent::Stale(current)) => {
                found = state
                    .keys
                    .remember(&slot, current)
                    .map_err(|err| key_store(&err))?
                    .ok_or_else(|| Problem::refused("API key revoked"))?;
                check(&found.record, scope, ip)?;
            }
            Err(problem) => {
                return Err(Refusal {
                    problem,
                    caller: Some(principal),
                });
            }
        }
    }
    Err(Problem::unavailable("the key store").into())
}

fn key_store(err: &StoreError) -> Problem {
    Problem::unavailable_because("the key store", err)
}

/// Records the key's use, at most once a minute a key, off the request's
/// path.
fn touch(state: &ApiState, id: &str) {
    if state.touches.due(id) {
        let keys = state.keys.clone();
        let id = id.to_owned();
        tokio::spawn(async move {
            if let Err(err) = keys.touch(&id).await {
                tracing::debug!(error = %err, "key use not recorded");
            }
        });
    }
}

/// A JWT instead of an API key: the deny list applied already; keys have
/// no network list; the rate limit is per signing key and per tenant.
fn authenticate_token(state: &ApiState, token: &str, scope: Scope) -> Result<Principal, Problem> {
    let verifier = state
        .jwt
        .as_ref()
        .ok_or_else(|| Problem::refused("not an API key, and no [api.jwt] to verify a token"))?;
    let caller = verifier
        .verify(token, OffsetDateTime::now_utc())
        .map_err(|TokenRefused(why)| Problem::refused(why))?;
    if !caller.scopes.contains(&scope) {
        return Err(Problem::forbidden("the token lacks the scope for this"));
    }
    Ok(Principal {
        key_id: caller.key_id,
        tenant: caller.tenant,
        rate: state.settings.key_rate,
    })
}

/// Expiry, scope and network checks of a found key.
fn check(record: &KeyRecord, scope: Scope, ip: IpAddr) -> Result<(), Problem> {
    if !record.is_live(OffsetDateTime::now_utc()) {
        return Err(Problem::refused("API key expired"));
    }
    if !record.scopes.contains(&scope) {
        let name = match scope {
            Scope::Send => "send",
            Scope::Read => "read",
        };
        return Err(Problem::forbidden(&format!(
            "the key lacks the {name} scope"
        )));
    }
    if !record.allows(ip) {
        return Err(Problem::forbidden(
            "the key may not be used from this address",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {

    use super::*;

    #[test]
    fn bearer_tokens_are_read_strictly() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer(&headers), None);
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer mr_live_x"),
        );
        assert_eq!(bearer(&headers), Some("mr_live_x"));
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer   mr_live_y "),
        );
        assert_eq!(bearer(&headers), Some("mr_live_y"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&headers), None);
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(bearer(&headers), None);
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer mr_live_x"),
        );
        headers.append(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer mr_live_y"),
        );
        assert_eq!(bearer(&headers), None, "two credentials are ambiguous");
    }
}
