//! What both bench binaries (`bench`, `galera`) share: the phases of a
//! W(N) run and their timer, preparing a database for W(N), and running a
//! future on the runtime's workers. `src/bin/galera.rs` includes this file,
//! `count.rs`, `stats.rs` and `sync_impls.rs` with `#[path]`.

use std::time::Instant;

use diesel::connection::SimpleConnection;
use diesel_runsync::{DatabaseUrl, PoolableConnection};
use greenlet_orm::AnyConnection;

use crate::count::Counter;

/// One timed phase.
#[derive(Debug, Clone)]
pub struct Phase {
    /// Phase name from `bench/WORKLOAD.md`.
    pub name: &'static str,
    /// Wall time.
    pub seconds: f64,
    /// Statements sent, BEGIN/COMMIT excluded.
    pub queries: u64,
}

/// Times phases one after another and counts their statements.
pub struct PhaseTimer {
    counter: Counter,
    started: Instant,
    phases: Vec<Phase>,
}

impl PhaseTimer {
    /// A timer reading `counter`.
    pub fn new(counter: Counter) -> Self {
        PhaseTimer {
            counter,
            started: Instant::now(),
            phases: Vec::new(),
        }
    }

    /// Starts a phase (zeroes the counter first).
    pub fn start(&mut self) {
        self.counter.reset();
        self.started = Instant::now();
    }

    /// Ends the phase `name`.
    pub fn stop(&mut self, name: &'static str) {
        let seconds = self.started.elapsed().as_secs_f64();
        self.phases.push(Phase {
            name,
            seconds,
            queries: self.counter.queries(),
        });
    }

    /// Ends a phase whose statements are not counted (`connect`).
    pub fn stop_uncounted(&mut self, name: &'static str) {
        let seconds = self.started.elapsed().as_secs_f64();
        self.phases.push(Phase {
            name,
            seconds,
            queries: 0,
        });
    }

    /// The phases, with `total` = schema + insert + run_sync_lazy.
    pub fn finish(mut self) -> Vec<Phase> {
        let parts: Vec<&Phase> = self
            .phases
            .iter()
            .filter(|p| matches!(p.name, "schema" | "insert" | "run_sync_lazy"))
            .collect();
        let total = Phase {
            name: "total",
            seconds: parts.iter().map(|p| p.seconds).sum(),
            queries: parts.iter().map(|p| p.queries).sum(),
        };
        self.phases.push(total);
        self.phases
    }
}

/// Children of W(n): N + ceil(N/2).
pub fn expected_children(n: usize) -> usize {
    n + n.div_ceil(2)
}

/// Runs `future` as a task on the runtime's workers and waits for it.
/// Async code runs on a worker in an application, where the worker that
/// polls the I/O driver runs the woken task itself; `block_on` on the
/// main thread would add a cross-thread wake-up to every round trip of the
/// async implementations.
pub fn on_worker<T: Send + 'static>(
    runtime: &tokio::runtime::Runtime,
    future: impl Future<Output = anyhow::Result<T>> + Send + 'static,
) -> anyhow::Result<T> {
    runtime.block_on(runtime.spawn(future))?
}

/// Drops whatever an earlier, interrupted run left (untimed).
pub fn clean(url: &str) -> anyhow::Result<()> {
    let mut conn = <AnyConnection as PoolableConnection>::connect(&DatabaseUrl::parse(url)?)?;
    conn.batch_execute("DROP TABLE IF EXISTS b")?;
    conn.batch_execute("DROP TABLE IF EXISTS a")?;
    conn.batch_execute("DROP TABLE IF EXISTS __diesel_schema_migrations")?;
    // Leave the schema migrated, so every schema phase, the first included,
    // reverts and re-applies the migration.
    greenlet_orm::migrations::create_all(&mut conn)?;
    Ok(())
}

/// The phases of W(N), in the order they run and are reported.
pub const PHASES: [&str; 7] = [
    "connect",
    "schema",
    "insert",
    "run_sync_lazy",
    "run_sync_eager",
    "verify",
    "total",
];
