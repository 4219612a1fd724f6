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
use std::thread::JoinHandle;

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

    #[test]
    fn the_work_runs_and_returns_its_result() {
        let answer = spawn("test-result", || 6 * 7).unwrap().join().unwrap();
        assert_eq!(answer, 42);
    }
}
