//! The records and enums the bindings see, and their conversions from the
//! client's types. Thin: no logic beyond renaming and flattening.

use std::time::Duration;

use keepwire_client::notify::{
    Notification as ClientNotification, Prefs as ClientPrefs, QuietHours,
};
use keepwire_client::{ClientEvent, SyncOutcome as ClientOutcome, SyncReport as ClientReport};

use crate::KeepwireError;

/// A stored message.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Message {
    /// The relay's message id (unique per relay epoch).
    pub id: u64,
    /// The conversation.
    pub conv: u64,
    /// Position in the conversation (1, 2, ...), the order to show.
    pub conv_seq: u64,
    /// The sender's user id.
    pub sender: String,
    /// The sender's client id for it (what [`crate::Client::send`] returned).
    pub cid: String,
    /// `text` for messages sent by `send`.
    pub kind: String,
    /// The text.
    pub body: String,
    /// When the relay stored it, ms since the Unix epoch.
    pub ts: i64,
}

impl From<keepwire_proto::Message> for Message {
    fn from(m: keepwire_proto::Message) -> Self {
        Message {
            id: m.id,
            conv: m.conv,
            conv_seq: m.conv_seq,
            sender: m.from,
            cid: m.cid,
            kind: m.kind,
            body: m.body,
            ts: m.ts,
        }
    }
}

/// A conversation.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Conversation {
    /// Its id (what `send` and `messages` take).
    pub id: u64,
    /// Direct (two people) or group.
    pub group: bool,
    /// Its name, if it has one.
    pub name: Option<String>,
    /// Member user ids.
    pub members: Vec<String>,
    /// The highest `conv_seq` known.
    pub last_seq: u64,
}

impl From<keepwire_proto::ConvInfo> for Conversation {
    fn from(c: keepwire_proto::ConvInfo) -> Self {
        Conversation {
            id: c.id,
            group: c.kind == keepwire_proto::ConvKind::Group,
            name: c.name,
            members: c.members,
            last_seq: c.last_seq,
        }
    }
}

/// A notification to show (or that replaces the conversation's previous one).
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Notification {
    /// The conversation to open when it is tapped (then call
    /// [`crate::Client::notification_opened`]).
    pub conv: u64,
    /// One per conversation: the Android notification tag, the iOS
    /// `threadIdentifier` and request identifier. A notification with the
    /// same tag replaces the previous one.
    pub tag: String,
    /// Title, e.g. "bob" or "3 new messages from bob".
    pub title: String,
    /// The last message's text, or "New message" when previews are off.
    pub body: String,
    /// Unread messages in the conversation (a badge count).
    pub unread: u64,
    /// The messages this notification newly covers.
    pub message_ids: Vec<u64>,
    /// The last sender's user id.
    pub sender: String,
}

impl From<ClientNotification> for Notification {
    fn from(n: ClientNotification) -> Self {
        Notification {
            conv: n.conv,
            tag: n.tag,
            title: n.title,
            body: n.body,
            unread: n.unread,
            message_ids: n.message_ids,
            sender: n.sender,
        }
    }
}

/// The notification tag of a conversation (see [`Notification::tag`]).
pub(crate) fn tag(conv: u64) -> String {
    format!("keepwire-conv-{conv}")
}

/// What the app is doing, as the OS reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum AppState {
    /// Visible to the user.
    Foreground,
    /// Not visible (or running as an extension or a service).
    Background,
}

impl From<AppState> for keepwire_client::AppState {
    fn from(s: AppState) -> Self {
        match s {
            AppState::Foreground => keepwire_client::AppState::Foreground,
            AppState::Background => keepwire_client::AppState::Background,
        }
    }
}

/// What the OS says about the network.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Enum)]
pub enum Network {
    /// A usable network; `id` names it (e.g. "wifi:HomeNet", "cellular"),
    /// since the background heartbeat is learnt per network.
    Online {
        /// The network's name.
        id: String,
    },
    /// No network: the client makes no attempt until it is back.
    Offline,
}

impl From<Network> for keepwire_client::Network {
    fn from(n: Network) -> Self {
        match n {
            Network::Online { id } => keepwire_client::Network::Online(id),
            Network::Offline => keepwire_client::Network::Offline,
        }
    }
}

/// Why the client stopped for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum StopReason {
    /// The app closed it.
    ClosedByApp,
    /// The token was refused, also after one refresh: log in again.
    AuthRejected,
    /// The token was revoked: log in again.
    TokenRevoked,
    /// This device was revoked.
    DeviceRevoked,
    /// Another connection of this device replaced this one.
    Replaced,
}

impl From<keepwire_client::StopReason> for StopReason {
    fn from(r: keepwire_client::StopReason) -> Self {
        use keepwire_client::StopReason as R;
        match r {
            R::ClosedByApp => StopReason::ClosedByApp,
            R::TokenRevoked => StopReason::TokenRevoked,
            R::DeviceRevoked => StopReason::DeviceRevoked,
            R::Replaced => StopReason::Replaced,
            _ => StopReason::AuthRejected,
        }
    }
}

/// The connection's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum ConnectionState {
    /// Not started (or nothing to do).
    Idle,
    /// The OS reports no network.
    WaitingForNetwork,
    /// Opening the WebSocket.
    Connecting,
    /// Saying hello.
    Handshaking,
    /// Connected: messages flow.
    Connected,
    /// Waiting before the next attempt.
    BackingOff,
    /// Asking the token provider for a new token.
    RefreshingToken,
    /// In the background, disconnected on purpose: push and `sync_once` do the work.
    Dormant,
    /// Stopped for good.
    Stopped {
        /// Why.
        reason: StopReason,
    },
}

impl From<keepwire_client::State> for ConnectionState {
    fn from(s: keepwire_client::State) -> Self {
        use keepwire_client::State as S;
        match s {
            S::Idle => ConnectionState::Idle,
            S::WaitingForNetwork => ConnectionState::WaitingForNetwork,
            S::Connecting => ConnectionState::Connecting,
            S::Handshaking => ConnectionState::Handshaking,
            S::Connected => ConnectionState::Connected,
            S::BackingOff => ConnectionState::BackingOff,
            S::RefreshingToken => ConnectionState::RefreshingToken,
            S::Dormant => ConnectionState::Dormant,
            S::Stopped(r) => ConnectionState::Stopped { reason: r.into() },
        }
    }
}

/// Something for the app, delivered to its [`crate::EventListener`] on the
/// crate's callback thread, in order.
#[derive(Debug, Clone, PartialEq, uniffi::Enum)]
pub enum Event {
    /// The connection state changed.
    StateChanged {
        /// The new state.
        state: ConnectionState,
    },
    /// A message arrived (over the socket or by a sync), stored.
    MessageReceived {
        /// It.
        message: Message,
    },
    /// A send was confirmed by the relay (it left the outbox).
    SendConfirmed {
        /// The client id `send` returned.
        cid: String,
        /// The conversation.
        conv: u64,
        /// Its position in the conversation.
        conv_seq: u64,
    },
    /// A send was refused for good (not a member, too large...); it stays in
    /// the outbox as failed.
    SendFailed {
        /// The client id `send` returned.
        cid: String,
        /// The relay's error code (PROTOCOL.md §10).
        code: String,
        /// Detail.
        message: String,
    },
    /// A member joined or left a conversation.
    MembershipChanged {
        /// The conversation after the change.
        conversation: Conversation,
        /// Who.
        user: String,
        /// Joined (`true`) or left.
        added: bool,
    },
    /// Show (or replace, same tag) a notification.
    ShowNotification {
        /// It.
        notification: Notification,
    },
    /// Remove the conversation's notification (read on another device).
    ClearNotification {
        /// The conversation.
        conv: u64,
        /// Its notification tag.
        tag: String,
    },
    /// A connection problem; the client keeps retrying unless it stopped.
    ConnectionProblem {
        /// What happened, for logs.
        error: String,
    },
    /// The relay's history was trimmed or restored past this device's
    /// position: some messages cannot be had (what can be is fetched).
    HistoryGap {
        /// The relay's reason (`retention`, `epoch`, ...).
        reason: String,
    },
    /// This many events were dropped because the listener fell behind (the
    /// store has every message: read it with `messages`).
    Lagged {
        /// How many.
        missed: u64,
    },
}

impl Event {
    /// The app-facing event for a client event (`None`: not for apps).
    pub(crate) fn from_client(e: ClientEvent) -> Option<Event> {
        Some(match e {
            ClientEvent::State(s) => Event::StateChanged { state: s.into() },
            ClientEvent::Message(m) => Event::MessageReceived { message: m.into() },
            ClientEvent::SendConfirmed(c) => Event::SendConfirmed {
                cid: c.cid,
                conv: c.conv,
                conv_seq: c.conv_seq,
            },
            ClientEvent::SendFailed { cid, error } => Event::SendFailed {
                cid,
                code: error.code.to_string(),
                message: error.message,
            },
            ClientEvent::Member(m) => Event::MembershipChanged {
                conversation: m.conv.into(),
                user: m.user,
                added: m.change == keepwire_proto::MemberChange::Added,
            },
            ClientEvent::Error(e) => Event::ConnectionProblem {
                error: format!("{e:?}"),
            },
            ClientEvent::Gap(r) => Event::HistoryGap {
                reason: r
                    .reason
                    .map(|r| format!("{r:?}").to_lowercase())
                    .unwrap_or_else(|| "unknown".into()),
            },
            ClientEvent::Lagged(n) => Event::Lagged { missed: n },
            _ => return None,
        })
    }
}

/// How a sync ended.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Enum)]
pub enum SyncOutcome {
    /// Outbox flushed and everything up to the relay's head stored.
    CaughtUp,
    /// The deadline came first; what was done stays done, the next sync continues.
    Partial,
    /// The relay could not be reached.
    Unreachable {
        /// The last problem, if any.
        error: Option<String>,
    },
    /// The token or the device was refused: log in again.
    Stopped {
        /// Why.
        reason: StopReason,
    },
    /// Another process on this home holds the connection (and syncs the store).
    Busy,
}

/// What a sync did.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct SyncReport {
    /// How it ended.
    pub outcome: SyncOutcome,
    /// Messages received.
    pub received: u64,
    /// Sends confirmed.
    pub confirmed: u64,
    /// Notifications raised (or handed back by `on_push`).
    pub notified: u64,
    /// Time taken, ms.
    pub elapsed_ms: u64,
}

impl From<ClientReport> for SyncReport {
    fn from(r: ClientReport) -> Self {
        SyncReport {
            outcome: match r.outcome {
                ClientOutcome::CaughtUp => SyncOutcome::CaughtUp,
                ClientOutcome::Partial => SyncOutcome::Partial,
                ClientOutcome::Unreachable(e) => SyncOutcome::Unreachable {
                    error: e.map(|e| format!("{e:?}")),
                },
                ClientOutcome::Stopped(r) => SyncOutcome::Stopped { reason: r.into() },
                _ => SyncOutcome::Busy,
            },
            received: r.received,
            confirmed: r.confirmed,
            notified: r.notified,
            elapsed_ms: millis(r.elapsed),
        }
    }
}

/// What a push wake-up leaves the app to do.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct PushResult {
    /// The sync it ran.
    pub report: SyncReport,
    /// Notifications to show (the first is the one an iOS notification
    /// service extension hands back; post the others beside it). Empty when
    /// there is nothing new to show.
    pub show: Vec<Notification>,
    /// Tags of notifications to remove (read on another device).
    pub remove: Vec<String>,
    /// This call joined a wake-up already running in this process and got
    /// its result (same tags: showing it replaces, not stacks).
    pub joined: bool,
    /// The registration id the push carried (decrypted first when it was a
    /// Web Push body encrypted to keys keepwire made), if any: an app with
    /// several accounts compares it with each home's `push_status().id`.
    pub registration_id: Option<String>,
}

impl From<keepwire_client::PushResult> for PushResult {
    fn from(r: keepwire_client::PushResult) -> Self {
        PushResult {
            report: r.report.into(),
            show: r.show.into_iter().map(Into::into).collect(),
            remove: r.clear.into_iter().map(tag).collect(),
            joined: r.joined,
            registration_id: r.registration_id,
        }
    }
}

/// Where the OS delivers this device's push wake-ups.
#[derive(Clone, PartialEq, Eq, uniffi::Enum)]
pub enum PushRegistration {
    /// Firebase Cloud Messaging (Android): the registration token from
    /// `FirebaseMessaging.getToken()` / `onNewToken`.
    Fcm {
        /// The token.
        token: String,
    },
    /// APNs (iOS): the device token (hex) from
    /// `didRegisterForRemoteNotificationsWithDeviceToken`, the app's bundle
    /// id, and whether it is a development (sandbox) build.
    Apns {
        /// The device token, hex.
        token: String,
        /// The bundle id (one of the relay's configured topics).
        topic: String,
        /// `true` for the sandbox gateway.
        sandbox: bool,
    },
    /// Web Push / UnifiedPush: the endpoint, and the subscription's keys
    /// (base64url) when something else made them (a UnifiedPush connector
    /// that decrypts itself); without keys keepwire makes them, keeps them
    /// in the home, and `on_push` decrypts the pushes.
    WebPush {
        /// The push resource URL (https).
        endpoint: String,
        /// The P-256 public key, base64url.
        p256dh: Option<String>,
        /// The auth secret, base64url.
        auth: Option<String>,
    },
}

impl std::fmt::Debug for PushRegistration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Tokens and endpoints are secrets.
        f.write_str(match self {
            PushRegistration::Fcm { .. } => "PushRegistration::Fcm(<redacted>)",
            PushRegistration::Apns { .. } => "PushRegistration::Apns(<redacted>)",
            PushRegistration::WebPush { .. } => "PushRegistration::WebPush(<redacted>)",
        })
    }
}

impl PushRegistration {
    pub(crate) fn into_client(self) -> Result<keepwire_client::PushRegistration, KeepwireError> {
        use keepwire_client::PushRegistration as R;
        Ok(match self {
            PushRegistration::Fcm { token } => R::Fcm { token },
            PushRegistration::Apns {
                token,
                topic,
                sandbox,
            } => R::Apns {
                token,
                topic,
                sandbox,
            },
            PushRegistration::WebPush {
                endpoint,
                p256dh,
                auth,
            } => R::WebPush {
                endpoint,
                keys: match (p256dh, auth) {
                    (Some(p256dh), Some(auth)) => {
                        Some(keepwire_client::WebPushKeys { p256dh, auth })
                    }
                    (None, None) => None,
                    _ => {
                        return Err(KeepwireError::InvalidInput {
                            detail: "give both p256dh and auth, or neither (keepwire makes them)"
                                .into(),
                        });
                    }
                },
            },
        })
    }
}

/// Where this device's push registration stands (never the token).
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct PushStatus {
    /// `fcm`, `apns` or `webpush`; `None`: not registered.
    pub provider: Option<String>,
    /// keepwire made the Web Push keys (and decrypts the pushes).
    pub own_keys: bool,
    /// The registration id the relay gave; every push carries it.
    pub id: Option<String>,
    /// When the relay last accepted it, ms since the Unix epoch.
    pub registered_at_ms: Option<u64>,
    /// A change the relay has not accepted yet (sent when connected).
    pub pending: bool,
    /// Why the relay refused it, if it did.
    pub last_error: Option<String>,
}

impl From<keepwire_client::PushStatus> for PushStatus {
    fn from(s: keepwire_client::PushStatus) -> Self {
        PushStatus {
            provider: s.provider,
            own_keys: s.own_keys,
            id: s.id,
            registered_at_ms: s
                .registered_at
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok().map(millis)),
            pending: s.pending,
            last_error: s.last_error,
        }
    }
}

/// What the connection does while the app is in the background.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum BackgroundPolicy {
    /// Disconnect at once; push and `sync_once` do the rest (the default for
    /// apps; the only policy that works on iOS).
    WakeOnly,
    /// Stay connected this long, then disconnect.
    Linger {
        /// Seconds.
        seconds: u64,
    },
    /// Stay connected (an Android foreground service of type
    /// `remoteMessaging` or `specialUse`).
    Keep,
}

impl BackgroundPolicy {
    fn pref(self) -> String {
        match self {
            BackgroundPolicy::WakeOnly => "wake-only".into(),
            BackgroundPolicy::Linger { seconds } => format!("linger:{seconds}"),
            BackgroundPolicy::Keep => "keep".into(),
        }
    }
}

/// The user's notification and background preferences, kept in the home.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Prefs {
    /// Conversations that never notify.
    pub muted: Vec<u64>,
    /// No notifications during these local hours, `HH:MM-HH:MM` (may wrap midnight).
    pub quiet_hours: Option<String>,
    /// Show message text in notifications (else "New message").
    pub previews: bool,
    /// The background policy (applies from the next start of the client).
    pub background: BackgroundPolicy,
}

impl Prefs {
    pub(crate) fn from_client(p: &ClientPrefs) -> Prefs {
        use keepwire_client::BackgroundPolicy as B;
        Prefs {
            muted: p.muted.iter().copied().collect(),
            quiet_hours: p.quiet_hours.map(|q| q.to_string()),
            previews: p.previews,
            background: match p.background_policy() {
                Some(B::KeepAlive) => BackgroundPolicy::Keep,
                Some(B::Linger(d)) => BackgroundPolicy::Linger {
                    seconds: d.as_secs(),
                },
                _ => BackgroundPolicy::WakeOnly,
            },
        }
    }

    /// Applies these preferences over `base` (keeping what the bindings do
    /// not expose, such as the desktop settings).
    pub(crate) fn apply(&self, base: &mut ClientPrefs) -> Result<(), KeepwireError> {
        base.muted = self.muted.iter().copied().collect();
        base.quiet_hours = match &self.quiet_hours {
            None => None,
            Some(q) => Some(
                QuietHours::parse(q).ok_or_else(|| KeepwireError::InvalidInput {
                    detail: format!("quiet hours {q:?}: use HH:MM-HH:MM, e.g. 22:00-07:00"),
                })?,
            ),
        };
        base.previews = self.previews;
        if let BackgroundPolicy::Linger { seconds: 0 } = self.background {
            return Err(KeepwireError::InvalidInput {
                detail: "a linger of 0 s is wake-only: use WakeOnly".into(),
            });
        }
        base.background = Some(self.background.pref());
        Ok(())
    }
}

/// A snapshot of the client.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Status {
    /// Connection state (of this process; `Idle`/`Dormant` when another
    /// process on the home holds the connection or none is wanted).
    pub state: ConnectionState,
    /// The last connection problem.
    pub last_error: Option<String>,
    /// The user, once known.
    pub user: Option<String>,
    /// The stored resume position (inbox sequence).
    pub cursor: Option<u64>,
    /// Sends waiting in the outbox.
    pub outbox: u64,
    /// Whether this process holds the home's connection.
    pub holder: bool,
}

impl From<keepwire_client::Status> for Status {
    fn from(s: keepwire_client::Status) -> Self {
        Status {
            state: s.state.into(),
            last_error: s.last_error.map(|e| format!("{e:?}")),
            user: s.user,
            cursor: s.cursor,
            outbox: s.outbox,
            holder: s.holder,
        }
    }
}

/// Connection statistics over a window (what `keepwire stats` shows).
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct Stats {
    /// Time a connection was wanted, ms.
    pub wanted_ms: i64,
    /// Time connected while wanted, ms.
    pub connected_ms: i64,
    /// connected ÷ wanted (0 when nothing was wanted).
    pub uptime: f64,
    /// Times the connection came back after being lost.
    pub reconnects: u64,
    /// Median time to reconnect, ms.
    pub reconnect_p50_ms: Option<i64>,
    /// Background heartbeats per connected background hour.
    pub background_heartbeats_per_hour: Option<f64>,
    /// Messages received over the socket while in the background.
    pub received_background: u64,
    /// Messages received by syncs (periodic tasks, push wake-ups).
    pub received_by_sync: u64,
    /// Notifications raised.
    pub notifications: u64,
}

impl From<keepwire_client::analytics::Stats> for Stats {
    fn from(s: keepwire_client::analytics::Stats) -> Self {
        Stats {
            wanted_ms: s.wanted_ms,
            connected_ms: s.connected_ms,
            uptime: s.uptime,
            reconnects: s.reconnects,
            reconnect_p50_ms: s.reconnect_p50_ms,
            background_heartbeats_per_hour: s.background_heartbeats_per_hour,
            received_background: s.received_background,
            received_by_sync: s.received_by_sync,
            notifications: s.notifications,
        }
    }
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
