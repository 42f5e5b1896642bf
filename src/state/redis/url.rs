//! The rules of `state.redis_url`, apart from the connection so that config validation can
//! check a URL without importing the Redis backend (which imports the config).

use ::redis::IntoConnectionInfo;

/// The seed URLs of `state.redis_url`: one URL for a single server, several
/// (comma-separated) for Redis Cluster.
pub fn parse_urls(urls: &str) -> Result<Vec<String>, String> {
    let list: Vec<String> = urls
        .split(',')
        .map(|u| u.trim().to_string())
        .filter(|u| !u.is_empty())
        .collect();
    if list.is_empty() {
        return Err("required with backend = \"redis\": redis://host:port, rediss:// for TLS, comma-separated seed URLs for Redis Cluster".into());
    }
    for u in &list {
        if !(u.starts_with("redis://") || u.starts_with("rediss://")) {
            return Err(format!(
                "{}: redis:// or rediss:// URLs (comma-separated for a cluster)",
                redacted(u)
            ));
        }
        if let Err(e) = u.as_str().into_connection_info() {
            return Err(format!("{}: {e}", redacted(u)));
        }
    }
    Ok(list)
}

/// A URL without its password, for messages.
pub(crate) fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://…@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}
