//! Authentication: token extraction at the handshake, JWT verification (or a remote
//! `Auth` service), the token cache, and revocation.

pub mod cache;
pub mod handshake;
pub mod jwt;

use std::collections::{HashMap, VecDeque};
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
    /// The token's `exp` in ms. Sessions live until `auth.leeway` past it.
    pub expires_at_ms: i64,
    /// What a revocation is compared with.
    pub issued: Issued,
}

/// When a token counts as issued, for revocation (SPEC §2: tokens issued before a
/// revocation are refused from then on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Issued {
    /// A JWT's `iat`, in ms (whole seconds): compared with a revocation at one-second
    /// resolution, so a token issued in the second of a kick is refused too.
    Claim(i64),
    /// A remote `Auth` service result: the moment (ms) the gateway sent the question. The
    /// service is the authority on its tokens, so only answers it gave before a revocation
    /// (cached or in flight) are refused; a question sent later is its to answer.
    Asked(i64),
}

impl Issued {
    /// Whether a revocation at `at_ms` applies.
    fn revoked_by(self, at_ms: i64) -> bool {
        match self {
            Issued::Claim(iat_ms) => iat_ms.div_euclid(1000) <= at_ms.div_euclid(1000),
            Issued::Asked(asked_ms) => asked_ms <= at_ms,
        }
    }
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
    /// user → the latest revocations. Tokens issued at or before them are refused.
    revoked: Mutex<Revoked>,
    /// How long a revocation is remembered: the longest lifetime of a token accepted.
    memory_ms: i64,
    /// `auth.leeway` in ms: clock skew tolerated on `exp` (JWTs also get it on `nbf` and
    /// `iat`, in the verifier).
    leeway_ms: i64,
}

/// One user's revocations: user-wide, and per device (`did`).
#[derive(Debug, Default)]
struct Revocations {
    user: Option<i64>,
    devices: HashMap<String, i64>,
}

/// Every user's revocations, and the order they were recorded in, so that forgetting the
/// ones older than the memory is amortised O(1) per revocation instead of a scan of the whole
/// map under the lock that every authentication takes (review F13).
#[derive(Default)]
struct Revoked {
    users: HashMap<String, Revocations>,
    order: VecDeque<(i64, String)>,
}

impl Revoked {
    /// Forget what is older than `memory_ms`: no token accepted lives that long after its
    /// `iat` (`auth.max_token_lifetime`; a refreshed token has a newer `iat`).
    fn prune(&mut self, now: i64, memory_ms: i64) {
        while let Some((at, _)) = self.order.front() {
            if now.saturating_sub(*at) < memory_ms {
                break;
            }
            let Some((_, user)) = self.order.pop_front() else {
                break;
            };
            if let Some(r) = self.users.get_mut(&user) {
                let fresh = |t: &i64| now.saturating_sub(*t) < memory_ms;
                r.devices.retain(|_, t| fresh(t));
                r.user = r.user.filter(fresh);
                if r.user.is_none() && r.devices.is_empty() {
                    self.users.remove(&user);
                }
            }
        }
    }
}

/// Device revocations kept per user; beyond it the oldest one is folded into the user-wide
/// time. That errs on the safe side: it also refuses other devices' tokens issued before
/// that (old) revocation, and never lets a revoked token back in.
const DEVICE_REVOCATIONS_PER_USER: usize = 256;

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
            revoked: Mutex::new(Revoked::default()),
            memory_ms: i64::try_from(cfg.max_token_lifetime.as_millis())
                .unwrap_or(i64::MAX)
                .saturating_add(i64::try_from(cfg.leeway.as_millis()).unwrap_or(0)),
            leeway_ms: i64::try_from(cfg.leeway.as_millis()).unwrap_or(i64::MAX),
        }
    }

    /// Verify a token (cached), refusing expired and revoked ones.
    pub async fn authenticate(&self, token: &str) -> Result<Identity, AuthError> {
        let key = cache::key(token);
        let result = match self.cache.get(&key) {
            // An answer of the remote Auth service from before a revocation that reached
            // the cache after the revocation had cleared it (it was in flight): ask again,
            // as for any token of that user after the revocation.
            Some(Ok(id)) if matches!(id.issued, Issued::Asked(_)) && self.is_revoked(&id) => {
                self.cache.remove(&key);
                self.verify(key, token).await
            }
            Some(r) => r,
            None => self.verify(key, token).await,
        };
        let result = result.and_then(|id| {
            if self.session_deadline_ms(&id) <= crate::now_ms() {
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

    async fn verify(&self, key: cache::Key, token: &str) -> Result<Identity, AuthError> {
        let r = self.verifier.verify(token).await;
        self.cache.put(key, &r);
        r
    }

    /// When a session on this identity is closed with 4501: `auth.leeway` after `exp`, the
    /// same tolerance the token was admitted with.
    pub fn session_deadline_ms(&self, id: &Identity) -> i64 {
        id.expires_at_ms.saturating_add(self.leeway_ms)
    }

    /// Refuse from now on the tokens of `user` issued at or before `at_ms`: all of them
    /// (`device` `None`), or only those whose `did` is `device`. (`iat` has one-second
    /// resolution, so a token issued in the same second is refused too.) Returns how many
    /// cache entries were evicted.
    pub fn revoke(&self, user: &str, device: Option<&str>, at_ms: i64) -> u32 {
        self.set_revoked(user, device, at_ms);
        self.cache.evict(user, device)
    }

    /// Record a revocation learned from elsewhere (another instance, the state store).
    pub fn set_revoked(&self, user: &str, device: Option<&str>, at_ms: i64) {
        let mut revoked = self.revoked.lock();
        revoked.prune(crate::now_ms(), self.memory_ms);
        // Already known (the bus and the store both tell it; every login re-reads it): no
        // second entry in the forgetting order.
        let known = revoked.users.get(user).and_then(|r| match device {
            None => r.user,
            Some(d) => r.devices.get(d).copied(),
        });
        if known.is_some_and(|k| k >= at_ms) {
            return;
        }
        revoked.order.push_back((at_ms, user.to_string()));
        let r = revoked.users.entry(user.to_string()).or_default();
        let at = match device {
            None => r.user.get_or_insert(at_ms),
            Some(d) => {
                if r.devices.len() >= DEVICE_REVOCATIONS_PER_USER && !r.devices.contains_key(d) {
                    if let Some((oldest, t)) = r
                        .devices
                        .iter()
                        .min_by_key(|(_, t)| **t)
                        .map(|(d, t)| (d.clone(), *t))
                    {
                        r.devices.remove(&oldest);
                        r.user = r.user.max(Some(t));
                    }
                }
                r.devices.entry(d.to_string()).or_insert(at_ms)
            }
        };
        *at = (*at).max(at_ms);
    }

    /// Is this (already verified) identity revoked now? A token without `did` falls only to
    /// a user-wide revocation.
    pub fn is_revoked(&self, id: &Identity) -> bool {
        let revoked = self.revoked.lock();
        let Some(r) = revoked.users.get(&id.user) else {
            return false;
        };
        let device = id.device.as_deref().and_then(|d| r.devices.get(d).copied());
        r.user
            .max(device)
            .is_some_and(|at| id.issued.revoked_by(at))
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
        let evicted = a.revoke("kim", None, crate::now_ms());
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
            issued: Issued::Claim(crate::now_ms() + 1000),
        };
        assert!(!a.is_revoked(&later));
    }

    fn id(user: &str, device: Option<&str>, issued: Issued) -> Identity {
        Identity {
            user: user.into(),
            device: device.map(str::to_string),
            platform: None,
            expires_at_ms: crate::now_ms() + 60_000,
            issued,
        }
    }

    #[test]
    fn a_device_revocation_spares_other_devices_and_tokens_without_did() {
        let a = auth();
        let now = crate::now_ms();
        let before = Issued::Claim(now - 5_000);
        a.revoke("kim", Some("phone"), now);
        assert!(a.is_revoked(&id("kim", Some("phone"), before)));
        assert!(!a.is_revoked(&id("kim", Some("laptop"), before)));
        assert!(
            !a.is_revoked(&id("kim", None, before)),
            "no did: only a user-wide revocation applies"
        );
        assert!(!a.is_revoked(&id("lee", Some("phone"), before)));
        a.revoke("kim", None, now);
        assert!(a.is_revoked(&id("kim", Some("laptop"), before)));
        assert!(a.is_revoked(&id("kim", None, before)));
    }

    #[test]
    fn device_revocations_are_bounded_and_never_forgotten() {
        let a = auth();
        // Recent: revocations older than auth.max_token_lifetime are forgotten.
        let base = crate::now_ms() - 1_000_000;
        for i in 0..=DEVICE_REVOCATIONS_PER_USER as i64 {
            a.revoke("kim", Some(&format!("d{i}")), base + i * 1000);
        }
        let r = a.revoked.lock();
        assert_eq!(r.users["kim"].devices.len(), DEVICE_REVOCATIONS_PER_USER);
        drop(r);
        // The oldest device's revocation became user-wide: its tokens stay refused, and so
        // are other devices' tokens from before it (the safe side).
        assert!(a.is_revoked(&id("kim", Some("d0"), Issued::Claim(base - 1000))));
        assert!(a.is_revoked(&id("kim", Some("other"), Issued::Claim(base - 1000))));
        assert!(!a.is_revoked(&id("kim", Some("other"), Issued::Claim(base + 1000))));
    }

    #[test]
    fn remote_results_compare_at_millisecond_resolution() {
        let a = auth();
        let at = 1_000_000_500;
        a.revoke("kim", None, at);
        // Asked before the revocation (in flight or cached): refused.
        assert!(a.is_revoked(&id("kim", None, Issued::Asked(at - 1))));
        // Asked after it, even in the same second: the service's answer stands.
        assert!(!a.is_revoked(&id("kim", None, Issued::Asked(at + 1))));
        // A JWT issued in that second falls to it.
        assert!(a.is_revoked(&id("kim", None, Issued::Claim(1_000_000_000))));
    }

    #[tokio::test]
    async fn leeway_applies_to_exp() {
        let n = crate::now_ms() / 1000;
        let expired_1s_ago = |secret: &str| {
            jsonwebtoken::encode(
                &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
                &serde_json::json!({"sub": "kim", "iat": n - 60, "exp": n - 1}),
                &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
            )
            .unwrap()
        };
        let t = expired_1s_ago(crate::config::DEV_JWT_SECRET);
        let a = auth();
        let id = a.authenticate(&t).await.expect("within the default leeway");
        assert_eq!(
            a.session_deadline_ms(&id),
            id.expires_at_ms + 30_000,
            "the session lives until exp + leeway"
        );
        let strict = Authenticator::from_config(
            &AuthConfig {
                leeway: Duration::ZERO,
                ..AuthConfig::default()
            },
            Profile::Dev,
        )
        .unwrap();
        assert_eq!(strict.authenticate(&t).await, Err(AuthError::Expired));
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

    /// Review F13: revocations older than the memory are forgotten in the order they came,
    /// without a scan of every user; a newer one of the same user is kept.
    #[test]
    fn old_revocations_are_forgotten_in_order() {
        let mut r = Revoked::default();
        let day = 24 * 3600 * 1000;
        for (at, user) in [(0, "a"), (day, "b"), (2 * day, "a")] {
            r.order.push_back((at, user.to_string()));
            r.users.entry(user.to_string()).or_default().user = Some(at);
        }
        r.prune(day + day / 2, day);
        assert_eq!(r.users.len(), 2, "a's newer revocation and b's are kept");
        assert_eq!(r.order.len(), 2);
        r.prune(3 * day, day);
        assert!(r.users.is_empty() && r.order.is_empty());
    }
}
