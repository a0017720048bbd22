//! A small certificate authority for a Lifeboat installation (rcgen).
//!
//! `init` makes the CA; `issue_*` make leaf certificates whose subject
//! carries the identity read back by [`crate::identity`].

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use thiserror::Error;

use crate::identity::{ORGANIZATION, Role};

/// The DNS name every controller certificate carries; agents and the CLI
/// verify the controller against it unless told otherwise.
pub const CONTROLLER_NAME: &str = "lifeboat-controller";

/// PKI failures, each naming the file or value at fault.
#[derive(Debug, Error)]
pub enum PkiError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// File concerned.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// rcgen refused.
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// `init` would overwrite an existing CA.
    #[error("{0} already exists; refusing to overwrite an existing CA")]
    Exists(PathBuf),
    /// A name that can't go into a certificate.
    #[error("invalid name '{0}': use letters, digits, '.', '-' and '_' only")]
    BadName(String),
}

/// What kind of leaf certificate to issue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leaf {
    /// An agent for host `host_id`.
    Agent(String),
    /// The controller, with extra SANs (DNS names or IP addresses).
    Controller(Vec<String>),
    /// A person or tool with a role.
    Client(String, Role),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io { path: path.to_path_buf(), source }
}

fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    let mut f =
        fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(path).map_err(io(path))?;
    // `mode` applies only when the file is created: a key written over an
    // older file keeps that file's mode unless set here, before the key is in it.
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode)).map_err(io(path))?;
    f.write_all(contents.as_bytes()).map_err(io(path))
}

fn valid_name(name: &str) -> Result<(), PkiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if ok { Ok(()) } else { Err(PkiError::BadName(name.to_string())) }
}

fn validity(params: &mut CertificateParams, lasting: time::Duration) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + lasting;
}

/// How long a leaf certificate lasts by default.
pub const LEAF_DAYS: i64 = 825;

/// Creates `dir/ca.pem` and `dir/ca.key` (0600). Refuses to overwrite.
pub fn init(dir: &Path) -> Result<(PathBuf, PathBuf), PkiError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let cert_path = dir.join("ca.pem");
    let key_path = dir.join("ca.key");
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(PkiError::Exists(p.clone()));
        }
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, ORGANIZATION);
    dn.push(DnType::CommonName, "Lifeboat CA");
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut params, time::Duration::days(3650));
    let cert = params.self_signed(&key)?;
    write_file(&key_path, &key.serialize_pem(), 0o600)?;
    write_file(&cert_path, &cert.pem(), 0o644)?;
    Ok((cert_path, key_path))
}

/// A loaded CA that signs leaf certificates in memory.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
}

/// A signed leaf certificate: PEM text of the certificate and its key.
pub struct IssuedPem {
    /// File stem (`agent-HOST`, `controller`, `client-NAME`).
    pub stem: String,
    /// Certificate, PEM.
    pub cert_pem: String,
    /// Private key, PEM.
    pub key_pem: String,
}

impl Authority {
    /// Reads `ca_dir/ca.pem` and `ca_dir/ca.key`.
    pub fn load(ca_dir: &Path) -> Result<Self, PkiError> {
        let ca_cert_path = ca_dir.join("ca.pem");
        let ca_key_path = ca_dir.join("ca.key");
        let ca_pem = fs::read_to_string(&ca_cert_path).map_err(io(&ca_cert_path))?;
        let ca_key_pem = fs::read_to_string(&ca_key_path).map_err(io(&ca_key_path))?;
        let ca_key = KeyPair::from_pem(&ca_key_pem)?;
        Ok(Authority { issuer: Issuer::from_ca_cert_pem(&ca_pem, ca_key)? })
    }

    /// Signs a new leaf certificate with a fresh key, valid [`LEAF_DAYS`].
    pub fn issue_pem(&self, leaf: &Leaf) -> Result<IssuedPem, PkiError> {
        self.issue_pem_lasting(leaf, time::Duration::days(LEAF_DAYS))
    }

    /// [`Authority::issue_pem`], valid for `lasting` from now.
    pub fn issue_pem_lasting(&self, leaf: &Leaf, lasting: time::Duration) -> Result<IssuedPem, PkiError> {
        let (stem, ou, cn, sans, server) = match leaf {
            Leaf::Agent(host) => {
                valid_name(host)?;
                (format!("agent-{host}"), "agent".to_string(), host.clone(), vec![], false)
            }
            Leaf::Controller(extra) => {
                let mut sans = vec![CONTROLLER_NAME.to_string(), "localhost".to_string(), "127.0.0.1".to_string()];
                sans.extend(extra.iter().cloned());
                ("controller".to_string(), "controller".to_string(), CONTROLLER_NAME.to_string(), sans, true)
            }
            Leaf::Client(name, role) => {
                valid_name(name)?;
                (format!("client-{name}"), role.as_str().to_string(), name.clone(), vec![], false)
            }
        };
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        for s in &sans {
            let san = match s.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(s.clone().try_into().map_err(|_| PkiError::BadName(s.clone()))?),
            };
            params.subject_alt_names.push(san);
        }
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, ORGANIZATION);
        dn.push(DnType::OrganizationalUnitName, ou);
        dn.push(DnType::CommonName, cn);
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = if server {
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth]
        } else {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        };
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, lasting);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedPem { stem, cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

/// Issues a leaf certificate signed by the CA in `ca_dir`, written to
/// `out_dir` as `<stem>.pem` and `<stem>.key` (0600); returns both paths.
pub fn issue(ca_dir: &Path, out_dir: &Path, leaf: &Leaf) -> Result<(PathBuf, PathBuf), PkiError> {
    let leaf = Authority::load(ca_dir)?.issue_pem(leaf)?;
    fs::create_dir_all(out_dir).map_err(io(out_dir))?;
    let cert_path = out_dir.join(format!("{}.pem", leaf.stem));
    let key_path = out_dir.join(format!("{}.key", leaf.stem));
    write_file(&key_path, &leaf.key_pem, 0o600)?;
    write_file(&cert_path, &leaf.cert_pem, 0o644)?;
    Ok((cert_path, key_path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{Identity, identity_from_der};

    fn der_of(path: &Path) -> Vec<u8> {
        let pem = fs::read(path).unwrap();
        let mut rd = &pem[..];
        rustls_pemfile::certs(&mut rd).next().unwrap().unwrap().to_vec()
    }

    #[test]
    fn issued_certificates_carry_their_identity() {
        let dir = std::env::temp_dir().join(format!("lb-pki-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        init(&dir).unwrap();
        assert!(matches!(init(&dir), Err(PkiError::Exists(_))));
        let (a, akey) = issue(&dir, &dir, &Leaf::Agent("host-a".into())).unwrap();
        assert_eq!(identity_from_der(&der_of(&a)).unwrap(), Identity::Agent { host_id: "host-a".into() });
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(&akey).unwrap().permissions().mode() & 0o777, 0o600);
        // Issued again over a key file someone made readable: 0600 again.
        fs::set_permissions(&akey, fs::Permissions::from_mode(0o644)).unwrap();
        issue(&dir, &dir, &Leaf::Agent("host-a".into())).unwrap();
        assert_eq!(fs::metadata(&akey).unwrap().permissions().mode() & 0o777, 0o600);
        let (c, _) = issue(&dir, &dir, &Leaf::Client("ann".into(), Role::Operator)).unwrap();
        assert_eq!(
            identity_from_der(&der_of(&c)).unwrap(),
            Identity::Client { name: "ann".into(), role: Role::Operator }
        );
        let (s, _) = issue(&dir, &dir, &Leaf::Controller(vec!["10.0.0.1".into()])).unwrap();
        assert_eq!(identity_from_der(&der_of(&s)).unwrap(), Identity::Controller);
        assert!(matches!(issue(&dir, &dir, &Leaf::Agent("a/b".into())), Err(PkiError::BadName(_))));
        fs::remove_dir_all(&dir).unwrap();
    }
}
