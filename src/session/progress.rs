//! Where a device stands in its user's inbox during one session (SPEC §5): the resume
//! point, replay progress, and the highest seq sent, so that durable pushes reach the
//! device in order with no gap and nothing live goes out before `synced`.

use crate::state::{resume_point, Cursors, InboxHead};

#[derive(Debug)]
pub struct InboxProgress {
    pub epoch: String,
    /// Highest seq sent to this device in this session (the resume point at first).
    pub last_sent: u64,
    /// Replay finished (`synced` sent): live durable pushes flow.
    pub live: bool,
    /// A full replay batch ending at this seq was sent; the next follows its ack.
    pub awaiting_ack: Option<u64>,
    pub replayed: u64,
    pub complete: bool,
    /// Highest live durable seq that arrived during replay (sent by gap filling after).
    pub max_live_seen: u64,
    /// Highest seq this device acked in this session (acks at or below it change nothing).
    pub acked: u64,
    /// Acks are stored as the device's cursor (false for a device id the gateway made up).
    pub keeps_cursor: bool,
}

impl InboxProgress {
    /// The resume point: after `since` when given (a stale epoch replays the current one
    /// from its start, incomplete), else after the device cursor, else after the user
    /// cursor (offline messages go to whichever device connects first; a new device does
    /// not get the whole history).
    pub fn start(head: InboxHead, cursors: Cursors, since: Option<&str>) -> InboxProgress {
        let (after, complete) = resume_point(&head, cursors, since);
        InboxProgress {
            epoch: head.epoch,
            last_sent: after,
            live: false,
            awaiting_ack: None,
            replayed: 0,
            complete,
            max_live_seen: 0,
            acked: after,
            keeps_cursor: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::parse_position;

    fn head(epoch: &str, seq: u64) -> InboxHead {
        InboxHead {
            epoch: epoch.into(),
            head_seq: seq,
        }
    }

    #[test]
    fn resume_point() {
        let c = Cursors {
            device: Some(4),
            user: 7,
        };
        let none = Cursors {
            device: None,
            user: 7,
        };
        assert_eq!(InboxProgress::start(head("e", 10), c, None).last_sent, 4);
        assert_eq!(InboxProgress::start(head("e", 10), none, None).last_sent, 7);
        let s = InboxProgress::start(head("e", 10), c, Some("e:2"));
        assert_eq!((s.last_sent, s.complete), (2, true));
        let s = InboxProgress::start(head("e", 10), c, Some("old:9"));
        assert_eq!((s.last_sent, s.complete), (0, false));
        let s = InboxProgress::start(head("e", 10), c, Some("garbage"));
        assert_eq!((s.last_sent, s.complete), (0, false));
        // A position beyond the head is clamped: nothing stored later is skipped.
        assert_eq!(
            InboxProgress::start(head("e", 10), c, Some("e:99")).last_sent,
            10
        );
    }

    #[test]
    fn positions() {
        assert_eq!(parse_position("ab:12"), Some(("ab", 12)));
        assert_eq!(parse_position("a:b:3"), Some(("a:b", 3)));
        assert_eq!(parse_position("ab"), None);
        assert_eq!(parse_position("ab:x"), None);
    }
}
