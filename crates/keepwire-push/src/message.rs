//! What one push says, and what one provider call came to.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::ece::{self, PushKeys};
use crate::registration::{Registration, RegistrationError, RegistrationId};

/// What a push is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PushKind {
    /// New messages: a high-priority wake-up that shows a notification
    /// (FCM priority HIGH; APNs `alert`, priority 10; Web Push urgency high).
    Wake,
    /// A read marker from another device: a low-priority push so the device
    /// clears its notifications (FCM priority NORMAL; APNs `background`,
    /// priority 5; Web Push urgency normal). Never used as a wake-up for
    /// messages: APNs throttles background pushes and skips force-quit apps.
    Clear,
}

impl PushKind {
    /// `wake` or `clear`.
    pub fn as_str(self) -> &'static str {
        match self {
            PushKind::Wake => "wake",
            PushKind::Clear => "clear",
        }
    }
}

/// A collapse key for providers that replace a pending push with a newer one
/// of the same key (Web Push `Topic`, APNs `apns-collapse-id`; FCM gets
/// none, because collapsible FCM messages are throttled). At most 32
/// base64url characters. Use one per account or kind, never one per device.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CollapseKey(String);

impl CollapseKey {
    /// Validates a key: 1..=32 characters of `A-Z a-z 0-9 - _`.
    pub fn new(value: impl Into<String>) -> Result<CollapseKey, RegistrationError> {
        let s = value.into();
        let ok = !s.is_empty()
            && s.len() <= 32
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'));
        if ok {
            Ok(CollapseKey(s))
        } else {
            Err(RegistrationError::CollapseKey)
        }
    }

    /// The key.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The content of one push.
///
/// By default a push carries only the registration id. A `preview` (text
/// the relay composed, e.g. JSON with sender and snippet) is sent only when
/// the operator allows previews and the registration has RFC 8291 keys, and
/// then only encrypted to them (`aes128gcm`): inside the encrypted body for
/// Web Push, as the base64url field `kw_preview` for FCM and APNs. A preview
/// that does not fit the provider's size limit is left out.
///
/// `Debug` shows the preview's length, not its text.
#[derive(Clone, PartialEq, Eq)]
pub struct Message {
    /// The registration's opaque id (`kw` in every payload).
    pub registration_id: RegistrationId,
    /// Wake-up or clear.
    pub kind: PushKind,
    /// Optional preview, sent only encrypted.
    pub preview: Option<String>,
    /// Optional collapse key.
    pub collapse: Option<CollapseKey>,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("registration_id", &self.registration_id)
            .field("kind", &self.kind)
            .field(
                "preview",
                &self
                    .preview
                    .as_ref()
                    .map(|p| format!("<{} bytes>", p.len())),
            )
            .field("collapse", &self.collapse)
            .finish()
    }
}

impl Message {
    /// A content-free wake-up.
    pub fn wake(registration_id: RegistrationId) -> Message {
        Message {
            registration_id,
            kind: PushKind::Wake,
            preview: None,
            collapse: None,
        }
    }

    /// A low-priority "clear your notifications" push.
    pub fn clear(registration_id: RegistrationId) -> Message {
        Message {
            kind: PushKind::Clear,
            ..Message::wake(registration_id)
        }
    }

    /// The same message with a preview.
    pub fn with_preview(mut self, preview: impl Into<String>) -> Message {
        self.preview = Some(preview.into());
        self
    }

    /// The same message without its preview (for a retry after "too large").
    pub(crate) fn without_preview(&self) -> Message {
        Message {
            preview: None,
            ..self.clone()
        }
    }
}

/// Padding granularity for encrypted previews: lengths are rounded up to a
/// multiple of this, so the provider learns less about the text.
const PREVIEW_PAD_TO: usize = 64;

/// The preview encrypted to `keys` and base64url-encoded, for the
/// `kw_preview` field of FCM and APNs payloads.
pub(crate) fn sealed_preview(msg: &Message, keys: Option<&PushKeys>) -> Option<String> {
    let (text, keys) = (msg.preview.as_ref()?, keys?);
    let body = ece::encrypt(text.as_bytes(), keys, pad_for(text.len())).ok()?;
    Some(URL_SAFE_NO_PAD.encode(body))
}

/// Zero bytes to add to a plaintext of `len` bytes.
pub(crate) fn pad_for(len: usize) -> usize {
    let padded = len.div_ceil(PREVIEW_PAD_TO) * PREVIEW_PAD_TO;
    (padded - len).min(ece::MAX_PLAINTEXT_LEN.saturating_sub(len))
}

/// What one provider call came to (after the provider-specific in-call
/// recovery: FCM's one access-token refresh, APNs' one provider-token
/// renewal and other-environment check, a resend without preview after
/// "too large").
///
/// Reasons are built from status codes and the provider's documented error
/// codes only; they never contain tokens, endpoints or response text.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Attempt {
    /// The provider accepted the push.
    Delivered {
        /// Round trip of the request that succeeded.
        latency: Duration,
        /// Whether an encrypted preview went with it.
        preview_sent: bool,
        /// The registration as it should be stored from now on, when the
        /// provider showed it was wrong (an APNs token accepted only by the
        /// other environment).
        corrected: Option<Box<Registration>>,
    },
    /// The registration is dead: the relay must delete it (FCM
    /// `UNREGISTERED`, `SENDER_ID_MISMATCH`, an invalid token; APNs 410, or
    /// `BadDeviceToken` from both environments; Web Push 404/410).
    Unregistered {
        /// Provider and error code.
        reason: String,
    },
    /// The relay's configuration is wrong (credentials, topic, project):
    /// alert the operator, keep the registration.
    ConfigError {
        /// Provider and error code.
        reason: String,
    },
    /// The provider refused this push for a reason retrying will not fix and
    /// that does not condemn the registration (a bad request, a redirect, an
    /// endpoint the address guard refused). Keep the registration.
    Rejected {
        /// Provider and error code.
        reason: String,
    },
    /// A transient failure (429, 5xx, network): try again later.
    Retry {
        /// The provider's `Retry-After`, if it sent one.
        after: Option<Duration>,
        /// The least backoff the error calls for (1 minute for FCM
        /// `QUOTA_EXCEEDED`).
        at_least: Duration,
        /// Provider and error code.
        reason: String,
    },
}

impl Attempt {
    pub(crate) fn retry(reason: String) -> Attempt {
        Attempt::Retry {
            after: None,
            at_least: Duration::ZERO,
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ece::ReceiverKeys;

    #[test]
    fn previews_are_sealed_padded_and_optional() {
        let rx = ReceiverKeys::generate();
        let id = RegistrationId::new("r1").unwrap();
        assert_eq!(
            sealed_preview(&Message::wake(id.clone()), Some(rx.push_keys())),
            None
        );
        let msg = Message::wake(id).with_preview("Alice: hi");
        assert_eq!(sealed_preview(&msg, None), None);
        let sealed = sealed_preview(&msg, Some(rx.push_keys())).unwrap();
        let body = URL_SAFE_NO_PAD.decode(sealed).unwrap();
        assert_eq!(body.len(), ece::HEADER_LEN + 64 + 1 + ece::TAG_LEN);
        assert_eq!(ece::decrypt(&body, &rx).unwrap(), b"Alice: hi");
        assert_eq!(pad_for(64), 0);
        assert_eq!(pad_for(65), 63);
        assert_eq!(pad_for(ece::MAX_PLAINTEXT_LEN - 1), 1);
        assert!(!format!("{msg:?}").contains("Alice"));
        assert!(CollapseKey::new("kw-new").is_ok());
        assert!(CollapseKey::new("a".repeat(33)).is_err());
    }
}
