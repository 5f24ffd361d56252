//! `skvctl token mint` and `skvctl token jwks`, with the proxy's own claims, key
//! loading and minting code.

use crate::args::{MintArgs, RoleArg};
use anyhow::{Context, Result};
use skv_proxy::auth::{Claims, Role, SigningKey, load_hs256_secret, mint};
use std::path::PathBuf;

pub fn role(r: RoleArg) -> Role {
    match r {
        RoleArg::Read => Role::Read,
        RoleArg::Write => Role::Write,
        RoleArg::Admin => Role::Admin,
    }
}

/// The claims `skvctl token mint` signs.
pub fn claims(a: &MintArgs) -> Claims {
    let mut c = Claims::new(a.sub.clone(), a.ns.clone(), role(a.role), a.ttl);
    c.iss = a.issuer.clone();
    c.aud = a.audience.clone();
    c
}

/// Mints a token from a secret file (read the way the proxy reads it) or a PEM private key.
pub fn mint_token(a: &MintArgs) -> Result<(String, Claims)> {
    anyhow::ensure!(!a.ns.is_empty() && a.ns.len() <= 255, "--ns must be 1 to 255 bytes");
    let key = match (&a.secret_file, &a.key_file) {
        (Some(s), None) => SigningKey::hs256(&load_hs256_secret(s)?),
        (None, Some(k)) => SigningKey::load_pem(k)?,
        _ => anyhow::bail!("exactly one of --secret-file or --key-file is required"),
    };
    let claims = claims(a);
    let jwt = mint(&key, a.kid.as_deref(), &claims).context("signing the token")?;
    Ok((jwt, claims))
}

/// A JWKS (`{"keys":[...]}`, public halves only) of PEM private keys, one per kid.
pub fn jwks(keys: &[(String, PathBuf)]) -> Result<String> {
    let mut out = Vec::with_capacity(keys.len());
    let mut seen = std::collections::HashSet::new();
    for (kid, file) in keys {
        // The servers refuse a JWKS naming one kid twice.
        anyhow::ensure!(seen.insert(kid.as_str()), "kid {kid:?} is given twice");
        let key = SigningKey::load_pem(file)?;
        out.push(key.public_jwk(kid).with_context(|| file.display().to_string())?);
    }
    Ok(serde_json::to_string_pretty(&serde_json::json!({ "keys": out }))?)
}

#[cfg(test)]
#[path = "../../auth/tests/keys/mod.rs"]
mod test_keys;

#[cfg(test)]
mod tests {
    use super::*;
    use skv_proxy::auth::{KeySource, Verifier};
    use std::time::Duration;

    #[test]
    fn minted_tokens_verify_with_the_proxy_code() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s3cret-s3cret-s3cret-s3cret-s3cret\n").unwrap();
        let args = MintArgs {
            secret_file: Some(secret.clone()),
            key_file: None,
            kid: None,
            ns: "tenant-a".into(),
            role: RoleArg::Write,
            ttl: Duration::from_secs(3600),
            issuer: "skv".into(),
            audience: "skv".into(),
            sub: "me".into(),
        };
        let (jwt, claims) = mint_token(&args).unwrap();
        assert_eq!(claims.exp - claims.nbf, 3600);
        let key = skv_proxy::auth::load_hs256_secret(&secret).unwrap();
        let verifier = skv_proxy::auth::Verifier::hs256(&key, "skv", "skv");
        let got = verifier.verify(&jwt).unwrap();
        assert_eq!(got.ns, "tenant-a");
        assert_eq!(got.role, Role::Write);
        assert_eq!(got.sub, "me");
        // Another audience is refused.
        let other = skv_proxy::auth::Verifier::hs256(&key, "skv", "elsewhere");
        assert!(other.verify(&jwt).is_err());
        let bad = MintArgs {
            ns: String::new(),
            ..args
        };
        assert!(mint_token(&bad).is_err());
    }

    #[test]
    fn asymmetric_tokens_and_jwks_verify_with_the_proxy_code() {
        let dir = tempfile::tempdir().unwrap();
        let rsa = dir.path().join("rsa.pem");
        let ec = dir.path().join("ec.pem");
        std::fs::write(&rsa, super::test_keys::rsa().private_pem).unwrap();
        std::fs::write(&ec, super::test_keys::ec().private_pem).unwrap();
        let set = jwks(&[("old".into(), rsa.clone()), ("new".into(), ec.clone())]).unwrap();
        assert!(!set.contains("\"d\""), "private parts must not be printed: {set}");
        let file = dir.path().join("jwks.json");
        std::fs::write(&file, &set).unwrap();
        let (verifier, _) = Verifier::load(KeySource::Jwks(file), "skv", "skv").unwrap();
        let args = |key: &std::path::Path, kid: &str| MintArgs {
            secret_file: None,
            key_file: Some(key.to_path_buf()),
            kid: Some(kid.into()),
            ns: "tenant-a".into(),
            role: RoleArg::Read,
            ttl: Duration::from_secs(60),
            issuer: "skv".into(),
            audience: "skv".into(),
            sub: "me".into(),
        };
        for (key, kid) in [(&rsa, "old"), (&ec, "new")] {
            let (jwt, _) = mint_token(&args(key, kid)).unwrap();
            assert_eq!(verifier.verify(&jwt).unwrap().ns, "tenant-a", "{kid}");
        }
        // A key under another key's kid is refused.
        let (jwt, _) = mint_token(&args(&rsa, "new")).unwrap();
        assert!(verifier.verify(&jwt).is_err());
        // A secret file is not a PEM key.
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s3cret-s3cret-s3cret-s3cret-s3cret\n").unwrap();
        assert!(mint_token(&args(&secret, "x")).is_err());
        assert!(jwks(&[("x".into(), secret)]).is_err());
        let twice = jwks(&[("k".into(), rsa.clone()), ("k".into(), ec.clone())]);
        assert!(twice.is_err_and(|e| e.to_string().contains("twice")));
    }
}
