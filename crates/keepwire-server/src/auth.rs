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

/// The claims keepwire reads. The time claims are JSON numbers (RFC 7519
/// NumericDate): anything else (a string `nbf`, say) fails to deserialize,
/// so a malformed time claim refuses the token instead of being skipped.
#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: serde_json::Number,
    #[serde(default)]
    nbf: Option<serde_json::Number>,
    #[serde(default)]
    iat: Option<serde_json::Number>,
    #[serde(flatten)]
    extra: HashMap<String, serde_json::Value>,
}

/// A NumericDate in whole seconds (fractions are cut; out of range saturates).
fn seconds(n: &serde_json::Number) -> Result<i64, JwtError> {
    if let Some(i) = n.as_i64() {
        return Ok(i);
    }
    match n.as_f64() {
        Some(f) if f.is_finite() => Ok(f as i64),
        _ => Err(JwtError::Invalid("a time claim is out of range".into())),
    }
}

/// The JOSE header fields keepwire checks itself (the rest is
/// `jsonwebtoken`'s `Header`).
#[derive(Deserialize)]
struct JoseHeader {
    #[serde(default)]
    crit: Option<serde_json::Value>,
}

/// Longest piece of attacker-controlled text (a `kid`, a parse error quoting
/// a claim) that goes into an error message or a log line.
const MAX_LOGGED_CHARS: usize = 64;

/// `s` cut to [`MAX_LOGGED_CHARS`], with control characters escaped, for logs.
pub(crate) fn loggable(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(MAX_LOGGED_CHARS)
        .flat_map(char::escape_debug)
        .collect();
    if s.chars().nth(MAX_LOGGED_CHARS).is_some() {
        out.push_str("...");
    }
    out
}

/// Refuses a JWS whose header has a `crit` member: it names extensions the
/// recipient must understand, and keepwire understands none (RFC 7515
/// §4.1.11: a recipient that does not understand them must reject the JWS).
fn check_critical(token: &str) -> Result<(), JwtError> {
    use base64::Engine as _;
    let head = token.split('.').next().unwrap_or("");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(head)
        .map_err(|_| JwtError::Invalid("the header is not base64url".into()))?;
    let h: JoseHeader = serde_json::from_slice(&bytes)
        .map_err(|_| JwtError::Invalid("the header is not a JSON object".into()))?;
    match h.crit {
        None => Ok(()),
        Some(_) => Err(JwtError::Invalid(
            "the header names critical extensions (crit), which keepwire does not support".into(),
        )),
    }
}

/// Whether a JWKS URL is acceptable: `https://`, or `http://` to a loopback
/// address (a sidecar on the same machine). Keys fetched in clear text over
/// a network could be replaced by anyone on the path, who could then mint
/// tokens for every user.
pub fn check_jwks_url(url: &str) -> Result<(), String> {
    let u = reqwest::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    match u.scheme() {
        "https" => Ok(()),
        "http" if is_loopback_host(&u) => Ok(()),
        "http" => Err(format!(
            "{url:?} is plain http: JWKS keys must come over https (http only to a loopback address)"
        )),
        other => Err(format!("{url:?}: the scheme must be https, not {other}")),
    }
}

fn is_loopback_host(u: &reqwest::Url) -> bool {
    let Some(host) = u.host_str() else {
        return false;
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => host.eq_ignore_ascii_case("localhost"),
    }
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
            // A redirect may not lead the key fetch to plain http.
            .redirect(reqwest::redirect::Policy::custom(|a| {
                if a.previous().len() >= 5 || check_jwks_url(a.url().as_str()).is_err() {
                    a.stop()
                } else {
                    a.follow()
                }
            }))
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
        let header =
            decode_header(token).map_err(|e| JwtError::Invalid(loggable(&e.to_string())))?;
        check_critical(token)?;
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
        // A configured audience or issuer is required, not only checked when
        // present: otherwise a token minted by the same auth server for
        // another service (no `aud`, or a non-string one) would open a session.
        let mut required = vec!["exp", "sub"];
        match &self.cfg.audience {
            Some(aud) => {
                v.set_audience(&[aud]);
                required.push("aud");
            }
            None => v.validate_aud = false,
        }
        if let Some(iss) = &self.cfg.issuer {
            v.set_issuer(&[iss]);
            required.push("iss");
        }
        v.set_required_spec_claims(&required);
        let data = decode::<Claims>(token, &key, &v).map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => JwtError::Expired,
            _ => JwtError::Invalid(loggable(&e.to_string())),
        })?;
        let c = data.claims;
        let exp = seconds(&c.exp)?;
        let leeway = self.cfg.leeway.as_secs() as i64;
        let now = now_unix();
        // jsonwebtoken checked these too, but skips a claim it cannot read
        // as a number; `Claims` refused those, and this is the check itself.
        if exp < now.saturating_sub(leeway) {
            return Err(JwtError::Expired);
        }
        if let Some(nbf) = &c.nbf
            && seconds(nbf)? > now.saturating_add(leeway)
        {
            return Err(JwtError::Invalid("not yet valid (nbf)".into()));
        }
        let iat = c.iat.as_ref().map(seconds).transpose()?;
        if iat.is_some_and(|iat| iat > now.saturating_add(leeway)) {
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
            issued_at_ms: iat.map(|s| s.saturating_mul(1000)),
            expires_at_ms: exp.saturating_mul(1000),
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
            .ok_or_else(|| JwtError::Invalid(format!("unknown key id \"{}\"", loggable(kid))))
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
            Some(JwksSource::Url(u)) => match check_jwks_url(u) {
                Err(e) => Err(e),
                Ok(()) => match self.http.get(u).send().await {
                    Ok(r) if r.status().is_success() => read_capped(r, MAX_JWKS_BYTES).await,
                    Ok(r) => Err(format!("HTTP {}", r.status())),
                    Err(e) => Err(e.to_string()),
                },
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

/// Largest JWKS document read (a real one is a few KiB).
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// A response body, refused once it grows past `max` bytes.
async fn read_capped(mut r: reqwest::Response, max: usize) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = r.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > max {
            return Err(format!("the JWKS document is larger than {max} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
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
                    // Debug, not info: anyone can send bad tokens, as fast as they
                    // like (the close-code metric counts them). Messages quote
                    // token contents only cut and escaped (`loggable`).
                    tracing::debug!(target: "keepwire::auth", error = %e, "token refused");
                    StoreError::Auth(match e {
                        JwtError::Expired => AuthFailure::Expired,
                        JwtError::Invalid(_) => AuthFailure::Unknown,
                    })
                })?;
                if v.device.as_deref().is_some_and(|d| d != device) {
                    return Err(StoreError::Auth(AuthFailure::Unknown));
                }
                // Revocation compares `iat` with the time of the user's last
                // "revoke all tokens". A token may claim an `iat` up to the
                // leeway in the future (its issuer's clock runs ahead), so a
                // token minted just before a revocation could claim a later
                // `iat` and survive it. Count a token as issued at `iat -
                // leeway`, the earliest time it may have been minted: every
                // token minted before a revocation is refused after it (and so
                // are tokens minted within the leeway after it).
                let leeway = jwt.cfg.leeway.as_millis() as i64;
                let id = self
                    .store
                    .authenticate_external(
                        &v.user,
                        v.issued_at_ms.map(|t| t.saturating_sub(leeway)),
                    )
                    .await?;
                // Accepted within the leeway, so the connection lives until then too.
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

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::{Value, json};

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-unit";

    fn verifier(audience: Option<&str>, issuer: Option<&str>) -> JwtVerifier {
        JwtVerifier::new(JwtConfig {
            hs256_secret: Some(SECRET.to_vec()),
            audience: audience.map(Into::into),
            issuer: issuer.map(Into::into),
            ..Default::default()
        })
    }

    fn sign(claims: &Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap()
    }

    /// A token with a hand-made header, signed with the shared secret.
    fn sign_with_header(header: &Value, claims: &Value) -> String {
        let b64 = |v: &Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string().as_bytes())
        };
        let input = format!("{}.{}", b64(header), b64(claims));
        let sig = jsonwebtoken::crypto::sign(
            input.as_bytes(),
            &EncodingKey::from_secret(SECRET),
            Algorithm::HS256,
        )
        .unwrap();
        format!("{input}.{sig}")
    }

    fn good() -> Value {
        let now = now_unix();
        json!({"sub": "zoe", "exp": now + 60, "iat": now, "aud": "chat", "iss": "https://auth"})
    }

    fn without(key: &str) -> Value {
        let mut c = good();
        c.as_object_mut().unwrap().remove(key);
        c
    }

    fn with(key: &str, v: Value) -> Value {
        let mut c = good();
        c[key] = v;
        c
    }

    #[tokio::test]
    async fn a_configured_audience_and_issuer_are_required() {
        let v = verifier(Some("chat"), Some("https://auth"));
        assert!(v.verify(&sign(&good())).await.is_ok());
        for (what, claims) in [
            ("no aud", without("aud")),
            ("numeric aud", with("aud", json!(42))),
            ("null aud", with("aud", Value::Null)),
            ("wrong aud", with("aud", json!("other"))),
            ("no iss", without("iss")),
            ("numeric iss", with("iss", json!(7))),
            ("wrong iss", with("iss", json!("https://evil"))),
        ] {
            assert!(
                matches!(v.verify(&sign(&claims)).await, Err(JwtError::Invalid(_))),
                "{what} must be refused"
            );
        }
        // A list naming the audience is fine (RFC 7519 §4.1.3).
        assert!(
            v.verify(&sign(&with("aud", json!(["x", "chat"]))))
                .await
                .is_ok()
        );
        // Not configured: not required.
        let open = verifier(None, None);
        assert!(open.verify(&sign(&without("aud"))).await.is_ok());
        assert!(open.verify(&sign(&without("iss"))).await.is_ok());
    }

    #[tokio::test]
    async fn time_claims_must_be_numbers() {
        let v = verifier(None, None);
        let now = now_unix();
        for (what, claims) in [
            ("string nbf", with("nbf", json!((now + 3600).to_string()))),
            ("string exp", with("exp", json!((now + 3600).to_string()))),
            ("string iat", with("iat", json!(now.to_string()))),
            ("object nbf", with("nbf", json!({"t": now}))),
            ("boolean exp", with("exp", json!(true))),
            ("no exp", without("exp")),
        ] {
            assert!(
                matches!(v.verify(&sign(&claims)).await, Err(JwtError::Invalid(_))),
                "{what} must be refused"
            );
        }
        // Numeric dates may have fractions (RFC 7519 §2).
        assert!(
            v.verify(&sign(&with("exp", json!(now as f64 + 60.5))))
                .await
                .is_ok()
        );
        assert!(v.verify(&sign(&with("nbf", json!(now - 10)))).await.is_ok());
        // A numeric nbf in the future is checked.
        assert!(matches!(
            v.verify(&sign(&with("nbf", json!(now + 3600)))).await,
            Err(JwtError::Invalid(_))
        ));
        assert_eq!(
            v.verify(&sign(&with("exp", json!(now - 3600)))).await,
            Err(JwtError::Expired)
        );
    }

    #[tokio::test]
    async fn critical_header_extensions_are_refused() {
        let v = verifier(None, None);
        let plain = json!({"alg": "HS256", "typ": "JWT"});
        assert!(v.verify(&sign_with_header(&plain, &good())).await.is_ok());
        for crit in [json!(["exp"]), json!(["b64"]), json!([]), json!("x")] {
            let h = json!({"alg": "HS256", "typ": "JWT", "crit": crit});
            let r = v.verify(&sign_with_header(&h, &good())).await;
            assert!(
                matches!(&r, Err(JwtError::Invalid(m)) if m.contains("crit")),
                "crit {crit}: {r:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_long_kid_is_cut_in_the_refusal() {
        let v = JwtVerifier::new(JwtConfig {
            jwks: Some(JwksSource::File("/nonexistent/jwks.json".into())),
            ..Default::default()
        });
        let kid = "k\n".repeat(5000);
        let h = json!({"alg": "ES256", "kid": kid});
        let token = format!(
            "{}.{}.c2ln",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(h.to_string()),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(good().to_string()),
        );
        let Err(JwtError::Invalid(msg)) = v.verify(&token).await else {
            panic!("an unknown kid must be refused");
        };
        assert!(msg.len() < 200, "{} bytes: {msg}", msg.len());
        assert!(!msg.contains('\n'), "control characters escaped: {msg}");
    }

    #[test]
    fn loggable_cuts_and_escapes() {
        assert_eq!(loggable("k1"), "k1");
        assert_eq!(loggable("a\u{1b}[31m"), "a\\u{1b}[31m");
        let long = loggable(&"x".repeat(10_000));
        assert_eq!(long.len(), MAX_LOGGED_CHARS + 3);
    }

    #[test]
    fn jwks_urls_must_be_https_except_on_loopback() {
        for ok in [
            "https://auth.example/.well-known/jwks.json",
            "http://127.0.0.1:8080/jwks.json",
            "http://127.9.9.9/jwks.json",
            "http://localhost/jwks.json",
            "http://[::1]:9000/jwks",
        ] {
            assert_eq!(check_jwks_url(ok), Ok(()), "{ok}");
        }
        for bad in [
            "http://auth.example/jwks.json",
            "http://10.0.0.1/jwks.json",
            "http://localhost.evil.example/jwks.json",
            "http://127.0.0.1.nip.io/jwks.json",
            "ftp://auth.example/jwks.json",
            "file:///etc/jwks.json",
            "not a url",
        ] {
            assert!(check_jwks_url(bad).is_err(), "{bad}");
        }
    }
}
