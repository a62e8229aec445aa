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
            Error::Database(e) => is_outage(e),
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

/// Whether a database error means the database is (for now) out of reach or too busy, so the same
/// request may succeed later: a broken or refused connection, an exhausted pool, and the SQLSTATE
/// classes of connection exceptions (08), rolled-back transactions such as serialization failures
/// and deadlocks (40), insufficient resources (53), operator intervention such as a shutdown or a
/// statement or lock timeout (57, 55P03) and system errors (58). Anything else (a constraint,
/// a broken query, a row that was expected) would fail again the same way.
fn is_outage(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| ["08", "40", "53", "57", "58"].iter().any(|class| c.starts_with(class)) || c == "55P03"),
        _ => false,
    }
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
            Error::Database(err) if is_outage(&err) => {
                tracing::error!(error = %err, "database error");
                Status::new(Code::Unavailable, "the job store is unavailable; retry later")
            }
            Error::Database(err) => {
                tracing::error!(error = %err, "database error that a retry would not mend");
                Status::internal("internal error in the job store")
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

#[cfg(test)]
mod tests {
    use super::*;

    fn code_of(e: Error) -> Code {
        Status::from(e).code()
    }

    #[test]
    fn pool_and_connection_failures_are_outages_and_other_driver_errors_are_not() {
        for e in [sqlx::Error::PoolTimedOut, sqlx::Error::PoolClosed, sqlx::Error::Io(std::io::ErrorKind::ConnectionReset.into())] {
            let e = Error::Database(e);
            assert!(e.is_transient(), "{e}");
            assert_eq!(code_of(e), Code::Unavailable);
        }
        let e = Error::Database(sqlx::Error::RowNotFound);
        assert!(!e.is_transient());
        assert_eq!(code_of(e), Code::Internal);
    }

    /// SQLSTATEs from a real server: a retry mends a timeout, not a broken query or a constraint.
    #[tokio::test]
    async fn database_errors_map_by_their_sqlstate_class() {
        let pg = tokio::task::spawn_blocking(|| xtask::postgres::PgServer::start().expect("PostgreSQL for the test"))
            .await
            .unwrap();
        let url = pg.url();
        let pool = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(&url).await.unwrap();
        let fail = |sql: &'static str| {
            let pool = pool.clone();
            async move { Error::Database(sqlx::raw_sql(sql).execute(&pool).await.expect_err(sql)) }
        };
        let undefined = fail("select * from no_such_table_here").await;
        assert!(!undefined.is_transient());
        assert_eq!(code_of(undefined), Code::Internal);
        let unique =
            fail("create temp table u (k int primary key); insert into u values (1); insert into u values (1)").await;
        assert!(!unique.is_transient());
        assert_eq!(code_of(unique), Code::Internal);
        let data = fail("select 1 / 0").await;
        assert_eq!(code_of(data), Code::InvalidArgument);
        let timeout = fail("set statement_timeout = 10; select pg_sleep(5)").await;
        assert!(timeout.is_transient(), "{timeout}");
        assert_eq!(code_of(timeout), Code::Unavailable);
    }
}
