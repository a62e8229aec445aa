//! Errors of the CLI and the process exit codes they map to.
//!
//! | code | meaning |
//! |------|---------|
//! | 0 | success |
//! | 1 | any other failure (network, a failed TLS handshake, server error, a failed download, a job that ended failed or cancelled under `--wait`/`watch`) |
//! | 2 | usage error (bad flags or arguments, a missing or non-PEM CA file, a CA file with an `http://` endpoint; clap's own errors also exit 2) |
//! | 3 | invalid input (a prompt or batch file failed validation, locally or on the server; inputs without prompts; a file `show-png` cannot read; a results directory holding another job) |
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
        if let Some(tls) = tls_failure(status) {
            return CliError::new(kind, format!("{context}: {tls}"));
        }
        // A status made on this side from a transport error keeps the cause in its sources.
        let chain = status_chain(status);
        let detail = if std::error::Error::source(status).is_some() {
            chain.as_str()
        } else {
            status.message()
        };
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

/// The status's message and the text of every error below it. tonic keeps the cause of a connection
/// failure (a TLS handshake error among them) in the sources, not always in the message.
fn status_parts(status: &tonic::Status) -> Vec<String> {
    let mut parts = vec![status.message().to_string()];
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        parts.push(e.to_string());
        source = e.source();
    }
    parts
}

/// The status's message followed by every error below it, `a: b: c`, without repeats.
pub fn status_chain(status: &tonic::Status) -> String {
    let mut out = String::new();
    for part in status_parts(status) {
        if part.is_empty() || out.contains(&part) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&part);
    }
    out
}

/// Describes a failed TLS handshake (from the rustls error under the status), or `None` when the
/// status is something else.
pub fn tls_failure(status: &tonic::Status) -> Option<String> {
    const KINDS: &[(&[&str], &str)] = &[
        (
            &["NotValidForName", "not valid for name"],
            "the coordinator's certificate is not valid for this host name; connect with a name (or \
             IP) listed in the certificate",
        ),
        (
            &["invalid peer certificate"],
            "the coordinator's certificate is not trusted; pass the CA that signed it with --ca-cert, \
             FARM_CA_CERT or the config file's ca_cert",
        ),
        (
            &["received corrupt message", "InvalidContentType"],
            "the coordinator did not answer with TLS; if it serves plaintext, use an http:// endpoint",
        ),
        (
            &["HTTP/2 was not negotiated"],
            "the server did not offer HTTP/2 over TLS (ALPN h2)",
        ),
        (
            &["TLS handshake timeout"],
            "the server did not complete the handshake in time",
        ),
        (
            &["received fatal alert", "peer is incompatible"],
            "the server refused the handshake",
        ),
    ];
    let parts = status_parts(status);
    KINDS.iter().find_map(|(markers, hint)| {
        let detail = parts
            .iter()
            .find(|p| markers.iter().any(|m| p.contains(m)))?;
        Some(format!("TLS handshake failed: {hint} ({detail})"))
    })
}

/// Whether an error message says the connection failed, broke or made no sense as HTTP/2, as when a
/// plaintext client meets a TLS port: its alert, read as an HTTP/2 frame header, is far too long
/// (FRAME_SIZE_ERROR), or the server closes the connection first (closed, reset, broken pipe).
pub fn looks_like_cut_connection(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    [
        "transport error",
        "h2 protocol error",
        "frame with invalid size",
        "frame_size_error",
        "connection closed",
        "connection reset",
        "broken pipe",
    ]
    .iter()
    .any(|p| m.contains(p))
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

    /// A transport-style error: a message and an optional cause.
    #[derive(Debug)]
    struct Transport(&'static str, Option<Box<Transport>>);

    impl fmt::Display for Transport {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Transport {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    fn transport_status(top: &'static str, cause: &'static str) -> Status {
        Status::from_error(Box::new(Transport(
            top,
            Some(Box::new(Transport(cause, None))),
        )))
    }

    #[test]
    fn tls_failures_are_named_from_the_sources() {
        let s = transport_status("transport error", "invalid peer certificate: UnknownIssuer");
        assert!(
            status_chain(&s).contains("UnknownIssuer"),
            "{}",
            status_chain(&s)
        );
        let e = CliError::from_status(&s, "jobs");
        assert!(
            e.message.starts_with("jobs: TLS handshake failed"),
            "{}",
            e.message
        );
        assert!(
            e.message.contains("not trusted") && e.message.contains("--ca-cert"),
            "{}",
            e.message
        );
        assert_eq!(e.exit_code(), exit::FAILURE);

        let s = transport_status(
            "transport error",
            "invalid peer certificate: certificate not valid for name \"x\"",
        );
        let e = CliError::from_status(&s, "jobs");
        assert!(
            e.message.contains("not valid for this host name"),
            "{}",
            e.message
        );

        let s = transport_status(
            "transport error",
            "received corrupt message of type InvalidContentType",
        );
        let e = CliError::from_status(&s, "jobs");
        assert!(
            e.message.contains("use an http:// endpoint"),
            "{}",
            e.message
        );

        // Other failures keep their own message, now with the cause.
        let s = transport_status("transport error", "tcp connect error: Connection refused");
        assert!(tls_failure(&s).is_none());
        let e = CliError::from_status(&s, "jobs");
        assert!(e.message.contains("Connection refused"), "{}", e.message);
        assert!(tls_failure(&Status::unavailable("invalid peer certificate")).is_some());
        assert!(tls_failure(&Status::not_found("job 1")).is_none());
    }

    #[test]
    fn cut_connections_are_recognised() {
        assert!(looks_like_cut_connection(
            "jobs: h2 protocol error: http2 error (Internal)"
        ));
        assert!(looks_like_cut_connection(
            "jobs: operation was canceled: transport error: connection closed (Cancelled)"
        ));
        assert!(looks_like_cut_connection(
            "jobs: transport error: connection error: stream closed because of a broken pipe (Unknown)"
        ));
        assert!(!looks_like_cut_connection("jobs: not found (job 1)"));
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
