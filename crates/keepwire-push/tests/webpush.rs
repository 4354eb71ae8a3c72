//! Web Push against the mock push service.

use std::sync::Arc;
use std::time::Duration;

use keepwire_push::clock::SystemClock;
use keepwire_push::webpush::{EndpointProbe, ProbeError, WebPushClient};
use keepwire_push::{
    Attempt, CollapseKey, Endpoint, Message, PushConfig, ReceiverKeys, Registration,
    RegistrationError, RegistrationId, VapidKey,
};
use serde_json::json;

use crate::support::webpush::{SUBJECT, WebPushMock};
use crate::support::{Reply, TempDir};

fn id() -> RegistrationId {
    RegistrationId::new("reg_w1").unwrap()
}

fn config(allow: &str) -> PushConfig {
    let dir = TempDir::new("wp");
    let text =
        format!("previews = true\n[webpush]\nsubject = \"{SUBJECT}\"\nallow_private = [{allow}]\n");
    PushConfig::load(&dir.write("push.toml", text)).unwrap()
}

fn client(cfg: &PushConfig) -> WebPushClient {
    WebPushClient::new(
        cfg.webpush.as_ref().unwrap(),
        Arc::new(VapidKey::generate()),
        Arc::new(SystemClock),
        Duration::from_secs(5),
    )
    .unwrap()
}

fn reg(endpoint: &str, keys: &ReceiverKeys) -> Registration {
    Registration::web_push(
        endpoint,
        &keys.push_keys().p256dh_base64(),
        &keys.push_keys().auth_base64(),
    )
    .unwrap()
}

#[tokio::test]
async fn delivers_encrypted_bodies_with_vapid() {
    let mock = WebPushMock::start().await;
    let wp = client(&config("\"127.0.0.1\""));
    let (endpoint, keys) = mock.subscribe("dev1");
    let r = reg(&endpoint, &keys);
    assert!(matches!(
        wp.send(&r, &Message::wake(id())).await,
        Attempt::Delivered {
            preview_sent: false,
            ..
        }
    ));
    let clear = Message {
        collapse: Some(CollapseKey::new("kw-clear").unwrap()),
        ..Message::clear(id())
    };
    assert!(matches!(
        wp.send(&r, &clear).await,
        Attempt::Delivered { .. }
    ));
    let a = wp
        .send(&r, &Message::wake(id()).with_preview("bob: hi"))
        .await;
    assert!(
        matches!(
            a,
            Attempt::Delivered {
                preview_sent: true,
                ..
            }
        ),
        "{a:?}"
    );

    assert_eq!(mock.errors(), Vec::<String>::new());
    let p = mock.pushed();
    assert_eq!(p.len(), 3);
    assert!(p.iter().all(|p| p.name == "dev1"));
    assert_eq!(p[0].plaintext, json!({"kw": "reg_w1", "kind": "wake"}));
    assert_eq!(p[0].headers["urgency"], "high");
    assert_eq!(p[0].headers["ttl"], "86400");
    assert!(!p[0].headers.contains_key("topic"));
    assert_eq!(p[1].plaintext, json!({"kw": "reg_w1", "kind": "clear"}));
    assert_eq!(
        (
            p[1].headers["urgency"].as_str(),
            p[1].headers["ttl"].as_str()
        ),
        ("normal", "3600")
    );
    assert_eq!(p[1].headers["topic"], "kw-clear");
    assert_eq!(
        p[2].plaintext,
        json!({"kw": "reg_w1", "kind": "wake", "preview": "bob: hi"})
    );
    // Wake-ups without a preview all have the same size: nothing to learn from it.
    assert_eq!(
        p[0].body.len(),
        86 + r#"{"kind":"wake","kw":"reg_w1"}"#.len() + 17
    );
}

#[tokio::test]
async fn answers_decide_drop_retry_and_shrink() {
    let mock = WebPushMock::start().await;
    let wp = client(&config("\"127.0.0.1\""));
    let (endpoint, keys) = mock.subscribe("dev1");
    let r = reg(&endpoint, &keys);
    for (status, want) in [
        (404, "unregistered"),
        (410, "unregistered"),
        (429, "retry"),
        (503, "retry"),
        (400, "rejected"),
        (403, "config"),
    ] {
        mock.reply(Reply::new(status, "").header("retry-after", "7"));
        let got = match wp.send(&r, &Message::wake(id())).await {
            Attempt::Unregistered { .. } => "unregistered",
            Attempt::Retry { after, .. } => {
                assert_eq!(after, Some(Duration::from_secs(7)));
                "retry"
            }
            Attempt::Rejected { .. } => "rejected",
            Attempt::ConfigError { .. } => "config",
            other => panic!("{other:?}"),
        };
        assert_eq!(got, want, "{status}");
    }
    // An endpoint the service does not know: 404 → drop.
    let gone = format!("http://{}/push/unknown", mock.addr);
    assert!(matches!(
        wp.send(&reg(&gone, &keys), &Message::wake(id())).await,
        Attempt::Unregistered { .. }
    ));

    // 413 → sent again without the preview.
    let before = mock.pushed().len();
    mock.reply(Reply::new(413, ""));
    let a = wp
        .send(&r, &Message::wake(id()).with_preview("x".repeat(1000)))
        .await;
    assert!(
        matches!(
            a,
            Attempt::Delivered {
                preview_sent: false,
                ..
            }
        ),
        "{a:?}"
    );
    let p = mock.pushed();
    assert_eq!(p.len(), before + 2);
    assert!(p[before].plaintext.get("preview").is_some());
    assert!(p[before + 1].plaintext.get("preview").is_none());
    assert_eq!(mock.errors(), Vec::<String>::new());
}

#[tokio::test]
async fn private_addresses_are_refused_unless_allow_listed() {
    let mock = WebPushMock::start().await;
    let (endpoint, keys) = mock.subscribe("dev1");
    let port = mock.addr.port();
    let strict_cfg = config("");
    let strict = client(&strict_cfg);

    // Plain http to loopback, not allow-listed.
    let r = reg(&endpoint, &keys);
    assert!(matches!(
        strict_cfg.check_registration(&r),
        Err(RegistrationError::EndpointRefused(_))
    ));
    let a = strict.send(&r, &Message::wake(id())).await;
    assert!(matches!(a, Attempt::Rejected { .. }), "{a:?}");
    // https to a private IP literal.
    let r = reg(&format!("https://127.0.0.1:{port}/push/dev1"), &keys);
    assert!(matches!(
        strict_cfg.check_registration(&r),
        Err(RegistrationError::EndpointRefused(_))
    ));
    assert!(matches!(
        strict.send(&r, &Message::wake(id())).await,
        Attempt::Rejected { .. }
    ));
    let r = reg(
        &format!("https://[::ffff:10.0.0.1]:{port}/push/dev1"),
        &keys,
    );
    assert!(matches!(
        strict.send(&r, &Message::wake(id())).await,
        Attempt::Rejected { .. }
    ));
    // A name that resolves to a private address: refused on the address
    // actually connected to (the resolver hands reqwest no private address).
    let r = reg(&format!("https://localhost:{port}/push/dev1"), &keys);
    assert!(
        strict_cfg.check_registration(&r).is_ok(),
        "names are checked when connecting"
    );
    match strict.send(&r, &Message::wake(id())).await {
        Attempt::Rejected { reason } => assert!(reason.contains("private"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert!(
        mock.pushed().is_empty() && mock.errors().is_empty(),
        "nothing reached the service"
    );
    let probe = strict
        .probe_unifiedpush(&Endpoint::new(&endpoint).unwrap())
        .await;
    assert!(matches!(probe, Err(ProbeError::Refused(_))), "{probe:?}");
    assert_eq!(mock.gets(), 0);

    // Allow-listed: delivered.
    let open_cfg = config("\"127.0.0.0/8\"");
    let r = reg(&endpoint, &keys);
    assert!(open_cfg.check_registration(&r).is_ok());
    assert!(matches!(
        client(&open_cfg).send(&r, &Message::wake(id())).await,
        Attempt::Delivered { .. }
    ));
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let a = WebPushMock::start().await;
    let b = WebPushMock::start().await;
    let (endpoint, keys) = a.subscribe("dev1");
    let (elsewhere, _) = b.subscribe("dev1");
    a.reply(Reply::new(307, "").header("location", elsewhere));
    let wp = client(&config("\"127.0.0.1\""));
    let got = wp.send(&reg(&endpoint, &keys), &Message::wake(id())).await;
    assert!(matches!(got, Attempt::Rejected { .. }), "{got:?}");
    assert_eq!(a.pushed().len(), 1);
    assert!(b.pushed().is_empty(), "the redirect target got nothing");
}

#[tokio::test]
async fn unifiedpush_endpoints_are_probed_with_a_get() {
    let mock = WebPushMock::start().await;
    let (endpoint, _) = mock.subscribe("dev1");
    let wp = client(&config("\"127.0.0.1\""));
    let probe = wp
        .probe_unifiedpush(&Endpoint::new(&endpoint).unwrap())
        .await;
    assert_eq!(probe, Ok(EndpointProbe::UnifiedPush { version: 1 }));
    let unknown = Endpoint::new(&format!("http://{}/push/nobody", mock.addr)).unwrap();
    assert_eq!(
        wp.probe_unifiedpush(&unknown).await,
        Err(ProbeError::Gone(404))
    );
    let closed = Endpoint::new("http://127.0.0.1:1/push/x").unwrap();
    assert!(matches!(
        wp.probe_unifiedpush(&closed).await,
        Err(ProbeError::Unreachable(_))
    ));
}
