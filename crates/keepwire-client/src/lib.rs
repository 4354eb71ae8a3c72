//! The keepwire client: one durable, shared connection per device.
//!
//! [`Client`] drives the sans-IO state machine of `keepwire-core` with tokio:
//! it owns the WebSocket (tokio-tungstenite, rustls with certificate
//! verification), name resolution (pluggable [`Resolver`]), a clock that keeps
//! counting through suspend, and the SQLite [`store`] of the device's home
//! directory. It persists before it acknowledges: entries and the cursor in
//! one transaction, then `ack`; a send is accepted only once it is in the
//! outbox.
//!
//! Several processes may open one home (an app and its extension, a CLI next
//! to a running agent): one holds the connection (an exclusive lock on
//! `HOME/lock`), the others queue sends durably and read the store; the
//! holder picks their sends (and their requests for a sync) up within 100 ms.
//!
//! ```no_run
//! # async fn demo() -> Result<(), keepwire_client::ClientError> {
//! let client = keepwire_client::Client::builder("/tmp/alice-phone")
//!     .servers(vec!["ws://127.0.0.1:7447".into()])
//!     .token("kw_...")
//!     .build()
//!     .await?;
//! let handle = client.send(1, "hello").await?; // durable in the outbox now
//! handle.confirmed().await.ok();                // the relay committed it
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub mod analytics;
mod client;
mod home;
pub mod notify;
mod push;
pub mod store;
mod transport;

pub use client::{
    CA_META, Client, ClientBuilder, ClientError, ClientEvent, DEFAULT_NETWORK, LOCK_WAIT,
    MAX_PUSH_PAYLOAD, PushResult, SendError, SendHandle, Status, SyncOutcome, SyncReport,
    TokenProvider, UNREACHABLE_ROUNDS, parse_pem_certificates,
};
pub use home::{Home, HomeLock};
pub use keepwire_core::{
    AppState, BackgroundPolicy, Backoff, Config, ConnectionError, Jitter, Network, State,
    StopReason,
};
pub use push::{PushRegistration, PushStatus, WebPushKeys};
pub use transport::{BoxFuture, Resolver, SystemResolver};

/// Helpers for conformance tooling, not for apps.
pub mod testing {
    pub use crate::transport::conformance_echo;
}
