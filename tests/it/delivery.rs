//! SPEC §5: durable inbox, acks, resume without loss, relay chat, transient pushes.

use std::collections::BTreeSet;
use std::time::Duration;

use imgate::delivery::OutMessage;
use serde_json::{json, Value};

use crate::common::{token, Client, Kind, TestGateway};
use crate::over_transports;

fn msg(body: &str) -> OutMessage {
    OutMessage {
        body: bytes::Bytes::from(body.to_string()),
        ..Default::default()
    }
}

/// Read pushes until `synced`; returns (pushes, synced).
async fn until_synced(c: &mut Client) -> (Vec<Value>, Value) {
    let mut pushes = Vec::new();
    loop {
        let v = c.recv().await;
        match v["type"].as_str() {
            Some("push") => pushes.push(v),
            Some("synced") => return (pushes, v),
            _ => panic!("unexpected frame during replay: {v}"),
        }
    }
}

fn seqs(pushes: &[Value]) -> Vec<u64> {
    pushes.iter().map(|p| p["seq"].as_u64().unwrap()).collect()
}

async fn ack(c: &mut Client, p: &Value) {
    c.send(json!({"type": "ack", "seq": p["seq"], "epoch": p["epoch"]}))
        .await;
}

async fn connect_device(
    gw: &TestGateway,
    kind: Kind,
    user: &str,
    device: &str,
    extra: &str,
) -> (Client, Value) {
    let t = token(user, Some(device), None, Duration::from_secs(3600));
    let mut c = gw
        .connect(kind, &format!("token={t}{extra}"), &[])
        .await
        .unwrap();
    let w = c.expect("welcome").await;
    (c, w)
}

over_transports!(two_users_chat, |kind: Kind| async move {
    let gw = TestGateway::start().await;
    let (mut alice, _) = connect_device(&gw, kind, "alice", "a1", "").await;
    until_synced(&mut alice).await;
    let (mut bob, _) = connect_device(&gw, kind, "bob", "b1", "").await;
    until_synced(&mut bob).await;

    alice.send(json!({"type": "send", "id": "s1", "to": "bob", "kind": "text", "body": {"text": "hi bob"}})).await;
    let reply = alice.expect("reply").await;
    assert_eq!(reply["ok"], true);
    assert_eq!(reply["body"], json!({"seq": 1}));
    let p = bob.expect("push").await;
    assert_eq!(p["from"], "alice");
    assert_eq!(p["kind"], "text");
    assert_eq!(p["body"], json!({"text": "hi bob"}));
    assert_eq!(p["seq"], 1);
    ack(&mut bob, &p).await;

    bob.send(json!({"type": "send", "id": "s2", "to": "alice", "body": "hello"}))
        .await;
    assert_eq!(bob.expect("reply").await["body"], json!({"seq": 1}));
    let p = alice.expect("push").await;
    assert_eq!(
        (p["from"].as_str(), p["body"].as_str()),
        (Some("bob"), Some("hello"))
    );
});

over_transports!(
    reconnect_gets_every_message_exactly_once_in_order,
    |kind: Kind| async move {
        let gw = TestGateway::start().await;
        let (mut alice, _) = connect_device(&gw, kind, "alice", "a1", "").await;
        until_synced(&mut alice).await;
        let (mut bob, _) = connect_device(&gw, kind, "bob", "b1", "").await;
        until_synced(&mut bob).await;
        for i in 1..=3 {
            alice
                .send(json!({"type": "send", "id": i.to_string(), "to": "bob", "body": i}))
                .await;
            alice.expect("reply").await;
            let p = bob.expect("push").await;
            assert_eq!(p["seq"], i);
            ack(&mut bob, &p).await;
        }
        // Bob's ack of 3 is recorded before he leaves (acks have no answer: a ping orders them).
        bob.ping("sync").await;
        bob.close().await;
        for i in 4..=9 {
            alice
                .send(json!({"type": "send", "id": i.to_string(), "to": "bob", "body": i}))
                .await;
            alice.expect("reply").await;
        }
        let (mut bob, w) = connect_device(&gw, kind, "bob", "b1", "").await;
        assert_eq!(
            (w["head_seq"].as_u64(), w["cursor"].as_u64()),
            (Some(9), Some(3))
        );
        let (pushes, synced) = until_synced(&mut bob).await;
        assert_eq!(seqs(&pushes), (4..=9).collect::<Vec<_>>());
        let bodies: Vec<i64> = pushes.iter().map(|p| p["body"].as_i64().unwrap()).collect();
        assert_eq!(bodies, (4..=9).collect::<Vec<_>>());
        assert_eq!(
            (
                synced["seq"].as_u64(),
                synced["replayed"].as_u64(),
                synced["complete"].as_bool()
            ),
            (Some(9), Some(6), Some(true))
        );
        // Live again after synced.
        alice
            .send(json!({"type": "send", "id": "10", "to": "bob", "body": 10}))
            .await;
        assert_eq!(bob.expect("push").await["seq"], 10);
    }
);

over_transports!(
    offline_messages_reach_the_first_device,
    |kind: Kind| async move {
        let gw = TestGateway::start().await;
        let d = gw.gw().delivery.clone();
        for i in 1..=5 {
            let out = d.push_durable("carol", msg(&i.to_string())).await.unwrap();
            assert_eq!((out.seq, out.online, out.delivered), (i, false, 0));
        }
        let (mut phone, w) = connect_device(&gw, kind, "carol", "phone", "").await;
        assert_eq!(
            (w["head_seq"].as_u64(), w["cursor"].as_u64()),
            (Some(5), Some(0))
        );
        let (pushes, synced) = until_synced(&mut phone).await;
        assert_eq!(seqs(&pushes), vec![1, 2, 3, 4, 5]);
        assert_eq!(synced["complete"], true);
        ack(&mut phone, pushes.last().unwrap()).await;
        phone.ping("x").await;
        // A new device does not get the history another device already took.
        let (mut laptop, w) = connect_device(&gw, kind, "carol", "laptop", "").await;
        assert_eq!(w["cursor"], 0);
        let (pushes, synced) = until_synced(&mut laptop).await;
        assert!(pushes.is_empty());
        assert_eq!(
            (synced["seq"].as_u64(), synced["replayed"].as_u64()),
            (Some(5), Some(0))
        );
    }
);

over_transports!(resume_with_since, |kind: Kind| async move {
    let gw = TestGateway::start().await;
    let d = gw.gw().delivery.clone();
    let mut epoch = String::new();
    for i in 1..=6 {
        epoch = d
            .push_durable("dave", msg(&i.to_string()))
            .await
            .unwrap()
            .epoch;
    }
    // `since` wins over cursors and does not move them.
    let (mut c, _) = connect_device(&gw, kind, "dave", "d1", &format!("&since={epoch}:4")).await;
    let (pushes, synced) = until_synced(&mut c).await;
    assert_eq!(seqs(&pushes), vec![5, 6]);
    assert_eq!(synced["complete"], true);
    c.close().await;
    // `since` in the auth frame.
    let t = token("dave", Some("d1"), None, Duration::from_secs(3600));
    let mut c = gw.connect(kind, "", &[]).await.unwrap();
    c.send(json!({"type": "auth", "token": t, "since": format!("{epoch}:2")}))
        .await;
    c.expect("welcome").await;
    let (pushes, _) = until_synced(&mut c).await;
    assert_eq!(seqs(&pushes), vec![3, 4, 5, 6]);
    c.close().await;
    // A stale epoch replays the current one from its start, marked incomplete.
    let (mut c, _) = connect_device(&gw, kind, "dave", "d1", "&since=stale:3").await;
    let (pushes, synced) = until_synced(&mut c).await;
    assert_eq!(seqs(&pushes), vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(synced["complete"], false);
});

over_transports!(replay_is_paced_by_acks, |kind: Kind| async move {
    let gw = TestGateway::with(|c| c.state.replay_limit = 3).await;
    let d = gw.gw().delivery.clone();
    for i in 1..=7 {
        d.push_durable("erin", msg(&i.to_string())).await.unwrap();
    }
    let (mut c, _) = connect_device(&gw, kind, "erin", "d1", "").await;
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(c.expect("push").await);
    }
    // Nothing more comes before an ack: the next frame answers our ping.
    assert_eq!(c.ping("wait").await["id"], "wait");
    ack(&mut c, got.last().unwrap()).await;
    for _ in 0..3 {
        got.push(c.expect("push").await);
    }
    ack(&mut c, got.last().unwrap()).await;
    let (rest, synced) = until_synced(&mut c).await;
    got.extend(rest);
    assert_eq!(seqs(&got), (1..=7).collect::<Vec<_>>());
    assert_eq!(
        (synced["replayed"].as_u64(), synced["complete"].as_bool()),
        (Some(7), Some(true))
    );
});

over_transports!(
    pushes_racing_reconnects_arrive_in_order_without_gaps,
    |kind: Kind| async move {
        let gw = TestGateway::with(|c| c.state.replay_limit = 5).await;
        let d = gw.gw().delivery.clone();
        const N: u64 = 300;
        let writer = tokio::spawn(async move {
            for i in 1..=N {
                d.push_durable("fay", msg(&i.to_string())).await.unwrap();
                if i % 7 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        });
        let mut held: BTreeSet<u64> = BTreeSet::new();
        let mut sessions = 0;
        while held.len() < N as usize {
            sessions += 1;
            let (mut c, _) = connect_device(&gw, kind, "fay", "d1", "").await;
            let mut last_in_session = None::<u64>;
            // Take a bounded number of frames in this session, then drop the connection.
            for _ in 0..40 {
                let v = c.recv().await;
                if v["type"] != "push" {
                    continue;
                }
                let seq = v["seq"].as_u64().unwrap();
                if let Some(last) = last_in_session {
                    assert_eq!(seq, last + 1, "in order, no gap, within a session");
                } else if let Some(max) = held.last() {
                    assert!(
                        seq <= max + 1,
                        "resume leaves no gap: got {seq} after holding {max}"
                    );
                }
                last_in_session = Some(seq);
                held.insert(seq);
                ack(&mut c, &v).await;
                if held.len() == N as usize {
                    break;
                }
            }
            c.ping("flush").await;
            c.close().await;
            assert!(sessions < 200, "no progress");
        }
        writer.await.unwrap();
        assert_eq!(held, (1..=N).collect());
    }
);

over_transports!(idempotent_message_ids, |kind: Kind| async move {
    let gw = TestGateway::start().await;
    let d = gw.gw().delivery.clone();
    let (mut c, _) = connect_device(&gw, kind, "gus", "d1", "").await;
    until_synced(&mut c).await;
    let m = OutMessage {
        id: "order-42".into(),
        ..msg("\"paid\"")
    };
    let first = d.push_durable("gus", m.clone()).await.unwrap();
    let again = d.push_durable("gus", m).await.unwrap();
    assert_eq!(
        (again.seq, again.duplicate, first.duplicate),
        (first.seq, true, false)
    );
    let p = c.expect("push").await;
    assert_eq!(p["id"], "order-42");
    // The duplicate was not delivered: the next frame answers the ping.
    assert_eq!(c.ping("p").await["type"], "pong");
});

over_transports!(slow_consumer_is_made_whole, |kind: Kind| async move {
    let gw = TestGateway::with(|c| c.sessions.outbound_queue = 4).await;
    let d = gw.gw().delivery.clone();
    let (mut slow, _) = connect_device(&gw, kind, "hal", "d1", "").await;
    until_synced(&mut slow).await;
    let body = format!("\"{}\"", "y".repeat(50_000));
    let mut n = 0;
    while !gw.gw().hub.connections("hal").is_empty() {
        n += 1;
        d.push_durable("hal", msg(&body)).await.unwrap();
        assert!(n < 10_000, "never closed");
        tokio::task::yield_now().await;
    }
    assert_eq!(slow.closed().await.kick, Some(4100));
    let (mut back, _) = connect_device(&gw, kind, "hal", "d1", "").await;
    let mut got = Vec::new();
    loop {
        let v = back.recv().await;
        match v["type"].as_str() {
            Some("push") => {
                ack(&mut back, &v).await;
                got.push(v["seq"].as_u64().unwrap());
            }
            Some("synced") => break,
            _ => {}
        }
    }
    assert_eq!(
        got,
        (1..=n).collect::<Vec<_>>(),
        "everything missed, in order"
    );
});

over_transports!(inbox_is_bounded, |kind: Kind| async move {
    let gw = TestGateway::with(|c| c.state.inbox_max = 5).await;
    let d = gw.gw().delivery.clone();
    for i in 1..=8 {
        d.push_durable("ida", msg(&i.to_string())).await.unwrap();
    }
    let (mut c, w) = connect_device(&gw, kind, "ida", "d1", "").await;
    assert_eq!(w["head_seq"], 8);
    let (pushes, synced) = until_synced(&mut c).await;
    assert_eq!(seqs(&pushes), vec![4, 5, 6, 7, 8]);
    assert_eq!(synced["complete"], false, "older entries were trimmed");
});

over_transports!(group_send_and_transient_pushes, |kind: Kind| async move {
    let gw = TestGateway::start().await;
    let state = gw.gw().state.clone();
    let members: Vec<String> = ["m1", "m2", "m3"].iter().map(|s| s.to_string()).collect();
    state
        .set_group_members("team", imgate::state::GroupEdit::Replace, &members)
        .await
        .unwrap();
    let (mut m1, _) = connect_device(&gw, kind, "m1", "d", "").await;
    until_synced(&mut m1).await;
    let (mut m2, _) = connect_device(&gw, kind, "m2", "d", "").await;
    until_synced(&mut m2).await;
    m1.send(json!({"type": "send", "id": "g", "group": "team", "body": "all"}))
        .await;
    let r = m1.expect("reply").await;
    assert_eq!(r["body"], json!({"members": 3}));
    let p = m1.expect("push").await;
    assert_eq!(
        (p["from"].as_str(), p["body"].as_str()),
        (Some("m1"), Some("all"))
    );
    assert_eq!(m2.expect("push").await["body"], "all");

    // Transient: no seq, and not replayed to a device that connects later.
    let d = gw.gw().delivery.clone();
    let out = d.push_transient("m2", msg("{\"typing\":true}"));
    assert_eq!((out.online, out.delivered), (true, 1));
    let p = m2.expect("push").await;
    assert!(p.get("seq").is_none() && p.get("epoch").is_none(), "{p}");
    assert_eq!(p["body"], json!({"typing": true}));
    // Binary bodies go as body_b64.
    d.push_transient(
        "m2",
        OutMessage {
            body: bytes::Bytes::from_static(&[0xff, 0x00]),
            ..Default::default()
        },
    );
    assert_eq!(m2.expect("push").await["body_b64"], "/wA=");
    // Broadcast reaches every connection.
    assert_eq!(d.broadcast(msg("\"news\"")), 2);
    assert_eq!(m1.expect("push").await["body"], "news");
    assert_eq!(m2.expect("push").await["body"], "news");
    let offline = d.push_transient("m3", msg("1"));
    assert_eq!((offline.online, offline.delivered), (false, 0));
    let (mut m3, _) = connect_device(&gw, kind, "m3", "d", "").await;
    let (pushes, _) = until_synced(&mut m3).await;
    assert_eq!(
        pushes.len(),
        1,
        "only the durable group message: {pushes:?}"
    );
});

// Review F10: a replay batch is bounded in bytes as well as entries, so a reconnecting
// device with large entries is not sent megabytes in one go; it gets the rest as it acks.
over_transports!(
    replay_batches_are_bounded_in_bytes,
    |kind: Kind| async move {
        let gw = TestGateway::with(|c| c.sessions.outbound_queue_bytes = 100 * 1024).await;
        let d = gw.gw().delivery.clone();
        let big = format!("\"{}\"", "x".repeat(60 * 1024));
        for _ in 0..10 {
            d.push_durable("heavy", msg(&big)).await.unwrap();
        }
        let (mut c, _) = connect_device(&gw, kind, "heavy", "d", "").await;
        // What precedes the pong is the first batch: 2 entries reach the 100 KiB budget.
        c.send(json!({"type": "ping", "id": "p"})).await;
        let mut first = Vec::new();
        loop {
            let v = c.recv().await;
            match v["type"].as_str() {
                Some("push") => first.push(v),
                Some("pong") => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(seqs(&first), vec![1, 2]);
        // Acking brings the rest, a batch at a time, then synced.
        let mut seen = seqs(&first);
        let mut last = first.pop().unwrap();
        loop {
            ack(&mut c, &last).await;
            let v = c.recv().await;
            match v["type"].as_str() {
                Some("push") => {
                    seen.push(v["seq"].as_u64().unwrap());
                    last = v;
                }
                Some("synced") => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(seen, (1..=10).collect::<Vec<u64>>());
    }
);
