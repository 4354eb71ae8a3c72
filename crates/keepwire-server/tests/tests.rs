//! Integration tests of the relay over real sockets on 127.0.0.1 (one test
//! binary, modules by topic).

mod support;

mod bad_input;
mod bus;
mod conversations;
mod dedupe;
mod delivery;
mod group_commit;
mod hostile;
mod integration;
mod lifecycle;
mod push;
mod resume;
mod sim;
mod store_contract;
