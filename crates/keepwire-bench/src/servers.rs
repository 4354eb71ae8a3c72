//! The servers under test: keepwire (a `keepwire serve` process on a
//! database prepared with users, tokens and conversations) and the peers in
//! `bench/peers/`, each started as its own process, optionally pinned.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use keepwire_proto::{ConvCreate, ConvKind};
use keepwire_server::store::Actor;
use keepwire_server::{AdminStore as _, RelayStore as _};
use keepwire_server::{SqliteOptions, SqliteStore};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::{Child, Command};

use crate::{Common, TargetArg};

/// A server under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Keepwire,
    NodeWs,
    PythonWs,
    SocketIo,
    Mosquitto,
}

impl From<TargetArg> for Target {
    fn from(t: TargetArg) -> Self {
        match t {
            TargetArg::Keepwire => Target::Keepwire,
            TargetArg::NodeWs => Target::NodeWs,
            TargetArg::PythonWs => Target::PythonWs,
            TargetArg::SocketIo => Target::SocketIo,
            TargetArg::Mosquitto => Target::Mosquitto,
        }
    }
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Keepwire => "keepwire",
            Target::NodeWs => "node-ws",
            Target::PythonWs => "python-ws",
            Target::SocketIo => "socketio",
            Target::Mosquitto => "mosquitto",
        }
    }
}

/// Who connects: users (with tokens, for keepwire) and conversations.
pub struct Roster {
    /// (user name, token) by index.
    users: Vec<(String, String)>,
    /// Conversations to create: members by user index (the first creates it).
    conv_members: Vec<Vec<usize>>,
    convs: Vec<u64>,
    members: usize,
}

impl Roster {
    /// One user whose devices all connect.
    pub fn idle(_conns: usize) -> Roster {
        Roster::new(vec!["idle".into()], vec![], 0)
    }

    /// Senders `s{i}`, each in a direct conversation with `r{i}`.
    pub fn pairs(n: usize) -> Roster {
        let mut users = Vec::new();
        let mut convs = Vec::new();
        for i in 0..n {
            users.push(format!("s{i}"));
            users.push(format!("r{i}"));
            convs.push(vec![2 * i, 2 * i + 1]);
        }
        Roster::new(users, convs, 0)
    }

    /// Groups of one publisher and `members` subscribers.
    pub fn groups(groups: usize, members: usize) -> Roster {
        let mut users = Vec::new();
        let mut convs = Vec::new();
        for g in 0..groups {
            let first = users.len();
            users.push(format!("g{g}p"));
            for m in 0..members {
                users.push(format!("g{g}s{m}"));
            }
            convs.push((first..users.len()).collect());
        }
        Roster::new(users, convs, members)
    }

    fn new(names: Vec<String>, conv_members: Vec<Vec<usize>>, members: usize) -> Roster {
        Roster {
            users: names.into_iter().map(|n| (n, String::new())).collect(),
            conv_members,
            convs: Vec::new(),
            members,
        }
    }

    /// The token of user `i` (or of sender `i` in a pairs roster).
    pub fn token(&self, i: usize) -> &str {
        let i = if self.members == 0 && self.users.len() > 1 {
            2 * i
        } else {
            i
        };
        &self.users[i].1
    }

    /// The token of user `u`, whatever the roster's shape.
    pub fn user_token(&self, u: usize) -> &str {
        &self.users[u].1
    }

    /// The token of the receiver of pair `i`.
    pub fn receiver_token(&self, i: usize) -> &str {
        &self.users[2 * i + 1].1
    }

    /// The conversation of pair or group `i` (0 for the peers).
    pub fn conv(&self, i: usize) -> u64 {
        self.convs.get(i).copied().unwrap_or(0)
    }

    /// User index of group `g`'s publisher.
    pub fn publisher(&self, g: usize) -> usize {
        g * (self.members + 1)
    }

    /// User index of subscriber `m` of group `g`.
    pub fn subscriber(&self, g: usize, m: usize) -> usize {
        g * (self.members + 1) + 1 + m
    }
}

/// A running server under test; killed on drop.
pub struct Server {
    pub pid: u32,
    exe: PathBuf,
    db: PathBuf,
    sender_ids: Vec<keepwire_server::store::UserId>,
    pub roster: Roster,
    url: String,
    target: Target,
    child: Child,
    dir: PathBuf,
    temp: bool,
    core: Option<u32>,
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

impl Server {
    pub async fn start(c: &Common, target: Target, mut roster: Roster) -> anyhow::Result<Server> {
        let (dir, temp) = match &c.dir {
            Some(d) => (d.clone(), false),
            None => (
                std::env::temp_dir().join(format!("keepwire-bench-{}", std::process::id())),
                true,
            ),
        };
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let exe = match &c.keepwire {
            Some(p) => p.clone(),
            None => std::env::current_exe()?.with_file_name("keepwire"),
        };
        let db = dir.join("relay.db");
        let mut sender_ids = Vec::new();
        let mut cmd = pinned(c.server_core);
        match target {
            Target::Keepwire => {
                sender_ids = prepare(&db, &mut roster).await?;
                keepwire_serve(&mut cmd, &exe, &db, "127.0.0.1:0");
            }
            Target::NodeWs => {
                cmd.args(["node", "ws-server.js", "0"])
                    .current_dir(repo().join("bench/peers"));
            }
            Target::PythonWs => {
                let py = repo().join("target/bench-venv/bin/python");
                if !py.exists() {
                    bail!("python-ws needs bench/setup.sh (a venv with websockets)");
                }
                cmd.arg(py)
                    .arg(repo().join("bench/peers/py-server.py"))
                    .arg("0");
            }
            Target::SocketIo => {
                cmd.args(["node", "sio-server.js", "0"])
                    .current_dir(repo().join("bench/peers"));
            }
            Target::Mosquitto => {}
        }
        let (child, url) = if target == Target::Mosquitto {
            mosquitto(cmd, &dir).await?
        } else {
            launch(cmd, &dir, target.name()).await?
        };
        let pid = child.id().context("pid")?;
        // Behind taskset (which execs) and env (which execs) the pid is the server's.
        Ok(Server {
            pid,
            exe,
            db,
            sender_ids,
            roster,
            url,
            target,
            child,
            dir,
            temp,
            core: c.server_core,
        })
    }

    /// Kills keepwire with SIGKILL (no flush, no close frames) and reaps it.
    pub async fn kill_hard(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// Starts keepwire again on the same database and address (after
    /// [`Server::kill_hard`]).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        let mut cmd = pinned(self.core);
        let listen = self.url.trim_start_matches("ws://").to_owned();
        keepwire_serve(&mut cmd, &self.exe, &self.db, &listen);
        let (child, url) = launch(cmd, &self.dir, "keepwire").await?;
        self.pid = child.id().context("pid")?;
        self.child = child;
        if url != self.url {
            bail!("keepwire came back on {url}, not {}", self.url);
        }
        Ok(())
    }

    /// Where this run keeps its files.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// The keepwire binary.
    pub fn keepwire_exe(&self) -> &std::path::Path {
        &self.exe
    }

    /// Stores `n` messages from the sender of pair `pair` straight into the
    /// relay's database (alongside the running relay: SQLite WAL), many per
    /// commit.
    pub async fn seed(&self, pair: usize, n: usize) -> anyhow::Result<()> {
        self.seed_from(pair, 0, n).await
    }

    /// Like [`Server::seed`], numbering messages from `first`.
    pub async fn seed_from(&self, pair: usize, first: usize, n: usize) -> anyhow::Result<()> {
        self.seed_pairs(&[pair], first, n).await
    }

    /// Stores messages `first..first + n` from the sender of every pair in
    /// `pairs` (bodies start with the message number, 20 digits).
    pub async fn seed_pairs(&self, pairs: &[usize], first: usize, n: usize) -> anyhow::Result<()> {
        let store = SqliteStore::open(&self.db, SqliteOptions::default())?;
        let sends: Vec<_> = pairs
            .iter()
            .flat_map(|&p| (first..first + n).map(move |i| (p, i)))
            .collect();
        for chunk in sends.chunks(2000) {
            let tasks: Vec<_> = chunk
                .iter()
                .map(|&(pair, i)| {
                    let store = store.clone();
                    let (user, conv) = (self.sender_ids[2 * pair], self.roster.conv(pair));
                    tokio::spawn(async move {
                        store
                            .send(
                                Actor::User(user),
                                "seed",
                                keepwire_proto::Send {
                                    cid: format!("seed{i:016x}"),
                                    conv,
                                    kind: "text".into(),
                                    body: format!("{i:020}{}", "x".repeat(80)),
                                },
                            )
                            .await
                    })
                })
                .collect();
            for t in tasks {
                t.await??;
            }
        }
        store.close().await;
        Ok(())
    }

    /// The URL a connection of user `i` opens.
    pub fn url_for(&self, _i: usize) -> String {
        self.url.clone()
    }

    /// The URL a member of group `g` opens (peers: the room in the query).
    pub fn url_for_group(&self, g: usize) -> String {
        crate::wire::Wire::of(self.target).url(&self.url, g)
    }

    /// A counter from keepwire's /metrics.
    pub async fn metric(&self, name: &str) -> Option<u64> {
        let host = self.url.trim_start_matches("ws://");
        let mut s = tokio::net::TcpStream::connect(host).await.ok()?;
        s.write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).await.ok()?;
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| v as u64)
    }

    /// Stops the server (SIGTERM, then SIGKILL after 10 s).
    pub async fn stop(mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
        if self.temp {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A command pinned to `core` with `taskset`, or run through `env` (both exec,
/// so the child's pid is the server's).
fn pinned(core: Option<u32>) -> Command {
    match core {
        Some(core) => {
            let mut cmd = Command::new("taskset");
            cmd.arg("-c").arg(core.to_string());
            cmd
        }
        None => Command::new("env"),
    }
}

/// `keepwire serve` on `db` at `listen`, with limits out of the way of load.
fn keepwire_serve(cmd: &mut Command, exe: &std::path::Path, db: &std::path::Path, listen: &str) {
    cmd.arg(exe)
        .args(["serve", "--listen", listen, "--db"])
        .arg(db)
        .args(["--sends-per-sec", "1000000", "--send-burst", "1000000"])
        .args(["--user-sends-per-sec", "1000000"])
        .args(["--max-connections-per-user", "1000000"])
        .args(["--max-group-size", "100000"])
        .env("KEEPWIRE_LOG", "warn");
}

/// Spawns a server that prints its URL as its first line of output.
async fn launch(
    mut cmd: Command,
    dir: &std::path::Path,
    name: &str,
) -> anyhow::Result<(Child, String)> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("server.log"))?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let url = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .context("the server did not start in 30 s")??
        .with_context(|| format!("{name} exited; see {}", dir.join("server.log").display()))?;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, url.trim().to_owned()))
}

/// Mosquitto 2 with a plain MQTT listener (Debian's build does not start
/// with websockets alone) and a websockets listener, persistence on (it
/// snapshots in-memory state periodically, it does not fsync each message).
async fn mosquitto(mut cmd: Command, dir: &std::path::Path) -> anyhow::Result<(Child, String)> {
    let exe = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .context("mosquitto is not installed (bench/setup.sh installs it with apt-get)")?;
    let free_port = || -> anyhow::Result<u16> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port())
    };
    let (mqtt_port, ws_port) = (free_port()?, free_port()?);
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "per_listener_settings false\nallow_anonymous true\npersistence true\n\
             persistence_location {}/\nlog_dest stderr\nlog_type error\n\
             listener {mqtt_port} 127.0.0.1\nprotocol mqtt\n\
             listener {ws_port} 127.0.0.1\nprotocol websockets\n",
            dir.display()
        ),
    )?;
    cmd.arg(exe).arg("-c").arg(&conf);
    let log = std::fs::File::create(dir.join("server.log"))?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("cannot start mosquitto")?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", ws_port))
            .await
            .is_ok()
        {
            return Ok((child, format!("ws://127.0.0.1:{ws_port}")));
        }
        if let Some(st) = child.try_wait()? {
            bail!(
                "mosquitto exited ({st}); see {}",
                dir.join("server.log").display()
            );
        }
        if tokio::time::Instant::now() > deadline {
            bail!("mosquitto did not listen within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Users, tokens and conversations, straight into a new relay database;
/// returns the users' ids.
async fn prepare(
    db: &std::path::Path,
    roster: &mut Roster,
) -> anyhow::Result<Vec<keepwire_server::store::UserId>> {
    let store = SqliteStore::open(db, SqliteOptions::default())?;
    let mut ids = Vec::with_capacity(roster.users.len());
    // Concurrently, so the relay's group commit makes thousands of users quick.
    for chunk in roster.users.chunks_mut(1000) {
        let tasks: Vec<_> = chunk
            .iter()
            .map(|(name, _)| {
                let (store, name) = (store.clone(), name.clone());
                tokio::spawn(async move {
                    let id = store.create_user(&name).await?;
                    let token = store.issue_token(&name, Duration::from_secs(86400)).await?;
                    anyhow::Ok((id, token.token))
                })
            })
            .collect();
        for ((_, token), task) in chunk.iter_mut().zip(tasks) {
            let (id, t) = task.await??;
            ids.push(id);
            *token = t;
        }
    }
    let convs: Vec<_> = roster
        .conv_members
        .iter()
        .enumerate()
        .map(|(k, members)| {
            let (first, rest) = members.split_first().context("empty conversation")?;
            let create = ConvCreate {
                rid: format!("r{k}"),
                key: format!("k{k}"),
                kind: if rest.len() == 1 {
                    ConvKind::Direct
                } else {
                    ConvKind::Group
                },
                members: rest.iter().map(|i| roster.users[*i].0.clone()).collect(),
                name: None,
            };
            anyhow::Ok((ids[*first], create))
        })
        .collect::<Result<_, _>>()?;
    for chunk in convs.chunks(1000) {
        let tasks: Vec<_> = chunk
            .iter()
            .cloned()
            .map(|(creator, create)| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .conv_create(Actor::User(creator), create, 100_000)
                        .await
                })
            })
            .collect();
        for task in tasks {
            roster.convs.push(task.await??.0.id);
        }
    }
    store.close().await;
    Ok(ids)
}
