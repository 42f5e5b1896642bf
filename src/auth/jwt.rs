//! JWT verification (HS256, RS256, ES256) and issuing (HS256, for `imgate token` and
//! `/dev/token`). Error texts never contain the token.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{bail, Context};
use jsonwebtoken::{
    decode, decode_header, Algorithm, DecodingKey, EncodingKey, Header, Validation,
};
use serde::{Deserialize, Serialize};

use super::{AuthError, Identity, Issued, Verifier};
use crate::config::AuthConfig;
use crate::protocol::valid_id;

pub const PLATFORMS: [&str; 5] = ["ios", "android", "web", "desktop", "other"];

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: i64,
    iat: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    did: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    plt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    jti: Option<String>,
}

pub struct JwtVerifier {
    hmac: Option<DecodingKey>,
    /// Public keys without a `kid` (PEM files), tried in order for their algorithm family.
    rsa: Vec<DecodingKey>,
    ec: Vec<DecodingKey>,
    /// JWKS keys by `kid`.
    by_kid: HashMap<String, (DecodingKey, Algorithm)>,
    algorithms: Vec<Algorithm>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: u64,
    /// `auth.max_token_lifetime` in seconds: longer-lived tokens are refused, which is what
    /// lets a revocation be forgotten after that long (review F13).
    max_lifetime: i64,
}

fn algorithm(name: &str) -> anyhow::Result<Algorithm> {
    Ok(match name {
        "HS256" => Algorithm::HS256,
        "RS256" => Algorithm::RS256,
        "ES256" => Algorithm::ES256,
        other => bail!("unsupported algorithm {other:?}"),
    })
}

impl JwtVerifier {
    /// Keys are loaded here; errors name the file. `secret` is the effective HS256 secret.
    pub fn from_config(cfg: &AuthConfig, secret: Option<String>) -> anyhow::Result<JwtVerifier> {
        let algorithms = cfg
            .algorithms
            .iter()
            .map(|a| algorithm(a))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut v = JwtVerifier {
            hmac: secret
                .filter(|s| !s.is_empty())
                .map(|s| DecodingKey::from_secret(s.as_bytes())),
            rsa: Vec::new(),
            ec: Vec::new(),
            by_kid: HashMap::new(),
            algorithms,
            issuer: (!cfg.issuer.is_empty()).then(|| cfg.issuer.clone()),
            audience: (!cfg.audience.is_empty()).then(|| cfg.audience.clone()),
            leeway: cfg.leeway.as_secs(),
            max_lifetime: i64::try_from(cfg.max_token_lifetime.as_secs()).unwrap_or(i64::MAX),
        };
        for path in &cfg.jwt_public_keys {
            let pem = std::fs::read(path)
                .with_context(|| format!("auth.jwt_public_keys: cannot read {path}"))?;
            if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
                v.ec.push(k);
            } else if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
                v.rsa.push(k);
            } else {
                bail!("auth.jwt_public_keys: {path} is not an RSA or EC public key in PEM");
            }
        }
        if !cfg.jwks_file.is_empty() {
            let text = std::fs::read_to_string(&cfg.jwks_file)
                .with_context(|| format!("auth.jwks_file: cannot read {}", cfg.jwks_file))?;
            let set: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&text)
                .with_context(|| format!("auth.jwks_file: {} is not a JWKS", cfg.jwks_file))?;
            for jwk in &set.keys {
                let Some(kid) = jwk.common.key_id.clone() else {
                    continue;
                };
                let key = DecodingKey::from_jwk(jwk)
                    .with_context(|| format!("auth.jwks_file: key {kid:?}"))?;
                let alg = match &jwk.algorithm {
                    jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
                    jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => Algorithm::RS256,
                    _ => continue,
                };
                v.by_kid.insert(kid, (key, alg));
            }
        }
        Ok(v)
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut val = Validation::new(alg);
        val.leeway = self.leeway;
        let mut required = vec!["exp", "iat", "sub"];
        if self.issuer.is_some() {
            required.push("iss");
        }
        if self.audience.is_some() {
            required.push("aud");
        }
        val.set_required_spec_claims(&required);
        val.validate_exp = true;
        // `nbf` is optional, but honoured (with the leeway) when a token carries it.
        val.validate_nbf = true;
        if let Some(iss) = &self.issuer {
            val.set_issuer(&[iss]);
        }
        match &self.audience {
            Some(aud) => val.set_audience(&[aud]),
            None => val.validate_aud = false,
        }
        val
    }

    fn check(&self, token: &str) -> Result<Claims, AuthError> {
        let header =
            decode_header(token).map_err(|_| AuthError::Invalid("malformed token".into()))?;
        let alg = header.alg;
        if !self.algorithms.contains(&alg) {
            return Err(AuthError::Invalid(format!(
                "algorithm {alg:?} is not accepted"
            )));
        }
        let candidates: Vec<&DecodingKey> = match (&header.kid, alg) {
            (Some(kid), _) if self.by_kid.contains_key(kid) => {
                let (k, a) = &self.by_kid[kid];
                if *a != alg {
                    return Err(AuthError::Invalid("key and algorithm do not match".into()));
                }
                vec![k]
            }
            (_, Algorithm::HS256) => self.hmac.iter().collect(),
            (_, Algorithm::RS256) => self.rsa.iter().collect(),
            (_, Algorithm::ES256) => self.ec.iter().collect(),
            _ => vec![],
        };
        if candidates.is_empty() {
            return Err(AuthError::Invalid("no key for this token".into()));
        }
        let validation = self.validation(alg);
        let mut last = AuthError::Invalid("bad signature".into());
        for key in candidates {
            match decode::<Claims>(token, key, &validation) {
                Ok(data) => return Ok(data.claims),
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind;
                    last = match e.kind() {
                        ErrorKind::ExpiredSignature => return Err(AuthError::Expired),
                        ErrorKind::InvalidSignature => AuthError::Invalid("bad signature".into()),
                        ErrorKind::InvalidIssuer => {
                            return Err(AuthError::Invalid("wrong issuer".into()))
                        }
                        ErrorKind::InvalidAudience => {
                            return Err(AuthError::Invalid("wrong audience".into()))
                        }
                        ErrorKind::MissingRequiredClaim(c) => {
                            return Err(AuthError::Invalid(format!("claim `{c}` is required")))
                        }
                        ErrorKind::ImmatureSignature => {
                            return Err(AuthError::Invalid("token not valid yet".into()))
                        }
                        _ => AuthError::Invalid("invalid token".into()),
                    };
                }
            }
        }
        Err(last)
    }
}

#[async_trait::async_trait]
impl Verifier for JwtVerifier {
    async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let c = self.check(token)?;
        if !valid_id(&c.sub) {
            return Err(AuthError::Invalid(
                "`sub` must be 1-128 chars of A-Z a-z 0-9 . _ : @ -".into(),
            ));
        }
        if c.did.as_deref().is_some_and(|d| !valid_id(d)) {
            return Err(AuthError::Invalid("`did` is not a valid device id".into()));
        }
        if c.plt.as_deref().is_some_and(|p| !PLATFORMS.contains(&p)) {
            return Err(AuthError::Invalid("`plt` is not a known platform".into()));
        }
        if c.iat > crate::now_ms() / 1000 + self.leeway as i64 {
            return Err(AuthError::Invalid("`iat` is in the future".into()));
        }
        if c.exp.saturating_sub(c.iat) > self.max_lifetime {
            return Err(AuthError::Invalid(
                "the token lives longer than auth.max_token_lifetime".into(),
            ));
        }
        Ok(Identity {
            user: c.sub,
            device: c.did,
            platform: c.plt,
            expires_at_ms: c.exp.saturating_mul(1000),
            issued: Issued::Claim(c.iat.saturating_mul(1000)),
        })
    }
}

/// Issue an HS256 token: `iat` now, `exp` now + ttl, a random `jti`.
pub fn issue_hs256(
    secret: &str,
    user: &str,
    device: Option<&str>,
    platform: Option<&str>,
    ttl: Duration,
) -> anyhow::Result<String> {
    anyhow::ensure!(
        valid_id(user),
        "the user id must be 1-128 chars of A-Z a-z 0-9 . _ : @ -"
    );
    anyhow::ensure!(device.is_none_or(valid_id), "invalid device id");
    anyhow::ensure!(
        platform.is_none_or(|p| PLATFORMS.contains(&p)),
        "platform must be one of {PLATFORMS:?}"
    );
    let now = crate::now_ms() / 1000;
    let claims = Claims {
        sub: user.to_string(),
        iat: now,
        exp: now + ttl.as_secs().max(1) as i64,
        did: device.map(str::to_string),
        plt: platform.map(str::to_string),
        jti: Some(format!("{:016x}", rand::random::<u64>())),
    };
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const SECRET: &str = "test-secret";

    fn verifier(tweak: impl FnOnce(&mut AuthConfig)) -> JwtVerifier {
        let mut cfg = AuthConfig::default();
        tweak(&mut cfg);
        JwtVerifier::from_config(&cfg, Some(SECRET.into())).unwrap()
    }

    fn hs(claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    fn now() -> i64 {
        crate::now_ms() / 1000
    }

    async fn verify(v: &JwtVerifier, t: &str) -> Result<Identity, AuthError> {
        v.verify(t).await
    }

    #[tokio::test]
    async fn hs256_issue_and_verify() {
        let v = verifier(|_| {});
        let t = issue_hs256(
            SECRET,
            "alice",
            Some("d1"),
            Some("ios"),
            Duration::from_secs(60),
        )
        .unwrap();
        let id = verify(&v, &t).await.unwrap();
        assert_eq!(
            (
                id.user.as_str(),
                id.device.as_deref(),
                id.platform.as_deref()
            ),
            ("alice", Some("d1"), Some("ios"))
        );
        assert!(id.expires_at_ms > crate::now_ms());
        let other =
            issue_hs256("other-secret", "alice", None, None, Duration::from_secs(60)).unwrap();
        assert_eq!(
            verify(&v, &other).await,
            Err(AuthError::Invalid("bad signature".into()))
        );
        assert!(matches!(
            verify(&v, "garbage").await,
            Err(AuthError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn claims_are_checked() {
        let v = verifier(|c| c.leeway = Duration::from_secs(5));
        let n = now();
        assert_eq!(
            verify(&v, &hs(json!({"sub":"a","iat":n-100,"exp":n-10}))).await,
            Err(AuthError::Expired)
        );
        // Longer-lived than auth.max_token_lifetime (30 d): refused, so that a revocation
        // can be forgotten after that long.
        let month = 30 * 24 * 3600;
        assert!(verify(&v, &hs(json!({"sub":"a","iat":n,"exp":n+month})))
            .await
            .is_ok());
        assert!(verify(&v, &hs(json!({"sub":"a","iat":n,"exp":n+month+1})))
            .await
            .is_err());
        // Within the leeway: still valid.
        assert!(verify(&v, &hs(json!({"sub":"a","iat":n-100,"exp":n-2})))
            .await
            .is_ok());
        for bad in [
            json!({"iat":n,"exp":n+60}),
            json!({"sub":"a","exp":n+60}),
            json!({"sub":"a","iat":n}),
            json!({"sub":"bad id","iat":n,"exp":n+60}),
            json!({"sub":"a","iat":n,"exp":n+60,"did":"bad id"}),
            json!({"sub":"a","iat":n,"exp":n+60,"plt":"toaster"}),
            json!({"sub":"a","iat":n+3600,"exp":n+7200}),
        ] {
            assert!(
                matches!(
                    verify(&v, &hs(bad.clone())).await,
                    Err(AuthError::Invalid(_))
                ),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn issuer_and_audience_when_configured() {
        let v = verifier(|c| {
            c.issuer = "https://id".into();
            c.audience = "imgate".into();
        });
        let n = now();
        assert!(verify(
            &v,
            &hs(json!({"sub":"a","iat":n,"exp":n+60,"iss":"https://id","aud":"imgate"}))
        )
        .await
        .is_ok());
        assert!(verify(
            &v,
            &hs(json!({"sub":"a","iat":n,"exp":n+60,"iss":"https://evil","aud":"imgate"}))
        )
        .await
        .is_err());
        assert!(verify(
            &v,
            &hs(json!({"sub":"a","iat":n,"exp":n+60,"iss":"https://id"}))
        )
        .await
        .is_err());
        // Not configured: not checked.
        let v = verifier(|_| {});
        assert!(verify(
            &v,
            &hs(json!({"sub":"a","iat":n,"exp":n+60,"iss":"x","aud":"y"}))
        )
        .await
        .is_ok());
    }

    #[tokio::test]
    async fn rs256_from_a_pem_file_and_jwks_by_kid() {
        use base64::Engine;
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        let dir = std::env::temp_dir().join(format!("imgate-rsa-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let pem_path = dir.join("rs256.pub.pem");
        std::fs::write(&pem_path, key.public_key_pem()).unwrap();
        let enc = EncodingKey::from_rsa_pem(key.serialize_pem().as_bytes()).unwrap();
        let n = now();
        let claims = json!({"sub":"rsa","iat":n,"exp":n+60});
        let t = jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &enc).unwrap();
        let v = verifier(|c| c.jwt_public_keys = vec![pem_path.display().to_string()]);
        assert_eq!(verify(&v, &t).await.unwrap().user, "rsa");

        // The same key as a JWKS entry, chosen by the token's kid.
        let der = key.public_key_raw();
        let (_, rsa) = x509_parser::der_parser::der::parse_der(der).unwrap();
        let seq = rsa.as_sequence().unwrap();
        let b64 = |b: &[u8]| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(b.strip_prefix(&[0u8]).unwrap_or(b))
        };
        let (modulus, exponent) = (seq[0].as_slice().unwrap(), seq[1].as_slice().unwrap());
        let jwks = json!({"keys": [{"kty":"RSA","kid":"k1","alg":"RS256","use":"sig","n": b64(modulus),"e": b64(exponent)}]});
        let jwks_path = dir.join("jwks.json");
        std::fs::write(&jwks_path, jwks.to_string()).unwrap();
        let v = verifier(|c| c.jwks_file = jwks_path.display().to_string());
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some("k1".into());
        let t = jsonwebtoken::encode(&header, &claims, &enc).unwrap();
        assert_eq!(verify(&v, &t).await.unwrap().user, "rsa");
        header.kid = Some("unknown".into());
        let t = jsonwebtoken::encode(&header, &claims, &enc).unwrap();
        assert!(
            verify(&v, &t).await.is_err(),
            "an unknown kid and no PEM key: refused"
        );
        std::fs::remove_dir_all(dir).ok();
    }

    #[tokio::test]
    async fn es256_from_a_pem_file_and_algorithm_allow_list() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let dir = std::env::temp_dir().join(format!("imgate-jwt-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let pub_path = dir.join("es256.pub.pem");
        std::fs::write(&pub_path, key.public_key_pem()).unwrap();
        let enc = EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
        let n = now();
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::ES256),
            &json!({"sub":"ec","iat":n,"exp":n+60}),
            &enc,
        )
        .unwrap();
        let v = verifier(|c| c.jwt_public_keys = vec![pub_path.display().to_string()]);
        assert_eq!(verify(&v, &t).await.unwrap().user, "ec");
        let only_hs = verifier(|c| {
            c.jwt_public_keys = vec![pub_path.display().to_string()];
            c.algorithms = vec!["HS256".into()];
        });
        assert!(matches!(
            verify(&only_hs, &t).await,
            Err(AuthError::Invalid(_))
        ));
        // An HS256 token cannot pass as ES256 with no secret configured.
        let no_secret = JwtVerifier::from_config(&AuthConfig::default(), None).unwrap();
        assert!(
            verify(&no_secret, &hs(json!({"sub":"a","iat":n,"exp":n+60})))
                .await
                .is_err()
        );
        let missing = AuthConfig {
            jwt_public_keys: vec!["/nonexistent.pem".into()],
            ..AuthConfig::default()
        };
        let err = JwtVerifier::from_config(&missing, None)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("auth.jwt_public_keys"), "{err}");
        std::fs::remove_dir_all(dir).ok();
    }
}
