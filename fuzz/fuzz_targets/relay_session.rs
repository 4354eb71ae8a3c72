//! The relay's per-connection frame handling, over a real socket to an
//! in-process relay on a temporary SQLite database: arbitrary sequences of
//! frames (valid hellos and sends to real conversations, arbitrary client
//! frames, raw text, binary, pings, closes). After each sequence the relay
//! must either answer a ping or have closed the connection with a
//! documented close code, and must still welcome a fresh connection. A
//! panic anywhere in the relay aborts the process (libFuzzer reports it).
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arbitrary::Arbitrary;
use futures_util::{SinkExt as _, StreamExt as _};
use keepwire_proto::{ClientFrame, CloseCode, ConvCreate, ConvKind, Cursor, Hello, SUBPROTOCOL};
use keepwire_server::store::Actor;
use keepwire_server::{
    AdminStore as _, Config, Metrics, RelayServer, RelayStore as _, SqliteOptions, SqliteStore,
};
use libfuzzer_sys::fuzz_target;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCode;
use tokio_tungstenite::tungstenite::{Bytes, Message};

struct Relay {
    rt: tokio::runtime::Runtime,
    url: String,
    tokens: Vec<String>,
    epoch: String,
    _server: RelayServer,
}

const USERS: [&str; 3] = ["alice", "bob", "carol"];

fn relay() -> &'static Relay {
    static RELAY: OnceLock<Relay> = OnceLock::new();
    RELAY.get_or_init(|| {
        // A panic in any relay task must end the process, not just the task.
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            default(info);
            std::process::abort();
        }));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        // One directory, replaced by each fuzzing process (libFuzzer exits without cleanup).
        let dir = std::env::temp_dir().join("keepwire-fuzz-relay");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let (server, url, tokens, epoch) = rt.block_on(async {
            let metrics = Arc::new(Metrics::default());
            let store = SqliteStore::open(
                &dir.join("relay.db"),
                SqliteOptions {
                    metrics: Some(metrics.clone()),
                    ..Default::default()
                },
            )
            .expect("store");
            let mut ids = Vec::new();
            let mut tokens = Vec::new();
            for u in USERS {
                ids.push(store.create_user(u).await.expect("user"));
                tokens.push(
                    store
                        .issue_token(u, Duration::from_secs(86400 * 365))
                        .await
                        .expect("token")
                        .token,
                );
            }
            // 1: alice+bob (direct), 2: bob+carol (group without alice).
            for (creator, members, kind) in [
                (0, vec!["bob".to_string()], ConvKind::Direct),
                (1, vec!["carol".to_string()], ConvKind::Group),
            ] {
                store
                    .conv_create(
                        Actor::User(ids[creator]),
                        ConvCreate {
                            rid: "r".into(),
                            key: format!("k{creator}"),
                            kind,
                            members,
                            name: None,
                        },
                        100,
                    )
                    .await
                    .expect("conversation");
            }
            let config = Config {
                listen: "127.0.0.1:0".parse().expect("address"),
                max_connections_per_user: 10_000,
                handshake_timeout: Duration::from_secs(2),
                ..Config::default()
            };
            let server = RelayServer::start(config, store.clone(), metrics)
                .await
                .expect("relay");
            let url = server.url();
            let epoch = store.epoch().to_string();
            (server, url, tokens, epoch)
        });
        Relay {
            rt,
            url,
            tokens,
            epoch,
            _server: server,
        }
    })
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// A hello with a valid token.
    HelloAs {
        who: u8,
        device: u8,
        cursor: Option<u64>,
        heartbeat_ms: Option<u64>,
        history: Option<u64>,
    },
    /// A send to one of the real conversations (or a missing one).
    SendTo {
        conv: u8,
        cid: u8,
        body: String,
    },
    /// Any client frame at all.
    Frame(ClientFrame),
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Close(u16),
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open(url: &str) -> Ws {
    let mut req = url.into_client_request().expect("request");
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static(SUBPROTOCOL),
    );
    tokio_tungstenite::connect_async(req)
        .await
        .expect("connect")
        .0
}

fn hello(
    r: &Relay,
    who: u8,
    device: u8,
    cursor: Option<u64>,
    hb: Option<u64>,
    history: Option<u64>,
) -> String {
    keepwire_proto::encode(&ClientFrame::Hello(Hello {
        token: r.tokens[usize::from(who) % USERS.len()].clone(),
        device: format!("fuzz-{}", device % 4),
        cursor: cursor.map(|seq| Cursor {
            epoch: r.epoch.clone(),
            seq,
        }),
        heartbeat_ms: hb,
        history,
        agent: None,
        generation: None,
        transient: false,
        window: None,
    }))
}

/// Reads until a pong (`None`) or the close (its code); panics on a hang.
async fn settle(ws: &mut Ws) -> Option<Option<u16>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("the relay neither answered a ping nor closed within 10 s");
        match msg {
            Some(Ok(Message::Text(t))) if t.contains("\"type\":\"pong\"") => return None,
            Some(Ok(Message::Close(f))) => return Some(f.map(|f| u16::from(f.code))),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return Some(None),
        }
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let r = relay();
    r.rt.block_on(async {
        let mut ws = open(&r.url).await;
        // After a client close the relay echoes the client's code.
        let mut closed_by_us = false;
        for op in ops.into_iter().take(24) {
            let msg = match op {
                Op::HelloAs {
                    who,
                    device,
                    cursor,
                    heartbeat_ms,
                    history,
                } => Message::Text(hello(r, who, device, cursor, heartbeat_ms, history).into()),
                Op::SendTo { conv, cid, body } => Message::Text(
                    keepwire_proto::encode(&ClientFrame::Send(keepwire_proto::Send {
                        cid: format!("{:032x}", cid),
                        conv: u64::from(conv % 4),
                        kind: "text".into(),
                        body,
                    }))
                    .into(),
                ),
                Op::Frame(f) => Message::Text(keepwire_proto::encode(&f).into()),
                Op::Text(t) => Message::Text(t.into()),
                Op::Binary(b) => Message::Binary(Bytes::from(b)),
                Op::Ping(p) => {
                    Message::Ping(Bytes::from(p.into_iter().take(125).collect::<Vec<u8>>()))
                }
                Op::Close(code) => {
                    closed_by_us = true;
                    Message::Close(Some(CloseFrame {
                        code: WsCode::from(code),
                        reason: "fuzz".into(),
                    }))
                }
            };
            if ws.send(msg).await.is_err() {
                break;
            }
        }
        let _ = ws
            .send(Message::Text(
                keepwire_proto::encode(&ClientFrame::Ping {}).into(),
            ))
            .await;
        if let Some(Some(code)) = settle(&mut ws).await
            && !closed_by_us
        {
            assert!(
                CloseCode::from_code(code).is_some(),
                "undocumented close code {code}"
            );
        }
        drop(ws);
        // The relay still serves others.
        let mut fresh = open(&r.url).await;
        fresh
            .send(Message::Text(hello(r, 2, 3, None, None, Some(0)).into()))
            .await
            .expect("hello");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::time::timeout_at(deadline, fresh.next()).await {
                Ok(Some(Ok(Message::Text(t)))) if t.contains("\"type\":\"welcome\"") => break,
                Ok(Some(Ok(_))) => {}
                other => panic!("a fresh connection was not welcomed: {other:?}"),
            }
        }
    });
});
