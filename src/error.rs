//! The demo domain's error type.

/// What the demo's queries and program can fail with.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A statement failed.
    #[error(transparent)]
    Database(#[from] diesel::result::Error),
    /// A migration failed (e.g. a table it creates already exists).
    #[error("migration failed: {0}")]
    Migration(String),
    /// Writing the output failed.
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
    /// The engine or session failed (connection, pool, panic...).
    #[error(transparent)]
    Session(#[from] diesel_runsync::Error),
    /// The data read back is not what was written.
    #[error("unexpected data: {0}")]
    Check(String),
}

impl diesel_runsync::Retryable for DemoError {
    /// A lost serialization race or deadlock, from a statement or from the facade.
    fn is_retryable(&self) -> bool {
        match self {
            DemoError::Database(e) => e.is_retryable(),
            DemoError::Session(e) => e.is_retryable(),
            _ => false,
        }
    }
}
