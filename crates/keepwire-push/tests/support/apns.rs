//! A mock APNs gateway: HTTP/2 only (ALPN `h2`, no HTTP/1.1) over TLS with
//! the test CA.
//!
//! It verifies the provider token the way Apple does (ES256 with the team's
//! key, raw `r || s` signature: a DER signature is refused with
//! `InvalidProviderToken`; `iss` = team id, `kid` = key id; older than an
//! hour on the shared virtual clock → `ExpiredProviderToken`), checks every
//! header and the payload, and answers per device token: known here → 200,
//! unknown → 400 `BadDeviceToken`, unregistered → 410 `Unregistered`, unless
//! a reply is scripted. Every request is recorded with the virtual time it
//! arrived at.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use http_body_util::{BodyExt as _, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use keepwire_push::clock::{Clock as _, ManualClock};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use super::{Reply, TestPki, split_jwt, unix, verify_es256};

pub const KEY_ID: &str = "KEYID12345";
pub const TEAM_ID: &str = "TEAMID6789";
pub const TOPIC: &str = "com.example.chat";

/// One request the gateway saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub device: String,
    pub jwt: String,
    pub iat: u64,
    /// Virtual time of arrival.
    pub at: SystemTime,
    pub version: hyper::Version,
    pub push_type: String,
    pub priority: String,
    pub collapse_id: Option<String>,
    pub payload: Value,
}

#[derive(Default)]
pub struct ApnsInner {
    pub known: HashSet<String>,
    pub unregistered: HashSet<String>,
    pub replies: VecDeque<Reply>,
    pub seen: Vec<Seen>,
    pub refused_tokens: Vec<String>,
    pub errors: Vec<String>,
    /// TLS connections accepted.
    pub connections: usize,
}

pub struct ApnsState {
    pub_key: Vec<u8>,
    clock: Arc<ManualClock>,
    pub inner: Mutex<ApnsInner>,
}

impl ApnsState {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, ApnsInner> {
        self.inner.lock().expect("mock lock")
    }
}

pub struct ApnsMock {
    pub addr: SocketAddr,
    pub state: Arc<ApnsState>,
    task: JoinHandle<()>,
}

impl Drop for ApnsMock {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ApnsMock {
    /// A gateway trusting `pub_key` (the team key's uncompressed point) and
    /// reading time from `clock`.
    pub async fn start(pki: &TestPki, pub_key: Vec<u8>, clock: Arc<ManualClock>) -> ApnsMock {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let acceptor = TlsAcceptor::from(pki.server_config(&[b"h2"]));
        let state = Arc::new(ApnsState {
            pub_key,
            clock,
            inner: Mutex::new(ApnsInner::default()),
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    break;
                };
                let (acceptor, st) = (acceptor.clone(), st.clone());
                conns.spawn(async move {
                    // A client without `h2` in its ALPN fails the handshake here.
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    st.lock().connections += 1;
                    let service = hyper::service::service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, std::convert::Infallible>(handle(&st, req).await) }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        ApnsMock { addr, state, task }
    }

    pub fn base(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    pub fn know(&self, device: &str) {
        self.state.lock().known.insert(device.to_ascii_lowercase());
    }

    pub fn unregister(&self, device: &str) {
        self.state
            .lock()
            .unregistered
            .insert(device.to_ascii_lowercase());
    }

    pub fn reply(&self, r: Reply) {
        self.state.lock().replies.push_back(r);
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().seen.clone()
    }

    pub fn errors(&self) -> Vec<String> {
        self.state.lock().errors.clone()
    }
}

fn answer(status: u16, reason: Option<&str>) -> Response<Full<Bytes>> {
    let body = match reason {
        Some(r) => json!({ "reason": r }).to_string(),
        None => String::new(),
    };
    Response::builder()
        .status(status)
        .header("apns-id", "00000000-0000-0000-0000-000000000001")
        .body(Full::new(Bytes::from(body)))
        .expect("response")
}

async fn handle(st: &ApnsState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let now = st.clock.now();
    let version = req.version();
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let h = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let fail = |what: String, status: u16, reason: &str| {
        st.lock().errors.push(what);
        answer(status, Some(reason))
    };

    if parts.method != hyper::Method::POST {
        return fail(format!("method {}", parts.method), 405, "MethodNotAllowed");
    }
    let Some(device) = parts
        .uri
        .path()
        .strip_prefix("/3/device/")
        .map(str::to_owned)
    else {
        return fail(format!("path {}", parts.uri.path()), 404, "BadPath");
    };
    if device.is_empty() || !device.bytes().all(|b| b.is_ascii_hexdigit()) {
        return fail("device token not hex".into(), 400, "BadDeviceToken");
    }

    // Provider token.
    let Some(jwt) = h("authorization").and_then(|a| a.strip_prefix("bearer ").map(str::to_owned))
    else {
        return fail("no bearer token".into(), 403, "MissingProviderToken");
    };
    let Some((header, claims, input, sig)) = split_jwt(&jwt) else {
        return fail("malformed JWT".into(), 403, "InvalidProviderToken");
    };
    if header["alg"] != "ES256" || header["kid"] != KEY_ID || claims["iss"] != TEAM_ID {
        return fail(
            format!("JWT header/claims {header} {claims}"),
            403,
            "InvalidProviderToken",
        );
    }
    if !verify_es256(&st.pub_key, &input, &sig) {
        // Not an error of the client under test when a test sends DER on purpose.
        st.lock().refused_tokens.push(jwt.clone());
        return answer(403, Some("InvalidProviderToken"));
    }
    let iat = claims["iat"].as_u64().unwrap_or(0);
    let now_s = unix(now);
    if now_s >= iat + 3600 {
        st.lock().refused_tokens.push(jwt.clone());
        return answer(403, Some("ExpiredProviderToken"));
    }
    if iat > now_s + 60 {
        return fail(
            format!("iat {iat} is in the future (now {now_s})"),
            403,
            "InvalidProviderToken",
        );
    }

    // Headers and payload.
    let push_type = h("apns-push-type").unwrap_or_default();
    let priority = h("apns-priority").unwrap_or_default();
    match (push_type.as_str(), priority.as_str()) {
        ("alert", "10") | ("background", "5") => {}
        other => return fail(format!("push type/priority {other:?}"), 400, "BadPriority"),
    }
    if h("apns-topic").as_deref() != Some(TOPIC) {
        return fail(format!("topic {:?}", h("apns-topic")), 400, "BadTopic");
    }
    match h("apns-expiration").and_then(|e| e.parse::<u64>().ok()) {
        Some(e) if e > now_s && e <= now_s + 30 * 86400 => {}
        other => return fail(format!("expiration {other:?}"), 400, "BadExpirationDate"),
    }
    let collapse_id = h("apns-collapse-id");
    if collapse_id
        .as_ref()
        .is_some_and(|c| c.len() > 64 || c.eq_ignore_ascii_case(&device))
    {
        return fail(
            "collapse id too long or per device".into(),
            400,
            "BadCollapseId",
        );
    }
    if body.len() > 4096 {
        return fail("payload too large".into(), 413, "PayloadTooLarge");
    }
    let payload: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(_) => return fail("payload not JSON".into(), 400, "PayloadEmpty"),
    };
    let aps_ok = match push_type.as_str() {
        "alert" => {
            payload["aps"] == json!({"alert": {"loc-key": "KW_NEW_MESSAGE"}, "mutable-content": 1})
        }
        _ => payload["aps"] == json!({"content-available": 1}),
    };
    let keys_ok = payload.as_object().is_some_and(|o| {
        o.keys()
            .all(|k| ["aps", "kw", "kw_preview"].contains(&k.as_str()))
    });
    if !aps_ok || !keys_ok || !payload["kw"].is_string() {
        return fail(format!("payload {payload}"), 400, "BadPayload");
    }

    let reply = {
        let mut inner = st.lock();
        inner.seen.push(Seen {
            device: device.clone(),
            jwt,
            iat,
            at: now,
            version,
            push_type,
            priority,
            collapse_id,
            payload,
        });
        inner.replies.pop_front().map(Ok).unwrap_or_else(|| {
            if inner.unregistered.contains(&device) {
                Err((410, Some("Unregistered")))
            } else if inner.known.contains(&device) {
                Err((200, None))
            } else {
                Err((400, Some("BadDeviceToken")))
            }
        })
    };
    match reply {
        Ok(r) => {
            let mut b = Response::builder().status(StatusCode::from_u16(r.status).expect("status"));
            for (k, v) in r.headers {
                b = b.header(k, v);
            }
            b.body(Full::new(Bytes::from(r.body))).expect("response")
        }
        Err((status, reason)) => answer(status, reason),
    }
}
