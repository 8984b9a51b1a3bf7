//! Test databases and the per-backend test macro.
//!
//! Each test gets its own SQLite file, PostgreSQL database or MySQL
//! database, made by the library's `diesel_runsync::testing::TestDatabase`
//! (so tests run in parallel): dropped when the test passes, kept (its name
//! printed) when it fails, and dropped by a later run once its process is
//! gone. The database starts empty; the tests put the program's schema in
//! it with the program's own reset ([`migrate`], [`TestDb::migrated_engine`])
//! or its CLI, which is much of what they test.
//!
//! A test that touches a database exists once per backend, as
//! `name::sqlite`, `name::postgres` and `name::mysql` (see [`per_backend!`]),
//! so a failure names its backend and `cargo test postgres` picks one. A
//! server backend's test is *ignored* (never passed) when its URL variable
//! (`PG_DATABASE_URL`, `MYSQL_DATABASE_URL`) was unset at build time
//! (`runsync-tests/build.rs` sets `runsync_skip_postgres` / `runsync_skip_mysql`,
//! except under `CI=true` or `RUNSYNC_REQUIRE_ALL_BACKENDS=1`, where a
//! missing URL fails the test), and when its backend's cargo feature is
//! off (MySQL by default).
//!
//! Blocking work (direct connections, counting open transactions, child
//! processes, sleeps) goes through [`blocking`] or the async methods of
//! [`TestDb`] in async tests, never straight on a runtime thread.
#![allow(dead_code, unused_imports, unused_macros)]

use std::future::Future;
use std::sync::Arc;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel_runsync::testing::{NoMigrations, TestDatabase};
use diesel_runsync::{Backend, Engine, EngineOptions};
use greenlet_orm::queries::insert_families;
use greenlet_orm::schema::b;
use greenlet_orm::{AnyConnection, DemoError, Family, NewB};

/// One test per backend for the function `name` next to it:
///
/// ```ignore
/// per_backend!(commits_are_durable);             // async, current-thread runtime
/// async fn commits_are_durable(db: TestDb) { ... }
///
/// per_backend!(contention, multi_thread);        // async, 2 worker threads
/// per_backend!(migrations_go_up_and_down, sync); // fn(db: TestDb), no runtime
/// per_backend!(wrong_credentials, sync, [postgres, mysql]); // some backends only
/// ```
///
/// expands to `mod name { #[test] fn sqlite() ..., fn postgres() ..., fn mysql() ... }`
/// (module and function share the name: different namespaces). Each test
/// creates its [`TestDb`] before the runtime starts and drops it (the
/// server's `DROP DATABASE`) after the runtime is gone, so the async test
/// body itself never blocks on them.
macro_rules! per_backend {
    ($name:ident) => {
        $crate::common::per_backend!($name, current_thread, [sqlite, postgres, mysql]);
    };
    ($name:ident, [$($backend:ident),+ $(,)?]) => {
        $crate::common::per_backend!($name, current_thread, [$($backend),+]);
    };
    ($name:ident, $kind:ident) => {
        $crate::common::per_backend!($name, $kind, [sqlite, postgres, mysql]);
    };
    ($name:ident, $kind:ident, [$($backend:ident),+ $(,)?]) => {
        mod $name {
            $( $crate::common::per_backend!(@backend $name, $kind, $backend); )+
        }
    };
    (@backend $name:ident, $kind:ident, sqlite) => {
        $crate::common::per_backend!(@test $name, $kind, sqlite, Sqlite,);
    };
    (@backend $name:ident, $kind:ident, postgres) => {
        $crate::common::per_backend!(@test $name, $kind, postgres, Postgres,
            #[cfg_attr(not(feature = "postgres"), ignore = "built without the `postgres` feature")]
            #[cfg_attr(
                all(feature = "postgres", runsync_skip_postgres),
                ignore = "PG_DATABASE_URL is not set"
            )]
        );
    };
    (@backend $name:ident, $kind:ident, mysql) => {
        $crate::common::per_backend!(@test $name, $kind, mysql, Mysql,
            #[cfg_attr(
                not(feature = "mysql"),
                ignore = "built without the `mysql` feature (cargo test --features mysql)"
            )]
            #[cfg_attr(
                all(feature = "mysql", runsync_skip_mysql),
                ignore = "MYSQL_DATABASE_URL is not set"
            )]
        );
    };
    (@test $name:ident, sync, $backend:ident, $variant:ident, $(#[$attr:meta])*) => {
        #[test]
        $(#[$attr])*
        fn $backend() {
            let db = $crate::common::TestDb::new(::diesel_runsync::Backend::$variant);
            super::$name(db);
        }
    };
    (@test $name:ident, current_thread, $backend:ident, $variant:ident, $(#[$attr:meta])*) => {
        #[test]
        $(#[$attr])*
        fn $backend() {
            $crate::common::run_async(
                $crate::common::Flavor::CurrentThread,
                ::diesel_runsync::Backend::$variant,
                super::$name,
            );
        }
    };
    (@test $name:ident, multi_thread, $backend:ident, $variant:ident, $(#[$attr:meta])*) => {
        #[test]
        $(#[$attr])*
        fn $backend() {
            $crate::common::run_async(
                $crate::common::Flavor::MultiThread,
                ::diesel_runsync::Backend::$variant,
                super::$name,
            );
        }
    };
}
pub(crate) use per_backend;

/// The runtime an async test runs on.
#[derive(Clone, Copy, Debug)]
pub enum Flavor {
    /// `#[tokio::test]`'s default.
    CurrentThread,
    /// `#[tokio::test(flavor = "multi_thread", worker_threads = 2)]`.
    MultiThread,
}

/// What SPEC.md says the program prints.
pub const SEED_OUTPUT: &str = "\
A(id=1, data='a1')
B(id=1, a_id=1, data=None)
B(id=2, a_id=1, data=None)
A(id=2, data='a2')
B(id=3, a_id=2, data=None)
A(id=3, data='a3')
B(id=4, a_id=3, data=None)
B(id=5, a_id=3, data=None)
";

/// A runtime of `flavor`, as `#[tokio::test]` builds it.
pub fn runtime(flavor: Flavor) -> tokio::runtime::Runtime {
    match flavor {
        Flavor::CurrentThread => tokio::runtime::Builder::new_current_thread(),
        Flavor::MultiThread => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(2);
            builder
        }
    }
    .enable_all()
    .build()
    .expect("a tokio runtime")
}

/// Runs the async test `test` on a fresh database of `backend`: the
/// database is created before the runtime starts and dropped after it has
/// shut down (kept, when the test panics). A blocking task still running
/// [`SHUTDOWN_LIMIT`] after the test ended fails the test: a plain drop of
/// the runtime would wait for it forever, hanging the run instead.
pub fn run_async<F, Fut>(flavor: Flavor, backend: Backend, test: F)
where
    F: FnOnce(TestDb) -> Fut,
    Fut: Future<Output = ()>,
{
    let db = TestDb::new(backend);
    let runtime = runtime(flavor);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(test(db.clone()))
    }));
    let started = std::time::Instant::now();
    runtime.shutdown_timeout(SHUTDOWN_LIMIT);
    let stuck = started.elapsed() >= SHUTDOWN_LIMIT;
    if let Err(panic) = outcome {
        if stuck {
            eprintln!("and a blocking task was still running {SHUTDOWN_LIMIT:?} after the test");
        }
        std::panic::resume_unwind(panic);
    }
    drop(db);
    assert!(
        !stuck,
        "a blocking task was still running {SHUTDOWN_LIMIT:?} after the test ended"
    );
}

/// How long [`run_async`] waits for the runtime's blocking tasks.
pub const SHUTDOWN_LIMIT: std::time::Duration = std::time::Duration::from_secs(20);

/// Runs blocking `f` on tokio's blocking pool; a panic in `f` is resumed
/// in the caller, so an assertion inside fails the test as usual.
pub async fn blocking<R, F>(f: F) -> R
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(value) => value,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => panic!("blocking task failed: {e}"),
        },
    }
}

/// A database private to one test: a [`TestDatabase`]. Clones share it;
/// the last one dropped drops the database (and the SQLite file's
/// directory), or keeps it if the test is failing.
#[derive(Clone)]
pub struct TestDb {
    pub backend: Backend,
    /// URL of the private database.
    pub url: String,
    database: Arc<TestDatabase<AnyConnection>>,
}

/// What `TestDatabase` is given for SQLite: any SQLite URL stands for "a
/// fresh file in a temporary directory of its own" (the path is not used).
const SQLITE_URL: &str = "sqlite://test.db";

// The test databases are made with `NoMigrations`.
//
// `AnyConnection` could run Diesel migrations (`TestDatabase` would take
// `greenlet_orm::migrations::for_backend(backend)`), but the tests want
// an empty database: the program's schema step (`reset_schema`, its
// check-first `drop_all` / `create_all`, MySQL's staged renames) and the
// CLI's `migrate` commands are what they test, and they run them
// themselves, as before ([`migrate`]). So `TestDatabase` only creates
// the database: with no migration it leaves it empty, without even
// Diesel's `__diesel_schema_migrations` (which `migrations.rs` relies on:
// there another role than the server URL's runs the reset and creates it).

/// The options of the engine `TestDatabase` opens on the test database,
/// which the tests do not use (each makes the engines it needs, with the
/// options it needs): a lifetime so short that the one connection that
/// engine opens is closed as soon as it is back in the pool, so no idle
/// session of it sits on the test database (`reset_kill.rs` waits for the
/// database to have no session but its own).
fn unused_engine_options() -> EngineOptions {
    EngineOptions::default()
        .max_size(1)
        .max_lifetime(Some(std::time::Duration::from_nanos(1)))
}

/// The server URL for `backend`'s tests: `PG_DATABASE_URL` /
/// `MYSQL_DATABASE_URL` now, else the value it had when the tests were
/// built. A server test runs without one only when every backend is
/// required (CI) or ignored tests are run: then it fails here, saying so.
pub fn server_url(backend: Backend) -> String {
    let (var, built_with) = match backend {
        Backend::Postgres => ("PG_DATABASE_URL", option_env!("PG_DATABASE_URL")),
        Backend::Mysql => ("MYSQL_DATABASE_URL", option_env!("MYSQL_DATABASE_URL")),
        Backend::Sqlite => panic!("SQLite has no server URL"),
    };
    std::env::var(var)
        .ok()
        .or_else(|| built_with.map(str::to_owned))
        .filter(|url| !url.is_empty())
        .unwrap_or_else(|| {
            panic!(
                "{var} is not set, yet this {backend} test was not ignored (CI=true or \
                 RUNSYNC_REQUIRE_ALL_BACKENDS=1 at build time, or --ignored): set {var} to a \
                 {backend} server's URL; tests create their own databases on it"
            )
        })
}

impl TestDb {
    /// A fresh database of `backend`: a SQLite file in its own temporary
    /// directory, or a database created on the server [`server_url`]
    /// names. Blocking (it runs `TestDatabase`'s async set-up on a runtime
    /// of its own, on a thread of its own): call it outside the test's
    /// runtime (as [`per_backend!`] does).
    pub fn new(backend: Backend) -> TestDb {
        let server = match backend {
            Backend::Sqlite => SQLITE_URL.to_owned(),
            Backend::Postgres | Backend::Mysql => server_url(backend),
        };
        let database = std::thread::spawn(move || {
            runtime(Flavor::CurrentThread).block_on(TestDatabase::<AnyConnection>::on_with_options(
                &server,
                NoMigrations,
                unused_engine_options(),
            ))
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        TestDb {
            backend,
            url: database.url().to_owned(),
            database: Arc::new(database),
        }
    }

    /// An engine on this database with `options`.
    pub async fn engine_with(&self, options: EngineOptions) -> Engine<AnyConnection> {
        Engine::connect(&self.url, options)
            .await
            .unwrap_or_else(|e| panic!("engine for {}: {e}", self.backend))
    }

    /// An engine of `max_size` connections and a `timeout` checkout timeout
    /// on this database, with the demo schema migrated.
    pub async fn migrated_engine(
        &self,
        max_size: u32,
        timeout: std::time::Duration,
    ) -> Engine<AnyConnection> {
        let engine = self
            .engine_with(
                EngineOptions::default()
                    .max_size(max_size)
                    .connection_timeout(timeout),
            )
            .await;
        migrate(&engine).await;
        engine
    }

    /// An engine on this database with default options.
    pub async fn engine(&self) -> Engine<AnyConnection> {
        self.engine_with(EngineOptions::default()).await
    }

    /// A plain synchronous connection, outside any pool. Blocking: in async
    /// tests use [`with_connection`](Self::with_connection).
    pub fn connect(&self) -> AnyConnection {
        use diesel_runsync::PoolableConnection;
        let url = diesel_runsync::DatabaseUrl::parse(&self.url).unwrap();
        AnyConnection::connect(&url).expect("a direct connection")
    }

    /// Runs `f` on a fresh direct connection, on the blocking pool.
    pub async fn with_connection<R, F>(&self, f: F) -> R
    where
        F: FnOnce(&mut AnyConnection) -> R + Send + 'static,
        R: Send + 'static,
    {
        let db = self.clone();
        blocking(move || f(&mut db.connect())).await
    }

    /// [`open_transactions`] on the blocking pool.
    pub async fn open_transactions(&self) -> i64 {
        let db = self.clone();
        blocking(move || open_transactions(&db)).await
    }

    /// [`partial_units`] on the blocking pool.
    pub async fn partial_units(&self, children_per_parent: i64) -> i64 {
        let db = self.clone();
        blocking(move || partial_units(&db, children_per_parent)).await
    }
}

/// Creates the demo schema on `engine`'s database.
pub async fn migrate(engine: &Engine<AnyConnection>) {
    greenlet_orm::program::reset_schema(engine)
        .await
        .expect("schema reset");
}

/// Transactions left open on the server by connections to this test's
/// database, other than the caller's own (0 is the only right answer).
/// PostgreSQL: backends `idle in transaction`; MySQL: InnoDB transactions of
/// other threads; SQLite: whether a writer holds the lock (a
/// `BEGIN IMMEDIATE` from a fresh connection fails within its 5 s timeout).
///
/// A connection the pool has just closed (refused with a transaction open)
/// is rolled back by the server as it notices the disconnect, a few
/// milliseconds later; so a non-zero count is looked at again for up to 3 s.
/// A transaction really left open in a live connection stays and is counted.
///
/// Blocking: async tests call [`TestDb::open_transactions`].
pub fn open_transactions(db: &TestDb) -> i64 {
    let mut count = open_transactions_now(db);
    for _ in 0..30 {
        if count == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        count = open_transactions_now(db);
    }
    count
}

fn open_transactions_now(db: &TestDb) -> i64 {
    use diesel::sql_types::BigInt;
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let mut conn = db.connect();
    let sql = match db.backend {
        Backend::Postgres => {
            "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() \
             AND state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()"
        }
        Backend::Mysql => {
            "SELECT CAST(count(*) AS SIGNED) AS n FROM information_schema.innodb_trx t \
             JOIN information_schema.processlist p ON p.id = t.trx_mysql_thread_id \
             WHERE p.db = DATABASE() AND p.id <> CONNECTION_ID()"
        }
        Backend::Sqlite => {
            return match conn.batch_execute("BEGIN IMMEDIATE; ROLLBACK;") {
                Ok(()) => 0,
                Err(_) => 1,
            };
        }
    };
    diesel::sql_query(sql)
        .get_result::<Count>(&mut conn)
        .expect("count open transactions")
        .n
}

/// Units of work ("a parent with its children") that were committed only
/// in part: parents whose child count is not `children_per_parent`.
/// Blocking: async tests call [`TestDb::partial_units`].
pub fn partial_units(db: &TestDb, children_per_parent: i64) -> i64 {
    partial_units_on(&mut db.connect(), children_per_parent)
}

/// [`partial_units`] on any connection to the database (blocking).
pub fn partial_units_on(conn: &mut AnyConnection, children_per_parent: i64) -> i64 {
    use diesel::sql_types::BigInt;
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let int = if conn.backend() == Backend::Mysql {
        "SIGNED"
    } else {
        "BIGINT"
    };
    diesel::sql_query(format!(
        "SELECT CAST(count(*) AS {int}) AS n FROM a WHERE \
         (SELECT count(*) FROM b WHERE b.a_id = a.id) <> {children_per_parent}"
    ))
    .get_result::<Count>(conn)
    .expect("count partial units")
    .n
}

/// Waits (up to 10 s) until every open pooled connection is idle again:
/// the blocking tasks of cancelled futures have finished.
pub async fn settle(engine: &Engine<AnyConnection>) {
    for _ in 0..200 {
        let status = engine.status();
        if status.idle == status.connections {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("pool did not settle: {:?}", engine.status());
}

/// The first half of a unit of work: one parent; returns its id
/// (`insert_families` reads it back safely under concurrency: RETURNING, or
/// `LAST_INSERT_ID()` on MySQL).
pub fn insert_parent(conn: &mut AnyConnection) -> Result<i32, DemoError> {
    Ok(insert_families(conn, &[Family::new("unit", 0)])?[0])
}

/// The second half: its two children, one statement each.
pub fn insert_children(conn: &mut AnyConnection, a_id: i32) -> Result<(), DemoError> {
    for _ in 0..2 {
        diesel::insert_into(b::table)
            .values(NewB { a_id, data: None })
            .execute(conn)?;
    }
    Ok(())
}

/// A whole unit of work in one closure: a parent, then its two children.
pub fn insert_unit(conn: &mut AnyConnection) -> Result<(), DemoError> {
    let id = insert_parent(conn)?;
    insert_children(conn, id)
}
