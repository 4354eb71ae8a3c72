//! A TCP proxy that injects the faults of real networks, switchable while
//! connections are open: added latency, a silent blackhole (bytes vanish, no
//! RST, no FIN: a NAT that forgot the mapping), resets, closing after N
//! bytes, and forgetting connections idle longer than T (what carriers do).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// What the proxy does to traffic, for open and new connections alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward bytes unchanged.
    Pass,
    /// Forward each chunk after this one-way delay (round trip: twice it).
    Latency(Duration),
    /// Open connections are forgotten for good: their bytes vanish both ways
    /// and nothing tells either side. New connections are accepted and then
    /// never answered.
    Blackhole,
    /// Open connections are reset (RST) and new ones are reset on accept.
    Reset,
    /// Connections are closed (FIN both ways) once this many bytes have
    /// passed on them in total.
    CloseAfter(u64),
}

/// Counters of what the proxy did.
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections forgotten (blackholed or cut for idleness).
    pub forgotten: AtomicU64,
    /// Connections reset.
    pub resets: AtomicU64,
    /// Connections closed after their byte budget.
    pub closed: AtomicU64,
    /// Bytes forwarded.
    pub bytes: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Settings {
    fault: Fault,
    idle_cut: Option<Duration>,
}

struct Shared {
    settings: watch::Sender<Settings>,
    stats: ProxyStats,
    conns: Mutex<HashMap<u64, Arc<ConnState>>>,
    next_id: AtomicU64,
}

/// A running proxy; stops accepting and drops its connections when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.shared.settings.send_replace(Settings {
            fault: Fault::Reset,
            idle_cut: None,
        });
    }
}

impl FaultProxy {
    /// Proxies `listen` (e.g. `127.0.0.1:0`) to `upstream`, passing traffic.
    pub async fn start(listen: SocketAddr, upstream: SocketAddr) -> std::io::Result<FaultProxy> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let (settings, _) = watch::channel(Settings {
            fault: Fault::Pass,
            idle_cut: None,
        });
        let shared = Arc::new(Shared {
            settings,
            stats: ProxyStats::default(),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        });
        let s = shared.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                s.stats.accepted.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(serve(client, upstream, s.clone()));
            }
        });
        Ok(FaultProxy {
            addr,
            shared,
            accept,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Switches the fault, applying it to open connections at once.
    pub fn set(&self, fault: Fault) {
        self.shared.settings.send_modify(|s| s.fault = fault);
    }

    /// The current fault.
    pub fn fault(&self) -> Fault {
        self.shared.settings.borrow().fault
    }

    /// Forgets connections idle for longer than `cut` (`None`: never).
    pub fn set_idle_cut(&self, cut: Option<Duration>) {
        self.shared.settings.send_modify(|s| s.idle_cut = cut);
    }

    /// What the proxy did so far.
    pub fn stats(&self) -> &ProxyStats {
        &self.shared.stats
    }

    /// Connections open (forwarding or forgotten) right now.
    pub fn open_connections(&self) -> usize {
        self.shared
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

/// Per-connection state shared by its two directions.
struct ConnState {
    started: Instant,
    /// Milliseconds since `started` of the last byte seen either way.
    last: AtomicU64,
    /// Bytes forwarded both ways.
    bytes: AtomicU64,
}

impl ConnState {
    fn idle(&self) -> Duration {
        self.started
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last.load(Ordering::Relaxed)))
    }
}

/// What ended a connection's forwarding.
enum End {
    /// Both directions finished on their own.
    Done,
    Forget,
    Reset,
    Close,
}

async fn serve(client: TcpStream, upstream: SocketAddr, shared: Arc<Shared>) {
    let mut settings = shared.settings.subscribe();
    let now = *settings.borrow_and_update();
    match now.fault {
        Fault::Reset => {
            shared.stats.resets.fetch_add(1, Ordering::Relaxed);
            reset(client);
            return;
        }
        Fault::Blackhole => {
            shared.stats.forgotten.fetch_add(1, Ordering::Relaxed);
            swallow(client).await;
            return;
        }
        _ => {}
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        reset(client); // like a refused connection: the client learns at once
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let state = Arc::new(ConnState {
        started: Instant::now(),
        last: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
    });
    shared
        .conns
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id, state.clone());
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let (stop, stopped) = watch::channel(false);
    let mut up = tokio::spawn(direction(
        cr,
        sw,
        state.clone(),
        shared.clone(),
        settings.clone(),
        stopped.clone(),
    ));
    let mut down = tokio::spawn(direction(
        sr,
        cw,
        state.clone(),
        shared.clone(),
        settings.clone(),
        stopped,
    ));
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    let (mut up_done, mut down_done) = (None, None);
    let end = loop {
        let s = *settings.borrow_and_update();
        match s.fault {
            Fault::Blackhole => break End::Forget,
            Fault::Reset => break End::Reset,
            Fault::CloseAfter(n) if state.bytes.load(Ordering::Relaxed) >= n => break End::Close,
            _ => {}
        }
        if s.idle_cut.is_some_and(|cut| state.idle() > cut) {
            break End::Forget;
        }
        if up_done.is_some() && down_done.is_some() {
            break End::Done;
        }
        tokio::select! {
            r = settings.changed() => if r.is_err() { break End::Reset },
            _ = tick.tick() => {}
            h = &mut up, if up_done.is_none() => up_done = Some(h.ok()),
            h = &mut down, if down_done.is_none() => down_done = Some(h.ok()),
        }
    };
    // Stop forwarding and get the sockets back to end them as the fault says.
    let _ = stop.send(true);
    let up = match up_done {
        Some(h) => h,
        None => up.await.ok(),
    };
    let down = match down_done {
        Some(h) => h,
        None => down.await.ok(),
    };
    shared
        .conns
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
    let halves = [up, down];
    match end {
        End::Done => {}
        End::Forget => {
            shared.stats.forgotten.fetch_add(1, Ordering::Relaxed);
            // Hold both sockets without reading: the peers' bytes vanish and
            // nothing tells them, until their own timeouts do. Forgotten
            // connections stay forgotten until a reset or the proxy's drop.
            let _held = halves;
            let mut settings = shared.settings.subscribe();
            while settings.changed().await.is_ok() {
                if settings.borrow().fault == Fault::Reset {
                    break;
                }
            }
        }
        End::Reset => {
            shared.stats.resets.fetch_add(1, Ordering::Relaxed);
            for (r, _) in halves.iter().flatten() {
                let _ = r.as_ref().set_zero_linger();
            }
        }
        End::Close => {
            shared.stats.closed.fetch_add(1, Ordering::Relaxed);
            for (_, mut w) in halves.into_iter().flatten() {
                let _ = w.shutdown().await;
            }
        }
    }
}

/// Both halves of one direction: the socket stays open while they live.
type Halves = (OwnedReadHalf, OwnedWriteHalf);

/// Copies one direction, applying latency, until EOF, an error or `stop`.
/// Returns the halves so the caller decides how the sockets end.
async fn direction(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    state: Arc<ConnState>,
    shared: Arc<Shared>,
    settings: watch::Receiver<Settings>,
    mut stop: watch::Receiver<bool>,
) -> Halves {
    // Chunks go through a queue so latency delays without reordering or
    // slowing the reader down.
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let read = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = tx.send((Instant::now(), Vec::new()));
                    return;
                }
                Ok(n) => {
                    state.last.store(
                        state.started.elapsed().as_millis() as u64,
                        Ordering::Relaxed,
                    );
                    let delay = match settings.borrow().fault {
                        Fault::Latency(d) => d,
                        _ => Duration::ZERO,
                    };
                    let _ = tx.send((Instant::now() + delay, buf[..n].to_vec()));
                }
            }
        }
    };
    let write = async {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if chunk.is_empty() {
                let _ = to.shutdown().await;
                return;
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
            state.bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            shared
                .stats
                .bytes
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
    };
    tokio::select! {
        _ = stop.wait_for(|s| *s) => {}
        _ = async { tokio::join!(read, write) } => {}
    }
    (from, to)
}

/// Resets a connection: SO_LINGER 0 makes close send RST.
fn reset(s: TcpStream) {
    let _ = s.set_zero_linger();
}

/// Accepts bytes and never answers (a blackholed new connection).
async fn swallow(mut s: TcpStream) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}
