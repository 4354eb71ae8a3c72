//! Several relay nodes over one store, with the NATS bus (the shared NATS
//! server on 127.0.0.1:4222, a subject prefix per test) or without it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keepwire_proto::{ClientFrame, CloseCode, ConvKind, Hello, ServerFrame};
use keepwire_server::bus::BusConfig;
use keepwire_server::store::{MemoryDisk, MemoryOptions, MemoryStore};
use keepwire_server::{AdminStore as _, Config, Metrics, RelayServer};
use keepwire_testkit::{Incoming, WsClient};

use crate::support::{create_conv, test_config};

/// `n` relays on one memory store (each its own handle: a write tells only
/// its own node, as with a shared database).
struct Cluster {
    nodes: Vec<RelayServer>,
    admin: Arc<MemoryStore>,
}

impl Cluster {
    async fn start(n: usize, bus: Option<&str>) -> Cluster {
        let admin = MemoryStore::new(MemoryOptions::default());
        let disk: Arc<MemoryDisk> = admin.disk();
        let prefix = format!("kwtest{:x}", rand::random::<u64>());
        let mut nodes = Vec::new();
        for _ in 0..n {
            let store = MemoryStore::on_disk(disk.clone(), MemoryOptions::default());
            let config = Config {
                bus: bus.map(|url| BusConfig {
                    url: url.into(),
                    prefix: prefix.clone(),
                    refresh: Duration::from_millis(500),
                }),
                ..test_config()
            };
            nodes.push(
                RelayServer::start(config, store, Arc::new(Metrics::default()))
                    .await
                    .expect("start a node"),
            );
        }
        Cluster { nodes, admin }
    }

    async fn user(&self, name: &str) -> String {
        self.admin.create_user(name).await.unwrap();
        self.admin
            .issue_token(name, Duration::from_secs(3600))
            .await
            .unwrap()
            .token
    }

    async fn connect(&self, node: usize, token: &str, device: &str) -> WsClient {
        WsClient::connect(&self.nodes[node].url(), token, device, None)
            .await
            .expect("welcome")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &self.nodes {
            n.shutdown();
        }
    }
}

/// Sends from node 0, receives on node 1; returns the delivery time.
async fn cross_node_delivery(c: &Cluster) -> Duration {
    let (ta, tb) = (c.user("alice").await, c.user("bob").await);
    let mut a = c.connect(0, &ta, "a").await;
    let conv = create_conv(&mut a, ConvKind::Direct, &["bob"]).await;
    let mut b = c.connect(1, &tb, "b").await;
    b.entries(1, true).await;
    let t0 = Instant::now();
    let cid = a.send_message(conv.id, "across").await;
    a.confirm(&cid).await;
    let e = b.entry().await;
    let took = t0.elapsed();
    assert!(
        matches!(&e.item, keepwire_proto::EntryItem::Message(m) if m.body == "across"),
        "{e:?}"
    );
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_sent_on_one_node_is_delivered_on_another_through_the_bus() {
    let c = Cluster::start(2, Some("nats://127.0.0.1:4222")).await;
    let took = cross_node_delivery(&c).await;
    // A hint, not the half-second repair: well under it (generous for CI).
    assert!(took < Duration::from_millis(450), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_nats_delivery_still_comes_within_a_second_from_the_store() {
    // Nothing listens on port 9: the bus keeps retrying, the nodes repair.
    let c = Cluster::start(2, Some("nats://127.0.0.1:9")).await;
    let took = cross_node_delivery(&c).await;
    assert!(took < Duration::from_secs(2), "{took:?}");
}

async fn hello(url: &str, token: &str, device: &str, generation: u64) -> WsClient {
    let mut c = WsClient::open(url).await.unwrap();
    c.send(&ClientFrame::Hello(Hello {
        token: token.into(),
        device: device.into(),
        cursor: None,
        heartbeat_ms: None,
        history: Some(10),
        agent: None,
        generation: Some(generation),
        transient: false,
        window: None,
    }))
    .await;
    c
}

async fn welcomed(c: &mut WsClient) -> bool {
    match c.recv().await {
        Incoming::Frame(ServerFrame::Welcome(_)) => true,
        Incoming::Closed(code) => {
            assert_eq!(code, Some(CloseCode::Replaced.code()));
            false
        }
        Incoming::Frame(other) => panic!("{other:?}"),
    }
}

/// One device connecting to two nodes, newer and older `hello`s in either
/// order: the newer generation survives every time, the older is refused or
/// closed with 4005.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_device_on_two_nodes_keeps_the_newer_connection() {
    let c = Cluster::start(2, Some("nats://127.0.0.1:4222")).await;
    let t = c.user("dana").await;
    let mut generation = 10;
    for round in 0..20 {
        generation += 2;
        // Even rounds: the newer hello arrives second; odd rounds: first.
        let newer_first = round % 2 == 1;
        let first_node = round % 2;
        let (g1, g2) = if newer_first {
            (generation, generation - 1)
        } else {
            (generation - 1, generation)
        };
        let mut c1 = hello(&c.nodes[first_node].url(), &t, "phone", g1).await;
        assert!(
            welcomed(&mut c1).await,
            "round {round}: the first is welcomed"
        );
        let mut c2 = hello(&c.nodes[1 - first_node].url(), &t, "phone", g2).await;
        let second_welcomed = welcomed(&mut c2).await;
        let (mut newer, mut older, older_welcomed) = if newer_first {
            (c1, c2, second_welcomed)
        } else {
            assert!(second_welcomed, "round {round}: the newer is welcomed");
            (c2, c1, true)
        };
        if older_welcomed {
            assert_eq!(
                older.expect_close().await,
                Some(CloseCode::Replaced.code()),
                "round {round}: the older is closed"
            );
        }
        newer.barrier().await;
        newer.close().await;
    }
}
