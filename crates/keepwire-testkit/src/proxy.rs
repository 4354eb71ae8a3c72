//! A TCP proxy for tests that behaves like a NAT or carrier middlebox: it
//! forwards bytes both ways and, once a connection has been idle longer than
//! `idle_cut`, silently forgets it — bytes vanish in both directions, no RST,
//! no FIN — which is how mobile networks kill idle sockets.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// A running proxy; stops accepting when dropped.
pub struct IdleCutProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// Connections forgotten so far.
    pub cuts: Arc<AtomicU64>,
    accept: JoinHandle<()>,
}

impl Drop for IdleCutProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl IdleCutProxy {
    /// Proxies 127.0.0.1:0 to `upstream`, forgetting connections idle longer than `idle_cut`.
    pub async fn start(upstream: SocketAddr, idle_cut: Duration) -> IdleCutProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let cuts = Arc::new(AtomicU64::new(0));
        let c = cuts.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                tokio::spawn(pump(client, server, idle_cut, c.clone()));
            }
        });
        IdleCutProxy { addr, cuts, accept }
    }
}

async fn pump(client: TcpStream, server: TcpStream, idle_cut: Duration, cuts: Arc<AtomicU64>) {
    let start = Instant::now();
    let last = Arc::new(AtomicU64::new(0)); // ms since start of the last byte
    let dead = Arc::new(AtomicBool::new(false));
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let a = tokio::spawn(copy(cr, sw, start, last.clone(), dead.clone()));
    let b = tokio::spawn(copy(sr, cw, start, last.clone(), dead.clone()));
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    loop {
        tick.tick().await;
        if a.is_finished() && b.is_finished() {
            return;
        }
        let idle = start
            .elapsed()
            .saturating_sub(Duration::from_millis(last.load(Ordering::SeqCst)));
        if !dead.load(Ordering::SeqCst) && idle > idle_cut {
            dead.store(true, Ordering::SeqCst);
            cuts.fetch_add(1, Ordering::SeqCst);
        }
    }
}

async fn copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    start: Instant,
    last: Arc<AtomicU64>,
    dead: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                if !dead.load(Ordering::SeqCst) {
                    let _ = to.shutdown().await;
                }
                return;
            }
            Ok(n) => n,
        };
        if dead.load(Ordering::SeqCst) {
            continue; // forgotten: the bytes vanish
        }
        last.store(start.elapsed().as_millis() as u64, Ordering::SeqCst);
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
