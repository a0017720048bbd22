//! Start leases on local disk, and the start guard that reads them.
//!
//! The controller grants this host a lease per guest it owns, renewed over
//! the session; the agent writes them to `<state_dir>/leases/<uuid>.lease`.
//! libvirt's qemu hook runs `lifeboat-agent guard` before every start (and
//! incoming migration/restore): fast, local files only, no libvirt calls.
//! A guest Lifeboat manages (it has, or had, a lease here, or carries
//! Lifeboat ownership metadata) starts only with a valid lease. Fail closed:
//! an unreadable lease or domain is a refusal.

use std::collections::{BTreeMap, BTreeSet};
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

/// The renewals of the last full grant, in one file (`leases/renewal.json`):
/// which leases (UUID → generation) it renewed and until when. A renewal
/// only moves expiries forward, and the controller renews every lease every
/// third of the TTL: writing one file per renewal instead of one per guest
/// keeps that steady stream cheap. Grants, generation changes and
/// revocations are written (and synced) to the guest's own lease file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Renewal {
    /// Host the renewal is for.
    pub host: String,
    /// When the controller decided it.
    pub issued_unix_ms: i64,
    /// Valid until (ms since the epoch).
    pub expires_unix_ms: i64,
    /// The renewed leases: UUID → ownership generation.
    pub leases: BTreeMap<String, u64>,
}

fn renewal_path(state_dir: &Path) -> PathBuf {
    dir(state_dir).join("renewal.json")
}

/// The renewal file; `None` when missing or unreadable (then only the lease
/// files count: expiries are earlier, never later).
fn read_renewal(state_dir: &Path) -> Option<Renewal> {
    serde_json::from_slice(&std::fs::read(renewal_path(state_dir)).ok()?).ok()
}

/// `lease` as renewed by `renewal`: when the renewal is for the same host
/// and generation, the lease is not revoked (a revocation, expiry 0, is
/// final until a new grant), and the renewal is not older than the lease
/// file's decision.
fn renewed(mut lease: LeaseFile, renewal: Option<&Renewal>) -> LeaseFile {
    if let Some(r) = renewal {
        if r.host == lease.host
            && r.leases.get(&lease.uuid) == Some(&lease.generation)
            && lease.expires_unix_ms > 0
            && r.issued_unix_ms >= lease.issued_unix_ms
        {
            lease.expires_unix_ms = lease.expires_unix_ms.max(r.expires_unix_ms);
            lease.issued_unix_ms = r.issued_unix_ms;
        }
    }
    lease
}

/// Writes the granted set: every listed lease renewed; unless `merge`,
/// every other lease file is set to expired (kept, so the guest stays
/// "managed" and is refused). Returns the UUIDs newly leased (never leased
/// before on this host).
///
/// A new lease, a new generation and a revocation are written to the
/// guest's lease file and synced before anything else; a full grant's pure
/// renewals only rewrite the one renewal file (atomically, not synced:
/// losing it in a crash leaves earlier expiries on disk, so the guard
/// refuses sooner, never later).
pub fn apply(state_dir: &Path, host: &str, leases: &[LeaseFile], merge: bool, issued_unix_ms: i64) -> std::io::Result<Vec<String>> {
    let d = dir(state_dir);
    std::fs::create_dir_all(&d)?;
    let renewal = read_renewal(state_dir);
    let mut fresh = Vec::new();
    let mut renew = Renewal { host: host.to_string(), issued_unix_ms, expires_unix_ms: 0, leases: BTreeMap::new() };
    let granted: BTreeSet<&str> = leases.iter().map(|l| l.uuid.as_str()).collect();
    for l in leases {
        if !valid_uuid(&l.uuid) || l.host != host {
            continue;
        }
        let p = path(state_dir, &l.uuid);
        let mut durable = true;
        if !p.exists() {
            fresh.push(l.uuid.clone());
        } else if let Ok(file) = read_file(state_dir, &l.uuid) {
            let old = renewed(file.clone(), renewal.as_ref());
            if old.issued_unix_ms > l.issued_unix_ms {
                continue;
            }
            if is_extension(&old, l) {
                if !merge && l.issued_unix_ms == issued_unix_ms && file.issued_unix_ms <= issued_unix_ms {
                    renew.leases.insert(l.uuid.clone(), l.generation);
                    renew.expires_unix_ms = renew.expires_unix_ms.max(l.expires_unix_ms);
                    continue;
                }
                durable = false;
            }
        }
        write_atomic(&p, &serde_json::to_vec(l).expect("serialisable"), durable)?;
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
                write_atomic(&e.path(), &serde_json::to_vec(&old).expect("serialisable"), true)?;
            }
        }
    }
    // Replaced only by a newer decision (a stale grant must not drop renewals).
    let newer = renewal.as_ref().map_or(!renew.leases.is_empty(), |r| r.issued_unix_ms <= issued_unix_ms);
    if newer {
        write_atomic(&renewal_path(state_dir), &serde_json::to_vec(&renew).expect("serialisable"), false)?;
    }
    Ok(fresh)
}

/// Whether `new` only renews `old`: the same valid (not revoked) lease of
/// the same guest, host and generation, valid as long or longer.
fn is_extension(old: &LeaseFile, new: &LeaseFile) -> bool {
    old.uuid == new.uuid
        && old.host == new.host
        && old.generation == new.generation
        && old.expires_unix_ms > 0
        && new.expires_unix_ms >= old.expires_unix_ms
}

/// Replaces `p` atomically (readers see the old or the new file, never a
/// torn one); with `durable`, the data is on disk before the rename.
fn write_atomic(p: &Path, data: &[u8], durable: bool) -> std::io::Result<()> {
    let tmp = p.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        if durable {
            f.sync_all()?;
        }
    }
    std::fs::rename(&tmp, p)
}

/// Reads one lease file as it is on disk.
fn read_file(state_dir: &Path, uuid: &str) -> Result<LeaseFile, String> {
    let p = path(state_dir, uuid);
    let b = std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    serde_json::from_slice(&b).map_err(|e| format!("{} is corrupt: {e}", p.display()))
}

/// Reads one lease: its lease file, with the last renewal applied.
pub fn read(state_dir: &Path, uuid: &str) -> Result<LeaseFile, String> {
    read_file(state_dir, uuid).map(|l| renewed(l, read_renewal(state_dir).as_ref()))
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
    fn only_pure_renewals_skip_the_sync() {
        let l = lease("h", 1, 5000);
        assert!(is_extension(&l, &lease("h", 1, 9000)), "a longer lease of the same generation");
        assert!(!is_extension(&l, &lease("h", 2, 9000)), "a new generation");
        assert!(!is_extension(&l, &lease("other", 1, 9000)), "another host");
        assert!(!is_extension(&l, &lease("h", 1, 4000)), "shortened");
        assert!(!is_extension(&lease("h", 1, 0), &lease("h", 1, 9000)), "granted again after a revocation");
        assert!(!is_extension(&l, &lease("h", 1, 0)), "a revocation");
    }

    #[test]
    fn renewals_go_to_the_renewal_file_and_never_outlive_a_revocation() {
        let d = tempfile::tempdir().unwrap();
        let s = d.path();
        let at = |exp: i64, issued: i64, gen_: u64| LeaseFile { expires_unix_ms: exp, issued_unix_ms: issued, ..lease("h", gen_, 0) };
        apply(s, "h", &[at(5000, 10, 1)], false, 10).unwrap();
        apply(s, "h", &[at(9000, 20, 1)], false, 20).unwrap();
        assert_eq!(read_file(s, U).unwrap().expires_unix_ms, 5000, "the lease file is not rewritten for a renewal");
        assert_eq!(read(s, U).unwrap().expires_unix_ms, 9000, "the renewal counts");
        assert_eq!(guard(&args("prepare", "begin"), &xml(None), s, "h", 7000), Verdict::Allow);
        // a stale (older) renewal does not shorten or override
        apply(s, "h", &[at(8000, 15, 1)], false, 15).unwrap();
        assert_eq!(read(s, U).unwrap().expires_unix_ms, 9000);
        // a new generation is written to the lease file
        apply(s, "h", &[at(12000, 30, 2)], false, 30).unwrap();
        assert_eq!(read_file(s, U).unwrap(), at(12000, 30, 2));
        apply(s, "h", &[at(15000, 40, 2)], false, 40).unwrap();
        assert_eq!(read(s, U).unwrap().expires_unix_ms, 15000);
        // revoked: the renewal file that still lists it no longer counts
        apply(s, "h", &[], false, 50).unwrap();
        assert_eq!(read(s, U).unwrap().expires_unix_ms, 0);
        let Verdict::Refuse(m) = guard(&args("prepare", "begin"), &xml(None), s, "h", 7000) else { panic!() };
        assert!(m.contains("revoked"), "{m}");
        // granted again after the revocation: written to the lease file
        apply(s, "h", &[at(20000, 60, 2)], false, 60).unwrap();
        assert_eq!(read_file(s, U).unwrap(), at(20000, 60, 2));
        // a lost or corrupt renewal file only makes leases end sooner
        apply(s, "h", &[at(25000, 70, 2)], false, 70).unwrap();
        std::fs::write(renewal_path(s), "garbage").unwrap();
        assert_eq!(read(s, U).unwrap().expires_unix_ms, 20000);
        // merge grants renew in the lease file and leave the renewal file alone
        apply(s, "h", &[at(30000, 80, 2)], true, 80).unwrap();
        assert_eq!(read_file(s, U).unwrap().expires_unix_ms, 30000);
    }

    #[test]
    fn corrupt_lease_fails_closed() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir(d.path())).unwrap();
        std::fs::write(path(d.path(), U), "garbage").unwrap();
        assert!(matches!(guard(&args("prepare", "begin"), &xml(None), d.path(), "h", 1), Verdict::Refuse(_)));
    }
}
