//! `diesel_runsync::testing::TestDatabase` (issue 19): each test a database
//! of its own with the migrations applied, on SQLite, PostgreSQL and MySQL;
//! parallel tests never share one; dropped when the test passes, kept (and
//! named) when it fails; on PostgreSQL copied from a template migrated once
//! per process, which the `template_vs_migrations` figure compares with
//! running the migrations for each database.
//!
//! The migrations are this package's `migrations/<backend>/` (twenty
//! tables, each with an index).

// Some helpers serve the server backends only.
#![cfg_attr(
    not(all(feature = "postgres", feature = "mysql")),
    allow(dead_code, unused_imports)
)]

#[allow(unused_macros, unused_imports)]
mod common;

use std::time::{Duration, Instant};

use common::TestBackend;
use diesel::connection::SimpleConnection;
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use diesel_runsync::testing::TestDatabase;
use diesel_runsync::{Error, PoolableConnection};

#[cfg(feature = "sqlite")]
const SQLITE: EmbeddedMigrations = embed_migrations!("migrations/sqlite");
#[cfg(feature = "postgres")]
const POSTGRES: EmbeddedMigrations = embed_migrations!("migrations/postgres");
#[cfg(feature = "mysql")]
const MYSQL: EmbeddedMigrations = embed_migrations!("migrations/mysql");

/// Rows of `t20` on the test database.
async fn rows<C: TestBackend>(db: &TestDatabase<C>) -> i64 {
    db.engine()
        .transaction(|c: &mut C| {
            c.scalar(&format!(
                "SELECT CAST(count(*) AS {}) AS n FROM t20",
                C::BIGINT
            ))
            .map_err(Error::from)
        })
        .await
        .unwrap()
}

/// Two databases at once: migrated, apart, and each dropped with its
/// `TestDatabase` (a server's is gone from its catalogue afterwards).
async fn two_databases_apart<C>(server: &str, migrations: fn() -> EmbeddedMigrations)
where
    C: TestBackend + MigrationHarness<C::Backend>,
{
    let (a, b) = tokio::join!(
        TestDatabase::<C>::on(server, migrations()),
        TestDatabase::<C>::on(server, migrations())
    );
    assert_ne!(a.name(), b.name());
    a.engine()
        .transaction(|c: &mut C| c.batch_execute("INSERT INTO t20 (name) VALUES ('x')"))
        .await
        .unwrap();
    assert_eq!((rows(&a).await, rows(&b).await), (1, 0), "{}", C::NAME);
    let name = a.name().to_owned();
    drop(a);
    drop(b);
    if C::NAME == "sqlite" {
        assert!(!std::path::Path::new(&name).exists(), "{name} was removed");
    } else {
        assert!(
            !exists::<C>(server, &name),
            "{}: {name} was dropped",
            C::NAME
        );
    }
}

/// Whether database `name` is on the server.
fn exists<C: TestBackend>(server: &str, name: &str) -> bool {
    let mut admin = C::establish(server).unwrap();
    let sql = if C::NAME == "postgres" {
        format!("SELECT count(*) AS n FROM pg_database WHERE datname = '{name}'")
    } else {
        format!(
            "SELECT CAST(count(*) AS SIGNED) AS n FROM information_schema.schemata \
             WHERE schema_name = '{name}'"
        )
    };
    admin.scalar(&sql).unwrap() == 1
}

/// A test that fails keeps its database, named; this one then drops it.
async fn kept_when_the_test_fails<C>(server: &str, migrations: fn() -> EmbeddedMigrations)
where
    C: TestBackend + MigrationHarness<C::Backend>,
{
    let db = TestDatabase::<C>::on(server, migrations()).await;
    let name = db.name().to_owned();
    // The failing test: its panic unwinds through the TestDatabase's drop.
    let failed = std::thread::spawn(move || {
        let _db = db;
        panic!("a failing test");
    })
    .join();
    assert!(failed.is_err());
    assert!(exists::<C>(server, &name), "{}: {name} was kept", C::NAME);
    let mut admin = C::establish(server).unwrap();
    admin
        .batch_execute(&format!("DROP DATABASE {name}"))
        .unwrap();
}

/// No migration, an empty database: not even Diesel's
/// `__diesel_schema_migrations` (the program's tests, whose subject is the
/// program's own schema step, start from it).
struct NoMigrations;

impl<DB: diesel::backend::Backend> diesel::migration::MigrationSource<DB> for NoMigrations {
    fn migrations(
        &self,
    ) -> diesel::migration::Result<Vec<Box<dyn diesel::migration::Migration<DB>>>> {
        Ok(Vec::new())
    }
}

async fn empty_without_migrations<C>(server: &str)
where
    C: TestBackend + MigrationHarness<C::Backend>,
{
    let db = TestDatabase::<C>::on(server, NoMigrations).await;
    let sql = match C::NAME {
        "sqlite" => "SELECT CAST(count(*) AS BIGINT) AS n FROM sqlite_master WHERE type = 'table'"
            .to_owned(),
        "postgres" => "SELECT CAST(count(*) AS BIGINT) AS n FROM pg_tables \
                       WHERE schemaname = 'public'"
            .to_owned(),
        _ => format!(
            "SELECT CAST(count(*) AS SIGNED) AS n FROM information_schema.tables \
             WHERE table_schema = '{}'",
            db.name()
        ),
    };
    let tables = db
        .engine()
        .transaction(move |c: &mut C| c.scalar(&sql))
        .await
        .unwrap();
    assert_eq!(tables, 0, "{}: no table", C::NAME);
}

/// Which connection types [`TestDatabase::new`] may default to SQLite for.
#[test]
fn only_sqlite_is_embedded() {
    #[cfg(feature = "sqlite")]
    assert!(<diesel::SqliteConnection as PoolableConnection>::is_embedded());
    #[cfg(feature = "postgres")]
    assert!(!<diesel::PgConnection as PoolableConnection>::is_embedded());
    #[cfg(feature = "mysql")]
    assert!(!<diesel::MysqlConnection as PoolableConnection>::is_embedded());
}

#[cfg(feature = "sqlite")]
#[tokio::test]
async fn sqlite_empty_without_migrations() {
    empty_without_migrations::<diesel::SqliteConnection>("sqlite://unused.db").await;
}

#[cfg(feature = "sqlite")]
#[tokio::test]
async fn sqlite_databases_apart_and_removed() {
    two_databases_apart::<diesel::SqliteConnection>("sqlite://unused.db", || SQLITE).await;
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_from_the_environment_by_default() {
    // Nothing set (this binary reads neither variable anywhere else): an
    // SQLite engine gets a fresh file.
    // SAFETY: no other thread of this test binary reads these variables.
    for var in diesel_runsync::testing::URL_VARIABLES {
        unsafe { std::env::remove_var(var) };
    }
    let db = TestDatabase::<diesel::SqliteConnection>::new(SQLITE).await;
    assert_eq!(rows(&db).await, 0);
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use diesel::PgConnection;

    fn server() -> String {
        <PgConnection as TestBackend>::server_url().unwrap()
    }

    #[tokio::test]
    #[cfg_attr(runsync_skip_postgres, ignore = "PG_DATABASE_URL is not set")]
    async fn databases_apart_and_dropped() {
        two_databases_apart::<PgConnection>(&server(), || POSTGRES).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[cfg_attr(runsync_skip_postgres, ignore = "PG_DATABASE_URL is not set")]
    async fn kept_on_failure() {
        kept_when_the_test_fails::<PgConnection>(&server(), || POSTGRES).await;
    }

    #[tokio::test]
    #[cfg_attr(runsync_skip_postgres, ignore = "PG_DATABASE_URL is not set")]
    async fn empty_without_migrations() {
        super::empty_without_migrations::<PgConnection>(&server()).await;
    }

    /// Per-test set-up time: a copy of the template (migrated once) against
    /// a fresh database migrated each time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[cfg_attr(runsync_skip_postgres, ignore = "PG_DATABASE_URL is not set")]
    async fn template_vs_migrations() {
        let server = server();
        // The template is made by the first one.
        drop(TestDatabase::<PgConnection>::on(&server, POSTGRES).await);
        let rounds = 8;
        let mut copied = Vec::new();
        for _ in 0..rounds {
            let started = Instant::now();
            let db = TestDatabase::<PgConnection>::on(&server, POSTGRES).await;
            copied.push(started.elapsed());
            assert_eq!(rows(&db).await, 0);
        }
        let mut migrated = Vec::new();
        for i in 0..rounds {
            let name = format!("rst_{}_migrated_{i}", std::process::id());
            let server = server.clone();
            let started = Instant::now();
            tokio::task::spawn_blocking(move || {
                let mut admin = <PgConnection as diesel::Connection>::establish(&server).unwrap();
                admin
                    .batch_execute(&format!("CREATE DATABASE {name}"))
                    .unwrap();
                let url = format!("{}/{name}", server.rsplit_once('/').unwrap().0);
                let parsed = diesel_runsync::DatabaseUrl::parse(&url).unwrap();
                let mut conn = PgConnection::connect(&parsed).unwrap();
                conn.run_pending_migrations(POSTGRES).unwrap();
                drop(conn);
                let took = started.elapsed();
                admin
                    .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
                    .unwrap();
                took
            })
            .await
            .map(|took| migrated.push(took))
            .unwrap();
        }
        let median = |mut v: Vec<Duration>| {
            v.sort();
            v[v.len() / 2]
        };
        println!(
            "FIGURE testing postgres: per-test set-up (20 migrations): template copy median {:?}, \
             migrations each time median {:?} ({rounds} each)",
            median(copied),
            median(migrated)
        );
    }
}

#[cfg(feature = "mysql")]
mod mysql {
    use super::*;
    use diesel::MysqlConnection;

    fn server() -> String {
        <MysqlConnection as TestBackend>::server_url().unwrap()
    }

    #[tokio::test]
    #[cfg_attr(runsync_skip_mysql, ignore = "MYSQL_DATABASE_URL is not set")]
    async fn databases_apart_and_dropped() {
        two_databases_apart::<MysqlConnection>(&server(), || MYSQL).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[cfg_attr(runsync_skip_mysql, ignore = "MYSQL_DATABASE_URL is not set")]
    async fn kept_on_failure() {
        kept_when_the_test_fails::<MysqlConnection>(&server(), || MYSQL).await;
    }

    #[tokio::test]
    #[cfg_attr(runsync_skip_mysql, ignore = "MYSQL_DATABASE_URL is not set")]
    async fn empty_without_migrations() {
        super::empty_without_migrations::<MysqlConnection>(&server()).await;
    }

    /// A connection left holding a transaction on the database (a test's
    /// abandoned one) does not hold up its drop: `DROP DATABASE` would
    /// wait for its metadata lock (`lock_wait_timeout`, a year by default);
    /// the drop ends it first.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[cfg_attr(runsync_skip_mysql, ignore = "MYSQL_DATABASE_URL is not set")]
    async fn dropped_with_a_transaction_open_on_it() {
        let server = server();
        let db = TestDatabase::<MysqlConnection>::on(&server, MYSQL).await;
        let (url, name) = (db.url().to_owned(), db.name().to_owned());
        let holder = tokio::task::spawn_blocking(move || {
            let parsed = diesel_runsync::DatabaseUrl::parse(&url).unwrap();
            let mut conn = MysqlConnection::connect(&parsed).unwrap();
            conn.batch_execute("BEGIN; INSERT INTO t20 (name) VALUES ('held')")
                .unwrap();
            conn
        })
        .await
        .unwrap();
        let dropped = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::task::spawn_blocking(move || drop(db)),
        )
        .await;
        // Closed either way, so a drop that waits ends (the test fails then).
        drop(holder);
        assert!(dropped.is_ok(), "the drop waited for the open transaction");
        assert!(
            !exists::<MysqlConnection>(&server, &name),
            "{name} was dropped"
        );
    }
}
