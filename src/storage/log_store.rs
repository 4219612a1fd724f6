//! The log [`Store`]: every group commit is one frame appended to an append-only file,
//! `ledger.log`, made durable by one `fdatasync`. Everything else is derived from the log
//! and written without waiting for the disk: the idempotency keys and checkpoints by size,
//! and the compliance indexes, are [`RunIndex`]es (sorted run files), where a key costs a
//! `BTreeMap` insert. sled keeps the layout version (and, in `derived/`, what the access
//! log was before `access.log`).
//!
//! Why: one sequential write and one `fdatasync` per group is what the disk can do, and
//! the derived keys (five per entry) must cost less than the write they follow
//! (docs/BENCHMARKS.md has the figures).
//!
//! # Files
//! - `ledger.log`: frames, back to back. A frame holds everything a [`CommitBatch`] holds:
//!   ```text
//!   magic "ALF1" | frame_len u64 | first_index u64 | entries u32 | keys u32 | has_checkpoint u8
//!   entries × (index u64 | frame_start u64 | leaf_len u32 | body_len u32 | nodes u8 | nodes×32 | leaf | body)
//!   keys × (key_len u16 | key | idempotency record (40))
//!   [checkpoint: size u64 | note_len u32 | note]
//!   SHA-256 of everything above
//!   ```
//!   all integers little-endian. The frame is the unit of atomicity: after a crash, a last
//!   frame whose checksum does not match is a write that was never acknowledged; it is
//!   ignored and later overwritten. A damaged frame that had already been applied to `keys/` is
//!   tampering, and the store refuses to open.
//! - `ledger.idx`: the offset of entry `i`'s record at byte `8 i`. Derived from the log:
//!   written after the log's `fdatasync`, never synced itself, checked and completed from
//!   the log at every open.
//! - `keys/`: the idempotency keys (`i` ‖ key → record), the checkpoints (`c` ‖ size BE →
//!   note, and `m/latest` → size BE ‖ note) as a [`RunIndex`], applied from each frame
//!   right after it is durable, with the log offset they cover (`m/applied`) in the same
//!   `apply`; a crash keeps a prefix of those applies, so at open the frames past its
//!   `m/applied` are applied again before anything is appended.
//! - sled: the layout version (`m/layout`).
//! - `index/` and `facts/`: the compliance indexes ([`crate::compliance::index`]), the
//!   communication lists and the fact lists, each a [`RunIndex`]; `derived/`: a sled
//!   database that held the access log before its file (`access.log`, [`super::AccessFile`]).
//!
//! So an acknowledged group is durable once, in one file, and everything else is rebuilt
//! from that file.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use super::log_space::LogSpace;
use super::run_index::{Filter, RunIndex, RunOptions};
use super::sled_store::{SledIndex, backend, open_sled};
use super::{
    Checkpoints, CommitBatch, IdempotencyRecord, IdempotencyRecords, IndexStore, Leaves,
    RawEntries, RawEntry, StorageError, Store, StoredGroup, StoredGroups, io, malformed,
};
use crate::ledger::merkle::{HASH_SIZE, Hash};

/// File names inside the store directory.
pub const LOG_FILE: &str = "ledger.log";
pub const INDEX_FILE: &str = "ledger.idx";
/// The sled database that held the access log before its file, inside the store directory.
pub const DERIVED_DIR: &str = "derived";
/// The idempotency keys' run index, inside the store directory.
pub const KEYS_DIR: &str = "keys";
/// The communication lists' run index, inside the store directory.
pub const INDEX_DIR: &str = "index";
/// The fact lists' run index, inside the store directory.
pub const FACTS_DIR: &str = "facts";
/// Where the bytes of writes that never completed are set aside, inside the store directory.
pub const TORN_DIR: &str = "torn";

/// Prefix of an idempotency key in `keys/`; its watermark is [`APPLIED_KEY`] there too.
const KEY_PREFIX: u8 = b'i';
/// Prefix of a checkpoint in `keys/` (then the tree size, big-endian, so they sort).
const CHECKPOINT_PREFIX: u8 = b'c';
/// The latest checkpoint in `keys/`: tree size (u64 BE) ‖ note. A copy of the highest
/// `c` key, kept because a run index reads forward only: without it every start would scan
/// all checkpoints to find the last.
const LATEST_KEY: &[u8] = b"m/latest";

/// An idempotency key as `keys/` holds it.
fn idempotency_key(key: &[u8]) -> Vec<u8> {
    let mut stored = Vec::with_capacity(1 + key.len());
    stored.push(KEY_PREFIX);
    stored.extend_from_slice(key);
    stored
}

/// The key of a frame's checkpoint in `keys/`: `c` ‖ size for the first checkpoint of a
/// size (the one of the group that grew the tree to it); a checkpoint of a frame without
/// entries past the first frame re-signs the same tree with the access trail's newer
/// anchor, and is `c` ‖ size ‖ the frame's offset (u64 BE): after the first of its size
/// and before the next size, in the order they were written.
fn checkpoint_key(size: u64, entries: usize, frame_start: u64) -> Vec<u8> {
    let mut key = vec![CHECKPOINT_PREFIX];
    key.extend_from_slice(&size.to_be_bytes());
    if entries == 0 && frame_start > 0 {
        key.extend_from_slice(&frame_start.to_be_bytes());
    }
    key
}

const MAGIC: &[u8; 4] = b"ALF1";
/// Frame header: magic, frame_len, first_index, entries, keys, has_checkpoint.
const FRAME_HEADER: usize = 4 + 8 + 8 + 4 + 4 + 1;
/// Entry record header: index, frame_start, leaf_len, body_len, nodes.
const ENTRY_HEADER: usize = 8 + 8 + 4 + 4 + 1;

/// Keys of the log store's own: `m/applied` in `keys/`, `m/layout` in sled.
const APPLIED_KEY: &[u8] = b"m/applied";
const LAYOUT_KEY: &[u8] = b"m/layout";
/// Layout 2: entries in `ledger.log` (layout 1 is the all-in-sled [`super::SledStore`]).
pub const LAYOUT_VERSION: &[u8] = b"2";

/// An entry record's nodes, leaf and body.
type RecordParts = (Vec<Hash>, Vec<u8>, Vec<u8>);

/// Byte ranges of one entry's parts in `ledger.log`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryRanges {
    pub leaf: std::ops::Range<u64>,
    pub body: std::ops::Range<u64>,
}

/// Where the log ends, as the writer left it.
#[derive(Debug)]
struct Tail {
    /// End of the last durable frame.
    log_end: u64,
    /// Log offset up to which frames' idempotency keys are in `keys`.
    keys_applied: u64,
    /// The last checkpoint in the log, size and note (to recognise a retried batch).
    last_checkpoint: Option<(u64, Vec<u8>)>,
    /// Entries in durable frames (readers see `LogStore::entries`, raised once their
    /// offsets are in the index file).
    in_log: u64,
    /// Offsets of durable entries not yet written to the index file (its write failed):
    /// `(position in the file, bytes)`, written before anything else.
    unindexed: Option<(u64, Vec<u8>)>,
    /// Bytes of a write that never completed, found past the frames at open: set aside
    /// before the first frame is written over them ([`LogStore::set_aside_torn`]).
    torn: Option<std::ops::Range<u64>>,
}

/// What lies past the intact frames of `ledger.log` at open.
enum LogEnd {
    /// Nothing: zeros (space zeroed ahead) or the end of the file.
    Clean,
    /// A write that never completed, ending at `end`: never acknowledged.
    Torn { end: u64 },
}

/// Damage found at open, tied to the first entry it leaves untrusted.
fn damaged(first_bad_index: u64, detail: String) -> StorageError {
    StorageError::Damaged {
        first_bad_index,
        detail: format!(
            "{detail}. Nothing was changed. `audit-ledger verify` reports it; `audit-ledger cut-log --at-entry {first_bad_index}` cuts the log there, only when told, keeping what it cuts"
        ),
    }
}

/// Sector size for telling a torn write: a write reaches the disk a sector at a time.
const SECTOR: u64 = 512;

/// Whether `frame` (the bytes at `start` for the length its header gives) shows a write
/// that never completed: its checksum's last bytes are zeros, or some sector of it holds
/// only zeros (a part at least 64 bytes long, so a frame's own short zero runs at a sector
/// edge do not count). A frame a bit flip or an edit damaged has data in every sector.
fn looks_unfinished(frame: &[u8], start: u64) -> bool {
    let tail_unwritten = frame.len() >= 16 && frame[frame.len() - 16..].iter().all(|&b| b == 0);
    let mut sector_start = start - start % SECTOR;
    let end = start + frame.len() as u64;
    while sector_start < end {
        let from = sector_start.max(start);
        let to = (sector_start + SECTOR).min(end);
        let part = &frame[(from - start) as usize..(to - start) as usize];
        if part.len() >= 64 && part.iter().all(|&b| b == 0) {
            return true;
        }
        sector_start += SECTOR;
    }
    tail_unwritten
}

pub struct LogStore {
    db: sled::Db,
    /// A second sled database, which held the access log before its file.
    derived: sled::Db,
    /// Idempotency keys, derived from the frames.
    keys: RunIndex,
    /// The compliance indexes (written by their owner, `compliance::index`): the
    /// communication lists and the fact lists.
    index: Arc<RunIndex>,
    facts: Arc<RunIndex>,
    dir: PathBuf,
    log: File,
    /// Zeroed space ahead of the frames, and the frames' writes ([`LogSpace`]).
    space: LogSpace,
    idx: File,
    /// Entries in the log (readers only ask for fewer).
    entries: AtomicU64,
    /// End of the last durable frame, for readers (who never take `tail`'s lock: the
    /// writer holds it through a commit's `fdatasync`).
    log_end: AtomicU64,
    tail: Mutex<Tail>,
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// One frame, parsed.
struct Frame {
    start: u64,
    len: u64,
    first_index: u64,
    /// Absolute log offsets of the entry records.
    entry_offsets: Vec<u64>,
    keys: Vec<(Vec<u8>, IdempotencyRecord)>,
    checkpoint: Option<(u64, Vec<u8>)>,
}

/// Serializes a batch as the frame that starts at `start`; returns it and the offsets of
/// its entry records.
fn encode_frame(batch: &CommitBatch, start: u64) -> (Vec<u8>, Vec<u64>) {
    let size = encode_len(batch);
    let mut frame = Vec::with_capacity(size);
    frame.extend_from_slice(MAGIC);
    frame.extend_from_slice(&(size as u64).to_le_bytes());
    let first = batch.entries.first().map_or(0, |entry| entry.index);
    frame.extend_from_slice(&first.to_le_bytes());
    frame.extend_from_slice(&(batch.entries.len() as u32).to_le_bytes());
    frame.extend_from_slice(&(batch.idempotency.len() as u32).to_le_bytes());
    frame.push(u8::from(batch.checkpoint.is_some()));
    let mut offsets = Vec::with_capacity(batch.entries.len());
    for entry in &batch.entries {
        offsets.push(start + frame.len() as u64);
        frame.extend_from_slice(&entry.index.to_le_bytes());
        frame.extend_from_slice(&start.to_le_bytes());
        frame.extend_from_slice(&(entry.leaf.len() as u32).to_le_bytes());
        frame.extend_from_slice(&(entry.body.len() as u32).to_le_bytes());
        frame.push(entry.nodes.len() as u8);
        for node in &entry.nodes {
            frame.extend_from_slice(&node.0);
        }
        frame.extend_from_slice(&entry.leaf);
        frame.extend_from_slice(&entry.body);
    }
    for (key, record) in &batch.idempotency {
        frame.extend_from_slice(&(key.len() as u16).to_le_bytes());
        frame.extend_from_slice(key);
        frame.extend_from_slice(&record.encode());
    }
    if let Some((tree_size, note)) = &batch.checkpoint {
        frame.extend_from_slice(&tree_size.to_le_bytes());
        frame.extend_from_slice(&(note.len() as u32).to_le_bytes());
        frame.extend_from_slice(note);
    }
    let digest = Sha256::digest(&frame);
    frame.extend_from_slice(&digest);
    debug_assert_eq!(frame.len(), size);
    (frame, offsets)
}

/// Reads the frame at `start`, or `None` when what is there is not a whole, intact frame
/// (the end of the log, or a write that never completed).
/// How far the frames at the start of `bytes` claim to reach: each header's magic and
/// length followed while they are plausible, whether or not the frame checks out.
fn declared_end(bytes: &[u8]) -> usize {
    let mut at = 0usize;
    while let Some(header) = bytes.get(at..at + FRAME_HEADER) {
        let len = u64_at(header, 4);
        let Some(end) = usize::try_from(len)
            .ok()
            .and_then(|len| at.checked_add(len))
        else {
            break;
        };
        if &header[..4] != MAGIC || len < (FRAME_HEADER + HASH_SIZE) as u64 || end > bytes.len() {
            break;
        }
        at = end;
    }
    at
}

fn read_frame(log: &File, start: u64, log_len: u64) -> Result<Option<Frame>, StorageError> {
    if start
        .checked_add(FRAME_HEADER as u64)
        .is_none_or(|end| end > log_len)
    {
        return Ok(None);
    }
    let mut header = [0u8; FRAME_HEADER];
    log.read_exact_at(&mut header, start).map_err(io)?;
    let len = u64_at(&header, 4);
    if &header[..4] != MAGIC
        || len < (FRAME_HEADER + HASH_SIZE) as u64
        || start.checked_add(len).is_none_or(|end| end > log_len)
    {
        return Ok(None);
    }
    let mut bytes = vec![0u8; len as usize];
    log.read_exact_at(&mut bytes, start).map_err(io)?;
    let body = bytes.len() - HASH_SIZE;
    if Sha256::digest(&bytes[..body]).as_slice() != &bytes[body..] {
        return Ok(None);
    }
    // Intact: from here on, a shape this code does not write is damage, not a torn write.
    let bad = |what: &str| malformed(format!("log frame at {start}: {what}"));
    let first_index = u64_at(&bytes, 12);
    let entries = u32_at(&bytes, 20) as usize;
    let keys = u32_at(&bytes, 24) as usize;
    let has_checkpoint = bytes[28] == 1;
    let mut at = FRAME_HEADER;
    let need = |at: usize, n: usize| {
        if at + n > body {
            Err(bad("runs past its end"))
        } else {
            Ok(())
        }
    };
    let mut entry_offsets = Vec::with_capacity(entries);
    for n in 0..entries {
        need(at, ENTRY_HEADER)?;
        if u64_at(&bytes, at) != first_index + n as u64 || u64_at(&bytes, at + 8) != start {
            return Err(bad("entry record out of place"));
        }
        let record = ENTRY_HEADER
            + u32_at(&bytes, at + 16) as usize
            + u32_at(&bytes, at + 20) as usize
            + bytes[at + 24] as usize * HASH_SIZE;
        need(at, record)?;
        entry_offsets.push(start + at as u64);
        at += record;
    }
    let mut idempotency = Vec::with_capacity(keys);
    for _ in 0..keys {
        need(at, 2)?;
        let key_len = u16::from_le_bytes([bytes[at], bytes[at + 1]]) as usize;
        need(at + 2, key_len + IdempotencyRecord::ENCODED_LEN)?;
        let key = bytes[at + 2..at + 2 + key_len].to_vec();
        let record = IdempotencyRecord::decode(
            &bytes[at + 2 + key_len..at + 2 + key_len + IdempotencyRecord::ENCODED_LEN],
        )
        .ok_or_else(|| bad("idempotency record"))?;
        idempotency.push((key, record));
        at += 2 + key_len + IdempotencyRecord::ENCODED_LEN;
    }
    let checkpoint = if has_checkpoint {
        need(at, 12)?;
        let tree_size = u64_at(&bytes, at);
        let note_len = u32_at(&bytes, at + 8) as usize;
        need(at + 12, note_len)?;
        let note = bytes[at + 12..at + 12 + note_len].to_vec();
        at += 12 + note_len;
        Some((tree_size, note))
    } else {
        None
    };
    if at != body {
        return Err(bad("has bytes after its parts"));
    }
    Ok(Some(Frame {
        start,
        len,
        first_index,
        entry_offsets,
        keys: idempotency,
        checkpoint,
    }))
}

impl LogStore {
    /// Opens (or creates) the store in `dir`: the log and its index are checked and
    /// completed from the log, a torn last frame is cut off, and `keys/` is brought up to the
    /// log's end.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Self, StorageError> {
        // sled holds only the layout version here; `derived/` what the access log was before
        // its file (moved at open: nothing is written there any more).
        let db = open_sled(dir, 1 << 20, Some(1000))?;
        let derived = open_sled(&dir.join(DERIVED_DIR), cache_bytes / 4, Some(1000))?;
        let keys = RunIndex::open(&dir.join(KEYS_DIR), RunOptions::default())?;
        // Lists are read whole or from a position in them: filtered by list, a read of a
        // customer's facts (every verdict, three lists) skips the runs that hold none.
        let lists = |name: &str| -> Result<Arc<RunIndex>, StorageError> {
            Ok(Arc::new(RunIndex::open(
                &dir.join(name),
                RunOptions {
                    filter: Filter::Lists,
                    ..RunOptions::default()
                },
            )?))
        };
        let index = lists(INDEX_DIR)?;
        let facts = lists(FACTS_DIR)?;
        match db.get(LAYOUT_KEY).map_err(backend)? {
            Some(version) if version.as_ref() == LAYOUT_VERSION => {}
            Some(version) => {
                return Err(malformed(format!(
                    "store layout version {:?}, expected {:?} (entries in {LOG_FILE})",
                    String::from_utf8_lossy(&version),
                    String::from_utf8_lossy(LAYOUT_VERSION)
                )));
            }
            None => {
                db.insert(LAYOUT_KEY, LAYOUT_VERSION).map_err(backend)?;
                db.flush().map_err(backend)?;
            }
        }
        let open = |name: &str| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(dir.join(name))
                .map_err(io)
        };
        let log = open(LOG_FILE)?;
        let space = LogSpace::new(log.try_clone().map_err(io)?).map_err(io)?;
        let idx = open(INDEX_FILE)?;
        let keys_applied = read_applied(keys.get(APPLIED_KEY)?)?;
        reclaim_old_sled_keys(&db, &derived)?;
        let store = LogStore {
            db,
            derived,
            keys,
            index,
            facts,
            dir: dir.to_owned(),
            log,
            space,
            idx,
            entries: AtomicU64::new(0),
            log_end: AtomicU64::new(0),
            tail: Mutex::new(Tail {
                log_end: 0,
                keys_applied,
                last_checkpoint: None,
                in_log: 0,
                unindexed: None,
                torn: None,
            }),
        };
        store.recover()?;
        Ok(store)
    }

    /// The communication lists' space (a [`RunIndex`]).
    pub fn index(&self) -> Arc<dyn IndexStore> {
        self.index.clone()
    }

    /// The fact lists' space (a [`RunIndex`]).
    pub fn facts(&self) -> Arc<dyn IndexStore> {
        self.facts.clone()
    }

    /// The sled tree the access log was kept in before it had a file of its own
    /// ([`super::AccessFile`]): read once, at open, to move its records.
    pub fn legacy_access_tree(&self) -> Result<SledIndex, StorageError> {
        SledIndex::open(&self.derived, super::sled_store::ACCESS_TREE)
    }

    /// Offset of entry `index`'s record, from the index file.
    fn offset(&self, index: u64) -> Result<u64, StorageError> {
        let mut bytes = [0u8; 8];
        self.idx.read_exact_at(&mut bytes, index * 8).map_err(io)?;
        Ok(u64::from_le_bytes(bytes))
    }

    /// The last frame the index file vouches for: the frame of the highest indexed entry
    /// whose record and frame are intact. `None` when there is none.
    fn last_indexed_frame(&self, log_len: u64) -> Result<Option<Frame>, StorageError> {
        let indexed = self.idx.metadata().map_err(io)?.len() / 8;
        // Only the index file's unsynced tail can be wrong; a few steps back always reach a
        // frame that was durable before its offsets were written.
        for index in (0..indexed).rev().take(64) {
            if let Some(frame) = self.frame_vouched(index, log_len)? {
                return Ok(Some(frame));
            }
        }
        Ok(None)
    }

    /// The intact frame holding entry `index` at the offset the index file gives, or
    /// `None` when that offset does not lead to it.
    fn frame_vouched(&self, index: u64, log_len: u64) -> Result<Option<Frame>, StorageError> {
        let offset = self.offset(index)?;
        let Some(header) = self.header_naming(index, offset, log_len)? else {
            return Ok(None);
        };
        Ok(read_frame(&self.log, u64_at(&header, 8), log_len)?
            .filter(|frame| frame.entry_offsets.contains(&offset)))
    }

    /// The entry record header at `offset`, when it lies below `log_end` and names `index`.
    fn header_naming(
        &self,
        index: u64,
        offset: u64,
        log_end: u64,
    ) -> Result<Option<[u8; ENTRY_HEADER]>, StorageError> {
        if offset
            .checked_add(ENTRY_HEADER as u64)
            .is_none_or(|end| end > log_end)
        {
            return Ok(None);
        }
        let mut header = [0u8; ENTRY_HEADER];
        self.log.read_exact_at(&mut header, offset).map_err(io)?;
        Ok((u64_at(&header, 0) == index).then_some(header))
    }

    /// Entry `index`'s offset, from the index file, checked: when the record there does
    /// not name `index`, the index file (derived, never synced) is wrong, and the offsets
    /// are derived again from the frames ([`LogStore::repair_offsets`]).
    fn located(&self, index: u64) -> Result<(u64, [u8; ENTRY_HEADER]), StorageError> {
        let log_end = self.log_end.load(Ordering::Acquire);
        let offset = self.offset(index)?;
        if let Some(header) = self.header_naming(index, offset, log_end)? {
            return Ok((offset, header));
        }
        let offset = self.repair_offsets(index)?;
        let header = self.header_naming(index, offset, log_end)?.ok_or_else(|| {
            damaged(
                index,
                format!("entry {index}: its record in the frame that holds it names another index"),
            )
        })?;
        Ok((offset, header))
    }

    /// Derives the offsets of entry `index`'s frame (and of the frames between it and the
    /// nearest frame the index file still vouches for) from the log again, writes them to
    /// the index file, and returns entry `index`'s. Readers call it when the index file
    /// led them astray: it is derived data, and damage to it costs a walk, not an entry.
    fn repair_offsets(&self, index: u64) -> Result<u64, StorageError> {
        let log_end = self.log_end.load(Ordering::Acquire);
        let mut at = 0;
        for earlier in (index.saturating_sub(4096)..index).rev() {
            if let Some(frame) = self.frame_vouched(earlier, log_end)? {
                at = frame.start;
                break;
            }
        }
        while let Some(frame) = read_frame(&self.log, at, log_end)? {
            let first = frame.first_index;
            let mut offsets = Vec::with_capacity(frame.entry_offsets.len() * 8);
            for offset in &frame.entry_offsets {
                offsets.extend_from_slice(&offset.to_le_bytes());
            }
            self.idx.write_all_at(&offsets, first * 8).map_err(io)?;
            if let Some(&offset) = index
                .checked_sub(first)
                .and_then(|n| frame.entry_offsets.get(n as usize))
            {
                tracing::warn!(
                    index,
                    "{INDEX_FILE} gave a wrong offset for this entry: rewritten from {LOG_FILE}"
                );
                return Ok(offset);
            }
            at = frame.start + frame.len;
        }
        Err(damaged(
            index,
            format!("entry {index}: no intact frame of {LOG_FILE} holds it"),
        ))
    }

    fn recover(&self) -> Result<(), StorageError> {
        let log_len = self.log.metadata().map_err(io)?.len();
        // What the index file vouched for before this open touched it: evidence of which
        // frames were durable (their offsets are written only after their `fdatasync`).
        let indexed = self.idx.metadata().map_err(io)?.len() / 8;
        let mut tail = self.tail.lock().expect("tail lock");
        let (mut at, mut entries) = match self.last_indexed_frame(log_len)? {
            Some(frame) => {
                tail.last_checkpoint = frame.checkpoint.clone();
                (frame.start, frame.first_index)
            }
            None => (0, 0),
        };
        // From the last frame the index vouches for (again: its offsets may be partial),
        // every intact frame is kept and indexed; the first that is not ends the frames.
        // An intact frame out of place (moved) is damage from the entry it should hold on.
        let frame_at = |at: u64, entries: u64| {
            read_frame(&self.log, at, log_len).map_err(|error| match error {
                StorageError::Malformed(detail) => damaged(entries, detail),
                other => other,
            })
        };
        while let Some(frame) = frame_at(at, entries)? {
            if frame.first_index != entries && !frame.entry_offsets.is_empty() {
                return Err(damaged(
                    entries,
                    format!(
                        "the frame at byte {at} of {LOG_FILE} starts at entry {} where {entries} was due (a frame was removed or replayed)",
                        frame.first_index
                    ),
                ));
            }
            let mut offsets = Vec::with_capacity(frame.entry_offsets.len() * 8);
            for offset in &frame.entry_offsets {
                offsets.extend_from_slice(&offset.to_le_bytes());
            }
            self.idx.write_all_at(&offsets, entries * 8).map_err(io)?;
            entries += frame.entry_offsets.len() as u64;
            if frame.checkpoint.is_some() {
                tail.last_checkpoint = frame.checkpoint.clone();
            }
            at = frame.start + frame.len;
        }
        // Only now is anything cut or set aside: once what lies past the frames is known
        // never to have been acknowledged.
        match self.examine_end(at, log_len, entries, indexed, tail.keys_applied)? {
            LogEnd::Clean => {}
            LogEnd::Torn { end } => {
                tracing::warn!(
                    offset = at,
                    bytes = end - at,
                    "an incomplete frame at the end of the log (a write that never completed, never acknowledged): it is set aside in {TORN_DIR}/ before the next write"
                );
                tail.torn = Some(at..end);
            }
        }
        self.idx.set_len(entries * 8).map_err(io)?;
        self.idx.sync_all().map_err(io)?;
        tail.log_end = at;
        tail.in_log = entries;
        self.log_end.store(at, Ordering::Release);
        self.entries.store(entries, Ordering::Release);
        self.apply_from(&mut tail)?;
        Ok(())
    }

    /// What lies in `ledger.log` past its intact frames, which end at `at` and hold
    /// `entries` entries. A write that never completed was never acknowledged, and may be
    /// set aside; anything that may have been acknowledged is damage, and the open stops
    /// with nothing changed. It may have been acknowledged when:
    /// - `keys/` applied frames past `at` (`keys_applied`), or the index file holds offsets
    ///   of entries past the intact ones (both are written only after a frame's
    ///   `fdatasync`);
    /// - an intact frame lies further on (frames are written one after another, each only
    ///   once the one before is durable);
    /// - the frame at `at` was written whole — every sector of it holds data and its
    ///   checksum's last bytes are there — yet fails its checksum: a torn write leaves
    ///   sectors of zeros (the space ahead is zeroed and synced before frames reach it).
    fn examine_end(
        &self,
        at: u64,
        log_len: u64,
        entries: u64,
        indexed: u64,
        keys_applied: u64,
    ) -> Result<LogEnd, StorageError> {
        let refuse = |detail: String| {
            Err(damaged(
                entries,
                format!("{LOG_FILE} holds intact frames only up to byte {at}; {detail}"),
            ))
        };
        if keys_applied > at {
            return refuse(format!(
                "frames up to byte {keys_applied} were durable and applied to {KEYS_DIR}/: the log was truncated or altered"
            ));
        }
        if indexed > entries {
            let mut offsets = vec![0u8; ((indexed - entries) * 8) as usize];
            self.idx
                .read_exact_at(&mut offsets, entries * 8)
                .map_err(io)?;
            let vouched = offsets
                .chunks_exact(8)
                .filter(|offset| offset.iter().any(|&byte| byte != 0))
                .count();
            if vouched > 0 {
                return refuse(format!(
                    "{INDEX_FILE} holds the offsets of {vouched} entries past them, written only once their frames were durable: the log was truncated or altered"
                ));
            }
        }
        let mut data_end = at;
        let mut position = at;
        let mut chunk = vec![0u8; 1 << 20];
        while position < log_len {
            let len = (log_len - position).min(chunk.len() as u64) as usize;
            let bytes = &mut chunk[..len];
            self.log.read_exact_at(bytes, position).map_err(io)?;
            let Some(last) = bytes.iter().rposition(|&byte| byte != 0) else {
                // Zeros (the usual space ahead): nothing to look at.
                position += len as u64;
                continue;
            };
            data_end = position + last as u64 + 1;
            for (offset, _) in bytes
                .windows(MAGIC.len())
                .enumerate()
                .filter(|(_, window)| *window == MAGIC)
            {
                let start = position + offset as u64;
                if start == at {
                    continue;
                }
                match read_frame(&self.log, start, log_len) {
                    Ok(None) => {}
                    Ok(Some(_)) | Err(_) => {
                        return refuse(format!(
                            "an intact frame lies further on, at byte {start}: the frame at {at} was complete once, so it was altered or damaged"
                        ));
                    }
                }
            }
            // Overlap by the magic's length less one, so no magic is missed at a seam.
            position += (len as u64).max(MAGIC.len() as u64) - (MAGIC.len() as u64 - 1);
            if position + MAGIC.len() as u64 > log_len {
                break;
            }
        }
        if data_end == at {
            return Ok(LogEnd::Clean);
        }
        if let Some(len) = self.whole_frame_len(at, log_len)? {
            let mut bytes = vec![0u8; len as usize];
            self.log.read_exact_at(&mut bytes, at).map_err(io)?;
            if !looks_unfinished(&bytes, at) {
                return refuse(format!(
                    "the frame there ({len} bytes) was written whole but fails its SHA-256: it may have been acknowledged, and was altered or damaged"
                ));
            }
        }
        if let Some(len) = self.whole_but_for_its_header(at, log_len)? {
            return refuse(format!(
                "the frame there ({len} bytes) was written whole, but its magic or length field was altered or damaged"
            ));
        }
        Ok(LogEnd::Torn { end: data_end })
    }

    /// The length of the frame at `at` when its header is readable and the file holds all
    /// of it.
    fn whole_frame_len(&self, at: u64, log_len: u64) -> Result<Option<u64>, StorageError> {
        if at + (FRAME_HEADER as u64) > log_len {
            return Ok(None);
        }
        let mut header = [0u8; FRAME_HEADER];
        self.log.read_exact_at(&mut header, at).map_err(io)?;
        let len = u64_at(&header, 4);
        let fits = len >= (FRAME_HEADER + HASH_SIZE) as u64
            && at.checked_add(len).is_some_and(|end| end <= log_len);
        Ok((&header[..4] == MAGIC && fits).then_some(len))
    }

    /// The length of the frame at `at` when, its magic and length field aside, it is a
    /// whole frame: its records walked from the counts in its header end where a checksum
    /// matches them (with the magic and length a frame of that length has). A torn write
    /// never checks out so; a frame whose header bytes a bit flip hit does.
    fn whole_but_for_its_header(&self, at: u64, log_len: u64) -> Result<Option<u64>, StorageError> {
        let available = log_len.saturating_sub(at);
        if available < (FRAME_HEADER + HASH_SIZE) as u64 {
            return Ok(None);
        }
        let read = |offset: u64, len: usize| -> Result<Option<Vec<u8>>, StorageError> {
            if offset + len as u64 > log_len {
                return Ok(None);
            }
            let mut bytes = vec![0u8; len];
            self.log.read_exact_at(&mut bytes, offset).map_err(io)?;
            Ok(Some(bytes))
        };
        let Some(header) = read(at, FRAME_HEADER)? else {
            return Ok(None);
        };
        let first_index = u64_at(&header, 12);
        let (entries, keys) = (u32_at(&header, 20) as u64, u32_at(&header, 24) as u64);
        if header[28] > 1 {
            return Ok(None);
        }
        let mut position = at + FRAME_HEADER as u64;
        for n in 0..entries {
            let Some(record) = read(position, ENTRY_HEADER)? else {
                return Ok(None);
            };
            if u64_at(&record, 0) != first_index + n || u64_at(&record, 8) != at {
                return Ok(None);
            }
            position += (ENTRY_HEADER
                + u32_at(&record, 16) as usize
                + u32_at(&record, 20) as usize
                + record[24] as usize * HASH_SIZE) as u64;
        }
        for _ in 0..keys {
            let Some(key_len) = read(position, 2)? else {
                return Ok(None);
            };
            position += (2
                + u16::from_le_bytes([key_len[0], key_len[1]]) as usize
                + IdempotencyRecord::ENCODED_LEN) as u64;
        }
        if header[28] == 1 {
            let Some(checkpoint) = read(position, 12)? else {
                return Ok(None);
            };
            position += 12 + u32_at(&checkpoint, 8) as u64;
        }
        let len = position - at + HASH_SIZE as u64;
        let Some(mut bytes) = read(at, len as usize)? else {
            return Ok(None);
        };
        bytes[..4].copy_from_slice(MAGIC);
        bytes[4..12].copy_from_slice(&len.to_le_bytes());
        let body = bytes.len() - HASH_SIZE;
        Ok((Sha256::digest(&bytes[..body]).as_slice() == &bytes[body..]).then_some(len))
    }

    /// Before the first frame after an open that found a torn write: its bytes are copied
    /// into `torn/` (synced) and zeroed in the log, so the next torn write is never mixed
    /// with an older one's bytes (which would make it look written whole).
    fn set_aside_torn(&self, tail: &mut Tail) -> Result<(), StorageError> {
        let Some(range) = tail.torn.clone() else {
            return Ok(());
        };
        let mut bytes = vec![0u8; (range.end - range.start) as usize];
        self.log
            .read_exact_at(&mut bytes, range.start)
            .map_err(io)?;
        let dir = self.dir.join(TORN_DIR);
        std::fs::create_dir_all(&dir).map_err(io)?;
        let path = dir.join(format!("{}-{}.bin", range.start, range.end));
        let file = File::create(&path).map_err(io)?;
        file.write_all_at(&bytes, 0).map_err(io)?;
        file.sync_all().map_err(io)?;
        File::open(&dir)
            .and_then(|dir| dir.sync_all())
            .map_err(io)?;
        bytes.fill(0);
        self.log.write_all_at(&bytes, range.start).map_err(io)?;
        self.log.sync_data().map_err(io)?;
        tracing::warn!(
            offset = range.start,
            bytes = bytes.len(),
            path = %path.display(),
            "set aside the bytes of a write that never completed"
        );
        tail.torn = None;
        Ok(())
    }

    /// The first of the `entries` indexed entries whose record lies at or past byte `at`
    /// (the index file's offsets ascend): the first entry a damaged frame there holds.
    fn first_entry_from(&self, at: u64, entries: u64) -> u64 {
        let (mut low, mut high) = (0, entries);
        while low < high {
            let middle = low + (high - low) / 2;
            match self.offset(middle) {
                Ok(offset) if offset < at => low = middle + 1,
                _ => high = middle,
            }
        }
        low
    }

    /// Applies the frames from where `keys/` stops to `tail.log_end`.
    fn apply_from(&self, tail: &mut Tail) -> Result<(), StorageError> {
        let mut at = tail.keys_applied;
        while at < tail.log_end {
            let frame = read_frame(&self.log, at, tail.log_end)
                .ok()
                .flatten()
                .ok_or_else(|| {
                    damaged(
                        self.first_entry_from(at, tail.in_log),
                        format!("the frame at byte {at} of {LOG_FILE} is not intact (it was altered or damaged)"),
                    )
                })?;
            self.apply(
                tail,
                &frame.keys,
                frame.checkpoint.as_ref(),
                frame.entry_offsets.len(),
                frame.start,
                frame.len,
            )?;
            at = frame.start + frame.len;
        }
        Ok(())
    }

    /// Applies the frame at `start` (its idempotency keys and checkpoint) to `keys`, with
    /// the log offset it ends at, in one `apply`.
    fn apply(
        &self,
        tail: &mut Tail,
        keys: &[(Vec<u8>, IdempotencyRecord)],
        checkpoint: Option<&(u64, Vec<u8>)>,
        entries: usize,
        start: u64,
        len: u64,
    ) -> Result<(), StorageError> {
        let end = start + len;
        if tail.keys_applied > start {
            return Ok(());
        }
        let mut writes = Vec::with_capacity(keys.len() + 3);
        for (key, record) in keys {
            writes.push((idempotency_key(key), Some(record.encode().to_vec())));
        }
        if let Some((size, note)) = checkpoint {
            writes.push((checkpoint_key(*size, entries, start), Some(note.clone())));
            let mut latest = size.to_be_bytes().to_vec();
            latest.extend_from_slice(note);
            writes.push((LATEST_KEY.to_vec(), Some(latest)));
        }
        writes.push((APPLIED_KEY.to_vec(), Some(end.to_le_bytes().to_vec())));
        self.keys.apply(writes)?;
        tail.keys_applied = end;
        Ok(())
    }

    /// The parts' lengths (nodes bytes, leaf, body) of the record whose header is
    /// `header`, at `offset`; a record running past the log's end is damage, named.
    fn parts(
        &self,
        index: u64,
        offset: u64,
        header: &[u8],
    ) -> Result<(usize, usize, usize), StorageError> {
        if u64_at(header, 0) != index {
            return Err(malformed(format!(
                "entry {index}: its record names another index"
            )));
        }
        let leaf = u32_at(header, 16) as usize;
        let body = u32_at(header, 20) as usize;
        let nodes = header[24] as usize * HASH_SIZE;
        let log_end = self.log_end.load(Ordering::Acquire);
        if offset + (ENTRY_HEADER + nodes + leaf + body) as u64 > log_end {
            return Err(malformed(format!(
                "entry {index}: its record runs past the log's end"
            )));
        }
        Ok((nodes, leaf, body))
    }

    /// Reads entry `index`'s record: (nodes, leaf, body).
    fn record(&self, index: u64) -> Result<Option<RecordParts>, StorageError> {
        if index >= self.entries.load(Ordering::Acquire) {
            return Ok(None);
        }
        let (offset, header) = self.located(index)?;
        let (nodes, leaf_len, body_len) = self.parts(index, offset, &header)?;
        let mut bytes = vec![0u8; nodes + leaf_len + body_len];
        self.log
            .read_exact_at(&mut bytes, offset + ENTRY_HEADER as u64)
            .map_err(io)?;
        let body = bytes.split_off(nodes + leaf_len);
        let leaf = bytes.split_off(nodes);
        Ok(Some((decode_nodes(&bytes), leaf, body)))
    }

    /// Entry `index`'s tree nodes alone (proofs read nothing else).
    fn nodes_of(&self, index: u64) -> Result<Option<Vec<Hash>>, StorageError> {
        if index >= self.entries.load(Ordering::Acquire) {
            return Ok(None);
        }
        let mut offset = self.offset(index)?;
        // The header and up to 8 nodes in one read; more in a second.
        let mut first = [0u8; ENTRY_HEADER + 8 * HASH_SIZE];
        let mut read = self.log.read_at(&mut first, offset).map_err(io)?;
        if read < ENTRY_HEADER || u64_at(&first, 0) != index {
            offset = self.located(index)?.0;
            read = self.log.read_at(&mut first, offset).map_err(io)?;
        }
        self.parts(index, offset, &first[..ENTRY_HEADER])?;
        let count = first[24] as usize;
        let bytes = if count <= 8 && read >= ENTRY_HEADER + count * HASH_SIZE {
            first[ENTRY_HEADER..ENTRY_HEADER + count * HASH_SIZE].to_vec()
        } else {
            let mut bytes = vec![0u8; count * HASH_SIZE];
            self.log
                .read_exact_at(&mut bytes, offset + ENTRY_HEADER as u64)
                .map_err(io)?;
            bytes
        };
        Ok(Some(decode_nodes(&bytes)))
    }

    /// Where each intact frame lies in `ledger.log`, in order (forensics, and tests that
    /// cut, drop or replay a frame behind the ledger's back).
    pub fn frame_spans(&self) -> Result<Vec<std::ops::Range<u64>>, StorageError> {
        let log_end = self.log_end.load(Ordering::Acquire);
        let mut spans = Vec::new();
        let mut at = 0;
        while let Some(frame) = read_frame(&self.log, at, log_end)? {
            spans.push(frame.start..frame.start + frame.len);
            at = frame.start + frame.len;
        }
        Ok(spans)
    }

    /// Where the log's frames end in `ledger.log` (the file is zeroed further ahead).
    pub fn log_end(&self) -> u64 {
        self.log_end.load(Ordering::Acquire)
    }

    /// Where entry `index`'s leaf and body lie in `ledger.log`, for forensics and for tests
    /// that alter a stored entry behind the ledger's back.
    pub fn entry_ranges(&self, index: u64) -> Result<Option<EntryRanges>, StorageError> {
        if index >= self.entries.load(Ordering::Acquire) {
            return Ok(None);
        }
        let (offset, header) = self.located(index)?;
        let (nodes, leaf, body) = self.parts(index, offset, &header)?;
        let leaf_start = offset + (ENTRY_HEADER + nodes) as u64;
        let body_start = leaf_start + leaf as u64;
        Ok(Some(EntryRanges {
            leaf: leaf_start..body_start,
            body: body_start..body_start + body as u64,
        }))
    }

    /// Bytes the store occupies on disk: the log, its index, the run indexes and sled.
    pub fn size_on_disk(&self) -> Result<u64, StorageError> {
        Ok(self.db.size_on_disk().map_err(backend)?
            + self.derived.size_on_disk().map_err(backend)?
            + self.keys.size_on_disk()
            + self.index.size_on_disk()
            + self.facts.size_on_disk()
            + self.log.metadata().map_err(io)?.len()
            + self.idx.metadata().map_err(io)?.len())
    }

    /// The sled database, for tests.
    pub fn raw(&self) -> &sled::Db {
        &self.db
    }
}

impl Drop for LogStore {
    /// A clean stop leaves sled flushed; the run indexes write their tables out as they
    /// close (`RunIndex`'s own drop), so the next open has no frames to apply.
    fn drop(&mut self) {
        if let Err(error) = self.db.flush() {
            tracing::warn!(%error, "sled flush at close failed");
        }
        if let Err(error) = self.derived.flush() {
            tracing::warn!(%error, "sled flush of derived/ at close failed");
        }
    }
}

/// Where `cut-log` keeps what it cut, inside the store directory: one folder per cut.
pub const CUTS_DIR: &str = "cuts";

/// What `cut-log` finds (and, when told, does): where `ledger.log` is cut and what lies
/// past the cut. Written as `cut.json` beside the cut bytes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LogCut {
    /// Entries kept: the log is cut where entry `at_entry` would begin.
    pub at_entry: u64,
    /// Byte of `ledger.log` the cut is at (the end of the last frame kept).
    pub at_byte: u64,
    /// Length of `ledger.log` before the cut (space zeroed ahead included).
    pub log_bytes: u64,
    /// Bytes cut (up to the last one that is not zero) and their SHA-256, hex.
    pub cut_bytes: u64,
    pub cut_sha256: String,
    /// Entries in intact frames from the start of the log.
    pub intact_entries: u64,
    /// Entries whose offsets the index file held: the ones acknowledged, as far as it knew.
    pub indexed_entries: u64,
    /// Tree sizes of the intact checkpoints past the cut (signed, maybe seen by clients).
    pub checkpoints_cut: Vec<u64>,
    /// Why, as the operator said.
    pub reason: String,
    /// When (RFC 3339, UTC).
    pub cut_at: String,
    /// The folder holding `cut.json`, the cut bytes and the index file as it was (once done).
    pub kept_in: Option<PathBuf>,
}

/// Plans (and with `confirm`, makes) a cut of a stopped log store's `ledger.log` where
/// entry `at_entry` would begin: the only way anything acknowledged is ever removed, and
/// only when an operator asks, after the store refused to open on damage. The cut bytes,
/// the index file as it was and a `cut.json` record are kept in `cuts/<time>-entry-<N>/`
/// (synced before anything is cut); the derived `keys/`, `facts/` and `index/` are
/// removed, to be rebuilt from the shortened log at the next open.
pub fn cut_log(
    dir: &Path,
    at_entry: u64,
    reason: &str,
    confirm: bool,
) -> Result<LogCut, StorageError> {
    // Held through the cut: a running server holds it too, so a live store is never cut.
    let _lock = open_sled(dir, 1 << 20, None)?;
    let log = File::open(dir.join(LOG_FILE)).map_err(io)?;
    let log_len = log.metadata().map_err(io)?.len();
    // (end byte, entries so far, checkpoint size) after each intact frame, from the start.
    let mut frames: Vec<(u64, u64, Option<u64>)> = vec![(0, 0, None)];
    let (mut at, mut entries) = (0u64, 0u64);
    while let Ok(Some(frame)) = read_frame(&log, at, log_len) {
        if frame.first_index != entries && !frame.entry_offsets.is_empty() {
            break;
        }
        entries += frame.entry_offsets.len() as u64;
        at = frame.start + frame.len;
        frames.push((at, entries, frame.checkpoint.map(|(size, _)| size)));
    }
    let Some(kept) = frames.iter().rposition(|&(_, count, _)| count == at_entry) else {
        return Err(malformed(if at_entry > entries {
            format!(
                "entry {at_entry} lies past the intact frames of {LOG_FILE}, which hold entries 0..{entries}"
            )
        } else {
            let before = frames
                .iter()
                .rev()
                .find(|f| f.1 < at_entry)
                .map_or(0, |f| f.1);
            let after = frames
                .iter()
                .find(|f| f.1 > at_entry)
                .map_or(entries, |f| f.1);
            format!(
                "entry {at_entry} is inside a frame; a cut can only be where a frame begins: entry {before} or {after}"
            )
        }));
    };
    let at_byte = frames[kept].0;
    let mut cut = vec![0u8; (log_len - at_byte) as usize];
    log.read_exact_at(&mut cut, at_byte).map_err(io)?;
    // The file is zeroed ahead of the frames: keep what the frame headers claim (a frame
    // may end in a zero byte) or, past that, up to the last byte written.
    let claimed = declared_end(&cut);
    cut.truncate(
        cut.iter()
            .rposition(|&byte| byte != 0)
            .map_or(0, |last| last + 1)
            .max(claimed),
    );
    let idx_path = dir.join(INDEX_FILE);
    let idx = std::fs::read(&idx_path).unwrap_or_default();
    let now = std::time::SystemTime::now();
    let mut record = LogCut {
        at_entry,
        at_byte,
        log_bytes: log_len,
        cut_bytes: cut.len() as u64,
        cut_sha256: Sha256::digest(&cut)
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect(),
        intact_entries: entries,
        indexed_entries: idx.len() as u64 / 8,
        checkpoints_cut: frames[kept + 1..].iter().filter_map(|f| f.2).collect(),
        reason: reason.to_owned(),
        cut_at: humantime::format_rfc3339_seconds(now).to_string(),
        kept_in: None,
    };
    if !confirm {
        return Ok(record);
    }
    let stamp = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    let kept_in = dir.join(CUTS_DIR).join(format!("{stamp}-entry-{at_entry}"));
    std::fs::create_dir_all(&kept_in).map_err(io)?;
    record.kept_in = Some(kept_in.clone());
    let json = serde_json::to_vec_pretty(&record)
        .map_err(|error| StorageError::Backend(error.to_string()))?;
    for (name, bytes) in [
        ("ledger.log.cut", cut.as_slice()),
        (INDEX_FILE, idx.as_slice()),
        ("cut.json", json.as_slice()),
    ] {
        let file = File::create(kept_in.join(name)).map_err(io)?;
        file.write_all_at(bytes, 0).map_err(io)?;
        file.sync_all().map_err(io)?;
    }
    for folder in [kept_in.as_path(), &dir.join(CUTS_DIR), dir] {
        File::open(folder).and_then(|f| f.sync_all()).map_err(io)?;
    }
    // Kept and durable: now the cut.
    let writable = OpenOptions::new()
        .write(true)
        .open(dir.join(LOG_FILE))
        .map_err(io)?;
    writable.set_len(at_byte).map_err(io)?;
    writable.sync_all().map_err(io)?;
    if idx.len() as u64 > at_entry * 8 {
        let idx_file = OpenOptions::new().write(true).open(&idx_path).map_err(io)?;
        idx_file.set_len(at_entry * 8).map_err(io)?;
        idx_file.sync_all().map_err(io)?;
    }
    for derived in [KEYS_DIR, FACTS_DIR, INDEX_DIR] {
        match std::fs::remove_dir_all(dir.join(derived)) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(io(error)),
            _ => {}
        }
    }
    File::open(dir).and_then(|f| f.sync_all()).map_err(io)?;
    tracing::warn!(
        at_entry,
        at_byte,
        cut_bytes = record.cut_bytes,
        kept_in = %kept_in.display(),
        "cut the log, as told"
    );
    Ok(record)
}

/// Before the run indexes, sled held the idempotency keys and checkpoints (with
/// `m/applied` in sled) and the compliance indexes (the `index` tree of `derived/`). A
/// store from then is opened like one whose run indexes were lost — rebuilt from the log —
/// and what sled held is removed, not left to take disk.
fn reclaim_old_sled_keys(db: &sled::Db, derived: &sled::Db) -> Result<(), StorageError> {
    if db.get(APPLIED_KEY).map_err(backend)?.is_none() {
        return Ok(());
    }
    tracing::info!(
        "removing the idempotency keys, checkpoints and indexes sled held before the run indexes"
    );
    for key in db.iter().keys() {
        let key = key.map_err(backend)?;
        if key.as_ref() != LAYOUT_KEY && key.as_ref() != APPLIED_KEY {
            db.remove(key).map_err(backend)?;
        }
    }
    derived
        .drop_tree(super::sled_store::INDEX_TREE)
        .map_err(backend)?;
    // Last, so that an interrupted clean-up is taken up again at the next open.
    db.remove(APPLIED_KEY).map_err(backend)?;
    db.flush().map_err(backend)?;
    derived.flush().map_err(backend)?;
    Ok(())
}

/// A stored `m/applied` (little-endian u64), 0 when there is none.
fn read_applied(bytes: Option<Vec<u8>>) -> Result<u64, StorageError> {
    match bytes {
        Some(bytes) => Ok(u64::from_le_bytes(
            bytes
                .as_slice()
                .try_into()
                .map_err(|_| malformed("m/applied"))?,
        )),
        None => Ok(0),
    }
}

fn decode_nodes(bytes: &[u8]) -> Vec<Hash> {
    bytes
        .chunks_exact(HASH_SIZE)
        .map(|chunk| Hash(chunk.try_into().expect("chunks of HASH_SIZE")))
        .collect()
}

impl Store for LogStore {
    fn commit(&self, batch: &CommitBatch) -> Result<(), StorageError> {
        let mut tail = self.tail.lock().expect("tail lock");
        // A batch retried after a failure may already be in the log (its write was durable
        // but a later step failed): never write it twice, finish what is left.
        let in_log = tail.in_log;
        let written = match (batch.entries.first(), &batch.checkpoint) {
            (Some(first), _) => first.index < in_log,
            // A checkpoint alone (the empty tree's, or the same tree re-signed with a newer
            // access trail anchor): written if the log holds it or a later one.
            (None, Some((size, note))) => {
                tail.last_checkpoint
                    .as_ref()
                    .is_some_and(|(last, last_note)| {
                        last > size || (last == size && last_note == note)
                    })
            }
            (None, None) => true,
        };
        if !written {
            if let Some(first) = batch.entries.first()
                && first.index != in_log
            {
                return Err(malformed(format!(
                    "batch starts at entry {} but the log holds {in_log}",
                    first.index
                )));
            }
            self.set_aside_torn(&mut tail)?;
            let (frame, offsets) = encode_frame(batch, tail.log_end);
            let durable = self
                .space
                .write_frame(&frame, tail.log_end)
                .and_then(|()| self.log.sync_data());
            if let Err(error) = durable {
                // Whatever part reached the file is overwritten by the retry; its checksum
                // cannot match, so no open takes it for a frame.
                return Err(io(error));
            }
            let mut bytes = Vec::with_capacity(offsets.len() * 8);
            for offset in &offsets {
                bytes.extend_from_slice(&offset.to_le_bytes());
            }
            tail.log_end += frame.len() as u64;
            tail.in_log += offsets.len() as u64;
            tail.unindexed = Some((in_log * 8, bytes));
            self.log_end.store(tail.log_end, Ordering::Release);
            if batch.checkpoint.is_some() {
                tail.last_checkpoint = batch.checkpoint.clone();
            }
        }
        // The index file is derived: written, not synced (the next open completes it).
        if let Some((at, bytes)) = tail.unindexed.take() {
            if let Err(error) = self.idx.write_all_at(&bytes, at) {
                tail.unindexed = Some((at, bytes));
                return Err(io(error));
            }
            self.entries.store(tail.in_log, Ordering::Release);
        }
        // Frames not yet applied (this one, or one whose application failed before).
        let behind = tail.keys_applied;
        if behind < tail.log_end {
            let len = encode_len(batch) as u64;
            // Usually only this batch's frame is unapplied: apply it from memory.
            if behind + len == tail.log_end {
                self.apply(
                    &mut tail,
                    &batch.idempotency,
                    batch.checkpoint.as_ref(),
                    batch.entries.len(),
                    behind,
                    len,
                )?;
            } else {
                self.apply_from(&mut tail)?;
            }
        }
        Ok(())
    }

    fn leaf(&self, index: u64) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.record(index)?.map(|(_, leaf, _)| leaf))
    }

    fn body(&self, index: u64) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.record(index)?.map(|(_, _, body)| body))
    }

    fn leaf_nodes(&self, index: u64) -> Result<Option<Vec<Hash>>, StorageError> {
        self.nodes_of(index)
    }

    fn entries(&self, from: u64, to: u64) -> RawEntries<'_> {
        let mut scan = RecordScan::new(self, from, to);
        Box::new(std::iter::from_fn(move || {
            Some(scan.next_record()?.map(|record| RawEntry {
                index: record.index,
                nodes: Some(decode_nodes(record.nodes)),
                leaf: Some(record.leaf.to_vec()),
                body: Some(record.body.to_vec()),
            }))
        }))
    }

    fn leaves(&self, from: u64, to: u64) -> Leaves<'_> {
        let mut scan = RecordScan::new(self, from, to);
        Box::new(std::iter::from_fn(move || {
            Some(
                scan.next_record()?
                    .map(|record| (record.index, record.leaf.to_vec())),
            )
        }))
    }

    fn last_leaf_index(&self) -> Result<Option<u64>, StorageError> {
        Ok(self.entries.load(Ordering::Acquire).checked_sub(1))
    }

    fn idempotency_record(&self, key: &[u8]) -> Result<Option<IdempotencyRecord>, StorageError> {
        match self.keys.get(&idempotency_key(key))? {
            Some(bytes) => IdempotencyRecord::decode(&bytes)
                .map(Some)
                .ok_or_else(|| malformed("idempotency record")),
            None => Ok(None),
        }
    }

    fn idempotency_records(&self) -> IdempotencyRecords<'_> {
        Box::new(
            self.keys
                .scan_from(vec![KEY_PREFIX], vec![KEY_PREFIX + 1])
                .map(|item| {
                    let (key, value) = item?;
                    let record = IdempotencyRecord::decode(&value)
                        .ok_or_else(|| malformed("idempotency record"))?;
                    Ok((key[1..].to_vec(), record))
                }),
        )
    }

    fn latest_checkpoint(&self) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
        match self.keys.get(LATEST_KEY)? {
            Some(bytes) if bytes.len() >= 8 => Ok(Some((
                u64::from_be_bytes(bytes[..8].try_into().expect("8")),
                bytes[8..].to_vec(),
            ))),
            Some(_) => Err(malformed("m/latest")),
            None => Ok(None),
        }
    }

    fn checkpoints(&self) -> Checkpoints<'_> {
        self.checkpoints_from(0)
    }

    fn checkpoints_from(&self, size: u64) -> Checkpoints<'_> {
        Box::new(
            self.keys
                // From the first checkpoint of `size` (a key without a frame offset).
                .scan_from(checkpoint_key(size, 1, 0), vec![CHECKPOINT_PREFIX + 1])
                .map(|item| {
                    let (key, note) = item?;
                    let size = key
                        .get(1..9)
                        .and_then(|bytes| bytes.try_into().ok())
                        .map(u64::from_be_bytes)
                        .filter(|_| key.len() == 9 || key.len() == 17)
                        .ok_or_else(|| malformed("checkpoint key"))?;
                    Ok((size, note))
                }),
        )
    }

    fn groups(&self) -> Option<StoredGroups<'_>> {
        let log_end = self.log_end.load(Ordering::Acquire);
        let (mut at, mut entries, mut failed) = (0u64, 0u64, false);
        Some(Box::new(std::iter::from_fn(move || {
            if failed || at >= log_end {
                return None;
            }
            let frame = match read_frame(&self.log, at, log_end) {
                Ok(Some(frame))
                    if frame.first_index == entries || frame.entry_offsets.is_empty() =>
                {
                    frame
                }
                Ok(Some(frame)) => {
                    failed = true;
                    return Some(Err(damaged(
                        entries,
                        format!(
                            "the frame at byte {at} of {LOG_FILE} starts at entry {} where {entries} was due (a frame was removed or replayed)",
                            frame.first_index
                        ),
                    )));
                }
                Ok(None) => {
                    failed = true;
                    return Some(Err(damaged(
                        entries,
                        format!(
                            "the frame at byte {at} of {LOG_FILE} (entries from {entries}) fails its SHA-256 or its framing: it was altered or damaged"
                        ),
                    )));
                }
                Err(error) => {
                    failed = true;
                    return Some(Err(damaged(entries, error.to_string())));
                }
            };
            let group = StoredGroup {
                first_index: entries,
                entries: frame.entry_offsets.len() as u64,
                idempotency: frame.keys,
                checkpoint: frame.checkpoint,
            };
            entries += group.entries;
            at = frame.start + frame.len;
            Some(Ok(group))
        })))
    }

    fn available_bytes(&self) -> Option<u64> {
        // Space zeroed ahead is the log's own to write into.
        let ahead = self.space.ahead_of(self.log_end.load(Ordering::Acquire));
        fs2::available_space(&self.dir)
            .ok()
            .map(|free| free + ahead)
    }
}

/// The length of the frame `batch` encodes to.
fn encode_len(batch: &CommitBatch) -> usize {
    FRAME_HEADER
        + batch
            .entries
            .iter()
            .map(|e| ENTRY_HEADER + e.nodes.len() * HASH_SIZE + e.leaf.len() + e.body.len())
            .sum::<usize>()
        + batch
            .idempotency
            .iter()
            .map(|(key, _)| 2 + key.len() + IdempotencyRecord::ENCODED_LEN)
            .sum::<usize>()
        + batch
            .checkpoint
            .as_ref()
            .map_or(0, |(_, note)| 12 + note.len())
        + HASH_SIZE
}

/// Entries `from..to` of a [`LogStore`] read in order: their offsets a chunk at a time
/// from the index file (a `pread` per entry was a tenth of the communication indexer's
/// time), their records through one read-ahead [`Window`].
struct RecordScan<'a> {
    store: &'a LogStore,
    next: u64,
    to: u64,
    /// Offsets of entries `offsets_from..` (the chunk being read).
    offsets: Vec<u64>,
    offsets_from: u64,
    window: Window,
}

/// One entry's record, borrowed from the scan's window.
struct RecordView<'w> {
    index: u64,
    nodes: &'w [u8],
    leaf: &'w [u8],
    body: &'w [u8],
}

impl<'a> RecordScan<'a> {
    /// Offsets read from the index file at once.
    const OFFSETS_CHUNK: u64 = 4096;

    fn new(store: &'a LogStore, from: u64, to: u64) -> Self {
        let entries = store.entries.load(Ordering::Acquire);
        let to = to.min(entries).max(from);
        // Read ahead no further than the scan goes: the next entry's record, or the end of
        // the frames (the file itself goes further, with zeros).
        let limit = if to < entries {
            store.offset(to).ok()
        } else {
            None
        }
        .unwrap_or_else(|| store.log_end.load(Ordering::Acquire));
        RecordScan {
            store,
            next: from,
            to,
            offsets: Vec::new(),
            offsets_from: from,
            window: Window {
                limit,
                ..Window::default()
            },
        }
    }

    fn offset(&mut self, index: u64) -> Result<u64, StorageError> {
        let loaded = self.offsets_from..self.offsets_from + self.offsets.len() as u64;
        if !loaded.contains(&index) {
            let count = (self.to - index).min(Self::OFFSETS_CHUNK) as usize;
            let mut bytes = vec![0u8; count * 8];
            self.store
                .idx
                .read_exact_at(&mut bytes, index * 8)
                .map_err(io)?;
            self.offsets = bytes
                .chunks_exact(8)
                .map(|chunk| u64::from_le_bytes(chunk.try_into().expect("8 bytes")))
                .collect();
            self.offsets_from = index;
        }
        Ok(self.offsets[(index - self.offsets_from) as usize])
    }

    fn next_record(&mut self) -> Option<Result<RecordView<'_>, StorageError>> {
        if self.next >= self.to {
            return None;
        }
        let index = self.next;
        self.next += 1;
        Some(self.read(index))
    }

    fn read(&mut self, index: u64) -> Result<RecordView<'_>, StorageError> {
        let mut offset = self.offset(index)?;
        let log = &self.store.log;
        let mut header = [0u8; ENTRY_HEADER];
        let readable = offset
            .checked_add(ENTRY_HEADER as u64)
            .is_some_and(|end| end <= self.store.log_end.load(Ordering::Acquire));
        if readable {
            header.copy_from_slice(self.window.bytes(log, offset, ENTRY_HEADER)?);
        }
        if !readable || u64_at(&header, 0) != index {
            // The index file led astray: the offsets are derived again, and read again.
            (offset, header) = self.store.located(index)?;
            self.offsets.clear();
        }
        let (nodes, leaf_len, body_len) = self.store.parts(index, offset, &header)?;
        let record = self
            .window
            .bytes(log, offset, ENTRY_HEADER + nodes + leaf_len + body_len)?;
        let parts = &record[ENTRY_HEADER..];
        Ok(RecordView {
            index,
            nodes: &parts[..nodes],
            leaf: &parts[nodes..nodes + leaf_len],
            body: &parts[nodes + leaf_len..],
        })
    }
}

/// A read-ahead window over the log for sequential scans (`verify`, the communication
/// indexer).
#[derive(Default)]
struct Window {
    start: u64,
    bytes: Vec<u8>,
    /// Where the scan ends: nothing past it is read ahead (a scan of a few entries reads
    /// a few records, not `SIZE` bytes).
    limit: u64,
}

impl Window {
    const SIZE: usize = 4 << 20;

    /// `len` bytes at `offset`, read ahead in large chunks.
    fn bytes(&mut self, log: &File, offset: u64, len: usize) -> Result<&[u8], StorageError> {
        let inside =
            offset >= self.start && offset + len as u64 <= self.start + self.bytes.len() as u64;
        if !inside {
            let want = len.max(Self::SIZE.min(self.limit.saturating_sub(offset) as usize));
            self.bytes.resize(want, 0);
            let mut filled = 0;
            while filled < want {
                let read = log
                    .read_at(&mut self.bytes[filled..], offset + filled as u64)
                    .map_err(io)?;
                if read == 0 {
                    break;
                }
                filled += read;
            }
            if filled < len {
                return Err(malformed(format!("log ends inside the record at {offset}")));
            }
            self.bytes.truncate(filled);
            self.start = offset;
        }
        let at = (offset - self.start) as usize;
        Ok(&self.bytes[at..at + len])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a cut keeps reaches the end its frame headers claim, so a frame whose last byte
    /// is zero is kept whole (the zeros past it, written ahead, are not kept).
    #[test]
    fn a_cut_keeps_a_frame_that_ends_in_a_zero_byte() {
        let frame_len = FRAME_HEADER + HASH_SIZE + 3;
        let mut bytes = vec![0u8; frame_len + 100];
        bytes[..4].copy_from_slice(MAGIC);
        bytes[4..12].copy_from_slice(&(frame_len as u64).to_le_bytes());
        bytes[frame_len - 2] = 7; // the frame's last byte stays 0
        assert_eq!(declared_end(&bytes), frame_len);
        // A damaged header claims nothing; an over-long one neither.
        bytes[0] ^= 1;
        assert_eq!(declared_end(&bytes), 0);
        bytes[0] ^= 1;
        bytes[4..12].copy_from_slice(&(10_000u64).to_le_bytes());
        assert_eq!(declared_end(&bytes), 0);
    }
    use crate::storage::NewEntry;

    fn batch(first: u64, count: u64, checkpoint: bool) -> CommitBatch {
        let entries: Vec<NewEntry> = (first..first + count)
            .map(|index| NewEntry {
                index,
                leaf: format!("leaf {index}").into_bytes(),
                nodes: (0..=(index % 3) as u8).map(|n| Hash([n; 32])).collect(),
                body: vec![index as u8; (index % 5) as usize * 100],
            })
            .collect();
        CommitBatch {
            idempotency: entries
                .iter()
                .map(|entry| {
                    (
                        format!("key {}", entry.index).into_bytes(),
                        IdempotencyRecord {
                            index: entry.index,
                            content_digest: [entry.index as u8; 32],
                        },
                    )
                })
                .collect(),
            checkpoint: checkpoint.then(|| {
                (
                    first + count,
                    format!("note {}", first + count).into_bytes(),
                )
            }),
            entries,
        }
    }

    /// Opens the store; sled's threads may hold the lock of a store just dropped in this
    /// process for a moment, so "in use" is retried.
    fn open(dir: &Path) -> LogStore {
        for _ in 0..200 {
            match LogStore::open(dir, 1 << 20) {
                Err(error) if error.to_string().contains("in use") => {
                    std::thread::sleep(std::time::Duration::from_millis(25));
                }
                other => return other.unwrap(),
            }
        }
        panic!("{} stays locked", dir.display());
    }

    fn assert_holds(store: &LogStore, size: u64) {
        assert_eq!(store.last_leaf_index().unwrap(), size.checked_sub(1));
        let expected = batch(0, size, false);
        for entry in &expected.entries {
            assert_eq!(store.leaf(entry.index).unwrap().unwrap(), entry.leaf);
            assert_eq!(store.body(entry.index).unwrap().unwrap(), entry.body);
            assert_eq!(store.leaf_nodes(entry.index).unwrap().unwrap(), entry.nodes);
        }
        let scanned: Vec<RawEntry> = store.entries(0, size).collect::<Result<_, _>>().unwrap();
        assert_eq!(scanned.len() as u64, size);
        for (raw, entry) in scanned.iter().zip(&expected.entries) {
            assert_eq!(raw.leaf.as_ref(), Some(&entry.leaf));
            assert_eq!(raw.body.as_ref(), Some(&entry.body));
            assert_eq!(raw.nodes.as_ref(), Some(&entry.nodes));
        }
        for (key, record) in &expected.idempotency {
            assert_eq!(store.idempotency_record(key).unwrap(), Some(*record));
        }
        assert_eq!(store.idempotency_records().count() as u64, size);
        assert_eq!(store.leaf(size).unwrap(), None);
        let leaves: Vec<(u64, Vec<u8>)> =
            store.leaves(0, size + 3).collect::<Result<_, _>>().unwrap();
        let expected_leaves: Vec<(u64, Vec<u8>)> = expected
            .entries
            .iter()
            .map(|entry| (entry.index, entry.leaf.clone()))
            .collect();
        assert_eq!(leaves, expected_leaves);
    }

    /// Three groups: the empty tree's checkpoint alone, then 4 and 3 entries.
    fn filled(dir: &Path) -> LogStore {
        let store = open(dir);
        store
            .commit(&CommitBatch {
                checkpoint: Some((0, b"note 0".to_vec())),
                ..CommitBatch::default()
            })
            .unwrap();
        store.commit(&batch(0, 4, true)).unwrap();
        store.commit(&batch(4, 3, true)).unwrap();
        store
    }

    /// The same tree re-signed (the access trail's newer anchor): a frame with no entries
    /// and the checkpoint alone. Every one is kept, in order, after the first of its size
    /// and before the next size, also when `keys/` is rebuilt; a retried one is not
    /// written twice.
    #[test]
    fn several_checkpoints_of_one_size_are_kept_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = filled(dir.path());
        let resigned = |note: &str| CommitBatch {
            checkpoint: Some((7, note.as_bytes().to_vec())),
            ..CommitBatch::default()
        };
        store.commit(&resigned("note 7, anchor 1")).unwrap();
        store.commit(&resigned("note 7, anchor 2")).unwrap();
        store.commit(&resigned("note 7, anchor 2")).unwrap();
        store.commit(&batch(7, 2, true)).unwrap();
        let expected: Vec<(u64, Vec<u8>)> = [
            (0, "note 0"),
            (4, "note 4"),
            (7, "note 7"),
            (7, "note 7, anchor 1"),
            (7, "note 7, anchor 2"),
            (9, "note 9"),
        ]
        .into_iter()
        .map(|(size, note)| (size, note.as_bytes().to_vec()))
        .collect();
        let stored = |store: &LogStore| -> Vec<(u64, Vec<u8>)> {
            store.checkpoints().map(Result::unwrap).collect()
        };
        assert_eq!(stored(&store), expected);
        let groups: Vec<_> = store.groups().unwrap().map(Result::unwrap).collect();
        assert_eq!(groups.len(), 6, "one frame per distinct commit");
        assert_eq!((groups[3].first_index, groups[3].entries), (7, 0));
        drop(store);
        let store = open(dir.path());
        assert_eq!(stored(&store), expected);
        drop(store);
        std::fs::remove_dir_all(dir.path().join(KEYS_DIR)).unwrap();
        let store = open(dir.path());
        assert_eq!(stored(&store), expected, "rebuilt from the log");
        assert_eq!(store.latest_checkpoint().unwrap().unwrap().0, 9);
    }

    #[test]
    fn what_is_committed_reads_back_before_and_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = filled(dir.path());
        assert_holds(&store, 7);
        drop(store);
        let store = open(dir.path());
        assert_holds(&store, 7);
        let sizes: Vec<u64> = store.checkpoints().map(|c| c.unwrap().0).collect();
        assert_eq!(sizes, [0, 4, 7]);
        assert_eq!(
            store.latest_checkpoint().unwrap(),
            Some((7, b"note 7".to_vec()))
        );
        // A large group (bigger than the read-ahead window) scans as well.
        let big = CommitBatch {
            entries: vec![NewEntry {
                index: 7,
                leaf: vec![1; 10],
                nodes: vec![Hash([9; 32])],
                body: vec![2; 5 << 20],
            }],
            ..CommitBatch::default()
        };
        store.commit(&big).unwrap();
        let last = store.entries(6, 8).last().unwrap().unwrap();
        assert_eq!(last.body.unwrap().len(), 5 << 20);
    }

    #[test]
    fn scans_longer_than_a_chunk_of_offsets_read_every_entry_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = filled(dir.path());
        let count = RecordScan::OFFSETS_CHUNK * 2 + 5;
        store.commit(&batch(7, count, true)).unwrap();
        assert_holds(&store, 7 + count);
        // Scans that start and end inside a chunk.
        let from = RecordScan::OFFSETS_CHUNK - 3;
        let to = RecordScan::OFFSETS_CHUNK * 2 + 1;
        let scanned: Vec<u64> = store
            .entries(from, to)
            .map(|entry| entry.unwrap().index)
            .collect();
        assert_eq!(scanned, (from..to).collect::<Vec<_>>());
        let leaves: Vec<u64> = store.leaves(from, to).map(|leaf| leaf.unwrap().0).collect();
        assert_eq!(leaves, (from..to).collect::<Vec<_>>());
    }

    #[test]
    fn a_torn_last_frame_is_ignored_and_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let store = filled(dir.path());
        let intact = store.log_end();
        store.space.wait_ready();
        assert!(
            std::fs::metadata(dir.path().join(LOG_FILE)).unwrap().len() > intact,
            "the file is zeroed ahead of its frames"
        );
        drop(store);
        let log = dir.path().join(LOG_FILE);
        let (frame, _) = encode_frame(&batch(7, 2, true), intact);
        let file = OpenOptions::new().write(true).open(&log).unwrap();
        file.write_all_at(&frame[..frame.len() - 40], intact)
            .unwrap();
        drop(file);
        let store = open(dir.path());
        assert_holds(&store, 7);
        store.commit(&batch(7, 1, true)).unwrap();
        drop(store);
        let store = open(dir.path());
        assert_holds(&store, 8);
        assert_eq!(store.latest_checkpoint().unwrap().unwrap().0, 8);
    }

    #[test]
    fn the_index_file_is_rebuilt_from_the_log() {
        let dir = tempfile::tempdir().unwrap();
        drop(filled(dir.path()));
        let idx = dir.path().join(INDEX_FILE);
        std::fs::write(&idx, b"").unwrap();
        assert_holds(&open(dir.path()), 7);
        // Zeros past the offsets (the file grew, its data never written) vouch for nothing.
        let mut bytes = std::fs::read(&idx).unwrap();
        bytes.extend_from_slice(&[0u8; 16]);
        std::fs::write(&idx, bytes).unwrap();
        assert_holds(&open(dir.path()), 7);
    }

    /// Opens a store expected to refuse: the error.
    fn refused(dir: &Path) -> StorageError {
        for _ in 0..200 {
            match LogStore::open(dir, 1 << 20) {
                Err(error) if error.to_string().contains("in use") => {
                    std::thread::sleep(std::time::Duration::from_millis(25));
                }
                Err(error) => return error,
                Ok(_) => panic!("the store opened"),
            }
        }
        panic!("{} stays locked", dir.display());
    }

    /// `filled`, with the last frame's start and end.
    fn filled_with_last_frame(dir: &Path) -> (u64, u64) {
        let store = filled(dir);
        let end = store.log_end();
        let start = store.entry_ranges(4).unwrap().unwrap().leaf.start;
        let frame_start = {
            let mut header = [0u8; ENTRY_HEADER];
            let offset = store.offset(4).unwrap();
            store.log.read_exact_at(&mut header, offset).unwrap();
            u64_at(&header, 8)
        };
        assert!(frame_start < start);
        (frame_start, end)
    }

    fn flip(path: &Path, at: u64) {
        let mut bytes = std::fs::read(path).unwrap();
        bytes[at as usize] ^= 0x10;
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn offsets_of_entries_past_the_intact_log_stop_the_open_and_stay() {
        let dir = tempfile::tempdir().unwrap();
        let (last_frame, _) = filled_with_last_frame(dir.path());
        let idx = dir.path().join(INDEX_FILE);
        let log = dir.path().join(LOG_FILE);
        let idx_before = std::fs::read(&idx).unwrap();
        // Cut at a frame boundary, `keys/` gone too: only the index file remembers.
        let file = OpenOptions::new().write(true).open(&log).unwrap();
        file.set_len(last_frame).unwrap();
        drop(file);
        std::fs::remove_dir_all(dir.path().join(KEYS_DIR)).unwrap();
        let error = refused(dir.path());
        assert_eq!(error.first_bad_index(), Some(4), "{error}");
        assert!(error.to_string().contains(INDEX_FILE), "{error}");
        assert_eq!(
            std::fs::read(&idx).unwrap(),
            idx_before,
            "the evidence is kept"
        );
        assert_eq!(std::fs::metadata(&log).unwrap().len(), last_frame);
    }

    #[test]
    fn a_last_frame_written_whole_that_fails_its_checksum_is_damage_not_a_torn_write() {
        let dir = tempfile::tempdir().unwrap();
        let (last_frame, end) = filled_with_last_frame(dir.path());
        // As after a power cut: the index file and `keys/` hold nothing of the last frame.
        let idx = dir.path().join(INDEX_FILE);
        let file = OpenOptions::new().write(true).open(&idx).unwrap();
        file.set_len(4 * 8).unwrap();
        drop(file);
        std::fs::remove_dir_all(dir.path().join(KEYS_DIR)).unwrap();
        let log = dir.path().join(LOG_FILE);
        let original = std::fs::read(&log).unwrap();
        for at in [last_frame, last_frame + 6, (last_frame + end) / 2, end - 1] {
            flip(&log, at);
            let error = refused(dir.path());
            assert_eq!(error.first_bad_index(), Some(4), "byte {at}: {error}");
            assert_eq!(std::fs::read(&log).unwrap().len(), original.len());
            std::fs::write(&log, &original).unwrap();
        }
        assert_holds(&open(dir.path()), 7);
    }

    #[test]
    fn damage_followed_by_an_intact_frame_stops_the_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = filled(dir.path());
        let second = store.entry_ranges(0).unwrap().unwrap().leaf.start;
        drop(store);
        std::fs::remove_file(dir.path().join(INDEX_FILE)).unwrap();
        std::fs::remove_dir_all(dir.path().join(KEYS_DIR)).unwrap();
        flip(&dir.path().join(LOG_FILE), second);
        let error = refused(dir.path());
        assert_eq!(error.first_bad_index(), Some(0), "{error}");
        assert!(error.to_string().contains("intact frame"), "{error}");
    }

    #[test]
    fn a_torn_write_is_set_aside_and_zeroed_before_the_next_frame() {
        let dir = tempfile::tempdir().unwrap();
        let store = filled(dir.path());
        let intact = store.log_end();
        store.space.wait_ready();
        drop(store);
        let log = dir.path().join(LOG_FILE);
        // A long frame of which only the first half reached the file.
        let big = batch(7, 40, true);
        let (frame, _) = encode_frame(&big, intact);
        let half = &frame[..frame.len() / 2];
        let file = OpenOptions::new().write(true).open(&log).unwrap();
        file.write_all_at(half, intact).unwrap();
        drop(file);
        let store = open(dir.path());
        assert_holds(&store, 7);
        assert!(
            !dir.path().join(TORN_DIR).exists(),
            "an open alone writes nothing"
        );
        store.commit(&batch(7, 1, true)).unwrap();
        let end = store.log_end();
        drop(store);
        let kept = std::fs::read_dir(dir.path().join(TORN_DIR))
            .unwrap()
            .map(|entry| std::fs::read(entry.unwrap().path()).unwrap())
            .collect::<Vec<_>>();
        assert_eq!(
            kept,
            vec![half.to_vec()],
            "the torn bytes are kept as they were"
        );
        let bytes = std::fs::read(&log).unwrap();
        let past = &bytes[end as usize..(intact as usize + half.len()).max(end as usize)];
        assert!(
            past.iter().all(|&b| b == 0),
            "no old bytes left past the new frame"
        );
        let store = open(dir.path());
        assert_holds(&store, 8);
    }

    #[test]
    fn a_wrong_offset_in_the_index_file_is_derived_again_from_the_log() {
        let dir = tempfile::tempdir().unwrap();
        drop(filled(dir.path()));
        let idx = dir.path().join(INDEX_FILE);
        let mut bytes = std::fs::read(&idx).unwrap();
        bytes[2 * 8..3 * 8].copy_from_slice(&7u64.to_le_bytes());
        bytes[5 * 8..6 * 8].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&idx, &bytes).unwrap();
        let store = open(dir.path());
        assert_holds(&store, 7);
        let repaired = std::fs::read(&idx).unwrap();
        assert_ne!(repaired, bytes, "the index file is rewritten");
        drop(store);
        assert_holds(&open(dir.path()), 7);
    }

    #[test]
    fn groups_check_every_frame_and_name_the_first_entry_of_a_bad_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = filled(dir.path());
        let groups: Vec<StoredGroup> = store.groups().unwrap().collect::<Result<_, _>>().unwrap();
        let shape: Vec<(u64, u64, Option<u64>)> = groups
            .iter()
            .map(|g| (g.first_index, g.entries, g.checkpoint.as_ref().map(|c| c.0)))
            .collect();
        assert_eq!(shape, [(0, 0, Some(0)), (0, 4, Some(4)), (4, 3, Some(7))]);
        assert_eq!(groups[1].idempotency, batch(0, 4, true).idempotency);
        // A byte of the middle frame's keys: the open does not read it, `groups` does.
        let key_byte = store.entry_ranges(3).unwrap().unwrap().body.end + 3;
        drop(store);
        flip(&dir.path().join(LOG_FILE), key_byte);
        let store = open(dir.path());
        let error = store
            .groups()
            .unwrap()
            .find_map(Result::err)
            .expect("a bad group");
        assert_eq!(error.first_bad_index(), Some(0), "{error}");
    }

    #[test]
    fn cut_log_plans_without_changing_then_cuts_keeping_what_it_cut() {
        let dir = tempfile::tempdir().unwrap();
        let (last_frame, end) = filled_with_last_frame(dir.path());
        let log = dir.path().join(LOG_FILE);
        flip(&log, (last_frame + end) / 2);
        let before = std::fs::read(&log).unwrap();
        let error = refused(dir.path());
        assert_eq!(error.first_bad_index(), Some(4));
        assert!(
            cut_log(dir.path(), 5, "test", true).is_err(),
            "not a frame boundary"
        );
        assert!(
            cut_log(dir.path(), 9, "test", true).is_err(),
            "past the intact frames"
        );
        let plan = cut_log(dir.path(), 4, "test", false).unwrap();
        assert_eq!(
            (plan.at_byte, plan.intact_entries, plan.indexed_entries),
            (last_frame, 4, 7)
        );
        assert!(plan.kept_in.is_none());
        assert_eq!(
            std::fs::read(&log).unwrap(),
            before,
            "a plan changes nothing"
        );
        let cut = cut_log(dir.path(), 4, "bit rot in the last frame", true).unwrap();
        let kept = cut.kept_in.clone().unwrap();
        assert_eq!(
            std::fs::read(kept.join("ledger.log.cut")).unwrap(),
            before[last_frame as usize..end as usize]
        );
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(kept.join("cut.json")).unwrap()).unwrap();
        assert_eq!(record["at_entry"], 4);
        assert_eq!(record["reason"], "bit rot in the last frame");
        assert_eq!(std::fs::read(kept.join(INDEX_FILE)).unwrap().len(), 7 * 8);
        let store = open(dir.path());
        assert_holds(&store, 4);
        assert_eq!(store.latest_checkpoint().unwrap().unwrap().0, 4);
    }

    #[test]
    fn idempotency_keys_lost_or_behind_are_rebuilt_from_the_log_at_open() {
        let dir = tempfile::tempdir().unwrap();
        drop(filled(dir.path()));
        // All of them gone (a copied log, or a crash before any run was written).
        std::fs::remove_dir_all(dir.path().join(KEYS_DIR)).unwrap();
        let store = open(dir.path());
        assert_holds(&store, 7);
        let sizes: Vec<u64> = store.checkpoints().map(|c| c.unwrap().0).collect();
        assert_eq!(sizes, [0, 4, 7], "checkpoints are rebuilt too");
        assert_eq!(store.latest_checkpoint().unwrap().unwrap().0, 7);
        // Behind: the keys' watermark back at the second frame (as a crash can leave it),
        // with that frame's keys missing; the open applies the frames after it again.
        let second_frame = {
            let frame = read_frame(&store.log, 0, u64::MAX).unwrap().unwrap();
            frame.start + frame.len
        };
        let mut writes = vec![(
            APPLIED_KEY.to_vec(),
            Some(second_frame.to_le_bytes().to_vec()),
        )];
        for index in 0..7u64 {
            writes.push((idempotency_key(format!("key {index}").as_bytes()), None));
        }
        store.keys.apply(writes).unwrap();
        assert_eq!(store.idempotency_record(b"key 5").unwrap(), None);
        drop(store);
        let store = open(dir.path());
        assert_holds(&store, 7);
    }

    #[test]
    fn a_store_whose_keys_sled_held_is_rebuilt_and_sled_emptied() {
        let dir = tempfile::tempdir().unwrap();
        drop(filled(dir.path()));
        // As a store written before the run indexes: keys and checkpoints in sled only.
        std::fs::remove_dir_all(dir.path().join(KEYS_DIR)).unwrap();
        {
            let store = open(dir.path());
            store
                .raw()
                .insert(APPLIED_KEY, &1234u64.to_le_bytes())
                .unwrap();
            store.raw().insert(b"ikey 0", vec![0u8; 40]).unwrap();
            store.raw().insert(b"c\0\0\0\0\0\0\0\x07", b"note").unwrap();
            let index = store
                .derived
                .open_tree(crate::storage::sled_store::INDEX_TREE)
                .unwrap();
            index.insert(b"m/indexed", vec![0u8; 8]).unwrap();
            store.raw().flush().unwrap();
            store.derived.flush().unwrap();
        }
        let store = open(dir.path());
        assert_holds(&store, 7);
        let left: Vec<_> = store
            .raw()
            .iter()
            .keys()
            .map(|k| k.unwrap().to_vec())
            .collect();
        assert_eq!(
            left,
            vec![LAYOUT_KEY.to_vec()],
            "sled keeps only the layout"
        );
        assert!(
            !store
                .derived
                .tree_names()
                .iter()
                .any(|name| name.as_ref() == crate::storage::sled_store::INDEX_TREE)
        );
    }

    #[test]
    fn a_retried_batch_is_written_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = filled(dir.path());
        // The frames' end, not the file's length: space ahead is zeroed meanwhile.
        let frames_end = store.log_end();
        store.commit(&batch(4, 3, true)).unwrap();
        assert_eq!(store.log_end(), frames_end, "nothing written again");
        assert_holds(&store, 7);
        // A batch that skips indices is refused.
        assert!(store.commit(&batch(9, 1, true)).is_err());
    }

    #[test]
    fn an_altered_frame_that_sled_applied_stops_the_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = filled(dir.path());
        let end = store.log_end() as usize;
        drop(store);
        let log = dir.path().join(LOG_FILE);
        let mut bytes = std::fs::read(&log).unwrap();
        let at = end - 50;
        bytes[at] ^= 1;
        std::fs::write(&log, bytes).unwrap();
        let error = (0..200)
            .find_map(|_| match LogStore::open(dir.path(), 1 << 20) {
                Err(error) if error.to_string().contains("in use") => {
                    std::thread::sleep(std::time::Duration::from_millis(25));
                    None
                }
                other => Some(other.err().expect("the open fails").to_string()),
            })
            .unwrap();
        assert!(error.contains("truncated or altered"), "{error}");
    }
}
