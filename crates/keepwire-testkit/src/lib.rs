//! Test support shared by keepwire's integration tests.
//!
//! - [`WsClient`]: a raw protocol v1 client over tokio-tungstenite that keeps
//!   frames it was not asked for, so tests can interleave requests and
//!   deliveries without losing either.
//! - [`TempDir`]: a directory removed on drop.
//! - [`RelayProcess`]: a `keepwire serve` child process, killed on drop.
//! - [`wait_until`]: poll a condition with a deadline instead of sleeping.
//! - [`relay`]: an in-process relay on a temp database, and seeding helpers.
//! - [`engines`]: a PostgreSQL and a NATS server of the test's own, to crash
//!   and restart.
#![allow(missing_docs, reason = "test support")]

use std::collections::VecDeque;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use keepwire_proto::{
    ClientFrame, Confirm, Cursor, Hello, InboxEntry, Rejected, SUBPROTOCOL, Send, ServerFrame,
    Welcome, decode_server, encode,
};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a test waits for any one expected frame.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(20);

/// What the client saw next.
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "test support; frames are moved, not stored in bulk"
)]
pub enum Incoming {
    Frame(ServerFrame),
    /// The server closed the connection with this code (`None`: no close frame).
    Closed(Option<u16>),
}

/// A raw keepwire protocol client for tests.
pub struct WsClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    queued: VecDeque<ServerFrame>,
    closed: Option<Option<u16>>,
    pub welcome: Option<Welcome>,
}

/// A random 128-bit client id.
pub fn new_cid() -> String {
    format!("{:032x}", rand::random::<u128>())
}

impl WsClient {
    /// Opens a WebSocket offering the keepwire subprotocol (no hello yet).
    pub async fn open(url: &str) -> Result<WsClient, tungstenite::Error> {
        Self::open_with(url, None).await
    }

    /// Like [`WsClient::open`], for `wss://` with this TLS configuration.
    pub async fn open_with(
        url: &str,
        tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    ) -> Result<WsClient, tungstenite::Error> {
        let mut req = url.into_client_request()?;
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static(SUBPROTOCOL),
        );
        let connector = tls.map(tokio_tungstenite::Connector::Rustls);
        let (ws, _) =
            tokio_tungstenite::connect_async_tls_with_config(req, None, false, connector).await?;
        Ok(WsClient {
            ws,
            queued: VecDeque::new(),
            closed: None,
            welcome: None,
        })
    }

    /// Opens a connection and says hello; returns the client and its welcome,
    /// or the close code the server answered with.
    pub async fn connect(
        url: &str,
        token: &str,
        device: &str,
        cursor: Option<Cursor>,
    ) -> Result<WsClient, Option<u16>> {
        Self::connect_with(url, token, device, cursor, None).await
    }

    /// Like [`WsClient::connect`] with a requested heartbeat.
    pub async fn connect_with(
        url: &str,
        token: &str,
        device: &str,
        cursor: Option<Cursor>,
        heartbeat_ms: Option<u64>,
    ) -> Result<WsClient, Option<u16>> {
        let mut c = WsClient::open(url)
            .await
            .map_err(|e| panic!("connect {url}: {e}"))
            .unwrap();
        c.send(&ClientFrame::Hello(Hello {
            token: token.into(),
            device: device.into(),
            cursor,
            heartbeat_ms,
            history: Some(1_000_000),
            agent: Some("keepwire-testkit".into()),
            generation: None,
            transient: false,
            window: None,
        }))
        .await;
        match c.recv().await {
            Incoming::Frame(ServerFrame::Welcome(w)) => {
                c.welcome = Some(w);
                Ok(c)
            }
            Incoming::Frame(other) => panic!("expected welcome, got {other:?}"),
            Incoming::Closed(code) => Err(code),
        }
    }

    pub fn welcome(&self) -> &Welcome {
        self.welcome.as_ref().expect("connected")
    }

    /// A cursor at `seq` in this connection's epoch.
    pub fn cursor(&self, seq: u64) -> Cursor {
        Cursor {
            epoch: self.welcome().epoch.clone(),
            seq,
        }
    }

    pub async fn send(&mut self, frame: &ClientFrame) {
        self.send_text(&encode(frame)).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        let _ = self.ws.send(Message::Text(text.into())).await;
    }

    pub async fn send_raw(&mut self, msg: Message) {
        let _ = self.ws.send(msg).await;
    }

    /// Sends a text message; returns its cid.
    pub async fn send_message(&mut self, conv: u64, body: &str) -> String {
        let cid = new_cid();
        self.send_with_cid(conv, body, &cid).await;
        cid
    }

    pub async fn send_with_cid(&mut self, conv: u64, body: &str, cid: &str) {
        self.send(&ClientFrame::Send(Send {
            cid: cid.into(),
            conv,
            kind: "text".into(),
            body: body.into(),
        }))
        .await;
    }

    /// The next frame or close, waiting at most [`RECV_TIMEOUT`].
    pub async fn recv(&mut self) -> Incoming {
        if let Some(f) = self.queued.pop_front() {
            return Incoming::Frame(f);
        }
        self.recv_wire(RECV_TIMEOUT)
            .await
            .unwrap_or_else(|| panic!("no frame within {RECV_TIMEOUT:?}"))
    }

    /// The next frame from the wire, or `None` after `wait`.
    pub async fn recv_wire(&mut self, wait: Duration) -> Option<Incoming> {
        if let Some(code) = self.closed {
            return Some(Incoming::Closed(code));
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let msg = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return None,
                Ok(m) => m,
            };
            match msg {
                Some(Ok(Message::Text(t))) => {
                    let f = decode_server(t.as_str())
                        .unwrap_or_else(|e| panic!("undecodable server frame {t}: {e}"));
                    return Some(Incoming::Frame(f));
                }
                Some(Ok(Message::Close(frame))) => {
                    let code = frame.map(|f| u16::from(f.code));
                    self.closed = Some(code);
                    return Some(Incoming::Closed(code));
                }
                Some(Ok(Message::Binary(_))) => panic!("server sent a binary frame"),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => {
                    self.closed = Some(None);
                    return Some(Incoming::Closed(None));
                }
            }
        }
    }

    /// Waits for a frame matching `pick`, keeping the others for later.
    pub async fn recv_where<T>(&mut self, mut pick: impl FnMut(&ServerFrame) -> Option<T>) -> T {
        if let Some(i) = self.queued.iter().position(|f| pick(f).is_some()) {
            let f = self.queued.remove(i).expect("index");
            return pick(&f).expect("matched");
        }
        loop {
            match self.recv_wire(RECV_TIMEOUT).await {
                None => panic!(
                    "expected frame not received within {RECV_TIMEOUT:?}; queued: {:?}",
                    self.queued
                ),
                Some(Incoming::Closed(code)) => panic!(
                    "connection closed ({code:?}) while waiting; queued: {:?}",
                    self.queued
                ),
                Some(Incoming::Frame(f)) => match pick(&f) {
                    Some(t) => return t,
                    None => self.queued.push_back(f),
                },
            }
        }
    }

    /// Waits for the server to close; returns the close code. Frames before
    /// the close are kept.
    pub async fn expect_close(&mut self) -> Option<u16> {
        loop {
            match self.recv_wire(RECV_TIMEOUT).await {
                None => panic!("connection not closed within {RECV_TIMEOUT:?}"),
                Some(Incoming::Closed(code)) => return code,
                Some(Incoming::Frame(f)) => self.queued.push_back(f),
            }
        }
    }

    /// The confirmation or rejection of `cid`.
    pub async fn answer(&mut self, cid: &str) -> Result<Confirm, Rejected> {
        self.recv_where(|f| match f {
            ServerFrame::Confirm(c) if c.cid == cid => Some(Ok(c.clone())),
            ServerFrame::Rejected(r) if r.cid == cid => Some(Err(r.clone())),
            _ => None,
        })
        .await
    }

    pub async fn confirm(&mut self, cid: &str) -> Confirm {
        self.answer(cid)
            .await
            .unwrap_or_else(|r| panic!("send rejected: {r:?}"))
    }

    /// The next inbox entry.
    pub async fn entry(&mut self) -> InboxEntry {
        self.recv_where(|f| match f {
            ServerFrame::Entry(e) => Some(e.clone()),
            _ => None,
        })
        .await
    }

    /// Collects `n` entries, acknowledging as it goes (like a real client that
    /// persists each batch).
    pub async fn entries(&mut self, n: usize, ack: bool) -> Vec<InboxEntry> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let e = self.entry().await;
            let seq = e.seq;
            out.push(e);
            if ack && (out.len() % 8 == 0 || out.len() == n) {
                self.send(&ClientFrame::Ack { seq }).await;
            }
        }
        out
    }

    /// Round trip a ping: every frame the server sent before the pong is queued.
    pub async fn barrier(&mut self) {
        self.send(&ClientFrame::Ping {}).await;
        self.recv_where(|f| matches!(f, ServerFrame::Pong { .. }).then_some(()))
            .await;
    }

    /// Frames received and not yet consumed.
    pub fn queued(&self) -> &VecDeque<ServerFrame> {
        &self.queued
    }

    /// Drains queued entries.
    pub fn take_queued_entries(&mut self) -> Vec<InboxEntry> {
        let mut out = Vec::new();
        self.queued.retain(|f| match f {
            ServerFrame::Entry(e) => {
                out.push(e.clone());
                false
            }
            _ => true,
        });
        out
    }

    /// Closes the connection normally.
    pub async fn close(mut self) {
        let _ = self
            .ws
            .close(Some(tungstenite::protocol::CloseFrame {
                code: WsCloseCode::Normal,
                reason: "bye".into(),
            }))
            .await;
    }
}

/// A "relay" that accepts TCP connections and never answers (packets
/// vanish, nothing is closed): its address. The connections are held until
/// the test's runtime ends.
pub async fn black_hole() -> std::net::SocketAddr {
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a black hole");
    let addr = hole.local_addr().expect("its address");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hole.accept().await {
            held.push(s);
        }
    });
    addr
}

/// Polls `cond` every 20 ms until it holds or `within` passes.
pub async fn wait_until<F, Fut>(within: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if cond().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A temporary directory, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "keepwire-{tag}-{}-{:x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `keepwire serve` child process. Killed (SIGKILL) on drop if still running.
pub struct RelayProcess {
    pub child: Child,
    pub url: String,
}

impl RelayProcess {
    /// Starts `bin serve --listen 127.0.0.1:0 --db DB ARGS...` and reads the URL
    /// from its first stdout line.
    pub fn start(bin: &Path, db: &Path, args: &[&str]) -> RelayProcess {
        Self::start_at(bin, db, "127.0.0.1:0", args)
    }

    /// Like [`RelayProcess::start`] on a given address (to restart a relay where it was).
    pub fn start_at(bin: &Path, db: &Path, addr: &str, args: &[&str]) -> RelayProcess {
        Self::spawn(bin, "--db", db.as_os_str(), addr, args)
    }

    /// Starts `bin serve --listen 127.0.0.1:0 --store STORE ARGS...` (a
    /// PostgreSQL URL, for instance).
    pub fn start_store(bin: &Path, store: &str, args: &[&str]) -> RelayProcess {
        Self::spawn(bin, "--store", store.as_ref(), "127.0.0.1:0", args)
    }

    fn spawn(
        bin: &Path,
        store_flag: &str,
        store: &std::ffi::OsStr,
        addr: &str,
        args: &[&str],
    ) -> RelayProcess {
        let mut child = Command::new(bin)
            .arg("serve")
            .arg("--listen")
            .arg(addr)
            .arg(store_flag)
            .arg(store)
            .args(args)
            .env("KEEPWIRE_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn keepwire serve");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the relay's first line");
        let url = line.trim().to_owned();
        assert!(
            url.starts_with("ws://") || url.starts_with("wss://"),
            "unexpected first line {url:?}"
        );
        RelayProcess { child, url }
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Host and port, for HTTP requests.
    pub fn host_port(&self) -> &str {
        self.url
            .trim_start_matches("wss://")
            .trim_start_matches("ws://")
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill9();
        }
    }
}

/// A minimal HTTP/1.1 GET over a fresh TCP connection: (status, body).
pub async fn http_get(host_port: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = TcpStream::connect(host_port).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host_port}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(RECV_TIMEOUT, s.read_to_end(&mut buf))
        .await
        .expect("http timeout")
        .expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Reads one counter (summing all label sets) from a Prometheus text body.
pub fn metric(body: &str, name: &str) -> u64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Sends an HTTP upgrade request with the given extra headers and returns the status.
pub async fn upgrade_status(host_port: &str, path: &str, protocol: Option<&str>) -> (u16, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = TcpStream::connect(host_port).await.expect("connect");
    let proto = protocol
        .map(|p| format!("Sec-WebSocket-Protocol: {p}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host_port}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{proto}\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(RECV_TIMEOUT, s.read(&mut buf))
        .await
        .expect("timeout")
        .expect("read");
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// Extracts the message bodies of entries, in order.
pub fn bodies(entries: &[InboxEntry]) -> Vec<String> {
    entries
        .iter()
        .filter_map(|e| match &e.item {
            keepwire_proto::EntryItem::Message(m) => Some(m.body.clone()),
            _ => None,
        })
        .collect()
}

/// Asserts entries are contiguous from `first`.
pub fn assert_contiguous(entries: &[InboxEntry], first: u64) {
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e.seq, first + i as u64, "entry {i} out of sequence");
    }
}

pub use serde_json;

pub mod engines;
pub mod relay;
pub mod tls;
