//! Defects found from outside, each pinned by a test that failed before its
//! fix, on every backend and both runtime flavours (`current::*` on tokio's
//! current-thread runtime, `multi::*` on two workers):
//! - a `rollback()` cut off by a timeout forgot the cancelled operation, and
//!   the next `rollback()` returned at once with its transaction still open;
//! - a closure that left a savepoint open made `commit()` release only the
//!   savepoint and report success, committing nothing;
//! - `in_transaction()` was true after a cancelled `transaction()` scope;
//! - `PendingRollback` said the transaction "was rolled back" while it stays
//!   open until `rollback()`;
//! - `rollback()` returned `Ok` when the `ROLLBACK` statement failed.

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Duration;

use common::{TestBackend, TestDb, insert_part, long_statement, next_unit, settle};
use diesel::RunQueryDsl;
use diesel::connection::{Connection, TransactionManager};
use diesel::query_builder::{QueryFragment, SqlQuery};
use diesel_runsync::Error;

async fn a_rollback_cut_off_by_a_timeout_waits_next_time<C: TestBackend>(db: TestDb<C>)
where
    SqlQuery: QueryFragment<C::Backend>,
{
    let engine = db.engine().await;
    let mut session = engine.session();
    let unit = next_unit();
    session
        .run_sync(move |c| insert_part(c, unit, 0))
        .await
        .unwrap();
    let long = long_statement::<C>(1.5);
    let cut = tokio::time::timeout(
        Duration::from_millis(100),
        session.run_sync(move |c| diesel::sql_query(long).execute(c)),
    )
    .await;
    assert!(
        cut.is_err(),
        "{}: the long statement finished early",
        C::NAME
    );
    // This one may or may not finish in time; either way it must not make
    // the session forget the operation still running.
    let _ = tokio::time::timeout(Duration::from_millis(100), session.rollback()).await;
    session.rollback().await.expect("rollback");
    let status = engine.status();
    assert_eq!(
        status.idle,
        status.connections,
        "{}: rollback() returned while the cancelled operation still held its connection",
        C::NAME
    );
    assert_eq!(db.open_transactions().await, 0, "{}", C::NAME);
    assert_eq!(
        db.rows().await,
        0,
        "{}: the cancelled transaction's row",
        C::NAME
    );
    // The session goes on, in one transaction only.
    let unit = next_unit();
    session
        .run_sync(move |c| insert_part(c, unit, 0))
        .await
        .unwrap();
    session.commit().await.unwrap();
    assert_eq!(db.rows().await, 1, "{}", C::NAME);
    settle(&engine).await;
}

/// Opens a savepoint inside the closure and never closes it, in the two
/// ways users hit: a raw `begin_transaction`, and `conn.transaction(..)`
/// whose panic the closure catches and swallows.
async fn a_savepoint_left_open_fails_the_closure_and_commits_nothing<C: TestBackend>(
    db: TestDb<C>,
) {
    let engine = db.engine().await;
    type Leak<C> = fn(&mut C) -> diesel::QueryResult<()>;
    let leaks: [(&str, Leak<C>); 2] = [
        ("begin_transaction", |c| {
            <C as Connection>::TransactionManager::begin_transaction(c)
        }),
        ("a caught panic in transaction()", |c| {
            let caught = catch_unwind(AssertUnwindSafe(|| {
                c.transaction::<(), diesel::result::Error, _>(|c| {
                    insert_part(c, next_unit(), 9)?;
                    panic!("inside a nested transaction")
                })
            }));
            assert!(caught.is_err());
            Ok(())
        }),
    ];
    for (how, leak) in leaks {
        let mut session = engine.session();
        let unit = next_unit();
        let result = session
            .run_sync(move |c| {
                insert_part(c, unit, 0)?;
                leak(c)
            })
            .await;
        let error = Error::from(result.expect_err(how));
        assert!(
            matches!(error, Error::UnbalancedTransaction { depth: 2 }),
            "{} ({how}): {error}",
            C::NAME
        );
        let commit = session.commit().await;
        assert!(
            matches!(commit, Err(Error::PendingRollback(_))),
            "{} ({how}): commit after an unbalanced closure: {commit:?}",
            C::NAME
        );
        session.rollback().await.unwrap();
        assert_eq!(db.rows().await, 0, "{} ({how}): nothing committed", C::NAME);
        assert_eq!(db.open_transactions().await, 0, "{} ({how})", C::NAME);
    }
    // A nested transaction that closes itself is fine, and committed whole.
    let mut session = engine.session();
    let unit = next_unit();
    session
        .run_sync(move |c| {
            insert_part(c, unit, 0)?;
            c.transaction(|c| insert_part(c, unit, 1))
        })
        .await
        .unwrap();
    session.commit().await.unwrap();
    assert_eq!(db.rows().await, 2, "{}", C::NAME);
    settle(&engine).await;
}

async fn a_cancelled_scope_is_not_in_transaction<C: TestBackend>(db: TestDb<C>) {
    let engine = db.engine().await;
    let mut session = engine.session();
    let unit = next_unit();
    let cut = tokio::time::timeout(
        Duration::from_millis(200),
        session.transaction(async |s| {
            s.run_sync(move |c| insert_part(c, unit, 0)).await?;
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok::<_, Error>(())
        }),
    )
    .await;
    assert!(cut.is_err());
    assert!(
        !session.in_transaction(),
        "{}: a cancelled scope's transaction cannot go on",
        C::NAME
    );
    let refused = session.run_sync(|c| insert_part(c, next_unit(), 0)).await;
    let message = Error::from(refused.expect_err("refused")).to_string();
    assert!(message.contains("call rollback()"), "{message}");
    assert!(
        !message.contains("was rolled back"),
        "{}: it is not rolled back yet: {message}",
        C::NAME
    );
    session.rollback().await.unwrap();
    assert_eq!(db.rows().await, 0, "{}", C::NAME);
    assert_eq!(db.open_transactions().await, 0, "{}", C::NAME);
}

mod current {
    use super::*;
    use crate::common::per_backend;

    per_backend!(a_rollback_cut_off_by_a_timeout_waits_next_time);
    per_backend!(a_savepoint_left_open_fails_the_closure_and_commits_nothing);
    per_backend!(a_cancelled_scope_is_not_in_transaction);
}

mod multi {
    use super::*;
    use crate::common::per_backend;

    per_backend!(
        a_rollback_cut_off_by_a_timeout_waits_next_time,
        multi_thread
    );
    per_backend!(
        a_savepoint_left_open_fails_the_closure_and_commits_nothing,
        multi_thread
    );
    per_backend!(a_cancelled_scope_is_not_in_transaction, multi_thread);
}

/// Ends the session's connection from the server side, so its `ROLLBACK`
/// fails: `pg_terminate_backend` / `KILL`. (SQLite has no server to end it.)
#[cfg(any(feature = "postgres", feature = "mysql"))]
async fn a_failed_rollback_is_reported<C: TestBackend>(db: TestDb<C>, kill: fn(i64) -> String) {
    let engine = db.engine().await;
    let mut session = engine.session();
    let unit = next_unit();
    session
        .run_sync(move |c| insert_part(c, unit, 0))
        .await
        .unwrap();
    let id: i64 = session
        .run_sync(move |c| {
            c.scalar(match C::NAME {
                "postgres" => "SELECT CAST(pg_backend_pid() AS BIGINT) AS n",
                _ => "SELECT CAST(CONNECTION_ID() AS SIGNED) AS n",
            })
        })
        .await
        .unwrap();
    db.blocking(move |c| c.batch_execute(&kill(id)))
        .await
        .unwrap();
    // Give the server a moment to end the connection.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let rolled_back = session.rollback().await;
    assert!(
        rolled_back.is_err(),
        "{}: rollback() on a connection the server closed returned Ok",
        C::NAME
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // The session and the engine go on, on a fresh connection.
    let unit = next_unit();
    session
        .run_sync(move |c| insert_part(c, unit, 0))
        .await
        .unwrap();
    session.commit().await.unwrap();
    assert_eq!(db.rows().await, 1, "{}", C::NAME);
    assert_eq!(db.open_transactions().await, 0, "{}", C::NAME);
}

#[tokio::test]
#[cfg_attr(
    not(feature = "postgres"),
    ignore = "built without the postgres feature"
)]
#[cfg_attr(
    all(feature = "postgres", runsync_skip_postgres),
    ignore = "PG_DATABASE_URL is not set"
)]
async fn a_failed_rollback_is_reported_postgres() {
    #[cfg(feature = "postgres")]
    common::run(|db: TestDb<diesel::PgConnection>| {
        a_failed_rollback_is_reported(db, |id| format!("SELECT pg_terminate_backend({id})"))
    })
    .await;
}

#[tokio::test]
#[cfg_attr(not(feature = "mysql"), ignore = "built without the mysql feature")]
#[cfg_attr(
    all(feature = "mysql", runsync_skip_mysql),
    ignore = "MYSQL_DATABASE_URL is not set"
)]
async fn a_failed_rollback_is_reported_mysql() {
    #[cfg(feature = "mysql")]
    common::run(|db: TestDb<diesel::MysqlConnection>| {
        a_failed_rollback_is_reported(db, |id| format!("KILL {id}"))
    })
    .await;
}
