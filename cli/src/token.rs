//! `skvctl token mint`, with the proxy's own claims and minting code.

use crate::args::{MintArgs, RoleArg};
use anyhow::{Context, Result};
use skv_proxy::auth::{Claims, Role, load_hs256_secret, mint_hs256};

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

/// Mints a token from a secret file, read the way the proxy reads it.
pub fn mint(a: &MintArgs) -> Result<(String, Claims)> {
    anyhow::ensure!(!a.ns.is_empty() && a.ns.len() <= 255, "--ns must be 1 to 255 bytes");
    let secret = load_hs256_secret(&a.secret_file)?;
    let claims = claims(a);
    let jwt = mint_hs256(&secret, &claims).context("signing the token")?;
    Ok((jwt, claims))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn minted_tokens_verify_with_the_proxy_code() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s3cret-s3cret-s3cret-s3cret-s3cret\n").unwrap();
        let args = MintArgs {
            secret_file: secret.clone(),
            ns: "tenant-a".into(),
            role: RoleArg::Write,
            ttl: Duration::from_secs(3600),
            issuer: "skv".into(),
            audience: "skv".into(),
            sub: "me".into(),
        };
        let (jwt, claims) = mint(&args).unwrap();
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
        assert!(mint(&bad).is_err());
    }
}
