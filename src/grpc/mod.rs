//! The gRPC layer: the only code that sees tonic. It turns requests into calls on the
//! ledger core and `records`, and core results and errors into responses and statuses.

mod ledger_service;
pub mod status;

pub use ledger_service::LedgerApi;
