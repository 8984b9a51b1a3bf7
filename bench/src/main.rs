//! The W(N) workload benchmark: W(N) (defined in `bench/WORKLOAD.md`) run
//! by three implementations in the same process, run after run:
//!
//! - `facade`: diesel-runsync's `Engine` + `AsyncSession::run_sync` with the
//!   sync core of the `greenlet-orm` library (`greenlet_orm::queries`,
//!   `greenlet_orm::migrations`);
//! - `sync`: the same functions on a raw connection, one thread, no tokio;
//! - `diesel-async`: the same work with `diesel_async::RunQueryDsl`.
//!
//! Prints one JSON line per phase per implementation per run, then summary
//! lines (medians, ratios from the same runs). `--micro` adds round-trip
//! figures, `--concurrency` the load test (beside `pgbench` on PostgreSQL),
//! `--rss` the peak resident set. See BENCHMARKS.md.
//!
//! ```text
//! cargo run -p runsync-bench --release --bin bench -- --n 10000 --backend postgres --runs 5
//! ```

mod async_impl;
mod count;
mod figures;
mod stats;
mod sync_impls;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use diesel::connection::SimpleConnection;
use diesel_runsync::{Backend, DatabaseUrl, PoolableConnection};
use greenlet_orm::AnyConnection;
use greenlet_orm::queries::workload_families;

use crate::count::Counter;
use crate::stats::{median, micros, percentile};

/// Runs W(N) with the facade, raw sync Diesel and diesel-async, and prints JSON lines.
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

    /// Unrecorded warm-up runs per N before the measured ones.
    #[arg(long, default_value_t = 1)]
    warmup: usize,

    /// Implementations to run (comma-separated).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "facade,sync,diesel-async"
    )]
    impls: Vec<Impl>,

    /// PostgreSQL URL.
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

    /// Pool size of the facade's engine.
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

    /// Concurrency: SELECT+UPDATE transactions from C tasks through sessions.
    #[arg(long)]
    concurrency: bool,

    /// Client counts C for --concurrency.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    clients: Vec<usize>,

    /// Seconds per concurrency level.
    #[arg(long, default_value_t = 5)]
    duration: u64,

    /// Rows of `a` for the micro and concurrency figures.
    #[arg(long, default_value_t = 10_000)]
    rows: usize,

    /// pgbench binary, run beside --concurrency on PostgreSQL ("" to skip).
    #[arg(long, default_value = "pgbench")]
    pgbench: String,

    /// Print the process's peak RSS (VmHWM) at the end.
    #[arg(long)]
    rss: bool,
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
    Sync,
    #[value(name = "diesel-async")]
    DieselAsync,
    /// Diagnostic: the `sync` implementation run on a fresh `std::thread`.
    #[value(name = "sync-thread")]
    SyncThread,
    /// Diagnostic: the `sync` implementation run inside
    /// `tokio::task::spawn_blocking` (the facade's thread, without the facade).
    #[value(name = "sync-blocking")]
    SyncBlocking,
}

impl Impl {
    fn name(self) -> &'static str {
        match self {
            Impl::Facade => "facade",
            Impl::Sync => "sync",
            Impl::DieselAsync => "diesel-async",
            Impl::SyncThread => "sync-thread",
            Impl::SyncBlocking => "sync-blocking",
        }
    }
}

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
                Backend::Postgres => cli.pg_url.clone(),
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

/// Human-readable lines printed to stderr at the end.
#[derive(Default)]
struct Report {
    lines: Vec<String>,
}

/// Drops whatever an earlier, interrupted run left (untimed).
fn clean(url: &str) -> anyhow::Result<()> {
    let mut conn = <AnyConnection as PoolableConnection>::connect(&DatabaseUrl::parse(url)?)?;
    conn.batch_execute("DROP TABLE IF EXISTS b")?;
    conn.batch_execute("DROP TABLE IF EXISTS a")?;
    conn.batch_execute("DROP TABLE IF EXISTS __diesel_schema_migrations")?;
    // Leave the schema migrated, so every schema phase, the first included,
    // reverts and re-applies the migration.
    greenlet_orm::migrations::create_all(&mut conn)?;
    Ok(())
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
    impls.sort();
    impls.dedup();
    // (impl, phase) -> per-run values.
    let mut seconds: BTreeMap<(Impl, &'static str), Vec<f64>> = BTreeMap::new();
    let mut queries: BTreeMap<(Impl, &'static str), Vec<u64>> = BTreeMap::new();
    for run in 0..cli.warmup + cli.runs {
        let recorded = run >= cli.warmup;
        // Rotate the order, so no implementation always goes first.
        let mut order = impls.clone();
        let len = order.len().max(1);
        order.rotate_left(run % len);
        for imp in order {
            let phases = match imp {
                Impl::Facade => runtime.block_on(sync_impls::facade(
                    url,
                    n,
                    families.clone(),
                    &counter,
                    cli.pool_size,
                ))?,
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
                Impl::DieselAsync => runtime.block_on(async {
                    match backend {
                        Backend::Postgres => {
                            async_impl::postgres(url, n, &families, &counter, migration).await
                        }
                        Backend::Mysql => {
                            async_impl::mysql(url, n, &families, &counter, migration).await
                        }
                        Backend::Sqlite => {
                            async_impl::sqlite(url, n, &families, &counter, migration).await
                        }
                    }
                })?,
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
            }
            out.flush()?;
        }
    }

    // Medians.
    report.lines.push(format!(
        "== {} N={n}, {} runs: median seconds (queries)",
        backend.name(),
        cli.runs
    ));
    let phase_names = [
        "connect",
        "schema",
        "insert",
        "run_sync_lazy",
        "run_sync_eager",
        "verify",
        "total",
    ];
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
        (Impl::Facade, Impl::DieselAsync),
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
    out.flush()?;
    Ok(())
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
    let m = runtime.block_on(figures::micro(backend, url, cli.rows, cli.micro_iters))?;
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
    for &clients in &cli.clients {
        let load = runtime.block_on(figures::facade_load(
            url,
            cli.rows,
            clients,
            duration,
            cli.pool_size,
        ))?;
        let us = micros(&load.latencies);
        let tps = load.transactions as f64 / load.elapsed.as_secs_f64();
        let (p50, p99) = (median(&us), percentile(&us, 99.0));
        let mean = us.iter().sum::<f64>() / us.len().max(1) as f64;
        let max = us.iter().copied().fold(0.0, f64::max);
        writeln!(
            out,
            "{{\"summary\": \"concurrency\", \"backend\": \"{}\", \"impl\": \"facade\", \"clients\": {clients}, \"pool\": {}, \"seconds\": {:.3}, \"transactions\": {}, \"tps\": {tps:.1}, \"p50_us\": {p50:.1}, \"p99_us\": {p99:.1}, \"mean_us\": {mean:.1}, \"max_us\": {max:.1}}}",
            backend.name(),
            cli.pool_size,
            load.elapsed.as_secs_f64(),
            load.transactions
        )?;
        report.lines.push(format!(
            "concurrency {:<8} C={clients:<3} facade (pool {})  {tps:>9.1} tx/s  p50 {p50:>9.1} us  p99 {p99:>9.1} us  mean {mean:>9.1} us  max {max:>10.1} us",
            backend.name(),
            cli.pool_size
        ));
        let floor = figures::sync_threads_load(url, cli.rows, clients, duration)?;
        let floor_us = micros(&floor.latencies);
        let floor_tps = floor.transactions as f64 / floor.elapsed.as_secs_f64();
        let (f50, f99) = (median(&floor_us), percentile(&floor_us, 99.0));
        writeln!(
            out,
            "{{\"summary\": \"concurrency\", \"backend\": \"{}\", \"impl\": \"sync-threads\", \"clients\": {clients}, \"pool\": {clients}, \"seconds\": {:.3}, \"transactions\": {}, \"tps\": {floor_tps:.1}, \"p50_us\": {f50:.1}, \"p99_us\": {f99:.1}}}",
            backend.name(),
            floor.elapsed.as_secs_f64(),
            floor.transactions
        )?;
        report.lines.push(format!(
            "concurrency {:<8} C={clients:<3} sync-threads ({clients} conns) {floor_tps:>9.1} tx/s  p50 {f50:>9.1} us  p99 {f99:>9.1} us   facade/sync-threads = {:.3}",
            backend.name(),
            tps / floor_tps
        ));
        if backend == Backend::Postgres && !cli.pgbench.is_empty() {
            let pg = figures::pgbench(&cli.pgbench, url, cli.rows, clients, duration)?;
            let (p50, p99) = (median(&pg.latencies_us), percentile(&pg.latencies_us, 99.0));
            let lat = &pg.latencies_us;
            let mean = lat.iter().sum::<f64>() / lat.len().max(1) as f64;
            let max = lat.iter().copied().fold(0.0, f64::max);
            writeln!(
                out,
                "{{\"summary\": \"concurrency\", \"backend\": \"postgres\", \"impl\": \"pgbench\", \"clients\": {clients}, \"pool\": {clients}, \"seconds\": {}, \"transactions\": {}, \"tps\": {:.1}, \"p50_us\": {p50:.1}, \"p99_us\": {p99:.1}, \"mean_us\": {mean:.1}, \"max_us\": {max:.1}}}",
                duration.as_secs(),
                pg.latencies_us.len(),
                pg.tps
            )?;
            report.lines.push(format!(
                "concurrency postgres C={clients:<3} pgbench ({clients} conns) {:>9.1} tx/s  p50 {p50:>9.1} us  p99 {p99:>9.1} us  mean {mean:>9.1} us  max {max:>10.1} us   facade/pgbench = {:.3}   [{}]",
                pg.tps,
                tps / pg.tps,
                pg.command
            ));
        }
        out.flush()?;
    }
    Ok(())
}
