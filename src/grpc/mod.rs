//! The gRPC layer: the only code that sees tonic. It turns requests into calls on the
//! ledger core and `records`, and core results and errors into responses and statuses.

pub mod access;
mod compliance_service;
pub mod convert;
mod ledger_service;
pub mod metrics;
pub mod middleware;
pub mod status;

pub use access::AccessLogApi;
pub use compliance_service::ComplianceApi;
pub use ledger_service::LedgerApi;
