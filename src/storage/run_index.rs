//! [`RunIndex`]: an ordered key-value space for *derived* data (idempotency keys, the
//! compliance lists), kept as an in-memory table plus immutable sorted run files that a
//! background thread merges — a log-structured merge tree without a write-ahead log,
//! because everything in it can be re-derived from the ledger.
//!
//! Why not sled for this: sled inserts cost a page-cache lookup and a node copy per key
//! (≈ 90,000 keys/s on one core here) and keep per-key state in memory, and the ledger
//! writes five derived keys per entry; that was the ceiling of every write scenario and
//! most of the memory and disk (docs/BENCHMARKS.md, "Why the code is as it is"). Here a write is a
//! `BTreeMap` insert, and the disk sees large sequential writes only.
//!
//! # What survives a crash
//! `apply` writes into the active in-memory table; a full table is frozen and written out
//! as a run by the flusher thread, oldest first, and a run counts only once the manifest
//! names it. So after a crash the store holds exactly the writes of a *prefix* of the
//! `apply` calls: never a later one without every earlier one. An owner that keeps its
//! watermark ("derived up to here") in the same `apply` as the data it covers therefore
//! knows, after any crash, where to start deriving again. A clean close writes every
//! table out.
//!
//! # Files (in the index's own directory)
//! - `MANIFEST`: magic `ARM1`, count u32, the live runs' sequence numbers (u64) newest
//!   first, xxh3-64 of all that. Replaced atomically: written beside, synced, renamed, the
//!   directory synced.
//! - `<seq>.run`: blocks of entries in key order, `key_len u16 | value_len u32 | key |
//!   value` (`value_len` = `u32::MAX`: the key was removed), each block followed by its
//!   xxh3-64; then the block index (`offset u64 | len u32 | first_key_len u16 |
//!   first_key` per block), the Bloom filter's words, and a footer: `index_offset u64 |
//!   index_len u64 | bloom_offset u64 | bloom_len u64 | bloom_hashes u32 | filter_of u32
//!   (1 keys, 2 lists: [`Filter`]) | entries u64 | xxh3-64 of index, filter and the footer
//!   before it | magic "ARUN0001"`. Integers are
//!   little-endian. Files the manifest does not name are leftovers of an interrupted
//!   write or merge and are removed at open.
//!
//! Newest wins: a key is looked up in the active table, then the frozen ones, then the
//! runs from newest to oldest. Merges combine runs adjacent in age, so that order holds.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::ops::Bound;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};

use xxhash_rust::xxh3::xxh3_64;

use super::table_key::TableKey;
use super::{IndexStore, KeyValue, StorageError, io, malformed};

const MANIFEST: &str = "MANIFEST";
const MANIFEST_MAGIC: &[u8; 4] = b"ARM1";
const RUN_MAGIC: &[u8; 8] = b"ARUN0001";
const FOOTER_LEN: usize = 8 * 4 + 4 + 4 + 8 + 8 + 8;
/// The checksummed part of the footer.
const FOOTER_SUMMED: usize = FOOTER_LEN - 16;
/// A block is closed once it holds this many bytes: one `pread` per block read.
const BLOCK_BYTES: usize = 4096;
/// `value_len` of a removed key.
const REMOVED: u32 = u32::MAX;
/// What one table entry costs beyond its key and value (its share of a tree node: the key
/// slot, inline up to 46 bytes, and the value's vector).
const ENTRY_OVERHEAD: usize = 64;
/// Entries a range cursor takes from an in-memory table per lock.
const CURSOR_CHUNK: usize = 256;

/// Sizes of a [`RunIndex`].
#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    /// Bytes (keys, values and overhead) the active table takes before it is frozen and
    /// written out as a run.
    pub memtable_bytes: usize,
    /// Frozen tables waiting to be written before `apply` waits for the flusher: with
    /// `memtable_bytes`, the bound on this index's memory.
    pub max_frozen: usize,
    /// Bloom filter bits per key in each run (0: no filter; a read then reads one block
    /// of every run). About 1 % false positives at 10.
    pub bloom_bits_per_key: usize,
    /// What the filter holds.
    pub filter: Filter,
}

/// What a run's Bloom filter answers for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// Whole keys: a point read skips the runs that do not hold its key.
    Keys,
    /// The list each key belongs to — the key up to and including its first 0x00 byte
    /// (the whole key when it has none): a point read, or a range read within one list
    /// (as every compliance list read is), skips the runs that hold nothing of that list.
    Lists,
}

impl Filter {
    fn code(self) -> u32 {
        match self {
            Filter::Keys => 1,
            Filter::Lists => 2,
        }
    }

    fn from_code(code: u32) -> Option<Self> {
        match code {
            1 => Some(Filter::Keys),
            2 => Some(Filter::Lists),
            _ => None,
        }
    }

    /// What the filter holds for `key`.
    fn of(self, key: &[u8]) -> &[u8] {
        match self {
            Filter::Keys => key,
            Filter::Lists => list_of(key).unwrap_or(key),
        }
    }
}

/// The key up to and including its first 0x00 byte, if it has one.
fn list_of(key: &[u8]) -> Option<&[u8]> {
    key.iter().position(|&byte| byte == 0).map(|at| &key[..=at])
}

/// The list every key of `[start, end)` belongs to, when they all belong to one: `start`'s
/// list `P` (ending in 0x00), and `end` no further than the first key after all of `P`'s.
fn single_list<'a>(start: &'a [u8], end: &[u8]) -> Option<&'a [u8]> {
    let list = list_of(start)?;
    let mut after = list.to_vec();
    *after.last_mut().expect("ends in 0x00") = 1;
    (end <= after.as_slice()).then_some(list)
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            memtable_bytes: 8 << 20,
            max_frozen: 2,
            bloom_bits_per_key: 10,
            filter: Filter::Keys,
        }
    }
}

/// A value as the index holds it: `None` is a removed key (hides older runs' value).
type Stored = Option<Vec<u8>>;

#[derive(Default)]
struct Memtable {
    map: RwLock<BTreeMap<TableKey, Stored>>,
    bytes: AtomicUsize,
}

impl Memtable {
    fn is_empty(&self) -> bool {
        self.map.read().expect("memtable lock").is_empty()
    }
}

/// Where one block lies and the key it starts with.
struct BlockRef {
    first_key: Vec<u8>,
    offset: u64,
    len: u32,
}

/// Kirsch–Mitzenmacher double hashing over one xxh3-64 (stable by specification, so a
/// filter written by one build is read correctly by the next).
struct Bloom {
    words: Vec<u64>,
    hashes: u32,
    filter: Filter,
}

impl Bloom {
    fn new(keys: usize, bits_per_key: usize, filter: Filter) -> Self {
        let bits = (keys.max(1) * bits_per_key).max(64);
        let hashes = ((bits_per_key as f64 * 0.69).round() as u32).clamp(1, 16);
        Bloom {
            words: vec![0; bits.div_ceil(64)],
            hashes,
            filter,
        }
    }

    fn positions(&self, key: &[u8]) -> impl Iterator<Item = usize> + '_ {
        self.positions_of(xxh3_64(key))
    }

    /// The bits of a key whose xxh3-64 is `hash` (hashed once for every run's filter).
    fn positions_of(&self, hash: u64) -> impl Iterator<Item = usize> + '_ {
        let (first, step) = (hash as u32, (hash >> 32) as u32 | 1);
        let bits = self.words.len() * 64;
        (0..self.hashes).map(move |i| first.wrapping_add(i.wrapping_mul(step)) as usize % bits)
    }

    fn insert(&mut self, key: &[u8]) {
        let positions: Vec<usize> = self.positions(key).collect();
        for bit in positions {
            self.words[bit / 64] |= 1 << (bit % 64);
        }
    }

    #[cfg(test)]
    fn may_hold(&self, key: &[u8]) -> bool {
        self.may_hold_hash(xxh3_64(key))
    }

    fn may_hold_hash(&self, hash: u64) -> bool {
        self.positions_of(hash)
            .all(|bit| self.words[bit / 64] & (1 << (bit % 64)) != 0)
    }
}

/// Where one entry lies in its block.
struct Located {
    key: u32,
    key_len: u16,
    value_len: u32,
}

/// One block of a run, read and checked: its bytes and where each entry lies in them
/// (entries are copied out only when a reader takes them).
struct Block {
    bytes: Vec<u8>,
    entries: Vec<Located>,
}

impl Block {
    fn key(&self, n: usize) -> &[u8] {
        let entry = &self.entries[n];
        &self.bytes[entry.key as usize..entry.key as usize + entry.key_len as usize]
    }

    fn entry(&self, n: usize) -> (Vec<u8>, Stored) {
        let entry = &self.entries[n];
        let value_at = entry.key as usize + entry.key_len as usize;
        let value = (entry.value_len != REMOVED)
            .then(|| self.bytes[value_at..value_at + entry.value_len as usize].to_vec());
        (self.key(n).to_vec(), value)
    }

    /// Where `key` is (`Ok`) or would be (`Err`).
    fn find(&self, key: &[u8]) -> Result<usize, usize> {
        let mut low = 0;
        let mut high = self.entries.len();
        while low < high {
            let middle = (low + high) / 2;
            match self.key(middle).cmp(key) {
                std::cmp::Ordering::Less => low = middle + 1,
                std::cmp::Ordering::Greater => high = middle,
                std::cmp::Ordering::Equal => return Ok(middle),
            }
        }
        Err(low)
    }
}

/// One immutable run file, open. Its file stays readable by whoever holds it even after a
/// merge has replaced and removed it.
struct Run {
    seq: u64,
    path: PathBuf,
    file: File,
    blocks: Vec<BlockRef>,
    bloom: Option<Bloom>,
    entries: u64,
    bytes: u64,
}

fn run_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.run"))
}

impl Run {
    /// The block that would hold `key`, if any block could.
    fn block_for(&self, key: &[u8]) -> Option<usize> {
        self.blocks
            .partition_point(|block| block.first_key.as_slice() <= key)
            .checked_sub(1)
    }

    /// Block `n`, checked against its checksum; its entries are located, not copied.
    fn read_block(&self, n: usize) -> Result<Block, StorageError> {
        let block = &self.blocks[n];
        let mut bytes = vec![0u8; block.len as usize];
        self.file
            .read_exact_at(&mut bytes, block.offset)
            .map_err(io)?;
        let bad = |what: &str| {
            malformed(format!(
                "index run {} block at {}: {what}",
                self.path.display(),
                block.offset
            ))
        };
        let body = bytes.len().checked_sub(8).ok_or_else(|| bad("too short"))?;
        if xxh3_64(&bytes[..body]).to_le_bytes() != bytes[body..] {
            return Err(bad("checksum does not match"));
        }
        let mut entries = Vec::with_capacity(64);
        let mut at = 0;
        while at < body {
            if at + 6 > body {
                return Err(bad("entry header runs past the block"));
            }
            let key_len = u16::from_le_bytes([bytes[at], bytes[at + 1]]) as usize;
            let value_len = u32::from_le_bytes(bytes[at + 2..at + 6].try_into().expect("4"));
            at += 6;
            let value_bytes = if value_len == REMOVED {
                0
            } else {
                value_len as usize
            };
            if at + key_len + value_bytes > body {
                return Err(bad("entry runs past the block"));
            }
            entries.push(Located {
                key: at as u32,
                key_len: key_len as u16,
                value_len,
            });
            at += key_len + value_bytes;
        }
        Ok(Block { bytes, entries })
    }

    /// `key`'s value in this run; `hashes` keeps the key's filter hashes (by [`Filter`])
    /// across the runs of one lookup, so that each is computed once.
    fn get(
        &self,
        key: &[u8],
        hashes: &mut [Option<u64>; 2],
    ) -> Result<Option<Stored>, StorageError> {
        if let Some(bloom) = &self.bloom {
            let slot = &mut hashes[usize::from(bloom.filter == Filter::Lists)];
            let hash = *slot.get_or_insert_with(|| xxh3_64(bloom.filter.of(key)));
            if !bloom.may_hold_hash(hash) {
                return Ok(None);
            }
        }
        let Some(n) = self.block_for(key) else {
            return Ok(None);
        };
        let block = self.read_block(n)?;
        Ok(block.find(key).ok().map(|at| block.entry(at).1))
    }

    /// Opens the run file `seq` in `dir`, reading its block index and filter.
    fn open(dir: &Path, seq: u64) -> Result<Self, StorageError> {
        let path = run_path(dir, seq);
        let file = match File::open(&path) {
            // The manifest names it: a run removed behind the index's back is damage.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Err(malformed(format!(
                    "index run {} is named by the manifest but missing",
                    path.display()
                )));
            }
            other => other.map_err(io)?,
        };
        let bytes = file.metadata().map_err(io)?.len();
        let bad = |what: &str| malformed(format!("index run {}: {what}", path.display()));
        if bytes < FOOTER_LEN as u64 {
            return Err(bad("shorter than its footer"));
        }
        let mut footer = [0u8; FOOTER_LEN];
        file.read_exact_at(&mut footer, bytes - FOOTER_LEN as u64)
            .map_err(io)?;
        if &footer[FOOTER_LEN - 8..] != RUN_MAGIC {
            return Err(bad("no run footer"));
        }
        let u64_at = |at: usize| u64::from_le_bytes(footer[at..at + 8].try_into().expect("8"));
        let (index_offset, index_len) = (u64_at(0), u64_at(8));
        let (bloom_offset, bloom_len) = (u64_at(16), u64_at(24));
        let hashes = u32::from_le_bytes(footer[32..36].try_into().expect("4"));
        let filter_code = u32::from_le_bytes(footer[36..40].try_into().expect("4"));
        let entries = u64_at(40);
        let meta_end = bytes - FOOTER_LEN as u64;
        if index_offset.checked_add(index_len) != Some(bloom_offset)
            || bloom_offset.checked_add(bloom_len) != Some(meta_end)
            || bloom_len % 8 != 0
        {
            return Err(bad("footer does not describe the file"));
        }
        let mut meta = vec![0u8; (index_len + bloom_len) as usize];
        file.read_exact_at(&mut meta, index_offset).map_err(io)?;
        let mut summed = meta.clone();
        summed.extend_from_slice(&footer[..FOOTER_SUMMED]);
        if xxh3_64(&summed).to_le_bytes() != footer[FOOTER_SUMMED..FOOTER_SUMMED + 8] {
            return Err(bad("block index checksum does not match"));
        }
        let mut blocks = Vec::new();
        let mut at = 0;
        let index = &meta[..index_len as usize];
        while at < index.len() {
            if at + 14 > index.len() {
                return Err(bad("block index entry cut short"));
            }
            let offset = u64::from_le_bytes(index[at..at + 8].try_into().expect("8"));
            let len = u32::from_le_bytes(index[at + 8..at + 12].try_into().expect("4"));
            let key_len = u16::from_le_bytes([index[at + 12], index[at + 13]]) as usize;
            at += 14;
            if at + key_len > index.len() || offset + u64::from(len) > index_offset {
                return Err(bad("block index entry out of place"));
            }
            blocks.push(BlockRef {
                first_key: index[at..at + key_len].to_vec(),
                offset,
                len,
            });
            at += key_len;
        }
        let bloom = match (bloom_len, Filter::from_code(filter_code)) {
            (0, _) => None,
            (_, Some(filter)) => Some(Bloom {
                words: meta[index_len as usize..]
                    .chunks_exact(8)
                    .map(|word| u64::from_le_bytes(word.try_into().expect("8")))
                    .collect(),
                hashes,
                filter,
            }),
            (_, None) => return Err(bad("unknown kind of filter")),
        };
        Ok(Run {
            seq,
            path,
            file,
            blocks,
            bloom,
            entries,
            bytes,
        })
    }
}

/// Writes a run file from entries in ascending key order, synced before it returns.
struct RunWriter {
    path: PathBuf,
    out: BufWriter<File>,
    written: u64,
    block: Vec<u8>,
    block_first: Option<Vec<u8>>,
    blocks: Vec<BlockRef>,
    bloom: Option<Bloom>,
    /// The last list put in the filter (consecutive keys mostly share one).
    last_filtered: Vec<u8>,
    entries: u64,
}

impl RunWriter {
    fn create(
        dir: &Path,
        seq: u64,
        expected_keys: usize,
        options: &RunOptions,
    ) -> Result<Self, StorageError> {
        let bits_per_key = options.bloom_bits_per_key;
        let path = run_path(dir, seq);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io)?;
        Ok(RunWriter {
            path,
            out: BufWriter::with_capacity(1 << 20, file),
            written: 0,
            block: Vec::with_capacity(BLOCK_BYTES + 512),
            block_first: None,
            blocks: Vec::new(),
            bloom: (bits_per_key > 0)
                .then(|| Bloom::new(expected_keys, bits_per_key, options.filter)),
            last_filtered: Vec::new(),
            entries: 0,
        })
    }

    fn push(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(), StorageError> {
        if key.len() > u16::MAX as usize || value.is_some_and(|v| v.len() >= REMOVED as usize) {
            return Err(malformed("index key or value too large"));
        }
        if self.block_first.is_none() {
            self.block_first = Some(key.to_vec());
        }
        self.block
            .extend_from_slice(&(key.len() as u16).to_le_bytes());
        let value_len = value.map_or(REMOVED, |v| v.len() as u32);
        self.block.extend_from_slice(&value_len.to_le_bytes());
        self.block.extend_from_slice(key);
        if let Some(value) = value {
            self.block.extend_from_slice(value);
        }
        if let Some(bloom) = &mut self.bloom {
            let filtered = bloom.filter.of(key);
            if filtered != self.last_filtered.as_slice() || self.entries == 0 {
                bloom.insert(filtered);
                self.last_filtered.clear();
                self.last_filtered.extend_from_slice(filtered);
            }
        }
        self.entries += 1;
        if self.block.len() >= BLOCK_BYTES {
            self.end_block()?;
        }
        Ok(())
    }

    fn end_block(&mut self) -> Result<(), StorageError> {
        let Some(first_key) = self.block_first.take() else {
            return Ok(());
        };
        let checksum = xxh3_64(&self.block);
        self.block.extend_from_slice(&checksum.to_le_bytes());
        self.out.write_all(&self.block).map_err(io)?;
        self.blocks.push(BlockRef {
            first_key,
            offset: self.written,
            len: self.block.len() as u32,
        });
        self.written += self.block.len() as u64;
        self.block.clear();
        Ok(())
    }

    /// Ends the file and syncs it; the run, open for reading.
    fn finish(mut self, seq: u64) -> Result<Run, StorageError> {
        self.end_block()?;
        let mut meta = Vec::new();
        for block in &self.blocks {
            meta.extend_from_slice(&block.offset.to_le_bytes());
            meta.extend_from_slice(&block.len.to_le_bytes());
            meta.extend_from_slice(&(block.first_key.len() as u16).to_le_bytes());
            meta.extend_from_slice(&block.first_key);
        }
        let index_len = meta.len() as u64;
        let (hashes, filter_code, bloom_len) = match &self.bloom {
            Some(bloom) => {
                for word in &bloom.words {
                    meta.extend_from_slice(&word.to_le_bytes());
                }
                (
                    bloom.hashes,
                    bloom.filter.code(),
                    bloom.words.len() as u64 * 8,
                )
            }
            None => (0, 0, 0),
        };
        let mut footer = Vec::with_capacity(FOOTER_LEN);
        footer.extend_from_slice(&self.written.to_le_bytes());
        footer.extend_from_slice(&index_len.to_le_bytes());
        footer.extend_from_slice(&(self.written + index_len).to_le_bytes());
        footer.extend_from_slice(&bloom_len.to_le_bytes());
        footer.extend_from_slice(&hashes.to_le_bytes());
        footer.extend_from_slice(&filter_code.to_le_bytes());
        footer.extend_from_slice(&self.entries.to_le_bytes());
        let mut summed = meta.clone();
        summed.extend_from_slice(&footer);
        footer.extend_from_slice(&xxh3_64(&summed).to_le_bytes());
        footer.extend_from_slice(RUN_MAGIC);
        self.out.write_all(&meta).map_err(io)?;
        self.out.write_all(&footer).map_err(io)?;
        let file = self
            .out
            .into_inner()
            .map_err(|error| io(error.into_error()))?;
        file.sync_all().map_err(io)?;
        let bytes = self.written + meta.len() as u64 + footer.len() as u64;
        Ok(Run {
            seq,
            file: File::open(&self.path).map_err(io)?,
            path: self.path,
            blocks: self.blocks,
            bloom: self.bloom,
            entries: self.entries,
            bytes,
        })
    }
}

/// What readers see: the tables and runs, newest first. Readers clone it (a few `Arc`s)
/// and read without any lock held.
#[derive(Clone)]
struct Version {
    /// `[0]` is the active table; the others are frozen, waiting for the flusher.
    memtables: Vec<Arc<Memtable>>,
    runs: Vec<Arc<Run>>,
}

struct Shared {
    dir: PathBuf,
    options: RunOptions,
    version: Mutex<Version>,
    /// Signalled when a table is frozen or written, the runs change, or on stop.
    changed: Condvar,
    /// Serialises `apply` and `clear` (the order of applies is the order of tables).
    writer: Mutex<()>,
    /// Serialises changes to the run list and the manifest that records it.
    manifest: Mutex<()>,
    next_seq: AtomicU64,
    stop: AtomicBool,
    /// Set when a background write fails for a reason other than space: `apply` refuses
    /// from then on (reads go on).
    failure: Mutex<Option<String>>,
    /// Set while the flusher cannot write a run for lack of space; it tries again, and
    /// clears this once a run is written. Meanwhile `apply` takes what fits in memory and
    /// refuses (`NoSpace`) only what would have to wait for the flusher.
    out_of_space: Mutex<Option<String>>,
}

/// An ordered, insert-mostly key-value space for derived data: an in-memory table and
/// sorted run files (see the module docs for what a crash keeps).
pub struct RunIndex {
    shared: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Tests that play a crash close without writing the active table out.
    write_at_close: bool,
}

impl RunIndex {
    /// Opens (or creates) the index in `dir`.
    pub fn open(dir: &Path, options: RunOptions) -> Result<Self, StorageError> {
        fs::create_dir_all(dir).map_err(io)?;
        let seqs = read_manifest(dir)?;
        let mut runs = Vec::with_capacity(seqs.len());
        for &seq in &seqs {
            runs.push(Arc::new(Run::open(dir, seq)?));
        }
        // Leftovers of an interrupted write or merge, and the highest number ever used.
        let mut next_seq = seqs.iter().max().map_or(0, |seq| seq + 1);
        for entry in fs::read_dir(dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if let Some(seq) = name
                .strip_suffix(".run")
                .and_then(|n| n.parse::<u64>().ok())
            {
                next_seq = next_seq.max(seq + 1);
                if !seqs.contains(&seq) {
                    fs::remove_file(entry.path()).map_err(io)?;
                }
            } else if name.ends_with(".tmp") {
                fs::remove_file(entry.path()).map_err(io)?;
            }
        }
        let shared = Arc::new(Shared {
            dir: dir.to_owned(),
            options,
            version: Mutex::new(Version {
                memtables: vec![Arc::default()],
                runs,
            }),
            changed: Condvar::new(),
            writer: Mutex::new(()),
            manifest: Mutex::new(()),
            next_seq: AtomicU64::new(next_seq),
            stop: AtomicBool::new(false),
            failure: Mutex::new(None),
            out_of_space: Mutex::new(None),
        });
        let spawn = |name: &str, work: Work, flusher: bool| {
            let shared = shared.clone();
            crate::background::spawn(name, move || keep_working(&shared, work, flusher)).map_err(io)
        };
        let threads = vec![
            spawn("index-flusher", flush_loop, true)?,
            spawn("index-merger", merge_loop, false)?,
        ];
        Ok(RunIndex {
            shared,
            threads,
            write_at_close: true,
        })
    }

    fn version(&self) -> Version {
        self.shared.version.lock().expect("version lock").clone()
    }

    fn check_failure(&self) -> Result<(), StorageError> {
        match self.shared.failure.lock().expect("failure lock").clone() {
            Some(reason) => Err(StorageError::Backend(format!(
                "writing index runs failed earlier: {reason}"
            ))),
            None => Ok(()),
        }
    }

    /// Freezes the active table (when it holds anything) and, with `wait_written`, waits
    /// until every frozen table is a run.
    fn freeze(&self, wait_written: bool) -> Result<(), StorageError> {
        let shared = &self.shared;
        let version = shared.version.lock().expect("version lock");
        // Backpressure: no more than `max_frozen` tables wait for the flusher.
        let mut version = self.wait_for_tables(version, shared.options.max_frozen)?;
        if !version.memtables[0].is_empty() {
            version.memtables.insert(0, Arc::default());
            shared.changed.notify_all();
        }
        if wait_written {
            drop(self.wait_for_tables(version, 1)?);
        }
        Ok(())
    }

    /// Waits until at most `most` tables are in memory (the active one and those the
    /// flusher has not written yet); an error if the flusher failed meanwhile.
    fn wait_for_tables<'a>(
        &'a self,
        mut version: std::sync::MutexGuard<'a, Version>,
        most: usize,
    ) -> Result<std::sync::MutexGuard<'a, Version>, StorageError> {
        while version.memtables.len() > most {
            self.check_failure()?;
            if let Some(reason) = self.shared.out_of_space.lock().expect("space lock").clone() {
                return Err(StorageError::NoSpace(format!(
                    "index runs cannot be written until space is freed: {reason}"
                )));
            }
            version = self
                .shared
                .changed
                .wait_timeout(version, std::time::Duration::from_millis(100))
                .expect("version lock")
                .0;
        }
        Ok(version)
    }

    /// Runs on disk and the bytes they take (for reports and tests).
    pub fn runs(&self) -> (usize, u64) {
        let version = self.version();
        (
            version.runs.len(),
            version.runs.iter().map(|run| run.bytes).sum(),
        )
    }

    /// Bytes of the index's files.
    pub fn size_on_disk(&self) -> u64 {
        self.runs().1
    }

    /// Every key from `start` (inclusive) in order, read a chunk at a time.
    pub fn scan_from(&self, start: Vec<u8>, end: Vec<u8>) -> Scan<'_> {
        Scan {
            index: self,
            next: Some(start),
            end,
            buffer: VecDeque::new(),
        }
    }
}

/// Keys in order, fetched in chunks by [`RunIndex::scan_from`].
pub struct Scan<'a> {
    index: &'a RunIndex,
    next: Option<Vec<u8>>,
    end: Vec<u8>,
    buffer: VecDeque<KeyValue>,
}

impl Iterator for Scan<'_> {
    type Item = Result<KeyValue, StorageError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buffer.is_empty() {
            let start = self.next.take()?;
            match self.index.range(&start, &self.end, 4096) {
                Ok(chunk) => {
                    if let Some((last, _)) = chunk.last()
                        && chunk.len() == 4096
                    {
                        let mut after = last.clone();
                        after.push(0);
                        self.next = Some(after);
                    }
                    self.buffer = chunk.into();
                }
                Err(error) => return Some(Err(error)),
            }
        }
        self.buffer.pop_front().map(Ok)
    }
}

impl Drop for RunIndex {
    /// A clean close writes every table out, so the next open has nothing to re-derive.
    fn drop(&mut self) {
        if !self.write_at_close {
        } else if let Err(error) = self.freeze(true) {
            tracing::warn!(%error, "index tables not written at close; re-derived at the next open");
        }
        self.shared.stop.store(true, Ordering::Release);
        {
            let _version = self.shared.version.lock().expect("version lock");
            self.shared.changed.notify_all();
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// One source of a merged read, in key order, up to `end` (exclusive) when one is given.
enum Cursor {
    Table {
        table: Arc<Memtable>,
        /// The last key taken (the next chunk starts after it).
        after: Option<Vec<u8>>,
        start: Vec<u8>,
        end: Option<Vec<u8>>,
        done: bool,
        buffer: VecDeque<(Vec<u8>, Stored)>,
    },
    Run {
        run: Arc<Run>,
        next_block: usize,
        block: Option<Block>,
        /// The next entry of `block`.
        at: usize,
        end: Option<Vec<u8>>,
    },
}

impl Cursor {
    fn table(table: Arc<Memtable>, start: &[u8], end: Option<&[u8]>) -> Self {
        Cursor::Table {
            table,
            after: None,
            start: start.to_vec(),
            end: end.map(<[u8]>::to_vec),
            done: false,
            buffer: VecDeque::new(),
        }
    }

    fn run(run: Arc<Run>, start: &[u8], end: Option<&[u8]>) -> Result<Self, StorageError> {
        let first = run.block_for(start).unwrap_or(0);
        let mut cursor = Cursor::Run {
            next_block: first,
            run,
            block: None,
            at: 0,
            end: end.map(<[u8]>::to_vec),
        };
        cursor.fill()?;
        // Skip what the first block holds before `start`.
        if let Cursor::Run {
            block: Some(block),
            at,
            ..
        } = &mut cursor
        {
            *at = match block.find(start) {
                Ok(found) => found,
                Err(insert) => insert,
            };
        }
        Ok(cursor)
    }

    /// Makes the next entry available to [`Cursor::head`], reading what it must.
    fn fill(&mut self) -> Result<(), StorageError> {
        match self {
            Cursor::Table {
                table,
                after,
                start,
                end,
                done,
                buffer,
            } => {
                if buffer.is_empty() && !*done {
                    let map = table.map.read().expect("memtable lock");
                    let lower = match after {
                        Some(key) => Bound::Excluded(key.as_slice()),
                        None => Bound::Included(start.as_slice()),
                    };
                    let upper = match end {
                        Some(end) => Bound::Excluded(end.as_slice()),
                        None => Bound::Unbounded,
                    };
                    if lower_below(&lower, &upper) {
                        buffer.extend(
                            map.range::<[u8], _>((lower, upper))
                                .take(CURSOR_CHUNK)
                                .map(|(key, value)| (key.as_bytes().to_vec(), value.clone())),
                        );
                    }
                    *done = buffer.len() < CURSOR_CHUNK;
                    if let Some((key, _)) = buffer.back() {
                        *after = Some(key.clone());
                    }
                }
            }
            Cursor::Run {
                run,
                next_block,
                block,
                at,
                end,
            } => {
                while block.as_ref().is_none_or(|b| *at >= b.entries.len())
                    && *next_block < run.blocks.len()
                {
                    if end
                        .as_ref()
                        .is_some_and(|end| run.blocks[*next_block].first_key >= *end)
                    {
                        *next_block = run.blocks.len();
                        break;
                    }
                    *block = Some(run.read_block(*next_block)?);
                    *at = 0;
                    *next_block += 1;
                }
            }
        }
        Ok(())
    }

    /// The next key, if [`Cursor::fill`] made one available.
    fn head(&self) -> Option<&[u8]> {
        match self {
            Cursor::Table { buffer, .. } => buffer.front().map(|(key, _)| key.as_slice()),
            Cursor::Run { block, at, end, .. } => block
                .as_ref()
                .filter(|block| *at < block.entries.len())
                .map(|block| block.key(*at))
                .filter(|key| end.as_ref().is_none_or(|end| *key < end.as_slice())),
        }
    }

    fn pop(&mut self) -> Option<(Vec<u8>, Stored)> {
        match self {
            Cursor::Table { buffer, .. } => buffer.pop_front(),
            Cursor::Run { block, at, .. } => {
                let block = block.as_ref()?;
                let entry = block.entry(*at);
                *at += 1;
                Some(entry)
            }
        }
    }
}

/// Whether the range `(lower, upper)` can hold a key (`BTreeMap::range` panics otherwise).
fn lower_below(lower: &Bound<&[u8]>, upper: &Bound<&[u8]>) -> bool {
    match (lower, upper) {
        (_, Bound::Unbounded) => true,
        (Bound::Included(low), Bound::Excluded(high)) => low < high,
        (Bound::Excluded(low), Bound::Excluded(high)) => low < high,
        _ => true,
    }
}

/// Merges cursors (newest first) into one ordered stream where the newest value of each
/// key wins; `keep_removed` keeps removal markers (a merge that does not reach the oldest
/// run must keep them, to go on hiding older values).
struct Merge {
    cursors: Vec<Cursor>,
    end: Option<Vec<u8>>,
    keep_removed: bool,
}

impl Merge {
    fn next(&mut self) -> Result<Option<(Vec<u8>, Stored)>, StorageError> {
        loop {
            for cursor in &mut self.cursors {
                cursor.fill()?;
            }
            // The smallest key; among equal ones the first cursor's, which is the newest.
            let Some((newest, key)) = self
                .cursors
                .iter()
                .enumerate()
                .filter_map(|(n, cursor)| cursor.head().map(|key| (n, key)))
                .min_by(|a, b| a.1.cmp(b.1))
                .map(|(n, key)| (n, key.to_vec()))
            else {
                return Ok(None);
            };
            if self.end.as_ref().is_some_and(|end| key >= *end) {
                return Ok(None);
            }
            let mut value = None;
            for (n, cursor) in self.cursors.iter_mut().enumerate() {
                if cursor.head() == Some(key.as_slice()) {
                    let (_, stored) = cursor.pop().expect("has a head");
                    if n == newest {
                        value = Some(stored);
                    }
                }
            }
            let value = value.expect("the newest source holds the key");
            if value.is_some() || self.keep_removed {
                return Ok(Some((key, value)));
            }
        }
    }
}

impl IndexStore for RunIndex {
    fn apply(&self, writes: Vec<(Vec<u8>, Option<Vec<u8>>)>) -> Result<(), StorageError> {
        self.check_failure()?;
        for (key, value) in &writes {
            if key.len() > u16::MAX as usize
                || value.as_ref().is_some_and(|v| v.len() >= REMOVED as usize)
            {
                return Err(malformed("index key or value too large"));
            }
        }
        let _writer = self.shared.writer.lock().expect("writer lock");
        let active = self.shared.version.lock().expect("version lock").memtables[0].clone();
        let mut added = 0;
        {
            let mut map = active.map.write().expect("memtable lock");
            for (key, value) in writes {
                added += key.len() + value.as_ref().map_or(0, Vec::len) + ENTRY_OVERHEAD;
                map.insert(TableKey::from(key), value);
            }
        }
        let bytes = active.bytes.fetch_add(added, Ordering::AcqRel) + added;
        if bytes >= self.shared.options.memtable_bytes {
            self.freeze(false)?;
        }
        Ok(())
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        let version = self.version();
        for table in &version.memtables {
            if let Some(stored) = table.map.read().expect("memtable lock").get(key) {
                return Ok(stored.clone());
            }
        }
        let mut hashes = [None; 2];
        for run in &version.runs {
            if let Some(stored) = run.get(key, &mut hashes)? {
                return Ok(stored);
            }
        }
        Ok(None)
    }

    fn range(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<KeyValue>, StorageError> {
        if start >= end || limit == 0 {
            return Ok(Vec::new());
        }
        let version = self.version();
        let mut cursors = Vec::with_capacity(version.memtables.len() + version.runs.len());
        for table in version.memtables {
            // Most lists are in no table (a customer's facts): no cursor for those.
            let holds = table
                .map
                .read()
                .expect("memtable lock")
                .range::<[u8], _>((Bound::Included(start), Bound::Excluded(end)))
                .next()
                .is_some();
            if holds {
                cursors.push(Cursor::table(table, start, Some(end)));
            }
        }
        let list = single_list(start, end).map(xxh3_64);
        for run in version.runs {
            // A run whose filter says it holds nothing of the one list asked for is skipped.
            if let (Some(list), Some(bloom)) = (list, &run.bloom)
                && bloom.filter == Filter::Lists
                && !bloom.may_hold_hash(list)
            {
                continue;
            }
            cursors.push(Cursor::run(run, start, Some(end))?);
        }
        let mut merge = Merge {
            cursors,
            end: Some(end.to_vec()),
            keep_removed: false,
        };
        let mut out = Vec::new();
        while out.len() < limit {
            match merge.next()? {
                Some((key, Some(value))) => out.push((key, value)),
                Some((_, None)) => {}
                None => break,
            }
        }
        Ok(out)
    }

    fn clear(&self) -> Result<(), StorageError> {
        let _writer = self.shared.writer.lock().expect("writer lock");
        let _manifest = self.shared.manifest.lock().expect("manifest lock");
        write_manifest(&self.shared.dir, &[])?;
        let old = {
            let mut version = self.shared.version.lock().expect("version lock");
            let old = std::mem::take(&mut version.runs);
            version.memtables = vec![Arc::default()];
            self.shared.changed.notify_all();
            old
        };
        for run in old {
            remove_run(&run.path);
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), StorageError> {
        self.check_failure()?;
        let _writer = self.shared.writer.lock().expect("writer lock");
        self.freeze(true)
    }

    /// Freezes the active table: the flusher writes it as a run in the background.
    fn seal(&self) -> Result<(), StorageError> {
        self.check_failure()?;
        let _writer = self.shared.writer.lock().expect("writer lock");
        self.freeze(false)
    }
}

fn remove_run(path: &Path) {
    if let Err(error) = fs::remove_file(path)
        && error.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(%error, path = %path.display(), "removing a merged index run failed");
    }
}

fn read_manifest(dir: &Path) -> Result<Vec<u64>, StorageError> {
    let path = dir.join(MANIFEST);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(io(error)),
    };
    let bad = || malformed(format!("index manifest {} is damaged", path.display()));
    if bytes.len() < 16 || &bytes[..4] != MANIFEST_MAGIC {
        return Err(bad());
    }
    let body = bytes.len() - 8;
    if xxh3_64(&bytes[..body]).to_le_bytes() != bytes[body..] {
        return Err(bad());
    }
    let count = u32::from_le_bytes(bytes[4..8].try_into().expect("4")) as usize;
    if 8 + count * 8 != body {
        return Err(bad());
    }
    Ok(bytes[8..body]
        .chunks_exact(8)
        .map(|seq| u64::from_le_bytes(seq.try_into().expect("8")))
        .collect())
}

/// Replaces the manifest with `runs` (newest first), atomically and durably.
fn write_manifest(dir: &Path, runs: &[u64]) -> Result<(), StorageError> {
    let mut bytes = Vec::with_capacity(16 + runs.len() * 8);
    bytes.extend_from_slice(MANIFEST_MAGIC);
    bytes.extend_from_slice(&(runs.len() as u32).to_le_bytes());
    for seq in runs {
        bytes.extend_from_slice(&seq.to_le_bytes());
    }
    let checksum = xxh3_64(&bytes);
    bytes.extend_from_slice(&checksum.to_le_bytes());
    let temporary = dir.join(format!("{MANIFEST}.tmp"));
    let mut file = File::create(&temporary).map_err(io)?;
    file.write_all(&bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    fs::rename(&temporary, dir.join(MANIFEST)).map_err(io)?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io)
}

/// A background thread's work: returns when stopped, or with the error that stopped it.
type Work = fn(&Shared) -> Result<(), StorageError>;

/// Runs `work` until it is stopped. A lack of space is waited out — the work is taken up
/// again, a little later each time (up to every 2 s), from what is still in memory and
/// in the live runs: a full disk must not stop the index for good when another process
/// may free it a minute later. With `flusher`, [`Shared::out_of_space`] says so
/// meanwhile. Any other failure stops the work: `apply` refuses from then on.
fn keep_working(shared: &Shared, work: Work, flusher: bool) {
    let dir = shared.dir.display();
    let mut pause = std::time::Duration::from_millis(100);
    loop {
        let reason = match work(shared) {
            Ok(()) => return,
            Err(StorageError::NoSpace(reason)) => reason,
            Err(error) => {
                tracing::error!(%error, %dir, "index run writing failed");
                *shared.failure.lock().expect("failure lock") = Some(error.to_string());
                shared.changed.notify_all();
                return;
            }
        };
        if flusher {
            // Told once per spell: the flusher clears it when a run is written again.
            let mut out_of_space = shared.out_of_space.lock().expect("space lock");
            if out_of_space.is_none() {
                tracing::warn!(%reason, %dir, "no space to write index runs; trying again until there is");
            }
            *out_of_space = Some(reason);
        } else {
            tracing::debug!(%reason, %dir, "index runs not merged for lack of space; trying again later");
        }
        let version = shared.version.lock().expect("version lock");
        shared.changed.notify_all();
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        drop(
            shared
                .changed
                .wait_timeout(version, pause)
                .expect("version lock"),
        );
        pause = (pause * 2).min(std::time::Duration::from_secs(2));
    }
}

/// Writes the run numbered `seq` with what `fill` pushes into it (`fill` answers false when
/// it gave up: stopped). A run not written whole is removed: a partial file would hold
/// disk space until the next open.
fn write_run(
    shared: &Shared,
    seq: u64,
    expected_keys: usize,
    fill: impl FnOnce(&mut RunWriter) -> Result<bool, StorageError>,
) -> Result<Option<Run>, StorageError> {
    let written = RunWriter::create(&shared.dir, seq, expected_keys, &shared.options).and_then(
        |mut writer| {
            if fill(&mut writer)? {
                writer.finish(seq).map(Some)
            } else {
                Ok(None)
            }
        },
    );
    if !matches!(written, Ok(Some(_))) {
        remove_run(&run_path(&shared.dir, seq));
    }
    written
}

/// The flusher: writes the oldest frozen table out as the newest run, until stopped with
/// nothing left to write.
fn flush_loop(shared: &Shared) -> Result<(), StorageError> {
    loop {
        let table = {
            let mut version = shared.version.lock().expect("version lock");
            loop {
                if version.memtables.len() > 1 {
                    break version.memtables.last().expect("frozen").clone();
                }
                if shared.stop.load(Ordering::Acquire) {
                    return Ok(());
                }
                version = shared.changed.wait(version).expect("version lock");
            }
        };
        let seq = shared.next_seq.fetch_add(1, Ordering::AcqRel);
        let written = {
            let map = table.map.read().expect("memtable lock");
            write_run(shared, seq, map.len(), |writer| {
                for (key, value) in map.iter() {
                    writer.push(key.as_bytes(), value.as_deref())?;
                }
                Ok(true)
            })?
        };
        let Some(run) = written.map(Arc::new) else {
            continue;
        };
        let _manifest = shared.manifest.lock().expect("manifest lock");
        let current = shared.version.lock().expect("version lock").clone();
        if !current
            .memtables
            .last()
            .is_some_and(|last| Arc::ptr_eq(last, &table))
        {
            // Cleared meanwhile: the table is gone and so must its run be.
            remove_run(&run.path);
            continue;
        }
        let mut seqs = vec![seq];
        seqs.extend(current.runs.iter().map(|run| run.seq));
        if let Err(error) = write_manifest(&shared.dir, &seqs) {
            remove_run(&run.path);
            return Err(error);
        }
        *shared.out_of_space.lock().expect("space lock") = None;
        let mut version = shared.version.lock().expect("version lock");
        version.memtables.pop();
        version.runs.insert(0, run);
        shared.changed.notify_all();
    }
}

/// Runs merged at once: the tier above holds runs about this many times larger. Eight,
/// not four: under batch load the merger rewrote each key log₄(n) times, and at eight
/// (log₈(n)) batch throughput rose by about a tenth (measured in alternating runs)
/// while a read meets up to seven runs per tier, each skipped by its Bloom filter unless
/// it holds the key or list.
const FANOUT: usize = 8;
/// Past this many runs, the newest tier is merged even if it is not full (five full tiers
/// of `FANOUT − 1` runs stay below it: tens of millions of keys).
const MAX_RUNS: usize = 36;

/// Which runs to merge next (size-tiered): runs adjacent in age and of about one size
/// (each no more than twice the largest newer one of its group) form a tier, and the
/// newest tier with `FANOUT` runs is merged into one run of the tier above. Each byte is
/// then rewritten about log_FANOUT(n) times, and a read meets at most `FANOUT − 1` runs per
/// tier.
fn pick_merge(sizes: &[u64]) -> Option<std::ops::Range<usize>> {
    let mut start = 0;
    while start < sizes.len() {
        let mut largest = sizes[start];
        let mut end = start + 1;
        while end < sizes.len() && sizes[end] <= largest.saturating_mul(2) {
            largest = largest.max(sizes[end]);
            end += 1;
        }
        if end - start >= FANOUT {
            return Some(start..start + FANOUT);
        }
        start = end;
    }
    // Many tiers of few runs (sizes that never line up): merge the newest ones anyway.
    (sizes.len() > MAX_RUNS).then_some(0..2)
}

/// The merger: combines runs by [`pick_merge`], until stopped (an unfinished merge is
/// dropped; its inputs are still the live runs).
fn merge_loop(shared: &Shared) -> Result<(), StorageError> {
    loop {
        let (picked, oldest_included) = {
            let mut version = shared.version.lock().expect("version lock");
            loop {
                if shared.stop.load(Ordering::Acquire) {
                    return Ok(());
                }
                let sizes: Vec<u64> = version.runs.iter().map(|run| run.bytes).collect();
                if let Some(range) = pick_merge(&sizes) {
                    let oldest = range.end == version.runs.len();
                    break (version.runs[range].to_vec(), oldest);
                }
                version = shared.changed.wait(version).expect("version lock");
            }
        };
        let seq = shared.next_seq.fetch_add(1, Ordering::AcqRel);
        let expected = picked.iter().map(|run| run.entries as usize).sum();
        // A merge is never needed to go on (reads meet a few more runs meanwhile): one that
        // would not fit is not begun, rather than take the last free bytes from the log.
        let needed: u64 = picked.iter().map(|run| run.bytes).sum();
        if let Ok(free) = fs2::available_space(&shared.dir)
            && free < needed
        {
            return Err(StorageError::NoSpace(format!(
                "merging index runs needs {needed} bytes, {free} are free"
            )));
        }
        let written = write_run(shared, seq, expected, |writer| {
            let mut merge = Merge {
                cursors: picked
                    .iter()
                    .map(|run| Cursor::run(run.clone(), &[], None))
                    .collect::<Result<_, _>>()?,
                end: None,
                keep_removed: !oldest_included,
            };
            let mut count = 0u64;
            while let Some((key, value)) = merge.next()? {
                writer.push(&key, value.as_deref())?;
                count += 1;
                if count % 4096 == 0 && shared.stop.load(Ordering::Acquire) {
                    return Ok(false);
                }
            }
            Ok(true)
        })?;
        let Some(run) = written.map(Arc::new) else {
            // Stopped.
            return Ok(());
        };
        let _manifest = shared.manifest.lock().expect("manifest lock");
        let current = shared.version.lock().expect("version lock").clone();
        let Some(at) = current
            .runs
            .iter()
            .position(|run| run.seq == picked[0].seq)
            .filter(|&at| {
                current.runs[at..]
                    .iter()
                    .map(|run| run.seq)
                    .take(picked.len())
                    .eq(picked.iter().map(|run| run.seq))
            })
        else {
            // Cleared meanwhile.
            remove_run(&run.path);
            continue;
        };
        let mut runs = current.runs.clone();
        runs.splice(at..at + picked.len(), [run]);
        let seqs: Vec<u64> = runs.iter().map(|run| run.seq).collect();
        if let Err(error) = write_manifest(&shared.dir, &seqs) {
            remove_run(&run_path(&shared.dir, seq));
            return Err(error);
        }
        shared.version.lock().expect("version lock").runs = runs;
        shared.changed.notify_all();
        for old in &picked {
            remove_run(&old.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn small() -> RunOptions {
        RunOptions {
            memtable_bytes: 2048,
            max_frozen: 2,
            bloom_bits_per_key: 10,
            filter: Filter::Keys,
        }
    }

    fn lists() -> RunOptions {
        RunOptions {
            filter: Filter::Lists,
            ..small()
        }
    }

    /// Key `n` of list `n % 7` (`L<list>` 0x00 `<n>`), as the compliance lists look.
    fn listed(n: u32) -> Vec<u8> {
        format!("L{}\0{n:08}", n % 7).into_bytes()
    }

    #[test]
    fn a_read_within_one_list_skips_runs_without_it_and_misses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let index = RunIndex::open(dir.path(), lists()).unwrap();
        // Lists 0..6 in the first runs; list 9 only in the last one.
        index
            .apply((0..700).map(|n| (listed(n), Some(vec![1; 20]))).collect())
            .unwrap();
        index.flush().unwrap();
        index
            .apply(vec![(b"L9\0x".to_vec(), Some(b"nine".to_vec()))])
            .unwrap();
        index.flush().unwrap();
        let version = index.version();
        let holding: Vec<bool> = version
            .runs
            .iter()
            .map(|run| run.bloom.as_ref().unwrap().may_hold(b"L9\0"))
            .collect();
        assert!(holding[0], "the newest run holds list 9");
        assert_eq!(single_list(b"L9\0", b"L9\x01"), Some(&b"L9\0"[..]));
        assert_eq!(single_list(b"L9\0", b"L:"), None, "past the list");
        assert_eq!(
            index.range(b"L9\0", b"L9\x01", usize::MAX).unwrap(),
            vec![(b"L9\0x".to_vec(), b"nine".to_vec())]
        );
        let three = index.range(b"L3\0", b"L3\x01", usize::MAX).unwrap();
        assert_eq!(three.len(), 100);
        assert_eq!(index.get(&listed(5)).unwrap(), Some(vec![1; 20]));
        assert_eq!(index.get(b"L3\0nothing").unwrap(), None);
    }

    fn key(n: u32) -> Vec<u8> {
        format!("k{n:08}").into_bytes()
    }

    #[test]
    fn writes_read_back_through_tables_runs_merges_and_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let index = RunIndex::open(dir.path(), small()).unwrap();
            for chunk in 0..200u32 {
                let writes = (0..20)
                    .map(|n| (key(chunk * 20 + n), Some(vec![n as u8; 10])))
                    .collect();
                index.apply(writes).unwrap();
            }
            index.flush().unwrap();
            assert!(index.runs().0 >= 1);
            assert_eq!(index.get(&key(1234)).unwrap(), Some(vec![14; 10]));
            assert_eq!(index.get(&key(4000)).unwrap(), None);
            let all = index.range(&key(0), &key(10_000), usize::MAX).unwrap();
            assert_eq!(all.len(), 4000);
            assert!(all.windows(2).all(|pair| pair[0].0 < pair[1].0));
        }
        let index = RunIndex::open(dir.path(), small()).unwrap();
        let some = index.range(&key(100), &key(110), usize::MAX).unwrap();
        assert_eq!(
            some.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
            (100..110).map(key).collect::<Vec<_>>()
        );
        assert_eq!(index.range(&key(3990), &key(9999), 3).unwrap().len(), 3);
    }

    /// Readers racing the writer, the flusher and the merger: whatever mark a reader sees,
    /// every key written before it is there, by point and by range, while tables freeze,
    /// turn into runs and runs merge.
    #[test]
    fn readers_see_everything_before_the_mark_while_tables_move() {
        let dir = tempfile::tempdir().unwrap();
        let index = Arc::new(RunIndex::open(dir.path(), small()).unwrap());
        let done = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (index, done) = (index.clone(), done.clone());
                std::thread::spawn(move || {
                    let mut checks = 0;
                    while !done.load(Ordering::Acquire) {
                        let Some(mark) = index.get(b"m/mark").unwrap() else {
                            continue;
                        };
                        let mark = u32::from_be_bytes(mark.try_into().unwrap());
                        let keys = index.range(&key(0), &key(mark), usize::MAX).unwrap();
                        assert_eq!(keys.len() as u32, mark, "a key before the mark is missing");
                        assert!(index.get(&key(mark.saturating_sub(1))).unwrap().is_some());
                        checks += 1;
                    }
                    checks
                })
            })
            .collect();
        for n in 0..3000u32 {
            index
                .apply(vec![
                    (key(n), Some(vec![7; 16])),
                    (b"m/mark".to_vec(), Some((n + 1).to_be_bytes().to_vec())),
                ])
                .unwrap();
        }
        done.store(true, Ordering::Release);
        for reader in readers {
            assert!(reader.join().unwrap() > 0);
        }
        assert!(index.runs().0 >= 1);
    }

    #[test]
    fn merges_take_full_tiers_of_adjacent_runs() {
        let tier = |size: u64, count: usize| -> Vec<u64> {
            (0..count).map(|n| size + (n as u64 % 3)).collect()
        };
        assert_eq!(pick_merge(&[]), None);
        assert_eq!(pick_merge(&tier(10, FANOUT - 1)), None);
        assert_eq!(pick_merge(&tier(10, FANOUT)), Some(0..FANOUT));
        let two_short_tiers = [tier(10, FANOUT - 1), tier(40, FANOUT - 1)].concat();
        assert_eq!(pick_merge(&two_short_tiers), None);
        let full_middle_tier = [vec![10], tier(40, FANOUT), vec![160]].concat();
        assert_eq!(pick_merge(&full_middle_tier), Some(1..1 + FANOUT));
        assert_eq!(
            pick_merge(&tier(10, FANOUT + 1)),
            Some(0..FANOUT),
            "the newest runs of a tier first"
        );
        let spread: Vec<u64> = (0..MAX_RUNS as u32 + 2).map(|n| 3u64.pow(n)).collect();
        assert_eq!(
            pick_merge(&spread),
            Some(0..2),
            "too many runs: merge anyway"
        );
    }

    #[test]
    fn what_a_crash_keeps_is_a_prefix_of_the_applies() {
        let dir = tempfile::tempdir().unwrap();
        let index = RunIndex::open(dir.path(), small()).unwrap();
        for n in 0..500u32 {
            index
                .apply(vec![
                    (key(n), Some(b"v".to_vec())),
                    (b"m/mark".to_vec(), Some(n.to_be_bytes().to_vec())),
                ])
                .unwrap();
        }
        // A crash: the active table is lost (what was frozen may or may not be written).
        let mut index = index;
        index.write_at_close = false;
        drop(index);
        let reopened = RunIndex::open(dir.path(), small()).unwrap();
        let mark = reopened
            .get(b"m/mark")
            .unwrap()
            .map_or(0, |v| u32::from_be_bytes(v.try_into().unwrap()) + 1);
        let keys = reopened.range(b"k", b"l", usize::MAX).unwrap();
        assert_eq!(
            keys.len() as u32,
            mark,
            "every key before the mark, none after"
        );
        assert!(mark > 0);
    }

    #[test]
    fn removals_hide_older_values_until_merged_away() {
        let dir = tempfile::tempdir().unwrap();
        let index = RunIndex::open(dir.path(), small()).unwrap();
        index
            .apply((0..100).map(|n| (key(n), Some(vec![1; 30]))).collect())
            .unwrap();
        index.flush().unwrap();
        index
            .apply((0..50).map(|n| (key(n), None)).collect())
            .unwrap();
        assert_eq!(index.get(&key(10)).unwrap(), None);
        index.flush().unwrap();
        assert_eq!(index.get(&key(10)).unwrap(), None);
        assert_eq!(
            index.range(&key(0), &key(100), usize::MAX).unwrap().len(),
            50
        );
        assert_eq!(index.range(&key(0), &key(100), 5).unwrap()[0].0, key(50));
    }

    #[test]
    fn clear_empties_everything_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let index = RunIndex::open(dir.path(), small()).unwrap();
            index
                .apply((0..300).map(|n| (key(n), Some(vec![2; 20]))).collect())
                .unwrap();
            index.flush().unwrap();
            index.clear().unwrap();
            assert_eq!(index.get(&key(1)).unwrap(), None);
            index
                .apply(vec![(key(7), Some(b"after".to_vec()))])
                .unwrap();
        }
        let index = RunIndex::open(dir.path(), small()).unwrap();
        assert_eq!(
            index.range(b"", b"\xff", usize::MAX).unwrap(),
            vec![(key(7), b"after".to_vec())]
        );
    }

    #[test]
    fn a_damaged_block_is_reported_not_misread() {
        let dir = tempfile::tempdir().unwrap();
        {
            let index = RunIndex::open(dir.path(), small()).unwrap();
            index
                .apply((0..20).map(|n| (key(n), Some(vec![3; 20]))).collect())
                .unwrap();
        }
        let run = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "run"))
            .unwrap();
        let mut bytes = fs::read(&run).unwrap();
        bytes[20] ^= 1;
        fs::write(&run, bytes).unwrap();
        let index = RunIndex::open(dir.path(), small()).unwrap();
        let error = index.range(b"", b"\xff", usize::MAX).unwrap_err();
        assert!(error.to_string().contains("checksum"), "{error}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Against a `BTreeMap`: any sequence of puts and removals, with flushes and
        /// reopens between them, reads back the same by key and by range.
        #[test]
        fn behaves_like_an_ordered_map(
            steps in proptest::collection::vec(
                (0u32..300, proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)), 0u8..20),
                1..400,
            ),
            from in 0u32..300,
            span in 0u32..300,
            limit in 1usize..50,
            by_list in any::<bool>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut model = BTreeMap::new();
            // Either whole keys filtered, or keys in lists filtered by list.
            let (options, key): (RunOptions, fn(u32) -> Vec<u8>) =
                if by_list { (lists(), listed) } else { (small(), key) };
            let mut index = RunIndex::open(dir.path(), options).unwrap();
            for (n, value, action) in steps {
                index.apply(vec![(key(n), value.clone())]).unwrap();
                match value {
                    Some(value) => model.insert(key(n), value),
                    None => model.remove(&key(n)),
                };
                if action == 0 {
                    index.flush().unwrap();
                } else if action == 1 {
                    drop(index);
                    index = RunIndex::open(dir.path(), options).unwrap();
                }
            }
            for n in 0..300 {
                prop_assert_eq!(index.get(&key(n)).unwrap(), model.get(&key(n)).cloned());
            }
            let (start, end) = (key(from), key(from + span));
            let (start, end) = (start.clone().min(end.clone()), start.max(end));
            let expected: Vec<KeyValue> = model
                .range(start.clone()..end.clone())
                .take(limit)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            prop_assert_eq!(index.range(&start, &end, limit).unwrap(), expected);
            // A whole list, and a list from one of its keys on.
            let list = format!("L{}\0", from % 7).into_bytes();
            let mut after = list.clone();
            *after.last_mut().unwrap() = 1;
            let starts = if by_list { vec![list.clone(), key(from)] } else { Vec::new() };
            for start in starts {
                let expected: Vec<KeyValue> = model
                    .range(start.clone()..after.clone())
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                prop_assert_eq!(index.range(&start, &after, usize::MAX).unwrap(), expected);
            }
        }
    }
}
