//! The instance registry: one sorted set of instances scored by their last heartbeat (ms),
//! and a hash of what each instance holds (for a cluster-wide `GetStats`). Both keys share
//! one hash tag, so in Redis Cluster a heartbeat is one pipeline to one shard.
//!
//! Times are each instance's own clock: instances are expected to run NTP (a skew of a
//! second is harmless against a 10 s `cluster.instance_ttl`).

use std::time::Duration;

use ::redis::RedisResult;

use crate::state::redis::conn::Conn;

/// What an instance holds, as it last published it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Load {
    pub connections: u64,
    pub users: u64,
    /// ws, wss, wt.
    pub by_transport: [u64; 3],
}

impl Load {
    fn encode(&self) -> String {
        let [ws, wss, wt] = self.by_transport;
        format!("{} {} {ws} {wss} {wt}", self.connections, self.users)
    }

    fn decode(s: &str) -> Option<Load> {
        let n: Vec<u64> = s
            .split(' ')
            .map(|x| x.parse().ok())
            .collect::<Option<_>>()?;
        match n[..] {
            [connections, users, ws, wss, wt] => Some(Load {
                connections,
                users,
                by_transport: [ws, wss, wt],
            }),
            _ => None,
        }
    }
}

pub struct Registry {
    instances: String,
    loads: String,
}

impl Registry {
    pub fn new(prefix: &str) -> Registry {
        Registry {
            instances: format!("{prefix}{{cluster}}:instances"),
            loads: format!("{prefix}{{cluster}}:load"),
        }
    }

    /// Register (or refresh) `me` with what it holds.
    pub async fn heartbeat(
        &self,
        conn: &Conn,
        me: &str,
        now_ms: i64,
        load: Load,
    ) -> RedisResult<()> {
        let mut c = conn.clone();
        ::redis::pipe()
            .cmd("ZADD")
            .arg(&self.instances)
            .arg(now_ms)
            .arg(me)
            .ignore()
            .cmd("HSET")
            .arg(&self.loads)
            .arg(me)
            .arg(load.encode())
            .ignore()
            .query_async(&mut c)
            .await
    }

    /// Live instances (heard from within `ttl`) with their load, and the dead ones.
    pub async fn scan(
        &self,
        conn: &Conn,
        now_ms: i64,
        ttl: Duration,
    ) -> RedisResult<(Vec<(String, Load)>, Vec<String>)> {
        let mut c = conn.clone();
        let all: Vec<(String, f64)> = ::redis::cmd("ZRANGE")
            .arg(&self.instances)
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(&mut c)
            .await?;
        let horizon = now_ms - ttl.as_millis() as i64;
        let (live, dead): (Vec<_>, Vec<_>) =
            all.into_iter().partition(|(_, at)| *at as i64 > horizon);
        let live: Vec<String> = live.into_iter().map(|(i, _)| i).collect();
        let loads: Vec<Option<String>> = if live.is_empty() {
            Vec::new()
        } else {
            ::redis::cmd("HMGET")
                .arg(&self.loads)
                .arg(&live)
                .query_async(&mut c)
                .await?
        };
        let live = live
            .into_iter()
            .zip(loads)
            .map(|(i, l)| (i, l.as_deref().and_then(Load::decode).unwrap_or_default()))
            .collect();
        Ok((live, dead.into_iter().map(|(i, _)| i).collect()))
    }

    /// Forget an instance (it drained, or the others found it dead and removed its presence).
    pub async fn forget(&self, conn: &Conn, instance: &str) -> RedisResult<()> {
        let mut c = conn.clone();
        ::redis::pipe()
            .cmd("ZREM")
            .arg(&self.instances)
            .arg(instance)
            .ignore()
            .cmd("HDEL")
            .arg(&self.loads)
            .arg(instance)
            .ignore()
            .query_async(&mut c)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_round_trips() {
        let l = Load {
            connections: 7,
            users: 3,
            by_transport: [4, 2, 1],
        };
        assert_eq!(Load::decode(&l.encode()), Some(l));
        assert_eq!(Load::decode("1 2"), None);
    }
}
