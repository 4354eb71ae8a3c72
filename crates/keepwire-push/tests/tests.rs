//! Integration tests of keepwire-push against local mock services over real
//! sockets on 127.0.0.1: FCM (token + send endpoints), APNs (HTTP/2 over
//! TLS with a test CA) and Web Push, plus the dispatcher and an independent
//! implementation (PyPI `http-ece` + `cryptography`) checking the crate's
//! encryption and VAPID.

mod support;

mod apns;
mod dispatch;
mod fcm;
mod independent;
mod webpush;
