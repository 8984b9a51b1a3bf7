//! `diesel-runsync`: SQLAlchemy's `greenlet_orm` example on Diesel.
//!
//! `cargo run` resets the schema of `runsync.db` (SQLite, in the current
//! directory), inserts three parents with their children, prints them
//! through `run_sync`, updates the first and commits. `DATABASE_URL` (from
//! the environment, `.env` or `--database-url`) points it at PostgreSQL or
//! MySQL instead; `--echo` prints every statement to stderr.
//!
//! Exit codes: 0 success, 1 a runtime error (one line on stderr), 2 bad
//! command-line usage.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use diesel_runsync::demo::program::greenlet_orm;
use diesel_runsync::demo::{AnyConnection, DemoError};
use diesel_runsync::{Engine, EngineOptions, SQL_TARGET};

/// Runs SQLAlchemy's asyncio `greenlet_orm` example on Diesel: sync query
/// code called from async code through `AsyncSession::run_sync`.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Database: a SQLite file path, sqlite://PATH, postgres://... or mysql://...
    #[arg(long, env = "DATABASE_URL", default_value = "runsync.db", hide_env_values = true)]
    database_url: String,

    /// Print every SQL statement with its bind values and duration (stderr).
    #[arg(long, env = "RUNSYNC_ECHO")]
    echo: bool,

    /// Most pooled connections open at once.
    #[arg(long, env = "RUNSYNC_POOL_SIZE", default_value_t = 8)]
    pool_size: u32,

    /// Seconds to wait for a free pooled connection.
    #[arg(long, env = "RUNSYNC_POOL_TIMEOUT", default_value_t = 30)]
    pool_timeout: u64,
}

fn main() -> ExitCode {
    if let Err(e) = dotenvy::dotenv()
        && !e.not_found()
    {
        eprintln!("error: cannot read .env: {e}");
        return ExitCode::FAILURE;
    }
    let cli = Cli::parse();
    init_tracing(cli.echo);
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
            let message = e.to_string();
            eprintln!("error: {}", message.split_whitespace().collect::<Vec<_>>().join(" "));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: &Cli) -> Result<(), DemoError> {
    let options = EngineOptions {
        max_size: cli.pool_size,
        connection_timeout: Duration::from_secs(cli.pool_timeout),
        echo: cli.echo,
        ..EngineOptions::default()
    };
    let engine = Engine::<AnyConnection>::connect(&cli.database_url, options).await?;
    greenlet_orm(&engine, std::io::stdout()).await?;
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
    let filter = if echo && std::env::var("RUST_LOG").is_ok() {
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
