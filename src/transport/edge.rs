//! What the transports use of the gateway: the admission pieces (limits, trusted proxies,
//! origins, authentication), the certificates, the drain, and the session environment each
//! open connection is handed. Built once by the composition root.

use std::sync::Arc;

use crate::auth::handshake::{OriginPolicy, TrustedProxies};
use crate::auth::Authenticator;
use crate::config::Config;
use crate::lifecycle::Lifecycle;
use crate::limits::Limits;
use crate::session::SessionEnv;
use crate::tls::CertStore;

pub struct Edge {
    pub cfg: Arc<Config>,
    pub auth: Arc<Authenticator>,
    pub limits: Arc<Limits>,
    pub trusted: TrustedProxies,
    pub origins: OriginPolicy,
    pub certs: Option<Arc<CertStore>>,
    /// The UDP port WebTransport sessions are served on (the demo page points browsers at it).
    pub webtransport_port: Option<u16>,
    pub lifecycle: Arc<Lifecycle>,
    /// What each admitted session is handed.
    pub session_env: Arc<SessionEnv>,
}
