//! `AsyncSession`: one unit of work over a pooled connection, with
//! `run_sync` running synchronous Diesel code inside its transaction.
//!
//! # How cancellation and panics are contained
//!
//! Every operation moves the pooled connection into one `spawn_blocking`
//! task and gets it back with the result (an [`Engine::transaction`] that
//! waited for a busy engine runs on the blocking thread that finished the
//! unit before it, with that connection: `engine::dispatch`). Then:
//! - a panic in the user's closure is caught in that task, the transaction
//!   rolled back, and [`Error::Panic`] returned;
//! - if the awaiting future is dropped, a flag tells the task, which rolls
//!   the transaction back before the connection returns to the pool; were the
//!   flag missed, the pool's `has_broken` check refuses any connection with
//!   a transaction open, and closing it makes the server roll back;
//! - if the future is dropped while the user's closure runs, the statement
//!   running on the server is cancelled too (`pg_cancel_backend`,
//!   `KILL QUERY`, `sqlite3_interrupt`: see the `cancel` module), so the
//!   connection comes back within the server's reaction time rather than
//!   when the statement would have ended; a closure whose future was dropped
//!   before it started is not run at all;
//! - a deadline ([`EngineOptions::statement_timeout`](crate::EngineOptions::statement_timeout),
//!   [`AsyncSession::set_statement_timeout`], [`AsyncSession::with_timeout`])
//!   fires the same cancel from a tokio timer (and PostgreSQL and MariaDB
//!   enforce it per statement on the server too); the call returns
//!   [`Error::Timeout`], its transaction rolled back, and, like any failure
//!   inside a transaction, the session refuses work until `rollback()`;
//! - after a failed or cancelled operation inside a transaction, the session
//!   refuses work ([`Error::PendingRollback`]) until `rollback()`, so later
//!   steps can never be committed without the earlier ones; `rollback()`
//!   waits for a cancelled operation's task, so when it returns nothing of
//!   the session's is left open on the server.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use diesel::connection::TransactionManager;
use tokio::sync::Notify;

use crate::cancel::{Canceller, OpWatch, Reason};
use crate::engine::{Engine, Pooled, Unit};
use crate::error::Error;
use crate::manager::{PoolableConnection, Slot, WritePosition, rollback_all, transaction_depth};
use crate::observe::{
    Fail, Observe, Op, OpObs, RetireReason, TaskObs, diesel_error_type, error_type,
};

pub(crate) mod stream;

/// Where a session's transaction stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// No transaction; the next statement begins one (autobegin).
    Idle,
    /// `begin()` was called; `BEGIN` goes out with the next statement.
    Begun,
    /// `BEGIN` was sent; work is pending until commit or rollback.
    Open,
    /// An operation started and never finished: its future was dropped.
    InFlight,
    /// An operation failed inside the transaction, which was rolled back
    /// (a cancelled `transaction()` scope's is rolled back by `rollback()` or
    /// the session's drop); `rollback()` must acknowledge it.
    Failed(String),
}

/// An asynchronous session over an [`Engine`], the counterpart of
/// SQLAlchemy's `AsyncSession`.
///
/// One session serves one task at a time (its methods take `&mut self`);
/// concurrency comes from many sessions over one engine. Dropping a session
/// rolls back whatever it did not commit and returns its connection.
pub struct AsyncSession<C: PoolableConnection> {
    engine: Engine<C>,
    conn: Option<Pooled<C>>,
    state: State,
    /// Set by a [`transaction`](Self::transaction) scope whose future was dropped.
    scope_cancelled: Option<Arc<AtomicBool>>,
    /// The blocking operation last started, until it completes in this
    /// session; if its future was dropped, `rollback()` waits for it (at
    /// most [`ROLLBACK_WAIT`]), then gives its connection up.
    in_flight: Option<(Arc<InFlight>, Weak<Home<C>>)>,
    /// The deadline of each `run_sync` call, unless one is given per call.
    statement_timeout: Option<Duration>,
}

impl<C: PoolableConnection> std::fmt::Debug for AsyncSession<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncSession")
            .field("url", self.engine.url())
            .field("state", &self.state)
            .field("holds_connection", &self.conn.is_some())
            .field("statement_timeout", &self.statement_timeout)
            .finish()
    }
}

/// How the blocking half of an operation ended.
enum Step<R, E> {
    Done(R),
    /// The closure returned with this many transaction levels open instead of 1.
    Unbalanced(u32),
    Begin(diesel::result::Error),
    Commit(diesel::result::Error),
    Failed(E),
    Panicked(String),
    /// Setting the server's statement timeout failed inside the transaction.
    Setup(diesel::result::Error),
    /// The deadline passed; the statement was cancelled.
    TimedOut(Duration),
    /// The future was dropped before the closure started: it did not run.
    Skipped,
}

/// What one blocking operation shares with the session that started it.
struct InFlight {
    /// Whether and why it was cancelled, and the cancel of its statement.
    watch: Arc<OpWatch>,
    /// Set just before the engine sends `COMMIT`: from then on, a caller
    /// that gives up cannot say whether the transaction was committed.
    committing: AtomicBool,
    /// Set once the operation's connection is back in the pool (or closed).
    done: AtomicBool,
    finished: Notify,
    /// The blocking task's observation (span, queue wait, run time).
    obs: TaskObs,
}

impl InFlight {
    fn new(canceller: Option<Canceller>, observe: Option<Arc<Observe>>, obs: TaskObs) -> Self {
        InFlight {
            watch: OpWatch::observed(canceller, observe),
            committing: AtomicBool::new(false),
            done: AtomicBool::new(false),
            finished: Notify::new(),
            obs,
        }
    }

    /// Waits until the operation's connection is back (or closed).
    async fn wait_done(&self) {
        loop {
            let finished = self.finished.notified();
            tokio::pin!(finished);
            finished.as_mut().enable();
            if self.done.load(Ordering::Acquire) {
                return;
            }
            finished.await;
        }
    }
}

/// Where an operation's connection goes back to: the pool's handle, whose
/// slot the blocking task took. The task puts the slot back when it is
/// done; a caller that gives up on the task (see [`ABANDON_AFTER`]) takes
/// the handle away first, so the pool discards the empty slot and opens a
/// replacement, and the task closes the connection when it finally returns.
type Home<C> = Mutex<Option<Pooled<C>>>;

/// How long a call waits, once its deadline has passed and its statement
/// was cancelled, for the blocking task to give the connection back. After
/// that it returns [`Error::Timeout`] (or [`Error::CommitOutcomeUnknown`]
/// if `COMMIT` was on its way) and gives the connection up: a server that
/// never answers (a hung host, a dead network path) cannot hold a caller
/// past its deadline by more than this. The given-up connection never
/// returns to the pool; its transaction is never committed.
pub const ABANDON_AFTER: Duration = Duration::from_millis(250);

/// How long [`AsyncSession::rollback`] (and the session's `commit` or
/// `rollback` after its deadline) waits for an operation whose future was
/// dropped to give its connection back, before giving it up.
pub const ROLLBACK_WAIT: Duration = Duration::from_secs(2);

/// Travels with the connection out of the blocking task and, dropped after
/// it, tells a waiting [`AsyncSession::rollback`] that the operation is over:
/// whether the awaiting future took the result or tokio dropped it.
struct DoneSignal(Arc<InFlight>);

impl Drop for DoneSignal {
    fn drop(&mut self) {
        self.0.done.store(true, Ordering::Release);
        self.0.finished.notify_waiters();
    }
}

/// Cancels the operation when dropped before [`CancelFlag::disarm`]: the
/// awaiting future was dropped. If the user's closure is running, its
/// statement is cancelled on the server (from the blocking pool).
struct CancelFlag(Arc<InFlight>, bool);

impl CancelFlag {
    fn disarm(mut self) {
        self.1 = false;
    }
}

impl Drop for CancelFlag {
    fn drop(&mut self) {
        if self.1 {
            self.0.watch.cancel(Reason::Dropped);
        }
    }
}

/// Sets a transaction scope's flag when dropped before disarmed.
struct ScopeFlag(Arc<AtomicBool>, bool);

impl ScopeFlag {
    fn new() -> (Self, Arc<AtomicBool>) {
        let flag = Arc::new(AtomicBool::new(false));
        (ScopeFlag(flag.clone(), true), flag)
    }

    fn disarm(mut self) {
        self.1 = false;
    }
}

impl Drop for ScopeFlag {
    fn drop(&mut self) {
        if self.1 {
            self.0.store(true, Ordering::Release);
        }
    }
}

/// Where [`AsyncSession::run_sync_then`] finds its session.
pub(crate) enum SessionOf<'a, C: PoolableConnection> {
    /// The caller's session.
    Borrowed(&'a mut AsyncSession<C>),
    /// A fresh session of this engine, made inside the operation's future
    /// (`Engine::transaction`).
    Fresh(&'a Engine<C>),
}

impl<C: PoolableConnection> AsyncSession<C> {
    pub(crate) fn new(engine: Engine<C>) -> Self {
        let statement_timeout = engine.statement_timeout();
        AsyncSession {
            engine,
            conn: None,
            state: State::Idle,
            scope_cancelled: None,
            in_flight: None,
            statement_timeout,
        }
    }

    /// Registers a stream's blocking producer, which keeps its pool handle
    /// (a stream has no deadline to give it up at): the flag to drop with
    /// the stream and the signal to send back with the connection.
    fn start_stream_operation(
        &mut self,
        canceller: Option<Canceller>,
        obs: &OpObs,
    ) -> (CancelFlag, DoneSignal) {
        let observe = self.counts_cancels(&canceller);
        let op = Arc::new(InFlight::new(canceller, observe, obs.for_task()));
        self.in_flight = Some((op.clone(), Weak::new()));
        (CancelFlag(op.clone(), true), DoneSignal(op))
    }

    /// Registers a blocking operation on `pooled`: the flag to drop with
    /// the awaiting future, the signal to send back with the connection,
    /// the slot for the task, and its [`Home`]. With a `canceller`, a
    /// cancel stops the statement of the user's closure.
    fn start_operation(
        &mut self,
        mut pooled: Pooled<C>,
        cancellable: bool,
        obs: &OpObs,
    ) -> (CancelFlag, DoneSignal, Slot<C>, Arc<Home<C>>) {
        let canceller = if cancellable {
            pooled.canceller.clone()
        } else {
            None
        };
        let observe = self.counts_cancels(&canceller);
        let op = Arc::new(InFlight::new(canceller, observe, obs.for_task()));
        let slot = std::mem::replace(&mut *pooled, Slot::vacant());
        let home = Arc::new(Mutex::new(Some(pooled)));
        self.in_flight = Some((op.clone(), Arc::downgrade(&home)));
        (CancelFlag(op.clone(), true), DoneSignal(op), slot, home)
    }

    /// Where the cancels of an operation with `canceller` are counted
    /// (`db.runsync.cancels`): only with metrics compiled in.
    fn counts_cancels(&self, canceller: &Option<Canceller>) -> Option<Arc<Observe>> {
        (cfg!(feature = "metrics") && canceller.is_some()).then(|| self.engine.observe().clone())
    }

    /// The engine this session draws connections from.
    pub fn engine(&self) -> &Engine<C> {
        &self.engine
    }

    /// Whether a transaction is begun (explicitly or by autobegin) and not
    /// yet ended, and usable: false once a failure or cancellation has left
    /// it waiting for [`rollback`](Self::rollback).
    pub fn in_transaction(&self) -> bool {
        let scope_cancelled = self
            .scope_cancelled
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Acquire));
        !scope_cancelled && matches!(self.state, State::Begun | State::Open)
    }

    /// The deadline of this session's `run_sync` calls (`None`: none); the
    /// engine's [`statement_timeout`](crate::EngineOptions::statement_timeout)
    /// until [`set_statement_timeout`](Self::set_statement_timeout).
    pub fn statement_timeout(&self) -> Option<Duration> {
        self.statement_timeout
    }

    /// Sets the deadline of this session's later `run_sync` and
    /// `run_sync_and_commit` calls (`None`: none), in place of the engine's.
    /// A call that outlives it has its statement cancelled on the server and
    /// returns [`Error::Timeout`] (converted into the closure's error type);
    /// its transaction is rolled back and the session refuses work until
    /// [`rollback`](Self::rollback), as after any failure. The deadline
    /// bounds the whole call, the wait for a pooled connection included (a
    /// call that times out waiting for one has done nothing). A call whose
    /// connection does not come back within [`ABANDON_AFTER`] of the
    /// deadline (a server that does not answer) has it given up.
    pub fn set_statement_timeout(&mut self, timeout: Option<Duration>) {
        self.statement_timeout = timeout;
    }

    /// One call with a deadline of its own, in place of the session's:
    /// `session.with_timeout(d).run_sync(f).await`. See
    /// [`set_statement_timeout`](Self::set_statement_timeout) for what a
    /// deadline does.
    pub fn with_timeout(&mut self, timeout: Duration) -> WithTimeout<'_, C> {
        WithTimeout {
            session: self,
            timeout,
        }
    }

    /// Whether the session currently holds a pooled connection.
    pub fn holds_connection(&self) -> bool {
        self.conn.is_some()
    }

    pub(crate) fn hold(&mut self, conn: Pooled<C>) {
        self.conn = Some(conn);
    }

    /// Begins a transaction explicitly. Lazy, as in SQLAlchemy: `BEGIN`
    /// goes out with the next `run_sync`, in the same blocking hop.
    pub fn begin(&mut self) -> Result<(), Error> {
        self.check_usable()?;
        match self.state {
            State::Idle => {
                self.state = State::Begun;
                Ok(())
            }
            _ => Err(Error::TransactionAlreadyOpen),
        }
    }

    /// Runs `f` on the blocking pool with the session's connection, inside
    /// the session's transaction (begun first if none is), and returns what
    /// `f` returns.
    ///
    /// If `f` returns an error or panics, the whole transaction is rolled
    /// back and the session refuses further work until [`rollback`](Self::rollback).
    pub fn run_sync<R, E, F>(&mut self, f: F) -> impl Future<Output = Result<R, E>>
    where
        F: FnOnce(&mut C) -> Result<R, E> + Send + 'static,
        R: Send + 'static,
        E: From<Error> + Send + 'static,
    {
        let timeout = self.statement_timeout;
        Self::run_sync_then(SessionOf::Borrowed(self), f, false, timeout, Op::RunSync)
    }

    /// [`run_sync`](Self::run_sync), then [`commit`](Self::commit), in one
    /// blocking hop (`BEGIN` if needed, `f`, `COMMIT`): the cheapest way to
    /// run a short transaction. If this future is dropped before the
    /// `COMMIT` is sent, the transaction is rolled back instead.
    pub fn run_sync_and_commit<R, E, F>(&mut self, f: F) -> impl Future<Output = Result<R, E>>
    where
        F: FnOnce(&mut C) -> Result<R, E> + Send + 'static,
        R: Send + 'static,
        E: From<Error> + Send + 'static,
    {
        let timeout = self.statement_timeout;
        Self::run_sync_then(
            SessionOf::Borrowed(self),
            f,
            true,
            timeout,
            Op::RunSyncAndCommit,
        )
    }

    /// `run_sync` (`commit`: and commit) as the operation `op`, in its span,
    /// on the session `source` names. One `async`
    /// function from the caller's `.await` to the blocking task: the public
    /// entry points return this future as it is, the span is entered around
    /// the awaits inside (when a subscriber listens), and the result is
    /// settled by a plain function, because each `async` layer moves the
    /// whole future once more (callgrind counted those moves).
    pub(crate) async fn run_sync_then<R, E, F>(
        source: SessionOf<'_, C>,
        f: F,
        commit: bool,
        timeout: Option<Duration>,
        op: Op,
    ) -> Result<R, E>
    where
        F: FnOnce(&mut C) -> Result<R, E> + Send + 'static,
        R: Send + 'static,
        E: From<Error> + Send + 'static,
    {
        let mut fresh;
        // Engine::transaction: handed to a connection by the engine's
        // dispatch (a fresh session commits, and keeps nothing).
        let fresh_unit = matches!(source, SessionOf::Fresh(_)) && commit;
        let session = match source {
            SessionOf::Borrowed(session) => session,
            SessionOf::Fresh(engine) => {
                // Made here, field by field, inside the future: a session
                // made elsewhere would be copied in whole.
                fresh = AsyncSession {
                    engine: engine.clone(),
                    conn: None,
                    state: State::Idle,
                    scope_cancelled: None,
                    in_flight: None,
                    statement_timeout: engine.statement_timeout(),
                };
                &mut fresh
            }
        };
        let obs = session.engine.observe().start(op);
        let result: Result<R, Fail<E>> = 'op: {
            if let Err(e) = session.check_usable() {
                break 'op Err(e.into());
            }
            // The deadline bounds the whole call, the wait for a connection included.
            let deadline = timeout.map(|limit| (limit, tokio::time::Instant::now() + limit));
            let inline = timeout.is_none() && session.engine.runs_inline() && can_run_inline();
            // An Engine::transaction runs inline only on a connection free
            // at once; else it is dispatched (queued while the engine is busy).
            let turn = if fresh_unit && inline {
                session.engine.free_turn()
            } else {
                None
            };
            if fresh_unit && turn.is_none() {
                break 'op session.run_dispatched(f, timeout, deadline, &obs).await;
            }
            let pooled = match session.conn.take() {
                Some(pooled) => {
                    obs.pool_waited(None);
                    pooled
                }
                None => {
                    let waiting = obs.clock();
                    let checked_out = match deadline {
                        // The deadline's timer is boxed: it would otherwise
                        // widen this future, which is moved whole.
                        Some((limit, at)) => Box::pin(tokio::time::timeout_at(
                            at,
                            session.engine.checkout_with(turn),
                        ))
                        .await
                        .unwrap_or_else(|_| {
                            session.engine.observe().deadline_hit();
                            Err(Error::Timeout(limit))
                        }),
                        None => session.engine.checkout_with(turn).await,
                    };
                    obs.pool_waited(waiting);
                    match checked_out {
                        Ok(pooled) => pooled,
                        Err(e) => break 'op Err(e.into()),
                    }
                }
            };
            let needs_begin = session.state != State::Open;
            session.state = State::InFlight;
            let (flag, done, slot, home) = session.start_operation(pooled, true, &obs);
            let watch = done.0.watch.clone();
            let task_home = home.clone();
            let blocking = move || {
                let begun = done.0.obs.started();
                let ran = run_unit(
                    slot,
                    &task_home,
                    done,
                    begun,
                    timeout,
                    needs_begin,
                    commit,
                    f,
                );
                drop(task_home);
                ran
            };
            let joined = if inline {
                // On this thread, the runtime's other tasks moved off it
                // (EngineOptions::run_inline). No await until it
                // returns: the future cannot be dropped meanwhile. Panics of
                // the closure are caught inside; one of this crate's own
                // would unwind from here with the connection in the slot,
                // which the pool then refuses (a transaction may be open).
                Some(Ok(tokio::task::block_in_place(blocking)))
            } else {
                let handle = tokio::task::spawn_blocking(blocking);
                let at = deadline.map(|(_, at)| at);
                session.join(handle, &watch, at, obs.span()).await
            };
            flag.disarm();
            let Some(joined) = joined else {
                // Given up at the deadline: the connection goes, unreturned.
                let _entered = obs.enter();
                break 'op Err(session.given_up_at(timeout.unwrap_or_default()).into());
            };
            session.in_flight = None;
            let pooled = home.lock().unwrap_or_else(|e| e.into_inner()).take();
            match joined {
                Ok((step, _done)) => {
                    debug_assert!(
                        pooled.is_some(),
                        "the blocking task put the connection back"
                    );
                    session.settle(step, pooled, commit)
                }
                Err(e) => Err(session.lost(e).into()),
            }
        };
        match result {
            Ok(value) => {
                obs.finish(None);
                Ok(value)
            }
            Err(fail) => {
                let (error, kind) = fail.typed();
                obs.finish(Some(kind));
                Err(error)
            }
        }
    }

    /// An [`Engine::transaction`] unit, handed to a connection by the
    /// engine's dispatch (the `engine::dispatch` module): at once when one
    /// is free, else queued for the blocking thread that finishes a unit.
    /// Waiting for a connection is bounded by the deadline and the
    /// connection timeout; a unit taken back then has done nothing. Once a
    /// thread has it, it is joined as any operation is.
    async fn run_dispatched<R, E, F>(
        &mut self,
        f: F,
        timeout: Option<Duration>,
        deadline: Option<(Duration, tokio::time::Instant)>,
        obs: &OpObs,
    ) -> Result<R, Fail<E>>
    where
        F: FnOnce(&mut C) -> Result<R, E> + Send + 'static,
        R: Send + 'static,
        E: From<Error> + Send + 'static,
    {
        self.state = State::InFlight;
        let observe = cfg!(feature = "metrics").then(|| self.engine.observe().clone());
        let op = Arc::new(InFlight::new(None, observe, obs.for_task()));
        let home: Arc<Home<C>> = Arc::new(Mutex::new(None));
        self.in_flight = Some((op.clone(), Arc::downgrade(&home)));
        let flag = CancelFlag(op.clone(), true);
        let watch = op.watch.clone();
        let (sender, mut result) = tokio::sync::oneshot::channel();
        let task_home = home.clone();
        let done = DoneSignal(op);
        let unit: Unit<C> = Box::new(move |mut pooled: Pooled<C>, handed, keep| {
            done.0.watch.bind(pooled.canceller.clone());
            let begun = done.0.obs.started_handed(handed);
            let slot = std::mem::replace(&mut *pooled, Slot::vacant());
            *task_home.lock().unwrap_or_else(|e| e.into_inner()) = Some(pooled);
            let ran = run_unit(slot, &task_home, done, begun, timeout, true, true, f);
            // Kept for the next unit, or back in the pool before the caller wakes.
            if let Some(back) = task_home.lock().unwrap_or_else(|e| e.into_inner()).take() {
                keep(back);
            }
            let _ = sender.send(ran);
        });
        let id = self.engine.unit_id();
        let pool_limit = self.engine.connection_timeout();
        let waited_at = tokio::time::Instant::now() + pool_limit;
        let wait_until = deadline.map_or(waited_at, |(_, at)| at.min(waited_at));
        let checking_out = AtomicBool::new(false);
        let handed = {
            let handing = self.engine.hand_over(unit, id, &checking_out);
            tokio::pin!(handing);
            tokio::select! {
                biased;
                ran = &mut result => Ok(Some(ran)),
                handed = &mut handing => handed.map(|()| None),
                () = tokio::time::sleep_until(wait_until) => {
                    // Still queued (taken back here), or still held by
                    // `handing` for its checkout (dropped with it): it
                    // never runs. Else a thread has it.
                    let unrun = self.engine.take_back(id) || checking_out.load(Ordering::Relaxed);
                    if !unrun {
                        // A thread took it: wait for it as for any unit.
                        Ok(None)
                    } else if let Some((limit, _)) = deadline.filter(|(_, at)| *at <= waited_at) {
                        self.engine.observe().deadline_hit();
                        Err(Error::Timeout(limit))
                    } else {
                        self.engine.observe().unit_timed_out();
                        Err(Error::PoolTimeout(pool_limit))
                    }
                }
            }
        };
        let joined = match handed {
            Ok(Some(ran)) => Some(ran),
            Ok(None) => {
                let at = deadline.map(|(_, at)| at);
                self.join(&mut result, &watch, at, obs.span()).await
            }
            Err(e) => {
                // Never handed to a connection: nothing of it ran.
                flag.disarm();
                self.in_flight = None;
                self.state = State::Idle;
                return Err(e.into());
            }
        };
        flag.disarm();
        let Some(joined) = joined else {
            // Given up at the deadline: the connection goes, unreturned.
            let _entered = obs.enter();
            return Err(self.given_up_at(timeout.unwrap_or_default()).into());
        };
        self.in_flight = None;
        match joined {
            Ok((step, _done)) => self.settle(step, None, true),
            // The unit was dropped unrun (runtime shutdown) or its thread
            // died outside the closure: its connection is gone with it.
            Err(_) => {
                self.state = State::Failed("the connection was lost".into());
                Err(Error::RuntimeShutdown.into())
            }
        }
    }

    /// The session after a `run_sync` operation's blocking task returned
    /// `step` with the connection `pooled`, and what the caller gets.
    #[inline]
    fn settle<R, E>(
        &mut self,
        step: Step<R, E>,
        pooled: Option<Pooled<C>>,
        commit: bool,
    ) -> Result<R, Fail<E>> {
        match step {
            Step::Done(value) if commit => {
                drop(pooled);
                self.state = State::Idle;
                Ok(value)
            }
            Step::Done(value) => {
                self.conn = pooled;
                self.state = State::Open;
                Ok(value)
            }
            Step::Begin(e) => {
                // BEGIN is the first statement of a transaction: no work is lost.
                self.state = State::Idle;
                Err(Error::Database(e).into())
            }
            Step::Commit(e) => {
                self.state = State::Failed(format!("COMMIT failed: {e}"));
                Err(commit_error(e).into())
            }
            Step::Failed(e) => {
                self.state = State::Failed("the run_sync closure returned an error".into());
                Err(Fail::Theirs(e))
            }
            Step::Unbalanced(depth) => {
                self.state =
                    State::Failed("the run_sync closure left the transaction depth changed".into());
                Err(Error::UnbalancedTransaction { depth }.into())
            }
            Step::Panicked(message) => {
                self.state = State::Failed(format!("the run_sync closure panicked: {message}"));
                Err(Error::Panic(message).into())
            }
            Step::Setup(e) => {
                self.state = State::Failed(format!("setting the statement timeout failed: {e}"));
                Err(Error::Database(e).into())
            }
            Step::TimedOut(limit) => {
                self.state = State::Failed(format!(
                    "a run_sync call timed out after {limit:?} and was cancelled"
                ));
                Err(Error::Timeout(limit).into())
            }
            Step::Skipped => {
                let reason = "an operation was cancelled before it started".to_owned();
                self.state = State::Failed(reason.clone());
                Err(Error::PendingRollback(reason).into())
            }
        }
    }

    /// Waits for an operation's blocking task. With a `deadline`: once it
    /// passes, cancels the operation and waits at most [`ABANDON_AFTER`]
    /// more; `None` then means the caller gives the task up.
    async fn join<T>(
        &mut self,
        mut handle: impl Future<Output = T> + Unpin,
        watch: &Arc<OpWatch>,
        deadline: Option<tokio::time::Instant>,
        span: &tracing::Span,
    ) -> Option<T> {
        let Some(at) = deadline else {
            return Some(handle.await);
        };
        tokio::select! {
            biased;
            joined = &mut handle => return Some(joined),
            () = tokio::time::sleep_until(at) => {
                let _entered = (!span.is_disabled()).then(|| span.enter());
                self.engine.observe().deadline_hit();
                watch.cancel(Reason::Timeout);
            }
        }
        tokio::time::timeout(ABANDON_AFTER, handle).await.ok()
    }

    /// Gives up the operation in flight: takes its connection's pool handle
    /// away (the pool discards it and opens a replacement; the blocking
    /// task closes the connection when it returns, so its transaction is
    /// rolled back by the server and never committed). Returns whether
    /// `COMMIT` was on its way.
    fn give_up(&mut self) -> bool {
        let Some((op, home)) = self.in_flight.take() else {
            return false;
        };
        if let Some(home) = home.upgrade()
            && let Some(pooled) = home.lock().unwrap_or_else(|e| e.into_inner()).take()
        {
            self.engine.observe().retired(RetireReason::GivenUp);
            drop(pooled);
        }
        tracing::warn!(
            "a blocking operation did not return its connection in time; the connection is \
             given up and will be closed when the operation ends"
        );
        self.conn = None;
        op.committing.load(Ordering::Acquire)
    }

    /// Gives the operation in flight up once its `limit` deadline passed
    /// ([`give_up`](Self::give_up)), leaves the session refusing work, and
    /// says what the caller gets: [`Error::CommitOutcomeUnknown`] if
    /// `COMMIT` was on its way, else [`Error::Timeout`].
    fn given_up_at(&mut self, limit: Duration) -> Error {
        if self.give_up() {
            self.state = State::Failed("COMMIT's outcome is unknown".into());
            Error::CommitOutcomeUnknown(format!(
                "the {limit:?} deadline passed while COMMIT was on its way"
            ))
        } else {
            self.state = State::Failed(format!(
                "an operation timed out after {limit:?}; its connection was given up"
            ));
            Error::Timeout(limit)
        }
    }

    /// Commits the transaction, if one is open, and returns the connection
    /// to the pool. With no transaction it does nothing.
    ///
    /// Once this future has been polled, the `COMMIT` is on its way: if the
    /// future is then dropped, the transaction is committed whole or not at
    /// all, and the session refuses work until [`rollback`](Self::rollback).
    /// With a session deadline ([`statement_timeout`](Self::statement_timeout)),
    /// a `COMMIT` that has not returned by then, or one whose connection
    /// broke, returns [`Error::CommitOutcomeUnknown`]: whether the server
    /// committed cannot be known here.
    pub async fn commit(&mut self) -> Result<(), Error> {
        self.check_usable()?;
        if self.state != State::Open {
            self.state = State::Idle;
            self.release();
            return Ok(());
        }
        self.commit_then(|_| Ok(())).await
    }

    /// [`commit`](Self::commit), then the server's write position after it
    /// (PostgreSQL: its WAL LSN), in the same blocking hop: what a read on a
    /// replica waits for to see this commit ([`Replicated`](crate::Replicated)).
    /// With no transaction open, just the position.
    pub async fn commit_and_locate(&mut self) -> Result<WritePosition, Error> {
        self.commit_then(|conn| conn.write_position()).await
    }

    /// Commits, then runs `after` on the connection outside any
    /// transaction: the operation `commit`, in its span.
    async fn commit_then<T: Send + 'static>(
        &mut self,
        after: impl FnOnce(&mut C) -> diesel::QueryResult<T> + Send + 'static,
    ) -> Result<T, Error> {
        let obs = self.engine.observe().start(Op::Commit);
        let result = crate::observe::in_span!(obs.span(), self.commit_observed(after, &obs));
        obs.finish(result.as_ref().err().map(error_type));
        result
    }

    async fn commit_observed<T: Send + 'static>(
        &mut self,
        after: impl FnOnce(&mut C) -> diesel::QueryResult<T> + Send + 'static,
        obs: &OpObs,
    ) -> Result<T, Error> {
        self.check_usable()?;
        let limit = self.statement_timeout;
        if self.state != State::Open {
            self.state = State::Idle;
            let value = self
                .blocking(limit, false, obs, |slot| after(slot.conn_mut()))
                .await;
            self.release();
            return value?.map_err(Error::Database);
        }
        let committed = self
            .blocking(limit, true, obs, |slot| {
                if let Err(e) = slot.commit() {
                    slot.recover();
                    return Err((true, e));
                }
                slot.mark_used();
                after(slot.conn_mut()).map_err(|e| (false, e))
            })
            .await;
        self.release();
        match committed {
            Ok(Ok(value)) => {
                self.state = State::Idle;
                Ok(value)
            }
            Ok(Err((true, e))) => {
                self.state = State::Failed(format!("COMMIT failed: {e}"));
                Err(commit_error(e))
            }
            // Committed; only what came after failed.
            Ok(Err((false, e))) => {
                self.state = State::Idle;
                Err(Error::Database(e))
            }
            Err(e) => {
                self.state = State::Failed(format!("COMMIT failed: {e}"));
                Err(e)
            }
        }
    }

    /// Rolls back whatever the session has not committed, returns the
    /// connection to the pool, and makes the session usable again after a
    /// failure or cancellation. If an operation's future was dropped, this
    /// first waits for its blocking task to roll back and return its
    /// connection, at most [`ROLLBACK_WAIT`]; a task that takes longer (a
    /// closure that ignores its cancel, a server that does not answer) has
    /// its connection given up instead: closed when the task ends, so the
    /// server rolls its transaction back, and never committed.
    pub async fn rollback(&mut self) -> Result<(), Error> {
        if let Some((cancelled, _)) = self.in_flight.clone() {
            // An operation's future was dropped: its task rolls back and
            // returns the connection; wait for that, so that when this
            // returns nothing of the session's is left open on the server.
            if tokio::time::timeout(ROLLBACK_WAIT, cancelled.wait_done())
                .await
                .is_err()
            {
                self.give_up();
            }
            self.in_flight = None;
        }
        self.scope_cancelled = None;
        let open = self.conn.as_mut().is_some_and(|p| has_open_transaction(p));
        self.state = State::Idle;
        let rolled_back = if open {
            // If this is cancelled, the connection goes back with the open
            // transaction and the pool refuses it: still rolled back. Past
            // the session's deadline the connection is given up, which
            // rolls back too.
            let obs = self.engine.observe().start(Op::Rollback);
            let outcome = crate::observe::in_span!(
                obs.span(),
                self.blocking(self.statement_timeout, false, &obs, |slot| {
                    rollback_all(slot.conn_mut())
                })
            );
            obs.finish(match &outcome {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(diesel_error_type(e)),
                Err(e) => Some(error_type(e)),
            });
            match outcome {
                Ok(result) => result,
                Err(Error::Timeout(_)) => Ok(()),
                Err(e) => {
                    self.state = State::Idle;
                    self.release();
                    return Err(e);
                }
            }
        } else {
            Ok(())
        };
        self.state = State::Idle;
        // A failed ROLLBACK leaves the transaction manager broken: the pool
        // closes the connection, and the server rolls back as it goes.
        self.release();
        rolled_back.map_err(Error::Database)
    }

    /// Ends the session: rolls back anything uncommitted and returns the
    /// connection. The session can be used again afterwards.
    pub async fn close(&mut self) -> Result<(), Error> {
        self.rollback().await
    }

    /// Runs `body` in a transaction: begins, commits when `body` returns
    /// `Ok`, rolls back when it returns `Err`. If this future is dropped
    /// midway, the session refuses work until `rollback()`, so a later
    /// commit cannot keep half of the scope.
    pub async fn transaction<R, E, F>(&mut self, body: F) -> Result<R, E>
    where
        F: AsyncFnOnce(&mut Self) -> Result<R, E>,
        E: From<Error>,
    {
        self.begin()?;
        let (flag, cancelled) = ScopeFlag::new();
        self.scope_cancelled = Some(cancelled);
        let result = body(self).await;
        flag.disarm();
        self.scope_cancelled = None;
        match result {
            Ok(value) => {
                self.commit().await?;
                Ok(value)
            }
            Err(e) => {
                if let Err(rollback_error) = self.rollback().await {
                    tracing::warn!("rollback after a failed transaction scope: {rollback_error}");
                }
                Err(e)
            }
        }
    }

    /// Fails if an earlier failure or cancellation awaits `rollback()`.
    fn check_usable(&mut self) -> Result<(), Error> {
        if self
            .scope_cancelled
            .take_if(|c| c.load(Ordering::Acquire))
            .is_some()
        {
            self.state = State::Failed("a transaction() scope was cancelled".into());
        }
        match &self.state {
            State::InFlight => {
                self.state = State::Failed("an earlier operation was cancelled".into());
                Err(Error::PendingRollback(
                    "an earlier operation was cancelled".into(),
                ))
            }
            State::Failed(reason) => Err(Error::PendingRollback(reason.clone())),
            _ => Ok(()),
        }
    }

    async fn take_or_checkout(&mut self) -> Result<Pooled<C>, Error> {
        match self.conn.take() {
            Some(conn) => Ok(conn),
            None => self.engine.checkout().await,
        }
    }

    /// Runs `op` with the pooled slot on the blocking pool (one hop). With
    /// a `limit`, a task that has not returned by then, plus
    /// [`ABANDON_AFTER`], has its connection given up: [`Error::Timeout`],
    /// or [`Error::CommitOutcomeUnknown`] for a `commit`.
    async fn blocking<T: Send + 'static>(
        &mut self,
        limit: Option<Duration>,
        commit: bool,
        obs: &OpObs,
        op: impl FnOnce(&mut Slot<C>) -> T + Send + 'static,
    ) -> Result<T, Error> {
        let waiting = if self.conn.is_some() {
            None
        } else {
            obs.clock()
        };
        let pooled = self.take_or_checkout().await?;
        obs.pool_waited(waiting);
        let previous = std::mem::replace(&mut self.state, State::InFlight);
        // The engine's own statements are never cancelled: no canceller.
        let (flag, done, slot, home) = self.start_operation(pooled, false, obs);
        done.0.committing.store(commit, Ordering::Release);
        let watch = done.0.watch.clone();
        let task_home = home.clone();
        let handle = tokio::task::spawn_blocking(move || {
            let mut slot = slot;
            let value = done.0.obs.run(|| op(&mut slot));
            go_home(&task_home, slot);
            drop(task_home);
            (value, done)
        });
        let deadline = limit.map(|limit| tokio::time::Instant::now() + limit);
        let joined = self.join(handle, &watch, deadline, obs.span()).await;
        flag.disarm();
        let Some(joined) = joined else {
            return Err(self.given_up_at(limit.unwrap_or_default()));
        };
        self.in_flight = None;
        let pooled = home.lock().unwrap_or_else(|e| e.into_inner()).take();
        let (value, _done) = joined.map_err(|e| self.lost(e))?;
        self.conn = pooled;
        self.state = previous;
        Ok(value)
    }

    /// The blocking task died (runtime shutdown or a panic outside user
    /// code); its connection is gone, and with it the transaction.
    fn lost(&mut self, e: tokio::task::JoinError) -> Error {
        self.state = State::Failed("the connection was lost".into());
        if e.is_panic() {
            Error::Panic(panic_message(e.into_panic().as_ref()))
        } else {
            Error::RuntimeShutdown
        }
    }

    fn release(&mut self) {
        self.conn = None;
    }
}

impl<C: PoolableConnection> Drop for AsyncSession<C> {
    fn drop(&mut self) {
        let Some(mut pooled) = self.conn.take() else {
            return;
        };
        if !has_open_transaction(&mut pooled) {
            return;
        }
        // Roll back off the async thread; without a runtime, dropping the
        // connection makes the pool close it and the server roll back.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn_blocking(move || {
                if let Some(conn) = pooled.conn.as_mut() {
                    let _ = rollback_all(conn);
                }
            });
        }
    }
}

fn has_open_transaction<C: PoolableConnection>(pooled: &mut Pooled<C>) -> bool {
    let slot: &mut Slot<C> = pooled;
    slot.conn.as_mut().is_none_or(|conn| {
        !matches!(
            C::TransactionManager::transaction_manager_status_mut(conn).transaction_depth(),
            Ok(None)
        )
    })
}

/// Puts an operation's slot back into the pool's handle, or, if the caller
/// gave the operation up, closes the connection.
fn go_home<C: PoolableConnection>(home: &Home<C>, slot: Slot<C>) {
    let mut home = home.lock().unwrap_or_else(|e| e.into_inner());
    match home.as_mut() {
        Some(pooled) => **pooled = slot,
        None => drop(slot),
    }
}

/// What a failed `COMMIT` returns: [`Error::CommitOutcomeUnknown`] when the
/// connection broke (the server may have committed before it went), else
/// the database error.
fn commit_error(e: diesel::result::Error) -> Error {
    if crate::error::connection_broke(&e) {
        Error::CommitOutcomeUnknown(e.to_string())
    } else {
        Error::Database(e)
    }
}

/// The blocking half of a `run_sync` operation on `slot`: the user's
/// closure `f` (with `BEGIN` first if `needs_begin`) under the deadline
/// `timeout`, then `COMMIT` if `commit` and all went well, else a rollback;
/// the connection then goes back to `home`. `begun`: when the blocking
/// task started (its observation's clock).
#[allow(clippy::too_many_arguments)]
fn run_unit<C, R, E, F>(
    slot: Slot<C>,
    home: &Home<C>,
    done: DoneSignal,
    begun: Option<Instant>,
    timeout: Option<Duration>,
    needs_begin: bool,
    commit: bool,
    f: F,
) -> (Step<R, E>, DoneSignal)
where
    C: PoolableConnection,
    F: FnOnce(&mut C) -> Result<R, E>,
{
    let op = &done.0;
    let entered = op.obs.enter();
    let started = Instant::now();
    let mut slot = slot;
    let watch = &op.watch;
    // Forget a stop seen outside an operation (a stream's statement).
    slot.take_server_timeout();
    let mut step = run_operation(&mut slot, timeout, needs_begin, watch, f);
    let reason = watch.reason();
    let server_timed_out = slot.take_server_timeout();
    if let Some(limit) = timeout {
        // The deadline passed (the timer cancelled the statement, or the
        // server's own statement timeout, which is the deadline, stopped
        // one: servers time statements by the wall clock, which a clock
        // step can move ahead of this one): whatever the closure made of
        // it, the call timed out.
        let late = (started.elapsed() >= limit || server_timed_out)
            && matches!(step, Step::Failed(_) | Step::Panicked(_));
        if reason == Some(Reason::Timeout) || late {
            if let Step::Panicked(message) = &step {
                tracing::debug!("a timed-out run_sync closure panicked: {message}");
            }
            step = Step::TimedOut(limit);
        }
    }
    if matches!(step, Step::Done(_)) && reason.is_some() {
        // Nobody will see the result: the work must not be committed.
        let _ = rollback_all(slot.conn_mut());
    } else if matches!(step, Step::Done(_)) && commit {
        op.committing.store(true, Ordering::Release);
        if let Err(e) = slot.commit() {
            step = Step::Commit(e);
        }
    }
    if matches!(step, Step::Done(_)) {
        slot.mark_used();
    } else {
        slot.recover();
    }
    go_home(home, slot);
    drop(entered);
    op.obs.ran(begun);
    (step, done)
}

/// The blocking task's work for one operation: nothing if it was cancelled
/// while queued; else `BEGIN` if needed with the statement `timeout`, and
/// the user's closure, with the watch told when they run (the only time a
/// statement may be cancelled: cancelling `BEGIN` loses no work).
fn run_operation<C, R, E, F>(
    slot: &mut Slot<C>,
    timeout: Option<Duration>,
    needs_begin: bool,
    watch: &OpWatch,
    f: F,
) -> Step<R, E>
where
    C: PoolableConnection,
    F: FnOnce(&mut C) -> Result<R, E>,
{
    if !watch.enter() {
        // Cancelled while queued: nothing of it runs.
        return Step::Skipped;
    }
    if let Err(e) = slot.begin_and_limit(timeout, needs_begin) {
        leave(watch, slot);
        return if needs_begin {
            Step::Begin(e)
        } else {
            Step::Setup(e)
        };
    }
    let outcome = catch_unwind(AssertUnwindSafe(|| f(slot.conn_mut())));
    leave(watch, slot);
    let conn = slot.conn_mut();
    match outcome {
        // A savepoint left open (or the transaction ended) by the
        // closure would make COMMIT release only the savepoint.
        Ok(Ok(_)) if transaction_depth(conn) != 1 => Step::Unbalanced(transaction_depth(conn)),
        Ok(Ok(value)) => Step::Done(value),
        Ok(Err(e)) => Step::Failed(e),
        Err(payload) => Step::Panicked(panic_message(payload.as_ref())),
    }
}

/// Tells the watch the operation's statements are over; a cancel still on
/// its way then has the connection closed after the operation.
fn leave<C: PoolableConnection>(watch: &OpWatch, slot: &Slot<C>) {
    if watch.leave(slot.is_retiring()) {
        slot.retire_after(RetireReason::CancelInFlight);
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into())
}

/// One call with a deadline of its own: what [`AsyncSession::with_timeout`]
/// returns.
#[must_use = "call run_sync or run_sync_and_commit on it"]
pub struct WithTimeout<'a, C: PoolableConnection> {
    session: &'a mut AsyncSession<C>,
    timeout: Duration,
}

impl<C: PoolableConnection> std::fmt::Debug for WithTimeout<'_, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WithTimeout")
            .field("session", &self.session)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl<C: PoolableConnection> WithTimeout<'_, C> {
    /// [`AsyncSession::run_sync`] with this deadline.
    pub fn run_sync<R, E, F>(self, f: F) -> impl Future<Output = Result<R, E>>
    where
        F: FnOnce(&mut C) -> Result<R, E> + Send + 'static,
        R: Send + 'static,
        E: From<Error> + Send + 'static,
    {
        AsyncSession::run_sync_then(
            SessionOf::Borrowed(self.session),
            f,
            false,
            Some(self.timeout),
            Op::RunSync,
        )
    }

    /// [`AsyncSession::run_sync_and_commit`] with this deadline.
    pub fn run_sync_and_commit<R, E, F>(self, f: F) -> impl Future<Output = Result<R, E>>
    where
        F: FnOnce(&mut C) -> Result<R, E> + Send + 'static,
        R: Send + 'static,
        E: From<Error> + Send + 'static,
    {
        AsyncSession::run_sync_then(
            SessionOf::Borrowed(self.session),
            f,
            true,
            Some(self.timeout),
            Op::RunSyncAndCommit,
        )
    }
}

/// Whether `tokio::task::block_in_place` may run here: on a multi-threaded
/// runtime (it panics on a current-thread one).
fn can_run_inline() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
}
