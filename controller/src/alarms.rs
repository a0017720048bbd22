//! Operators clearing alarms: the one way to acknowledge an alarm whose
//! cause is not a host going back into service (which clears split-brain
//! and stale-copy alarms by itself), e.g. `guests-not-moved`.

use lifeboat_proto::v1::Alarm;

use crate::error::ControllerError;
use crate::ports::AuditRow;
use crate::registry::Registry;

/// Longest host id or alarm kind accepted, in bytes.
pub const MAX_NAME: usize = 256;
/// Longest reason accepted, in bytes.
pub const MAX_REASON: usize = 2048;
/// Active alarms named in a refusal; the rest are counted.
const NAMED: usize = 20;

/// Clears `host`'s active alarms of `kind`, audited as `alarm.cleared` with
/// the actor and the reason, atomically. Refuses, changing nothing, when
/// none is active, naming the alarms that are. Returns what was cleared.
pub fn clear(reg: &Registry, host: &str, kind: &str, reason: &str, actor: &str) -> Result<Vec<Alarm>, ControllerError> {
    let (host, kind, reason) = (host.trim(), kind.trim(), reason.trim());
    check_input(host, kind, reason)?;
    let detail = format!(
        "{kind} alarm(s) on {host} cleared by {actor}: {}",
        if reason.is_empty() { "(no reason given)" } else { reason }
    );
    let audit = AuditRow {
        actor: actor.into(),
        action: "alarm.cleared".into(),
        host: host.into(),
        detail,
        ..Default::default()
    };
    // Runs on a blocking thread (the admin handler's `spawn_blocking`).
    let (h, k) = (host.to_string(), kind.to_string());
    let cleared = reg.repos().call_blocking(move |r| r.alarms().clear_audited(&h, &k, &audit))?;
    if cleared.is_empty() {
        return Err(ControllerError::Refused(nothing_matched(host, kind, &reg.active_alarms())));
    }
    reg.reload_alarms_blocking()?;
    let now = reg.now_ms();
    Ok(cleared
        .into_iter()
        .map(|crate::ports::ClearedAlarm { id, at_ms: at, detail }| Alarm {
            id,
            at_unix_ms: at,
            host: host.into(),
            kind: kind.into(),
            detail,
            cleared_unix_ms: now,
        })
        .collect())
}

/// Outside input: named, bounded, printable.
fn check_input(host: &str, kind: &str, reason: &str) -> Result<(), ControllerError> {
    for (what, v, max) in [("--host", host, MAX_NAME), ("--kind", kind, MAX_NAME), ("--reason", reason, MAX_REASON)] {
        if v.len() > max {
            return Err(ControllerError::InvalidArgument(format!("{what} is {} bytes long; at most {max}", v.len())));
        }
        if v.chars().any(char::is_control) {
            return Err(ControllerError::InvalidArgument(format!("{what} contains control characters")));
        }
    }
    if host.is_empty() {
        return Err(ControllerError::InvalidArgument("--host HOST is required (see `lifeboat alarms`)".into()));
    }
    if kind.is_empty() {
        return Err(ControllerError::InvalidArgument("--kind KIND is required (see `lifeboat alarms`)".into()));
    }
    Ok(())
}

/// The refusal when no active alarm matched: what is active instead.
fn nothing_matched(host: &str, kind: &str, active: &[(String, String, String)]) -> String {
    let mut named: Vec<String> = active.iter().take(NAMED).map(|(h, k, _)| format!("{k} on {h}")).collect();
    named.dedup();
    if active.len() > NAMED {
        named.push(format!("and {} more", active.len() - NAMED));
    }
    let what =
        if named.is_empty() { "no alarm is active".to_string() } else { format!("active: {}", named.join(", ")) };
    format!("no active '{kind}' alarm on {host}; nothing was changed ({what}; see `lifeboat alarms`)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_input_is_refused_with_the_flag_to_fix() {
        assert!(check_input("host-a", "guests-not-moved", "").is_ok());
        let e = check_input("", "guests-not-moved", "").unwrap_err().to_string();
        assert!(e.contains("--host"), "{e}");
        let e = check_input("host-a", "", "").unwrap_err().to_string();
        assert!(e.contains("--kind"), "{e}");
        let e = check_input("host-a", "k", &"x".repeat(MAX_REASON + 1)).unwrap_err().to_string();
        assert!(e.contains("--reason") && e.contains("at most 2048"), "{e}");
        assert!(check_input("host-a\n", "k", "").is_err());
        assert!(check_input(&"h".repeat(MAX_NAME + 1), "k", "").is_err());
    }

    #[test]
    fn a_refusal_names_what_is_active() {
        let active = vec![
            ("host-a".to_string(), "split-brain".to_string(), "x".to_string()),
            ("host-b".to_string(), "guests-not-moved".to_string(), "y".to_string()),
        ];
        let m = nothing_matched("host-a", "guests-not-moved", &active);
        assert!(m.starts_with("no active 'guests-not-moved' alarm on host-a; nothing was changed"), "{m}");
        assert!(m.contains("active: split-brain on host-a, guests-not-moved on host-b"), "{m}");
        assert!(nothing_matched("h", "k", &[]).contains("no alarm is active"));
    }
}
