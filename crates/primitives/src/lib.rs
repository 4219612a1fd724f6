//! audit-ledger's primitives, the bottom layer: everything here is pure data and maths,
//! with no storage, no I/O and no knowledge of the layers above.
//!
//! - [`merkle`]: SHA-256 hashes, RFC 9162 Merkle trees over any [`merkle::NodeSource`]
//!   (roots, inclusion and consistency proofs and their verification), the frontier.
//! - [`leaf`]: the leaf header every entry's leaf starts with (index, time, previous leaf
//!   hash, body digest).
//! - [`checkpoint`]: C2SP signed-note checkpoints, signed and verified.
//! - [`time`]: business time.

pub mod checkpoint;
pub mod leaf;
pub mod merkle;
pub mod time;
