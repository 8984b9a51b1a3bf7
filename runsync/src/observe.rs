//! Observability: one `tracing` span per operation, metrics through the
//! `metrics` facade (cargo feature `metrics`), pool events, and the names
//! they use, after OpenTelemetry's database conventions so that exporters
//! need no mapping.
//!
//! # Spans
//!
//! Every operation opens one span at `INFO` on the target
//! [`SPAN_TARGET`] (`diesel_runsync`), a child of the span current where
//! the operation was called; the blocking task enters it, so your own spans
//! and the SQL echo (target [`SQL_TARGET`](crate::SQL_TARGET)) inside the
//! closure nest under it. Filter them with the target, e.g.
//! `RUST_LOG=info,diesel_runsync=warn` hides them.
//!
//! | span | operation |
//! |---|---|
//! | `db.run_sync` | [`AsyncSession::run_sync`](crate::AsyncSession::run_sync) |
//! | `db.run_sync_and_commit` | [`AsyncSession::run_sync_and_commit`](crate::AsyncSession::run_sync_and_commit) |
//! | `db.transaction` | [`Engine::transaction`](crate::Engine::transaction) (and each attempt of `transaction_with_retry`) |
//! | `db.stream` | [`AsyncSession::stream`](crate::AsyncSession::stream), `into_stream`, `stream_query`: open until the stream ends |
//! | `db.commit` | [`AsyncSession::commit`](crate::AsyncSession::commit), `commit_and_locate` |
//! | `db.rollback` | [`AsyncSession::rollback`](crate::AsyncSession::rollback) when a transaction is open |
//! | `db.transaction_with_retry` | [`Engine::transaction_with_retry`](crate::Engine::transaction_with_retry): the attempts' `db.transaction` spans and one `retry` event per retry |
//!
//! Their fields:
//!
//! | field | value |
//! |---|---|
//! | `otel.kind` | `client` |
//! | `db.system.name` | `postgresql`, `mysql` or `sqlite` |
//! | `db.namespace` | the database name in the URL (SQLite: the file path) |
//! | `db.operation.name` | `run_sync`, `run_sync_and_commit`, `transaction`, `stream`, `commit`, `rollback`, `transaction_with_retry` |
//! | `db.client.connection.pool.name` | [`EngineOptions::pool_name`](crate::EngineOptions::pool_name) |
//! | `server.address`, `server.port` | the URL's first host and its port (not for SQLite) |
//! | `db.runsync.pool_wait_ms` | waiting for a pooled connection (0 when the session held one; an `Engine::transaction` unit queued for a busy engine: until a connection took it) |
//! | `db.runsync.queue_wait_ms` | waiting in tokio's blocking queue, from `spawn_blocking` to the task starting (0 for a unit a serving thread took from the engine's queue) |
//! | `db.runsync.run_ms` | the blocking task's work: `BEGIN`, your closure, `COMMIT` |
//! | `error.type` | on failure: see below |
//! | `otel.status_code` | `error` on failure |
//!
//! The statements themselves are the SQL echo's events inside the span:
//! each carries `db.query.text` (the SQL Diesel sent, never its bind
//! values) and `db.runsync.duration_ms`; the echo's message also shows the
//! bind values, as Diesel's query display does. The echo goes out at
//! `DEBUG` (`INFO` with [`EngineOptions::echo`](crate::EngineOptions::echo)).
//! No span field, metric label or log line carries a password: the URL's
//! parts are taken apart from its user information.
//!
//! `error.type` is low in cardinality: for Diesel errors
//! `serialization_failure`, `deadlock`, `lock_timeout`, `database_locked`,
//! `unique_violation`, `foreign_key_violation`, `not_null_violation`,
//! `check_violation`, `read_only`, `connection_lost`, `not_found`,
//! `database_error`, ...; for this crate's [`Error`] `pool_timeout`,
//! `timeout`, `panic`, `commit_outcome_unknown`, `pending_rollback`,
//! `connect`, ...; `cancelled` for an operation whose future was dropped;
//! for any other error type, its Rust type name.
//!
//! A `transaction_with_retry` retry is an `INFO` event `retry` with
//! `attempt`, `error.type`, `db.response.status_code` (the SQLSTATE class,
//! where known: `40` for serialization failures and deadlocks, `08` for a
//! lost connection, `25` read-only, `23` integrity, `57` operator
//! intervention) and `db.runsync.retry_delay_ms`.
//!
//! With no subscriber (or one that turns the target off) a span costs a
//! branch: nothing is measured, formatted or allocated.
//!
//! # Metrics (feature `metrics`)
//!
//! Recorded through the [`metrics`](https://docs.rs/metrics) facade: the
//! application installs the recorder (Prometheus, OpenTelemetry, ...).
//! Each engine registers its handles in [`Engine::connect`](crate::Engine::connect),
//! so **install the recorder before connecting**. Every metric carries
//! `db.client.connection.pool.name`; times are in seconds.
//!
//! | metric | kind | labels | what |
//! |---|---|---|---|
//! | `db.client.operation.duration` | histogram | `db.system.name`, `db.operation.name`, `error.type` on failure | each operation of the span table, end to end |
//! | `db.client.connection.count` | gauge | `db.client.connection.state` = `idle`/`used` | connections open |
//! | `db.client.connection.max` | gauge | | the pool's size |
//! | `db.client.connection.pending_requests` | gauge | | checkouts waiting for a connection, and `Engine::transaction` units queued for one |
//! | `db.client.connection.timeouts` | counter | | checkouts (and queued units) that timed out ([`Error::PoolTimeout`]) |
//! | `db.client.connection.create_time` | histogram | | opening a connection (and its set-up) |
//! | `db.client.connection.wait_time` | histogram | | a checkout's wait (a queued unit's: until a connection took it) |
//! | `db.client.connection.use_time` | histogram | | from checkout to checkin |
//! | `db.runsync.queue_wait` | histogram | | tokio's blocking queue: spawn to start |
//! | `db.runsync.cancels` | counter | | server-side cancels sent (`pg_cancel_backend`, `KILL QUERY`, `sqlite3_interrupt`) |
//! | `db.runsync.terminates` | counter | | connections terminated (`pg_terminate_backend`, `KILL CONNECTION`) |
//! | `db.runsync.retries` | counter | `error.type`, `db.response.status_code` where known | `transaction_with_retry` retries |
//! | `db.runsync.connections.retired` | counter | `reason` ([`RetireReason`]) | connections closed instead of pooled again |
//! | `db.runsync.commits_refused` | counter | | `COMMIT`s refused after a statement lost the transaction |
//! | `db.runsync.deadlines` | counter | | deadlines hit (statement timeouts of the session or call) |
//!
//! Without a recorder the handles are no-ops: an operation reads the clock
//! a few times and allocates nothing, takes no lock. A failure builds its
//! `error.type` label (an allocation, on the failure path only).
//!
//! # Pool events
//!
//! [`EngineOptions::on_pool_event`](crate::EngineOptions::on_pool_event)
//! calls your hook with each [`PoolEvent`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::Span;

use crate::error::Error;
use crate::url::{Backend, DatabaseUrl};

/// Awaits a future inside a span, or as it is when the span is disabled
/// (no subscriber listens): `in_span!(&span, future)`. A macro, not an
/// `async fn`, so that it adds no layer of its own around the future (each
/// layer moves the whole future once more; callgrind counted those moves).
macro_rules! in_span {
    ($span:expr, $future:expr) => {{
        let span: &tracing::Span = $span;
        let future = $future;
        if span.is_disabled() {
            future.await
        } else {
            tracing::Instrument::instrument(future, span.clone()).await
        }
    }};
}
pub(crate) use in_span;

/// The `tracing` target of operation spans and retry events.
pub const SPAN_TARGET: &str = "diesel_runsync";

/// Why the engine closed a connection instead of pooling it again
/// (`db.runsync.connections.retired`'s `reason`, [`PoolEvent::Retire`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[repr(u8)]
pub enum RetireReason {
    /// Its server turned read-only, for a read-write engine (a demoted
    /// primary, a standby).
    ReadOnly = 1,
    /// The connection broke, was terminated, or its server shuts down.
    ConnectionLost = 2,
    /// A MySQL/MariaDB statement of it was interrupted (its cached
    /// prepared statement would hang).
    Interrupted = 3,
    /// Its Galera node does not serve (not `wsrep_ready`).
    WsrepNotReady = 4,
    /// It came back with a transaction open or its transaction manager broken.
    TransactionOpen = 5,
    /// Its operation did not return it by the deadline: given up.
    GivenUp = 6,
    /// It did not answer a ping after a failure, or a check at checkout.
    NotAnswering = 7,
    /// Behind a pooler, a named prepared statement of it was lost.
    PreparedStatementLost = 8,
    /// A cancel request for its operation was still on its way when the
    /// operation ended (the server answers it late): reused, the
    /// connection could have a later statement cut short.
    CancelInFlight = 9,
}

impl RetireReason {
    /// The label value: `read_only`, `connection_lost`, `interrupted`,
    /// `wsrep_not_ready`, `transaction_open`, `given_up`, `not_answering`,
    /// `prepared_statement_lost`, `cancel_in_flight`.
    pub fn as_str(self) -> &'static str {
        match self {
            RetireReason::ReadOnly => "read_only",
            RetireReason::ConnectionLost => "connection_lost",
            RetireReason::Interrupted => "interrupted",
            RetireReason::WsrepNotReady => "wsrep_not_ready",
            RetireReason::TransactionOpen => "transaction_open",
            RetireReason::GivenUp => "given_up",
            RetireReason::NotAnswering => "not_answering",
            RetireReason::PreparedStatementLost => "prepared_statement_lost",
            RetireReason::CancelInFlight => "cancel_in_flight",
        }
    }

    const ALL: [RetireReason; 9] = [
        RetireReason::ReadOnly,
        RetireReason::ConnectionLost,
        RetireReason::Interrupted,
        RetireReason::WsrepNotReady,
        RetireReason::TransactionOpen,
        RetireReason::GivenUp,
        RetireReason::NotAnswering,
        RetireReason::PreparedStatementLost,
        RetireReason::CancelInFlight,
    ];

    /// The reason stored as `code` (0: none).
    pub(crate) fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|r| *r as u8 == code)
    }

    /// The reason a failed statement retires its connection for, from
    /// `error::failover_error`'s answer.
    pub(crate) fn from_failover(kind: &str) -> Self {
        match kind {
            "read-only" => RetireReason::ReadOnly,
            "prepared statement lost" => RetireReason::PreparedStatementLost,
            _ => RetireReason::ConnectionLost,
        }
    }
}

impl std::fmt::Display for RetireReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happened in an engine's pool: what
/// [`EngineOptions::on_pool_event`](crate::EngineOptions::on_pool_event)'s
/// hook receives (SQLAlchemy's pool events).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PoolEvent {
    /// A new connection was opened (and set up).
    Connect,
    /// A connection was checked out.
    Checkout,
    /// A connection was checked back in (the pool may still refuse it:
    /// then [`PoolEvent::Retire`] follows).
    Checkin,
    /// A connection was closed instead of pooled again.
    Retire(RetireReason),
}

/// A hook for [`PoolEvent`]s.
pub(crate) type PoolEventHook = Arc<dyn Fn(PoolEvent) + Send + Sync>;

/// An operation, as `db.operation.name` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    RunSync,
    RunSyncAndCommit,
    Transaction,
    Stream,
    Commit,
    Rollback,
}

impl Op {
    #[cfg(feature = "metrics")]
    const COUNT: usize = 6;

    fn name(self) -> &'static str {
        match self {
            Op::RunSync => "run_sync",
            Op::RunSyncAndCommit => "run_sync_and_commit",
            Op::Transaction => "transaction",
            Op::Stream => "stream",
            Op::Commit => "commit",
            Op::Rollback => "rollback",
        }
    }
}

/// The OpenTelemetry `db.system.name` of a backend.
fn system_name(backend: Backend) -> &'static str {
    match backend {
        Backend::Postgres => "postgresql",
        Backend::Mysql => "mysql",
        Backend::Sqlite => "sqlite",
    }
}

/// One engine's telemetry: what its spans and metrics say of it, computed
/// once in `Engine::connect`, and its metric handles.
pub(crate) struct Observe {
    system: &'static str,
    namespace: Option<Box<str>>,
    address: Option<Box<str>>,
    port: Option<u16>,
    pool_name: Arc<str>,
    hook: Option<PoolEventHook>,
    #[cfg(feature = "metrics")]
    metrics: metered::Metrics,
}

impl std::fmt::Debug for Observe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observe")
            .field("system", &self.system)
            .field("pool_name", &self.pool_name)
            .finish_non_exhaustive()
    }
}

/// Milliseconds, for span fields.
fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

macro_rules! op_span {
    ($name:literal, $op:expr, $o:expr) => {
        tracing::info_span!(
            target: SPAN_TARGET,
            $name,
            otel.kind = "client",
            db.system.name = $o.system,
            db.namespace = $o.namespace.as_deref(),
            db.operation.name = $op,
            db.client.connection.pool.name = &*$o.pool_name,
            server.address = $o.address.as_deref(),
            server.port = $o.port.map(i64::from),
            db.runsync.pool_wait_ms = tracing::field::Empty,
            db.runsync.queue_wait_ms = tracing::field::Empty,
            db.runsync.run_ms = tracing::field::Empty,
            error.type = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        )
    };
}

impl Observe {
    /// The engine's telemetry for `url`, its pool named `pool_name` (by
    /// default `address:port/database`, SQLite: the file path).
    pub(crate) fn new(
        url: &DatabaseUrl,
        pool_name: Option<&str>,
        max_size: u32,
        hook: Option<PoolEventHook>,
    ) -> Self {
        let (address, port, namespace) = url.location();
        let pool_name: Arc<str> = match pool_name {
            Some(name) => name.into(),
            None => match (&address, port) {
                (Some(address), Some(port)) => {
                    format!("{address}:{port}/{}", namespace.as_deref().unwrap_or("")).into()
                }
                _ => namespace.clone().unwrap_or_default().into(),
            },
        };
        let system = system_name(url.backend());
        #[cfg(not(feature = "metrics"))]
        let _ = max_size;
        Observe {
            system,
            namespace: namespace.map(Into::into),
            address: address.map(Into::into),
            port,
            #[cfg(feature = "metrics")]
            metrics: metered::Metrics::new(system, &pool_name, max_size),
            pool_name,
            hook,
        }
    }

    /// The pool's name (`db.client.connection.pool.name`).
    pub(crate) fn pool_name(&self) -> &str {
        &self.pool_name
    }

    /// Whether pool changes are reported (metrics compiled in, or a hook).
    fn watches_pool(&self) -> bool {
        cfg!(feature = "metrics") || self.hook.is_some()
    }

    fn event(&self, event: PoolEvent) {
        if let Some(hook) = &self.hook {
            hook(event);
        }
    }

    /// Starts observing one operation: its span (a child of the current
    /// one) and, if anything records it, its clock.
    #[inline]
    pub(crate) fn start(self: &Arc<Self>, op: Op) -> OpObs {
        use tracing::level_filters::{LevelFilter, STATIC_MAX_LEVEL};
        if !cfg!(feature = "metrics")
            && (STATIC_MAX_LEVEL < tracing::Level::INFO
                || LevelFilter::current() < tracing::Level::INFO)
        {
            // Nothing can record this operation: no span, no clock.
            return OpObs {
                op,
                on: None,
                done: false,
            };
        }
        let span = match op {
            Op::RunSync => op_span!("db.run_sync", op.name(), self),
            Op::RunSyncAndCommit => op_span!("db.run_sync_and_commit", op.name(), self),
            Op::Transaction => op_span!("db.transaction", op.name(), self),
            Op::Stream => op_span!("db.stream", op.name(), self),
            Op::Commit => op_span!("db.commit", op.name(), self),
            Op::Rollback => op_span!("db.rollback", op.name(), self),
        };
        let observed = cfg!(feature = "metrics") || !span.is_disabled();
        OpObs {
            op,
            on: observed.then(|| {
                Box::new(Watched {
                    span,
                    started: Instant::now(),
                    observe: self.clone(),
                })
            }),
            done: false,
        }
    }

    /// The span of `Engine::transaction_with_retry`.
    pub(crate) fn retry_span(&self) -> Span {
        tracing::info_span!(
            target: SPAN_TARGET,
            "db.transaction_with_retry",
            otel.kind = "client",
            db.system.name = self.system,
            db.namespace = self.namespace.as_deref(),
            db.operation.name = "transaction_with_retry",
            db.client.connection.pool.name = &*self.pool_name,
            server.address = self.address.as_deref(),
            server.port = self.port.map(i64::from),
            db.runsync.attempts = tracing::field::Empty,
            error.type = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        )
    }

    /// A retry of `transaction_with_retry` after `error`: an event in the
    /// current (retry) span, and `db.runsync.retries`.
    pub(crate) fn retry<E: std::fmt::Display + 'static>(
        &self,
        attempt: u32,
        error: &E,
        delay: Duration,
    ) {
        let error_type = error_type_of(error);
        let status = sqlstate_class_of(error);
        tracing::info!(
            target: SPAN_TARGET,
            attempt,
            error.type = error_type,
            db.response.status_code = status,
            db.runsync.retry_delay_ms = millis(delay),
            "retry: attempt {attempt} failed ({error}), retrying in {delay:?}"
        );
        #[cfg(feature = "metrics")]
        self.metrics.retry(error_type, status);
    }

    /// A checkout begins (it ends with [`CheckoutObs::ended`], or is
    /// dropped with its future).
    #[inline]
    pub(crate) fn checkout_started(&self) -> CheckoutObs<'_> {
        #[cfg(feature = "metrics")]
        self.metrics.pending.increment(1.0);
        CheckoutObs {
            observe: self,
            since: self.watches_pool().then(Instant::now),
        }
    }

    /// A connection checked out at `since` comes back.
    pub(crate) fn checked_in(&self, since: Option<Instant>) {
        #[cfg(feature = "metrics")]
        {
            let m = &self.metrics;
            m.used.decrement(1.0);
            m.idle.increment(1.0);
            if let Some(since) = since {
                m.use_time.record(since.elapsed().as_secs_f64());
            }
        }
        let _ = since;
        self.event(PoolEvent::Checkin);
    }

    /// A connection was opened; opening it began at `since`.
    pub(crate) fn connected(&self, since: Option<Instant>) {
        #[cfg(feature = "metrics")]
        {
            self.metrics.idle.increment(1.0);
            if let Some(since) = since {
                self.metrics
                    .create_time
                    .record(since.elapsed().as_secs_f64());
            }
        }
        let _ = since;
        self.event(PoolEvent::Connect);
    }

    /// Whether opening a connection is timed.
    pub(crate) fn clock_connect(&self) -> Option<Instant> {
        self.watches_pool().then(Instant::now)
    }

    /// An open connection was closed (for whatever reason).
    pub(crate) fn closed(&self) {
        #[cfg(feature = "metrics")]
        self.metrics.idle.decrement(1.0);
    }

    /// The engine closes a connection instead of pooling it again.
    pub(crate) fn retired(&self, reason: RetireReason) {
        tracing::debug!(target: SPAN_TARGET, reason = reason.as_str(), "connection retired");
        #[cfg(feature = "metrics")]
        self.metrics.retired[reason as usize - 1].increment(1);
        self.event(PoolEvent::Retire(reason));
    }

    /// A cancel (or, `terminate`, a termination) went to the server.
    pub(crate) fn cancel_sent(&self, terminate: bool) {
        #[cfg(feature = "metrics")]
        if terminate {
            self.metrics.terminates.increment(1);
        } else {
            self.metrics.cancels.increment(1);
        }
        let _ = terminate;
    }

    /// A `COMMIT` was refused: a statement had lost the transaction.
    pub(crate) fn commit_refused(&self) {
        #[cfg(feature = "metrics")]
        self.metrics.commits_refused.increment(1);
    }

    /// `Engine::transaction` units waiting in the engine's queue for a
    /// connection changed by `change` (they count as pending requests).
    pub(crate) fn units_waiting(&self, change: f64) {
        #[cfg(feature = "metrics")]
        self.metrics.pending.increment(change);
        let _ = change;
    }

    /// A queued unit's connection timeout passed before a connection took it.
    pub(crate) fn unit_timed_out(&self) {
        #[cfg(feature = "metrics")]
        self.metrics.timeouts.increment(1);
    }

    /// An operation's deadline passed.
    pub(crate) fn deadline_hit(&self) {
        #[cfg(feature = "metrics")]
        self.metrics.deadlines.increment(1);
    }
}

/// A checkout in progress: `db.client.connection.pending_requests` counts
/// it until it is dropped.
pub(crate) struct CheckoutObs<'a> {
    observe: &'a Observe,
    since: Option<Instant>,
}

impl CheckoutObs<'_> {
    /// Whether pool changes are reported.
    pub(crate) fn watched(&self) -> bool {
        self.since.is_some()
    }

    /// The checkout ended, with a connection or not.
    #[inline]
    pub(crate) fn ended(&self, outcome: Result<(), &Error>) {
        #[cfg(feature = "metrics")]
        {
            let m = &self.observe.metrics;
            if let Some(since) = self.since {
                m.wait_time.record(since.elapsed().as_secs_f64());
            }
            match outcome {
                Ok(()) => {
                    m.idle.decrement(1.0);
                    m.used.increment(1.0);
                }
                Err(Error::PoolTimeout(_)) => m.timeouts.increment(1),
                Err(_) => {}
            }
        }
        if outcome.is_ok() {
            self.observe.event(PoolEvent::Checkout);
        }
    }
}

impl Drop for CheckoutObs<'_> {
    fn drop(&mut self) {
        #[cfg(feature = "metrics")]
        self.observe.metrics.pending.decrement(1.0);
    }
}

/// One operation being observed: its span and clock, when anything
/// records them (a subscriber listens to its span, or metrics are compiled
/// in); else nothing but the operation's name, so that the unobserved
/// path stays a few branches. Dropped unfinished (the operation's future
/// was dropped), it records `error.type = cancelled`.
pub(crate) struct OpObs {
    op: Op,
    on: Option<Box<Watched>>,
    done: bool,
}

/// What is kept of an observed operation.
struct Watched {
    span: Span,
    started: Instant,
    observe: Arc<Observe>,
}

/// The span of an unobserved operation.
fn no_span() -> &'static Span {
    static NONE: std::sync::LazyLock<Span> = std::sync::LazyLock::new(Span::none);
    &NONE
}

impl OpObs {
    /// The operation's span (await inside it with [`in_span!`]).
    pub(crate) fn span(&self) -> &Span {
        match &self.on {
            Some(on) => &on.span,
            None => no_span(),
        }
    }

    /// Enters the operation's span on this thread until the guard drops
    /// (nothing when no subscriber listens); never held across an `.await`.
    pub(crate) fn enter(&self) -> Option<tracing::span::Entered<'_>> {
        let on = self.on.as_ref()?;
        (!on.span.is_disabled()).then(|| on.span.enter())
    }

    /// The clock now, if this operation is measured.
    pub(crate) fn clock(&self) -> Option<Instant> {
        self.on.as_ref().map(|_| Instant::now())
    }

    /// The pool wait (from `since`; none when the session held its connection).
    #[inline]
    pub(crate) fn pool_waited(&self, since: Option<Instant>) {
        if let Some(on) = &self.on
            && !on.span.is_disabled()
        {
            let waited = since.map_or(0.0, |s| millis(s.elapsed()));
            on.span.record("db.runsync.pool_wait_ms", waited);
        }
    }

    /// What the blocking task needs: the span, when it was spawned (now).
    #[inline]
    pub(crate) fn for_task(&self) -> TaskObs {
        TaskObs(self.on.as_ref().map(|on| {
            Box::new(TaskWatched {
                span: on.span.clone(),
                spawned: Instant::now(),
                observe: on.observe.clone(),
            })
        }))
    }

    /// The operation ended: with `error` (its `error.type`) or not.
    #[inline]
    pub(crate) fn finish(mut self, error: Option<&'static str>) {
        self.done = true;
        self.record_end(error);
    }

    #[inline]
    fn record_end(&self, error: Option<&'static str>) {
        let Some(on) = &self.on else {
            return;
        };
        if let Some(error) = error
            && !on.span.is_disabled()
        {
            on.span.record("error.type", error);
            on.span.record("otel.status_code", "error");
        }
        #[cfg(feature = "metrics")]
        on.observe
            .metrics
            .operation(self.op, error, on.started.elapsed().as_secs_f64());
        let _ = (self.op, on.started, &on.observe);
    }
}

impl Drop for OpObs {
    fn drop(&mut self) {
        if !self.done {
            self.record_end(Some("cancelled"));
        }
    }
}

/// The blocking task's part of an operation's observation (nothing when
/// the operation is not observed). It travels in the operation's shared
/// state, not in the blocking closure: a larger closure costs a larger
/// copy at each of tokio's moves of the task.
pub(crate) struct TaskObs(Option<Box<TaskWatched>>);

/// What the blocking task keeps of an observed operation.
struct TaskWatched {
    span: Span,
    spawned: Instant,
    observe: Arc<Observe>,
}

impl TaskObs {
    /// The blocking task started: records the queue wait, and returns the
    /// clock for [`ran`](Self::ran) (if this operation is measured).
    #[inline]
    pub(crate) fn started(&self) -> Option<Instant> {
        let on = self.0.as_ref()?;
        let now = Instant::now();
        Some(on.started_at(now, now.saturating_duration_since(on.spawned)))
    }

    /// A unit that [`Engine::transaction`](crate::Engine::transaction)
    /// dispatched started: it waited for a connection from when it was made
    /// until it was `handed` to a blocking thread (`None`: it was taken
    /// from the engine's queue by a thread already running, so now), then
    /// for that thread. Returns the clock for [`ran`](Self::ran).
    pub(crate) fn started_handed(&self, handed: Option<Instant>) -> Option<Instant> {
        let on = self.0.as_ref()?;
        let now = Instant::now();
        let handed = handed.unwrap_or(now);
        let waited = handed.saturating_duration_since(on.spawned);
        if !on.span.is_disabled() {
            on.span.record("db.runsync.pool_wait_ms", millis(waited));
        }
        #[cfg(feature = "metrics")]
        on.observe.metrics.wait_time.record(waited.as_secs_f64());
        Some(on.started_at(now, now.saturating_duration_since(handed)))
    }
}

impl TaskWatched {
    /// Records the blocking-pool queue wait `queued` of a task started `now`.
    fn started_at(&self, now: Instant, queued: Duration) -> Instant {
        if !self.span.is_disabled() {
            self.span.record("db.runsync.queue_wait_ms", millis(queued));
        }
        #[cfg(feature = "metrics")]
        self.observe.metrics.queue_wait.record(queued.as_secs_f64());
        let _ = &self.observe;
        now
    }
}

impl TaskObs {
    /// Enters the operation's span on this thread until the guard drops
    /// (nothing when no subscriber listens).
    pub(crate) fn enter(&self) -> Option<tracing::span::Entered<'_>> {
        let on = self.0.as_ref()?;
        (!on.span.is_disabled()).then(|| on.span.enter())
    }

    /// The task's work, begun at `begun`, is over: records its run time.
    #[inline]
    pub(crate) fn ran(&self, begun: Option<Instant>) {
        if let (Some(on), Some(begun)) = (&self.0, begun)
            && !on.span.is_disabled()
        {
            on.span.record("db.runsync.run_ms", millis(begun.elapsed()));
        }
    }

    /// Runs `body` as [`started`](Self::started), [`enter`](Self::enter)
    /// and [`ran`](Self::ran) do.
    pub(crate) fn run<T>(&self, body: impl FnOnce() -> T) -> T {
        let begun = self.started();
        let value = {
            let _entered = self.enter();
            body()
        };
        self.ran(begun);
        value
    }
}

/// How an operation failed: with this crate's error (converted into the
/// caller's error type at the end), or with the closure's own.
pub(crate) enum Fail<E> {
    Ours(Error),
    Theirs(E),
}

impl<E> From<Error> for Fail<E> {
    fn from(error: Error) -> Self {
        Fail::Ours(error)
    }
}

impl<E: From<Error> + 'static> Fail<E> {
    /// The caller's error, and its `error.type`.
    pub(crate) fn typed(self) -> (E, &'static str) {
        match self {
            Fail::Ours(e) => {
                let kind = error_type(&e);
                (e.into(), kind)
            }
            Fail::Theirs(e) => {
                let kind = error_type_of(&e);
                (e, kind)
            }
        }
    }
}

/// The `error.type` of a facade error.
pub(crate) fn error_type(error: &Error) -> &'static str {
    match error {
        Error::InvalidUrl { .. } => "invalid_url",
        Error::Connect { .. } => "connect",
        Error::PoolTimeout(_) => "pool_timeout",
        Error::Database(e) => diesel_error_type(e),
        Error::Panic(_) => "panic",
        Error::PendingRollback(_) => "pending_rollback",
        Error::UnbalancedTransaction { .. } => "unbalanced_transaction",
        Error::Timeout(_) => "timeout",
        Error::CommitOutcomeUnknown(_) => "commit_outcome_unknown",
        Error::ConnectionLost => "connection_lost",
        Error::TransactionAlreadyOpen => "transaction_already_open",
        Error::RuntimeShutdown => "runtime_shutdown",
    }
}

/// The `error.type` of a Diesel error.
pub(crate) fn diesel_error_type(error: &diesel::result::Error) -> &'static str {
    use diesel::result::{DatabaseErrorKind as K, Error as D};
    match error {
        D::DatabaseError(kind, info) => {
            let message = info.message();
            match kind {
                K::UniqueViolation => "unique_violation",
                K::ForeignKeyViolation => "foreign_key_violation",
                K::NotNullViolation => "not_null_violation",
                K::CheckViolation => "check_violation",
                K::ReadOnlyTransaction => "read_only",
                K::ClosedConnection | K::UnableToSendCommand => "connection_lost",
                _ if message.contains("deadlock") || message.contains("Deadlock") => "deadlock",
                K::SerializationFailure => "serialization_failure",
                _ if message.contains("Lock wait timeout") => "lock_timeout",
                _ if message.contains("database is locked") => "database_locked",
                _ if message.contains("could not serialize") => "serialization_failure",
                _ => match crate::error::failover_error(error) {
                    Some("read-only") => "read_only",
                    Some("prepared statement lost") => "prepared_statement_lost",
                    Some(_) => "connection_lost",
                    None if message.contains("canceling statement")
                        || message.contains("interrupted") =>
                    {
                        "cancelled"
                    }
                    None => "database_error",
                },
            }
        }
        D::NotFound => "not_found",
        D::RollbackErrorOnCommit { commit_error, .. } => diesel_error_type(commit_error),
        D::QueryBuilderError(inner) => match inner.downcast_ref::<Error>() {
            Some(ours) => error_type(ours),
            None => "query_builder_error",
        },
        D::DeserializationError(_) => "deserialization_error",
        D::SerializationError(_) => "serialization_error",
        D::BrokenTransactionManager => "broken_transaction_manager",
        D::AlreadyInTransaction | D::NotInTransaction => "transaction_state",
        _ => "diesel_error",
    }
}

/// The SQLSTATE class of a Diesel error, where it is known.
pub(crate) fn sqlstate_class(error: &diesel::result::Error) -> Option<&'static str> {
    use diesel::result::{DatabaseErrorKind as K, Error as D};
    match error {
        D::DatabaseError(kind, info) => {
            let message = info.message();
            match kind {
                K::UniqueViolation
                | K::ForeignKeyViolation
                | K::NotNullViolation
                | K::CheckViolation
                | K::RestrictViolation
                | K::ExclusionViolation => Some("23"),
                K::SerializationFailure => Some("40"),
                K::ReadOnlyTransaction => Some("25"),
                K::ClosedConnection | K::UnableToSendCommand => Some("08"),
                _ if message.contains("deadlock") || message.contains("Deadlock") => Some("40"),
                _ if message.contains("could not serialize") => Some("40"),
                _ if message.contains("terminating connection")
                    || message.contains("the database system is") =>
                {
                    Some("57")
                }
                _ => match crate::error::failover_error(error) {
                    Some("read-only") => Some("25"),
                    Some("connection lost" | "connection closed") => Some("08"),
                    _ => None,
                },
            }
        }
        D::RollbackErrorOnCommit { commit_error, .. } => sqlstate_class(commit_error),
        D::QueryBuilderError(inner) => match inner.downcast_ref::<Error>() {
            Some(Error::Database(e)) => sqlstate_class(e),
            Some(Error::Connect { .. }) => Some("08"),
            _ => None,
        },
        _ => None,
    }
}

/// The `error.type` of any error: Diesel's and this crate's by kind, any
/// other by its Rust type name.
pub(crate) fn error_type_of<E: 'static>(error: &E) -> &'static str {
    let any = error as &dyn std::any::Any;
    if let Some(e) = any.downcast_ref::<diesel::result::Error>() {
        diesel_error_type(e)
    } else if let Some(e) = any.downcast_ref::<Error>() {
        error_type(e)
    } else {
        std::any::type_name::<E>()
    }
}

/// The SQLSTATE class of any error, where it is a Diesel or facade error
/// that says.
fn sqlstate_class_of<E: 'static>(error: &E) -> Option<&'static str> {
    let any = error as &dyn std::any::Any;
    if let Some(e) = any.downcast_ref::<diesel::result::Error>() {
        sqlstate_class(e)
    } else if let Some(e) = any.downcast_ref::<Error>() {
        match e {
            Error::Database(e) => sqlstate_class(e),
            Error::Connect { .. } => Some("08"),
            _ => None,
        }
    } else {
        None
    }
}

/// The metric names, and each engine's handles.
#[cfg(feature = "metrics")]
mod metered {
    use metrics::{Counter, Gauge, Histogram, Label};

    use super::{Op, RetireReason};

    pub(super) const OPERATION_DURATION: &str = "db.client.operation.duration";
    pub(super) const CONNECTION_COUNT: &str = "db.client.connection.count";
    pub(super) const CONNECTION_MAX: &str = "db.client.connection.max";
    pub(super) const PENDING_REQUESTS: &str = "db.client.connection.pending_requests";
    pub(super) const TIMEOUTS: &str = "db.client.connection.timeouts";
    pub(super) const CREATE_TIME: &str = "db.client.connection.create_time";
    pub(super) const WAIT_TIME: &str = "db.client.connection.wait_time";
    pub(super) const USE_TIME: &str = "db.client.connection.use_time";
    pub(super) const QUEUE_WAIT: &str = "db.runsync.queue_wait";
    pub(super) const CANCELS: &str = "db.runsync.cancels";
    pub(super) const TERMINATES: &str = "db.runsync.terminates";
    pub(super) const RETRIES: &str = "db.runsync.retries";
    pub(super) const RETIRED: &str = "db.runsync.connections.retired";
    pub(super) const COMMITS_REFUSED: &str = "db.runsync.commits_refused";
    pub(super) const DEADLINES: &str = "db.runsync.deadlines";

    const POOL: &str = "db.client.connection.pool.name";

    /// One engine's handles, registered once with the recorder installed
    /// when the engine connected.
    pub(super) struct Metrics {
        pool: Vec<Label>,
        op_labels: [Vec<Label>; Op::COUNT],
        durations: [Histogram; Op::COUNT],
        pub(super) idle: Gauge,
        pub(super) used: Gauge,
        pub(super) pending: Gauge,
        pub(super) timeouts: Counter,
        pub(super) create_time: Histogram,
        pub(super) wait_time: Histogram,
        pub(super) use_time: Histogram,
        pub(super) queue_wait: Histogram,
        pub(super) cancels: Counter,
        pub(super) terminates: Counter,
        pub(super) retired: [Counter; 9],
        pub(super) commits_refused: Counter,
        pub(super) deadlines: Counter,
    }

    fn with(labels: &[Label], more: &[(&'static str, &'static str)]) -> Vec<Label> {
        let mut labels = labels.to_vec();
        labels.extend(more.iter().map(|(k, v)| Label::new(*k, *v)));
        labels
    }

    impl Metrics {
        pub(super) fn new(system: &'static str, pool_name: &str, max_size: u32) -> Self {
            describe();
            let pool = vec![Label::new(POOL, pool_name.to_owned())];
            let ops = [
                Op::RunSync,
                Op::RunSyncAndCommit,
                Op::Transaction,
                Op::Stream,
                Op::Commit,
                Op::Rollback,
            ];
            let op_labels = ops.map(|op| {
                with(
                    &pool,
                    &[("db.system.name", system), ("db.operation.name", op.name())],
                )
            });
            let durations = op_labels
                .clone()
                .map(|labels| metrics::histogram!(OPERATION_DURATION, labels));
            let state = |s: &'static str| {
                metrics::gauge!(
                    CONNECTION_COUNT,
                    with(&pool, &[("db.client.connection.state", s)])
                )
            };
            metrics::gauge!(CONNECTION_MAX, pool.clone()).set(f64::from(max_size));
            Metrics {
                op_labels,
                durations,
                idle: state("idle"),
                used: state("used"),
                pending: metrics::gauge!(PENDING_REQUESTS, pool.clone()),
                timeouts: metrics::counter!(TIMEOUTS, pool.clone()),
                create_time: metrics::histogram!(CREATE_TIME, pool.clone()),
                wait_time: metrics::histogram!(WAIT_TIME, pool.clone()),
                use_time: metrics::histogram!(USE_TIME, pool.clone()),
                queue_wait: metrics::histogram!(QUEUE_WAIT, pool.clone()),
                cancels: metrics::counter!(CANCELS, pool.clone()),
                terminates: metrics::counter!(TERMINATES, pool.clone()),
                retired: RetireReason::ALL
                    .map(|r| metrics::counter!(RETIRED, with(&pool, &[("reason", r.as_str())]))),
                commits_refused: metrics::counter!(COMMITS_REFUSED, pool.clone()),
                deadlines: metrics::counter!(DEADLINES, pool.clone()),
                pool,
            }
        }

        /// One operation took `seconds`: the precomputed handle on
        /// success, a key built for its `error.type` on failure.
        pub(super) fn operation(&self, op: Op, error: Option<&'static str>, seconds: f64) {
            let at = op as usize;
            match error {
                None => self.durations[at].record(seconds),
                Some(error) => metrics::histogram!(
                    OPERATION_DURATION,
                    with(&self.op_labels[at], &[("error.type", error)])
                )
                .record(seconds),
            }
        }

        pub(super) fn retry(&self, error: &'static str, status: Option<&'static str>) {
            let mut labels = with(&self.pool, &[("error.type", error)]);
            if let Some(status) = status {
                labels.push(Label::new("db.response.status_code", status));
            }
            metrics::counter!(RETRIES, labels).increment(1);
        }
    }

    /// Units and descriptions, for exporters that show them.
    fn describe() {
        use metrics::Unit;
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            metrics::describe_histogram!(
                OPERATION_DURATION,
                Unit::Seconds,
                "Duration of database client operations (run_sync, transaction, stream, commit, rollback)."
            );
            metrics::describe_gauge!(
                CONNECTION_COUNT,
                "Connections open, by state (idle, used)."
            );
            metrics::describe_gauge!(CONNECTION_MAX, "The pool's maximum number of connections.");
            metrics::describe_gauge!(PENDING_REQUESTS, "Checkouts waiting for a connection.");
            metrics::describe_counter!(TIMEOUTS, "Checkouts that timed out.");
            metrics::describe_histogram!(CREATE_TIME, Unit::Seconds, "Time to open a connection.");
            metrics::describe_histogram!(WAIT_TIME, Unit::Seconds, "Time a checkout waited.");
            metrics::describe_histogram!(
                USE_TIME,
                Unit::Seconds,
                "Time from checkout to checkin."
            );
            metrics::describe_histogram!(
                QUEUE_WAIT,
                Unit::Seconds,
                "Time in tokio's blocking queue, from spawn_blocking to the task starting."
            );
            metrics::describe_counter!(CANCELS, "Server-side statement cancels sent.");
            metrics::describe_counter!(TERMINATES, "Connections terminated on the server.");
            metrics::describe_counter!(RETRIES, "Retries of transaction_with_retry.");
            metrics::describe_counter!(RETIRED, "Connections closed instead of pooled again.");
            metrics::describe_counter!(
                COMMITS_REFUSED,
                "COMMITs refused after a statement lost the transaction."
            );
            metrics::describe_counter!(DEADLINES, "Operation deadlines hit.");
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_have_low_cardinality_types_and_sqlstate_classes() {
        use diesel::result::{DatabaseErrorKind, Error as D};
        let serialization = D::DatabaseError(
            DatabaseErrorKind::SerializationFailure,
            Box::new("could not serialize access".to_owned()),
        );
        assert_eq!(diesel_error_type(&serialization), "serialization_failure");
        assert_eq!(sqlstate_class(&serialization), Some("40"));
        let deadlock = D::DatabaseError(
            DatabaseErrorKind::Unknown,
            Box::new("Deadlock found when trying to get lock".to_owned()),
        );
        assert_eq!(diesel_error_type(&deadlock), "deadlock");
        assert_eq!(sqlstate_class(&deadlock), Some("40"));
        let busy = D::DatabaseError(
            DatabaseErrorKind::Unknown,
            Box::new("database is locked".to_owned()),
        );
        assert_eq!(diesel_error_type(&busy), "database_locked");
        assert_eq!(sqlstate_class(&busy), None);
        let through: D = Error::PoolTimeout(Duration::from_secs(1)).into();
        assert_eq!(error_type_of(&through), "pool_timeout");
        assert_eq!(error_type_of(&Error::Timeout(Duration::ZERO)), "timeout");
        assert_eq!(error_type_of(&std::fmt::Error), "core::fmt::Error");
    }

    #[test]
    fn telemetry_names_the_server_and_database_never_the_password() {
        let url =
            DatabaseUrl::parse("postgres://app:s3cret@db.example:6432,db2/orders?sslmode=require")
                .unwrap();
        let observe = Observe::new(&url, None, 4, None);
        assert_eq!(observe.system, "postgresql");
        assert_eq!(observe.address.as_deref(), Some("db.example"));
        assert_eq!(observe.port, Some(6432));
        assert_eq!(observe.namespace.as_deref(), Some("orders"));
        assert_eq!(observe.pool_name(), "db.example:6432/orders");
        let url = DatabaseUrl::parse("mysql://root:pw@[::1]/test").unwrap();
        let observe = Observe::new(&url, Some("primary"), 4, None);
        assert_eq!(observe.address.as_deref(), Some("::1"));
        assert_eq!(observe.port, Some(3306));
        assert_eq!(observe.pool_name(), "primary");
        let url = DatabaseUrl::parse("sqlite:///tmp/app.db?mode=rwc").unwrap();
        let observe = Observe::new(&url, None, 4, None);
        assert_eq!(observe.system, "sqlite");
        assert_eq!(observe.address, None);
        assert_eq!(observe.namespace.as_deref(), Some("/tmp/app.db"));
        assert_eq!(observe.pool_name(), "/tmp/app.db");
    }
}
