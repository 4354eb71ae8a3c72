//! Connection lifecycle: heartbeats, replacement, revocation, shutdown.

use std::time::Duration;

use keepwire_proto::{ClientFrame, CloseCode, ServerFrame};
use keepwire_server::AdminStore as _;
use keepwire_server::store::RevokeTarget;
use keepwire_testkit::WsClient;

use crate::support::{TestRelay, test_config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_is_negotiated_and_silence_closes_the_connection() {
    let mut config = test_config();
    config.heartbeat_min = Duration::from_millis(100);
    config.heartbeat_grace = Duration::from_millis(100);
    let relay = TestRelay::start_with(config, Default::default()).await;
    let ta = relay.user("alice").await;

    let mut c = WsClient::connect_with(&relay.url, &ta, "d", None, Some(200))
        .await
        .unwrap();
    assert_eq!(c.welcome().heartbeat_ms, 200);
    assert_eq!(c.welcome().idle_timeout_ms, 300);
    // Pinging at the heartbeat cadence keeps it open well past the idle timeout.
    let mut cadence = tokio::time::interval(Duration::from_millis(100));
    for _ in 0..8 {
        cadence.tick().await;
        c.barrier().await;
    }
    // Renegotiate, then fall silent.
    c.send(&ClientFrame::SetHeartbeat { heartbeat_ms: 150 })
        .await;
    let (hb, idle) = c
        .recv_where(|f| match f {
            ServerFrame::HeartbeatSet {
                heartbeat_ms,
                idle_timeout_ms,
            } => Some((*heartbeat_ms, *idle_timeout_ms)),
            _ => None,
        })
        .await;
    assert_eq!((hb, idle), (150, 250));
    let started = tokio::time::Instant::now();
    assert_eq!(
        c.expect_close().await,
        Some(CloseCode::HeartbeatTimeout.code())
    );
    assert!(started.elapsed() >= Duration::from_millis(240));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_connection_of_the_same_device_replaces_the_older() {
    let relay = TestRelay::start().await;
    let ta = relay.user("alice").await;
    let mut old = relay.connect(&ta, "phone").await;
    let _other_device = relay.connect(&ta, "laptop").await;
    let mut new = relay.connect(&ta, "phone").await;
    assert_eq!(old.expect_close().await, Some(CloseCode::Replaced.code()));
    new.barrier().await;
    assert_eq!(
        CloseCode::Replaced.client_action(),
        keepwire_proto::ClientAction::Stop
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_token_closes_its_live_connections_at_once() {
    let relay = TestRelay::start().await;
    let ta = relay.user("alice").await;
    let second = relay
        .store
        .issue_token("alice", Duration::from_secs(60))
        .await
        .unwrap();
    let mut revoked = relay.connect(&ta, "a").await;
    let mut kept = relay.connect(&second.token, "b").await;
    let started = tokio::time::Instant::now();
    relay
        .store
        .revoke(RevokeTarget::Token(ta.clone()))
        .await
        .unwrap();
    assert_eq!(
        revoked.expect_close().await,
        Some(CloseCode::TokenRevoked.code())
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "closed within a second"
    );
    kept.barrier().await;
    // Revoking every token of the user closes the rest.
    relay
        .store
        .revoke(RevokeTarget::User("alice".into()))
        .await
        .unwrap();
    assert_eq!(
        kept.expect_close().await,
        Some(CloseCode::TokenRevoked.code())
    );
    let r = WsClient::connect(&relay.url, &second.token, "b", None).await;
    assert_eq!(r.err(), Some(Some(CloseCode::TokenRevoked.code())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_expiry_during_a_connection_closes_with_token_expired() {
    let relay = TestRelay::start().await;
    relay.store.create_user("alice").await.unwrap();
    let t = relay
        .store
        .issue_token("alice", Duration::from_millis(600))
        .await
        .unwrap();
    let mut c = relay.connect(&t.token, "a").await;
    assert_eq!(c.expect_close().await, Some(CloseCode::TokenExpired.code()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_sends_going_away() {
    let mut relay = TestRelay::start().await;
    let ta = relay.user("alice").await;
    let mut a = relay.connect(&ta, "a").await;
    let mut b = relay.connect(&ta, "b").await;
    relay.stop().await;
    assert_eq!(a.expect_close().await, Some(CloseCode::GoingAway.code()));
    assert_eq!(b.expect_close().await, Some(CloseCode::GoingAway.code()));
    assert_eq!(
        CloseCode::GoingAway.client_action(),
        keepwire_proto::ClientAction::ReconnectSoon
    );
    // The store was flushed and closed.
    assert!(matches!(
        relay.store.create_user("late").await,
        Err(e) if e.is_closed()
    ));
}
