//! Guides: how the engine behaves where it matters, with the settings
//! that change it. Each is a page of these docs; their code compiles as
//! doctests.
//!
//! - [`deadlines`]: deadlines and cancellation that reach the server.
//! - [`streaming`]: the rows of a synchronous query as an async `Stream`.
//! - [`failures`]: what happens when a closure fails or panics, a future is
//!   dropped, a connection breaks.
//! - [`backends`]: SQLite, PostgreSQL and MySQL specifics; several backends
//!   in one `#[derive(MultiConnection)]` type.
#![cfg_attr(
    feature = "postgres",
    doc = "- [`scale_out_postgres`]: failover, PgBouncer, read replicas (feature `postgres`)."
)]
#![cfg_attr(
    feature = "mysql",
    doc = "- [`scale_out_galera`]: MariaDB Galera Cluster (feature `mysql`)."
)]

/// Deadlines and cancellation: the three places a deadline is set, how a
/// statement is cancelled on each backend, how long a caller waits, and a
/// closure that will not stop.
#[doc = include_str!("../docs/deadlines.md")]
pub mod deadlines {}

/// Streaming: `AsyncSession::stream`, backpressure, what a dropped or
/// failing stream does, and what each backend delivers row by row.
#[doc = include_str!("../docs/streaming.md")]
pub mod streaming {}

/// What happens on failure: errors, panics, dropped futures, lost
/// transactions, broken connections, dropped sessions, passwords.
#[doc = include_str!("../docs/failures.md")]
pub mod failures {}

/// Backends: URL forms, SQLite, PostgreSQL and MySQL/MariaDB specifics,
/// and `forward_poolable_connection!` for a `MultiConnection` enum.
#[doc = include_str!("../docs/backends.md")]
pub mod backends {}

/// Scale-out on PostgreSQL: multi-host URLs and `target_session_attrs`,
/// timeouts and keepalives, what a switchover and a failover cost the
/// caller, PgBouncer in transaction mode, read replicas and read-your-writes.
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
#[doc = include_str!("../docs/scale-out-postgres.md")]
pub mod scale_out_postgres {}

/// Scale-out on MariaDB Galera Cluster: one engine over several nodes,
/// certification conflicts and retries, node loss, reads after writes.
#[cfg(feature = "mysql")]
#[cfg_attr(docsrs, doc(cfg(feature = "mysql")))]
#[doc = include_str!("../docs/scale-out-galera.md")]
pub mod scale_out_galera {}
