//! Connecting to the controller, and turning failures into messages an
//! operator can act on.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use lifeboat_common::tls::TlsFiles;
use lifeboat_proto::v1::admin_client::AdminClient;
use serde::Deserialize;
use thiserror::Error;
use tonic::transport::{Channel, Endpoint};

/// Where the controller is and which certificate to use. Flags win over
/// environment variables, which win over the config file.
#[derive(Args, Debug, Clone)]
pub struct Connection {
    /// CLI config file (TOML: controller, server_name, ca, cert, key).
    #[arg(long, env = "LIFEBOAT_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Controller URL, e.g. https://controller:7443. Several controllers
    /// (one leads): repeat the flag or separate URLs with commas; the
    /// leader is found among them.
    #[arg(long = "controller-url", env = "LIFEBOAT_CONTROLLER", global = true, value_delimiter = ',')]
    controller_url: Vec<String>,
    /// Name the controller's certificate must carry.
    #[arg(long, env = "LIFEBOAT_SERVER_NAME", global = true)]
    server_name: Option<String>,
    /// CA bundle.
    #[arg(long, env = "LIFEBOAT_CA", global = true)]
    ca: Option<PathBuf>,
    /// Your client certificate.
    #[arg(long, env = "LIFEBOAT_CERT", global = true)]
    cert: Option<PathBuf>,
    /// Your private key.
    #[arg(long, env = "LIFEBOAT_KEY", global = true)]
    key: Option<PathBuf>,
    /// Seconds to wait for the controller: bounds the connection (TCP and
    /// TLS handshake) and then each call.
    #[arg(long, default_value_t = 30, global = true)]
    timeout: u64,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    controller: Option<Controllers>,
    server_name: Option<String>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

/// The config file's `controller`: one URL (commas separate several) or a list.
#[derive(Deserialize)]
#[serde(untagged)]
enum Controllers {
    One(String),
    Many(Vec<String>),
}

impl Controllers {
    fn urls(self) -> Vec<String> {
        match self {
            Controllers::One(s) => s.split(',').map(|u| u.trim().to_string()).collect(),
            Controllers::Many(v) => v,
        }
    }
}

/// Everything needed to dial any of the configured controllers.
pub struct Target {
    /// The controller URLs, in the order given.
    pub urls: Vec<String>,
    server_name: String,
    material: lifeboat_common::tls::TlsMaterial,
}

/// A CLI failure with its exit code.
#[derive(Debug, Error)]
pub enum CliError {
    /// Bad arguments or configuration (exit 2).
    #[error("{0}")]
    Usage(String),
    /// Controller not reachable (exit 3).
    #[error("{0}")]
    Unreachable(String),
    /// Certificate or permission refused (exit 4).
    #[error("{0}")]
    Refused(String),
    /// No such thing (exit 5).
    #[error("{0}")]
    NotFound(String),
    /// A precondition failed; nothing was changed (exit 6).
    #[error("{0}")]
    Refused6(String),
    /// Anything else (exit 1).
    #[error("{0}")]
    Other(String),
}

impl CliError {
    /// Process exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Other(_) => 1,
            CliError::Usage(_) => 2,
            CliError::Unreachable(_) => 3,
            CliError::Refused(_) => 4,
            CliError::NotFound(_) => 5,
            CliError::Refused6(_) => 6,
        }
    }

    /// The same kind of failure with another message.
    pub fn with_message(&self, msg: String) -> CliError {
        match self {
            CliError::Usage(_) => CliError::Usage(msg),
            CliError::Unreachable(_) => CliError::Unreachable(msg),
            CliError::Refused(_) => CliError::Refused(msg),
            CliError::NotFound(_) => CliError::NotFound(msg),
            CliError::Refused6(_) => CliError::Refused6(msg),
            CliError::Other(_) => CliError::Other(msg),
        }
    }

    /// Maps an RPC status.
    pub fn from_status(s: tonic::Status) -> CliError {
        use tonic::Code;
        if let Some(leader) = leader_hint(&s) {
            // A follower refuses before doing anything: the call changed nothing.
            let named =
                if leader.is_empty() { "no leader is elected".to_string() } else { format!("leader is {leader}") };
            return CliError::Unreachable(format!(
                "the controller is not the leader ({named}): {}; nothing was changed, run the command again \
                 (the leader is looked for among every --controller-url)",
                s.message()
            ));
        }
        let mut msg = s.message().to_string();
        if let Some(src) = std::error::Error::source(&s) {
            let detail = lifeboat_common::error_chain(src);
            if !msg.contains(&detail) {
                msg = format!("{msg}: {detail}");
            }
        }
        match s.code() {
            Code::NotFound => CliError::NotFound(msg),
            Code::PermissionDenied => CliError::Refused(format!("permission denied: {msg}")),
            Code::Unauthenticated => CliError::Refused(format!("certificate rejected: {msg}")),
            Code::InvalidArgument => CliError::Usage(msg),
            Code::FailedPrecondition => CliError::Refused6(msg),
            // The controller lost its leadership mid-call; the message says
            // whether the change may have been made. Never resent.
            Code::Aborted => CliError::Unreachable(msg),
            Code::Unavailable | Code::Unknown if msg.contains("transport error") => classify_transport(&msg),
            Code::Unavailable => classify_transport(&msg),
            Code::Cancelled if msg.contains("transport error") => classify_transport(&msg),
            _ => CliError::Other(format!("{:?}: {msg}", s.code())),
        }
    }
}

/// The leader a follower named in a status (response metadata
/// [`lifeboat_proto::LEADER_METADATA`] on `UNAVAILABLE`): `Some("")` when it
/// says no leader is elected, `None` when the status is not a follower's
/// refusal. A follower's refusal did nothing, so the call may be sent to the
/// leader.
pub fn leader_hint(s: &tonic::Status) -> Option<String> {
    if s.code() != tonic::Code::Unavailable {
        return None;
    }
    let t = s.metadata().get(lifeboat_proto::LEADER_METADATA)?.to_str().ok()?.trim();
    (t.len() <= crate::args::MAX_REASON).then(|| t.to_string())
}

fn classify_transport(detail: &str) -> CliError {
    let d = detail.to_ascii_lowercase();
    if d.contains("alert") && (d.contains("certificate") || d.contains("unknownca") || d.contains("decrypt")) {
        CliError::Refused(format!(
            "certificate rejected: the controller refused our client certificate ({detail}); \
             is it issued by the controller's CA (`lifeboat certs issue --client`)?"
        ))
    } else if d.contains("invalid peer certificate") || d.contains("unknownissuer") || d.contains("notvalidforname") {
        CliError::Refused(format!(
            "certificate rejected: the controller's certificate is not trusted ({detail}); check --ca and --server-name"
        ))
    } else if ["peer closed connection", "connection reset", "broken pipe", "connection closed"]
        .iter()
        .any(|m| d.contains(m))
    {
        // The request may have reached the controller before the connection
        // broke (it stopped, or lost its leadership and closed every
        // connection): nobody can say whether a change was made.
        CliError::Unreachable(format!(
            "the connection to the controller broke during the call ({detail}): the controller stopped or lost its \
             leadership; a change may or may not have been made: check `lifeboat hosts list`, `lifeboat jobs list` and `lifeboat log` before \
             trying again"
        ))
    } else {
        CliError::Unreachable(format!(
            "cannot reach the controller: {detail}; is lifeboat-controller running and is the controller URL right?"
        ))
    }
}

impl Connection {
    fn file(&self) -> Result<FileConfig, CliError> {
        let path = match &self.config {
            Some(p) => p.clone(),
            None => {
                let p = Path::new("/etc/lifeboat/cli.toml");
                if !p.exists() {
                    return Ok(FileConfig::default());
                }
                p.to_path_buf()
            }
        };
        let text = std::fs::read_to_string(&path)
            .map_err(|e| CliError::Usage(format!("cannot read CLI config {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| CliError::Usage(format!("invalid CLI config {}: {e}", path.display())))
    }

    /// The controllers to try, the TLS material and the server name.
    pub fn target(&self) -> Result<Target, CliError> {
        let f = self.file()?;
        let missing = |what: &str, flag: &str, env: &str| {
            CliError::Usage(format!("no {what} given: use {flag}, ${env}, or the CLI config file"))
        };
        let urls = if self.controller_url.is_empty() {
            f.controller.map(Controllers::urls).unwrap_or_default()
        } else {
            self.controller_url.clone()
        };
        if urls.is_empty() {
            return Err(missing("controller address", "--controller-url", "LIFEBOAT_CONTROLLER"));
        }
        for u in &urls {
            crate::args::url(u).map_err(|e| {
                CliError::Usage(format!(
                    "controller address '{}' {e}",
                    crate::output::truncate(&crate::output::clean(u), 80)
                ))
            })?;
        }
        let tls = TlsFiles {
            ca: self.ca.clone().or(f.ca).ok_or_else(|| missing("CA bundle", "--ca", "LIFEBOAT_CA"))?,
            cert: self
                .cert
                .clone()
                .or(f.cert)
                .ok_or_else(|| missing("client certificate", "--cert", "LIFEBOAT_CERT"))?,
            key: self.key.clone().or(f.key).ok_or_else(|| missing("private key", "--key", "LIFEBOAT_KEY"))?,
        };
        let server_name = self
            .server_name
            .clone()
            .or(f.server_name)
            .unwrap_or_else(|| lifeboat_common::pki::CONTROLLER_NAME.to_string());
        lifeboat_common::tls::install_crypto_provider();
        let material = tls.load().map_err(|e| CliError::Usage(e.to_string()))?;
        Ok(Target { urls, server_name, material })
    }

    /// Connects to the admin service of one controller of `target`.
    pub async fn dial(&self, target: &Target, url: &str) -> Result<AdminClient<Channel>, CliError> {
        let ep = Endpoint::from_shared(url.to_string())
            .map_err(|e| CliError::Usage(format!("invalid controller address '{url}': {e}")))?
            .tls_config(target.material.client_config(&target.server_name))
            .map_err(|e| CliError::Usage(lifeboat_common::error_chain(&e)))?
            .connect_timeout(Duration::from_secs(self.timeout))
            .timeout(Duration::from_secs(self.timeout));
        // connect_timeout bounds only the TCP connect; a peer that accepts
        // and never finishes the TLS handshake would hold us for ever.
        let ch = match tokio::time::timeout(Duration::from_secs(self.timeout), ep.connect()).await {
            Err(_) => {
                return Err(CliError::Unreachable(format!(
                    "cannot reach the controller: {url}: no TLS session within {} s (--timeout covers connect and handshake); \
                     is lifeboat-controller running there and is the controller URL right?",
                    self.timeout
                )));
            }
            Ok(r) => r.map_err(|e| classify_transport(&format!("{url}: {}", lifeboat_common::error_chain(&e))))?,
        };
        Ok(AdminClient::new(ch).max_decoding_message_size(256 * 1024 * 1024))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_that_broke_mid_call_says_the_change_may_have_been_made() {
        let e = classify_transport(
            "transport error: connection error: peer closed connection without sending TLS close_notify",
        );
        let m = e.to_string();
        assert!(matches!(e, CliError::Unreachable(_)), "{m}");
        assert!(m.contains("broke during the call") && m.contains("may or may not have been made"), "{m}");
        let refused = classify_transport("transport error: tcp connect error: Connection refused (os error 111)");
        assert!(refused.to_string().contains("cannot reach the controller"), "{refused}");
    }
}
