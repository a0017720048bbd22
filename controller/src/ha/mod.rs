//! High availability: which controller leads, and the fencing epoch that
//! guards everything the leader does (etcd backend only; the SQLite backend
//! runs one controller, epoch 0).
//!
//! Architecture invariant: a controller acts as leader only while
//! [`Leadership::holds`] is true: its etcd lease was renewed less than the
//! local deadline ago (shorter than the lease's TTL, measured from when the
//! renewal was sent), and nothing has fenced it. Once lost, leadership never
//! comes back to the same process: it stops commanding and exits, and starts
//! again as a follower.

pub mod election;
pub mod gate;
pub mod priority;

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// The leadership one controller process won: the etcd key whose create
/// revision is its fencing epoch, and the local deadline it must renew
/// within. Shared (`Arc`) by the election task, the store's writes and the
/// command bus.
#[derive(Debug)]
pub struct Leadership {
    key: Vec<u8>,
    epoch: u64,
    deadline: Duration,
    renewed: Mutex<Instant>,
    lost: watch::Sender<Option<String>>,
}

impl Leadership {
    /// Leadership of `key`, created at etcd revision `epoch`, renewed last
    /// by a keepalive sent at `renewed_at`; it lapses `deadline` after the
    /// last renewal's send time unless renewed again.
    pub fn new(key: Vec<u8>, epoch: u64, deadline: Duration, renewed_at: Instant) -> Self {
        let (lost, _) = watch::channel(None);
        Leadership { key, epoch, deadline, renewed: Mutex::new(renewed_at), lost }
    }

    /// The leadership key in etcd (writes compare its create revision).
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// The fencing epoch: the leadership key's create revision.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The epoch as etcd's signed revision type, for compares.
    pub fn revision(&self) -> i64 {
        i64::try_from(self.epoch).unwrap_or(i64::MAX)
    }

    /// A keepalive sent at `sent_at` was answered: the deadline now runs
    /// from there (never moves back).
    pub fn renewed(&self, sent_at: Instant) {
        let mut r = self.renewed.lock().unwrap_or_else(|p| p.into_inner());
        if sent_at > *r {
            *r = sent_at;
        }
    }

    /// When leadership lapses unless renewed before.
    pub fn expires_at(&self) -> Instant {
        *self.renewed.lock().unwrap_or_else(|p| p.into_inner()) + self.deadline
    }

    /// Whether this process may act as leader now: not lost, and renewed
    /// within the deadline. Checked before every command and every write.
    pub fn holds(&self) -> bool {
        self.lost.borrow().is_none() && Instant::now() < self.expires_at()
    }

    /// Gives leadership up for good (`why` is logged and shown): after this
    /// [`Leadership::holds`] is false and [`Leadership::lost`] completes.
    pub fn lose(&self, why: &str) {
        self.lost.send_if_modified(|l| {
            if l.is_none() {
                *l = Some(why.to_string());
                true
            } else {
                false
            }
        });
    }

    /// Why leadership was lost, once it is (including the deadline passing
    /// without a renewal, which this future notices on its own).
    pub async fn lost(&self) -> String {
        let mut rx = self.lost.subscribe();
        loop {
            if let Some(why) = rx.borrow_and_update().clone() {
                return why;
            }
            let until = self.expires_at();
            tokio::select! {
                r = rx.changed() => {
                    if r.is_err() {
                        return "leadership dropped".into();
                    }
                }
                _ = tokio::time::sleep_until(until) => {
                    if Instant::now() >= self.expires_at() {
                        let why = format!(
                            "no lease renewal for {} ms (local deadline; etcd unreachable or too slow)",
                            self.deadline.as_millis()
                        );
                        self.lose(&why);
                        return why;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn leadership_lapses_at_the_local_deadline_unless_renewed_and_never_comes_back() {
        let l = Leadership::new(b"k".to_vec(), 42, Duration::from_millis(2000), Instant::now());
        assert!(l.holds());
        assert_eq!(l.epoch(), 42);
        tokio::time::advance(Duration::from_millis(1500)).await;
        l.renewed(Instant::now() - Duration::from_millis(100));
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert!(l.holds(), "renewed at 1400 ms: holds until 3400 ms");
        // A late answer to an older keepalive does not move the deadline back.
        l.renewed(Instant::now() - Duration::from_millis(3000));
        let why = l.lost().await;
        assert!(why.contains("local deadline"), "{why}");
        assert!(!l.holds());
        l.renewed(Instant::now());
        assert!(!l.holds(), "lost for good");
    }

    #[tokio::test]
    async fn lose_is_seen_by_every_waiter_with_the_first_reason() {
        let l = std::sync::Arc::new(Leadership::new(b"k".to_vec(), 1, Duration::from_secs(60), Instant::now()));
        let w = tokio::spawn({
            let l = l.clone();
            async move { l.lost().await }
        });
        l.lose("leadership key changed");
        l.lose("second reason");
        assert_eq!(w.await.unwrap(), "leadership key changed");
        assert!(!l.holds());
    }
}
