//! Issue 16, on single servers (the formation scenarios are in the root
//! package's `tests/pg_ha.rs`):
//! - a deadline bounds a call on a server that never answers (a hung host
//!   or a dead network path, made here with a TCP proxy that stops
//!   forwarding): the call returns `Error::Timeout` within the deadline and
//!   [`ABANDON_AFTER`], the stuck connection never comes back to the pool,
//!   and nothing of its transaction is committed;
//! - a `COMMIT` whose connection breaks is `Error::CommitOutcomeUnknown`,
//!   and `transaction_with_retry` never runs it again;
//! - failed connects back off: a burst of checkouts against a server that
//!   refuses opens a handful of connections, not one per checkout;
//! - connect errors and failover errors are retryable, `CommitOutcomeUnknown`
//!   is not.

// Every test here is of a server backend.
#![cfg_attr(
    not(all(feature = "postgres", feature = "mysql")),
    allow(dead_code, unused_imports)
)]

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{TestBackend, TestDb, insert_part, next_unit, per_backend};
use diesel_runsync::{ABANDON_AFTER, Engine, EngineOptions, Error, RetryPolicy, Retryable};

/// A TCP proxy on a free loopback port to `target`: forwards both ways
/// until frozen, then forwards nothing more (what a hung host or a dead
/// network path looks like to a client: the socket stays open and silent);
/// taken down, it cuts every connection and refuses new ones (accepts and
/// closes them at once, counting them), as a server that went away.
struct Proxy {
    port: u16,
    frozen: Arc<AtomicBool>,
    down: Arc<AtomicBool>,
    refused: Arc<AtomicU32>,
    streams: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(target: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let proxy = Proxy {
            port,
            frozen: Arc::default(),
            down: Arc::default(),
            refused: Arc::default(),
            streams: Arc::default(),
        };
        let (frozen, down, refused, streams) = (
            proxy.frozen.clone(),
            proxy.down.clone(),
            proxy.refused.clone(),
            proxy.streams.clone(),
        );
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                if down.load(Ordering::Acquire) {
                    refused.fetch_add(1, Ordering::SeqCst);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                streams
                    .lock()
                    .unwrap()
                    .extend([client.try_clone().unwrap(), server.try_clone().unwrap()]);
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let frozen = frozen.clone();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16 * 1024];
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            // Frozen: swallow everything, keep the socket open.
                            while frozen.load(Ordering::Acquire) {
                                std::thread::sleep(Duration::from_millis(20));
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        proxy
    }

    fn freeze(&self, on: bool) {
        self.frozen.store(on, Ordering::Release);
    }

    /// Cuts every connection and refuses new ones from now on.
    fn take_down(&self) {
        self.down.store(true, Ordering::Release);
        for stream in self.streams.lock().unwrap().drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// `url` with its `host:port` replaced by the proxy's, and the proxy to
/// the server it named.
fn through_proxy(url: &str) -> (String, Proxy) {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (authority, path) = rest.split_once('/').unwrap();
    let (user, host) = authority.rsplit_once('@').unwrap();
    let proxy = Proxy::start(host.to_owned());
    (
        format!("{scheme}://{user}@127.0.0.1:{}/{path}", proxy.port),
        proxy,
    )
}

per_backend!(
    a_deadline_bounds_a_call_on_a_server_that_never_answers,
    servers
);
async fn a_deadline_bounds_a_call_on_a_server_that_never_answers<C: TestBackend>(db: TestDb<C>) {
    db.create_schema().await;
    let (url, proxy) = through_proxy(&db.url);
    let engine = Engine::<C>::connect(&url, EngineOptions::default().max_size(2))
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", C::NAME));
    let mut session = engine.session();
    let unit = next_unit();
    session
        .run_sync(move |c| insert_part(c, unit, 0))
        .await
        .unwrap();
    proxy.freeze(true);
    let deadline = Duration::from_millis(800);
    let started = Instant::now();
    let result = session
        .with_timeout(deadline)
        .run_sync(move |c| insert_part(c, unit, 1).map_err(Error::from))
        .await;
    let took = started.elapsed();
    println!(
        "FIGURE {} hung server: a call with a {deadline:?} deadline returned after {took:?}",
        C::NAME
    );
    assert!(
        matches!(result, Err(Error::Timeout(_))),
        "{}: {result:?}",
        C::NAME
    );
    assert!(
        took < deadline + ABANDON_AFTER + Duration::from_millis(250),
        "{}: a call on a hung server returned after {took:?}",
        C::NAME
    );
    // rollback() does not wait for the stuck connection either.
    let started = Instant::now();
    session.rollback().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{}: rollback() took {:?}",
        C::NAME,
        started.elapsed()
    );
    // The given-up connection left the pool: the engine has room for two
    // fresh ones even while it is stuck.
    assert_eq!(engine.status().connections, 0, "{}", C::NAME);
    proxy.freeze(false);
    // Once the server answers again, the engine works, and nothing of the
    // given-up transaction was committed.
    let mut fresh = engine.session();
    let unit2 = next_unit();
    fresh
        .run_sync_and_commit(move |c| insert_part(c, unit2, 0))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(db.rows().await, 1, "{}: only the later unit's row", C::NAME);
    assert_eq!(db.open_transactions().await, 0, "{}", C::NAME);
}

per_backend!(a_deadline_bounds_the_wait_for_a_connection, servers);
async fn a_deadline_bounds_the_wait_for_a_connection<C: TestBackend>(db: TestDb<C>) {
    let engine = db
        .engine_with(
            EngineOptions::default()
                .max_size(1)
                .connection_timeout(Duration::from_secs(20)),
        )
        .await;
    let mut holder = engine.session();
    holder.run_sync(|_| Ok::<_, Error>(())).await.unwrap();
    let started = Instant::now();
    let result = engine
        .session()
        .with_timeout(Duration::from_millis(200))
        .run_sync(|_| Ok::<_, Error>(()))
        .await;
    assert!(matches!(result, Err(Error::Timeout(_))), "{result:?}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    holder.rollback().await.unwrap();
}

/// Breaks the connection just before `COMMIT`: the closure has another
/// connection terminate this one (PostgreSQL `pg_terminate_backend`,
/// MySQL `KILL`), then returns `Ok`.
fn terminate_own_connection<C: TestBackend>(c: &mut C, admin_url: &str) {
    let me = c
        .scalar(if C::NAME == "postgres" {
            "SELECT CAST(pg_backend_pid() AS BIGINT) AS n"
        } else {
            "SELECT CAST(CONNECTION_ID() AS SIGNED) AS n"
        })
        .unwrap();
    let mut admin = C::establish(admin_url).unwrap();
    let kill = if C::NAME == "postgres" {
        format!("SELECT CAST(1 AS BIGINT) AS n FROM (SELECT pg_terminate_backend({me})) t")
    } else {
        format!("KILL {me}")
    };
    if C::NAME == "postgres" {
        admin.scalar(&kill).unwrap();
    } else {
        diesel::connection::SimpleConnection::batch_execute(&mut admin, &kill).unwrap();
    }
    std::thread::sleep(Duration::from_millis(100));
}

per_backend!(
    a_commit_whose_connection_broke_is_of_unknown_outcome,
    servers
);
async fn a_commit_whose_connection_broke_is_of_unknown_outcome<C: TestBackend>(db: TestDb<C>) {
    let engine = db.engine().await;
    let admin = C::server_url().unwrap();
    let tries = Arc::new(AtomicU32::new(0));
    let counted = tries.clone();
    let result = engine
        .transaction_with_retry(&RetryPolicy::default(), move |c: &mut C| {
            counted.fetch_add(1, Ordering::SeqCst);
            insert_part(c, next_unit(), 0).map_err(Error::from)?;
            terminate_own_connection(c, &admin);
            Ok::<_, Error>(())
        })
        .await;
    let error = result.expect_err("the connection was gone at COMMIT");
    assert!(
        matches!(error, Error::CommitOutcomeUnknown(_)),
        "{}: {error}",
        C::NAME
    );
    assert!(!error.is_retryable(), "{}", C::NAME);
    assert_eq!(
        tries.load(Ordering::SeqCst),
        1,
        "{}: never run again",
        C::NAME
    );
    assert!(
        error
            .to_string()
            .contains("may or may not have been committed")
    );
    // The pool replaced the broken connection.
    engine
        .transaction(|c: &mut C| c.scalar(&format!("SELECT CAST(1 AS {}) AS n", C::BIGINT)))
        .await
        .unwrap();
}

per_backend!(
    a_statement_failing_on_a_broken_connection_is_retried,
    servers
);
async fn a_statement_failing_on_a_broken_connection_is_retried<C: TestBackend>(db: TestDb<C>) {
    let engine = db.engine().await;
    let admin = C::server_url().unwrap();
    let tries = Arc::new(AtomicU32::new(0));
    let counted = tries.clone();
    let unit = next_unit();
    let done = engine
        .transaction_with_retry(&RetryPolicy::default(), move |c: &mut C| {
            if counted.fetch_add(1, Ordering::SeqCst) == 0 {
                // First attempt: the connection dies before anything is sent.
                terminate_own_connection(c, &admin);
            }
            insert_part(c, unit, 0).map_err(Error::from)
        })
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", C::NAME));
    assert_eq!(done.attempts, 2, "{}", C::NAME);
    assert_eq!(db.rows().await, 1, "{}: applied once", C::NAME);
}

per_backend!(failed_connects_back_off, servers);
async fn failed_connects_back_off<C: TestBackend>(db: TestDb<C>) {
    let (url, proxy) = through_proxy(&db.url);
    let engine = Engine::<C>::connect(&url, EngineOptions::default().max_size(4))
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", C::NAME));
    proxy.take_down();
    // Eight tasks call without pause for two seconds, each failing at once.
    let window = Duration::from_secs(2);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let engine = engine.clone();
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let (mut calls, mut retryable) = (0u32, 0u32);
            while started.elapsed() < window {
                calls += 1;
                match engine
                    .transaction(|c: &mut C| {
                        c.scalar(&format!("SELECT CAST(1 AS {}) AS n", C::BIGINT))
                    })
                    .await
                {
                    Ok(_) => panic!("nothing serves there"),
                    Err(e) => retryable += u32::from(e.is_retryable()),
                }
                tokio::task::yield_now().await;
            }
            (calls, retryable)
        }));
    }
    let (mut calls, mut retryable) = (0, 0);
    for task in tasks {
        let (c, r) = task.await.unwrap();
        calls += c;
        retryable += r;
    }
    let connects = proxy.refused.load(Ordering::SeqCst);
    println!(
        "FIGURE {} connect backoff: {calls} calls in {window:?} against a server that went away \
         opened {connects} connections ({retryable} calls failed retryable)",
        C::NAME
    );
    // 50 ms doubling to MAX_CONNECT_BACKOFF, jittered: about ten in two
    // seconds; without the backoff, one per call (thousands).
    assert!(
        connects <= 20,
        "{}: {connects} connects in {window:?}",
        C::NAME
    );
    assert!(
        calls > 100,
        "{}: calls must fail at once, not wait",
        C::NAME
    );
    assert_eq!(
        retryable,
        calls,
        "{}: a failed connect is retryable",
        C::NAME
    );
}
