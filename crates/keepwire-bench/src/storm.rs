//! The reconnect storm: N devices connected through keepwire's own client
//! state machine (`keepwire-core`, real backoff and jitter), the relay killed
//! with SIGKILL, messages arriving while it is down, the relay restarted on
//! the same database and address after a stated downtime. Measures when
//! every device is connected and caught up again, how the connection
//! attempts spread over time, and checks that every device got every message
//! once and in order.
//!
//! The devices keep their inbox in memory (this measures the relay and the
//! reconnect policy, not the client's SQLite store; `catchup` measures that).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures_util::{SinkExt as _, StreamExt as _};
use keepwire_core::{Config, Connection, Event, FailureKind, Jitter, Transmit, TransportEvent};
use keepwire_proto::{EntryItem, InboxEntry, Seq};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::servers::{Roster, Server, Target};
use crate::{Common, Ws, localhost, open_ws, round2};

/// What one device saw.
#[derive(Debug, Default, Clone)]
struct DeviceLog {
    /// The inbox head at the first welcome (before the kill).
    first_head: Option<Seq>,
    /// Last entry stored.
    last_seq: Option<Seq>,
    /// Next message number expected (bodies start with it).
    next_message: u64,
    /// First welcome after the restart.
    reconnected: Option<Instant>,
    /// When it had every message seeded during the downtime.
    caught_up: Option<Instant>,
    duplicated: u64,
    out_of_order: u64,
}

/// Shared between the device tasks and the scenario (one thread: the
/// generator runs a current-thread runtime, so the lock is uncontended).
struct Shared {
    origin: Instant,
    /// Connection attempts per 10 ms since `origin`.
    attempts: Vec<u32>,
    devices: Vec<DeviceLog>,
    /// Set when the relay is started again.
    restarted: Option<Instant>,
    /// Messages each device must get after the restart.
    expected: u64,
}

const BUCKET: Duration = Duration::from_millis(10);

impl Shared {
    fn attempt(&mut self, at: Instant) {
        let b = (at.duration_since(self.origin).as_millis() / BUCKET.as_millis()) as usize;
        if self.attempts.len() <= b {
            self.attempts.resize(b + 1, 0);
        }
        self.attempts[b] += 1;
    }

    fn welcome(&mut self, d: usize, head: Seq, at: Instant) {
        let log = &mut self.devices[d];
        if log.first_head.is_none() {
            log.first_head = Some(head);
        } else if self.restarted.is_some_and(|r| at >= r) && log.reconnected.is_none() {
            log.reconnected = Some(at);
        }
        self.check_caught_up(d, at);
    }

    fn entries(&mut self, d: usize, entries: &[InboxEntry], at: Instant) {
        let log = &mut self.devices[d];
        for e in entries {
            match log.last_seq {
                Some(l) if e.seq <= l => log.duplicated += 1,
                Some(l) if e.seq != l + 1 => log.out_of_order += 1,
                _ => {}
            }
            log.last_seq = Some(log.last_seq.map_or(e.seq, |l| l.max(e.seq)));
            if let EntryItem::Message(m) = &e.item {
                let n: u64 = m
                    .body
                    .get(..20)
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(u64::MAX);
                if n != log.next_message {
                    log.out_of_order += 1;
                }
                log.next_message = n.saturating_add(1);
            }
        }
        self.check_caught_up(d, at);
    }

    fn check_caught_up(&mut self, d: usize, at: Instant) {
        let expected = self.expected;
        let log = &mut self.devices[d];
        if self.restarted.is_some()
            && log.caught_up.is_none()
            && log
                .first_head
                .is_some_and(|h| log.last_seq >= Some(h + expected))
        {
            log.caught_up = Some(at);
        }
    }

    /// Peak attempts per second over sliding windows of `window`.
    fn peak_rate(&self, from: Instant, window: Duration) -> f64 {
        let first = (from.duration_since(self.origin).as_millis() / BUCKET.as_millis()) as usize;
        let w = (window.as_millis() / BUCKET.as_millis()).max(1) as usize;
        let counts = self.attempts.get(first..).unwrap_or(&[]);
        let peak = counts
            .windows(w.min(counts.len().max(1)))
            .map(|c| c.iter().map(|&n| u64::from(n)).sum::<u64>())
            .max()
            .unwrap_or(0);
        peak as f64 / window.as_secs_f64()
    }

    /// Attempts per 100 ms from `from` (for the plot).
    fn timeline(&self, from: Instant) -> Vec<u64> {
        let first = (from.duration_since(self.origin).as_millis() / BUCKET.as_millis()) as usize;
        let counts = self.attempts.get(first..).unwrap_or(&[]);
        counts
            .chunks(10)
            .map(|c| c.iter().map(|&n| u64::from(n)).sum())
            .collect()
    }

    fn attempts_since(&self, from: Instant) -> u64 {
        let first = (from.duration_since(self.origin).as_millis() / BUCKET.as_millis()) as usize;
        let counts = self.attempts.get(first..).unwrap_or(&[]);
        counts.iter().map(|&n| u64::from(n)).sum()
    }
}

/// Runs one storm.
#[allow(clippy::too_many_arguments)]
pub async fn storm(
    c: &Common,
    devices: usize,
    per_user: usize,
    downtime: Duration,
    messages: usize,
    jitter: bool,
    sources: u8,
    within: Duration,
) -> anyhow::Result<String> {
    if Target::from(c.target) != Target::Keepwire {
        bail!("the reconnect storm measures keepwire's relay and client: keepwire only");
    }
    let per_user = per_user.max(1);
    let users = devices.div_ceil(per_user).max(2).next_multiple_of(2);
    let pairs = users / 2;
    let mut server = Server::start(c, Target::Keepwire, Roster::pairs(pairs)).await?;
    let origin = Instant::now();
    let shared = Arc::new(Mutex::new(Shared {
        origin,
        attempts: Vec::new(),
        devices: vec![DeviceLog::default(); devices],
        restarted: None,
        expected: messages as u64,
    }));
    let url = server.url_for(0);
    let mut tasks = Vec::with_capacity(devices);
    for d in 0..devices {
        let token = server.roster.user_token(d % users).to_owned();
        let cfg = device_config(d, &url, jitter);
        let shared = shared.clone();
        let source = localhost(d, sources);
        tasks.push(tokio::spawn(run_device(d, cfg, token, source, shared)));
        // Connect at ≈ 2,000 per second so the first connect is not the storm.
        if d % 200 == 199 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let all = |f: &dyn Fn(&DeviceLog) -> bool| {
        let s = shared.lock().unwrap_or_else(|p| p.into_inner());
        s.devices.iter().filter(|d| f(d)).count()
    };
    wait_until(Duration::from_secs(120), || {
        all(&|d| d.first_head.is_some()) == devices
    })
    .await
    .with_context(|| {
        format!(
            "only {} of {devices} devices connected before the kill",
            all(&|d| d.first_head.is_some())
        )
    })?;
    // Let acks settle so the relay's state is quiet, then kill it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.kill_hard().await;
    let killed = Instant::now();
    let pair_ids: Vec<usize> = (0..pairs).collect();
    server.seed_pairs(&pair_ids, 0, messages).await?;
    let seeded_in = killed.elapsed();
    if seeded_in > downtime {
        bail!("seeding took {seeded_in:?}, longer than the downtime");
    }
    tokio::time::sleep_until(killed + downtime).await;
    let restart_began = Instant::now();
    server.restart().await?;
    let restarted = Instant::now();
    shared.lock().unwrap_or_else(|p| p.into_inner()).restarted = Some(restart_began);
    let cpu0 = crate::proc_stats::cpu_ticks(server.pid)?;
    let gen0 = crate::proc_stats::self_cpu_ticks();
    let done = wait_until(within, || all(&|d| d.caught_up.is_some()) == devices).await;
    let elapsed = restarted.elapsed();
    let server_cpu = crate::proc_stats::cpu_share(server.pid, cpu0, elapsed)?;
    let generator_cpu = crate::proc_stats::self_cpu_since(gen0, elapsed);
    for t in &tasks {
        t.abort();
    }
    server.stop().await;
    let s = shared.lock().unwrap_or_else(|p| p.into_inner());
    let since = |t: Option<Instant>| t.map(|t| t.duration_since(restart_began).as_secs_f64());
    let mut reconnect: Vec<f64> = s
        .devices
        .iter()
        .filter_map(|d| since(d.reconnected))
        .collect();
    let mut caught: Vec<f64> = s
        .devices
        .iter()
        .filter_map(|d| since(d.caught_up))
        .collect();
    reconnect.sort_by(f64::total_cmp);
    caught.sort_by(f64::total_cmp);
    let pct = |v: &[f64], p: f64| {
        v.get(((v.len() as f64 - 1.0) * p).round() as usize)
            .copied()
    };
    let lost: u64 = s
        .devices
        .iter()
        .map(|d| {
            let have = d
                .last_seq
                .unwrap_or(0)
                .saturating_sub(d.first_head.unwrap_or(0));
            (messages as u64).saturating_sub(have)
        })
        .sum();
    let duplicated: u64 = s.devices.iter().map(|d| d.duplicated).sum();
    let out_of_order: u64 = s.devices.iter().map(|d| d.out_of_order).sum();
    let result = serde_json::json!({
        "scenario": "storm", "target": "keepwire", "devices": devices, "users": users,
        "jitter": jitter, "downtime_secs": downtime.as_secs_f64(),
        "messages_per_user": messages, "seeded_secs": round2(seeded_in.as_secs_f64()),
        "restart_secs": round2(restarted.duration_since(restart_began).as_secs_f64()),
        "all_caught_up": done.is_ok(),
        "caught_up": caught.len(),
        "all_caught_up_secs": caught.last().copied().map(round2),
        "caught_up_p50_secs": pct(&caught, 0.5).map(round2),
        "caught_up_p99_secs": pct(&caught, 0.99).map(round2),
        "reconnected_first_secs": reconnect.first().copied().map(round2),
        "reconnected_last_secs": reconnect.last().copied().map(round2),
        "attempts_after_restart": s.attempts_since(restart_began),
        "attempts_total": s.attempts_since(killed),
        "peak_attempts_per_sec_1s": s.peak_rate(restart_began, Duration::from_secs(1)).round(),
        "peak_attempts_per_sec_100ms": s.peak_rate(restart_began, Duration::from_millis(100)).round(),
        "peak_attempts_per_sec_1s_whole": s.peak_rate(killed, Duration::from_secs(1)).round(),
        "lost": lost, "duplicated": duplicated, "out_of_order": out_of_order,
        "server_cpu": round2(server_cpu), "generator_cpu": round2(generator_cpu),
        "restart_at_secs": round2(restart_began.duration_since(killed).as_secs_f64()),
        "attempts_per_100ms_from_kill": s.timeline(killed),
    });
    if let Err(e) = done {
        eprintln!("storm: {e}");
    }
    Ok(result.to_string())
}

/// The client defaults (30 s backoff cap in the foreground), with the given
/// jitter and a device id of its own.
fn device_config(d: usize, url: &str, jitter: bool) -> Config {
    let mut cfg = Config::new(format!("storm-{d}"), vec![url.to_owned()]);
    let jitter = if jitter { Jitter::Full } else { Jitter::None };
    cfg.backoff_foreground.jitter = jitter;
    cfg.backoff_background.jitter = jitter;
    // Replay what the user has, so the first session leaves a cursor behind.
    cfg.history = 1000;
    cfg.agent = "keepwire-bench storm".into();
    cfg
}

async fn wait_until(within: Duration, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while !done() {
        if Instant::now() >= deadline {
            bail!("not done within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// One device: keepwire-core's `Connection` driven over tokio-tungstenite.
async fn run_device(
    d: usize,
    cfg: Config,
    token: String,
    source: std::net::IpAddr,
    shared: Arc<Mutex<Shared>>,
) {
    let origin = shared.lock().unwrap_or_else(|p| p.into_inner()).origin;
    let now = || keepwire_core::Instant::from_duration(origin.elapsed());
    let connect_timeout = cfg.connect_timeout;
    let mut conn = Connection::new(cfg, token, None, d as u64, now());
    conn.start(now());
    let mut ws: Option<(u64, Ws)> = None;
    loop {
        while let Some(t) = conn.poll_transmit() {
            match t {
                Transmit::Open { id, url } => {
                    shared
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .attempt(Instant::now());
                    let ev = match tokio::time::timeout(
                        connect_timeout,
                        open_ws(&url, source, Some(keepwire_proto::SUBPROTOCOL)),
                    )
                    .await
                    {
                        Ok(Ok(w)) => {
                            ws = Some((id, w));
                            TransportEvent::Opened
                        }
                        Ok(Err(e)) => TransportEvent::Failed(classify(&e)),
                        Err(_) => TransportEvent::Failed(FailureKind::Timeout),
                    };
                    conn.handle_transport(id, ev, now());
                }
                Transmit::Frame { id, text } => {
                    if let Some((open, w)) = &mut ws
                        && *open == id
                        && w.send(Message::Text(text.into())).await.is_err()
                    {
                        ws = None;
                        conn.handle_transport(id, TransportEvent::Closed(None), now());
                    }
                }
                Transmit::Close { id, code } => {
                    if let Some((open, mut w)) = ws.take() {
                        if open == id {
                            let frame = tokio_tungstenite::tungstenite::protocol::CloseFrame {
                                code: code.into(),
                                reason: "".into(),
                            };
                            let _ = w.close(Some(frame)).await;
                        } else {
                            ws = Some((open, w));
                        }
                    }
                }
            }
        }
        let mut more = false;
        while let Some(ev) = conn.poll_event() {
            match ev {
                Event::Welcome(w) => shared.lock().unwrap_or_else(|p| p.into_inner()).welcome(
                    d,
                    w.head,
                    Instant::now(),
                ),
                Event::Entries(entries) => {
                    if let Some(last) = entries.last().map(|e| e.seq) {
                        shared.lock().unwrap_or_else(|p| p.into_inner()).entries(
                            d,
                            &entries,
                            Instant::now(),
                        );
                        conn.handle_persisted(last, now());
                        more = true;
                    }
                }
                _ => {}
            }
        }
        if more {
            continue;
        }
        let timer = conn
            .poll_timeout()
            .map(|t| origin + t.as_duration())
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        match &mut ws {
            Some((id, w)) => {
                let id = *id;
                tokio::select! {
                    m = w.next() => match m {
                        Some(Ok(Message::Text(t))) => {
                            conn.handle_transport(id, TransportEvent::Frame(t.as_str().to_owned()), now());
                        }
                        Some(Ok(Message::Close(f))) => {
                            ws = None;
                            conn.handle_transport(id, TransportEvent::Closed(f.map(|f| f.code.into())), now());
                        }
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => {
                            ws = None;
                            conn.handle_transport(id, TransportEvent::Closed(None), now());
                        }
                    },
                    _ = tokio::time::sleep_until(timer) => conn.handle_timeout(now()),
                }
            }
            None => {
                tokio::time::sleep_until(timer).await;
                conn.handle_timeout(now());
            }
        }
    }
}

fn classify(e: &anyhow::Error) -> FailureKind {
    match e.downcast_ref::<std::io::Error>().map(std::io::Error::kind) {
        Some(std::io::ErrorKind::ConnectionRefused) => FailureKind::Refused,
        _ => FailureKind::Io,
    }
}
