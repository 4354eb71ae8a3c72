//! Integration tests of the client against an in-process relay over real
//! sockets on 127.0.0.1.

mod e2e;
mod push;
mod wake;
