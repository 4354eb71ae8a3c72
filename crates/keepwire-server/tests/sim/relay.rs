//! The relay side of the simulation: real [`Session`]s, the real [`Hub`]
//! and [`Executor`], on a [`MemoryStore`] whose commits the seed schedules.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use keepwire_proto::{CloseCode, Instant};
use keepwire_server::auth::Authenticator;
use keepwire_server::exec::{AnswerFuture, Executor};
use keepwire_server::hub::{ControlQueue, Joining, RegisterError, Registration};
use keepwire_server::session::{
    Event, RequestId, Session, SessionConfig, StoreAnswer, Transmit, TransportEvent,
};
use keepwire_server::store::{
    CrashPoint, HeadAdvance, HeadListener, MemoryDisk, MemoryOptions, MemoryStore, SqliteOptions,
    SqliteStore, WallClock,
};
use keepwire_server::{Hub, Metrics};

/// Polls a future once, without a runtime (memory store futures never wait
/// on I/O: a write waits for a commit, a read is ready at once).
pub fn poll_once<T>(f: &mut (impl Future<Output = T> + Unpin)) -> Option<T> {
    let mut cx = Context::from_waker(Waker::noop());
    match std::pin::Pin::new(f).poll(&mut cx) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

/// Head notices a node's store made, for the sim to carry over the bus.
#[derive(Default)]
pub struct Outbox(pub Mutex<Vec<Vec<HeadAdvance>>>);

/// The store's listener on a node: its own hub at once, other nodes later.
struct NodeListener {
    hub: Arc<Hub>,
    bus: Arc<Outbox>,
}

impl HeadListener for NodeListener {
    fn heads_advanced(&self, heads: &[HeadAdvance]) {
        self.hub.heads_advanced(heads);
        self.bus.0.lock().unwrap().push(heads.to_vec());
    }
}

/// A connection on a node.
pub struct ServerConn {
    pub id: u64,
    pub client: usize,
    pub tid: u64,
    pub session: Session,
    pub control: Arc<ControlQueue>,
    pub reg: Option<Registration>,
}

/// What a connection's session asked for, for the sim to schedule.
#[derive(Default)]
pub struct Outputs {
    pub frames: Vec<String>,
    pub close: Option<CloseCode>,
    /// The session ended (with or without a close frame).
    pub ended: bool,
}

/// A store request in flight (the session may have ended since).
pub struct Pending {
    pub conn: u64,
    pub id: RequestId,
    pub fut: AnswerFuture,
    pub answer: Option<StoreAnswer>,
}

/// One relay node.
pub struct Node {
    pub up: bool,
    pub store: SimStore,
    pub hub: Arc<Hub>,
    exec: Executor,
    cfg: Arc<SessionConfig>,
    pub conns: Vec<ServerConn>,
    pub pending: Vec<Pending>,
    pub bus: Arc<Outbox>,
    pub resyncs: u32,
}

/// Where the nodes' data lives.
#[derive(Clone)]
pub enum Backend {
    /// The memory store (its "disk" survives node crashes).
    Memory(Arc<MemoryDisk>, MemoryOptions),
    /// The SQLite store, its writer driven by the simulation.
    Sqlite(std::path::PathBuf, Arc<dyn WallClock>),
}

impl Backend {
    /// A store handle in manual-commit mode.
    pub fn open(&self) -> SimStore {
        match self {
            Backend::Memory(disk, opts) => SimStore::Memory(MemoryStore::on_disk(
                disk.clone(),
                MemoryOptions {
                    manual_commit: true,
                    ..opts.clone()
                },
            )),
            Backend::Sqlite(path, clock) => SimStore::Sqlite(
                SqliteStore::open(
                    path,
                    SqliteOptions {
                        clock: Some(clock.clone()),
                        manual_commit: true,
                        ..Default::default()
                    },
                )
                .expect("open the simulation's SQLite store"),
            ),
        }
    }

    fn sabotage(&self) -> Option<keepwire_server::store::Sabotage> {
        match self {
            Backend::Memory(_, o) => o.sabotage,
            Backend::Sqlite(..) => None,
        }
    }

    fn clock(&self) -> Arc<dyn WallClock> {
        match self {
            Backend::Memory(_, o) => o.clock.clone(),
            Backend::Sqlite(_, c) => c.clone(),
        }
    }
}

/// A store whose commits the simulation drives.
#[derive(Clone)]
pub enum SimStore {
    /// Memory.
    Memory(Arc<MemoryStore>),
    /// SQLite.
    Sqlite(Arc<SqliteStore>),
}

impl SimStore {
    pub fn commit(&self, n: usize, crash: Option<CrashPoint>) -> usize {
        match self {
            SimStore::Memory(s) => s.commit(n, crash),
            SimStore::Sqlite(s) => s.commit(n, crash),
        }
    }

    pub fn pending_writes(&self) -> usize {
        match self {
            SimStore::Memory(s) => s.pending_writes(),
            SimStore::Sqlite(s) => s.pending_writes(),
        }
    }

    pub fn crash(&self) {
        match self {
            SimStore::Memory(s) => s.crash(),
            SimStore::Sqlite(s) => s.crash(),
        }
    }

    pub fn dyn_store(&self) -> Arc<dyn keepwire_server::Store> {
        match self {
            SimStore::Memory(s) => s.clone(),
            SimStore::Sqlite(s) => s.clone(),
        }
    }

    /// Runs a store call to its end: polls, commits what it queued, polls.
    pub fn run<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        let mut f = Box::pin(f);
        loop {
            if let Some(v) = poll_once(&mut f) {
                return v;
            }
            assert!(self.pending_writes() > 0, "a store call waits on nothing");
            self.commit(usize::MAX, None);
        }
    }
}

impl std::ops::Deref for SimStore {
    type Target = dyn keepwire_server::Store;

    fn deref(&self) -> &Self::Target {
        match self {
            SimStore::Memory(s) => &**s,
            SimStore::Sqlite(s) => &**s,
        }
    }
}

/// What a node needs to start.
#[derive(Clone)]
pub struct NodeSetup {
    pub backend: Backend,
    pub config: keepwire_server::Config,
}

impl Node {
    pub fn start(setup: &NodeSetup) -> Node {
        let store = setup.backend.open();
        let cfg = &setup.config;
        let hub = Arc::new(Hub::new(cfg.user_sends_per_sec, cfg.user_send_burst));
        if setup.backend.sabotage() == Some(keepwire_server::store::Sabotage::TailOutOfOrder) {
            hub.sabotage_tail();
        }
        let bus = Arc::new(Outbox::default());
        store.set_head_listener(Arc::new(NodeListener {
            hub: hub.clone(),
            bus: bus.clone(),
        }));
        let dyn_store = store.dyn_store();
        let auth = Arc::new(Authenticator::new(dyn_store.clone(), None));
        let exec = Executor::new(
            dyn_store,
            auth,
            hub.clone(),
            setup.backend.clock(),
            cfg.limits.max_group_size,
        );
        let session_cfg = Arc::new(cfg.session_config(hub.clone(), Arc::new(Metrics::default())));
        Node {
            up: true,
            store,
            hub,
            exec,
            cfg: session_cfg,
            conns: Vec::new(),
            pending: Vec::new(),
            bus,
            resyncs: 0,
        }
    }

    /// A new connection (the upgrade finished).
    pub fn accept(&mut self, id: u64, client: usize, tid: u64, seed: u64, now: Instant) {
        self.conns.push(ServerConn {
            id,
            client,
            tid,
            session: Session::new(self.cfg.clone(), seed, now),
            control: Arc::new(ControlQueue::default()),
            reg: None,
        });
    }

    pub fn conn_mut(&mut self, id: u64) -> Option<&mut ServerConn> {
        self.conns.iter_mut().find(|c| c.id == id)
    }

    /// Feeds the session of connection `id` a transport event.
    pub fn transport(&mut self, id: u64, ev: TransportEvent<'_>, now: Instant) {
        if let Some(c) = self.conn_mut(id) {
            c.session.handle_transport(ev, now);
        }
    }

    /// Carries out what connection `id` asked for: hub work, store requests
    /// (started, and polled once so writes queue in the store), and returns
    /// its frames. An ended session is removed.
    pub fn drive(&mut self, id: u64, now: Instant, config: &keepwire_server::Config) -> Outputs {
        let mut out = Outputs::default();
        let Some(ix) = self.conns.iter().position(|c| c.id == id) else {
            return out;
        };
        loop {
            let mut progressed = false;
            let c = &mut self.conns[ix];
            while let Some(ctl) = c.control.try_recv() {
                progressed = true;
                c.session.handle_control(ctl, now);
            }
            if let Some(r) = &mut c.reg
                && r.head.has_changed().unwrap_or(false)
            {
                progressed = true;
                let head = *r.head.borrow_and_update();
                c.session.handle_head(head, now);
            }
            while let Some(ev) = c.session.poll_event() {
                progressed = true;
                match ev {
                    Event::Register {
                        user,
                        device,
                        token_id,
                        generation,
                        transient,
                    } => {
                        let r = self
                            .hub
                            .register(
                                Joining {
                                    user,
                                    device: &device,
                                    token_id,
                                    generation,
                                    transient,
                                },
                                config.max_connections_per_user,
                                c.control.clone(),
                                now,
                            )
                            .map_err(|e| match e {
                                RegisterError::TooManyConnections => CloseCode::TooManyConnections,
                                RegisterError::Superseded => CloseCode::Replaced,
                            })
                            .map(|r| {
                                let head = *r.head.borrow();
                                c.reg = Some(r);
                                head
                            });
                        c.session.handle_registered(r, now);
                    }
                    Event::Signal { members, frame } => {
                        if let Some(r) = &c.reg {
                            self.hub.signal(&members, r.id, &frame);
                        }
                    }
                    Event::Opened { .. } => {}
                }
            }
            while let Some((rid, req)) = c.session.poll_store_request() {
                progressed = true;
                let is_write = req.is_write();
                let mut fut = self.exec.run(req);
                let answer = poll_once(&mut fut);
                assert!(
                    answer.is_some() || is_write,
                    "a memory store read did not answer at once"
                );
                self.pending.push(Pending {
                    conn: id,
                    id: rid,
                    fut,
                    answer,
                });
            }
            let c = &mut self.conns[ix];
            while let Some(t) = c.session.poll_transmit() {
                progressed = true;
                match t {
                    Transmit::Text(t) => out.frames.push(t),
                    Transmit::Close(code) => {
                        if code == CloseCode::Resync {
                            self.resyncs += 1;
                        }
                        out.close = Some(code);
                    }
                }
            }
            if !progressed {
                break;
            }
        }
        if self.conns[ix].session.is_closed() {
            out.ended = true;
            self.conns.remove(ix);
        }
        out
    }

    /// Polls write futures after a commit.
    pub fn poll_pending(&mut self) {
        for p in &mut self.pending {
            if p.answer.is_none() {
                p.answer = poll_once(&mut p.fut);
            }
        }
    }

    /// Commits `n` queued writes (or crashes at `crash`).
    pub fn commit(&mut self, n: usize, crash: Option<CrashPoint>) {
        self.store.commit(n, crash);
        self.poll_pending();
    }

    /// Answered requests, to deliver to their sessions.
    pub fn take_answered(&mut self) -> Vec<(u64, RequestId, StoreAnswer)> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.pending.len() {
            if self.pending[i].answer.is_some() {
                let p = self.pending.swap_remove(i);
                out.push((p.conn, p.id, p.answer.expect("answered")));
            } else {
                i += 1;
            }
        }
        // Deterministic order whatever swap_remove did.
        out.sort_by_key(|(c, id, _)| (*c, *id));
        out
    }

    /// A node dies: connections and in-flight work vanish.
    pub fn kill(&mut self) -> Vec<(usize, u64)> {
        self.up = false;
        self.store.crash();
        self.pending.clear();
        self.conns.drain(..).map(|c| (c.client, c.tid)).collect()
    }

    /// Re-reads the heads of this node's users (after lost bus notices).
    pub fn refresh_heads(&mut self) {
        for (user, known) in self.hub.connected_users() {
            let mut f = Box::pin(self.store.inbox_head(user));
            if let Some(Ok(head)) = poll_once(&mut f)
                && head > known
            {
                self.hub.heads_advanced(&[HeadAdvance {
                    user,
                    seq: head,
                    item: None,
                    origin: None,
                }]);
            }
        }
    }
}

/// The simulation's wall clock: a base plus virtual time.
pub struct SimWall(pub Mutex<i64>);

impl WallClock for SimWall {
    fn now_ms(&self) -> i64 {
        *self.0.lock().unwrap()
    }
}
