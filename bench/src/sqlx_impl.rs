//! What users pick instead of an ORM: W(N) with sqlx 0.8 on its native
//! drivers (`PgConnection`, `MySqlConnection`, and `SqliteConnection`, which
//! runs each connection on a worker thread of its own), through sqlx's pool,
//! with `query_as` + binds into tuples and multi-row INSERTs built with
//! `QueryBuilder::push_values`.
//!
//! The statements per phase are the other implementations': parents in
//! batches of [`PARENT_BATCH`] (MySQL: then `LAST_INSERT_ID()`, as the others
//! do, although sqlx's `MySqlQueryResult::last_insert_id` would save that
//! round trip), children in batches of [`CHILD_BATCH`], one child SELECT
//! per parent in the lazy phase, one per [`EAGER_BATCH`] parents in the eager
//! one (`= ANY($1)` with an array on PostgreSQL, as diesel sends it; `IN
//! (?, ...)` elsewhere). sqlx has no statement hook, so this module counts
//! its statements itself ([`Counter::statement`], BEGIN/COMMIT excluded).
//!
//! sqlx's options are set for its best showing, not its defaults: statement
//! logging off (the facade's echo is off too, see `count.rs`) and no `ping`
//! on every pool checkout (`test_before_acquire(false)`; sqlx 0.8 pings by
//! default, one extra round trip per checkout). Its prepared-statement cache
//! is on, as diesel's is. SQLite gets the facade's settings: WAL, a 5 s busy
//! timeout, foreign keys, and `BEGIN IMMEDIATE` for transactions that write.

use std::collections::HashMap;
use std::io::Write;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use greenlet_orm::models::{A, B, Family};
use greenlet_orm::queries::{CHILD_BATCH, EAGER_BATCH, PARENT_BATCH};
use sqlx::mysql::{MySql, MySqlConnectOptions, MySqlPool};
use sqlx::pool::PoolOptions;
use sqlx::postgres::{PgConnectOptions, PgPool, Postgres};
use sqlx::sqlite::{Sqlite, SqliteConnectOptions, SqliteJournalMode, SqlitePool};
use sqlx::{ConnectOptions, Executor, QueryBuilder, Transaction};

use crate::async_impl::Migration;
use crate::count::Counter;
use crate::sync_impls::check_verified;
use crate::{Phase, PhaseTimer, expected_children};

/// The SQL text of one backend (placeholders differ).
struct Sql {
    parents: &'static str,
    children_of: &'static str,
    first: &'static str,
    update: &'static str,
    parent_by_key: &'static str,
    count_a: &'static str,
    count_b: &'static str,
    new_data: &'static str,
    min_id: &'static str,
    applied: &'static str,
    forget_migration: &'static str,
    record_migration: &'static str,
}

const PG: Sql = Sql {
    parents: "SELECT id, data FROM a",
    children_of: "SELECT id, a_id, data FROM b WHERE a_id = $1",
    first: "SELECT id, data FROM a ORDER BY id LIMIT 1",
    update: "UPDATE a SET data = $1 WHERE id = $2",
    parent_by_key: "SELECT id, data FROM a WHERE id = $1",
    count_a: "SELECT COUNT(*) FROM a",
    count_b: "SELECT COUNT(*) FROM b",
    new_data: "SELECT id FROM a WHERE data = $1",
    min_id: "SELECT MIN(id) FROM a",
    applied: "SELECT version FROM __diesel_schema_migrations",
    forget_migration: "DELETE FROM __diesel_schema_migrations WHERE version = $1",
    record_migration: "INSERT INTO __diesel_schema_migrations (version) VALUES ($1)",
};

/// MySQL and SQLite.
const QMARK: Sql = Sql {
    parents: "SELECT id, data FROM a",
    children_of: "SELECT id, a_id, data FROM b WHERE a_id = ?",
    first: "SELECT id, data FROM a ORDER BY id LIMIT 1",
    update: "UPDATE a SET data = ? WHERE id = ?",
    parent_by_key: "SELECT id, data FROM a WHERE id = ?",
    count_a: "SELECT COUNT(*) FROM a",
    count_b: "SELECT COUNT(*) FROM b",
    new_data: "SELECT id FROM a WHERE data = ?",
    min_id: "SELECT MIN(id) FROM a",
    applied: "SELECT version FROM __diesel_schema_migrations",
    forget_migration: "DELETE FROM __diesel_schema_migrations WHERE version = ?",
    record_migration: "INSERT INTO __diesel_schema_migrations (version) VALUES (?)",
};

type ParentRow = (i32, Option<String>);
type ChildRow = (i32, i32, Option<String>);

fn pool_options<DB: sqlx::Database>(size: u32) -> PoolOptions<DB> {
    PoolOptions::new()
        .max_connections(size)
        .min_connections(0)
        .test_before_acquire(false)
        .acquire_timeout(Duration::from_secs(60))
}

/// A pool of `size` PostgreSQL connections (one opened now).
pub async fn pg_pool(url: &str, size: u32) -> anyhow::Result<PgPool> {
    let options = PgConnectOptions::from_str(url)?.disable_statement_logging();
    Ok(pool_options(size).connect_with(options).await?)
}

/// A pool of `size` MySQL/MariaDB connections (one opened now).
pub async fn mysql_pool(url: &str, size: u32) -> anyhow::Result<MySqlPool> {
    let options = MySqlConnectOptions::from_str(url)?.disable_statement_logging();
    Ok(pool_options(size).connect_with(options).await?)
}

/// A pool of `size` SQLite connections to the file `path` (one opened
/// now), with the facade's settings.
pub async fn sqlite_pool(path: &str, size: u32) -> anyhow::Result<SqlitePool> {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(5))
        .foreign_keys(true)
        .disable_statement_logging();
    Ok(pool_options(size).connect_with(options).await?)
}

async fn begin_pg(pool: &PgPool) -> sqlx::Result<Transaction<'static, Postgres>> {
    pool.begin().await
}

async fn begin_mysql(pool: &MySqlPool) -> sqlx::Result<Transaction<'static, MySql>> {
    pool.begin().await
}

/// `BEGIN IMMEDIATE`, as the facade on SQLite.
async fn begin_sqlite(pool: &SqlitePool) -> sqlx::Result<Transaction<'static, Sqlite>> {
    pool.begin_with("BEGIN IMMEDIATE").await
}

/// PostgreSQL and SQLite: one multi-row INSERT ... RETURNING id.
macro_rules! parents_returning {
    ($name:ident, $db:ty) => {
        async fn $name(
            tx: &mut Transaction<'static, $db>,
            chunk: &[Family],
            counter: &Counter,
        ) -> sqlx::Result<Vec<i32>> {
            let mut insert = QueryBuilder::<$db>::new("INSERT INTO a (data) ");
            insert.push_values(chunk, |mut row, family| {
                row.push_bind(family.data.as_deref());
            });
            insert.push(" RETURNING id");
            counter.statement();
            let mut ids: Vec<i32> = insert.build_query_scalar().fetch_all(&mut **tx).await?;
            ids.sort_unstable();
            Ok(ids)
        }
    };
}

parents_returning!(parents_pg, Postgres);
parents_returning!(parents_sqlite, Sqlite);

/// MySQL: the batch, then `LAST_INSERT_ID()` (the statements the others send).
async fn parents_mysql(
    tx: &mut Transaction<'static, MySql>,
    chunk: &[Family],
    counter: &Counter,
) -> sqlx::Result<Vec<i32>> {
    let mut insert = QueryBuilder::<MySql>::new("INSERT INTO a (data) ");
    insert.push_values(chunk, |mut row, family| {
        row.push_bind(family.data.as_deref());
    });
    counter.statement();
    insert.build().execute(&mut **tx).await?;
    counter.statement();
    let (first, step): (i64, i64) = sqlx::query_as(
        "SELECT CAST(LAST_INSERT_ID() AS SIGNED), CAST(@@auto_increment_increment AS SIGNED)",
    )
    .fetch_one(&mut **tx)
    .await?;
    Ok((0..chunk.len() as i64)
        .map(|i| (first + i * step) as i32)
        .collect())
}

/// PostgreSQL: the children of `ids` in one `= ANY($1)` query (as diesel).
async fn children_of_pg(
    tx: &mut Transaction<'static, Postgres>,
    ids: &[i32],
) -> sqlx::Result<Vec<ChildRow>> {
    sqlx::query_as("SELECT id, a_id, data FROM b WHERE a_id = ANY($1)")
        .bind(ids)
        .fetch_all(&mut **tx)
        .await
}

/// MySQL and SQLite: the children of `ids` in one `IN (?, ...)` query.
macro_rules! children_in {
    ($name:ident, $db:ty) => {
        async fn $name(
            tx: &mut Transaction<'static, $db>,
            ids: &[i32],
        ) -> sqlx::Result<Vec<ChildRow>> {
            let mut select =
                QueryBuilder::<$db>::new("SELECT id, a_id, data FROM b WHERE a_id IN (");
            let mut list = select.separated(", ");
            for &id in ids {
                list.push_bind(id);
            }
            select.push(")");
            select.build_query_as().fetch_all(&mut **tx).await
        }
    };
}

children_in!(children_of_mysql, MySql);
children_in!(children_of_sqlite, Sqlite);

fn check(cond: bool, message: impl FnOnce() -> String) -> anyhow::Result<()> {
    if cond {
        Ok(())
    } else {
        anyhow::bail!(message())
    }
}

/// Sets the data of the parent with the smallest id (2 statements).
macro_rules! update_first {
    ($tx:expr, $sql:expr, $counter:expr) => {{
        $counter.statement();
        let (id, _data): ParentRow = sqlx::query_as($sql.first).fetch_one(&mut *$tx).await?;
        $counter.statement();
        sqlx::query($sql.update)
            .bind("new data")
            .bind(id)
            .execute(&mut *$tx)
            .await?;
    }};
}

macro_rules! workload_for {
    (
        $name:ident, $unit:ident, $db:ty, $pool:ty, $connect:path, $begin:path,
        $sql:expr, $insert_parents:path, $children_of:path
    ) => {
        /// W(N) through sqlx on this backend; see the module docs.
        pub async fn $name(
            url: &str,
            n: usize,
            families: &[Family],
            counter: &Counter,
            migration: &Migration,
            pool_size: u32,
        ) -> anyhow::Result<Vec<Phase>> {
            const SQL: Sql = $sql;
            let mut timer = PhaseTimer::new(counter.clone());
            timer.start();
            let pool: $pool = $connect(url, pool_size).await.context("sqlx: connect")?;
            timer.stop_uncounted("connect");

            // schema: diesel's bookkeeping, as diesel-async does it. (Multi-
            // statement SQL through `Executor::execute` + `raw_sql`: the
            // `RawSql::execute` shortcut is an `async fn` generic over the
            // executor, whose future rustc cannot prove `Send` here.)
            timer.start();
            let mut tx = $begin(&pool).await?;
            counter.statement();
            Executor::execute(
                &mut *tx,
                sqlx::raw_sql(diesel::migration::CREATE_MIGRATIONS_TABLE),
            )
            .await?;
            counter.statement();
            let applied: Vec<String> = sqlx::query_scalar(SQL.applied).fetch_all(&mut *tx).await?;
            if applied.contains(&migration.version) {
                counter.statement();
                Executor::execute(&mut *tx, sqlx::raw_sql(migration.down)).await?;
                counter.statement();
                sqlx::query(SQL.forget_migration)
                    .bind(&migration.version)
                    .execute(&mut *tx)
                    .await?;
            }
            counter.statement();
            Executor::execute(&mut *tx, sqlx::raw_sql(migration.up)).await?;
            counter.statement();
            sqlx::query(SQL.record_migration)
                .bind(&migration.version)
                .execute(&mut *tx)
                .await?;
            tx.commit().await.context("sqlx: schema")?;
            timer.stop("schema");

            // insert: parents in batches, then their children.
            timer.start();
            let mut tx = $begin(&pool).await?;
            for chunk in families.chunks(PARENT_BATCH) {
                let ids = $insert_parents(&mut tx, chunk, counter).await?;
                let children: Vec<(i32, Option<&str>)> = chunk
                    .iter()
                    .zip(&ids)
                    .flat_map(|(family, &a_id)| {
                        family
                            .children
                            .iter()
                            .map(move |data| (a_id, data.as_deref()))
                    })
                    .collect();
                for batch in children.chunks(CHILD_BATCH) {
                    let mut insert = QueryBuilder::<$db>::new("INSERT INTO b (a_id, data) ");
                    insert.push_values(batch, |mut row, &(a_id, data)| {
                        row.push_bind(a_id).push_bind(data);
                    });
                    counter.statement();
                    insert.build().execute(&mut *tx).await?;
                }
            }
            tx.commit().await.context("sqlx: insert")?;
            timer.stop("insert");

            // run_sync_lazy: N+1 awaited queries.
            timer.start();
            let mut tx = $begin(&pool).await?;
            let mut out = std::io::sink();
            counter.statement();
            let parents: Vec<ParentRow> = sqlx::query_as(SQL.parents).fetch_all(&mut *tx).await?;
            let parents_seen = parents.len();
            let mut children_seen = 0;
            for (id, data) in parents {
                let parent = A { id, data };
                writeln!(out, "{parent}")?;
                counter.statement();
                let children: Vec<ChildRow> = sqlx::query_as(SQL.children_of)
                    .bind(parent.id)
                    .fetch_all(&mut *tx)
                    .await?;
                children_seen += children.len();
                for (id, a_id, data) in children {
                    writeln!(out, "{}", B { id, a_id, data })?;
                }
            }
            update_first!(tx, SQL, counter);
            check(
                parents_seen == n && children_seen == expected_children(n),
                || format!("sqlx lazy: counted {parents_seen} / {children_seen}"),
            )?;
            tx.commit().await.context("sqlx: run_sync_lazy")?;
            timer.stop("run_sync_lazy");

            // run_sync_eager: children in batched queries, grouped by parent.
            timer.start();
            let mut tx = $begin(&pool).await?;
            counter.statement();
            let parents: Vec<ParentRow> = sqlx::query_as(SQL.parents).fetch_all(&mut *tx).await?;
            let (mut parents_seen, mut children_seen) = (0, 0);
            for chunk in parents.chunks(EAGER_BATCH) {
                let ids: Vec<i32> = chunk.iter().map(|(id, _)| *id).collect();
                counter.statement();
                let rows = $children_of(&mut tx, &ids).await?;
                let index: HashMap<i32, usize> =
                    ids.iter().enumerate().map(|(i, &id)| (id, i)).collect();
                let mut grouped: Vec<Vec<B>> = vec![Vec::new(); chunk.len()];
                for (id, a_id, data) in rows {
                    if let Some(&i) = index.get(&a_id) {
                        grouped[i].push(B { id, a_id, data });
                    }
                }
                for ((id, data), children) in chunk.iter().zip(&grouped) {
                    let parent = A {
                        id: *id,
                        data: data.clone(),
                    };
                    writeln!(out, "{parent}")?;
                    for child in children {
                        writeln!(out, "{child}")?;
                    }
                    parents_seen += 1;
                    children_seen += children.len();
                }
            }
            update_first!(tx, SQL, counter);
            check(
                parents_seen == n && children_seen == expected_children(n),
                || format!("sqlx eager: counted {parents_seen} / {children_seen}"),
            )?;
            tx.commit().await.context("sqlx: run_sync_eager")?;
            timer.stop("run_sync_eager");

            // verify
            timer.start();
            let mut tx = $begin(&pool).await?;
            counter.statement();
            let parents: i64 = sqlx::query_scalar(SQL.count_a).fetch_one(&mut *tx).await?;
            counter.statement();
            let children: i64 = sqlx::query_scalar(SQL.count_b).fetch_one(&mut *tx).await?;
            counter.statement();
            let new_data: Vec<i32> = sqlx::query_scalar(SQL.new_data)
                .bind("new data")
                .fetch_all(&mut *tx)
                .await?;
            counter.statement();
            let min_id: Option<i32> = sqlx::query_scalar(SQL.min_id).fetch_one(&mut *tx).await?;
            tx.commit().await?;
            check_verified(n, parents, children, &new_data, min_id)
                .map_err(|e| anyhow::anyhow!("sqlx: {e}"))?;
            timer.stop("verify");
            pool.close().await;
            Ok(timer.finish())
        }

        /// The load figures' unit of work: BEGIN, a parent by key, its
        /// children, UPDATE the parent, COMMIT.
        pub async fn $unit(pool: &$pool, id: i32) -> sqlx::Result<()> {
            const SQL: Sql = $sql;
            let mut tx = $begin(pool).await?;
            let (id, _data): ParentRow = sqlx::query_as(SQL.parent_by_key)
                .bind(id)
                .fetch_one(&mut *tx)
                .await?;
            let _children: Vec<ChildRow> = sqlx::query_as(SQL.children_of)
                .bind(id)
                .fetch_all(&mut *tx)
                .await?;
            sqlx::query(SQL.update)
                .bind("c")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await
        }
    };
}

workload_for!(
    postgres,
    unit_pg,
    Postgres,
    PgPool,
    pg_pool,
    begin_pg,
    PG,
    parents_pg,
    children_of_pg
);
workload_for!(
    mysql,
    unit_mysql,
    MySql,
    MySqlPool,
    mysql_pool,
    begin_mysql,
    QMARK,
    parents_mysql,
    children_of_mysql
);
workload_for!(
    sqlite,
    unit_sqlite,
    Sqlite,
    SqlitePool,
    sqlite_pool,
    begin_sqlite,
    QMARK,
    parents_sqlite,
    children_of_sqlite
);

/// An sqlx pool of any backend.
#[derive(Clone)]
pub enum AnyPool {
    /// PostgreSQL.
    Pg(PgPool),
    /// MySQL/MariaDB.
    Mysql(MySqlPool),
    /// SQLite.
    Sqlite(SqlitePool),
}

impl AnyPool {
    /// A pool of `size` connections, all of them opened before this returns.
    pub async fn open(
        backend: diesel_runsync::Backend,
        url: &str,
        size: u32,
    ) -> anyhow::Result<Self> {
        use diesel_runsync::Backend;
        let pool = match backend {
            Backend::Postgres => AnyPool::Pg(pg_pool(url, size).await?),
            Backend::Mysql => AnyPool::Mysql(mysql_pool(url, size).await?),
            Backend::Sqlite => AnyPool::Sqlite(sqlite_pool(url, size).await?),
        };
        // Check out every connection at once (opening the ones missing),
        // then give them all back.
        macro_rules! fill {
            ($pool:expr) => {{
                let mut held = Vec::new();
                for _ in 0..size {
                    held.push($pool.acquire().await?);
                }
            }};
        }
        match &pool {
            AnyPool::Pg(p) => fill!(p),
            AnyPool::Mysql(p) => fill!(p),
            AnyPool::Sqlite(p) => fill!(p),
        }
        Ok(pool)
    }

    /// Connections open.
    pub fn size(&self) -> u32 {
        match self {
            AnyPool::Pg(p) => p.size(),
            AnyPool::Mysql(p) => p.size(),
            AnyPool::Sqlite(p) => p.size(),
        }
    }

    /// One unit of work of the load figures.
    pub async fn unit(&self, id: i32) -> sqlx::Result<()> {
        match self {
            AnyPool::Pg(p) => unit_pg(p, id).await,
            AnyPool::Mysql(p) => unit_mysql(p, id).await,
            AnyPool::Sqlite(p) => unit_sqlite(p, id).await,
        }
    }

    /// Closes every connection.
    pub async fn close(&self) {
        match self {
            AnyPool::Pg(p) => p.close().await,
            AnyPool::Mysql(p) => p.close().await,
            AnyPool::Sqlite(p) => p.close().await,
        }
    }
}

/// An sqlx connection with a transaction open, for the micro figures.
pub enum SqlxTx {
    /// PostgreSQL.
    Pg(Transaction<'static, Postgres>),
    /// MySQL/MariaDB.
    Mysql(Transaction<'static, MySql>),
    /// SQLite (a deferred BEGIN: a read transaction).
    Sqlite(Transaction<'static, Sqlite>),
}

impl SqlxTx {
    /// Begins a transaction on a connection of a one-connection pool.
    pub async fn open(backend: diesel_runsync::Backend, url: &str) -> anyhow::Result<Self> {
        Ok(match AnyPool::open(backend, url, 1).await? {
            AnyPool::Pg(p) => SqlxTx::Pg(p.begin().await?),
            AnyPool::Mysql(p) => SqlxTx::Mysql(p.begin().await?),
            AnyPool::Sqlite(p) => SqlxTx::Sqlite(p.begin().await?),
        })
    }

    /// One PK SELECT of `a`, awaited.
    pub async fn pk_select(&mut self, id: i32) -> sqlx::Result<()> {
        let _row: ParentRow = match self {
            SqlxTx::Pg(tx) => {
                sqlx::query_as(PG.parent_by_key)
                    .bind(id)
                    .fetch_one(&mut **tx)
                    .await?
            }
            SqlxTx::Mysql(tx) => {
                sqlx::query_as(QMARK.parent_by_key)
                    .bind(id)
                    .fetch_one(&mut **tx)
                    .await?
            }
            SqlxTx::Sqlite(tx) => {
                sqlx::query_as(QMARK.parent_by_key)
                    .bind(id)
                    .fetch_one(&mut **tx)
                    .await?
            }
        };
        Ok(())
    }
}
