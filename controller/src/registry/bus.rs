//! Floor 3 (adapter): the agent sessions' command bus. One session per host
//! ([`SessionHandle`], identified by a [`SessionId`] that only moves forward)
//! and the commands awaiting their answer ([`CommandBus`]).
//!
//! Architecture invariant: an answer completes only a command sent to the
//! host whose session carried it, and a superseded session can neither
//! answer nor change anything (its `SessionId` is no longer current).

use std::collections::HashMap;
use std::sync::Mutex;

use lifeboat_proto::v1::{CommandResult, ControllerMessage};
use tokio::sync::{mpsc, oneshot};

/// An open agent session.
pub(super) struct SessionHandle {
    pub(super) generation: u64,
    pub(super) tx: mpsc::Sender<Box<ControllerMessage>>,
    /// Where the agent connected from (for the duplicate-agent alarm).
    pub(super) peer: Option<std::net::SocketAddr>,
    /// Set to `true` when another session takes over the host: the old
    /// session's reader stops at once (no more heartbeat acknowledgements,
    /// so its agent cannot believe it is still connected) and its stream
    /// ends with an error, so that agent dials again.
    pub(super) superseded: tokio::sync::watch::Sender<bool>,
}

/// A session token: updates from a superseded session are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionId(pub(super) u64);

/// A command awaiting its result.
struct Pending {
    /// The host it was sent to.
    host: String,
    /// Its result may be taken in ahead of what the agent sent before it.
    unordered: bool,
    waiter: oneshot::Sender<CommandResult>,
}

/// Commands awaiting their result, by id.
#[derive(Default)]
pub(super) struct CommandBus {
    pending: Mutex<HashMap<String, Pending>>,
    /// The leadership commands are sent under (etcd backend); unset with
    /// SQLite: epoch 0, and nothing to lose.
    leadership: std::sync::OnceLock<std::sync::Arc<crate::ha::Leadership>>,
}

impl CommandBus {
    /// Commands are sent under `l` from now on (only the first call counts).
    pub(super) fn set_leadership(&self, l: std::sync::Arc<crate::ha::Leadership>) {
        let _ = self.leadership.set(l);
    }

    /// The fencing epoch commands carry (0 without leadership: SQLite).
    pub(super) fn epoch(&self) -> u64 {
        self.leadership.get().map_or(0, |l| l.epoch())
    }

    /// Whether a command may be sent now: always with SQLite, and with etcd
    /// only while the leadership holds.
    pub(super) fn may_send(&self) -> bool {
        self.leadership.get().is_none_or(|l| l.holds())
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers command `id` sent to `host`; its answer arrives on the
    /// receiver. `unordered`: see [`CommandBus::unordered`].
    pub(super) fn expect(&self, id: &str, host: &str, unordered: bool) -> oneshot::Receiver<CommandResult> {
        let (waiter, rx) = oneshot::channel();
        self.pending().insert(id.to_string(), Pending { host: host.to_string(), unordered, waiter });
        rx
    }

    /// Whether command `id`, sent to `host`, awaits a result that may be
    /// taken in ahead of the messages `host`'s agent sent before it.
    pub(super) fn unordered(&self, host: &str, id: &str) -> bool {
        self.pending().get(id).is_some_and(|p| p.unordered && p.host == host)
    }

    /// Forgets command `id` (answered, timed out or failed to send).
    pub(super) fn forget(&self, id: &str) {
        self.pending().remove(id);
    }

    /// A command result arrived, from whichever session.
    pub(super) fn complete(&self, r: CommandResult) {
        if let Some(p) = self.pending().remove(&r.id) {
            let _ = p.waiter.send(r);
        }
    }

    /// A command result arrived from `host`'s session: it completes only a
    /// command sent to `host`. `Some(false)`: the id awaits another host's
    /// answer (nothing done); `None`: no command awaits it.
    pub(super) fn complete_from(&self, host: &str, r: CommandResult) -> Option<bool> {
        let mut pending = self.pending();
        match pending.get(&r.id) {
            None => None,
            Some(p) if p.host != host => Some(false),
            Some(_) => {
                if let Some(p) = pending.remove(&r.id) {
                    let _ = p.waiter.send(r);
                }
                Some(true)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_answer_completes_only_a_command_sent_to_the_host_whose_session_carried_it() {
        let bus = CommandBus::default();
        let rx = bus.expect("c1", "a", false);
        let r = CommandResult { id: "c1".into(), ..Default::default() };
        assert_eq!(bus.complete_from("b", r.clone()), Some(false), "another host's answer changes nothing");
        assert_eq!(bus.complete_from("a", r.clone()), Some(true));
        assert_eq!(rx.await.unwrap().id, "c1");
        assert_eq!(bus.complete_from("a", r), None, "answered once");
        let _rx2 = bus.expect("c2", "a", false);
        bus.forget("c2");
        assert_eq!(bus.complete_from("a", CommandResult { id: "c2".into(), ..Default::default() }), None);
    }

    #[test]
    fn only_a_command_sent_unordered_to_that_host_may_be_answered_out_of_order() {
        let bus = CommandBus::default();
        let _a = bus.expect("grant", "a", true);
        let _b = bus.expect("start", "a", false);
        assert!(bus.unordered("a", "grant"));
        assert!(!bus.unordered("b", "grant"), "another host's session cannot claim it");
        assert!(!bus.unordered("a", "start"), "ordered: behind what the agent sent before");
        assert!(!bus.unordered("a", "nothing"), "no such command");
        bus.forget("grant");
        assert!(!bus.unordered("a", "grant"), "answered or timed out: a late result keeps its place");
    }
}
