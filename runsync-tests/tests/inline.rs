//! `EngineOptions::inline_embedded` on SQLite: a call without a deadline
//! runs on the calling task's thread (`block_in_place`), with the same
//! outcomes as through the blocking pool: committed work, rolled-back
//! errors and panics, an engine that serves on. Calls with a deadline, a
//! current-thread runtime, or the option off keep the hop. A future cannot
//! be dropped while its call runs inline: the call runs to its end.
#![cfg(feature = "sqlite")]

#[allow(unused_macros, unused_imports)]
mod common;

use std::thread::ThreadId;
use std::time::Duration;

use common::{TestDb, insert_unit, next_unit};
use diesel::SqliteConnection;
use diesel_runsync::{Engine, EngineOptions, Error};

type Db = TestDb<SqliteConnection>;

async fn engine(db: &Db, inline: bool) -> Engine<SqliteConnection> {
    db.create_schema().await;
    db.engine_with(EngineOptions::default().inline_embedded(inline))
        .await
}

/// The thread a transaction's closure ran on.
async fn ran_on(engine: &Engine<SqliteConnection>) -> ThreadId {
    engine
        .transaction(|_| Ok::<_, Error>(std::thread::current().id()))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_run_on_the_callers_thread_and_commit() {
    common::run(|db: Db| async move {
        let engine = engine(&db, true).await;
        assert_eq!(ran_on(&engine).await, std::thread::current().id());
        // From a task on a runtime worker too, through a session.
        let on_worker = engine.clone();
        let (caller, ran) = tokio::spawn(async move {
            let caller = std::thread::current().id();
            let mut session = on_worker.session();
            let unit = next_unit();
            let ran = session
                .run_sync(move |c| {
                    insert_unit(c, unit)?;
                    Ok::<_, Error>(std::thread::current().id())
                })
                .await
                .unwrap();
            session
                .run_sync(move |c| insert_unit(c, next_unit()))
                .await
                .unwrap();
            session.commit().await.unwrap();
            (caller, ran)
        })
        .await
        .unwrap();
        assert_eq!(ran, caller);
        assert_eq!(db.rows().await, 4, "two units of two rows, committed");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_or_the_option_off_keeps_the_hop() {
    common::run(|db: Db| async move {
        let inline = engine(&db, true).await;
        let mut session = inline.session();
        let ran = session
            .with_timeout(Duration::from_secs(5))
            .run_sync(|_| Ok::<_, Error>(std::thread::current().id()))
            .await
            .unwrap();
        session.commit().await.unwrap();
        assert_ne!(ran, std::thread::current().id(), "a call with a deadline");
        let hop = db.engine_with(EngineOptions::default()).await;
        assert_ne!(
            ran_on(&hop).await,
            std::thread::current().id(),
            "the option off"
        );
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_current_thread_runtime_keeps_the_hop() {
    common::run(|db: Db| async move {
        let engine = engine(&db, true).await;
        assert_ne!(ran_on(&engine).await, std::thread::current().id());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_and_panics_roll_back_and_the_engine_serves_on() {
    common::run(|db: Db| async move {
        let engine = engine(&db, true).await;
        let failed = engine
            .transaction(|c| {
                insert_unit(c, next_unit())?;
                Err::<(), _>(Error::Database(diesel::result::Error::NotFound))
            })
            .await;
        assert!(failed.is_err());
        let panicked = engine
            .transaction(|c| -> Result<(), Error> {
                insert_unit(c, next_unit())?;
                panic!("inline boom")
            })
            .await;
        match panicked {
            Err(Error::Panic(message)) => assert!(message.contains("inline boom"), "{message}"),
            other => panic!("expected Error::Panic, got {other:?}"),
        }
        // A session's transaction over two inline calls, rolled back.
        let mut session = engine.session();
        session
            .run_sync(|c| insert_unit(c, next_unit()))
            .await
            .unwrap();
        session
            .run_sync(|c| insert_unit(c, next_unit()))
            .await
            .unwrap();
        session.rollback().await.unwrap();
        drop(session);
        assert_eq!(db.rows().await, 0, "nothing committed");
        engine
            .transaction(|c| insert_unit(c, next_unit()))
            .await
            .unwrap();
        assert_eq!(db.rows().await, 2);
        let status = engine.status();
        assert_eq!(
            status.idle, status.connections,
            "every connection back: {status:?}"
        );
    })
    .await;
}

/// The option's price, as documented: a call cannot be cut short by
/// dropping its future; the timeout below cannot fire while the closure
/// runs, and the transaction commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inline_call_runs_to_its_end() {
    common::run(|db: Db| async move {
        let engine = engine(&db, true).await;
        let unit = next_unit();
        let outcome = tokio::time::timeout(
            Duration::from_millis(10),
            engine.transaction(move |c| {
                std::thread::sleep(Duration::from_millis(100));
                insert_unit(c, unit)
            }),
        )
        .await;
        assert!(matches!(outcome, Ok(Ok(()))), "{outcome:?}");
        assert_eq!(db.rows().await, 2, "committed");
    })
    .await;
}
