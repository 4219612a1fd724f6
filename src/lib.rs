//! audit-ledger: an append-only, hash-chained, Merkle-verifiable ledger of customer
//! communications, served over gRPC.
//!
//! # Layout
//! The lower layers are crates of their own (ARCHITECTURE.md, "Layers"), re-exported here:
//! - [`ledger`] (crate `audit-ledger-core`, on `audit-ledger-primitives`): the domain core:
//!   sequencing, hash chain, RFC 9162 Merkle tree, C2SP checkpoints, the single writer with
//!   group commit, and the [`storage::Store`] trait it owns. No tonic, no storage engine, no
//!   proto types.
//! - [`policy`] (crate `audit-ledger-policy`): who may contact a customer, pure functions.
//!
//! This crate is the service above them:
//! - [`storage`]: the backends of the `Store` trait: the log store (the default) and the
//!   all-in-sled store.
//! - [`records`]: what can be recorded (communications, facts): validation, and the
//!   encoding of their leaf records (the leaf format is protobuf by contract).
//! - [`compliance`]: CheckSender and the listings over the derived indexes.
//! - [`grpc`]: the service's tonic code: request conversion, status mapping.
//! - [`server`]: wiring: open the store and ledger, serve, shut down.
//! - [`keys`]: the signing key file. [`verify`]: offline end-to-end verification.
//! - [`export`]: exports (entries + manifest of proofs) and their offline verification.
//! - [`config`]: every limit and default, in one struct.

pub mod access_log;
pub mod auth;
pub mod client;
pub mod compliance;
pub mod config;
pub mod export;
pub mod grpc;
pub mod keys;
pub mod records;
pub mod server;
pub mod storage;
pub mod telemetry;
pub mod verify;

// The lower layers, where the service's modules and its users find them.
pub use audit_ledger_core::{background, ledger};
pub use audit_ledger_policy as policy;

/// Types generated from `proto/audit/ledger/v1/ledger.proto`.
pub mod proto {
    tonic::include_proto!("audit.ledger.v1");

    /// Every service and message of `proto/` (with imports), served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("audit_ledger_descriptor");
}
