//! `keepwire agent`: the desktop background agent. It holds the home's
//! connection with the background policy, raises desktop notifications, and
//! serves a Unix socket (`HOME/agent.sock`, mode 0600) through which
//! `keepwire send`, `sync` and `status` use its connection.
//!
//! Socket protocol: one JSON request per line (at most 256 KiB), one JSON
//! answer per line. `{"op":"status"}`, `{"op":"sync","deadline_ms":30000}`,
//! `{"op":"send","conv":1,"text":"hi","timeout_ms":10000}`,
//! `{"op":"signal","conv":1,"data":{"typing":true}}`.
//!
//! Only the agent's own user may use it: besides the socket's mode (0600, in
//! a 0700 home), the agent checks each peer's uid (`SO_PEERCRED`) and drops
//! connections from any other user, so a loosened mode does not hand the
//! connection (and the user's identity on the relay) to other local users.
//! Commands check the agent's uid the same way before trusting its answers.
//!
//! It also follows suspend/resume and the network from the system bus
//! ([`crate::desktop_watch`]); the status answer carries the network id.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use futures_util::StreamExt as _;
use keepwire_client::{BackgroundPolicy, Client, SyncOutcome};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};

use crate::{init_logging, wait_for_signal};

/// Longest request line the agent reads. A send carries at most the relay's
/// body limit (16 KiB by default, escaped in JSON): this leaves room and
/// still bounds what a client can make the agent hold.
pub(crate) const MAX_REQUEST_LINE: usize = 256 * 1024;

/// The uid this process runs as.
fn own_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Whether the other end of `stream` runs as `uid` (`SO_PEERCRED`).
fn peer_is(stream: &UnixStream, uid: u32) -> Result<(), String> {
    match stream.peer_cred() {
        Ok(cred) if cred.uid() == uid => Ok(()),
        Ok(cred) => Err(format!("uid {}", cred.uid())),
        Err(e) => Err(format!("unknown uid ({e})")),
    }
}

/// The agent's socket in a home.
pub(crate) fn socket_path(home: &Path) -> PathBuf {
    keepwire_client::Home::new(home).agent_socket()
}

/// Runs the agent until SIGTERM or SIGINT.
pub(crate) async fn run(
    home: &Path,
    notify_command: Option<String>,
    desktop: bool,
) -> anyhow::Result<()> {
    init_logging("info")?;
    let prefs = crate::client_cmds::open_existing(home)?.prefs()?;
    let notify = crate::client_cmds::notifier(home, notify_command.as_deref(), desktop)?;
    let policy = prefs
        .background_policy()
        .unwrap_or(BackgroundPolicy::KeepAlive);
    let client = crate::client_cmds::background_client(home, policy, notify).await?;
    let path = socket_path(home);
    // A stale socket from a killed agent: nobody answers on it.
    if UnixStream::connect(&path).await.is_ok() {
        anyhow::bail!("another agent is already running for {}", home.display());
    }
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    tracing::info!(target: "keepwire::background", socket = %path.display(), "agent running");
    // Suspend/resume and network changes, from the system bus (if any).
    let watch = tokio::spawn(crate::desktop_watch::run(client.clone()));
    let stop = wait_for_signal();
    tokio::pin!(stop);
    let owner = own_uid();
    let mut check = tokio::time::interval(Duration::from_millis(250));
    let mut stopped = None;
    loop {
        tokio::select! {
            r = &mut stop => { r?; break; }
            // Stopped for good (token or device revoked, token rejected): an
            // agent that can never connect again must not look alive.
            _ = check.tick() => {
                if let keepwire_client::State::Stopped(r) = client.status().state
                    && r != keepwire_client::StopReason::ClosedByApp
                {
                    let message = crate::client_cmds::stopped_message(r);
                    tracing::error!(target: "keepwire::background", reason = ?r, "the agent stops: {message}");
                    // 5 (log in again) unless another connection took over.
                    let code = if r == keepwire_client::StopReason::Replaced {
                        1
                    } else {
                        crate::client_cmds::exit::AUTH_REJECTED
                    };
                    stopped = Some((code, message));
                    break;
                }
            }
            conn = listener.accept() => {
                if let Ok((stream, _)) = conn {
                    match peer_is(&stream, owner) {
                        Ok(()) => {
                            tokio::spawn(serve(stream, client.clone()));
                        }
                        Err(who) => {
                            // Dropped unanswered: the agent acts as its user.
                            tracing::warn!(target: "keepwire::background", peer = %who, "refused a connection from another user");
                        }
                    }
                }
            }
        }
    }
    watch.abort();
    client.stop().await;
    let _ = std::fs::remove_file(&path);
    match stopped {
        Some((code, message)) => Err(crate::Exit { code, message }.into()),
        None => Ok(()),
    }
}

async fn serve(stream: UnixStream, client: Client) {
    let (r, mut w) = stream.into_split();
    let mut lines = FramedRead::new(r, LinesCodec::new_with_max_length(MAX_REQUEST_LINE));
    while let Some(line) = lines.next().await {
        let (answer, last) = match line {
            Ok(line) => match serde_json::from_str::<Value>(&line) {
                Ok(req) => (handle(&client, &req).await, false),
                Err(e) => (json!({"error": format!("not JSON: {e}")}), false),
            },
            Err(LinesCodecError::MaxLineLengthExceeded) => (
                json!({"error": format!(
                    "request line longer than {} KiB: connection closed",
                    MAX_REQUEST_LINE / 1024
                )}),
                true,
            ),
            Err(LinesCodecError::Io(e)) => (json!({"error": format!("bad request: {e}")}), true),
        };
        if w.write_all(format!("{answer}\n").as_bytes()).await.is_err() || last {
            return;
        }
    }
}

fn outcome_name(o: &SyncOutcome) -> &'static str {
    match o {
        SyncOutcome::CaughtUp => "caught_up",
        SyncOutcome::Partial => "partial",
        SyncOutcome::Unreachable(_) => "unreachable",
        SyncOutcome::Stopped(_) => "auth_rejected",
        _ => "busy",
    }
}

async fn handle(client: &Client, req: &Value) -> Value {
    let ms = |k: &str, d: u64| Duration::from_millis(req[k].as_u64().unwrap_or(d));
    match req["op"].as_str() {
        Some("status") => {
            let s = client.status();
            json!({"state": s.state.name(), "cursor": s.cursor, "outbox": s.outbox, "user": s.user,
                   "last_error": s.last_error.map(|e| format!("{e:?}")), "network": s.network})
        }
        Some("sync") => {
            // The agent's connection is usually up: a sync just waits until caught up.
            let r = client.sync_once(ms("deadline_ms", 30_000)).await;
            let state = match &r.outcome {
                SyncOutcome::Stopped(reason) => {
                    Some(keepwire_client::State::Stopped(*reason).name().to_owned())
                }
                _ => None,
            };
            json!({"outcome": outcome_name(&r.outcome), "received": r.received, "confirmed": r.confirmed,
                   "notified": r.notified, "elapsed_ms": r.elapsed.as_millis() as u64,
                   "cursor": client.status().cursor, "state": state})
        }
        Some("send") => {
            let (Some(conv), Some(text)) = (req["conv"].as_u64(), req["text"].as_str()) else {
                return json!({"error": "send needs conv and text"});
            };
            match client.send(conv, text).await {
                Err(e) => json!({"error": e.to_string()}),
                Ok(h) => {
                    match tokio::time::timeout(ms("timeout_ms", 10_000), h.confirmed()).await {
                        Ok(Ok(())) => json!({"result": "sent"}),
                        Ok(Err(e)) => json!({"result": "failed", "error": e.to_string()}),
                        Err(_) => json!({"result": "queued"}),
                    }
                }
            }
        }
        Some("signal") => {
            let Some(conv) = req["conv"].as_u64() else {
                return json!({"error": "signal needs conv and data"});
            };
            match crate::client_cmds::signal_member(client, conv, req["data"].clone()).await {
                Ok(()) => json!({"result": "sent"}),
                Err(e) => json!({"error": format!("{e:#}")}),
            }
        }
        _ => json!({"error": "unknown op: use status, sync, send or signal"}),
    }
}

/// Asks a running agent; `None` if no agent answers on this home.
pub(crate) async fn ask(home: &Path, req: &Value, timeout: Duration) -> Option<Value> {
    let mut stream = tokio::time::timeout(
        Duration::from_millis(500),
        UnixStream::connect(socket_path(home)),
    )
    .await
    .ok()?
    .ok()?;
    // A socket another user put there (in a home whose mode was loosened)
    // is not our agent: do not hand it the request, nor believe its answer.
    if let Err(who) = peer_is(&stream, own_uid()) {
        tracing::warn!(target: "keepwire::background", peer = %who, "the agent socket belongs to another user; ignoring it");
        return None;
    }
    stream.write_all(format!("{req}\n").as_bytes()).await.ok()?;
    let mut lines = BufReader::new(stream).lines();
    let line = tokio::time::timeout(timeout, lines.next_line())
        .await
        .ok()?
        .ok()??;
    serde_json::from_str(&line).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_peers_of_the_same_uid_pass() {
        let (a, _b) = UnixStream::pair().unwrap();
        assert_eq!(peer_is(&a, own_uid()), Ok(()));
        let other = own_uid().wrapping_add(1);
        assert_eq!(peer_is(&a, other), Err(format!("uid {}", own_uid())));
    }
}
