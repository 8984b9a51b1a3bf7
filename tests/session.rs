//! The facade's promises, on every configured backend: work inside a
//! session's transaction is visible to later `run_sync` calls and undone by
//! rollback; commit makes it durable; panics, errors, cancellation and
//! dropped sessions never commit part of a unit or leave a transaction open.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{
    TestDb, insert_children, insert_parent, insert_unit, migrate, open_transactions, partial_units,
    settle,
};
use diesel::prelude::*;
use greenlet_orm::schema::a;
use greenlet_orm::{AnyConnection, DemoError};
use diesel_runsync::{AsyncSession, EngineOptions, Error};

fn count_parents(conn: &mut AnyConnection) -> Result<i64, DemoError> {
    Ok(a::table.count().get_result(conn)?)
}

/// Runs one whole unit (parent, then children, in two `run_sync` calls).
async fn unit(session: &mut AsyncSession<AnyConnection>) -> Result<(), DemoError> {
    let id = session.run_sync(insert_parent).await?;
    session.run_sync(move |c| insert_children(c, id)).await
}

async fn committed_parents(db: &TestDb) -> i64 {
    let mut conn = db.connect();
    count_parents(&mut conn).unwrap()
}

#[tokio::test]
async fn earlier_writes_are_visible_later_and_rollback_undoes_them() {
    for db in TestDb::all("visible_then_rollback") {
        let engine = db.engine().await;
        migrate(&engine).await;
        let mut session = engine.session();
        unit(&mut session).await.unwrap();
        assert!(session.in_transaction());
        let seen = session.run_sync(count_parents).await.unwrap();
        assert_eq!(seen, 1, "{}: own uncommitted row visible", db.backend);
        assert_eq!(
            committed_parents(&db).await,
            0,
            "{}: not visible outside",
            db.backend
        );
        session.rollback().await.unwrap();
        assert!(!session.holds_connection());
        assert_eq!(committed_parents(&db).await, 0, "{}", db.backend);
        assert_eq!(session.run_sync(count_parents).await.unwrap(), 0);
    }
}

#[tokio::test]
async fn commit_makes_the_work_durable() {
    for db in TestDb::all("commit_durable") {
        let engine = db.engine().await;
        migrate(&engine).await;
        let mut session = engine.session();
        session.begin().unwrap();
        assert!(matches!(
            session.begin(),
            Err(Error::TransactionAlreadyOpen)
        ));
        unit(&mut session).await.unwrap();
        session.commit().await.unwrap();
        assert!(!session.in_transaction());
        assert_eq!(committed_parents(&db).await, 1, "{}", db.backend);
        assert_eq!(partial_units(&db, 2), 0);
        // A commit with nothing open is a no-op, as in SQLAlchemy.
        session.commit().await.unwrap();
    }
}

#[tokio::test]
async fn a_panic_in_the_closure_is_an_error_and_rolls_back() {
    for db in TestDb::all("panic_rolls_back") {
        let engine = db.migrated_engine(2, Duration::from_secs(5)).await;
        for round in 0..10 {
            let mut session = engine.session();
            let id = session.run_sync(insert_parent).await.unwrap();
            let result = session
                .run_sync(move |c| -> Result<(), DemoError> {
                    insert_children(c, id)?;
                    panic!("boom in round {round}");
                })
                .await;
            match result {
                Err(DemoError::Session(Error::Panic(message))) => {
                    assert!(message.contains("boom in round"), "{message}")
                }
                other => panic!("{}: expected a panic error, got {other:?}", db.backend),
            }
            // The session refuses work until the failure is acknowledged.
            let refused = session.run_sync(count_parents).await;
            assert!(
                matches!(refused, Err(DemoError::Session(Error::PendingRollback(_)))),
                "{refused:?}"
            );
            session.rollback().await.unwrap();
            assert_eq!(session.run_sync(count_parents).await.unwrap(), 0);
        }
        settle(&engine).await;
        assert_eq!(committed_parents(&db).await, 0, "{}", db.backend);
        assert_eq!(open_transactions(&db), 0, "{}", db.backend);
        assert!(engine.status().connections <= 2, "{:?}", engine.status());
    }
}

#[tokio::test]
async fn an_error_from_the_closure_rolls_back_the_whole_transaction() {
    for db in TestDb::all("error_rolls_back") {
        let engine = db.engine().await;
        migrate(&engine).await;
        let mut session = engine.session();
        let id = session.run_sync(insert_parent).await.unwrap();
        let failed = session
            .run_sync(move |c| {
                insert_children(c, id)?;
                // A child of a parent that does not exist: a foreign-key error.
                insert_children(c, id + 1000)
            })
            .await;
        assert!(matches!(failed, Err(DemoError::Database(_))), "{failed:?}");
        let commit = session.commit().await;
        assert!(
            matches!(commit, Err(Error::PendingRollback(_))),
            "{commit:?}"
        );
        session.rollback().await.unwrap();
        assert_eq!(committed_parents(&db).await, 0, "{}", db.backend);
        if open_transactions(&db) != 0 {
            std::process::Command::new("mysql").args(["-h127.0.0.1", "-uroot", "-e", "select t.trx_id, t.trx_state, t.trx_started, t.trx_mysql_thread_id, p.db, p.command, p.time, t.trx_rows_modified, t.trx_lock_structs from information_schema.innodb_trx t join information_schema.processlist p on p.id = t.trx_mysql_thread_id"]).status().unwrap();
        }
        assert_eq!(open_transactions(&db), 0, "{}", db.backend);
    }
}

#[tokio::test]
async fn dropping_a_session_rolls_back_and_returns_the_connection() {
    for db in TestDb::all("drop_rolls_back") {
        let engine = db.engine().await;
        migrate(&engine).await;
        let mut session = engine.session();
        unit(&mut session).await.unwrap();
        drop(session);
        settle(&engine).await;
        assert_eq!(committed_parents(&db).await, 0, "{}", db.backend);
        assert_eq!(open_transactions(&db), 0, "{}", db.backend);
        assert!(engine.status().idle >= 1, "{:?}", engine.status());
    }
}

#[tokio::test]
async fn engine_begin_commits_or_rolls_back_when_dropped() {
    for db in TestDb::all("engine_begin") {
        let engine = db.engine().await;
        migrate(&engine).await;
        let mut conn = engine.begin().await.unwrap();
        assert!(conn.holds_connection() && conn.in_transaction());
        unit(&mut conn).await.unwrap();
        drop(conn);
        settle(&engine).await;
        assert_eq!(committed_parents(&db).await, 0, "{}", db.backend);

        let mut conn = engine.begin().await.unwrap();
        unit(&mut conn).await.unwrap();
        conn.commit().await.unwrap();
        assert_eq!(committed_parents(&db).await, 1, "{}", db.backend);
    }
}

#[tokio::test]
async fn a_transaction_scope_commits_on_ok_and_rolls_back_on_err() {
    for db in TestDb::all("transaction_scope") {
        let engine = db.engine().await;
        migrate(&engine).await;
        let mut session = engine.session();
        session.transaction(async |s| unit(s).await).await.unwrap();
        assert_eq!(committed_parents(&db).await, 1);
        let failed: Result<(), DemoError> = session
            .transaction(async |s| {
                unit(s).await?;
                Err(DemoError::Check("changed my mind".into()))
            })
            .await;
        assert!(failed.is_err());
        assert_eq!(committed_parents(&db).await, 1, "{}", db.backend);
        assert_eq!(partial_units(&db, 2), 0);
    }
}

#[tokio::test]
async fn a_cancelled_transaction_scope_cannot_be_committed_later() {
    for db in TestDb::all("scope_cancelled") {
        let engine = db.engine().await;
        migrate(&engine).await;
        let mut session = engine.session();
        let scope = session.transaction(async |s| {
            let id = s.run_sync(insert_parent).await?;
            tokio::time::sleep(Duration::from_secs(60)).await;
            s.run_sync(move |c| insert_children(c, id)).await
        });
        assert!(
            tokio::time::timeout(Duration::from_millis(300), scope)
                .await
                .is_err()
        );
        let commit = session.commit().await;
        assert!(
            matches!(commit, Err(Error::PendingRollback(_))),
            "{commit:?}"
        );
        session.rollback().await.unwrap();
        assert_eq!(committed_parents(&db).await, 0, "{}", db.backend);
        assert_eq!(open_transactions(&db), 0, "{}", db.backend);
    }
}

/// Cancels inside `f` (the blocking task keeps running), at commit, and at
/// `engine.begin`'s checkout; then checks nothing half-done was committed.
#[tokio::test]
async fn cancellation_at_each_await_commits_nothing_partial() {
    for db in TestDb::all("cancel_each_await") {
        let engine = db.migrated_engine(2, Duration::from_secs(5)).await;

        // Inside f: the parent is written, then the future is dropped.
        let mut session = engine.session();
        let id = session.run_sync(insert_parent).await.unwrap();
        let slow = session.run_sync(move |c| {
            std::thread::sleep(Duration::from_millis(300));
            insert_children(c, id)
        });
        assert!(
            tokio::time::timeout(Duration::from_millis(50), slow)
                .await
                .is_err()
        );
        let refused = session.run_sync(count_parents).await;
        assert!(matches!(
            refused,
            Err(DemoError::Session(Error::PendingRollback(_)))
        ));
        // rollback() waits for the cancelled task: when it returns, nothing
        // of the session's is open on the server, with no settling needed.
        let started = std::time::Instant::now();
        session.rollback().await.unwrap();
        assert!(
            started.elapsed() >= Duration::from_millis(150),
            "it waited for f"
        );
        assert_eq!(open_transactions(&db), 0, "{}: inside f", db.backend);
        assert_eq!(committed_parents(&db).await, 0, "{}: inside f", db.backend);
        settle(&engine).await;

        // At commit: the commit either happened whole or not at all.
        let mut session = engine.session();
        unit(&mut session).await.unwrap();
        let _ = tokio::time::timeout(Duration::ZERO, session.commit()).await;
        drop(session);
        settle(&engine).await;
        assert!(committed_parents(&db).await <= 1);

        // At begin's checkout: the only connection is held, so it waits; dropped.
        let single = db
            .engine_with(EngineOptions::default().max_size(1))
            .await;
        let mut holder = single.session();
        holder.run_sync(count_parents).await.unwrap();
        let waiting = tokio::time::timeout(Duration::from_millis(50), single.begin()).await;
        assert!(waiting.is_err(), "{}: begin should still wait", db.backend);
        drop(holder);
        settle(&single).await;
        single.begin().await.unwrap().commit().await.unwrap();

        assert_eq!(partial_units(&db, 2), 0, "{}", db.backend);
        assert_eq!(open_transactions(&db), 0, "{}", db.backend);
        let mut session = engine.session();
        session.run_sync(count_parents).await.unwrap();
    }
}

/// Drops the unit of work at pseudo-random points, many times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_cancellation_never_commits_half_a_unit() {
    for db in TestDb::all("random_cancel") {
        let engine = db.migrated_engine(4, Duration::from_secs(10)).await;
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut completed = 0;
        for _ in 0..100 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let delay = Duration::from_micros(seed % 4_000);
            let mut session = engine.session();
            let work = async {
                session.begin()?;
                unit(&mut session).await?;
                session.commit().await?;
                Ok::<_, DemoError>(())
            };
            if let Ok(Ok(())) = tokio::time::timeout(delay, work).await {
                completed += 1;
            }
        }
        settle(&engine).await;
        assert_eq!(partial_units(&db, 2), 0, "{}", db.backend);
        assert_eq!(open_transactions(&db), 0, "{}", db.backend);
        assert!(committed_parents(&db).await >= completed);
        assert!(engine.status().connections <= 4);
    }
}

#[tokio::test]
async fn engine_run_sync_commits_in_one_call_and_rolls_back_on_error_or_panic() {
    for db in TestDb::all("engine_run_sync") {
        let engine = db.engine().await;
        migrate(&engine).await;
        engine.transaction(insert_unit).await.unwrap();
        assert_eq!(committed_parents(&db).await, 1, "{}", db.backend);

        let failed = engine
            .transaction(|c| -> Result<(), DemoError> {
                insert_parent(c)?;
                Err(DemoError::Check("no children after all".into()))
            })
            .await;
        assert!(matches!(failed, Err(DemoError::Check(_))), "{failed:?}");
        let panicked = engine
            .transaction(|c| -> Result<(), DemoError> {
                insert_parent(c)?;
                panic!("half way")
            })
            .await;
        assert!(matches!(panicked, Err(DemoError::Session(Error::Panic(_)))));
        settle(&engine).await;
        assert_eq!(committed_parents(&db).await, 1, "{}", db.backend);
        assert_eq!(partial_units(&db, 2), 0);
        assert_eq!(open_transactions(&db), 0);
    }
}

/// A task that returns its connection and asks again at once must not jump
/// ahead of a task already waiting (bb8 alone lets it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkouts_are_served_first_come_first_served() {
    let db = TestDb::sqlite("fair_checkout");
    let engine = db
        .engine_with(EngineOptions::default().max_size(1))
        .await;
    migrate(&engine).await;
    let greedy_rounds = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let greedy = {
        let (engine, rounds) = (engine.clone(), greedy_rounds.clone());
        tokio::spawn(async move {
            for _ in 0..200 {
                engine
                    .transaction(|c| {
                        std::thread::sleep(Duration::from_millis(1));
                        count_parents(c)
                    })
                    .await
                    .unwrap();
                rounds.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let before = greedy_rounds.load(Ordering::SeqCst);
    engine.transaction(count_parents).await.unwrap();
    let waited_for = greedy_rounds.load(Ordering::SeqCst) - before;
    greedy.await.unwrap();
    assert!(
        waited_for <= 3,
        "the waiting task let {waited_for} later checkouts pass it"
    );
}

/// Every SQLite URL form works; `:memory:` keeps one connection, so the
/// database survives from one session to the next.
#[tokio::test]
async fn sqlite_url_forms_all_work() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("forms.db");
    let urls = [
        format!("sqlite://{}", file.display()),
        file.display().to_string(),
        ":memory:".to_owned(),
        "sqlite::memory:".to_owned(),
    ];
    for url in urls {
        let engine =
            diesel_runsync::Engine::<AnyConnection>::connect(&url, EngineOptions::default())
                .await
                .unwrap_or_else(|e| panic!("{url}: {e}"));
        migrate(&engine).await;
        engine.transaction(insert_unit).await.unwrap();
        let parents = engine.session().run_sync(count_parents).await.unwrap();
        assert_eq!(parents, 1, "{url}");
        if url.contains(":memory:") {
            assert_eq!(engine.status().connections, 1, "{url}: one connection");
        }
    }
    assert!(file.exists());
}
