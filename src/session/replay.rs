//! Where the device stands in its inbox: the welcome (resume point and first replay batch),
//! replay paced by acks, live pushes in order with gaps filled from the inbox.

use super::*;

impl<S: Session> Conn<S> {
    pub(super) async fn welcome(
        &mut self,
        info: &ConnInfo,
        identity: &Identity,
        since: Option<&str>,
        keeps_cursor: bool,
    ) -> Result<InboxProgress, End> {
        let env = self.env.clone();
        let limit = env.replay_limit.max(1);
        // Head, cursors and the first replay batch in one call: one round trip to a remote
        // store (presence was the other).
        let resumed = env
            .services
            .state
            .resume(
                &info.user,
                keeps_cursor.then_some(info.device.as_str()),
                since,
                limit,
            )
            .await?;
        // Revocations this instance missed (made while its bus was down, or before it
        // started) hold here too (SPEC §2: on every instance).
        let r = resumed.revoked;
        if r.user.is_some() || r.device.is_some() {
            let auth = &env.services.auth;
            if let Some(at) = r.user {
                auth.set_revoked(&info.user, None, at);
            }
            if let Some(at) = r.device {
                auth.set_revoked(&info.user, Some(&info.device), at);
            }
            if auth.is_revoked(identity) {
                return Err(End::kick(CloseCode::Kicked));
            }
        }
        // `multi` caps a user's connections across the cluster (SPEC §6): the hub counted
        // this instance's, presence counts every instance's. The newcomer is refused, as
        // the hub refuses it locally.
        if env.sessions.policy == crate::config::LoginPolicy::Multi
            && self.presence.is_some()
            && resumed.connections > env.sessions.max_per_user
        {
            return Err(End::kick(CloseCode::TooManyConnections));
        }
        let mut sync = InboxProgress::start(resumed.head.clone(), resumed.cursors, since);
        sync.keeps_cursor = keeps_cursor;
        self.queue(ServerFrame::Welcome(Welcome {
            session: info.session_id.clone(),
            user: info.user.clone(),
            device: info.device.clone(),
            platform: info.platform.clone(),
            transport: self.transport.as_str().into(),
            instance: env.services.instance_id.clone(),
            heartbeat_ms: env.sessions.heartbeat.as_millis() as u64,
            max_frame: env.limits.max_frame as u64,
            epoch: resumed.head.epoch,
            head_seq: resumed.head.head_seq,
            cursor: resumed.cursors.device.unwrap_or(0),
            token_expires_at_ms: identity.expires_at_ms,
        }));
        if resumed.after != sync.last_sent {
            // Not expected (both follow `resume_point`); read from where the session stands.
            self.replay_next(&mut sync, info).await?;
        } else {
            self.replay_batch(&mut sync, info, resumed.range).await?;
        }
        Ok(sync)
    }

    pub(super) async fn on_pushes(
        &mut self,
        sync: &mut InboxProgress,
        info: &ConnInfo,
        items: &mut Vec<Arc<PushItem>>,
    ) -> Result<(), End> {
        for item in items.drain(..) {
            match (item.push.seq, item.push.epoch.as_deref()) {
                (Some(seq), Some(epoch)) => {
                    if epoch != sync.epoch {
                        // The inbox was lost under a live session: have the client resync.
                        return Err(End::Kick(CloseCode::Internal, "inbox epoch changed".into()));
                    }
                    if !sync.live {
                        // Replay will reach it (no live durable push before `synced`).
                        sync.max_live_seen = sync.max_live_seen.max(seq);
                        continue;
                    }
                    if seq <= sync.last_sent {
                        continue;
                    }
                    if seq > sync.last_sent + 1 {
                        Box::pin(self.fill_gap(sync, info, seq - 1)).await?;
                    }
                    self.queue_push(&item);
                    sync.last_sent = seq;
                }
                _ => self.queue_push(&item),
            }
        }
        Ok(())
    }

    /// Send stored entries up to `upto` that this device has not been sent yet.
    pub(super) async fn fill_gap(
        &mut self,
        sync: &mut InboxProgress,
        info: &ConnInfo,
        upto: u64,
    ) -> Result<(), End> {
        let limit = self.env.replay_limit.max(1);
        while sync.last_sent < upto {
            let range = self
                .env
                .services
                .state
                .read_after(&info.user, sync.last_sent, limit)
                .await?;
            let mut progressed = false;
            for m in range.messages.into_iter().take_while(|m| m.seq <= upto) {
                sync.last_sent = m.seq;
                self.queue_stored(m, &range.epoch);
                progressed = true;
            }
            if !progressed {
                break; // trimmed or expired meanwhile: nothing more to send
            }
            // Paced like replay: write each batch before reading the next, so a large gap
            // is never held in memory whole.
            if sync.last_sent < upto {
                self.flush().await?;
            }
        }
        Ok(())
    }

    /// Send the next replay batch; ends with `synced` once nothing is left.
    pub(super) async fn replay_next(
        &mut self,
        sync: &mut InboxProgress,
        info: &ConnInfo,
    ) -> Result<(), End> {
        let limit = self.env.replay_limit.max(1);
        let range = self
            .env
            .services
            .state
            .read_after(&info.user, sync.last_sent, limit)
            .await?;
        self.replay_batch(sync, info, range).await
    }

    /// Send one replay batch read after `sync.last_sent`; ends with `synced` once nothing
    /// is left.
    pub(super) async fn replay_batch(
        &mut self,
        sync: &mut InboxProgress,
        info: &ConnInfo,
        range: crate::state::InboxRange,
    ) -> Result<(), End> {
        let limit = self.env.replay_limit.max(1);
        if range.epoch != sync.epoch {
            return Err(End::Kick(CloseCode::Internal, "inbox epoch changed".into()));
        }
        if range.trimmed {
            sync.complete = false;
        }
        let n = range.messages.len();
        // A batch is bounded in bytes too (the connection's outbound budget): 200 large
        // entries would otherwise be one multi-megabyte write per reconnecting device.
        let budget = self.env.sessions.outbound_queue_bytes;
        let mut bytes = 0;
        let mut cut = false;
        for m in range.messages {
            if bytes >= budget {
                cut = true;
                break;
            }
            bytes += m.body.len();
            sync.last_sent = m.seq;
            sync.replayed += 1;
            self.queue_stored(m, &range.epoch);
        }
        if (cut || n >= limit) && sync.last_sent < range.head_seq {
            sync.awaiting_ack = Some(sync.last_sent);
            return Ok(());
        }
        sync.awaiting_ack = None;
        sync.live = true;
        self.queue(ServerFrame::Synced {
            epoch: sync.epoch.clone(),
            seq: sync.last_sent,
            replayed: sync.replayed,
            complete: sync.complete,
        });
        if sync.max_live_seen > sync.last_sent {
            let upto = sync.max_live_seen;
            Box::pin(self.fill_gap(sync, info, upto)).await?;
        }
        Ok(())
    }

    pub(super) fn queue_stored(&mut self, m: crate::state::StoredMessage, epoch: &str) {
        let push = crate::protocol::Push {
            id: m.id,
            from: (!m.from.is_empty()).then_some(m.from),
            kind: (!m.kind.is_empty()).then_some(m.kind),
            body: m.body,
            ts: m.ts_ms,
            seq: Some(m.seq),
            epoch: Some(epoch.to_string()),
        };
        self.queue(ServerFrame::Push(push));
    }

    pub(super) fn queue_push(&mut self, item: &PushItem) {
        self.out.push(item.encoded(self.codec));
        self.out_types.push("push");
        self.out_pushes.push(item.accepted);
    }
}
