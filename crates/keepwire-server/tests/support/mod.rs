//! Shared helpers live in `keepwire-testkit`.

pub use keepwire_testkit::relay::{TestRelay, create_conv, reply, test_config};
