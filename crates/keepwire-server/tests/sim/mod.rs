//! Deterministic simulation of real clients against the real relay.
//!
//! Real `keepwire-core` clients talk over a simulated network to real relay
//! [`Session`](keepwire_server::Session)s, with the real hub and executor,
//! on a [`MemoryStore`] in manual-commit mode: the seed decides when each
//! store request is answered and which writes share a commit. Virtual time
//! and one seeded RNG only. Faults: network cuts, resets, blackholes, DNS
//! and OS network changes, app state flips, client crashes that keep their
//! store, token expiry, relay crashes at every point of a group commit
//! (before it, after it, after the head notices) with ack positions
//! unflushed, graceful restarts, membership changes under traffic, and with
//! three nodes over one store a lossy bus for head notices. Invariants are
//! checked after every step; after healing, every client must hold exactly
//! its user's relay inbox, every accepted send once and in send order, and a
//! member that came and went exactly the messages of its membership.
//!
//! `KEEPWIRE_SIM_SEEDS=N` runs N seeds (default 2000); `KEEPWIRE_SIM_SEED=S`
//! replays one seed (printed on failure).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keepwire_core::{
    AppState, BackfillDue, BackgroundPolicy, Config as CoreConfig, Connection, ConnectionError,
    Event, FailureKind, Network, OutboxItem, SeededRng, State, StopReason, Transmit,
    TransportEvent,
};
use keepwire_proto::{
    ConvCreate, ConvKind, Cursor, EntryItem, GapReason, InboxEntry, Instant, MemberChange, Message,
    ResumeStatus, Seq,
};
use keepwire_server::session::TransportEvent as ServerEvent;
use keepwire_server::store::{
    Actor, CrashPoint, HeadListener as _, MemoryOptions, MemoryStore, Sabotage,
};

mod relay;

use relay::{Node, NodeSetup, SimWall, poll_once};

/// (user, device) of each client; user 0 has two devices; user 3 comes and
/// goes from the conversation and never sends.
const DEVICES: &[(usize, &str)] = &[
    (0, "phone"),
    (0, "laptop"),
    (1, "phone"),
    (2, "phone"),
    (3, "phone"),
];
const SENDERS: usize = 4;
const USERS: usize = 4;
const VISITOR: usize = 3;
const BASE_MS: i64 = 1_800_000_000_000;
/// Tokens per user, expiring one after another.
const TOKEN_STEP: Duration = Duration::from_secs(120);
const TOKENS: u32 = 12;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Which store backs the relays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// The memory store.
    Memory,
    /// SQLite, its writer driven by the simulation.
    Sqlite,
}

/// What the simulation runs on.
#[derive(Debug, Clone, Copy)]
pub struct Variant {
    /// The store.
    pub store: StoreKind,
    /// Relay nodes over one store (3: a lossy bus between them).
    pub nodes: usize,
    /// A deliberate bug, to prove the simulation catches it.
    pub sabotage: Option<Sabotage>,
}

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
    Commit {
        node: usize,
    },
    Answers {
        node: usize,
    },
    Bus {
        node: usize,
        heads: Vec<keepwire_server::store::HeadAdvance>,
    },
    RefreshHeads,
}

fn tag(generation: u64, tid: u64) -> u64 {
    generation << 32 | tid
}

struct Link {
    client: usize,
    tid: u64,
    node: usize,
    conn: Option<u64>,
    blackholed: bool,
}

struct ClientProc {
    user: usize,
    device: &'static str,
    core: Option<Connection>,
    outbox: Vec<OutboxItem>,
    /// The inbox entries stored, from sequence `base` on.
    persisted: Vec<InboxEntry>,
    base: Seq,
    /// Messages stored from history paging (the backfill), by `conv_seq`.
    history: BTreeMap<u64, Message>,
    /// The backfills not done yet, as the store keeps them.
    backfill_due: BTreeMap<u64, BackfillDue>,
    /// Entries the relay replays to this device when it has no cursor.
    replay: u64,
    cursor: Option<Cursor>,
    token: String,
    open_tid: Option<u64>,
    refreshes_since_welcome: u32,
    generation: u64,
}

struct Sim {
    rng: SeededRng,
    now: Instant,
    wall: Arc<SimWall>,
    variant: Variant,
    setup: NodeSetup,
    nodes: Vec<Node>,
    user_ids: Vec<i64>,
    tokens: Vec<Vec<(String, i64)>>,
    conv: u64,
    net: BinaryHeap<Reverse<(Instant, u64)>>,
    net_events: HashMap<u64, NetEvent>,
    net_seq: u64,
    arrivals: HashMap<(usize, u64, bool), Instant>,
    links: Vec<Link>,
    next_conn: u64,
    clients: Vec<ClientProc>,
    network: Network,
    dns_broken: bool,
    app: AppState,
    accepted: BTreeMap<usize, Vec<String>>,
    next_cid: u64,
    seed: u64,
    faults: BTreeMap<&'static str, u32>,
    healed: bool,
    commit_scheduled: Vec<bool>,
}

impl Drop for Sim {
    fn drop(&mut self) {
        if let relay::Backend::Sqlite(path, _) = &self.setup.backend
            && let Some(dir) = path.parent()
        {
            self.nodes.clear();
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn client_config(device: &str, policy: u64, urls: Vec<String>) -> CoreConfig {
    let mut c = CoreConfig::new(device, urls);
    // Small pages, so a backfill takes several.
    c.backfill_page = 5;
    c.background_policy = match policy % 3 {
        0 => BackgroundPolicy::KeepAlive,
        1 => BackgroundPolicy::Linger(Duration::from_secs(5)),
        _ => BackgroundPolicy::WakeOnly,
    };
    c
}

fn relay_config() -> keepwire_server::Config {
    keepwire_server::Config {
        // Within the simulation's sends; the rate rules have their own tests.
        user_sends_per_sec: 1000,
        user_send_burst: 1000,
        send_burst: 1000,
        ..Default::default()
    }
}

impl Sim {
    fn new(seed: u64, variant: Variant) -> Sim {
        let wall = Arc::new(SimWall(Mutex::new(BASE_MS)));
        let backend = match variant.store {
            StoreKind::Memory => {
                let disk = MemoryStore::new(MemoryOptions::default()).disk();
                let opts = MemoryOptions {
                    clock: wall.clone(),
                    seed,
                    sabotage: variant.sabotage,
                    ..Default::default()
                };
                relay::Backend::Memory(disk, opts)
            }
            StoreKind::Sqlite => {
                let dir = std::env::temp_dir().join(format!(
                    "keepwire-sim-{}-{seed}-{:x}",
                    std::process::id(),
                    rand::random::<u32>()
                ));
                relay::Backend::Sqlite(dir.join("relay.db"), wall.clone())
            }
        };
        let setup_store = backend.open();
        let mut user_ids = Vec::new();
        let mut tokens = Vec::new();
        for u in 0..USERS {
            let name = format!("u{u}");
            user_ids.push(setup_store.run(setup_store.create_user(&name)).unwrap());
            let mut mine = Vec::new();
            for k in 1..=TOKENS {
                let ttl = if k == TOKENS {
                    Duration::from_secs(10 * 365 * 24 * 3600)
                } else {
                    TOKEN_STEP * k
                };
                let t = setup_store
                    .run(setup_store.issue_token(&name, ttl))
                    .unwrap();
                mine.push((t.token, t.expires_at_ms));
            }
            tokens.push(mine);
        }
        let conv = setup_store.run(setup_store.conv_create(
            Actor::System,
            ConvCreate {
                rid: "r".into(),
                key: "sim".into(),
                kind: ConvKind::Group,
                members: (0..SENDERS - 1).map(|u| format!("u{u}")).collect(),
                name: Some("sim".into()),
            },
            1000,
        ));
        let conv = conv.unwrap().0.id;
        // The setup's handle goes the way of a relay that stopped.
        setup_store.crash();
        drop(setup_store);
        let setup = NodeSetup {
            backend,
            config: relay_config(),
        };
        let nodes = (0..variant.nodes).map(|_| Node::start(&setup)).collect();
        let mut sim = Sim {
            rng: SeededRng::new(seed ^ 0x5eed),
            now: Instant::ZERO,
            wall,
            variant,
            setup,
            nodes,
            user_ids,
            tokens,
            conv,
            net: BinaryHeap::new(),
            net_events: HashMap::new(),
            net_seq: 0,
            arrivals: HashMap::new(),
            links: vec![],
            next_conn: 0,
            clients: Vec::new(),
            network: Network::Online("wifi".into()),
            dns_broken: false,
            app: AppState::Foreground,
            accepted: BTreeMap::new(),
            next_cid: 0,
            seed,
            faults: BTreeMap::new(),
            healed: false,
            commit_scheduled: vec![false; variant.nodes],
        };
        sim.clients = DEVICES
            .iter()
            .map(|&(user, device)| ClientProc {
                user,
                device,
                core: None,
                outbox: vec![],
                persisted: vec![],
                base: 1,
                history: BTreeMap::new(),
                backfill_due: BTreeMap::new(),
                replay: 1_000_000,
                cursor: None,
                token: sim.token_for(user).unwrap_or_default(),
                open_tid: None,
                refreshes_since_welcome: 0,
                generation: 0,
            })
            .collect();
        if variant.nodes > 1 {
            sim.schedule(Duration::from_secs(1), NetEvent::RefreshHeads);
        }
        for i in 0..sim.clients.len() {
            sim.boot(i);
        }
        sim
    }

    fn now_ms(&self) -> i64 {
        BASE_MS + self.now.as_duration().as_millis() as i64
    }

    /// The app's token provider: a token valid for a while yet.
    fn token_for(&self, user: usize) -> Option<String> {
        let now = self.now_ms();
        self.tokens[user]
            .iter()
            .find(|(_, exp)| *exp > now + 30_000)
            .map(|(t, _)| t.clone())
    }

    fn fault(&mut self, name: &'static str) {
        *self.faults.entry(name).or_default() += 1;
    }

    fn latency(&mut self) -> Duration {
        ms(1 + self.rng.below(80))
    }

    fn schedule(&mut self, after: Duration, ev: NetEvent) {
        let key = match &ev {
            NetEvent::ToServer { client, tid, .. } => Some((*client, *tid, true)),
            NetEvent::ToClient { client, tid, .. } => Some((*client, *tid, false)),
            _ => None,
        };
        let at = self.now + after;
        if let Some(key) = key {
            let last = self.arrivals.entry(key).or_insert(at);
            *last = (*last).max(at);
        }
        self.net_seq += 1;
        self.net_events.insert(self.net_seq, ev);
        self.net.push(Reverse((at, self.net_seq)));
    }

    fn last_arrival(&self, client: usize, tid: u64, to_server: bool) -> Duration {
        self.arrivals
            .get(&(client, tid, to_server))
            .map(|t| *t - self.now)
            .unwrap_or_default()
    }

    fn urls(&self) -> Vec<String> {
        let n = self.variant.nodes.max(2);
        (0..n).map(|k| format!("ws://relay-{k}")).collect()
    }

    fn node_of(&self, url: &str) -> usize {
        let k: usize = url.trim_start_matches("ws://relay-").parse().unwrap();
        k % self.variant.nodes
    }

    // ----- clients --------------------------------------------------------

    fn boot(&mut self, i: usize) {
        let seed = self.rng.next_u64();
        let urls = self.urls();
        let c = &mut self.clients[i];
        let mut config = client_config(c.device, self.seed.wrapping_add(i as u64), urls);
        // The boot number the driver persists: one more for each process.
        config.boot = c.generation + 1;
        config.history = c.replay;
        let mut core = Connection::new(config, c.token.clone(), c.cursor.clone(), seed, self.now);
        for due in c.backfill_due.values() {
            core.backfill(*due, self.now);
        }
        core.handle_network(self.network.clone(), self.now);
        core.handle_app_state(self.app, self.now);
        for item in c.outbox.clone() {
            core.queue_send(item, self.now);
        }
        core.start(self.now);
        c.core = Some(core);
        c.open_tid = None;
        c.generation += 1;
        c.refreshes_since_welcome = 0;
        self.drain(i);
    }

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
        if std::env::var("KEEPWIRE_SIM_TRACE").is_ok() {
            println!("{:?} client {i} transmits {t:?}", self.now);
        }
        match t {
            Transmit::Open { id, url } => {
                let id = tag(self.clients[i].generation, id);
                assert_ne!(
                    self.network,
                    Network::Offline,
                    "seed {}: attempt while offline",
                    self.seed
                );
                assert!(
                    self.clients[i].open_tid.is_none(),
                    "seed {}: second transport",
                    self.seed
                );
                self.clients[i].open_tid = Some(id);
                let d = self.latency();
                let node = self.node_of(&url);
                let ev = if self.dns_broken {
                    TransportEvent::Failed(FailureKind::Dns)
                } else if !self.nodes[node].up {
                    TransportEvent::Failed(FailureKind::Refused)
                } else {
                    self.next_conn += 1;
                    let conn = self.next_conn;
                    let seed = self.rng.next_u64();
                    self.nodes[node].accept(conn, i, id, seed, self.now);
                    self.links.push(Link {
                        client: i,
                        tid: id,
                        node,
                        conn: Some(conn),
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
                // The relay sees the socket close.
                self.client_gone(i, id);
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
                let c = &mut self.clients[i];
                let mut last = None;
                for e in entries {
                    let expected = c.base + c.persisted.len() as u64;
                    assert!(
                        e.seq >= c.base,
                        "seed {}: entry below the replay",
                        self.seed
                    );
                    if e.seq < expected {
                        let stored = &c.persisted[(e.seq - c.base) as usize];
                        assert_eq!(
                            stored, &e,
                            "seed {}: entry {} changed content",
                            self.seed, e.seq
                        );
                        continue;
                    }
                    assert_eq!(
                        e.seq, expected,
                        "seed {}: gap in client {i}'s inbox",
                        self.seed
                    );
                    last = Some(e.seq);
                    c.persisted.push(e);
                }
                if let Some(seq) = last {
                    let epoch = self.nodes[0].store.epoch();
                    let c = &mut self.clients[i];
                    c.cursor = Some(Cursor { epoch, seq });
                    c.core.as_mut().unwrap().handle_persisted(seq, now);
                }
            }
            Event::SendConfirmed(conf) => self.clients[i].outbox.retain(|o| o.cid != conf.cid),
            Event::SendFailed { cid, code, .. } => {
                panic!("seed {}: send {cid} failed with {code}", self.seed)
            }
            Event::TokenNeeded => {
                self.fault("token_refresh");
                let c = &mut self.clients[i];
                c.refreshes_since_welcome += 1;
                assert!(
                    c.refreshes_since_welcome <= 1,
                    "seed {}: more than one refresh",
                    self.seed
                );
                let user = c.user;
                let give = if !self.healed && self.rng.below(10) == 0 {
                    None
                } else {
                    self.token_for(user)
                };
                let c = &mut self.clients[i];
                if let Some(t) = &give {
                    c.token = t.clone();
                }
                c.core.as_mut().unwrap().handle_token(give, now);
            }
            Event::CursorReset(cursor) => {
                let c = &mut self.clients[i];
                assert!(
                    c.persisted.is_empty() && c.cursor.is_none(),
                    "seed {}: the cursor was reset under stored entries",
                    self.seed
                );
                c.base = cursor.seq + 1;
                c.cursor = Some(cursor);
            }
            Event::History {
                conv,
                messages,
                due,
            } => {
                let c = &mut self.clients[i];
                assert_eq!(conv, self.conv);
                for m in messages {
                    assert!(
                        m.conv == conv && c.history.get(&m.conv_seq).is_none_or(|h| *h == m),
                        "seed {}: a history page changed a message",
                        self.seed
                    );
                    c.history.insert(m.conv_seq, m);
                }
                match due {
                    Some(d) => c.backfill_due.insert(conv, d),
                    None => c.backfill_due.remove(&conv),
                };
            }
            Event::Welcome(w) => {
                self.clients[i].refreshes_since_welcome = 0;
                // The driver's part of a backfill: what the device holds.
                for hint in &w.resume.fetch {
                    let c = &mut self.clients[i];
                    let known = c
                        .history
                        .keys()
                        .copied()
                        .chain(c.persisted.iter().filter_map(|e| match &e.item {
                            EntryItem::Message(m) if m.conv == hint.conv => Some(m.conv_seq),
                            _ => None,
                        }))
                        .max()
                        .unwrap_or(0);
                    let due = BackfillDue {
                        conv: hint.conv,
                        before: hint.before,
                        known,
                    };
                    if c.core.as_mut().unwrap().backfill(due, now) {
                        c.backfill_due.insert(hint.conv, due);
                        self.fault("backfill");
                    }
                }
                assert!(
                    w.resume.status != ResumeStatus::Gap
                        || w.resume.reason == Some(GapReason::Retention),
                    "seed {}: unexpected gap answer {:?}",
                    self.seed,
                    w.resume
                );
            }
            Event::StateChanged(State::BackingOff) => {
                let core = self.clients[i].core.as_ref().unwrap();
                let cap = core.backoff().cap.max(Duration::from_secs(300));
                if let Some(at) = core.retry_at() {
                    assert!(at - now <= cap, "seed {}: backoff over the cap", self.seed);
                }
            }
            Event::Error(ConnectionError::Protocol(p)) => {
                panic!("seed {}: the relay broke the protocol: {p}", self.seed)
            }
            Event::Error(ConnectionError::Closed(4011)) => {
                panic!("seed {}: 4011 without retention", self.seed)
            }
            Event::StateChanged(_)
            | Event::Error(_)
            | Event::Reply(_)
            | Event::RelayHead(_)
            | Event::HeartbeatProbed { .. }
            | Event::HeartbeatLearned { .. } => {}
            other => panic!("seed {}: unexpected event {other:?}", self.seed),
        }
    }

    /// The client side of a link closed or vanished: the relay sees the
    /// socket close (or, if blackholed, nothing until its idle timeout).
    fn client_gone(&mut self, client: usize, tid: u64) {
        let Some(l) = self
            .links
            .iter_mut()
            .find(|l| l.client == client && l.tid == tid)
        else {
            return;
        };
        let (node, conn, blackholed) = (l.node, l.conn.take(), l.blackholed);
        if let Some(conn) = conn
            && !blackholed
        {
            self.nodes[node].transport(conn, ServerEvent::Closed, self.now);
            self.drive_conn(node, conn);
        }
    }

    fn link_of_conn(&self, node: usize, conn: u64) -> Option<usize> {
        self.links
            .iter()
            .position(|l| l.node == node && l.conn == Some(conn))
    }

    // ----- relay ----------------------------------------------------------

    /// Runs a server connection's outputs: frames to the client, store work.
    fn drive_conn(&mut self, node: usize, conn: u64) {
        let out = self.nodes[node].drive(conn, self.now, &self.setup.config);
        if std::env::var("KEEPWIRE_SIM_TRACE").is_ok() && (out.close.is_some() || out.ended) {
            let link = self.link_of_conn(node, conn).map(|k| {
                (
                    self.links[k].client,
                    self.links[k].tid,
                    self.links[k].blackholed,
                )
            });
            println!(
                "{:?} relay conn {conn} (client, tid, blackholed) {link:?} ends with {:?}",
                self.now, out.close
            );
        }
        let Some(k) = self.link_of_conn(node, conn) else {
            self.after_relay_work(node);
            return;
        };
        let (client, tid, blackholed) = (
            self.links[k].client,
            self.links[k].tid,
            self.links[k].blackholed,
        );
        if !blackholed {
            for text in out.frames {
                let d = self.latency().max(self.last_arrival(client, tid, false));
                self.schedule(
                    d,
                    NetEvent::ToClient {
                        client,
                        tid,
                        ev: TransportEvent::Frame(text),
                    },
                );
            }
            if let Some(code) = out.close {
                let d = self.last_arrival(client, tid, false) + ms(1);
                self.schedule(
                    d,
                    NetEvent::ToClient {
                        client,
                        tid,
                        ev: TransportEvent::Closed(Some(code.code())),
                    },
                );
            } else if out.ended {
                let d = self.last_arrival(client, tid, false) + ms(1);
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
        if out.ended {
            self.links[k].conn = None;
        }
        self.after_relay_work(node);
    }

    /// After a node did anything: answers to schedule, a commit to plan,
    /// head notices for the bus, other connections to wake.
    fn after_relay_work(&mut self, node: usize) {
        if self.nodes[node].pending.iter().any(|p| p.answer.is_some()) {
            let d = ms(self.rng.below(20));
            self.schedule(d, NetEvent::Answers { node });
        }
        if self.nodes[node].store.pending_writes() > 0 && !self.commit_scheduled[node] {
            self.commit_scheduled[node] = true;
            let d = Duration::from_micros(100 + self.rng.below(5000));
            self.schedule(d, NetEvent::Commit { node });
        }
        let notices: Vec<_> = std::mem::take(&mut *self.nodes[node].bus.0.lock().unwrap());
        for heads in notices {
            for other in 0..self.nodes.len() {
                // The bus loses and delays notices; the head refresh repairs.
                if other != node && self.rng.below(10) != 0 {
                    let d = ms(self.rng.below(200));
                    self.schedule(
                        d,
                        NetEvent::Bus {
                            node: other,
                            heads: heads.clone(),
                        },
                    );
                }
            }
        }
        self.wake_node(node);
    }

    /// Gives every connection of a node the chance to act on hub changes.
    fn wake_node(&mut self, node: usize) {
        let ids: Vec<u64> = self.nodes[node].conns.iter().map(|c| c.id).collect();
        for id in ids {
            let has_work = self.nodes[node].conns.iter().any(|c| {
                c.id == id
                    && (c
                        .reg
                        .as_ref()
                        .is_some_and(|r| r.head.has_changed().unwrap_or(false)))
            });
            if has_work {
                self.drive_conn(node, id);
            }
        }
    }

    fn deliver(&mut self, ev: NetEvent) {
        let now = self.now;
        match ev {
            NetEvent::ToServer { client, tid, text } => {
                let Some(l) = self
                    .links
                    .iter()
                    .find(|l| l.client == client && l.tid == tid && !l.blackholed)
                else {
                    return;
                };
                let (node, Some(conn)) = (l.node, l.conn) else {
                    return;
                };
                if !self.nodes[node].up {
                    return;
                }
                let wants = self.nodes[node]
                    .conns
                    .iter()
                    .any(|c| c.id == conn && c.session.wants_frames());
                if !wants {
                    // Backpressure: the relay reads it later (TCP buffers it).
                    self.schedule(ms(5), NetEvent::ToServer { client, tid, text });
                    return;
                }
                self.nodes[node].transport(conn, ServerEvent::Text(&text), now);
                self.drive_conn(node, conn);
            }
            NetEvent::ToClient { client, tid, ev } => {
                if self.clients[client].open_tid != Some(tid) {
                    return;
                }
                if let TransportEvent::Closed(_) | TransportEvent::Failed(_) = ev {
                    self.clients[client].open_tid = None;
                }
                if let Some(core) = self.clients[client].core.as_mut() {
                    core.handle_transport(tid & 0xffff_ffff, ev, now);
                }
                self.drain(client);
            }
            NetEvent::Commit { node } => {
                self.commit_scheduled[node] = false;
                if !self.nodes[node].up {
                    return;
                }
                let queued = self.nodes[node].store.pending_writes();
                let n = 1 + self.rng.below(queued.max(1) as u64) as usize;
                self.nodes[node].commit(n, None);
                self.after_relay_work(node);
                for other in 0..self.nodes.len() {
                    if other != node {
                        self.wake_node(other);
                    }
                }
            }
            NetEvent::Answers { node } => {
                if !self.nodes[node].up {
                    return;
                }
                for (conn, id, answer) in self.nodes[node].take_answered() {
                    if let Some(c) = self.nodes[node].conn_mut(conn) {
                        c.session.handle_store_answer(id, answer, now);
                        self.drive_conn(node, conn);
                    }
                }
                self.after_relay_work(node);
            }
            NetEvent::Bus { node, heads } => {
                if self.nodes[node].up {
                    self.nodes[node].hub.heads_advanced(&heads);
                    self.wake_node(node);
                }
            }
            NetEvent::RefreshHeads => {
                for node in 0..self.nodes.len() {
                    if self.nodes[node].up {
                        self.nodes[node].refresh_heads();
                        self.wake_node(node);
                    }
                }
                self.schedule(Duration::from_secs(1), NetEvent::RefreshHeads);
            }
        }
    }

    fn check(&self, i: usize) {
        let c = &self.clients[i];
        if let Some(core) = &c.core {
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

    // ----- time -----------------------------------------------------------

    fn next_time(&self) -> Option<Instant> {
        let net = self.net.peek().map(|Reverse((t, _))| *t);
        let clients = self
            .clients
            .iter()
            .filter_map(|c| c.core.as_ref()?.poll_timeout())
            .min();
        let relay = self
            .nodes
            .iter()
            .filter(|n| n.up)
            .flat_map(|n| n.conns.iter().filter_map(|c| c.session.poll_timeout()))
            .min();
        [net, clients, relay].into_iter().flatten().min()
    }

    fn tick(&mut self) -> bool {
        let Some(t) = self.next_time() else {
            return false;
        };
        self.now = self.now.max(t);
        *self.wall.0.lock().unwrap() = self.now_ms();
        while let Some(Reverse((at, id))) = self.net.peek().copied() {
            if at > self.now {
                break;
            }
            self.net.pop();
            let ev = self.net_events.remove(&id).expect("event");
            self.deliver(ev);
        }
        for i in 0..self.clients.len() {
            let now = self.now;
            if self.clients[i]
                .core
                .as_ref()
                .and_then(|c| c.poll_timeout())
                .is_some_and(|t| t <= now)
            {
                self.clients[i].core.as_mut().unwrap().handle_timeout(now);
                self.drain(i);
            }
        }
        for node in 0..self.nodes.len() {
            let now = self.now;
            let due: Vec<u64> = self.nodes[node]
                .conns
                .iter()
                .filter(|c| c.session.poll_timeout().is_some_and(|t| t <= now))
                .map(|c| c.id)
                .collect();
            for id in due {
                if let Some(c) = self.nodes[node].conn_mut(id) {
                    c.session.handle_timeout(now);
                }
                self.drive_conn(node, id);
            }
        }
        true
    }

    // ----- actions --------------------------------------------------------

    fn app_send(&mut self, i: usize) {
        if self.clients[i].core.is_none() || self.clients[i].user == VISITOR {
            return;
        }
        self.next_cid += 1;
        let cid = format!("{:032x}", (self.seed << 32) | self.next_cid);
        let item = OutboxItem {
            cid: cid.clone(),
            conv: self.conv,
            kind: "text".into(),
            body: format!("m{}", self.next_cid),
        };
        self.clients[i].outbox.push(item.clone());
        self.accepted.entry(i).or_default().push(cid);
        let now = self.now;
        self.clients[i].core.as_mut().unwrap().queue_send(item, now);
        self.drain(i);
    }

    fn live_links(&self) -> Vec<usize> {
        (0..self.links.len())
            .filter(|&k| self.links[k].conn.is_some())
            .collect()
    }

    /// Kills node `node` (at a seeded point of a group commit).
    fn kill_node(&mut self, node: usize) {
        let point = match self.rng.below(4) {
            0 => None,
            1 => Some(CrashPoint::BeforeCommit),
            2 => Some(CrashPoint::AfterCommit),
            _ => Some(CrashPoint::AfterHeads),
        };
        if let Some(p) = point {
            let queued = self.nodes[node].store.pending_writes();
            if queued > 0 {
                self.fault(match p {
                    CrashPoint::BeforeCommit => "crash_before_commit",
                    CrashPoint::AfterCommit => "crash_after_commit",
                    CrashPoint::AfterHeads => "crash_after_heads",
                });
                let n = 1 + self.rng.below(queued as u64) as usize;
                self.nodes[node].store.commit(n, Some(p));
                // Notices made before the crash may still have left on the bus.
                let _ = self.nodes[node].bus.0.lock().map(|mut b| b.clear());
            }
        }
        if self.nodes[node]
            .conns
            .iter()
            .any(|c| c.session.peer().is_some())
        {
            self.fault("crash_with_acks_unflushed");
        }
        let gone = self.nodes[node].kill();
        for (client, tid) in gone {
            if let Some(l) = self
                .links
                .iter_mut()
                .find(|l| l.client == client && l.tid == tid)
            {
                l.conn = None;
            }
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

    fn restart_node(&mut self, node: usize) {
        if !self.nodes[node].up {
            self.nodes[node] = Node::start(&self.setup);
        }
    }

    fn random_fault(&mut self) {
        let now = self.now;
        match self.rng.below(14) {
            0 => {
                self.fault("network_toggle");
                let next = if self.network == Network::Offline {
                    Network::Online(
                        if self.rng.below(2) == 0 {
                            "wifi"
                        } else {
                            "cellular"
                        }
                        .into(),
                    )
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
                                "seed {}: no attempt at network up",
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
                if let Some(tid) = self.clients[i].open_tid.take()
                    && self.rng.below(2) == 0
                {
                    self.client_gone(i, tid);
                }
                self.clients[i].core = None;
                self.boot(i);
            }
            3 => {
                self.fault("relay_kill");
                let node = self.rng.below(self.nodes.len() as u64) as usize;
                if self.nodes[node].up {
                    self.kill_node(node);
                }
            }
            4 => {
                self.fault("relay_restart");
                let node = self.rng.below(self.nodes.len() as u64) as usize;
                self.restart_node(node);
            }
            5 => {
                self.fault("blackhole");
                let live = self.live_links();
                if !live.is_empty() {
                    let k = live[self.rng.below(live.len() as u64) as usize];
                    self.links[k].blackholed = true;
                }
            }
            6 => {
                self.fault("going_away");
                let node = self.rng.below(self.nodes.len() as u64) as usize;
                if self.nodes[node].up {
                    self.nodes[node]
                        .hub
                        .close_all(keepwire_proto::CloseCode::GoingAway);
                    self.wake_all(node);
                }
            }
            7 => {
                self.fault("membership_change");
                let node = self.rng.below(self.nodes.len() as u64) as usize;
                if self.nodes[node].up {
                    let add = self.rng.below(2) == 0;
                    let store = self.nodes[node].store.clone();
                    let conv = self.conv;
                    let fut = Box::pin(async move {
                        let _ = store
                            .conv_member(Actor::System, conv, "u3", add, 1000)
                            .await;
                        keepwire_server::session::StoreAnswer::Done(Ok(()))
                    });
                    let mut fut: keepwire_server::exec::AnswerFuture = fut;
                    let answer = poll_once(&mut fut);
                    self.nodes[node].pending.push(relay::Pending {
                        conn: 0,
                        id: 0,
                        fut,
                        answer,
                    });
                    self.after_relay_work(node);
                }
            }
            8 => {
                self.fault("dns_toggle");
                self.dns_broken = !self.dns_broken;
            }
            10 => self.wipe_device(),
            9 => {
                self.fault("sync_request");
                let i = self.rng.below(self.clients.len() as u64) as usize;
                if let Some(core) = self.clients[i].core.as_mut() {
                    core.request_sync(now + Duration::from_secs(25), now);
                    self.drain(i);
                }
            }
            _ => {
                self.fault("reset");
                let live = self.live_links();
                if !live.is_empty() {
                    let k = live[self.rng.below(live.len() as u64) as usize];
                    let (client, tid, node, conn) = (
                        self.links[k].client,
                        self.links[k].tid,
                        self.links[k].node,
                        self.links[k].conn,
                    );
                    self.links[k].conn = None;
                    if let Some(conn) = conn {
                        self.nodes[node].transport(conn, ServerEvent::Closed, now);
                        self.drive_conn(node, conn);
                    }
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

    /// The app is reinstalled on a device (its store is gone; nothing waits
    /// in its outbox): it comes back without a cursor, the relay replays a
    /// few recent entries (`new`) and the rest comes by backfill.
    fn wipe_device(&mut self) {
        let i = self.rng.below(self.clients.len() as u64) as usize;
        if self.clients[i].user == VISITOR || !self.clients[i].outbox.is_empty() {
            return;
        }
        self.fault("device_wipe");
        if let Some(tid) = self.clients[i].open_tid.take() {
            self.client_gone(i, tid);
        }
        let replay = 1 + self.rng.below(20);
        let c = &mut self.clients[i];
        c.core = None;
        c.persisted.clear();
        c.base = 1;
        c.history.clear();
        c.backfill_due.clear();
        c.cursor = None;
        c.replay = replay;
        self.boot(i);
    }

    fn wake_all(&mut self, node: usize) {
        let ids: Vec<u64> = self.nodes[node].conns.iter().map(|c| c.id).collect();
        for id in ids {
            self.drive_conn(node, id);
        }
    }

    fn relogin_stopped(&mut self) {
        for i in 0..self.clients.len() {
            let state = self.clients[i].core.as_ref().map(|c| c.state());
            if matches!(
                state,
                Some(State::Stopped(StopReason::AuthRejected)) | Some(State::RefreshingToken)
            ) {
                let user = self.clients[i].user;
                self.clients[i].token = self.token_for(user).expect("a long-lived token");
                self.clients[i].core = None;
                self.boot(i);
            }
        }
    }

    fn heal(&mut self) {
        self.healed = true;
        let now = self.now;
        for node in 0..self.nodes.len() {
            self.restart_node(node);
        }
        for l in &mut self.links {
            if l.blackholed {
                l.conn = None;
            }
        }
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

    fn relay_inbox(&self, user: usize) -> Vec<InboxEntry> {
        let mut f = Box::pin(
            self.nodes[0]
                .store
                .read_inbox(self.user_ids[user], 1, 1_000_000),
        );
        poll_once(&mut f).unwrap().unwrap()
    }

    fn quiescent(&self) -> bool {
        self.nodes.iter().all(|n| n.store.pending_writes() == 0)
            && self.clients.iter().all(|c| {
                let mut f = Box::pin(self.nodes[0].store.inbox_head(self.user_ids[c.user]));
                let head = poll_once(&mut f).unwrap().unwrap();
                c.outbox.is_empty()
                    && c.base - 1 + c.persisted.len() as Seq == head
                    && c.core
                        .as_ref()
                        .is_some_and(|k| k.state() == State::Connected && k.backfilling() == 0)
            })
    }

    fn final_check(&self) {
        for (i, c) in self.clients.iter().enumerate() {
            let relay = self.relay_inbox(c.user);
            for (k, e) in relay.iter().enumerate() {
                assert_eq!(
                    e.seq,
                    k as u64 + 1,
                    "seed {}: relay inbox of u{} not contiguous",
                    self.seed,
                    c.user
                );
            }
            assert_eq!(
                c.persisted,
                relay[(c.base - 1) as usize..],
                "seed {}: client {i} differs from the relay inbox",
                self.seed
            );
            // The device's messages: the backfilled history, then the inbox.
            let messages: Vec<&Message> = c
                .history
                .values()
                .chain(c.persisted.iter().filter_map(|e| match &e.item {
                    EntryItem::Message(m) => Some(m),
                    _ => None,
                }))
                .collect();
            let cids: Vec<&str> = messages.iter().map(|m| m.cid.as_str()).collect();
            let unique: HashSet<&str> = cids.iter().copied().collect();
            assert_eq!(
                unique.len(),
                cids.len(),
                "seed {}: duplicate in client {i}",
                self.seed
            );
            if c.user == VISITOR {
                self.check_visitor(i);
                continue;
            }
            // A member since the start holds every message of the
            // conversation exactly as the relay has it, in `conv_seq` order
            // (a wiped device through its replay plus the backfill).
            let all = self.conversation();
            assert!(
                messages.iter().copied().eq(all.iter()),
                "seed {}: client {i}'s messages differ from the conversation's",
                self.seed
            );
            for (sender, sent) in &self.accepted {
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
            // Persisted ack positions never lead what the device stored.
            let name = format!("u{}", c.user);
            let mut f = Box::pin(self.nodes[0].store.list_devices(&name));
            let devices = poll_once(&mut f).unwrap().unwrap();
            if let Some(d) = devices.iter().find(|d| d.device == c.device) {
                assert!(
                    d.acked_seq <= c.base - 1 + c.persisted.len() as u64,
                    "seed {}: ack position ahead",
                    self.seed
                );
            }
        }
    }

    /// Every message of the conversation, as the relay has it.
    fn conversation(&self) -> Vec<Message> {
        let mut f = Box::pin(self.nodes[0].store.history(
            Actor::System,
            self.conv,
            None,
            1_000_000,
        ));
        poll_once(&mut f).unwrap().unwrap().messages
    }

    /// The visitor has exactly the conversation's messages committed while
    /// it was a member (from its membership entries' `last_seq`).
    fn check_visitor(&self, i: usize) {
        let c = &self.clients[i];
        let mut member_since: Option<u64> = None;
        let mut expected: Vec<u64> = Vec::new();
        let all = self.conversation();
        let last = all.last().map_or(0, |m| m.conv_seq);
        let mut got = Vec::new();
        for e in &c.persisted {
            match &e.item {
                EntryItem::Member(m) if m.user == "u3" => match m.change {
                    MemberChange::Added => member_since = Some(m.conv.last_seq),
                    MemberChange::Removed => {
                        let from = member_since.take().expect("removed while not a member");
                        expected.extend(from + 1..=m.conv.last_seq);
                    }
                },
                EntryItem::Message(m) => got.push(m.conv_seq),
                _ => {}
            }
        }
        if let Some(from) = member_since {
            expected.extend(from + 1..=last);
        }
        assert_eq!(got, expected, "seed {}: the visitor's messages", self.seed);
    }
}

/// Runs one seed; returns the faults it injected.
pub fn run_seed(seed: u64, variant: Variant) -> BTreeMap<&'static str, u32> {
    let mut sim = Sim::new(seed, variant);
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
    // Foreground backoff is capped at 30 s: ten minutes is plenty.
    let deadline = sim.now + Duration::from_secs(600);
    while !sim.quiescent() {
        assert!(
            sim.now < deadline,
            "seed {seed}: not quiescent ten minutes after healing: {:?}",
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
    let resyncs: u32 = sim.nodes.iter().map(|n| n.resyncs).sum();
    assert_eq!(resyncs, 0, "seed {seed}: 4011 without retention");
    std::mem::take(&mut sim.faults)
}

/// Runs `seeds` seeds from `first`; panics with the replay command on failure.
pub fn run_seeds(first: u64, seeds: u64, variant: Variant) -> BTreeMap<&'static str, u64> {
    let mut totals: BTreeMap<&'static str, u64> = BTreeMap::new();
    for seed in first..first + seeds {
        let faults = std::panic::catch_unwind(|| run_seed(seed, variant)).unwrap_or_else(|e| {
            eprintln!("simulation failed: replay with KEEPWIRE_SIM_SEED={seed} ({variant:?})");
            std::panic::resume_unwind(e)
        });
        for (k, v) in faults {
            *totals.entry(k).or_default() += u64::from(v);
        }
    }
    totals
}

fn seeds_from_env(default: u64) -> u64 {
    std::env::var("KEEPWIRE_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn replay(variant: Variant) -> bool {
    if let Ok(seed) = std::env::var("KEEPWIRE_SIM_SEED") {
        let seed: u64 = seed.parse().expect("KEEPWIRE_SIM_SEED is a number");
        println!("{:?}", run_seed(seed, variant));
        return true;
    }
    false
}

const FAULT_KINDS: &[&str] = &[
    "network_toggle",
    "client_crash",
    "relay_kill",
    "relay_restart",
    "blackhole",
    "going_away",
    "token_refresh",
    "dns_toggle",
    "reset",
    "sync_request",
    "app_state",
    "membership_change",
    "crash_before_commit",
    "crash_after_commit",
    "crash_after_heads",
    "crash_with_acks_unflushed",
    "device_wipe",
    "backfill",
];

fn assert_every_fault(totals: &BTreeMap<&'static str, u64>) {
    for kind in FAULT_KINDS {
        assert!(
            totals.get(kind).copied().unwrap_or(0) > 0,
            "no {kind} fault injected: {totals:?}"
        );
    }
}

#[test]
fn real_clients_and_the_real_relay_lose_nothing_and_duplicate_nothing() {
    let variant = Variant {
        store: StoreKind::Memory,
        nodes: 1,
        sabotage: None,
    };
    if replay(variant) {
        return;
    }
    let seeds = seeds_from_env(2000);
    let totals = run_seeds(0, seeds, variant);
    println!("{seeds} seeds, one node, faults injected: {totals:?}");
    assert_every_fault(&totals);
}

#[test]
fn three_nodes_over_one_store_with_a_lossy_bus() {
    let variant = Variant {
        store: StoreKind::Memory,
        nodes: 3,
        sabotage: None,
    };
    if std::env::var("KEEPWIRE_SIM_NODES").as_deref() == Ok("3") && replay(variant) {
        return;
    }
    let seeds = seeds_from_env(2000) / 4;
    let totals = run_seeds(1_000_000, seeds, variant);
    println!("{seeds} seeds, three nodes, faults injected: {totals:?}");
    assert_every_fault(&totals);
}

/// The same, with SQLite's real writer driven by the simulation (group
/// commits, crash points, reopening the file after a crash).
#[test]
fn real_clients_and_the_real_relay_on_sqlite() {
    let variant = Variant {
        store: StoreKind::Sqlite,
        nodes: 1,
        sabotage: None,
    };
    if std::env::var("KEEPWIRE_SIM_STORE").as_deref() == Ok("sqlite") && replay(variant) {
        return;
    }
    let seeds = seeds_from_env(2000) / 10;
    let totals = run_seeds(2_000_000, seeds, variant);
    println!("{seeds} seeds on SQLite, faults injected: {totals:?}");
}

/// Each sabotage must be caught within the seeds CI runs.
#[test]
fn the_simulation_catches_each_sabotage() {
    for sabotage in Sabotage::ALL {
        let variant = Variant {
            store: StoreKind::Memory,
            nodes: 1,
            sabotage: Some(sabotage),
        };
        let caught = (0..2000u64).find(|&seed| {
            std::panic::catch_unwind(|| {
                run_seed(seed, variant);
            })
            .is_err()
        });
        assert!(
            caught.is_some(),
            "{sabotage:?} was not caught in 2000 seeds"
        );
        println!("{sabotage:?} caught by seed {}", caught.unwrap());
    }
}

/// A run where some fault never fires fails.
#[test]
#[should_panic(expected = "fault injected")]
fn a_run_missing_a_crash_point_fails() {
    let mut totals = BTreeMap::new();
    for k in FAULT_KINDS.iter().filter(|k| **k != "crash_after_heads") {
        totals.insert(*k, 1);
    }
    assert_every_fault(&totals);
}
