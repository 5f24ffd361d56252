//! TLS for skv's gRPC (issue 12, ADR 0022): rustls with aws-lc-rs as its only provider
//! (tonic's `tls-aws-lc`), certificates and keys read from PEM files.
//!
//! - [`ServerTls`]: a server's certificate and key, and the CA its clients' certificates must
//!   chain to. With a CA, a client without a certificate, or with one from another CA (or
//!   expired), is refused at the handshake (mTLS). Without one (the proxy's client port
//!   when no `--client-tls-ca-file` is given), any client that trusts our certificate may
//!   connect.
//! - [`ClientTls`]: the CA that servers' certificates must chain to, and optionally our own
//!   certificate and key (mTLS). [`crate::EndpointOptions::tls`] carries it; `https://`
//!   endpoints and bare `host:port` addresses then use it (`http://` stays plaintext).
//! - Roles: every certificate `skvctl certs create` makes names its role in a SAN URI
//!   `spiffe://skv/role/<role>` ([`PeerRole`]). [`RequireRole`] is the interceptor a server
//!   puts in front of a service to admit only some roles (a proxy certificate cannot call
//!   Raft).
//!
//! A server's files are re-read every few seconds ([`ServerTls::incoming`]): its certificate
//! rotates without a restart. A client's are read once, when its channels are built.

pub use crate::role_gate::{RoleGate, RolePolicy};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use tonic::{Request, Status};

/// The start of the SAN URI that names a certificate's role.
pub const ROLE_URI_PREFIX: &str = "spiffe://skv/role/";
/// Largest PEM file read.
const MAX_PEM_LEN: u64 = 1 << 20;
/// A handshake that takes longer is dropped (a peer that connects and sends nothing).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a certificate allows its holder to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PeerRole {
    Placement,
    Storenode,
    Proxy,
    /// An operator's client (`skvctl` admin commands).
    Admin,
}

impl PeerRole {
    pub const ALL: [PeerRole; 4] = [
        PeerRole::Placement,
        PeerRole::Storenode,
        PeerRole::Proxy,
        PeerRole::Admin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PeerRole::Placement => "placement",
            PeerRole::Storenode => "storenode",
            PeerRole::Proxy => "proxy",
            PeerRole::Admin => "admin",
        }
    }

    /// `spiffe://skv/role/<role>`, the SAN URI of this role's certificates.
    pub fn uri(self) -> String {
        format!("{ROLE_URI_PREFIX}{}", self.as_str())
    }

    /// The role a SAN URI names, if it is one of ours.
    pub fn from_uri(uri: &str) -> Option<PeerRole> {
        let name = uri.strip_prefix(ROLE_URI_PREFIX)?;
        PeerRole::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

impl std::fmt::Display for PeerRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why TLS could not be set up. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    /// Some of a group of flags given, not all.
    #[error("{given} needs {missing} too")]
    Incomplete { given: &'static str, missing: &'static str },
    #[error("{0}")]
    Tonic(String),
}

/// Reads a PEM file of at most 1 MiB and checks that it holds `label` blocks.
fn read_pem(path: &Path, what: &str, labels: &[&str]) -> Result<Vec<u8>, TlsError> {
    use std::io::Read as _;
    let read = |source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read)?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_LEN + 1).read_to_end(&mut bytes).map_err(read)?;
    let invalid = |reason: String| TlsError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.len() as u64 > MAX_PEM_LEN {
        return Err(invalid(format!("larger than {MAX_PEM_LEN} bytes")));
    }
    let text = std::str::from_utf8(&bytes).map_err(|_| invalid(format!("not a PEM {what}")))?;
    if !labels.iter().any(|l| text.contains(&format!("-----BEGIN {l}-----"))) {
        return Err(invalid(format!("holds no PEM {what} ({})", labels.join(" or "))));
    }
    Ok(bytes)
}

pub(crate) fn read_cert(path: &Path) -> Result<Vec<u8>, TlsError> {
    read_pem(path, "certificate", &["CERTIFICATE"])
}

pub(crate) fn read_key(path: &Path) -> Result<Vec<u8>, TlsError> {
    read_pem(
        path,
        "private key",
        &["PRIVATE KEY", "EC PRIVATE KEY", "RSA PRIVATE KEY"],
    )
}

/// A server's TLS: its certificate chain and key, and the CA of its clients (mTLS) if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Clients must present a certificate that chains to this CA (mTLS).
    pub client_ca_file: Option<PathBuf>,
}

impl ServerTls {
    /// From a server's three flags (`--tls-cert-file`, `--tls-key-file`, `--tls-ca-file`):
    /// none (plaintext) or all of them; `names` are the flags' names for the error.
    pub fn from_flags(
        cert: Option<&Path>,
        key: Option<&Path>,
        ca: Option<&Path>,
        names: [&'static str; 3],
    ) -> Result<Option<ServerTls>, TlsError> {
        match (cert, key, ca) {
            (None, None, None) => Ok(None),
            (Some(c), Some(k), Some(a)) => Ok(Some(ServerTls {
                cert_file: c.to_path_buf(),
                key_file: k.to_path_buf(),
                client_ca_file: Some(a.to_path_buf()),
            })),
            (c, k, _) => {
                let missing = if c.is_none() {
                    names[0]
                } else if k.is_none() {
                    names[1]
                } else {
                    names[2]
                };
                let given = if c.is_some() {
                    names[0]
                } else if k.is_some() {
                    names[1]
                } else {
                    names[2]
                };
                Err(TlsError::Incomplete { given, missing })
            }
        }
    }

    /// Reads the files into tonic's server configuration.
    pub fn load(&self) -> Result<ServerTlsConfig, TlsError> {
        let cert = read_cert(&self.cert_file)?;
        let key = read_key(&self.key_file)?;
        let mut config = ServerTlsConfig::new()
            .identity(Identity::from_pem(cert, key))
            .timeout(HANDSHAKE_TIMEOUT);
        if let Some(ca) = &self.client_ca_file {
            config = config
                .client_ca_root(Certificate::from_pem(read_cert(ca)?))
                .client_auth_optional(false);
        }
        Ok(config)
    }
}

/// A client's TLS: the CA that servers must chain to, and optionally our own certificate.
///
/// Channels built by [`crate::channel_with`] re-read the files when they open a new
/// connection at most every [`crate::tls_client::RELOAD_EVERY`] (ADR 0022): a rotated
/// certificate or CA is presented on the next connections without a restart.
#[derive(Clone)]
pub struct ClientTls {
    config: ClientTlsConfig,
    /// The role our certificate names, if we present one (for logs).
    pub identity_role: Option<PeerRole>,
    pub(crate) files: crate::tls_client::Files,
}

/// By hand: tonic's `ClientTlsConfig` prints its identity, private key bytes included.
impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("identity_role", &self.identity_role)
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Trusts servers whose certificate chains to `ca_file`; presents `identity`
    /// (certificate file, key file) when given.
    pub fn load(ca_file: &Path, identity: Option<(&Path, &Path)>) -> Result<ClientTls, TlsError> {
        let mut config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read_cert(ca_file)?))
            .timeout(HANDSHAKE_TIMEOUT);
        let mut identity_role = None;
        if let Some((cert_file, key_file)) = identity {
            let cert = read_cert(cert_file)?;
            identity_role = role_of_pem(&cert);
            config = config.identity(Identity::from_pem(cert, read_key(key_file)?));
        }
        let files = crate::tls_client::Files::load(ca_file, identity)?;
        Ok(ClientTls {
            config,
            identity_role,
            files,
        })
    }

    /// From a client's flags: a CA file and an optional certificate and key (both or none).
    pub fn from_flags(
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
        names: [&'static str; 3],
    ) -> Result<Option<ClientTls>, TlsError> {
        match (ca, cert, key) {
            (None, None, None) => Ok(None),
            (None, _, _) => Err(TlsError::Incomplete {
                given: if cert.is_some() { names[1] } else { names[2] },
                missing: names[0],
            }),
            (Some(ca), Some(c), Some(k)) => Self::load(ca, Some((c, k))).map(Some),
            (Some(ca), None, None) => Self::load(ca, None).map(Some),
            (Some(_), Some(_), None) => Err(TlsError::Incomplete {
                given: names[1],
                missing: names[2],
            }),
            (Some(_), None, Some(_)) => Err(TlsError::Incomplete {
                given: names[2],
                missing: names[1],
            }),
        }
    }

    /// tonic's configuration (also what etcd-client takes as its `TlsOptions`).
    pub fn config(&self) -> ClientTlsConfig {
        self.config.clone()
    }
}

/// A transport failure's message with its causes, and, when they point at TLS, what they
/// most likely mean (tonic alone says "transport error" or "connection closed"). `tls`:
/// whether the failed channel spoke TLS.
pub fn explain_transport(status: &Status, tls: bool) -> String {
    let mut chain = status.message().to_string();
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        let t = e.to_string();
        if !chain.contains(&t) {
            chain.push_str(": ");
            chain.push_str(&t);
        }
        source = e.source();
    }
    let hint = if chain.contains("invalid peer certificate") {
        Some(
            "TLS handshake failed: the server's certificate does not chain to our CA file, names another host, or has expired",
        )
    } else if chain.contains("received fatal alert") {
        Some(
            "TLS handshake refused by the server: it wants a client certificate of its CA (none given, another CA's, or expired)",
        )
    } else if tls && (chain.contains("connection closed") || chain.contains("broken pipe")) {
        Some(
            "the server closed the TLS connection at the handshake: it may have refused our certificate (another CA's, expired, or none)",
        )
    } else if !tls && (chain.contains("frame with invalid size") || chain.contains("invalid HTTP")) {
        Some("the server does not speak plaintext HTTP/2: it may serve TLS (use https:// and a CA file)")
    } else {
        None
    };
    match hint {
        Some(h) => format!("{h} ({chain})"),
        None => chain,
    }
}

/// The role named by a certificate (DER): its first SAN URI under [`ROLE_URI_PREFIX`].
pub fn role_of_der(der: &[u8]) -> Option<PeerRole> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => PeerRole::from_uri(u),
        _ => None,
    })
}

/// The role of the first certificate in a PEM file's contents.
fn role_of_pem(pem: &[u8]) -> Option<PeerRole> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem).ok()?;
    role_of_der(&p.contents)
}

/// The role of the peer of a request on a TLS server (None: no TLS, or a certificate that
/// names no skv role).
pub fn peer_role<T>(request: &Request<T>) -> Option<PeerRole> {
    let certs = request.peer_certs()?;
    role_of_der(certs.first()?.as_ref())
}

/// An interceptor that admits only peers whose certificate names one of `allowed` roles.
/// On a server without TLS (`enabled` false) it admits everyone: there is no certificate
/// to check.
#[derive(Clone, Debug)]
pub struct RequireRole {
    enabled: bool,
    service: &'static str,
    allowed: &'static [PeerRole],
}

impl RequireRole {
    pub fn new(enabled: bool, service: &'static str, allowed: &'static [PeerRole]) -> Self {
        RequireRole {
            enabled,
            service,
            allowed,
        }
    }

    /// The decision, for a peer whose certificate names `role` (None: no certificate, or
    /// one without an skv role).
    pub fn admits(&self, role: Option<PeerRole>) -> Result<(), Status> {
        if !self.enabled {
            return Ok(());
        }
        match role {
            Some(r) if self.allowed.contains(&r) => Ok(()),
            Some(r) => Err(Status::permission_denied(format!(
                "{} {r} certificate cannot call {} (allowed: {})",
                if r == PeerRole::Admin { "an" } else { "a" },
                self.service,
                self.allowed.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(", ")
            ))),
            None => Err(Status::permission_denied(format!(
                "{} needs a client certificate naming an skv role ({ROLE_URI_PREFIX}<role>)",
                self.service
            ))),
        }
    }
}

impl tonic::service::Interceptor for RequireRole {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.admits(peer_role(&request))?;
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_uris_round_trip() {
        for r in PeerRole::ALL {
            assert_eq!(PeerRole::from_uri(&r.uri()), Some(r));
        }
        assert_eq!(PeerRole::from_uri("spiffe://skv/role/root"), None);
        assert_eq!(PeerRole::from_uri("spiffe://other/role/admin"), None);
    }

    #[test]
    fn require_role_decides() {
        let raft = RequireRole::new(true, "skv.internal.v1.Raft", &[PeerRole::Storenode]);
        assert!(raft.admits(Some(PeerRole::Storenode)).is_ok());
        let e = raft.admits(Some(PeerRole::Proxy)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(
            e.message()
                .contains("a proxy certificate cannot call skv.internal.v1.Raft"),
            "{e:?}"
        );
        assert!(raft.admits(None).is_err());
        // Without TLS there is nothing to check.
        assert!(RequireRole::new(false, "x", &[]).admits(None).is_ok());
    }

    #[test]
    fn transport_failures_name_tls() {
        let e = Status::unknown("transport error: received fatal alert: CertificateRequired");
        assert!(explain_transport(&e, true).starts_with("TLS handshake refused by the server"));
        let e = Status::cancelled("operation was canceled: connection closed");
        assert!(explain_transport(&e, true).contains("closed the TLS connection"));
        assert!(!explain_transport(&e, false).contains("TLS"));
        let e = Status::internal("h2 protocol error: frame with invalid size");
        assert!(explain_transport(&e, false).contains("may serve TLS"));
        assert_eq!(explain_transport(&Status::unavailable("down"), true), "down");
    }

    #[test]
    fn flags_are_all_or_nothing() {
        let p = Some(Path::new("/x"));
        let names = ["--tls-cert-file", "--tls-key-file", "--tls-ca-file"];
        assert_eq!(ServerTls::from_flags(None, None, None, names).unwrap(), None);
        assert!(ServerTls::from_flags(p, p, p, names).unwrap().is_some());
        let e = ServerTls::from_flags(p, None, p, names).unwrap_err().to_string();
        assert_eq!(e, "--tls-cert-file needs --tls-key-file too");
        let e = ServerTls::from_flags(p, p, None, names).unwrap_err().to_string();
        assert_eq!(e, "--tls-cert-file needs --tls-ca-file too");
        let e = ClientTls::from_flags(None, p, p, ["--ca-file", "--cert", "--key"])
            .unwrap_err()
            .to_string();
        assert_eq!(e, "--cert needs --ca-file too");
    }

    #[test]
    fn unreadable_or_wrong_files_are_errors() {
        let dir = std::env::temp_dir().join(format!("skv-rpc-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "hello").unwrap();
        assert!(matches!(
            ClientTls::load(&dir.join("missing.pem"), None),
            Err(TlsError::Read { .. })
        ));
        let e = ClientTls::load(&junk, None).unwrap_err().to_string();
        assert!(e.contains("holds no PEM certificate"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
