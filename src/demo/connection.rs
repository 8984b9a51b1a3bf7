//! `AnyConnection`: one Diesel connection type for SQLite, PostgreSQL and
//! MySQL/MariaDB, the backend picked from the URL at run time.

use diesel::connection::TransactionManager;
use diesel::prelude::*;
use diesel::result::ConnectionError;

use crate::facade::manager::{PoolableConnection, begin_immediate};
use crate::facade::url::{Backend, DatabaseUrl};

/// A connection to any of the three backends.
///
/// Query code written against it runs unchanged on all three; where a
/// backend needs its own SQL (MySQL has no `RETURNING`), match on the variant.
#[derive(diesel::MultiConnection)]
pub enum AnyConnection {
    /// PostgreSQL, through libpq.
    Postgresql(PgConnection),
    /// MySQL or MariaDB, through libmysqlclient.
    Mysql(MysqlConnection),
    /// SQLite, embedded (tried last by `establish`, as it accepts any string).
    Sqlite(SqliteConnection),
}

impl AnyConnection {
    /// The backend behind this connection.
    pub fn backend(&self) -> Backend {
        match self {
            AnyConnection::Postgresql(_) => Backend::Postgres,
            AnyConnection::Mysql(_) => Backend::Mysql,
            AnyConnection::Sqlite(_) => Backend::Sqlite,
        }
    }
}

impl PoolableConnection for AnyConnection {
    /// Opens the variant the URL's scheme names, keeping the driver's own
    /// error message (the derived `establish` replaces it with a generic one).
    fn connect(url: &DatabaseUrl) -> Result<Self, ConnectionError> {
        Ok(match url.backend() {
            Backend::Postgres => {
                AnyConnection::Postgresql(<PgConnection as PoolableConnection>::connect(url)?)
            }
            Backend::Mysql => {
                AnyConnection::Mysql(<MysqlConnection as PoolableConnection>::connect(url)?)
            }
            Backend::Sqlite => {
                AnyConnection::Sqlite(<SqliteConnection as PoolableConnection>::connect(url)?)
            }
        })
    }

    fn begin_outer_transaction(&mut self) -> QueryResult<()> {
        match self {
            AnyConnection::Sqlite(conn) => begin_immediate(conn),
            other => {
                <<Self as Connection>::TransactionManager as TransactionManager<Self>>::begin_transaction(other)
            }
        }
    }
}

/// Runs the same Diesel expression on whichever inner connection `conn`
/// holds: for statements the `MultiConnection` enum cannot express itself
/// (batched inserts, `RETURNING`).
#[macro_export]
macro_rules! on_inner_connection {
    ($conn:expr, |$inner:ident| $body:expr) => {
        match $conn {
            $crate::demo::AnyConnection::Postgresql($inner) => $body,
            $crate::demo::AnyConnection::Mysql($inner) => $body,
            $crate::demo::AnyConnection::Sqlite($inner) => $body,
        }
    };
}
