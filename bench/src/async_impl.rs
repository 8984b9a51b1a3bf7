//! The peer: W(N) written with `diesel_async::RunQueryDsl` on native
//! `AsyncPgConnection` / `AsyncMysqlConnection`, and on
//! `SyncConnectionWrapper<SqliteConnection>` for SQLite. Every statement,
//! each per-parent child load included, is its own awaited query.
//!
//! diesel-async has no `MultiConnection`, so one macro writes the workload
//! once per connection type; what differs per backend (connect, BEGIN,
//! getting the new parents' ids) is passed in. Only
//! `diesel_async::RunQueryDsl` is in scope here (E0034 otherwise).

use std::io::Write;

use anyhow::Context;
use diesel::sql_types::BigInt;
use diesel::{
    BelongingToDsl, ExpressionMethods, GroupedBy, QueryDsl, QueryResult, QueryableByName,
    SelectableHelper,
};
use diesel_async::pg::AsyncPgConnection;
use diesel_async::pooled_connection::bb8::Pool as Bb8Pool;
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
use diesel_async::{AnsiTransactionManager, TransactionManager};
use diesel_async::{AsyncConnection, AsyncMysqlConnection, RunQueryDsl, SimpleAsyncConnection};
use diesel_runsync::PoolableConnection;
use greenlet_orm::models::{A, B, Family, NewA, NewB};
use greenlet_orm::queries::{CHILD_BATCH, EAGER_BATCH, PARENT_BATCH};
use greenlet_orm::schema::{a, b};

use crate::count::Counter;
use crate::sync_impls::check_verified;
use crate::{Phase, PhaseTimer, expected_children};

type AsyncSqliteConnection = SyncConnectionWrapper<diesel::SqliteConnection>;

diesel::table! {
    __diesel_schema_migrations (version) {
        version -> VarChar,
        run_on -> Timestamp,
    }
}

/// One backend's migration, as SQL text: the schema phase runs it the way
/// diesel's `MigrationHarness` does (set up the bookkeeping table, revert
/// the migration if recorded, apply it, record it), with `batch_execute`.
#[derive(Clone)]
pub struct Migration {
    /// Version as diesel records it.
    pub version: String,
    /// `up.sql`.
    pub up: &'static str,
    /// `down.sql`.
    pub down: &'static str,
}

macro_rules! migration_sql {
    ($backend:literal) => {
        (
            include_str!(concat!(
                "../../migrations/",
                $backend,
                "/2024-01-01-000000_create_a_b/up.sql"
            )),
            include_str!(concat!(
                "../../migrations/",
                $backend,
                "/2024-01-01-000000_create_a_b/down.sql"
            )),
        )
    };
}

/// The versions of the migrations in `source` (the embedded ones of
/// greenlet-orm), as backend `DB` sees them.
fn versions<DB, S>(source: &S) -> anyhow::Result<Vec<String>>
where
    DB: diesel::backend::Backend,
    S: diesel::migration::MigrationSource<DB>,
{
    Ok(source
        .migrations()
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .iter()
        .map(|m| m.name().version().to_string())
        .collect())
}

/// The migration of `backend`, its version read from the embedded one.
pub fn migration(backend: diesel_runsync::Backend) -> anyhow::Result<Migration> {
    use diesel_runsync::Backend;
    use greenlet_orm::migrations::for_backend;
    let source = for_backend(backend)
        .with_context(|| format!("greenlet-orm is built without {}", backend.name()))?;
    let (versions, (up, down)) = match backend {
        Backend::Postgres => (
            versions::<diesel::pg::Pg, _>(&source)?,
            migration_sql!("postgres"),
        ),
        Backend::Mysql => (
            versions::<diesel::mysql::Mysql, _>(&source)?,
            migration_sql!("mysql"),
        ),
        Backend::Sqlite => (
            versions::<diesel::sqlite::Sqlite, _>(&source)?,
            migration_sql!("sqlite"),
        ),
    };
    anyhow::ensure!(
        versions.len() == 1,
        "expected one migration, found {versions:?}"
    );
    Ok(Migration {
        version: versions[0].clone(),
        up,
        down,
    })
}

#[derive(QueryableByName)]
struct BatchIds {
    #[diesel(sql_type = BigInt)]
    first_id: i64,
    #[diesel(sql_type = BigInt)]
    step: i64,
}

async fn connect_pg(url: &str) -> anyhow::Result<AsyncPgConnection> {
    Ok(AsyncPgConnection::establish(url).await?)
}

async fn connect_mysql(url: &str) -> anyhow::Result<AsyncMysqlConnection> {
    Ok(AsyncMysqlConnection::establish(url).await?)
}

/// The same settings as the facade's SQLite connections (WAL, busy
/// timeout, foreign keys).
async fn connect_sqlite(url: &str) -> anyhow::Result<AsyncSqliteConnection> {
    let mut conn = AsyncSqliteConnection::establish(url).await?;
    conn.batch_execute(
        "PRAGMA journal_mode = WAL; PRAGMA busy_timeout = 5000; PRAGMA foreign_keys = ON;",
    )
    .await?;
    Ok(conn)
}

async fn begin_ansi<C>(conn: &mut C) -> QueryResult<()>
where
    C: AsyncConnection<TransactionManager = AnsiTransactionManager>,
{
    AnsiTransactionManager::begin_transaction(conn).await
}

/// `BEGIN IMMEDIATE`, as the facade does on SQLite (one blocking hop).
async fn begin_sqlite(conn: &mut AsyncSqliteConnection) -> QueryResult<()> {
    conn.spawn_blocking(<diesel::SqliteConnection as PoolableConnection>::begin_outer_transaction)
        .await
}

async fn parents_returning_pg(
    conn: &mut AsyncPgConnection,
    rows: &[NewA<'_>],
) -> QueryResult<Vec<i32>> {
    let mut ids: Vec<i32> = diesel::insert_into(a::table)
        .values(rows)
        .returning(a::id)
        .get_results(conn)
        .await?;
    ids.sort_unstable();
    Ok(ids)
}

/// SQLite: diesel builds a batched INSERT for SQLite only on the sync
/// `SqliteConnection` (its batch `QueryFragment` is special-cased there), so
/// `diesel_async::RunQueryDsl` cannot send one through the wrapper; the
/// wrapper's own answer is `spawn_blocking` with sync Diesel: one hop, one
/// multi-row statement, like the other backends.
async fn parents_returning_sqlite(
    conn: &mut AsyncSqliteConnection,
    rows: &[NewA<'_>],
) -> QueryResult<Vec<i32>> {
    let data: Vec<Option<String>> = rows.iter().map(|r| r.data.map(str::to_owned)).collect();
    let mut ids: Vec<i32> = conn
        .spawn_blocking(move |c| {
            let rows: Vec<NewA<'_>> = data.iter().map(|d| NewA { data: d.as_deref() }).collect();
            let insert = diesel::insert_into(a::table).values(&rows).returning(a::id);
            diesel::RunQueryDsl::get_results(insert, c)
        })
        .await?;
    ids.sort_unstable();
    Ok(ids)
}

/// SQLite children: one multi-row INSERT in one hop (see above).
async fn children_sqlite(conn: &mut AsyncSqliteConnection, rows: &[NewB<'_>]) -> QueryResult<()> {
    let data: Vec<(i32, Option<String>)> = rows
        .iter()
        .map(|r| (r.a_id, r.data.map(str::to_owned)))
        .collect();
    conn.spawn_blocking(move |c| {
        let rows: Vec<NewB<'_>> = data
            .iter()
            .map(|(a_id, d)| NewB {
                a_id: *a_id,
                data: d.as_deref(),
            })
            .collect();
        diesel::RunQueryDsl::execute(diesel::insert_into(b::table).values(&rows), c)
    })
    .await?;
    Ok(())
}

async fn children_pg(conn: &mut AsyncPgConnection, rows: &[NewB<'_>]) -> QueryResult<()> {
    diesel::insert_into(b::table)
        .values(rows)
        .execute(conn)
        .await?;
    Ok(())
}

async fn children_mysql(conn: &mut AsyncMysqlConnection, rows: &[NewB<'_>]) -> QueryResult<()> {
    diesel::insert_into(b::table)
        .values(rows)
        .execute(conn)
        .await?;
    Ok(())
}

/// MySQL: the batch, then `LAST_INSERT_ID()` (lock mode checked by the sync core).
async fn parents_mysql(
    conn: &mut AsyncMysqlConnection,
    rows: &[NewA<'_>],
) -> QueryResult<Vec<i32>> {
    diesel::insert_into(a::table)
        .values(rows)
        .execute(conn)
        .await?;
    let ids: BatchIds = diesel::sql_query(
        "SELECT CAST(LAST_INSERT_ID() AS SIGNED) AS first_id, \
         CAST(@@auto_increment_increment AS SIGNED) AS step",
    )
    .get_result(conn)
    .await?;
    Ok((0..rows.len() as i64)
        .map(|i| (ids.first_id + i * ids.step) as i32)
        .collect())
}

fn check(cond: bool, message: impl FnOnce() -> String) -> anyhow::Result<()> {
    if cond {
        Ok(())
    } else {
        anyhow::bail!(message())
    }
}

macro_rules! workload_for {
    ($name:ident, $conn:ty, $connect:path, $begin:path, $insert_parents:path, $insert_children:path) => {
        /// W(N) on this connection type; see the module docs.
        pub async fn $name(
            url: &str,
            n: usize,
            families: &[Family],
            counter: &Counter,
            migration: &Migration,
        ) -> anyhow::Result<Vec<Phase>> {
            type Conn = $conn;
            async fn commit(conn: &mut Conn) -> QueryResult<()> {
                <Conn as AsyncConnection>::TransactionManager::commit_transaction(conn).await
            }

            let mut timer = PhaseTimer::new(counter.clone());
            timer.start();
            let mut conn: Conn = $connect(url).await.context("diesel-async: connect")?;
            timer.stop_uncounted("connect");
            conn.set_instrumentation(counter.instrumentation());

            // schema
            timer.start();
            $begin(&mut conn).await?;
            conn.batch_execute(diesel::migration::CREATE_MIGRATIONS_TABLE)
                .await?;
            let applied: Vec<String> = __diesel_schema_migrations::table
                .select(__diesel_schema_migrations::version)
                .load(&mut conn)
                .await?;
            if applied.contains(&migration.version) {
                conn.batch_execute(migration.down).await?;
                diesel::delete(
                    __diesel_schema_migrations::table
                        .filter(__diesel_schema_migrations::version.eq(&migration.version)),
                )
                .execute(&mut conn)
                .await?;
            }
            conn.batch_execute(migration.up).await?;
            diesel::insert_into(__diesel_schema_migrations::table)
                .values(__diesel_schema_migrations::version.eq(&migration.version))
                .execute(&mut conn)
                .await?;
            commit(&mut conn).await.context("diesel-async: schema")?;
            timer.stop("schema");

            // insert: parents in batches, then their children.
            timer.start();
            $begin(&mut conn).await?;
            for chunk in families.chunks(PARENT_BATCH) {
                let parents: Vec<NewA<'_>> = chunk
                    .iter()
                    .map(|f| NewA {
                        data: f.data.as_deref(),
                    })
                    .collect();
                let ids = $insert_parents(&mut conn, &parents).await?;
                let children: Vec<NewB<'_>> = chunk
                    .iter()
                    .zip(&ids)
                    .flat_map(|(family, &a_id)| {
                        family.children.iter().map(move |data| NewB {
                            a_id,
                            data: data.as_deref(),
                        })
                    })
                    .collect();
                for batch in children.chunks(CHILD_BATCH) {
                    $insert_children(&mut conn, batch).await?;
                }
            }
            commit(&mut conn).await.context("diesel-async: insert")?;
            timer.stop("insert");

            // run_sync_lazy: N+1 awaited queries.
            timer.start();
            $begin(&mut conn).await?;
            let mut out = std::io::sink();
            let parents: Vec<A> = a::table.select(A::as_select()).load(&mut conn).await?;
            let mut children_seen = 0;
            for parent in &parents {
                writeln!(out, "{parent}")?;
                let children: Vec<B> = B::belonging_to(parent)
                    .select(B::as_select())
                    .load(&mut conn)
                    .await?;
                for child in &children {
                    writeln!(out, "{child}")?;
                }
                children_seen += children.len();
            }
            let first: A = a::table
                .order(a::id)
                .select(A::as_select())
                .first(&mut conn)
                .await?;
            diesel::update(&first)
                .set(a::data.eq("new data"))
                .execute(&mut conn)
                .await?;
            check(
                parents.len() == n && children_seen == expected_children(n),
                || {
                    format!(
                        "diesel-async lazy: counted {} / {children_seen}",
                        parents.len()
                    )
                },
            )?;
            commit(&mut conn)
                .await
                .context("diesel-async: run_sync_lazy")?;
            timer.stop("run_sync_lazy");

            // run_sync_eager: children in IN (...) queries.
            timer.start();
            $begin(&mut conn).await?;
            let parents: Vec<A> = a::table.select(A::as_select()).load(&mut conn).await?;
            let (mut parents_seen, mut children_seen) = (0, 0);
            for chunk in parents.chunks(EAGER_BATCH) {
                let grouped = B::belonging_to(chunk)
                    .select(B::as_select())
                    .load(&mut conn)
                    .await?
                    .grouped_by(chunk);
                for (parent, children) in chunk.iter().zip(&grouped) {
                    writeln!(out, "{parent}")?;
                    for child in children {
                        writeln!(out, "{child}")?;
                    }
                    parents_seen += 1;
                    children_seen += children.len();
                }
            }
            let first: A = a::table
                .order(a::id)
                .select(A::as_select())
                .first(&mut conn)
                .await?;
            diesel::update(&first)
                .set(a::data.eq("new data"))
                .execute(&mut conn)
                .await?;
            check(
                parents_seen == n && children_seen == expected_children(n),
                || format!("diesel-async eager: counted {parents_seen} / {children_seen}"),
            )?;
            commit(&mut conn)
                .await
                .context("diesel-async: run_sync_eager")?;
            timer.stop("run_sync_eager");

            // verify
            timer.start();
            $begin(&mut conn).await?;
            let parents: i64 = a::table.count().get_result(&mut conn).await?;
            let children: i64 = b::table.count().get_result(&mut conn).await?;
            let new_data: Vec<i32> = a::table
                .filter(a::data.eq("new data"))
                .select(a::id)
                .load(&mut conn)
                .await?;
            let min_id: Option<i32> = a::table
                .select(diesel::dsl::min(a::id))
                .get_result(&mut conn)
                .await?;
            commit(&mut conn).await?;
            check_verified(n, parents, children, &new_data, min_id)
                .map_err(|e| anyhow::anyhow!("diesel-async: {e}"))?;
            timer.stop("verify");
            Ok(timer.finish())
        }
    };
}

workload_for!(
    postgres,
    AsyncPgConnection,
    connect_pg,
    begin_ansi,
    parents_returning_pg,
    children_pg
);
workload_for!(
    mysql,
    AsyncMysqlConnection,
    connect_mysql,
    begin_ansi,
    parents_mysql,
    children_mysql
);
workload_for!(
    sqlite,
    AsyncSqliteConnection,
    connect_sqlite,
    begin_sqlite,
    parents_returning_sqlite,
    children_sqlite
);

/// A diesel-async connection of any backend with a transaction open, for
/// the micro figures.
// One value, held for the whole micro run: boxing would only add a pointer
// chase to the figure being measured.
#[allow(clippy::large_enum_variant)]
pub enum PeerConn {
    /// PostgreSQL.
    Pg(AsyncPgConnection),
    /// MySQL/MariaDB.
    Mysql(AsyncMysqlConnection),
    /// SQLite through the wrapper.
    Sqlite(AsyncSqliteConnection),
}

macro_rules! pk_select {
    ($conn:expr, $id:expr) => {{
        let _row: A = a::table
            .find($id)
            .select(A::as_select())
            .first($conn)
            .await?;
    }};
}

impl PeerConn {
    /// Connects and begins a transaction.
    pub async fn open(backend: diesel_runsync::Backend, url: &str) -> anyhow::Result<Self> {
        use diesel_runsync::Backend;
        Ok(match backend {
            Backend::Postgres => {
                let mut conn = connect_pg(url).await?;
                begin_ansi(&mut conn).await?;
                PeerConn::Pg(conn)
            }
            Backend::Mysql => {
                let mut conn = connect_mysql(url).await?;
                begin_ansi(&mut conn).await?;
                PeerConn::Mysql(conn)
            }
            Backend::Sqlite => {
                let mut conn = connect_sqlite(url).await?;
                // Deferred: a read transaction, leaving the write lock free.
                <AsyncSqliteConnection as AsyncConnection>::TransactionManager::begin_transaction(
                    &mut conn,
                )
                .await?;
                PeerConn::Sqlite(conn)
            }
        })
    }

    /// One PK SELECT of `a`, awaited.
    pub async fn pk_select(&mut self, id: i32) -> QueryResult<()> {
        match self {
            PeerConn::Pg(conn) => pk_select!(conn, id),
            PeerConn::Mysql(conn) => pk_select!(conn, id),
            PeerConn::Sqlite(conn) => pk_select!(conn, id),
        }
        Ok(())
    }
}

/// The load figures' unit of work on one connection: BEGIN (IMMEDIATE on
/// SQLite), a parent by key, its children, UPDATE the parent, COMMIT
/// (ROLLBACK on an error).
macro_rules! unit_for {
    ($name:ident, $conn:ty, $begin:path) => {
        async fn $name(conn: &mut $conn, id: i32) -> QueryResult<()> {
            type Tm = <$conn as AsyncConnection>::TransactionManager;
            $begin(conn).await?;
            let result = async {
                let parent: A = a::table.find(id).select(A::as_select()).first(conn).await?;
                let _children: Vec<B> = B::belonging_to(&parent)
                    .select(B::as_select())
                    .load(conn)
                    .await?;
                diesel::update(a::table.find(parent.id))
                    .set(a::data.eq("c"))
                    .execute(conn)
                    .await?;
                QueryResult::Ok(())
            }
            .await;
            match result {
                Ok(()) => Tm::commit_transaction(conn).await,
                Err(e) => {
                    let _ = Tm::rollback_transaction(conn).await;
                    Err(e)
                }
            }
        }
    };
}

unit_for!(unit_pg, AsyncPgConnection, begin_ansi);
unit_for!(unit_mysql, AsyncMysqlConnection, begin_ansi);
unit_for!(unit_sqlite, AsyncSqliteConnection, begin_sqlite);

/// A diesel-async bb8 pool (`diesel_async::pooled_connection::bb8`) of any
/// backend, for the load figures.
pub enum PeerPool {
    /// PostgreSQL.
    Pg(Bb8Pool<AsyncPgConnection>),
    /// MySQL/MariaDB.
    Mysql(Bb8Pool<AsyncMysqlConnection>),
    /// SQLite through the wrapper.
    Sqlite(Bb8Pool<AsyncSqliteConnection>),
}

/// bb8 with diesel-async's manager, set for its best showing: no `SELECT 1`
/// on checkout (`RecyclingMethod::Fast`, `test_on_check_out(false)`; the
/// default verifies every checkout with one more round trip), `size`
/// connections, all opened before this returns.
async fn bb8_pool<C>(
    url: &str,
    size: u32,
    mut config: ManagerConfig<C>,
) -> anyhow::Result<Bb8Pool<C>>
where
    C: diesel_async::pooled_connection::PoolableConnection + Send + 'static,
    AsyncDieselConnectionManager<C>: bb8::ManageConnection,
    <AsyncDieselConnectionManager<C> as bb8::ManageConnection>::Error:
        std::error::Error + Send + Sync + 'static,
{
    config.recycling_method = RecyclingMethod::Fast;
    let manager = AsyncDieselConnectionManager::<C>::new_with_config(url, config);
    let pool = Bb8Pool::builder()
        .max_size(size)
        .min_idle(Some(size))
        .test_on_check_out(false)
        .connection_timeout(std::time::Duration::from_secs(60))
        .build(manager)
        .await?;
    {
        // Hold every connection at once, so all are open before the clock.
        let mut held = Vec::new();
        for _ in 0..size {
            held.push(pool.get().await.map_err(|e| anyhow::anyhow!("{e}"))?);
        }
    }
    Ok(pool)
}

impl PeerPool {
    /// A pool of `size` connections to `url`.
    pub async fn open(
        backend: diesel_runsync::Backend,
        url: &str,
        size: u32,
    ) -> anyhow::Result<Self> {
        use diesel_runsync::Backend;
        Ok(match backend {
            Backend::Postgres => PeerPool::Pg(bb8_pool(url, size, ManagerConfig::default()).await?),
            Backend::Mysql => PeerPool::Mysql(bb8_pool(url, size, ManagerConfig::default()).await?),
            Backend::Sqlite => {
                let mut config = ManagerConfig::<AsyncSqliteConnection>::default();
                // The facade's pragmas on every new connection.
                config.custom_setup = Box::new(|url| {
                    let url = url.to_owned();
                    Box::pin(async move {
                        let mut conn = AsyncSqliteConnection::establish(&url).await?;
                        conn.batch_execute(
                            "PRAGMA journal_mode = WAL; PRAGMA busy_timeout = 5000; \
                             PRAGMA foreign_keys = ON;",
                        )
                        .await
                        .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
                        Ok(conn)
                    })
                });
                PeerPool::Sqlite(bb8_pool(url, size, config).await?)
            }
        })
    }

    /// Connections open.
    pub fn size(&self) -> u32 {
        match self {
            PeerPool::Pg(p) => p.state().connections,
            PeerPool::Mysql(p) => p.state().connections,
            PeerPool::Sqlite(p) => p.state().connections,
        }
    }

    /// One unit of work on a pooled connection.
    pub async fn unit(&self, id: i32) -> anyhow::Result<()> {
        macro_rules! on {
            ($pool:expr, $unit:path) => {{
                let mut conn = $pool.get().await.map_err(|e| anyhow::anyhow!("{e}"))?;
                $unit(&mut conn, id).await?;
            }};
        }
        match self {
            PeerPool::Pg(p) => on!(p, unit_pg),
            PeerPool::Mysql(p) => on!(p, unit_mysql),
            PeerPool::Sqlite(p) => on!(p, unit_sqlite),
        }
        Ok(())
    }
}
