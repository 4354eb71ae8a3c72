//! A mock Web Push service (RFC 8030) over plain HTTP on 127.0.0.1.
//!
//! `POST /push/{name}` checks the VAPID authorization (ES256 raw signature
//! against `k`, `aud` = this origin, `exp` within 24 h, `sub`), the headers
//! (`Content-Encoding: aes128gcm`, `TTL`, `Urgency`, `Topic`), the body size
//! (≤ 4096), and decrypts the body with the subscription's keys; then it
//! answers with the next scripted reply or 201. `GET /push/{name}` answers
//! like a UnifiedPush server. Requests are recorded with their plaintext.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use keepwire_push::ece::{self, ReceiverKeys};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::{Reply, split_jwt, unix, verify_es256};

pub const SUBJECT: &str = "mailto:ops@keepwire.invalid";

/// One push the service accepted for checking.
#[derive(Debug, Clone)]
pub struct Pushed {
    pub name: String,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
    pub plaintext: Value,
}

#[derive(Default)]
pub struct WpInner {
    pub subscriptions: HashMap<String, ReceiverKeys>,
    pub pushed: Vec<Pushed>,
    pub replies: VecDeque<Reply>,
    pub gets: usize,
    pub errors: Vec<String>,
    /// Answer no push at all (a hung provider); requests are still recorded.
    pub hang: bool,
}

pub struct WpState {
    origin: String,
    pub inner: Mutex<WpInner>,
}

impl WpState {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, WpInner> {
        self.inner.lock().expect("mock lock")
    }
}

pub struct WebPushMock {
    pub addr: SocketAddr,
    pub state: Arc<WpState>,
    task: JoinHandle<()>,
}

impl Drop for WebPushMock {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl WebPushMock {
    pub async fn start() -> WebPushMock {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(WpState {
            origin: format!("http://{addr}"),
            inner: Mutex::new(WpInner::default()),
        });
        let app = Router::new()
            .route("/push/{name}", post(push).get(probe))
            .with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        WebPushMock { addr, state, task }
    }

    /// A new subscription: its endpoint URL and the device's keys.
    pub fn subscribe(&self, name: &str) -> (String, ReceiverKeys) {
        let keys = ReceiverKeys::generate();
        self.state
            .lock()
            .subscriptions
            .insert(name.into(), keys.clone());
        (format!("http://{}/push/{name}", self.addr), keys)
    }

    pub fn reply(&self, r: Reply) {
        self.state.lock().replies.push_back(r);
    }

    pub fn pushed(&self) -> Vec<Pushed> {
        self.state.lock().pushed.clone()
    }

    pub fn errors(&self) -> Vec<String> {
        self.state.lock().errors.clone()
    }

    pub fn gets(&self) -> usize {
        self.state.lock().gets
    }
}

fn bad(state: &WpState, what: String) -> Response {
    state.lock().errors.push(what.clone());
    (StatusCode::BAD_REQUEST, what).into_response()
}

/// Checks `Authorization: vapid t=…, k=…` for this origin.
fn check_vapid(origin: &str, auth: Option<&str>) -> Result<(), String> {
    let auth = auth.ok_or("no Authorization")?;
    let rest = auth
        .strip_prefix("vapid t=")
        .ok_or("not a vapid authorization")?;
    let (jwt, k) = rest.split_once(", k=").ok_or("no k=")?;
    let public = URL_SAFE_NO_PAD
        .decode(k)
        .map_err(|_| "k is not base64url")?;
    let (header, claims, input, sig) = split_jwt(jwt).ok_or("malformed JWT")?;
    if header["alg"] != "ES256" {
        return Err(format!("alg {}", header["alg"]));
    }
    if sig.len() != 64 {
        return Err(format!("signature of {} bytes (DER?)", sig.len()));
    }
    if !verify_es256(&public, &input, &sig) {
        return Err("signature does not verify against k".into());
    }
    if claims["aud"] != origin {
        return Err(format!("aud {} (want {origin})", claims["aud"]));
    }
    let now = unix(SystemTime::now());
    let exp = claims["exp"].as_u64().ok_or("no exp")?;
    if exp <= now || exp > now + 24 * 3600 {
        return Err(format!("exp {exp} not within 24 h of {now}"));
    }
    if claims["sub"] != SUBJECT {
        return Err(format!("sub {}", claims["sub"]));
    }
    Ok(())
}

async fn push(
    State(state): State<Arc<WpState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let hs: HashMap<String, String> = headers
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect();
    if let Err(e) = check_vapid(&state.origin, hs.get("authorization").map(String::as_str)) {
        return bad(&state, format!("vapid: {e}"));
    }
    if hs.get("content-encoding").map(String::as_str) != Some("aes128gcm") {
        return bad(&state, "content-encoding".into());
    }
    if hs.get("ttl").is_none_or(|t| t.parse::<u32>().is_err()) {
        return bad(&state, "ttl".into());
    }
    if !hs
        .get("urgency")
        .is_some_and(|u| ["very-low", "low", "normal", "high"].contains(&u.as_str()))
    {
        return bad(&state, "urgency".into());
    }
    if hs.get("topic").is_some_and(|t| {
        t.len() > 32
            || !t
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    }) {
        return bad(&state, "topic".into());
    }
    if body.len() > 4096 {
        return bad(&state, format!("body of {} bytes", body.len()));
    }
    let Some(keys) = state.lock().subscriptions.get(&name).cloned() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let plaintext = match ece::decrypt(&body, &keys).map(|p| serde_json::from_slice::<Value>(&p)) {
        Ok(Ok(v)) => v,
        other => return bad(&state, format!("body does not decrypt to JSON: {other:?}")),
    };
    if !plaintext["kw"].is_string()
        || !["wake", "clear"].contains(&plaintext["kind"].as_str().unwrap_or(""))
    {
        return bad(&state, format!("plaintext {plaintext}"));
    }
    let (reply, hang) = {
        let mut inner = state.lock();
        inner.pushed.push(Pushed {
            name,
            headers: hs,
            body: body.to_vec(),
            plaintext,
        });
        (inner.replies.pop_front(), inner.hang)
    };
    if hang {
        std::future::pending::<()>().await;
    }
    match reply {
        None => (
            StatusCode::CREATED,
            [("location", format!("{}/message/1", state.origin))],
        )
            .into_response(),
        Some(r) => {
            let mut resp =
                (StatusCode::from_u16(r.status).expect("status"), r.body).into_response();
            for (k, v) in r.headers {
                resp.headers_mut()
                    .insert(k, v.parse().expect("header value"));
            }
            resp
        }
    }
}

async fn probe(State(state): State<Arc<WpState>>, Path(name): Path<String>) -> Response {
    let mut inner = state.lock();
    inner.gets += 1;
    if inner.subscriptions.contains_key(&name) {
        axum::Json(json!({"unifiedpush": {"version": 1}})).into_response()
    } else {
        StatusCode::NOT_FOUND.into_response()
    }
}
