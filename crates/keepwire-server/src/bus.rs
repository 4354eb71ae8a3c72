//! The cross-node bus (NATS): several relay nodes over one shared store tell
//! each other what they committed and which device connected where.
//!
//! The store is the truth; the bus only saves latency. Each commit's head
//! notices go out as one hint (the users, their new sequences and the
//! encoded entries), so other nodes deliver from their in-memory tails
//! without a store read. A lost or late hint costs latency, never a message:
//! on every (re)connection to NATS and every `refresh` interval a node
//! re-reads the heads of its connected users from the store. A registration
//! of a device with its `hello.generation` goes out too, so a node closes its
//! own older connection of that device (4005), and never a newer one.
//!
//! Core NATS (at most once), not JetStream: nothing on the bus needs to be
//! durable.

use std::sync::Arc;
use std::time::Duration;

use keepwire_proto::Seq;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::hub::Hub;
use crate::store::{HeadAdvance, HeadListener, RelayStore, UserId};

const TARGET: &str = "keepwire::bus";

/// Outgoing messages waiting for the bus task (bounded: a slow bus drops
/// hints, which only costs latency).
const QUEUE: usize = 64 * 1024;

/// A node's bus connection.
#[derive(Clone)]
pub struct Bus {
    node: Arc<str>,
    out: mpsc::Sender<Outgoing>,
}

enum Outgoing {
    Heads(Vec<HeadAdvance>),
    Registered {
        user: UserId,
        device: String,
        generation: Option<u64>,
        transient: bool,
    },
}

/// What goes over the wire.
#[derive(Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Wire {
    /// Entries committed by `node`.
    Heads {
        node: String,
        heads: Vec<(UserId, Seq, Option<String>)>,
    },
    /// A device connected to `node` with this generation.
    Registered {
        node: String,
        user: UserId,
        device: String,
        generation: Option<u64>,
        /// A push wake-up's short connection (`hello.transient`).
        #[serde(default)]
        transient: bool,
    },
}

/// Bus settings.
#[derive(Debug, Clone)]
pub struct BusConfig {
    /// The NATS server (`nats://host:port`).
    pub url: String,
    /// The subject prefix: nodes of one cluster share it.
    pub prefix: String,
    /// How often a node re-reads its connected users' heads.
    pub refresh: Duration,
}

impl Bus {
    /// Connects (retrying in the background if NATS is down) and starts the
    /// bus task. `hub` receives other nodes' hints; `store` is read to
    /// repair lost ones.
    pub async fn start(
        cfg: BusConfig,
        hub: Arc<Hub>,
        store: Arc<dyn RelayStore>,
        shutdown: CancellationToken,
    ) -> Result<Bus, String> {
        let node: Arc<str> = format!("{:016x}", rand::random::<u64>()).into();
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let client = async_nats::ConnectOptions::new()
            .name(format!("keepwire-relay-{node}"))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .event_callback(move |event| {
                let tx = events_tx.clone();
                async move {
                    let _ = tx.send(event);
                }
            })
            .connect(cfg.url.as_str())
            .await
            .map_err(|e| format!("cannot use the bus at {}: {e}", cfg.url))?;
        let (out, out_rx) = mpsc::channel(QUEUE);
        let bus = Bus {
            node: node.clone(),
            out,
        };
        let clock = crate::RelayClock::new();
        tokio::spawn(run(
            client, cfg, node, hub, store, clock, out_rx, events_rx, shutdown,
        ));
        Ok(bus)
    }

    /// A head listener that tells `inner` (the hub, or push before it), then
    /// the other nodes.
    pub fn listener(&self, inner: Arc<dyn HeadListener>) -> Arc<dyn HeadListener> {
        Arc::new(BusListener {
            inner,
            bus: self.clone(),
        })
    }

    /// A device registered here: other nodes close their older connection
    /// of it (see [`Hub::superseded`]).
    pub fn registered(&self, user: UserId, device: &str, generation: Option<u64>, transient: bool) {
        let _ = self.out.try_send(Outgoing::Registered {
            user,
            device: device.to_owned(),
            generation,
            transient,
        });
    }

    /// This node's id on the bus.
    pub fn node(&self) -> &str {
        &self.node
    }
}

struct BusListener {
    inner: Arc<dyn HeadListener>,
    bus: Bus,
}

impl HeadListener for BusListener {
    fn heads_advanced(&self, heads: &[HeadAdvance]) {
        self.inner.heads_advanced(heads);
        if self
            .bus
            .out
            .try_send(Outgoing::Heads(heads.to_vec()))
            .is_err()
        {
            tracing::debug!(target: TARGET, "bus queue full: a hint is dropped (other nodes repair from the store)");
        }
    }
}

#[allow(
    clippy::too_many_arguments,
    reason = "the task's whole state, taken once"
)]
async fn run(
    client: async_nats::Client,
    cfg: BusConfig,
    node: Arc<str>,
    hub: Arc<Hub>,
    store: Arc<dyn RelayStore>,
    clock: crate::RelayClock,
    mut out: mpsc::Receiver<Outgoing>,
    mut events: mpsc::UnboundedReceiver<async_nats::Event>,
    shutdown: CancellationToken,
) {
    let subject = format!("{}.relay", cfg.prefix);
    let mut sub = match client.subscribe(subject.clone()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(target: TARGET, error = %e, "cannot subscribe to the bus; nodes repair from the store every {:?}", cfg.refresh);
            return refresh_only(cfg.refresh, hub, store, shutdown).await;
        }
    };
    let mut tick = tokio::time::interval(cfg.refresh);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            o = out.recv() => {
                let Some(o) = o else { break };
                let wire = match o {
                    Outgoing::Heads(heads) => Wire::Heads {
                        node: node.to_string(),
                        heads: heads
                            .into_iter()
                            .map(|h| (h.user, h.seq, h.item.map(|i| i.to_string())))
                            .collect(),
                    },
                    Outgoing::Registered { user, device, generation, transient } => Wire::Registered {
                        node: node.to_string(),
                        user,
                        device,
                        generation,
                        transient,
                    },
                };
                let payload = serde_json::to_vec(&wire).unwrap_or_default();
                if let Err(e) = client.publish(subject.clone(), payload.into()).await {
                    tracing::debug!(target: TARGET, error = %e, "publishing a hint failed");
                }
            }
            m = futures_util::StreamExt::next(&mut sub) => {
                let Some(m) = m else { break };
                match serde_json::from_slice::<Wire>(&m.payload) {
                    Ok(Wire::Heads { node: from, heads }) if *from != *node => {
                        let heads: Vec<HeadAdvance> = heads
                            .into_iter()
                            .map(|(user, seq, item)| HeadAdvance {
                                user,
                                seq,
                                item: item.map(Into::into),
                                origin: None,
                            })
                            .collect();
                        hub.heads_advanced(&heads);
                    }
                    Ok(Wire::Registered { node: from, user, device, generation, transient }) if *from != *node => {
                        hub.superseded(user, &device, generation, transient, clock.now());
                        // A late older hello elsewhere: say again that ours is newer.
                        if let (Some(theirs), Some((ours, ours_transient))) =
                            (generation, hub.newest_generation(user, &device, transient))
                            && ours > theirs
                        {
                            let again = Wire::Registered {
                                node: node.to_string(),
                                user,
                                device,
                                generation: Some(ours),
                                transient: ours_transient,
                            };
                            let payload = serde_json::to_vec(&again).unwrap_or_default();
                            let _ = client.publish(subject.clone(), payload.into()).await;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(target: TARGET, error = %e, "an unreadable bus message"),
                }
            }
            e = events.recv() => {
                if let Some(e) = e {
                    tracing::info!(target: TARGET, event = %e, "bus");
                    if matches!(e, async_nats::Event::Connected) {
                        // Whatever was said while we were away is lost.
                        refresh(&hub, &*store).await;
                    }
                }
            }
            _ = tick.tick() => refresh(&hub, &*store).await,
        }
    }
}

/// Without a subscription: repair from the store on a timer only.
async fn refresh_only(
    every: Duration,
    hub: Arc<Hub>,
    store: Arc<dyn RelayStore>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => refresh(&hub, &*store).await,
        }
    }
}

/// Re-reads the heads of the users connected here; any that moved past what
/// the hub knows are announced (without items: readers use the store).
pub async fn refresh(hub: &Hub, store: &dyn RelayStore) {
    for (user, known) in hub.connected_users() {
        if let Ok(head) = store.inbox_head(user).await
            && head > known
        {
            hub.heads_advanced(&[HeadAdvance {
                user,
                seq: head,
                item: None,
                origin: None,
            }]);
        }
    }
}
