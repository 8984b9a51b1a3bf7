//! SQLAlchemy's asyncio `greenlet_orm.py`, as a user of this crate writes it:
//! reset the schema inside `engine.begin()`, insert three parents with their
//! children in one transaction, then hand the plain synchronous
//! `run_queries` to `session.run_sync` and commit. Every statement is echoed
//! to stderr, like `echo=True`.
//!
//! ```sh
//! cargo run --example greenlet_orm                     # SQLite file runsync.db
//! DATABASE_URL=postgres://postgres@127.0.0.1/test cargo run --example greenlet_orm
//! ```

use diesel_runsync::{Engine, EngineOptions, SQL_TARGET};
use greenlet_orm::migrations::{create_all, drop_all};
use greenlet_orm::queries::{insert_families, run_queries, seed_families};
use greenlet_orm::{AnyConnection, DemoError};

#[tokio::main]
async fn main() -> Result<(), DemoError> {
    dotenvy::dotenv().ok();
    tracing_subscriber::fmt()
        .with_env_filter(format!("{SQL_TARGET}=info"))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| "runsync.db".into());
    let options = EngineOptions::default().echo(true);
    let engine = Engine::<AnyConnection>::connect(&url, options).await?;

    let mut conn = engine.begin().await?;
    conn.run_sync(drop_all).await?;
    conn.run_sync(create_all).await?;
    conn.commit().await?;

    let mut session = engine.session();
    session
        .transaction(async |s| {
            s.run_sync(|conn| insert_families(conn, &seed_families()))
                .await
        })
        .await?;
    session
        .run_sync(|conn| run_queries(conn, &mut std::io::stdout()))
        .await?;
    session.commit().await?;
    Ok(())
}
