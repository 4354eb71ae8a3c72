//! Web Push (RFC 8030) with `aes128gcm` message encryption (RFC 8291) and
//! VAPID (RFC 8292): browsers' push services and UnifiedPush distributors
//! (ntfy, NextPush, ...).
//!
//! - **Body**: the JSON `{"kw":"<registration id>","kind":"wake"|"clear"}`
//!   (plus `"preview"` when one goes along), encrypted to the
//!   subscription's keys as one record of at most 4096 bytes.
//! - **Headers**: `Content-Encoding: aes128gcm`, `TTL` (a day for wake-ups,
//!   an hour for clears), `Urgency` (`high` / `normal`), `Topic` when the
//!   message has a collapse key, `Authorization: vapid t=<JWT>, k=<key>`.
//! - **Answers**: 2xx → delivered; 404/410 → unregistered; 413 → resent
//!   without preview; 429/5xx → retry honouring `Retry-After`; 401/403 →
//!   configuration (VAPID) error; a redirect is never followed (rejected).
//! - **Address guard (SSRF)**: the endpoint must be `https` and every address
//!   connected to must be public, unless the configuration's
//!   `allow_private` names it. Names are checked by a resolver that returns
//!   only permitted addresses, so the check applies to the address actually
//!   connected to; IP-literal hosts are checked before the request. Plain
//!   `http` is accepted only to an allow-listed loopback address (tests).
//!   No proxy is used.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::clock::Clock;
use crate::config::WebPushConfig;
use crate::ece::{self, PushKeys};
use crate::message::{Attempt, Message, PushKind, pad_for};
use crate::net::{AddressPolicy, GuardedResolver, read_capped, retry_after, transport_error};
use crate::registration::{Endpoint, Registration, RegistrationError};
use crate::vapid::VapidKey;

/// `TTL` of a wake-up, in seconds.
pub const WAKE_TTL_SECS: u32 = 86_400;
/// `TTL` of a clear push, in seconds.
pub const CLEAR_TTL_SECS: u32 = 3_600;

/// Checks an endpoint against the address guard without connecting: the
/// scheme, and the address when the host is an IP literal. (Names are
/// checked on every connection.)
pub fn check_endpoint(
    endpoint: &Endpoint,
    policy: &AddressPolicy,
) -> Result<(), RegistrationError> {
    let url = endpoint.expose();
    let ip = endpoint.ip_literal();
    match url.scheme() {
        "https" => match ip {
            Some(ip) if !policy.permits(ip) => Err(RegistrationError::EndpointRefused(
                "a private address that webpush.allow_private does not list".into(),
            )),
            _ => Ok(()),
        },
        "http" => match ip {
            Some(ip) if ip.is_loopback() && policy.listed(ip) => Ok(()),
            _ => Err(RegistrationError::EndpointRefused(
                "plain http is allowed only to a loopback address listed in webpush.allow_private"
                    .into(),
            )),
        },
        _ => Err(RegistrationError::EndpointRefused("not https".into())),
    }
}

/// What a UnifiedPush check of an endpoint found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EndpointProbe {
    /// The endpoint answered `{"unifiedpush":{"version":N}}`.
    UnifiedPush {
        /// The UnifiedPush version it speaks.
        version: u64,
    },
    /// The endpoint answered, but not as a UnifiedPush server (browser push
    /// services do not answer GET). Accept it as plain Web Push.
    NotUnifiedPush {
        /// The HTTP status of the answer.
        status: u16,
    },
}

/// Why a UnifiedPush check failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProbeError {
    /// The address guard refused the endpoint.
    #[error("the endpoint is refused: {0}")]
    Refused(String),
    /// The endpoint says it does not exist (404/410).
    #[error("the endpoint does not exist ({0})")]
    Gone(u16),
    /// The endpoint could not be reached (network, TLS, timeout).
    #[error("the endpoint could not be reached: {0}")]
    Unreachable(String),
}

/// What one POST came to.
enum Posted {
    Accepted(Duration),
    TooLarge,
    Failed(Attempt),
}

/// A Web Push sender. One per relay; cheap to share (`Arc`).
pub struct WebPushClient {
    http: reqwest::Client,
    vapid: Arc<VapidKey>,
    subject: String,
    policy: Arc<AddressPolicy>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for WebPushClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebPushClient")
            .field("vapid", &self.vapid)
            .finish()
    }
}

impl WebPushClient {
    /// A client for `config` signing with `vapid`; `timeout` bounds each
    /// HTTP request.
    pub fn new(
        config: &WebPushConfig,
        vapid: Arc<VapidKey>,
        clock: Arc<dyn Clock>,
        timeout: Duration,
    ) -> Result<WebPushClient, reqwest::Error> {
        let policy = Arc::new(config.policy());
        let http = reqwest::Client::builder()
            .dns_resolver(Arc::new(GuardedResolver {
                policy: policy.clone(),
            }))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .build()?;
        Ok(WebPushClient {
            http,
            vapid,
            subject: config.subject.clone(),
            policy,
            clock,
        })
    }

    /// The address policy in force.
    pub fn policy(&self) -> &AddressPolicy {
        &self.policy
    }

    /// Sends `msg` to a Web Push registration (anything else is rejected).
    pub async fn send(&self, registration: &Registration, msg: &Message) -> Attempt {
        let Registration::WebPush { endpoint, keys } = registration else {
            return Attempt::Rejected {
                reason: "webpush: not a Web Push registration".into(),
            };
        };
        if let Err(e) = check_endpoint(endpoint, &self.policy) {
            return Attempt::Rejected {
                reason: format!("webpush: {e}"),
            };
        }
        let (mut body, mut preview_sent) = match seal(msg, keys) {
            Ok(b) => b,
            Err(e) => {
                return Attempt::Rejected {
                    reason: format!("webpush: {e}"),
                };
            }
        };
        loop {
            match self.post(endpoint, msg, body).await {
                Posted::Accepted(latency) => {
                    return Attempt::Delivered {
                        latency,
                        preview_sent,
                        corrected: None,
                    };
                }
                Posted::TooLarge if preview_sent => {
                    preview_sent = false;
                    body = match seal(&msg.without_preview(), keys) {
                        Ok((b, _)) => b,
                        Err(e) => {
                            return Attempt::Rejected {
                                reason: format!("webpush: {e}"),
                            };
                        }
                    };
                }
                Posted::TooLarge => {
                    return Attempt::Rejected {
                        reason: "webpush: 413 (even without a preview)".into(),
                    };
                }
                Posted::Failed(attempt) => return attempt,
            }
        }
    }

    /// One POST.
    async fn post(&self, endpoint: &Endpoint, msg: &Message, body: Vec<u8>) -> Posted {
        let now = self.clock.now();
        let auth = match self
            .vapid
            .authorization(&endpoint.origin(), &self.subject, now)
        {
            Ok(a) => a,
            Err(e) => {
                return Posted::Failed(Attempt::ConfigError {
                    reason: format!("webpush: {e}"),
                });
            }
        };
        let (ttl, urgency) = match msg.kind {
            PushKind::Clear => (CLEAR_TTL_SECS, "normal"),
            _ => (WAKE_TTL_SECS, "high"),
        };
        let mut req = self
            .http
            .post(endpoint.expose().clone())
            .header("authorization", auth)
            .header("content-encoding", "aes128gcm")
            .header("content-type", "application/octet-stream")
            .header("ttl", ttl.to_string())
            .header("urgency", urgency)
            .body(body);
        if let Some(c) = &msg.collapse {
            req = req.header("topic", c.as_str());
        }
        let started = Instant::now();
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return Posted::Failed(transport_error("webpush", &e)),
        };
        let latency = started.elapsed();
        let status = resp.status();
        if status.is_success() {
            Posted::Accepted(latency)
        } else if status == StatusCode::PAYLOAD_TOO_LARGE {
            Posted::TooLarge
        } else {
            Posted::Failed(classify(status, retry_after(resp.headers(), now)))
        }
    }

    /// Checks an endpoint at registration: the address guard, then a `GET`
    /// (no redirects) that a UnifiedPush server answers with
    /// `{"unifiedpush":{"version":1}}`. Call it for endpoints a UnifiedPush
    /// distributor gave (the client knows): browser push services do not
    /// answer `GET`, and their 404 or 405 means nothing.
    pub async fn probe_unifiedpush(
        &self,
        endpoint: &Endpoint,
    ) -> Result<EndpointProbe, ProbeError> {
        check_endpoint(endpoint, &self.policy).map_err(|e| ProbeError::Refused(e.to_string()))?;
        let resp = self
            .http
            .get(endpoint.expose().clone())
            .send()
            .await
            .map_err(|e| match transport_error("webpush", &e) {
                Attempt::Rejected { reason } => ProbeError::Refused(reason),
                Attempt::Retry { reason, .. } => ProbeError::Unreachable(reason),
                other => ProbeError::Unreachable(format!("{other:?}")),
            })?;
        let status = resp.status();
        if status == StatusCode::NOT_FOUND || status == StatusCode::GONE {
            return Err(ProbeError::Gone(status.as_u16()));
        }
        let body = read_capped(resp).await;
        if status.is_success()
            && let Some(version) = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v["unifiedpush"]["version"].as_u64())
        {
            return Ok(EndpointProbe::UnifiedPush { version });
        }
        Ok(EndpointProbe::NotUnifiedPush {
            status: status.as_u16(),
        })
    }
}

/// The encrypted body of `msg` and whether its preview fit.
fn seal(msg: &Message, keys: &PushKeys) -> Result<(Vec<u8>, bool), ece::EceError> {
    let base = json!({ "kw": msg.registration_id.as_str(), "kind": msg.kind.as_str() });
    if let Some(preview) = &msg.preview {
        let mut with = base.clone();
        with["preview"] = Value::String(preview.clone());
        let text = with.to_string();
        if text.len() <= ece::MAX_PLAINTEXT_LEN {
            return Ok((
                ece::encrypt(text.as_bytes(), keys, pad_for(text.len()))?,
                true,
            ));
        }
    }
    let text = base.to_string();
    Ok((ece::encrypt(text.as_bytes(), keys, 0)?, false))
}

fn classify(status: StatusCode, after: Option<Duration>) -> Attempt {
    let reason = format!("webpush: {}", status.as_u16());
    match status.as_u16() {
        404 | 410 => Attempt::Unregistered { reason },
        401 | 403 => Attempt::ConfigError {
            reason: format!("{reason} (the push service refused the VAPID authorization)"),
        },
        300..=399 => Attempt::Rejected {
            reason: format!("{reason} (redirects are not followed)"),
        },
        429 | 500..=599 => Attempt::Retry {
            after,
            at_least: Duration::ZERO,
            reason,
        },
        _ => Attempt::Rejected { reason },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ece::ReceiverKeys;
    use crate::registration::RegistrationId;

    #[test]
    fn endpoint_guard() {
        let strict = AddressPolicy::default();
        let loopback = AddressPolicy::new(vec!["127.0.0.1/32".parse().unwrap()]);
        let ep = |s: &str| Endpoint::new(s).unwrap();
        assert!(check_endpoint(&ep("https://push.example.com/x"), &strict).is_ok());
        assert!(check_endpoint(&ep("https://8.8.8.8/x"), &strict).is_ok());
        assert!(check_endpoint(&ep("https://10.0.0.1/x"), &strict).is_err());
        assert!(check_endpoint(&ep("https://[::1]/x"), &strict).is_err());
        assert!(check_endpoint(&ep("https://127.0.0.1/x"), &strict).is_err());
        assert!(check_endpoint(&ep("https://127.0.0.1/x"), &loopback).is_ok());
        assert!(check_endpoint(&ep("http://127.0.0.1:9/x"), &strict).is_err());
        assert!(check_endpoint(&ep("http://127.0.0.1:9/x"), &loopback).is_ok());
        assert!(check_endpoint(&ep("http://[::1]:9/x"), &loopback).is_err());
    }

    #[test]
    fn bodies_and_answers() {
        let rx = ReceiverKeys::generate();
        let msg = Message::wake(RegistrationId::new("r1").unwrap());
        let (body, preview) = seal(&msg, rx.push_keys()).unwrap();
        assert!(!preview);
        let plain: Value = serde_json::from_slice(&ece::decrypt(&body, &rx).unwrap()).unwrap();
        assert_eq!(plain, json!({"kw":"r1","kind":"wake"}));
        let (body, preview) =
            seal(&msg.clone().with_preview("x".repeat(5000)), rx.push_keys()).unwrap();
        assert!(!preview, "an oversized preview is left out");
        assert!(body.len() <= ece::MAX_BODY_LEN);
        let (body, preview) = seal(
            &Message::clear(msg.registration_id.clone()).with_preview("hi"),
            rx.push_keys(),
        )
        .unwrap();
        assert!(preview);
        let plain: Value = serde_json::from_slice(&ece::decrypt(&body, &rx).unwrap()).unwrap();
        assert_eq!(plain, json!({"kw":"r1","kind":"clear","preview":"hi"}));

        assert!(matches!(
            classify(StatusCode::GONE, None),
            Attempt::Unregistered { .. }
        ));
        assert!(matches!(
            classify(StatusCode::NOT_FOUND, None),
            Attempt::Unregistered { .. }
        ));
        assert!(matches!(
            classify(StatusCode::TEMPORARY_REDIRECT, None),
            Attempt::Rejected { .. }
        ));
        assert!(matches!(
            classify(StatusCode::FORBIDDEN, None),
            Attempt::ConfigError { .. }
        ));
        assert!(matches!(
            classify(StatusCode::SERVICE_UNAVAILABLE, None),
            Attempt::Retry { .. }
        ));
        assert!(matches!(
            classify(StatusCode::BAD_REQUEST, None),
            Attempt::Rejected { .. }
        ));
    }
}
