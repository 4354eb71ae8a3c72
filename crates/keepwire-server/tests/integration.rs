//! App-backend integration: app-issued JWTs (HS256, and ES256 from a JWKS
//! server with key rotation), the HTTP API, device and token revocation.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use keepwire_proto::{CloseCode, EntryItem};
use keepwire_server::AdminStore as _;
use keepwire_server::auth::{JwksSource, JwtConfig};
use keepwire_testkit::WsClient;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use serde_json::{Value, json};

use crate::support::{TestRelay, test_config};

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-shared";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// An ES256 signing key and its public JWK.
struct EcKey {
    kid: String,
    encoding: EncodingKey,
    jwk: Value,
}

impl EcKey {
    fn new(kid: &str) -> EcKey {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let public = pair.public_key().as_ref();
        assert_eq!(public.len(), 65, "uncompressed P-256 point");
        let jwk = json!({"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
                         "x": b64(&public[1..33]), "y": b64(&public[33..65])});
        EcKey {
            kid: kid.into(),
            encoding: EncodingKey::from_ec_der(pkcs8.as_ref()),
            jwk,
        }
    }

    fn sign(&self, claims: &Value) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(self.kid.clone());
        encode(&h, claims, &self.encoding).unwrap()
    }
}

fn hs256(claims: &Value, secret: &[u8]) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

/// A JWKS endpoint on 127.0.0.1 whose key set the test can rotate.
struct JwksServer {
    url: String,
    keys: Arc<Mutex<Vec<Value>>>,
    fetches: Arc<AtomicUsize>,
}

async fn jwks_server(keys: Vec<Value>) -> JwksServer {
    let keys = Arc::new(Mutex::new(keys));
    let fetches = Arc::new(AtomicUsize::new(0));
    let (k, f) = (keys.clone(), fetches.clone());
    let app = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            let (k, f) = (k.clone(), f.clone());
            async move {
                f.fetch_add(1, Ordering::SeqCst);
                axum::Json(json!({"keys": k.lock().unwrap().clone()}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    JwksServer { url, keys, fetches }
}

fn jwt_config(jwks: Option<JwksSource>) -> JwtConfig {
    JwtConfig {
        hs256_secret: Some(SECRET.to_vec()),
        jwks,
        audience: Some("chat-app".into()),
        issuer: Some("https://auth.example".into()),
        leeway: Duration::ZERO,
        jwks_refresh_floor: Duration::from_millis(500),
        ..Default::default()
    }
}

fn claims(sub: &str, exp_in: i64) -> Value {
    json!({"sub": sub, "exp": now() + exp_in, "iat": now(), "aud": "chat-app", "iss": "https://auth.example"})
}

async fn close_code(url: &str, token: &str, device: &str) -> Option<u16> {
    match WsClient::connect(url, token, device, None).await {
        Ok(c) => {
            c.close().await;
            None
        }
        Err(code) => code,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_issued_tokens_with_jwks_rotation() {
    let k1 = EcKey::new("k1");
    let k2 = EcKey::new("k2");
    let jwks = jwks_server(vec![k1.jwk.clone()]).await;
    let mut config = test_config();
    config.jwt = Some(jwt_config(Some(JwksSource::Url(jwks.url.clone()))));
    let relay = TestRelay::start_with(config, Default::default()).await;

    // A user named in a valid token exists without any sign-up.
    let c = WsClient::connect(&relay.url, &k1.sign(&claims("zoe", 60)), "zoe-phone", None)
        .await
        .unwrap();
    assert_eq!(c.welcome().user, "zoe");
    c.close().await;
    let fetches = jwks.fetches.load(Ordering::SeqCst);
    assert_eq!(fetches, 1);

    // Rotation: the JWKS now has k2. A token with the new kid refreshes it once.
    *jwks.keys.lock().unwrap() = vec![k2.jwk.clone()];
    tokio::time::sleep(Duration::from_millis(600)).await; // past the refresh floor
    assert_eq!(
        close_code(&relay.url, &k2.sign(&claims("zoe", 60)), "zoe-phone").await,
        None
    );
    assert_eq!(
        jwks.fetches.load(Ordering::SeqCst),
        fetches + 1,
        "one refresh for the unknown kid"
    );
    // The old key is gone from the set: its tokens fail now (after the cache ages out, they
    // would too); a flood of unknown kids does not hammer the JWKS URL.
    for i in 0..20 {
        let k = EcKey::new(&format!("bogus-{i}"));
        assert_eq!(
            close_code(&relay.url, &k.sign(&claims("zoe", 60)), "d").await,
            Some(CloseCode::AuthFailed.code())
        );
    }
    assert!(
        jwks.fetches.load(Ordering::SeqCst) <= fetches + 2,
        "refresh floor holds under a flood"
    );

    // Forged: k2's kid, signed by another key.
    let forger = EcKey {
        kid: "k2".into(),
        ..EcKey::new("x")
    };
    assert_eq!(
        close_code(&relay.url, &forger.sign(&claims("zoe", 60)), "d").await,
        Some(CloseCode::AuthFailed.code())
    );
    // Expired.
    assert_eq!(
        close_code(&relay.url, &k2.sign(&claims("zoe", -10)), "d").await,
        Some(CloseCode::TokenExpired.code())
    );
    // Wrong audience, wrong issuer, not yet valid, issued in the future.
    let mut wrong_aud = claims("zoe", 60);
    wrong_aud["aud"] = json!("other-app");
    assert_eq!(
        close_code(&relay.url, &k2.sign(&wrong_aud), "d").await,
        Some(CloseCode::AuthFailed.code())
    );
    let mut wrong_iss = claims("zoe", 60);
    wrong_iss["iss"] = json!("https://evil.example");
    assert_eq!(
        close_code(&relay.url, &k2.sign(&wrong_iss), "d").await,
        Some(CloseCode::AuthFailed.code())
    );
    let mut early = claims("zoe", 600);
    early["nbf"] = json!(now() + 300);
    assert_eq!(
        close_code(&relay.url, &k2.sign(&early), "d").await,
        Some(CloseCode::AuthFailed.code())
    );
    // HS256 with the shared secret works; with another secret it does not.
    assert_eq!(
        close_code(&relay.url, &hs256(&claims("yan", 60), SECRET), "d").await,
        None
    );
    assert_eq!(
        close_code(
            &relay.url,
            &hs256(&claims("yan", 60), b"another secret of enough length!!"),
            "d"
        )
        .await,
        Some(CloseCode::AuthFailed.code())
    );
    // A device claim must match the hello's device.
    let mut bound = claims("yan", 60);
    bound["device"] = json!("yan-phone");
    assert_eq!(
        close_code(&relay.url, &hs256(&bound, SECRET), "yan-phone").await,
        None
    );
    assert_eq!(
        close_code(&relay.url, &hs256(&bound, SECRET), "other").await,
        Some(CloseCode::AuthFailed.code())
    );
    // keepwire's own tokens keep working alongside.
    let own = relay.user("alice").await;
    assert_eq!(close_code(&relay.url, &own, "d").await, None);
}

async fn api_key(relay: &TestRelay) -> String {
    relay.store.create_api_key("backend").await.unwrap().1
}

fn http() -> reqwest::Client {
    reqwest::Client::new()
}

/// `POST url` with the API key and no body.
async fn post(key: &str, url: String) -> reqwest::Response {
    http().post(url).bearer_auth(key).send().await.unwrap()
}

/// `GET url` with the API key, as JSON.
async fn get_json(key: &str, url: String) -> Value {
    http()
        .get(url)
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_publish_reaches_connected_devices_at_once_and_offline_ones_later_once() {
    let relay = TestRelay::start().await;
    let key = api_key(&relay).await;
    let base = format!("http://{}", relay.host_port);
    let ta = relay.user("alice").await;
    let tb = relay.user("bob").await;
    let api = http();

    // Without a key: 401 problem+json.
    let r = api
        .post(format!("{base}/v1/conversations"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["content-type"], "application/problem+json");

    // The backend creates a group as the system, idempotently.
    let body =
        json!({"kind": "group", "members": ["alice", "bob"], "name": "team", "key": "team-1"});
    let r = api
        .post(format!("{base}/v1/conversations"))
        .bearer_auth(&key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let conv: Value = r.json().await.unwrap();
    let r = api
        .post(format!("{base}/v1/conversations"))
        .bearer_auth(&key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "a retried create returns the same conversation"
    );
    assert_eq!(r.json::<Value>().await.unwrap()["id"], conv["id"]);
    let conv_id = conv["id"].as_u64().unwrap();

    // Alice is connected; bob is not.
    let mut a = relay.connect(&ta, "alice-phone").await;
    a.entry().await; // membership
    let publish = |k: &str, from: Option<&str>, text: &str| {
        let mut b = json!({"body": text, "idempotency_key": k});
        if let Some(f) = from {
            b["from"] = json!(f);
        }
        api.post(format!("{base}/v1/conversations/{conv_id}/messages"))
            .bearer_auth(&key)
            .json(&b)
            .send()
    };
    let r = publish("welcome-1", None, "welcome to the team")
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let first: Value = r.json().await.unwrap();
    let r = publish("hello-1", Some("bob"), "hi from bob's backend")
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // Connected devices get it at once, in order.
    for want in ["welcome to the team", "hi from bob's backend"] {
        let e = a.entry().await;
        let EntryItem::Message(m) = e.item else {
            panic!("expected a message")
        };
        assert_eq!(m.body, want);
    }
    // A retried publish stores nothing new.
    let r = publish("welcome-1", None, "welcome to the team")
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let again: Value = r.json().await.unwrap();
    assert_eq!(
        (again["id"].clone(), again["duplicate"].clone()),
        (first["id"].clone(), json!(true))
    );
    let r = publish("welcome-1", None, "something else").await.unwrap();
    assert_eq!(r.status(), 409);
    // A non-member cannot be impersonated into the conversation.
    relay.user("carol").await;
    let r = publish("carol-1", Some("carol"), "let me in")
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // Bob's device comes online later: both messages, once.
    let mut b = relay.connect(&tb, "bob-phone").await;
    let entries = b.entries(3, true).await;
    let bodies = keepwire_testkit::bodies(&entries);
    assert_eq!(bodies, vec!["welcome to the team", "hi from bob's backend"]);
    b.barrier().await;
    assert!(b.take_queued_entries().is_empty());

    // History, devices, delivery positions, conversations of a user.
    let page: Value = get_json(
        &key,
        format!("{base}/v1/conversations/{conv_id}/messages?limit=10"),
    )
    .await;
    assert_eq!(page["messages"].as_array().unwrap().len(), 2);
    assert_eq!(page["messages"][0]["from"], "~system");
    let devices: Value = get_json(&key, format!("{base}/v1/users/bob/devices")).await;
    assert_eq!(devices["devices"][0]["device"], "bob-phone");
    keepwire_testkit::wait_until(Duration::from_secs(10), "bob's ack to be recorded", || {
        let (key, base) = (key.clone(), base.clone());
        async move {
            let p: Value = get_json(
                &key,
                format!("{base}/v1/users/bob/positions?conv={conv_id}"),
            )
            .await;
            p["devices"][0]["conv_delivered_seq"] == json!(2)
        }
    })
    .await;
    let convs: Value = get_json(&key, format!("{base}/v1/users/alice/conversations")).await;
    assert_eq!(convs["conversations"][0]["id"], conv["id"]);
    // Unknown things are 404 problems; bad bodies 400; wrong media type 415.
    let r = api
        .get(format!("{base}/v1/users/nobody/devices"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = api
        .post(format!("{base}/v1/conversations/999/messages"))
        .bearer_auth(&key)
        .json(&json!({"body": "x", "idempotency_key": "k"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = api
        .post(format!("{base}/v1/conversations"))
        .bearer_auth(&key)
        .body("{")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = api
        .post(format!("{base}/v1/conversations"))
        .bearer_auth(&key)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    // The OpenAPI document is served.
    let doc: Value = api
        .get(format!("{base}/v1/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["openapi"], "3.0.3");
    assert!(doc["paths"]["/v1/conversations/{conv}/messages"]["post"].is_object());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_device_closes_it_at_once_and_bars_it() {
    let relay = TestRelay::start().await;
    let key = api_key(&relay).await;
    let base = format!("http://{}", relay.host_port);
    let phone_token = relay.user("alice").await;
    // Each device logged in with its own token, as apps do.
    let ta = relay
        .store
        .issue_token("alice", Duration::from_secs(3600))
        .await
        .unwrap()
        .token;
    let mut phone = relay.connect(&phone_token, "alice-phone").await;
    let mut laptop = relay.connect(&ta, "alice-laptop").await;
    let started = std::time::Instant::now();
    let r = post(
        &key,
        format!("{base}/v1/users/alice/devices/alice-phone/revoke"),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        phone.expect_close().await,
        Some(CloseCode::DeviceRevoked.code())
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "closed within a second"
    );
    // The device id is barred, whatever the token...
    assert_eq!(
        close_code(&relay.url, &ta, "alice-phone").await,
        Some(CloseCode::DeviceRevoked.code())
    );
    // ...and the stolen phone's token is revoked, under any device id.
    assert_eq!(
        close_code(&relay.url, &phone_token, "another-id").await,
        Some(CloseCode::TokenRevoked.code())
    );
    laptop.barrier().await;
    // Revoking all of alice's tokens closes the rest and bars the token.
    let r = post(&key, format!("{base}/v1/users/alice/tokens/revoke")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        laptop.expect_close().await,
        Some(CloseCode::TokenRevoked.code())
    );
    assert_eq!(
        close_code(&relay.url, &ta, "alice-laptop").await,
        Some(CloseCode::TokenRevoked.code())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_users_tokens_bars_app_issued_tokens_issued_before() {
    let mut config = test_config();
    config.jwt = Some(jwt_config(None));
    let relay = TestRelay::start_with(config, Default::default()).await;
    let key = api_key(&relay).await;
    let base = format!("http://{}", relay.host_port);
    let mut old = claims("zoe", 600);
    old["iat"] = json!(now() - 5);
    let token = hs256(&old, SECRET);
    let mut c = WsClient::connect(&relay.url, &token, "zoe-phone", None)
        .await
        .unwrap();
    let r = post(&key, format!("{base}/v1/users/zoe/tokens/revoke")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(c.expect_close().await, Some(CloseCode::TokenRevoked.code()));
    assert_eq!(
        close_code(&relay.url, &token, "zoe-phone").await,
        Some(CloseCode::TokenRevoked.code())
    );
    // A token issued after the revocation works. `iat` has one-second
    // resolution, so wait for the wall clock to pass the revocation's second.
    let revoked_second = now();
    while now() <= revoked_second {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let newer = hs256(&claims("zoe", 600), SECRET);
    assert_eq!(close_code(&relay.url, &newer, "zoe-phone").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_tokens_with_keys_from_a_jwks_file() {
    let dir = keepwire_testkit::TempDir::new("jwks-file");
    let jwk: Value = serde_json::from_str(include_str!("fixtures/rsa-test-key.jwk.json")).unwrap();
    let file = dir.join("jwks.json");
    std::fs::write(&file, json!({"keys": [jwk]}).to_string()).unwrap();
    let mut config = test_config();
    config.jwt = Some(JwtConfig {
        hs256_secret: None,
        ..jwt_config(Some(JwksSource::File(file)))
    });
    let relay = TestRelay::start_with(config, Default::default()).await;
    let key = EncodingKey::from_rsa_pem(include_bytes!("fixtures/rsa-test-key.pem")).unwrap();
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some("rsa-1".into());
    let token = encode(&h, &claims("rita", 60), &key).unwrap();
    assert_eq!(close_code(&relay.url, &token, "rita-phone").await, None);
    // No algorithm confusion: an HS256 token "signed" with the public key is refused.
    let n = jwk["n"].as_str().unwrap().as_bytes();
    assert_eq!(
        close_code(&relay.url, &hs256(&claims("rita", 60), n), "d").await,
        Some(CloseCode::AuthFailed.code())
    );
    // An unsigned token is refused.
    let unsigned = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(claims("rita", 60).to_string().as_bytes())
    );
    assert_eq!(
        close_code(&relay.url, &unsigned, "d").await,
        Some(CloseCode::AuthFailed.code())
    );
}

/// A token with a hand-made JOSE header, signed HS256 with `SECRET`.
fn hs256_with_header(header: &Value, claims: &Value) -> String {
    let input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let sig = jsonwebtoken::crypto::sign(
        input.as_bytes(),
        &EncodingKey::from_secret(SECRET),
        Algorithm::HS256,
    )
    .unwrap();
    format!("{input}.{sig}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripped_or_malformed_claims_and_critical_headers_are_refused_with_4001() {
    let k1 = EcKey::new("k1");
    let jwks = jwks_server(vec![k1.jwk.clone()]).await;
    let mut config = test_config();
    config.jwt = Some(jwt_config(Some(JwksSource::Url(jwks.url.clone()))));
    let relay = TestRelay::start_with(config, Default::default()).await;
    let strip = |key: &str| {
        let mut c = claims("zoe", 60);
        c.as_object_mut().unwrap().remove(key);
        c
    };
    let set = |key: &str, v: Value| {
        let mut c = claims("zoe", 60);
        c[key] = v;
        c
    };
    let cases = [
        // Another service's token from the same auth server: no audience.
        ("no aud", strip("aud")),
        ("numeric aud", set("aud", json!(12345))),
        ("no iss", strip("iss")),
        (
            "string nbf in the future",
            set("nbf", json!((now() + 3600).to_string())),
        ),
        ("string exp", set("exp", json!((now() + 3600).to_string()))),
        ("string iat", set("iat", json!(now().to_string()))),
    ];
    // Over HS256 and over JWKS (ES256) alike.
    for (what, c) in &cases {
        for (alg, token) in [("HS256", hs256(c, SECRET)), ("ES256", k1.sign(c))] {
            assert_eq!(
                close_code(&relay.url, &token, "d").await,
                Some(CloseCode::AuthFailed.code()),
                "{alg} token with {what}"
            );
        }
    }
    // RFC 7515 §4.1.11: a critical extension the relay does not know.
    let crit = json!({"alg": "HS256", "typ": "JWT", "crit": ["exp"], "exp": 1});
    assert_eq!(
        close_code(
            &relay.url,
            &hs256_with_header(&crit, &claims("zoe", 60)),
            "d"
        )
        .await,
        Some(CloseCode::AuthFailed.code())
    );
    // The same claims with everything in place pass, so the refusals above
    // are for what was stripped.
    let plain = json!({"alg": "HS256", "typ": "JWT"});
    assert_eq!(
        close_code(
            &relay.url,
            &hs256_with_header(&plain, &claims("zoe", 60)),
            "d"
        )
        .await,
        None
    );
    assert_eq!(
        close_code(&relay.url, &k1.sign(&claims("zoe", 60)), "d").await,
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_claiming_an_iat_within_the_leeway_does_not_survive_a_revocation() {
    let leeway = 30;
    let mut config = test_config();
    config.jwt = Some(JwtConfig {
        leeway: Duration::from_secs(leeway),
        ..jwt_config(None)
    });
    let relay = TestRelay::start_with(config, Default::default()).await;
    let key = api_key(&relay).await;
    let base = format!("http://{}", relay.host_port);
    // Minted now by an auth server whose clock runs 20 s ahead: accepted.
    let mut ahead = claims("zoe", 600);
    ahead["iat"] = json!(now() + 20);
    let ahead = hs256(&ahead, SECRET);
    assert_eq!(close_code(&relay.url, &ahead, "zoe-phone").await, None);
    // The user's tokens are revoked: that token was minted before, so it is
    // refused, although its iat claims a time after the revocation.
    let r = post(&key, format!("{base}/v1/users/zoe/tokens/revoke")).await;
    assert_eq!(r.status(), 200);
    let revoked_second = now();
    assert_eq!(
        close_code(&relay.url, &ahead, "zoe-phone").await,
        Some(CloseCode::TokenRevoked.code())
    );
    // A token minted after the revocation whose iat cannot be before it
    // (iat - leeway is past the revocation) is accepted.
    while now() <= revoked_second {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut fresh = claims("zoe", 600);
    fresh["iat"] = json!(now() + leeway as i64);
    assert_eq!(
        close_code(&relay.url, &hs256(&fresh, SECRET), "zoe-phone").await,
        None
    );
    // One claiming "now" could have been minted up to the leeway earlier, by
    // a clock running behind, so before the revocation: refused until the
    // leeway has passed (README, "Revoking tokens").
    assert_eq!(
        close_code(&relay.url, &hs256(&claims("zoe", 600), SECRET), "zoe-phone").await,
        Some(CloseCode::TokenRevoked.code())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_problems_say_what_was_wrong_in_the_callers_terms() {
    let relay = TestRelay::start().await;
    let key = api_key(&relay).await;
    let base = format!("http://{}", relay.host_port);
    let ta = relay.user("alice").await;
    relay.user("bob").await;
    let api = http();
    let send = |path: String, body: Value| {
        api.post(format!("{base}{path}"))
            .bearer_auth(&key)
            .json(&body)
            .send()
    };
    let problem = |r: reqwest::Response| async move {
        let status = r.status().as_u16();
        let v: Value = r.json().await.unwrap();
        (
            status,
            v["type"].as_str().unwrap_or("").to_owned(),
            v["detail"].as_str().unwrap_or("").to_owned(),
        )
    };
    let r = send(
        "/v1/conversations".into(),
        json!({"kind": "group", "members": ["alice", "bob"], "key": "k1"}),
    )
    .await
    .unwrap();
    let conv: Value = r.json().await.unwrap();
    let id = conv["id"].as_u64().unwrap();
    let messages = format!("/v1/conversations/{id}/messages");

    // A publish without idempotency_key names the field, not serde's internals.
    let (status, kind, detail) =
        problem(send(messages.clone(), json!({"body": "hi"})).await.unwrap()).await;
    assert_eq!(
        (status, kind.as_str()),
        (400, "urn:keepwire:problem:invalid")
    );
    assert_eq!(
        detail,
        "the request body has no `idempotency_key`, which is required"
    );
    // A field of the wrong type is named too.
    let (status, _, detail) = problem(
        send(messages.clone(), json!({"body": 5, "idempotency_key": "a"}))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        detail.starts_with("the request body's `body` is wrong"),
        "{detail}"
    );
    assert!(!detail.contains("line 1"), "{detail}");

    // Reusing a key for another message: said in the API's words.
    let r = send(
        messages.clone(),
        json!({"body": "one", "idempotency_key": "dup"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    let (status, kind, detail) = problem(
        send(
            messages.clone(),
            json!({"body": "two", "idempotency_key": "dup"}),
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(
        (status, kind.as_str()),
        (409, "urn:keepwire:problem:idempotency_key_reused")
    );
    assert!(
        detail.contains("idempotency_key \"dup\" was already used"),
        "{detail}"
    );
    assert!(
        !detail.contains("cid") && !detail.contains("device"),
        "{detail}"
    );

    // Unknown users and conversations: one type each, whichever endpoint.
    for path in ["/v1/users/nobody/devices", "/v1/users/nobody/conversations"] {
        let r = api
            .get(format!("{base}{path}"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        let (status, kind, _) = problem(r).await;
        assert_eq!(
            (status, kind.as_str()),
            (404, "urn:keepwire:problem:unknown_user"),
            "{path}"
        );
    }
    let (status, kind, _) = problem(
        send(
            messages.clone(),
            json!({"from": "nobody", "body": "x", "idempotency_key": "n"}),
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(
        (status, kind.as_str()),
        (404, "urn:keepwire:problem:unknown_user")
    );
    let (status, kind, _) = problem(
        send(
            "/v1/conversations/999/messages".into(),
            json!({"body": "x", "idempotency_key": "n"}),
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(
        (status, kind.as_str()),
        (404, "urn:keepwire:problem:no_such_conv")
    );

    // Revoking a user's tokens says how many connections it closed.
    let mut a = relay.connect(&ta, "alice-phone").await;
    let r = api
        .post(format!("{base}/v1/users/alice/tokens/revoke"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["revoked_tokens"], 1);
    assert_eq!(v["closed_connections"], 1);
    assert_eq!(a.expect_close().await, Some(CloseCode::TokenRevoked.code()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_provisions_users_and_tokens_over_http() {
    let relay = TestRelay::start().await;
    let key = api_key(&relay).await;
    let base = format!("http://{}", relay.host_port);
    let api = http();
    let post_json = |path: &str, body: Value| {
        api.post(format!("{base}{path}"))
            .bearer_auth(&key)
            .json(&body)
            .send()
    };
    let r = post_json("/v1/users", json!({"name": "dana"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"user": "dana"}));
    let r = post_json("/v1/users", json!({"name": "dana"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "urn:keepwire:problem:user_exists");
    let r = post_json("/v1/users", json!({"name": "bad name"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    post_json("/v1/users", json!({"name": "carl"}))
        .await
        .unwrap();
    let users = get_json(&key, format!("{base}/v1/users")).await;
    assert_eq!(users, json!({"users": ["carl", "dana"]}));

    // A token for dana, with the default lifetime or a given one; it connects.
    let r = post_json("/v1/users/dana/tokens", json!({})).await.unwrap();
    assert_eq!(r.status(), 201);
    let t: Value = r.json().await.unwrap();
    let token = t["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("kw_"), "{t}");
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let days = (t["expires_at_ms"].as_i64().unwrap() - now_ms) / 86_400_000;
    assert!((89..=90).contains(&days), "90 days by default: {t}");
    let r = post_json("/v1/users/dana/tokens", json!({"ttl_secs": 60}))
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = post_json("/v1/users/dana/tokens", json!({"ttl_secs": 0}))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = post_json("/v1/users/nobody/tokens", json!({}))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let d = relay.connect(&token, "dana-phone").await;
    assert_eq!(d.welcome().user, "dana");
    // The document lists the new operations (schemathesis covers them).
    let doc: Value = api
        .get(format!("{base}/v1/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        doc["paths"]["/v1/users"]["post"]["operationId"],
        "createUser"
    );
    assert_eq!(doc["paths"]["/v1/users"]["get"]["operationId"], "listUsers");
    assert_eq!(
        doc["paths"]["/v1/users/{user}/tokens"]["post"]["operationId"],
        "issueToken"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_deletes_a_user_over_http() {
    let relay = TestRelay::start().await;
    let key = api_key(&relay).await;
    let base = format!("http://{}", relay.host_port);
    let api = http();
    let post_json = |path: &str, body: Value| {
        api.post(format!("{base}{path}"))
            .bearer_auth(&key)
            .json(&body)
            .send()
    };
    for name in ["dana", "carl"] {
        post_json("/v1/users", json!({"name": name})).await.unwrap();
    }
    let t: Value = post_json("/v1/users/dana/tokens", json!({}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut d = relay
        .connect(t["token"].as_str().unwrap(), "dana-phone")
        .await;
    let conv: Value = post_json(
        "/v1/conversations",
        json!({"kind": "group", "members": ["dana", "carl"], "name": "g", "key": "g1"}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let id = conv["id"].as_u64().unwrap();
    let r = post_json(
        &format!("/v1/conversations/{id}/messages"),
        json!({"from": "dana", "body": "bye", "idempotency_key": "k1"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);

    let delete = || {
        api.delete(format!("{base}/v1/users/dana"))
            .bearer_auth(&key)
            .send()
    };
    let r = delete().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v,
        json!({"user": "dana", "conversations": 1, "devices": 1, "closed_connections": 1})
    );
    assert_eq!(d.expect_close().await, Some(CloseCode::TokenRevoked.code()));
    let users = get_json(&key, format!("{base}/v1/users")).await;
    assert_eq!(users, json!({"users": ["carl"]}));
    // Her message stays, under the tombstone name; she is no longer a member.
    let h = get_json(&key, format!("{base}/v1/conversations/{id}/messages")).await;
    assert_eq!(h["messages"][0]["body"], "bye");
    assert!(
        h["messages"][0]["from"]
            .as_str()
            .unwrap()
            .starts_with("~deleted."),
        "{h}"
    );
    let convs = get_json(&key, format!("{base}/v1/users/carl/conversations")).await;
    assert_eq!(convs["conversations"][0]["members"], json!(["carl"]));
    // Again: she is gone.
    let r = delete().await.unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "urn:keepwire:problem:unknown_user");
    let doc = get_json(&key, format!("{base}/v1/openapi.json")).await;
    assert_eq!(
        doc["paths"]["/v1/users/{user}"]["delete"]["operationId"],
        "deleteUser"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_body_is_a_valid_message() {
    let relay = TestRelay::start().await;
    let key = api_key(&relay).await;
    let base = format!("http://{}", relay.host_port);
    let api = http();
    let post_json = |path: String, body: Value| {
        api.post(format!("{base}{path}"))
            .bearer_auth(&key)
            .json(&body)
            .send()
    };
    post_json("/v1/users".into(), json!({"name": "erin"}))
        .await
        .unwrap();
    let conv: Value = post_json(
        "/v1/conversations".into(),
        json!({"kind": "group", "members": ["erin"], "key": "e"}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let id = conv["id"].as_u64().unwrap();
    let r = post_json(
        format!("/v1/conversations/{id}/messages"),
        json!({"body": "", "idempotency_key": "empty"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201, "PROTOCOL.md §5: a body may be empty");
    let h = get_json(&key, format!("{base}/v1/conversations/{id}/messages")).await;
    assert_eq!(h["messages"][0]["body"], "");
}
