//! Fault suite: each test exists once per backend (`name::sqlite`,
//! `name::postgres`, `name::mysql`), prints one figure line (straight to
//! stderr, so `cargo test` shows it) and fails if a bound breaks. Every unit
//! of work is "a parent with its two children", so a partial commit shows
//! as a parent without both children.
//!
//! `RUNSYNC_FAULT_ROUNDS` scales the round counts (default below).

mod common;

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::{TestDb, blocking, insert_children, insert_parent, migrate, per_backend, settle};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer};
use diesel_runsync::{Backend, EngineOptions, Error, RetryPolicy};
use greenlet_orm::schema::a;
use greenlet_orm::{AnyConnection, DemoError, NewA};
use runsync_testkit::chaos::{next_random, poll_at_most};

fn rounds(default: usize) -> usize {
    std::env::var("RUNSYNC_FAULT_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn figure(line: String) {
    let _ = writeln!(std::io::stderr(), "FIGURE {line}");
}

/// What a fault test checks once its rounds are over.
struct Aftermath {
    status: diesel_runsync::PoolStatus,
    partial: i64,
    open: i64,
    parents: i64,
}

/// Waits for the pool to settle, then reads the pool's counts, the partial
/// units, the open transactions and the committed parents.
async fn aftermath(db: &TestDb, engine: &diesel_runsync::Engine<AnyConnection>) -> Aftermath {
    settle(engine).await;
    let parents = db
        .with_connection(|c| a::table.count().get_result(c).unwrap())
        .await;
    Aftermath {
        status: engine.status(),
        partial: db.partial_units(2).await,
        open: db.open_transactions().await,
        parents,
    }
}

per_backend!(
    panics_at_random_points_lose_nothing_and_poison_nothing,
    multi_thread
);
async fn panics_at_random_points_lose_nothing_and_poison_nothing(db: TestDb) {
    let n = rounds(1_000);
    let engine = db.migrated_engine(4, Duration::from_secs(10)).await;
    let mut seed = 0x2545_f491_4f6c_dd1d;
    let (mut panics, mut committed) = (0, 0);
    for _ in 0..n {
        let point = next_random(&mut seed) % 4; // 0: before, 1: between, 2: after children, 3: none
        let mut session = engine.session();
        let result = session
            .run_sync(move |c| {
                if point == 0 {
                    panic!("before the parent");
                }
                let id = insert_parent(c)?;
                if point == 1 {
                    panic!("between parent and children");
                }
                insert_children(c, id)?;
                if point == 2 {
                    panic!("after the children");
                }
                Ok::<_, DemoError>(())
            })
            .await;
        match result {
            Ok(()) => {
                session.commit().await.unwrap();
                committed += 1;
            }
            Err(DemoError::Session(Error::Panic(_))) => panics += 1,
            Err(other) => panic!("{}: unexpected {other}", db.backend),
        }
    }
    let Aftermath {
        status,
        partial,
        open,
        parents,
    } = aftermath(&db, &engine).await;
    figure(format!(
        "panic {}: rounds={n} panics={panics} committed={committed} rows={parents} partial_units={partial} open_transactions={open} pool={}/{} idle",
        db.backend, status.idle, status.connections
    ));
    assert_eq!(panics + committed, n);
    assert_eq!(parents, committed as i64, "{}", db.backend);
    assert_eq!((partial, open), (0, 0), "{}", db.backend);
    assert!(status.connections <= 4 && status.idle == status.connections);
}

/// Where a unit of work was when its future was dropped.
const STAGES: [&str; 8] = [
    "engine.begin",
    "run_sync#1 before f",
    "inside f#1",
    "after f#1",
    "run_sync#2 before f",
    "inside f#2",
    "after f#2",
    "commit",
];

/// One unit whose every await publishes its stage (see [`STAGES`]); the
/// closures publish from the blocking thread when they start and end.
async fn staged_unit(
    engine: &diesel_runsync::Engine<AnyConnection>,
    stage: &Arc<AtomicU32>,
) -> Result<(), DemoError> {
    let set = |s: &Arc<AtomicU32>, v| s.store(v, Ordering::SeqCst);
    set(stage, 0);
    let mut session = engine.begin().await?;
    set(stage, 1);
    let inner = stage.clone();
    let id = session
        .run_sync(move |c| {
            set(&inner, 2);
            let id = insert_parent(c);
            set(&inner, 3);
            id
        })
        .await?;
    set(stage, 4);
    let inner = stage.clone();
    session
        .run_sync(move |c| {
            set(&inner, 5);
            let done = insert_children(c, id);
            set(&inner, 6);
            done
        })
        .await?;
    set(stage, 7);
    session.commit().await?;
    Ok(())
}

per_backend!(
    futures_dropped_at_random_awaits_leave_no_trace,
    multi_thread
);
async fn futures_dropped_at_random_awaits_leave_no_trace(db: TestDb) {
    let n = rounds(1_000);
    let engine = db.migrated_engine(4, Duration::from_secs(10)).await;
    // Count the polls a few whole units take, so the random cut points
    // span one (polls, not a timer: tokio's timer ticks in milliseconds,
    // longer than a whole SQLite unit).
    let mut spans = Vec::new();
    for _ in 0..20 {
        let stage = Arc::new(AtomicU32::new(0));
        let (finished, polls) = poll_at_most(staged_unit(&engine, &stage), u64::MAX).await;
        finished.expect("an unbounded unit finishes").unwrap();
        spans.push(polls);
    }
    spans.sort_unstable();
    let span = spans[spans.len() / 2].max(1);
    let mut seed = 0x9e37_79b9_7f4a_7c15;
    let (mut completed, mut dropped, mut attempts) = (20, 0, 0);
    let mut at = [0usize; STAGES.len()];
    while dropped < n && attempts < 20 * n {
        attempts += 1;
        let polls = 1 + next_random(&mut seed) % span;
        // A stage of its own: a dropped unit's blocking task may still run.
        let stage = Arc::new(AtomicU32::new(0));
        match poll_at_most(staged_unit(&engine, &stage), polls).await.0 {
            Some(Ok(())) => completed += 1,
            Some(Err(e)) => panic!("{}: {e}", db.backend),
            None => {
                dropped += 1;
                at[stage.load(Ordering::SeqCst) as usize] += 1;
            }
        }
    }
    let Aftermath {
        status,
        partial,
        open,
        parents,
    } = aftermath(&db, &engine).await;
    let where_dropped: Vec<String> = STAGES
        .iter()
        .zip(at)
        .map(|(name, count)| format!("{name}:{count}"))
        .collect();
    figure(format!(
        "cancel {}: dropped={dropped} completed={completed} committed_units={parents} partial_units={partial} open_transactions={open} pool={}/{} idle; dropped at [{}]",
        db.backend,
        status.idle,
        status.connections,
        where_dropped.join(", ")
    ));
    assert_eq!(dropped, n, "{}: enough drops", db.backend);
    assert_eq!((partial, open), (0, 0), "{}", db.backend);
    // Completed units committed; a unit dropped at commit may have committed too.
    assert!(parents as usize >= completed, "{}", db.backend);
    assert!(parents as usize <= completed + at[7], "{}", db.backend);
    assert_eq!(status.idle, status.connections);
    engine.session().run_sync(insert_parent).await.unwrap();
}

#[derive(QueryableByName)]
struct Id {
    #[diesel(sql_type = BigInt)]
    id: i64,
}

per_backend!(
    connections_killed_by_the_server_are_errors_and_evicted,
    [postgres, mysql]
);
async fn connections_killed_by_the_server_are_errors_and_evicted(db: TestDb) {
    let n = rounds(100);
    let backend = db.backend;
    let engine = db
        .engine_with(
            EngineOptions::default()
                .max_size(2)
                .ping_after(Duration::ZERO),
        )
        .await;
    migrate(&engine).await;
    let mut admin = blocking({
        let db = db.clone();
        move || db.connect()
    })
    .await;
    let mut errors = 0;
    for _ in 0..n {
        let mut session = engine.session();
        let (parent, pid) = session
            .run_sync(|c| {
                let parent = insert_parent(c)?;
                let sql = match c.backend() {
                    Backend::Postgres => "SELECT CAST(pg_backend_pid() AS BIGINT) AS id",
                    _ => "SELECT CAST(CONNECTION_ID() AS SIGNED) AS id",
                };
                let pid = diesel::sql_query(sql).get_result::<Id>(c)?.id;
                Ok::<_, DemoError>((parent, pid))
            })
            .await
            .unwrap();
        let kill = match backend {
            Backend::Postgres => format!("SELECT pg_terminate_backend({pid})"),
            _ => format!("KILL {pid}"),
        };
        admin = blocking(move || {
            diesel::sql_query(kill).execute(&mut admin).unwrap();
            admin
        })
        .await;
        let result = session.run_sync(move |c| insert_children(c, parent)).await;
        if result.is_err() {
            errors += 1;
        }
        let _ = session.rollback().await;
        // The next session works: the dead connection was not reused.
        let mut next_session = engine.session();
        let id = next_session.run_sync(insert_parent).await.unwrap();
        next_session
            .run_sync(move |c| insert_children(c, id))
            .await
            .unwrap();
        next_session.commit().await.unwrap();
    }
    settle(&engine).await;
    let partial = db.partial_units(2).await;
    figure(format!(
        "kill {backend}: rounds={n} errors={errors} partial_units={partial} next_session_ok={n}"
    ));
    assert_eq!(
        errors, n,
        "{backend}: every use of a killed connection fails"
    );
    assert_eq!(partial, 0, "{backend}");
}

#[derive(QueryableByName)]
struct Counter {
    #[diesel(sql_type = Integer)]
    n: i32,
}

per_backend!(contended_increments_are_exact_with_retries, multi_thread);
async fn contended_increments_are_exact_with_retries(db: TestDb) {
    // 50 increments a task by default (3,200 contended transactions): the
    // longest test of this file; RUNSYNC_FAULT_ROUNDS=100 for the 6,400 of
    // RELIABILITY.md.
    let (tasks, per_task) = (64, rounds(50).min(100));
    let engine = db
        .engine_with(
            EngineOptions::default()
                .max_size(8)
                .connection_timeout(Duration::from_secs(60)),
        )
        .await;
    db.with_connection(|setup| {
        diesel::sql_query("CREATE TABLE counter (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
            .execute(setup)
            .unwrap();
        diesel::sql_query("INSERT INTO counter VALUES (1, 0)")
            .execute(setup)
            .unwrap();
    })
    .await;
    let retries = Arc::new(AtomicU32::new(0));
    let started = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let engine = engine.clone();
        let retries = retries.clone();
        handles.push(tokio::spawn(async move {
            let policy = RetryPolicy::default().max_attempts(100);
            for _ in 0..per_task {
                let done = engine
                    .transaction_with_retry(&policy, |c: &mut AnyConnection| {
                        let read = match c.backend() {
                            // Serializable: concurrent read-modify-writes conflict (40001) and retry.
                            Backend::Postgres => {
                                diesel::sql_query("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
                                    .execute(c)?;
                                "SELECT n FROM counter WHERE id = 1"
                            }
                            Backend::Mysql => "SELECT n FROM counter WHERE id = 1 FOR UPDATE",
                            // BEGIN IMMEDIATE already holds the write lock.
                            Backend::Sqlite => "SELECT n FROM counter WHERE id = 1",
                        };
                        let n = diesel::sql_query(read).get_result::<Counter>(c)?.n;
                        diesel::sql_query(format!("UPDATE counter SET n = {} WHERE id = 1", n + 1))
                            .execute(c)
                    })
                    .await
                    .expect("an increment commits within its attempts");
                retries.fetch_add(done.attempts - 1, Ordering::Relaxed);
            }
        }));
    }
    for handle in handles {
        handle.await.unwrap();
    }
    let elapsed = started.elapsed();
    let n = db
        .with_connection(|c| {
            diesel::sql_query("SELECT n FROM counter WHERE id = 1")
                .get_result::<Counter>(c)
                .unwrap()
                .n
        })
        .await;
    figure(format!(
        "contention {}: tasks={tasks} increments_each={per_task} counter={n} retried_conflicts={} seconds={:.2}",
        db.backend,
        retries.load(Ordering::Relaxed),
        elapsed.as_secs_f64()
    ));
    assert_eq!(n as usize, tasks * per_task, "{}", db.backend);
}

per_backend!(
    four_times_more_sessions_than_connections_complete_or_time_out,
    multi_thread
);
async fn four_times_more_sessions_than_connections_complete_or_time_out(db: TestDb) {
    let pool = 4;
    let engine = db.migrated_engine(pool, Duration::from_millis(300)).await;
    let started = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..pool * 4 {
        let engine = engine.clone();
        handles.push(tokio::spawn(async move {
            let mut session = engine.session();
            session
                .run_sync(|c| {
                    std::thread::sleep(Duration::from_millis(100));
                    insert_parent(c)
                })
                .await?;
            session.rollback().await?;
            Ok::<_, DemoError>(())
        }));
    }
    let (mut completed, mut timed_out) = (0, 0);
    for handle in handles {
        match handle.await.unwrap() {
            Ok(()) => completed += 1,
            Err(DemoError::Session(Error::PoolTimeout(_))) => timed_out += 1,
            Err(other) => panic!("{}: unexpected {other}", db.backend),
        }
    }
    let elapsed = started.elapsed();
    settle(&engine).await;
    figure(format!(
        "oversubscribed {}: sessions={} pool={pool} completed={completed} pool_timeouts={timed_out} seconds={:.2}",
        db.backend,
        pool * 4,
        elapsed.as_secs_f64()
    ));
    assert_eq!(completed + timed_out, pool * 4);
    assert!(completed >= pool, "{}", db.backend);
    assert!(elapsed < Duration::from_secs(10), "{}: bounded", db.backend);
    assert_eq!(db.open_transactions().await, 0);
}

per_backend!(hostile_data_round_trips_byte_for_byte);
async fn hostile_data_round_trips_byte_for_byte(db: TestDb) {
    let values = [
        "it's \"quoted\" `back` \\ slash".to_owned(),
        "'; DROP TABLE a; --".to_owned(),
        "ünïcødé — 日本語 — emoji 🦀 — RTL עברית".to_owned(),
        "x".repeat(1 << 20),
    ];
    let engine = db.engine().await;
    migrate(&engine).await;
    let mut session = engine.session();
    let stored = values.to_vec();
    let read = session
        .run_sync(move |c| {
            let mut read = Vec::new();
            for v in &stored {
                diesel::insert_into(a::table)
                    .values(NewA { data: Some(v) })
                    .execute(c)?;
                let back: Option<String> = a::table.select(a::data).order(a::id.desc()).first(c)?;
                read.push(back);
            }
            Ok::<_, DemoError>(read)
        })
        .await
        .unwrap();
    session.commit().await.unwrap();
    let ok = read
        .iter()
        .zip(&values)
        .filter(|(r, v)| r.as_deref() == Some(v.as_str()))
        .count();
    figure(format!(
        "hostile {}: values={} identical={ok} largest_bytes={}",
        db.backend,
        values.len(),
        1 << 20
    ));
    assert_eq!(ok, values.len(), "{}", db.backend);
    // The injection attempt did not drop anything.
    let count = db
        .with_connection(|c| a::table.count().get_result::<i64>(c).unwrap())
        .await;
    assert_eq!(count, 4, "{}", db.backend);
}
