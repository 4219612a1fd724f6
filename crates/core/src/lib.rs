//! audit-ledger's ledger core, above the primitives and below everything else: the
//! [`store::Store`] trait it owns (the backends implement it, as peers, one layer up) and
//! the [`ledger::Ledger`]: sequencing, the hash chain, the Merkle tree and signed
//! checkpoints, one writer thread with group commit. Plain Rust: no gRPC, no storage
//! engine, no generated proto types. [`background`] runs the derived-data threads.

pub mod background;
pub mod ledger;
pub mod store;

/// Names of the metrics the ledger core records (the service's others live beside its
/// telemetry, which re-exports these).
pub mod metric_names {
    /// New entries written by one group commit.
    pub const GROUP_ENTRIES: &str = "audit_ledger_group_commit_entries";
    /// Seconds one group commit took to write and flush.
    pub const FLUSH_SECONDS: &str = "audit_ledger_flush_seconds";
    /// Entries in the published tree.
    pub const TREE_SIZE: &str = "audit_ledger_tree_size";
}
