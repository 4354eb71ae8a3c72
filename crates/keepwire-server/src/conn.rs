//! One WebSocket connection: handshake, then a loop that multiplexes client
//! frames, inbox delivery under the credit window, send confirmations, hub
//! control messages and timers.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::stream::{FuturesOrdered, SplitSink, SplitStream};
use futures_util::{SinkExt as _, StreamExt as _};
use keepwire_proto::{
    ClientFrame, CloseCode, Confirm, ErrorCode, ErrorFrame, Hello, InboxEntry, Rejected, Seq,
    ServerFrame, Welcome, decode_client, encode,
};
use tokio::time::{Instant, sleep_until, timeout};
use tracing::Instrument as _;

use crate::Shared;
use crate::hub::{Control, ControlQueue, RegisterError};
use crate::store::{Actor, AuthFailure, AuthedUser, StoreError};

/// Most inbox entries read from the store at once.
const READ_BATCH: u64 = 256;
/// How often a connection persists its device's acknowledged position.
const ACK_FLUSH: Duration = Duration::from_secs(1);
/// How long to wait for the peer's close reply after sending a close frame.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

type Tx = SplitSink<WebSocket, Message>;
type Rx = SplitStream<WebSocket>;
type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;
/// An inbox read in flight: the limit it was started with, and the read.
type InboxRead = (u64, BoxFut<Result<Vec<Outgoing>, StoreError>>);

/// Why a connection ended, for logs.
enum End {
    /// We closed it with this code.
    Closed(CloseCode),
    /// The peer closed it or the socket failed.
    Gone,
}

/// Runs a connection to completion.
pub(crate) fn run(
    socket: WebSocket,
    shared: Arc<Shared>,
    peer: SocketAddr,
) -> impl std::future::Future<Output = ()> {
    // Split before the future exists: an argument of an async fn keeps its
    // space in the future for its whole life, even after it is moved out,
    // and a WebSocket is big. Every idle connection would carry it twice.
    let (tx, rx) = socket.split();
    run_split(tx, rx, shared, peer)
}

async fn run_split(mut tx: Tx, mut rx: Rx, shared: Arc<Shared>, peer: SocketAddr) {
    let span = tracing::info_span!(target: "keepwire::ws", "conn", %peer, user = tracing::field::Empty, device = tracing::field::Empty, session = tracing::field::Empty);
    async move {
        // Bound first: a future in a `match` scrutinee lives until the end of
        // the match, and the handshake's would sit in every connection's
        // task for its whole life.
        let handshake = handshake(&mut rx, &shared).await;
        let end = match handshake {
            Ok((user, hello)) => {
                let span = tracing::Span::current();
                span.record("user", user.name.as_str());
                span.record("device", hello.device.as_str());
                session(&mut tx, &mut rx, &shared, user, Box::new(hello)).await
            }
            Err(end) => end,
        };
        if let End::Closed(code) = end {
            shared
                .metrics
                .closes
                .get_or_create(&crate::metrics::CodeLabel { code: code.code() })
                .inc();
            close(&mut tx, &mut rx, code).await;
            tracing::debug!(target: "keepwire::ws", code = code.code(), "closed");
        }
    }
    .instrument(span)
    .await
}

async fn close(tx: &mut Tx, rx: &mut Rx, code: CloseCode) {
    let frame = CloseFrame {
        code: code.code(),
        reason: code.reason().into(),
    };
    if timeout(CLOSE_LINGER, tx.send(Message::Close(Some(frame))))
        .await
        .is_err()
    {
        return;
    }
    // Wait briefly for the peer's close reply so the close is clean.
    let _ = timeout(CLOSE_LINGER, async {
        while let Some(Ok(m)) = rx.next().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

fn is_too_big(err: &axum::Error) -> bool {
    use std::error::Error as _;
    let mut source: Option<&(dyn std::error::Error + 'static)> = err.source();
    while let Some(e) = source {
        if let Some(tungstenite::Error::Capacity(_)) = e.downcast_ref::<tungstenite::Error>() {
            return true;
        }
        source = e.source();
    }
    false
}

use tokio_tungstenite::tungstenite;

async fn handshake(rx: &mut Rx, shared: &Shared) -> Result<(AuthedUser, Hello), End> {
    let deadline = Instant::now() + shared.config.handshake_timeout;
    let hello = loop {
        let msg = tokio::select! {
            _ = shared.shutdown.cancelled() => return Err(End::Closed(CloseCode::GoingAway)),
            r = timeout_at(deadline, rx.next()) => match r {
                None => return Err(End::Closed(CloseCode::HandshakeTimeout)),
                Some(m) => m,
            },
        };
        match msg {
            None => return Err(End::Gone),
            Some(Err(e)) if is_too_big(&e) => return Err(End::Closed(CloseCode::MessageTooBig)),
            Some(Err(_)) => return Err(End::Gone),
            Some(Ok(Message::Text(t))) => match decode_client(t.as_str(), &shared.config.limits) {
                Ok(ClientFrame::Hello(h)) => break h,
                Ok(_) | Err(_) => return Err(End::Closed(CloseCode::ProtocolViolation)),
            },
            Some(Ok(Message::Binary(_))) => return Err(End::Closed(CloseCode::UnsupportedData)),
            Some(Ok(Message::Close(_))) => return Err(End::Gone),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
        }
    };
    match shared.auth.authenticate(&hello.token, &hello.device).await {
        Ok(user) => Ok((user, hello)),
        Err(StoreError::Auth(f)) => Err(End::Closed(match f {
            AuthFailure::Unknown => CloseCode::AuthFailed,
            AuthFailure::Expired => CloseCode::TokenExpired,
            AuthFailure::Revoked => CloseCode::TokenRevoked,
            AuthFailure::DeviceRevoked => CloseCode::DeviceRevoked,
        })),
        Err(e) => {
            tracing::error!(target: "keepwire::ws", error = %e, "authentication failed internally");
            Err(End::Closed(CloseCode::InternalError))
        }
    }
}

/// `tokio::time::timeout_at` that yields `None` on timeout.
async fn timeout_at<F: Future>(deadline: Instant, f: F) -> Option<F::Output> {
    tokio::time::timeout_at(deadline, f).await.ok()
}

struct Writer<'a> {
    tx: &'a mut Tx,
    write_timeout: Duration,
}

/// An inbox entry to write: encoded by the hub once for every member, or
/// read from the store.
enum Outgoing {
    Encoded(Seq, Arc<str>),
    Entry(InboxEntry),
}

impl Outgoing {
    fn seq(&self) -> Seq {
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

/// The writer's futures are boxed: each holds a write-timeout timer, and
/// inline they would make every idle connection's task larger by their sum.
type WriteFut<'a> = Pin<Box<dyn Future<Output = Result<(), End>> + Send + 'a>>;

impl Writer<'_> {
    /// Queues encoded text without flushing.
    fn feed_text(&mut self, text: String) -> WriteFut<'_> {
        Box::pin(async move {
            match timeout(self.write_timeout, self.tx.feed(Message::Text(text.into()))).await {
                Ok(Ok(())) => Ok(()),
                _ => Err(End::Gone),
            }
        })
    }

    fn flush(&mut self) -> WriteFut<'_> {
        Box::pin(async move {
            match timeout(self.write_timeout, self.tx.flush()).await {
                Ok(Ok(())) => Ok(()),
                _ => Err(End::Gone),
            }
        })
    }

    fn send<'a>(&'a mut self, frame: &ServerFrame) -> WriteFut<'a> {
        let text = encode(frame);
        Box::pin(async move {
            self.feed_text(text).await?;
            self.flush().await
        })
    }
}

fn error_frame(rid: Option<String>, code: ErrorCode, message: impl Into<String>) -> ServerFrame {
    ServerFrame::Error(ErrorFrame {
        rid,
        code,
        message: message.into(),
    })
}

/// Maps a store error on a request to an error frame.
fn request_error(shared: &Shared, rid: &str, e: StoreError) -> ServerFrame {
    let (code, msg) = match e {
        StoreError::Refused(code, msg) => (code, msg),
        other => {
            tracing::error!(target: "keepwire::ws", error = %other, "request failed");
            (
                ErrorCode::Internal,
                "the server failed to handle the request; retry later".to_owned(),
            )
        }
    };
    shared
        .metrics
        .errors
        .get_or_create(&crate::metrics::ResultLabel {
            result: code.to_string(),
        })
        .inc();
    error_frame(Some(rid.to_owned()), code, msg)
}

async fn session(
    tx: &mut Tx,
    rx: &mut Rx,
    shared: &Arc<Shared>,
    user: AuthedUser,
    // Boxed and taken apart at once: an argument keeps its space in the
    // future for the whole connection, and the token is not needed again.
    hello: Box<Hello>,
) -> End {
    let Hello {
        device,
        cursor,
        heartbeat_ms,
        history,
        ..
    } = *hello;
    let config = &shared.config;
    let limits = &config.limits;
    let store = shared.store.clone();
    let control = Arc::new(ControlQueue::default());
    let mut reg = match shared.hub.register(
        user.id,
        &device,
        user.token_id,
        config.max_connections_per_user,
        control.clone(),
    ) {
        Ok(r) => r,
        Err(RegisterError::TooManyConnections) => {
            return End::Closed(CloseCode::TooManyConnections);
        }
    };
    // Shutdown reaches registered sessions through the hub (no timer or
    // cancellation future in every idle connection's task).
    if shared.shutdown.is_cancelled() {
        return End::Closed(CloseCode::GoingAway);
    }
    if let Err(e) = store.touch_device(user.id, &device).await {
        tracing::error!(target: "keepwire::ws", error = %e, "recording the device failed");
        return End::Closed(CloseCode::InternalError);
    }
    let window = history
        .unwrap_or(config.history_window)
        .min(config.max_history_window);
    let plan = match store.resume(user.id, cursor.as_ref(), window).await {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(target: "keepwire::ws", error = %e, "planning the resume failed");
            return End::Closed(CloseCode::InternalError);
        }
    };
    let (mut heartbeat, mut idle_timeout) = config.negotiate_heartbeat(heartbeat_ms);
    let session_id = format!("{:016x}", rand::random::<u64>());
    tracing::Span::current().record("session", session_id.as_str());
    let mut w = Writer {
        tx,
        write_timeout: config.write_timeout,
    };
    let welcome = Box::new(ServerFrame::Welcome(Welcome {
        session: session_id,
        user: user.name.clone(),
        device: device.clone(),
        heartbeat_ms: heartbeat.as_millis() as u64,
        idle_timeout_ms: idle_timeout.as_millis() as u64,
        epoch: store.epoch(),
        head: plan.head,
        resume: plan.resume.clone(),
        limits: limits.wire(),
    }));
    let sent = w.send(&welcome).await;
    drop(welcome);
    if let Err(e) = sent {
        return e;
    }
    shared.metrics.connections_opened.inc();
    shared.metrics.connections_open.inc();
    let _open = scopeguard(|| {
        shared.metrics.connections_open.dec();
    });
    tracing::info!(target: "keepwire::ws", status = ?plan.resume.status, from = plan.resume.from, head = plan.head, "connected");

    // Delivery state: `next` is the next inbox sequence to send; the client
    // may hold at most `window` entries beyond its last ack.
    let mut next: Seq = plan.resume.from;
    let plan_head = plan.head;
    drop(plan);
    let mut acked: Seq = next.saturating_sub(1);
    // When to record the device's ack position (at most once per ACK_FLUSH;
    // at once for the position it connected with).
    let mut ack_flush_at: Option<Instant> = Some(Instant::now());
    let mut want_read = true;
    let mut read: Option<InboxRead> = None;
    let mut pending = PendingSends::default();
    let mut bucket =
        crate::ratelimit::TokenBucket::new(limits.sends_per_sec, config.send_burst, Instant::now());
    let mut penalty_until: Option<Instant> = None;
    let mut penalty_sends: usize = 0;
    let mut paused_on: Option<String> = None;
    let mut protocol_errors: u32 = 0;
    let mut idle_deadline = Instant::now() + idle_timeout;
    let token_deadline = deadline_from_unix_ms(user.expires_at_ms);

    let end = loop {
        let credit = (acked + limits.window + 1).saturating_sub(next);
        if read.is_none() && want_read && credit > 0 {
            reg.head.borrow_and_update();
            let limit = credit.min(READ_BATCH);
            let uid = user.id;
            // Live entries come from the hub's tail, encoded once for all
            // members; a backlog from the store.
            let fut: BoxFut<Result<Vec<Outgoing>, StoreError>> =
                match shared.hub.recent(uid, next, limit as usize) {
                    Some(entries) => Box::pin(std::future::ready(Ok(entries
                        .into_iter()
                        .map(|(seq, json)| Outgoing::Encoded(seq, json))
                        .collect()))),
                    None => {
                        let store = store.clone();
                        Box::pin(async move {
                            let entries = store.read_inbox(uid, next, limit as usize).await?;
                            Ok(entries.into_iter().map(Outgoing::Entry).collect())
                        })
                    }
                };
            read = Some((limit, fut));
        }
        tokio::select! {
            biased;
            ctl = control.recv() => match ctl {
                Control::Close(code) => break End::Closed(code),
                Control::Frame(f) => {
                    if let Err(e) = w.send(&f).await { break e; }
                }
            },
            res = async { (&mut read.as_mut().expect("guarded").1).await }, if read.is_some() => {
                let limit = read.take().map(|r| r.0).unwrap_or(0);
                match res {
                    Ok(entries) => {
                        want_read = entries.len() as u64 == limit && limit > 0;
                        let n = entries.len() as u64;
                        let mut failed = None;
                        for e in entries {
                            if e.seq() != next {
                                // Retention trimmed entries this connection had
                                // not sent yet: the client must reconnect and get
                                // the gap answer in `welcome`.
                                tracing::warn!(target: "keepwire::ws", expected = next, got = e.seq(), "entries trimmed under a live connection");
                                failed = Some(End::Closed(CloseCode::Resync));
                                break;
                            }
                            if let Err(err) = w.feed_text(e.into_text()).await {
                                failed = Some(err);
                                break;
                            }
                            next += 1;
                        }
                        if let Some(f) = failed { break f; }
                        if let Err(e) = w.flush().await { break e; }
                        shared.metrics.deliveries.inc_by(n);
                    }
                    Err(e) => {
                        tracing::error!(target: "keepwire::ws", error = %e, "reading the inbox failed");
                        break End::Closed(CloseCode::InternalError);
                    }
                }
            }
            Some((cid, res)) = pending.next(), if !pending.is_empty() => {
                let frame = match res {
                    Ok(c) => {
                        shared.metrics.send_result(if c.duplicate { "duplicate" } else { "confirmed" });
                        ServerFrame::Confirm(c)
                    }
                    Err(StoreError::Refused(code, message)) => {
                        shared.metrics.send_result(code.as_str());
                        ServerFrame::Rejected(Rejected { cid, code, message, retry_after_ms: None })
                    }
                    Err(e) => {
                        tracing::error!(target: "keepwire::ws", error = %e, "send failed");
                        shared.metrics.send_result("internal");
                        ServerFrame::Rejected(Rejected {
                            cid,
                            code: ErrorCode::Internal,
                            message: "the server could not store the message; retry later".into(),
                            retry_after_ms: Some(1000),
                        })
                    }
                };
                if let Err(e) = w.send(&frame).await { break e; }
            }
            changed = reg.head.changed(), if !want_read => {
                if changed.is_err() { break End::Closed(CloseCode::InternalError); }
                want_read = true;
            }
            msg = rx.next(), if pending.len() < limits.max_unconfirmed => {
                idle_deadline = Instant::now() + idle_timeout;
                let text = match msg {
                    None => break End::Gone,
                    Some(Err(e)) if is_too_big(&e) => break End::Closed(CloseCode::MessageTooBig),
                    Some(Err(_)) => break End::Gone,
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Binary(_))) => break End::Closed(CloseCode::UnsupportedData),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(Message::Close(_))) => {
                        // tungstenite queued the close reply; push it out.
                        let _ = w.flush().await;
                        break End::Gone;
                    }
                };
                let frame = match decode_client(text.as_str(), limits) {
                    Ok(f) => f,
                    Err(e) => {
                        protocol_errors += 1;
                        if protocol_errors > limits.max_protocol_errors {
                            break End::Closed(CloseCode::ProtocolViolation);
                        }
                        shared.metrics.errors.get_or_create(&crate::metrics::ResultLabel { result: e.code.to_string() }).inc();
                        if let Err(e) = w.send(&error_frame(e.rid, e.code, e.message)).await { break e; }
                        continue;
                    }
                };
                let reply: Option<ServerFrame> = match frame {
                    ClientFrame::Hello(_) => {
                        protocol_errors += 1;
                        Some(error_frame(None, ErrorCode::UnexpectedHello, "hello was already received on this connection"))
                    }
                    ClientFrame::Send(s) => {
                        let now = Instant::now();
                        // After a rate-limited send, nothing behind it is accepted until
                        // the client resends that one: a client's sends are stored in
                        // the order it sent them, whatever the pipelining.
                        let sticky = paused_on.as_ref().is_some_and(|first| *first != s.cid);
                        let limited = if sticky {
                            Err(Duration::ZERO)
                        } else {
                            bucket.take(now).and_then(|()| shared.hub.take_user_send(user.id))
                        };
                        match limited {
                            Ok(()) => {
                                paused_on = None;
                                penalty_sends = 0;
                                let store = store.clone();
                                let device = device.clone();
                                let uid = user.id;
                                pending.push_back(Box::pin(async move {
                                    let cid = s.cid.clone();
                                    (cid, store.send(Actor::User(uid), &device, s).await)
                                }));
                                None
                            }
                            Err(wait) => {
                                // Sends that arrive while the client should be
                                // waiting are tolerated up to the unconfirmed
                                // window (they were already in flight); more is abuse.
                                if sticky || penalty_until.is_some_and(|t| now < t) {
                                    penalty_sends += 1;
                                    if penalty_sends > limits.max_unconfirmed {
                                        break End::Closed(CloseCode::RateLimited);
                                    }
                                }
                                if !sticky {
                                    paused_on = Some(s.cid.clone());
                                    penalty_until = Some(now + wait);
                                }
                                let retry = penalty_until.map(|t| t.saturating_duration_since(now)).unwrap_or_default();
                                shared.metrics.send_result("rate_limited");
                                Some(ServerFrame::Rejected(Rejected {
                                    cid: s.cid,
                                    code: ErrorCode::RateLimited,
                                    message: "too many sends; wait retry_after_ms, then resend from the first rejected send".into(),
                                    retry_after_ms: Some((retry.as_millis() as u64).max(1)),
                                }))
                            }
                        }
                    }
                    ClientFrame::Ack { seq } => {
                        if seq >= next {
                            protocol_errors += 1;
                            Some(error_frame(None, ErrorCode::BadAck, format!("ack {seq} is beyond the last entry sent ({})", next.saturating_sub(1))))
                        } else {
                            if seq > acked {
                                acked = seq;
                                ack_flush_at.get_or_insert_with(|| Instant::now() + ACK_FLUSH);
                            }
                            None
                        }
                    }
                    ClientFrame::Ping {} => Some(ServerFrame::Pong { head: Some(plan_head.max(*reg.head.borrow())) }),
                    ClientFrame::SetHeartbeat { heartbeat_ms } => {
                        (heartbeat, idle_timeout) = config.negotiate_heartbeat(Some(heartbeat_ms));
                        idle_deadline = Instant::now() + idle_timeout;
                        Some(ServerFrame::HeartbeatSet {
                            heartbeat_ms: heartbeat.as_millis() as u64,
                            idle_timeout_ms: idle_timeout.as_millis() as u64,
                        })
                    }
                    ClientFrame::History(h) => {
                        let limit = h.limit.unwrap_or(50).min(limits.max_history_page);
                        Some(match store.history(Actor::User(user.id), h.conv, h.before, limit).await {
                            Ok(mut page) => { page.rid = h.rid; ServerFrame::History(page) }
                            Err(e) => request_error(shared, &h.rid, e),
                        })
                    }
                    ClientFrame::ConvCreate(c) => {
                        let rid = c.rid.clone();
                        Some(match store.conv_create(Actor::User(user.id), c, limits.max_group_size).await {
                            Ok((conv, changed)) => ServerFrame::Conv { rid, conv, changed },
                            Err(e) => request_error(shared, &rid, e),
                        })
                    }
                    ClientFrame::ConvAdd(m) => Some(match store.conv_member(Actor::User(user.id), m.conv, &m.user, true, limits.max_group_size).await {
                        Ok((conv, changed)) => ServerFrame::Conv { rid: m.rid, conv, changed },
                        Err(e) => request_error(shared, &m.rid, e),
                    }),
                    ClientFrame::ConvRemove(m) => Some(match store.conv_member(Actor::User(user.id), m.conv, &m.user, false, limits.max_group_size).await {
                        Ok((conv, changed)) => ServerFrame::Conv { rid: m.rid, conv, changed },
                        Err(e) => request_error(shared, &m.rid, e),
                    }),
                    ClientFrame::ConvList { rid } => Some(match store.conv_list(user.id).await {
                        Ok(convs) => ServerFrame::Convs { rid, convs },
                        Err(e) => request_error(shared, &rid, e),
                    }),
                                        ClientFrame::Read { conv, up_to } => match store.mark_read(user.id, conv, up_to).await {
                        Ok(_) => None,
                        Err(e) => Some(request_error(shared, "read", e)),
                    },
                    ClientFrame::Signal { conv, data } => match store.conv_member_ids(user.id, conv).await {
                        Ok(members) => {
                            let frame = ServerFrame::Signal { conv, from: user.name.clone(), data };
                            shared.hub.signal(&members, reg.id, &frame);
                            None
                        }
                        Err(e) => Some(request_error(shared, "signal", e)),
                    },
                    _ => Some(error_frame(None, ErrorCode::UnknownType, "frame type not supported")),
                };
                if protocol_errors > limits.max_protocol_errors {
                    break End::Closed(CloseCode::ProtocolViolation);
                }
                if let Some(f) = reply
                    && let Err(e) = w.send(&f).await
                {
                    break e;
                }
            }
            // One timer for every deadline (each timer is ~100 bytes of
            // every connection's task, and an idle connection should not
            // wake up at all).
            _ = sleep_until(ack_flush_at.map_or(idle_deadline, |t| t.min(idle_deadline)).min(token_deadline)) => {
                let now = Instant::now();
                if ack_flush_at.is_some_and(|t| t <= now) {
                    ack_flush_at = None;
                    let store = store.clone();
                    let device = device.clone();
                    let uid = user.id;
                    tokio::spawn(async move { let _ = store.record_ack(uid, &device, acked).await; });
                }
                if idle_deadline <= now {
                    break End::Closed(CloseCode::HeartbeatTimeout);
                }
                if token_deadline <= now {
                    break End::Closed(CloseCode::TokenExpired);
                }
            }
        }
    };
    if ack_flush_at.is_some() {
        let _ = store.record_ack(user.id, &device, acked).await;
    }
    tracing::info!(target: "keepwire::ws", delivered_to = next.saturating_sub(1), acked, "disconnected");
    drop(reg);
    end
}

/// Sends waiting for their commit, answered in arrival order. Allocated on
/// the first send and freed when empty: most connections are idle.
#[derive(Default)]
struct PendingSends(Option<FuturesOrdered<BoxFut<SendAnswer>>>);

/// A send's client id and what the store answered.
type SendAnswer = (String, Result<Confirm, StoreError>);

impl PendingSends {
    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, FuturesOrdered::len)
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push_back(&mut self, f: BoxFut<SendAnswer>) {
        self.0.get_or_insert_with(FuturesOrdered::new).push_back(f);
    }

    /// The next answer; pending forever when there is none.
    async fn next(&mut self) -> Option<SendAnswer> {
        let Some(q) = &mut self.0 else {
            return std::future::pending().await;
        };
        let out = q.next().await;
        if q.is_empty() {
            self.0 = None;
        }
        out
    }
}

/// A tokio deadline for a wall-clock expiry in ms since the Unix epoch.
fn deadline_from_unix_ms(ms: i64) -> Instant {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let left = ms.saturating_sub(now_ms).max(0) as u64;
    // Far-future expiries would overflow Instant; a year is "never" for a connection.
    Instant::now() + Duration::from_millis(left.min(365 * 24 * 3600 * 1000))
}

/// Runs `f` when dropped.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}
