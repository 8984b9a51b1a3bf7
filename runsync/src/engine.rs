//! The engine: a URL, options and a bb8 pool of synchronous connections.

use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::connection::Instrumentation;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::error::Error;
use crate::manager::{
    Access, ConnectErrorSink, LastConnectError, Manager, PoolableConnection, Slot,
};
use crate::observe::{Observe, PoolEvent, PoolEventHook};
use crate::session::AsyncSession;
use crate::url::DatabaseUrl;

mod dispatch;
pub(crate) use dispatch::Unit;

/// A pooled connection checked out of an engine, with its turn at the gate.
///
/// Fields drop in order: the connection goes back to the pool first, then
/// the permit lets the next waiting checkout in, which finds it idle.
pub(crate) struct Pooled<C: PoolableConnection> {
    inner: bb8::PooledConnection<'static, Manager<C>>,
    _turn: OwnedSemaphorePermit,
    /// The engine's telemetry and when the checkout ended, when pool
    /// changes are reported (metrics compiled in, or a pool event hook).
    /// Boxed: a pointer's width when nothing is reported, as `Pooled` is
    /// moved several times per operation.
    checked_out: Option<Box<(Arc<Observe>, Option<Instant>)>>,
}

impl<C: PoolableConnection> Drop for Pooled<C> {
    fn drop(&mut self) {
        if let Some(checked_out) = self.checked_out.take() {
            let (observe, since) = *checked_out;
            observe.checked_in(since);
        }
    }
}

impl<C: PoolableConnection> Deref for Pooled<C> {
    type Target = Slot<C>;

    fn deref(&self) -> &Slot<C> {
        &self.inner
    }
}

impl<C: PoolableConnection> DerefMut for Pooled<C> {
    fn deref_mut(&mut self) -> &mut Slot<C> {
        &mut self.inner
    }
}

/// How an [`Engine`] pools and reports.
///
/// Start from [`EngineOptions::default()`] and change what you need:
///
/// ```
/// # use std::time::Duration;
/// let options = diesel_runsync::EngineOptions::default()
///     .max_size(4)
///     .connection_timeout(Duration::from_secs(5));
/// assert_eq!(options.max_size, 4);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EngineOptions {
    /// Your Diesel instrumentation for each new connection
    /// ([`EngineOptions::instrumentation`]).
    user_instrumentation: Option<InstrumentationFactory>,
    /// Most connections open at once (SQLite `:memory:` is always 1).
    pub max_size: u32,
    /// How long a checkout waits for a free connection before
    /// [`Error::PoolTimeout`].
    pub connection_timeout: Duration,
    /// Report every statement at `INFO` on [`crate::SQL_TARGET`] (else `DEBUG`).
    pub echo: bool,
    /// A connection idle longer than this is pinged (`SELECT 1`) when
    /// checked out; one used more recently is handed out unchecked.
    pub ping_after: Duration,
    /// Idle connections are closed after this long (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// Connections are replaced after this long (`None`: never).
    pub max_lifetime: Option<Duration>,
    /// The default deadline of each `run_sync` call (`None`: none). When it
    /// passes, the running statement is cancelled on the server and the
    /// call returns [`Error::Timeout`]. PostgreSQL and MariaDB/MySQL also
    /// enforce it per statement on the server (`statement_timeout`,
    /// `max_statement_time` / `MAX_EXECUTION_TIME`); a statement the server
    /// stops there is [`Error::Timeout`] too. A session can change it
    /// for itself ([`AsyncSession::set_statement_timeout`]) or for one call
    /// ([`AsyncSession::with_timeout`]).
    pub statement_timeout: Option<Duration>,
    /// Connections for reads only: any node will do (a standby included).
    /// Off (the default), the engine is read-write: a connection whose
    /// server turned read-only (a demoted primary, a standby,
    /// `default_transaction_read_only`) is refused when opened or checked
    /// and retired after a 25006, so the pool moves to a writable node. A
    /// PostgreSQL URL with `target_session_attrs=read-only`, `standby` or
    /// `prefer-standby` makes the engine read-only too.
    pub read_only: bool,
    /// A transaction-mode pooler (PgBouncer) between the engine and the
    /// PostgreSQL server: `Some(true)` turns Diesel's prepared statement
    /// cache off and server-side cancel off (a backend pid names whichever
    /// client holds that server connection now); `Some(false)` keeps both;
    /// `None` (the default) takes the URL's `pgbouncer=true|false`, else
    /// detects a proxy per connection (the server's port is not one the
    /// URL names) and then does as for `Some(true)`.
    pub transaction_pooler: Option<bool>,
    /// The pool's name in spans and metrics (`db.client.connection.pool.name`),
    /// telling several engines of one process apart. `None` (the default):
    /// `address:port/database` from the URL (SQLite: the file path), which
    /// never includes the user or password.
    pub pool_name: Option<String>,
    /// Statements slower than this are logged at `WARN` on
    /// [`crate::SQL_TARGET`] with their duration and SQL (never their bind
    /// values), whether or not the echo is on (`None`, the default: never).
    pub slow_statement_threshold: Option<Duration>,
    /// Your hook for pool events ([`EngineOptions::on_pool_event`]).
    pool_events: Option<PoolEventHooks>,
    /// Off by default: run each `run_sync` call (and [`Engine::transaction`])
    /// that has no deadline on the calling task's own thread
    /// (`tokio::task::block_in_place`, on a multi-threaded runtime; the
    /// runtime moves its other tasks to another thread meanwhile) instead of
    /// hopping to tokio's blocking pool and back. A short unit then costs
    /// no two cross-thread wake-ups (at 8 tasks, in BENCHMARKS.md's load
    /// table: about 4x the throughput on SQLite, 1.1x on MariaDB, 1.4x on
    /// PostgreSQL). The
    /// price: such a call cannot be cut short by dropping its future
    /// (nothing can drop it while it runs; its statement is not cancelled on
    /// the server): it runs to its end, and `Engine::transaction` commits,
    /// before a drop takes effect; a hung server holds the calling thread.
    /// Calls with a deadline, and calls on a current-thread runtime, keep
    /// the hop and every promise of the guide on failures; so does an
    /// `Engine::transaction` that finds every connection busy: it waits in
    /// the engine's queue as without this option.
    pub run_inline: bool,
}

/// The user's pool event hook.
#[derive(Clone)]
struct PoolEventHooks(PoolEventHook);

impl std::fmt::Debug for PoolEventHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PoolEventHook")
    }
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            user_instrumentation: None,
            max_size: 8,
            connection_timeout: Duration::from_secs(30),
            echo: false,
            ping_after: Duration::from_secs(1),
            idle_timeout: Some(Duration::from_secs(600)),
            max_lifetime: Some(Duration::from_secs(1800)),
            statement_timeout: None,
            read_only: false,
            transaction_pooler: None,
            pool_name: None,
            slow_statement_threshold: None,
            pool_events: None,
            run_inline: false,
        }
    }
}

impl EngineOptions {
    /// Sets [`max_size`](Self::max_size): most connections open at once.
    #[must_use]
    pub fn max_size(mut self, max_size: u32) -> Self {
        self.max_size = max_size;
        self
    }

    /// Sets [`connection_timeout`](Self::connection_timeout): how long a
    /// checkout waits for a free connection.
    #[must_use]
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// Sets [`echo`](Self::echo): report statements at `INFO`.
    #[must_use]
    pub fn echo(mut self, echo: bool) -> Self {
        self.echo = echo;
        self
    }

    /// Sets [`ping_after`](Self::ping_after): idle time after which a
    /// checkout pings the connection first.
    #[must_use]
    pub fn ping_after(mut self, after: Duration) -> Self {
        self.ping_after = after;
        self
    }

    /// Sets [`idle_timeout`](Self::idle_timeout) (`None`: never close idle connections).
    #[must_use]
    pub fn idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Sets [`max_lifetime`](Self::max_lifetime) (`None`: never replace connections).
    #[must_use]
    pub fn max_lifetime(mut self, lifetime: Option<Duration>) -> Self {
        self.max_lifetime = lifetime;
        self
    }

    /// Sets [`statement_timeout`](Self::statement_timeout): the default
    /// deadline of each `run_sync` call (`None`: none).
    #[must_use]
    pub fn statement_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.statement_timeout = timeout;
        self
    }

    /// Sets [`run_inline`](Self::run_inline): calls without a deadline run
    /// on the calling task's thread, without a hop.
    #[must_use]
    pub fn run_inline(mut self, inline: bool) -> Self {
        self.run_inline = inline;
        self
    }

    /// Sets [`read_only`](Self::read_only): an engine for reads, on any node.
    #[must_use]
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Sets [`transaction_pooler`](Self::transaction_pooler): whether a
    /// transaction-mode pooler (PgBouncer) sits in front of the server.
    #[must_use]
    pub fn transaction_pooler(mut self, pooler: bool) -> Self {
        self.transaction_pooler = Some(pooler);
        self
    }

    /// Sets [`pool_name`](Self::pool_name): the pool's name in spans and
    /// metrics (`db.client.connection.pool.name`).
    #[must_use]
    pub fn pool_name(mut self, name: impl Into<String>) -> Self {
        self.pool_name = Some(name.into());
        self
    }

    /// Sets [`slow_statement_threshold`](Self::slow_statement_threshold):
    /// statements slower than this are logged at `WARN` (`None`: never).
    #[must_use]
    pub fn slow_statement_threshold(mut self, threshold: Option<Duration>) -> Self {
        self.slow_statement_threshold = threshold;
        self
    }

    /// Calls `hook` with each [`PoolEvent`] of the engine's pool: a
    /// connection opened, checked out, checked in, retired (with its
    /// [`RetireReason`](crate::RetireReason)). It runs inline, on the
    /// thread where the event happens (an async worker or a blocking
    /// thread): keep it short and never block in it.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicU64, Ordering};
    /// use diesel_runsync::PoolEvent;
    ///
    /// let checkouts = Arc::new(AtomicU64::new(0));
    /// let counted = checkouts.clone();
    /// let options = diesel_runsync::EngineOptions::default().on_pool_event(move |event| {
    ///     if event == PoolEvent::Checkout {
    ///         counted.fetch_add(1, Ordering::Relaxed);
    ///     }
    /// });
    /// ```
    #[must_use]
    pub fn on_pool_event(mut self, hook: impl Fn(PoolEvent) + Send + Sync + 'static) -> Self {
        self.pool_events = Some(PoolEventHooks(Arc::new(hook)));
        self
    }

    /// Installs a Diesel [`Instrumentation`] of yours (metrics, spans) on
    /// every connection the engine opens: `make` is called once per new
    /// connection. Diesel keeps one instrumentation per connection, and the
    /// engine needs its own (the SQL echo, and the checks that refuse a
    /// `COMMIT` after a lost transaction and retire an interrupted MySQL
    /// connection), so it hands every event on to yours after it. Calling
    /// `set_instrumentation` inside a closure instead would replace the
    /// engine's and turn those checks off.
    ///
    /// ```
    /// use diesel::connection::{Instrumentation, InstrumentationEvent};
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicU64, Ordering};
    ///
    /// struct Count(Arc<AtomicU64>);
    /// impl Instrumentation for Count {
    ///     fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
    ///         if let InstrumentationEvent::StartQuery { .. } = event {
    ///             self.0.fetch_add(1, Ordering::Relaxed);
    ///         }
    ///     }
    /// }
    ///
    /// let statements = Arc::new(AtomicU64::new(0));
    /// let counter = statements.clone();
    /// let options = diesel_runsync::EngineOptions::default()
    ///     .instrumentation(move || Count(counter.clone()));
    /// ```
    #[must_use]
    pub fn instrumentation<I: Instrumentation>(
        mut self,
        make: impl Fn() -> I + Send + Sync + 'static,
    ) -> Self {
        self.user_instrumentation = Some(InstrumentationFactory(Arc::new(move || {
            Box::new(make()) as Box<dyn Instrumentation>
        })));
        self
    }
}

/// Makes the user's instrumentation for a new connection.
#[derive(Clone)]
pub(crate) struct InstrumentationFactory(Arc<dyn Fn() -> Box<dyn Instrumentation> + Send + Sync>);

impl InstrumentationFactory {
    /// One instrumentation, for one new connection.
    pub(crate) fn make(&self) -> Box<dyn Instrumentation> {
        (self.0)()
    }
}

impl std::fmt::Debug for InstrumentationFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InstrumentationFactory")
    }
}

/// Connection counts of an engine's pool, for health checks and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStatus {
    /// Connections open (idle or checked out).
    pub connections: u32,
    /// Connections idle in the pool.
    pub idle: u32,
}

/// A pool of synchronous Diesel connections of type `C`, and the factory of
/// [`AsyncSession`]s over it. Cheap to clone (one reference count); clones
/// share the pool.
pub struct Engine<C: PoolableConnection> {
    shared: Arc<Shared<C>>,
}

/// What an [`Engine`]'s clones share. Behind one `Arc`: every
/// `Engine::transaction` clones its engine, and a session's futures carry
/// it whole.
struct Shared<C: PoolableConnection> {
    pool: bb8::Pool<Manager<C>>,
    url: DatabaseUrl,
    connection_timeout: Duration,
    statement_timeout: Option<Duration>,
    connect_errors: watch::Sender<LastConnectError>,
    /// Spans, metrics and pool events: what they say of this engine.
    observe: Arc<Observe>,
    /// One permit per pooled connection, handed out first come, first
    /// served: bb8 alone lets a task that just returned a connection take it
    /// again ahead of tasks already waiting, starving them under load.
    gate: Arc<Semaphore>,
    /// [`EngineOptions::run_inline`].
    inline: bool,
    /// `Engine::transaction` units waiting for a connection (the
    /// `dispatch` module).
    units: dispatch::Queue<C>,
    /// Checkouts waiting at the gate (sessions, `run_inline` calls): while
    /// one waits, a blocking thread that finishes a unit returns its
    /// connection instead of taking the next queued unit.
    waiting_checkouts: std::sync::atomic::AtomicUsize,
}

impl<C: PoolableConnection> Clone for Engine<C> {
    fn clone(&self) -> Self {
        Engine {
            shared: self.shared.clone(),
        }
    }
}

impl<C: PoolableConnection> std::fmt::Debug for Engine<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("url", &self.shared.url)
            .field("pool", &self.status())
            .finish()
    }
}

impl<C: PoolableConnection> Engine<C> {
    /// Builds the pool for `url` and opens its first connection, so a bad
    /// URL, an unreachable server or wrong credentials fail here.
    ///
    /// Must be called inside a tokio runtime (multi-thread or current-thread).
    pub async fn connect(url: &str, options: EngineOptions) -> Result<Self, Error> {
        let url = DatabaseUrl::parse(url)?.with_transaction_pooler(options.transaction_pooler);
        let access = if options.read_only || url.prefers_read_only() {
            Access::ReadOnly
        } else {
            Access::ReadWrite
        };
        let mut options = options;
        if url.is_sqlite_memory() {
            // Each SQLite :memory: connection is its own database: keep one, forever.
            options.max_size = 1;
            options.idle_timeout = None;
            options.max_lifetime = None;
        }
        let (connect_errors, _) = watch::channel(None);
        let max_size = options.max_size.max(1);
        let observe = Arc::new(Observe::new(
            &url,
            options.pool_name.as_deref(),
            max_size,
            options.pool_events.as_ref().map(|hooks| hooks.0.clone()),
        ));
        let manager = Manager {
            url: url.clone(),
            hosts: url.hosts(),
            next_host: Default::default(),
            echo: options.echo,
            user_instrumentation: options.user_instrumentation.clone(),
            ping_after: options.ping_after,
            statement_timeout: options.statement_timeout,
            access,
            backoff: Default::default(),
            observe: observe.clone(),
            slow_statement_threshold: options.slow_statement_threshold,
            _conn: PhantomData,
        };
        let pool = bb8::Pool::builder()
            .max_size(max_size)
            .connection_timeout(options.connection_timeout)
            .idle_timeout(options.idle_timeout)
            .max_lifetime(options.max_lifetime)
            .retry_connection(false)
            .error_sink(Box::new(ConnectErrorSink(connect_errors.clone())))
            .build_unchecked(manager);
        let engine = Engine {
            shared: Arc::new(Shared {
                inline: options.run_inline,
                pool,
                url,
                connection_timeout: options.connection_timeout,
                statement_timeout: options.statement_timeout,
                connect_errors,
                observe,
                gate: Arc::new(Semaphore::new(max_size as usize)),
                units: dispatch::Queue::default(),
                waiting_checkouts: Default::default(),
            }),
        };
        drop(engine.checkout().await?);
        Ok(engine)
    }

    /// The engine's URL (prints without its password).
    pub fn url(&self) -> &DatabaseUrl {
        &self.shared.url
    }

    /// The pool's name in spans and metrics ([`EngineOptions::pool_name`]).
    pub fn pool_name(&self) -> &str {
        self.shared.observe.pool_name()
    }

    /// This engine's telemetry.
    pub(crate) fn observe(&self) -> &Arc<Observe> {
        &self.shared.observe
    }

    /// Whether calls without a deadline run on the caller's thread
    /// ([`EngineOptions::run_inline`]).
    pub(crate) fn runs_inline(&self) -> bool {
        self.shared.inline
    }

    /// How long a checkout waits for a connection
    /// ([`EngineOptions::connection_timeout`]).
    pub(crate) fn connection_timeout(&self) -> Duration {
        self.shared.connection_timeout
    }

    /// The default deadline of `run_sync` calls
    /// ([`EngineOptions::statement_timeout`]).
    pub fn statement_timeout(&self) -> Option<Duration> {
        self.shared.statement_timeout
    }

    /// A new session; it checks a connection out when first used.
    #[must_use = "a session does nothing until used"]
    pub fn session(&self) -> AsyncSession<C> {
        AsyncSession::new(self.clone())
    }

    /// A session holding a connection, with a transaction begun: the
    /// counterpart of SQLAlchemy's `engine.begin()`. Commit it with
    /// [`AsyncSession::commit`]; dropping it uncommitted rolls back.
    #[must_use = "dropping the session at once rolls its transaction back"]
    pub async fn begin(&self) -> Result<AsyncSession<C>, Error> {
        let mut session = self.session();
        session.begin()?;
        session.hold(self.checkout().await?);
        Ok(session)
    }

    /// Runs `f` in a transaction of its own and **commits** it when `f`
    /// returns `Ok`, in one blocking hop: `BEGIN`, `f`, `COMMIT` (a fresh
    /// session's [`AsyncSession::run_sync_and_commit`]). An error or panic in
    /// `f` rolls it back and is returned. Unlike [`AsyncSession::run_sync`],
    /// nothing is left for a later `commit()`.
    ///
    /// When every connection is busy, the unit waits in the engine's queue
    /// (first come, first served), and the blocking thread that finishes a
    /// unit runs the next one with the connection it holds: no checkout and
    /// no hop between them. A unit dropped, or out of time (its deadline,
    /// the connection timeout), while it waits never runs; sessions waiting
    /// for a connection are served in their turn.
    pub fn transaction<R, E, F>(&self, f: F) -> impl Future<Output = Result<R, E>>
    where
        F: FnOnce(&mut C) -> Result<R, E> + Send + 'static,
        R: Send + 'static,
        E: From<Error> + Send + 'static,
    {
        // The operation's own future, with no `async` layer of this function's.
        AsyncSession::run_sync_then(
            crate::session::SessionOf::Fresh(self),
            f,
            true,
            self.shared.statement_timeout,
            crate::observe::Op::Transaction,
        )
    }

    /// Connection counts of the pool.
    pub fn status(&self) -> PoolStatus {
        let state = self.shared.pool.state();
        PoolStatus {
            connections: state.connections,
            idle: state.idle_connections,
        }
    }

    /// Checks a connection out: waits its turn (first come, first served),
    /// then takes an idle connection or opens one, failing at once if
    /// opening one fails, and with [`Error::PoolTimeout`] after the
    /// connection timeout in all.
    pub(crate) fn checkout(&self) -> impl Future<Output = Result<Pooled<C>, Error>> + '_ {
        self.checkout_with(None)
    }

    /// [`checkout`](Self::checkout), with the `turn` at the gate already
    /// taken when given.
    pub(crate) async fn checkout_with(
        &self,
        turn: Option<OwnedSemaphorePermit>,
    ) -> Result<Pooled<C>, Error> {
        let watch = self.shared.observe.checkout_started();
        let timeout = self.shared.connection_timeout;
        // One `async` layer for the whole checkout, and the connection
        // handed out as built: each layer or move copies it once more.
        tokio::time::timeout(timeout, async {
            let turn = match turn {
                Some(turn) => turn,
                None => {
                    let _waiting = WaitingCheckout::new(&self.shared.waiting_checkouts);
                    self.shared
                        .gate
                        .clone()
                        .acquire_owned()
                        .await
                        .map_err(|_| Error::ConnectionLost)?
                }
            };
            let mut failures = self.shared.connect_errors.subscribe();
            let inner = tokio::select! {
                biased;
                got = self.shared.pool.get_owned() => got.map_err(|e| match e {
                    bb8::RunError::User(e) => e,
                    bb8::RunError::TimedOut => Error::PoolTimeout(timeout),
                })?,
                Ok(()) = failures.changed() => {
                    let last = failures.borrow_and_update().clone();
                    return Err(match last {
                        Some(failure) => Error::Connect {
                            url: failure.0.clone(),
                            message: failure.1.clone(),
                        },
                        None => Error::ConnectionLost,
                    });
                }
            };
            watch.ended(Ok(()));
            // For `db.client.connection.use_time`, and the checkin.
            let checked_out = watch.watched().then(|| {
                let since = cfg!(feature = "metrics").then(Instant::now);
                Box::new((self.shared.observe.clone(), since))
            });
            Ok(Pooled {
                inner,
                _turn: turn,
                checked_out,
            })
        })
        .await
        .unwrap_or(Err(Error::PoolTimeout(timeout)))
        .inspect_err(|e| watch.ended(Err(e)))
    }
}

/// Counts a checkout waiting at the gate while it lives.
struct WaitingCheckout<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> WaitingCheckout<'a> {
    fn new(count: &'a std::sync::atomic::AtomicUsize) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        WaitingCheckout(count)
    }
}

impl Drop for WaitingCheckout<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}
