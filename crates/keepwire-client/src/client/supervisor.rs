//! The supervisor: holds the home's lock while it runs the connection, and
//! gives it back when the client parks.

use super::*;

pub(super) struct Supervisor {
    pub(super) inner: Arc<Inner>,
    pub(super) config: Config,
    pub(super) token: String,
    pub(super) resolver: Arc<CachingResolver>,
    pub(super) tls: Arc<rustls::ClientConfig>,
    pub(super) provider: Arc<dyn TokenProvider>,
    pub(super) app_state: AppState,
    pub(super) network: Network,
    pub(super) started: bool,
    pub(super) notifier: Option<Arc<dyn Notifier>>,
}

impl Supervisor {
    /// Parked: in the background under `wake-only`. A parked client does not
    /// hold the home's lock; a sync or the foreground takes it again.
    fn parked(&self) -> bool {
        self.app_state == AppState::Background
            && self.config.background_policy == BackgroundPolicy::WakeOnly
    }

    pub(super) async fn run(mut self, mut cmd_rx: mpsc::UnboundedReceiver<Cmd>) {
        let mut sync: Option<SyncRequest> = None;
        loop {
            // Wait for the home's lock while it is wanted (always, unless
            // parked with no sync asked for); meanwhile answer what can be
            // answered.
            let lock = loop {
                let wanted = sync.is_some() || !self.parked();
                if wanted && let Some(l) = Home::new(&self.inner.home).try_lock() {
                    break Some(l);
                }
                // A push wake-up beside a frozen holder: connect anyway, as a
                // transient connection (the store is shared; sends and
                // entries are idempotent).
                if sync.as_ref().is_some_and(|r| r.transient) {
                    break None;
                }
                let now = tokio::time::Instant::now();
                // A sync waits at most LOCK_WAIT for the lock.
                let give_up = sync.as_ref().map(|r| r.until.min(r.asked + LOCK_WAIT));
                if let Some(at) = give_up
                    && now >= at
                    && let Some(r) = sync.take()
                {
                    let _ = r.started.send(false);
                    continue;
                }
                let poll = match (give_up, wanted) {
                    (Some(at), _) => (now + Duration::from_millis(50)).min(at),
                    (None, true) => now + Duration::from_millis(250),
                    (None, false) => now + Duration::from_secs(3600),
                };
                tokio::select! {
                    cmd = cmd_rx.recv() => match cmd {
                        None => return,
                        Some(Cmd::Stop(done)) => { let _ = done.send(()); return; }
                        Some(Cmd::Request(_, reply)) => { let _ = reply.send(Err(ClientError::NotConnected)); }
                        // Never stored: without the connection there is no one to tell.
                        Some(Cmd::Signal(_, _, reply)) => { let _ = reply.send(Err(ClientError::NotConnected)); }
                        Some(Cmd::AppState(s, ack)) => {
                            self.app_state = s;
                            if let Some(ack) = ack {
                                let _ = ack.send(());
                            }
                        }
                        Some(Cmd::Network(n)) => {
                            self.inner.set_network_status(&n);
                            self.network = n;
                        }
                        // Not holding the connection: nothing to replace.
                        Some(Cmd::Resume) => {}
                        Some(Cmd::Start) => self.started = true,
                        Some(Cmd::OutboxChanged) => {}
                        Some(Cmd::Sync(r)) => {
                            if let Some(old) = sync.replace(r) {
                                let _ = old.started.send(false);
                            }
                        }
                        Some(Cmd::EndSync(e)) => { let _ = e.done.send(Collected::default()); }
                        // Kept in the store; sent by whichever process connects next.
                        Some(Cmd::Push(reply)) => { if let Some(r) = reply { let _ = r.send(Err(ClientError::NotConnected)); } }
                        Some(Cmd::Mutes(reply)) => { if let Some((_, r)) = reply { let _ = r.send(Err(ClientError::NotConnected)); } }
                        Some(Cmd::MarkRead(conv, up_to, reply)) => {
                            // Kept here; the relay hears of it from the holder's next read.
                            let local = self.inner.store.lock().unwrap_or_else(|p| p.into_inner()).set_read_mark(conv, up_to);
                            let _ = reply.send(match local {
                                Ok(()) => Err(ClientError::NotConnected),
                                Err(e) => Err(e.into()),
                            });
                        }
                    },
                    _ = tokio::time::sleep_until(poll) => {}
                }
            };
            let transient = lock.is_none();
            self.inner.holder.store(!transient, Ordering::SeqCst);
            self.config.transient = transient;
            let driver = Driver::new(&self);
            self.config.transient = false;
            let mut driver = match driver {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!(target: "keepwire::client", error = %e, "cannot open the client store");
                    return;
                }
            };
            if let Some(r) = sync.take() {
                driver.begin_sync(r);
            }
            match driver.run(&mut cmd_rx).await {
                Exit::Stopped => {
                    self.inner.holder.store(false, Ordering::SeqCst);
                    drop(lock);
                    return;
                }
                Exit::Released(acks) => {
                    self.app_state = driver.app_state;
                    self.network = driver.network_state.clone();
                    self.started = driver.started;
                    drop(driver);
                    self.inner.holder.store(false, Ordering::SeqCst);
                    {
                        let mut s = self.inner.status.lock().unwrap_or_else(|p| p.into_inner());
                        s.holder = false;
                        s.state = State::Dormant;
                    }
                    drop(lock);
                    tracing::debug!(target: "keepwire::background", "parked: connection closed, home released");
                    self.inner.status_changed.send_replace(());
                    for a in acks {
                        a.send();
                    }
                }
            }
        }
    }
}
