//! Heartbeats per hour in the background on a path that forgets connections
//! idle for 10 minutes: the adaptive heartbeat against a fixed 5-minute ping.
//!
//! Runs the real state machine on a virtual clock for 24 simulated hours (the
//! relay and the path are modelled; nothing is slept), so the figures are
//! exact and repeatable: `cargo run --release -p keepwire-core --example heartbeat_bench`.

use std::time::Duration;

use keepwire_core::{
    AdaptiveHeartbeat, AppState, BackgroundPolicy, Config, Connection, Instant, Network, Transmit,
    TransportEvent,
};
use keepwire_proto::{
    ClientFrame, Limits, Resume, ResumeStatus, ServerFrame, Welcome, decode_client, encode,
};

const IDLE_CUT: Duration = Duration::from_secs(600);
const HOURS: u64 = 24;

struct Outcome {
    pings: u64,
    reconnects: u64,
    pings_last_hour: u64,
}

fn run(adaptive: bool) -> Outcome {
    let mut cfg = Config::new("phone", vec!["ws://relay".into()]);
    cfg.background_policy = BackgroundPolicy::KeepAlive;
    cfg.heartbeat_background = Duration::from_secs(300);
    cfg.adaptive_heartbeat = adaptive.then(AdaptiveHeartbeat::default);
    let mut c = Connection::new(cfg, "t".into(), None, 1, Instant::ZERO);
    let mut now = Instant::ZERO;
    c.handle_network(Network::Online("cellular".into()), now);
    c.handle_app_state(AppState::Background, now);
    c.start(now);
    let (mut open, mut last_traffic, mut pings, mut reconnects, mut pings_last_hour) =
        (None, now, 0, 0, 0);
    let end = Instant::from_duration(Duration::from_secs(HOURS * 3600));
    let last_hour = Instant::from_duration(Duration::from_secs((HOURS - 1) * 3600));
    while now < end {
        while let Some(t) = c.poll_transmit() {
            match t {
                Transmit::Open { id, .. } => {
                    reconnects += 1;
                    open = Some(id);
                    last_traffic = now;
                    c.handle_transport(id, TransportEvent::Opened, now);
                }
                Transmit::Frame { id, text } => {
                    let frame = decode_client(&text, &Limits::default()).expect("valid frame");
                    // The path forgot the flow if it sat idle too long.
                    let alive = now - last_traffic <= IDLE_CUT;
                    let reply = match frame {
                        ClientFrame::Hello(h) => Some(ServerFrame::Welcome(Welcome {
                            session: "s".into(),
                            user: "u".into(),
                            device: "d".into(),
                            heartbeat_ms: h.heartbeat_ms.unwrap_or(30_000),
                            idle_timeout_ms: 3_600_000,
                            epoch: "e".into(),
                            head: 0,
                            resume: Resume {
                                status: ResumeStatus::New,
                                from: 1,
                                reason: None,
                                missed: None,
                                fetch: vec![],
                            },
                            limits: Limits::default().wire(512),
                            push: None,
                        })),
                        ClientFrame::Ping {} => {
                            pings += 1;
                            if now >= last_hour {
                                pings_last_hour += 1;
                            }
                            Some(ServerFrame::Pong { head: None })
                        }
                        ClientFrame::SetHeartbeat { heartbeat_ms } => {
                            Some(ServerFrame::HeartbeatSet {
                                heartbeat_ms,
                                idle_timeout_ms: heartbeat_ms * 2,
                            })
                        }
                        _ => None,
                    };
                    if alive {
                        last_traffic = now;
                        if let Some(r) = reply {
                            c.handle_transport(id, TransportEvent::Frame(encode(&r)), now);
                        }
                    }
                }
                Transmit::Close { .. } => open = None,
            }
        }
        while c.poll_event().is_some() {}
        let _ = open;
        let Some(next) = c.poll_timeout() else { break };
        now = next.max(now);
        c.handle_timeout(now);
    }
    Outcome {
        pings,
        reconnects,
        pings_last_hour,
    }
}

fn main() {
    let fixed = run(false);
    let adaptive = run(true);
    println!(
        "path idle cut: {} min; {HOURS} simulated hours in the background",
        IDLE_CUT.as_secs() / 60
    );
    println!("| heartbeat | pings/hour (average) | pings in the last hour | reconnects |");
    println!("|---|---|---|---|");
    for (name, o) in [("fixed 5 min", &fixed), ("adaptive", &adaptive)] {
        println!(
            "| {name} | {:.1} | {} | {} |",
            o.pings as f64 / HOURS as f64,
            o.pings_last_hour,
            o.reconnects
        );
    }
    println!(
        "adaptive / fixed (last hour): {:.2}",
        adaptive.pings_last_hour as f64 / fixed.pings_last_hour.max(1) as f64
    );
}
