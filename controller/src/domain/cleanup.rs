//! What `cleanup` does with each stale definition a move record names.
//! Pure values.

use lifeboat_proto::v1;

use super::UnknownValue;

crate::named_enum! {
    /// What cleanup does (planned) or did (carried out) with one item. The
    /// name is `CleanupItem.action`, as the CLI shows it.
    pub enum CleanupAction as "cleanup action" {
        /// Planned: disable autostart and undefine (never storage).
        Remove = "remove",
        /// Planned with `--destroy-running`: destroy the stale copy, then undefine.
        DestroyAndRemove = "destroy-and-remove",
        /// Refused: it runs (or holds its disks) on the host.
        RefuseRunning = "refuse-running",
        /// Refused: its UUID carries another name on the host.
        RefuseRenamed = "refuse-renamed",
        /// Refused: its ownership row is quarantined.
        RefuseQuarantined = "refuse-quarantined",
        /// Done: undefined.
        Removed = "removed",
        /// The agent failed to remove it.
        Failed = "failed",
        /// Not defined on the host (any more).
        Gone = "gone",
        /// The host owns it again: not stale.
        Skip = "skip",
    }
}

impl CleanupAction {
    /// Whether carrying out the plan acts on the item (asks the agent).
    pub fn acts(self) -> bool {
        matches!(self, CleanupAction::Remove | CleanupAction::DestroyAndRemove)
    }

    /// The wire value (`CleanupItem.cleanup_action`).
    pub fn to_wire(self) -> v1::CleanupAction {
        use CleanupAction::*;
        match self {
            Remove => v1::CleanupAction::Remove,
            DestroyAndRemove => v1::CleanupAction::DestroyAndRemove,
            RefuseRunning => v1::CleanupAction::RefuseRunning,
            RefuseRenamed => v1::CleanupAction::RefuseRenamed,
            RefuseQuarantined => v1::CleanupAction::RefuseQuarantined,
            Removed => v1::CleanupAction::Removed,
            Failed => v1::CleanupAction::Failed,
            Gone => v1::CleanupAction::Gone,
            Skip => v1::CleanupAction::Skip,
        }
    }

    /// The action with this wire number; unset (0) or unknown refuses.
    pub fn from_wire(n: i32) -> Result<CleanupAction, UnknownValue> {
        CleanupAction::ALL
            .iter()
            .copied()
            .find(|a| a.to_wire() as i32 == n)
            .ok_or_else(|| UnknownValue::new("cleanup action", &n.to_string()))
    }

    /// An item's action (its enum field; the string is only shown).
    pub fn of(item: &v1::CleanupItem) -> Result<CleanupAction, UnknownValue> {
        CleanupAction::from_wire(item.cleanup_action)
    }

    /// Sets both of an item's action fields (enum and shown name).
    pub fn set(self, item: &mut v1::CleanupItem) {
        item.action = self.as_str().to_string();
        item.cleanup_action = self.to_wire() as i32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_round_trip_by_name_and_wire_number() {
        for a in CleanupAction::ALL {
            assert_eq!(a.as_str().parse::<CleanupAction>(), Ok(*a));
            assert_eq!(CleanupAction::from_wire(a.to_wire() as i32), Ok(*a));
            let mut item = v1::CleanupItem::default();
            a.set(&mut item);
            assert_eq!((CleanupAction::of(&item), item.action.as_str()), (Ok(*a), a.as_str()));
        }
        let on_wire = (0..100).filter(|n| v1::CleanupAction::try_from(*n).is_ok()).count();
        assert_eq!(on_wire, CleanupAction::ALL.len() + 1);
    }

    #[test]
    fn unknown_actions_refuse() {
        for bad in ["Remove", "remove ", "destroy", "", "destroy_and_remove"] {
            assert_eq!(bad.parse::<CleanupAction>().unwrap_err().what, "cleanup action", "{bad:?}");
        }
        for n in [0, -3, 10, i32::MAX] {
            assert!(CleanupAction::from_wire(n).is_err(), "{n}");
        }
        // An item whose shown name says "remove" but whose enum is unset is not acted on.
        let item = v1::CleanupItem { action: "remove".into(), ..Default::default() };
        assert!(CleanupAction::of(&item).is_err());
        assert!(CleanupAction::Remove.acts() && CleanupAction::DestroyAndRemove.acts());
        assert!(
            !CleanupAction::ALL
                .iter()
                .any(|a| a.acts() && !matches!(a, CleanupAction::Remove | CleanupAction::DestroyAndRemove))
        );
    }
}
