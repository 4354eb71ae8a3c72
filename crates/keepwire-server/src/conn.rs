//! The tokio driver of one connection: the socket, one timer, the hub and
//! the store calls. Every protocol decision is the sans-IO
//! [`Session`]'s; this loop feeds it and carries out what it asks for.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, SplitSink, SplitStream};
use futures_util::{FutureExt as _, SinkExt as _, StreamExt as _};
use keepwire_proto::{CloseCode, Seq};
use tokio::time::{sleep_until, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tracing::Instrument as _;

use crate::Shared;
use crate::hub::{ControlQueue, Joining, RegisterError, Registration};
use crate::session::{Event, RequestId, Session, StoreAnswer, Transmit, TransportEvent};

/// How long to wait for the peer's close reply after sending a close frame.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// The socket under a session (see `upgrade.rs`).
pub(crate) type Socket =
    WebSocketStream<crate::upgrade::Batched<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>>;
type Tx = SplitSink<Socket, Message>;
type Rx = SplitStream<Socket>;
type Answer = Pin<Box<dyn Future<Output = (RequestId, StoreAnswer)> + Send>>;

/// Runs a connection to completion.
pub(crate) fn run(
    socket: Socket,
    shared: Arc<Shared>,
    peer: SocketAddr,
) -> impl std::future::Future<Output = ()> {
    // Split before the future exists: an argument of an async fn keeps its
    // space in the future for its whole life, even after it is moved out,
    // and a WebSocket is big. Every idle connection would carry it twice.
    let (tx, rx) = socket.split();
    let span = tracing::info_span!(target: "keepwire::ws", "conn", %peer, user = tracing::field::Empty, device = tracing::field::Empty);
    drive(tx, rx, shared).instrument(span)
}

/// Store requests in flight. Allocated on first use and freed when empty:
/// most connections are idle.
#[derive(Default)]
struct InFlight(Option<FuturesUnordered<Answer>>);

impl InFlight {
    fn push(&mut self, f: Answer) {
        self.0.get_or_insert_with(FuturesUnordered::new).push(f);
    }

    fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(FuturesUnordered::is_empty)
    }

    async fn next(&mut self) -> Option<(RequestId, StoreAnswer)> {
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

async fn drive(mut tx: Tx, mut rx: Rx, shared: Arc<Shared>) {
    let clock = shared.clock;
    let mut s = Session::new(shared.session.clone(), rand::random(), clock.now());
    let control = Arc::new(ControlQueue::default());
    let mut reg: Option<Registration> = None;
    let mut in_flight = InFlight::default();
    let mut opened = false;
    let mut close: Option<CloseCode> = None;
    loop {
        // Carry out everything the session asked for.
        carry_out_events(&mut s, &shared, &control, &mut reg, &mut opened);
        while let Some((id, req)) = s.poll_store_request() {
            in_flight.push(Box::pin(shared.exec.run(req).map(move |a| (id, a))));
        }
        match write_transmits(&mut s, &mut tx, shared.config.write_timeout).await {
            Ok(Some(code)) => {
                close = Some(code);
                break;
            }
            Ok(None) => {}
            Err(()) => {
                s.handle_transport(TransportEvent::Closed, clock.now());
                break;
            }
        }
        if s.is_closed() {
            break;
        }
        let deadline = s.poll_timeout().map(|t| clock.deadline(t));
        let wants_frames = s.wants_frames();
        tokio::select! {
            biased;
            ctl = control.recv() => s.handle_control(ctl, clock.now()),
            Some((id, answer)) = in_flight.next(), if !in_flight.is_empty() => {
                s.handle_store_answer(id, answer, clock.now());
            }
            changed = head_changed(&mut reg) => match changed {
                Some(head) => s.handle_head(head, clock.now()),
                None => s.handle_control(crate::hub::Control::Close(CloseCode::InternalError), clock.now()),
            },
            msg = rx.next(), if wants_frames => {
                let now = clock.now();
                match msg {
                    Some(Ok(Message::Text(t))) => s.handle_transport(TransportEvent::Text(t.as_str()), now),
                    Some(Ok(Message::Binary(_))) => s.handle_transport(TransportEvent::Binary, now),
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => s.handle_transport(TransportEvent::Control, now),
                    Some(Ok(Message::Close(_))) => {
                        // tungstenite queued the close reply; push it out.
                        let _ = tx.flush().await;
                        s.handle_transport(TransportEvent::Closed, now);
                    }
                    Some(Err(e)) => s.handle_transport(transport_error(&e), now),
                    None => s.handle_transport(TransportEvent::Closed, now),
                }
                // For push decisions: a live connection that sends nothing
                // while entries wait is frozen (an iOS app in the background).
                control.activity.frame(shared.wall.now_ms(), s.positions().1);
            }
            _ = sleep_until(deadline.unwrap_or_else(far_future)), if deadline.is_some() => {
                s.handle_timeout(clock.now());
            }
        }
    }
    if let Some(code) = close {
        close_socket(&mut tx, &mut rx, code).await;
        tracing::debug!(target: "keepwire::ws", code = code.code(), "closed");
    }
    // The final ack position (and anything else the session still asked
    // for), and the requests in flight when it closed: their answers still
    // reach the session, so their hub work is carried out (a client that
    // signals and closes at once: the membership lookup finishes and the
    // signal reaches the members).
    loop {
        while let Some((id, req)) = s.poll_store_request() {
            in_flight.push(Box::pin(shared.exec.run(req).map(move |a| (id, a))));
        }
        // (`next` on an empty set waits forever: it is the select's arm.)
        if in_flight.is_empty() {
            break;
        }
        let Some((id, answer)) = in_flight.next().await else {
            break;
        };
        s.handle_store_answer(id, answer, clock.now());
        carry_out_events(&mut s, &shared, &control, &mut reg, &mut opened);
    }
    if opened {
        shared.metrics.connections_open.dec();
        let (next, acked) = s.positions();
        tracing::info!(target: "keepwire::ws", delivered_to = next.saturating_sub(1), acked, "disconnected");
    }
    drop(reg);
}

/// The session's hub work: registration, signals, the open notice.
fn carry_out_events(
    s: &mut Session,
    shared: &Shared,
    control: &Arc<ControlQueue>,
    reg: &mut Option<Registration>,
    opened: &mut bool,
) {
    let clock = shared.clock;
    while let Some(ev) = s.poll_event() {
        match ev {
            Event::Register {
                user,
                device,
                token_id,
                generation,
                transient,
            } => {
                let span = tracing::Span::current();
                if let Some((u, d)) = s.peer() {
                    span.record("user", u.name.as_str());
                    span.record("device", d);
                }
                // Shutdown reaches registered sessions through the hub.
                let result = if shared.shutdown.is_cancelled() {
                    Err(CloseCode::GoingAway)
                } else {
                    shared
                        .hub
                        .register(
                            Joining {
                                user,
                                device: &device,
                                token_id,
                                generation,
                                transient,
                            },
                            shared.config.max_connections_per_user,
                            control.clone(),
                            clock.now(),
                        )
                        .map_err(|e| match e {
                            RegisterError::TooManyConnections => CloseCode::TooManyConnections,
                            RegisterError::Superseded => CloseCode::Replaced,
                        })
                };
                let result = result.map(|r| {
                    let head = *r.head.borrow();
                    *reg = Some(r);
                    // Other nodes close their older connection of the device.
                    if let Some(b) = &shared.bus {
                        b.registered(user, &device, generation, transient);
                    }
                    head
                });
                s.handle_registered(result, clock.now());
            }
            Event::Signal { members, frame } => {
                if let Some(r) = reg.as_ref() {
                    shared.hub.signal(&members, r.id, &frame);
                }
            }
            Event::Opened {
                user,
                device,
                from,
                head,
            } => {
                *opened = true;
                control.activity.opened(shared.wall.now_ms());
                shared.metrics.connections_opened.inc();
                shared.metrics.connections_open.inc();
                tracing::info!(target: "keepwire::ws", %user, %device, from, head, "connected");
            }
        }
    }
}

/// Writes the session's frames in one batch; returns the close code when
/// the session closed, `Err` when the socket failed.
async fn write_transmits(
    s: &mut Session,
    tx: &mut Tx,
    write_timeout: Duration,
) -> Result<Option<CloseCode>, ()> {
    let mut wrote = false;
    let mut code = None;
    while let Some(t) = s.poll_transmit() {
        match t {
            Transmit::Text(text) => {
                match timeout(write_timeout, tx.feed(Message::Text(text.into()))).await {
                    Ok(Ok(())) => wrote = true,
                    _ => return Err(()),
                }
            }
            Transmit::Close(c) => {
                code = Some(c);
                break;
            }
        }
    }
    if wrote {
        match timeout(write_timeout, tx.flush()).await {
            Ok(Ok(())) => {}
            _ => return Err(()),
        }
    }
    Ok(code)
}

/// The next head of the registered user (pending forever before registration).
async fn head_changed(reg: &mut Option<Registration>) -> Option<Seq> {
    match reg {
        Some(r) => match r.head.changed().await {
            Ok(()) => Some(*r.head.borrow_and_update()),
            Err(_) => None,
        },
        None => std::future::pending().await,
    }
}

fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600)
}

/// What a WebSocket read error means for the session.
fn transport_error(err: &tungstenite::Error) -> TransportEvent<'static> {
    match err {
        tungstenite::Error::Capacity(_) => TransportEvent::TooBig,
        tungstenite::Error::Utf8(_) => TransportEvent::InvalidUtf8,
        // A peer that goes away without a closing handshake is not
        // misbehaving on the wire: it is gone.
        tungstenite::Error::Protocol(
            tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
        ) => TransportEvent::Closed,
        tungstenite::Error::Protocol(_) => TransportEvent::ProtocolError,
        _ => TransportEvent::Closed,
    }
}

async fn close_socket(tx: &mut Tx, rx: &mut Rx, code: CloseCode) {
    let frame = CloseFrame {
        code: code.code().into(),
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
