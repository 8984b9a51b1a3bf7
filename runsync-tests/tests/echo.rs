//! The SQL echo and bind values (issue 17: "nothing prints a bind value
//! unless asked"): with `diesel_runsync::sql` at `DEBUG` but the engine's
//! `echo` option off, each statement's message is its SQL alone; with the
//! option on (asked, as SQLAlchemy's `echo=True`), the message shows the
//! binds. (SQLite only: the echo does not depend on the backend.)
#![cfg(feature = "sqlite")]

use std::sync::Mutex;

use diesel::prelude::*;
use diesel_runsync::{Engine, EngineOptions};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// Every message logged on the echo's target, at every level.
#[derive(Default)]
struct Messages(Mutex<Vec<String>>);

struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

impl Subscriber for &'static Messages {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        if event.metadata().target() == diesel_runsync::SQL_TARGET {
            let mut message = Message(String::new());
            event.record(&mut message);
            self.0.lock().unwrap().push(message.0);
        }
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

/// The messages of a `SELECT 40 + ?` with the bind 2, through an engine
/// with `echo` on or off.
async fn select_messages(messages: &'static Messages, echo: bool) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let url = dir.path().join("echo.db").display().to_string();
    let engine = Engine::<SqliteConnection>::connect(&url, EngineOptions::default().echo(echo))
        .await
        .unwrap();
    messages.0.lock().unwrap().clear();
    let n: i64 = engine
        .transaction(|conn| {
            diesel::select(
                diesel::dsl::sql::<diesel::sql_types::BigInt>("40 + ")
                    .bind::<diesel::sql_types::BigInt, _>(2_i64),
            )
            .get_result(conn)
        })
        .await
        .unwrap();
    assert_eq!(n, 42);
    let logged = messages.0.lock().unwrap().clone();
    logged
        .into_iter()
        .filter(|m| m.contains("SELECT 40 + ?"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_values_are_echoed_only_when_asked() {
    let messages: &'static Messages = Box::leak(Box::default());
    tracing::subscriber::set_global_default(messages).expect("the only subscriber");

    let quiet = select_messages(messages, false).await;
    assert_eq!(
        quiet.len(),
        1,
        "the DEBUG echo shows the statement: {quiet:?}"
    );
    assert!(
        !quiet[0].contains("binds") && !quiet[0].contains("[2]"),
        "no bind value without the echo option: {quiet:?}"
    );

    let asked = select_messages(messages, true).await;
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert!(
        asked[0].contains("-- binds: [2]"),
        "the echo option shows the binds: {asked:?}"
    );
}
