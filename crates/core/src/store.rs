//! The ledger's storage interface, owned by the ledger core: the [`Store`] trait every
//! backend implements (the backends themselves live above, as peers), what one group
//! commit writes, and the one storage error.
//!
//! A store is dumb on purpose: it keeps what it is given and returns it. Sequencing,
//! hashing, chaining and signing all happen in the ledger core, so every backend holds
//! exactly the same bytes and a ledger verifies the same way whatever it is stored in.

use audit_ledger_primitives::merkle::Hash;

/// Everything one group commit writes. [`Store::commit`] applies it all or nothing and
/// returns only once it is durable.
#[derive(Debug, Default)]
pub struct CommitBatch {
    pub entries: Vec<NewEntry>,
    /// Idempotency keys of the new entries.
    pub idempotency: Vec<(Vec<u8>, IdempotencyRecord)>,
    /// The checkpoint signed over the tree that includes `entries`: `(tree size, note)`.
    pub checkpoint: Option<(u64, Vec<u8>)>,
}

/// One new entry: its leaf, the tree nodes it adds and its body.
#[derive(Debug)]
pub struct NewEntry {
    pub index: u64,
    pub leaf: Vec<u8>,
    /// The nodes this leaf adds in the stored-hash layout: its leaf hash first, then the root
    /// of each perfect subtree it completes, by level.
    pub nodes: Vec<Hash>,
    pub body: Vec<u8>,
}

/// What an idempotency key points at: the entry and the digest of its content, to tell a
/// retry (same content) from a conflict (same key, different content).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdempotencyRecord {
    pub index: u64,
    pub content_digest: [u8; 32],
}

impl IdempotencyRecord {
    pub const ENCODED_LEN: usize = 40;

    pub fn encode(&self) -> [u8; Self::ENCODED_LEN] {
        let mut out = [0u8; Self::ENCODED_LEN];
        out[..8].copy_from_slice(&self.index.to_be_bytes());
        out[8..].copy_from_slice(&self.content_digest);
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != Self::ENCODED_LEN {
            return None;
        }
        Some(IdempotencyRecord {
            index: u64::from_be_bytes(bytes[..8].try_into().ok()?),
            content_digest: bytes[8..].try_into().ok()?,
        })
    }
}

/// A storage failure. The message is for operators; clients see a generic status.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The disk is full (`io::ErrorKind::StorageFull`): writes wait for space.
    #[error("no space left on device: {0}")]
    NoSpace(String),
    /// A file or device operation failed, of this kind (the operating system's error,
    /// kept as its kind rather than flattened into the text).
    #[error("storage I/O ({kind}): {detail}")]
    Io {
        kind: std::io::ErrorKind,
        detail: String,
    },
    /// The storage engine failed for a reason of its own (a lock held by another process,
    /// a worker that stopped, ...).
    #[error("storage backend: {0}")]
    Backend(String),
    /// A stored value does not have the shape this code writes: the store was altered.
    #[error("stored value is malformed: {0}")]
    Malformed(String),
    /// Data that may have been acknowledged no longer checks out. `first_bad_index` is the
    /// first entry that cannot be trusted; nothing was changed (the evidence is kept).
    #[error("the store is damaged from entry {first_bad_index} on: {detail}")]
    Damaged {
        first_bad_index: u64,
        detail: String,
    },
}

impl From<std::io::Error> for StorageError {
    /// A full disk is told apart by its kind; every other failure keeps its kind.
    fn from(error: std::io::Error) -> Self {
        match error.kind() {
            std::io::ErrorKind::StorageFull => StorageError::NoSpace(error.to_string()),
            kind => StorageError::Io {
                kind,
                detail: error.to_string(),
            },
        }
    }
}

impl StorageError {
    /// True when the store's data is wrong (altered or damaged), as opposed to the store
    /// being unreadable (I/O, a lock held, a full disk).
    pub fn is_damage(&self) -> bool {
        matches!(
            self,
            StorageError::Malformed(_) | StorageError::Damaged { .. }
        )
    }

    /// The first entry that cannot be trusted, when the damage is tied to one.
    pub fn first_bad_index(&self) -> Option<u64> {
        match self {
            StorageError::Damaged {
                first_bad_index, ..
            } => Some(*first_bad_index),
            _ => None,
        }
    }
}

/// Stored checkpoints as `(tree size, signed note)`, oldest first.
pub type Checkpoints<'a> = Box<dyn Iterator<Item = Result<(u64, Vec<u8>), StorageError>> + 'a>;

/// The ledger's storage.
///
/// Writes happen only through [`Store::commit`], called by the single writer; reads may
/// come from any thread at any time, and only ever ask for entries the writer has already
/// published, so they never see a half-written state.
pub trait Store: Send + Sync + 'static {
    /// Applies the batch atomically and durably: when this returns `Ok`, all of it survives
    /// a crash; when the process dies before, none of it or all of it is there.
    fn commit(&self, batch: &CommitBatch) -> Result<(), StorageError>;

    /// The leaf bytes of entry `index`.
    fn leaf(&self, index: u64) -> Result<Option<Vec<u8>>, StorageError>;

    /// The body of entry `index`.
    fn body(&self, index: u64) -> Result<Option<Vec<u8>>, StorageError>;

    /// The tree nodes written with entry `index` (see [`NewEntry::nodes`]).
    fn leaf_nodes(&self, index: u64) -> Result<Option<Vec<Hash>>, StorageError>;

    /// The highest index with a stored leaf.
    fn last_leaf_index(&self) -> Result<Option<u64>, StorageError>;

    fn idempotency_record(&self, key: &[u8]) -> Result<Option<IdempotencyRecord>, StorageError>;

    /// Every idempotency key with its record, in any order (`verify` compares them all).
    fn idempotency_records(&self) -> IdempotencyRecords<'_>;

    /// The most recent signed checkpoint: `(tree size, note)`.
    fn latest_checkpoint(&self) -> Result<Option<(u64, Vec<u8>)>, StorageError>;

    /// Every signed checkpoint ever committed, oldest first.
    fn checkpoints(&self) -> Checkpoints<'_>;

    /// The signed checkpoints at tree sizes from `size` on, oldest first: a range scan
    /// where the backend keeps them by size. (Where a backend keeps several at one size,
    /// the latest of them comes last.)
    fn checkpoints_from(&self, size: u64) -> Checkpoints<'_> {
        Box::new(
            self.checkpoints()
                .filter(move |stored| !matches!(stored, Ok((signed, _)) if *signed < size)),
        )
    }

    /// Entries `from..to` in order, one item per index (missing parts are `None`). The
    /// default reads them one by one; a backend with ordered scans does better.
    fn entries(&self, from: u64, to: u64) -> RawEntries<'_> {
        Box::new((from..to).map(move |index| {
            Ok(RawEntry {
                index,
                leaf: self.leaf(index)?,
                nodes: self.leaf_nodes(index)?,
                body: self.body(index)?,
            })
        }))
    }

    /// The leaves of entries `from..to` in order, as `(index, leaf)`, for readers that need
    /// nothing else (the communication indexer). A missing leaf is an error.
    fn leaves(&self, from: u64, to: u64) -> Leaves<'_> {
        Box::new(self.entries(from, to).map(|entry| {
            let entry = entry?;
            let leaf = entry.leaf.ok_or_else(|| {
                StorageError::Malformed(format!("entry {} has no leaf", entry.index))
            })?;
            Ok((entry.index, leaf))
        }))
    }

    /// Bytes still free where the store writes, when the backend can tell.
    fn available_bytes(&self) -> Option<u64> {
        None
    }

    /// The group commits as the backend keeps them, oldest first, each checked against
    /// the backend's own checksum (a group that fails it is [`StorageError::Damaged`],
    /// naming its first entry), for `verify` to check every byte a group holds against
    /// the entries and the signatures. `None` when the backend keeps no groups of its own
    /// (sled: its keys are what it stores, and sled checksums its pages itself).
    fn groups(&self) -> Option<StoredGroups<'_>> {
        None
    }
}

/// One group commit as stored: its entries' range, and what it wrote beside them.
#[derive(Debug)]
pub struct StoredGroup {
    pub first_index: u64,
    pub entries: u64,
    pub idempotency: Vec<(Vec<u8>, IdempotencyRecord)>,
    pub checkpoint: Option<(u64, Vec<u8>)>,
}

/// Group commits in the order they were made.
pub type StoredGroups<'a> = Box<dyn Iterator<Item = Result<StoredGroup, StorageError>> + Send + 'a>;

/// One entry as the store holds it, for sequential reads (`verify`). A part that is not
/// stored is `None`: the reader decides what that means.
#[derive(Debug)]
pub struct RawEntry {
    pub index: u64,
    pub leaf: Option<Vec<u8>>,
    pub nodes: Option<Vec<Hash>>,
    pub body: Option<Vec<u8>>,
}

/// Entries in index order.
pub type RawEntries<'a> = Box<dyn Iterator<Item = Result<RawEntry, StorageError>> + Send + 'a>;

/// Leaves in index order, as `(index, leaf)`.
pub type Leaves<'a> = Box<dyn Iterator<Item = Result<(u64, Vec<u8>), StorageError>> + Send + 'a>;

/// Idempotency keys and their records.
pub type IdempotencyRecords<'a> =
    Box<dyn Iterator<Item = Result<(Vec<u8>, IdempotencyRecord), StorageError>> + 'a>;

/// A key and its value.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// An ordered key-value space for derived data (query indexes). Everything in it can be
/// rebuilt from the ledger, so writes are atomic but not flushed: after a crash the
/// owner re-derives whatever is missing from the ledger itself.
pub trait IndexStore: Send + Sync + 'static {
    /// Applies all writes atomically (`None` removes the key).
    fn apply(&self, writes: Vec<(Vec<u8>, Option<Vec<u8>>)>) -> Result<(), StorageError>;

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError>;

    /// Keys in `[start, end)` in ascending order, at most `limit`.
    fn range(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<KeyValue>, StorageError>;

    /// Removes everything (before a rebuild).
    fn clear(&self) -> Result<(), StorageError>;

    /// Makes every write so far durable.
    fn flush(&self) -> Result<(), StorageError>;

    /// Starts making every write so far durable, without waiting for it (an owner that
    /// bounds how much it would re-derive after a crash calls this now and then).
    fn seal(&self) -> Result<(), StorageError>;
}

#[cfg(test)]
mod tests {
    use super::StorageError;
    use std::io::{Error, ErrorKind};

    /// An I/O failure keeps its kind; a full disk is told apart by kind, not by number.
    #[test]
    fn io_errors_keep_their_kind() {
        let full = StorageError::from(Error::from_raw_os_error(28));
        assert!(matches!(full, StorageError::NoSpace(_)), "{full:?}");
        let denied = StorageError::from(Error::new(ErrorKind::PermissionDenied, "no"));
        assert!(
            matches!(
                denied,
                StorageError::Io {
                    kind: ErrorKind::PermissionDenied,
                    ..
                }
            ),
            "{denied:?}"
        );
        assert!(!denied.is_damage());
    }
}
