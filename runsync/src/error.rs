//! The facade's error type.

use std::time::Duration;

/// Everything the engine and sessions can fail with.
///
/// No variant ever holds a password: URLs are redacted and driver messages
/// scrubbed before they are stored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The database URL could not be understood.
    #[error("invalid database URL `{url}`: {reason}")]
    InvalidUrl {
        /// The URL, password redacted.
        url: String,
        /// What is wrong and what to write instead.
        reason: String,
    },

    /// A new connection could not be opened (refused, bad credentials, no such database...).
    #[error("cannot connect to `{url}`: {message}")]
    Connect {
        /// The URL, password redacted.
        url: String,
        /// The driver's message, password scrubbed, on one line.
        message: String,
    },

    /// No pooled connection became free within the checkout timeout.
    #[error(
        "no database connection became free within {0:?}; raise the pool size or the connection timeout, or hold sessions for less time"
    )]
    PoolTimeout(Duration),

    /// A statement, `BEGIN`, `COMMIT` or `ROLLBACK` failed: Diesel's error,
    /// shown as it is (its causes are its own).
    #[error(transparent)]
    Database(diesel::result::Error),

    /// The closure given to `run_sync` panicked; its transaction was rolled back.
    #[error("the closure passed to run_sync panicked ({0}); its transaction was rolled back")]
    Panic(String),

    /// An earlier operation of this session failed or was cancelled inside a
    /// transaction; none of that transaction will be committed, and the
    /// session refuses work until [`rollback`](crate::AsyncSession::rollback)
    /// ends it (a cancelled operation's transaction may stay open on the
    /// server until then).
    #[error(
        "this session's transaction cannot go on after an earlier failure or cancellation ({0}); nothing of it will be committed: call rollback() to end it before using the session again"
    )]
    PendingRollback(String),

    /// The `run_sync` closure returned with the transaction depth changed: a
    /// savepoint it began is still open (`depth` > 1), or it ended the
    /// session's transaction itself (`depth` 0). A `COMMIT` then would not
    /// commit the work, so the whole transaction was rolled back.
    #[error(
        "the run_sync closure returned with {depth} transaction level(s) open instead of 1 (a savepoint left open, or the session's transaction ended inside the closure); the whole transaction was rolled back: close every transaction the closure opens"
    )]
    UnbalancedTransaction {
        /// Transaction levels open when the closure returned.
        depth: u32,
    },

    /// A `run_sync` call outlived its deadline
    /// ([`EngineOptions::statement_timeout`](crate::EngineOptions::statement_timeout),
    /// [`AsyncSession::set_statement_timeout`](crate::AsyncSession::set_statement_timeout)
    /// or [`AsyncSession::with_timeout`](crate::AsyncSession::with_timeout)):
    /// its statement was cancelled on the server and its transaction rolled
    /// back; the session refuses work until `rollback()`.
    #[error(
        "the statement did not finish within its {0:?} timeout and was cancelled; its transaction was rolled back. Raise the timeout (EngineOptions::statement_timeout, AsyncSession::set_statement_timeout or with_timeout) or make the statement cheaper, then call rollback() before using the session again"
    )]
    Timeout(Duration),

    /// The connection broke after `COMMIT` was sent, or the call's deadline
    /// passed while `COMMIT` was on its way: the server may have committed
    /// the transaction or not, and nothing can tell which from here. Never
    /// retried by [`Engine::transaction_with_retry`](crate::Engine::transaction_with_retry)
    /// (a retry could apply the work twice); check in the database whether
    /// the work is there, or make the unit idempotent.
    #[error(
        "the connection was lost after COMMIT was sent ({0}); the transaction may or may not have been committed: check whether its work is in the database before running it again"
    )]
    CommitOutcomeUnknown(String),

    /// The connection was lost with a cancelled or panicked blocking task.
    #[error("the session's connection was lost with a cancelled task; use a new session")]
    ConnectionLost,

    /// `begin` was called while a transaction was already open.
    #[error("a transaction is already open on this session; commit or roll it back first")]
    TransactionAlreadyOpen,

    /// The tokio runtime shut down while a blocking operation was queued.
    #[error("the tokio runtime is shutting down; the operation did not run")]
    RuntimeShutdown,
}

impl From<diesel::result::Error> for Error {
    /// Wraps a Diesel error; one that carries an [`Error`] (see the `From`
    /// impl below) gives that error back unchanged.
    fn from(error: diesel::result::Error) -> Self {
        match error {
            diesel::result::Error::QueryBuilderError(inner) => match inner.downcast::<Error>() {
                Ok(ours) => *ours,
                Err(inner) => Error::Database(diesel::result::Error::QueryBuilderError(inner)),
            },
            other => Error::Database(other),
        }
    }
}

impl From<Error> for diesel::result::Error {
    /// Lets a closure typed `QueryResult<T>` go through
    /// [`run_sync`](crate::AsyncSession::run_sync): a database error is
    /// Diesel's own again, anything else (pool timeout, panic, ...) travels
    /// inside `QueryBuilderError` and comes back out through `?` as itself.
    fn from(error: Error) -> Self {
        match error {
            Error::Database(inner) => inner,
            other => diesel::result::Error::QueryBuilderError(Box::new(other)),
        }
    }
}

/// Errors that can say whether running the same transaction again may
/// succeed: what [`Engine::transaction_with_retry`](crate::Engine::transaction_with_retry)
/// asks of the closure's error type. Implement it for your own error type by
/// forwarding to the Diesel error it wraps.
pub trait Retryable {
    /// True for a serialization failure or deadlock (PostgreSQL 40001/40P01,
    /// MySQL 1213/1205, SQLite BUSY): the transaction lost a race, and a
    /// fresh attempt may commit; and for a failover seen before `COMMIT`
    /// ([`is_failover`](Self::is_failover)).
    fn is_retryable(&self) -> bool;

    /// True when the failure is what a switchover or failover looks like
    /// before `COMMIT` was sent (a connect that failed, a connection that
    /// broke or was terminated, a node that turned read-only or is shutting
    /// down): [`RetryPolicy::failover_window`](crate::RetryPolicy::failover_window)
    /// bounds how long such failures are retried. The default says no.
    fn is_failover(&self) -> bool {
        false
    }
}

/// MariaDB Galera's error 1047 on a node that does not serve (outside the
/// primary component, or desynced). The engine retires such a connection;
/// the error is not [`Retryable`]: met at `COMMIT`, whether the rest of the
/// cluster committed the transaction is unknown.
pub(crate) const WSREP_NOT_READY: &str = "WSREP has not yet prepared node for application use";

impl Retryable for diesel::result::Error {
    fn is_retryable(&self) -> bool {
        use diesel::result::{DatabaseErrorKind, Error as D};
        let (kind, info) = match self {
            D::DatabaseError(kind, info) => (kind, info),
            // One of this crate's errors, through a `QueryResult` closure.
            D::QueryBuilderError(inner) => {
                return inner
                    .downcast_ref::<Error>()
                    .is_some_and(Error::is_retryable);
            }
            _ => return false,
        };
        if matches!(kind, DatabaseErrorKind::SerializationFailure) {
            return true;
        }
        let message = info.message();
        message.contains("deadlock")
            || message.contains("Deadlock")
            || message.contains("Lock wait timeout")
            || message.contains("database is locked")
            || message.contains("could not serialize")
            || message.contains("restart transaction")
            || failover_error(self).is_some()
    }

    fn is_failover(&self) -> bool {
        match self {
            diesel::result::Error::QueryBuilderError(inner) => inner
                .downcast_ref::<Error>()
                .is_some_and(Error::is_failover),
            other => failover_error(other).is_some(),
        }
    }
}

impl Retryable for Error {
    /// Also true for what a failover or switchover looks like before
    /// `COMMIT` is sent (a connection that broke or was terminated, a node
    /// that turned read-only or is shutting down, a failed connect): the
    /// server rolls back an uncommitted transaction whose connection is
    /// gone, so running the unit again cannot apply it twice. Never for
    /// [`Error::CommitOutcomeUnknown`].
    fn is_retryable(&self) -> bool {
        match self {
            Error::Database(e) => e.is_retryable(),
            Error::Connect { .. } => true,
            _ => false,
        }
    }

    fn is_failover(&self) -> bool {
        match self {
            Error::Database(e) => e.is_failover(),
            Error::Connect { .. } => true,
            _ => false,
        }
    }
}

/// Why a failed statement means its server cannot serve this unit any
/// more (so its connection is retired, and the unit may run again on
/// another): `None` for any other error.
///
/// - PostgreSQL: 25006 `read_only_sql_transaction` (a demoted primary, a
///   standby, `default_transaction_read_only`), 57P01-57P03 (terminated by
///   an administrator or a crash, shutting down, starting up), 08xxx and a
///   connection libpq found closed.
/// - MySQL/MariaDB: 1290 (`--read-only`), 2006/2013 (gone away, lost).
/// - PgBouncer after a retarget: 26000/42P05 on a named prepared statement.
pub(crate) fn failover_error(error: &diesel::result::Error) -> Option<&'static str> {
    use diesel::result::{DatabaseErrorKind, Error as D};
    let (kind, info) = match error {
        D::DatabaseError(kind, info) => (kind, info),
        // A failed COMMIT that Diesel then tried to roll back.
        D::RollbackErrorOnCommit { commit_error, .. } => return failover_error(commit_error),
        _ => return None,
    };
    match kind {
        DatabaseErrorKind::ReadOnlyTransaction => return Some("read-only"),
        DatabaseErrorKind::ClosedConnection => return Some("connection closed"),
        _ => {}
    }
    let message = info.message();
    const READ_ONLY: &[&str] = &[
        "read-only transaction",
        "running with the --read-only option",
        "running with the --super-read-only option",
    ];
    const GONE: &[&str] = &[
        "terminating connection",
        "the database system is shutting down",
        "the database system is starting up",
        "the database system is in recovery mode",
        "the database system is not yet accepting connections",
        "server closed the connection unexpectedly",
        "no connection to the server",
        "could not receive data from server",
        "could not send data to server",
        "SSL SYSCALL error",
        "server has gone away",
        "Lost connection to",
        "Can't connect to",
    ];
    const STALE_STATEMENT: &[&str] = &["prepared statement \"__diesel_stmt_"];
    if READ_ONLY.iter().any(|m| message.contains(m)) {
        Some("read-only")
    } else if GONE.iter().any(|m| message.contains(m)) {
        Some("connection lost")
    } else if STALE_STATEMENT.iter().any(|m| message.contains(m)) {
        Some("prepared statement lost")
    } else {
        None
    }
}

/// Whether `error` says the connection itself broke (so a `COMMIT` that
/// failed with it may have been applied).
pub(crate) fn connection_broke(error: &diesel::result::Error) -> bool {
    failover_error(error) == Some("connection lost")
        || failover_error(error) == Some("connection closed")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facade_errors_survive_a_query_result_closure() {
        let through: diesel::result::Error = Error::PoolTimeout(Duration::from_secs(1)).into();
        assert!(matches!(Error::from(through), Error::PoolTimeout(_)));
        let db: diesel::result::Error = Error::Database(diesel::result::Error::NotFound).into();
        assert!(matches!(db, diesel::result::Error::NotFound));
    }

    #[test]
    fn a_database_error_shows_each_cause_once() {
        use std::error::Error as _;
        let error = Error::from(diesel::result::Error::NotFound);
        assert_eq!(
            error.to_string(),
            diesel::result::Error::NotFound.to_string()
        );
        // Transparent: the source is the Diesel error's own source, not the error again.
        assert!(error.source().is_none());
    }
}
