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

use std::time::Duration;

use common::TestBackend;
use diesel_runsync::{Engine, EngineOptions, Error, PoolableConnection};

/// The secret of every test: a password of two halves, so that a message
/// quoting half of it (after a driver split the URL at a `/` or `?`) is
/// caught as well.
const HEAD: &str = "Pw9xHead";
const TAIL: &str = "Kq7zTail";

fn options() -> EngineOptions {
    EngineOptions::default().connection_timeout(Duration::from_secs(5))
}

/// Panics when `shown` contains the secret or either half of it.
fn assert_no_secret(shown: &str, what: &str) {
    for piece in [HEAD, TAIL] {
        assert!(!shown.contains(piece), "{what} shows {piece:?}: {shown}");
    }
}

/// Connects `C` to `url`, which must fail; returns the error after checking
/// that neither its `Display` nor its `Debug` shows the secret.
async fn connect_fails<C: PoolableConnection>(url: &str) -> Error {
    match Engine::<C>::connect(url, options()).await {
        Ok(engine) => panic!("{url:?} connected: {engine:?}"),
        Err(error) => {
            assert_no_secret(&error.to_string(), "the error's Display");
            assert_no_secret(&format!("{error:?}"), "the error's Debug");
            error
        }
    }
}

/// Connects `C` to `url`, which must succeed, and checks the engine's
/// `Debug`, its URL's `Display` and `Debug`, and a session's `Debug`.
async fn connect_succeeds<C: PoolableConnection>(url: &str) {
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
    vec![
        format!("host=localhost user=u password={HEAD}{TAIL} dbname=db application_name={test}"),
        format!("dbname = {test} password = {HEAD}{TAIL}"),
        format!("host=127.0.0.1 port=1 password='{HEAD} {TAIL}' user={test}"),
        format!("password={HEAD}/{TAIL}{test}"),
    ]
}

/// `url` is refused as a key=value string: `InvalidUrl`, pointing to the
/// URL form, no secret printed, and no file of that name created in the
/// current directory (where SQLite used to create it).
async fn refuses_key_value<C: PoolableConnection>(url: &str) {
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
}

#[cfg(feature = "postgres")]
mod postgres {
    use diesel::PgConnection;

    use super::*;

    #[tokio::test]
    async fn a_query_password_is_not_shown_when_the_connect_fails() {
        let url = with_query_password("postgres://u@127.0.0.1:1/db", &format!("{HEAD}{TAIL}"));
        let error = connect_fails::<PgConnection>(&url).await;
        assert!(connect_message(&error).contains("refused"), "{error}");
        assert!(error.to_string().contains("password=***"), "{error}");
    }

    #[tokio::test]
    async fn a_password_with_a_slash_is_not_shown_when_the_driver_misreads_it() {
        // libpq stops looking for the `@` at the `/`: the host is `u`, the
        // port the password's first half, which its message quotes.
        let url = format!("postgres://u:{HEAD}/{TAIL}@127.0.0.1:1/db");
        let error = connect_fails::<PgConnection>(&url).await;
        assert!(connect_message(&error).contains("port"), "{error}");
    }

    #[tokio::test]
    async fn a_password_with_a_question_mark_is_not_shown_when_the_connect_fails() {
        let url = format!("postgres://u:{HEAD}?{TAIL}@127.0.0.1:1/db");
        let error = connect_fails::<PgConnection>(&url).await;
        assert!(connect_message(&error).contains("refused"), "{error}");
    }

    #[tokio::test]
    async fn a_driver_message_quoting_the_whole_url_is_scrubbed() {
        // libpq quotes the URI it cannot parse (here an IPv6 host followed
        // by a stray character), in every password form.
        for url in [
            format!("postgres://u:{HEAD}{TAIL}@[::1]x:1/db"),
            format!("postgres://u:{HEAD}?{TAIL}@[::1]x:1/db"),
            with_query_password("postgres://u@[::1]x:1/db", &format!("{HEAD}{TAIL}")),
        ] {
            let error = connect_fails::<PgConnection>(&url).await;
            assert!(connect_message(&error).contains("URI"), "{error}");
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
            with_query_password(&server, &format!("{HEAD}{TAIL}")),
            with_userinfo(&server, &user, &format!("{HEAD}?{TAIL}")),
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
        let url = with_query_password("mysql://root@127.0.0.1:1/test", &format!("{HEAD}{TAIL}"));
        let error = connect_fails::<MysqlConnection>(&url).await;
        assert!(connect_message(&error).contains("connect"), "{error}");
        assert!(error.to_string().contains("password=***"), "{error}");
    }

    #[tokio::test]
    async fn a_password_with_a_slash_or_question_mark_is_not_shown() {
        // Diesel's URL parser ends the host at the `/` or `?`: a malformed URL.
        for sep in ['/', '?'] {
            let url = format!("mysql://root:{HEAD}{sep}{TAIL}@127.0.0.1:1/test");
            let error = connect_fails::<MysqlConnection>(&url).await;
            connect_message(&error);
        }
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
        // Diesel's MySQL driver ignores a `password` query parameter, so the
        // connect succeeds with the server URL's own credentials.
        let server = MysqlConnection::server_url().expect("a server URL");
        connect_succeeds::<MysqlConnection>(&with_query_password(
            &server,
            &format!("{HEAD}{TAIL}"),
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
