//! APNs against the mock gateways (HTTP/2 over TLS, test CA, virtual clock).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use keepwire_push::apns::ApnsClient;
use keepwire_push::clock::ManualClock;
use keepwire_push::{
    ApnsEnvironment, Attempt, CollapseKey, Message, PushConfig, Registration, RegistrationError,
    RegistrationId,
};
use rcgen::KeyPair;
use serde_json::json;

use crate::support::apns::{ApnsMock, KEY_ID, TEAM_ID, TOPIC};
use crate::support::{Reply, TempDir, TestPki, unix};

const DEVICE: &str = "5f0c2a8e91b34d7aa1c0e6f4b2d8930c7e1a4b6d9f2c3e5a7b8d0f1e2c4a6b8d";

/// Two gateways (production, sandbox) sharing a virtual clock, and a client.
struct Apns {
    production: ApnsMock,
    sandbox: ApnsMock,
    clock: Arc<ManualClock>,
    client: ApnsClient,
    key_pkcs8: Vec<u8>,
    pki: TestPki,
    cfg: PushConfig,
    _dir: TempDir,
}

async fn setup() -> Apns {
    let pki = TestPki::new();
    let key = KeyPair::generate().unwrap();
    let clock = Arc::new(ManualClock::new(SystemTime::now()));
    let production = ApnsMock::start(&pki, key.public_key_raw().to_vec(), clock.clone()).await;
    let sandbox = ApnsMock::start(&pki, key.public_key_raw().to_vec(), clock.clone()).await;
    let dir = TempDir::new("apns");
    let p8 = dir.write("AuthKey.p8", key.serialize_pem());
    let ca = dir.write("ca.pem", &pki.ca_pem);
    let toml = format!(
        "[apns]\nkey = {:?}\nkey_id = \"{KEY_ID}\"\nteam_id = \"{TEAM_ID}\"\ntopics = [\"{TOPIC}\", \"com.example.other\"]\nendpoint = {:?}\nsandbox_endpoint = {:?}\nca = {:?}\n",
        p8.display().to_string(),
        production.base(),
        sandbox.base(),
        ca.display().to_string(),
    );
    let cfg = PushConfig::load(&dir.write("push.toml", toml)).unwrap();
    let client = ApnsClient::new(
        cfg.apns.as_ref().unwrap(),
        clock.clone(),
        Duration::from_secs(5),
    )
    .unwrap();
    Apns {
        production,
        sandbox,
        clock,
        client,
        key_pkcs8: key.serialize_der(),
        pki,
        cfg,
        _dir: dir,
    }
}

fn id() -> RegistrationId {
    RegistrationId::new("reg_a1").unwrap()
}

fn reg(env: ApnsEnvironment) -> Registration {
    Registration::apns(DEVICE, env, TOPIC).unwrap()
}

#[tokio::test]
async fn sends_over_http2_with_every_header_and_the_payload_checked() {
    let t = setup().await;
    t.production.know(DEVICE);
    let a = t
        .client
        .send(&reg(ApnsEnvironment::Production), &Message::wake(id()))
        .await;
    assert!(
        matches!(
            a,
            Attempt::Delivered {
                corrected: None,
                ..
            }
        ),
        "{a:?}"
    );
    let clear = Message {
        collapse: Some(CollapseKey::new("kw-clear").unwrap()),
        ..Message::clear(id())
    };
    let a = t
        .client
        .send(&reg(ApnsEnvironment::Production), &clear)
        .await;
    assert!(matches!(a, Attempt::Delivered { .. }), "{a:?}");

    assert_eq!(t.production.errors(), Vec::<String>::new());
    let seen = t.production.seen();
    assert_eq!(seen.len(), 2);
    assert!(
        seen.iter()
            .all(|s| s.version == hyper::Version::HTTP_2 && s.device == DEVICE)
    );
    assert_eq!(
        (seen[0].push_type.as_str(), seen[0].priority.as_str()),
        ("alert", "10")
    );
    assert_eq!(
        seen[0].payload,
        json!({"aps": {"alert": {"loc-key": "KW_NEW_MESSAGE"}, "mutable-content": 1}, "kw": "reg_a1"})
    );
    assert_eq!(seen[0].collapse_id, None);
    assert_eq!(
        (seen[1].push_type.as_str(), seen[1].priority.as_str()),
        ("background", "5")
    );
    assert_eq!(
        seen[1].payload,
        json!({"aps": {"content-available": 1}, "kw": "reg_a1"})
    );
    assert_eq!(seen[1].collapse_id.as_deref(), Some("kw-clear"));
    assert!(t.sandbox.seen().is_empty());
}

#[tokio::test]
async fn one_provider_token_per_20_to_60_virtual_minutes() {
    let t = setup().await;
    t.production.know(DEVICE);
    // Four virtual hours, a push every virtual minute.
    for _ in 0..240 {
        let a = t
            .client
            .send(&reg(ApnsEnvironment::Production), &Message::wake(id()))
            .await;
        assert!(matches!(a, Attempt::Delivered { .. }), "{a:?}");
        t.clock.advance(Duration::from_secs(60));
    }
    assert_eq!(t.production.errors(), Vec::<String>::new());
    assert!(t.production.state.lock().refused_tokens.is_empty());
    let seen = t.production.seen();
    // First and last use of each token, in order of issue.
    let mut spans: BTreeMap<u64, (u64, u64, String)> = BTreeMap::new();
    for s in &seen {
        let at = unix(s.at);
        let e = spans.entry(s.iat).or_insert((at, at, s.jwt.clone()));
        assert_eq!(e.2, s.jwt, "one token per iat");
        e.1 = at;
    }
    let iats: Vec<u64> = spans.keys().copied().collect();
    for w in iats.windows(2) {
        let gap = w[1] - w[0];
        assert!(
            (20 * 60..60 * 60).contains(&gap),
            "a new token after {} min",
            gap / 60
        );
    }
    for (iat, (first, last, _)) in &spans {
        assert!(
            first >= iat && last - iat < 60 * 60,
            "token of {iat} used until {last}"
        );
    }
    assert!(
        (4..=12).contains(&spans.len()),
        "{} tokens in 4 hours",
        spans.len()
    );
}

#[tokio::test]
async fn expired_provider_token_gets_a_new_token_and_one_retry() {
    let t = setup().await;
    t.production.know(DEVICE);
    t.production
        .reply(Reply::new(403, r#"{"reason":"ExpiredProviderToken"}"#));
    let a = t
        .client
        .send(&reg(ApnsEnvironment::Production), &Message::wake(id()))
        .await;
    assert!(matches!(a, Attempt::Delivered { .. }), "{a:?}");
    let seen = t.production.seen();
    assert_eq!(seen.len(), 2);
    assert_ne!(seen[0].jwt, seen[1].jwt, "a new provider token");

    // Twice in a row: no loop, a configuration error.
    t.production
        .reply(Reply::new(403, r#"{"reason":"ExpiredProviderToken"}"#));
    t.production
        .reply(Reply::new(403, r#"{"reason":"ExpiredProviderToken"}"#));
    let a = t
        .client
        .send(&reg(ApnsEnvironment::Production), &Message::wake(id()))
        .await;
    assert!(matches!(a, Attempt::ConfigError { .. }), "{a:?}");
    assert_eq!(t.production.seen().len(), 4);
}

#[tokio::test]
async fn gone_and_bad_device_tokens() {
    let t = setup().await;
    // 410 Unregistered → drop.
    t.production.unregister(DEVICE);
    let a = t
        .client
        .send(&reg(ApnsEnvironment::Production), &Message::wake(id()))
        .await;
    assert!(matches!(a, Attempt::Unregistered { .. }), "{a:?}");

    // BadDeviceToken in both environments → drop, after asking both.
    let other = "aa".repeat(32);
    let r = Registration::apns(&other, ApnsEnvironment::Sandbox, TOPIC).unwrap();
    let a = t.client.send(&r, &Message::wake(id())).await;
    assert!(matches!(a, Attempt::Unregistered { .. }), "{a:?}");
    assert_eq!(t.sandbox.seen().len(), 1);
    assert_eq!(t.production.seen().len(), 2);

    // BadDeviceToken in one, accepted by the other → delivered, corrected.
    t.production.know(&other);
    let a = t.client.send(&r, &Message::wake(id())).await;
    match a {
        Attempt::Delivered {
            corrected: Some(c), ..
        } => {
            assert_eq!(
                *c,
                Registration::apns(&other, ApnsEnvironment::Production, TOPIC).unwrap()
            );
        }
        other => panic!("{other:?}"),
    }

    // Configuration errors keep the registration.
    t.production.know(DEVICE);
    t.production.state.lock().unregistered.clear();
    for reason in [
        "DeviceTokenNotForTopic",
        "TopicDisallowed",
        "InvalidProviderToken",
    ] {
        t.production
            .reply(Reply::new(400, format!(r#"{{"reason":"{reason}"}}"#)));
        let a = t
            .client
            .send(&reg(ApnsEnvironment::Production), &Message::wake(id()))
            .await;
        assert!(matches!(a, Attempt::ConfigError { .. }), "{reason}: {a:?}");
    }
    // 429 and 503 → retry.
    t.production
        .reply(Reply::new(429, r#"{"reason":"TooManyRequests"}"#));
    assert!(matches!(
        t.client
            .send(&reg(ApnsEnvironment::Production), &Message::wake(id()))
            .await,
        Attempt::Retry { .. }
    ));
    // A topic this relay does not serve is refused at registration...
    let foreign = Registration::apns(DEVICE, ApnsEnvironment::Production, "com.evil.app").unwrap();
    assert_eq!(
        t.cfg.check_registration(&foreign),
        Err(RegistrationError::TopicNotAllowed)
    );
    assert_eq!(
        t.cfg.check_registration(&reg(ApnsEnvironment::Sandbox)),
        Ok(())
    );
    // ...and never sent.
    let before = t.production.seen().len();
    assert!(matches!(
        t.client.send(&foreign, &Message::wake(id())).await,
        Attempt::Rejected { .. }
    ));
    assert_eq!(t.production.seen().len(), before);
    assert_eq!(t.production.errors(), Vec::<String>::new());
    assert_eq!(t.sandbox.errors(), Vec::<String>::new());
}

/// A raw client trusting the test CA (HTTP/2 or HTTP/1.1 only).
fn raw_client(pki: &TestPki, http2: bool) -> reqwest::Client {
    let b = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap())
        .no_proxy();
    let b = if http2 {
        b.http2_prior_knowledge()
    } else {
        b.http1_only()
    };
    b.build().unwrap()
}

fn jwt(pkcs8: &[u8], alg: &'static ring::signature::EcdsaSigningAlgorithm, iat: u64) -> String {
    let rng = ring::rand::SystemRandom::new();
    let pair = ring::signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8, &rng).unwrap();
    let h = URL_SAFE_NO_PAD.encode(json!({"alg": "ES256", "kid": KEY_ID}).to_string());
    let c = URL_SAFE_NO_PAD.encode(json!({"iss": TEAM_ID, "iat": iat}).to_string());
    let input = format!("{h}.{c}");
    let sig = pair.sign(&rng, input.as_bytes()).unwrap();
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
}

#[tokio::test]
async fn the_mock_is_http2_only_and_refuses_der_signatures() {
    let t = setup().await;
    t.production.know(DEVICE);
    let url = format!("{}/3/device/{DEVICE}", t.production.base());
    let post =
        |client: &reqwest::Client, token: String| {
            client
            .post(&url)
            .header("authorization", format!("bearer {token}"))
            .header("apns-push-type", "alert")
            .header("apns-priority", "10")
            .header("apns-topic", TOPIC)
            .header("apns-expiration", (unix(SystemTime::now()) + 600).to_string())
            .body(r#"{"aps":{"alert":{"loc-key":"KW_NEW_MESSAGE"},"mutable-content":1},"kw":"x"}"#)
            .send()
        };
    let now = unix(SystemTime::now());
    let h2 = raw_client(&t.pki, true);
    // JOSE (raw r||s) is accepted...
    let ok = post(
        &h2,
        jwt(
            &t.key_pkcs8,
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            now,
        ),
    )
    .await
    .unwrap();
    assert_eq!(ok.status(), 200);
    // ...a DER-encoded signature of the same claims is not.
    let der = post(
        &h2,
        jwt(
            &t.key_pkcs8,
            &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            now,
        ),
    )
    .await
    .unwrap();
    assert_eq!(der.status(), 403);
    assert_eq!(
        der.json::<serde_json::Value>().await.unwrap()["reason"],
        "InvalidProviderToken"
    );
    // A client that does not offer h2 cannot even connect.
    let h1 = raw_client(&t.pki, false);
    assert!(
        post(
            &h1,
            jwt(
                &t.key_pkcs8,
                &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                now
            )
        )
        .await
        .is_err()
    );
    assert_eq!(t.production.seen().len(), 1);
}
