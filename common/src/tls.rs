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
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|err| TlsError::Read { what, path: path.to_path_buf(), err })
}

fn check_certs(what: &'static str, path: &Path, pem: &[u8]) -> Result<Vec<Vec<u8>>, TlsError> {
    let mut rd = pem;
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut rd).collect();
    let certs = certs.map_err(|e| TlsError::Invalid { what, path: path.to_path_buf(), reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::Invalid { what, path: path.to_path_buf(), reason: "no PEM CERTIFICATE block found".into() });
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

fn check_key(path: &Path, pem: &[u8]) -> Result<(), TlsError> {
    let mut rd = pem;
    match rustls_pemfile::private_key(&mut rd) {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(TlsError::Invalid { what: "private key", path: path.to_path_buf(), reason: "no PEM PRIVATE KEY block found".into() }),
        Err(e) => Err(TlsError::Invalid { what: "private key", path: path.to_path_buf(), reason: e.to_string() }),
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
        let key_pem = read("private key", &self.key)?;
        check_key(&self.key, &key_pem)?;
        Ok(TlsMaterial { ca_pem, cert_pem, key_pem, cert_der })
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
