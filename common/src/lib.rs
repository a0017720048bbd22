//! Code shared by Lifeboat's binaries: certificate identities and roles,
//! the small PKI behind `lifeboat certs`, TLS configuration loading and
//! logging setup.

pub mod identity;
pub mod logging;
pub mod pki;
pub mod tls;

/// Milliseconds since the Unix epoch, from the wall clock.
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The version string every binary prints for `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
