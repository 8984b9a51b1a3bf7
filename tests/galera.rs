//! MySQL/MariaDB ids that come from what the server did, not arithmetic.
//!
//! `ids_follow_auto_increment_settings::mysql`: a session whose
//! `auto_increment_increment` / `auto_increment_offset` are 3 / 2 (what
//! node 2 of a 3-node Galera Cluster uses) inserts the seed's and a
//! 2,500-parent workload's families: every returned id is a row of `a`
//! with that family's data and children. Ignored like the other MySQL
//! tests (`mysql` feature off, or `MYSQL_DATABASE_URL` unset at build time).

mod common;

use common::{TestDb, per_backend};
use diesel::connection::SimpleConnection;
use greenlet_orm::queries::{all_rows, insert_families, seed_families, workload_families};
use greenlet_orm::{AnyConnection, Family};

/// Inserts `families` and checks each returned id against the rows.
fn insert_and_check(conn: &mut AnyConnection, families: &[Family], step: i32, offset: i32) {
    let ids = insert_families(conn, families).unwrap();
    assert_eq!(ids.len(), families.len());
    let (parents, children) = all_rows(conn).unwrap();
    for (family, &id) in families.iter().zip(&ids) {
        assert_eq!(id.rem_euclid(step), offset % step, "id {id}");
        let parent = parents
            .iter()
            .find(|p| p.id == id)
            .unwrap_or_else(|| panic!("id {id} is not a row of a"));
        assert_eq!(parent.data, family.data, "id {id}");
        let mine: Vec<_> = children
            .iter()
            .filter(|c| c.a_id == id)
            .map(|c| c.data.clone())
            .collect();
        assert_eq!(mine, family.children, "children of {id}");
    }
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), ids.len(), "ids are distinct");
}

per_backend!(ids_follow_auto_increment_settings, sync, [mysql]);
fn ids_follow_auto_increment_settings(db: TestDb) {
    let mut conn = db.connect();
    greenlet_orm::migrations::create_all(&mut conn).unwrap();
    conn.batch_execute("SET SESSION auto_increment_increment = 3, auto_increment_offset = 2")
        .unwrap();
    insert_and_check(&mut conn, &seed_families(), 3, 2);
    let (parents, _) = all_rows(&mut conn).unwrap();
    let seed_ids: Vec<i32> = parents.iter().map(|p| p.id).collect();
    assert_eq!(seed_ids, [2, 5, 8], "the seed's ids on a fresh table");
    insert_and_check(&mut conn, &workload_families(2_500), 3, 2);
}
