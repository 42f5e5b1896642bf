//! The gRPC listener: the push API (`server.rs`) behind API-key (and optional mTLS)
//! authentication, with gRPC health checking and server reflection. Built before the gateway
//! reports itself started.

use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Interceptor;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Status};
use tracing::{error, info};

use super::pb::gateway_server::GatewayServer;
use super::server::{ApiEnv, GatewayService};
use crate::config::Config;

/// Checks `authorization: Bearer <key>` against the configured keys in constant time.
#[derive(Clone)]
pub struct ApiKeys {
    keys: Arc<Vec<Vec<u8>>>,
}

impl ApiKeys {
    pub fn new(keys: Vec<String>) -> ApiKeys {
        ApiKeys {
            keys: Arc::new(keys.into_iter().map(String::into_bytes).collect()),
        }
    }
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    // Length is not secret; the content comparison does not stop at the first difference.
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Interceptor for ApiKeys {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let presented = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::as_bytes);
        match presented {
            Some(key) if self.keys.iter().fold(false, |ok, k| ok | ct_eq(k, key)) => Ok(req),
            Some(_) => Err(Status::unauthenticated("invalid api key")),
            None => Err(Status::unauthenticated(
                "missing `authorization: Bearer <api key>`",
            )),
        }
    }
}

/// The services this listener serves, and only those: proto/ also describes `Business` and
/// `Auth`, which the gateway calls but does not serve, and listing them would advertise
/// methods that answer UNIMPLEMENTED.
pub const SERVED: [&str; 4] = [
    "imgate.v1.Gateway",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Reflection over the served services, with the descriptors of both reflection versions,
/// since both are served.
fn reflection_builder() -> tonic_reflection::server::Builder<'static> {
    let mut b = tonic_reflection::server::Builder::configure()
        .include_reflection_service(false)
        .register_encoded_file_descriptor_set(super::pb::DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET);
    for name in SERVED {
        b = b.with_service_name(name);
    }
    b
}

/// The gRPC API, built before the gateway reports itself started: TLS material that cannot
/// be read, or a configuration that would serve the API without credentials, stops the start
/// instead of leaving a bound port that never answers (or answers anyone).
pub struct Api {
    router: tonic::transport::server::Router,
}

impl Api {
    pub async fn build(config: &Config, env: ApiEnv) -> anyhow::Result<Api> {
        let cfg = &config.grpc;
        let mut builder = Server::builder().tcp_nodelay(true);
        let tls = !cfg.tls_cert.is_empty();
        if tls {
            let cert = std::fs::read(&cfg.tls_cert).context("grpc.tls_cert")?;
            let key = std::fs::read(&cfg.tls_key).context("grpc.tls_key")?;
            let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
            if !cfg.client_ca.is_empty() {
                let ca = std::fs::read(&cfg.client_ca).context("grpc.client_ca")?;
                tls = tls.client_ca_root(Certificate::from_pem(ca));
            }
            builder = builder.tls_config(tls).context("grpc TLS")?;
        }
        let keys = config.api_keys();
        // The client certificate is the credential only when TLS actually asks for one.
        let mtls_only = keys.is_empty() && tls && !cfg.client_ca.is_empty();
        if keys.is_empty() && !mtls_only {
            anyhow::bail!("the gRPC API needs grpc.api_keys, or grpc.client_ca with grpc.tls_cert");
        }
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<GatewayServer<GatewayService>>().await;
        let reflection = reflection_builder().build_v1()?;
        // Older clients (grpcurl before 1.8.8, many language tools) speak only v1alpha.
        let reflection_v1alpha = reflection_builder().build_v1alpha()?;
        let max_message = env.limits.max_push_body.max(64 * 1024) * 2 + 64 * 1024;
        let gateway = GatewayServer::new(GatewayService::new(Arc::new(env)))
            .max_decoding_message_size(max_message);
        let builder = builder
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_v1alpha);
        let router = if mtls_only {
            builder.add_service(gateway)
        } else {
            builder.add_service(tonic::service::interceptor::InterceptedService::new(
                gateway,
                ApiKeys::new(keys),
            ))
        };
        Ok(Api { router })
    }

    /// Serve the gRPC listener until `stop` (after the drain: unary calls are served while
    /// draining, open streams end with UNAVAILABLE when it begins).
    pub async fn serve(self, listener: TcpListener, stop: CancellationToken) {
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, "gRPC listening");
        }
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        if let Err(e) = self
            .router
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await
        {
            error!(error = %format!("{e:#}"), "gRPC listener failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_key_check() {
        let mut keys = ApiKeys::new(vec!["k1".into(), "longer-key".into()]);
        let with = |v: &str| {
            let mut r = Request::new(());
            r.metadata_mut().insert("authorization", v.parse().unwrap());
            r
        };
        assert!(keys.call(with("Bearer k1")).is_ok());
        assert!(keys.call(with("Bearer longer-key")).is_ok());
        assert_eq!(
            keys.call(with("Bearer k2")).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            keys.call(with("k1")).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            keys.call(Request::new(())).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }
}
