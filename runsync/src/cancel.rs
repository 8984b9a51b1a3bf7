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
//!   and an interrupt is only sent while an operation is inside user code.
//!
//! # What is cancelled, and when
//!
//! Only the user's closure is ever cancelled, never the engine's own
//! `BEGIN`, `COMMIT` or `ROLLBACK`: an operation's [`OpWatch`] records
//! whether the blocking task is inside the closure, and the task, once the
//! closure returns, waits (at most [`CANCEL_WAIT`]) for a cancel request in
//! flight to be delivered before it sends its `ROLLBACK`. A statement that
//! ignores the first request (SQLite between two statements, a closure that
//! catches the error and goes on) gets another, at growing intervals, for as
//! long as the closure runs. A closure still running [`TERMINATE_AFTER`]
//! after the first request has its connection terminated on the server
//! where the canceller can ([`Canceller::or_terminate`]: PostgreSQL
//! `pg_terminate_backend`, MySQL `KILL CONNECTION`): its next read fails,
//! and the pool replaces the connection. The side-connection work runs on
//! tokio's blocking pool, never on an async worker.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
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
}

impl std::fmt::Debug for Canceller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Canceller")
            .field("terminate", &self.inner.terminate.is_some())
            .field("detach", &self.inner.detach.is_some())
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

    /// This canceller with `change` applied (to a copy of its parts if it
    /// is shared: the clones keep what they had).
    fn rebuilt(self, change: impl FnOnce(&mut CancellerInner)) -> Self {
        let mut inner = match Arc::try_unwrap(self.inner) {
            Ok(inner) => inner,
            Err(shared) => {
                let (cancel, terminate, detach) = (shared.clone(), shared.clone(), shared);
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
}

/// How long the blocking task, once the user's closure has returned, waits
/// for a cancel request already on its way before it goes on to roll back.
pub(crate) const CANCEL_WAIT: Duration = Duration::from_secs(2);

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
    /// Queued, or running the engine's own statements before the closure.
    Before,
    /// Inside the user's closure: the only time a cancel is sent.
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
    canceller: Option<Canceller>,
}

impl OpWatch {
    pub(crate) fn new(canceller: Option<Canceller>) -> Arc<Self> {
        Arc::new(OpWatch {
            shared: Mutex::new(Shared {
                phase: Phase::Before,
                reason: None,
                delivering: false,
                first_delivered: None,
                terminated: false,
            }),
            delivered: Condvar::new(),
            canceller,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Why the operation was cancelled, if it was.
    pub(crate) fn reason(&self) -> Option<Reason> {
        self.lock().reason
    }

    /// The blocking task is about to call the user's closure. False if the
    /// operation was cancelled already: the closure must not run.
    pub(crate) fn enter(&self) -> bool {
        let mut shared = self.lock();
        if shared.reason.is_some() {
            shared.phase = Phase::After;
            return false;
        }
        shared.phase = Phase::User;
        true
    }

    /// The user's closure has returned: no cancel is sent from now on, and
    /// one being delivered is waited for (at most [`CANCEL_WAIT`]), so that
    /// it cannot land on the engine's own `ROLLBACK` or `COMMIT`. Returns
    /// why the operation was cancelled, if it was.
    pub(crate) fn leave(&self) -> Option<Reason> {
        let mut shared = self.lock();
        shared.phase = Phase::After;
        if shared.delivering {
            shared = self
                .delivered
                .wait_timeout_while(shared, CANCEL_WAIT, |s| s.delivering)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        shared.reason
    }

    /// Cancels the operation: marks it (the first reason wins) and, if its
    /// closure is running, stops the statement on the server from tokio's
    /// blocking pool, again at growing intervals while the closure runs on.
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
        if running && self.canceller.is_some() {
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
        let Some(canceller) = &self.canceller else {
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
        if let Err(e) = sent {
            tracing::warn!("could not cancel a running statement: {e}");
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
    let side = move |kill: &str| -> Result<(), CancelError> {
        let mut side = diesel::MysqlConnection::establish(url.expose())
            .map_err(|e| url.scrub(&e.to_string()))?;
        side.batch_execute(&format!("KILL {kill} {id}"))?;
        Ok(())
    };
    let side = Arc::new(side);
    let terminate = side.clone();
    Some(Canceller::new(move || side("QUERY")).or_terminate(move || terminate("CONNECTION")))
}

/// SQLite: `sqlite3_interrupt` on the handle an auto extension recorded.
#[cfg(feature = "sqlite")]
pub(crate) mod sqlite {
    use std::cell::Cell;
    use std::ffi::{c_char, c_int};
    use std::sync::{Arc, Mutex, Once};

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

    /// The canceller of the connection `SqliteConnection::connect` opened
    /// last on this thread, if its handle was recorded.
    pub(crate) fn canceller() -> Option<Canceller> {
        let raw = CONNECTED.with(|connected| connected.replace(std::ptr::null_mut()));
        if raw.is_null() {
            return None;
        }
        let handle = Arc::new(Mutex::new(Some(Handle(raw))));
        let detach = handle.clone();
        Some(
            Canceller::new(move || {
                let guard = handle.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(Handle(db)) = guard.as_ref() {
                    // SAFETY: the connection is open: the handle is cleared
                    // (under this mutex) before the pool closes it.
                    unsafe { ffi::sqlite3_interrupt(*db) };
                }
                Ok(())
            })
            .on_close(move || {
                detach.lock().unwrap_or_else(|e| e.into_inner()).take();
            }),
        )
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
        assert_eq!(watch.leave(), None);
        // After the closure: never.
        assert!(!watch.deliver());
        watch.cancel(Reason::Timeout);
        assert_eq!(watch.reason(), None);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
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
