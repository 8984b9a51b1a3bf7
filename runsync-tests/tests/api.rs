//! The API promises of this release, on every backend: a `run_sync` closure
//! returns Diesel's `QueryResult` directly and `?` turns it into this
//! crate's `Error` with no wrapping; facade errors travel through such a
//! closure and come back as themselves; `transaction_with_retry` takes a
//! `QueryResult` closure; an `Error::Database` prints Diesel's message once;
//! a user's Diesel instrumentation sees every statement while the engine's
//! own checks stay on.

mod common;

use std::time::Duration;

use common::{TestBackend, TestDb, count_rows, insert_part, next_unit, per_backend};
use diesel::RunQueryDsl;
use diesel::query_builder::{QueryFragment, SqlQuery};
use diesel::result::QueryResult;
use diesel_runsync::{AsyncSession, Engine, Error, RetryPolicy};

/// Plain Diesel in the closure, `?` in a function returning `Error`: no
/// `Ok::<_, Error>` anywhere.
async fn insert_and_commit<C: TestBackend>(engine: &Engine<C>, unit: i32) -> Result<usize, Error>
where
    SqlQuery: QueryFragment<C::Backend>,
{
    let mut session = engine.session();
    let inserted = session
        .run_sync(move |c| {
            diesel::sql_query(format!(
                "INSERT INTO items (unit, part) VALUES ({unit}, 0), ({unit}, 1)"
            ))
            .execute(c)
        })
        .await?;
    session.commit().await?;
    Ok(inserted)
}

/// The same shape, for a session that is refusing work.
async fn count_through_question_mark<C: TestBackend>(
    session: &mut AsyncSession<C>,
) -> Result<i64, Error> {
    Ok(session.run_sync(count_rows).await?)
}

per_backend!(query_result_closures_need_no_wrapping_and_carry_facade_errors);
async fn query_result_closures_need_no_wrapping_and_carry_facade_errors<C: TestBackend>(
    db: TestDb<C>,
) where
    SqlQuery: QueryFragment<C::Backend>,
{
    let engine = db.migrated_engine(1, Duration::from_millis(300)).await;
    let inserted = insert_and_commit(&engine, next_unit()).await.unwrap();
    assert_eq!(inserted, 2, "{}", db.backend());
    assert_eq!(db.rows().await, 2, "{}", db.backend());

    // A database error comes out of the closure as Diesel's own error...
    let mut session = engine.session();
    let u = next_unit();
    let failed: QueryResult<usize> = session
        .run_sync(move |c| {
            diesel::sql_query(format!(
                "INSERT INTO items (unit, part) VALUES ({u}, 0), ({u}, 0)"
            ))
            .execute(c)
        })
        .await;
    assert!(
        matches!(failed, Err(diesel::result::Error::DatabaseError(..))),
        "{}: {failed:?}",
        db.backend()
    );
    // ...and the facade's refusal that follows comes back through a
    // QueryResult closure as the same variant: via From, and via `?`.
    let refused: QueryResult<usize> = session
        .run_sync(|c| diesel::sql_query("SELECT 1").execute(c))
        .await;
    let refused = refused.expect_err("the session refuses work");
    assert!(
        matches!(&refused, diesel::result::Error::QueryBuilderError(_)),
        "{refused:?}"
    );
    assert!(
        matches!(Error::from(refused), Error::PendingRollback(_)),
        "{}",
        db.backend()
    );
    let refused = count_through_question_mark(&mut session).await;
    assert!(
        matches!(refused, Err(Error::PendingRollback(_))),
        "{refused:?}"
    );
    session.rollback().await.unwrap();

    // A panic, likewise.
    let panicked: QueryResult<()> = session
        .run_sync(|_| -> QueryResult<()> { panic!("inside a QueryResult closure") })
        .await;
    match Error::from(panicked.expect_err("a panic is an error")) {
        Error::Panic(message) => assert!(message.contains("inside a QueryResult"), "{message}"),
        other => panic!("{}: expected Error::Panic, got {other:?}", db.backend()),
    }
    session.rollback().await.unwrap();

    // And a pool timeout: the engine's only connection is held elsewhere.
    let mut holder = engine.session();
    holder.run_sync(count_rows).await.unwrap();
    let timed_out = count_through_question_mark(&mut engine.session()).await;
    assert!(
        matches!(timed_out, Err(Error::PoolTimeout(_))),
        "{}: {timed_out:?}",
        db.backend()
    );
    holder.close().await.unwrap();
    assert_eq!(db.rows().await, 2, "{}", db.backend());
    assert_eq!(db.open_transactions().await, 0, "{}", db.backend());
}

/// Read, wait a moment, write: a lost update unless transactions serialize.
fn increment<C: TestBackend>(c: &mut C) -> QueryResult<i64> {
    if let Some(isolation) = C::COUNTER_ISOLATION {
        diesel::connection::SimpleConnection::batch_execute(c, isolation)?;
    }
    let n = c.scalar(&format!(
        "SELECT CAST(n AS {}) AS n FROM counter WHERE id = 1{}",
        C::BIGINT,
        C::COUNTER_LOCK
    ))?;
    std::thread::sleep(Duration::from_millis(1));
    diesel::connection::SimpleConnection::batch_execute(
        c,
        &format!("UPDATE counter SET n = {} WHERE id = 1", n + 1),
    )?;
    Ok(n + 1)
}

per_backend!(
    transaction_with_retry_takes_query_result_closures,
    multi_thread
);
/// 4 tasks x 25 increments of one counter over a pool of 4, each a
/// `QueryResult` closure run by `transaction_with_retry`: the sum is exact
/// and every committed increment saw a value of its own.
async fn transaction_with_retry_takes_query_result_closures<C: TestBackend>(db: TestDb<C>) {
    const TASKS: usize = 4;
    const INCREMENTS: usize = 25;
    let engine = db.migrated_engine(4, Duration::from_secs(30)).await;
    let policy = RetryPolicy::default()
        .max_attempts(200)
        .base_delay(Duration::from_millis(1))
        .max_delay(Duration::from_millis(50));
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let (engine, policy) = (engine.clone(), policy.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut attempts = 0;
                for _ in 0..INCREMENTS {
                    let done = engine
                        .transaction_with_retry(&policy, increment::<C>)
                        .await
                        .unwrap_or_else(|e| panic!("{}: {e}", C::NAME));
                    seen.push(done.value);
                    attempts += done.attempts;
                }
                (seen, attempts)
            })
        })
        .collect();
    let mut seen = Vec::new();
    let mut attempts = 0;
    for task in tasks {
        let (values, made) = task.await.unwrap();
        seen.extend(values);
        attempts += made;
    }
    let total = (TASKS * INCREMENTS) as i64;
    assert_eq!(db.counter().await, total, "{}", db.backend());
    seen.sort_unstable();
    assert_eq!(seen, (1..=total).collect::<Vec<_>>(), "{}", db.backend());
    let retries = attempts as i64 - total;
    eprintln!("{}: {total} increments, {retries} retries", db.backend());
    if C::COUNTER_CONFLICTS {
        assert!(
            retries > 0,
            "{}: no conflict was retried; the test lost its point",
            db.backend()
        );
    }
    assert_eq!(db.open_transactions().await, 0, "{}", db.backend());

    // A non-retryable error is returned at once, after one attempt.
    let u = next_unit();
    let failed = engine
        .transaction_with_retry(&policy, move |c| {
            insert_part(c, u, 0)?;
            insert_part(c, u, 0)
        })
        .await;
    assert!(
        matches!(
            Error::from(failed.expect_err("a unique violation")),
            Error::Database(_)
        ),
        "{}",
        db.backend()
    );
    assert_eq!(db.rows().await, 0, "{}", db.backend());
}

/// The error and its `source()` chain, as a reporter would print it.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut shown = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        shown.push_str(": ");
        shown.push_str(&cause.to_string());
        source = cause.source();
    }
    shown
}

per_backend!(a_database_error_prints_the_diesel_message_once);
async fn a_database_error_prints_the_diesel_message_once<C: TestBackend>(db: TestDb<C>) {
    let engine = db.engine().await;
    let mut session = engine.session();
    let u = next_unit();
    let error: Error = session
        .run_sync(move |c| -> Result<(), Error> {
            insert_part(c, u, 0)?;
            insert_part(c, u, 0)?;
            Ok(())
        })
        .await
        .expect_err("a unique violation");
    session.rollback().await.unwrap();
    let Error::Database(diesel::result::Error::DatabaseError(_, info)) = &error else {
        panic!("{}: expected Error::Database, got {error:?}", db.backend());
    };
    let message = info.message().to_owned();
    assert!(!message.is_empty(), "{}", db.backend());
    let shown = chain(&error);
    assert_eq!(
        shown.matches(message.as_str()).count(),
        1,
        "{}: {shown}",
        db.backend()
    );
    // The same error, come back through a QueryResult closure and `?`.
    let u = next_unit();
    let through: Result<(), Error> = async {
        session
            .run_sync(move |c| {
                insert_part(c, u, 0)?;
                insert_part(c, u, 0)
            })
            .await?;
        Ok(())
    }
    .await;
    let through = through.expect_err("a unique violation");
    let Error::Database(diesel::result::Error::DatabaseError(_, info)) = &through else {
        panic!(
            "{}: expected Error::Database, got {through:?}",
            db.backend()
        );
    };
    let message = info.message().to_owned();
    let shown = chain(&through);
    assert_eq!(
        shown.matches(message.as_str()).count(),
        1,
        "{}: {shown}",
        db.backend()
    );
    session.rollback().await.unwrap();
    assert_eq!(db.rows().await, 0, "{}", db.backend());
}

/// Events a user's instrumentation saw, by kind.
#[derive(Default)]
struct Seen {
    begins: u32,
    commits: u32,
    statements: Vec<String>,
}

struct Recorder(std::sync::Arc<std::sync::Mutex<Seen>>);

impl diesel::connection::Instrumentation for Recorder {
    fn on_connection_event(&mut self, event: diesel::connection::InstrumentationEvent<'_>) {
        use diesel::connection::InstrumentationEvent as E;
        let mut seen = self.0.lock().unwrap();
        match event {
            E::BeginTransaction { .. } => seen.begins += 1,
            E::CommitTransaction { .. } => seen.commits += 1,
            E::StartQuery { query, .. } => seen.statements.push(query.to_string()),
            _ => {}
        }
    }
}

per_backend!(a_user_instrumentation_sees_every_statement_and_the_checks_stay_on);
async fn a_user_instrumentation_sees_every_statement_and_the_checks_stay_on<C: TestBackend>(
    db: TestDb<C>,
) where
    SqlQuery: QueryFragment<C::Backend>,
{
    db.create_schema().await;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Seen::default()));
    let shared = seen.clone();
    let engine = db
        .engine_with(
            diesel_runsync::EngineOptions::default()
                .instrumentation(move || Recorder(shared.clone())),
        )
        .await;
    let unit = next_unit();
    engine
        .transaction(move |c| insert_part(c, unit, 0))
        .await
        .unwrap();
    {
        let seen = seen.lock().unwrap();
        assert_eq!((seen.begins, seen.commits), (1, 1), "{}", C::NAME);
        assert!(
            seen.statements
                .iter()
                .any(|s| s.contains(&format!("VALUES ({unit}, 0)"))),
            "{}: {:?}",
            C::NAME,
            seen.statements
        );
    }
    // The engine's check is still on: a closure that swallows a failed
    // statement on PostgreSQL (which aborts the transaction) cannot have
    // its COMMIT reported as a success.
    let unit = next_unit();
    let swallowed = engine
        .transaction(move |c| {
            insert_part(c, unit, 0)?;
            let _ = diesel::sql_query("SELECT * FROM no_such_table").execute(c);
            QueryResult::Ok(())
        })
        .await;
    let committed = db.units().await;
    match C::NAME {
        "postgres" => {
            let e = swallowed.expect_err("postgres: a COMMIT after an aborted statement");
            assert!(diesel_runsync::Retryable::is_retryable(&e), "postgres: {e}");
            assert_eq!(committed, 1, "postgres: the second unit committed");
        }
        // MySQL and SQLite undo only the failed statement: the rest commits.
        _ => {
            swallowed.unwrap_or_else(|e| panic!("{}: {e}", C::NAME));
            assert_eq!(committed, 2, "{}", C::NAME);
        }
    }
}
