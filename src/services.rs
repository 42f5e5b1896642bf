//! The services every part of the gateway shares: authentication, the hub of live
//! connections, the state store, delivery and the business upstream. Plain services only:
//! no configuration, no listeners, no lifecycle (those are `app.rs` and `lifecycle.rs`).

use std::sync::Arc;

use crate::auth::Authenticator;
use crate::cluster::Cluster;
use crate::delivery::Deliverer;
use crate::hub::{Hub, PresenceEvents};
use crate::protocol::CloseCode;
use crate::state::{State, StateError};
use crate::upstream::Upstream;

pub struct Services {
    pub instance_id: String,
    pub auth: Arc<Authenticator>,
    pub hub: Arc<Hub>,
    pub state: Arc<dyn State>,
    pub delivery: Arc<Deliverer>,
    pub upstream: Upstream,
    /// Presence changes for the business backend (`upstream.mode = "grpc"`).
    pub status: Option<Arc<dyn PresenceEvents>>,
    /// With Redis: the other instances (bus, registry).
    pub cluster: Option<Arc<Cluster>>,
}

impl Services {
    /// Close a user's connections with 4502 and revoke their tokens issued until now, so
    /// a kicked client cannot simply reconnect (SPEC §2). With `device`, only that device:
    /// its connections and the tokens whose `did` is that device; the user's other devices
    /// keep their sessions and tokens.
    pub async fn kick_user(
        &self,
        user: &str,
        device: Option<&str>,
        reason: &str,
    ) -> Result<u32, StateError> {
        let reason = if reason.is_empty() {
            CloseCode::Kicked.reason()
        } else {
            reason
        };
        // The revocation is recorded before the hub is asked for the connections: a session
        // that registers after `hub.kick` looked checks it (session::serve).
        self.revoke(user, device, Some(reason)).await?;
        Ok(self.hub.kick(user, device, CloseCode::Kicked, reason))
    }

    /// Refuse from now on every token of `user` issued until now (of its device `device`
    /// only, when given); returns the cache entries evicted.
    pub async fn revoke_tokens(&self, user: &str, device: Option<&str>) -> Result<u32, StateError> {
        self.revoke(user, device, None).await
    }

    /// Record a revocation in the store, here, and on every other instance (which also
    /// kicks the connections concerned when `kick` gives a reason).
    async fn revoke(
        &self,
        user: &str,
        device: Option<&str>,
        kick: Option<&str>,
    ) -> Result<u32, StateError> {
        let now = crate::now_ms();
        self.state.revoke(user, device, now).await?;
        if let Some(c) = &self.cluster {
            c.revoke(user, device, now, kick);
        }
        Ok(self.auth.revoke(user, device, now))
    }
}
