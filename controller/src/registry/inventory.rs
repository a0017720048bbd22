//! Floor 4 (application) of the registry: what agents report (inventories,
//! host facts, guest changes) applied to the in-memory view, written through
//! to the store first; ownership claims and desired state follow from it,
//! by the pure rules of `crate::domain::policy`.
//!
//! Architecture invariant: a report is applied only from the host's current
//! session, is validated whole before anything is stored, and is stored
//! before the view changes.

use super::*;

impl Registry {
    /// Checks the ownership a host's report claims (Lifeboat's metadata in
    /// the definition: owner and generation) against the database. A claim
    /// newer than the record means the database is behind the hosts (it was
    /// restored from an older backup, say): generations only move forward,
    /// so the newest claim wins and is recorded, unless the recorded owner
    /// still runs the guest, which is a conflict: no lease, start or stop
    /// for that guest anywhere, and an alarm.
    pub(super) fn check_claims(inner: &mut Inner, host: &str, guests: &[&Guest]) -> RepoResult<()> {
        if Self::suspect(inner, host) {
            return Ok(());
        }
        for g in guests {
            if g.owner_host != host || g.owner_generation == 0 {
                continue;
            }
            let recorded = inner.owners.get(&g.uuid).map_or(0, |o| o.generation);
            if g.owner_generation <= recorded {
                continue;
            }
            // A generation no Lifeboat ever wrote (it counts moves from 1):
            // a hand-edited or hostile definition claims nothing.
            if i64::try_from(g.owner_generation).is_err() {
                warn!(host, uuid = %g.uuid, generation = g.owner_generation, "ignoring an ownership claim out of range");
                continue;
            }
            let current = inner
                .owners
                .get(&g.uuid)
                .map(|o| o.host.clone())
                .or_else(|| inner.desired.get(&g.uuid).map(|d| d.0.clone()));
            let held_there = current.as_deref().filter(|c| *c != host).is_some_and(|c| {
                Self::fresh(inner, c)
                    && inner
                        .guests
                        .get(c)
                        .and_then(|m| m.get(&g.uuid))
                        .is_some_and(|x| lifeboat_proto::holds_disk(x.state))
            });
            if held_there {
                let c = current.unwrap_or_default();
                let detail = format!(
                    "{} ({}): {host} holds a definition owned by {host} with generation {}, newer than the database's record \
                     (generation {recorded}, owner {c}), while {c} runs it: Lifeboat grants no lease and starts or stops nothing \
                     for it until one copy is gone; find out which copy is current (`lifeboat vms show {}`, `virsh list` on both)",
                    g.name, g.uuid, g.owner_generation, g.name
                );
                if inner.conflicts.insert(g.uuid.clone(), host.to_string()).is_none() {
                    Self::raise_locked(inner, host, "ownership-conflict", &detail)?;
                }
                continue;
            }
            inner.conflicts.remove(&g.uuid);
            let row = OwnerRow {
                uuid: g.uuid.clone(),
                host: host.to_string(),
                generation: g.owner_generation,
                from_host: current.clone().unwrap_or_default(),
                job: String::new(),
                complete: true,
            };
            let a = AuditRow::by_controller(
                "ownership.rebuilt",
                host,
                &g.name,
                format!(
                    "{} ({}) is defined on {host} as owned by {host} with generation {}, newer than the database's (generation \
                     {recorded}{}): the database is behind the hosts; recorded {host} as its owner",
                    g.name,
                    g.uuid,
                    g.owner_generation,
                    current.as_deref().map(|c| format!(", owner {c}")).unwrap_or_default()
                ),
            );
            let stored = row.clone();
            inner.db(move |r| r.ownership().set_owner(&stored, &a))?;
            if let Some(old) = inner.owners.insert(g.uuid.clone(), row)
                && let Some(v) = inner.owners_by_host.get_mut(&old.host)
            {
                v.retain(|u| u != &g.uuid);
            }
            inner.owners_by_host.entry(host.to_string()).or_default().push(g.uuid.clone());
            inner.owners_version = inner.owners_version.wrapping_add(1);
            inner.view_version.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let detail = format!(
                "the database is older than what {host} reports (restored from an older backup?): ownership of the guests \
                 {host} holds with newer generations was taken from their definitions (highest generation wins); see \
                 `lifeboat log --host {host}` (ownership.rebuilt)"
            );
            Self::raise_locked(inner, host, "store-behind-hosts", &detail)?;
            for e in inner.hosts.values_mut() {
                e.dirty = true;
                inner.view_version.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// What the desired state of `g` becomes, if it changes.
    pub(super) fn desired_change(inner: &Inner, host: &str, g: &Guest, from_event: bool) -> Option<&'static str> {
        if Self::owner_view_as(inner, &g.uuid, host, Some(lifeboat_proto::holds_disk(g.state))).is_some() {
            return None;
        }
        let current = inner.desired.get(&g.uuid).map(|(h, w)| (h.as_str(), w.as_str()));
        crate::domain::policy::desired_change(host, g.state, &g.state_reason, from_event, current)
    }

    pub(super) fn note_desired(inner: &mut Inner, host: &str, g: &Guest, from_event: bool) -> RepoResult<()> {
        if let Some(w) = Self::desired_change(inner, host, g, from_event) {
            let (u, h) = (g.uuid.clone(), host.to_string());
            inner.db(move |r| r.ownership().set_desired_many(&[DesiredChange { uuid: &u, host: &h, state: w }]))?;
            inner.desired.insert(g.uuid.clone(), (host.to_string(), w.to_string()));
        }
        Ok(())
    }

    pub(super) fn recount(inner: &mut Inner, host_id: &str) {
        let kib =
            inner.guests.get(host_id).map(|m| running_kib(m.values().map(|g| (g.state, g.memory_kib)))).unwrap_or(0);
        if let Some(e) = inner.hosts.get_mut(host_id) {
            e.running_kib = kib;
        }
    }

    pub(super) fn set_host_info(inner: &mut Inner, host_id: &str, mut info: HostInfo, now: i64) -> RepoResult<()> {
        // The authenticated id wins over whatever the message says.
        info.host_id = host_id.to_string();
        // Unchanged facts are not written again (a reconnect, or 10,000
        // after a failover): the last-seen time is persisted by the flush.
        if inner.hosts.get(host_id).is_none_or(|e| e.row.info != info) {
            let stored = info.clone();
            inner.db(move |r| r.hosts().upsert(&stored, now))?;
        }
        if let Some(e) = inner.hosts.get_mut(host_id) {
            e.row.info = info;
            e.row.last_seen_ms = now;
        }
        Ok(())
    }

    /// A full inventory: replaces the host's facts and all its guests.
    /// An inventory with an invalid guest is refused whole (nothing is
    /// written); the returned list is always empty (kept for callers).
    pub fn apply_inventory(
        &self,
        host_id: &str,
        sid: SessionId,
        inv: Inventory,
    ) -> Result<Vec<String>, ControllerError> {
        let skipped = Vec::new();
        if let Some(m) = inv.guests.iter().find_map(|g| valid_guest(g).err()) {
            return Err(ControllerError::InvalidArgument(format!("inventory refused whole: {m}")));
        }
        let mut guests: Vec<Guest> = inv.guests;
        // Keyed before the registry lock is taken: thousands of agents
        // reconnecting at once (a failover) do this in parallel.
        let mut keys: Vec<(Vec<u8>, u64)> = guests.iter_mut().map(crate::intake::reported_key).collect();
        // Whole rows (text and digest) of the guests that came restored, the
        // ones likely to be written; a kept one is encoded only if it must be.
        let mut rows: Vec<Option<Vec<u8>>> =
            guests.iter().map(|g| g.definition_deflate.is_empty().then(|| prost::Message::encode_to_vec(g))).collect();
        let now = self.now_ms();
        let mut inner = self.lock();
        if Self::current(&mut inner, host_id, sid).is_none() {
            return Ok(vec![]);
        }
        // A guest the intake found unchanged still has its definition packed
        // and unchecked. The intake judged it again when the inventory
        // completed (against this session's own messages between the pages);
        // if the controller changed its entry in the microseconds since, it
        // is restored and checked now, as the intake would have: nothing
        // unchecked is ever stored.
        for (i, g) in guests.iter_mut().enumerate() {
            if g.definition_deflate.is_empty() {
                continue;
            }
            let same = inner.guests.get(host_id).and_then(|m| m.get(&g.uuid)).is_some_and(|e| e.hash == keys[i].1);
            if !same {
                crate::intake::unpack_guest(
                    "Inventory",
                    &format!("guests[{i}]."),
                    g,
                    crate::intake::MAX_DEFINITION_BYTES,
                )
                .map_err(|r| ControllerError::InvalidArgument(format!("inventory refused whole: {r}")))?;
            }
        }
        if let Some(h) = inv.host {
            Self::set_host_info(&mut inner, host_id, h, now)?;
        }
        let (upserts, deletes) = {
            let old = inner.guests.get(host_id);
            // Stored whole: the definition's text and its digest.
            let upserts: Vec<(String, String, Vec<u8>)> = guests
                .iter()
                .zip(&keys)
                .zip(rows.iter_mut())
                .filter(|((g, (_, h)), _)| old.and_then(|m| m.get(&g.uuid)).is_none_or(|e| e.hash != *h))
                .map(|((g, _), row)| {
                    let row = row.take().unwrap_or_else(|| prost::Message::encode_to_vec(g));
                    (g.uuid.clone(), g.name.clone(), row)
                })
                .collect();
            let new: std::collections::HashSet<&str> = guests.iter().map(|g| g.uuid.as_str()).collect();
            let deletes: Vec<String> =
                old.map(|m| m.keys().filter(|u| !new.contains(u.as_str())).cloned().collect()).unwrap_or_default();
            (upserts, deletes)
        };
        // A managed guest gone from its owner is kept, not deleted. An
        // agent whose libvirt is not connected reports what it last knew,
        // and a host two agents claim may be answered by the other machine:
        // neither proves an absence, so those guests stay as they were.
        let kept: Vec<String> = deletes.iter().filter(|u| Self::keeps_when_gone(&inner, host_id, u)).cloned().collect();
        let unsure = inner.hosts.get(host_id).is_some_and(|e| !e.row.info.libvirt_error.is_empty())
            || Self::suspect(&inner, host_id);
        let (held, kept) = if unsure { (kept, Vec::new()) } else { (Vec::new(), kept) };
        let dels: Vec<String> = deletes.iter().filter(|u| !held.contains(u)).cloned().collect();
        Self::mark_gone(&mut inner, host_id, &kept, now, "absent from its complete inventory")?;
        let h = host_id.to_string();
        if !upserts.is_empty() || !dels.is_empty() {
            inner.db(move |r| {
                let writes: Vec<GuestWrite<'_>> =
                    upserts.iter().map(|(uuid, name, data)| GuestWrite { uuid, name, data }).collect();
                let dels: Vec<&str> = dels.iter().map(String::as_str).collect();
                r.guests().write(&h, &writes, &dels, now)
            })?;
        }
        let back: Vec<(String, String, i32)> =
            guests.iter().map(|g| (g.uuid.clone(), g.name.clone(), g.state)).collect();
        let claims: Vec<&Guest> = guests.iter().filter(|g| g.owner_host == host_id && g.owner_generation > 0).collect();
        Self::check_claims(&mut inner, host_id, &claims)?;
        // New guests' desired state, in one transaction (200,000 guests
        // arriving must not mean 200,000 synced writes).
        let changes: Vec<(String, &'static str)> = guests
            .iter()
            // New guests, and guests first reported elsewhere that now run here only.
            .filter(|g| inner.desired.get(&g.uuid).is_none_or(|d| d.0 != host_id))
            .filter_map(|g| Self::desired_change(&inner, host_id, g, false).map(|w| (g.uuid.clone(), w)))
            .collect();
        if !changes.is_empty() {
            let (h, stored) = (host_id.to_string(), changes.clone());
            inner.db(move |r| {
                let c: Vec<DesiredChange<'_>> =
                    stored.iter().map(|(uuid, w)| DesiredChange { uuid, host: &h, state: w }).collect();
                r.ownership().set_desired_many(&c)
            })?;
        }
        for (u, w) in changes {
            inner.desired.insert(u, (host_id.to_string(), w.to_string()));
        }
        if let Some(e) = inner.hosts.get_mut(host_id) {
            e.inventory_seen = true;
            e.uninventoried_since_ms = 0;
            e.dirty = true;
            inner.view_version.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let mut old = inner.guests.remove(host_id).unwrap_or_default();
        let mut map: BTreeMap<String, GuestEntry> = guests
            .into_iter()
            .zip(keys.drain(..))
            .map(|(g, (rest, h))| {
                let uuid = g.uuid.clone();
                // Unchanged guests keep their entry (and its update time).
                let e = match old.remove(&uuid) {
                    Some(o) if o.hash == h => o,
                    _ => GuestEntry::keyed(&g, rest, h, now),
                };
                (uuid, e)
            })
            .collect();
        for u in held {
            if let Some(e) = old.remove(&u) {
                map.insert(u, e);
            }
        }
        inner.guests.insert(host_id.to_string(), map);
        Self::recount(&mut inner, host_id);
        for (uuid, name, state) in back {
            Self::note_back(&mut inner, host_id, &uuid, &name, state)?;
        }
        Ok(skipped)
    }

    /// Host facts changed.
    pub fn apply_host(&self, host_id: &str, sid: SessionId, info: HostInfo) -> Result<(), ControllerError> {
        let now = self.now_ms();
        let mut inner = self.lock();
        if Self::current(&mut inner, host_id, sid).is_none() {
            return Ok(());
        }
        Self::set_host_info(&mut inner, host_id, info, now)?;
        Ok(())
    }

    /// One guest appeared or changed.
    pub fn apply_guest(&self, host_id: &str, sid: SessionId, mut g: Guest) -> Result<(), ControllerError> {
        valid_guest(&g).map_err(|e| ControllerError::InvalidArgument(e.to_string()))?;
        if !g.definition_deflate.is_empty() {
            // The intake restores definitions; a packed one here was not checked.
            return Err(ControllerError::InvalidArgument("a guest's definition arrived packed and unchecked".into()));
        }
        let (rest, h) = crate::intake::reported_key(&mut g);
        let b = prost::Message::encode_to_vec(&g);
        let now = self.now_ms();
        let mut inner = self.lock();
        if Self::current(&mut inner, host_id, sid).is_none() {
            return Ok(());
        }
        // Libvirt autostart switched on (with virsh, say) for a guest that
        // Lifeboat starts: worth a line in the action log, since Lifeboat
        // switches it off again at the next lease renewal.
        let autostart_on = g.autostart
            && Self::owner_of(&inner, &g.uuid, host_id) == host_id
            && inner.hosts.get(host_id).is_some_and(|e| e.leases_sent.is_some())
            && inner.guests.get(host_id).and_then(|m| m.get(&g.uuid)).is_some_and(|e| !e.guest().autostart);
        let (host, u, n) = (host_id.to_string(), g.uuid.clone(), g.name.clone());
        inner.db(move |r| r.guests().write(&host, &[GuestWrite { uuid: &u, name: &n, data: &b }], &[], now))?;
        Self::check_claims(&mut inner, host_id, &[&g])?;
        if autostart_on {
            let detail = format!(
                "libvirt autostart of {} ({}) on {host_id} was switched on outside Lifeboat; Lifeboat switches it off at the next lease renewal (it decides what starts)",
                g.name, g.uuid
            );
            // The guest's update is stored already; a lost log line must not undo it.
            let a = AuditRow::by_controller("guest.autostart_enabled", host_id, &g.name, detail);
            if let Err(e) = inner.db(move |r| r.audit().append(&a)) {
                warn!(host = %host_id, guest = %g.name, "writing the audit log failed: {e}");
            }
        }
        Self::note_desired(&mut inner, host_id, &g, true)?;
        if let Some(e) = inner.hosts.get_mut(host_id) {
            e.dirty = true;
            inner.view_version.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let (uuid, name, state) = (g.uuid.clone(), g.name.clone(), g.state);
        inner
            .guests
            .entry(host_id.to_string())
            .or_default()
            .insert(g.uuid.clone(), GuestEntry::keyed(&g, rest, h, now));
        Self::recount(&mut inner, host_id);
        Self::note_back(&mut inner, host_id, &uuid, &name, state)?;
        Ok(())
    }

    /// One guest was undefined.
    pub fn remove_guest(&self, host_id: &str, sid: SessionId, uuid: &str) -> Result<(), ControllerError> {
        let mut inner = self.lock();
        if Self::current(&mut inner, host_id, sid).is_none() {
            return Ok(());
        }
        // A managed guest undefined on its owner outside Lifeboat is kept;
        // a host two agents claim proves no absence (it stays as it was).
        if Self::keeps_when_gone(&inner, host_id, uuid) {
            if Self::suspect(&inner, host_id) {
                return Ok(());
            }
            Self::mark_gone(&mut inner, host_id, &[uuid.to_string()], self.now_ms(), "undefined there")?;
        }
        let (h, u) = (host_id.to_string(), uuid.to_string());
        inner.db(move |r| r.guests().delete(&h, &u))?;
        if let Some(m) = inner.guests.get_mut(host_id) {
            m.remove(uuid);
        }
        Self::recount(&mut inner, host_id);
        if let Some(e) = inner.hosts.get_mut(host_id) {
            e.dirty = true;
            inner.view_version.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }
}
