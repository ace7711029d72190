//! OAuth 2.0 bearer tokens as JWTs, verified with `ring`.
//!
//! The algorithm is pinned by `api.jwt.algorithm`: a token whose header
//! names another (`none`, `HS256` with a public key as its secret, ...) is
//! refused before any key is touched, and the key that verifies is chosen
//! by `kid` among keys of the pinned kind only. `exp` is required, `exp`
//! and `nbf` are checked with `api.jwt.leeway`, `iss` and `aud` must match;
//! the tenant comes from `api.jwt.tenant_claim` and the scopes from
//! `scope` (space-separated `send`, `read`, also as `mailroom:send`).

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use mailroom_core::settings::{JwtAlgorithm, JwtSettings};
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde::Deserialize;
use time::OffsetDateTime;

use super::keys::Scope;

/// Why the verifier could not be built from its settings.
#[derive(Debug, thiserror::Error)]
pub enum JwtSetupError {
    /// A required setting is empty.
    #[error("api.jwt.{0} must be set")]
    Missing(&'static str),
    /// The JWKS file could not be read or parsed.
    #[error("api.jwt.jwks_file {path}: {reason}")]
    Jwks {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

/// A verified token's caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenCaller {
    /// `jwt:` and the key id that verified it (never the subject).
    pub key_id: String,
    /// The tenant claim.
    pub tenant: String,
    /// Scopes granted.
    pub scopes: Vec<Scope>,
}

#[derive(Clone, Debug)]
enum Key {
    Ed25519(Vec<u8>),
    P256(Vec<u8>),
    Rsa { n: Vec<u8>, e: Vec<u8> },
}

#[derive(Deserialize)]
struct Jwks {
    keys: Vec<Jwk>,
}

#[derive(Deserialize)]
struct Jwk {
    kty: String,
    kid: Option<String>,
    crv: Option<String>,
    x: Option<String>,
    y: Option<String>,
    n: Option<String>,
    e: Option<String>,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    kid: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

/// Verifies tokens against the configured keys and claims.
#[derive(Clone, Debug)]
pub struct JwtVerifier {
    algorithm: JwtAlgorithm,
    keys: Vec<(Option<String>, Key)>,
    issuer: String,
    audience: String,
    leeway: Duration,
    tenant_claim: String,
}

fn b64(text: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(text.trim_end_matches('=')).ok()
}

impl JwtVerifier {
    /// From `[api.jwt]`; reads the JWKS file and keeps the keys of the
    /// pinned algorithm's kind.
    pub fn from_settings(settings: &JwtSettings) -> Result<Self, JwtSetupError> {
        if settings.issuer.is_empty() {
            return Err(JwtSetupError::Missing("issuer"));
        }
        if settings.audience.is_empty() {
            return Err(JwtSetupError::Missing("audience"));
        }
        let path = settings.jwks_file.display().to_string();
        let jwks_error = |reason: String| JwtSetupError::Jwks {
            path: path.clone(),
            reason,
        };
        let text = std::fs::read_to_string(&settings.jwks_file)
            .map_err(|err| jwks_error(err.to_string()))?;
        let jwks: Jwks =
            serde_json::from_str(&text).map_err(|err| jwks_error(format!("not a JWKS: {err}")))?;
        let keys: Vec<(Option<String>, Key)> = jwks
            .keys
            .into_iter()
            .filter_map(|jwk| key_of(&jwk, settings.algorithm).map(|key| (jwk.kid, key)))
            .collect();
        if keys.is_empty() {
            return Err(jwks_error(format!(
                "no {} key in it",
                settings.algorithm.as_str()
            )));
        }
        Ok(Self {
            algorithm: settings.algorithm,
            keys,
            issuer: settings.issuer.clone(),
            audience: settings.audience.clone(),
            leeway: settings.leeway,
            tenant_claim: settings.tenant_claim.clone(),
        })
    }

    /// The caller of `token` at `now`, if every check passes. Why a token
    /// failed goes to the access log only: every failure is the same 401.
    pub fn verify(&self, token: &str, now: OffsetDateTime) -> Result<TokenCaller, TokenRefused> {
        let malformed = TokenRefused("JWT malformed");
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed);
        };
        if token.len() > 16 * 1024 {
            return Err(malformed);
        }
        let head: Header = b64(header)
            .and_then(|json| serde_json::from_slice(&json).ok())
            .ok_or(malformed)?;
        if head.alg != self.algorithm.as_str() {
            return Err(TokenRefused("JWT algorithm not the one configured"));
        }
        let key = match &head.kid {
            Some(kid) => self
                .keys
                .iter()
                .find(|(id, _)| id.as_deref() == Some(kid.as_str()))
                .ok_or(TokenRefused("JWT kid unknown"))?,
            None if self.keys.len() == 1 => &self.keys[0],
            None => return Err(TokenRefused("JWT without a kid, and several keys")),
        };
        let signed = &token[..header.len() + 1 + payload.len()];
        let signature = b64(signature).ok_or(malformed)?;
        if !verify_signature(&key.1, signed.as_bytes(), &signature) {
            return Err(TokenRefused("JWT signature invalid"));
        }
        let claims: serde_json::Value = b64(payload)
            .and_then(|json| serde_json::from_slice(&json).ok())
            .ok_or(malformed)?;
        self.check_claims(&claims, now)?;
        let tenant = claims
            .get(&self.tenant_claim)
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default();
        let tenant_ok = !tenant.is_empty()
            && tenant.len() <= 64
            && tenant
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !tenant_ok {
            return Err(TokenRefused(
                "JWT tenant claim missing or not a tenant name",
            ));
        }
        let scopes = claims
            .get("scope")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|scope| {
                scope
                    .strip_prefix("mailroom:")
                    .unwrap_or(scope)
                    .parse()
                    .ok()
            })
            .collect();
        Ok(TokenCaller {
            key_id: format!("jwt:{}", key.0.as_deref().unwrap_or("-")),
            tenant: tenant.to_owned(),
            scopes,
        })
    }

    fn check_claims(
        &self,
        claims: &serde_json::Value,
        now: OffsetDateTime,
    ) -> Result<(), TokenRefused> {
        let now = now.unix_timestamp();
        let leeway = i64::try_from(self.leeway.as_secs()).unwrap_or(0);
        let exp = claims
            .get("exp")
            .and_then(serde_json::Value::as_i64)
            .ok_or(TokenRefused("JWT without exp"))?;
        if now > exp.saturating_add(leeway) {
            return Err(TokenRefused("JWT expired"));
        }
        if let Some(nbf) = claims.get("nbf") {
            let nbf = nbf.as_i64().ok_or(TokenRefused("JWT nbf not a number"))?;
            if now.saturating_add(leeway) < nbf {
                return Err(TokenRefused("JWT not yet valid (nbf)"));
            }
        }
        if claims.get("iss").and_then(serde_json::Value::as_str) != Some(self.issuer.as_str()) {
            return Err(TokenRefused("JWT issuer not the one configured"));
        }
        let audience: Option<Audience> = claims
            .get("aud")
            .and_then(|aud| serde_json::from_value(aud.clone()).ok());
        let ours = match audience {
            Some(Audience::One(aud)) => aud == self.audience,
            Some(Audience::Many(list)) => list.contains(&self.audience),
            None => false,
        };
        if !ours {
            return Err(TokenRefused("JWT audience not the one configured"));
        }
        Ok(())
    }
}

/// Why a token was refused (for the access log, never for the client).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenRefused(pub &'static str);

/// The key of `jwk` if it is of the kind `algorithm` verifies with.
fn key_of(jwk: &Jwk, algorithm: JwtAlgorithm) -> Option<Key> {
    match (algorithm, jwk.kty.as_str(), jwk.crv.as_deref()) {
        (JwtAlgorithm::EdDsa, "OKP", Some("Ed25519")) => {
            Some(Key::Ed25519(b64(jwk.x.as_ref()?)?))
        }
        (JwtAlgorithm::Es256, "EC", Some("P-256")) => {
            let (x, y) = (b64(jwk.x.as_ref()?)?, b64(jwk.y.as_ref()?)?);
            if x.len() != 32 || y.len() != 32 {
                return None;
            }
            let mut point = vec![4];
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            Some(Key::P256(point))
        }
        (JwtAlgorithm::Rs256, "RSA", _) => Some(Key::Rsa {
            n: b64(jwk.n.as_ref()?)?,
            e: b64(jwk.e.as_ref()?)?,
        }),
        _ => None,
    }
}

fn verify_signature(key: &Key, message: &[u8], sig: &[u8]) -> bool {
    match key {
        Key::Ed25519(public) => UnparsedPublicKey::new(&signature::ED25519, public)
            .verify(message, sig)
            .is_ok(),
        Key::P256(point) => UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
            .verify(message, sig)
            .is_ok(),
        Key::Rsa { n, e } => RsaPublicKeyComponents { n, e }
            .verify(&signature::RSA_PKCS1_2048_8192_SHA256, message, sig)
            .is_ok(),
    }
}
