//! A relay in this process on a temp database, with helpers to create users,
//! conversations and bulk messages.

use std::sync::Arc;
use std::time::Duration;

use keepwire_proto::{ClientFrame, ConvCreate, ConvInfo, ConvKind, Send, ServerFrame};
use keepwire_server::store::{Actor, Retention, UserId};
use keepwire_server::{AdminStore as _, RelayStore as _};
use keepwire_server::{Config, Metrics, RelayServer, SqliteOptions, SqliteStore};

use crate::{TempDir, WsClient};

/// An in-process relay. Shut down on drop.
pub struct TestRelay {
    pub server: Option<RelayServer>,
    pub store: Arc<SqliteStore>,
    pub url: String,
    pub host_port: String,
    _dir: Option<TempDir>,
}

/// Limits loose enough that only tests about limits meet them.
pub fn test_config() -> Config {
    let mut c = Config {
        listen: "127.0.0.1:0".parse().expect("address"),
        ..Config::default()
    };
    c.limits.sends_per_sec = 1_000_000;
    c.send_burst = 1_000_000;
    c.user_sends_per_sec = 1_000_000;
    c.user_send_burst = 1_000_000;
    c.max_connections_per_user = 200;
    c.revocation_poll = Duration::from_millis(50);
    c
}

impl TestRelay {
    pub async fn start() -> TestRelay {
        Self::start_with(test_config(), Retention::default()).await
    }

    pub async fn start_with(config: Config, retention: Retention) -> TestRelay {
        let dir = TempDir::new("relay");
        let mut relay = Self::open(&dir, config, retention).await;
        relay._dir = Some(dir);
        relay
    }

    /// A relay on `dir/relay.db` (kept after it stops: start another on it).
    pub async fn start_at(dir: &TempDir, config: Config) -> TestRelay {
        Self::open(dir, config, Retention::default()).await
    }

    async fn open(dir: &TempDir, config: Config, retention: Retention) -> TestRelay {
        let metrics = Arc::new(Metrics::default());
        let store = SqliteStore::open(
            &dir.join("relay.db"),
            SqliteOptions {
                retention,
                metrics: Some(metrics.clone()),
                ..Default::default()
            },
        )
        .expect("open relay store");
        let server = RelayServer::start(config, store.clone(), metrics)
            .await
            .expect("start relay");
        let url = server.url();
        let host_port = server.local_addr().to_string();
        TestRelay {
            server: Some(server),
            store,
            url,
            host_port,
            _dir: None,
        }
    }

    /// Creates a user and returns a token.
    pub async fn user(&self, name: &str) -> String {
        self.store.create_user(name).await.expect("create user");
        self.store
            .issue_token(name, Duration::from_secs(3600))
            .await
            .expect("issue token")
            .token
    }

    /// The internal id of the user holding `token`.
    pub async fn user_id(&self, token: &str) -> UserId {
        self.store
            .authenticate(token)
            .await
            .expect("valid token")
            .id
    }

    pub async fn connect(&self, token: &str, device: &str) -> WsClient {
        WsClient::connect(&self.url, token, device, None)
            .await
            .unwrap_or_else(|code| panic!("connect refused with {code:?}"))
    }

    /// Stores `n` messages from `user` in `conv` straight through the store,
    /// many per group commit (bodies `"{prefix}{i}"`, cids unique per prefix).
    pub async fn seed(&self, user: UserId, conv: u64, n: usize, prefix: &str) {
        let mut done = 0;
        while done < n {
            let chunk = (n - done).min(2000);
            let mut tasks = Vec::with_capacity(chunk);
            for i in done..done + chunk {
                let store = self.store.clone();
                let send = Send {
                    cid: format!("seed-{prefix}-{i:012}"),
                    conv,
                    kind: "text".into(),
                    body: format!("{prefix}{i}"),
                };
                tasks.push(tokio::spawn(async move {
                    store
                        .send(Actor::User(user), "seed", send)
                        .await
                        .expect("seed send")
                }));
            }
            for t in tasks {
                t.await.expect("seed task");
            }
            done += chunk;
        }
    }

    pub async fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
            s.wait().await;
        }
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        if let Some(s) = &self.server {
            s.shutdown();
        }
    }
}

/// Creates a conversation through the protocol and returns it.
pub async fn create_conv(c: &mut WsClient, kind: ConvKind, members: &[&str]) -> ConvInfo {
    let rid = format!("r{:x}", rand::random::<u64>());
    c.send(&ClientFrame::ConvCreate(ConvCreate {
        rid: rid.clone(),
        key: format!("k{:x}", rand::random::<u64>()),
        kind,
        members: members.iter().map(|s| s.to_string()).collect(),
        name: None,
    }))
    .await;
    c.recv_where(|f| match f {
        ServerFrame::Conv { rid: r, conv, .. } if *r == rid => Some(conv.clone()),
        ServerFrame::Error(e) if e.rid.as_deref() == Some(&rid) => panic!("create failed: {e:?}"),
        _ => None,
    })
    .await
}

/// Waits for the reply to request `rid` (a success frame or an error).
pub async fn reply(c: &mut WsClient, rid: &str) -> ServerFrame {
    let rid = rid.to_owned();
    c.recv_where(move |f| {
        let matches = match f {
            ServerFrame::Conv { rid: r, .. } | ServerFrame::Convs { rid: r, .. } => *r == rid,
            ServerFrame::History(p) => p.rid == rid,
            ServerFrame::Error(e) => e.rid.as_deref() == Some(rid.as_str()),
            _ => false,
        };
        matches.then(|| f.clone())
    })
    .await
}
