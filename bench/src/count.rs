//! Counting statements with a diesel `Instrumentation`.
//!
//! Every statement sent shows up as a `StartQuery` event; `BEGIN`, `COMMIT`
//! and `ROLLBACK` (and savepoints) are statements too, each announced by one
//! transaction event first. So the statements of the workload are
//! `StartQuery` events minus transaction events. Nothing is formatted, so
//! counting costs two relaxed atomic increments at most per statement.
//!
//! A connection holds one instrumentation. On the facade the counter is
//! given to the engine (`EngineOptions::instrumentation`), which hands it
//! every event after its own instrumentation (the statement echo, off here
//! since the bench installs no `tracing` subscriber, and the checks that
//! refuse a COMMIT after a lost transaction): the facade is measured as it
//! runs in production. On the raw connections (`sync`, diesel-async) the
//! counter is the only instrumentation, installed untimed.
//!
//! sqlx counts differently: `sqlx_impl.rs` calls [`Counter::statement`]
//! once per statement it sends (BEGIN/COMMIT not counted), one relaxed
//! increment each.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use diesel::connection::{Instrumentation, InstrumentationEvent};

/// Shared counts; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Counter {
    starts: Arc<AtomicU64>,
    transaction_events: Arc<AtomicU64>,
}

impl Counter {
    /// Zeroes both counts (call between phases, outside the timed region).
    pub fn reset(&self) {
        self.starts.store(0, Ordering::Relaxed);
        self.transaction_events.store(0, Ordering::Relaxed);
    }

    /// Statements sent since the last reset, BEGIN/COMMIT/ROLLBACK excluded.
    pub fn queries(&self) -> u64 {
        let starts = self.starts.load(Ordering::Relaxed);
        starts.saturating_sub(self.transaction_events.load(Ordering::Relaxed))
    }

    /// Counts one statement sent by code that counts for itself (the sqlx
    /// implementation: sqlx has no per-statement hook to install).
    pub fn statement(&self) {
        self.starts.fetch_add(1, Ordering::Relaxed);
    }

    /// An instrumentation feeding this counter (it only counts).
    pub fn instrumentation(&self) -> Counting {
        Counting {
            counter: self.clone(),
        }
    }
}

/// The instrumentation installed on a connection.
pub struct Counting {
    counter: Counter,
}

impl Instrumentation for Counting {
    fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
        match event {
            InstrumentationEvent::StartQuery { .. } => {
                self.counter.starts.fetch_add(1, Ordering::Relaxed);
            }
            InstrumentationEvent::BeginTransaction { .. }
            | InstrumentationEvent::CommitTransaction { .. }
            | InstrumentationEvent::RollbackTransaction { .. } => {
                self.counter
                    .transaction_events
                    .fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }
}
