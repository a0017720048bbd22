//! The controller's configuration file (TOML), checked strictly.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use lifeboat_common::tls::TlsFiles;
use serde::Deserialize;
use thiserror::Error;

use crate::model::Timing;

/// Errors reading the configuration.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// Unreadable file.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Bad TOML, unknown key, wrong type, or unusable value.
    #[error("invalid config file {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, with line and column where known.
        message: String,
    },
}

fn default_listen() -> SocketAddr {
    "0.0.0.0:7443".parse().expect("static address")
}
fn default_db() -> PathBuf {
    "/var/lib/lifeboat/controller.db".into()
}
fn default_hb() -> u32 {
    1000
}
fn default_unreachable() -> u32 {
    3000
}

/// The whole controller configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    /// Address to listen on (agents and the CLI).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// SQLite database file.
    #[serde(default = "default_db")]
    pub database: PathBuf,
    /// Heartbeat interval agents are told to use.
    #[serde(default = "default_hb")]
    pub heartbeat_interval_ms: u32,
    /// A host silent this long is UNREACHABLE.
    #[serde(default = "default_unreachable")]
    pub unreachable_after_ms: u32,
    /// Certificates (the controller's, and the CA that signs agents and clients).
    pub tls: TlsFiles,
    /// A forced migration needs the source silent at least this long.
    #[serde(default = "default_grace")]
    pub force_grace_ms: u64,
    /// Where to serve Prometheus metrics (`GET /metrics`, plain HTTP); off when unset.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Start leases granted to hosts last this long (renewed every third).
    #[serde(default = "default_ttl")]
    pub lease_ttl_ms: u32,
    /// Memory kept for the hypervisor on every host when placing guests.
    #[serde(default = "default_reserve")]
    pub host_memory_reserve_mib: u64,
    /// Out-of-band power control per host id: `[bmc.HOST]`.
    #[serde(default)]
    pub bmc: std::collections::BTreeMap<String, crate::fence::BmcConfig>,
}

fn default_reserve() -> u64 {
    1024
}

fn default_grace() -> u64 {
    60_000
}

fn default_ttl() -> u32 {
    30_000
}

impl ControllerConfig {
    /// Parses configuration text; `path` is used in messages only.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid { path: path.into(), message };
        let cfg: ControllerConfig = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        if cfg.heartbeat_interval_ms < 100 {
            return Err(invalid(format!("heartbeat_interval_ms = {} is below the minimum of 100", cfg.heartbeat_interval_ms)));
        }
        if u64::from(cfg.unreachable_after_ms) < 2 * u64::from(cfg.heartbeat_interval_ms) {
            return Err(invalid(format!(
                "unreachable_after_ms = {} must be at least twice heartbeat_interval_ms ({}), or one late heartbeat would mark a live host unreachable",
                cfg.unreachable_after_ms, cfg.heartbeat_interval_ms
            )));
        }
        if cfg.lease_ttl_ms < 1000 {
            return Err(invalid(format!("lease_ttl_ms = {} is below the minimum of 1000", cfg.lease_ttl_ms)));
        }
        if cfg.force_grace_ms <= u64::from(cfg.lease_ttl_ms) {
            return Err(invalid(format!(
                "force_grace_ms = {} must be longer than lease_ttl_ms = {}: a forced migration must wait until the source's start leases have expired",
                cfg.force_grace_ms, cfg.lease_ttl_ms
            )));
        }
        Ok(cfg)
    }

    /// Reads and parses the file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Self::parse(&text, path)
    }

    /// The timing values.
    pub fn timing(&self) -> Timing {
        Timing { heartbeat_interval_ms: self.heartbeat_interval_ms, unreachable_after_ms: self.unreachable_after_ms }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "[tls]\nca = \"/ca\"\ncert = \"/c\"\nkey = \"/k\"\n";

    #[test]
    fn defaults() {
        let c = ControllerConfig::parse(GOOD, Path::new("c.toml")).unwrap();
        assert_eq!(c.listen.port(), 7443);
        assert_eq!(c.unreachable_after_ms, 3000);
    }

    #[test]
    fn errors_name_file_and_key() {
        let e = ControllerConfig::parse(&format!("listne = \"x\"\n{GOOD}"), Path::new("c.toml")).unwrap_err().to_string();
        assert!(e.contains("c.toml") && e.contains("listne"), "{e}");
        let e = ControllerConfig::parse(&format!("unreachable_after_ms = 1000\n{GOOD}"), Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("at least twice"), "{e}");
        let e = ControllerConfig::parse("[tls]\nca = 1\n", Path::new("c.toml")).unwrap_err().to_string();
        assert!(e.contains("line"), "{e}");
    }
}
