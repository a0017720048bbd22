//! ClusterLabs fence agents (`fence_redfish`, `fence_ipmilan`, ...): run with
//! the standard stdin arguments (`action=...` then `key=value` lines).
//! `action=status` exits 0 = on, 2 = off, anything else = unknown.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tokio::time::Instant;

use super::common::{describe, find_executable, human, last_lines, record, redact};
use super::{FenceEvent, PowerState};

/// Longest an `action=status` may take before it is killed.
pub(crate) const STATUS_TIMEOUT: Duration = Duration::from_secs(30);
/// Least time given to an `action=off`/`on` run, even when the deadline is nearer.
const MIN_ACTION_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) struct Agent {
    /// As configured (for messages).
    name: String,
    path: PathBuf,
    options: BTreeMap<String, String>,
    /// Extra environment (never written to the audit log).
    env: BTreeMap<String, String>,
    timeout: Duration,
    poll: Duration,
}

/// How one run of the agent ended.
enum Run {
    /// It exited with this code (None = killed by a signal); short output.
    Exited(Option<i32>, String),
    /// It could not be run or did not finish in time.
    Failed(String),
}

/// Fence-agent options known to hold no secret (fence-agents' long option
/// names, `-` and `_` alike): shown in logs, the audit log and errors.
/// Every other option is masked: a list of secret names can never be
/// complete (`community`, `secret-key`, `apikey`, `hexadecimal-kg`, a new
/// agent's token), a list of harmless ones fails safe.
pub const NON_SECRET_OPTIONS: &[&str] = &[
    "ip",
    "ipaddr",
    "ipport",
    "port",
    "plug",
    "username",
    "login",
    "user",
    "lanplus",
    "privlvl",
    "cipher",
    "method",
    "auth",
    "ssl",
    "ssl_secure",
    "ssl_insecure",
    "notls",
    "tls1_0",
    "ssh",
    "inet4_only",
    "inet6_only",
    "systems_uri",
    "redfish_uri",
    "api_version",
    "snmp_version",
    "snmp_auth_prot",
    "snmp_sec_level",
    "snmp_priv_prot",
    "power_timeout",
    "power_wait",
    "shell_timeout",
    "login_timeout",
    "delay",
    "pcmk_delay_max",
    "retry_on",
    "verbose",
    "uuid",
    "domain",
    "zone",
    "region",
    "project",
    "organization",
    "cmd_prompt",
    "identity_file",
    "ssl_cert_file",
];

/// Is this option a secret (masked in logs, the audit log and errors)?
/// Everything not on [`NON_SECRET_OPTIONS`] is.
pub(crate) fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase().replace('-', "_");
    !NON_SECRET_OPTIONS.contains(&k.as_str())
}

/// Checks the configured options: sane keys, one-line values, no `action`.
pub(crate) fn check_options(options: &BTreeMap<String, String>) -> Result<(), String> {
    for (k, v) in options {
        if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            return Err(format!("fence agent option '{k}': keys are letters, digits, '_' and '-'"));
        }
        if k == "action" || k == "o" {
            return Err("fence agent options must not set 'action': Lifeboat sets it (status, off, on)".into());
        }
        if v.contains('\n') || v.contains('\r') {
            return Err(format!("fence agent option '{k}': the value must be a single line"));
        }
    }
    Ok(())
}

/// Checks the `env` table: portable variable names, values a process can take.
pub(crate) fn check_env(env: &BTreeMap<String, String>) -> Result<(), String> {
    for (k, v) in env {
        let portable = k.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !portable {
            return Err(format!("fence agent env '{k}': names are letters, digits and '_', not starting with a digit"));
        }
        if v.contains('\0') {
            return Err(format!("fence agent env '{k}': the value must not contain a NUL byte"));
        }
    }
    Ok(())
}

/// The standard stdin arguments for `action`.
pub(crate) fn stdin_args(action: &str, options: &BTreeMap<String, String>) -> String {
    let mut s = format!("action={action}\n");
    for (k, v) in options {
        s.push_str(&format!("{k}={v}\n"));
    }
    s
}

/// The same, on one line, with every secret option masked (for the audit log).
pub(crate) fn describe_args(agent: &str, action: &str, options: &BTreeMap<String, String>) -> String {
    let mut s = format!("{agent} action={action}");
    for (k, v) in options {
        if is_secret_key(k) {
            s.push_str(&format!(" {k}=***"));
        } else {
            s.push_str(&format!(" {k}={v}"));
        }
    }
    s
}

/// Agent output without the noise: the fencing library's timestamps and its
/// "Please use '-h' for usage" hint.
pub(crate) fn clean_output(text: &str) -> String {
    text.lines()
        .map(|l| {
            // "2026-11-25 17:52:58,393 ERROR: ..." -> "ERROR: ..."
            let b = l.as_bytes();
            let stamped = b.len() > 24
                && b[4] == b'-'
                && b[7] == b'-'
                && b[10] == b' '
                && b[13] == b':'
                && b[19] == b','
                && b[..4].iter().all(u8::is_ascii_digit);
            if stamped { l[24..].trim_start() } else { l }
        })
        .filter(|l| !l.contains("Please use '-h' for usage"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `action=status` exit code -> state.
pub(crate) fn status_from_exit(code: Option<i32>) -> Option<PowerState> {
    match code {
        Some(0) => Some(PowerState::On),
        Some(2) => Some(PowerState::Off),
        _ => None,
    }
}

impl Agent {
    pub(crate) fn new(
        agent: &str,
        options: &BTreeMap<String, String>,
        env: &BTreeMap<String, String>,
        timeout: Duration,
        poll: Duration,
    ) -> Result<Self, String> {
        let path = find_executable(agent, std::env::var("PATH").ok().as_deref())?;
        check_options(options)?;
        check_env(env)?;
        Ok(Agent { name: agent.to_string(), path, options: options.clone(), env: env.clone(), timeout, poll })
    }

    fn secrets(&self) -> Vec<&str> {
        self.options.iter().filter(|(k, _)| is_secret_key(k)).map(|(_, v)| v.as_str()).collect()
    }

    /// Runs the agent once with `action`, killed after `limit`.
    async fn run(&self, action: &str, limit: Duration, log: &mut Vec<FenceEvent>) -> Run {
        let req = describe_args(&self.name, action, &self.options);
        let mut cmd = Command::new(&self.path);
        cmd.envs(&self.env);
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true).process_group(0);
        // ETXTBSY: the agent's file is open for writing at this instant (a
        // package update replacing it, or a fork elsewhere in this process
        // that still holds a just-written file): it clears within moments.
        let mut spawned = cmd.spawn();
        for _ in 0..10 {
            match &spawned {
                Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    spawned = cmd.spawn();
                }
                _ => break,
            }
        }
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                let reason = format!("cannot run fence agent {}: {e}", self.path.display());
                record(log, req, format!("error: {reason}"));
                return Run::Failed(reason);
            }
        };
        let pid = child.id();
        if let Some(mut stdin) = child.stdin.take() {
            // an agent that exits without reading its stdin is not our error here: its exit code says
            let _ = stdin.write_all(stdin_args(action, &self.options).as_bytes()).await;
            let _ = stdin.shutdown().await;
        }
        let secrets = self.secrets();
        match tokio::time::timeout(limit, child.wait_with_output()).await {
            Ok(Ok(out)) => {
                let stdout = clean_output(&redact(&String::from_utf8_lossy(&out.stdout), &secrets));
                let stderr = clean_output(&redact(&String::from_utf8_lossy(&out.stderr), &secrets));
                let mut short = last_lines(&stdout, 2, 200);
                let err = last_lines(&stderr, 3, 300);
                if !err.is_empty() {
                    if !short.is_empty() {
                        short.push_str(" | ");
                    }
                    short.push_str(&err);
                }
                let code = out.status.code();
                let how = match code {
                    Some(c) => format!("exit {c}"),
                    None => format!("killed by a signal ({})", out.status),
                };
                record(log, req, if short.is_empty() { how } else { format!("{how}: {short}") });
                Run::Exited(code, short)
            }
            Ok(Err(e)) => {
                let reason = format!("fence agent {} failed: {e}", self.name);
                record(log, req, format!("error: {reason}"));
                Run::Failed(reason)
            }
            Err(_) => {
                // the child was dropped (killed); its helpers (ipmitool, ...) share its group
                if let Some(pid) = pid {
                    let _ = Command::new("kill").args(["-KILL", "--", &format!("-{pid}")]).status().await;
                }
                let reason = format!(
                    "fence agent {} (action={action}) did not finish within {} and was killed",
                    self.name,
                    human(limit)
                );
                record(log, req, format!("error: {reason}"));
                Run::Failed(reason)
            }
        }
    }

    async fn status(&self, limit: Duration, log: &mut Vec<FenceEvent>) -> PowerState {
        match self.run("status", limit, log).await {
            Run::Exited(code, out) => status_from_exit(code).unwrap_or_else(|| {
                let c = code.map_or_else(|| "no exit code (signal)".to_string(), |c| format!("exit code {c}"));
                PowerState::Unknown(format!(
                    "fence agent {} (action=status) gave {c}, which is neither 0 (on) nor 2 (off){}",
                    self.name,
                    if out.is_empty() { String::new() } else { format!(": {out}") }
                ))
            }),
            Run::Failed(reason) => PowerState::Unknown(reason),
        }
    }

    pub(crate) async fn power_state(&self, log: &mut Vec<FenceEvent>) -> PowerState {
        self.status(STATUS_TIMEOUT, log).await
    }

    pub(crate) async fn power_off(&self, log: &mut Vec<FenceEvent>) -> PowerState {
        self.drive(PowerState::Off, "off", log).await
    }

    pub(crate) async fn power_on(&self, log: &mut Vec<FenceEvent>) -> PowerState {
        self.drive(PowerState::On, "on", log).await
    }

    /// `action=off|on`, then `status` until it says `want` or the timeout passes.
    async fn drive(&self, want: PowerState, action: &str, log: &mut Vec<FenceEvent>) -> PowerState {
        let start = Instant::now();
        let deadline = start + self.timeout;
        let left = || deadline.saturating_duration_since(Instant::now());
        let limit = left().max(MIN_ACTION_TIMEOUT);
        let failure = match self.run(action, limit, log).await {
            Run::Exited(Some(0), _) => None,
            Run::Exited(code, out) => Some(format!(
                "fence agent {} (action={action}) failed with {}{}",
                self.name,
                code.map_or_else(|| "a signal".to_string(), |c| format!("exit code {c}")),
                if out.is_empty() { String::new() } else { format!(": {out}") }
            )),
            Run::Failed(reason) => Some(reason),
        };
        loop {
            let state = self.status(left().clamp(MIN_ACTION_TIMEOUT, STATUS_TIMEOUT), log).await;
            if state == want {
                return want;
            }
            if let Some(f) = &failure {
                // the action failed and the status is not what we want: no point waiting
                let then = match &state {
                    PowerState::Unknown(_) => "unknown too".to_string(),
                    s => describe(s),
                };
                return PowerState::Unknown(format!("{f}; status afterwards: {then}"));
            }
            if Instant::now() >= deadline {
                let waited = human(start.elapsed());
                record(
                    log,
                    format!("{} action={action}: gave up", self.name),
                    format!("not {} after {waited}; last status {}", describe(&want), describe(&state)),
                );
                return match state {
                    PowerState::Unknown(why) => {
                        PowerState::Unknown(format!("{why} (after action={action} succeeded, {waited} ago)"))
                    }
                    last => last,
                };
            }
            tokio::time::sleep(self.poll.min(left())).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> BTreeMap<String, String> {
        [("ip", "10.0.0.5"), ("username", "admin"), ("password", "hunter2"), ("lanplus", "1")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn stdin_format() {
        assert_eq!(
            stdin_args("status", &opts()),
            "action=status\nip=10.0.0.5\nlanplus=1\npassword=hunter2\nusername=admin\n"
        );
    }

    #[test]
    fn log_masks_passwords() {
        let mut o = opts();
        o.insert("passwd".into(), "other".into());
        o.insert("PASSWORD_script".into(), "/bin/pw".into());
        let d = describe_args("fence_ipmilan", "off", &o);
        assert_eq!(
            d,
            "fence_ipmilan action=off PASSWORD_script=*** ip=10.0.0.5 lanplus=1 passwd=*** password=*** username=admin"
        );
        assert!(!d.contains("hunter2") && !d.contains("other"));
    }

    #[test]
    fn every_option_not_known_harmless_is_masked() {
        let mut o = opts();
        for (k, v) in [
            ("secret-key", "sk-live-1"),
            ("community", "public-ish"),
            ("apikey", "AKIA123"),
            ("hexadecimal-kg", "0badc0de"),
            ("token", "tok-9"),
            ("ssl-insecure", "1"),
            ("ipport", "623"),
        ] {
            o.insert(k.into(), v.into());
        }
        let d = describe_args("fence_x", "status", &o);
        for secret in ["sk-live-1", "public-ish", "AKIA123", "0badc0de", "tok-9", "hunter2"] {
            assert!(!d.contains(secret), "{secret} reached the log line: {d}");
        }
        for k in ["secret-key", "community", "apikey", "hexadecimal-kg", "token", "password"] {
            assert!(d.contains(&format!(" {k}=***")), "{k}: {d}");
        }
        assert!(
            d.contains("ssl-insecure=1")
                && d.contains("ipport=623")
                && d.contains("ip=10.0.0.5")
                && d.contains("username=admin"),
            "{d}"
        );
        let f = Agent::new("true", &o, &BTreeMap::new(), Duration::from_secs(1), Duration::from_millis(10)).unwrap();
        let mut secrets = f.secrets();
        secrets.sort();
        assert_eq!(
            secrets,
            ["0badc0de", "AKIA123", "hunter2", "public-ish", "sk-live-1", "tok-9"],
            "agent output is redacted of these"
        );
    }

    #[test]
    fn output_cleaning() {
        let raw = "2026-11-25 17:53:03,634 ERROR: Unable to get PowerState: https://x\n\n2026-11-25 17:53:03,635 ERROR: Please use '-h' for usage\nStatus: ON\n";
        assert_eq!(clean_output(raw), "ERROR: Unable to get PowerState: https://x\n\nStatus: ON");
    }

    #[test]
    fn exit_codes() {
        assert_eq!(status_from_exit(Some(0)), Some(PowerState::On));
        assert_eq!(status_from_exit(Some(2)), Some(PowerState::Off));
        assert_eq!(status_from_exit(Some(1)), None);
        assert_eq!(status_from_exit(None), None);
    }

    #[test]
    fn option_checks() {
        assert!(check_options(&opts()).is_ok());
        let mut o = opts();
        o.insert("action".into(), "off".into());
        assert!(check_options(&o).unwrap_err().contains("action"));
        let mut o = opts();
        o.insert("ip".into(), "1.2.3.4\naction=reboot".into());
        assert!(check_options(&o).unwrap_err().contains("single line"));
        let mut o = opts();
        o.insert("a=b".into(), "x".into());
        assert!(check_options(&o).is_err());
    }

    #[test]
    fn env_checks() {
        let env = |k: &str, v: &str| [(k.to_string(), v.to_string())].into_iter().collect::<BTreeMap<_, _>>();
        assert!(check_env(&env("REQUESTS_CA_BUNDLE", "/etc/lifeboat/bmc/ca.pem")).is_ok());
        assert!(check_env(&env("_X1", "")).is_ok());
        for bad in ["", "1X", "A=B", "A B", "A-B"] {
            assert!(check_env(&env(bad, "x")).unwrap_err().contains("names are letters"), "{bad:?}");
        }
        assert!(check_env(&env("X", "a\0b")).unwrap_err().contains("NUL"));
    }

    #[cfg(unix)]
    fn script(dir: &std::path::Path, body: &str) -> String {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join("fence_test");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p.to_str().unwrap().to_string()
    }

    /// A fake agent: reads stdin; `status` reports the state in a file; `off` writes "off" there.
    #[tokio::test]
    async fn fake_agent_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::write(&state, "on").unwrap();
        let body = format!(
            r#"args=$(cat); case "$args" in *action=status*) [ "$(cat {s})" = off ] && exit 2; exit 0 ;;
 *action=off*) echo "password was $(echo "$args" | sed -n 's/^password=//p')" >&2; echo off > {s}; exit 0 ;;
 *) exit 1 ;; esac"#,
            s = state.display()
        );
        let path = script(dir.path(), &body);
        let a =
            Agent::new(&path, &opts(), &BTreeMap::new(), Duration::from_secs(5), Duration::from_millis(50)).unwrap();
        let mut log = Vec::new();
        assert_eq!(a.power_state(&mut log).await, PowerState::On);
        assert_eq!(a.power_off(&mut log).await, PowerState::Off);
        let all = format!("{log:?}");
        assert!(!all.contains("hunter2"), "{all}");
        assert!(all.contains("password=***"), "{all}");
        assert!(log.iter().any(|e| e.answer.starts_with("exit 2")), "{all}");
    }

    #[tokio::test]
    async fn failing_and_hanging_agents_are_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let path = script(dir.path(), "cat >/dev/null; echo 'Failed: Unable to connect' >&2; exit 1");
        let a =
            Agent::new(&path, &opts(), &BTreeMap::new(), Duration::from_secs(1), Duration::from_millis(50)).unwrap();
        let mut log = Vec::new();
        match a.power_state(&mut log).await {
            PowerState::Unknown(r) => assert!(r.contains("exit code 1") && r.contains("Unable to connect"), "{r}"),
            s => panic!("{s:?}"),
        }
        match a.power_off(&mut log).await {
            PowerState::Unknown(r) => assert!(r.contains("action=off") && r.contains("exit code 1"), "{r}"),
            s => panic!("{s:?}"),
        }
        let path = script(dir.path(), "sleep 30");
        let a =
            Agent::new(&path, &opts(), &BTreeMap::new(), Duration::from_secs(1), Duration::from_millis(50)).unwrap();
        let t = Instant::now();
        match a.status(Duration::from_millis(300), &mut log).await {
            PowerState::Unknown(r) => assert!(r.contains("did not finish"), "{r}"),
            s => panic!("{s:?}"),
        }
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
