//! JWT authentication and authorization, following RFC 8725 (JWT best current practices).
//!
//! - The accepted algorithms are an explicit allow-list chosen by the key material
//!   (HS256 from a secret file today). The header's `alg` is checked against that list
//!   before any cryptography runs, so `alg=none` and algorithm-confusion tokens are refused.
//! - `exp`, `nbf`, `iss`, `aud` and `sub` are required; `exp`/`nbf` are checked with a
//!   small leeway ([`DEFAULT_LEEWAY_SECS`]).
//! - A `crit` header is refused (we understand no extensions), and header-supplied key
//!   material (`jku`, `jwk`, `x5u`, `x5c`) is never used.
//! - The key lookup is a [`KeySet`] so that RS256/ES256 from a PEM file, or a JWKS with
//!   `kid`-based rotation, slot in without touching the validation path.
//!
//! Tokens are never logged: [`AuthError`] carries only a reason.

use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tonic::metadata::MetadataMap;

/// Clock-skew leeway for `exp` and `nbf`, in seconds.
pub const DEFAULT_LEEWAY_SECS: u64 = 30;
/// Default `iss` and `aud`.
pub const DEFAULT_ISSUER: &str = "skv";
/// Default `aud`.
pub const DEFAULT_AUDIENCE: &str = "skv";
/// Longest namespace, in bytes (the internal prefix stores its length in a u16, we allow 255).
pub const MAX_NAMESPACE_LEN: usize = skv_common::keys::MAX_NAMESPACE_LEN;
/// Longest `authorization` header value we look at.
const MAX_TOKEN_LEN: usize = 16 * 1024;

/// What a token allows. `Read < Write < Admin`: a higher role includes the lower ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Read,
    Write,
    Admin,
}

impl Role {
    /// Whether a token with this role may do something that needs `needed`.
    pub fn allows(self, needed: Role) -> bool {
        self >= needed
    }

    /// Lowercase name, as in the token.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "read" => Ok(Role::Read),
            "write" => Ok(Role::Write),
            "admin" => Ok(Role::Admin),
            other => Err(format!("unknown role {other:?} (read, write or admin)")),
        }
    }
}

/// The claims skv reads from a token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Who the token was issued to (logged, never used for access decisions).
    pub sub: String,
    /// The tenant namespace, 1..=255 bytes.
    pub ns: String,
    pub role: Role,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// Not before, Unix seconds.
    pub nbf: u64,
    /// Issued at, Unix seconds.
    #[serde(default)]
    pub iat: u64,
    pub iss: String,
    pub aud: String,
}

impl Claims {
    /// Claims valid from now for `ttl`, with the default issuer and audience.
    pub fn new(sub: impl Into<String>, ns: impl Into<String>, role: Role, ttl: Duration) -> Self {
        let now = unix_now();
        Claims {
            sub: sub.into(),
            ns: ns.into(),
            role,
            exp: now.saturating_add(ttl.as_secs()),
            nbf: now,
            iat: now,
            iss: DEFAULT_ISSUER.to_string(),
            aud: DEFAULT_AUDIENCE.to_string(),
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Mints an HS256 token (used by `skvctl token mint` and tests).
pub fn mint_hs256(secret: &[u8], claims: &Claims) -> Result<String, jsonwebtoken::errors::Error> {
    let mut header = Header::new(Algorithm::HS256);
    header.typ = Some("JWT".to_string());
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(secret))
}

/// Reads an HS256 secret file the way the proxy does: raw bytes with trailing
/// whitespace (a final newline) removed. Refuses an empty secret.
/// `skvctl token mint` should use this so both sides agree on the key.
pub fn load_hs256_secret(path: &Path) -> anyhow::Result<Vec<u8>> {
    let mut bytes =
        std::fs::read(path).map_err(|e| anyhow::anyhow!("reading JWT secret file {}: {e}", path.display()))?;
    while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
        bytes.pop();
    }
    anyhow::ensure!(!bytes.is_empty(), "JWT secret file {} is empty", path.display());
    Ok(bytes)
}

/// Why a request was refused. [`AuthError::reason`] is the metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("malformed token")]
    Malformed,
    #[error("token algorithm not allowed")]
    BadAlgorithm,
    #[error("token signature invalid")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("token issuer not accepted")]
    WrongIssuer,
    #[error("token audience not accepted")]
    WrongAudience,
    #[error("token lacks a required claim")]
    MissingClaim,
    #[error("token namespace invalid")]
    BadNamespace,
    #[error("token key id unknown")]
    UnknownKey,
    #[error("role does not allow this operation")]
    Forbidden,
}

impl AuthError {
    /// Short label for `skv_proxy_auth_denials_total{reason}`.
    pub fn reason(self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed => "malformed",
            AuthError::BadAlgorithm => "bad_algorithm",
            AuthError::BadSignature => "bad_signature",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::WrongIssuer => "wrong_issuer",
            AuthError::WrongAudience => "wrong_audience",
            AuthError::MissingClaim => "missing_claim",
            AuthError::BadNamespace => "bad_namespace",
            AuthError::UnknownKey => "unknown_key",
            AuthError::Forbidden => "forbidden",
        }
    }

    /// UNAUTHENTICATED for every token problem, PERMISSION_DENIED for a role too weak.
    pub fn to_status(self) -> tonic::Status {
        match self {
            AuthError::Forbidden => tonic::Status::permission_denied(self.to_string()),
            _ => tonic::Status::unauthenticated(self.to_string()),
        }
    }
}

impl From<AuthError> for tonic::Status {
    fn from(e: AuthError) -> Self {
        e.to_status()
    }
}

/// Where verification keys come from. Each variant fixes its own algorithm allow-list.
enum KeySet {
    /// One shared secret, HS256 only.
    Hs256(DecodingKey),
    // Later: `Pem { alg: Algorithm, key: DecodingKey }` (RS256 or ES256) and
    // `Jwks(HashMap<String /* kid */, (Algorithm, DecodingKey)>)`, reloaded on change.
}

impl KeySet {
    fn allowed(&self) -> &'static [Algorithm] {
        match self {
            KeySet::Hs256(_) => &[Algorithm::HS256],
        }
    }

    /// The key for a token whose header names `alg` (already allow-listed) and `kid`.
    fn key_for(&self, _alg: Algorithm, _kid: Option<&str>) -> Result<&DecodingKey, AuthError> {
        match self {
            KeySet::Hs256(k) => Ok(k),
        }
    }
}

/// Verifies tokens and checks roles. Cheap to share behind an `Arc`.
pub struct Verifier {
    keys: KeySet,
    issuer: String,
    audience: String,
    leeway: u64,
    /// Tokens that verified, with their claims: a hit skips the signature and JSON work.
    /// Only successes are cached, `exp` is re-checked on every hit, and the cache must be
    /// cleared whenever the key set changes (JWKS rotation).
    cache: parking_lot::RwLock<std::collections::HashMap<Box<str>, Claims>>,
}

/// Most cached tokens (the cache is cleared when full).
const TOKEN_CACHE_ENTRIES: usize = 4096;
/// Longest token worth caching.
const TOKEN_CACHE_MAX_LEN: usize = 4096;

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithms", &self.keys.allowed())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct RawHeader {
    alg: Option<serde_json::Value>,
    kid: Option<String>,
    crit: Option<serde_json::Value>,
}

impl Verifier {
    /// HS256 with a shared secret.
    pub fn hs256(secret: &[u8], issuer: impl Into<String>, audience: impl Into<String>) -> Self {
        Verifier {
            keys: KeySet::Hs256(DecodingKey::from_secret(secret)),
            issuer: issuer.into(),
            audience: audience.into(),
            leeway: DEFAULT_LEEWAY_SECS,
            cache: Default::default(),
        }
    }

    /// Overrides the `exp`/`nbf` leeway (seconds).
    pub fn with_leeway(mut self, secs: u64) -> Self {
        self.leeway = secs;
        self
    }

    /// Verifies a compact JWS and returns its claims.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        if let Some(c) = self.cache.read().get(token) {
            // Verified before; only time can have changed its validity (nbf only passes).
            if unix_now() > c.exp.saturating_add(self.leeway) {
                return Err(AuthError::Expired);
            }
            return Ok(c.clone());
        }
        let claims = self.verify_uncached(token)?;
        if token.len() <= TOKEN_CACHE_MAX_LEN {
            let mut cache = self.cache.write();
            if cache.len() >= TOKEN_CACHE_ENTRIES {
                cache.clear();
            }
            cache.insert(token.into(), claims.clone());
        }
        Ok(claims)
    }

    fn verify_uncached(&self, token: &str) -> Result<Claims, AuthError> {
        if token.is_empty() || token.len() > MAX_TOKEN_LEN {
            return Err(AuthError::Malformed);
        }
        let mut parts = token.split('.');
        let (Some(h), Some(_p), Some(_s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(AuthError::Malformed);
        };
        // Check the header ourselves first: the allow-list decides, not the token.
        let header_json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(h)
            .map_err(|_| AuthError::Malformed)?;
        let raw: RawHeader = serde_json::from_slice(&header_json).map_err(|_| AuthError::Malformed)?;
        let alg_name = match raw.alg {
            Some(serde_json::Value::String(s)) => s,
            _ => return Err(AuthError::BadAlgorithm),
        };
        let alg = self
            .keys
            .allowed()
            .iter()
            .copied()
            .find(|a| format!("{a:?}") == alg_name)
            .ok_or(AuthError::BadAlgorithm)?;
        if raw.crit.is_some() {
            return Err(AuthError::Malformed);
        }
        let key = self.keys.key_for(alg, raw.kid.as_deref())?;

        let mut validation = Validation::new(alg);
        validation.leeway = self.leeway;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = true;
        validation.set_issuer(&[self.issuer.as_str()]);
        validation.set_audience(&[self.audience.as_str()]);
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);

        let data = jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(|e| match e.kind() {
            ErrorKind::InvalidSignature => AuthError::BadSignature,
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
            ErrorKind::InvalidAudience => AuthError::WrongAudience,
            ErrorKind::MissingRequiredClaim(_) => AuthError::MissingClaim,
            ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm | ErrorKind::UnsupportedAlgorithm => {
                AuthError::BadAlgorithm
            }
            _ => AuthError::Malformed,
        })?;
        let claims = data.claims;
        if claims.ns.is_empty() || claims.ns.len() > MAX_NAMESPACE_LEN {
            return Err(AuthError::BadNamespace);
        }
        Ok(claims)
    }

    /// Extracts `authorization: Bearer <jwt>`, verifies it and checks that its role allows `needed`.
    pub fn authorize(&self, metadata: &MetadataMap, needed: Role) -> Result<Claims, AuthError> {
        let token = bearer_token(metadata)?;
        let claims = self.verify(token)?;
        if !claims.role.allows(needed) {
            return Err(AuthError::Forbidden);
        }
        Ok(claims)
    }
}

/// The token of an `authorization: Bearer <jwt>` header.
pub fn bearer_token(metadata: &MetadataMap) -> Result<&str, AuthError> {
    let value = metadata.get("authorization").ok_or(AuthError::Missing)?;
    let value = value.to_str().map_err(|_| AuthError::Malformed)?;
    let (scheme, token) = value.trim().split_once(' ').ok_or(AuthError::Malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::Malformed);
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(AuthError::Missing);
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn verifier() -> Verifier {
        Verifier::hs256(SECRET, "skv", "skv")
    }

    fn claims(role: Role) -> Claims {
        Claims::new("alice", "tenant-a", role, Duration::from_secs(600))
    }

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    }

    fn md(token: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", format!("Bearer {token}").parse().unwrap());
        m
    }

    #[test]
    fn valid_token_round_trips() {
        let c = claims(Role::Write);
        let t = mint_hs256(SECRET, &c).unwrap();
        assert_eq!(verifier().verify(&t).unwrap(), c);
        assert_eq!(verifier().authorize(&md(&t), Role::Read).unwrap().ns, "tenant-a");
        assert_eq!(verifier().authorize(&md(&t), Role::Write).unwrap().role, Role::Write);
    }

    #[test]
    fn role_checks() {
        let t = mint_hs256(SECRET, &claims(Role::Read)).unwrap();
        assert_eq!(verifier().authorize(&md(&t), Role::Write), Err(AuthError::Forbidden));
        assert_eq!(AuthError::Forbidden.to_status().code(), tonic::Code::PermissionDenied);
        let t = mint_hs256(SECRET, &claims(Role::Admin)).unwrap();
        assert!(verifier().authorize(&md(&t), Role::Write).is_ok());
        assert!(Role::Admin.allows(Role::Read));
        assert!(!Role::Read.allows(Role::Admin));
        assert_eq!(serde_json::to_string(&Role::Write).unwrap(), "\"write\"");
    }

    #[test]
    fn missing_and_malformed() {
        let v = verifier();
        assert_eq!(v.authorize(&MetadataMap::new(), Role::Read), Err(AuthError::Missing));
        let mut m = MetadataMap::new();
        m.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(v.authorize(&m, Role::Read), Err(AuthError::Malformed));
        m.insert("authorization", "Bearer".parse().unwrap());
        assert_eq!(v.authorize(&m, Role::Read), Err(AuthError::Malformed));
        for bad in ["", "abc", "a.b", "a.b.c.d", "!!!.x.y", "e30.e30.sig"] {
            let err = v.verify(bad).unwrap_err();
            assert!(
                matches!(err, AuthError::Malformed | AuthError::BadAlgorithm),
                "{bad}: {err:?}"
            );
            assert_eq!(err.to_status().code(), tonic::Code::Unauthenticated);
        }
    }

    #[test]
    fn expired_and_not_yet_valid() {
        let now = unix_now();
        let mut c = claims(Role::Read);
        c.exp = now - 120;
        let t = mint_hs256(SECRET, &c).unwrap();
        assert_eq!(verifier().verify(&t), Err(AuthError::Expired));
        // Within the 30 s leeway: accepted.
        c.exp = now - 10;
        let t = mint_hs256(SECRET, &c).unwrap();
        assert!(verifier().verify(&t).is_ok());
        let mut c = claims(Role::Read);
        c.nbf = now + 3600;
        let t = mint_hs256(SECRET, &c).unwrap();
        assert_eq!(verifier().verify(&t), Err(AuthError::NotYetValid));
    }

    #[test]
    fn issuer_audience_signature() {
        let mut c = claims(Role::Read);
        c.iss = "mallory".into();
        assert_eq!(
            verifier().verify(&mint_hs256(SECRET, &c).unwrap()),
            Err(AuthError::WrongIssuer)
        );
        let mut c = claims(Role::Read);
        c.aud = "other".into();
        assert_eq!(
            verifier().verify(&mint_hs256(SECRET, &c).unwrap()),
            Err(AuthError::WrongAudience)
        );
        let t = mint_hs256(b"another secret of enough length!", &claims(Role::Read)).unwrap();
        assert_eq!(verifier().verify(&t), Err(AuthError::BadSignature));
        // Tampered payload, original signature.
        let t = mint_hs256(SECRET, &claims(Role::Read)).unwrap();
        let parts: Vec<&str> = t.split('.').collect();
        let mut c = claims(Role::Admin);
        c.ns = "tenant-b".into();
        let forged = format!("{}.{}.{}", parts[0], b64(&serde_json::to_string(&c).unwrap()), parts[2]);
        assert_eq!(verifier().verify(&forged), Err(AuthError::BadSignature));
    }

    #[test]
    fn alg_none_and_other_algorithms_refused() {
        let payload = b64(&serde_json::to_string(&claims(Role::Admin)).unwrap());
        for header in [
            r#"{"alg":"none"}"#,
            r#"{"alg":"None","typ":"JWT"}"#,
            r#"{"alg":"HS512"}"#,
            r#"{"alg":"RS256"}"#,
            r#"{"typ":"JWT"}"#,
            r#"{"alg":5}"#,
        ] {
            for sig in ["", "c2ln"] {
                let t = format!("{}.{}.{}", b64(header), payload, sig);
                assert_eq!(verifier().verify(&t), Err(AuthError::BadAlgorithm), "{header}");
            }
        }
        // crit extensions are not understood, so refused.
        let t = mint_hs256(SECRET, &claims(Role::Read)).unwrap();
        let parts: Vec<&str> = t.split('.').collect();
        let crit = format!("{}.{}.{}", b64(r#"{"alg":"HS256","crit":["exp"]}"#), parts[1], parts[2]);
        assert_eq!(verifier().verify(&crit), Err(AuthError::Malformed));
    }

    #[test]
    fn required_claims_and_namespace() {
        let now = unix_now();
        let enc = |v: serde_json::Value| {
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &v, &EncodingKey::from_secret(SECRET)).unwrap()
        };
        let full = serde_json::json!({"sub":"a","ns":"t","role":"read","exp":now+60,"nbf":now,"iat":now,"iss":"skv","aud":"skv"});
        assert!(verifier().verify(&enc(full.clone())).is_ok());
        for claim in ["exp", "nbf", "iss", "aud", "sub"] {
            let mut v = full.clone();
            v.as_object_mut().unwrap().remove(claim);
            let err = verifier().verify(&enc(v)).unwrap_err();
            assert!(
                matches!(err, AuthError::MissingClaim | AuthError::Malformed),
                "{claim}: {err:?}"
            );
        }
        let mut v = full.clone();
        v["role"] = "root".into();
        assert_eq!(verifier().verify(&enc(v)), Err(AuthError::Malformed));
        let mut c = claims(Role::Read);
        c.ns = String::new();
        assert_eq!(
            verifier().verify(&mint_hs256(SECRET, &c).unwrap()),
            Err(AuthError::BadNamespace)
        );
        c.ns = "x".repeat(256);
        assert_eq!(
            verifier().verify(&mint_hs256(SECRET, &c).unwrap()),
            Err(AuthError::BadNamespace)
        );
        c.ns = "x".repeat(255);
        assert!(verifier().verify(&mint_hs256(SECRET, &c).unwrap()).is_ok());
    }

    #[test]
    fn cached_tokens_still_expire() {
        let v = verifier().with_leeway(0);
        let mut c = claims(Role::Write);
        c.exp = unix_now() + 1;
        let t = mint_hs256(SECRET, &c).unwrap();
        assert!(v.verify(&t).is_ok());
        assert!(v.verify(&t).is_ok(), "served from the cache");
        assert_eq!(v.cache.read().len(), 1);
        std::thread::sleep(Duration::from_millis(2100));
        assert_eq!(v.verify(&t), Err(AuthError::Expired));
        // Failures are not cached; a forged variant of a cached token still fails.
        let mut forged = t.clone();
        forged.push('x');
        assert!(v.verify(&forged).is_err());
        assert_eq!(v.cache.read().len(), 1);
    }

    #[test]
    fn secret_file_is_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        std::fs::write(&p, b"secret\n").unwrap();
        assert_eq!(load_hs256_secret(&p).unwrap(), b"secret");
        std::fs::write(&p, b"\n").unwrap();
        assert!(load_hs256_secret(&p).is_err());
    }
}
