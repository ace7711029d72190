//! Who is calling, and may they: the bearer credential, its scope, the
//! networks it may come from, and the fleet-wide rate limits of the key and
//! the tenant.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, header};
use mailroom_core::ratelimit::{Decision, Rate};
use time::OffsetDateTime;

use super::ApiState;
use super::keys::{KEY_PREFIX, KeyRecord, Scope};
use super::problem::Problem;

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

/// The bearer token of `headers`, if any.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|token| !token.is_empty())
}

/// Authenticates the caller of a request from `ip` that needs `scope`, and
/// spends `cost` of its key's and tenant's rate limits.
pub async fn authorize(
    state: &ApiState,
    headers: &HeaderMap,
    ip: IpAddr,
    scope: Scope,
    cost: u32,
) -> Result<Principal, Problem> {
    let principal = authenticate(state, headers, ip, scope).await?;
    spend(state, &principal, cost).await?;
    Ok(principal)
}

/// Authenticates the caller of a request from `ip` that needs `scope`,
/// spending nothing yet (see [`spend`]).
pub async fn authenticate(
    state: &ApiState,
    headers: &HeaderMap,
    ip: IpAddr,
    scope: Scope,
) -> Result<Principal, Problem> {
    if state.network.denies(ip) {
        return Err(Problem::forbidden("requests from this network are refused"));
    }
    let token = bearer(headers).ok_or_else(Problem::unauthorized)?;
    if !token.starts_with(KEY_PREFIX) {
        return authenticate_token(state, token, scope);
    }
    let record = state
        .keys
        .lookup(token)
        .await
        .map_err(|_| Problem::unavailable("the key store"))?
        .ok_or_else(Problem::unauthorized)?;
    check(&record, scope, ip)?;
    if state.touches.due(&record.id) {
        let keys = state.keys.clone();
        let id = record.id.clone();
        tokio::spawn(async move {
            if let Err(err) = keys.touch(&id).await {
                tracing::debug!(error = %err, "key use not recorded");
            }
        });
    }
    Ok(Principal {
        rate: record.rate.unwrap_or(state.settings.key_rate),
        key_id: record.id,
        tenant: record.tenant,
    })
}

/// A JWT instead of an API key: the deny list applied already; keys have
/// no network list; the rate limit is per signing key and per tenant.
fn authenticate_token(state: &ApiState, token: &str, scope: Scope) -> Result<Principal, Problem> {
    let verifier = state.jwt.as_ref().ok_or_else(Problem::unauthorized)?;
    let caller = verifier
        .verify(token, OffsetDateTime::now_utc())
        .ok_or_else(Problem::unauthorized)?;
    if !caller.scopes.contains(&scope) {
        return Err(Problem::forbidden("the token lacks the scope for this"));
    }
    Ok(Principal {
        key_id: caller.key_id,
        tenant: caller.tenant,
        rate: state.settings.key_rate,
    })
}

/// Scope and network checks of a found key.
fn check(record: &KeyRecord, scope: Scope, ip: IpAddr) -> Result<(), Problem> {
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

/// Spends `cost` from the caller's key and tenant limits in one round
/// trip. Both keys carry the tenant as hash tag, so they share a Cluster
/// slot.
pub async fn spend(state: &ApiState, principal: &Principal, cost: u32) -> Result<(), Problem> {
    let tenant = &principal.tenant;
    let key = format!("{{{tenant}}}:key:{}", principal.key_id);
    let whole = format!("{{{tenant}}}:tenant");
    let limits = [
        (key.as_str(), principal.rate),
        (whole.as_str(), state.settings.tenant_rate),
    ];
    match state.limiter.check_all(&limits, cost).await {
        Ok((Decision::Allowed, _)) => Ok(()),
        Ok((Decision::Limited { retry_after }, which)) => Err(Problem::rate_limited(
            retry_after,
            if which == 0 { "key" } else { "tenant" },
        )),
        Err(_) => Err(Problem::unavailable("the rate limiter")),
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

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
    }
}
