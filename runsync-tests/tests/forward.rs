//! Issue 20, defect 4: a user's `#[derive(MultiConnection)]` enum with an
//! empty `impl PoolableConnection` compiled, but quietly lost what the
//! inner connections' impls give (SQLite's WAL, busy handler, foreign keys
//! and `BEGIN IMMEDIATE`; server-side cancel; PostgreSQL's server-side
//! statement timeout). `forward_poolable_connection!` writes the `impl`,
//! forwarding every method; these tests check, through the enum, what each
//! guarantee shows, beside the same checks on an enum with the empty
//! `impl` (which keeps the defaults: the contrast shows each check can fail).
#![cfg(all(feature = "sqlite", feature = "postgres"))]

#[allow(unused_macros, unused_imports)]
mod common;

use std::time::{Duration, Instant};

use common::TestBackend;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel_runsync::{Engine, EngineOptions, Error, PoolableConnection};

/// The user's enum, every method forwarded.
#[derive(diesel::MultiConnection)]
pub enum Forwarded {
    Pg(PgConnection),
    Sqlite(SqliteConnection),
}

diesel_runsync::forward_poolable_connection! {
    Forwarded {
        Postgres => Pg(PgConnection),
        Sqlite => Sqlite(SqliteConnection),
    }
}

mod empty {
    /// The same enum with an empty `impl`: the trait's defaults only.
    #[derive(diesel::MultiConnection)]
    pub enum Defaults {
        Pg(diesel::PgConnection),
        Sqlite(diesel::SqliteConnection),
    }

    impl diesel_runsync::PoolableConnection for Defaults {}
}
use empty::Defaults;

#[derive(QueryableByName)]
struct Setting {
    #[diesel(sql_type = diesel::sql_types::Text)]
    value: String,
}

/// The one-row, one-column `value` of `sql` on `conn`.
macro_rules! setting {
    ($conn:expr, $sql:expr) => {
        diesel::sql_query($sql)
            .get_result::<Setting>($conn)
            .map(|s| s.value)
    };
}

/// SQLite's journal mode and foreign keys, as the connections of an engine
/// over `$conn` (a connection type) on `$url` have them.
macro_rules! sqlite_settings {
    ($conn:ty, $url:expr) => {{
        let engine = Engine::<$conn>::connect($url, EngineOptions::default())
            .await
            .unwrap();
        engine
            .transaction(|c: &mut $conn| {
                let journal = setting!(c, "SELECT journal_mode AS value FROM pragma_journal_mode")?;
                let keys = setting!(
                    c,
                    "SELECT CAST(foreign_keys AS TEXT) AS value FROM pragma_foreign_keys"
                )?;
                Ok::<_, Error>((journal, keys))
            })
            .await
            .unwrap()
    }};
}

#[tokio::test]
async fn a_forwarded_enum_keeps_sqlite_set_up() {
    let dir = tempfile::tempdir().unwrap();
    let url = dir.path().join("f.db").display().to_string();
    let (journal, keys) = sqlite_settings!(Forwarded, &url);
    assert_eq!((journal.as_str(), keys.as_str()), ("wal", "1"));
    let other = dir.path().join("d.db").display().to_string();
    let (journal, keys) = sqlite_settings!(Defaults, &other);
    assert_ne!(
        (journal.as_str(), keys.as_str()),
        ("wal", "1"),
        "the empty impl has none of it"
    );
}

/// Whether a call with a 100 ms deadline around a 3 s statement, on an
/// engine over `C`, got its connection back: only a canceller stops the
/// statement on the server in time; without one, the caller gives the
/// connection up after `ABANDON_AFTER` (the pool then holds none).
async fn connection_came_back<C>(url: &str, long: String) -> bool
where
    C: PoolableConnection,
    diesel::query_builder::SqlQuery: diesel::query_dsl::methods::ExecuteDsl<C>,
{
    let engine = Engine::<C>::connect(url, EngineOptions::default().max_size(1))
        .await
        .unwrap();
    let mut session = engine.session();
    let started = Instant::now();
    let result = session
        .with_timeout(Duration::from_millis(100))
        .run_sync(move |c: &mut C| diesel::sql_query(long).execute(c).map_err(Error::from))
        .await;
    assert!(matches!(result, Err(Error::Timeout(_))), "{result:?}");
    assert!(started.elapsed() < Duration::from_secs(1));
    session.rollback().await.unwrap();
    let status = engine.status();
    status.connections == 1 && status.idle == 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_enum_keeps_the_sqlite_cancel() {
    let dir = tempfile::tempdir().unwrap();
    let url = dir.path().join("c.db").display().to_string();
    // Long enough to outlive the deadline and ABANDON_AFTER on any build.
    let long = common::long_statement::<SqliteConnection>(0.3);
    assert!(connection_came_back::<Forwarded>(&url, long.clone()).await);
    let other = dir.path().join("d.db").display().to_string();
    assert!(
        !connection_came_back::<Defaults>(&other, long).await,
        "the empty impl has no canceller"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(runsync_skip_postgres, ignore = "PG_DATABASE_URL is not set")]
async fn a_forwarded_enum_keeps_the_postgres_cancel_and_server_timeout() {
    let url = <PgConnection as TestBackend>::server_url().unwrap();
    let long = common::long_statement::<PgConnection>(3.0);
    assert!(connection_came_back::<Forwarded>(&url, long.clone()).await);
    assert!(
        !connection_came_back::<Defaults>(&url, long).await,
        "the empty impl has no canceller"
    );
    // The server enforces the deadline too, per transaction.
    let shown = |timeout| async move {
        let engine = Engine::<Forwarded>::connect(&url_of(), EngineOptions::default())
            .await
            .unwrap();
        let mut session = engine.session();
        let value = session
            .with_timeout(timeout)
            .run_sync(|c: &mut Forwarded| {
                setting!(c, "SELECT current_setting('statement_timeout') AS value")
                    .map_err(Error::from)
            })
            .await
            .unwrap();
        session.rollback().await.unwrap();
        value
    };
    assert_eq!(shown(Duration::from_millis(700)).await, "700ms");
    let engine = Engine::<Defaults>::connect(&url, EngineOptions::default())
        .await
        .unwrap();
    let mut session = engine.session();
    let value = session
        .with_timeout(Duration::from_millis(700))
        .run_sync(|c: &mut Defaults| {
            setting!(c, "SELECT current_setting('statement_timeout') AS value").map_err(Error::from)
        })
        .await
        .unwrap();
    session.rollback().await.unwrap();
    assert_eq!(value, "0", "the empty impl sets no server-side timeout");
}

fn url_of() -> String {
    <PgConnection as TestBackend>::server_url().unwrap()
}

/// `is_embedded` is not forwarded (no `self` to pick a variant by): an
/// enum with a SQLite variant still needs a URL from `TestDatabase`.
#[test]
fn an_enum_of_connections_is_not_embedded() {
    assert!(!<Forwarded as PoolableConnection>::is_embedded());
}
