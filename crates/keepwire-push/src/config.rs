//! The push configuration file (`keepwire serve --push-config FILE`, TOML).
//!
//! ```toml
//! # Whether encrypted previews may be sent at all (users opt in as well).
//! previews = false
//!
//! [fcm]
//! service_account = "fcm-service-account.json"  # the JSON key from the Firebase console
//! endpoint = "https://fcm.googleapis.com"       # default
//!
//! [apns]
//! key = "AuthKey_ABC123DEFG.p8"                 # the token-signing key
//! key_id = "ABC123DEFG"
//! team_id = "DEF123GHIJ"
//! topics = ["com.example.chat"]                 # bundle ids devices may register for
//! endpoint = "https://api.push.apple.com"       # default
//! sandbox_endpoint = "https://api.sandbox.push.apple.com"  # default
//! # ca = "test-ca.pem"                          # trust only this root (tests)
//!
//! [webpush]
//! subject = "mailto:ops@example.com"            # VAPID contact
//! allow_private = ["10.20.0.0/16"]              # private networks endpoints may use
//!
//! [limits]                                      # all optional; defaults shown
//! queue = 10000            # per provider: pushes waiting or in flight
//! concurrency = 32         # per provider: requests in flight
//! max_attempts = 8         # then the push is reported as given up
//! attempt_timeout = "30s"  # one provider request
//! backoff_base = "1s"      # first retry delay (doubles, with jitter)
//! backoff_max = "5m"
//! device_burst = 10        # per device: pushes at once...
//! device_interval = "1m"   # ...then one per interval
//! ```
//!
//! A section that is absent disables its provider. Relative paths are
//! relative to the configuration file. Every referenced file is read and
//! every key parsed at load time, so a mistake stops the relay at start-up
//! with the file and key named, not at the first push.
//!
//! `endpoint`, `sandbox_endpoint` and the service account's `token_uri`
//! default to the real services and must be `https`; plain `http` is
//! accepted only to a loopback address (tests).

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Deserialize;
use url::{Host, Url};

use crate::net::AddressPolicy;
use crate::registration::{ApnsTopic, Provider, Registration, RegistrationError};

/// The default FCM endpoint.
pub const FCM_ENDPOINT: &str = "https://fcm.googleapis.com";
/// The default Google OAuth 2.0 token endpoint.
pub const GOOGLE_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
/// The APNs production gateway.
pub const APNS_PRODUCTION: &str = "https://api.push.apple.com";
/// The APNs sandbox gateway.
pub const APNS_SANDBOX: &str = "https://api.sandbox.push.apple.com";

/// A configuration problem, naming the file and, where there is one, the key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A file could not be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        /// The file.
        file: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is malformed, has an unknown key or a value of the wrong type.
    #[error("{file}: {message}")]
    Syntax {
        /// The file.
        file: PathBuf,
        /// The parser's message (with line and column).
        message: String,
    },
    /// A value is invalid.
    #[error("{file}: {key}: {message}")]
    Invalid {
        /// The file.
        file: PathBuf,
        /// The key, as `section.key`.
        key: String,
        /// What is wrong and what is expected.
        message: String,
    },
}

/// Limits for the dispatcher (see the module docs for the TOML keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Per provider: pushes waiting or in flight; more are refused at enqueue.
    pub queue: usize,
    /// Per provider: requests in flight.
    pub concurrency: usize,
    /// Provider calls per push before it is reported as given up.
    pub max_attempts: u32,
    /// Timeout of one provider request (a hung provider costs at most this).
    pub attempt_timeout: Duration,
    /// First retry delay; doubles per attempt, with jitter.
    pub backoff_base: Duration,
    /// Largest retry delay (a longer `Retry-After` is still honoured, up to an hour).
    pub backoff_max: Duration,
    /// Per device: pushes sent without waiting.
    pub device_burst: u32,
    /// Per device: one more push per interval after the burst.
    pub device_interval: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            queue: 10_000,
            concurrency: 32,
            max_attempts: 8,
            attempt_timeout: Duration::from_secs(30),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            device_burst: 10,
            device_interval: Duration::from_secs(60),
        }
    }
}

/// A Google service account, read from its JSON key file.
#[derive(Clone)]
pub struct ServiceAccount {
    /// The Firebase project id.
    pub project_id: String,
    /// The account's email: the `iss` of its JWTs.
    pub client_email: String,
    /// The key id (the JWT's `kid`), when the file has one.
    pub private_key_id: Option<String>,
    /// Where access tokens come from: the JWT's `aud`.
    pub token_uri: Url,
    pub(crate) key: EncodingKey,
}

impl fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceAccount")
            .field("project_id", &self.project_id)
            .field("client_email", &self.client_email)
            .field("token_uri", &self.token_uri.as_str())
            .field("key", &"<redacted>")
            .finish()
    }
}

#[derive(Deserialize)]
struct ServiceAccountJson {
    #[serde(rename = "type")]
    kind: Option<String>,
    project_id: String,
    private_key_id: Option<String>,
    private_key: String,
    client_email: String,
    token_uri: Option<String>,
}

impl ServiceAccount {
    /// Parses a service-account JSON key (`type` = `service_account`,
    /// `project_id`, `private_key` as RSA PEM, `client_email`, optional
    /// `token_uri`). The error says which field is wrong.
    pub fn from_json(text: &str) -> Result<ServiceAccount, String> {
        let j: ServiceAccountJson = serde_json::from_str(text)
            .map_err(|e| format!("not a service-account JSON key: {e}"))?;
        if j.kind.as_deref().is_some_and(|k| k != "service_account") {
            return Err("\"type\" must be \"service_account\"".into());
        }
        if j.project_id.is_empty()
            || !j
                .project_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err("\"project_id\" must be letters, digits and dashes".into());
        }
        if !j.client_email.contains('@') {
            return Err("\"client_email\" is not an email address".into());
        }
        let token_uri = service_url(j.token_uri.as_deref().unwrap_or(GOOGLE_TOKEN_URI))
            .map_err(|m| format!("\"token_uri\" {m}"))?;
        let key = EncodingKey::from_rsa_pem(j.private_key.as_bytes())
            .map_err(|_| "\"private_key\" is not an RSA private key in PEM".to_string())?;
        // jsonwebtoken parses the key only when it signs: sign once now.
        jsonwebtoken::encode(&Header::new(Algorithm::RS256), &serde_json::json!({}), &key)
            .map_err(|_| "\"private_key\" is not a usable RSA private key".to_string())?;
        Ok(ServiceAccount {
            project_id: j.project_id,
            client_email: j.client_email,
            private_key_id: j.private_key_id,
            token_uri,
            key,
        })
    }
}

/// `[fcm]`.
#[derive(Debug, Clone)]
pub struct FcmConfig {
    /// The service account whose key signs the OAuth 2.0 assertions.
    pub service_account: ServiceAccount,
    /// The FCM API base URL.
    pub endpoint: Url,
}

/// An APNs token-signing key (`.p8`, PKCS#8 P-256). `Debug` redacts it.
#[derive(Clone)]
pub struct ApnsKey(pub(crate) EncodingKey);

impl ApnsKey {
    /// Parses a `.p8` file's PEM text and checks it can sign ES256.
    pub fn from_pem(pem: &[u8]) -> Result<ApnsKey, String> {
        let key = EncodingKey::from_ec_pem(pem)
            .map_err(|_| "is not a PKCS#8 EC private key in PEM (.p8)".to_string())?;
        jsonwebtoken::encode(&Header::new(Algorithm::ES256), &serde_json::json!({}), &key)
            .map_err(|_| "is not a usable P-256 key".to_string())?;
        Ok(ApnsKey(key))
    }
}

impl fmt::Debug for ApnsKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApnsKey(<redacted>)")
    }
}

/// `[apns]`.
#[derive(Debug, Clone)]
pub struct ApnsConfig {
    /// The token-signing key.
    pub key: ApnsKey,
    /// The key's 10-character id (the JWT's `kid`).
    pub key_id: String,
    /// The 10-character team id (the JWT's `iss`).
    pub team_id: String,
    /// Bundle ids devices may register for.
    pub topics: Vec<ApnsTopic>,
    /// The production gateway.
    pub endpoint: Url,
    /// The sandbox gateway.
    pub sandbox_endpoint: Url,
    /// PEM of the only root to trust (tests); `None` trusts the public roots.
    pub ca: Option<Vec<u8>>,
}

/// `[webpush]`.
#[derive(Debug, Clone)]
pub struct WebPushConfig {
    /// The VAPID `sub`: `mailto:` or `https:` contact of the operator.
    pub subject: String,
    /// Networks endpoints may point into despite the address guard.
    pub allow_private: Vec<IpNet>,
}

impl WebPushConfig {
    /// The address policy these settings describe.
    pub fn policy(&self) -> AddressPolicy {
        AddressPolicy::new(self.allow_private.clone())
    }
}

/// The whole push configuration.
#[derive(Debug, Clone, Default)]
pub struct PushConfig {
    /// FCM, if configured.
    pub fcm: Option<FcmConfig>,
    /// APNs, if configured.
    pub apns: Option<ApnsConfig>,
    /// Web Push, if configured.
    pub webpush: Option<WebPushConfig>,
    /// Whether the operator allows (encrypted) previews.
    pub previews: bool,
    /// Dispatcher limits.
    pub limits: Limits,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    previews: bool,
    fcm: Option<RawFcm>,
    apns: Option<RawApns>,
    webpush: Option<RawWebPush>,
    limits: Option<RawLimits>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFcm {
    service_account: PathBuf,
    endpoint: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApns {
    key: PathBuf,
    key_id: String,
    team_id: String,
    topics: Vec<String>,
    endpoint: Option<String>,
    sandbox_endpoint: Option<String>,
    ca: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebPush {
    subject: String,
    #[serde(default)]
    allow_private: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    queue: Option<usize>,
    concurrency: Option<usize>,
    max_attempts: Option<u32>,
    attempt_timeout: Option<String>,
    backoff_base: Option<String>,
    backoff_max: Option<String>,
    device_burst: Option<u32>,
    device_interval: Option<String>,
}

impl PushConfig {
    /// Reads and validates the configuration file at `path`.
    pub fn load(path: &Path) -> Result<PushConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        PushConfig::from_toml(&text, path, base)
    }

    /// Parses `text` as if read from `file`; relative paths are resolved
    /// against `base`.
    pub fn from_toml(text: &str, file: &Path, base: &Path) -> Result<PushConfig, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            file: file.to_owned(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            file: file.to_owned(),
            key: key.to_owned(),
            message,
        };
        let read = |key: &str, p: &Path| -> Result<Vec<u8>, ConfigError> {
            let full = base.join(p);
            std::fs::read(&full)
                .map_err(|e| invalid(key, format!("cannot read {}: {e}", full.display())))
        };

        let fcm = match raw.fcm {
            None => None,
            Some(f) => {
                let json = read("fcm.service_account", &f.service_account)?;
                let json = String::from_utf8(json)
                    .map_err(|_| invalid("fcm.service_account", "is not UTF-8 text".into()))?;
                let service_account = ServiceAccount::from_json(&json)
                    .map_err(|m| invalid("fcm.service_account", m))?;
                let endpoint = service_url(f.endpoint.as_deref().unwrap_or(FCM_ENDPOINT))
                    .map_err(|m| invalid("fcm.endpoint", m.into()))?;
                Some(FcmConfig {
                    service_account,
                    endpoint,
                })
            }
        };

        let apns = match raw.apns {
            None => None,
            Some(a) => {
                let key = ApnsKey::from_pem(&read("apns.key", &a.key)?)
                    .map_err(|m| invalid("apns.key", m))?;
                for (name, value) in [("apns.key_id", &a.key_id), ("apns.team_id", &a.team_id)] {
                    if value.len() != 10
                        || !value
                            .bytes()
                            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
                    {
                        return Err(invalid(name, "must be the 10-character id from the Apple developer account (A-Z, 0-9)".into()));
                    }
                }
                if a.topics.is_empty() {
                    return Err(invalid(
                        "apns.topics",
                        "must list at least one bundle id".into(),
                    ));
                }
                let topics = a
                    .topics
                    .iter()
                    .map(|t| {
                        ApnsTopic::new(t.as_str())
                            .map_err(|e| invalid("apns.topics", format!("{t:?}: {e}")))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let endpoint = service_url(a.endpoint.as_deref().unwrap_or(APNS_PRODUCTION))
                    .map_err(|m| invalid("apns.endpoint", m.into()))?;
                let sandbox_endpoint =
                    service_url(a.sandbox_endpoint.as_deref().unwrap_or(APNS_SANDBOX))
                        .map_err(|m| invalid("apns.sandbox_endpoint", m.into()))?;
                let ca = match &a.ca {
                    None => None,
                    Some(p) => {
                        let pem = read("apns.ca", p)?;
                        reqwest::Certificate::from_pem(&pem)
                            .map_err(|_| invalid("apns.ca", "is not a PEM certificate".into()))?;
                        Some(pem)
                    }
                };
                Some(ApnsConfig {
                    key,
                    key_id: a.key_id,
                    team_id: a.team_id,
                    topics,
                    endpoint,
                    sandbox_endpoint,
                    ca,
                })
            }
        };

        let webpush = match raw.webpush {
            None => None,
            Some(w) => {
                let s = &w.subject;
                let ok = (s.starts_with("mailto:") && s.len() > 7 && s.contains('@'))
                    || (s.starts_with("https://") && Url::parse(s).is_ok());
                if !ok || s.len() > 256 {
                    return Err(invalid(
                        "webpush.subject",
                        "must be a mailto: or https: contact for the push services".into(),
                    ));
                }
                let allow_private = w
                    .allow_private
                    .iter()
                    .map(|a| {
                        parse_net(a).ok_or_else(|| {
                            invalid(
                                "webpush.allow_private",
                                format!("{a:?} is not an IP address or CIDR network"),
                            )
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Some(WebPushConfig {
                    subject: w.subject,
                    allow_private,
                })
            }
        };

        let mut limits = Limits::default();
        if let Some(l) = raw.limits {
            let positive =
                |key: &str, v: Option<usize>, slot: &mut usize| -> Result<(), ConfigError> {
                    if let Some(v) = v {
                        if v == 0 || v > 1_000_000 {
                            return Err(invalid(key, "must be between 1 and 1000000".into()));
                        }
                        *slot = v;
                    }
                    Ok(())
                };
            positive("limits.queue", l.queue, &mut limits.queue)?;
            positive("limits.concurrency", l.concurrency, &mut limits.concurrency)?;
            let mut n = limits.max_attempts as usize;
            positive(
                "limits.max_attempts",
                l.max_attempts.map(|v| v as usize),
                &mut n,
            )?;
            limits.max_attempts = n.min(100) as u32;
            let mut b = limits.device_burst as usize;
            positive(
                "limits.device_burst",
                l.device_burst.map(|v| v as usize),
                &mut b,
            )?;
            limits.device_burst = b.min(10_000) as u32;
            for (key, value, slot) in [
                (
                    "limits.attempt_timeout",
                    &l.attempt_timeout,
                    &mut limits.attempt_timeout,
                ),
                (
                    "limits.backoff_base",
                    &l.backoff_base,
                    &mut limits.backoff_base,
                ),
                (
                    "limits.backoff_max",
                    &l.backoff_max,
                    &mut limits.backoff_max,
                ),
                (
                    "limits.device_interval",
                    &l.device_interval,
                    &mut limits.device_interval,
                ),
            ] {
                if let Some(v) = value {
                    let d = humantime::parse_duration(v).map_err(|e| {
                        invalid(
                            key,
                            format!("{v:?} is not a duration like \"30s\" or \"5m\": {e}"),
                        )
                    })?;
                    if d.is_zero() || d > Duration::from_secs(24 * 3600) {
                        return Err(invalid(key, "must be more than 0 and at most 24h".into()));
                    }
                    *slot = d;
                }
            }
            if limits.backoff_base > limits.backoff_max {
                return Err(invalid(
                    "limits.backoff_base",
                    "must not exceed limits.backoff_max".into(),
                ));
            }
        }

        Ok(PushConfig {
            fcm,
            apns,
            webpush,
            previews: raw.previews,
            limits,
        })
    }

    /// Whether this relay accepts `registration`: its provider is
    /// configured, an APNs topic is one of the configured bundle ids, and a
    /// Web Push endpoint passes the address guard's static checks (scheme,
    /// IP-literal hosts; names are checked again on every connection).
    pub fn check_registration(&self, registration: &Registration) -> Result<(), RegistrationError> {
        match registration {
            Registration::Fcm { .. } if self.fcm.is_none() => {
                Err(RegistrationError::NotConfigured(Provider::Fcm))
            }
            Registration::Apns { topic, .. } => match &self.apns {
                None => Err(RegistrationError::NotConfigured(Provider::Apns)),
                Some(a) if !a.topics.contains(topic) => Err(RegistrationError::TopicNotAllowed),
                Some(_) => Ok(()),
            },
            Registration::WebPush { endpoint, .. } => match &self.webpush {
                None => Err(RegistrationError::NotConfigured(Provider::WebPush)),
                Some(w) => crate::webpush::check_endpoint(endpoint, &w.policy()),
            },
            _ => Ok(()),
        }
    }
}

/// Parses an allow-list entry: an address or a CIDR network.
fn parse_net(s: &str) -> Option<IpNet> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Some(net.trunc());
    }
    s.parse::<std::net::IpAddr>().ok().map(IpNet::from)
}

/// Checks a provider URL: `https`, or `http` to a loopback address.
pub(crate) fn service_url(s: &str) -> Result<Url, &'static str> {
    let url = Url::parse(s).map_err(|_| "is not a URL")?;
    let loopback = match url.host() {
        Some(Host::Ipv4(a)) => a.is_loopback(),
        Some(Host::Ipv6(a)) => a.is_loopback(),
        Some(Host::Domain(d)) => d == "localhost",
        None => return Err("has no host"),
    };
    match url.scheme() {
        "https" => Ok(url),
        "http" if loopback => Ok(url),
        _ => Err("must be an https URL (plain http only to a loopback address)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_urls() {
        assert!(service_url("https://fcm.googleapis.com").is_ok());
        assert!(service_url("http://127.0.0.1:9000").is_ok());
        assert!(service_url("http://[::1]:9000").is_ok());
        assert!(service_url("http://fcm.googleapis.com").is_err());
        assert!(service_url("ftp://x").is_err());
        assert!(service_url("nonsense").is_err());
        assert_eq!(parse_net("10.1.2.3/8"), Some("10.0.0.0/8".parse().unwrap()));
        assert_eq!(parse_net("::1"), Some("::1/128".parse().unwrap()));
        assert_eq!(parse_net("example.com"), None);
    }

    #[test]
    fn minimal_and_empty_files() {
        let c = PushConfig::from_toml("", Path::new("p.toml"), Path::new(".")).unwrap();
        assert!(c.fcm.is_none() && c.apns.is_none() && c.webpush.is_none() && !c.previews);
        assert_eq!(c.limits, Limits::default());
        let c = PushConfig::from_toml(
            "[webpush]\nsubject = \"mailto:ops@example.com\"\nallow_private = [\"127.0.0.1\"]\n[limits]\nattempt_timeout = \"500ms\"\nqueue = 5\n",
            Path::new("p.toml"),
            Path::new("."),
        )
        .unwrap();
        assert_eq!(c.limits.attempt_timeout, Duration::from_millis(500));
        assert_eq!(c.limits.queue, 5);
        let w = c.webpush.unwrap();
        assert!(w.policy().permits("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn errors_name_the_file_and_key() {
        let cases = [
            ("[webpush]\nsubject = \"ops\"\n", "p.toml: webpush.subject:"),
            (
                "[webpush]\nsubject = \"mailto:a@b\"\nallow_private = [\"nope\"]\n",
                "p.toml: webpush.allow_private:",
            ),
            (
                "[webpush]\nsubjekt = \"mailto:a@b\"\n",
                "unknown field `subjekt`",
            ),
            ("[limits]\nqueue = 0\n", "p.toml: limits.queue:"),
            (
                "[limits]\nbackoff_max = \"soon\"\n",
                "p.toml: limits.backoff_max:",
            ),
            (
                "[limits]\nbackoff_base = \"10m\"\nbackoff_max = \"1m\"\n",
                "p.toml: limits.backoff_base:",
            ),
            (
                "[fcm]\nservice_account = \"/nonexistent/sa.json\"\n",
                "p.toml: fcm.service_account: cannot read /nonexistent/sa.json",
            ),
            (
                "[apns]\nkey = \"/nonexistent.p8\"\nkey_id = \"A\"\nteam_id = \"B\"\ntopics = []\n",
                "p.toml: apns.key: cannot read",
            ),
            ("previews = \"yes\"\n", "p.toml"),
        ];
        for (text, want) in cases {
            let err = PushConfig::from_toml(text, Path::new("p.toml"), Path::new("/"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
        let err = PushConfig::load(Path::new("/nonexistent/push.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("/nonexistent/push.toml: cannot read"),
            "{err}"
        );
    }

    #[test]
    fn service_account_fields() {
        for (json, want) in [
            ("{", "not a service-account JSON key"),
            (
                r#"{"type":"user","project_id":"p","private_key":"x","client_email":"a@b"}"#,
                "\"type\"",
            ),
            (
                r#"{"project_id":"p q","private_key":"x","client_email":"a@b"}"#,
                "\"project_id\"",
            ),
            (
                r#"{"project_id":"p","private_key":"x","client_email":"ab"}"#,
                "\"client_email\"",
            ),
            (
                r#"{"project_id":"p","private_key":"x","client_email":"a@b","token_uri":"http://evil.example/t"}"#,
                "\"token_uri\"",
            ),
            (
                r#"{"project_id":"p","private_key":"x","client_email":"a@b"}"#,
                "\"private_key\"",
            ),
        ] {
            let err = ServiceAccount::from_json(json).unwrap_err();
            assert!(err.contains(want), "{json}: {err}");
        }
        assert!(
            ApnsKey::from_pem(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
                .is_err()
        );
    }
}
