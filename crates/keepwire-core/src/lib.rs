//! keepwire's client engine core: a sans-IO state machine.
//!
//! [`Connection`] holds everything a keepwire client decides: when to
//! connect, how long to back off, what to send after a handshake, when a
//! connection is dead, what to acknowledge. It performs no I/O, reads no
//! clock and uses no global RNG: the driver (`keepwire-client`) feeds it
//! events with the current [`Instant`] and carries out its [`Transmit`]s.
//! That makes it testable by deterministic simulation (see `keepwire-server/tests/sim`, where real clients meet the real relay session).
#![forbid(unsafe_code)]

mod backoff;
mod connection;
mod requests;
mod rng;
mod timer;

pub use backoff::{Backoff, Jitter};
pub use connection::{
    ACK_DELAY, ACK_EVERY, AdaptiveHeartbeat, AppState, BackgroundPolicy, Config, Connection,
    ConnectionError, Event, FailureKind, Network, NotConnected, OutboxItem, RequestError, State,
    StopReason, Transmit, TransportEvent, WINDOW,
};
pub use keepwire_proto::Instant;
pub use requests::{BACKFILL_PAGE, BackfillDue, RequestId};
pub use rng::SeededRng;
