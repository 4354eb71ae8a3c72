//! `keepwire serve` and `keepwire admin`: the relay and its database.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use keepwire_server::store::{
    DbLock, LockMode, PostgresOptions, PostgresStore, Retention, RevokeTarget,
};
use keepwire_server::{Config, Metrics, RelayServer, SqliteOptions, SqliteStore, Store};

use crate::{init_logging, wait_for_signal};

#[derive(Args)]
pub(crate) struct DbArg {
    /// The relay database (SQLite) [default: <data dir>/keepwire/relay.db].
    #[arg(long, env = "KEEPWIRE_DB", global = true, conflicts_with = "store")]
    db: Option<PathBuf>,
    /// The store: `postgres://USER@HOST:PORT/DB` for PostgreSQL (several
    /// relays may share it), or a path (or `sqlite:PATH`) for SQLite.
    #[arg(long, env = "KEEPWIRE_STORE", global = true, value_name = "URL")]
    store: Option<String>,
}

/// Where the relay's data lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StoreLocation {
    /// An SQLite database file.
    Sqlite(PathBuf),
    /// A PostgreSQL database (its URL, which may hold a password).
    Postgres(String),
}

impl StoreLocation {
    /// For logs: the file, or the URL without its password.
    fn describe(&self) -> String {
        match self {
            StoreLocation::Sqlite(p) => p.display().to_string(),
            StoreLocation::Postgres(url) => redact_password(url),
        }
    }
}

/// `postgres://user:secret@host/db` without the secret.
fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    match rest[..authority_end].rsplit_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}{}", &rest[authority_end..])
        }
        _ => url.to_owned(),
    }
}

impl DbArg {
    pub(crate) fn location(&self) -> anyhow::Result<StoreLocation> {
        if let Some(s) = &self.store {
            if s.starts_with("postgres://") || s.starts_with("postgresql://") {
                return Ok(StoreLocation::Postgres(s.clone()));
            }
            if let Some((scheme, _)) = s.split_once("://")
                && scheme != "sqlite"
            {
                bail!(
                    "--store {scheme}:// is not a known store: use postgres://... or a file path"
                );
            }
            let path = s
                .strip_prefix("sqlite://")
                .or_else(|| s.strip_prefix("sqlite:"))
                .unwrap_or(s);
            if path.is_empty() {
                bail!("--store needs a PostgreSQL URL or a file path");
            }
            return Ok(StoreLocation::Sqlite(PathBuf::from(path)));
        }
        if let Some(p) = &self.db {
            return Ok(StoreLocation::Sqlite(p.clone()));
        }
        let dir = dirs::data_dir().context(
            "cannot find a data directory for the default database; pass --db PATH or --store URL",
        )?;
        Ok(StoreLocation::Sqlite(dir.join("keepwire").join("relay.db")))
    }
}

#[derive(Args)]
pub(crate) struct ServeArgs {
    /// A TOML file with any of these flags by name, without the dashes
    /// (`listen = "0.0.0.0:7447"`, `retention-age = "90d"`,
    /// `allow-origin = ["https://app.example"]`); flags given here and
    /// environment variables override it. See README, "Configuration file".
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:7447")]
    listen: SocketAddr,
    #[command(flatten)]
    db: DbArg,
    /// Largest frame accepted, in bytes.
    #[arg(long, value_name = "BYTES")]
    max_frame_bytes: Option<usize>,
    /// Largest message body, in bytes.
    #[arg(long, value_name = "BYTES")]
    max_body_bytes: Option<usize>,
    /// The largest credit window a client's `hello` may ask for (inbox
    /// entries beyond its last ack; 512 for clients that ask for none).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_window: Option<u64>,
    /// Sustained sends per second per connection.
    #[arg(long, value_name = "N")]
    sends_per_sec: Option<u32>,
    /// Burst of sends per connection above the sustained rate.
    #[arg(long, value_name = "N")]
    send_burst: Option<u32>,
    /// Sustained sends per second per user (all connections together).
    #[arg(long, value_name = "N")]
    user_sends_per_sec: Option<u32>,
    /// Time a connection has to send its hello (e.g. 10s).
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    handshake_timeout: Option<Duration>,
    /// Smallest heartbeat a client may negotiate (e.g. 5s).
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    min_heartbeat: Option<Duration>,
    /// Least slack before a silent connection is closed (e.g. 10s).
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    heartbeat_grace: Option<Duration>,
    /// Most connections per user.
    #[arg(long, value_name = "N")]
    max_connections_per_user: Option<usize>,
    /// Largest group.
    #[arg(long, value_name = "N")]
    max_group_size: Option<usize>,
    /// Who may put users into conversations: `members` (any member adds
    /// others, the default) or `backend` (only the backend's HTTP API; users
    /// can still leave).
    #[arg(long, value_name = "WHO")]
    member_adds: Option<keepwire_server::MemberAdds>,
    /// Push wake-ups (FCM, APNs, Web Push): the TOML configuration file
    /// (see README, "Push wake-ups").
    #[arg(long, value_name = "FILE")]
    push_config: Option<std::path::PathBuf>,
    /// A connection silent this long while entries wait counts as frozen
    /// and gets a push (default 5s).
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    push_frozen_after: Option<Duration>,
    /// The cross-node bus, when several relays share one store
    /// (`nats://HOST:PORT`): commits and device registrations are announced
    /// to the other nodes (see README, "Several relays").
    #[arg(long, value_name = "URL")]
    bus: Option<String>,
    /// The subject prefix the nodes of one cluster share.
    #[arg(long, value_name = "PREFIX", default_value = "keepwire")]
    bus_prefix: String,
    /// An unanswered push is sent again after this, doubling up to 6 h
    /// (default 10m).
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    push_rearm: Option<Duration>,
    /// Test-only: crash at a point of the push path (`before-call`,
    /// `after-delivered`), as `kill -9` would.
    #[arg(long, hide = true, value_name = "POINT")]
    push_failpoint: Option<TestFailpoint>,
    /// Inbox entries replayed to a new device.
    #[arg(long, value_name = "N")]
    history_window: Option<u64>,
    /// Trim messages older than this (e.g. 90d). Default: keep forever.
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    retention_age: Option<Duration>,
    /// Keep at most this many inbox entries per user. Default: unlimited.
    #[arg(long, value_name = "N")]
    retention_entries: Option<u64>,
    /// Accept app-issued HS256 JWTs signed with the secret in this file.
    #[arg(long, value_name = "PATH")]
    jwt_secret_file: Option<PathBuf>,
    /// Accept RS256/ES256 JWTs with keys from this JWKS URL (cached, refreshed
    /// on an unknown kid); https, or http to a loopback address only.
    #[arg(long, value_name = "URL", conflicts_with = "jwks_file")]
    jwks_url: Option<String>,
    /// Accept RS256/ES256 JWTs with keys from this JWKS file.
    #[arg(long, value_name = "PATH")]
    jwks_file: Option<PathBuf>,
    /// Required JWT audience (`aud`).
    #[arg(long)]
    jwt_audience: Option<String>,
    /// Required JWT issuer (`iss`).
    #[arg(long)]
    jwt_issuer: Option<String>,
    /// Clock skew allowed on JWT exp/nbf/iat.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    jwt_leeway: Duration,
    /// JWT claim naming the device (if present, it must match the hello's device).
    #[arg(long, default_value = "device")]
    jwt_device_claim: String,
    /// Least time between two JWKS fetches.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    jwks_refresh_floor: Duration,
    /// HTTP API requests per second per API key.
    #[arg(long, value_name = "N")]
    api_rate: Option<u32>,
    /// How often age retention runs (e.g. 1m).
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    trim_interval: Option<Duration>,
    /// Serve wss:// and https:// with this certificate chain (PEM, leaf first).
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// A browser origin allowed to open WebSockets (e.g. https://app.example);
    /// repeat for several. Default: any. Connections without Origin (native
    /// apps) are always allowed.
    #[arg(long = "allow-origin", value_name = "ORIGIN")]
    allowed_origins: Vec<String>,
    /// Time a connection has for its TLS handshake and HTTP request head.
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    request_head_timeout: Option<Duration>,
    /// Serve a WebSocket echo at /conformance/echo (Autobahn testing only).
    #[arg(long, hide = true)]
    conformance_echo: bool,
}

#[derive(Args)]
pub(crate) struct AdminArgs {
    #[command(flatten)]
    db: DbArg,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Create the relay database if it does not exist yet (`serve` also
    /// creates it). Every other admin command needs an existing database, so
    /// a mistyped --db fails instead of making a new, empty one.
    Init,
    /// Manage users.
    #[command(subcommand)]
    User(UserCommand),
    /// Manage tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Manage API keys of the HTTP API.
    #[command(subcommand, name = "api-key")]
    ApiKey(ApiKeyCommand),
    /// Manage devices.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Write a consistent copy of the database (safe while the relay runs).
    Backup {
        /// Destination file (must not exist).
        dest: PathBuf,
    },
    /// Replace the database with a backup and start a new epoch. Refused
    /// while a relay runs on the database (stop it first).
    Restore {
        /// The backup file.
        src: PathBuf,
    },
    /// Make a private CA and a relay certificate it signs (for wss:// without
    /// a public CA); run again on the same DIR to renew, keeping the CA.
    #[command(name = "tls-init")]
    TlsInit {
        /// Where to write ca.pem, ca.key, relay.pem and relay.key (made 0700).
        dir: PathBuf,
        /// A host name or IP address clients use to reach the relay; repeat for several.
        #[arg(long = "host", value_name = "NAME", required = true)]
        hosts: Vec<String>,
        /// How long the relay's certificate is valid, in days.
        #[arg(long, default_value_t = 825)]
        days: u32,
    },
}

#[derive(Subcommand)]
enum ApiKeyCommand {
    /// Create an API key and print it on one line (shown once).
    Create {
        /// A name to recognise it by.
        name: String,
    },
    /// List API keys (ids and names, never the keys).
    List,
    /// Revoke an API key by id.
    Revoke {
        /// Key id (from `api-key list`).
        id: i64,
    },
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// List a user's devices and their delivery positions.
    List {
        /// The user.
        user: String,
    },
    /// Revoke a device: its live connections close at once and it cannot reconnect.
    Revoke {
        /// The user.
        user: String,
        /// The device id.
        device: String,
    },
}

#[derive(Subcommand)]
enum UserCommand {
    /// List every user's name (one a line).
    List,
    /// Delete a user: their inbox, devices, tokens, push registrations and
    /// mutes go, they leave every conversation, and their live connections
    /// close (a running relay sees it within a second). Their messages
    /// already delivered stay in the other members' inboxes.
    Delete {
        /// The user.
        name: String,
    },
    /// Create a user and print a token for it on one line.
    Add {
        /// User name: 1-64 characters of [A-Za-z0-9_.@-].
        name: String,
        /// Token lifetime.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "90d")]
        ttl: Duration,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Issue another token for a user and print it on one line.
    Issue {
        /// The user.
        name: String,
        /// Token lifetime.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "90d")]
        ttl: Duration,
    },
    /// Revoke a token (by its value, or `--id`), or every token of `--user`.
    /// Live connections using it are closed at once.
    Revoke {
        /// The token itself; `-` reads it from standard input. Without TOKEN,
        /// --token-file, --id or --user: the KEEPWIRE_TOKEN environment variable.
        token: Option<String>,
        /// Read the token to revoke from this file (one line).
        #[arg(long, value_name = "FILE", conflicts_with_all = ["token", "id", "user"])]
        token_file: Option<PathBuf>,
        /// Token id (from `token list`).
        #[arg(long, conflicts_with_all = ["token", "user"])]
        id: Option<i64>,
        /// Revoke every token of this user.
        #[arg(long, conflicts_with = "token")]
        user: Option<String>,
    },
    /// List a user's tokens (ids and dates, never the secrets).
    List {
        /// The user.
        name: String,
    },
}

async fn open_store(
    at: &StoreLocation,
    retention: Retention,
    metrics: Option<Arc<Metrics>>,
) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match at {
        StoreLocation::Sqlite(path) => SqliteStore::open(
            path,
            SqliteOptions {
                retention,
                metrics,
                ..Default::default()
            },
        )
        .with_context(|| format!("cannot open the database {}", path.display()))?,
        StoreLocation::Postgres(url) => PostgresStore::open(
            url,
            PostgresOptions {
                retention,
                metrics,
                ..Default::default()
            },
        )
        .await
        .with_context(|| format!("cannot open the PostgreSQL store {}", at.describe()))?,
    })
}

/// Fails unless the database exists: only `serve` and `admin init` create
/// one (a mistyped --db would otherwise make a new, empty database and then
/// report that nobody is in it).
fn require_db(path: &std::path::Path) -> anyhow::Result<()> {
    if !path.is_file() {
        bail!(
            "there is no relay database at {} (check --db or KEEPWIRE_DB; `keepwire admin init` or `keepwire serve` creates one)",
            path.display()
        );
    }
    Ok(())
}

pub(crate) async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    init_logging("info")?;
    raise_open_file_limit();
    let mut config = Config {
        listen: args.listen,
        ..Config::default()
    };
    let l = &mut config.limits;
    if let Some(v) = args.max_frame_bytes {
        l.max_frame_bytes = v;
    }
    if let Some(v) = args.max_body_bytes {
        l.max_body_bytes = v;
    }
    if l.max_body_bytes + 512 > l.max_frame_bytes {
        bail!(
            "--max-body-bytes ({}) must be at least 512 bytes below --max-frame-bytes ({})",
            l.max_body_bytes,
            l.max_frame_bytes
        );
    }
    if let Some(v) = args.max_window {
        l.max_window = v;
    }
    if let Some(v) = args.sends_per_sec {
        l.sends_per_sec = v;
    }
    if let Some(v) = args.max_group_size {
        l.max_group_size = v.max(2);
    }
    if let Some(v) = args.send_burst {
        config.send_burst = v;
    }
    if let Some(v) = args.user_sends_per_sec {
        config.user_sends_per_sec = v;
        config.user_send_burst = v.saturating_mul(2);
    }
    if let Some(v) = args.handshake_timeout {
        config.handshake_timeout = v;
    }
    if let Some(v) = args.min_heartbeat {
        config.heartbeat_min = v;
    }
    if let Some(v) = args.heartbeat_grace {
        config.heartbeat_grace = v;
    }
    if let Some(v) = args.max_connections_per_user {
        config.max_connections_per_user = v.max(1);
    }
    if let Some(v) = args.history_window {
        config.history_window = v;
    }
    if let Some(v) = args.member_adds {
        config.member_adds = v;
    }
    config.push_config = args.push_config.clone();
    config.bus = args.bus.clone().map(|url| keepwire_server::bus::BusConfig {
        url,
        prefix: args.bus_prefix.clone(),
        refresh: Duration::from_secs(1),
    });
    if let Some(v) = args.push_frozen_after {
        config.push_settings.frozen_after = v;
    }
    config.push_settings.failpoint = args.push_failpoint.map(|f| match f {
        TestFailpoint::BeforeCall => keepwire_server::push::PushFailpoint::BeforeCall,
        TestFailpoint::AfterDelivered => keepwire_server::push::PushFailpoint::AfterDelivered,
    });
    if let Some(v) = args.push_rearm {
        config.push_settings.rearm = v.max(Duration::from_millis(100));
    }
    if let Some(v) = args.trim_interval {
        config.trim_interval = v.max(Duration::from_millis(10));
    }
    if let Some(v) = args.api_rate {
        config.api_requests_per_sec = v.max(1);
    }
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        config.tls = Some(keepwire_server::TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
        });
    }
    for o in &args.allowed_origins {
        if o != "*" && !(o.starts_with("https://") || o.starts_with("http://")) {
            bail!("--allow-origin {o:?}: give a scheme and host, e.g. https://app.example");
        }
    }
    config.allowed_origins = args.allowed_origins.clone();
    config.conformance_echo = args.conformance_echo;
    if let Some(v) = args.request_head_timeout {
        config.request_head_timeout = v.max(Duration::from_millis(100));
    }
    let hs256_secret = match &args.jwt_secret_file {
        Some(p) => {
            let s = std::fs::read(p)
                .with_context(|| format!("cannot read the JWT secret file {}", p.display()))?;
            let s = String::from_utf8_lossy(&s).trim().as_bytes().to_vec();
            if s.len() < 32 {
                bail!("the JWT secret in {} is shorter than 32 bytes", p.display());
            }
            Some(s)
        }
        None => None,
    };
    let jwks = match (&args.jwks_url, &args.jwks_file) {
        (Some(u), _) => {
            if let Err(e) = keepwire_server::auth::check_jwks_url(u) {
                bail!("--jwks-url {e}");
            }
            Some(keepwire_server::auth::JwksSource::Url(u.clone()))
        }
        (None, Some(p)) => Some(keepwire_server::auth::JwksSource::File(p.clone())),
        (None, None) => None,
    };
    if hs256_secret.is_some() || jwks.is_some() {
        config.jwt = Some(keepwire_server::auth::JwtConfig {
            hs256_secret,
            jwks,
            audience: args.jwt_audience.clone(),
            issuer: args.jwt_issuer.clone(),
            leeway: args.jwt_leeway,
            device_claim: args.jwt_device_claim.clone(),
            jwks_refresh_floor: args.jwks_refresh_floor,
            ..Default::default()
        });
    }
    let at = args.db.location()?;
    // Held until the relay exits: `admin restore` is refused meanwhile, and
    // so is a second relay on this file unless both run with a bus.
    let mode = if args.bus.is_some() {
        LockMode::Shared
    } else {
        LockMode::Exclusive
    };
    let _lock = match &at {
        StoreLocation::Sqlite(path) => Some(lock_db(path, mode)?),
        // PostgreSQL has its own locking; nodes share it by design.
        StoreLocation::Postgres(_) => None,
    };
    let metrics = Arc::new(Metrics::default());
    let retention = Retention {
        max_age: args.retention_age,
        max_entries: args.retention_entries,
        dedupe_age: None,
    };
    let store = open_store(&at, retention, Some(metrics.clone())).await?;
    let server = RelayServer::start(config, store, metrics)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    // Scripts read the first line of stdout to find the relay.
    println!("{}", server.url());
    tracing::info!(target: "keepwire::server", store = %at.describe(), "serving");
    wait_for_signal().await?;
    tracing::info!(target: "keepwire::server", "shutting down");
    server.shutdown();
    server.wait().await;
    Ok(())
}

/// Takes the relay's lock on its SQLite database, with a message that says
/// who holds it when it cannot.
fn lock_db(path: &std::path::Path, mode: LockMode) -> anyhow::Result<DbLock> {
    DbLock::acquire(path, mode).map_err(|e| match (e, mode) {
        (keepwire_server::StoreError::Conflict(_), LockMode::Exclusive) => anyhow::anyhow!(
            "the database {} is in use by another relay (it holds {}); stop it, or run every node with --bus",
            path.display(),
            keepwire_server::store::lock_path(path).display()
        ),
        (keepwire_server::StoreError::Conflict(_), LockMode::Shared) => anyhow::anyhow!(
            "the database {} is in use by a relay without --bus or by a restore (it holds {})",
            path.display(),
            keepwire_server::store::lock_path(path).display()
        ),
        (e, _) => e.into(),
    })
}

pub(crate) async fn admin(args: AdminArgs) -> anyhow::Result<()> {
    if let AdminCommand::TlsInit { dir, hosts, days } = &args.command {
        return tls_init(dir, hosts, *days);
    }
    let at = args.db.location()?;
    if let AdminCommand::Init = args.command {
        if let StoreLocation::Sqlite(path) = &at
            && path.is_file()
        {
            println!("a database already exists at {}", path.display());
            return Ok(());
        }
        // Opening creates the SQLite file, or the PostgreSQL tables.
        let store = open_store(&at, Retention::default(), None).await?;
        store.close().await;
        match &at {
            StoreLocation::Sqlite(path) => println!("created {}", path.display()),
            StoreLocation::Postgres(_) => println!("ready: {}", at.describe()),
        }
        return Ok(());
    }
    let sqlite_path = match (&at, &args.command) {
        (StoreLocation::Sqlite(p), _) => Some(p.clone()),
        (
            StoreLocation::Postgres(_),
            AdminCommand::Backup { .. } | AdminCommand::Restore { .. },
        ) => {
            bail!(
                "backup and restore are for the SQLite store; back up PostgreSQL with its own \
                 tools (pg_dump, or base backups with WAL archiving)"
            )
        }
        (StoreLocation::Postgres(_), _) => None,
    };
    // Audit: every command below works on an existing database. Backup only
    // reads it, and the others write through the store's own locking, which
    // is safe beside a running relay; only restore replaces the file, and it
    // takes the relay's lock (refused while a relay runs).
    if let Some(path) = &sqlite_path {
        require_db(path)?;
    }
    match args.command {
        AdminCommand::Backup { dest } => {
            let path = sqlite_path.context("backup needs an SQLite database")?;
            SqliteStore::backup(&path, &dest)?;
            println!("{}", dest.display());
            return Ok(());
        }
        AdminCommand::Restore { src } => {
            let path = sqlite_path.context("restore needs an SQLite database")?;
            if !src.exists() {
                bail!("there is no backup at {}", src.display());
            }
            let epoch = SqliteStore::restore(&src, &path)?;
            println!(
                "restored {} into {} (new epoch {epoch})",
                src.display(),
                path.display()
            );
            return Ok(());
        }
        _ => {}
    }
    let store = open_store(&at, Retention::default(), None).await?;
    let result = admin_store(&*store, args.command).await;
    store.close().await;
    result
}

async fn admin_store(store: &dyn Store, command: AdminCommand) -> anyhow::Result<()> {
    match command {
        AdminCommand::User(UserCommand::Add { name, ttl }) => {
            store.create_user(&name).await?;
            let t = store.issue_token(&name, ttl).await?;
            println!("{}", t.token);
        }
        AdminCommand::User(UserCommand::List) => {
            for name in store.list_users().await? {
                println!("{name}");
            }
        }
        AdminCommand::User(UserCommand::Delete { name }) => {
            let gone = store.delete_user(&name).await?;
            let plural =
                |n: u64, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
            println!(
                "deleted {}: left {}, removed {}; their messages stay with the other members",
                gone.user,
                plural(gone.conversations, "conversation"),
                plural(gone.devices, "device"),
            );
        }
        AdminCommand::Token(TokenCommand::Issue { name, ttl }) => {
            let t = store.issue_token(&name, ttl).await?;
            println!("{}", t.token);
        }
        AdminCommand::Token(TokenCommand::Revoke {
            token,
            token_file,
            id,
            user,
        }) => {
            let token = match (&id, &user) {
                (None, None) => crate::token_input::token(token.as_deref(), token_file.as_deref())?,
                _ => None,
            };
            let target = match (token, id, user) {
                (Some(t), None, None) => RevokeTarget::Token(t),
                (None, Some(id), None) => RevokeTarget::Id(id),
                (None, None, Some(u)) => RevokeTarget::User(u),
                _ => bail!(
                    "name what to revoke: a TOKEN (or {}), --id ID or --user NAME",
                    crate::token_input::HOW
                ),
            };
            let n = store.revoke(target).await?;
            println!("revoked {n} token{}", if n == 1 { "" } else { "s" });
        }
        AdminCommand::Token(TokenCommand::List { name }) => {
            println!("{:>6}  {:<24}  {:<24}  status", "id", "created", "expires");
            let now = std::time::SystemTime::now();
            for t in store.list_tokens(&name).await? {
                let expires =
                    std::time::UNIX_EPOCH + Duration::from_millis(t.expires_at_ms.max(0) as u64);
                let status = if t.revoked_at_ms.is_some() {
                    "revoked"
                } else if expires <= now {
                    "expired"
                } else {
                    "active"
                };
                println!(
                    "{:>6}  {:<24}  {:<24}  {status}",
                    t.id,
                    fmt_ms(t.created_at_ms),
                    fmt_ms(t.expires_at_ms)
                );
            }
        }
        AdminCommand::ApiKey(ApiKeyCommand::Create { name }) => {
            let (_, key) = store.create_api_key(&name).await?;
            println!("{key}");
        }
        AdminCommand::ApiKey(ApiKeyCommand::List) => {
            println!("{:>6}  {:<24}  {:<8}  name", "id", "created", "status");
            for k in store.list_api_keys().await? {
                let status = if k.revoked_at_ms.is_some() {
                    "revoked"
                } else {
                    "active"
                };
                println!(
                    "{:>6}  {:<24}  {status:<8}  {}",
                    k.id,
                    fmt_ms(k.created_at_ms),
                    k.name
                );
            }
        }
        AdminCommand::ApiKey(ApiKeyCommand::Revoke { id }) => {
            if !store.revoke_api_key(id).await? {
                bail!("no active API key with id {id}");
            }
            println!("revoked API key {id}");
        }
        AdminCommand::Device(DeviceCommand::List { user }) => {
            println!(
                "{:<24}  {:<24}  {:>10}  status",
                "device", "last seen", "acked"
            );
            for d in store.list_devices(&user).await? {
                let status = if d.revoked_at_ms.is_some() {
                    "revoked"
                } else {
                    "active"
                };
                println!(
                    "{:<24}  {:<24}  {:>10}  {status}",
                    d.device,
                    fmt_ms(d.last_seen_ms),
                    d.acked_seq
                );
            }
        }
        AdminCommand::Device(DeviceCommand::Revoke { user, device }) => {
            let done = store.revoke_device(&user, &device).await?;
            println!("{}", if done { "revoked" } else { "already revoked" });
        }
        AdminCommand::Init
        | AdminCommand::Backup { .. }
        | AdminCommand::Restore { .. }
        | AdminCommand::TlsInit { .. } => {
            bail!("init, backup, restore and tls-init do not open the store")
        }
    }
    Ok(())
}

/// `keepwire admin tls-init`: writes the files and says how to use them.
fn tls_init(dir: &std::path::Path, hosts: &[String], days: u32) -> anyhow::Result<()> {
    let w = crate::tls_init::tls_init(dir, hosts, days)?;
    let abs = |p: &std::path::Path| {
        std::fs::canonicalize(p)
            .unwrap_or_else(|_| p.to_owned())
            .display()
            .to_string()
    };
    let host = match hosts[0].parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(ip)) => format!("[{ip}]"),
        _ => hosts[0].clone(),
    };
    println!(
        "{} a certificate for {} (valid {days} days), signed by the private CA in {}",
        if w.reused_ca { "renewed" } else { "made" },
        hosts.join(", "),
        abs(dir)
    );
    println!(
        "relay:   keepwire serve --listen 0.0.0.0:7447 --tls-cert {} --tls-key {}",
        abs(&w.cert),
        abs(&w.key)
    );
    println!(
        "clients: keepwire login --server wss://{host}:7447 --ca-cert {} --token-file FILE",
        abs(&w.ca_pem)
    );
    println!(
        "Copy ca.pem to the clients; keep ca.key secret (whoever holds it can impersonate the relay to them)."
    );
    Ok(())
}

fn fmt_ms(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A relay holds one file per connection: raise the soft limit on open files
/// to the hard limit (the kernel's default soft limit is often 1024).
pub(crate) fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::warn!(target: "keepwire::server", error = %e, soft, hard, "cannot raise the open-file limit");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(db: Option<&str>, store: Option<&str>) -> anyhow::Result<StoreLocation> {
        DbArg {
            db: db.map(PathBuf::from),
            store: store.map(str::to_owned),
        }
        .location()
    }

    #[test]
    fn store_urls_pick_the_backend() {
        let pg = "postgres://kw@db:5432/kw";
        assert_eq!(
            at(None, Some(pg)).unwrap(),
            StoreLocation::Postgres(pg.into())
        );
        assert!(matches!(
            at(None, Some("postgresql://kw@db/kw")).unwrap(),
            StoreLocation::Postgres(_)
        ));
        for s in ["/tmp/r.db", "sqlite:/tmp/r.db", "sqlite:///tmp/r.db"] {
            assert_eq!(
                at(None, Some(s)).unwrap(),
                StoreLocation::Sqlite("/tmp/r.db".into()),
                "{s}"
            );
        }
        assert_eq!(
            at(Some("/tmp/x.db"), None).unwrap(),
            StoreLocation::Sqlite("/tmp/x.db".into())
        );
        assert!(at(None, Some("mysql://db/kw")).is_err());
        assert!(at(None, Some("sqlite:")).is_err());
    }

    #[test]
    fn passwords_stay_out_of_logs() {
        assert_eq!(
            redact_password("postgres://kw:s3cret@db:5432/kw?sslmode=disable"),
            "postgres://kw:***@db:5432/kw?sslmode=disable"
        );
        assert_eq!(
            redact_password("postgres://kw@db/kw"),
            "postgres://kw@db/kw"
        );
        assert_eq!(
            StoreLocation::Postgres("postgres://a:b@h/d".into()).describe(),
            "postgres://a:***@h/d"
        );
    }
}

/// The push path's crash points (hidden `--push-failpoint`, for tests).
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum TestFailpoint {
    /// After the push is recorded, before the provider hears of it.
    BeforeCall,
    /// After the provider's 2xx, before the outcome is recorded.
    AfterDelivered,
}
