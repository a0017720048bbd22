//! Loading certificate files into tonic's TLS configuration, with errors
//! that name the file and what is wrong with it.

use std::fs;
use std::path::{Path, PathBuf};

use thiserror::Error;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Paths of a CA bundle, a certificate and its private key (PEM).
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// CA certificate(s) that sign the peers.
    pub ca: PathBuf,
    /// Own certificate.
    pub cert: PathBuf,
    /// Own private key.
    pub key: PathBuf,
}

/// A TLS file that cannot be used.
#[derive(Debug, Error)]
pub enum TlsError {
    /// Unreadable file.
    #[error("cannot read {what} {path}: {err}")]
    Read {
        /// "CA bundle", "certificate" or "private key".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
    /// Readable, but not what it should be.
    #[error("{what} {path} is not usable: {reason}")]
    Invalid {
        /// "CA bundle", "certificate" or "private key".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A private key that others than its owner may read.
    #[error(
        "private key {path} has mode {mode:04o}: a private key must be readable by its owner only (0600 or 0400); fix: chmod 600 {path}"
    )]
    KeyMode {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The private key is not the key of the certificate.
    #[error(
        "private key {key} does not belong to certificate {cert} (their public keys differ): configure the key issued together with this certificate, or issue both again"
    )]
    KeyMismatch {
        /// The certificate.
        cert: PathBuf,
        /// The key.
        key: PathBuf,
    },
    /// The certificate does not chain to the configured CA, or is outside
    /// its validity period.
    #[error("certificate {cert} is not valid for CA bundle {ca}: {reason}")]
    Untrusted {
        /// The certificate.
        cert: PathBuf,
        /// The CA bundle.
        ca: PathBuf,
        /// Why (expired, not yet valid, another CA, ...), with what to do.
        reason: String,
    },
    /// The certificate names another identity than this program's.
    #[error("certificate {cert} is {found}, but {wanted}")]
    WrongRole {
        /// The certificate.
        cert: PathBuf,
        /// What the certificate is ("the certificate of operator ann", ...).
        found: String,
        /// What is needed, with the command that issues it.
        wanted: String,
    },
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|err| TlsError::Read { what, path: path.to_path_buf(), err })
}

fn check_certs(what: &'static str, path: &Path, pem: &[u8]) -> Result<Vec<Vec<u8>>, TlsError> {
    let mut rd = pem;
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut rd).collect();
    let certs = certs.map_err(|e| TlsError::Invalid { what, path: path.to_path_buf(), reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::Invalid {
            what,
            path: path.to_path_buf(),
            reason: "no PEM CERTIFICATE block found".into(),
        });
    }
    for c in &certs {
        x509_parser::parse_x509_certificate(c).map_err(|e| TlsError::Invalid {
            what,
            path: path.to_path_buf(),
            reason: format!("not valid X.509: {e}"),
        })?;
    }
    Ok(certs.into_iter().map(|c| c.to_vec()).collect())
}

fn check_key(path: &Path, pem: &[u8]) -> Result<rustls::pki_types::PrivateKeyDer<'static>, TlsError> {
    let mut rd = pem;
    match rustls_pemfile::private_key(&mut rd) {
        Ok(Some(k)) => Ok(k),
        Ok(None) => Err(TlsError::Invalid {
            what: "private key",
            path: path.to_path_buf(),
            reason: "no PEM PRIVATE KEY block found".into(),
        }),
        Err(e) => Err(TlsError::Invalid { what: "private key", path: path.to_path_buf(), reason: e.to_string() }),
    }
}

/// Refuses a private key file that group or others may read or write:
/// whoever reads the key can act as this agent, controller or operator.
pub fn check_key_mode(path: &Path) -> Result<(), TlsError> {
    let mode = crate::files::mode(path).map_err(|err| TlsError::Read {
        what: "private key",
        path: path.to_path_buf(),
        err,
    })?;
    if crate::files::is_shared(mode) {
        return Err(TlsError::KeyMode { path: path.to_path_buf(), mode });
    }
    Ok(())
}

/// Refuses a key that is not the certificate's: compares the public key
/// derived from the private key with the certificate's.
fn check_key_matches(
    files: &TlsFiles,
    cert_der: &[u8],
    key: &rustls::pki_types::PrivateKeyDer<'_>,
) -> Result<(), TlsError> {
    use rustls::sign::CertifiedKey;
    let signing = rustls::crypto::ring::sign::any_supported_type(key).map_err(|e| TlsError::Invalid {
        what: "private key",
        path: files.key.clone(),
        reason: format!("unsupported key type: {e}"),
    })?;
    let ck = CertifiedKey::new(vec![rustls::pki_types::CertificateDer::from(cert_der.to_vec())], signing);
    match ck.keys_match() {
        Ok(()) => Ok(()),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(TlsError::KeyMismatch { cert: files.cert.clone(), key: files.key.clone() })
        }
        Err(e) => Err(TlsError::Invalid {
            what: "private key",
            path: files.key.clone(),
            reason: format!("cannot check it against certificate {}: {e}", files.cert.display()),
        }),
    }
}

/// Loaded and checked PEM material.
#[derive(Debug, Clone)]
pub struct TlsMaterial {
    /// CA bundle PEM.
    pub ca_pem: Vec<u8>,
    /// Own certificate PEM.
    pub cert_pem: Vec<u8>,
    /// Own key PEM.
    pub key_pem: Vec<u8>,
    /// DER of own leaf certificate.
    pub cert_der: Vec<u8>,
}

impl TlsFiles {
    /// Reads and checks all three files.
    pub fn load(&self) -> Result<TlsMaterial, TlsError> {
        let ca_pem = read("CA bundle", &self.ca)?;
        check_certs("CA bundle", &self.ca, &ca_pem)?;
        let cert_pem = read("certificate", &self.cert)?;
        let cert_der = check_certs("certificate", &self.cert, &cert_pem)?.remove(0);
        check_key_mode(&self.key)?;
        let key_pem = read("private key", &self.key)?;
        let key = check_key(&self.key, &key_pem)?;
        check_key_matches(self, &cert_der, &key)?;
        Ok(TlsMaterial { ca_pem, cert_pem, key_pem, cert_der })
    }

    /// Everything a controller or agent checks about its own certificate
    /// before it serves or dials: [`TlsFiles::load`] (files readable, key
    /// owner-only and matching), then the certificate's chain to the
    /// configured CA and its validity at `now_unix_s`, then the identity it
    /// carries (`want`).
    pub fn load_for(&self, want: &crate::identity::Identity, now_unix_s: i64) -> Result<TlsMaterial, TlsError> {
        let m = self.load()?;
        m.check_trusted(self, now_unix_s)?;
        m.check_identity(self, want)?;
        Ok(m)
    }
}

fn describe(id: &crate::identity::Identity) -> String {
    use crate::identity::Identity;
    match id {
        Identity::Agent { host_id } => format!("the agent certificate of host '{host_id}'"),
        Identity::Controller => "the controller's certificate".to_string(),
        Identity::Client { name, role } => format!("the client certificate of {role} '{name}' (for the lifeboat CLI)"),
    }
}

fn wanted(id: &crate::identity::Identity) -> String {
    use crate::identity::Identity;
    match id {
        Identity::Agent { host_id } => format!(
            "this agent (host id '{host_id}') needs its host's agent certificate: lifeboat certs issue --ca-dir CA_DIR --agent {host_id}"
        ),
        Identity::Controller => {
            "the controller needs a controller certificate: lifeboat certs issue --ca-dir CA_DIR --controller --san NAME".to_string()
        }
        Identity::Client { .. } => "a client certificate is needed here".to_string(),
    }
}

impl TlsMaterial {
    /// Checks that the own certificate is within its validity period at
    /// `now_unix_s` and is signed by (chains to) the configured CA bundle.
    pub fn check_trusted(&self, files: &TlsFiles, now_unix_s: i64) -> Result<(), TlsError> {
        use rustls::pki_types::{CertificateDer, UnixTime};
        let untrusted = |reason: String| TlsError::Untrusted { cert: files.cert.clone(), ca: files.ca.clone(), reason };
        let (_, leaf) = x509_parser::parse_x509_certificate(&self.cert_der).map_err(|e| TlsError::Invalid {
            what: "certificate",
            path: files.cert.clone(),
            reason: format!("not valid X.509: {e}"),
        })?;
        let v = leaf.validity();
        if now_unix_s < v.not_before.timestamp() {
            return Err(untrusted(format!("it is not valid before {} (check this machine's clock)", v.not_before)));
        }
        if now_unix_s > v.not_after.timestamp() {
            return Err(untrusted(format!(
                "it expired on {}: issue a new one with `lifeboat certs issue`",
                v.not_after
            )));
        }
        let mut roots = rustls::RootCertStore::empty();
        let mut rd = &self.ca_pem[..];
        for c in rustls_pemfile::certs(&mut rd).flatten() {
            roots.add(c).map_err(|e| TlsError::Invalid {
                what: "CA bundle",
                path: files.ca.clone(),
                reason: e.to_string(),
            })?;
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(std::sync::Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Invalid { what: "CA bundle", path: files.ca.clone(), reason: e.to_string() })?;
        let mut rd = &self.cert_pem[..];
        let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut rd).flatten().collect();
        let Some((end, intermediates)) = chain.split_first() else {
            return Err(TlsError::Invalid {
                what: "certificate",
                path: files.cert.clone(),
                reason: "no PEM CERTIFICATE block found".into(),
            });
        };
        let now = UnixTime::since_unix_epoch(std::time::Duration::from_secs(u64::try_from(now_unix_s).unwrap_or(0)));
        match verifier.verify_client_cert(end, intermediates, now) {
            Ok(_) => Ok(()),
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer | rustls::CertificateError::BadSignature)) => {
                Err(untrusted(
                    "it is not signed by this CA (a certificate of another installation or CA?): issue one with this CA (`lifeboat certs issue --ca-dir CA_DIR`) or configure the CA that signed it".to_string(),
                ))
            }
            Err(e) => Err(untrusted(e.to_string())),
        }
    }

    /// Checks that the own certificate carries identity `want`.
    pub fn check_identity(&self, files: &TlsFiles, want: &crate::identity::Identity) -> Result<(), TlsError> {
        let found = crate::identity::identity_from_der(&self.cert_der).map_err(|e| TlsError::Invalid {
            what: "certificate",
            path: files.cert.clone(),
            reason: e.to_string(),
        })?;
        if &found == want {
            return Ok(());
        }
        Err(TlsError::WrongRole { cert: files.cert.clone(), found: describe(&found), wanted: wanted(want) })
    }
}

impl TlsMaterial {
    /// Server side: present our certificate, require a client certificate
    /// signed by the CA.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
            .client_auth_optional(false)
    }

    /// Client side: verify the server as `server_name`, present our
    /// certificate.
    pub fn client_config(&self, server_name: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .domain_name(server_name)
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
    }
}

/// Installs the ring crypto provider for rustls once per process.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{Identity as Id, Role};
    use crate::pki::{self, Leaf};
    use std::os::unix::fs::PermissionsExt;

    fn now() -> i64 {
        crate::now_unix_ms() / 1000
    }

    fn setup(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lb-tls-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        pki::init(&d).unwrap();
        pki::issue(&d, &d, &Leaf::Controller(vec![])).unwrap();
        pki::issue(&d, &d, &Leaf::Agent("host-a".into())).unwrap();
        pki::issue(&d, &d, &Leaf::Client("ann".into(), Role::Operator)).unwrap();
        d
    }

    fn files(d: &Path, stem: &str) -> TlsFiles {
        TlsFiles { ca: d.join("ca.pem"), cert: d.join(format!("{stem}.pem")), key: d.join(format!("{stem}.key")) }
    }

    #[test]
    fn good_files_pass_every_check() {
        let d = setup("good");
        files(&d, "controller").load_for(&Id::Controller, now()).unwrap();
        files(&d, "agent-host-a").load_for(&Id::Agent { host_id: "host-a".into() }, now()).unwrap();
        fs::set_permissions(d.join("controller.key"), fs::Permissions::from_mode(0o400)).unwrap();
        files(&d, "controller").load().expect("0400 is owner-only too");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_key_readable_by_others_is_refused_with_the_chmod_fix() {
        let d = setup("mode");
        let key = d.join("controller.key");
        for mode in [0o644, 0o640, 0o604, 0o660] {
            fs::set_permissions(&key, fs::Permissions::from_mode(mode)).unwrap();
            let e = files(&d, "controller").load().unwrap_err();
            assert!(matches!(e, TlsError::KeyMode { .. }), "{e}");
            let m = e.to_string();
            assert!(m.contains(&format!("chmod 600 {}", key.display())) && m.contains(&format!("{mode:04o}")), "{m}");
        }
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let d = setup("mismatch");
        let f = TlsFiles { ca: d.join("ca.pem"), cert: d.join("controller.pem"), key: d.join("agent-host-a.key") };
        let e = f.load().unwrap_err();
        assert!(matches!(e, TlsError::KeyMismatch { .. }), "{e}");
        assert!(e.to_string().contains("does not belong to certificate"), "{e}");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_certificate_of_the_wrong_role_is_refused() {
        let d = setup("role");
        let e = files(&d, "client-ann").load_for(&Id::Controller, now()).unwrap_err().to_string();
        assert!(e.contains("operator 'ann'") && e.contains("--controller"), "{e}");
        let e =
            files(&d, "controller").load_for(&Id::Agent { host_id: "host-a".into() }, now()).unwrap_err().to_string();
        assert!(e.contains("controller's certificate") && e.contains("--agent host-a"), "{e}");
        let e =
            files(&d, "agent-host-a").load_for(&Id::Agent { host_id: "host-b".into() }, now()).unwrap_err().to_string();
        assert!(e.contains("host 'host-a'") && e.contains("--agent host-b"), "{e}");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_certificate_of_another_ca_is_refused() {
        let d = setup("foreign");
        let other = setup("foreign-other");
        let f = TlsFiles { ca: other.join("ca.pem"), cert: d.join("controller.pem"), key: d.join("controller.key") };
        let e = f.load_for(&Id::Controller, now()).unwrap_err();
        assert!(matches!(e, TlsError::Untrusted { .. }), "{e}");
        assert!(e.to_string().contains("not signed by this CA"), "{e}");
        fs::remove_dir_all(&d).unwrap();
        fs::remove_dir_all(&other).unwrap();
    }

    #[test]
    fn an_expired_or_not_yet_valid_certificate_is_refused() {
        let d = setup("expired");
        let f = files(&d, "controller");
        // Leaf certificates are issued for 825 days.
        let e = f.load_for(&Id::Controller, now() + 900 * 86_400).unwrap_err().to_string();
        assert!(e.contains("expired on"), "{e}");
        let e = f.load_for(&Id::Controller, now() - 86_400).unwrap_err().to_string();
        assert!(e.contains("not valid before"), "{e}");
        fs::remove_dir_all(&d).unwrap();
    }
}
