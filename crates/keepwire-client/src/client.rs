//! The public client API and the tokio driver behind it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keepwire_core::{
    AppState, BackfillDue, BackgroundPolicy, Config, Connection, ConnectionError, Event, Instant,
    Network, RequestId, State, Transmit, TransportEvent,
};
use keepwire_proto::{
    ClientFrame, Confirm, ConvCreate, ConvInfo, ConvKind, ConvMember, ErrorCode, GapReason,
    MemberEvent, Message, PushInfo, PushRegister, Resume, ResumeStatus, ServerFrame, Welcome,
};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::home::Home;
use crate::notify::{Notification, Notifier, coalesce};
use crate::store::{OutboxState, Store, StoreError};
use crate::transport::{self, BoxFuture, CachingResolver, Outgoing, Resolver, SystemResolver};

/// Errors of the client API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The client store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No relay URL or token: log in first.
    #[error("not logged in: no relay URL or token in {0} (run `keepwire login`)")]
    NotLoggedIn(PathBuf),
    /// A relay URL is not a `ws://` or `wss://` URL.
    #[error("invalid relay URL {0:?}: use ws://HOST:PORT or wss://HOST:PORT")]
    BadUrl(String),
    /// TLS could not be configured.
    #[error("TLS setup failed: {0}")]
    Tls(String),
    /// Not connected (or another process on this home holds the connection).
    #[error("not connected to the relay")]
    NotConnected,
    /// The client stopped for good (see the reason).
    #[error("the client stopped: {0:?}")]
    Stopped(keepwire_core::StopReason),
    /// The relay refused the request.
    #[error("{code}: {message}")]
    Refused {
        /// The error code.
        code: ErrorCode,
        /// The relay's message.
        message: String,
    },
    /// The operation did not finish in time.
    #[error("timed out")]
    Timeout,
    /// The client was closed.
    #[error("the client is closed")]
    Closed,
    /// A push payload that cannot be one (larger than [`MAX_PUSH_PAYLOAD`]).
    #[error("bad push payload: {0}")]
    BadPushPayload(String),
    /// A push registration that cannot be one (checked before it is saved).
    #[error("bad push registration: {0}")]
    BadPushRegistration(String),
    /// A signal the relay would refuse (its data too large when encoded).
    #[error("bad signal: {0}")]
    BadSignal(String),
}

/// The largest push payload [`Client::on_push`] accepts (the Web Push limit).
pub const MAX_PUSH_PAYLOAD: usize = 4096;

/// How long a sync (or push wake-up) waits for the home's lock when another
/// process holds it. A process that the OS suspended while holding the lock
/// would otherwise eat the whole deadline.
pub const LOCK_WAIT: Duration = Duration::from_secs(2);

/// What a push wake-up ([`Client::on_push`]) leaves the app to do.
#[derive(Debug, Clone, PartialEq)]
pub struct PushResult {
    /// The sync it ran.
    pub report: SyncReport,
    /// Notifications to show, one per conversation, coalesced (the first is
    /// the one an iOS notification service extension hands back; show the
    /// others beside it). Each message is in at most one notification, ever,
    /// whichever process or path stored it.
    pub show: Vec<Notification>,
    /// Conversations whose notification to remove (read on another device).
    pub clear: Vec<u64>,
    /// This call joined a push wake-up already running in this process and
    /// carries its result (show it in place: same tags).
    pub joined: bool,
    /// The registration id the push carried (`kw`; from the decrypted body
    /// for a Web Push encrypted to this device's keys), if it carried one.
    /// An app with several accounts compares it with
    /// [`PushStatus::id`](crate::PushStatus::id) of each home.
    pub registration_id: Option<String>,
}

/// Why a send did not go through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct SendError {
    /// The relay's code.
    pub code: ErrorCode,
    /// Detail.
    pub message: String,
}

/// Events for the app.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ClientEvent {
    /// The connection state changed.
    State(State),
    /// A new message was stored (from the socket).
    Message(Message),
    /// A membership change was stored.
    Member(MemberEvent),
    /// A send was confirmed.
    SendConfirmed(Confirm),
    /// A send failed for good and left the outbox.
    SendFailed {
        /// Its client id.
        cid: String,
        /// Why.
        error: SendError,
    },
    /// The resume had a gap (history paging fills what it can).
    Gap(Resume),
    /// A connection problem (the client keeps retrying unless it stopped).
    Error(ConnectionError),
    /// An ephemeral signal.
    Signal {
        /// Conversation.
        conv: u64,
        /// Sender.
        from: String,
        /// Data.
        data: serde_json::Value,
    },
    /// This receiver fell behind and missed this many events (the store has everything).
    Lagged(u64),
    /// The background heartbeat learnt for a network changed.
    HeartbeatLearned {
        /// The network id.
        network: String,
        /// The interval now used there in the background.
        interval: Duration,
        /// Whether a longer one failed (no more probing up).
        settled: bool,
    },
}

/// A snapshot of the client's state.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    /// Connection state (of this process's driver; `Idle` if another process holds it).
    pub state: State,
    /// Last connection problem.
    pub last_error: Option<ConnectionError>,
    /// The stored cursor.
    pub cursor: Option<u64>,
    /// The inbox head announced at the last handshake.
    pub head: Option<u64>,
    /// Pending sends.
    pub outbox: u64,
    /// Whether this process holds the home's connection.
    pub holder: bool,
    /// The user, once known.
    pub user: Option<String>,
    /// History pages still being fetched to fill a resume gap.
    pub backfilling: usize,
    /// Messages received by this process (since the client was built).
    pub received: u64,
    /// Sends confirmed by this process.
    pub confirmed: u64,
    /// Notifications shown by this process.
    pub notified: u64,
    /// Sessions opened (welcomes) by this process.
    pub sessions: u64,
    /// Pongs carrying the relay's head received by this process.
    pub heads_heard: u64,
    /// Connection attempts of this process in a row that failed plainly —
    /// refused, or the relay's name did not resolve — since its last
    /// session opened or sync started. Any other failure (a timeout, a dropped connection,
    /// an HTTP error) resets it: those are retried as transient.
    pub plain_failures: u32,
    /// How many relay URLs this client tries in turn.
    pub relays: u32,
    /// Push registrations and mutes sent and not answered yet (a sync is
    /// not done before they are).
    pub requests: usize,
    /// The network the app last reported ([`Client::set_network`]): its id,
    /// or `None` for no network. `default` until the app reports one.
    pub network: Option<String>,
}

/// How a [`Client::sync_once`] ended.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum SyncOutcome {
    /// Outbox flushed and everything up to the relay's head stored.
    CaughtUp,
    /// The deadline came first; what was done stays done and the next call continues.
    Partial,
    /// The relay could not be reached (the last problem, if any).
    Unreachable(Option<ConnectionError>),
    /// The token was rejected or revoked, or the device was.
    Stopped(keepwire_core::StopReason),
    /// Another process on this home holds the connection (and syncs it).
    Busy,
}

/// What a [`Client::sync_once`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncReport {
    /// How it ended.
    pub outcome: SyncOutcome,
    /// Messages received.
    pub received: u64,
    /// Sends confirmed.
    pub confirmed: u64,
    /// Notifications raised.
    pub notified: u64,
    /// Time taken.
    pub elapsed: Duration,
    /// Another process on this home held the connection and ran the sync
    /// (the counts above are this process's: zero).
    pub through_holder: bool,
}

/// [`Client::sync_once`] gives up as unreachable once every relay failed
/// plainly (refused, or its name did not resolve) this many times in a row
/// with no session opened: a relay that is plainly not there does not make
/// a sync wait out its deadline. Transient faults are retried until then.
pub const UNREACHABLE_ROUNDS: u32 = 3;

impl Status {
    /// Whether each relay failed plainly (see [`Status::plain_failures`])
    /// `rounds` times in a row since the last session.
    pub fn plainly_unreachable(&self, rounds: u32) -> bool {
        self.plain_failures >= rounds.saturating_mul(self.relays.max(1))
    }

    /// Connected, with everything up to the handshake's head stored and no pending send.
    pub fn caught_up(&self) -> bool {
        self.state == State::Connected
            && self.outbox == 0
            && self.backfilling == 0
            && self.requests == 0
            && self.head.is_some_and(|h| self.cursor.unwrap_or(0) >= h)
    }
}

/// Asked for a new token when the relay rejects or expires the current one.
pub trait TokenProvider: Send + Sync + 'static {
    /// A fresh token, or `None` if there is none (the client then stops).
    fn refresh(&self) -> BoxFuture<'_, Option<String>>;
}

/// The default provider: the token saved in the home, if it changed (another
/// process logged in again).
struct StoredToken {
    home: PathBuf,
    current: Mutex<String>,
}

impl TokenProvider for StoredToken {
    fn refresh(&self) -> BoxFuture<'_, Option<String>> {
        Box::pin(async move {
            let saved = Store::open(&self.home).ok()?.token().ok()??;
            let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
            if *cur == saved {
                None
            } else {
                *cur = saved.clone();
                Some(saved)
            }
        })
    }
}

/// The network id until the app reports one with [`Client::set_network`].
pub const DEFAULT_NETWORK: &str = "default";

/// A function adjusting the connection settings.
type Configure = Box<dyn FnOnce(&mut Config) + Send>;

/// Builds a [`Client`] for one home directory.
pub struct ClientBuilder {
    home: PathBuf,
    urls: Option<Vec<String>>,
    token: Option<String>,
    resolver: Arc<dyn Resolver>,
    resolve_timeout: Duration,
    token_provider: Option<Arc<dyn TokenProvider>>,
    extra_roots: Vec<Vec<u8>>,
    configure: Option<Configure>,
    app_state: AppState,
    start: bool,
    notifier: Option<Arc<dyn Notifier>>,
    background_policy: Option<BackgroundPolicy>,
    token_elsewhere: bool,
}

impl ClientBuilder {
    /// Shows notifications for messages that arrive while the app is not in
    /// the foreground.
    pub fn notifier(mut self, n: Arc<dyn Notifier>) -> Self {
        self.notifier = Some(n);
        self
    }

    /// The background policy (default: the user's preference, else linger 60 s).
    pub fn background_policy(mut self, p: BackgroundPolicy) -> Self {
        self.background_policy = Some(p);
        self
    }
    /// Relay URLs to use instead of the saved ones.
    pub fn servers(mut self, urls: Vec<String>) -> Self {
        self.urls = Some(urls);
        self
    }

    /// A token to use instead of the saved one.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Name resolution (default: the OS resolver).
    pub fn resolver(mut self, r: Arc<dyn Resolver>) -> Self {
        self.resolver = r;
        self
    }

    /// How long one name resolution may take (default 5 s).
    pub fn resolve_timeout(mut self, t: Duration) -> Self {
        self.resolve_timeout = t;
        self
    }

    /// Where fresh tokens come from (default: the token saved in the home).
    pub fn token_provider(mut self, p: Arc<dyn TokenProvider>) -> Self {
        self.token_provider = Some(p);
        self
    }

    /// Trusts an extra root certificate (DER) for `wss://`, besides the system's.
    pub fn add_root_certificate(mut self, der: Vec<u8>) -> Self {
        self.extra_roots.push(der);
        self
    }

    /// Adjusts the connection settings (backoff, heartbeat, timeouts).
    pub fn configure(mut self, f: impl FnOnce(&mut Config) + Send + 'static) -> Self {
        self.configure = Some(Box::new(f));
        self
    }

    /// The app state at start (default foreground).
    pub fn app_state(mut self, s: AppState) -> Self {
        self.app_state = s;
        self
    }

    /// Do not connect until [`Client::start`] (default: connect at once).
    pub fn manual_start(mut self) -> Self {
        self.start = false;
        self
    }

    /// The token lives outside the home (a desktop keyring): give it with
    /// [`ClientBuilder::token`] and fresh ones through
    /// [`ClientBuilder::token_provider`]; a refreshed token is then not
    /// written into the home's database.
    pub fn token_kept_elsewhere(mut self) -> Self {
        self.token_elsewhere = true;
        self
    }

    /// Opens the home and starts the client (inside a tokio runtime).
    pub async fn build(self) -> Result<Client, ClientError> {
        let store = Store::open(&self.home)?;
        let urls = match self.urls {
            Some(u) => u,
            None => store.urls()?,
        };
        let token = match self.token {
            Some(t) => Some(t),
            None => store.token()?,
        };
        let (Some(token), false) = (token, urls.is_empty()) else {
            return Err(ClientError::NotLoggedIn(self.home.clone()));
        };
        for u in &urls {
            if !(u.starts_with("ws://") || u.starts_with("wss://")) {
                return Err(ClientError::BadUrl(u.clone()));
            }
        }
        let device = store.device_id()?;
        let urls_len = u32::try_from(urls.len()).unwrap_or(u32::MAX);
        let mut config = Config::new(device, urls);
        if let Some(p) = self
            .background_policy
            .or(store.prefs()?.background_policy())
        {
            config.background_policy = p;
        }
        if let Some(f) = self.configure {
            f(&mut config);
        }
        // Roots saved with the login (`keepwire login --ca-cert`) serve every
        // process on this home.
        let mut roots = self.extra_roots;
        if let Some(pem) = store.meta(CA_META)? {
            roots.extend(parse_pem_certificates(pem.as_bytes()).map_err(ClientError::Tls)?);
        }
        let tls = transport::tls_config(&roots).map_err(|e| ClientError::Tls(e.to_string()))?;
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (events, _) = broadcast::channel(4096);
        let (counts_pending, _) = store.outbox_counts()?;
        let status = Arc::new(Mutex::new(Status {
            state: State::Idle,
            last_error: None,
            cursor: store.cursor()?.map(|c| c.seq),
            head: None,
            outbox: counts_pending,
            holder: false,
            user: store.meta("user")?,
            backfilling: 0,
            received: 0,
            confirmed: 0,
            notified: 0,
            sessions: 0,
            heads_heard: 0,
            plain_failures: 0,
            relays: urls_len,
            requests: 0,
            network: Some(DEFAULT_NETWORK.into()),
        }));
        let (status_tx, _) = watch::channel(());
        let inner = Arc::new(Inner {
            home: self.home.clone(),
            store: Mutex::new(store),
            cmd: cmd_tx,
            events: events.clone(),
            status: status.clone(),
            status_changed: status_tx,
            waiters: Arc::new(Mutex::new(HashMap::new())),
            holder: Arc::new(AtomicBool::new(false)),
            sync_gate: tokio::sync::Mutex::new(()),
            push: Mutex::new(None),
            token_elsewhere: self.token_elsewhere,
        });
        let provider = self.token_provider.unwrap_or_else(|| {
            Arc::new(StoredToken {
                home: self.home.clone(),
                current: Mutex::new(token.clone()),
            })
        });
        let supervisor = Supervisor {
            inner: inner.clone(),
            config,
            token,
            resolver: Arc::new(CachingResolver::new(self.resolver, self.resolve_timeout)),
            tls,
            provider,
            app_state: self.app_state,
            network: Network::Online(DEFAULT_NETWORK.into()),
            started: self.start,
            notifier: self.notifier,
        };
        tokio::spawn(supervisor.run(cmd_rx));
        Ok(Client { inner })
    }
}

struct Inner {
    home: PathBuf,
    store: Mutex<Store>,
    cmd: mpsc::UnboundedSender<Cmd>,
    events: broadcast::Sender<ClientEvent>,
    status: Arc<Mutex<Status>>,
    status_changed: watch::Sender<()>,
    waiters: Arc<Mutex<Waiters>>,
    holder: Arc<AtomicBool>,
    /// One sync at a time in this process (`sync_once`, `on_push`).
    sync_gate: tokio::sync::Mutex<()>,
    /// The push wake-up running in this process, for later ones to join.
    push: Mutex<Option<SharedPush>>,
    /// The token lives outside the home ([`ClientBuilder::token_kept_elsewhere`]).
    token_elsewhere: bool,
}

impl Inner {
    /// Shows the network the app reported in [`Status::network`].
    fn set_network_status(&self, n: &Network) {
        let id = match n {
            Network::Online(id) => Some(id.clone()),
            Network::Offline => None,
        };
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .network = id;
        self.status_changed.send_replace(());
    }
}

type SharedPush = futures_util::future::Shared<BoxFuture<'static, Option<PushResult>>>;

type Waiters = HashMap<String, Vec<oneshot::Sender<Result<(), SendError>>>>;

enum Cmd {
    OutboxChanged,
    /// A new app state; the sender (if any) is answered once the client acted
    /// on it (released the home if it parks).
    AppState(AppState, Option<oneshot::Sender<()>>),
    Network(Network),
    /// The device woke from sleep.
    Resume,
    Start,
    Request(
        ClientFrame,
        oneshot::Sender<Result<ServerFrame, ClientError>>,
    ),
    /// Starts a sync; answered `true` once this process runs it, `false` if
    /// another process kept the home's lock for [`LOCK_WAIT`].
    Sync(SyncRequest),
    MarkRead(u64, u64, oneshot::Sender<Result<(), ClientError>>),
    /// An ephemeral signal: answered once written to the connection.
    Signal(
        u64,
        serde_json::Value,
        oneshot::Sender<Result<(), ClientError>>,
    ),
    /// The push registration changed in the store: send it if connected;
    /// the sender (if any) gets the relay's answer.
    Push(Option<oneshot::Sender<Result<(), ClientError>>>),
    /// Mutes are pending in the store: send them if connected; the sender
    /// (if any) gets the relay's answer for this conversation.
    Mutes(Option<(u64, oneshot::Sender<Result<(), ClientError>>)>),
    /// Ends a sync; answered once its deferred notifications were shown (or
    /// collected) and, if the client parks, the home released.
    EndSync(EndSync),
    Stop(oneshot::Sender<()>),
}

struct SyncRequest {
    /// When it was asked for.
    asked: tokio::time::Instant,
    /// When the sync must end.
    until: tokio::time::Instant,
    /// Hand the notifications back instead of showing them (push wake-ups).
    collect: bool,
    /// Connect without the home's lock, as a transient connection: the
    /// holder did not take a push wake-up's sync up (it looks frozen).
    transient: bool,
    started: oneshot::Sender<bool>,
}

struct EndSync {
    done: oneshot::Sender<Collected>,
}

/// Notifications a collecting sync gathered.
#[derive(Debug, Default)]
struct Collected {
    show: Vec<Notification>,
    clear: Vec<u64>,
}

/// Waiters answered once the driver gave the home back.
enum Ack {
    App(oneshot::Sender<()>),
    EndSync(oneshot::Sender<Collected>, Collected),
}

impl Ack {
    fn send(self) {
        match self {
            Ack::App(tx) => {
                let _ = tx.send(());
            }
            Ack::EndSync(tx, c) => {
                let _ = tx.send(c);
            }
        }
    }
}

/// Why the driver returned.
enum Exit {
    /// Stopped (or every handle dropped): the supervisor ends.
    Stopped,
    /// Background under wake-only with no sync open: the connection is
    /// closed, the store closed; the supervisor releases the lock, then
    /// answers these.
    Released(Vec<Ack>),
}

/// A keepwire client for one device home. Cheap to clone: every part of the
/// app shares one connection.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

/// A send durably queued in the outbox.
pub struct SendHandle {
    /// The send's client id.
    pub cid: String,
    rx: Option<oneshot::Receiver<Result<(), SendError>>>,
    inner: Arc<Inner>,
}

impl SendHandle {
    /// Waits until the relay confirmed the send (or refused it for good).
    /// Works whichever process on this home holds the connection.
    pub async fn confirmed(mut self) -> Result<(), SendError> {
        let mut rx = self.rx.take();
        let mut poll = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                r = async { rx.as_mut().expect("guarded").await }, if rx.is_some() => match r {
                    Ok(r) => return r,
                    Err(_) => rx = None,
                },
                _ = poll.tick() => {
                    let status = self.inner.store.lock().unwrap_or_else(|p| p.into_inner()).outbox_status(&self.cid);
                    match status {
                        Ok(None) => return Ok(()),
                        Ok(Some(OutboxState::Failed { code, message })) => {
                            return Err(SendError { code, message });
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}

/// The store key holding extra trusted root certificates (PEM).
pub const CA_META: &str = "ca_pem";

/// Parses the certificates in a PEM text (DER each); an error if there is none.
pub fn parse_pem_certificates(pem: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let certs: Vec<Vec<u8>> = CertificateDer::pem_slice_iter(pem)
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bad certificate PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in the PEM text".into());
    }
    Ok(certs)
}

impl Client {
    /// A builder for the client of the device whose store is in `home`.
    pub fn builder(home: impl AsRef<Path>) -> ClientBuilder {
        ClientBuilder {
            home: home.as_ref().to_owned(),
            urls: None,
            token: None,
            resolver: Arc::new(SystemResolver),
            resolve_timeout: Duration::from_secs(5),
            token_provider: None,
            token_elsewhere: false,
            extra_roots: Vec::new(),
            configure: None,
            app_state: AppState::Foreground,
            start: true,
            notifier: None,
            background_policy: None,
        }
    }

    /// Queues a text message. Returns once it is durably in the outbox; the
    /// handle tells when the relay confirmed it.
    pub async fn send(&self, conv: u64, body: &str) -> Result<SendHandle, ClientError> {
        let row = self
            .inner
            .store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .enqueue(conv, "text", body)?;
        let (tx, rx) = oneshot::channel();
        self.inner
            .waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(row.item.cid.clone())
            .or_default()
            .push(tx);
        let _ = self.inner.cmd.send(Cmd::OutboxChanged);
        Ok(SendHandle {
            cid: row.item.cid,
            rx: Some(rx),
            inner: self.inner.clone(),
        })
    }

    /// Events (state changes, messages, confirmations, ...). Each call gives
    /// an independent stream starting now.
    pub fn events(&self) -> impl futures_util::Stream<Item = ClientEvent> + Send + 'static {
        use futures_util::StreamExt as _;
        tokio_stream::wrappers::BroadcastStream::new(self.inner.events.subscribe()).map(|r| match r
        {
            Ok(e) => e,
            Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                ClientEvent::Lagged(n)
            }
        })
    }

    /// Tells the client the app moved to the foreground or background.
    pub fn set_app_state(&self, s: AppState) {
        let _ = self.inner.cmd.send(Cmd::AppState(s, None));
    }

    /// Like [`Client::set_app_state`], and returns once the client acted on
    /// it. Going to the background under the `wake-only` policy (with no sync
    /// running) closes the connection, closes the connection's store
    /// handle (no transaction stays open) and releases the home's lock
    /// (`HOME/lock`) before this returns: iOS kills a suspended process that
    /// holds a file lock in a shared container, so an app calls this inside
    /// its background task, before it is suspended.
    pub async fn apply_app_state(&self, s: AppState) {
        let (tx, rx) = oneshot::channel();
        if self.inner.cmd.send(Cmd::AppState(s, Some(tx))).is_ok() {
            let _ = rx.await;
        }
    }

    /// Tells the client what the OS says about the network.
    pub fn set_network(&self, n: Network) {
        let _ = self.inner.cmd.send(Cmd::Network(n));
    }

    /// Tells the client the device woke from sleep (suspend/resume): a
    /// socket from before the sleep is replaced at once, skipping any backoff
    /// wait, and the backoff starts over. Not a connection of its own: a
    /// client parked in the background under `wake-only`, stopped, or with no
    /// network stays so.
    pub fn resume(&self) {
        let _ = self.inner.cmd.send(Cmd::Resume);
    }

    /// Starts connecting (after [`ClientBuilder::manual_start`], or after a stop).
    pub fn start(&self) {
        let _ = self.inner.cmd.send(Cmd::Start);
    }

    /// Closes the connection and stops; pending sends stay in the outbox.
    pub async fn stop(&self) {
        let (tx, rx) = oneshot::channel();
        if self.inner.cmd.send(Cmd::Stop(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// The current status.
    pub fn status(&self) -> Status {
        self.inner
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits until `pred(status)` holds, or `timeout` passes.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&Status) -> bool,
    ) -> Result<Status, ClientError> {
        let mut rx = self.inner.status_changed.subscribe();
        let wait = async {
            loop {
                let s = self.status();
                if pred(&s) {
                    return Ok(s);
                }
                if let State::Stopped(r) = s.state
                    && r != keepwire_core::StopReason::ClosedByApp
                {
                    return Err(ClientError::Stopped(r));
                }
                if rx.changed().await.is_err() {
                    return Err(ClientError::Closed);
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| ClientError::Timeout)?
    }

    /// Waits until connected.
    pub async fn wait_connected(&self, timeout: Duration) -> Result<(), ClientError> {
        self.wait_for(timeout, |s| s.state == State::Connected)
            .await
            .map(|_| ())
    }

    async fn request(&self, frame: ClientFrame) -> Result<ServerFrame, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .cmd
            .send(Cmd::Request(frame, tx))
            .map_err(|_| ClientError::Closed)?;
        let reply = tokio::time::timeout(Duration::from_secs(30), rx)
            .await
            .map_err(|_| ClientError::Timeout)?
            .map_err(|_| ClientError::Closed)??;
        match reply {
            ServerFrame::Error(e) => Err(ClientError::Refused {
                code: e.code,
                message: e.message,
            }),
            other => Ok(other),
        }
    }

    /// Creates a conversation with these users (direct for exactly one other
    /// user unless `group`). Idempotent per `key`.
    pub async fn create_conversation(
        &self,
        members: Vec<String>,
        name: Option<String>,
        group: bool,
    ) -> Result<ConvInfo, ClientError> {
        let kind = if group || members.len() != 1 {
            ConvKind::Group
        } else {
            ConvKind::Direct
        };
        let frame = ClientFrame::ConvCreate(ConvCreate {
            rid: String::new(), // the connection names its requests
            key: format!("{:032x}", rand::random::<u128>()),
            kind,
            members,
            name,
        });
        match self.request(frame).await? {
            ServerFrame::Conv { conv, .. } => {
                self.inner
                    .store
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .store_convs(std::slice::from_ref(&conv))?;
                Ok(conv)
            }
            other => Err(ClientError::Refused {
                code: ErrorCode::Internal,
                message: format!("unexpected answer {other:?}"),
            }),
        }
    }

    /// Adds (or removes) a member.
    pub async fn change_member(
        &self,
        conv: u64,
        user: &str,
        add: bool,
    ) -> Result<ConvInfo, ClientError> {
        let m = ConvMember {
            rid: String::new(),
            conv,
            user: user.into(),
        };
        let frame = if add {
            ClientFrame::ConvAdd(m)
        } else {
            ClientFrame::ConvRemove(m)
        };
        match self.request(frame).await? {
            ServerFrame::Conv { conv, .. } => Ok(conv),
            other => Err(ClientError::Refused {
                code: ErrorCode::Internal,
                message: format!("unexpected answer {other:?}"),
            }),
        }
    }

    /// The user's conversations, from the relay (and saved locally).
    pub async fn list_conversations(&self) -> Result<Vec<ConvInfo>, ClientError> {
        match self
            .request(ClientFrame::ConvList { rid: String::new() })
            .await?
        {
            ServerFrame::Convs { convs, .. } => {
                self.inner
                    .store
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .store_convs(&convs)?;
                Ok(convs)
            }
            other => Err(ClientError::Refused {
                code: ErrorCode::Internal,
                message: format!("unexpected answer {other:?}"),
            }),
        }
    }

    /// Stored messages (of one conversation, or all), oldest first.
    pub fn messages(&self, conv: Option<u64>, limit: usize) -> Result<Vec<Message>, ClientError> {
        Ok(self
            .inner
            .store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .messages(conv, limit)?)
    }

    /// Connects (even when dormant in the background), flushes the outbox,
    /// stores and acknowledges everything up to the relay's head, raises
    /// notifications, and lets the connection go dormant again, all within
    /// `deadline`: the entry point for periodic tasks and push wake-ups. What
    /// was done stays done; the next call continues.
    ///
    /// It gives up early, as [`SyncOutcome::Unreachable`], once every relay
    /// failed plainly [`UNREACHABLE_ROUNDS`] times in a row (refused, or the
    /// name did not resolve) with no session opened; other faults are
    /// retried until the deadline.
    ///
    /// If another process holds the home's connection, this waits at most
    /// [`LOCK_WAIT`] for it to let go, then asks it to sync (through the
    /// store) and reports its answer: [`SyncOutcome::CaughtUp`] as soon as
    /// the holder has everything up to the relay's head (fresh from a new
    /// session or a pong), [`SyncOutcome::Unreachable`] if it cannot reach
    /// the relay, [`SyncOutcome::Busy`] if it did not take the request up
    /// within a second (not a keepwire client) or did not answer by the
    /// deadline. A process
    /// that takes the lock for the sync while it would otherwise be parked
    /// (in the background under `wake-only`) gives it back, with the
    /// connection closed, before this returns. Syncs in one process run one
    /// after the other.
    pub async fn sync_once(&self, deadline: Duration) -> SyncReport {
        self.sync(deadline, false).await.0
    }

    async fn sync(&self, deadline: Duration, collect: bool) -> (SyncReport, Collected) {
        let started = std::time::Instant::now();
        // Keep the end of the deadline for ending the sync: showing or
        // handing back what it claimed, and releasing the home.
        let end_by = tokio::time::Instant::now() + deadline;
        let until = end_by - (deadline / 4).min(Duration::from_secs(1));
        let report = |outcome, before: &Status, after: &Status| SyncReport {
            outcome,
            received: after.received - before.received,
            confirmed: after.confirmed - before.confirmed,
            notified: after.notified - before.notified,
            elapsed: started.elapsed(),
            through_holder: false,
        };
        let Ok(_gate) = tokio::time::timeout_at(until, self.inner.sync_gate.lock()).await else {
            let s = self.status();
            return (report(SyncOutcome::Partial, &s, &s), Collected::default());
        };
        let before = self.status();
        let Some(mut ours) = self.start_sync(until, collect, false).await else {
            return (
                report(
                    SyncOutcome::Stopped(keepwire_core::StopReason::ClosedByApp),
                    &before,
                    &before,
                ),
                Collected::default(),
            );
        };
        let mut transient = false;
        let mut holder_outcome = None;
        if !ours {
            let (outcome, taken_up) = self.sync_through_holder(until).await;
            if collect && !taken_up && tokio::time::Instant::now() < until {
                // A holder that does not even take the request up looks
                // frozen (an app the OS suspended with its socket open): a
                // push wake-up connects anyway, as a transient connection,
                // the way an iOS notification service extension does.
                tracing::info!(target: "keepwire::push", "the holder of this home does not answer; connecting as a transient connection");
                ours = self.start_sync(until, collect, true).await == Some(true);
                transient = ours;
            }
            if !ours {
                holder_outcome = Some(outcome);
            }
        }
        let through_holder = holder_outcome.is_some();
        // The session must be a new one: a head learnt earlier says nothing.
        let fresh = |s: &Status| {
            (s.sessions > before.sessions || s.heads_heard > before.heads_heard) && s.caught_up()
        };
        let waited = if ours {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            // Plainly unreachable (see UNREACHABLE_ROUNDS): give up early.
            self.wait_for(left, |s| {
                fresh(s)
                    || (s.sessions == before.sessions && s.plainly_unreachable(UNREACHABLE_ROUNDS))
            })
            .await
        } else {
            Err(ClientError::NotConnected)
        };
        let (done, shown) = oneshot::channel();
        let mut collected = Collected::default();
        let end_by = end_by.max(tokio::time::Instant::now() + Duration::from_millis(200));
        if self.inner.cmd.send(Cmd::EndSync(EndSync { done })).is_ok()
            && let Ok(Ok(c)) = tokio::time::timeout_at(end_by, shown).await
        {
            collected = c;
        }
        let after = self.status();
        let outcome = match waited {
            Ok(s) if fresh(&s) => SyncOutcome::CaughtUp,
            Ok(s) => SyncOutcome::Unreachable(s.last_error),
            // The device's full connection came back and took over.
            Err(ClientError::Stopped(keepwire_core::StopReason::Replaced)) if transient => {
                SyncOutcome::Partial
            }
            Err(ClientError::Stopped(r)) => SyncOutcome::Stopped(r),
            Err(_) if !ours => holder_outcome.unwrap_or(SyncOutcome::Busy),
            Err(_) if after.sessions > before.sessions => SyncOutcome::Partial,
            Err(_) => SyncOutcome::Unreachable(after.last_error.clone()),
        };
        let mut report = report(outcome, &before, &after);
        report.through_holder = through_holder;
        (report, collected)
    }

    /// Asks the supervisor to run a sync (`transient`: without the home's
    /// lock) and waits until `until` for it to start: `Some(true)` when this
    /// process runs it, `Some(false)` when another process holds the home,
    /// `None` when the client has stopped.
    async fn start_sync(
        &self,
        until: tokio::time::Instant,
        collect: bool,
        transient: bool,
    ) -> Option<bool> {
        let (tx, rx) = oneshot::channel();
        let request = Cmd::Sync(SyncRequest {
            asked: tokio::time::Instant::now(),
            until,
            collect,
            transient,
            started: tx,
        });
        self.inner.cmd.send(request).ok()?;
        Some(matches!(
            tokio::time::timeout_at(until, rx).await,
            Ok(Ok(true))
        ))
    }

    /// Asks the process holding this home's connection to sync (through the
    /// store, as sends reach it) and waits until `until` for its answer, and
    /// says whether the holder took the request up at all. Nothing comes
    /// back: what it stores is in the shared store already.
    async fn sync_through_holder(&self, until: tokio::time::Instant) -> (SyncOutcome, bool) {
        let asked = self
            .inner
            .store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ask_holder_sync();
        let Ok(n) = asked else {
            return (SyncOutcome::Busy, false);
        };
        // A holder takes a request up within its 100 ms poll; one that does
        // not (not a keepwire client, or an older one) is not waited for.
        let ack_by = tokio::time::Instant::now() + HOLDER_ACK_WAIT;
        let mut poll = tokio::time::interval(Duration::from_millis(50));
        loop {
            poll.tick().await;
            let (answer, seen) = {
                let store = self.inner.store.lock().unwrap_or_else(|p| p.into_inner());
                (store.holder_sync_answer(), store.holder_sync_seen())
            };
            if let Ok(Some((m, outcome))) = answer
                && m >= n
            {
                let outcome = match outcome.as_str() {
                    "caught_up" => SyncOutcome::CaughtUp,
                    _ => SyncOutcome::Unreachable(None),
                };
                return (outcome, true);
            }
            let now = tokio::time::Instant::now();
            let taken_up = matches!(seen, Ok(s) if s >= n);
            if now >= until || (!taken_up && now >= ack_by) {
                return (SyncOutcome::Busy, taken_up);
            }
        }
    }

    /// Handles a push wake-up (FCM, APNs, UnifiedPush): runs a bounded sync
    /// within `deadline` (a best attempt even when DNS or the relay hangs)
    /// and returns what to show instead of showing it, so an iOS
    /// notification service extension or an Android messaging service can
    /// post it itself. Each message is in at most one notification ever,
    /// also when it later arrives over the socket or through another
    /// process on this home.
    ///
    /// `payload` is what the push carried: keepwire's pushes are content-free
    /// (an opaque registration id the app may use to pick the home), so any
    /// payload up to [`MAX_PUSH_PAYLOAD`] bytes triggers the sync. A second
    /// call while one runs in this process joins it and returns its result
    /// (`joined`), or a `Partial` report if its own deadline comes first.
    ///
    /// If another process holds the home and does not take the sync up
    /// within a second (an app the OS froze with its socket open), this
    /// connects anyway, without the home's lock, as a transient connection
    /// (PROTOCOL.md §2, `hello.transient`): the relay tells the frozen
    /// connection to come back (4012) rather than replacing it for good.
    pub async fn on_push(
        &self,
        payload: &[u8],
        deadline: Duration,
    ) -> Result<PushResult, ClientError> {
        if payload.len() > MAX_PUSH_PAYLOAD {
            return Err(ClientError::BadPushPayload(format!(
                "{} bytes, more than the {MAX_PUSH_PAYLOAD} a push can carry",
                payload.len()
            )));
        }
        // Only the registration id is read (from a Web Push body encrypted to
        // this device's keys after decrypting it, RFC 8291); the messages
        // come from the sync, never from the push.
        let keys = self
            .inner
            .store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_keys()?;
        let read = crate::push::read_payload(payload, keys.as_ref());
        if read.decrypted {
            tracing::debug!(target: "keepwire::push", "a Web Push body opened with this device's keys");
        }
        let started = std::time::Instant::now();
        let (running, joined) = {
            let mut slot = self.inner.push.lock().unwrap_or_else(|p| p.into_inner());
            match slot.as_ref() {
                Some(f) if f.peek().is_none() => (f.clone(), true),
                _ => {
                    let client = self.clone();
                    let task = tokio::spawn(async move {
                        let (report, c) = client.sync(deadline, true).await;
                        PushResult {
                            report,
                            show: c.show,
                            clear: c.clear,
                            joined: false,
                            registration_id: None,
                        }
                    });
                    let f: BoxFuture<'static, Option<PushResult>> =
                        Box::pin(async move { task.await.ok() });
                    let f = futures_util::FutureExt::shared(f);
                    *slot = Some(f.clone());
                    (f, false)
                }
            }
        };
        // The wake-up's own caller waits for it (it is bounded by the
        // deadline); a joiner waits at most its own deadline.
        let outcome = if joined {
            tokio::time::timeout(deadline, running).await
        } else {
            Ok(running.await)
        };
        match outcome {
            Ok(Some(mut r)) => {
                r.joined = joined;
                r.registration_id = read.registration_id;
                if let Some(p) = read.preview
                    && r.report.outcome != SyncOutcome::CaughtUp
                    && let Some(n) = self.show_preview(&p)?
                {
                    r.show.push(n);
                }
                Ok(r)
            }
            Ok(None) => Err(ClientError::Closed),
            // Only a joiner with a shorter deadline gets here: the running
            // wake-up goes on and shows its result to its own caller.
            Err(_) => Ok(PushResult {
                report: SyncReport {
                    outcome: SyncOutcome::Partial,
                    received: 0,
                    confirmed: 0,
                    notified: 0,
                    elapsed: started.elapsed(),
                    through_holder: false,
                },
                show: Vec::new(),
                clear: Vec::new(),
                joined,
                registration_id: read.registration_id,
            }),
        }
    }

    /// A wake-up whose sync could not fetch the message: the notification
    /// comes from the push's preview instead, claimed like any other (never
    /// shown again when the message arrives later, not shown at all if the
    /// message is muted, read elsewhere, our own or in quiet hours).
    fn show_preview(&self, p: &crate::push::Preview) -> Result<Option<Notification>, ClientError> {
        let mut store = self.inner.store.lock().unwrap_or_else(|p| p.into_inner());
        let prefs = store.prefs()?;
        let me = self.status().user;
        let quiet = prefs.quiet_hours.is_some_and(|q| q.now());
        let read = store.read_mark(p.conv)?;
        let m = p.message();
        let claimed = store.claim_notifications(std::slice::from_ref(&m), |m| {
            prefs.may_show(m, me.as_deref(), quiet, read)
        })?;
        let Some(c) = claimed.into_iter().next() else {
            return Ok(None);
        };
        let name = store.conv_name(c.conv)?;
        let n = coalesce(&c, name.as_deref(), prefs.previews);
        store.log_notification(n.conv, n.unread)?;
        drop(store);
        self.inner
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .notified += 1;
        Ok(Some(n))
    }

    /// The user opened a notification of `conv` (or the conversation): the
    /// app is in the foreground and `conv` is read up to its newest stored
    /// message, here (its notification is not raised again) and, once
    /// connected, on the user's other devices (theirs are cleared). Waits
    /// up to `timeout` for the connection; `NotConnected` if it did not come
    /// (the local mark is kept).
    pub async fn notification_opened(
        &self,
        conv: u64,
        timeout: Duration,
    ) -> Result<(), ClientError> {
        let up_to = {
            let store = self.inner.store.lock().unwrap_or_else(|p| p.into_inner());
            let up_to = store.max_conv_seq(conv)?;
            store.set_read_mark(conv, up_to)?;
            up_to
        };
        self.set_app_state(AppState::Foreground);
        self.wait_connected(timeout).await?;
        self.mark_read(conv, up_to).await
    }

    /// The user's preferences (notifications, background policy).
    pub fn prefs(&self) -> Result<crate::notify::Prefs, ClientError> {
        Ok(self
            .inner
            .store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .prefs()?)
    }

    /// Saves the user's preferences. Mutes, quiet hours and previews apply
    /// to the next notification; the background policy applies from the
    /// next start of a client on this home.
    ///
    /// Mutes changed here are also sent to the relay (as
    /// [`Client::set_muted`] does, without waiting for its answer), so the
    /// relay stops pushing for them and the user's other devices follow.
    pub fn set_prefs(&self, p: &crate::notify::Prefs) -> Result<(), ClientError> {
        let (changed, previews_changed) = {
            let mut store = self.inner.store.lock().unwrap_or_else(|p| p.into_inner());
            let before = store.prefs()?.previews;
            let changed = store.save_prefs(p)?;
            // Previews in pushes follow the preference: the registration
            // goes to the relay again with the new choice.
            let push = store.push_state()?;
            let previews_changed = before != p.previews && push.registration.is_some();
            if previews_changed {
                store.change_push(push.registration, push.own_keys)?;
            }
            (changed, previews_changed)
        };
        if !changed.is_empty() {
            let _ = self.inner.cmd.send(Cmd::Mutes(None));
        }
        if previews_changed {
            let _ = self.inner.cmd.send(Cmd::Push(None));
        }
        Ok(())
    }

    /// Sends an ephemeral signal (a typing indicator, presence: any JSON
    /// value up to 1024 bytes encoded) to the devices of `conv`'s members
    /// that are connected right now (not to this connection). Best effort:
    /// never stored, never retried. `Ok` once written to the connection;
    /// [`ClientError::NotConnected`] if this process does not hold a live
    /// connection (signals are not queued: a typing indicator sent late is
    /// wrong); [`ClientError::BadSignal`] if the data is too large. The relay
    /// answers a refusal (`not_member`) with no request to match it to: it is
    /// logged (target `keepwire::client`), not returned.
    pub async fn signal(&self, conv: u64, data: serde_json::Value) -> Result<(), ClientError> {
        let size = serde_json::to_string(&data).map_or(usize::MAX, |s| s.len());
        let max = keepwire_proto::Limits::default().max_signal_bytes;
        if size > max {
            return Err(ClientError::BadSignal(format!(
                "the data is {size} bytes encoded; at most {max}"
            )));
        }
        let (tx, rx) = oneshot::channel();
        self.inner
            .cmd
            .send(Cmd::Signal(conv, data, tx))
            .map_err(|_| ClientError::Closed)?;
        rx.await.map_err(|_| ClientError::Closed)?
    }

    /// Marks `conv` read up to `up_to` (a `conv_seq`) on this device and, through
    /// the relay, on the user's other devices: their notifications for it are
    /// cleared and not raised again. `NotConnected` if the relay could not be
    /// told now (the local mark is kept).
    pub async fn mark_read(&self, conv: u64, up_to: u64) -> Result<(), ClientError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .cmd
            .send(Cmd::MarkRead(conv, up_to, tx))
            .map_err(|_| ClientError::Closed)?;
        rx.await.map_err(|_| ClientError::Closed)?
    }

    /// Registers (or replaces) this device's push registration: the FCM or
    /// APNs token the OS gave the app, or a Web Push endpoint (with keys made
    /// elsewhere, or keys keepwire makes and keeps in the store, so
    /// [`Client::on_push`] can decrypt the pushes). Call it whenever the OS
    /// hands over a new token.
    ///
    /// It is validated, saved in the store (it survives restarts), and sent
    /// to the relay at once if this process is connected, else after the
    /// next handshake of whichever process on this home connects. It is
    /// sent again after a relay restore (new epoch) and weekly, so the relay
    /// never drops it as stale. Returns the registration's status: with the
    /// relay's id when it answered within the request timeout, `pending`
    /// when it could not be told yet. A relay refusal comes back as
    /// [`ClientError::Refused`] (code `invalid`: e.g. a provider the relay
    /// is not configured for, an APNs topic it does not allow, a Web Push
    /// endpoint on a private address).
    pub async fn set_push_registration(
        &self,
        registration: crate::PushRegistration,
    ) -> Result<crate::PushStatus, ClientError> {
        let own = matches!(
            registration,
            crate::PushRegistration::WebPush { keys: None, .. }
        );
        // FCM and APNs registrations carry this device's keys too: the relay
        // encrypts previews to them (when the user and the operator allow).
        let with_keys = !matches!(
            registration,
            crate::PushRegistration::WebPush { keys: Some(_), .. }
        );
        {
            let mut store = self.inner.store.lock().unwrap_or_else(|p| p.into_inner());
            let keys = if with_keys {
                Some(store.ensure_push_keys()?)
            } else {
                None
            };
            let wire = crate::push::wire_form(&registration, keys.as_ref())
                .map_err(ClientError::BadPushRegistration)?;
            store.change_push(Some(wire), own)?;
        }
        self.push_now().await
    }

    /// Removes this device's push registration (the relay stops pushing
    /// to it). Saved first, sent when connected, like
    /// [`Client::set_push_registration`].
    pub async fn clear_push_registration(&self) -> Result<crate::PushStatus, ClientError> {
        {
            let mut store = self.inner.store.lock().unwrap_or_else(|p| p.into_inner());
            let s = store.push_state()?;
            if s.registration.is_none() && !s.dirty && s.id.is_none() {
                return Ok(s.status());
            }
            store.change_push(None, false)?;
        }
        self.push_now().await
    }

    /// Where this device's push registration stands (from the store).
    pub fn push_status(&self) -> Result<crate::PushStatus, ClientError> {
        Ok(self
            .inner
            .store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_status()?)
    }

    /// Sends the stored registration now if connected and returns its status.
    async fn push_now(&self) -> Result<crate::PushStatus, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .cmd
            .send(Cmd::Push(Some(tx)))
            .map_err(|_| ClientError::Closed)?;
        // Not connected, or no answer in time: it stays pending and goes
        // out with the next handshake.
        if let Ok(Ok(Err(e @ ClientError::Refused { .. }))) =
            tokio::time::timeout(Duration::from_secs(30), rx).await
        {
            return Err(e);
        }
        self.push_status()
    }

    /// Mutes (or unmutes) a conversation for all of the user's devices: no
    /// notifications here from now on, no push wake-ups for it from the
    /// relay, and the user's other devices follow (a `mute` inbox entry).
    /// Saved at once; the relay is told now if this process is connected,
    /// else after the next handshake. Returns `true` once the relay accepted
    /// it, `false` if it is queued; [`ClientError::Refused`] if the relay
    /// refused it (`not_member`, `no_such_conv`).
    pub async fn set_muted(&self, conv: u64, muted: bool) -> Result<bool, ClientError> {
        self.inner
            .store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .queue_mute(conv, muted)?;
        let (tx, rx) = oneshot::channel();
        self.inner
            .cmd
            .send(Cmd::Mutes(Some((conv, tx))))
            .map_err(|_| ClientError::Closed)?;
        match tokio::time::timeout(Duration::from_secs(30), rx).await {
            Ok(Ok(Ok(()))) => Ok(true),
            Ok(Ok(Err(e @ ClientError::Refused { .. }))) => Err(e),
            Ok(_) | Err(_) => Ok(false),
        }
    }

    /// The background heartbeats learnt per network: (interval, settled).
    pub fn learned_heartbeats(&self) -> Result<HashMap<String, (Duration, bool)>, ClientError> {
        Ok(self
            .inner
            .store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .learned_heartbeats()?)
    }

    /// The home directory.
    pub fn home(&self) -> &Path {
        &self.inner.home
    }
}

// ---------------------------------------------------------------------------
// Supervisor: holds the home's lock while it runs the connection.

struct Supervisor {
    inner: Arc<Inner>,
    config: Config,
    token: String,
    resolver: Arc<CachingResolver>,
    tls: Arc<rustls::ClientConfig>,
    provider: Arc<dyn TokenProvider>,
    app_state: AppState,
    network: Network,
    started: bool,
    notifier: Option<Arc<dyn Notifier>>,
}

impl Supervisor {
    /// Parked: in the background under `wake-only`. A parked client does not
    /// hold the home's lock; a sync or the foreground takes it again.
    fn parked(&self) -> bool {
        self.app_state == AppState::Background
            && self.config.background_policy == BackgroundPolicy::WakeOnly
    }

    async fn run(mut self, mut cmd_rx: mpsc::UnboundedReceiver<Cmd>) {
        let mut sync: Option<SyncRequest> = None;
        loop {
            // Wait for the home's lock while it is wanted (always, unless
            // parked with no sync asked for); meanwhile answer what can be
            // answered.
            let lock = loop {
                let wanted = sync.is_some() || !self.parked();
                if wanted && let Some(l) = Home::new(&self.inner.home).try_lock() {
                    break Some(l);
                }
                // A push wake-up beside a frozen holder: connect anyway, as a
                // transient connection (the store is shared; sends and
                // entries are idempotent).
                if sync.as_ref().is_some_and(|r| r.transient) {
                    break None;
                }
                let now = tokio::time::Instant::now();
                // A sync waits at most LOCK_WAIT for the lock.
                let give_up = sync.as_ref().map(|r| r.until.min(r.asked + LOCK_WAIT));
                if let Some(at) = give_up
                    && now >= at
                    && let Some(r) = sync.take()
                {
                    let _ = r.started.send(false);
                    continue;
                }
                let poll = match (give_up, wanted) {
                    (Some(at), _) => (now + Duration::from_millis(50)).min(at),
                    (None, true) => now + Duration::from_millis(250),
                    (None, false) => now + Duration::from_secs(3600),
                };
                tokio::select! {
                    cmd = cmd_rx.recv() => match cmd {
                        None => return,
                        Some(Cmd::Stop(done)) => { let _ = done.send(()); return; }
                        Some(Cmd::Request(_, reply)) => { let _ = reply.send(Err(ClientError::NotConnected)); }
                        // Never stored: without the connection there is no one to tell.
                        Some(Cmd::Signal(_, _, reply)) => { let _ = reply.send(Err(ClientError::NotConnected)); }
                        Some(Cmd::AppState(s, ack)) => {
                            self.app_state = s;
                            if let Some(ack) = ack {
                                let _ = ack.send(());
                            }
                        }
                        Some(Cmd::Network(n)) => {
                            self.inner.set_network_status(&n);
                            self.network = n;
                        }
                        // Not holding the connection: nothing to replace.
                        Some(Cmd::Resume) => {}
                        Some(Cmd::Start) => self.started = true,
                        Some(Cmd::OutboxChanged) => {}
                        Some(Cmd::Sync(r)) => {
                            if let Some(old) = sync.replace(r) {
                                let _ = old.started.send(false);
                            }
                        }
                        Some(Cmd::EndSync(e)) => { let _ = e.done.send(Collected::default()); }
                        // Kept in the store; sent by whichever process connects next.
                        Some(Cmd::Push(reply)) => { if let Some(r) = reply { let _ = r.send(Err(ClientError::NotConnected)); } }
                        Some(Cmd::Mutes(reply)) => { if let Some((_, r)) = reply { let _ = r.send(Err(ClientError::NotConnected)); } }
                        Some(Cmd::MarkRead(conv, up_to, reply)) => {
                            // Kept here; the relay hears of it from the holder's next read.
                            let local = self.inner.store.lock().unwrap_or_else(|p| p.into_inner()).set_read_mark(conv, up_to);
                            let _ = reply.send(match local {
                                Ok(()) => Err(ClientError::NotConnected),
                                Err(e) => Err(e.into()),
                            });
                        }
                    },
                    _ = tokio::time::sleep_until(poll) => {}
                }
            };
            let transient = lock.is_none();
            self.inner.holder.store(!transient, Ordering::SeqCst);
            self.config.transient = transient;
            let driver = Driver::new(&self);
            self.config.transient = false;
            let mut driver = match driver {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!(target: "keepwire::client", error = %e, "cannot open the client store");
                    return;
                }
            };
            if let Some(r) = sync.take() {
                driver.begin_sync(r);
            }
            match driver.run(&mut cmd_rx).await {
                Exit::Stopped => {
                    self.inner.holder.store(false, Ordering::SeqCst);
                    drop(lock);
                    return;
                }
                Exit::Released(acks) => {
                    self.app_state = driver.app_state;
                    self.network = driver.network_state.clone();
                    self.started = driver.started;
                    drop(driver);
                    self.inner.holder.store(false, Ordering::SeqCst);
                    {
                        let mut s = self.inner.status.lock().unwrap_or_else(|p| p.into_inner());
                        s.holder = false;
                        s.state = State::Dormant;
                    }
                    drop(lock);
                    tracing::debug!(target: "keepwire::background", "parked: connection closed, home released");
                    self.inner.status_changed.send_replace(());
                    for a in acks {
                        a.send();
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Driver

/// The clock the core runs on: keeps counting while the device is suspended.
pub fn boot_clock() -> Instant {
    use nix::time::{ClockId, clock_gettime};
    match clock_gettime(ClockId::CLOCK_BOOTTIME) {
        Ok(ts) => Instant::from_duration(Duration::new(ts.tv_sec() as u64, ts.tv_nsec() as u32)),
        Err(_) => Instant::from_duration(monotonic_fallback()),
    }
}

fn monotonic_fallback() -> Duration {
    use std::sync::OnceLock;
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed()
}

struct Driver {
    core: Connection,
    store: Store,
    inner: Arc<Inner>,
    resolver: Arc<CachingResolver>,
    tls: Arc<rustls::ClientConfig>,
    provider: Arc<dyn TokenProvider>,
    transport_tx: mpsc::Sender<(u64, TransportEvent)>,
    transport_rx: mpsc::Receiver<(u64, TransportEvent)>,
    outgoing: Option<(u64, mpsc::Sender<Outgoing>)>,
    token_tx: mpsc::Sender<Option<String>>,
    token_rx: mpsc::Receiver<Option<String>>,
    /// The app's requests in flight, by the connection's id for them.
    requests: HashMap<RequestId, oneshot::Sender<Result<ServerFrame, ClientError>>>,
    outbox_seen: i64,
    data_version: i64,
    stop_waiters: Vec<oneshot::Sender<()>>,
    app_state: AppState,
    notifier: Option<Arc<dyn Notifier>>,
    /// Notifications claimed during a sync, shown (coalesced) when it ends.
    deferred: Vec<crate::store::Claimed>,
    /// The network the OS reports (for analytics).
    network: Option<String>,
    /// The network as the OS reports it (handed back when parking).
    network_state: Network,
    /// Whether the app started the connection.
    started: bool,
    /// The background policy.
    policy: BackgroundPolicy,
    /// A sync is open (from `Cmd::Sync` to `Cmd::EndSync`).
    sync_open: bool,
    /// The open sync hands its notifications back instead of showing them.
    collect: bool,
    /// Conversations read elsewhere during the open sync.
    deferred_clears: Vec<u64>,
    /// Waiters to answer after the command at hand (or after parking).
    acks: Vec<Ack>,
    /// The task running the current transport.
    transport_task: Option<tokio::task::JoinHandle<()>>,
    /// The last sync another process asked of this holder that was seen.
    remote_seen: u64,
    /// The sync another process asked for, being run.
    remote: Option<RemoteSync>,
    /// What the relay offers for push (from this session's `welcome`);
    /// `None` outside a session.
    push_offer: Option<Option<PushInfo>>,
    /// `push_register` requests in flight: request -> (state version, waiters).
    push_inflight: HashMap<RequestId, (u64, Vec<Reply>)>,
    /// `mute` requests in flight: request -> (conversation, muted, waiters).
    mute_inflight: HashMap<RequestId, (u64, bool, Vec<Reply>)>,
}

/// A sync asked by another process on this home (`keepwire sync` beside a
/// `tail` or an agent), run by the holder.
struct RemoteSync {
    /// The request's number in the store.
    n: u64,
    /// Sessions and heads heard when it was picked up: the answer needs a
    /// head heard after that.
    sessions: u64,
    heads_heard: u64,
    /// Plain failures in a row when it was picked up: a holder that has been
    /// failing all along answers "unreachable" after one more plain failure
    /// (the attempt the request makes at once), not after a new streak.
    plain_failures: u32,
    /// Whether it started the core's sync (and so ends it).
    started_core_sync: bool,
    /// When it is abandoned without an answer.
    until: tokio::time::Instant,
}

/// How long a sync asking the holder waits for it to take the request up.
const HOLDER_ACK_WAIT: Duration = Duration::from_secs(1);

/// How long a holder works on another process's sync before abandoning it
/// (the asking process has its own, usually shorter, deadline).
const REMOTE_SYNC_MAX: Duration = Duration::from_secs(60);

/// Where the answer to a push registration or a mute goes.
type Reply = oneshot::Sender<Result<(), ClientError>>;

/// What the waiters of a registration or a mute hear: the refusal, success
/// when answered, or "not connected" when the session ended first.
fn answer_of(
    answered: bool,
    refused: &Option<(bool, ErrorCode, String)>,
) -> Result<(), ClientError> {
    match refused {
        Some((_, code, message)) => Err(ClientError::Refused {
            code: *code,
            message: message.clone(),
        }),
        None if answered => Ok(()),
        None => Err(ClientError::NotConnected),
    }
}

impl Driver {
    fn new(sup: &Supervisor) -> Result<Driver, StoreError> {
        let store = Store::open(&sup.inner.home)?;
        let now = boot_clock();
        let cursor = store.cursor()?;
        let seed = rand::random::<u64>();
        let mut config = sup.config.clone();
        config.boot = store.next_boot()?;
        let mut core = Connection::new(config, sup.token.clone(), cursor.clone(), seed, now);
        for (net, (interval, settled)) in store.learned_heartbeats()? {
            core.set_learned_heartbeat(&net, interval, settled);
        }
        // History fills a previous process did not finish go on.
        for due in store.backfills_due()? {
            core.backfill(due, now);
        }
        core.handle_network(sup.network.clone(), now);
        core.handle_app_state(sup.app_state, now);
        let (transport_tx, transport_rx) = mpsc::channel(1024);
        let (token_tx, token_rx) = mpsc::channel(1);
        let data_version = store.data_version()?;
        let remote_seen = store.holder_sync_asked()?;
        let mut d = Driver {
            core,
            store,
            inner: sup.inner.clone(),
            resolver: sup.resolver.clone(),
            tls: sup.tls.clone(),
            provider: sup.provider.clone(),
            transport_tx,
            transport_rx,
            outgoing: None,
            token_tx,
            token_rx,
            requests: HashMap::new(),
            outbox_seen: 0,
            data_version,
            stop_waiters: Vec::new(),
            app_state: sup.app_state,
            notifier: sup.notifier.clone(),
            deferred: Vec::new(),
            network: match &sup.network {
                Network::Online(id) => Some(id.clone()),
                Network::Offline => None,
            },
            network_state: sup.network.clone(),
            started: sup.started,
            policy: sup.config.background_policy,
            sync_open: false,
            collect: false,
            deferred_clears: Vec::new(),
            acks: Vec::new(),
            transport_task: None,
            remote_seen,
            remote: None,
            push_offer: None,
            push_inflight: HashMap::new(),
            mute_inflight: HashMap::new(),
        };
        d.pick_up_outbox(now)?;
        if sup.started {
            d.core.start(now);
        }
        Ok(d)
    }

    fn pick_up_outbox(&mut self, now: Instant) -> Result<(), StoreError> {
        for row in self.store.pending_after(self.outbox_seen)? {
            self.outbox_seen = self.outbox_seen.max(row.seq);
            self.core.queue_send(row.item, now);
        }
        Ok(())
    }

    /// Opens a sync for `r` and tells its caller this process runs it.
    fn begin_sync(&mut self, r: SyncRequest) {
        let now = boot_clock();
        let left = r
            .until
            .saturating_duration_since(tokio::time::Instant::now());
        self.sync_open = true;
        self.collect = r.collect;
        // The unreachable rule counts from the start of the sync.
        self.inner
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .plain_failures = 0;
        self.core.request_sync(now + left, now);
        let _ = r.started.send(true);
    }

    /// In the background under `wake-only` with no sync open: nothing here
    /// needs the connection or the home.
    fn should_park(&self) -> bool {
        self.app_state == AppState::Background
            && self.policy == BackgroundPolicy::WakeOnly
            && !self.sync_open
            && self.stop_waiters.is_empty()
    }

    /// Closes the connection (the core is dormant) and hands the waiters to
    /// the supervisor, which releases the lock before answering them. The
    /// store closes with the driver: no transaction stays open.
    async fn park(&mut self) -> Exit {
        self.flush();
        // Short: a wake-up must hand its result back inside the OS's window.
        self.finish_transport(Duration::from_millis(300)).await;
        let _ = self.store.save_status("Dormant", None);
        Exit::Released(std::mem::take(&mut self.acks))
    }

    /// Lets the closing transport write what is queued and run the closing
    /// handshake for at most `grace`, then forgets it: a process that exits
    /// right after `stop` must not drop frames it already queued (a signal).
    async fn finish_transport(&mut self, grace: Duration) {
        if let Some(mut task) = self.transport_task.take()
            && tokio::time::timeout(grace, &mut task).await.is_err()
        {
            task.abort();
        }
        self.outgoing = None;
    }

    fn answer_acks(&mut self) {
        for a in self.acks.drain(..) {
            a.send();
        }
    }

    async fn run(&mut self, cmd_rx: &mut mpsc::UnboundedReceiver<Cmd>) -> Exit {
        let mut poll_outbox = tokio::time::interval(Duration::from_millis(100));
        poll_outbox.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.flush();
            if !self.stop_waiters.is_empty() {
                break;
            }
            if self.should_park() {
                return self.park().await;
            }
            self.answer_acks();
            let now = boot_clock();
            let sleep = self
                .core
                .poll_timeout()
                .map(|t| t.saturating_duration_since(now));
            let deadline = tokio::time::Instant::now() + sleep.unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                cmd = cmd_rx.recv() => match cmd {
                    None => {
                        // Every handle was dropped.
                        self.core.close(boot_clock());
                        self.flush();
                        break;
                    }
                    Some(cmd) => self.handle_cmd(cmd),
                },
                Some((id, ev)) = self.transport_rx.recv() => {
                    // Take everything already received, so a backlog is
                    // persisted in a few large transactions, not one per entry.
                    let now = boot_clock();
                    self.core.handle_transport(id, ev, now);
                    for _ in 0..1024 {
                        match self.transport_rx.try_recv() {
                            Ok((id, ev)) => self.core.handle_transport(id, ev, now),
                            Err(_) => break,
                        }
                    }
                }
                Some(token) = self.token_rx.recv() => {
                    if let Some(t) = &token
                        && !self.inner.token_elsewhere
                    {
                        let _ = self.store.set_meta("token", t);
                    }
                    self.core.handle_token(token, boot_clock());
                }
                _ = tokio::time::sleep_until(deadline), if sleep.is_some() => self.core.handle_timeout(boot_clock()),
                _ = poll_outbox.tick() => {
                    // Sends queued by other processes on this home.
                    if let Ok(v) = self.store.data_version()
                        && v != self.data_version
                    {
                        self.data_version = v;
                        if let Err(e) = self.pick_up_outbox(boot_clock()) {
                            tracing::warn!(target: "keepwire::client", error = %e, "reading the outbox failed");
                        }
                        self.pick_up_remote_sync(boot_clock());
                        // A registration or mute another process saved.
                        if self.push_offer.is_some() {
                            self.send_push(None, boot_clock());
                            self.send_mutes(None, boot_clock());
                        }
                    }
                    if self.remote.is_some() {
                        self.answer_remote_sync();
                    }
                }
            }
        }
        self.finish_transport(Duration::from_secs(1)).await;
        let _ = self.store.save_status("stopped", None);
        self.answer_acks();
        for w in self.stop_waiters.drain(..) {
            let _ = w.send(());
        }
        Exit::Stopped
    }

    fn handle_cmd(&mut self, cmd: Cmd) {
        let now = boot_clock();
        match cmd {
            Cmd::OutboxChanged => {
                if let Err(e) = self.pick_up_outbox(now) {
                    tracing::warn!(target: "keepwire::client", error = %e, "reading the outbox failed");
                }
            }
            Cmd::AppState(s, ack) => {
                if let Some(ack) = ack {
                    self.acks.push(Ack::App(ack));
                }
                self.app_state = s;
                if s == AppState::Foreground {
                    // The user is looking: everything counts as seen.
                    let _ = self.store.clear_unread();
                }
                self.core.handle_app_state(s, now);
                self.log_state();
            }
            Cmd::Sync(r) => self.begin_sync(r),
            Cmd::MarkRead(conv, up_to, reply) => {
                let local = self.store.set_read_mark(conv, up_to);
                self.read_elsewhere(conv, up_to);
                let sent = self.core.send_read(conv, up_to, now);
                let _ = reply.send(match (local, sent) {
                    (Err(e), _) => Err(e.into()),
                    (Ok(()), Err(_)) => Err(ClientError::NotConnected),
                    (Ok(()), Ok(())) => Ok(()),
                });
            }
            Cmd::EndSync(end) => {
                self.core.end_sync(now);
                self.sync_open = false;
                let deferred = std::mem::take(&mut self.deferred);
                let clears = std::mem::take(&mut self.deferred_clears);
                let mut collected = Collected::default();
                if self.collect {
                    collected.show = self.render(deferred);
                    collected.clear = clears;
                } else {
                    self.show(deferred);
                    for conv in clears {
                        self.clear_shown(conv);
                    }
                }
                self.collect = false;
                self.acks.push(Ack::EndSync(end.done, collected));
            }
            Cmd::Network(n) => {
                self.network_state = n.clone();
                self.network = match &n {
                    Network::Online(id) => Some(id.clone()),
                    Network::Offline => None,
                };
                self.inner.set_network_status(&n);
                self.core.handle_network(n, now);
                self.log_state();
            }
            Cmd::Resume => {
                tracing::info!(target: "keepwire::background", "resumed from sleep: reconnecting now");
                self.core.handle_resume(now);
            }
            Cmd::Start => {
                // Already started: nothing to do (starting again would reset
                // a connection in progress). After a stop, start over.
                if !self.started || matches!(self.core.state(), State::Stopped(_)) {
                    self.started = true;
                    self.core.start(now);
                }
            }
            Cmd::Signal(conv, data, reply) => {
                let sent = self.core.send_signal(conv, data, now);
                let _ = reply.send(sent.map_err(|_| ClientError::NotConnected));
            }
            Cmd::Request(frame, reply) => match self.core.send_request(frame, now) {
                Ok(id) => {
                    self.requests.insert(id, reply);
                }
                Err(_) => {
                    let _ = reply.send(Err(ClientError::NotConnected));
                }
            },
            Cmd::Stop(done) => {
                self.core.close(now);
                self.stop_waiters.push(done);
            }
            Cmd::Push(reply) => self.send_push(reply, now),
            Cmd::Mutes(reply) => self.send_mutes(reply, now),
        }
    }

    /// Sends the stored push registration if it is due (changed, stale, or
    /// from another relay epoch) and not already on its way.
    fn send_push(&mut self, reply: Option<Reply>, now: Instant) {
        let answer = |reply: Option<Reply>, r: Result<(), ClientError>| {
            if let Some(tx) = reply {
                let _ = tx.send(r);
            }
        };
        let Some(offer) = &self.push_offer else {
            return answer(reply, Err(ClientError::NotConnected));
        };
        let state = match self.store.push_state() {
            Ok(s) => s,
            Err(e) => return answer(reply, Err(e.into())),
        };
        if let Some((_, waiters)) = self
            .push_inflight
            .values_mut()
            .find(|(v, _)| *v == state.version)
        {
            waiters.extend(reply);
            return;
        }
        if !state.due(self.core.epoch(), crate::push::now_ms()) {
            return answer(reply, Ok(()));
        }
        if let Some(p) = state.provider()
            && !offer.as_ref().is_some_and(|o| o.providers.contains(&p))
        {
            // Not sent: the relay would refuse it. It stays due, so a relay
            // configured later gets it at the next handshake.
            let why = format!("this relay offers no {p} push wake-ups");
            let _ = self.store.push_unsendable(&why);
            return answer(
                reply,
                Err(ClientError::Refused {
                    code: ErrorCode::Invalid,
                    message: why,
                }),
            );
        }
        let frame = ClientFrame::PushRegister(PushRegister {
            rid: String::new(),
            registration: state.registration.clone().unwrap_or_default(),
            // The user's preference: the relay sends previews only if its
            // operator allows them too, and only encrypted to this device.
            previews: state.registration.is_some()
                && self.store.prefs().map(|p| p.previews).unwrap_or(false),
        });
        match self.core.send_request(frame, now) {
            Ok(id) => {
                self.push_inflight
                    .insert(id, (state.version, reply.into_iter().collect()));
            }
            Err(_) => answer(reply, Err(ClientError::NotConnected)),
        }
    }

    /// Sends the mutes the relay has not accepted yet (each once per
    /// session unless changed).
    fn send_mutes(&mut self, reply: Option<(u64, Reply)>, now: Instant) {
        let mut reply = reply;
        if self.push_offer.is_none() {
            if let Some((_, tx)) = reply {
                let _ = tx.send(Err(ClientError::NotConnected));
            }
            return;
        }
        let pending = match self.store.pending_mutes() {
            Ok(p) => p,
            Err(e) => {
                if let Some((_, tx)) = reply {
                    let _ = tx.send(Err(e.into()));
                }
                return;
            }
        };
        for (conv, muted) in pending {
            let mine = reply.take_if(|(c, _)| *c == conv).map(|(_, tx)| tx);
            if let Some((_, _, waiters)) = self
                .mute_inflight
                .values_mut()
                .find(|(c, m, _)| *c == conv && *m == muted)
            {
                waiters.extend(mine);
                continue;
            }
            let frame = ClientFrame::Mute {
                rid: String::new(),
                conv,
                muted,
            };
            let Ok(id) = self.core.send_request(frame, now) else {
                if let Some(tx) = mine {
                    let _ = tx.send(Err(ClientError::NotConnected));
                }
                break;
            };
            self.mute_inflight
                .insert(id, (conv, muted, mine.into_iter().collect()));
        }
        // Not pending any more: the relay already has it.
        if let Some((_, tx)) = reply {
            let _ = tx.send(Ok(()));
        }
    }

    /// The connection's answer to request `request` (or `None`: the session
    /// ended first), to whoever waits for it.
    fn on_answer(&mut self, request: RequestId, frame: Option<ServerFrame>) {
        if let Some(reply) = self.requests.remove(&request) {
            let _ = reply.send(frame.ok_or(ClientError::NotConnected));
            return;
        }
        let finish = |waiters: Vec<Reply>, refused: &Option<(bool, ErrorCode, String)>| {
            for w in waiters {
                let _ = w.send(answer_of(frame.is_some(), refused));
            }
        };
        // A refusal; `transient`: worth another try at the next handshake,
        // anything else is the relay's final word on this request.
        let refused = match &frame {
            Some(ServerFrame::Error(e)) => Some((
                matches!(e.code, ErrorCode::RateLimited | ErrorCode::Internal),
                e.code,
                e.message.clone(),
            )),
            _ => None,
        };
        if let Some((version, waiters)) = self.push_inflight.remove(&request) {
            let recorded = match (&frame, &refused) {
                (Some(ServerFrame::Push { id, .. }), _) => {
                    tracing::info!(target: "keepwire::push", registered = id.is_some(), "push registration accepted");
                    Some(Ok(id.clone()))
                }
                (_, Some((false, code, message))) => {
                    tracing::warn!(target: "keepwire::push", %code, "push registration refused");
                    Some(Err(format!("{code}: {message}")))
                }
                // Unanswered or transient: it stays due.
                _ => None,
            };
            if let Some(r) = recorded
                && let Err(e) = self.store.push_answered(version, self.core.epoch(), r)
            {
                tracing::warn!(target: "keepwire::push", error = %e, "recording the push registration failed");
            }
            finish(waiters, &refused);
            return;
        }
        if let Some((conv, muted, waiters)) = self.mute_inflight.remove(&request) {
            let final_word = frame.is_some() && !refused.as_ref().is_some_and(|(t, _, _)| *t);
            if final_word {
                let _ = self.store.mute_answered(conv, muted);
            }
            finish(waiters, &refused);
        }
    }

    /// Carries out the core's transmits and events until it has none.
    fn flush(&mut self) {
        loop {
            let mut progressed = false;
            while let Some(t) = self.core.poll_transmit() {
                progressed = true;
                self.transmit(t);
            }
            while let Some(e) = self.core.poll_event() {
                progressed = true;
                self.event(e);
            }
            if !progressed {
                break;
            }
        }
        self.publish_status();
    }

    fn transmit(&mut self, t: Transmit) {
        match t {
            Transmit::Open { id, url } => {
                let (tx, rx) = mpsc::channel(1024);
                self.outgoing = Some((id, tx));
                tracing::debug!(target: "keepwire::ws", id, %url, "opening");
                self.transport_task = Some(tokio::spawn(transport::run(
                    id,
                    url,
                    self.resolver.clone(),
                    self.tls.clone(),
                    self.transport_tx.clone(),
                    rx,
                )));
            }
            Transmit::Frame { id, text } => {
                if let Some((cur, tx)) = &self.outgoing
                    && *cur == id
                    && tx.try_send(Outgoing::Frame(text)).is_err()
                {
                    // The writer is hopelessly behind: treat the socket as dead.
                    self.core
                        .handle_transport(id, TransportEvent::Closed(None), boot_clock());
                }
            }
            Transmit::Close { id, code } => {
                if let Some((cur, tx)) = self.outgoing.take() {
                    if cur == id {
                        let _ = tx.try_send(Outgoing::Close(code));
                    } else {
                        self.outgoing = Some((cur, tx));
                    }
                }
            }
        }
    }

    fn emit(&self, e: ClientEvent) {
        let _ = self.inner.events.send(e);
    }

    fn event(&mut self, e: Event) {
        let now = boot_clock();
        match e {
            Event::StateChanged(s) => {
                // While backing off: how long until the next attempt.
                let retry_in_ms = self
                    .core
                    .retry_at()
                    .map(|at| at.saturating_duration_since(now).as_millis() as u64);
                tracing::debug!(target: "keepwire::client", state = ?s, retry_in_ms, "state");
                self.log_state();
                let err = self.core.last_error().map(|e| format!("{e:?}"));
                let _ = self.store.save_status(&format!("{s:?}"), err.as_deref());
                if !matches!(s, State::Connected | State::Handshaking) {
                    // Requests in flight come back as `Unanswered`;
                    // registrations and mutes stay due in the store: the
                    // next session sends them again.
                    self.push_offer = None;
                }
                self.emit(ClientEvent::State(s));
            }
            Event::Welcome(w) => self.on_welcome(*w, now),
            Event::Entries(entries) => {
                let Some(epoch) = self.core.epoch().map(str::to_owned) else {
                    return;
                };
                match self.store.persist_entries(&epoch, &entries) {
                    Ok(p) => {
                        if let Some(last) = entries.last() {
                            self.core.handle_persisted(last.seq, now);
                        }
                        self.inner
                            .status
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .received += p.messages.len() as u64;
                        if !p.messages.is_empty() {
                            let via = if self.core.syncing() {
                                "sync"
                            } else {
                                "socket"
                            };
                            let app = format!("{:?}", self.app_state);
                            let _ = self.store.log_received(&app, via, p.messages.len() as u64);
                        }
                        self.notify(&p.messages);
                        for mark in &p.reads {
                            self.read_elsewhere(mark.conv, mark.up_to);
                        }
                        for m in p.messages {
                            self.emit(ClientEvent::Message(m));
                        }
                        for m in p.members {
                            self.emit(ClientEvent::Member(m));
                        }
                    }
                    Err(e) => {
                        // Not acknowledged: the relay will send them again.
                        tracing::error!(target: "keepwire::client", error = %e, "storing inbox entries failed");
                    }
                }
            }
            Event::SendConfirmed(c) => {
                if let Some(echo) = c.echo_seq {
                    // Caught up includes our own copy of what we sent.
                    let mut s = self.inner.status.lock().unwrap_or_else(|p| p.into_inner());
                    s.head = Some(s.head.unwrap_or(0).max(echo));
                }
                self.inner
                    .status
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .confirmed += 1;
                if let Err(e) = self.store.confirm(&c.cid) {
                    tracing::error!(target: "keepwire::client", error = %e, "recording a confirmation failed");
                }
                self.finish_waiters(&c.cid, Ok(()));
                self.emit(ClientEvent::SendConfirmed(c));
            }
            Event::SendFailed { cid, code, message } => {
                let _ = self.store.fail(&cid, code, &message);
                let error = SendError { code, message };
                self.finish_waiters(&cid, Err(error.clone()));
                self.emit(ClientEvent::SendFailed { cid, error });
            }
            Event::Reply(frame) => self.on_reply(*frame),
            Event::Answer { request, frame } => self.on_answer(request, Some(*frame)),
            Event::Unanswered(request) => self.on_answer(request, None),
            Event::History {
                conv,
                messages,
                due,
            } => {
                if let Err(e) = self.store.store_backfill(conv, &messages, due) {
                    tracing::error!(target: "keepwire::client", error = %e, "storing history failed");
                }
            }
            Event::EpochReset { epoch, reason } => self.on_epoch_reset(&epoch, reason),
            Event::CursorReset(c) => {
                let r = self
                    .store
                    .set_meta("cursor", &c.seq.to_string())
                    .and_then(|()| self.store.set_meta("epoch", &c.epoch));
                if let Err(e) = r {
                    tracing::error!(target: "keepwire::client", error = %e, "recording the resume failed");
                }
            }
            Event::TokenNeeded => {
                let provider = self.provider.clone();
                let tx = self.token_tx.clone();
                tokio::spawn(async move {
                    let t = tokio::time::timeout(Duration::from_secs(30), provider.refresh())
                        .await
                        .ok()
                        .flatten();
                    let _ = tx.send(t).await;
                });
            }
            Event::RelayHead(h) => {
                let mut s = self.inner.status.lock().unwrap_or_else(|p| p.into_inner());
                s.head = Some(s.head.unwrap_or(0).max(h));
                s.heads_heard += 1;
            }
            Event::HeartbeatProbed {
                network,
                interval,
                ok,
            } => {
                let _ = self
                    .store
                    .log_heartbeat(&network, interval.as_millis() as u64, ok);
            }
            Event::HeartbeatLearned {
                network,
                interval,
                settled,
            } => {
                tracing::info!(target: "keepwire::background", %network, ?interval, settled, "heartbeat learnt");
                if let Err(e) = self
                    .store
                    .save_learned_heartbeat(&network, interval, settled)
                {
                    tracing::warn!(target: "keepwire::background", error = %e, "saving the learnt heartbeat failed");
                }
                self.emit(ClientEvent::HeartbeatLearned {
                    network,
                    interval,
                    settled,
                });
            }
            Event::Error(e) => {
                tracing::info!(target: "keepwire::client", error = ?e, "connection problem");
                {
                    let mut s = self.inner.status.lock().unwrap_or_else(|p| p.into_inner());
                    // With the count, so a waiter woken by it sees why.
                    s.last_error = Some(e.clone());
                    s.plain_failures = match e {
                        ConnectionError::Refused | ConnectionError::NoNetwork => {
                            s.plain_failures.saturating_add(1)
                        }
                        _ => 0,
                    };
                }
                self.inner.status_changed.send_replace(());
                self.emit(ClientEvent::Error(e));
            }
            _ => {}
        }
    }

    /// Records the current connection and app state (analytics).
    fn log_state(&self) {
        let state = format!("{:?}", self.core.state());
        let app = format!("{:?}", self.app_state);
        let err = self.core.last_error().map(|e| format!("{e:?}"));
        if let Err(e) = self
            .store
            .log_state(&state, &app, self.network.as_deref(), err.as_deref())
        {
            tracing::warn!(target: "keepwire::client", error = %e, "recording analytics failed");
        }
    }

    fn finish_waiters(&self, cid: &str, r: Result<(), SendError>) {
        if let Some(ws) = self
            .inner
            .waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(cid)
        {
            for w in ws {
                let _ = w.send(r.clone());
            }
        }
    }

    /// Raises notifications for new messages while the app is not in the foreground.
    fn notify(&mut self, messages: &[Message]) {
        let collecting = self.sync_open && self.collect;
        if (self.notifier.is_none() && !collecting)
            || self.app_state == AppState::Foreground
            || messages.is_empty()
        {
            return;
        }
        let prefs = self.store.prefs().unwrap_or_default();
        let me = self
            .inner
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .user
            .clone();
        let quiet = prefs.quiet_hours.is_some_and(|q| q.now());
        // Read on another device: never shown here.
        let mut read: HashMap<u64, u64> = HashMap::new();
        for m in messages {
            if let std::collections::hash_map::Entry::Vacant(e) = read.entry(m.conv) {
                e.insert(self.store.read_mark(m.conv).unwrap_or(0));
            }
        }
        let claimed = match self.store.claim_notifications(messages, |m| {
            prefs.may_show(
                m,
                me.as_deref(),
                quiet,
                read.get(&m.conv).copied().unwrap_or(0),
            )
        }) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(target: "keepwire::notify", error = %e, "claiming notifications failed");
                return;
            }
        };
        if self.sync_open {
            // One coalesced notification per conversation for the whole sync.
            for c in claimed {
                match self.deferred.iter_mut().find(|d| d.conv == c.conv) {
                    Some(d) => {
                        d.shown.extend(c.shown);
                        d.unread = c.unread;
                        d.last_sender = c.last_sender;
                    }
                    None => self.deferred.push(c),
                }
            }
        } else {
            self.show(claimed);
        }
    }

    /// The user read `conv` up to `up_to` (here or on another device): drop
    /// what a sync was holding back and clear the shown notification.
    fn read_elsewhere(&mut self, conv: u64, up_to: u64) {
        for d in &mut self.deferred {
            if d.conv == conv {
                d.shown.retain(|m| m.conv_seq > up_to);
                d.unread = d.shown.len() as u64;
            }
        }
        self.deferred.retain(|d| !d.shown.is_empty());
        if self.sync_open {
            // Cleared (or handed back) when the sync ends.
            if !self.deferred_clears.contains(&conv) {
                self.deferred_clears.push(conv);
            }
        } else {
            self.clear_shown(conv);
        }
    }

    fn clear_shown(&self, conv: u64) {
        if let Some(n) = &self.notifier
            && let Err(e) = n.clear(conv)
        {
            tracing::warn!(target: "keepwire::notify", error = %e, "clearing a notification failed");
        }
    }

    /// The coalesced notifications for what was claimed.
    fn coalesced(&self, claimed: Vec<crate::store::Claimed>) -> Vec<Notification> {
        let previews = self.store.prefs().map(|p| p.previews).unwrap_or(true);
        claimed
            .iter()
            .map(|c| {
                let name = self.store.conv_name(c.conv).ok().flatten();
                coalesce(c, name.as_deref(), previews)
            })
            .collect()
    }

    /// What was claimed, for the app to show (counted as shown).
    fn render(&mut self, claimed: Vec<crate::store::Claimed>) -> Vec<Notification> {
        let out = self.coalesced(claimed);
        for n in &out {
            self.shown(n);
        }
        out
    }

    /// Counts and logs a notification shown (or handed to the app to show).
    fn shown(&self, n: &Notification) {
        let _ = self.store.log_notification(n.conv, n.unread);
        self.inner
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .notified += 1;
    }

    fn show(&mut self, claimed: Vec<crate::store::Claimed>) {
        let Some(notifier) = self.notifier.clone() else {
            return;
        };
        for n in self.coalesced(claimed) {
            match notifier.notify(&n) {
                Ok(()) => self.shown(&n),
                Err(e) => {
                    tracing::warn!(target: "keepwire::notify", error = %e, "showing a notification failed")
                }
            }
        }
    }

    fn on_welcome(&mut self, w: Welcome, now: Instant) {
        {
            let mut s = self.inner.status.lock().unwrap_or_else(|p| p.into_inner());
            s.sessions += 1;
            s.plain_failures = 0;
        }
        let _ = self.store.set_meta("user", &w.user);
        let gap = w.resume.status == ResumeStatus::Gap;
        {
            let mut s = self.inner.status.lock().unwrap_or_else(|p| p.into_inner());
            s.head = Some(w.head);
            s.user = Some(w.user.clone());
        }
        // Fill what the replay will not bring.
        for hint in &w.resume.fetch {
            let due = BackfillDue {
                conv: hint.conv,
                before: hint.before,
                known: self.store.max_conv_seq(hint.conv).unwrap_or(0),
            };
            if self.core.backfill(due, now)
                && let Err(e) = self.store.store_backfill(due.conv, &[], Some(due))
            {
                tracing::warn!(target: "keepwire::client", error = %e, "recording a history fill failed");
            }
        }
        if gap {
            self.emit(ClientEvent::Gap(w.resume.clone()));
        }
        // The registration when due, and mutes not yet accepted.
        self.push_offer = Some(w.push.clone());
        self.send_push(None, now);
        self.send_mutes(None, now);
    }

    /// The relay's message log was replaced: what this device stored of the
    /// old one is forgotten (its ids mean other messages now).
    fn on_epoch_reset(&mut self, epoch: &str, reason: GapReason) {
        let r = self.store.reset_epoch(epoch).and_then(|dropped| {
            // Said loudly and kept for `status`: the user's history on this
            // device shrank without them doing anything.
            tracing::warn!(
                target: "keepwire::client",
                dropped,
                ?reason,
                "the relay's message log was replaced (restored from a backup, or reset): \
                 {dropped} messages stored on this device were forgotten, since their ids \
                 now mean other messages; history is fetched again from the relay"
            );
            let gap = serde_json::json!({
                "reason": match reason { GapReason::Epoch => "epoch", _ => "cursor_ahead" },
                "at_ms": crate::push::now_ms(),
                "dropped_messages": dropped,
            });
            self.store.set_meta("last_gap", &gap.to_string())
        });
        if let Err(e) = r {
            tracing::error!(target: "keepwire::client", error = %e, "forgetting the old epoch failed");
        }
    }

    /// A frame that answers no request: a signal, or the refusal of one.
    fn on_reply(&mut self, frame: ServerFrame) {
        if let ServerFrame::Signal { conv, from, data } = frame {
            self.emit(ClientEvent::Signal { conv, from, data });
            return;
        }
        if let ServerFrame::Error(e) = &frame {
            // A read or a signal has no answer to wait for: its refusal is
            // only logged.
            tracing::warn!(target: "keepwire::client", frame = ?e.frame, conv = ?e.conv, code = %e.code, message = %e.message, "the relay refused a frame");
            return;
        }
        // Not the frame itself: it may hold message bodies.
        tracing::debug!(target: "keepwire::client", "unsolicited reply frame");
    }

    /// Starts a sync another process on this home asked for, if there is a
    /// new request: connect now (skipping any backoff) or probe the live
    /// connection for the relay's head.
    fn pick_up_remote_sync(&mut self, now: Instant) {
        let asked = match self.store.holder_sync_asked() {
            Ok(n) if n > self.remote_seen => n,
            _ => return,
        };
        self.remote_seen = asked;
        if let Err(e) = self.store.acknowledge_holder_sync(asked) {
            tracing::warn!(target: "keepwire::client", error = %e, "taking up a sync failed");
        }
        let (sessions, heads_heard, plain_failures) = {
            let s = self.inner.status.lock().unwrap_or_else(|p| p.into_inner());
            (s.sessions, s.heads_heard, s.plain_failures)
        };
        let started_core_sync = !self.core.syncing();
        if started_core_sync {
            self.core.request_sync(now + REMOTE_SYNC_MAX, now);
        }
        self.remote = Some(RemoteSync {
            n: asked,
            sessions,
            heads_heard,
            plain_failures,
            started_core_sync,
            until: tokio::time::Instant::now() + REMOTE_SYNC_MAX,
        });
        self.flush();
    }

    /// Answers the sync another process asked for once it is done.
    fn answer_remote_sync(&mut self) {
        let Some(r) = &self.remote else {
            return;
        };
        let s = self.status_snapshot();
        let outcome = if (s.sessions > r.sessions || s.heads_heard > r.heads_heard) && s.caught_up()
        {
            "caught_up"
        } else if s.sessions == r.sessions
            && s.plain_failures > r.plain_failures
            && s.plainly_unreachable(UNREACHABLE_ROUNDS)
        {
            "unreachable"
        } else if tokio::time::Instant::now() >= r.until {
            "abandoned"
        } else {
            return;
        };
        let (n, started) = (r.n, r.started_core_sync);
        self.remote = None;
        if let Err(e) = self.store.answer_holder_sync(n, outcome) {
            tracing::warn!(target: "keepwire::client", error = %e, "answering a sync failed");
        }
        if started && !self.sync_open {
            self.core.end_sync(boot_clock());
        }
    }

    fn status_snapshot(&self) -> Status {
        self.inner
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn publish_status(&mut self) {
        let (pending, _) = self
            .store
            .outbox_counts()
            .unwrap_or((self.core.outbox_len() as u64, 0));
        let cursor = self.store.cursor().ok().flatten().map(|c| c.seq);
        {
            let mut s = self.inner.status.lock().unwrap_or_else(|p| p.into_inner());
            s.state = self.core.state();
            s.last_error = self.core.last_error().cloned();
            s.cursor = cursor;
            s.outbox = pending;
            s.holder = true;
            s.backfilling = self.core.backfilling();
            s.requests = self.push_inflight.len() + self.mute_inflight.len();
        }
        self.inner.status_changed.send_replace(());
        if self.remote.is_some() {
            self.answer_remote_sync();
        }
    }
}
