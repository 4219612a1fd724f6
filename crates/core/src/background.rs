//! Background threads: the work that keeps derived data (run index flushes and merges, the
//! communication lists, zeroed log space ahead of the writer) runs at a lower scheduling
//! priority than the request path and the writer.
//!
//! None of it is on the way to an acknowledgement, but on two cores it competes for them
//! with the threads that are: a flush or a merge that takes a core while the writer has a
//! group ready, or while request tasks have calls to decode, delays every waiter of the
//! next group. At a lower priority the scheduler gives that work the time the request
//! path leaves idle (a group's `fdatasync`, gaps between calls) and still runs it when the
//! machine is saturated: a niced thread gets a smaller share of the CPU, never none, so
//! the bounded queues in front of it (a run index's frozen tables) keep draining.

use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

/// The nice value of background threads: a CFS weight of 110 against 1,024 for the
/// request path (a tenth of its share when both want the CPU).
pub const NICE: i32 = 10;

/// Spawns a named background thread at [`NICE`].
///
/// Lowering the priority is best effort: where it cannot be done (another OS, a sandbox
/// that forbids it) the thread runs at the normal priority and a warning is logged.
pub fn spawn<F, T>(name: &str, work: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let owned = name.to_owned();
    std::thread::Builder::new().name(owned).spawn(move || {
        if let Err(error) = lower_priority() {
            tracing::warn!(%error, "background thread runs at normal priority");
        }
        work()
    })
}

/// A background worker: one thread of [`spawn`]'s, the state it shares with its owner
/// behind one lock and one condition, a stop flag, and a failure slot. Every thread that
/// keeps derived data is one of these, so each gets the same guarantees:
///
/// - dropping the `Worker` stops the thread (the flag, then a wake-up) and joins it;
/// - a panic in the work does not unwind into anyone else: it is caught, logged and kept
///   as the worker's failure, which the owner reports as its own error from then on (the
///   service's degraded state, not a cascade of panics);
/// - the lock does not poison: after a panic the owner and the state stay usable, and the
///   failure slot, not a poisoned mutex, is what says something went wrong.
pub struct Worker<S> {
    shared: Arc<Shared<S>>,
    thread: Option<JoinHandle<()>>,
}

/// What a [`Worker`]'s thread and its owner share.
pub struct Shared<S> {
    state: Mutex<S>,
    changed: Condvar,
    stop: AtomicBool,
    failure: Mutex<Option<String>>,
}

impl<S> Shared<S> {
    fn new(state: S) -> Self {
        Shared {
            state: Mutex::new(state),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            failure: Mutex::new(None),
        }
    }

    /// The state, locked. A lock held by a thread that panicked is taken all the same: the
    /// panic is the worker's recorded failure.
    pub fn lock(&self) -> MutexGuard<'_, S> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wakes the thread (or anyone waiting on the state).
    pub fn notify(&self) {
        self.changed.notify_all();
    }

    /// Waits for a [`notify`](Shared::notify) or `timeout`, whichever comes first.
    pub fn wait_timeout<'a>(
        &self,
        guard: MutexGuard<'a, S>,
        timeout: Duration,
    ) -> MutexGuard<'a, S> {
        self.changed
            .wait_timeout(guard, timeout)
            .unwrap_or_else(PoisonError::into_inner)
            .0
    }

    /// Whether the owner asked the thread to stop.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Records why the work cannot go on (the first reason is kept) and wakes waiters.
    pub fn fail(&self, reason: impl Into<String>) {
        let mut failure = self.failure.lock().unwrap_or_else(PoisonError::into_inner);
        if failure.is_none() {
            *failure = Some(reason.into());
        }
        drop(failure);
        self.notify();
    }

    /// Why the work stopped, once it has failed.
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl<S: Send + 'static> Worker<S> {
    /// Starts `work` on a background thread named `name`, sharing `state` with the owner.
    pub fn spawn(
        name: &str,
        state: S,
        work: impl FnOnce(&Shared<S>) + Send + 'static,
    ) -> io::Result<Self> {
        let shared = Arc::new(Shared::new(state));
        let thread = {
            let shared = shared.clone();
            let name = name.to_owned();
            spawn(&name.clone(), move || {
                if let Err(panic) = catch_unwind(AssertUnwindSafe(|| work(&shared))) {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|text| (*text).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic".to_owned());
                    tracing::error!(thread = %name, panic = %what, "background thread failed");
                    shared.fail(format!("the {name} thread failed: {what}"));
                }
            })?
        };
        Ok(Worker {
            shared,
            thread: Some(thread),
        })
    }

    /// What the thread and the owner share.
    pub fn shared(&self) -> &Shared<S> {
        &self.shared
    }

    /// A handle on what is shared, for others to read (its failure, say); holding it does
    /// not keep the thread running.
    pub fn share(&self) -> Arc<Shared<S>> {
        self.shared.clone()
    }
}

impl<S> Drop for Worker<S> {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        // Taken so that a thread between its check of the flag and its wait cannot miss
        // the wake-up.
        drop(
            self.shared
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        self.shared.notify();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Sets the calling thread's nice value to [`NICE`] (on Linux nice is per thread:
/// `setpriority(PRIO_PROCESS, tid)`; a higher value needs no privilege).
#[cfg(target_os = "linux")]
fn lower_priority() -> io::Result<()> {
    // SAFETY: gettid and setpriority take plain integers and touch no memory of ours.
    let result = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, NICE)
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Elsewhere `setpriority(PRIO_PROCESS)` would lower the whole process: leave it alone.
#[cfg(not(target_os = "linux"))]
fn lower_priority() -> io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    fn own_nice() -> i32 {
        // SAFETY: as above; errno is cleared first because -1 is a valid nice value.
        unsafe {
            *libc::__errno_location() = 0;
            libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t)
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn background_threads_run_niced_and_leave_the_caller_alone() {
        let before = own_nice();
        let (name, nice) = spawn("test-background", || {
            (std::thread::current().name().map(str::to_owned), own_nice())
        })
        .unwrap()
        .join()
        .unwrap();
        assert_eq!(name.as_deref(), Some("test-background"));
        // The value is absolute; a runner started above it may keep its own.
        assert!(nice >= NICE, "nice {nice}, want at least {NICE}");
        assert_eq!(own_nice(), before, "the spawning thread keeps its priority");
    }

    /// A worker whose work panics does not take its owner down: the panic becomes the
    /// worker's failure, the shared state stays usable, and dropping it still joins.
    #[test]
    fn a_panicking_worker_records_its_failure_and_poisons_nothing() {
        let worker = Worker::spawn("test-panic", 0u32, |shared| {
            let mut state = shared.lock();
            *state = 7;
            panic!("boom");
        })
        .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while worker.shared().failure().is_none() {
            assert!(std::time::Instant::now() < deadline, "no failure recorded");
            std::thread::sleep(Duration::from_millis(1));
        }
        let failure = worker.shared().failure().unwrap();
        assert!(
            failure.contains("test-panic") && failure.contains("boom"),
            "{failure}"
        );
        assert_eq!(*worker.shared().lock(), 7);
        drop(worker);
    }

    /// Dropping a worker stops and joins a thread waiting for work.
    #[test]
    fn dropping_a_worker_stops_its_thread() {
        let worker = Worker::spawn("test-stop", (), |shared| {
            let mut state = shared.lock();
            while !shared.stopping() {
                state = shared.wait_timeout(state, Duration::from_secs(60));
            }
        })
        .unwrap();
        let started = std::time::Instant::now();
        drop(worker);
        assert!(started.elapsed() < Duration::from_secs(30));
    }

    #[test]
    fn the_work_runs_and_returns_its_result() {
        let answer = spawn("test-result", || 6 * 7).unwrap().join().unwrap();
        assert_eq!(answer, 42);
    }
}
