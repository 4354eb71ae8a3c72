//! Firebase Cloud Messaging, HTTP v1 API.
//!
//! - **Access token**: a JWT signed RS256 with the service account's key
//!   (`iss` = `client_email`, `aud` = `token_uri`, `scope` =
//!   `https://www.googleapis.com/auth/firebase.messaging`, one hour), traded
//!   at `token_uri` for an OAuth 2.0 access token (JWT bearer grant,
//!   RFC 7523). The token is cached until [`TOKEN_REFRESH_MARGIN`] before it
//!   expires; a 401 from FCM refreshes it once, then it is a configuration
//!   error.
//! - **Send**: `POST {endpoint}/v1/projects/{project_id}/messages:send` with
//!   a data message (string values only: `kw` = the registration id, and
//!   `kw_preview` when an encrypted preview goes along), `android.priority`
//!   `HIGH` for wake-ups and `NORMAL` for clears, `android.ttl` `"86400s"`,
//!   and no `collapse_key` (collapsible messages are throttled to 20 per
//!   device).
//! - **Errors** come from `error.details[].errorCode`: `UNREGISTERED` and
//!   `SENDER_ID_MISMATCH` → unregistered; `INVALID_ARGUMENT` → unregistered
//!   only when the field at fault is `message.token` (a relay bug must not
//!   wipe every registration), else rejected; `QUOTA_EXCEEDED` → retry after
//!   at least a minute; `UNAVAILABLE`, `INTERNAL`, 429 and 5xx → retry,
//!   honouring `Retry-After`; `THIRD_PARTY_AUTH_ERROR`, 403 → configuration.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use jsonwebtoken::{Algorithm, Header};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::clock::{Clock, unix_secs};
use crate::config::{FcmConfig, ServiceAccount};
use crate::message::{Attempt, Message, PushKind, sealed_preview};
use crate::net::{known_code, read_capped, retry_after, transport_error};
use crate::registration::Registration;

/// The OAuth 2.0 scope for sending FCM messages.
pub const FCM_SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// Lifetime of the JWT assertion (Google accepts at most one hour).
pub const ASSERTION_LIFETIME: Duration = Duration::from_secs(3600);
/// An access token is replaced this long before it expires.
pub const TOKEN_REFRESH_MARGIN: Duration = Duration::from_secs(300);
/// `android.ttl` of a wake-up: a device offline for a day still gets it.
pub const WAKE_TTL: &str = "86400s";
/// `android.ttl` of a clear push: stale after an hour.
pub const CLEAR_TTL: &str = "3600s";
/// FCM's limit on a data payload; a preview that would exceed it is left out.
pub const MAX_DATA_BYTES: usize = 4000;

#[derive(Serialize)]
struct Assertion<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    expires_in: Option<u64>,
}

struct AccessToken {
    value: String,
    refresh_at: SystemTime,
}

/// An FCM HTTP v1 sender. One per relay; cheap to share (`Arc`).
pub struct FcmClient {
    http: reqwest::Client,
    account: ServiceAccount,
    send_url: String,
    clock: Arc<dyn Clock>,
    token: Mutex<Option<AccessToken>>,
}

impl std::fmt::Debug for FcmClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FcmClient")
            .field("project", &self.account.project_id)
            .finish()
    }
}

impl FcmClient {
    /// A client for `config`; `timeout` bounds each HTTP request.
    pub fn new(
        config: &FcmConfig,
        clock: Arc<dyn Clock>,
        timeout: Duration,
    ) -> Result<FcmClient, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()?;
        let base = config.endpoint.as_str().trim_end_matches('/');
        Ok(FcmClient {
            http,
            send_url: format!(
                "{base}/v1/projects/{}/messages:send",
                config.service_account.project_id
            ),
            account: config.service_account.clone(),
            clock,
            token: Mutex::new(None),
        })
    }

    /// Sends `msg` to an FCM registration (anything else is rejected).
    pub async fn send(&self, registration: &Registration, msg: &Message) -> Attempt {
        let Registration::Fcm { token, keys } = registration else {
            return Attempt::Rejected {
                reason: "fcm: not an FCM registration".into(),
            };
        };
        let mut data = serde_json::Map::new();
        data.insert(
            "kw".into(),
            Value::String(msg.registration_id.as_str().into()),
        );
        let mut preview_sent = false;
        if let Some(sealed) = sealed_preview(msg, keys.as_ref()) {
            // Leave the preview out rather than have FCM refuse the push.
            if sealed.len() + msg.registration_id.as_str().len() + 32 <= MAX_DATA_BYTES {
                data.insert("kw_preview".into(), Value::String(sealed));
                preview_sent = true;
            }
        }
        let (priority, ttl) = match msg.kind {
            PushKind::Clear => ("NORMAL", CLEAR_TTL),
            _ => ("HIGH", WAKE_TTL),
        };
        let body = json!({
            "message": {
                "token": token.expose(),
                "data": data,
                "android": { "priority": priority, "ttl": ttl },
            }
        });

        let mut refreshed = false;
        loop {
            let access = match self.access_token(refreshed).await {
                Ok(t) => t,
                Err(a) => return a,
            };
            let started = Instant::now();
            let resp = match self
                .http
                .post(&self.send_url)
                .bearer_auth(&access)
                .json(&body)
                .send()
                .await
            {
                Ok(r) => r,
                Err(e) => return transport_error("fcm", &e),
            };
            let latency = started.elapsed();
            let status = resp.status();
            if status.is_success() {
                return Attempt::Delivered {
                    latency,
                    preview_sent,
                    corrected: None,
                };
            }
            let after = retry_after(resp.headers(), self.clock.now());
            let body = read_capped(resp).await;
            let attempt = classify(status, &body, after);
            // A 401 means our access token was refused, unless FCM blames a
            // third party (APNs credentials in the Firebase project).
            if status == StatusCode::UNAUTHORIZED && !matches!(attempt, Attempt::ConfigError { .. })
            {
                if refreshed {
                    return Attempt::ConfigError {
                        reason: "fcm: 401 with a fresh access token (is the service account allowed to send for this project?)".into(),
                    };
                }
                refreshed = true;
                continue;
            }
            return attempt;
        }
    }

    /// The cached access token, or a new one when it is due (or `force`).
    async fn access_token(&self, force: bool) -> Result<String, Attempt> {
        let mut slot = self.token.lock().await;
        let now = self.clock.now();
        if let Some(t) = slot.as_ref()
            && !force
            && now < t.refresh_at
        {
            return Ok(t.value.clone());
        }
        let fresh = self.fetch_token(now).await?;
        let value = fresh.value.clone();
        *slot = Some(fresh);
        Ok(value)
    }

    async fn fetch_token(&self, now: SystemTime) -> Result<AccessToken, Attempt> {
        let iat = unix_secs(now);
        let claims = Assertion {
            iss: &self.account.client_email,
            scope: FCM_SCOPE,
            aud: self.account.token_uri.as_str(),
            iat,
            exp: iat + ASSERTION_LIFETIME.as_secs(),
        };
        let mut header = Header::new(Algorithm::RS256);
        header.kid = self.account.private_key_id.clone();
        let assertion =
            jsonwebtoken::encode(&header, &claims, &self.account.key).map_err(|_| {
                Attempt::ConfigError {
                    reason: "fcm: the service account key cannot sign".into(),
                }
            })?;
        let resp = self
            .http
            .post(self.account.token_uri.clone())
            .form(&[
                ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                ("assertion", assertion.as_str()),
            ])
            .send()
            .await
            .map_err(|e| transport_error("fcm token", &e))?;
        let status = resp.status();
        let after = retry_after(resp.headers(), now);
        let body = read_capped(resp).await;
        if status.is_success() {
            let t: TokenResponse = serde_json::from_slice(&body)
                .map_err(|_| Attempt::retry("fcm token: malformed token response".into()))?;
            let lifetime = Duration::from_secs(t.expires_in.unwrap_or(3600).min(3600));
            let keep = if lifetime > 2 * TOKEN_REFRESH_MARGIN {
                lifetime - TOKEN_REFRESH_MARGIN
            } else {
                lifetime / 2
            };
            return Ok(AccessToken {
                value: t.access_token,
                refresh_at: now + keep,
            });
        }
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let code = known_code(v["error"].as_str(), OAUTH_ERRORS);
        Err(
            if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
                Attempt::Retry {
                    after,
                    at_least: Duration::ZERO,
                    reason: format!("fcm token: {}", status.as_u16()),
                }
            } else {
                Attempt::ConfigError {
                    reason: format!(
                        "fcm token: {} {code} (check the service account)",
                        status.as_u16()
                    ),
                }
            },
        )
    }
}

/// FCM's documented error codes (`FcmError.errorCode`) and the RPC statuses
/// it answers with.
const FCM_ERRORS: &[&str] = &[
    "UNSPECIFIED_ERROR",
    "INVALID_ARGUMENT",
    "UNREGISTERED",
    "SENDER_ID_MISMATCH",
    "QUOTA_EXCEEDED",
    "UNAVAILABLE",
    "INTERNAL",
    "THIRD_PARTY_AUTH_ERROR",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
    "NOT_FOUND",
    "RESOURCE_EXHAUSTED",
];

/// OAuth 2.0 token endpoint errors (RFC 6749 §5.2).
const OAUTH_ERRORS: &[&str] = &[
    "invalid_request",
    "invalid_client",
    "invalid_grant",
    "unauthorized_client",
    "unsupported_grant_type",
    "invalid_scope",
];

/// Classifies an FCM error response.
fn classify(status: StatusCode, body: &[u8], after: Option<Duration>) -> Attempt {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let err = &v["error"];
    let rpc_status = known_code(err["status"].as_str(), FCM_ERRORS);
    let details = err["details"].as_array().cloned().unwrap_or_default();
    let error_code = known_code(
        details.iter().find_map(|d| d["errorCode"].as_str()),
        FCM_ERRORS,
    );
    let token_at_fault = details.iter().any(|d| {
        d["fieldViolations"].as_array().is_some_and(|vs| {
            vs.iter()
                .any(|fv| fv["field"].as_str() == Some("message.token"))
        })
    });
    let code = if error_code.is_empty() {
        rpc_status
    } else {
        error_code
    };
    let reason = format!("fcm: {} {code}", status.as_u16());
    match code {
        "UNREGISTERED" | "SENDER_ID_MISMATCH" => Attempt::Unregistered { reason },
        "INVALID_ARGUMENT" if token_at_fault => Attempt::Unregistered {
            reason: format!("{reason} (message.token)"),
        },
        "INVALID_ARGUMENT" => Attempt::Rejected { reason },
        "QUOTA_EXCEEDED" => Attempt::Retry {
            after,
            at_least: Duration::from_secs(60),
            reason,
        },
        "UNAVAILABLE" | "INTERNAL" => Attempt::Retry {
            after,
            at_least: Duration::ZERO,
            reason,
        },
        // (A plain 401 UNAUTHENTICATED is our access token: `send` refreshes it.)
        "THIRD_PARTY_AUTH_ERROR" | "PERMISSION_DENIED" => Attempt::ConfigError { reason },
        _ if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() => {
            Attempt::Retry {
                after,
                at_least: Duration::ZERO,
                reason,
            }
        }
        _ if status == StatusCode::FORBIDDEN || status == StatusCode::NOT_FOUND => {
            Attempt::ConfigError { reason }
        }
        _ => Attempt::Rejected { reason },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(status: u16, body: &str) -> Attempt {
        classify(
            StatusCode::from_u16(status).unwrap(),
            body.as_bytes(),
            Some(Duration::from_secs(3)),
        )
    }

    fn fcm_error(code: u16, status: &str, error_code: &str) -> String {
        format!(
            r#"{{"error":{{"code":{code},"message":"x","status":"{status}","details":[{{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"{error_code}"}}]}}}}"#
        )
    }

    #[test]
    fn classifies_fcm_errors() {
        assert!(matches!(
            err(404, &fcm_error(404, "NOT_FOUND", "UNREGISTERED")),
            Attempt::Unregistered { .. }
        ));
        assert!(matches!(
            err(
                403,
                &fcm_error(403, "PERMISSION_DENIED", "SENDER_ID_MISMATCH")
            ),
            Attempt::Unregistered { .. }
        ));
        // INVALID_ARGUMENT drops only when the token is the field at fault.
        let bad_token = r#"{"error":{"code":400,"status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"INVALID_ARGUMENT"},{"@type":"type.googleapis.com/google.rpc.BadRequest","fieldViolations":[{"field":"message.token","description":"Invalid registration token"}]}]}}"#;
        assert!(matches!(err(400, bad_token), Attempt::Unregistered { .. }));
        let bad_data = r#"{"error":{"code":400,"status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.rpc.BadRequest","fieldViolations":[{"field":"message.data[0].value","description":"Invalid value"}]}]}}"#;
        assert!(matches!(err(400, bad_data), Attempt::Rejected { .. }));
        match err(429, &fcm_error(429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED")) {
            Attempt::Retry {
                after, at_least, ..
            } => {
                assert_eq!(after, Some(Duration::from_secs(3)));
                assert_eq!(at_least, Duration::from_secs(60));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            err(503, &fcm_error(503, "UNAVAILABLE", "UNAVAILABLE")),
            Attempt::Retry { .. }
        ));
        assert!(matches!(
            err(502, "<html>bad gateway</html>"),
            Attempt::Retry { .. }
        ));
        assert!(matches!(err(429, ""), Attempt::Retry { .. }));
        assert!(matches!(
            err(
                401,
                &fcm_error(401, "UNAUTHENTICATED", "THIRD_PARTY_AUTH_ERROR")
            ),
            Attempt::ConfigError { .. }
        ));
        assert!(matches!(err(404, "{}"), Attempt::ConfigError { .. }));
        assert!(matches!(err(400, "garbage"), Attempt::Rejected { .. }));
        // Reasons never carry response text.
        let Attempt::Rejected { reason } = err(400, r#"{"error":{"status":"token=secret\n"}}"#)
        else {
            panic!()
        };
        assert_eq!(reason, "fcm: 400 other");
    }
}
