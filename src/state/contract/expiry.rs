//! The contract's time-dependent cases: windows and lifetimes run on real, short durations,
//! and each waits for its effect by polling under a timeout.

use std::time::Duration;

use super::{msg, seqs, EFFECT_WAIT, S};
use crate::state::Cursors;

pub async fn dedupe_window_expires(s: S) {
    // The factory is given dedupe_window = 300 ms for this case.
    assert!(!s.append("u", msg("same", "x")).await.unwrap().duplicate);
    assert!(s.append("u", msg("same", "x")).await.unwrap().duplicate);
    let again = tokio::time::timeout(EFFECT_WAIT, async {
        loop {
            let a = s.append("u", msg("same", "x")).await.unwrap();
            if !a.duplicate {
                return a;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the id is accepted again once the window passed");
    assert_eq!(again.seq, 2);
}

pub async fn entries_expire_after_the_ttl(s: S) {
    // The factory is given inbox_ttl = 500 ms for this case.
    let first = s.append("u", msg("a", "x")).await.unwrap();
    tokio::time::timeout(EFFECT_WAIT, async {
        loop {
            let r = s.read_after("u", 0, 10).await.unwrap();
            if r.messages.is_empty() {
                assert!(r.trimmed, "an expired entry is reported as missing");
                assert_eq!(r.head_seq, 1);
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the entry expires");
    // The inbox was in use all along: same epoch, the seq goes on.
    let next = s.append("u", msg("b", "x")).await.unwrap();
    assert_eq!((next.seq, &next.epoch), (2, &first.epoch));
    let r = s.read_after("u", 0, 10).await.unwrap();
    assert_eq!(seqs(&r), vec![2]);
    assert!(r.trimmed);
}

pub async fn a_lost_inbox_gets_a_new_epoch(s: S) {
    // The factory is given inbox_ttl = 300 ms and dedupe_window = 100 ms for this case.
    let first = s.append("u", msg("a", "x")).await.unwrap();
    s.ack("u", Some("phone"), &first.epoch, 1).await.unwrap();
    // Nothing touches the user while the inbox ages out: waiting is the point here.
    tokio::time::sleep(Duration::from_millis(400)).await;
    s.maintain("i1").await.unwrap();
    let again = s.append("u", msg("b", "x")).await.unwrap();
    assert_ne!(again.epoch, first.epoch, "the inbox outlived its ttl");
    assert_eq!(again.seq, 1, "a new epoch starts at 1");
    assert_eq!(
        s.cursors("u", "phone").await.unwrap(),
        Cursors {
            device: None,
            user: 0
        },
        "cursors of the lost epoch are gone"
    );
}
