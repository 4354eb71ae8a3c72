//! Client commands: one device "home" directory each (`--home` or `KEEPWIRE_HOME`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use futures_util::StreamExt as _;
use keepwire_client::notify::{CommandNotifier, Notifier};
use keepwire_client::store::Store;
use keepwire_client::{
    AppState, BackgroundPolicy, BoxFuture, Client, ClientError, ClientEvent, ConnectionError,
    State, StopReason, SyncOutcome, TokenProvider,
};
use keepwire_proto::Message;

use crate::terminal::{counted, printable};
use crate::{Exit, init_logging, wait_for_signal};

/// `keepwire sync` exit codes (also in the README). 0: caught up; 1: other
/// errors; 2: usage errors.
pub(crate) mod exit {
    /// The deadline passed before everything was done; what was done stays done.
    pub const PARTIAL: u8 = 3;
    /// The relay could not be reached (no network, DNS, refused, timeout).
    pub const UNREACHABLE: u8 = 4;
    /// The token was rejected or revoked: log in again.
    pub const AUTH_REJECTED: u8 = 5;
}

#[derive(Args, Clone)]
pub(crate) struct HomeArg {
    /// The device home directory [default: <data dir>/keepwire/home].
    #[arg(long, env = "KEEPWIRE_HOME", global = true)]
    home: Option<PathBuf>,
}

impl HomeArg {
    pub(crate) fn path(&self) -> anyhow::Result<PathBuf> {
        if let Some(h) = &self.home {
            return Ok(h.clone());
        }
        let dir = dirs::data_dir()
            .context("cannot find a data directory for the default home; pass --home DIR")?;
        Ok(dir.join("keepwire").join("home"))
    }
}

#[derive(Args)]
pub(crate) struct LoginArgs {
    #[command(flatten)]
    home: HomeArg,
    /// Relay URL (ws://HOST:PORT or wss://HOST:PORT); repeat for several relays.
    #[arg(long = "server", required = true, value_name = "URL")]
    servers: Vec<String>,
    /// The token (from `keepwire admin user add` or your app's backend); `-`
    /// reads it from standard input. Other local users can read command
    /// lines: prefer `--token-file`, `--token -` or KEEPWIRE_TOKEN.
    #[arg(long, value_name = "TOKEN")]
    token: Option<String>,
    /// Read the token from this file (one line).
    #[arg(long, value_name = "FILE", conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// How long to try to verify the token with the relay. A refused
    /// connection, a name that does not resolve or a TLS failure ends the
    /// check at once.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    timeout: Duration,
    /// Save the URL and token without checking them with the relay (for a
    /// device set up offline). Without it, a login that cannot check the
    /// token saves nothing and exits with the `sync` exit codes (4: the
    /// relay could not be reached, 5: the token was refused).
    #[arg(long)]
    no_check: bool,
    /// Also trust the root certificate(s) in this PEM file for wss:// (a
    /// private CA); saved for every command on this home.
    #[arg(long, value_name = "PEM")]
    ca_cert: Option<std::path::PathBuf>,
    /// Where to keep the token: the desktop keyring (Secret Service), the
    /// home's database file (mode 0600), or auto: the keyring when the
    /// session has one, else the file.
    #[arg(long, value_enum, env = "KEEPWIRE_TOKEN_STORE", default_value = "auto")]
    token_store: crate::token_store::Mode,
}

#[derive(Args)]
pub(crate) struct ConvArgs {
    #[command(flatten)]
    home: HomeArg,
    #[command(subcommand)]
    command: ConvCommand,
}

#[derive(Subcommand)]
enum ConvCommand {
    /// Create a conversation with these users and print its id.
    Create {
        /// Other members.
        #[arg(required = true)]
        users: Vec<String>,
        /// Display name.
        #[arg(long)]
        name: Option<String>,
        /// A group even with one other user (default: direct for one user).
        #[arg(long)]
        group: bool,
        /// How long to wait for the relay.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
        timeout: Duration,
    },
    /// List your conversations.
    List {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Only what the local store knows (no connection).
        #[arg(long)]
        offline: bool,
        /// How long to wait for the relay.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
        timeout: Duration,
    },
}

#[derive(Args)]
pub(crate) struct SendArgs {
    #[command(flatten)]
    home: HomeArg,
    /// Conversation id.
    conv: u64,
    /// The message.
    text: String,
    /// How long to wait for the relay's confirmation (0 = do not wait); a
    /// refused connection or an unresolved name says "queued" at once.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    timeout: Duration,
}

/// How to show notifications (`sync`, `tail`).
#[derive(Args)]
pub(crate) struct NotifyArgs {
    /// Run this command for each notification (JSON on stdin); default: the
    /// `notify-command` preference.
    #[arg(long, value_name = "CMD")]
    pub(crate) notify_command: Option<String>,
    /// Show desktop notifications (D-Bus); default: the `desktop` preference.
    #[arg(long)]
    pub(crate) desktop: bool,
}

#[derive(Args)]
pub(crate) struct SyncArgs {
    #[command(flatten)]
    home: HomeArg,
    #[command(flatten)]
    notify: NotifyArgs,
    /// Give up (keeping what was done) after this long. It exits 4 sooner
    /// when the relay is plainly unreachable: 3 connection attempts in a
    /// row per relay URL refused or unresolved, with no session opened
    /// (other faults are retried until the deadline).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    deadline: Duration,
}

#[derive(Args)]
pub(crate) struct LogArgs {
    #[command(flatten)]
    home: HomeArg,
    /// Only this conversation.
    conv: Option<u64>,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
    /// At most this many (the most recent).
    #[arg(long, default_value_t = 1000)]
    limit: usize,
}

#[derive(Args)]
pub(crate) struct TailArgs {
    #[command(flatten)]
    home: HomeArg,
    #[command(flatten)]
    notify: NotifyArgs,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
    /// Also print the signals (typing, presence) other members send, as
    /// they arrive, while this process holds the connection (with --json:
    /// `{"signal":{"conv":..,"from":..,"data":..}}`).
    #[arg(long)]
    signals: bool,
}

#[derive(Args)]
pub(crate) struct StatusArgs {
    #[command(flatten)]
    home: HomeArg,
    /// As one JSON object.
    #[arg(long)]
    json: bool,
}

pub(crate) fn open_existing(home: &std::path::Path) -> anyhow::Result<Store> {
    if !keepwire_client::Home::new(home).database().exists() {
        bail!(
            "{} is not a keepwire home yet; run `keepwire login --server URL --token-file FILE` first",
            home.display()
        );
    }
    Ok(Store::open(home)?)
}

pub(crate) async fn open_client(home: &std::path::Path, start: bool) -> anyhow::Result<Client> {
    init_logging("warn")?;
    let store = open_existing(home)?;
    let mut b = crate::token_store::apply(Client::builder(home), &store, home).await?;
    drop(store);
    if !start {
        b = b.manual_start();
    }
    b.build().await.map_err(|e| login_hint(home, e))
}

/// A client for this home in the background with `policy` and `notify`.
pub(crate) async fn background_client(
    home: &std::path::Path,
    policy: BackgroundPolicy,
    notify: Option<Arc<dyn Notifier>>,
) -> anyhow::Result<Client> {
    init_logging("warn")?;
    let store = open_existing(home)?;
    let mut b = crate::token_store::apply(Client::builder(home), &store, home)
        .await?
        .app_state(AppState::Background)
        .background_policy(policy);
    drop(store);
    if let Some(n) = notify {
        b = b.notifier(n);
    }
    b.build().await.map_err(|e| login_hint(home, e))
}

/// Says what to do when a home has no login.
fn login_hint(home: &std::path::Path, e: ClientError) -> anyhow::Error {
    match e {
        ClientError::NotLoggedIn(_) => anyhow::anyhow!(
            "{} has no relay URL or token; run `keepwire login --server URL --token-file FILE`",
            home.display()
        ),
        other => other.into(),
    }
}

fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::NoNetwork => "no network (the relay's name did not resolve)".into(),
        ConnectionError::Refused => "connection refused (is the relay running?)".into(),
        ConnectionError::Tls => "TLS failure (certificate not trusted?)".into(),
        ConnectionError::Timeout => "the relay did not answer in time".into(),
        ConnectionError::HttpStatus(s) => {
            format!("the relay answered HTTP {s} instead of a WebSocket upgrade")
        }
        ConnectionError::Io => "the connection failed or dropped".into(),
        ConnectionError::Closed(c) => match keepwire_proto::CloseCode::from_code(*c) {
            Some(code) => format!("the relay closed the connection: {code}"),
            None => format!("the relay closed the connection with code {c}"),
        },
        ConnectionError::HeartbeatTimeout => "the connection went silent".into(),
        ConnectionError::Protocol(m) => format!("protocol error: {m}"),
        other => format!("{other:?}"),
    }
}

pub(crate) fn stopped_message(r: StopReason) -> String {
    match r {
        StopReason::AuthRejected => {
            "the relay rejected the token (unknown, expired, or for another relay); run `keepwire login --server URL --token-file FILE` with a valid token".into()
        }
        StopReason::TokenRevoked => {
            "the token was revoked on the relay (an admin or your backend withdrew it); get a new one and run `keepwire login --server URL --token-file FILE`".into()
        }
        StopReason::DeviceRevoked => {
            "this device was revoked on the relay; it cannot connect again (log in from a new home)".into()
        }
        StopReason::Replaced => "another connection of this device took over".into(),
        other => format!("stopped: {other:?}"),
    }
}

/// A connection problem as the store records it (`Debug` of
/// [`ConnectionError`], e.g. `Closed(4003)`): in words, and its numeric code
/// (close code or HTTP status) if it has one.
fn error_words(raw: &str) -> (String, Option<u16>) {
    let num = |prefix: &str| {
        raw.strip_prefix(prefix)
            .and_then(|r| r.strip_suffix(')'))
            .and_then(|n| n.parse::<u16>().ok())
    };
    let e = match raw {
        "NoNetwork" => ConnectionError::NoNetwork,
        "Refused" => ConnectionError::Refused,
        "Tls" => ConnectionError::Tls,
        "Timeout" => ConnectionError::Timeout,
        "Io" => ConnectionError::Io,
        "HeartbeatTimeout" => ConnectionError::HeartbeatTimeout,
        _ => {
            if let Some(c) = num("Closed(") {
                ConnectionError::Closed(c)
            } else if let Some(c) = num("HttpStatus(") {
                ConnectionError::HttpStatus(c)
            } else {
                return (raw.to_owned(), None);
            }
        }
    };
    let code = match e {
        ConnectionError::Closed(c) | ConnectionError::HttpStatus(c) => Some(c),
        _ => None,
    };
    (describe(&e), code)
}

/// A connection state as the store or the agent records it
/// ([`State::name`], e.g. `Stopped(TokenRevoked)`), in words.
fn state_words(raw: &str) -> String {
    match State::from_name(raw) {
        Some(State::Idle) => "idle".into(),
        Some(State::WaitingForNetwork) => "waiting for a network".into(),
        Some(State::Connecting) => "connecting".into(),
        Some(State::Handshaking) => "connecting (handshake)".into(),
        Some(State::Connected) => "connected".into(),
        Some(State::BackingOff) => "waiting to reconnect".into(),
        Some(State::RefreshingToken) => "asking for a new token".into(),
        Some(State::Dormant) => "dormant (connects for a sync or a push)".into(),
        Some(State::Stopped(StopReason::ClosedByApp)) => "stopped".into(),
        Some(State::Stopped(r)) => format!("stopped: {}", stopped_message(r)),
        None => raw.to_owned(),
    }
}

/// "Cannot reach the relay", with the last connection problem.
fn unreachable_exit(s: &keepwire_client::Status) -> Exit {
    let why = s
        .last_error
        .as_ref()
        .map(describe)
        .unwrap_or_else(|| "no answer".into());
    Exit {
        code: exit::UNREACHABLE,
        message: format!("cannot reach the relay: {why}"),
    }
}

/// Turns a failed wait into a human error with the right exit code.
fn connect_failure(client: &Client, e: ClientError) -> anyhow::Error {
    match e {
        ClientError::Stopped(r) => Exit {
            code: exit::AUTH_REJECTED,
            message: stopped_message(r),
        }
        .into(),
        ClientError::Timeout => {
            let s = client.status();
            if !s.holder {
                return anyhow::anyhow!(
                    "another keepwire process holds this home's connection; stop it or use that process"
                );
            }
            unreachable_exit(&s).into()
        }
        other => other.into(),
    }
}

/// A token provider that never has a new token (for verifying a login).
struct NoRefresh;

impl TokenProvider for NoRefresh {
    fn refresh(&self) -> BoxFuture<'_, Option<String>> {
        Box::pin(async { None })
    }
}

pub(crate) async fn login(args: LoginArgs) -> anyhow::Result<()> {
    init_logging("warn")?;
    let home = args.home.path()?;
    for u in &args.servers {
        if !(u.starts_with("ws://") || u.starts_with("wss://")) {
            bail!("invalid relay URL {u:?}: use ws://HOST:PORT or wss://HOST:PORT");
        }
    }
    let token = crate::token_input::required(args.token.as_deref(), args.token_file.as_deref())?;
    let store = Store::open(&home)?;
    if let Some(path) = &args.ca_cert {
        let pem = std::fs::read(path)
            .with_context(|| format!("cannot read the CA certificate {}", path.display()))?;
        keepwire_client::parse_pem_certificates(&pem)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        store.set_meta(keepwire_client::CA_META, &String::from_utf8_lossy(&pem))?;
    }
    let device = store.device_id()?;
    if args.no_check {
        let kept = crate::token_store::save(&store, &home, &args.servers, &token, args.token_store)
            .await?;
        println!(
            "saved (device {device}) for {}; the token was not checked",
            args.servers.join(", ")
        );
        println!("token kept {}", kept.words());
        return Ok(());
    }
    let client = Client::builder(&home)
        .servers(args.servers.clone())
        .token(token.clone())
        .token_provider(Arc::new(NoRefresh))
        .build()
        .await?;
    // Connected, or known not to be possible now: refused or unresolved at
    // every relay, or a TLS failure (retrying does not fix a certificate).
    let checked = client
        .wait_for(args.timeout, |s| {
            s.state == State::Connected
                || s.plainly_unreachable(1)
                || s.last_error == Some(ConnectionError::Tls)
        })
        .await;
    let connected = match checked {
        Ok(s) if s.state == State::Connected => Ok(()),
        Ok(_) => Err(ClientError::Timeout),
        Err(e) => Err(e),
    };
    match connected {
        Ok(()) => {
            let kept =
                crate::token_store::save(&store, &home, &args.servers, &token, args.token_store)
                    .await;
            let Ok(kept) = kept else {
                client.stop().await;
                return kept.map(|_| ());
            };
            // Store what is waiting (up to a moment), so the cursor starts here.
            let _ = client
                .wait_for(Duration::from_secs(2), |s| s.caught_up())
                .await;
            let user = client.status().user.unwrap_or_default();
            client.stop().await;
            println!(
                "logged in as {user} (device {device}) at {}",
                args.servers.join(", ")
            );
            println!("token kept {}", kept.words());
            Ok(())
        }
        Err(ClientError::Stopped(r)) => Err(Exit {
            code: exit::AUTH_REJECTED,
            message: stopped_message(r),
        }
        .into()),
        Err(ClientError::Timeout) => Err(check_failed(client).await),
        Err(e) => Err(e.into()),
    }
}

/// `login` could not check the token: stops the checking client and says why.
async fn check_failed(client: Client) -> anyhow::Error {
    let why = client
        .status()
        .last_error
        .as_ref()
        .map(describe)
        .unwrap_or_else(|| "no answer".into());
    client.stop().await;
    Exit {
        code: exit::UNREACHABLE,
        message: format!(
            "cannot check the token: {why}; nothing was saved (fix the URL, start the relay, or pass --no-check to save it unchecked)"
        ),
    }
    .into()
}

pub(crate) async fn conv(args: ConvArgs) -> anyhow::Result<()> {
    let home = args.home.path()?;
    match args.command {
        ConvCommand::Create {
            users,
            name,
            group,
            timeout,
        } => {
            let client = open_client(&home, true).await?;
            client
                .wait_connected(timeout)
                .await
                .map_err(|e| connect_failure(&client, e))?;
            let conv = client.create_conversation(users, name, group).await?;
            client.stop().await;
            println!("{}", conv.id);
        }
        ConvCommand::List {
            json,
            offline,
            timeout,
        } => {
            let convs = if offline {
                open_existing(&home)?.convs()?
            } else {
                let client = open_client(&home, true).await?;
                client
                    .wait_connected(timeout)
                    .await
                    .map_err(|e| connect_failure(&client, e))?;
                let convs = client.list_conversations().await?;
                client.stop().await;
                convs
            };
            for c in convs {
                if json {
                    println!("{}", serde_json::to_string(&c)?);
                } else {
                    let kind = match c.kind {
                        keepwire_proto::ConvKind::Direct => "direct",
                        keepwire_proto::ConvKind::Group => "group",
                    };
                    let name = c
                        .name
                        .map(|n| format!(" \"{}\"", printable(&n)))
                        .unwrap_or_default();
                    println!(
                        "{}\t{kind}{name}\t{}\t{}",
                        c.id,
                        printable(&c.members.join(",")),
                        counted(c.last_seq, "message")
                    );
                }
            }
        }
    }
    Ok(())
}

pub(crate) async fn send(args: SendArgs) -> anyhow::Result<()> {
    let home = args.home.path()?;
    // The relay accepts an empty body (PROTOCOL.md §5), but from the command
    // line it is almost always an empty shell variable: nothing is queued.
    if args.text.is_empty() {
        bail!("the message is empty: nothing was queued (an unset shell variable?)");
    }
    let req = serde_json::json!({"op": "send", "conv": args.conv, "text": args.text, "timeout_ms": args.timeout.as_millis() as u64});
    if let Some(r) = crate::agent::ask(&home, &req, args.timeout + Duration::from_secs(2)).await {
        return match (r["result"].as_str(), r["error"].as_str()) {
            (Some("sent"), _) => {
                println!("sent");
                Ok(())
            }
            (Some("queued"), _) => {
                println!("queued (not confirmed yet); the agent will send it");
                Ok(())
            }
            (_, Some(e)) => bail!("the relay refused the message: {e}"),
            _ => bail!("unexpected answer from the agent: {r}"),
        };
    }
    let client = open_client(&home, true).await?;
    let handle = client.send(args.conv, &args.text).await?;
    if args.timeout.is_zero() {
        println!("queued");
        return Ok(());
    }
    // A refused connection or a name that does not resolve (at every relay)
    // is known at once: say "queued" then, not after the whole timeout.
    let result = tokio::select! {
        r = tokio::time::timeout(args.timeout, handle.confirmed()) => r.ok(),
        Ok(_) = client.wait_for(args.timeout, |s| s.holder && s.plainly_unreachable(1)) => None,
    };
    client.stop().await;
    match result {
        Some(Ok(())) => println!("sent"),
        Some(Err(e)) => bail!("the relay refused the message: {e}"),
        None => {
            let why = client.status().last_error.as_ref().map(describe);
            match why {
                Some(w) => {
                    println!("queued (not confirmed yet: {w}); it will be sent by the next sync")
                }
                None => println!("queued (not confirmed yet); it will be sent by the next sync"),
            }
        }
    }
    Ok(())
}

/// The notifier the user asked for (flags, else preferences), if any: a
/// command hook, or desktop notifications over D-Bus.
pub(crate) fn notifier(
    home: &std::path::Path,
    command: Option<&str>,
    desktop: bool,
) -> anyhow::Result<Option<Arc<dyn Notifier>>> {
    let prefs = open_existing(home)?.prefs()?;
    if let Some(c) = command.map(str::to_owned).or(prefs.notify_command) {
        return Ok(Some(Arc::new(CommandNotifier::new(c))));
    }
    if desktop || prefs.desktop {
        return Ok(Some(Arc::new(
            keepwire_client::notify::DesktopNotifier::new(),
        )));
    }
    Ok(None)
}

pub(crate) async fn sync(args: SyncArgs) -> anyhow::Result<()> {
    let home = args.home.path()?;
    // A running agent holds the connection: ask it.
    let req = serde_json::json!({"op": "sync", "deadline_ms": args.deadline.as_millis() as u64});
    if let Some(r) = crate::agent::ask(&home, &req, args.deadline + Duration::from_secs(2)).await {
        println!(
            "synced through the agent in {:.1}s: {} received, {} confirmed, {}, cursor {}",
            r["elapsed_ms"].as_u64().unwrap_or(0) as f64 / 1000.0,
            counted(r["received"].as_u64().unwrap_or(0), "message"),
            counted(r["confirmed"].as_u64().unwrap_or(0), "send"),
            counted(r["notified"].as_u64().unwrap_or(0), "notification"),
            r["cursor"].as_u64().unwrap_or(0)
        );
        return match r["outcome"].as_str() {
            Some("caught_up") => Ok(()),
            Some("auth_rejected") => Err(Exit {
                code: exit::AUTH_REJECTED,
                message: match r["state"].as_str() {
                    Some(state) => state_words(state),
                    None => stopped_message(StopReason::AuthRejected),
                },
            }
            .into()),
            Some("unreachable") => Err(Exit {
                code: exit::UNREACHABLE,
                message: "the agent cannot reach the relay".into(),
            }
            .into()),
            _ => Err(Exit {
                code: exit::PARTIAL,
                message: "deadline reached before everything was synced".into(),
            }
            .into()),
        };
    }
    // A sync is what a periodic task or a push wake-up runs: the app is not
    // in the foreground, and the connection goes dormant once done.
    let notify = notifier(
        &home,
        args.notify.notify_command.as_deref(),
        args.notify.desktop,
    )?;
    let client = background_client(&home, BackgroundPolicy::WakeOnly, notify).await?;
    let report = client.sync_once(args.deadline).await;
    client.stop().await;
    let s = client.status();
    let store = open_existing(&home)?;
    let (pending, failed) = store.outbox_counts()?;
    let cursor = store.cursor()?.map(|c| c.seq).unwrap_or(0);
    if report.through_holder {
        println!(
            "synced in {:.1}s through the process holding this home's connection (a tail or agent): {pending} pending, {failed} failed, cursor {cursor}",
            report.elapsed.as_secs_f64(),
        );
    } else {
        println!(
            "synced in {:.1}s: {} received, {} confirmed, {}, {pending} pending, {failed} failed, cursor {cursor}",
            report.elapsed.as_secs_f64(),
            counted(report.received as u64, "message"),
            counted(report.confirmed as u64, "send"),
            counted(report.notified as u64, "notification"),
        );
    }
    match report.outcome {
        SyncOutcome::CaughtUp => Ok(()),
        SyncOutcome::Partial => Err(Exit {
            code: exit::PARTIAL,
            message: format!(
                "deadline of {:?} reached before everything was synced; run sync again to continue",
                args.deadline
            ),
        }
        .into()),
        SyncOutcome::Busy => Err(Exit {
            code: exit::PARTIAL,
            message: format!(
                "another keepwire process holds this home's connection and was not caught up within {:?}; what it stored is in the store",
                args.deadline
            ),
        }
        .into()),
        SyncOutcome::Stopped(r) => Err(Exit {
            code: exit::AUTH_REJECTED,
            message: stopped_message(r),
        }
        .into()),
        SyncOutcome::Unreachable(_) if report.through_holder => {
            let why = store
                .meta("last_error")?
                .unwrap_or_else(|| "no answer".into());
            Err(Exit {
                code: exit::UNREACHABLE,
                message: format!(
                    "cannot reach the relay (the process holding this home's connection reports: {why})"
                ),
            }
            .into())
        }
        _ => Err(unreachable_exit(&s).into()),
    }
}

fn print_message(m: &Message, json: bool) -> anyhow::Result<()> {
    let time = humantime::format_rfc3339_millis(
        std::time::UNIX_EPOCH + Duration::from_millis(m.ts.max(0) as u64),
    );
    if json {
        let v = serde_json::json!({
            "seq": m.conv_seq, "id": m.id, "conv": m.conv, "from": m.from, "body": m.body,
            "time": time.to_string(), "ts": m.ts, "cid": m.cid, "kind": m.kind,
        });
        println!("{v}");
    } else {
        // Other users wrote these: no terminal escapes (JSON above stays exact).
        println!(
            "{time} conv {} #{} {}: {}",
            m.conv,
            m.conv_seq,
            printable(&m.from),
            printable(&m.body)
        );
    }
    Ok(())
}

pub(crate) fn log(args: LogArgs) -> anyhow::Result<()> {
    let home = args.home.path()?;
    let store = open_existing(&home)?;
    for m in store.messages(args.conv, args.limit)? {
        print_message(&m, args.json)?;
    }
    Ok(())
}

pub(crate) async fn tail(args: TailArgs) -> anyhow::Result<()> {
    let home = args.home.path()?;
    // Like a desktop agent: stays connected while nobody looks at an app.
    let notify = notifier(
        &home,
        args.notify.notify_command.as_deref(),
        args.notify.desktop,
    )?;
    let client = background_client(&home, BackgroundPolicy::KeepAlive, notify).await?;
    // Print from the store (works whichever process holds the connection):
    // everything after the cursor at start, as it lands.
    let store = open_existing(&home)?;
    let mut last = store.cursor()?.map(|c| c.seq).unwrap_or(0);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let stop = wait_for_signal();
    tokio::pin!(stop);
    let mut events = client.events();
    loop {
        tokio::select! {
            r = &mut stop => { r?; break; }
            Some(ClientEvent::Signal { conv, from, data }) = events.next(), if args.signals => {
                if args.json {
                    println!("{}", serde_json::json!({"signal": {"conv": conv, "from": from, "data": data}}));
                } else {
                    println!("conv {conv} {} signals {}", printable(&from), printable(&data.to_string()));
                }
            }
            _ = tick.tick() => {
                for (seq, m) in store.messages_after(last, 1000)? {
                    last = seq;
                    print_message(&m, args.json)?;
                }
                if let State::Stopped(r) = client.status().state {
                    return Err(Exit { code: exit::AUTH_REJECTED, message: stopped_message(r) }.into());
                }
            }
        }
    }
    client.stop().await;
    Ok(())
}

pub(crate) async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let home = args.home.path()?;
    let store = open_existing(&home)?;
    let running = keepwire_client::Home::new(&home).is_held();
    let agent = crate::agent::ask(
        &home,
        &serde_json::json!({"op": "status"}),
        Duration::from_secs(2),
    )
    .await;
    let state = match (&agent, running) {
        (Some(a), _) => a["state"].as_str().unwrap_or("unknown").to_owned(),
        (None, true) => store.meta("state")?.unwrap_or_else(|| "Starting".into()),
        (None, false) => "not running".into(),
    };
    let last_error = store.meta("last_error")?;
    let (error_text, error_code) = match &last_error {
        Some(e) => {
            let (text, code) = error_words(e);
            (Some(text), code)
        }
        None => (None, None),
    };
    let cursor = store.cursor()?;
    let (pending, failed) = store.outbox_counts()?;
    let token_at = crate::token_store::location(&store, &home)?;
    // The network the agent last heard of from NetworkManager (an opaque id).
    let network = agent
        .as_ref()
        .and_then(|a| a["network"].as_str().map(str::to_owned));
    // The last time the relay's log was replaced under this device.
    let last_gap: Option<serde_json::Value> = store
        .meta("last_gap")?
        .and_then(|g| serde_json::from_str(&g).ok());
    let v = serde_json::json!({
        "home": home.display().to_string(),
        "user": store.meta("user")?,
        "device": store.device_id()?,
        "servers": store.urls()?,
        "running": running,
        "agent": agent.is_some(),
        "state": state,
        "state_text": state_words(&state),
        "last_error": last_error,
        "last_error_text": error_text,
        "last_error_code": error_code,
        "cursor": cursor.as_ref().map(|c| c.seq),
        "epoch": cursor.as_ref().map(|c| c.epoch.clone()),
        "outbox_pending": pending,
        "outbox_failed": failed,
        "messages": store.message_count()?,
        "token_store": token_at.json(),
        "network": network,
        "last_gap": last_gap,
    });
    if args.json {
        println!("{v}");
    } else {
        println!("home:     {}", home.display());
        println!(
            "user:     {}",
            v["user"].as_str().unwrap_or("(not connected yet)")
        );
        println!("device:   {}", v["device"].as_str().unwrap_or(""));
        println!("servers:  {}", store.urls()?.join(", "));
        println!("state:    {}", printable(&state_words(&state)));
        if let Some(e) = &error_text {
            println!("last error: {}", printable(e));
        }
        println!(
            "cursor:   {}",
            cursor
                .map(|c| c.seq.to_string())
                .unwrap_or_else(|| "none".into())
        );
        println!("outbox:   {pending} pending, {failed} failed");
        println!("messages: {}", v["messages"]);
        println!("token:    kept {}", token_at.words());
        if let Some(n) = &network {
            println!("network:  {}", printable(n));
        }
        if let Some(g) = &last_gap {
            let when = humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH
                    + Duration::from_millis(g["at_ms"].as_i64().unwrap_or(0).max(0) as u64),
            );
            println!(
                "warning:  at {when} the relay's message log was replaced (restored from a backup): \
                 {} messages stored here were forgotten; history is fetched again from the relay",
                g["dropped_messages"]
            );
        }
    }
    Ok(())
}

/// The background policy when none is set (the core's default).
const DEFAULT_BACKGROUND: &str = "linger:1m";

/// A background policy in words, with its unit.
fn policy_words(p: Option<BackgroundPolicy>) -> String {
    match p {
        Some(BackgroundPolicy::KeepAlive) => "keep (stay connected in the background)".into(),
        Some(BackgroundPolicy::WakeOnly) => {
            "wake-only (disconnect in the background; sync and push wake it)".into()
        }
        Some(BackgroundPolicy::Linger(d)) => format!(
            "linger {} (stay connected {} after going to the background)",
            humantime::format_duration(d),
            humantime::format_duration(d)
        ),
        _ => "unknown".into(),
    }
}

#[derive(Args)]
pub(crate) struct PrefsArgs {
    #[command(flatten)]
    home: HomeArg,
    /// Print the preferences as one JSON object (durations in seconds).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Option<PrefsCommand>,
}

#[derive(Subcommand)]
enum PrefsCommand {
    /// Show the preferences (the default).
    Show,
    /// Never notify for this conversation, on any of your devices, and no
    /// push wake-ups for it (told to the relay; queued if it is unreachable).
    Mute {
        /// Conversation id.
        conv: u64,
        /// How long to wait for the relay.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
        timeout: Duration,
    },
    /// Notify for this conversation again (on all your devices).
    Unmute {
        /// Conversation id.
        conv: u64,
        /// How long to wait for the relay.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
        timeout: Duration,
    },
    /// No notifications between these local times (`22:00-07:00`; equal times
    /// mean all day), or `off`.
    QuietHours {
        /// `HH:MM-HH:MM` or `off`.
        hours: String,
    },
    /// Show message text in notifications (`on`) or not (`off`).
    Previews {
        /// `on` or `off`.
        setting: String,
    },
    /// Background policy: `keep`, `linger:DURATION` (e.g. `linger:5m`) or `wake-only`.
    Background {
        /// The policy.
        policy: String,
    },
    /// Desktop notifications over D-Bus: `on` or `off`.
    Desktop {
        /// `on` or `off`.
        setting: String,
    },
    /// Command run for each notification (JSON on stdin), or `off`.
    NotifyCommand {
        /// The command (run with `sh -c`), or `off`.
        command: String,
    },
}

/// Mutes or unmutes through the relay (all the user's devices, and no
/// pushes); saved here first, so it holds even if the relay is unreachable.
async fn mute(
    home: &std::path::Path,
    conv: u64,
    muted: bool,
    timeout: Duration,
) -> anyhow::Result<()> {
    let client = open_client(home, true).await?;
    let _ = client.wait_connected(timeout).await;
    let told = client.set_muted(conv, muted).await;
    client.stop().await;
    let what = if muted { "muted" } else { "unmuted" };
    match told? {
        true => eprintln!("conversation {conv} {what} on all your devices"),
        false => eprintln!(
            "conversation {conv} {what} here; the relay (pushes, your other devices) is told at the next connection"
        ),
    }
    Ok(())
}

pub(crate) async fn prefs(args: PrefsArgs) -> anyhow::Result<()> {
    let home = args.home.path()?;
    let store = open_existing(&home)?;
    let mut p = store.prefs()?;
    match args.command.unwrap_or(PrefsCommand::Show) {
        PrefsCommand::Show => {}
        PrefsCommand::Mute { conv, timeout } => {
            mute(&home, conv, true, timeout).await?;
            p = store.prefs()?;
        }
        PrefsCommand::Unmute { conv, timeout } => {
            mute(&home, conv, false, timeout).await?;
            p = store.prefs()?;
        }
        PrefsCommand::QuietHours { hours } => {
            p.quiet_hours = if hours == "off" {
                None
            } else {
                Some(
                    keepwire_client::notify::QuietHours::parse(&hours).with_context(|| {
                        format!("{hours:?} is not HH:MM-HH:MM (24-hour local time) or `off`")
                    })?,
                )
            };
        }
        PrefsCommand::Previews { setting } => {
            p.previews = match setting.as_str() {
                "on" => true,
                "off" => false,
                other => bail!("previews are `on` or `off`, not {other:?}"),
            };
        }
        PrefsCommand::Background { policy } => {
            if keepwire_client::notify::parse_policy(&policy).is_none() {
                bail!(
                    "{policy:?} is not a background policy: use keep, linger:DURATION (e.g. linger:5m) or wake-only"
                );
            }
            p.background = Some(policy);
        }
        PrefsCommand::Desktop { setting } => {
            p.desktop = match setting.as_str() {
                "on" => true,
                "off" => false,
                other => bail!("desktop notifications are `on` or `off`, not {other:?}"),
            };
        }
        PrefsCommand::NotifyCommand { command } => {
            p.notify_command = (command != "off").then_some(command);
        }
    }
    store.set_prefs(&p)?;
    let background = p.background.as_deref().unwrap_or(DEFAULT_BACKGROUND);
    let policy = keepwire_client::notify::parse_policy(background);
    if args.json {
        let linger = match policy {
            Some(BackgroundPolicy::Linger(d)) => Some(d.as_secs()),
            _ => None,
        };
        let v = serde_json::json!({
            "muted": p.muted,
            "quiet_hours": p.quiet_hours.map(|q| q.to_string()),
            "previews": p.previews,
            "background": background,
            "background_default": p.background.is_none(),
            "linger_secs": linger,
            "desktop": p.desktop,
            "notify_command": p.notify_command,
        });
        println!("{v}");
        return Ok(());
    }
    let muted: Vec<String> = p.muted.iter().map(u64::to_string).collect();
    println!(
        "muted:          {}",
        if muted.is_empty() {
            "none".into()
        } else {
            muted.join(", ")
        }
    );
    println!(
        "quiet hours:    {}",
        p.quiet_hours
            .map(|q| q.to_string())
            .unwrap_or_else(|| "off".into())
    );
    println!("previews:       {}", if p.previews { "on" } else { "off" });
    println!(
        "background:     {}{}",
        policy_words(policy),
        if p.background.is_none() {
            " (default)"
        } else {
            ""
        }
    );
    println!("desktop:        {}", if p.desktop { "on" } else { "off" });
    println!(
        "notify command: {}",
        p.notify_command.as_deref().unwrap_or("none")
    );
    Ok(())
}

#[derive(Args)]
pub(crate) struct SignalArgs {
    #[command(flatten)]
    home: HomeArg,
    /// Conversation id.
    conv: u64,
    /// The signal's data: JSON (e.g. '{"typing":true}'); anything that is not
    /// JSON is sent as a JSON string. At most 1024 bytes encoded.
    data: String,
    /// How long to wait for a connection to the relay.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    timeout: Duration,
}

/// Sends an ephemeral signal (typing, presence) to the conversation's
/// members connected now: through a running agent's connection, else over
/// a connection of its own. Never queued: a late typing indicator is wrong.
pub(crate) async fn signal(args: SignalArgs) -> anyhow::Result<()> {
    let home = args.home.path()?;
    let data: serde_json::Value = serde_json::from_str(&args.data)
        .unwrap_or_else(|_| serde_json::Value::String(args.data.clone()));
    let req = serde_json::json!({"op": "signal", "conv": args.conv, "data": data, "timeout_ms": args.timeout.as_millis() as u64});
    if let Some(r) = crate::agent::ask(&home, &req, args.timeout + Duration::from_secs(2)).await {
        return match (r["result"].as_str(), r["error"].as_str()) {
            (Some("sent"), _) => {
                println!("signalled through the agent");
                Ok(())
            }
            (_, Some(e)) => bail!("{e}"),
            _ => bail!("unexpected answer from the agent: {r}"),
        };
    }
    let client = open_client(&home, true).await?;
    let connected = tokio::select! {
        r = client.wait_connected(args.timeout) => r,
        Ok(_) = client.wait_for(args.timeout, |s| s.holder && s.plainly_unreachable(1)) => Err(ClientError::Timeout),
    };
    if let Err(e) = connected {
        // Read before stopping (a stopped client holds nothing).
        let held_elsewhere = matches!(e, ClientError::Timeout) && !client.status().holder;
        let err = connect_failure(&client, e);
        client.stop().await;
        if held_elsewhere {
            bail!(
                "another keepwire process (a `tail`) holds this home's connection, and signals \
                 cannot be queued for it: stop it, or run `keepwire agent`, which relays signals"
            );
        }
        return Err(err);
    }
    // Closing at once is fine: the relay relays a signal it received before
    // the close (and `stop` runs the closing handshake, so it is received).
    let result = signal_member(&client, args.conv, data).await;
    client.stop().await;
    result?;
    println!("signalled");
    Ok(())
}

/// Sends a signal after checking membership (the relay's refusal of a
/// signal names no request, so it could not be reported).
pub(crate) async fn signal_member(
    client: &Client,
    conv: u64,
    data: serde_json::Value,
) -> anyhow::Result<()> {
    let convs = client.list_conversations().await?;
    if !convs.iter().any(|c| c.id == conv) {
        bail!("you are not a member of conversation {conv} (see `keepwire conv list`)");
    }
    client.signal(conv, data).await?;
    Ok(())
}

#[derive(Args)]
pub(crate) struct ReadArgs {
    #[command(flatten)]
    home: HomeArg,
    /// Conversation id.
    conv: u64,
    /// Read up to this conversation sequence [default: the latest stored].
    #[arg(long)]
    up_to: Option<u64>,
    /// How long to wait for the relay.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    timeout: Duration,
}

/// Marks a conversation read here and, through the relay, on the user's
/// other devices (their notifications for it are cleared).
pub(crate) async fn read(args: ReadArgs) -> anyhow::Result<()> {
    let home = args.home.path()?;
    let up_to = match args.up_to {
        Some(n) => n,
        None => open_existing(&home)?.max_conv_seq(args.conv)?,
    };
    let client = open_client(&home, true).await?;
    client
        .wait_connected(args.timeout)
        .await
        .map_err(|e| connect_failure(&client, e))?;
    client.mark_read(args.conv, up_to).await?;
    client.stop().await;
    println!("conversation {} read up to #{up_to}", args.conv);
    Ok(())
}

#[derive(Args)]
pub(crate) struct StatsArgs {
    #[command(flatten)]
    home: HomeArg,
    /// The window, ending now [default: 24h].
    #[arg(long, value_parser = humantime::parse_duration)]
    since: Option<Duration>,
    /// As one JSON object.
    #[arg(long)]
    json: bool,
    /// Also write a timeline picture to this SVG file: of the --since window,
    /// or, by default, of the last 24 hours fitted to the records (a short
    /// session fills the picture instead of a sliver of a day).
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
}

/// Connection analytics of this home.
/// "1 day", "2 hours", "90 minutes", "45 seconds": a window in words.
fn span_words(d: Duration) -> String {
    let secs = d.as_secs();
    let (n, unit) = if secs >= 86_400 && secs.is_multiple_of(86_400) {
        (secs / 86_400, "day")
    } else if secs >= 3_600 && secs.is_multiple_of(3_600) {
        (secs / 3_600, "hour")
    } else if secs >= 60 && secs.is_multiple_of(60) {
        (secs / 60, "minute")
    } else {
        (secs, "second")
    };
    format!("{n} {unit}{}", if n == 1 { "" } else { "s" })
}

pub(crate) fn stats(args: StatsArgs) -> anyhow::Result<()> {
    let home = args.home.path()?;
    let store = open_existing(&home)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let window = args.since.unwrap_or(Duration::from_secs(86_400));
    let since = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
    let from = now.saturating_sub(since);
    let s = keepwire_client::analytics::stats(&store, from, now)?;
    if let Some(path) = &args.svg {
        // Fitted: from a little before the first record, if that is later.
        let fitted = match (
            args.since,
            keepwire_client::analytics::first_record(&store)?,
        ) {
            (None, Some(first)) if first > from => {
                let margin = ((now - first) / 20).max(1_000);
                Some(keepwire_client::analytics::stats(
                    &store,
                    (first - margin).max(from),
                    now,
                )?)
            }
            _ => None,
        };
        std::fs::write(
            path,
            keepwire_client::analytics::svg(fitted.as_ref().unwrap_or(&s)),
        )
        .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if args.json {
        let mut v = serde_json::to_value(&s)?;
        if let Some(o) = v.as_object_mut() {
            o.remove("segments");
        }
        println!("{v}");
        return Ok(());
    }
    let ms = |m: Option<i64>| {
        m.map(|m| format!("{:.1}s", m as f64 / 1000.0))
            .unwrap_or_else(|| "-".into())
    };
    println!(
        "window:                      the last {}",
        span_words(window)
    );
    println!(
        "uptime while wanted:         {:.1}% ({} of {})",
        s.uptime * 100.0,
        length_words(s.connected_ms),
        length_words(s.wanted_ms)
    );
    println!("reconnects:                  {}", s.reconnects);
    println!(
        "time to reconnect p50/p95:   {} / {}",
        ms(s.reconnect_p50_ms),
        ms(s.reconnect_p95_ms)
    );
    println!(
        "background heartbeats:       {} ({} per connected hour)",
        s.background_heartbeats,
        s.background_heartbeats_per_hour
            .map(|h| format!("{h:.1}"))
            .unwrap_or_else(|| "-".into())
    );
    println!("received in the background:  {}", s.received_background);
    println!("received by sync:            {}", s.received_by_sync);
    println!("notifications raised:        {}", s.notifications);
    if let Some(p) = &args.svg {
        println!("timeline:                    {}", p.display());
    }
    Ok(())
}

#[derive(Args)]
pub(crate) struct AgentArgs {
    #[command(flatten)]
    home: HomeArg,
    /// Run this command for each notification instead of desktop notifications.
    #[arg(long, value_name = "CMD")]
    notify_command: Option<String>,
    /// No desktop notifications (unless the `desktop` preference is on).
    #[arg(long)]
    no_desktop: bool,
}

pub(crate) async fn agent(args: AgentArgs) -> anyhow::Result<()> {
    let home = args.home.path()?;
    crate::agent::run(&home, args.notify_command, !args.no_desktop).await
}

#[derive(Args)]
pub(crate) struct OutboxArgs {
    #[command(flatten)]
    home: HomeArg,
    /// As one JSON object.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Option<OutboxCommand>,
}

#[derive(Subcommand)]
enum OutboxCommand {
    /// List the sends not confirmed yet: pending, or failed (the relay
    /// refused them), oldest first (the default).
    List,
    /// Queue failed sends again (they go out with the next sync, or at once
    /// through the process holding the connection).
    Retry {
        /// The send's client id (from `keepwire outbox`).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        cid: Option<String>,
        /// Every failed send.
        #[arg(long)]
        all: bool,
    },
    /// Remove a send from the outbox: it will not be sent. A pending send
    /// can only be dropped while no keepwire process holds this home's
    /// connection (it may be on its way to the relay).
    Drop {
        /// The send's client id.
        cid: String,
    },
}

/// "45s", "12m", "3h", "2d": an age in one unit.
/// A failed send's reason as `keepwire outbox` shows it: "code: message".
fn failure(state: &keepwire_client::store::OutboxState) -> Option<String> {
    match state {
        keepwire_client::store::OutboxState::Failed { code, message } => {
            Some(format!("{code}: {message}"))
        }
        keepwire_client::store::OutboxState::Pending => None,
    }
}

fn age_words(ms: i64) -> String {
    let s = (ms / 1000).max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3_600 => format!("{}m", s / 60),
        3_600..86_400 => format!("{}h", s / 3_600),
        _ => format!("{}d", s / 86_400),
    }
}

/// `keepwire outbox`: list, retry or drop unconfirmed sends.
pub(crate) fn outbox(args: OutboxArgs) -> anyhow::Result<()> {
    use keepwire_client::store::{OutboxRefusal, OutboxState};
    let home = args.home.path()?;
    let mut store = open_existing(&home)?;
    let said = |what: &str, cid: &str| {
        if args.json {
            println!("{}", serde_json::json!({"result": what, "cid": cid}));
        } else {
            println!("{what} {cid}");
        }
    };
    match args.command.unwrap_or(OutboxCommand::List) {
        OutboxCommand::List => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            let rows = store.outbox()?;
            if args.json {
                let sends: Vec<_> = rows
                    .iter()
                    .map(|r| {
                        serde_json::json!({
                            "cid": r.item.cid, "conv": r.item.conv, "state": r.state.name(),
                            "error": failure(&r.state), "created_at_ms": r.created_at_ms,
                            "age_secs": (now - r.created_at_ms).max(0) / 1000,
                            "body": r.item.body,
                        })
                    })
                    .collect();
                println!("{}", serde_json::json!({"outbox": sends}));
            } else if rows.is_empty() {
                println!("the outbox is empty: every send was confirmed");
            } else {
                println!(
                    "{:<32}  {:>6}  {:>5}  {:<7}  error",
                    "cid", "conv", "age", "state"
                );
                for r in rows {
                    println!(
                        "{:<32}  {:>6}  {:>5}  {:<7}  {}",
                        r.item.cid,
                        r.item.conv,
                        age_words(now - r.created_at_ms),
                        r.state.name(),
                        printable(failure(&r.state).as_deref().unwrap_or("-"))
                    );
                }
            }
        }
        OutboxCommand::Retry { cid: Some(cid), .. } => match store.outbox_retry(&cid)? {
            Ok(()) => said("queued again", &cid),
            Err(OutboxRefusal::Unknown) => {
                bail!("no send {cid:?} in the outbox (see `keepwire outbox`)")
            }
            Err(OutboxRefusal::Pending) => {
                bail!("send {cid} is still pending: it goes out on its own with the next sync")
            }
        },
        OutboxCommand::Retry { cid: None, .. } => {
            let failed: Vec<String> = store
                .outbox()?
                .into_iter()
                .filter(|r| matches!(r.state, OutboxState::Failed { .. }))
                .map(|r| r.item.cid)
                .collect();
            for cid in &failed {
                // A failed send another process retried meanwhile is fine.
                if store.outbox_retry(cid)?.is_ok() {
                    said("queued again", cid);
                }
            }
            if failed.is_empty() && !args.json {
                println!("no failed sends to retry");
            }
        }
        OutboxCommand::Drop { cid } => {
            let pending = store
                .outbox()?
                .iter()
                .any(|r| r.item.cid == cid && r.state == OutboxState::Pending);
            if pending && keepwire_client::Home::new(&home).is_held() {
                bail!(
                    "send {cid} is pending and a keepwire process holds this home's connection, so it may be on its way to the relay; stop that process first"
                );
            }
            match store.outbox_drop(&cid)? {
                Ok(()) => said("dropped", &cid),
                Err(_) => bail!("no send {cid:?} in the outbox (see `keepwire outbox`)"),
            }
        }
    }
    Ok(())
}

/// A length of time in the unit that reads best: "42 s", "3.5 min", "2.1 h".
fn length_words(ms: i64) -> String {
    let s = ms.max(0) as f64 / 1000.0;
    if s < 120.0 {
        format!("{s:.0} s")
    } else if s < 7200.0 {
        format!("{:.1} min", s / 60.0)
    } else {
        format!("{:.1} h", s / 3600.0)
    }
}

#[cfg(test)]
mod tests {
    use super::length_words;

    #[test]
    fn lengths_read_in_the_best_unit() {
        assert_eq!(length_words(0), "0 s");
        assert_eq!(length_words(42_400), "42 s");
        assert_eq!(length_words(210_000), "3.5 min");
        assert_eq!(length_words(7_560_000), "2.1 h");
        assert_eq!(length_words(-5), "0 s");
    }
}
