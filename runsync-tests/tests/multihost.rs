//! Issue 20.3: a `mysql://` URL with several hosts on servers that are not
//! Galera nodes. Each new connection of such an engine is asked whether its
//! node is ready; that used to read `WSREP_READY` and refuse anything but
//! `ON`, yet MariaDB built with wsrep support (Debian's 10.11) reports
//! `WSREP_READY = OFF` when `wsrep_on` is off, outside any cluster: every
//! host was "not ready", and the engine could not connect at all.
//!
//! These tests run on the standalone server `MYSQL_DATABASE_URL` names,
//! naming it twice, or after a host that refuses (127.0.0.1 port 1).

#![cfg(feature = "mysql")]

// Only for the server URL; these tests need no database of their own.
#[allow(unused_macros, unused_imports)]
mod common;

use std::time::Duration;

use common::{TestBackend, TestError};
use diesel::MysqlConnection;
use diesel::connection::{Connection, SimpleConnection};
use diesel_runsync::{Engine, EngineOptions, Error};

fn options() -> EngineOptions {
    EngineOptions::default().connection_timeout(Duration::from_secs(5))
}

/// The server URL's parts: `scheme://`, the user information with its
/// `@` (or ""), the host (`h:port`), and the rest (`/db?...`).
fn server_parts() -> (String, String, String, String) {
    let server = MysqlConnection::server_url().expect("a server URL");
    let (scheme, rest) = server.split_once("://").expect("a URL");
    let (authority, path) = rest
        .find(['/', '?'])
        .map_or((rest, ""), |at| rest.split_at(at));
    let (userinfo, host) = match authority.rsplit_once('@') {
        Some((userinfo, host)) => (format!("{userinfo}@"), host),
        None => (String::new(), authority),
    };
    (
        format!("{scheme}://"),
        userinfo,
        host.to_owned(),
        path.to_owned(),
    )
}

/// The server URL over `hosts` (`None`: the server's own host), with the
/// user information `userinfo` (`None`: the server URL's).
fn over_hosts(hosts: &[Option<&str>], userinfo: Option<&str>) -> String {
    let (scheme, own_userinfo, own_host, path) = server_parts();
    let hosts: Vec<&str> = hosts.iter().map(|host| host.unwrap_or(&own_host)).collect();
    let userinfo = userinfo.map_or(own_userinfo, |u| format!("{u}@"));
    format!("{scheme}{userinfo}{}{path}", hosts.join(","))
}

/// Connects an engine to `url`, and runs a query on each of `sessions`
/// sessions held at once (so that more than one connection is opened).
async fn connects_and_queries(url: &str, sessions: usize) {
    let engine = Engine::<MysqlConnection>::connect(url, options())
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    let mut held = Vec::new();
    for _ in 0..sessions {
        let mut session = engine.session();
        let n = session
            .run_sync(|c| {
                c.scalar("SELECT CAST(1 AS SIGNED) AS n")
                    .map_err(TestError::from)
            })
            .await
            .unwrap_or_else(|e| panic!("{url}: a query: {e}"));
        assert_eq!(n, 1);
        held.push(session);
    }
}

#[tokio::test]
#[cfg_attr(runsync_skip_mysql, ignore = "MYSQL_DATABASE_URL is not set")]
async fn a_standalone_server_named_twice_connects() {
    connects_and_queries(&over_hosts(&[None, None], None), 3).await;
}

#[tokio::test]
#[cfg_attr(runsync_skip_mysql, ignore = "MYSQL_DATABASE_URL is not set")]
async fn a_host_that_is_down_is_skipped() {
    connects_and_queries(&over_hosts(&[Some("127.0.0.1:1"), None], None), 3).await;
    connects_and_queries(&over_hosts(&[None, Some("127.0.0.1:1")], None), 3).await;
}

#[tokio::test]
async fn when_every_host_is_down_the_error_is_the_drivers() {
    let url = over_hosts(&[Some("127.0.0.1:1"), Some("127.0.0.1:2")], None);
    let error = match Engine::<MysqlConnection>::connect(&url, options()).await {
        Ok(engine) => panic!("{url} connected: {engine:?}"),
        Err(error) => error,
    };
    let Error::Connect { message, .. } = &error else {
        panic!("expected Error::Connect, got {error:?}");
    };
    assert!(message.contains("connect"), "{error}");
    assert!(!message.contains("Galera"), "{error}");
    assert!(!message.contains("wsrep"), "{error}");
}

/// A user of the server, dropped when the test ends (panicked or not).
struct TempUser {
    name: String,
}

impl TempUser {
    /// Creates `name` with `password`, from any host, with every privilege
    /// on the server URL's database.
    fn create(name: &str, password: &str) -> TempUser {
        let user = TempUser {
            name: name.to_owned(),
        };
        let mut admin = admin();
        let database = server_parts()
            .3
            .trim_start_matches('/')
            .split('?')
            .next()
            .unwrap_or("test")
            .to_owned();
        for host in ["%", "localhost", "127.0.0.1"] {
            admin
                .batch_execute(&format!(
                    "CREATE USER IF NOT EXISTS '{name}'@'{host}' IDENTIFIED BY '{password}'; \
                     GRANT ALL ON `{database}`.* TO '{name}'@'{host}'"
                ))
                .unwrap_or_else(|e| panic!("create user {name}@{host}: {e}"));
        }
        user
    }
}

impl Drop for TempUser {
    fn drop(&mut self) {
        let mut admin = admin();
        for host in ["%", "localhost", "127.0.0.1"] {
            if let Err(e) =
                admin.batch_execute(&format!("DROP USER IF EXISTS '{}'@'{host}'", self.name))
            {
                eprintln!("could not drop user {}@{host}: {e}", self.name);
            }
        }
    }
}

fn admin() -> MysqlConnection {
    let server = MysqlConnection::server_url().expect("a server URL");
    MysqlConnection::establish(&server).unwrap_or_else(|e| panic!("an admin connection: {e}"))
}

#[tokio::test]
#[cfg_attr(runsync_skip_mysql, ignore = "MYSQL_DATABASE_URL is not set")]
async fn a_percent_encoded_password_connects_over_several_hosts() {
    let name = format!("rs_pct_{}", std::process::id());
    let _user = TempUser::create(&name, "a@b:c%d");
    let userinfo = format!("{name}:a%40b%3Ac%25d");
    connects_and_queries(&over_hosts(&[None, None], Some(&userinfo)), 2).await;
    connects_and_queries(
        &over_hosts(&[Some("127.0.0.1:1"), None], Some(&userinfo)),
        2,
    )
    .await;
}
