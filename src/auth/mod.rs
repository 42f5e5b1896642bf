//! Authentication: token extraction at the handshake, JWT verification (or a remote
//! `Auth` service), the token cache, and revocation.

pub mod cache;
pub mod handshake;
pub mod jwt;

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::config::{AuthConfig, Profile};
use crate::ops::metrics;
use crate::protocol::CloseCode;

/// Who a valid token says the client is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    /// `did` claim.
    pub device: Option<String>,
    /// `plt` claim.
    pub platform: Option<String>,
    pub expires_at_ms: i64,
    /// `iat` in ms (0 when the verifier does not know it).
    pub issued_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Bad signature, bad claims, unknown key, malformed: close 4500.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// `exp` passed: close 4501.
    #[error("token expired")]
    Expired,
    /// Issued before the user was kicked or had their tokens invalidated: close 4500.
    #[error("token revoked")]
    Revoked,
    /// The remote auth service could not answer: close 4103 (the client retries).
    #[error("auth service unavailable: {0}")]
    Unavailable(String),
}

impl AuthError {
    pub fn close_code(&self) -> CloseCode {
        match self {
            AuthError::Invalid(_) | AuthError::Revoked => CloseCode::Unauthorized,
            AuthError::Expired => CloseCode::TokenExpired,
            AuthError::Unavailable(_) => CloseCode::Internal,
        }
    }

    /// Metrics label for `imgate_auth_total{result}`.
    pub fn result_label(&self) -> &'static str {
        match self {
            AuthError::Invalid(_) => "invalid",
            AuthError::Expired => "expired",
            AuthError::Revoked => "revoked",
            AuthError::Unavailable(_) => "unavailable",
        }
    }
}

/// Checks a token and says who it belongs to. JWT here; the remote `Auth` service later.
#[async_trait::async_trait]
pub trait Verifier: Send + Sync + 'static {
    async fn verify(&self, token: &str) -> Result<Identity, AuthError>;
}

/// The one entry point the transports use: verification through the cache, then expiry
/// and revocation.
pub struct Authenticator {
    verifier: Arc<dyn Verifier>,
    cache: cache::TokenCache,
    /// user → latest revocation time (ms). Tokens issued at or before it are refused.
    revoked: Mutex<HashMap<String, i64>>,
}

/// Revocations older than this are forgotten: no token we accept lives that long after its
/// `iat` without being refreshed (a refreshed token has a newer `iat`).
const REVOCATION_MEMORY_MS: i64 = 30 * 24 * 3600 * 1000;

impl Authenticator {
    /// JWT verification from config (keys loaded here; errors name the key).
    pub fn from_config(cfg: &AuthConfig, profile: Profile) -> anyhow::Result<Authenticator> {
        let secret = if !cfg.jwt_secret.is_empty() {
            Some(cfg.jwt_secret.clone())
        } else if profile == Profile::Dev {
            Some(crate::config::DEV_JWT_SECRET.to_string())
        } else {
            None
        };
        let verifier = jwt::JwtVerifier::from_config(cfg, secret)?;
        Ok(Authenticator::new(Arc::new(verifier), cfg))
    }

    pub fn new(verifier: Arc<dyn Verifier>, cfg: &AuthConfig) -> Authenticator {
        Authenticator {
            verifier,
            cache: cache::TokenCache::new(cfg.cache_max_entries, cfg.cache_ttl, cfg.negative_ttl),
            revoked: Mutex::new(HashMap::new()),
        }
    }

    /// Verify a token (cached), refusing expired and revoked ones.
    pub async fn authenticate(&self, token: &str) -> Result<Identity, AuthError> {
        let key = cache::key(token);
        let result = match self.cache.get(&key) {
            Some(r) => r,
            None => {
                let r = self.verifier.verify(token).await;
                self.cache.put(key, &r);
                r
            }
        };
        let result = result.and_then(|id| {
            if id.expires_at_ms <= crate::now_ms() {
                Err(AuthError::Expired)
            } else if self.is_revoked(&id) {
                Err(AuthError::Revoked)
            } else {
                Ok(id)
            }
        });
        metrics::auth_result(match &result {
            Ok(_) => "ok",
            Err(e) => e.result_label(),
        });
        result
    }

    /// Refuse from now on every token of `user` issued at or before `at_ms` (`iat` has
    /// one-second resolution, so a token issued in the same second is refused too); returns
    /// how many cache entries were evicted.
    pub fn revoke_user(&self, user: &str, at_ms: i64) -> u32 {
        self.set_revoked(user, at_ms);
        self.cache.evict_user(user)
    }

    /// Record a revocation learned from elsewhere (another instance, the state store).
    pub fn set_revoked(&self, user: &str, at_ms: i64) {
        let mut map = self.revoked.lock();
        let now = crate::now_ms();
        if map.len() > 10_000 {
            map.retain(|_, t| now - *t < REVOCATION_MEMORY_MS);
        }
        let entry = map.entry(user.to_string()).or_insert(at_ms);
        *entry = (*entry).max(at_ms);
    }

    /// Is this (already verified) identity revoked now?
    pub fn is_revoked(&self, id: &Identity) -> bool {
        // Compare at `iat`'s whole-second resolution.
        let issued_s = id.issued_at_ms.div_euclid(1000);
        self.revoked
            .lock()
            .get(&id.user)
            .is_some_and(|at| issued_s <= at.div_euclid(1000))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn auth() -> Authenticator {
        Authenticator::from_config(&AuthConfig::default(), Profile::Dev).unwrap()
    }

    fn token(user: &str) -> String {
        jwt::issue_hs256(
            crate::config::DEV_JWT_SECRET,
            user,
            None,
            None,
            Duration::from_secs(600),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn revocation_refuses_old_tokens_and_evicts_cached_ones() {
        let a = auth();
        let t = token("kim");
        assert!(a.authenticate(&t).await.is_ok());
        assert_eq!(a.cache.len(), 1);
        let evicted = a.revoke_user("kim", crate::now_ms());
        assert_eq!(evicted, 1);
        assert_eq!(a.authenticate(&t).await, Err(AuthError::Revoked));
        // Other users are not affected.
        assert!(a.authenticate(&token("lee")).await.is_ok());
        // A token issued after the revocation (next second) is accepted.
        let later = Identity {
            user: "kim".into(),
            device: None,
            platform: None,
            expires_at_ms: crate::now_ms() + 60_000,
            issued_at_ms: crate::now_ms() + 1000,
        };
        assert!(!a.is_revoked(&later));
    }

    #[tokio::test]
    async fn invalid_tokens_are_cached_negatively() {
        let a = auth();
        for _ in 0..3 {
            assert!(matches!(
                a.authenticate("junk").await,
                Err(AuthError::Invalid(_))
            ));
        }
        assert_eq!(a.cache.len(), 1);
    }
}
