//! Frame types. Field names and shapes here are normative: `PROTOCOL.md`
//! documents each with a JSON example, and the codec tests pin them.

use serde::{Deserialize, Serialize};

use crate::codes::ErrorCode;

/// A per-user inbox sequence number. Gap-free and increasing per user, starting at 1.
pub type Seq = u64;
/// A conversation id, unique within a relay's epoch.
pub type ConvId = u64;
/// A message id, unique within a relay's epoch.
pub type MessageId = u64;

/// A resume position: the last inbox sequence a device has durably stored,
/// qualified by the epoch of the log it came from.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// The log epoch the sequence belongs to (from [`Welcome::epoch`]).
    pub epoch: String,
    /// The last inbox sequence stored by the device (0 = none).
    pub seq: Seq,
}

/// Frames a client sends.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ClientFrame {
    /// First frame of every connection: authenticates and resumes.
    Hello(Hello),
    /// Send a message to a conversation.
    Send(Send),
    /// Acknowledge every inbox entry up to and including `seq` as durably stored.
    Ack {
        /// Highest contiguous inbox sequence stored by the device.
        seq: Seq,
    },
    /// Heartbeat. The server answers with [`ServerFrame::Pong`].
    Ping {},
    /// Change the heartbeat interval for the rest of the connection.
    SetHeartbeat {
        /// Requested interval in milliseconds.
        heartbeat_ms: u64,
    },
    /// Page a conversation's history backwards.
    History(HistoryRequest),
    /// Create a direct or group conversation (idempotent on `key`).
    ConvCreate(ConvCreate),
    /// Add a member to a conversation (idempotent).
    ConvAdd(ConvMember),
    /// Remove a member from a conversation (idempotent). A user may remove themselves.
    ConvRemove(ConvMember),
    /// List the conversations the user is a member of.
    ConvList {
        /// Request id echoed in the answer.
        rid: String,
    },
    /// The user read a conversation up to `up_to` (a `conv_seq`): the relay
    /// tells the user's other devices with a `read` inbox entry.
    Read {
        /// The conversation.
        conv: ConvId,
        /// Every message with `conv_seq <= up_to` counts as read.
        up_to: u64,
    },
    /// Ephemeral signal (typing indicator, ...): relayed to the connected devices
    /// of the conversation's members, never stored, no sequence number.
    Signal {
        /// Target conversation.
        conv: ConvId,
        /// Application data, at most [`Limits::max_signal_bytes`] when encoded.
        #[cfg_attr(feature = "arbitrary", arbitrary(with = crate::frames::arbitrary_json))]
        data: serde_json::Value,
    },
    /// Register, replace or remove this device's push registration
    /// (`registration: null` removes it). Answered with [`ServerFrame::Push`].
    PushRegister(PushRegister),
    /// Mute or unmute a conversation for all of the user's devices: a muted
    /// conversation sends no push. Answered with [`ServerFrame::Muted`]; every
    /// device of the user gets a `mute` inbox entry.
    Mute {
        /// Request id echoed in the answer.
        rid: String,
        /// The conversation.
        conv: ConvId,
        /// Muted (or not).
        muted: bool,
    },
}

/// The `push_register` request.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PushRegister {
    /// Request id echoed in the answer.
    pub rid: String,
    /// The registration, as PROTOCOL.md §8b spells it (`{"provider":"fcm",
    /// "token":...}`, `apns`, `webpush`); `null` removes this device's.
    #[cfg_attr(feature = "arbitrary", arbitrary(with = crate::frames::arbitrary_json))]
    pub registration: serde_json::Value,
    /// Whether the user allows message previews in pushes (sent only
    /// encrypted to the registration's RFC 8291 keys, and only if the relay
    /// allows previews).
    #[serde(default)]
    pub previews: bool,
}

/// The `hello` frame. Its `Debug` output hides the token, so a logged frame
/// never carries a credential.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// The bearer token. Never sent anywhere else (not in the URL).
    pub token: String,
    /// A stable id for this device, chosen by the client (see [`crate::is_valid_device_id`]).
    pub device: String,
    /// Where to resume; absent for a device that has stored nothing yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<Cursor>,
    /// Requested heartbeat interval in milliseconds; the server clamps it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_ms: Option<u64>,
    /// For a device without a cursor: how many recent inbox entries to replay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<u64>,
    /// Free-form client name and version, for logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// The connection's generation: higher for every later connection
    /// attempt of this installation, across process restarts. Of two
    /// connections of one device, the relay keeps the higher generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// A short-lived connection that catches up and closes: a push wake-up
    /// in a process of its own (an iOS notification service extension, or
    /// `keepwire push receive` beside a frozen holder). The device's
    /// connection it displaces is closed with 4012 (reconnect), not 4005.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub transient: bool,
    /// The credit window wanted (inbox entries beyond the last ack); the
    /// relay clamps it to 1 ..= its maximum and grants it in
    /// `welcome.limits.window`. Absent: the relay's default. A larger window
    /// catches a backlog up in fewer round trips (a push wake-up on a slow
    /// path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<u64>,
}

impl std::fmt::Debug for Hello {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hello")
            .field("token", &format_args!("<{} bytes>", self.token.len()))
            .field("device", &self.device)
            .field("cursor", &self.cursor)
            .field("heartbeat_ms", &self.heartbeat_ms)
            .field("history", &self.history)
            .field("agent", &self.agent)
            .field("generation", &self.generation)
            .field("transient", &self.transient)
            .field("window", &self.window)
            .finish()
    }
}

/// The `send` frame.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Send {
    /// Client id: random, 128-bit recommended; the idempotency key of this send
    /// for this (user, device).
    pub cid: String,
    /// Target conversation.
    pub conv: ConvId,
    /// Message kind. `"text"` in v1.
    #[serde(default = "default_kind")]
    pub kind: String,
    /// Message body (UTF-8 text for `"text"`).
    pub body: String,
}

fn default_kind() -> String {
    MESSAGE_KIND_TEXT.to_owned()
}

/// The message kind for plain text.
pub const MESSAGE_KIND_TEXT: &str = "text";

/// The `history` request.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryRequest {
    /// Request id echoed in the answer.
    pub rid: String,
    /// Conversation to page.
    pub conv: ConvId,
    /// Return messages with `conv_seq < before`; absent = from the newest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<u64>,
    /// Page size, at most [`Limits::max_history_page`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// Conversation kinds.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConvKind {
    /// Exactly two members; at most one per pair of users.
    Direct,
    /// Any number of members up to the server's maximum group size.
    Group,
}

/// The `conv_create` request.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvCreate {
    /// Request id echoed in the answer.
    pub rid: String,
    /// Idempotency key chosen by the client: a retried create with the same key
    /// returns the conversation made the first time.
    pub key: String,
    /// Direct or group.
    pub kind: ConvKind,
    /// Members other than the creator (the creator is always a member).
    pub members: Vec<String>,
    /// Optional display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// The `conv_add` / `conv_remove` requests.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvMember {
    /// Request id echoed in the answer.
    pub rid: String,
    /// The conversation.
    pub conv: ConvId,
    /// The user to add or remove.
    pub user: String,
}

/// Frames a server sends.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ServerFrame {
    /// Answer to `hello`: the session is open.
    Welcome(Welcome),
    /// One inbox entry.
    Entry(InboxEntry),
    /// A send was committed (or had been: `duplicate`).
    Confirm(Confirm),
    /// A send was not accepted. See the code for what to do.
    Rejected(Rejected),
    /// Answer to `ping`.
    Pong {
        /// The user's inbox head when the ping was answered: a connected
        /// client is caught up once its cursor reaches it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        head: Option<Seq>,
    },
    /// Answer to `set_heartbeat`: the interval now in force.
    HeartbeatSet {
        /// Negotiated interval.
        heartbeat_ms: u64,
        /// The server closes the connection after this much silence.
        idle_timeout_ms: u64,
    },
    /// Answer to `history`.
    History(HistoryPage),
    /// Answer to `conv_create`, `conv_add` and `conv_remove`.
    Conv {
        /// The request id.
        rid: String,
        /// The conversation as it is now.
        conv: ConvInfo,
        /// True if this request changed something (false for a repeat).
        changed: bool,
    },
    /// Answer to `conv_list`.
    Convs {
        /// The request id.
        rid: String,
        /// The user's conversations.
        convs: Vec<ConvInfo>,
    },
    /// An ephemeral signal from another member.
    Signal {
        /// The conversation.
        conv: ConvId,
        /// Sender.
        from: String,
        /// Application data.
        #[cfg_attr(feature = "arbitrary", arbitrary(with = crate::frames::arbitrary_json))]
        data: serde_json::Value,
    },
    /// A recoverable problem with one frame; the connection stays open.
    Error(ErrorFrame),
    /// Answer to `push_register`: the registration id pushes carry (opaque,
    /// random; an app with several accounts picks the account by it), or
    /// `null` when the registration was removed.
    Push {
        /// The request id.
        rid: String,
        /// The registration id.
        #[serde(default)]
        id: Option<String>,
    },
    /// Answer to `mute`.
    Muted {
        /// The request id.
        rid: String,
        /// The conversation.
        conv: ConvId,
        /// Muted now (or not).
        muted: bool,
        /// True if this request changed it.
        changed: bool,
    },
}

/// The `welcome` frame.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// Session id, for logs and support.
    pub session: String,
    /// The authenticated user.
    pub user: String,
    /// The device id from `hello`.
    pub device: String,
    /// The heartbeat interval in force.
    pub heartbeat_ms: u64,
    /// The server closes the connection after this much silence from the client.
    pub idle_timeout_ms: u64,
    /// The log's epoch. Store it with the cursor.
    pub epoch: String,
    /// The user's inbox head (highest sequence) at handshake time.
    pub head: Seq,
    /// What the server will replay.
    pub resume: Resume,
    /// Limits the client must respect.
    pub limits: WireLimits,
    /// Push wake-ups this relay can send (absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<PushInfo>,
}

/// Resume outcome in `welcome`.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    /// Complete, gap or new.
    pub status: ResumeStatus,
    /// The first inbox sequence the server will send on this connection.
    pub from: Seq,
    /// Why entries are missing (only with `status = "gap"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<GapReason>,
    /// The inbox sequences the device will never receive (only for `retention`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missed: Option<SeqRange>,
    /// For `gap` and `new`: per conversation, page history strictly before
    /// `before` to fill in what the inbox replay will not bring.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fetch: Vec<FetchHint>,
}

/// Resume status.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResumeStatus {
    /// Every entry after the cursor will be replayed.
    Complete,
    /// Some entries after the cursor are gone (see `reason`).
    Gap,
    /// No cursor was given: replay starts near the head.
    New,
}

/// Why a resume has a gap.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum GapReason {
    /// Entries after the cursor were trimmed by the retention policy.
    Retention,
    /// The cursor is from another epoch of the log (replaced or restored):
    /// the client must forget its cursor; message and conversation ids from the
    /// old epoch must not be trusted to mean the same thing.
    Epoch,
    /// The cursor is ahead of the log in this epoch (the log went backwards);
    /// handled like `epoch`.
    CursorAhead,
}

/// An inclusive range of inbox sequences.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqRange {
    /// First sequence of the range.
    pub first: Seq,
    /// Last sequence of the range.
    pub last: Seq,
}

/// Where to page history for one conversation after a gap.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchHint {
    /// The conversation.
    pub conv: ConvId,
    /// Page history with `before = this`; messages at or after it will arrive
    /// through the inbox replay.
    pub before: u64,
}

/// Limits announced in `welcome`.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireLimits {
    /// Largest frame the server accepts, in bytes.
    pub max_frame_bytes: u64,
    /// Largest message body, in bytes.
    pub max_body_bytes: u64,
    /// Inbox entries the server sends beyond the last ack (credit window).
    pub window: u64,
    /// Sends a client may have unanswered at once.
    pub max_unconfirmed: u64,
    /// Sustained sends per second allowed per connection.
    pub sends_per_sec: u64,
    /// Largest group.
    pub max_group_size: u64,
    /// Largest history page.
    pub max_history_page: u64,
}

/// One inbox entry.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InboxEntry {
    /// Per-user inbox sequence.
    pub seq: Seq,
    /// What happened.
    #[serde(flatten)]
    pub item: EntryItem,
}

/// The content of an inbox entry (serialized as a `"message"` or `"member"` key).
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum EntryItem {
    /// A message in one of the user's conversations.
    Message(Message),
    /// A membership change in one of the user's conversations.
    Member(MemberEvent),
    /// The user read a conversation on one of their devices.
    Read(ReadMark),
    /// The user muted or unmuted a conversation on one of their devices.
    Mute(MuteMark),
}

/// What a relay offers for push wake-ups (in `welcome`).
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushInfo {
    /// The providers a registration may name (`fcm`, `apns`, `webpush`).
    pub providers: Vec<String>,
    /// The relay's VAPID public key (base64url, uncompressed P-256), which a
    /// browser or UnifiedPush distributor needs to subscribe for Web Push.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vapid: Option<String>,
}

/// A conversation muted or unmuted, synced across the user's devices.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MuteMark {
    /// The conversation.
    pub conv: ConvId,
    /// Muted now (or not).
    pub muted: bool,
    /// When, ms since the Unix epoch.
    pub ts: i64,
}

/// A read marker, synced across the user's devices.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadMark {
    /// The conversation.
    pub conv: ConvId,
    /// Messages with `conv_seq <= up_to` are read.
    pub up_to: u64,
    /// When it was recorded, ms since the Unix epoch.
    pub ts: i64,
}

/// A stored message.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Message id.
    pub id: MessageId,
    /// Conversation.
    pub conv: ConvId,
    /// Per-conversation sequence, gap-free from 1. Order never depends on `ts`.
    pub conv_seq: u64,
    /// Sending user.
    pub from: String,
    /// The sender's client id (lets the sending device match its echo).
    pub cid: String,
    /// Message kind.
    pub kind: String,
    /// Body.
    pub body: String,
    /// Commit time, milliseconds since the Unix epoch (display only).
    pub ts: i64,
}

/// A membership change.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberEvent {
    /// The conversation after the change.
    pub conv: ConvInfo,
    /// Who was added or removed.
    pub user: String,
    /// Added or removed.
    pub change: MemberChange,
    /// Who made the change.
    pub by: String,
    /// Commit time, milliseconds since the Unix epoch.
    pub ts: i64,
}

/// Kind of membership change.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberChange {
    /// The user joined (conversations are created by `added` entries too).
    Added,
    /// The user left or was removed.
    Removed,
}

/// A conversation's description.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvInfo {
    /// Conversation id.
    pub id: ConvId,
    /// Direct or group.
    pub kind: ConvKind,
    /// Display name, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Current members.
    pub members: Vec<String>,
    /// Highest `conv_seq` so far (0 = no message yet).
    pub last_seq: u64,
}

/// The `confirm` frame.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirm {
    /// The client id of the send.
    pub cid: String,
    /// Message id.
    pub id: MessageId,
    /// Conversation.
    pub conv: ConvId,
    /// Per-conversation sequence.
    pub conv_seq: u64,
    /// Commit time (ms since the Unix epoch).
    pub ts: i64,
    /// True if this client id had been confirmed before: nothing new was stored.
    #[serde(default)]
    pub duplicate: bool,
    /// The inbox sequence of the sender's own copy (its echo), when the sender
    /// is a member and the message is new: a client that waits until its
    /// cursor reaches it has its own messages stored too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub echo_seq: Option<Seq>,
}

/// The `rejected` frame: one send was not stored.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    /// The client id of the send.
    pub cid: String,
    /// Why. `rate_limited` and `internal` are temporary: retry after
    /// `retry_after_ms`; every other code is permanent for this send.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub message: String,
    /// For temporary codes: wait this long before sending again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

/// The answer to `history`.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryPage {
    /// The request id.
    pub rid: String,
    /// The conversation.
    pub conv: ConvId,
    /// Messages in ascending `conv_seq`, all below the request's `before`.
    pub messages: Vec<Message>,
    /// True if older messages exist before the first one returned.
    pub more: bool,
}

/// The `error` frame.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorFrame {
    /// The request id of the frame at fault, when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rid: Option<String>,
    /// Stable code.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub message: String,
    /// The `type` of the frame at fault, when it could be read (every error
    /// answers one frame; with `rid` and `conv` it says which).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frame: Option<String>,
    /// The conversation of the frame at fault, for frames without a `rid`
    /// (`read`, `signal`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conv: Option<ConvId>,
}

/// A small arbitrary JSON value (for fuzzing: `serde_json::Value` has no
/// `Arbitrary` of its own).
#[cfg(feature = "arbitrary")]
pub fn arbitrary_json(u: &mut arbitrary::Unstructured<'_>) -> arbitrary::Result<serde_json::Value> {
    use serde_json::Value;
    Ok(match u.int_in_range(0..=5u8)? {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => Value::from(u.arbitrary::<i64>()?),
        3 => Value::String(u.arbitrary()?),
        4 => Value::Array(vec![
            Value::String(u.arbitrary()?),
            Value::from(u.arbitrary::<u32>()?),
        ]),
        _ => serde_json::json!({ "k": u.arbitrary::<String>()?, "n": u.arbitrary::<u16>()? }),
    })
}
