//! The driver: runs `keepwire-core`'s connection with tokio, the transport
//! task and the store, and answers the handles' commands.

use super::*;

/// The clock the core runs on: keeps counting while the device is suspended.
pub(crate) fn boot_clock() -> Instant {
    use nix::time::{ClockId, clock_gettime};
    match clock_gettime(ClockId::CLOCK_BOOTTIME) {
        Ok(ts) => Instant::from_duration(Duration::new(ts.tv_sec() as u64, ts.tv_nsec() as u32)),
        Err(_) => Instant::from_duration(monotonic_fallback()),
    }
}

pub(super) fn monotonic_fallback() -> Duration {
    use std::sync::OnceLock;
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed()
}

pub(super) struct Driver {
    pub(super) core: Connection,
    pub(super) store: Store,
    pub(super) inner: Arc<Inner>,
    pub(super) resolver: Arc<CachingResolver>,
    pub(super) tls: Arc<rustls::ClientConfig>,
    pub(super) provider: Arc<dyn TokenProvider>,
    pub(super) transport_tx: mpsc::Sender<(u64, TransportEvent)>,
    pub(super) transport_rx: mpsc::Receiver<(u64, TransportEvent)>,
    pub(super) outgoing: Option<(u64, mpsc::Sender<Outgoing>)>,
    pub(super) token_tx: mpsc::Sender<Option<String>>,
    pub(super) token_rx: mpsc::Receiver<Option<String>>,
    /// The app's requests in flight, by the connection's id for them.
    pub(super) requests: HashMap<RequestId, oneshot::Sender<Result<ServerFrame, ClientError>>>,
    pub(super) outbox_seen: i64,
    pub(super) data_version: i64,
    pub(super) stop_waiters: Vec<oneshot::Sender<()>>,
    pub(super) app_state: AppState,
    /// What new messages show, and when.
    pub(super) notes: Notifications,
    /// The network the OS reports (for analytics).
    pub(super) network: Option<String>,
    /// The network as the OS reports it (handed back when parking).
    pub(super) network_state: Network,
    /// Whether the app started the connection.
    pub(super) started: bool,
    /// The background policy.
    pub(super) policy: BackgroundPolicy,
    /// A sync is open (from `Cmd::Sync` to `Cmd::EndSync`).
    pub(super) sync_open: bool,
    /// Waiters to answer after the command at hand (or after parking).
    pub(super) acks: Vec<Ack>,
    /// The task running the current transport.
    pub(super) transport_task: Option<tokio::task::JoinHandle<()>>,
    /// The last sync another process asked of this holder that was seen.
    pub(super) remote_seen: u64,
    /// The sync another process asked for, being run.
    pub(super) remote: Option<RemoteSync>,
    /// What the relay offers for push (from this session's `welcome`);
    /// `None` outside a session.
    pub(super) push_offer: Option<Option<PushInfo>>,
    /// `push_register` requests in flight: request -> (state version, waiters).
    pub(super) push_inflight: HashMap<RequestId, (u64, Vec<Reply>)>,
    /// `mute` requests in flight: request -> (conversation, muted, waiters).
    pub(super) mute_inflight: HashMap<RequestId, (u64, bool, Vec<Reply>)>,
}

/// A sync asked by another process on this home (`keepwire sync` beside a
/// `tail` or an agent), run by the holder.
pub(super) struct RemoteSync {
    /// The request's number in the store.
    pub(super) n: u64,
    /// Sessions and heads heard when it was picked up: the answer needs a
    /// head heard after that.
    pub(super) sessions: u64,
    pub(super) heads_heard: u64,
    /// Plain failures in a row when it was picked up: a holder that has been
    /// failing all along answers "unreachable" after one more plain failure
    /// (the attempt the request makes at once), not after a new streak.
    pub(super) plain_failures: u32,
    /// Whether it started the core's sync (and so ends it).
    pub(super) started_core_sync: bool,
    /// When it is abandoned without an answer.
    pub(super) until: tokio::time::Instant,
}

/// How long a sync asking the holder waits for it to take the request up.
pub(super) const HOLDER_ACK_WAIT: Duration = Duration::from_secs(1);

/// How long a holder works on another process's sync before abandoning it
/// (the asking process has its own, usually shorter, deadline).
pub(super) const REMOTE_SYNC_MAX: Duration = Duration::from_secs(60);

/// Where the answer to a push registration or a mute goes.
pub(super) type Reply = oneshot::Sender<Result<(), ClientError>>;

/// What the waiters of a registration or a mute hear: the refusal, success
/// when answered, or "not connected" when the session ended first.
pub(super) fn answer_of(
    answered: bool,
    refused: &Option<(bool, ErrorCode, String)>,
) -> Result<(), ClientError> {
    match refused {
        Some((_, code, message)) => Err(ClientError::Refused {
            code: *code,
            message: message.clone(),
        }),
        None if answered => Ok(()),
        None => Err(ClientError::NotConnected),
    }
}

impl Driver {
    pub(super) fn new(sup: &Supervisor) -> Result<Driver, StoreError> {
        let store = Store::open(&sup.inner.home)?;
        let now = boot_clock();
        let cursor = store.cursor()?;
        let seed = rand::random::<u64>();
        let mut config = sup.config.clone();
        config.boot = store.next_boot()?;
        let mut core = Connection::new(config, sup.token.clone(), cursor.clone(), seed, now);
        for (net, (interval, settled)) in store.learned_heartbeats()? {
            core.set_learned_heartbeat(&net, interval, settled);
        }
        // History fills a previous process did not finish go on.
        for due in store.backfills_due()? {
            core.backfill(due, now);
        }
        core.handle_network(sup.network.clone(), now);
        core.handle_app_state(sup.app_state, now);
        let (transport_tx, transport_rx) = mpsc::channel(1024);
        let (token_tx, token_rx) = mpsc::channel(1);
        let data_version = store.data_version()?;
        let remote_seen = store.holder_sync_asked()?;
        let mut d = Driver {
            core,
            store,
            inner: sup.inner.clone(),
            resolver: sup.resolver.clone(),
            tls: sup.tls.clone(),
            provider: sup.provider.clone(),
            transport_tx,
            transport_rx,
            outgoing: None,
            token_tx,
            token_rx,
            requests: HashMap::new(),
            outbox_seen: 0,
            data_version,
            stop_waiters: Vec::new(),
            app_state: sup.app_state,
            notes: Notifications::new(sup.notifier.clone()),
            network: match &sup.network {
                Network::Online(id) => Some(id.clone()),
                Network::Offline => None,
            },
            network_state: sup.network.clone(),
            started: sup.started,
            policy: sup.config.background_policy,
            sync_open: false,
            acks: Vec::new(),
            transport_task: None,
            remote_seen,
            remote: None,
            push_offer: None,
            push_inflight: HashMap::new(),
            mute_inflight: HashMap::new(),
        };
        d.pick_up_outbox(now)?;
        if sup.started {
            d.core.start(now);
        }
        Ok(d)
    }

    fn pick_up_outbox(&mut self, now: Instant) -> Result<(), StoreError> {
        for row in self.store.pending_after(self.outbox_seen)? {
            self.outbox_seen = self.outbox_seen.max(row.seq);
            self.core.queue_send(row.item, now);
        }
        Ok(())
    }

    /// Opens a sync for `r` and tells its caller this process runs it.
    pub(super) fn begin_sync(&mut self, r: SyncRequest) {
        let now = boot_clock();
        let left = r
            .until
            .saturating_duration_since(tokio::time::Instant::now());
        self.sync_open = true;
        self.notes.hold(r.collect);
        // The unreachable rule counts from the start of the sync.
        self.inner
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .plain_failures = 0;
        self.core.request_sync(now + left, now);
        let _ = r.started.send(true);
    }

    /// In the background under `wake-only` with no sync open: nothing here
    /// needs the connection or the home.
    fn should_park(&self) -> bool {
        self.app_state == AppState::Background
            && self.policy == BackgroundPolicy::WakeOnly
            && !self.sync_open
            && self.stop_waiters.is_empty()
    }

    /// Closes the connection (the core is dormant) and hands the waiters to
    /// the supervisor, which releases the lock before answering them. The
    /// store closes with the driver: no transaction stays open.
    async fn park(&mut self) -> Exit {
        self.flush();
        // Short: a wake-up must hand its result back inside the OS's window.
        self.finish_transport(Duration::from_millis(300)).await;
        let _ = self.store.save_status(State::Dormant.name(), None);
        Exit::Released(std::mem::take(&mut self.acks))
    }

    /// Lets the closing transport write what is queued and run the closing
    /// handshake for at most `grace`, then forgets it: a process that exits
    /// right after `stop` must not drop frames it already queued (a signal).
    async fn finish_transport(&mut self, grace: Duration) {
        if let Some(mut task) = self.transport_task.take()
            && tokio::time::timeout(grace, &mut task).await.is_err()
        {
            task.abort();
        }
        self.outgoing = None;
    }

    fn answer_acks(&mut self) {
        for a in self.acks.drain(..) {
            a.send();
        }
    }

    pub(super) async fn run(&mut self, cmd_rx: &mut mpsc::UnboundedReceiver<Cmd>) -> Exit {
        let mut poll_outbox = tokio::time::interval(Duration::from_millis(100));
        poll_outbox.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.flush();
            if !self.stop_waiters.is_empty() {
                break;
            }
            if self.should_park() {
                return self.park().await;
            }
            self.answer_acks();
            let now = boot_clock();
            let sleep = self
                .core
                .poll_timeout()
                .map(|t| t.saturating_duration_since(now));
            let deadline = tokio::time::Instant::now() + sleep.unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                cmd = cmd_rx.recv() => match cmd {
                    None => {
                        // Every handle was dropped.
                        self.core.close(boot_clock());
                        self.flush();
                        break;
                    }
                    Some(cmd) => self.handle_cmd(cmd),
                },
                Some((id, ev)) = self.transport_rx.recv() => {
                    // Take everything already received, so a backlog is
                    // persisted in a few large transactions, not one per entry.
                    let now = boot_clock();
                    self.core.handle_transport(id, ev, now);
                    for _ in 0..1024 {
                        match self.transport_rx.try_recv() {
                            Ok((id, ev)) => self.core.handle_transport(id, ev, now),
                            Err(_) => break,
                        }
                    }
                }
                Some(token) = self.token_rx.recv() => {
                    if let Some(t) = &token
                        && !self.inner.token_elsewhere
                    {
                        let _ = self.store.set_meta("token", t);
                    }
                    self.core.handle_token(token, boot_clock());
                }
                _ = tokio::time::sleep_until(deadline), if sleep.is_some() => self.core.handle_timeout(boot_clock()),
                _ = poll_outbox.tick() => {
                    // Sends queued by other processes on this home.
                    if let Ok(v) = self.store.data_version()
                        && v != self.data_version
                    {
                        self.data_version = v;
                        if let Err(e) = self.pick_up_outbox(boot_clock()) {
                            tracing::warn!(target: "keepwire::client", error = %e, "reading the outbox failed");
                        }
                        self.pick_up_remote_sync(boot_clock());
                        // A registration or mute another process saved.
                        if self.push_offer.is_some() {
                            self.send_push(None, boot_clock());
                            self.send_mutes(None, boot_clock());
                        }
                    }
                    if self.remote.is_some() {
                        self.answer_remote_sync();
                    }
                }
            }
        }
        self.finish_transport(Duration::from_secs(1)).await;
        let _ = self
            .store
            .save_status(State::Stopped(StopReason::ClosedByApp).name(), None);
        self.answer_acks();
        for w in self.stop_waiters.drain(..) {
            let _ = w.send(());
        }
        Exit::Stopped
    }

    fn handle_cmd(&mut self, cmd: Cmd) {
        let now = boot_clock();
        match cmd {
            Cmd::OutboxChanged => {
                if let Err(e) = self.pick_up_outbox(now) {
                    tracing::warn!(target: "keepwire::client", error = %e, "reading the outbox failed");
                }
            }
            Cmd::AppState(s, ack) => {
                if let Some(ack) = ack {
                    self.acks.push(Ack::App(ack));
                }
                self.app_state = s;
                if s == AppState::Foreground {
                    // The user is looking: everything counts as seen.
                    let _ = self.store.clear_unread();
                }
                self.core.handle_app_state(s, now);
                self.log_state();
            }
            Cmd::Sync(r) => self.begin_sync(r),
            Cmd::MarkRead(conv, up_to, reply) => {
                let local = self.store.set_read_mark(conv, up_to);
                self.notes.read_elsewhere(conv, up_to);
                let sent = self.core.send_read(conv, up_to, now);
                let _ = reply.send(match (local, sent) {
                    (Err(e), _) => Err(e.into()),
                    (Ok(()), Err(_)) => Err(ClientError::NotConnected),
                    (Ok(()), Ok(())) => Ok(()),
                });
            }
            Cmd::EndSync(end) => {
                self.core.end_sync(now);
                self.sync_open = false;
                let (collected, shown) = self.notes.release(&self.store);
                self.count_shown(shown);
                self.acks.push(Ack::EndSync(end.done, collected));
            }
            Cmd::Network(n) => {
                self.network_state = n.clone();
                self.network = match &n {
                    Network::Online(id) => Some(id.clone()),
                    Network::Offline => None,
                };
                self.inner.set_network_status(&n);
                self.core.handle_network(n, now);
                self.log_state();
            }
            Cmd::Resume => {
                tracing::info!(target: "keepwire::background", "resumed from sleep: reconnecting now");
                self.core.handle_resume(now);
            }
            Cmd::Start => {
                // Already started: nothing to do (starting again would reset
                // a connection in progress). After a stop, start over.
                if !self.started || matches!(self.core.state(), State::Stopped(_)) {
                    self.started = true;
                    self.core.start(now);
                }
            }
            Cmd::Signal(conv, data, reply) => {
                let sent = self.core.send_signal(conv, data, now);
                let _ = reply.send(sent.map_err(|_| ClientError::NotConnected));
            }
            Cmd::Request(frame, reply) => match self.core.send_request(frame, now) {
                Ok(id) => {
                    self.requests.insert(id, reply);
                }
                Err(_) => {
                    let _ = reply.send(Err(ClientError::NotConnected));
                }
            },
            Cmd::Stop(done) => {
                self.core.close(now);
                self.stop_waiters.push(done);
            }
            Cmd::Push(reply) => self.send_push(reply, now),
            Cmd::Mutes(reply) => self.send_mutes(reply, now),
        }
    }

    /// Sends the stored push registration if it is due (changed, stale, or
    /// from another relay epoch) and not already on its way.
    fn send_push(&mut self, reply: Option<Reply>, now: Instant) {
        let answer = |reply: Option<Reply>, r: Result<(), ClientError>| {
            if let Some(tx) = reply {
                let _ = tx.send(r);
            }
        };
        let Some(offer) = &self.push_offer else {
            return answer(reply, Err(ClientError::NotConnected));
        };
        let state = match self.store.push_state() {
            Ok(s) => s,
            Err(e) => return answer(reply, Err(e.into())),
        };
        if let Some((_, waiters)) = self
            .push_inflight
            .values_mut()
            .find(|(v, _)| *v == state.version)
        {
            waiters.extend(reply);
            return;
        }
        if !state.due(self.core.epoch(), crate::push::now_ms()) {
            return answer(reply, Ok(()));
        }
        if let Some(p) = state.provider()
            && !offer.as_ref().is_some_and(|o| o.providers.contains(&p))
        {
            // Not sent: the relay would refuse it. It stays due, so a relay
            // configured later gets it at the next handshake.
            let why = format!("this relay offers no {p} push wake-ups");
            let _ = self.store.push_unsendable(&why);
            return answer(
                reply,
                Err(ClientError::Refused {
                    code: ErrorCode::Invalid,
                    message: why,
                }),
            );
        }
        let frame = ClientFrame::PushRegister(PushRegister {
            rid: String::new(),
            registration: state.registration.clone().unwrap_or_default(),
            // The user's preference: the relay sends previews only if its
            // operator allows them too, and only encrypted to this device.
            previews: state.registration.is_some()
                && self.store.prefs().map(|p| p.previews).unwrap_or(false),
        });
        match self.core.send_request(frame, now) {
            Ok(id) => {
                self.push_inflight
                    .insert(id, (state.version, reply.into_iter().collect()));
            }
            Err(_) => answer(reply, Err(ClientError::NotConnected)),
        }
    }

    /// Sends the mutes the relay has not accepted yet (each once per
    /// session unless changed).
    fn send_mutes(&mut self, reply: Option<(u64, Reply)>, now: Instant) {
        let mut reply = reply;
        if self.push_offer.is_none() {
            if let Some((_, tx)) = reply {
                let _ = tx.send(Err(ClientError::NotConnected));
            }
            return;
        }
        let pending = match self.store.pending_mutes() {
            Ok(p) => p,
            Err(e) => {
                if let Some((_, tx)) = reply {
                    let _ = tx.send(Err(e.into()));
                }
                return;
            }
        };
        for (conv, muted) in pending {
            let mine = reply.take_if(|(c, _)| *c == conv).map(|(_, tx)| tx);
            if let Some((_, _, waiters)) = self
                .mute_inflight
                .values_mut()
                .find(|(c, m, _)| *c == conv && *m == muted)
            {
                waiters.extend(mine);
                continue;
            }
            let frame = ClientFrame::Mute {
                rid: String::new(),
                conv,
                muted,
            };
            let Ok(id) = self.core.send_request(frame, now) else {
                if let Some(tx) = mine {
                    let _ = tx.send(Err(ClientError::NotConnected));
                }
                break;
            };
            self.mute_inflight
                .insert(id, (conv, muted, mine.into_iter().collect()));
        }
        // Not pending any more: the relay already has it.
        if let Some((_, tx)) = reply {
            let _ = tx.send(Ok(()));
        }
    }

    /// The connection's answer to request `request` (or `None`: the session
    /// ended first), to whoever waits for it.
    fn on_answer(&mut self, request: RequestId, frame: Option<ServerFrame>) {
        if let Some(reply) = self.requests.remove(&request) {
            let _ = reply.send(frame.ok_or(ClientError::NotConnected));
            return;
        }
        let finish = |waiters: Vec<Reply>, refused: &Option<(bool, ErrorCode, String)>| {
            for w in waiters {
                let _ = w.send(answer_of(frame.is_some(), refused));
            }
        };
        // A refusal; `transient`: worth another try at the next handshake,
        // anything else is the relay's final word on this request.
        let refused = match &frame {
            Some(ServerFrame::Error(e)) => Some((
                matches!(e.code, ErrorCode::RateLimited | ErrorCode::Internal),
                e.code,
                e.message.clone(),
            )),
            _ => None,
        };
        if let Some((version, waiters)) = self.push_inflight.remove(&request) {
            let recorded = match (&frame, &refused) {
                (Some(ServerFrame::Push { id, .. }), _) => {
                    tracing::info!(target: "keepwire::push", registered = id.is_some(), "push registration accepted");
                    Some(Ok(id.clone()))
                }
                (_, Some((false, code, message))) => {
                    tracing::warn!(target: "keepwire::push", %code, "push registration refused");
                    Some(Err(format!("{code}: {message}")))
                }
                // Unanswered or transient: it stays due.
                _ => None,
            };
            if let Some(r) = recorded
                && let Err(e) = self.store.push_answered(version, self.core.epoch(), r)
            {
                tracing::warn!(target: "keepwire::push", error = %e, "recording the push registration failed");
            }
            finish(waiters, &refused);
            return;
        }
        if let Some((conv, muted, waiters)) = self.mute_inflight.remove(&request) {
            let final_word = frame.is_some() && !refused.as_ref().is_some_and(|(t, _, _)| *t);
            if final_word {
                let _ = self.store.mute_answered(conv, muted);
            }
            finish(waiters, &refused);
        }
    }

    /// Carries out the core's transmits and events until it has none.
    fn flush(&mut self) {
        loop {
            let mut progressed = false;
            while let Some(t) = self.core.poll_transmit() {
                progressed = true;
                self.transmit(t);
            }
            while let Some(e) = self.core.poll_event() {
                progressed = true;
                self.event(e);
            }
            if !progressed {
                break;
            }
        }
        self.publish_status();
    }

    fn transmit(&mut self, t: Transmit) {
        match t {
            Transmit::Open { id, url } => {
                let (tx, rx) = mpsc::channel(1024);
                self.outgoing = Some((id, tx));
                tracing::debug!(target: "keepwire::ws", id, %url, "opening");
                self.transport_task = Some(tokio::spawn(transport::run(
                    id,
                    url,
                    self.resolver.clone(),
                    self.tls.clone(),
                    self.transport_tx.clone(),
                    rx,
                )));
            }
            Transmit::Frame { id, text } => {
                if let Some((cur, tx)) = &self.outgoing
                    && *cur == id
                    && tx.try_send(Outgoing::Frame(text)).is_err()
                {
                    // The writer is hopelessly behind: treat the socket as dead.
                    self.core
                        .handle_transport(id, TransportEvent::Closed(None), boot_clock());
                }
            }
            Transmit::Close { id, code } => {
                if let Some((cur, tx)) = self.outgoing.take() {
                    if cur == id {
                        let _ = tx.try_send(Outgoing::Close(code));
                    } else {
                        self.outgoing = Some((cur, tx));
                    }
                }
            }
        }
    }

    fn emit(&self, e: ClientEvent) {
        let _ = self.inner.events.send(e);
    }

    fn event(&mut self, e: Event) {
        let now = boot_clock();
        match e {
            Event::StateChanged(s) => {
                // While backing off: how long until the next attempt.
                let retry_in_ms = self
                    .core
                    .retry_at()
                    .map(|at| at.saturating_duration_since(now).as_millis() as u64);
                tracing::debug!(target: "keepwire::client", state = ?s, retry_in_ms, "state");
                self.log_state();
                let err = self.core.last_error().map(|e| format!("{e:?}"));
                let _ = self.store.save_status(s.name(), err.as_deref());
                if !matches!(s, State::Connected | State::Handshaking) {
                    // Requests in flight come back as `Unanswered`;
                    // registrations and mutes stay due in the store: the
                    // next session sends them again.
                    self.push_offer = None;
                }
                self.emit(ClientEvent::State(s));
            }
            Event::Welcome(w) => self.on_welcome(*w, now),
            Event::Entries(entries) => {
                let Some(epoch) = self.core.epoch().map(str::to_owned) else {
                    return;
                };
                match self.store.persist_entries(&epoch, &entries) {
                    Ok(p) => {
                        if let Some(last) = entries.last() {
                            self.core.handle_persisted(last.seq, now);
                        }
                        self.inner
                            .status
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .received += p.messages.len() as u64;
                        if !p.messages.is_empty() {
                            let via = if self.core.syncing() {
                                "sync"
                            } else {
                                "socket"
                            };
                            let app = self.app_state.name();
                            let _ = self.store.log_received(app, via, p.messages.len() as u64);
                        }
                        let me = self.status_snapshot().user;
                        let shown = self.notes.on_messages(
                            &mut self.store,
                            &p.messages,
                            self.app_state,
                            me.as_deref(),
                        );
                        self.count_shown(shown);
                        for mark in &p.reads {
                            self.notes.read_elsewhere(mark.conv, mark.up_to);
                        }
                        for m in p.messages {
                            self.emit(ClientEvent::Message(m));
                        }
                        for m in p.members {
                            self.emit(ClientEvent::Member(m));
                        }
                    }
                    Err(e) => {
                        // Not acknowledged: the relay will send them again.
                        tracing::error!(target: "keepwire::client", error = %e, "storing inbox entries failed");
                    }
                }
            }
            Event::SendConfirmed(c) => {
                if let Some(echo) = c.echo_seq {
                    // Caught up includes our own copy of what we sent.
                    let mut s = self.inner.status.lock().unwrap_or_else(|p| p.into_inner());
                    s.head = Some(s.head.unwrap_or(0).max(echo));
                }
                self.inner
                    .status
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .confirmed += 1;
                if let Err(e) = self.store.confirm(&c.cid) {
                    tracing::error!(target: "keepwire::client", error = %e, "recording a confirmation failed");
                }
                self.finish_waiters(&c.cid, Ok(()));
                self.emit(ClientEvent::SendConfirmed(c));
            }
            Event::SendFailed { cid, code, message } => {
                let _ = self.store.fail(&cid, code, &message);
                let error = SendError { code, message };
                self.finish_waiters(&cid, Err(error.clone()));
                self.emit(ClientEvent::SendFailed { cid, error });
            }
            Event::Reply(frame) => self.on_reply(*frame),
            Event::Answer { request, frame } => self.on_answer(request, Some(*frame)),
            Event::Unanswered(request) => self.on_answer(request, None),
            Event::History {
                conv,
                messages,
                due,
            } => {
                if let Err(e) = self.store.store_backfill(conv, &messages, due) {
                    tracing::error!(target: "keepwire::client", error = %e, "storing history failed");
                }
            }
            Event::EpochReset { epoch, reason } => self.on_epoch_reset(&epoch, reason),
            Event::CursorReset(c) => {
                let r = self
                    .store
                    .set_meta("cursor", &c.seq.to_string())
                    .and_then(|()| self.store.set_meta("epoch", &c.epoch));
                if let Err(e) = r {
                    tracing::error!(target: "keepwire::client", error = %e, "recording the resume failed");
                }
            }
            Event::TokenNeeded => {
                let provider = self.provider.clone();
                let tx = self.token_tx.clone();
                tokio::spawn(async move {
                    let t = tokio::time::timeout(Duration::from_secs(30), provider.refresh())
                        .await
                        .ok()
                        .flatten();
                    let _ = tx.send(t).await;
                });
            }
            Event::RelayHead(h) => {
                let mut s = self.inner.status.lock().unwrap_or_else(|p| p.into_inner());
                s.head = Some(s.head.unwrap_or(0).max(h));
                s.heads_heard += 1;
            }
            Event::HeartbeatProbed {
                network,
                interval,
                ok,
            } => {
                let _ = self
                    .store
                    .log_heartbeat(&network, interval.as_millis() as u64, ok);
            }
            Event::HeartbeatLearned {
                network,
                interval,
                settled,
            } => {
                tracing::info!(target: "keepwire::background", %network, ?interval, settled, "heartbeat learnt");
                if let Err(e) = self
                    .store
                    .save_learned_heartbeat(&network, interval, settled)
                {
                    tracing::warn!(target: "keepwire::background", error = %e, "saving the learnt heartbeat failed");
                }
                self.emit(ClientEvent::HeartbeatLearned {
                    network,
                    interval,
                    settled,
                });
            }
            Event::Error(e) => {
                tracing::info!(target: "keepwire::client", error = ?e, "connection problem");
                {
                    let mut s = self.inner.status.lock().unwrap_or_else(|p| p.into_inner());
                    // With the count, so a waiter woken by it sees why.
                    s.last_error = Some(e.clone());
                    s.plain_failures = match e {
                        ConnectionError::Refused | ConnectionError::NoNetwork => {
                            s.plain_failures.saturating_add(1)
                        }
                        _ => 0,
                    };
                }
                self.inner.status_changed.send_replace(());
                self.emit(ClientEvent::Error(e));
            }
            _ => {}
        }
    }

    /// Records the current connection and app state (analytics).
    fn log_state(&self) {
        let state = self.core.state().name();
        let app = self.app_state.name();
        let err = self.core.last_error().map(|e| format!("{e:?}"));
        if let Err(e) = self
            .store
            .log_state(state, app, self.network.as_deref(), err.as_deref())
        {
            tracing::warn!(target: "keepwire::client", error = %e, "recording analytics failed");
        }
    }

    fn finish_waiters(&self, cid: &str, r: Result<(), SendError>) {
        if let Some(ws) = self
            .inner
            .waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(cid)
        {
            for w in ws {
                let _ = w.send(r.clone());
            }
        }
    }

    /// Counts notifications shown (or handed to the app to show).
    fn count_shown(&self, n: u64) {
        if n > 0 {
            self.inner
                .status
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .notified += n;
        }
    }

    fn on_welcome(&mut self, w: Welcome, now: Instant) {
        {
            let mut s = self.inner.status.lock().unwrap_or_else(|p| p.into_inner());
            s.sessions += 1;
            s.plain_failures = 0;
        }
        let _ = self.store.set_meta("user", &w.user);
        let gap = w.resume.status == ResumeStatus::Gap;
        {
            let mut s = self.inner.status.lock().unwrap_or_else(|p| p.into_inner());
            s.head = Some(w.head);
            s.user = Some(w.user.clone());
        }
        // Fill what the replay will not bring.
        for hint in &w.resume.fetch {
            let due = BackfillDue {
                conv: hint.conv,
                before: hint.before,
                known: self.store.max_conv_seq(hint.conv).unwrap_or(0),
            };
            if self.core.backfill(due, now)
                && let Err(e) = self.store.store_backfill(due.conv, &[], Some(due))
            {
                tracing::warn!(target: "keepwire::client", error = %e, "recording a history fill failed");
            }
        }
        if gap {
            self.emit(ClientEvent::Gap(w.resume.clone()));
        }
        // The registration when due, and mutes not yet accepted.
        self.push_offer = Some(w.push.clone());
        self.send_push(None, now);
        self.send_mutes(None, now);
    }

    /// The relay's message log was replaced: what this device stored of the
    /// old one is forgotten (its ids mean other messages now).
    fn on_epoch_reset(&mut self, epoch: &str, reason: GapReason) {
        let r = self.store.reset_epoch(epoch).and_then(|dropped| {
            // Said loudly and kept for `status`: the user's history on this
            // device shrank without them doing anything.
            tracing::warn!(
                target: "keepwire::client",
                dropped,
                ?reason,
                "the relay's message log was replaced (restored from a backup, or reset): \
                 {dropped} messages stored on this device were forgotten, since their ids \
                 now mean other messages; history is fetched again from the relay"
            );
            let gap = serde_json::json!({
                "reason": match reason { GapReason::Epoch => "epoch", _ => "cursor_ahead" },
                "at_ms": crate::push::now_ms(),
                "dropped_messages": dropped,
            });
            self.store.set_meta("last_gap", &gap.to_string())
        });
        if let Err(e) = r {
            tracing::error!(target: "keepwire::client", error = %e, "forgetting the old epoch failed");
        }
    }

    /// A frame that answers no request: a signal, or the refusal of one.
    fn on_reply(&mut self, frame: ServerFrame) {
        if let ServerFrame::Signal { conv, from, data } = frame {
            self.emit(ClientEvent::Signal { conv, from, data });
            return;
        }
        if let ServerFrame::Error(e) = &frame {
            // A read or a signal has no answer to wait for: its refusal is
            // only logged.
            tracing::warn!(target: "keepwire::client", frame = ?e.frame, conv = ?e.conv, code = %e.code, message = %e.message, "the relay refused a frame");
            return;
        }
        // Not the frame itself: it may hold message bodies.
        tracing::debug!(target: "keepwire::client", "unsolicited reply frame");
    }

    /// Starts a sync another process on this home asked for, if there is a
    /// new request: connect now (skipping any backoff) or probe the live
    /// connection for the relay's head.
    fn pick_up_remote_sync(&mut self, now: Instant) {
        let asked = match self.store.holder_sync_asked() {
            Ok(n) if n > self.remote_seen => n,
            _ => return,
        };
        self.remote_seen = asked;
        if let Err(e) = self.store.acknowledge_holder_sync(asked) {
            tracing::warn!(target: "keepwire::client", error = %e, "taking up a sync failed");
        }
        let (sessions, heads_heard, plain_failures) = {
            let s = self.inner.status.lock().unwrap_or_else(|p| p.into_inner());
            (s.sessions, s.heads_heard, s.plain_failures)
        };
        let started_core_sync = !self.core.syncing();
        if started_core_sync {
            self.core.request_sync(now + REMOTE_SYNC_MAX, now);
        }
        self.remote = Some(RemoteSync {
            n: asked,
            sessions,
            heads_heard,
            plain_failures,
            started_core_sync,
            until: tokio::time::Instant::now() + REMOTE_SYNC_MAX,
        });
        self.flush();
    }

    /// Answers the sync another process asked for once it is done.
    fn answer_remote_sync(&mut self) {
        let Some(r) = &self.remote else {
            return;
        };
        let s = self.status_snapshot();
        let outcome = if (s.sessions > r.sessions || s.heads_heard > r.heads_heard) && s.caught_up()
        {
            "caught_up"
        } else if s.sessions == r.sessions
            && s.plain_failures > r.plain_failures
            && s.plainly_unreachable(UNREACHABLE_ROUNDS)
        {
            "unreachable"
        } else if tokio::time::Instant::now() >= r.until {
            "abandoned"
        } else {
            return;
        };
        let (n, started) = (r.n, r.started_core_sync);
        self.remote = None;
        if let Err(e) = self.store.answer_holder_sync(n, outcome) {
            tracing::warn!(target: "keepwire::client", error = %e, "answering a sync failed");
        }
        if started && !self.sync_open {
            self.core.end_sync(boot_clock());
        }
    }

    fn status_snapshot(&self) -> Status {
        self.inner
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn publish_status(&mut self) {
        let (pending, _) = self
            .store
            .outbox_counts()
            .unwrap_or((self.core.outbox_len() as u64, 0));
        let cursor = self.store.cursor().ok().flatten().map(|c| c.seq);
        {
            let mut s = self.inner.status.lock().unwrap_or_else(|p| p.into_inner());
            s.state = self.core.state();
            s.last_error = self.core.last_error().cloned();
            s.cursor = cursor;
            s.outbox = pending;
            s.holder = true;
            s.backfilling = self.core.backfilling();
            s.requests = self.push_inflight.len() + self.mute_inflight.len();
        }
        self.inner.status_changed.send_replace(());
        if self.remote.is_some() {
            self.answer_remote_sync();
        }
    }
}
