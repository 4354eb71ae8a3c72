//! A chaos device: one process holding one device home, driven by commands
//! on its standard input, journaling what it sends and what it is asked to
//! notify. The run kills it with SIGKILL at any moment and starts it again
//! on the same home and journal.
//!
//! Commands (one per line), each answered with one line on stdout:
//! `send CONV` → `accepted N`; `app fg|bg`, `net up|down`, `dns fail|ok` →
//! `ok`; `push` (a push arrived: `on_push`) → `pushed N` (messages
//! received) or `push-failed REASON`; `settle SECS` → `settled` or
//! `unsettled REASON`; `quit` → `bye`.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use keepwire_client::notify::{CallbackNotifier, NotifierCall};
use keepwire_client::{AppState, Client, Network, PushRegistration, SyncOutcome};
use keepwire_client::{BoxFuture, Resolver};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};

use crate::journal::{self, Journal, Record};

/// The host name devices connect to; the chaos resolver answers it.
pub const RELAY_HOST: &str = "relay.chaos.invalid";

/// How a device process is set up (written by the run as JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceSpec {
    /// The device's name in message bodies.
    pub name: String,
    /// The device home (client store).
    pub home: PathBuf,
    /// The journal file.
    pub journal: PathBuf,
    /// Where [`RELAY_HOST`] resolves to (this device's fault proxy).
    pub proxy: SocketAddr,
    /// The user's token.
    pub token: String,
    /// Background policy (`keep`, `linger:2s`, `wake-only`).
    pub background: String,
    /// Checker self-test: journal this message number as accepted without
    /// sending it (an acknowledgement that lies).
    #[serde(default)]
    pub lose: Option<u64>,
    /// The FCM token this device registers at every start (as an app hands
    /// over the token the OS gives it at launch).
    #[serde(default)]
    pub push_token: Option<String>,
}

/// Resolves [`RELAY_HOST`] to the device's proxy, or fails like a phone
/// waking up without network ("Failed host lookup").
struct ChaosResolver {
    proxy: SocketAddr,
    failing: AtomicBool,
}

impl Resolver for ChaosResolver {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        _port: u16,
    ) -> BoxFuture<'a, io::Result<Vec<SocketAddr>>> {
        Box::pin(async move {
            if self.failing.load(Ordering::SeqCst) || host != RELAY_HOST {
                return Err(io::Error::other(format!("Failed host lookup: '{host}'")));
            }
            Ok(vec![self.proxy])
        })
    }
}

/// Runs a device until `quit` or end of input.
pub async fn run(spec: DeviceSpec) -> anyhow::Result<()> {
    let records = journal::read(&spec.journal)?;
    let mut next = records
        .iter()
        .filter_map(|r| match r {
            Record::Intent { n, .. } => Some(*n),
            _ => None,
        })
        .max()
        .unwrap_or(0)
        + 1;
    let journal = Arc::new(Mutex::new(Journal::open(&spec.journal)?));
    let j = journal.clone();
    let notifier = CallbackNotifier::new(move |call| {
        if let NotifierCall::Show(n) = call {
            let rec = Record::Shown { ids: n.message_ids };
            if let Err(e) = j.lock().unwrap_or_else(|p| p.into_inner()).append(&rec) {
                eprintln!("chaos device: cannot journal a notification: {e:#}");
                std::process::exit(70);
            }
        }
    });
    let resolver = Arc::new(ChaosResolver {
        proxy: spec.proxy,
        failing: AtomicBool::new(false),
    });
    let policy = keepwire_client::notify::parse_policy(&spec.background)
        .with_context(|| format!("bad background policy {:?}", spec.background))?;
    let client = Client::builder(&spec.home)
        .servers(vec![format!("ws://{RELAY_HOST}:{}", spec.proxy.port())])
        .token(spec.token.clone())
        .resolver(resolver.clone())
        .resolve_timeout(Duration::from_secs(2))
        .notifier(notifier)
        .background_policy(policy)
        .configure(quick_detection)
        .app_state(AppState::Background)
        .build()
        .await
        .context("cannot open the client")?;

    if let Some(token) = spec.push_token.clone() {
        // Sent now if connected, else at the next connection; never waited for.
        let c = client.clone();
        tokio::spawn(async move {
            let _ = c
                .set_push_registration(PushRegistration::Fcm { token })
                .await;
        });
    }

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut out = tokio::io::stdout();
    while let Some(line) = lines.next_line().await? {
        let words: Vec<&str> = line.split_whitespace().collect();
        let answer = match words.as_slice() {
            ["send", conv] => {
                let conv: u64 = conv.parse().context("bad conversation id")?;
                let n = next;
                next += 1;
                let body = format!("{}#{n}", spec.name);
                append(
                    &journal,
                    &Record::Intent {
                        n,
                        conv,
                        body: body.clone(),
                    },
                )?;
                if spec.lose != Some(n) {
                    client.send(conv, &body).await.context("send")?;
                }
                append(&journal, &Record::Accepted { n })?;
                format!("accepted {n}")
            }
            ["app", s] => {
                client.set_app_state(match *s {
                    "fg" => AppState::Foreground,
                    _ => AppState::Background,
                });
                "ok".into()
            }
            ["net", s] => {
                client.set_network(match *s {
                    "up" => Network::Online("chaos".into()),
                    _ => Network::Offline,
                });
                "ok".into()
            }
            ["dns", s] => {
                resolver.failing.store(*s == "fail", Ordering::SeqCst);
                "ok".into()
            }
            ["push"] => match client.on_push(b"{}", Duration::from_secs(5)).await {
                Ok(r) => {
                    // Shown from the push path: the checker counts these too.
                    for n in r.show {
                        append(&journal, &Record::Shown { ids: n.message_ids })?;
                    }
                    format!("pushed {}", r.report.received)
                }
                Err(e) => format!("push-failed {e}"),
            },
            ["settle", secs] => {
                let secs: u64 = secs.parse().context("bad settle time")?;
                settle(&client, Duration::from_secs(secs)).await
            }
            ["quit"] => {
                client.stop().await;
                out.write_all(b"bye\n").await?;
                out.flush().await?;
                return Ok(());
            }
            _ => bail!("unknown command {line:?}"),
        };
        out.write_all(format!("{answer}\n").as_bytes()).await?;
        out.flush().await?;
    }
    client.stop().await;
    Ok(())
}

/// Timeouts scaled down so a run of seconds sees many detections and
/// reconnections (the relay runs with `--min-heartbeat 1s`).
fn quick_detection(c: &mut keepwire_core::Config) {
    c.heartbeat_foreground = Duration::from_secs(1);
    c.heartbeat_background = Duration::from_secs(2);
    c.pong_timeout = Duration::from_secs(1);
    c.send_probe_after = Duration::from_millis(800);
    c.connect_timeout = Duration::from_secs(3);
    c.going_away_jitter = Duration::from_millis(500);
    c.backoff_foreground = keepwire_core::Backoff {
        base: Duration::from_millis(100),
        cap: Duration::from_secs(2),
        jitter: keepwire_core::Jitter::Full,
    };
    c.backoff_background = keepwire_core::Backoff {
        base: Duration::from_millis(100),
        cap: Duration::from_secs(4),
        jitter: keepwire_core::Jitter::Full,
    };
    c.adaptive_heartbeat = None;
}

fn append(journal: &Mutex<Journal>, r: &Record) -> anyhow::Result<()> {
    journal.lock().unwrap_or_else(|p| p.into_inner()).append(r)
}

/// Syncs until caught up (outbox flushed, everything to the relay's head
/// stored) or `within` passes.
async fn settle(client: &Client, within: Duration) -> String {
    let deadline = tokio::time::Instant::now() + within;
    let mut last = None;
    while tokio::time::Instant::now() < deadline {
        let left = deadline - tokio::time::Instant::now();
        let r = client.sync_once(left.min(Duration::from_secs(10))).await;
        if r.outcome == SyncOutcome::CaughtUp {
            return "settled".into();
        }
        last = Some(r.outcome);
    }
    format!("unsettled {last:?}")
}
