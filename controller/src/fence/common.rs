//! Pieces shared by the fencing drivers: the audit log, credentials files,
//! executable lookup, output trimming. All pure or file-system only, so they
//! are unit-tested here.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use super::{FenceEvent, PowerState};

/// Milliseconds since the epoch.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)).unwrap_or(0)
}

/// Appends one request/answer pair to the audit log (and to the debug trace).
pub(crate) fn record(log: &mut Vec<FenceEvent>, request: impl Into<String>, answer: impl Into<String>) {
    let ev = FenceEvent { at_ms: now_ms(), request: request.into(), answer: answer.into() };
    tracing::debug!(request = %ev.request, answer = %ev.answer, "fence");
    log.push(ev);
}

/// Short text for a state, for logs and reasons.
pub(crate) fn describe(state: &PowerState) -> String {
    match state {
        PowerState::On => "On".into(),
        PowerState::Off => "Off".into(),
        PowerState::Unknown(r) => format!("unknown ({r})"),
    }
}

/// Whole seconds (or milliseconds below one second) for messages.
pub(crate) fn human(d: Duration) -> String {
    if d >= Duration::from_secs(1) && d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else if d >= Duration::from_secs(1) {
        format!("{:.1} s", d.as_secs_f64())
    } else {
        format!("{} ms", d.as_millis())
    }
}

/// BMC credentials read from a `credentials_file`. `Debug` never shows the password.
#[derive(Clone)]
pub(crate) struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials").field("username", &self.username).field("password", &"***").finish()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialsToml {
    username: String,
    password: String,
}

/// Reads `username = "..."` / `password = "..."` (TOML). Errors name the file
/// and never contain the password.
pub(crate) fn read_credentials(path: &Path) -> Result<Credentials, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("cannot read credentials file {}: {e}", path.display()))?;
    parse_credentials(&text).map_err(|e| format!("credentials file {} is not usable: {e}", path.display()))
}

/// Parses the credentials TOML; the error text never quotes the password.
pub(crate) fn parse_credentials(text: &str) -> Result<Credentials, String> {
    match toml::from_str::<CredentialsToml>(text) {
        Ok(c) if c.username.is_empty() => Err("username is empty".into()),
        Ok(c) => Ok(Credentials { username: c.username, password: c.password }),
        Err(e) => {
            // Only the message (never the Display, which quotes the source line), and not
            // even that when the error sits on the password's line (a type error would
            // quote the value).
            let line = e.span().map(|s| {
                let start = s.start.min(text.len());
                let no = text[..start].matches('\n').count() + 1;
                let line_text = text.lines().nth(no - 1).unwrap_or("");
                (no, line_text.trim_start().to_ascii_lowercase().starts_with("password"))
            });
            match line {
                Some((no, true)) => Err(format!(
                    "line {no}: the password entry is malformed (expected: password = \"...\", a TOML string)"
                )),
                Some((no, false)) => Err(format!(
                    "line {no}: {} (expected TOML: username = \"...\" and password = \"...\")",
                    e.message().trim_end()
                )),
                None => Err(format!(
                    "{} (expected TOML: username = \"...\" and password = \"...\")",
                    e.message().trim_end()
                )),
            }
        }
    }
}

/// A warning when a secret file is accessible to group or others.
pub(crate) fn permission_warning(path: &Path) -> Option<String> {
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    (mode & 0o077 != 0).then(|| {
        format!(
            "credentials file {} is accessible to group/other (mode {:04o}): chmod 600 {}",
            path.display(),
            mode & 0o7777,
            path.display()
        )
    })
}

/// Directories searched after PATH: fence agents live in sbin, which a
/// non-root PATH often lacks.
const SBIN_DIRS: [&str; 3] = ["/usr/sbin", "/sbin", "/usr/local/sbin"];

fn is_executable_file(p: &Path) -> bool {
    std::fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// Finds an executable: a path containing `/` is taken as is; a bare name is
/// looked up in `path_var` (PATH) and then in the sbin directories.
pub(crate) fn find_executable(name: &str, path_var: Option<&str>) -> Result<PathBuf, String> {
    if name.is_empty() {
        return Err("the fence agent name is empty".into());
    }
    if name.contains('/') {
        let p = PathBuf::from(name);
        return match std::fs::metadata(&p) {
            Err(e) => Err(format!("fence agent {name}: {e}")),
            Ok(_) if !is_executable_file(&p) => Err(format!("fence agent {name} is not an executable file")),
            Ok(_) => Ok(p),
        };
    }
    let dirs: Vec<PathBuf> = path_var
        .unwrap_or("")
        .split(':')
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .chain(SBIN_DIRS.iter().map(PathBuf::from))
        .collect();
    dirs.iter().map(|d| d.join(name)).find(|p| is_executable_file(p)).ok_or_else(|| {
        format!(
            "fence agent '{name}' not found in PATH nor in {} (install the fence-agents package, or give an absolute path)",
            SBIN_DIRS.join(", ")
        )
    })
}

/// The last `n` non-empty lines of `text`, joined with " | ", at most `max` chars.
pub(crate) fn last_lines(text: &str, n: usize, max: usize) -> String {
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(n)..].join(" | ");
    shorten(&tail, max)
}

/// Cuts `s` to at most `max` characters, marking the cut.
pub(crate) fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(max).collect();
        out.push('…');
        out
    }
}

/// Replaces every occurrence of each secret in `text` with `***`.
pub(crate) fn redact(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_string();
    for s in secrets {
        if s.len() >= 3 {
            out = out.replace(s, "***");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn credentials_parse() {
        let c = parse_credentials("username = \"admin\"\npassword = \"s3cret\"\n").unwrap();
        assert_eq!(c.username, "admin");
        assert_eq!(c.password, "s3cret");
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    #[test]
    fn credentials_errors_never_show_the_password() {
        for bad in [
            "username = \"admin\"\npassword = \"hunter2\n",
            "username = \"admin\"\npassword = 'hunter2\"\n",
            "username = \"admin\"\npassword = hunter2\n",
            "username = \"admin\"\npassword = 123456789\n",
            "username = \"admin\"\npassword = \"hunter2\"\nextra = 1\n",
            "hunter2\n",
            "username = \"admin\"\n",
            "",
        ] {
            let e = parse_credentials(bad).unwrap_err();
            assert!(!e.contains("hunter2") && !e.contains("123456789"), "{bad:?} -> {e}");
        }
        assert!(parse_credentials("username = \"admin\"\n").unwrap_err().contains("password"));
        assert!(parse_credentials("username = \"\"\npassword = \"x\"\n").unwrap_err().contains("username is empty"));
        let e = parse_credentials("username = \"admin\"\npassword = hunter2\n").unwrap_err();
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn credentials_file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.cred");
        let e = read_credentials(&missing).unwrap_err();
        assert!(e.contains("nope.cred") && e.contains("cannot read"), "{e}");
        let bad = dir.path().join("bad.cred");
        std::fs::write(&bad, "user = \"x\"\n").unwrap();
        let e = read_credentials(&bad).unwrap_err();
        assert!(e.contains("bad.cred"), "{e}");
    }

    #[test]
    fn permission_warning_for_group_readable_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c");
        let mut f = std::fs::File::create(&p).unwrap();
        f.write_all(b"x").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(permission_warning(&p), None);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        let w = permission_warning(&p).unwrap();
        assert!(w.contains("0640") && w.contains("chmod 600"), "{w}");
    }

    #[test]
    fn executable_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("fence_fake");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let plain = dir.path().join("not_exec");
        std::fs::write(&plain, "").unwrap();
        let pv = format!("/nonexistent:{}", dir.path().display());
        assert_eq!(find_executable("fence_fake", Some(&pv)).unwrap(), exe);
        assert!(find_executable("not_exec", Some(&pv)).is_err());
        assert!(find_executable("fence_nope_nope", Some(&pv)).unwrap_err().contains("fence-agents"));
        assert_eq!(find_executable(exe.to_str().unwrap(), None).unwrap(), exe);
        assert!(find_executable(plain.to_str().unwrap(), None).unwrap_err().contains("not an executable"));
        assert!(find_executable("/nonexistent/fence_x", None).is_err());
        assert!(find_executable("", None).is_err());
    }

    #[test]
    fn output_helpers() {
        assert_eq!(last_lines("a\n\nb\nc\n", 2, 100), "b | c");
        assert_eq!(shorten("abcdef", 3), "abc…");
        assert_eq!(redact("login pw=hunter2 ok", &["hunter2", ""]), "login pw=*** ok");
        assert_eq!(human(Duration::from_secs(30)), "30 s");
        assert_eq!(human(Duration::from_millis(1500)), "1.5 s");
        assert_eq!(human(Duration::from_millis(200)), "200 ms");
        assert_eq!(describe(&PowerState::Unknown("x".into())), "unknown (x)");
    }
}
