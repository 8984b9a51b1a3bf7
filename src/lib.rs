//! # diesel-runsync
//!
//! SQLAlchemy's `AsyncSession.run_sync()` for Diesel: write your queries as
//! plain synchronous Diesel code over `&mut Conn`, and call them from async
//! code, inside the async session's own transaction.
//!
//! ```
//! use diesel::connection::SimpleConnection;
//! use diesel::prelude::*;
//! use diesel_runsync::{Engine, EngineOptions, Error};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Error> {
//! let dir = tempfile::tempdir().unwrap();
//! let url = dir.path().join("doc.db").display().to_string();
//! let engine = Engine::<SqliteConnection>::connect(&url, EngineOptions::default()).await?;
//!
//! let mut session = engine.session();
//! session
//!     .run_sync(|conn| Ok::<_, Error>(conn.batch_execute("CREATE TABLE t (x INTEGER)")?))
//!     .await?;
//! session
//!     .run_sync(|conn| {
//!         Ok::<_, Error>(diesel::sql_query("INSERT INTO t VALUES (42)").execute(conn)?)
//!     })
//!     .await?;
//! session.commit().await?;
//!
//! // A fresh session (another transaction) sees the committed row.
//! let x: i32 = engine
//!     .session()
//!     .run_sync(|conn| Ok::<_, Error>(diesel::dsl::sql::<diesel::sql_types::Integer>("SELECT x FROM t").get_result(conn)?))
//!     .await?;
//! assert_eq!(x, 42);
//! # Ok(())
//! # }
//! ```
//!
//! ## Layout
//!
//! Two parts, kept apart:
//!
//! - [`facade`] — generic machinery, usable with any synchronous Diesel
//!   connection: [`facade::url`] (backend from the URL, passwords
//!   redacted), [`facade::manager`] (the bb8 manager and
//!   [`PoolableConnection`]), [`facade::engine`] ([`Engine`], the pool),
//!   [`facade::session`] ([`AsyncSession`] with `run_sync`, `begin`,
//!   `commit`, `rollback`), [`facade::retry`] (whole-transaction retries
//!   on serialization failures and deadlocks), [`facade::echo`] (statements to `tracing`),
//!   [`facade::error`] ([`Error`]).
//! - [`demo`] — the example domain of SQLAlchemy's `greenlet_orm`:
//!   [`demo::schema`] (tables `a`, `b`), [`demo::models`],
//!   [`demo::connection`] ([`demo::AnyConnection`], one connection type for
//!   SQLite, PostgreSQL and MySQL), [`demo::migrations`] (embedded, per
//!   backend), [`demo::queries`] (the synchronous core) and
//!   [`demo::program`] (the seed's program on the facade).
//!
//! The binary (`src/main.rs`) runs that program from the command line.

#![warn(missing_docs)]

pub mod demo;
pub mod facade;

pub use facade::{
    AsyncSession, Backend, DatabaseUrl, Engine, EngineOptions, Error, PoolStatus,
    PoolableConnection, Retried, RetryPolicy, SQL_TARGET,
};
