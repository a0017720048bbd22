//! The controller fencing epoch: the highest epoch this agent has seen, kept
//! in `state_dir/controller-epoch` (one decimal u64). A controller whose
//! epoch is lower has been replaced by a newer leader: its session is ended
//! and its commands are refused. A higher epoch is written to disk (synced,
//! then renamed, directory synced) before anything is done for it, so a
//! restarted agent still refuses the old leader.
//!
//! A file that cannot be read or does not parse refuses everything (the
//! highest epoch is unknown, and unknown must not permit); a missing file is
//! epoch 0 (no controller seen yet, or the operator removed it on purpose).

use std::io::Write;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// The file's name inside `state_dir`.
pub const FILE: &str = "controller-epoch";

/// Longest file accepted: a u64 in decimal is 20 digits.
const MAX_LEN: u64 = 64;

/// The epoch file's path.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// The epoch file could not be used.
#[derive(Debug, Error)]
pub enum EpochError {
    /// Reading failed (permissions, I/O error, ...).
    #[error(
        "cannot read the controller epoch file {path}: {source}; this agent refuses every controller session and \
         command until it can (fix the file's permissions or the disk; see docs/operations.md, High availability)"
    )]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file holds something other than one decimal number.
    #[error(
        "the controller epoch file {path} is corrupt ({what}); this agent refuses every controller session and \
         command until it is repaired: write the current leader's epoch into it (lifeboat_controller_epoch on the \
         leader's metrics) or remove it ONLY if no controller older than the current one can still reach this host"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What was found, escaped and cut short.
        what: String,
    },
    /// Writing a higher epoch failed: nothing was done for it.
    #[error("cannot write the controller epoch file {path}: {source}; the higher epoch is not acted upon")]
    Write {
        /// The file (or its temporary file, or its directory).
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Reads the highest epoch seen: 0 when the file does not exist.
pub fn load(state_dir: &Path) -> Result<u64, EpochError> {
    use std::io::Read;
    let p = path(state_dir);
    let f = match std::fs::File::open(&p) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(source) => return Err(EpochError::Read { path: p, source }),
    };
    let mut buf = Vec::new();
    f.take(MAX_LEN + 1).read_to_end(&mut buf).map_err(|source| EpochError::Read { path: p.clone(), source })?;
    let corrupt = |what: String| EpochError::Corrupt { path: p.clone(), what };
    if u64::try_from(buf.len()).unwrap_or(u64::MAX) > MAX_LEN {
        return Err(corrupt(format!("longer than {MAX_LEN} bytes")));
    }
    let text = std::str::from_utf8(&buf).map_err(|_| corrupt("not UTF-8 text".into()))?;
    let t = text.trim();
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(corrupt(format!("'{}' is not a decimal number", t.escape_debug())));
    }
    t.parse::<u64>().map_err(|e| corrupt(format!("'{t}': {e}")))
}

/// Writes `epoch` durably: a temporary file written and synced, renamed
/// over the file, the directory synced. Creates `state_dir` when missing.
pub fn store(state_dir: &Path, epoch: u64) -> Result<(), EpochError> {
    let p = path(state_dir);
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| EpochError::Write { path, source }
    };
    std::fs::create_dir_all(state_dir).map_err(err(state_dir))?;
    let tmp = state_dir.join(format!("{FILE}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp).map_err(err(&tmp))?;
        f.write_all(format!("{epoch}\n").as_bytes()).map_err(err(&tmp))?;
        f.sync_all().map_err(err(&tmp))?;
    }
    std::fs::rename(&tmp, &p).map_err(err(&p))?;
    std::fs::File::open(state_dir).and_then(|d| d.sync_all()).map_err(err(state_dir))
}

/// What to do with a message carrying `got` when `highest` has been seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The current epoch: act.
    Current,
    /// A newer leader: persist `got`, then act.
    Raise,
    /// An older leader: refuse, do nothing.
    Stale,
    /// Above [`MAX_EPOCH`]: no etcd revision can be that high, so it is a
    /// bug or a forgery; admitting it would make every future leader stale.
    Invalid,
}

/// The highest epoch an agent admits: etcd revisions are signed 64-bit.
pub const MAX_EPOCH: u64 = i64::MAX.unsigned_abs();

/// The pure rule: lower is stale, equal is current, higher raises. Epoch 0
/// (the single-controller SQLite backend) is just a number.
pub fn decide(highest: u64, got: u64) -> Decision {
    if got > MAX_EPOCH {
        return Decision::Invalid;
    }
    match got.cmp(&highest) {
        std::cmp::Ordering::Less => Decision::Stale,
        std::cmp::Ordering::Equal => Decision::Current,
        std::cmp::Ordering::Greater => Decision::Raise,
    }
}

/// Why a Welcome or Command was not admitted.
#[derive(Debug, Error)]
pub enum Refusal {
    /// Its epoch is lower than the highest seen.
    #[error(
        "stale controller epoch {got} < {highest}: a newer leader has taken over (the sender must not command this \
         host); nothing was done"
    )]
    Stale {
        /// The message's epoch.
        got: u64,
        /// The highest seen.
        highest: u64,
    },
    /// Its epoch is above [`MAX_EPOCH`].
    #[error(
        "controller epoch {got} is above {MAX_EPOCH}, the highest an etcd revision can be: refused (the sender is \
         broken or forged); nothing was done"
    )]
    Invalid {
        /// The message's epoch.
        got: u64,
    },
    /// The higher epoch could not be persisted.
    #[error("{0}")]
    Persist(#[from] EpochError),
}

/// The highest epoch seen, as read from and written to `state_dir`.
#[derive(Debug)]
pub struct EpochGuard {
    state_dir: PathBuf,
    highest: u64,
}

impl EpochGuard {
    /// Reads the file (see [`load`]).
    pub fn open(state_dir: &Path) -> Result<Self, EpochError> {
        Ok(EpochGuard { state_dir: state_dir.to_path_buf(), highest: load(state_dir)? })
    }

    /// The highest epoch seen.
    pub fn highest(&self) -> u64 {
        self.highest
    }

    /// Admits a message carrying `got`: refuses a lower epoch; persists a
    /// higher one before returning Ok (and refuses when that fails).
    pub fn admit(&mut self, got: u64) -> Result<(), Refusal> {
        match decide(self.highest, got) {
            Decision::Current => Ok(()),
            Decision::Stale => Err(Refusal::Stale { got, highest: self.highest }),
            Decision::Invalid => Err(Refusal::Invalid { got }),
            Decision::Raise => {
                store(&self.state_dir, got)?;
                self.highest = got;
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lower_is_refused_equal_admitted_higher_persisted_first() {
        let d = tempfile::tempdir().unwrap();
        let s = d.path().join("state");
        let mut g = EpochGuard::open(&s).unwrap();
        assert_eq!(g.highest(), 0, "a missing file is epoch 0");
        g.admit(0).unwrap();
        assert!(!path(&s).exists(), "an equal epoch writes nothing");
        g.admit(7).unwrap();
        assert_eq!(load(&s).unwrap(), 7, "the higher epoch is on disk");
        g.admit(7).unwrap();
        let e = g.admit(6).unwrap_err();
        assert!(matches!(e, Refusal::Stale { got: 6, highest: 7 }), "{e}");
        assert!(e.to_string().contains("stale controller epoch 6 < 7"), "{e}");
        // Epoch 0 (SQLite controller) is refused once a higher one was seen.
        assert!(matches!(g.admit(0), Err(Refusal::Stale { got: 0, highest: 7 })));
        assert_eq!(load(&s).unwrap(), 7, "refusals change nothing");
        // A restart reads it back.
        assert_eq!(EpochGuard::open(&s).unwrap().highest(), 7);
        g.admit(MAX_EPOCH).unwrap();
        assert_eq!(load(&s).unwrap(), MAX_EPOCH);
    }

    #[test]
    fn an_epoch_no_etcd_revision_can_reach_is_refused_and_not_stored() {
        let d = tempfile::tempdir().unwrap();
        let s = d.path().join("state");
        let mut g = EpochGuard::open(&s).unwrap();
        g.admit(9).unwrap();
        let e = g.admit(MAX_EPOCH + 1).unwrap_err();
        assert!(matches!(e, Refusal::Invalid { .. }), "{e}");
        let e = g.admit(u64::MAX).unwrap_err();
        assert!(e.to_string().contains("above") && e.to_string().contains("nothing was done"), "{e}");
        assert_eq!(load(&s).unwrap(), 9, "refusals change nothing");
        g.admit(10).unwrap();
    }

    #[test]
    fn a_corrupt_or_unreadable_file_refuses_and_names_the_file() {
        let d = tempfile::tempdir().unwrap();
        let p = path(d.path());
        for bad in ["", "\n", "-1", "12x", "1 2", "0x10", "99999999999999999999999", "\u{1b}[2J", &"9".repeat(100)] {
            std::fs::write(&p, bad).unwrap();
            let e = EpochGuard::open(d.path()).unwrap_err();
            assert!(matches!(e, EpochError::Corrupt { .. }), "{bad:?}: {e}");
            let m = e.to_string();
            assert!(m.contains(&p.display().to_string()) && m.contains("refuses"), "{m}");
            assert!(!m.contains('\u{1b}'), "{m}");
        }
        std::fs::write(&p, [0xff, 0xfe]).unwrap();
        assert!(matches!(load(d.path()), Err(EpochError::Corrupt { .. })));
        std::fs::write(&p, " 42 \n").unwrap();
        assert_eq!(load(d.path()).unwrap(), 42);
        // A directory where the file should be: unreadable, not "0".
        std::fs::remove_file(&p).unwrap();
        std::fs::create_dir(&p).unwrap();
        let e = load(d.path()).unwrap_err();
        assert!(matches!(e, EpochError::Read { .. } | EpochError::Corrupt { .. }), "{e}");
    }

    #[test]
    fn an_unwritable_directory_refuses_the_higher_epoch_and_keeps_the_old_one() {
        let d = tempfile::tempdir().unwrap();
        let s = d.path().join("state");
        store(&s, 3).unwrap();
        let mut g = EpochGuard::open(&s).unwrap();
        // The temporary file's name taken by a directory: the write fails (also for root,
        // which file modes do not stop).
        std::fs::create_dir(s.join(format!("{FILE}.tmp"))).unwrap();
        let e = g.admit(4).unwrap_err();
        assert!(matches!(e, Refusal::Persist(EpochError::Write { .. })), "{e}");
        assert!(e.to_string().contains("not acted upon"), "{e}");
        assert_eq!(g.highest(), 3, "not raised in memory either");
        assert_eq!(load(&s).unwrap(), 3);
        // A state_dir below a plain file cannot even be created.
        let f = d.path().join("file");
        std::fs::write(&f, "").unwrap();
        let mut g2 = EpochGuard { state_dir: f.join("state"), highest: 3 };
        assert!(matches!(g2.admit(4), Err(Refusal::Persist(EpochError::Write { .. }))));
        assert_eq!(g2.highest(), 3);
    }
}
