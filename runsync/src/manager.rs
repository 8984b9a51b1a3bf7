//! The bb8 side: how pooled connections are opened, checked and refused.

use std::sync::Arc;
use std::time::{Duration, Instant};

#[cfg(feature = "sqlite")]
use diesel::connection::AnsiTransactionManager;
use diesel::connection::{Connection, SimpleConnection as _, TransactionManager};
use diesel::result::{ConnectionError, QueryResult};
use tokio::sync::watch;

use crate::echo::SqlEcho;
use crate::error::Error;
use crate::url::DatabaseUrl;

/// A synchronous Diesel connection the engine can pool.
///
/// Implemented here for `SqliteConnection`, `PgConnection` and
/// `MysqlConnection` (each behind its cargo feature); implement it for your
/// own `#[derive(MultiConnection)]` type (the defaults need only an empty
/// `impl`; forward to the inner connection's impl to keep its settings).
pub trait PoolableConnection: Connection + Send + 'static {
    /// Opens a connection to `url` and applies per-connection settings.
    fn connect(url: &DatabaseUrl) -> Result<Self, ConnectionError> {
        Self::establish(url.expose())
    }

    /// Begins the outermost transaction (SQLite uses `BEGIN IMMEDIATE`).
    fn begin_outer_transaction(&mut self) -> QueryResult<()> {
        <Self::TransactionManager as TransactionManager<Self>>::begin_transaction(self)
    }

    /// A cheap round trip that fails when the server has gone away.
    fn ping(&mut self) -> QueryResult<()> {
        self.batch_execute("SELECT 1")
    }
}

#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
impl PoolableConnection for diesel::PgConnection {}

#[cfg(feature = "mysql")]
#[cfg_attr(docsrs, doc(cfg(feature = "mysql")))]
impl PoolableConnection for diesel::MysqlConnection {}

/// WAL, a 5 s busy timeout and foreign keys on every connection;
/// transactions begin with `BEGIN IMMEDIATE`.
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
impl PoolableConnection for diesel::SqliteConnection {
    fn connect(url: &DatabaseUrl) -> Result<Self, ConnectionError> {
        let mut conn = Self::establish(url.expose())?;
        configure_sqlite(&mut conn, url.is_sqlite_memory())
            .map_err(ConnectionError::CouldntSetupConfiguration)?;
        Ok(conn)
    }

    fn begin_outer_transaction(&mut self) -> QueryResult<()> {
        begin_immediate(self)
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
    // connection's open transaction may hold for a moment.
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
/// it) and when it last answered.
pub(crate) struct Slot<C> {
    pub(crate) conn: Option<C>,
    pub(crate) last_used: Instant,
}

impl<C: PoolableConnection> Slot<C> {
    /// True when the connection must not be reused: gone, or with a
    /// transaction open or its transaction manager broken.
    fn is_unusable(&mut self) -> bool {
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

    /// Records a successful round trip (lets the next checkout skip its ping).
    pub(crate) fn mark_used(&mut self) {
        self.last_used = Instant::now();
    }

    /// After a failure: rolls back every open level, then checks that the
    /// server still answers; a connection that does not is closed here, so
    /// the pool replaces it instead of handing it out again.
    pub(crate) fn recover(&mut self) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        // A failed ROLLBACK is logged there; the ping below decides.
        let _ = rollback_all(conn);
        if let Err(e) = conn.ping() {
            tracing::warn!("closing a connection that no longer answers: {e}");
            self.conn = None;
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
            _ => {
                if let Err(e) = C::TransactionManager::rollback_transaction(conn) {
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
    pub(crate) echo: bool,
    /// Connections used more recently than this are not pinged on checkout.
    pub(crate) ping_after: Duration,
    pub(crate) _conn: std::marker::PhantomData<fn() -> C>,
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

    async fn connect(&self) -> Result<Slot<C>, Error> {
        let url = self.url.clone();
        let echo = self.echo;
        let opened = tokio::task::spawn_blocking(move || {
            let mut conn = C::connect(&url)?;
            conn.set_instrumentation(SqlEcho::new(echo));
            Ok::<_, ConnectionError>(conn)
        })
        .await
        .map_err(|_| Error::RuntimeShutdown)?;
        match opened {
            Ok(conn) => {
                if self.echo {
                    tracing::info!(target: crate::echo::SQL_TARGET, "connected to {}", self.url);
                } else {
                    tracing::debug!(target: crate::echo::SQL_TARGET, "connected to {}", self.url);
                }
                Ok(Slot {
                    conn: Some(conn),
                    last_used: Instant::now(),
                })
            }
            Err(e) => {
                let error = self.connect_error(&e);
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
        let (conn, pinged) = tokio::task::spawn_blocking(move || {
            let pinged = conn.ping();
            (conn, pinged)
        })
        .await
        .map_err(|_| Error::RuntimeShutdown)?;
        pinged?;
        slot.conn = Some(conn);
        slot.last_used = Instant::now();
        Ok(())
    }

    fn has_broken(&self, slot: &mut Slot<C>) -> bool {
        slot.is_unusable()
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
