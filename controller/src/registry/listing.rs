//! Floor 4 (application) of the registry: reading the in-memory view —
//! host and guest listings with paging, and the planner's views
//! (`crate::domain::view::HostView`), which are copies.
//!
//! Architecture invariant: reading changes nothing; every view handed out
//! is a floor-1 value that holds no lock and no handle.

use super::*;

impl Registry {
    pub(super) fn record(&self, inner: &Inner, e: &HostEntry, now: i64) -> HostRecord {
        let guests = inner.guests.get(&e.row.info.host_id);
        // Counts are capped by intake (100,000 guests per host); saturate anyway.
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let guest_count = count(guests.map(|g| g.len()).unwrap_or(0));
        let running_count =
            count(guests.map(|g| g.values().filter(|g| g.state == GuestState::Running as i32).count()).unwrap_or(0));
        HostRecord {
            info: Some(e.row.info.clone()),
            status: e.row.status.as_str().into(),
            host_status: e.row.status.to_wire() as i32,
            liveness: self.liveness_of(e, now).as_str().into(),
            session_open: e.session.is_some(),
            last_seen_unix_ms: e.last_heard_ms().unwrap_or(e.row.last_seen_ms),
            first_seen_unix_ms: e.row.first_seen_ms,
            guest_count,
            running_count,
            status_reason: e.row.status_reason.clone(),
            alarms: inner
                .alarms
                .iter()
                .filter(|a| a.0 == e.row.info.host_id)
                .map(|a| format!("{}: {}", a.1, a.2))
                .collect(),
            stale_definitions: count(
                guests
                    .map(|g| {
                        g.keys().filter(|u| Self::owner_of(inner, u, &e.row.info.host_id) != e.row.info.host_id).count()
                    })
                    .unwrap_or(0),
            ),
            // From the store's reservations: the admin service fills it in.
            reserved_memory_kib: 0,
            ..Default::default()
        }
    }

    /// All hosts.
    pub fn list_hosts(&self) -> Vec<HostRecord> {
        let now = self.now_ms();
        let inner = self.lock();
        inner.hosts.values().map(|e| self.record(&inner, e, now)).collect()
    }

    pub(super) fn resolve<'a>(inner: &'a Inner, host: &str) -> Result<&'a HostEntry, ControllerError> {
        if let Some(e) = inner.hosts.get(host) {
            return Ok(e);
        }
        let by_name: Vec<&HostEntry> = inner.hosts.values().filter(|e| e.row.info.hostname == host).collect();
        match by_name.as_slice() {
            [one] => Ok(one),
            _ => Err(ControllerError::UnknownHost { host: host.into(), known: inner.hosts.keys().cloned().collect() }),
        }
    }

    /// One host, by id or (unique) hostname.
    pub fn get_host(&self, host: &str) -> Result<HostRecord, ControllerError> {
        let now = self.now_ms();
        let inner = self.lock();
        let e = Self::resolve(&inner, host)?;
        Ok(self.record(&inner, e, now))
    }

    /// Every guest (or one host's, or the ones named `vm`), in order of host,
    /// name and UUID: all pages of [`Registry::list_guests_page`].
    pub fn list_guests(
        &self,
        host: Option<&str>,
        vm: Option<&str>,
        with_definitions: bool,
    ) -> Result<Vec<GuestRecord>, ControllerError> {
        Ok(self.list_guests_page(host, vm, with_definitions, None, usize::MAX)?.0)
    }

    /// Up to `limit` guests after `after`, in order of host, name and UUID,
    /// and where the next page starts (`None` = no more). Takes the registry
    /// lock per 100 hosts: listing 200,000 guests must not stop everything
    /// else meanwhile.
    pub fn list_guests_page(
        &self,
        host: Option<&str>,
        vm: Option<&str>,
        with_definitions: bool,
        after: Option<&GuestCursor>,
        limit: usize,
    ) -> Result<(Vec<GuestRecord>, Option<GuestCursor>), ControllerError> {
        use std::ops::Bound;
        let limit = limit.max(1);
        let now = self.now_ms();
        let only = match host {
            Some(h) => Some(Self::resolve(&self.lock(), h)?.row.info.host_id.clone()),
            None => None,
        };
        let past = |id: &str, name: &str, uuid: &str| {
            after.is_none_or(|c| (id, name, uuid) > (c.0.as_str(), c.1.as_str(), c.2.as_str()))
        };
        let mut out: Vec<GuestRecord> = Vec::new();
        // Hosts are visited from the cursor's host on, a chunk per lock hold.
        let mut from = match (&only, after) {
            (Some(h), _) => Bound::Included(h.clone()),
            (None, Some(c)) => Bound::Included(c.0.clone()),
            (None, None) => Bound::Unbounded,
        };
        loop {
            let inner = self.lock();
            let ids: Vec<String> = inner
                .hosts
                .range::<String, _>((from.clone(), Bound::Unbounded))
                .map(|(k, _)| k.clone())
                .take_while(|k| only.as_ref().is_none_or(|h| h == k))
                .take(LOCK_CHUNK)
                .collect();
            let Some(last) = ids.last() else { break };
            from = Bound::Excluded(last.clone());
            for id in ids.iter().map(String::as_str) {
                let live = inner.hosts.get(id).map(|e| self.liveness_of(e, now)).unwrap_or(Liveness::Unreachable);
                let none = BTreeMap::new();
                let m = inner.guests.get(id).unwrap_or(&none);
                // Reported guests and guests missing on this host, in one
                // (name, UUID) order so the page cursor holds for both.
                let mut v: Vec<(&str, &str, Listed<'_>)> = m
                    .iter()
                    .filter(|(u, g)| vm.is_none_or(|vm| &*g.name == vm || u.as_str() == vm) && past(id, &g.name, u))
                    .map(|(u, g)| (&*g.name, u.as_str(), Listed::Seen(g)))
                    .chain(
                        Self::missing_rows_of(&inner, id, vm, &past)
                            .into_iter()
                            .map(|r| (r.guest.name.as_str(), r.guest.uuid.as_str(), Listed::Gone(r))),
                    )
                    .collect();
                if v.is_empty() {
                    continue;
                }
                v.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
                let mut definitions: BTreeMap<String, String> = if with_definitions
                    && v.iter().any(|x| matches!(x.2, Listed::Seen(_)))
                {
                    let h = id.to_string();
                    inner.db(move |r| r.guests().of_host(&h))?.into_iter().map(|g| (g.uuid, g.definition_xml)).collect()
                } else {
                    BTreeMap::new()
                };
                for (_, uuid, item) in v {
                    if out.len() == limit {
                        let next = out.last().and_then(|r| {
                            r.guest.as_ref().map(|g| (r.host_id.clone(), g.name.clone(), g.uuid.clone()))
                        });
                        return Ok((out, next));
                    }
                    let g = match item {
                        Listed::Seen(g) => g,
                        Listed::Gone(r) => {
                            out.push(Self::missing_record(&inner, r, live, with_definitions));
                            continue;
                        }
                    };
                    let owner = Self::owner_of(&inner, uuid, id).to_string();
                    let desired = match inner.desired.get(uuid) {
                        Some((h, st)) if h == id && owner == id => st.clone(),
                        _ => String::new(),
                    };
                    let mut guest = g.guest();
                    if let Some(d) = definitions.remove(&guest.uuid) {
                        guest.definition_xml = d;
                    }
                    out.push(GuestRecord {
                        guest: Some(guest),
                        host_id: id.to_string(),
                        updated_unix_ms: g.updated_ms,
                        host_liveness: live.as_str().into(),
                        desired_state: desired,
                        owner_host: owner,
                        ..Default::default()
                    });
                }
            }
        }
        Ok((out, None))
    }

    /// How many guests are in each reported state.
    pub fn guest_state_counts(&self) -> BTreeMap<i32, u64> {
        let inner = self.lock();
        let mut out = BTreeMap::new();
        for g in inner.guests.values().flat_map(|m| m.values()) {
            let n: &mut u64 = out.entry(g.state).or_insert(0);
            *n = n.saturating_add(1);
        }
        out
    }

    /// Every host as the planner sees it, with the (slim) guest lists of
    /// only the hosts named in `with_guests`: copying 200,000 guests for
    /// every plan would cost more than the plan. Silence is counted from the
    /// last message, but never from before this controller started (a
    /// restart must not make a host look silent for longer than we know).
    pub fn host_views_for(&self, with_guests: &[&str]) -> Vec<HostView> {
        let now = self.now_ms();
        let inner = self.lock();
        inner
            .hosts
            .values()
            .map(|e| self.view(&inner, e, now, with_guests.contains(&e.row.info.host_id.as_str())))
            .collect()
    }

    /// One host as the planner sees it, with its guests.
    pub fn host_view(&self, host_id: &str) -> Option<HostView> {
        let now = self.now_ms();
        let inner = self.lock();
        inner.hosts.get(host_id).map(|e| self.view(&inner, e, now, true))
    }

    /// Fills in the guest lists of `ids` in views made by [`Registry::host_views_for`].
    pub fn fill_guests(&self, views: &mut [HostView], ids: &[String]) {
        let inner = self.lock();
        for v in views.iter_mut().filter(|v| ids.contains(&v.id)) {
            v.guests = inner.guests.get(&v.id).map(|m| m.values().map(GuestEntry::guest).collect()).unwrap_or_default();
        }
    }

    pub(super) fn view(&self, inner: &Inner, e: &HostEntry, now: i64, with_guests: bool) -> HostView {
        let live = self.liveness_of(e, now);
        let last = e.last_heard_ms().unwrap_or(e.row.last_seen_ms).max(self.started_ms);
        let guests = inner.guests.get(&e.row.info.host_id);
        HostView {
            id: e.row.info.host_id.clone(),
            status: e.row.status,
            liveness: live,
            silent_ms: match live {
                Liveness::Reachable => None,
                Liveness::Unreachable => Some(now.saturating_sub(last).max(0) as u64),
            },
            memory_total_kib: e.row.info.memory_total_kib,
            running_memory_kib: e.running_kib,
            lock_manager: e.row.info.lock_manager.clone(),
            guests: if with_guests {
                guests.map(|m| m.values().map(GuestEntry::guest).collect()).unwrap_or_default()
            } else {
                Vec::new()
            },
        }
    }

    /// A host's liveness, silence counted from when it was last heard but
    /// never from before this controller started: see [`liveness_since_start`].
    pub(super) fn liveness_of(&self, e: &HostEntry, now: i64) -> Liveness {
        liveness_since_start(now, e.last_heard_ms(), self.started_ms, self.timing)
    }

    /// Whether the host is REACHABLE right now.
    pub fn is_reachable(&self, host_id: &str) -> bool {
        let now = self.now_ms();
        let inner = self.lock();
        inner.hosts.get(host_id).is_some_and(|e| self.liveness_of(e, now) == Liveness::Reachable)
    }

    /// A guest as `host`'s agent last reported it (without its definition),
    /// if it reported it: how a step whose answer was lost is re-read.
    pub fn reported_guest(&self, host: &str, uuid: &str) -> Option<Guest> {
        self.lock().guests.get(host).and_then(|m| m.get(uuid)).map(GuestEntry::guest)
    }

    /// Whether the host's last reports hold the guest (no copy of it made).
    pub fn has_reported(&self, host: &str, uuid: &str) -> bool {
        self.lock().guests.get(host).is_some_and(|m| m.contains_key(uuid))
    }

    /// How many guests the host's last reports hold.
    pub fn reported_count(&self, host: &str) -> usize {
        self.lock().guests.get(host).map_or(0, BTreeMap::len)
    }

    /// The [`crate::intake::reported_key`] hash of each guest the host's
    /// last reports hold, by UUID: what the intake compares a new
    /// inventory with.
    pub fn reported_hashes(&self, host: &str) -> std::collections::HashMap<String, u64> {
        self.lock().guests.get(host).map(|m| m.iter().map(|(u, e)| (u.clone(), e.hash)).collect()).unwrap_or_default()
    }
}

/// Which hosts a dashboard page lists.
#[derive(Debug, Clone, Default)]
pub struct HostFilter {
    /// Only hosts with this operators' status.
    pub status: Option<HostStatus>,
    /// Only hosts with this liveness.
    pub liveness: Option<Liveness>,
    /// Only hosts with an active alarm.
    pub alarms_only: bool,
    /// Only hosts whose id or hostname contains this text.
    pub name: Option<String>,
}

/// One page of hosts.
#[derive(Debug, Clone, Default)]
pub struct HostPage {
    /// The page's hosts, in id order.
    pub rows: Vec<HostRecord>,
    /// How many hosts match the filter in all.
    pub matching: usize,
    /// The id after which the next page starts (`None`: no more).
    pub next: Option<String>,
}

/// Which guests a dashboard page lists.
#[derive(Debug, Clone, Default)]
pub struct GuestFilter {
    /// Only guests reported by this host (id or unique hostname).
    pub host: Option<String>,
    /// Only guests in this reported state (wire number).
    pub state: Option<i32>,
    /// Only guests owned by this host id.
    pub owner: Option<String>,
    /// Only guests whose name or UUID contains this text.
    pub name: Option<String>,
}

/// Guest rows read per step while filtering a guests page.
const GUEST_SCAN_STEP: usize = 500;

impl Registry {
    /// Up to `limit` hosts matching `f` after the id `after`, and how many
    /// match in all. Takes the lock per [`LOCK_CHUNK`] hosts; builds records
    /// only for the page.
    pub fn hosts_page(&self, f: &HostFilter, after: Option<&str>, limit: usize) -> HostPage {
        use std::ops::Bound;
        let limit = limit.max(1);
        let now = self.now_ms();
        let needle = f.name.as_deref().map(str::to_lowercase).filter(|n| !n.is_empty());
        let mut page = HostPage::default();
        let mut from: Bound<String> = Bound::Unbounded;
        // Once per call, not a scan of every alarm per host under the lock.
        let alarmed: std::collections::HashSet<String> =
            if f.alarms_only { self.lock().alarms.iter().map(|a| a.0.clone()).collect() } else { Default::default() };
        loop {
            let inner = self.lock();
            let ids: Vec<String> = inner
                .hosts
                .range::<String, _>((from.clone(), Bound::Unbounded))
                .map(|(k, _)| k.clone())
                .take(LOCK_CHUNK)
                .collect();
            let Some(last) = ids.last() else { break };
            from = Bound::Excluded(last.clone());
            for id in &ids {
                let Some(e) = inner.hosts.get(id) else { continue };
                let ok = f.status.is_none_or(|s| s == e.row.status)
                    && f.liveness.is_none_or(|l| l == self.liveness_of(e, now))
                    && (!f.alarms_only || alarmed.contains(id))
                    && needle.as_deref().is_none_or(|n| {
                        id.to_lowercase().contains(n) || e.row.info.hostname.to_lowercase().contains(n)
                    });
                if !ok {
                    continue;
                }
                page.matching = page.matching.saturating_add(1);
                if after.is_some_and(|a| id.as_str() <= a) {
                    continue;
                }
                if page.rows.len() < limit {
                    page.rows.push(self.record(&inner, e, now));
                } else if page.next.is_none() {
                    page.next = page.rows.last().and_then(|r| r.info.as_ref()).map(|i| i.host_id.clone());
                }
            }
        }
        page
    }

    /// The current records of the guests `keys` names (host id, UUID), in
    /// that order; one that is gone is left out. A live page re-reads the
    /// rows it shows this way instead of running its filter again.
    pub fn guest_rows(&self, keys: &[(String, String)]) -> Vec<GuestRecord> {
        keys.iter()
            .filter_map(|(host, uuid)| {
                let (rows, _) = self.list_guests_page(Some(host), Some(uuid), false, None, 2).ok()?;
                rows.into_iter().find(|r| r.host_id == *host && r.guest.as_ref().is_some_and(|g| g.uuid == *uuid))
            })
            .collect()
    }

    /// Hosts by status and liveness names (the dashboard's summary).
    pub fn host_counts(&self) -> BTreeMap<(&'static str, &'static str), u32> {
        let now = self.now_ms();
        let mut out: BTreeMap<(&'static str, &'static str), u32> = BTreeMap::new();
        let inner = self.lock();
        for e in inner.hosts.values() {
            let n = out.entry((e.row.status.as_str(), self.liveness_of(e, now).as_str())).or_insert(0);
            *n = n.saturating_add(1);
        }
        out
    }

    /// Up to `limit` guests matching `f` after `after`, in the order of
    /// [`Registry::list_guests_page`] (whose pages it reads, a lock hold per
    /// 100 hosts), and where the next page starts.
    pub fn guests_page(
        &self,
        f: &GuestFilter,
        after: Option<&GuestCursor>,
        limit: usize,
    ) -> Result<(Vec<GuestRecord>, Option<GuestCursor>), ControllerError> {
        let limit = limit.max(1);
        let needle = f.name.as_deref().map(str::to_lowercase).filter(|n| !n.is_empty());
        let mut out = Vec::new();
        let mut cursor = after.cloned();
        loop {
            let (rows, next) =
                self.list_guests_page(f.host.as_deref(), None, false, cursor.as_ref(), GUEST_SCAN_STEP)?;
            for r in rows {
                let Some(g) = r.guest.as_ref() else { continue };
                let key = (r.host_id.clone(), g.name.clone(), g.uuid.clone());
                let ok = f.state.is_none_or(|s| s == g.state)
                    && f.owner.as_deref().is_none_or(|o| o == r.owner_host)
                    && needle
                        .as_deref()
                        .is_none_or(|n| g.name.to_lowercase().contains(n) || g.uuid.to_lowercase().contains(n));
                if ok {
                    if out.len() == limit {
                        let last = out.last().and_then(|r: &GuestRecord| {
                            r.guest.as_ref().map(|g| (r.host_id.clone(), g.name.clone(), g.uuid.clone()))
                        });
                        return Ok((out, last));
                    }
                    out.push(r);
                }
                cursor = Some(key);
            }
            if next.is_none() {
                return Ok((out, None));
            }
        }
    }
}

#[cfg(test)]
mod dashboard_listing_tests {
    use super::*;
    use crate::domain::host::Timing;

    fn reg_with(n: usize) -> Registry {
        let reg =
            Registry::load(crate::store::sqlite::SqliteRepos::start_in_memory().unwrap(), Timing::default()).unwrap();
        for i in 0..n {
            let (tx, _rx) = tokio::sync::mpsc::channel(1);
            reg.open_session(&format!("host-{i:04}"), "boot", tx).unwrap();
        }
        reg
    }

    #[test]
    fn hosts_are_paged_with_a_cursor_and_counted() {
        let reg = reg_with(250);
        let p = reg.hosts_page(&HostFilter::default(), None, 100);
        assert_eq!((p.rows.len(), p.matching), (100, 250));
        assert_eq!(p.next.as_deref(), Some("host-0099"));
        let p2 = reg.hosts_page(&HostFilter::default(), p.next.as_deref(), 100);
        assert_eq!(p2.rows[0].info.as_ref().unwrap().host_id, "host-0100");
        let p3 = reg.hosts_page(&HostFilter::default(), Some("host-0199"), 100);
        assert_eq!((p3.rows.len(), p3.next), (50, None));
        let f = HostFilter { name: Some("0007".into()), ..Default::default() };
        assert_eq!(reg.hosts_page(&f, None, 100).matching, 1);
        let f = HostFilter { status: Some(HostStatus::Maintenance), ..Default::default() };
        assert_eq!(reg.hosts_page(&f, None, 100).matching, 0);
        let counts = reg.host_counts();
        assert_eq!(counts.values().sum::<u32>(), 250);
    }

    #[test]
    fn guest_rows_reread_the_guests_named() {
        use lifeboat_proto::v1::{Guest, Inventory};
        let reg = reg_with(0);
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        let sid = reg.open_session("a", "boot", tx).unwrap();
        let g = |u: &str, n: &str, st: GuestState| Guest {
            uuid: u.into(),
            name: n.into(),
            state: st as i32,
            definition_xml: "<domain/>".into(),
            ..Default::default()
        };
        let guests = vec![g("u1", "vm1", GuestState::Running), g("u2", "u1", GuestState::Running)];
        reg.apply_inventory("a", sid, Inventory { host: None, guests, more: false }).unwrap();
        let keys = vec![("a".to_string(), "u1".to_string()), ("a".into(), "gone".into()), ("b".into(), "u1".into())];
        let rows = reg.guest_rows(&keys);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].guest.as_ref().unwrap().name, "vm1");
        reg.apply_guest("a", sid, g("u1", "vm1", GuestState::Shutoff)).unwrap();
        assert_eq!(reg.guest_rows(&keys)[0].guest.as_ref().unwrap().state, GuestState::Shutoff as i32);
        let f = GuestFilter { state: Some(GuestState::Shutoff as i32), ..Default::default() };
        assert_eq!(reg.guests_page(&f, None, 100).unwrap().0.len(), 1);
        let f = GuestFilter { name: Some("VM".into()), owner: Some("a".into()), ..Default::default() };
        assert_eq!(reg.guests_page(&f, None, 100).unwrap().0.len(), 1);
    }

    #[test]
    fn an_empty_registry_lists_nothing() {
        let reg = reg_with(0);
        let p = reg.hosts_page(&HostFilter::default(), None, 100);
        assert!(p.rows.is_empty() && p.next.is_none() && p.matching == 0);
        assert!(reg.guests_page(&GuestFilter::default(), None, 100).unwrap().0.is_empty());
    }
}

#[cfg(test)]
mod view_version_tests {
    use super::*;
    use crate::domain::host::Timing;
    use lifeboat_proto::v1::{Guest, Inventory};

    #[test]
    fn every_view_change_bumps_the_view_version() {
        let clock = crate::ports::ManualClock::new(1_000_000);
        let reg = Registry::load_with_clock(
            crate::store::sqlite::SqliteRepos::start_in_memory().unwrap(),
            Timing::default(),
            Arc::new(clock.clone()),
        )
        .unwrap();
        let g = |state: GuestState| Guest {
            uuid: "u1".into(),
            name: "vm1".into(),
            state: state as i32,
            definition_xml: "<domain/>".into(),
            ..Default::default()
        };
        let v = std::cell::Cell::new(reg.view_version());
        let moved = |what: &str, reg: &Registry| {
            let now = reg.view_version();
            assert_ne!(now, v.get(), "{what} did not move the view version");
            v.set(now);
        };
        let (tx, _rx) = tokio::sync::mpsc::channel(8);
        let sid = reg.open_session("a", "boot", tx).unwrap();
        moved("a session", &reg);
        reg.apply_inventory("a", sid, Inventory { host: None, guests: vec![g(GuestState::Running)], more: false })
            .unwrap();
        moved("an inventory", &reg);
        reg.apply_guest("a", sid, g(GuestState::Shutoff)).unwrap();
        moved("a guest change", &reg);
        reg.raise_alarm_blocking("a", "split-brain", "test").unwrap();
        moved("an alarm", &reg);
        reg.check_liveness();
        v.set(reg.view_version());
        clock.advance(600_000);
        let flipped = reg.check_liveness();
        assert!(!flipped.is_empty(), "{flipped:?}");
        moved("a liveness flip", &reg);
        reg.close_session("a", sid);
        moved("a session's end", &reg);
    }
}
