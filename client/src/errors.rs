//! Errors of the CLI and the process exit codes they map to.
//!
//! | code | meaning |
//! |------|---------|
//! | 0 | success |
//! | 1 | any other failure (network, server error, a job that ended failed or cancelled under `--wait`/`watch`) |
//! | 2 | usage error (bad flags or arguments; clap's own errors also exit 2) |
//! | 3 | invalid input (a prompt or batch file failed validation, locally or on the server) |
//! | 4 | authentication or permission failure |
//! | 5 | not found (job, task or result does not exist or belongs to another tenant) |

use std::fmt;

/// Process exit codes. See the module documentation for the table.
pub mod exit {
    pub const OK: i32 = 0;
    pub const FAILURE: i32 = 1;
    pub const USAGE: i32 = 2;
    pub const INVALID_INPUT: i32 = 3;
    pub const AUTH: i32 = 4;
    pub const NOT_FOUND: i32 = 5;
}

/// What kind of failure happened; decides the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Failure,
    Usage,
    InvalidInput,
    Auth,
    NotFound,
}

impl ErrorKind {
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::Failure => exit::FAILURE,
            ErrorKind::Usage => exit::USAGE,
            ErrorKind::InvalidInput => exit::INVALID_INPUT,
            ErrorKind::Auth => exit::AUTH,
            ErrorKind::NotFound => exit::NOT_FOUND,
        }
    }
}

/// An error that ends the command. `reported` is set when the details were already printed (for example
/// a list of validation errors), so that only the exit code remains to be applied.
#[derive(Debug)]
pub struct CliError {
    pub kind: ErrorKind,
    pub message: String,
    pub reported: bool,
}

impl CliError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        CliError {
            kind,
            message: message.into(),
            reported: false,
        }
    }
    pub fn failure(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Failure, message)
    }
    pub fn usage(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Usage, message)
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, message)
    }
    /// An error whose details were already printed.
    pub fn reported(kind: ErrorKind, message: impl Into<String>) -> Self {
        CliError {
            kind,
            message: message.into(),
            reported: true,
        }
    }
    pub fn exit_code(&self) -> i32 {
        self.kind.exit_code()
    }
    /// Maps a gRPC status of any call except SubmitJob.
    pub fn from_status(status: &tonic::Status, context: &str) -> Self {
        Self::from_status_in(status, context, CallKind::Other)
    }
    /// Maps a gRPC status of SubmitJob, where a failed precondition also means invalid input.
    pub fn from_submit_status(status: &tonic::Status) -> Self {
        Self::from_status_in(status, "submit", CallKind::Submit)
    }

    fn from_status_in(status: &tonic::Status, context: &str, call: CallKind) -> Self {
        let kind = kind_for_code(status.code(), call);
        let detail = status.message();
        let message = match status.code() {
            tonic::Code::Unavailable => format!(
                "{context}: the coordinator is unavailable ({})",
                if detail.is_empty() { "no detail" } else { detail }
            ),
            tonic::Code::Unauthenticated => format!(
                "{context}: not authenticated ({detail}); set --token, FARM_TOKEN or the config file's token"
            ),
            tonic::Code::PermissionDenied => format!("{context}: permission denied ({detail})"),
            tonic::Code::NotFound => format!("{context}: not found ({detail})"),
            code => format!(
                "{context}: {} ({:?})",
                if detail.is_empty() {
                    "request failed"
                } else {
                    detail
                },
                code
            ),
        };
        CliError::new(kind, message)
    }
}

/// Which call a status came from; only SubmitJob treats FAILED_PRECONDITION as invalid input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    Submit,
    Other,
}

/// The exit-code class of a gRPC status code.
pub fn kind_for_code(code: tonic::Code, call: CallKind) -> ErrorKind {
    use tonic::Code;
    match code {
        Code::Unauthenticated | Code::PermissionDenied => ErrorKind::Auth,
        Code::NotFound => ErrorKind::NotFound,
        Code::InvalidArgument => ErrorKind::InvalidInput,
        Code::FailedPrecondition if call == CallKind::Submit => ErrorKind::InvalidInput,
        _ => ErrorKind::Failure,
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CliError {}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> Self {
        CliError::failure(e.to_string())
    }
}

pub type CliResult<T> = Result<T, CliError>;

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::{Code, Status};

    #[test]
    fn grpc_codes_map_to_exit_codes() {
        let other = |c| kind_for_code(c, CallKind::Other).exit_code();
        let submit = |c| kind_for_code(c, CallKind::Submit).exit_code();
        assert_eq!(other(Code::Unauthenticated), 4);
        assert_eq!(other(Code::PermissionDenied), 4);
        assert_eq!(other(Code::NotFound), 5);
        assert_eq!(other(Code::InvalidArgument), 3);
        assert_eq!(other(Code::FailedPrecondition), 1);
        assert_eq!(submit(Code::FailedPrecondition), 3);
        assert_eq!(submit(Code::InvalidArgument), 3);
        assert_eq!(other(Code::Unavailable), 1);
        assert_eq!(other(Code::Internal), 1);
        assert_eq!(submit(Code::Unauthenticated), 4);
    }

    #[test]
    fn status_conversion_keeps_message() {
        let e = CliError::from_status(&Status::not_found("job 42"), "status");
        assert_eq!(e.exit_code(), exit::NOT_FOUND);
        assert!(e.message.contains("job 42"), "{}", e.message);
        let e = CliError::from_submit_status(&Status::failed_precondition("too many prompts"));
        assert_eq!(e.exit_code(), exit::INVALID_INPUT);
        let e = CliError::from_status(&Status::unauthenticated("bad token"), "jobs");
        assert_eq!(e.exit_code(), exit::AUTH);
        assert!(e.message.contains("FARM_TOKEN"));
    }
}
