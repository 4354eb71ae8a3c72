//! # keepwire-push
//!
//! Push wake-ups for devices that are not connected to the relay, through
//! the three real services:
//!
//! - **FCM HTTP v1** (Android): OAuth 2.0 from a service-account key, data
//!   messages with priority HIGH, no collapse key ([`fcm`]);
//! - **APNs** (iOS): token-based auth (ES256 provider JWT from the `.p8`
//!   key) over one HTTP/2 connection per environment ([`apns`]);
//! - **Web Push** (browsers, UnifiedPush): RFC 8030 delivery, RFC 8291
//!   `aes128gcm` encryption ([`ece`]), RFC 8292 VAPID ([`vapid`]), with an
//!   address guard against SSRF ([`webpush`]).
//!
//! The relay owns *when* to push; this crate owns *how*: validated
//! [`Registration`]s, provider clients that turn one call into an
//! [`Attempt`], and a [`Dispatcher`] with bounded queues, retries, a
//! per-device rate limit, metrics, and one [`Report`] per push telling the
//! relay what to do (store the success, delete a dead registration, alert
//! the operator).
//!
//! ## Privacy
//!
//! A push carries the registration's opaque random id and nothing else by
//! default: not the sender, not the inbox position (which would tell Google
//! and Apple each user's message volume). A preview goes along only when the
//! operator allows previews (`previews = true`), the caller adds one, and
//! the registration has RFC 8291 keys; it is then encrypted to the device
//! on every provider. Tokens, endpoints and keys are never logged, never
//! metric labels, and redacted by `Debug`; [`RegistrationKey`] (a digest)
//! is what logs show.
//!
//! ## Using it from the relay
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use keepwire_push::{Dispatcher, Message, PushConfig, PushJob, Registration, RegistrationId, VapidKey};
//!
//! let config = PushConfig::load(std::path::Path::new("push.toml"))?;
//! let vapid = VapidKey::generate(); // once; keep `vapid.to_bytes()` in the store
//! let mut registry = prometheus_client::registry::Registry::default();
//! let (push, mut reports) = Dispatcher::builder(config).vapid(vapid).start(Some(&mut registry))?;
//!
//! let registration: Registration = serde_json::from_str(r#"{"provider":"fcm","token":"abc:123"}"#)?;
//! push.check_registration(&registration)?; // at registration time
//! let message = Message::wake(RegistrationId::new("r_8sK2")?);
//! push.enqueue(PushJob { id: 1, registration, message })?; // never blocks
//!
//! while let Some(report) = reports.recv().await {
//!     // report.outcome: Delivered / Unregistered (delete it) / ConfigError
//!     // (alert) / Rejected / GaveUp / Abandoned
//! }
//! # Ok(()) }
//! ```
//!
//! ## Using it from a client
//!
//! With `default-features = false` the crate is [`ece`] and [`registration`]
//! only (no HTTP stack, no runtime): a client makes its RFC 8291 keys with
//! [`ece::ReceiverKeys::generate`], registers [`ece::ReceiverKeys::push_keys`],
//! and opens a Web Push body or an FCM/APNs `kw_preview` with
//! [`ece::decrypt`].
//!
//! ## Configuration
//!
//! See [`config`] for the TOML file (`keepwire serve --push-config FILE`).
//!
//! ## Testing against mocks
//!
//! Every endpoint (FCM, the service account's `token_uri`, both APNs
//! gateways, Web Push endpoints) can point at a local server; `http` is
//! accepted only to loopback. [`clock::ManualClock`] runs virtual time for
//! token lifetimes. The crate's integration tests run mock FCM, APNs
//! (HTTP/2 over TLS with a test CA) and Web Push services this way.
#![forbid(unsafe_code)]

pub mod ece;
pub mod registration;

#[cfg(feature = "providers")]
pub mod apns;
#[cfg(feature = "providers")]
pub mod clock;
#[cfg(feature = "providers")]
pub mod config;
#[cfg(feature = "providers")]
pub mod dispatch;
#[cfg(feature = "providers")]
pub mod fcm;
#[cfg(feature = "providers")]
mod message;
#[cfg(feature = "providers")]
pub mod metrics;
#[cfg(feature = "providers")]
pub mod net;
#[cfg(feature = "providers")]
pub mod vapid;
#[cfg(feature = "providers")]
pub mod webpush;

pub use ece::{EceError, PushKeys, ReceiverKeys};
pub use registration::{
    ApnsEnvironment, ApnsToken, ApnsTopic, Endpoint, FcmToken, Provider, Registration,
    RegistrationError, RegistrationId, RegistrationKey,
};

#[cfg(feature = "providers")]
pub use config::{ConfigError, Limits, PushConfig};
#[cfg(feature = "providers")]
pub use dispatch::{
    Dispatcher, DispatcherBuilder, EnqueueError, Outcome, PushJob, Report, StartError,
};
#[cfg(feature = "providers")]
pub use message::{Attempt, CollapseKey, Message, PushKind};
#[cfg(feature = "providers")]
pub use vapid::VapidKey;
