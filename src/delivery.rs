//! Deliverer (SPEC §5): durable pushes are stored, then handed to the user's connections;
//! transient pushes and broadcasts only reach connections open now.

use std::sync::Arc;

use bytes::Bytes;

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
    /// Connections the push was handed to.
    pub delivered: u32,
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
        Deliverer { hub, state }
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
            (delivered.is_some(), delivered.unwrap_or(0))
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
    pub fn broadcast(&self, msg: OutMessage) -> u32 {
        self.hub.broadcast(&Self::transient_item(msg))
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
