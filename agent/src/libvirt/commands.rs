//! The controller's commands, carried out on the actor thread. Each is
//! check-then-act: it first looks whether its effect is already there, so
//! a repeated command (after a controller crash) does nothing twice.

use lifeboat_proto::holds_disk;
use lifeboat_proto::v1::{
    CheckPaths, CleanupGuest, Command, CommandResult, DefineGuest, GrantLeases, Guest, GuestState, PathCheck,
    StartGuest, StopGuest, command::Kind,
};
use tracing::info;
use virt::domain::Domain;
use virt::sys;

use super::{ActorState, is_no_domain, read_guest};
use crate::domxml::{self, OWNER_NS};

fn fail(id: &str, error: String) -> CommandResult {
    CommandResult { id: id.to_string(), ok: false, error, ..Default::default() }
}

/// Which paths this host can see, and on which storage (see
/// [`crate::storage`]). Only absolute paths are checked; other sources
/// (network disks) are reported as not checkable.
pub fn check_paths(cmd: &CheckPaths) -> Vec<PathCheck> {
    crate::storage::check_paths(&cmd.paths)
}

impl ActorState {
    /// Carries out a command and answers on `reply`. A guest start (qemu
    /// boot, the slow part) runs on a short-lived worker thread with a clone
    /// of the connection, so several guests start at once; everything else
    /// runs here, in order.
    pub(super) fn command(&mut self, cmd: Command, reply: tokio::sync::oneshot::Sender<CommandResult>) {
        if let Some(Kind::StartGuest(s)) = &cmd.kind
            && let Some(c) = &self.conn
        {
            let conn = c.conn.clone();
            let (id, s) = (cmd.id.clone(), s.clone());
            let spawned = std::thread::Builder::new().name("libvirt-start".into()).spawn(move || {
                let t = std::time::Instant::now();
                let r = start_guest(&conn, &id, s);
                crate::metrics::get().command("start_guest", r.ok, t.elapsed().as_secs_f64());
                let _ = reply.send(r);
            });
            if let Err(e) = spawned {
                tracing::warn!("cannot spawn a start worker: {e}");
            }
            return;
        }
        let kind = match &cmd.kind {
            Some(Kind::CheckPaths(_)) => "check_paths",
            Some(Kind::DefineGuest(_)) => "define_guest",
            Some(Kind::StartGuest(_)) => "start_guest",
            Some(Kind::GrantLeases(_)) => "grant_leases",
            Some(Kind::StopGuest(_)) => "stop_guest",
            Some(Kind::CleanupGuest(_)) => "cleanup_guest",
            None => "none",
        };
        let t = std::time::Instant::now();
        let r = self.command_inline(cmd);
        crate::metrics::get().command(kind, r.ok, t.elapsed().as_secs_f64());
        let _ = reply.send(r);
    }

    fn command_inline(&mut self, cmd: Command) -> CommandResult {
        let id = cmd.id.clone();
        let Some(kind) = cmd.kind else { return fail(&id, "command without a kind".into()) };
        if let Kind::CheckPaths(c) = &kind {
            return CommandResult { id, ok: true, outcome: "done".into(), paths: check_paths(c), ..Default::default() };
        }
        if let Kind::GrantLeases(g) = &kind {
            return self.grant_leases(&id, g, cmd.epoch);
        }
        if self.conn.is_none() {
            return fail(&id, format!("libvirt is not connected: {}", self.host.libvirt_error));
        }
        let r = match kind {
            Kind::DefineGuest(d) => self.define(&id, d),
            Kind::StartGuest(s) => start_guest(&self.conn.as_ref().expect("checked").conn, &id, s),
            Kind::StopGuest(s) => self.stop(&id, s),
            Kind::CleanupGuest(c) => self.cleanup(&id, c),
            Kind::CheckPaths(_) | Kind::GrantLeases(_) => unreachable!("handled above"),
        };
        if let Some(g) = &r.guest {
            self.known.insert(g.uuid.clone(), g.clone());
            self.emit(super::Update::Changed(g.clone()));
        }
        r
    }

    fn define(&mut self, id: &str, d: DefineGuest) -> CommandResult {
        let facts = match domxml::parse(&d.definition_xml) {
            Ok(f) => f,
            Err(e) => return fail(id, format!("definition refused: {e}")),
        };
        if d.owner_host.is_empty() || d.generation == 0 {
            return fail(id, "define needs an owner host and a generation".into());
        }
        // Generations only move forward: this host's lease file (kept after a
        // revocation) remembers the highest it was granted.
        match crate::lease::read_file(&self.cfg.state_dir, &facts.uuid) {
            Ok(Some(l)) if l.generation > d.generation => {
                return fail(
                    id,
                    format!(
                        "define of {} ({}) at generation {} refused: this host's lease file records generation {}, and ownership generations only move forward",
                        facts.name, facts.uuid, d.generation, l.generation
                    ),
                );
            }
            Ok(_) => {}
            Err(e) => {
                return fail(
                    id,
                    format!("define of {} refused: its lease file cannot be read ({e}); failing closed", facts.uuid),
                );
            }
        }
        let conn = &self.conn.as_ref().expect("checked").conn;
        // Check: is it already here?
        match conn.lookup_domain_by_uuid_string(&facts.uuid) {
            Ok(dom) => {
                let g = match read_guest(&dom) {
                    Ok(g) => g,
                    Err(e) => return fail(id, format!("guest {} exists but cannot be read: {e}", facts.uuid)),
                };
                if g.owner_host == d.owner_host && g.owner_generation == d.generation {
                    return CommandResult {
                        id: id.into(),
                        ok: true,
                        outcome: "already".into(),
                        guest: Some(g),
                        ..Default::default()
                    };
                }
                if g.owner_generation > d.generation {
                    return fail(
                        id,
                        format!(
                            "define of {} ({}) at generation {} refused: the definition on this host records generation {} (owner '{}'), and ownership generations only move forward",
                            facts.name, facts.uuid, d.generation, g.owner_generation, g.owner_host
                        ),
                    );
                }
                return fail(
                    id,
                    format!(
                        "a guest with UUID {} is already defined on this host (name '{}', owner '{}' generation {}); refusing to overwrite it",
                        facts.uuid, g.name, g.owner_host, g.owner_generation
                    ),
                );
            }
            Err(e) if is_no_domain(&e) => {}
            Err(e) => return fail(id, format!("looking up {} failed: {}", facts.uuid, e.message())),
        }
        if let Ok(other) = conn.lookup_domain_by_name(&facts.name) {
            let uuid = other.uuid_string().unwrap_or_default();
            return fail(
                id,
                format!("another guest named '{}' (UUID {uuid}) is already defined on this host", facts.name),
            );
        }
        // Act.
        let dom = match conn.define_domain_xml(&d.definition_xml) {
            Ok(dom) => dom,
            Err(e) => return fail(id, format!("libvirt refused the definition: {}", e.message())),
        };
        let mut problems = Vec::new();
        if let Err(e) = dom.set_autostart(false) {
            problems.push(format!("disabling autostart failed: {}", e.message()));
        }
        let md = format!("<owner host='{}' generation='{}'/>", xml_escape(&d.owner_host), d.generation);
        if let Err(e) = dom.set_metadata(
            sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
            Some(&md),
            Some("lifeboat"),
            Some(OWNER_NS),
            sys::VIR_DOMAIN_AFFECT_CONFIG,
        ) {
            problems.push(format!("writing ownership metadata failed: {}", e.message()));
        }
        let g = read_guest(&dom).ok();
        if !problems.is_empty() {
            // Defined but not as required: undefine again so nothing half-done stays.
            let _ = dom.undefine();
            return fail(id, problems.join("; "));
        }
        info!(uuid = %facts.uuid, name = %facts.name, owner = %d.owner_host, generation = d.generation, "guest defined");
        CommandResult { id: id.into(), ok: true, outcome: "done".into(), guest: g, ..Default::default() }
    }
}

impl ActorState {
    /// Writes the granted leases, then makes sure libvirt autostart is off
    /// on every leased guest (Lifeboat decides what starts).
    fn grant_leases(&mut self, id: &str, g: &GrantLeases, epoch: u64) -> CommandResult {
        // Leases are bound to this boot. Without a boot id they are still
        // written (revocations must apply), bound to no boot: the guard
        // refuses them, and the command reports the failure.
        let boot = crate::lease::current_boot_id(&self.cfg.boot_id_file);
        let boot_id = boot.as_ref().map(String::clone).unwrap_or_default();
        let files: Vec<crate::lease::LeaseFile> = g
            .leases
            .iter()
            .map(|l| crate::lease::LeaseFile {
                uuid: l.uuid.clone(),
                name: l.name.clone(),
                host: self.cfg.host_id.clone(),
                generation: l.generation,
                expires_unix_ms: g.expires_unix_ms,
                issued_unix_ms: g.issued_unix_ms,
                epoch,
                boot_id: boot_id.clone(),
            })
            .collect();
        let applied =
            match crate::lease::apply(&self.cfg.state_dir, &self.cfg.host_id, &files, g.merge, g.issued_unix_ms, epoch)
            {
                Ok(a) => a,
                Err(e) => return fail(id, format!("writing leases to {} failed: {e}", self.cfg.state_dir.display())),
            };
        if !applied.superseded.is_empty() {
            // The controller must not take "revoked" for done (a move would
            // go on while this host may still start the guest).
            return CommandResult {
                id: id.into(),
                ok: false,
                error: format!(
                    "a newer decision (a later leader's, or a later one of this leader's) stands over this grant for {}: \
                     not applied to them",
                    applied.superseded.join(", ")
                ),
                stale_generation: applied.stale_generation,
                lease_unreadable: applied.unreadable,
                ..Default::default()
            };
        }
        if let Err(e) = boot {
            return CommandResult {
                id: id.into(),
                ok: false,
                error: format!(
                    "leases written but bound to no boot, so the start guard refuses them: cannot read this host's boot id ({e})"
                ),
                stale_generation: applied.stale_generation,
                lease_unreadable: applied.unreadable,
                ..Default::default()
            };
        }
        let fresh = applied.fresh;
        let mut changed = Vec::new();
        let mut disabled = Vec::new();
        if let Some(c) = &self.conn {
            // Lifeboat, not libvirt, decides what starts: keep libvirt autostart
            // off on every leased guest. The cache is kept current by the
            // autostart-link watcher, so a renewal costs no libvirt calls
            // unless a guest's autostart is on.
            for l in g.leases.iter().filter(|l| self.known.get(&l.uuid).is_some_and(|x| x.autostart)) {
                let Ok(dom) = c.conn.lookup_domain_by_uuid_string(&l.uuid) else { continue };
                match dom.set_autostart(false) {
                    Ok(_) => {
                        info!(
                            uuid = %l.uuid,
                            name = %l.name,
                            first = fresh.contains(&l.uuid),
                            "libvirt autostart disabled: Lifeboat starts this guest"
                        );
                        disabled.push(l.uuid.clone());
                    }
                    Err(e) => tracing::warn!(uuid = %l.uuid, "disabling autostart failed: {}", e.message()),
                }
                if let Ok(g) = read_guest(&dom) {
                    changed.push(g);
                }
            }
        }
        for g in changed {
            self.known.insert(g.uuid.clone(), g.clone());
            self.emit(super::Update::Changed(g));
        }
        CommandResult {
            id: id.into(),
            ok: true,
            outcome: "done".into(),
            autostart_disabled: disabled,
            stale_generation: applied.stale_generation,
            lease_unreadable: applied.unreadable,
            ..Default::default()
        }
    }

    fn stop(&mut self, id: &str, s: StopGuest) -> CommandResult {
        let conn = &self.conn.as_ref().expect("checked").conn;
        let dom = match conn.lookup_domain_by_uuid_string(&s.uuid) {
            Ok(d) => d,
            Err(e) if is_no_domain(&e) => {
                return CommandResult { id: id.into(), ok: true, outcome: "already".into(), ..Default::default() };
            }
            Err(e) => return fail(id, format!("looking up {} failed: {}", s.uuid, e.message())),
        };
        // Anything but shut off may hold a qemu process and the disks
        // (paused, pm-suspended, crashed, shutting down, ...): destroy it. A
        // state that cannot be read is destroyed too.
        match read_guest(&dom) {
            Ok(g) if !holds_disk(g.state) => {
                return CommandResult {
                    id: id.into(),
                    ok: true,
                    outcome: "already".into(),
                    guest: Some(g),
                    ..Default::default()
                };
            }
            Err(e) if is_no_domain(&e) => {
                return CommandResult { id: id.into(), ok: true, outcome: "already".into(), ..Default::default() };
            }
            _ => {}
        }
        match destroy_and_confirm(&dom, &s.uuid) {
            Ok(g) => {
                tracing::warn!(uuid = %s.uuid, reason = %s.reason, "guest destroyed on the controller's order");
                CommandResult { id: id.into(), ok: true, outcome: "done".into(), guest: g, ..Default::default() }
            }
            Err(m) => fail(id, m),
        }
    }

    fn cleanup(&mut self, id: &str, c: CleanupGuest) -> CommandResult {
        let conn = &self.conn.as_ref().expect("checked").conn;
        let dom = match conn.lookup_domain_by_uuid_string(&c.uuid) {
            Ok(d) => d,
            Err(e) if is_no_domain(&e) => {
                return CommandResult { id: id.into(), ok: true, outcome: "already".into(), ..Default::default() };
            }
            Err(e) => return fail(id, format!("looking up {} failed: {}", c.uuid, e.message())),
        };
        let g = match read_guest(&dom) {
            Ok(g) => g,
            Err(e) => return fail(id, format!("reading {} failed: {}", c.uuid, e.message())),
        };
        if g.name != c.name {
            return fail(
                id,
                format!("guest {} is named '{}' here, not '{}'; refusing to remove it", c.uuid, g.name, c.name),
            );
        }
        if holds_disk(g.state) {
            if !c.destroy_running {
                return fail(
                    id,
                    format!(
                        "'{}' ({}) is {} on this host (it may hold its disks); refusing to remove it. Stop it first, or clean up with --destroy-running",
                        g.name,
                        g.uuid,
                        state_name(&g)
                    ),
                );
            }
            if let Err(m) = destroy_and_confirm(&dom, &g.name) {
                return fail(id, m);
            }
            tracing::warn!(uuid = %g.uuid, name = %g.name, was = %state_name(&g), "stale copy destroyed for cleanup (--destroy-running)");
        }
        let _ = dom.set_autostart(false);
        if g.managed_save
            && let Err(e) = dom.managed_save_remove(0)
        {
            return fail(id, format!("removing the managed-save image of '{}' failed: {}", g.name, e.message()));
        }
        if let Err(e) = dom.undefine_flags(CLEANUP_UNDEFINE) {
            // Drivers without NVRAM/checkpoint support (libvirt's test driver)
            // reject those flags. Without any NVRAM flag libvirt refuses to
            // undefine a guest that has NVRAM (and without the checkpoint flag
            // one that has checkpoints), so this retry never removes NVRAM and
            // cannot leave anything half-removed.
            if !e.message().contains("unsupported flags") || dom.undefine_flags(CLEANUP_UNDEFINE_BASIC).is_err() {
                return fail(id, format!("undefining '{}' failed: {}", g.name, e.message()));
            }
        }
        info!(uuid = %g.uuid, name = %g.name, "stale definition removed (storage and NVRAM untouched)");
        self.known.remove(&g.uuid);
        self.emit(super::Update::Removed { uuid: g.uuid.clone(), name: g.name.clone() });
        CommandResult { id: id.into(), ok: true, outcome: "done".into(), ..Default::default() }
    }
}

/// How cleanup undefines: with managed save, snapshot and checkpoint
/// metadata, KEEPING the NVRAM file: the moved guest runs elsewhere,
/// possibly from this very file on shared storage.
const CLEANUP_UNDEFINE: sys::virDomainUndefineFlagsValues = sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    | sys::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
    | sys::VIR_DOMAIN_UNDEFINE_KEEP_NVRAM;

/// The fallback for drivers that reject those flags: no NVRAM flag at all
/// (then libvirt refuses a guest that has NVRAM rather than removing it).
const CLEANUP_UNDEFINE_BASIC: sys::virDomainUndefineFlagsValues =
    sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA;

/// A guest's state as the operator sees it (`PMSUSPENDED (unknown)`).
fn state_name(g: &Guest) -> String {
    // The one state-name mapping, in capitals as these messages always showed it; a number Lifeboat
    // cannot name is shown as the number, which says more to the operator than "UNKNOWN".
    let st = match GuestState::try_from(g.state) {
        Ok(s) => lifeboat_proto::state_name(s as i32).to_ascii_uppercase(),
        Err(_) => format!("state {}", g.state),
    };
    if g.state_reason.is_empty() { st } else { format!("{st} ({})", g.state_reason) }
}

/// Destroys a guest and confirms it reads shut off afterwards (or is gone:
/// a transient guest disappears when destroyed). `Ok` carries the guest as
/// it is now; `Err` says what failed and in which state the guest is.
fn destroy_and_confirm(dom: &Domain, what: &str) -> Result<Option<Guest>, String> {
    let destroyed = dom.destroy();
    let after = match read_guest(dom) {
        Ok(g) => g,
        Err(e) if is_no_domain(&e) => return Ok(None),
        Err(e) => {
            let why = destroyed.err().map(|d| format!("destroying failed ({}); ", d.message())).unwrap_or_default();
            return Err(format!("{why}reading the state of {what} after destroying it failed: {}", e.message()));
        }
    };
    if !holds_disk(after.state) {
        // Destroyed, or it went off by itself while being destroyed.
        return Ok(Some(after));
    }
    match destroyed {
        Err(e) => Err(format!("destroying {what} failed: {}; it is {}", e.message(), state_name(&after))),
        Ok(()) => Err(format!("{what} was destroyed but still reads {}, not SHUTOFF", state_name(&after))),
    }
}

/// Starts a guest (check-then-act: a running guest is "already"), then
/// verifies it runs. Safe on any thread: libvirt connections are.
fn start_guest(conn: &virt::connect::Connect, id: &str, s: StartGuest) -> CommandResult {
    let dom = match conn.lookup_domain_by_uuid_string(&s.uuid) {
        Ok(d) => d,
        Err(e) => return fail(id, format!("guest {} not found on this host: {}", s.uuid, e.message())),
    };
    let before = match read_guest(&dom) {
        Ok(g) => g,
        Err(e) => return fail(id, format!("reading guest {} failed: {}", s.uuid, e.message())),
    };
    if before.state == GuestState::Running as i32 {
        return CommandResult {
            id: id.into(),
            ok: true,
            outcome: "already".into(),
            guest: Some(before),
            ..Default::default()
        };
    }
    if let Err(e) = dom.create() {
        return fail(id, format!("starting {} failed: {}", before.name, e.message()));
    }
    match read_guest(&dom) {
        Ok(g) if g.state == GuestState::Running as i32 => {
            info!(uuid = %s.uuid, name = %g.name, "guest started");
            CommandResult { id: id.into(), ok: true, outcome: "done".into(), guest: Some(g), ..Default::default() }
        }
        Ok(g) => fail(id, format!("{} was started but is {} ({})", g.name, g.state, g.state_reason)),
        Err(e) => fail(id, format!("verifying {} failed: {}", before.name, e.message())),
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('\'', "&apos;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleanup_never_asks_libvirt_to_remove_nvram() {
        assert_eq!(CLEANUP_UNDEFINE & sys::VIR_DOMAIN_UNDEFINE_NVRAM, 0);
        assert_ne!(CLEANUP_UNDEFINE & sys::VIR_DOMAIN_UNDEFINE_KEEP_NVRAM, 0);
        assert_eq!(CLEANUP_UNDEFINE_BASIC & (sys::VIR_DOMAIN_UNDEFINE_NVRAM | sys::VIR_DOMAIN_UNDEFINE_KEEP_NVRAM), 0);
    }

    #[test]
    fn states_are_named_as_operators_read_them() {
        let g = Guest { state: GuestState::Pmsuspended as i32, state_reason: "unknown".into(), ..Default::default() };
        assert_eq!(state_name(&g), "PMSUSPENDED (unknown)");
        assert_eq!(state_name(&Guest { state: 42, ..Default::default() }), "state 42");
    }
}
