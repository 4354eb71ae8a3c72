//! A mock FCM: the OAuth 2.0 token endpoint and the HTTP v1 send endpoint,
//! over plain HTTP on 127.0.0.1.
//!
//! The token endpoint verifies the service-account JWT (RS256 signature
//! with the test key, `iss`, `aud`, `scope`, lifetime ≤ 1 h, `kid`) and
//! issues access tokens; the send endpoint checks the bearer token and the
//! message's shape (data message, string values, `kw`, priority, ttl, no
//! collapse key), then answers with the next scripted reply or 200.
//! Anything wrong is recorded in `errors` (tests assert it stays empty) and
//! answered with 400 or 401.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{Reply, TempDir};

pub const PROJECT: &str = "kw-test-project";
pub const CLIENT_EMAIL: &str = "push@kw-test-project.iam.gserviceaccount.com";
pub const KEY_ID: &str = "test-key-1";
pub const PRIVATE_KEY: &str = include_str!("../fixtures/fcm-test-key.pem");
pub const PUBLIC_KEY: &str = include_str!("../fixtures/fcm-test-key.pub.pem");

/// A message the send endpoint accepted for checking.
#[derive(Debug, Clone)]
pub struct Sent {
    pub at: Instant,
    pub bearer: String,
    pub message: Value,
}

#[derive(Default)]
pub struct FcmInner {
    pub assertions: Vec<Value>,
    pub issued: Vec<String>,
    pub valid: HashSet<String>,
    pub sends: Vec<Sent>,
    pub replies: VecDeque<Reply>,
    pub errors: Vec<String>,
}

pub struct FcmState {
    token_uri: String,
    decoding: DecodingKey,
    pub inner: Mutex<FcmInner>,
}

impl FcmState {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, FcmInner> {
        self.inner.lock().expect("mock lock")
    }

    /// Scripts the next send answers.
    pub fn reply(&self, r: Reply) {
        self.lock().replies.push_back(r);
    }

    /// Invalidates every access token issued so far (FCM will answer 401).
    pub fn revoke_tokens(&self) {
        self.lock().valid.clear();
    }
}

pub struct FcmMock {
    pub addr: SocketAddr,
    pub state: Arc<FcmState>,
    pub dir: TempDir,
    task: JoinHandle<()>,
}

impl Drop for FcmMock {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FcmMock {
    pub async fn start() -> FcmMock {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(FcmState {
            token_uri: format!("http://{addr}/token"),
            decoding: DecodingKey::from_rsa_pem(PUBLIC_KEY.as_bytes()).expect("public key"),
            inner: Mutex::new(FcmInner::default()),
        });
        let app = Router::new()
            .route("/token", post(token))
            .route("/v1/projects/{project}/{action}", post(send))
            .with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FcmMock {
            addr,
            state,
            dir: TempDir::new("fcm"),
            task,
        }
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes the service-account JSON and returns its path.
    pub fn service_account(&self) -> PathBuf {
        let sa = json!({
            "type": "service_account",
            "project_id": PROJECT,
            "private_key_id": KEY_ID,
            "private_key": PRIVATE_KEY,
            "client_email": CLIENT_EMAIL,
            "client_id": "1",
            "token_uri": self.state.token_uri,
        });
        self.dir.write("service-account.json", sa.to_string())
    }

    /// The `[fcm]` section pointing at this mock.
    pub fn toml(&self) -> String {
        format!(
            "[fcm]\nservice_account = {:?}\nendpoint = {:?}\n",
            self.service_account().display().to_string(),
            self.base()
        )
    }

    pub fn errors(&self) -> Vec<String> {
        self.state.lock().errors.clone()
    }

    pub fn sends(&self) -> Vec<Sent> {
        self.state.lock().sends.clone()
    }
}

fn problem(state: &FcmState, status: StatusCode, what: String) -> Response {
    state.lock().errors.push(what.clone());
    (status, axum::Json(json!({"error": {"code": status.as_u16(), "message": what, "status": "INVALID_ARGUMENT"}}))).into_response()
}

async fn token(State(state): State<Arc<FcmState>>, body: Bytes) -> Response {
    let form: Vec<(String, String)> = url::form_urlencoded::parse(&body).into_owned().collect();
    let get = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    if get("grant_type").as_deref() != Some("urn:ietf:params:oauth:grant-type:jwt-bearer") {
        return problem(
            &state,
            StatusCode::BAD_REQUEST,
            "token: wrong grant_type".into(),
        );
    }
    let Some(assertion) = get("assertion") else {
        return problem(
            &state,
            StatusCode::BAD_REQUEST,
            "token: no assertion".into(),
        );
    };
    let header = match jsonwebtoken::decode_header(&assertion) {
        Ok(h) => h,
        Err(e) => {
            return problem(
                &state,
                StatusCode::BAD_REQUEST,
                format!("token: bad JWT header: {e}"),
            );
        }
    };
    if header.alg != Algorithm::RS256 || header.kid.as_deref() != Some(KEY_ID) {
        return problem(
            &state,
            StatusCode::BAD_REQUEST,
            format!("token: header {header:?}"),
        );
    }
    let mut v = Validation::new(Algorithm::RS256);
    v.set_audience(&[&state.token_uri]);
    v.set_issuer(&[CLIENT_EMAIL]);
    v.set_required_spec_claims(&["exp", "iat", "aud", "iss"]);
    let claims = match jsonwebtoken::decode::<Value>(&assertion, &state.decoding, &v) {
        Ok(d) => d.claims,
        Err(e) => {
            return problem(
                &state,
                StatusCode::BAD_REQUEST,
                format!("token: assertion refused: {e}"),
            );
        }
    };
    if claims["scope"] != "https://www.googleapis.com/auth/firebase.messaging" {
        return problem(
            &state,
            StatusCode::BAD_REQUEST,
            format!("token: scope {}", claims["scope"]),
        );
    }
    let (iat, exp) = (
        claims["iat"].as_u64().unwrap_or(0),
        claims["exp"].as_u64().unwrap_or(0),
    );
    if exp <= iat || exp - iat > 3600 {
        return problem(
            &state,
            StatusCode::BAD_REQUEST,
            format!("token: lifetime {}", exp.saturating_sub(iat)),
        );
    }
    let mut inner = state.lock();
    let access = format!("ya29.mock-{}", inner.issued.len() + 1);
    inner.assertions.push(claims);
    inner.issued.push(access.clone());
    inner.valid.insert(access.clone());
    axum::Json(json!({"access_token": access, "expires_in": 3599, "token_type": "Bearer"}))
        .into_response()
}

async fn send(
    State(state): State<Arc<FcmState>>,
    Path((project, action)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if project != PROJECT || action != "messages:send" {
        return problem(
            &state,
            StatusCode::NOT_FOUND,
            format!("send: path {project}/{action}"),
        );
    }
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_owned();
    if !state.lock().valid.contains(&bearer) {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"error": {"code": 401, "message": "Request had invalid authentication credentials.", "status": "UNAUTHENTICATED"}})),
        )
            .into_response();
    }
    let body: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return problem(
                &state,
                StatusCode::BAD_REQUEST,
                format!("send: not JSON: {e}"),
            );
        }
    };
    if let Err(what) = check_message(&body) {
        return problem(&state, StatusCode::BAD_REQUEST, format!("send: {what}"));
    }
    let reply = {
        let mut inner = state.lock();
        inner.sends.push(Sent {
            at: Instant::now(),
            bearer,
            message: body["message"].clone(),
        });
        inner.replies.pop_front()
    };
    match reply {
        None => {
            axum::Json(json!({"name": format!("projects/{PROJECT}/messages/0:1")})).into_response()
        }
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

/// The shape the brief and FCM require of a keepwire message.
fn check_message(body: &Value) -> Result<(), String> {
    let top = body.as_object().ok_or("body is not an object")?;
    if top.keys().any(|k| k != "message") {
        return Err(format!(
            "unexpected top-level keys {:?}",
            top.keys().collect::<Vec<_>>()
        ));
    }
    let m = body["message"].as_object().ok_or("no message")?;
    for k in m.keys() {
        if !["token", "data", "android"].contains(&k.as_str()) {
            return Err(format!(
                "unexpected message key {k} (no notification, no collapse key)"
            ));
        }
    }
    m.get("token")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .ok_or("no token")?;
    let data = m.get("data").and_then(Value::as_object).ok_or("no data")?;
    if !data.values().all(Value::is_string) {
        return Err("data values must be strings".into());
    }
    for k in data.keys() {
        if !["kw", "kw_preview"].contains(&k.as_str()) {
            return Err(format!(
                "unexpected data key {k} (the payload is the registration id only)"
            ));
        }
    }
    data.get("kw").ok_or("no kw")?;
    let android = m
        .get("android")
        .and_then(Value::as_object)
        .ok_or("no android")?;
    if android.contains_key("collapse_key") {
        return Err("collapse_key is set".into());
    }
    match (
        android.get("priority").and_then(Value::as_str),
        android.get("ttl").and_then(Value::as_str),
    ) {
        (Some("HIGH"), Some("86400s")) | (Some("NORMAL"), Some("3600s")) => Ok(()),
        other => Err(format!("android priority/ttl {other:?}")),
    }
}
