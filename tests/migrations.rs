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
