//! Issue 9, defect 3: a password must never be printed, whatever form the
//! URL gives it in. Each test connects an engine through the public API and
//! looks at everything it can print: the error's `Display` and `Debug`, or
//! the engine's `Debug` and its URL when the connect succeeds.
//!
//! The forms: libpq's `?password=` query parameter; a password with an
//! unencoded `/` or `?` (which the drivers cannot parse, so their messages
//! quote pieces of it); a driver message that quotes the whole URL; and a
//! libpq `key=value` string, refused before anything is opened (it used to
//! be taken as a SQLite file name, and the file was created).
//!
//! Issue 20: nor in a log line. Every test here runs under a capturing
//! `tracing` subscriber (every target, every level), and every line the
//! connect path logged is checked as well: the engine used to log each
//! failed host's raw driver message (which libpq makes quote the URL, or
//! the pieces of a password it misread) at `DEBUG`. More forms: a scheme in
//! capitals (libpq then takes the whole URL for a `key=value` string and
//! quotes it), several hosts with an `@` in the password, percent-encoded
//! passwords, and passwords whose pieces are shorter than four characters.
//!
//! Refused connections go to 127.0.0.1 port 1; the tests that connect use
//! the servers `PG_DATABASE_URL` / `MYSQL_DATABASE_URL` name (PostgreSQL
//! there trusts local connections, so any password is accepted).

// Some helpers serve one server backend only.
#![cfg_attr(
    not(all(feature = "postgres", feature = "mysql")),
    allow(dead_code, unused_imports)
)]

// Only for the server URLs; these tests need no database of their own.
#[allow(unused_macros, unused_imports)]
mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::TestBackend;
use diesel_runsync::{Engine, EngineOptions, Error, PoolableConnection};

/// The secret of one test: a password of two halves, so that a message
/// quoting half of it (after a driver split the URL at a `/` or `?`) is
/// caught as well, and three short pieces, under the four characters that
/// `scrub_message` looks for anywhere (a driver quoting one is caught only
/// where it stands quoted). Each test has its own, so that a log line
/// (shared by the tests running at once) showing it is that test's leak.
#[derive(Clone)]
struct Secret {
    head: String,
    tail: String,
    short: [String; 3],
}

thread_local! {
    /// The secret of the test running on this thread (`#[tokio::test]`
    /// runs the test's body on its own thread).
    static SECRET: std::cell::RefCell<Option<Secret>> = const { std::cell::RefCell::new(None) };
}

/// A secret no other test of this run uses, made the current test's.
fn secret() -> Secret {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    const LETTERS: &[u8] = b"abcdefghjkmnpqrstuvwxyz";
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let short = |k: usize| {
        let i = 3 * n + k;
        let (a, b) = (
            LETTERS[i / LETTERS.len() % LETTERS.len()],
            LETTERS[i % LETTERS.len()],
        );
        format!("Z{}{}", a as char, b as char)
    };
    let secret = Secret {
        head: format!("Pw9xHead{n}x"),
        tail: format!("Kq7zTail{n}x"),
        short: [short(0), short(1), short(2)],
    };
    SECRET.with(|s| *s.borrow_mut() = Some(secret.clone()));
    secret
}

/// The current test's secret pieces.
fn pieces() -> Vec<String> {
    SECRET.with(|s| {
        let secret = s.borrow();
        let secret = secret.as_ref().expect("the test called secret() first");
        [&secret.head, &secret.tail]
            .into_iter()
            .chain(&secret.short)
            .cloned()
            .collect()
    })
}

fn options() -> EngineOptions {
    EngineOptions::default().connection_timeout(Duration::from_secs(5))
}

/// Panics when `shown` contains any piece of the current test's secret.
fn assert_no_secret(shown: &str, what: &str) {
    for piece in pieces() {
        assert!(
            !shown.contains(piece.as_str()),
            "{what} shows {piece:?}: {shown}"
        );
    }
}

/// A `tracing` subscriber, installed once for the whole test binary (the
/// engine logs from tokio's blocking threads, which a thread-local default
/// would miss), that keeps every event of every target and level as a line
/// `LEVEL target: fields`. Tests run in parallel and share it: each looks
/// for the secret in all lines (any line showing it is a leak, whichever
/// test's it is), and for its own lines by a name only its URLs hold.
mod capture {
    use std::fmt::Write as _;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Mutex, Once};

    use tracing::field::{Field, Visit};
    use tracing::level_filters::LevelFilter;
    use tracing::{Event, Metadata, Subscriber, span};

    static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

    struct Capture {
        next_span: AtomicU64,
    }

    /// Formats fields as `name=value`, the message bare.
    struct Fields<'a>(&'a mut String);

    impl Visit for Fields<'_> {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            if field.name() == "message" {
                let _ = write!(self.0, " {value:?}");
            } else {
                let _ = write!(self.0, " {}={value:?}", field.name());
            }
        }

        fn record_str(&mut self, field: &Field, value: &str) {
            if field.name() == "message" {
                let _ = write!(self.0, " {value}");
            } else {
                let _ = write!(self.0, " {}={value}", field.name());
            }
        }
    }

    fn push(line: String) {
        LINES.lock().unwrap_or_else(|e| e.into_inner()).push(line);
    }

    impl Subscriber for Capture {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }

        fn max_level_hint(&self) -> Option<LevelFilter> {
            Some(LevelFilter::TRACE)
        }

        fn new_span(&self, attributes: &span::Attributes<'_>) -> span::Id {
            let mut line = format!("SPAN {}:", attributes.metadata().target());
            attributes.record(&mut Fields(&mut line));
            push(line);
            span::Id::from_u64(self.next_span.fetch_add(1, Ordering::Relaxed))
        }

        fn record(&self, _: &span::Id, values: &span::Record<'_>) {
            let mut line = "SPAN RECORD:".to_owned();
            values.record(&mut Fields(&mut line));
            push(line);
        }

        fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}

        fn event(&self, event: &Event<'_>) {
            let meta = event.metadata();
            let mut line = format!("{} {}:", meta.level(), meta.target());
            event.record(&mut Fields(&mut line));
            push(line);
        }

        fn enter(&self, _: &span::Id) {}

        fn exit(&self, _: &span::Id) {}
    }

    /// Installs the subscriber (once per test binary).
    pub fn install() {
        static ONCE: Once = Once::new();
        ONCE.call_once(|| {
            tracing::subscriber::set_global_default(Capture {
                next_span: AtomicU64::new(1),
            })
            .expect("no other global subscriber in this test binary");
        });
    }

    /// Every line captured so far, from every test.
    pub fn lines() -> Vec<String> {
        LINES.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Panics when any captured log line shows the secret; and, when `mine`
/// is given, when no line holding it was captured (the connect path of
/// that URL logged nothing: the capture did not work).
fn assert_logs_clean(mine: Option<&str>) {
    let lines = capture::lines();
    for line in &lines {
        assert_no_secret(line, "a log line");
    }
    if let Some(mine) = mine {
        assert!(
            lines.iter().any(|line| line.contains(mine)),
            "no log line names {mine:?}: {lines:#?}"
        );
    }
}

/// Connects `C` to `url`, which must fail; returns the error after checking
/// that neither its `Display` nor its `Debug` shows the secret.
async fn connect_fails<C: PoolableConnection>(url: &str) -> Error {
    capture::install();
    let error = match Engine::<C>::connect(url, options()).await {
        Ok(engine) => panic!("{url:?} connected: {engine:?}"),
        Err(error) => {
            assert_no_secret(&error.to_string(), "the error's Display");
            assert_no_secret(&format!("{error:?}"), "the error's Debug");
            error
        }
    };
    assert_logs_clean(None);
    error
}

/// [`connect_fails`], and a log line naming `mine` (a name only `url`
/// holds, such as its database's) was captured.
async fn connect_fails_logged<C: PoolableConnection>(url: &str, mine: &str) -> Error {
    assert!(url.contains(mine), "{url:?} names {mine:?}");
    let error = connect_fails::<C>(url).await;
    assert_logs_clean(Some(mine));
    error
}

/// Connects `C` to `url`, which must succeed, and checks the engine's
/// `Debug`, its URL's `Display` and `Debug`, and a session's `Debug`.
async fn connect_succeeds<C: PoolableConnection>(url: &str) {
    capture::install();
    let engine = Engine::<C>::connect(url, options())
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    for shown in [
        format!("{engine:?}"),
        engine.url().to_string(),
        format!("{:?}", engine.url()),
    ] {
        assert_no_secret(&shown, "the engine");
        assert!(
            shown.contains("***"),
            "the password is shown as ***: {shown}"
        );
    }
    assert_no_secret(&format!("{:?}", engine.session()), "a session");
    assert_logs_clean(None);
}

/// Asserts `error` is a failed connect, and returns its driver message.
fn connect_message(error: &Error) -> &str {
    match error {
        Error::Connect { message, .. } => message,
        other => panic!("expected Error::Connect, got {other:?}"),
    }
}

/// `url` with `?password=...` (or `&password=...`) appended.
fn with_query_password(url: &str, password: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}password={password}")
}

/// `url` with `user:password@` as its user information.
fn with_userinfo(url: &str, user: &str, password: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a server URL");
    let host_and_rest = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    format!("{scheme}://{user}:{password}@{host_and_rest}")
}

/// The libpq key=value strings tried: the issue's own, spaces around `=`,
/// a quoted password, and a lone `password=`. Each names `test`, so that
/// tests running at once never look at each other's file.
fn key_value_strings(test: &str) -> Vec<String> {
    let Secret { head, tail, .. } = secret();
    vec![
        format!("host=localhost user=u password={head}{tail} dbname=db application_name={test}"),
        format!("dbname = {test} password = {head}{tail}"),
        format!("host=127.0.0.1 port=1 password='{head} {tail}' user={test}"),
        format!("password={head}/{tail}{test}"),
    ]
}

/// `url` is refused as a key=value string: `InvalidUrl`, pointing to the
/// URL form, no secret printed, and no file of that name created in the
/// current directory (where SQLite used to create it).
async fn refuses_key_value<C: PoolableConnection>(url: &str) {
    capture::install();
    let file = std::path::Path::new(url);
    assert!(!file.exists(), "left over from an earlier run: {url:?}");
    let connected = Engine::<C>::connect(url, options()).await;
    let created = file.exists();
    if created {
        let _ = std::fs::remove_file(file);
    }
    assert!(!created, "a file named {url:?} was created");
    let error = match connected {
        Ok(engine) => panic!("{url:?} connected: {engine:?}"),
        Err(error) => error,
    };
    assert_no_secret(&error.to_string(), "the error's Display");
    assert_no_secret(&format!("{error:?}"), "the error's Debug");
    match &error {
        Error::InvalidUrl { url: shown, reason } => {
            assert!(reason.contains("postgres://"), "{reason}");
            assert!(
                shown.contains("***"),
                "the password is shown as ***: {shown}"
            );
        }
        other => panic!("{url:?}: expected InvalidUrl, got {other:?}"),
    }
    assert_logs_clean(None);
}

#[cfg(feature = "postgres")]
mod postgres {
    use diesel::PgConnection;

    use super::*;

    #[tokio::test]
    async fn a_query_password_is_not_shown_when_the_connect_fails() {
        let Secret { head, tail, .. } = secret();
        let url = with_query_password("postgres://u@127.0.0.1:1/db", &format!("{head}{tail}"));
        let error = connect_fails::<PgConnection>(&url).await;
        assert!(connect_message(&error).contains("refused"), "{error}");
        assert!(error.to_string().contains("password=***"), "{error}");
    }

    #[tokio::test]
    async fn a_password_with_a_slash_is_not_shown_when_the_driver_misreads_it() {
        let Secret { head, tail, .. } = secret();
        // libpq stops looking for the `@` at the `/`: the host is `u`, the
        // port the password's first half, which its message quotes.
        let url = format!("postgres://u:{head}/{tail}@127.0.0.1:1/db");
        let error = connect_fails::<PgConnection>(&url).await;
        assert!(connect_message(&error).contains("port"), "{error}");
    }

    #[tokio::test]
    async fn a_password_with_a_question_mark_is_not_shown_when_the_connect_fails() {
        let Secret { head, tail, .. } = secret();
        let url = format!("postgres://u:{head}?{tail}@127.0.0.1:1/db");
        let error = connect_fails::<PgConnection>(&url).await;
        assert!(connect_message(&error).contains("refused"), "{error}");
    }

    #[tokio::test]
    async fn a_driver_message_quoting_the_whole_url_is_scrubbed() {
        let Secret { head, tail, .. } = secret();
        // libpq quotes the URI it cannot parse (here an IPv6 host followed
        // by a stray character), in every password form.
        for url in [
            format!("postgres://u:{head}{tail}@[::1]x:1/db"),
            format!("postgres://u:{head}?{tail}@[::1]x:1/db"),
            with_query_password("postgres://u@[::1]x:1/db", &format!("{head}{tail}")),
        ] {
            let error = connect_fails::<PgConnection>(&url).await;
            assert!(connect_message(&error).contains("URI"), "{error}");
        }
    }

    #[tokio::test]
    async fn a_scheme_in_capitals_is_not_shown_nor_logged() {
        let Secret {
            head,
            tail,
            short: [s3, _, _],
        } = secret();
        // libpq takes `POSTGRES://...` for a key=value string and quotes it.
        for (url, mine) in [
            (
                format!("POSTGRES://u:{head}{tail}@127.0.0.1:1/rs_log_pg_upper"),
                "rs_log_pg_upper",
            ),
            (
                format!("PostgreSQL://u:{head}%2F{tail}@127.0.0.1:1/rs_log_pg_mixed"),
                "rs_log_pg_mixed",
            ),
            (
                format!("POSTGRES://u:{s3}/{tail}@127.0.0.1:1/rs_log_pg_upper_slash"),
                "rs_log_pg_upper_slash",
            ),
            (
                format!("Postgres://u@127.0.0.1:1/rs_log_pg_upper_query?password={head}{tail}"),
                "rs_log_pg_upper_query",
            ),
        ] {
            // missing "=" after "...", or (with a query's `=`) invalid
            // connection option "POSTGRES://...?password".
            let error = connect_fails_logged::<PgConnection>(&url, mine).await;
            assert!(connect_message(&error).contains("connection"), "{error}");
        }
    }

    #[tokio::test]
    async fn a_short_piece_of_a_password_is_not_shown_nor_logged() {
        let Secret {
            tail,
            short: [s3, _, _],
            ..
        } = secret();
        // invalid integer value "Zab" for connection option "port": a short piece quoted.
        let url = format!("postgres://u:{s3}/{tail}@127.0.0.1:1/rs_log_pg_short");
        let error = connect_fails_logged::<PgConnection>(&url, "rs_log_pg_short").await;
        assert!(connect_message(&error).contains("port"), "{error}");
    }

    #[tokio::test]
    async fn several_hosts_and_an_at_sign_in_the_password_are_not_shown_nor_logged() {
        let Secret {
            head,
            tail,
            short: [_, s4, s5],
        } = secret();
        // libpq ends the user information at the first `@`, and takes the
        // rest of the password for part of the first host name, which it
        // quotes: could not translate host name "{s5}@127.0.0.1" to address.
        for (url, mine) in [
            (
                format!("postgres://u:{head}@{tail}@127.0.0.1:1,127.0.0.1:2/rs_log_pg_multi"),
                "rs_log_pg_multi",
            ),
            (
                format!("postgres://u:{head}@{s5}@127.0.0.1:1,127.0.0.1:2/rs_log_pg_multi_short"),
                "rs_log_pg_multi_short",
            ),
            (
                format!("postgres://u:{s4}@{tail}@127.0.0.1:1,127.0.0.1:2/rs_log_pg_multi_head"),
                "rs_log_pg_multi_head",
            ),
        ] {
            connect_fails_logged::<PgConnection>(&url, mine).await;
        }
    }

    #[tokio::test]
    async fn a_percent_encoded_password_is_not_shown_nor_logged() {
        let Secret {
            head,
            tail,
            short: [_, s4, _],
        } = secret();
        for (url, mine) in [
            (
                format!("postgres://u:{head}%40{tail}%3A{s4}%25@127.0.0.1:1/rs_log_pg_pct"),
                "rs_log_pg_pct",
            ),
            (
                format!("postgres://u:{head}%2F{tail}@127.0.0.1:1,127.0.0.1:2/rs_log_pg_pct_multi"),
                "rs_log_pg_pct_multi",
            ),
            (
                format!("postgres://u@127.0.0.1:1/rs_log_pg_pct_query?password={head}%26{tail}"),
                "rs_log_pg_pct_query",
            ),
        ] {
            let error = connect_fails_logged::<PgConnection>(&url, mine).await;
            assert!(connect_message(&error).contains("refused"), "{error}");
        }
    }

    #[tokio::test]
    async fn a_key_value_string_is_refused_and_creates_no_file() {
        for url in key_value_strings("rs_redaction_pg") {
            refuses_key_value::<PgConnection>(&url).await;
        }
    }

    #[tokio::test]
    #[cfg_attr(runsync_skip_postgres, ignore = "PG_DATABASE_URL is not set")]
    async fn a_connected_engine_does_not_show_the_password() {
        let Secret { head, tail, .. } = secret();
        let server = PgConnection::server_url().expect("a server URL");
        // The server trusts local connections: any password is accepted.
        let user = server
            .split_once("://")
            .and_then(|(_, rest)| rest.split_once('@'))
            .map_or("postgres", |(userinfo, _)| {
                userinfo.split(':').next().unwrap_or("postgres")
            })
            .to_owned();
        for url in [
            with_query_password(&server, &format!("{head}{tail}")),
            with_userinfo(&server, &user, &format!("{head}?{tail}")),
        ] {
            connect_succeeds::<PgConnection>(&url).await;
        }
    }
}

#[cfg(feature = "mysql")]
mod mysql {
    use diesel::MysqlConnection;

    use super::*;

    #[tokio::test]
    async fn a_query_password_is_not_shown_when_the_connect_fails() {
        let Secret { head, tail, .. } = secret();
        let url = with_query_password("mysql://root@127.0.0.1:1/test", &format!("{head}{tail}"));
        let error = connect_fails::<MysqlConnection>(&url).await;
        assert!(connect_message(&error).contains("connect"), "{error}");
        assert!(error.to_string().contains("password=***"), "{error}");
    }

    #[tokio::test]
    async fn a_password_with_a_slash_or_question_mark_is_not_shown() {
        let Secret { head, tail, .. } = secret();
        // Diesel's URL parser ends the host at the `/` or `?`: a malformed URL.
        for sep in ['/', '?'] {
            let url = format!("mysql://root:{head}{sep}{tail}@127.0.0.1:1/test");
            let error = connect_fails::<MysqlConnection>(&url).await;
            connect_message(&error);
        }
    }

    #[tokio::test]
    async fn a_scheme_in_capitals_is_not_shown_nor_logged() {
        let Secret { head, tail, .. } = secret();
        for (url, mine) in [
            (
                format!("MYSQL://root:{head}{tail}@127.0.0.1:1/rs_log_my_upper"),
                "rs_log_my_upper",
            ),
            (
                format!("MySQL://root:{head}%2F{tail}@127.0.0.1:1,127.0.0.1:2/rs_log_my_mixed"),
                "rs_log_my_mixed",
            ),
        ] {
            connect_fails_logged::<MysqlConnection>(&url, mine).await;
        }
    }

    #[tokio::test]
    async fn several_hosts_and_an_at_sign_in_the_password_are_not_shown_nor_logged() {
        let Secret {
            head,
            tail,
            short: [s3, _, s5],
        } = secret();
        for (url, mine) in [
            (
                format!("mysql://root:{head}@{tail}@127.0.0.1:1,127.0.0.1:2/rs_log_my_multi"),
                "rs_log_my_multi",
            ),
            (
                format!("mysql://root:{head}@{s5}@127.0.0.1:1,127.0.0.1:2/rs_log_my_multi_short"),
                "rs_log_my_multi_short",
            ),
            (
                format!("mysql://root:{s3}/{tail}@127.0.0.1:1,127.0.0.1:2/rs_log_my_slash"),
                "rs_log_my_slash",
            ),
        ] {
            connect_fails_logged::<MysqlConnection>(&url, mine).await;
        }
    }

    #[tokio::test]
    async fn a_percent_encoded_password_is_not_shown_nor_logged() {
        let Secret {
            head,
            tail,
            short: [_, s4, _],
        } = secret();
        let url =
            format!("mysql://root:{head}%40{tail}%3A{s4}%25@127.0.0.1:1,127.0.0.1:2/rs_log_my_pct");
        connect_fails_logged::<MysqlConnection>(&url, "rs_log_my_pct").await;
    }

    #[tokio::test]
    async fn a_key_value_string_is_refused_and_creates_no_file() {
        for url in key_value_strings("rs_redaction_mysql") {
            refuses_key_value::<MysqlConnection>(&url).await;
        }
    }

    #[tokio::test]
    #[cfg_attr(runsync_skip_mysql, ignore = "MYSQL_DATABASE_URL is not set")]
    async fn a_connected_engine_does_not_show_the_password() {
        let Secret { head, tail, .. } = secret();
        // Diesel's MySQL driver ignores a `password` query parameter, so the
        // connect succeeds with the server URL's own credentials.
        let server = MysqlConnection::server_url().expect("a server URL");
        connect_succeeds::<MysqlConnection>(&with_query_password(
            &server,
            &format!("{head}{tail}"),
        ))
        .await;
    }
}

/// The key=value string used to be opened as a SQLite file of that name.
#[cfg(feature = "sqlite")]
#[tokio::test]
async fn a_key_value_string_is_not_taken_as_a_sqlite_file() {
    for url in key_value_strings("rs_redaction_sqlite") {
        refuses_key_value::<diesel::SqliteConnection>(&url).await;
    }
}
