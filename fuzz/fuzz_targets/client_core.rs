//! The client core fed arbitrary sequences of events (the quinn pattern): app
//! and network changes, timers, transport events and arbitrary relay frames,
//! valid or not. No panic; everything it transmits is a valid client frame;
//! the inbox entries it hands out are contiguous and only move forward
//! within a session; its outbox never holds more than was queued.
#![no_main]

use std::time::Duration;

use arbitrary::Arbitrary;
use keepwire_core::{
    AppState, Config, Connection, Event, FailureKind, Instant, Network, OutboxItem, Transmit,
    TransportEvent,
};
use keepwire_proto::{Limits, ServerFrame, decode_client, encode};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Op {
    Start,
    Close,
    App(bool),
    Network(Option<u8>),
    Sync(u16),
    EndSync,
    Token(Option<u8>),
    Persist,
    Queue { conv: u8, body: String },
    Advance(u16),
    Opened,
    Frame(ServerFrame),
    Raw(String),
    Closed(Option<u16>),
    Failed(u8),
    Stale(ServerFrame),
    Request(u8),
}

fuzz_target!(|ops: Vec<Op>| {
    let mut cfg = Config::new("fuzz-device", vec!["ws://relay.invalid".into()]);
    cfg.history = 100;
    let mut now = Instant::from_duration(Duration::from_secs(1));
    let mut c = Connection::new(cfg, "token".into(), None, 7, now);
    let limits = Limits::default();
    let mut open: Option<u64> = None;
    let mut queued = 0usize;
    let mut last_seq: Option<u64> = None;
    let mut unpersisted: Option<u64> = None;
    for op in ops {
        match op {
            Op::Start => c.start(now),
            Op::Close => c.close(now),
            Op::App(fg) => c.handle_app_state(
                if fg {
                    AppState::Foreground
                } else {
                    AppState::Background
                },
                now,
            ),
            Op::Network(n) => c.handle_network(
                match n {
                    Some(id) => Network::Online(format!("net{}", id % 4)),
                    None => Network::Offline,
                },
                now,
            ),
            Op::Sync(ms) => c.request_sync(now + Duration::from_millis(ms.into()), now),
            Op::EndSync => c.end_sync(now),
            Op::Token(t) => c.handle_token(t.map(|t| format!("token{t}")), now),
            Op::Persist => {
                if let Some(seq) = unpersisted.take() {
                    c.handle_persisted(seq, now);
                }
            }
            Op::Queue { conv, body } => {
                queued += 1;
                c.queue_send(
                    OutboxItem {
                        cid: format!("{queued:032x}"),
                        conv: u64::from(conv % 3) + 1,
                        kind: "text".into(),
                        body,
                    },
                    now,
                );
            }
            Op::Advance(ms) => {
                now = now + Duration::from_millis(ms.into());
                c.handle_timeout(now);
            }
            Op::Opened => {
                if let Some(id) = open {
                    c.handle_transport(id, TransportEvent::Opened, now);
                }
            }
            Op::Frame(f) => {
                if let Some(id) = open {
                    c.handle_transport(id, TransportEvent::Frame(encode(&f)), now);
                }
            }
            Op::Raw(text) => {
                if let Some(id) = open {
                    c.handle_transport(id, TransportEvent::Frame(text), now);
                }
            }
            Op::Closed(code) => {
                if let Some(id) = open.take() {
                    c.handle_transport(id, TransportEvent::Closed(code), now);
                }
            }
            Op::Failed(k) => {
                if let Some(id) = open.take() {
                    let kind = match k % 4 {
                        0 => FailureKind::Dns,
                        1 => FailureKind::Refused,
                        2 => FailureKind::Timeout,
                        _ => FailureKind::HttpStatus(503),
                    };
                    c.handle_transport(id, TransportEvent::Failed(kind), now);
                }
            }
            Op::Stale(f) => c.handle_transport(u64::MAX, TransportEvent::Frame(encode(&f)), now),
            Op::Request(conv) => {
                let conv = u64::from(conv);
                // A request, a backfill (answered by `Frame`s with any rid)
                // and a frame without a rid.
                let _ = c.send_request(
                    keepwire_proto::ClientFrame::ConvList { rid: String::new() },
                    now,
                );
                c.backfill(
                    keepwire_core::BackfillDue {
                        conv,
                        before: conv.saturating_add(300),
                        known: conv / 2,
                    },
                    now,
                );
                let _ = c.send_read(conv, conv, now);
            }
        }
        while let Some(t) = c.poll_transmit() {
            match t {
                Transmit::Open { id, .. } => {
                    open = Some(id);
                    last_seq = None;
                }
                Transmit::Frame { text, .. } => {
                    decode_client(&text, &limits)
                        .unwrap_or_else(|e| panic!("the core sent an invalid frame {text}: {e}"));
                }
                Transmit::Close { id, .. } => {
                    if open == Some(id) {
                        open = None;
                    }
                }
            }
        }
        while let Some(e) = c.poll_event() {
            match e {
                Event::Welcome(_) => last_seq = None,
                Event::Entries(entries) => {
                    for e in &entries {
                        if let Some(prev) = last_seq {
                            assert_eq!(e.seq, prev + 1, "entries contiguous within a session");
                        }
                        last_seq = Some(e.seq);
                    }
                    if let Some(last) = entries.last() {
                        unpersisted = Some(last.seq);
                    }
                }
                _ => {}
            }
        }
        assert!(
            c.outbox_len() <= queued,
            "outbox holds more than was queued"
        );
    }
});
