//! Who is on the other end of a TLS connection, read from its certificate.
//!
//! Lifeboat certificates carry the identity in the subject: `O=lifeboat`,
//! `OU=<kind>` and `CN=<name>`, where kind is `agent` (CN is the host id),
//! `controller`, or a person's role `viewer` / `operator` / `admin`.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

/// The organisation every Lifeboat certificate names.
pub const ORGANIZATION: &str = "lifeboat";

/// What a person's client certificate allows, in increasing power.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Read-only access.
    Viewer,
    /// May run migrations and cleanups.
    Operator,
    /// Everything, including configuration.
    Admin,
}

impl Role {
    /// The name used in certificates and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// Whether this role includes everything `needed` allows.
    pub fn allows(self, needed: Role) -> bool {
        self >= needed
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            other => Err(IdentityError::UnknownRole(other.to_string())),
        }
    }
}

/// The identity a certificate proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// The agent of one host.
    Agent {
        /// The host id the certificate was issued for.
        host_id: String,
    },
    /// The controller.
    Controller,
    /// A person or tool using the admin API.
    Client {
        /// Name from the certificate.
        name: String,
        /// Role from the certificate.
        role: Role,
    },
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Agent { host_id } => write!(f, "agent {host_id}"),
            Identity::Controller => f.write_str("controller"),
            Identity::Client { name, role } => write!(f, "{name} ({role})"),
        }
    }
}

/// Why a certificate does not name a usable identity.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum IdentityError {
    /// Not parseable as X.509.
    #[error("certificate is not valid X.509: {0}")]
    BadCertificate(String),
    /// Missing O=lifeboat, OU or CN.
    #[error("certificate subject lacks {0} (not issued by `lifeboat certs`?)")]
    MissingField(&'static str),
    /// OU names no known kind.
    #[error("unknown role or kind '{0}' in certificate (expected agent, controller, viewer, operator or admin)")]
    UnknownRole(String),
}

/// Reads the identity from a DER-encoded certificate.
pub fn identity_from_der(der: &[u8]) -> Result<Identity, IdentityError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    let subject = cert.subject();
    let first = |it: &mut dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue<'_>>| {
        it.next().and_then(|a| a.as_str().ok()).map(str::to_string)
    };
    let org = first(&mut subject.iter_organization()).ok_or(IdentityError::MissingField("O"))?;
    if org != ORGANIZATION {
        return Err(IdentityError::MissingField("O=lifeboat"));
    }
    let ou = first(&mut subject.iter_organizational_unit()).ok_or(IdentityError::MissingField("OU"))?;
    let cn = first(&mut subject.iter_common_name()).ok_or(IdentityError::MissingField("CN"))?;
    match ou.as_str() {
        "agent" => Ok(Identity::Agent { host_id: cn }),
        "controller" => Ok(Identity::Controller),
        role => Ok(Identity::Client { name: cn, role: role.parse()? }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_ordered_by_power() {
        assert!(Role::Admin.allows(Role::Operator));
        assert!(Role::Operator.allows(Role::Viewer));
        assert!(!Role::Viewer.allows(Role::Operator));
        assert!(!Role::Operator.allows(Role::Admin));
    }

    #[test]
    fn unknown_role_is_rejected() {
        assert_eq!("root".parse::<Role>(), Err(IdentityError::UnknownRole("root".into())));
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        assert!(matches!(identity_from_der(b"nope"), Err(IdentityError::BadCertificate(_))));
    }
}
