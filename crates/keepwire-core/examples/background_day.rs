//! A simulated day in the background, per background policy: radio wake-ups
//! per hour, bytes per hour and message delay (median, p99) at 0, 10 and 100
//! messages per hour.
//!
//! The real client state machine runs on a virtual clock for 24 hours (nothing
//! is slept, the figures are exact and repeatable); the relay, the path, the
//! push service and the radio are modelled:
//!
//! - **path**: a carrier NAT forgets a flow idle for 10 minutes; what is sent
//!   on a forgotten flow is lost (the client finds out when a pong does not
//!   come). Network latency is not modelled: add 1–3 round trips to each
//!   delay;
//! - **relay**: per-user inbox, resume from the cursor, credit window, `pong`
//!   with the head, and push as keepwire's relay decides it (a device without
//!   a connection, or whose connection leaves an entry unacknowledged for 5 s,
//!   gets one push; one outstanding, cleared by a handshake);
//! - **push**: delivered 1 s after the relay's decision (FCM high priority,
//!   APNs alert); it wakes the app, which runs a bounded sync (30 s);
//! - **radio**: a wake-up is any traffic after 10 s of silence (LTE's RRC
//!   tail); bytes are frames plus WebSocket and TCP/IP overhead, a connection
//!   set-up (TCP + TLS 1.3 + upgrade) counts 4,800 bytes, a push 400 bytes
//!   (the OS's own push channel keepalive is shared by every app and not
//!   counted).
//!
//! Messages arrive as a Poisson process (a fixed seed), 100-byte bodies.
//!
//! `cargo run --release -p keepwire-core --example background_day`

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use keepwire_core::{
    AdaptiveHeartbeat, AppState, BackgroundPolicy, Config, Connection, Event, Instant, Network,
    Transmit, TransportEvent,
};
use keepwire_proto::{
    ClientFrame, EntryItem, InboxEntry, Limits, Message, Resume, ResumeStatus, ServerFrame,
    Welcome, decode_client, encode,
};

const HOURS: u64 = 24;
const IDLE_CUT: Duration = Duration::from_secs(600);
const RRC_TAIL: Duration = Duration::from_secs(10);
const PUSH_LATENCY: Duration = Duration::from_secs(1);
const FROZEN_AFTER: Duration = Duration::from_secs(5);
const SYNC_DEADLINE: Duration = Duration::from_secs(30);
const CONNECT_BYTES: u64 = 4_800;
const CLOSE_BYTES: u64 = 250;
const PUSH_BYTES: u64 = 400;
/// TCP/IP headers of the data packet and of its acknowledgement.
const PACKET_OVERHEAD: u64 = 2 * 52;
const WINDOW: u64 = 2048;

/// How the app runs in the background.
#[derive(Clone, Copy)]
struct Policy {
    name: &'static str,
    background: BackgroundPolicy,
    adaptive: bool,
    heartbeat: Duration,
    push: bool,
    periodic: Option<Duration>,
}

const POLICIES: [Policy; 4] = [
    Policy {
        name: "keep, adaptive heartbeat",
        background: BackgroundPolicy::KeepAlive,
        adaptive: true,
        heartbeat: Duration::from_secs(270),
        push: false,
        periodic: None,
    },
    Policy {
        name: "keep, adaptive heartbeat, push",
        background: BackgroundPolicy::KeepAlive,
        adaptive: true,
        heartbeat: Duration::from_secs(270),
        push: true,
        periodic: None,
    },
    Policy {
        name: "wake-only, push",
        background: BackgroundPolicy::WakeOnly,
        adaptive: false,
        heartbeat: Duration::from_secs(270),
        push: true,
        periodic: None,
    },
    Policy {
        name: "fixed 5-min ping + 15-min task (original)",
        background: BackgroundPolicy::KeepAlive,
        adaptive: false,
        heartbeat: Duration::from_secs(300),
        push: false,
        periodic: Some(Duration::from_secs(900)),
    },
];

/// Something the world does at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Happening {
    /// A message for the device lands in its inbox.
    Message,
    /// Entry `seq` is still unacknowledged 5 s after it was sent: frozen?
    FrozenCheck(u64),
    /// A push reaches the device.
    Push,
    /// The periodic task runs.
    Periodic,
}

/// One transport (TCP flow) through the NAT.
struct Flow {
    id: u64,
    last_traffic: Instant,
    dead: bool,
}

impl Flow {
    /// Whether traffic at `now` gets through (and keeps the mapping).
    fn pass(&mut self, now: Instant) -> bool {
        if self.dead || now.saturating_duration_since(self.last_traffic) > IDLE_CUT {
            self.dead = true;
            return false;
        }
        self.last_traffic = now;
        true
    }
}

/// The relay's view of the device.
#[derive(Default)]
struct Relay {
    /// Arrival time of each inbox entry (seq = index + 1).
    inbox: Vec<Instant>,
    /// The device's acknowledged position.
    acked: u64,
    /// The connection the relay believes open, and the next seq to send on it.
    conn: Option<(u64, u64)>,
    /// The head a push was sent for, until an ack reaches it or a handshake.
    push_outstanding: Option<u64>,
    pushes: u64,
}

impl Relay {
    fn head(&self) -> u64 {
        self.inbox.len() as u64
    }
}

#[derive(Default)]
struct Meter {
    wakeups: u64,
    last_radio: Option<Instant>,
    bytes: u64,
    delays: Vec<Duration>,
    connects: u64,
}

impl Meter {
    fn traffic(&mut self, now: Instant, bytes: u64) {
        if self
            .last_radio
            .is_none_or(|t| now.saturating_duration_since(t) > RRC_TAIL)
        {
            self.wakeups += 1;
        }
        self.last_radio = Some(now);
        self.bytes += bytes;
    }
}

struct Sim {
    policy: Policy,
    c: Connection,
    relay: Relay,
    flow: Option<Flow>,
    meter: Meter,
    /// The relay's head as this connection's welcome or a pong told it.
    known_head: Option<u64>,
    queue: BinaryHeap<Reverse<(Instant, Happening)>>,
}

fn frame_bytes(text: &str, from_client: bool) -> u64 {
    let ws = if from_client { 6 } else { 2 } + if text.len() > 125 { 2 } else { 0 };
    text.len() as u64 + ws + PACKET_OVERHEAD
}

fn entry(seq: u64) -> ServerFrame {
    ServerFrame::Entry(InboxEntry {
        seq,
        item: EntryItem::Message(Message {
            id: 1_000 + seq,
            conv: 7,
            conv_seq: seq,
            from: "bob".into(),
            cid: format!("{seq:032x}"),
            kind: "text".into(),
            body: "x".repeat(100),
            ts: 1_795_700_000_000 + seq as i64,
        }),
    })
}

impl Sim {
    fn new(policy: Policy, rate_per_hour: u64, seed: u64) -> Sim {
        let mut cfg = Config::new("phone", vec!["wss://relay".into()]);
        cfg.background_policy = policy.background;
        cfg.heartbeat_background = policy.heartbeat;
        cfg.adaptive_heartbeat = policy.adaptive.then(AdaptiveHeartbeat::default);
        let now = Instant::ZERO;
        let mut c = Connection::new(cfg, "t".into(), None, seed, now);
        c.handle_network(Network::Online("cellular".into()), now);
        c.handle_app_state(AppState::Background, now);
        c.start(now);
        let mut queue = BinaryHeap::new();
        // Poisson arrivals from a fixed seed (xorshift; no thread RNG).
        let mut x = seed | 1;
        let mut t = 0.0f64;
        let end = (HOURS * 3600) as f64;
        while rate_per_hour > 0 && t < end {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 11) as f64 / (1u64 << 53) as f64;
            t += -(1.0 - u).ln() * 3600.0 / rate_per_hour as f64;
            if t < end {
                queue.push(Reverse((at(t), Happening::Message)));
            }
        }
        if let Some(p) = policy.periodic {
            let mut t = p;
            while t.as_secs() < HOURS * 3600 {
                queue.push(Reverse((Instant::from_duration(t), Happening::Periodic)));
                t += p;
            }
        }
        Sim {
            policy,
            c,
            relay: Relay::default(),
            flow: None,
            meter: Meter::default(),
            known_head: None,
            queue,
        }
    }

    fn run(mut self) -> Meter {
        let end = Instant::from_duration(Duration::from_secs(HOURS * 3600));
        let mut now = Instant::ZERO;
        loop {
            self.settle(now);
            let next_world = self.queue.peek().map(|Reverse((t, _))| *t);
            let next_core = self.c.poll_timeout();
            let next = match (next_world, next_core) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => match a.or(b) {
                    Some(t) => t,
                    None => break,
                },
            };
            if next >= end {
                break;
            }
            now = next.max(now);
            if next_world == Some(next) {
                let Reverse((_, h)) = self.queue.pop().expect("peeked");
                self.happen(h, now);
            } else {
                self.c.handle_timeout(now);
            }
        }
        self.meter
    }

    fn happen(&mut self, h: Happening, now: Instant) {
        match h {
            Happening::Message => {
                self.relay.inbox.push(now);
                let seq = self.relay.head();
                if self.relay.conn.is_some() {
                    self.deliver(now);
                    self.queue
                        .push(Reverse((now + FROZEN_AFTER, Happening::FrozenCheck(seq))));
                } else {
                    self.maybe_push(now);
                }
            }
            Happening::FrozenCheck(seq) => {
                if self.relay.acked < seq {
                    self.maybe_push(now);
                }
            }
            Happening::Push => {
                self.meter.traffic(now, PUSH_BYTES);
                self.c.request_sync(now + SYNC_DEADLINE, now);
            }
            Happening::Periodic => self.c.request_sync(now + SYNC_DEADLINE, now),
        }
    }

    fn maybe_push(&mut self, now: Instant) {
        if self.policy.push && self.relay.push_outstanding.is_none() {
            self.relay.push_outstanding = Some(self.relay.head());
            self.relay.pushes += 1;
            self.queue
                .push(Reverse((now + PUSH_LATENCY, Happening::Push)));
        }
    }

    /// Sends the entries the window allows on the relay's connection.
    fn deliver(&mut self, now: Instant) {
        while let Some((id, next)) = self.relay.conn {
            if next > self.relay.head() || next > self.relay.acked + WINDOW {
                break;
            }
            self.relay.conn = Some((id, next + 1));
            self.send_to_client(id, &entry(next), now);
        }
    }

    fn send_to_client(&mut self, id: u64, frame: &ServerFrame, now: Instant) {
        let Some(flow) = self.flow.as_mut().filter(|f| f.id == id) else {
            return;
        };
        if flow.pass(now) {
            let text = encode(frame);
            self.meter.traffic(now, frame_bytes(&text, false));
            self.c
                .handle_transport(id, TransportEvent::Frame(text), now);
        }
    }

    /// Runs everything the core wants done at `now`.
    fn settle(&mut self, now: Instant) {
        loop {
            let mut busy = false;
            while let Some(t) = self.c.poll_transmit() {
                busy = true;
                self.transmit(t, now);
            }
            while let Some(e) = self.c.poll_event() {
                busy = true;
                self.event(e, now);
            }
            if !busy {
                break;
            }
        }
    }

    fn transmit(&mut self, t: Transmit, now: Instant) {
        match t {
            Transmit::Open { id, .. } => {
                self.known_head = None;
                self.meter.connects += 1;
                self.meter.traffic(now, CONNECT_BYTES);
                self.flow = Some(Flow {
                    id,
                    last_traffic: now,
                    dead: false,
                });
                self.c.handle_transport(id, TransportEvent::Opened, now);
            }
            Transmit::Frame { id, text } => {
                self.meter.traffic(now, frame_bytes(&text, true));
                let Some(flow) = self.flow.as_mut().filter(|f| f.id == id) else {
                    return;
                };
                if !flow.pass(now) {
                    return; // lost on a forgotten flow
                }
                let frame = decode_client(&text, &Limits::default()).expect("valid frame");
                self.relay_handle(id, frame, now);
            }
            Transmit::Close { id, .. } => {
                if self.flow.as_ref().is_some_and(|f| f.id == id) {
                    let alive = self.flow.as_mut().is_some_and(|f| f.pass(now));
                    if alive {
                        self.meter.traffic(now, CLOSE_BYTES);
                        if self.relay.conn.is_some_and(|(c, _)| c == id) {
                            self.relay.conn = None;
                        }
                    }
                    self.flow = None;
                }
            }
        }
    }

    fn relay_handle(&mut self, id: u64, frame: ClientFrame, now: Instant) {
        match frame {
            ClientFrame::Hello(h) => {
                let cursor = h.cursor.as_ref().map_or(0, |c| c.seq);
                self.relay.acked = self.relay.acked.max(cursor);
                self.relay.push_outstanding = None;
                let from = cursor + 1;
                self.relay.conn = Some((id, from));
                let welcome = ServerFrame::Welcome(Welcome {
                    session: "s".into(),
                    user: "alice".into(),
                    device: "phone".into(),
                    heartbeat_ms: h.heartbeat_ms.unwrap_or(30_000),
                    idle_timeout_ms: 3_600_000,
                    epoch: "e".into(),
                    head: self.relay.head(),
                    resume: Resume {
                        status: if h.cursor.is_some() {
                            ResumeStatus::Complete
                        } else {
                            ResumeStatus::New
                        },
                        from,
                        reason: None,
                        missed: None,
                        fetch: vec![],
                    },
                    limits: Limits::default().wire(WINDOW),
                    push: None,
                });
                self.send_to_client(id, &welcome, now);
                self.deliver(now);
            }
            ClientFrame::Ping {} => {
                let pong = ServerFrame::Pong {
                    head: Some(self.relay.head()),
                };
                self.send_to_client(id, &pong, now);
            }
            ClientFrame::Ack { seq } => {
                self.relay.acked = self.relay.acked.max(seq);
                if self.relay.push_outstanding.is_some_and(|p| seq >= p) {
                    self.relay.push_outstanding = None;
                }
                self.deliver(now);
            }
            ClientFrame::SetHeartbeat { heartbeat_ms } => {
                let set = ServerFrame::HeartbeatSet {
                    heartbeat_ms,
                    idle_timeout_ms: heartbeat_ms * 2,
                };
                self.send_to_client(id, &set, now);
            }
            _ => {}
        }
    }

    fn event(&mut self, e: Event, now: Instant) {
        match e {
            Event::Welcome(w) => self.known_head = Some(w.head),
            Event::RelayHead(h) => self.known_head = self.known_head.max(Some(h)),
            Event::Entries(entries) => {
                let Some(last) = entries.last().map(|e| e.seq) else {
                    return;
                };
                for e in &entries {
                    let arrived = self.relay.inbox[e.seq as usize - 1];
                    self.meter
                        .delays
                        .push(now.saturating_duration_since(arrived));
                }
                self.c.handle_persisted(last, now);
            }
            _ => {}
        }
        // A bounded sync ends once everything up to the relay's head is stored.
        let cursor = self.c.cursor().map_or(0, |c| c.seq);
        if self.c.syncing() && self.known_head.is_some_and(|h| cursor >= h) {
            self.c.end_sync(now);
        }
    }
}

fn at(secs: f64) -> Instant {
    Instant::from_duration(Duration::from_secs_f64(secs))
}

fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    Some(sorted[i])
}

fn show(d: Option<Duration>) -> String {
    match d {
        None => "—".into(),
        Some(d) if d < Duration::from_secs(10) => format!("{:.1} s", d.as_secs_f64()),
        Some(d) => format!("{:.0} s", d.as_secs_f64()),
    }
}

fn main() {
    println!(
        "{HOURS} simulated hours in the background; path idle cut {} min; push latency {} s",
        IDLE_CUT.as_secs() / 60,
        PUSH_LATENCY.as_secs()
    );
    println!(
        "| policy | messages/hour | radio wake-ups/hour | KB/hour | connections | delay p50 | delay p99 |"
    );
    println!("|---|---|---|---|---|---|---|");
    for policy in POLICIES {
        for rate in [0, 10, 100] {
            let m = Sim::new(policy, rate, 0x5eed_0001 + rate).run();
            let mut d = m.delays.clone();
            d.sort();
            println!(
                "| {} | {rate} | {:.1} | {:.1} | {} | {} | {} |",
                policy.name,
                m.wakeups as f64 / HOURS as f64,
                m.bytes as f64 / 1000.0 / HOURS as f64,
                m.connects,
                show(percentile(&d, 0.5)),
                show(percentile(&d, 0.99)),
            );
        }
    }
}
