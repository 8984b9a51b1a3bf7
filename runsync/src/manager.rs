//! The bb8 side: how pooled connections are opened, checked and refused.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

#[cfg(feature = "sqlite")]
use diesel::connection::AnsiTransactionManager;
use diesel::connection::{Connection, SimpleConnection as _, TransactionManager};
use diesel::result::{ConnectionError, QueryResult};
use tokio::sync::watch;

use crate::cancel::Canceller;
use crate::echo::{Lost, Retire, ServerTimedOut, SqlEcho};
use crate::error::Error;
use crate::observe::{Observe, RetireReason};
use crate::url::DatabaseUrl;

/// What an engine's connections are for: a read-write engine (the
/// default) retires a connection whose server turned read-only (a demoted
/// primary, a standby, `default_transaction_read_only`); a read-only
/// engine takes any node ([`EngineOptions::read_only`](crate::EngineOptions::read_only),
/// or a PostgreSQL URL with `target_session_attrs=read-only`, `standby` or
/// `prefer-standby`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// Writes and reads: the node must accept writes.
    ReadWrite,
    /// Reads only: any node that answers will do.
    ReadOnly,
}

/// Where a connection's server keeps the statement timeout the engine sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TimeoutScope {
    /// The server has none (SQLite): deadlines are the client's alone.
    None,
    /// Set per session and kept until changed (MySQL/MariaDB
    /// `max_statement_time`): the engine sets it only when it changes.
    Session,
    /// Set inside each transaction and gone at its end (PostgreSQL
    /// `SET LOCAL statement_timeout`): nothing outlives the transaction, so
    /// nothing leaks to another client through a pooler such as PgBouncer.
    Transaction,
}

/// An opaque position in a primary's write stream (PostgreSQL: a WAL LSN),
/// taken after a commit: a read on a replica that has replayed up to it
/// sees that commit ([`Replicated`](crate::Replicated)).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WritePosition(pub(crate) Option<String>);

impl WritePosition {
    /// A position no replica can be shown to have reached: reads after it
    /// go to the primary.
    pub fn unknown() -> Self {
        WritePosition(None)
    }

    /// The server's own text for it (PostgreSQL: `0/3000148`), if known.
    pub fn as_str(&self) -> Option<&str> {
        self.0.as_deref()
    }
}

/// A synchronous Diesel connection the engine can pool.
///
/// Implemented here for `SqliteConnection`, `PgConnection` and
/// `MysqlConnection` (each behind its cargo feature). For a type of your
/// own that wraps or selects between these (a `#[derive(MultiConnection)]`
/// enum), use [`forward_poolable_connection!`](crate::forward_poolable_connection),
/// which forwards every method to the inner connection: an empty `impl`
/// compiles, but keeps only the defaults below, which give none of the
/// per-backend guarantees. What each method gives:
///
/// | method | default | what the built-in impls give |
/// |---|---|---|
/// | [`connect`](Self::connect) | `establish` | SQLite: WAL, busy handler, foreign keys |
/// | [`begin_outer_transaction`](Self::begin_outer_transaction) | `BEGIN` | SQLite: `BEGIN IMMEDIATE` (no upgrade deadlocks); MySQL with `mysql-single-round-trip`: one round trip |
/// | [`commit_outer_transaction`](Self::commit_outer_transaction), [`rollback_outer_transaction`](Self::rollback_outer_transaction) | the transaction manager's | MySQL with `mysql-single-round-trip`: one round trip |
/// | [`begin_with_statement_timeout`](Self::begin_with_statement_timeout) | `BEGIN`, then [`set_statement_timeout`](Self::set_statement_timeout) | PostgreSQL: `BEGIN; SET LOCAL statement_timeout` in one round trip |
/// | [`ping`](Self::ping) | `SELECT 1` | |
/// | [`ready`](Self::ready) | [`ping`](Self::ping) | PostgreSQL: refuses a read-only node for a read-write engine; MariaDB: a Galera node not `wsrep_ready` |
/// | [`canceller`](Self::canceller) | none: a cancelled statement runs to its end | `pg_cancel_backend`, `KILL QUERY`, `sqlite3_interrupt` |
/// | [`timeout_scope`](Self::timeout_scope) | [`TimeoutScope::None`]: deadlines are client-side only | PostgreSQL per transaction, MySQL per session |
/// | [`set_statement_timeout`](Self::set_statement_timeout) | nothing | `SET LOCAL statement_timeout`, `max_statement_time` |
/// | [`write_position`](Self::write_position), [`has_replayed`](Self::has_replayed) | unknown: reads after a write go to the primary | PostgreSQL: WAL LSNs |
/// | [`is_embedded`](Self::is_embedded) | `false`: a server | SQLite: `true` |
pub trait PoolableConnection: Connection + Send + 'static {
    /// Opens a connection to `url` and applies per-connection settings.
    fn connect(url: &DatabaseUrl) -> Result<Self, ConnectionError> {
        Self::establish(url.expose())
    }

    /// Begins the outermost transaction (SQLite uses `BEGIN IMMEDIATE`).
    fn begin_outer_transaction(&mut self) -> QueryResult<()> {
        <Self::TransactionManager as TransactionManager<Self>>::begin_transaction(self)
    }

    /// Commits the outermost transaction (the engine calls it at depth 1).
    /// Overrides must keep the transaction manager's bookkeeping and its
    /// `CommitTransaction` instrumentation event.
    fn commit_outer_transaction(&mut self) -> QueryResult<()> {
        <Self::TransactionManager as TransactionManager<Self>>::commit_transaction(self)
    }

    /// Rolls back the outermost transaction (the engine calls it at depth
    /// 1, after rolling back any savepoints). Overrides must keep the
    /// transaction manager's bookkeeping and its `RollbackTransaction`
    /// instrumentation event.
    fn rollback_outer_transaction(&mut self) -> QueryResult<()> {
        <Self::TransactionManager as TransactionManager<Self>>::rollback_transaction(self)
    }

    /// Begins the outermost transaction with a server-side statement
    /// timeout for it; called instead of
    /// [`begin_outer_transaction`](Self::begin_outer_transaction) when the
    /// connection's [`timeout_scope`](Self::timeout_scope) is
    /// [`TimeoutScope::Transaction`] and a deadline is set.
    fn begin_with_statement_timeout(&mut self, timeout: Duration) -> QueryResult<()> {
        self.begin_outer_transaction()?;
        self.set_statement_timeout(Some(timeout))
    }

    /// A cheap round trip that fails when the server has gone away.
    fn ping(&mut self) -> QueryResult<()> {
        self.batch_execute("SELECT 1")
    }

    /// Whether this connection's server takes the work of an engine of
    /// this `access`: asked of each new connection, and at checkout of one
    /// idle longer than [`ping_after`](crate::EngineOptions::ping_after)
    /// (so keep it one cheap round trip). An engine over several nodes (a
    /// `mysql://` URL with several hosts) goes on to the next node when it
    /// fails. The default is [`ping`](Self::ping). PostgreSQL says no to a
    /// read-write engine on a read-only node (`transaction_read_only`: a
    /// standby, or `default_transaction_read_only`); MySQL/MariaDB says no
    /// for a Galera node that is not `wsrep_ready` (outside the primary
    /// component, or still joining) where wsrep is on.
    fn ready(&mut self, access: Access) -> QueryResult<()> {
        let _ = access;
        self.ping()
    }

    /// A handle that stops, from another thread, the statement this
    /// connection is running: called once, right after [`connect`](Self::connect),
    /// on the same thread. The engine uses it when an operation's future is
    /// dropped or its deadline passes while the user's closure runs (see the
    /// `cancel` module). The default, `None`, leaves a cancelled statement
    /// to run to its end.
    fn canceller(&mut self, url: &DatabaseUrl) -> Option<Canceller> {
        let _ = url;
        None
    }

    /// Where this connection's server keeps the statement timeout
    /// [`set_statement_timeout`](Self::set_statement_timeout) sets.
    fn timeout_scope(&self) -> TimeoutScope {
        TimeoutScope::None
    }

    /// Makes the server stop any statement of this connection that runs
    /// longer than `timeout` (`None`: the server's own default): for the
    /// session ([`TimeoutScope::Session`]) or for the open transaction
    /// ([`TimeoutScope::Transaction`]). The client-side deadline applies
    /// either way. The default does nothing (SQLite has no server).
    fn set_statement_timeout(&mut self, timeout: Option<Duration>) -> QueryResult<()> {
        let _ = timeout;
        Ok(())
    }

    /// The server's write position now, outside any transaction, for
    /// read-your-writes on replicas; [`WritePosition::unknown`] (the
    /// default) sends later reads to the primary.
    fn write_position(&mut self) -> QueryResult<WritePosition> {
        Ok(WritePosition::unknown())
    }

    /// Whether this connection's server has applied everything up to
    /// `position` (a standby that replayed it, or the primary itself). The
    /// default says no, so reads go to the primary.
    fn has_replayed(&mut self, position: &WritePosition) -> QueryResult<bool> {
        let _ = position;
        Ok(false)
    }

    /// Whether this connection type is an embedded database that needs no
    /// server (SQLite: `true`). With no database URL set,
    /// `testing::TestDatabase::new` (feature `testing`) falls back to a
    /// fresh SQLite file for such a type, and panics, asking for a URL, for
    /// any other. The default is `false`; an enum of connections
    /// ([`forward_poolable_connection!`](crate::forward_poolable_connection))
    /// keeps it: which of its variants to use is the URL's to say.
    fn is_embedded() -> bool {
        false
    }
}

/// Forwards every [`PoolableConnection`] method of an enum of connections
/// (a `#[derive(MultiConnection)]` type) to the connection each variant
/// holds, so it keeps every guarantee of the inner connections' impls:
/// their set-up, server-side cancel and timeouts, readiness checks and
/// replica positions. `connect` opens the variant the URL's backend names.
///
/// ```ignore
/// #[derive(diesel::MultiConnection)]
/// pub enum AnyConnection {
///     Postgresql(diesel::PgConnection),
///     Sqlite(diesel::SqliteConnection),
/// }
///
/// diesel_runsync::forward_poolable_connection! {
///     AnyConnection {
///         Postgres => Postgresql(diesel::PgConnection),
///         Sqlite => Sqlite(diesel::SqliteConnection),
///     }
/// }
/// ```
///
/// Each line maps a [`Backend`](crate::Backend) to the variant that serves
/// it. A URL of a backend without a line fails to connect, saying so.
///
/// [`is_embedded`](crate::PoolableConnection::is_embedded) is not forwarded
/// (it has no `self` to pick a variant by) and stays `false`, even when
/// SQLite is one of the variants: such a type always needs a URL, so
/// `testing::TestDatabase::new` of it wants `TEST_DATABASE_URL` (a SQLite
/// path will do), or `TestDatabase::on` is given one.
#[macro_export]
macro_rules! forward_poolable_connection {
    ($ty:ident { $($(#[$attr:meta])* $backend:ident => $variant:ident($conn:ty)),+ $(,)? }) => {
        impl $crate::PoolableConnection for $ty {
            fn connect(
                url: &$crate::DatabaseUrl,
            ) -> ::std::result::Result<Self, ::diesel::result::ConnectionError> {
                match url.backend() {
                    $($(#[$attr])* $crate::Backend::$backend => {
                        <$conn as $crate::PoolableConnection>::connect(url).map($ty::$variant)
                    })+
                    #[allow(unreachable_patterns)]
                    other => ::std::result::Result::Err(
                        ::diesel::result::ConnectionError::InvalidConnectionUrl(::std::format!(
                            "this build has no {other} support; rebuild with its cargo feature"
                        )),
                    ),
                }
            }
            fn begin_outer_transaction(&mut self) -> ::diesel::QueryResult<()> {
                match self { $($(#[$attr])* $ty::$variant(c) => $crate::PoolableConnection::begin_outer_transaction(c),)+ }
            }
            fn commit_outer_transaction(&mut self) -> ::diesel::QueryResult<()> {
                match self { $($(#[$attr])* $ty::$variant(c) => $crate::PoolableConnection::commit_outer_transaction(c),)+ }
            }
            fn rollback_outer_transaction(&mut self) -> ::diesel::QueryResult<()> {
                match self { $($(#[$attr])* $ty::$variant(c) => $crate::PoolableConnection::rollback_outer_transaction(c),)+ }
            }
            fn begin_with_statement_timeout(
                &mut self,
                timeout: ::std::time::Duration,
            ) -> ::diesel::QueryResult<()> {
                match self { $($(#[$attr])* $ty::$variant(c) => $crate::PoolableConnection::begin_with_statement_timeout(c, timeout),)+ }
            }
            fn ping(&mut self) -> ::diesel::QueryResult<()> {
                match self { $($(#[$attr])* $ty::$variant(c) => $crate::PoolableConnection::ping(c),)+ }
            }
            fn ready(&mut self, access: $crate::Access) -> ::diesel::QueryResult<()> {
                match self { $($(#[$attr])* $ty::$variant(c) => $crate::PoolableConnection::ready(c, access),)+ }
            }
            fn canceller(&mut self, url: &$crate::DatabaseUrl) -> ::std::option::Option<$crate::Canceller> {
                match self { $($(#[$attr])* $ty::$variant(c) => $crate::PoolableConnection::canceller(c, url),)+ }
            }
            fn timeout_scope(&self) -> $crate::TimeoutScope {
                match self { $($(#[$attr])* $ty::$variant(c) => $crate::PoolableConnection::timeout_scope(c),)+ }
            }
            fn set_statement_timeout(
                &mut self,
                timeout: ::std::option::Option<::std::time::Duration>,
            ) -> ::diesel::QueryResult<()> {
                match self { $($(#[$attr])* $ty::$variant(c) => $crate::PoolableConnection::set_statement_timeout(c, timeout),)+ }
            }
            fn write_position(&mut self) -> ::diesel::QueryResult<$crate::WritePosition> {
                match self { $($(#[$attr])* $ty::$variant(c) => $crate::PoolableConnection::write_position(c),)+ }
            }
            fn has_replayed(&mut self, position: &$crate::WritePosition) -> ::diesel::QueryResult<bool> {
                match self { $($(#[$attr])* $ty::$variant(c) => $crate::PoolableConnection::has_replayed(c, position),)+ }
            }
        }
    };
}

/// `pg_cancel_backend` from a side connection (checked against the
/// backend's start time, refused behind a pooler); `SET LOCAL
/// statement_timeout` in each transaction; read-only nodes refused for
/// read-write engines; WAL positions for read-your-writes.
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
impl PoolableConnection for diesel::PgConnection {
    /// Behind a transaction-mode pooler (the URL's `pgbouncer=true`, or
    /// [`EngineOptions::transaction_pooler`](crate::EngineOptions::transaction_pooler)),
    /// Diesel's prepared statement cache is off: its named statements
    /// would be another client's, or gone, on the next server connection.
    fn connect(url: &DatabaseUrl) -> Result<Self, ConnectionError> {
        let mut conn = Self::establish(url.expose())?;
        if url.transaction_pooler() == Some(true) {
            conn.set_prepared_statement_cache_size(diesel::connection::CacheSize::Disabled);
        }
        Ok(conn)
    }

    fn begin_with_statement_timeout(&mut self, timeout: Duration) -> QueryResult<()> {
        diesel::connection::AnsiTransactionManager::begin_transaction_sql(
            self,
            &format!(
                "BEGIN; SET LOCAL statement_timeout = {}",
                pg_millis(timeout)
            ),
        )
    }

    fn ready(&mut self, access: Access) -> QueryResult<()> {
        if access == Access::ReadOnly {
            return self.ping();
        }
        let read_only: String = diesel::RunQueryDsl::get_result(
            diesel::select(diesel::dsl::sql::<diesel::sql_types::Text>(
                "current_setting('transaction_read_only')",
            )),
            self,
        )?;
        if read_only == "on" {
            return Err(diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::ReadOnlyTransaction,
                Box::new(NOT_WRITABLE.to_owned()),
            ));
        }
        Ok(())
    }

    fn canceller(&mut self, url: &DatabaseUrl) -> Option<Canceller> {
        crate::cancel::postgres(self, url)
    }

    fn timeout_scope(&self) -> TimeoutScope {
        TimeoutScope::Transaction
    }

    fn set_statement_timeout(&mut self, timeout: Option<Duration>) -> QueryResult<()> {
        match timeout {
            Some(t) => {
                self.batch_execute(&format!("SET LOCAL statement_timeout = {}", pg_millis(t)))
            }
            None => self.batch_execute("SET LOCAL statement_timeout TO DEFAULT"),
        }
    }

    fn write_position(&mut self) -> QueryResult<WritePosition> {
        diesel::RunQueryDsl::get_result::<String>(
            diesel::select(diesel::dsl::sql::<diesel::sql_types::Text>(
                "CAST(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
                 ELSE pg_current_wal_lsn() END AS text)",
            )),
            self,
        )
        .map(|lsn| WritePosition(Some(lsn)))
    }

    fn has_replayed(&mut self, position: &WritePosition) -> QueryResult<bool> {
        let Some(lsn) = position.as_str() else {
            return Ok(false);
        };
        diesel::RunQueryDsl::get_result(
            diesel::select(
                diesel::dsl::sql::<diesel::sql_types::Bool>(
                    "CASE WHEN pg_is_in_recovery() THEN \
                     COALESCE(pg_last_wal_replay_lsn() >= CAST(",
                )
                .bind::<diesel::sql_types::Text, _>(lsn.to_owned())
                .sql(" AS pg_lsn), FALSE) ELSE TRUE END"),
            ),
            self,
        )
    }
}

/// What a read-write engine's connection to a read-only PostgreSQL node reports.
#[cfg(feature = "postgres")]
pub(crate) const NOT_WRITABLE: &str = "this server is read-only (a standby, a demoted primary or \
     default_transaction_read_only = on); a read-write engine opens its connections on a writable \
     node: list every node in the URL with target_session_attrs=read-write, or use a read-only \
     engine (EngineOptions::read_only) for reads";

/// A PostgreSQL `statement_timeout` value: milliseconds, at least 1 (0
/// would mean no limit).
#[cfg(feature = "postgres")]
fn pg_millis(timeout: Duration) -> u128 {
    timeout.as_millis().clamp(1, i32::MAX as u128)
}

/// `KILL QUERY` from a side connection; MariaDB's `max_statement_time`
/// (MySQL: `MAX_EXECUTION_TIME`, which limits `SELECT`s only).
#[cfg(feature = "mysql")]
#[cfg_attr(docsrs, doc(cfg(feature = "mysql")))]
impl PoolableConnection for diesel::MysqlConnection {
    /// `BEGIN` in one round trip (see [`commit_outer_transaction`](Self::commit_outer_transaction)).
    #[cfg(feature = "mysql-single-round-trip")]
    fn begin_outer_transaction(&mut self) -> QueryResult<()> {
        crate::mysql_tx::begin(self)
    }

    /// `COMMIT` in one round trip: a statement prepared once per
    /// connection, not Diesel's `batch_execute`, which switches
    /// multi-statements on and off around it (three round trips).
    #[cfg(feature = "mysql-single-round-trip")]
    fn commit_outer_transaction(&mut self) -> QueryResult<()> {
        crate::mysql_tx::commit(self)
    }

    /// `ROLLBACK` in one round trip (see [`commit_outer_transaction`](Self::commit_outer_transaction)).
    #[cfg(feature = "mysql-single-round-trip")]
    fn rollback_outer_transaction(&mut self) -> QueryResult<()> {
        crate::mysql_tx::rollback(self)
    }

    fn ready(&mut self, _access: Access) -> QueryResult<()> {
        mysql_ready(self)
    }

    fn canceller(&mut self, url: &DatabaseUrl) -> Option<Canceller> {
        crate::cancel::mysql(self, url)
    }

    fn timeout_scope(&self) -> TimeoutScope {
        TimeoutScope::Session
    }

    fn set_statement_timeout(&mut self, timeout: Option<Duration>) -> QueryResult<()> {
        let (mariadb, mysql) = match timeout {
            Some(t) => (
                format!("{:.6}", t.as_secs_f64().max(0.000_001)),
                t.as_millis().clamp(1, u32::MAX as u128).to_string(),
            ),
            None => ("DEFAULT".to_owned(), "DEFAULT".to_owned()),
        };
        // MariaDB first; MySQL has no max_statement_time ("unknown system variable").
        self.batch_execute(&format!("SET SESSION max_statement_time = {mariadb}"))
            .or_else(|_| self.batch_execute(&format!("SET SESSION MAX_EXECUTION_TIME = {mysql}")))
    }
}

/// Whether a MySQL/MariaDB server takes work: a Galera node must be
/// `wsrep_ready`; a server where wsrep is off (MariaDB built with wsrep
/// support reports `wsrep_ready = OFF` outside any cluster) or absent
/// (MySQL has no `wsrep_on`) always is. `SHOW` rather than
/// `information_schema.GLOBAL_STATUS`, which MySQL 8 no longer has.
#[cfg(feature = "mysql")]
fn mysql_ready(conn: &mut diesel::MysqlConnection) -> QueryResult<()> {
    #[derive(diesel::QueryableByName)]
    struct Variable {
        #[diesel(sql_type = diesel::sql_types::Text, column_name = Value)]
        value: String,
    }
    let value = |conn: &mut diesel::MysqlConnection, show: &str| -> QueryResult<Option<String>> {
        let rows: Vec<Variable> = diesel::RunQueryDsl::load(diesel::sql_query(show), conn)?;
        Ok(rows.into_iter().next().map(|row| row.value))
    };
    let wsrep_on = value(conn, "SHOW GLOBAL VARIABLES LIKE 'wsrep\\_on'")?;
    if !wsrep_on.is_some_and(|on| on.eq_ignore_ascii_case("ON") || on == "1") {
        return Ok(());
    }
    match value(conn, "SHOW GLOBAL STATUS LIKE 'wsrep\\_ready'")? {
        Some(ready) if !ready.eq_ignore_ascii_case("ON") => {
            Err(diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::Unknown,
                Box::new(format!(
                    "this Galera node is not ready (wsrep_on is ON, wsrep_ready is {ready})"
                )),
            ))
        }
        _ => Ok(()),
    }
}

/// WAL, a 5 s wait for locks and foreign keys on every connection;
/// transactions begin with `BEGIN IMMEDIATE`.
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
impl PoolableConnection for diesel::SqliteConnection {
    fn connect(url: &DatabaseUrl) -> Result<Self, ConnectionError> {
        let mut conn = crate::cancel::sqlite::opening(|| Self::establish(url.expose()))?;
        configure_sqlite(&mut conn, url.is_sqlite_memory())
            .map_err(ConnectionError::CouldntSetupConfiguration)?;
        Ok(conn)
    }

    fn begin_outer_transaction(&mut self) -> QueryResult<()> {
        begin_immediate(self)
    }

    /// `sqlite3_interrupt` on the handle recorded while `connect` opened
    /// this connection (on this thread); also installs the busy handler
    /// that stops waiting for a lock once cancelled, in place of the busy
    /// timeout (same 5 s limit), so a deadline bounds `BEGIN IMMEDIATE`.
    fn canceller(&mut self, _url: &DatabaseUrl) -> Option<Canceller> {
        crate::cancel::sqlite::canceller()
    }

    /// SQLite is a file: no server needed.
    fn is_embedded() -> bool {
        true
    }
}

/// SQLite settings for many writers through one engine: WAL (readers never
/// block the writer), a 5 s busy timeout, and foreign keys enforced.
#[cfg(feature = "sqlite")]
fn configure_sqlite(conn: &mut diesel::SqliteConnection, in_memory: bool) -> QueryResult<()> {
    let journal = if in_memory {
        ""
    } else {
        "PRAGMA journal_mode = WAL;"
    };
    // The busy timeout first: switching to WAL needs a lock that another
    // connection's open transaction may hold for a moment. The canceller
    // (taken right after this) replaces it with a busy handler of the same
    // limit that also gives up once the operation is cancelled; without
    // one (the handle was not recorded) the busy timeout stays.
    conn.batch_execute(&format!(
        "PRAGMA busy_timeout = 5000; {journal} PRAGMA foreign_keys = ON;"
    ))
}

/// `BEGIN IMMEDIATE` on SQLite: takes the write lock up front, so two
/// writers queue on the busy timeout instead of deadlocking on an upgrade.
#[cfg(feature = "sqlite")]
fn begin_immediate(conn: &mut diesel::SqliteConnection) -> QueryResult<()> {
    AnsiTransactionManager::begin_transaction_sql(conn, "BEGIN IMMEDIATE")
}

/// What the pool holds: the connection (absent while a blocking task owns
/// it), when it last answered, the handle that cancels its statements, and
/// the statement timeout its server enforces.
pub(crate) struct Slot<C> {
    pub(crate) conn: Option<C>,
    pub(crate) last_used: Instant,
    pub(crate) canceller: Option<Canceller>,
    /// [`TimeoutScope::Session`]: the statement timeout in force on the
    /// server (`Some(None)`: the server's default), or `None` when unknown.
    session_timeout: Option<Option<Duration>>,
    /// [`TimeoutScope::Transaction`]: the timeout set for the open
    /// transaction (`None`: the server's default).
    transaction_timeout: Option<Duration>,
    /// A statement that lost the open transaction (kept by [`SqlEcho`]).
    lost: Lost,
    /// Never reuse the connection: a MySQL statement was interrupted, or
    /// its Galera node stopped serving (kept by [`SqlEcho`]).
    retire: Retire,
    /// The server stopped a statement at its statement timeout (kept by
    /// [`SqlEcho`]; taken by [`Slot::take_server_timeout`]).
    timed_out: ServerTimedOut,
    /// The engine's telemetry (absent in a vacant slot).
    observe: Option<Arc<Observe>>,
}

impl<C> Drop for Slot<C> {
    /// Detaches the canceller before the connection closes (SQLite's
    /// `sqlite3_interrupt` must never race the close).
    fn drop(&mut self) {
        if let Some(canceller) = &self.canceller {
            canceller.detach();
        }
        if let (Some(_), Some(observe)) = (&self.conn, &self.observe) {
            observe.closed();
        }
    }
}

impl<C: PoolableConnection> Slot<C> {
    /// True when the connection must not be reused: gone, with a
    /// transaction open or its transaction manager broken, or with a MySQL
    /// statement interrupted (its cached prepared statement would hang) or
    /// its Galera node not serving.
    pub(crate) fn is_unusable(&mut self) -> bool {
        if self.is_retiring() {
            return true;
        }
        match self.conn.as_mut() {
            None => true,
            Some(conn) => !matches!(
                C::TransactionManager::transaction_manager_status_mut(conn).transaction_depth(),
                Ok(None)
            ),
        }
    }

    /// The connection; present whenever the slot is not in a blocking task.
    pub(crate) fn conn_mut(&mut self) -> &mut C {
        self.conn
            .as_mut()
            .expect("a pooled slot holds its connection")
    }

    /// Commits the open transaction, unless one of its statements failed
    /// and lost it (see [`SqlEcho`]): then it rolls back and returns a
    /// serialization failure (retryable), since the server's `COMMIT`
    /// would report success for work it no longer has.
    pub(crate) fn commit(&mut self) -> QueryResult<()> {
        let lost = self.lost.lock().unwrap().take();
        match lost {
            Some((_, message)) => {
                if let Some(observe) = &self.observe {
                    observe.commit_refused();
                }
                let _ = rollback_all(self.conn_mut());
                Err(diesel::result::Error::DatabaseError(
                    diesel::result::DatabaseErrorKind::SerializationFailure,
                    Box::new(format!(
                        "the transaction was rolled back instead of committed: one of its \
                         statements failed and the server had already undone it: {message}"
                    )),
                ))
            }
            None if transaction_depth(self.conn_mut()) == 1 => {
                self.conn_mut().commit_outer_transaction()
            }
            None => C::TransactionManager::commit_transaction(self.conn_mut()),
        }
    }

    /// Records a successful round trip (lets the next checkout skip its ping).
    pub(crate) fn mark_used(&mut self) {
        self.last_used = Instant::now();
    }

    /// After a failure: rolls back every open level, then checks that the
    /// server still answers; a connection that does not is closed here, so
    /// the pool replaces it instead of handing it out again.
    pub(crate) fn recover(&mut self) {
        let reason = self.retire_reason();
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        // A failed ROLLBACK is logged there; the ping below decides.
        let _ = rollback_all(conn);
        if let Some(reason) = reason {
            tracing::debug!("closing a connection that must not be reused ({reason})");
            self.retire_with(reason);
            return;
        }
        if let Err(e) = conn.ping() {
            tracing::warn!("closing a connection that no longer answers: {e}");
            self.retire_with(RetireReason::NotAnswering);
        }
    }

    /// Whether the server stopped a statement at its statement timeout
    /// since the last call (see [`ServerTimedOut`]).
    pub(crate) fn take_server_timeout(&self) -> bool {
        // Read first: a vacant slot's flag is shared and never written.
        self.timed_out.load(Ordering::Acquire) && self.timed_out.swap(false, Ordering::AcqRel)
    }

    /// Whether the connection will be closed after this operation, not
    /// pooled again: its [`SqlEcho`] recorded a reason.
    pub(crate) fn is_retiring(&self) -> bool {
        self.retire.load(Ordering::Acquire) != 0
    }

    /// Marks the connection to be closed after this operation for
    /// `reason`, unless its [`SqlEcho`] has recorded a reason already.
    pub(crate) fn retire_after(&self, reason: RetireReason) {
        let _ = self
            .retire
            .compare_exchange(0, reason as u8, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Why the connection must not be reused, as its [`SqlEcho`] recorded.
    fn retire_reason(&self) -> Option<RetireReason> {
        RetireReason::from_code(self.retire.load(Ordering::Acquire))
    }

    /// Closes the connection, reporting it retired for `reason`.
    pub(crate) fn retire_with(&mut self, reason: RetireReason) {
        if self.conn.is_some()
            && let Some(observe) = &self.observe
        {
            observe.retired(reason);
        }
        self.close();
    }

    /// Closes the connection (the canceller detached first).
    pub(crate) fn close(&mut self) {
        if let Some(canceller) = self.canceller.take() {
            canceller.detach();
        }
        if self.conn.take().is_some()
            && let Some(observe) = &self.observe
        {
            observe.closed();
        }
    }

    /// Begins the transaction if `needs_begin`, and makes the server
    /// enforce `timeout` on the statements about to run (as the
    /// connection's [`TimeoutScope`] allows), with as few round trips as it
    /// can: PostgreSQL sends `BEGIN; SET LOCAL statement_timeout` as one.
    pub(crate) fn begin_and_limit(
        &mut self,
        timeout: Option<Duration>,
        needs_begin: bool,
    ) -> QueryResult<()> {
        let conn = self
            .conn
            .as_mut()
            .expect("a pooled slot holds its connection");
        match conn.timeout_scope() {
            TimeoutScope::None if needs_begin => conn.begin_outer_transaction(),
            TimeoutScope::None => Ok(()),
            TimeoutScope::Session => {
                if self.session_timeout != Some(timeout) {
                    self.session_timeout = None;
                    conn.set_statement_timeout(timeout)?;
                    self.session_timeout = Some(timeout);
                }
                if needs_begin {
                    conn.begin_outer_transaction()?;
                }
                Ok(())
            }
            TimeoutScope::Transaction if needs_begin => {
                match timeout {
                    Some(limit) => conn.begin_with_statement_timeout(limit)?,
                    None => conn.begin_outer_transaction()?,
                }
                self.transaction_timeout = timeout;
                Ok(())
            }
            TimeoutScope::Transaction => {
                if self.transaction_timeout != timeout {
                    conn.set_statement_timeout(timeout)?;
                    self.transaction_timeout = timeout;
                }
                Ok(())
            }
        }
    }

    /// An empty slot, left in the pool's handle while a blocking task owns
    /// the real one: if the caller gives up on that task, the pool discards
    /// this one and opens a replacement.
    pub(crate) fn vacant() -> Self {
        // One shared set of (never written) flags: a vacant slot is made
        // per operation, and must not allocate.
        static FLAGS: std::sync::OnceLock<(Lost, Retire, ServerTimedOut)> =
            std::sync::OnceLock::new();
        let (lost, retire, timed_out) = FLAGS.get_or_init(Default::default);
        Slot {
            conn: None,
            last_used: Instant::now(),
            canceller: None,
            session_timeout: None,
            transaction_timeout: None,
            lost: lost.clone(),
            retire: retire.clone(),
            timed_out: timed_out.clone(),
            observe: None,
        }
    }
}

/// Rolls back every open level (savepoints left by a panic included).
/// A failure leaves the transaction manager broken, so the pool drops the
/// connection and the server rolls back when it closes; the failure is
/// returned for callers that report it.
pub(crate) fn rollback_all<C: PoolableConnection>(conn: &mut C) -> QueryResult<()> {
    loop {
        match transaction_depth(conn) {
            0 => return Ok(()),
            BROKEN => return Err(diesel::result::Error::BrokenTransactionManager),
            depth => {
                let rolled_back = if depth == 1 {
                    conn.rollback_outer_transaction()
                } else {
                    C::TransactionManager::rollback_transaction(conn)
                };
                if let Err(e) = rolled_back {
                    tracing::warn!("ROLLBACK failed, the connection will be discarded: {e}");
                    return Err(e);
                }
            }
        }
    }
}

/// Transaction levels open on `conn`: 0 for none, 1 for a transaction,
/// more for savepoints inside it; [`BROKEN`] when the transaction manager
/// is broken (never balanced, never reusable).
pub(crate) fn transaction_depth<C: PoolableConnection>(conn: &mut C) -> u32 {
    match C::TransactionManager::transaction_manager_status_mut(conn).transaction_depth() {
        Ok(depth) => depth.map_or(0, |d| d.get()),
        Err(_) => BROKEN,
    }
}

/// The [`transaction_depth`] of a connection whose transaction manager is broken.
pub(crate) const BROKEN: u32 = u32::MAX;

/// The bb8 manager of a pool of `C`.
pub(crate) struct Manager<C> {
    pub(crate) url: DatabaseUrl,
    /// [`DatabaseUrl::hosts`]: the nodes new connections go to, in turn.
    pub(crate) hosts: Vec<DatabaseUrl>,
    /// The node the next connection tries first.
    pub(crate) next_host: AtomicUsize,
    pub(crate) echo: bool,
    /// The user's instrumentation, handed every event after the engine's.
    pub(crate) user_instrumentation: Option<crate::engine::InstrumentationFactory>,
    /// Connections used more recently than this are not pinged on checkout.
    pub(crate) ping_after: Duration,
    /// The engine's default statement timeout, set on every new connection.
    pub(crate) statement_timeout: Option<Duration>,
    /// What the engine's connections are for (read-write nodes only, or any).
    pub(crate) access: Access,
    /// Failed connects back off: see [`ConnectBackoff`].
    pub(crate) backoff: std::sync::Mutex<ConnectBackoff>,
    /// The engine's spans, metrics and pool events.
    pub(crate) observe: Arc<Observe>,
    /// Statements slower than this are logged at `WARN` (see [`SqlEcho`]).
    pub(crate) slow_statement_threshold: Option<Duration>,
    pub(crate) _conn: std::marker::PhantomData<fn() -> C>,
}

/// After a failed connect, the next attempt waits: 50 ms, doubling to at
/// most [`MAX_CONNECT_BACKOFF`], each jittered between half and all of it.
/// Until then a checkout that needs a new connection fails at once with
/// the last connect error (retryable), so a client hammering a failing
/// server opens a few connections a second, not hundreds.
#[derive(Debug, Default)]
pub(crate) struct ConnectBackoff {
    failures: u32,
    retry_at: Option<Instant>,
    last: Option<(String, String)>,
}

/// The longest wait between two failed connects.
pub const MAX_CONNECT_BACKOFF: Duration = Duration::from_secs(2);

impl ConnectBackoff {
    /// The last error, if a connect must not be tried yet.
    fn holds(&self) -> Option<Error> {
        let (url, message) = self.last.clone()?;
        (Instant::now() < self.retry_at?).then_some(Error::Connect { url, message })
    }

    fn failed(&mut self, error: &Error) {
        self.failures = self.failures.saturating_add(1);
        let exponential = Duration::from_millis(50)
            .saturating_mul(1 << self.failures.saturating_sub(1).min(10))
            .min(MAX_CONNECT_BACKOFF);
        self.retry_at = Some(Instant::now() + crate::retry::jitter(exponential));
        if let Error::Connect { url, message } = error {
            self.last = Some((url.clone(), message.clone()));
        }
    }

    fn succeeded(&mut self) {
        *self = ConnectBackoff::default();
    }
}

impl<C: PoolableConnection> Manager<C> {
    fn connect_error(&self, error: &ConnectionError) -> Error {
        let mut message = one_line(&self.url.scrub(&error.to_string()));
        if self.url.backend() == crate::url::Backend::Sqlite {
            message.push_str(" (does the file's directory exist, and is it writable?)");
        }
        Error::Connect {
            url: self.url.to_string(),
            message,
        }
    }
}

/// Collapses a multi-line driver message into one line.
pub(crate) fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl<C: PoolableConnection> bb8::ManageConnection for Manager<C> {
    type Connection = Slot<C>;
    type Error = Error;

    /// Opens a connection on the next node in turn; when it does not
    /// answer, on the following ones (a node that went away is skipped).
    async fn connect(&self) -> Result<Slot<C>, Error> {
        if let Some(last) = self
            .backoff
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .holds()
        {
            return Err(last);
        }
        let first = self.next_host.fetch_add(1, Ordering::Relaxed);
        let hosts = self.hosts.clone();
        let echo = self.echo;
        let slow = self.slow_statement_threshold;
        let since = self.observe.clock_connect();
        let access = self.access;
        let user_instrumentation = self.user_instrumentation.clone();
        let timeout = self.statement_timeout;
        let opened = tokio::task::spawn_blocking(move || {
            let mut failed = None;
            let mut opened = None;
            for i in 0..hosts.len() {
                let url = &hosts[(first + i) % hosts.len()];
                let ready = C::connect(url).and_then(|mut conn| {
                    conn.ready(access)
                        .map_err(ConnectionError::CouldntSetupConfiguration)?;
                    Ok(conn)
                });
                match ready {
                    Ok(conn) => {
                        opened = Some((conn, url.clone()));
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(
                            target: crate::echo::SQL_TARGET,
                            "{url}: {}",
                            one_line(&url.scrub(&e.to_string()))
                        );
                        failed = Some(e);
                    }
                }
            }
            let Some((mut conn, url)) = opened else {
                return Err(failed.unwrap_or(ConnectionError::BadConnection(
                    "the URL names no host".into(),
                )));
            };
            let canceller = conn.canceller(&url);
            let mut slot = Slot::vacant();
            slot.lost = Lost::default();
            slot.retire = Retire::default();
            slot.timed_out = ServerTimedOut::default();
            slot.canceller = canceller;
            slot.session_timeout = Some(None);
            if timeout.is_some() && conn.timeout_scope() == TimeoutScope::Session {
                conn.set_statement_timeout(timeout)
                    .map_err(ConnectionError::CouldntSetupConfiguration)?;
                slot.session_timeout = Some(timeout);
            }
            conn.set_instrumentation(
                SqlEcho::new(
                    echo,
                    url.backend(),
                    access,
                    slot.lost.clone(),
                    slot.retire.clone(),
                    slot.timed_out.clone(),
                )
                .slow_statement_threshold(slow)
                .then(user_instrumentation.as_ref().map(|make| make.make())),
            );
            slot.conn = Some(conn);
            Ok::<_, ConnectionError>(slot)
        })
        .await
        .map_err(|_| Error::RuntimeShutdown)?;
        let mut backoff = self.backoff.lock().unwrap_or_else(|e| e.into_inner());
        match opened {
            Ok(mut slot) => {
                backoff.succeeded();
                slot.observe = Some(self.observe.clone());
                self.observe.connected(since);
                if self.echo {
                    tracing::info!(target: crate::echo::SQL_TARGET, "connected to {}", self.url);
                } else {
                    tracing::debug!(target: crate::echo::SQL_TARGET, "connected to {}", self.url);
                }
                Ok(slot)
            }
            Err(e) => {
                let error = self.connect_error(&e);
                backoff.failed(&error);
                tracing::warn!(target: crate::echo::SQL_TARGET, "{error}");
                Err(error)
            }
        }
    }

    async fn is_valid(&self, slot: &mut Slot<C>) -> Result<(), Error> {
        if slot.last_used.elapsed() < self.ping_after {
            return Ok(());
        }
        let mut conn = slot.conn.take().ok_or(Error::ConnectionLost)?;
        let access = self.access;
        let (conn, pinged) = tokio::task::spawn_blocking(move || {
            let pinged = conn.ready(access);
            (conn, pinged)
        })
        .await
        .map_err(|_| Error::RuntimeShutdown)?;
        // Back in its slot even when the ping failed: the pool then drops
        // the slot, which detaches the canceller before closing it.
        slot.conn = Some(conn);
        if let Err(e) = &pinged {
            let reason = crate::error::failover_error(e)
                .map_or(RetireReason::NotAnswering, RetireReason::from_failover);
            slot.retire_with(reason);
        }
        pinged?;
        slot.last_used = Instant::now();
        Ok(())
    }

    fn has_broken(&self, slot: &mut Slot<C>) -> bool {
        let broken = slot.is_unusable();
        if broken && slot.conn.is_some() {
            let reason = slot
                .retire_reason()
                .unwrap_or(RetireReason::TransactionOpen);
            slot.retire_with(reason);
        }
        broken
    }
}

/// The last failed connect, as `(redacted url, message)`.
pub(crate) type LastConnectError = Option<Arc<(String, String)>>;

/// Receives bb8's background connection errors and wakes waiting checkouts,
/// so a failed connect is reported at once instead of after the timeout.
/// Failed pings of idle connections are not forwarded: bb8 replaces those.
#[derive(Debug, Clone)]
pub(crate) struct ConnectErrorSink(pub(crate) watch::Sender<LastConnectError>);

impl bb8::ErrorSink<Error> for ConnectErrorSink {
    fn sink(&self, error: Error) {
        if let Error::Connect { url, message } = error {
            self.0.send_replace(Some(Arc::new((url, message))));
        }
    }

    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<Error>> {
        Box::new(self.clone())
    }
}
