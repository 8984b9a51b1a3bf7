//! Read replicas and read-your-writes: [`Replicated`], a primary engine and
//! a replica engine side by side.
//!
//! Writes go to the primary; reads to the replica (a PostgreSQL hot
//! standby, through an engine whose URL says `target_session_attrs=standby`
//! or `prefer-standby`, or [`EngineOptions::read_only`](crate::EngineOptions::read_only)).
//! A standby replays the primary's WAL a little behind it, so a read right
//! after a write may not see it yet. [`Replicated::write`] returns the
//! primary's [`WritePosition`] after its commit; [`Replicated::read_after`]
//! with that position waits (at most [`Replicated::max_wait`], default
//! [`DEFAULT_MAX_WAIT`]) until the replica has replayed it, then reads there,
//! or, if it has not by then, reads on the primary. A caller never reads
//! older data than it just wrote. On a backend without write positions
//! (SQLite, MySQL here) every read after a position goes to the primary.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::engine::Engine;
use crate::error::Error;
use crate::manager::{PoolableConnection, WritePosition};

/// How long [`Replicated::read_after`] waits for the replica by default.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_millis(500);

/// A primary and a replica engine: writes on the primary, reads on the
/// replica, and read-your-writes between them. Cheap to clone.
///
/// ```no_run
/// # #[cfg(feature = "postgres")]
/// # async fn demo() -> Result<(), diesel_runsync::Error> {
/// use diesel::prelude::*;
/// use diesel_runsync::{Engine, EngineOptions, Replicated};
///
/// let hosts = "postgres://app@db1:5432,db2:5432/app";
/// let primary = Engine::<PgConnection>::connect(
///     &format!("{hosts}?target_session_attrs=read-write"),
///     EngineOptions::default(),
/// )
/// .await?;
/// let replica = Engine::<PgConnection>::connect(
///     &format!("{hosts}?target_session_attrs=prefer-standby"),
///     EngineOptions::default(),
/// )
/// .await?;
/// let db = Replicated::new(primary, replica);
///
/// let ((), written) = db
///     .write(|conn| diesel::sql_query("UPDATE t SET x = x + 1").execute(conn).map(drop))
///     .await?;
/// let x: i32 = db
///     .read_after(Some(&written), |conn| {
///         diesel::dsl::sql::<diesel::sql_types::Integer>("SELECT x FROM t").get_result(conn)
///     })
///     .await?;
/// # let _ = x;
/// # Ok(())
/// # }
/// ```
pub struct Replicated<C: PoolableConnection> {
    primary: Engine<C>,
    replica: Engine<C>,
    max_wait: Duration,
}

impl<C: PoolableConnection> Clone for Replicated<C> {
    fn clone(&self) -> Self {
        Replicated {
            primary: self.primary.clone(),
            replica: self.replica.clone(),
            max_wait: self.max_wait,
        }
    }
}

impl<C: PoolableConnection> std::fmt::Debug for Replicated<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicated")
            .field("primary", &self.primary)
            .field("replica", &self.replica)
            .field("max_wait", &self.max_wait)
            .finish()
    }
}

/// Where [`Replicated::read_after`] ran the read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadOn {
    /// The replica (caught up with the position, or no position given).
    Replica,
    /// The primary: the replica had not replayed the position in time, or
    /// the backend has no positions.
    Primary,
}

impl<C: PoolableConnection> Replicated<C> {
    /// Writes on `primary`, reads on `replica`.
    #[must_use]
    pub fn new(primary: Engine<C>, replica: Engine<C>) -> Self {
        Replicated {
            primary,
            replica,
            max_wait: DEFAULT_MAX_WAIT,
        }
    }

    /// How long a read after a write waits for the replica before it
    /// reads on the primary instead (zero: never waits).
    #[must_use]
    pub fn max_wait(mut self, wait: Duration) -> Self {
        self.max_wait = wait;
        self
    }

    /// The primary engine.
    pub fn primary(&self) -> &Engine<C> {
        &self.primary
    }

    /// The replica engine.
    pub fn replica(&self) -> &Engine<C> {
        &self.replica
    }

    /// Runs `f` in a transaction of its own on the primary
    /// ([`Engine::transaction`]) and returns, with its result, the
    /// primary's write position after the commit: hand it to
    /// [`read_after`](Self::read_after) to read this write back.
    pub async fn write<R, E, F>(&self, f: F) -> Result<(R, WritePosition), E>
    where
        F: FnOnce(&mut C) -> Result<R, E> + Send + 'static,
        R: Send + 'static,
        E: From<Error> + Send + 'static,
    {
        let mut session = self.primary.session();
        let value = session.run_sync(f).await?;
        let position = session.commit_and_locate().await?;
        Ok((value, position))
    }

    /// Runs `f` in a read transaction of its own on the replica, once the
    /// replica has replayed `after` (if given), or on the primary if it has
    /// not within [`max_wait`](Self::max_wait). `None`: no wait, the
    /// replica as it is.
    pub async fn read_after<R, E, F>(&self, after: Option<&WritePosition>, f: F) -> Result<R, E>
    where
        F: FnOnce(&mut C) -> Result<R, E> + Send + 'static,
        R: Send + 'static,
        E: From<Error> + Send + 'static,
    {
        self.read_where(after, f).await.map(|(value, _)| value)
    }

    /// [`read_after`](Self::read_after), saying where the read ran.
    pub async fn read_where<R, E, F>(
        &self,
        after: Option<&WritePosition>,
        f: F,
    ) -> Result<(R, ReadOn), E>
    where
        F: FnOnce(&mut C) -> Result<R, E> + Send + 'static,
        R: Send + 'static,
        E: From<Error> + Send + 'static,
    {
        // `f` is taken by whichever server runs it: the replica's hop takes
        // it once caught up, else it is left for the primary.
        let f = Arc::new(Mutex::new(Some(f)));
        let position = after.cloned();
        let wait = self.max_wait;
        let on_replica = f.clone();
        let read = self
            .replica
            .session()
            .run_sync_and_commit(move |conn| {
                if let Some(position) = &position
                    && !wait_for_replay(conn, position, wait).map_err(Error::from)?
                {
                    return Ok(None);
                }
                let f = on_replica.lock().unwrap_or_else(|e| e.into_inner()).take();
                let f = f.expect("the read runs once");
                f(conn).map(Some)
            })
            .await?;
        if let Some(value) = read {
            return Ok((value, ReadOn::Replica));
        }
        let f = f.lock().unwrap_or_else(|e| e.into_inner()).take();
        let f = f.expect("the replica left the read to the primary");
        let value = self.primary.transaction(f).await?;
        Ok((value, ReadOn::Primary))
    }
}

/// Polls `conn` until its server has replayed `position` (true), or `wait`
/// has passed (false): every millisecond at first, then less often.
fn wait_for_replay<C: PoolableConnection>(
    conn: &mut C,
    position: &WritePosition,
    wait: Duration,
) -> diesel::QueryResult<bool> {
    if position.as_str().is_none() {
        return Ok(false);
    }
    let started = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        if conn.has_replayed(position)? {
            return Ok(true);
        }
        if started.elapsed() >= wait {
            return Ok(false);
        }
        std::thread::sleep(pause.min(wait.saturating_sub(started.elapsed())));
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}
