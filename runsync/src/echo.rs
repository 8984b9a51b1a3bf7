//! SQL echo: every statement, its bind values and its duration, through `tracing`.
//!
//! Events go to the target [`SQL_TARGET`] (`diesel_runsync::sql`): at `INFO`
//! when the engine's `echo` option is on, at `DEBUG` otherwise, so
//! `RUST_LOG=diesel_runsync::sql=debug` shows them without the option.
//! `BEGIN`, `COMMIT` and `ROLLBACK` appear as the statements they are.
//! Connection URLs are always redacted, and connection errors scrubbed.

use std::time::Instant;

use diesel::connection::{Instrumentation, InstrumentationEvent};

use crate::url::{redact, scrub_message};

/// The `tracing` target of statement events.
pub const SQL_TARGET: &str = "diesel_runsync::sql";

/// A Diesel [`Instrumentation`] that reports statements to `tracing`.
#[derive(Debug, Default)]
pub(crate) struct SqlEcho {
    echo: bool,
    started: Option<Instant>,
}

impl SqlEcho {
    /// Reports at `INFO` when `echo` is true, else at `DEBUG`.
    pub(crate) fn new(echo: bool) -> Self {
        SqlEcho {
            echo,
            started: None,
        }
    }

    fn enabled(&self) -> bool {
        if self.echo {
            tracing::enabled!(target: SQL_TARGET, tracing::Level::INFO)
        } else {
            tracing::enabled!(target: SQL_TARGET, tracing::Level::DEBUG)
        }
    }
}

macro_rules! report {
    ($echo:expr, $($arg:tt)+) => {
        if $echo {
            tracing::info!(target: SQL_TARGET, $($arg)+)
        } else {
            tracing::debug!(target: SQL_TARGET, $($arg)+)
        }
    };
}

impl Instrumentation for SqlEcho {
    fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
        if !self.enabled() {
            return;
        }
        match event {
            InstrumentationEvent::StartQuery { .. } => self.started = Some(Instant::now()),
            InstrumentationEvent::FinishQuery { query, error, .. } => {
                let ms = self
                    .started
                    .take()
                    .map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3);
                match error {
                    None => report!(self.echo, "{query} [{ms:.3} ms]"),
                    Some(e) => {
                        tracing::warn!(target: SQL_TARGET, "{query} [{ms:.3} ms] failed: {e}")
                    }
                }
            }
            InstrumentationEvent::FinishEstablishConnection { url, error, .. } => match error {
                None => report!(self.echo, "connected to {}", redact(url)),
                Some(e) => tracing::warn!(
                    target: SQL_TARGET,
                    "connecting to {} failed: {}",
                    redact(url),
                    scrub_message(url, &e.to_string())
                ),
            },
            _ => {}
        }
    }
}
