//! Floor 3 (adapter) of the registry: opening, superseding and closing agent
//! sessions, and sending commands over them through the [`super::bus`].
//!
//! Architecture invariant: one session per host; a newer session closes the
//! older one at once, and no command goes to a host two agents claim.

use super::*;

impl Registry {
    /// Registers a new session for an authenticated host; supersedes any
    /// older session of the same host.
    pub fn open_session(
        &self,
        host_id: &str,
        boot_id: &str,
        tx: mpsc::Sender<Box<ControllerMessage>>,
    ) -> Result<SessionId, ControllerError> {
        self.open_session_from(host_id, boot_id, tx, None).map(|(sid, _)| sid)
    }

    /// Like [`Registry::open_session`], for an agent that connected from
    /// `peer`. The returned receiver turns `true` when a later session
    /// supersedes this one: the caller must then stop reading and end the
    /// stream. When the superseded session was still alive (heard within the
    /// detection time) and came from another address, two agents claim one
    /// host: a `duplicate-agent` alarm names both.
    pub fn open_session_from(
        &self,
        host_id: &str,
        boot_id: &str,
        tx: mpsc::Sender<Box<ControllerMessage>>,
        peer: Option<std::net::SocketAddr>,
    ) -> Result<(SessionId, tokio::sync::watch::Receiver<bool>), ControllerError> {
        let now = self.now_ms();
        let (superseded, superseded_rx) = tokio::sync::watch::channel(false);
        let mut inner = self.lock();
        let generation = inner.next_generation;
        inner.next_generation = inner.next_generation.saturating_add(1);
        if !inner.hosts.contains_key(host_id) {
            let info = HostInfo { host_id: host_id.into(), boot_id: boot_id.into(), ..Default::default() };
            let stored = info.clone();
            inner.db(move |r| r.hosts().upsert(&stored, now))?;
            let row = HostRow {
                info,
                status: HostStatus::Available,
                first_seen_ms: now,
                last_seen_ms: now,
                status_reason: String::new(),
                fenced_boot_id: String::new(),
            };
            inner.hosts.insert(host_id.into(), HostEntry::new(row));
            info!(host = host_id, "new host registered");
        }
        inner.view_version.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let e = inner.hosts.get_mut(host_id).expect("inserted above");
        let mut duplicate = None;
        if let Some(old) = e.session.take() {
            let alive =
                e.last_heard_ms().is_some_and(|t| now.saturating_sub(t) <= i64::from(self.timing.unreachable_after_ms));
            let ips = (old.peer.map(|p| p.ip()), peer.map(|p| p.ip()));
            info!(host = host_id, old_peer = ?old.peer, new_peer = ?peer, "new session supersedes the previous one");
            if let (true, (Some(a), Some(b))) = (alive, ips)
                && a != b
            {
                duplicate = Some(duplicate_agent_detail(host_id, a, b));
            }
            let _ = old.superseded.send(true);
        }
        e.session = Some(SessionHandle { generation, tx, peer, superseded });
        e.heard = Arc::new(AtomicI64::new(now));
        e.dirty = true;
        e.inventory_seen = false;
        e.leases_sent = None;
        e.leases_issued_ms = 0;
        if e.uninventoried_since_ms == 0 {
            e.uninventoried_since_ms = now;
        }
        let ev = classify_return(e.row.status.as_str(), &e.row.info.boot_id, &e.row.fenced_boot_id, boot_id);
        if ev.rebooted {
            e.pending_boot_start = true;
        }
        if !boot_id.is_empty() {
            e.row.info.boot_id = boot_id.to_string();
        }
        let fenced_boot = e.row.fenced_boot_id.clone();
        if ev.returned_from_offline {
            let reason = if ev.same_boot_id {
                "returned with the boot id it had when fenced: it was never powered off (split brain)"
            } else {
                "returned after its guests were force-migrated away; quarantined until cleanup"
            };
            e.row.status = HostStatus::Maintenance;
            e.row.status_reason = reason.into();
            let a = AuditRow::by_controller(
                "host.returned",
                host_id,
                "",
                format!(
                    "{host_id} is back (boot id {boot_id}, fenced with {fenced_boot}): status MAINTENANCE; {reason}"
                ),
            );
            let h = host_id.to_string();
            inner.db(move |r| r.hosts().set_status(&h, HostStatus::Maintenance, reason, Some(&a)))?;
            inner.status_version = inner.status_version.wrapping_add(1);
            inner.view_version.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            warn!(host = host_id, "{reason}");
            if ev.same_boot_id {
                let detail = format!(
                    "{host_id} came back with boot id {boot_id}, the one it had when it was fenced: it never powered off; every guest moved away from it is kept from running there"
                );
                Self::raise_locked(&mut inner, host_id, "split-brain", &detail)?;
            }
        }
        if let Some(detail) = duplicate {
            Self::raise_locked(&mut inner, host_id, "duplicate-agent", &detail)?;
        }
        self.decide_grant_at_open(&mut inner, host_id, now);
        Ok((SessionId(generation), superseded_rx))
    }

    /// Ends a session (if it is still the current one).
    pub fn close_session(&self, host_id: &str, sid: SessionId) {
        let mut inner = self.lock();
        if let Some(e) = inner.hosts.get_mut(host_id)
            && e.session.as_ref().map(|s| s.generation) == Some(sid.0)
        {
            e.session = None;
            let seen = e.last_heard_ms().unwrap_or(0);
            inner.view_version.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let seen = vec![(host_id.to_string(), seen)];
            let _ = inner.db(move |r| r.hosts().touch(&seen));
        }
    }

    pub(super) fn current<'a>(inner: &'a mut Inner, host_id: &str, sid: SessionId) -> Option<&'a mut HostEntry> {
        inner.hosts.get_mut(host_id).filter(|e| e.session.as_ref().map(|s| s.generation) == Some(sid.0))
    }

    /// The cell a session's reader task stores "heard now" into, without
    /// the registry lock (`None` if the session was superseded).
    pub fn heard_cell(&self, host_id: &str, sid: SessionId) -> Option<Arc<AtomicI64>> {
        Self::current(&mut self.lock(), host_id, sid).map(|e| e.heard.clone())
    }

    /// Whether the host has an open agent session.
    pub fn has_session(&self, host_id: &str) -> bool {
        self.lock().hosts.get(host_id).is_some_and(|e| e.session.is_some())
    }

    /// Sends every later command under `l` (etcd backend): each carries its
    /// epoch, and none is sent once it no longer holds.
    pub fn set_leadership(&self, l: Arc<crate::ha::Leadership>) {
        self.bus.set_leadership(l);
    }

    /// The fencing epoch this controller commands with (0 with SQLite).
    pub fn epoch(&self) -> u64 {
        self.bus.epoch()
    }

    /// Whether this controller may command agents now (SQLite: always;
    /// etcd: while its leadership holds).
    pub fn leads(&self) -> bool {
        self.bus.may_send()
    }

    /// Sends a command to a host's agent over its session and waits for
    /// the result. Refused, with nothing sent, when this controller no
    /// longer leads.
    pub async fn call(&self, host_id: &str, kind: Kind, timeout: Duration) -> Result<CommandResult, ControllerError> {
        self.call_as(host_id, kind, timeout, false).await
    }

    /// [`Registry::call`] for a command whose result depends on nothing the
    /// agent reports (the reconciler's lease grant): the session's reader
    /// takes that result in as soon as it reads it, ahead of messages the
    /// agent sent before it (an inventory waiting its turn), so the caller
    /// does not wait out its timeout behind them.
    pub async fn call_unordered(
        &self,
        host_id: &str,
        kind: Kind,
        timeout: Duration,
    ) -> Result<CommandResult, ControllerError> {
        self.call_as(host_id, kind, timeout, true).await
    }

    /// Whether the result of command `id` from `host`'s session may be taken
    /// in ahead of what the agent sent before it ([`Registry::call_unordered`]).
    pub fn answers_unordered(&self, host: &str, id: &str) -> bool {
        self.bus.unordered(host, id)
    }

    async fn call_as(
        &self,
        host_id: &str,
        kind: Kind,
        timeout: Duration,
        unordered: bool,
    ) -> Result<CommandResult, ControllerError> {
        let (tx, mut ended) = {
            let inner = self.lock();
            let e = inner.hosts.get(host_id).ok_or_else(|| ControllerError::UnknownHost {
                host: host_id.into(),
                known: inner.hosts.keys().cloned().collect(),
            })?;
            if Self::suspect(&inner, host_id) {
                return Err(ControllerError::AgentUnavailable(format!(
                    "two agents claim to be '{host_id}' (duplicate-agent alarm): no command is sent to it until the second agent \
                     is found and the alarm cleared (`lifeboat alarms`, then `lifeboat alarms clear --host {host_id} --kind duplicate-agent`)"
                )));
            }
            match &e.session {
                Some(s) => (s.tx.clone(), s.superseded.subscribe()),
                None => {
                    return Err(ControllerError::AgentUnavailable(format!(
                        "host '{host_id}' has no open agent session"
                    )));
                }
            }
        };
        let id = uuid::Uuid::new_v4().to_string();
        // Checked last before the send: a leader whose deadline passed while
        // it waited must not command (another may lead by now).
        if !self.bus.may_send() {
            return Err(ControllerError::AgentUnavailable(format!(
                "not sent to '{host_id}': this controller no longer leads (its etcd leadership lapsed or was lost)"
            )));
        }
        let orx = self.bus.expect(&id, host_id, unordered);
        let msg = ControllerMessage {
            msg: Some(controller_message::Msg::Command(Command {
                id: id.clone(),
                kind: Some(kind),
                epoch: self.bus.epoch(),
            })),
        };
        let sent = tx.send(Box::new(msg)).await.is_ok();
        let r = if !sent {
            Err(ControllerError::AgentUnavailable(format!("the session to '{host_id}' closed")))
        } else {
            // A session replaced or closed meanwhile never answers: fail at
            // once, so the caller retries on the new session instead of
            // waiting out the timeout (seen after a healed partition).
            tokio::select! {
                r = tokio::time::timeout(timeout, orx) => match r {
                    Ok(Ok(r)) => Ok(r),
                    Ok(Err(_)) => Err(ControllerError::AgentUnavailable(format!("the session to '{host_id}' closed"))),
                    Err(_) => Err(ControllerError::AgentUnavailable(format!("'{host_id}' did not answer within {timeout:?}"))),
                },
                _ = ended.wait_for(|s| *s) => {
                    Err(ControllerError::AgentUnavailable(format!("the session to '{host_id}' was replaced or closed before it answered")))
                }
            }
        };
        self.bus.forget(&id);
        r
    }

    /// A command result arrived.
    pub fn complete(&self, r: CommandResult) {
        self.bus.complete(r);
    }

    /// A command result arrived from `host`'s session: it completes only a
    /// command sent to `host`. `Some(false)`: the id awaits another host's
    /// answer (nothing done); `None`: no command awaits it (answered, timed
    /// out, or never sent; nothing done).
    pub fn complete_from(&self, host: &str, r: CommandResult) -> Option<bool> {
        self.bus.complete_from(host, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn commands_carry_the_epoch_and_none_is_sent_once_the_leadership_no_longer_holds() {
        let reg = Arc::new(
            Registry::load(crate::store::sqlite::SqliteRepos::start_in_memory().unwrap(), Timing::default()).unwrap(),
        );
        assert_eq!(reg.epoch(), 0, "SQLite: epoch 0");
        assert!(reg.leads());
        let (tx, mut rx) = mpsc::channel(4);
        reg.open_session("a", "boot", tx).unwrap();
        let l = Arc::new(crate::ha::Leadership::new(
            b"k".to_vec(),
            42,
            Duration::from_secs(60),
            tokio::time::Instant::now(),
        ));
        reg.set_leadership(l.clone());
        let answer = {
            let reg = reg.clone();
            tokio::spawn(async move {
                let m = rx.recv().await.unwrap();
                let Some(controller_message::Msg::Command(c)) = m.msg else { panic!("a command") };
                reg.complete(CommandResult { id: c.id.clone(), ..Default::default() });
                (c.epoch, rx)
            })
        };
        reg.call("a", Kind::CheckPaths(Default::default()), Duration::from_secs(5)).await.unwrap();
        let (epoch, mut rx) = answer.await.unwrap();
        assert_eq!(epoch, 42, "the command carries the leadership's epoch");
        l.lose("compare failed");
        let e = reg.call("a", Kind::CheckPaths(Default::default()), Duration::from_millis(100)).await.unwrap_err();
        assert!(e.to_string().contains("no longer leads"), "{e}");
        assert!(rx.try_recv().is_err(), "nothing was sent");
        assert!(!reg.leads());
    }
}
