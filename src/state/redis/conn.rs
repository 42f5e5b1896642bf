//! The connection to Redis: one URL for a single
//! server (a `ConnectionManager`, which reconnects by itself), several comma-separated seed
//! URLs for Redis Cluster (the async cluster client, which follows the slot map).

use std::time::Duration;

use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster_async::ClusterConnection;
use ::redis::{Cmd, Pipeline, RedisFuture, Value};

use crate::config::StateConfig;
use crate::state::StateError;

use super::url::parse_urls;

/// Every connection to Redis sends at once (TCP_NODELAY). redis-rs leaves Nagle's algorithm
/// on by default: a pipelined burst then waits for the ACK of its first segment, which the
/// server delays up to 40 ms. Measured: durable pushes across two instances went from a
/// 75 ms median push → receive latency to a few ms with it.
pub(crate) fn tcp() -> ::redis::io::tcp::TcpSettings {
    ::redis::io::tcp::TcpSettings::default().set_nodelay(true)
}

/// `url` as connection info, with `tcp()`.
pub(crate) fn info(url: &str) -> ::redis::RedisResult<::redis::ConnectionInfo> {
    use ::redis::IntoConnectionInfo;
    Ok(url.into_connection_info()?.set_tcp_settings(tcp()))
}

/// A connection to a single server or to a cluster; cheap to clone (both multiplex).
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct BadUrl(String);

/// Open the connection `cfg` describes. A single server is connected lazily (the gateway
/// starts, and reports the store down, while Redis is away); a cluster needs its slot map,
/// so at least one seed must answer now.
pub(crate) async fn open(cfg: &StateConfig) -> Result<Conn, StateError> {
    let urls =
        parse_urls(&cfg.redis_url).map_err(|e| StateError::unavailable("connect", BadUrl(e)))?;
    let certs = if cfg.redis_ca_file.is_empty() {
        None
    } else {
        let pem =
            std::fs::read(&cfg.redis_ca_file).map_err(|e| StateError::unavailable("connect", e))?;
        Some(::redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem),
        })
    };
    let conn = if urls.len() == 1 {
        let client = info(&urls[0])
            .and_then(|info| match certs {
                Some(certs) => ::redis::Client::build_with_tls(info, certs),
                None => ::redis::Client::open(info),
            })
            .map_err(|e| StateError::unavailable("connect", e))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.timeout))
            .set_response_timeout(Some(cfg.timeout))
            // Reconnect attempts back off up to a second, and keep going: the store
            // coming back must be noticed without a restart.
            .set_number_of_retries(3)
            .set_max_delay(Duration::from_secs(1));
        Conn::Single(
            ConnectionManager::new_lazy_with_config(client, config)
                .map_err(|e| StateError::unavailable("connect", e))?,
        )
    } else {
        let mut builder = ::redis::cluster::ClusterClient::builder(urls)
            .connection_timeout(cfg.timeout)
            .response_timeout(cfg.timeout)
            .tcp_settings(tcp())
            .retries(2);
        if let Some(certs) = certs {
            builder = builder.certs(certs);
        }
        let client = builder
            .build()
            .map_err(|e| StateError::unavailable("connect", e))?;
        let conn = tokio::time::timeout(cfg.timeout * 5, client.get_async_connection())
            .await
            .map_err(|_| StateError::Timeout {
                op: "connect",
                after: cfg.timeout * 5,
            })?
            .map_err(|e| StateError::unavailable("connect", e))?;
        Conn::Cluster(conn)
    };
    Ok(conn)
}
