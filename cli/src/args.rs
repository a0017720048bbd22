//! Argument checks shared by every subcommand: what an argument may hold is
//! refused by clap as a usage error (exit 2) naming the argument and the
//! accepted form, before anything is sent to the controller.

/// Longest host id, hostname, guest name or UUID, alarm kind, job or plan
/// id (bytes), as the controller accepts them.
pub const MAX_NAME: usize = 256;
/// Longest `--reason` text (bytes), as the controller accepts it.
pub const MAX_REASON: usize = 2048;
/// Longest `vms start --reason` text (bytes), as the controller accepts it.
pub const MAX_START_REASON: usize = 1000;
/// Longest `--timeout`, seconds (one hour).
pub const MAX_TIMEOUT_S: u64 = 3600;

/// A character no argument may hold: control characters and invisible or
/// reordering ones (what the output escapes).
fn forbidden(c: char) -> bool {
    c.is_control() || crate::output::clean(c.encode_utf8(&mut [0u8; 4])).len() > c.len_utf8()
}

fn text(v: &str, what: &str, max: usize) -> Result<String, String> {
    if v.trim().is_empty() {
        return Err(format!("must not be empty or only spaces: give {what}"));
    }
    if v.len() > max {
        return Err(format!("is {} bytes long; {what} is at most {max} bytes", v.len()));
    }
    if let Some(c) = v.chars().find(|c| forbidden(*c)) {
        return Err(format!(
            "contains the control or invisible character {}; {what} is printable text",
            crate::output::clean(c.encode_utf8(&mut [0u8; 4]))
        ));
    }
    Ok(v.to_string())
}

/// A host id or hostname: non-empty, at most [`MAX_NAME`] bytes, printable.
pub fn host(v: &str) -> Result<String, String> {
    text(v, "a host id or hostname", MAX_NAME)
}

/// A guest name or UUID: non-empty, at most [`MAX_NAME`] bytes, printable.
pub fn vm(v: &str) -> Result<String, String> {
    text(v, "a guest name or UUID", MAX_NAME)
}

/// A job, plan or alarm-kind identifier: non-empty, at most [`MAX_NAME`]
/// bytes, printable.
pub fn id(v: &str) -> Result<String, String> {
    text(v, "an identifier as `lifeboat` printed it", MAX_NAME)
}

/// A certificate name (CN): non-empty, at most [`MAX_NAME`] bytes, printable.
pub fn cert_name(v: &str) -> Result<String, String> {
    text(v, "a certificate name (its CN)", MAX_NAME)
}

/// A `--reason`: non-empty, at most [`MAX_REASON`] bytes, one printable line.
pub fn reason(v: &str) -> Result<String, String> {
    text(v, "a reason (one line of text)", MAX_REASON)
}

/// The `vms start --reason`: at most [`MAX_START_REASON`] bytes.
pub fn start_reason(v: &str) -> Result<String, String> {
    text(v, "a reason (one line of text)", MAX_START_REASON)
}

/// A host status, case-insensitive, `-` for `_`; returned as the API spells it.
pub fn status(v: &str) -> Result<String, String> {
    let up = v.trim().to_ascii_uppercase().replace('-', "_");
    match up.as_str() {
        "AVAILABLE" | "NOT_ACCEPTING" | "MAINTENANCE" | "OFFLINE" => Ok(up),
        _ => Err(format!(
            "unknown host status '{}' (expected AVAILABLE, NOT_ACCEPTING, MAINTENANCE or OFFLINE)",
            crate::output::truncate(&crate::output::clean(v), 60)
        )),
    }
}

/// The controller's URL: `https://HOST:PORT`, printable, at most 2048 bytes.
pub fn url(v: &str) -> Result<String, String> {
    let v = text(v, "the controller's URL, e.g. https://controller:7443", MAX_REASON)?;
    if !v.starts_with("https://") || v.len() <= "https://".len() {
        return Err("must start with https:// and name the controller, e.g. https://controller:7443".to_string());
    }
    Ok(v)
}

/// The name the controller's certificate must carry.
pub fn server_name(v: &str) -> Result<String, String> {
    text(v, "the name in the controller's certificate (default lifeboat-controller)", MAX_NAME)
}

/// `--timeout`: whole seconds, 1 to [`MAX_TIMEOUT_S`].
pub fn timeout(v: &str) -> Result<u64, String> {
    let form = format!("use whole seconds from 1 to {MAX_TIMEOUT_S}");
    let n: u64 = v.trim().parse().map_err(|_| format!("is not a number of seconds: {form}"))?;
    if n == 0 || n > MAX_TIMEOUT_S {
        return Err(format!("{n} is out of range: {form}"));
    }
    Ok(n)
}

/// `log --since`, as Unix milliseconds (see [`crate::migrate::parse_since`]).
pub fn since(v: &str) -> Result<i64, String> {
    crate::migrate::parse_since(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_refuse_empty_long_and_control_text() {
        assert_eq!(host("host-a").unwrap(), "host-a");
        assert_eq!(vm("数据库-01").unwrap(), "数据库-01");
        for bad in ["", " ", "\t", "a\u{1b}[2J", "a\0b", "a\u{202e}b", "a\u{9b}b", "a\nb", "a\u{7f}"] {
            let e = host(bad).expect_err(bad);
            assert!(!e.contains('\u{1b}') && !e.contains('\0') && !e.contains('\u{202e}'), "{e}");
        }
        assert!(vm(&"v".repeat(MAX_NAME)).is_ok());
        assert!(vm(&"v".repeat(MAX_NAME + 1)).unwrap_err().contains("at most 256 bytes"));
        assert!(reason(&"r".repeat(MAX_REASON + 1)).is_err());
        assert!(start_reason(&"r".repeat(MAX_START_REASON + 1)).is_err());
        assert!(host("a\u{1b}").unwrap_err().contains("\\x1b"));
    }

    #[test]
    fn the_command_definition_is_consistent() {
        // Also fails if a connection flag checked by name in main.rs is renamed in client.rs.
        crate::command().debug_assert();
    }

    #[test]
    fn timeout_status_and_url_forms() {
        assert_eq!(timeout("5").unwrap(), 5);
        for bad in ["0", "-1", "3601", "99999999999999999999999", "", "1.5", "abc"] {
            assert!(timeout(bad).is_err(), "{bad}");
        }
        assert_eq!(status("not-accepting").unwrap(), "NOT_ACCEPTING");
        assert!(status("").is_err() && status("DEAD").is_err());
        assert!(url("https://c:7443").is_ok());
        for bad in ["", "http://c:7443", "https://", "https://c\u{1b}"] {
            assert!(url(bad).is_err(), "{bad}");
        }
        assert!(server_name("").is_err());
    }
}
