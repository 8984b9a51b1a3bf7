//! # diesel-runsync
//!
//! SQLAlchemy's `AsyncSession.run_sync()` for Diesel: write your queries as
//! plain synchronous Diesel code over `&mut Conn`, and call them from async
//! (tokio) code, inside the async session's own transaction.
//!
//! ```
//! # #[cfg(feature = "sqlite")] {
//! use diesel::connection::SimpleConnection;
//! use diesel::prelude::*;
//! use diesel_runsync::{Engine, EngineOptions, Error};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Error> {
//! # let dir = tempfile::tempdir().unwrap();
//! # let url = dir.path().join("doc.db").display().to_string();
//! let engine = Engine::<SqliteConnection>::connect(&url, EngineOptions::default()).await?;
//!
//! let mut session = engine.session();
//! session.run_sync(|conn| conn.batch_execute("CREATE TABLE t (x INTEGER)")).await?;
//! session
//!     .run_sync(|conn| diesel::sql_query("INSERT INTO t VALUES (42)").execute(conn))
//!     .await?;
//! session.commit().await?;
//!
//! // Engine::transaction: a transaction of its own, committed on Ok.
//! let x: i32 = engine
//!     .transaction(|conn| diesel::dsl::sql::<diesel::sql_types::Integer>("SELECT x FROM t").get_result(conn))
//!     .await?;
//! assert_eq!(x, 42);
//! # Ok(())
//! # }
//! # }
//! ```
//!
//! The closure may return any error type `E: From<Error>`: Diesel's
//! `QueryResult` as above, this crate's [`Error`], or your own.
//!
//! ## Features
//!
//! | feature | default | what it does |
//! |---|---|---|
//! | `sqlite` | yes | [`PoolableConnection`] for `diesel::SqliteConnection` (WAL, busy timeout, `BEGIN IMMEDIATE`); links the system libsqlite3 |
//! | `postgres` | yes | [`PoolableConnection`] for `diesel::PgConnection`; links the system libpq |
//! | `mysql` | no | [`PoolableConnection`] for `diesel::MysqlConnection`; links the system libmysqlclient (`apt-get install default-libmysqlclient-dev`) |
//! | `sqlite-bundled` | no | `sqlite`, with SQLite compiled in (`libsqlite3-sys/bundled`): needs only a C compiler |
//! | `postgres-bundled` | no | `postgres`, with libpq compiled in (`pq-sys/bundled`); OpenSSL stays a system library |
//! | `testing` | no | `testing::TestDatabase`: a database of its own per test, your migrations applied (for `[dev-dependencies]`) |
//! | `metrics` | no | operation and pool metrics through the [`metrics`](https://docs.rs/metrics) facade (the `observe` module's docs list them) |
//! | `mysql-single-round-trip` | no | `mysql`, with `BEGIN`, `COMMIT` and `ROLLBACK` in one round trip each (Diesel's `batch_execute` takes three); turns on Diesel's unstable `i-implement-a-third-party-backend-and-opt-into-breaking-changes` (for the transaction events' constructors), outside Diesel's semver promises |
//!
//! There is no bundled MySQL: `mysqlclient-sys/bundled` needs cmake and is
//! GPL-2.0-only, so it is left to the application to opt in. Any other
//! connection type works too: implement [`PoolableConnection`] for it; for a
//! `#[derive(MultiConnection)]` enum of the connections above,
//! [`forward_poolable_connection!`] writes the `impl`, forwarding every
//! method so that each backend keeps its guarantees.
//!
//! ## Guides
//!
//! - [`guide::deadlines`]: deadlines, and cancellation that reaches the server.
//! - [`guide::streaming`]: rows as an async `Stream`, inside the transaction.
//! - [`guide::failures`]: what happens on failure (errors, panics, dropped
//!   futures, broken connections).
//! - [`guide::backends`]: SQLite, PostgreSQL, MySQL/MariaDB; several in one type.
#![cfg_attr(
    feature = "postgres",
    doc = "- [`guide::scale_out_postgres`]: failover, PgBouncer, read replicas."
)]
#![cfg_attr(
    feature = "mysql",
    doc = "- [`guide::scale_out_galera`]: MariaDB Galera Cluster."
)]
//!
//! ## Layout
//!
//! - `url` — [`DatabaseUrl`]: the [`Backend`] a URL names, and a form safe to print.
//! - `manager` — [`PoolableConnection`] (and [`forward_poolable_connection!`])
//!   and the bb8 manager: how connections are opened (with a backoff after
//!   failures), checked ([`Access`]: a read-write engine refuses read-only
//!   nodes), and refused when they come back with a transaction open or
//!   retired; the hooks that cancel a statement, set a server-side timeout
//!   ([`TimeoutScope`]) and locate a write ([`WritePosition`]).
//! - `engine` — [`Engine`] and [`EngineOptions`]: the pool, fair checkout,
//!   [`Engine::transaction`]; `engine::dispatch`: transactions that wait
//!   for a busy engine, queued and run back to back by the blocking thread
//!   that holds a connection.
//! - `session` — [`AsyncSession`]: `run_sync`, `begin`, `commit`, `rollback`,
//!   `transaction`, deadlines ([`AsyncSession::with_timeout`]), and how
//!   cancellation and panics are contained; a connection that does not come
//!   back in time is given up ([`ABANDON_AFTER`]).
//! - `session::stream` — [`AsyncSession::stream`], [`RowStream`],
//!   [`RowSink`], [`StreamingMode`]: the rows of a synchronous query as an
//!   async `Stream`, over a bounded channel, inside the session's transaction.
//! - `cancel` — [`Canceller`]: cancellation that reaches the server
//!   (`pg_cancel_backend`, `KILL QUERY`, `sqlite3_interrupt`) when an
//!   operation's future is dropped or its deadline passes; a closure that
//!   will not stop has its connection terminated ([`TERMINATE_AFTER`]).
//! - `prepared` — [`update_kept`] ([`KeptUpdate`]): Diesel's
//!   `update(target).set(values)` kept in the connection's prepared-statement
//!   cache, keyed by its SQL text, where Diesel prepares every `UPDATE`
//!   anew on each execution.
//! - `retry` — [`Engine::transaction_with_retry`], [`RetryPolicy`], [`Retried`].
//! - `echo` — the engine's Diesel instrumentation on every connection:
//!   statements to `tracing` on the target [`SQL_TARGET`], the failed
//!   statement that lost a transaction (its `COMMIT` is refused), the MySQL
//!   connection to retire (an interrupted statement, a Galera node that
//!   stopped serving); yours runs after it
//!   ([`EngineOptions::instrumentation`]).
//! - `replica` — [`Replicated`]: a primary and a replica engine, writes on
//!   one and reads on the other, read-your-writes between them
//!   ([`WritePosition`]).
//! - `error` — [`Error`] and [`Retryable`]; which failures a failover
//!   brings, and which retire a connection.
//! - `testing` (feature `testing`) — `TestDatabase`: a database per test,
//!   migrated, dropped on success and kept on failure.
//! - [`observe`] — spans, metrics and pool events: one `tracing` span per
//!   operation (`db.run_sync`, `db.transaction`, `db.stream`, `db.commit`,
//!   ...) entered on the blocking thread, metrics through the `metrics`
//!   facade (feature `metrics`), named after OpenTelemetry's database
//!   conventions; [`PoolEvent`], [`RetireReason`], [`SPAN_TARGET`]. Its
//!   module docs list every span field and metric.
//! - [`guide`] — the guides above, as doc pages.

#![warn(missing_docs, unreachable_pub)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod cancel;
mod echo;
mod engine;
mod error;
pub mod guide;
mod manager;
#[cfg(feature = "mysql-single-round-trip")]
mod mysql_tx;
pub mod observe;
mod prepared;
mod replica;
mod retry;
mod session;
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;
mod url;

pub use cancel::{CancelError, Canceller, TERMINATE_AFTER};
pub use echo::SQL_TARGET;
pub use engine::{Engine, EngineOptions, PoolStatus};
pub use error::{Error, Retryable};
pub use manager::{Access, MAX_CONNECT_BACKOFF, PoolableConnection, TimeoutScope, WritePosition};
pub use observe::{PoolEvent, RetireReason, SPAN_TARGET};
pub use prepared::{KeptUpdate, update_kept};
pub use replica::{DEFAULT_MAX_WAIT, ReadOn, Replicated};
pub use retry::{FAILOVER_MIN_DELAY, Retried, RetryPolicy};
pub use session::stream::{RowSink, RowStream, STREAM_BUFFER_ROWS, StreamingMode};
pub use session::{ABANDON_AFTER, AsyncSession, ROLLBACK_WAIT, WithTimeout};
pub use url::{Backend, DatabaseUrl};
