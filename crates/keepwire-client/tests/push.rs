//! Push wake-ups from the client's side, against a relay with a push
//! configuration and mock push services on 127.0.0.1 (FCM: token and send
//! endpoints; a Web Push endpoint): the client registers, goes away, is
//! woken once for a burst, `on_push` stores everything and returns one
//! coalesced notification, the socket shows nothing more; mutes go through
//! the relay (no push) and reach the user's other devices; a Web Push body
//! encrypted by the relay is opened with keys the client made.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use keepwire_client::notify::{CallbackNotifier, Notification, NotifierCall};
use keepwire_client::{
    AppState, BackgroundPolicy, Client, ClientError, PushRegistration, SyncOutcome,
};
use keepwire_proto::ConvKind;
use keepwire_server::Config;
use keepwire_server::push::PushSettings;
use keepwire_testkit::relay::{TestRelay, create_conv, test_config};
use keepwire_testkit::{TempDir, WsClient, wait_until};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);

/// What the mock services received: FCM data messages by token, Web Push
/// bodies by path.
#[derive(Default)]
struct Received {
    fcm: Mutex<Vec<(String, Value)>>,
    webpush: Mutex<Vec<(String, Vec<u8>)>>,
}

struct Mock {
    url: String,
    got: Arc<Received>,
    _task: tokio::task::JoinHandle<()>,
}

impl Mock {
    async fn start() -> Mock {
        let got = Arc::new(Received::default());
        let app = axum::Router::new()
            .route("/token", post(token))
            .route("/v1/projects/{project}/{send}", post(fcm_send))
            .route("/wp/{id}", post(webpush).get(|| async { StatusCode::OK }))
            .with_state(got.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Mock {
            url,
            got,
            _task: task,
        }
    }

    /// Every FCM push received, to any token.
    fn fcm_count(&self) -> usize {
        self.got.fcm.lock().unwrap().len()
    }

    fn fcm_to(&self, token: &str) -> Vec<Value> {
        let all = self.got.fcm.lock().unwrap();
        all.iter()
            .filter(|(t, _)| t == token)
            .map(|(_, d)| d.clone())
            .collect()
    }

    fn webpush_to(&self, path: &str) -> Vec<Vec<u8>> {
        let all = self.got.webpush.lock().unwrap();
        all.iter()
            .filter(|(p, _)| p == path)
            .map(|(_, b)| b.clone())
            .collect()
    }

    /// The push configuration file: FCM and Web Push, both at this mock.
    fn config(&self, dir: &TempDir) -> Config {
        self.config_with(dir, false)
    }

    /// The same, with previews allowed (`previews = true`) or not.
    fn config_with(&self, dir: &TempDir, previews: bool) -> Config {
        let key = include_str!("../../keepwire-push/tests/fixtures/fcm-test-key.pem");
        let sa = json!({
            "type": "service_account", "project_id": "kw-test", "private_key_id": "k1",
            "private_key": key, "client_email": "relay@kw-test.iam.gserviceaccount.com",
            "token_uri": format!("{}/token", self.url),
        });
        std::fs::write(dir.join("sa.json"), sa.to_string()).unwrap();
        let toml = format!(
            "previews = {previews}\n[fcm]\nservice_account = \"sa.json\"\nendpoint = \"{}\"\n\
             [webpush]\nsubject = \"mailto:ops@example.com\"\nallow_private = [\"127.0.0.1/32\"]\n\
             [limits]\ndevice_burst = 100\ndevice_interval = \"10ms\"\nbackoff_base = \"50ms\"\n",
            self.url
        );
        let path = dir.join("push.toml");
        std::fs::write(&path, toml).unwrap();
        let mut c = test_config();
        c.push_config = Some(path);
        c.push_settings = PushSettings {
            frozen_after: Duration::from_millis(500),
            rearm: Duration::from_secs(60),
            rearm_max: Duration::from_secs(240),
            failpoint: None,
        };
        c
    }
}

async fn token() -> axum::Json<Value> {
    axum::Json(json!({"access_token": "mock-access", "expires_in": 3600, "token_type": "Bearer"}))
}

async fn fcm_send(
    State(got): State<Arc<Received>>,
    axum::Json(body): axum::Json<Value>,
) -> axum::Json<Value> {
    let m = &body["message"];
    let token = m["token"].as_str().unwrap_or_default().to_owned();
    got.fcm.lock().unwrap().push((token, m["data"].clone()));
    axum::Json(json!({"name": "projects/kw-test/messages/1"}))
}

async fn webpush(
    State(got): State<Arc<Received>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    body: Bytes,
) -> StatusCode {
    got.webpush.lock().unwrap().push((id, body.to_vec()));
    StatusCode::CREATED
}

type Shown = Arc<Mutex<Vec<Notification>>>;

fn recorder() -> (Arc<CallbackNotifier>, Shown) {
    let shown: Shown = Default::default();
    let s = shown.clone();
    let n = CallbackNotifier::new(move |call| {
        if let NotifierCall::Show(n) = call {
            s.lock().unwrap().push(n);
        }
    });
    (n, shown)
}

/// A client that keeps its connection in the background (a desktop, an
/// Android foreground service), recording what it shows.
async fn kept_in_background(home: &std::path::Path, url: &str, token: &str) -> (Client, Shown) {
    let (n, shown) = recorder();
    let c = Client::builder(home)
        .servers(vec![url.to_owned()])
        .token(token)
        .notifier(n)
        .background_policy(BackgroundPolicy::KeepAlive)
        .app_state(AppState::Background)
        .build()
        .await
        .unwrap();
    (c, shown)
}

async fn phone(home: &std::path::Path, url: &str, token: &str, state: AppState) -> Client {
    let (n, _) = recorder();
    Client::builder(home)
        .servers(vec![url.to_owned()])
        .token(token)
        .notifier(n)
        .background_policy(BackgroundPolicy::WakeOnly)
        .app_state(state)
        .build()
        .await
        .unwrap()
}

/// `n` messages from `a` to `conv`, each confirmed.
async fn burst(a: &mut WsClient, conv: u64, n: usize, prefix: &str) {
    for i in 0..n {
        let cid = a.send_message(conv, &format!("{prefix} {i}")).await;
        a.confirm(&cid).await;
    }
}

/// Proves the relay has decided every push for what was sent before, so a
/// count can be asserted without waiting out a fixed time: Carol's phone
/// (offline, registered) is the marker. Alice sends to Carol, Carol's push
/// arrives (the relay decides pushes in commit order, so everything sent
/// earlier is decided too), then every push the relay queued has reached the
/// mock (`keepwire_push_enqueued_total`). Carol syncs after each round, which
/// clears her outstanding push so the next marker pushes again.
struct Marker {
    conv: u64,
    home: TempDir,
    token: String,
    rounds: usize,
}

impl Marker {
    async fn start(relay: &TestRelay, a: &mut WsClient) -> Marker {
        let token = relay.user("carol").await;
        let conv = create_conv(a, ConvKind::Direct, &["carol"]).await.id;
        let home = TempDir::new("carol-marker");
        let c = phone(home.path(), &relay.url, &token, AppState::Foreground).await;
        c.wait_connected(T).await.unwrap();
        c.set_push_registration(PushRegistration::Fcm {
            token: "carol-marker".into(),
        })
        .await
        .unwrap();
        c.stop().await;
        Marker {
            conv,
            home,
            token,
            rounds: 0,
        }
    }

    async fn settle(&mut self, relay: &TestRelay, mock: &Mock, a: &mut WsClient) {
        self.rounds += 1;
        burst(a, self.conv, 1, "marker").await;
        let n = self.rounds;
        wait_until(T, "the marker's push", || async {
            mock.fcm_to("carol-marker").len() == n
        })
        .await;
        wait_until(T, "every queued push at the mock", || async {
            relay_metric(relay, "keepwire_push_enqueued_total").await == mock.fcm_count()
        })
        .await;
        let c = phone(
            self.home.path(),
            &relay.url,
            &self.token,
            AppState::Background,
        )
        .await;
        assert_eq!(c.sync_once(T).await.outcome, SyncOutcome::CaughtUp);
        c.stop().await;
    }
}

/// A relay's Prometheus counter (summed over labels), read over HTTP.
async fn relay_metric(relay: &TestRelay, name: &str) -> usize {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(&relay.host_port)
        .await
        .unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    keepwire_testkit::metric(&text, name) as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_device_is_woken_once_and_on_push_shows_one_notification_once() {
    let mock = Mock::start().await;
    let dir = TempDir::new("push-client");
    let relay = TestRelay::start_with(mock.config(&dir), Default::default()).await;
    let (ta, tb) = (relay.user("alice").await, relay.user("bob").await);
    let mut a = relay.connect(&ta, "a-phone").await;
    let conv = create_conv(&mut a, ConvKind::Direct, &["bob"]).await;
    let mut marker = Marker::start(&relay, &mut a).await;

    // Bob's phone registers its FCM token while in the foreground.
    let hb = TempDir::new("bob-phone");
    let b = phone(hb.path(), &relay.url, &tb, AppState::Foreground).await;
    b.wait_connected(T).await.unwrap();
    let status = b
        .set_push_registration(PushRegistration::Fcm {
            token: "bob-fcm-1".into(),
        })
        .await
        .unwrap();
    let id = status.id.clone().expect("the relay's registration id");
    assert_eq!(
        (status.provider.as_deref(), status.pending),
        (Some("fcm"), false)
    );
    assert!(status.registered_at.is_some());
    // Kept in the store (another process, a restart, see it).
    let stored = keepwire_client::store::Store::open(hb.path())
        .unwrap()
        .push_status()
        .unwrap();
    assert_eq!(stored, status);
    // A relay refusal comes back to the caller: an APNs topic it does not
    // offer (no [apns] section here); the relay keeps the FCM one.
    let refused = b
        .set_push_registration(PushRegistration::Apns {
            token: "ab".repeat(32),
            topic: "com.example.chat".into(),
            sandbox: false,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, ClientError::Refused { message, .. } if message.contains("apns")),
        "{refused}"
    );
    let status = b
        .set_push_registration(PushRegistration::Fcm {
            token: "bob-fcm-1".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        status.id.as_deref(),
        Some(id.as_str()),
        "refreshed: same id"
    );
    // Malformed registrations never leave the device.
    let bad = b
        .set_push_registration(PushRegistration::Fcm {
            token: "bad token!".into(),
        })
        .await
        .unwrap_err();
    assert!(matches!(bad, ClientError::BadPushRegistration(_)), "{bad}");
    assert_eq!(b.push_status().unwrap().id.as_deref(), Some(id.as_str()));

    // Bob puts the app away: the connection closes (wake-only).
    b.apply_app_state(AppState::Background).await;
    burst(&mut a, conv.id, 50, "burst").await;
    wait_until(T, "one push to bob", || async {
        !mock.fcm_to("bob-fcm-1").is_empty()
    })
    .await;
    marker.settle(&relay, &mock, &mut a).await;
    assert_eq!(mock.fcm_to("bob-fcm-1").len(), 1, "unexpected push");
    let data = mock.fcm_to("bob-fcm-1").remove(0);
    assert_eq!(data, json!({"kw": id}), "nothing but the registration id");

    // The OS hands the push's data to the app.
    let result = b.on_push(data.to_string().as_bytes(), T).await.unwrap();
    assert_eq!(result.report.outcome, SyncOutcome::CaughtUp);
    assert_eq!(result.report.received, 50);
    assert_eq!(result.registration_id.as_deref(), Some(id.as_str()));
    assert_eq!(
        result.show.len(),
        1,
        "one coalesced notification: {result:?}"
    );
    assert_eq!((result.show[0].conv, result.show[0].unread), (conv.id, 50));
    assert_eq!(b.messages(Some(conv.id), 100).unwrap().len(), 50);
    b.stop().await;
    drop(b);

    // The same messages arrive later over the socket (stored again after a
    // reset of the messages and the cursor): nothing more is shown.
    {
        let db =
            rusqlite::Connection::open(keepwire_client::Home::new(hb.path()).database()).unwrap();
        db.execute_batch("DELETE FROM messages; UPDATE meta SET value = '0' WHERE key = 'cursor';")
            .unwrap();
    }
    let (b, shown) = kept_in_background(hb.path(), &relay.url, &tb).await;
    let s = b
        .wait_for(T, |s| s.caught_up() && s.received >= 50)
        .await
        .unwrap();
    assert_eq!(s.received, 50, "replayed over the socket");
    assert!(shown.lock().unwrap().is_empty(), "never shown twice");

    // Bob mutes the conversation: through the relay, for all his devices.
    assert!(b.set_muted(conv.id, true).await.unwrap(), "accepted");
    assert!(b.prefs().unwrap().muted.contains(&conv.id));
    b.stop().await;
    drop(b);
    burst(&mut a, conv.id, 3, "muted").await;
    marker.settle(&relay, &mock, &mut a).await;
    assert_eq!(mock.fcm_to("bob-fcm-1").len(), 1, "unexpected push");
    // Bob's laptop learns of the mute from its inbox.
    let hl = TempDir::new("bob-laptop");
    let laptop = phone(hl.path(), &relay.url, &tb, AppState::Background).await;
    assert_eq!(laptop.sync_once(T).await.outcome, SyncOutcome::CaughtUp);
    assert!(laptop.prefs().unwrap().muted.contains(&conv.id));
    // The laptop unmutes through its preferences: the relay pushes again.
    let mut p = laptop.prefs().unwrap();
    p.muted.remove(&conv.id);
    laptop.set_prefs(&p).unwrap();
    assert_eq!(laptop.sync_once(T).await.outcome, SyncOutcome::CaughtUp);
    laptop.stop().await;
    burst(&mut a, conv.id, 1, "unmuted").await;
    wait_until(T, "a push again after the unmute", || async {
        mock.fcm_to("bob-fcm-1").len() == 2
    })
    .await;

    // Removing the registration: no more pushes, the status says so.
    let b = phone(hb.path(), &relay.url, &tb, AppState::Foreground).await;
    b.wait_connected(T).await.unwrap();
    let gone = b.clear_push_registration().await.unwrap();
    assert_eq!((gone.provider, gone.id, gone.pending), (None, None, false));
    b.stop().await;
    burst(&mut a, conv.id, 1, "after removal").await;
    marker.settle(&relay, &mock, &mut a).await;
    assert_eq!(mock.fcm_to("bob-fcm-1").len(), 2, "unexpected push");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_made_offline_goes_out_at_the_next_connection_and_web_push_opens_with_own_keys()
 {
    let mock = Mock::start().await;
    let dir = TempDir::new("push-webpush");
    let relay = TestRelay::start_with(mock.config(&dir), Default::default()).await;
    let (ta, tb) = (relay.user("alice").await, relay.user("bob").await);
    let mut a = relay.connect(&ta, "a-phone").await;
    let conv = create_conv(&mut a, ConvKind::Direct, &["bob"]).await;

    // Registered while parked (no connection): saved, pending.
    let hb = TempDir::new("bob-browser");
    let b = phone(hb.path(), &relay.url, &tb, AppState::Background).await;
    let endpoint = format!("{}/wp/bob", mock.url);
    let status = b
        .set_push_registration(PushRegistration::WebPush {
            endpoint,
            keys: None,
        })
        .await
        .unwrap();
    assert!(
        status.pending && status.own_keys && status.id.is_none(),
        "{status:?}"
    );
    // The next bounded sync sends it.
    assert_eq!(b.sync_once(T).await.outcome, SyncOutcome::CaughtUp);
    let id = b.push_status().unwrap().id.expect("registered by the sync");
    assert!(!b.push_status().unwrap().pending);
    b.stop().await;
    drop(b);

    // The relay's push is encrypted to the keys the client made (RFC 8291);
    // the client, restarted, still opens it.
    burst(&mut a, conv.id, 5, "web").await;
    wait_until(T, "a Web Push to bob", || async {
        !mock.webpush_to("bob").is_empty()
    })
    .await;
    let body = mock.webpush_to("bob").remove(0);
    assert!(
        !String::from_utf8_lossy(&body).contains(&id),
        "encrypted on the wire"
    );
    let b = phone(hb.path(), &relay.url, &tb, AppState::Background).await;
    let result = b.on_push(&body, T).await.unwrap();
    assert_eq!(result.registration_id.as_deref(), Some(id.as_str()));
    assert_eq!(result.report.received, 5);
    assert_eq!(result.show.len(), 1);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preview_shows_the_message_when_the_sync_cannot_and_never_twice() {
    let mock = Mock::start().await;
    let dir = TempDir::new("push-preview");
    let relay = TestRelay::start_with(mock.config_with(&dir, true), Default::default()).await;
    let (ta, tb) = (relay.user("alice").await, relay.user("bob").await);
    let mut a = relay.connect(&ta, "a-phone").await;
    let conv = create_conv(&mut a, ConvKind::Direct, &["bob"]).await;
    let hb = TempDir::new("bob-phone");
    let b = phone(hb.path(), &relay.url, &tb, AppState::Foreground).await;
    b.wait_connected(T).await.unwrap();
    b.set_push_registration(PushRegistration::Fcm {
        token: "bob-preview".into(),
    })
    .await
    .unwrap();
    b.stop().await;
    drop(b);

    // The push carries the message sealed to bob's keys: the provider sees
    // ciphertext only.
    burst(&mut a, conv.id, 1, "the plan is at noon").await;
    wait_until(T, "a push to bob", || async {
        !mock.fcm_to("bob-preview").is_empty()
    })
    .await;
    let data = mock.fcm_to("bob-preview").remove(0);
    assert!(data["kw_preview"].is_string(), "{data}");
    assert!(!data.to_string().contains("plan"), "no plaintext: {data}");

    // The relay cannot be reached for this wake-up (a black hole): the
    // notification comes from the preview.
    let hole_url = format!("ws://{}", keepwire_testkit::black_hole().await);
    let b = phone(hb.path(), &hole_url, &tb, AppState::Background).await;
    let r = b
        .on_push(data.to_string().as_bytes(), Duration::from_secs(2))
        .await
        .unwrap();
    assert_ne!(r.report.outcome, SyncOutcome::CaughtUp, "{r:?}");
    assert_eq!(r.show.len(), 1, "{r:?}");
    assert_eq!(r.show[0].body, "the plan is at noon 0");
    assert_eq!(r.show[0].conv, conv.id);
    // The same push again (a duplicate wake-up): nothing more to show.
    let again = b
        .on_push(data.to_string().as_bytes(), Duration::from_secs(2))
        .await
        .unwrap();
    assert!(again.show.is_empty(), "{again:?}");
    b.stop().await;
    drop(b);

    // The message arrives over the socket later: stored, never shown again.
    let (b, shown) = kept_in_background(hb.path(), &relay.url, &tb).await;
    b.wait_for(T, |s| s.caught_up() && s.received >= 1)
        .await
        .unwrap();
    assert_eq!(b.messages(Some(conv.id), 10).unwrap().len(), 1);
    assert!(shown.lock().unwrap().is_empty(), "never shown twice");

    // Previews off: the registration goes to the relay again without them,
    // and the next push carries no preview.
    let mut p = b.prefs().unwrap();
    p.previews = false;
    b.set_prefs(&p).unwrap();
    wait_until(T, "the registration re-sent", || async {
        !b.push_status().unwrap().pending
    })
    .await;
    b.stop().await;
    drop(b);
    burst(&mut a, conv.id, 1, "no preview").await;
    wait_until(T, "a second push", || async {
        mock.fcm_to("bob-preview").len() == 2
    })
    .await;
    let data = mock.fcm_to("bob-preview").remove(1);
    assert!(data.get("kw_preview").is_none(), "{data}");
}
