//! `AnyConnection`: one Diesel connection type for the backends compiled
//! in (SQLite always; PostgreSQL and MySQL/MariaDB by cargo feature), the
//! backend picked from the URL at run time.
//!
//! `#[derive(MultiConnection)]` does not forward `#[cfg]` on enum variants,
//! so the `any_connection!` macro below writes the enum out once per feature set.

use diesel::prelude::*;
use diesel::result::ConnectionError;
use std::time::Duration;

use diesel_runsync::{Backend, Canceller, DatabaseUrl, PoolableConnection};

/// Declares `AnyConnection` with the given variants, deriving
/// `MultiConnection` (one invocation per feature set, below).
macro_rules! any_connection {
    ($($(#[$doc:meta])* $variant:ident($conn:ty)),+ $(,)?) => {
        /// A connection to any of the backends compiled in.
        ///
        /// Query code written against it runs unchanged on each; where a
        /// backend needs its own SQL (MySQL has no `RETURNING`), match on the
        /// variant, or run one expression on each inner connection as `queries` does.
        #[derive(diesel::MultiConnection)]
        pub enum AnyConnection {
            $($(#[$doc])* $variant($conn),)+
        }
    };
}

#[cfg(all(feature = "postgres", feature = "mysql"))]
any_connection! {
    /// PostgreSQL, through libpq.
    Postgresql(PgConnection),
    /// MySQL or MariaDB, through libmysqlclient.
    Mysql(MysqlConnection),
    /// SQLite, embedded (last: `establish` tries variants in order, and SQLite takes any string).
    Sqlite(SqliteConnection),
}

#[cfg(all(feature = "postgres", not(feature = "mysql")))]
any_connection! {
    /// PostgreSQL, through libpq.
    Postgresql(PgConnection),
    /// SQLite, embedded (last: `establish` tries variants in order, and SQLite takes any string).
    Sqlite(SqliteConnection),
}

#[cfg(all(not(feature = "postgres"), feature = "mysql"))]
any_connection! {
    /// MySQL or MariaDB, through libmysqlclient.
    Mysql(MysqlConnection),
    /// SQLite, embedded (last: `establish` tries variants in order, and SQLite takes any string).
    Sqlite(SqliteConnection),
}

#[cfg(not(any(feature = "postgres", feature = "mysql")))]
any_connection! {
    /// SQLite, embedded.
    Sqlite(SqliteConnection),
}

/// Runs the same Diesel expression on whichever inner connection `conn`
/// holds: for statements the `MultiConnection` enum cannot express itself
/// (batched inserts, `RETURNING`). Crate-local: its `#[cfg]` arms follow
/// this crate's features.
macro_rules! on_inner_connection {
    ($conn:expr, |$inner:ident| $body:expr) => {
        match $conn {
            #[cfg(feature = "postgres")]
            $crate::AnyConnection::Postgresql($inner) => $body,
            #[cfg(feature = "mysql")]
            $crate::AnyConnection::Mysql($inner) => $body,
            $crate::AnyConnection::Sqlite($inner) => $body,
        }
    };
}
pub(crate) use on_inner_connection;

/// The error for a URL whose backend this build left out.
fn not_compiled_in(backend: Backend) -> ConnectionError {
    ConnectionError::InvalidConnectionUrl(format!(
        "this build has no {backend} support; rebuild with `--features {backend}`"
    ))
}

impl AnyConnection {
    /// The backend behind this connection.
    pub fn backend(&self) -> Backend {
        match self {
            #[cfg(feature = "postgres")]
            AnyConnection::Postgresql(_) => Backend::Postgres,
            #[cfg(feature = "mysql")]
            AnyConnection::Mysql(_) => Backend::Mysql,
            AnyConnection::Sqlite(_) => Backend::Sqlite,
        }
    }
}

impl PoolableConnection for AnyConnection {
    /// Opens the variant the URL's scheme names, keeping the driver's own
    /// error message (the derived `establish` replaces it with a generic
    /// one), and that variant's own settings.
    fn connect(url: &DatabaseUrl) -> Result<Self, ConnectionError> {
        Ok(match url.backend() {
            #[cfg(feature = "postgres")]
            Backend::Postgres => AnyConnection::Postgresql(PgConnection::connect(url)?),
            #[cfg(feature = "mysql")]
            Backend::Mysql => AnyConnection::Mysql(MysqlConnection::connect(url)?),
            Backend::Sqlite => AnyConnection::Sqlite(SqliteConnection::connect(url)?),
            #[allow(unreachable_patterns)] // every backend compiled in
            other => return Err(not_compiled_in(other)),
        })
    }

    fn begin_outer_transaction(&mut self) -> QueryResult<()> {
        on_inner_connection!(self, |conn| conn.begin_outer_transaction())
    }

    /// The inner connection's (a Galera node not `wsrep_ready` says no).
    fn ready(&mut self) -> QueryResult<()> {
        on_inner_connection!(self, |conn| conn.ready())
    }

    /// The inner connection's: `pg_cancel_backend`, `KILL QUERY` or
    /// `sqlite3_interrupt` when a statement is cancelled.
    fn canceller(&mut self, url: &DatabaseUrl) -> Option<Canceller> {
        on_inner_connection!(self, |conn| conn.canceller(url))
    }

    /// The inner connection's server-side statement timeout.
    fn set_statement_timeout(&mut self, timeout: Option<Duration>) -> QueryResult<()> {
        on_inner_connection!(self, |conn| conn.set_statement_timeout(timeout))
    }
}
