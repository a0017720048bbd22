//! The agent's configuration file (TOML), checked strictly: unknown keys,
//! wrong types and missing files are errors that name the file and key.

use std::path::{Path, PathBuf};

use lifeboat_common::tls::TlsFiles;
use serde::Deserialize;
use thiserror::Error;

/// Errors reading the configuration.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has wrong keys/values.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A value is syntactically fine but unusable.
    #[error("invalid config file {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// No host id configured and none readable from /etc/machine-id.
    #[error("no host_id in the config and {path} is unreadable or empty: {reason}")]
    NoHostId {
        /// The machine-id file tried.
        path: PathBuf,
        /// Why it failed.
        reason: String,
    },
}

/// How to reach the controller.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    /// `https://HOST:PORT`: the first controller to try.
    #[serde(default)]
    pub url: Option<String>,
    /// More controllers (`https://HOST:PORT` each), tried after `url` in
    /// this order: the agent finds the leader among them.
    #[serde(default)]
    pub urls: Vec<String>,
    /// Name the controller's certificate must carry.
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// CA bundle.
    pub ca: PathBuf,
    /// This agent's certificate (issued with `lifeboat certs issue --agent HOST`).
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// Keep a standby connection (TLS done, idle) to every controller the
    /// session is not on, so that a failover costs no handshake: the new
    /// leader, and the agents around it, have the CPU for the sessions
    /// themselves. Only with more than one address. Default true.
    #[serde(default = "default_standby")]
    pub standby: bool,
}

fn default_standby() -> bool {
    true
}

impl ControllerConfig {
    /// Every controller address, `url` first, then `urls`, in order.
    pub fn urls(&self) -> Vec<String> {
        self.url.iter().chain(self.urls.iter()).cloned().collect()
    }

    /// Checks the addresses: at least one, each `https://` with a host,
    /// no duplicates. Returns the message of the first problem.
    fn check_urls(&self) -> Result<(), String> {
        let all = self.urls();
        if all.is_empty() {
            return Err("[controller] needs url = \"https://HOST:PORT\" or urls = [\"https://HOST:PORT\", ...]".into());
        }
        for (i, u) in all.iter().enumerate() {
            let shown = u.escape_debug();
            if !u.starts_with("https://") {
                return Err(format!(
                    "controller.url '{shown}' must start with https:// (the session is always mutual TLS)"
                ));
            }
            if u.len() > 2048 || u.chars().any(char::is_control) || u.contains(char::is_whitespace) {
                return Err(format!("controller.url '{shown}' is not a URL (spaces, control characters or too long)"));
            }
            match u.parse::<tonic::transport::Uri>() {
                Err(e) => return Err(format!("controller.url '{shown}' is not a valid URL: {e}")),
                Ok(uri) if uri.host().is_none_or(str::is_empty) => {
                    return Err(format!("controller.url '{shown}' names no host (https://HOST:PORT)"));
                }
                Ok(uri) => {
                    let auth = uri.authority().map_or("", |a| a.as_str());
                    let has_port = auth.rsplit_once(':').is_some_and(|(_, p)| !p.contains(']'));
                    if has_port && uri.port_u16().is_none() {
                        return Err(format!("controller.url '{shown}' has a port that is not 1 to 65535"));
                    }
                }
            }
            if all[..i].contains(u) {
                return Err(format!("controller.url '{shown}' is listed twice"));
            }
        }
        Ok(())
    }

    /// The TLS file set.
    pub fn tls(&self) -> TlsFiles {
        TlsFiles { ca: self.ca.clone(), cert: self.cert.clone(), key: self.key.clone() }
    }
}

fn default_server_name() -> String {
    lifeboat_common::pki::CONTROLLER_NAME.to_string()
}
fn default_uri() -> String {
    "qemu:///system".into()
}
fn default_boot_id_file() -> PathBuf {
    "/proc/sys/kernel/random/boot_id".into()
}
fn default_machine_id_file() -> PathBuf {
    "/etc/machine-id".into()
}
fn default_autostart_dir() -> PathBuf {
    "/etc/libvirt/qemu/autostart".into()
}
fn default_qemu_conf() -> PathBuf {
    "/etc/libvirt/qemu.conf".into()
}
fn default_state_dir() -> PathBuf {
    "/var/lib/lifeboat".into()
}
fn default_resync() -> u64 {
    30
}
fn default_libvirt_guests() -> Vec<PathBuf> {
    vec!["/etc/sysconfig/libvirt-guests".into(), "/etc/default/libvirt-guests".into()]
}

/// The whole agent configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Stable host id; default: the contents of `machine_id_file`.
    pub host_id: Option<String>,
    /// Where the machine id is read when `host_id` is not set.
    #[serde(default = "default_machine_id_file")]
    pub machine_id_file: PathBuf,
    /// Where the boot id is read (changes on every boot).
    #[serde(default = "default_boot_id_file")]
    pub boot_id_file: PathBuf,
    /// libvirt connection URI.
    #[serde(default = "default_uri")]
    pub libvirt_uri: String,
    /// Directory of libvirt's autostart links, watched for changes
    /// (libvirt sends no event when autostart is switched).
    #[serde(default = "default_autostart_dir")]
    pub autostart_dir: PathBuf,
    /// qemu driver configuration, read for `lock_manager`.
    #[serde(default = "default_qemu_conf")]
    pub qemu_conf: PathBuf,
    /// libvirt-guests configuration files, first existing one wins.
    #[serde(default = "default_libvirt_guests")]
    pub libvirt_guests_conf: Vec<PathBuf>,
    /// Agent's own state: start leases (`leases/`) and the `enrolled` marker.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Full rescan of libvirt every this many seconds (the backstop).
    #[serde(default = "default_resync")]
    pub resync_interval_s: u64,
    /// Where to serve Prometheus metrics (`GET /metrics`, plain HTTP); off when unset.
    #[serde(default)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The controller.
    pub controller: ControllerConfig,
}

impl AgentConfig {
    /// Parses configuration text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: AgentConfig =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })?;
        let invalid = |m: &str| ConfigError::Invalid { path: path.into(), message: m.to_string() };
        cfg.controller.check_urls().map_err(|m| invalid(&m))?;
        if cfg.resync_interval_s == 0 {
            return Err(invalid("resync_interval_s must be at least 1"));
        }
        if let Some(h) = &cfg.host_id
            && h.trim().is_empty()
        {
            return Err(invalid("host_id must not be empty (remove it to use /etc/machine-id)"));
        }
        Ok(cfg)
    }

    /// Reads and parses the file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Self::parse(&text, path)
    }

    /// The host id: configured, else the machine id. Never the hostname.
    pub fn resolve_host_id(&self) -> Result<String, ConfigError> {
        if let Some(h) = &self.host_id {
            return Ok(h.trim().to_string());
        }
        let p = &self.machine_id_file;
        match std::fs::read_to_string(p) {
            Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
            Ok(_) => Err(ConfigError::NoHostId { path: p.clone(), reason: "empty".into() }),
            Err(e) => Err(ConfigError::NoHostId { path: p.clone(), reason: e.to_string() }),
        }
    }
}

/// A configuration that parses but cannot be run with: the first check that
/// failed, naming the file, address or setting and what to do.
#[derive(Debug, Error)]
pub enum PreflightError {
    /// No usable host id.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A certificate, key or CA bundle problem.
    #[error(transparent)]
    Tls(#[from] lifeboat_common::tls::TlsError),
    /// `state_dir` is unusable.
    #[error("{0}")]
    StateDir(String),
    /// `metrics_listen` cannot be listened on.
    #[error("cannot listen on metrics_listen = \"{addr}\": {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

impl AgentConfig {
    /// Everything a start checks before it dials the controller, and all
    /// that `check-config` checks (one list for both): the host id, the
    /// agent's certificate and key (readable, key owner-only and matching,
    /// chained to the CA, valid now, issued for this host's agent), the
    /// state directory, and `metrics_listen` free to bind. Returns the host id.
    pub fn preflight(&self) -> Result<String, PreflightError> {
        let host = self.resolve_host_id()?;
        lifeboat_common::tls::install_crypto_provider();
        let now_s = lifeboat_common::now_unix_ms() / 1000;
        self.controller.tls().load_for(&lifeboat_common::identity::Identity::Agent { host_id: host.clone() }, now_s)?;
        self.check_state_dir()?;
        if let Some(addr) = self.metrics_listen {
            std::net::TcpListener::bind(addr).map_err(|source| PreflightError::Bind { addr, source })?;
        }
        Ok(host)
    }

    fn check_state_dir(&self) -> Result<(), PreflightError> {
        let d = &self.state_dir;
        let bad = |m: String| Err(PreflightError::StateDir(m));
        match std::fs::metadata(d) {
            Ok(m) if !m.is_dir() => bad(format!("state_dir {} is not a directory", d.display())),
            Ok(_) if !lifeboat_common::files::dir_is_writable(d) => {
                bad(format!("state_dir {} is not writable by this user (start leases are kept there)", d.display()))
            }
            Ok(_) => Ok(()),
            // Created at the first lease, inside a directory that must exist.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match d.parent() {
                Some(p) if !p.as_os_str().is_empty() && !p.is_dir() => bad(format!(
                    "state_dir {}: its directory {} does not exist; correct state_dir or create it (mkdir -p -m 700 {})",
                    d.display(),
                    p.display(),
                    d.display()
                )),
                _ => Ok(()),
            },
            Err(e) => bad(format!("state_dir {}: {e}", d.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
host_id = "host-a"
[controller]
url = "https://10.0.0.1:7443"
ca = "/ca.pem"
cert = "/a.pem"
key = "/a.key"
"#;

    #[test]
    fn defaults_fill_in() {
        let c = AgentConfig::parse(GOOD, Path::new("x.toml")).unwrap();
        assert_eq!(c.libvirt_uri, "qemu:///system");
        assert_eq!(c.controller.server_name, "lifeboat-controller");
        assert_eq!(c.resolve_host_id().unwrap(), "host-a");
        assert!(c.controller.standby, "standby connections are on unless turned off");
        let off = AgentConfig::parse(&GOOD.replace("key = ", "standby = false\nkey = "), Path::new("x")).unwrap();
        assert!(!off.controller.standby);
        let e = AgentConfig::parse(&GOOD.replace("key = ", "standby = \"no\"\nkey = "), Path::new("x")).unwrap_err();
        assert!(e.to_string().contains("standby"), "{e}");
    }

    #[test]
    fn unknown_key_is_named() {
        let e = AgentConfig::parse(&format!("{GOOD}\nbogus = 1\n"), Path::new("x.toml")).unwrap_err().to_string();
        assert!(e.contains("x.toml") && e.contains("bogus"), "{e}");
    }

    #[test]
    fn malformed_toml_names_the_line() {
        let e = AgentConfig::parse("host_id = \n", Path::new("/etc/lifeboat/agent.toml")).unwrap_err().to_string();
        assert!(e.contains("/etc/lifeboat/agent.toml") && e.contains("line 1"), "{e}");
    }

    #[test]
    fn plain_http_is_refused() {
        let e = AgentConfig::parse(&GOOD.replace("https", "http"), Path::new("x")).unwrap_err().to_string();
        assert!(e.contains("https://"), "{e}");
    }

    #[test]
    fn several_controller_urls_in_order_and_none_is_refused() {
        let text = GOOD.replace(
            "url = \"https://10.0.0.1:7443\"",
            "url = \"https://10.0.0.1:7443\"\nurls = [\"https://10.0.0.2:7443\", \"https://10.0.0.3:7443\"]",
        );
        let c = AgentConfig::parse(&text, Path::new("x")).unwrap();
        assert_eq!(c.controller.urls(), ["https://10.0.0.1:7443", "https://10.0.0.2:7443", "https://10.0.0.3:7443"]);
        let only_list = GOOD.replace("url = ", "urls = [").replace(":7443\"", ":7443\"]");
        assert_eq!(
            AgentConfig::parse(&only_list, Path::new("x")).unwrap().controller.urls(),
            ["https://10.0.0.1:7443"]
        );
        let e = AgentConfig::parse(&GOOD.replace("url = \"https://10.0.0.1:7443\"", ""), Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.toml") && e.contains("urls = ["), "{e}");
        for bad in ["http://10.0.0.2:1", "https://", "https://a b:1", "https://10.0.0.1:7443", "https://x:99999999"] {
            let t = text.replace("https://10.0.0.3:7443", bad);
            let e = AgentConfig::parse(&t, Path::new("x.toml")).unwrap_err().to_string();
            assert!(e.contains("x.toml") && e.contains("controller.url"), "{bad}: {e}");
        }
    }

    #[test]
    fn machine_id_is_the_fallback_never_the_hostname() {
        let dir = tempfile::tempdir().unwrap();
        let mid = dir.path().join("machine-id");
        std::fs::write(&mid, "0123abcd\n").unwrap();
        let text = GOOD.replace("host_id = \"host-a\"", &format!("machine_id_file = {:?}", mid));
        let c = AgentConfig::parse(&text, Path::new("x")).unwrap();
        assert_eq!(c.resolve_host_id().unwrap(), "0123abcd");
        std::fs::write(&mid, "").unwrap();
        assert!(c.resolve_host_id().is_err());
    }

    #[test]
    fn preflight_checks_host_certificate_key_mode_and_state_dir() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        lifeboat_common::pki::init(p).unwrap();
        lifeboat_common::pki::issue(p, p, &lifeboat_common::pki::Leaf::Agent("host-a".into())).unwrap();
        lifeboat_common::pki::issue(p, p, &lifeboat_common::pki::Leaf::Controller(vec![])).unwrap();
        let text = |host: &str, stem: &str, state: &Path| {
            format!(
                "host_id = \"{host}\"\nstate_dir = {state:?}\n[controller]\nurl = \"https://127.0.0.1:7443\"\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
                p.join("ca.pem"),
                p.join(format!("{stem}.pem")),
                p.join(format!("{stem}.key"))
            )
        };
        let check =
            |t: String| AgentConfig::parse(&t, Path::new("a.toml")).unwrap().preflight().map_err(|e| e.to_string());
        assert_eq!(check(text("host-a", "agent-host-a", &p.join("state"))).unwrap(), "host-a");
        let e = check(text("host-b", "agent-host-a", &p.join("state"))).unwrap_err();
        assert!(e.contains("host 'host-a'") && e.contains("--agent host-b"), "{e}");
        let e = check(text("host-a", "controller", &p.join("state"))).unwrap_err();
        assert!(e.contains("controller's certificate"), "{e}");
        let e = check(text("host-a", "agent-host-a", &p.join("no/such/state"))).unwrap_err();
        assert!(e.contains("state_dir") && e.contains("does not exist"), "{e}");
        let e = check(text("host-a", "agent-host-a", &p.join("ca.pem"))).unwrap_err();
        assert!(e.contains("not a directory"), "{e}");
        std::fs::set_permissions(p.join("agent-host-a.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = check(text("host-a", "agent-host-a", &p.join("state"))).unwrap_err();
        assert!(e.contains("chmod 600"), "{e}");
        let e = check(text("host-a", "missing", &p.join("state"))).unwrap_err();
        assert!(e.contains("cannot read certificate"), "{e}");
    }
}
