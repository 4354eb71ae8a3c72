//! Deterministic simulation of the client core against a model relay.
//!
//! Virtual clock, a model relay (inboxes, dedupe, credit window, token
//! expiry, going-away), a lossy network (latency, resets, blackholes, DNS
//! failures, refusals), client stores that crash between any two steps, app
//! state flips and OS network changes — all from one seed. Invariants are
//! checked after every step; at the end of each seed, with faults healed,
//! every accepted send must be in every member device's store exactly once and
//! in send order.
//!
//! `KEEPWIRE_SIM_SEEDS=N` runs N seeds (default 2000); `KEEPWIRE_SIM_SEED=S`
//! replays one seed (printed on failure).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::time::Duration;

use keepwire_core::{
    AppState, BackgroundPolicy, Config, Connection, Event, FailureKind, Instant, Network,
    OutboxItem, SeededRng, State, StopReason, Transmit, TransportEvent,
};
use keepwire_proto::{
    ClientFrame, CloseCode, Confirm, ConvInfo, ConvKind, Cursor, EntryItem, InboxEntry, Limits,
    MemberChange, MemberEvent, Message, Resume, ResumeStatus, ServerFrame, Welcome, decode_client,
    encode,
};

const USERS: usize = 3;
/// (user, device) of each simulated client; user 0 has two devices.
const DEVICES: &[(usize, &str)] = &[(0, "phone"), (0, "laptop"), (1, "phone"), (2, "phone")];
const CONV: u64 = 1;
const EPOCH: &str = "sim-epoch";
const WINDOW: u64 = 8;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

// ---------------------------------------------------------------------------
// Model relay

struct ServerConn {
    client: usize,
    tid: u64,
    user: Option<usize>,
    device: String,
    next: u64,
    acked: u64,
}

#[derive(Default)]
struct ModelRelay {
    up: bool,
    inbox: Vec<Vec<InboxEntry>>,
    conv_seq: u64,
    next_msg_id: u64,
    dedupe: HashMap<(usize, String, String), (Confirm, String)>,
    /// Token version per user; a token "u{user}-v{n}" is valid for n == version.
    token_version: Vec<u32>,
    conns: Vec<ServerConn>,
    /// Every (user, device, cid) stored, to check nothing was stored twice.
    stored: HashSet<(usize, String, String)>,
}

impl ModelRelay {
    fn new() -> Self {
        let members: Vec<String> = (0..USERS).map(|u| format!("u{u}")).collect();
        let info = ConvInfo {
            id: CONV,
            kind: ConvKind::Group,
            name: None,
            members,
            last_seq: 0,
        };
        let inbox = (0..USERS)
            .map(|u| {
                vec![InboxEntry {
                    seq: 1,
                    item: EntryItem::Member(MemberEvent {
                        conv: info.clone(),
                        user: format!("u{u}"),
                        change: MemberChange::Added,
                        by: "u0".into(),
                        ts: 0,
                    }),
                }]
            })
            .collect();
        ModelRelay {
            up: true,
            inbox,
            token_version: vec![1; USERS],
            ..Default::default()
        }
    }

    fn token(&self, user: usize) -> String {
        format!("u{user}-v{}", self.token_version[user])
    }

    /// Handles one frame from a connection; returns frames to send and an
    /// optional close code.
    fn on_frame(&mut self, ci: usize, text: &str) -> (Vec<ServerFrame>, Option<u16>) {
        let limits = Limits::default();
        let frame = match decode_client(text, &limits) {
            Ok(f) => f,
            Err(e) => panic!("client sent an invalid frame {text}: {e}"),
        };
        let mut out = Vec::new();
        let conn_user = self.conns[ci].user;
        match (conn_user, frame) {
            (None, ClientFrame::Hello(h)) => {
                let user = h
                    .token
                    .strip_prefix('u')
                    .and_then(|r| r.split('-').next())
                    .and_then(|u| u.parse::<usize>().ok());
                let Some(user) = user.filter(|&u| u < USERS) else {
                    return (out, Some(4001));
                };
                if h.token != self.token(user) {
                    return (out, Some(CloseCode::TokenExpired.code()));
                }
                // A newer connection of the same device replaces the older.
                let client = self.conns[ci].client;
                for (j, c) in self.conns.iter_mut().enumerate() {
                    if j != ci && c.user == Some(user) && c.device == h.device && c.client != client
                    {
                        panic!("two clients claim one device");
                    }
                }
                let head = self.inbox[user].len() as u64;
                let (status, from) = match &h.cursor {
                    Some(c) => {
                        assert_eq!(c.epoch, EPOCH);
                        assert!(c.seq <= head, "cursor ahead of the log");
                        (ResumeStatus::Complete, c.seq + 1)
                    }
                    None => (ResumeStatus::New, 1),
                };
                let c = &mut self.conns[ci];
                c.user = Some(user);
                c.device = h.device.clone();
                c.next = from;
                c.acked = from - 1;
                out.push(ServerFrame::Welcome(Welcome {
                    session: "s".into(),
                    user: format!("u{user}"),
                    device: h.device,
                    heartbeat_ms: h.heartbeat_ms.unwrap_or(30_000),
                    idle_timeout_ms: 60_000,
                    epoch: EPOCH.into(),
                    head,
                    resume: Resume {
                        status,
                        from,
                        reason: None,
                        missed: None,
                        fetch: vec![],
                    },
                    limits: keepwire_proto::WireLimits {
                        window: WINDOW,
                        max_unconfirmed: 4,
                        ..limits.wire()
                    },
                }));
            }
            (None, other) => panic!("first frame not hello: {other:?}"),
            (Some(_), ClientFrame::Hello(_)) => panic!("second hello"),
            (Some(user), ClientFrame::Send(s)) => {
                let device = self.conns[ci].device.clone();
                let key = (user, device.clone(), s.cid.clone());
                if let Some((c, body)) = self.dedupe.get(&key) {
                    assert_eq!(*body, s.body, "same cid, different payload");
                    out.push(ServerFrame::Confirm(Confirm {
                        duplicate: true,
                        echo_seq: None,
                        ..c.clone()
                    }));
                } else {
                    assert!(self.stored.insert(key.clone()), "stored twice");
                    self.conv_seq += 1;
                    self.next_msg_id += 1;
                    let msg = Message {
                        id: self.next_msg_id,
                        conv: CONV,
                        conv_seq: self.conv_seq,
                        from: format!("u{user}"),
                        cid: s.cid.clone(),
                        kind: s.kind.clone(),
                        body: s.body.clone(),
                        ts: 0,
                    };
                    for inbox in &mut self.inbox {
                        let seq = inbox.len() as u64 + 1;
                        inbox.push(InboxEntry {
                            seq,
                            item: EntryItem::Message(msg.clone()),
                        });
                    }
                    let confirm = Confirm {
                        cid: s.cid,
                        id: msg.id,
                        conv: CONV,
                        conv_seq: msg.conv_seq,
                        ts: 0,
                        duplicate: false,
                        echo_seq: None,
                    };
                    self.dedupe.insert(key, (confirm.clone(), s.body));
                    out.push(ServerFrame::Confirm(confirm));
                }
            }
            (Some(_), ClientFrame::Ack { seq }) => {
                let c = &mut self.conns[ci];
                assert!(seq < c.next, "ack beyond what was sent");
                c.acked = c.acked.max(seq);
            }
            (Some(_), ClientFrame::Ping {}) => out.push(ServerFrame::Pong { head: None }),
            (Some(_), ClientFrame::SetHeartbeat { heartbeat_ms }) => {
                out.push(ServerFrame::HeartbeatSet {
                    heartbeat_ms,
                    idle_timeout_ms: heartbeat_ms * 2,
                })
            }
            (Some(_), other) => panic!("unexpected frame {other:?}"),
        }
        (out, None)
    }

    /// Entries connection `ci` may receive now (credit window).
    fn deliverable(&mut self, ci: usize) -> Vec<ServerFrame> {
        let c = &mut self.conns[ci];
        let Some(user) = c.user else { return vec![] };
        let mut out = Vec::new();
        while c.next <= self.inbox[user].len() as u64 && c.next <= c.acked + WINDOW {
            out.push(ServerFrame::Entry(
                self.inbox[user][(c.next - 1) as usize].clone(),
            ));
            c.next += 1;
        }
        out
    }
}

// ---------------------------------------------------------------------------
// Network and clients

#[derive(Debug, Clone)]
enum NetEvent {
    ToServer {
        client: usize,
        tid: u64,
        text: String,
    },
    ToClient {
        client: usize,
        tid: u64,
        ev: TransportEvent,
    },
}

/// Transport ids restart at 1 in a new process: the sim tags each (client,
/// tid) with the process generation, `tid = generation << 32 | core tid`.
fn tag(generation: u64, tid: u64) -> u64 {
    generation << 32 | tid
}

struct Link {
    client: usize,
    tid: u64,
    /// Index into the relay's connections, once opened.
    conn: Option<usize>,
    /// Packets vanish (NAT forgot the mapping): no RST either way.
    blackholed: bool,
}

/// A client process: its durable store and (while running) its core.
struct ClientProc {
    user: usize,
    device: &'static str,
    core: Option<Connection>,
    // --- the durable store ---
    outbox: Vec<OutboxItem>,
    persisted: Vec<InboxEntry>,
    cursor: Option<Cursor>,
    token: String,
    // --- what the sim knows about this process ---
    open_tid: Option<u64>,
    refreshes_since_welcome: u32,
    /// Process generation (incremented by each boot).
    generation: u64,
}

struct Sim {
    rng: SeededRng,
    now: Instant,
    relay: ModelRelay,
    net: BinaryHeap<Reverse<(Instant, u64, usize)>>,
    net_events: HashMap<usize, NetEvent>,
    net_seq: u64,
    /// Latest scheduled arrival per (client, tid, towards the relay): TCP keeps order.
    arrivals: HashMap<(usize, u64, bool), Instant>,
    links: Vec<Link>,
    clients: Vec<ClientProc>,
    network: Network,
    dns_broken: bool,
    app: AppState,
    /// Per sending device, cids in the order the app's sends were accepted.
    accepted: BTreeMap<usize, Vec<String>>,
    next_cid: u64,
    seed: u64,
    faults: BTreeMap<&'static str, u32>,
    /// Faults are over: the token provider always has a token.
    healed: bool,
}

fn config(device: &str, policy: u64) -> Config {
    let mut c = Config::new(device, vec!["ws://relay-a".into(), "ws://relay-b".into()]);
    c.history = 1_000_000;
    c.background_policy = match policy % 3 {
        0 => BackgroundPolicy::KeepAlive,
        1 => BackgroundPolicy::Linger(Duration::from_secs(5)),
        _ => BackgroundPolicy::WakeOnly,
    };
    c
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let relay = ModelRelay::new();
        let clients = DEVICES
            .iter()
            .map(|&(user, device)| ClientProc {
                user,
                device,
                core: None,
                outbox: vec![],
                persisted: vec![],
                cursor: None,
                token: relay.token(user),
                open_tid: None,
                refreshes_since_welcome: 0,
                generation: 0,
            })
            .collect();
        let mut sim = Sim {
            rng: SeededRng::new(seed ^ 0x5eed),
            now: Instant::ZERO,
            relay,
            net: BinaryHeap::new(),
            net_events: HashMap::new(),
            net_seq: 0,
            arrivals: HashMap::new(),
            links: vec![],
            clients,
            network: Network::Online("wifi".into()),
            dns_broken: false,
            app: AppState::Foreground,
            accepted: BTreeMap::new(),
            next_cid: 0,
            seed,
            faults: BTreeMap::new(),
            healed: false,
        };
        for i in 0..sim.clients.len() {
            sim.boot(i);
        }
        sim
    }

    fn fault(&mut self, name: &'static str) {
        *self.faults.entry(name).or_default() += 1;
    }

    fn latency(&mut self) -> Duration {
        ms(1 + self.rng.below(80))
    }

    fn schedule(&mut self, after: Duration, ev: NetEvent) {
        let key = match &ev {
            NetEvent::ToServer { client, tid, .. } => (*client, *tid, true),
            NetEvent::ToClient { client, tid, .. } => (*client, *tid, false),
        };
        let at = self.now + after;
        let last = self.arrivals.entry(key).or_insert(at);
        *last = (*last).max(at);
        self.net_seq += 1;
        let id = self.net_seq as usize;
        self.net_events.insert(id, ev);
        self.net.push(Reverse((self.now + after, self.net_seq, id)));
    }

    /// Starts (or restarts after a crash) client `i` from its store.
    fn boot(&mut self, i: usize) {
        let seed = self.rng.next_u64();
        let c = &mut self.clients[i];
        let mut core = Connection::new(
            config(c.device, self.seed.wrapping_add(i as u64)),
            c.token.clone(),
            c.cursor.clone(),
            seed,
            self.now,
        );
        core.handle_network(self.network.clone(), self.now);
        core.handle_app_state(self.app, self.now);
        for item in c.outbox.clone() {
            core.queue_send(item, self.now);
        }
        core.start(self.now);
        c.core = Some(core);
        c.open_tid = None;
        c.generation += 1;
        // A new process may refresh once again.
        c.refreshes_since_welcome = 0;
        self.drain(i);
    }

    /// Carries out client `i`'s transmits and handles its events (the driver).
    fn drain(&mut self, i: usize) {
        loop {
            let mut progressed = false;
            while let Some(t) = self.clients[i]
                .core
                .as_mut()
                .and_then(|c| c.poll_transmit())
            {
                progressed = true;
                self.transmit(i, t);
            }
            while let Some(e) = self.clients[i].core.as_mut().and_then(|c| c.poll_event()) {
                progressed = true;
                self.event(i, e);
            }
            if !progressed {
                break;
            }
        }
        self.check(i);
    }

    fn transmit(&mut self, i: usize, t: Transmit) {
        match t {
            Transmit::Open { id, url } => {
                let id = tag(self.clients[i].generation, id);
                assert!(url.starts_with("ws://relay-"));
                assert_ne!(
                    self.network,
                    Network::Offline,
                    "seed {}: attempt while offline",
                    self.seed
                );
                assert!(
                    self.clients[i].open_tid.is_none(),
                    "seed {}: second transport opened",
                    self.seed
                );
                self.clients[i].open_tid = Some(id);
                let d = self.latency();
                let ev = if self.dns_broken {
                    TransportEvent::Failed(FailureKind::Dns)
                } else if !self.relay.up {
                    TransportEvent::Failed(FailureKind::Refused)
                } else {
                    self.relay.conns.push(ServerConn {
                        client: i,
                        tid: id,
                        user: None,
                        device: String::new(),
                        next: 1,
                        acked: 0,
                    });
                    self.links.push(Link {
                        client: i,
                        tid: id,
                        conn: Some(self.relay.conns.len() - 1),
                        blackholed: false,
                    });
                    TransportEvent::Opened
                };
                self.schedule(
                    d,
                    NetEvent::ToClient {
                        client: i,
                        tid: id,
                        ev,
                    },
                );
            }
            Transmit::Frame { id, text } => {
                let id = tag(self.clients[i].generation, id);
                assert_eq!(
                    self.clients[i].open_tid,
                    Some(id),
                    "frame on a transport not open"
                );
                let d = self.latency().max(self.last_arrival(i, id, true));
                self.schedule(
                    d,
                    NetEvent::ToServer {
                        client: i,
                        tid: id,
                        text,
                    },
                );
            }
            Transmit::Close { id, .. } => {
                let id = tag(self.clients[i].generation, id);
                if self.clients[i].open_tid == Some(id) {
                    self.clients[i].open_tid = None;
                }
                self.cut(i, id);
            }
        }
    }

    fn event(&mut self, i: usize, e: Event) {
        let now = self.now;
        if std::env::var("KEEPWIRE_SIM_TRACE").is_ok() {
            println!("{:?} client {i}: {e:?}", self.now);
        }
        match e {
            Event::Entries(entries) => {
                // The driver: store entries and cursor in one transaction, then tell the core.
                let c = &mut self.clients[i];
                let mut last = None;
                for e in entries {
                    let expected = c.persisted.len() as u64 + 1;
                    if e.seq < expected {
                        continue; // replayed after a crash before the ack: already stored
                    }
                    assert_eq!(
                        e.seq, expected,
                        "seed {}: gap in the stored inbox",
                        self.seed
                    );
                    last = Some(e.seq);
                    c.persisted.push(e);
                }
                if let Some(seq) = last {
                    c.cursor = Some(Cursor {
                        epoch: EPOCH.into(),
                        seq,
                    });
                    c.core.as_mut().unwrap().handle_persisted(seq, now);
                }
            }
            Event::SendConfirmed(conf) => {
                self.clients[i].outbox.retain(|o| o.cid != conf.cid);
            }
            Event::SendFailed { cid, code, .. } => {
                panic!("seed {}: send {cid} failed with {code}", self.seed)
            }
            Event::TokenNeeded => {
                let c = &mut self.clients[i];
                c.refreshes_since_welcome += 1;
                assert!(
                    c.refreshes_since_welcome <= 1,
                    "seed {}: more than one refresh",
                    self.seed
                );
                // The app's token provider: usually has the new token.
                let fresh = self.relay.token(c.user);
                let give = if !self.healed && self.rng.below(10) == 0 {
                    None
                } else {
                    Some(fresh)
                };
                if let Some(t) = &give {
                    c.token = t.clone();
                }
                c.core.as_mut().unwrap().handle_token(give, now);
            }
            Event::Welcome(_) => self.clients[i].refreshes_since_welcome = 0,
            Event::StateChanged(State::BackingOff) => {
                let core = self.clients[i].core.as_ref().unwrap();
                let cap = core
                    .backoff()
                    .cap
                    .max(Duration::from_secs(300))
                    .max(ms(5000));
                if let Some(at) = core.retry_at() {
                    assert!(
                        at - now <= cap,
                        "seed {}: backoff {:?} over the cap",
                        self.seed,
                        at - now
                    );
                }
            }
            Event::StateChanged(_)
            | Event::Error(_)
            | Event::Reply(_)
            | Event::HeartbeatProbed { .. } => {}
            Event::HeartbeatLearned { interval, .. } => {
                let a = keepwire_core::AdaptiveHeartbeat::default();
                assert!(
                    interval >= a.min && interval <= a.max,
                    "seed {}: learnt {interval:?}",
                    self.seed
                );
            }
            other => panic!("unexpected event {other:?}"),
        }
    }

    /// Cuts a link: the relay forgets the connection.
    fn cut(&mut self, client: usize, tid: u64) {
        if let Some(l) = self
            .links
            .iter_mut()
            .find(|l| l.client == client && l.tid == tid)
        {
            l.conn = None;
        }
    }

    fn conn_index(&self, client: usize, tid: u64) -> Option<usize> {
        self.links
            .iter()
            .find(|l| l.client == client && l.tid == tid && !l.blackholed)
            .and_then(|l| l.conn)
    }

    fn deliver(&mut self, ev: NetEvent) {
        match ev {
            NetEvent::ToServer { client, tid, text } => {
                let Some(ci) = self.conn_index(client, tid) else {
                    return;
                };
                if !self.relay.up {
                    return;
                }
                let (frames, close) = self.relay.on_frame(ci, &text);
                self.send_frames(ci, frames);
                if let Some(code) = close {
                    self.server_close(ci, code);
                }
                self.push_entries();
            }
            NetEvent::ToClient { client, tid, ev } => {
                let now = self.now;
                if self.clients[client].open_tid != Some(tid) {
                    return; // the client forgot this transport (or crashed)
                }
                if let TransportEvent::Closed(_) | TransportEvent::Failed(_) = ev {
                    self.clients[client].open_tid = None;
                }
                if let Some(core) = self.clients[client].core.as_mut() {
                    core.handle_transport(tid & 0xffff_ffff, ev, now);
                }
                self.drain(client);
            }
        }
    }

    fn send_frames(&mut self, ci: usize, frames: Vec<ServerFrame>) {
        let (client, tid) = (self.relay.conns[ci].client, self.relay.conns[ci].tid);
        for f in frames {
            let d = self.latency();
            // Frames of one connection arrive in order: latency only grows.
            let d = d.max(self.last_delay(client, tid));
            self.schedule(
                d,
                NetEvent::ToClient {
                    client,
                    tid,
                    ev: TransportEvent::Frame(encode(&f)),
                },
            );
        }
    }

    /// The latest scheduled arrival towards the client on (client, tid), to keep TCP ordering.
    fn last_delay(&self, client: usize, tid: u64) -> Duration {
        self.last_arrival(client, tid, false)
    }

    fn last_arrival(&self, client: usize, tid: u64, to_server: bool) -> Duration {
        self.arrivals
            .get(&(client, tid, to_server))
            .map(|t| *t - self.now)
            .unwrap_or_default()
    }

    fn server_close(&mut self, ci: usize, code: u16) {
        let (client, tid) = (self.relay.conns[ci].client, self.relay.conns[ci].tid);
        let d = self.last_delay(client, tid) + ms(1);
        self.schedule(
            d,
            NetEvent::ToClient {
                client,
                tid,
                ev: TransportEvent::Closed(Some(code)),
            },
        );
        self.cut(client, tid);
    }

    fn push_entries(&mut self) {
        let live: Vec<usize> = self
            .links
            .iter()
            .filter(|l| !l.blackholed)
            .filter_map(|l| l.conn)
            .collect();
        for ci in live {
            let frames = self.relay.deliverable(ci);
            self.send_frames(ci, frames);
        }
    }

    /// Invariants after every step of client `i`.
    fn check(&self, i: usize) {
        let c = &self.clients[i];
        if let Some(core) = &c.core {
            // The core and the "driver" agree on the one transport.
            assert_eq!(
                core.transport_open(),
                c.open_tid.is_some(),
                "seed {}: transport bookkeeping",
                self.seed
            );
            if self.network == Network::Offline {
                assert!(
                    !core.transport_open(),
                    "seed {}: transport open while offline",
                    self.seed
                );
            }
            if core.state() == State::Dormant {
                assert!(
                    !core.transport_open() && !core.syncing(),
                    "seed {}: dormant with a transport",
                    self.seed
                );
            }
        }
    }

    // ----- actions -------------------------------------------------------

    fn next_time(&self) -> Option<Instant> {
        let net = self.net.peek().map(|Reverse((t, _, _))| *t);
        let timers = self
            .clients
            .iter()
            .filter_map(|c| c.core.as_ref()?.poll_timeout())
            .min();
        match (net, timers) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Advances the clock to the next event and handles everything due.
    fn tick(&mut self) -> bool {
        let Some(t) = self.next_time() else {
            return false;
        };
        self.now = self.now.max(t);
        while let Some(Reverse((at, _, id))) = self.net.peek().copied() {
            if at > self.now {
                break;
            }
            self.net.pop();
            let ev = self.net_events.remove(&id).expect("event");
            self.deliver(ev);
        }
        for i in 0..self.clients.len() {
            let now = self.now;
            let due = self.clients[i]
                .core
                .as_ref()
                .and_then(|c| c.poll_timeout())
                .is_some_and(|t| t <= now);
            if due {
                self.clients[i].core.as_mut().unwrap().handle_timeout(now);
                self.drain(i);
            }
        }
        true
    }

    fn app_send(&mut self, i: usize) {
        if self.clients[i].core.is_none() {
            return;
        }
        self.next_cid += 1;
        let cid = format!("{:032x}", (self.seed << 32) | self.next_cid);
        let item = OutboxItem {
            cid: cid.clone(),
            conv: CONV,
            kind: "text".into(),
            body: format!("m{}", self.next_cid),
        };
        // Durable first, then accepted.
        self.clients[i].outbox.push(item.clone());
        self.accepted.entry(i).or_default().push(cid);
        let now = self.now;
        self.clients[i].core.as_mut().unwrap().queue_send(item, now);
        self.drain(i);
    }

    fn random_fault(&mut self) {
        let now = self.now;
        match self.rng.below(12) {
            0 => {
                self.fault("network_toggle");
                let next = if self.network == Network::Offline {
                    Network::Online(if self.rng.below(2) == 0 {
                        "wifi".into()
                    } else {
                        "cellular".into()
                    })
                } else {
                    Network::Offline
                };
                let back_online = self.network == Network::Offline;
                self.network = next.clone();
                for i in 0..self.clients.len() {
                    if let Some(core) = self.clients[i].core.as_mut() {
                        core.handle_network(next.clone(), now);
                        let state = core.state();
                        self.drain(i);
                        // After the network returns, the next attempt starts at once.
                        if back_online
                            && !matches!(
                                state,
                                State::Stopped(_) | State::RefreshingToken | State::Dormant
                            )
                        {
                            let core = self.clients[i].core.as_ref().unwrap();
                            assert!(
                                core.transport_open(),
                                "seed {}: no immediate attempt after network up",
                                self.seed
                            );
                        }
                    }
                }
            }
            1 => {
                self.fault("app_state");
                self.app = if self.app == AppState::Foreground {
                    AppState::Background
                } else {
                    AppState::Foreground
                };
                for i in 0..self.clients.len() {
                    if let Some(core) = self.clients[i].core.as_mut() {
                        core.handle_app_state(self.app, now);
                        self.drain(i);
                    }
                }
            }
            2 => {
                self.fault("client_crash");
                let i = self.rng.below(self.clients.len() as u64) as usize;
                if let Some(tid) = self.clients[i].open_tid.take() {
                    // The process died: its socket vanishes (RST later or never).
                    self.cut(i, tid);
                }
                self.clients[i].core = None;
                self.boot(i);
            }
            3 => {
                self.fault("relay_kill");
                self.relay.up = false;
                let links: Vec<(usize, u64)> = self
                    .links
                    .iter()
                    .filter(|l| l.conn.is_some())
                    .map(|l| (l.client, l.tid))
                    .collect();
                for (client, tid) in links {
                    self.cut(client, tid);
                    if self.rng.below(2) == 0 {
                        let d = self.latency();
                        self.schedule(
                            d,
                            NetEvent::ToClient {
                                client,
                                tid,
                                ev: TransportEvent::Closed(None),
                            },
                        );
                    }
                }
            }
            4 => {
                self.fault("relay_restart");
                self.relay.up = true;
            }
            5 => {
                self.fault("blackhole");
                let live: Vec<usize> = (0..self.links.len())
                    .filter(|&k| self.links[k].conn.is_some())
                    .collect();
                if !live.is_empty() {
                    let k = live[self.rng.below(live.len() as u64) as usize];
                    self.links[k].blackholed = true;
                }
            }
            6 => {
                self.fault("going_away");
                let live: Vec<usize> = self
                    .links
                    .iter()
                    .filter(|l| !l.blackholed)
                    .filter_map(|l| l.conn)
                    .collect();
                for ci in live {
                    self.server_close(ci, CloseCode::GoingAway.code());
                }
            }
            7 => {
                self.fault("token_expiry");
                let u = self.rng.below(USERS as u64) as usize;
                self.relay.token_version[u] += 1;
                let live: Vec<usize> = self
                    .links
                    .iter()
                    .filter(|l| !l.blackholed)
                    .filter_map(|l| l.conn)
                    .filter(|&ci| self.relay.conns[ci].user == Some(u))
                    .collect();
                for ci in live {
                    self.server_close(ci, CloseCode::TokenExpired.code());
                }
            }
            10 => {
                self.fault("sync_request");
                let i = self.rng.below(self.clients.len() as u64) as usize;
                let deadline = now + Duration::from_secs(25);
                if let Some(core) = self.clients[i].core.as_mut() {
                    core.request_sync(deadline, now);
                    self.drain(i);
                }
            }
            8 => {
                self.fault("dns_toggle");
                self.dns_broken = !self.dns_broken;
            }
            _ => {
                self.fault("reset");
                let live: Vec<usize> = (0..self.links.len())
                    .filter(|&k| self.links[k].conn.is_some())
                    .collect();
                if !live.is_empty() {
                    let k = live[self.rng.below(live.len() as u64) as usize];
                    let (client, tid) = (self.links[k].client, self.links[k].tid);
                    self.links[k].conn = None;
                    let d = self.latency();
                    self.schedule(
                        d,
                        NetEvent::ToClient {
                            client,
                            tid,
                            ev: TransportEvent::Closed(None),
                        },
                    );
                }
            }
        }
    }

    /// Clients that stopped on auth (one refresh used, then rejected again)
    /// stay stopped until the user logs in again: do that.
    fn relogin_stopped(&mut self) {
        for i in 0..self.clients.len() {
            let state = self.clients[i].core.as_ref().map(|c| c.state());
            if matches!(
                state,
                Some(State::Stopped(StopReason::AuthRejected)) | Some(State::RefreshingToken)
            ) {
                self.clients[i].token = self.relay.token(self.clients[i].user);
                self.clients[i].core = None;
                self.boot(i);
            }
        }
    }

    fn heal(&mut self) {
        self.healed = true;
        let now = self.now;
        self.relay.up = true;
        self.dns_broken = false;
        self.network = Network::Online("wifi".into());
        self.app = AppState::Foreground;
        self.relogin_stopped();
        for i in 0..self.clients.len() {
            if let Some(core) = self.clients[i].core.as_mut() {
                core.handle_network(Network::Online("wifi".into()), now);
                core.handle_app_state(AppState::Foreground, now);
            }
            self.drain(i);
        }
    }

    fn quiescent(&self) -> bool {
        self.clients.iter().all(|c| {
            let head = self.relay.inbox[c.user].len();
            c.outbox.is_empty()
                && c.persisted.len() == head
                && c.core
                    .as_ref()
                    .is_some_and(|k| k.state() == State::Connected)
        })
    }

    fn final_check(&self) {
        for (i, c) in self.clients.iter().enumerate() {
            // The store holds the inbox exactly: contiguous, each message once.
            for (k, e) in c.persisted.iter().enumerate() {
                assert_eq!(
                    e.seq,
                    k as u64 + 1,
                    "seed {}: client {i} inbox not contiguous",
                    self.seed
                );
            }
            let cids: Vec<&str> = c
                .persisted
                .iter()
                .filter_map(|e| match &e.item {
                    EntryItem::Message(m) => Some(m.cid.as_str()),
                    _ => None,
                })
                .collect();
            let unique: HashSet<&str> = cids.iter().copied().collect();
            assert_eq!(
                unique.len(),
                cids.len(),
                "seed {}: duplicate in client {i}",
                self.seed
            );
            for (sender, sent) in &self.accepted {
                // Every accepted send, once, in the order the sender accepted them.
                let order: Vec<&str> = cids
                    .iter()
                    .copied()
                    .filter(|x| sent.iter().any(|s| s == x))
                    .collect();
                let want: Vec<&str> = sent.iter().map(String::as_str).collect();
                assert_eq!(
                    order, want,
                    "seed {}: client {i} has sender {sender}'s messages wrong",
                    self.seed
                );
            }
        }
    }
}

fn run_seed(seed: u64) -> BTreeMap<&'static str, u32> {
    let mut sim = Sim::new(seed);
    let steps = 300 + sim.rng.below(300);
    for _ in 0..steps {
        match sim.rng.below(10) {
            0..=2 => {
                let i = sim.rng.below(sim.clients.len() as u64) as usize;
                sim.app_send(i);
            }
            3 => sim.random_fault(),
            _ => {
                sim.tick();
            }
        }
    }
    sim.heal();
    let deadline = sim.now + Duration::from_secs(3600);
    while !sim.quiescent() {
        assert!(
            sim.now < deadline,
            "seed {seed}: not quiescent an hour after healing: states {:?}",
            sim.clients
                .iter()
                .map(|c| c.core.as_ref().map(|k| k.state()))
                .collect::<Vec<_>>()
        );
        if !sim.tick() {
            panic!("seed {seed}: stuck with nothing scheduled");
        }
        sim.relogin_stopped();
    }
    sim.final_check();
    sim.faults
}

#[test]
fn simulated_clients_deliver_every_accepted_send_exactly_once_in_order() {
    if let Ok(seed) = std::env::var("KEEPWIRE_SIM_SEED") {
        let seed: u64 = seed.parse().expect("KEEPWIRE_SIM_SEED is a number");
        println!("{:?}", run_seed(seed));
        return;
    }
    let seeds: u64 = std::env::var("KEEPWIRE_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let mut totals: BTreeMap<&'static str, u64> = BTreeMap::new();
    for seed in 0..seeds {
        let faults = std::panic::catch_unwind(|| run_seed(seed)).unwrap_or_else(|e| {
            eprintln!("simulation failed: replay with KEEPWIRE_SIM_SEED={seed}");
            std::panic::resume_unwind(e)
        });
        for (k, v) in faults {
            *totals.entry(k).or_default() += u64::from(v);
        }
    }
    println!("{seeds} seeds, faults injected: {totals:?}");
    for kind in [
        "network_toggle",
        "client_crash",
        "relay_kill",
        "blackhole",
        "going_away",
        "token_expiry",
        "dns_toggle",
        "reset",
        "sync_request",
        "app_state",
    ] {
        assert!(
            totals.get(kind).copied().unwrap_or(0) > 0,
            "no {kind} fault injected"
        );
    }
}
