//! The embedded migrations, up and down, on each backend.

mod common;

use common::{TestDb, per_backend};
use diesel::prelude::*;
use greenlet_orm::migrations::{create_all, drop_all, status};
use greenlet_orm::queries::{count_rows, insert_families, seed_families};
use greenlet_orm::{AnyConnection, DemoError};

fn tables_exist(conn: &mut AnyConnection) -> bool {
    count_rows(conn).is_ok()
}

per_backend!(migrations_go_up_and_down, sync);
fn migrations_go_up_and_down(db: TestDb) {
    let mut conn = db.connect();
    assert!(!tables_exist(&mut conn), "{}", db.backend);
    assert_eq!(create_all(&mut conn).unwrap(), 1, "{}", db.backend);
    assert_eq!(create_all(&mut conn).unwrap(), 0, "nothing pending");
    let (applied, pending) = status(&mut conn).unwrap();
    assert_eq!((applied.len(), pending.len()), (1, 0), "{}", db.backend);
    insert_families(&mut conn, &seed_families()).unwrap();
    assert_eq!(count_rows(&mut conn).unwrap(), (3, 5));

    assert_eq!(drop_all(&mut conn).unwrap(), 1, "{}", db.backend);
    assert!(!tables_exist(&mut conn), "{}: tables dropped", db.backend);
    let (applied, pending) = status(&mut conn).unwrap();
    assert_eq!((applied.len(), pending.len()), (0, 1), "{}", db.backend);

    create_all(&mut conn).unwrap();
    assert_eq!(count_rows(&mut conn).unwrap(), (0, 0), "{}", db.backend);
}

per_backend!(
    a_conflicting_table_fails_the_migration_by_name_and_writes_nothing,
    sync
);
fn a_conflicting_table_fails_the_migration_by_name_and_writes_nothing(db: TestDb) {
    let mut conn = db.connect();
    diesel::sql_query("CREATE TABLE a (something_else INTEGER)")
        .execute(&mut conn)
        .unwrap();
    let err = conn
        .transaction(create_all)
        .expect_err("the migration must fail");
    let message = err.to_string();
    assert!(matches!(err, DemoError::Migration(_)), "{message}");
    assert!(
        message.contains("already exists"),
        "{}: {message}",
        db.backend
    );
    assert!(message.contains('a'), "{message}");
    // Nothing recorded as applied, table b not created.
    let (applied, _) = status(&mut conn).unwrap();
    assert!(applied.is_empty(), "{}", db.backend);
    assert!(
        diesel::sql_query("SELECT * FROM b")
            .execute(&mut conn)
            .is_err(),
        "{}: b must not exist",
        db.backend
    );
}

/// Issue 16, item 9: on PostgreSQL the reset looks at `pg_catalog`, which
/// shows every table of the schema, not at `information_schema`, which
/// hides the tables the current role has no privilege on. A table `a` of
/// another role is then named in the reset's own error ("is not this
/// schema's"), instead of the migration failing on `relation "a" already
/// exists`.
#[cfg(feature = "postgres")]
#[test]
#[cfg_attr(runsync_skip_postgres, ignore = "PG_DATABASE_URL is not set")]
fn a_table_of_another_role_is_seen_by_the_reset() {
    use diesel::connection::SimpleConnection;
    let db = TestDb::new(diesel_runsync::Backend::Postgres);
    let suffix = std::process::id();
    let (owner, runner) = (format!("rs_owner_{suffix}"), format!("rs_runner_{suffix}"));
    let mut admin = db.connect();
    admin
        .batch_execute(&format!(
            "CREATE ROLE {owner}; CREATE ROLE {runner} LOGIN; \
             GRANT USAGE, CREATE ON SCHEMA public TO {owner}, {runner}; \
             SET ROLE {owner}; CREATE TABLE a (something_else INTEGER); RESET ROLE;"
        ))
        .unwrap();
    let runner_url = db.url.replacen("postgres@", &format!("{runner}@"), 1);
    assert_ne!(runner_url, db.url, "the test URL names user postgres");
    let outcome = std::panic::catch_unwind(|| {
        let url = diesel_runsync::DatabaseUrl::parse(&runner_url).unwrap();
        let mut conn =
            <AnyConnection as diesel_runsync::PoolableConnection>::connect(&url).unwrap();
        let message = create_all(&mut conn)
            .expect_err("a table of another role is in the way")
            .to_string();
        assert!(
            message.contains("table a already exists and is not this schema's"),
            "{message}"
        );
    });
    admin
        .batch_execute(&format!(
            "DROP OWNED BY {owner}, {runner}; DROP ROLE {owner}; DROP ROLE {runner};"
        ))
        .unwrap();
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}
