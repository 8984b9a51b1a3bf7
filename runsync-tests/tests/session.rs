//! The session's promises, on every backend: work inside a session's
//! transaction is visible to later `run_sync` calls and undone by rollback;
//! commit makes it durable; panics, errors, cancellation and dropped
//! sessions never commit part of a unit or leave a transaction open.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{
    TestBackend, TestDb, TestError, count_rows, insert_part, insert_unit, next_random, next_unit,
    per_backend, poll_at_most, settle, unit,
};
use diesel::result::QueryResult;
use diesel_runsync::{EngineOptions, Error, PoolEvent};

/// The facade error a `QueryResult` closure's failure carries.
fn facade<T: std::fmt::Debug>(result: QueryResult<T>) -> Error {
    Error::from(result.expect_err("expected an error"))
}

per_backend!(earlier_writes_are_visible_later_and_rollback_undoes_them);
async fn earlier_writes_are_visible_later_and_rollback_undoes_them<C: TestBackend>(db: TestDb<C>) {
    let engine = db.engine().await;
    let mut session = engine.session();
    unit(&mut session).await.unwrap();
    assert!(session.in_transaction());
    assert!(session.holds_connection());
    let seen = session.run_sync(count_rows).await.unwrap();
    assert_eq!(seen, 2, "{}: own uncommitted rows visible", db.backend());
    assert_eq!(db.rows().await, 0, "{}: not visible outside", db.backend());
    session.rollback().await.unwrap();
    assert!(!session.in_transaction());
    assert!(!session.holds_connection());
    assert_eq!(db.rows().await, 0, "{}", db.backend());
    assert_eq!(session.run_sync(count_rows).await.unwrap(), 0);
    session.close().await.unwrap();
    assert_eq!(db.open_transactions().await, 0, "{}", db.backend());
}

per_backend!(commit_makes_the_work_durable);
async fn commit_makes_the_work_durable<C: TestBackend>(db: TestDb<C>) {
    let engine = db.engine().await;
    let mut session = engine.session();
    session.begin().unwrap();
    assert!(matches!(
        session.begin(),
        Err(Error::TransactionAlreadyOpen)
    ));
    unit(&mut session).await.unwrap();
    session.commit().await.unwrap();
    assert!(!session.in_transaction());
    assert!(!session.holds_connection());
    assert_eq!(db.units().await, 1, "{}", db.backend());
    assert_eq!(db.rows().await, 2, "{}", db.backend());
    assert_eq!(db.partial_units().await, 0, "{}", db.backend());
    // A commit with nothing open is a no-op, as in SQLAlchemy.
    session.commit().await.unwrap();
    assert_eq!(db.open_transactions().await, 0, "{}", db.backend());
}

per_backend!(a_panic_in_the_closure_is_an_error_and_rolls_back);
async fn a_panic_in_the_closure_is_an_error_and_rolls_back<C: TestBackend>(db: TestDb<C>) {
    let engine = db.migrated_engine(2, Duration::from_secs(5)).await;
    for round in 0..10 {
        let mut session = engine.session();
        let u = next_unit();
        session
            .run_sync(move |c| insert_part(c, u, 0))
            .await
            .unwrap();
        let result = session
            .run_sync(move |c| -> Result<(), TestError> {
                insert_part(c, u, 1)?;
                panic!("boom in round {round}");
            })
            .await;
        match result {
            Err(TestError::Session(Error::Panic(message))) => {
                assert!(message.contains("boom in round"), "{message}")
            }
            other => panic!("{}: expected a panic error, got {other:?}", db.backend()),
        }
        // The session refuses work until the failure is acknowledged.
        let refused = facade(session.run_sync(count_rows).await);
        assert!(matches!(refused, Error::PendingRollback(_)), "{refused:?}");
        session.rollback().await.unwrap();
        assert_eq!(session.run_sync(count_rows).await.unwrap(), 0);
    }
    settle(&engine).await;
    assert_eq!(db.rows().await, 0, "{}", db.backend());
    assert_eq!(db.open_transactions().await, 0, "{}", db.backend());
    assert!(engine.status().connections <= 2, "{:?}", engine.status());
}

per_backend!(an_error_from_the_closure_rolls_back_the_whole_transaction);
async fn an_error_from_the_closure_rolls_back_the_whole_transaction<C: TestBackend>(db: TestDb<C>) {
    let engine = db.engine().await;
    let mut session = engine.session();
    // Earlier work in the same transaction, committed by nothing.
    let earlier = next_unit();
    session
        .run_sync(move |c| insert_unit(c, earlier))
        .await
        .unwrap();
    let u = next_unit();
    session
        .run_sync(move |c| insert_part(c, u, 0))
        .await
        .unwrap();
    let failed = session
        .run_sync(move |c| -> Result<(), TestError> {
            insert_part(c, u, 1)?;
            // The same part again: a unique-constraint error.
            insert_part(c, u, 1)?;
            Ok(())
        })
        .await;
    assert!(matches!(failed, Err(TestError::Database(_))), "{failed:?}");
    assert!(!session.in_transaction());
    // Refused until rollback(): no later step can be committed without the
    // earlier ones, whatever the closure's error type.
    let refused = facade(session.run_sync(count_rows).await);
    assert!(matches!(refused, Error::PendingRollback(_)), "{refused:?}");
    let refused = session
        .run_sync(|c| -> Result<i64, TestError> { Ok(count_rows(c)?) })
        .await;
    assert!(
        matches!(refused, Err(TestError::Session(Error::PendingRollback(_)))),
        "{refused:?}"
    );
    assert!(matches!(session.begin(), Err(Error::PendingRollback(_))));
    let commit = session.commit().await;
    assert!(
        matches!(commit, Err(Error::PendingRollback(_))),
        "{commit:?}"
    );
    session.rollback().await.unwrap();
    assert_eq!(db.rows().await, 0, "{}", db.backend());
    assert_eq!(db.open_transactions().await, 0, "{}", db.backend());
    // Usable again.
    unit(&mut session).await.unwrap();
    session.commit().await.unwrap();
    assert_eq!(db.rows().await, 2, "{}", db.backend());
}

per_backend!(dropping_a_session_rolls_back_and_returns_the_connection);
async fn dropping_a_session_rolls_back_and_returns_the_connection<C: TestBackend>(db: TestDb<C>) {
    let engine = db.engine().await;
    let mut session = engine.session();
    unit(&mut session).await.unwrap();
    assert!(session.holds_connection());
    drop(session);
    settle(&engine).await;
    assert_eq!(db.rows().await, 0, "{}", db.backend());
    assert_eq!(db.open_transactions().await, 0, "{}", db.backend());
    assert!(engine.status().idle >= 1, "{:?}", engine.status());
}

per_backend!(engine_begin_commits_or_rolls_back_when_dropped);
async fn engine_begin_commits_or_rolls_back_when_dropped<C: TestBackend>(db: TestDb<C>) {
    let engine = db.engine().await;
    let mut conn = engine.begin().await.unwrap();
    assert!(conn.holds_connection() && conn.in_transaction());
    unit(&mut conn).await.unwrap();
    drop(conn);
    settle(&engine).await;
    assert_eq!(db.rows().await, 0, "{}", db.backend());
    assert_eq!(db.open_transactions().await, 0, "{}", db.backend());

    let mut conn = engine.begin().await.unwrap();
    unit(&mut conn).await.unwrap();
    conn.commit().await.unwrap();
    assert!(!conn.holds_connection());
    assert_eq!(db.units().await, 1, "{}", db.backend());
    assert_eq!(db.partial_units().await, 0, "{}", db.backend());
}

per_backend!(a_transaction_scope_commits_on_ok_and_rolls_back_on_err);
async fn a_transaction_scope_commits_on_ok_and_rolls_back_on_err<C: TestBackend>(db: TestDb<C>) {
    let engine = db.engine().await;
    let mut session = engine.session();
    session.transaction(async |s| unit(s).await).await.unwrap();
    assert!(!session.in_transaction());
    assert_eq!(db.units().await, 1, "{}", db.backend());
    let failed: Result<(), TestError> = session
        .transaction(async |s| {
            unit(s).await?;
            Err(TestError::Check("changed my mind".into()))
        })
        .await;
    assert!(matches!(failed, Err(TestError::Check(_))), "{failed:?}");
    assert!(!session.in_transaction());
    assert_eq!(db.units().await, 1, "{}", db.backend());
    assert_eq!(db.partial_units().await, 0, "{}", db.backend());
    assert_eq!(db.open_transactions().await, 0, "{}", db.backend());
    // The scope's rollback left the session usable.
    session.transaction(async |s| unit(s).await).await.unwrap();
    assert_eq!(db.units().await, 2, "{}", db.backend());
}

per_backend!(a_cancelled_transaction_scope_cannot_be_committed_later);
async fn a_cancelled_transaction_scope_cannot_be_committed_later<C: TestBackend>(db: TestDb<C>) {
    let engine = db.engine().await;
    let mut session = engine.session();
    let u = next_unit();
    let scope = session.transaction(async |s| {
        s.run_sync(move |c| insert_part(c, u, 0)).await?;
        tokio::time::sleep(Duration::from_secs(60)).await;
        s.run_sync(move |c| insert_part(c, u, 1)).await
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
    let refused = facade(session.run_sync(count_rows).await);
    assert!(matches!(refused, Error::PendingRollback(_)), "{refused:?}");
    session.rollback().await.unwrap();
    assert_eq!(db.rows().await, 0, "{}", db.backend());
    assert_eq!(db.open_transactions().await, 0, "{}", db.backend());
    assert_eq!(session.run_sync(count_rows).await.unwrap(), 0);
}

per_backend!(cancellation_at_each_await_commits_nothing_partial);
/// Cancels inside `f` (the blocking task keeps running), at commit, and at
/// `engine.begin`'s checkout; then checks nothing half-done was committed.
async fn cancellation_at_each_await_commits_nothing_partial<C: TestBackend>(db: TestDb<C>) {
    let engine = db.migrated_engine(2, Duration::from_secs(5)).await;

    // Inside f: part 0 is written, then the future is dropped while f runs.
    let mut session = engine.session();
    let u = next_unit();
    session
        .run_sync(move |c| insert_part(c, u, 0))
        .await
        .unwrap();
    let slow = session.run_sync(move |c| {
        std::thread::sleep(Duration::from_millis(300));
        insert_part(c, u, 1)
    });
    assert!(
        tokio::time::timeout(Duration::from_millis(50), slow)
            .await
            .is_err()
    );
    let refused = facade(session.run_sync(count_rows).await);
    assert!(matches!(refused, Error::PendingRollback(_)), "{refused:?}");
    // rollback() waits for the cancelled task: when it returns, nothing of
    // the session's is open on the server, with no settling needed.
    let started = Instant::now();
    session.rollback().await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "{}: rollback() returned after {:?}, before f finished",
        db.backend(),
        started.elapsed()
    );
    assert_eq!(
        db.open_transactions().await,
        0,
        "{}: inside f",
        db.backend()
    );
    assert_eq!(db.rows().await, 0, "{}: inside f", db.backend());
    settle(&engine).await;

    // At commit: the commit either happened whole or not at all.
    let mut session = engine.session();
    unit(&mut session).await.unwrap();
    let _ = tokio::time::timeout(Duration::ZERO, session.commit()).await;
    drop(session);
    settle(&engine).await;
    assert!(db.units().await <= 1, "{}", db.backend());

    // At begin's checkout: the only connection is held, so it waits; dropped.
    let single = db.engine_with(EngineOptions::default().max_size(1)).await;
    let mut holder = single.session();
    holder.run_sync(count_rows).await.unwrap();
    let waiting = tokio::time::timeout(Duration::from_millis(50), single.begin()).await;
    assert!(
        waiting.is_err(),
        "{}: begin should still wait",
        db.backend()
    );
    drop(holder);
    settle(&single).await;
    single.begin().await.unwrap().commit().await.unwrap();

    assert_eq!(db.partial_units().await, 0, "{}", db.backend());
    assert_eq!(db.open_transactions().await, 0, "{}", db.backend());
    let mut session = engine.session();
    session.run_sync(count_rows).await.unwrap();
}

/// One unit with begin and commit; `committing` is set once the commit starts.
async fn staged_unit<C: TestBackend>(
    engine: &diesel_runsync::Engine<C>,
    committing: &AtomicBool,
) -> Result<(), TestError> {
    let mut session = engine.session();
    session.begin()?;
    unit(&mut session).await?;
    committing.store(true, Ordering::SeqCst);
    session.commit().await?;
    Ok(())
}

per_backend!(random_cancellation_never_commits_half_a_unit, multi_thread);
/// Drops units of work at pseudo-random points, many times: cut by poll
/// count, not by timers (tokio's timer ticks in milliseconds, longer than a
/// whole SQLite unit), so every await gets cut.
async fn random_cancellation_never_commits_half_a_unit<C: TestBackend>(db: TestDb<C>) {
    let engine = db.migrated_engine(4, Duration::from_secs(10)).await;
    // The polls a whole unit takes, so that the cut points span one.
    let mut spans = Vec::new();
    for _ in 0..10 {
        let committing = AtomicBool::new(false);
        let (finished, polls) = poll_at_most(staged_unit(&engine, &committing), u64::MAX).await;
        finished.expect("an unbounded unit finishes").unwrap();
        spans.push(polls);
    }
    spans.sort_unstable();
    let span = spans[spans.len() / 2].max(1);
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let (mut completed, mut dropped, mut dropped_committing, mut attempts) = (10, 0, 0, 0);
    while dropped < 100 && attempts < 2_000 {
        attempts += 1;
        let polls = 1 + next_random(&mut seed) % span;
        let committing = AtomicBool::new(false);
        match poll_at_most(staged_unit(&engine, &committing), polls)
            .await
            .0
        {
            Some(Ok(())) => completed += 1,
            Some(Err(e)) => panic!("{}: {e}", db.backend()),
            None => {
                dropped += 1;
                if committing.load(Ordering::SeqCst) {
                    dropped_committing += 1;
                }
            }
        }
    }
    assert_eq!(dropped, 100, "{}: enough drops (span {span})", db.backend());
    settle(&engine).await;
    assert_eq!(db.partial_units().await, 0, "{}", db.backend());
    assert_eq!(db.open_transactions().await, 0, "{}", db.backend());
    // Completed units committed; one dropped during its commit may have too.
    let units = db.units().await;
    assert!(
        units >= completed,
        "{}: {units} < {completed}",
        db.backend()
    );
    assert!(
        units <= completed + dropped_committing,
        "{}: {units} > {completed} + {dropped_committing}",
        db.backend()
    );
    eprintln!(
        "{}: span {span} polls; {dropped} units dropped ({dropped_committing} during commit), \
         {completed} completed, {units} committed",
        db.backend()
    );
    let status = engine.status();
    assert!(status.connections <= 4, "{status:?}");
    assert_eq!(status.idle, status.connections, "{status:?}");
    engine.session().run_sync(count_rows).await.unwrap();
}

per_backend!(engine_transaction_commits_in_one_call_and_rolls_back_on_error_or_panic);
async fn engine_transaction_commits_in_one_call_and_rolls_back_on_error_or_panic<C: TestBackend>(
    db: TestDb<C>,
) {
    let engine = db.engine().await;
    let u = next_unit();
    engine
        .transaction(move |c| insert_unit(c, u))
        .await
        .unwrap();
    assert_eq!(db.units().await, 1, "{}", db.backend());

    let u = next_unit();
    let failed = engine
        .transaction(move |c| -> Result<(), TestError> {
            insert_part(c, u, 0)?;
            Err(TestError::Check("no second part after all".into()))
        })
        .await;
    assert!(matches!(failed, Err(TestError::Check(_))), "{failed:?}");
    let u = next_unit();
    let failed = engine
        .transaction(move |c| {
            insert_part(c, u, 0)?;
            insert_part(c, u, 0)
        })
        .await;
    assert!(
        matches!(facade(failed), Error::Database(_)),
        "{}",
        db.backend()
    );
    let u = next_unit();
    let panicked = engine
        .transaction(move |c| -> Result<(), TestError> {
            insert_part(c, u, 0)?;
            panic!("half way")
        })
        .await;
    assert!(
        matches!(panicked, Err(TestError::Session(Error::Panic(_)))),
        "{panicked:?}"
    );
    settle(&engine).await;
    assert_eq!(db.units().await, 1, "{}", db.backend());
    assert_eq!(db.partial_units().await, 0, "{}", db.backend());
    assert_eq!(db.open_transactions().await, 0, "{}", db.backend());
}

/// A transaction that holds its connection for 1 ms.
async fn a_one_ms_transaction<C: TestBackend>(engine: &diesel_runsync::Engine<C>) {
    engine
        .transaction(|c| {
            std::thread::sleep(Duration::from_millis(1));
            count_rows(c)
        })
        .await
        .unwrap();
}

per_backend!(checkouts_are_served_first_come_first_served, multi_thread);
/// A task that returns its connection and asks again at once must not jump
/// ahead of a task already waiting (bb8 alone lets it).
async fn checkouts_are_served_first_come_first_served<C: TestBackend>(db: TestDb<C>) {
    db.create_schema().await;
    let engine = db.engine_with(EngineOptions::default().max_size(1)).await;
    let greedy_rounds = Arc::new(AtomicUsize::new(0));
    let greedy = {
        let (engine, rounds) = (engine.clone(), greedy_rounds.clone());
        tokio::spawn(async move {
            for _ in 0..200 {
                a_one_ms_transaction(&engine).await;
                rounds.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let before = greedy_rounds.load(Ordering::SeqCst);
    engine.transaction(count_rows).await.unwrap();
    let waited_for = greedy_rounds.load(Ordering::SeqCst) - before;
    greedy.await.unwrap();
    assert!(
        waited_for <= 3,
        "{}: the waiting task let {waited_for} later checkouts pass it",
        db.backend()
    );
}

per_backend!(
    queued_transactions_dropped_or_out_of_time_never_run,
    multi_thread
);
/// An `Engine::transaction` that finds the engine's connections busy waits
/// in its queue: dropped there, or out of time there (its deadline, the
/// connection timeout), it returns at once and never runs; the engine goes
/// on.
async fn queued_transactions_dropped_or_out_of_time_never_run<C: TestBackend>(db: TestDb<C>) {
    db.create_schema().await;
    let ms = Duration::from_millis;
    for deadline in [true, false] {
        let options = EngineOptions::default().max_size(1);
        let options = if deadline {
            options.statement_timeout(Some(ms(200)))
        } else {
            options.connection_timeout(ms(200))
        };
        let engine = db.engine_with(options).await;
        let units_before = db.units().await;
        // A session holds the only connection, its transaction open.
        let mut holder = engine.session();
        holder.run_sync(count_rows).await.unwrap();

        let u = next_unit();
        let dropped =
            tokio::time::timeout(ms(50), engine.transaction(move |c| insert_unit(c, u))).await;
        assert!(dropped.is_err(), "{}: it could not run", db.backend());

        let u = next_unit();
        let asked = Instant::now();
        let error = facade(engine.transaction(move |c| insert_unit(c, u)).await);
        let took = asked.elapsed();
        match (deadline, &error) {
            (true, Error::Timeout(limit)) => assert_eq!(*limit, ms(200)),
            (false, Error::PoolTimeout(limit)) => assert_eq!(*limit, ms(200)),
            _ => panic!("{}: deadline {deadline}: {error:?}", db.backend()),
        }
        assert!(took < ms(1500), "{}: returned after {took:?}", db.backend());

        holder.rollback().await.unwrap();
        settle(&engine).await;
        // Time for a unit that was wrongly left queued to run.
        engine.transaction(count_rows).await.unwrap();
        tokio::time::sleep(ms(100)).await;
        assert_eq!(
            db.units().await,
            units_before,
            "{}: deadline {deadline}",
            db.backend()
        );
        let u = next_unit();
        engine
            .transaction(move |c| insert_unit(c, u))
            .await
            .unwrap();
        assert_eq!(db.units().await, units_before + 1, "{}", db.backend());
        assert_eq!(db.open_transactions().await, 0, "{}", db.backend());
    }
}

per_backend!(
    a_busy_engine_serves_queued_transactions_back_to_back,
    multi_thread
);
/// 16 tasks over 2 connections: the transactions that wait are taken, one
/// after the other, by the blocking thread that finishes one, on the
/// connection it holds, not each after a checkout of its own; every one
/// commits.
async fn a_busy_engine_serves_queued_transactions_back_to_back<C: TestBackend>(db: TestDb<C>) {
    db.create_schema().await;
    let checkouts = Arc::new(AtomicUsize::new(0));
    let counted = checkouts.clone();
    let options = EngineOptions::default()
        .max_size(2)
        .on_pool_event(move |event| {
            if event == PoolEvent::Checkout {
                counted.fetch_add(1, Ordering::Relaxed);
            }
        });
    let engine = db.engine_with(options).await;
    let before = checkouts.load(Ordering::Relaxed);
    let (tasks, rounds) = (16, 25);
    let running: Vec<_> = (0..tasks)
        .map(|_| {
            let engine = engine.clone();
            tokio::spawn(async move {
                for _ in 0..rounds {
                    let u = next_unit();
                    engine
                        .transaction(move |c| insert_unit(c, u))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for task in running {
        task.await.unwrap();
    }
    let units = (tasks * rounds) as i64;
    assert_eq!(db.units().await, units, "{}", db.backend());
    assert_eq!(db.partial_units().await, 0, "{}", db.backend());
    let checked_out = checkouts.load(Ordering::Relaxed) - before;
    eprintln!(
        "{}: {units} transactions, {checked_out} checkouts",
        db.backend()
    );
    assert!(
        (checked_out as i64) < units / 2,
        "{}: {checked_out} checkouts for {units} transactions",
        db.backend()
    );
    // The last thread put its connection back before waking its caller.
    let status = engine.status();
    assert_eq!(
        status.idle,
        status.connections,
        "{}: {status:?}",
        db.backend()
    );
}

per_backend!(
    a_session_gets_its_turn_while_transactions_keep_the_engine_busy,
    multi_thread
);
/// Queued transactions served back to back do not starve a session: once
/// it waits for a connection, the thread that finishes a transaction hands
/// its connection back instead of taking the next one, and the session is
/// served in its turn.
async fn a_session_gets_its_turn_while_transactions_keep_the_engine_busy<C: TestBackend>(
    db: TestDb<C>,
) {
    db.create_schema().await;
    let engine = db.engine_with(EngineOptions::default().max_size(1)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let busy: Vec<_> = (0..8)
        .map(|_| {
            let (engine, stop) = (engine.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    a_one_ms_transaction(&engine).await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let mut waits = Vec::new();
    for _ in 0..5 {
        let asked = Instant::now();
        let mut session = engine.session();
        session.run_sync(count_rows).await.unwrap();
        waits.push(asked.elapsed());
        session.commit().await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for task in busy {
        task.await.unwrap();
    }
    // Seven transactions of 1 ms ahead of it at most (it is served in its
    // turn); a thread that kept serving the queue would hold it back for
    // up to `SERVE_FOR` (100 ms) at a time.
    waits.sort_unstable();
    let median = waits[waits.len() / 2];
    assert!(
        median < Duration::from_millis(50),
        "{}: a session waited {waits:?}",
        db.backend()
    );
}

/// Every SQLite URL form works; `:memory:` keeps one connection, so the
/// database survives from one session to the next.
#[tokio::test]
#[cfg_attr(not(feature = "sqlite"), ignore = "built without the sqlite feature")]
async fn sqlite_url_forms_all_work() {
    #[cfg(feature = "sqlite")]
    {
        use diesel::SqliteConnection;
        use diesel::connection::SimpleConnection;
        use diesel_runsync::{Backend, Engine};

        let dir = tempfile::tempdir().unwrap();
        let file = |n: u32| dir.path().join(format!("forms{n}.db"));
        let urls = [
            format!("sqlite://{}", file(1).display()),
            file(2).display().to_string(),
            format!("file:{}", file(3).display()),
            ":memory:".to_owned(),
            "sqlite::memory:".to_owned(),
        ];
        for url in &urls {
            let engine = Engine::<SqliteConnection>::connect(url, EngineOptions::default())
                .await
                .unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(engine.url().backend(), Backend::Sqlite, "{url}");
            engine
                .transaction(|c| c.batch_execute(<SqliteConnection as TestBackend>::SCHEMA))
                .await
                .unwrap_or_else(|e| panic!("{url}: {e}"));
            let u = next_unit();
            engine
                .transaction(move |c| insert_unit(c, u))
                .await
                .unwrap();
            let rows = engine.session().run_sync(count_rows).await.unwrap();
            assert_eq!(rows, 2, "{url}");
            if url.contains(":memory:") {
                assert_eq!(engine.status().connections, 1, "{url}: one connection");
            }
        }
        for n in 1..=3 {
            assert!(file(n).exists(), "{}", file(n).display());
        }
    }
}
