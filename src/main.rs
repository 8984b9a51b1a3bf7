//! `greenlet-orm`: SQLAlchemy's `greenlet_orm` example on Diesel, from
//! the command line.
//!
//! - `diesel-runsync` (no command, or `seed`) resets the schema of
//!   `runsync.db` (SQLite, in the current directory), inserts three parents
//!   with their children, prints them through `run_sync`, updates the first
//!   and commits: the seed's eight printed lines.
//! - `greenlet-orm run --n 100000 [--eager | --stream] [--print]` does the
//!   same with `N` parents, lazily (one query per parent), eagerly (one `IN`
//!   query per batch) or streamed (one ordered `LEFT JOIN` read row by row
//!   through `AsyncSession::stream`, each parent printed as it arrives); it
//!   prints the objects when `N` is at most 20 or with
//!   `--print`, otherwise one summary line of counts and timings. A progress
//!   bar shows on stderr for long runs when stderr is a terminal.
//! - `greenlet-orm migrate run | revert | status | reset` applies the
//!   pending migrations, reverts the last one, lists applied and pending
//!   versions, or reverts all and applies all again.
//!
//! Global options: `--database-url` (or `DATABASE_URL`, from the
//! environment or `.env`) points it at PostgreSQL or MySQL instead;
//! `--echo` (or `RUNSYNC_ECHO`) prints every statement to stderr;
//! `--pool-size` and `--pool-timeout` (or `RUNSYNC_POOL_SIZE`,
//! `RUNSYNC_POOL_TIMEOUT`) size the pool. `RUST_LOG` filters the log as
//! usual (`RUST_LOG=diesel_runsync::sql=debug` shows statements with
//! durations).
//!
//! Exit codes: 0 success, 1 a runtime error (one line on stderr, the
//! database password never shown), 2 bad command-line usage.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use diesel_migrations::{MigrationError, MigrationHarness};
use diesel_runsync::{AsyncSession, Engine, EngineOptions, SQL_TARGET};
use greenlet_orm::migrations::{self, create_all, drop_all};
use greenlet_orm::program::{greenlet_orm, reset_schema};
use greenlet_orm::queries::{
    Counts, PARENT_BATCH, for_each_family, insert_families, run_queries, run_queries_eager,
    update_first, workload_families,
};
use greenlet_orm::{AnyConnection, DemoError, Family};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// `run` prints the objects itself up to this many parents.
const PRINT_AT_MOST: usize = 20;
/// `run` shows a progress bar from this many parents on.
const PROGRESS_FROM: usize = 10_000;

const AFTER_HELP: &str = "\
Variables are also read from a .env file in the current directory.
RUST_LOG filters the log on stderr, e.g. RUST_LOG=diesel_runsync::sql=debug
shows every statement with its duration.

Exit codes:
  0  success
  1  runtime error (one line on stderr; the database password is never shown)
  2  bad command-line usage";

/// Runs SQLAlchemy's asyncio `greenlet_orm` example on Diesel: sync query
/// code called from async code through `AsyncSession::run_sync`.
///
/// With no command, runs the seed program (see `seed`).
#[derive(Debug, Parser)]
#[command(version, about, long_about, after_help = AFTER_HELP)]
struct Cli {
    #[command(flatten)]
    global: Global,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Global options")]
struct Global {
    /// Database: a SQLite file path, sqlite://PATH, postgres://... or mysql://...
    #[arg(
        long,
        global = true,
        env = "DATABASE_URL",
        default_value = "runsync.db",
        hide_env_values = true
    )]
    database_url: String,

    /// Print every SQL statement with its bind values and duration (stderr).
    /// RUNSYNC_ECHO accepts 1/0, true/false, yes/no, on/off.
    #[arg(
        long,
        global = true,
        env = "RUNSYNC_ECHO",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    echo: bool,

    /// Most pooled connections open at once.
    #[arg(long, global = true, env = "RUNSYNC_POOL_SIZE", default_value_t = 8)]
    pool_size: u32,

    /// Seconds to wait for a free pooled connection.
    #[arg(
        long,
        global = true,
        env = "RUNSYNC_POOL_TIMEOUT",
        default_value_t = 30
    )]
    pool_timeout: u64,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The seed program (the default): reset the schema, insert three
    /// parents and their children, print them through run_sync, update the
    /// first, commit.
    Seed,
    /// The seed program scaled to N parents (odd ones with two children,
    /// even ones with one), timed.
    Run(RunArgs),
    /// Manage the schema's embedded migrations.
    #[command(subcommand)]
    Migrate(Migrate),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// How many parents to insert and load.
    #[arg(long = "n", value_name = "N", value_parser = parse_count)]
    n: usize,

    /// Load the children with one IN query per batch of parents, instead of
    /// one query per parent (the seed's lazy N+1 pattern).
    #[arg(long, conflicts_with = "stream")]
    eager: bool,

    /// Stream the parents with their children from one ordered LEFT JOIN,
    /// read row by row (AsyncSession::stream), printing each parent as it
    /// arrives, instead of one query per parent.
    #[arg(long)]
    stream: bool,

    /// Print every object even when N is above 20 (otherwise a summary line).
    #[arg(long)]
    print: bool,
}

#[derive(Debug, Subcommand)]
enum Migrate {
    /// Apply every pending migration.
    Run,
    /// Revert the last applied migration.
    Revert,
    /// List the applied and the pending migration versions.
    Status,
    /// Revert every applied migration, then apply them all (drops the data).
    Reset,
}

fn main() -> ExitCode {
    if let Err(e) = dotenvy::dotenv()
        && !e.not_found()
    {
        eprintln!("error: cannot read .env: {}", one_line(&e.to_string()));
        return ExitCode::FAILURE;
    }
    let cli = Cli::parse();
    init_tracing(cli.global.echo);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e.to_string()));
            ExitCode::FAILURE
        }
    }
}

/// `message` on one line: driver messages may span several.
fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

async fn run(cli: &Cli) -> Result<(), DemoError> {
    let global = &cli.global;
    let options = EngineOptions::default()
        .max_size(global.pool_size)
        .connection_timeout(Duration::from_secs(global.pool_timeout))
        .echo(global.echo);
    let engine = Engine::<AnyConnection>::connect(&global.database_url, options).await?;
    match &cli.command {
        None | Some(Command::Seed) => {
            greenlet_orm(&engine, std::io::stdout()).await?;
        }
        Some(Command::Run(args)) => scaled(&engine, args, global.echo).await?,
        Some(Command::Migrate(action)) => migrate(&engine, action).await?,
    }
    Ok(())
}

/// `--n`: a whole number of parents, at least 1 (the seed updates the first).
fn parse_count(value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err("expected a whole number of parents, at least 1".into()),
    }
}

/// `run --n N`: the seed program on `N` parents.
async fn scaled(
    engine: &Engine<AnyConnection>,
    args: &RunArgs,
    echo: bool,
) -> Result<(), DemoError> {
    let n = args.n;
    let print = args.print || n <= PRINT_AT_MOST;
    let show_progress = n >= PROGRESS_FROM && !echo && std::io::stderr().is_terminal();
    let started = Instant::now();

    reset_schema(engine).await?;

    let insert_started = Instant::now();
    let bar = progress(show_progress, n, "insert");
    let families = workload_families(n);
    let children: usize = families.iter().map(|f| f.children.len()).sum();
    // One run_sync per batch, so the bar moves; all in one transaction.
    let batches: Vec<Vec<Family>> = families.chunks(PARENT_BATCH).map(<[_]>::to_vec).collect();
    drop(families);
    let mut session = engine.session();
    session
        .transaction(async |s| {
            for batch in batches {
                let len = batch.len();
                s.run_sync(move |conn| insert_families(conn, &batch))
                    .await?;
                bar.inc(len as u64);
            }
            Ok::<_, DemoError>(())
        })
        .await?;
    bar.finish_and_clear();
    let insert_time = insert_started.elapsed();

    let query_started = Instant::now();
    let mode = if args.eager {
        "eager"
    } else if args.stream {
        "stream"
    } else {
        "lazy"
    };
    let bar = progress(show_progress, n, mode);
    let eager = args.eager;
    let out = ParentCounter {
        out: if print {
            Box::new(std::io::BufWriter::new(std::io::stdout()))
        } else {
            Box::new(std::io::sink())
        },
        bar: bar.clone(),
        line_start: true,
    };
    let counts = if args.stream {
        streamed(&mut session, out).await?
    } else {
        session
            .run_sync(move |conn| {
                let mut out = out;
                let counts = if eager {
                    run_queries_eager(conn, &mut out)?
                } else {
                    run_queries(conn, &mut out)?
                };
                out.flush()?;
                Ok::<_, DemoError>(counts)
            })
            .await?
    };
    session.commit().await?;
    bar.finish_and_clear();
    let query_time = query_started.elapsed();

    if !print {
        let inserted = Counts {
            parents: n,
            children,
        };
        let times = [insert_time, query_time, started.elapsed()];
        summary(&mut std::io::stdout(), mode, inserted, counts, times)?;
    }
    Ok(())
}

/// `run --stream`'s query phase: every parent with its children streamed
/// from one query (`for_each_family` on the blocking pool), each written to
/// `out` as it arrives; then the first parent updated, in the same
/// transaction. When stdout is a terminal each parent is flushed at once.
async fn streamed(
    session: &mut AsyncSession<AnyConnection>,
    mut out: ParentCounter,
) -> Result<Counts, DemoError> {
    let mut families = session
        .stream(|conn, families| for_each_family(conn, |a, bs| Ok(families.send((a, bs))?)))
        .await?;
    let interactive = std::io::stdout().is_terminal();
    let mut counts = Counts::default();
    while let Some(family) = families.next().await {
        let (parent, children) = family?;
        // Buffered writes to stdout; a slow reader of the pipe makes the
        // producer wait too (the stream's bounded buffer).
        writeln!(out, "{parent}")?;
        for child in &children {
            writeln!(out, "{child}")?;
        }
        if interactive {
            out.flush()?;
        }
        counts.parents += 1;
        counts.children += children.len();
    }
    drop(families);
    out.flush()?;
    session
        .run_sync(|conn| Ok::<_, DemoError>(update_first(conn, "new data")?))
        .await?;
    Ok(counts)
}

/// One line: what was inserted and loaded, and how long each part took.
fn summary(
    out: &mut impl Write,
    mode: &str,
    inserted: Counts,
    loaded: Counts,
    [insert, queries, total]: [Duration; 3],
) -> std::io::Result<()> {
    writeln!(
        out,
        "{mode}: {} parents and {} children inserted in {:.3} s; \
         {} parents and {} children loaded, first updated in {:.3} s; total {:.3} s",
        inserted.parents,
        inserted.children,
        insert.as_secs_f64(),
        loaded.parents,
        loaded.children,
        queries.as_secs_f64(),
        total.as_secs_f64(),
    )
}

/// A progress bar over `len` parents, drawn on stderr only when `show`.
fn progress(show: bool, len: usize, phase: &'static str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len as u64), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>6} [{bar:40}] {human_pos}/{human_len} parents, {elapsed} elapsed, eta {eta}",
        )
        .expect("a valid progress template")
        .progress_chars("=> "),
    );
    bar.set_message(phase);
    bar
}

/// Passes output through and advances `bar` for every parent (a line
/// starting with `A`) written by the query functions.
struct ParentCounter {
    out: Box<dyn Write + Send>,
    bar: ProgressBar,
    line_start: bool,
}

impl Write for ParentCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let written = self.out.write(buf)?;
        let mut parents = 0;
        for &byte in &buf[..written] {
            if self.line_start && byte == b'A' {
                parents += 1;
            }
            self.line_start = byte == b'\n';
        }
        if parents > 0 {
            self.bar.inc(parents);
        }
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// `migrate run | revert | status | reset`, each in one transaction
/// (MySQL commits each DDL statement on its own).
async fn migrate(engine: &Engine<AnyConnection>, action: &Migrate) -> Result<(), DemoError> {
    let mut out = std::io::stdout().lock();
    let mut conn = engine.begin().await?;
    match action {
        Migrate::Run => {
            let applied = conn.run_sync(create_all).await?;
            conn.commit().await?;
            writeln!(out, "applied {applied} migration(s)")?;
        }
        Migrate::Revert => {
            let version = conn
                .run_sync(|conn| {
                    let source = migrations::for_connection(conn);
                    conn.revert_last_migration(source)
                        .map(|v| v.to_string())
                        .map_err(|e| match e.downcast_ref::<MigrationError>() {
                            Some(MigrationError::NoMigrationRun) => DemoError::Migration(
                                "no migration is applied, so none can be reverted".into(),
                            ),
                            _ => DemoError::Migration(e.to_string()),
                        })
                })
                .await?;
            conn.commit().await?;
            writeln!(out, "reverted {version}")?;
        }
        Migrate::Status => {
            let (mut applied, pending) = conn.run_sync(migrations::status).await?;
            conn.commit().await?;
            applied.sort();
            for version in &applied {
                writeln!(out, "applied  {version}")?;
            }
            for version in &pending {
                writeln!(out, "pending  {version}")?;
            }
            writeln!(out, "{} applied, {} pending", applied.len(), pending.len())?;
        }
        Migrate::Reset => {
            let reverted = conn.run_sync(drop_all).await?;
            let applied = conn.run_sync(create_all).await?;
            conn.commit().await?;
            writeln!(
                out,
                "reverted {reverted} migration(s), applied {applied} migration(s)"
            )?;
        }
    }
    Ok(())
}

/// Statement echo goes to stderr: with `--echo` at the seed's level of
/// detail, otherwise as `RUST_LOG` asks (silent by default).
fn init_tracing(echo: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) => EnvFilter::new(spec),
        Err(_) if echo => EnvFilter::new(format!("{SQL_TARGET}=info")),
        Err(_) => EnvFilter::new("off"),
    };
    // --echo adds `diesel_runsync::sql=info` unless RUST_LOG already shows
    // that target (named, or a bare global level of info or more).
    let shown_already = std::env::var("RUST_LOG").is_ok_and(|spec| {
        spec.contains(SQL_TARGET)
            || spec
                .split(',')
                .any(|d| matches!(d.trim(), "info" | "debug" | "trace"))
    });
    let filter = if echo && std::env::var("RUST_LOG").is_ok() && !shown_already {
        filter.add_directive(
            format!("{SQL_TARGET}=info")
                .parse()
                .expect("a valid tracing directive"),
        )
    } else {
        filter
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .with_target(false)
        .with_level(false)
        .init();
}
