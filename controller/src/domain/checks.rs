//! The checks plans are made of (forced migration, planned move, cleanup,
//! restore of a missing guest):
//! one id per precondition, the label operators read, and the constructors.
//! Pure values.
//!
//! Architecture invariant: control flow keys on a check's [`CheckId`] (wire:
//! `Check.id`), never on its label (`Check.name`), which is text for people
//! and may name a host.

use lifeboat_proto::v1;

use super::UnknownValue;

crate::named_enum! {
    /// Which check a plan's check is. The name is the stable id (logs,
    /// tests); [`CheckId::label`] is what operators read.
    pub enum CheckId as "check id" {
        /// The named source host exists.
        SourceHostKnown = "source-host-known",
        /// `--to` is not the source itself.
        TargetDiffers = "target-differs",
        /// The named target host exists.
        TargetHostKnown = "target-host-known",
        /// The named target's status lets it receive guests.
        TargetAccepts = "target-accepts",
        /// The target's agent talks (a named target, or the target of an unfinished move).
        TargetReachable = "target-reachable",
        /// A planned move: the source's agent is connected.
        SourceConnected = "source-connected",
        /// A planned move names its guests.
        GuestsNamed = "guests-named",
        /// A planned move names its target.
        TargetNamed = "target-named",
        /// A forced migration: the source has been silent for the grace period.
        SourceSilent = "source-silent",
        /// A forced migration: the source is proven (or will be fenced) off.
        SourcePoweredOff = "source-powered-off",
        /// No duplicate-agent alarm on the source.
        OneAgentPerHost = "one-agent-per-host",
        /// No other job on the host.
        OneOperationPerHost = "one-operation-per-host",
        /// A guest named with `--vm` is on the source.
        GuestKnown = "guest-known",
        /// No other operation acts on the guest.
        InNoOtherOperation = "in-no-other-operation",
        /// The source still owns the guest.
        OwnedBySource = "owned-by-source",
        /// No other host reports the guest holding its disks.
        RunsNowhereElse = "runs-nowhere-else",
        /// The guest's definition is known.
        DefinitionKnown = "definition-known",
        /// A managed-save image stays on the source (informational).
        ManagedSave = "managed-save",
        /// The source reports every disk on shared storage.
        DisksOnSharedStorage = "disks-on-shared-storage",
        /// Per target: it sees the same disks.
        SameDisks = "same-disks",
        /// Per target: memory for the guest.
        Memory = "memory",
        /// Per target: no guest with this UUID or name.
        NoConflict = "no-conflict",
        /// Per target: no other guest there writes to these disks.
        DisksFree = "disks-free",
        /// Some target is AVAILABLE and REACHABLE.
        TargetAvailable = "target-available",
        /// The target named with `--to` sees the guest's disks.
        TargetSeesDisks = "target-sees-disks",
        /// A guest named with `--vm` can move.
        NamedGuestMovable = "named-guest-movable",
        /// At least one guest can move.
        SomethingToMove = "something-to-move",
        /// Cleanup: the host exists.
        HostKnown = "host-known",
        /// Cleanup: move records name the host.
        MoveRecords = "move-records",
        /// Cleanup: the host's agent is connected.
        HostConnected = "host-connected",
        /// Cleanup: no moved guest runs on the host.
        NoStaleCopyRunning = "no-stale-copy-running",
        /// Cleanup: no guest of it has a quarantined ownership row.
        OwnershipRecordsReadable = "ownership-records-readable",
        /// Restore, forget: every host's report is current.
        ReportsCurrent = "reports-current",
        /// Restore: the guest's last definition is kept.
        DefinitionKept = "definition-kept",
        /// Restore: no host reports the guest.
        DefinedNowhere = "defined-nowhere",
        /// Restore: no job acts on the guest.
        NoJob = "no-job",
        /// Restore: the target talks and reported its guests.
        RestoreTargetReachable = "restore-target-reachable",
        /// Restore elsewhere: the target is AVAILABLE.
        TargetAccepting = "target-accepting",
        /// Restore elsewhere: the owner is known not to hold the guest.
        OwnerHoldsNothing = "owner-holds-nothing",
        /// Restore with `--start`: the target's status lets it run guests.
        TargetMayRun = "target-may-run",
        /// Restore with `--start`: memory for the guest on the target.
        TargetMemory = "target-memory",
        /// An operator's action on a guest: its ownership row is not quarantined.
        OwnershipReadable = "ownership-readable",
    }
}

impl CheckId {
    /// The label operators read (`Check.name`); a per-target check's label
    /// is this followed by the target ([`Check::on`]).
    pub fn label(self) -> &'static str {
        use CheckId::*;
        match self {
            SourceHostKnown => "source host known",
            TargetDiffers => "target differs from source",
            TargetHostKnown => "target host known",
            TargetAccepts => "target accepts guests",
            TargetReachable => "target reachable",
            SourceConnected => "source connected",
            GuestsNamed => "guests named",
            TargetNamed => "target named",
            SourceSilent => "source silent",
            SourcePoweredOff => "source powered off",
            OneAgentPerHost => "one agent per host",
            OneOperationPerHost => "one operation per host",
            GuestKnown => "guest known",
            InNoOtherOperation => "in no other operation",
            OwnedBySource => "owned by source",
            RunsNowhereElse => "runs nowhere else",
            DefinitionKnown => "definition known",
            ManagedSave => "managed save",
            DisksOnSharedStorage => "disks on shared storage",
            SameDisks => "same disks on",
            Memory => "memory on",
            NoConflict => "no conflict on",
            DisksFree => "disks free on",
            TargetAvailable => "target available",
            TargetSeesDisks => "target sees the disks",
            NamedGuestMovable => "named guest movable",
            SomethingToMove => "something to move",
            HostKnown => "host known",
            MoveRecords => "move records",
            HostConnected => "host connected",
            NoStaleCopyRunning => "no stale copy running",
            OwnershipRecordsReadable => "ownership records readable",
            ReportsCurrent => "reports-current",
            DefinitionKept => "definition-kept",
            DefinedNowhere => "defined-nowhere",
            NoJob => "no-job",
            RestoreTargetReachable => "target-reachable",
            TargetAccepting => "target-accepting",
            OwnerHoldsNothing => "owner-holds-nothing",
            TargetMayRun => "target-may-run",
            TargetMemory => "target-memory",
            OwnershipReadable => "ownership-readable",
        }
    }

    /// The wire value (`Check.id`).
    pub fn to_wire(self) -> v1::CheckId {
        use CheckId::*;
        match self {
            SourceHostKnown => v1::CheckId::SourceHostKnown,
            TargetDiffers => v1::CheckId::TargetDiffers,
            TargetHostKnown => v1::CheckId::TargetHostKnown,
            TargetAccepts => v1::CheckId::TargetAccepts,
            TargetReachable => v1::CheckId::TargetReachable,
            SourceConnected => v1::CheckId::SourceConnected,
            GuestsNamed => v1::CheckId::GuestsNamed,
            TargetNamed => v1::CheckId::TargetNamed,
            SourceSilent => v1::CheckId::SourceSilent,
            SourcePoweredOff => v1::CheckId::SourcePoweredOff,
            OneAgentPerHost => v1::CheckId::OneAgentPerHost,
            OneOperationPerHost => v1::CheckId::OneOperationPerHost,
            GuestKnown => v1::CheckId::GuestKnown,
            InNoOtherOperation => v1::CheckId::InNoOtherOperation,
            OwnedBySource => v1::CheckId::OwnedBySource,
            RunsNowhereElse => v1::CheckId::RunsNowhereElse,
            DefinitionKnown => v1::CheckId::DefinitionKnown,
            ManagedSave => v1::CheckId::ManagedSave,
            DisksOnSharedStorage => v1::CheckId::DisksOnSharedStorage,
            SameDisks => v1::CheckId::SameDisks,
            Memory => v1::CheckId::Memory,
            NoConflict => v1::CheckId::NoConflict,
            DisksFree => v1::CheckId::DisksFree,
            TargetAvailable => v1::CheckId::TargetAvailable,
            TargetSeesDisks => v1::CheckId::TargetSeesDisks,
            NamedGuestMovable => v1::CheckId::NamedGuestMovable,
            SomethingToMove => v1::CheckId::SomethingToMove,
            HostKnown => v1::CheckId::HostKnown,
            MoveRecords => v1::CheckId::MoveRecords,
            HostConnected => v1::CheckId::HostConnected,
            NoStaleCopyRunning => v1::CheckId::NoStaleCopyRunning,
            OwnershipRecordsReadable => v1::CheckId::OwnershipRecordsReadable,
            ReportsCurrent => v1::CheckId::ReportsCurrent,
            DefinitionKept => v1::CheckId::DefinitionKept,
            DefinedNowhere => v1::CheckId::DefinedNowhere,
            NoJob => v1::CheckId::NoJob,
            RestoreTargetReachable => v1::CheckId::RestoreTargetReachable,
            TargetAccepting => v1::CheckId::TargetAccepting,
            OwnerHoldsNothing => v1::CheckId::OwnerHoldsNothing,
            TargetMayRun => v1::CheckId::TargetMayRun,
            TargetMemory => v1::CheckId::TargetMemory,
            OwnershipReadable => v1::CheckId::OwnershipReadable,
        }
    }

    /// The check id with this wire number; unset (0) or unknown refuses.
    pub fn from_wire(n: i32) -> Result<CheckId, UnknownValue> {
        CheckId::ALL
            .iter()
            .copied()
            .find(|c| c.to_wire() as i32 == n)
            .ok_or_else(|| UnknownValue::new("check id", &n.to_string()))
    }

    /// The id of a check as built by [`Check`]; a check without a known
    /// id is none of ours (never matched as any id).
    pub fn of(c: &v1::Check) -> Result<CheckId, UnknownValue> {
        CheckId::from_wire(c.id)
    }
}

/// Whether `checks` holds a failed check with this id.
pub fn failed(checks: &[v1::Check], id: CheckId) -> bool {
    checks.iter().any(|c| !c.ok && CheckId::of(c) == Ok(id))
}

/// One check of a plan and its result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// Which check.
    pub id: CheckId,
    /// The candidate target a per-target check is about.
    pub target: Option<String>,
    /// Passed.
    pub ok: bool,
    /// What was found.
    pub detail: String,
    /// What the operator can do; empty when it passed.
    pub remedy: String,
}

impl Check {
    /// A check and its result; the remedy is kept only when it failed.
    pub fn new(id: CheckId, ok: bool, detail: impl Into<String>, remedy: impl Into<String>) -> Check {
        Check { id, target: None, ok, detail: detail.into(), remedy: if ok { String::new() } else { remedy.into() } }
    }

    /// A check about one candidate target (labelled "`label` TARGET").
    pub fn on(id: CheckId, target: &str, ok: bool, detail: impl Into<String>, remedy: impl Into<String>) -> Check {
        Check { target: Some(target.to_string()), ..Check::new(id, ok, detail, remedy) }
    }

    /// The label operators read.
    pub fn label(&self) -> String {
        match &self.target {
            Some(t) => format!("{} {t}", self.id.label()),
            None => self.id.label().to_string(),
        }
    }

    /// The wire form (`Check`: label as `name`, id as `id`).
    pub fn to_wire(self) -> v1::Check {
        v1::Check {
            name: self.label(),
            ok: self.ok,
            detail: self.detail,
            remedy: self.remedy,
            id: self.id.to_wire() as i32,
        }
    }
}

impl From<Check> for v1::Check {
    fn from(c: Check) -> v1::Check {
        c.to_wire()
    }
}

/// A check in its wire form: [`Check::new`], then [`Check::to_wire`].
pub fn check(id: CheckId, ok: bool, detail: impl Into<String>, remedy: impl Into<String>) -> v1::Check {
    Check::new(id, ok, detail, remedy).to_wire()
}

/// A per-target check in its wire form: [`Check::on`], then [`Check::to_wire`].
pub fn check_on(
    id: CheckId,
    target: &str,
    ok: bool,
    detail: impl Into<String>,
    remedy: impl Into<String>,
) -> v1::Check {
    Check::on(id, target, ok, detail, remedy).to_wire()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn every_id_has_one_name_one_label_and_one_wire_number() {
        let mut names = BTreeSet::new();
        let mut labels = BTreeSet::new();
        let mut wire = BTreeSet::new();
        for id in CheckId::ALL {
            assert!(names.insert(id.as_str()), "{id}: name used twice");
            assert!(labels.insert(id.label()), "{id}: label used twice");
            assert_ne!(id.to_wire(), v1::CheckId::Unspecified, "{id}");
            assert!(wire.insert(id.to_wire() as i32), "{id}: wire number used twice");
            assert_eq!(id.as_str().parse::<CheckId>(), Ok(*id));
            assert_eq!(CheckId::from_wire(id.to_wire() as i32), Ok(*id));
        }
        // Every wire value but "unspecified" is a check of ours.
        let on_wire = (0..200).filter(|n| v1::CheckId::try_from(*n).is_ok()).count();
        assert_eq!(on_wire, CheckId::ALL.len() + 1);
    }

    #[test]
    fn parsing_is_strict() {
        for bad in ["source silent", "Source-Silent", " source-silent", "source-silent ", "", "source_silent"] {
            assert_eq!(bad.parse::<CheckId>().unwrap_err().what, "check id", "{bad:?}");
        }
        for n in [0, -1, 43, 1000, i32::MAX] {
            assert!(CheckId::from_wire(n).is_err(), "{n}");
        }
        // A check whose label reads like one of ours is still none of ours.
        let forged = v1::Check { name: "no stale copy running".into(), ok: false, ..Default::default() };
        assert!(CheckId::of(&forged).is_err());
        assert!(!failed(&[forged], CheckId::NoStaleCopyRunning));
    }

    #[test]
    fn labels_and_remedies_as_operators_read_them() {
        let c = check(CheckId::SourceSilent, true, "quiet", "wait");
        assert_eq!((c.name.as_str(), c.remedy.as_str()), ("source silent", ""));
        assert_eq!(CheckId::of(&c), Ok(CheckId::SourceSilent));
        let c = check_on(CheckId::SameDisks, "host-b", false, "blind", "share it");
        assert_eq!((c.name.as_str(), c.remedy.as_str()), ("same disks on host-b", "share it"));
        assert!(failed(&[c], CheckId::SameDisks));
    }
}
