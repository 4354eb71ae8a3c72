//! Relay settings.

use std::net::SocketAddr;
use std::time::Duration;

use keepwire_proto::Limits;

/// Everything a relay can be told. `Config::default()` is what `keepwire serve`
/// runs with when given no flags.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to listen on (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Protocol limits (frame and body sizes, windows, rates, group size).
    pub limits: Limits,
    /// Sends a connection may make in a burst above its sustained rate.
    pub send_burst: u32,
    /// Sustained sends per second for one user across all their connections.
    pub user_sends_per_sec: u32,
    /// Burst for the per-user rate.
    pub user_send_burst: u32,
    /// Time a new connection has to send a valid `hello`.
    pub handshake_timeout: Duration,
    /// Heartbeat used when `hello` asks for none.
    pub heartbeat_default: Duration,
    /// Smallest heartbeat a client may ask for.
    pub heartbeat_min: Duration,
    /// Largest heartbeat a client may ask for.
    pub heartbeat_max: Duration,
    /// Least slack added to the heartbeat before a silent connection is closed
    /// (the idle timeout is `heartbeat + max(heartbeat / 2, grace)`).
    pub heartbeat_grace: Duration,
    /// Most connections one user may hold at once.
    pub max_connections_per_user: usize,
    /// Inbox entries replayed to a device that has no cursor yet.
    pub history_window: u64,
    /// Most entries a device may ask to have replayed without a cursor.
    pub max_history_window: u64,
    /// How often age-based retention runs.
    pub trim_interval: Duration,
    /// How often revocations made by other processes are picked up.
    pub revocation_poll: Duration,
    /// A write to a socket that takes longer than this drops the connection.
    pub write_timeout: Duration,
    /// How long shutdown waits for connections to close.
    pub shutdown_grace: Duration,
    /// App-issued JWTs, when accepted besides keepwire's own tokens.
    pub jwt: Option<crate::auth::JwtConfig>,
    /// Requests per second per API key on the HTTP API (burst: twice that).
    pub api_requests_per_sec: u32,
    /// Largest HTTP API request body, in bytes.
    pub api_max_body_bytes: usize,
    /// Serve `wss://` and `https://` with this certificate chain and key.
    pub tls: Option<TlsFiles>,
    /// Time a new TCP connection has to finish its TLS handshake and send
    /// a complete HTTP request head (slowloris defence).
    pub request_head_timeout: Duration,
    /// Largest HTTP request head (request line and headers), in bytes; a
    /// larger one gets 431 and is never buffered whole. At least 8 KiB.
    pub max_request_head_bytes: usize,
    /// Time an HTTP API request has to deliver its body once the relay reads
    /// it; a body trickled slower gets 408 and the connection is closed.
    pub request_body_timeout: Duration,
    /// Origins browsers may open WebSockets from (`https://app.example`);
    /// empty: any. Requests without an `Origin` header (native apps) are
    /// always allowed: keepwire tokens travel in the hello, never in cookies.
    pub allowed_origins: Vec<String>,
    /// Serve a WebSocket echo at `/conformance/echo` on the same stack, for
    /// the Autobahn|Testsuite (off in production).
    pub conformance_echo: bool,
    /// Who may put users into conversations.
    pub member_adds: MemberAdds,
    /// The push configuration file (TOML; see `keepwire_push::config`); no
    /// push wake-ups without one.
    pub push_config: Option<std::path::PathBuf>,
    /// When to push.
    pub push_settings: crate::push::PushSettings,
    /// The cross-node bus, when several relays share one store.
    pub bus: Option<crate::bus::BusConfig>,
}

/// PEM files for TLS.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: std::path::PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: std::path::PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 7447)),
            limits: Limits::default(),
            send_burst: 100,
            user_sends_per_sec: 100,
            user_send_burst: 200,
            handshake_timeout: Duration::from_secs(10),
            heartbeat_default: Duration::from_secs(30),
            heartbeat_min: Duration::from_secs(5),
            heartbeat_max: Duration::from_secs(30 * 60),
            heartbeat_grace: Duration::from_secs(10),
            max_connections_per_user: 16,
            history_window: 100,
            max_history_window: 10_000,
            trim_interval: Duration::from_secs(60),
            revocation_poll: Duration::from_millis(250),
            write_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
            jwt: None,
            api_requests_per_sec: 200,
            api_max_body_bytes: 64 * 1024,
            tls: None,
            request_head_timeout: Duration::from_secs(10),
            max_request_head_bytes: 16 * 1024,
            request_body_timeout: Duration::from_secs(10),
            allowed_origins: Vec::new(),
            conformance_echo: false,
            member_adds: MemberAdds::Members,
            push_config: None,
            push_settings: crate::push::PushSettings::default(),
            bus: None,
        }
    }
}

/// The consent model for membership: who may put a user into a
/// conversation (PROTOCOL.md §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemberAdds {
    /// Any member may add existing users (and create conversations with
    /// them); every add is charged to the adder's send budget by the inboxes
    /// it reaches, and anyone may leave.
    #[default]
    Members,
    /// Only the backend's HTTP API adds users (the app decides who may talk
    /// to whom: contacts, invitations); users may still create conversations
    /// with themselves alone, and leave.
    Backend,
}

impl std::str::FromStr for MemberAdds {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "members" => Ok(MemberAdds::Members),
            "backend" => Ok(MemberAdds::Backend),
            other => Err(format!("{other:?}: use `members` or `backend`")),
        }
    }
}

impl Config {
    /// The heartbeat bounds of `--min-heartbeat` and friends.
    pub fn heartbeat_bounds(&self) -> crate::session::HeartbeatBounds {
        crate::session::HeartbeatBounds {
            default: self.heartbeat_default,
            min: self.heartbeat_min,
            max: self.heartbeat_max,
            grace: self.heartbeat_grace,
        }
    }

    /// The heartbeat granted for a requested one (milliseconds), and the idle
    /// timeout that goes with it.
    pub fn negotiate_heartbeat(&self, requested_ms: Option<u64>) -> (Duration, Duration) {
        self.heartbeat_bounds().negotiate(requested_ms)
    }

    /// What the relay's sessions share.
    pub fn session_config(
        &self,
        user_budget: std::sync::Arc<dyn crate::ratelimit::SendBudget>,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
    ) -> crate::session::SessionConfig {
        crate::session::SessionConfig {
            limits: self.limits,
            send_burst: self.send_burst,
            handshake_timeout: self.handshake_timeout,
            heartbeat: self.heartbeat_bounds(),
            history_window: self.history_window,
            max_history_window: self.max_history_window,
            member_adds: self.member_adds,
            push: None,
            user_budget,
            metrics,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_is_clamped_and_timeout_has_slack() {
        let c = Config::default();
        let (hb, idle) = c.negotiate_heartbeat(Some(1));
        assert_eq!(hb, c.heartbeat_min);
        assert_eq!(idle, hb + c.heartbeat_grace);
        let (hb, idle) = c.negotiate_heartbeat(Some(u64::MAX));
        assert_eq!(hb, c.heartbeat_max);
        assert_eq!(idle, hb + hb / 2);
        assert_eq!(c.negotiate_heartbeat(None).0, c.heartbeat_default);
    }
}
