//! Test databases: each test gets its own SQLite file, PostgreSQL database
//! or MySQL database, dropped when the test ends, so tests run in parallel.
//!
//! PostgreSQL and MySQL tests run when `PG_DATABASE_URL` / `MYSQL_DATABASE_URL`
//! name a server (any database on it; tests create their own). When unset
//! they are skipped with a notice on stderr, unless `RUNSYNC_REQUIRE_ALL_BACKENDS=1`
//! or `CI=true`, where a missing backend fails the test.
#![allow(dead_code)]

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use greenlet_orm::queries::insert_families;
use greenlet_orm::schema::b;
use greenlet_orm::{AnyConnection, DemoError, Family, NewB};
use diesel_runsync::{Backend, Engine, EngineOptions};

/// A database private to one test.
pub struct TestDb {
    pub backend: Backend,
    /// URL of the private database.
    pub url: String,
    admin_url: Option<String>,
    name: String,
    _dir: Option<tempfile::TempDir>,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn unique_name(test: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let clean: String = test
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(30)
        .collect();
    format!("rs_{clean}_{}_{n}", std::process::id())
}

pub fn required() -> bool {
    std::env::var("RUNSYNC_REQUIRE_ALL_BACKENDS").is_ok_and(|v| v == "1" || v == "true")
        || std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Replaces the database name (the path) of a server URL.
fn with_database(url: &str, name: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a server URL has a scheme");
    let (authority, query) = match rest.split_once('/') {
        Some((authority, path)) => (authority, path.split_once('?').map(|(_, q)| q)),
        None => (rest, None),
    };
    match query {
        Some(q) => format!("{scheme}://{authority}/{name}?{q}"),
        None => format!("{scheme}://{authority}/{name}"),
    }
}

impl TestDb {
    /// A fresh SQLite file in its own temporary directory.
    pub fn sqlite(test: &str) -> TestDb {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let url = dir
            .path()
            .join(format!("{}.db", unique_name(test)))
            .display()
            .to_string();
        TestDb {
            backend: Backend::Sqlite,
            url,
            admin_url: None,
            name: String::new(),
            _dir: Some(dir),
        }
    }

    /// A fresh database on the server `PG_DATABASE_URL` or `MYSQL_DATABASE_URL` names.
    pub fn server(backend: Backend, test: &str) -> Option<TestDb> {
        let var = match backend {
            Backend::Postgres => "PG_DATABASE_URL",
            Backend::Mysql => "MYSQL_DATABASE_URL",
            Backend::Sqlite => return Some(TestDb::sqlite(test)),
        };
        let Ok(admin_url) = std::env::var(var) else {
            if required() {
                panic!(
                    "{var} is not set, and every backend is required here (CI or RUNSYNC_REQUIRE_ALL_BACKENDS)"
                );
            }
            // Straight to stderr: libtest does not capture this, so the skip shows.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {backend} part of `{test}`: {var} is not set"
            );
            return None;
        };
        let name = unique_name(test);
        let mut admin = AnyConnection::establish(&admin_url)
            .unwrap_or_else(|e| panic!("{var}: cannot connect to the {backend} server: {e}"));
        diesel::sql_query(format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .unwrap_or_else(|e| panic!("cannot create test database {name}: {e}"));
        Some(TestDb {
            backend,
            url: with_database(&admin_url, &name),
            admin_url: Some(admin_url),
            name,
            _dir: None,
        })
    }

    /// SQLite always; PostgreSQL and MySQL when configured.
    pub fn all(test: &str) -> Vec<TestDb> {
        [Backend::Sqlite, Backend::Postgres, Backend::Mysql]
            .into_iter()
            .filter_map(|b| TestDb::server(b, test))
            .collect()
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

    /// A plain synchronous connection, outside any pool.
    pub fn connect(&self) -> AnyConnection {
        use diesel_runsync::PoolableConnection;
        let url = diesel_runsync::DatabaseUrl::parse(&self.url).unwrap();
        AnyConnection::connect(&url).expect("a direct connection")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(admin_url) = &self.admin_url else {
            return;
        };
        let drop_sql = match self.backend {
            Backend::Postgres => format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            _ => format!("DROP DATABASE IF EXISTS {}", self.name),
        };
        if let Ok(mut admin) = AnyConnection::establish(admin_url) {
            let _ = diesel::sql_query(drop_sql).execute(&mut admin);
        }
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
pub fn partial_units(db: &TestDb, children_per_parent: i64) -> i64 {
    partial_units_on(&mut db.connect(), children_per_parent)
}

/// [`partial_units`] on any connection to the database.
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
