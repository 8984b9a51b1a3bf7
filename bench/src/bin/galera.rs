//! W(N) and contention throughput on a 3-node MariaDB Galera Cluster beside
//! one standalone MariaDB server (issue 11), in one run.
//!
//! Starts a throwaway cluster on loopback (`runsync_testkit::galera`: needs
//! root, `mariadbd`, the `mariadb` client, galera-4, rsync and socat), then:
//!
//! - W(N) (`bench/WORKLOAD.md`) with the `facade` implementation
//!   (`sync_impls::facade`, the `bench` binary's own) on three targets:
//!   `single` (the standalone server, `--single-url`), `node1` (the cluster
//!   through node 1's URL) and `multi` (the cluster through the multi-host
//!   URL `mysql://root@h:p1,h:p2,h:p3/bench`), and its peers sqlx and
//!   diesel-async (the `bench` binary's `sqlx_impl` and `async_impl`) on
//!   `single` and `node1` (`--no-peers`: the facade alone); `--warmup` +
//!   `--runs` runs, the steps' order rotated run by run; medians per phase
//!   and, run by run, the ratio of each cluster target to `single` and of
//!   the facade to each peer on the same server.
//! - contention (`bench/src/contention.rs`, the workload `tests/galera.rs`
//!   checks): 3 engines x 8 tasks bring 32 counters to `--increments` each
//!   with `transaction_with_retry`, with the engines on the standalone
//!   server, all on node 1, one per node, or all on the multi-host URL;
//!   `--contention-runs` runs each: units/s, client retries, the servers'
//!   conflict counters; the counters are checked exact on every node after
//!   every run (the program fails otherwise).
//!
//! Prints JSON lines on stdout and to `bench/results/galera-<unix time>.jsonl`,
//! and a summary on stderr. The cluster is killed when the program ends.
//!
//! ```text
//! cargo run -p runsync-bench --release --bin galera -- --n 1000 --runs 5
//! ```

#[allow(dead_code)]
#[path = "../async_impl.rs"]
mod async_impl;
#[allow(dead_code)]
#[path = "../contention.rs"]
mod contention;
#[allow(dead_code)]
#[path = "../count.rs"]
mod count;
#[allow(dead_code)]
#[path = "../phases.rs"]
mod phases;
#[allow(dead_code)]
#[path = "../sqlx_impl.rs"]
mod sqlx_impl;
#[allow(dead_code)]
#[path = "../stats.rs"]
mod stats;
#[allow(dead_code)]
#[path = "../sync_impls.rs"]
mod sync_impls;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel_runsync::{Engine, EngineOptions};
use greenlet_orm::AnyConnection;
use greenlet_orm::queries::workload_families;
use runsync_testkit::galera::Cluster;

use crate::count::Counter;
use crate::phases::{Phase, PhaseTimer, clean, expected_children, on_worker};
use crate::stats::median;

/// W(N) and contention throughput: standalone MariaDB vs a 3-node Galera Cluster.
#[derive(Debug, Parser)]
#[command(about)]
struct Cli {
    /// N of W(N).
    #[arg(long, default_value_t = 1000)]
    n: usize,

    /// Recorded W(N) runs per target.
    #[arg(long, default_value_t = 5)]
    runs: usize,

    /// Unrecorded W(N) runs first.
    #[arg(long, default_value_t = 1)]
    warmup: usize,

    /// Pool size of the facade's engine (and the peers' pools) for W(N).
    #[arg(long, default_value_t = 8)]
    pool_size: u32,

    /// W(N) with the facade only (no sqlx and diesel-async beside it).
    #[arg(long)]
    no_peers: bool,

    /// The standalone server; its database is created if missing and its
    /// tables a, b, counters are dropped and recreated.
    #[arg(
        long,
        default_value = "mysql://root@127.0.0.1:3306/bench_galera_single"
    )]
    single_url: String,

    /// Contention: increments per counter (32 counters, 3 x 8 tasks).
    #[arg(long, default_value_t = 100)]
    increments: usize,

    /// Contention runs per configuration.
    #[arg(long, default_value_t = 5)]
    contention_runs: usize,

    /// Where the JSON lines go too (default bench/results/galera-<unix time>.jsonl).
    #[arg(long)]
    out: Option<PathBuf>,
}

const COUNTERS: usize = 32;
const ENGINES: usize = 3;
const TASKS_PER_ENGINE: usize = 8;

/// Writes each line to stdout and to the results file.
struct Out {
    file: std::fs::File,
}

impl Out {
    fn line(&mut self, line: String) -> anyhow::Result<()> {
        println!("{line}");
        writeln!(self.file, "{line}")?;
        Ok(())
    }
}

/// `url` with its database replaced by `mysql` (to create the database).
fn server_url(url: &str) -> anyhow::Result<(String, String)> {
    let (server, database) = url
        .rsplit_once('/')
        .filter(|(s, d)| s.contains("://") && !d.is_empty() && !d.contains('?'))
        .with_context(|| format!("{url}: expected mysql://user@host:port/database"))?;
    Ok((format!("{server}/mysql"), database.to_owned()))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let path = cli.out.clone().unwrap_or_else(|| {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("results/galera-{secs}.jsonl"))
    });
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut out = Out {
        file: std::fs::File::create(&path).with_context(|| path.display().to_string())?,
    };
    let mut report: Vec<String> = Vec::new();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    report.push(format!(
        "load average at start: {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    ));

    let (server, database) = server_url(&cli.single_url)?;
    MysqlConnection::establish(&server)
        .with_context(|| format!("the standalone server ({server})"))?
        .batch_execute(&format!("CREATE DATABASE IF NOT EXISTS `{database}`"))?;

    let cold = Instant::now();
    let cluster = Cluster::start();
    let cold = cold.elapsed().as_secs_f64();
    cluster
        .query(0, "CREATE DATABASE bench")
        .map_err(anyhow::Error::msg)?;
    out.line(format!(
        "{{\"summary\": \"cold_start\", \"nodes\": 3, \"seconds\": {cold:.3}}}"
    ))?;
    report.push(format!("cluster cold start (3 nodes): {cold:.2} s"));

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = (|| -> anyhow::Result<()> {
        workload(&cli, &runtime, &cluster, &mut out, &mut report)?;
        contend(&cli, &runtime, &cluster, &mut out, &mut report)?;
        Ok(())
    })();
    drop(runtime);
    drop(cluster);
    let left = std::process::Command::new("pgrep")
        .args(["-f", "rs-galera"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    report.push(format!(
        "cluster stopped; processes left matching rs-galera: {}",
        if left.is_empty() { "none" } else { &left }
    ));
    eprintln!();
    for line in &report {
        eprintln!("{line}");
    }
    eprintln!("JSON lines: {}", path.display());
    result
}

/// A W(N) implementation of this run: the facade, or one of the `bench`
/// binary's peers on the same statements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Impl {
    Facade,
    Sqlx,
    DieselAsync,
}

impl Impl {
    fn name(self) -> &'static str {
        match self {
            Impl::Facade => "facade",
            Impl::Sqlx => "sqlx",
            Impl::DieselAsync => "diesel-async",
        }
    }
}

/// One series of W(N) runs: a target and an implementation's name.
type Step<'a> = (&'a str, &'a str);

/// W(N) run after run: the facade on `single`, `node1` and `multi`, and
/// (unless `--no-peers`) sqlx and diesel-async on `single` and `node1`
/// (a multi-host URL is the engine's; the peers take one server's URL).
fn workload(
    cli: &Cli,
    runtime: &tokio::runtime::Runtime,
    cluster: &Cluster,
    out: &mut Out,
    report: &mut Vec<String>,
) -> anyhow::Result<()> {
    let n = cli.n;
    let targets = [
        ("single", cli.single_url.clone()),
        ("node1", cluster.url(0, "bench")),
        ("multi", cluster.multi_host_url("bench")),
    ];
    // `node1` and `multi` share the cluster's database `bench` (one run at
    // a time; every run's schema phase starts from scratch); a multi-host
    // URL is for engines only, so it is prepared through node 1.
    for (name, url) in &targets[..2] {
        clean(url).with_context(|| format!("preparing {name}"))?;
    }
    let mut steps: Vec<(&str, &str, Impl)> = Vec::new();
    for (name, url) in &targets {
        steps.push((name, url, Impl::Facade));
        if !cli.no_peers && *name != "multi" {
            steps.push((name, url, Impl::Sqlx));
            steps.push((name, url, Impl::DieselAsync));
        }
    }
    let migration = async_impl::migration(diesel_runsync::Backend::Mysql)?;
    let families = Arc::new(workload_families(n));
    let counter = Counter::default();
    // (target, implementation, phase) -> seconds, one per recorded run.
    let mut seconds: BTreeMap<(&str, &str, &str), Vec<f64>> = BTreeMap::new();
    for run in 0..cli.warmup + cli.runs {
        let recorded = run >= cli.warmup;
        let mut order = steps.clone();
        order.rotate_left(run % steps.len());
        for (name, url, imp) in order {
            let (url, families, counter2) = (url.to_owned(), families.clone(), counter.clone());
            let (size, m) = (cli.pool_size, migration.clone());
            let phases: Vec<Phase> = on_worker(runtime, async move {
                match imp {
                    Impl::Facade => {
                        sync_impls::facade(&url, n, families, &counter2, size, false).await
                    }
                    Impl::Sqlx => sqlx_impl::mysql(&url, n, &families, &counter2, &m, size).await,
                    Impl::DieselAsync => async_impl::mysql(&url, n, &families, &counter2, &m).await,
                }
            })
            .with_context(|| format!("W({n}) {} on {name}", imp.name()))?;
            if !recorded {
                continue;
            }
            for p in &phases {
                out.line(format!(
                    "{{\"phase\": \"{}\", \"n\": {n}, \"seconds\": {:.6}, \"queries\": {}, \"target\": \"{name}\", \"impl\": \"{}\", \"run\": {}}}",
                    p.name,
                    p.seconds,
                    p.queries,
                    imp.name(),
                    run - cli.warmup
                ))?;
                seconds
                    .entry((name, imp.name(), p.name))
                    .or_default()
                    .push(p.seconds);
            }
        }
    }
    report.push(format!(
        "== W(N) N={n} ({} children), {} runs (+{} warmup): median seconds",
        expected_children(n),
        cli.runs,
        cli.warmup
    ));
    let mut header = format!("{:<8} {:<13}", "target", "impl");
    for phase in phases::PHASES {
        header.push_str(&format!(" {phase:>14}"));
    }
    report.push(header);
    for (name, _, imp) in &steps {
        let mut row = format!("{name:<8} {:<13}", imp.name());
        for phase in phases::PHASES {
            let values = seconds
                .get(&(*name, imp.name(), phase))
                .cloned()
                .unwrap_or_default();
            let m = median(&values);
            row.push_str(&format!(" {m:>14.6}"));
            out.line(format!(
                "{{\"summary\": \"median\", \"phase\": \"{phase}\", \"n\": {n}, \"seconds\": {m:.6}, \"target\": \"{name}\", \"impl\": \"{}\", \"runs\": {}}}",
                imp.name(),
                values.len()
            ))?;
        }
        report.push(row);
    }
    // The cluster against the standalone server (the facade), and the
    // facade against each peer on the same server; every ratio is taken run
    // by run (each run has every step once), then their median.
    let mut pairs: Vec<(String, Step, Step)> = Vec::new();
    for (name, _) in &targets[1..] {
        pairs.push((
            format!("{name}/single"),
            (name, "facade"),
            ("single", "facade"),
        ));
    }
    if !cli.no_peers {
        for (name, _) in &targets[..2] {
            for peer in [Impl::Sqlx, Impl::DieselAsync] {
                pairs.push((
                    format!("facade/{} on {name}", peer.name()),
                    (name, "facade"),
                    (name, peer.name()),
                ));
            }
        }
    }
    for (label, (ta, ia), (tb, ib)) in &pairs {
        for phase in ["insert", "run_sync_lazy", "total"] {
            let (Some(a), Some(b)) = (seconds.get(&(ta, ia, phase)), seconds.get(&(tb, ib, phase)))
            else {
                continue;
            };
            let per_run: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
            let of_runs = median(&per_run);
            out.line(format!(
                "{{\"summary\": \"ratio\", \"ratio\": \"{label}\", \"phase\": \"{phase}\", \"n\": {n}, \"median_of_run_ratios\": {of_runs:.4}, \"runs\": {}}}",
                per_run.len()
            ))?;
            report.push(format!(
                "ratio {label} {phase}: median of run ratios {of_runs:.3} (runs: {})",
                per_run
                    .iter()
                    .map(|r| format!("{r:.3}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ));
        }
    }
    Ok(())
}

/// Contention: one configuration is where the 3 engines point.
struct Config {
    name: &'static str,
    /// One URL per engine.
    urls: Vec<String>,
    /// The servers the result is checked on and whose conflict counters
    /// are read (database `bench` / the standalone one).
    servers: Vec<String>,
    /// Galera: read with `wsrep_sync_wait = 1`.
    galera: bool,
}

/// Contention throughput on the standalone server and on the cluster.
fn contend(
    cli: &Cli,
    runtime: &tokio::runtime::Runtime,
    cluster: &Cluster,
    out: &mut Out,
    report: &mut Vec<String>,
) -> anyhow::Result<()> {
    let nodes: Vec<String> = (0..3).map(|i| cluster.url(i, "bench")).collect();
    let configs = [
        Config {
            name: "single",
            urls: vec![cli.single_url.clone(); ENGINES],
            servers: vec![cli.single_url.clone()],
            galera: false,
        },
        Config {
            name: "1_node",
            urls: vec![nodes[0].clone(); ENGINES],
            servers: nodes.clone(),
            galera: true,
        },
        Config {
            name: "3_nodes",
            urls: nodes.clone(),
            servers: nodes.clone(),
            galera: true,
        },
        Config {
            name: "multi_host",
            urls: vec![cluster.multi_host_url("bench"); ENGINES],
            servers: nodes.clone(),
            galera: true,
        },
    ];
    let each = cli.increments;
    let tasks = ENGINES * TASKS_PER_ENGINE;
    // name -> (units/s, retries, statement errors, conflicts) per run.
    let mut rates: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut retries: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    let mut conflicts: BTreeMap<&str, Vec<[i64; 3]>> = BTreeMap::new();
    for run in 0..cli.contention_runs {
        let mut order: Vec<usize> = (0..configs.len()).collect();
        order.rotate_left(run % configs.len());
        for c in order {
            let config = &configs[c];
            let connect = |url: &str| -> anyhow::Result<MysqlConnection> {
                let mut conn = MysqlConnection::establish(url).with_context(|| url.to_owned())?;
                if config.galera {
                    conn.batch_execute("SET SESSION wsrep_sync_wait = 1")?;
                }
                Ok(conn)
            };
            contention::create_counters(&mut connect(&config.servers[0])?, COUNTERS)?;
            let mut before = Vec::new();
            for server in &config.servers {
                let mut conn = connect(server)?;
                // Every node sees the rows before the tasks start.
                contention::check(&mut conn, COUNTERS, 0)
                    .map_err(|e| anyhow::anyhow!("{} before the run: {e}", config.name))?;
                before.push(contention::Conflicts::read(&mut conn)?);
            }
            let urls = config.urls.clone();
            let outcome = on_worker(runtime, async move {
                let mut engines = Vec::new();
                for url in &urls {
                    engines.push(
                        Engine::<AnyConnection>::connect(
                            url,
                            EngineOptions::default()
                                .max_size(TASKS_PER_ENGINE as u32)
                                .connection_timeout(Duration::from_secs(5)),
                        )
                        .await?,
                    );
                }
                contention::run(&engines, TASKS_PER_ENGINE, COUNTERS, each)
                    .await
                    .map_err(anyhow::Error::msg)
            })
            .with_context(|| format!("contention on {}", config.name))?;
            let mut delta = contention::Conflicts::default();
            for (server, before) in config.servers.iter().zip(&before) {
                let mut conn = connect(server)?;
                if let Err(e) = contention::check(&mut conn, COUNTERS, each) {
                    bail!(
                        "contention on {}: the counters are wrong on {server}: {e}",
                        config.name
                    );
                }
                let d = contention::Conflicts::read(&mut conn)?.since(*before);
                delta.cert_failures += d.cert_failures;
                delta.bf_aborts += d.bf_aborts;
                delta.deadlocks += d.deadlocks;
            }
            let secs = outcome.elapsed.as_secs_f64();
            let rate = outcome.units as f64 / secs;
            out.line(format!(
                "{{\"contention\": \"{}\", \"run\": {run}, \"tasks\": {tasks}, \"counters\": {COUNTERS}, \"units\": {}, \"seconds\": {secs:.4}, \"units_per_s\": {rate:.1}, \"retries\": {}, \"statement_errors\": {}, \"cert_failures\": {}, \"bf_aborts\": {}, \"innodb_deadlocks\": {}, \"sum_exact\": true}}",
                config.name,
                outcome.units,
                outcome.retries,
                outcome.statement_errors,
                delta.cert_failures,
                delta.bf_aborts,
                delta.deadlocks
            ))?;
            rates.entry(config.name).or_default().push(rate);
            retries
                .entry(config.name)
                .or_default()
                .push(outcome.retries);
            conflicts.entry(config.name).or_default().push([
                delta.cert_failures,
                delta.bf_aborts,
                delta.deadlocks,
            ]);
        }
    }
    report.push(format!(
        "== contention: {tasks} tasks (3 engines x {TASKS_PER_ENGINE}, pools of {TASKS_PER_ENGINE}), \
         {COUNTERS} counters x {each} increments = {} units per run, {} runs; sums exact on every server after every run",
        COUNTERS * each,
        cli.contention_runs
    ));
    let single = median(rates.get("single").map(Vec::as_slice).unwrap_or(&[]));
    for config in &configs {
        let r = &rates[config.name];
        let m = median(r);
        out.line(format!(
            "{{\"summary\": \"contention\", \"config\": \"{}\", \"median_units_per_s\": {m:.1}, \"vs_single\": {:.4}, \"runs\": {}}}",
            config.name,
            m / single,
            r.len()
        ))?;
        report.push(format!(
            "{:<11} median {m:>8.1} units/s ({:.3} x single); per run: units/s [{}] retries {:?} cert_failures/bf_aborts/innodb_deadlocks {:?}",
            config.name,
            m / single,
            r.iter()
                .map(|v| format!("{v:.1}"))
                .collect::<Vec<_>>()
                .join(", "),
            retries[config.name],
            conflicts[config.name]
        ));
    }
    Ok(())
}
