//! Authentication: token extraction at the handshake, JWT verification (or a remote
//! `Auth` service), the token cache, and revocation.

pub mod cache;
pub mod handshake;
pub mod jwt;

use std::sync::Arc;

use crate::config::{AuthConfig, Profile};
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

/// The one entry point the transports use: verification through the cache, then revocation.
pub struct Authenticator {
    _verifier: Arc<dyn Verifier>,
    _cache: cache::TokenCache,
}

impl Authenticator {
    /// JWT verification from config (keys loaded here; errors name the key).
    pub fn from_config(_cfg: &AuthConfig, _profile: Profile) -> anyhow::Result<Authenticator> {
        todo!()
    }

    pub fn new(_verifier: Arc<dyn Verifier>, _cfg: &AuthConfig) -> Authenticator {
        todo!()
    }

    /// Verify a token (cached), refusing expired and revoked ones.
    pub async fn authenticate(&self, _token: &str) -> Result<Identity, AuthError> {
        todo!()
    }

    /// Refuse from now on every token of `user` issued at or before `at_ms`; returns how
    /// many cache entries were evicted.
    pub fn revoke_user(&self, _user: &str, _at_ms: i64) -> u32 {
        todo!()
    }

    /// Is this (already verified) identity revoked now?
    pub fn is_revoked(&self, _id: &Identity) -> bool {
        todo!()
    }
}
