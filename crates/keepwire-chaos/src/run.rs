//! A chaos run: a relay process and device processes (each behind its own
//! [`FaultProxy`]) under a seeded schedule of sends and faults — proxy
//! resets, blackholes, latency, byte-budget closes and idle cuts, SIGKILL of
//! the relay (restarted on the same database and address) and of devices
//! (restarted on the same home), app-state flips, DNS failures, network
//! changes, and push provider faults (a [`PushMock`] FCM that is down,
//! throttles, loses pushes or unregisters a token; the pushes it delivers
//! wake their device with `on_push`). Then every fault is healed, every device syncs until caught up
//! (twice, so each sees the others' last sends), the processes stop and
//! [`check`] judges the stores against the journals.
//!
//! The seed fixes the schedule (which action, which device, which delays),
//! not the operating system's timing: a failing seed replays the same
//! schedule, which in practice reproduces the fault.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use keepwire_proto::{ConvCreate, ConvKind};
use keepwire_server::store::Actor;
use keepwire_server::{AdminStore as _, RelayStore as _};
use keepwire_server::{SqliteOptions, SqliteStore};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::check::{self, DeviceFiles, Report, Subject};
use crate::device::DeviceSpec;
use crate::proxy::{Fault, FaultProxy};
use crate::push_mock::{PushCounts, PushFault, PushMock};

/// A deliberate defect, to prove the checker catches what it must.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sabotage {
    /// After the run, delete one stored message from one device's store.
    DeleteStored,
    /// One device journals a send as accepted without handing it to the
    /// client (an acknowledgement for a message that is then lost).
    LoseAck,
}

/// What a run does.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The `keepwire` binary (the relay: `serve`).
    pub exe: PathBuf,
    /// The binary whose `device --spec FILE` runs one device (`keepwire-chaos`).
    pub device_exe: PathBuf,
    /// Seed of the schedule.
    pub seed: u64,
    /// How long faults and sends go on before healing.
    pub duration: Duration,
    /// Users (each in a group with all others and a direct conversation with the next).
    pub users: usize,
    /// Devices per user.
    pub devices_per_user: usize,
    /// Least number of each fault kind a run must inject.
    pub min_each: u32,
    /// Keep the run's files here (default: a temp dir, removed if the run passed).
    pub dir: Option<PathBuf>,
    /// A defect to inject.
    pub sabotage: Option<Sabotage>,
    /// Print the schedule as it runs.
    pub verbose: bool,
}

/// The kinds of fault a run injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultKind {
    /// Reset a device's connections (RST), then pass again.
    ProxyReset,
    /// Blackhole a device's path for a while (forgotten without a trace).
    ProxyBlackhole,
    /// Add 20–300 ms of one-way latency for a while.
    ProxyLatency,
    /// Close connections after a byte budget for a while.
    ProxyCloseAfter,
    /// Forget connections idle longer than a short cut for a while.
    ProxyIdleCut,
    /// SIGKILL the relay; restart it on the same database and address.
    RelayKill,
    /// SIGKILL a device process; restart it on the same home.
    DeviceKill,
    /// Move a device's app between foreground and background.
    AppFlip,
    /// Make a device's name resolution fail for a while.
    DnsFailure,
    /// Tell a device the network went away, then came back.
    NetworkFlip,
    /// The push provider answers 503 for a while.
    PushDown,
    /// The push provider answers 429 with `Retry-After: 1` for a while.
    PushThrottled,
    /// The push provider accepts pushes and loses them for a while.
    PushLost,
    /// The push provider declares a device's token unregistered (once).
    PushUnregistered,
}

impl FaultKind {
    /// Every kind, in schedule order.
    pub const ALL: [FaultKind; 14] = [
        FaultKind::ProxyReset,
        FaultKind::ProxyBlackhole,
        FaultKind::ProxyLatency,
        FaultKind::ProxyCloseAfter,
        FaultKind::ProxyIdleCut,
        FaultKind::RelayKill,
        FaultKind::DeviceKill,
        FaultKind::AppFlip,
        FaultKind::DnsFailure,
        FaultKind::NetworkFlip,
        FaultKind::PushDown,
        FaultKind::PushThrottled,
        FaultKind::PushLost,
        FaultKind::PushUnregistered,
    ];

    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::ProxyReset => "proxy-reset",
            FaultKind::ProxyBlackhole => "proxy-blackhole",
            FaultKind::ProxyLatency => "proxy-latency",
            FaultKind::ProxyCloseAfter => "proxy-close-after",
            FaultKind::ProxyIdleCut => "proxy-idle-cut",
            FaultKind::RelayKill => "relay-kill-9",
            FaultKind::DeviceKill => "device-kill-9",
            FaultKind::AppFlip => "app-flip",
            FaultKind::DnsFailure => "dns-failure",
            FaultKind::NetworkFlip => "network-flip",
            FaultKind::PushDown => "push-down",
            FaultKind::PushThrottled => "push-429",
            FaultKind::PushLost => "push-lost",
            FaultKind::PushUnregistered => "push-unregistered",
        }
    }
}

/// What a run did and found.
#[derive(Debug)]
pub struct Outcome {
    /// Its seed.
    pub seed: u64,
    /// Faults injected, per kind.
    pub faults: BTreeMap<FaultKind, u32>,
    /// Send commands given to devices.
    pub sends: u64,
    /// What the push provider answered.
    pub pushes: PushCounts,
    /// Pushes handed to a running device (`on_push`).
    pub woken: u64,
    /// Devices that did not catch up after healing (each with its last answer).
    pub unsettled: Vec<String>,
    /// The checker's report.
    pub report: Report,
    /// Kinds injected fewer times than the minimum.
    pub short: Vec<FaultKind>,
    /// Wall time.
    pub elapsed: Duration,
    /// Where the run's files are (kept unless it passed in a temp dir).
    pub dir: PathBuf,
}

impl Outcome {
    /// No promise broken, every device caught up, every fault kind injected enough.
    pub fn ok(&self) -> bool {
        self.report.ok() && self.unsettled.is_empty() && self.short.is_empty()
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let faults: Vec<String> = self
            .faults
            .iter()
            .map(|(k, n)| format!("{}={n}", k.name()))
            .collect();
        writeln!(
            f,
            "seed {}: {} in {:.1}s",
            self.seed,
            if self.ok() { "PASS" } else { "FAIL" },
            self.elapsed.as_secs_f64()
        )?;
        writeln!(f, "  faults: {}", faults.join(" "))?;
        writeln!(f, "  sends: {}; {}", self.sends, self.report)?;
        let p = &self.pushes;
        writeln!(
            f,
            "  pushes: {} delivered ({} woke a running device), {} answered 503, {} answered 429, {} lost, {} unregistered",
            p.delivered, self.woken, p.down, p.throttled, p.lost, p.unregistered
        )?;
        for u in &self.unsettled {
            writeln!(f, "  did not catch up: {u}")?;
        }
        for k in &self.short {
            writeln!(f, "  too few {} faults", k.name())?;
        }
        Ok(())
    }
}

/// The relay process.
struct Relay {
    child: Option<Child>,
    addr: SocketAddr,
    db: PathBuf,
    log: PathBuf,
    push_config: PathBuf,
}

impl Relay {
    async fn start(
        exe: &Path,
        db: &Path,
        listen: SocketAddr,
        log: &Path,
        push_config: &Path,
    ) -> anyhow::Result<Relay> {
        let mut relay = Relay {
            child: None,
            addr: listen,
            db: db.to_owned(),
            log: log.to_owned(),
            push_config: push_config.to_owned(),
        };
        relay.spawn(exe).await?;
        Ok(relay)
    }

    async fn spawn(&mut self, exe: &Path) -> anyhow::Result<()> {
        // The address may still be held for a moment by the killed process.
        let mut tries = 0;
        loop {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log)?;
            let mut child = Command::new(exe)
                .arg("serve")
                .arg("--listen")
                .arg(self.addr.to_string())
                .arg("--db")
                .arg(&self.db)
                .args(["--min-heartbeat", "1s", "--heartbeat-grace", "2s"])
                .args(["--max-connections-per-user", "64"])
                .arg("--push-config")
                .arg(&self.push_config)
                .args(["--push-frozen-after", "1s", "--push-rearm", "2s"])
                .env("KEEPWIRE_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("cannot run {}", exe.display()))?;
            let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
            let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await;
            if let Ok(Ok(Some(url))) = first {
                let addr = url
                    .trim()
                    .trim_start_matches("ws://")
                    .parse()
                    .with_context(|| format!("unexpected relay banner {url:?}"))?;
                self.addr = addr;
                // Keep reading so a later line never meets a closed pipe.
                tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                self.child = Some(child);
                return Ok(());
            }
            let _ = child.kill().await;
            tries += 1;
            if tries == 20 {
                bail!("the relay did not start; see {}", self.log.display());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    fn up(&self) -> bool {
        self.child.is_some()
    }

    /// SIGTERM and wait (SIGKILL after 20 s).
    async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Some(pid) = c.id() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            if tokio::time::timeout(Duration::from_secs(20), c.wait())
                .await
                .is_err()
            {
                let _ = c.kill().await;
            }
        }
    }
}

/// A device process and the state the run believes it is in.
struct Device {
    spec: DeviceSpec,
    spec_path: PathBuf,
    log: PathBuf,
    user: usize,
    convs: Vec<u64>,
    proxy: FaultProxy,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    answers: mpsc::UnboundedReceiver<String>,
    foreground: bool,
}

impl Device {
    async fn spawn(&mut self, exe: &Path) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut child = Command::new(exe)
            .args(["device", "--spec"])
            .arg(&self.spec_path)
            .env("KEEPWIRE_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot run {}", exe.display()))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        tokio::spawn(async move {
            while let Ok(Some(l)) = lines.next_line().await {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        self.stdin = child.stdin.take();
        self.child = Some(child);
        self.answers = rx;
        self.foreground = false;
        Ok(())
    }

    fn up(&self) -> bool {
        self.child.is_some()
    }

    /// Writes a command; false if the process is gone.
    async fn tell(&mut self, cmd: &str) -> bool {
        let Some(stdin) = self.stdin.as_mut() else {
            return false;
        };
        stdin.write_all(format!("{cmd}\n").as_bytes()).await.is_ok() && stdin.flush().await.is_ok()
    }

    /// Waits for an answer starting with one of `prefixes`.
    async fn answer(&mut self, prefixes: &[&str], within: Duration) -> Option<String> {
        let deadline = Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.answers.recv()).await {
                Ok(Some(a)) if prefixes.iter().any(|p| a.starts_with(p)) => return Some(a),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return None,
            }
        }
    }

    async fn kill9(&mut self) {
        self.stdin = None;
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    /// Asks the process to quit and waits for it (SIGKILL after 20 s).
    async fn quit(&mut self) {
        if self.tell("quit").await {
            self.answer(&["bye"], Duration::from_secs(20)).await;
        }
        self.stdin = None;
        if let Some(mut c) = self.child.take()
            && tokio::time::timeout(Duration::from_secs(20), c.wait())
                .await
                .is_err()
        {
            let _ = c.kill().await;
        }
    }
}

/// Something to undo later.
enum Heal {
    Proxy(usize),
    IdleCut(usize),
    Relay,
    Device(usize),
    Dns(usize),
    Network(usize),
    Push,
}

/// Runs one seed.
pub async fn run(cfg: &RunConfig) -> anyhow::Result<Outcome> {
    let started = std::time::Instant::now();
    let (dir, temp) = match &cfg.dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!(
                "keepwire-chaos-{}-{}-{:x}",
                cfg.seed,
                std::process::id(),
                rand::random::<u32>()
            )),
            true,
        ),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let say = |what: String| {
        if cfg.verbose {
            eprintln!("[{:>6.2}s] {what}", started.elapsed().as_secs_f64());
        }
    };

    // Users, tokens and conversations, straight into the relay's database.
    let db = dir.join("relay.db");
    let users: Vec<String> = (0..cfg.users.max(2)).map(|i| format!("u{i}")).collect();
    let mut tokens = Vec::new();
    let mut convs: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    {
        let store = SqliteStore::open(&db, SqliteOptions::default())?;
        let mut ids = Vec::new();
        for u in &users {
            ids.push(store.create_user(u).await?);
            tokens.push(
                store
                    .issue_token(u, Duration::from_secs(30 * 86400))
                    .await?
                    .token,
            );
        }
        let mut create =
            async |creator: usize, kind: ConvKind, members: Vec<String>, key: String| {
                let (info, _) = store
                    .conv_create(
                        Actor::User(ids[creator]),
                        ConvCreate {
                            rid: key.clone(),
                            key,
                            kind,
                            members,
                            name: None,
                        },
                        1000,
                    )
                    .await?;
                convs.insert(info.id, info.members);
                anyhow::Ok(())
            };
        create(0, ConvKind::Group, users[1..].to_vec(), "everyone".into()).await?;
        for i in 0..users.len() {
            let j = (i + 1) % users.len();
            if users.len() > 2 || i == 0 {
                create(i, ConvKind::Direct, vec![users[j].clone()], format!("d{i}")).await?;
            }
        }
        store.close().await;
    }

    let (push, mut pushes) = PushMock::start().await?;
    let push_config = push.write_config(&dir)?;
    let mut relay = Relay::start(
        &cfg.exe,
        &db,
        "127.0.0.1:0".parse().expect("address"),
        &dir.join("relay.log"),
        &push_config,
    )
    .await?;
    say(format!("relay at {}", relay.addr));

    let mut devices: Vec<Device> = Vec::new();
    for (u, user) in users.iter().enumerate() {
        for k in 0..cfg.devices_per_user.max(1) {
            let name = format!("{user}d{k}");
            let proxy = FaultProxy::start("127.0.0.1:0".parse().expect("address"), relay.addr)
                .await
                .context("cannot start a fault proxy")?;
            let background = ["keep", "linger:2s", "wake-only"][rng.random_range(0..3)];
            let lose = (cfg.sabotage == Some(Sabotage::LoseAck) && devices.is_empty()).then_some(3);
            let spec = DeviceSpec {
                name: name.clone(),
                home: dir.join(&name),
                journal: dir.join(format!("{name}.journal")),
                proxy: proxy.addr(),
                token: tokens[u].clone(),
                background: background.into(),
                lose,
                push_token: Some(format!("chaos-{name}")),
            };
            let spec_path = dir.join(format!("{name}.json"));
            std::fs::write(&spec_path, serde_json::to_vec_pretty(&spec)?)?;
            let (_, answers) = mpsc::unbounded_channel();
            let mut d = Device {
                spec,
                spec_path,
                log: dir.join(format!("{name}.log")),
                user: u,
                convs: convs
                    .iter()
                    .filter(|(_, m)| m.contains(user))
                    .map(|(id, _)| *id)
                    .collect(),
                proxy,
                child: None,
                stdin: None,
                answers,
                foreground: false,
            };
            d.spawn(&cfg.device_exe).await?;
            say(format!("{name} ({background}) through {}", d.proxy.addr()));
            devices.push(d);
        }
    }

    // Each device registers with one sync before the chaos, as an app does at
    // login: a device the relay has never seen starts from its user's recent
    // history (the history window), not from the beginning, so messages sent
    // before its first connection are not its to receive.
    for d in devices.iter_mut() {
        d.tell("settle 60").await;
        match d
            .answer(&["settled", "unsettled"], Duration::from_secs(90))
            .await
        {
            Some(a) if a == "settled" => {}
            other => bail!("{} did not register: {other:?}", d.spec.name),
        }
    }

    // The schedule.
    let mut faults: BTreeMap<FaultKind, u32> = FaultKind::ALL.iter().map(|k| (*k, 0)).collect();
    let mut heals: Vec<(Instant, Heal)> = Vec::new();
    let mut sends = 0u64;
    let until = Instant::now() + cfg.duration;
    let mut topping_up = false;
    let mut woken = 0u64;
    loop {
        // Pushes the provider delivered: the OS hands them to the app.
        while let Ok((token, _data)) = pushes.try_recv() {
            if let Some(dev) = devices
                .iter_mut()
                .find(|d| d.spec.push_token.as_deref() == Some(token.as_str()))
                && dev.up()
                && dev.tell("push").await
            {
                woken += 1;
            }
        }
        let now = Instant::now();
        let mut i = 0;
        while i < heals.len() {
            if heals[i].0 <= now {
                let (_, h) = heals.swap_remove(i);
                heal(&mut relay, &mut devices, &push, h, cfg).await?;
            } else {
                i += 1;
            }
        }
        let kind = if now < until {
            if rng.random_bool(0.1) {
                Some(FaultKind::ALL[rng.random_range(0..FaultKind::ALL.len())])
            } else {
                None
            }
        } else {
            // Top up the kinds below the minimum, then stop.
            topping_up = true;
            faults
                .iter()
                .find(|(_, n)| **n < cfg.min_each)
                .map(|(k, _)| *k)
        };
        if topping_up && kind.is_none() {
            break;
        }
        let d = rng.random_range(0..devices.len());
        match kind {
            None => {
                if devices[d].up() {
                    let conv = devices[d].convs[rng.random_range(0..devices[d].convs.len())];
                    if devices[d].tell(&format!("send {conv}")).await {
                        sends += 1;
                    }
                }
            }
            Some(k) => {
                let injected =
                    inject(k, d, &mut rng, &mut relay, &mut devices, &push, &mut heals).await?;
                if injected {
                    *faults.get_mut(&k).expect("every kind") += 1;
                    say(format!("{} on {}", k.name(), devices[d].spec.name));
                }
            }
        }
        let pause = if topping_up { 50..150 } else { 10..50 };
        tokio::time::sleep(Duration::from_millis(rng.random_range(pause))).await;
    }

    // Heal everything, then let every device catch up twice: the first round
    // flushes every outbox, the second fetches what the others flushed.
    say("healing".into());
    for (_, h) in std::mem::take(&mut heals) {
        heal(&mut relay, &mut devices, &push, h, cfg).await?;
    }
    push.set(PushFault::Pass);
    if !relay.up() {
        relay.spawn(&cfg.exe).await?;
    }
    for d in devices.iter_mut() {
        d.proxy.set(Fault::Pass);
        d.proxy.set_idle_cut(None);
        if !d.up() {
            d.spawn(&cfg.device_exe).await?;
        }
        for c in ["dns ok", "net up", "app fg"] {
            d.tell(c).await;
        }
    }
    let mut unsettled = Vec::new();
    for round in 0..2 {
        for d in devices.iter_mut() {
            d.tell("settle 120").await;
        }
        for d in devices.iter_mut() {
            match d
                .answer(&["settled", "unsettled"], Duration::from_secs(150))
                .await
            {
                Some(a) if a == "settled" => {}
                other => {
                    unsettled.push(format!("{} (round {}): {other:?}", d.spec.name, round + 1))
                }
            }
        }
        say(format!("settle round {} done", round + 1));
    }
    for d in devices.iter_mut() {
        d.quit().await;
    }
    relay.stop().await;

    if cfg.sabotage == Some(Sabotage::DeleteStored) {
        delete_one_stored(&devices, &mut rng)?;
    }
    let subject = Subject {
        relay_db: db,
        devices: devices
            .iter()
            .map(|d| DeviceFiles {
                name: d.spec.name.clone(),
                user: users[d.user].clone(),
                home: d.spec.home.clone(),
                journal: d.spec.journal.clone(),
            })
            .collect(),
        convs,
    };
    let report = check::check(&subject)?;
    let short = faults
        .iter()
        .filter(|(_, n)| **n < cfg.min_each)
        .map(|(k, _)| *k)
        .collect();
    let outcome = Outcome {
        seed: cfg.seed,
        faults,
        sends,
        pushes: push.counts(),
        woken,
        unsettled,
        report,
        short,
        elapsed: started.elapsed(),
        dir: dir.clone(),
    };
    drop(devices);
    if temp && outcome.ok() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(outcome)
}

/// Injects one fault on device `d` (or the relay); false if it did not apply now.
async fn inject(
    k: FaultKind,
    d: usize,
    rng: &mut StdRng,
    relay: &mut Relay,
    devices: &mut [Device],
    push: &PushMock,
    heals: &mut Vec<(Instant, Heal)>,
) -> anyhow::Result<bool> {
    let now = Instant::now();
    let ms = |rng: &mut StdRng, lo: u64, hi: u64| Duration::from_millis(rng.random_range(lo..hi));
    let dev = &mut devices[d];
    match k {
        FaultKind::ProxyReset => {
            dev.proxy.set(Fault::Reset);
            heals.push((now + ms(rng, 10, 300), Heal::Proxy(d)));
        }
        FaultKind::ProxyBlackhole => {
            dev.proxy.set(Fault::Blackhole);
            heals.push((now + ms(rng, 500, 3000), Heal::Proxy(d)));
        }
        FaultKind::ProxyLatency => {
            dev.proxy.set(Fault::Latency(ms(rng, 20, 300)));
            heals.push((now + ms(rng, 1000, 3000), Heal::Proxy(d)));
        }
        FaultKind::ProxyCloseAfter => {
            dev.proxy
                .set(Fault::CloseAfter(rng.random_range(200..20_000)));
            heals.push((now + ms(rng, 1000, 3000), Heal::Proxy(d)));
        }
        FaultKind::ProxyIdleCut => {
            dev.proxy.set_idle_cut(Some(ms(rng, 300, 1500)));
            heals.push((now + ms(rng, 2000, 4000), Heal::IdleCut(d)));
        }
        FaultKind::RelayKill => {
            if !relay.up() {
                return Ok(false);
            }
            relay.kill9().await;
            heals.push((now + ms(rng, 0, 1500), Heal::Relay));
        }
        FaultKind::DeviceKill => {
            if !dev.up() {
                return Ok(false);
            }
            dev.kill9().await;
            heals.push((now + ms(rng, 0, 1000), Heal::Device(d)));
        }
        FaultKind::AppFlip => {
            let fg = !dev.foreground;
            if !dev.tell(if fg { "app fg" } else { "app bg" }).await {
                return Ok(false);
            }
            dev.foreground = fg;
        }
        FaultKind::DnsFailure => {
            if !dev.tell("dns fail").await {
                return Ok(false);
            }
            heals.push((now + ms(rng, 500, 3000), Heal::Dns(d)));
        }
        FaultKind::NetworkFlip => {
            if !dev.tell("net down").await {
                return Ok(false);
            }
            heals.push((now + ms(rng, 200, 2000), Heal::Network(d)));
        }
        FaultKind::PushDown | FaultKind::PushThrottled | FaultKind::PushLost => {
            push.set(match k {
                FaultKind::PushDown => PushFault::Down,
                FaultKind::PushThrottled => PushFault::Throttled,
                _ => PushFault::Lose,
            });
            heals.push((now + ms(rng, 1000, 3000), Heal::Push));
        }
        FaultKind::PushUnregistered => {
            let Some(token) = &dev.spec.push_token else {
                return Ok(false);
            };
            push.unregister_once(token);
        }
    }
    Ok(true)
}

async fn heal(
    relay: &mut Relay,
    devices: &mut [Device],
    push: &PushMock,
    h: Heal,
    cfg: &RunConfig,
) -> anyhow::Result<()> {
    match h {
        Heal::Push => push.set(PushFault::Pass),
        Heal::Proxy(d) => devices[d].proxy.set(Fault::Pass),
        Heal::IdleCut(d) => devices[d].proxy.set_idle_cut(None),
        Heal::Relay => {
            if !relay.up() {
                relay.spawn(&cfg.exe).await?;
            }
        }
        Heal::Device(d) => {
            if !devices[d].up() {
                devices[d].spawn(&cfg.device_exe).await?;
            }
        }
        Heal::Dns(d) => {
            devices[d].tell("dns ok").await;
        }
        Heal::Network(d) => {
            devices[d].tell("net up").await;
        }
    }
    Ok(())
}

/// The checker's self-test: removes one message from one device's store.
fn delete_one_stored(devices: &[Device], rng: &mut StdRng) -> anyhow::Result<()> {
    let start = rng.random_range(0..devices.len());
    for i in 0..devices.len() {
        let d = &devices[(start + i) % devices.len()];
        let db = rusqlite::Connection::open(keepwire_client::Home::new(&d.spec.home).database())?;
        let n = db.execute(
            "DELETE FROM messages WHERE id = (SELECT id FROM messages ORDER BY id LIMIT 1 OFFSET \
             (SELECT COUNT(*) / 2 FROM messages))",
            [],
        )?;
        if n == 1 {
            return Ok(());
        }
    }
    bail!("no stored message to delete")
}
