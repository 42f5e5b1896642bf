//! Times every state operation (`imgate_state_seconds{backend,op}`) and counts failures
//! (`imgate_state_errors_total{backend,op}`), for any backend.

use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;

use super::*;
use crate::ops::metrics;

pub struct Instrumented<S> {
    inner: Arc<S>,
}

impl<S: State> Instrumented<S> {
    pub fn new(inner: Arc<S>) -> Self {
        Instrumented { inner }
    }

    async fn timed<T>(
        &self,
        op: &'static str,
        f: impl Future<Output = Result<T, StateError>>,
    ) -> Result<T, StateError> {
        let started = tokio::time::Instant::now();
        let r = f.await;
        let backend = self.inner.backend();
        metrics::state_op(backend, op, started.elapsed().as_secs_f64());
        if r.is_err() {
            metrics::state_error(backend, op);
        }
        r
    }
}

#[async_trait]
impl<S: State> State for Instrumented<S> {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    async fn append(&self, user: &str, msg: NewMessage) -> Result<Appended, StateError> {
        self.timed("append", self.inner.append(user, msg)).await
    }

    async fn read_after(
        &self,
        user: &str,
        after: u64,
        limit: usize,
    ) -> Result<InboxRange, StateError> {
        self.timed("read", self.inner.read_after(user, after, limit))
            .await
    }

    async fn head(&self, user: &str) -> Result<InboxHead, StateError> {
        self.timed("head", self.inner.head(user)).await
    }

    async fn cursors(&self, user: &str, device: &str) -> Result<Cursors, StateError> {
        self.timed("cursors", self.inner.cursors(user, device))
            .await
    }

    async fn ack(
        &self,
        user: &str,
        device: Option<&str>,
        epoch: &str,
        seq: u64,
    ) -> Result<(), StateError> {
        self.timed("ack", self.inner.ack(user, device, epoch, seq))
            .await
    }

    async fn set_group_members(
        &self,
        group: &str,
        op: GroupEdit,
        users: &[String],
    ) -> Result<usize, StateError> {
        self.timed("group_set", self.inner.set_group_members(group, op, users))
            .await
    }

    async fn group_members(&self, group: &str) -> Result<Vec<String>, StateError> {
        self.timed("group_get", self.inner.group_members(group))
            .await
    }

    async fn revoke(&self, user: &str, device: Option<&str>, at_ms: i64) -> Result<(), StateError> {
        self.timed("revoke", self.inner.revoke(user, device, at_ms))
            .await
    }

    async fn revoked_at(&self, user: &str, device: Option<&str>) -> Result<Revocation, StateError> {
        self.timed("revoke", self.inner.revoked_at(user, device))
            .await
    }

    async fn add_presence(&self, p: &Presence) -> Result<(), StateError> {
        self.timed("presence", self.inner.add_presence(p)).await
    }

    async fn remove_presence(&self, user: &str, conn: &str) -> Result<(), StateError> {
        self.timed("presence", self.inner.remove_presence(user, conn))
            .await
    }

    async fn presence(&self, user: &str) -> Result<Vec<Presence>, StateError> {
        self.timed("presence", self.inner.presence(user)).await
    }

    async fn routes(&self, user: &str) -> Result<Vec<String>, StateError> {
        self.timed("route", self.inner.routes(user)).await
    }

    async fn remove_instance(&self, instance: &str) -> Result<usize, StateError> {
        self.timed("presence", self.inner.remove_instance(instance))
            .await
    }

    async fn ping(&self) -> Result<(), StateError> {
        self.inner.ping().await
    }

    async fn maintain(&self, instance: &str) -> Result<(), StateError> {
        self.timed("maintain", self.inner.maintain(instance)).await
    }

    async fn resume(
        &self,
        user: &str,
        device: Option<&str>,
        since: Option<&str>,
        limit: usize,
    ) -> Result<Resumed, StateError> {
        self.timed("resume", self.inner.resume(user, device, since, limit))
            .await
    }

    async fn append_many(
        &self,
        users: &[String],
        msg: &NewMessage,
    ) -> Vec<Result<Appended, StateError>> {
        let started = tokio::time::Instant::now();
        let out = self.inner.append_many(users, msg).await;
        let backend = self.inner.backend();
        metrics::state_op(backend, "append_many", started.elapsed().as_secs_f64());
        for _ in out.iter().filter(|r| r.is_err()) {
            metrics::state_error(backend, "append_many");
        }
        out
    }

    async fn presence_many(&self, users: &[String]) -> Result<Vec<Vec<Presence>>, StateError> {
        self.timed("presence", self.inner.presence_many(users))
            .await
    }
}
