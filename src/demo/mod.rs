//! The demo domain: SQLAlchemy's `greenlet_orm` model (`a` parents, `b`
//! children) as plain synchronous Diesel code, and the seed's program.

// The MultiConnection derive adds public helper types (MultiBackend, ...)
// that carry no docs of their own.
#[allow(missing_docs)]
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
