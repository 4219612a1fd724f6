//! The one place that maps core errors to gRPC statuses. Clients get a message that names
//! the field or the index; storage details stay in the server's log.

use prost::Name;
use tonic::{Code, Status};

use crate::ledger::LedgerError;
use crate::records::Invalid;
use crate::storage::StorageError;

/// Every error a handler can meet, by the layer it comes from; [`to_status`] is the one
/// mapping of all of them to a gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A submitted value is not acceptable (records' validation), naming the field.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// The ledger's answer (including what the compliance queries over it report).
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// The principal may not do this with this value (e.g. a writer bound to other senders).
    #[error("{0}")]
    PermissionDenied(String),
}

impl From<StorageError> for ApiError {
    fn from(error: StorageError) -> Self {
        ApiError::Ledger(LedgerError::Storage(error))
    }
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Self {
        to_status(error)
    }
}

/// The one mapping from an error to the status a client sees.
pub fn to_status(error: impl Into<ApiError>) -> Status {
    let error = match error.into() {
        ApiError::Invalid(invalid) => return Status::invalid_argument(invalid.to_string()),
        ApiError::PermissionDenied(reason) => return Status::permission_denied(reason),
        ApiError::Ledger(error) => error,
    };
    match error {
        LedgerError::InvalidArgument { .. } => Status::invalid_argument(error.to_string()),
        LedgerError::OutOfRange { .. } => Status::out_of_range(error.to_string()),
        LedgerError::NoCheckpoint { .. } => Status::not_found(error.to_string()),
        LedgerError::Conflict { .. } => Status::already_exists(error.to_string()),
        LedgerError::Unavailable(_) => Status::unavailable(error.to_string()),
        LedgerError::WritesRefused(_) => Status::failed_precondition(error.to_string()),
        LedgerError::ResourceExhausted(_) => Status::resource_exhausted(error.to_string()),
        LedgerError::Integrity(_) => {
            tracing::error!(%error, "integrity failure while serving a request");
            Status::new(Code::DataLoss, error.to_string())
        }
        LedgerError::Storage(_) | LedgerError::Checkpoint(_) => {
            tracing::error!(%error, "internal failure while serving a request");
            Status::internal("internal storage error; see the server log")
        }
    }
}

/// The status of a `U` that did not decode (see `codec`): the caller's mistake when `U` is
/// a request (buf's STANDARD lint names every request `<Method>Request`), the server's when
/// a client could not decode a response.
pub fn undecodable<U: Name>(error: prost::DecodeError) -> Status {
    // prost's message names the field path, innermost first, e.g. "failed to decode
    // Protobuf message: Communication.message_id: AppendRequest.communication: invalid
    // string value: data is not UTF-8 encoded".
    if U::NAME.ends_with("Request") {
        Status::invalid_argument(format!(
            "the request is not a valid {}: {error}",
            U::full_name()
        ))
    } else {
        Status::internal(format!(
            "the response is not a valid {}: {error}",
            U::full_name()
        ))
    }
}

/// A request whose gRPC framing is broken, or whose message does not decode for a service
/// that uses tonic's own codec (`framing`): the caller's mistake, named.
pub fn malformed_request(defect: &str) -> Status {
    Status::invalid_argument(format!("the request is not well-formed gRPC: {defect}"))
}

/// A read whose access record could not be written is refused: nothing is read unrecorded
/// (ARCHITECTURE.md). A full disk says so, and that a retry will do once space is freed.
pub fn unrecorded_read(error: &StorageError) -> Status {
    tracing::error!(%error, "access log write failed; the read is refused");
    match error {
        StorageError::NoSpace(_) => Status::resource_exhausted(
            "the access log cannot be written (the disk is full), so the read is refused: retry once space is freed",
        ),
        _ => Status::unavailable("the access log cannot be written, so the read is refused"),
    }
}
