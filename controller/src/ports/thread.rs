//! The store thread: one dedicated OS thread owns the backend (for SQLite,
//! the connection) and runs the calls sent to it one at a time, in the
//! order they were sent. Async callers await the answer without blocking a
//! worker; nothing outside the thread ever holds the backend.
//!
//! Architecture invariant: writes are applied in the order they were sent
//! (one FIFO queue, one consumer), and no caller can reach the backend but
//! through a closure run on the store thread: there is no `db()` hatch.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::{JoinHandle, ThreadId};

use super::{
    AlarmRepo, AuditRepo, GuestRepo, HostRepo, JobRepo, Maintenance, OwnershipRepo, QuarantineRepo, RepoError,
    RepoResult, Repositories,
};

/// Work for the store thread.
type Work = Box<dyn FnOnce(&mut dyn Repositories) + Send>;

enum Msg {
    Call(Work),
    /// Stop after everything sent before, checkpoint, then answer.
    Shutdown(Box<dyn FnOnce(RepoResult<()>) + Send>),
}

struct Shared {
    thread: ThreadId,
    join: Mutex<Option<JoinHandle<()>>>,
}

/// A handle to the store thread: cheap to clone, `Send + Sync`. The only
/// way to the repositories.
#[derive(Clone)]
pub struct Repos {
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Repos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repos").field("thread", &self.shared.thread).finish()
    }
}

/// The text of a panic's payload.
fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}

/// Runs `f`, turning a panic into [`RepoError::Panicked`].
fn guarded<R>(f: impl FnOnce() -> RepoResult<R>) -> RepoResult<R> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| Err(RepoError::Panicked(panic_text(p.as_ref()))))
}

/// Runs one call inside the backend's per-call transaction: begin, run,
/// then commit on `Ok` (a commit error becomes the call's error) or roll
/// back on an error or a panic.
fn in_transaction<R>(
    r: &mut dyn Repositories,
    f: impl FnOnce(&mut dyn Repositories) -> RepoResult<R>,
) -> RepoResult<R> {
    if let Err(e) = guarded(|| r.begin()) {
        r.rollback();
        return Err(e);
    }
    match guarded(|| f(&mut *r)) {
        Ok(v) => match guarded(|| r.commit()) {
            Ok(()) => Ok(v),
            Err(e) => {
                r.rollback();
                Err(e)
            }
        },
        Err(e) => {
            r.rollback();
            Err(e)
        }
    }
}

fn serve(mut backend: Box<dyn Repositories>, rx: mpsc::Receiver<Msg>) {
    // `recv` hands out every message sent before the last handle was
    // dropped, so dropping every handle also drains the queue.
    while let Ok(msg) = rx.recv() {
        match msg {
            // Each call catches its own panic (see `Repos::submit`); this
            // guard only keeps a panicking reply path from ending the thread.
            Msg::Call(work) => {
                let _ = catch_unwind(AssertUnwindSafe(|| work(backend.as_mut())));
            }
            Msg::Shutdown(reply) => {
                let flushed = guarded(|| backend.maintenance().checkpoint().map(|_| ()));
                drop(rx);
                drop(backend);
                reply(flushed);
                return;
            }
        }
    }
    let _ = guarded(|| backend.maintenance().checkpoint().map(|_| ()));
}

impl Repos {
    /// Starts the store thread with `backend` (for SQLite,
    /// `store::sqlite::SqliteRepos`).
    pub fn start(backend: Box<dyn Repositories>) -> RepoResult<Repos> {
        let (tx, rx) = mpsc::channel();
        let join = std::thread::Builder::new()
            .name("lifeboat-store".into())
            .spawn(move || serve(backend, rx))
            .map_err(|e| RepoError::Backend { write_failure: false, source: Box::new(e) })?;
        let shared = Arc::new(Shared { thread: join.thread().id(), join: Mutex::new(Some(join)) });
        Ok(Repos { tx, shared })
    }

    /// Queues `f` with a reply path; a panic in `f` becomes
    /// [`RepoError::Panicked`] for this caller only.
    fn submit<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn Repositories) -> RepoResult<R> + Send + 'static,
        reply: impl FnOnce(RepoResult<R>) + Send + 'static,
    ) -> RepoResult<()> {
        if std::thread::current().id() == self.shared.thread {
            return Err(RepoError::Reentrant);
        }
        let work: Work = Box::new(move |r| reply(in_transaction(r, f)));
        self.tx.send(Msg::Call(work)).map_err(|_| RepoError::Stopped)
    }

    /// Queues `f` on the store thread now and returns a future of its
    /// result: calls run in the order they were made (not the order their
    /// futures are awaited). `f` owns what it needs (`move` closure).
    pub fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn Repositories) -> RepoResult<R> + Send + 'static,
    ) -> impl std::future::Future<Output = RepoResult<R>> + Send + 'static {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let queued = self.submit(f, move |r| {
            let _ = tx.send(r);
        });
        async move {
            queued?;
            rx.await.map_err(|_| RepoError::Stopped)?
        }
    }

    /// [`Repos::call`] for code that is not async (start-up, tests, the
    /// registry until it is converted). Never from inside a store call
    /// ([`RepoError::Reentrant`]); blocks the calling thread.
    pub fn call_blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn Repositories) -> RepoResult<R> + Send + 'static,
    ) -> RepoResult<R> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(f, move |r| {
            let _ = tx.send(r);
        })?;
        rx.recv().map_err(|_| RepoError::Stopped)?
    }

    /// Queues `f` with the host repository.
    pub fn hosts<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn HostRepo) -> RepoResult<R> + Send + 'static,
    ) -> impl std::future::Future<Output = RepoResult<R>> + Send + 'static {
        self.call(move |r| f(r.hosts()))
    }

    /// Queues `f` with the guest repository.
    pub fn guests<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn GuestRepo) -> RepoResult<R> + Send + 'static,
    ) -> impl std::future::Future<Output = RepoResult<R>> + Send + 'static {
        self.call(move |r| f(r.guests()))
    }

    /// Queues `f` with the ownership repository.
    pub fn ownership<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn OwnershipRepo) -> RepoResult<R> + Send + 'static,
    ) -> impl std::future::Future<Output = RepoResult<R>> + Send + 'static {
        self.call(move |r| f(r.ownership()))
    }

    /// Queues `f` with the job repository.
    pub fn jobs<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn JobRepo) -> RepoResult<R> + Send + 'static,
    ) -> impl std::future::Future<Output = RepoResult<R>> + Send + 'static {
        self.call(move |r| f(r.jobs()))
    }

    /// Queues `f` with the alarm repository.
    pub fn alarms<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn AlarmRepo) -> RepoResult<R> + Send + 'static,
    ) -> impl std::future::Future<Output = RepoResult<R>> + Send + 'static {
        self.call(move |r| f(r.alarms()))
    }

    /// Queues `f` with the audit log.
    pub fn audit<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn AuditRepo) -> RepoResult<R> + Send + 'static,
    ) -> impl std::future::Future<Output = RepoResult<R>> + Send + 'static {
        self.call(move |r| f(r.audit()))
    }

    /// Queues `f` with the quarantine.
    pub fn quarantine<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn QuarantineRepo) -> RepoResult<R> + Send + 'static,
    ) -> impl std::future::Future<Output = RepoResult<R>> + Send + 'static {
        self.call(move |r| f(r.quarantine()))
    }

    /// Queues `f` with the backend's upkeep.
    pub fn maintenance<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn Maintenance) -> RepoResult<R> + Send + 'static,
    ) -> impl std::future::Future<Output = RepoResult<R>> + Send + 'static {
        self.call(move |r| f(r.maintenance()))
    }

    /// Stops the store thread once every call sent before has run, after a
    /// final checkpoint; later calls (from any clone) get
    /// [`RepoError::Stopped`]. The result is the checkpoint's.
    pub async fn shutdown(&self) -> RepoResult<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let reply = Box::new(move |r| {
            let _ = tx.send(r);
        });
        self.tx.send(Msg::Shutdown(reply)).map_err(|_| RepoError::Stopped)?;
        let flushed = rx.await.map_err(|_| RepoError::Stopped)?;
        self.join();
        flushed
    }

    /// [`Repos::shutdown`] for code that is not async.
    pub fn shutdown_blocking(&self) -> RepoResult<()> {
        if std::thread::current().id() == self.shared.thread {
            return Err(RepoError::Reentrant);
        }
        let (tx, rx) = mpsc::sync_channel(1);
        let reply = Box::new(move |r| {
            let _ = tx.send(r);
        });
        self.tx.send(Msg::Shutdown(reply)).map_err(|_| RepoError::Stopped)?;
        let flushed = rx.recv().map_err(|_| RepoError::Stopped)?;
        self.join();
        flushed
    }

    /// Waits for the (stopping) thread to end.
    fn join(&self) {
        let handle = self.shared.join.lock().ok().and_then(|mut j| j.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}
