//! Push wake-ups end to end: a relay with a push configuration, a mock FCM
//! (OAuth token endpoint and send endpoint) on 127.0.0.1, raw protocol
//! clients. When a device gets a push, and when it does not.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use keepwire_proto::{ClientFrame, ConvKind, ErrorCode, ServerFrame};
use keepwire_server::push::PushSettings;
use keepwire_server::{AdminStore as _, Config, RelayStore as _};
use keepwire_testkit::{TempDir, WsClient, wait_until};
use serde_json::{Value, json};

use crate::support::{TestRelay, create_conv, test_config};

/// One push the mock FCM received.
#[derive(Debug, Clone)]
struct Received {
    token: String,
    data: Value,
    priority: String,
}

#[derive(Default)]
struct FcmState {
    pushes: Mutex<Vec<Received>>,
    /// Tokens answered with UNREGISTERED.
    dead: Mutex<Vec<String>>,
    /// Hold every send unanswered (a provider that hangs).
    hang: std::sync::atomic::AtomicBool,
}

/// A mock FCM: `/token` hands out access tokens, `/v1/projects/*/messages:send`
/// records pushes.
struct MockFcm {
    url: String,
    state: Arc<FcmState>,
    _task: tokio::task::JoinHandle<()>,
}

impl MockFcm {
    async fn start() -> MockFcm {
        let state = Arc::new(FcmState::default());
        let app = axum::Router::new()
            .route("/token", post(token))
            .route("/v1/projects/{project}/{send}", post(send))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        MockFcm {
            url,
            state,
            _task: task,
        }
    }

    fn pushes_to(&self, token: &str) -> Vec<Received> {
        self.state
            .pushes
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.token == token)
            .cloned()
            .collect()
    }

    /// Waits until `token` got `n` pushes.
    async fn wait_pushes(&self, token: &str, n: usize) -> Vec<Received> {
        wait_until(
            Duration::from_secs(15),
            &format!("{n} pushes to {token}"),
            || async { self.pushes_to(token).len() >= n },
        )
        .await;
        self.pushes_to(token)
    }
}

async fn token() -> Json<Value> {
    Json(json!({"access_token": "mock-access", "expires_in": 3600, "token_type": "Bearer"}))
}

async fn send(
    State(s): State<Arc<FcmState>>,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    while s.hang.load(std::sync::atomic::Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = &body["message"];
    let token = m["token"].as_str().unwrap_or_default().to_owned();
    s.pushes.lock().unwrap().push(Received {
        token: token.clone(),
        data: m["data"].clone(),
        priority: m["android"]["priority"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    });
    if s.dead.lock().unwrap().contains(&token) {
        return (
            StatusCode::NOT_FOUND,
            Json(
                json!({"error": {"code": 404, "status": "NOT_FOUND", "message": "gone",
                "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "UNREGISTERED"}]}}),
            ),
        );
    }
    (
        StatusCode::OK,
        Json(json!({"name": "projects/kw-test/messages/1"})),
    )
}

/// Writes a push configuration pointing at the mock.
fn push_config(dir: &TempDir, fcm: &MockFcm, webpush: bool) -> std::path::PathBuf {
    let key = include_str!("../../keepwire-push/tests/fixtures/fcm-test-key.pem");
    let sa = json!({
        "type": "service_account",
        "project_id": "kw-test",
        "private_key_id": "k1",
        "private_key": key,
        "client_email": "relay@kw-test.iam.gserviceaccount.com",
        "token_uri": format!("{}/token", fcm.url),
    });
    std::fs::write(dir.join("sa.json"), sa.to_string()).unwrap();
    let mut toml = format!(
        "[fcm]\nservice_account = \"sa.json\"\nendpoint = \"{}\"\n[limits]\ndevice_burst = 100\ndevice_interval = \"10ms\"\nbackoff_base = \"50ms\"\n",
        fcm.url
    );
    if webpush {
        toml.push_str("[webpush]\nsubject = \"mailto:ops@example.com\"\n");
    }
    let path = dir.join("push.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

fn config_with_push(path: std::path::PathBuf, rearm: Duration) -> Config {
    let mut c = test_config();
    c.push_config = Some(path);
    c.push_settings = PushSettings {
        frozen_after: Duration::from_millis(500),
        rearm,
        rearm_max: rearm * 4,
        failpoint: None,
    };
    c
}

/// Registers `token` for the connection's device; returns the registration id.
async fn register(c: &mut WsClient, token: &str) -> String {
    c.send_text(
        &json!({"type": "push_register", "rid": "p1", "registration": {"provider": "fcm", "token": token}})
            .to_string(),
    )
    .await;
    c.recv_where(|f| match f {
        ServerFrame::Push { rid, id } if rid == "p1" => id.clone(),
        ServerFrame::Error(e) if e.rid.as_deref() == Some("p1") => panic!("refused: {e:?}"),
        _ => None,
    })
    .await
}

/// Nothing more arrives for `token` within `d` (a push would have come by
/// then: the engine decides within `frozen_after` of an entry).
async fn assert_no_more(fcm: &MockFcm, token: &str, n: usize, d: Duration) {
    let deadline = tokio::time::Instant::now() + d;
    while tokio::time::Instant::now() < deadline {
        assert_eq!(fcm.pushes_to(token).len(), n, "unexpected push to {token}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connected_devices_get_none_and_a_burst_for_a_gone_device_wakes_it_once() {
    let fcm = MockFcm::start().await;
    let dir = TempDir::new("push");
    let relay = TestRelay::start_with(
        config_with_push(push_config(&dir, &fcm, false), Duration::from_secs(60)),
        Default::default(),
    )
    .await;
    let (ta, tb) = (relay.user("alice").await, relay.user("bob").await);
    let mut a = relay.connect(&ta, "a-phone").await;
    let conv = create_conv(&mut a, ConvKind::Direct, &["bob"]).await;
    let mut b = relay.connect(&tb, "b-phone").await;
    let reg = register(&mut b, "bob-1").await;
    assert!(reg.starts_with("r_"));
    // Connected and acknowledging: no push.
    for i in 0..3 {
        let cid = a.send_message(conv.id, &format!("hi {i}")).await;
        a.confirm(&cid).await;
    }
    b.entries(4, true).await;
    b.send(&ClientFrame::Ping {}).await;
    assert_no_more(&fcm, "bob-1", 0, Duration::from_millis(1500)).await;
    // Gone: a burst of 50 wakes the device once.
    b.close().await;
    for i in 0..50 {
        let cid = a.send_message(conv.id, &format!("burst {i}")).await;
        a.confirm(&cid).await;
    }
    let pushes = fcm.wait_pushes("bob-1", 1).await;
    assert_eq!(
        pushes[0].data["kw"], reg,
        "the payload is the registration id"
    );
    assert_eq!(pushes[0].priority, "HIGH");
    assert_eq!(
        pushes[0].data.as_object().unwrap().len(),
        1,
        "nothing but the registration id: {}",
        pushes[0].data
    );
    assert_no_more(&fcm, "bob-1", 1, Duration::from_millis(1500)).await;
    // The device syncs (acknowledges everything); the next message wakes it again.
    let cursor = {
        let mut b = relay.connect(&tb, "b-phone").await;
        let entries = b.entries(53, true).await;
        let cursor = b.cursor(entries.last().unwrap().seq);
        b.barrier().await;
        b.close().await;
        cursor
    };
    let _ = cursor;
    let cid = a.send_message(conv.id, "after the sync").await;
    a.confirm(&cid).await;
    fcm.wait_pushes("bob-1", 2).await;
    // Its own messages and muted conversations wake nobody.
    let tb_phone = relay.connect(&tb, "b-laptop").await;
    let mut bl = tb_phone;
    bl.send_text(&json!({"type": "mute", "rid": "m1", "conv": conv.id, "muted": true}).to_string())
        .await;
    let muted = bl
        .recv_where(|f| match f {
            ServerFrame::Muted { rid, muted, .. } if rid == "m1" => Some(*muted),
            _ => None,
        })
        .await;
    assert!(muted);
    let cid = a.send_message(conv.id, "muted now").await;
    a.confirm(&cid).await;
    let cid = bl.send_message(conv.id, "from bob's laptop").await;
    bl.confirm(&cid).await;
    assert_no_more(&fcm, "bob-1", 2, Duration::from_millis(1500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_push_is_sent_again_after_the_rearm_and_a_frozen_connection_is_woken() {
    let fcm = MockFcm::start().await;
    let dir = TempDir::new("push-rearm");
    let relay = TestRelay::start_with(
        config_with_push(push_config(&dir, &fcm, false), Duration::from_millis(800)),
        Default::default(),
    )
    .await;
    let (ta, tb) = (relay.user("alice").await, relay.user("bob").await);
    let mut a = relay.connect(&ta, "a-phone").await;
    let conv = create_conv(&mut a, ConvKind::Direct, &["bob"]).await;
    // A frozen app: connected, registered, silent while an entry waits.
    let mut b = relay.connect(&tb, "b-phone").await;
    register(&mut b, "bob-frozen").await;
    let cid = a.send_message(conv.id, "are you there?").await;
    a.confirm(&cid).await;
    let first = fcm.wait_pushes("bob-frozen", 1).await;
    assert_eq!(first.len(), 1);
    // Nobody answers: it comes again after the rearm (0.8 s), then after 1.6 s.
    let t0 = std::time::Instant::now();
    fcm.wait_pushes("bob-frozen", 2).await;
    assert!(
        t0.elapsed() >= Duration::from_millis(500),
        "{:?}",
        t0.elapsed()
    );
    fcm.wait_pushes("bob-frozen", 3).await;
    // The device wakes and acknowledges: no more.
    b.entries(2, true).await;
    b.send(&ClientFrame::Ping {}).await;
    b.barrier().await;
    let n = fcm.pushes_to("bob-frozen").len();
    assert_no_more(&fcm, "bob-frozen", n, Duration::from_millis(2000)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_registrations_are_dropped_and_bad_ones_refused() {
    let fcm = MockFcm::start().await;
    let dir = TempDir::new("push-dead");
    let relay = TestRelay::start_with(
        config_with_push(push_config(&dir, &fcm, true), Duration::from_secs(60)),
        Default::default(),
    )
    .await;
    let (ta, tb) = (relay.user("alice").await, relay.user("bob").await);
    let mut a = relay.connect(&ta, "a-phone").await;
    let conv = create_conv(&mut a, ConvKind::Direct, &["bob"]).await;
    fcm.state.dead.lock().unwrap().push("bob-dead".into());
    {
        let mut b = relay.connect(&tb, "b-phone").await;
        register(&mut b, "bob-dead").await;
        // A Web Push endpoint on a private address is refused.
        b.send_text(
            &json!({"type": "push_register", "rid": "w1", "registration": {"provider": "webpush",
                "endpoint": "https://10.1.2.3/push/abc",
                "keys": {"p256dh": "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4", "auth": "BTBZMqHH6r4Tts7J_aSIgg"}}})
                .to_string(),
        )
        .await;
        let code = b
            .recv_where(|f| match f {
                ServerFrame::Error(e) if e.rid.as_deref() == Some("w1") => Some(e.code),
                _ => None,
            })
            .await;
        assert_eq!(code, ErrorCode::Invalid);
        b.close().await;
    }
    let cid = a.send_message(conv.id, "wake").await;
    a.confirm(&cid).await;
    fcm.wait_pushes("bob-dead", 1).await;
    wait_until(
        Duration::from_secs(10),
        "the dead registration dropped",
        || async {
            let devices = relay.store.list_devices("bob").await.unwrap();
            devices.iter().all(|d| d.push.is_none())
        },
    )
    .await;
    // The backend sets one over the API; the VAPID key is public.
    let key = relay.store.create_api_key("backend").await.unwrap().1;
    let base = format!("http://{}", relay.host_port);
    let http = reqwest::Client::new();
    let r = http
        .put(format!("{base}/v1/users/bob/devices/b-phone/push"))
        .bearer_auth(&key)
        .json(&json!({"registration": {"provider": "fcm", "token": "bob-api"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let devices = relay.store.list_devices("bob").await.unwrap();
    assert_eq!(devices[0].push.as_ref().unwrap().provider, "fcm");
    let body: Value = http
        .get(format!("{base}/v1/users/bob/devices"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        !body.to_string().contains("bob-api"),
        "the token never leaves the relay: {body}"
    );
    let vapid: Value = http
        .get(format!("{base}/v1/push/vapid"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(vapid["vapid"].as_str().unwrap().len(), 87, "{vapid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_provider_delays_no_delivery_and_a_restart_resends_an_unknown_push() {
    let fcm = MockFcm::start().await;
    let dir = TempDir::new("push-hang");
    let db_dir = TempDir::new("push-hang-db");
    let config = config_with_push(push_config(&dir, &fcm, false), Duration::from_secs(600));
    let mut relay = TestRelay::start_at(&db_dir, config.clone()).await;
    let (ta, tb) = (relay.user("alice").await, relay.user("bob").await);
    let tc = relay.user("carol").await;
    let mut a = relay.connect(&ta, "a-phone").await;
    let conv = create_conv(&mut a, ConvKind::Group, &["bob", "carol"]).await;
    {
        let mut b = relay.connect(&tb, "b-phone").await;
        register(&mut b, "bob-hang").await;
        b.close().await;
    }
    fcm.state
        .hang
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let mut c = relay.connect(&tc, "c-phone").await;
    c.entries(1, true).await;
    // The provider hangs: delivery to connected devices goes on.
    let t0 = std::time::Instant::now();
    let cid = a.send_message(conv.id, "during the hang").await;
    a.confirm(&cid).await;
    let e = c.entry().await;
    assert!(t0.elapsed() < Duration::from_secs(2));
    let _ = e;
    // The push for bob was recorded and is stuck at the provider: the relay
    // stops; the next one sends it again (its delivery is unknown).
    wait_until(Duration::from_secs(10), "the push recorded", || async {
        let bob = relay.store.user_id("bob").await.unwrap().unwrap();
        relay.store.push_targets(bob).await.unwrap()[0].pushed_seq > 0
    })
    .await;
    drop(c);
    drop(a);
    relay.stop().await;
    fcm.state
        .hang
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let before = fcm.pushes_to("bob-hang").len();
    let config = config_with_push(push_config(&dir, &fcm, false), Duration::from_secs(600));
    let _relay = TestRelay::start_at(&db_dir, config).await;
    fcm.wait_pushes("bob-hang", before + 1).await;
}
