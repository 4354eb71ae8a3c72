//! FCM HTTP v1 against the mock.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use keepwire_push::clock::{ManualClock, SystemClock};
use keepwire_push::fcm::FcmClient;
use keepwire_push::{
    Attempt, Dispatcher, Message, Outcome, PushConfig, PushJob, ReceiverKeys, Registration,
    RegistrationId, ece,
};
use serde_json::json;

use crate::support::fcm::FcmMock;
use crate::support::{Reply, TempDir, report_for};

const TOKEN: &str = "eV3kx1Q9Rz8:APA91bF-test_token.1";

fn id(s: &str) -> RegistrationId {
    RegistrationId::new(s).unwrap()
}

fn load(text: &str) -> PushConfig {
    let dir = TempDir::new("cfg");
    PushConfig::load(&dir.write("push.toml", text)).expect("config loads")
}

fn client(mock: &FcmMock, clock: Arc<dyn keepwire_push::clock::Clock>) -> FcmClient {
    let cfg = load(&mock.toml());
    FcmClient::new(cfg.fcm.as_ref().unwrap(), clock, Duration::from_secs(5)).unwrap()
}

#[tokio::test]
async fn sends_a_data_message_with_a_verified_access_token() {
    let mock = FcmMock::start().await;
    let fcm = client(&mock, Arc::new(SystemClock));
    let reg = Registration::fcm(TOKEN).unwrap();

    let a = fcm.send(&reg, &Message::wake(id("reg_1"))).await;
    assert!(
        matches!(
            a,
            Attempt::Delivered {
                preview_sent: false,
                corrected: None,
                ..
            }
        ),
        "{a:?}"
    );
    let a = fcm.send(&reg, &Message::clear(id("reg_1"))).await;
    assert!(matches!(a, Attempt::Delivered { .. }), "{a:?}");

    assert_eq!(mock.errors(), Vec::<String>::new());
    let sends = mock.sends();
    assert_eq!(sends.len(), 2);
    assert_eq!(
        sends[0].message,
        json!({"token": TOKEN, "data": {"kw": "reg_1"}, "android": {"priority": "HIGH", "ttl": "86400s"}})
    );
    assert_eq!(
        sends[1].message["android"],
        json!({"priority": "NORMAL", "ttl": "3600s"})
    );
    // One assertion, one access token, reused.
    let inner = mock.state.lock();
    assert_eq!(inner.issued.len(), 1);
    assert_eq!(sends[1].bearer, inner.issued[0]);
    let claims = &inner.assertions[0];
    assert_eq!(claims["iss"], crate::support::fcm::CLIENT_EMAIL);
    assert!(claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap() <= 3600);
}

#[tokio::test]
async fn a_401_refreshes_the_access_token_once() {
    let mock = FcmMock::start().await;
    let fcm = client(&mock, Arc::new(SystemClock));
    let reg = Registration::fcm(TOKEN).unwrap();
    assert!(matches!(
        fcm.send(&reg, &Message::wake(id("r"))).await,
        Attempt::Delivered { .. }
    ));

    // The token was revoked: FCM answers 401, the client refreshes and resends.
    mock.state.revoke_tokens();
    assert!(matches!(
        fcm.send(&reg, &Message::wake(id("r"))).await,
        Attempt::Delivered { .. }
    ));
    assert_eq!(mock.state.lock().issued.len(), 2);

    // 401 again with the fresh token: one refresh only, then a configuration error.
    let unauth = r#"{"error":{"code":401,"status":"UNAUTHENTICATED"}}"#;
    mock.state.reply(Reply::new(401, unauth));
    mock.state.reply(Reply::new(401, unauth));
    let a = fcm.send(&reg, &Message::wake(id("r"))).await;
    assert!(matches!(a, Attempt::ConfigError { .. }), "{a:?}");
    assert_eq!(
        mock.state.lock().issued.len(),
        3,
        "exactly one refresh for the two 401s"
    );
    assert_eq!(mock.errors(), Vec::<String>::new());
}

#[tokio::test]
async fn the_access_token_is_cached_until_shortly_before_it_expires() {
    let mock = FcmMock::start().await;
    let clock = Arc::new(ManualClock::new(SystemTime::now()));
    let fcm = client(&mock, clock.clone());
    let reg = Registration::fcm(TOKEN).unwrap();
    for _ in 0..10 {
        assert!(matches!(
            fcm.send(&reg, &Message::wake(id("r"))).await,
            Attempt::Delivered { .. }
        ));
        clock.advance(Duration::from_secs(5 * 60)); // 0..45 virtual minutes
    }
    assert_eq!(mock.state.lock().issued.len(), 1);
    clock.advance(Duration::from_secs(10 * 60)); // 60 minutes: the token expires in under 5
    assert!(matches!(
        fcm.send(&reg, &Message::wake(id("r"))).await,
        Attempt::Delivered { .. }
    ));
    assert_eq!(mock.state.lock().issued.len(), 2);
}

#[tokio::test]
async fn error_codes_decide_whether_the_registration_is_dropped() {
    let mock = FcmMock::start().await;
    let fcm = client(&mock, Arc::new(SystemClock));
    let reg = Registration::fcm(TOKEN).unwrap();
    let fcm_error = |code: u16, status: &str, error_code: &str| {
        format!(
            r#"{{"error":{{"code":{code},"message":"m","status":"{status}","details":[{{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"{error_code}"}}]}}}}"#
        )
    };
    let cases = [
        (
            Reply::new(404, fcm_error(404, "NOT_FOUND", "UNREGISTERED")),
            "unregistered",
        ),
        (
            Reply::new(
                403,
                fcm_error(403, "PERMISSION_DENIED", "SENDER_ID_MISMATCH"),
            ),
            "unregistered",
        ),
        (
            Reply::new(
                400,
                r#"{"error":{"code":400,"status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.rpc.BadRequest","fieldViolations":[{"field":"message.token","description":"Invalid registration token"}]}]}}"#,
            ),
            "unregistered",
        ),
        (
            Reply::new(400, fcm_error(400, "INVALID_ARGUMENT", "INVALID_ARGUMENT")),
            "rejected",
        ),
        (
            Reply::new(429, fcm_error(429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED")),
            "retry",
        ),
        (
            Reply::new(503, fcm_error(503, "UNAVAILABLE", "UNAVAILABLE")),
            "retry",
        ),
        (
            Reply::new(
                401,
                fcm_error(401, "UNAUTHENTICATED", "THIRD_PARTY_AUTH_ERROR"),
            ),
            "config",
        ),
    ];
    for (reply, want) in cases {
        let body = reply.body.clone();
        mock.state.reply(reply);
        let a = fcm.send(&reg, &Message::wake(id("r"))).await;
        let got = match a {
            Attempt::Unregistered { .. } => "unregistered",
            Attempt::Rejected { .. } => "rejected",
            Attempt::Retry { .. } => "retry",
            Attempt::ConfigError { .. } => "config",
            _ => "other",
        };
        assert_eq!(got, want, "{body}");
    }
}

#[tokio::test]
async fn unregistered_and_retry_after_through_the_dispatcher() {
    let mock = FcmMock::start().await;
    let cfg = load(&format!(
        "{}[limits]\nbackoff_base = \"10ms\"\n",
        mock.toml()
    ));
    let (push, mut reports) = Dispatcher::builder(cfg).start(None).unwrap();
    let reg = Registration::fcm(TOKEN).unwrap();

    // 429 with Retry-After: 1 → the retry waits at least a second, then succeeds.
    mock.state
        .reply(Reply::new(429, "{}").header("retry-after", "1"));
    push.enqueue(PushJob {
        id: 1,
        registration: reg.clone(),
        message: Message::wake(id("r")),
    })
    .unwrap();
    let (r, _) = report_for(&mut reports, 1, Duration::from_secs(10)).await;
    assert!(
        matches!(r.outcome, Outcome::Delivered { attempts: 2, .. }),
        "{r:?}"
    );
    let sends = mock.sends();
    let gap = sends[1].at - sends[0].at;
    assert!(
        gap >= Duration::from_millis(1000),
        "retried after {gap:?}, before Retry-After"
    );
    assert!(gap < Duration::from_secs(5), "retried after {gap:?}");

    // UNREGISTERED → the relay is told to drop the registration.
    mock.state.reply(Reply::new(
        404,
        r#"{"error":{"code":404,"status":"NOT_FOUND","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"UNREGISTERED"}]}}"#,
    ));
    push.enqueue(PushJob {
        id: 2,
        registration: reg.clone(),
        message: Message::wake(id("r")),
    })
    .unwrap();
    let (r, _) = report_for(&mut reports, 2, Duration::from_secs(10)).await;
    assert!(matches!(r.outcome, Outcome::Unregistered { .. }), "{r:?}");
    assert_eq!(r.registration, reg.key());
    assert_eq!(
        push.metrics()
            .dropped
            .get_or_create(&keepwire_push::metrics::ProviderLabel { provider: "fcm" })
            .get(),
        1
    );
    push.shutdown(Duration::ZERO).await;
    assert_eq!(mock.errors(), Vec::<String>::new());
}

#[tokio::test]
async fn previews_travel_encrypted_and_only_when_allowed() {
    let mock = FcmMock::start().await;
    let device = ReceiverKeys::generate();
    let reg = Registration::fcm(TOKEN)
        .unwrap()
        .with_keys(device.push_keys().clone());
    let msg = Message::wake(id("r")).with_preview(r#"{"from":"alice","text":"lunch?"}"#);

    // The operator does not allow previews: none is sent.
    let (push, mut reports) = Dispatcher::builder(load(&mock.toml())).start(None).unwrap();
    push.enqueue(PushJob {
        id: 1,
        registration: reg.clone(),
        message: msg.clone(),
    })
    .unwrap();
    let (r, _) = report_for(&mut reports, 1, Duration::from_secs(10)).await;
    assert!(
        matches!(
            r.outcome,
            Outcome::Delivered {
                preview_sent: false,
                ..
            }
        ),
        "{r:?}"
    );
    assert_eq!(mock.sends()[0].message["data"], json!({"kw": "r"}));
    push.shutdown(Duration::ZERO).await;

    // Allowed: it goes as kw_preview, aes128gcm-encrypted to the device.
    let (push, mut reports) =
        Dispatcher::builder(load(&format!("previews = true\n{}", mock.toml())))
            .start(None)
            .unwrap();
    push.enqueue(PushJob {
        id: 2,
        registration: reg,
        message: msg,
    })
    .unwrap();
    let (r, _) = report_for(&mut reports, 2, Duration::from_secs(10)).await;
    assert!(
        matches!(
            r.outcome,
            Outcome::Delivered {
                preview_sent: true,
                ..
            }
        ),
        "{r:?}"
    );
    let data = mock.sends()[1].message["data"].clone();
    let sealed = data["kw_preview"].as_str().unwrap();
    assert!(!sealed.contains("lunch"));
    let body =
        base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, sealed).unwrap();
    assert_eq!(
        ece::decrypt(&body, &device).unwrap(),
        br#"{"from":"alice","text":"lunch?"}"#
    );
    push.shutdown(Duration::ZERO).await;
    assert_eq!(mock.errors(), Vec::<String>::new());
}
