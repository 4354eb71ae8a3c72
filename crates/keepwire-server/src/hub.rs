//! Live connections: per-user head signals and the registry used to replace,
//! revoke and shut down connections.
//!
//! Fanout only *signals* that a user's inbox head advanced; each connection
//! then reads the entries in sequence order, from the user's recent tail kept
//! here (the last [`TAIL`] committed message entries of users with a live
//! connection) or, when the tail does not reach back far enough or has a
//! hole, from the store. So a device can never get entry N+1 before N,
//! whether entries come from a backlog replay or live.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use std::collections::VecDeque;
use std::sync::Arc;

use keepwire_proto::{CloseCode, Instant, Seq, ServerFrame};
use tokio::sync::{Notify, watch};

use crate::ratelimit::{SendBudget, TokenBucket};
use crate::store::{HeadAdvance, HeadListener, UserId};

/// Committed entries kept per user with a live connection.
pub const TAIL: usize = 256;

/// How long a device's generation registered on another node is remembered.
const REMOTE_MEMORY: Duration = Duration::from_secs(120);

/// Something the hub asks a connection to do.
#[derive(Debug)]
pub enum Control {
    /// Close with this code.
    Close(CloseCode),
    /// Deliver an ephemeral frame (a signal).
    Frame(Box<ServerFrame>),
}

/// A connection's queue of requests from the hub. A few words until used:
/// an mpsc channel allocates its first block of slots up front (≈ 1 KB for
/// every idle connection), and requests are rare.
#[derive(Debug, Default)]
pub struct ControlQueue {
    queue: Mutex<VecDeque<Control>>,
    notify: Notify,
    /// What the connection's driver last saw, for push decisions.
    pub activity: Activity,
}

/// A connection's activity, as its driver records it (atomics: no lock on
/// the frame path).
#[derive(Debug, Default)]
pub struct Activity {
    opened_ms: AtomicI64,
    last_frame_ms: AtomicI64,
    acked: AtomicU64,
}

impl Activity {
    /// The handshake finished at `now_ms` (wall clock).
    pub fn opened(&self, now_ms: i64) {
        self.opened_ms.store(now_ms, Ordering::Relaxed);
        self.last_frame_ms.store(now_ms, Ordering::Relaxed);
    }

    /// A frame arrived at `now_ms`; the device has acknowledged `acked`.
    pub fn frame(&self, now_ms: i64, acked: Seq) {
        self.last_frame_ms.store(now_ms, Ordering::Relaxed);
        self.acked.store(acked, Ordering::Relaxed);
    }
}

/// What the hub knows of a device's live connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceActivity {
    /// When its handshake finished, ms since the Unix epoch (0: not yet).
    pub opened_ms: i64,
    /// When it last sent a frame.
    pub last_frame_ms: i64,
    /// What it has acknowledged.
    pub acked: Seq,
}

impl ControlQueue {
    /// Frames queued beyond this are dropped (signals are best effort).
    pub const MAX_FRAMES: usize = 64;

    /// Queues a request. A close always gets in, ahead of queued frames; a
    /// frame is dropped (false) when `MAX_FRAMES` are waiting.
    pub fn push(&self, c: Control) -> bool {
        {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            match c {
                Control::Close(_) => q.push_front(c),
                Control::Frame(_) if q.len() >= Self::MAX_FRAMES => return false,
                Control::Frame(_) => q.push_back(c),
            }
        }
        // Stores a permit when the connection is not waiting right now.
        self.notify.notify_one();
        true
    }

    /// The next request (cancel-safe: nothing is lost if dropped).
    pub async fn recv(&self) -> Control {
        loop {
            if let Some(c) = self.try_recv() {
                return c;
            }
            self.notify.notified().await;
        }
    }

    /// The next request, if one is waiting.
    pub fn try_recv(&self) -> Option<Control> {
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
    }
}

struct ConnEntry {
    id: u64,
    device: String,
    generation: Option<u64>,
    /// A push wake-up's short connection (`hello.transient`).
    transient: bool,
    token_id: Option<i64>,
    control: Arc<ControlQueue>,
}

struct UserSlot {
    head: watch::Sender<Seq>,
    conns: Vec<ConnEntry>,
    sends: TokenBucket,
    /// Recent committed entries (sequence, item JSON), contiguous.
    tail: VecDeque<(Seq, Arc<str>)>,
}

/// A connection asking to be registered.
#[derive(Debug, Clone, Copy)]
pub struct Joining<'a> {
    /// The user.
    pub user: UserId,
    /// The device.
    pub device: &'a str,
    /// The token's id, for revocations.
    pub token_id: Option<i64>,
    /// The hello's connection generation.
    pub generation: Option<u64>,
    /// The hello's `transient` flag: a push wake-up's short connection.
    pub transient: bool,
}

/// Why a connection could not be registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterError {
    /// The user already holds the maximum number of connections.
    TooManyConnections,
    /// A newer connection of the device (a higher `hello.generation`) is
    /// registered: this one is the stale one.
    Superseded,
}

/// The registry of live connections.
pub struct Hub {
    users: Mutex<HashMap<UserId, UserSlot>>,
    /// The newest generation of devices registered on other nodes (with when
    /// it was heard), so a late older `hello` here is refused.
    remote: Mutex<HashMap<(UserId, String), (u64, Instant)>>,
    next_id: AtomicU64,
    user_rate: (u32, u32),
    /// Test-only: the tail hands out N+1 before N.
    #[cfg(any(test, feature = "testing"))]
    sabotaged: std::sync::atomic::AtomicBool,
}

/// A registered connection; unregisters itself when dropped.
pub struct Registration {
    hub: Arc<Hub>,
    user: UserId,
    /// This connection's id.
    pub id: u64,
    /// Changes whenever the user's inbox head advances.
    pub head: watch::Receiver<Seq>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hub.unregister(self.user, self.id);
    }
}

impl Hub {
    /// A hub with a per-user send rate (sustained per second, burst).
    pub fn new(user_sends_per_sec: u32, user_send_burst: u32) -> Self {
        Hub {
            users: Mutex::new(HashMap::new()),
            remote: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            user_rate: (user_sends_per_sec, user_send_burst),
            #[cfg(any(test, feature = "testing"))]
            sabotaged: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Test-only: makes the tail hand out entries out of order, to prove the
    /// simulation notices.
    #[cfg(any(test, feature = "testing"))]
    pub fn sabotage_tail(&self) {
        self.sabotaged.store(true, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<UserId, UserSlot>> {
        self.users.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a connection. An older connection of the same device is told
    /// to close with [`CloseCode::Replaced`] — older by `generation` when both
    /// have one (a dead process's late `hello` must not stop the live
    /// process), else by registration. A transient newcomer (a push wake-up
    /// beside a frozen process) closes it with [`CloseCode::Yielded`]
    /// instead, so the frozen process comes back when it thaws; and a
    /// transient connection never holds off a full one, whatever their
    /// generations (the full one comes back to take over).
    pub fn register(
        self: &Arc<Self>,
        who: Joining<'_>,
        max_per_user: usize,
        control: Arc<ControlQueue>,
        now: Instant,
    ) -> Result<Registration, RegisterError> {
        let Joining {
            user,
            device,
            token_id,
            generation,
            transient,
        } = who;
        let mut users = self.lock();
        let (rate, burst) = self.user_rate;
        let slot = users.entry(user).or_insert_with(|| UserSlot {
            head: watch::Sender::new(0),
            conns: Vec::new(),
            sends: TokenBucket::new(rate, burst, now),
            tail: VecDeque::new(),
        });
        let others = slot.conns.iter().filter(|c| c.device != device).count();
        if others >= max_per_user {
            return Err(RegisterError::TooManyConnections);
        }
        let newer_exists = slot.conns.iter().any(|c| {
            c.device == device
                && (transient || !c.transient)
                && matches!((c.generation, generation), (Some(theirs), Some(ours)) if theirs > ours)
        });
        let newer_elsewhere = generation.is_some_and(|ours| {
            self.remote
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&(user, device.to_owned()))
                .is_some_and(|(theirs, _)| *theirs > ours)
        });
        if newer_exists || newer_elsewhere {
            return Err(RegisterError::Superseded);
        }
        let code = displaced_code(transient);
        slot.conns.retain(|c| {
            if c.device == device {
                c.control.push(Control::Close(code));
                false
            } else {
                true
            }
        });
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        slot.conns.push(ConnEntry {
            id,
            device: device.to_owned(),
            generation,
            transient,
            token_id,
            control,
        });
        let head = slot.head.subscribe();
        Ok(Registration {
            hub: self.clone(),
            user,
            id,
            head,
        })
    }

    fn unregister(&self, user: UserId, id: u64) {
        let mut users = self.lock();
        if let Some(slot) = users.get_mut(&user) {
            slot.conns.retain(|c| c.id != id);
            if slot.conns.is_empty() {
                users.remove(&user);
            }
        }
    }

    /// Closes the user's connections that use `token_id`, or those of
    /// `device` (with [`CloseCode::DeviceRevoked`]), or all of them.
    pub fn revoke(&self, user: UserId, token_id: Option<i64>, device: Option<&str>) -> usize {
        let users = self.lock();
        let Some(slot) = users.get(&user) else {
            return 0;
        };
        let mut n = 0;
        for c in &slot.conns {
            let (hit, code) = match (device, token_id) {
                (Some(d), _) => (c.device == d, CloseCode::DeviceRevoked),
                (None, Some(t)) => (c.token_id == Some(t), CloseCode::TokenRevoked),
                (None, None) => (true, CloseCode::TokenRevoked),
            };
            if hit {
                c.control.push(Control::Close(code));
                n += 1;
            }
        }
        n
    }

    /// A device registered on another node with `generation`: close this
    /// node's connections of it that are older (4005, or 4012 when the other
    /// one is transient). Without a generation the other one is newer by
    /// arrival; a full connection elsewhere displaces a transient one here
    /// whatever the generations, and a transient one elsewhere is not
    /// remembered (it never holds off a full one).
    pub fn superseded(
        &self,
        user: UserId,
        device: &str,
        generation: Option<u64>,
        transient: bool,
        now: Instant,
    ) -> usize {
        if let Some(g) = generation.filter(|_| !transient) {
            let mut remote = self.remote.lock().unwrap_or_else(|p| p.into_inner());
            // Remembered for a while: long enough for any late `hello`.
            remote.retain(|_, (_, at)| now.saturating_duration_since(*at) < REMOTE_MEMORY);
            let e = remote.entry((user, device.to_owned())).or_insert((g, now));
            if g >= e.0 {
                *e = (g, now);
            }
        }
        let users = self.lock();
        let Some(slot) = users.get(&user) else {
            return 0;
        };
        let mut n = 0;
        for c in slot.conns.iter().filter(|c| c.device == device) {
            let older = match (c.generation, generation) {
                _ if c.transient && !transient => true,
                (Some(ours), Some(theirs)) => ours < theirs,
                _ => true,
            };
            if older {
                c.control.push(Control::Close(displaced_code(transient)));
                n += 1;
            }
        }
        n
    }

    /// The highest generation among this node's connections of a device
    /// that would hold off a newcomer (every one for a transient newcomer,
    /// full ones only for a full newcomer), and whether it is transient.
    pub fn newest_generation(
        &self,
        user: UserId,
        device: &str,
        newcomer_transient: bool,
    ) -> Option<(u64, bool)> {
        let users = self.lock();
        users
            .get(&user)?
            .conns
            .iter()
            .filter(|c| c.device == device && (newcomer_transient || !c.transient))
            .filter_map(|c| Some((c.generation?, c.transient)))
            .max()
    }

    /// Asks every live connection to close with `code` (a graceful shutdown).
    pub fn close_all(&self, code: CloseCode) {
        for slot in self.lock().values() {
            for c in &slot.conns {
                c.control.push(Control::Close(code));
            }
        }
    }

    /// Delivers an ephemeral frame to the users' connections, except `skip`.
    /// Best effort: a connection with a full control queue misses it.
    pub fn signal(&self, users: &[UserId], skip: u64, frame: &ServerFrame) {
        let map = self.lock();
        for u in users {
            if let Some(slot) = map.get(u) {
                for c in slot.conns.iter().filter(|c| c.id != skip) {
                    c.control.push(Control::Frame(Box::new(frame.clone())));
                }
            }
        }
    }

    /// Number of live connections.
    pub fn connection_count(&self) -> usize {
        self.lock().values().map(|s| s.conns.len()).sum()
    }

    /// The newest open connection of a device, if it has one here.
    pub fn device_activity(&self, user: UserId, device: &str) -> Option<DeviceActivity> {
        let users = self.lock();
        users
            .get(&user)?
            .conns
            .iter()
            .filter(|c| c.device == device)
            .map(|c| {
                let a = &c.control.activity;
                DeviceActivity {
                    opened_ms: a.opened_ms.load(Ordering::Relaxed),
                    last_frame_ms: a.last_frame_ms.load(Ordering::Relaxed),
                    acked: a.acked.load(Ordering::Relaxed),
                }
            })
            .filter(|a| a.opened_ms > 0)
            .max_by_key(|a| a.opened_ms)
    }

    /// The users with a live connection here, and the inbox head known for
    /// each (to re-read heads after lost notices).
    pub fn connected_users(&self) -> Vec<(UserId, Seq)> {
        self.lock()
            .iter()
            .map(|(&u, slot)| (u, *slot.head.borrow()))
            .collect()
    }
}

impl Hub {
    /// Up to `limit` entries of `user`'s inbox from `from`, if the recent
    /// tail holds `from` (`None`: read the store). Never empty: past the
    /// tail, this hub may just not have heard of newer entries yet (a lost
    /// notice from another node), and only the store knows.
    pub fn recent(&self, user: UserId, from: Seq, limit: usize) -> Option<Vec<(Seq, Arc<str>)>> {
        let users = self.lock();
        let slot = users.get(&user)?;
        let (first, _) = slot.tail.front()?;
        let head = *slot.head.borrow();
        if from < *first || from > head || head != slot.tail.back()?.0 {
            return None;
        }
        #[allow(unused_mut, reason = "mutated only by the test-only sabotage")]
        let mut out: Vec<(Seq, Arc<str>)> = slot
            .tail
            .iter()
            .skip((from - first) as usize)
            .take(limit)
            .cloned()
            .collect();
        #[cfg(any(test, feature = "testing"))]
        if self.sabotaged.load(Ordering::Relaxed) && out.len() >= 2 {
            out.swap(0, 1);
        }
        Some(out)
    }
}

impl SendBudget for Hub {
    /// Takes `n` sends from the user's budget, shared by its connections.
    fn take(&self, user: UserId, n: u32, now: Instant) -> Result<(), Duration> {
        match self.lock().get_mut(&user) {
            Some(slot) => slot.sends.take_n(n, now),
            None => Ok(()),
        }
    }

    fn charge(&self, user: UserId, n: u32, now: Instant) {
        if let Some(slot) = self.lock().get_mut(&user) {
            slot.sends.charge(n, now);
        }
    }
}

impl HeadListener for Hub {
    fn heads_advanced(&self, heads: &[HeadAdvance]) {
        let mut users = self.lock();
        for a in heads {
            let (user, seq) = (a.user, a.seq);
            let Some(slot) = users.get_mut(&user) else {
                continue;
            };
            // A notice at or below the known head is stale (a late or
            // repeated hint): the tail already covers it or was cut.
            if seq <= *slot.head.borrow() {
                continue;
            }
            // Keep the tail contiguous: a hole (an entry without its item,
            // or a gap) empties it, and readers use the store.
            let follows = slot.tail.back().is_none_or(|(s, _)| s + 1 == seq);
            if !follows || a.item.is_none() {
                slot.tail.clear();
            }
            if let Some(item) = &a.item {
                if slot.tail.len() == TAIL {
                    slot.tail.pop_front();
                }
                slot.tail.push_back((seq, item.clone()));
            }
            slot.head.send_replace(seq);
        }
    }
}

/// The close code for a connection displaced by a newer one of its device:
/// a transient newcomer (a push wake-up) lets it come back.
fn displaced_code(newcomer_transient: bool) -> CloseCode {
    if newcomer_transient {
        CloseCode::Yielded
    } else {
        CloseCode::Replaced
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join(
        hub: &Arc<Hub>,
        generation: u64,
        transient: bool,
    ) -> (Result<Registration, RegisterError>, Arc<ControlQueue>) {
        let control = Arc::new(ControlQueue::default());
        let who = Joining {
            user: 1,
            device: "phone",
            token_id: None,
            generation: Some(generation),
            transient,
        };
        let r = hub.register(who, 10, control.clone(), Instant::ZERO);
        (r, control)
    }

    fn closed_with(c: &ControlQueue) -> Option<CloseCode> {
        match c.try_recv() {
            Some(Control::Close(code)) => Some(code),
            _ => None,
        }
    }

    #[test]
    fn a_newer_full_connection_replaces_and_an_older_one_is_refused() {
        let hub = Arc::new(Hub::new(100, 100));
        let (_a, ca) = join(&hub, 5, false);
        let (b, _) = join(&hub, 4, false);
        assert_eq!(b.err(), Some(RegisterError::Superseded));
        let (_c, _) = join(&hub, 6, false);
        assert_eq!(closed_with(&ca), Some(CloseCode::Replaced));
    }

    #[test]
    fn a_transient_newcomer_lets_the_displaced_one_come_back() {
        let hub = Arc::new(Hub::new(100, 100));
        let (_frozen, cf) = join(&hub, 5, false);
        let (_woken, cw) = join(&hub, 9, true);
        assert_eq!(closed_with(&cf), Some(CloseCode::Yielded));
        // The thawed process comes back with its own (lower) generation and
        // takes over; the transient one stops.
        let (back, _) = join(&hub, 6, false);
        assert!(back.is_ok());
        assert_eq!(closed_with(&cw), Some(CloseCode::Replaced));
    }

    #[test]
    fn an_older_transient_newcomer_is_refused() {
        let hub = Arc::new(Hub::new(100, 100));
        let (_live, cl) = join(&hub, 9, false);
        let (late, _) = join(&hub, 5, true);
        assert_eq!(late.err(), Some(RegisterError::Superseded));
        assert_eq!(closed_with(&cl), None);
    }

    #[test]
    fn a_transient_connection_elsewhere_is_not_remembered() {
        let hub = Arc::new(Hub::new(100, 100));
        let (_frozen, cf) = join(&hub, 5, false);
        assert_eq!(hub.superseded(1, "phone", Some(9), true, Instant::ZERO), 1);
        assert_eq!(closed_with(&cf), Some(CloseCode::Yielded));
        // The thawed process reconnects here: not held off by the transient.
        let (back, _) = join(&hub, 6, false);
        assert!(back.is_ok());
        // A full connection elsewhere is remembered.
        assert_eq!(hub.superseded(1, "phone", Some(7), false, Instant::ZERO), 1);
        let (late, _) = join(&hub, 6, false);
        assert_eq!(late.err(), Some(RegisterError::Superseded));
    }
}
