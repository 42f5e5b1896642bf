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

use crate::gateway::Gateway;

pub async fn serve(gw: Arc<Gateway>, listener: TcpListener, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(_) => continue,
            },
        };
        let gw = gw.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let gw = gw.clone();
                async move { Ok::<_, Infallible>(route(&gw, &req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn route(gw: &Gateway, req: &Request<Incoming>) -> Response<Full<Bytes>> {
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
                "instance": gw.instance_id,
                "state": { "backend": gw.state.backend(), "up": gw.state_up() },
                "connections": gw.hub.connection_count(),
                "draining": gw.is_draining(),
            });
            respond(StatusCode::OK, "application/json", body.to_string())
        }
        "/readyz" => {
            if gw.is_ready() {
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

pub fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: String,
) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}
