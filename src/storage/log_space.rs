//! Space ahead of the log's end, written with zeros and made durable before the writer
//! reaches it, so that a group's `fdatasync` has only the group's own pages to write.
//!
//! Why: a write into space that `fallocate` reserved turns an *unwritten* extent into a
//! written one, and on ext4 that extent change is metadata the `fdatasync` must write too
//! (`fsync_buffers_list` in a profile of the writer); a write past the end of the file
//! changes its size, which is metadata as well. Into space already written and synced
//! (zeros), the sync writes the data pages alone (docs/BENCHMARKS.md gives what that is
//! worth).
//!
//! The zeros are written by a background worker of their own (idle until the first frame:
//! a store opened only to be read is never written), a chunk at a time, never where a frame
//! was or is being written: both writes happen under one lock and zeros only ever go past
//! the end of every frame written. A frame that gets ahead of the zeros is written all the
//! same (its sync then also commits the file's growth), so this is only ever a speed-up,
//! and a crash at any point leaves the frames as they were: zeros past the last frame are
//! what the log reads as "no frame here".

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use crate::background::{Shared, Worker};

/// Bytes of zeros written (and synced) per step: small enough that a frame write waiting
/// for the lock waits for one page-cache copy of this size at most.
const CHUNK: usize = 256 << 10;

/// How far past the end of the frames zeros are kept: an eighth of the log, between 1 MiB
/// and 16 MiB (under batch load the log grows by about 50 MB/s; a step takes a few ms).
fn space_ahead(frames_end: u64) -> u64 {
    (frames_end / 8).clamp(1 << 20, 16 << 20)
}

struct State {
    /// End of every frame written (durable or not), and at least the file's length at
    /// start: no zero is ever written below it.
    frames_end: u64,
    /// End of the zeros written (may be below `frames_end`: frames overtook them).
    zeros_end: u64,
    /// End of the space known written and durable (zeros or what was there at start).
    durable_end: u64,
    /// A frame was written: from then on space ahead is wanted.
    writing: bool,
}

/// The log file's space ahead of its frames (see the module docs).
pub struct LogSpace {
    file: Arc<File>,
    /// `None` when the worker could not be started (frames then extend the file).
    worker: Option<Worker<State>>,
}

impl LogSpace {
    /// The space ahead of the frames in `file` (a handle of the log's own: the worker
    /// writes and syncs through it), kept zeroed once the first frame is written. Nothing
    /// the file holds now is written over: zeros go past its length.
    pub fn new(file: File) -> io::Result<Self> {
        let frames_end = file.metadata()?.len();
        let file = Arc::new(file);
        let state = State {
            frames_end,
            zeros_end: frames_end,
            durable_end: frames_end,
            writing: false,
        };
        let worker = {
            let file = file.clone();
            Worker::spawn("log-space", state, move |shared| zero_ahead(&file, shared))
                .inspect_err(|error| {
                    tracing::warn!(%error, "cannot start zeroing log space ahead; frames extend the file");
                })
                .ok()
        };
        Ok(LogSpace { file, worker })
    }

    /// Writes a frame at `at` (the end of the log's frames, or where a failed write of the
    /// same frame began). The caller syncs.
    pub fn write_frame(&self, frame: &[u8], at: u64) -> io::Result<()> {
        let Some(worker) = &self.worker else {
            return self.file.write_all_at(frame, at);
        };
        let shared = worker.shared();
        let mut state = shared.lock();
        state.writing = true;
        // Counted before the write: a write that fails half-way leaves bytes the retry
        // overwrites, and zeros must not go there meanwhile either.
        let end = at + frame.len() as u64;
        state.frames_end = state.frames_end.max(end);
        let result = self.file.write_all_at(frame, at);
        if state.zeros_end < state.frames_end + space_ahead(state.frames_end) / 2 {
            shared.notify();
        }
        result
    }

    /// Bytes past `log_end` that are zeroed and durable: the log's own to write into.
    pub fn ahead_of(&self, log_end: u64) -> u64 {
        self.worker.as_ref().map_or(0, |worker| {
            worker.shared().lock().durable_end.saturating_sub(log_end)
        })
    }

    /// Waits (for tests) until the space ahead of the frames is zeroed and durable.
    #[cfg(test)]
    pub fn wait_ready(&self) {
        let shared = self.worker.as_ref().expect("the worker runs").shared();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            assert!(
                std::time::Instant::now() < deadline,
                "space ahead not zeroed in 30 s"
            );
            {
                let state = shared.lock();
                if state.durable_end >= state.frames_end + space_ahead(state.frames_end) {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// The zeroing work: a chunk at a time, until stopped. A failed write (the disk full) is
/// tried again a second later, and told once per spell of failures; the frames do not
/// depend on it.
fn zero_ahead(file: &File, shared: &Shared<State>) {
    let zeros = vec![0u8; CHUNK];
    let mut backoff = false;
    let mut failing = false;
    let failed = |error: std::io::Error, failing: &mut bool| {
        if !std::mem::replace(failing, true) {
            tracing::warn!(%error, "zeroing log space ahead failed; frames extend the file until it works again");
        }
    };
    loop {
        let end = {
            let mut state = shared.lock();
            loop {
                if shared.stopping() {
                    return;
                }
                let goal = state.frames_end + space_ahead(state.frames_end);
                if state.writing && state.zeros_end < goal && !backoff {
                    break;
                }
                state = shared.wait_timeout(state, Duration::from_secs(1));
                backoff = false;
            }
            // Under the lock frames are written with (a copy outside it would gain nothing:
            // the kernel serialises buffered writes to one file on the inode's lock).
            let at = state.zeros_end.max(state.frames_end);
            if let Err(error) = file.write_all_at(&zeros, at) {
                failed(error, &mut failing);
                backoff = true;
                continue;
            }
            state.zeros_end = at + CHUNK as u64;
            state.zeros_end
        };
        match file.sync_data() {
            Ok(()) => {
                let mut state = shared.lock();
                state.durable_end = state.durable_end.max(end);
                failing = false;
            }
            Err(error) => {
                failed(error, &mut failing);
                backoff = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &std::path::Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("log"))
            .unwrap()
    }

    #[test]
    fn zeros_go_ahead_of_the_frames_and_never_over_them() {
        let dir = tempfile::tempdir().unwrap();
        let log = file(dir.path());
        let space = LogSpace::new(log.try_clone().unwrap()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(log.metadata().unwrap().len(), 0, "nothing before a frame");
        let mut at = 0u64;
        let mut frames = Vec::new();
        space.write_frame(&[1u8; 100], 0).unwrap();
        frames.push((0, 100, 1u8));
        at += 100;
        space.wait_ready();
        assert!(
            log.metadata().unwrap().len() >= 100 + (1 << 20),
            "space is written ahead"
        );
        assert!(space.ahead_of(100) >= 1 << 20);
        // Frames of many sizes, some past the zeros, while the thread keeps zeroing.
        for n in 1..400u32 {
            let frame = vec![(n % 251) as u8 + 1; 1000 + (n as usize * 7919) % 90_000];
            space.write_frame(&frame, at).unwrap();
            frames.push((at, frame.len(), (n % 251) as u8 + 1));
            at += frame.len() as u64;
        }
        space.wait_ready();
        let len = log.metadata().unwrap().len();
        assert!(
            len >= at + space_ahead(at),
            "{len} bytes for frames up to {at}"
        );
        for (start, size, byte) in frames {
            let mut read = vec![0u8; size];
            log.read_exact_at(&mut read, start).unwrap();
            assert!(
                read.iter().all(|&b| b == byte),
                "the frame at {start} is intact"
            );
        }
        let mut rest = vec![1u8; (len - at) as usize];
        log.read_exact_at(&mut rest, at).unwrap();
        assert!(
            rest.iter().all(|&b| b == 0),
            "past the frames there are only zeros"
        );
    }

    #[test]
    fn what_the_file_holds_at_start_is_never_written_over() {
        let dir = tempfile::tempdir().unwrap();
        let log = file(dir.path());
        log.write_all_at(&[7u8; 5000], 0).unwrap();
        let space = LogSpace::new(log.try_clone().unwrap()).unwrap();
        // A frame written over the start of what was there (the log's end was below it).
        space.write_frame(&[9u8; 3000], 1000).unwrap();
        space.wait_ready();
        assert!(log.metadata().unwrap().len() >= 5000 + (1 << 20));
        let mut read = vec![0u8; 5000];
        log.read_exact_at(&mut read, 0).unwrap();
        assert!(read[..1000].iter().all(|&b| b == 7));
        assert!(read[1000..4000].iter().all(|&b| b == 9));
        assert!(
            read[4000..].iter().all(|&b| b == 7),
            "nothing zeroed below the file's end"
        );
    }
}
