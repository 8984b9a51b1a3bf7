//! The W(N) workload benchmark: W(N) (defined in `bench/WORKLOAD.md`) run
//! by four implementations in the same process, run after run:
//!
//! - `facade`: diesel-runsync's `Engine` + `AsyncSession::run_sync` with the
//!   sync core of the `greenlet-orm` library (`greenlet_orm::queries`,
//!   `greenlet_orm::migrations`) on its `AnyConnection`;
//! - `facade-native`: the same engine on the backend's own connection type
//!   (`Engine<PgConnection>`, ...), as a library user runs it: without the
//!   program's `#[derive(MultiConnection)]`;
//! - `sync`: the same functions on a raw connection, one thread, no tokio;
//! - `diesel-async`: the same work with `diesel_async::RunQueryDsl`;
//! - `deadpool-diesel`: sync Diesel connections in a deadpool, the work
//!   handed to the blocking pool with `interact`;
//! - `sqlx`: the same statements with sqlx 0.8 (`query_as`, `QueryBuilder`).
//!
//! On PostgreSQL each run also measures the round-trip floor: pgbench's
//! single-client latency (`-M prepared`) for the lazy phase's child SELECT,
//! beside the lazy phase's time per statement; on MySQL/MariaDB the same
//! with `--mysql-floor` (the C client library alone, `bench/floor/`).
//!
//! Prints one JSON line per phase per implementation per run, then summary
//! lines (medians, ratios from the same runs). `--micro` adds round-trip
//! figures, `--concurrency` the load figures (C tasks over pools of 8,
//! beside `pgbench` on PostgreSQL), `--rss` the peak resident set. See
//! BENCHMARKS.md.
//!
//! ```text
//! cargo run -p runsync-bench --release --bin bench -- --n 10000 --backend postgres --runs 5
//! ```

mod async_impl;
mod count;
mod figures;
mod mysql_status;
mod native_impl;
mod phases;
mod sqlx_impl;
mod stats;
mod sync_impls;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use diesel_runsync::{Backend, DatabaseUrl, EngineOptions};
use greenlet_orm::queries::workload_families;

use crate::count::Counter;
use crate::phases::{Phase, PhaseTimer, clean, expected_children, on_worker};
use crate::stats::{median, micros, percentile};

/// Runs W(N) with the facade, raw sync Diesel, diesel-async and sqlx, and prints JSON lines.
#[derive(Debug, Parser)]
#[command(about)]
struct Cli {
    /// Parent rows N (comma-separated for several).
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    n: Vec<usize>,

    /// Which backend(s).
    #[arg(long, value_enum, default_value = "all")]
    backend: BackendArg,

    /// Runs per N (medians are over these).
    #[arg(long, default_value_t = 5)]
    runs: usize,

    /// Unrecorded warm-up runs per N before the measured ones; with the load
    /// figures (`--concurrency`), when above 0, one unrecorded level of facade
    /// load first.
    #[arg(long, default_value_t = 1)]
    warmup: usize,

    /// Implementations to run (comma-separated).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "facade,facade-inline,facade-native,sync,diesel-async,deadpool-diesel,sqlx"
    )]
    impls: Vec<Impl>,

    /// PostgreSQL URL (`sslmode=disable` is added unless it names a mode).
    #[arg(
        long,
        env = "PG_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1/bench_pg"
    )]
    pg_url: String,

    /// MySQL/MariaDB URL.
    #[arg(
        long,
        env = "MYSQL_DATABASE_URL",
        default_value = "mysql://root@127.0.0.1:3306/bench_my"
    )]
    mysql_url: String,

    /// SQLite file (default: a new file in the temp directory, removed at the end).
    #[arg(long)]
    sqlite_path: Option<PathBuf>,

    /// Pool size of the facade's engine, and of every pool of the load
    /// figures (facade, facade-native, sync threads, diesel-async's bb8,
    /// deadpool-diesel, sqlx).
    #[arg(long, default_value_t = 8)]
    pool_size: u32,

    /// Skip the workload (run only --micro / --concurrency).
    #[arg(long)]
    no_workload: bool,

    /// Micro figures: empty run_sync, PK SELECT via run_sync / raw / diesel-async.
    #[arg(long)]
    micro: bool,

    /// Timed iterations per micro figure.
    #[arg(long, default_value_t = 20_000)]
    micro_iters: usize,

    /// Load figures: C tasks running units of work (a parent, its children,
    /// UPDATE, COMMIT) through each implementation's pool.
    #[arg(long)]
    concurrency: bool,

    /// Task counts C for --concurrency.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64,256")]
    clients: Vec<usize>,

    /// Seconds per concurrency level.
    #[arg(long, default_value_t = 5)]
    duration: u64,

    /// Rounds of each concurrency level: every implementation runs once per
    /// round, the order rotated from round to round; the goal lines give
    /// the median, over the rounds, of ratios measured within one round.
    #[arg(long, default_value_t = 1)]
    load_runs: usize,

    /// Rows of `a` for the micro and concurrency figures.
    #[arg(long, default_value_t = 10_000)]
    rows: usize,

    /// pgbench binary, run beside --concurrency and for the floor on
    /// PostgreSQL ("" to skip; skipped too when it is not installed).
    #[arg(long, default_value = "pgbench")]
    pgbench: String,

    /// Most connections pgbench may open (it has one per client; the
    /// server's max_connections is 100 by default).
    #[arg(long, default_value_t = 64)]
    pgbench_max_clients: usize,

    /// Skip the round-trip floor (pgbench, --mysql-floor) in the W(N) runs.
    #[arg(long)]
    no_floor: bool,

    /// The MySQL/MariaDB floor's binary (`bench/mysql_floor.sh` builds it
    /// and prints its path): the lazy phase's child SELECT on the C client
    /// library alone, run beside each W(N) run on MySQL ("" to skip).
    #[arg(long, default_value = "")]
    mysql_floor: String,

    /// Print the process's peak RSS (VmHWM) at the end.
    #[arg(long)]
    rss: bool,

    /// What watches the engine while it runs (the cost figures of the
    /// observability: compare `none` with `spans`, `metrics` and `both`
    /// in the same build).
    #[arg(long, value_enum, default_value = "none")]
    observe: Observe,
}

/// What [`Cli::observe`] installs before any engine connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Observe {
    /// No subscriber, no recorder.
    None,
    /// A `tracing` registry with the engine's spans enabled (INFO on
    /// `diesel_runsync`: each operation's span is created, entered on the
    /// blocking thread, and its fields recorded).
    Spans,
    /// A Prometheus recorder taking the engine's metrics.
    Metrics,
    /// Both.
    Both,
}

impl Observe {
    /// Installs what this names, process-wide.
    fn install(self) -> anyhow::Result<()> {
        use tracing_subscriber::layer::SubscriberExt;
        if matches!(self, Observe::Spans | Observe::Both) {
            let subscriber = tracing_subscriber::registry()
                .with(tracing_subscriber::EnvFilter::new("diesel_runsync=info"));
            tracing::subscriber::set_global_default(subscriber)?;
        }
        if matches!(self, Observe::Metrics | Observe::Both) {
            metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BackendArg {
    Sqlite,
    Postgres,
    Mysql,
    All,
}

impl BackendArg {
    fn backends(self) -> Vec<Backend> {
        match self {
            BackendArg::Sqlite => vec![Backend::Sqlite],
            BackendArg::Postgres => vec![Backend::Postgres],
            BackendArg::Mysql => vec![Backend::Mysql],
            BackendArg::All => vec![Backend::Sqlite, Backend::Postgres, Backend::Mysql],
        }
    }
}

/// An implementation of W(N).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Impl {
    Facade,
    /// The facade with `EngineOptions::run_inline`: calls
    /// without a deadline on the caller's thread, not the blocking pool.
    #[value(name = "facade-inline")]
    FacadeInline,
    /// The facade on the backend's native connection type.
    #[value(name = "facade-native")]
    FacadeNative,
    Sync,
    #[value(name = "diesel-async")]
    DieselAsync,
    /// deadpool-diesel: a deadpool of sync connections, `interact`.
    #[value(name = "deadpool-diesel")]
    Deadpool,
    Sqlx,
    /// Diagnostic: the `sync` implementation run on a fresh `std::thread`.
    #[value(name = "sync-thread")]
    SyncThread,
    /// Diagnostic: the `sync` implementation run inside
    /// `tokio::task::spawn_blocking` (the facade's thread, without the facade).
    #[value(name = "sync-blocking")]
    SyncBlocking,
    /// Diagnostic: `sync` inside `tokio::task::block_in_place` on a runtime
    /// worker (W(N)); under load, each unit on a raw connection of a pool of
    /// `--pool-size` inside `block_in_place`, on the task's own worker
    /// thread: a unit with no hop to the blocking pool and back.
    #[value(name = "inline")]
    Inline,
    /// Diagnostic, load only: `--pool-size` threads, each owning a raw
    /// connection, running queued units back to back (no checkout, no hop).
    #[value(name = "drain")]
    Drain,
}

impl Impl {
    fn name(self) -> &'static str {
        match self {
            Impl::Facade => "facade",
            Impl::FacadeInline => "facade-inline",
            Impl::FacadeNative => "facade-native",
            Impl::Sync => "sync",
            Impl::DieselAsync => "diesel-async",
            Impl::Deadpool => "deadpool-diesel",
            Impl::Sqlx => "sqlx",
            Impl::SyncThread => "sync-thread",
            Impl::SyncBlocking => "sync-blocking",
            Impl::Inline => "inline",
            Impl::Drain => "drain",
        }
    }
}

/// A small xorshift generator for keys (no dependency needed).
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// A key in 1..=rows.
    pub fn key(&mut self, rows: usize) -> i32 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        (x % rows.max(1) as u64) as i32 + 1
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    cli.observe.install()?;
    eprintln!("observe: {:?}", cli.observe);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let sqlite_path = cli.sqlite_path.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("runsync-bench-{}.db", std::process::id()))
    });
    let mut out = std::io::stdout().lock();
    let mut report = Report::default();
    let result = (|| -> anyhow::Result<()> {
        for backend in cli.backend.backends() {
            let url = match backend {
                Backend::Sqlite => sqlite_path.display().to_string(),
                Backend::Postgres => plaintext_pg_url(&cli.pg_url),
                Backend::Mysql => cli.mysql_url.clone(),
            };
            clean(&url).with_context(|| {
                format!(
                    "preparing {}",
                    DatabaseUrl::parse(&url)
                        .map(|u| u.to_string())
                        .unwrap_or_default()
                )
            })?;
            if !cli.no_workload {
                let migration = async_impl::migration(backend)?;
                for &n in &cli.n {
                    workload(
                        &cli,
                        &runtime,
                        backend,
                        &url,
                        n,
                        &migration,
                        &mut out,
                        &mut report,
                    )?;
                }
            }
            if cli.micro {
                micro(&cli, &runtime, backend, &url, &mut out, &mut report)?;
            }
            if cli.concurrency {
                concurrency(&cli, &runtime, backend, &url, &mut out, &mut report)?;
            }
        }
        Ok(())
    })();
    if cli.sqlite_path.is_none() {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", sqlite_path.display()));
        }
    }
    result?;
    if cli.rss {
        let kib = peak_rss_kib()?;
        let impls: Vec<&str> = cli.impls.iter().map(|i| i.name()).collect();
        writeln!(
            out,
            "{{\"summary\": \"peak_rss\", \"n\": {:?}, \"backend\": \"{:?}\", \"impls\": \"{}\", \"vmhwm_kib\": {kib}}}",
            cli.n,
            cli.backend,
            impls.join(",")
        )?;
        report.lines.push(format!(
            "peak RSS (VmHWM) n={:?} backend={:?} impls={}: {:.1} MiB",
            cli.n,
            cli.backend,
            impls.join(","),
            kib as f64 / 1024.0
        ));
    }
    eprintln!();
    for line in &report.lines {
        eprintln!("{line}");
    }
    Ok(())
}

/// The PostgreSQL URL with `sslmode=disable` unless it names a mode: libpq
/// (the facade, sync, pgbench) would otherwise negotiate TLS with a server
/// that has `ssl = on`, while diesel-async (tokio-postgres with `NoTls`) and
/// sqlx (built without TLS) speak plaintext. On loopback, all speak plaintext.
fn plaintext_pg_url(url: &str) -> String {
    if url.contains("sslmode=") {
        url.to_owned()
    } else if url.contains('?') {
        format!("{url}&sslmode=disable")
    } else {
        format!("{url}?sslmode=disable")
    }
}

/// Human-readable lines printed to stderr at the end.
#[derive(Default)]
struct Report {
    lines: Vec<String>,
}

fn median_u64(values: &[u64]) -> u64 {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    sorted.get(sorted.len() / 2).copied().unwrap_or(0)
}

fn peak_rss_kib() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmHWM in /proc/self/status")
}

#[allow(clippy::too_many_arguments)]
fn workload(
    cli: &Cli,
    runtime: &tokio::runtime::Runtime,
    backend: Backend,
    url: &str,
    n: usize,
    migration: &async_impl::Migration,
    out: &mut impl Write,
    report: &mut Report,
) -> anyhow::Result<()> {
    let families = Arc::new(workload_families(n));
    let counter = Counter::default();
    let mut impls = cli.impls.clone();
    impls.retain(|&imp| imp != Impl::Drain); // a load figure only
    impls.sort();
    impls.dedup();
    // (impl, phase) -> per-run values.
    let mut seconds: BTreeMap<(Impl, &'static str), Vec<f64>> = BTreeMap::new();
    let mut queries: BTreeMap<(Impl, &'static str), Vec<u64>> = BTreeMap::new();
    // The floor: pgbench's µs per child SELECT, and each implementation's
    // lazy µs per statement, run by run.
    let floor_tool = match backend {
        Backend::Postgres => cli.pgbench.as_str(),
        Backend::Mysql => cli.mysql_floor.as_str(),
        Backend::Sqlite => "",
    };
    let floor_enabled = !floor_tool.is_empty() && !cli.no_floor;
    let mut floor_us: Vec<f64> = Vec::new();
    let mut floor_command = String::new();
    let mut lazy_us: BTreeMap<Impl, Vec<f64>> = BTreeMap::new();
    let mut steps: Vec<Step> = impls.iter().copied().map(Step::Run).collect();
    if floor_enabled {
        steps.push(Step::Floor);
    }
    for run in 0..cli.warmup + cli.runs {
        let recorded = run >= cli.warmup;
        // Rotate the order, so no implementation always goes first.
        let mut order = steps.clone();
        let len = order.len().max(1);
        order.rotate_left(run % len);
        let mut run_floor = None;
        let mut run_lazy: Vec<(Impl, f64)> = Vec::new();
        for step in order {
            let imp = match step {
                Step::Run(imp) => imp,
                Step::Floor => {
                    // The tables hold W(N)'s rows from the step before (the
                    // floor never goes first in run 0; later runs find the
                    // previous run's rows).
                    let transactions = (n + 3).max(500);
                    let measured = if backend == Backend::Mysql {
                        Some(figures::mysql_floor(floor_tool, url, n, transactions)?)
                    } else {
                        figures::pgbench_floor(floor_tool, url, n, transactions)?
                    };
                    match measured {
                        Some((us, command)) => {
                            run_floor = Some(us);
                            floor_command = command;
                        }
                        None => {
                            if run == 0 {
                                eprintln!("floor: no {floor_tool} binary; skipped");
                            }
                        }
                    }
                    continue;
                }
            };
            let phases = match imp {
                Impl::Facade | Impl::FacadeInline => {
                    let (url, families, counter) =
                        (url.to_owned(), families.clone(), counter.clone());
                    let size = cli.pool_size;
                    let inline = imp == Impl::FacadeInline;
                    on_worker(runtime, async move {
                        sync_impls::facade(&url, n, families, &counter, size, inline).await
                    })?
                }
                Impl::FacadeNative | Impl::Deadpool => {
                    let runner = if imp == Impl::Deadpool {
                        native_impl::Runner::Deadpool
                    } else {
                        native_impl::Runner::Facade
                    };
                    let args = native_impl::WorkloadArgs {
                        url: url.to_owned(),
                        n,
                        families: families.clone(),
                        counter: counter.clone(),
                        migration: migration.clone(),
                        pool_size: cli.pool_size,
                    };
                    on_worker(runtime, native_impl::workload(runner, backend, args))?
                }
                Impl::Sync => sync_impls::sync(url, n, &families, &counter)?,
                Impl::SyncThread => {
                    let (url, families, counter) =
                        (url.to_owned(), families.clone(), counter.clone());
                    std::thread::spawn(move || sync_impls::sync(&url, n, &families, &counter))
                        .join()
                        .map_err(|_| anyhow::anyhow!("sync-thread panicked"))??
                }
                Impl::SyncBlocking => {
                    let (url, families, counter) =
                        (url.to_owned(), families.clone(), counter.clone());
                    runtime
                        .block_on(runtime.spawn_blocking(move || {
                            sync_impls::sync(&url, n, &families, &counter)
                        }))??
                }
                Impl::Drain => unreachable!("drain is left out of W(N) above"),
                Impl::Inline => {
                    let (url, families, counter) =
                        (url.to_owned(), families.clone(), counter.clone());
                    runtime.block_on(runtime.spawn(async move {
                        tokio::task::block_in_place(|| {
                            sync_impls::sync(&url, n, &families, &counter)
                        })
                    }))??
                }
                Impl::DieselAsync => {
                    let (url, families, counter, migration) = (
                        url.to_owned(),
                        families.clone(),
                        counter.clone(),
                        migration.clone(),
                    );
                    on_worker(runtime, async move {
                        let (url, m) = (&url, &migration);
                        match backend {
                            Backend::Postgres => {
                                async_impl::postgres(url, n, &families, &counter, m).await
                            }
                            Backend::Mysql => {
                                async_impl::mysql(url, n, &families, &counter, m).await
                            }
                            Backend::Sqlite => {
                                async_impl::sqlite(url, n, &families, &counter, m).await
                            }
                        }
                    })?
                }
                Impl::Sqlx => {
                    let (url, families, counter, migration) = (
                        url.to_owned(),
                        families.clone(),
                        counter.clone(),
                        migration.clone(),
                    );
                    let size = cli.pool_size;
                    on_worker(runtime, async move {
                        let (url, m) = (&url, &migration);
                        match backend {
                            Backend::Postgres => {
                                sqlx_impl::postgres(url, n, &families, &counter, m, size).await
                            }
                            Backend::Mysql => {
                                sqlx_impl::mysql(url, n, &families, &counter, m, size).await
                            }
                            Backend::Sqlite => {
                                sqlx_impl::sqlite(url, n, &families, &counter, m, size).await
                            }
                        }
                    })?
                }
            };
            if !recorded {
                continue;
            }
            for p in &phases {
                writeln!(
                    out,
                    "{{\"phase\": \"{}\", \"n\": {n}, \"seconds\": {:.6}, \"backend\": \"{}\", \"queries\": {}, \"impl\": \"{}\"}}",
                    p.name,
                    p.seconds,
                    backend.name(),
                    p.queries,
                    imp.name()
                )?;
                seconds.entry((imp, p.name)).or_default().push(p.seconds);
                queries.entry((imp, p.name)).or_default().push(p.queries);
                if p.name == "run_sync_lazy" && p.queries > 0 {
                    run_lazy.push((imp, p.seconds * 1e6 / p.queries as f64));
                }
            }
            out.flush()?;
        }
        if let (true, Some(floor)) = (recorded, run_floor) {
            writeln!(
                out,
                "{{\"summary\": \"floor_run\", \"n\": {n}, \"backend\": \"{}\", \"floor_us_per_statement\": {floor:.3}, \"run\": {}}}",
                backend.name(),
                run - cli.warmup
            )?;
            floor_us.push(floor);
            for (imp, us) in run_lazy {
                lazy_us.entry(imp).or_default().push(us / floor);
            }
        }
    }

    // Medians.
    report.lines.push(format!(
        "== {} N={n}, {} runs: median seconds (queries)",
        backend.name(),
        cli.runs
    ));
    let phase_names = phases::PHASES;
    let mut header = format!("{:<14}", "impl");
    for phase in phase_names {
        header.push_str(&format!(" {phase:>22}"));
    }
    report.lines.push(header);
    for &imp in &impls {
        let mut row = format!("{:<14}", imp.name());
        for phase in phase_names {
            let Some(values) = seconds.get(&(imp, phase)) else {
                continue;
            };
            let m = median(values);
            let q = median_u64(&queries[&(imp, phase)]);
            row.push_str(&format!(" {:>13.6} ({q:>6})", m));
            writeln!(
                out,
                "{{\"summary\": \"median\", \"phase\": \"{phase}\", \"n\": {n}, \"seconds\": {m:.6}, \"backend\": \"{}\", \"queries\": {q}, \"impl\": \"{}\", \"runs\": {}}}",
                backend.name(),
                imp.name(),
                values.len()
            )?;
        }
        report.lines.push(row);
    }

    // Ratios, run by run (same run, same machine state), then their median.
    for (num, den) in [
        (Impl::Facade, Impl::Sync),
        (Impl::FacadeInline, Impl::Facade),
        (Impl::Facade, Impl::FacadeNative),
        (Impl::FacadeNative, Impl::Sync),
        (Impl::Facade, Impl::DieselAsync),
        (Impl::Facade, Impl::Deadpool),
        (Impl::Facade, Impl::Sqlx),
        (Impl::FacadeNative, Impl::Sqlx),
        (Impl::Sync, Impl::Sqlx),
        (Impl::DieselAsync, Impl::Sqlx),
    ] {
        for phase in ["run_sync_lazy", "total"] {
            let (Some(a), Some(b)) = (seconds.get(&(num, phase)), seconds.get(&(den, phase)))
            else {
                continue;
            };
            let per_run: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
            let of_runs = median(&per_run);
            let of_medians = median(a) / median(b);
            writeln!(
                out,
                "{{\"summary\": \"ratio\", \"ratio\": \"{}/{}\", \"phase\": \"{phase}\", \"n\": {n}, \"backend\": \"{}\", \"median_of_run_ratios\": {of_runs:.4}, \"ratio_of_medians\": {of_medians:.4}, \"runs\": {}}}",
                num.name(),
                den.name(),
                backend.name(),
                per_run.len()
            )?;
            report.lines.push(format!(
                "ratio {}/{} {phase}: median of run ratios {of_runs:.3}, ratio of medians {of_medians:.3} (runs: {})",
                num.name(),
                den.name(),
                per_run
                    .iter()
                    .map(|r| format!("{r:.3}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ));
        }
    }

    // The floor: lazy time per statement / the floor's, run by run.
    if !floor_us.is_empty() {
        let floor = median(&floor_us);
        let (tool, how) = match backend {
            Backend::Mysql => ("mysql_floor", "the C client library, prepared"),
            _ => ("pgbench", "pgbench -M prepared"),
        };
        report.lines.push(format!(
            "floor {} N={n}: {how}, 1 client, child SELECT: median {floor:.1} us per statement (runs: {})   [{floor_command}]",
            backend.name(),
            floor_us
                .iter()
                .map(|v| format!("{v:.1}"))
                .collect::<Vec<_>>()
                .join(" ")
        ));
        for (imp, ratios) in &lazy_us {
            let lazy = median(&seconds[&(*imp, "run_sync_lazy")]) * 1e6
                / median_u64(&queries[&(*imp, "run_sync_lazy")]).max(1) as f64;
            let of_runs = median(ratios);
            writeln!(
                out,
                "{{\"summary\": \"floor\", \"n\": {n}, \"backend\": \"{}\", \"impl\": \"{}\", \"floor_tool\": \"{tool}\", \"lazy_us_per_statement\": {lazy:.3}, \"floor_us_per_statement\": {floor:.3}, \"median_of_run_ratios\": {of_runs:.4}, \"runs\": {}}}",
                backend.name(),
                imp.name(),
                ratios.len()
            )?;
            report.lines.push(format!(
                "floor {} N={n}: {:<13} lazy {lazy:>7.1} us per statement; / {tool}'s: median of run ratios {of_runs:.3} (runs: {})",
                backend.name(),
                imp.name(),
                ratios
                    .iter()
                    .map(|r| format!("{r:.3}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ));
        }
    }
    out.flush()?;
    Ok(())
}

/// One step of a W(N) run: an implementation, or the floor (pgbench).
#[derive(Debug, Clone, Copy)]
enum Step {
    Run(Impl),
    Floor,
}

fn micro_line(
    out: &mut impl Write,
    report: &mut Report,
    backend: Backend,
    figure: &str,
    imp: &str,
    samples: &[Duration],
) -> anyhow::Result<()> {
    let us = micros(samples);
    let (p50, p99) = (median(&us), percentile(&us, 99.0));
    writeln!(
        out,
        "{{\"summary\": \"micro\", \"figure\": \"{figure}\", \"backend\": \"{}\", \"impl\": \"{imp}\", \"median_us\": {p50:.2}, \"p99_us\": {p99:.2}, \"iters\": {}}}",
        backend.name(),
        us.len()
    )?;
    report.lines.push(format!(
        "micro {:<8} {figure:<22} {imp:<13} median {p50:>8.2} us  p99 {p99:>8.2} us  ({} iters)",
        backend.name(),
        us.len()
    ));
    Ok(())
}

fn micro(
    cli: &Cli,
    runtime: &tokio::runtime::Runtime,
    backend: Backend,
    url: &str,
    out: &mut impl Write,
    report: &mut Report,
) -> anyhow::Result<()> {
    sync_impls::prepare_rows(url, cli.rows)?;
    let (url_owned, rows, iters) = (url.to_owned(), cli.rows, cli.micro_iters);
    let m = on_worker(runtime, async move {
        figures::micro(backend, &url_owned, rows, iters).await
    })?;
    micro_line(
        out,
        report,
        backend,
        "spawn_blocking",
        "tokio",
        &m.spawn_blocking,
    )?;
    micro_line(
        out,
        report,
        backend,
        "empty_run_sync",
        "facade",
        &m.empty_run_sync,
    )?;
    micro_line(
        out,
        report,
        backend,
        "session_begin_commit",
        "facade",
        &m.session_begin_commit,
    )?;
    micro_line(
        out,
        report,
        backend,
        "engine_run_sync",
        "facade",
        &m.engine_run_sync,
    )?;
    micro_line(
        out,
        report,
        backend,
        "engine_run_sync_pinged",
        "facade",
        &m.engine_run_sync_pinged,
    )?;
    micro_line(out, report, backend, "pk_select", "facade", &m.pk_facade)?;
    micro_line(out, report, backend, "pk_select", "sync", &m.pk_sync)?;
    micro_line(
        out,
        report,
        backend,
        "pk_select",
        "diesel-async",
        &m.pk_peer,
    )?;
    micro_line(out, report, backend, "pk_select", "sqlx", &m.pk_sqlx)?;
    micro_line(
        out,
        report,
        backend,
        "pk_select",
        "spawn_blocking+raw",
        &m.pk_hop,
    )?;
    out.flush()?;
    Ok(())
}

/// One implementation's figures at one load level.
struct LoadFigures {
    name: String,
    connections: usize,
    seconds: f64,
    transactions: usize,
    failures: usize,
    tps: f64,
    p50: f64,
    p99: f64,
    mean: f64,
    max: f64,
    /// The fewest units one task (pgbench: one client) finished.
    min_units: usize,
}

impl LoadFigures {
    fn from_load(name: &str, load: &figures::Load) -> Self {
        let us = micros(&load.latencies);
        LoadFigures::new(
            name,
            load.connections as usize,
            load.elapsed.as_secs_f64(),
            load.transactions as f64 / load.elapsed.as_secs_f64(),
            &us,
            load.failures,
            load.min_units_per_task,
        )
    }

    fn new(
        name: &str,
        connections: usize,
        seconds: f64,
        tps: f64,
        us: &[f64],
        failures: usize,
        min_units: usize,
    ) -> Self {
        LoadFigures {
            name: name.to_owned(),
            connections,
            seconds,
            transactions: us.len(),
            failures,
            tps,
            p50: median(us),
            p99: percentile(us, 99.0),
            mean: us.iter().sum::<f64>() / us.len().max(1) as f64,
            max: us.iter().copied().fold(0.0, f64::max),
            min_units,
        }
    }
}

/// One load level's participants.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Loader {
    Facade,
    FacadeInline,
    FacadeNative,
    SyncThreads,
    DieselAsync,
    Deadpool,
    Sqlx,
    /// Diagnostic: units inside `block_in_place` (`--impls inline`).
    Inline,
    /// Diagnostic: units queued to connection-owning threads (`--impls drain`).
    Drain,
    /// pgbench with one connection per client (at most --pgbench-max-clients).
    Pgbench,
    /// pgbench with the pools' connection count (for C above it).
    PgbenchPool,
}

/// The async pooled peers of issue 18's goals (8 connections each).
const ASYNC_PEERS: [&str; 3] = ["diesel-async", "deadpool-diesel", "sqlx"];

/// The goal lines of one load level: for `facade` and `facade-inline`, the
/// throughput over the best peer's and the p99 over the best p99 among
/// peers that served every task (each finished at least two units),
/// computed within each round, and their median over the rounds. Peers:
/// the async pooled peers ("pooled"); pgbench with a connection per task
/// ("pgbench"); pgbench on the pools' 8 connections ("pgbench-pool").
/// Also each implementation's median throughput and p99 over the rounds.
fn goal_lines(
    backend: Backend,
    clients: usize,
    rounds: &[Vec<LoadFigures>],
    out: &mut impl Write,
    report: &mut Report,
) -> anyhow::Result<()> {
    let n = rounds.len();
    if n > 1 {
        let mut names: Vec<&str> = Vec::new();
        for f in rounds.iter().flatten() {
            if !names.contains(&f.name.as_str()) {
                names.push(&f.name);
            }
        }
        for name in names {
            let of: Vec<&LoadFigures> =
                rounds.iter().flatten().filter(|f| f.name == name).collect();
            let tps = stats::median(&of.iter().map(|f| f.tps).collect::<Vec<_>>());
            let p99 = stats::median(&of.iter().map(|f| f.p99).collect::<Vec<_>>());
            let min_units = of.iter().map(|f| f.min_units).min().unwrap_or(0);
            writeln!(
                out,
                "{{\"summary\": \"concurrency_median\", \"backend\": \"{}\", \"impl\": \"{name}\", \"clients\": {clients}, \"rounds\": {}, \"tps\": {tps:.1}, \"p99_us\": {p99:.1}, \"min_units_per_task\": {min_units}}}",
                backend.name(),
                of.len()
            )?;
            report.lines.push(format!(
                "concurrency {:<8} C={clients:<3} {name:<15} median of {}: {tps:>9.1} tx/s  p99 {p99:>9.1} us  min/task {min_units:>5}",
                backend.name(),
                of.len()
            ));
        }
    }
    for subject in ["facade", "facade-inline"] {
        for label in ["pooled", "pgbench", "pgbench-pool"] {
            let mut tps_ratios = Vec::new();
            let mut p99_ratios = Vec::new();
            let mut best = (String::new(), String::new());
            for round in rounds {
                let Some(me) = round.iter().find(|f| f.name == subject) else {
                    continue;
                };
                let others: Vec<&LoadFigures> = round
                    .iter()
                    .filter(|f| match label {
                        "pooled" => ASYNC_PEERS.contains(&f.name.as_str()),
                        name => f.name == name,
                    })
                    .collect();
                let Some(best_tps) = others.iter().max_by(|a, b| a.tps.total_cmp(&b.tps)) else {
                    continue;
                };
                tps_ratios.push(me.tps / best_tps.tps);
                best.0 = best_tps.name.clone();
                if let Some(best_p99) = others
                    .iter()
                    .filter(|f| f.min_units >= 2)
                    .min_by(|a, b| a.p99.total_cmp(&b.p99))
                {
                    p99_ratios.push(me.p99 / best_p99.p99);
                    best.1 = best_p99.name.clone();
                }
            }
            if tps_ratios.is_empty() {
                continue;
            }
            let tps_ratio = stats::median(&tps_ratios);
            let p99_ratio = stats::median(&p99_ratios);
            let list = |v: &[f64]| {
                v.iter()
                    .map(|r| format!("{r:.3}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            writeln!(
                out,
                "{{\"summary\": \"concurrency_goal\", \"backend\": \"{}\", \"impl\": \"{subject}\", \"clients\": {clients}, \"others\": \"{label}\", \"rounds\": {}, \"tps_over_best\": {tps_ratio:.4}, \"tps_ratios\": [{}], \"best_tps_impl\": \"{}\", \"p99_over_best\": {p99_ratio:.4}, \"p99_ratios\": [{}], \"best_p99_impl\": \"{}\"}}",
                backend.name(),
                tps_ratios.len(),
                list(&tps_ratios),
                best.0,
                list(&p99_ratios),
                best.1
            )?;
            report.lines.push(format!(
                "concurrency {:<8} C={clients:<3} {subject} vs {label}: tps {tps_ratio:.3} x best (last round's best {}), p99 {p99_ratio:.3} x best serving every task ({}){}",
                backend.name(),
                best.0,
                best.1,
                if n > 1 {
                    format!("; median of {n} rounds: tps [{}], p99 [{}]", list(&tps_ratios), list(&p99_ratios))
                } else {
                    String::new()
                }
            ));
        }
    }
    out.flush()?;
    Ok(())
}

fn concurrency(
    cli: &Cli,
    runtime: &tokio::runtime::Runtime,
    backend: Backend,
    url: &str,
    out: &mut impl Write,
    report: &mut Report,
) -> anyhow::Result<()> {
    sync_impls::prepare_rows(url, cli.rows)?;
    let duration = Duration::from_secs(cli.duration);
    let size = cli.pool_size;
    let mut loaders = Vec::new();
    for imp in &cli.impls {
        let loader = match imp {
            Impl::Facade => Loader::Facade,
            Impl::FacadeInline => Loader::FacadeInline,
            Impl::FacadeNative => Loader::FacadeNative,
            Impl::Sync => Loader::SyncThreads,
            Impl::DieselAsync => Loader::DieselAsync,
            Impl::Deadpool => Loader::Deadpool,
            Impl::Sqlx => Loader::Sqlx,
            Impl::Inline => Loader::Inline,
            Impl::Drain => Loader::Drain,
            Impl::SyncThread | Impl::SyncBlocking => continue,
        };
        if !loaders.contains(&loader) {
            loaders.push(loader);
        }
    }
    let pgbench = backend == Backend::Postgres && !cli.pgbench.is_empty();
    // MySQL/MariaDB: the server's own counts of what each run sent.
    let mut status = if backend == Backend::Mysql {
        Some(mysql_status::StatusReader::open(url)?)
    } else {
        None
    };
    // One unrecorded level of load first: whichever implementation ran
    // first in the process paid for it (on SQLite about 0.6x of its
    // throughput at C = 8, after a warm-up of 1 s too).
    let facade_load = |clients, inline| {
        runtime.block_on(figures::facade_load(
            url,
            cli.rows,
            clients,
            duration,
            EngineOptions::default().max_size(size).run_inline(inline),
            sync_impls::unit_of_work,
        ))
    };
    if let (Some(&clients), true) = (cli.clients.first(), cli.warmup > 0) {
        facade_load(clients, false)?;
        eprintln!(
            "concurrency {backend}: {} s of facade load at C={clients} run first, unrecorded",
            duration.as_secs()
        );
    }
    for (level, &clients) in cli.clients.iter().enumerate() {
        let mut order = loaders.clone();
        if pgbench {
            order.push(Loader::Pgbench);
            if clients > size as usize {
                order.push(Loader::PgbenchPool);
            }
        }
        // Rotate the order from level to level, and from round to round.
        let len = order.len().max(1);
        order.rotate_left(level % len);
        let mut rounds: Vec<Vec<LoadFigures>> = Vec::new();
        for round in 0..cli.load_runs.max(1) {
            if round > 0 {
                order.rotate_left(1);
            }
            let mut figures_at: Vec<LoadFigures> = Vec::new();
            for &loader in &order {
                let before = status.as_mut().map(|s| s.snapshot()).transpose()?;
                let (figures, note) = match loader {
                    Loader::Facade => {
                        let load = facade_load(clients, false)?;
                        (LoadFigures::from_load("facade", &load), load.first_error)
                    }
                    Loader::FacadeInline => {
                        let load = facade_load(clients, true)?;
                        let figures = LoadFigures::from_load("facade-inline", &load);
                        (figures, load.first_error)
                    }
                    Loader::FacadeNative | Loader::Deadpool => {
                        let (runner, name) = if loader == Loader::Deadpool {
                            (native_impl::Runner::Deadpool, "deadpool-diesel")
                        } else {
                            (native_impl::Runner::Facade, "facade-native")
                        };
                        let load = runtime.block_on(native_impl::load(
                            runner, backend, url, cli.rows, clients, duration, size,
                        ))?;
                        (LoadFigures::from_load(name, &load), load.first_error)
                    }
                    Loader::SyncThreads => {
                        let load =
                            figures::sync_threads_load(url, cli.rows, clients, duration, size)?;
                        (
                            LoadFigures::from_load("sync-threads", &load),
                            load.first_error,
                        )
                    }
                    Loader::Inline => {
                        let load = runtime.block_on(figures::inline_load(
                            url, cli.rows, clients, duration, size,
                        ))?;
                        (LoadFigures::from_load("inline", &load), load.first_error)
                    }
                    Loader::Drain => {
                        let load = runtime.block_on(figures::drain_load(
                            url, cli.rows, clients, duration, size,
                        ))?;
                        (LoadFigures::from_load("drain", &load), load.first_error)
                    }
                    Loader::DieselAsync => {
                        let load = runtime.block_on(figures::diesel_async_load(
                            backend, url, cli.rows, clients, duration, size,
                        ))?;
                        (
                            LoadFigures::from_load("diesel-async", &load),
                            load.first_error,
                        )
                    }
                    Loader::Sqlx => {
                        let load = runtime.block_on(figures::sqlx_load(
                            backend, url, cli.rows, clients, duration, size,
                        ))?;
                        (LoadFigures::from_load("sqlx", &load), load.first_error)
                    }
                    Loader::Pgbench | Loader::PgbenchPool => {
                        let (name, conns) = if loader == Loader::Pgbench {
                            ("pgbench", clients.min(cli.pgbench_max_clients))
                        } else {
                            ("pgbench-pool", size as usize)
                        };
                        let Some(pg) =
                            figures::pgbench(&cli.pgbench, url, cli.rows, conns, duration)?
                        else {
                            if level == 0 && loader == Loader::Pgbench {
                                eprintln!(
                                    "concurrency: no {} binary; pgbench skipped",
                                    cli.pgbench
                                );
                            }
                            continue;
                        };
                        let mut figures = LoadFigures::new(
                            name,
                            pg.clients,
                            duration.as_secs_f64(),
                            pg.tps,
                            &pg.latencies_us,
                            pg.failures,
                            pg.min_units_per_client,
                        );
                        figures.name = name.to_owned();
                        (figures, Some(pg.command))
                    }
                };
                let f = &figures;
                if let (Some(reader), Some(before)) = (status.as_mut(), before) {
                    let after = reader.snapshot()?;
                    let counts = before.per_unit(&after, f.transactions + f.failures);
                    let fields: Vec<String> = counts
                        .iter()
                        .map(|(name, per)| format!("\"{name}\": {per:.3}"))
                        .collect();
                    writeln!(
                        out,
                        "{{\"summary\": \"server_counts_per_unit\", \"backend\": \"{}\", \"impl\": \"{}\", \"clients\": {clients}, {}}}",
                        backend.name(),
                        f.name,
                        fields.join(", ")
                    )?;
                    let text: Vec<String> = counts
                        .iter()
                        .map(|(name, per)| format!("{name} {per:.2}"))
                        .collect();
                    report.lines.push(format!(
                        "server counts {:<8} C={clients:<3} {:<15} per unit: {}",
                        backend.name(),
                        f.name,
                        text.join(", ")
                    ));
                }
                writeln!(
                    out,
                    "{{\"summary\": \"concurrency\", \"backend\": \"{}\", \"impl\": \"{}\", \"clients\": {clients}, \"round\": {round}, \"connections\": {}, \"seconds\": {:.3}, \"transactions\": {}, \"failures\": {}, \"tps\": {:.1}, \"p50_us\": {:.1}, \"p99_us\": {:.1}, \"mean_us\": {:.1}, \"max_us\": {:.1}, \"min_units_per_task\": {}}}",
                    backend.name(),
                    f.name,
                    f.connections,
                    f.seconds,
                    f.transactions,
                    f.failures,
                    f.tps,
                    f.p50,
                    f.p99,
                    f.mean,
                    f.max,
                    f.min_units
                )?;
                report.lines.push(format!(
                "concurrency {:<8} C={clients:<3} {:<15} ({:>2} conns) {:>9.1} tx/s  p50 {:>9.1} us  p99 {:>9.1} us  mean {:>9.1} us  max {:>10.1} us  min/task {:>5}  failures {}{}",
                backend.name(),
                f.name,
                f.connections,
                f.tps,
                f.p50,
                f.p99,
                f.mean,
                f.max,
                f.min_units,
                f.failures,
                note.map(|n| format!("   [{n}]")).unwrap_or_default()
            ));
                out.flush()?;
                figures_at.push(figures);
            }
            rounds.push(figures_at);
        }
        goal_lines(backend, clients, &rounds, out, report)?;
        out.flush()?;
    }
    Ok(())
}
