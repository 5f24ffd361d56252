//! skv-auth: JWT authentication and authorization, following RFC 8725 (JWT best current
//! practices). One verifier for every server that takes tokens: the proxy (every `skv.v1`
//! call) and placement (admin calls, ADR 0021). The key flags are [`JwtArgs`], flattened
//! into each server's config, so both read keys the same way.
//!
//! - The accepted algorithms are an explicit allow-list chosen by the key material:
//!   HS256 from a secret file (at least [`MIN_HS256_SECRET_LEN`] bytes), RS256 or ES256
//!   from a PEM public key, or per `kid` from a JWKS file. The header's `alg` is checked
//!   against that list before any cryptography runs, so `alg=none` and algorithm-confusion
//!   tokens (an RS256 public key used as an HS256 secret) are refused.
//! - `exp`, `nbf`, `iss`, `aud` and `sub` are required; `exp`/`nbf` are checked with a
//!   small leeway ([`DEFAULT_LEEWAY_SECS`]).
//! - A `crit` header is refused (we understand no extensions), and so is a token whose
//!   header names its own key material (`jku`, `jwk`, `x5u`, `x5c`): keys come only from
//!   the server's configuration.
//! - Key files are re-read by [`KeyReloader`] (ADR 0019): a JWKS can list the old and the
//!   new `kid` during a rotation, and a key that leaves the file is refused from the next
//!   reload on (the verified-token cache is cleared on every key change). A file that does
//!   not load keeps the previous keys.
//!
//! Tokens are never logged: [`AuthError`] carries only a reason.

mod jwks_url;

use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyOperations, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
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

/// Shortest HS256 secret accepted, in bytes: RFC 7518 §3.2 asks for a key at least as
/// long as the hash output (256 bits).
pub const MIN_HS256_SECRET_LEN: usize = 32;
/// Smallest RSA modulus accepted, in bytes (2048 bits, RFC 7518 §3.3).
pub const MIN_RSA_MODULUS_LEN: usize = 256;
/// Largest key file read (secret, PEM or JWKS).
pub const MAX_KEY_FILE_LEN: u64 = 1 << 20;

/// Why a key file could not be used. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is larger than {MAX_KEY_FILE_LEN} bytes")]
    TooLarge { path: PathBuf },
    #[error("JWT secret file {path} is empty")]
    EmptySecret { path: PathBuf },
    #[error(
        "the HS256 secret in {path} is {len} bytes; at least {MIN_HS256_SECRET_LEN} are required \
         (RFC 7518 §3.2). Make one with: openssl rand -hex 32 > {path}"
    )]
    ShortSecret { path: PathBuf, len: usize },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    /// A key given in memory that cannot be used (no file to name).
    #[error("{0}")]
    Unusable(String),
    /// The JWKS URL could not be fetched.
    #[error("fetching {url}: {reason}")]
    Fetch { url: String, reason: String },
}

fn invalid(path: &Path, reason: impl Into<String>) -> KeyError {
    KeyError::Invalid {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Reads a key file of at most [`MAX_KEY_FILE_LEN`] bytes.
pub fn read_key_file(path: &Path) -> Result<Vec<u8>, KeyError> {
    let read = |source| KeyError::Read {
        path: path.to_path_buf(),
        source,
    };
    use std::io::Read as _;
    let file = std::fs::File::open(path).map_err(read)?;
    let mut bytes = Vec::new();
    file.take(MAX_KEY_FILE_LEN + 1).read_to_end(&mut bytes).map_err(read)?;
    if bytes.len() as u64 > MAX_KEY_FILE_LEN {
        return Err(KeyError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    Ok(bytes)
}

/// Mints an HS256 token (used by `skvctl token mint` and tests).
pub fn mint_hs256(secret: &[u8], claims: &Claims) -> Result<String, jsonwebtoken::errors::Error> {
    mint(&SigningKey::hs256(secret), None, claims)
}

/// Mints a token signed with `key`, naming `kid` in its header when given.
pub fn mint(key: &SigningKey, kid: Option<&str>, claims: &Claims) -> Result<String, jsonwebtoken::errors::Error> {
    let mut header = Header::new(key.alg);
    header.typ = Some("JWT".to_string());
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, &key.key)
}

/// A key that signs tokens: an HS256 secret, or an RSA (RS256) or P-256 (ES256) private key.
/// Its `Debug` output names the algorithm only.
pub struct SigningKey {
    alg: Algorithm,
    key: EncodingKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// An HS256 secret (its length is checked where it is loaded, [`load_hs256_secret`]).
    pub fn hs256(secret: &[u8]) -> Self {
        SigningKey {
            alg: Algorithm::HS256,
            key: EncodingKey::from_secret(secret),
        }
    }

    /// A PEM private key: RSA (PKCS#1 or PKCS#8) signs RS256, P-256 (PKCS#8) signs ES256.
    pub fn from_pem(pem: &[u8]) -> Result<Self, KeyError> {
        Self::parse_pem(pem).map_err(KeyError::Unusable)
    }

    fn parse_pem(pem: &[u8]) -> Result<Self, String> {
        if let Ok(key) = EncodingKey::from_rsa_pem(pem) {
            let jwk = Jwk::from_encoding_key(&key, Algorithm::RS256).map_err(|e| format!("RSA key: {e}"))?;
            check_jwk_strength(&jwk)?;
            return Ok(SigningKey {
                alg: Algorithm::RS256,
                key,
            });
        }
        if let Ok(key) = EncodingKey::from_ec_pem(pem) {
            let jwk = Jwk::from_encoding_key(&key, Algorithm::ES256)
                .map_err(|e| format!("EC key: {e} (only P-256 keys sign ES256)"))?;
            check_jwk_strength(&jwk)?;
            return Ok(SigningKey {
                alg: Algorithm::ES256,
                key,
            });
        }
        Err("not an RSA or P-256 EC private key in PEM (PKCS#1 or PKCS#8)".into())
    }

    /// Reads a PEM private key file ([`SigningKey::from_pem`]).
    pub fn load_pem(path: &Path) -> Result<Self, KeyError> {
        let pem = read_key_file(path)?;
        Self::parse_pem(&pem).map_err(|r| invalid(path, r))
    }

    /// The algorithm this key signs with.
    pub fn alg(&self) -> Algorithm {
        self.alg
    }

    /// The public half as a JWK with `kid`, `alg` and `use: sig` (RS256 and ES256 only),
    /// ready to be put in the proxy's JWKS file.
    pub fn public_jwk(&self, kid: &str) -> Result<Jwk, KeyError> {
        if self.alg == Algorithm::HS256 {
            return Err(KeyError::Unusable("an HS256 secret has no public key".into()));
        }
        let mut jwk = Jwk::from_encoding_key(&self.key, self.alg).map_err(|e| KeyError::Unusable(e.to_string()))?;
        jwk.common.key_id = Some(kid.to_string());
        jwk.common.public_key_use = Some(PublicKeyUse::Signature);
        Ok(jwk)
    }
}

/// Reads an HS256 secret file the way the proxy does: raw bytes with trailing
/// whitespace (a final newline) removed. Refuses an empty secret and one shorter than
/// [`MIN_HS256_SECRET_LEN`] bytes. `skvctl token mint` uses this so both sides agree on the key.
pub fn load_hs256_secret(path: &Path) -> Result<Vec<u8>, KeyError> {
    let mut bytes = read_key_file(path)?;
    trim_secret(&mut bytes);
    check_secret(path, &bytes)?;
    Ok(bytes)
}

fn trim_secret(bytes: &mut Vec<u8>) {
    while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
        bytes.pop();
    }
}

fn check_secret(path: &Path, secret: &[u8]) -> Result<(), KeyError> {
    if secret.is_empty() {
        return Err(KeyError::EmptySecret {
            path: path.to_path_buf(),
        });
    }
    if secret.len() < MIN_HS256_SECRET_LEN {
        return Err(KeyError::ShortSecret {
            path: path.to_path_buf(),
            len: secret.len(),
        });
    }
    Ok(())
}

/// Checks the size of an RSA modulus (at least 2048 bits) or that an EC key is on P-256.
fn check_jwk_strength(jwk: &Jwk) -> Result<(), String> {
    match &jwk.algorithm {
        AlgorithmParameters::RSA(p) => {
            let n = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p.n.trim_end_matches('='))
                .map_err(|_| "RSA modulus is not base64url".to_string())?;
            let bits = n.iter().skip_while(|b| **b == 0).count() * 8;
            if bits < MIN_RSA_MODULUS_LEN * 8 {
                return Err(format!(
                    "RSA key of about {bits} bits; at least {} are required (RFC 7518 §3.3)",
                    MIN_RSA_MODULUS_LEN * 8
                ));
            }
            Ok(())
        }
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
            let coordinate = |c: &str| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(c.trim_end_matches('='))
                    .is_ok_and(|b| b.len() == 32)
            };
            if !coordinate(&p.x) || !coordinate(&p.y) {
                return Err("P-256 key coordinates must be 32 bytes each (base64url)".into());
            }
            Ok(())
        }
        AlgorithmParameters::EllipticCurve(p) => Err(format!("EC curve {:?}: only P-256 (ES256) is accepted", p.curve)),
        _ => Err("only RSA (RS256) and P-256 EC (ES256) keys are accepted".into()),
    }
}

/// Where the verification keys come from (`--jwt-hs256-secret-file`,
/// `--jwt-public-key-file` or `--jwt-jwks-file`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// A shared secret: HS256 only.
    Hs256Secret(PathBuf),
    /// One PEM public key (`PUBLIC KEY` or `RSA PUBLIC KEY`): RS256 for RSA, ES256 for
    /// P-256, whatever `kid` a token names.
    PublicKey(PathBuf),
    /// A JWKS (`{"keys":[...]}`): RSA and P-256 keys chosen by the token's `kid`.
    Jwks(PathBuf),
    /// A JWKS fetched over HTTPS, the server checked against `ca_file`.
    JwksUrl { url: String, ca_file: PathBuf },
}

impl KeySource {
    /// The file, or the URL (for messages).
    pub fn path(&self) -> &Path {
        match self {
            KeySource::Hs256Secret(p) | KeySource::PublicKey(p) | KeySource::Jwks(p) => p,
            KeySource::JwksUrl { url, .. } => Path::new(url.as_str()),
        }
    }

    /// The flag that names this source.
    pub fn flag(&self) -> &'static str {
        match self {
            KeySource::Hs256Secret(_) => "--jwt-hs256-secret-file",
            KeySource::PublicKey(_) => "--jwt-public-key-file",
            KeySource::Jwks(_) => "--jwt-jwks-file",
            KeySource::JwksUrl { .. } => "--jwt-jwks-url",
        }
    }

    /// The source's current bytes: the file read (capped at [`MAX_KEY_FILE_LEN`]), or one
    /// HTTPS GET of the URL.
    pub async fn fetch(&self) -> Result<Vec<u8>, KeyError> {
        match self {
            KeySource::JwksUrl { url, ca_file } => {
                let tls = jwks_url::tls_config(ca_file)?;
                jwks_url::get(url, tls).await
            }
            _ => {
                let path = self.path().to_path_buf();
                tokio::task::spawn_blocking(move || read_key_file(&path))
                    .await
                    .map_err(|e| KeyError::Unusable(format!("reading the key file: {e}")))?
            }
        }
    }

    /// Parses the file's contents into a key set.
    fn parse(&self, bytes: &[u8]) -> Result<KeySet, KeyError> {
        let path = self.path();
        match self {
            KeySource::Hs256Secret(_) => {
                let mut secret = bytes.to_vec();
                trim_secret(&mut secret);
                check_secret(path, &secret)?;
                Ok(KeySet::Hs256(DecodingKey::from_secret(&secret)))
            }
            KeySource::PublicKey(_) => parse_public_pem(bytes).map_err(|r| invalid(path, r)),
            KeySource::Jwks(_) | KeySource::JwksUrl { .. } => parse_jwks(bytes).map_err(|r| invalid(path, r)),
        }
    }
}

fn parse_public_pem(pem: &[u8]) -> Result<KeySet, String> {
    let text = std::str::from_utf8(pem).map_err(|_| "not a PEM text file".to_string())?;
    if text.contains("PRIVATE KEY") {
        return Err("holds a private key; give the server the public key only".into());
    }
    if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
        let jwk = Jwk::from_decoding_key(&key, Some(Algorithm::RS256)).map_err(|e| format!("RSA key: {e}"))?;
        check_jwk_strength(&jwk)?;
        return Ok(KeySet::Single(VerifyKey {
            alg: Algorithm::RS256,
            key,
        }));
    }
    if let Ok(key) = DecodingKey::from_ec_pem(pem) {
        let jwk = Jwk::from_decoding_key(&key, Some(Algorithm::ES256)).map_err(|e| format!("EC key: {e}"))?;
        check_jwk_strength(&jwk)?;
        return Ok(KeySet::Single(VerifyKey {
            alg: Algorithm::ES256,
            key,
        }));
    }
    Err("not an RSA or P-256 EC public key in PEM".into())
}

/// What a JWK is good for: its algorithm, or why it is skipped.
fn jwk_algorithm(jwk: &Jwk) -> Result<Algorithm, String> {
    if let Some(u) = &jwk.common.public_key_use
        && *u != PublicKeyUse::Signature
    {
        return Err(format!("\"use\" is {u:?}, not sig"));
    }
    if let Some(ops) = &jwk.common.key_operations
        && !ops.contains(&KeyOperations::Verify)
    {
        return Err("\"key_ops\" does not include verify".into());
    }
    let by_type = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
        AlgorithmParameters::OctetKey(_) => return Err("symmetric (oct) keys are not accepted in a JWKS".into()),
        _ => return Err("only RSA and EC keys are accepted".into()),
    };
    if let Some(a) = jwk.common.key_algorithm {
        let named = format!("{a:?}");
        if named != format!("{by_type:?}") {
            return Err(format!(
                "\"alg\" {named} is not accepted for this key type (RS256 for RSA, ES256 for EC)"
            ));
        }
    }
    check_jwk_strength(jwk)?;
    Ok(by_type)
}

fn parse_jwks(bytes: &[u8]) -> Result<KeySet, String> {
    // Each key is parsed on its own, so that one key of a kind we do not know (an
    // OKP key, a future type) is skipped rather than failing the whole file.
    #[derive(Deserialize)]
    struct RawSet {
        keys: Vec<serde_json::Value>,
    }
    let raw: RawSet = serde_json::from_slice(bytes).map_err(|e| format!("not a JWKS ({{\"keys\":[...]}}): {e}"))?;
    let mut keys = HashMap::new();
    let mut skipped = Vec::new();
    for (i, v) in raw.keys.into_iter().enumerate() {
        let kid = v.get("kid").and_then(|k| k.as_str()).map(str::to_string);
        let Some(kid) = kid.filter(|k| !k.is_empty()) else {
            skipped.push(format!("key {i}: no \"kid\""));
            continue;
        };
        let jwk: Jwk = match serde_json::from_value(v) {
            Ok(j) => j,
            Err(e) => {
                skipped.push(format!("kid {kid:?}: {e}"));
                continue;
            }
        };
        let alg = match jwk_algorithm(&jwk) {
            Ok(a) => a,
            Err(e) => {
                skipped.push(format!("kid {kid:?}: {e}"));
                continue;
            }
        };
        let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("kid {kid:?}: {e}"))?;
        if keys.insert(kid.clone(), VerifyKey { alg, key }).is_some() {
            return Err(format!("kid {kid:?} appears twice"));
        }
    }
    if !skipped.is_empty() {
        tracing::warn!(skipped = ?skipped, "JWKS keys skipped");
    }
    if keys.is_empty() {
        return Err("no usable key (RS256 RSA of 2048+ bits or ES256 P-256, each with a kid)".into());
    }
    Ok(KeySet::ByKid(keys))
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
    #[error("token header names its own key (jku, jwk, x5u or x5c), which is never trusted")]
    KeyInHeader,
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
            AuthError::KeyInHeader => "key_in_header",
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

#[derive(Clone)]
struct VerifyKey {
    alg: Algorithm,
    key: DecodingKey,
}

/// Verification keys. Each variant fixes its own algorithm allow-list.
enum KeySet {
    /// One shared secret, HS256 only.
    Hs256(DecodingKey),
    /// One public key (PEM), its own algorithm only, whatever the token's `kid`.
    Single(VerifyKey),
    /// A JWKS: the token's `kid` picks the key, and the key fixes the algorithm (a token
    /// naming another algorithm than its kid's key is refused).
    ByKid(HashMap<String, VerifyKey>),
}

impl KeySet {
    fn allowed(&self) -> &[Algorithm] {
        match self {
            KeySet::Hs256(_) => &[Algorithm::HS256],
            KeySet::Single(k) => std::slice::from_ref(&k.alg),
            // What a JWKS may hold; each kid then allows only its own key's algorithm.
            KeySet::ByKid(_) => &[Algorithm::RS256, Algorithm::ES256],
        }
    }

    /// The key for a token whose header names `alg` (already allow-listed) and `kid`.
    fn key_for(&self, alg: Algorithm, kid: Option<&str>) -> Result<&DecodingKey, AuthError> {
        match self {
            KeySet::Hs256(k) => Ok(k),
            KeySet::Single(k) => Ok(&k.key),
            KeySet::ByKid(keys) => {
                let k = keys
                    .get(kid.ok_or(AuthError::UnknownKey)?)
                    .ok_or(AuthError::UnknownKey)?;
                // A kid of one algorithm is never used with another (no RSA key as an EC one).
                if k.alg != alg {
                    return Err(AuthError::BadAlgorithm);
                }
                Ok(&k.key)
            }
        }
    }

    /// What is loaded, for the log (no key material): `kid:alg` pairs, or the algorithm.
    fn describe(&self) -> Vec<String> {
        match self {
            KeySet::Hs256(_) => vec!["HS256".into()],
            KeySet::Single(k) => vec![format!("{:?}", k.alg)],
            KeySet::ByKid(keys) => {
                let mut v: Vec<String> = keys.iter().map(|(kid, k)| format!("{kid}:{:?}", k.alg)).collect();
                v.sort();
                v
            }
        }
    }
}

/// One shard of the verified-token cache. `generation` is the key set its tokens were
/// verified with: a verification that raced with a key change is not cached.
#[derive(Default)]
struct TokenCacheShard {
    generation: u64,
    map: HashMap<Box<str>, Claims>,
}

/// Shards of the verified-token cache, so that requests on many cores do not all take
/// one lock.
const TOKEN_CACHE_SHARDS: usize = 16;

/// A token's shard, from four characters of its signature (not the very last one, which
/// carries only a few bits of a base64url-encoded signature).
fn cache_shard(token: &str) -> usize {
    let h = token
        .as_bytes()
        .iter()
        .rev()
        .skip(1)
        .take(4)
        .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(usize::from(*b)));
    h % TOKEN_CACHE_SHARDS
}

/// Verifies tokens and checks roles. Cheap to share behind an `Arc`.
pub struct Verifier {
    /// The current keys with their generation (read-mostly: replaced on a reload).
    keys: parking_lot::RwLock<(u64, Arc<KeySet>)>,
    issuer: String,
    audience: String,
    leeway: u64,
    /// Tokens that verified, with their claims: a hit skips the signature and JSON work.
    /// Only successes are cached, `exp` is re-checked on every hit, and the cache is
    /// cleared whenever the key set changes (a key removed from a JWKS is refused at once).
    cache: [parking_lot::RwLock<TokenCacheShard>; TOKEN_CACHE_SHARDS],
}

/// Most cached tokens (a shard is cleared when it holds its part of this).
const TOKEN_CACHE_ENTRIES: usize = 4096;
/// Longest token worth caching.
const TOKEN_CACHE_MAX_LEN: usize = 4096;

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys = self.keys.read().1.clone();
        f.debug_struct("Verifier")
            .field("keys", &keys.describe())
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
    jku: Option<serde_json::Value>,
    jwk: Option<serde_json::Value>,
    x5u: Option<serde_json::Value>,
    x5c: Option<serde_json::Value>,
}

impl Verifier {
    fn with_keys(keys: KeySet, issuer: impl Into<String>, audience: impl Into<String>) -> Self {
        Verifier {
            keys: parking_lot::RwLock::new((0, Arc::new(keys))),
            issuer: issuer.into(),
            audience: audience.into(),
            leeway: DEFAULT_LEEWAY_SECS,
            cache: Default::default(),
        }
    }

    /// HS256 with a shared secret (its length is checked by [`load_hs256_secret`] and
    /// [`Verifier::load`], not here).
    pub fn hs256(secret: &[u8], issuer: impl Into<String>, audience: impl Into<String>) -> Self {
        Self::with_keys(KeySet::Hs256(DecodingKey::from_secret(secret)), issuer, audience)
    }

    /// Loads the keys of `source`, and returns the reloader that follows the file.
    pub fn load(
        source: KeySource,
        issuer: impl Into<String>,
        audience: impl Into<String>,
    ) -> Result<(Self, KeyReloader), KeyError> {
        if let KeySource::JwksUrl { url, .. } = &source {
            return Err(KeyError::Unusable(format!(
                "{url}: a JWKS URL is fetched asynchronously (Verifier::load_async)"
            )));
        }
        let bytes = read_key_file(source.path())?;
        Self::from_bytes(source, bytes, issuer, audience)
    }

    /// Loads the keys of `source` (a file or a URL), and returns the reloader that follows it.
    pub async fn load_async(
        source: KeySource,
        issuer: impl Into<String>,
        audience: impl Into<String>,
    ) -> Result<(Self, KeyReloader), KeyError> {
        let bytes = source.fetch().await?;
        Self::from_bytes(source, bytes, issuer, audience)
    }

    fn from_bytes(
        source: KeySource,
        bytes: Vec<u8>,
        issuer: impl Into<String>,
        audience: impl Into<String>,
    ) -> Result<(Self, KeyReloader), KeyError> {
        let keys = source.parse(&bytes)?;
        tracing::info!(source = source.flag(), path = %source.path().display(), keys = ?keys.describe(), "JWT keys loaded");
        let verifier = Self::with_keys(keys, issuer, audience);
        Ok((
            verifier,
            KeyReloader {
                source,
                last: bytes,
                last_fetch_error: None,
            },
        ))
    }

    /// Overrides the `exp`/`nbf` leeway (seconds).
    pub fn with_leeway(mut self, secs: u64) -> Self {
        self.leeway = secs;
        self
    }

    /// Replaces the keys and forgets every verified token. Every shard is locked (in
    /// order) before the generation moves, so no insert of the old generation lands after.
    fn replace_keys(&self, keys: KeySet) {
        let mut shards: Vec<_> = self.cache.iter().map(|s| s.write()).collect();
        let mut current = self.keys.write();
        current.0 += 1;
        current.1 = Arc::new(keys);
        for shard in &mut shards {
            shard.generation = current.0;
            shard.map.clear();
        }
    }

    /// Tokens in the cache (tests).
    #[cfg(test)]
    fn cached(&self) -> usize {
        self.cache.iter().map(|s| s.read().map.len()).sum()
    }

    /// `kid:alg` of the keys in use (no key material), for logs and tests.
    pub fn key_ids(&self) -> Vec<String> {
        self.keys.read().1.describe()
    }

    /// Verifies a compact JWS and returns its claims.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let shard = &self.cache[cache_shard(token)];
        if let Some(c) = shard.read().map.get(token) {
            // Verified before; only time can have changed its validity (nbf only passes).
            if unix_now() > c.exp.saturating_add(self.leeway) {
                return Err(AuthError::Expired);
            }
            return Ok(c.clone());
        }
        let (generation, keys) = self.keys.read().clone();
        let claims = self.verify_uncached(&keys, token)?;
        if token.len() <= TOKEN_CACHE_MAX_LEN {
            let mut cache = shard.write();
            if cache.generation == generation {
                if cache.map.len() >= TOKEN_CACHE_ENTRIES / TOKEN_CACHE_SHARDS {
                    cache.map.clear();
                }
                cache.map.insert(token.into(), claims.clone());
            }
        }
        Ok(claims)
    }

    fn verify_uncached(&self, keys: &KeySet, token: &str) -> Result<Claims, AuthError> {
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
        let alg = keys
            .allowed()
            .iter()
            .copied()
            .find(|a| format!("{a:?}") == alg_name)
            .ok_or(AuthError::BadAlgorithm)?;
        if raw.crit.is_some() {
            return Err(AuthError::Malformed);
        }
        if raw.jku.is_some() || raw.jwk.is_some() || raw.x5u.is_some() || raw.x5c.is_some() {
            return Err(AuthError::KeyInHeader);
        }
        let key = keys.key_for(alg, raw.kid.as_deref())?;

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

/// Follows a key file: re-reads it every `interval` and, when its contents changed,
/// loads the new keys (ADR 0019). A file that does not load is logged once and the
/// previous keys stay in use, so a half-written or broken file never locks clients out.
pub struct KeyReloader {
    source: KeySource,
    /// The contents last seen (loaded or refused), so an unchanged file costs one read.
    last: Vec<u8>,
    /// The last failure to fetch a JWKS URL (logged once).
    last_fetch_error: Option<String>,
}

/// What one look at the key file found.
#[derive(Debug, PartialEq, Eq)]
pub enum Reload {
    Unchanged,
    Loaded,
    /// The file changed but could not be used; the previous keys stay.
    Refused,
}

impl KeyReloader {
    /// Reads the file once and swaps the keys in `verifier` if it changed.
    pub async fn check(&mut self, verifier: &Verifier) -> Reload {
        let bytes = match self.source.fetch().await {
            Ok(b) => b,
            Err(e @ KeyError::Fetch { .. }) => {
                // An identity provider that does not answer: keep the keys, say so (once
                // per distinct error, not every interval).
                let text = e.to_string();
                if self.last_fetch_error.as_deref() != Some(text.as_str()) {
                    tracing::warn!(error = %text, "JWKS URL not fetched; keeping the current keys");
                    self.last_fetch_error = Some(text);
                }
                return Reload::Unchanged;
            }
            Err(e) => {
                // A rename-into-place can make the file missing for an instant: keep quiet
                // about it until the contents really differ.
                tracing::debug!(error = %e, "JWT key file not readable; keeping the current keys");
                return Reload::Unchanged;
            }
        };
        self.last_fetch_error = None;
        if bytes == self.last {
            return Reload::Unchanged;
        }
        let parsed = self.source.parse(&bytes);
        self.last = bytes;
        match parsed {
            Ok(keys) => {
                let described = keys.describe();
                verifier.replace_keys(keys);
                tracing::info!(source = self.source.flag(), path = %self.source.path().display(), keys = ?described, "JWT keys reloaded");
                Reload::Loaded
            }
            Err(e) => {
                tracing::warn!(source = self.source.flag(), error = %e, "JWT key file changed but does not load; keeping the previous keys");
                Reload::Refused
            }
        }
    }

    /// Checks the file every `interval` until `cancel`; `on_change` hears of every change
    /// seen ([`Reload::Loaded`] or [`Reload::Refused`]), with the verifier (the proxy counts
    /// them in `skv_proxy_jwt_key_reloads_total{result}` and `skv_proxy_jwt_keys`).
    pub async fn run(
        mut self,
        verifier: Arc<Verifier>,
        interval: std::time::Duration,
        cancel: tokio_util::sync::CancellationToken,
        mut on_change: impl FnMut(Reload, &Verifier) + Send,
    ) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            match self.check(&verifier).await {
                Reload::Unchanged => {}
                r => on_change(r, &verifier),
            }
        }
    }
}

/// The JWT key flags of a server (flattened into the proxy's and placement's configs): at
/// most one key source, the reload interval, the accepted issuer and audience.
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct JwtArgs {
    /// File holding the HS256 shared secret, at least 32 bytes (trailing whitespace is ignored).
    #[arg(long, env = "SKV_JWT_HS256_SECRET_FILE", conflicts_with_all = ["jwt_public_key_file", "jwt_jwks_file", "jwt_jwks_url"])]
    pub jwt_hs256_secret_file: Option<PathBuf>,
    /// PEM public key (RSA of 2048+ bits: RS256; P-256: ES256), reloaded when it changes.
    #[arg(long, env = "SKV_JWT_PUBLIC_KEY_FILE", conflicts_with_all = ["jwt_jwks_file", "jwt_jwks_url"])]
    pub jwt_public_key_file: Option<PathBuf>,
    /// JWKS file (RS256 and ES256 keys, chosen by the token's `kid`), reloaded when it
    /// changes: list the old and the new key during a rotation.
    #[arg(long, env = "SKV_JWT_JWKS_FILE", conflicts_with = "jwt_jwks_url")]
    pub jwt_jwks_file: Option<PathBuf>,
    /// JWKS URL (https only), fetched every --jwt-key-reload-ms (set it to a minute or so
    /// for an identity provider); needs --jwt-jwks-ca-file.
    #[arg(long, env = "SKV_JWT_JWKS_URL", requires = "jwt_jwks_ca_file")]
    pub jwt_jwks_url: Option<String>,
    /// The CA certificates (PEM bundle, e.g. /etc/ssl/certs/ca-certificates.crt) that the
    /// --jwt-jwks-url server must chain to.
    #[arg(long, env = "SKV_JWT_JWKS_CA_FILE", requires = "jwt_jwks_url")]
    pub jwt_jwks_ca_file: Option<PathBuf>,
    /// How often the JWT key file is checked for changes, in milliseconds (0 = never).
    #[arg(long, env = "SKV_JWT_KEY_RELOAD_MS", default_value_t = 1000)]
    pub jwt_key_reload_ms: u64,
    /// Accepted `iss` claim.
    #[arg(long, env = "SKV_JWT_ISSUER", default_value = DEFAULT_ISSUER)]
    pub jwt_issuer: String,
    /// Accepted `aud` claim.
    #[arg(long, env = "SKV_JWT_AUDIENCE", default_value = DEFAULT_AUDIENCE)]
    pub jwt_audience: String,
}

/// More than one key source, or a URL without its CA file.
#[derive(Debug, thiserror::Error)]
#[error(
    "give at most one of --jwt-hs256-secret-file, --jwt-public-key-file, --jwt-jwks-file or --jwt-jwks-url (the URL with --jwt-jwks-ca-file)"
)]
pub struct TwoKeySources;

/// No key, the flags' defaults otherwise.
impl Default for JwtArgs {
    fn default() -> Self {
        JwtArgs {
            jwt_hs256_secret_file: None,
            jwt_public_key_file: None,
            jwt_jwks_file: None,
            jwt_jwks_url: None,
            jwt_jwks_ca_file: None,
            jwt_key_reload_ms: 1000,
            jwt_issuer: DEFAULT_ISSUER.to_string(),
            jwt_audience: DEFAULT_AUDIENCE.to_string(),
        }
    }
}

impl JwtArgs {
    /// HS256 with the secret in `secret_file`, default issuer and audience, 1 s reload.
    pub fn hs256(secret_file: PathBuf) -> Self {
        JwtArgs {
            jwt_hs256_secret_file: Some(secret_file),
            ..Self::default()
        }
    }

    /// The key source the flags name, if any.
    pub fn key_source(&self) -> Result<Option<KeySource>, TwoKeySources> {
        let url = match (&self.jwt_jwks_url, &self.jwt_jwks_ca_file) {
            (Some(url), Some(ca)) => Some(KeySource::JwksUrl {
                url: url.clone(),
                ca_file: ca.clone(),
            }),
            (None, None) => None,
            _ => return Err(TwoKeySources),
        };
        match (
            &self.jwt_hs256_secret_file,
            &self.jwt_public_key_file,
            &self.jwt_jwks_file,
            url,
        ) {
            (None, None, None, None) => Ok(None),
            (Some(p), None, None, None) => Ok(Some(KeySource::Hs256Secret(p.clone()))),
            (None, Some(p), None, None) => Ok(Some(KeySource::PublicKey(p.clone()))),
            (None, None, Some(p), None) => Ok(Some(KeySource::Jwks(p.clone()))),
            (None, None, None, Some(u)) => Ok(Some(u)),
            _ => Err(TwoKeySources),
        }
    }

    /// Loads the keys of `source` with these flags' issuer and audience, and starts the
    /// task that reloads them (unless `--jwt-key-reload-ms 0`) until `cancel`.
    pub async fn load(
        &self,
        source: KeySource,
        cancel: tokio_util::sync::CancellationToken,
        on_change: impl FnMut(Reload, &Verifier) + Send + 'static,
    ) -> Result<Arc<Verifier>, KeyError> {
        let (verifier, reloader) = Verifier::load_async(source, &self.jwt_issuer, &self.jwt_audience).await?;
        let verifier = Arc::new(verifier);
        if self.jwt_key_reload_ms > 0 {
            tokio::spawn(reloader.run(
                verifier.clone(),
                std::time::Duration::from_millis(self.jwt_key_reload_ms),
                cancel,
                on_change,
            ));
        }
        Ok(verifier)
    }
}

#[cfg(test)]
#[path = "../tests/keys/mod.rs"]
mod test_keys;

#[cfg(test)]
mod tests {
    use super::*;

    use super::test_keys as keys;

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
        assert_eq!(v.cached(), 1);
        std::thread::sleep(Duration::from_millis(2100));
        assert_eq!(v.verify(&t), Err(AuthError::Expired));
        // Failures are not cached; a forged variant of a cached token still fails.
        let mut forged = t.clone();
        forged.push('x');
        assert!(v.verify(&forged).is_err());
        assert_eq!(v.cached(), 1);
    }

    #[test]
    fn secret_file_is_trimmed_and_long_enough() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        std::fs::write(&p, [SECRET, b"\n"].concat()).unwrap();
        assert_eq!(load_hs256_secret(&p).unwrap(), SECRET);
        std::fs::write(&p, b"\n").unwrap();
        assert!(matches!(load_hs256_secret(&p), Err(KeyError::EmptySecret { .. })));
        // 31 bytes (plus a newline that does not count) is refused, with one clear error.
        std::fs::write(&p, [&SECRET[..31], b"\n"].concat()).unwrap();
        let e = load_hs256_secret(&p).unwrap_err();
        assert!(matches!(e, KeyError::ShortSecret { len: 31, .. }), "{e:?}");
        assert!(e.to_string().contains("at least 32"), "{e}");
        let e = Verifier::load(KeySource::Hs256Secret(p.clone()), "skv", "skv")
            .err()
            .unwrap();
        assert!(matches!(e, KeyError::ShortSecret { len: 31, .. }), "{e:?}");
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn jwks(entries: &[(&SigningKey, &str)]) -> String {
        let keys: Vec<Jwk> = entries.iter().map(|(k, kid)| k.public_jwk(kid).unwrap()).collect();
        serde_json::to_string(&serde_json::json!({ "keys": keys })).unwrap()
    }

    #[test]
    fn rs256_and_es256_from_pem() {
        let dir = tempfile::tempdir().unwrap();
        for (pair, alg) in [(keys::rsa(), Algorithm::RS256), (keys::ec(), Algorithm::ES256)] {
            let signer = SigningKey::from_pem(pair.private_pem.as_bytes()).unwrap();
            assert_eq!(signer.alg(), alg);
            let public = write(dir.path(), "pub.pem", &pair.public_pem);
            let (v, _) = Verifier::load(KeySource::PublicKey(public), "skv", "skv").unwrap();
            let c = claims(Role::Write);
            // Any kid, or none: a PEM key is the only key.
            assert_eq!(v.verify(&mint(&signer, None, &c).unwrap()).unwrap(), c);
            assert_eq!(v.verify(&mint(&signer, Some("whatever"), &c).unwrap()).unwrap(), c);
            // Another key pair of the same kind does not verify.
            let other = if alg == Algorithm::RS256 {
                keys::rsa()
            } else {
                keys::ec()
            };
            let other = SigningKey::from_pem(other.private_pem.as_bytes()).unwrap();
            assert_eq!(v.verify(&mint(&other, None, &c).unwrap()), Err(AuthError::BadSignature));
            // HS256 (and the other asymmetric algorithm) are outside the allow-list.
            assert_eq!(v.verify(&mint_hs256(SECRET, &c).unwrap()), Err(AuthError::BadAlgorithm));
        }
    }

    #[test]
    fn public_key_used_as_hs256_secret_is_refused() {
        // The classic confusion: sign HS256 with the server's *public* key as the secret.
        let dir = tempfile::tempdir().unwrap();
        let pair = keys::rsa();
        let signer = SigningKey::from_pem(pair.private_pem.as_bytes()).unwrap();
        let public = write(dir.path(), "pub.pem", &pair.public_pem);
        let (v, _) = Verifier::load(KeySource::PublicKey(public), "skv", "skv").unwrap();
        let c = claims(Role::Admin);
        let forged = mint_hs256(pair.public_pem.as_bytes(), &c).unwrap();
        assert_eq!(v.verify(&forged), Err(AuthError::BadAlgorithm));
        // Through a JWKS too, whatever kid it names, also with the JWK's own bytes.
        let set = jwks(&[(&signer, "k1")]);
        let file = write(dir.path(), "jwks.json", &set);
        let (v, _) = Verifier::load(KeySource::Jwks(file), "skv", "skv").unwrap();
        for secret in [pair.public_pem.as_bytes(), set.as_bytes()] {
            let forged = mint(&SigningKey::hs256(secret), Some("k1"), &c).unwrap();
            assert_eq!(v.verify(&forged), Err(AuthError::BadAlgorithm));
        }
        // An RS256 kid used with ES256 (an EC key signing under the RSA key's kid).
        let ec = SigningKey::from_pem(keys::ec().private_pem.as_bytes()).unwrap();
        let file = write(dir.path(), "jwks2.json", &jwks(&[(&signer, "k1"), (&ec, "k2")]));
        let (v, _) = Verifier::load(KeySource::Jwks(file), "skv", "skv").unwrap();
        assert_eq!(
            v.verify(&mint(&ec, Some("k1"), &c).unwrap()),
            Err(AuthError::BadAlgorithm)
        );
        assert!(v.verify(&mint(&ec, Some("k2"), &c).unwrap()).is_ok());
    }

    #[test]
    fn jwks_picks_by_kid_and_refuses_header_keys() {
        let dir = tempfile::tempdir().unwrap();
        let rsa = SigningKey::from_pem(keys::rsa().private_pem.as_bytes()).unwrap();
        let ec = SigningKey::from_pem(keys::ec().private_pem.as_bytes()).unwrap();
        let file = write(dir.path(), "jwks.json", &jwks(&[(&rsa, "r1"), (&ec, "e1")]));
        let (v, _) = Verifier::load(KeySource::Jwks(file), "skv", "skv").unwrap();
        assert_eq!(v.key_ids(), vec!["e1:ES256", "r1:RS256"]);
        let c = claims(Role::Read);
        assert!(v.verify(&mint(&rsa, Some("r1"), &c).unwrap()).is_ok());
        assert!(v.verify(&mint(&ec, Some("e1"), &c).unwrap()).is_ok());
        assert_eq!(v.verify(&mint(&rsa, None, &c).unwrap()), Err(AuthError::UnknownKey));
        assert_eq!(
            v.verify(&mint(&rsa, Some("nope"), &c).unwrap()),
            Err(AuthError::UnknownKey)
        );
        // The right kid, signed by another key.
        let evil = SigningKey::from_pem(keys::rsa().private_pem.as_bytes()).unwrap();
        assert_eq!(
            v.verify(&mint(&evil, Some("r1"), &c).unwrap()),
            Err(AuthError::BadSignature)
        );
        // A token that brings its own key (jwk, jku, x5u, x5c) is refused before any lookup.
        for (name, value) in [
            ("jwk", serde_json::to_value(evil.public_jwk("r1").unwrap()).unwrap()),
            ("jku", "https://evil.example/jwks.json".into()),
            ("x5u", "https://evil.example/cert.pem".into()),
            ("x5c", serde_json::json!(["MIIB"])),
        ] {
            let header = serde_json::json!({"alg": "RS256", "kid": "r1", name: value});
            let t = mint(&evil, Some("r1"), &c).unwrap();
            let parts: Vec<&str> = t.split('.').collect();
            let forged = format!("{}.{}.{}", b64(&header.to_string()), parts[1], parts[2]);
            assert_eq!(v.verify(&forged), Err(AuthError::KeyInHeader), "{name}");
        }
    }

    #[test]
    fn bad_key_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let pair = keys::rsa();
        let rsa = SigningKey::from_pem(pair.private_pem.as_bytes()).unwrap();
        let load = |src: KeySource| Verifier::load(src, "skv", "skv").err().map(|e| e.to_string());
        let p = write(dir.path(), "priv.pem", &pair.private_pem);
        assert!(load(KeySource::PublicKey(p)).unwrap().contains("private key"));
        let p = write(dir.path(), "p384.pem", &keys::ec_p384().public_pem);
        assert!(load(KeySource::PublicKey(p)).unwrap().contains("P-256"));
        assert!(SigningKey::from_pem(keys::ec_p384().private_pem.as_bytes()).is_err());
        for (name, text, want) in [
            ("empty.json", r#"{"keys":[]}"#.to_string(), "no usable key"),
            ("junk.json", "{".to_string(), "not a JWKS"),
            (
                "oct.json",
                r#"{"keys":[{"kty":"oct","kid":"h","k":"c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"}]}"#.to_string(),
                "no usable key",
            ),
            ("nokid.json", jwks(&[(&rsa, "")]), "no usable key"),
            ("dup.json", jwks(&[(&rsa, "a"), (&rsa, "a")]), "appears twice"),
            (
                "short-ec.json",
                r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"e","x":"AAAA","y":"AAAA"}]}"#.to_string(),
                "no usable key",
            ),
        ] {
            let p = write(dir.path(), name, &text);
            let e = load(KeySource::Jwks(p)).unwrap();
            assert!(e.contains(want), "{name}: {e}");
        }
        // A JWKS with one usable key and some we skip loads the usable one.
        let mut jwk = serde_json::to_value(rsa.public_jwk("r").unwrap()).unwrap();
        jwk["alg"] = "RS512".into();
        let mut enc = serde_json::to_value(rsa.public_jwk("enc").unwrap()).unwrap();
        enc["use"] = "enc".into();
        let mut wrap = serde_json::to_value(rsa.public_jwk("wrap").unwrap()).unwrap();
        wrap.as_object_mut().unwrap().remove("use");
        wrap["key_ops"] = serde_json::json!(["wrapKey"]);
        let ok = serde_json::to_value(rsa.public_jwk("ok").unwrap()).unwrap();
        let p = write(
            dir.path(),
            "mixed.json",
            &serde_json::json!({"keys": [jwk, enc, wrap, ok, {"kty":"OKP","crv":"Ed25519","kid":"ed","x":"AAAA"}]})
                .to_string(),
        );
        let (v, _) = Verifier::load(KeySource::Jwks(p), "skv", "skv").unwrap();
        assert_eq!(v.key_ids(), vec!["ok:RS256"]);
    }

    #[tokio::test]
    async fn key_change_clears_every_cache_shard() {
        let dir = tempfile::tempdir().unwrap();
        let old = SigningKey::from_pem(keys::ec().private_pem.as_bytes()).unwrap();
        let new = SigningKey::from_pem(keys::ec().private_pem.as_bytes()).unwrap();
        let file = write(dir.path(), "jwks.json", &jwks(&[(&old, "old")]));
        let (v, mut reloader) = Verifier::load(KeySource::Jwks(file), "skv", "skv").unwrap();
        let tokens: Vec<String> = (0..200)
            .map(|i| {
                mint(
                    &old,
                    Some("old"),
                    &Claims::new(format!("u{i}"), "t", Role::Read, Duration::from_secs(60)),
                )
                .unwrap()
            })
            .collect();
        for t in &tokens {
            assert!(v.verify(t).is_ok());
        }
        let shards: std::collections::HashSet<usize> = tokens.iter().map(|t| cache_shard(t)).collect();
        assert!(shards.len() > 8, "tokens spread over the shards: {shards:?}");
        assert_eq!(v.cached(), 200);
        write(dir.path(), "jwks.json", &jwks(&[(&new, "new")]));
        assert_eq!(reloader.check(&v).await, Reload::Loaded);
        assert_eq!(v.cached(), 0);
        for t in &tokens {
            assert_eq!(v.verify(t), Err(AuthError::UnknownKey));
        }
    }

    #[tokio::test]
    async fn reload_rotates_keys_and_keeps_them_on_a_bad_file() {
        let dir = tempfile::tempdir().unwrap();
        let old = SigningKey::from_pem(keys::rsa().private_pem.as_bytes()).unwrap();
        let new = SigningKey::from_pem(keys::ec().private_pem.as_bytes()).unwrap();
        let file = write(dir.path(), "jwks.json", &jwks(&[(&old, "old")]));
        let (v, mut reloader) = Verifier::load(KeySource::Jwks(file.clone()), "skv", "skv").unwrap();
        let c = claims(Role::Write);
        let t_old = mint(&old, Some("old"), &c).unwrap();
        let t_new = mint(&new, Some("new"), &c).unwrap();
        assert!(v.verify(&t_old).is_ok());
        assert_eq!(v.verify(&t_new), Err(AuthError::UnknownKey));
        assert_eq!(reloader.check(&v).await, Reload::Unchanged);
        // Overlap: both.
        write(dir.path(), "jwks.json", &jwks(&[(&old, "old"), (&new, "new")]));
        assert_eq!(reloader.check(&v).await, Reload::Loaded);
        assert!(v.verify(&t_old).is_ok());
        assert!(v.verify(&t_new).is_ok());
        // A broken file keeps both (logged once, not re-parsed while unchanged).
        write(dir.path(), "jwks.json", "{\"keys\": [");
        assert_eq!(reloader.check(&v).await, Reload::Refused);
        assert_eq!(reloader.check(&v).await, Reload::Unchanged);
        assert!(v.verify(&t_old).is_ok());
        // The old key leaves: its tokens are refused at once, though they were cached.
        write(dir.path(), "jwks.json", &jwks(&[(&new, "new")]));
        assert_eq!(reloader.check(&v).await, Reload::Loaded);
        assert_eq!(v.verify(&t_old), Err(AuthError::UnknownKey));
        assert!(v.verify(&t_new).is_ok());
        // A missing file (mid-rename) changes nothing.
        std::fs::remove_file(&file).unwrap();
        assert_eq!(reloader.check(&v).await, Reload::Unchanged);
        assert!(v.verify(&t_new).is_ok());
    }
}
