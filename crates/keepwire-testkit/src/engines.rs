//! Engines of a test's own, to crash and restart at will (never the shared
//! ones on the machine): [`OwnPostgres`], a PostgreSQL 15 cluster in a
//! temporary directory on a free port, and [`OwnNats`], a `nats-server` on a
//! free port. Both stop their processes and remove their directories on
//! drop, also when a test fails.
//!
//! PostgreSQL refuses to run as root, so its commands run as the `postgres`
//! user; [`OwnPostgres::unavailable`] says why a machine cannot run them (a
//! test skips, loudly, instead of failing).

use std::net::TcpListener;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Where PostgreSQL 15's programs are (Debian's layout).
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A free TCP port on 127.0.0.1 (free when asked: bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

/// A directory for an engine's files: on tmpfs when there is one (an fsync
/// costs nothing there, and a process crash, which is all these tests cause,
/// loses nothing a disk would keep), else the temp dir.
fn engine_dir(tag: &str) -> PathBuf {
    let base = Path::new("/dev/shm");
    let base = if base.is_dir() {
        base.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!(
        "keepwire-{tag}-{}-{:x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::create_dir_all(&dir).expect("create an engine directory");
    dir
}

/// The `postgres` user's uid and gid, from /etc/passwd.
fn postgres_ids() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    let line = passwd.lines().find(|l| l.starts_with("postgres:"))?;
    let f: Vec<&str> = line.split(':').collect();
    Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?))
}

/// Whether this process runs as root.
fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// Changes the owner of `path` (and everything in it) to `postgres`.
fn chown_to_postgres(path: &Path) {
    let out = Command::new("chown")
        .arg("-R")
        .arg("postgres:")
        .arg(path)
        .output()
        .expect("run chown");
    assert!(out.status.success(), "chown {}: {out:?}", path.display());
}

/// A PostgreSQL cluster of the test's own: `initdb` in a temporary
/// directory, started on a free port of 127.0.0.1 (trust authentication,
/// user `postgres`). Stopped (`-m immediate`) and removed on drop.
pub struct OwnPostgres {
    /// The directory holding `data`, the socket and the log.
    dir: PathBuf,
    port: u16,
    running: bool,
    ids: (u32, u32),
}

impl OwnPostgres {
    /// Why this machine cannot run an own PostgreSQL (`None`: it can).
    pub fn unavailable() -> Option<String> {
        if !Path::new(PG_BIN).join("pg_ctl").exists() {
            return Some(format!("no PostgreSQL 15 programs in {PG_BIN}"));
        }
        if postgres_ids().is_none() {
            return Some("no postgres user".into());
        }
        if !is_root() {
            return Some("not root (the tests run PostgreSQL as the postgres user)".into());
        }
        None
    }

    /// `initdb` and start on a free port; panics when that fails.
    pub fn start() -> OwnPostgres {
        let ids = postgres_ids().expect("a postgres user");
        let dir = engine_dir("pg");
        chown_to_postgres(&dir);
        let mut pg = OwnPostgres {
            dir,
            port: free_port(),
            running: false,
            ids,
        };
        let data = pg.data();
        pg.run_ok(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        );
        pg.start_again();
        pg
    }

    /// A streaming standby of this (running) cluster: `pg_basebackup -R`
    /// into a directory of its own, started on another free port.
    pub fn standby(&self) -> OwnPostgres {
        let dir = engine_dir("pg-standby");
        chown_to_postgres(&dir);
        let mut sb = OwnPostgres {
            dir,
            port: free_port(),
            running: false,
            ids: self.ids,
        };
        let data = sb.data();
        let port = self.port.to_string();
        sb.run_ok(
            "pg_basebackup",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-D",
                data.to_str().unwrap(),
                "-R",
                "-X",
                "stream",
                // Not a spread checkpoint (that waits for many seconds).
                "--checkpoint=fast",
                "--no-sync",
            ],
        );
        sb.start_again();
        sb
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Runs one of PostgreSQL's programs as `postgres`.
    fn run(&self, program: &str, args: &[&str]) -> Output {
        Command::new(Path::new(PG_BIN).join(program))
            .args(args)
            .current_dir(&self.dir)
            .uid(self.ids.0)
            .gid(self.ids.1)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {program}: {e}"))
    }

    fn run_ok(&self, program: &str, args: &[&str]) -> Output {
        let out = self.run(program, args);
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}{}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        out
    }

    fn pg_ctl(&self, args: &[&str]) -> Output {
        let data = self.data();
        let mut all = vec!["-D", data.to_str().unwrap()];
        all.extend_from_slice(args);
        self.run("pg_ctl", &all)
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `db` on it.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Starts the server (again, after [`OwnPostgres::crash`] or
    /// [`OwnPostgres::stop`]) on its port and waits until it accepts
    /// connections.
    pub fn start_again(&mut self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("log");
        let out = self.pg_ctl(&[
            "-o",
            &opts,
            "-l",
            log.to_str().unwrap(),
            "-w",
            "-t",
            "60",
            "start",
        ]);
        assert!(
            out.status.success(),
            "pg_ctl start failed: {out:?}; log:\n{}",
            self.log()
        );
        self.running = true;
    }

    /// Moves the (stopped) server to another port: the next start listens
    /// there (a failover that takes over the old primary's address).
    pub fn set_port(&mut self, port: u16) {
        assert!(!self.running, "stop the server before moving it");
        self.port = port;
    }

    /// A crash: `pg_ctl -m immediate stop` (every backend quits at once, no
    /// checkpoint; the next start recovers from the WAL).
    pub fn crash(&mut self) {
        self.stop_with("immediate");
    }

    /// A clean stop (`-m fast`).
    pub fn stop(&mut self) {
        self.stop_with("fast");
    }

    fn stop_with(&mut self, mode: &str) {
        let out = self.pg_ctl(&["-m", mode, "-w", "stop"]);
        assert!(
            out.status.success(),
            "pg_ctl -m {mode} stop failed: {out:?}"
        );
        self.running = false;
    }

    /// `pg_ctl promote` (a standby becomes a primary on a new timeline).
    pub fn promote(&self) {
        let out = self.pg_ctl(&["-w", "promote"]);
        assert!(out.status.success(), "pg_ctl promote failed: {out:?}");
    }

    /// Runs SQL with `psql` on database `db`; its unaligned, tuples-only
    /// output (`Err`: psql's error).
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(Path::new(PG_BIN).join("psql"))
            .args([
                "-X",
                "-v",
                "ON_ERROR_STOP=1",
                "-At",
                "-h",
                "127.0.0.1",
                "-U",
            ])
            .arg("postgres")
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-d")
            .arg(db)
            .arg("-c")
            .arg(sql)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("run psql: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Waits until `sql` on `db` answers `want` (replication catching up).
    /// Blocks the thread.
    pub fn wait_for(&self, db: &str, sql: &str, want: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let got = self.psql(db, sql);
            if got.as_deref() == Ok(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{sql} never answered {want:?} (last: {got:?})"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The postmaster's pid, from its pid file.
    fn postmaster_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.data().join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        if self.running {
            let out = self.pg_ctl(&["-m", "immediate", "-w", "stop"]);
            if !out.status.success()
                && let Some(pid) = self.postmaster_pid()
            {
                // Ours (it was running) and it did not stop: kill it (its
                // backends follow).
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `nats-server` of the test's own on a free port (core NATS only).
/// Killed and its directory removed on drop.
pub struct OwnNats {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl OwnNats {
    /// Why this machine cannot run one (`None`: it can).
    pub fn unavailable() -> Option<String> {
        match Command::new("nats-server")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
        {
            Ok(s) if s.success() => None,
            _ => Some("no nats-server on PATH".into()),
        }
    }

    /// Starts on a free port and waits until it accepts connections.
    pub fn start() -> OwnNats {
        let mut n = OwnNats {
            child: None,
            port: free_port(),
            dir: engine_dir("nats"),
        };
        n.start_again();
        n
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts it again on the same port (after [`OwnNats::kill`]).
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::File::create(self.dir.join("log")).expect("create the NATS log");
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "nats-server exited ({status}): {}",
                    std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `kill -9`, and reaped.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP proxy in front of a PostgreSQL server that loses the answer to one
/// commit: once [armed](CommitCutter::arm) with a marker, the next `COMMIT`
/// on the connection that carried the marker (a statement's parameter, such
/// as a message's cid) reaches the server, and that connection is then cut
/// both ways before the answer reaches the client. The client cannot tell
/// whether the transaction committed; it did.
pub struct CommitCutter {
    port: u16,
    shared: std::sync::Arc<CutterShared>,
    accept: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct CutterShared {
    marker: std::sync::Mutex<Option<Vec<u8>>>,
    cuts: std::sync::atomic::AtomicUsize,
}

impl CommitCutter {
    /// Listens on a free port of 127.0.0.1, forwarding to `upstream` there.
    pub async fn start(upstream: u16) -> CommitCutter {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().expect("its address").port();
        let shared = std::sync::Arc::new(CutterShared::default());
        let s = shared.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(cutter_pipe(client, upstream, s.clone()));
            }
        });
        CommitCutter {
            port,
            shared,
            accept,
        }
    }

    /// The port to give clients instead of the server's.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Cuts the next commit of the transaction that carries `marker`.
    pub fn arm(&self, marker: &str) {
        *self.shared.marker.lock().unwrap() = Some(marker.as_bytes().to_vec());
    }

    /// Commits cut so far.
    pub fn cuts(&self) -> usize {
        self.shared.cuts.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for CommitCutter {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

async fn cutter_pipe(
    client: tokio::net::TcpStream,
    upstream: u16,
    shared: std::sync::Arc<CutterShared>,
) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await else {
        return;
    };
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let cutting = AtomicBool::new(false);
    let up = async {
        let mut buf = vec![0u8; 64 * 1024];
        let mut carried = false;
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let chunk = &buf[..n];
            {
                let mut marker = shared.marker.lock().unwrap();
                if marker.as_deref().is_some_and(|m| contains(chunk, m)) {
                    carried = true;
                }
                // tokio-postgres commits with the simple query "COMMIT".
                if carried && contains(chunk, b"COMMIT\0") {
                    *marker = None;
                    carried = false;
                    // Nothing the server says from now on reaches the client.
                    cutting.store(true, Ordering::SeqCst);
                }
            }
            if sw.write_all(chunk).await.is_err() {
                return;
            }
            if cutting.load(Ordering::SeqCst) {
                // Let the server commit, then cut.
                tokio::time::sleep(Duration::from_millis(300)).await;
                shared.cuts.fetch_add(1, Ordering::SeqCst);
                return;
            }
        }
    };
    let down = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if cutting.load(Ordering::SeqCst) {
                // Held back until the cut.
                std::future::pending::<()>().await;
            }
            if cw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
    // Dropping the halves closes both connections.
}
