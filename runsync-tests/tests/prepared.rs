//! `update_kept`, on every backend: the `UPDATE` is prepared once per
//! connection, where Diesel's own `update(...).set(...)` is prepared on
//! every execution; it changes the same rows; an empty changeset is refused
//! as Diesel refuses it; on MariaDB the server counts the prepares.

mod common;

use std::sync::{Arc, Mutex};

use common::{TestBackend, TestDb, per_backend};
use diesel::connection::{Instrumentation, InstrumentationEvent};
use diesel::prelude::*;
use diesel_runsync::{EngineOptions, update_kept};

diesel::table! {
    items (id) {
        id -> Integer,
        unit -> Integer,
        part -> Integer,
    }
}

/// The changeset of [`Items::bump_nothing`]: every field `None`.
#[derive(AsChangeset)]
#[diesel(table_name = items)]
struct MaybePart {
    part: Option<i32>,
}

/// The updates under test, on one backend's connection type.
trait Items: TestBackend {
    /// `part = part + by` for unit `unit`: kept, or Diesel's own.
    fn bump(&mut self, unit: i32, by: i32, kept: bool) -> QueryResult<usize>;
    /// An update whose changeset sets nothing: kept, or Diesel's own.
    fn bump_nothing(&mut self, kept: bool) -> QueryResult<usize>;
}

macro_rules! items {
    ($($feature:literal => $conn:ty),+ $(,)?) => {$(
        #[cfg(feature = $feature)]
        impl Items for $conn {
            fn bump(&mut self, unit: i32, by: i32, kept: bool) -> QueryResult<usize> {
                let target = items::table.filter(items::unit.eq(unit));
                let values = items::part.eq(items::part + by);
                if kept {
                    update_kept(target, values).execute(self)
                } else {
                    diesel::update(target).set(values).execute(self)
                }
            }

            fn bump_nothing(&mut self, kept: bool) -> QueryResult<usize> {
                let values = MaybePart { part: None };
                if kept {
                    update_kept(items::table, values).execute(self)
                } else {
                    diesel::update(items::table).set(values).execute(self)
                }
            }
        }
    )+};
}

items! {
    "sqlite" => diesel::SqliteConnection,
    "postgres" => diesel::PgConnection,
    "mysql" => diesel::MysqlConnection,
}

/// The SQL of every statement Diesel put in a connection's cache.
#[derive(Clone, Default)]
struct Cached(Arc<Mutex<Vec<String>>>);

impl Instrumentation for Cached {
    fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
        if let InstrumentationEvent::CacheQuery { sql, .. } = event {
            self.0.lock().unwrap().push(sql.to_owned());
        }
    }
}

impl Cached {
    fn updates(&self) -> usize {
        let cached = self.0.lock().unwrap();
        cached
            .iter()
            .filter(|sql| sql.starts_with("UPDATE"))
            .count()
    }
}

per_backend!(a_kept_update_is_prepared_once);
async fn a_kept_update_is_prepared_once<C: Items>(db: TestDb<C>)
where
    diesel::query_builder::SqlQuery: diesel::query_builder::QueryFragment<C::Backend>,
{
    db.create_schema().await;
    let cached = Cached::default();
    let seen = cached.clone();
    let engine = db
        .engine_with(
            EngineOptions::default()
                .max_size(1)
                .instrumentation(move || seen.clone()),
        )
        .await;
    let backend = db.backend();
    let changed = engine
        .transaction(|c| {
            diesel::sql_query("INSERT INTO items (unit, part) VALUES (1, 0), (1, 10), (2, 0)")
                .execute(c)?;
            let mut changed = 0;
            for _ in 0..3 {
                changed += c.bump(1, 1, true)?;
            }
            QueryResult::Ok(changed)
        })
        .await
        .unwrap();
    assert_eq!(
        changed, 6,
        "{backend}: two rows changed by each of 3 kept updates"
    );
    assert_eq!(
        cached.updates(),
        1,
        "{backend}: the kept UPDATE, cached once"
    );
    engine
        .transaction(|c| (0..3).try_for_each(|_| c.bump(1, 1, false).map(drop)))
        .await
        .unwrap();
    // Diesel's own behaviour, which `update_kept` works around: if this
    // fails, Diesel caches UPDATEs itself now and `update_kept` can go.
    assert_eq!(
        cached.updates(),
        1,
        "{backend}: Diesel's UPDATE, never cached"
    );
    let parts = format!(
        "SELECT CAST(part AS {}) AS n FROM items ORDER BY unit, part",
        C::BIGINT
    );
    let parts = engine
        .transaction(move |c| c.scalars(&parts))
        .await
        .unwrap();
    assert_eq!(
        parts,
        [6, 16, 0],
        "{backend}: the same rows, changed the same"
    );
}

// Refused before it reaches the server, in a transaction that then rolls
// back; on PostgreSQL the engine records the failed statement (its SQL
// cannot be shown: the echo names it so, where it used to panic).
per_backend!(an_empty_update_is_refused);
async fn an_empty_update_is_refused<C: Items>(db: TestDb<C>) {
    let engine = db.engine().await;
    for kept in [true, false] {
        let err = engine
            .transaction(move |c| c.bump_nothing(kept))
            .await
            .expect_err("an UPDATE that sets nothing");
        assert!(
            err.to_string()
                .to_lowercase()
                .contains("no changes to save"),
            "{} (kept: {kept}): {err}",
            db.backend()
        );
    }
    // Diesel's way to treat it as "nothing to do" knows the kept one's error.
    let nothing = engine
        .transaction(|c| {
            use diesel::result::OptionalEmptyChangesetExtension;
            c.bump_nothing(true).optional_empty_changeset()
        })
        .await
        .unwrap();
    assert_eq!(nothing, None, "{}", db.backend());
}

/// MariaDB's own count, `Com_stmt_prepare` of the session, read with a
/// statement that is itself prepared each time (`sql_query`): one prepare
/// per read, on top of what the updates between two reads cost.
#[cfg(feature = "mysql")]
mod mysql_server_counts {
    use super::*;
    use diesel::MysqlConnection;

    fn prepares(c: &mut MysqlConnection) -> QueryResult<i64> {
        common::session_status(c, "Com_stmt_prepare")
    }

    #[tokio::test]
    #[cfg_attr(runsync_skip_mysql, ignore = "MYSQL_DATABASE_URL is not set")]
    async fn the_server_prepares_a_kept_update_once() {
        common::run(|db: TestDb<MysqlConnection>| async move {
            db.create_schema().await;
            let engine = db.engine_with(EngineOptions::default().max_size(1)).await;
            let (kept, plain) = engine
                .transaction(|c| {
                    diesel::sql_query("INSERT INTO items (unit, part) VALUES (1, 0)").execute(c)?;
                    let start = prepares(c)?;
                    for _ in 0..5 {
                        c.bump(1, 1, true)?;
                    }
                    let kept = prepares(c)? - start;
                    let start = prepares(c)?;
                    for _ in 0..5 {
                        c.bump(1, 1, false)?;
                    }
                    QueryResult::Ok((kept, prepares(c)? - start))
                })
                .await
                .unwrap();
            assert_eq!(
                kept,
                1 + 1,
                "5 kept UPDATEs: one prepare (and the read's own)"
            );
            assert_eq!(
                plain,
                5 + 1,
                "5 Diesel UPDATEs: five prepares (and the read's own)"
            );
        })
        .await;
    }
}
