//! A `COMMIT` after a statement that lost the transaction is never reported
//! as success (issue 11). PostgreSQL aborts the transaction at any failed
//! statement, and its `COMMIT` then rolls back; InnoDB (and Galera Cluster)
//! roll the whole transaction back at a deadlock (1213), after which
//! `COMMIT` returns OK having done nothing. A closure that swallows such an
//! error must not see its transaction reported as committed: the engine
//! rolls back and returns a retryable error instead. A failure undone by a
//! rollback to a savepoint, and on MySQL an ordinary failed statement (the
//! transaction goes on), still commit.

mod common;

use std::time::Duration;

use common::{TestDb, per_backend};
use diesel::prelude::*;
use diesel::sql_types::BigInt;
use diesel_runsync::{Backend, Error, Retryable};
use greenlet_orm::AnyConnection;

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

fn rows_tagged(conn: &mut AnyConnection, tag: &str) -> i64 {
    let int = if conn.backend() == Backend::Mysql {
        "SIGNED"
    } else {
        "BIGINT"
    };
    diesel::sql_query(format!(
        "SELECT CAST(count(*) AS {int}) AS n FROM a WHERE data = '{tag}'"
    ))
    .get_result::<Count>(conn)
    .unwrap()
    .n
}

fn insert(conn: &mut AnyConnection, tag: &str) -> QueryResult<usize> {
    diesel::sql_query(format!("INSERT INTO a (data) VALUES ('{tag}')")).execute(conn)
}

per_backend!(a_swallowed_failure_is_not_committed, [postgres, mysql]);
async fn a_swallowed_failure_is_not_committed(db: TestDb) {
    let engine = db.migrated_engine(2, Duration::from_secs(5)).await;
    // An ordinary failed statement, swallowed.
    let mut session = engine.begin().await.unwrap();
    session
        .run_sync(|c: &mut AnyConnection| {
            insert(c, "swallowed")?;
            let failed = diesel::sql_query("SELECT * FROM no_such_table").execute(c);
            assert!(failed.is_err());
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    let committed = session.commit().await;
    let rows = db.with_connection(|c| rows_tagged(c, "swallowed")).await;
    match db.backend {
        Backend::Postgres => {
            let e = committed.expect_err("PostgreSQL rolled this transaction back");
            assert!(e.is_retryable(), "{e}");
            assert!(e.to_string().contains("no_such_table"), "{e}");
            assert_eq!(rows, 0);
        }
        _ => {
            // MySQL undoes the failed statement only: the rest commits.
            committed.unwrap();
            assert_eq!(rows, 1);
        }
    }

    // The same through Engine::transaction (one hop).
    let through_transaction = engine
        .transaction(|c: &mut AnyConnection| {
            insert(c, "one-hop")?;
            let _ = diesel::sql_query("SELECT * FROM no_such_table").execute(c);
            Ok::<_, Error>(())
        })
        .await;
    let rows = db.with_connection(|c| rows_tagged(c, "one-hop")).await;
    assert_eq!(
        through_transaction.is_ok(),
        db.backend == Backend::Mysql,
        "{through_transaction:?}"
    );
    assert_eq!(rows, i64::from(db.backend == Backend::Mysql));

    // A failure inside a savepoint that was rolled back: the transaction is whole.
    engine
        .transaction(|c: &mut AnyConnection| {
            insert(c, "savepoint")?;
            let inner: QueryResult<()> = c.transaction(|c| {
                diesel::sql_query("SELECT * FROM no_such_table").execute(c)?;
                Ok(())
            });
            assert!(inner.is_err());
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    assert_eq!(db.with_connection(|c| rows_tagged(c, "savepoint")).await, 1);
}

per_backend!(
    a_swallowed_deadlock_is_not_committed,
    multi_thread,
    [postgres, mysql]
);
async fn a_swallowed_deadlock_is_not_committed(db: TestDb) {
    let engine = db.migrated_engine(4, Duration::from_secs(10)).await;
    let (x, y) = engine
        .transaction(|c: &mut AnyConnection| {
            let ids = greenlet_orm::queries::insert_families(
                c,
                &[
                    greenlet_orm::Family::new("x", 0),
                    greenlet_orm::Family::new("y", 0),
                ],
            )
            .map_err(|e| Error::Database(diesel::result::Error::QueryBuilderError(e.into())))?;
            Ok::<_, Error>((ids[0], ids[1]))
        })
        .await
        .unwrap();
    let update = |id: i32, tag: &'static str| {
        move |c: &mut AnyConnection| {
            Ok::<_, Error>(
                diesel::sql_query(format!("UPDATE a SET data = '{tag}' WHERE id = {id}"))
                    .execute(c)
                    .is_err(),
            )
        }
    };
    let mut first = engine.begin().await.unwrap();
    let mut second = engine.begin().await.unwrap();
    assert!(!first.run_sync(update(x, "first")).await.unwrap());
    assert!(!second.run_sync(update(y, "second")).await.unwrap());
    // Each now waits for the other's row: the server picks a victim, whose
    // closure swallows the deadlock error.
    let blocked = tokio::spawn(async move {
        let failed = first.run_sync(update(y, "first")).await.unwrap();
        (first, failed)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second_failed = second.run_sync(update(x, "second")).await.unwrap();
    let (mut first, first_failed) = blocked.await.unwrap();
    assert!(first_failed != second_failed, "one victim");
    let first_commit = first.commit().await;
    let second_commit = second.commit().await;
    let (winner, loser) = if first_failed {
        ("second", first_commit)
    } else {
        ("first", second_commit)
    };
    let e = loser.expect_err("the deadlock victim's COMMIT must not succeed");
    assert!(e.is_retryable(), "{e}");
    let (won_x, won_y) = db
        .with_connection(move |c| {
            (
                rows_tagged(c, winner),
                rows_tagged(c, "x") + rows_tagged(c, "y"),
            )
        })
        .await;
    assert_eq!((won_x, won_y), (2, 0), "both rows are the winner's");
}
