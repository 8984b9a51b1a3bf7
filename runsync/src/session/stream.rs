//! Streaming: the rows of a synchronous Diesel query as an async
//! [`Stream`], inside the session's transaction.
//!
//! [`AsyncSession::stream`] runs a producer closure on tokio's blocking
//! pool with the session's connection, exactly as `run_sync` runs its
//! closure (same `BEGIN`, same containment of errors, panics and
//! cancellation); the closure hands rows to a [`RowSink`], and the async
//! side reads them from the [`RowStream`] it got back.
//!
//! # How rows cross
//!
//! Rows travel in batches over a bounded `tokio::sync::mpsc` channel; the
//! producer sends with `blocking_send`, so a consumer slower than the
//! producer makes the producer wait (and with it the query: on PostgreSQL
//! and SQLite the server or engine produces no more rows than are read). At
//! most [`STREAM_BUFFER_ROWS`] rows are ever out of the producer's hands
//! and not yet handed to the consumer. The first row goes at once (time to
//! first row is not delayed by batching); after it, rows gather into
//! batches of at most [`BATCH_ROWS`], sent when full or when their oldest
//! row has waited [`FLUSH_AFTER`]; a consumer waiting on an empty channel
//! takes the rows gathered so far itself every [`FLUSH_AFTER`], so a row
//! never waits much longer than that for a producer stalled in the driver.
//! Waking the consumer once per batch rather than once per row, and the
//! producer gathering without the consumer contending for the batch, is
//! what a stream's speed comes down to (a cross-thread wake-up costs more
//! than reading a row; BENCHMARKS.md has the figures). No async worker
//! thread ever blocks: the consumer side only polls the channel, a timer
//! and the task's `JoinHandle`.
//!
//! # What each driver does with `load_iter`
//!
//! `load_iter` is only as lazy as the driver under it (Diesel 2.3):
//! - **PostgreSQL**: lazy only with `PgRowByRowLoadingMode` (libpq's
//!   single-row mode: one `PGresult` per row, read off the socket as it is
//!   iterated). With `DefaultLoadingMode` libpq receives the whole result
//!   before the first row is returned. [`StreamingMode`] picks the row by
//!   row mode for `PgConnection`. Dropping a row-by-row iterator early
//!   reads (and discards) the rest of the result: a stream dropped midway
//!   therefore also cancels its statement on the server (the session's
//!   canceller, `pg_cancel_backend`), so that drain ends at once.
//! - **SQLite**: always lazy: each `next()` is one `sqlite3_step`.
//! - **MySQL/MariaDB**: never lazy. Diesel runs every query as a prepared
//!   statement and calls `mysql_stmt_store_result` right after
//!   `mysql_stmt_execute`: libmysqlclient reads the whole result set into
//!   client memory before the first row is returned (and frees it when the
//!   iterator is dropped). Streaming still saves the `Vec<T>` of
//!   deserialized rows that `load()` builds, and still lets the first rows
//!   be processed while the rest are converted, but neither time to first
//!   row nor the driver's buffer shrink. See BENCHMARKS.md for figures.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use diesel::query_dsl::RunQueryDsl;
use diesel::query_dsl::methods::LoadQuery;
use futures_core::Stream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{AsyncSession, CancelFlag, DoneSignal, State, Step, run_operation};
use crate::engine::Pooled;
use crate::error::Error;
use crate::manager::{PoolableConnection, rollback_all};
use crate::observe::{Fail, Op, OpObs, error_type, error_type_of};

/// Most rows in one batch on the channel.
const BATCH_ROWS: usize = 4096;

/// Batches the channel holds before the producer waits.
const CHANNEL_BATCHES: usize = 1;

/// Longest a gathered row waits for its batch to fill: the producer sends
/// a batch this old with its next row, and a waiting consumer takes what
/// has gathered at least this often (a producer may stall inside the
/// driver between rows).
const FLUSH_AFTER: Duration = Duration::from_millis(2);

/// The producer reads the clock (for [`FLUSH_AFTER`]) once per this many
/// rows gathered, not per row.
const CLOCK_EVERY: usize = 16;

/// Most rows of a stream buffered at once between the producer and the
/// consumer (12,288): the channel's batch, the batch being filled (or
/// waiting for room), and the batch the consumer is reading from. A
/// consumer slower than the producer makes the producer wait once this many
/// rows are in flight.
pub const STREAM_BUFFER_ROWS: usize = (CHANNEL_BATCHES + 2) * BATCH_ROWS;
// The docs (here, docs/streaming.md, RELIABILITY.md) name the figure.
const _: () = assert!(STREAM_BUFFER_ROWS == 12_288);

/// The Diesel loading mode [`AsyncSession::stream_query`] uses for a
/// connection type: the one that fetches rows as they are read, where the
/// driver has one.
///
/// | connection | `Mode` | rows fetched |
/// |---|---|---|
/// | `PgConnection` | `PgRowByRowLoadingMode` | one at a time (libpq single-row mode) |
/// | `SqliteConnection` | `DefaultLoadingMode` | one at a time (`sqlite3_step`) |
/// | `MysqlConnection` | `DefaultLoadingMode` | all at once by libmysqlclient (`mysql_stmt_store_result`) |
///
/// For MySQL, a producer that reads keyset pages (`WHERE id > last ORDER BY
/// id LIMIT n`) keeps client memory to one page.
///
/// Implement it for your own connection type (a `#[derive(MultiConnection)]`
/// enum supports `DefaultLoadingMode` only, which on PostgreSQL buffers the
/// whole result: match on its variants and stream from the inner
/// connection instead).
pub trait StreamingMode: PoolableConnection {
    /// The loading mode to pass to `load_iter`.
    type Mode;
}

#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
impl StreamingMode for diesel::PgConnection {
    type Mode = diesel::pg::PgRowByRowLoadingMode;
}

#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
impl StreamingMode for diesel::SqliteConnection {
    type Mode = diesel::connection::DefaultLoadingMode;
}

#[cfg(feature = "mysql")]
#[cfg_attr(docsrs, doc(cfg(feature = "mysql")))]
impl StreamingMode for diesel::MysqlConnection {
    type Mode = diesel::connection::DefaultLoadingMode;
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The error a [`RowSink`] returns once its stream is gone.
fn closed() -> Error {
    Error::PendingRollback("the stream was dropped by its consumer".into())
}

/// Where the producer hands rows to a [`RowStream`]: given to the closure
/// of [`AsyncSession::stream`], on tokio's blocking pool.
///
/// [`send`](Self::send) waits while the consumer is [`STREAM_BUFFER_ROWS`]
/// rows behind, and fails once the stream has been dropped: return that
/// error (with `?`) to stop the query; the session rolls the transaction
/// back in any case.
pub struct RowSink<T> {
    tx: mpsc::Sender<Vec<T>>,
    pending: Arc<Mutex<Vec<T>>>,
    closed: bool,
    /// Nothing sent yet: the first row goes at once.
    first: bool,
    /// When the oldest row still gathered was gathered.
    gathering_since: Instant,
}

impl<T> std::fmt::Debug for RowSink<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowSink")
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

impl<T> RowSink<T> {
    /// Hands one row to the stream. Blocks (this runs on the blocking pool)
    /// while the consumer is [`STREAM_BUFFER_ROWS`] rows behind. Fails with
    /// [`Error::PendingRollback`] once the stream has been dropped: nobody
    /// reads any more, so stop.
    pub fn send(&mut self, row: T) -> Result<(), Error> {
        if self.is_closed() {
            self.closed = true;
            return Err(closed());
        }
        let batch = {
            let mut pending = lock(&self.pending);
            if pending.is_empty() {
                self.gathering_since = Instant::now();
            }
            pending.push(row);
            // The first row at once (time to first row); then full batches,
            // or what has waited FLUSH_AFTER while the channel has room (the
            // consumer has read everything before it; when it has not, it
            // is behind, and the batch fills). The clock is read every
            // CLOCK_EVERY rows; the consumer's tick takes rows a stalled
            // producer holds. One wake-up of the consumer per batch, not per row.
            let due = pending.len() >= BATCH_ROWS
                || self.first
                || (pending.len().is_multiple_of(CLOCK_EVERY)
                    && self.tx.capacity() > 0
                    && self.gathering_since.elapsed() >= FLUSH_AFTER);
            self.first = false;
            due.then(|| std::mem::take(&mut *pending))
        };
        match batch {
            Some(batch) => self.send_batch(batch),
            None => Ok(()),
        }
    }

    /// Sends every row of `rows` (e.g. what `load_iter` returns), stopping
    /// at the first error, its own or [`send`](Self::send)'s.
    pub fn send_all<I, E>(&mut self, rows: I) -> Result<(), E>
    where
        I: IntoIterator<Item = Result<T, E>>,
        E: From<Error>,
    {
        for row in rows {
            self.send(row?)?;
        }
        Ok(())
    }

    /// Whether the stream has been dropped (nothing sent is read any more).
    pub fn is_closed(&self) -> bool {
        self.closed || self.tx.is_closed()
    }

    fn send_batch(&mut self, batch: Vec<T>) -> Result<(), Error> {
        if self.tx.blocking_send(batch).is_err() {
            self.closed = true;
            return Err(closed());
        }
        Ok(())
    }

    /// Sends the rows still gathered (after the closure returned).
    fn flush(&mut self) {
        let rest = std::mem::take(&mut *lock(&self.pending));
        if !rest.is_empty() && !self.closed {
            let _ = self.send_batch(rest);
        }
    }
}

/// The producer's connection and result, waiting for the stream to take
/// them; or, if the stream was dropped first, the producer returns the
/// connection itself.
struct Handoff<C: PoolableConnection, E> {
    outcome: Option<(Pooled<C>, Step<(), E>, DoneSignal)>,
    abandoned: bool,
}

/// The `error.type` of a producer's own error.
type Classify<E> = fn(&E) -> &'static str;

/// The session a stream works for: borrowed ([`AsyncSession::stream`]) or
/// owned ([`AsyncSession::into_stream`]).
// The owned session moves in once per stream: not worth a box.
#[allow(clippy::large_enum_variant)]
enum Holder<'s, C: PoolableConnection> {
    Borrowed(&'s mut AsyncSession<C>),
    Owned(AsyncSession<C>),
}

impl<C: PoolableConnection> Holder<'_, C> {
    fn session(&mut self) -> &mut AsyncSession<C> {
        match self {
            Holder::Borrowed(session) => session,
            Holder::Owned(session) => session,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Rows may still come.
    Rows,
    /// The producer has sent its last row; waiting for its task to end.
    Joining,
    /// The session has its connection back (or knows it lost it).
    Done,
}

/// The rows a producer closure sends, as an async [`Stream`] of
/// `Result<T, E>`: what [`AsyncSession::stream`] returns.
///
/// After the last row, the stream yields the closure's error, if it
/// failed, then ends; by then the session has its connection back, inside
/// the same transaction (or, after an error, refuses work until
/// `rollback()`, as after a failed `run_sync`).
///
/// Dropping the stream before its end stops the producer at its next row
/// and cancels its statement on the server; the transaction is rolled
/// back, and the session refuses work until
/// [`rollback`](AsyncSession::rollback), which waits for the producer to
/// return its connection.
///
/// Use it with any `Stream` combinator, or, without one, with the inherent
/// [`next`](Self::next).
pub struct RowStream<'s, C: PoolableConnection, T, E> {
    holder: Holder<'s, C>,
    rx: mpsc::Receiver<Vec<T>>,
    pending: Arc<Mutex<Vec<T>>>,
    batch: std::vec::IntoIter<T>,
    task: JoinHandle<()>,
    handoff: Arc<Mutex<Handoff<C, E>>>,
    flag: Option<CancelFlag>,
    phase: Phase,
    /// A first batch has arrived.
    started: bool,
    /// Wakes a waiting consumer to take rows gathered by a stalled producer.
    tick: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The stream's span and clock, until it ends, and how its error is typed.
    /// How the producer's own error is typed (`error.type`).
    obs: Option<(OpObs, Classify<E>)>,
}

impl<C: PoolableConnection, T, E> std::fmt::Debug for RowStream<'_, C, T, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowStream")
            .field("phase", &self.phase)
            .field("buffered", &self.batch.len())
            .finish_non_exhaustive()
    }
}

impl<C: PoolableConnection> AsyncSession<C> {
    /// Streams the rows `f` sends, as an async [`Stream`]: `f` runs on the
    /// blocking pool with the session's connection, inside the session's
    /// transaction (begun first if none is), and hands each row to the
    /// [`RowSink`]; `send` waits while the consumer is behind. When the
    /// stream ends, the session has its connection back and goes on in the
    /// same transaction.
    ///
    /// ```
    /// # #[cfg(feature = "sqlite")] {
    /// use diesel::connection::DefaultLoadingMode;
    /// use diesel::prelude::*;
    /// use diesel::sql_types::BigInt;
    /// # #[derive(QueryableByName)]
    /// # struct N { #[diesel(sql_type = BigInt)] n: i64 }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), diesel_runsync::Error> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let url = dir.path().join("doc.db").display().to_string();
    /// # let engine = diesel_runsync::Engine::<SqliteConnection>::connect(&url, Default::default()).await?;
    /// let mut session = engine.session();
    /// let mut rows = session
    ///     .stream(|conn, rows| {
    ///         let query = diesel::sql_query(
    ///             "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 1000) \
    ///              SELECT n FROM c",
    ///         );
    ///         rows.send_all(query.load_iter::<N, DefaultLoadingMode>(conn)?)
    ///     })
    ///     .await?;
    /// let mut sum = 0;
    /// while let Some(row) = rows.next().await {
    ///     sum += row?.n;
    /// }
    /// assert_eq!(sum, 500_500);
    /// drop(rows);
    /// session.commit().await?;
    /// # Ok(())
    /// # }
    /// # }
    /// ```
    ///
    /// On PostgreSQL, pass `PgRowByRowLoadingMode` to `load_iter` (or use
    /// [`stream_query`](Self::stream_query)): with `DefaultLoadingMode`
    /// libpq receives the whole result first. On MySQL the driver always
    /// does (see the [`StreamingMode`] table): to keep memory flat there,
    /// read keyset pages in the closure (`WHERE id > last ORDER BY id
    /// LIMIT n`, looping until a short page), all inside the one transaction.
    /// On SQLite the engine begins every transaction `IMMEDIATE`, so a
    /// stream holds the database's write lock until the session commits or
    /// rolls back (or, for [`into_stream`](Self::into_stream), until the
    /// stream is dropped).
    ///
    /// If `f` returns an error or panics, the stream yields that error
    /// after the rows sent before it, the transaction is rolled back and the
    /// session refuses work until [`rollback`](Self::rollback). A stream has
    /// no deadline (a long export with a slow consumer is normal): bound the
    /// wait for a row with `tokio::time::timeout` around `next()`; dropping
    /// the stream cancels its statement. The returned future fails only if
    /// the session is unusable or no connection can be checked out.
    pub async fn stream<T, E, F>(&mut self, f: F) -> Result<RowStream<'_, C, T, E>, E>
    where
        F: FnOnce(&mut C, &mut RowSink<T>) -> Result<(), E> + Send + 'static,
        T: Send + 'static,
        E: From<Error> + Send + 'static,
    {
        let start = self.start_stream(f).await?;
        Ok(start.with(Holder::Borrowed(self)))
    }

    /// [`stream`](Self::stream), the stream owning the session: for a
    /// stream that must be `'static` (an HTTP response body). The session
    /// ends with the stream: what it did not commit is rolled back.
    pub async fn into_stream<T, E, F>(mut self, f: F) -> Result<RowStream<'static, C, T, E>, E>
    where
        F: FnOnce(&mut C, &mut RowSink<T>) -> Result<(), E> + Send + 'static,
        T: Send + 'static,
        E: From<Error> + Send + 'static,
    {
        let start = self.start_stream(f).await?;
        Ok(start.with(Holder::Owned(self)))
    }

    /// Streams the rows of one Diesel query, loaded in the connection's
    /// [`StreamingMode`] (row by row on PostgreSQL and SQLite):
    /// `session.stream_query::<User, _>(users::table.select(User::as_select()))`.
    /// See [`stream`](Self::stream).
    pub async fn stream_query<U, Q>(
        &mut self,
        query: Q,
    ) -> Result<RowStream<'_, C, U, Error>, Error>
    where
        C: StreamingMode,
        Q: RunQueryDsl<C> + LoadQuery<'static, C, U, C::Mode> + Send + 'static,
        U: Send + 'static,
    {
        self.stream(move |conn, rows| {
            let loaded = query.load_iter::<U, C::Mode>(conn)?;
            rows.send_all(loaded.map(|row| row.map_err(Error::from)))
        })
        .await
    }

    /// Checks the session out for a stream and starts its producer.
    async fn start_stream<T, E, F>(&mut self, f: F) -> Result<Started<C, T, E>, E>
    where
        F: FnOnce(&mut C, &mut RowSink<T>) -> Result<(), E> + Send + 'static,
        T: Send + 'static,
        E: From<Error> + Send + 'static,
    {
        self.check_usable()?;
        let obs = self.engine.observe().start(Op::Stream);
        let waiting = if self.conn.is_some() {
            None
        } else {
            obs.clock()
        };
        let checked_out = { crate::observe::in_span!(obs.span(), self.take_or_checkout()) };
        let mut pooled = match checked_out {
            Ok(pooled) => pooled,
            Err(e) => {
                obs.finish(Some(error_type(&e)));
                return Err(e.into());
            }
        };
        obs.pool_waited(waiting);
        let needs_begin = self.state != State::Open;
        self.state = State::InFlight;
        let (flag, done) = self.start_stream_operation(pooled.canceller.clone(), &obs);
        let (tx, rx) = mpsc::channel(CHANNEL_BATCHES);
        let pending = Arc::new(Mutex::new(Vec::new()));
        let handoff = Arc::new(Mutex::new(Handoff {
            outcome: None,
            abandoned: false,
        }));
        let mut sink = RowSink {
            tx,
            pending: pending.clone(),
            closed: false,
            first: true,
            gathering_since: Instant::now(),
        };
        let shared = handoff.clone();
        let task = tokio::task::spawn_blocking(move || {
            let op = done.0.clone();
            op.obs.run(move || {
                let slot = &mut *pooled;
                let watch = &done.0.watch;
                // No deadline for a stream: the server's default timeout.
                let mut step =
                    run_operation(slot, None, needs_begin, watch, |conn| f(conn, &mut sink));
                sink.flush();
                let abandoned_early = sink.closed || watch.reason().is_some();
                // The channel closes: the consumer goes on to wait for this task.
                drop(sink);
                if matches!(step, Step::Done(_)) && abandoned_early {
                    // Nobody reads the end: nothing of it may be kept.
                    step = Step::Skipped;
                }
                if matches!(step, Step::Done(_)) {
                    slot.mark_used();
                } else {
                    slot.recover();
                }
                let mut handoff = lock(&shared);
                if handoff.abandoned {
                    drop(handoff);
                    if matches!(step, Step::Done(_)) {
                        let _ = rollback_all(slot.conn_mut());
                    }
                    // The connection back to the pool first, then the signal.
                    drop(pooled);
                    drop(done);
                } else {
                    handoff.outcome = Some((pooled, step, done));
                }
            })
        });
        Ok(Started {
            rx,
            pending,
            task,
            handoff,
            flag,
            obs: (obs, error_type_of::<E>),
        })
    }
}

/// A producer started, waiting for its session holder.
struct Started<C: PoolableConnection, T, E> {
    rx: mpsc::Receiver<Vec<T>>,
    pending: Arc<Mutex<Vec<T>>>,
    task: JoinHandle<()>,
    handoff: Arc<Mutex<Handoff<C, E>>>,
    flag: CancelFlag,
    obs: (OpObs, Classify<E>),
}

impl<C: PoolableConnection, T, E> Started<C, T, E> {
    fn with(self, holder: Holder<'_, C>) -> RowStream<'_, C, T, E> {
        RowStream {
            holder,
            rx: self.rx,
            pending: self.pending,
            batch: Vec::new().into_iter(),
            task: self.task,
            handoff: self.handoff,
            flag: Some(self.flag),
            phase: Phase::Rows,
            started: false,
            tick: None,
            obs: Some(self.obs),
        }
    }
}

impl<C: PoolableConnection, T, E: From<Error>> RowStream<'_, C, T, E> {
    /// The next row, the producer's error, or `None` at the end: for use
    /// without `StreamExt`.
    pub async fn next(&mut self) -> Option<Result<T, E>> {
        std::future::poll_fn(|cx| self.poll_row(cx)).await
    }

    fn poll_row(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<T, E>>> {
        loop {
            match self.phase {
                Phase::Rows => {
                    if let Some(row) = self.batch.next() {
                        return Poll::Ready(Some(Ok(row)));
                    }
                    match self.rx.poll_recv(cx) {
                        Poll::Ready(Some(batch)) => {
                            self.started = true;
                            self.batch = batch.into_iter();
                        }
                        Poll::Ready(None) => {
                            self.batch = std::mem::take(&mut *lock(&self.pending)).into_iter();
                            self.phase = Phase::Joining;
                        }
                        Poll::Pending => {
                            // The channel is empty. Before any batch, wait
                            // (the producer sends its first row at once).
                            // Then wait for the next batch, and at each tick
                            // (every FLUSH_AFTER) take the rows gathered so
                            // far: a producer stalled in the driver keeps no
                            // row waiting longer than that. Not at once: a
                            // consumer faster than its producer would take a
                            // row or two at a time, contending for the lock
                            // the producer gathers under, row after row.
                            if !self.started {
                                return Poll::Pending;
                            }
                            let tick = self
                                .tick
                                .get_or_insert_with(|| Box::pin(tokio::time::sleep(FLUSH_AFTER)));
                            if tick.as_mut().poll(cx).is_pending() {
                                return Poll::Pending;
                            }
                            tick.as_mut()
                                .reset(tokio::time::Instant::now() + FLUSH_AFTER);
                            // Only if the channel is still empty under the
                            // lock: a batch sent since is older than those
                            // rows (the producer never gathers rows while a
                            // batch it took is on its way). A batch in the
                            // channel with `Pending` means tokio's coop
                            // budget is spent (it has already scheduled a
                            // wake-up) or the batch is still being written
                            // (the sender wakes this task): wait, never spin.
                            let mut pending = lock(&self.pending);
                            if !self.rx.is_empty() {
                                return Poll::Pending;
                            }
                            if !pending.is_empty() {
                                self.batch = std::mem::take(&mut *pending).into_iter();
                            }
                            // Else loop: the channel and the reset tick
                            // register this task's waker again.
                        }
                    }
                }
                Phase::Joining => {
                    if let Some(row) = self.batch.next() {
                        return Poll::Ready(Some(Ok(row)));
                    }
                    let joined = match Pin::new(&mut self.task).poll(cx) {
                        Poll::Ready(joined) => joined,
                        Poll::Pending => return Poll::Pending,
                    };
                    self.phase = Phase::Done;
                    return Poll::Ready(self.finish(joined).err().map(Err));
                }
                Phase::Done => return Poll::Ready(None),
            }
        }
    }

    /// The producer's task has ended: the session takes its connection
    /// back and its state from the producer's outcome, as `run_sync` does.
    fn finish(&mut self, joined: Result<(), tokio::task::JoinError>) -> Result<(), E> {
        let obs = self.obs.take();
        let (result, kind) = match self.take_back(joined) {
            Ok(()) => (Ok(()), None),
            Err(Fail::Ours(e)) => {
                let kind = error_type(&e);
                (Err(e.into()), Some(kind))
            }
            Err(Fail::Theirs(e)) => {
                let kind = obs.as_ref().map(|(_, classify)| classify(&e));
                (Err(e), kind)
            }
        };
        if let Some((obs, _)) = obs {
            obs.finish(kind);
        }
        result
    }

    fn take_back(&mut self, joined: Result<(), tokio::task::JoinError>) -> Result<(), Fail<E>> {
        if let Some(flag) = self.flag.take() {
            flag.disarm();
        }
        let outcome = lock(&self.handoff).outcome.take();
        let session = self.holder.session();
        session.in_flight = None;
        joined.map_err(|e| session.lost(e))?;
        let Some((pooled, step, _done)) = outcome else {
            session.state = State::Failed("the stream's connection was lost".into());
            return Err(Error::ConnectionLost.into());
        };
        match step {
            Step::Done(()) => {
                session.conn = Some(pooled);
                session.state = State::Open;
                Ok(())
            }
            Step::Begin(e) => {
                // BEGIN is the first statement of a transaction: no work is lost.
                session.state = State::Idle;
                Err(Error::Database(e).into())
            }
            Step::Failed(e) => {
                session.state = State::Failed("the stream's producer returned an error".into());
                Err(Fail::Theirs(e))
            }
            Step::Unbalanced(depth) => {
                session.state = State::Failed(
                    "the stream's producer left the transaction depth changed".into(),
                );
                Err(Error::UnbalancedTransaction { depth }.into())
            }
            Step::Panicked(message) => {
                session.state = State::Failed(format!("the stream's producer panicked: {message}"));
                Err(Error::Panic(message).into())
            }
            Step::Commit(e) | Step::Setup(e) => {
                session.state = State::Failed(format!("the stream's setup failed: {e}"));
                Err(Error::Database(e).into())
            }
            Step::TimedOut(limit) => {
                session.state = State::Failed(format!("the stream timed out after {limit:?}"));
                Err(Error::Timeout(limit).into())
            }
            Step::Skipped => {
                let reason = "the stream was cancelled".to_owned();
                session.state = State::Failed(reason.clone());
                Err(Error::PendingRollback(reason).into())
            }
        }
    }
}

/// Never pinned in place: rows, the session and the task handle all move freely.
impl<C: PoolableConnection, T, E> Unpin for RowStream<'_, C, T, E> {}

impl<C: PoolableConnection, T, E: From<Error>> Stream for RowStream<'_, C, T, E> {
    type Item = Result<T, E>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_row(cx)
    }
}

impl<C: PoolableConnection, T, E> Drop for RowStream<'_, C, T, E> {
    /// Before the end: the producer stops at its next row (its `send`
    /// fails) and its statement is cancelled; whichever of this and the
    /// producer comes second rolls back and returns the connection.
    fn drop(&mut self) {
        if self.phase == Phase::Done {
            return;
        }
        self.rx.close();
        let outcome = {
            let mut handoff = lock(&self.handoff);
            handoff.abandoned = true;
            handoff.outcome.take()
        };
        // Armed: cancels the statement if the producer is inside it.
        drop(self.flag.take());
        let Some((mut pooled, _step, done)) = outcome else {
            return;
        };
        // The producer finished first, its transaction open: roll back off
        // the async thread, then return the connection and signal.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn_blocking(move || {
                    if let Some(conn) = pooled.conn.as_mut() {
                        let _ = rollback_all(conn);
                    }
                    drop(pooled);
                    drop(done);
                });
            }
            Err(_) => {
                // No runtime: the pool refuses the open transaction and
                // closes the connection, and the server rolls back.
                drop(pooled);
                drop(done);
            }
        }
    }
}
