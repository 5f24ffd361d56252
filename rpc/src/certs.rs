//! Development certificates (feature `dev-certs`): what `skvctl certs create` writes, and
//! what tests use. A CA and one certificate per role (ADR 0022).
//!
//! Keys are ECDSA P-256, made and signed by rcgen on aws-lc-rs (no ring). Each leaf
//! certificate carries the hosts as SANs (DNS names and IP addresses), its role as a SAN
//! URI `spiffe://skv/role/<role>` (what servers check: a proxy certificate cannot call
//! Raft) and as the subject's OU, and both server and client authentication, since every
//! component is both.

use crate::tls::PeerRole;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

/// Why the certificates could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("{0}")]
    Usage(String),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Rcgen {
        what: String,
        #[source]
        source: rcgen::Error,
    },
}

type Result<T> = std::result::Result<T, CertsError>;

fn rc(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> CertsError {
    let what = what.into();
    move |source| CertsError::Rcgen { what, source }
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CertsError + use<> {
    let path = path.to_path_buf();
    move |source| CertsError::Io { what, path, source }
}

/// The files one run writes, relative to the directory.
pub fn file_names() -> Vec<String> {
    let mut v = vec!["ca.pem".to_string(), "ca-key.pem".to_string()];
    for r in PeerRole::ALL {
        v.push(format!("{r}.pem"));
        v.push(format!("{r}-key.pem"));
    }
    v
}

fn write(path: &Path, text: &str, secret: bool) -> Result<()> {
    use std::io::Write as _;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut f = opts.open(path).map_err(io("creating", path))?;
    f.write_all(text.as_bytes()).map_err(io("writing", path))
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = OffsetDateTime::now_utc();
    // A little before now: clocks of the machines involved may differ.
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(i64::from(days));
}

/// Writes the CA and one certificate and key per role into `dir`; returns the paths written.
pub fn create(dir: &Path, hosts: &[String], days: u32, force: bool) -> Result<Vec<PathBuf>> {
    create_inner(dir, hosts, days, force, false)
}

/// As [`create`], plus `<role>-expired.pem` for every role: the same key and CA, expired
/// yesterday. For tests that an expired certificate is refused at the handshake.
pub fn create_expired(dir: &Path, hosts: &[String]) -> Result<Vec<PathBuf>> {
    create_inner(dir, hosts, 1, true, true)
}

fn create_inner(dir: &Path, hosts: &[String], days: u32, force: bool, expired: bool) -> Result<Vec<PathBuf>> {
    let hosts: Vec<String> = hosts
        .iter()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .collect();
    if hosts.is_empty() {
        return Err(CertsError::Usage("--hosts names no host".into()));
    }
    if days == 0 {
        return Err(CertsError::Usage("--days must be at least 1".into()));
    }
    std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    if dir.join("ca.pem").exists() && !force {
        return Err(CertsError::Usage(format!(
            "{} already holds a CA (ca.pem); pass --force to replace every file",
            dir.display()
        )));
    }

    let ca_key = KeyPair::generate().map_err(rc("generating the CA key"))?;
    let ca = ca_params(days);
    let ca_cert = ca.self_signed(&ca_key).map_err(rc("signing the CA"))?;
    let mut written = Vec::new();
    let mut out = |name: String, text: String, secret: bool| -> Result<()> {
        let p = dir.join(name);
        write(&p, &text, secret)?;
        written.push(p);
        Ok(())
    };
    out("ca.pem".into(), ca_cert.pem(), false)?;
    out("ca-key.pem".into(), ca_key.serialize_pem(), true)?;
    let issuer = Issuer::new(ca, ca_key);

    for role in PeerRole::ALL {
        let key = KeyPair::generate().map_err(rc(format!("generating the {role} key")))?;
        let mut p = leaf_params(role, &hosts, days)?;
        let cert = p
            .signed_by(&key, &issuer)
            .map_err(rc(format!("signing the {role} certificate")))?;
        out(format!("{role}.pem"), cert.pem(), false)?;
        out(format!("{role}-key.pem"), key.serialize_pem(), true)?;
        if expired {
            let now = OffsetDateTime::now_utc();
            p.not_before = now - Duration::days(2);
            p.not_after = now - Duration::days(1);
            let cert = p
                .signed_by(&key, &issuer)
                .map_err(rc(format!("signing the expired {role} certificate")))?;
            out(format!("{role}-expired.pem"), cert.pem(), false)?;
        }
    }
    Ok(written)
}

/// The development CA's parameters (its subject is the same every time, so a CA
/// certificate and key on disk can sign again: [`reissue`]).
fn ca_params(days: u32) -> CertificateParams {
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name = DistinguishedName::new();
    ca.distinguished_name.push(DnType::CommonName, "skv development CA");
    ca.distinguished_name.push(DnType::OrganizationName, "skv");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut ca, days);
    ca
}

fn leaf_params(role: PeerRole, hosts: &[String], days: u32) -> Result<CertificateParams> {
    let mut p = CertificateParams::new(hosts.to_vec()).map_err(rc("--hosts"))?;
    p.subject_alt_names.push(SanType::URI(
        role.uri().try_into().map_err(rc(format!("role URI {}", role.uri())))?,
    ));
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, format!("skv {role}"));
    p.distinguished_name.push(DnType::OrganizationName, "skv");
    p.distinguished_name.push(DnType::OrganizationalUnitName, role.as_str());
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    p.use_authority_key_identifier_extension = true;
    validity(&mut p, days);
    Ok(p)
}

/// A new certificate and key for `role`, signed by the CA in `ca_dir` (its `ca.pem` and
/// `ca-key.pem`, as [`create`] wrote them), valid `days`: written to `out_dir` as
/// `<role>.pem` and `<role>-key.pem`. For rotation: the new files chain to the same CA
/// but carry a new key, serial and expiry.
pub fn reissue(ca_dir: &Path, out_dir: &Path, role: PeerRole, hosts: &[String], days: u32) -> Result<Vec<PathBuf>> {
    if days == 0 {
        return Err(CertsError::Usage("--days must be at least 1".into()));
    }
    let key_path = ca_dir.join("ca-key.pem");
    let ca_key_pem = std::fs::read_to_string(&key_path).map_err(io("reading", &key_path))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(rc(format!("{}", key_path.display())))?;
    let issuer = Issuer::new(ca_params(days), ca_key);
    std::fs::create_dir_all(out_dir).map_err(io("creating", out_dir))?;
    let key = KeyPair::generate().map_err(rc(format!("generating the {role} key")))?;
    let cert = leaf_params(role, hosts, days)?
        .signed_by(&key, &issuer)
        .map_err(rc(format!("signing the {role} certificate")))?;
    let (c, k) = (
        out_dir.join(format!("{role}.pem")),
        out_dir.join(format!("{role}-key.pem")),
    );
    write(&c, &cert.pem(), false)?;
    write(&k, &key.serialize_pem(), true)?;
    Ok(vec![c, k])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_gets_a_certificate_naming_it() {
        let dir = TempDir::new();
        let written = create(dir.path(), &["127.0.0.1".into(), "localhost".into()], 30, false).unwrap();
        assert_eq!(written.len(), file_names().len());
        for role in PeerRole::ALL {
            let pem = std::fs::read(dir.path().join(format!("{role}.pem"))).unwrap();
            let (_, p) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
            assert_eq!(crate::tls::role_of_der(&p.contents), Some(role));
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt as _;
                let mode = std::fs::metadata(dir.path().join(format!("{role}-key.pem")))
                    .unwrap()
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o077, 0, "{role} key readable by others");
            }
            // The files load as TLS configuration, and its Debug shows no key material.
            let tls = crate::tls::ClientTls::load(
                &dir.path().join("ca.pem"),
                Some((
                    &dir.path().join(format!("{role}.pem")),
                    &dir.path().join(format!("{role}-key.pem")),
                )),
            )
            .unwrap();
            let shown = format!("{tls:?}");
            let key = std::fs::read_to_string(dir.path().join(format!("{role}-key.pem"))).unwrap();
            let key_line = key.lines().nth(1).unwrap();
            assert!(!shown.contains(key_line) && !shown.contains("PRIVATE KEY"), "{shown}");
            let key_bytes = format!("{:?}", &key.as_bytes()[..16]);
            assert!(!shown.contains(key_bytes.trim_end_matches(']')), "{shown}");
        }
        // A second run does not overwrite the CA unless told to.
        let e = create(dir.path(), &["127.0.0.1".into()], 30, false).unwrap_err();
        assert!(e.to_string().contains("--force"), "{e}");
        create(dir.path(), &["127.0.0.1".into()], 30, true).unwrap();
        assert!(create(dir.path(), &[" ".into()], 30, true).is_err());
        // A reissued certificate chains to the same CA and names its role.
        let out = dir.path().join("new");
        reissue(dir.path(), &out, PeerRole::Storenode, &["127.0.0.1".into()], 2).unwrap();
        let pem = std::fs::read(out.join("storenode.pem")).unwrap();
        let (_, p) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        assert_eq!(crate::tls::role_of_der(&p.contents), Some(PeerRole::Storenode));
        crate::tls::ServerTls {
            cert_file: out.join("storenode.pem"),
            key_file: out.join("storenode-key.pem"),
            client_ca_file: Some(dir.path().join("ca.pem")),
        }
        .load()
        .unwrap();
    }

    /// A directory removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            let p = std::env::temp_dir().join(format!(
                "skv-certs-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos())
            ));
            TempDir(p)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
