//! Authentication of `hello` tokens: keepwire's own tokens (`kw_…`, stored
//! hashed) and JSON Web Tokens issued by the app's auth server (HS256 with a
//! shared secret; RS256/ES256 with keys from a JWKS file or URL).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde::Deserialize;
use tokio::sync::{Mutex, RwLock};
use tokio::time::Instant;

use crate::store::{AuthFailure, AuthedUser, Store, StoreError};

/// Where JWKS keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    /// An `http(s)://` URL, fetched with caching.
    Url(String),
    /// A file holding a JWKS document (re-read on refresh).
    File(PathBuf),
}

/// Verification of app-issued JSON Web Tokens.
#[derive(Debug, Clone)]
pub struct JwtConfig {
    /// Shared secret for HS256 tokens.
    pub hs256_secret: Option<Vec<u8>>,
    /// Keys for RS256/ES256 tokens.
    pub jwks: Option<JwksSource>,
    /// Required `aud`, when set.
    pub audience: Option<String>,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Clock skew allowed on `exp`, `nbf` and `iat`.
    pub leeway: Duration,
    /// The claim that names the device, if tokens carry one.
    pub device_claim: String,
    /// Least time between two JWKS fetches (an unknown `kid` triggers one), so
    /// a flood of bad tokens cannot make the relay hammer the URL.
    pub jwks_refresh_floor: Duration,
    /// Keys older than this are fetched again on the next token.
    pub jwks_max_age: Duration,
}

impl Default for JwtConfig {
    fn default() -> Self {
        JwtConfig {
            hs256_secret: None,
            jwks: None,
            audience: None,
            issuer: None,
            leeway: Duration::from_secs(30),
            device_claim: "device".into(),
            jwks_refresh_floor: Duration::from_secs(30),
            jwks_max_age: Duration::from_secs(3600),
        }
    }
}

/// A verified app-issued token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedJwt {
    /// The user (`sub`).
    pub user: String,
    /// The device named by the device claim, if any.
    pub device: Option<String>,
    /// `iat` in ms, if present.
    pub issued_at_ms: Option<i64>,
    /// `exp` in ms.
    pub expires_at_ms: i64,
}

/// Why a JWT was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Past its `exp` (plus leeway): the client should refresh it.
    #[error("token expired")]
    Expired,
    /// Bad signature, unknown key, wrong audience or issuer, not yet valid, malformed.
    #[error("invalid token: {0}")]
    Invalid(String),
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: i64,
    #[serde(default)]
    iat: Option<i64>,
    #[serde(flatten)]
    extra: HashMap<String, serde_json::Value>,
}

struct KeyCache {
    keys: HashMap<String, (DecodingKey, Algorithm)>,
    fetched: Option<Instant>,
    attempted: Option<Instant>,
}

/// Verifies JWTs against the configured secret and keys.
pub struct JwtVerifier {
    cfg: JwtConfig,
    cache: RwLock<KeyCache>,
    refresh_lock: Mutex<()>,
    http: reqwest::Client,
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl JwtVerifier {
    /// A verifier for `cfg`.
    pub fn new(cfg: JwtConfig) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_default();
        JwtVerifier {
            cfg,
            cache: RwLock::new(KeyCache {
                keys: HashMap::new(),
                fetched: None,
                attempted: None,
            }),
            refresh_lock: Mutex::new(()),
            http,
        }
    }

    /// Whether `token` looks like a JWT (three dot-separated parts).
    pub fn looks_like_jwt(token: &str) -> bool {
        token.split('.').count() == 3 && !token.starts_with("kw_")
    }

    /// Verifies a token.
    pub async fn verify(&self, token: &str) -> Result<VerifiedJwt, JwtError> {
        let header = decode_header(token).map_err(|e| JwtError::Invalid(e.to_string()))?;
        let (key, alg) = match header.alg {
            Algorithm::HS256 => match &self.cfg.hs256_secret {
                Some(secret) => (DecodingKey::from_secret(secret), Algorithm::HS256),
                None => return Err(JwtError::Invalid("HS256 tokens are not accepted".into())),
            },
            Algorithm::RS256 | Algorithm::ES256 => {
                let kid = header
                    .kid
                    .clone()
                    .ok_or_else(|| JwtError::Invalid("no kid in the header".into()))?;
                self.key(&kid).await?
            }
            other => {
                return Err(JwtError::Invalid(format!(
                    "algorithm {other:?} is not accepted"
                )));
            }
        };
        // The key decides the algorithm: no confusion between HMAC and public keys.
        if alg != header.alg {
            return Err(JwtError::Invalid(
                "the algorithm does not match the key".into(),
            ));
        }
        let mut v = Validation::new(alg);
        v.leeway = self.cfg.leeway.as_secs();
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp", "sub"]);
        match &self.cfg.audience {
            Some(aud) => v.set_audience(&[aud]),
            None => v.validate_aud = false,
        }
        if let Some(iss) = &self.cfg.issuer {
            v.set_issuer(&[iss]);
        }
        let data = decode::<Claims>(token, &key, &v).map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => JwtError::Expired,
            _ => JwtError::Invalid(e.to_string()),
        })?;
        let c = data.claims;
        let leeway = self.cfg.leeway.as_secs() as i64;
        if c.iat.is_some_and(|iat| iat > now_unix() + leeway) {
            return Err(JwtError::Invalid("issued in the future".into()));
        }
        let device = match c.extra.get(&self.cfg.device_claim) {
            None => None,
            Some(serde_json::Value::String(d)) => Some(d.clone()),
            Some(_) => return Err(JwtError::Invalid("the device claim is not a string".into())),
        };
        Ok(VerifiedJwt {
            user: c.sub,
            device,
            issued_at_ms: c.iat.map(|s| s.saturating_mul(1000)),
            expires_at_ms: c.exp.saturating_mul(1000),
        })
    }

    async fn key(&self, kid: &str) -> Result<(DecodingKey, Algorithm), JwtError> {
        {
            let cache = self.cache.read().await;
            let fresh = cache
                .fetched
                .is_some_and(|t| t.elapsed() < self.cfg.jwks_max_age);
            if fresh && let Some(k) = cache.keys.get(kid) {
                return Ok(k.clone());
            }
        }
        // Unknown kid or stale keys: refresh, at most once per floor.
        self.refresh().await;
        self.cache
            .read()
            .await
            .keys
            .get(kid)
            .cloned()
            .ok_or_else(|| JwtError::Invalid(format!("unknown key id {kid:?}")))
    }

    async fn refresh(&self) {
        let _one = self.refresh_lock.lock().await;
        {
            let cache = self.cache.read().await;
            if cache
                .attempted
                .is_some_and(|t| t.elapsed() < self.cfg.jwks_refresh_floor)
            {
                return;
            }
        }
        self.cache.write().await.attempted = Some(Instant::now());
        let fetched = match &self.cfg.jwks {
            None => return,
            Some(JwksSource::File(p)) => tokio::fs::read(p).await.map_err(|e| e.to_string()),
            Some(JwksSource::Url(u)) => match self.http.get(u).send().await {
                Ok(r) if r.status().is_success() => r
                    .bytes()
                    .await
                    .map(|b| b.to_vec())
                    .map_err(|e| e.to_string()),
                Ok(r) => Err(format!("HTTP {}", r.status())),
                Err(e) => Err(e.to_string()),
            },
        };
        let set =
            fetched.and_then(|b| serde_json::from_slice::<JwkSet>(&b).map_err(|e| e.to_string()));
        match set {
            Ok(set) => {
                let mut keys = HashMap::new();
                for jwk in &set.keys {
                    let Some(kid) = jwk.common.key_id.clone() else {
                        continue;
                    };
                    let alg = match &jwk.algorithm {
                        AlgorithmParameters::RSA(_) => Algorithm::RS256,
                        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
                            Algorithm::ES256
                        }
                        _ => continue,
                    };
                    if let Ok(k) = DecodingKey::from_jwk(jwk) {
                        keys.insert(kid, (k, alg));
                    }
                }
                tracing::info!(target: "keepwire::auth", keys = keys.len(), "JWKS refreshed");
                let mut cache = self.cache.write().await;
                cache.keys = keys;
                cache.fetched = Some(Instant::now());
            }
            Err(e) => {
                tracing::warn!(target: "keepwire::auth", error = %e, "fetching the JWKS failed")
            }
        }
    }
}

/// Checks `hello` tokens of either kind and the device's standing.
pub struct Authenticator {
    store: Arc<dyn Store>,
    jwt: Option<JwtVerifier>,
}

impl Authenticator {
    /// An authenticator over the store's tokens and, if configured, JWTs.
    pub fn new(store: Arc<dyn Store>, jwt: Option<JwtConfig>) -> Self {
        Authenticator {
            store,
            jwt: jwt.map(JwtVerifier::new),
        }
    }

    /// Authenticates `token` for `device`; returns the user and the device id
    /// to use (a token's device claim must match the hello's device).
    pub async fn authenticate(&self, token: &str, device: &str) -> Result<AuthedUser, StoreError> {
        let user = match &self.jwt {
            Some(jwt) if JwtVerifier::looks_like_jwt(token) => {
                let v = jwt.verify(token).await.map_err(|e| {
                    tracing::info!(target: "keepwire::auth", error = %e, "token refused");
                    StoreError::Auth(match e {
                        JwtError::Expired => AuthFailure::Expired,
                        JwtError::Invalid(_) => AuthFailure::Unknown,
                    })
                })?;
                if v.device.as_deref().is_some_and(|d| d != device) {
                    return Err(StoreError::Auth(AuthFailure::Unknown));
                }
                let id = self
                    .store
                    .authenticate_external(&v.user, v.issued_at_ms)
                    .await?;
                // Accepted within the leeway, so the connection lives until then too.
                let leeway = jwt.cfg.leeway.as_millis() as i64;
                AuthedUser {
                    id,
                    name: v.user,
                    token_id: None,
                    expires_at_ms: v.expires_at_ms.saturating_add(leeway),
                }
            }
            _ => self.store.authenticate(token).await?,
        };
        if self.store.device_revoked(user.id, device).await? {
            return Err(StoreError::Auth(AuthFailure::DeviceRevoked));
        }
        Ok(user)
    }
}
