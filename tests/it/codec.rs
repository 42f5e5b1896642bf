//! The `proto` codec end to end: binary `imgate.v1.Frame` messages both ways.

use std::time::Duration;

use imgate::protocol::proto::pb;
use prost::Message as _;
use tokio_tungstenite::tungstenite::Message;

use crate::common::{token, Client, Kind, TestGateway};
use crate::over_transports;

async fn recv_frame(c: &mut Client) -> pb::frame::Frame {
    loop {
        match c.next_message().await.expect("open") {
            Message::Binary(b) => {
                return pb::Frame::decode(&b[..])
                    .expect("a Frame")
                    .frame
                    .expect("set")
            }
            Message::Text(t) => panic!("text frame on the proto codec: {t}"),
            _ => continue,
        }
    }
}

async fn send_frame(c: &mut Client, f: pb::frame::Frame) {
    let bytes = pb::Frame { frame: Some(f) }.encode_to_vec();
    assert!(c.send_raw(Message::Binary(bytes.into())).await);
}

over_transports!(proto_codec_chat, |kind: Kind| async move {
    use pb::frame::Frame as F;
    let gw = TestGateway::start().await;
    let t = token("pa", Some("d"), None, Duration::from_secs(60));
    let mut a = gw
        .connect(kind, &format!("token={t}&codec=proto"), &[])
        .await
        .unwrap();
    assert!(matches!(recv_frame(&mut a).await, F::Welcome(w) if w.user == "pa"));
    assert!(matches!(recv_frame(&mut a).await, F::Synced(_)));
    // The codec can also be chosen with the subprotocol.
    let t = token("pb", Some("d"), None, Duration::from_secs(60));
    let mut b = gw
        .connect(
            kind,
            &format!("token={t}"),
            &[("sec-websocket-protocol", "imgate.v1.proto")],
        )
        .await
        .unwrap();
    if kind != Kind::Wt {
        assert_eq!(b.subprotocol.as_deref(), Some("imgate.v1.proto"));
    }
    assert!(matches!(recv_frame(&mut b).await, F::Welcome(_)));
    assert!(matches!(recv_frame(&mut b).await, F::Synced(_)));

    send_frame(
        &mut a,
        F::Ping(pb::PingFrame {
            id: Some("p".into()),
        }),
    )
    .await;
    assert!(matches!(recv_frame(&mut a).await, F::Pong(p) if p.id.as_deref() == Some("p")));
    let body = bytes::Bytes::from_static(&[0, 159, 146, 150]);
    send_frame(
        &mut a,
        F::Send(pb::SendFrame {
            id: "1".into(),
            to: Some("pb".into()),
            body: body.clone(),
            ..Default::default()
        }),
    )
    .await;
    assert!(matches!(recv_frame(&mut a).await, F::Reply(r) if r.ok && r.id == "1"));
    match recv_frame(&mut b).await {
        F::Push(p) => assert_eq!(
            (p.body, p.seq, p.from.as_deref()),
            (body, Some(1), Some("pa"))
        ),
        other => panic!("{other:?}"),
    }
    // A text message on the proto codec (over WebTransport: a frame that is not a protobuf
    // Frame) is a protocol error.
    assert!(a.send_raw(Message::Text("{}".into())).await);
    loop {
        match a.next_message().await {
            Some(Message::Binary(b)) => {
                if let Some(F::Kick(k)) = pb::Frame::decode(&b[..]).unwrap().frame {
                    assert_eq!(k.code, 4504);
                }
            }
            Some(Message::Close(Some(f))) => {
                assert_eq!(u16::from(f.code), 4504);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
});
