//! The relay's storage contract and its implementations.
//!
//! Everything the relay persists goes through two traits: [`RelayStore`], the
//! hot path a session needs (its contract is in its doc comment), and
//! [`AdminStore`], the admin CLI's and HTTP API's operations. [`Store`] is
//! both. Backends: [`SqliteStore`] (embedded, the default),
//! [`PostgresStore`] (several relay nodes over one database) and
//! [`MemoryStore`] (tests and the simulation). One contract suite
//! ([`contract`], behind the `testing` feature) runs against each.

use std::sync::Arc;
use std::time::Duration;

use keepwire_proto::{
    Confirm, ConvCreate, ConvId, ConvInfo, Cursor, ErrorCode, HistoryPage, InboxEntry, Resume,
    Send as SendMsg, Seq,
};

#[cfg(any(test, feature = "testing"))]
pub mod contract;
mod memory;
mod postgres;
mod sqlite;

#[cfg(any(test, feature = "testing"))]
pub use memory::Sabotage;
pub use memory::{CrashPoint, MemoryDisk, MemoryOptions, MemorySnapshot, MemoryStore};
pub use postgres::{PostgresOptions, PostgresStore};
pub use sqlite::{DbLock, LockMode, SqliteOptions, SqliteStore, lock_path};

/// The wall clock a store stamps entries and records with (ms since the
/// Unix epoch). Injected so that a simulation can run on virtual time.
pub trait WallClock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl WallClock for SystemClock {
    fn now_ms(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }
}

/// Internal user id.
pub type UserId = i64;

/// The name under which the app's backend posts system messages and makes
/// membership changes. Not a valid user name, so no user can take it.
pub const SYSTEM_USER: &str = "~system";

/// Who asks for a change: a user (bound by membership rules) or the app's
/// backend through the HTTP API (trusted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Actor {
    /// A user, through a connection.
    User(UserId),
    /// The app's backend (as [`SYSTEM_USER`]).
    System,
}

/// A user authenticated by a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthedUser {
    /// Internal id.
    pub id: UserId,
    /// User name (the id other users see).
    pub name: String,
    /// The token's id (for revocation); `None` for app-issued tokens.
    pub token_id: Option<i64>,
    /// When the token expires, in ms since the Unix epoch.
    pub expires_at_ms: i64,
}

/// Why a token was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// Unknown, forged or malformed.
    Unknown,
    /// Past its expiry.
    Expired,
    /// Revoked.
    Revoked,
    /// The device was revoked.
    DeviceRevoked,
}

/// What went wrong in the store, in three classes (see [`StoreError::class`]):
/// refusals of a client's request, which the relay answers on the wire;
/// admin and API errors (something named does not exist, or conflicts); and
/// infrastructure failures, which are the operator's problem.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The request is not allowed or not valid; answer the client with the code.
    #[error("{1}")]
    Refused(ErrorCode, String),
    /// Authentication failed.
    #[error("authentication failed: {0:?}")]
    Auth(AuthFailure),
    /// An admin request named something that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// An admin request conflicts with existing data.
    #[error("{0}")]
    Conflict(String),
    /// The store itself failed.
    #[error(transparent)]
    Infra(#[from] InfraError),
}

/// The three classes of [`StoreError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// A refusal of a client's request, answered on the wire
    /// ([`StoreError::Refused`], [`StoreError::Auth`]).
    Refusal,
    /// An admin or API request named a missing or conflicting thing.
    Admin,
    /// The store failed; the request may be retried.
    Infrastructure,
}

/// An infrastructure failure of the store. Nothing of the request was
/// stored, unless the variant says the outcome is unknown.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InfraError {
    /// The database engine failed.
    #[error("database error: {0}")]
    Database(String),
    /// The database is not a keepwire database, is newer than this binary,
    /// or cannot be opened.
    #[error("{0}")]
    Incompatible(String),
    /// A commit failed; nothing of the request was stored.
    #[error("commit failed: {0}")]
    Commit(String),
    /// The store was closed.
    #[error("the store is closed")]
    Closed,
}

impl StoreError {
    pub(crate) fn refused(code: ErrorCode, msg: impl Into<String>) -> Self {
        StoreError::Refused(code, msg.into())
    }

    /// A commit failure (nothing stored).
    pub fn commit(msg: impl Into<String>) -> Self {
        StoreError::Infra(InfraError::Commit(msg.into()))
    }

    /// The database cannot be used by this relay.
    pub fn incompatible(msg: impl Into<String>) -> Self {
        StoreError::Infra(InfraError::Incompatible(msg.into()))
    }

    /// The store was closed.
    pub fn closed() -> Self {
        StoreError::Infra(InfraError::Closed)
    }

    /// Whether the store was closed.
    pub fn is_closed(&self) -> bool {
        matches!(self, StoreError::Infra(InfraError::Closed))
    }

    /// Which of the three classes this error belongs to.
    pub fn class(&self) -> ErrorClass {
        match self {
            StoreError::Refused(..) | StoreError::Auth(_) => ErrorClass::Refusal,
            StoreError::NotFound(_) | StoreError::Conflict(_) => ErrorClass::Admin,
            StoreError::Infra(_) => ErrorClass::Infrastructure,
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Infra(InfraError::Database(e.to_string()))
    }
}

/// What the relay will replay on a new connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumePlan {
    /// The log's epoch (for `welcome`).
    pub epoch: String,
    /// The user's inbox head when the plan was made.
    pub head: Seq,
    /// The resume answer for `welcome`.
    pub resume: Resume,
}

/// What [`AdminStore::delete_user`] did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeletedUser {
    /// The deleted user's internal id (to close its connections here).
    #[serde(skip)]
    pub id: UserId,
    /// The name it had.
    pub user: String,
    /// The conversations it left.
    pub conversations: u64,
    /// The devices it had.
    pub devices: u64,
}

/// The name a deleted user's row keeps: its past messages are attributed to
/// it. Not a valid user name (like [`SYSTEM_USER`]), so no one can take it.
pub fn deleted_user_name(id: UserId) -> String {
    format!("~deleted.{id}")
}

/// A freshly issued token. The secret is shown once and never stored.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    /// The bearer token.
    pub token: String,
    /// Its id.
    pub id: i64,
    /// Expiry, ms since the Unix epoch.
    pub expires_at_ms: i64,
}

/// A token's metadata (never the secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    /// Token id.
    pub id: i64,
    /// Owner.
    pub user: String,
    /// Creation time, ms since the Unix epoch.
    pub created_at_ms: i64,
    /// Expiry, ms since the Unix epoch.
    pub expires_at_ms: i64,
    /// Revocation time, if revoked.
    pub revoked_at_ms: Option<i64>,
}

/// What to revoke.
#[derive(Debug, Clone)]
pub enum RevokeTarget {
    /// The token with this secret.
    Token(String),
    /// The token with this id.
    Id(i64),
    /// Every token of this user.
    User(String),
}

/// One entry of the revocation log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// Log position.
    pub id: i64,
    /// The user concerned.
    pub user_id: UserId,
    /// The token revoked; `None` = every token of the user (or a device).
    pub token_id: Option<i64>,
    /// The device revoked, if this revokes a device.
    pub device: Option<String>,
}

/// A device of a user.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeviceInfo {
    /// Device id.
    pub device: String,
    /// First connection, ms since the Unix epoch.
    pub first_seen_ms: i64,
    /// Last activity, ms since the Unix epoch.
    pub last_seen_ms: i64,
    /// Highest inbox sequence the device acknowledged as stored.
    pub acked_seq: u64,
    /// Revocation time, if revoked.
    pub revoked_at_ms: Option<i64>,
    /// Its push registration, if it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub push: Option<DevicePush>,
}

/// Delivery positions of a user's devices (for "delivered" ticks).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Positions {
    /// The user's inbox head.
    pub head: u64,
    /// Per device.
    pub devices: Vec<DevicePosition>,
}

/// One device's delivery position.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DevicePosition {
    /// Device id.
    pub device: String,
    /// Highest inbox sequence acknowledged.
    pub acked_seq: u64,
    /// With a conversation asked for: the highest `conv_seq` of it the device
    /// has acknowledged (every message up to it is delivered).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conv_delivered_seq: Option<u64>,
}

/// An API key's metadata (never the key).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ApiKeyInfo {
    /// Key id.
    pub id: i64,
    /// Name given at creation.
    pub name: String,
    /// Creation time, ms since the Unix epoch.
    pub created_at_ms: i64,
    /// Revocation time, if revoked.
    pub revoked_at_ms: Option<i64>,
}

/// Retention policy for inboxes and messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Retention {
    /// Trim messages and inbox entries older than this.
    pub max_age: Option<Duration>,
    /// Keep at most this many inbox entries per user (oldest trimmed first).
    pub max_entries: Option<u64>,
    /// Keep send dedupe keys at least this long (default 30 days, and never
    /// shorter than `max_age`).
    pub dedupe_age: Option<Duration>,
}

/// What a trim pass removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrimReport {
    /// Inbox entries removed.
    pub inbox_entries: u64,
    /// Messages removed.
    pub messages: u64,
    /// Dedupe keys removed.
    pub dedupe_keys: u64,
}

/// Told when users' inbox heads advance (after the commit).
pub trait HeadListener: Send + Sync {
    /// `heads` holds each entry committed, in commit order (a user may appear
    /// more than once), with its item when the store had it at hand.
    fn heads_advanced(&self, heads: &[HeadAdvance]);
}

/// One inbox entry committed: the user's new head, and the entry itself when
/// the store built it (messages), so live connections can deliver it without
/// reading it back.
#[derive(Debug, Clone)]
pub struct HeadAdvance {
    /// Whose inbox.
    pub user: UserId,
    /// The entry's sequence number (the user's new head).
    pub seq: Seq,
    /// The entry's item encoded as JSON once, shared by every member it
    /// went to.
    pub item: Option<Arc<str>>,
    /// Where the entry came from, for push decisions (`None`: membership
    /// and mute entries, which wake nobody).
    pub origin: Option<Origin>,
}

/// Where an inbox entry came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// The conversation.
    pub conv: ConvId,
    /// Who wrote it (for a read marker, the reader).
    pub sender: UserId,
    /// What it is.
    pub kind: OriginKind,
}

/// The kind of entry an [`Origin`] describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginKind {
    /// A message.
    Message,
    /// A read marker (the user's other devices clear notifications).
    Read,
}

/// A push registration to store for a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPush {
    /// The provider (`fcm`, `apns`, `webpush`).
    pub provider: String,
    /// What identifies the registration at its provider (a digest of the
    /// token or endpoint): registering it on another device moves it.
    pub key: Vec<u8>,
    /// The registration as JSON (a secret: never logged).
    pub registration: String,
    /// Whether the user allows encrypted previews.
    pub previews: bool,
}

/// One device's push registration and where its pushes stand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushTarget {
    /// The device.
    pub device: String,
    /// The opaque registration id pushes carry.
    pub reg_id: String,
    /// The registration as JSON.
    pub registration: String,
    /// Whether the user allows encrypted previews.
    pub previews: bool,
    /// The device's acknowledged position (as persisted).
    pub acked_seq: Seq,
    /// The position the last push was sent for (0: none).
    pub pushed_seq: Seq,
    /// The position of the last push a provider accepted.
    pub delivered_seq: Seq,
    /// When the last push was sent, ms since the Unix epoch.
    pub pushed_at_ms: Option<i64>,
    /// Pushes sent for `pushed_seq` so far.
    pub attempts: u32,
    /// The newest entry after `acked_seq` that wakes the device: a message
    /// from another user in a conversation the user has not muted.
    pub wake_seq: Option<Seq>,
}

/// What a provider did with a push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushOutcome {
    /// Accepted, for this position.
    Delivered(Seq),
    /// Failed (temporarily, or a configuration error): kept.
    Failed(String),
    /// The registration is dead at the provider: deleted.
    Unregistered(String),
}

/// A device's push registration, as the admin API shows it (never the
/// token or keys).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DevicePush {
    /// The provider.
    pub provider: String,
    /// When it was last registered or refreshed, ms since the Unix epoch.
    pub refreshed_at_ms: i64,
    /// The last push a provider accepted, ms since the Unix epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_success_ms: Option<i64>,
    /// The last failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// The store operations a relay session needs: authentication, the inbox,
/// sends, conversations. This is the hot path; every backend implements it
/// and passes the contract suite ([`contract`]).
///
/// # Contract
/// - Durability: a write's future resolves only after its commit is durable
///   (against power loss); a group of writes commits all or nothing.
/// - Answers and [`HeadListener::heads_advanced`] come after the commit,
///   never before; after `heads_advanced(u, s)`, a read of `u`'s inbox up to
///   `s` includes `s`.
/// - Per user, inbox sequences are gap-free from 1 and assigned in commit
///   order; every member sees a conversation's messages in `conv_seq` order.
/// - A member gets exactly the messages committed while it was a member.
/// - `(user, seq)` never changes content within an epoch (retention may
///   remove it; then a read starts after the floor).
/// - Concurrent sends with one `(user, device, cid)` store one message; the
///   others answer `duplicate` with the original ids.
/// - A multi-statement read sees one snapshot.
/// - Persisted ack positions lag the acknowledged ones by a bounded time and
///   never lead them.
#[async_trait::async_trait]
pub trait RelayStore: Send + Sync + 'static {
    /// The log's epoch: changes whenever the log is replaced or restored.
    fn epoch(&self) -> String;
    /// Registers the listener told of inbox head advances.
    fn set_head_listener(&self, listener: Arc<dyn HeadListener>);

    /// Checks a bearer token.
    async fn authenticate(&self, token: &str) -> Result<AuthedUser, StoreError>;
    /// Finds or creates the user named by a valid app-issued token (no
    /// sign-up needed); refuses with `Auth(Revoked)` when the user's tokens
    /// were revoked at or after `issued_at_ms` (or the token has no issue time).
    async fn authenticate_external(
        &self,
        name: &str,
        issued_at_ms: Option<i64>,
    ) -> Result<UserId, StoreError>;
    /// Whether a device was revoked.
    async fn device_revoked(&self, user: UserId, device: &str) -> Result<bool, StoreError>;
    /// Records that a device connected, with the keepwire token it used
    /// (revoking the device revokes that token too).
    async fn touch_device(
        &self,
        user: UserId,
        device: &str,
        token_id: Option<i64>,
    ) -> Result<(), StoreError>;
    /// Plans a resume from `cursor` (or a new device's start, `new_window`
    /// entries before the head).
    async fn resume(
        &self,
        user: UserId,
        cursor: Option<&Cursor>,
        new_window: u64,
    ) -> Result<ResumePlan, StoreError>;
    /// Inbox entries with `seq >= from`, in order, at most `limit`.
    async fn read_inbox(
        &self,
        user: UserId,
        from: Seq,
        limit: usize,
    ) -> Result<Vec<InboxEntry>, StoreError>;
    /// The user's inbox head (0 when empty).
    async fn inbox_head(&self, user: UserId) -> Result<Seq, StoreError>;
    /// Stores a message (or finds the original for a repeated cid).
    async fn send(&self, actor: Actor, device: &str, send: SendMsg) -> Result<Confirm, StoreError>;
    /// Records a device's acknowledged position.
    async fn record_ack(&self, user: UserId, device: &str, seq: Seq) -> Result<(), StoreError>;
    /// A page of a conversation's history (members only).
    async fn history(
        &self,
        actor: Actor,
        conv: ConvId,
        before: Option<u64>,
        limit: u32,
    ) -> Result<HistoryPage, StoreError>;
    /// Creates a conversation, or returns the one a previous identical request made.
    async fn conv_create(
        &self,
        actor: Actor,
        req: ConvCreate,
        max_group_size: usize,
    ) -> Result<(ConvInfo, bool), StoreError>;
    /// Adds or removes a member (idempotent).
    async fn conv_member(
        &self,
        actor: Actor,
        conv: ConvId,
        target: &str,
        add: bool,
        max_group_size: usize,
    ) -> Result<(ConvInfo, bool), StoreError>;
    /// The user's conversations.
    async fn conv_list(&self, user: UserId) -> Result<Vec<ConvInfo>, StoreError>;
    /// The members of a conversation the user belongs to.
    async fn conv_member_ids(&self, user: UserId, conv: ConvId) -> Result<Vec<UserId>, StoreError>;
    /// Records that `user` read `conv` up to `up_to` (clamped to the
    /// conversation's last message) and, if that moved the marker, appends a
    /// `read` entry to the user's inbox for their other devices.
    async fn mark_read(&self, user: UserId, conv: ConvId, up_to: u64) -> Result<bool, StoreError>;
    /// The revocation log after `after`, in id order, at most 1000 entries
    /// (ids may commit out of order across writers: readers look back).
    async fn revocations_after(&self, after: i64) -> Result<Vec<Revocation>, StoreError>;
    /// Sets, refreshes or (with `None`) removes a device's push registration.
    /// A registration another device holds (same provider key) moves here.
    /// Returns the registration id pushes carry: new for a new registration,
    /// kept when the same one is registered again.
    async fn set_push(
        &self,
        user: UserId,
        device: &str,
        push: Option<NewPush>,
    ) -> Result<Option<String>, StoreError>;
    /// Mutes or unmutes a conversation for the user (a member); when that
    /// changed something, appends a `mute` entry to the user's inbox.
    async fn mute(&self, user: UserId, conv: ConvId, muted: bool) -> Result<bool, StoreError>;
    /// The user's devices with a push registration, and where they stand.
    async fn push_targets(&self, user: UserId) -> Result<Vec<PushTarget>, StoreError>;
    /// Every user with a push registration (to look for wake-ups still due
    /// after a restart).
    async fn push_users(&self) -> Result<Vec<UserId>, StoreError>;
    /// Records, durably and before the provider is called, that a push for
    /// `seq` goes to the registration (one more attempt if `seq` is the same
    /// as before).
    async fn record_push(&self, reg_id: &str, seq: Seq) -> Result<(), StoreError>;
    /// Records what the provider did with a push.
    async fn push_outcome(&self, reg_id: &str, outcome: PushOutcome) -> Result<(), StoreError>;
    /// A value kept in the store's meta data, set to `init` if absent
    /// (the VAPID key: stable across restarts and restores).
    async fn meta_or_init(&self, key: &str, init: &str) -> Result<String, StoreError>;
    /// Flushes pending writes and stops the writer. Later calls fail with
    /// [`InfraError::Closed`].
    async fn close(&self);
}

/// Operations of the admin CLI and the backend's HTTP API: users, devices,
/// tokens, API keys, retention.
#[async_trait::async_trait]
pub trait AdminStore: Send + Sync + 'static {
    /// Creates a user.
    async fn create_user(&self, name: &str) -> Result<UserId, StoreError>;
    /// A user's id by name.
    async fn user_id(&self, name: &str) -> Result<Option<UserId>, StoreError>;
    /// Every user's name (created by an admin or the API, or by a valid
    /// JWT's first connection), sorted; not the system user nor deleted users.
    async fn list_users(&self) -> Result<Vec<String>, StoreError>;
    /// Deletes a user, in one transaction: their inbox, devices, tokens,
    /// push registrations, mutes, read markers and dedupe keys go; they
    /// leave every conversation (the other members get a `removed` event
    /// by [`SYSTEM_USER`]); a revocation log entry closes their live
    /// connections on every relay. Their messages already delivered stay in
    /// the other members' inboxes and in the history, attributed from then
    /// on to [`deleted_user_name`] (the user row stays as that tombstone, so
    /// its id is never reused and the name is free for a new user).
    async fn delete_user(&self, name: &str) -> Result<DeletedUser, StoreError>;
    /// Revokes a device: its connections close, it cannot reconnect, and
    /// every keepwire token it connected with is revoked (so a stolen
    /// device's token cannot connect under another device id). Returns false
    /// if it was already revoked.
    async fn revoke_device(&self, user: &str, device: &str) -> Result<bool, StoreError>;
    /// A user's devices.
    async fn list_devices(&self, user: &str) -> Result<Vec<DeviceInfo>, StoreError>;
    /// A user's delivery positions, optionally per conversation.
    async fn positions(&self, user: &str, conv: Option<ConvId>) -> Result<Positions, StoreError>;
    /// Creates an API key; returns its id and the key (shown once).
    async fn create_api_key(&self, name: &str) -> Result<(i64, String), StoreError>;
    /// The id of a valid (unrevoked) API key.
    async fn check_api_key(&self, key: &str) -> Result<Option<i64>, StoreError>;
    /// Every API key.
    async fn list_api_keys(&self) -> Result<Vec<ApiKeyInfo>, StoreError>;
    /// Revokes an API key; false if unknown or already revoked.
    async fn revoke_api_key(&self, id: i64) -> Result<bool, StoreError>;
    /// Issues a token for a user.
    async fn issue_token(&self, user: &str, ttl: Duration) -> Result<IssuedToken, StoreError>;
    /// Revokes tokens; returns how many were revoked.
    async fn revoke(&self, target: RevokeTarget) -> Result<u64, StoreError>;
    /// A user's tokens.
    async fn list_tokens(&self, user: &str) -> Result<Vec<TokenInfo>, StoreError>;
    /// Applies the age-based retention policy (count-based retention is
    /// applied as entries are appended).
    async fn trim(&self) -> Result<TrimReport, StoreError>;
}

/// A complete relay store: the session's operations and the admin ones.
/// Implemented for every type that implements both.
pub trait Store: RelayStore + AdminStore {}

impl<T: RelayStore + AdminStore> Store for T {}
