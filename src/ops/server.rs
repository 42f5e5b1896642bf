//! The ops listener: `/metrics` (Prometheus text), `/healthz` (alive, with state-store
//! health), `/readyz` (200 once started and until the drain begins, then 503).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::http_util::respond;
use crate::lifecycle::Lifecycle;
use crate::services::Services;
use crate::tls::CertStore;

/// What the ops listener reports on.
pub struct OpsView {
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    pub services: Arc<Services>,
    pub lifecycle: Arc<Lifecycle>,
    pub certs: Option<Arc<CertStore>>,
}

/// Serve until `stop`; each connection's task is tracked by the drain.
pub async fn serve(gw: Arc<OpsView>, listener: TcpListener, stop: CancellationToken) {
    crate::accept::serve(listener, "ops", stop, |stream, _| {
        let view = gw.clone();
        gw.lifecycle.spawn_background(async move {
            let svc = service_fn(move |req| {
                let gw = view.clone();
                async move { Ok::<_, Infallible>(route(&gw, &req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    })
    .await;
}

fn route(gw: &OpsView, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/metrics" => {
            // The certificate gauge is set at each scrape so that it counts down between
            // rotations and reloads. The registry is process-wide: the lock keeps a process
            // that hosts several gateways (the tests) from rendering another one's value.
            static RENDER: parking_lot::Mutex<()> = parking_lot::Mutex::new(());
            let _one_at_a_time = RENDER.lock();
            if let Some(certs) = &gw.certs {
                certs.publish_expiry();
            }
            respond(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                gw.metrics.render(),
            )
        }
        "/healthz" => {
            let body = serde_json::json!({
                "status": "ok",
                "instance": gw.services.instance_id,
                "state": { "backend": gw.services.state.backend(), "up": gw.lifecycle.state_up() },
                "connections": gw.services.hub.connection_count(),
                "draining": gw.lifecycle.is_draining(),
            });
            respond(StatusCode::OK, "application/json", body.to_string())
        }
        "/readyz" => {
            if gw.lifecycle.is_ready() {
                respond(StatusCode::OK, "text/plain", "ready\n".into())
            } else {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "draining\n".into(),
                )
            }
        }
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}
