//! `EngineOptions::run_inline`, on every backend: a call without a deadline
//! runs on the calling task's thread (`block_in_place`), with the same
//! outcomes as through the blocking pool: committed work, rolled-back
//! errors and panics, an engine that serves on. Calls with a deadline, a
//! current-thread runtime, the option off, or an `Engine::transaction` that
//! finds every connection busy keep the hop. A future cannot
//! be dropped while its call runs inline: the call runs to its end.

mod common;

use std::thread::ThreadId;
use std::time::Duration;

use common::{TestBackend, TestDb, insert_unit, next_unit, per_backend};
use diesel_runsync::{Engine, EngineOptions, Error};

async fn engine<C: TestBackend>(db: &TestDb<C>, inline: bool) -> Engine<C> {
    db.create_schema().await;
    db.engine_with(EngineOptions::default().run_inline(inline))
        .await
}

/// The thread a transaction's closure ran on.
async fn ran_on<C: TestBackend>(engine: &Engine<C>) -> ThreadId {
    engine
        .transaction(|_| Ok::<_, Error>(std::thread::current().id()))
        .await
        .unwrap()
}

per_backend!(calls_run_on_the_callers_thread_and_commit, multi_thread);
async fn calls_run_on_the_callers_thread_and_commit<C: TestBackend>(db: TestDb<C>) {
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
    assert_eq!(ran, caller, "{}", db.backend());
    assert_eq!(
        db.rows().await,
        4,
        "{}: two units of two rows",
        db.backend()
    );
}

per_backend!(a_deadline_or_the_option_off_keeps_the_hop, multi_thread);
async fn a_deadline_or_the_option_off_keeps_the_hop<C: TestBackend>(db: TestDb<C>) {
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
}

per_backend!(a_current_thread_runtime_keeps_the_hop);
async fn a_current_thread_runtime_keeps_the_hop<C: TestBackend>(db: TestDb<C>) {
    let engine = engine(&db, true).await;
    assert_ne!(ran_on(&engine).await, std::thread::current().id());
}

per_backend!(
    errors_and_panics_roll_back_and_the_engine_serves_on,
    multi_thread
);
async fn errors_and_panics_roll_back_and_the_engine_serves_on<C: TestBackend>(db: TestDb<C>) {
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
    assert_eq!(db.rows().await, 0, "{}: nothing committed", db.backend());
    engine
        .transaction(|c| insert_unit(c, next_unit()))
        .await
        .unwrap();
    assert_eq!(db.rows().await, 2, "{}", db.backend());
    let status = engine.status();
    assert_eq!(
        status.idle, status.connections,
        "every connection back: {status:?}"
    );
}

// The option's price, as documented: a call cannot be cut short by
// dropping its future; the timeout below cannot fire while the closure
// runs, and the transaction commits.
per_backend!(an_inline_call_runs_to_its_end, multi_thread);
async fn an_inline_call_runs_to_its_end<C: TestBackend>(db: TestDb<C>) {
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
    assert!(
        matches!(outcome, Ok(Ok(()))),
        "{}: {outcome:?}",
        db.backend()
    );
    assert_eq!(db.rows().await, 2, "{}: committed", db.backend());
}

// A transaction that finds the engine busy is queued as without the
// option, not run inline once a connection frees: dropped while it runs
// (on the blocking thread that took it), it is rolled back; run inline, it
// would have run to its end and committed.
per_backend!(
    a_transaction_that_waits_for_a_busy_engine_keeps_the_hop,
    multi_thread
);
async fn a_transaction_that_waits_for_a_busy_engine_keeps_the_hop<C: TestBackend>(db: TestDb<C>) {
    db.create_schema().await;
    let engine = db
        .engine_with(EngineOptions::default().max_size(1).run_inline(true))
        .await;
    let mut holder = engine.session();
    holder.run_sync(common::count_rows).await.unwrap();
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        holder.rollback().await.unwrap();
    });
    let unit = next_unit();
    let outcome = tokio::time::timeout(
        Duration::from_millis(300),
        engine.transaction(move |c| {
            insert_unit(c, unit)?;
            std::thread::sleep(Duration::from_millis(500));
            Ok::<_, diesel::result::Error>(())
        }),
    )
    .await;
    assert!(outcome.is_err(), "{}: {outcome:?}", db.backend());
    release.await.unwrap();
    common::settle(&engine).await;
    assert_eq!(db.rows().await, 0, "{}: rolled back", db.backend());
    assert_eq!(db.open_transactions().await, 0, "{}", db.backend());
    // With a connection free, the next one runs inline again.
    let caller = std::thread::current().id();
    assert_eq!(ran_on(&engine).await, caller, "{}", db.backend());
}
