//! Deliverer (SPEC §5): durable pushes are stored, then handed to the user's connections;
//! transient pushes and broadcasts only reach connections open now.

use std::sync::Arc;

use bytes::Bytes;

use crate::cluster::Cluster;
use crate::hub::{Hub, PushItem};
use crate::protocol::Push;
use crate::state::{Appended, NewMessage, State, StateError};

/// A message to push, as the gRPC API and the relay upstream give it.
#[derive(Debug, Clone, Default)]
pub struct OutMessage {
    /// Empty: a unique id is generated.
    pub id: String,
    pub from: String,
    pub kind: String,
    pub body: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushOutcome {
    pub message_id: String,
    /// Durable pushes: the seq and epoch the message is stored under.
    pub seq: u64,
    pub epoch: String,
    /// Connections of this instance the push was handed to (those on other instances are
    /// reached over the bus, uncounted).
    pub delivered: u32,
    /// Durable: the user has a connection on some instance. Transient: on this one (the
    /// bus carries it to the others without asking where the user is).
    pub online: bool,
    /// The id was already stored within the dedupe window: not stored or delivered again.
    pub duplicate: bool,
}

/// Hands pushes to this instance's connections: durable ones stored first, transient ones
/// only to who is online, broadcasts to everyone. The one path every push takes, so routing
/// to other instances belongs here. (Named apart from `pb::Delivery`, a push's durability.)
pub struct Deliverer {
    hub: Arc<Hub>,
    state: Arc<dyn State>,
    /// With Redis: pushes for users connected to other instances go over the bus.
    cluster: Option<Arc<Cluster>>,
}

/// A fresh message id: 128 random bits, hex.
pub fn new_message_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

fn opt(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

impl Deliverer {
    pub fn new(hub: Arc<Hub>, state: Arc<dyn State>) -> Deliverer {
        Deliverer {
            hub,
            state,
            cluster: None,
        }
    }

    /// Route to the other instances of a cluster too.
    pub fn with_cluster(mut self, cluster: Arc<Cluster>) -> Deliverer {
        self.cluster = Some(cluster);
        self
    }

    /// Store in the user's inbox, then hand to every connected device. Succeeds only once
    /// stored; a store failure is returned (never a silent loss).
    pub async fn push_durable(
        &self,
        user: &str,
        msg: OutMessage,
    ) -> Result<PushOutcome, StateError> {
        let (id, stored) = Self::to_store(msg);
        let appended = self.state.append(user, stored.clone()).await?;
        Ok(self.hand_over(user, &id, &stored, appended))
    }

    /// `push_durable` of one message to many users: the appends go to the store together
    /// (a bounded number of round trips, not one per user). One result per user, in order.
    pub async fn push_durable_many(
        &self,
        users: &[String],
        msg: OutMessage,
    ) -> Vec<Result<PushOutcome, StateError>> {
        let (id, stored) = Self::to_store(msg);
        let appended = self.state.append_many(users, &stored).await;
        users
            .iter()
            .zip(appended)
            .map(|(user, a)| a.map(|a| self.hand_over(user, &id, &stored, a)))
            .collect()
    }

    fn to_store(msg: OutMessage) -> (String, NewMessage) {
        let id = if msg.id.is_empty() {
            new_message_id()
        } else {
            msg.id
        };
        let stored = NewMessage {
            id: id.clone(),
            from: msg.from,
            kind: msg.kind,
            body: msg.body,
            ts_ms: crate::now_ms(),
        };
        (id, stored)
    }

    /// Hand a stored message to the user's connections (not a duplicate: it was delivered
    /// when first stored).
    fn hand_over(&self, user: &str, id: &str, msg: &NewMessage, stored: Appended) -> PushOutcome {
        let (online, delivered) = if stored.duplicate {
            (self.hub.is_online(user), 0)
        } else {
            let item = PushItem::new(Push {
                id: id.to_string(),
                from: opt(&msg.from),
                kind: opt(&msg.kind),
                body: msg.body.clone(),
                ts: msg.ts_ms,
                seq: Some(stored.seq),
                epoch: Some(stored.epoch.clone()),
            });
            let delivered = self.hub.deliver(user, &item);
            // Other instances holding the user (the store said so with the seq) get it over
            // the bus; if that message is lost, their inbox-head check delivers it.
            let remote = self
                .cluster
                .as_ref()
                .is_some_and(|c| c.route(user, &item.push, &stored.routes));
            (delivered.is_some() || remote, delivered.unwrap_or(0))
        };
        PushOutcome {
            message_id: id.to_string(),
            seq: stored.seq,
            epoch: stored.epoch,
            delivered,
            online,
            duplicate: stored.duplicate,
        }
    }

    /// Hand to the devices connected now; nothing is stored.
    pub fn push_transient(&self, user: &str, msg: OutMessage) -> PushOutcome {
        let item = Self::transient_item(msg);
        let delivered = self.hub.deliver(user, &item);
        if let Some(c) = &self.cluster {
            c.push_everywhere(user, &item.push);
        }
        PushOutcome {
            message_id: item.push.id.clone(),
            seq: 0,
            epoch: String::new(),
            delivered: delivered.unwrap_or(0),
            online: delivered.is_some(),
            duplicate: false,
        }
    }

    /// Transient, to every connection on this instance; encoded once.
    /// With a cluster, every other instance does the same with what the bus brings it;
    /// the count is this instance's connections.
    pub fn broadcast(&self, msg: OutMessage) -> u32 {
        let item = Self::transient_item(msg);
        if let Some(c) = &self.cluster {
            c.broadcast(&item.push);
        }
        self.hub.broadcast(&item)
    }

    fn transient_item(msg: OutMessage) -> Arc<PushItem> {
        let id = if msg.id.is_empty() {
            new_message_id()
        } else {
            msg.id
        };
        PushItem::new(Push {
            id,
            from: opt(&msg.from),
            kind: opt(&msg.kind),
            body: msg.body,
            ts: crate::now_ms(),
            seq: None,
            epoch: None,
        })
    }

    pub fn state(&self) -> &Arc<dyn State> {
        &self.state
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }
}
