//! The storage backends, peers behind the ledger core's [`Store`] trait (defined in
//! `audit_ledger_core::store`, re-exported here): the log store (`ledger.log` and its
//! derived data, the default) and the all-in-sled store, plus the access trail's file.
//! [`open_store`] opens a data directory as the backend it was made with.

pub mod access_file;
mod log_space;
pub mod log_store;
pub mod run_index;
pub mod sled_store;
mod table_key;

pub use access_file::AccessFile;
pub use log_store::LogStore;
pub use run_index::{Filter, RunIndex, RunOptions};
pub use sled_store::{SledIndex, SledStore};

use std::path::Path;
use std::sync::Arc;

pub use audit_ledger_core::store::*;

/// Which backend a new store is made with; an existing store is opened as what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StorageKind {
    /// Everything in sled: one atomic batch and one flush per group commit.
    Sled,
    /// Entries in an append-only log file (one `fdatasync` per group), keys in sled: the
    /// default, measured faster, smaller and leaner than `Sled` (docs/BENCHMARKS.md).
    #[default]
    Log,
}

impl std::str::FromStr for StorageKind {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "sled" => Ok(StorageKind::Sled),
            "log" => Ok(StorageKind::Log),
            _ => Err(format!("storage {text:?} is not sled or log")),
        }
    }
}

/// An opened store with its spaces for derived indexes and the access log's file.
pub struct OpenedStore {
    pub store: Arc<dyn Store>,
    /// The communication lists (four keys per communication: the bulk of derived data).
    pub index: Arc<dyn IndexStore>,
    /// The fact lists, apart: every verdict reads them, and they stay small and quick to
    /// search when the communications' keys are not among them.
    pub facts: Arc<dyn IndexStore>,
    /// The access log's records (`access.log`, whichever the backend).
    pub access: AccessFile,
    pub kind: StorageKind,
}

/// Opens the store in `dir` as the backend it was made with, or makes a `new_kind` store
/// when `dir` holds none yet.
pub fn open_store(
    dir: &Path,
    new_kind: StorageKind,
    cache_bytes: u64,
) -> Result<OpenedStore, StorageError> {
    let kind = if dir.join(log_store::LOG_FILE).exists() {
        StorageKind::Log
    } else if dir.join("db").exists() {
        StorageKind::Sled
    } else {
        new_kind
    };
    Ok(match kind {
        StorageKind::Sled => {
            let store = SledStore::open(dir, cache_bytes)?;
            OpenedStore {
                index: Arc::new(store.index()?),
                facts: Arc::new(store.facts()?),
                access: open_access_file(dir, &store.legacy_access_tree()?)?,
                store: Arc::new(store),
                kind,
            }
        }
        StorageKind::Log => {
            let store = LogStore::open(dir, cache_bytes)?;
            OpenedStore {
                index: store.index(),
                facts: store.facts(),
                access: open_access_file(dir, &store.legacy_access_tree()?)?,
                store: Arc::new(store),
                kind,
            }
        }
    })
}

/// Opens the access log's file in `dir`. A store that kept its access log in a sled tree
/// (`legacy`: before the file) has the records moved first: copied into a new file made
/// durable in one step, then removed from the tree — so an interrupted move is made again,
/// or only its removal is.
fn open_access_file(dir: &Path, legacy: &SledIndex) -> Result<AccessFile, StorageError> {
    let path = dir.join(access_file::ACCESS_FILE);
    if !legacy.range(&[], &[0xff; 9], 1)?.is_empty() {
        if !path.exists() {
            let mut records = Vec::new();
            let mut from = Vec::new();
            loop {
                let chunk = legacy.range(&from, &[0xff; 9], 65_536)?;
                let Some((last, _)) = chunk.last() else {
                    break;
                };
                from = [last.as_slice(), &[0]].concat();
                records.extend(chunk.into_iter().map(|(_, record)| record));
            }
            AccessFile::create_with(&path, records)?;
            tracing::info!(path = %path.display(), "access log moved out of sled into a file of its own");
        }
        legacy.clear()?;
        legacy.flush()?;
    }
    AccessFile::open(&path)
}

/// A stored value with a shape this code does not write.
pub(super) fn malformed(text: impl Into<String>) -> StorageError {
    StorageError::Malformed(text.into())
}

/// A file operation's failure: its kind kept, a full disk told apart.
pub(super) fn io(error: std::io::Error) -> StorageError {
    StorageError::from(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `open` until sled's lock of a database just dropped in this process is free.
    fn retrying<T>(mut open: impl FnMut() -> Result<T, StorageError>) -> T {
        for _ in 0..200 {
            match open() {
                Err(error) if error.to_string().contains("in use") => {
                    std::thread::sleep(std::time::Duration::from_millis(25));
                }
                other => return other.unwrap(),
            }
        }
        panic!("the store stays locked");
    }

    /// An access log kept in sled (before its file) is moved into the file at the first
    /// open, for either backend, and the tree emptied.
    #[test]
    fn an_access_log_kept_in_sled_moves_into_its_file() {
        for kind in [StorageKind::Log, StorageKind::Sled] {
            let dir = tempfile::tempdir().unwrap();
            let records: Vec<Vec<u8>> = (0..5u8).map(|n| vec![n + 1; 20]).collect();
            let legacy = |dir: &Path| -> Result<(SledIndex, Box<dyn std::any::Any>), StorageError> {
                Ok(match kind {
                    StorageKind::Log => {
                        let store = LogStore::open(dir, 1 << 20)?;
                        (store.legacy_access_tree()?, Box::new(store))
                    }
                    StorageKind::Sled => {
                        let store = SledStore::open(dir, 1 << 20)?;
                        (store.legacy_access_tree()?, Box::new(store))
                    }
                })
            };
            {
                let (tree, _store) = retrying(|| legacy(dir.path()));
                let writes = records
                    .iter()
                    .enumerate()
                    .map(|(n, record)| ((n as u64).to_be_bytes().to_vec(), Some(record.clone())))
                    .collect();
                tree.apply(writes).unwrap();
                tree.flush().unwrap();
            }
            let path = dir.path().join(access_file::ACCESS_FILE);
            assert!(!path.exists());
            let opened = retrying(|| open_store(dir.path(), StorageKind::default(), 1 << 20));
            assert_eq!(opened.kind, kind);
            assert_eq!(opened.access.read(0, 100).unwrap(), records, "{kind:?}");
            drop(opened);
            let (tree, _store) = retrying(|| legacy(dir.path()));
            assert!(
                tree.range(&[], &[0xff; 9], 1).unwrap().is_empty(),
                "{kind:?}"
            );
            assert_eq!(AccessFile::open(&path).unwrap().count(), 5);
        }
    }
}
