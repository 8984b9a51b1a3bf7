//! The schema's migrations, embedded for each backend, and the seed's
//! `drop_all` / `create_all` built on them.

use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

use diesel_runsync::Backend;

use crate::connection::AnyConnection;
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

/// Applies every pending migration (the seed's `create_all`). Returns how
/// many were applied.
pub fn create_all(conn: &mut AnyConnection) -> Result<usize, DemoError> {
    let migrations = for_connection(conn);
    let applied = conn
        .run_pending_migrations(migrations)
        .map_err(migration_error)?;
    Ok(applied.len())
}

/// Reverts every applied migration, dropping `b` then `a` (the seed's
/// `drop_all`). Returns how many were reverted.
pub fn drop_all(conn: &mut AnyConnection) -> Result<usize, DemoError> {
    let migrations = for_connection(conn);
    let reverted = conn
        .revert_all_migrations(migrations)
        .map_err(migration_error)?;
    Ok(reverted.len())
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
