//! The demo domain: SQLAlchemy's `greenlet_orm` model (`a` parents, `b`
//! children) as plain synchronous Diesel code, and the seed's program.

pub mod connection;
pub mod error;
pub mod migrations;
pub mod models;
pub mod program;
pub mod queries;
pub mod schema;

pub use connection::AnyConnection;
pub use error::DemoError;
pub use models::{A, B, Family, NewA, NewB};
