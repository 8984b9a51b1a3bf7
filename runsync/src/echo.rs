//! SQL echo: every statement and its duration, through `tracing`.
//!
//! Events go to the target [`SQL_TARGET`] (`diesel_runsync::sql`): at `INFO`
//! when the engine's `echo` option is on, at `DEBUG` otherwise, so
//! `RUST_LOG=diesel_runsync::sql=debug` shows them without the option. Bind
//! values appear in the message only when asked for, with the `echo`
//! option (as SQLAlchemy's `echo=True` prints them); at `DEBUG` without it,
//! a log filter turned up for something else never writes them.
//! `BEGIN`, `COMMIT` and `ROLLBACK` appear as the statements they are.
//! Each statement event carries the fields `db.query.text` (the SQL alone,
//! never its bind values) and `db.runsync.duration_ms`; inside an
//! operation, it is an event of the operation's span (see `observe`).
//! With a slow-statement threshold
//! ([`EngineOptions::slow_statement_threshold`](crate::EngineOptions::slow_statement_threshold)),
//! statements slower than it are logged at `WARN` on the same target, with
//! their SQL (no bind values) and duration, whether the echo is on or not.
//! Connection URLs are always redacted, and connection errors scrubbed.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use diesel::connection::{Instrumentation, InstrumentationEvent};

use crate::error::failover_error;
use crate::observe::RetireReason;
use crate::url::{Backend, redact, scrub_message};

/// The `tracing` target of statement events.
pub const SQL_TARGET: &str = "diesel_runsync::sql";

/// A statement that failed and took the open transaction with it: its
/// transaction depth (1: the whole transaction) and its error message.
pub(crate) type Lost = Arc<Mutex<Option<(u32, String)>>>;

/// Set once the connection must not be reused (see [`SqlEcho`]): a
/// MySQL/MariaDB statement of it was interrupted (`KILL QUERY` or a server
/// deadline, errors 1317, 1969, 3024), its Galera node stopped serving
/// (1047, *WSREP has not yet prepared node for application use*: outside
/// the primary component, or desynced), or a statement failed in a way
/// that says its server cannot serve this engine any more (a failover:
/// read-only for a read-write engine, terminated, shutting down, the
/// connection gone; see `error::failover_error`).
///
/// Holds the [`RetireReason`]'s code (0: none).
pub(crate) type Retire = Arc<AtomicU8>;

/// Set when the server stopped a statement at its own statement timeout
/// (PostgreSQL's `statement_timeout`, MariaDB's `max_statement_time`,
/// MySQL's `MAX_EXECUTION_TIME`), which the engine sets to the deadline:
/// the deadline passed by the server's clock. Servers time statements by
/// the wall clock, so after a wall-clock step this can happen before the
/// engine's own (monotonic) timer fires.
pub(crate) type ServerTimedOut = Arc<AtomicBool>;

/// A Diesel [`Instrumentation`] that reports statements to `tracing`, and
/// records in [`Lost`] a failed statement that lost the open transaction:
/// on PostgreSQL any error (the transaction, or the savepoint, is aborted);
/// on MySQL/MariaDB a deadlock or conflict (1213, 40001: InnoDB and Galera
/// roll the whole transaction back, after which `COMMIT` succeeds having
/// done nothing). A rollback to a savepoint forgives a loss inside it;
/// `BEGIN` forgets any.
///
/// It also records in [`Retire`] a MySQL/MariaDB statement cut short
/// by the server: when that happens while the result set is on its way,
/// libmysqlclient's prepared statement (which Diesel caches) is left
/// expecting the rest of it, and the next execution of the same statement
/// waits forever for rows the server never sends. Such a connection is
/// closed instead of going back to the pool; so is one whose Galera node
/// answers 1047 (the pool then opens a new one on a node that is ready).
#[derive(Default)]
pub(crate) struct SqlEcho {
    echo: bool,
    started: Option<Instant>,
    backend: Option<Backend>,
    access: Option<crate::manager::Access>,
    depth: u32,
    lost: Lost,
    retire: Retire,
    timed_out: ServerTimedOut,
    /// Statements slower than this are logged at `WARN`, echo or not.
    slow: Option<Duration>,
    /// The user's instrumentation: every event, after this one's.
    then: Option<Box<dyn Instrumentation>>,
}

impl std::fmt::Debug for SqlEcho {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlEcho")
            .field("echo", &self.echo)
            .field("backend", &self.backend)
            .field("depth", &self.depth)
            .field("then", &self.then.is_some())
            .finish_non_exhaustive()
    }
}

impl SqlEcho {
    /// Reports at `INFO` when `echo` is true, else at `DEBUG`; records
    /// transaction losses of `backend` in `lost`, in `retire` that the
    /// connection must not be reused, and in `timed_out` a statement the
    /// server stopped at its statement timeout.
    pub(crate) fn new(
        echo: bool,
        backend: Backend,
        access: crate::manager::Access,
        lost: Lost,
        retire: Retire,
        timed_out: ServerTimedOut,
    ) -> Self {
        SqlEcho {
            echo,
            started: None,
            backend: Some(backend),
            access: Some(access),
            depth: 0,
            lost,
            retire,
            timed_out,
            slow: None,
            then: None,
        }
    }

    /// Logs statements slower than `threshold` at `WARN` (`None`: none).
    pub(crate) fn slow_statement_threshold(mut self, threshold: Option<Duration>) -> Self {
        self.slow = threshold;
        self
    }

    /// Hands every event on to `then` as well, after this one.
    pub(crate) fn then(mut self, then: Option<Box<dyn Instrumentation>>) -> Self {
        self.then = then;
        self
    }

    /// Keeps [`Lost`], [`Retire`] and [`ServerTimedOut`] up to date
    /// (before any echo, which may be off).
    fn track(&mut self, event: &InstrumentationEvent<'_>) {
        if let InstrumentationEvent::FinishQuery { error: Some(e), .. } = event {
            if self
                .backend
                .is_some_and(|backend| stopped_at_statement_timeout(backend, e))
            {
                self.timed_out.store(true, Ordering::Release);
            }
            let reason = match self.backend {
                Some(Backend::Mysql) => retires_mysql_connection(e),
                _ => None,
            }
            .or_else(|| self.cannot_serve(e));
            if let Some(reason) = reason {
                self.retire.store(reason as u8, Ordering::Release);
            }
        }
        match event {
            InstrumentationEvent::BeginTransaction { depth, .. } => {
                self.depth = depth.get();
                if self.depth == 1 {
                    *self.lost.lock().unwrap() = None;
                }
            }
            InstrumentationEvent::CommitTransaction { depth, .. } => {
                self.depth = depth.get() - 1;
            }
            InstrumentationEvent::RollbackTransaction { depth, .. } => {
                let mut lost = self.lost.lock().unwrap();
                if matches!(*lost, Some((at, _)) if at >= depth.get() && depth.get() > 1) {
                    *lost = None;
                }
                self.depth = depth.get() - 1;
            }
            InstrumentationEvent::FinishQuery {
                error: Some(e),
                query,
                ..
            } if self.depth > 0 => {
                let depth = match (self.backend, e) {
                    // Only what the server refused: a statement that failed
                    // on the client (its SQL could not be built, a value not
                    // serialized, a row not deserialized) left the
                    // transaction as it was.
                    (Some(Backend::Postgres), diesel::result::Error::DatabaseError(..)) => {
                        self.depth
                    }
                    (Some(Backend::Mysql), e) if loses_mysql_transaction(e) => 1,
                    _ => return,
                };
                let failed = format!("{e} (in `{}`)", sql_text(query));
                let mut lost = self.lost.lock().unwrap();
                if lost.as_ref().is_none_or(|(at, _)| depth < *at) {
                    *lost = Some((depth, failed));
                }
            }
            _ => {}
        }
    }

    /// Whether a failed statement says this connection's server can no
    /// longer serve the engine ([`failover_error`]): gone, terminated,
    /// shutting down, or read-only for a read-write engine.
    fn cannot_serve(&self, error: &diesel::result::Error) -> Option<RetireReason> {
        match failover_error(error) {
            None => None,
            Some("read-only") if self.access != Some(crate::manager::Access::ReadWrite) => None,
            Some(kind) => Some(RetireReason::from_failover(kind)),
        }
    }

    fn enabled(&self) -> bool {
        if self.echo {
            tracing::enabled!(target: SQL_TARGET, tracing::Level::INFO)
        } else {
            tracing::enabled!(target: SQL_TARGET, tracing::Level::DEBUG)
        }
    }
}

macro_rules! report {
    ($echo:expr, $($arg:tt)+) => {
        if $echo {
            tracing::info!(target: SQL_TARGET, $($arg)+)
        } else {
            tracing::debug!(target: SQL_TARGET, $($arg)+)
        }
    };
}

impl Instrumentation for SqlEcho {
    fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
        self.track(&event);
        // The common case first: no echo, no slow-statement threshold.
        let warns = || tracing::enabled!(target: SQL_TARGET, tracing::Level::WARN);
        if self.enabled() {
            let slow = self.slow.filter(|_| warns());
            self.report(&event, true, slow);
        } else if let Some(limit) = self.slow
            && warns()
        {
            self.report(&event, false, Some(limit));
        }
        if let Some(then) = &mut self.then {
            then.on_connection_event(event);
        }
    }
}

impl SqlEcho {
    /// The echo (`echo`): statements with their durations, connections;
    /// and statements slower than `slow`. Each statement event carries
    /// `db.query.text` (the SQL without its bind values) and
    /// `db.runsync.duration_ms`; the message shows the binds too when the
    /// `echo` option asks for them.
    fn report(&mut self, event: &InstrumentationEvent<'_>, echo: bool, slow: Option<Duration>) {
        match event {
            InstrumentationEvent::StartQuery { .. } => self.started = Some(Instant::now()),
            InstrumentationEvent::FinishQuery { query, error, .. } => {
                let took = self.started.take().map(|t| t.elapsed());
                let is_slow = matches!((took, slow), (Some(took), Some(limit)) if took >= limit);
                if !echo && !is_slow {
                    return;
                }
                let ms = took.map_or(0.0, |t| t.as_secs_f64() * 1e3);
                let shown = sql_text(query);
                let sql = without_binds(&shown);
                // Bind values only when the `echo` option asked for them.
                let shown = if self.echo { shown.as_str() } else { sql };
                match error {
                    None if echo => report!(
                        self.echo,
                        { db.query.text = sql, db.runsync.duration_ms = ms },
                        "{shown} [{ms:.3} ms]"
                    ),
                    None => {}
                    Some(e) if echo => tracing::warn!(
                        target: SQL_TARGET,
                        { db.query.text = sql, db.runsync.duration_ms = ms },
                        "{shown} [{ms:.3} ms] failed: {e}"
                    ),
                    Some(_) => {}
                }
                if is_slow {
                    tracing::warn!(
                        target: SQL_TARGET,
                        { db.query.text = sql, db.runsync.duration_ms = ms },
                        "slow statement [{ms:.3} ms]: {sql}"
                    );
                }
            }
            _ if !echo => {}
            InstrumentationEvent::FinishEstablishConnection { url, error, .. } => match error {
                None => report!(self.echo, "connected to {}", redact(url)),
                Some(e) => tracing::warn!(
                    target: SQL_TARGET,
                    "connecting to {} failed: {}",
                    redact(url),
                    scrub_message(url, &e.to_string())
                ),
            },
            _ => {}
        }
    }
}

/// The SQL of Diesel's query display, without the `-- binds: [...]` it
/// appends: cut at the first marker, so a bind value never shows.
fn without_binds(shown: &str) -> &str {
    shown
        .split_once(" -- binds: ")
        .map_or(shown, |(sql, _)| sql)
}

/// Whether a MySQL/MariaDB error rolled the whole transaction back: a
/// deadlock or a Galera conflict (1213, SQLSTATE 40001).
fn loses_mysql_transaction(error: &diesel::result::Error) -> bool {
    use diesel::result::{DatabaseErrorKind, Error as D};
    match error {
        D::DatabaseError(DatabaseErrorKind::SerializationFailure, _) => true,
        D::DatabaseError(_, info) => {
            info.message().contains("Deadlock found") || info.message().contains("deadlock")
        }
        _ => false,
    }
}

/// Whether a MySQL/MariaDB error means the connection must not be reused:
/// a statement cut short by the server (`KILL QUERY`: 1317, MariaDB's
/// `max_statement_time`: 1969, MySQL's `MAX_EXECUTION_TIME`: 3024; all
/// three messages begin the same way), or a Galera node that does not
/// serve (1047).
fn retires_mysql_connection(error: &diesel::result::Error) -> Option<RetireReason> {
    match error {
        diesel::result::Error::DatabaseError(_, info) => {
            let message = info.message();
            if message.starts_with("Query execution was interrupted") {
                Some(RetireReason::Interrupted)
            } else if message.contains(crate::error::WSREP_NOT_READY) {
                Some(RetireReason::WsrepNotReady)
            } else {
                None
            }
        }
        _ => None,
    }
}

/// Whether the server stopped the statement at its statement timeout:
/// PostgreSQL's *canceling statement due to statement timeout* (57014, the
/// SQLSTATE it shares with a cancel request, which Diesel does not
/// expose: the message tells them apart, in English, the server's default
/// `lc_messages`), MariaDB's 1969 (*... (max_statement_time exceeded)*),
/// MySQL's 3024 (*... maximum statement execution time exceeded*).
fn stopped_at_statement_timeout(backend: Backend, error: &diesel::result::Error) -> bool {
    let diesel::result::Error::DatabaseError(_, info) = error else {
        return false;
    };
    let message = info.message();
    match backend {
        Backend::Postgres => message.contains("canceling statement due to statement timeout"),
        Backend::Mysql => {
            message.starts_with("Query execution was interrupted")
                && (message.contains("max_statement_time")
                    || message.contains("maximum statement execution time"))
        }
        Backend::Sqlite => false,
    }
}

/// A statement's SQL, as Diesel displays it, for a message: a statement
/// whose SQL cannot be built (an empty changeset: Diesel's query display
/// fails, and the statement fails with the reason) is named as such,
/// rather than make `format!` panic inside the instrumentation.
fn sql_text(query: &dyn std::fmt::Display) -> String {
    use std::fmt::Write;
    let mut text = String::new();
    match write!(text, "{query}") {
        Ok(()) => text,
        Err(_) => "(a statement whose SQL could not be built)".to_owned(),
    }
}
