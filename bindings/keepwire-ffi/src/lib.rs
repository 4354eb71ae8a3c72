//! keepwire's client engine for apps: Kotlin (Android), Swift (iOS) and
//! Python, through [UniFFI](https://mozilla.github.io/uniffi-rs/).
//!
//! A thin layer over [`keepwire_client::Client`]: one [`Client`] per home
//! directory (the device's store), blocking methods that return quickly or
//! within the deadline they are given, an [`EventListener`] for what happens
//! (state changes, messages, confirmations, notifications to show and to
//! clear), a [`TokenProvider`] the client asks once for a fresh token when
//! the relay refuses the current one, and [`Client::on_push`] for push
//! wake-ups, which returns what to show.
//!
//! Threads: one tokio runtime for the whole process with at most two worker
//! threads (and at most four blocking threads, for name resolution and the
//! token provider). Listener callbacks run on one thread per client that
//! the crate owns (`keepwire-callbacks`), in order, never inside the
//! connection's driver or under a store lock: a callback may call any
//! method of the client, `close` included. The token provider is called on
//! one of the blocking threads. A callback that throws is logged and the
//! next event is delivered as usual.
//!
//! Call the blocking methods from a background thread (Kotlin
//! `Dispatchers.IO`, a Swift background queue or `Task.detached`): `sync_once`
//! and `on_push` take up to their deadline, `create_conversation` up to 30 s;
//! the others return in milliseconds.
#![forbid(unsafe_code)]

mod client;
mod types;

pub use client::{Client, EventListener, TokenProvider};
pub use types::*;

uniffi::setup_scaffolding!("keepwire_ffi");

/// Errors of the bindings: a small set an app can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, uniffi::Error)]
pub enum KeepwireError {
    /// The home has no relay URL or token: call `login` first.
    #[error("not logged in: {detail}")]
    NotLoggedIn {
        /// Detail.
        detail: String,
    },
    /// An argument is not acceptable (a relay URL that is not `ws://` or
    /// `wss://`, bad quiet hours, an oversized push payload...).
    #[error("invalid input: {detail}")]
    InvalidInput {
        /// What is wrong and what to pass instead.
        detail: String,
    },
    /// The request needs the connection and there is none now (or another
    /// process on this home holds it): retry when `StateChanged` says
    /// `Connected`.
    #[error("not connected to the relay")]
    NotConnected,
    /// The relay refused the request.
    #[error("refused by the relay: {code}: {detail}")]
    Refused {
        /// The relay's error code (PROTOCOL.md §10), e.g. `not_member`.
        code: String,
        /// Detail.
        detail: String,
    },
    /// The client stopped for good (token or device refused): log in again.
    #[error("the client stopped: {reason:?}")]
    Stopped {
        /// Why.
        reason: StopReason,
    },
    /// The operation did not finish in time.
    #[error("timed out")]
    Timeout,
    /// The device's store failed (disk full, no permission, a store from a
    /// newer keepwire, TLS roots that cannot be read).
    #[error("storage: {detail}")]
    Storage {
        /// Detail.
        detail: String,
    },
    /// The client was closed.
    #[error("the client is closed")]
    Closed,
}

impl From<keepwire_client::ClientError> for KeepwireError {
    fn from(e: keepwire_client::ClientError) -> Self {
        use keepwire_client::ClientError as E;
        match e {
            E::NotLoggedIn(_) => KeepwireError::NotLoggedIn {
                detail: e.to_string(),
            },
            E::BadUrl(_) | E::BadPushPayload(_) | E::BadPushRegistration(_) => {
                KeepwireError::InvalidInput {
                    detail: e.to_string(),
                }
            }
            E::NotConnected => KeepwireError::NotConnected,
            E::Refused { code, message } => KeepwireError::Refused {
                code: code.to_string(),
                detail: message,
            },
            E::Stopped(r) => KeepwireError::Stopped { reason: r.into() },
            E::Timeout => KeepwireError::Timeout,
            E::Closed => KeepwireError::Closed,
            other => KeepwireError::Storage {
                detail: other.to_string(),
            },
        }
    }
}

impl From<keepwire_client::store::StoreError> for KeepwireError {
    fn from(e: keepwire_client::store::StoreError) -> Self {
        KeepwireError::Storage {
            detail: e.to_string(),
        }
    }
}

/// The process's runtime: two workers, a few blocking threads.
fn runtime() -> Result<&'static tokio::runtime::Runtime, KeepwireError> {
    static RUNTIME: std::sync::OnceLock<Result<tokio::runtime::Runtime, String>> =
        std::sync::OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .max_blocking_threads(4)
                .thread_name("keepwire-rt")
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the keepwire runtime: {e}"))
        })
        .as_ref()
        .map_err(|detail| KeepwireError::Storage {
            detail: detail.clone(),
        })
}

/// The number of worker threads of the crate's runtime (for tests and
/// diagnostics; always at most 2).
#[uniffi::export]
pub fn runtime_worker_threads() -> u32 {
    runtime()
        .map(|r| r.metrics().num_workers() as u32)
        .unwrap_or(0)
}
