//! The schema's migrations, embedded for each backend, and the seed's
//! `drop_all` / `create_all` built on them.

use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

use crate::demo::connection::AnyConnection;
use crate::demo::error::DemoError;
use crate::facade::url::Backend;

/// Migrations for SQLite (`migrations/sqlite`).
pub const SQLITE: EmbeddedMigrations = embed_migrations!("migrations/sqlite");
/// Migrations for PostgreSQL (`migrations/postgres`).
pub const POSTGRES: EmbeddedMigrations = embed_migrations!("migrations/postgres");
/// Migrations for MySQL/MariaDB (`migrations/mysql`; DDL there is never transactional).
pub const MYSQL: EmbeddedMigrations = embed_migrations!("migrations/mysql");

/// The embedded migrations for `backend`.
pub fn for_backend(backend: Backend) -> EmbeddedMigrations {
    match backend {
        Backend::Sqlite => SQLITE,
        Backend::Postgres => POSTGRES,
        Backend::Mysql => MYSQL,
    }
}

fn migration_error(e: Box<dyn std::error::Error + Send + Sync>) -> DemoError {
    DemoError::Migration(e.to_string())
}

/// Applies every pending migration (the seed's `create_all`). Returns how
/// many were applied.
pub fn create_all(conn: &mut AnyConnection) -> Result<usize, DemoError> {
    let migrations = for_backend(conn.backend());
    let applied = conn
        .run_pending_migrations(migrations)
        .map_err(migration_error)?;
    Ok(applied.len())
}

/// Reverts every applied migration, dropping `b` then `a` (the seed's
/// `drop_all`). Returns how many were reverted.
pub fn drop_all(conn: &mut AnyConnection) -> Result<usize, DemoError> {
    let migrations = for_backend(conn.backend());
    let reverted = conn
        .revert_all_migrations(migrations)
        .map_err(migration_error)?;
    Ok(reverted.len())
}

/// Migration versions applied and still pending, in order.
pub fn status(conn: &mut AnyConnection) -> Result<(Vec<String>, Vec<String>), DemoError> {
    let migrations = for_backend(conn.backend());
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
