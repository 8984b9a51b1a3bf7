//! The program's statements (`queries::Statements`) stay prepared on every
//! backend, through the program's `AnyConnection`: the load unit
//! (`touch_parent`: a parent by key, its children, its UPDATE) prepares
//! each of its three statements once per connection, the UPDATE included
//! (Diesel prepares an `UPDATE` anew on each execution;
//! `diesel_runsync::update_kept` keeps it); on MariaDB the server counts no
//! prepare per unit once they are.

mod common;

use std::sync::{Arc, Mutex};

use common::{TestDb, migrate, per_backend};
use diesel::connection::{Instrumentation, InstrumentationEvent};
use diesel_runsync::EngineOptions;
use greenlet_orm::queries::{insert_families, seed_families, touch_parent};

/// The SQL of each statement Diesel cached, and how many statements ran.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<(Vec<String>, usize)>>);

impl Instrumentation for Seen {
    fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
        let mut seen = self.0.lock().unwrap();
        match event {
            InstrumentationEvent::CacheQuery { sql, .. } => seen.0.push(sql.to_owned()),
            InstrumentationEvent::StartQuery { .. } => seen.1 += 1,
            _ => {}
        }
    }
}

impl Seen {
    fn take(&self) -> (Vec<String>, usize) {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

per_backend!(the_load_unit_prepares_each_statement_once);
async fn the_load_unit_prepares_each_statement_once(db: TestDb) {
    let seen = Seen::default();
    let recorder = seen.clone();
    let engine = db
        .engine_with(
            EngineOptions::default()
                .max_size(1)
                .instrumentation(move || recorder.clone()),
        )
        .await;
    migrate(&engine).await;
    let ids = engine
        .transaction(|c| insert_families(c, &seed_families()))
        .await
        .unwrap();
    seen.take();
    engine
        .transaction(move |c| {
            for &id in ids.iter().chain(&ids) {
                touch_parent(c, id, "touched")?;
            }
            diesel::QueryResult::Ok(())
        })
        .await
        .unwrap();
    let (cached, statements) = seen.take();
    let backend = db.backend;
    // 6 units of 3 statements, plus BEGIN and COMMIT where Diesel reports them as statements.
    assert!(statements >= 18, "{backend:?}: {statements} statements");
    let updates: Vec<_> = cached.iter().filter(|s| s.starts_with("UPDATE")).collect();
    assert_eq!(
        updates.len(),
        1,
        "{backend:?}: the UPDATE cached once: {cached:?}"
    );
    assert_eq!(
        cached.len(),
        3,
        "{backend:?}: three statements, each cached once: {cached:?}"
    );
}

/// MariaDB's `Com_stmt_prepare` for the session: no prepare per unit once
/// the unit's statements are prepared (sqlx's count; Diesel's plain UPDATE
/// costs one prepare and one close per unit).
#[cfg(feature = "mysql")]
mod mysql_server_counts {
    use super::*;
    use diesel::{MysqlConnection, QueryResult, RunQueryDsl};
    use greenlet_orm::AnyConnection;

    fn prepares(c: &mut MysqlConnection) -> QueryResult<i64> {
        #[derive(diesel::QueryableByName)]
        struct Status {
            #[diesel(sql_type = diesel::sql_types::Text)]
            #[diesel(column_name = Value)]
            value: String,
        }
        // Prepared on each read (Diesel caches no `sql_query`): one prepare per read.
        let status: Status =
            diesel::sql_query("SHOW SESSION STATUS LIKE 'Com_stmt_prepare'").get_result(c)?;
        Ok(status.value.parse().expect("a count"))
    }

    fn prepares_any(c: &mut AnyConnection) -> QueryResult<i64> {
        match c {
            AnyConnection::Mysql(m) => prepares(m),
            _ => unreachable!("a MySQL test"),
        }
    }

    per_backend!(no_prepare_per_load_unit, current_thread, [mysql]);
    async fn no_prepare_per_load_unit(db: TestDb) {
        let engine = db
            .migrated_engine(1, std::time::Duration::from_secs(30))
            .await;
        let per_unit = engine
            .transaction(|c| {
                let ids = insert_families(c, &seed_families())?;
                touch_parent(c, ids[0], "warm")?;
                let start = prepares_any(c)?;
                for _ in 0..10 {
                    for &id in &ids {
                        touch_parent(c, id, "touched")?;
                    }
                }
                Ok::<_, greenlet_orm::DemoError>(prepares_any(c)? - start)
            })
            .await
            .unwrap();
        assert_eq!(
            per_unit, 1,
            "statements prepared by 30 load units (and the read's own)"
        );
    }
}
