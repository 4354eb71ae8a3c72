//! `keepwire-bench`: a load generator for keepwire and its peers.
//!
//! Each scenario starts the server under test as its own process (pinned to
//! a core with `taskset` when `--server-core` is given), drives it from this
//! process (pin it with `taskset -c 1 keepwire-bench ...`), and prints one
//! JSON line of figures, including the generator's own CPU so a run where
//! the generator saturated its core can be discarded.
//!
//! Targets: `keepwire` (durable: every message committed and fsynced before
//! it is confirmed or delivered), `node-ws` and `python-ws` (broadcast
//! servers in `bench/peers/`, nothing stored).

mod proc_stats;
mod servers;
mod storm;
mod wire;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};
use futures_util::{SinkExt as _, StreamExt as _};
use keepwire_proto::{ClientFrame, Hello, SUBPROTOCOL, Send, encode};
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use crate::servers::{Server, Target};

#[derive(Parser)]
#[command(
    name = "keepwire-bench",
    about = "Load generator for keepwire and its peers"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(clap::Args, Clone)]
struct Common {
    /// Server under test.
    #[arg(long, value_enum, default_value = "keepwire")]
    target: TargetArg,
    /// The keepwire binary (default: next to this one).
    #[arg(long)]
    keepwire: Option<std::path::PathBuf>,
    /// Pin the server to this core (`taskset -c`).
    #[arg(long)]
    server_core: Option<u32>,
    /// Where to put databases and logs (default: a temp dir).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum TargetArg {
    Keepwire,
    NodeWs,
    PythonWs,
    #[value(name = "socketio")]
    SocketIo,
    Mosquitto,
}

#[derive(Subcommand)]
enum Scenario {
    /// Open N connections (authenticated for keepwire), hold them, report
    /// the server's resident memory per connection and its idle CPU.
    Idle {
        #[command(flatten)]
        common: Common,
        /// Connections.
        #[arg(long, default_value_t = 1000)]
        conns: usize,
        /// How long to hold them (idle CPU is measured over this).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
        hold: Duration,
        /// Source addresses to spread connections over (127.0.0.x).
        #[arg(long, default_value_t = 1)]
        sources: u8,
    },
    /// S senders to two-member conversations, each keeping W sends
    /// outstanding: confirmed durable sends per second (keepwire only).
    Ingest {
        #[command(flatten)]
        common: Common,
        /// Senders.
        #[arg(long, default_value_t = 50)]
        senders: usize,
        /// Unconfirmed sends per sender.
        #[arg(long, default_value_t = 32)]
        window: usize,
        /// Measurement time (after 1 s of warm-up).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
        duration: Duration,
    },
    /// G groups of M connected members and one publisher each: deliveries
    /// per second and send-to-receipt latency.
    Fanout {
        #[command(flatten)]
        common: Common,
        /// Groups.
        #[arg(long, default_value_t = 10)]
        groups: usize,
        /// Subscribers per group.
        #[arg(long, default_value_t = 100)]
        members: usize,
        /// Messages per second per publisher (0: as fast as the server takes them).
        #[arg(long, default_value_t = 0)]
        rate: u32,
        /// Payload bytes.
        #[arg(long, default_value_t = 100)]
        payload: usize,
        /// Measurement time (after 1 s of warm-up).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
        duration: Duration,
    },
    /// A device whose network comes back, through a proxy adding `--rtt` of
    /// round-trip time, with `--backlog` messages waiting: time from the
    /// network-up signal to connected and caught up (keepwire only).
    ReconnectLatency {
        #[command(flatten)]
        common: Common,
        /// Round-trip time the proxy adds.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "100ms")]
        rtt: Duration,
        /// Messages waiting when the network comes back.
        #[arg(long, default_value_t = 10)]
        backlog: usize,
        /// Network-up events to measure.
        #[arg(long, default_value_t = 10)]
        times: usize,
    },
    /// N devices connected (keepwire's client state machine), the relay
    /// killed with SIGKILL, M messages per user stored while it is down, the
    /// relay restarted after `--downtime` on the same database and address:
    /// time until every device is connected and caught up, connection
    /// attempts per second, and a check that nothing was lost (keepwire only).
    Storm {
        #[command(flatten)]
        common: Common,
        /// Devices.
        #[arg(long, default_value_t = 10_000)]
        devices: usize,
        /// Devices per user.
        #[arg(long, default_value_t = 2)]
        per_user: usize,
        /// How long the relay stays down.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
        downtime: Duration,
        /// Messages per user stored while the relay is down.
        #[arg(long, default_value_t = 4)]
        messages: usize,
        /// Disable the backoff's jitter (every device retries on the same schedule).
        #[arg(long)]
        no_jitter: bool,
        /// Source addresses to spread connections over (127.0.0.x).
        #[arg(long, default_value_t = 4)]
        sources: u8,
        /// Give up waiting for every device after this long from the restart.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "120s")]
        within: Duration,
    },
    /// The background agent's resident memory once logged in, connected and
    /// idle (`keepwire-agent` and `keepwire agent`), and the release binaries'
    /// sizes (keepwire only).
    Footprint {
        #[command(flatten)]
        common: Common,
        /// How long the agent idles before its memory is read.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "3s")]
        idle: Duration,
    },
    /// A device offline while M messages arrive, then `keepwire sync`: time
    /// until all are persisted in its store, and the client's peak memory
    /// (keepwire only).
    Catchup {
        #[command(flatten)]
        common: Common,
        /// Messages waiting.
        #[arg(long, default_value_t = 100_000)]
        messages: usize,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    raise_open_file_limit();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let out = rt.block_on(async {
        match cli.scenario {
            Scenario::Idle {
                common,
                conns,
                hold,
                sources,
            } => idle(&common, conns, hold, sources).await,
            Scenario::Ingest {
                common,
                senders,
                window,
                duration,
            } => ingest(&common, senders, window, duration).await,
            Scenario::Fanout {
                common,
                groups,
                members,
                rate,
                payload,
                duration,
            } => fanout(&common, groups, members, rate, payload, duration).await,
            Scenario::Catchup { common, messages } => catchup(&common, messages).await,
            Scenario::Footprint { common, idle } => footprint(&common, idle).await,
            Scenario::Storm {
                common,
                devices,
                per_user,
                downtime,
                messages,
                no_jitter,
                sources,
                within,
            } => {
                storm::storm(
                    &common, devices, per_user, downtime, messages, !no_jitter, sources, within,
                )
                .await
            }
            Scenario::ReconnectLatency {
                common,
                rtt,
                backlog,
                times,
            } => reconnect_latency(&common, rtt, backlog, times).await,
        }
    })?;
    println!("{out}");
    Ok(())
}

fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Opens a WebSocket from `source` (a 127.0.0.x address) to `url`.
async fn open_ws(
    url: &str,
    source: std::net::IpAddr,
    subprotocol: Option<&'static str>,
) -> anyhow::Result<Ws> {
    let mut req = url.into_client_request()?;
    if let Some(p) = subprotocol {
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_static(p));
    }
    let host = req.uri().host().context("host")?.to_owned();
    let port = req.uri().port_u16().context("port")?;
    let addr: std::net::SocketAddr = format!("{host}:{port}").parse()?;
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(std::net::SocketAddr::new(source, 0))?;
    let tcp = sock.connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (ws, _) = tokio_tungstenite::client_async(req, tcp).await?;
    Ok(ws)
}

/// Says hello and waits for the welcome.
async fn hello(ws: &mut Ws, token: &str, device: &str) -> anyhow::Result<()> {
    let h = ClientFrame::Hello(Hello {
        token: token.into(),
        device: device.into(),
        cursor: None,
        heartbeat_ms: Some(300_000),
        history: Some(0),
        agent: Some("keepwire-bench".into()),
        generation: None,
        transient: false,
        window: None,
    });
    ws.send(Message::Text(encode(&h).into())).await?;
    while let Some(m) = ws.next().await {
        if let Message::Text(t) = m? {
            if t.starts_with("{\"type\":\"welcome\"") {
                return Ok(());
            }
            if !t.contains("\"type\":\"entry\"") {
                bail!("expected a welcome, got {t}");
            }
        }
    }
    bail!("closed before the welcome")
}

fn localhost(i: usize, sources: u8) -> std::net::IpAddr {
    std::net::IpAddr::from([127, 0, 0, 1 + (i % usize::from(sources.max(1))) as u8])
}

async fn idle(c: &Common, conns: usize, hold: Duration, sources: u8) -> anyhow::Result<String> {
    let target = Target::from(c.target);
    let server = Server::start(c, target, servers::Roster::idle(conns)).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = proc_stats::rss_kib(server.pid)?;
    let started = Instant::now();
    let mut held = Vec::with_capacity(conns);
    let mut tasks = Vec::new();
    // Open in batches so the accept queue is not the thing measured.
    for chunk in (0..conns).collect::<Vec<_>>().chunks(200) {
        for &i in chunk {
            let url = server.url_for_group(0);
            let token = server.roster.token(0).to_owned();
            let wire = wire::Wire::of(target);
            tasks.push(tokio::spawn(async move {
                let source = localhost(i, sources);
                wire.connect(&url, source, &token, &format!("idle-{i}"), None)
                    .await
            }));
        }
        for t in tasks.drain(..) {
            held.push(t.await??);
        }
    }
    let opened_in = started.elapsed();
    // Let allocators and buffers settle, then measure.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu0 = proc_stats::cpu_ticks(server.pid)?;
    let gen0 = proc_stats::self_cpu_ticks();
    let t0 = Instant::now();
    // Keep reading so pings and pongs are answered (none are due at 300 s).
    let readers: Vec<_> = held
        .into_iter()
        .map(|mut ws| tokio::spawn(async move { while let Some(Ok(_)) = ws.next().await {} }))
        .collect();
    tokio::time::sleep(hold).await;
    let cpu = proc_stats::cpu_share(server.pid, cpu0, t0.elapsed())?;
    let generator_cpu = proc_stats::self_cpu_since(gen0, t0.elapsed());
    let after = proc_stats::rss_kib(server.pid)?;
    let per_conn = (after.saturating_sub(before)) as f64 * 1024.0 / conns as f64;
    for r in readers {
        r.abort();
    }
    server.stop().await;
    Ok(serde_json::json!({
        "scenario": "idle", "target": target.name(), "conns": conns,
        "rss_before_kib": before, "rss_after_kib": after,
        "bytes_per_conn": per_conn.round(), "server_idle_cpu": round2(cpu),
        "open_secs": round2(opened_in.as_secs_f64()),
        "generator_cpu": round2(generator_cpu),
    })
    .to_string())
}

async fn ingest(
    c: &Common,
    senders: usize,
    window: usize,
    duration: Duration,
) -> anyhow::Result<String> {
    let target = Target::from(c.target);
    if target != Target::Keepwire {
        bail!("ingest measures confirmed durable sends: keepwire only (the peers confirm nothing)");
    }
    let server = Server::start(c, target, servers::Roster::pairs(senders)).await?;
    let confirmed = Arc::new(AtomicU64::new(0));
    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for s in 0..senders {
        let url = server.url_for(s);
        let token = server.roster.token(s).to_owned();
        let conv = server.roster.conv(s);
        let (confirmed, measuring, stop) = (confirmed.clone(), measuring.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut ws = open_ws(&url, localhost(s, 1), Some(SUBPROTOCOL)).await?;
            hello(&mut ws, &token, &format!("sender-{s}")).await?;
            let (mut tx, mut rx) = ws.split();
            let mut n = 0u64;
            let mut outstanding = 0usize;
            let body = "x".repeat(100);
            loop {
                while outstanding < window && !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let f = ClientFrame::Send(Send {
                        cid: format!("{s:016x}{n:016x}"),
                        conv,
                        kind: "text".into(),
                        body: body.clone(),
                    });
                    tx.feed(Message::Text(encode(&f).into())).await?;
                    outstanding += 1;
                }
                tx.flush().await?;
                if stop.load(Ordering::Relaxed) && outstanding == 0 {
                    return anyhow::Ok(());
                }
                match rx.next().await {
                    Some(Ok(Message::Text(t))) if t.starts_with("{\"type\":\"confirm\"") => {
                        outstanding -= 1;
                        if measuring.load(Ordering::Relaxed) {
                            confirmed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Some(Ok(Message::Text(t))) if t.starts_with("{\"type\":\"rejected\"") => {
                        bail!("send rejected: {t}")
                    }
                    Some(Ok(_)) => {}
                    _ => bail!("connection lost"),
                }
            }
        }));
    }
    let (elapsed, server_cpu, generator_cpu) =
        measure_window(server.pid, &measuring, duration).await?;
    stop.store(true, Ordering::Relaxed);
    let n = confirmed.load(Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    let commits = server.metric("keepwire_commits_total").await.unwrap_or(0);
    server.stop().await;
    Ok(serde_json::json!({
        "scenario": "ingest", "target": target.name(), "senders": senders, "window": window,
        "confirmed_per_sec": (n as f64 / elapsed.as_secs_f64()).round(),
        "commits_total": commits, "server_cpu": round2(server_cpu),
        "generator_cpu": round2(generator_cpu),
    })
    .to_string())
}

/// Latencies in microseconds, shared by the subscribers.
#[derive(Default)]
struct Receipts {
    count: u64,
    latencies_us: Vec<u32>,
}

async fn fanout(
    c: &Common,
    groups: usize,
    members: usize,
    rate: u32,
    payload: usize,
    duration: Duration,
) -> anyhow::Result<String> {
    let target = Target::from(c.target);
    let wire = wire::Wire::of(target);
    let server = Server::start(c, target, servers::Roster::groups(groups, members)).await?;
    let base = Instant::now();
    let receipts = Arc::new(Mutex::new(Receipts::default()));
    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sources = ((groups * members) / 20_000 + 1) as u8;
    // Subscribers.
    let mut subs = Vec::new();
    for g in 0..groups {
        for m in 0..members {
            let i = server.roster.subscriber(g, m);
            let url = server.url_for_group(g);
            let token = server.roster.token(i).to_owned();
            subs.push(tokio::spawn(async move {
                let source = localhost(i, sources);
                wire.connect(&url, source, &token, &format!("sub-{i}"), Some(g))
                    .await
            }));
        }
    }
    let mut readers = Vec::new();
    let (stop_readers, readers_stopped) = tokio::sync::watch::channel(false);
    for s in subs {
        let mut ws = s.await??;
        let (receipts, measuring) = (receipts.clone(), measuring.clone());
        let mut stopped = readers_stopped.clone();
        readers.push(tokio::spawn(async move {
            let mut st = wire::RxState::default();
            let (mut sent, mut replies) = (Vec::new(), Vec::new());
            let mut local = Vec::with_capacity(1024);
            let mut count = 0u64;
            loop {
                let msg = tokio::select! {
                    _ = stopped.wait_for(|s| *s) => break,
                    m = ws.next() => match m {
                        Some(Ok(m)) => m,
                        _ => break,
                    },
                };
                wire.receive(&msg, &mut st, &mut sent, &mut replies);
                for r in replies.drain(..) {
                    if ws.feed(r).await.is_err() {
                        break;
                    }
                }
                if ws.flush().await.is_err() {
                    break;
                }
                if !measuring.load(Ordering::Relaxed) {
                    sent.clear();
                    continue;
                }
                let now = base.elapsed().as_micros() as u64;
                for sent in sent.drain(..) {
                    local.push(now.saturating_sub(sent).min(u64::from(u32::MAX)) as u32);
                    count += 1;
                }
                if local.len() >= 1024 {
                    let mut r = receipts.lock().await;
                    r.count += count;
                    r.latencies_us.append(&mut local);
                    count = 0;
                }
            }
            let mut r = receipts.lock().await;
            r.count += count;
            r.latencies_us.append(&mut local);
        }));
    }
    // Publishers: one per group.
    let mut pubs = Vec::new();
    for g in 0..groups {
        let url = server.url_for_group(g);
        let i = server.roster.publisher(g);
        let token = server.roster.token(i).to_owned();
        let conv = server.roster.conv(g);
        let stop = stop.clone();
        pubs.push(tokio::spawn(async move {
            let ws = wire
                .connect(&url, localhost(i, 1), &token, &format!("pub-{g}"), None)
                .await?;
            let (mut tx, mut rx) = ws.split();
            // keepwire and MQTT: at most WINDOW publishes unconfirmed (the
            // relay's max_unconfirmed is larger); confirmations return permits.
            const WINDOW: usize = 128;
            let permits = Arc::new(tokio::sync::Semaphore::new(WINDOW));
            let p = permits.clone();
            let drain = tokio::spawn(async move {
                let mut st = wire::RxState::default();
                while let Some(Ok(m)) = rx.next().await {
                    p.add_permits(wire.confirmations(&m, &mut st));
                }
            });
            // Publishers' ticks are spread over the period, not aligned: G
            // publishers firing at the same instant would measure a burst of
            // G messages, not the rate.
            let mut tick = (rate > 0).then(|| {
                let period = Duration::from_secs_f64(1.0 / f64::from(rate));
                let phase = period.mul_f64(g as f64 / groups as f64);
                let mut i = tokio::time::interval_at(tokio::time::Instant::now() + phase, period);
                i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                i
            });
            let mut n = 0u64;
            let mut skipped = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if let Some(t) = &mut tick {
                    t.tick().await;
                }
                if wire.confirms() {
                    let permit = if tick.is_some() {
                        // Open loop: a send the window cannot take is skipped (overload).
                        match permits.try_acquire() {
                            Ok(p) => p,
                            Err(_) => {
                                skipped += 1;
                                continue;
                            }
                        }
                    } else {
                        match tokio::time::timeout(Duration::from_millis(100), permits.acquire())
                            .await
                        {
                            Ok(Ok(p)) => p,
                            _ => continue,
                        }
                    };
                    permit.forget();
                }
                n += 1;
                let now = base.elapsed().as_micros() as u64;
                let msg = wire.publish(g, conv, n, now, payload);
                if tx.send(msg).await.is_err() {
                    break;
                }
            }
            drain.abort();
            anyhow::Ok((n, skipped))
        }));
    }
    let (elapsed, server_cpu, generator_cpu) =
        measure_window(server.pid, &measuring, duration).await?;
    stop.store(true, Ordering::Relaxed);
    let mut sent = 0;
    let mut skipped = 0;
    for p in pubs {
        let (n, s) = p.await??;
        sent += n;
        skipped += s;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = stop_readers.send(true);
    for r in readers {
        let _ = r.await;
    }
    server.stop().await;
    let mut r = receipts.lock().await;
    r.latencies_us.sort_unstable();
    let pct = |p: f64| -> f64 {
        if r.latencies_us.is_empty() {
            return f64::NAN;
        }
        let i = ((r.latencies_us.len() as f64 - 1.0) * p).round() as usize;
        f64::from(r.latencies_us[i]) / 1000.0
    };
    let samples = r.latencies_us.len();
    // The latency distribution: (percentile, ms) points for a CDF plot.
    let distribution: Vec<[f64; 2]> = [
        0.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 98.0, 99.0, 99.5,
        99.9, 100.0,
    ]
    .iter()
    .map(|p| [*p, round2(pct(p / 100.0))])
    .collect();
    Ok(serde_json::json!({
        "scenario": "fanout", "target": target.name(), "groups": groups, "members": members,
        "rate_per_publisher": rate, "payload": payload,
        "deliveries_per_sec": (samples as f64 / elapsed.as_secs_f64()).round(),
        "p50_ms": round2(pct(0.5)), "p99_ms": round2(pct(0.99)), "max_ms": round2(pct(1.0)),
        "distribution_ms": distribution,
        "sent": sent, "skipped_over_window": skipped,
        "server_cpu": round2(server_cpu), "generator_cpu": round2(generator_cpu),
        "durable": target == Target::Keepwire,
    })
    .to_string())
}

async fn reconnect_latency(
    c: &Common,
    rtt: Duration,
    backlog: usize,
    times: usize,
) -> anyhow::Result<String> {
    use keepwire_client::{Client, Network, State};
    let target = Target::from(c.target);
    if target != Target::Keepwire {
        bail!("reconnect latency measures keepwire's client: keepwire only");
    }
    let server = Server::start(c, target, servers::Roster::pairs(1)).await?;
    let upstream: std::net::SocketAddr = server.url_for(0).trim_start_matches("ws://").parse()?;
    let proxy = keepwire_chaos::FaultProxy::start("127.0.0.1:0".parse()?, upstream).await?;
    proxy.set(keepwire_chaos::Fault::Latency(rtt / 2));
    let home = server.dir().join("device");
    let client = Client::builder(&home)
        .servers(vec![format!("ws://{}", proxy.addr())])
        .token(server.roster.receiver_token(0))
        .build()
        .await?;
    let long = Duration::from_secs(30);
    client.set_network(Network::Online("wifi".into()));
    client.wait_for(long, |s| s.caught_up()).await?;
    let mut samples = Vec::with_capacity(times);
    for k in 0..times {
        client.set_network(Network::Offline);
        client
            .wait_for(long, |s| s.state != State::Connected)
            .await?;
        server.seed_from(0, k * backlog, backlog).await?;
        let want = client.status().cursor.unwrap_or(0) + backlog as u64;
        let t0 = Instant::now();
        client.set_network(Network::Online("wifi".into()));
        client
            .wait_for(long, |s| s.caught_up() && s.cursor >= Some(want))
            .await?;
        samples.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    client.stop().await;
    drop(proxy);
    server.stop().await;
    samples.sort_by(f64::total_cmp);
    let median = samples[samples.len() / 2];
    Ok(serde_json::json!({
        "scenario": "reconnect-latency", "target": target.name(), "rtt_ms": rtt.as_millis() as u64,
        "backlog": backlog, "times": times,
        "median_ms": round2(median), "min_ms": round2(samples[0]),
        "max_ms": round2(samples[samples.len() - 1]),
        "round_trips": round2(median / (rtt.as_secs_f64() * 1000.0)),
    })
    .to_string())
}

async fn catchup(c: &Common, messages: usize) -> anyhow::Result<String> {
    let target = Target::from(c.target);
    if target != Target::Keepwire {
        bail!("catch-up measures keepwire's client store: keepwire only");
    }
    let server = Server::start(c, target, servers::Roster::pairs(1)).await?;
    let home = server.dir().join("home");
    let exe = server.keepwire_exe().to_owned();
    let kw = |args: &[&str]| {
        std::process::Command::new(&exe)
            .args(args)
            .env("KEEPWIRE_HOME", &home)
            .env("KEEPWIRE_LOG", "error")
            .output()
    };
    // The receiving device logs in (cursor at the head), then goes offline.
    let out = kw(&[
        "login",
        "--server",
        &server.url_for(0),
        "--token",
        server.roster.receiver_token(0),
    ])?;
    if !out.status.success() {
        bail!("login failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let seeded = Instant::now();
    server.seed(0, messages).await?;
    let seed_secs = seeded.elapsed().as_secs_f64();
    // `keepwire sync` as its own process; sample its peak RSS while it runs.
    let started = Instant::now();
    let mut child = std::process::Command::new(&exe)
        .args(["sync", "--deadline", "600s"])
        .env("KEEPWIRE_HOME", &home)
        .env("KEEPWIRE_LOG", "error")
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let pid = child.id();
    let mut peak_kib = 0;
    let status = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break st;
        }
        if let Ok(hwm) = proc_stats::hwm_kib(pid) {
            peak_kib = peak_kib.max(hwm);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let secs = started.elapsed().as_secs_f64();
    if !status.success() {
        bail!("keepwire sync failed: {status}");
    }
    let stored = String::from_utf8_lossy(&kw(&["status", "--json"])?.stdout).into_owned();
    server.stop().await;
    Ok(serde_json::json!({
        "scenario": "catchup", "target": target.name(), "messages": messages,
        "sync_secs": round2(secs), "persisted_per_sec": (messages as f64 / secs).round(),
        "client_peak_rss_kib": peak_kib, "seed_secs": round2(seed_secs),
        "status": serde_json::from_str::<serde_json::Value>(&stored).unwrap_or_default(),
    })
    .to_string())
}

async fn footprint(c: &Common, idle: Duration) -> anyhow::Result<String> {
    if Target::from(c.target) != Target::Keepwire {
        bail!("footprint measures keepwire's agent and binaries: keepwire only");
    }
    let server = Server::start(c, Target::Keepwire, servers::Roster::pairs(1)).await?;
    let exe = server.keepwire_exe().to_owned();
    let agent_exe = exe.with_file_name("keepwire-agent");
    let home = server.dir().join("agent-home");
    let out = std::process::Command::new(&exe)
        .args(["login", "--server", &server.url_for(0), "--token"])
        .arg(server.roster.receiver_token(0))
        .env("KEEPWIRE_HOME", &home)
        .output()?;
    if !out.status.success() {
        bail!("login failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut rss = serde_json::Map::new();
    for (name, cmd) in [
        ("keepwire-agent", vec![agent_exe.clone()]),
        ("keepwire agent", vec![exe.clone(), "agent".into()]),
    ] {
        let mut child = tokio::process::Command::new(&cmd[0])
            .args(&cmd[1..])
            .args(["--no-desktop"])
            .env("KEEPWIRE_HOME", &home)
            .env("KEEPWIRE_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", cmd[0].display()))?;
        let pid = child.id().context("agent pid")?;
        // Connected: the relay counts the agent's connection.
        let deadline = Instant::now() + Duration::from_secs(20);
        while server.metric("keepwire_connections_open").await != Some(1) {
            if Instant::now() > deadline {
                bail!("{name} did not connect in 20 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(idle).await;
        rss.insert(name.into(), proc_stats::rss_kib(pid)?.into());
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while server.metric("keepwire_connections_open").await != Some(0)
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    server.stop().await;
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    Ok(serde_json::json!({
        "scenario": "footprint", "target": "keepwire",
        "agent_rss_kib": rss,
        "binary_bytes": {
            "keepwire": size(&exe),
            "keepwire-agent": size(&agent_exe),
            "keepwire-bench": size(&std::env::current_exe()?),
        },
    })
    .to_string())
}

/// After 1 s of warm-up, sets `measuring` for `duration`; returns the exact
/// window and the server's and this generator's CPU share over it.
async fn measure_window(
    server_pid: u32,
    measuring: &std::sync::atomic::AtomicBool,
    duration: Duration,
) -> anyhow::Result<(Duration, f64, f64)> {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu0 = proc_stats::cpu_ticks(server_pid)?;
    let gen0 = proc_stats::self_cpu_ticks();
    measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(duration).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = t0.elapsed();
    Ok((
        elapsed,
        proc_stats::cpu_share(server_pid, cpu0, elapsed)?,
        proc_stats::self_cpu_since(gen0, elapsed),
    ))
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The number after `key` in a JSON text (no full parse on the hot path).
fn field_u64(t: &str, key: &str) -> Option<u64> {
    let rest = &t[t.find(key)? + key.len()..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// The string after `key` (up to the next quote).
fn field_str<'a>(t: &'a str, key: &str) -> Option<&'a str> {
    let rest = &t[t.find(key)? + key.len()..];
    Some(&rest[..rest.find('"')?])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_read_from_entry_frames() {
        let t = r#"{"type":"entry","seq":42,"item":{"kind":"message","id":1,"conv":2,"conv_seq":3,"body":"00000000000000001234xxxx"}}"#;
        assert_eq!(field_u64(t, "\"seq\":"), Some(42));
        assert_eq!(
            field_str(t, "\"body\":\"").and_then(|b| b[..20].parse::<u64>().ok()),
            Some(1234)
        );
    }
}
