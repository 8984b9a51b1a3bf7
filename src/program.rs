//! The seed's program, step by step, on the async facade.

use std::io::Write;

use crate::connection::AnyConnection;
use crate::error::DemoError;
use crate::migrations::{create_all, drop_all};
use crate::queries::{Counts, insert_families, run_queries, seed_families};
use diesel_runsync::Engine;

/// Step 2: drops and recreates the schema in one transaction
/// (`engine.begin()` + two `run_sync` calls + commit). Atomic on SQLite and
/// PostgreSQL; MySQL commits each DDL statement on its own.
pub async fn reset_schema(engine: &Engine<AnyConnection>) -> Result<(), DemoError> {
    let mut conn = engine.begin().await?;
    conn.run_sync(drop_all).await?;
    conn.run_sync(create_all).await?;
    conn.commit().await?;
    Ok(())
}

/// SQLAlchemy's `greenlet_orm` example: resets the schema, inserts the
/// seed's parents and children in one transaction, runs [`run_queries`]
/// through `run_sync` in the session's transaction, writing to `out`, and
/// commits. Returns `out` and what was counted.
pub async fn greenlet_orm<W>(
    engine: &Engine<AnyConnection>,
    out: W,
) -> Result<(W, Counts), DemoError>
where
    W: Write + Send + 'static,
{
    reset_schema(engine).await?;

    let mut session = engine.session();
    session
        .transaction(async |s| {
            s.run_sync(|conn| insert_families(conn, &seed_families()))
                .await
        })
        .await?;

    let (out, counts) = session
        .run_sync(move |conn| {
            let mut out = out;
            let counts = run_queries(conn, &mut out)?;
            out.flush()?;
            Ok::<_, DemoError>((out, counts))
        })
        .await?;
    session.commit().await?;
    Ok((out, counts))
}
