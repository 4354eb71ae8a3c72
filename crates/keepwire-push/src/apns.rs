//! Apple Push Notification service: token-based auth over HTTP/2.
//!
//! - **Connection**: HTTP/2 only (ALPN `h2`) over TLS; one `reqwest` client
//!   keeps one long-lived connection per gateway (production, sandbox), with
//!   HTTP/2 pings so idle connections stay usable.
//! - **Provider token**: an ES256 JWT (`kid` = key id, `iss` = team id,
//!   `iat`), signed with the `.p8` key, signature raw `r || s`. It is reused
//!   and replaced once it is [`TOKEN_RENEW_AFTER`] old: APNs refuses tokens
//!   older than an hour and answers `TooManyProviderTokenUpdates` to
//!   renewals more often than every 20 minutes. `ExpiredProviderToken` (our
//!   clock disagrees with Apple's) forces a new token and one retry.
//! - **Request**: `POST /3/device/<token>` with `apns-topic`,
//!   `apns-expiration`, and for a wake-up `apns-push-type: alert`,
//!   `apns-priority: 10` and the payload
//!   `{"aps":{"alert":{"loc-key":"KW_NEW_MESSAGE"},"mutable-content":1},"kw":"<id>"}`
//!   (the notification service extension syncs and replaces the text; the
//!   localized fallback shows if it fails); for a clear,
//!   `apns-push-type: background`, `apns-priority: 5` and
//!   `{"aps":{"content-available":1},"kw":"<id>"}`. `apns-collapse-id` only
//!   when the message has a collapse key.
//! - **Answers**: 410 `Unregistered` → unregistered; 400 `BadDeviceToken` →
//!   the other environment is tried, and the registration is dropped only
//!   when it refuses the token too (when it accepts, the corrected
//!   registration is reported); `DeviceTokenNotForTopic`, `TopicDisallowed`,
//!   `BadTopic`, `MissingTopic`, `InvalidProviderToken`,
//!   `MissingProviderToken`, 403 → configuration error; 429, 5xx,
//!   `TooManyProviderTokenUpdates` → retry; 413 → resent without preview.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use jsonwebtoken::{Algorithm, Header};
use reqwest::StatusCode;
use serde::Serialize;
use serde_json::{Value, json};

use crate::clock::{Clock, unix_secs};
use crate::config::{ApnsConfig, ApnsKey};
use crate::message::{Attempt, Message, PushKind, sealed_preview};
use crate::net::{known_code, read_capped, retry_after, transport_error};
use crate::registration::{ApnsEnvironment, ApnsToken, ApnsTopic, Registration};

/// A provider token is replaced once it is this old (APNs: between 20 and 60 minutes).
pub const TOKEN_RENEW_AFTER: Duration = Duration::from_secs(40 * 60);
/// `apns-expiration` of a wake-up: Apple stores it this long for an offline device.
pub const WAKE_EXPIRATION: Duration = Duration::from_secs(24 * 3600);
/// `apns-expiration` of a clear push.
pub const CLEAR_EXPIRATION: Duration = Duration::from_secs(3600);
/// APNs' payload limit.
pub const MAX_PAYLOAD_BYTES: usize = 4096;
/// The localization key of the fallback alert text.
pub const LOC_KEY: &str = "KW_NEW_MESSAGE";

/// Apple's documented `reason` values.
const APNS_REASONS: &[&str] = &[
    "BadCollapseId",
    "BadDeviceToken",
    "BadExpirationDate",
    "BadMessageId",
    "BadPriority",
    "BadTopic",
    "DeviceTokenNotForTopic",
    "DuplicateHeaders",
    "IdleTimeout",
    "InvalidPushType",
    "MissingDeviceToken",
    "MissingTopic",
    "PayloadEmpty",
    "TopicDisallowed",
    "BadCertificate",
    "BadCertificateEnvironment",
    "ExpiredProviderToken",
    "Forbidden",
    "InvalidProviderToken",
    "MissingProviderToken",
    "UnrelatedKeyIdInToken",
    "BadEnvironmentKeyInToken",
    "BadPath",
    "MethodNotAllowed",
    "ExpiredToken",
    "Unregistered",
    "PayloadTooLarge",
    "TooManyProviderTokenUpdates",
    "TooManyRequests",
    "InternalServerError",
    "ServiceUnavailable",
    "Shutdown",
];

#[derive(Serialize)]
struct ProviderClaims<'a> {
    iss: &'a str,
    iat: u64,
}

struct ProviderToken {
    value: String,
    issued: SystemTime,
}

/// An APNs sender. One per relay; cheap to share (`Arc`).
pub struct ApnsClient {
    http: reqwest::Client,
    key: ApnsKey,
    key_id: String,
    team_id: String,
    topics: Vec<ApnsTopic>,
    production: String,
    sandbox: String,
    clock: Arc<dyn Clock>,
    token: Mutex<Option<ProviderToken>>,
}

impl std::fmt::Debug for ApnsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApnsClient")
            .field("team_id", &self.team_id)
            .field("key_id", &self.key_id)
            .finish()
    }
}

/// One HTTP exchange with a gateway.
enum Answer {
    Ok(Duration),
    Failed {
        status: StatusCode,
        reason: &'static str,
        after: Option<Duration>,
    },
    Transport(Attempt),
}

impl ApnsClient {
    /// A client for `config`; `timeout` bounds each HTTP request.
    pub fn new(
        config: &ApnsConfig,
        clock: Arc<dyn Clock>,
        timeout: Duration,
    ) -> Result<ApnsClient, reqwest::Error> {
        let mut builder = reqwest::Client::builder()
            .http2_prior_knowledge()
            .http2_keep_alive_interval(Duration::from_secs(60))
            .http2_keep_alive_timeout(Duration::from_secs(20))
            .http2_keep_alive_while_idle(true)
            .pool_idle_timeout(None)
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy();
        if let Some(pem) = &config.ca {
            builder = builder
                .tls_built_in_root_certs(false)
                .add_root_certificate(reqwest::Certificate::from_pem(pem)?);
        }
        Ok(ApnsClient {
            http: builder.build()?,
            key: config.key.clone(),
            key_id: config.key_id.clone(),
            team_id: config.team_id.clone(),
            topics: config.topics.clone(),
            production: config.endpoint.as_str().trim_end_matches('/').to_owned(),
            sandbox: config
                .sandbox_endpoint
                .as_str()
                .trim_end_matches('/')
                .to_owned(),
            clock,
            token: Mutex::new(None),
        })
    }

    /// Sends `msg` to an APNs registration (anything else is rejected).
    pub async fn send(&self, registration: &Registration, msg: &Message) -> Attempt {
        let Registration::Apns {
            token,
            environment,
            topic,
            keys,
        } = registration
        else {
            return Attempt::Rejected {
                reason: "apns: not an APNs registration".into(),
            };
        };
        if !self.topics.contains(topic) {
            return Attempt::Rejected {
                reason: "apns: the registration's topic is not a configured bundle id".into(),
            };
        }
        let mut payload = payload(msg, None);
        let mut preview_sent = false;
        if let Some(sealed) = sealed_preview(msg, keys.as_ref()) {
            let with = self::payload(msg, Some(&sealed));
            if with.len() <= MAX_PAYLOAD_BYTES {
                payload = with;
                preview_sent = true;
            }
        }

        let mut answer = self
            .exchange(*environment, token, topic, msg, &payload)
            .await;
        if preview_sent
            && matches!(
                answer,
                Answer::Failed {
                    reason: "PayloadTooLarge",
                    ..
                }
            )
        {
            preview_sent = false;
            payload = self::payload(msg, None);
            answer = self
                .exchange(*environment, token, topic, msg, &payload)
                .await;
        }
        match answer {
            Answer::Ok(latency) => Attempt::Delivered {
                latency,
                preview_sent,
                corrected: None,
            },
            Answer::Failed {
                reason: "BadDeviceToken",
                ..
            } => {
                // A sandbox token sent to production (or the reverse) is
                // refused as BadDeviceToken: ask the other gateway before
                // dropping it.
                let other = environment.other();
                match self.exchange(other, token, topic, msg, &payload).await {
                    Answer::Ok(latency) => Attempt::Delivered {
                        latency,
                        preview_sent,
                        corrected: Some(Box::new(Registration::Apns {
                            token: token.clone(),
                            environment: other,
                            topic: topic.clone(),
                            keys: keys.clone(),
                        })),
                    },
                    Answer::Failed {
                        reason: "BadDeviceToken",
                        ..
                    } => Attempt::Unregistered {
                        reason: "apns: 400 BadDeviceToken in both environments".into(),
                    },
                    other_answer => classify(other_answer),
                }
            }
            a => classify(a),
        }
    }

    /// One request, with one provider-token renewal on `ExpiredProviderToken`.
    async fn exchange(
        &self,
        env: ApnsEnvironment,
        token: &ApnsToken,
        topic: &ApnsTopic,
        msg: &Message,
        payload: &str,
    ) -> Answer {
        let mut renewed = false;
        loop {
            let jwt = match self.provider_token(renewed) {
                Ok(j) => j,
                Err(a) => return Answer::Transport(a),
            };
            let base = match env {
                ApnsEnvironment::Production => &self.production,
                ApnsEnvironment::Sandbox => &self.sandbox,
            };
            let now = self.clock.now();
            let (push_type, priority, expires) = match msg.kind {
                PushKind::Clear => ("background", "5", CLEAR_EXPIRATION),
                _ => ("alert", "10", WAKE_EXPIRATION),
            };
            let mut req = self
                .http
                .post(format!("{base}/3/device/{}", token.expose()))
                .header("authorization", format!("bearer {jwt}"))
                .header("apns-push-type", push_type)
                .header("apns-priority", priority)
                .header("apns-topic", topic.as_str())
                .header("apns-expiration", unix_secs(now + expires).to_string())
                .header("content-type", "application/json")
                .body(payload.to_owned());
            if let Some(c) = &msg.collapse {
                req = req.header("apns-collapse-id", c.as_str());
            }
            let started = Instant::now();
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) => return Answer::Transport(transport_error("apns", &e)),
            };
            let latency = started.elapsed();
            let status = resp.status();
            if status.is_success() {
                return Answer::Ok(latency);
            }
            let after = retry_after(resp.headers(), now);
            let body = read_capped(resp).await;
            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let reason = known_code(v["reason"].as_str(), APNS_REASONS);
            if reason == "ExpiredProviderToken" && !renewed {
                renewed = true;
                continue;
            }
            return Answer::Failed {
                status,
                reason,
                after,
            };
        }
    }

    /// The current provider token, renewed when it is [`TOKEN_RENEW_AFTER`]
    /// old (or when `force`).
    fn provider_token(&self, force: bool) -> Result<String, Attempt> {
        let now = self.clock.now();
        let mut slot = self.token.lock().expect("token lock");
        if let Some(t) = slot.as_ref() {
            let age = now.duration_since(t.issued).unwrap_or(Duration::ZERO);
            if !force && age < TOKEN_RENEW_AFTER {
                return Ok(t.value.clone());
            }
        }
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.key_id.clone());
        let claims = ProviderClaims {
            iss: &self.team_id,
            iat: unix_secs(now),
        };
        let value = jsonwebtoken::encode(&header, &claims, &self.key.0).map_err(|_| {
            Attempt::ConfigError {
                reason: "apns: the .p8 key cannot sign".into(),
            }
        })?;
        *slot = Some(ProviderToken {
            value: value.clone(),
            issued: now,
        });
        Ok(value)
    }
}

/// The JSON payload of `msg`, with a sealed preview if given.
fn payload(msg: &Message, sealed: Option<&str>) -> String {
    let aps = match msg.kind {
        PushKind::Clear => json!({ "content-available": 1 }),
        _ => json!({ "alert": { "loc-key": LOC_KEY }, "mutable-content": 1 }),
    };
    let mut body = json!({ "aps": aps, "kw": msg.registration_id.as_str() });
    if let Some(s) = sealed {
        body["kw_preview"] = Value::String(s.to_owned());
    }
    body.to_string()
}

fn classify(answer: Answer) -> Attempt {
    let (status, code, after) = match answer {
        Answer::Ok(latency) => {
            return Attempt::Delivered {
                latency,
                preview_sent: false,
                corrected: None,
            };
        }
        Answer::Transport(a) => return a,
        Answer::Failed {
            status,
            reason,
            after,
        } => (status, reason, after),
    };
    let reason = format!("apns: {} {code}", status.as_u16());
    match code {
        "Unregistered" | "ExpiredToken" => Attempt::Unregistered { reason },
        _ if status == StatusCode::GONE => Attempt::Unregistered { reason },
        "DeviceTokenNotForTopic"
        | "TopicDisallowed"
        | "BadTopic"
        | "MissingTopic"
        | "InvalidProviderToken"
        | "MissingProviderToken"
        | "ExpiredProviderToken"
        | "UnrelatedKeyIdInToken"
        | "BadEnvironmentKeyInToken"
        | "BadCertificate"
        | "BadCertificateEnvironment"
        | "Forbidden" => Attempt::ConfigError { reason },
        "TooManyProviderTokenUpdates"
        | "TooManyRequests"
        | "IdleTimeout"
        | "InternalServerError"
        | "ServiceUnavailable"
        | "Shutdown" => Attempt::Retry {
            after,
            at_least: Duration::ZERO,
            reason,
        },
        _ if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() => {
            Attempt::Retry {
                after,
                at_least: Duration::ZERO,
                reason,
            }
        }
        _ if status == StatusCode::FORBIDDEN => Attempt::ConfigError { reason },
        _ => Attempt::Rejected { reason },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registration::RegistrationId;

    fn failed(status: u16, reason: &'static str) -> Attempt {
        classify(Answer::Failed {
            status: StatusCode::from_u16(status).unwrap(),
            reason,
            after: None,
        })
    }

    #[test]
    fn classifies_apns_errors() {
        assert!(matches!(
            failed(410, "Unregistered"),
            Attempt::Unregistered { .. }
        ));
        assert!(matches!(
            failed(410, "ExpiredToken"),
            Attempt::Unregistered { .. }
        ));
        for r in [
            "DeviceTokenNotForTopic",
            "TopicDisallowed",
            "InvalidProviderToken",
        ] {
            assert!(matches!(failed(400, r), Attempt::ConfigError { .. }), "{r}");
        }
        assert!(matches!(
            failed(403, "InvalidProviderToken"),
            Attempt::ConfigError { .. }
        ));
        assert!(matches!(
            failed(429, "TooManyRequests"),
            Attempt::Retry { .. }
        ));
        assert!(matches!(
            failed(503, "ServiceUnavailable"),
            Attempt::Retry { .. }
        ));
        assert!(matches!(failed(500, ""), Attempt::Retry { .. }));
        assert!(matches!(
            failed(400, "BadCollapseId"),
            Attempt::Rejected { .. }
        ));
        assert!(matches!(failed(400, "other"), Attempt::Rejected { .. }));
    }

    #[test]
    fn payloads() {
        let id = RegistrationId::new("reg1").unwrap();
        let wake: Value = serde_json::from_str(&payload(&Message::wake(id.clone()), None)).unwrap();
        assert_eq!(
            wake,
            json!({"aps":{"alert":{"loc-key":"KW_NEW_MESSAGE"},"mutable-content":1},"kw":"reg1"})
        );
        let clear: Value =
            serde_json::from_str(&payload(&Message::clear(id), Some("abc"))).unwrap();
        assert_eq!(
            clear,
            json!({"aps":{"content-available":1},"kw":"reg1","kw_preview":"abc"})
        );
    }
}
