//! audit-ledger: an append-only, hash-chained, Merkle-verifiable ledger of customer
//! communications, served over gRPC.
//!
//! # Layout
//! - [`ledger`]: the domain core: sequencing, hash chain, RFC 9162 Merkle tree, C2SP
//!   checkpoints, the single writer with group commit. No tonic, no sled, no proto types.
//! - [`storage`]: the [`storage::Store`] trait and its sled implementation.
//! - [`records`]: what can be recorded (communications): validation, and the encoding of
//!   their leaf records (the leaf format is protobuf by contract).
//! - [`grpc`]: the only code that sees tonic: request conversion, status mapping.
//! - [`server`]: wiring: open the store and ledger, serve, shut down.
//! - [`keys`]: the signing key file. [`verify`]: offline end-to-end verification.
//! - [`export`]: exports (entries + manifest of proofs) and their offline verification.
//! - [`config`]: every limit and default, in one struct.

pub mod access_log;
pub mod auth;
pub mod background;
pub mod client;
pub mod compliance;
pub mod config;
pub mod export;
pub mod grpc;
pub mod keys;
pub mod ledger;
pub mod policy;
pub mod records;
pub mod server;
pub mod storage;
pub mod telemetry;
pub mod verify;

/// Types generated from `proto/audit/ledger/v1/ledger.proto`.
pub mod proto {
    tonic::include_proto!("audit.ledger.v1");

    /// Every service and message of `proto/` (with imports), served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("audit_ledger_descriptor");
}
