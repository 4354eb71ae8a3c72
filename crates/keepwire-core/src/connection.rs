//! The client connection state machine.

use std::collections::VecDeque;
use std::time::Duration;

use keepwire_proto::{
    ClientAction, ClientFrame, CloseCode, Confirm, ConvId, Cursor, ErrorCode, GapReason, Hello,
    HistoryRequest, InboxEntry, Message, Send, Seq, ServerFrame, Welcome, decode_server, encode,
};

use crate::backoff::{Backoff, Jitter};
use crate::requests::{Answered, BACKFILL_PAGE, BackfillDue, RequestId, Requests};
use crate::rng::SeededRng;
use keepwire_proto::Instant;

use crate::timer::{Timer, TimerTable};

/// Settings of a [`Connection`].
#[derive(Debug, Clone)]
pub struct Config {
    /// Relay URLs (`ws://` or `wss://`). The client starts at a random one and
    /// moves to the next after a failure; each keeps its own backoff.
    pub urls: Vec<String>,
    /// This device's stable id.
    pub device: String,
    /// Backoff while the app is in the foreground (default 0.5 s base, 30 s cap).
    pub backoff_foreground: Backoff,
    /// Backoff while in the background (default 0.5 s base, 5 min cap).
    pub backoff_background: Backoff,
    /// A connection up this long resets the backoff.
    pub stable_after: Duration,
    /// Opening plus handshake must finish within this.
    pub connect_timeout: Duration,
    /// Heartbeat asked for in the foreground.
    pub heartbeat_foreground: Duration,
    /// Heartbeat asked for in the background.
    pub heartbeat_background: Duration,
    /// A ping without a pong for this long means the connection is dead.
    pub pong_timeout: Duration,
    /// A send unconfirmed for this long triggers a ping probe.
    pub send_probe_after: Duration,
    /// After "going away" (1001), reconnect within a random delay up to this.
    pub going_away_jitter: Duration,
    /// Entries to replay for a device without a cursor.
    pub history: u64,
    /// Messages per history page of a backfill (the relay caps it at its
    /// `max_history_page`, 200 by default).
    pub backfill_page: u32,
    /// The credit window asked for in `hello` (the relay clamps it to its
    /// maximum, 2048 by default). Large enough that a backlog of thousands
    /// catches up in a few round trips on a slow path (a push wake-up).
    pub window: u64,
    /// Client name for the relay's logs.
    pub agent: String,
    /// What to do with the connection while the app is in the background.
    pub background_policy: BackgroundPolicy,
    /// Learn the background heartbeat per network (`None`: use
    /// `heartbeat_background` as is).
    pub adaptive_heartbeat: Option<AdaptiveHeartbeat>,
    /// How many times a process of this installation has taken the
    /// connection (persisted by the driver, one more at every start): with
    /// the transport id it makes `hello.generation`, so the relay keeps the
    /// newer of two connections of this device even when an old process's
    /// late `hello` arrives after a new one's.
    pub boot: u64,
    /// A short-lived connection that only catches up (a push wake-up in a
    /// process of its own, beside a holder that looks frozen): sent as
    /// `hello.transient`, so the relay tells the connection it displaces to
    /// come back (4012) instead of stopping it (4005).
    pub transient: bool,
}

/// Adaptive background heartbeat (WeChat-style "smart heartbeat"): start at
/// `initial`, step up by `step` after `successes` idle intervals that the
/// path kept alive, step back after a failure and stay just below it. Learnt
/// per network, because each NAT or carrier forgets idle flows at its own pace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdaptiveHeartbeat {
    /// First interval on an unknown network (default 4.5 min).
    pub initial: Duration,
    /// Step (default 1 min).
    pub step: Duration,
    /// Successes at an interval before trying a longer one (default 3).
    pub successes: u32,
    /// Shortest interval (default 1 min).
    pub min: Duration,
    /// Longest interval (default 28 min, under the relay's 30 min cap).
    pub max: Duration,
}

impl Default for AdaptiveHeartbeat {
    fn default() -> Self {
        AdaptiveHeartbeat {
            initial: Duration::from_secs(270),
            step: Duration::from_secs(60),
            successes: 3,
            min: Duration::from_secs(60),
            max: Duration::from_secs(28 * 60),
        }
    }
}

/// What was learnt about one network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Learner {
    interval: Duration,
    successes: u32,
    /// The shortest interval that failed: never probe at or above it again.
    ceiling: Option<Duration>,
}

/// What the connection does while the app is in the background (chosen by the
/// app and the user).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackgroundPolicy {
    /// Stay connected (an Android foreground service, a desktop agent), with
    /// the background heartbeat.
    KeepAlive,
    /// Stay connected this long after going to the background, then
    /// disconnect and rely on push and periodic sync.
    Linger(Duration),
    /// Disconnect at once; push wake-ups and periodic `sync_once` do the rest.
    WakeOnly,
}

/// `hello.generation`: the boot in the high bits, the transport id below
/// (below 2^53 as the protocol requires).
fn generation(boot: u64, transport: u64) -> u64 {
    const TRANSPORT_BITS: u32 = 20;
    let boot = boot.min((1 << (53 - TRANSPORT_BITS)) - 1);
    boot << TRANSPORT_BITS | transport.min((1 << TRANSPORT_BITS) - 1)
}

impl Config {
    /// Defaults for a device id and relay URLs.
    pub fn new(device: impl Into<String>, urls: Vec<String>) -> Config {
        Config {
            urls,
            device: device.into(),
            backoff_foreground: Backoff {
                base: Duration::from_millis(500),
                cap: Duration::from_secs(30),
                jitter: Jitter::Full,
            },
            backoff_background: Backoff {
                base: Duration::from_millis(500),
                cap: Duration::from_secs(300),
                jitter: Jitter::Full,
            },
            stable_after: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(15),
            heartbeat_foreground: Duration::from_secs(30),
            heartbeat_background: Duration::from_secs(270),
            pong_timeout: Duration::from_secs(10),
            send_probe_after: Duration::from_secs(3),
            going_away_jitter: Duration::from_secs(5),
            history: 100,
            backfill_page: BACKFILL_PAGE,
            window: WINDOW,
            agent: concat!("keepwire-core/", env!("CARGO_PKG_VERSION")).to_owned(),
            background_policy: BackgroundPolicy::Linger(Duration::from_secs(60)),
            adaptive_heartbeat: Some(AdaptiveHeartbeat::default()),
            boot: 0,
            transient: false,
        }
    }
}

/// What the app is doing, as the OS reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppState {
    /// Visible to the user.
    Foreground,
    /// Not visible; the process may be suspended or killed at any time.
    Background,
}

impl AppState {
    /// The stable name stores and logs record (`Foreground`, `Background`);
    /// [`AppState::from_name`] reads it back.
    pub fn name(self) -> &'static str {
        match self {
            AppState::Foreground => "Foreground",
            AppState::Background => "Background",
        }
    }

    /// The app state a [`name`](AppState::name) stands for.
    pub fn from_name(name: &str) -> Option<AppState> {
        [AppState::Foreground, AppState::Background]
            .into_iter()
            .find(|a| a.name() == name)
    }
}

/// What the OS says about the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Network {
    /// A network is up; the string identifies it (e.g. `wifi:<ssid-hash>`, `cellular`).
    Online(String),
    /// No network. The core makes no connection attempt.
    Offline,
}

/// How opening a transport failed, as classified by the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailureKind {
    /// Name resolution failed: almost always no usable network ("Failed host lookup").
    Dns,
    /// The relay refused the TCP connection.
    Refused,
    /// TLS handshake or certificate failure.
    Tls,
    /// The relay did not answer in time.
    Timeout,
    /// The HTTP upgrade got this status instead of 101.
    HttpStatus(u16),
    /// Any other I/O error.
    Io,
}

/// Input from the driver about the transport it opened for [`Transmit::Open`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportEvent {
    /// The WebSocket is open (upgrade done).
    Opened,
    /// A text frame arrived.
    Frame(String),
    /// The connection closed; the close code if a close frame arrived.
    Closed(Option<u16>),
    /// Opening failed.
    Failed(FailureKind),
}

/// Output for the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transmit {
    /// Open a WebSocket to `url` (subprotocol `keepwire.v1`); report its events with `id`.
    Open {
        /// Transport id: events about it must carry it.
        id: u64,
        /// Relay URL.
        url: String,
    },
    /// Send a text frame on transport `id`.
    Frame {
        /// Transport id.
        id: u64,
        /// JSON text.
        text: String,
    },
    /// Close transport `id` with `code` and forget it. The core ignores later
    /// events about it.
    Close {
        /// Transport id.
        id: u64,
        /// WebSocket close code.
        code: u16,
    },
}

/// Why the connection stopped for good (until the app acts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StopReason {
    /// The app closed the client.
    ClosedByApp,
    /// The token was rejected, also after one refresh.
    AuthRejected,
    /// The token was revoked.
    TokenRevoked,
    /// The device was revoked.
    DeviceRevoked,
    /// A newer connection of this device took over; reconnecting would kick it off.
    Replaced,
}

/// Connection states.
///
/// ```text
///            start()                  no network
///  Idle ─────────────► (decide) ───────────────────► WaitingForNetwork
///                         │  ▲                             │ network up
///                         │  └─────────────────────────────┘
///                         ▼
///                    Connecting ──Opened──► Handshaking ──welcome──► Connected
///                         │                      │                      │
///               failure / timeout         close / timeout      close / dead (no pong)
///                         ▼                      ▼                      ▼
///                    BackingOff ◄───────────────────────────────────────┘
///                         │ retry time, network up, foreground, resume from sleep: (decide)
///  auth close ──► RefreshingToken ──new token──► (decide) ; no token / second failure ──► Stopped
///  replaced / revoked / closed by app ──► Stopped
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// The app does not want a connection (not started).
    Idle,
    /// The OS reports no network: no attempts until it comes back.
    WaitingForNetwork,
    /// Transport opening (DNS, TCP, TLS, upgrade).
    Connecting,
    /// `hello` sent, waiting for `welcome`.
    Handshaking,
    /// Session open.
    Connected,
    /// Waiting before the next attempt.
    BackingOff,
    /// Waiting for the app's token provider.
    RefreshingToken,
    /// In the background and disconnected by the background policy: waiting
    /// for the foreground or a sync request.
    Dormant,
    /// Stopped until the app acts.
    Stopped(StopReason),
}

impl State {
    /// Every state, for [`State::from_name`].
    const ALL: [State; 13] = [
        State::Idle,
        State::WaitingForNetwork,
        State::Connecting,
        State::Handshaking,
        State::Connected,
        State::BackingOff,
        State::RefreshingToken,
        State::Dormant,
        State::Stopped(StopReason::ClosedByApp),
        State::Stopped(StopReason::AuthRejected),
        State::Stopped(StopReason::TokenRevoked),
        State::Stopped(StopReason::DeviceRevoked),
        State::Stopped(StopReason::Replaced),
    ];

    /// The stable name stores, logs and the agent record (`Connected`,
    /// `Stopped(TokenRevoked)`, ...); [`State::from_name`] reads it back.
    pub fn name(self) -> &'static str {
        match self {
            State::Idle => "Idle",
            State::WaitingForNetwork => "WaitingForNetwork",
            State::Connecting => "Connecting",
            State::Handshaking => "Handshaking",
            State::Connected => "Connected",
            State::BackingOff => "BackingOff",
            State::RefreshingToken => "RefreshingToken",
            State::Dormant => "Dormant",
            State::Stopped(StopReason::ClosedByApp) => "Stopped(ClosedByApp)",
            State::Stopped(StopReason::AuthRejected) => "Stopped(AuthRejected)",
            State::Stopped(StopReason::TokenRevoked) => "Stopped(TokenRevoked)",
            State::Stopped(StopReason::DeviceRevoked) => "Stopped(DeviceRevoked)",
            State::Stopped(StopReason::Replaced) => "Stopped(Replaced)",
        }
    }

    /// The state a [`name`](State::name) stands for (`None` for anything
    /// else, e.g. a name written by an older version).
    pub fn from_name(name: &str) -> Option<State> {
        State::ALL.into_iter().find(|s| s.name() == name)
    }
}

/// The last connection problem, classified for the app.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionError {
    /// Name resolution failed: reported as "no network", not as a relay fault.
    NoNetwork,
    /// Connection refused.
    Refused,
    /// TLS failure.
    Tls,
    /// Opening or the handshake timed out.
    Timeout,
    /// The upgrade got an HTTP status.
    HttpStatus(u16),
    /// Other I/O failure, or the connection dropped without a close frame.
    Io,
    /// The relay closed with this code.
    Closed(u16),
    /// No pong in time: the connection was dead.
    HeartbeatTimeout,
    /// The relay sent something this client cannot accept.
    Protocol(String),
}

/// A send waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxItem {
    /// Client id (128 random bits, hex), kept with the item across restarts.
    pub cid: String,
    /// Conversation.
    pub conv: u64,
    /// Message kind.
    pub kind: String,
    /// Body.
    pub body: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SendStatus {
    NotSent,
    InFlight(Instant),
}

#[derive(Debug)]
struct Pending {
    item: OutboxItem,
    status: SendStatus,
}

/// Output events for the driver and the app.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// The state changed.
    StateChanged(State),
    /// A session opened. On a gap the driver calls [`Connection::backfill`]
    /// for each of `resume.fetch` with what it holds of the conversation.
    Welcome(Box<Welcome>),
    /// Inbox entries, contiguous and in order. Persist them (with the cursor,
    /// in one transaction), then call [`Connection::handle_persisted`].
    Entries(Vec<InboxEntry>),
    /// A send was confirmed by the relay.
    SendConfirmed(Confirm),
    /// A send was refused for good; it left the outbox.
    SendFailed {
        /// Its client id.
        cid: String,
        /// Why.
        code: ErrorCode,
        /// Detail.
        message: String,
    },
    /// The answer to [`Connection::send_request`]'s request `request`: its
    /// answer frame or the `error` frame that refused it.
    Answer {
        /// The request.
        request: RequestId,
        /// The answer.
        frame: Box<ServerFrame>,
    },
    /// The session ended before request `request` was answered: it may or
    /// may not have been carried out (ask again on the next session).
    Unanswered(RequestId),
    /// A page of [`Connection::backfill`]: older messages of `conv` the
    /// device missed (only those above what it holds). Store them as
    /// history (they do not notify), together with `due`.
    History {
        /// The conversation.
        conv: ConvId,
        /// In ascending `conv_seq`; may be empty.
        messages: Vec<Message>,
        /// What is left of the fill (`None`: done). Persist it with the
        /// messages, and give it back to [`Connection::backfill`] after a
        /// restart.
        due: Option<BackfillDue>,
    },
    /// The relay's message log was replaced (`epoch`: restored from a
    /// backup; `cursor_ahead`: reset): forget every inbox entry and message
    /// stored under the old epoch; they mean other messages now. Comes
    /// before the [`Event::CursorReset`] and [`Event::Welcome`] of `epoch`.
    EpochReset {
        /// The new epoch.
        epoch: String,
        /// Why.
        reason: GapReason,
    },
    /// Store this as the resume cursor (no entries come with it): a device
    /// without one starts where the relay starts it, and after a retention
    /// gap it resumes past what is gone.
    CursorReset(Cursor),
    /// A frame that answers no request: a signal, or an `error` about a
    /// frame without a `rid` (`read`, `signal`).
    Reply(Box<ServerFrame>),
    /// The token was rejected or expired: call [`Connection::handle_token`] with
    /// a fresh one from the app (once), or `None`.
    TokenNeeded,
    /// A connection attempt or connection failed.
    Error(ConnectionError),
    /// The relay's inbox head for this user, from a pong: caught up once the
    /// cursor reaches it.
    RelayHead(Seq),
    /// The background heartbeat learnt for a network changed (persist it and
    /// give it back with [`Connection::set_learned_heartbeat`] after a restart).
    HeartbeatLearned {
        /// The network (as given in [`Network::Online`]).
        network: String,
        /// The interval now in use there.
        interval: Duration,
        /// Whether it failed above this (it will not probe higher).
        settled: bool,
    },
    /// A heartbeat interval was tested: kept alive (`ok`) or the path dropped
    /// the idle connection (for analytics).
    HeartbeatProbed {
        /// The network.
        network: String,
        /// The interval tested.
        interval: Duration,
        /// Whether the connection survived it.
        ok: bool,
    },
}

/// The request could not be sent: not connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotConnected;

/// Why [`Connection::send_request`] did not send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestError {
    /// No session is open.
    NotConnected,
    /// The frame has no `rid`, so nothing can answer it (use
    /// [`Connection::send_read`] or [`Connection::send_signal`]).
    NotARequest,
}

impl From<NotConnected> for RequestError {
    fn from(_: NotConnected) -> Self {
        RequestError::NotConnected
    }
}

#[derive(Debug)]
struct Transport {
    id: u64,
    url_index: usize,
    started: Instant,
    session: Option<Session>,
}

#[derive(Debug)]
struct Session {
    epoch: String,
    since: Instant,
    heartbeat: Duration,
    max_unconfirmed: usize,
    /// Next inbox sequence expected.
    expected: Seq,
    /// Highest sequence acknowledged to the relay.
    acked: Seq,
    /// Highest sequence stored (acknowledged when [`Timer::Ack`] fires at
    /// the latest).
    persisted: Seq,
    /// The outstanding ping was sent after a full idle interval (it tests
    /// the heartbeat), not as a probe.
    scheduled_ping: bool,
    /// The heartbeat we asked for last (to renegotiate on app state changes).
    requested_heartbeat: Duration,
}

/// Entries stored before the relay is told at once (PROTOCOL.md §4).
pub const ACK_EVERY: Seq = 64;
/// The longest a stored entry waits to be acknowledged.
pub const ACK_DELAY: Duration = Duration::from_millis(100);
/// The credit window asked for by default: 10,000 waiting entries arrive in
/// 5 round trips instead of the relay's default 512's 20 (PROTOCOL.md §4).
pub const WINDOW: u64 = 2048;

/// The sans-IO client connection (quinn-proto style).
///
/// Inputs are `handle_*` methods and [`Connection::queue_send`]; outputs are
/// drained with [`poll_transmit`](Connection::poll_transmit),
/// [`poll_event`](Connection::poll_event), and the driver re-arms one timer
/// from [`poll_timeout`](Connection::poll_timeout), calling
/// [`handle_timeout`](Connection::handle_timeout) when it fires (spurious
/// calls are harmless). After every input, drain transmits and events.
///
/// Invariants: at most one transport is open; no attempt while the OS reports
/// no network; the delay between attempts never exceeds the backoff cap; the
/// cursor only moves over entries the driver reported persisted.
#[derive(Debug)]
pub struct Connection {
    cfg: Config,
    rng: SeededRng,
    state: State,
    token: String,
    /// A token refresh was used since the last successful welcome.
    refreshed: bool,
    /// The relay revoked the token (4003) before the refresh now asked for:
    /// with no new token the client stops as revoked, not as rejected.
    revoked_before_refresh: bool,
    wanted: bool,
    app: AppState,
    network: Network,
    cursor: Option<Cursor>,
    transport: Option<Transport>,
    next_transport_id: u64,
    url_index: usize,
    attempts: Vec<u32>,
    /// Every deadline (see [`Timer`]).
    timers: TimerTable,
    /// The background policy has disconnected (until foreground or a sync).
    dormant: bool,
    /// Learnt background heartbeats per network id.
    learned: std::collections::HashMap<String, Learner>,
    outbox: VecDeque<Pending>,
    /// Requests in flight on the session (the app's and the backfill's).
    requests: Requests,
    entries: Vec<InboxEntry>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    last_error: Option<ConnectionError>,
}

impl Connection {
    /// A new, idle connection. `cursor` is the stored resume position (if any),
    /// `seed` feeds the jitter.
    pub fn new(
        cfg: Config,
        token: String,
        cursor: Option<Cursor>,
        seed: u64,
        _now: Instant,
    ) -> Self {
        let mut rng = SeededRng::new(seed);
        let n = cfg.urls.len().max(1);
        let url_index = rng.below(n as u64) as usize;
        Connection {
            attempts: vec![0; n],
            cfg,
            rng,
            state: State::Idle,
            token,
            refreshed: false,
            revoked_before_refresh: false,
            wanted: false,
            app: AppState::Foreground,
            network: Network::Online("unknown".into()),
            cursor,
            transport: None,
            next_transport_id: 1,
            url_index,
            timers: TimerTable::default(),
            dormant: false,
            learned: std::collections::HashMap::new(),
            outbox: VecDeque::new(),
            requests: Requests::default(),
            entries: Vec::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            last_error: None,
        }
    }

    // ----- accessors -------------------------------------------------------

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// The last connection problem, if any since the last session opened.
    pub fn last_error(&self) -> Option<&ConnectionError> {
        self.last_error.as_ref()
    }

    /// The resume cursor (moves when the driver reports entries persisted).
    pub fn cursor(&self) -> Option<&Cursor> {
        self.cursor.as_ref()
    }

    /// The relay epoch the device's data belongs to: the open session's, or
    /// the stored cursor's.
    pub fn epoch(&self) -> Option<&str> {
        self.transport
            .as_ref()
            .and_then(|t| t.session.as_ref())
            .map(|s| s.epoch.as_str())
            .or(self.cursor.as_ref().map(|c| c.epoch.as_str()))
    }

    /// Sends not yet confirmed.
    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    /// Whether `cid` is in the outbox.
    pub fn has_pending(&self, cid: &str) -> bool {
        self.outbox.iter().any(|p| p.item.cid == cid)
    }

    /// The current app state.
    pub fn app_state(&self) -> AppState {
        self.app
    }

    /// The current network.
    pub fn network(&self) -> &Network {
        &self.network
    }

    /// Whether a transport is open or opening (for invariant checks).
    pub fn transport_open(&self) -> bool {
        self.transport.is_some()
    }

    /// The scheduled retry time while backing off.
    pub fn retry_at(&self) -> Option<Instant> {
        self.timers.get(Timer::Retry)
    }

    /// The backoff in force for the current app state.
    pub fn backoff(&self) -> Backoff {
        match self.app {
            AppState::Foreground => self.cfg.backoff_foreground,
            AppState::Background => self.cfg.backoff_background,
        }
    }

    // ----- inputs ----------------------------------------------------------

    /// The app wants to be connected.
    pub fn start(&mut self, now: Instant) {
        if matches!(self.state, State::Stopped(_)) {
            self.refreshed = false;
        }
        self.wanted = true;
        self.timers.stop(Timer::Retry);
        self.set_state(State::Idle);
        self.drive(now);
    }

    /// The app closes the client: close the transport, stop.
    pub fn close(&mut self, now: Instant) {
        self.wanted = false;
        self.drop_transport(CloseCode::Normal.code());
        self.set_state(State::Stopped(StopReason::ClosedByApp));
        self.drive(now);
    }

    /// The app moved to the foreground or background.
    pub fn handle_app_state(&mut self, app: AppState, now: Instant) {
        if app == self.app {
            return;
        }
        self.app = app;
        match app {
            AppState::Foreground => {
                // The user is looking: connect now, skip any backoff wait,
                // probe an open socket.
                self.dormant = false;
                self.timers.stop(Timer::Linger);
                self.timers.stop(Timer::Retry);
                self.probe(now);
            }
            AppState::Background => match self.cfg.background_policy {
                BackgroundPolicy::KeepAlive => {}
                BackgroundPolicy::Linger(d) => self.timers.set(Timer::Linger, now + d),
                BackgroundPolicy::WakeOnly => self.dormant = true,
            },
        }
        self.renegotiate_heartbeat(now);
        self.drive(now);
    }

    /// The OS reported a network change.
    pub fn handle_network(&mut self, network: Network, now: Instant) {
        if network == self.network {
            return;
        }
        let was_online = self.network != Network::Offline;
        self.network = network;
        match &self.network {
            Network::Offline => {
                // The OS is authoritative about "no network": drop the socket
                // rather than wait for heartbeats to find it dead.
                self.drop_transport(CloseCode::GoingAway.code());
                self.timers.stop(Timer::Retry);
            }
            Network::Online(_) => {
                // Back, or a different network: try at once. An open socket
                // may be on the old interface: probe it.
                self.timers.stop(Timer::Retry);
                if was_online {
                    self.probe(now);
                }
                // Each network has its own learnt heartbeat.
                self.renegotiate_heartbeat(now);
            }
        }
        self.drive(now);
    }

    /// The device woke from sleep (suspend/resume). A socket from before the
    /// sleep has most likely died with it (the relay and every NAT on the
    /// path gave up on it meanwhile), and finding that out by a ping would
    /// take a pong timeout: drop it and connect again at once, skipping any
    /// backoff wait, with the backoff started over (a wake is a fresh start;
    /// the first attempts often fail while the network comes back, and those
    /// retries must be short). The dropped socket teaches the heartbeat
    /// learner nothing: the network did not lose it, the sleep did. Nothing
    /// connects while the OS reports no network, while dormant, or stopped.
    pub fn handle_resume(&mut self, now: Instant) {
        if matches!(self.state, State::Stopped(_) | State::RefreshingToken) || !self.wanted {
            return;
        }
        self.drop_transport(CloseCode::GoingAway.code());
        self.timers.stop(Timer::Retry);
        self.attempts.iter_mut().for_each(|a| *a = 0);
        self.drive(now);
    }

    /// Connect for a bounded sync even while dormant (a periodic task or a
    /// push wake-up), skipping any backoff wait, until `deadline` or
    /// [`Connection::end_sync`].
    pub fn request_sync(&mut self, deadline: Instant, now: Instant) {
        self.timers.set(Timer::Sync, deadline);
        self.timers.stop(Timer::Retry);
        // Already connected: a pong tells the relay's current head.
        self.probe(now);
        self.drive(now);
    }

    /// The sync is done (or abandoned): a dormant connection disconnects.
    pub fn end_sync(&mut self, now: Instant) {
        self.timers.stop(Timer::Sync);
        self.drive(now);
    }

    /// Whether a sync is in progress.
    pub fn syncing(&self) -> bool {
        self.timers.is_set(Timer::Sync)
    }

    /// The app's token provider answered a [`Event::TokenNeeded`].
    pub fn handle_token(&mut self, token: Option<String>, now: Instant) {
        match token {
            Some(t) if self.state == State::RefreshingToken => {
                self.token = t;
                self.refreshed = true;
                self.timers.stop(Timer::Retry);
                self.set_state(State::Idle);
                self.drive(now);
            }
            Some(t) => self.token = t,
            None if self.state == State::RefreshingToken => {
                let reason = if self.revoked_before_refresh {
                    StopReason::TokenRevoked
                } else {
                    StopReason::AuthRejected
                };
                self.set_state(State::Stopped(reason));
            }
            None => {}
        }
    }

    /// The driver persisted every entry up to `seq` (and the cursor with
    /// them). The relay hears of it (PROTOCOL.md §4) after [`ACK_EVERY`]
    /// entries, or [`ACK_DELAY`] after the first one not yet acknowledged,
    /// whichever comes first: while entries flow that is one ack per 64 of
    /// them, and when they stop the position is known within 100 ms.
    pub fn handle_persisted(&mut self, seq: Seq, now: Instant) {
        let Some(t) = &mut self.transport else { return };
        let Some(s) = &mut t.session else { return };
        if seq <= s.persisted || seq >= s.expected {
            return;
        }
        s.persisted = seq;
        self.cursor = Some(Cursor {
            epoch: s.epoch.clone(),
            seq,
        });
        if seq - s.acked >= ACK_EVERY {
            self.send_ack();
        } else if !self.timers.is_set(Timer::Ack) {
            self.timers.set(Timer::Ack, now + ACK_DELAY);
        }
    }

    /// Acknowledges the stored position now.
    fn send_ack(&mut self) {
        let Some(t) = &mut self.transport else { return };
        let id = t.id;
        let Some(s) = &mut t.session else { return };
        self.timers.stop(Timer::Ack);
        if s.persisted <= s.acked {
            return;
        }
        s.acked = s.persisted;
        self.transmits.push_back(Transmit::Frame {
            id,
            text: encode(&ClientFrame::Ack { seq: s.acked }),
        });
    }

    /// Adds a send (already durable in the driver's outbox) to the queue.
    pub fn queue_send(&mut self, item: OutboxItem, now: Instant) {
        if self.has_pending(&item.cid) {
            return;
        }
        self.outbox.push_back(Pending {
            item,
            status: SendStatus::NotSent,
        });
        self.pump_outbox(now);
    }

    /// Sends an app request (a frame with a `rid`: history, conversation
    /// operations, push registration, mute). The connection names it (any
    /// `rid` given is replaced); its answer comes back as [`Event::Answer`]
    /// with the returned id, or [`Event::Unanswered`] if the session ends
    /// first. A frame without a `rid` is refused as [`NotARequest`].
    pub fn send_request(
        &mut self,
        mut frame: ClientFrame,
        _now: Instant,
    ) -> Result<RequestId, RequestError> {
        let (id, rid) = self.requests.name();
        *frame.rid_mut().ok_or(RequestError::NotARequest)? = rid.clone();
        self.send_in_session(&frame)?;
        self.requests.sent(rid, id);
        Ok(id)
    }

    /// Marks a conversation read up to `up_to` on the relay (PROTOCOL.md §7;
    /// no answer, a refusal comes as an [`Event::Reply`] error).
    pub fn send_read(
        &mut self,
        conv: ConvId,
        up_to: Seq,
        _now: Instant,
    ) -> Result<(), NotConnected> {
        self.send_in_session(&ClientFrame::Read { conv, up_to })
    }

    /// Relays a signal to the conversation's connected members (PROTOCOL.md
    /// §8; no answer, a refusal comes as an [`Event::Reply`] error).
    pub fn send_signal(
        &mut self,
        conv: ConvId,
        data: serde_json::Value,
        _now: Instant,
    ) -> Result<(), NotConnected> {
        self.send_in_session(&ClientFrame::Signal { conv, data })
    }

    /// Fills what a `gap` or `new` resume's replay will not bring
    /// (PROTOCOL.md §3): pages the conversation's history below `before`
    /// down to `known` (the highest `conv_seq` the device holds), reporting
    /// each page as [`Event::History`]. Nothing to do when the device misses
    /// nothing or the conversation's fill is under way. A fill outlives the
    /// session (it goes on after the next welcome); after a restart, give the
    /// last [`BackfillDue`] reported back here. Returns whether the fill was
    /// taken up (persist it then).
    pub fn backfill(&mut self, due: BackfillDue, _now: Instant) -> bool {
        let added = self.requests.add_backfill(due);
        if added {
            self.send_backfill_pages();
        }
        added
    }

    /// Conversations whose backfill is not done.
    pub fn backfilling(&self) -> usize {
        self.requests.backfilling()
    }

    /// Sends the due backfill pages that have none in flight (in a session).
    fn send_backfill_pages(&mut self) {
        if self.transport.as_ref().is_none_or(|t| t.session.is_none()) {
            return;
        }
        for (rid, due) in self.requests.backfill_pages() {
            let frame = ClientFrame::History(HistoryRequest {
                rid: rid.clone(),
                conv: due.conv,
                before: Some(due.before),
                limit: Some(self.cfg.backfill_page),
            });
            if self.send_in_session(&frame).is_err() {
                self.requests.unsent(&rid);
            }
        }
    }

    /// Sends a frame on the open session.
    fn send_in_session(&mut self, frame: &ClientFrame) -> Result<(), NotConnected> {
        match &self.transport {
            Some(Transport {
                id,
                session: Some(_),
                ..
            }) => {
                self.transmits.push_back(Transmit::Frame {
                    id: *id,
                    text: encode(frame),
                });
                Ok(())
            }
            _ => Err(NotConnected),
        }
    }

    /// The answer to a request of this session, if `frame` is one: the app's
    /// is reported, a backfill page is handed over and the next one asked.
    fn handle_answer(&mut self, frame: ServerFrame) {
        match self.requests.answer(&frame) {
            Some(Answered::App(request)) => self.events.push_back(Event::Answer {
                request,
                frame: Box::new(frame),
            }),
            Some(Answered::Backfill {
                conv,
                messages,
                due,
            }) => {
                self.events.push_back(Event::History {
                    conv,
                    messages,
                    due,
                });
                self.send_backfill_pages();
            }
            None => self.events.push_back(Event::Reply(Box::new(frame))),
        }
    }

    /// An event about transport `id`. Events about older transports are ignored.
    pub fn handle_transport(&mut self, id: u64, event: TransportEvent, now: Instant) {
        if self.transport.as_ref().map(|t| t.id) != Some(id) {
            return;
        }
        match event {
            TransportEvent::Opened => {
                if self.state == State::Connecting {
                    let hello = ClientFrame::Hello(Hello {
                        token: self.token.clone(),
                        device: self.cfg.device.clone(),
                        cursor: self.cursor.clone(),
                        heartbeat_ms: Some(self.wanted_heartbeat().as_millis() as u64),
                        history: Some(self.cfg.history),
                        agent: Some(self.cfg.agent.clone()),
                        generation: Some(generation(self.cfg.boot, id)),
                        transient: self.cfg.transient,
                        window: Some(self.cfg.window),
                    });
                    self.transmits.push_back(Transmit::Frame {
                        id,
                        text: encode(&hello),
                    });
                    self.set_state(State::Handshaking);
                }
            }
            TransportEvent::Frame(text) => self.handle_frame(&text, now),
            TransportEvent::Closed(code) => {
                let error = match code {
                    Some(c) => ConnectionError::Closed(c),
                    None => ConnectionError::Io,
                };
                self.transport_lost(code, error, now);
            }
            TransportEvent::Failed(kind) => {
                let error = match kind {
                    FailureKind::Dns => ConnectionError::NoNetwork,
                    FailureKind::Refused => ConnectionError::Refused,
                    FailureKind::Tls => ConnectionError::Tls,
                    FailureKind::Timeout => ConnectionError::Timeout,
                    FailureKind::HttpStatus(s) => ConnectionError::HttpStatus(s),
                    FailureKind::Io => ConnectionError::Io,
                };
                self.transport_lost(None, error, now);
            }
        }
    }

    /// A timer fired. Spurious calls are no-ops.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.timers.is_due(Timer::Ack, now) {
            self.send_ack();
        }
        if let Some(t) = &self.transport {
            match &t.session {
                None if now >= t.started + self.cfg.connect_timeout => {
                    let id = t.id;
                    self.transmits.push_back(Transmit::Close {
                        id,
                        code: CloseCode::Normal.code(),
                    });
                    self.transport_lost(None, ConnectionError::Timeout, now);
                }
                None => {}
                Some(_) => {
                    if self.timers.is_due(Timer::Pong, now) {
                        let id = t.id;
                        self.transmits.push_back(Transmit::Close {
                            id,
                            code: CloseCode::Normal.code(),
                        });
                        self.heartbeat_result(false, now);
                        self.transport_lost(None, ConnectionError::HeartbeatTimeout, now);
                    } else if self.timers.is_due(Timer::Ping, now) {
                        self.ping(now, true);
                    } else if self.send_probe_due(now) {
                        self.ping(now, false);
                    }
                }
            }
        }
        if self.timers.is_due(Timer::SendPause, now) {
            self.timers.stop(Timer::SendPause);
            self.pump_outbox(now);
        }
        if self.timers.is_due(Timer::Linger, now) {
            self.timers.stop(Timer::Linger);
            if self.app == AppState::Background {
                self.dormant = true;
            }
        }
        if self.timers.is_due(Timer::Sync, now) {
            self.timers.stop(Timer::Sync);
        }
        self.drive(now);
    }

    // ----- outputs ---------------------------------------------------------

    /// The next thing to send or do on the network.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event. Entries received since the last call come as one batch.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        if let Some(e) = self.events.pop_front() {
            return Some(e);
        }
        if !self.entries.is_empty() {
            return Some(Event::Entries(std::mem::take(&mut self.entries)));
        }
        None
    }

    /// When [`Connection::handle_timeout`] should next be called.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        // The table, plus two deadlines computed from other state: the
        // connect timeout of an opening transport, and the probe ping of a
        // send waiting too long for its confirmation.
        let mut t = self.timers.next();
        let mut consider = |x: Option<Instant>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        if let Some(tr) = &self.transport {
            match &tr.session {
                None => consider(Some(tr.started + self.cfg.connect_timeout)),
                Some(_) if !self.timers.is_set(Timer::Pong) => consider(
                    self.oldest_in_flight()
                        .map(|t| t + self.cfg.send_probe_after),
                ),
                Some(_) => {}
            }
        }
        t
    }

    // ----- internals -------------------------------------------------------

    fn set_state(&mut self, s: State) {
        if self.state != s {
            self.state = s;
            self.events.push_back(Event::StateChanged(s));
        }
    }

    fn wanted_heartbeat(&self) -> Duration {
        match self.app {
            AppState::Foreground => self.cfg.heartbeat_foreground,
            AppState::Background => self.background_heartbeat(),
        }
    }

    /// Opens a transport if the app wants one, the network allows it and no
    /// backoff is pending; otherwise settles the state.
    fn drive(&mut self, now: Instant) {
        if matches!(self.state, State::Stopped(_) | State::RefreshingToken) {
            return;
        }
        if !self.wanted {
            self.drop_transport(CloseCode::Normal.code());
            self.set_state(State::Idle);
            return;
        }
        if self.dormant && !self.timers.is_set(Timer::Sync) {
            self.drop_transport(CloseCode::Normal.code());
            self.timers.stop(Timer::Retry);
            self.set_state(State::Dormant);
            return;
        }
        if self.network == Network::Offline {
            self.set_state(State::WaitingForNetwork);
            return;
        }
        if self.transport.is_some() {
            return;
        }
        if let Some(at) = self.timers.get(Timer::Retry) {
            if now < at {
                self.set_state(State::BackingOff);
                return;
            }
            self.timers.stop(Timer::Retry);
        }
        let id = self.next_transport_id;
        self.next_transport_id += 1;
        let url = self
            .cfg
            .urls
            .get(self.url_index)
            .cloned()
            .unwrap_or_default();
        self.timers.stop(Timer::Retry);
        self.transport = Some(Transport {
            id,
            url_index: self.url_index,
            started: now,
            session: None,
        });
        self.transmits.push_back(Transmit::Open { id, url });
        self.set_state(State::Connecting);
    }

    fn drop_transport(&mut self, code: u16) {
        // A deliberate close tells the relay what is stored first (a woken
        // device that disconnects would otherwise look unwoken).
        self.send_ack();
        if let Some(t) = self.transport.take() {
            self.transmits.push_back(Transmit::Close { id: t.id, code });
            self.end_session();
        }
    }

    /// The transport is gone: its session's timers end, sends in flight
    /// go again on the next session, and requests in flight are reported
    /// unanswered (they may or may not have been carried out).
    fn end_session(&mut self) {
        for t in Timer::SESSION {
            self.timers.stop(t);
        }
        self.requeue_in_flight();
        for id in self.requests.end_session() {
            self.events.push_back(Event::Unanswered(id));
        }
    }

    fn requeue_in_flight(&mut self) {
        for p in &mut self.outbox {
            p.status = SendStatus::NotSent;
        }
        // Entries received but not yet handed out are still valid data; keep them.
    }

    /// The transport is gone: decide what next from the close code.
    fn transport_lost(&mut self, code: Option<u16>, error: ConnectionError, now: Instant) {
        let Some(t) = self.transport.take() else {
            return;
        };
        self.end_session();
        self.last_error = Some(error.clone());
        self.events.push_back(Event::Error(error));
        let n = self.cfg.urls.len().max(1);
        let idx = t.url_index;
        if let Some(s) = &t.session
            && now.saturating_duration_since(s.since) >= self.cfg.stable_after
        {
            self.attempts[idx] = 0;
        }
        let action = code.and_then(CloseCode::from_code);
        let auth_close = matches!(
            action,
            Some(CloseCode::AuthFailed | CloseCode::TokenExpired | CloseCode::TokenRevoked)
        );
        if auth_close {
            if self.refreshed {
                let reason = if action == Some(CloseCode::TokenRevoked) {
                    StopReason::TokenRevoked
                } else {
                    StopReason::AuthRejected
                };
                self.set_state(State::Stopped(reason));
            } else {
                self.revoked_before_refresh = action == Some(CloseCode::TokenRevoked);
                self.set_state(State::RefreshingToken);
                self.events.push_back(Event::TokenNeeded);
            }
            return;
        }
        match action.map(CloseCode::client_action) {
            Some(ClientAction::Stop) => {
                let reason = match action {
                    Some(CloseCode::Replaced) => StopReason::Replaced,
                    Some(CloseCode::DeviceRevoked) => StopReason::DeviceRevoked,
                    _ => StopReason::AuthRejected,
                };
                self.set_state(State::Stopped(reason));
                return;
            }
            Some(ClientAction::ReconnectNow) => self.timers.stop(Timer::Retry),
            Some(ClientAction::ReconnectSoon) => {
                let d = self.rng.duration_up_to(self.cfg.going_away_jitter);
                self.timers.set(Timer::Retry, now + d);
            }
            _ => {
                let mut backoff = self.backoff();
                if action == Some(CloseCode::TooManyConnections) {
                    backoff = self.cfg.backoff_background;
                }
                self.attempts[idx] = self.attempts[idx].saturating_add(1);
                // Move to the next relay; wait according to its own failures.
                self.url_index = (idx + 1) % n;
                let attempt = self.attempts[self.url_index].saturating_sub(1);
                let d = backoff.delay(attempt, &mut self.rng);
                self.timers.set(Timer::Retry, now + d);
            }
        }
        self.set_state(State::BackingOff);
        self.drive(now);
    }

    fn handle_frame(&mut self, text: &str, now: Instant) {
        let frame = match decode_server(text) {
            Ok(f) => f,
            Err(e) => {
                // Frame types from a newer relay are skipped.
                if keepwire_proto::is_unknown_server_type(text) {
                    return;
                }
                self.protocol_error(format!("undecodable frame: {e}"), now);
                return;
            }
        };
        let wanted_heartbeat = self.wanted_heartbeat();
        let Some(t) = &mut self.transport else { return };
        if let Some(s) = &mut t.session {
            // Traffic from the relay proves the path: the next ping waits a
            // full interval of silence.
            self.timers.set(Timer::Ping, now + s.heartbeat);
        }
        match frame {
            ServerFrame::Welcome(w) => {
                if t.session.is_some() {
                    self.protocol_error("second welcome".into(), now);
                    return;
                }
                let from = w.resume.from;
                if from == 0 || from > keepwire_proto::MAX_INT || w.head > keepwire_proto::MAX_INT {
                    self.protocol_error("welcome with sequence numbers out of range".into(), now);
                    return;
                }
                // The epoch comes back in every hello's cursor: one the relay
                // would refuse there would lock this client out.
                if !keepwire_proto::is_valid_epoch(&w.epoch) {
                    self.protocol_error("welcome with an invalid epoch".into(), now);
                    return;
                }
                // A relay's heartbeat is at most 30 minutes; never trust more than a day.
                let heartbeat = Duration::from_millis(w.heartbeat_ms.clamp(1, 86_400_000));
                t.session = Some(Session {
                    epoch: w.epoch.clone(),
                    since: now,
                    heartbeat,
                    max_unconfirmed: usize::try_from(w.limits.max_unconfirmed)
                        .unwrap_or(64)
                        .max(1),
                    expected: from,
                    acked: from.saturating_sub(1),
                    persisted: from.saturating_sub(1),

                    scheduled_ping: false,
                    requested_heartbeat: wanted_heartbeat,
                });
                self.timers.set(Timer::Ping, now + heartbeat);
                self.timers.stop(Timer::Pong);
                self.timers.stop(Timer::Ack);
                if let Some(reason @ (GapReason::Epoch | GapReason::CursorAhead)) = w.resume.reason
                {
                    // The relay's log was replaced: what the device stored
                    // of the old one means other messages now.
                    self.cursor = None;
                    self.requests.clear_backfills();
                    self.events.push_back(Event::EpochReset {
                        epoch: w.epoch.clone(),
                        reason,
                    });
                }
                // A device without a cursor (new, or just reset) starts where
                // the relay starts it, even if nothing arrives in this
                // session; after a retention gap it resumes past what is gone.
                if self.cursor.is_none() || w.resume.reason == Some(GapReason::Retention) {
                    let cursor = Cursor {
                        epoch: w.epoch.clone(),
                        seq: from.saturating_sub(1),
                    };
                    self.cursor = Some(cursor.clone());
                    self.events.push_back(Event::CursorReset(cursor));
                }
                self.refreshed = false;
                self.last_error = None;
                self.set_state(State::Connected);
                self.events.push_back(Event::Welcome(Box::new(w)));
                self.pump_outbox(now);
                // Fills cut short by the previous session's end go on.
                self.send_backfill_pages();
            }
            ServerFrame::Entry(e) => {
                let Some(s) = &mut t.session else {
                    self.protocol_error("entry before welcome".into(), now);
                    return;
                };
                if e.seq != s.expected {
                    let msg = format!("entry {} out of sequence (expected {})", e.seq, s.expected);
                    self.protocol_error(msg, now);
                    return;
                }
                s.expected = s.expected.saturating_add(1);
                self.entries.push(e);
            }
            ServerFrame::Confirm(c) => {
                if let Some(i) = self.outbox.iter().position(|p| p.item.cid == c.cid) {
                    self.outbox.remove(i);
                }
                self.events.push_back(Event::SendConfirmed(c));
                self.pump_outbox(now);
            }
            ServerFrame::Rejected(r) => {
                let Some(i) = self.outbox.iter().position(|p| p.item.cid == r.cid) else {
                    return;
                };
                if r.code.is_temporary() {
                    // Resend from this one, in order, after the wait (the relay
                    // holds back everything behind it until then).
                    let wait = Duration::from_millis(r.retry_after_ms.unwrap_or(1000));
                    for p in self.outbox.iter_mut().skip(i) {
                        p.status = SendStatus::NotSent;
                    }
                    let until = now + wait;
                    let until = self
                        .timers
                        .get(Timer::SendPause)
                        .map_or(until, |u| u.max(until));
                    self.timers.set(Timer::SendPause, until);
                } else {
                    self.outbox.remove(i);
                    self.events.push_back(Event::SendFailed {
                        cid: r.cid,
                        code: r.code,
                        message: r.message,
                    });
                    self.pump_outbox(now);
                }
            }
            ServerFrame::Pong { head } => {
                if let Some(h) = head {
                    self.events.push_back(Event::RelayHead(h));
                }
                let mut tested = false;
                if let Some(s) = &mut t.session {
                    self.timers.stop(Timer::Pong);
                    tested = std::mem::take(&mut s.scheduled_ping);
                }
                if tested {
                    self.heartbeat_result(true, now);
                }
            }
            ServerFrame::HeartbeatSet { heartbeat_ms, .. } => {
                if let Some(s) = &mut t.session {
                    s.heartbeat = Duration::from_millis(heartbeat_ms.max(1));
                    self.timers.set(Timer::Ping, now + s.heartbeat);
                }
            }
            other => self.handle_answer(other),
        }
    }

    fn protocol_error(&mut self, msg: String, now: Instant) {
        if let Some(t) = &self.transport {
            let id = t.id;
            self.transmits.push_back(Transmit::Close { id, code: 1002 });
            self.transport_lost(None, ConnectionError::Protocol(msg), now);
        }
    }

    fn oldest_in_flight(&self) -> Option<Instant> {
        self.outbox
            .iter()
            .filter_map(|p| match p.status {
                SendStatus::InFlight(t) => Some(t),
                SendStatus::NotSent => None,
            })
            .min()
    }

    fn send_probe_due(&self, now: Instant) -> bool {
        self.oldest_in_flight()
            .is_some_and(|t| now >= t + self.cfg.send_probe_after)
    }

    /// Sends a ping now unless one is outstanding. `scheduled`: after a full
    /// idle heartbeat interval (it tests the interval).
    fn ping(&mut self, now: Instant, scheduled: bool) {
        let pong_timeout = self.cfg.pong_timeout;
        let Some(t) = &mut self.transport else { return };
        let Some(s) = &mut t.session else { return };
        if !self.timers.is_set(Timer::Pong) {
            self.timers.set(Timer::Pong, now + pong_timeout);
            s.scheduled_ping = scheduled;
            self.transmits.push_back(Transmit::Frame {
                id: t.id,
                text: encode(&ClientFrame::Ping {}),
            });
        }
        self.timers.set(Timer::Ping, now + s.heartbeat);
    }

    /// Checks an open session is alive (after a network change or foreground).
    fn probe(&mut self, now: Instant) {
        self.ping(now, false);
    }

    /// The learner of the current network, when the adaptive heartbeat applies
    /// (background, keeping a connection).
    fn network_id(&self) -> Option<String> {
        match &self.network {
            Network::Online(id) => Some(id.clone()),
            Network::Offline => None,
        }
    }

    fn learner(&mut self, network: &str) -> Option<&mut Learner> {
        let a = self.cfg.adaptive_heartbeat?;
        Some(self.learned.entry(network.to_owned()).or_insert(Learner {
            interval: a.initial.clamp(a.min, a.max),
            successes: 0,
            ceiling: None,
        }))
    }

    /// Feeds the outcome of a tested background heartbeat to the learner.
    fn heartbeat_result(&mut self, ok: bool, now: Instant) {
        if self.app != AppState::Background {
            return;
        }
        let Some(net) = self.network_id() else { return };
        let Some(a) = self.cfg.adaptive_heartbeat else {
            // Fixed interval: nothing to learn, but the probe counts (analytics).
            let interval = self
                .transport
                .as_ref()
                .and_then(|t| t.session.as_ref())
                .map(|s| s.heartbeat)
                .unwrap_or(self.cfg.heartbeat_background);
            self.events.push_back(Event::HeartbeatProbed {
                network: net,
                interval,
                ok,
            });
            return;
        };
        let in_use = self
            .transport
            .as_ref()
            .and_then(|t| t.session.as_ref())
            .map(|s| s.heartbeat);
        let Some(l) = self.learner(&net) else { return };
        let tested = in_use.unwrap_or(l.interval);
        let before = *l;
        if ok {
            l.successes += 1;
            if l.successes >= a.successes {
                l.successes = 0;
                let next = (l.interval + a.step).min(a.max);
                if l.ceiling.is_none_or(|c| next < c) {
                    l.interval = next;
                }
            }
        } else {
            // Only a failure at (or above) the learnt interval says the path
            // cannot hold it.
            if tested >= l.interval {
                l.ceiling = Some(l.ceiling.map_or(tested, |c| c.min(tested)));
                l.interval = l.interval.saturating_sub(a.step).max(a.min);
            }
            l.successes = 0;
        }
        let after = *l;
        self.events.push_back(Event::HeartbeatProbed {
            network: net.clone(),
            interval: tested,
            ok,
        });
        if after.interval != before.interval || after.ceiling != before.ceiling {
            self.events.push_back(Event::HeartbeatLearned {
                network: net,
                interval: after.interval,
                settled: after.ceiling.is_some(),
            });
            // After a failure the connection is being dropped: the next hello
            // asks for the new interval.
            if ok {
                self.renegotiate_heartbeat(now);
            }
        }
    }

    /// Gives back a heartbeat learnt earlier for a network (from the store).
    pub fn set_learned_heartbeat(&mut self, network: &str, interval: Duration, settled: bool) {
        let Some(a) = self.cfg.adaptive_heartbeat else {
            return;
        };
        let interval = interval.clamp(a.min, a.max);
        self.learned.insert(
            network.to_owned(),
            Learner {
                interval,
                successes: 0,
                ceiling: settled.then_some(interval + a.step),
            },
        );
    }

    /// The background heartbeat in use for the current network.
    pub fn background_heartbeat(&self) -> Duration {
        match (&self.network, self.cfg.adaptive_heartbeat) {
            (Network::Online(id), Some(a)) => self
                .learned
                .get(id)
                .map(|l| l.interval)
                .unwrap_or(a.initial.clamp(a.min, a.max)),
            _ => self.cfg.heartbeat_background,
        }
    }

    fn renegotiate_heartbeat(&mut self, _now: Instant) {
        let want = self.wanted_heartbeat();
        let Some(t) = &mut self.transport else { return };
        let Some(s) = &mut t.session else { return };
        if s.requested_heartbeat != want {
            s.requested_heartbeat = want;
            let frame = ClientFrame::SetHeartbeat {
                heartbeat_ms: want.as_millis() as u64,
            };
            self.transmits.push_back(Transmit::Frame {
                id: t.id,
                text: encode(&frame),
            });
        }
    }

    /// Transmits queued sends, in order, within the unconfirmed window.
    fn pump_outbox(&mut self, now: Instant) {
        if self.timers.get(Timer::SendPause).is_some_and(|t| now < t) {
            return;
        }
        let Some(t) = &self.transport else { return };
        let Some(s) = &t.session else { return };
        let id = t.id;
        let mut in_flight = self
            .outbox
            .iter()
            .filter(|p| matches!(p.status, SendStatus::InFlight(_)))
            .count();
        for p in self.outbox.iter_mut() {
            if in_flight >= s.max_unconfirmed {
                break;
            }
            if p.status == SendStatus::NotSent {
                let frame = ClientFrame::Send(Send {
                    cid: p.item.cid.clone(),
                    conv: p.item.conv,
                    kind: p.item.kind.clone(),
                    body: p.item.body.clone(),
                });
                self.transmits.push_back(Transmit::Frame {
                    id,
                    text: encode(&frame),
                });
                p.status = SendStatus::InFlight(now);
                in_flight += 1;
            }
        }
    }
}
