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
use crate::echo::{Lost, Retire, SqlEcho};
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

    /// Whether this connection's server takes work: asked of each new
    /// connection of an engine over several nodes (a `mysql://` URL with
    /// several hosts), which goes on to the next node when it fails. The
    /// default says yes; MySQL/MariaDB says no for a Galera node that is
    /// not `wsrep_ready` (outside the primary component, or still joining).
    fn ready(&mut self) -> QueryResult<()> {
        Ok(())
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

    /// Makes the server stop any statement of this connection that runs
    /// longer than `timeout` (`None`: the server's own default), until
    /// changed. The engine calls it when the deadline it wants differs from
    /// the one last set; the client-side deadline applies either way. The
    /// default does nothing (SQLite has no server).
    fn set_statement_timeout(&mut self, timeout: Option<Duration>) -> QueryResult<()> {
        let _ = timeout;
        Ok(())
    }
}

/// `pg_cancel_backend` from a side connection; `SET statement_timeout`.
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
impl PoolableConnection for diesel::PgConnection {
    fn canceller(&mut self, url: &DatabaseUrl) -> Option<Canceller> {
        crate::cancel::postgres(self, url)
    }

    fn set_statement_timeout(&mut self, timeout: Option<Duration>) -> QueryResult<()> {
        match timeout {
            // 0 would mean no limit: at least one millisecond.
            Some(t) => self.batch_execute(&format!(
                "SET statement_timeout = {}",
                t.as_millis().clamp(1, i32::MAX as u128)
            )),
            None => self.batch_execute("SET statement_timeout TO DEFAULT"),
        }
    }
}

/// `KILL QUERY` from a side connection; MariaDB's `max_statement_time`
/// (MySQL: `MAX_EXECUTION_TIME`, which limits `SELECT`s only).
#[cfg(feature = "mysql")]
#[cfg_attr(docsrs, doc(cfg(feature = "mysql")))]
impl PoolableConnection for diesel::MysqlConnection {
    fn ready(&mut self) -> QueryResult<()> {
        #[derive(diesel::QueryableByName)]
        struct Ready {
            #[diesel(sql_type = diesel::sql_types::Text)]
            value: String,
        }
        let ready: Option<Ready> = diesel::RunQueryDsl::get_result(
            diesel::sql_query(
                "SELECT VARIABLE_VALUE AS value FROM information_schema.GLOBAL_STATUS \
                 WHERE VARIABLE_NAME = 'WSREP_READY'",
            ),
            self,
        )
        .map(Some)
        .or_else(|e| match e {
            diesel::result::Error::NotFound => Ok(None),
            e => Err(e),
        })?;
        match ready {
            Some(r) if r.value != "ON" => Err(diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::Unknown,
                Box::new("this Galera node is not ready (wsrep_ready is OFF)".to_owned()),
            )),
            _ => Ok(()),
        }
    }

    fn canceller(&mut self, url: &DatabaseUrl) -> Option<Canceller> {
        crate::cancel::mysql(self, url)
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
    /// The statement timeout in force on the server (`Some(None)`: the
    /// server's default), or `None` when unknown.
    server_timeout: Option<Option<Duration>>,
    /// A timeout was set inside the current transaction: a rollback undoes
    /// it on PostgreSQL, so once that transaction is over it is unknown.
    timeout_set_in_transaction: bool,
    /// A statement that lost the open transaction (kept by [`SqlEcho`]).
    lost: Lost,
    /// Never reuse the connection: a MySQL statement was interrupted, or
    /// its Galera node stopped serving (kept by [`SqlEcho`]).
    retire: Retire,
}

impl<C> Drop for Slot<C> {
    /// Detaches the canceller before the connection closes (SQLite's
    /// `sqlite3_interrupt` must never race the close).
    fn drop(&mut self) {
        if let Some(canceller) = &self.canceller {
            canceller.detach();
        }
    }
}

impl<C: PoolableConnection> Slot<C> {
    /// True when the connection must not be reused: gone, with a
    /// transaction open or its transaction manager broken, or with a MySQL
    /// statement interrupted (its cached prepared statement would hang) or
    /// its Galera node not serving.
    fn is_unusable(&mut self) -> bool {
        if self.retire.load(Ordering::Acquire) {
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
                let _ = rollback_all(self.conn_mut());
                Err(diesel::result::Error::DatabaseError(
                    diesel::result::DatabaseErrorKind::SerializationFailure,
                    Box::new(format!(
                        "the transaction was rolled back instead of committed: one of its \
                         statements failed and the server had already undone it: {message}"
                    )),
                ))
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
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        // A failed ROLLBACK is logged there; the ping below decides.
        let _ = rollback_all(conn);
        if self.retire.load(Ordering::Acquire) {
            tracing::debug!("closing a connection that must not be reused");
            self.close();
            return;
        }
        if let Err(e) = conn.ping() {
            tracing::warn!("closing a connection that no longer answers: {e}");
            self.close();
        }
    }

    /// Closes the connection (the canceller detached first).
    pub(crate) fn close(&mut self) {
        if let Some(canceller) = self.canceller.take() {
            canceller.detach();
        }
        self.conn = None;
    }

    /// Makes the server enforce `timeout` on the statements about to run,
    /// if it does not already. `in_transaction`: a transaction is open (a
    /// `SET` inside one is undone if it rolls back, on PostgreSQL).
    pub(crate) fn apply_statement_timeout(
        &mut self,
        timeout: Option<Duration>,
        in_transaction: bool,
    ) -> QueryResult<()> {
        if !in_transaction && self.timeout_set_in_transaction {
            self.timeout_set_in_transaction = false;
            self.server_timeout = None;
        }
        if self.server_timeout == Some(timeout) {
            return Ok(());
        }
        self.server_timeout = None;
        self.conn_mut().set_statement_timeout(timeout)?;
        self.server_timeout = Some(timeout);
        self.timeout_set_in_transaction = in_transaction;
        Ok(())
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

    /// Opens a connection on the next node in turn; when it does not
    /// answer, on the following ones (a node that went away is skipped).
    async fn connect(&self) -> Result<Slot<C>, Error> {
        let first = self.next_host.fetch_add(1, Ordering::Relaxed);
        let hosts = self.hosts.clone();
        let echo = self.echo;
        let user_instrumentation = self.user_instrumentation.clone();
        let timeout = self.statement_timeout;
        let opened = tokio::task::spawn_blocking(move || {
            let mut failed = None;
            let mut opened = None;
            for i in 0..hosts.len() {
                let url = &hosts[(first + i) % hosts.len()];
                let ready = C::connect(url).and_then(|mut conn| {
                    if hosts.len() > 1 {
                        conn.ready()
                            .map_err(ConnectionError::CouldntSetupConfiguration)?;
                    }
                    Ok(conn)
                });
                match ready {
                    Ok(conn) => {
                        opened = Some((conn, url.clone()));
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(target: crate::echo::SQL_TARGET, "{url}: {e}");
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
            let mut slot = Slot {
                conn: None,
                last_used: Instant::now(),
                canceller,
                server_timeout: Some(None),
                timeout_set_in_transaction: false,
                lost: Lost::default(),
                retire: Retire::default(),
            };
            if timeout.is_some() {
                conn.set_statement_timeout(timeout)
                    .map_err(ConnectionError::CouldntSetupConfiguration)?;
                slot.server_timeout = Some(timeout);
            }
            conn.set_instrumentation(
                SqlEcho::new(echo, url.backend(), slot.lost.clone(), slot.retire.clone())
                    .then(user_instrumentation.as_ref().map(|make| make.make())),
            );
            slot.conn = Some(conn);
            Ok::<_, ConnectionError>(slot)
        })
        .await
        .map_err(|_| Error::RuntimeShutdown)?;
        match opened {
            Ok(slot) => {
                if self.echo {
                    tracing::info!(target: crate::echo::SQL_TARGET, "connected to {}", self.url);
                } else {
                    tracing::debug!(target: crate::echo::SQL_TARGET, "connected to {}", self.url);
                }
                Ok(slot)
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
        // Back in its slot even when the ping failed: the pool then drops
        // the slot, which detaches the canceller before closing it.
        slot.conn = Some(conn);
        pinged?;
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
