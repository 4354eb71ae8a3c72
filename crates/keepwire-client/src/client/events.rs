//! What the client reports: errors, events for the app, its status.

use super::*;

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
