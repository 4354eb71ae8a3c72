//! A mock FCM for chaos runs: the OAuth token endpoint and the send
//! endpoint, with switchable faults (down, throttling with `Retry-After`,
//! pushes accepted and then lost, a token declared unregistered). Pushes it
//! delivers are handed to the run, which hands them to the device the token
//! belongs to, as the OS would hand them to the app.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// What the mock does with the next pushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushFault {
    /// Deliver them.
    Pass,
    /// Answer 503 (the provider is down: the relay retries with backoff).
    Down,
    /// Answer 429 with `Retry-After: 1` (the relay waits before retrying).
    Throttled,
    /// Answer 200 and drop them (the provider or the OS lost them: only the
    /// relay's re-arm brings another).
    Lose,
}

/// Counts of what the mock answered.
#[derive(Debug, Default, Clone, Copy)]
pub struct PushCounts {
    /// Pushes handed to the run.
    pub delivered: u64,
    /// Answered 503.
    pub down: u64,
    /// Answered 429.
    pub throttled: u64,
    /// Accepted and dropped.
    pub lost: u64,
    /// Answered `UNREGISTERED`.
    pub unregistered: u64,
}

#[derive(Default)]
struct Shared {
    fault: Option<PushFault>,
    unregister: HashSet<String>,
    counts: PushCounts,
}

struct AppState {
    shared: Mutex<Shared>,
    delivered: mpsc::UnboundedSender<(String, Value)>,
}

/// The running mock.
pub struct PushMock {
    /// Its base URL (`http://127.0.0.1:PORT`).
    pub url: String,
    state: Arc<AppState>,
    task: tokio::task::JoinHandle<()>,
}

impl PushMock {
    /// Starts the mock; delivered pushes (token, data) arrive on the receiver.
    pub async fn start() -> anyhow::Result<(PushMock, mpsc::UnboundedReceiver<(String, Value)>)> {
        let (tx, rx) = mpsc::unbounded_channel();
        let state = Arc::new(AppState {
            shared: Mutex::default(),
            delivered: tx,
        });
        let app = axum::Router::new()
            .route("/token", post(token))
            .route("/v1/projects/{project}/{send}", post(send))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr: SocketAddr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok((
            PushMock {
                url: format!("http://{addr}"),
                state,
                task,
            },
            rx,
        ))
    }

    /// Sets what happens to the next pushes.
    pub fn set(&self, fault: PushFault) {
        self.shared().fault = Some(fault);
    }

    /// The next push to `token` is answered `UNREGISTERED` (the app was
    /// uninstalled, or the token rotated): the relay drops the registration.
    pub fn unregister_once(&self, token: &str) {
        self.shared().unregister.insert(token.to_owned());
    }

    /// What it answered so far.
    pub fn counts(&self) -> PushCounts {
        self.shared().counts
    }

    fn shared(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.state.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the relay's push configuration (FCM at this mock, quick
    /// retries and per-device limits) and the service account it names into
    /// `dir`; returns the configuration file's path.
    pub fn write_config(&self, dir: &Path) -> anyhow::Result<std::path::PathBuf> {
        // The test key of keepwire-push's own tests: the mock checks no signature.
        let key = include_str!("../../keepwire-push/tests/fixtures/fcm-test-key.pem");
        let sa = json!({
            "type": "service_account", "project_id": "kw-chaos", "private_key_id": "k1",
            "private_key": key, "client_email": "relay@kw-chaos.iam.gserviceaccount.com",
            "token_uri": format!("{}/token", self.url),
        });
        std::fs::write(dir.join("fcm-service-account.json"), sa.to_string())?;
        let toml = format!(
            "[fcm]\nservice_account = \"fcm-service-account.json\"\nendpoint = \"{}\"\n\
             [limits]\ndevice_burst = 100\ndevice_interval = \"10ms\"\n\
             backoff_base = \"100ms\"\nbackoff_max = \"1s\"\n",
            self.url
        );
        let path = dir.join("push.toml");
        std::fs::write(&path, toml)?;
        Ok(path)
    }
}

impl Drop for PushMock {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn token() -> Json<Value> {
    Json(json!({"access_token": "chaos", "expires_in": 3600, "token_type": "Bearer"}))
}

async fn send(State(app): State<Arc<AppState>>, Json(body): Json<Value>) -> Response {
    let m = &body["message"];
    let token = m["token"].as_str().unwrap_or_default().to_owned();
    let mut s = app.shared.lock().unwrap_or_else(|p| p.into_inner());
    if s.unregister.remove(&token) {
        s.counts.unregistered += 1;
        let err = json!({"error": {"code": 404, "message": "Requested entity was not found.",
            "status": "NOT_FOUND", "details": [{
                "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                "errorCode": "UNREGISTERED"}]}});
        return (StatusCode::NOT_FOUND, Json(err)).into_response();
    }
    match s.fault.unwrap_or(PushFault::Pass) {
        PushFault::Pass => {
            s.counts.delivered += 1;
            let _ = app.delivered.send((token, m["data"].clone()));
            Json(json!({"name": "projects/kw-chaos/messages/1"})).into_response()
        }
        PushFault::Down => {
            s.counts.down += 1;
            StatusCode::SERVICE_UNAVAILABLE.into_response()
        }
        PushFault::Throttled => {
            s.counts.throttled += 1;
            let mut h = HeaderMap::new();
            h.insert("retry-after", "1".parse().expect("header value"));
            (StatusCode::TOO_MANY_REQUESTS, h).into_response()
        }
        PushFault::Lose => {
            s.counts.lost += 1;
            Json(json!({"name": "projects/kw-chaos/messages/1"})).into_response()
        }
    }
}
