//! JWT bearer tokens: the verifier's edge cases, and one through the API.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use mailroom_core::settings::{JwtAlgorithm, JwtSettings};
use mailroom_producer::api::jwt::{JwtVerifier, TokenRefused};
use mailroom_producer::api::keys::Scope;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _};
use serde_json::{Value, json};
use time::OffsetDateTime;

/// A signing key and the JWKS that verifies it.
struct Signer {
    ed: Option<Ed25519KeyPair>,
    ec: Option<EcdsaKeyPair>,
    kid: &'static str,
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

impl Signer {
    fn ed25519(kid: &'static str) -> Self {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("key");
        Self {
            ed: Some(Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key")),
            ec: None,
            kid,
        }
    }

    fn es256(kid: &'static str) -> Self {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .expect("key");
        Self {
            ed: None,
            ec: Some(
                EcdsaKeyPair::from_pkcs8(
                    &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                    pkcs8.as_ref(),
                    &rng,
                )
                .expect("key"),
            ),
            kid,
        }
    }

    fn jwk(&self) -> Value {
        if let Some(ed) = &self.ed {
            json!({"kty": "OKP", "crv": "Ed25519", "kid": self.kid, "x": b64(ed.public_key().as_ref())})
        } else {
            let point = self
                .ec
                .as_ref()
                .expect("a key")
                .public_key()
                .as_ref()
                .to_vec();
            json!({"kty": "EC", "crv": "P-256", "kid": self.kid, "x": b64(&point[1..33]), "y": b64(&point[33..65])})
        }
    }

    fn alg(&self) -> &'static str {
        if self.ed.is_some() { "EdDSA" } else { "ES256" }
    }

    fn token_with(&self, header: &Value, claims: &Value) -> String {
        let signed = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let sig = match (&self.ed, &self.ec) {
            (Some(ed), _) => ed.sign(signed.as_bytes()).as_ref().to_vec(),
            (_, Some(ec)) => ec
                .sign(&SystemRandom::new(), signed.as_bytes())
                .expect("sign")
                .as_ref()
                .to_vec(),
            _ => unreachable!(),
        };
        format!("{signed}.{}", b64(&sig))
    }

    fn token(&self, claims: &Value) -> String {
        self.token_with(
            &json!({"alg": self.alg(), "typ": "JWT", "kid": self.kid}),
            claims,
        )
    }
}

fn now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

fn claims() -> Value {
    json!({
        "iss": "https://auth.example",
        "aud": ["mailroom", "other"],
        "sub": "service-a",
        "tenant": "acme",
        "scope": "mailroom:send read",
        "exp": now() + 300,
        "nbf": now() - 10,
    })
}

fn verifier(dir: &tempfile::TempDir, keys: &[&Signer], algorithm: JwtAlgorithm) -> JwtVerifier {
    let path = dir.path().join("jwks.json");
    let jwks = json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()});
    std::fs::write(&path, jwks.to_string()).expect("write jwks");
    JwtVerifier::from_settings(&JwtSettings {
        issuer: "https://auth.example".to_owned(),
        audience: "mailroom".to_owned(),
        jwks_file: path,
        algorithm,
        leeway: Duration::from_secs(30),
        tenant_claim: "tenant".to_owned(),
    })
    .expect("verifier")
}

#[test]
fn a_good_token_names_its_tenant_and_scopes() {
    let dir = tempfile::tempdir().expect("dir");
    for (signer, alg) in [
        (Signer::ed25519("k1"), JwtAlgorithm::EdDsa),
        (Signer::es256("k1"), JwtAlgorithm::Es256),
    ] {
        let verifier = verifier(&dir, &[&signer], alg);
        let caller = verifier
            .verify(&signer.token(&claims()), OffsetDateTime::now_utc())
            .expect("valid");
        assert_eq!(caller.tenant, "acme");
        assert_eq!(caller.scopes, [Scope::Send, Scope::Read]);
        assert_eq!(caller.key_id, "jwt:k1");
    }
}

#[test]
fn every_broken_token_is_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let signer = Signer::ed25519("k1");
    let stranger = Signer::ed25519("k1");
    let verifier = verifier(&dir, &[&signer], JwtAlgorithm::EdDsa);
    let at = OffsetDateTime::now_utc();
    let with = |key: &str, value: Value| {
        let mut c = claims();
        c[key] = value;
        c
    };
    let mut refused = vec![
        ("expired", signer.token(&with("exp", json!(now() - 120)))),
        ("no exp", {
            let mut c = claims();
            c.as_object_mut().expect("object").remove("exp");
            signer.token(&c)
        }),
        (
            "not yet valid",
            signer.token(&with("nbf", json!(now() + 600))),
        ),
        (
            "wrong audience",
            signer.token(&with("aud", json!("someone-else"))),
        ),
        (
            "wrong issuer",
            signer.token(&with("iss", json!("https://evil.example"))),
        ),
        ("no tenant", signer.token(&with("tenant", json!(null)))),
        ("bad tenant", signer.token(&with("tenant", json!("a/b")))),
        ("other key", stranger.token(&claims())),
        (
            "unknown kid",
            signer.token_with(&json!({"alg": "EdDSA", "kid": "k9"}), &claims()),
        ),
        ("alg none", {
            let header = b64(json!({"alg": "none", "kid": "k1"}).to_string().as_bytes());
            let payload = b64(claims().to_string().as_bytes());
            format!("{header}.{payload}.")
        }),
        ("HS256 with the public key as secret", {
            let header = b64(json!({"alg": "HS256", "kid": "k1"}).to_string().as_bytes());
            let payload = b64(claims().to_string().as_bytes());
            let public = signer
                .ed
                .as_ref()
                .expect("ed")
                .public_key()
                .as_ref()
                .to_vec();
            let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &public);
            let tag = ring::hmac::sign(&key, format!("{header}.{payload}").as_bytes());
            format!("{header}.{payload}.{}", b64(tag.as_ref()))
        }),
        ("garbage", "a.b.c".to_owned()),
        ("two parts", "a.b".to_owned()),
    ];
    // A valid token with one byte of its payload changed.
    let good = signer.token(&claims());
    let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
    let mut payload = URL_SAFE_NO_PAD.decode(&parts[1]).expect("payload");
    let at_tenant = String::from_utf8_lossy(&payload)
        .find("acme")
        .expect("tenant in payload");
    payload[at_tenant] = b'b';
    parts[1] = b64(&payload);
    refused.push(("tampered payload", parts.join(".")));
    let mut sig = good.clone();
    let last = sig.pop().expect("a char");
    sig.push(if last == 'A' { 'B' } else { 'A' });
    refused.push(("tampered signature", sig));

    for (why, token) in refused {
        assert!(verifier.verify(&token, at).is_err(), "{why} was accepted");
    }
    assert!(verifier.verify(&good, at).is_ok());
    // Why goes to the access log (the client gets the same 401 for all).
    for (token, why) in [
        (
            signer.token(&with("exp", json!(now() - 120))),
            "JWT expired",
        ),
        (
            signer.token(&with("aud", json!("someone-else"))),
            "JWT audience not the one configured",
        ),
        (
            signer.token(&with("iss", json!("https://evil.example"))),
            "JWT issuer not the one configured",
        ),
        (stranger.token(&claims()), "JWT signature invalid"),
        ("a.b".to_owned(), "JWT malformed"),
    ] {
        assert_eq!(verifier.verify(&token, at).err(), Some(TokenRefused(why)));
    }
}

#[test]
fn the_pinned_algorithm_ignores_keys_of_other_kinds() {
    let dir = tempfile::tempdir().expect("dir");
    let ed = Signer::ed25519("ed");
    let ec = Signer::es256("ec");
    let verifier = verifier(&dir, &[&ed, &ec], JwtAlgorithm::Es256);
    let at = OffsetDateTime::now_utc();
    assert!(verifier.verify(&ec.token(&claims()), at).is_ok());
    assert!(verifier.verify(&ed.token(&claims()), at).is_err());
    // A JWKS without a key of the pinned kind stops start-up.
    let only_ed = tempfile::tempdir().expect("dir");
    let path = only_ed.path().join("jwks.json");
    std::fs::write(&path, json!({"keys": [ed.jwk()]}).to_string()).expect("write");
    let settings = JwtSettings {
        issuer: "i".to_owned(),
        audience: "a".to_owned(),
        jwks_file: path,
        algorithm: JwtAlgorithm::Rs256,
        ..JwtSettings::default()
    };
    assert!(JwtVerifier::from_settings(&settings).is_err());
}

#[tokio::test]
async fn a_token_sends_through_the_api_for_its_tenant() {
    use axum::body::Body;
    use axum::extract::connect_info::MockConnectInfo;
    use axum::http::{Request, StatusCode};
    use mailroom_core::store::RedisStore;
    use mailroom_producer::Producer;
    use mailroom_producer::api::{Api, NetworkPolicy};
    use mailroom_tests::rabbit::TestVhost;
    use mailroom_tests::redis::TestPrefix;
    use tower::ServiceExt as _;

    let vhost = TestVhost::new("api-jwt");
    let redis = TestPrefix::new("api-jwt");
    let dir = tempfile::tempdir().expect("dir");
    let signer = Signer::es256("k1");
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, json!({"keys": [signer.jwk()]}).to_string()).expect("write");
    let mut settings = mailroom_tests::stack::base_settings(&vhost, &redis);
    settings.api.jwt = Some(JwtSettings {
        issuer: "https://auth.example".to_owned(),
        audience: "mailroom".to_owned(),
        jwks_file: path,
        algorithm: JwtAlgorithm::Es256,
        ..JwtSettings::default()
    });
    let api = Api::from_parts(
        Producer::connect(&settings).await.expect("producer"),
        RedisStore::connect(&settings.redis).await.expect("redis"),
        settings.hash_key().expect("hash key"),
        NetworkPolicy::default(),
        &settings,
    )
    .expect("api");
    let router = api.router().layer(MockConnectInfo(
        "127.0.0.1:4000"
            .parse::<std::net::SocketAddr>()
            .expect("addr"),
    ));
    let send = |token: String| {
        Request::post("/v1/messages")
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {token}"))
            .body(Body::from(
                json!({"message": {"from": "a@example.com", "to": ["b@example.org"], "subject": "s", "text": "t"}})
                    .to_string(),
            ))
            .expect("request")
    };
    let ok = router
        .clone()
        .oneshot(send(signer.token(&claims())))
        .await
        .expect("call");
    assert_eq!(ok.status(), StatusCode::ACCEPTED);
    let mut read_only = claims();
    read_only["scope"] = json!("read");
    let forbidden = router
        .clone()
        .oneshot(send(signer.token(&read_only)))
        .await
        .expect("call");
    assert_eq!(forbidden.status(), StatusCode::FORBIDDEN);
    let mut expired = claims();
    expired["exp"] = json!(now() - 3600);
    let refused = router
        .clone()
        .oneshot(send(signer.token(&expired)))
        .await
        .expect("call");
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
}
