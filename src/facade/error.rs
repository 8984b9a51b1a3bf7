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

    /// A statement, `BEGIN`, `COMMIT` or `ROLLBACK` failed.
    #[error("database error: {0}")]
    Database(#[from] diesel::result::Error),

    /// The closure given to `run_sync` panicked; its transaction was rolled back.
    #[error("the closure passed to run_sync panicked ({0}); its transaction was rolled back")]
    Panic(String),

    /// An earlier operation of this session failed or was cancelled inside a
    /// transaction; the transaction was rolled back and the session refuses
    /// work until [`rollback`](crate::AsyncSession::rollback) acknowledges it.
    #[error(
        "this session's transaction was rolled back after an earlier failure ({0}); call rollback() before using the session again"
    )]
    PendingRollback(String),

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

impl Error {
    /// Whether retrying the same transaction may succeed: a serialization
    /// failure or deadlock (PostgreSQL 40001/40P01, MySQL 1213/1205, SQLite BUSY).
    pub fn is_retryable(&self) -> bool {
        use diesel::result::{DatabaseErrorKind, Error as D};
        let Error::Database(D::DatabaseError(kind, info)) = self else {
            return false;
        };
        if matches!(kind, DatabaseErrorKind::SerializationFailure) {
            return true;
        }
        let message = info.message();
        message.contains("deadlock")
            || message.contains("Lock wait timeout")
            || message.contains("database is locked")
            || message.contains("could not serialize")
            || message.contains("restart transaction")
    }
}
