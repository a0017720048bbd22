//! Start leases on local disk, and the start guard that reads them.
//!
//! The controller grants this host a lease per guest it owns, renewed over
//! the session; the agent writes them to `<state_dir>/leases/<uuid>.lease`.
//! libvirt's qemu hook runs `lifeboat-agent guard` before every start (and
//! incoming migration/restore): fast, local files only, no libvirt calls.
//! A guest Lifeboat manages (it has, or had, a lease here, or carries
//! Lifeboat ownership metadata) starts only with a valid lease. Fail closed:
//! an unreadable lease or domain is a refusal.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::domxml;

/// One lease file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseFile {
    /// Guest UUID.
    pub uuid: String,
    /// Guest name (for messages).
    pub name: String,
    /// Host the lease is for.
    pub host: String,
    /// Ownership generation.
    pub generation: u64,
    /// Valid until (ms since the epoch).
    pub expires_unix_ms: i64,
    /// When the controller decided it; older decisions do not override it.
    #[serde(default)]
    pub issued_unix_ms: i64,
}

/// The lease directory.
pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("leases")
}

fn path(state_dir: &Path, uuid: &str) -> PathBuf {
    dir(state_dir).join(format!("{uuid}.lease"))
}

fn valid_uuid(u: &str) -> bool {
    u.len() == 36 && u.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}

/// Writes the granted set: every listed lease renewed; unless `merge`,
/// every other lease file is set to expired (kept, so the guest stays
/// "managed" and is refused). Returns the UUIDs newly leased (never leased
/// before on this host).
pub fn apply(state_dir: &Path, host: &str, leases: &[LeaseFile], merge: bool, issued_unix_ms: i64) -> std::io::Result<Vec<String>> {
    let d = dir(state_dir);
    std::fs::create_dir_all(&d)?;
    let mut fresh = Vec::new();
    let granted: BTreeSet<&str> = leases.iter().map(|l| l.uuid.as_str()).collect();
    for l in leases {
        if !valid_uuid(&l.uuid) || l.host != host {
            continue;
        }
        let p = path(state_dir, &l.uuid);
        if !p.exists() {
            fresh.push(l.uuid.clone());
        } else if read(state_dir, &l.uuid).is_ok_and(|old| old.issued_unix_ms > l.issued_unix_ms) {
            continue;
        }
        write_atomic(&p, &serde_json::to_vec(l).expect("serialisable"))?;
    }
    if merge {
        return Ok(fresh);
    }
    for e in std::fs::read_dir(&d)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(uuid) = name.strip_suffix(".lease") else { continue };
        if granted.contains(uuid) {
            continue;
        }
        if let Ok(mut old) = read(state_dir, uuid) {
            if old.expires_unix_ms > 0 && old.issued_unix_ms <= issued_unix_ms {
                old.expires_unix_ms = 0;
                old.issued_unix_ms = issued_unix_ms;
                write_atomic(&e.path(), &serde_json::to_vec(&old).expect("serialisable"))?;
            }
        }
    }
    Ok(fresh)
}

fn write_atomic(p: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = p.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, p)
}

/// Reads one lease file.
pub fn read(state_dir: &Path, uuid: &str) -> Result<LeaseFile, String> {
    let p = path(state_dir, uuid);
    let b = std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    serde_json::from_slice(&b).map_err(|e| format!("{} is corrupt: {e}", p.display()))
}

/// Whether a lease file exists for the guest (it is, or was, managed here).
pub fn known(state_dir: &Path, uuid: &str) -> bool {
    path(state_dir, uuid).exists()
}

/// The guard's verdict.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Let libvirt go on.
    Allow,
    /// Refuse, with the message libvirt shows the user.
    Refuse(String),
    /// Arguments libvirt never sends.
    BadCall(String),
}

/// libvirt's qemu hook operations (docs: libvirt.org/hooks.html).
const KNOWN_OPS: [&str; 9] = ["prepare", "start", "started", "stopped", "release", "migrate", "restore", "reconnect", "attach"];

/// Checks the hook's arguments are what libvirt sends; `Some(message)` if not.
pub fn check_call(args: &[String]) -> Option<String> {
    if args.len() != 4 {
        return Some(format!(
            "lifeboat guard: expected 4 arguments (GUEST OPERATION SUB-OPERATION EXTRA, as libvirt's qemu hook gets them), got {}: {:?}",
            args.len(),
            args
        ));
    }
    if !KNOWN_OPS.contains(&args[1].as_str()) {
        return Some(format!("lifeboat guard: unknown hook operation '{}' (libvirt sends {})", args[1], KNOWN_OPS.join(", ")));
    }
    None
}

/// Decides whether libvirt may go on. `args` are the hook's arguments
/// (GUEST OPERATION SUB-OPERATION EXTRA), `xml` its standard input.
pub fn guard(args: &[String], xml: &str, state_dir: &Path, host: &str, now_ms: i64) -> Verdict {
    if let Some(m) = check_call(args) {
        return Verdict::BadCall(m);
    }
    let (guest, op, sub) = (&args[0], args[1].as_str(), args[2].as_str());
    // Only what makes a guest run on this host is guarded.
    let guarded = matches!((op, sub), ("prepare", "begin") | ("migrate", "begin") | ("restore", "begin"));
    if !guarded {
        return Verdict::Allow;
    }
    let facts = match domxml::parse(xml) {
        Ok(f) => f,
        Err(e) => {
            return Verdict::Refuse(format!(
                "Lifeboat start guard: refusing '{guest}': cannot read its definition from libvirt ({e}); failing closed"
            ));
        }
    };
    let managed = known(state_dir, &facts.uuid) || facts.owner.is_some();
    if !managed {
        return Verdict::Allow;
    }
    let what = match op {
        "migrate" => "receive by incoming migration",
        "restore" => "restore",
        _ => "start",
    };
    let lease = match read(state_dir, &facts.uuid) {
        Ok(l) => l,
        Err(e) => {
            return Verdict::Refuse(format!(
                "Lifeboat start guard: refusing to {what} '{guest}' ({}) on {host}: it is managed by Lifeboat and has no readable lease here ({e})",
                facts.uuid
            ));
        }
    };
    if lease.uuid != facts.uuid || lease.host != host {
        return Verdict::Refuse(format!(
            "Lifeboat start guard: refusing to {what} '{guest}' ({}) on {host}: its lease is for host '{}'",
            facts.uuid, lease.host
        ));
    }
    if let Some((owner, generation)) = &facts.owner {
        if owner != host || *generation > lease.generation {
            return Verdict::Refuse(format!(
                "Lifeboat start guard: refusing to {what} '{guest}' ({}) on {host}: Lifeboat recorded it as owned by '{owner}' (generation {generation})",
                facts.uuid
            ));
        }
    }
    if lease.expires_unix_ms <= now_ms {
        let ago = if lease.expires_unix_ms > 0 { format!("expired {} s ago", (now_ms - lease.expires_unix_ms) / 1000) } else { "was revoked".to_string() };
        return Verdict::Refuse(format!(
            "Lifeboat start guard: refusing to {what} '{guest}' ({}) on {host}: its lease {ago}. The controller grants leases only to a host that is connected and owns the guest; \
             it may have been moved to another host after this host was declared failed. Check `lifeboat vms show {guest}`.",
            facts.uuid
        ));
    }
    Verdict::Allow
}

#[cfg(test)]
mod tests {
    use super::*;

    const U: &str = "33333333-0000-4000-8000-000000000001";

    fn xml(owner: Option<(&str, u64)>) -> String {
        let md = owner
            .map(|(h, g)| format!("<metadata><lb:owner xmlns:lb='{}' host='{h}' generation='{g}'/></metadata>", domxml::OWNER_NS))
            .unwrap_or_default();
        format!("<domain type='kvm'><name>vm1</name><uuid>{U}</uuid>{md}</domain>")
    }

    fn args(op: &str, sub: &str) -> Vec<String> {
        vec!["vm1".into(), op.into(), sub.into(), "-".into()]
    }

    fn lease(host: &str, gen_: u64, exp: i64) -> LeaseFile {
        LeaseFile { uuid: U.into(), name: "vm1".into(), host: host.into(), generation: gen_, expires_unix_ms: exp, issued_unix_ms: 10 }
    }

    #[test]
    fn unmanaged_guests_pass_and_managed_ones_need_a_valid_lease() {
        let d = tempfile::tempdir().unwrap();
        let s = d.path();
        assert_eq!(guard(&args("prepare", "begin"), &xml(None), s, "h", 1000), Verdict::Allow, "never leased: unmanaged");
        apply(s, "h", &[lease("h", 1, 5000)], false, 10).unwrap();
        assert_eq!(guard(&args("prepare", "begin"), &xml(None), s, "h", 1000), Verdict::Allow);
        let Verdict::Refuse(m) = guard(&args("prepare", "begin"), &xml(None), s, "h", 6000) else { panic!() };
        assert!(m.contains("Lifeboat") && m.contains("expired"), "{m}");
        let Verdict::Refuse(m) = guard(&args("migrate", "begin"), &xml(None), s, "h", 6000) else { panic!() };
        assert!(m.contains("incoming migration"), "{m}");
        // Not granted any more: revoked, still refused.
        apply(s, "h", &[], true, 11).unwrap();
        assert_eq!(guard(&args("prepare", "begin"), &xml(None), s, "h", 1000), Verdict::Allow, "merge revokes nothing");
        apply(s, "h", &[], false, 9).unwrap();
        assert_eq!(guard(&args("prepare", "begin"), &xml(None), s, "h", 1000), Verdict::Allow, "an older decision revokes nothing");
        apply(s, "h", &[], false, 11).unwrap();
        let Verdict::Refuse(m) = guard(&args("prepare", "begin"), &xml(None), s, "h", 1000) else { panic!() };
        assert!(m.contains("revoked"), "{m}");
    }

    #[test]
    fn ownership_metadata_makes_a_guest_managed_and_names_its_owner() {
        let d = tempfile::tempdir().unwrap();
        let Verdict::Refuse(m) = guard(&args("prepare", "begin"), &xml(Some(("h", 1))), d.path(), "h", 1) else { panic!() };
        assert!(m.contains("no readable lease"), "{m}");
        apply(d.path(), "h", &[lease("h", 1, 5000)], false, 10).unwrap();
        let Verdict::Refuse(m) = guard(&args("prepare", "begin"), &xml(Some(("other", 2))), d.path(), "h", 1) else { panic!() };
        assert!(m.contains("owned by 'other'"), "{m}");
        assert_eq!(guard(&args("prepare", "begin"), &xml(Some(("h", 1))), d.path(), "h", 1), Verdict::Allow);
    }

    #[test]
    fn other_operations_pass_and_bad_calls_are_named() {
        let d = tempfile::tempdir().unwrap();
        apply(d.path(), "h", &[lease("h", 1, 0)], false, 10).unwrap();
        assert_eq!(guard(&args("stopped", "end"), "", d.path(), "h", 1), Verdict::Allow);
        assert!(matches!(guard(&args("frobnicate", "begin"), "", d.path(), "h", 1), Verdict::BadCall(_)));
        assert!(matches!(guard(&["vm1".to_string()], "", d.path(), "h", 1), Verdict::BadCall(_)));
        let Verdict::Refuse(m) = guard(&args("prepare", "begin"), "not xml", d.path(), "h", 1) else { panic!() };
        assert!(m.contains("failing closed"), "{m}");
    }

    #[test]
    fn corrupt_lease_fails_closed() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir(d.path())).unwrap();
        std::fs::write(path(d.path(), U), "garbage").unwrap();
        assert!(matches!(guard(&args("prepare", "begin"), &xml(None), d.path(), "h", 1), Verdict::Refuse(_)));
    }
}
