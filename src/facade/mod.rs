//! The generic async facade: an engine pooling any synchronous Diesel
//! connection with bb8, and `AsyncSession::run_sync` running sync code on
//! tokio's blocking pool inside the session's transaction.

pub mod echo;
pub mod engine;
pub mod error;
pub mod manager;
pub mod retry;
pub mod session;
pub mod url;

pub use echo::{SQL_TARGET, SqlEcho};
pub use engine::{Engine, EngineOptions, PoolStatus};
pub use error::Error;
pub use manager::PoolableConnection;
pub use retry::{Retried, RetryPolicy};
pub use session::AsyncSession;
pub use url::{Backend, DatabaseUrl};
