//! [`AccessFile`]: where the access log's records are kept, for both backends — records
//! appended one after another to `access.log`, each framed and checksummed, with space
//! allocated ahead of them.
//!
//! Why a file of its own, not sled: sled stops writing for good once it meets ENOSPC (its
//! first I/O error becomes the answer to every later write on that database), so a disk
//! filled by another process would refuse every recorded read until sled is opened again.
//! An append-only file recovers by itself: a write that failed
//! is simply written again at the same place once there is room. And the space allocated
//! ahead of the records ([`AccessFile::reserve`]) is the file's own: no other process can
//! take it, so reads go on being recorded (and served) while the rest of the disk is full.
//!
//! # Format
//! [`MAGIC`], then frames back to back: `len u32 | record | xxh3-64 of len and record (u64)`,
//! little-endian. A `len` of 0 ends the records (space allocated ahead reads as zeros); so
//! does a frame that is not whole, or whose checksum does not match with no intact frame
//! after it — a write that never reached the disk whole (a crash, a failed write), which
//! the next append writes over; what follows it is cut off before that append. A frame
//! whose checksum does not match *followed* by an intact one is a record altered in place:
//! it is kept as it is, for the chain check to name.
//!
//! The store keeps what it is given: what a record means, its hash chain and its anchor in
//! the signed checkpoints are `crate::access_log`'s.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use xxhash_rust::xxh3::xxh3_64;

use super::{StorageError, io, malformed};

/// The file's name inside the store directory.
pub const ACCESS_FILE: &str = "access.log";

/// The first bytes of the file: the format and its version.
const MAGIC: &[u8; 8] = b"ALOG0001";
/// `len`, before the record.
const FRAME_HEAD: usize = 4;
/// The checksum, after the record.
const FRAME_TAIL: usize = 8;
/// The longest record the file takes (a record is ids and filters, never a message).
const MAX_RECORD: usize = 1 << 24;
/// Every this many records, where one starts is kept in memory: a read from anywhere
/// scans at most this many frames to get there.
const MARK_EVERY: u64 = 1024;

/// The access log's records, in an append-only file (see the module docs).
pub struct AccessFile {
    path: PathBuf,
    file: File,
    state: Mutex<State>,
    /// Records in the file: readers read below it (raised after a record is written).
    count: AtomicU64,
    /// Offsets of records 0, [`MARK_EVERY`], 2 × [`MARK_EVERY`], ….
    marks: RwLock<Vec<u64>>,
}

struct State {
    /// End of the last intact frame: where the next one goes.
    end: u64,
    /// Offset of the last record's frame.
    last: Option<u64>,
    /// Bytes of the file known allocated (its length).
    allocated: u64,
    /// Bytes kept allocated past `end`.
    reserve: u64,
    /// What lies past `end` is not zeros (a frame that was not written whole before a
    /// crash): cut off before the next append, so that no later open reads it.
    cut_before_append: bool,
    /// Whether an allocation failed since the last one that worked (told once).
    reserve_failing: bool,
}

/// One frame read.
struct Frame {
    record: Vec<u8>,
    /// Where the next frame starts.
    next: u64,
    /// Whether its checksum matches.
    intact: bool,
}

/// The frame at `at`, read from `reader` (which is there), or `None` where there is no
/// frame: zeros, the file's end, or a length that does not fit.
fn read_frame(
    reader: &mut impl Read,
    at: u64,
    file_len: u64,
) -> Result<Option<Frame>, StorageError> {
    let mut head = [0u8; FRAME_HEAD];
    if at + (FRAME_HEAD as u64) > file_len || reader.read_exact(&mut head).is_err() {
        return Ok(None);
    }
    let len = u32::from_le_bytes(head) as usize;
    let next = at + (FRAME_HEAD + len + FRAME_TAIL) as u64;
    if len == 0 || len > MAX_RECORD || next > file_len {
        return Ok(None);
    }
    let mut record = vec![0u8; len + FRAME_TAIL];
    if reader.read_exact(&mut record).is_err() {
        return Ok(None);
    }
    let tail = record.split_off(len);
    let mut summed = head.to_vec();
    summed.extend_from_slice(&record);
    let intact = xxh3_64(&summed).to_le_bytes() == tail.as_slice();
    Ok(Some(Frame {
        record,
        next,
        intact,
    }))
}

fn encode_frame(record: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(FRAME_HEAD + record.len() + FRAME_TAIL);
    frame.extend_from_slice(&(record.len() as u32).to_le_bytes());
    frame.extend_from_slice(record);
    let checksum = xxh3_64(&frame);
    frame.extend_from_slice(&checksum.to_le_bytes());
    frame
}

/// Reads `file` sequentially from `at`.
struct FileReader<'a> {
    file: &'a File,
    at: u64,
}

impl Read for FileReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let read = self.file.read_at(buf, self.at)?;
        self.at += read as u64;
        Ok(read)
    }
}

impl AccessFile {
    /// Opens the file at `path`, creating it when there is none, and finds its end. Reads
    /// only: a torn frame past the end is cut off by the first append, not here.
    pub fn open(path: &Path) -> Result<AccessFile, StorageError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        let mut file_len = file.metadata().map_err(io)?.len();
        if file_len == 0 {
            file.write_all_at(MAGIC, 0).map_err(io)?;
            file.sync_all().map_err(io)?;
            file_len = MAGIC.len() as u64;
        }
        let mut magic = [0u8; MAGIC.len()];
        if file.read_exact_at(&mut magic, 0).is_err() || &magic != MAGIC {
            return Err(malformed(format!(
                "{} is not an access log of this version",
                path.display()
            )));
        }
        let mut reader = BufReader::with_capacity(
            1 << 20,
            FileReader {
                file: &file,
                at: MAGIC.len() as u64,
            },
        );
        let mut end = MAGIC.len() as u64;
        let mut last = None;
        let mut count = 0u64;
        let mut marks = Vec::new();
        while let Some(frame) = read_frame(&mut reader, end, file_len)? {
            // A frame whose checksum does not match ends the records when nothing intact
            // follows it (a write that did not complete). Followed by an intact frame it is
            // a record altered in place: kept, for the chain check to name it.
            if !frame.intact {
                let mut after = FileReader {
                    file: &file,
                    at: frame.next,
                };
                if !read_frame(&mut after, frame.next, file_len)?.is_some_and(|next| next.intact) {
                    break;
                }
            }
            if count % MARK_EVERY == 0 {
                marks.push(end);
            }
            last = Some(end);
            count += 1;
            end = frame.next;
        }
        let cut_before_append = !zeros_from(&file, end, file_len)?;
        if cut_before_append {
            tracing::warn!(
                path = %path.display(),
                offset = end,
                bytes = file_len - end,
                "the access log ends in a frame that was not written whole; it is cut off at the next record"
            );
        }
        Ok(AccessFile {
            path: path.to_owned(),
            file,
            state: Mutex::new(State {
                end,
                last,
                allocated: file_len,
                reserve: 0,
                cut_before_append,
                reserve_failing: false,
            }),
            count: AtomicU64::new(count),
            marks: RwLock::new(marks),
        })
    }

    /// Makes a new file at `path` holding `records`, durably, in one step: written beside,
    /// synced, renamed. (Moving the records of an access log kept in sled.)
    pub fn create_with(
        path: &Path,
        records: impl IntoIterator<Item = Vec<u8>>,
    ) -> Result<(), StorageError> {
        let temporary = path.with_extension("log.tmp");
        let mut bytes = MAGIC.to_vec();
        for record in records {
            bytes.extend_from_slice(&encode_frame(&record));
        }
        let file = File::create(&temporary).map_err(io)?;
        file.write_all_at(&bytes, 0).map_err(io)?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&temporary, path).map_err(io)?;
        if let Some(dir) = path.parent() {
            File::open(dir).and_then(|dir| dir.sync_all()).map_err(io)?;
        }
        Ok(())
    }

    /// Records in the file.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }

    /// The last record.
    pub fn last(&self) -> Result<Option<Vec<u8>>, StorageError> {
        let state = self.state.lock().expect("access file lock");
        match state.last {
            Some(at) => Ok(read_frame(
                &mut FileReader {
                    file: &self.file,
                    at,
                },
                at,
                state.end,
            )?
            .map(|frame| frame.record)),
            None => Ok(None),
        }
    }

    /// Appends `record` as the next one. A write that fails (the disk full) leaves the
    /// file as it was: the next append writes at the same place.
    pub fn append(&self, record: &[u8]) -> Result<(), StorageError> {
        if record.is_empty() || record.len() > MAX_RECORD {
            return Err(malformed("an access record must hold 1 byte to 16 MiB"));
        }
        let frame = encode_frame(record);
        let mut state = self.state.lock().expect("access file lock");
        if state.cut_before_append {
            self.file.set_len(state.end).map_err(io)?;
            state.allocated = state.end;
            state.cut_before_append = false;
        }
        let at = state.end;
        self.file.write_all_at(&frame, at).map_err(io)?;
        let count = self.count.load(Ordering::Acquire);
        if count % MARK_EVERY == 0 {
            self.marks.write().expect("marks lock").push(at);
        }
        state.end = at + frame.len() as u64;
        state.last = Some(at);
        state.allocated = state.allocated.max(state.end);
        self.count.store(count + 1, Ordering::Release);
        if state.allocated - state.end < state.reserve / 2 {
            self.allocate_ahead(&mut state);
        }
        Ok(())
    }

    /// Keeps `bytes` allocated past the last record from now on, and allocates them now:
    /// what another process cannot take. Tells (and goes on) when there is no room.
    pub fn reserve(&self, bytes: u64) {
        let mut state = self.state.lock().expect("access file lock");
        state.reserve = bytes;
        self.allocate_ahead(&mut state);
    }

    fn allocate_ahead(&self, state: &mut State) {
        let goal = state.end + state.reserve;
        if state.allocated >= goal {
            return;
        }
        match allocate(&self.file, goal) {
            Ok(()) => {
                state.allocated = goal;
                state.reserve_failing = false;
            }
            Err(error) => {
                if !std::mem::replace(&mut state.reserve_failing, true) {
                    tracing::warn!(
                        %error,
                        path = %self.path.display(),
                        "cannot allocate space ahead of the access log; retried with the next records"
                    );
                }
            }
        }
    }

    /// Up to `limit` records from `start`, in order.
    pub fn read(&self, start: u64, limit: usize) -> Result<Vec<Vec<u8>>, StorageError> {
        let count = self.count();
        if start >= count || limit == 0 {
            return Ok(Vec::new());
        }
        let end_record = count.min(start.saturating_add(limit as u64));
        let (mut index, mut at) = {
            let marks = self.marks.read().expect("marks lock");
            let mark = (start / MARK_EVERY) as usize;
            let offset = *marks
                .get(mark)
                .ok_or_else(|| malformed("access log marks"))?;
            (mark as u64 * MARK_EVERY, offset)
        };
        let file_len = u64::MAX;
        let mut reader = BufReader::with_capacity(
            64 << 10,
            FileReader {
                file: &self.file,
                at,
            },
        );
        let mut records = Vec::with_capacity((end_record - start) as usize);
        while index < end_record {
            // Below `count` every frame has its shape (see `open`); one altered in place is
            // returned as it is, for the chain check to name.
            let frame = read_frame(&mut reader, at, file_len)?
                .ok_or_else(|| malformed(format!("access log record {index} is not a frame")))?;
            if index >= start {
                records.push(frame.record);
            }
            index += 1;
            at = frame.next;
        }
        Ok(records)
    }

    /// Makes every record appended so far durable.
    pub fn sync(&self) -> Result<(), StorageError> {
        self.file.sync_data().map_err(io)
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Allocates the file's first `len` bytes (extending it with zeros where it is shorter).
/// `posix_fallocate` returns its error number rather than setting `errno`, which `fs2`
/// reads instead; hence this call of our own.
#[cfg(target_os = "linux")]
fn allocate(file: &File, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let len = libc::off_t::try_from(len).map_err(std::io::Error::other)?;
    // SAFETY: an open descriptor and plain integers; no memory of ours is touched.
    let result = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(result))
    }
}

#[cfg(not(target_os = "linux"))]
fn allocate(file: &File, len: u64) -> std::io::Result<()> {
    fs2::FileExt::allocate(file, len)
}

/// Whether `file` holds only zeros from `from` to `to`.
fn zeros_from(file: &File, from: u64, to: u64) -> Result<bool, StorageError> {
    let mut buffer = vec![0u8; 1 << 16];
    let mut at = from;
    while at < to {
        let want = buffer.len().min((to - at) as usize);
        let read = file.read_at(&mut buffer[..want], at).map_err(io)?;
        if read == 0 {
            break;
        }
        if buffer[..read].iter().any(|&byte| byte != 0) {
            return Ok(false);
        }
        at += read as u64;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(file: &AccessFile) -> Vec<Vec<u8>> {
        file.read(0, usize::MAX).unwrap()
    }

    #[test]
    fn what_is_appended_reads_back_from_anywhere_before_and_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(ACCESS_FILE);
        let file = AccessFile::open(&path).unwrap();
        file.reserve(64 << 10);
        let count = MARK_EVERY * 2 + 7;
        for n in 0..count {
            file.append(format!("record {n}").as_bytes()).unwrap();
        }
        let check = |file: &AccessFile| {
            assert_eq!(file.count(), count);
            assert_eq!(
                file.last().unwrap().unwrap(),
                format!("record {}", count - 1).into_bytes()
            );
            for start in [0, 5, MARK_EVERY - 1, MARK_EVERY, MARK_EVERY * 2 + 6, count] {
                let read = file.read(start, 3).unwrap();
                let expected: Vec<Vec<u8>> = (start..count.min(start + 3))
                    .map(|n| format!("record {n}").into_bytes())
                    .collect();
                assert_eq!(read, expected, "from {start}");
            }
        };
        check(&file);
        assert!(
            std::fs::metadata(&path).unwrap().len() > file.state.lock().unwrap().end,
            "space is allocated ahead"
        );
        drop(file);
        check(&AccessFile::open(&path).unwrap());
    }

    #[test]
    fn a_frame_not_written_whole_ends_the_records_and_is_cut_at_the_next_append() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(ACCESS_FILE);
        let file = AccessFile::open(&path).unwrap();
        for n in 0..3 {
            file.append(format!("record {n}").as_bytes()).unwrap();
        }
        let end = file.state.lock().unwrap().end;
        drop(file);
        // A torn frame: its head and part of its record, then what is not a frame.
        let torn = encode_frame(b"record 3, torn");
        let raw = OpenOptions::new().write(true).open(&path).unwrap();
        raw.write_all_at(&torn[..9], end).unwrap();
        raw.write_all_at(&[0xff; 40], end + torn.len() as u64)
            .unwrap();
        drop(raw);
        let file = AccessFile::open(&path).unwrap();
        assert_eq!(file.count(), 3);
        file.append(b"record 3").unwrap();
        drop(file);
        let file = AccessFile::open(&path).unwrap();
        assert_eq!(
            records(&file),
            ["record 0", "record 1", "record 2", "record 3"].map(|r| r.as_bytes().to_vec())
        );
        assert!(
            !file.state.lock().unwrap().cut_before_append,
            "nothing left past the end"
        );
    }

    #[test]
    fn a_record_altered_in_place_is_kept_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(ACCESS_FILE);
        let file = AccessFile::open(&path).unwrap();
        for n in 0..3 {
            file.append(format!("record {n}").as_bytes()).unwrap();
        }
        drop(file);
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.windows(8).position(|w| w == b"record 1").unwrap();
        bytes[at] = b'R';
        std::fs::write(&path, bytes).unwrap();
        let file = AccessFile::open(&path).unwrap();
        assert_eq!(
            records(&file),
            ["record 0", "Record 1", "record 2"].map(|r| r.as_bytes().to_vec())
        );
    }

    #[test]
    fn moved_records_are_a_file_of_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(ACCESS_FILE);
        AccessFile::create_with(&path, (0..3).map(|n| vec![n + 1; 10])).unwrap();
        let file = AccessFile::open(&path).unwrap();
        assert_eq!(records(&file), vec![vec![1; 10], vec![2; 10], vec![3; 10]]);
        assert!(!dir.path().join("access.log.tmp").exists());
    }
}
