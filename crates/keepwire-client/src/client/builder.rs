//! How a [`Client`] is made: settings, the token provider, the supervisor's start.

use super::*;

/// Asked for a new token when the relay rejects or expires the current one.
pub trait TokenProvider: Send + Sync + 'static {
    /// A fresh token, or `None` if there is none (the client then stops).
    fn refresh(&self) -> BoxFuture<'_, Option<String>>;
}

/// The default provider: the token saved in the home, if it changed (another
/// process logged in again).
pub(super) struct StoredToken {
    pub(super) home: PathBuf,
    pub(super) current: Mutex<String>,
}

impl TokenProvider for StoredToken {
    fn refresh(&self) -> BoxFuture<'_, Option<String>> {
        Box::pin(async move {
            let saved = Store::open(&self.home).ok()?.token().ok()??;
            let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
            if *cur == saved {
                None
            } else {
                *cur = saved.clone();
                Some(saved)
            }
        })
    }
}

/// The network id until the app reports one with [`Client::set_network`].
pub const DEFAULT_NETWORK: &str = "default";

/// A function adjusting the connection settings.
pub(super) type Configure = Box<dyn FnOnce(&mut Config) + Send>;

/// Builds a [`Client`] for one home directory.
pub struct ClientBuilder {
    pub(super) home: PathBuf,
    pub(super) urls: Option<Vec<String>>,
    pub(super) token: Option<String>,
    pub(super) resolver: Arc<dyn Resolver>,
    pub(super) resolve_timeout: Duration,
    pub(super) token_provider: Option<Arc<dyn TokenProvider>>,
    pub(super) extra_roots: Vec<Vec<u8>>,
    pub(super) configure: Option<Configure>,
    pub(super) app_state: AppState,
    pub(super) start: bool,
    pub(super) notifier: Option<Arc<dyn Notifier>>,
    pub(super) background_policy: Option<BackgroundPolicy>,
    pub(super) token_elsewhere: bool,
}

impl ClientBuilder {
    /// Shows notifications for messages that arrive while the app is not in
    /// the foreground.
    pub fn notifier(mut self, n: Arc<dyn Notifier>) -> Self {
        self.notifier = Some(n);
        self
    }

    /// The background policy (default: the user's preference, else linger 60 s).
    pub fn background_policy(mut self, p: BackgroundPolicy) -> Self {
        self.background_policy = Some(p);
        self
    }
    /// Relay URLs to use instead of the saved ones.
    pub fn servers(mut self, urls: Vec<String>) -> Self {
        self.urls = Some(urls);
        self
    }

    /// A token to use instead of the saved one.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Name resolution (default: the OS resolver).
    pub fn resolver(mut self, r: Arc<dyn Resolver>) -> Self {
        self.resolver = r;
        self
    }

    /// How long one name resolution may take (default 5 s).
    pub fn resolve_timeout(mut self, t: Duration) -> Self {
        self.resolve_timeout = t;
        self
    }

    /// Where fresh tokens come from (default: the token saved in the home).
    pub fn token_provider(mut self, p: Arc<dyn TokenProvider>) -> Self {
        self.token_provider = Some(p);
        self
    }

    /// Trusts an extra root certificate (DER) for `wss://`, besides the system's.
    pub fn add_root_certificate(mut self, der: Vec<u8>) -> Self {
        self.extra_roots.push(der);
        self
    }

    /// Adjusts the connection settings (backoff, heartbeat, timeouts).
    pub fn configure(mut self, f: impl FnOnce(&mut Config) + Send + 'static) -> Self {
        self.configure = Some(Box::new(f));
        self
    }

    /// The app state at start (default foreground).
    pub fn app_state(mut self, s: AppState) -> Self {
        self.app_state = s;
        self
    }

    /// Do not connect until [`Client::start`] (default: connect at once).
    pub fn manual_start(mut self) -> Self {
        self.start = false;
        self
    }

    /// The token lives outside the home (a desktop keyring): give it with
    /// [`ClientBuilder::token`] and fresh ones through
    /// [`ClientBuilder::token_provider`]; a refreshed token is then not
    /// written into the home's database.
    pub fn token_kept_elsewhere(mut self) -> Self {
        self.token_elsewhere = true;
        self
    }

    /// Opens the home and starts the client (inside a tokio runtime).
    pub async fn build(self) -> Result<Client, ClientError> {
        let store = Store::open(&self.home)?;
        let urls = match self.urls {
            Some(u) => u,
            None => store.urls()?,
        };
        let token = match self.token {
            Some(t) => Some(t),
            None => store.token()?,
        };
        let (Some(token), false) = (token, urls.is_empty()) else {
            return Err(ClientError::NotLoggedIn(self.home.clone()));
        };
        for u in &urls {
            if !(u.starts_with("ws://") || u.starts_with("wss://")) {
                return Err(ClientError::BadUrl(u.clone()));
            }
        }
        let device = store.device_id()?;
        let urls_len = u32::try_from(urls.len()).unwrap_or(u32::MAX);
        let mut config = Config::new(device, urls);
        if let Some(p) = self
            .background_policy
            .or(store.prefs()?.background_policy())
        {
            config.background_policy = p;
        }
        if let Some(f) = self.configure {
            f(&mut config);
        }
        // Roots saved with the login (`keepwire login --ca-cert`) serve every
        // process on this home.
        let mut roots = self.extra_roots;
        if let Some(pem) = store.meta(CA_META)? {
            roots.extend(parse_pem_certificates(pem.as_bytes()).map_err(ClientError::Tls)?);
        }
        let tls = transport::tls_config(&roots).map_err(|e| ClientError::Tls(e.to_string()))?;
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (events, _) = broadcast::channel(4096);
        let (counts_pending, _) = store.outbox_counts()?;
        let status = Arc::new(Mutex::new(Status {
            state: State::Idle,
            last_error: None,
            cursor: store.cursor()?.map(|c| c.seq),
            head: None,
            outbox: counts_pending,
            holder: false,
            user: store.meta("user")?,
            backfilling: 0,
            received: 0,
            confirmed: 0,
            notified: 0,
            sessions: 0,
            heads_heard: 0,
            plain_failures: 0,
            relays: urls_len,
            requests: 0,
            network: Some(DEFAULT_NETWORK.into()),
        }));
        let (status_tx, _) = watch::channel(());
        let inner = Arc::new(Inner {
            home: self.home.clone(),
            store: Mutex::new(store),
            cmd: cmd_tx,
            events: events.clone(),
            status: status.clone(),
            status_changed: status_tx,
            waiters: Arc::new(Mutex::new(HashMap::new())),
            holder: Arc::new(AtomicBool::new(false)),
            sync_gate: tokio::sync::Mutex::new(()),
            push: Mutex::new(None),
            token_elsewhere: self.token_elsewhere,
        });
        let provider = self.token_provider.unwrap_or_else(|| {
            Arc::new(StoredToken {
                home: self.home.clone(),
                current: Mutex::new(token.clone()),
            })
        });
        let supervisor = Supervisor {
            inner: inner.clone(),
            config,
            token,
            resolver: Arc::new(CachingResolver::new(self.resolver, self.resolve_timeout)),
            tls,
            provider,
            app_state: self.app_state,
            network: Network::Online(DEFAULT_NETWORK.into()),
            started: self.start,
            notifier: self.notifier,
        };
        tokio::spawn(supervisor.run(cmd_rx));
        Ok(Client { inner })
    }
}
