//! The coordinator's error type and its one mapping to gRPC status codes.
//!
//! Internal causes (SQL, I/O) are logged with their details and reach the caller only as a generic
//! message: no SQL text ever leaves the process.

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    /// A lease or state precondition failed (stale fencing token, task no longer running, ...).
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    /// The caller went away or broke off; nothing was done.
    #[error("{0}")]
    Aborted(String),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("storage: {0}")]
    Storage(#[from] std::io::Error),
    #[error("internal: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

// SQLSTATE codes the store turns into domain errors or retries.
pub const SQLSTATE_UNIQUE_VIOLATION: &str = "23505";
pub const SQLSTATE_SERIALIZATION_FAILURE: &str = "40001";

impl Error {
    /// True for failures that a caller may retry (database or storage unavailable).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Database(e) => !is_data_exception(e),
            Error::Storage(_) => true,
            _ => false,
        }
    }
}

/// Whether a database error is of SQLSTATE class 22 (data exception: a value the database cannot
/// hold, such as a NUL byte in text). Retrying such a request cannot help.
fn is_data_exception(e: &sqlx::Error) -> bool {
    e.as_database_error().and_then(|d| d.code()).is_some_and(|c| c.starts_with("22"))
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        match e {
            Error::InvalidArgument(m) => Status::invalid_argument(m),
            Error::NotFound(m) => Status::not_found(m),
            Error::Unauthenticated(m) => Status::unauthenticated(m),
            Error::PermissionDenied(m) => Status::permission_denied(m),
            Error::FailedPrecondition(m) => Status::failed_precondition(m),
            Error::ResourceExhausted(m) => Status::resource_exhausted(m),
            Error::Aborted(m) => Status::aborted(m),
            Error::Database(err) if is_data_exception(&err) => {
                tracing::warn!(error = %err, "database refused a value of a request");
                Status::invalid_argument(
                    "the job store cannot hold a value of this request (text with a NUL byte, or a number out of range)",
                )
            }
            Error::Database(err) => {
                tracing::error!(error = %err, "database error");
                Status::new(Code::Unavailable, "the job store is unavailable; retry later")
            }
            Error::Storage(err) => {
                tracing::error!(error = %err, "result storage error");
                Status::new(Code::Unavailable, "result storage is unavailable; retry later")
            }
            Error::Internal(m) => {
                tracing::error!(error = %m, "internal error");
                Status::internal("internal error")
            }
        }
    }
}
