//! Start leases on local disk, and the start guard that reads them.
//!
//! The controller grants this host a lease per guest it owns, renewed over
//! the session; the agent writes them to `<state_dir>/leases/<uuid>.lease`.
//! libvirt's qemu hook runs `lifeboat-agent guard` before every start (and
//! incoming migration/restore): fast, local files only, no libvirt calls.
//! A guest Lifeboat manages (it has, or had, a lease here, or carries
//! Lifeboat ownership metadata) starts only with a valid lease granted for
//! this host in this boot. Fail closed: an unreadable lease, marker, boot id
//! or domain is a refusal; only "not found" means "not there".
//!
//! The first write of leases also writes `<state_dir>/enrolled`: on an
//! enrolled host a missing lease directory means lost state (a wiped or
//! unmounted state directory), not "never managed", and refuses.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

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
    /// The fencing epoch of the controller that decided it (0: a SQLite
    /// controller, or a file written before epochs). Decisions are ordered
    /// by (epoch, issued): a newer leader's decision always wins over an
    /// older leader's, whatever either's clock said.
    #[serde(default)]
    pub epoch: u64,
    /// The host's boot id when the lease was granted (read from the agent's
    /// `boot_id_file`): a lease is valid only in the boot it was granted
    /// for. Empty in files written before boot binding: never valid.
    #[serde(default)]
    pub boot_id: String,
}

/// Why lease state could not be read or written. Only "not found" is ever
/// taken as "not there"; everything else is one of these, and refuses.
#[derive(Debug, Error)]
pub enum LeaseError {
    /// A file or directory could not be read, written or synced.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// A lease file is not what the agent writes.
    #[error("{} is corrupt: {reason}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// The boot id file is empty.
    #[error("{} is empty (no boot id)", path.display())]
    NoBootId {
        /// The boot id file.
        path: PathBuf,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LeaseError + '_ {
    move |source| LeaseError::Io { path: path.to_path_buf(), source }
}

/// The lease directory.
pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("leases")
}

fn path(state_dir: &Path, uuid: &str) -> PathBuf {
    dir(state_dir).join(format!("{uuid}.lease"))
}

/// The enrolled-host marker: written (and synced) the first time this host
/// is granted leases, never removed by the agent.
pub fn enrolled_marker(state_dir: &Path) -> PathBuf {
    state_dir.join("enrolled")
}

fn valid_uuid(u: &str) -> bool {
    u.len() == 36 && u.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}

/// Whether `p` exists: `Ok(false)` only for "not found"; any other error
/// (permission, SELinux, a broken mount) is an error, never "absent".
fn exists(p: &Path) -> Result<bool, LeaseError> {
    match std::fs::symlink_metadata(p) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(LeaseError::Io { path: p.to_path_buf(), source: e }),
    }
}

/// Whether this host is enrolled (has ever been granted leases).
pub fn enrolled(state_dir: &Path) -> Result<bool, LeaseError> {
    exists(&enrolled_marker(state_dir))
}

/// The host's current boot id, from `boot_id_file` (trimmed, not empty).
pub fn current_boot_id(boot_id_file: &Path) -> Result<String, LeaseError> {
    let s = std::fs::read_to_string(boot_id_file).map_err(io_err(boot_id_file))?;
    let s = s.trim();
    if s.is_empty() {
        return Err(LeaseError::NoBootId { path: boot_id_file.to_path_buf() });
    }
    Ok(s.to_string())
}

/// The renewals of the last full grant, in one file (`leases/renewal.json`):
/// which leases (UUID → generation) it renewed and until when. A renewal
/// only moves expiries forward, and the controller renews every lease every
/// third of the TTL: writing one file per renewal instead of one per guest
/// keeps that steady stream cheap. Grants, generation changes, new boots and
/// revocations are written (and synced) to the guest's own lease file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Renewal {
    /// Host the renewal is for.
    pub host: String,
    /// When the controller decided it.
    pub issued_unix_ms: i64,
    /// The deciding controller's fencing epoch (see [`LeaseFile::epoch`]).
    #[serde(default)]
    pub epoch: u64,
    /// Valid until (ms since the epoch).
    pub expires_unix_ms: i64,
    /// The renewed leases: UUID → ownership generation.
    pub leases: BTreeMap<String, u64>,
    /// The boot the renewal was granted in; it extends only leases of that boot.
    #[serde(default)]
    pub boot_id: String,
}

fn renewal_path(state_dir: &Path) -> PathBuf {
    dir(state_dir).join("renewal.json")
}

/// The renewal file; `None` when missing or unreadable (then only the lease
/// files count: expiries are earlier, never later).
fn read_renewal(state_dir: &Path) -> Option<Renewal> {
    serde_json::from_slice(&std::fs::read(renewal_path(state_dir)).ok()?).ok()
}

/// `lease` as renewed by `renewal`: when the renewal is for the same host,
/// boot and generation, the lease is not revoked (a revocation, expiry 0, is
/// final until a new grant), and the renewal is not older than the lease
/// file's decision.
fn renewed(mut lease: LeaseFile, renewal: Option<&Renewal>) -> LeaseFile {
    if let Some(r) = renewal
        && r.host == lease.host
        && r.boot_id == lease.boot_id
        && r.leases.get(&lease.uuid) == Some(&lease.generation)
        && lease.expires_unix_ms > 0
        && (r.epoch, r.issued_unix_ms) >= (lease.epoch, lease.issued_unix_ms)
    {
        lease.expires_unix_ms = lease.expires_unix_ms.max(r.expires_unix_ms);
        lease.issued_unix_ms = r.issued_unix_ms;
        lease.epoch = r.epoch;
    }
    lease
}

/// What [`apply`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// UUIDs newly leased (never leased before on this host).
    pub fresh: Vec<String>,
    /// UUIDs whose granted generation is lower than the one in their lease
    /// file here: not written (generations only move forward).
    pub stale_generation: Vec<String>,
    /// UUIDs whose existing lease file cannot be read: not written (its
    /// generation is unknown, so moving forward cannot be checked).
    pub unreadable: Vec<String>,
    /// UUIDs whose lease a newer decision (higher epoch, or the same epoch
    /// and a later issue time) already set: neither granted nor revoked by
    /// this one. The command fails naming them.
    pub superseded: Vec<String>,
}

/// Writes the granted set: every listed lease renewed; unless `merge`,
/// every other lease file is set to expired (kept, so the guest stays
/// "managed" and is refused). Every lease carries the boot id it was granted
/// in; the renewal file takes the first lease's.
///
/// A new lease, a new generation, a new boot and a revocation are written
/// to the guest's lease file, synced, and its directory synced, before
/// anything else; a full grant's pure renewals only rewrite the one renewal
/// file (atomically, not synced: losing it in a crash leaves earlier
/// expiries on disk, so the guard refuses sooner, never later). A lease of
/// a lower generation than its lease file's is refused (and reported), the
/// others still apply. Writes the enrolled marker first, once.
pub fn apply(
    state_dir: &Path,
    host: &str,
    leases: &[LeaseFile],
    merge: bool,
    issued_unix_ms: i64,
    epoch: u64,
) -> Result<Applied, LeaseError> {
    let decision = (epoch, issued_unix_ms);
    let d = dir(state_dir);
    if !exists(&d)? {
        std::fs::create_dir_all(&d).map_err(io_err(&d))?;
        // The new directory's own name must be on disk before any lease in it counts.
        sync_dir(state_dir)?;
    }
    if !enrolled(state_dir)? {
        let marker = serde_json::json!({ "host": host, "enrolled_unix_ms": issued_unix_ms });
        write_atomic(&enrolled_marker(state_dir), marker.to_string().as_bytes(), true)?;
    }
    let renewal = read_renewal(state_dir);
    let boot_id = leases.first().map(|l| l.boot_id.clone()).unwrap_or_default();
    let mut out = Applied::default();
    let mut renew =
        Renewal { host: host.to_string(), issued_unix_ms, epoch, expires_unix_ms: 0, leases: BTreeMap::new(), boot_id };
    let granted: BTreeSet<&str> = leases.iter().map(|l| l.uuid.as_str()).collect();
    for l in leases {
        if !valid_uuid(&l.uuid) || l.host != host {
            continue;
        }
        let p = path(state_dir, &l.uuid);
        let mut durable = true;
        match read_file(state_dir, &l.uuid) {
            Err(e) => {
                tracing::error!(uuid = %l.uuid, "lease not written: the existing lease file cannot be read ({e}); remove it once the guest's owner is known");
                out.unreadable.push(l.uuid.clone());
                continue;
            }
            Ok(None) => out.fresh.push(l.uuid.clone()),
            Ok(Some(file)) => {
                let old = renewed(file.clone(), renewal.as_ref());
                if (old.epoch, old.issued_unix_ms) > (l.epoch, l.issued_unix_ms) {
                    tracing::warn!(
                        uuid = %l.uuid,
                        "lease not written: a newer decision (epoch {}, issued {}) stands over this one (epoch {}, issued {})",
                        old.epoch, old.issued_unix_ms, l.epoch, l.issued_unix_ms
                    );
                    out.superseded.push(l.uuid.clone());
                    continue;
                }
                if l.generation < file.generation {
                    tracing::warn!(
                        uuid = %l.uuid,
                        granted = l.generation,
                        known = file.generation,
                        "lease refused: its generation is lower than this host's lease file has (generations only move forward)"
                    );
                    out.stale_generation.push(l.uuid.clone());
                    continue;
                }
                if is_extension(&old, l) {
                    if !merge
                        && (l.epoch, l.issued_unix_ms) == decision
                        && (file.epoch, file.issued_unix_ms) <= decision
                        && l.boot_id == renew.boot_id
                    {
                        renew.leases.insert(l.uuid.clone(), l.generation);
                        renew.expires_unix_ms = renew.expires_unix_ms.max(l.expires_unix_ms);
                        continue;
                    }
                    durable = false;
                }
            }
        }
        write_atomic(&p, &serde_json::to_vec(l).expect("serialisable"), durable)?;
    }
    if merge {
        return Ok(out);
    }
    for e in std::fs::read_dir(&d).map_err(io_err(&d))?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(uuid) = name.strip_suffix(".lease") else { continue };
        if granted.contains(uuid) {
            continue;
        }
        match lookup(state_dir, uuid) {
            Ok(Some(mut old)) => {
                if old.expires_unix_ms > 0 && (old.epoch, old.issued_unix_ms) <= decision {
                    old.expires_unix_ms = 0;
                    old.issued_unix_ms = issued_unix_ms;
                    old.epoch = epoch;
                    write_atomic(&e.path(), &serde_json::to_vec(&old).expect("serialisable"), true)?;
                } else if old.expires_unix_ms > 0 {
                    tracing::warn!(
                        %uuid,
                        "lease not revoked: a newer decision (epoch {}, issued {}) stands over this one (epoch {epoch}, issued {issued_unix_ms})",
                        old.epoch, old.issued_unix_ms
                    );
                    out.superseded.push(uuid.to_string());
                }
            }
            Ok(None) => {}
            // The guard refuses it as it is: nothing to revoke.
            Err(err) => tracing::error!("cannot revoke a lease: {err}"),
        }
    }
    // Replaced only by a newer decision (a stale grant must not drop renewals).
    let newer = renewal.as_ref().map_or(!renew.leases.is_empty(), |r| (r.epoch, r.issued_unix_ms) <= decision);
    if newer {
        write_atomic(&renewal_path(state_dir), &serde_json::to_vec(&renew).expect("serialisable"), false)?;
    }
    Ok(out)
}

/// Whether `new` only renews `old`: the same valid (not revoked) lease of
/// the same guest, host, boot and generation, valid as long or longer.
fn is_extension(old: &LeaseFile, new: &LeaseFile) -> bool {
    old.uuid == new.uuid
        && old.host == new.host
        && old.boot_id == new.boot_id
        && old.generation == new.generation
        && old.expires_unix_ms > 0
        && new.expires_unix_ms >= old.expires_unix_ms
}

/// Replaces `p` atomically (readers see the old or the new file, never a
/// torn one). With `durable`, the data is on disk before the rename and the
/// rename is on disk (the directory synced) before this returns: a lease
/// acknowledged to the controller survives a power loss.
fn write_atomic(p: &Path, data: &[u8], durable: bool) -> Result<(), LeaseError> {
    let tmp = p.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(data).map_err(io_err(&tmp))?;
        if durable {
            f.sync_all().map_err(io_err(&tmp))?;
        }
    }
    std::fs::rename(&tmp, p).map_err(io_err(p))?;
    if durable {
        sync_dir(p.parent().unwrap_or(Path::new(".")))?;
    }
    Ok(())
}

/// Syncs a directory, so the names created or renamed in it are on disk.
fn sync_dir(d: &Path) -> Result<(), LeaseError> {
    std::fs::File::open(d).and_then(|f| f.sync_all()).map_err(io_err(d))
}

/// Reads one lease file as it is on disk: `Ok(None)` only when it does not
/// exist; any other failure is an error naming the file.
pub fn read_file(state_dir: &Path, uuid: &str) -> Result<Option<LeaseFile>, LeaseError> {
    let p = path(state_dir, uuid);
    let b = match std::fs::read(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(LeaseError::Io { path: p, source: e }),
    };
    serde_json::from_slice(&b).map(Some).map_err(|e| LeaseError::Corrupt { path: p, reason: e.to_string() })
}

/// Looks one lease up: its lease file, with the last renewal applied;
/// `Ok(None)` only when there is no lease file.
pub fn lookup(state_dir: &Path, uuid: &str) -> Result<Option<LeaseFile>, LeaseError> {
    Ok(read_file(state_dir, uuid)?.map(|l| renewed(l, read_renewal(state_dir).as_ref())))
}

/// Reads one lease ([`lookup`]); a missing lease file is an error too.
pub fn read(state_dir: &Path, uuid: &str) -> Result<LeaseFile, LeaseError> {
    lookup(state_dir, uuid)?.ok_or_else(|| LeaseError::Io {
        path: path(state_dir, uuid),
        source: std::io::Error::from(ErrorKind::NotFound),
    })
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
const KNOWN_OPS: [&str; 9] =
    ["prepare", "start", "started", "stopped", "release", "migrate", "restore", "reconnect", "attach"];

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
        return Some(format!(
            "lifeboat guard: unknown hook operation '{}' (libvirt sends {})",
            args[1],
            KNOWN_OPS.join(", ")
        ));
    }
    None
}

/// Where the guard reads its inputs: the agent's state directory, this
/// host's id, the boot id file, and the time.
#[derive(Debug, Clone, Copy)]
pub struct GuardEnv<'a> {
    /// The agent's `state_dir`.
    pub state_dir: &'a Path,
    /// This host's id.
    pub host: &'a str,
    /// The agent's `boot_id_file`.
    pub boot_id_file: &'a Path,
    /// Now (ms since the epoch).
    pub now_ms: i64,
}

/// Decides whether libvirt may go on. `args` are the hook's arguments
/// (GUEST OPERATION SUB-OPERATION EXTRA), `xml` its standard input.
pub fn guard(args: &[String], xml: &str, env: &GuardEnv<'_>) -> Verdict {
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
    let what = match op {
        "migrate" => "receive by incoming migration",
        "restore" => "restore",
        _ => "start",
    };
    let (state_dir, host) = (env.state_dir, env.host);
    let refuse = |why: String| {
        Verdict::Refuse(format!("Lifeboat start guard: refusing to {what} '{guest}' ({}) on {host}: {why}", facts.uuid))
    };
    let unreadable = |e: LeaseError| {
        refuse(format!(
            "cannot read Lifeboat's lease state ({e}); failing closed. Fix access to {} (permissions, SELinux labels, the mount) and try again",
            state_dir.display()
        ))
    };
    match enrolled(state_dir) {
        Err(e) => return unreadable(e),
        Ok(true) => match exists(&dir(state_dir)) {
            Err(e) => return unreadable(e),
            Ok(false) => {
                return refuse(format!(
                    "this host is enrolled in Lifeboat ({} exists) but its lease directory {} is missing: lease state was lost \
                     or is not mounted, so no guest can be told apart as unmanaged. Restore {} (the controller rewrites the \
                     leases once the agent is connected)",
                    enrolled_marker(state_dir).display(),
                    dir(state_dir).display(),
                    dir(state_dir).display()
                ));
            }
            Ok(true) => {}
        },
        Ok(false) => {}
    }
    let lease = match lookup(state_dir, &facts.uuid) {
        Ok(Some(l)) => l,
        Ok(None) => {
            return match &facts.owner {
                // Never leased here and no ownership metadata: not managed.
                None => Verdict::Allow,
                Some((owner, generation)) => refuse(format!(
                    "it carries Lifeboat ownership metadata (owner '{owner}', generation {generation}) and has no lease here \
                     ({} is missing). Check `lifeboat vms show {guest}`",
                    path(state_dir, &facts.uuid).display()
                )),
            };
        }
        Err(e) => return unreadable(e),
    };
    if lease.uuid != facts.uuid || lease.host != host {
        return refuse(format!("its lease is for host '{}'", lease.host));
    }
    if let Some((owner, generation)) = &facts.owner
        && (owner != host || *generation > lease.generation)
    {
        return refuse(format!("Lifeboat recorded it as owned by '{owner}' (generation {generation})"));
    }
    let boot = match current_boot_id(env.boot_id_file) {
        Ok(b) => b,
        Err(e) => {
            return refuse(format!(
                "cannot read this host's boot id ({e}); a lease is valid only in the boot it was granted for"
            ));
        }
    };
    if lease.boot_id != boot {
        let granted = if lease.boot_id.is_empty() {
            "no boot id recorded".to_string()
        } else {
            format!("boot {}", lease.boot_id)
        };
        return refuse(format!(
            "its lease was granted before this host last booted ({granted}, now boot {boot}). The controller grants a new \
             lease once the agent is connected and the host owns the guest; check `lifeboat vms show {guest}`"
        ));
    }
    if lease.expires_unix_ms <= env.now_ms {
        let ago = if lease.expires_unix_ms > 0 {
            format!("expired {} s ago", (env.now_ms - lease.expires_unix_ms) / 1000)
        } else {
            "was revoked".to_string()
        };
        return refuse(format!(
            "its lease {ago}. The controller grants leases only to a host that is connected and owns the guest; \
             it may have been moved to another host after this host was declared failed. Check `lifeboat vms show {guest}`."
        ));
    }
    Verdict::Allow
}

#[cfg(test)]
mod tests {
    use super::*;

    const U: &str = "33333333-0000-4000-8000-000000000001";
    const U2: &str = "33333333-0000-4000-8000-000000000002";

    fn xml(owner: Option<(&str, u64)>) -> String {
        let md = owner
            .map(|(h, g)| {
                format!("<metadata><lb:owner xmlns:lb='{}' host='{h}' generation='{g}'/></metadata>", domxml::OWNER_NS)
            })
            .unwrap_or_default();
        format!("<domain type='kvm'><name>vm1</name><uuid>{U}</uuid>{md}</domain>")
    }

    fn args(op: &str, sub: &str) -> Vec<String> {
        vec!["vm1".into(), op.into(), sub.into(), "-".into()]
    }

    fn lease(host: &str, gen_: u64, exp: i64) -> LeaseFile {
        LeaseFile {
            uuid: U.into(),
            name: "vm1".into(),
            host: host.into(),
            generation: gen_,
            expires_unix_ms: exp,
            issued_unix_ms: 10,
            epoch: 0,
            boot_id: "boot-1".into(),
        }
    }

    /// A state directory and a boot id file reading `boot-1`.
    struct Host {
        _tmp: tempfile::TempDir,
        state: PathBuf,
        boot: PathBuf,
    }

    impl Host {
        fn new() -> Host {
            let tmp = tempfile::tempdir().unwrap();
            let state = tmp.path().join("state");
            std::fs::create_dir_all(&state).unwrap();
            let boot = tmp.path().join("boot_id");
            std::fs::write(&boot, "boot-1\n").unwrap();
            Host { _tmp: tmp, state, boot }
        }
        fn s(&self) -> &Path {
            &self.state
        }
        fn check(&self, op: &str, xml: &str, now_ms: i64) -> Verdict {
            let env = GuardEnv { state_dir: &self.state, host: "h", boot_id_file: &self.boot, now_ms };
            guard(&args(op, "begin"), xml, &env)
        }
        fn refused(&self, op: &str, xml: &str, now_ms: i64) -> String {
            match self.check(op, xml, now_ms) {
                Verdict::Refuse(m) => m,
                v => panic!("expected a refusal, got {v:?}"),
            }
        }
    }

    #[test]
    fn unmanaged_guests_pass_and_managed_ones_need_a_valid_lease() {
        let h = Host::new();
        let s = h.s();
        assert_eq!(h.check("prepare", &xml(None), 1000), Verdict::Allow, "never leased: unmanaged");
        apply(s, "h", &[lease("h", 1, 5000)], false, 10, 0).unwrap();
        assert_eq!(h.check("prepare", &xml(None), 1000), Verdict::Allow);
        let m = h.refused("prepare", &xml(None), 6000);
        assert!(m.contains("Lifeboat start guard: refusing") && m.contains("expired"), "{m}");
        let m = h.refused("migrate", &xml(None), 6000);
        assert!(m.contains("incoming migration"), "{m}");
        // Not granted any more: revoked, still refused.
        apply(s, "h", &[], true, 11, 0).unwrap();
        assert_eq!(h.check("prepare", &xml(None), 1000), Verdict::Allow, "merge revokes nothing");
        apply(s, "h", &[], false, 9, 0).unwrap();
        assert_eq!(h.check("prepare", &xml(None), 1000), Verdict::Allow, "an older decision revokes nothing");
        apply(s, "h", &[], false, 11, 0).unwrap();
        let m = h.refused("prepare", &xml(None), 1000);
        assert!(m.contains("revoked"), "{m}");
    }

    #[test]
    fn ownership_metadata_makes_a_guest_managed_and_names_its_owner() {
        let h = Host::new();
        let m = h.refused("prepare", &xml(Some(("h", 1))), 1);
        assert!(m.contains("ownership metadata") && m.contains("no lease here"), "{m}");
        apply(h.s(), "h", &[lease("h", 1, 5000)], false, 10, 0).unwrap();
        let m = h.refused("prepare", &xml(Some(("other", 2))), 1);
        assert!(m.contains("owned by 'other'"), "{m}");
        assert_eq!(h.check("prepare", &xml(Some(("h", 1))), 1), Verdict::Allow);
    }

    #[test]
    fn other_operations_pass_and_bad_calls_are_named() {
        let h = Host::new();
        apply(h.s(), "h", &[lease("h", 1, 0)], false, 10, 0).unwrap();
        let env = GuardEnv { state_dir: h.s(), host: "h", boot_id_file: &h.boot, now_ms: 1 };
        assert_eq!(guard(&args("stopped", "end"), "", &env), Verdict::Allow);
        assert!(matches!(guard(&args("frobnicate", "begin"), "", &env), Verdict::BadCall(_)));
        assert!(matches!(guard(&["vm1".to_string()], "", &env), Verdict::BadCall(_)));
        let m = h.refused("prepare", "not xml", 1);
        assert!(m.contains("failing closed"), "{m}");
    }

    #[test]
    fn lease_state_that_cannot_be_read_refuses_and_names_the_path() {
        // A lease "file" that is a directory: reading fails with EISDIR, not "not found".
        let h = Host::new();
        std::fs::create_dir_all(path(h.s(), U)).unwrap();
        let m = h.refused("prepare", &xml(None), 1);
        assert!(m.contains("cannot read Lifeboat's lease state") && m.contains(&format!("{U}.lease")), "{m}");
        // A symlink loop: Path::exists() says false (ELOOP), which looked unmanaged before.
        let h = Host::new();
        std::fs::create_dir_all(dir(h.s())).unwrap();
        std::os::unix::fs::symlink(path(h.s(), U), path(h.s(), U)).unwrap();
        assert!(!path(h.s(), U).exists(), "the trap: exists() is false");
        let m = h.refused("prepare", &xml(None), 1);
        assert!(m.contains("cannot read Lifeboat's lease state") && m.contains("failing closed"), "{m}");
        // The state directory is not a directory: the enrolled marker cannot be looked at.
        let h = Host::new();
        std::fs::remove_dir(h.s()).unwrap();
        std::fs::write(h.s(), "a file").unwrap();
        let m = h.refused("prepare", &xml(None), 1);
        assert!(m.contains("enrolled") && m.contains("cannot read"), "{m}");
        // A corrupt lease file.
        let h = Host::new();
        std::fs::create_dir_all(dir(h.s())).unwrap();
        std::fs::write(path(h.s(), U), "garbage").unwrap();
        let m = h.refused("prepare", &xml(None), 1);
        assert!(m.contains("is corrupt"), "{m}");
    }

    #[test]
    fn an_enrolled_host_without_its_lease_directory_refuses_every_start() {
        let h = Host::new();
        assert!(!enrolled(h.s()).unwrap());
        apply(h.s(), "h", &[lease("h", 1, 5000)], false, 10, 0).unwrap();
        assert!(enrolled(h.s()).unwrap(), "the first grant enrols the host");
        let marker: serde_json::Value =
            serde_json::from_slice(&std::fs::read(enrolled_marker(h.s())).unwrap()).unwrap();
        assert_eq!(marker["host"], "h");
        std::fs::remove_dir_all(dir(h.s())).unwrap();
        // Even a guest with no lease and no metadata: it cannot be told apart any more.
        let m = h.refused("prepare", &xml(None), 1);
        assert!(m.contains("enrolled") && m.contains("lease directory") && m.contains("missing"), "{m}");
        // Not enrolled: no lease directory just means nothing is managed here yet.
        std::fs::remove_file(enrolled_marker(h.s())).unwrap();
        assert_eq!(h.check("prepare", &xml(None), 1), Verdict::Allow);
        // Owner metadata and no lease: refused either way.
        let m = h.refused("prepare", &xml(Some(("h", 1))), 1);
        assert!(m.contains("ownership metadata"), "{m}");
    }

    #[test]
    fn a_lease_is_valid_only_in_the_boot_it_was_granted_for() {
        let h = Host::new();
        let s = h.s();
        apply(s, "h", &[lease("h", 1, 5000)], false, 10, 0).unwrap();
        assert_eq!(h.check("prepare", &xml(None), 1000), Verdict::Allow);
        // The host reboots: the lease on disk is from the old boot.
        std::fs::write(&h.boot, "boot-2\n").unwrap();
        let m = h.refused("prepare", &xml(None), 1000);
        assert!(
            m.contains("granted before this host last booted") && m.contains("boot-1") && m.contains("boot-2"),
            "{m}"
        );
        // No boot id: refused for a managed guest, an unmanaged one is not Lifeboat's business.
        std::fs::remove_file(&h.boot).unwrap();
        let m = h.refused("prepare", &xml(None), 1000);
        assert!(m.contains("boot id") && m.contains("boot_id"), "{m}");
        std::fs::write(&h.boot, "  \n").unwrap();
        assert!(h.refused("prepare", &xml(None), 1000).contains("empty"));
        let other = xml(None).replace(U, U2);
        assert_eq!(h.check("prepare", &other, 1000), Verdict::Allow);
        // The same grant again, now for boot-2: the lease file is rewritten (not just the
        // renewal file) and counts again.
        std::fs::write(&h.boot, "boot-2\n").unwrap();
        let new_boot = |exp: i64, issued: i64| LeaseFile {
            boot_id: "boot-2".into(),
            expires_unix_ms: exp,
            issued_unix_ms: issued,
            epoch: 0,
            ..lease("h", 1, 0)
        };
        apply(s, "h", &[new_boot(9000, 20)], false, 20, 0).unwrap();
        assert_eq!(read_file(s, U).unwrap().unwrap().boot_id, "boot-2", "rewritten, not a renewal");
        assert_eq!(h.check("prepare", &xml(None), 7000), Verdict::Allow);
        // A renewal from the old boot does not extend a lease of the new one.
        let r = Renewal {
            host: "h".into(),
            issued_unix_ms: 30,
            epoch: 0,
            expires_unix_ms: 99_000,
            leases: [(U.to_string(), 1)].into(),
            boot_id: "boot-1".into(),
        };
        std::fs::write(renewal_path(s), serde_json::to_vec(&r).unwrap()).unwrap();
        assert_eq!(read(s, U).unwrap().expires_unix_ms, 9000);
        // Lease files from before boot binding carry no boot id: never valid.
        let mut old: serde_json::Value = serde_json::from_slice(&std::fs::read(path(s, U)).unwrap()).unwrap();
        old.as_object_mut().unwrap().remove("boot_id");
        std::fs::write(path(s, U), old.to_string()).unwrap();
        let m = h.refused("prepare", &xml(None), 1000);
        assert!(m.contains("no boot id recorded"), "{m}");
    }

    #[test]
    fn generations_only_move_forward() {
        let h = Host::new();
        let s = h.s();
        let at = |uuid: &str, gen_: u64, issued: i64| LeaseFile {
            uuid: uuid.into(),
            issued_unix_ms: issued,
            epoch: 0,
            ..lease("h", gen_, 50_000)
        };
        let a = apply(s, "h", &[at(U, 3, 10), at(U2, 1, 10)], false, 10, 0).unwrap();
        assert_eq!(a.fresh, vec![U.to_string(), U2.to_string()]);
        // A later grant with a lower generation for U: refused and reported; U2 still applies.
        let a = apply(s, "h", &[at(U, 2, 20), at(U2, 2, 20)], false, 20, 0).unwrap();
        assert_eq!(a.stale_generation, vec![U.to_string()]);
        assert!(a.fresh.is_empty() && a.unreadable.is_empty());
        assert_eq!(read_file(s, U).unwrap().unwrap().generation, 3, "not written");
        assert_eq!(read_file(s, U2).unwrap().unwrap().generation, 2);
        // Still refused after a revocation (the file keeps its generation).
        apply(s, "h", &[at(U2, 2, 30)], false, 30, 0).unwrap();
        assert_eq!(read_file(s, U).unwrap().unwrap().expires_unix_ms, 0);
        let a = apply(s, "h", &[at(U, 1, 40)], true, 40, 0).unwrap();
        assert_eq!(a.stale_generation, vec![U.to_string()]);
        // The same or a higher generation is fine.
        let a = apply(s, "h", &[at(U, 3, 50)], true, 50, 0).unwrap();
        assert!(a.stale_generation.is_empty());
        assert_eq!(read_file(s, U).unwrap().unwrap().expires_unix_ms, 50_000);
        // A lease file that cannot be read: that lease is not written, the others are.
        std::fs::write(path(s, U), "garbage").unwrap();
        let a = apply(s, "h", &[at(U, 4, 60), at(U2, 2, 60)], true, 60, 0).unwrap();
        assert_eq!(a.unreadable, vec![U.to_string()]);
        assert_eq!(std::fs::read_to_string(path(s, U)).unwrap(), "garbage");
    }

    #[test]
    fn durable_writes_sync_the_directory_and_say_which_one_failed() {
        let h = Host::new();
        let p = dir(h.s()).join("x.lease");
        std::fs::create_dir_all(dir(h.s())).unwrap();
        write_atomic(&p, b"{}", true).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"{}");
        assert!(!p.with_extension("tmp").exists());
        // The directory sync is a real open + fsync: a missing directory is an error naming it.
        let gone = h.s().join("nowhere");
        let e = sync_dir(&gone).unwrap_err().to_string();
        assert!(e.contains("nowhere"), "{e}");
        let e = write_atomic(&gone.join("y.lease"), b"{}", true).unwrap_err().to_string();
        assert!(e.contains("y.tmp"), "{e}");
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
        assert!(!is_extension(&l, &LeaseFile { boot_id: "boot-2".into(), ..lease("h", 1, 9000) }), "a new boot");
    }

    #[test]
    fn renewals_go_to_the_renewal_file_and_never_outlive_a_revocation() {
        let h = Host::new();
        let s = h.s();
        let at = |exp: i64, issued: i64, gen_: u64| LeaseFile {
            expires_unix_ms: exp,
            issued_unix_ms: issued,
            epoch: 0,
            ..lease("h", gen_, 0)
        };
        apply(s, "h", &[at(5000, 10, 1)], false, 10, 0).unwrap();
        apply(s, "h", &[at(9000, 20, 1)], false, 20, 0).unwrap();
        assert_eq!(
            read_file(s, U).unwrap().unwrap().expires_unix_ms,
            5000,
            "the lease file is not rewritten for a renewal"
        );
        assert_eq!(read(s, U).unwrap().expires_unix_ms, 9000, "the renewal counts");
        assert_eq!(h.check("prepare", &xml(None), 7000), Verdict::Allow);
        // a stale (older) renewal does not shorten or override
        apply(s, "h", &[at(8000, 15, 1)], false, 15, 0).unwrap();
        assert_eq!(read(s, U).unwrap().expires_unix_ms, 9000);
        // a new generation is written to the lease file
        apply(s, "h", &[at(12000, 30, 2)], false, 30, 0).unwrap();
        assert_eq!(read_file(s, U).unwrap().unwrap(), at(12000, 30, 2));
        apply(s, "h", &[at(15000, 40, 2)], false, 40, 0).unwrap();
        assert_eq!(read(s, U).unwrap().expires_unix_ms, 15000);
        // revoked: the renewal file that still lists it no longer counts
        apply(s, "h", &[], false, 50, 0).unwrap();
        assert_eq!(read(s, U).unwrap().expires_unix_ms, 0);
        let m = h.refused("prepare", &xml(None), 7000);
        assert!(m.contains("revoked"), "{m}");
        // granted again after the revocation: written to the lease file
        apply(s, "h", &[at(20000, 60, 2)], false, 60, 0).unwrap();
        assert_eq!(read_file(s, U).unwrap().unwrap(), at(20000, 60, 2));
        // a lost or corrupt renewal file only makes leases end sooner
        apply(s, "h", &[at(25000, 70, 2)], false, 70, 0).unwrap();
        std::fs::write(renewal_path(s), "garbage").unwrap();
        assert_eq!(read(s, U).unwrap().expires_unix_ms, 20000);
        // merge grants renew in the lease file and leave the renewal file alone
        apply(s, "h", &[at(30000, 80, 2)], true, 80, 0).unwrap();
        assert_eq!(read_file(s, U).unwrap().unwrap().expires_unix_ms, 30000);
    }

    #[test]
    fn a_newer_leaders_decision_wins_whatever_the_clocks_said() {
        let h = Host::new();
        let s = h.s();
        let at = |exp: i64, issued: i64, epoch: u64| LeaseFile {
            expires_unix_ms: exp,
            issued_unix_ms: issued,
            epoch,
            ..lease("h", 1, 0)
        };
        // The old leader (epoch 5) ran with its clock far ahead.
        apply(s, "h", &[at(1_000_000, 900_000, 5)], false, 900_000, 5).unwrap();
        apply(s, "h", &[at(1_100_000, 950_000, 5)], false, 950_000, 5).unwrap();
        assert_eq!(read(s, U).unwrap().expires_unix_ms, 1_100_000);
        // The new leader (epoch 6, clock behind) revokes: the revocation stands.
        let a = apply(s, "h", &[], false, 10_000, 6).unwrap();
        assert!(a.superseded.is_empty(), "{a:?}");
        assert_eq!(read(s, U).unwrap().expires_unix_ms, 0, "revoked by the newer leader");
        assert!(h.refused("prepare", &xml(None), 5_000).contains("revoked"));
        // A late grant of the old leader (later wall clock) changes nothing and says so.
        let a = apply(s, "h", &[at(2_000_000, 990_000, 5)], false, 990_000, 5).unwrap();
        assert_eq!(a.superseded, vec![U.to_string()]);
        assert_eq!(read(s, U).unwrap().expires_unix_ms, 0, "still revoked");
        // The new leader's own grants and renewals apply with its lower clock.
        apply(s, "h", &[at(40_000, 20_000, 6)], false, 20_000, 6).unwrap();
        apply(s, "h", &[at(50_000, 30_000, 6)], false, 30_000, 6).unwrap();
        assert_eq!(read(s, U).unwrap().expires_unix_ms, 50_000);
        assert_eq!(h.check("prepare", &xml(None), 45_000), Verdict::Allow);
        // The old leader's revocation of it is superseded, not applied.
        let a = apply(s, "h", &[], false, 999_000, 5).unwrap();
        assert_eq!(a.superseded, vec![U.to_string()]);
        assert_eq!(h.check("prepare", &xml(None), 45_000), Verdict::Allow);
    }
}
