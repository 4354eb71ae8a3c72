//! The keepwire relay server.
//!
//! A relay accepts WebSocket connections speaking keepwire protocol v1 (see
//! `PROTOCOL.md`), authenticates them with bearer tokens, stores every message
//! durably before confirming or delivering it, and delivers each member's
//! inbox in sequence order. Start one with [`RelayServer::start`].
//!
//! Crate layout: [`store`] (storage contract and SQLite), `hub` (live
//! connections and head signals), `conn` (one connection's protocol loop),
//! [`metrics`], [`Config`].
#![forbid(unsafe_code)]

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use keepwire_proto::SUBPROTOCOL;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod api;
pub mod auth;
pub mod bus;
mod config;
mod conn;
pub mod exec;
pub mod hub;
mod listener;
pub mod metrics;
mod openapi;
pub mod push;
pub mod ratelimit;
pub mod revocations;
pub mod session;
pub mod store;
mod upgrade;

pub use config::{Config, MemberAdds, TlsFiles};
pub use hub::Hub;
pub use metrics::Metrics;
pub use session::Session;
pub use store::{AdminStore, RelayStore, SqliteOptions, SqliteStore, Store, StoreError};

/// WebSocket read buffer per connection: small, because a relay holds many
/// mostly idle connections and client frames are small (a larger frame
/// takes more reads, nothing else).
const READ_BUFFER_BYTES: usize = 512;

/// The relay's monotonic clock: tokio's, read as a sans-IO
/// [`keepwire_proto::Instant`] since the relay started (tokio's clock can be
/// paused in tests).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RelayClock {
    origin: tokio::time::Instant,
}

impl RelayClock {
    pub(crate) fn new() -> Self {
        RelayClock {
            origin: tokio::time::Instant::now(),
        }
    }

    /// Now.
    pub(crate) fn now(&self) -> keepwire_proto::Instant {
        keepwire_proto::Instant::from_duration(tokio::time::Instant::now() - self.origin)
    }

    /// The tokio deadline of an instant.
    pub(crate) fn deadline(&self, at: keepwire_proto::Instant) -> tokio::time::Instant {
        self.origin + at.as_duration()
    }
}

/// State shared by every connection of one relay.
pub(crate) struct Shared {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) clock: RelayClock,
    pub(crate) session: Arc<session::SessionConfig>,
    pub(crate) wall: Arc<dyn store::WallClock>,
    pub(crate) push: Option<Arc<push::Push>>,
    pub(crate) bus: Option<bus::Bus>,
    pub(crate) exec: exec::Executor,
    pub(crate) hub: Arc<Hub>,
    pub(crate) config: Config,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) tracker: TaskTracker,
    pub(crate) api_limits: api::ApiLimits,
}

/// A running relay.
pub struct RelayServer {
    addr: SocketAddr,
    scheme: &'static str,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
    hub: Arc<Hub>,
}

/// The push engine, when the configuration names a push configuration file.
async fn start_push(
    config: &Config,
    store: &Arc<dyn Store>,
    hub: &Arc<Hub>,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
) -> io::Result<Option<Arc<push::Push>>> {
    let Some(path) = &config.push_config else {
        return Ok(None);
    };
    let pc = keepwire_push::PushConfig::load(path)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let p = push::Push::start(
        pc,
        config.push_settings,
        store.clone(),
        hub.clone(),
        Arc::new(store::SystemClock),
        metrics,
        shutdown.clone(),
    )
    .await
    .map_err(|e| io::Error::other(format!("push: {e}")))?;
    Ok(Some(p))
}

/// Points the store's head notices at the hub, through the push engine and
/// the cross-node bus when they run; returns the bus.
async fn listen_for_heads(
    config: &Config,
    store: &Arc<dyn Store>,
    hub: &Arc<Hub>,
    push: Option<&Arc<push::Push>>,
    shutdown: &CancellationToken,
) -> io::Result<Option<bus::Bus>> {
    let heads: Arc<dyn store::HeadListener> = match push {
        Some(p) => p.listener(hub.clone()),
        None => hub.clone(),
    };
    let bus = match &config.bus {
        None => None,
        Some(cfg) => Some(
            bus::Bus::start(cfg.clone(), hub.clone(), store.clone(), shutdown.clone())
                .await
                .map_err(io::Error::other)?,
        ),
    };
    match &bus {
        Some(b) => store.set_head_listener(b.listener(heads)),
        None => store.set_head_listener(heads),
    }
    Ok(bus)
}

/// The relay's routes: the WebSocket, health, metrics and the HTTP API.
fn router(shared: &Arc<Shared>) -> Router {
    let app = Router::new()
        .route("/", get(ws_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics_handler))
        .merge(api::routes(shared.config.api_max_body_bytes));
    let app = if shared.config.conformance_echo {
        app.route("/conformance/echo", get(echo_handler))
    } else {
        app
    };
    app.with_state(shared.clone())
}

/// Serves until `stop`, then lets connections say "going away" within the
/// shutdown grace and closes the store.
async fn serve_until_stopped(
    listener: TcpListener,
    app: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shared: Arc<Shared>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    listener::serve(
        listener,
        app,
        tls,
        listener::HttpLimits {
            head_timeout: shared.config.request_head_timeout,
            max_head_bytes: shared.config.max_request_head_bytes,
        },
        stop,
        shared.config.shutdown_grace,
    )
    .await;
    // Connections saw the cancellation and are sending "going away".
    tracker.close();
    if tokio::time::timeout(shared.config.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(target: "keepwire::server", "connections still open after the shutdown grace");
    }
    shared.store.close().await;
    tracing::info!(target: "keepwire::server", "stopped");
}

impl RelayServer {
    /// Binds `config.listen` and starts serving. The store's head listener is
    /// set to this relay's hub.
    pub async fn start(
        config: Config,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
    ) -> io::Result<RelayServer> {
        let listener = TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let hub = Arc::new(Hub::new(config.user_sends_per_sec, config.user_send_burst));
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let push = start_push(&config, &store, &hub, &metrics, &shutdown).await?;
        let bus = listen_for_heads(&config, &store, &hub, push.as_ref(), &shutdown).await?;
        let auth = Arc::new(auth::Authenticator::new(store.clone(), config.jwt.clone()));
        let mut session = config.session_config(hub.clone(), metrics.clone());
        session.push = push.clone().map(|p| p as Arc<dyn session::PushPolicy>);
        let session = Arc::new(session);
        let exec = exec::Executor::new(
            store.clone(),
            auth.clone(),
            hub.clone(),
            Arc::new(store::SystemClock),
            config.limits.max_group_size,
        );
        let exec = match &push {
            Some(p) => {
                let p = p.clone();
                exec.on_push_registered(Arc::new(move |user| p.registered(user)))
            }
            None => exec,
        };
        let shared = Arc::new(Shared {
            wall: Arc::new(store::SystemClock),
            push,
            bus,
            clock: RelayClock::new(),
            session,
            exec,
            store: store.clone(),
            hub: hub.clone(),
            config,
            metrics,
            shutdown: shutdown.clone(),
            tracker: tracker.clone(),
            api_limits: api::ApiLimits::default(),
        });
        tracker.spawn(revocation_poller(shared.clone()));
        tracker.spawn(trimmer(shared.clone()));

        let app = router(&shared);
        let tls = shared
            .config
            .tls
            .as_ref()
            .map(listener::tls_acceptor)
            .transpose()?;
        let scheme = if tls.is_some() { "wss" } else { "ws" };
        let task = tokio::spawn(serve_until_stopped(
            listener,
            app,
            tls,
            shared,
            shutdown.clone(),
            tracker,
        ));
        tracing::info!(target: "keepwire::server", %addr, epoch = %store.epoch(), "listening");
        Ok(RelayServer {
            addr,
            scheme,
            shutdown,
            task,
            hub,
        })
    }

    /// The address the relay listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The relay's WebSocket URL (`wss://` with TLS).
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// Live connections.
    pub fn connection_count(&self) -> usize {
        self.hub.connection_count()
    }

    /// Starts a graceful shutdown: stop accepting, close every connection with
    /// 1001 (going away), flush the store.
    pub fn shutdown(&self) {
        // Cancelled first: a session registering from now on sees it; the
        // hub tells the ones registered before.
        self.shutdown.cancel();
        self.hub.close_all(keepwire_proto::CloseCode::GoingAway);
    }

    /// Waits until the relay has stopped (after [`RelayServer::shutdown`]).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

async fn metrics_handler(State(shared): State<Arc<Shared>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        shared.metrics.render(),
    )
        .into_response()
}

fn bad_request(msg: &str) -> Response {
    (StatusCode::BAD_REQUEST, format!("{msg}\n")).into_response()
}

async fn ws_handler(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut req: axum::extract::Request,
) -> Response {
    let headers = req.headers();
    // Tokens must never travel in URLs (they end up in logs and proxies).
    if let Some(q) = req.uri().query()
        && q.split('&').any(|kv| {
            let k = kv.split('=').next().unwrap_or("");
            k.eq_ignore_ascii_case("token") || k.eq_ignore_ascii_case("access_token")
        })
    {
        shared.metrics.refused_upgrade("token_in_url");
        return bad_request("tokens are not accepted in URLs; send the token in the hello frame");
    }
    // Cross-site WebSocket hijacking: browsers always send Origin, and
    // WebSockets are not covered by CORS, so the relay checks it itself.
    if let Some(origin) = headers.get(header::ORIGIN)
        && !origin_allowed(&shared.config.allowed_origins, origin.as_bytes())
    {
        shared.metrics.refused_upgrade("origin");
        return (
            StatusCode::FORBIDDEN,
            "this origin may not open keepwire WebSockets\n",
        )
            .into_response();
    }
    if upgrade::not_an_upgrade(req.method(), headers) {
        return (
            StatusCode::UPGRADE_REQUIRED,
            [(header::UPGRADE, "websocket")],
            format!("keepwire relay: connect with a WebSocket and subprotocol {SUBPROTOCOL}\n"),
        )
            .into_response();
    }
    let offered = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .any(|p| {
            p.to_str()
                .is_ok_and(|s| s.split(',').any(|v| v.trim() == SUBPROTOCOL))
        });
    if !offered {
        shared.metrics.refused_upgrade("subprotocol");
        return bad_request(&format!("offer the WebSocket subprotocol {SUBPROTOCOL}"));
    }
    if shared.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    let response = upgrade::switching_protocols(headers, SUBPROTOCOL);
    let on_upgrade = hyper::upgrade::on(&mut req);
    drop(req);
    let max = shared.config.limits.max_frame_bytes;
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        // Small buffers: a relay holds many mostly idle connections. Frames
        // go to the batched writer at once; it writes a wake-up's frames
        // in one go and frees its buffer (upgrade.rs).
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(0)
        .max_write_buffer_size(max * 4 + 64 * 1024)
        .max_message_size(Some(max))
        .max_frame_size(Some(max));
    let tracker = shared.tracker.clone();
    // The session runs in a task of its own: this handler's future holds
    // the request, whose headers share hyper's read buffer.
    tracker.spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let io = upgrade::Batched::new(hyper_util::rt::TokioIo::new(upgraded));
        let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            io,
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            Some(config),
        )
        .await;
        conn::run(ws, shared, peer).await;
    });
    response
}

/// Whether a browser `Origin` is on the allow-list (empty list: any; `*`: any).
fn origin_allowed(allowed: &[String], origin: &[u8]) -> bool {
    allowed.is_empty()
        || allowed.iter().any(|a| {
            a == "*"
                || a.trim_end_matches('/')
                    .as_bytes()
                    .eq_ignore_ascii_case(origin)
        })
}

/// A plain WebSocket echo on the relay's stack, for conformance testing.
async fn echo_handler(ws: WebSocketUpgrade) -> Response {
    use axum::extract::ws::Message;
    ws.on_upgrade(|mut socket| async move {
        // Keep polling after a close: the close reply goes out on the next poll.
        while let Some(Ok(msg)) = socket.recv().await {
            if matches!(msg, Message::Text(_) | Message::Binary(_))
                && socket.send(msg).await.is_err()
            {
                break;
            }
        }
    })
}

/// Follows the revocation log (see [`revocations`]: ids may commit out of
/// order, so it reads with a lookback window).
async fn revocation_poller(shared: Arc<Shared>) {
    let mut cursor = match shared.store.revocations_after(i64::MAX - 1).await {
        Ok(_) => revocations::Cursor::starting_at(latest_revocation(&shared).await),
        Err(_) => revocations::Cursor::default(),
    };
    let mut tick = tokio::time::interval(shared.config.revocation_poll);
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Pages of at most REVOCATION_PAGE rows; a full page means more.
        loop {
            let revs = match shared.store.revocations_after(cursor.read_after()).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(target: "keepwire::server", error = %e, "polling revocations failed");
                    break;
                }
            };
            let full = revs.len() >= REVOCATION_PAGE;
            for r in cursor.take(revs) {
                let n = shared
                    .hub
                    .revoke(r.user_id, r.token_id, r.device.as_deref());
                if n > 0 {
                    tracing::info!(target: "keepwire::server", user_id = r.user_id, closed = n, "revoked token: closing connections");
                }
            }
            if !full {
                break;
            }
        }
    }
}

/// The most rows one `revocations_after` read returns (the stores' limit).
const REVOCATION_PAGE: usize = 1000;

async fn latest_revocation(shared: &Shared) -> i64 {
    let mut last = 0;
    while let Ok(revs) = shared.store.revocations_after(last).await {
        match revs.last() {
            Some(r) => last = r.id,
            None => break,
        }
    }
    last
}

async fn trimmer(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(shared.config.trim_interval);
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match shared.store.trim().await {
            Ok(r) if r != Default::default() => {
                tracing::info!(target: "keepwire::server", inbox = r.inbox_entries, messages = r.messages, dedupe = r.dedupe_keys, "retention trimmed");
            }
            Ok(_) => {}
            Err(e) if e.is_closed() => return,
            Err(e) => {
                tracing::warn!(target: "keepwire::server", error = %e, "retention trim failed")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::origin_allowed;

    #[test]
    fn origins_match_exactly_ignoring_case_and_a_trailing_slash() {
        let list = vec![
            "https://app.example".to_string(),
            "http://localhost:3000/".into(),
        ];
        assert!(origin_allowed(&[], b"https://evil.example"));
        assert!(origin_allowed(&list, b"https://APP.example"));
        assert!(origin_allowed(&list, b"http://localhost:3000"));
        assert!(!origin_allowed(&list, b"https://app.example.evil.example"));
        assert!(!origin_allowed(&list, b"http://app.example"));
        assert!(!origin_allowed(&list, b"null"));
        assert!(origin_allowed(&["*".into()], b"null"));
    }
}
