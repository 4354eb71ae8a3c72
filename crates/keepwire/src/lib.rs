//! The `keepwire` command: the relay (`serve`, `admin`) and a client for one
//! device home (`login`, `conv`, `send`, `sync`, `log`, `tail`, `status`).
//! Also the `keepwire-agent` command: the desktop background agent alone, a
//! smaller binary (it links no relay code) for a process that runs all day.
//!
//! Every mistake a user can make on the command line ends in a one-line
//! `error: ...` message and a non-zero exit, never a panic or a backtrace.

use std::fmt;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser, Subcommand};

mod agent;
mod chaos_cmds;
mod client_cmds;
mod config_file;
mod demo;
mod desktop_watch;
mod keyring;
mod push_cmds;
mod relay_cmds;
mod route_watch;
mod terminal;
mod tls_init;
mod token_input;
mod token_store;

/// keepwire: keeps a chat app's users reachable.
#[derive(Parser)]
#[command(name = "keepwire", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay server.
    Serve(Box<relay_cmds::ServeArgs>),
    /// Manage users, tokens and the relay database.
    Admin(relay_cmds::AdminArgs),
    /// Save the relay URL and token for this device home.
    Login(client_cmds::LoginArgs),
    /// Create and list conversations.
    Conv(client_cmds::ConvArgs),
    /// Send a message (durably queued first).
    Send(client_cmds::SendArgs),
    /// Connect, send queued messages, fetch new ones, disconnect.
    Sync(client_cmds::SyncArgs),
    /// Print stored messages.
    Log(client_cmds::LogArgs),
    /// Stay connected and print messages as they arrive.
    Tail(client_cmds::TailArgs),
    /// Show the connection state, cursor and outbox.
    Status(client_cmds::StatusArgs),
    /// List, retry or drop the sends not confirmed yet (pending or failed).
    Outbox(client_cmds::OutboxArgs),
    /// Notification and background preferences (mute, quiet hours, previews, policy).
    Prefs(client_cmds::PrefsArgs),
    /// Push wake-ups of this device: register (fcm, apns, webpush), status, unregister, receive.
    Push(push_cmds::PushArgs),
    /// Mark a conversation read (on all of the user's devices).
    Read(client_cmds::ReadArgs),
    /// Send an ephemeral signal (typing, presence) to the members connected now.
    Signal(client_cmds::SignalArgs),
    /// Connection analytics: uptime, reconnects, heartbeats, notifications (--svg for a timeline).
    Stats(client_cmds::StatsArgs),
    /// Run the desktop background agent (connection, notifications, local socket).
    Agent(client_cmds::AgentArgs),
    /// Play keepwire's scenarios on an embedded relay and print a timeline and a verdict.
    Demo,
}

/// An error that ends the command with a specific exit code.
#[derive(Debug)]
pub(crate) struct Exit {
    pub(crate) code: u8,
    pub(crate) message: String,
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Exit {}

/// The `keepwire` command's entry point.
pub fn main_cli() -> ExitCode {
    let mut command = Cli::command();
    command.build();
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let argv = match command.find_subcommand("serve") {
        Some(serve) => match config_file::expand(argv, serve) {
            Ok(a) => a,
            Err(e) => {
                eprintln!("error: {e:#}");
                // A usage error, like a bad flag.
                return ExitCode::from(2);
            }
        },
        None => argv,
    };
    let cli = Cli::parse_from(argv);
    run_to_exit(run(cli))
}

/// `keepwire-agent`: the background agent only (`keepwire agent` in one binary).
#[derive(Parser)]
#[command(
    name = "keepwire-agent",
    version,
    about = "keepwire's desktop background agent (the same as `keepwire agent`)"
)]
struct AgentCli {
    #[command(flatten)]
    args: client_cmds::AgentArgs,
}

/// The `keepwire-agent` command's entry point.
pub fn main_agent() -> ExitCode {
    let cli = AgentCli::parse();
    run_to_exit(client_cmds::agent(cli.args))
}

/// `keepwire-chaos`: fault injection, a binary of its own so that the
/// shipping `keepwire` links none of it.
#[derive(Parser)]
#[command(
    name = "keepwire-chaos",
    version,
    about = "keepwire's fault injection: chaos runs with an exactly-once checker, a fault proxy"
)]
struct ChaosCli {
    #[command(flatten)]
    args: chaos_cmds::ChaosArgs,
}

/// The `keepwire-chaos` command's entry point.
pub fn main_chaos() -> ExitCode {
    let cli = ChaosCli::parse();
    run_to_exit(chaos_cmds::chaos(cli.args))
}

/// Runs a command on a runtime and maps its result to a message and an exit code.
fn run_to_exit(command: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(command);
    // Do not wait for background tasks (a hanging resolver, say) at exit.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<Exit>() {
            Some(exit) => {
                if !exit.message.is_empty() {
                    eprintln!("error: {}", exit.message);
                }
                ExitCode::from(exit.code)
            }
            None => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Libraries whose trace-level events print what goes over the wire (a
/// `hello` with its token, message bodies, request heads): never above debug,
/// whatever `KEEPWIRE_LOG` asks for, so logs hold no tokens or bodies.
const WIRE_LOGGERS: &[&str] = &[
    "tungstenite",
    "tokio_tungstenite",
    "hyper",
    "hyper_util",
    "h2",
    "reqwest",
    "rustls",
];

/// Whether an event may be logged: nothing at trace level from [`WIRE_LOGGERS`].
fn not_wire_contents(meta: &tracing::Metadata<'_>) -> bool {
    *meta.level() != tracing::Level::TRACE
        || !WIRE_LOGGERS.iter().any(|w| {
            meta.target()
                .strip_prefix(w)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
        })
}

/// Sets up logging to stderr: `KEEPWIRE_LOG` filters (default `default`),
/// `KEEPWIRE_LOG_FORMAT` picks `text` (the default) or `json` (one object a
/// line, for log collectors). Any other format is an error, said at once.
pub(crate) fn init_logging(default: &str) -> anyhow::Result<()> {
    use tracing_subscriber::filter::FilterExt as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::{EnvFilter, Layer as _};
    let json = match std::env::var("KEEPWIRE_LOG_FORMAT") {
        Err(std::env::VarError::NotPresent) => false,
        Ok(v) if v.is_empty() || v.eq_ignore_ascii_case("text") => false,
        Ok(v) if v.eq_ignore_ascii_case("json") => true,
        Ok(v) => anyhow::bail!("KEEPWIRE_LOG_FORMAT is {v:?}: use `text` (the default) or `json`"),
        Err(std::env::VarError::NotUnicode(_)) => {
            anyhow::bail!("KEEPWIRE_LOG_FORMAT is not text: use `text` (the default) or `json`")
        }
    };
    let filter =
        EnvFilter::try_from_env("KEEPWIRE_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let filter = filter.and(tracing_subscriber::filter::filter_fn(not_wire_contents));
    let layer = if json {
        tracing_subscriber::fmt::layer()
            .event_format(JsonLines)
            .with_ansi(false)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_filter(filter)
            .boxed()
    };
    let _ = tracing_subscriber::registry().with(layer).try_init();
    Ok(())
}

/// Formats each event as one JSON object a line (`KEEPWIRE_LOG_FORMAT=json`):
/// `timestamp` (RFC 3339, UTC), `level`, `target`, and the event's fields
/// (`message` among them) at the top level. Written by hand with serde_json
/// rather than tracing-subscriber's `json` feature, which would rebuild half
/// the dependency tree for one formatter.
struct JsonLines;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for JsonLines
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut fields = serde_json::Map::new();
        event.record(&mut JsonFields(&mut fields));
        fields.insert(
            "timestamp".into(),
            humantime::format_rfc3339_micros(std::time::SystemTime::now())
                .to_string()
                .into(),
        );
        fields.insert("level".into(), meta.level().as_str().into());
        fields.insert("target".into(), meta.target().into());
        writeln!(writer, "{}", serde_json::Value::Object(fields))
    }
}

/// Collects an event's fields as JSON values.
struct JsonFields<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl tracing::field::Visit for JsonFields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => relay_cmds::serve(*args).await,
        Command::Admin(args) => relay_cmds::admin(args).await,
        Command::Login(args) => client_cmds::login(args).await,
        Command::Conv(args) => client_cmds::conv(args).await,
        Command::Send(args) => client_cmds::send(args).await,
        Command::Sync(args) => client_cmds::sync(args).await,
        Command::Log(args) => client_cmds::log(args),
        Command::Tail(args) => client_cmds::tail(args).await,
        Command::Status(args) => client_cmds::status(args).await,
        Command::Outbox(args) => client_cmds::outbox(args),
        Command::Prefs(args) => client_cmds::prefs(args).await,
        Command::Push(args) => push_cmds::push(args).await,
        Command::Read(args) => client_cmds::read(args).await,
        Command::Signal(args) => client_cmds::signal(args).await,
        Command::Stats(args) => client_cmds::stats(args),
        Command::Agent(args) => client_cmds::agent(args).await,
        Command::Demo => demo::run().await,
    }
}

/// Waits for SIGTERM or SIGINT.
pub(crate) async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    tokio::select! {
        _ = term.recv() => {}
        r = tokio::signal::ctrl_c() => r.context("cannot listen for SIGINT")?,
    }
    Ok(())
}
