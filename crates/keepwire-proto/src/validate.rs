//! Field validation beyond what JSON decoding checks.

use crate::codes::ErrorCode;
use crate::frames::{ClientFrame, ConvKind, MESSAGE_KIND_TEXT};
use crate::limits::Limits;

/// A field with a value outside its allowed form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ValidationError {
    /// The error code to answer with.
    pub code: ErrorCode,
    /// What is wrong, for humans.
    pub message: String,
}

impl ValidationError {
    fn invalid(message: impl Into<String>) -> Self {
        ValidationError {
            code: ErrorCode::Invalid,
            message: message.into(),
        }
    }
}

fn is_id_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'-' || c == b'_'
}

/// A client id: 16 to 64 characters of `[A-Za-z0-9_-]`. Clients should use
/// 128 random bits (32 hex digits, or a UUID).
pub fn is_valid_cid(s: &str) -> bool {
    (16..=64).contains(&s.len()) && s.bytes().all(is_id_char)
}

/// A device id: 1 to 64 characters of `[A-Za-z0-9_-]`.
pub fn is_valid_device_id(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(is_id_char)
}

/// An epoch (the relay's log identity, echoed in cursors): 1 to 64 bytes.
pub fn is_valid_epoch(s: &str) -> bool {
    (1..=64).contains(&s.len())
}

/// A request id or idempotency key: 1 to 64 characters of `[A-Za-z0-9_-]`.
pub fn is_valid_request_id(s: &str) -> bool {
    is_valid_device_id(s)
}

/// A user name: 1 to 64 characters of `[A-Za-z0-9_.@-]`, not starting with `-`.
pub fn is_valid_user_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && !s.starts_with('-')
        && s.bytes().all(|c| is_id_char(c) || c == b'.' || c == b'@')
}

/// Whether a display string (a conversation name) is safe to show: no C0 or
/// C1 control characters (which covers CR, LF and the ESC of terminal
/// escapes) and no bidirectional overrides or isolates, which can make a name
/// read as something else.
pub fn is_safe_display_text(s: &str) -> bool {
    !s.chars().any(|c| {
        c.is_control()
            || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}' | '\u{061C}')
    })
}

fn check_rid(rid: &str) -> Result<(), ValidationError> {
    if is_valid_request_id(rid) {
        Ok(())
    } else {
        Err(ValidationError::invalid(
            "rid must be 1-64 characters of [A-Za-z0-9_-]",
        ))
    }
}

fn check_user(user: &str) -> Result<(), ValidationError> {
    if is_valid_user_name(user) {
        Ok(())
    } else {
        Err(ValidationError::invalid(format!(
            "user name {user:?} must be 1-64 characters of [A-Za-z0-9_.@-]"
        )))
    }
}

impl ClientFrame {
    /// Checks every field against its allowed form and the limits.
    pub fn validate(&self, limits: &Limits) -> Result<(), ValidationError> {
        match self {
            ClientFrame::Hello(h) => {
                if h.token.is_empty() || h.token.len() > limits.max_token_bytes {
                    return Err(ValidationError::invalid("token is empty or too long"));
                }
                if !is_valid_device_id(&h.device) {
                    return Err(ValidationError::invalid(
                        "device must be 1-64 characters of [A-Za-z0-9_-]",
                    ));
                }
                if let Some(c) = &h.cursor
                    && !is_valid_epoch(&c.epoch)
                {
                    return Err(ValidationError::invalid(
                        "cursor.epoch must be 1-64 characters",
                    ));
                }
                if h.generation.is_some_and(|g| g > crate::MAX_INT) {
                    return Err(ValidationError::invalid("generation is above 2^53"));
                }
                if h.agent.as_ref().is_some_and(|a| a.len() > 128) {
                    return Err(ValidationError::invalid("agent is longer than 128 bytes"));
                }
                Ok(())
            }
            ClientFrame::Send(s) => {
                if !is_valid_cid(&s.cid) {
                    return Err(ValidationError::invalid(
                        "cid must be 16-64 characters of [A-Za-z0-9_-] (use 128 random bits)",
                    ));
                }
                if s.kind != MESSAGE_KIND_TEXT {
                    return Err(ValidationError {
                        code: ErrorCode::UnsupportedKind,
                        message: format!("message kind {:?} is not supported", s.kind),
                    });
                }
                if s.body.len() > limits.max_body_bytes {
                    return Err(ValidationError {
                        code: ErrorCode::BodyTooLarge,
                        message: format!(
                            "body is {} bytes; the limit is {}",
                            s.body.len(),
                            limits.max_body_bytes
                        ),
                    });
                }
                Ok(())
            }
            ClientFrame::Ack { .. }
            | ClientFrame::Ping {}
            | ClientFrame::SetHeartbeat { .. }
            | ClientFrame::Read { .. } => Ok(()),
            ClientFrame::History(h) => {
                check_rid(&h.rid)?;
                if h.limit
                    .is_some_and(|l| l == 0 || l > limits.max_history_page)
                {
                    return Err(ValidationError::invalid(format!(
                        "limit must be 1-{}",
                        limits.max_history_page
                    )));
                }
                Ok(())
            }
            ClientFrame::ConvCreate(c) => {
                check_rid(&c.rid)?;
                if !is_valid_request_id(&c.key) {
                    return Err(ValidationError::invalid(
                        "key must be 1-64 characters of [A-Za-z0-9_-]",
                    ));
                }
                if c.name
                    .as_ref()
                    .is_some_and(|n| n.len() > limits.max_name_bytes)
                {
                    return Err(ValidationError::invalid(format!(
                        "name is longer than {} bytes",
                        limits.max_name_bytes
                    )));
                }
                if c.name.as_deref().is_some_and(|n| !is_safe_display_text(n)) {
                    return Err(ValidationError::invalid(
                        "name has control characters or bidirectional overrides",
                    ));
                }
                for m in &c.members {
                    check_user(m)?;
                }
                match c.kind {
                    ConvKind::Direct if c.members.len() != 1 => Err(ValidationError::invalid(
                        "a direct conversation names exactly one other member",
                    )),
                    ConvKind::Group if c.members.len() + 1 > limits.max_group_size => {
                        Err(ValidationError {
                            code: ErrorCode::GroupTooLarge,
                            message: format!(
                                "a group has at most {} members",
                                limits.max_group_size
                            ),
                        })
                    }
                    _ => Ok(()),
                }
            }
            ClientFrame::ConvAdd(m) | ClientFrame::ConvRemove(m) => {
                check_rid(&m.rid)?;
                check_user(&m.user)
            }
            ClientFrame::ConvList { rid } => check_rid(rid),
            ClientFrame::Mute { rid, .. } => check_rid(rid),
            ClientFrame::PushRegister(p) => {
                check_rid(&p.rid)?;
                if !(p.registration.is_null() || p.registration.is_object()) {
                    return Err(ValidationError::invalid(
                        "registration must be an object or null",
                    ));
                }
                // Tokens and endpoints are small; keys are 65 + 16 bytes.
                let len = serde_json::to_vec(&p.registration)
                    .map(|v| v.len())
                    .unwrap_or(usize::MAX);
                if len > 4096 {
                    return Err(ValidationError::invalid(
                        "registration is larger than 4096 bytes",
                    ));
                }
                Ok(())
            }
            ClientFrame::Signal { data, .. } => {
                // Encoding a Value cannot fail; measure the bytes it would take.
                let len = serde_json::to_vec(data)
                    .map(|v| v.len())
                    .unwrap_or(usize::MAX);
                if len > limits.max_signal_bytes {
                    return Err(ValidationError::invalid(format!(
                        "signal data is {len} bytes; the limit is {}",
                        limits.max_signal_bytes
                    )));
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(is_valid_cid("0123456789abcdef0123456789abcdef"));
        assert!(is_valid_cid("123e4567-e89b-12d3-a456-426614174000"));
        assert!(!is_valid_cid("short"));
        assert!(!is_valid_cid(&"a".repeat(65)));
        assert!(!is_valid_cid("0123456789abcdef 0123456789abcdef"));
        assert!(is_valid_device_id("phone-1"));
        assert!(!is_valid_device_id(""));
        assert!(!is_valid_device_id("a/b"));
        assert!(is_valid_user_name("alice@example.com"));
        assert!(!is_valid_user_name("-rf"));
        assert!(!is_valid_user_name("a b"));
        assert!(is_safe_display_text("team ✨ café"));
        for bad in [
            "a\nb",
            "a\rb",
            "\u{1b}[31mred",
            "\u{202E}evil",
            "x\u{2066}y",
            "\u{85}",
        ] {
            assert!(!is_safe_display_text(bad), "{bad:?}");
        }
    }
}
