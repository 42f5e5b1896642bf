//! The contract every `State` implementation passes, written against the trait only.
//! `state_contract_tests!(factory)` expands to one `#[tokio::test]` per case, where
//! `factory` is a closure `|cfg: &StateConfig| -> impl State` (it may start a server).

use std::sync::Arc;

use bytes::Bytes;

use super::*;

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

pub async fn seq_is_dense_and_epoch_stable(s: impl State) {
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

pub async fn read_after_order_limit_and_fields(s: impl State) {
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

pub async fn trimmed_by_inbox_max(s: impl State) {
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

pub async fn dedupe_returns_the_original_seq(s: impl State) {
    let a = s.append("u", msg("order-1", "x")).await.unwrap();
    s.append("u", msg("order-2", "y")).await.unwrap();
    let b = s.append("u", msg("order-1", "x")).await.unwrap();
    assert_eq!((b.seq, b.duplicate), (a.seq, true));
    assert_eq!(s.head("u").await.unwrap().head_seq, 2, "nothing appended");
    // Ids are per user.
    assert!(!s.append("v", msg("order-1", "x")).await.unwrap().duplicate);
}

pub async fn cursors_move_forward_only(s: impl State) {
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
    s.ack("u", "phone", &epoch, 4).await.unwrap();
    s.ack("u", "phone", &epoch, 2).await.unwrap();
    assert_eq!(
        s.cursors("u", "phone").await.unwrap(),
        Cursors {
            device: Some(4),
            user: 4
        }
    );
    s.ack("u", "laptop", &epoch, 99).await.unwrap();
    assert_eq!(
        s.cursors("u", "laptop").await.unwrap(),
        Cursors {
            device: Some(6),
            user: 6
        },
        "not past the head"
    );
    s.ack("u", "tablet", "another-epoch", 5).await.unwrap();
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

pub async fn groups(s: impl State) {
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert!(s.group_members("g").await.unwrap().is_empty());
    assert_eq!(
        s.set_group_members("g", GroupOp::Replace, &names(&["a", "b", "c"]))
            .await
            .unwrap(),
        3
    );
    assert_eq!(
        s.set_group_members("g", GroupOp::Add, &names(&["c", "d"]))
            .await
            .unwrap(),
        4
    );
    assert_eq!(
        s.set_group_members("g", GroupOp::Remove, &names(&["a", "zz"]))
            .await
            .unwrap(),
        3
    );
    let mut m = s.group_members("g").await.unwrap();
    m.sort();
    assert_eq!(m, names(&["b", "c", "d"]));
    assert_eq!(
        s.set_group_members("g", GroupOp::Replace, &names(&["x"]))
            .await
            .unwrap(),
        1
    );
    assert_eq!(s.group_members("g").await.unwrap(), names(&["x"]));
    assert_eq!(
        s.set_group_members("g", GroupOp::Remove, &names(&["x"]))
            .await
            .unwrap(),
        0
    );
    assert!(s.group_members("g").await.unwrap().is_empty());
}

pub async fn revocation(s: impl State) {
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

pub async fn concurrent_appends_leave_no_gap(s: impl State) {
    let s = Arc::new(s);
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

pub async fn users_are_independent(s: impl State) {
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

pub async fn presence_and_routes(s: impl State) {
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

/// One test per contract case for a factory `|cfg: &StateConfig| -> impl State`.
#[macro_export]
macro_rules! state_contract_tests {
    ($factory:expr) => {
        mod contract {
            use super::*;
            use $crate::config::StateConfig;
            use $crate::state::contract as c;

            fn make(tweak: impl FnOnce(&mut StateConfig)) -> impl $crate::state::State {
                let mut cfg = StateConfig::default();
                tweak(&mut cfg);
                ($factory)(&cfg)
            }

            #[tokio::test]
            async fn seq_is_dense_and_epoch_stable() {
                c::seq_is_dense_and_epoch_stable(make(|_| {})).await
            }
            #[tokio::test]
            async fn read_after_order_limit_and_fields() {
                c::read_after_order_limit_and_fields(make(|_| {})).await
            }
            #[tokio::test]
            async fn trimmed_by_inbox_max() {
                c::trimmed_by_inbox_max(make(|c| c.inbox_max = 5)).await
            }
            #[tokio::test]
            async fn dedupe_returns_the_original_seq() {
                c::dedupe_returns_the_original_seq(make(|_| {})).await
            }
            #[tokio::test]
            async fn cursors_move_forward_only() {
                c::cursors_move_forward_only(make(|_| {})).await
            }
            #[tokio::test]
            async fn groups() {
                c::groups(make(|_| {})).await
            }
            #[tokio::test]
            async fn revocation() {
                c::revocation(make(|_| {})).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_appends_leave_no_gap() {
                c::concurrent_appends_leave_no_gap(make(|_| {})).await
            }
            #[tokio::test]
            async fn presence_and_routes() {
                c::presence_and_routes(make(|_| {})).await
            }
            #[tokio::test]
            async fn users_are_independent() {
                c::users_are_independent(make(|_| {})).await
            }
        }
    };
}
