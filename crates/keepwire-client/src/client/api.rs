//! The [`Client`] handle the app calls (clone per part of the app).

use super::*;

/// A keepwire client for one device home. Cheap to clone: every part of the
/// app shares one connection.
#[derive(Clone)]
pub struct Client {
    pub(super) inner: Arc<Inner>,
}

/// A send durably queued in the outbox.
pub struct SendHandle {
    /// The send's client id.
    pub cid: String,
    pub(super) rx: Option<oneshot::Receiver<Result<(), SendError>>>,
    pub(super) inner: Arc<Inner>,
}

impl SendHandle {
    /// Waits until the relay confirmed the send (or refused it for good).
    /// Works whichever process on this home holds the connection.
    pub async fn confirmed(mut self) -> Result<(), SendError> {
        let mut rx = self.rx.take();
        let mut poll = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                r = async { rx.as_mut().expect("guarded").await }, if rx.is_some() => match r {
                    Ok(r) => return r,
                    Err(_) => rx = None,
                },
                _ = poll.tick() => {
                    let status = self.inner.store.lock().unwrap_or_else(|p| p.into_inner()).outbox_status(&self.cid);
                    match status {
                        Ok(None) => return Ok(()),
                        Ok(Some(OutboxState::Failed { code, message })) => {
                            return Err(SendError { code, message });
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}

/// The store key holding extra trusted root certificates (PEM).
pub const CA_META: &str = "ca_pem";

/// Parses the certificates in a PEM text (DER each); an error if there is none.
pub fn parse_pem_certificates(pem: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let certs: Vec<Vec<u8>> = CertificateDer::pem_slice_iter(pem)
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bad certificate PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in the PEM text".into());
    }
    Ok(certs)
}

impl Client {
    /// A builder for the client of the device whose store is in `home`.
    pub fn builder(home: impl AsRef<Path>) -> ClientBuilder {
        ClientBuilder {
            home: home.as_ref().to_owned(),
            urls: None,
            token: None,
            resolver: Arc::new(SystemResolver),
            resolve_timeout: Duration::from_secs(5),
            token_provider: None,
            token_elsewhere: false,
            extra_roots: Vec::new(),
            configure: None,
            app_state: AppState::Foreground,
            start: true,
            notifier: None,
            background_policy: None,
        }
    }

    /// Queues a text message. Returns once it is durably in the outbox; the
    /// handle tells when the relay confirmed it.
    pub async fn send(&self, conv: u64, body: &str) -> Result<SendHandle, ClientError> {
        // The durable insert (an fsync) runs off the caller's async thread.
        let inner = self.inner.clone();
        let body = body.to_owned();
        let row = tokio::task::spawn_blocking(move || {
            inner
                .store
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .enqueue(conv, "text", &body)
        })
        .await
        .map_err(|_| ClientError::Closed)??;
        let (tx, rx) = oneshot::channel();
        self.inner
            .waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(row.item.cid.clone())
            .or_default()
            .push(tx);
        let _ = self.inner.cmd.send(Cmd::OutboxChanged);
        Ok(SendHandle {
            cid: row.item.cid,
            rx: Some(rx),
            inner: self.inner.clone(),
        })
    }

    /// Events (state changes, messages, confirmations, ...). Each call gives
    /// an independent stream starting now.
    pub fn events(&self) -> impl futures_util::Stream<Item = ClientEvent> + Send + 'static {
        use futures_util::StreamExt as _;
        tokio_stream::wrappers::BroadcastStream::new(self.inner.events.subscribe()).map(|r| match r
        {
            Ok(e) => e,
            Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                ClientEvent::Lagged(n)
            }
        })
    }

    /// Tells the client the app moved to the foreground or background.
    pub fn set_app_state(&self, s: AppState) {
        let _ = self.inner.cmd.send(Cmd::AppState(s, None));
    }

    /// Like [`Client::set_app_state`], and returns once the client acted on
    /// it. Going to the background under the `wake-only` policy (with no sync
    /// running) closes the connection, closes the connection's store
    /// handle (no transaction stays open) and releases the home's lock
    /// (`HOME/lock`) before this returns: iOS kills a suspended process that
    /// holds a file lock in a shared container, so an app calls this inside
    /// its background task, before it is suspended.
    pub async fn apply_app_state(&self, s: AppState) {
        let (tx, rx) = oneshot::channel();
        if self.inner.cmd.send(Cmd::AppState(s, Some(tx))).is_ok() {
            let _ = rx.await;
        }
    }

    /// Tells the client what the OS says about the network.
    pub fn set_network(&self, n: Network) {
        let _ = self.inner.cmd.send(Cmd::Network(n));
    }

    /// Tells the client the device woke from sleep (suspend/resume): a
    /// socket from before the sleep is replaced at once, skipping any backoff
    /// wait, and the backoff starts over. Not a connection of its own: a
    /// client parked in the background under `wake-only`, stopped, or with no
    /// network stays so.
    pub fn resume(&self) {
        let _ = self.inner.cmd.send(Cmd::Resume);
    }

    /// Starts connecting (after [`ClientBuilder::manual_start`], or after a stop).
    pub fn start(&self) {
        let _ = self.inner.cmd.send(Cmd::Start);
    }

    /// Closes the connection and stops; pending sends stay in the outbox.
    pub async fn stop(&self) {
        let (tx, rx) = oneshot::channel();
        if self.inner.cmd.send(Cmd::Stop(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// The current status.
    pub fn status(&self) -> Status {
        self.inner
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits until `pred(status)` holds, or `timeout` passes.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&Status) -> bool,
    ) -> Result<Status, ClientError> {
        let mut rx = self.inner.status_changed.subscribe();
        let wait = async {
            loop {
                let s = self.status();
                if pred(&s) {
                    return Ok(s);
                }
                if let State::Stopped(r) = s.state
                    && r != keepwire_core::StopReason::ClosedByApp
                {
                    return Err(ClientError::Stopped(r));
                }
                if rx.changed().await.is_err() {
                    return Err(ClientError::Closed);
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| ClientError::Timeout)?
    }

    /// Waits until connected.
    pub async fn wait_connected(&self, timeout: Duration) -> Result<(), ClientError> {
        self.wait_for(timeout, |s| s.state == State::Connected)
            .await
            .map(|_| ())
    }

    async fn request(&self, frame: ClientFrame) -> Result<ServerFrame, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .cmd
            .send(Cmd::Request(frame, tx))
            .map_err(|_| ClientError::Closed)?;
        let reply = tokio::time::timeout(Duration::from_secs(30), rx)
            .await
            .map_err(|_| ClientError::Timeout)?
            .map_err(|_| ClientError::Closed)??;
        match reply {
            ServerFrame::Error(e) => Err(ClientError::Refused {
                code: e.code,
                message: e.message,
            }),
            other => Ok(other),
        }
    }

    /// Creates a conversation with these users (direct for exactly one other
    /// user unless `group`). Idempotent per `key`.
    pub async fn create_conversation(
        &self,
        members: Vec<String>,
        name: Option<String>,
        group: bool,
    ) -> Result<ConvInfo, ClientError> {
        let kind = if group || members.len() != 1 {
            ConvKind::Group
        } else {
            ConvKind::Direct
        };
        let frame = ClientFrame::ConvCreate(ConvCreate {
            rid: String::new(), // the connection names its requests
            key: format!("{:032x}", rand::random::<u128>()),
            kind,
            members,
            name,
        });
        match self.request(frame).await? {
            ServerFrame::Conv { conv, .. } => {
                self.inner
                    .store
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .store_convs(std::slice::from_ref(&conv))?;
                Ok(conv)
            }
            other => Err(ClientError::Refused {
                code: ErrorCode::Internal,
                message: format!("unexpected answer {other:?}"),
            }),
        }
    }

    /// Adds (or removes) a member.
    pub async fn change_member(
        &self,
        conv: u64,
        user: &str,
        add: bool,
    ) -> Result<ConvInfo, ClientError> {
        let m = ConvMember {
            rid: String::new(),
            conv,
            user: user.into(),
        };
        let frame = if add {
            ClientFrame::ConvAdd(m)
        } else {
            ClientFrame::ConvRemove(m)
        };
        match self.request(frame).await? {
            ServerFrame::Conv { conv, .. } => Ok(conv),
            other => Err(ClientError::Refused {
                code: ErrorCode::Internal,
                message: format!("unexpected answer {other:?}"),
            }),
        }
    }

    /// The user's conversations, from the relay (and saved locally).
    pub async fn list_conversations(&self) -> Result<Vec<ConvInfo>, ClientError> {
        match self
            .request(ClientFrame::ConvList { rid: String::new() })
            .await?
        {
            ServerFrame::Convs { convs, .. } => {
                self.inner
                    .store
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .store_convs(&convs)?;
                Ok(convs)
            }
            other => Err(ClientError::Refused {
                code: ErrorCode::Internal,
                message: format!("unexpected answer {other:?}"),
            }),
        }
    }

    /// Stored messages (of one conversation, or all), oldest first.
    pub fn messages(&self, conv: Option<u64>, limit: usize) -> Result<Vec<Message>, ClientError> {
        Ok(self
            .inner
            .store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .messages(conv, limit)?)
    }

    /// Connects (even when dormant in the background), flushes the outbox,
    /// stores and acknowledges everything up to the relay's head, raises
    /// notifications, and lets the connection go dormant again, all within
    /// `deadline`: the entry point for periodic tasks and push wake-ups. What
    /// was done stays done; the next call continues.
    ///
    /// It gives up early, as [`SyncOutcome::Unreachable`], once every relay
    /// failed plainly [`UNREACHABLE_ROUNDS`] times in a row (refused, or the
    /// name did not resolve) with no session opened; other faults are
    /// retried until the deadline.
    ///
    /// If another process holds the home's connection, this waits at most
    /// [`LOCK_WAIT`] for it to let go, then asks it to sync (through the
    /// store) and reports its answer: [`SyncOutcome::CaughtUp`] as soon as
    /// the holder has everything up to the relay's head (fresh from a new
    /// session or a pong), [`SyncOutcome::Unreachable`] if it cannot reach
    /// the relay, [`SyncOutcome::Busy`] if it did not take the request up
    /// within a second (not a keepwire client) or did not answer by the
    /// deadline. A process
    /// that takes the lock for the sync while it would otherwise be parked
    /// (in the background under `wake-only`) gives it back, with the
    /// connection closed, before this returns. Syncs in one process run one
    /// after the other.
    pub async fn sync_once(&self, deadline: Duration) -> SyncReport {
        self.sync(deadline, false).await.0
    }

    async fn sync(&self, deadline: Duration, collect: bool) -> (SyncReport, Collected) {
        let started = std::time::Instant::now();
        // Keep the end of the deadline for ending the sync: showing or
        // handing back what it claimed, and releasing the home.
        let end_by = tokio::time::Instant::now() + deadline;
        let until = end_by - (deadline / 4).min(Duration::from_secs(1));
        let report = |outcome, before: &Status, after: &Status| SyncReport {
            outcome,
            received: after.received - before.received,
            confirmed: after.confirmed - before.confirmed,
            notified: after.notified - before.notified,
            elapsed: started.elapsed(),
            through_holder: false,
        };
        let Ok(_gate) = tokio::time::timeout_at(until, self.inner.sync_gate.lock()).await else {
            let s = self.status();
            return (report(SyncOutcome::Partial, &s, &s), Collected::default());
        };
        let before = self.status();
        let Some(mut ours) = self.start_sync(until, collect, false).await else {
            return (
                report(
                    SyncOutcome::Stopped(keepwire_core::StopReason::ClosedByApp),
                    &before,
                    &before,
                ),
                Collected::default(),
            );
        };
        let mut transient = false;
        let mut holder_outcome = None;
        if !ours {
            let (outcome, taken_up) = self.sync_through_holder(until).await;
            if collect && !taken_up && tokio::time::Instant::now() < until {
                // A holder that does not even take the request up looks
                // frozen (an app the OS suspended with its socket open): a
                // push wake-up connects anyway, as a transient connection,
                // the way an iOS notification service extension does.
                tracing::info!(target: "keepwire::push", "the holder of this home does not answer; connecting as a transient connection");
                ours = self.start_sync(until, collect, true).await == Some(true);
                transient = ours;
            }
            if !ours {
                holder_outcome = Some(outcome);
            }
        }
        let through_holder = holder_outcome.is_some();
        // The session must be a new one: a head learnt earlier says nothing.
        let fresh = |s: &Status| {
            (s.sessions > before.sessions || s.heads_heard > before.heads_heard) && s.caught_up()
        };
        let waited = if ours {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            // Plainly unreachable (see UNREACHABLE_ROUNDS): give up early.
            self.wait_for(left, |s| {
                fresh(s)
                    || (s.sessions == before.sessions && s.plainly_unreachable(UNREACHABLE_ROUNDS))
            })
            .await
        } else {
            Err(ClientError::NotConnected)
        };
        let (done, shown) = oneshot::channel();
        let mut collected = Collected::default();
        let end_by = end_by.max(tokio::time::Instant::now() + Duration::from_millis(200));
        if self.inner.cmd.send(Cmd::EndSync(EndSync { done })).is_ok()
            && let Ok(Ok(c)) = tokio::time::timeout_at(end_by, shown).await
        {
            collected = c;
        }
        let after = self.status();
        let outcome = match waited {
            Ok(s) if fresh(&s) => SyncOutcome::CaughtUp,
            Ok(s) => SyncOutcome::Unreachable(s.last_error),
            // The device's full connection came back and took over.
            Err(ClientError::Stopped(keepwire_core::StopReason::Replaced)) if transient => {
                SyncOutcome::Partial
            }
            Err(ClientError::Stopped(r)) => SyncOutcome::Stopped(r),
            Err(_) if !ours => holder_outcome.unwrap_or(SyncOutcome::Busy),
            Err(_) if after.sessions > before.sessions => SyncOutcome::Partial,
            Err(_) => SyncOutcome::Unreachable(after.last_error.clone()),
        };
        let mut report = report(outcome, &before, &after);
        report.through_holder = through_holder;
        (report, collected)
    }

    /// Asks the supervisor to run a sync (`transient`: without the home's
    /// lock) and waits until `until` for it to start: `Some(true)` when this
    /// process runs it, `Some(false)` when another process holds the home,
    /// `None` when the client has stopped.
    async fn start_sync(
        &self,
        until: tokio::time::Instant,
        collect: bool,
        transient: bool,
    ) -> Option<bool> {
        let (tx, rx) = oneshot::channel();
        let request = Cmd::Sync(SyncRequest {
            asked: tokio::time::Instant::now(),
            until,
            collect,
            transient,
            started: tx,
        });
        self.inner.cmd.send(request).ok()?;
        Some(matches!(
            tokio::time::timeout_at(until, rx).await,
            Ok(Ok(true))
        ))
    }

    /// Asks the process holding this home's connection to sync (through the
    /// store, as sends reach it) and waits until `until` for its answer, and
    /// says whether the holder took the request up at all. Nothing comes
    /// back: what it stores is in the shared store already.
    async fn sync_through_holder(&self, until: tokio::time::Instant) -> (SyncOutcome, bool) {
        let asked = self
            .inner
            .store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ask_holder_sync();
        let Ok(n) = asked else {
            return (SyncOutcome::Busy, false);
        };
        // A holder takes a request up within its 100 ms poll; one that does
        // not (not a keepwire client, or an older one) is not waited for.
        let ack_by = tokio::time::Instant::now() + HOLDER_ACK_WAIT;
        let mut poll = tokio::time::interval(Duration::from_millis(50));
        loop {
            poll.tick().await;
            let (answer, seen) = {
                let store = self.inner.store.lock().unwrap_or_else(|p| p.into_inner());
                (store.holder_sync_answer(), store.holder_sync_seen())
            };
            if let Ok(Some((m, outcome))) = answer
                && m >= n
            {
                let outcome = match outcome.as_str() {
                    "caught_up" => SyncOutcome::CaughtUp,
                    _ => SyncOutcome::Unreachable(None),
                };
                return (outcome, true);
            }
            let now = tokio::time::Instant::now();
            let taken_up = matches!(seen, Ok(s) if s >= n);
            if now >= until || (!taken_up && now >= ack_by) {
                return (SyncOutcome::Busy, taken_up);
            }
        }
    }

    /// Handles a push wake-up (FCM, APNs, UnifiedPush): runs a bounded sync
    /// within `deadline` (a best attempt even when DNS or the relay hangs)
    /// and returns what to show instead of showing it, so an iOS
    /// notification service extension or an Android messaging service can
    /// post it itself. Each message is in at most one notification ever,
    /// also when it later arrives over the socket or through another
    /// process on this home.
    ///
    /// `payload` is what the push carried: keepwire's pushes are content-free
    /// (an opaque registration id the app may use to pick the home), so any
    /// payload up to [`MAX_PUSH_PAYLOAD`] bytes triggers the sync. A second
    /// call while one runs in this process joins it and returns its result
    /// (`joined`), or a `Partial` report if its own deadline comes first.
    ///
    /// If another process holds the home and does not take the sync up
    /// within a second (an app the OS froze with its socket open), this
    /// connects anyway, without the home's lock, as a transient connection
    /// (PROTOCOL.md §2, `hello.transient`): the relay tells the frozen
    /// connection to come back (4012) rather than replacing it for good.
    pub async fn on_push(
        &self,
        payload: &[u8],
        deadline: Duration,
    ) -> Result<PushResult, ClientError> {
        if payload.len() > MAX_PUSH_PAYLOAD {
            return Err(ClientError::BadPushPayload(format!(
                "{} bytes, more than the {MAX_PUSH_PAYLOAD} a push can carry",
                payload.len()
            )));
        }
        // Only the registration id is read (from a Web Push body encrypted to
        // this device's keys after decrypting it, RFC 8291); the messages
        // come from the sync, never from the push.
        let keys = self
            .inner
            .store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_keys()?;
        let read = crate::push::read_payload(payload, keys.as_ref());
        if read.decrypted {
            tracing::debug!(target: "keepwire::push", "a Web Push body opened with this device's keys");
        }
        let started = std::time::Instant::now();
        let (running, joined) = {
            let mut slot = self.inner.push.lock().unwrap_or_else(|p| p.into_inner());
            match slot.as_ref() {
                Some(f) if f.peek().is_none() => (f.clone(), true),
                _ => {
                    let client = self.clone();
                    let task = tokio::spawn(async move {
                        let (report, c) = client.sync(deadline, true).await;
                        PushResult {
                            report,
                            show: c.show,
                            clear: c.clear,
                            joined: false,
                            registration_id: None,
                        }
                    });
                    let f: BoxFuture<'static, Option<PushResult>> =
                        Box::pin(async move { task.await.ok() });
                    let f = futures_util::FutureExt::shared(f);
                    *slot = Some(f.clone());
                    (f, false)
                }
            }
        };
        // The wake-up's own caller waits for it (it is bounded by the
        // deadline); a joiner waits at most its own deadline.
        let outcome = if joined {
            tokio::time::timeout(deadline, running).await
        } else {
            Ok(running.await)
        };
        match outcome {
            Ok(Some(mut r)) => {
                r.joined = joined;
                r.registration_id = read.registration_id;
                if let Some(p) = read.preview
                    && r.report.outcome != SyncOutcome::CaughtUp
                    && let Some(n) = self.show_preview(&p)?
                {
                    r.show.push(n);
                }
                Ok(r)
            }
            Ok(None) => Err(ClientError::Closed),
            // Only a joiner with a shorter deadline gets here: the running
            // wake-up goes on and shows its result to its own caller.
            Err(_) => Ok(PushResult {
                report: SyncReport {
                    outcome: SyncOutcome::Partial,
                    received: 0,
                    confirmed: 0,
                    notified: 0,
                    elapsed: started.elapsed(),
                    through_holder: false,
                },
                show: Vec::new(),
                clear: Vec::new(),
                joined,
                registration_id: read.registration_id,
            }),
        }
    }

    /// A wake-up whose sync could not fetch the message: the notification
    /// comes from the push's preview instead, claimed like any other (never
    /// shown again when the message arrives later, not shown at all if the
    /// message is muted, read elsewhere, our own or in quiet hours).
    fn show_preview(&self, p: &crate::push::Preview) -> Result<Option<Notification>, ClientError> {
        let mut store = self.inner.store.lock().unwrap_or_else(|p| p.into_inner());
        let prefs = store.prefs()?;
        let me = self.status().user;
        let quiet = prefs.quiet_hours.is_some_and(|q| q.now());
        let read = store.read_mark(p.conv)?;
        let m = p.message();
        let claimed = store.claim_notifications(std::slice::from_ref(&m), |m| {
            prefs.may_show(m, me.as_deref(), quiet, read)
        })?;
        let Some(c) = claimed.into_iter().next() else {
            return Ok(None);
        };
        let name = store.conv_name(c.conv)?;
        let n = coalesce(&c, name.as_deref(), prefs.previews);
        store.log_notification(n.conv, n.unread)?;
        drop(store);
        self.inner
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .notified += 1;
        Ok(Some(n))
    }

    /// The user opened a notification of `conv` (or the conversation): the
    /// app is in the foreground and `conv` is read up to its newest stored
    /// message, here (its notification is not raised again) and, once
    /// connected, on the user's other devices (theirs are cleared). Waits
    /// up to `timeout` for the connection; `NotConnected` if it did not come
    /// (the local mark is kept).
    pub async fn notification_opened(
        &self,
        conv: u64,
        timeout: Duration,
    ) -> Result<(), ClientError> {
        let up_to = {
            let store = self.inner.store.lock().unwrap_or_else(|p| p.into_inner());
            let up_to = store.max_conv_seq(conv)?;
            store.set_read_mark(conv, up_to)?;
            up_to
        };
        self.set_app_state(AppState::Foreground);
        self.wait_connected(timeout).await?;
        self.mark_read(conv, up_to).await
    }

    /// The user's preferences (notifications, background policy).
    pub fn prefs(&self) -> Result<crate::notify::Prefs, ClientError> {
        Ok(self
            .inner
            .store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .prefs()?)
    }

    /// Saves the user's preferences. Mutes, quiet hours and previews apply
    /// to the next notification; the background policy applies from the
    /// next start of a client on this home.
    ///
    /// Mutes changed here are also sent to the relay (as
    /// [`Client::set_muted`] does, without waiting for its answer), so the
    /// relay stops pushing for them and the user's other devices follow.
    pub fn set_prefs(&self, p: &crate::notify::Prefs) -> Result<(), ClientError> {
        let (changed, previews_changed) = {
            let mut store = self.inner.store.lock().unwrap_or_else(|p| p.into_inner());
            let before = store.prefs()?.previews;
            let changed = store.save_prefs(p)?;
            // Previews in pushes follow the preference: the registration
            // goes to the relay again with the new choice.
            let push = store.push_state()?;
            let previews_changed = before != p.previews && push.registration.is_some();
            if previews_changed {
                store.change_push(push.registration, push.own_keys)?;
            }
            (changed, previews_changed)
        };
        if !changed.is_empty() {
            let _ = self.inner.cmd.send(Cmd::Mutes(None));
        }
        if previews_changed {
            let _ = self.inner.cmd.send(Cmd::Push(None));
        }
        Ok(())
    }

    /// Sends an ephemeral signal (a typing indicator, presence: any JSON
    /// value up to 1024 bytes encoded) to the devices of `conv`'s members
    /// that are connected right now (not to this connection). Best effort:
    /// never stored, never retried. `Ok` once written to the connection;
    /// [`ClientError::NotConnected`] if this process does not hold a live
    /// connection (signals are not queued: a typing indicator sent late is
    /// wrong); [`ClientError::BadSignal`] if the data is too large. The relay
    /// answers a refusal (`not_member`) with no request to match it to: it is
    /// logged (target `keepwire::client`), not returned.
    pub async fn signal(&self, conv: u64, data: serde_json::Value) -> Result<(), ClientError> {
        let size = serde_json::to_string(&data).map_or(usize::MAX, |s| s.len());
        let max = keepwire_proto::Limits::default().max_signal_bytes;
        if size > max {
            return Err(ClientError::BadSignal(format!(
                "the data is {size} bytes encoded; at most {max}"
            )));
        }
        let (tx, rx) = oneshot::channel();
        self.inner
            .cmd
            .send(Cmd::Signal(conv, data, tx))
            .map_err(|_| ClientError::Closed)?;
        rx.await.map_err(|_| ClientError::Closed)?
    }

    /// Marks `conv` read up to `up_to` (a `conv_seq`) on this device and, through
    /// the relay, on the user's other devices: their notifications for it are
    /// cleared and not raised again. `NotConnected` if the relay could not be
    /// told now (the local mark is kept).
    pub async fn mark_read(&self, conv: u64, up_to: u64) -> Result<(), ClientError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .cmd
            .send(Cmd::MarkRead(conv, up_to, tx))
            .map_err(|_| ClientError::Closed)?;
        rx.await.map_err(|_| ClientError::Closed)?
    }

    /// Registers (or replaces) this device's push registration: the FCM or
    /// APNs token the OS gave the app, or a Web Push endpoint (with keys made
    /// elsewhere, or keys keepwire makes and keeps in the store, so
    /// [`Client::on_push`] can decrypt the pushes). Call it whenever the OS
    /// hands over a new token.
    ///
    /// It is validated, saved in the store (it survives restarts), and sent
    /// to the relay at once if this process is connected, else after the
    /// next handshake of whichever process on this home connects. It is
    /// sent again after a relay restore (new epoch) and weekly, so the relay
    /// never drops it as stale. Returns the registration's status: with the
    /// relay's id when it answered within the request timeout, `pending`
    /// when it could not be told yet. A relay refusal comes back as
    /// [`ClientError::Refused`] (code `invalid`: e.g. a provider the relay
    /// is not configured for, an APNs topic it does not allow, a Web Push
    /// endpoint on a private address).
    pub async fn set_push_registration(
        &self,
        registration: crate::PushRegistration,
    ) -> Result<crate::PushStatus, ClientError> {
        let own = matches!(
            registration,
            crate::PushRegistration::WebPush { keys: None, .. }
        );
        // FCM and APNs registrations carry this device's keys too: the relay
        // encrypts previews to them (when the user and the operator allow).
        let with_keys = !matches!(
            registration,
            crate::PushRegistration::WebPush { keys: Some(_), .. }
        );
        {
            let mut store = self.inner.store.lock().unwrap_or_else(|p| p.into_inner());
            let keys = if with_keys {
                Some(store.ensure_push_keys()?)
            } else {
                None
            };
            let wire = crate::push::wire_form(&registration, keys.as_ref())
                .map_err(ClientError::BadPushRegistration)?;
            store.change_push(Some(wire), own)?;
        }
        self.push_now().await
    }

    /// Removes this device's push registration (the relay stops pushing
    /// to it). Saved first, sent when connected, like
    /// [`Client::set_push_registration`].
    pub async fn clear_push_registration(&self) -> Result<crate::PushStatus, ClientError> {
        {
            let mut store = self.inner.store.lock().unwrap_or_else(|p| p.into_inner());
            let s = store.push_state()?;
            if s.registration.is_none() && !s.dirty && s.id.is_none() {
                return Ok(s.status());
            }
            store.change_push(None, false)?;
        }
        self.push_now().await
    }

    /// Where this device's push registration stands (from the store).
    pub fn push_status(&self) -> Result<crate::PushStatus, ClientError> {
        Ok(self
            .inner
            .store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_status()?)
    }

    /// Sends the stored registration now if connected and returns its status.
    async fn push_now(&self) -> Result<crate::PushStatus, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .cmd
            .send(Cmd::Push(Some(tx)))
            .map_err(|_| ClientError::Closed)?;
        // Not connected, or no answer in time: it stays pending and goes
        // out with the next handshake.
        if let Ok(Ok(Err(e @ ClientError::Refused { .. }))) =
            tokio::time::timeout(Duration::from_secs(30), rx).await
        {
            return Err(e);
        }
        self.push_status()
    }

    /// Mutes (or unmutes) a conversation for all of the user's devices: no
    /// notifications here from now on, no push wake-ups for it from the
    /// relay, and the user's other devices follow (a `mute` inbox entry).
    /// Saved at once; the relay is told now if this process is connected,
    /// else after the next handshake. Returns `true` once the relay accepted
    /// it, `false` if it is queued; [`ClientError::Refused`] if the relay
    /// refused it (`not_member`, `no_such_conv`).
    pub async fn set_muted(&self, conv: u64, muted: bool) -> Result<bool, ClientError> {
        self.inner
            .store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .queue_mute(conv, muted)?;
        let (tx, rx) = oneshot::channel();
        self.inner
            .cmd
            .send(Cmd::Mutes(Some((conv, tx))))
            .map_err(|_| ClientError::Closed)?;
        match tokio::time::timeout(Duration::from_secs(30), rx).await {
            Ok(Ok(Ok(()))) => Ok(true),
            Ok(Ok(Err(e @ ClientError::Refused { .. }))) => Err(e),
            Ok(_) | Err(_) => Ok(false),
        }
    }

    /// The background heartbeats learnt per network: (interval, settled).
    pub fn learned_heartbeats(&self) -> Result<HashMap<String, (Duration, bool)>, ClientError> {
        Ok(self
            .inner
            .store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .learned_heartbeats()?)
    }

    /// The home directory.
    pub fn home(&self) -> &Path {
        &self.inner.home
    }
}
