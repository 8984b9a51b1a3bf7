//! Cancellation that reaches the server: stopping the statement a pooled
//! connection is running, from another thread.
//!
//! When the future of an operation is dropped (a `tokio::time::timeout`
//! fired, a `select!` branch lost, a client hung up) or its deadline passes
//! while the blocking task is still inside the user's closure, the engine
//! asks the connection's [`Canceller`] to stop the statement that is running
//! on the server. The statement then fails in the closure, the task rolls
//! back and the connection comes back to the pool within the server's
//! reaction time, instead of when the statement would have ended by itself.
//!
//! # Per backend
//!
//! - **PostgreSQL**: `SELECT pg_cancel_backend(pid)` over a short-lived side
//!   connection to the same URL; the pid is read with
//!   `SELECT pg_backend_pid()` when the pooled connection is opened. (libpq's
//!   own `PQcancel` would need the connection's `PGconn*`, which Diesel does
//!   not expose.) The cancelled statement fails with *canceling statement due
//!   to user request*, and the transaction is aborted, so any later statement
//!   of the closure fails at once too.
//! - **MySQL/MariaDB**: `KILL QUERY <id>` over a side connection; the id is
//!   `SELECT CONNECTION_ID()` at open. `KILL QUERY` sent to a connection that
//!   is between statements does nothing (checked on MariaDB 10.11). The
//!   process sends one `KILL` at a time to each server, a few
//!   milliseconds apart: two at once can stop a `SLEEP()` 2 s late on
//!   MariaDB (see `kill_turn`). The
//!   killed statement fails with *Query execution was interrupted* (what
//!   Diesel saw for a killed `SLEEP()` on MariaDB 10.11; some versions
//!   return 1 from it instead): either way the engine never trusts the
//!   result of a cancelled operation, it rolls back whatever it did. A
//!   connection whose statement was interrupted is then closed, not pooled:
//!   cut while its result was on its way, libmysqlclient's prepared
//!   statement (cached by Diesel) would wait forever on its next execution.
//! - **SQLite**: `sqlite3_interrupt` on the connection's `sqlite3*`. Diesel
//!   2.3 does not expose the handle, so the engine registers (once per
//!   process) an SQLite *auto extension*, which SQLite calls on the opening
//!   thread with the handle of every connection opened afterwards; it records
//!   the handle in a thread-local, which `PoolableConnection::connect` of
//!   `SqliteConnection` takes right after opening. `sqlite3_interrupt` was
//!   chosen over a progress handler because it costs nothing while no
//!   cancellation happens (a progress handler runs every N VM steps of every
//!   statement) and needs nothing installed per statement. It must not race
//!   the connection's close: the handle lives behind a mutex that the pool
//!   clears ([`Canceller`]'s detach hook) before the connection is dropped,
//!   and an interrupt is only sent while an operation runs its `BEGIN` or
//!   user code.
//!
//!   `sqlite3_interrupt` does not stop a wait for a lock (SQLite's busy
//!   handler), and every transaction of the engine begins with
//!   `BEGIN IMMEDIATE`, which waits for the write lock while another
//!   connection holds it. So the canceller also installs a busy handler of
//!   its own in place of the 5 s busy timeout: it waits in steps of 1 ms
//!   growing to 10 ms, 5 s in all as before, and gives up (the statement
//!   fails with `SQLITE_BUSY`) as soon as the connection's cancel flag is
//!   set. The canceller sets that flag with the interrupt; the next
//!   operation clears it when it starts ([`OpWatch::enter`]), and so does
//!   the end of the user's closure ([`OpWatch::leave`]), so neither a later
//!   operation nor the engine's own `COMMIT`/`ROLLBACK` is ever cut short
//!   by a stale cancel. (A `PRAGMA busy_timeout` run by the user's code
//!   replaces the handler, and with it that bound.)
//!
//! # What is cancelled, and when
//!
//! The user's closure is cancelled, and the engine's own `BEGIN` before it
//! (a `BEGIN` that fails loses no work; on SQLite it may wait seconds for
//! the write lock, and a deadline must bound that wait too); never the
//! engine's `COMMIT` or `ROLLBACK`: an operation's [`OpWatch`] records
//! whether the blocking task is in its `BEGIN` or the closure, and the
//! task, once the closure returns (or `BEGIN` fails), waits (at most
//! [`CANCEL_WAIT`]) for a cancel request in flight to be delivered before
//! it sends its `ROLLBACK` or `COMMIT`; one still on its way after that
//! has the connection closed instead of pooled again, so that it cannot
//! land on a later statement (there is no `COMMIT` with a cancel in flight:
//! a cancelled operation never commits). A connection closed anyway (an
//! interrupted MySQL statement) does not wait at all.
//! A statement that
//! ignores the first request (SQLite between two statements, a closure that
//! catches the error and goes on) gets another, at growing intervals, for as
//! long as the closure runs. A closure still running [`TERMINATE_AFTER`]
//! after the first request has its connection terminated on the server
//! where the canceller can ([`Canceller::or_terminate`]: PostgreSQL
//! `pg_terminate_backend`, MySQL `KILL CONNECTION`): its next read fails,
//! and the pool replaces the connection. The side-connection work runs on
//! tokio's blocking pool, never on an async worker.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// The error a [`Canceller`] reports when it could not deliver a cancel.
pub type CancelError = Box<dyn std::error::Error + Send + Sync>;

type CancelFn = dyn Fn() -> Result<(), CancelError> + Send + Sync;
type DetachFn = dyn Fn() + Send + Sync;

/// Cancels the statement one pooled connection is running, from another
/// thread: what [`PoolableConnection::canceller`](crate::PoolableConnection::canceller)
/// returns. Cheap to clone.
///
/// ```
/// use diesel_runsync::Canceller;
/// let canceller = Canceller::new(|| {
///     // e.g. open a side connection and send the server's cancel statement
///     Ok(())
/// });
/// canceller.cancel().unwrap();
/// ```
#[derive(Clone)]
pub struct Canceller {
    inner: Arc<CancellerInner>,
}

struct CancellerInner {
    cancel: Box<CancelFn>,
    terminate: Option<Box<CancelFn>>,
    detach: Option<Box<DetachFn>>,
    /// Forgets earlier cancels (SQLite: clears the busy handler's flag).
    reset: Option<Box<DetachFn>>,
}

impl std::fmt::Debug for Canceller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Canceller")
            .field("terminate", &self.inner.terminate.is_some())
            .field("detach", &self.inner.detach.is_some())
            .field("reset", &self.inner.reset.is_some())
            .finish_non_exhaustive()
    }
}

impl Canceller {
    /// A canceller that runs `cancel` to stop the statement the connection
    /// is running. `cancel` is called on tokio's blocking pool (it may open
    /// a connection); when no statement is running it must do nothing harmful.
    pub fn new(cancel: impl Fn() -> Result<(), CancelError> + Send + Sync + 'static) -> Self {
        Canceller {
            inner: Arc::new(CancellerInner {
                cancel: Box::new(cancel),
                terminate: None,
                detach: None,
                reset: None,
            }),
        }
    }

    /// Adds `detach`, called just before the pool closes the connection;
    /// after it, `cancel` must not touch the connection any more (SQLite
    /// clears the handle `sqlite3_interrupt` would use).
    pub fn on_close(self, detach: impl Fn() + Send + Sync + 'static) -> Self {
        self.rebuilt(|inner| inner.detach = Some(Box::new(detach)))
    }

    /// Adds `terminate`, which ends the connection's session on the server
    /// (PostgreSQL `pg_terminate_backend`, MySQL `KILL CONNECTION`): sent
    /// instead of `cancel` once the user's closure has kept running for
    /// [`TERMINATE_AFTER`] after the first cancel. Called on tokio's
    /// blocking pool, at most once per operation.
    pub fn or_terminate(
        self,
        terminate: impl Fn() -> Result<(), CancelError> + Send + Sync + 'static,
    ) -> Self {
        self.rebuilt(|inner| inner.terminate = Some(Box::new(terminate)))
    }

    /// Adds `reset`, called when an operation starts and when its closure
    /// has returned: an earlier `cancel` must not affect what runs next
    /// (SQLite clears the flag its busy handler gives up on).
    pub(crate) fn on_reset(self, reset: impl Fn() + Send + Sync + 'static) -> Self {
        self.rebuilt(|inner| inner.reset = Some(Box::new(reset)))
    }

    /// This canceller with `change` applied (to a copy of its parts if it
    /// is shared: the clones keep what they had).
    fn rebuilt(self, change: impl FnOnce(&mut CancellerInner)) -> Self {
        let mut inner = match Arc::try_unwrap(self.inner) {
            Ok(inner) => inner,
            Err(shared) => {
                let (cancel, terminate, detach, reset) =
                    (shared.clone(), shared.clone(), shared.clone(), shared);
                CancellerInner {
                    cancel: Box::new(move || (cancel.cancel)()),
                    terminate: terminate.terminate.is_some().then(|| {
                        Box::new(move || terminate.terminate.as_ref().map_or(Ok(()), |t| t()))
                            as Box<CancelFn>
                    }),
                    detach: detach.detach.is_some().then(|| {
                        Box::new(move || {
                            if let Some(d) = &detach.detach {
                                d();
                            }
                        }) as Box<DetachFn>
                    }),
                    reset: reset.reset.is_some().then(|| {
                        Box::new(move || {
                            if let Some(r) = &reset.reset {
                                r();
                            }
                        }) as Box<DetachFn>
                    }),
                }
            }
        };
        change(&mut inner);
        Canceller {
            inner: Arc::new(inner),
        }
    }

    /// Cancels the statement running now, if any. Blocking.
    pub fn cancel(&self) -> Result<(), CancelError> {
        (self.inner.cancel)()
    }

    /// Terminates the connection's session on the server, or cancels its
    /// statement if no `terminate` was given. Blocking.
    pub fn terminate(&self) -> Result<(), CancelError> {
        match &self.inner.terminate {
            Some(terminate) => terminate(),
            None => self.cancel(),
        }
    }

    /// Tells the canceller its connection is about to be closed.
    pub(crate) fn detach(&self) {
        if let Some(detach) = &self.inner.detach {
            detach();
        }
    }

    /// Forgets earlier cancels: what runs next on the connection is not
    /// affected by them.
    pub(crate) fn reset(&self) {
        if let Some(reset) = &self.inner.reset {
            reset();
        }
    }
}

/// How long the blocking task, once the user's closure has returned, waits
/// for a cancel request already on its way before it goes on to roll back.
/// A request still on its way then has the connection closed instead of
/// pooled again (it could cut short the next statement sent on it):
/// MariaDB sometimes answers a `KILL QUERY` seconds late (seen in
/// `runsync-tests/tests/cancel.rs`'s runs under load).
pub(crate) const CANCEL_WAIT: Duration = Duration::from_millis(200);

/// How long a closure may keep running after the first cancel request
/// before its connection is terminated (where [`Canceller::or_terminate`]
/// was given).
pub const TERMINATE_AFTER: Duration = Duration::from_secs(5);

/// Why an operation was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    /// The awaiting future was dropped: nobody takes the result.
    Dropped,
    /// The operation's deadline passed.
    Timeout,
}

/// Where an operation's blocking task stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Queued, or running the engine's own setup (the statement timeout).
    Before,
    /// Running the engine's `BEGIN`, if any, then the user's closure: the
    /// only time a cancel is sent.
    User,
    /// The closure has returned.
    After,
}

struct Shared {
    phase: Phase,
    reason: Option<Reason>,
    /// A cancel request is being delivered right now.
    delivering: bool,
    /// When the first cancel request was delivered.
    first_delivered: Option<Instant>,
    /// The connection was terminated: nothing more to send.
    terminated: bool,
}

/// What the blocking task and the async side of one operation share about
/// cancelling it.
pub(crate) struct OpWatch {
    shared: Mutex<Shared>,
    delivered: Condvar,
    /// The connection's canceller: given when the watch is made, or bound
    /// ([`OpWatch::bind`]) when a queued unit gets its connection.
    canceller: OnceLock<Canceller>,
    /// Counts the cancels and terminations sent (`db.runsync.cancels`).
    observe: Option<Arc<crate::observe::Observe>>,
}

impl OpWatch {
    #[cfg(test)]
    pub(crate) fn new(canceller: Option<Canceller>) -> Arc<Self> {
        Self::observed(canceller, None)
    }

    /// A watch whose cancels, when sent, are counted in `observe`.
    pub(crate) fn observed(
        canceller: Option<Canceller>,
        observe: Option<Arc<crate::observe::Observe>>,
    ) -> Arc<Self> {
        Arc::new(OpWatch {
            shared: Mutex::new(Shared {
                phase: Phase::Before,
                reason: None,
                delivering: false,
                first_delivered: None,
                terminated: false,
            }),
            delivered: Condvar::new(),
            canceller: canceller.map(OnceLock::from).unwrap_or_default(),
            observe,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Binds the canceller of the connection the operation got, for a
    /// watch made before it had one (a unit queued for a busy engine).
    /// Called before [`enter`](Self::enter), on the thread that runs it.
    pub(crate) fn bind(&self, canceller: Option<Canceller>) {
        if let Some(canceller) = canceller {
            let _ = self.canceller.set(canceller);
        }
    }

    /// Why the operation was cancelled, if it was.
    pub(crate) fn reason(&self) -> Option<Reason> {
        self.lock().reason
    }

    /// The blocking task is about to send its `BEGIN` (if it needs one)
    /// and call the user's closure: from now on a cancel is delivered.
    /// Clears the connection's earlier cancels ([`Canceller::reset`]).
    /// False if the operation was cancelled already: neither must run.
    pub(crate) fn enter(&self) -> bool {
        let mut shared = self.lock();
        if shared.reason.is_some() {
            shared.phase = Phase::After;
            return false;
        }
        if let Some(canceller) = self.canceller.get() {
            // No cancel of this operation can be under way yet (none is
            // delivered before `User`), and one of an earlier operation is
            // over (its `leave` waited for it).
            canceller.reset();
        }
        shared.phase = Phase::User;
        true
    }

    /// The user's closure has returned (or `BEGIN` failed): no cancel is
    /// sent from now on, and one being delivered is waited for (at most
    /// [`CANCEL_WAIT`]), so that it cannot land on the engine's own
    /// `ROLLBACK` or `COMMIT`; then the connection's cancel is cleared
    /// ([`Canceller::reset`]) so that it cannot cut them short either.
    /// Returns true when a cancel is still on its way: the connection
    /// must then be closed, not reused.
    ///
    /// `closing`: the connection will be closed anyway (a MySQL statement
    /// interrupted: a cancel has landed); a cancel on its way is not
    /// waited for.
    pub(crate) fn leave(&self, closing: bool) -> bool {
        let mut shared = self.lock();
        shared.phase = Phase::After;
        if shared.delivering && !closing {
            shared = self
                .delivered
                .wait_timeout_while(shared, CANCEL_WAIT, |s| s.delivering)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if let Some(canceller) = self.canceller.get() {
            canceller.reset();
        }
        shared.delivering
    }

    /// Cancels the operation: marks it (the first reason wins) and, if its
    /// `BEGIN` or closure is running, stops the statement on the server from
    /// tokio's blocking pool, again at growing intervals while it runs on.
    /// Never blocks the calling thread.
    pub(crate) fn cancel(self: &Arc<Self>, reason: Reason) {
        let running = {
            let mut shared = self.lock();
            if shared.phase == Phase::After {
                return;
            }
            shared.reason.get_or_insert(reason);
            shared.phase == Phase::User
        };
        if running && self.canceller.get().is_some() {
            let watch = self.clone();
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(async move { watch.keep_cancelling().await });
                }
                Err(_) => {
                    // No runtime (dropped during shutdown): a plain thread.
                    std::thread::spawn(move || {
                        let mut pause = Duration::from_millis(50);
                        while watch.deliver() {
                            std::thread::sleep(pause);
                            pause = (pause * 2).min(Duration::from_secs(1));
                        }
                    });
                }
            }
        }
    }

    /// Sends cancel requests until the closure has returned: at once, then
    /// after 50 ms, 100 ms, ... up to one a second.
    async fn keep_cancelling(self: Arc<Self>) {
        let mut pause = Duration::from_millis(50);
        loop {
            let watch = self.clone();
            match tokio::task::spawn_blocking(move || watch.deliver()).await {
                Ok(true) => {}
                _ => return,
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// Delivers one cancel request if the closure is still running.
    /// Blocking. Returns whether the closure was running.
    fn deliver(&self) -> bool {
        let Some(canceller) = self.canceller.get() else {
            return false;
        };
        let terminate = {
            let mut shared = self.lock();
            if shared.phase != Phase::User || shared.terminated {
                return false;
            }
            shared.delivering = true;
            let first = *shared.first_delivered.get_or_insert_with(Instant::now);
            canceller.inner.terminate.is_some() && first.elapsed() >= TERMINATE_AFTER
        };
        let sent = if terminate {
            tracing::warn!(
                "a cancelled closure still runs {TERMINATE_AFTER:?} after the first cancel: \
                 terminating its connection"
            );
            canceller.terminate()
        } else {
            canceller.cancel()
        };
        match sent {
            Err(e) => tracing::warn!("could not cancel a running statement: {e}"),
            Ok(()) => {
                if let Some(observe) = &self.observe {
                    observe.cancel_sent(terminate);
                }
            }
        }
        let mut shared = self.lock();
        shared.delivering = false;
        shared.terminated |= terminate;
        self.delivered.notify_all();
        shared.phase == Phase::User && !shared.terminated
    }
}

/// The PostgreSQL canceller: `pg_cancel_backend` from a side connection,
/// aimed at this connection's backend and no other.
///
/// The backend is named by its pid *and its start time*, read when the
/// connection opens, and the side connection only signals a backend that
/// matches both: after a failover the side connection may reach another
/// server, where the same pid is someone else's, and a pid is reused once
/// its backend exits. Behind a transaction-mode pooler (PgBouncer) a pid
/// names whichever client holds that server connection now, so there is no
/// canceller at all: when the URL or the engine says so
/// ([`DatabaseUrl::transaction_pooler`](crate::DatabaseUrl::transaction_pooler)), or
/// when the server's port is not one the URL names (a proxy is in between);
/// the prepared statement cache is then turned off too. Deadlines still
/// hold there: the server enforces them (`SET LOCAL statement_timeout`),
/// and a caller gives up a connection that does not come back in time.
#[cfg(feature = "postgres")]
pub(crate) fn postgres(
    conn: &mut diesel::PgConnection,
    url: &crate::DatabaseUrl,
) -> Option<Canceller> {
    use diesel::prelude::*;
    #[derive(QueryableByName)]
    struct Backend {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        pid: i32,
        #[diesel(sql_type = diesel::sql_types::Text)]
        started: String,
        #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Integer>)]
        port: Option<i32>,
    }
    if url.transaction_pooler() == Some(true) {
        return None;
    }
    let me: Backend = diesel::sql_query(
        "SELECT pid, CAST(backend_start AS text) AS started, inet_server_port() AS port \
         FROM pg_stat_activity WHERE pid = pg_backend_pid()",
    )
    .get_result(conn)
    .map_err(|e| tracing::warn!("no server-side cancel for this connection: {e}"))
    .ok()?;
    if url.transaction_pooler().is_none()
        && let Some(port) = me.port
        && !url.ports().contains(&(port as u16))
    {
        tracing::info!(
            "{url}: the server listens on port {port}, which the URL does not name: a proxy or \
             pooler is in between, so this connection has no server-side cancel and no \
             prepared statement cache (add pgbouncer=false to the URL if it is not a \
             transaction-mode pooler)"
        );
        conn.set_prepared_statement_cache_size(diesel::connection::CacheSize::Disabled);
        return None;
    }
    let url = url.clone();
    let (pid, started) = (me.pid, me.started);
    let side = move |function: &str| -> Result<(), CancelError> {
        let mut side = diesel::PgConnection::establish(&side_url(&url))
            .map_err(|e| url.scrub(&e.to_string()))?;
        diesel::sql_query(format!(
            "SELECT {function}(pid) FROM pg_stat_activity \
             WHERE pid = {pid} AND backend_start = CAST($1 AS timestamptz)"
        ))
        .bind::<diesel::sql_types::Text, _>(&started)
        .execute(&mut side)?;
        Ok(())
    };
    let side = Arc::new(side);
    let terminate = side.clone();
    Some(
        Canceller::new(move || side("pg_cancel_backend"))
            .or_terminate(move || terminate("pg_terminate_backend")),
    )
}

/// The URL of a PostgreSQL side connection: the pooled one's, with a
/// 5-second `connect_timeout` where it sets none, so a cancel aimed at a
/// server that does not answer gives up instead of holding a thread.
#[cfg(feature = "postgres")]
fn side_url(url: &crate::DatabaseUrl) -> String {
    let raw = url.expose();
    if url.param("connect_timeout").is_some() {
        raw.to_owned()
    } else if raw.contains('?') {
        format!("{raw}&connect_timeout=5")
    } else {
        format!("{raw}?connect_timeout=5")
    }
}

/// The MySQL/MariaDB canceller: `KILL QUERY` from a side connection.
#[cfg(feature = "mysql")]
pub(crate) fn mysql(
    conn: &mut diesel::MysqlConnection,
    url: &crate::DatabaseUrl,
) -> Option<Canceller> {
    use diesel::connection::SimpleConnection as _;
    use diesel::prelude::*;
    let id: i64 = diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>(
        "CAST(CONNECTION_ID() AS SIGNED)",
    ))
    .get_result(conn)
    .map_err(|e| tracing::warn!("no server-side cancel for this connection: {e}"))
    .ok()?;
    let url = url.clone();
    let turn = kill_turn(&url);
    let side = move |kill: &str| -> Result<(), CancelError> {
        let mut side = diesel::MysqlConnection::establish(url.expose())
            .map_err(|e| url.scrub(&e.to_string()))?;
        let mut last = turn.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(wait) =
            last.and_then(|at| (at + KILL_SPACING).checked_duration_since(Instant::now()))
        {
            std::thread::sleep(wait);
        }
        let killed = side.batch_execute(&format!("KILL {kill} {id}"));
        *last = Some(Instant::now());
        drop(last);
        killed?;
        Ok(())
    };
    let side = Arc::new(side);
    let terminate = side.clone();
    Some(Canceller::new(move || side("QUERY")).or_terminate(move || terminate("CONNECTION")))
}

/// How long after one `KILL` to a MySQL/MariaDB server this process sends
/// the next ([`kill_turn`]).
#[cfg(feature = "mysql")]
const KILL_SPACING: Duration = Duration::from_millis(5);

/// The turn every `KILL` this process sends to one MySQL/MariaDB server
/// (host and port) waits for, holding when the last one was answered: one
/// at a time, [`KILL_SPACING`] apart.
///
/// MariaDB (10.11 here) wakes a statement in `SLEEP()` with a loop that
/// tries the server-wide mutex of `SLEEP()` for at most 2 s
/// (`THD::abort_current_cond_wait`). A `KILL QUERY` that finds that mutex
/// taken, by another statement woken a moment before, can wait the whole
/// loop out while its own victim waits for it: the statement stops 2 s
/// late. Without the turn, `statements_dropped_at_once_all_stop`
/// (runsync-tests/tests/cancel.rs: eight statements dropped at the same
/// instant) failed so in every run on MariaDB 10.11; sent back to back, the
/// `KILL`s still met the taken mutex now and then; a few milliseconds apart
/// they have not. A lone `KILL` does not wait, and the side connection is
/// opened before the turn is taken.
#[cfg(feature = "mysql")]
fn kill_turn(url: &crate::DatabaseUrl) -> Arc<Mutex<Option<Instant>>> {
    type Server = (Option<String>, Option<u16>);
    type Turns = std::collections::HashMap<Server, Arc<Mutex<Option<Instant>>>>;
    static TURNS: OnceLock<Mutex<Turns>> = OnceLock::new();
    let (address, port, _) = url.location();
    TURNS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry((address, port))
        .or_default()
        .clone()
}

/// SQLite: `sqlite3_interrupt` on the handle an auto extension recorded,
/// and a busy handler that gives up a lock wait once cancelled.
#[cfg(feature = "sqlite")]
pub(crate) mod sqlite {
    use std::cell::Cell;
    use std::ffi::{c_char, c_int, c_void};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex, Once};
    use std::time::Duration;

    use libsqlite3_sys as ffi;

    use super::Canceller;

    thread_local! {
        /// The handle of the SQLite connection opened last on this thread.
        static OPENED: Cell<*mut ffi::sqlite3> = const { Cell::new(std::ptr::null_mut()) };
        /// The handle `SqliteConnection::connect` took, until `canceller` takes it.
        static CONNECTED: Cell<*mut ffi::sqlite3> = const { Cell::new(std::ptr::null_mut()) };
    }

    /// Called by SQLite on the opening thread for every connection opened
    /// after registration: records the handle, loads nothing.
    unsafe extern "C" fn record_handle(
        db: *mut ffi::sqlite3,
        _error: *mut *mut c_char,
        _api: *const ffi::sqlite3_api_routines,
    ) -> c_int {
        OPENED.with(|opened| opened.set(db));
        ffi::SQLITE_OK
    }

    /// Registers the auto extension, once per process.
    fn register() {
        static REGISTER: Once = Once::new();
        REGISTER.call_once(|| {
            // SAFETY: `record_handle` has the entry-point signature SQLite
            // expects, lives for the whole process, and only writes a
            // thread-local.
            let rc = unsafe { ffi::sqlite3_auto_extension(Some(record_handle)) };
            if rc != ffi::SQLITE_OK {
                tracing::warn!("sqlite3_auto_extension failed ({rc}): no cancel for SQLite");
            }
        });
    }

    /// Opens a connection with `open` and keeps its handle for
    /// [`canceller`]: called by `SqliteConnection::connect`.
    pub(crate) fn opening<T>(open: impl FnOnce() -> T) -> T {
        register();
        OPENED.with(|opened| opened.set(std::ptr::null_mut()));
        let result = open();
        let handle = OPENED.with(|opened| opened.replace(std::ptr::null_mut()));
        CONNECTED.with(|connected| connected.set(handle));
        result
    }

    /// The raw handle, sendable: only ever used under the mutex, and
    /// cleared before its connection is closed.
    struct Handle(*mut ffi::sqlite3);

    // SAFETY: `sqlite3_interrupt` is documented safe to call from any
    // thread while the connection is open; the mutex and the detach hook
    // guarantee it is never called after the close.
    unsafe impl Send for Handle {}

    /// How long the busy handler waits for a lock in all: the 5 s of the
    /// `PRAGMA busy_timeout` it replaces.
    pub(crate) const BUSY_LIMIT: Duration = Duration::from_millis(5000);

    /// The longest single pause of the busy handler: how late, at most, it
    /// notices a cancel.
    const BUSY_STEP: Duration = Duration::from_millis(10);

    /// The pause before the busy handler's `count`-th retry (from 0):
    /// 1, 2, 4, 8, then 10 ms.
    fn busy_pause(count: u32) -> Duration {
        Duration::from_millis(1 << count.min(4)).min(BUSY_STEP)
    }

    /// The time paused before the `count`-th call of the busy handler for
    /// one lock: the sum of the pauses before it.
    fn busy_waited(count: u32) -> Duration {
        match count {
            0..=4 => Duration::from_millis((1 << count) - 1),
            _ => Duration::from_millis(15) + BUSY_STEP * (count - 4),
        }
    }

    /// SQLite's busy handler for the engine's connections: called on the
    /// thread running the statement while another connection holds the lock
    /// it needs, with how often it was called for that lock before. Waits a
    /// step and asks SQLite to retry (nonzero), or gives up (0: the statement
    /// fails with `SQLITE_BUSY`) once [`BUSY_LIMIT`] is spent or the
    /// connection's canceller was asked to cancel.
    unsafe extern "C" fn busy(cancelled: *mut c_void, count: c_int) -> c_int {
        // SAFETY: the argument is the `&'static AtomicBool` `canceller`
        // installed with this handler (leaked: never freed).
        let cancelled = unsafe { &*(cancelled as *const AtomicBool) };
        let count = u32::try_from(count).unwrap_or(0);
        if cancelled.load(Ordering::Acquire) || busy_waited(count) >= BUSY_LIMIT {
            return 0;
        }
        std::thread::sleep(busy_pause(count).min(BUSY_LIMIT - busy_waited(count)));
        c_int::from(!cancelled.load(Ordering::Acquire))
    }

    /// The canceller of the connection `SqliteConnection::connect` opened
    /// last on this thread, if its handle was recorded. Installs the busy
    /// handler that gives up once cancelled (replacing the connection's
    /// busy timeout): called once, right after connect, while the
    /// connection is used by nobody else.
    pub(crate) fn canceller() -> Option<Canceller> {
        let raw = CONNECTED.with(|connected| connected.replace(std::ptr::null_mut()));
        if raw.is_null() {
            return None;
        }
        // The busy handler's argument must stay valid until the connection
        // is closed, and nothing here runs after the close: the pool's
        // detach runs before it on most paths, but not all (a connection
        // whose ping `is_valid` was cut off closes in its blocking task
        // whenever the ping ends), and resetting the handler on a closed
        // handle would be a use after free. So the flag is leaked: one byte
        // (one small allocation) per connection the process ever opens,
        // which outlives every use, with no ordering to get right.
        let cancelled: &'static AtomicBool = Box::leak(Box::new(AtomicBool::new(false)));
        // SAFETY: `raw` is open and used by no other thread yet; `busy`
        // has the signature SQLite expects and its argument lives forever.
        let rc = unsafe {
            ffi::sqlite3_busy_handler(
                raw,
                Some(busy),
                std::ptr::from_ref(cancelled).cast_mut().cast(),
            )
        };
        if rc != ffi::SQLITE_OK {
            tracing::warn!(
                "sqlite3_busy_handler failed ({rc}): a cancel will not stop a wait for a lock"
            );
        }
        let handle = Arc::new(Mutex::new(Some(Handle(raw))));
        let detach = handle.clone();
        Some(
            Canceller::new(move || {
                // First the flag, for a statement waiting for a lock (which
                // `sqlite3_interrupt` does not stop), then the interrupt.
                cancelled.store(true, Ordering::Release);
                let guard = handle.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(Handle(db)) = guard.as_ref() {
                    // SAFETY: the connection is open: the handle is cleared
                    // (under this mutex) before the pool closes it.
                    unsafe { ffi::sqlite3_interrupt(*db) };
                }
                Ok(())
            })
            .on_reset(move || cancelled.store(false, Ordering::Release))
            .on_close(move || {
                detach.lock().unwrap_or_else(|e| e.into_inner()).take();
            }),
        )
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn the_busy_pauses_add_up_to_the_limit_in_small_steps() {
            let mut waited = Duration::ZERO;
            let mut count = 0;
            while busy_waited(count) < BUSY_LIMIT {
                assert_eq!(busy_waited(count), waited, "before call {count}");
                assert!(busy_pause(count) <= BUSY_STEP);
                waited += busy_pause(count);
                count += 1;
            }
            assert!(waited >= BUSY_LIMIT && waited < BUSY_LIMIT + BUSY_STEP);
            assert_eq!(busy_pause(0), Duration::from_millis(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn a_watch_cancels_only_inside_the_closure() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let canceller = Canceller::new(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            Ok(())
        });
        // Cancelled before the closure: it must not run, and nothing is sent.
        let watch = OpWatch::new(Some(canceller.clone()));
        watch.cancel(Reason::Dropped);
        assert!(!watch.enter());
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        // Inside the closure: delivered.
        let watch = OpWatch::new(Some(canceller.clone()));
        assert!(watch.enter());
        assert!(watch.deliver());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(!watch.leave(false));
        assert_eq!(watch.reason(), None);
        // After the closure: never.
        assert!(!watch.deliver());
        watch.cancel(Reason::Timeout);
        assert_eq!(watch.reason(), None);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_watch_forgets_earlier_cancels_when_it_enters_and_leaves() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let (c, r) = (log.clone(), log.clone());
        let canceller = Canceller::new(move || {
            c.lock().unwrap().push("cancel");
            Ok(())
        })
        .on_reset(move || r.lock().unwrap().push("reset"));
        let watch = OpWatch::new(Some(canceller.clone()));
        assert!(watch.enter());
        assert!(watch.deliver());
        assert!(!watch.leave(false));
        assert_eq!(*log.lock().unwrap(), ["reset", "cancel", "reset"]);
        // Cancelled before it entered: nothing runs, nothing is reset.
        log.lock().unwrap().clear();
        let watch = OpWatch::new(Some(canceller.clone()));
        watch.cancel(Reason::Timeout);
        assert!(!watch.enter());
        assert!(log.lock().unwrap().is_empty());
        // A shared canceller rebuilt keeps its reset.
        let rebuilt = canceller.clone().on_close(|| {});
        rebuilt.reset();
        assert_eq!(*log.lock().unwrap(), ["reset"]);
    }

    /// A cancel answered late (MariaDB's `KILL QUERY`, seconds): the
    /// closure's end waits [`CANCEL_WAIT`] for it, then says the
    /// connection must be closed; one closed anyway does not wait.
    #[test]
    fn a_cancel_answered_late_closes_the_connection() {
        let answer = Duration::from_millis(1500);
        let canceller = Canceller::new(move || {
            std::thread::sleep(answer);
            Ok(())
        });
        for closing in [false, true] {
            let watch = OpWatch::new(Some(canceller.clone()));
            assert!(watch.enter());
            let delivering = watch.clone();
            let delivery = std::thread::spawn(move || delivering.deliver());
            while !watch.lock().delivering {
                std::thread::yield_now();
            }
            let left = Instant::now();
            assert!(watch.leave(closing), "closing: {closing}");
            let waited = left.elapsed();
            if closing {
                assert!(waited < CANCEL_WAIT / 2, "{waited:?}");
            } else {
                assert!(waited >= CANCEL_WAIT && waited < answer, "{waited:?}");
            }
            assert!(!delivery.join().unwrap());
        }
        // Answered within the wait: the connection may be reused.
        let quick = Canceller::new(|| {
            std::thread::sleep(Duration::from_millis(20));
            Ok(())
        });
        let watch = OpWatch::new(Some(quick));
        assert!(watch.enter());
        let delivering = watch.clone();
        let delivery = std::thread::spawn(move || delivering.deliver());
        while !watch.lock().delivering {
            std::thread::yield_now();
        }
        assert!(!watch.leave(false));
        delivery.join().unwrap();
    }

    #[test]
    fn on_close_keeps_the_cancel() {
        let calls = Arc::new(AtomicUsize::new(0));
        let (counted, detached) = (calls.clone(), calls.clone());
        let canceller = Canceller::new(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .on_close(move || {
            detached.fetch_add(10, Ordering::SeqCst);
        });
        canceller.cancel().unwrap();
        canceller.detach();
        assert_eq!(calls.load(Ordering::SeqCst), 11);
    }

    #[test]
    fn a_shared_canceller_rebuilt_keeps_every_part() {
        let calls = Arc::new(AtomicUsize::new(0));
        let (c, t, d) = (calls.clone(), calls.clone(), calls.clone());
        let original = Canceller::new(move || {
            c.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .or_terminate(move || {
            t.fetch_add(100, Ordering::SeqCst);
            Ok(())
        });
        // Shared: `on_close` cannot take the parts, it wraps them.
        let clone = original.clone();
        let rebuilt = clone.on_close(move || {
            d.fetch_add(10_000, Ordering::SeqCst);
        });
        rebuilt.cancel().unwrap();
        rebuilt.terminate().unwrap();
        rebuilt.detach();
        assert_eq!(calls.load(Ordering::SeqCst), 10_101);
        // The original is unchanged: no detach.
        original.detach();
        assert_eq!(calls.load(Ordering::SeqCst), 10_101);
        // Without `or_terminate`, terminating cancels.
        let plain_calls = Arc::new(AtomicUsize::new(0));
        let p = plain_calls.clone();
        let plain = Canceller::new(move || {
            p.fetch_add(1, Ordering::SeqCst);
            Ok(())
        });
        plain.terminate().unwrap();
        assert_eq!(plain_calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_closure_that_runs_on_gets_terminated_once() {
        let calls = Arc::new(AtomicUsize::new(0));
        let (c, t) = (calls.clone(), calls.clone());
        let canceller = Canceller::new(move || {
            c.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .or_terminate(move || {
            t.fetch_add(100, Ordering::SeqCst);
            Ok(())
        });
        let watch = OpWatch::new(Some(canceller));
        assert!(watch.enter());
        assert!(watch.deliver());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Pretend the first cancel went out TERMINATE_AFTER ago.
        watch.lock().first_delivered = Some(Instant::now() - TERMINATE_AFTER);
        assert!(!watch.deliver(), "nothing more to send once terminated");
        assert_eq!(calls.load(Ordering::SeqCst), 101);
        assert!(!watch.deliver());
        assert_eq!(calls.load(Ordering::SeqCst), 101);
    }
}
