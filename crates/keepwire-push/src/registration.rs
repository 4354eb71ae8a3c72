//! Push registrations: where a device wants its wake-ups sent, validated.
//!
//! Every field is checked when it is built or deserialised (sizes, charset,
//! keys on the curve), so a [`Registration`] that exists is well formed.
//! Whether the relay *accepts* it also depends on its configuration (APNs
//! topics, which providers are configured, the Web Push address guard):
//! see `PushConfig::check_registration` (feature `providers`).
//!
//! Tokens, endpoints and keys are secrets: `Debug` redacts them, and
//! [`Registration::key`] gives a digest to index or log by instead.
//!
//! JSON form (`serde`), close to a browser's `PushSubscription.toJSON()`:
//!
//! ```json
//! {"provider":"fcm","token":"…"}
//! {"provider":"apns","token":"<hex>","environment":"production","topic":"com.example.chat"}
//! {"provider":"webpush","endpoint":"https://…","keys":{"p256dh":"…","auth":"…"}}
//! ```
//!
//! FCM and APNs registrations may carry `keys` too: then previews (when
//! allowed) travel encrypted to them.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use url::{Host, Url};

use crate::ece::{EceError, PushKeys};

/// Longest FCM registration token accepted (real ones are about 160 bytes).
pub const MAX_FCM_TOKEN_LEN: usize = 4096;
/// Shortest and longest APNs device token, in hex digits (16 to 100 bytes;
/// today's are 32 bytes).
pub const APNS_TOKEN_HEX_LEN: std::ops::RangeInclusive<usize> = 32..=200;
/// Longest APNs topic (bundle id).
pub const MAX_TOPIC_LEN: usize = 255;
/// Longest Web Push endpoint URL.
pub const MAX_ENDPOINT_LEN: usize = 2048;
/// Longest registration id (the opaque value a push carries).
pub const MAX_REGISTRATION_ID_LEN: usize = 64;

/// Why a registration (or one of its fields) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistrationError {
    /// The FCM token is empty, too long or has characters FCM never uses.
    #[error("the FCM token must be 1..={MAX_FCM_TOKEN_LEN} characters of A-Z a-z 0-9 - _ : .")]
    FcmToken,
    /// The APNs device token is not hex of a plausible length.
    #[error("the APNs device token must be 32..=200 hex digits (an even number)")]
    ApnsToken,
    /// The APNs topic is not a bundle id.
    #[error("the APNs topic must be 1..={MAX_TOPIC_LEN} characters of A-Z a-z 0-9 . -")]
    Topic,
    /// The APNs topic is not one of the relay's configured bundle ids.
    #[error("the APNs topic is not one of this relay's configured bundle ids")]
    TopicNotAllowed,
    /// The APNs environment is neither `sandbox` nor `production`.
    #[error("the APNs environment must be \"sandbox\" or \"production\"")]
    Environment,
    /// The endpoint is not an acceptable URL.
    #[error("the Web Push endpoint {0}")]
    Endpoint(&'static str),
    /// The endpoint is refused by the relay's address guard.
    #[error("the Web Push endpoint is refused: {0}")]
    EndpointRefused(String),
    /// The keys are invalid.
    #[error("the push keys are invalid: {0}")]
    Keys(#[from] EceError),
    /// The registration id is not 1..=64 base64url characters.
    #[error(
        "the registration id must be 1..={MAX_REGISTRATION_ID_LEN} characters of A-Z a-z 0-9 - _"
    )]
    RegistrationId,
    /// The collapse key is not 1..=32 base64url characters.
    #[error("the collapse key must be 1..=32 characters of A-Z a-z 0-9 - _")]
    CollapseKey,
    /// The relay has no configuration for this provider.
    #[error("this relay has no {0} configuration")]
    NotConfigured(Provider),
}

/// A push provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Provider {
    /// Firebase Cloud Messaging, HTTP v1 API.
    Fcm,
    /// Apple Push Notification service, token-based auth over HTTP/2.
    Apns,
    /// Web Push (RFC 8030 with RFC 8291 encryption and RFC 8292 VAPID).
    #[serde(rename = "webpush")]
    WebPush,
}

impl Provider {
    /// Every provider, in a fixed order.
    pub const ALL: [Provider; 3] = [Provider::Fcm, Provider::Apns, Provider::WebPush];

    /// The provider's name: `fcm`, `apns` or `webpush` (also its metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Fcm => "fcm",
            Provider::Apns => "apns",
            Provider::WebPush => "webpush",
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An APNs environment: which gateway a device token belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApnsEnvironment {
    /// Development builds (`api.sandbox.push.apple.com`).
    Sandbox,
    /// App Store and TestFlight builds (`api.push.apple.com`).
    Production,
}

impl ApnsEnvironment {
    /// The other environment.
    pub fn other(self) -> ApnsEnvironment {
        match self {
            ApnsEnvironment::Sandbox => ApnsEnvironment::Production,
            ApnsEnvironment::Production => ApnsEnvironment::Sandbox,
        }
    }

    /// `sandbox` or `production`.
    pub fn as_str(self) -> &'static str {
        match self {
            ApnsEnvironment::Sandbox => "sandbox",
            ApnsEnvironment::Production => "production",
        }
    }
}

impl FromStr for ApnsEnvironment {
    type Err = RegistrationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sandbox" => Ok(ApnsEnvironment::Sandbox),
            "production" => Ok(ApnsEnvironment::Production),
            _ => Err(RegistrationError::Environment),
        }
    }
}

macro_rules! secret_string {
    ($(#[$doc:meta])* $name:ident, $check:path) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates `value`.
            pub fn new(value: impl Into<String>) -> Result<Self, RegistrationError> {
                $check(value.into()).map($name)
            }

            /// The value. Secret: never log it.
            pub fn expose(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = RegistrationError;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                $name::new(value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "(<redacted, {} bytes>)"), self.0.len())
            }
        }
    };
}

secret_string!(
    /// An FCM registration token (validated; `Debug` redacts it).
    FcmToken,
    check_fcm_token
);
secret_string!(
    /// An APNs device token: hex, normalised to lower case (`Debug` redacts it).
    ApnsToken,
    check_apns_token
);

fn check_fcm_token(s: String) -> Result<String, RegistrationError> {
    let ok = !s.is_empty()
        && s.len() <= MAX_FCM_TOKEN_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b':' | b'.'));
    if ok {
        Ok(s)
    } else {
        Err(RegistrationError::FcmToken)
    }
}

fn check_apns_token(s: String) -> Result<String, RegistrationError> {
    let ok = APNS_TOKEN_HEX_LEN.contains(&s.len())
        && s.len().is_multiple_of(2)
        && s.bytes().all(|b| b.is_ascii_hexdigit());
    if ok {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(RegistrationError::ApnsToken)
    }
}

/// An APNs topic: the app's bundle id (not secret).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ApnsTopic(String);

impl ApnsTopic {
    /// Validates a bundle id (`com.example.chat`, also with `.voip` and the like).
    pub fn new(value: impl Into<String>) -> Result<ApnsTopic, RegistrationError> {
        let s = value.into();
        let ok = !s.is_empty()
            && s.len() <= MAX_TOPIC_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'));
        if ok {
            Ok(ApnsTopic(s))
        } else {
            Err(RegistrationError::Topic)
        }
    }

    /// The bundle id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ApnsTopic {
    type Error = RegistrationError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        ApnsTopic::new(value)
    }
}

impl From<ApnsTopic> for String {
    fn from(value: ApnsTopic) -> String {
        value.0
    }
}

/// A Web Push endpoint URL: `https` (or `http` to a loopback IP literal,
/// which the relay accepts only when its allow-list names it), at most
/// [`MAX_ENDPOINT_LEN`] bytes, with a host, no user info and no fragment.
/// `Debug` redacts it (the URL is the capability to push to the device).
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Endpoint(Url);

impl Endpoint {
    /// Validates an endpoint URL.
    pub fn new(value: &str) -> Result<Endpoint, RegistrationError> {
        if value.len() > MAX_ENDPOINT_LEN {
            return Err(RegistrationError::Endpoint("is longer than 2048 bytes"));
        }
        let url = Url::parse(value).map_err(|_| RegistrationError::Endpoint("is not a URL"))?;
        let host = url
            .host()
            .ok_or(RegistrationError::Endpoint("has no host"))?;
        match url.scheme() {
            "https" => {}
            "http" if is_loopback_literal(&host) => {}
            "http" => {
                return Err(RegistrationError::Endpoint(
                    "must use https (plain http only to a loopback address)",
                ));
            }
            _ => return Err(RegistrationError::Endpoint("must be an https URL")),
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(RegistrationError::Endpoint("must not contain user info"));
        }
        if url.fragment().is_some() {
            return Err(RegistrationError::Endpoint("must not contain a fragment"));
        }
        Ok(Endpoint(url))
    }

    /// The URL. Secret: never log it.
    pub fn expose(&self) -> &Url {
        &self.0
    }

    /// The origin (`scheme://host[:port]`): the VAPID audience. Not secret.
    pub fn origin(&self) -> String {
        self.0.origin().ascii_serialization()
    }

    /// The host as an IP address, when it is one.
    pub fn ip_literal(&self) -> Option<IpAddr> {
        match self.0.host()? {
            Host::Ipv4(a) => Some(IpAddr::V4(a)),
            Host::Ipv6(a) => Some(IpAddr::V6(a)),
            Host::Domain(_) => None,
        }
    }
}

fn is_loopback_literal(host: &Host<&str>) -> bool {
    match host {
        Host::Ipv4(a) => a.is_loopback(),
        Host::Ipv6(a) => a.is_loopback(),
        Host::Domain(_) => false,
    }
}

impl TryFrom<String> for Endpoint {
    type Error = RegistrationError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Endpoint::new(&value)
    }
}

impl From<Endpoint> for String {
    fn from(value: Endpoint) -> String {
        value.0.into()
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Endpoint(<redacted>)")
    }
}

/// The JSON shape of [`PushKeys`] (`{"p256dh": "…", "auth": "…"}`, base64url).
#[derive(Serialize, Deserialize)]
struct KeysJson {
    p256dh: String,
    auth: String,
}

impl Serialize for PushKeys {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        KeysJson {
            p256dh: self.p256dh_base64(),
            auth: self.auth_base64(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for PushKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let k = KeysJson::deserialize(d)?;
        PushKeys::from_base64(&k.p256dh, &k.auth).map_err(serde::de::Error::custom)
    }
}

/// Where a device's pushes go. Build one with the variant's validated field
/// types or deserialise it (see the module docs for the JSON form).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "provider", rename_all = "lowercase", deny_unknown_fields)]
#[non_exhaustive]
pub enum Registration {
    /// An FCM registration token.
    Fcm {
        /// The token the app got from Firebase.
        token: FcmToken,
        /// The device's RFC 8291 keys, for encrypted previews.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        keys: Option<PushKeys>,
    },
    /// An APNs device token.
    Apns {
        /// The device token (hex).
        token: ApnsToken,
        /// Which gateway the token belongs to.
        environment: ApnsEnvironment,
        /// The app's bundle id; must be one of the relay's configured topics.
        topic: ApnsTopic,
        /// The device's RFC 8291 keys, for encrypted previews.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        keys: Option<PushKeys>,
    },
    /// A Web Push subscription (a browser's, or a UnifiedPush distributor's).
    #[serde(rename = "webpush")]
    WebPush {
        /// The push resource URL.
        endpoint: Endpoint,
        /// The subscription's keys.
        keys: PushKeys,
    },
}

impl Registration {
    /// An FCM registration from the app's token.
    pub fn fcm(token: &str) -> Result<Registration, RegistrationError> {
        Ok(Registration::Fcm {
            token: FcmToken::new(token)?,
            keys: None,
        })
    }

    /// An APNs registration.
    pub fn apns(
        token: &str,
        environment: ApnsEnvironment,
        topic: &str,
    ) -> Result<Registration, RegistrationError> {
        Ok(Registration::Apns {
            token: ApnsToken::new(token)?,
            environment,
            topic: ApnsTopic::new(topic)?,
            keys: None,
        })
    }

    /// A Web Push registration from a subscription's endpoint and base64url keys.
    pub fn web_push(
        endpoint: &str,
        p256dh: &str,
        auth: &str,
    ) -> Result<Registration, RegistrationError> {
        Ok(Registration::WebPush {
            endpoint: Endpoint::new(endpoint)?,
            keys: PushKeys::from_base64(p256dh, auth)?,
        })
    }

    /// The same registration carrying `keys` for encrypted previews (for Web
    /// Push they replace the subscription's keys).
    pub fn with_keys(mut self, new: PushKeys) -> Registration {
        match &mut self {
            Registration::Fcm { keys, .. } | Registration::Apns { keys, .. } => *keys = Some(new),
            Registration::WebPush { keys, .. } => *keys = new,
        }
        self
    }

    /// The provider.
    pub fn provider(&self) -> Provider {
        match self {
            Registration::Fcm { .. } => Provider::Fcm,
            Registration::Apns { .. } => Provider::Apns,
            Registration::WebPush { .. } => Provider::WebPush,
        }
    }

    /// The RFC 8291 keys previews are encrypted to, if any.
    pub fn keys(&self) -> Option<&PushKeys> {
        match self {
            Registration::Fcm { keys, .. } | Registration::Apns { keys, .. } => keys.as_ref(),
            Registration::WebPush { keys, .. } => Some(keys),
        }
    }

    /// A digest of the provider and its address (token or endpoint; not the
    /// keys, environment or topic): equal for the same device address, so a
    /// relay can enforce "one device per (provider, token)" and log or rate
    /// limit by it without handling the secret.
    pub fn key(&self) -> RegistrationKey {
        let mut h = Sha256::new();
        h.update(self.provider().as_str());
        h.update([0]);
        match self {
            Registration::Fcm { token, .. } => h.update(token.expose()),
            Registration::Apns { token, .. } => h.update(token.expose()),
            Registration::WebPush { endpoint, .. } => h.update(endpoint.expose().as_str()),
        }
        RegistrationKey(h.finalize().into())
    }
}

/// SHA-256 of a registration's provider and address: an identifier that is
/// safe to log (its `Display` is the first 8 bytes in hex) and to index by.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegistrationKey(pub [u8; 32]);

impl fmt::Display for RegistrationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for RegistrationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RegistrationKey({self})")
    }
}

/// The opaque value every push carries: a random id the relay gave the
/// registration, from which a multi-account app finds the account to sync.
/// 1 to 64 characters of base64url (`A-Z a-z 0-9 - _`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RegistrationId(String);

impl RegistrationId {
    /// Validates an id.
    pub fn new(value: impl Into<String>) -> Result<RegistrationId, RegistrationError> {
        let s = value.into();
        let ok = !s.is_empty()
            && s.len() <= MAX_REGISTRATION_ID_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'));
        if ok {
            Ok(RegistrationId(s))
        } else {
            Err(RegistrationError::RegistrationId)
        }
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for RegistrationId {
    type Error = RegistrationError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        RegistrationId::new(value)
    }
}

impl From<RegistrationId> for String {
    fn from(value: RegistrationId) -> String {
        value.0
    }
}

impl fmt::Display for RegistrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P256DH: &str =
        "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4";
    const AUTH: &str = "BTBZMqHH6r4Tts7J_aSIgg";
    const FCM: &str = "dQw4w9WgXcQ:APA91bHun4MxP5egoKMwt2KZFBaFUH-1RYqx_secret_token";
    const APNS: &str = "A0B1C2D3E4F5A6B7C8D9E0F1A2B3C4D5E6F7A8B9C0D1E2F3A4B5C6D7E8F9A0B1";

    #[test]
    fn validates_each_provider() {
        assert!(Registration::fcm(FCM).is_ok());
        assert_eq!(Registration::fcm(""), Err(RegistrationError::FcmToken));
        assert_eq!(
            Registration::fcm("has space"),
            Err(RegistrationError::FcmToken)
        );
        assert_eq!(
            Registration::fcm(&"a".repeat(MAX_FCM_TOKEN_LEN + 1)),
            Err(RegistrationError::FcmToken)
        );

        let r = Registration::apns(APNS, ApnsEnvironment::Sandbox, "com.example.chat").unwrap();
        let Registration::Apns { token, .. } = &r else {
            panic!()
        };
        assert_eq!(token.expose(), APNS.to_ascii_lowercase());
        for bad in ["abc", &APNS[1..], &format!("{}zz", &APNS[2..])] {
            assert_eq!(
                Registration::apns(bad, ApnsEnvironment::Sandbox, "com.example.chat"),
                Err(RegistrationError::ApnsToken),
                "{bad}"
            );
        }
        assert_eq!(
            Registration::apns(APNS, ApnsEnvironment::Sandbox, "com example"),
            Err(RegistrationError::Topic)
        );

        assert!(
            Registration::web_push("https://push.example.com/wpush/v2/abc", P256DH, AUTH).is_ok()
        );
        assert!(Registration::web_push("http://127.0.0.1:8080/up/abc", P256DH, AUTH).is_ok());
        assert!(Registration::web_push("http://[::1]:8080/up/abc", P256DH, AUTH).is_ok());
        for (bad, why) in [
            ("http://push.example.com/abc", "https"),
            ("ftp://push.example.com/abc", "https"),
            ("https://user:pw@push.example.com/abc", "user info"),
            ("https://push.example.com/abc#frag", "fragment"),
            ("not a url", "not a URL"),
        ] {
            let err = Registration::web_push(bad, P256DH, AUTH).unwrap_err();
            assert!(err.to_string().contains(why), "{bad}: {err}");
        }
        let long = format!("https://push.example.com/{}", "a".repeat(MAX_ENDPOINT_LEN));
        assert!(Registration::web_push(&long, P256DH, AUTH).is_err());
        assert!(matches!(
            Registration::web_push("https://push.example.com/a", &P256DH[..40], AUTH),
            Err(RegistrationError::Keys(_))
        ));
    }

    #[test]
    fn json_round_trip_validates_and_debug_redacts() {
        let json = format!(
            r#"{{"provider":"webpush","endpoint":"https://push.example.com/secret-path","keys":{{"p256dh":"{P256DH}","auth":"{AUTH}"}}}}"#
        );
        let r: Registration = serde_json::from_str(&json).unwrap();
        assert_eq!(r.provider(), Provider::WebPush);
        assert_eq!(
            serde_json::from_str::<Registration>(&serde_json::to_string(&r).unwrap()).unwrap(),
            r
        );
        let debug = format!("{r:?}");
        assert!(
            !debug.contains("secret-path") && !debug.contains(AUTH),
            "{debug}"
        );

        let fcm: Registration =
            serde_json::from_str(&format!(r#"{{"provider":"fcm","token":"{FCM}"}}"#)).unwrap();
        assert!(!format!("{fcm:?}").contains("secret_token"));
        let apns: Registration = serde_json::from_str(&format!(
            r#"{{"provider":"apns","token":"{APNS}","environment":"production","topic":"com.example.chat"}}"#
        ))
        .unwrap();
        assert!(
            !format!("{apns:?}")
                .to_lowercase()
                .contains(&APNS.to_lowercase())
        );

        for bad in [
            r#"{"provider":"fcm","token":""}"#,
            r#"{"provider":"fcm","token":"x","extra":1}"#,
            r#"{"provider":"apns","token":"00","environment":"production","topic":"a"}"#,
            r#"{"provider":"apns","token":"A0B1C2D3E4F5A6B7C8D9E0F1A2B3C4D5E6F7A8B9C0D1E2F3A4B5C6D7E8F9A0B1","environment":"staging","topic":"a"}"#,
            r#"{"provider":"carrier-pigeon","token":"x"}"#,
            r#"{"provider":"webpush","endpoint":"http://example.com/","keys":{"p256dh":"x","auth":"y"}}"#,
        ] {
            assert!(serde_json::from_str::<Registration>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn key_identifies_the_address_only() {
        let a = Registration::fcm(FCM).unwrap();
        let keys = PushKeys::from_base64(P256DH, AUTH).unwrap();
        assert_eq!(a.key(), a.clone().with_keys(keys).key());
        assert_ne!(a.key(), Registration::fcm("other").unwrap().key());
        let s = a.key().to_string();
        assert_eq!(s.len(), 16);
        assert!(!s.contains("dQw4"));
        let sandbox = Registration::apns(APNS, ApnsEnvironment::Sandbox, "com.a").unwrap();
        let prod = Registration::apns(APNS, ApnsEnvironment::Production, "com.a").unwrap();
        assert_eq!(sandbox.key(), prod.key());
    }

    #[test]
    fn registration_ids() {
        assert!(RegistrationId::new("r_2fQm-x9").is_ok());
        assert!(RegistrationId::new("").is_err());
        assert!(RegistrationId::new("a/b").is_err());
        assert!(RegistrationId::new("a".repeat(65)).is_err());
    }
}
