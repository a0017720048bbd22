//! Wakes the libvirt actor when the autostart directory changes (inotify),
//! so that it does not have to read the directory five times a second.
//! While no watch is in place (the directory is missing, or inotify is
//! unavailable) the actor keeps polling; the periodic full rescan stays the
//! backstop either way.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak, mpsc};
use std::thread;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tracing::{debug, warn};

use super::Request;

/// How long to wait before trying to watch again after the directory went
/// away or could not be watched.
const RETRY: Duration = Duration::from_secs(5);

/// Starts the watcher thread. `watched` reads true while a watch is in
/// place; the thread ends when the actor is gone.
pub(super) fn spawn(dir: PathBuf, tx: mpsc::Sender<Request>, watched: &Arc<AtomicBool>) {
    let flag = Arc::downgrade(watched);
    let r = thread::Builder::new().name("autostart-watch".into()).spawn(move || run(dir, tx, flag));
    if let Err(e) = r {
        warn!("cannot start the autostart watcher ({e}); polling the autostart directory instead");
    }
}

fn run(dir: PathBuf, tx: mpsc::Sender<Request>, flag: Weak<AtomicBool>) {
    let gone = AddWatchFlags::IN_IGNORED | AddWatchFlags::IN_DELETE_SELF | AddWatchFlags::IN_MOVE_SELF;
    loop {
        let Some(f) = flag.upgrade() else { return };
        match watch(&dir) {
            Ok(ino) => {
                f.store(true, Ordering::SeqCst);
                drop(f);
                // Whatever changed before the watch was in place.
                if tx.send(Request::AutostartChanged).is_err() {
                    return;
                }
                loop {
                    match ino.read_events() {
                        Ok(evs) => {
                            if tx.send(Request::AutostartChanged).is_err() {
                                return;
                            }
                            if evs.iter().any(|e| e.mask.intersects(gone)) {
                                debug!(dir = %dir.display(), "autostart directory went away; polling until it is back");
                                break;
                            }
                        }
                        Err(Errno::EINTR) => {}
                        Err(e) => {
                            warn!(dir = %dir.display(), "reading inotify events failed ({e}); polling the autostart directory");
                            break;
                        }
                    }
                }
                match flag.upgrade() {
                    Some(f) => f.store(false, Ordering::SeqCst),
                    None => return,
                }
            }
            Err(e) => {
                drop(f);
                debug!(dir = %dir.display(), "cannot watch the autostart directory ({e}); polling it");
            }
        }
        thread::sleep(RETRY);
    }
}

fn watch(dir: &std::path::Path) -> nix::Result<Inotify> {
    let ino = Inotify::init(InitFlags::IN_CLOEXEC)?;
    ino.add_watch(
        dir,
        AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_DELETE_SELF
            | AddWatchFlags::IN_MOVE_SELF
            | AddWatchFlags::IN_ONLYDIR,
    )?;
    Ok(ino)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changed(rx: &mpsc::Receiver<Request>) -> bool {
        matches!(rx.recv_timeout(Duration::from_secs(5)), Ok(Request::AutostartChanged))
    }

    #[test]
    fn changes_wake_the_actor_and_a_vanished_directory_falls_back_to_polling() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("autostart");
        std::fs::create_dir(&dir).unwrap();
        let (tx, rx) = mpsc::channel();
        let watched = Arc::new(AtomicBool::new(false));
        spawn(dir.clone(), tx, &watched);
        assert!(changed(&rx), "one wake-up once the watch is in place");
        assert!(watched.load(Ordering::SeqCst));
        std::os::unix::fs::symlink("/etc/libvirt/qemu/vm1.xml", dir.join("vm1.xml")).unwrap();
        assert!(changed(&rx), "a new autostart link wakes the actor");
        std::fs::remove_file(dir.join("vm1.xml")).unwrap();
        assert!(changed(&rx), "a removed link wakes the actor");
        std::fs::remove_dir(&dir).unwrap();
        while rx.recv_timeout(Duration::from_millis(500)).is_ok() {}
        assert!(!watched.load(Ordering::SeqCst), "without the directory the actor polls");
        // Back again: watched again within the retry period.
        std::fs::create_dir(&dir).unwrap();
        assert!(matches!(rx.recv_timeout(RETRY * 2), Ok(Request::AutostartChanged)));
        assert!(watched.load(Ordering::SeqCst));
        // The actor gone: the thread ends at its next event.
        drop(rx);
        drop(watched);
        std::fs::remove_dir(&dir).unwrap();
    }
}
