//! # greenlet-orm
//!
//! SQLAlchemy's asyncio example `greenlet_orm` on Diesel and
//! [`diesel_runsync`]: the demo domain as plain synchronous Diesel code, and
//! the seed's program that drives it through `AsyncSession::run_sync`.
//! The command-line program (`src/main.rs`) and the examples (`examples/`)
//! are thin layers over this library.
//!
//! ## Layout
//!
//! - [`schema`] — tables `a` and `b`, as `diesel print-schema` writes them.
//! - [`models`] — [`A`], [`B`], [`NewA`], [`NewB`], [`Family`]; printed as the seed prints them.
//! - [`connection`] — [`AnyConnection`]: one connection type over the
//!   backends compiled in (`sqlite` always; `postgres`, `mysql` by feature),
//!   picked from the URL at run time.
//! - [`migrations`] — the embedded migrations of each backend; the seed's
//!   `drop_all` / `create_all`.
//! - [`queries`] — the synchronous core: the program's statements
//!   ([`queries::Statements`], written once for each backend's own connection,
//!   reached from [`AnyConnection`] by one `match`), and over them the
//!   inserts, the lazy and eager reads, the load unit, counts.
//! - [`program`] — the seed's program on the async facade.
//! - [`error`] — [`DemoError`].
//!
//! ## Features
//!
//! | feature | default | backend |
//! |---|---|---|
//! | `sqlite` | yes (required) | SQLite, compiled in (`diesel-runsync/sqlite-bundled`) |
//! | `postgres` | yes | PostgreSQL, libpq compiled in (`diesel-runsync/postgres-bundled`) |
//! | `mysql` | no | MySQL/MariaDB, linking the system libmysqlclient |

#![warn(missing_docs, unreachable_pub)]

#[cfg(not(feature = "sqlite"))]
compile_error!(
    "the `sqlite` feature is required: SQLite is the program's embedded default backend"
);

// The MultiConnection derive adds public helper types (MultiBackend, ...)
// that carry no docs of their own.
#[allow(missing_docs, unreachable_pub)]
pub mod connection;
pub mod error;
pub mod migrations;
pub mod models;
pub mod program;
pub mod queries;
/// Tables `a` and `b`, as `diesel print-schema` writes them (see `.ci/schema-drift`).
#[allow(missing_docs)] // generated code: table! items carry no docs
pub mod schema;

pub use connection::AnyConnection;
pub use error::DemoError;
pub use models::{A, B, Family, NewA, NewB};
