//! The controller's configuration file (TOML), checked strictly.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use lifeboat_common::tls::TlsFiles;
use serde::Deserialize;
use thiserror::Error;

use crate::domain::host::Timing;

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
    /// Where decided state is kept: `[store]`; absent = SQLite in `database`.
    #[serde(default)]
    pub store: StoreConfig,
    /// The web dashboard: `[dashboard]` (docs/dashboard.md); off unless enabled.
    #[serde(default)]
    pub dashboard: DashboardConfig,
}

/// The `[dashboard]` section: the web dashboard (docs/dashboard.md); off unless `enabled`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DashboardConfig {
    /// Serve the dashboard.
    #[serde(default)]
    pub enabled: bool,
    /// HTTPS address; every controller of an HA pool uses the same port.
    #[serde(default = "default_dashboard_listen")]
    pub listen: SocketAddr,
    /// Certificate browsers see (default: the `[tls]` cert); set with `key`.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Its private key (owner-only; default: the `[tls]` key).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// A sign-in lasts this long, seconds (300 to 604800).
    #[serde(default = "default_session_ttl")]
    pub session_ttl_s: u32,
}

fn default_dashboard_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8443))
}

fn default_session_ttl() -> u32 {
    28_800
}

impl Default for DashboardConfig {
    fn default() -> Self {
        DashboardConfig {
            enabled: false,
            listen: default_dashboard_listen(),
            cert: None,
            key: None,
            session_ttl_s: default_session_ttl(),
        }
    }
}

impl DashboardConfig {
    /// Checks the section against the rest of the configuration.
    pub fn check(&self, listen: SocketAddr, metrics_listen: Option<SocketAddr>) -> Result<(), String> {
        if self.cert.is_some() != self.key.is_some() {
            return Err(
                "[dashboard] cert and key are set together (or neither: the [tls] cert and key are used)".into()
            );
        }
        if !(300..=604_800).contains(&self.session_ttl_s) {
            return Err(format!(
                "[dashboard] session_ttl_s = {} is outside 300 to 604800 (5 minutes to 7 days)",
                self.session_ttl_s
            ));
        }
        if self.enabled && self.listen.port() != 0 && (self.listen == listen || Some(self.listen) == metrics_listen) {
            return Err(format!(
                "[dashboard] listen = \"{}\" is also `listen` or `metrics_listen`: \
                 give the dashboard a port of its own",
                self.listen
            ));
        }
        Ok(())
    }

    /// The certificate and key PEM the dashboard serves: its own, or the
    /// controller's `tls` material. A key that is not owner-only or does not
    /// match its certificate is refused.
    pub fn material(
        &self,
        tls: &lifeboat_common::tls::TlsMaterial,
    ) -> Result<(Vec<u8>, Vec<u8>), lifeboat_common::tls::TlsError> {
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let files = lifeboat_common::tls::TlsFiles { ca: cert.clone(), cert: cert.clone(), key: key.clone() };
                let m = files.load()?;
                Ok((m.cert_pem, m.key_pem))
            }
            _ => Ok((tls.cert_pem.clone(), tls.key_pem.clone())),
        }
    }
}

/// Which store backend keeps the decided state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// One controller, one SQLite file (`database`): the default.
    #[default]
    Sqlite,
    /// Two or more controllers sharing an etcd v3 cluster; one leads.
    Etcd,
}

/// The `[store]` section. Only `backend` matters for SQLite; the rest
/// configures the etcd backend (docs/operations.md, "High availability").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite` (default) or `etcd`.
    #[serde(default)]
    pub backend: Backend,
    /// etcd client URLs, e.g. `https://10.0.0.1:2379`.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// CA bundle that signs etcd's server certificates (TLS to etcd).
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Client certificate this controller shows etcd.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Its private key.
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Every Lifeboat key lives under this prefix (one pool per prefix).
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// The URL agents and clients reach this controller at; followers name
    /// the leader by it. Required for etcd.
    #[serde(default)]
    pub advertise_url: Option<String>,
    /// This controller's local copy of the etcd data (rebuilt from etcd at
    /// every start; never the source of truth).
    #[serde(default = "default_cache_dir")]
    pub cache_dir: PathBuf,
    /// TTL of the leader's etcd lease: a dead leader is replaced after at
    /// most this long; a leader that cannot renew stops commanding after
    /// the TTL less 500 ms (at least two thirds of it).
    #[serde(default = "default_leader_ttl")]
    pub leader_ttl_ms: u32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: Backend::Sqlite,
            endpoints: Vec::new(),
            ca: None,
            cert: None,
            key: None,
            prefix: default_prefix(),
            advertise_url: None,
            cache_dir: default_cache_dir(),
            leader_ttl_ms: default_leader_ttl(),
        }
    }
}

fn default_prefix() -> String {
    "/lifeboat/".into()
}

fn default_cache_dir() -> PathBuf {
    "/var/lib/lifeboat/etcd-cache".into()
}

fn default_leader_ttl() -> u32 {
    3000
}

/// A failover (leader lost, lease expired, a follower elected, agents
/// reconnected, leases granted again) must fit in the agents' start-lease
/// TTL with this much to spare beyond `leader_ttl_ms`.
pub const FAILOVER_MARGIN_MS: u32 = 5000;

impl StoreConfig {
    /// Checks the section; `lease_ttl_ms` is the agents' start-lease TTL.
    pub fn check(&self, lease_ttl_ms: u32) -> Result<(), String> {
        if self.backend == Backend::Sqlite {
            return Ok(());
        }
        if self.endpoints.is_empty() {
            return Err("[store] backend = \"etcd\" needs endpoints = [\"https://HOST:2379\", ...]".into());
        }
        for e in &self.endpoints {
            if !(e.starts_with("http://") || e.starts_with("https://")) || e.len() > 256 {
                return Err(format!("[store] endpoints: {e:?} is not an http:// or https:// URL"));
            }
        }
        let tls = [&self.ca, &self.cert, &self.key].iter().filter(|p| p.is_some()).count();
        if tls != 0 && tls != 3 && !(tls == 1 && self.ca.is_some()) {
            return Err("[store] TLS to etcd needs ca, and cert with key together (client certificates)".into());
        }
        if self.prefix.is_empty()
            || !self.prefix.ends_with('/')
            || self.prefix.len() > 128
            || self.prefix.contains('\0')
        {
            return Err(format!("[store] prefix = {:?} must be 1 to 128 characters ending in '/'", self.prefix));
        }
        match &self.advertise_url {
            Some(u) if (u.starts_with("https://") && u.len() <= 256) => {}
            Some(u) => return Err(format!("[store] advertise_url = {u:?} must be an https:// URL")),
            None => {
                return Err("[store] backend = \"etcd\" needs advertise_url = \"https://THIS-HOST:7443\" (how agents and clients reach this controller)".into());
            }
        }
        if self.leader_ttl_ms < 2000 {
            return Err(format!(
                "[store] leader_ttl_ms = {} is below etcd's minimum lease of 2000",
                self.leader_ttl_ms
            ));
        }
        if u64::from(self.leader_ttl_ms) + u64::from(FAILOVER_MARGIN_MS) >= u64::from(lease_ttl_ms) {
            return Err(format!(
                "[store] leader_ttl_ms = {} plus {} ms to elect, reconnect and renew must stay below lease_ttl_ms = {}: a failover must finish before the agents' start leases expire",
                self.leader_ttl_ms, FAILOVER_MARGIN_MS, lease_ttl_ms
            ));
        }
        Ok(())
    }
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
            return Err(invalid(format!(
                "heartbeat_interval_ms = {} is below the minimum of 100",
                cfg.heartbeat_interval_ms
            )));
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
        cfg.store.check(cfg.lease_ttl_ms).map_err(invalid)?;
        cfg.dashboard.check(cfg.listen, cfg.metrics_listen).map_err(invalid)?;
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

/// A configuration that parses but cannot be started with: the first check
/// that failed, naming the file, address or setting and what to do.
#[derive(Debug, Error)]
pub enum PreflightError {
    /// A certificate, key or CA bundle problem.
    #[error(transparent)]
    Tls(#[from] lifeboat_common::tls::TlsError),
    /// The database path is unusable.
    #[error("{0}")]
    Database(String),
    /// An address cannot be listened on.
    #[error("cannot listen on {setting} = \"{addr}\": {source}{hint}")]
    Bind {
        /// `listen` or `metrics_listen`.
        setting: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
        /// What to do.
        hint: &'static str,
    },
    /// A `[bmc.HOST]` section is unusable.
    #[error(transparent)]
    Fence(#[from] crate::fence::FenceConfigError),
}

/// Checks the directory the database lives in: it must exist, be a
/// directory and be writable (WAL, SHM and lock files are created there).
/// Never creates it: a missing directory is a typo more often than not.
pub fn check_database_dir(db: &Path, config: &Path) -> Result<(), PreflightError> {
    let dir = match db.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let bad = |m: String| Err(PreflightError::Database(m));
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return bad(format!(
                "database {}: {} is not a directory; correct `database` in {}",
                db.display(),
                dir.display(),
                config.display()
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return bad(format!(
                "database {}: its directory {} does not exist; correct `database` in {} if this is a typo, or create it: mkdir -p -m 700 {}",
                db.display(),
                dir.display(),
                config.display(),
                dir.display()
            ));
        }
        Err(e) => return bad(format!("database {}: cannot read its directory {}: {e}", db.display(), dir.display())),
    }
    if !lifeboat_common::files::dir_is_writable(dir) {
        return bad(format!(
            "database {}: directory {} is not writable by this user (the database's journal and lock files are created there)",
            db.display(),
            dir.display()
        ));
    }
    Ok(())
}

/// Checks the database file: it must exist (a start never creates an empty
/// database: `lifeboat-controller init` does), be a regular file and be
/// writable.
pub fn check_database_file(db: &Path, config: &Path) -> Result<(), PreflightError> {
    check_database_dir(db, config)?;
    let bad = |m: String| Err(PreflightError::Database(m));
    match std::fs::metadata(db) {
        Ok(m) if m.is_dir() => bad(format!(
            "database {} is a directory; `database` in {} must name a file, e.g. {}",
            db.display(),
            config.display(),
            db.join("controller.db").display()
        )),
        Ok(m) if !m.is_file() => {
            bad(format!("database {} is not a regular file; correct `database` in {}", db.display(), config.display()))
        }
        Ok(_) if !lifeboat_common::files::file_is_writable(db) => {
            bad(format!("database {} is not writable by this user (check its owner and mode)", db.display()))
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bad(format!(
            "database {} does not exist. A new installation creates it once with `lifeboat-controller --config {} init`; \
             otherwise `database` in {} has a typo (the controller never starts on a new empty database: it would serve no hosts)",
            db.display(),
            config.display(),
            config.display()
        )),
        Err(e) => bad(format!("database {}: {e}", db.display())),
    }
}

fn check_bind(setting: &'static str, addr: SocketAddr) -> Result<(), PreflightError> {
    match std::net::TcpListener::bind(addr) {
        Ok(l) => {
            drop(l);
            Ok(())
        }
        Err(source) => {
            let hint = match source.kind() {
                std::io::ErrorKind::AddrInUse => {
                    " (another process listens there: is a controller already running? `ss -ltnp` shows which)"
                }
                std::io::ErrorKind::AddrNotAvailable => " (no interface of this machine has that address)",
                std::io::ErrorKind::PermissionDenied => " (ports below 1024 need privileges)",
                _ => "",
            };
            Err(PreflightError::Bind { setting, addr, source, hint })
        }
    }
}

impl ControllerConfig {
    /// Everything a start checks before it serves, and all that
    /// `--check-config` checks (one list for both): the controller's
    /// certificate and key (readable, key owner-only and matching, chained
    /// to the CA, valid now, carrying the controller identity), the
    /// database (directory exists and is writable, file exists and is a
    /// writable regular file), `listen` and `metrics_listen` free to bind,
    /// and every `[bmc.HOST]`. `config` is the file's path, for messages.
    pub fn preflight(&self, config: &Path) -> Result<lifeboat_common::tls::TlsMaterial, PreflightError> {
        lifeboat_common::tls::install_crypto_provider();
        let now_s = crate::now_ms() / 1000;
        let tls = self.tls.load_for(&lifeboat_common::identity::Identity::Controller, now_s)?;
        match self.store.backend {
            Backend::Sqlite => check_database_file(&self.database, config)?,
            // etcd holds the state; the cache is rebuilt at every start, in
            // a directory that must be usable (created when missing).
            Backend::Etcd => check_cache_dir(&self.store.cache_dir, config)?,
        }
        check_bind("listen", self.listen)?;
        if let Some(m) = self.metrics_listen {
            check_bind("metrics_listen", m)?;
        }
        for (host, bmc) in &self.bmc {
            crate::fence::Fencer::new(host, bmc)?;
        }
        if self.dashboard.enabled {
            check_bind("[dashboard] listen", self.dashboard.listen)?;
            self.dashboard.material(&tls)?;
        }
        Ok(tls)
    }
}

/// Checks (creating it owner-only when missing) the etcd backend's
/// `cache_dir`: a directory this user can write.
pub fn check_cache_dir(dir: &Path, config: &Path) -> Result<(), PreflightError> {
    let bad = |m: String| Err(PreflightError::Database(m));
    match std::fs::metadata(dir) {
        Ok(m) if !m.is_dir() => {
            return bad(format!(
                "[store] cache_dir {} is not a directory; correct it in {}",
                dir.display(),
                config.display()
            ));
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            use std::os::unix::fs::DirBuilderExt;
            if let Err(e) = std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir) {
                return bad(format!("[store] cache_dir {} cannot be created: {e}", dir.display()));
            }
        }
        Err(e) => return bad(format!("[store] cache_dir {}: {e}", dir.display())),
    }
    let probe = dir.join(".lifeboat-write-test");
    match std::fs::File::create(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => bad(format!("[store] cache_dir {} is not writable by this user: {e}", dir.display())),
    }
}

/// Creates a new, empty database at `db` (owner-only), for a new
/// installation. Refuses if the file exists or its directory does not.
pub fn init_database(db: &Path, config: &Path) -> Result<i64, PreflightError> {
    check_database_dir(db, config)?;
    if std::fs::symlink_metadata(db).is_ok() {
        return Err(PreflightError::Database(format!(
            "database {} already exists; `init` only creates a new one (restore a backup with `lifeboat-controller restore --from FILE`)",
            db.display()
        )));
    }
    // Created owner-only before SQLite opens it, whatever the umask.
    {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(db)
            .map_err(|e| PreflightError::Database(format!("cannot create database {}: {e}", db.display())))?;
    }
    let store = crate::store::Store::open(db)
        .map_err(|e| PreflightError::Database(format!("cannot create database {}: {e}", db.display())))?;
    drop(store);
    crate::backup::restrict_db_files(db)
        .map_err(|e| PreflightError::Database(format!("database {}: {e}", db.display())))?;
    Ok(crate::store::SCHEMA_VERSION)
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
        let e =
            ControllerConfig::parse(&format!("listne = \"x\"\n{GOOD}"), Path::new("c.toml")).unwrap_err().to_string();
        assert!(e.contains("c.toml") && e.contains("listne"), "{e}");
        let e = ControllerConfig::parse(&format!("unreachable_after_ms = 1000\n{GOOD}"), Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("at least twice"), "{e}");
        let e = ControllerConfig::parse("[tls]\nca = 1\n", Path::new("c.toml")).unwrap_err().to_string();
        assert!(e.contains("line"), "{e}");
    }

    #[test]
    fn the_dashboard_section_is_off_by_default_and_checked() {
        let c = ControllerConfig::parse(GOOD, Path::new("c.toml")).unwrap();
        assert!(!c.dashboard.enabled);
        assert_eq!(c.dashboard.listen.to_string(), "0.0.0.0:8443");
        assert_eq!(c.dashboard.session_ttl_s, 28_800);
        let parse = |extra: &str| {
            ControllerConfig::parse(&format!("{GOOD}[dashboard]\n{extra}"), Path::new("c.toml"))
                .map(|c| c.dashboard)
                .map_err(|e| e.to_string())
        };
        let d = parse("enabled = true\nlisten = \"127.0.0.1:9443\"\nsession_ttl_s = 300\n").unwrap();
        assert!(d.enabled && d.listen.port() == 9443 && d.session_ttl_s == 300);
        assert!(parse("session_ttl_s = 299\n").unwrap_err().contains("session_ttl_s = 299"));
        assert!(parse("session_ttl_s = 604801\n").unwrap_err().contains("604800"));
        assert!(parse("cert = \"/x.pem\"\n").unwrap_err().contains("cert and key"));
        assert!(parse("enabled = true\nlisten = \"0.0.0.0:7443\"\n").unwrap_err().contains("port of its own"));
        assert!(parse("enabeld = true\n").unwrap_err().contains("enabeld"));
    }

    #[test]
    fn preflight_checks_the_dashboard_port_and_its_key() {
        let d = tempfile::tempdir().unwrap();
        pki(d.path());
        let db = d.path().join("controller.db");
        init_database(&db, Path::new("c.toml")).unwrap();
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = held.local_addr().unwrap();
        let base = cfg_text(d.path(), &db, "127.0.0.1:0");
        let text = format!("{base}[dashboard]\nenabled = true\nlisten = \"{addr}\"\n");
        let c = ControllerConfig::parse(&text, Path::new("c.toml")).unwrap();
        let e = c.preflight(Path::new("c.toml")).unwrap_err().to_string();
        assert!(e.contains("[dashboard] listen"), "{e}");
        drop(held);
        let key = d.path().join("controller.key");
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        let text = format!(
            "{base}[dashboard]\nenabled = true\nlisten = \"127.0.0.1:0\"\ncert = {:?}\nkey = {key:?}\n",
            d.path().join("controller.pem")
        );
        let c = ControllerConfig::parse(&text, Path::new("c.toml")).unwrap();
        // The [tls] key is the same file: refused by [tls] or [dashboard], either names the key.
        let e = c.preflight(Path::new("c.toml")).unwrap_err().to_string();
        assert!(e.contains("controller.key"), "{e}");
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        c.preflight(Path::new("c.toml")).unwrap();
    }

    fn pki(dir: &Path) {
        lifeboat_common::pki::init(dir).unwrap();
        lifeboat_common::pki::issue(dir, dir, &lifeboat_common::pki::Leaf::Controller(vec![])).unwrap();
    }

    fn cfg_text(dir: &Path, db: &Path, listen: &str) -> String {
        format!(
            "listen = \"{listen}\"\ndatabase = {db:?}\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
            dir.join("ca.pem"),
            dir.join("controller.pem"),
            dir.join("controller.key")
        )
    }

    fn preflight(dir: &Path, db: &Path, listen: &str) -> Result<(), String> {
        let c = ControllerConfig::parse(&cfg_text(dir, db, listen), Path::new("/etc/c.toml")).unwrap();
        c.preflight(Path::new("/etc/c.toml")).map(|_| ()).map_err(|e| e.to_string())
    }

    #[test]
    fn a_missing_database_is_refused_and_init_creates_it_owner_only() {
        let d = tempfile::tempdir().unwrap();
        pki(d.path());
        let db = d.path().join("controller.db");
        let e = preflight(d.path(), &db, "127.0.0.1:0").unwrap_err();
        assert!(
            e.contains("does not exist")
                && e.contains("lifeboat-controller --config /etc/c.toml init")
                && e.contains("typo"),
            "{e}"
        );
        assert!(!db.exists(), "a check creates nothing");
        init_database(&db, Path::new("/etc/c.toml")).unwrap();
        assert_eq!(lifeboat_common::files::mode(&db).unwrap(), 0o600);
        preflight(d.path(), &db, "127.0.0.1:0").unwrap();
        let e = init_database(&db, Path::new("/etc/c.toml")).unwrap_err().to_string();
        assert!(e.contains("already exists"), "{e}");
    }

    #[test]
    fn a_database_in_a_missing_directory_or_that_is_a_directory_is_refused() {
        let d = tempfile::tempdir().unwrap();
        pki(d.path());
        let typo = d.path().join("lifebaot/controller.db");
        let e = preflight(d.path(), &typo, "127.0.0.1:0").unwrap_err();
        assert!(e.contains("its directory") && e.contains("does not exist") && e.contains("mkdir"), "{e}");
        let e = init_database(&typo, Path::new("/etc/c.toml")).unwrap_err().to_string();
        assert!(e.contains("does not exist"), "{e}");
        assert!(!d.path().join("lifebaot").exists(), "neither check nor init creates the directory");
        let e = preflight(d.path(), d.path(), "127.0.0.1:0").unwrap_err();
        assert!(e.contains("is a directory"), "{e}");
    }

    #[test]
    fn a_port_in_use_is_refused() {
        let d = tempfile::tempdir().unwrap();
        pki(d.path());
        let db = d.path().join("controller.db");
        init_database(&db, Path::new("c.toml")).unwrap();
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = held.local_addr().unwrap().to_string();
        let e = preflight(d.path(), &db, &addr).unwrap_err();
        assert!(e.contains(&format!("listen = \"{addr}\"")) && e.contains("already running"), "{e}");
        let text = format!("metrics_listen = \"{addr}\"\n{}", cfg_text(d.path(), &db, "127.0.0.1:0"));
        let c = ControllerConfig::parse(&text, Path::new("c.toml")).unwrap();
        let e = c.preflight(Path::new("c.toml")).unwrap_err().to_string();
        assert!(e.contains("metrics_listen"), "{e}");
    }

    #[test]
    fn preflight_checks_the_certificate() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        pki(d.path());
        let db = d.path().join("controller.db");
        init_database(&db, Path::new("c.toml")).unwrap();
        let key = d.path().join("controller.key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = preflight(d.path(), &db, "127.0.0.1:0").unwrap_err();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let (cert, ckey) = lifeboat_common::pki::issue(
            d.path(),
            d.path(),
            &lifeboat_common::pki::Leaf::Client("ann".into(), lifeboat_common::identity::Role::Operator),
        )
        .unwrap();
        std::fs::rename(cert, d.path().join("controller.pem")).unwrap();
        std::fs::rename(ckey, &key).unwrap();
        let e = preflight(d.path(), &db, "127.0.0.1:0").unwrap_err();
        assert!(e.contains("operator 'ann'") && e.contains("needs a controller certificate"), "{e}");
    }
}
