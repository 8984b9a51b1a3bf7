//! The schema's migrations, embedded for each backend, and the seed's
//! `drop_all` / `create_all` built on them.
//!
//! # Check first, converge from any state
//!
//! Like SQLAlchemy's `create_all` / `drop_all` (`checkfirst=True`), both
//! look at the database before acting (the tables present and
//! the versions recorded in diesel's `__diesel_schema_migrations`), and act
//! so that a program killed at any moment of an earlier run, by this
//! version or an earlier one, never leaves a database the next run cannot
//! reset:
//!
//! - [`drop_all`] drops whatever of this schema is there, even half of it: the
//!   tables `b` then `a` if present and *ours*, and this schema's recorded
//!   versions (so tables and bookkeeping cannot disagree afterwards), plus
//!   the staging tables an interrupted MySQL reset leaves (below).
//! - [`create_all`] does nothing when the schema is whole (every version
//!   recorded, both tables present); otherwise it first removes the half
//!   (as `drop_all`), then creates the tables and records the version.
//!
//! A table named `a` or `b` is *ours* when this schema's version is
//! recorded, or when it has exactly this schema's columns and no row: what
//! a run of an earlier version killed half-way through its MySQL migration
//! left (then the tables were created but nothing was inserted yet, so
//! dropping them loses no row). Any other table of that name is someone
//! else's: it is left alone, and `create_all` fails with
//! `table a already exists ...`, writing nothing.
//!
//! # Atomicity, per backend
//!
//! - SQLite and PostgreSQL: DDL is transactional, and
//!   [`reset_schema`](crate::program::reset_schema) runs both steps in one
//!   transaction; a kill at any moment leaves the old state or the new one.
//! - MySQL/MariaDB: every DDL statement commits on its own, so a plain
//!   migration killed between `CREATE TABLE a` and `CREATE TABLE b`, or
//!   before diesel records its version, leaves half a schema. Here each step
//!   is built aside and switched in by *one* `RENAME TABLE` statement, which
//!   InnoDB applies atomically (crash-safe since MariaDB 10.6 and MySQL 8.0;
//!   foreign keys follow the renamed tables), bookkeeping included:
//!   - create: `CREATE TABLE a__greenlet_new`, `b__greenlet_new` (the
//!     migration's `up.sql` with the names changed); a copy of
//!     `__diesel_schema_migrations` with the version added
//!     (`__diesel_schema_migrations__greenlet_new`); then
//!     `RENAME TABLE __diesel_schema_migrations TO ..__greenlet_old, ..__greenlet_new TO __diesel_schema_migrations, a__greenlet_new TO a, b__greenlet_new TO b`;
//!     then the old bookkeeping copy is dropped;
//!   - drop: a copy of the bookkeeping without this schema's versions; then
//!     `RENAME TABLE a TO a__greenlet_old, b TO b__greenlet_old, ...` (the
//!     two bookkeeping tables swapped in the same statement); then
//!     `DROP TABLE b__greenlet_old`, `DROP TABLE a__greenlet_old`.
//!
//!   So on MySQL too the database holds, at every moment, either none of
//!   the schema (no `a`, no `b`, version not recorded) or all of it (both
//!   tables, version recorded). A kill may leave `*__greenlet_new` /
//!   `*__greenlet_old` staging tables behind; they are private to this
//!   module (never read by the program) and both functions drop them first.
//!
//! # One reset at a time
//!
//! When a client dies, the server still runs the statement it had sent to
//! its end. Both functions therefore hold a per-database reset lock while
//! they look and act (PostgreSQL: `pg_advisory_xact_lock`, held until the
//! reset's transaction ends; MySQL: `GET_LOCK`, which a killed client's
//! session keeps until the server has finished its statement and closed
//! it; SQLite: `BEGIN IMMEDIATE` already queues writers). A run started
//! right after a kill, or two programs started at once, wait for each other
//! instead of acting on a state that is still changing. Other writers of
//! `__diesel_schema_migrations` (which the MySQL steps copy and swap) must
//! not run during a reset.

use diesel::connection::SimpleConnection;
use diesel::migration::MigrationSource;
use diesel::prelude::*;
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

use diesel_runsync::Backend;

use crate::connection::{AnyConnection, MultiBackend};
use crate::error::DemoError;

/// Migrations for SQLite (`migrations/sqlite`).
pub const SQLITE: EmbeddedMigrations = embed_migrations!("migrations/sqlite");
/// Migrations for PostgreSQL (`migrations/postgres`).
#[cfg(feature = "postgres")]
pub const POSTGRES: EmbeddedMigrations = embed_migrations!("migrations/postgres");
/// Migrations for MySQL/MariaDB (`migrations/mysql`; DDL there is never transactional).
#[cfg(feature = "mysql")]
pub const MYSQL: EmbeddedMigrations = embed_migrations!("migrations/mysql");

/// The embedded migrations for `backend`, if this build has that backend.
pub fn for_backend(backend: Backend) -> Option<EmbeddedMigrations> {
    match backend {
        Backend::Sqlite => Some(SQLITE),
        #[cfg(feature = "postgres")]
        Backend::Postgres => Some(POSTGRES),
        #[cfg(feature = "mysql")]
        Backend::Mysql => Some(MYSQL),
        #[allow(unreachable_patterns)] // every backend compiled in
        _ => None,
    }
}

/// The embedded migrations for `conn`'s backend.
pub fn for_connection(conn: &AnyConnection) -> EmbeddedMigrations {
    match conn {
        AnyConnection::Sqlite(_) => SQLITE,
        #[cfg(feature = "postgres")]
        AnyConnection::Postgresql(_) => POSTGRES,
        #[cfg(feature = "mysql")]
        AnyConnection::Mysql(_) => MYSQL,
    }
}

fn migration_error(e: Box<dyn std::error::Error + Send + Sync>) -> DemoError {
    DemoError::Migration(e.to_string())
}

/// This schema's tables, parents first (created in this order, dropped in
/// the reverse), with their columns.
const TABLES: [(&str, &[&str]); 2] = [("a", &["id", "data"]), ("b", &["id", "a_id", "data"])];

/// Diesel's bookkeeping table.
const BOOKKEEPING: &str = "__diesel_schema_migrations";

/// Suffix of a MySQL step's tables while they are built aside.
const NEW: &str = "__greenlet_new";

/// Suffix of a MySQL step's tables once switched out, until dropped.
const OLD: &str = "__greenlet_old";

/// What of this schema a database holds, read before acting.
struct Found {
    /// The embedded migrations' versions.
    versions: Vec<String>,
    /// Those of them recorded as applied.
    recorded: Vec<String>,
    /// Every table's name (of the database on MySQL, of the current schema
    /// on PostgreSQL).
    tables: Vec<String>,
}

impl Found {
    fn has(&self, table: &str) -> bool {
        self.tables.iter().any(|t| t == table)
    }

    /// Staging tables left by an interrupted MySQL step, children first.
    fn leftovers(&self) -> Vec<String> {
        let mut stems: Vec<&str> = TABLES.iter().rev().map(|(t, _)| *t).collect();
        stems.push(BOOKKEEPING);
        stems
            .into_iter()
            .flat_map(|stem| [format!("{stem}{NEW}"), format!("{stem}{OLD}")])
            .filter(|t| self.has(t))
            .collect()
    }

    /// Every version recorded and every table present.
    fn is_whole(&self) -> bool {
        self.recorded.len() == self.versions.len() && TABLES.iter().all(|(t, _)| self.has(t))
    }
}

#[derive(diesel::QueryableByName)]
struct Name {
    #[diesel(sql_type = diesel::sql_types::Text)]
    name: String,
}

#[derive(diesel::QueryableByName)]
struct Id {
    #[diesel(sql_type = diesel::sql_types::Integer)]
    #[allow(dead_code)] // only whether a row exists matters
    id: i32,
}

/// Looks at the database. Creates diesel's bookkeeping table if missing,
/// as every diesel migration command does.
fn look(conn: &mut AnyConnection) -> Result<Found, DemoError> {
    let source = for_connection(conn);
    let versions: Vec<String> = MigrationSource::<MultiBackend>::migrations(&source)
        .map_err(migration_error)?
        .iter()
        .map(|m| m.name().version().to_string())
        .collect();
    let applied: Vec<String> = conn
        .applied_migrations()
        .map_err(migration_error)?
        .iter()
        .map(|v| v.to_string())
        .collect();
    let recorded = versions
        .iter()
        .filter(|v| applied.contains(v))
        .cloned()
        .collect();
    let sql = match conn.backend() {
        Backend::Sqlite => "SELECT name FROM sqlite_master WHERE type = 'table'",
        // pg_catalog, not information_schema: the latter hides the tables
        // the current role has no privilege on, which still block CREATE.
        Backend::Postgres => {
            "SELECT CAST(c.relname AS TEXT) AS name FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p', 'v', 'm', 'f')"
        }
        Backend::Mysql => {
            "SELECT CAST(table_name AS CHAR) AS name FROM information_schema.tables \
             WHERE table_schema = DATABASE()"
        }
    };
    let tables = names(conn, sql)?;
    Ok(Found {
        versions,
        recorded,
        tables,
    })
}

fn names(conn: &mut AnyConnection, sql: &str) -> Result<Vec<String>, DemoError> {
    Ok(diesel::sql_query(sql)
        .load::<Name>(conn)?
        .into_iter()
        .map(|n| n.name)
        .collect())
}

/// Whether the present table `table` (with this schema's `columns`) is
/// ours to drop: this schema is recorded, or the table has exactly these
/// columns and no row.
fn is_ours(
    conn: &mut AnyConnection,
    found: &Found,
    table: &str,
    columns: &[&str],
) -> Result<bool, DemoError> {
    if !found.recorded.is_empty() {
        return Ok(true);
    }
    let sql = match conn.backend() {
        Backend::Sqlite => format!("SELECT name FROM pragma_table_info('{table}') ORDER BY cid"),
        Backend::Postgres => format!(
            "SELECT CAST(a.attname AS TEXT) AS name FROM pg_catalog.pg_attribute a \
             JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = current_schema() AND c.relname = '{table}' \
             AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum"
        ),
        Backend::Mysql => format!(
            "SELECT CAST(column_name AS CHAR) AS name FROM information_schema.columns \
             WHERE table_schema = DATABASE() AND table_name = '{table}' \
             ORDER BY ordinal_position"
        ),
    };
    if names(conn, &sql)? != columns {
        return Ok(false);
    }
    let rows = diesel::sql_query(format!("SELECT id FROM {table} LIMIT 1")).load::<Id>(conn)?;
    Ok(rows.is_empty())
}

fn execute(conn: &mut AnyConnection, sql: &str) -> Result<(), DemoError> {
    conn.batch_execute(sql)?;
    Ok(())
}

/// Drops the staging tables an interrupted MySQL step left (none elsewhere).
fn remove_leftovers(conn: &mut AnyConnection, found: &Found) -> Result<(), DemoError> {
    for table in found.leftovers() {
        execute(conn, &format!("DROP TABLE {table}"))?;
    }
    Ok(())
}

/// Removes what of this schema `found` shows: the tables that are ours
/// (`b` first) and the recorded versions. Returns how many versions were
/// recorded.
fn remove(conn: &mut AnyConnection, found: &Found) -> Result<usize, DemoError> {
    let mut doomed = Vec::new();
    for (table, columns) in TABLES.iter().rev() {
        if found.has(table) && is_ours(conn, found, table, columns)? {
            doomed.push(*table);
        }
    }
    if conn.backend() == Backend::Mysql {
        mysql_switch_out(conn, &doomed, &found.recorded)?;
    } else {
        for table in &doomed {
            execute(conn, &format!("DROP TABLE {table}"))?;
        }
        for version in &found.recorded {
            execute(
                conn,
                &format!("DELETE FROM {BOOKKEEPING} WHERE version = '{version}'"),
            )?;
        }
    }
    Ok(found.recorded.len())
}

/// The `version` values of `versions` as an SQL list.
fn sql_list(versions: &[String]) -> String {
    versions
        .iter()
        .map(|v| format!("'{v}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// MySQL's drop: renames `tables` away and swaps in a bookkeeping copy
/// without `recorded`, in one `RENAME TABLE`; then drops what was renamed away.
fn mysql_switch_out(
    conn: &mut AnyConnection,
    tables: &[&str],
    recorded: &[String],
) -> Result<(), DemoError> {
    let mut pairs: Vec<String> = tables.iter().map(|t| format!("{t} TO {t}{OLD}")).collect();
    if !recorded.is_empty() {
        execute(
            conn,
            &format!("CREATE TABLE {BOOKKEEPING}{NEW} LIKE {BOOKKEEPING}"),
        )?;
        execute(
            conn,
            &format!(
                "INSERT INTO {BOOKKEEPING}{NEW} SELECT * FROM {BOOKKEEPING} WHERE version NOT IN ({})",
                sql_list(recorded)
            ),
        )?;
        pairs.push(format!("{BOOKKEEPING} TO {BOOKKEEPING}{OLD}"));
        pairs.push(format!("{BOOKKEEPING}{NEW} TO {BOOKKEEPING}"));
    }
    if pairs.is_empty() {
        return Ok(());
    }
    execute(conn, &format!("RENAME TABLE {}", pairs.join(", ")))?;
    for table in tables {
        execute(conn, &format!("DROP TABLE {table}{OLD}"))?;
    }
    if !recorded.is_empty() {
        execute(conn, &format!("DROP TABLE {BOOKKEEPING}{OLD}"))?;
    }
    Ok(())
}

/// The MySQL migration this module builds aside, and its `up.sql`.
#[cfg(feature = "mysql")]
const MYSQL_MIGRATION: (&str, &str) = (
    "20240101000000",
    include_str!("../migrations/mysql/2024-01-01-000000_create_a_b/up.sql"),
);

/// MySQL's create: builds the tables as `*__greenlet_new` and a
/// bookkeeping copy with the versions added, and switches both in with one
/// `RENAME TABLE`. Returns how many versions it recorded.
#[cfg(feature = "mysql")]
fn mysql_create(conn: &mut AnyConnection, versions: &[String]) -> Result<usize, DemoError> {
    let (version, up) = MYSQL_MIGRATION;
    if versions != [version] {
        return Err(DemoError::Migration(format!(
            "the MySQL reset builds migration {version} only, but the embedded migrations are \
             {versions:?}: extend greenlet_orm::migrations::MYSQL_MIGRATION"
        )));
    }
    let mut staged = up.to_owned();
    for (table, _) in TABLES {
        for (from, to) in [
            (
                format!("CREATE TABLE {table} ("),
                format!("CREATE TABLE {table}{NEW} ("),
            ),
            (
                format!("REFERENCES {table} ("),
                format!("REFERENCES {table}{NEW} ("),
            ),
        ] {
            staged = staged.replace(&from, &to);
        }
        if !staged.contains(&format!("CREATE TABLE {table}{NEW} (")) {
            return Err(DemoError::Migration(format!(
                "cannot stage the MySQL migration: its up.sql has no `CREATE TABLE {table} (`"
            )));
        }
    }
    execute(conn, &staged)?;
    execute(
        conn,
        &format!("CREATE TABLE {BOOKKEEPING}{NEW} LIKE {BOOKKEEPING}"),
    )?;
    execute(
        conn,
        &format!(
            "INSERT INTO {BOOKKEEPING}{NEW} SELECT * FROM {BOOKKEEPING} WHERE version NOT IN ({})",
            sql_list(versions)
        ),
    )?;
    for version in versions {
        execute(
            conn,
            &format!("INSERT INTO {BOOKKEEPING}{NEW} (version) VALUES ('{version}')"),
        )?;
    }
    let mut pairs = vec![
        format!("{BOOKKEEPING} TO {BOOKKEEPING}{OLD}"),
        format!("{BOOKKEEPING}{NEW} TO {BOOKKEEPING}"),
    ];
    pairs.extend(TABLES.iter().map(|(t, _)| format!("{t}{NEW} TO {t}")));
    execute(conn, &format!("RENAME TABLE {}", pairs.join(", ")))?;
    execute(conn, &format!("DROP TABLE {BOOKKEEPING}{OLD}"))?;
    Ok(versions.len())
}

/// Runs `f` holding this database's reset lock, so that two resets never
/// interleave, nor a reset with what a killed program's connection is still
/// running: the server finishes the statement in flight when its client
/// dies, and only then ends the session and frees its locks.
/// PostgreSQL: a transaction-level advisory lock (freed at commit or
/// rollback). MySQL: a named lock `GET_LOCK` (per database, freed when `f`
/// returns or the session ends). SQLite: `BEGIN IMMEDIATE` already makes
/// writers queue.
fn exclusive<T>(
    conn: &mut AnyConnection,
    f: impl FnOnce(&mut AnyConnection) -> Result<T, DemoError>,
) -> Result<T, DemoError> {
    match conn.backend() {
        Backend::Sqlite => f(conn),
        Backend::Postgres => {
            execute(
                conn,
                "SELECT pg_advisory_xact_lock(hashtext('greenlet-orm reset'))",
            )?;
            f(conn)
        }
        Backend::Mysql => {
            #[derive(diesel::QueryableByName)]
            struct Got {
                #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::BigInt>)]
                got: Option<i64>,
            }
            const LOCK: &str = "CONCAT('greenlet-orm reset ', MD5(DATABASE()))";
            let got = diesel::sql_query(format!(
                "SELECT CAST(GET_LOCK({LOCK}, {}) AS SIGNED) AS got",
                LOCK_WAIT.as_secs()
            ))
            .get_result::<Got>(conn)?
            .got;
            if got != Some(1) {
                return Err(DemoError::Migration(format!(
                    "another reset of this database held its lock for {} s",
                    LOCK_WAIT.as_secs()
                )));
            }
            let result = f(conn);
            let released = execute(conn, &format!("DO RELEASE_LOCK({LOCK})"));
            let value = result?;
            released?;
            Ok(value)
        }
    }
}

/// How long a MySQL reset waits for another one (or for a killed
/// program's statement in flight) before failing.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Creates the schema unless it is whole (the seed's `create_all`):
/// removes any half of it first (see the module's doc), then applies the
/// migrations (on MySQL built aside and switched in atomically). Fails,
/// writing nothing, when a table `a` or `b` that is not ours is in the way.
/// Returns how many migrations were applied.
pub fn create_all(conn: &mut AnyConnection) -> Result<usize, DemoError> {
    exclusive(conn, create_all_now)
}

fn create_all_now(conn: &mut AnyConnection) -> Result<usize, DemoError> {
    let found = look(conn)?;
    remove_leftovers(conn, &found)?;
    if found.is_whole() {
        return Ok(0);
    }
    let found = if found.recorded.is_empty() && !TABLES.iter().any(|(t, _)| found.has(t)) {
        found
    } else {
        remove(conn, &found)?;
        look(conn)?
    };
    if let Some((table, _)) = TABLES.iter().find(|(t, _)| found.has(t)) {
        return Err(DemoError::Migration(format!(
            "table {table} already exists and is not this schema's (no migration of it is \
             recorded, and it has other columns or holds rows); drop or rename it"
        )));
    }
    match conn.backend() {
        #[cfg(feature = "mysql")]
        Backend::Mysql => mysql_create(conn, &found.versions),
        _ => {
            let migrations = for_connection(conn);
            let applied = conn
                .run_pending_migrations(migrations)
                .map_err(migration_error)?;
            Ok(applied.len())
        }
    }
}

/// Drops this schema, or whatever half of it is there (the seed's
/// `drop_all`): tables `b` then `a` where they are ours, and the recorded
/// versions (on MySQL in one atomic `RENAME TABLE`; see the module's doc).
/// A table of that name that is not ours is left alone. Returns how many
/// migrations were recorded as applied.
pub fn drop_all(conn: &mut AnyConnection) -> Result<usize, DemoError> {
    exclusive(conn, |conn| {
        let found = look(conn)?;
        remove_leftovers(conn, &found)?;
        remove(conn, &found)
    })
}

/// Migration versions applied and still pending, in order.
pub fn status(conn: &mut AnyConnection) -> Result<(Vec<String>, Vec<String>), DemoError> {
    let migrations = for_connection(conn);
    let applied = conn
        .applied_migrations()
        .map_err(migration_error)?
        .into_iter()
        .map(|v| v.to_string())
        .collect();
    let pending = conn
        .pending_migrations(migrations)
        .map_err(migration_error)?
        .iter()
        .map(|m| m.name().version().to_string())
        .collect();
    Ok((applied, pending))
}
