//! W(N) and the load figures' unit of work on Diesel's native sync
//! connections (`PgConnection`, `MysqlConnection`, `SqliteConnection`),
//! run two ways:
//!
//! - `facade-native`: diesel-runsync's `Engine<C>` + `AsyncSession::run_sync`
//!   as a library user with one backend runs it, the phases in sessions as
//!   the `facade` implementation runs them, so that the difference between
//!   the two is the program's `AnyConnection` (`#[derive(MultiConnection)]`);
//! - `deadpool-diesel`: the same connections in a deadpool `Pool`
//!   (deadpool-diesel's `Manager`), each phase or unit handed to tokio's
//!   blocking pool with `interact`, inside one transaction.
//!
//! The statements and the phases' logic are the program's own
//! (`greenlet_orm::queries`, whose `Statements` each native connection
//! implements), so `facade` and `facade-native` run the same code and
//! differ only in the connection type; the schema phase runs the
//! migration's SQL with `batch_execute` the way diesel's `MigrationHarness`
//! does (as the diesel-async peer). Transactions begin with
//! `PoolableConnection::begin_outer_transaction` (`BEGIN IMMEDIATE` on
//! SQLite, as the facade).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use deadpool::managed::{Hook, HookError};
use diesel::connection::SimpleConnection;
use diesel::{
    ExpressionMethods, MysqlConnection, PgConnection, QueryDsl, QueryResult, RunQueryDsl,
    SqliteConnection,
};
use diesel_runsync::{Backend, Engine, EngineOptions, PoolableConnection};
use greenlet_orm::DemoError;
use greenlet_orm::models::Family;
use greenlet_orm::queries::{insert_families, run_queries, run_queries_eager, touch_parent};
use greenlet_orm::schema::{a, b};

use crate::async_impl::Migration;
use crate::count::Counter;
use crate::figures::{Load, collect, drive, facade_load, sync_unit};
use crate::sync_impls::{check_verified, in_transaction};
use crate::{Phase, PhaseTimer, expected_children};

diesel::table! {
    __diesel_schema_migrations (version) {
        version -> VarChar,
        run_on -> Timestamp,
    }
}

/// W(N)'s phases (each run inside the caller's transaction) and the load
/// unit on one connection type `C`; the setup new pooled connections get.
pub struct Core<C> {
    /// Per-connection settings for a connection opened with `establish`
    /// (SQLite: the facade's pragmas).
    pub setup: fn(&mut C) -> QueryResult<()>,
    /// `schema`: revert the migration if recorded, apply it, record it.
    pub schema: fn(&mut C, &Migration) -> Result<(), DemoError>,
    /// `insert`: the families, parents in batches, then their children.
    pub insert: fn(&mut C, &[Family]) -> Result<(), DemoError>,
    /// `run_sync_lazy` for N parents.
    pub lazy: fn(&mut C, usize) -> Result<(), DemoError>,
    /// `run_sync_eager` for N parents.
    pub eager: fn(&mut C, usize) -> Result<(), DemoError>,
    /// `verify` for N parents.
    pub verify: fn(&mut C, usize) -> Result<(), DemoError>,
    /// The load unit (in the caller's transaction): a parent, its
    /// children, UPDATE the parent.
    pub unit: fn(&mut C, i32) -> QueryResult<()>,
}

impl<C> Clone for Core<C> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<C> Copy for Core<C> {}

fn no_setup<C>(_conn: &mut C) -> QueryResult<()> {
    Ok(())
}

/// The facade's per-connection SQLite settings (WAL, busy timeout,
/// foreign keys) on a connection opened with `establish`.
fn sqlite_setup(conn: &mut SqliteConnection) -> QueryResult<()> {
    conn.batch_execute(
        "PRAGMA journal_mode = WAL; PRAGMA busy_timeout = 5000; PRAGMA foreign_keys = ON;",
    )
}

fn check(cond: bool, message: impl FnOnce() -> String) -> Result<(), DemoError> {
    if cond {
        Ok(())
    } else {
        Err(DemoError::Check(message()))
    }
}

/// Writes the [`Core`] of one connection type as the constant `$core`.
macro_rules! native_core {
    ($core:ident, $conn:ty, $setup:path) => {
        /// W(N) and the load unit on this connection type.
        pub const $core: Core<$conn> = {
            type Conn = $conn;

            fn schema(conn: &mut Conn, migration: &Migration) -> Result<(), DemoError> {
                conn.batch_execute(diesel::migration::CREATE_MIGRATIONS_TABLE)?;
                let applied: Vec<String> = __diesel_schema_migrations::table
                    .select(__diesel_schema_migrations::version)
                    .load(conn)?;
                if applied.contains(&migration.version) {
                    conn.batch_execute(migration.down)?;
                    diesel::delete(
                        __diesel_schema_migrations::table
                            .filter(__diesel_schema_migrations::version.eq(&migration.version)),
                    )
                    .execute(conn)?;
                }
                conn.batch_execute(migration.up)?;
                diesel::insert_into(__diesel_schema_migrations::table)
                    .values(__diesel_schema_migrations::version.eq(&migration.version))
                    .execute(conn)?;
                Ok(())
            }

            fn insert(conn: &mut Conn, families: &[Family]) -> Result<(), DemoError> {
                insert_families(conn, families).map(drop)
            }

            fn lazy(conn: &mut Conn, n: usize) -> Result<(), DemoError> {
                let counts = run_queries(conn, &mut std::io::sink())?;
                check(
                    counts.parents == n && counts.children == expected_children(n),
                    || format!("lazy: counted {counts:?}"),
                )
            }

            fn eager(conn: &mut Conn, n: usize) -> Result<(), DemoError> {
                let counts = run_queries_eager(conn, &mut std::io::sink())?;
                check(
                    counts.parents == n && counts.children == expected_children(n),
                    || format!("eager: counted {counts:?}"),
                )
            }

            fn verify(conn: &mut Conn, n: usize) -> Result<(), DemoError> {
                let parents: i64 = a::table.count().get_result(conn)?;
                let children: i64 = b::table.count().get_result(conn)?;
                let new_data: Vec<i32> = a::table
                    .filter(a::data.eq("new data"))
                    .select(a::id)
                    .load(conn)?;
                let min_id: Option<i32> =
                    a::table.select(diesel::dsl::min(a::id)).get_result(conn)?;
                check_verified(n, parents, children, &new_data, min_id).map_err(DemoError::Check)
            }

            fn unit(conn: &mut Conn, id: i32) -> QueryResult<()> {
                touch_parent(conn, id, "c")
            }

            Core {
                setup: $setup,
                schema,
                insert,
                lazy,
                eager,
                verify,
                unit,
            }
        };
    };
}

native_core!(PG, PgConnection, no_setup);
native_core!(MYSQL, MysqlConnection, no_setup);
native_core!(SQLITE, SqliteConnection, sqlite_setup);

/// Which way the native connections are run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runner {
    /// diesel-runsync's `Engine<C>` (`facade-native`).
    Facade,
    /// deadpool-diesel's pool and `interact` (`deadpool-diesel`).
    Deadpool,
}

/// What W(N) needs besides the connection type.
pub struct WorkloadArgs {
    /// The database URL.
    pub url: String,
    /// Parent rows.
    pub n: usize,
    /// W(N)'s families.
    pub families: Arc<Vec<Family>>,
    /// Counts the statements.
    pub counter: Counter,
    /// The backend's migration.
    pub migration: Migration,
    /// Connections in the pool.
    pub pool_size: u32,
}

/// W(N) through `runner` on `backend`'s native connection.
pub async fn workload(
    runner: Runner,
    backend: Backend,
    args: WorkloadArgs,
) -> anyhow::Result<Vec<Phase>> {
    match backend {
        Backend::Postgres => workload_on(runner, PG, args).await,
        Backend::Mysql => workload_on(runner, MYSQL, args).await,
        Backend::Sqlite => workload_on(runner, SQLITE, args).await,
    }
}

async fn workload_on<C>(
    runner: Runner,
    core: Core<C>,
    args: WorkloadArgs,
) -> anyhow::Result<Vec<Phase>>
where
    C: PoolableConnection,
    deadpool_diesel::Manager<C>: deadpool::managed::Manager<
            Type = deadpool_diesel::Connection<C>,
            Error = deadpool_diesel::Error,
        >,
{
    match runner {
        Runner::Facade => facade(core, args).await,
        Runner::Deadpool => deadpool_workload(core, args).await,
    }
}

/// One phase's work on a connection, run in the caller's transaction.
type Step<C> = Box<dyn FnOnce(&mut C) -> Result<(), DemoError> + Send>;

/// W(N)'s phases after `connect`, named, in order.
fn steps<C: 'static>(
    core: Core<C>,
    migration: Migration,
    families: Arc<Vec<Family>>,
    n: usize,
) -> [(&'static str, Step<C>); 5] {
    [
        ("schema", Box::new(move |c| (core.schema)(c, &migration))),
        ("insert", Box::new(move |c| (core.insert)(c, &families))),
        ("run_sync_lazy", Box::new(move |c| (core.lazy)(c, n))),
        ("run_sync_eager", Box::new(move |c| (core.eager)(c, n))),
        ("verify", Box::new(move |c| (core.verify)(c, n))),
    ]
}

/// One phase on the facade: a fresh session, one `run_sync`, then commit
/// (as the `facade` implementation runs its phases).
async fn facade_phase<C, F>(engine: &Engine<C>, f: F) -> Result<(), DemoError>
where
    C: PoolableConnection,
    F: FnOnce(&mut C) -> Result<(), DemoError> + Send + 'static,
{
    let mut session = engine.session();
    session.run_sync(f).await?;
    session.commit().await?;
    Ok(())
}

/// `facade-native`: W(N) on `Engine<C>`.
async fn facade<C: PoolableConnection>(
    core: Core<C>,
    args: WorkloadArgs,
) -> anyhow::Result<Vec<Phase>> {
    let WorkloadArgs {
        url,
        n,
        families,
        counter,
        migration,
        pool_size,
    } = args;
    let mut timer = PhaseTimer::new(counter.clone());
    let counting = counter.clone();
    let options = EngineOptions::default()
        .max_size(pool_size)
        .instrumentation(move || counting.instrumentation());
    timer.start();
    let engine = Engine::<C>::connect(&url, options)
        .await
        .context("facade-native: connect")?;
    timer.stop_uncounted("connect");

    for (name, step) in steps(core, migration, families, n) {
        timer.start();
        facade_phase(&engine, step)
            .await
            .with_context(|| format!("facade-native: {name}"))?;
        timer.stop(name);
    }
    Ok(timer.finish())
}

/// A deadpool-diesel pool of `C` (`size` connections at most).
struct Deadpool<C>
where
    deadpool_diesel::Manager<C>: deadpool::managed::Manager,
{
    pool: deadpool::managed::Pool<deadpool_diesel::Manager<C>>,
}

impl<C> Deadpool<C>
where
    C: PoolableConnection,
    deadpool_diesel::Manager<C>: deadpool::managed::Manager<
            Type = deadpool_diesel::Connection<C>,
            Error = deadpool_diesel::Error,
        >,
{
    /// A pool set for its best showing: no `SELECT 1` when a connection is
    /// recycled (deadpool-diesel still hands each recycled connection to
    /// the blocking pool once, for its broken-transaction check), the
    /// backend's setup and `counter`'s instrumentation on every new
    /// connection. Opens none yet.
    fn new(url: &str, size: u32, core: Core<C>, counter: Option<Counter>) -> anyhow::Result<Self> {
        let manager = deadpool_diesel::Manager::<C>::from_config(
            url,
            deadpool_diesel::Runtime::Tokio1,
            deadpool_diesel::ManagerConfig {
                recycling_method: deadpool_diesel::RecyclingMethod::CustomFunction(Box::new(
                    |_conn| Ok(()),
                )),
            },
        );
        let setup = core.setup;
        let pool = deadpool::managed::Pool::builder(manager)
            .max_size(size as usize)
            .runtime(deadpool_diesel::Runtime::Tokio1)
            .post_create(Hook::async_fn(
                move |obj: &mut deadpool_diesel::Connection<C>, _: &deadpool::managed::Metrics| {
                    let counter = counter.clone();
                    Box::pin(async move {
                        obj.interact(move |conn| {
                            if let Some(counter) = counter {
                                conn.set_instrumentation(counter.instrumentation());
                            }
                            setup(conn)
                        })
                        .await
                        .map_err(|e| HookError::message(e.to_string()))?
                        .map_err(|e| HookError::message(e.to_string()))
                    })
                },
            ))
            .build()?;
        Ok(Deadpool { pool })
    }

    /// Runs `f` on a pooled connection in one `interact`, between BEGIN
    /// (IMMEDIATE on SQLite) and COMMIT.
    async fn transaction<R, F>(&self, f: F) -> anyhow::Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut C) -> Result<R, DemoError> + Send + 'static,
    {
        let conn = self.pool.get().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(conn
            .interact(move |c| in_transaction(c, f))
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))??)
    }

    /// Opens all `size` connections (holding them at once).
    async fn warm(&self, size: u32) -> anyhow::Result<()> {
        let mut held = Vec::new();
        for _ in 0..size {
            held.push(self.pool.get().await.map_err(|e| anyhow::anyhow!("{e}"))?);
        }
        Ok(())
    }
}

/// `deadpool-diesel`: W(N), each phase one `interact` in one transaction.
async fn deadpool_workload<C>(core: Core<C>, args: WorkloadArgs) -> anyhow::Result<Vec<Phase>>
where
    C: PoolableConnection,
    deadpool_diesel::Manager<C>: deadpool::managed::Manager<
            Type = deadpool_diesel::Connection<C>,
            Error = deadpool_diesel::Error,
        >,
{
    let WorkloadArgs {
        url,
        n,
        families,
        counter,
        migration,
        pool_size,
    } = args;
    let mut timer = PhaseTimer::new(counter.clone());
    timer.start();
    let pool = Deadpool::new(&url, pool_size, core, Some(counter.clone()))?;
    pool.warm(1).await.context("deadpool-diesel: connect")?;
    timer.stop_uncounted("connect");

    for (name, step) in steps(core, migration, families, n) {
        timer.start();
        pool.transaction(step)
            .await
            .with_context(|| format!("deadpool-diesel: {name}"))?;
        timer.stop(name);
    }
    Ok(timer.finish())
}

/// The load figures through `runner` on `backend`'s native connection.
pub async fn load(
    runner: Runner,
    backend: Backend,
    url: &str,
    rows: usize,
    clients: usize,
    duration: Duration,
    pool_size: u32,
) -> anyhow::Result<Load> {
    match backend {
        Backend::Postgres => load_on(runner, PG, url, rows, clients, duration, pool_size).await,
        Backend::Mysql => load_on(runner, MYSQL, url, rows, clients, duration, pool_size).await,
        Backend::Sqlite => load_on(runner, SQLITE, url, rows, clients, duration, pool_size).await,
    }
}

async fn load_on<C>(
    runner: Runner,
    core: Core<C>,
    url: &str,
    rows: usize,
    clients: usize,
    duration: Duration,
    pool_size: u32,
) -> anyhow::Result<Load>
where
    C: PoolableConnection,
    deadpool_diesel::Manager<C>: deadpool::managed::Manager<
            Type = deadpool_diesel::Connection<C>,
            Error = deadpool_diesel::Error,
        >,
{
    match runner {
        Runner::Facade => {
            let options = EngineOptions::default().max_size(pool_size);
            facade_load(url, rows, clients, duration, options, core.unit).await
        }
        Runner::Deadpool => {
            let pool = Arc::new(Deadpool::new(url, pool_size, core, None)?);
            pool.warm(pool_size).await?;
            let unit = core.unit;
            let started = Instant::now();
            let unit_pool = pool.clone();
            let records = drive(rows, clients, duration, move |id| {
                let pool = unit_pool.clone();
                async move {
                    let conn = pool.pool.get().await.map_err(|e| anyhow::anyhow!("{e}"))?;
                    conn.interact(move |c| sync_unit(c, id, unit))
                        .await
                        .map_err(|e| anyhow::anyhow!("{e}"))??;
                    anyhow::Ok(())
                }
            })
            .await;
            let elapsed = started.elapsed();
            Ok(collect(records, elapsed, pool.pool.status().size as u32))
        }
    }
}
