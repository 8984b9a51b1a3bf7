//! The `facade` and `sync` implementations of W(N): the program's sync core
//! (`greenlet_orm::queries`, `greenlet_orm::migrations`) unchanged, once
//! through `AsyncSession::run_sync` and once on a raw connection on this
//! thread. Only `diesel::RunQueryDsl` is in scope here.

use std::sync::Arc;

use anyhow::{Context, bail};
use diesel::connection::{SimpleConnection, TransactionManager};
use diesel::prelude::*;
use diesel_runsync::{DatabaseUrl, Engine, EngineOptions, PoolableConnection};
use greenlet_orm::migrations::{create_all, drop_all};
use greenlet_orm::models::{A, Family};
use greenlet_orm::program::reset_schema;
use greenlet_orm::queries::{
    Counts, PARENT_BATCH, Statements, insert_families, run_queries, run_queries_eager, touch_parent,
};
use greenlet_orm::schema::a;
use greenlet_orm::{AnyConnection, DemoError};

use crate::count::Counter;
use crate::{Phase, PhaseTimer, expected_children};

/// Checks what `run_queries`/`run_queries_eager` counted.
fn check_counts(counts: Counts, n: usize) -> Result<Counts, DemoError> {
    if counts.parents != n || counts.children != expected_children(n) {
        return Err(DemoError::Check(format!(
            "counted {counts:?}, expected {n} parents and {} children",
            expected_children(n)
        )));
    }
    Ok(counts)
}

/// The `verify` phase's checks, as sync Diesel code.
pub fn verify(conn: &mut AnyConnection, n: usize) -> Result<(), DemoError> {
    let (parents, children) = greenlet_orm::queries::count_rows(conn)?;
    let new_data: Vec<i32> = a::table
        .filter(a::data.eq("new data"))
        .select(a::id)
        .load(conn)?;
    let min_id: Option<i32> = a::table.select(diesel::dsl::min(a::id)).get_result(conn)?;
    check_verified(n, parents, children, &new_data, min_id).map_err(DemoError::Check)
}

/// The `verify` phase's checks on values read by any implementation.
pub fn check_verified(
    n: usize,
    parents: i64,
    children: i64,
    new_data: &[i32],
    min_id: Option<i32>,
) -> Result<(), String> {
    if parents != n as i64 || children != expected_children(n) as i64 {
        return Err(format!(
            "verify: {parents} parents and {children} children, expected {n} and {}",
            expected_children(n)
        ));
    }
    if new_data.len() != 1 || Some(new_data[0]) != min_id {
        return Err(format!(
            "verify: rows with 'new data': {new_data:?}, smallest id {min_id:?}"
        ));
    }
    Ok(())
}

/// The facade: `Engine` + `AsyncSession::run_sync`, each phase in a fresh
/// session, as `greenlet_orm::program` does it.
pub async fn facade(
    url: &str,
    n: usize,
    families: Arc<Vec<Family>>,
    counter: &Counter,
    pool_size: u32,
    inline: bool,
) -> anyhow::Result<Vec<Phase>> {
    let mut timer = PhaseTimer::new(counter.clone());
    // The counter goes on every connection the pool opens, after the
    // engine's own instrumentation (its echo and checks stay on, as in
    // production; see `count.rs`).
    let counting = counter.clone();
    let options = EngineOptions::default()
        .max_size(pool_size)
        .run_inline(inline)
        .instrumentation(move || counting.instrumentation());
    timer.start();
    let engine = Engine::<AnyConnection>::connect(url, options)
        .await
        .context("facade: connect")?;
    timer.stop_uncounted("connect");

    timer.start();
    reset_schema(&engine).await.context("facade: schema")?;
    timer.stop("schema");

    timer.start();
    let mut session = engine.session();
    session
        .transaction(async |s| {
            s.run_sync(move |conn| insert_families(conn, &families))
                .await
        })
        .await
        .context("facade: insert")?;
    timer.stop("insert");

    timer.start();
    let mut session = engine.session();
    session
        .run_sync(move |conn| check_counts(run_queries(conn, &mut std::io::sink())?, n))
        .await
        .context("facade: run_sync_lazy")?;
    session.commit().await?;
    timer.stop("run_sync_lazy");

    timer.start();
    let mut session = engine.session();
    session
        .run_sync(move |conn| check_counts(run_queries_eager(conn, &mut std::io::sink())?, n))
        .await
        .context("facade: run_sync_eager")?;
    session.commit().await?;
    timer.stop("run_sync_eager");

    timer.start();
    let mut session = engine.session();
    session
        .run_sync(move |conn| verify(conn, n))
        .await
        .context("facade: verify")?;
    session.commit().await?;
    timer.stop("verify");

    Ok(timer.finish())
}

/// Runs `body` between BEGIN (IMMEDIATE on SQLite, as the facade) and COMMIT.
pub fn in_transaction<C: PoolableConnection, R>(
    conn: &mut C,
    body: impl FnOnce(&mut C) -> Result<R, DemoError>,
) -> Result<R, DemoError> {
    conn.begin_outer_transaction()?;
    match body(conn) {
        Ok(value) => {
            <C as Connection>::TransactionManager::commit_transaction(conn)?;
            Ok(value)
        }
        Err(e) => {
            let _ = <C as Connection>::TransactionManager::rollback_transaction(conn);
            Err(e)
        }
    }
}

/// The floor: the same functions on a raw connection, on this thread, no
/// tokio, no pool, with the same transactions as the facade.
pub fn sync(
    url: &str,
    n: usize,
    families: &[Family],
    counter: &Counter,
) -> anyhow::Result<Vec<Phase>> {
    let mut timer = PhaseTimer::new(counter.clone());
    let url = DatabaseUrl::parse(url)?;
    timer.start();
    let mut conn = <AnyConnection as PoolableConnection>::connect(&url).context("sync: connect")?;
    timer.stop_uncounted("connect");
    conn.set_instrumentation(counter.instrumentation());

    timer.start();
    in_transaction(&mut conn, |c| {
        drop_all(c)?;
        create_all(c)
    })
    .context("sync: schema")?;
    timer.stop("schema");

    timer.start();
    in_transaction(&mut conn, |c| insert_families(c, families)).context("sync: insert")?;
    timer.stop("insert");

    timer.start();
    in_transaction(&mut conn, |c| {
        check_counts(run_queries(c, &mut std::io::sink())?, n)
    })
    .context("sync: run_sync_lazy")?;
    timer.stop("run_sync_lazy");

    timer.start();
    in_transaction(&mut conn, |c| {
        check_counts(run_queries_eager(c, &mut std::io::sink())?, n)
    })
    .context("sync: run_sync_eager")?;
    timer.stop("run_sync_eager");

    timer.start();
    in_transaction(&mut conn, |c| verify(c, n)).context("sync: verify")?;
    timer.stop("verify");
    Ok(timer.finish())
}

/// Untimed setup for the micro and concurrency figures: a fresh schema with
/// W(n)'s `n` parents, ids 1..=n (the keys the figures draw), and their
/// children. The ids are given explicitly: the program's own batched
/// insert need not hand out consecutive ids (on MySQL its `INSERT ...
/// SELECT` leaves gaps between batches).
pub fn prepare_rows(url: &str, n: usize) -> anyhow::Result<()> {
    let mut conn = <AnyConnection as PoolableConnection>::connect(&DatabaseUrl::parse(url)?)?;
    in_transaction(&mut conn, |c| {
        drop_all(c)?;
        create_all(c)
    })?;
    in_transaction(&mut conn, |c| {
        for chunk in (1..=n).collect::<Vec<_>>().chunks(PARENT_BATCH) {
            // Generated integers and `a{i}` only: nothing to escape.
            let parents: Vec<String> = chunk.iter().map(|i| format!("({i}, 'a{i}')")).collect();
            c.batch_execute(&format!(
                "INSERT INTO a (id, data) VALUES {}",
                parents.join(", ")
            ))?;
            let children: Vec<String> = chunk
                .iter()
                .flat_map(|&i| std::iter::repeat_n(format!("({i}, NULL)"), 1 + i % 2))
                .collect();
            c.batch_execute(&format!(
                "INSERT INTO b (a_id, data) VALUES {}",
                children.join(", ")
            ))?;
        }
        if let AnyConnection::Postgresql(_) = c {
            c.batch_execute(
                "SELECT setval(pg_get_serial_sequence('a', 'id'), (SELECT max(id) FROM a))",
            )?;
        }
        Ok::<_, DemoError>(())
    })?;
    let (parents, children) = greenlet_orm::queries::count_rows(&mut conn)?;
    if parents != n as i64 || children != expected_children(n) as i64 {
        bail!("prepared {parents} parents and {children} children for n = {n}");
    }
    if let AnyConnection::Sqlite(c) = &mut conn {
        // The fresh rows out of the WAL into the database file now, not
        // during the first implementation's measured run.
        c.batch_execute("PRAGMA wal_checkpoint(TRUNCATE)")?;
    }
    Ok(())
}

/// One primary-key SELECT of `a`.
pub fn select_by_key(conn: &mut AnyConnection, id: i32) -> QueryResult<A> {
    conn.parent(id)
}

/// The load figures' unit of work (inside the caller's transaction): a
/// parent by key, its children, then UPDATE the parent.
pub fn unit_of_work(conn: &mut AnyConnection, id: i32) -> QueryResult<()> {
    touch_parent(conn, id, "c")
}
