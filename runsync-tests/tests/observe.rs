//! Spans and slow statements as a subscriber sees them: an operation's
//! span is a child of the caller's, entered on the blocking thread (so the
//! closure's own spans and the statements nest under it), and a slow
//! statement is logged at WARN with the echo off, without its bind values.
//! (SQLite only: what is checked here does not depend on the backend; the
//! HTTP example's tests check the exported spans on every backend.)
#![cfg(feature = "sqlite")]

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use diesel::prelude::*;
use diesel_runsync::{Engine, EngineOptions, Error, PoolEvent};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

/// A span as recorded: its name, parent and fields.
#[derive(Debug, Clone)]
struct SpanRec {
    name: &'static str,
    parent: Option<u64>,
    fields: HashMap<String, String>,
}

/// An event as recorded: level, target, fields, and the span it was in.
#[derive(Debug, Clone)]
struct EventRec {
    level: Level,
    target: String,
    fields: HashMap<String, String>,
    span: Option<u64>,
}

#[derive(Default)]
struct Recorder {
    next: AtomicU64,
    spans: Mutex<HashMap<u64, SpanRec>>,
    events: Mutex<Vec<EventRec>>,
}

thread_local! {
    static CURRENT: std::cell::RefCell<Vec<u64>> = const { std::cell::RefCell::new(Vec::new()) };
}

struct Fields<'a>(&'a mut HashMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(
            field.name().to_owned(),
            format!("{value:?}").trim_matches('"').to_owned(),
        );
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

fn current() -> Option<u64> {
    CURRENT.with(|c| c.borrow().last().copied())
}

impl Subscriber for &'static Recorder {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        // The SQL echo stays off (its DEBUG events are not wanted): only
        // the slow statements' WARN comes through on its target.
        !(metadata.target() == diesel_runsync::SQL_TARGET && *metadata.level() > Level::WARN)
    }
    fn new_span(&self, attrs: &Attributes<'_>) -> Id {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let parent = if attrs.is_root() {
            None
        } else {
            attrs.parent().map(Id::into_u64).or_else(current)
        };
        let mut fields = HashMap::new();
        attrs.record(&mut Fields(&mut fields));
        let name = attrs.metadata().name();
        self.spans.lock().unwrap().insert(
            id,
            SpanRec {
                name,
                parent,
                fields,
            },
        );
        Id::from_u64(id)
    }
    fn record(&self, span: &Id, values: &Record<'_>) {
        if let Some(rec) = self.spans.lock().unwrap().get_mut(&span.into_u64()) {
            values.record(&mut Fields(&mut rec.fields));
        }
    }
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut fields = HashMap::new();
        event.record(&mut Fields(&mut fields));
        self.events.lock().unwrap().push(EventRec {
            level: *event.metadata().level(),
            target: event.metadata().target().to_owned(),
            fields,
            span: event.parent().map(Id::into_u64).or_else(current),
        });
    }
    fn enter(&self, span: &Id) {
        CURRENT.with(|c| c.borrow_mut().push(span.into_u64()));
    }
    fn exit(&self, span: &Id) {
        CURRENT.with(|c| {
            let mut stack = c.borrow_mut();
            if let Some(at) = stack.iter().rposition(|s| *s == span.into_u64()) {
                stack.remove(at);
            }
        });
    }
}

fn recorder() -> &'static Recorder {
    static RECORDER: std::sync::OnceLock<&'static Recorder> = std::sync::OnceLock::new();
    RECORDER.get_or_init(|| {
        let recorder: &'static Recorder = Box::leak(Box::default());
        tracing::subscriber::set_global_default(recorder).expect("the only subscriber");
        recorder
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_nest_across_the_hop_and_slow_statements_warn_with_the_echo_off() {
    let recorder = recorder();
    let dir = tempfile::tempdir().unwrap();
    let url = dir.path().join("observe.db").display().to_string();
    let checkouts = std::sync::Arc::new(AtomicU64::new(0));
    let counted = checkouts.clone();
    let options = EngineOptions::default()
        .pool_name("observed")
        .slow_statement_threshold(Some(Duration::ZERO))
        .on_pool_event(move |event| {
            if event == PoolEvent::Checkout {
                counted.fetch_add(1, Ordering::Relaxed);
            }
        });
    let engine = Engine::<SqliteConnection>::connect(&url, options)
        .await
        .unwrap();
    let request = tracing::info_span!("request");
    let n: i64 = {
        use tracing::Instrument as _;
        async {
            engine
                .transaction(|conn| {
                    let _mine = tracing::info_span!("users_code").entered();
                    diesel::select(
                        diesel::dsl::sql::<diesel::sql_types::BigInt>("40 + ")
                            .bind::<diesel::sql_types::BigInt, _>(2_i64),
                    )
                    .get_result(conn)
                })
                .await
        }
        .instrument(request.clone())
        .await
        .unwrap()
    };
    assert_eq!(n, 42);
    assert!(
        checkouts.load(Ordering::Relaxed) >= 2,
        "connect's and the transaction's"
    );

    let spans = recorder.spans.lock().unwrap().clone();
    let request_id = request.id().unwrap().into_u64();
    let (op_id, op) = spans
        .iter()
        .find(|(_, s)| {
            s.name == "db.transaction"
                && s.fields
                    .get("db.client.connection.pool.name")
                    .map(String::as_str)
                    == Some("observed")
        })
        .expect("the operation's span");
    assert_eq!(op.parent, Some(request_id), "a child of the caller's span");
    assert_eq!(op.fields["otel.kind"], "client");
    assert_eq!(op.fields["db.system.name"], "sqlite");
    assert_eq!(op.fields["db.operation.name"], "transaction");
    assert_eq!(op.fields["db.namespace"], url);
    for wait in [
        "db.runsync.pool_wait_ms",
        "db.runsync.queue_wait_ms",
        "db.runsync.run_ms",
    ] {
        assert!(
            op.fields[wait].parse::<f64>().unwrap() >= 0.0,
            "{wait}: {op:?}"
        );
    }
    assert!(!op.fields.contains_key("error.type"));
    let (users_id, users) = spans
        .iter()
        .find(|(_, s)| s.name == "users_code")
        .expect("the closure's span");
    assert_eq!(users.parent, Some(*op_id), "entered on the blocking thread");

    let events = recorder.events.lock().unwrap().clone();
    let slow: Vec<&EventRec> = events
        .iter()
        .filter(|e| {
            e.target == diesel_runsync::SQL_TARGET
                && (e.span == Some(*op_id) || e.span == Some(*users_id))
        })
        .collect();
    assert!(slow.iter().all(|e| e.level == Level::WARN), "{slow:?}");
    let texts: Vec<&str> = slow
        .iter()
        .map(|e| e.fields["db.query.text"].as_str())
        .collect();
    assert_eq!(texts.first(), Some(&"BEGIN IMMEDIATE"), "{texts:?}");
    assert!(texts.contains(&"SELECT 40 + ?"), "{texts:?}");
    assert_eq!(texts.last(), Some(&"COMMIT"), "{texts:?}");
    assert!(
        slow.iter().all(|e| !e.fields["message"].contains("binds")
            && e.fields.contains_key("db.runsync.duration_ms")),
        "{slow:?}"
    );

    // A failure is typed on its span.
    let failed = engine
        .transaction(|conn| {
            diesel::sql_query("SELECT * FROM no_such_table").execute(conn)?;
            Ok::<_, Error>(())
        })
        .await;
    assert!(failed.is_err());
    let spans = recorder.spans.lock().unwrap().clone();
    assert!(
        spans.values().any(|s| s.name == "db.transaction"
            && s.fields.get("error.type").map(String::as_str) == Some("database_error")
            && s.fields.get("otel.status_code").map(String::as_str) == Some("error")),
        "{spans:?}"
    );
}
