//! VAPID (RFC 8292): the relay's application-server key and the
//! `Authorization: vapid t=…, k=…` header it sends with every Web Push.
//!
//! The key pair is generated once ([`VapidKey::generate`]) and kept by the
//! relay in its store ([`VapidKey::to_bytes`], PKCS#8 DER), because browsers
//! and UnifiedPush distributors bind each subscription to the public key
//! ([`VapidKey::public_key_base64`], served at `GET /v1/push/vapid`).
//!
//! The JWT is ES256 with the signature as raw `r || s` (64 bytes, JOSE),
//! never DER; `aud` is the endpoint's origin, `exp` 12 hours ahead (RFC 8292
//! allows at most 24), `sub` the operator's contact from the configuration.

use std::fmt;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use serde::Serialize;

use crate::clock::unix_secs;
use crate::ece::PUBLIC_KEY_LEN;

/// How long a VAPID JWT is valid (RFC 8292 §2: at most 24 hours).
pub const VAPID_TOKEN_LIFETIME: Duration = Duration::from_secs(12 * 3600);

/// Why a VAPID key could not be read or used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VapidError {
    /// The stored bytes are not a PKCS#8 P-256 key with its public key.
    #[error("the VAPID key is not a PKCS#8 P-256 private key")]
    InvalidKey,
    /// Signing failed (should not happen with a valid key).
    #[error("signing the VAPID JWT failed: {0}")]
    Sign(String),
}

/// The relay's VAPID key pair (ECDSA P-256). `Debug` shows only the public key.
pub struct VapidKey {
    pkcs8: Vec<u8>,
    public: [u8; PUBLIC_KEY_LEN],
    encoding: EncodingKey,
}

#[derive(Serialize)]
struct Claims<'a> {
    aud: &'a str,
    exp: u64,
    sub: &'a str,
}

impl VapidKey {
    /// A fresh key pair from the operating system's random source.
    pub fn generate() -> VapidKey {
        let doc =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .expect("the system random source works");
        VapidKey::from_bytes(doc.as_ref()).expect("ring reads the PKCS#8 it wrote")
    }

    /// A key from [`VapidKey::to_bytes`] (PKCS#8 DER, as `openssl` and most
    /// Web Push libraries write it).
    pub fn from_bytes(pkcs8: &[u8]) -> Result<VapidKey, VapidError> {
        let pair = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8,
            &SystemRandom::new(),
        )
        .map_err(|_| VapidError::InvalidKey)?;
        let public: [u8; PUBLIC_KEY_LEN] = pair
            .public_key()
            .as_ref()
            .try_into()
            .map_err(|_| VapidError::InvalidKey)?;
        Ok(VapidKey {
            pkcs8: pkcs8.to_vec(),
            public,
            encoding: EncodingKey::from_ec_der(pkcs8),
        })
    }

    /// The key pair as PKCS#8 DER. Secret: store it like a password.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.pkcs8.clone()
    }

    /// The public key, uncompressed (65 bytes).
    pub fn public_key(&self) -> &[u8; PUBLIC_KEY_LEN] {
        &self.public
    }

    /// The public key as unpadded base64url: the `applicationServerKey` a
    /// browser subscribes with, and the `k=` of the header.
    pub fn public_key_base64(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.public)
    }

    /// A signed VAPID JWT for `audience` (an origin such as
    /// `https://push.example.net`) with contact `subject`, valid for
    /// [`VAPID_TOKEN_LIFETIME`] from `now`.
    pub fn token(
        &self,
        audience: &str,
        subject: &str,
        now: SystemTime,
    ) -> Result<String, VapidError> {
        let mut header = Header::new(Algorithm::ES256);
        header.typ = Some("JWT".into());
        let claims = Claims {
            aud: audience,
            exp: unix_secs(now) + VAPID_TOKEN_LIFETIME.as_secs(),
            sub: subject,
        };
        jsonwebtoken::encode(&header, &claims, &self.encoding)
            .map_err(|e| VapidError::Sign(e.to_string()))
    }

    /// The `Authorization` header value: `vapid t=<jwt>, k=<public key>`.
    pub fn authorization(
        &self,
        audience: &str,
        subject: &str,
        now: SystemTime,
    ) -> Result<String, VapidError> {
        Ok(format!(
            "vapid t={}, k={}",
            self.token(audience, subject, now)?,
            self.public_key_base64()
        ))
    }
}

impl Clone for VapidKey {
    fn clone(&self) -> Self {
        VapidKey::from_bytes(&self.pkcs8).expect("a valid key stays valid")
    }
}

impl fmt::Debug for VapidKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VapidKey(public {})", self.public_key_base64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    #[test]
    fn generates_round_trips_and_signs_raw_es256() {
        let key = VapidKey::generate();
        let again = VapidKey::from_bytes(&key.to_bytes()).unwrap();
        assert_eq!(again.public_key(), key.public_key());
        assert_eq!(key.public_key()[0], 4);
        assert!(VapidKey::from_bytes(b"not a key").is_err());
        assert!(!format!("{key:?}").contains(&URL_SAFE_NO_PAD.encode(key.to_bytes())));

        let now = SystemTime::now();
        let header = key
            .authorization("https://push.example.net", "mailto:ops@example.com", now)
            .unwrap();
        let rest = header.strip_prefix("vapid t=").unwrap();
        let (jwt, k) = rest.split_once(", k=").unwrap();
        assert_eq!(k, key.public_key_base64());
        let sig = URL_SAFE_NO_PAD
            .decode(jwt.rsplit('.').next().unwrap())
            .unwrap();
        assert_eq!(sig.len(), 64, "raw r||s, not DER");

        let x = URL_SAFE_NO_PAD.encode(&key.public_key()[1..33]);
        let y = URL_SAFE_NO_PAD.encode(&key.public_key()[33..]);
        let dk = DecodingKey::from_ec_components(&x, &y).unwrap();
        let mut v = Validation::new(Algorithm::ES256);
        v.set_audience(&["https://push.example.net"]);
        v.set_required_spec_claims(&["exp", "aud", "sub"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(jwt, &dk, &v).unwrap();
        let exp = data.claims["exp"].as_u64().unwrap();
        assert_eq!(exp, unix_secs(now) + 12 * 3600);
        assert_eq!(data.claims["sub"], "mailto:ops@example.com");
    }
}
