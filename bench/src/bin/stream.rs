//! Streaming figures (issue 10): the same 1,000,000 rows read through
//!
//! - `load`: `AsyncSession::run_sync(|c| query.load::<Row>(c))`, a `Vec`
//!   handed back, then iterated;
//! - `stream`: `AsyncSession::stream`, `load_iter` in the connection's
//!   `StreamingMode` (PostgreSQL `PgRowByRowLoadingMode`);
//! - `stream-default` (PostgreSQL only): the same with `DefaultLoadingMode`,
//!   where libpq receives the whole result first;
//! - `stream-paged` (MySQL only): the producer reads keyset pages of 10,000
//!   rows in the same transaction, since libmysqlclient buffers each result;
//! - `sync-iter` (a floor, not an implementation): Diesel's own
//!   `load_iter` in the same loading mode on a raw connection, rows read on
//!   the thread that fetches them: no async, no hand-over between threads,
//!   what the driver does alone;
//! - `async`: diesel-async's `load_stream` (`AsyncPgConnection`:
//!   tokio-postgres; `AsyncMysqlConnection`: mysql_async;
//!   `SyncConnectionWrapper<SqliteConnection>`: it collects every row into a
//!   `Vec` on the blocking pool first).
//!
//! Every measurement runs in a fresh child process (this binary with
//! `--child`), so its peak resident set (`VmHWM` of `/proc/self/status`) is
//! its own. The consumer touches every row (sums `id`, `grp` and the length
//! of `data`); the checksums must agree. Reported per mode: peak RSS, rows/s
//! (from the query's start to the last row), time to first row, and the
//! rows/s against `load` and against `async`, as the ratio of the medians
//! and as the median of each run's ratio (the modes run one after the
//! other in every run, so a run's ratios share the machine's state).
//!
//! The allocator is part of the figure: a stream's rows are allocated on
//! the producer's thread and freed on the consumer's, which glibc's malloc
//! serves slowly. The run prints which allocator its processes use; run it
//! again with `LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2` (or
//! `libmimalloc.so.2`, Debian's `libjemalloc2` / `libmimalloc2.0`) for the
//! same figures on another allocator, as a program with
//! `#[global_allocator]` would have them.
//!
//! ```sh
//! PG_DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
//! MYSQL_DATABASE_URL=mysql://root@127.0.0.1:3306/test \
//! cargo run --release -p runsync-bench --bin stream -- --runs 3
//! ```
//!
//! The rows live in table `stream_rows (id BIGINT, grp INT, data TEXT of
//! 40 characters)`, created once (`INSERT ... SELECT` from a generated
//! series) in database `runsync_stream_bench` on each server and in a
//! SQLite file in the temp directory.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::query_dsl::methods::LoadQuery;
use diesel_runsync::{Engine, EngineOptions, PoolableConnection, StreamingMode};

diesel::table! {
    stream_rows (id) {
        id -> BigInt,
        grp -> Integer,
        data -> Text,
    }
}

/// One row: about 90 bytes once in memory (the struct and its string).
#[derive(Debug, Queryable)]
struct Row {
    id: i64,
    grp: i32,
    data: String,
}

type RowsQuery =
    diesel::dsl::Select<stream_rows::table, (stream_rows::id, stream_rows::grp, stream_rows::data)>;

fn rows_query() -> RowsQuery {
    stream_rows::table.select((stream_rows::id, stream_rows::grp, stream_rows::data))
}

#[derive(Debug, Parser)]
struct Args {
    /// Rows in the table.
    #[arg(long, default_value_t = 1_000_000)]
    rows: u64,
    /// Child processes per backend and mode (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Backends, comma-separated.
    #[arg(long, default_value = "sqlite,postgres,mysql", value_delimiter = ',')]
    backends: Vec<String>,
    /// Internal: measure `backend:mode` once and print the result.
    #[arg(long, hide = true)]
    child: Option<String>,
}

/// What one child measured.
#[derive(Debug, Clone, Copy)]
struct Measure {
    rows: u64,
    checksum: u64,
    seconds: f64,
    first_row: f64,
    baseline_kib: u64,
    peak_kib: u64,
}

impl Measure {
    fn line(&self) -> String {
        format!(
            "RESULT rows={} checksum={} seconds={} first_row={} baseline_kib={} peak_kib={}",
            self.rows,
            self.checksum,
            self.seconds,
            self.first_row,
            self.baseline_kib,
            self.peak_kib
        )
    }

    fn parse(text: &str) -> anyhow::Result<Measure> {
        let line = text
            .lines()
            .find(|l| l.starts_with("RESULT "))
            .context("no RESULT line")?;
        let field = |name: &str| -> anyhow::Result<&str> {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                .with_context(|| format!("no {name} in {line}"))
        };
        Ok(Measure {
            rows: field("rows")?.parse()?,
            checksum: field("checksum")?.parse()?,
            seconds: field("seconds")?.parse()?,
            first_row: field("first_row")?.parse()?,
            baseline_kib: field("baseline_kib")?.parse()?,
            peak_kib: field("peak_kib")?.parse()?,
        })
    }
}

/// `VmRSS` or `VmHWM` of this process, in KiB.
fn status_kib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Touches a row: what the consumer does with each.
fn touch(checksum: &mut u64, row: &Row) {
    *checksum = checksum
        .wrapping_add(row.id as u64)
        .wrapping_add(row.grp as u64)
        .wrapping_add(row.data.len() as u64);
}

/// Times a consumer: `start` when the query goes out; `first` set by the
/// caller at the first row.
struct Clock {
    start: Instant,
    first: Option<Duration>,
    rows: u64,
    checksum: u64,
    baseline_kib: u64,
}

impl Clock {
    fn new() -> Clock {
        Clock {
            start: Instant::now(),
            first: None,
            rows: 0,
            checksum: 0,
            baseline_kib: status_kib("VmRSS:"),
        }
    }

    fn row(&mut self, row: &Row) {
        if self.first.is_none() {
            self.first = Some(self.start.elapsed());
        }
        self.rows += 1;
        touch(&mut self.checksum, row);
    }

    fn done(self) -> Measure {
        Measure {
            rows: self.rows,
            checksum: self.checksum,
            seconds: self.start.elapsed().as_secs_f64(),
            first_row: self.first.unwrap_or_default().as_secs_f64(),
            baseline_kib: self.baseline_kib,
            peak_kib: status_kib("VmHWM:"),
        }
    }
}

/// An engine of one connection, opened and used once before the clock starts.
async fn engine<C: PoolableConnection>(url: &str) -> anyhow::Result<Engine<C>> {
    let engine = Engine::<C>::connect(url, EngineOptions::default().max_size(1)).await?;
    let mut session = engine.session();
    session
        .run_sync(|c| c.batch_execute("SELECT 1"))
        .await
        .map_err(diesel_runsync::Error::from)?;
    session.commit().await?;
    Ok(engine)
}

async fn runsync_load<C>(url: &str) -> anyhow::Result<Measure>
where
    C: PoolableConnection,
    RowsQuery: LoadQuery<'static, C, Row>,
{
    let engine = engine::<C>(url).await?;
    let mut session = engine.session();
    let mut clock = Clock::new();
    let rows = session
        .run_sync(|c| rows_query().load::<Row>(c))
        .await
        .map_err(diesel_runsync::Error::from)?;
    for row in &rows {
        clock.row(row);
    }
    let measure = clock.done();
    drop(rows);
    session.commit().await?;
    Ok(measure)
}

async fn runsync_stream<C, M>(url: &str) -> anyhow::Result<Measure>
where
    C: PoolableConnection,
    M: 'static,
    RowsQuery: LoadQuery<'static, C, Row, M>,
{
    let engine = engine::<C>(url).await?;
    let mut session = engine.session();
    let mut clock = Clock::new();
    let mut rows = session
        .stream(|c, sink| sink.send_all(rows_query().load_iter::<Row, M>(c)?))
        .await
        .map_err(diesel_runsync::Error::from)?;
    while let Some(row) = rows.next().await {
        clock.row(&row?);
    }
    drop(rows);
    let measure = clock.done();
    session.commit().await?;
    Ok(measure)
}

/// MySQL: libmysqlclient buffers a whole result set, so this producer
/// reads keyset pages of [`PAGE`] rows (`WHERE id > last ORDER BY id
/// LIMIT PAGE`), all in the session's one transaction (InnoDB's consistent
/// read view makes the pages one snapshot).
async fn runsync_stream_paged_mysql(url: &str) -> anyhow::Result<Measure> {
    type My = diesel::MysqlConnection;
    let engine = engine::<My>(url).await?;
    let mut session = engine.session();
    let mut clock = Clock::new();
    let mut rows = session
        .stream(|c: &mut My, sink| {
            let mut last = i64::MIN;
            loop {
                let page = rows_query()
                    .filter(stream_rows::id.gt(last))
                    .order(stream_rows::id)
                    .limit(PAGE)
                    .load_iter::<Row, diesel::connection::DefaultLoadingMode>(c)?;
                let mut read = 0;
                for row in page {
                    let row = row?;
                    last = row.id;
                    read += 1;
                    sink.send(row)?;
                }
                if read < PAGE {
                    return Ok::<_, diesel::result::Error>(());
                }
            }
        })
        .await
        .map_err(diesel_runsync::Error::from)?;
    while let Some(row) = rows.next().await {
        clock.row(&row?);
    }
    drop(rows);
    let measure = clock.done();
    session.commit().await?;
    Ok(measure)
}

/// `sync-iter`: Diesel's `load_iter` on a raw connection, on this thread.
fn raw_iter<C, M>(url: &str) -> anyhow::Result<Measure>
where
    C: diesel::Connection,
    M: 'static,
    RowsQuery: LoadQuery<'static, C, Row, M>,
{
    let mut conn = C::establish(url)?;
    conn.batch_execute("SELECT 1")?;
    let mut clock = Clock::new();
    for row in rows_query().load_iter::<Row, M>(&mut conn)? {
        clock.row(&row?);
    }
    Ok(clock.done())
}

/// Rows per keyset page of `stream-paged`.
const PAGE: i64 = 10_000;

/// diesel-async's `load_stream`; only its `RunQueryDsl` is in scope here.
mod peer {
    use std::pin::pin;

    use diesel::QueryDsl;
    use diesel_async::{AsyncConnection, RunQueryDsl};
    use futures_core::Stream;

    use super::{Clock, Measure, Row, rows_query, stream_rows};

    macro_rules! load_stream {
        ($name:ident, $conn:ty) => {
            pub(super) async fn $name(url: &str) -> anyhow::Result<Measure> {
                let mut conn = <$conn>::establish(url).await?;
                let _: i64 = stream_rows::table.count().get_result(&mut conn).await?;
                let mut clock = Clock::new();
                let stream = rows_query().load_stream::<Row>(&mut conn).await?;
                let mut stream = pin!(stream);
                while let Some(row) = std::future::poll_fn(|cx| stream.as_mut().poll_next(cx)).await
                {
                    clock.row(&row?);
                }
                Ok(clock.done())
            }
        };
    }

    load_stream!(postgres, diesel_async::AsyncPgConnection);
    load_stream!(mysql, diesel_async::AsyncMysqlConnection);
    load_stream!(
        sqlite,
        diesel_async::sync_connection_wrapper::SyncConnectionWrapper<diesel::SqliteConnection>
    );
}

/// The URL of the bench's own database on `backend`.
fn bench_url(backend: &str) -> anyhow::Result<String> {
    let server = |var: &str| -> anyhow::Result<String> {
        let url = std::env::var(var).with_context(|| format!("{var} is not set"))?;
        let (scheme, rest) = url.split_once("://").context("a server URL")?;
        let authority = rest.split(['/', '?']).next().unwrap_or(rest);
        Ok(format!("{scheme}://{authority}/runsync_stream_bench"))
    };
    match backend {
        "sqlite" => Ok(std::env::temp_dir()
            .join("runsync-stream-bench.db")
            .display()
            .to_string()),
        // Plaintext, as the diesel-async peer (tokio-postgres with `NoTls`)
        // speaks: libpq would negotiate TLS with a server that has `ssl = on`.
        "postgres" => server("PG_DATABASE_URL").map(|url| format!("{url}?sslmode=disable")),
        "mysql" => server("MYSQL_DATABASE_URL"),
        other => bail!("unknown backend {other}"),
    }
}

/// The modes measured on `backend`.
fn modes(backend: &str) -> &'static [&'static str] {
    match backend {
        "postgres" => &["load", "stream", "stream-default", "sync-iter", "async"],
        "mysql" => &["load", "stream", "stream-paged", "sync-iter", "async"],
        _ => &["load", "stream", "sync-iter", "async"],
    }
}

async fn child(spec: &str) -> anyhow::Result<Measure> {
    let (backend, mode) = spec.split_once(':').context("backend:mode")?;
    let url = bench_url(backend)?;
    use diesel::connection::DefaultLoadingMode as Default;
    type Pg = diesel::PgConnection;
    type My = diesel::MysqlConnection;
    type Lite = diesel::SqliteConnection;
    match (backend, mode) {
        ("postgres", "load") => runsync_load::<Pg>(&url).await,
        ("postgres", "stream") => runsync_stream::<Pg, <Pg as StreamingMode>::Mode>(&url).await,
        ("postgres", "stream-default") => runsync_stream::<Pg, Default>(&url).await,
        ("postgres", "sync-iter") => raw_iter::<Pg, <Pg as StreamingMode>::Mode>(&url),
        ("postgres", "async") => peer::postgres(&url).await,
        ("mysql", "load") => runsync_load::<My>(&url).await,
        ("mysql", "stream") => runsync_stream::<My, <My as StreamingMode>::Mode>(&url).await,
        ("mysql", "stream-paged") => runsync_stream_paged_mysql(&url).await,
        ("mysql", "sync-iter") => raw_iter::<My, <My as StreamingMode>::Mode>(&url),
        ("mysql", "async") => peer::mysql(&url).await,
        ("sqlite", "load") => runsync_load::<Lite>(&url).await,
        ("sqlite", "stream") => runsync_stream::<Lite, <Lite as StreamingMode>::Mode>(&url).await,
        ("sqlite", "sync-iter") => raw_iter::<Lite, <Lite as StreamingMode>::Mode>(&url),
        ("sqlite", "async") => peer::sqlite(&url).await,
        _ => bail!("unknown {spec}"),
    }
}

/// Creates the database and table `stream_rows` with `rows` rows, unless there.
fn prepare(backend: &str, rows: u64) -> anyhow::Result<()> {
    let url = bench_url(backend)?;
    let digits = "(SELECT 0 AS d UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 \
                  UNION ALL SELECT 4 UNION ALL SELECT 5 UNION ALL SELECT 6 UNION ALL SELECT 7 \
                  UNION ALL SELECT 8 UNION ALL SELECT 9)";
    let (create, fill_sql) = match backend {
        "sqlite" => (
            "CREATE TABLE stream_rows (id INTEGER PRIMARY KEY, grp INTEGER NOT NULL, data TEXT NOT NULL)"
                .to_owned(),
            format!(
                "INSERT INTO stream_rows \
                 WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < {rows}) \
                 SELECT n, n % 100, printf('row %09d abcdefghijklmnopqrstuvwxyz', n) FROM c"
            ),
        ),
        "postgres" => (
            "CREATE TABLE stream_rows (id BIGINT PRIMARY KEY, grp INTEGER NOT NULL, data TEXT NOT NULL)"
                .to_owned(),
            format!(
                "INSERT INTO stream_rows SELECT g, g % 100, \
                 'row ' || lpad(g::text, 9, '0') || ' abcdefghijklmnopqrstuvwxyz' \
                 FROM generate_series(1, {rows}) g"
            ),
        ),
        _ => {
            let places = (rows.max(2) as f64).log10().ceil() as u32;
            let value = (0..places)
                .map(|p| format!("{}*d{p}.d", 10u64.pow(p)))
                .collect::<Vec<_>>()
                .join(" + ");
            let tables = (0..places)
                .map(|p| format!("{digits} d{p}"))
                .collect::<Vec<_>>()
                .join(" CROSS JOIN ");
            (
                "CREATE TABLE stream_rows (id BIGINT PRIMARY KEY, grp INT NOT NULL, \
                 data VARCHAR(64) NOT NULL) ENGINE = InnoDB"
                    .to_owned(),
                format!(
                    "INSERT INTO stream_rows SELECT n, n % 100, \
                     CONCAT('row ', LPAD(n, 9, '0'), ' abcdefghijklmnopqrstuvwxyz') \
                     FROM (SELECT {value} + 1 AS n FROM {tables} WHERE {value} < {rows}) t"
                ),
            )
        }
    };
    let count = match backend {
        "mysql" => "SELECT CAST(count(*) AS SIGNED) AS n FROM stream_rows",
        _ => "SELECT CAST(count(*) AS BIGINT) AS n FROM stream_rows",
    };
    match backend {
        "sqlite" => fill(
            &mut diesel::SqliteConnection::establish(&url)?,
            rows,
            [count, &create, &fill_sql],
        ),
        "postgres" => {
            let mut admin = diesel::PgConnection::establish(&std::env::var("PG_DATABASE_URL")?)?;
            let exists = diesel::sql_query(
                "SELECT count(*) AS n FROM pg_database WHERE datname = 'runsync_stream_bench'",
            )
            .get_result::<N>(&mut admin)?
            .n;
            if exists == 0 {
                admin.batch_execute("CREATE DATABASE runsync_stream_bench")?;
            }
            let mut conn = diesel::PgConnection::establish(&url)?;
            fill(&mut conn, rows, [count, &create, &fill_sql])?;
            conn.batch_execute("VACUUM ANALYZE stream_rows")?;
            Ok(())
        }
        _ => {
            diesel::MysqlConnection::establish(&std::env::var("MYSQL_DATABASE_URL")?)?
                .batch_execute("CREATE DATABASE IF NOT EXISTS runsync_stream_bench")?;
            fill(
                &mut diesel::MysqlConnection::establish(&url)?,
                rows,
                [count, &create, &fill_sql],
            )
        }
    }
}

/// (Re)creates `stream_rows` unless it has `rows` rows: `[count, create, fill]`.
fn fill<C>(conn: &mut C, rows: u64, [count, create, fill]: [&str; 3]) -> anyhow::Result<()>
where
    C: Connection,
    diesel::query_builder::SqlQuery: LoadQuery<'static, C, N>,
{
    let have = diesel::sql_query(count).get_result::<N>(conn).map(|r| r.n);
    if have.ok() == Some(rows as i64) {
        return Ok(());
    }
    eprintln!("filling stream_rows with {rows} rows");
    conn.batch_execute("DROP TABLE IF EXISTS stream_rows")?;
    conn.batch_execute(create)?;
    conn.batch_execute(fill)?;
    Ok(())
}

#[derive(QueryableByName)]
struct N {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(spec) = &args.child {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        let measure = runtime.block_on(child(spec))?;
        println!("{}", measure.line());
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    println!(
        "rows={} runs={} (medians; peak = VmHWM of a fresh process per measurement)",
        args.rows, args.runs
    );
    let allocator = match std::env::var("LD_PRELOAD") {
        Ok(preload) if !preload.is_empty() => format!("LD_PRELOAD={preload}"),
        _ => "glibc malloc (no LD_PRELOAD)".to_owned(),
    };
    println!("allocator: {allocator}");
    for backend in &args.backends {
        prepare(backend, args.rows).with_context(|| format!("preparing {backend}"))?;
        let mut results = Vec::new();
        let mut checksum = None;
        // Modes interleaved run by run, so they share the machine's state.
        let mut runs: Vec<Vec<Measure>> = vec![Vec::new(); modes(backend).len()];
        for _ in 0..args.runs {
            for (i, mode) in modes(backend).iter().enumerate() {
                let out = Command::new(&exe)
                    .args(["--child", &format!("{backend}:{mode}")])
                    .output()?;
                if !out.status.success() {
                    bail!(
                        "{backend}:{mode} failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                let measure = Measure::parse(&String::from_utf8_lossy(&out.stdout))?;
                if measure.rows != args.rows
                    || *checksum.get_or_insert(measure.checksum) != measure.checksum
                {
                    bail!(
                        "{backend}:{mode}: {} rows, checksum {}",
                        measure.rows,
                        measure.checksum
                    );
                }
                runs[i].push(measure);
            }
        }
        // Each run's ratios to `load` and to diesel-async's `async`, taken
        // within the run (the modes of one run share the machine's state).
        let ratios = |i: usize, to: usize| {
            median(
                (0..args.runs)
                    .map(|r| runs[to][r].seconds / runs[i][r].seconds)
                    .collect(),
            )
        };
        let async_at = modes(backend).iter().position(|m| *m == "async");
        let within: Vec<(f64, Option<f64>)> = (0..modes(backend).len())
            .map(|i| (ratios(i, 0), async_at.map(|a| ratios(i, a))))
            .collect();
        for (mode, measures) in modes(backend).iter().zip(runs) {
            let peak = median(measures.iter().map(|m| m.peak_kib as f64).collect()) / 1024.0;
            let base = median(measures.iter().map(|m| m.baseline_kib as f64).collect()) / 1024.0;
            let seconds = median(measures.iter().map(|m| m.seconds).collect());
            let first = median(measures.iter().map(|m| m.first_row).collect());
            results.push((*mode, peak, base, seconds, first));
        }
        let load = results[0];
        println!("\n{backend}:");
        println!(
            "| mode | peak RSS MiB | before query MiB | rows/s | vs load | vs load, per run | vs async, per run | first row ms | peak vs load |"
        );
        println!("|---|---|---|---|---|---|---|---|---|");
        for ((mode, peak, base, seconds, first), (to_load, to_async)) in results.iter().zip(&within)
        {
            let rate = args.rows as f64 / seconds;
            println!(
                "| {mode} | {peak:.1} | {base:.1} | {rate:.0} | {:.2}x | {to_load:.2}x | {} | {:.1} | {:.2} |",
                (load.3 / seconds),
                to_async.map_or("-".to_owned(), |r| format!("{r:.2}x")),
                first * 1e3,
                peak / load.1
            );
            println!(
                "FIGURE stream_bench {backend} {mode}: peak_mib={peak:.1} baseline_mib={base:.1} rows_per_s={rate:.0} \
                 throughput_vs_load={:.2} first_row_ms={:.1} peak_vs_load={:.3}",
                load.3 / seconds,
                first * 1e3,
                peak / load.1
            );
        }
    }
    Ok(())
}
