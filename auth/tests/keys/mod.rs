//! Test key pairs, generated with aws-lc-rs (already the crypto provider of
//! jsonwebtoken here), as PEM. Shared by the tests of skv-auth, the proxy, skvctl and testkit.
#![allow(dead_code)]

use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der, PublicKeyX509Der};
use aws_lc_rs::signature::KeyPair as _;
use base64::Engine;

/// A key pair in PEM: PKCS#8 private key, SubjectPublicKeyInfo public key.
pub struct TestKey {
    pub private_pem: String,
    pub public_pem: String,
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// An RSA-2048 key pair (RS256).
pub fn rsa() -> TestKey {
    let kp = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let private: Pkcs8V1Der = kp.as_der().unwrap();
    let public: PublicKeyX509Der = kp.public_key().as_der().unwrap();
    TestKey {
        private_pem: pem("PRIVATE KEY", private.as_ref()),
        public_pem: pem("PUBLIC KEY", public.as_ref()),
    }
}

/// A P-256 key pair (ES256).
pub fn ec() -> TestKey {
    ec_on(&aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING)
}

/// A P-384 key pair (not accepted: ES256 only).
pub fn ec_p384() -> TestKey {
    ec_on(&aws_lc_rs::signature::ECDSA_P384_SHA384_FIXED_SIGNING)
}

fn ec_on(alg: &'static aws_lc_rs::signature::EcdsaSigningAlgorithm) -> TestKey {
    let kp = aws_lc_rs::signature::EcdsaKeyPair::generate(alg).unwrap();
    let private = kp.to_pkcs8v1().unwrap();
    let public: PublicKeyX509Der = kp.public_key().as_der().unwrap();
    TestKey {
        private_pem: pem("PRIVATE KEY", private.as_ref()),
        public_pem: pem("PUBLIC KEY", public.as_ref()),
    }
}
