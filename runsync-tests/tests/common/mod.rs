//! The per-backend test harness of diesel-runsync's own integration tests.
//!
//! Each test is one generic function, `async fn name<C: TestBackend>(db:
//! TestDb<C>)`, and [`per_backend!`] turns it into a module of three tests,
//! `name::sqlite`, `name::postgres` and `name::mysql`, each over a database
//! of its own, made by the library's own `diesel_runsync::testing::TestDatabase`
//! (a SQLite file in a temporary directory, or a database `rst_<pid>_<n>` on
//! the server `PG_DATABASE_URL` / `MYSQL_DATABASE_URL` names). It is
//! dropped when the test passes, and kept, its name printed, when the test
//! fails. So `cargo test postgres` runs the PostgreSQL tests.
//!
//! A server test whose URL was unset when the tests were built shows as
//! *ignored* (the `runsync_skip_*` cfgs of `build.rs`), never as passed; with
//! `CI=true` or `RUNSYNC_REQUIRE_ALL_BACKENDS=1` nothing is ignored and a
//! missing URL fails the test. A backend whose cargo feature is off shows as
//! ignored too.
//!
//! The schema is this crate's own small table, `items (id, unit, part)`,
//! plus a one-row `counter`. A *unit* of work is two rows with the same
//! `unit` (parts 0 and 1), written by two `run_sync` calls; a unit committed
//! with one part only is a *partial unit*, which must never exist.
//!
//! Everything here that opens a direct connection is blocking; the tests
//! reach it only through the async helpers of [`TestDb`], which run it
//! with `tokio::task::spawn_blocking`.
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::result::QueryResult;
use diesel_migrations::MigrationHarness;
use diesel_runsync::testing::{NoMigrations, TestDatabase};
use diesel_runsync::{AsyncSession, DatabaseUrl, Engine, EngineOptions, Error, PoolableConnection};
// Not every test binary uses them.
#[allow(unused_imports)]
pub use runsync_testkit::chaos::{next_random, poll_at_most};

/// What the tests need to know and do per backend.
pub trait TestBackend: PoolableConnection + Sized {
    /// `sqlite`, `postgres` or `mysql`.
    const NAME: &'static str;
    /// The integer type to `CAST` counts to (`BIGINT`; MySQL `SIGNED`).
    const BIGINT: &'static str;
    /// The test schema: `items` and `counter` (with its one row).
    const SCHEMA: &'static str;
    /// A statement to run first in a contended counter transaction
    /// (PostgreSQL: `SERIALIZABLE`, so that concurrent increments conflict).
    const COUNTER_ISOLATION: Option<&'static str> = None;
    /// Appended to the counter's `SELECT` (MySQL: `FOR UPDATE`).
    const COUNTER_LOCK: &'static str = "";
    /// Whether concurrent counter increments fail and are retried (true on
    /// PostgreSQL's SERIALIZABLE; MySQL's row lock and SQLite's
    /// `BEGIN IMMEDIATE` make them wait instead).
    const COUNTER_CONFLICTS: bool = false;
    /// How long the server's view of open transactions may lag (MySQL's
    /// `information_schema.innodb_trx` is a cache refreshed only when last
    /// read more than 100 ms ago).
    const SNAPSHOT_LAG: Duration = Duration::ZERO;

    /// The server URL (any database on it), or `None` for SQLite: the
    /// variable at run time, else its value when the tests were built.
    /// Panics when neither is set: the test was required, not ignored.
    fn server_url() -> Option<String>;

    /// Runs `sql`, a query of one row with a `BIGINT` column `n`.
    fn scalar(&mut self, sql: &str) -> QueryResult<i64>;

    /// Runs `sql`, a query of rows with a `BIGINT` column `n`.
    fn scalars(&mut self, sql: &str) -> QueryResult<Vec<i64>>;

    /// Transactions open on this database in connections other than this one.
    fn open_transactions_now(&mut self) -> QueryResult<i64>;
}

/// A row with one `BIGINT` column `n`.
#[derive(diesel::QueryableByName)]
pub struct Scalar {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

macro_rules! scalar_queries {
    () => {
        fn scalar(&mut self, sql: &str) -> QueryResult<i64> {
            use diesel::RunQueryDsl;
            diesel::sql_query(sql)
                .get_result::<Scalar>(self)
                .map(|row| row.n)
        }

        fn scalars(&mut self, sql: &str) -> QueryResult<Vec<i64>> {
            use diesel::RunQueryDsl;
            Ok(diesel::sql_query(sql)
                .load::<Scalar>(self)?
                .into_iter()
                .map(|row| row.n)
                .collect())
        }
    };
}

/// `var` at run time, else `compiled` (its value at build time); a clear
/// panic when neither is set.
fn configured(var: &str, compiled: Option<&'static str>) -> String {
    std::env::var(var)
        .ok()
        .filter(|v| !v.is_empty())
        .or_else(|| compiled.filter(|v| !v.is_empty()).map(str::to_owned))
        .unwrap_or_else(|| {
            panic!(
                "{var} is not set, neither now nor when the tests were built, yet this test \
                 was not ignored (CI=true or RUNSYNC_REQUIRE_ALL_BACKENDS=1 at build time, or \
                 --ignored): set {var} to a server URL; tests create their own databases on it"
            )
        })
}

#[cfg(feature = "sqlite")]
impl TestBackend for diesel::SqliteConnection {
    const NAME: &'static str = "sqlite";
    const BIGINT: &'static str = "BIGINT";
    const SCHEMA: &'static str = "
        CREATE TABLE items (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            unit INTEGER NOT NULL,
            part INTEGER NOT NULL,
            UNIQUE (unit, part)
        );
        CREATE TABLE counter (id INTEGER PRIMARY KEY, n INTEGER NOT NULL);
        INSERT INTO counter (id, n) VALUES (1, 0);
    ";

    fn server_url() -> Option<String> {
        None
    }

    scalar_queries!();

    /// Whether a writer holds the database: a `BEGIN IMMEDIATE` from this
    /// connection fails (every transaction of the engine begins IMMEDIATE).
    fn open_transactions_now(&mut self) -> QueryResult<i64> {
        self.batch_execute("PRAGMA busy_timeout = 100")?;
        Ok(match self.batch_execute("BEGIN IMMEDIATE; ROLLBACK;") {
            Ok(()) => 0,
            Err(_) => 1,
        })
    }
}

#[cfg(feature = "postgres")]
impl TestBackend for diesel::PgConnection {
    const NAME: &'static str = "postgres";
    const BIGINT: &'static str = "BIGINT";
    const SCHEMA: &'static str = "
        CREATE TABLE items (
            id SERIAL PRIMARY KEY,
            unit INTEGER NOT NULL,
            part INTEGER NOT NULL,
            UNIQUE (unit, part)
        );
        CREATE TABLE counter (id INTEGER PRIMARY KEY, n INTEGER NOT NULL);
        INSERT INTO counter (id, n) VALUES (1, 0);
    ";
    const COUNTER_ISOLATION: Option<&'static str> =
        Some("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE");
    const COUNTER_CONFLICTS: bool = true;

    fn server_url() -> Option<String> {
        Some(configured(
            "PG_DATABASE_URL",
            option_env!("PG_DATABASE_URL"),
        ))
    }

    scalar_queries!();

    fn open_transactions_now(&mut self) -> QueryResult<i64> {
        self.scalar(
            "SELECT CAST(count(*) AS BIGINT) AS n FROM pg_stat_activity \
             WHERE datname = current_database() \
             AND state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()",
        )
    }
}

#[cfg(feature = "mysql")]
impl TestBackend for diesel::MysqlConnection {
    const NAME: &'static str = "mysql";
    const BIGINT: &'static str = "SIGNED";
    const SCHEMA: &'static str = "
        CREATE TABLE items (
            id INTEGER NOT NULL AUTO_INCREMENT PRIMARY KEY,
            unit INTEGER NOT NULL,
            part INTEGER NOT NULL,
            UNIQUE KEY unit_part (unit, part)
        ) ENGINE = InnoDB;
        CREATE TABLE counter (id INTEGER PRIMARY KEY, n INTEGER NOT NULL) ENGINE = InnoDB;
        INSERT INTO counter (id, n) VALUES (1, 0);
    ";
    const COUNTER_LOCK: &'static str = " FOR UPDATE";
    const SNAPSHOT_LAG: Duration = Duration::from_millis(150);

    fn server_url() -> Option<String> {
        Some(configured(
            "MYSQL_DATABASE_URL",
            option_env!("MYSQL_DATABASE_URL"),
        ))
    }

    scalar_queries!();

    fn open_transactions_now(&mut self) -> QueryResult<i64> {
        self.scalar(
            "SELECT CAST(count(*) AS SIGNED) AS n FROM information_schema.innodb_trx t \
             JOIN information_schema.processlist p ON p.id = t.trx_mysql_thread_id \
             WHERE p.db = DATABASE() AND p.id <> CONNECTION_ID()",
        )
    }
}

/// A plain synchronous connection to `url`, set up as the engine sets up
/// its own (SQLite: WAL, busy timeout). Blocking.
fn connect_blocking<C: TestBackend>(url: &str) -> C {
    let parsed = DatabaseUrl::parse(url).unwrap_or_else(|e| panic!("{}: {e}", C::NAME));
    C::connect(&parsed).unwrap_or_else(|e| panic!("{}: a direct connection: {e}", C::NAME))
}

/// What `TestDatabase` is given for SQLite: any SQLite URL stands for "a
/// fresh file in a temporary directory of its own" (the path is not used).
const SQLITE_URL: &str = "sqlite://test.db";

// The test databases are made with `NoMigrations`. The schema
// (`items`, `counter`) is not a migration: the tests create it when they
// want it ([`TestDb::engine`], [`TestDb::migrated_engine`],
// [`TestDb::create_schema`]), and some run on a database without it.
// With no migration, `TestDatabase` leaves the database empty.

/// The options of the engine `TestDatabase` opens on the test database,
/// which the tests do not use (each makes the engines it needs, with the
/// options it needs): a lifetime so short that the one connection that
/// engine opens is closed as soon as it is back in the pool, so no idle
/// session of it sits on the test database for the tests to see.
fn unused_engine_options() -> EngineOptions {
    EngineOptions::default()
        .max_size(1)
        .max_lifetime(Some(Duration::from_nanos(1)))
}

/// A database private to one test, of backend `C`: a
/// [`TestDatabase`], dropped with it when the test passes, kept (and
/// named) when it fails.
pub struct TestDb<C: TestBackend> {
    /// URL of the private database.
    pub url: String,
    database: TestDatabase<C>,
}

/// A blocking helper's result; its panic, if it panicked, goes on as the
/// test's own, with its message.
fn joined<T>(result: Result<T, tokio::task::JoinError>) -> T {
    match result {
        Ok(value) => value,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("a blocking helper did not run: {e}"),
    }
}

/// Runs one backend's instance of a test: creates its database and runs
/// `body`, which owns it (and so drops it as it ends, or keeps it if it
/// panics). What [`per_backend!`] expands to.
pub async fn run<C, F, Fut>(body: F)
where
    C: TestBackend + MigrationHarness<C::Backend>,
    F: FnOnce(TestDb<C>) -> Fut,
    Fut: Future<Output = ()>,
{
    body(TestDb::<C>::create().await).await;
}

impl<C: TestBackend> TestDb<C> {
    /// A fresh SQLite file, or a fresh database on the server.
    async fn create() -> TestDb<C>
    where
        C: MigrationHarness<C::Backend>,
    {
        let server = C::server_url().unwrap_or_else(|| SQLITE_URL.to_owned());
        let database =
            TestDatabase::<C>::on_with_options(&server, NoMigrations, unused_engine_options())
                .await;
        TestDb {
            url: database.url().to_owned(),
            database,
        }
    }

    /// The backend's name, for assertion messages.
    pub fn backend(&self) -> &'static str {
        C::NAME
    }

    /// An engine on this database with `options` (no schema created).
    pub async fn engine_with(&self, options: EngineOptions) -> Engine<C> {
        Engine::connect(&self.url, options)
            .await
            .unwrap_or_else(|e| panic!("{}: engine: {e}", C::NAME))
    }

    /// An engine with default options, over the created schema.
    pub async fn engine(&self) -> Engine<C> {
        self.create_schema().await;
        self.engine_with(EngineOptions::default()).await
    }

    /// An engine of `max_size` connections and checkout timeout `timeout`,
    /// over the created schema.
    pub async fn migrated_engine(&self, max_size: u32, timeout: Duration) -> Engine<C> {
        self.create_schema().await;
        self.engine_with(
            EngineOptions::default()
                .max_size(max_size)
                .connection_timeout(timeout),
        )
        .await
    }

    /// Creates `items` and `counter`, over a direct connection.
    pub async fn create_schema(&self) {
        self.blocking(|c| c.batch_execute(C::SCHEMA))
            .await
            .unwrap_or_else(|e| panic!("{}: schema: {e}", C::NAME));
    }

    /// Runs `f` on a direct connection of its own, outside any pool, on
    /// tokio's blocking pool.
    pub async fn blocking<T, F>(&self, f: F) -> T
    where
        F: FnOnce(&mut C) -> T + Send + 'static,
        T: Send + 'static,
    {
        let url = self.url.clone();
        joined(tokio::task::spawn_blocking(move || f(&mut connect_blocking::<C>(&url))).await)
    }

    /// Committed rows of `items`.
    pub async fn rows(&self) -> i64 {
        self.blocking(|c| count_rows(c)).await.expect("count rows")
    }

    /// Units with at least one committed part.
    pub async fn units(&self) -> i64 {
        self.blocking(|c| count_units(c))
            .await
            .expect("count units")
    }

    /// Units committed with one part only (0 is the only right answer).
    pub async fn partial_units(&self) -> i64 {
        self.blocking(|c| partial_units_on(c))
            .await
            .expect("count partial units")
    }

    /// The counter's value.
    pub async fn counter(&self) -> i64 {
        self.blocking(|c| {
            c.scalar(&format!(
                "SELECT CAST(n AS {}) AS n FROM counter WHERE id = 1",
                C::BIGINT
            ))
        })
        .await
        .expect("read the counter")
    }

    /// Transactions left open on this database by other connections (0 is
    /// the only right answer). A connection the pool has just closed is
    /// rolled back by the server as it notices, a little later; so a
    /// non-zero count is looked at again for up to 3 s. A transaction
    /// really left open in a live connection stays, and is counted.
    pub async fn open_transactions(&self) -> i64 {
        self.blocking(|c| {
            let pause = C::SNAPSHOT_LAG.max(Duration::from_millis(100));
            // Wait out the lag first, so the view is at least as new as this call.
            std::thread::sleep(C::SNAPSHOT_LAG);
            let started = std::time::Instant::now();
            let mut count = c.open_transactions_now().expect("count open transactions");
            while count != 0 && started.elapsed() < Duration::from_secs(3) {
                std::thread::sleep(pause);
                count = c.open_transactions_now().expect("count open transactions");
            }
            count
        })
        .await
    }
}

/// A closure's error type of the tests' own, as an application would
/// write it: anything `From<Error>` can pass through `run_sync`.
#[derive(Debug)]
pub enum TestError {
    Session(Error),
    Database(diesel::result::Error),
    Check(String),
}

impl From<Error> for TestError {
    fn from(e: Error) -> Self {
        TestError::Session(e)
    }
}

impl From<diesel::result::Error> for TestError {
    /// A facade error that travelled inside a Diesel error comes back as itself.
    fn from(e: diesel::result::Error) -> Self {
        match Error::from(e) {
            Error::Database(e) => TestError::Database(e),
            other => TestError::Session(other),
        }
    }
}

impl std::fmt::Display for TestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TestError::Session(e) => write!(f, "{e}"),
            TestError::Database(e) => write!(f, "{e}"),
            TestError::Check(m) => write!(f, "check failed: {m}"),
        }
    }
}

/// A statement that keeps the server busy for about `seconds` (SQLite: at
/// least that long on any machine here: counting a recursive CTE, tens of
/// millions of rows a second at most).
pub fn long_statement<C: TestBackend>(seconds: f64) -> String {
    match C::NAME {
        "postgres" => format!("SELECT pg_sleep({seconds})"),
        "mysql" => format!("SELECT SLEEP({seconds})"),
        _ => format!(
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT {}) \
             SELECT count(*) FROM c",
            (seconds * 20_000_000.0) as u64
        ),
    }
}

static UNITS: AtomicI32 = AtomicI32::new(1);

/// A unit number not used before in this process.
pub fn next_unit() -> i32 {
    UNITS.fetch_add(1, Ordering::Relaxed)
}

/// One part of a unit: one row.
pub fn insert_part<C: TestBackend>(c: &mut C, unit: i32, part: i32) -> QueryResult<()> {
    c.batch_execute(&format!(
        "INSERT INTO items (unit, part) VALUES ({unit}, {part})"
    ))
}

/// A whole unit in one closure: parts 0 and 1.
pub fn insert_unit<C: TestBackend>(c: &mut C, unit: i32) -> QueryResult<()> {
    insert_part(c, unit, 0)?;
    insert_part(c, unit, 1)
}

/// A MariaDB/MySQL status counter of this connection's session
/// (`SHOW SESSION STATUS LIKE name`), read with a statement Diesel prepares
/// and runs each time (one `Questions` and one `Com_stmt_prepare` of its own).
#[cfg(feature = "mysql")]
pub fn session_status(c: &mut diesel::MysqlConnection, name: &str) -> QueryResult<i64> {
    use diesel::RunQueryDsl;
    #[derive(diesel::QueryableByName)]
    struct Status {
        #[diesel(sql_type = diesel::sql_types::Text)]
        #[diesel(column_name = Value)]
        value: String,
    }
    let status: Status =
        diesel::sql_query(format!("SHOW SESSION STATUS LIKE '{name}'")).get_result(c)?;
    Ok(status.value.parse().expect("a status counter is a number"))
}

/// Rows of `items` this connection sees.
pub fn count_rows<C: TestBackend>(c: &mut C) -> QueryResult<i64> {
    c.scalar(&format!(
        "SELECT CAST(count(*) AS {}) AS n FROM items",
        C::BIGINT
    ))
}

/// Distinct units this connection sees.
pub fn count_units<C: TestBackend>(c: &mut C) -> QueryResult<i64> {
    c.scalar(&format!(
        "SELECT CAST(count(DISTINCT unit) AS {}) AS n FROM items",
        C::BIGINT
    ))
}

/// Units this connection sees with a part count other than 2.
pub fn partial_units_on<C: TestBackend>(c: &mut C) -> QueryResult<i64> {
    c.scalar(&format!(
        "SELECT CAST(count(*) AS {}) AS n FROM \
         (SELECT unit FROM items GROUP BY unit HAVING count(*) <> 2) partial",
        C::BIGINT
    ))
}

/// One whole unit through a session, in two `run_sync` calls (part 0,
/// then part 1); returns its number.
pub async fn unit<C: TestBackend>(session: &mut AsyncSession<C>) -> Result<i32, TestError> {
    let unit = next_unit();
    session.run_sync(move |c| insert_part(c, unit, 0)).await?;
    session.run_sync(move |c| insert_part(c, unit, 1)).await?;
    Ok(unit)
}

/// Waits (up to 10 s) until every open pooled connection is idle again:
/// the blocking tasks of cancelled futures have finished.
pub async fn settle<C: TestBackend>(engine: &Engine<C>) {
    for _ in 0..200 {
        let status = engine.status();
        if status.idle == status.connections {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{}: pool did not settle: {:?}", C::NAME, engine.status());
}

/// `per_backend!(name)` (current-thread runtime) or
/// `per_backend!(name, multi_thread)` (two workers), next to
/// `async fn name<C: TestBackend>(db: TestDb<C>)`: the tests `name::sqlite`,
/// `name::postgres` and `name::mysql`. One whose backend is not built in, or
/// whose server URL was unset at build time, is ignored, never passed.
/// `per_backend!(name, servers)`: `name::postgres` and `name::mysql` only,
/// for what only a server has.
macro_rules! per_backend {
    ($test:ident) => {
        $crate::common::per_backend!(@emit $test, [], [sqlite postgres mysql]);
    };
    ($test:ident, multi_thread) => {
        $crate::common::per_backend!(
            @emit $test, [flavor = "multi_thread", worker_threads = 2], [sqlite postgres mysql]
        );
    };
    ($test:ident, servers) => {
        $crate::common::per_backend!(@emit $test, [], [postgres mysql]);
    };
    (@emit $test:ident, $runtime:tt, [$($backend:ident)*]) => {
        mod $test {
            $($crate::common::per_backend!(@$backend $test, $runtime);)*
        }
    };
    (@sqlite $test:ident, [$($runtime:tt)*]) => {
        #[tokio::test($($runtime)*)]
        #[cfg_attr(not(feature = "sqlite"), ignore = "built without the sqlite feature")]
        async fn sqlite() {
            #[cfg(feature = "sqlite")]
            $crate::common::run(super::$test::<diesel::SqliteConnection>).await;
        }
    };
    (@postgres $test:ident, [$($runtime:tt)*]) => {
        #[tokio::test($($runtime)*)]
        #[cfg_attr(not(feature = "postgres"), ignore = "built without the postgres feature")]
        #[cfg_attr(
            all(feature = "postgres", runsync_skip_postgres),
            ignore = "PG_DATABASE_URL is not set"
        )]
        async fn postgres() {
            #[cfg(feature = "postgres")]
            $crate::common::run(super::$test::<diesel::PgConnection>).await;
        }
    };
    (@mysql $test:ident, [$($runtime:tt)*]) => {
        #[tokio::test($($runtime)*)]
        #[cfg_attr(not(feature = "mysql"), ignore = "built without the mysql feature")]
        #[cfg_attr(
            all(feature = "mysql", runsync_skip_mysql),
            ignore = "MYSQL_DATABASE_URL is not set"
        )]
        async fn mysql() {
            #[cfg(feature = "mysql")]
            $crate::common::run(super::$test::<diesel::MysqlConnection>).await;
        }
    };
}
pub(crate) use per_backend;

/// `var` as a count of rounds, else `default` (the suite's small count; the
/// figure commands of RELIABILITY.md set the full one).
pub fn rounds_from(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Median, 99th percentile and maximum of `times`, in milliseconds.
pub fn spread(mut times: Vec<Duration>) -> (f64, f64, f64) {
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let n = times.len();
    (
        ms(times[n / 2]),
        ms(times[(n * 99).div_ceil(100) - 1]),
        ms(times[n - 1]),
    )
}
