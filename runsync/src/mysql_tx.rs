//! MySQL/MariaDB: the outermost `BEGIN`, `COMMIT` and `ROLLBACK` in one
//! round trip each (the `mysql-single-round-trip` feature).
//!
//! Diesel's `AnsiTransactionManager` sends them with `batch_execute`,
//! which on `MysqlConnection` switches multi-statements on, sends the
//! text, and switches them off again: three round trips
//! (`COM_SET_OPTION`, `COM_QUERY`, `COM_SET_OPTION`). Here each is a
//! statement Diesel prepares once per connection and keeps in its
//! statement cache, so every later one is a single `COM_STMT_EXECUTE`.
//! MariaDB prepares all three; a server that refuses to prepare one
//! (error 1295, "not supported in the prepared statement protocol") gets
//! Diesel's `batch_execute` for it from then on.
//!
//! Everything else is what the transaction manager does: the same
//! instrumentation events before the statement (the engine's echo and
//! lost-transaction checks, and the user's instrumentation, rely on them),
//! the same depth bookkeeping after it, and the same recovery when it
//! fails (a failed `COMMIT` is rolled back; a failed `ROLLBACK` leaves the
//! transaction manager broken, so the pool drops the connection). Levels
//! below the outermost (savepoints) stay with the transaction manager.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};

use diesel::connection::{
    AnsiTransactionManager, Connection, InstrumentationEvent, SimpleConnection,
    TransactionDepthChange, TransactionManager, TransactionManagerStatus,
};
use diesel::mysql::Mysql;
use diesel::query_builder::{AstPass, QueryFragment, QueryId};
use diesel::result::Error;
use diesel::{MysqlConnection, QueryResult, RunQueryDsl};

/// One of the three statements, as a query Diesel can prepare and cache
/// (keyed by its SQL: no static query id, safe to cache).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Statement {
    Begin,
    Commit,
    Rollback,
}

/// Per statement: the server refused to prepare it, so it goes through
/// `batch_execute`.
static UNPREPARABLE: [AtomicBool; 3] = [
    AtomicBool::new(false),
    AtomicBool::new(false),
    AtomicBool::new(false),
];

impl Statement {
    fn sql(self) -> &'static str {
        match self {
            Statement::Begin => "BEGIN",
            Statement::Commit => "COMMIT",
            Statement::Rollback => "ROLLBACK",
        }
    }

    fn unpreparable(self) -> &'static AtomicBool {
        &UNPREPARABLE[self as usize]
    }

    /// Sends the statement: one `COM_STMT_EXECUTE` once it is prepared.
    fn send(self, conn: &mut MysqlConnection) -> QueryResult<()> {
        if !self.unpreparable().load(Ordering::Relaxed) {
            match self.execute(conn) {
                Err(Error::DatabaseError(_, info))
                    if info.message().contains("prepared statement protocol") =>
                {
                    self.unpreparable().store(true, Ordering::Relaxed);
                }
                other => return other.map(|_| ()),
            }
        }
        conn.batch_execute(self.sql())
    }
}

impl QueryId for Statement {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl QueryFragment<Mysql> for Statement {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Mysql>) -> QueryResult<()> {
        out.push_sql(self.sql());
        Ok(())
    }
}

impl RunQueryDsl<MysqlConnection> for Statement {}

fn status(conn: &mut MysqlConnection) -> &mut TransactionManagerStatus {
    AnsiTransactionManager::transaction_manager_status_mut(conn)
}

fn change_depth(conn: &mut MysqlConnection, change: TransactionDepthChange) -> QueryResult<()> {
    match status(conn) {
        TransactionManagerStatus::Valid(valid) => valid.change_transaction_depth(change),
        TransactionManagerStatus::InError => Err(Error::BrokenTransactionManager),
    }
}

const OUTERMOST: NonZeroU32 = NonZeroU32::MIN;

/// `BEGIN` when no transaction is open (else Diesel's error).
pub(crate) fn begin(conn: &mut MysqlConnection) -> QueryResult<()> {
    if status(conn).transaction_depth()?.is_some() {
        return Err(Error::AlreadyInTransaction);
    }
    conn.instrumentation()
        .on_connection_event(InstrumentationEvent::begin_transaction(OUTERMOST));
    Statement::Begin.send(conn)?;
    change_depth(conn, TransactionDepthChange::IncreaseDepth)
}

/// `COMMIT` of the outermost level; any other level goes to the
/// transaction manager.
pub(crate) fn commit(conn: &mut MysqlConnection) -> QueryResult<()> {
    if status(conn).transaction_depth()? != Some(OUTERMOST) {
        return AnsiTransactionManager::commit_transaction(conn);
    }
    conn.instrumentation()
        .on_connection_event(InstrumentationEvent::commit_transaction(OUTERMOST));
    match Statement::Commit.send(conn) {
        Ok(()) => match change_depth(conn, TransactionDepthChange::DecreaseDepth) {
            // The connection may have seen the transaction end already.
            Ok(()) | Err(Error::NotInTransaction) => Ok(()),
            Err(e) => Err(e),
        },
        Err(commit_error) => {
            // As Diesel: the transaction may still be open; roll it back.
            if matches!(status(conn).transaction_depth(), Ok(Some(OUTERMOST)))
                && let Err(rollback_error) = rollback(conn)
            {
                status(conn).set_in_error();
                return Err(Error::RollbackErrorOnCommit {
                    rollback_error: Box::new(rollback_error),
                    commit_error: Box::new(commit_error),
                });
            }
            Err(commit_error)
        }
    }
}

/// `ROLLBACK` of the outermost level; any other level goes to the
/// transaction manager.
pub(crate) fn rollback(conn: &mut MysqlConnection) -> QueryResult<()> {
    match status(conn).transaction_depth()? {
        None => return Err(Error::NotInTransaction),
        Some(depth) if depth != OUTERMOST => {
            return AnsiTransactionManager::rollback_transaction(conn);
        }
        Some(_) => {}
    }
    conn.instrumentation()
        .on_connection_event(InstrumentationEvent::rollback_transaction(OUTERMOST));
    match Statement::Rollback.send(conn) {
        Ok(()) => match change_depth(conn, TransactionDepthChange::DecreaseDepth) {
            Ok(()) | Err(Error::NotInTransaction) => Ok(()),
            Err(e) => Err(e),
        },
        Err(rollback_error) => {
            // As Diesel: unless the connection saw the transaction end, the
            // manager is broken and the connection is not reused.
            let status = status(conn);
            if !matches!(status.transaction_depth(), Ok(None)) {
                status.set_in_error();
            }
            Err(rollback_error)
        }
    }
}
