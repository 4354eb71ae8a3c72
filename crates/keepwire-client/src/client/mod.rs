//! The public client API and the tokio driver behind it, by role:
//! `api` (the [`Client`] handle the app calls), `builder` (how a client is
//! made), `events` (what it reports: errors, events, status), `supervisor`
//! (holds the home's lock while it runs the connection) and `driver` (runs
//! `keepwire-core`'s connection with tokio and the store).
//! This file holds what they share: the commands from the handles to the
//! driver.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keepwire_core::{
    AppState, BackfillDue, BackgroundPolicy, Config, Connection, ConnectionError, Event, Instant,
    Network, RequestId, State, StopReason, Transmit, TransportEvent,
};
use keepwire_proto::{
    ClientFrame, Confirm, ConvCreate, ConvInfo, ConvKind, ConvMember, ErrorCode, GapReason,
    MemberEvent, Message, PushInfo, PushRegister, Resume, ResumeStatus, ServerFrame, Welcome,
};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::home::Home;
use crate::notify::{Notification, Notifier, coalesce};
use crate::store::{OutboxState, Store, StoreError};
use crate::transport::{self, BoxFuture, CachingResolver, Outgoing, Resolver, SystemResolver};

mod api;
mod builder;
mod driver;
mod events;
mod notifications;
mod supervisor;

// What the roles share among themselves (besides the public items).
use driver::*;
use notifications::Notifications;
use supervisor::*;

pub use api::{CA_META, Client, SendHandle, parse_pem_certificates};
pub use builder::{ClientBuilder, DEFAULT_NETWORK, TokenProvider};
pub use events::{
    ClientError, ClientEvent, LOCK_WAIT, MAX_PUSH_PAYLOAD, PushResult, SendError, Status,
    SyncOutcome, SyncReport, UNREACHABLE_ROUNDS,
};

struct Inner {
    home: PathBuf,
    store: Mutex<Store>,
    cmd: mpsc::UnboundedSender<Cmd>,
    events: broadcast::Sender<ClientEvent>,
    status: Arc<Mutex<Status>>,
    status_changed: watch::Sender<()>,
    waiters: Arc<Mutex<Waiters>>,
    holder: Arc<AtomicBool>,
    /// One sync at a time in this process (`sync_once`, `on_push`).
    sync_gate: tokio::sync::Mutex<()>,
    /// The push wake-up running in this process, for later ones to join.
    push: Mutex<Option<SharedPush>>,
    /// The token lives outside the home ([`ClientBuilder::token_kept_elsewhere`]).
    token_elsewhere: bool,
}

impl Inner {
    /// Shows the network the app reported in [`Status::network`].
    fn set_network_status(&self, n: &Network) {
        let id = match n {
            Network::Online(id) => Some(id.clone()),
            Network::Offline => None,
        };
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .network = id;
        self.status_changed.send_replace(());
    }
}

type SharedPush = futures_util::future::Shared<BoxFuture<'static, Option<PushResult>>>;

type Waiters = HashMap<String, Vec<oneshot::Sender<Result<(), SendError>>>>;

enum Cmd {
    OutboxChanged,
    /// A new app state; the sender (if any) is answered once the client acted
    /// on it (released the home if it parks).
    AppState(AppState, Option<oneshot::Sender<()>>),
    Network(Network),
    /// The device woke from sleep.
    Resume,
    Start,
    Request(
        ClientFrame,
        oneshot::Sender<Result<ServerFrame, ClientError>>,
    ),
    /// Starts a sync; answered `true` once this process runs it, `false` if
    /// another process kept the home's lock for [`LOCK_WAIT`].
    Sync(SyncRequest),
    MarkRead(u64, u64, oneshot::Sender<Result<(), ClientError>>),
    /// An ephemeral signal: answered once written to the connection.
    Signal(
        u64,
        serde_json::Value,
        oneshot::Sender<Result<(), ClientError>>,
    ),
    /// The push registration changed in the store: send it if connected;
    /// the sender (if any) gets the relay's answer.
    Push(Option<oneshot::Sender<Result<(), ClientError>>>),
    /// Mutes are pending in the store: send them if connected; the sender
    /// (if any) gets the relay's answer for this conversation.
    Mutes(Option<(u64, oneshot::Sender<Result<(), ClientError>>)>),
    /// Ends a sync; answered once its deferred notifications were shown (or
    /// collected) and, if the client parks, the home released.
    EndSync(EndSync),
    Stop(oneshot::Sender<()>),
}

struct SyncRequest {
    /// When it was asked for.
    asked: tokio::time::Instant,
    /// When the sync must end.
    until: tokio::time::Instant,
    /// Hand the notifications back instead of showing them (push wake-ups).
    collect: bool,
    /// Connect without the home's lock, as a transient connection: the
    /// holder did not take a push wake-up's sync up (it looks frozen).
    transient: bool,
    started: oneshot::Sender<bool>,
}

struct EndSync {
    done: oneshot::Sender<Collected>,
}

/// Notifications a collecting sync gathered.
#[derive(Debug, Default)]
struct Collected {
    show: Vec<Notification>,
    clear: Vec<u64>,
}

/// Waiters answered once the driver gave the home back.
enum Ack {
    App(oneshot::Sender<()>),
    EndSync(oneshot::Sender<Collected>, Collected),
}

impl Ack {
    fn send(self) {
        match self {
            Ack::App(tx) => {
                let _ = tx.send(());
            }
            Ack::EndSync(tx, c) => {
                let _ = tx.send(c);
            }
        }
    }
}

/// Why the driver returned.
enum Exit {
    /// Stopped (or every handle dropped): the supervisor ends.
    Stopped,
    /// Background under wake-only with no sync open: the connection is
    /// closed, the store closed; the supervisor releases the lock, then
    /// answers these.
    Released(Vec<Ack>),
}
