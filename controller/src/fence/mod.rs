//! Out-of-band power control ("fencing"): proving a failed host is off.
//!
//! Two drivers: a native Redfish client (reqwest + rustls) and the
//! ClusterLabs fence agents (`fence_ipmilan`, `fence_redfish`, ...) run with
//! their standard stdin arguments. Whatever fails — unreachable BMC, TLS or
//! authentication error, unexpected answer — yields [`PowerState::Unknown`],
//! never `Off`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

mod agent;
mod common;
mod redfish;

/// A host's power state as its BMC reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PowerState {
    /// The BMC reads On.
    On,
    /// The BMC reads Off.
    Off,
    /// No reliable answer; the reason says why. Never treated as Off.
    Unknown(String),
}

/// One request to a BMC and its answer, for the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceEvent {
    /// Milliseconds since the epoch.
    pub at_ms: i64,
    /// What was asked, e.g. `GET https://bmc/redfish/v1/Systems/1` or `fence_ipmilan action=status`.
    pub request: String,
    /// What came back (status code and the relevant part), or the error.
    pub answer: String,
}

/// How to reach one host's BMC (controller config `[bmc.HOST]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "driver", rename_all = "snake_case", deny_unknown_fields)]
pub enum BmcConfig {
    /// Native Redfish.
    Redfish {
        /// Base URL, e.g. `https://10.0.0.5` (the service root is `/redfish/v1`).
        url: String,
        /// The ComputerSystem id under `/redfish/v1/Systems/`.
        system_id: String,
        /// File holding the credentials (see docs).
        credentials_file: PathBuf,
        /// CA bundle to verify the BMC's certificate.
        ca: Option<PathBuf>,
        /// How long to wait for Off after ForceOff.
        #[serde(default = "default_off_timeout")]
        power_off_timeout_s: u64,
        /// Poll interval while waiting.
        #[serde(default = "default_poll")]
        poll_interval_ms: u64,
    },
    /// A ClusterLabs fence agent.
    FenceAgent {
        /// Executable, e.g. `fence_ipmilan` (looked up in PATH) or an absolute path.
        agent: String,
        /// Standard stdin arguments (`ip`, `username`, `password`, `lanplus`, ...), without `action`.
        #[serde(default)]
        options: BTreeMap<String, String>,
        /// Environment for the agent besides the controller's own, e.g.
        /// `REQUESTS_CA_BUNDLE` = the CA of a BMC's certificate for
        /// `fence_redfish` (it verifies with Python requests).
        #[serde(default)]
        env: BTreeMap<String, String>,
        /// How long to wait for Off after `action=off`.
        #[serde(default = "default_off_timeout")]
        power_off_timeout_s: u64,
        /// Poll interval while waiting.
        #[serde(default = "default_poll")]
        poll_interval_ms: u64,
    },
}

fn default_off_timeout() -> u64 {
    60
}
fn default_poll() -> u64 {
    1000
}

/// A configured fencing device for one host.
pub struct Fencer {
    cfg: BmcConfig,
    driver: Driver,
}

enum Driver {
    Redfish(redfish::Redfish),
    Agent(agent::Agent),
}

/// Configuration problems found when building a [`Fencer`].
#[derive(Debug, thiserror::Error)]
#[error("BMC configuration for host '{host}': {message}")]
pub struct FenceConfigError {
    /// Host concerned.
    pub host: String,
    /// What is wrong.
    pub message: String,
}

/// Longest `power_off_timeout_s` accepted: one hour. A BMC that has not
/// powered its host off by then will not; a larger value only keeps a
/// forced migration waiting (and deadlines computed from it must not
/// overflow).
pub const MAX_POWER_OFF_TIMEOUT_S: u64 = 3600;

impl Fencer {
    /// Checks the configuration (files readable, URL valid) and builds the driver.
    pub fn new(host: &str, cfg: &BmcConfig) -> Result<Self, FenceConfigError> {
        let err = |message: String| FenceConfigError { host: host.to_string(), message };
        let (timeout_s, poll_ms) = match cfg {
            BmcConfig::Redfish { power_off_timeout_s, poll_interval_ms, .. }
            | BmcConfig::FenceAgent { power_off_timeout_s, poll_interval_ms, .. } => {
                (*power_off_timeout_s, *poll_interval_ms)
            }
        };
        if !(1..=MAX_POWER_OFF_TIMEOUT_S).contains(&timeout_s) {
            return Err(err(format!("power_off_timeout_s = {timeout_s}: use 1..={MAX_POWER_OFF_TIMEOUT_S} (seconds)")));
        }
        if !(10..=60_000).contains(&poll_ms) {
            return Err(err(format!("poll_interval_ms = {poll_ms}: use 10..=60000")));
        }
        let (timeout, poll) = (Duration::from_secs(timeout_s), Duration::from_millis(poll_ms));
        let driver = match cfg {
            BmcConfig::Redfish { url, system_id, credentials_file, ca, .. } => Driver::Redfish(
                redfish::Redfish::new(url, system_id, credentials_file, ca.as_deref(), timeout, poll).map_err(err)?,
            ),
            BmcConfig::FenceAgent { agent, options, env, .. } => {
                Driver::Agent(agent::Agent::new(agent, options, env, timeout, poll).map_err(err)?)
            }
        };
        Ok(Fencer { cfg: cfg.clone(), driver })
    }

    /// Reads the power state once. Every request and answer is appended to `log`.
    pub async fn power_state(&self, log: &mut Vec<FenceEvent>) -> PowerState {
        match &self.driver {
            Driver::Redfish(d) => d.power_state(log).await,
            Driver::Agent(d) => d.power_state(log).await,
        }
    }

    /// Powers the host off (ForceOff / action=off) and polls until it reads
    /// Off or the configured timeout passes; returns the last state read.
    /// "Already off" counts only when a read says Off.
    pub async fn power_off(&self, log: &mut Vec<FenceEvent>) -> PowerState {
        match &self.driver {
            Driver::Redfish(d) => d.power_off(log).await,
            Driver::Agent(d) => d.power_off(log).await,
        }
    }

    /// Powers the host on (used by the lab and by operators after repair).
    pub async fn power_on(&self, log: &mut Vec<FenceEvent>) -> PowerState {
        match &self.driver {
            Driver::Redfish(d) => d.power_on(log).await,
            Driver::Agent(d) => d.power_on(log).await,
        }
    }

    /// The configured timeout for waiting on Off.
    pub fn off_timeout(&self) -> Duration {
        match &self.cfg {
            BmcConfig::Redfish { power_off_timeout_s, .. } | BmcConfig::FenceAgent { power_off_timeout_s, .. } => {
                Duration::from_secs(*power_off_timeout_s)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The controller runs fencing in spawned tasks: the futures must be Send.
    #[test]
    fn futures_are_send_and_fencer_is_shareable() {
        fn send<T: Send>(_: &T) {}
        fn shareable<T: Send + Sync>() {}
        shareable::<Fencer>();
        let dir = tempfile::tempdir().unwrap();
        let cred = dir.path().join("c");
        std::fs::write(&cred, "username = \"a\"\npassword = \"b\"\n").unwrap();
        let cfg = BmcConfig::Redfish {
            url: "https://127.0.0.1:1".into(),
            system_id: "1".into(),
            credentials_file: cred,
            ca: None,
            power_off_timeout_s: 1,
            poll_interval_ms: 100,
        };
        let f = Fencer::new("h", &cfg).unwrap();
        let mut log = Vec::new();
        send(&f.power_state(&mut log));
        let mut log = Vec::new();
        send(&f.power_off(&mut log));
        let mut log = Vec::new();
        send(&f.power_on(&mut log));
        assert_eq!(f.off_timeout(), Duration::from_secs(1));
    }

    #[test]
    fn power_off_timeout_is_bounded_so_deadlines_cannot_overflow() {
        let dir = tempfile::tempdir().unwrap();
        let cred = dir.path().join("c");
        std::fs::write(&cred, "username = \"a\"\npassword = \"b\"\n").unwrap();
        let agent = |t: u64| BmcConfig::FenceAgent {
            agent: "fence_ipmilan".into(),
            options: Default::default(),
            env: Default::default(),
            power_off_timeout_s: t,
            poll_interval_ms: 100,
        };
        for t in [0, MAX_POWER_OFF_TIMEOUT_S + 1, u64::MAX] {
            let e = Fencer::new("h", &agent(t)).err().expect("refused").to_string();
            assert!(e.contains("power_off_timeout_s") && e.contains("1..=3600"), "{e}");
        }
    }

    #[test]
    fn config_parses_from_toml_and_checks_timing() {
        let t = r#"
driver = "fence_agent"
agent = "/bin/true"
options = { ip = "10.0.0.5", password = "x" }
"#;
        let cfg: BmcConfig = toml::from_str(t).unwrap();
        let f = Fencer::new("h", &cfg).unwrap();
        assert_eq!(f.off_timeout(), Duration::from_secs(60));
        let bad: BmcConfig =
            toml::from_str("driver = \"fence_agent\"\nagent = \"/bin/true\"\npoll_interval_ms = 0\n").unwrap();
        let e = Fencer::new("host-z", &bad).err().unwrap().to_string();
        assert!(e.contains("host-z") && e.contains("poll_interval_ms"), "{e}");
        assert!(toml::from_str::<BmcConfig>("driver = \"ipmi\"\n").is_err());
    }
}
