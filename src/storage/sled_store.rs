//! The embedded [`Store`]: one sled tree, keys prefixed by kind, so that a group commit is
//! one atomic `apply_batch` followed by one `flush` (sled alone would lose up to 500 ms of
//! writes on a crash; the flush before acknowledging is what makes an ack durable).

use std::path::Path;

use super::{
    Checkpoints, CommitBatch, IdempotencyRecord, IdempotencyRecords, IndexStore, KeyValue,
    RawEntries, RawEntry, StorageError, Store,
};
use crate::ledger::merkle::{HASH_SIZE, Hash};

/// Key prefixes. Indices and sizes are big-endian so that keys sort numerically.
const LEAF: u8 = b'l';
const NODES: u8 = b'n';
const BODY: u8 = b'b';
const IDEMPOTENCY: u8 = b'i';
const CHECKPOINT: u8 = b'c';

/// The sled database file layout version, kept so a future layout can be told apart.
const LAYOUT_KEY: &[u8] = b"m/layout";
const LAYOUT_VERSION: &[u8] = b"1";

pub struct SledStore {
    db: sled::Db,
    dir: std::path::PathBuf,
}

/// Name of the sled tree holding derived indexes.
pub(super) const INDEX_TREE: &[u8] = b"index";

/// Name of the sled tree holding the fact lists.
pub(super) const FACTS_TREE: &[u8] = b"facts";

/// Name of the sled tree that held the access log before its file.
pub(super) const ACCESS_TREE: &[u8] = b"access";

/// [`IndexStore`] on a sled tree (derived indexes).
pub struct SledIndex {
    tree: sled::Tree,
}

impl SledIndex {
    /// The tree `name` of `db`.
    pub(super) fn open(db: &sled::Db, name: &[u8]) -> Result<Self, StorageError> {
        Ok(SledIndex {
            tree: db.open_tree(name).map_err(backend)?,
        })
    }
}

impl IndexStore for SledIndex {
    fn apply(&self, writes: Vec<(Vec<u8>, Option<Vec<u8>>)>) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for (key, value) in writes {
            match value {
                Some(value) => batch.insert(key, value),
                None => batch.remove(key),
            }
        }
        self.tree.apply_batch(batch).map_err(backend)
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.tree.get(key).map_err(backend)?.map(|v| v.to_vec()))
    }

    fn range(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<KeyValue>, StorageError> {
        if start >= end {
            return Ok(Vec::new());
        }
        self.tree
            .range(start..end)
            .take(limit)
            .map(|item| {
                let (key, value) = item.map_err(backend)?;
                Ok((key.to_vec(), value.to_vec()))
            })
            .collect()
    }

    fn clear(&self) -> Result<(), StorageError> {
        self.tree.clear().map_err(backend)
    }

    fn flush(&self) -> Result<(), StorageError> {
        self.tree.flush().map(|_| ()).map_err(backend)
    }

    /// Nothing to start: what is applied becomes durable with the database's next flush
    /// (every group commit in a [`SledStore`], sled's timer for `derived/`).
    fn seal(&self) -> Result<(), StorageError> {
        Ok(())
    }
}

pub(super) fn backend(error: sled::Error) -> StorageError {
    match error {
        sled::Error::Io(io) => StorageError::from(io),
        // sled's own checksums found damage: the data is wrong, not unreadable.
        sled::Error::Corruption { .. } => StorageError::Malformed(error.to_string()),
        _ => StorageError::Backend(error.to_string()),
    }
}

/// The key of entry `index`'s leaf. Public so that tests can tamper with a stored leaf.
pub fn leaf_key(index: u64) -> [u8; 9] {
    indexed_key(LEAF, index)
}

/// The key of entry `index`'s body. Public so that tests can tamper with a stored body.
pub fn body_key(index: u64) -> [u8; 9] {
    indexed_key(BODY, index)
}

/// The key of the tree nodes written with entry `index`.
pub fn nodes_key(index: u64) -> [u8; 9] {
    indexed_key(NODES, index)
}

/// The key of the checkpoint for tree size `size`.
pub fn checkpoint_key(size: u64) -> [u8; 9] {
    indexed_key(CHECKPOINT, size)
}

fn indexed_key(prefix: u8, index: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = prefix;
    key[1..].copy_from_slice(&index.to_be_bytes());
    key
}

fn index_of(key: &[u8]) -> Result<u64, StorageError> {
    key.get(1..9)
        .and_then(|bytes| bytes.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| StorageError::Malformed(format!("key {key:02x?}")))
}

fn decode_nodes(index: u64, bytes: &[u8]) -> Result<Vec<Hash>, StorageError> {
    if bytes.is_empty() || bytes.len() % HASH_SIZE != 0 {
        return Err(StorageError::Malformed(format!(
            "tree nodes of entry {index} are {} bytes",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(HASH_SIZE)
        .map(|chunk| Hash(chunk.try_into().expect("chunks of HASH_SIZE")))
        .collect())
}

/// Opens the sled database in `dir`, naming the lock error; `flush_every_ms` is sled's
/// background flush (`None`: only explicit flushes).
pub(super) fn open_sled(
    dir: &Path,
    cache_bytes: u64,
    flush_every_ms: Option<u64>,
) -> Result<sled::Db, StorageError> {
    sled::Config::new()
        .path(dir)
        .cache_capacity(cache_bytes)
        .flush_every_ms(flush_every_ms)
        // Measured: batches of 1,000 at 7,942 entries/s against 5,385 in the default
        // LowSpace mode, unary appends +11 %, for ~10 % more disk (docs/BENCHMARKS.md).
        .mode(sled::Mode::HighThroughput)
        .open()
        .map_err(|error| match error {
            // sled reports its exclusive file lock as an I/O error with this text.
            sled::Error::Io(io)
                if io.kind() == std::io::ErrorKind::WouldBlock
                    || io.to_string().contains("could not acquire lock") =>
            {
                StorageError::Backend(format!(
                    "{} is in use by another process (is the server running?)",
                    dir.display()
                ))
            }
            other => backend(other),
        })
}

fn idempotency_key(key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + 1);
    out.push(IDEMPOTENCY);
    out.extend_from_slice(key);
    out
}

impl SledStore {
    /// Opens (or creates) the store in `dir`. `cache_bytes` sizes sled's page cache.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Self, StorageError> {
        // We flush at every group commit ourselves; sled's timer flush adds nothing.
        let db = open_sled(dir, cache_bytes, None)?;
        match db.get(LAYOUT_KEY).map_err(backend)? {
            Some(version) if version.as_ref() == LAYOUT_VERSION => {}
            Some(version) => {
                return Err(StorageError::Malformed(format!(
                    "store layout version {:?}, this build reads {:?}",
                    String::from_utf8_lossy(&version),
                    String::from_utf8_lossy(LAYOUT_VERSION)
                )));
            }
            None => {
                db.insert(LAYOUT_KEY, LAYOUT_VERSION).map_err(backend)?;
                db.flush().map_err(backend)?;
            }
        }
        Ok(SledStore {
            db,
            dir: dir.to_owned(),
        })
    }

    /// The derived-index space, a sled tree of its own beside the ledger's.
    pub fn index(&self) -> Result<SledIndex, StorageError> {
        SledIndex::open(&self.db, INDEX_TREE)
    }

    /// The fact lists' space, another sled tree.
    pub fn facts(&self) -> Result<SledIndex, StorageError> {
        SledIndex::open(&self.db, FACTS_TREE)
    }

    /// The sled tree the access log was kept in before it had a file of its own
    /// ([`super::AccessFile`]): read once, at open, to move its records.
    pub fn legacy_access_tree(&self) -> Result<SledIndex, StorageError> {
        SledIndex::open(&self.db, ACCESS_TREE)
    }

    /// The raw sled database, for tests that alter the store behind the ledger's back.
    pub fn raw(&self) -> &sled::Db {
        &self.db
    }

    /// Bytes sled occupies on disk.
    pub fn size_on_disk(&self) -> Result<u64, StorageError> {
        self.db.size_on_disk().map_err(backend)
    }
}

impl Store for SledStore {
    fn commit(&self, batch: &CommitBatch) -> Result<(), StorageError> {
        let mut writes = sled::Batch::default();
        for entry in &batch.entries {
            let mut nodes = Vec::with_capacity(entry.nodes.len() * HASH_SIZE);
            for node in &entry.nodes {
                nodes.extend_from_slice(&node.0);
            }
            writes.insert(&leaf_key(entry.index), entry.leaf.as_slice());
            writes.insert(&nodes_key(entry.index), nodes);
            writes.insert(&indexed_key(BODY, entry.index), entry.body.as_slice());
        }
        for (key, record) in &batch.idempotency {
            keyed::put_idempotency(&mut writes, key, record);
        }
        if let Some((size, note)) = &batch.checkpoint {
            keyed::put_checkpoint(&self.db, &mut writes, *size, note)?;
        }
        self.db.apply_batch(writes).map_err(backend)?;
        self.db.flush().map_err(backend)?;
        Ok(())
    }

    fn leaf(&self, index: u64) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self
            .db
            .get(leaf_key(index))
            .map_err(backend)?
            .map(|v| v.to_vec()))
    }

    fn body(&self, index: u64) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self
            .db
            .get(indexed_key(BODY, index))
            .map_err(backend)?
            .map(|v| v.to_vec()))
    }

    fn leaf_nodes(&self, index: u64) -> Result<Option<Vec<Hash>>, StorageError> {
        match self.db.get(nodes_key(index)).map_err(backend)? {
            Some(bytes) => decode_nodes(index, &bytes).map(Some),
            None => Ok(None),
        }
    }

    fn entries(&self, from: u64, to: u64) -> RawEntries<'_> {
        // Three ordered scans in step: one sequential pass over each kind instead of three
        // point look-ups per entry.
        let scan = |prefix: u8| {
            self.db
                .range(indexed_key(prefix, from)..indexed_key(prefix, to.max(from)))
                .peekable()
        };
        let mut leaves = scan(LEAF);
        let mut nodes = scan(NODES);
        let mut bodies = scan(BODY);
        // The value stored under `index` in `scan`, if its next key is that index.
        fn take(
            scan: &mut std::iter::Peekable<sled::Iter>,
            index: u64,
        ) -> Result<Option<sled::IVec>, StorageError> {
            match scan.peek() {
                Some(Ok((key, _))) if index_of(key)? != index => Ok(None),
                Some(_) => match scan.next() {
                    Some(Ok((_, value))) => Ok(Some(value)),
                    Some(Err(error)) => Err(backend(error)),
                    None => Ok(None),
                },
                None => Ok(None),
            }
        }
        Box::new((from..to).map(move |index| {
            Ok(RawEntry {
                index,
                leaf: take(&mut leaves, index)?.map(|v| v.to_vec()),
                nodes: take(&mut nodes, index)?
                    .map(|v| decode_nodes(index, &v))
                    .transpose()?,
                body: take(&mut bodies, index)?.map(|v| v.to_vec()),
            })
        }))
    }

    fn last_leaf_index(&self) -> Result<Option<u64>, StorageError> {
        match self.db.scan_prefix([LEAF]).next_back() {
            Some(item) => Ok(Some(index_of(&item.map_err(backend)?.0)?)),
            None => Ok(None),
        }
    }

    fn idempotency_record(&self, key: &[u8]) -> Result<Option<IdempotencyRecord>, StorageError> {
        keyed::idempotency_record(&self.db, key)
    }

    fn idempotency_records(&self) -> IdempotencyRecords<'_> {
        keyed::idempotency_records(&self.db)
    }

    fn latest_checkpoint(&self) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
        keyed::latest_checkpoint(&self.db)
    }

    fn available_bytes(&self) -> Option<u64> {
        fs2::available_space(&self.dir).ok()
    }

    fn checkpoints(&self) -> Checkpoints<'_> {
        keyed::checkpoints(&self.db)
    }

    fn checkpoints_from(&self, size: u64) -> Checkpoints<'_> {
        keyed::checkpoints_from(&self.db, size)
    }
}

/// Idempotency keys and checkpoints as the sled store keeps them (the log store kept them so
/// too before its run indexes; it removes them when it meets them, `log_store` at open).
mod keyed {
    use super::{
        CHECKPOINT, Checkpoints, IDEMPOTENCY, IdempotencyRecord, IdempotencyRecords, StorageError,
        backend, checkpoint_key, idempotency_key, index_of,
    };

    pub fn put_idempotency(batch: &mut sled::Batch, key: &[u8], record: &IdempotencyRecord) {
        batch.insert(idempotency_key(key), record.encode().as_slice());
    }

    /// The first checkpoint of a size is `c` ‖ size; the same tree re-signed with a newer
    /// access trail anchor is `c` ‖ size ‖ n (u64 BE, 1, 2, …): after the first and before
    /// the next size, in the order signed. A checkpoint already stored last for its size
    /// (a retried commit) is not stored twice.
    pub fn put_checkpoint(
        db: &sled::Db,
        batch: &mut sled::Batch,
        size: u64,
        note: &[u8],
    ) -> Result<(), StorageError> {
        let first = checkpoint_key(size);
        let key = match db.scan_prefix(first).next_back() {
            None => first.to_vec(),
            Some(item) => {
                let (key, stored) = item.map_err(backend)?;
                if stored.as_ref() == note {
                    return Ok(());
                }
                let n = match key.get(9..17) {
                    Some(n) => u64::from_be_bytes(n.try_into().expect("8 bytes")) + 1,
                    None => 1,
                };
                [first.as_slice(), &n.to_be_bytes()].concat()
            }
        };
        batch.insert(key, note);
        Ok(())
    }

    pub fn idempotency_record(
        db: &sled::Db,
        key: &[u8],
    ) -> Result<Option<IdempotencyRecord>, StorageError> {
        match db.get(idempotency_key(key)).map_err(backend)? {
            Some(bytes) => IdempotencyRecord::decode(&bytes)
                .map(Some)
                .ok_or_else(|| StorageError::Malformed("idempotency record".into())),
            None => Ok(None),
        }
    }

    pub fn idempotency_records(db: &sled::Db) -> IdempotencyRecords<'_> {
        Box::new(db.scan_prefix([IDEMPOTENCY]).map(|item| {
            let (key, value) = item.map_err(backend)?;
            let record = IdempotencyRecord::decode(&value)
                .ok_or_else(|| StorageError::Malformed("idempotency record".into()))?;
            Ok((key[1..].to_vec(), record))
        }))
    }

    pub fn latest_checkpoint(db: &sled::Db) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
        match db.scan_prefix([CHECKPOINT]).next_back() {
            Some(item) => {
                let (key, value) = item.map_err(backend)?;
                Ok(Some((index_of(&key)?, value.to_vec())))
            }
            None => Ok(None),
        }
    }

    pub fn checkpoints(db: &sled::Db) -> Checkpoints<'_> {
        checkpoints_from(db, 0)
    }

    /// The checkpoints at tree sizes from `size` on, oldest first.
    pub fn checkpoints_from(db: &sled::Db, size: u64) -> Checkpoints<'_> {
        let end: &[u8] = &[CHECKPOINT + 1];
        Box::new(
            db.range(checkpoint_key(size).to_vec()..end.to_vec())
                .map(|item| {
                    let (key, value) = item.map_err(backend)?;
                    Ok((index_of(&key)?, value.to_vec()))
                }),
        )
    }
}
