//! A database of its own for each test (feature `testing`): what
//! `#[sqlx::test]` gives sqlx users, for an [`Engine`] of any connection.
//!
//! In a crate with `diesel-runsync = { ..., features = ["testing"] }` in
//! its `[dev-dependencies]` and its migrations under `migrations/` (this
//! page cannot compile it for want of those; `runsync-tests/tests/testing.rs`
//! in the repository runs the same on every backend):
//!
//! ```ignore
//! use diesel::prelude::*;
//! use diesel_migrations::{EmbeddedMigrations, embed_migrations};
//! use diesel_runsync::testing::TestDatabase;
//!
//! const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");
//!
//! // The function under test: plain synchronous Diesel.
//! fn count_users(conn: &mut SqliteConnection) -> QueryResult<i64> {
//!     diesel::dsl::sql::<diesel::sql_types::BigInt>("SELECT count(*) FROM users").get_result(conn)
//! }
//!
//! #[tokio::test]
//! async fn no_user_at_first() {
//!     let db = TestDatabase::<SqliteConnection>::new(MIGRATIONS).await;
//!     let n = db.engine().transaction(count_users).await.unwrap();
//!     assert_eq!(n, 0);
//! } // dropped here: the database goes (it stays, named, if the test failed)
//! ```
//!
//! - **Where**: the server `TEST_DATABASE_URL` names, else `DATABASE_URL`
//!   (any database on it; the tests create their own), or a SQLite path or
//!   `sqlite://` URL there, which stands for "a fresh SQLite file per test"
//!   in a temporary directory. Unset: SQLite for an embedded connection
//!   type ([`PoolableConnection::is_embedded`]: `SqliteConnection`), and
//!   for any other connection a panic that says which variable to set.
//!   [`TestDatabase::on`] and [`TestDatabase::on_with_options`] take the
//!   URL directly.
//! - **What**: a database named `rst_<pid>_<n>` (unique among the tests of
//!   a process, and among processes), with your migrations applied, and an
//!   engine on it ([`TestDatabase::engine`], options of your choice with
//!   [`TestDatabase::with_options`]). On PostgreSQL the migrations run once
//!   per process, into a template database, and each test's database is a
//!   copy of it (`CREATE DATABASE ... TEMPLATE`): with many migrations this
//!   is much faster than running them per test. MySQL/MariaDB has no
//!   templates: each test runs the migrations. An empty migration set
//!   leaves the database empty (for tests that make the schema
//!   themselves): not even Diesel's `__diesel_schema_migrations` table is
//!   created, and PostgreSQL uses no template.
//! - **After**: when the [`TestDatabase`] is dropped, the database is
//!   dropped too, unless the test is failing (the thread is panicking):
//!   then it is kept, and its name is printed, for a look. Databases left by
//!   processes that are gone (kept ones, killed runs) are dropped when the
//!   next process first creates one on that server (their names carry the
//!   creating process's id; a server shared by several machines' test runs
//!   should get one database server, or one user, per machine).
//! - Works in `#[tokio::test]` on both runtime flavours; parallel tests
//!   never share a database.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use diesel::migration::MigrationSource;
use diesel_migrations::MigrationHarness;

use crate::engine::{Engine, EngineOptions};
use crate::manager::PoolableConnection;
use crate::url::{Backend, DatabaseUrl};

/// The variables [`TestDatabase::new`] reads the server URL from, in order.
pub const URL_VARIABLES: [&str; 2] = ["TEST_DATABASE_URL", "DATABASE_URL"];

/// The prefix of every database this module creates.
const PREFIX: &str = "rst_";

/// No migrations: given to [`TestDatabase`], the database is created and
/// left empty (without Diesel's `__diesel_schema_migrations` either), for
/// tests that make their schema themselves or test the code that does.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoMigrations;

impl<DB: diesel::backend::Backend> MigrationSource<DB> for NoMigrations {
    fn migrations(
        &self,
    ) -> diesel::migration::Result<Vec<Box<dyn diesel::migration::Migration<DB>>>> {
        Ok(Vec::new())
    }
}

/// A database of its own for one test, with the migrations applied and an
/// engine on it; dropped with it unless the test failed. See the
/// [module docs](self).
pub struct TestDatabase<C: PoolableConnection> {
    engine: Engine<C>,
    url: String,
    place: Place,
}

/// Where the database lives, and how to remove it.
enum Place {
    Sqlite(Option<tempfile::TempDir>),
    Server {
        admin_url: String,
        backend: Backend,
        name: String,
    },
}

impl<C: PoolableConnection> std::fmt::Debug for TestDatabase<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestDatabase")
            .field("engine", &self.engine)
            .field("name", &self.name())
            .finish()
    }
}

/// One migration set's templates, per server (PostgreSQL): migrated once
/// per process.
type Templates = Mutex<HashMap<(String, String), Arc<tokio::sync::OnceCell<String>>>>;

static TEMPLATES: std::sync::OnceLock<Templates> = std::sync::OnceLock::new();
static DATABASES: AtomicUsize = AtomicUsize::new(0);
static PURGED: Mutex<Vec<String>> = Mutex::new(Vec::new());

impl<C> TestDatabase<C>
where
    C: PoolableConnection + MigrationHarness<C::Backend>,
{
    /// A fresh database on the server [`URL_VARIABLES`] names (or a fresh
    /// SQLite file), with `migrations` applied, and an engine with default
    /// options on it. Panics, saying why, when it cannot make one.
    pub async fn new<M>(migrations: M) -> Self
    where
        M: MigrationSource<C::Backend> + Send + Sync + 'static,
    {
        Self::with_options(migrations, EngineOptions::default()).await
    }

    /// [`new`](Self::new), with the engine's `options`.
    pub async fn with_options<M>(migrations: M, options: EngineOptions) -> Self
    where
        M: MigrationSource<C::Backend> + Send + Sync + 'static,
    {
        let server = URL_VARIABLES
            .iter()
            .find_map(|var| std::env::var(var).ok().filter(|v| !v.trim().is_empty()));
        let server = match server {
            Some(url) => url,
            None if C::is_embedded() => "sqlite::test".to_owned(),
            None => panic!(
                "TestDatabase: set TEST_DATABASE_URL (or DATABASE_URL) to a database server's URL \
                 (postgres://user@host/any_db or mysql://user@host/any_db; each test creates its \
                 own database there) or to a SQLite path"
            ),
        };
        Self::on_with_options(&server, migrations, options).await
    }

    /// A fresh database on the server `server_url` names (any database of
    /// it), or a fresh SQLite file when it is a SQLite path or URL.
    pub async fn on<M>(server_url: &str, migrations: M) -> Self
    where
        M: MigrationSource<C::Backend> + Send + Sync + 'static,
    {
        Self::on_with_options(server_url, migrations, EngineOptions::default()).await
    }

    /// [`on`](Self::on), with the engine's `options`.
    pub async fn on_with_options<M>(server_url: &str, migrations: M, options: EngineOptions) -> Self
    where
        M: MigrationSource<C::Backend> + Send + Sync + 'static,
    {
        let migrations = Shared(Arc::new(migrations));
        let parsed = DatabaseUrl::parse(server_url)
            .unwrap_or_else(|e| panic!("TestDatabase: the server URL: {e}"));
        let n = DATABASES.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{}_{n}", std::process::id());
        let (url, place) = match parsed.backend() {
            Backend::Sqlite => {
                let dir = tempfile::Builder::new()
                    .prefix(PREFIX)
                    .tempdir()
                    .expect("TestDatabase: a temporary directory");
                let url = dir.path().join(format!("{name}.db")).display().to_string();
                let migrate_url = url.clone();
                let migrations = migrations.clone();
                blocking(move || migrate::<C, _>(&migrate_url, migrations)).await;
                (url, Place::Sqlite(Some(dir)))
            }
            backend => {
                let admin_url = server_url.to_owned();
                let url = with_database(&admin_url, &name);
                purge_once(&admin_url, backend).await;
                let template = match backend {
                    // No migration: nothing to copy (and no template left).
                    Backend::Postgres if !is_empty(&migrations) => {
                        Some(template::<C, _>(&admin_url, migrations.clone()).await)
                    }
                    _ => None,
                };
                let from_template = template.is_some();
                let (admin, db) = (admin_url.clone(), name.clone());
                blocking(move || {
                    let sql = match &template {
                        Some(template) => format!("CREATE DATABASE {db} TEMPLATE {template}"),
                        None => format!("CREATE DATABASE {db}"),
                    };
                    admin_exec(&admin, &sql).unwrap_or_else(|e| panic!("TestDatabase: {sql}: {e}"));
                })
                .await;
                if !from_template {
                    let (migrate_url, migrations) = (url.clone(), migrations.clone());
                    blocking(move || migrate::<C, _>(&migrate_url, migrations)).await;
                }
                let place = Place::Server {
                    admin_url,
                    backend,
                    name,
                };
                (url, place)
            }
        };
        let engine = Engine::<C>::connect(&url, options)
            .await
            .unwrap_or_else(|e| panic!("TestDatabase: an engine on the test database: {e}"));
        TestDatabase { engine, url, place }
    }
}

impl<C: PoolableConnection> TestDatabase<C> {
    /// The engine on this test's database.
    pub fn engine(&self) -> &Engine<C> {
        &self.engine
    }

    /// The URL of this test's database (for other clients of it; it holds
    /// the server URL's password, if any: never print it).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database's name (SQLite: the file's path).
    pub fn name(&self) -> &str {
        match &self.place {
            Place::Sqlite(_) => &self.url,
            Place::Server { name, .. } => name,
        }
    }
}

impl<C: PoolableConnection> Drop for TestDatabase<C> {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        match &mut self.place {
            Place::Sqlite(dir) => {
                if failed && let Some(dir) = dir.take() {
                    let kept = dir.keep();
                    eprintln!(
                        "TestDatabase: the test failed; its SQLite database is kept: {}",
                        kept.display()
                    );
                }
            }
            Place::Server {
                admin_url,
                backend,
                name,
            } => {
                if failed {
                    eprintln!(
                        "TestDatabase: the test failed; its database {name} is kept on {} \
                         (the next run drops it)",
                        DatabaseUrl::parse(admin_url)
                            .map_or_else(|_| "?".into(), |u| u.to_string())
                    );
                    return;
                }
                let (admin_url, backend, name) = (admin_url.clone(), *backend, name.clone());
                // Off the async thread, and joined: the engine's own
                // connections are closed as it drops, after this.
                let dropped =
                    std::thread::spawn(move || drop_database(&admin_url, backend, &name)).join();
                if let Ok(Err(e)) = dropped {
                    eprintln!("TestDatabase: could not drop a test database: {e}");
                }
            }
        }
    }
}

/// A migration source shared by the steps that read it.
struct Shared<M>(Arc<M>);

impl<M> Clone for Shared<M> {
    fn clone(&self) -> Self {
        Shared(self.0.clone())
    }
}

impl<DB: diesel::backend::Backend, M: MigrationSource<DB>> MigrationSource<DB> for Shared<M> {
    fn migrations(
        &self,
    ) -> diesel::migration::Result<Vec<Box<dyn diesel::migration::Migration<DB>>>> {
        self.0.migrations()
    }
}

/// Runs `f` on tokio's blocking pool; its panic goes on as the caller's.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(value) => value,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("TestDatabase: a blocking step did not run: {e}"),
    }
}

/// A connection to `url`, set up as the engine's are.
fn admin_connection<C: PoolableConnection>(url: &str) -> C {
    let parsed = DatabaseUrl::parse(url).unwrap_or_else(|e| panic!("TestDatabase: {e}"));
    C::connect(&parsed).unwrap_or_else(|e| {
        panic!(
            "TestDatabase: cannot connect to {parsed}: {}",
            parsed.scrub(&e.to_string())
        )
    })
}

/// Applies `migrations` to the database at `url`; none: nothing, not even
/// Diesel's `__diesel_schema_migrations` table.
fn migrate<C, M>(url: &str, migrations: M)
where
    C: PoolableConnection + MigrationHarness<C::Backend>,
    M: MigrationSource<C::Backend>,
{
    if is_empty(&migrations) {
        return;
    }
    let mut conn = admin_connection::<C>(url);
    conn.run_pending_migrations(migrations)
        .unwrap_or_else(|e| panic!("TestDatabase: the migrations failed: {e}"));
}

/// Whether `migrations` holds no migration.
fn is_empty<DB: diesel::backend::Backend>(migrations: &impl MigrationSource<DB>) -> bool {
    migrations
        .migrations()
        .unwrap_or_else(|e| panic!("TestDatabase: the migrations cannot be read: {e}"))
        .is_empty()
}

/// The name of this process's template for `migrations` on `admin_url`,
/// made (created and migrated) on first use.
async fn template<C, M>(admin_url: &str, migrations: M) -> String
where
    C: PoolableConnection + MigrationHarness<C::Backend>,
    M: MigrationSource<C::Backend> + Send + 'static,
{
    let names: Vec<String> = migrations
        .migrations()
        .unwrap_or_else(|e| panic!("TestDatabase: the migrations cannot be read: {e}"))
        .iter()
        .map(|m| m.name().to_string())
        .collect();
    let key = (admin_url.to_owned(), names.join(","));
    let cell = {
        let mut templates = TEMPLATES.get_or_init(Default::default).lock().unwrap();
        templates.entry(key).or_default().clone()
    };
    let admin_url = admin_url.to_owned();
    cell.get_or_init(|| async move {
        let n = DATABASES.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{}_{n}_template", std::process::id());
        let url = with_database(&admin_url, &name);
        blocking(move || {
            admin_exec(&admin_url, &format!("CREATE DATABASE {name}"))
                .unwrap_or_else(|e| panic!("TestDatabase: a template database: {e}"));
            migrate::<C, M>(&url, migrations);
            name
        })
        .await
    })
    .await
    .clone()
}

/// Drops, once per process and server, the test databases of processes
/// that are gone.
async fn purge_once(admin_url: &str, backend: Backend) {
    {
        let mut purged = PURGED.lock().unwrap();
        if purged.iter().any(|u| u == admin_url) {
            return;
        }
        purged.push(admin_url.to_owned());
    }
    let admin_url = admin_url.to_owned();
    blocking(move || {
        let names = list_databases(&admin_url, backend).unwrap_or_else(|e| {
            eprintln!("TestDatabase: could not list leftover databases: {e}");
            Vec::new()
        });
        for name in names {
            let pid = name
                .strip_prefix(PREFIX)
                .and_then(|rest| rest.split('_').next())
                .and_then(|pid| pid.parse::<u32>().ok());
            let gone = pid.is_some_and(|pid| {
                pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            });
            if gone && let Err(e) = drop_database(&admin_url, backend, &name) {
                eprintln!("TestDatabase: could not drop leftover database {name}: {e}");
            }
        }
    })
    .await;
}

/// Runs `sql` on an administrative connection to the server `admin_url`
/// names (the backend's own connection type, whatever the engine's is).
#[cfg_attr(
    not(any(feature = "postgres", feature = "mysql")),
    allow(unused_variables)
)]
fn admin_exec(admin_url: &str, sql: &str) -> Result<(), String> {
    #[cfg(any(feature = "postgres", feature = "mysql"))]
    use diesel::connection::SimpleConnection;
    let parsed = DatabaseUrl::parse(admin_url).map_err(|e| e.to_string())?;
    let scrub = |e: &dyn std::fmt::Display| parsed.scrub(&e.to_string());
    match parsed.backend() {
        #[cfg(feature = "postgres")]
        Backend::Postgres => diesel::PgConnection::connect(&parsed)
            .map_err(|e| scrub(&e))?
            .batch_execute(sql)
            .map_err(|e| scrub(&e)),
        #[cfg(feature = "mysql")]
        Backend::Mysql => diesel::MysqlConnection::connect(&parsed)
            .map_err(|e| scrub(&e))?
            .batch_execute(sql)
            .map_err(|e| scrub(&e)),
        other => Err(format!(
            "TestDatabase has no {other} support in this build: enable diesel-runsync's `{other}` feature"
        )),
    }
}

/// The databases on the server whose names start with [`PREFIX`].
#[cfg_attr(
    not(any(feature = "postgres", feature = "mysql")),
    allow(unused_variables, dead_code)
)]
fn list_databases(admin_url: &str, backend: Backend) -> Result<Vec<String>, String> {
    #[derive(diesel::QueryableByName)]
    struct Name {
        #[diesel(sql_type = diesel::sql_types::Text)]
        name: String,
    }
    let parsed = DatabaseUrl::parse(admin_url).map_err(|e| e.to_string())?;
    let scrub = |e: &dyn std::fmt::Display| parsed.scrub(&e.to_string());
    let names: Vec<Name> = match backend {
        #[cfg(feature = "postgres")]
        Backend::Postgres => diesel::RunQueryDsl::load(
            diesel::sql_query(
                "SELECT CAST(datname AS TEXT) AS name FROM pg_database \
                 WHERE datname LIKE 'rst\\_%'",
            ),
            &mut diesel::PgConnection::connect(&parsed).map_err(|e| scrub(&e))?,
        )
        .map_err(|e| scrub(&e))?,
        #[cfg(feature = "mysql")]
        Backend::Mysql => diesel::RunQueryDsl::load(
            diesel::sql_query(
                "SELECT CAST(schema_name AS CHAR) AS name FROM information_schema.schemata \
                 WHERE schema_name LIKE 'rst\\_%'",
            ),
            &mut diesel::MysqlConnection::connect(&parsed).map_err(|e| scrub(&e))?,
        )
        .map_err(|e| scrub(&e))?,
        _ => Vec::new(),
    };
    Ok(names.into_iter().map(|n| n.name).collect())
}

/// Drops database `name` (PostgreSQL: `WITH (FORCE)`, closing its
/// connections; MySQL: its connections are killed first).
fn drop_database(admin_url: &str, backend: Backend, name: &str) -> Result<(), String> {
    match backend {
        Backend::Postgres => admin_exec(
            admin_url,
            &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        ),
        #[cfg(feature = "mysql")]
        Backend::Mysql => drop_mysql_database(admin_url, name),
        _ => admin_exec(admin_url, &format!("DROP DATABASE IF EXISTS {name}")),
    }
}

/// MySQL/MariaDB: ends the connections still on database `name`, then
/// drops it. `DROP DATABASE` would otherwise wait (`lock_wait_timeout`: a
/// year by default) for a transaction one of them holds open, such as a
/// connection a test abandoned.
#[cfg(feature = "mysql")]
fn drop_mysql_database(admin_url: &str, name: &str) -> Result<(), String> {
    use diesel::connection::SimpleConnection;
    #[derive(diesel::QueryableByName)]
    struct Id {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        id: i64,
    }
    let parsed = DatabaseUrl::parse(admin_url).map_err(|e| e.to_string())?;
    let scrub = |e: &dyn std::fmt::Display| parsed.scrub(&e.to_string());
    let mut admin = diesel::MysqlConnection::connect(&parsed).map_err(|e| scrub(&e))?;
    let others: Vec<Id> = diesel::RunQueryDsl::load(
        diesel::sql_query(format!(
            "SELECT CAST(id AS SIGNED) AS id FROM information_schema.processlist \
             WHERE db = '{name}' AND id <> CONNECTION_ID()"
        )),
        &mut admin,
    )
    .map_err(|e| scrub(&e))?;
    for other in others {
        // It may have gone by itself in the meantime.
        let _ = admin.batch_execute(&format!("KILL {}", other.id));
    }
    admin
        .batch_execute(&format!(
            "SET SESSION lock_wait_timeout = 30; DROP DATABASE IF EXISTS {name}"
        ))
        .map_err(|e| scrub(&e))
}

/// `url` with its database (path) replaced by `name`, its query kept.
fn with_database(url: &str, name: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a server URL has a scheme");
    let (authority, query) = match rest.split_once('/') {
        Some((authority, path)) => (authority, path.split_once('?').map(|(_, q)| q)),
        None => match rest.split_once('?') {
            Some((authority, q)) => (authority, Some(q)),
            None => (rest, None),
        },
    };
    match query {
        Some(q) => format!("{scheme}://{authority}/{name}?{q}"),
        None => format!("{scheme}://{authority}/{name}"),
    }
}
