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
    /// When leases were last sent in this session, and which (UUID and
    /// generation, sorted).
    pub(super) leases_sent: Option<(i64, Vec<(String, u64)>)>,
    /// When the decision behind `leases_sent` was issued (Unix ms; 0: none
    /// in this session): an older decision does not replace it.
    pub(super) leases_issued_ms: i64,
    /// When this host's first session without an applied inventory opened
    /// (Unix ms): a reconnect does not move it, an applied inventory clears
    /// it (0).
    pub(super) uninventoried_since_ms: i64,
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
            leases_issued_ms: 0,
            uninventoried_since_ms: 0,
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
/// of what the agent reported in encoded form, its definition replaced by
/// the definition's digest (the definition stays in the database and is
/// read when a move or an operator needs it). About 0.5 KiB a guest:
/// 200,000 guests in 100 MiB instead of the 1.2 GB their definitions take.
pub(super) struct GuestEntry {
    pub(super) name: Box<str>,
    pub(super) state: i32,
    pub(super) memory_kib: u64,
    /// The reported guest as [`crate::intake::reported_key`] encodes it: no
    /// definition, its digest instead.
    pub(super) rest: Box<[u8]>,
    /// Hash of `rest`: an inventory rewrites only the guests whose hash
    /// changed, and the intake does not even inflate an unchanged one.
    pub(super) hash: u64,
    pub(super) updated_ms: i64,
}

impl GuestEntry {
    /// Keeps `g` without its definition.
    pub(super) fn new(mut g: Guest, updated_ms: i64) -> Self {
        let (rest, hash) = crate::intake::reported_key(&mut g);
        GuestEntry::keyed(&g, rest, hash, updated_ms)
    }

    /// An entry for `g` whose [`crate::intake::reported_key`] is `rest`, `hash`.
    pub(super) fn keyed(g: &Guest, rest: Vec<u8>, hash: u64, updated_ms: i64) -> Self {
        GuestEntry {
            name: g.name.as_str().into(),
            state: g.state,
            memory_kib: g.memory_kib,
            rest: rest.into_boxed_slice(),
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
    fn an_entry_keeps_the_definitions_digest_not_the_definition_and_its_hash_follows_every_field() {
        let xml = "<domain><name>vm-1</name></domain>".repeat(50);
        let mut packed = Guest {
            uuid: "u-1".into(),
            name: "vm-1".into(),
            state: 1,
            memory_kib: 4096,
            definition_xml: xml.clone(),
            ..Default::default()
        };
        lifeboat_proto::pack_definition(&mut packed);
        assert!(!packed.definition_deflate.is_empty());
        let e = GuestEntry::new(packed.clone(), 7);
        let kept = e.guest();
        assert!(kept.definition_xml.is_empty() && kept.definition_deflate.is_empty(), "no definition in memory");
        assert_eq!(kept.definition_digest, crate::intake::definition_digest(&packed));
        assert!(e.rest.len() < 200, "{} bytes", e.rest.len());
        // The same packed bytes restored to text (as the intake does) keep
        // the digest they arrived with: the same entry.
        let mut restored = packed.clone();
        restored.definition_digest = crate::intake::definition_digest(&packed);
        lifeboat_proto::unpack_definition(&mut restored).unwrap();
        assert_eq!(restored.definition_xml, xml);
        assert_eq!(GuestEntry::new(restored.clone(), 7).hash, e.hash);
        // Another field, or other definition bytes: another hash.
        assert_ne!(GuestEntry::new(Guest { state: 3, ..packed.clone() }, 7).hash, e.hash);
        let mut other = Guest { definition_xml: format!("{xml} "), definition_deflate: vec![], ..packed.clone() };
        lifeboat_proto::pack_definition(&mut other);
        assert_ne!(GuestEntry::new(other, 7).hash, e.hash);
        // The same text unpacked is another arrival form: another digest.
        let plain = Guest { definition_xml: xml, definition_deflate: vec![], ..packed };
        assert_ne!(GuestEntry::new(plain, 7).hash, e.hash);
    }
}
