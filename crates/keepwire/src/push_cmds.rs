//! `keepwire push`: this device's push registration, and `push receive`, the
//! desktop stand-in for the OS handing an app a push.

use std::io::Read as _;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand, ValueEnum};
use keepwire_client::{
    BackgroundPolicy, Client, ClientError, PushRegistration, PushStatus, SyncOutcome, WebPushKeys,
};

use crate::Exit;
use crate::client_cmds::{
    HomeArg, NotifyArgs, background_client, exit, notifier, open_client, open_existing,
};
use crate::terminal::{counted, printable};

#[derive(Args)]
pub(crate) struct PushArgs {
    #[command(flatten)]
    home: HomeArg,
    #[command(subcommand)]
    command: PushCommand,
}

#[derive(Clone, Copy, ValueEnum)]
enum Provider {
    /// Firebase Cloud Messaging (Android).
    Fcm,
    /// Apple Push Notification service (iOS).
    Apns,
    /// Web Push (browsers, UnifiedPush distributors).
    Webpush,
}

#[derive(Clone, Copy, ValueEnum)]
enum ApnsEnv {
    /// Development builds.
    Sandbox,
    /// App Store and TestFlight builds.
    Production,
}

#[derive(Subcommand)]
enum PushCommand {
    /// Register (or replace) this device's push registration with the relay.
    Register {
        /// The push service.
        #[arg(long, value_enum)]
        provider: Provider,
        /// The FCM registration token or APNs device token.
        #[arg(long, required_if_eq_any([("provider", "fcm"), ("provider", "apns")]))]
        token: Option<String>,
        /// APNs: the app's bundle id (one of the relay's configured topics).
        #[arg(long, required_if_eq("provider", "apns"))]
        topic: Option<String>,
        /// APNs: the gateway the token belongs to.
        #[arg(long = "env", value_enum, default_value = "production")]
        env: ApnsEnv,
        /// Web Push: the push resource URL (https).
        #[arg(long, required_if_eq("provider", "webpush"))]
        endpoint: Option<String>,
        /// Web Push: the subscription's P-256 public key (base64url), when
        /// made elsewhere; without it keepwire makes the keys and decrypts
        /// the pushes itself.
        #[arg(long, requires = "auth")]
        p256dh: Option<String>,
        /// Web Push: the subscription's auth secret (base64url).
        #[arg(long, requires = "p256dh")]
        auth: Option<String>,
        /// How long to wait for the relay's answer.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
        timeout: Duration,
    },
    /// Remove this device's push registration.
    Unregister {
        /// How long to wait for the relay's answer.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
        timeout: Duration,
    },
    /// Show this device's push registration (never the token).
    Status {
        /// As one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Read a push body on stdin (at most 4096 bytes, as the OS would hand
    /// it to an app), sync, and print what to show.
    Receive {
        #[command(flatten)]
        notify: NotifyArgs,
        /// Give up (keeping what was done) after this long.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
        deadline: Duration,
        /// One JSON object per notification.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) async fn push(args: PushArgs) -> anyhow::Result<()> {
    let home = args.home.path()?;
    match args.command {
        PushCommand::Register {
            provider,
            token,
            topic,
            env,
            endpoint,
            p256dh,
            auth,
            timeout,
        } => {
            let reg = match provider {
                Provider::Fcm => PushRegistration::Fcm {
                    token: token.context("--token is required")?,
                },
                Provider::Apns => PushRegistration::Apns {
                    token: token.context("--token is required")?,
                    topic: topic.context("--topic is required")?,
                    sandbox: matches!(env, ApnsEnv::Sandbox),
                },
                Provider::Webpush => PushRegistration::WebPush {
                    endpoint: endpoint.context("--endpoint is required")?,
                    keys: p256dh
                        .zip(auth)
                        .map(|(p256dh, auth)| WebPushKeys { p256dh, auth }),
                },
            };
            let client = open_client(&home, true).await?;
            let _ = client.wait_connected(timeout).await;
            let r = client.set_push_registration(reg).await;
            finish(&client, r, timeout).await
        }
        PushCommand::Unregister { timeout } => {
            let client = open_client(&home, true).await?;
            let _ = client.wait_connected(timeout).await;
            let r = client.clear_push_registration().await;
            finish(&client, r, timeout).await
        }
        PushCommand::Status { json } => {
            let s = open_existing(&home)?.push_status()?;
            print_status(&s, json);
            Ok(())
        }
        PushCommand::Receive {
            notify,
            deadline,
            json,
        } => receive(&home, notify, deadline, json).await,
    }
}

/// Waits for a registration change to reach the relay (through this process
/// or the one holding the home's connection) and reports it.
async fn finish(
    client: &Client,
    r: Result<PushStatus, ClientError>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let mut s = match r {
        Ok(s) => s,
        Err(ClientError::Refused { code, message }) => {
            client.stop().await;
            bail!("the relay refused the registration: {code}: {message}");
        }
        Err(e) => {
            client.stop().await;
            return Err(e.into());
        }
    };
    // Another process (an agent) holds the connection: it sends it.
    let until = tokio::time::Instant::now() + timeout;
    while s.pending && !client.status().holder && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
        s = client.push_status()?;
    }
    client.stop().await;
    print_status(&s, false);
    if s.pending {
        return Err(Exit {
            code: exit::UNREACHABLE,
            message: "saved; the relay is told at the next connection (`keepwire sync`)".into(),
        }
        .into());
    }
    if let Some(e) = &s.last_error {
        bail!("the relay refused the registration: {}", printable(e));
    }
    Ok(())
}

fn print_status(s: &PushStatus, json: bool) {
    let at = s
        .registered_at
        .map(|t| humantime::format_rfc3339_seconds(t).to_string());
    if json {
        let v = serde_json::json!({
            "provider": s.provider, "id": s.id, "own_keys": s.own_keys,
            "registered_at": at, "pending": s.pending, "last_error": s.last_error,
        });
        println!("{v}");
        return;
    }
    match &s.provider {
        None if s.pending => println!("push:        removal pending (sent at the next connection)"),
        None => println!("push:        not registered"),
        Some(p) => {
            let keys = if s.own_keys {
                " (keys made by keepwire)"
            } else {
                ""
            };
            println!("push:        {p}{keys}");
            println!("id:          {}", s.id.as_deref().unwrap_or("(none yet)"));
            println!("registered:  {}", at.as_deref().unwrap_or("not yet"));
            if s.pending {
                println!("pending:     yes (sent at the next connection)");
            }
        }
    }
    if let Some(e) = &s.last_error {
        println!("last error:  {}", printable(e));
    }
}

async fn receive(
    home: &std::path::Path,
    notify: NotifyArgs,
    deadline: Duration,
    json: bool,
) -> anyhow::Result<()> {
    let mut payload = Vec::new();
    std::io::stdin()
        .take(keepwire_client::MAX_PUSH_PAYLOAD as u64 + 1)
        .read_to_end(&mut payload)
        .context("reading the push body from stdin")?;
    let shower = notifier(home, notify.notify_command.as_deref(), notify.desktop)?;
    // What the OS wakes: an app in the background that fetches and lets go.
    let client = background_client(home, BackgroundPolicy::WakeOnly, None).await?;
    let result = client.on_push(&payload, deadline).await;
    client.stop().await;
    let r = result?;
    for n in &r.show {
        if json {
            let v = serde_json::json!({
                "conv": n.conv, "title": n.title, "body": n.body, "unread": n.unread,
                "messages": n.message_ids,
            });
            println!("{v}");
        } else {
            println!(
                "conv {}: {}: {}",
                n.conv,
                printable(&n.title),
                printable(&n.body)
            );
        }
        if let Some(s) = &shower
            && let Err(e) = s.notify(n)
        {
            eprintln!("showing a notification failed: {e}");
        }
    }
    for conv in &r.clear {
        if let Some(s) = &shower {
            let _ = s.clear(*conv);
        }
    }
    eprintln!(
        "push{}: {} received, {} in {:.1}s",
        r.registration_id
            .as_deref()
            .map(|id| format!(" for {id}"))
            .unwrap_or_default(),
        counted(r.report.received as u64, "message"),
        counted(r.show.len() as u64, "notification"),
        r.report.elapsed.as_secs_f64()
    );
    match r.report.outcome {
        SyncOutcome::CaughtUp => Ok(()),
        SyncOutcome::Unreachable(_) => Err(Exit {
            code: exit::UNREACHABLE,
            message: "cannot reach the relay".into(),
        }
        .into()),
        SyncOutcome::Stopped(_) => Err(Exit {
            code: exit::AUTH_REJECTED,
            message: "the relay rejected the token or the device".into(),
        }
        .into()),
        _ => Err(Exit {
            code: exit::PARTIAL,
            message: "deadline reached before everything was synced".into(),
        }
        .into()),
    }
}
