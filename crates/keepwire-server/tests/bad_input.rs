//! Bad input gets the documented answer and harms nobody else.

use std::time::Duration;

use keepwire_proto::{ClientFrame, CloseCode, ConvKind, ErrorCode, ServerFrame};
use keepwire_server::AdminStore as _;
use keepwire_testkit::{Incoming, WsClient, new_cid, upgrade_status};
use tokio_tungstenite::tungstenite::Message;

use crate::support::{TestRelay, create_conv, test_config};

fn code(c: CloseCode) -> Option<u16> {
    Some(c.code())
}

/// The next refusal: an `error` (with its rid) or a send's `rejected`
/// (with its cid).
async fn error_of(c: &mut WsClient) -> (ErrorCode, Option<String>) {
    c.recv_where(|f| match f {
        ServerFrame::Error(e) => Some((e.code, e.rid.clone())),
        ServerFrame::Rejected(r) => Some((r.code, Some(r.cid.clone()))),
        _ => None,
    })
    .await
}

/// A healthy client that must keep working whatever the others do.
async fn still_serving(relay: &TestRelay, token: &str, conv: u64) {
    let mut ok = relay.connect(token, "healthy").await;
    let cid = ok.send_message(conv, "still here").await;
    ok.confirm(&cid).await;
    ok.barrier().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_after_hello_get_error_frames_and_the_connection_survives() {
    let relay = TestRelay::start().await;
    let ta = relay.user("alice").await;
    let _tb = relay.user("bob").await;
    let mut a = relay.connect(&ta, "a").await;
    let conv = create_conv(&mut a, ConvKind::Direct, &["bob"]).await;

    let cases: &[(&str, ErrorCode)] = &[
        ("{not json", ErrorCode::Malformed),
        ("[1,2,3]", ErrorCode::Malformed),
        (r#"{"no_type":1}"#, ErrorCode::Malformed),
        (r#"{"type":"teleport","rid":"x1"}"#, ErrorCode::UnknownType),
        (
            r#"{"type":"send","conv":1,"body":"missing cid"}"#,
            ErrorCode::Malformed,
        ),
        (
            r#"{"type":"send","cid":12,"conv":"one","body":5}"#,
            ErrorCode::Malformed,
        ),
        (
            r#"{"type":"send","cid":"short","conv":1,"body":""}"#,
            ErrorCode::Invalid,
        ),
        (
            r#"{"type":"send","cid":"0123456789abcdef0123","conv":1,"kind":"video","body":""}"#,
            ErrorCode::UnsupportedKind,
        ),
        (
            r#"{"type":"history","rid":"h1","conv":1,"limit":100000}"#,
            ErrorCode::Invalid,
        ),
        (r#"{"type":"ack","seq":1000000}"#, ErrorCode::BadAck),
        (
            r#"{"type":"hello","token":"x","device":"d"}"#,
            ErrorCode::UnexpectedHello,
        ),
    ];
    for (text, want) in cases {
        a.send_text(text).await;
        let (got, _) = error_of(&mut a).await;
        assert_eq!(got, *want, "answer to {text}");
    }
    // The rid is echoed when it could be read.
    a.send_text(r#"{"type":"teleport","rid":"echo-me"}"#).await;
    assert_eq!(error_of(&mut a).await.1.as_deref(), Some("echo-me"));
    // Oversized body: rejected as too large (frame itself within limits).
    let body = "x".repeat(relay_limits().max_body_bytes + 1);
    a.send_with_cid(conv.id, &body, &new_cid()).await;
    assert_eq!(error_of(&mut a).await.0, ErrorCode::BodyTooLarge);
    // The connection still works.
    let cid = a.send_message(conv.id, "fine").await;
    a.confirm(&cid).await;
    still_serving(&relay, &ta, conv.id).await;
}

fn relay_limits() -> keepwire_proto::Limits {
    test_config().limits
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_bad_frames_close_with_protocol_violation() {
    let relay = TestRelay::start().await;
    let ta = relay.user("alice").await;
    let mut a = relay.connect(&ta, "a").await;
    for _ in 0..=relay_limits().max_protocol_errors {
        a.send_text("garbage").await;
    }
    assert_eq!(a.expect_close().await, code(CloseCode::ProtocolViolation));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_level_violations_close_with_their_codes() {
    let mut config = test_config();
    config.handshake_timeout = Duration::from_millis(300);
    let relay = TestRelay::start_with(config, Default::default()).await;
    let ta = relay.user("alice").await;
    let _tb = relay.user("bob").await;
    let mut a = relay.connect(&ta, "a").await;
    let conv = create_conv(&mut a, ConvKind::Direct, &["bob"]).await;

    // Binary frame.
    let mut c = relay.connect(&ta, "bin").await;
    c.send_raw(Message::Binary(vec![1, 2, 3].into())).await;
    assert_eq!(c.expect_close().await, code(CloseCode::UnsupportedData));
    // Oversized frame.
    let mut c = relay.connect(&ta, "big").await;
    let huge = "x".repeat(relay_limits().max_frame_bytes + 10);
    c.send_text(&huge).await;
    assert_eq!(c.expect_close().await, code(CloseCode::MessageTooBig));
    // A text frame that is not UTF-8: 1007 (RFC 6455 §7.4.1), with a close frame.
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    let mut c = relay.connect(&ta, "utf8").await;
    let bad = Frame::message(vec![0xff_u8, 0xfe, 0x80], OpCode::Data(Data::Text), true);
    c.send_raw(Message::Frame(bad)).await;
    assert_eq!(c.expect_close().await, code(CloseCode::InvalidPayload));
    // A reserved opcode: 1002, with a close frame.
    let mut c = relay.connect(&ta, "opcode").await;
    let bad = Frame::message(vec![1_u8], OpCode::Data(Data::Reserved(3)), true);
    c.send_raw(Message::Frame(bad)).await;
    assert_eq!(c.expect_close().await, code(CloseCode::ProtocolError));
    // No hello at all.
    let mut c = WsClient::open(&relay.url).await.unwrap();
    assert_eq!(c.expect_close().await, code(CloseCode::HandshakeTimeout));
    // A first frame that is not a hello.
    let mut c = WsClient::open(&relay.url).await.unwrap();
    c.send(&ClientFrame::Ping {}).await;
    assert_eq!(c.expect_close().await, code(CloseCode::ProtocolViolation));
    let mut c = WsClient::open(&relay.url).await.unwrap();
    c.send_text("{}").await;
    assert_eq!(c.expect_close().await, code(CloseCode::ProtocolViolation));
    // Binary before hello.
    let mut c = WsClient::open(&relay.url).await.unwrap();
    c.send_raw(Message::Binary(vec![0].into())).await;
    assert_eq!(c.expect_close().await, code(CloseCode::UnsupportedData));

    // HTTP-level: tokens in URLs, missing or wrong subprotocol, plain GET.
    let (status, _) = upgrade_status(&relay.host_port, "/?token=abc", Some("keepwire.v1")).await;
    assert_eq!(status, 400);
    let (status, _) =
        upgrade_status(&relay.host_port, "/?access_token=abc", Some("keepwire.v1")).await;
    assert_eq!(status, 400);
    let (status, _) = upgrade_status(&relay.host_port, "/", None).await;
    assert_eq!(status, 400);
    let (status, _) = upgrade_status(&relay.host_port, "/", Some("mqtt")).await;
    assert_eq!(status, 400);
    let (status, text) = upgrade_status(&relay.host_port, "/", Some("keepwire.v1")).await;
    assert_eq!(status, 101);
    assert!(
        text.to_ascii_lowercase()
            .contains("sec-websocket-protocol: keepwire.v1")
    );
    let (status, _) = keepwire_testkit::http_get(&relay.host_port, "/").await;
    assert_eq!(status, 426);

    still_serving(&relay, &ta, conv.id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_get_their_close_codes() {
    let relay = TestRelay::start().await;
    let ta = relay.user("alice").await;
    let _tb = relay.user("bob").await;
    let mut a = relay.connect(&ta, "a").await;
    let conv = create_conv(&mut a, ConvKind::Direct, &["bob"]).await;

    let forged = format!("kw_{}", "A".repeat(43));
    for bad in [forged.as_str(), "not-a-token", "kw_"] {
        let r = WsClient::connect(&relay.url, bad, "d", None).await;
        assert_eq!(r.err(), Some(code(CloseCode::AuthFailed)), "token {bad:?}");
    }
    let expired = relay
        .store
        .issue_token("alice", Duration::ZERO)
        .await
        .unwrap();
    let r = WsClient::connect(&relay.url, &expired.token, "d", None).await;
    assert_eq!(r.err(), Some(code(CloseCode::TokenExpired)));
    let revoked = relay
        .store
        .issue_token("alice", Duration::from_secs(60))
        .await
        .unwrap();
    relay
        .store
        .revoke(keepwire_server::store::RevokeTarget::Id(revoked.id))
        .await
        .unwrap();
    let r = WsClient::connect(&relay.url, &revoked.token, "d", None).await;
    assert_eq!(r.err(), Some(code(CloseCode::TokenRevoked)));
    // Invalid hello fields are a protocol violation.
    let r = WsClient::connect(&relay.url, &ta, "bad device id!", None).await;
    assert_eq!(r.err(), Some(code(CloseCode::ProtocolViolation)));

    still_serving(&relay, &ta, conv.id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_cannot_read_or_send_to_a_conversation() {
    let relay = TestRelay::start().await;
    let ta = relay.user("alice").await;
    let _tb = relay.user("bob").await;
    let te = relay.user("eve").await;
    let mut a = relay.connect(&ta, "a").await;
    let conv = create_conv(&mut a, ConvKind::Direct, &["bob"]).await;
    let mut e = relay.connect(&te, "e").await;
    let cid = e.send_message(conv.id, "let me in").await;
    let r = e.answer(&cid).await.unwrap_err();
    assert_eq!(r.code, ErrorCode::NotMember);
    e.send(&ClientFrame::History(keepwire_proto::HistoryRequest {
        rid: "h".into(),
        conv: conv.id,
        before: None,
        limit: None,
    }))
    .await;
    assert_eq!(error_of(&mut e).await.0, ErrorCode::NotMember);
    e.send(&ClientFrame::ConvAdd(keepwire_proto::ConvMember {
        rid: "add".into(),
        conv: conv.id,
        user: "eve".into(),
    }))
    .await;
    assert_eq!(error_of(&mut e).await.0, ErrorCode::NotMember);
    still_serving(&relay, &ta, conv.id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_are_slowed_per_send_and_only_abuse_is_disconnected() {
    let mut config = test_config();
    config.limits.sends_per_sec = 20;
    config.send_burst = 5;
    let relay = TestRelay::start_with(config, Default::default()).await;
    let ta = relay.user("alice").await;
    let _tb = relay.user("bob").await;
    let mut setup = relay.connect(&ta, "setup").await;
    let conv = create_conv(&mut setup, ConvKind::Direct, &["bob"]).await;

    // A polite client that honours retry_after flushes 30 messages without
    // being disconnected.
    let mut polite = relay.connect(&ta, "polite").await;
    let mut confirmed = 0;
    let mut i = 0;
    let mut attempts = 0;
    while confirmed < 30 {
        // Like an outbox: resend the same message (same cid) until confirmed.
        let cid = format!("polite-{i:012}");
        polite.send_with_cid(conv.id, &format!("p{i}"), &cid).await;
        attempts += 1;
        match polite.answer(&cid).await {
            Ok(_) => {
                confirmed += 1;
                i += 1;
            }
            Err(r) => {
                assert_eq!(r.code, ErrorCode::RateLimited);
                let wait = r.retry_after_ms.expect("rate limits say when to retry");
                assert!(wait > 0 && wait <= 1000);
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
        }
    }
    assert!(attempts > 30, "the limit was hit at least once");

    // A flooder that ignores retry_after is disconnected with 4008.
    let mut flood = relay.connect(&ta, "flood").await;
    let mut closed = None;
    for n in 0..10_000 {
        flood.send_message(conv.id, &format!("f{n}")).await;
        if n % 100 == 99
            && let Some(Incoming::Closed(c)) = flood.recv_wire(Duration::from_millis(1)).await
        {
            closed = Some(c);
            break;
        }
    }
    let closed = match closed {
        Some(c) => c,
        None => flood.expect_close().await,
    };
    assert_eq!(closed, code(CloseCode::RateLimited));
    still_serving(&relay, &ta, conv.id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_sends_keep_their_order_through_rate_limits() {
    let mut config = test_config();
    config.limits.sends_per_sec = 50;
    config.send_burst = 3;
    let relay = TestRelay::start_with(config, Default::default()).await;
    let ta = relay.user("alice").await;
    let _tb = relay.user("bob").await;
    let mut a = relay.connect(&ta, "a").await;
    let conv = create_conv(&mut a, ConvKind::Direct, &["bob"]).await;
    // An outbox of 40 pipelined sends (within the unconfirmed window), resent
    // from the first rejected one after each retry_after.
    let outbox: Vec<(String, String)> = (0..40)
        .map(|i| (format!("order-{i:012}"), format!("{i}")))
        .collect();
    let mut next = 0;
    let mut stored: Vec<u64> = Vec::new();
    while next < outbox.len() {
        for (cid, body) in &outbox[next..] {
            a.send_with_cid(conv.id, body, cid).await;
        }
        let mut wait = None;
        for (cid, _) in &outbox[next..] {
            match a.answer(cid).await {
                Ok(c) if wait.is_none() => {
                    stored.push(c.conv_seq);
                    next += 1;
                }
                Ok(c) => panic!("send {} accepted after an earlier one was rejected", c.cid),
                Err(r) => {
                    assert_eq!(r.code, ErrorCode::RateLimited);
                    wait.get_or_insert(r.retry_after_ms.unwrap());
                }
            }
        }
        if let Some(ms) = wait {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }
    assert_eq!(
        stored,
        (1..=40).collect::<Vec<u64>>(),
        "stored in send order, none twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_per_user_limit_are_refused() {
    let mut config = test_config();
    config.max_connections_per_user = 2;
    let relay = TestRelay::start_with(config, Default::default()).await;
    let ta = relay.user("alice").await;
    let _c1 = relay.connect(&ta, "d1").await;
    let _c2 = relay.connect(&ta, "d2").await;
    let r = WsClient::connect(&relay.url, &ta, "d3", None).await;
    assert_eq!(r.err(), Some(code(CloseCode::TooManyConnections)));
    // Replacing an existing device is not a new connection.
    let _c2b = relay.connect(&ta, "d2").await;
}
