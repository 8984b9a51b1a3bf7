//! A small JSON service over the demo schema: axum handlers that call plain
//! synchronous Diesel functions through `AsyncSession::run_sync`.
//!
//! - `GET /health`: the pool's connection counts;
//! - `GET /parents`: every parent with its children (`load_families`);
//! - `GET /parents/stream`: the same as NDJSON (one JSON object per line,
//!   `application/x-ndjson`), streamed from one query read row by row
//!   (`AsyncSession::into_stream` over `for_each_family`): the response
//!   starts with the first parent and memory stays flat however many there
//!   are. An error after the first line cuts the response short (no final
//!   chunk), which clients see as a truncated body; a client that hangs up
//!   stops the query (the session rolls back and its connection returns);
//! - `GET /parents/{id}`: one parent with its children, or 404;
//! - `POST /parents` with `{"data": "a1", "children": [null, "x"]}`: inserts
//!   a parent and its children in one transaction (`insert_families`) and
//!   answers 201 with what was stored.
//!
//! Errors are JSON too: `{"error": "..."}`, 4xx for bad requests, 503 when
//! no connection can be had, 500 otherwise.
//!
//! Settings come from the environment (or `.env`): `DATABASE_URL` (default
//! `runsync.db`), `RUNSYNC_POOL_SIZE` (default 8), `RUNSYNC_POOL_TIMEOUT`
//! (seconds, default 30), `RUNSYNC_ECHO` (log every statement), `BIND`
//! (default `127.0.0.1:3000`), `RUST_LOG` (default `info`). Pending
//! migrations are applied at start-up; nothing is dropped. Ctrl-C or
//! SIGTERM stops accepting connections and lets requests in flight finish.
//!
//! ```sh
//! cargo run --example http_service &
//! curl -s -X POST localhost:3000/parents -H 'content-type: application/json' \
//!      -d '{"data": "a1", "children": [null, null]}'
//! curl -s localhost:3000/parents
//! curl -sN localhost:3000/parents/stream
//! curl -s localhost:3000/health
//! ```
//!
//! `tests/http_service.rs` includes this file as a module and drives
//! [`router`] over loopback.

use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use diesel::prelude::*;
use diesel_runsync::{Engine, EngineOptions, Error};
use greenlet_orm::migrations::create_all;
use greenlet_orm::queries::{for_each_family, insert_families, load_families};
use greenlet_orm::schema::{a, b};
use greenlet_orm::{A, AnyConnection, B, DemoError, Family};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

/// The service's settings, read from the environment.
#[derive(Debug, Clone)]
pub struct Config {
    /// `DATABASE_URL`.
    pub database_url: String,
    /// `BIND`.
    pub bind: SocketAddr,
    /// `RUNSYNC_POOL_SIZE`, `RUNSYNC_POOL_TIMEOUT`, `RUNSYNC_ECHO`.
    pub options: EngineOptions,
}

impl Config {
    /// Reads the settings from the environment; the error names the
    /// variable that is wrong.
    pub fn from_env() -> Result<Config, String> {
        Config::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the settings through `lookup` (a variable's value by name).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, String> {
        let var = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        fn parsed<T: std::str::FromStr>(
            var: &dyn Fn(&str) -> Option<String>,
            name: &str,
            default: T,
            what: &str,
        ) -> Result<T, String> {
            var(name).map_or(Ok(default), |v| {
                v.trim()
                    .parse()
                    .map_err(|_| format!("{name}={v:?} is not {what}"))
            })
        }
        let echo = match var("RUNSYNC_ECHO").as_deref().map(str::to_ascii_lowercase) {
            None => false,
            Some(v) if ["1", "true", "yes", "on"].contains(&v.as_str()) => true,
            Some(v) if ["0", "false", "no", "off"].contains(&v.as_str()) => false,
            Some(v) => {
                return Err(format!(
                    "RUNSYNC_ECHO={v:?} is not one of 1/0, true/false, yes/no, on/off"
                ));
            }
        };
        Ok(Config {
            database_url: var("DATABASE_URL").unwrap_or_else(|| "runsync.db".into()),
            bind: parsed(
                &var,
                "BIND",
                SocketAddr::from(([127, 0, 0, 1], 3000)),
                "an address such as 127.0.0.1:3000",
            )?,
            options: EngineOptions::default()
                .max_size(parsed(
                    &var,
                    "RUNSYNC_POOL_SIZE",
                    8,
                    "a number of connections",
                )?)
                .connection_timeout(Duration::from_secs(parsed(
                    &var,
                    "RUNSYNC_POOL_TIMEOUT",
                    30,
                    "a number of seconds",
                )?))
                .echo(echo),
        })
    }
}

/// Connects to `url` and applies the pending migrations.
pub async fn connect(
    url: &str,
    options: EngineOptions,
) -> Result<Engine<AnyConnection>, DemoError> {
    let engine = Engine::connect(url, options).await?;
    let mut conn = engine.begin().await?;
    conn.run_sync(create_all).await?;
    conn.commit().await?;
    Ok(engine)
}

/// The service's routes over `engine`.
pub fn router(engine: Engine<AnyConnection>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/parents", get(list_parents).post(create_parent))
        .route("/parents/stream", get(stream_parents))
        .route("/parents/{id}", get(get_parent))
        .with_state(engine)
}

/// Serves [`router`] on `listener` until `shutdown` completes, then waits
/// for the requests in flight.
pub async fn serve(
    listener: TcpListener,
    engine: Engine<AnyConnection>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(engine))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Completes on Ctrl-C or (on Unix) SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

/// A parent as JSON, with its children.
#[derive(Debug, Serialize)]
pub struct Parent {
    id: i32,
    data: Option<String>,
    children: Vec<Child>,
}

/// A child as JSON.
#[derive(Debug, Serialize)]
pub struct Child {
    id: i32,
    a_id: i32,
    data: Option<String>,
}

impl From<(A, Vec<B>)> for Parent {
    fn from((parent, children): (A, Vec<B>)) -> Self {
        Parent {
            id: parent.id,
            data: parent.data,
            children: children
                .into_iter()
                .map(|b| Child {
                    id: b.id,
                    a_id: b.a_id,
                    data: b.data,
                })
                .collect(),
        }
    }
}

/// The body of `POST /parents`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewParent {
    data: Option<String>,
    #[serde(default)]
    children: Vec<Option<String>>,
}

/// An error answered as `{"error": "..."}` with its status.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<DemoError> for ApiError {
    fn from(e: DemoError) -> Self {
        let status = match &e {
            DemoError::Session(Error::PoolTimeout(_) | Error::Connect { .. }) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        // Facade errors never carry a password, so the message can go out.
        tracing::error!("{e}");
        ApiError(status, e.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        ApiError(e.status(), e.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(e: PathRejection) -> Self {
        ApiError(StatusCode::NOT_FOUND, e.body_text())
    }
}

type Db = State<Engine<AnyConnection>>;

async fn health(State(engine): Db) -> Json<serde_json::Value> {
    let pool = engine.status();
    Json(serde_json::json!({
        "status": "ok",
        "backend": engine.url().backend().name(),
        "pool": { "connections": pool.connections, "idle": pool.idle },
    }))
}

async fn list_parents(State(engine): Db) -> Result<Json<Vec<Parent>>, ApiError> {
    let mut session = engine.session();
    let mut families = session
        .run_sync(|conn| Ok::<_, DemoError>(load_families(conn)?))
        .await?;
    session.commit().await.map_err(DemoError::from)?;
    families.sort_by_key(|(parent, _)| parent.id);
    Ok(Json(families.into_iter().map(Parent::from).collect()))
}

/// `GET /parents/stream`: one JSON line per parent, serialized on the
/// blocking pool as the rows arrive. The session is the stream's: on
/// SQLite its transaction holds the database's write lock (the engine
/// begins every transaction `IMMEDIATE`) until the last line is sent.
async fn stream_parents(State(engine): Db) -> Result<Response, ApiError> {
    let lines = engine
        .session()
        .into_stream(|conn, lines| {
            for_each_family(conn, |parent, children| {
                let mut line = serde_json::to_string(&Parent::from((parent, children)))
                    .map_err(|e| DemoError::Check(format!("cannot serialize a parent: {e}")))?;
                line.push('\n');
                Ok(lines.send(line)?)
            })
        })
        .await?;
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(lines),
    )
        .into_response())
}

async fn get_parent(
    State(engine): Db,
    id: Result<Path<i32>, PathRejection>,
) -> Result<Json<Parent>, ApiError> {
    let Path(id) = id?;
    let mut session = engine.session();
    let found = session.run_sync(move |conn| load_family(conn, id)).await?;
    session.commit().await.map_err(DemoError::from)?;
    match found {
        Some(family) => Ok(Json(Parent::from(family))),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no parent with id {id}"),
        )),
    }
}

async fn create_parent(
    State(engine): Db,
    body: Result<Json<NewParent>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Json(new) = body?;
    let family = Family {
        data: new.data,
        children: new.children,
    };
    let mut session = engine.session();
    let created = session
        .transaction(async |s| {
            s.run_sync(move |conn| {
                let ids = insert_families(conn, std::slice::from_ref(&family))?;
                load_family(conn, ids[0])?
                    .ok_or_else(|| DemoError::Check("the new parent is not there".into()))
            })
            .await
        })
        .await?;
    let location = format!("/parents/{}", created.0.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(Parent::from(created)),
    ))
}

/// The parent `id` and its children, in id order: plain synchronous Diesel.
fn load_family(conn: &mut AnyConnection, id: i32) -> Result<Option<(A, Vec<B>)>, DemoError> {
    let Some(parent) = a::table
        .find(id)
        .select(A::as_select())
        .first(conn)
        .optional()?
    else {
        return Ok(None);
    };
    let children = B::belonging_to(&parent)
        .select(B::as_select())
        .order(b::id)
        .load(conn)?;
    Ok(Some((parent, children)))
}

#[tokio::main]
async fn main() -> ExitCode {
    dotenvy::dotenv().ok();
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> Result<(), Box<dyn std::error::Error>> {
    let engine = connect(&config.database_url, config.options).await?;
    let listener = TcpListener::bind(config.bind)
        .await
        .map_err(|e| format!("cannot listen on {} (BIND): {e}", config.bind))?;
    tracing::info!(
        "serving {} on http://{}",
        engine.url(),
        listener.local_addr()?
    );
    serve(listener, engine, shutdown_signal()).await?;
    tracing::info!("shut down");
    Ok(())
}
