//! The seed's program, step by step, on the async facade.

use std::io::Write;

use crate::connection::AnyConnection;
use crate::error::DemoError;
use crate::migrations::{create_all, drop_all};
use crate::queries::{Counts, insert_families, run_queries, seed_families};
use diesel_runsync::Engine;

/// Step 2: drops and recreates the schema in one transaction
/// (`engine.begin()` + two `run_sync` calls + commit).
///
/// Killed at any moment (SIGKILL included), it leaves either the previous
/// state or a whole new one, and the next call succeeds from whatever it
/// finds: [`drop_all`] and [`create_all`] check first and converge from any
/// half-done state, an earlier version's included (see
/// [`crate::migrations`]). On SQLite and PostgreSQL the transaction makes
/// the reset atomic. MySQL commits each DDL statement on its own, so there
/// each step is built aside and switched in by one atomic `RENAME TABLE`,
/// bookkeeping included: between the two steps the database holds none of
/// the schema (no table `a` or `b`, no version recorded), never half of it.
/// `tests/reset_kill.rs` kills the real program at random moments to check this.
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
