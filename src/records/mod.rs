//! What can be recorded in the ledger, and how it becomes a leaf.
//!
//! The leaf format is `audit.ledger.v1.LeafRecord` by contract (third-party verifiers parse
//! it), so this module uses the generated message types as its schema. It validates a
//! submission, encodes its `LeafRecord` fields (all but the chain header the ledger adds)
//! and names its idempotency key; the ledger core only ever sees the resulting bytes.

pub mod communication;
pub mod describe;
pub mod fact;
pub mod limits;
pub mod question;
pub mod validate;

pub use communication::prepare_communication;
pub use fact::prepare_fact;
pub use limits::RecordLimits;
pub use question::prepare_question;
pub use validate::Invalid;
