//! Presence in Redis: a record per connection in its user's hash, an index per instance
//! (so `remove_instance` finds them), and a liveness key per instance that its upkeep
//! refreshes: a record whose instance stopped refreshing is not reported.

use ::redis::RedisResult;
use futures_util::stream::{self, StreamExt};

use super::{codec, RedisState, BATCH_DEPTH};
use crate::state::{Presence, StateError};

impl RedisState {
    /// Keep only connections whose instance is alive (it refreshed its key within
    /// `cluster.instance_ttl`), and forget the others' records.
    async fn alive_only(&self, lists: &mut [Vec<Presence>]) -> RedisResult<()> {
        let mut instances: Vec<String> =
            lists.iter().flatten().map(|p| p.instance.clone()).collect();
        instances.sort_unstable();
        instances.dedup();
        if instances.is_empty() {
            return Ok(());
        }
        let lookups: Vec<_> = instances
            .iter()
            .map(|i| {
                let mut c = self.conn();
                let key = self.keys.instance_alive(i);
                async move {
                    ::redis::cmd("EXISTS")
                        .arg(key)
                        .query_async::<bool>(&mut c)
                        .await
                }
            })
            .collect();
        let alive: Vec<bool> = stream::iter(lookups)
            .buffered(BATCH_DEPTH)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<RedisResult<_>>()?;
        let dead: Vec<&String> = instances
            .iter()
            .zip(&alive)
            .filter(|(_, a)| !**a)
            .map(|(i, _)| i)
            .collect();
        if dead.is_empty() {
            return Ok(());
        }
        for list in lists.iter_mut() {
            let (gone, kept): (Vec<Presence>, Vec<Presence>) = std::mem::take(list)
                .into_iter()
                .partition(|p| dead.contains(&&p.instance));
            *list = kept;
            // Records of a dead instance that nobody removed: drop them on the way.
            for p in gone {
                let mut c = self.conn();
                let _: RedisResult<i64> = ::redis::cmd("HDEL")
                    .arg(self.keys.presence(&p.user))
                    .arg(&p.conn)
                    .query_async(&mut c)
                    .await;
            }
        }
        Ok(())
    }

    async fn presence_records(&self, user: &str) -> RedisResult<Vec<Presence>> {
        let mut c = self.conn();
        let map: Vec<(Vec<u8>, Vec<u8>)> = ::redis::cmd("HGETALL")
            .arg(self.keys.presence(user))
            .query_async(&mut c)
            .await?;
        let mut out: Vec<Presence> = map
            .iter()
            .filter_map(|(_, v)| codec::decode_presence(v))
            .collect();
        out.sort_by_key(|p| (p.connected_at_ms, p.conn.clone()));
        Ok(out)
    }

    pub(super) async fn add_connection(&self, p: &Presence) -> Result<(), StateError> {
        let (mut c1, mut c2) = (self.conn(), self.conn());
        let mut record = ::redis::cmd("HSET");
        record
            .arg(self.keys.presence(&p.user))
            .arg(&p.conn)
            .arg(codec::encode_presence(p));
        let mut index = ::redis::cmd("SADD");
        index
            .arg(self.keys.instance_conns(&p.instance))
            .arg(codec::encode_index(&p.user, &p.conn));
        let record = record.query_async::<i64>(&mut c1);
        let index = index.query_async::<i64>(&mut c2);
        // Two shards in a cluster: sent together, one round trip of latency.
        self.run("presence", async {
            let (a, b) = futures_util::future::join(record, index).await;
            a.and(b).map(|_| ())
        })
        .await
    }

    pub(super) async fn remove_connection(&self, user: &str, conn: &str) -> Result<(), StateError> {
        let mut c = self.conn();
        self.run("presence", async {
            let record: Option<Vec<u8>> = self
                .scripts
                .presence_remove
                .key(self.keys.presence(user))
                .arg(conn)
                .invoke_async(&mut c)
                .await?;
            if let Some(p) = record.as_deref().and_then(codec::decode_presence) {
                let _: i64 = ::redis::cmd("SREM")
                    .arg(self.keys.instance_conns(&p.instance))
                    .arg(codec::encode_index(user, conn))
                    .query_async(&mut c)
                    .await?;
            }
            Ok(())
        })
        .await
    }

    pub(super) async fn connections_of(
        &self,
        users: &[String],
    ) -> Result<Vec<Vec<Presence>>, StateError> {
        self.run("presence", async {
            let reads: Vec<_> = users.iter().map(|u| self.presence_records(u)).collect();
            let mut lists: Vec<Vec<Presence>> = stream::iter(reads)
                .buffered(BATCH_DEPTH)
                .collect::<Vec<_>>()
                .await
                .into_iter()
                .collect::<RedisResult<_>>()?;
            self.alive_only(&mut lists).await?;
            Ok(lists)
        })
        .await
    }

    pub(super) async fn forget_instance(&self, instance: &str) -> Result<usize, StateError> {
        let index = self.keys.instance_conns(instance);
        let mut c = self.conn();
        let mut removed = 0;
        let mut cursor: u64 = 0;
        loop {
            let (next, members): (u64, Vec<Vec<u8>>) = self
                .run(
                    "presence",
                    ::redis::cmd("SSCAN")
                        .arg(&index)
                        .arg(cursor)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut c),
                )
                .await?;
            let removals: Vec<_> = members
                .iter()
                .filter_map(|m| codec::decode_index(m))
                .map(|(user, conn)| {
                    let mut c = self.conn();
                    let key = self.keys.presence(&user);
                    async move {
                        ::redis::cmd("HDEL")
                            .arg(key)
                            .arg(conn)
                            .query_async::<i64>(&mut c)
                            .await
                    }
                })
                .collect();
            let gone: Vec<i64> = self
                .run("presence", async {
                    stream::iter(removals)
                        .buffered(BATCH_DEPTH)
                        .collect::<Vec<_>>()
                        .await
                        .into_iter()
                        .collect::<RedisResult<Vec<i64>>>()
                })
                .await?;
            removed += gone.iter().sum::<i64>() as usize;
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        let _: i64 = self
            .run(
                "presence",
                ::redis::cmd("DEL").arg(&index).query_async(&mut c),
            )
            .await?;
        let _: i64 = self
            .run(
                "presence",
                ::redis::cmd("DEL")
                    .arg(self.keys.instance_alive(instance))
                    .query_async(&mut c),
            )
            .await?;
        Ok(removed)
    }

    pub(super) async fn mark_alive(&self, instance: &str) -> Result<(), StateError> {
        let mut c = self.conn();
        let _: () = self
            .run(
                "maintain",
                ::redis::cmd("SET")
                    .arg(self.keys.instance_alive(instance))
                    .arg(1)
                    .arg("PX")
                    .arg(self.presence_ttl_ms)
                    .query_async(&mut c),
            )
            .await?;
        Ok(())
    }
}
