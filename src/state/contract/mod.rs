//! The contract every `State` implementation passes, written against the trait only.
//! `state_contract_tests!(factory)` expands to one `#[tokio::test]` per case, where
//! `factory` is an `async fn(Settings) -> Fixture` (it may start a server, which the
//! fixture's guard stops when the case ends).
//!
//! Time-dependent cases run on real, short windows and wait for the effect by polling
//! under a timeout, so they hold for a store with its own clock (Redis) as for memory.

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::*;

mod expiry;
pub use expiry::*;

/// A state under test, and whatever must live as long as it (a server the test started).
pub struct Fixture {
    pub state: Arc<dyn State>,
    pub guard: Box<dyn Any + Send>,
}

impl Fixture {
    pub fn new(state: impl State, guard: impl Any + Send) -> Fixture {
        Fixture {
            state: Arc::new(state),
            guard: Box::new(guard),
        }
    }
}

type S = Arc<dyn State>;

/// How long a time-dependent effect may take to show before the case fails.
const EFFECT_WAIT: Duration = Duration::from_secs(10);

pub fn msg(id: &str, body: &str) -> NewMessage {
    NewMessage {
        id: id.to_string(),
        from: "sender".into(),
        kind: "text".into(),
        body: Bytes::from(body.to_string()),
        ts_ms: 1_700_000_000_000,
    }
}

fn seqs(r: &InboxRange) -> Vec<u64> {
    r.messages.iter().map(|m| m.seq).collect()
}

pub async fn seq_is_dense_and_epoch_stable(s: S) {
    let head = s.head("u").await.unwrap();
    assert_eq!(head.head_seq, 0);
    for i in 1..=5 {
        let a = s.append("u", msg(&format!("m{i}"), "x")).await.unwrap();
        assert_eq!((a.seq, a.duplicate), (i, false));
        assert_eq!(
            a.epoch, head.epoch,
            "the epoch told before the first push holds"
        );
    }
    assert_eq!(
        s.head("u").await.unwrap(),
        InboxHead {
            epoch: head.epoch,
            head_seq: 5
        }
    );
}

pub async fn read_after_order_limit_and_fields(s: S) {
    for i in 1..=10 {
        s.append("u", msg(&format!("m{i}"), &i.to_string()))
            .await
            .unwrap();
    }
    let r = s.read_after("u", 3, 4).await.unwrap();
    assert_eq!(seqs(&r), vec![4, 5, 6, 7]);
    assert!(!r.trimmed);
    assert_eq!(r.head_seq, 10);
    let m = &r.messages[0];
    assert_eq!(
        (
            m.id.as_str(),
            m.from.as_str(),
            m.kind.as_str(),
            &m.body[..],
            m.ts_ms
        ),
        ("m4", "sender", "text", &b"4"[..], 1_700_000_000_000)
    );
    assert!(s.read_after("u", 10, 5).await.unwrap().messages.is_empty());
    assert!(s.read_after("u", 99, 5).await.unwrap().messages.is_empty());
    assert!(s
        .read_after("nobody", 0, 5)
        .await
        .unwrap()
        .messages
        .is_empty());
}

pub async fn trimmed_by_inbox_max(s: S) {
    // The factory is given inbox_max = 5 for this case.
    for i in 1..=8 {
        s.append("u", msg(&format!("m{i}"), "x")).await.unwrap();
    }
    let r = s.read_after("u", 0, 100).await.unwrap();
    assert_eq!(seqs(&r), vec![4, 5, 6, 7, 8]);
    assert!(r.trimmed);
    let r = s.read_after("u", 3, 100).await.unwrap();
    assert!(!r.trimmed, "nothing after 3 is missing");
    let r = s.read_after("u", 8, 100).await.unwrap();
    assert!(!r.trimmed);
}

pub async fn dedupe_returns_the_original_seq(s: S) {
    let a = s.append("u", msg("order-1", "x")).await.unwrap();
    s.append("u", msg("order-2", "y")).await.unwrap();
    let b = s.append("u", msg("order-1", "x")).await.unwrap();
    assert_eq!((b.seq, b.duplicate), (a.seq, true));
    assert_eq!(s.head("u").await.unwrap().head_seq, 2, "nothing appended");
    // Ids are per user.
    assert!(!s.append("v", msg("order-1", "x")).await.unwrap().duplicate);
}

pub async fn cursors_move_forward_only(s: S) {
    for i in 1..=6 {
        s.append("u", msg(&format!("m{i}"), "x")).await.unwrap();
    }
    let epoch = s.head("u").await.unwrap().epoch;
    assert_eq!(
        s.cursors("u", "phone").await.unwrap(),
        Cursors {
            device: None,
            user: 0
        }
    );
    s.ack("u", Some("phone"), &epoch, 4).await.unwrap();
    s.ack("u", Some("phone"), &epoch, 2).await.unwrap();
    assert_eq!(
        s.cursors("u", "phone").await.unwrap(),
        Cursors {
            device: Some(4),
            user: 4
        }
    );
    s.ack("u", Some("laptop"), &epoch, 99).await.unwrap();
    assert_eq!(
        s.cursors("u", "laptop").await.unwrap(),
        Cursors {
            device: Some(6),
            user: 6
        },
        "not past the head"
    );
    s.ack("u", Some("tablet"), "another-epoch", 5)
        .await
        .unwrap();
    assert_eq!(
        s.cursors("u", "tablet").await.unwrap(),
        Cursors {
            device: None,
            user: 6
        },
        "other epochs are ignored"
    );
    assert_eq!(s.cursors("u", "phone").await.unwrap().device, Some(4));
}

pub async fn groups(s: S) {
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert!(s.group_members("g").await.unwrap().is_empty());
    assert_eq!(
        s.set_group_members("g", GroupEdit::Replace, &names(&["a", "b", "c"]))
            .await
            .unwrap(),
        3
    );
    assert_eq!(
        s.set_group_members("g", GroupEdit::Add, &names(&["c", "d"]))
            .await
            .unwrap(),
        4
    );
    assert_eq!(
        s.set_group_members("g", GroupEdit::Remove, &names(&["a", "zz"]))
            .await
            .unwrap(),
        3
    );
    let mut m = s.group_members("g").await.unwrap();
    m.sort();
    assert_eq!(m, names(&["b", "c", "d"]));
    assert_eq!(
        s.set_group_members("g", GroupEdit::Replace, &names(&["x"]))
            .await
            .unwrap(),
        1
    );
    assert_eq!(s.group_members("g").await.unwrap(), names(&["x"]));
    assert_eq!(
        s.set_group_members("g", GroupEdit::Remove, &names(&["x"]))
            .await
            .unwrap(),
        0
    );
    assert!(s.group_members("g").await.unwrap().is_empty());
    // A large group in one call (a script passes its members in slices).
    let many: Vec<String> = (0..2500).map(|i| format!("m{i:05}")).collect();
    assert_eq!(
        s.set_group_members("big", GroupEdit::Replace, &many)
            .await
            .unwrap(),
        2500
    );
    assert_eq!(
        s.set_group_members("big", GroupEdit::Remove, &many[..1200])
            .await
            .unwrap(),
        1300
    );
    assert_eq!(s.group_members("big").await.unwrap(), many[1200..].to_vec());
}

pub async fn revocation(s: S) {
    let none = Revocation::default();
    assert_eq!(s.revoked_at("u", None).await.unwrap(), none);
    assert_eq!(s.revoked_at("u", Some("d1")).await.unwrap(), none);
    s.revoke("u", None, 1000).await.unwrap();
    s.revoke("u", None, 500).await.unwrap();
    assert_eq!(
        s.revoked_at("u", None).await.unwrap(),
        Revocation {
            user: Some(1000),
            device: None
        },
        "the latest wins"
    );
    assert_eq!(s.revoked_at("v", None).await.unwrap(), none);

    // A device's revocation is its own: other devices and the user-wide time stay.
    s.revoke("u", Some("d1"), 2000).await.unwrap();
    s.revoke("u", Some("d1"), 1500).await.unwrap();
    assert_eq!(
        s.revoked_at("u", Some("d1")).await.unwrap(),
        Revocation {
            user: Some(1000),
            device: Some(2000)
        }
    );
    assert_eq!(
        s.revoked_at("u", Some("d2")).await.unwrap(),
        Revocation {
            user: Some(1000),
            device: None
        }
    );
    assert_eq!(
        s.revoked_at("u", None).await.unwrap().device,
        None,
        "no device asked, no device time"
    );
    // A device of another user is another device.
    assert_eq!(s.revoked_at("v", Some("d1")).await.unwrap(), none);
    s.revoke("w", Some("d1"), 3000).await.unwrap();
    assert_eq!(
        s.revoked_at("w", Some("d1")).await.unwrap(),
        Revocation {
            user: None,
            device: Some(3000)
        }
    );
    assert_eq!(s.revoked_at("w", None).await.unwrap(), none);
}

pub async fn concurrent_appends_leave_no_gap(s: S) {
    let mut tasks = Vec::new();
    for t in 0..8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for i in 0..50 {
                got.push(
                    s.append("hot", msg(&format!("{t}-{i}"), "x"))
                        .await
                        .unwrap()
                        .seq,
                );
            }
            got
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_unstable();
    assert_eq!(all, (1..=400).collect::<Vec<_>>());
}

pub async fn users_are_independent(s: S) {
    s.append("a", msg("1", "x")).await.unwrap();
    s.append("a", msg("2", "x")).await.unwrap();
    assert_eq!(s.append("b", msg("1", "x")).await.unwrap().seq, 1);
    assert_eq!(s.head("a").await.unwrap().head_seq, 2);
    assert_eq!(s.head("b").await.unwrap().head_seq, 1);
}

fn conn(user: &str, conn: &str, instance: &str) -> Presence {
    Presence {
        user: user.into(),
        conn: conn.into(),
        device: format!("dev-{conn}"),
        platform: "web".into(),
        transport: "ws".into(),
        instance: instance.into(),
        connected_at_ms: 1,
    }
}

pub async fn presence_and_routes(s: S) {
    // Instances that heartbeat (a remote store hides the presence of one that stopped).
    for i in ["i1", "i2"] {
        s.maintain(i).await.unwrap();
    }
    assert!(s.presence("u").await.unwrap().is_empty());
    assert!(s.routes("u").await.unwrap().is_empty());
    s.add_presence(&conn("u", "c1", "i1")).await.unwrap();
    s.add_presence(&conn("u", "c2", "i2")).await.unwrap();
    s.add_presence(&conn("u", "c3", "i2")).await.unwrap();
    s.add_presence(&conn("v", "c4", "i1")).await.unwrap();
    let mut conns: Vec<_> = s
        .presence("u")
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.conn)
        .collect();
    conns.sort();
    assert_eq!(conns, vec!["c1", "c2", "c3"]);
    let mut routes = s.routes("u").await.unwrap();
    routes.sort();
    assert_eq!(routes, vec!["i1", "i2"], "each instance once");
    s.remove_presence("u", "c1").await.unwrap();
    s.remove_presence("u", "nope").await.unwrap();
    assert_eq!(s.routes("u").await.unwrap(), vec!["i2"]);
    // An instance that drained or died takes its connections with it.
    assert_eq!(s.remove_instance("i2").await.unwrap(), 2);
    assert!(s.presence("u").await.unwrap().is_empty());
    assert_eq!(s.presence("v").await.unwrap().len(), 1);
    // Adding the same connection twice keeps one entry.
    s.add_presence(&conn("v", "c4", "i1")).await.unwrap();
    assert_eq!(s.presence("v").await.unwrap(), vec![conn("v", "c4", "i1")]);
}

pub async fn device_cursors_are_bounded_least_recently_acked_first(s: S) {
    // The factory is given max_devices = 3 for this case.
    for i in 1..=10 {
        s.append("u", msg(&format!("m{i}"), "x")).await.unwrap();
    }
    let epoch = s.head("u").await.unwrap().epoch;
    for (d, seq) in [("d1", 1), ("d2", 2), ("d3", 3)] {
        s.ack("u", Some(d), &epoch, seq).await.unwrap();
    }
    // d1 acks again: now d2 is the least recently acked.
    s.ack("u", Some("d1"), &epoch, 4).await.unwrap();
    s.ack("u", Some("d4"), &epoch, 5).await.unwrap();
    let cursor = |d: &'static str| {
        let s = s.clone();
        async move { s.cursors("u", d).await.unwrap().device }
    };
    assert_eq!(
        cursor("d2").await,
        None,
        "the least recently acked is forgotten"
    );
    assert_eq!(
        (cursor("d1").await, cursor("d3").await, cursor("d4").await),
        (Some(4), Some(3), Some(5))
    );
    assert_eq!(
        s.cursors("u", "d2").await.unwrap().user,
        5,
        "the user cursor stays: a forgotten device resumes from it"
    );
    // A forgotten device that acks again gets a cursor again, evicting the next one.
    s.ack("u", Some("d2"), &epoch, 6).await.unwrap();
    assert_eq!(cursor("d2").await, Some(6));
    assert_eq!(cursor("d3").await, None);
}

pub async fn an_ack_without_a_device_moves_the_user_cursor_only(s: S) {
    // The factory is given max_devices = 1 for this case.
    for i in 1..=5 {
        s.append("u", msg(&format!("m{i}"), "x")).await.unwrap();
    }
    let epoch = s.head("u").await.unwrap().epoch;
    s.ack("u", Some("phone"), &epoch, 2).await.unwrap();
    s.ack("u", None, &epoch, 4).await.unwrap();
    assert_eq!(
        s.cursors("u", "phone").await.unwrap(),
        Cursors {
            device: Some(2),
            user: 4
        },
        "the device's cursor is neither moved nor evicted"
    );
    assert_eq!(s.cursors("u", "").await.unwrap().device, None);
}

pub async fn resume_answers_head_cursors_and_first_batch(s: S) {
    for i in 1..=5 {
        s.append("u", msg(&format!("m{i}"), "x")).await.unwrap();
    }
    let epoch = s.head("u").await.unwrap().epoch;
    s.ack("u", Some("phone"), &epoch, 2).await.unwrap();
    s.ack("u", Some("laptop"), &epoch, 4).await.unwrap();
    let r = s.resume("u", Some("phone"), None, 2).await.unwrap();
    assert_eq!(
        (r.head.head_seq, r.cursors, r.after, seqs(&r.range)),
        (
            5,
            Cursors {
                device: Some(2),
                user: 4
            },
            2,
            vec![3, 4]
        )
    );
    assert_eq!(r.head.epoch, epoch);
    // A device without a cursor resumes after the user's.
    let r = s.resume("u", Some("tablet"), None, 10).await.unwrap();
    assert_eq!((r.after, seqs(&r.range)), (4, vec![5]));
    // One that keeps no cursor too.
    let r = s.resume("u", None, None, 10).await.unwrap();
    assert_eq!((r.cursors.device, r.after), (None, 4));
    // `since` of this epoch wins over the cursors, clamped to the head.
    let r = s
        .resume("u", Some("phone"), Some(&format!("{epoch}:1")), 10)
        .await
        .unwrap();
    assert_eq!((r.after, seqs(&r.range)), (1, vec![2, 3, 4, 5]));
    let r = s
        .resume("u", Some("phone"), Some(&format!("{epoch}:99")), 10)
        .await
        .unwrap();
    assert_eq!((r.after, r.range.messages.len()), (5, 0));
    // Another epoch, or garbage: the current epoch from its start.
    for since in ["old:3", "garbage"] {
        let r = s.resume("u", Some("phone"), Some(since), 10).await.unwrap();
        assert_eq!((r.after, r.range.messages.len()), (0, 5), "{since}");
    }
    // A user never seen gets an epoch, which the first push keeps.
    let r = s.resume("new", Some("phone"), None, 10).await.unwrap();
    assert_eq!((r.head.head_seq, r.after), (0, 0));
    let a = s.append("new", msg("x", "x")).await.unwrap();
    assert_eq!(a.epoch, r.head.epoch);
}

pub async fn append_many_in_order(s: S) {
    let users: Vec<String> = (0..300).map(|i| format!("u{i}")).collect();
    s.append("u7", msg("earlier", "x")).await.unwrap();
    let out = s.append_many(&users, &msg("m", "x")).await;
    assert_eq!(out.len(), 300);
    for (i, r) in out.iter().enumerate() {
        let a = r.as_ref().unwrap();
        assert_eq!(a.seq, if i == 7 { 2 } else { 1 }, "user {i}");
        assert!(!a.duplicate);
    }
    // The same id again: every user reports the original.
    let again = s.append_many(&users[..3], &msg("m", "x")).await;
    assert!(again.iter().all(|r| r.as_ref().unwrap().duplicate));
}

pub async fn presence_many_in_order(s: S) {
    s.maintain("i1").await.unwrap();
    s.add_presence(&conn("a", "c1", "i1")).await.unwrap();
    s.add_presence(&conn("c", "c2", "i1")).await.unwrap();
    let users: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
    let out = s.presence_many(&users).await.unwrap();
    let conns: Vec<Vec<String>> = out
        .into_iter()
        .map(|l| l.into_iter().map(|p| p.conn).collect())
        .collect();
    assert_eq!(
        conns,
        vec![vec!["c1".to_string()], vec![], vec!["c2".to_string()]]
    );
}

/// One test per contract case for an `async fn(Settings) -> Fixture`.
#[macro_export]
macro_rules! state_contract_tests {
    ($factory:expr) => {
        mod contract_cases {
            use super::*;
            use $crate::state::contract as c;
            use $crate::state::Settings;

            async fn make(tweak: impl FnOnce(&mut Settings)) -> $crate::state::contract::Fixture {
                let mut s = Settings::default();
                tweak(&mut s);
                ($factory)(s).await
            }

            macro_rules! case {
                ($name:ident, $tweak:expr) => {
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $name() {
                        let f = make($tweak).await;
                        c::$name(f.state.clone()).await;
                        drop(f);
                    }
                };
            }

            case!(seq_is_dense_and_epoch_stable, |_| {});
            case!(read_after_order_limit_and_fields, |_| {});
            case!(trimmed_by_inbox_max, |s| s.state.inbox_max = 5);
            case!(dedupe_returns_the_original_seq, |_| {});
            case!(cursors_move_forward_only, |_| {});
            case!(groups, |_| {});
            case!(revocation, |_| {});
            case!(concurrent_appends_leave_no_gap, |_| {});
            case!(presence_and_routes, |_| {});
            case!(users_are_independent, |_| {});
            case!(device_cursors_are_bounded_least_recently_acked_first, |s| {
                s.max_devices = 3
            });
            case!(an_ack_without_a_device_moves_the_user_cursor_only, |s| {
                s.max_devices = 1
            });
            case!(dedupe_window_expires, |s| {
                s.state.dedupe_window = std::time::Duration::from_millis(300)
            });
            case!(entries_expire_after_the_ttl, |s| {
                s.state.inbox_ttl = std::time::Duration::from_millis(500)
            });
            case!(a_lost_inbox_gets_a_new_epoch, |s| {
                s.state.inbox_ttl = std::time::Duration::from_millis(300);
                s.state.dedupe_window = std::time::Duration::from_millis(100);
            });
            case!(resume_answers_head_cursors_and_first_batch, |_| {});
            case!(append_many_in_order, |_| {});
            case!(presence_many_in_order, |_| {});
        }
    };
}
