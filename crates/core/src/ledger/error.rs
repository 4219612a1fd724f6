//! Errors of the ledger core. `grpc::status` is the one place that maps them to statuses.

use crate::store::StorageError;

use super::checkpoint::CheckpointError;
use super::merkle::{NodeError, ProofError};

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// A request argument is invalid; `field` names it as the client spelled it.
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    /// A size or index lies beyond the current tree.
    #[error("{field}: {reason}")]
    OutOfRange { field: String, reason: String },
    /// No checkpoint was signed at this tree size (it lies inside a group commit); the
    /// signed sizes nearest to it, when there are any.
    #[error(
        "tree_size: no checkpoint was signed at tree size {tree_size}{}",
        nearest_signed(*.below, *.above)
    )]
    NoCheckpoint {
        tree_size: u64,
        below: Option<u64>,
        above: Option<u64>,
    },
    /// The idempotency key is taken by an entry with different content.
    #[error("{field}: already recorded at index {index} with different content")]
    Conflict { field: String, index: u64 },
    /// The store does not match what the ledger signed or chained: it was altered or damaged.
    #[error("ledger integrity: {0}")]
    Integrity(String),
    /// The store does not match what the ledger signed, or a read found a damaged entry:
    /// reads are served, writes refused. The reason names which.
    #[error("writes are refused: {0}; run audit-ledger verify")]
    WritesRefused(String),
    /// The store is out of space; retry once space is freed.
    #[error("{0}")]
    ResourceExhausted(String),
    /// Writes are refused (shut down, or an earlier durable write failed).
    #[error("ledger unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
}

/// ` (the nearest signed sizes are 4 and 9)`, or as much of it as there is.
fn nearest_signed(below: Option<u64>, above: Option<u64>) -> String {
    match (below, above) {
        (Some(below), Some(above)) => {
            format!(" (the nearest signed sizes are {below} and {above})")
        }
        (Some(size), None) | (None, Some(size)) => format!(" (the nearest signed size is {size})"),
        (None, None) => String::new(),
    }
}

impl LedgerError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        LedgerError::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub fn out_of_range(field: impl Into<String>, reason: impl Into<String>) -> Self {
        LedgerError::OutOfRange {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The one rule for every method: a size past the current tree is out of range.
    pub fn size_past_the_tree(field: &str, size: u64, current: u64) -> Self {
        LedgerError::out_of_range(
            field,
            format!("{size} is past the current tree size {current}"),
        )
    }

    /// The one rule for every method: an index at or past the current tree size (no entry
    /// there yet) is out of range.
    pub fn index_past_the_tree(field: &str, index: u64, current: u64) -> Self {
        LedgerError::out_of_range(
            field,
            format!("{index} is not below the current tree size {current}"),
        )
    }
}

impl From<NodeError> for LedgerError {
    fn from(error: NodeError) -> Self {
        match error {
            NodeError::Missing(node) => {
                LedgerError::Integrity(format!("tree node {node} is missing from the store"))
            }
            // Node sources here are stores: their errors are storage errors.
            NodeError::Source(source) => match source.downcast::<StorageError>() {
                Ok(storage) => LedgerError::Storage(*storage),
                Err(other) => LedgerError::Integrity(other.to_string()),
            },
        }
    }
}

impl From<ProofError> for LedgerError {
    fn from(error: ProofError) -> Self {
        match error {
            ProofError::InvalidInput(reason) => LedgerError::invalid("tree_size", reason),
            ProofError::Node(node) => node.into(),
        }
    }
}
