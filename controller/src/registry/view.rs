//! Floor 4 (application): the in-memory view's entries. A host's facts,
//! liveness cell and session ([`HostEntry`]) and a guest as held in memory
//! without its definition ([`GuestEntry`]); the registry keeps them under
//! its lock and hands out floor-1 copies (`crate::domain::view`).
//!
//! Architecture invariant: an entry is changed only under the registry's
//! lock and only after the store accepted the change it reflects.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use lifeboat_proto::v1::Guest;

use super::bus::SessionHandle;
use crate::domain::host::Liveness;
use crate::ports::HostRow;

pub(super) struct HostEntry {
    pub(super) row: HostRow,
    /// When anything last arrived (Unix ms; 0 = not since this controller
    /// started). Shared with the session's reader task, which updates it
    /// without taking the registry lock; a new session gets a new cell, so a
    /// superseded session cannot keep the host alive.
    pub(super) heard: Arc<AtomicI64>,
    /// Set when something the reconciler reads changed for this host.
    pub(super) dirty: bool,
    /// Memory of the guests running there (KiB), kept with the guest map so
    /// a plan over 10,000 hosts need not add up 200,000 guests.
    pub(super) running_kib: u64,
    pub(super) session: Option<SessionHandle>,
    pub(super) reported: Liveness,
    /// The host came back from a normal reboot: start what should run.
    pub(super) pending_boot_start: bool,
    /// An inventory arrived in the current session.
    pub(super) inventory_seen: bool,
    /// When leases were last sent in this session, and which.
    pub(super) leases_sent: Option<(i64, Vec<String>)>,
}

impl HostEntry {
    pub(super) fn new(row: HostRow) -> Self {
        HostEntry {
            row,
            heard: Arc::new(AtomicI64::new(0)),
            dirty: true,
            running_kib: 0,
            session: None,
            reported: Liveness::Unreachable,
            pending_boot_start: false,
            inventory_seen: false,
            leases_sent: None,
        }
    }
}

impl HostEntry {
    pub(super) fn last_heard_ms(&self) -> Option<i64> {
        match self.heard.load(Ordering::Relaxed) {
            0 => None,
            t => Some(t),
        }
    }
}

/// A guest as held in memory: the fields read on every pass, and the rest
/// of what the agent reported in encoded form, without the definition XML,
/// which stays in the database and is read when a move or an operator
/// needs it. About 0.5 KiB a guest: 200,000 guests in 100 MiB instead of
/// the 1.2 GB their definitions take.
pub(super) struct GuestEntry {
    pub(super) name: Box<str>,
    pub(super) state: i32,
    pub(super) memory_kib: u64,
    /// The reported `Guest` with `definition_xml` emptied, prost-encoded.
    pub(super) rest: Box<[u8]>,
    /// Hash of the whole reported guest, definition included: an inventory
    /// rewrites only the guests whose hash changed.
    pub(super) hash: u64,
    pub(super) updated_ms: i64,
}

pub(super) fn guest_hash(encoded: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    encoded.hash(&mut h);
    h.finish()
}

impl GuestEntry {
    /// Keeps `g` without its definition.
    pub(super) fn new(mut g: Guest, hash: u64, updated_ms: i64) -> Self {
        g.definition_xml = String::new();
        GuestEntry {
            name: g.name.as_str().into(),
            state: g.state,
            memory_kib: g.memory_kib,
            rest: prost::Message::encode_to_vec(&g).into_boxed_slice(),
            hash,
            updated_ms,
        }
    }

    /// [`GuestEntry::new`] for a guest already encoded as `encoded`: the
    /// encoding is kept as it is when it holds no plain-text definition
    /// (packed definitions stay, as with `new`), instead of encoding again.
    pub(super) fn from_encoded(g: Guest, encoded: Vec<u8>, hash: u64, updated_ms: i64) -> Self {
        if !g.definition_xml.is_empty() {
            return GuestEntry::new(g, hash, updated_ms);
        }
        GuestEntry {
            name: g.name.as_str().into(),
            state: g.state,
            memory_kib: g.memory_kib,
            rest: encoded.into_boxed_slice(),
            hash,
            updated_ms,
        }
    }

    /// The guest as reported, without its definition.
    pub(super) fn guest(&self) -> Guest {
        // Encoded by `new` from a valid message: decoding cannot fail.
        prost::Message::decode(&self.rest[..]).unwrap_or_default()
    }
}

/// One row of a guest listing: a reported guest or a missing one.
pub(super) enum Listed<'a> {
    Seen(&'a GuestEntry),
    Gone(&'a crate::ports::MissingRow),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_from_its_encoding_is_the_entry_new_builds() {
        let packed = Guest {
            uuid: "u-1".into(),
            name: "vm-1".into(),
            state: 1,
            memory_kib: 4096,
            definition_deflate: vec![1, 2, 3],
            ..Default::default()
        };
        let plain = Guest { definition_xml: "<domain/>".into(), ..packed.clone() };
        for g in [packed, plain] {
            let encoded = prost::Message::encode_to_vec(&g);
            let hash = guest_hash(&encoded);
            let (a, b) = (GuestEntry::new(g.clone(), hash, 7), GuestEntry::from_encoded(g.clone(), encoded, hash, 7));
            assert_eq!(a.rest, b.rest);
            assert_eq!(
                (&*a.name, a.state, a.memory_kib, a.hash, a.updated_ms),
                (&*b.name, b.state, b.memory_kib, b.hash, b.updated_ms)
            );
            assert!(b.guest().definition_xml.is_empty(), "no plain-text definition is kept");
            assert_eq!(b.guest().definition_deflate, g.definition_deflate);
        }
    }
}
