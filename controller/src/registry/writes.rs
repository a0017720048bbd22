//! The registry's writes for async callers (engine, operations, reconciler,
//! RPC): the write is awaited on the store thread first, and only then is
//! the registry lock taken to update memory. The lock is never held across
//! an await, and memory never shows what is not stored.
//!
//! Architecture invariant: memory follows the store's order, not the order
//! tasks wake in. Each kind of state (owners, alarms, host statuses) has a
//! version every change in memory bumps; an async writer applies its own
//! change only if the version is the one it saw before it wrote, and
//! otherwise reads the state back from the store (whose queue is FIFO)
//! and applies that.

use super::*;

impl Registry {
    /// Raises an alarm (logged at ERROR, stored, audited) unless already active.
    pub async fn raise_alarm(&self, host: &str, kind: &str, detail: &str) -> RepoResult<()> {
        let (h, k, d) = (host.to_string(), kind.to_string(), detail.to_string());
        let asked = self.lock().alarms_version;
        let raised = self
            .repos
            .call(move |r| {
                let new = r.alarms().raise(&h, &k, &d)?;
                if new {
                    r.audit().append(&AuditRow::by_controller(&format!("alarm.{k}"), &h, "", d))?;
                }
                Ok(new)
            })
            .await?;
        if raised {
            tracing::error!(host, kind, "ALARM: {detail}");
            {
                let mut inner = self.lock();
                if inner.alarms_version == asked {
                    if !inner.alarms.iter().any(|a| a.0 == host && a.1 == kind && a.2 == detail) {
                        inner.alarms.push((host.into(), kind.into(), detail.into()));
                    }
                    inner.alarms_version = inner.alarms_version.wrapping_add(1);
                    inner.view_version.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return Ok(());
                }
            }
            return self.reload_alarms().await;
        }
        Ok(())
    }

    /// Clears one alarm because its cause is gone (audited with `why`).
    pub async fn clear_alarm_by_cause(&self, host: &str, kind: &str, detail: &str, why: &str) -> RepoResult<()> {
        let (h, k, d) = (host.to_string(), kind.to_string(), detail.to_string());
        let a = AuditRow::by_controller("alarm.cleared", host, "", format!("{kind} alarm cleared: {why} ({detail})"));
        let asked = self.lock().alarms_version;
        self.repos
            .call(move |r| {
                if r.alarms().clear_one(&h, &k, &d)? > 0 {
                    r.audit().append(&a)?;
                }
                Ok(())
            })
            .await?;
        {
            let mut inner = self.lock();
            if inner.alarms_version == asked {
                inner.alarms.retain(|a| !(a.0 == host && a.1 == kind && a.2 == detail));
                inner.alarms_version = inner.alarms_version.wrapping_add(1);
                inner.view_version.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Ok(());
            }
        }
        self.reload_alarms().await
    }

    /// Re-reads active alarms from the store.
    ///
    /// Like [`Registry::refresh_owners`]: a list read before a later change
    /// in memory is read again, and after a few tries the read and the apply
    /// run under the lock.
    pub async fn reload_alarms(&self) -> RepoResult<()> {
        for _ in 0..8 {
            let asked = self.lock().alarms_version;
            let rows = self.repos.call(|r| r.alarms().list(false)).await?;
            let mut inner = self.lock();
            if inner.alarms_version != asked {
                continue;
            }
            inner.alarms = rows.into_iter().map(|a| (a.host, a.kind, a.detail)).collect();
            inner.alarms_version = inner.alarms_version.wrapping_add(1);
            inner.view_version.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(());
        }
        self.reload_alarms_blocking()
    }

    /// Re-reads ownership records (after a move step changed them).
    ///
    /// The read and the apply are not under one lock (the read awaits the
    /// store thread), so a snapshot is applied only if nothing changed the
    /// owners in memory since it was asked for; otherwise it may predate
    /// that change (two jobs' refreshes finishing out of order, an
    /// inventory's rebuilt owner) and is read again. After a few tries the
    /// read and the apply run under the lock, as the blocking form does.
    pub async fn refresh_owners(&self) -> RepoResult<()> {
        for _ in 0..8 {
            let asked = self.lock().owners_version;
            let rows = self.repos.call(|r| r.ownership().owners()).await?;
            let owners: BTreeMap<String, OwnerRow> = rows.into_iter().map(|o| (o.uuid.clone(), o)).collect();
            let mut inner = self.lock();
            if inner.owners_version != asked {
                continue;
            }
            inner.owners_by_host = by_host(owners.values().map(|o| (o.host.as_str(), o.uuid.as_str())));
            inner.owners = owners;
            inner.owners_version = inner.owners_version.wrapping_add(1);
            inner.view_version.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            for e in inner.hosts.values_mut() {
                e.dirty = true;
            }
            return Ok(());
        }
        self.refresh_owners_blocking()
    }

    /// Sets a host's status (checks are the caller's), audited.
    pub async fn set_status(
        &self,
        host_id: &str,
        status: HostStatus,
        reason: &str,
        actor: &str,
    ) -> Result<(), ControllerError> {
        let old = {
            let inner = self.lock();
            match inner.hosts.get(host_id) {
                Some(e) => e.row.status,
                None => {
                    return Err(ControllerError::UnknownHost {
                        host: host_id.into(),
                        known: inner.hosts.keys().cloned().collect(),
                    });
                }
            }
        };
        let a = AuditRow {
            actor: actor.into(),
            action: "host.status".into(),
            host: host_id.into(),
            detail: format!(
                "{old} -> {status}{}",
                if reason.is_empty() { String::new() } else { format!(": {reason}") }
            ),
            ..Default::default()
        };
        let (h, why) = (host_id.to_string(), reason.to_string());
        let asked = self.lock().status_version;
        self.repos.call(move |r| r.hosts().set_status(&h, status, &why, Some(&a))).await?;
        for _ in 0..8 {
            let st = {
                let mut inner = self.lock();
                if inner.status_version == asked {
                    if let Some(e) = inner.hosts.get_mut(host_id) {
                        e.row.status = status;
                        e.row.status_reason = reason.into();
                        e.dirty = true;
                        inner.view_version.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    inner.status_version = inner.status_version.wrapping_add(1);
                    inner.view_version.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return Ok(());
                }
                inner.status_version
            };
            // Another status change reached memory meanwhile: what the store
            // holds now (its queue is FIFO) is what memory must show.
            let h = host_id.to_string();
            let Some(row) = self.repos.call(move |r| r.hosts().get(&h)).await? else { return Ok(()) };
            let mut inner = self.lock();
            if inner.status_version == st {
                if let Some(e) = inner.hosts.get_mut(host_id) {
                    e.row.status = row.status;
                    e.row.status_reason = row.status_reason;
                    e.dirty = true;
                    inner.view_version.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                inner.status_version = inner.status_version.wrapping_add(1);
                inner.view_version.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Ok(());
            }
        }
        // Still racing: read and apply under the lock, as the blocking form does.
        let mut inner = self.lock();
        let h = host_id.to_string();
        if let Some(row) = inner.db(move |r| r.hosts().get(&h))?
            && let Some(e) = inner.hosts.get_mut(host_id)
        {
            e.row.status = row.status;
            e.row.status_reason = row.status_reason;
            e.dirty = true;
            inner.view_version.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        inner.status_version = inner.status_version.wrapping_add(1);
        inner.view_version.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Records the boot id a host has as it is fenced.
    pub async fn mark_fenced(&self, host_id: &str) -> RepoResult<()> {
        let boot = self.lock().hosts.get(host_id).map(|e| e.row.info.boot_id.clone()).unwrap_or_default();
        let (h, b) = (host_id.to_string(), boot.clone());
        self.repos.call(move |r| r.hosts().set_fenced_boot_id(&h, &b)).await?;
        if let Some(e) = self.lock().hosts.get_mut(host_id) {
            e.row.fenced_boot_id = boot;
        }
        Ok(())
    }

    /// Raises `kind` for `host`, or, when one is active, replaces its detail:
    /// one alarm per host and kind, showing the latest occurrence.
    pub async fn raise_or_refresh_alarm(&self, host: &str, kind: &str, detail: &str) -> RepoResult<()> {
        let (h, k, d) = (host.to_string(), kind.to_string(), detail.to_string());
        let asked = self.lock().alarms_version;
        if self.repos.call(move |r| r.alarms().refresh(&h, &k, &d)).await? {
            {
                let mut inner = self.lock();
                if inner.alarms_version == asked {
                    if let Some(a) = inner.alarms.iter_mut().find(|a| a.0 == host && a.1 == kind) {
                        a.2 = detail.to_string();
                    }
                    inner.alarms_version = inner.alarms_version.wrapping_add(1);
                    inner.view_version.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return Ok(());
                }
            }
            return self.reload_alarms().await;
        }
        self.raise_alarm(host, kind, detail).await
    }

    /// Records a missing guest's owner before it is defined there (desired
    /// state with it), audited; the in-memory view follows.
    pub async fn record_restore_owner(&self, o: &OwnerRow, desired: &str, audit: &AuditRow) -> RepoResult<()> {
        let (row, d, a) = (o.clone(), desired.to_string(), audit.clone());
        self.repos.call(move |r| r.ownership().record_restore_owner(&row, &d, &a)).await?;
        self.lock().desired.insert(o.uuid.clone(), (o.host.clone(), desired.to_string()));
        self.refresh_owners().await
    }

    /// Persists last-heard times, a chunk of hosts per store call.
    pub async fn flush(&self) -> RepoResult<()> {
        let seen: Vec<(String, i64)> =
            self.lock().hosts.iter().filter_map(|(id, e)| e.last_heard_ms().map(|t| (id.clone(), t))).collect();
        let t0 = std::time::Instant::now();
        for chunk in seen.chunks(LOCK_CHUNK) {
            let chunk = chunk.to_vec();
            self.repos.call(move |r| r.hosts().touch(&chunk)).await?;
        }
        tracing::debug!(
            hosts = seen.len(),
            took_ms = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX),
            "last-seen times persisted"
        );
        Ok(())
    }

    /// Empties the database's write-ahead log (every 30 s from
    /// [`watch_liveness`]): SQLite's own checkpoints copy it but leave the
    /// file at its largest size, which a small disk may not have twice.
    /// A failure is logged and tried again next time.
    pub async fn checkpoint(&self) {
        match self.repos.call(|r| r.maintenance().checkpoint()).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::debug!("WAL checkpoint incomplete: a reader still needs part of it; tried again in 30 s")
            }
            Err(e) => warn!("WAL checkpoint failed: {e}; tried again in 30 s"),
        }
    }
}
