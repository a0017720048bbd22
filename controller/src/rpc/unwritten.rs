//! Agents' observations the database could not take yet.
//!
//! A message that passed the intake but could not be written (the database
//! refused the statement: a full disk, a read-only or failing filesystem) is
//! not dropped: a guest shut down from inside while the disk was full must
//! still read "stopped" afterwards, or a later boot start would start it
//! again. Each session keeps such observations in order and applies them
//! again, with a backoff, until they are written; while some wait, newer ones
//! queue behind them so none is applied out of order. A complete inventory
//! supersedes what waits (it is newer than all of it); an inventory that
//! cannot be written is not kept, because the agent sends a whole one every
//! resync interval (30 s) anyway.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use lifeboat_proto::v1::{Guest, HostInfo, Inventory};
use tracing::{info, warn};

use crate::error::ControllerError;
use crate::registry::{Registry, SessionId};

/// Most observations one session keeps waiting. Past it the oldest are
/// dropped (logged with a count); the agent's next inventory brings the view
/// back, though a guest's "stopped from inside" among the dropped is lost.
pub const MAX_UNWRITTEN: usize = 10_000;

/// Most bytes (encoded) of observations one session keeps waiting; past it
/// the oldest are dropped, as past [`MAX_UNWRITTEN`].
pub const MAX_UNWRITTEN_BYTES: usize = 64 * 1024 * 1024;

/// Longest wait between two tries to write what waits.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

/// First wait after a failed write.
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(200);

/// An agent's observation that passed the intake, ready for the registry.
#[derive(Debug, Clone)]
pub enum Observation {
    /// A complete inventory (all its pages).
    Inventory(Box<Inventory>),
    /// One guest appeared or changed.
    Guest(Box<Guest>),
    /// One guest was undefined (its UUID).
    Removed(String),
    /// The host's facts changed.
    Host(Box<HostInfo>),
}

impl Observation {
    fn bytes(&self) -> usize {
        match self {
            Observation::Inventory(i) => prost::Message::encoded_len(i.as_ref()),
            Observation::Guest(g) => prost::Message::encoded_len(g.as_ref()).saturating_add(g.definition_xml.len()),
            Observation::Removed(u) => u.len(),
            Observation::Host(h) => prost::Message::encoded_len(h.as_ref()),
        }
    }

    fn apply(self, reg: &Registry, host: &str, sid: SessionId) -> Result<(), ControllerError> {
        match self {
            Observation::Inventory(inv) => reg.apply_inventory(host, sid, *inv).map(|_| ()),
            Observation::Guest(g) => reg.apply_guest(host, sid, *g),
            Observation::Removed(uuid) => reg.remove_guest(host, sid, &uuid),
            Observation::Host(h) => reg.apply_host(host, sid, *h),
        }
    }
}

/// Applies one observation with no queue (tests and tools): a refused
/// write is returned as an error.
pub fn apply_once(reg: &Registry, host: &str, sid: SessionId, obs: Observation) -> Result<(), ControllerError> {
    obs.apply(reg, host, sid)
}

/// Whether an error is the database refusing a write (retried), not a
/// record or request that cannot be used (reported, not retried).
pub fn is_write_failure(e: &ControllerError) -> bool {
    match e {
        ControllerError::Storage(s) => s.is_write_failure(),
        ControllerError::Repo(r) => r.is_write_failure(),
        _ => false,
    }
}

/// One session's observations waiting for the database.
#[derive(Debug, Default)]
pub struct Unwritten {
    queue: VecDeque<Observation>,
    bytes: usize,
    delay: Duration,
    next_try: Option<Instant>,
    dropped: u64,
    since: Option<Instant>,
}

impl Unwritten {
    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// How many observations wait.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// When the next try is due (`None`: nothing waits).
    pub fn next_try(&self) -> Option<Instant> {
        self.next_try.filter(|_| !self.queue.is_empty())
    }

    /// Applies `obs` (after everything that waits), keeping it if the
    /// database refuses it. Errors other than a refused write are returned
    /// and the observation is not kept (retrying would not help).
    pub fn apply(
        &mut self,
        reg: &Registry,
        host: &str,
        sid: SessionId,
        obs: Observation,
        now: Instant,
    ) -> Result<(), ControllerError> {
        if let Observation::Inventory(_) = obs {
            // Older observations first, now (whether or not their backoff is
            // over: a "stopped from inside" must not be superseded unwritten).
            // If they still cannot be written the inventory (newer than all of
            // them) replaces them when it can.
            self.next_try = None;
            self.retry(reg, host, sid, now);
            let r = obs.apply(reg, host, sid);
            match &r {
                Ok(()) if !self.queue.is_empty() => {
                    info!(
                        host,
                        superseded = self.queue.len(),
                        "a complete inventory was written: it replaces the observations that waited"
                    );
                    self.clear();
                }
                Err(e) if is_write_failure(e) => {
                    warn!(
                        host,
                        "an inventory could not be written ({e}); the agent sends a whole one again within 30 s"
                    );
                    self.failed(now);
                }
                _ => {}
            }
            return r;
        }
        if self.queue.is_empty() {
            let keep = obs.clone();
            return match obs.apply(reg, host, sid) {
                Err(e) if is_write_failure(&e) => {
                    warn!(
                        host,
                        "an agent's observation could not be written ({e}); kept, and written when the database takes writes again"
                    );
                    self.push(host, keep);
                    self.failed(now);
                    Ok(())
                }
                r => r,
            };
        }
        self.push(host, obs);
        self.retry(reg, host, sid, now);
        Ok(())
    }

    /// Tries to write what waits, in order, if a try is due.
    pub fn retry(&mut self, reg: &Registry, host: &str, sid: SessionId, now: Instant) {
        if self.next_try.is_some_and(|t| now < t) {
            return;
        }
        let mut written = 0usize;
        while let Some(obs) = self.queue.pop_front() {
            self.bytes = self.bytes.saturating_sub(obs.bytes());
            let keep = obs.clone();
            match obs.apply(reg, host, sid) {
                Ok(()) => written = written.saturating_add(1),
                Err(e) if is_write_failure(&e) => {
                    self.bytes = self.bytes.saturating_add(keep.bytes());
                    self.queue.push_front(keep);
                    self.failed(now);
                    return;
                }
                // Not the database's refusal: this one will never apply.
                Err(e) => warn!(host, "an observation that waited could not be applied and is dropped: {e}"),
            }
        }
        if written > 0 || self.dropped > 0 {
            let waited_ms =
                self.since.map(|s| u64::try_from(now.saturating_duration_since(s).as_millis()).unwrap_or(u64::MAX));
            info!(
                host,
                written,
                dropped = self.dropped,
                ?waited_ms,
                "the database takes writes again: observations that waited are written"
            );
        }
        self.clear();
    }

    fn push(&mut self, host: &str, obs: Observation) {
        let n = obs.bytes();
        while !self.queue.is_empty()
            && (self.queue.len() >= MAX_UNWRITTEN || self.bytes.saturating_add(n) > MAX_UNWRITTEN_BYTES)
        {
            if let Some(old) = self.queue.pop_front() {
                self.bytes = self.bytes.saturating_sub(old.bytes());
            }
            self.dropped = self.dropped.saturating_add(1);
            if self.dropped == 1 {
                warn!(
                    host,
                    "more than {MAX_UNWRITTEN} observations wait for the database: the oldest are dropped (the agent's next inventory brings the view back)"
                );
            }
        }
        self.bytes = self.bytes.saturating_add(n);
        self.queue.push_back(obs);
    }

    fn failed(&mut self, now: Instant) {
        self.since.get_or_insert(now);
        self.delay =
            if self.delay.is_zero() { FIRST_RETRY_DELAY } else { self.delay.saturating_mul(2).min(MAX_RETRY_DELAY) };
        self.next_try = now.checked_add(self.delay);
    }

    fn clear(&mut self) {
        self.queue.clear();
        self.bytes = 0;
        self.delay = Duration::ZERO;
        self.next_try = None;
        self.dropped = 0;
        self.since = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::host::Timing;
    use lifeboat_proto::v1::GuestState;
    use tokio::sync::mpsc;

    const U: &str = "0b5c2d6e-1f00-4a1a-9c3e-000000000001";

    fn guest(state: GuestState, reason: &str) -> Guest {
        Guest {
            uuid: U.into(),
            name: "vm1".into(),
            state: state as i32,
            state_reason: reason.into(),
            ..Default::default()
        }
    }

    /// A registry with host "h" on a session.
    fn session() -> (Registry, SessionId, mpsc::Receiver<Box<lifeboat_proto::v1::ControllerMessage>>) {
        let reg =
            Registry::load(crate::store::sqlite::SqliteRepos::start_in_memory().unwrap(), Timing::default()).unwrap();
        let (tx, rx) = mpsc::channel(1);
        let sid = reg.open_session("h", "boot", tx).unwrap();
        (reg, sid, rx)
    }

    fn desired(reg: &Registry) -> Option<(String, String)> {
        reg.repos().call_blocking(move |r| r.ownership().desired()).unwrap().get(U).cloned().map(|d| (d.host, d.state))
    }

    #[test]
    fn a_guest_stopped_while_the_database_refuses_writes_reads_stopped_once_it_takes_them_again() {
        let (reg, sid, _rx) = session();
        let t0 = Instant::now();
        let mut un = Unwritten::default();
        un.apply(&reg, "h", sid, Observation::Guest(Box::new(guest(GuestState::Running, "booted"))), t0).unwrap();
        assert_eq!(desired(&reg), Some(("h".into(), "running".into())));

        reg.repos().call_blocking(move |r| r.maintenance().set_read_only(true)).unwrap();
        // Shut down from inside, then its facts change again: both kept, in order.
        un.apply(&reg, "h", sid, Observation::Guest(Box::new(guest(GuestState::Shutoff, "shutdown"))), t0).unwrap();
        let mut later = guest(GuestState::Shutoff, "shutdown");
        later.vcpus = 2;
        un.apply(&reg, "h", sid, Observation::Guest(Box::new(later)), t0).unwrap();
        assert_eq!(un.len(), 2);
        assert!(un.next_try().is_some_and(|t| t > t0), "a try is planned after a backoff");
        // Still refused at the planned time: kept, the backoff grows.
        let first = un.next_try().unwrap();
        un.retry(&reg, "h", sid, first);
        assert_eq!(un.len(), 2);
        assert!(un.next_try().unwrap().saturating_duration_since(first) > first.saturating_duration_since(t0));

        reg.repos().call_blocking(move |r| r.maintenance().set_read_only(false)).unwrap();
        let due = un.next_try().unwrap();
        un.retry(&reg, "h", sid, due - Duration::from_millis(1));
        assert_eq!(un.len(), 2, "nothing is tried before it is due");
        un.retry(&reg, "h", sid, due);
        assert!(un.is_empty() && un.next_try().is_none());
        assert_eq!(desired(&reg), Some(("h".into(), "stopped".into())), "the shutdown from inside was not lost");
        let stored = reg.repos().call_blocking(move |r| r.guests().all()).unwrap();
        assert_eq!(stored[0].guest.vcpus, 2, "the later observation was applied after the earlier one");
    }

    #[test]
    fn a_complete_inventory_supersedes_what_waits_and_one_that_is_refused_is_not_kept() {
        let (reg, sid, _rx) = session();
        let t0 = Instant::now();
        let mut un = Unwritten::default();
        reg.repos().call_blocking(move |r| r.maintenance().set_read_only(true)).unwrap();
        un.apply(&reg, "h", sid, Observation::Guest(Box::new(guest(GuestState::Running, "booted"))), t0).unwrap();
        let inv = || {
            Observation::Inventory(Box::new(Inventory {
                host: None,
                guests: vec![guest(GuestState::Paused, "user")],
                more: false,
            }))
        };
        let e = un.apply(&reg, "h", sid, inv(), t0).unwrap_err();
        assert!(is_write_failure(&e), "{e}");
        assert_eq!(un.len(), 1, "the refused inventory is not kept; the earlier event still waits");
        reg.repos().call_blocking(move |r| r.maintenance().set_read_only(false)).unwrap();
        un.apply(&reg, "h", sid, inv(), t0).unwrap();
        assert!(un.is_empty());
        assert_eq!(
            reg.repos().call_blocking(move |r| r.guests().all()).unwrap()[0].guest.state,
            GuestState::Paused as i32
        );
    }

    #[test]
    fn an_inventory_before_the_retry_is_due_writes_what_waits_first() {
        let (reg, sid, _rx) = session();
        let t0 = Instant::now();
        let mut un = Unwritten::default();
        un.apply(&reg, "h", sid, Observation::Guest(Box::new(guest(GuestState::Running, "booted"))), t0).unwrap();
        reg.repos().call_blocking(move |r| r.maintenance().set_read_only(true)).unwrap();
        un.apply(&reg, "h", sid, Observation::Guest(Box::new(guest(GuestState::Shutoff, "shutdown"))), t0).unwrap();
        reg.repos().call_blocking(move |r| r.maintenance().set_read_only(false)).unwrap();
        // The agent's resync arrives before the backoff is over.
        let soon = t0 + Duration::from_millis(1);
        assert!(un.next_try().is_some_and(|t| t > soon));
        let inv = Inventory { host: None, guests: vec![guest(GuestState::Shutoff, "")], more: false };
        un.apply(&reg, "h", sid, Observation::Inventory(Box::new(inv)), soon).unwrap();
        assert!(un.is_empty());
        assert_eq!(
            desired(&reg),
            Some(("h".into(), "stopped".into())),
            "the shutdown was written before the inventory"
        );
    }

    #[test]
    fn the_queue_is_bounded() {
        let (reg, sid, _rx) = session();
        reg.repos().call_blocking(move |r| r.maintenance().set_read_only(true)).unwrap();
        let mut un = Unwritten::default();
        let now = Instant::now();
        for _ in 0..MAX_UNWRITTEN + 5 {
            un.apply(
                &reg,
                "h",
                sid,
                Observation::Host(Box::new(HostInfo { host_id: "h".into(), ..Default::default() })),
                now,
            )
            .unwrap();
        }
        assert_eq!(un.len(), MAX_UNWRITTEN);
        let mut un = Unwritten::default();
        let big = || {
            let mut g = guest(GuestState::Running, "booted");
            g.definition_xml = "x".repeat(1024 * 1024);
            Observation::Guest(Box::new(g))
        };
        for _ in 0..100 {
            un.apply(&reg, "h", sid, big(), now).unwrap();
        }
        assert!(un.len() < 64 && un.bytes <= MAX_UNWRITTEN_BYTES, "{} kept, {} bytes", un.len(), un.bytes);
    }
}
