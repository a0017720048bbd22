//! Guests missing on their owner. A managed guest that disappears from the
//! host that owns it without Lifeboat causing it (an operator's `virsh
//! undefine`, a host reinstalled and back without it) is kept with its last
//! definition, marked missing, audited (`guest.missing`) and alarmed
//! (`guest-missing`), until it is defined there again, `lifeboat vms
//! restore` defines it, or an operator forgets it (`lifeboat vms forget`).
//! Nothing here deletes a managed guest's definition on its own.
#![warn(clippy::arithmetic_side_effects)]

use super::{Inner, Registry};
use crate::domain::host::Liveness;
use crate::error::ControllerError;
use crate::ports::{AuditRow, MissingRow, OwnerRow, RepoResult};
use lifeboat_proto::v1::GuestRecord;

/// The `guest-missing` alarm's text: the same from the guest's name, UUID
/// and host alone, so that it can be cleared by its cause.
pub fn missing_detail(name: &str, uuid: &str, host: &str) -> String {
    format!(
        "{name} ({uuid}) disappeared from {host} outside Lifeboat (undefined by hand, or {host} came back without it), \
         and no other host has it; Lifeboat kept its last definition: `lifeboat vms restore {uuid} --reason ...` defines \
         it on its owner again (`--to HOST` elsewhere, `--start` to run it); if it was removed on purpose, `lifeboat vms \
         forget {uuid} --reason ...`"
    )
}

impl Registry {
    /// The host Lifeboat holds as a guest's owner: its ownership record,
    /// else the host that first reported it (desired-state row).
    /// An ownership record that was never finished counts only while its
    /// job runs: a move whose define failed leaves the target recorded while
    /// the source holds the only copy.
    pub(super) fn owner_host_of<'a>(inner: &'a Inner, uuid: &str) -> Option<&'a str> {
        Self::settled_owner(inner, uuid)
            .map(|o| o.host.as_str())
            .or_else(|| inner.desired.get(uuid).map(|d| d.0.as_str()))
    }

    /// The ownership record of `uuid` if it can be relied on: complete, or
    /// belonging to a job that is still acting on the guest.
    fn settled_owner<'a>(inner: &'a Inner, uuid: &str) -> Option<&'a OwnerRow> {
        inner.owners.get(uuid).filter(|o| o.complete || inner.in_job.contains_key(uuid))
    }

    /// Whether `uuid`, gone from `host`'s report, is kept as missing rather
    /// than deleted: a managed guest that `host` reported, that no job acts
    /// on (a job's move row holds the definition it moves, and its source's
    /// undefine is Lifeboat's own), that Lifeboat's records do not place on
    /// another host (then `host` held a stale copy, which cleanup removes),
    /// and of which no other host holds a live copy (running, or not a
    /// stale copy): the last copy of its definition.
    pub(super) fn keeps_when_gone(inner: &Inner, host: &str, uuid: &str) -> bool {
        if inner.in_job.contains_key(uuid) || !inner.guests.get(host).is_some_and(|m| m.contains_key(uuid)) {
            return false;
        }
        if Self::owner_host_of(inner, uuid).is_none() || Self::stale_on(inner, uuid, host) {
            return false;
        }
        !inner.guests.iter().any(|(h, m)| {
            h != host
                && m.get(uuid).is_some_and(|g| lifeboat_proto::holds_disk(g.state) || !Self::stale_on(inner, uuid, h))
        })
    }

    /// Whether a copy of `uuid` on `host` is stale by Lifeboat's records:
    /// its ownership record names another host and is complete (or its job
    /// still runs). An unfinished record of an ended job proves nothing.
    fn stale_on(inner: &Inner, uuid: &str, host: &str) -> bool {
        Self::settled_owner(inner, uuid).is_some_and(|o| o.host != host)
    }

    /// Keeps the guests `uuids` gone from `host` as missing: their stored row
    /// moves to the missing table with an audit entry, and an alarm is raised.
    pub(super) fn mark_gone(inner: &mut Inner, host: &str, uuids: &[String], now: i64, how: &str) -> RepoResult<()> {
        if uuids.is_empty() {
            return Ok(());
        }
        for uuid in uuids {
            let name = inner.guests.get(host).and_then(|m| m.get(uuid)).map(|g| g.name.to_string()).unwrap_or_default();
            let a = AuditRow::by_controller(
                "guest.missing",
                host,
                &name,
                format!(
                    "{name} ({uuid}) {how} on {host} outside Lifeboat, and no other host has it: kept with its last \
                     definition, marked missing (`lifeboat vms restore` or `lifeboat vms forget`)"
                ),
            );
            let (h, u) = (host.to_string(), uuid.clone());
            if inner.db(move |r| r.ownership().mark_missing(&h, &u, now, &a))? {
                tracing::warn!(host, guest = %name, %uuid, "managed guest missing on its owner; its definition is kept");
                Self::raise_locked(inner, host, "guest-missing", &missing_detail(&name, uuid, host))?;
            }
        }
        inner.missing = inner.db(|r| r.ownership().missing())?.into_iter().map(|r| (r.guest.uuid.clone(), r)).collect();
        Ok(())
    }

    /// `host` reports `uuid` again: a missing guest defined again on its
    /// owner, running anywhere (a hand migration reported late), or defined
    /// by hand on another host (a hand cold move) is no longer missing; its
    /// mark and alarm are cleared, audited. Only a copy Lifeboat's records
    /// call stale (a move's source, which cleanup removes) does not count.
    pub(super) fn note_back(inner: &mut Inner, host: &str, uuid: &str, name: &str, state: i32) -> RepoResult<()> {
        let Some(r) = inner.missing.get(uuid) else { return Ok(()) };
        if Self::stale_on(inner, uuid, host) && !lifeboat_proto::holds_disk(state) {
            return Ok(());
        }
        let (was_on, was_name) = (r.host.clone(), r.guest.name.clone());
        let a = AuditRow::by_controller(
            "guest.reappeared",
            host,
            name,
            format!("{name} ({uuid}), missing on {was_on}, is defined on {host} again: missing mark cleared"),
        );
        let u = uuid.to_string();
        inner.db(move |r| r.ownership().clear_missing(&u, false, &a))?;
        inner.missing.remove(uuid);
        let why = format!("{name} is defined on {host} again");
        Self::clear_by_cause_locked(inner, &was_on, "guest-missing", &missing_detail(&was_name, uuid, &was_on), &why)
    }

    /// The missing guests of `host` a listing shows (named `vm` if given,
    /// after the page cursor).
    pub(super) fn missing_rows_of<'a>(
        inner: &'a Inner,
        host: &str,
        vm: Option<&str>,
        past: &dyn Fn(&str, &str, &str) -> bool,
    ) -> Vec<&'a MissingRow> {
        inner
            .missing
            .values()
            .filter(|r| r.host == host)
            .filter(|r| vm.is_none_or(|vm| r.guest.name == vm || r.guest.uuid == vm))
            .filter(|r| past(host, &r.guest.name, &r.guest.uuid))
            .collect()
    }

    /// A missing guest as listed.
    pub(super) fn missing_record(inner: &Inner, r: &MissingRow, live: Liveness, with_definitions: bool) -> GuestRecord {
        let mut guest = r.guest.clone();
        if !with_definitions {
            guest.definition_xml = String::new();
        }
        let owner = Self::owner_host_of(inner, &r.guest.uuid).unwrap_or(&r.host).to_string();
        let desired = match inner.desired.get(&r.guest.uuid) {
            Some((h, st)) if *h == owner => st.clone(),
            _ => String::new(),
        };
        GuestRecord {
            guest: Some(guest),
            host_id: r.host.clone(),
            updated_unix_ms: r.since_ms,
            host_liveness: live.as_str().into(),
            desired_state: desired,
            owner_host: owner,
            missing: true,
            missing_since_unix_ms: r.since_ms,
            ..Default::default()
        }
    }

    /// The missing guest named `vm` (name or UUID). Refuses a guest that is
    /// not missing (naming where it is defined), an unknown one, and a name
    /// several missing guests share. `what` names the operation.
    pub fn find_missing(&self, vm: &str, what: &str) -> Result<MissingRow, ControllerError> {
        let inner = self.lock();
        let found: Vec<&MissingRow> =
            inner.missing.values().filter(|r| r.guest.name == vm || r.guest.uuid == vm).collect();
        match found.as_slice() {
            [one] => return Ok((*one).clone()),
            [] => {}
            many => {
                let uuids: Vec<&str> = many.iter().map(|r| r.guest.uuid.as_str()).collect();
                return Err(ControllerError::InvalidArgument(format!(
                    "{what}: several missing guests are named '{vm}' ({}); name one by its UUID",
                    uuids.join(", ")
                )));
            }
        }
        let on: Vec<String> = inner
            .guests
            .iter()
            .filter(|(_, m)| m.iter().any(|(u, g)| u == vm || &*g.name == vm))
            .map(|(h, _)| h.clone())
            .collect();
        if on.is_empty() {
            return Err(ControllerError::NotFound(format!(
                "{what}: unknown guest '{vm}': no host reports it and it is not missing (`lifeboat vms list`)"
            )));
        }
        Err(ControllerError::Refused(format!(
            "{what} refused; nothing was changed. Failed check:\n  - missing: '{vm}' is not missing, it is defined on {}\n    \
             what to do: nothing to restore; `lifeboat vms show {vm}` shows it",
            on.join(", ")
        )))
    }

    /// Hosts that report `uuid` now, with its state there.
    pub fn reported_on(&self, uuid: &str) -> Vec<(String, i32)> {
        let inner = self.lock();
        inner.guests.iter().filter_map(|(h, m)| m.get(uuid).map(|g| (h.clone(), g.state))).collect()
    }

    /// Whether a job acts on `uuid` now, and which.
    pub fn job_of(&self, uuid: &str) -> Option<String> {
        self.lock().in_job.get(uuid).map(|j| j.0.clone())
    }

    /// The ownership record of `uuid`, if any.
    pub fn owner_row(&self, uuid: &str) -> Option<OwnerRow> {
        self.lock().owners.get(uuid).cloned()
    }

    /// The owner a missing guest is restored on: its ownership record, else
    /// the host it went missing on.
    pub fn restore_owner(&self, r: &MissingRow) -> String {
        let inner = self.lock();
        Self::owner_host_of(&inner, &r.guest.uuid).unwrap_or(&r.host).to_string()
    }

    /// Records a missing guest's owner before it is defined there (desired
    /// state with it), audited; the in-memory view follows.
    ///
    /// Blocks on the store thread: for blocking threads and tests; async
    /// code calls [`Registry::record_restore_owner`].
    pub fn record_restore_owner_blocking(&self, o: &OwnerRow, desired: &str, audit: &AuditRow) -> RepoResult<()> {
        let mut inner = self.lock();
        let (row, d, a) = (o.clone(), desired.to_string(), audit.clone());
        inner.db(move |r| r.ownership().record_restore_owner(&row, &d, &a))?;
        inner.desired.insert(o.uuid.clone(), (o.host.clone(), desired.to_string()));
        drop(inner);
        self.refresh_owners_blocking()
    }

    /// The desired state recorded for `uuid`: (host, state).
    pub fn desired_of(&self, uuid: &str) -> Option<(String, String)> {
        self.lock().desired.get(uuid).cloned()
    }

    /// Drops a missing guest's record on an operator's word (its desired
    /// state too; its ownership record stays, so generations never go
    /// back), with `audit`, and clears its alarm. Refuses, changing nothing,
    /// when a host reports it again meanwhile.
    pub fn forget_missing(&self, uuid: &str, audit: &AuditRow) -> Result<MissingRow, ControllerError> {
        let mut inner = self.lock();
        let Some(r) = inner.missing.get(uuid).cloned() else {
            return Err(ControllerError::Refused(format!("forgetting {uuid} refused: it is no longer missing")));
        };
        let on: Vec<String> =
            inner.guests.iter().filter(|(_, m)| m.contains_key(uuid)).map(|(h, _)| h.clone()).collect();
        if !on.is_empty() {
            return Err(ControllerError::Refused(format!(
                "forgetting {} refused; nothing was changed. Failed check:\n  - defined-nowhere: it is defined on {}\n    \
                 what to do: it is not lost; undefine it there first if it must go",
                r.guest.name,
                on.join(", ")
            )));
        }
        let (u, a) = (uuid.to_string(), audit.clone());
        inner.db(move |r| r.ownership().clear_missing(&u, true, &a))?;
        inner.missing.remove(uuid);
        inner.desired.remove(uuid);
        let why = format!("{} forgotten by {}", r.guest.name, audit.actor);
        Self::clear_by_cause_locked(
            &mut inner,
            &r.host,
            "guest-missing",
            &missing_detail(&r.guest.name, uuid, &r.host),
            &why,
        )?;
        Ok(r)
    }

    /// Whether what `host` reports can be relied on now: its agent talks,
    /// sent a full inventory in this session, and no second agent claims it.
    pub fn reports_now(&self, host: &str) -> bool {
        Self::fresh(&self.lock(), host)
    }

    /// Marks `uuid` as acted on by `job` (a restore; `source` its owner,
    /// `target` where it is defined) unless a job acts on it already, which
    /// is returned: checked and marked under one lock.
    pub fn claim_for_restore(&self, uuid: &str, job: &str, source: &str, target: &str) -> Result<(), String> {
        let mut inner = self.lock();
        if let Some(j) = inner.in_job.get(uuid) {
            return Err(j.0.clone());
        }
        inner.in_job.insert(uuid.to_string(), (job.to_string(), source.to_string(), target.to_string()));
        for h in [source, target] {
            if let Some(e) = inner.hosts.get_mut(h) {
                e.dirty = true;
                inner.view_version.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// UUIDs of the guests missing now (tests, metrics).
    pub fn missing_uuids(&self) -> Vec<String> {
        self.lock().missing.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use crate::ports::{AuditFilter, OwnerRow};

    fn off(uuid: &str, name: &str) -> Guest {
        Guest {
            uuid: uuid.into(),
            name: name.into(),
            state: GuestState::Shutoff as i32,
            definition_xml: format!("<domain><name>{name}</name></domain>"),
            ..Default::default()
        }
    }

    fn inv(guests: Vec<Guest>) -> Inventory {
        Inventory { host: None, guests, more: false }
    }

    fn actions(reg: &Registry, action: &str) -> Vec<String> {
        let log = reg.repos().call_blocking(move |r| r.audit().read(&AuditFilter::default())).unwrap();
        log.into_iter().filter(|a| a.action == action).map(|a| a.vm).collect()
    }

    fn missing_alarms(reg: &Registry) -> Vec<String> {
        reg.active_alarms()
            .into_iter()
            .filter(|a| a.1 == "guest-missing")
            .map(|a| format!("{}: {}", a.0, a.2))
            .collect()
    }

    #[test]
    fn a_guest_gone_from_its_owner_is_kept_until_it_is_back_or_forgotten_and_other_removals_delete() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let reg = Registry::load(crate::store::sqlite::SqliteRepos::start(&path).unwrap(), Timing::default()).unwrap();
        let (tx, _rx) = mpsc::channel(8);
        let a = reg.open_session("a", "boot", tx.clone()).unwrap();
        let b = reg.open_session("b", "boot", tx.clone()).unwrap();
        reg.apply_inventory("a", a, inv(vec![off("u1", "vm1"), off("u2", "vm2"), off("u3", "vm3")])).unwrap();
        // b holds a stale copy of vm2 (first reported by a, which owns it).
        reg.apply_inventory("b", b, inv(vec![off("u2", "vm2")])).unwrap();
        reg.remove_guest("b", b, "u2").unwrap();
        assert!(reg.missing_uuids().is_empty(), "a copy on a host that is not the owner is deleted");
        // vm3 was moved to b by Lifeboat (owner recorded first); its undefine on a is Lifeboat's own.
        let o = OwnerRow {
            uuid: "u3".into(),
            host: "b".into(),
            generation: 1,
            from_host: "a".into(),
            job: "j".into(),
            complete: true,
        };
        reg.repos()
            .call_blocking(move |r| {
                r.ownership().set_owner(&o, &AuditRow::by_controller("t", "b", "vm3", String::new()))
            })
            .unwrap();
        reg.refresh_owners_blocking().unwrap();
        reg.remove_guest("a", a, "u3").unwrap();
        assert!(reg.missing_uuids().is_empty(), "the source of a move is not the owner");
        // An operator undefines vm1 on a, its owner: kept, audited, alarmed.
        reg.remove_guest("a", a, "u1").unwrap();
        assert_eq!(reg.missing_uuids(), ["u1"]);
        let l = reg.list_guests(Some("a"), Some("vm1"), true).unwrap();
        assert_eq!(l.len(), 1);
        assert!(l[0].missing && l[0].missing_since_unix_ms > 0);
        assert_eq!((l[0].host_id.as_str(), l[0].owner_host.as_str()), ("a", "a"));
        assert_eq!(l[0].guest.as_ref().unwrap().definition_xml, "<domain><name>vm1</name></domain>");
        assert_eq!(actions(&reg, "guest.missing"), ["vm1"]);
        let alarms = missing_alarms(&reg);
        assert_eq!(alarms.len(), 1);
        assert!(alarms[0].starts_with("a: vm1 (u1)") && alarms[0].contains("lifeboat vms restore u1"), "{alarms:?}");
        // a comes back without vm2 (reinstalled): kept too.
        reg.apply_inventory("a", a, inv(vec![])).unwrap();
        assert_eq!(reg.missing_uuids(), ["u1", "u2"]);
        assert_eq!(missing_alarms(&reg).len(), 2);
        // A restart keeps them.
        drop(reg);
        let reg = Registry::load(crate::store::sqlite::SqliteRepos::start(&path).unwrap(), Timing::default()).unwrap();
        assert_eq!(reg.missing_uuids(), ["u1", "u2"]);
        let names: Vec<(String, bool)> = reg
            .list_guests(None, None, false)
            .unwrap()
            .into_iter()
            .map(|r| (r.guest.unwrap().name, r.missing))
            .collect();
        assert_eq!(names, [("vm1".to_string(), true), ("vm2".to_string(), true)]);
        // vm1 is defined on a again: mark and alarm cleared, audited.
        let a = reg.open_session("a", "boot", tx.clone()).unwrap();
        reg.apply_guest("a", a, off("u1", "vm1")).unwrap();
        assert_eq!(reg.missing_uuids(), ["u2"]);
        assert_eq!(actions(&reg, "guest.reappeared"), ["vm1"]);
        assert_eq!(missing_alarms(&reg).len(), 1);
        // vm2 is defined by hand on b (a hand cold move): not lost, the mark clears.
        let b = reg.open_session("b", "boot", tx.clone()).unwrap();
        reg.apply_guest("b", b, off("u2", "vm2")).unwrap();
        assert!(reg.missing_uuids().is_empty());
        assert_eq!(actions(&reg, "guest.reappeared"), ["vm1", "vm2"]);
        // b comes back without it: that was the last copy, kept again.
        reg.apply_inventory("b", b, inv(vec![])).unwrap();
        assert_eq!(reg.missing_uuids(), ["u2"], "the last copy is kept wherever it vanished");
        assert_eq!(reg.list_guests(Some("b"), Some("vm2"), false).unwrap()[0].owner_host, "a", "restored on its owner");
        // Forget refuses a guest that is not missing, then drops vm2's record.
        let f = AuditRow { actor: "olga".into(), action: "guest.forgotten".into(), ..Default::default() };
        let e = reg.find_missing("vm1", "forgetting a guest").unwrap_err();
        assert!(matches!(e, ControllerError::Refused(_)) && e.to_string().contains("defined on a"), "{e}");
        assert!(matches!(reg.find_missing("vm9", "x"), Err(ControllerError::NotFound(_))));
        reg.forget_missing("u2", &f).unwrap();
        assert!(reg.missing_uuids().is_empty() && missing_alarms(&reg).is_empty());
        assert!(reg.desired_of("u2").is_none());
        assert!(reg.forget_missing("u2", &f).is_err(), "already forgotten");
        assert!(reg.list_guests(None, Some("vm2"), false).unwrap().is_empty());
    }

    #[test]
    fn a_guest_running_elsewhere_is_not_missing_and_pages_cover_missing_guests_once() {
        let reg =
            Registry::load(crate::store::sqlite::SqliteRepos::start_in_memory().unwrap(), Timing::default()).unwrap();
        let (tx, _rx) = mpsc::channel(8);
        let a = reg.open_session("a", "boot", tx.clone()).unwrap();
        let b = reg.open_session("b", "boot", tx).unwrap();
        reg.apply_inventory("a", a, inv(vec![off("u1", "vm1"), off("u2", "vm2"), off("u3", "vm3")])).unwrap();
        // A hand migration: b runs vm1 before a reports it gone.
        reg.apply_guest("b", b, Guest { state: GuestState::Running as i32, ..off("u1", "vm1") }).unwrap();
        reg.remove_guest("a", a, "u1").unwrap();
        assert!(reg.missing_uuids().is_empty(), "it runs on b");
        reg.remove_guest("a", a, "u2").unwrap();
        assert_eq!(reg.missing_uuids(), ["u2"]);
        // Pages of one: a/vm2 (missing), a/vm3, b/vm1; each once, in order.
        let mut after = None;
        let mut seen = Vec::new();
        loop {
            let (page, next) = reg.list_guests_page(None, None, false, after.as_ref(), 1).unwrap();
            seen.extend(page.into_iter().map(|r| (r.host_id, r.guest.unwrap().name, r.missing)));
            match next {
                Some(c) => after = Some(c),
                None => break,
            }
        }
        let want = [("a", "vm2", true), ("a", "vm3", false), ("b", "vm1", false)];
        assert_eq!(seen, want.map(|(h, n, m)| (h.to_string(), n.to_string(), m)));
    }
}

#[cfg(test)]
mod unfinished_owner_tests {
    use super::super::*;
    use crate::ports::OwnerRow;

    #[test]
    fn the_last_copy_is_kept_when_an_unfinished_move_names_another_owner() {
        let reg =
            Registry::load(crate::store::sqlite::SqliteRepos::start_in_memory().unwrap(), Timing::default()).unwrap();
        let (tx, _rx) = mpsc::channel(8);
        let a = reg.open_session("a", "boot", tx).unwrap();
        let off = |u: &str, n: &str| Guest {
            uuid: u.into(),
            name: n.into(),
            state: GuestState::Shutoff as i32,
            ..Default::default()
        };
        reg.apply_inventory(
            "a",
            a,
            Inventory { host: None, guests: vec![off("u1", "vm1"), off("u2", "vm2")], more: false },
        )
        .unwrap();
        // A forced move a -> b recorded b first, then its define on b failed: the job ended, the record stays unfinished.
        for u in ["u1", "u2"] {
            let o = OwnerRow {
                uuid: u.into(),
                host: "b".into(),
                generation: 2,
                from_host: "a".into(),
                job: "j".into(),
                complete: false,
            };
            reg.repos()
                .call_blocking(move |r| {
                    r.ownership().set_owner(&o, &AuditRow::by_controller("t", "b", u, String::new()))
                })
                .unwrap();
        }
        reg.refresh_owners_blocking().unwrap();
        reg.remove_guest("a", a, "u1").unwrap();
        assert_eq!(reg.missing_uuids(), ["u1"], "a holds the only copy: undefined by hand, it is kept");
        // While the job still acts on it, the source's undefine is the job's own.
        reg.set_in_job("j2", &[("u2".into(), "a".into(), "b".into())]);
        reg.remove_guest("a", a, "u2").unwrap();
        assert_eq!(reg.missing_uuids(), ["u1"]);
    }
}

#[cfg(test)]
mod libvirt_down_tests {
    use super::super::*;

    #[test]
    fn an_inventory_without_libvirt_or_from_a_host_two_agents_claim_proves_no_absence() {
        let reg =
            Registry::load(crate::store::sqlite::SqliteRepos::start_in_memory().unwrap(), Timing::default()).unwrap();
        let (tx, _rx) = mpsc::channel(8);
        let a = reg.open_session("a", "boot", tx).unwrap();
        let off =
            Guest { uuid: "u1".into(), name: "vm1".into(), state: GuestState::Shutoff as i32, ..Default::default() };
        reg.apply_inventory("a", a, Inventory { host: None, guests: vec![off], more: false }).unwrap();
        let down = HostInfo { host_id: "a".into(), libvirt_error: "libvirt unreachable".into(), ..Default::default() };
        reg.apply_inventory("a", a, Inventory { host: Some(down), guests: vec![], more: false }).unwrap();
        assert!(reg.missing_uuids().is_empty());
        let l = reg.list_guests(Some("a"), None, false).unwrap();
        assert_eq!((l.len(), l[0].missing), (1, false), "kept as last reported");
        // Two agents claim a: whichever answers may be the other machine.
        reg.raise_alarm_blocking("a", "duplicate-agent", "two agents").unwrap();
        let up = HostInfo { host_id: "a".into(), ..Default::default() };
        reg.apply_inventory("a", a, Inventory { host: Some(up.clone()), guests: vec![], more: false }).unwrap();
        reg.remove_guest("a", a, "u1").unwrap();
        assert!(reg.missing_uuids().is_empty());
        assert_eq!(reg.list_guests(Some("a"), None, false).unwrap().len(), 1, "kept as last reported");
        reg.reload_alarms_blocking().unwrap();
        reg.repos().call_blocking(move |r| r.alarms().clear("a", "duplicate-agent")).unwrap();
        reg.reload_alarms_blocking().unwrap();
        reg.apply_inventory("a", a, Inventory { host: Some(up), guests: vec![], more: false }).unwrap();
        assert_eq!(reg.missing_uuids(), ["u1"], "a connected libvirt without it: missing");
    }
}
