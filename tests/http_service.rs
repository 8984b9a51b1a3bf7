//! Drives `examples/http_service.rs` over HTTP on loopback: the example's
//! router, served in-process on 127.0.0.1:0 over a test database of each
//! backend, with a minimal HTTP/1.1 client on a plain `TcpStream`.

mod common;

#[path = "../examples/http_service.rs"]
#[allow(dead_code)]
mod service;

use std::net::SocketAddr;
use std::time::Duration;

use diesel_runsync::EngineOptions;
use greenlet_orm::queries::all_rows;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use common::{TestDb, per_backend};

/// A response: status code, headers (names lowercased) and body.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One request on a fresh connection (`Connection: close`), read to the end.
async fn request(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> Reply {
    let mut stream = TcpStream::connect(addr)
        .await
        .expect("connect to the service");
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(body) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    head.push_str(body.unwrap_or(""));
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .expect("the response within 10 s")
        .unwrap();
    parse(&String::from_utf8(raw).expect("a UTF-8 response"))
}

fn parse(raw: &str) -> Reply {
    let (head, body) = raw.split_once("\r\n\r\n").expect("a header block");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("a status line: {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Reply {
        status,
        headers,
        body,
    }
}

fn dechunk(mut rest: &str) -> String {
    let mut body = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").expect("a chunk size line");
        let size = usize::from_str_radix(size.trim(), 16).expect("a hex chunk size");
        if size == 0 {
            return body;
        }
        body.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
}

per_backend!(
    serves_parents_over_http_and_shuts_down_gracefully,
    multi_thread
);
async fn serves_parents_over_http_and_shuts_down_gracefully(db: TestDb) {
    let options = EngineOptions::default().max_size(2);
    let engine = service::connect(&db.url, options)
        .await
        .expect("engine and migrations");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(service::serve(listener, engine.clone(), async {
        let _ = stopped.await;
    }));

    let health = request(addr, "GET", "/health", None).await;
    assert_eq!(health.status, 200, "{}", health.body);
    let health = health.json();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["backend"], db.backend.name());
    assert!(
        health["pool"]["connections"].as_u64().unwrap() >= 1,
        "{health}"
    );

    let empty = request(addr, "GET", "/parents", None).await;
    assert_eq!((empty.status, empty.json()), (200, json!([])));

    let created = request(
        addr,
        "POST",
        "/parents",
        Some(r#"{"data": "a1", "children": [null, "x"]}"#),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(created.header("location"), Some("/parents/1"));
    let a1 = json!({
        "id": 1,
        "data": "a1",
        "children": [
            {"id": 1, "a_id": 1, "data": null},
            {"id": 2, "a_id": 1, "data": "x"},
        ],
    });
    assert_eq!(created.json(), a1);

    let second = request(addr, "POST", "/parents", Some(r#"{"data": null}"#)).await;
    assert_eq!(second.status, 201, "{}", second.body);
    let a2 = json!({"id": 2, "data": null, "children": []});
    assert_eq!(second.json(), a2);

    let all = request(addr, "GET", "/parents", None).await;
    assert_eq!((all.status, all.json()), (200, json!([a1, a2])));
    let streamed = request(addr, "GET", "/parents/stream", None).await;
    assert_eq!(streamed.status, 200, "{}", streamed.body);
    assert_eq!(
        streamed.header("content-type"),
        Some("application/x-ndjson")
    );
    assert_eq!(ndjson(&streamed.body), vec![a1.clone(), a2.clone()]);
    let one = request(addr, "GET", "/parents/1", None).await;
    assert_eq!((one.status, one.json()), (200, a1));

    // What a client gets wrong is a 4xx with a JSON message.
    let missing = request(addr, "GET", "/parents/99", None).await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["error"], "no parent with id 99");
    let not_a_number = request(addr, "GET", "/parents/abc", None).await;
    assert_eq!(not_a_number.status, 404);
    assert!(not_a_number.json()["error"].is_string());
    let malformed = request(addr, "POST", "/parents", Some(r#"{"data": "#)).await;
    assert_eq!(malformed.status, 400, "{}", malformed.body);
    assert!(malformed.json()["error"].is_string());
    let wrong_type = request(addr, "POST", "/parents", Some(r#"{"data": 1}"#)).await;
    assert_eq!(wrong_type.status, 422, "{}", wrong_type.body);
    assert!(
        wrong_type.json()["error"]
            .as_str()
            .unwrap()
            .contains("data")
    );
    let unknown = request(addr, "GET", "/nowhere", None).await;
    assert_eq!(unknown.status, 404);

    // Many clients at once share the small pool; every insert lands.
    let posts = (0..8).map(|i| {
        tokio::spawn(async move {
            let body = format!(r#"{{"data": "c{i}", "children": [null]}}"#);
            request(addr, "POST", "/parents", Some(&body)).await.status
        })
    });
    for post in posts {
        assert_eq!(post.await.unwrap(), 201);
    }

    // The rows a user would find in the database.
    let (parents, children) = db.with_connection(|c| all_rows(c).unwrap()).await;
    assert_eq!((parents.len(), children.len()), (10, 10));
    assert_eq!(parents[0].data.as_deref(), Some("a1"));
    assert_eq!(children[1].data.as_deref(), Some("x"));

    // Graceful shutdown: serve returns, and the port stops answering.
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("serve returns within 10 s of the shutdown signal")
        .expect("the server task did not panic")
        .expect("serve ended without an I/O error");
    assert!(TcpStream::connect(addr).await.is_err());
    let status = engine.status();
    assert_eq!(
        status.connections, status.idle,
        "no connection still checked out"
    );
}

/// The lines of an NDJSON body, each parsed.
fn ndjson(body: &str) -> Vec<Value> {
    assert!(body.is_empty() || body.ends_with('\n'), "{body:?}");
    body.lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}")))
        .collect()
}

per_backend!(
    streams_every_parent_as_ndjson_and_stops_when_the_client_hangs_up,
    multi_thread
);
async fn streams_every_parent_as_ndjson_and_stops_when_the_client_hangs_up(db: TestDb) {
    const PARENTS: usize = 20_000;
    let engine = service::connect(&db.url, EngineOptions::default().max_size(2))
        .await
        .expect("engine and migrations");
    db.with_connection(|c| {
        greenlet_orm::queries::insert_families(
            c,
            &greenlet_orm::queries::workload_families(PARENTS),
        )
    })
    .await
    .expect("insert the parents");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(service::serve(listener, engine.clone(), async {
        let _ = stopped.await;
    }));

    // The whole stream: every parent once, in id order, with its children.
    let whole = request(addr, "GET", "/parents/stream", None).await;
    assert_eq!(whole.status, 200);
    let lines = ndjson(&whole.body);
    assert_eq!(lines.len(), PARENTS, "{}", db.backend);
    // Ids grow with insertion order (MySQL may leave gaps between batches).
    let mut last_id = 0;
    for (i, line) in lines.iter().enumerate() {
        let id = line["id"].as_i64().unwrap();
        assert!(id > last_id, "{}: ids out of order at line {i}", db.backend);
        last_id = id;
        assert_eq!(line["data"], format!("a{}", i + 1), "{}", db.backend);
        let children = line["children"].as_array().unwrap();
        assert_eq!(children.len(), if i % 2 == 0 { 2 } else { 1 });
        assert!(children.iter().all(|c| c["a_id"] == id));
    }

    // Clients that read the first lines and hang up, over a small receive
    // window so the server is mid-stream: the query stops, the session
    // rolls back and its connection returns.
    for _ in 0..5 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut stream = socket.connect(addr).await.unwrap();
        let head = format!("GET /parents/stream HTTP/1.1\r\nHost: {addr}\r\n\r\n");
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut first = vec![0; 2048];
        let read = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut first))
            .await
            .expect("the response starts within 30 s")
            .unwrap();
        assert!(
            String::from_utf8_lossy(&first[..read]).starts_with("HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&first[..read])
        );
        drop(stream);
    }
    common::settle(&engine).await;
    assert_eq!(db.open_transactions().await, 0, "{}", db.backend);
    // And the service still answers, from the same pool.
    let again = request(addr, "GET", "/parents/1", None).await;
    assert_eq!(again.status, 200, "{}", again.body);

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("serve returns within 10 s of the shutdown signal")
        .expect("the server task did not panic")
        .expect("serve ended without an I/O error");
}

#[test]
fn config_reads_its_variables_and_names_a_bad_one() {
    fn env<'a>(pairs: &'a [(&str, &str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }
    let defaults = service::Config::from_lookup(env(&[])).unwrap();
    assert_eq!(defaults.database_url, "runsync.db");
    assert_eq!(defaults.bind, "127.0.0.1:3000".parse().unwrap());
    assert_eq!(defaults.options.max_size, 8);
    assert!(!defaults.options.echo);

    let config = service::Config::from_lookup(env(&[
        ("DATABASE_URL", "postgres://u:secret@db/app"),
        ("BIND", "0.0.0.0:8080"),
        ("RUNSYNC_POOL_SIZE", "3"),
        ("RUNSYNC_POOL_TIMEOUT", "7"),
        ("RUNSYNC_ECHO", "yes"),
    ]))
    .unwrap();
    assert_eq!(config.database_url, "postgres://u:secret@db/app");
    assert_eq!(config.bind, "0.0.0.0:8080".parse().unwrap());
    assert_eq!(config.options.max_size, 3);
    assert_eq!(config.options.connection_timeout, Duration::from_secs(7));
    assert!(config.options.echo);

    for (name, value) in [
        ("RUNSYNC_POOL_SIZE", "many"),
        ("RUNSYNC_POOL_TIMEOUT", "-1"),
        ("BIND", "localhost"),
        ("RUNSYNC_ECHO", "maybe"),
    ] {
        let err = service::Config::from_lookup(env(&[(name, value)])).unwrap_err();
        assert!(err.starts_with(name), "{err}");
    }
}

/// The process's telemetry, installed once for this test binary: the
/// example's Prometheus recorder, and its OpenTelemetry span exporter into
/// a JSON-lines file (statements included: `diesel_runsync::sql=debug`).
fn telemetry() -> &'static std::path::Path {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    static SPANS: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    SPANS.get_or_init(|| {
        service::install_metrics();
        let dir = tempfile::tempdir().unwrap().keep();
        let path = dir.join("spans.jsonl");
        let (layer, provider) = service::spans_to_file(&path).unwrap();
        // Exports for as long as the test binary runs.
        std::mem::forget(provider);
        let filter = tracing_subscriber::EnvFilter::new("info,diesel_runsync::sql=debug");
        tracing_subscriber::registry()
            .with(layer.with_filter(filter))
            .init();
        path
    })
}

/// One series of a Prometheus scrape: name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// Parses Prometheus' text format (comments skipped).
fn parse_prometheus(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("a value");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let mut pairs = Vec::new();
            let mut rest = labels;
            while let Some((key, after)) = rest.split_once("=\"") {
                let end = after.find('"').expect("a closing quote");
                pairs.push((
                    key.trim_start_matches(',').to_owned(),
                    after[..end].to_owned(),
                ));
                rest = &after[end + 1..];
            }
            Sample {
                name: name.to_owned(),
                labels: pairs,
                value: value.parse().unwrap_or(f64::NAN),
            }
        })
        .collect()
}

/// A scrape of `GET /metrics`, restricted to the pool `pool`.
struct Scrape {
    samples: Vec<Sample>,
    pool: String,
}

impl Scrape {
    async fn take(addr: SocketAddr, pool: &str) -> Scrape {
        let reply = request(addr, "GET", "/metrics", None).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert!(
            reply
                .header("content-type")
                .is_some_and(|t| t.starts_with("text/plain"))
        );
        Scrape {
            samples: parse_prometheus(&reply.body),
            pool: pool.to_owned(),
        }
    }

    /// The sum of the series `name` of this pool whose labels include `with`.
    fn sum(&self, name: &str, with: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                s.labels
                    .iter()
                    .any(|(k, v)| k == "db_client_connection_pool_name" && *v == self.pool)
            })
            .filter(|s| {
                with.iter()
                    .all(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|s| s.value)
            .sum()
    }
}

/// The spans exported so far, one JSON object each.
fn exported_spans(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

per_backend!(metrics_and_spans_show_the_work_and_the_waits, multi_thread);
async fn metrics_and_spans_show_the_work_and_the_waits(db: TestDb) {
    let spans_file = telemetry();
    let pool = format!("obs-{}", db.backend.name());
    let options = EngineOptions::default()
        .max_size(2)
        .connection_timeout(Duration::from_millis(600))
        .pool_name(pool.clone());
    let engine = service::connect(&db.url, options)
        .await
        .expect("engine and migrations");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(service::serve(listener, engine.clone(), async {
        let _ = stopped.await;
    }));
    let created = request(addr, "POST", "/parents", Some(r#"{"data": "a1"}"#)).await;
    assert_eq!(created.status, 201, "{}", created.body);

    // Under load: every operation is counted and timed.
    let before = Scrape::take(addr, &pool).await;
    let gets = (0..20).map(|_| tokio::spawn(request(addr, "GET", "/parents/1", None)));
    for get in gets {
        assert_eq!(get.await.unwrap().status, 200);
    }
    let after = Scrape::take(addr, &pool).await;
    let grew = |name: &str, with: &[(&str, &str)]| after.sum(name, with) - before.sum(name, with);
    let run_sync = [("db_operation_name", "run_sync")];
    let commit = [("db_operation_name", "commit")];
    assert_eq!(grew("db_client_operation_duration_count", &run_sync), 20.0);
    assert_eq!(grew("db_client_operation_duration_count", &commit), 20.0);
    assert!(grew("db_client_operation_duration_sum", &run_sync) > 0.0);
    assert_eq!(
        after.sum(
            "db_client_operation_duration_count",
            &[(
                "db_system_name",
                db.backend.name().replace("postgres", "postgresql").as_str()
            )]
        ),
        after.sum("db_client_operation_duration_count", &[])
    );
    // Each operation is one hop through the blocking queue, and one checkout.
    assert_eq!(grew("db_runsync_queue_wait_count", &[]), 40.0);
    assert_eq!(grew("db_client_connection_wait_time_count", &[]), 20.0);
    assert_eq!(grew("db_client_connection_use_time_count", &[]), 20.0);
    assert!(after.sum("db_client_connection_create_time_count", &[]) >= 1.0);
    assert_eq!(after.sum("db_client_connection_max", &[]), 2.0);
    let state = |s: &Scrape, state: &str| {
        s.sum(
            "db_client_connection_count",
            &[("db_client_connection_state", state)],
        )
    };
    assert_eq!(state(&after, "used"), 0.0);
    let open = engine.status().connections as f64;
    assert_eq!(state(&after, "idle"), open, "{:?}", engine.status());
    assert_eq!(after.sum("db_client_connection_pending_requests", &[]), 0.0);

    // The pool exhausted: a request waits, and its wait shows.
    let hold = (engine.begin().await.unwrap(), engine.begin().await.unwrap());
    let waiting = tokio::spawn(request(addr, "GET", "/parents/1", None));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let exhausted = Scrape::take(addr, &pool).await;
    assert_eq!(
        exhausted.sum("db_client_connection_pending_requests", &[]),
        1.0
    );
    assert_eq!(state(&exhausted, "used"), 2.0);
    drop(hold.0);
    assert_eq!(waiting.await.unwrap().status, 200);
    let waited = Scrape::take(addr, &pool).await;
    let wait_sum = |s: &Scrape| s.sum("db_client_connection_wait_time_sum", &[]);
    assert!(
        wait_sum(&waited) - wait_sum(&exhausted) >= 0.25,
        "{} s",
        wait_sum(&waited) - wait_sum(&exhausted)
    );
    // And past the connection timeout: a 503, counted.
    let hold = (hold.1, engine.begin().await.unwrap());
    let refused = request(addr, "GET", "/parents/1", None).await;
    assert_eq!(refused.status, 503, "{}", refused.body);
    drop(hold);
    let timed_out = Scrape::take(addr, &pool).await;
    assert_eq!(timed_out.sum("db_client_connection_timeouts", &[]), 1.0);
    assert_eq!(
        timed_out.sum(
            "db_client_operation_duration_count",
            &[
                ("db_operation_name", "run_sync"),
                ("error_type", "pool_timeout")
            ]
        ),
        1.0
    );

    // One request's exported span tree: the request, its operations, and
    // their statements, with the conventions' attribute names.
    let mut found = None;
    for _ in 0..100 {
        let spans = exported_spans(spans_file);
        let mine = |s: &&Value| s["attributes"]["db.client.connection.pool.name"] == pool.as_str();
        let requests: Vec<&Value> = spans
            .iter()
            .filter(|s| s["name"] == "http.request" && s["attributes"]["url.path"] == "/parents/1")
            .collect();
        // The request that waited for the pool: its run_sync span says so.
        found = spans
            .iter()
            .filter(mine)
            .filter(|s| s["name"] == "db.run_sync")
            .filter(|s| s["attributes"]["db.runsync.pool_wait_ms"].as_f64() >= Some(250.0))
            .find_map(|op| {
                let parent = requests
                    .iter()
                    .find(|r| r["span_id"] == op["parent_span_id"])?;
                let commit = spans.iter().filter(mine).find(|s| {
                    s["name"] == "db.commit" && s["parent_span_id"] == parent["span_id"]
                })?;
                Some(((*parent).clone(), op.clone(), commit.clone()))
            });
        if found.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (parent, op, commit) = found.expect("the waiting request's spans, exported");
    assert_eq!(parent["trace_id"], op["trace_id"]);
    assert_eq!(op["kind"], "Client");
    let attributes = &op["attributes"];
    let system = match db.backend.name() {
        "postgres" => "postgresql",
        other => other,
    };
    assert_eq!(attributes["db.system.name"], system, "{op}");
    assert_eq!(attributes["db.operation.name"], "run_sync");
    assert!(attributes["db.namespace"].is_string(), "{op}");
    if system == "sqlite" {
        assert!(attributes.get("server.address").is_none(), "{op}");
    } else {
        assert!(attributes["server.address"].is_string(), "{op}");
        assert!(attributes["server.port"].as_i64().is_some(), "{op}");
    }
    for wait in [
        "db.runsync.pool_wait_ms",
        "db.runsync.queue_wait_ms",
        "db.runsync.run_ms",
    ] {
        assert!(attributes[wait].as_f64().is_some(), "{wait}: {op}");
    }
    assert!(attributes.get("error.type").is_none(), "{op}");
    // The statements, as events of the operation span, with their SQL and
    // without their bind values.
    let statements: Vec<&str> = op["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["attributes"]["db.query.text"].as_str())
        .collect();
    assert!(
        statements
            .iter()
            .any(|sql| sql.to_uppercase().starts_with("SELECT")),
        "{op}"
    );
    assert!(statements.iter().all(|sql| !sql.contains("binds")), "{op}");
    assert_eq!(commit["attributes"]["db.operation.name"], "commit");
    let committed: Vec<&str> = commit["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["attributes"]["db.query.text"].as_str())
        .collect();
    assert_eq!(committed, ["COMMIT"], "{commit}");
    // The request that timed out: its span says why.
    let spans = exported_spans(spans_file);
    assert!(
        spans.iter().any(|s| s["name"] == "db.run_sync"
            && s["attributes"]["db.client.connection.pool.name"] == pool.as_str()
            && s["attributes"]["error.type"] == "pool_timeout"),
        "no failed run_sync span"
    );

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("serve returns within 10 s of the shutdown signal")
        .expect("the server task did not panic")
        .expect("serve ended without an I/O error");
}
