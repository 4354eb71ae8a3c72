//! Protocol limits. A server announces the ones a client must respect in
//! `welcome.limits`; the rest bound what the codec accepts.

use crate::frames::WireLimits;

/// Every size, count and rate the protocol bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest WebSocket message (one frame of JSON), in bytes.
    pub max_frame_bytes: usize,
    /// Largest message body, in bytes.
    pub max_body_bytes: usize,
    /// Largest `signal` data, in bytes when encoded.
    pub max_signal_bytes: usize,
    /// Largest token, in bytes.
    pub max_token_bytes: usize,
    /// Largest conversation name, in bytes.
    pub max_name_bytes: usize,
    /// Inbox entries the server sends beyond the client's last ack, unless
    /// the `hello` asks for another window.
    pub window: u64,
    /// The largest window a `hello` may ask for (larger requests are clamped).
    pub max_window: u64,
    /// Sends a client may have unanswered at once.
    pub max_unconfirmed: usize,
    /// Sustained sends per second per connection.
    pub sends_per_sec: u32,
    /// Largest conversation.
    pub max_group_size: usize,
    /// Largest history page.
    pub max_history_page: u32,
    /// Bad frames tolerated on one connection before it is closed with 4004.
    pub max_protocol_errors: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: 64 * 1024,
            max_body_bytes: 16 * 1024,
            max_signal_bytes: 1024,
            max_token_bytes: 4096,
            max_name_bytes: 128,
            window: 512,
            max_window: 2048,
            max_unconfirmed: 64,
            sends_per_sec: 50,
            max_group_size: 1000,
            max_history_page: 200,
            max_protocol_errors: 16,
        }
    }
}

impl Limits {
    /// The window granted for a `hello` that asked for `wanted`: the
    /// default when it asked for none, else clamped to `1..=max_window`.
    pub fn grant_window(&self, wanted: Option<u64>) -> u64 {
        wanted.map_or(self.window, |w| w.clamp(1, self.max_window.max(1)))
    }

    /// The subset announced in `welcome`, with the window granted to this
    /// connection.
    pub fn wire(&self, window: u64) -> WireLimits {
        WireLimits {
            max_frame_bytes: self.max_frame_bytes as u64,
            max_body_bytes: self.max_body_bytes as u64,
            window,
            max_unconfirmed: self.max_unconfirmed as u64,
            sends_per_sec: u64::from(self.sends_per_sec),
            max_group_size: self.max_group_size as u64,
            max_history_page: u64::from(self.max_history_page),
        }
    }
}
