//! The gRPC layer: the only code that sees tonic. It turns requests into calls on the
//! ledger core and `records`, and core results and errors into responses and statuses.

mod compliance_service;
pub mod convert;
mod ledger_service;
pub mod middleware;
pub mod status;

pub use compliance_service::ComplianceApi;
pub use ledger_service::LedgerApi;
