//! Counting statements with a diesel `Instrumentation`.
//!
//! Every statement sent shows up as a `StartQuery` event; `BEGIN`, `COMMIT`
//! and `ROLLBACK` (and savepoints) are statements too, each announced by one
//! transaction event first. So the statements of the workload are
//! `StartQuery` events minus transaction events. Nothing is formatted, so
//! counting costs two relaxed atomic increments at most per statement.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use diesel::connection::{Instrumentation, InstrumentationEvent};
use diesel_runsync::facade::SqlEcho;

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

    /// An instrumentation feeding this counter, forwarding every event to
    /// `inner` (the facade keeps its `SqlEcho`, so its cost stays measured).
    pub fn instrumentation(&self, inner: Option<SqlEcho>) -> Counting {
        Counting {
            counter: self.clone(),
            inner,
        }
    }
}

/// The instrumentation installed on a connection.
pub struct Counting {
    counter: Counter,
    inner: Option<SqlEcho>,
}

impl Instrumentation for Counting {
    fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
        match &event {
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
        if let Some(inner) = self.inner.as_mut() {
            inner.on_connection_event(event);
        }
    }
}
