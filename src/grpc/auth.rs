//! Token validation by a remote `Auth` service (`auth.mode = "grpc"`). Results pass through
//! the token cache like JWT results; an outage refuses new sessions with a retryable code
//! (4103) and never touches connected ones.

use std::time::Duration;

use tonic::transport::Channel;

use super::pb::auth_client::AuthClient;
use super::pb::ValidateTokenRequest;
use crate::auth::jwt::PLATFORMS;
use crate::auth::{AuthError, Identity, Issued, Verifier};
use crate::protocol::valid_id;

pub struct GrpcVerifier {
    client: AuthClient<Channel>,
    timeout: Duration,
}

impl GrpcVerifier {
    pub fn new(channel: Channel, timeout: Duration) -> GrpcVerifier {
        GrpcVerifier {
            client: AuthClient::new(channel),
            timeout,
        }
    }
}

#[async_trait::async_trait]
impl Verifier for GrpcVerifier {
    async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        // Taken before the question leaves: an answer in flight during a revocation counts
        // as given before it (SPEC §2).
        let asked_ms = crate::now_ms();
        let mut client = self.client.clone();
        let req = ValidateTokenRequest {
            token: token.to_string(),
        };
        let resp = match tokio::time::timeout(self.timeout, client.validate_token(req)).await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(status)) => {
                return Err(AuthError::Unavailable(format!(
                    "auth service: {:?}",
                    status.code()
                )))
            }
            Err(_) => return Err(AuthError::Unavailable("auth service timed out".into())),
        };
        if !resp.valid {
            return Err(AuthError::Invalid("refused by the auth service".into()));
        }
        if !valid_id(&resp.user_id) {
            return Err(AuthError::Invalid(
                "the auth service returned an invalid user id".into(),
            ));
        }
        // Expiry (with `auth.leeway`) is checked by the authenticator, as for JWTs.
        Ok(Identity {
            user: resp.user_id,
            device: Some(resp.device_id).filter(|d| valid_id(d)),
            platform: Some(resp.platform).filter(|p| PLATFORMS.contains(&p.as_str())),
            expires_at_ms: resp.expires_at_ms,
            issued: Issued::Asked(asked_ms),
        })
    }
}
