//! The [`Client`] object, its callback interfaces, and the thread that runs
//! the callbacks.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::thread::ThreadId;
use std::time::Duration;

use keepwire_client::BoxFuture;
use keepwire_client::store::Store;

use crate::types::{
    AppState, Conversation, Event, Message, Network, Notification, Prefs, PushRegistration,
    PushResult, PushStatus, Stats, Status, SyncReport, millis, tag,
};
use crate::{KeepwireError, runtime};

/// Receives the client's events, in order, on the crate's callback thread.
#[uniffi::export(callback_interface)]
pub trait EventListener: Send + Sync {
    /// One event. May call the client (any method, `close` included). An
    /// exception is logged; the next event comes as usual.
    fn on_event(&self, event: Event);
}

/// Hands the client a fresh token when the relay refuses or expires the
/// current one (the app keeps it in the Android Keystore or the iOS
/// Keychain). Asked at most once per refusal: a second refusal stops the
/// client (`Stopped { reason: AuthRejected }`), and the app logs in again.
#[uniffi::export(callback_interface)]
pub trait TokenProvider: Send + Sync {
    /// A fresh token, or `None` if there is none. Called on a crate thread;
    /// may block (up to 30 s) to fetch one.
    fn fetch_token(&self) -> Option<String>;
}

/// Events waiting for the listener beyond which (non-notification) events
/// are dropped and counted in a `Lagged` event.
const QUEUE_BOUND: usize = 4096;

/// How long a request that needs the relay may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

enum Delivery {
    Event(Event),
    Stop,
}

/// The callback thread and its queue.
struct Callbacks {
    tx: Mutex<mpsc::Sender<Delivery>>,
    queued: Arc<AtomicUsize>,
    dropped: AtomicU64,
    listener: Arc<Mutex<Option<Arc<dyn EventListener>>>>,
    thread: ThreadId,
    exited: Mutex<mpsc::Receiver<()>>,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Callbacks {
    fn start() -> Result<Arc<Callbacks>, KeepwireError> {
        let (tx, rx) = mpsc::channel::<Delivery>();
        let (exited_tx, exited) = mpsc::channel::<()>();
        let listener: Arc<Mutex<Option<Arc<dyn EventListener>>>> = Arc::new(Mutex::new(None));
        let queued = Arc::new(AtomicUsize::new(0));
        let (l, q) = (listener.clone(), queued.clone());
        let handle = std::thread::Builder::new()
            .name("keepwire-callbacks".into())
            .spawn(move || {
                let _exited = exited_tx;
                for d in rx {
                    q.fetch_sub(1, Ordering::SeqCst);
                    let Delivery::Event(event) = d else { break };
                    // Not under the lock: the listener may replace itself.
                    let current = lock(&l).clone();
                    if let Some(listener) = current
                        && catch_unwind(AssertUnwindSafe(|| listener.on_event(event))).is_err()
                    {
                        tracing::warn!(target: "keepwire::ffi", "the event listener failed");
                    }
                }
            })
            .map_err(|e| KeepwireError::Storage {
                detail: format!("cannot start the callback thread: {e}"),
            })?;
        Ok(Arc::new(Callbacks {
            tx: Mutex::new(tx),
            queued,
            dropped: AtomicU64::new(0),
            listener,
            thread: handle.thread().id(),
            exited: Mutex::new(exited),
        }))
    }

    /// Queues an event that must not be dropped (notifications).
    fn push(&self, e: Event) {
        self.queued.fetch_add(1, Ordering::SeqCst);
        if lock(&self.tx).send(Delivery::Event(e)).is_err() {
            self.queued.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Queues an event unless the listener is far behind (then counts it).
    fn offer(&self, e: Event) {
        if self.queued.load(Ordering::SeqCst) >= QUEUE_BOUND {
            self.dropped.fetch_add(1, Ordering::SeqCst);
            return;
        }
        let missed = self.dropped.swap(0, Ordering::SeqCst);
        if missed > 0 {
            self.push(Event::Lagged { missed });
        }
        self.push(e);
    }

    /// Ends the thread after the events already queued (waits up to 1 s,
    /// unless called from a callback).
    fn stop(&self) {
        let _ = lock(&self.tx).send(Delivery::Stop);
        if std::thread::current().id() != self.thread {
            let _ = lock(&self.exited).recv_timeout(Duration::from_secs(1));
        }
    }
}

/// Shows notifications by handing them to the listener.
struct NotifierBridge(Arc<Callbacks>);

impl keepwire_client::notify::Notifier for NotifierBridge {
    fn notify(&self, n: &keepwire_client::notify::Notification) -> Result<(), String> {
        self.0.push(Event::ShowNotification {
            notification: Notification::from(n.clone()),
        });
        Ok(())
    }

    fn clear(&self, conv: u64) -> Result<(), String> {
        self.0.push(Event::ClearNotification {
            conv,
            tag: tag(conv),
        });
        Ok(())
    }
}

type ProviderSlot = Arc<Mutex<Option<Arc<dyn TokenProvider>>>>;

/// Asks the app's token provider (on a blocking thread), or, without one,
/// takes the token saved in the home if another `login` changed it.
struct TokenBridge {
    provider: ProviderSlot,
    home: PathBuf,
    last: Mutex<Option<String>>,
}

impl keepwire_client::TokenProvider for TokenBridge {
    fn refresh(&self) -> BoxFuture<'_, Option<String>> {
        Box::pin(async move {
            let provider = lock(&self.provider).clone();
            if let Some(p) = provider {
                let asked = tokio::task::spawn_blocking(move || {
                    catch_unwind(AssertUnwindSafe(|| p.fetch_token())).unwrap_or_else(|_| {
                        tracing::warn!(target: "keepwire::ffi", "the token provider failed");
                        None
                    })
                });
                return asked.await.ok().flatten();
            }
            let saved = Store::open(&self.home).ok()?.token().ok()??;
            let mut last = lock(&self.last);
            if last.as_deref() == Some(saved.as_str()) {
                None
            } else {
                *last = Some(saved.clone());
                Some(saved)
            }
        })
    }
}

/// A keepwire client for one device home (a directory the app owns; on iOS
/// in the App Group container so the notification service extension shares
/// it). Several processes may open one home: one holds the connection.
#[derive(uniffi::Object)]
pub struct Client {
    home: PathBuf,
    store: Mutex<Store>,
    inner: Mutex<Option<keepwire_client::Client>>,
    callbacks: Arc<Callbacks>,
    provider: ProviderSlot,
    /// The app state the app last reported (`None`: not told yet).
    app_state: Mutex<Option<AppState>>,
    network: Mutex<Option<Network>>,
    forwarder: Mutex<Option<tokio::task::JoinHandle<()>>>,
    closed: AtomicBool,
}

impl Client {
    fn check_open(&self) -> Result<(), KeepwireError> {
        if self.closed.load(Ordering::SeqCst) {
            Err(KeepwireError::Closed)
        } else {
            Ok(())
        }
    }

    /// The running client, started (connecting) in `default_state` unless
    /// the app said otherwise, if there is none yet.
    fn running(&self, default_state: AppState) -> Result<keepwire_client::Client, KeepwireError> {
        self.check_open()?;
        let mut inner = lock(&self.inner);
        if let Some(c) = inner.as_ref() {
            return Ok(c.clone());
        }
        let state = lock(&self.app_state).unwrap_or(default_state);
        let c = self.build(state)?;
        *inner = Some(c.clone());
        Ok(c)
    }

    fn build(&self, state: AppState) -> Result<keepwire_client::Client, KeepwireError> {
        let rt = runtime()?;
        let (policy, token) = {
            let store = lock(&self.store);
            (store.prefs()?.background_policy(), store.token()?)
        };
        let builder = keepwire_client::Client::builder(&self.home)
            .notifier(Arc::new(NotifierBridge(self.callbacks.clone())))
            .token_provider(Arc::new(TokenBridge {
                provider: self.provider.clone(),
                home: self.home.clone(),
                last: Mutex::new(token),
            }))
            // Apps rely on push and periodic syncs in the background unless
            // the user chose otherwise.
            .background_policy(policy.unwrap_or(keepwire_client::BackgroundPolicy::WakeOnly))
            .app_state(state.into());
        let client = rt.block_on(builder.build())?;
        if let Some(n) = lock(&self.network).clone() {
            client.set_network(n.into());
        }
        let mut events = client.events();
        let callbacks = self.callbacks.clone();
        let forwarder = rt.spawn(async move {
            use futures_util::StreamExt as _;
            while let Some(e) = events.next().await {
                if let Some(e) = Event::from_client(e) {
                    callbacks.offer(e);
                }
            }
        });
        if let Some(old) = lock(&self.forwarder).replace(forwarder) {
            old.abort();
        }
        Ok(client)
    }

    /// Stops and forgets the running client, if any.
    fn stop_running(&self) {
        let running = lock(&self.inner).take();
        if let (Some(c), Ok(rt)) = (running, runtime()) {
            if tokio::runtime::Handle::try_current().is_ok() {
                rt.spawn(async move { c.stop().await });
            } else {
                // The timer needs the runtime: made inside block_on.
                rt.block_on(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(2), c.stop()).await;
                });
            }
        }
        if let Some(f) = lock(&self.forwarder).take() {
            f.abort();
        }
    }
}

#[uniffi::export]
impl Client {
    /// Opens (creating if needed) the device store in the directory `home`.
    /// Does not connect: call `login` (first time) or `start`.
    #[uniffi::constructor]
    pub fn new(home: String) -> Result<Arc<Client>, KeepwireError> {
        let home = PathBuf::from(home);
        let store = Store::open(&home)?;
        Ok(Arc::new(Client {
            home,
            store: Mutex::new(store),
            inner: Mutex::new(None),
            callbacks: Callbacks::start()?,
            provider: Arc::new(Mutex::new(None)),
            app_state: Mutex::new(None),
            network: Mutex::new(None),
            forwarder: Mutex::new(None),
            closed: AtomicBool::new(false),
        }))
    }

    /// Where events go from now on (replaces the previous listener).
    pub fn set_listener(&self, listener: Box<dyn EventListener>) {
        *lock(&self.callbacks.listener) = Some(Arc::from(listener));
    }

    /// No more events (they are dropped until a listener is set).
    pub fn clear_listener(&self) {
        *lock(&self.callbacks.listener) = None;
    }

    /// Where fresh tokens come from. Without one, the client retries once
    /// with the token saved by the latest `login`.
    pub fn set_token_provider(&self, provider: Box<dyn TokenProvider>) {
        *lock(&self.provider) = Some(Arc::from(provider));
    }

    /// Saves the relay URL (`ws://` or `wss://`) and the token in the home,
    /// then connects (in the foreground unless `set_app_state` said
    /// otherwise). Returns at once: `StateChanged` events tell the rest (a
    /// refused token ends in `Stopped { reason: AuthRejected }`).
    pub fn login(&self, server: String, token: String) -> Result<(), KeepwireError> {
        self.check_open()?;
        if !(server.starts_with("ws://") || server.starts_with("wss://")) {
            return Err(KeepwireError::InvalidInput {
                detail: format!("relay URL {server:?}: use ws://HOST:PORT or wss://HOST:PORT"),
            });
        }
        if token.trim().is_empty() {
            return Err(KeepwireError::InvalidInput {
                detail: "the token is empty".into(),
            });
        }
        lock(&self.store).save_login(&[server], token.trim())?;
        self.stop_running();
        self.start()
    }

    /// Trusts a private CA (PEM, one or more certificates) for `wss://`
    /// besides the platform's roots; saved in the home. Applies from the
    /// next `login` or `start`.
    pub fn set_trusted_certificates(&self, pem: String) -> Result<(), KeepwireError> {
        keepwire_client::parse_pem_certificates(pem.as_bytes())
            .map_err(|detail| KeepwireError::InvalidInput { detail })?;
        lock(&self.store).set_meta(keepwire_client::CA_META, &pem)?;
        Ok(())
    }

    /// Connects with the saved login (in the foreground unless
    /// `set_app_state` said otherwise). `NotLoggedIn` without one.
    pub fn start(&self) -> Result<(), KeepwireError> {
        self.running(AppState::Foreground)?.start();
        Ok(())
    }

    /// Queues a text message in the durable outbox and returns its client
    /// id once it is there: it is sent (now or after any outage or process
    /// death) and stored by the relay exactly once. `SendConfirmed` (or
    /// `SendFailed`) with this id follows.
    pub fn send(&self, conv: u64, body: String) -> Result<String, KeepwireError> {
        let client = self.running(AppState::Foreground)?;
        let handle = runtime()?.block_on(client.send(conv, &body))?;
        Ok(handle.cid)
    }

    /// Stored messages of a conversation, oldest first (the newest `limit`).
    #[uniffi::method(default(limit = 100))]
    pub fn messages(&self, conv: u64, limit: u32) -> Result<Vec<Message>, KeepwireError> {
        self.check_open()?;
        let stored = lock(&self.store).messages(Some(conv), limit as usize)?;
        Ok(stored.into_iter().map(Into::into).collect())
    }

    /// The conversations known on this device.
    pub fn conversations(&self) -> Result<Vec<Conversation>, KeepwireError> {
        self.check_open()?;
        Ok(lock(&self.store)
            .convs()?
            .into_iter()
            .map(Into::into)
            .collect())
    }

    /// Creates a conversation with these users (direct for exactly one
    /// other user unless `group`). Needs the connection (`NotConnected`
    /// otherwise); waits up to 30 s for the relay.
    pub fn create_conversation(
        &self,
        members: Vec<String>,
        name: Option<String>,
        group: bool,
    ) -> Result<Conversation, KeepwireError> {
        let client = self.running(AppState::Foreground)?;
        let conv = runtime()?.block_on(client.create_conversation(members, name, group))?;
        Ok(conv.into())
    }

    /// Tells the client the app moved to the foreground or the background,
    /// and returns once it acted on it. Under the `WakeOnly` policy,
    /// `Background` closes the connection, leaves no store transaction open
    /// and releases the home's lock before it returns: on iOS call it inside
    /// the app's background task, before the app is suspended.
    pub fn set_app_state(&self, state: AppState) {
        *lock(&self.app_state) = Some(state);
        let running = lock(&self.inner).clone();
        if let (Some(c), Ok(rt)) = (running, runtime()) {
            rt.block_on(c.apply_app_state(state.into()));
        }
    }

    /// Tells the client what the OS says about the network (Android's
    /// `ConnectivityManager.NetworkCallback`, iOS's `NWPathMonitor`).
    pub fn set_network(&self, network: Network) {
        *lock(&self.network) = Some(network.clone());
        if let Some(c) = lock(&self.inner).as_ref() {
            c.set_network(network.into());
        }
    }

    /// Connects (even when dormant), flushes the outbox, stores everything
    /// up to the relay's head, raises notifications (as `ShowNotification`
    /// events), and lets go again, all within `deadline_ms`: for periodic
    /// tasks (WorkManager, BGAppRefreshTask). Waits at most 2 s for the home
    /// if another process holds it (`Busy`). Starts a client that is not
    /// running in the background.
    pub fn sync_once(&self, deadline_ms: u64) -> Result<SyncReport, KeepwireError> {
        let client = self.running(AppState::Background)?;
        client.start();
        let report = runtime()?.block_on(client.sync_once(Duration::from_millis(deadline_ms)));
        Ok(report.into())
    }

    /// A push wake-up arrived (FCM `onMessageReceived`, an iOS notification
    /// service extension, a UnifiedPush message): syncs within `deadline_ms`
    /// (a best attempt even when DNS or the relay hangs; give it what the
    /// OS leaves, e.g. 8 s on Android, 25 s in an iOS extension) and returns
    /// what to show, which the app posts itself. Each message is in at most
    /// one notification, ever. `payload` is the push's keepwire data (the
    /// `kw` field), at most 4096 bytes. A second call while one runs joins
    /// it. Starts a client that is not running in the background.
    pub fn on_push(&self, payload: Vec<u8>, deadline_ms: u64) -> Result<PushResult, KeepwireError> {
        let client = self.running(AppState::Background)?;
        client.start();
        let result =
            runtime()?.block_on(client.on_push(&payload, Duration::from_millis(deadline_ms)))?;
        Ok(result.into())
    }

    /// The user opened the conversation `conv` from its notification: the
    /// app is in the foreground, and the conversation is read up to its
    /// newest stored message here at once (no notification for those again)
    /// and, once connected, on the user's other devices (theirs clear).
    /// Returns at once.
    pub fn notification_opened(&self, conv: u64) -> Result<(), KeepwireError> {
        let client = self.running(AppState::Foreground)?;
        {
            let store = lock(&self.store);
            let up_to = store.max_conv_seq(conv)?;
            store.set_read_mark(conv, up_to)?;
        }
        *lock(&self.app_state) = Some(AppState::Foreground);
        client.start();
        runtime()?.spawn(async move {
            if let Err(e) = client.notification_opened(conv, REQUEST_TIMEOUT).await {
                tracing::info!(target: "keepwire::ffi", error = %e, conv, "the read marker did not reach the relay yet");
            }
        });
        Ok(())
    }

    /// Registers (or replaces) this device's push registration: call it
    /// with the token the OS gives the app, and again whenever it changes.
    /// Saved in the home first (it survives restarts; keepwire re-sends it
    /// after relay restores and weekly), then sent to the relay if
    /// connected: waits up to 30 s for its answer. `pending` in the result
    /// means it goes out with the next connection (`sync_once`, `on_push`,
    /// the foreground). `Refused` (code `invalid`) when the relay does not
    /// take it; `InvalidInput` when it is malformed.
    pub fn set_push_registration(
        &self,
        registration: PushRegistration,
    ) -> Result<PushStatus, KeepwireError> {
        let reg = registration.into_client()?;
        let client = self.running(AppState::Background)?;
        Ok(runtime()?
            .block_on(client.set_push_registration(reg))?
            .into())
    }

    /// Removes this device's push registration (saved first, sent when
    /// connected, like `set_push_registration`).
    pub fn clear_push_registration(&self) -> Result<PushStatus, KeepwireError> {
        let client = self.running(AppState::Background)?;
        Ok(runtime()?
            .block_on(client.clear_push_registration())?
            .into())
    }

    /// Where this device's push registration stands (from the home).
    pub fn push_status(&self) -> Result<PushStatus, KeepwireError> {
        self.check_open()?;
        Ok(lock(&self.store).push_status()?.into())
    }

    /// Mutes (or unmutes) a conversation on all of the user's devices: no
    /// notifications, and no push wake-ups from the relay for it. Saved at
    /// once; returns `true` once the relay accepted it (up to 30 s), `false`
    /// if it is queued for the next connection. `Refused` (`not_member`)
    /// for a conversation the user is not in.
    pub fn set_muted(&self, conv: u64, muted: bool) -> Result<bool, KeepwireError> {
        let client = self.running(AppState::Background)?;
        Ok(runtime()?.block_on(client.set_muted(conv, muted))?)
    }

    /// The user's preferences.
    pub fn prefs(&self) -> Result<Prefs, KeepwireError> {
        self.check_open()?;
        Ok(Prefs::from_client(&lock(&self.store).prefs()?))
    }

    /// Saves the user's preferences (mutes, quiet hours and previews apply
    /// to the next notification; the background policy from the next start).
    /// Changed mutes also go to the relay (as `set_muted`, without waiting).
    pub fn set_prefs(&self, prefs: Prefs) -> Result<(), KeepwireError> {
        self.check_open()?;
        let mut store = lock(&self.store);
        let mut current = store.prefs()?;
        prefs.apply(&mut current)?;
        store.save_prefs(&current)?;
        Ok(())
    }

    /// Connection statistics over the last `window_ms`.
    pub fn stats(&self, window_ms: u64) -> Result<Stats, KeepwireError> {
        self.check_open()?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(millis)
            .unwrap_or(0);
        let to = i64::try_from(now).unwrap_or(i64::MAX);
        let from = to.saturating_sub(i64::try_from(window_ms).unwrap_or(i64::MAX));
        let stats = keepwire_client::analytics::stats(&lock(&self.store), from, to)?;
        Ok(stats.into())
    }

    /// A snapshot of the client's state.
    pub fn status(&self) -> Status {
        let running = lock(&self.inner).clone();
        match running {
            Some(c) => c.status().into(),
            None => {
                let store = lock(&self.store);
                Status {
                    state: crate::ConnectionState::Idle,
                    last_error: None,
                    user: store.meta("user").ok().flatten(),
                    cursor: store.cursor().ok().flatten().map(|c| c.seq),
                    outbox: store.outbox_counts().map(|(p, _)| p).unwrap_or(0),
                    holder: false,
                }
            }
        }
    }

    /// Waits until connected, at most `timeout_ms` (`Timeout`), or until the
    /// client stopped for good (`Stopped`).
    pub fn wait_connected(&self, timeout_ms: u64) -> Result<(), KeepwireError> {
        let client = self.running(AppState::Foreground)?;
        runtime()?.block_on(client.wait_connected(Duration::from_millis(timeout_ms)))?;
        Ok(())
    }

    /// Closes the connection and ends the callback thread (after the events
    /// already queued, waiting at most 1 s for them). Pending sends stay in
    /// the outbox. Further calls fail with `Closed`. Returns within about
    /// 3 s whatever the network does.
    pub fn close(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        self.stop_running();
        self.callbacks.stop();
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.close();
    }
}
