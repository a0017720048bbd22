//! Scheduling priority: with the etcd backend the threads that serve
//! agents and clients run at a lower priority (a higher nice value) than
//! the etcd runtime's, so that a leader busy with its own load (loading
//! the registry, thousands of agents reconnecting at once) still gets its
//! lease keepalives out and their answers read before its local deadline.
//! etcd itself, often on the same machine, is favoured the same way.
//!
//! Linux schedules threads, and `setpriority(PRIO_PROCESS, tid)` changes
//! one thread's nice value; raising it needs no privilege (lowering it back
//! would). A thread inherits the nice value of the thread that creates it:
//! threads that must keep the normal priority (the etcd runtime, the store
//! thread, the deadline watchdog) are created from threads that have it.

use thiserror::Error;

/// The nice value of the serving runtime's threads (etcd backend): under
/// full load a nice-0 thread gets about ten times the CPU of a nice-10 one
/// (the kernel's weights 1024 and 110); an idle machine runs both at once.
pub const SERVING_NICE: i32 = 10;

/// The calling thread's priority could not be read or changed.
#[derive(Debug, Error)]
#[error("cannot {what} this thread's scheduling priority: {source}")]
pub struct PriorityError {
    /// "read" or "lower".
    what: &'static str,
    /// The system's answer.
    source: std::io::Error,
}

/// The calling thread's nice value.
pub fn this_thread_nice() -> Result<i32, PriorityError> {
    rustix::process::getpriority_process(Some(rustix::thread::gettid()))
        .map_err(|e| PriorityError { what: "read", source: e.into() })
}

/// Raises the calling thread's nice value to `nice` (lowers its priority);
/// a thread already at `nice` or above is left as it is. Returns the nice
/// value the thread runs at.
pub fn lower_this_thread(nice: i32) -> Result<i32, PriorityError> {
    let now = this_thread_nice()?;
    if now >= nice {
        return Ok(now);
    }
    rustix::process::setpriority_process(Some(rustix::thread::gettid()), nice)
        .map_err(|e| PriorityError { what: "lower", source: e.into() })?;
    this_thread_nice()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowering_changes_only_the_calling_thread_and_never_raises_it_back() {
        let before = this_thread_nice().unwrap();
        let (lowered, again, child) = std::thread::spawn(|| {
            let lowered = lower_this_thread(SERVING_NICE).unwrap();
            // Asking for less than it has does not raise it (it could not
            // without privilege, and must not).
            let again = lower_this_thread(0).unwrap();
            // A thread it creates inherits the lowered priority.
            let child = std::thread::spawn(|| this_thread_nice().unwrap()).join().unwrap();
            (lowered, again, child)
        })
        .join()
        .unwrap();
        assert_eq!(lowered, SERVING_NICE.max(before));
        assert_eq!(again, lowered);
        assert_eq!(child, lowered);
        assert_eq!(this_thread_nice().unwrap(), before, "the test's own thread keeps its priority");
    }
}
