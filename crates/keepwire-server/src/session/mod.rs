//! One connection's protocol logic, sans-IO.
//!
//! [`Session`] decides everything a relay does on one WebSocket connection —
//! the handshake, resume, delivery under the credit window, sends and
//! requests answered in order, rate limits, heartbeats, token expiry — and
//! performs no I/O: it reads no clock, owns no socket and calls no store. Its
//! driver (`conn.rs` over tokio, or the simulation in virtual time) feeds it
//! inputs and carries out its outputs, in the style of `quinn-proto`.
//!
//! # Inputs (`handle_*`)
//! - [`Session::handle_transport`]: a WebSocket message or a socket event;
//! - [`Session::handle_store_answer`]: the answer to a [`StoreRequest`];
//! - [`Session::handle_registered`]: the hub's answer to [`Event::Register`];
//! - [`Session::handle_head`]: the user's inbox head advanced (from the hub);
//! - [`Session::handle_control`]: the hub asks to close, or relays a signal;
//! - [`Session::handle_timeout`]: the deadline from `poll_timeout` passed
//!   (spurious calls are no-ops).
//!
//! # Outputs (`poll_*`)
//! After any input, the driver drains, in this order:
//! 1. [`Session::poll_event`] — hub work (register, signals) and notes for logs;
//! 2. [`Session::poll_store_request`] — store operations to run; answers come
//!    back through `handle_store_answer` in any order;
//! 3. [`Session::poll_transmit`] — frames to write (the driver may write them
//!    in one batch) and finally a close code;
//! 4. [`Session::poll_timeout`] — the one deadline to arm.
//!
//! [`Session::wants_frames`] tells the driver whether to read from the socket
//! (it is false while `max_unconfirmed` requests wait for answers:
//! backpressure). [`Session::is_closed`] says the session is over; the driver
//! still runs the remaining store requests (the final ack position) and sends
//! the close frame.
//!
//! # Ordering
//! Every frame that gets an answer (`send`, `history`, `conv_*`, `read`,
//! `signal`, and frames refused by validation or rate limits) takes a slot in
//! one queue; answers leave in slot order, whatever order the store answers
//! in. `pong` and `heartbeat_set` leave at once. Writes are pipelined; a read
//! request waits until this connection's earlier writes are answered (so it
//! sees them), and a connection has at most one store read in flight (inbox
//! reads included).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use keepwire_proto::{
    ClientFrame, CloseCode, Confirm, ConvCreate, ConvId, ConvInfo, Cursor, Hello, HistoryPage,
    InboxEntry, Instant, Limits, Send as SendMsg, Seq, ServerFrame, Welcome, decode_client, encode,
};

use crate::metrics::Metrics;
use crate::ratelimit::{Limiter, SendBudget};
use crate::store::{AuthFailure, AuthedUser, ResumePlan, StoreError, UserId};

mod answers;
mod open;
#[cfg(test)]
mod tests;

use answers::Answers;

/// Most inbox entries read from the store at once.
pub const READ_BATCH: u64 = 256;
/// How often a connection persists its device's acknowledged position.
pub const ACK_FLUSH: Duration = Duration::from_secs(1);
/// Requests (other than sends) per second per connection, and twice that as burst.
pub const REQUESTS_PER_SEC: u32 = 100;

/// A session's request id (unique within the session).
pub type RequestId = u64;

/// Heartbeat bounds (PROTOCOL.md §9).
#[derive(Debug, Clone, Copy)]
pub struct HeartbeatBounds {
    /// When the client asks for none.
    pub default: Duration,
    /// Shortest allowed.
    pub min: Duration,
    /// Longest allowed.
    pub max: Duration,
    /// Least slack between the heartbeat and the idle timeout.
    pub grace: Duration,
}

impl HeartbeatBounds {
    /// The heartbeat granted for a requested one (milliseconds; clamped to
    /// the bounds), and the idle timeout that goes with it.
    pub fn negotiate(&self, requested_ms: Option<u64>) -> (Duration, Duration) {
        let hb = requested_ms
            .map(Duration::from_millis)
            .unwrap_or(self.default)
            .clamp(self.min, self.max.max(self.min));
        (hb, hb + (hb / 2).max(self.grace))
    }
}

/// What every session of one relay shares.
pub struct SessionConfig {
    /// Protocol limits.
    pub limits: Limits,
    /// Burst of the per-connection send bucket.
    pub send_burst: u32,
    /// Time allowed for a valid `hello`.
    pub handshake_timeout: Duration,
    /// Heartbeat bounds.
    pub heartbeat: HeartbeatBounds,
    /// A new device's replay window when `hello` names none.
    pub history_window: u64,
    /// The largest replay window a `hello` may ask for (larger ones are clamped).
    pub max_history_window: u64,
    /// Who may put users into conversations.
    pub member_adds: crate::MemberAdds,
    /// Push wake-ups, when configured.
    pub push: Option<Arc<dyn PushPolicy>>,
    /// The budget each user's connections share.
    pub user_budget: Arc<dyn SendBudget>,
    /// Where to count.
    pub metrics: Arc<Metrics>,
}

/// Checks push registrations against the relay's push configuration (pure:
/// no I/O).
pub trait PushPolicy: Send + Sync {
    /// What to store for a `push_register`'s registration, or why it is
    /// refused (an unknown provider, one not configured, an APNs topic that
    /// is not one of the app's, a malformed token or key).
    fn check(
        &self,
        registration: &serde_json::Value,
        previews: bool,
    ) -> Result<crate::store::NewPush, String>;
    /// What `welcome.push` says.
    fn info(&self) -> keepwire_proto::PushInfo;
}

/// A WebSocket message or socket event, for [`Session::handle_transport`].
#[derive(Debug)]
pub enum TransportEvent<'a> {
    /// A text message.
    Text(&'a str),
    /// A binary message (not allowed: 1003).
    Binary,
    /// A WebSocket ping or pong (activity only).
    Control,
    /// A message over the frame limit (1009).
    TooBig,
    /// A text message that is not UTF-8 (1007).
    InvalidUtf8,
    /// Broken WebSocket framing, e.g. a reserved opcode (1002).
    ProtocolError,
    /// The peer closed, or the socket failed.
    Closed,
}

/// Something to write to the socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transmit {
    /// An encoded frame.
    Text(String),
    /// Close with this code; nothing follows.
    Close(CloseCode),
}

/// Work for the driver other than the store and the socket.
#[derive(Debug)]
pub enum Event {
    /// Register the connection with the hub (replacing an older connection
    /// of the device); answer with [`Session::handle_registered`].
    Register {
        /// The user.
        user: UserId,
        /// The device.
        device: String,
        /// The token's id, for revocations.
        token_id: Option<i64>,
        /// The hello's connection generation.
        generation: Option<u64>,
        /// The hello's `transient` flag (a push wake-up's short connection).
        transient: bool,
    },
    /// Deliver a signal to these users' other connections (best effort).
    Signal {
        /// The conversation's members.
        members: Vec<UserId>,
        /// The frame.
        frame: Box<ServerFrame>,
    },
    /// The handshake finished; the session is open (for logs).
    Opened {
        /// Who.
        user: String,
        /// Which device.
        device: String,
        /// The first entry this connection sends.
        from: Seq,
        /// The inbox head at the handshake.
        head: Seq,
    },
}

/// A store operation for the driver to run.
#[derive(Debug, Clone)]
pub enum StoreRequest {
    /// Check a `hello` token for a device (answer: [`StoreAnswer::Auth`]).
    Authenticate {
        /// The bearer token.
        token: String,
        /// The hello's device.
        device: String,
    },
    /// Record that a device connected ([`StoreAnswer::Done`]).
    TouchDevice {
        /// The user.
        user: UserId,
        /// The device.
        device: String,
        /// The keepwire token it used.
        token_id: Option<i64>,
    },
    /// Plan the resume ([`StoreAnswer::Resume`]).
    Resume {
        /// The user.
        user: UserId,
        /// The hello's cursor.
        cursor: Option<Cursor>,
        /// A new device's window.
        window: u64,
    },
    /// Read inbox entries ([`StoreAnswer::Inbox`]); the driver may answer
    /// from the hub's tail.
    ReadInbox {
        /// The user.
        user: UserId,
        /// The first sequence.
        from: Seq,
        /// At most this many.
        limit: u64,
    },
    /// Store a message ([`StoreAnswer::Confirm`]).
    Send {
        /// The sender.
        user: UserId,
        /// The sending device.
        device: String,
        /// The send.
        send: SendMsg,
    },
    /// A page of history ([`StoreAnswer::History`]).
    History {
        /// The reader.
        user: UserId,
        /// The conversation.
        conv: ConvId,
        /// Below this `conv_seq`.
        before: Option<u64>,
        /// At most this many.
        limit: u32,
    },
    /// Create a conversation ([`StoreAnswer::Conv`]).
    ConvCreate {
        /// The creator.
        user: UserId,
        /// The request.
        req: ConvCreate,
    },
    /// Add or remove a member ([`StoreAnswer::Conv`]).
    ConvMember {
        /// Who asks.
        user: UserId,
        /// The conversation.
        conv: ConvId,
        /// The member added or removed.
        target: String,
        /// Add (or remove).
        add: bool,
    },
    /// The user's conversations ([`StoreAnswer::Convs`]).
    ConvList {
        /// The user.
        user: UserId,
    },
    /// Move a read marker ([`StoreAnswer::Done`]).
    MarkRead {
        /// The user.
        user: UserId,
        /// The conversation.
        conv: ConvId,
        /// Up to this `conv_seq`.
        up_to: u64,
    },
    /// A conversation's members, for a signal ([`StoreAnswer::Members`]).
    ConvMembers {
        /// A member asking.
        user: UserId,
        /// The conversation.
        conv: ConvId,
    },
    /// Set or remove the device's push registration ([`StoreAnswer::Push`]).
    SetPush {
        /// The user.
        user: UserId,
        /// The device.
        device: String,
        /// The registration (`None` removes it).
        push: Option<crate::store::NewPush>,
    },
    /// Mute or unmute a conversation ([`StoreAnswer::Muted`]).
    Mute {
        /// The user.
        user: UserId,
        /// The conversation.
        conv: ConvId,
        /// Muted (or not).
        muted: bool,
    },
    /// Persist the device's acknowledged position ([`StoreAnswer::Done`]).
    RecordAck {
        /// The user.
        user: UserId,
        /// The device.
        device: String,
        /// The position.
        seq: Seq,
    },
}

impl StoreRequest {
    /// Whether the request writes (pipelined) or reads (one at a time, after
    /// earlier writes).
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            StoreRequest::TouchDevice { .. }
                | StoreRequest::Send { .. }
                | StoreRequest::ConvCreate { .. }
                | StoreRequest::ConvMember { .. }
                | StoreRequest::MarkRead { .. }
                | StoreRequest::SetPush { .. }
                | StoreRequest::Mute { .. }
                | StoreRequest::RecordAck { .. }
        )
    }
}

/// An inbox entry for delivery: encoded once by the hub for every member,
/// or read from the store.
#[derive(Debug, Clone)]
pub enum Outgoing {
    /// From the hub's tail: the sequence and the item's JSON.
    Encoded(Seq, Arc<str>),
    /// From the store.
    Entry(InboxEntry),
}

impl Outgoing {
    /// The entry's sequence.
    pub fn seq(&self) -> Seq {
        match self {
            Outgoing::Encoded(seq, _) => *seq,
            Outgoing::Entry(e) => e.seq,
        }
    }

    fn into_text(self) -> String {
        match self {
            Outgoing::Encoded(seq, item) => keepwire_proto::encode_entry(seq, &item),
            Outgoing::Entry(e) => encode(&ServerFrame::Entry(e)),
        }
    }
}

/// The answer to a [`StoreRequest`].
#[derive(Debug)]
pub enum StoreAnswer {
    /// The user, and how long the token stays valid.
    Auth(Result<(AuthedUser, Duration), StoreError>),
    /// Done (or not).
    Done(Result<(), StoreError>),
    /// The resume plan.
    Resume(Result<ResumePlan, StoreError>),
    /// Entries from `from`, in order.
    Inbox(Result<Vec<Outgoing>, StoreError>),
    /// A send's confirmation.
    Confirm(Result<Confirm, StoreError>),
    /// A history page.
    History(Result<HistoryPage, StoreError>),
    /// A conversation and whether it changed.
    Conv(Result<(ConvInfo, bool), StoreError>),
    /// Conversations.
    Convs(Result<Vec<ConvInfo>, StoreError>),
    /// Members.
    Members(Result<Vec<UserId>, StoreError>),
    /// The registration id (or none, after a removal).
    Push(Result<Option<String>, StoreError>),
    /// Whether a mute changed something.
    Muted(Result<bool, StoreError>),
}

/// The session's state (rustls style: each state says what it waits for).
#[derive(Debug)]
enum Phase {
    /// Waiting for `hello` until the handshake deadline.
    AwaitingHello,
    /// The `hello` token is being checked.
    Authenticating(Box<Hello>),
    /// Authenticated; the hub is registering the connection.
    Registering(Box<Hello>),
    /// Registered; recording the device, then planning the resume.
    Opening(Box<Hello>),
    /// `welcome` sent: frames flow.
    Open,
    /// Over: a close code was sent, or the peer went away.
    Closed,
}

/// Who is on the other end (known after authentication).
#[derive(Debug)]
struct Peer {
    user: AuthedUser,
    device: String,
}

/// The in-flight read: an inbox batch (with the head known when it was
/// asked for), or a request's.
#[derive(Debug, Clone, Copy)]
enum Read {
    Inbox { id: RequestId, head: Seq },
    Request(RequestId),
}

/// One connection's protocol state. See the [module docs](self) for the
/// method groups and the poll order.
pub struct Session {
    cfg: Arc<SessionConfig>,
    phase: Phase,
    peer: Option<Box<Peer>>,
    /// A seed for the session id shown in `welcome`.
    seed: u64,
    /// The next inbox sequence to send.
    next: Seq,
    /// The highest sequence the device acknowledged.
    acked: Seq,
    /// The credit window granted in `welcome` (entries beyond `acked`).
    window: u64,
    /// The highest inbox head known (plan, hub notices).
    head: Seq,
    heartbeat: Duration,
    idle_timeout: Duration,
    /// The handshake deadline, then the idle deadline.
    idle_deadline: Instant,
    token_deadline: Option<Instant>,
    /// When to persist the ack position (at most once per [`ACK_FLUSH`]).
    ack_flush_at: Option<Instant>,
    limiter: Option<Box<Limiter>>,
    protocol_errors: u32,
    next_id: RequestId,
    /// The session's own requests in flight (handshake steps).
    control_request: Option<RequestId>,
    read: Option<Read>,
    writes_in_flight: u32,
    /// Answers in request order.
    answers: Answers,
    /// Requests not yet issued (a read behind writes, or behind another read).
    waiting: VecDeque<(RequestId, StoreRequest)>,
    requests: VecDeque<(RequestId, StoreRequest)>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
}

impl Session {
    /// A session for a connection just upgraded at `now`. `seed` makes the
    /// session id.
    pub fn new(cfg: Arc<SessionConfig>, seed: u64, now: Instant) -> Session {
        let (heartbeat, idle_timeout) = cfg.heartbeat.negotiate(None);
        let idle_deadline = now + cfg.handshake_timeout;
        let window = cfg.limits.window;
        Session {
            cfg,
            phase: Phase::AwaitingHello,
            peer: None,
            seed,
            next: 1,
            acked: 0,
            window,
            head: 0,
            heartbeat,
            idle_timeout,
            idle_deadline,
            token_deadline: None,
            ack_flush_at: None,
            limiter: None,
            protocol_errors: 0,
            next_id: 1,
            control_request: None,
            read: None,
            writes_in_flight: 0,
            answers: Answers::default(),
            waiting: VecDeque::new(),
            requests: VecDeque::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    // -- outputs ------------------------------------------------------------

    /// The next piece of hub work.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next store operation to run.
    #[must_use]
    pub fn poll_store_request(&mut self) -> Option<(RequestId, StoreRequest)> {
        self.requests.pop_front()
    }

    /// The next frame to write, or the close.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// When to call [`Session::handle_timeout`].
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        if matches!(self.phase, Phase::Closed) {
            return None;
        }
        let mut t = self.idle_deadline;
        for d in [self.token_deadline, self.ack_flush_at]
            .into_iter()
            .flatten()
        {
            t = t.min(d);
        }
        Some(t)
    }

    /// Whether the driver should read the next message from the socket.
    pub fn wants_frames(&self) -> bool {
        match self.phase {
            Phase::AwaitingHello => true,
            Phase::Open => self.answers.len() < self.cfg.limits.max_unconfirmed,
            _ => false,
        }
    }

    /// Whether the session is over (after its close transmit).
    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    /// The user and device, once authenticated.
    pub fn peer(&self) -> Option<(&AuthedUser, &str)> {
        self.peer.as_deref().map(|p| (&p.user, p.device.as_str()))
    }

    /// The next sequence to deliver and the acknowledged one (for logs).
    pub fn positions(&self) -> (Seq, Seq) {
        (self.next, self.acked)
    }

    // -- inputs -------------------------------------------------------------

    /// A message or event from the socket.
    pub fn handle_transport(&mut self, event: TransportEvent<'_>, now: Instant) {
        if matches!(self.phase, Phase::Closed) {
            return;
        }
        let text = match event {
            TransportEvent::Text(t) => t,
            TransportEvent::Control => {
                self.activity(now);
                return;
            }
            TransportEvent::Binary => return self.close(CloseCode::UnsupportedData),
            TransportEvent::TooBig => return self.close(CloseCode::MessageTooBig),
            TransportEvent::InvalidUtf8 => return self.close(CloseCode::InvalidPayload),
            TransportEvent::ProtocolError => return self.close(CloseCode::ProtocolError),
            TransportEvent::Closed => return self.gone(),
        };
        match self.phase {
            Phase::AwaitingHello => self.handle_hello(text),
            Phase::Open => {
                self.activity(now);
                self.handle_frame(text, now);
            }
            // Nothing is read while the handshake runs (`wants_frames`).
            _ => {}
        }
    }

    /// The hub's answer to [`Event::Register`]: the user's inbox head, or
    /// the close code that refuses the connection.
    pub fn handle_registered(&mut self, result: Result<Seq, CloseCode>, _now: Instant) {
        let Phase::Registering(_) = self.phase else {
            return;
        };
        let Phase::Registering(hello) = std::mem::replace(&mut self.phase, Phase::Closed) else {
            unreachable!()
        };
        match result {
            Err(code) => {
                self.phase = Phase::Open;
                self.close(code);
            }
            Ok(head) => {
                self.head = self.head.max(head);
                let peer = self.peer.as_ref().expect("authenticated");
                let req = StoreRequest::TouchDevice {
                    user: peer.user.id,
                    device: peer.device.clone(),
                    token_id: peer.user.token_id,
                };
                self.phase = Phase::Opening(hello);
                self.control_request = Some(self.issue_now(req));
            }
        }
    }

    /// The user's inbox head advanced to `head`.
    pub fn handle_head(&mut self, head: Seq, _now: Instant) {
        self.head = self.head.max(head);
        self.pump();
    }

    /// The hub asks this connection to close, or relays a signal.
    pub fn handle_control(&mut self, control: crate::hub::Control, _now: Instant) {
        match control {
            crate::hub::Control::Close(code) => self.close(code),
            crate::hub::Control::Frame(f) => {
                if matches!(self.phase, Phase::Open) {
                    self.transmits.push_back(Transmit::Text(encode(&*f)));
                }
            }
        }
    }

    /// A deadline may have passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        if matches!(self.phase, Phase::Closed) {
            return;
        }
        if self.ack_flush_at.is_some_and(|t| t <= now) {
            self.flush_ack();
        }
        if self.idle_deadline <= now {
            let code = if matches!(self.phase, Phase::Open) {
                CloseCode::HeartbeatTimeout
            } else {
                CloseCode::HandshakeTimeout
            };
            return self.close(code);
        }
        if self.token_deadline.is_some_and(|t| t <= now) {
            self.close(CloseCode::TokenExpired);
        }
    }

    /// The answer to request `id`.
    pub fn handle_store_answer(&mut self, id: RequestId, answer: StoreAnswer, now: Instant) {
        if self.control_request == Some(id) {
            self.control_request = None;
            return self.handle_handshake_answer(answer, now);
        }
        match self.read {
            Some(Read::Inbox { id: r, head }) if r == id => {
                self.read = None;
                if let StoreAnswer::Inbox(res) = answer {
                    self.deliver(res, head);
                }
                return self.pump();
            }
            Some(Read::Request(r)) if r == id => self.read = None,
            _ => {
                if matches!(answer, StoreAnswer::Done(_)) && !self.answers.contains(id) {
                    // An ack position was persisted (or not: the next flush retries).
                    return;
                }
                self.writes_in_flight = self.writes_in_flight.saturating_sub(1);
            }
        }
        if let Some(kind) = self.answers.take_kind(id) {
            let frame = self.answer_frame(kind, answer, now);
            self.answers.fill(id, frame);
            while let Some(frame) = self.answers.pop_ready() {
                if let Some(f) = frame {
                    self.transmits.push_back(Transmit::Text(f));
                }
            }
        }
        self.pump();
    }

    // -- handshake ----------------------------------------------------------

    fn handle_hello(&mut self, text: &str) {
        match decode_client(text, &self.cfg.limits) {
            Ok(ClientFrame::Hello(h)) => {
                let req = StoreRequest::Authenticate {
                    token: h.token.clone(),
                    device: h.device.clone(),
                };
                self.phase = Phase::Authenticating(Box::new(h));
                self.control_request = Some(self.issue_now(req));
            }
            _ => self.close(CloseCode::ProtocolViolation),
        }
    }

    fn handle_handshake_answer(&mut self, answer: StoreAnswer, now: Instant) {
        match (std::mem::replace(&mut self.phase, Phase::Closed), answer) {
            (Phase::Authenticating(hello), StoreAnswer::Auth(res)) => match res {
                Ok((user, valid_for)) => {
                    self.token_deadline = Some(now + valid_for);
                    self.events.push_back(Event::Register {
                        user: user.id,
                        device: hello.device.clone(),
                        token_id: user.token_id,
                        generation: hello.generation,
                        transient: hello.transient,
                    });
                    self.peer = Some(Box::new(Peer {
                        user,
                        device: hello.device.clone(),
                    }));
                    self.phase = Phase::Registering(hello);
                }
                Err(e) => self.refuse_auth(e),
            },
            (Phase::Opening(hello), StoreAnswer::Done(res)) => {
                if let Err(e) = res {
                    tracing::error!(target: "keepwire::ws", error = %e, "recording the device failed");
                    return self.close_from(Phase::Opening(hello), CloseCode::InternalError);
                }
                let window = hello
                    .history
                    .unwrap_or(self.cfg.history_window)
                    .min(self.cfg.max_history_window);
                let peer = self.peer.as_ref().expect("authenticated");
                let req = StoreRequest::Resume {
                    user: peer.user.id,
                    cursor: hello.cursor.clone(),
                    window,
                };
                self.phase = Phase::Opening(hello);
                self.control_request = Some(self.issue_now(req));
            }
            (Phase::Opening(hello), StoreAnswer::Resume(res)) => match res {
                Ok(plan) => self.open(&hello, plan, now),
                Err(e) => {
                    tracing::error!(target: "keepwire::ws", error = %e, "planning the resume failed");
                    self.close_from(Phase::Opening(hello), CloseCode::InternalError);
                }
            },
            (phase, _) => self.phase = phase,
        }
    }

    fn refuse_auth(&mut self, e: StoreError) {
        let code = match e {
            StoreError::Auth(AuthFailure::Unknown) => CloseCode::AuthFailed,
            StoreError::Auth(AuthFailure::Expired) => CloseCode::TokenExpired,
            StoreError::Auth(AuthFailure::Revoked) => CloseCode::TokenRevoked,
            StoreError::Auth(AuthFailure::DeviceRevoked) => CloseCode::DeviceRevoked,
            other => {
                tracing::error!(target: "keepwire::ws", error = %other, "authentication failed internally");
                CloseCode::InternalError
            }
        };
        self.close_from(Phase::Open, code);
    }

    fn close_from(&mut self, phase: Phase, code: CloseCode) {
        self.phase = phase;
        self.close(code);
    }

    fn open(&mut self, hello: &Hello, plan: ResumePlan, now: Instant) {
        let (heartbeat, idle_timeout) = self.cfg.heartbeat.negotiate(hello.heartbeat_ms);
        self.heartbeat = heartbeat;
        self.idle_timeout = idle_timeout;
        self.idle_deadline = now + idle_timeout;
        self.next = plan.resume.from;
        self.acked = plan.resume.from.saturating_sub(1);
        self.head = self.head.max(plan.head);
        // The position the device connected with is recorded at once.
        self.ack_flush_at = Some(now);
        let limits = &self.cfg.limits;
        self.window = limits.grant_window(hello.window);
        self.limiter = Some(Box::new(Limiter::new(
            limits.sends_per_sec,
            self.cfg.send_burst,
            REQUESTS_PER_SEC,
            limits.max_unconfirmed as u32,
            now,
        )));
        let peer = self.peer.as_ref().expect("authenticated");
        let welcome = ServerFrame::Welcome(Welcome {
            session: format!("{:016x}", self.seed),
            user: peer.user.name.clone(),
            device: peer.device.clone(),
            heartbeat_ms: heartbeat.as_millis() as u64,
            idle_timeout_ms: idle_timeout.as_millis() as u64,
            epoch: plan.epoch,
            head: plan.head,
            resume: plan.resume,
            limits: limits.wire(self.window),
            push: self.cfg.push.as_ref().map(|p| p.info()),
        });
        self.events.push_back(Event::Opened {
            user: peer.user.name.clone(),
            device: peer.device.clone(),
            from: self.next,
            head: self.head,
        });
        self.transmits.push_back(Transmit::Text(encode(&welcome)));
        self.phase = Phase::Open;
        self.pump();
    }
}
