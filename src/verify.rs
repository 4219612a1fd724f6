//! Offline, end-to-end verification of a stopped ledger: every leaf, chain link, tree node,
//! body digest and idempotency key, the root against the latest signed checkpoint, and every
//! checkpoint ever signed against the tree. Trusts nothing but the verifier key.

use prost::Message;
use sha2::{Digest, Sha256};

use crate::ledger::leaf::{GENESIS_PREV_LEAF_HASH, decode_header};
use crate::ledger::merkle::{self, Hash};
use crate::ledger::time::Timestamp;
use crate::ledger::{CheckpointVerifier, StoreNodes};
use crate::proto::{LeafRecord, leaf_record};
use crate::records::communication::idempotency_key;
use crate::storage::{StorageError, Store};

/// What a successful verification covered.
#[derive(Debug, Clone)]
pub struct VerifyReport {
    pub origin: String,
    pub tree_size: u64,
    pub root_hash: Hash,
    pub checkpoints: u64,
}

/// The first problem found.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Entry `index` is the first bad one.
    #[error("entry {index}: {problem}")]
    Entry { index: u64, problem: String },
    /// The signed checkpoint for tree size `size` is bad or does not match the tree.
    #[error("checkpoint for tree size {size}: {problem}")]
    Checkpoint { size: u64, problem: String },
    #[error("no signed checkpoint in the store")]
    NoCheckpoint,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl VerifyError {
    /// The first bad entry index, when the failure is about an entry.
    pub fn first_bad_index(&self) -> Option<u64> {
        match self {
            VerifyError::Entry { index, .. } => Some(*index),
            _ => None,
        }
    }
}

fn entry_error(index: u64, problem: impl Into<String>) -> VerifyError {
    VerifyError::Entry {
        index,
        problem: problem.into(),
    }
}

/// Verifies everything in `store`. `progress(done, total)` is called as entries are checked.
pub fn verify_store(
    store: &dyn Store,
    verifier: &CheckpointVerifier,
    mut progress: impl FnMut(u64, u64),
) -> Result<VerifyReport, VerifyError> {
    let (stored_size, note) = store
        .latest_checkpoint()?
        .ok_or(VerifyError::NoCheckpoint)?;
    let checkpoint = verifier
        .verify(&note)
        .map_err(|error| VerifyError::Checkpoint {
            size: stored_size,
            problem: error.to_string(),
        })?;
    let size = checkpoint.size;
    if size != stored_size {
        return Err(VerifyError::Checkpoint {
            size: stored_size,
            problem: format!("the note says size {size}"),
        });
    }
    if let Some(last) = store.last_leaf_index()? {
        if last >= size {
            return Err(entry_error(
                size,
                format!("stored beyond the signed checkpoint (entries up to {last} exist)"),
            ));
        }
    }

    let nodes = StoreNodes(store);
    let mut prev_leaf_hash = GENESIS_PREV_LEAF_HASH;
    let mut prev_recorded_at = Timestamp::default();
    for index in 0..size {
        let leaf = store
            .leaf(index)?
            .ok_or_else(|| entry_error(index, "leaf is missing"))?;
        let header = decode_header(&leaf).map_err(|error| entry_error(index, error.to_string()))?;
        if header.index != index {
            return Err(entry_error(
                index,
                format!("leaf says index {}", header.index),
            ));
        }
        if header.prev_leaf_hash != prev_leaf_hash {
            return Err(entry_error(
                index,
                "prev_leaf_hash does not link to the previous entry",
            ));
        }
        if header.recorded_at < prev_recorded_at {
            return Err(entry_error(index, "recorded_at goes back in time"));
        }
        let leaf_hash = merkle::leaf_hash(&leaf);
        let stored_nodes = store
            .leaf_nodes(index)?
            .ok_or_else(|| entry_error(index, "tree nodes are missing"))?;
        if stored_nodes.first() != Some(&leaf_hash) {
            return Err(entry_error(
                index,
                "leaf bytes do not match the leaf hash in the tree",
            ));
        }
        // Earlier nodes were verified already, so they may be read to recompute these.
        let expected_nodes = merkle::nodes_for_new_leaf(index, leaf_hash, &nodes)
            .map_err(|error| entry_error(index, format!("tree nodes: {error}")))?;
        if stored_nodes != expected_nodes {
            return Err(entry_error(
                index,
                "stored tree nodes do not match the leaves",
            ));
        }
        check_record(store, index, &leaf)?;
        prev_leaf_hash = leaf_hash;
        prev_recorded_at = header.recorded_at;
        if index % 4096 == 0 {
            progress(index, size);
        }
    }
    progress(size, size);

    let root_hash = merkle::root_hash(size, &nodes).map_err(|error| VerifyError::Checkpoint {
        size,
        problem: error.to_string(),
    })?;
    if root_hash != checkpoint.root_hash {
        return Err(VerifyError::Checkpoint {
            size,
            problem: "the signed root hash does not match the tree".into(),
        });
    }

    // Every checkpoint ever signed must be a checkpoint of this very tree.
    let mut checkpoints = 0;
    for item in store.checkpoints() {
        let (stored_size, note) = item?;
        let older = verifier
            .verify(&note)
            .map_err(|error| VerifyError::Checkpoint {
                size: stored_size,
                problem: error.to_string(),
            })?;
        let root =
            merkle::root_hash(older.size, &nodes).map_err(|error| VerifyError::Checkpoint {
                size: older.size,
                problem: error.to_string(),
            })?;
        if older.size != stored_size || older.size > size || root != older.root_hash {
            return Err(VerifyError::Checkpoint {
                size: stored_size,
                problem: "signed a tree that is not a prefix of this ledger".into(),
            });
        }
        checkpoints += 1;
    }

    Ok(VerifyReport {
        origin: checkpoint.origin,
        tree_size: size,
        root_hash,
        checkpoints,
    })
}

/// The record inside a leaf: its body digest and its idempotency key.
fn check_record(store: &dyn Store, index: u64, leaf: &[u8]) -> Result<(), VerifyError> {
    let record = LeafRecord::decode(leaf)
        .map_err(|_| entry_error(index, "leaf is not a LeafRecord"))?
        .record
        .ok_or_else(|| entry_error(index, "leaf carries no record"))?;
    match record {
        leaf_record::Record::Communication(communication) => {
            let body = store
                .body(index)?
                .ok_or_else(|| entry_error(index, "body is missing"))?;
            if body.len() as u64 != communication.body_size
                || Sha256::digest(&body).as_slice() != communication.body_sha256.as_slice()
            {
                return Err(entry_error(index, "body does not match body_sha256"));
            }
            let key = idempotency_key(&communication.sender_id, &communication.message_id);
            match store.idempotency_record(&key)? {
                Some(claim) if claim.index == index => Ok(()),
                _ => Err(entry_error(
                    index,
                    "the (sender_id, message_id) index does not point at this entry",
                )),
            }
        }
        leaf_record::Record::Fact(fact) => {
            match store.idempotency_record(&crate::records::fact::idempotency_key(&fact.fact_id))? {
                Some(claim) if claim.index == index => Ok(()),
                _ => Err(entry_error(
                    index,
                    "the fact_id index does not point at this entry",
                )),
            }
        }
    }
}
