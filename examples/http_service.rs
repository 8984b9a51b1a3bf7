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
//!   answers 201 with what was stored;
//! - `GET /metrics`: the engine's metrics (diesel-runsync's `metrics`
//!   feature) in Prometheus' text format, through `metrics-exporter-prometheus`.
//!
//! Each request runs in an `http.request` span; the engine's operation
//! spans (`db.run_sync`, `db.commit`, ...) are its children, and the SQL
//! statements their events. With `RUNSYNC_SPANS_FILE` set, spans are
//! exported the OpenTelemetry way (`tracing-opentelemetry` into the
//! OpenTelemetry SDK) to that file, one JSON object per span and line
//! (name, ids, kind, status, attributes, events); statements are in it
//! when `RUST_LOG` lets `diesel_runsync::sql=debug` through (or with
//! `RUNSYNC_ECHO`).
//!
//! Errors are JSON too: `{"error": "..."}`, 4xx for bad requests, 503 when
//! no connection can be had, 500 otherwise.
//!
//! Settings come from the environment (or `.env`): `DATABASE_URL` (default
//! `runsync.db`), `RUNSYNC_POOL_SIZE` (default 8), `RUNSYNC_POOL_TIMEOUT`
//! (seconds, default 30), `RUNSYNC_ECHO` (log every statement),
//! `RUNSYNC_SLOW_STATEMENT_MS` (warn about statements slower than this),
//! `RUNSYNC_SPANS_FILE` (export spans there), `BIND`
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
//! curl -s localhost:3000/metrics
//! ```
//!
//! `tests/http_service.rs` includes this file as a module and drives
//! [`router`] over loopback.

use std::future::Future;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path as FsPath, PathBuf};
use std::process::ExitCode;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{Request, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use diesel::prelude::*;
use diesel_runsync::{Engine, EngineOptions, Error};
use greenlet_orm::migrations::create_all;
use greenlet_orm::queries::{for_each_family, insert_families, load_families};
use greenlet_orm::schema::{a, b};
use greenlet_orm::{A, AnyConnection, B, DemoError, Family};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tracing::Instrument as _;

/// The service's settings, read from the environment.
#[derive(Debug, Clone)]
pub struct Config {
    /// `DATABASE_URL`.
    pub database_url: String,
    /// `BIND`.
    pub bind: SocketAddr,
    /// `RUNSYNC_POOL_SIZE`, `RUNSYNC_POOL_TIMEOUT`, `RUNSYNC_ECHO`,
    /// `RUNSYNC_SLOW_STATEMENT_MS`.
    pub options: EngineOptions,
    /// `RUNSYNC_SPANS_FILE`: where spans are exported (JSON lines).
    pub spans_file: Option<PathBuf>,
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
                .echo(echo)
                .slow_statement_threshold(
                    var("RUNSYNC_SLOW_STATEMENT_MS")
                        .map(|v| {
                            v.trim().parse().map(Duration::from_millis).map_err(|_| {
                                format!("RUNSYNC_SLOW_STATEMENT_MS={v:?} is not a number of milliseconds")
                            })
                        })
                        .transpose()?,
                ),
            spans_file: var("RUNSYNC_SPANS_FILE").map(PathBuf::from),
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
        .route("/metrics", get(render_metrics))
        .layer(axum::middleware::from_fn(request_span))
        .with_state(engine)
}

/// Runs each request in an `http.request` span: the parent of the
/// engine's operation spans.
async fn request_span(request: Request<axum::body::Body>, next: Next) -> Response {
    let span = tracing::info_span!(
        "http.request",
        otel.kind = "server",
        http.request.method = %request.method(),
        url.path = %request.uri().path(),
        http.response.status_code = tracing::field::Empty,
    );
    let response = next.run(request).instrument(span.clone()).await;
    span.record("http.response.status_code", response.status().as_u16());
    response
}

/// The process's Prometheus recorder, once installed ([`install_metrics`]).
static METRICS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder as the process's `metrics` recorder
/// (once; later calls return the same handle). Call it before
/// `Engine::connect`: an engine registers its metrics when it connects.
pub fn install_metrics() -> PrometheusHandle {
    METRICS
        .get_or_init(|| {
            // Seconds, from 100 µs to 10 s.
            let buckets = [
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0, 10.0,
            ];
            PrometheusBuilder::new()
                .set_buckets(&buckets)
                .expect("non-empty buckets")
                .install_recorder()
                .expect("no other metrics recorder is installed")
        })
        .clone()
}

/// `GET /metrics`: Prometheus' text format.
async fn render_metrics() -> Response {
    match METRICS.get() {
        Some(handle) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => ApiError(StatusCode::NOT_FOUND, "metrics are not installed".into()).into_response(),
    }
}

/// An OpenTelemetry span exporter writing one JSON object per span and
/// line to a file: name, trace and span ids, parent id, kind, status,
/// attributes and events (each with its attributes).
#[derive(Debug)]
pub struct JsonLinesExporter(Mutex<std::fs::File>);

impl JsonLinesExporter {
    /// Appends to `path` (created if missing).
    pub fn create(path: &FsPath) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(JsonLinesExporter(Mutex::new(file)))
    }
}

fn attributes(pairs: &[opentelemetry::KeyValue]) -> serde_json::Map<String, serde_json::Value> {
    use opentelemetry::Value as V;
    pairs
        .iter()
        .map(|kv| {
            let value = match &kv.value {
                V::Bool(b) => serde_json::json!(b),
                V::I64(i) => serde_json::json!(i),
                V::F64(f) => serde_json::json!(f),
                other => serde_json::json!(other.to_string()),
            };
            (kv.key.to_string(), value)
        })
        .collect()
}

impl SpanExporter for JsonLinesExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let mut lines = String::new();
        for span in batch {
            let parent = span.parent_span_id;
            let line = serde_json::json!({
                "name": span.name,
                "trace_id": span.span_context.trace_id().to_string(),
                "span_id": span.span_context.span_id().to_string(),
                "parent_span_id": (parent != opentelemetry::trace::SpanId::INVALID)
                    .then(|| parent.to_string()),
                "kind": format!("{:?}", span.span_kind),
                "status": format!("{:?}", span.status),
                "attributes": attributes(&span.attributes),
                "events": span.events.iter().map(|event| serde_json::json!({
                    "name": event.name,
                    "attributes": attributes(&event.attributes),
                })).collect::<Vec<_>>(),
            });
            lines.push_str(&line.to_string());
            lines.push('\n');
        }
        let mut file = self.0.lock().unwrap_or_else(|e| e.into_inner());
        file.write_all(lines.as_bytes())
            .and_then(|()| file.flush())
            .map_err(|e| opentelemetry_sdk::error::OTelSdkError::InternalFailure(e.to_string()))
    }
}

/// A `tracing` layer that exports spans through the OpenTelemetry SDK to
/// `path` ([`JsonLinesExporter`]), each as it ends. Keep the provider
/// alive (and shut it down at exit) for as long as spans are exported.
pub fn spans_to_file<S>(
    path: &FsPath,
) -> std::io::Result<(
    tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::SdkTracer>,
    SdkTracerProvider,
)>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(JsonLinesExporter::create(path)?)
        .build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("greenlet-orm"));
    Ok((layer, provider))
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
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (spans, provider) = match config.spans_file.as_deref().map(spans_to_file).transpose() {
        Ok(Some((layer, provider))) => (Some(layer), Some(provider)),
        Ok(None) => (None, None),
        Err(e) => {
            eprintln!("error: cannot write spans to RUNSYNC_SPANS_FILE: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .with(spans)
        .init();
    // Before the engine connects: it registers its metrics then.
    let metrics = install_metrics();
    tokio::spawn(async move {
        // Drains the histograms' buffers between scrapes.
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            metrics.run_upkeep();
        }
    });
    let code = match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    };
    if let Some(provider) = provider {
        let _ = provider.shutdown();
    }
    code
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
