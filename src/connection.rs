//! `AnyConnection`: one Diesel connection type for the backends compiled
//! in (SQLite always; PostgreSQL and MySQL/MariaDB by cargo feature), the
//! backend picked from the URL at run time.
//!
//! `#[derive(MultiConnection)]` does not forward `#[cfg]` on enum variants,
//! so the `any_connection!` macro below writes the enum out once per feature set.

use diesel::prelude::*;

use diesel_runsync::Backend;

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

// Every `PoolableConnection` method goes to the inner connection's impl, so
// the program's engine keeps each backend's set-up, server-side cancel and
// timeouts, readiness checks and replica positions.
diesel_runsync::forward_poolable_connection! {
    AnyConnection {
        #[cfg(feature = "postgres")]
        Postgres => Postgresql(PgConnection),
        #[cfg(feature = "mysql")]
        Mysql => Mysql(MysqlConnection),
        Sqlite => Sqlite(SqliteConnection),
    }
}
