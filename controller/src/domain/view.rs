//! Floor 1 (domain, pure): the values the planner and the reconciler read.
//! The in-memory view (`crate::registry`) builds them under its lock and
//! hands them out as copies; the planner (`crate::migrate::plan`) and the
//! reconciler (`crate::reconcile::decide`) decide on them without calling
//! back into the view.
//!
//! Architecture invariant: these are plain values with no handle to the
//! registry, the store or a session; whoever holds one cannot change the view
//! through it.

use std::collections::{BTreeMap, BTreeSet};

use lifeboat_proto::v1::Guest;

use crate::domain::host::{HostStatus, Liveness};

/// A host as the planner sees it.
#[derive(Debug, Clone)]
pub struct HostView {
    /// Host id.
    pub id: String,
    /// Operators' status.
    pub status: HostStatus,
    /// Whether we hear from it.
    pub liveness: Liveness,
    /// How long it has been silent, in ms (`None`: talking now).
    pub silent_ms: Option<u64>,
    /// Physical memory in KiB.
    pub memory_total_kib: u64,
    /// Memory of the guests running there, KiB.
    pub running_memory_kib: u64,
    /// qemu.conf lock manager.
    pub lock_manager: String,
    /// Guests defined there (for UUID/name conflicts); filled in only for
    /// the source and the hosts whose disk visibility is checked.
    pub guests: Vec<Guest>,
}

/// Who owns a guest that a host reports, as far as the controller can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnerView {
    /// Another host owns it: a copy here that holds its disk must stop.
    Other {
        /// The owner.
        host: String,
        /// From an ownership record (a move); `false`: the owner is the host
        /// that first reported the guest and reports it holding its disk now.
        recorded: bool,
    },
    /// Cannot tell (the first host to report it is silent, so whether it
    /// still runs there is unknown; or reported generations conflict): no
    /// lease here, no start, no stop; an alarm says why.
    Unsure,
}

/// What the reconciler sees of one connected host.
#[derive(Debug, Clone)]
pub struct HostSnapshot {
    /// Host id.
    pub host: String,
    /// Operators' status.
    pub status: HostStatus,
    /// An inventory arrived in this session: the guest list is what the host
    /// reports now, not what it reported before (the database's copy).
    pub inventory_seen: bool,
    /// Came back from a normal reboot; guests that should run are not started yet.
    pub pending_boot_start: bool,
    /// When leases were last sent this session, and for which guests at
    /// which ownership generations (sorted by UUID).
    pub leases_sent: Option<(i64, Vec<(String, u64)>)>,
    /// When its first session without an applied inventory opened (Unix ms;
    /// reconnecting does not move it; 0 once an inventory is applied).
    pub uninventoried_since_ms: i64,
    /// Guests the host reports.
    pub guests: Vec<Guest>,
    /// Reported guests this host does not own (absent: its own).
    pub owners: BTreeMap<String, OwnerView>,
    /// Desired state per guest this host owns (filled in for a boot start).
    pub desired: BTreeMap<String, String>,
    /// Guests recorded as owned by this host that it does not report (yet):
    /// (uuid, name). A move writes the owner before the define.
    pub owned_unreported: Vec<(String, String)>,
    /// Ownership generation per guest (0 = never moved by Lifeboat).
    pub generations: BTreeMap<String, u64>,
    /// Guests an active job is moving away from this host: left alone (no
    /// lease, no stop, no start); the job does each step itself.
    pub in_job: BTreeSet<String>,
    /// Guests a `vms restore` or `vms start` (or a waiting start) acts on
    /// here now (a pseudo job with this host as both owner and target):
    /// the waiting start leaves them alone; their leases stay.
    pub claimed: BTreeSet<String>,
    /// This host's guests that hold their disks on another host (filled in
    /// for a boot start): never started here.
    pub elsewhere: BTreeSet<String>,
}
