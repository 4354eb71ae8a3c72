//! Fault injection for keepwire.
//!
//! - [`proxy::FaultProxy`]: a TCP proxy whose faults (latency, blackhole,
//!   reset, close after N bytes, idle cut) switch while connections are open.
//! - [`run`]: a chaos run across real processes — a relay and device
//!   processes killed with SIGKILL and restarted on their stores — under a
//!   seeded fault schedule, then healed and checked.
//! - [`check`]: the exactly-once checker. Its ground truth is the senders'
//!   fsynced [`journal`], never the stores it checks.
//! - [`device`]: the device process a run starts (`keepwire-chaos device`).
//! - [`push_mock`]: a mock FCM whose faults switch during a run; the pushes
//!   it delivers wake the devices (`on_push`), as the OS would.

pub mod check;
pub mod device;
pub mod journal;
pub mod proxy;
pub mod push_mock;
pub mod run;

pub use proxy::{Fault, FaultProxy};
