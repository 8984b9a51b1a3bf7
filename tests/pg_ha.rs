//! Issue 16, "PostgreSQL as it runs in production", on a real
//! pg_auto_failover formation (a monitor and two PostgreSQL 15 nodes, see
//! `runsync_testkit::pgha`) and PgBouncer in transaction mode
//! (`runsync_testkit::pgbouncer`), through `Engine<PgConnection>`.
//!
//! One formation for the whole file: [`pg_ha`] runs the scenarios in
//! sequence, each in a function of its own, on a multi-thread runtime.
//! Each write scenario runs 8-12 concurrent writers over a pool of 8, each
//! inserting uniquely numbered rows (`ha_writes.id`, no unique constraint:
//! a unit applied twice shows as two rows) in transactions, records every
//! write it got acknowledged, and checks afterwards that each one is in the
//! database exactly once (unacknowledged ones may or may not be there, but
//! never twice). Each write scenario starts from a settled formation (one
//! primary whose commits wait for a synchronous standby, asked of the
//! server: `Formation::wait_settled`), so a write lost is the library's or
//! the failover's, never an asynchronous commit left from the scenario
//! before. Each scenario prints `FIGURE pg_ha <scenario>: ...` lines
//! with what it measured.
//!
//! Every scenario says, in a comment, why it fails on the code before the
//! issue's fixes (`aa45677`), and which assertion that old behaviour breaks.
//! Where the old behaviour can be reproduced by hand (PgBouncer: Diesel's
//! statement cache, a session-level `SET`, a pid-based cancel), a control
//! does so and checks that another client sees it.
//!
//! At the end the formation is dropped and no process of its directory, nor
//! of this test's PgBouncers, may be left (`pgrep -f`; other runs' `rs-pgha-`
//! processes on a shared machine are only listed).
//!
//! Needs root, PostgreSQL 15, pg_auto_failover and PgBouncer (the
//! fixtures panic saying what is missing), and the system PostgreSQL on
//! 127.0.0.1:5432 (`PG_DATABASE_URL`) for the read-only scenario, which
//! creates and drops a database of its own there.
#![cfg(feature = "postgres")]

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer, Text};
use diesel_runsync::{Engine, EngineOptions, Error, ReadOn, Replicated, RetryPolicy, SQL_TARGET};
use runsync_testkit::pgbouncer::PgBouncer;
use runsync_testkit::pgha::Formation;
use tokio::runtime::Runtime;

/// The write units' table, created in every database a scenario writes to.
const WRITES_TABLE: &str = "CREATE TABLE ha_writes (seq bigserial PRIMARY KEY, \
     id bigint NOT NULL, scenario text NOT NULL, port int NOT NULL)";

/// Every write unit's number, unique over the whole file.
static NEXT_ID: AtomicI64 = AtomicI64::new(1);

/// How long a writer rests between two units (keeps the 2 shared cores
/// for the servers and the monitor's health checks).
const PAUSE: Duration = Duration::from_millis(10);

// ---------------------------------------------------------------------
// What the library logs: failed connects (WARN on `diesel_runsync::sql`),
// the attempts `transaction_with_retry` retries (the INFO event `retry` on
// `diesel_runsync`), and its INFO lines (a detected pooler).
// ---------------------------------------------------------------------

struct Logged {
    at: Instant,
    level: tracing::Level,
    target: String,
    message: String,
}

static EVENTS: Mutex<Vec<Logged>> = Mutex::new(Vec::new());

struct Capture;

fn wanted(meta: &tracing::Metadata<'_>) -> bool {
    meta.target().starts_with("diesel_runsync") && *meta.level() <= tracing::Level::INFO
}

struct MessageOf(String);

impl tracing::field::Visit for MessageOf {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
    fn enabled(
        &self,
        meta: &tracing::Metadata<'_>,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        wanted(meta)
    }

    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let mut message = MessageOf(String::new());
        event.record(&mut message);
        EVENTS.lock().unwrap().push(Logged {
            at: Instant::now(),
            level: *event.metadata().level(),
            target: event.metadata().target().to_owned(),
            message: message.0,
        });
    }
}

fn capture_logs() {
    use tracing_subscriber::layer::SubscriberExt;
    let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry().with(Capture));
}

/// Logged messages since `since` matching `keep`.
fn logged(since: Instant, keep: impl Fn(&Logged) -> bool) -> Vec<String> {
    EVENTS
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.at >= since && keep(e))
        .map(|e| e.message.clone())
        .collect()
}

/// Failed connects (the engine logs each real attempt that failed; a
/// checkout refused during the backoff is not one) between two instants.
fn failed_connects(from: Instant, to: Instant) -> usize {
    EVENTS
        .lock()
        .unwrap()
        .iter()
        .filter(|e| {
            e.at >= from
                && e.at <= to
                && e.level == tracing::Level::WARN
                && e.target == SQL_TARGET
                && e.message.starts_with("cannot connect")
        })
        .count()
}

/// Whether `e` is a `transaction_with_retry` retry: the INFO event `retry`
/// on the library's span target ("retry: attempt N failed (<error>),
/// retrying in D").
fn is_retry(e: &Logged) -> bool {
    e.target == diesel_runsync::SPAN_TARGET && e.message.starts_with("retry: ")
}

/// The error of a retry event's message.
fn retry_error(message: &str) -> &str {
    message
        .split_once(" failed (")
        .and_then(|(_, rest)| rest.rsplit_once("), retrying in "))
        .map_or(message, |(error, _)| error)
}

/// The distinct messages of `messages` (first 110 characters), most
/// frequent first, with their counts: for the report.
fn tally<'a>(messages: impl IntoIterator<Item = &'a str>) -> String {
    let mut counts: HashMap<String, usize> = HashMap::new();
    for m in messages {
        *counts.entry(m.chars().take(110).collect()).or_default() += 1;
    }
    let mut counts: Vec<_> = counts.into_iter().collect();
    counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    counts
        .iter()
        .take(6)
        .map(|(m, n)| format!("{n} x {m}"))
        .collect::<Vec<_>>()
        .join(" | ")
}

// ---------------------------------------------------------------------
// Writers and their ledger.
// ---------------------------------------------------------------------

#[derive(QueryableByName)]
struct Port {
    #[diesel(sql_type = Integer)]
    port: i32,
}

/// One write unit: the row `id`, on whichever server runs it (its port).
fn insert(conn: &mut PgConnection, id: i64, scenario: &str) -> Result<i32, Error> {
    diesel::sql_query(
        "INSERT INTO ha_writes (id, scenario, port) VALUES ($1, $2, inet_server_port()) \
         RETURNING port",
    )
    .bind::<BigInt, _>(id)
    .bind::<Text, _>(scenario)
    .get_result::<Port>(conn)
    .map(|p| p.port)
    .map_err(Error::from)
}

struct Ack {
    id: i64,
    port: i32,
    at: Instant,
}

struct Failed {
    id: i64,
    timeout: bool,
    message: String,
}

#[derive(Default)]
struct Ledger {
    acked: Vec<Ack>,
    /// `CommitOutcomeUnknown`: may be in the database, at most once.
    unknown: Vec<i64>,
    /// Given up (by the writer's call) with any other error.
    failed: Vec<Failed>,
    /// Attempts `transaction_with_retry` ran again, over acknowledged units.
    retried: u64,
    calls: u64,
    max_call: Duration,
}

#[derive(Clone, Copy)]
enum Mode {
    /// `Engine::transaction_with_retry(&RetryPolicy::default(), ..)`.
    Retry,
    /// One `session.with_timeout(d).run_sync_and_commit(..)` per unit.
    Deadline(Duration),
}

async fn writer(
    engine: Engine<PgConnection>,
    scenario: &'static str,
    mode: Mode,
    units: Option<usize>,
    stop: Arc<AtomicBool>,
    ledger: Arc<Mutex<Ledger>>,
) {
    let policy = RetryPolicy::default();
    let mut done = 0;
    while !stop.load(Ordering::Acquire) && units.is_none_or(|n| done < n) {
        done += 1;
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let result = match mode {
            Mode::Retry => engine
                .transaction_with_retry(&policy, move |c| insert(c, id, scenario))
                .await
                .map(|r| (r.value, r.attempts)),
            Mode::Deadline(limit) => {
                let mut session = engine.session();
                session
                    .with_timeout(limit)
                    .run_sync_and_commit(move |c| insert(c, id, scenario))
                    .await
                    .map(|port| (port, 1))
            }
        };
        let took = started.elapsed();
        let failed = {
            let mut l = ledger.lock().unwrap();
            l.calls += 1;
            l.max_call = l.max_call.max(took);
            match result {
                Ok((port, attempts)) => {
                    l.retried += u64::from(attempts - 1);
                    l.acked.push(Ack {
                        id,
                        port,
                        at: Instant::now(),
                    });
                    false
                }
                Err(Error::CommitOutcomeUnknown(_)) => {
                    l.unknown.push(id);
                    true
                }
                Err(e) => {
                    l.failed.push(Failed {
                        id,
                        timeout: matches!(e, Error::Timeout(_)),
                        message: e.to_string(),
                    });
                    true
                }
            }
        };
        if failed {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(PAUSE).await;
    }
}

/// Writers running on the runtime, sharing one ledger.
struct Load {
    scenario: &'static str,
    stop: Arc<AtomicBool>,
    ledger: Arc<Mutex<Ledger>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(
        rt: &Runtime,
        engine: &Engine<PgConnection>,
        writers: usize,
        scenario: &'static str,
        mode: Mode,
        units: Option<usize>,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let tasks = (0..writers)
            .map(|_| {
                rt.spawn(writer(
                    engine.clone(),
                    scenario,
                    mode,
                    units,
                    stop.clone(),
                    ledger.clone(),
                ))
            })
            .collect();
        Load {
            scenario,
            stop,
            ledger,
            tasks,
        }
    }

    /// Waits until `n` units were acknowledged after `after` (on `port`,
    /// if given); returns when the first of them was. Panics after `timeout`.
    fn wait_acks(&self, port: Option<i32>, n: usize, after: Instant, timeout: Duration) -> Instant {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let l = self.ledger.lock().unwrap();
                let mut matching = l
                    .acked
                    .iter()
                    .filter(|a| a.at >= after && port.is_none_or(|p| a.port == p));
                if let Some(first) = matching.next()
                    && matching.count() + 1 >= n
                {
                    return first.at;
                }
                assert!(
                    Instant::now() < deadline,
                    "{}: fewer than {n} writes acknowledged (on port {port:?}) within {timeout:?}; \
                     {} acknowledged in all, {} given up: {}",
                    self.scenario,
                    l.acked.len(),
                    l.failed.len(),
                    tally(l.failed.iter().map(|f| f.message.as_str()))
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the writers and waits for them (each finishes its unit).
    fn stop(self, rt: &Runtime) -> Ledger {
        self.stop.store(true, Ordering::Release);
        self.join(rt)
    }

    /// Waits for the writers to end by themselves (`units` each).
    fn join(self, rt: &Runtime) -> Ledger {
        let Load {
            scenario,
            tasks,
            ledger,
            ..
        } = self;
        rt.block_on(async move {
            for task in tasks {
                tokio::time::timeout(Duration::from_secs(60), task)
                    .await
                    .unwrap_or_else(|_| panic!("{scenario}: a writer still runs after 60 s"))
                    .expect("a writer panicked");
            }
        });
        Arc::into_inner(ledger)
            .expect("the writers are done")
            .into_inner()
            .unwrap()
    }
}

impl Ledger {
    /// The longest time without an acknowledged write.
    fn longest_gap(&self) -> Duration {
        let mut at: Vec<Instant> = self.acked.iter().map(|a| a.at).collect();
        at.sort();
        at.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default()
    }

    fn timeouts(&self) -> usize {
        self.failed.iter().filter(|f| f.timeout).count()
    }
}

// ---------------------------------------------------------------------
// Checking the database against the ledger.
// ---------------------------------------------------------------------

#[derive(QueryableByName)]
struct IdCount {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

fn establish(url: &str) -> PgConnection {
    PgConnection::establish(url).unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

fn exec(url: &str, sql: &str) {
    establish(url)
        .batch_execute(sql)
        .unwrap_or_else(|e| panic!("{sql} on {url}: {e}"));
}

/// How many rows each unit id of `scenario` has, summed over `urls`.
fn rows_by_id(urls: &[String], scenario: &str) -> HashMap<i64, i64> {
    let mut rows = HashMap::new();
    for url in urls {
        let counts: Vec<IdCount> = diesel::sql_query(
            "SELECT id, count(*) AS n FROM ha_writes WHERE scenario = $1 GROUP BY id",
        )
        .bind::<Text, _>(scenario)
        .load(&mut establish(url))
        .unwrap_or_else(|e| panic!("counting {scenario} rows on {url}: {e}"));
        for c in counts {
            *rows.entry(c.id).or_default() += c.n;
        }
    }
    rows
}

/// Every acknowledged unit is there exactly once, no unit is there twice,
/// no row comes from a unit never run, and (the library's promise for
/// `Error::Timeout`) no timed-out unit is there. Returns a summary.
fn assert_exactly_once(
    scenario: &str,
    ledger: &Ledger,
    rows: &HashMap<i64, i64>,
    formation: &Formation,
) -> String {
    let lost: Vec<i64> = ledger
        .acked
        .iter()
        .filter(|a| rows.get(&a.id).copied().unwrap_or(0) == 0)
        .map(|a| a.id)
        .collect();
    let duplicated: Vec<(i64, i64)> = rows
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, n)| (*id, *n))
        .collect();
    let mut attempted: std::collections::HashSet<i64> = ledger.acked.iter().map(|a| a.id).collect();
    attempted.extend(&ledger.unknown);
    attempted.extend(ledger.failed.iter().map(|f| f.id));
    let phantom: Vec<i64> = rows
        .keys()
        .filter(|id| !attempted.contains(id))
        .copied()
        .collect();
    let timed_out_present: Vec<i64> = ledger
        .failed
        .iter()
        .filter(|f| f.timeout && rows.contains_key(&f.id))
        .map(|f| f.id)
        .collect();
    let unknown_present = ledger
        .unknown
        .iter()
        .filter(|id| rows.contains_key(id))
        .count();
    let failed_present = ledger
        .failed
        .iter()
        .filter(|f| rows.contains_key(&f.id))
        .count();
    if !(lost.is_empty() && duplicated.is_empty() && phantom.is_empty()) {
        // Which server acknowledged the lost writes, and what the formation
        // went through: what a failure here needs to be understood.
        let mut lost_by_port: std::collections::BTreeMap<i32, usize> = Default::default();
        for ack in ledger.acked.iter().filter(|a| lost.contains(&a.id)) {
            *lost_by_port.entry(ack.port).or_default() += 1;
        }
        panic!(
            "{scenario}: {} acknowledged writes lost (ids {:?}; acknowledged by the server on \
             port: {lost_by_port:?}), {} duplicated (id, rows: {:?}), {} rows of units never \
             run ({:?}); the monitor's last events:\n{}",
            lost.len(),
            &lost[..lost.len().min(20)],
            duplicated.len(),
            &duplicated[..duplicated.len().min(20)],
            phantom.len(),
            &phantom[..phantom.len().min(20)],
            formation.events(40)
        );
    }
    assert!(
        timed_out_present.is_empty(),
        "{scenario}: units that returned Error::Timeout were committed: {timed_out_present:?}"
    );
    format!(
        "{} acknowledged, 0 lost, 0 duplicated; {} of unknown outcome ({} present); {} given up \
         ({} present)",
        ledger.acked.len(),
        ledger.unknown.len(),
        unknown_present,
        ledger.failed.len(),
        failed_present
    )
}

fn connect(rt: &Runtime, url: &str, options: EngineOptions) -> Engine<PgConnection> {
    rt.block_on(Engine::<PgConnection>::connect(url, options))
        .unwrap_or_else(|e| panic!("connecting an engine to {url}: {e}"))
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn node_db_url(f: &Formation, i: usize, db: &str) -> String {
    format!("postgres://postgres@127.0.0.1:{}/{db}", f.node_port(i))
}

// ---------------------------------------------------------------------
// The test.
// ---------------------------------------------------------------------

/// Ignored like the other PostgreSQL tests (`PG_DATABASE_URL` unset at
/// build time, and neither `CI=true` nor `RUNSYNC_REQUIRE_ALL_BACKENDS=1`);
/// when it runs it needs root, pg_auto_failover and PgBouncer, and fails
/// saying so if one is missing.
#[test]
#[cfg_attr(
    runsync_skip_postgres,
    ignore = "PG_DATABASE_URL is not set (PostgreSQL tests are off)"
)]
fn pg_ha() {
    let test = Instant::now();
    capture_logs();
    // Declared before the formation, so dropped after it: on a panic the
    // formation's processes die first, which ends any blocking task still
    // stuck on a frozen server, so the runtime's drop cannot hang.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let mut f = Formation::start();
    let p = f.primary();
    f.psql(p, WRITES_TABLE).unwrap();
    let formation_dir = f.dir().display().to_string();
    let mut bouncer_dirs = Vec::new();

    planned_switchover(&rt, &mut f);
    sigkill_of_the_primary(&rt, &mut f);
    frozen_primary(&rt, &mut f);
    read_only_primary(&rt, &mut f);
    pgbouncer(&rt, &mut f, &mut bouncer_dirs);
    read_your_writes(&rt, &mut f);

    let dropped = Instant::now();
    drop(f);
    let formation_drop = dropped.elapsed();
    let shutdown = Instant::now();
    rt.shutdown_timeout(Duration::from_secs(10));
    println!(
        "FIGURE pg_ha total: {} (formation dropped in {}, runtime shut down in {})",
        secs(test.elapsed()),
        secs(formation_drop),
        secs(shutdown.elapsed())
    );
    let out = Command::new("pgrep")
        .args(["-a", "-f", "rs-pgha-"])
        .output()
        .expect("pgrep runs");
    let left = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let mine: Vec<&str> = left
        .lines()
        .filter(|l| l.contains(&formation_dir) || bouncer_dirs.iter().any(|d| l.contains(d)))
        .collect();
    assert!(
        mine.is_empty(),
        "processes of this test's formation or PgBouncers left:\n{}",
        mine.join("\n")
    );
    if !left.is_empty() {
        println!("(rs-pgha- processes of other runs on this machine:\n{left})");
    }
}

// ---------------------------------------------------------------------
// 1. Planned switchover.
//
// On aa45677 `Retryable` said yes only to serialization failures and
// deadlocks: the first connection the demoted primary terminates (57P01,
// or a closed connection), its read-only phase (25006) or the failed
// connect while no node accepts writes came back from
// `transaction_with_retry` at once, so `ledger.failed` (the writers that
// gave up) would not be empty. The test also checks that the writers did
// meet failures (`retried > 0`), so an empty `failed` is not a switchover
// nobody noticed.
// ---------------------------------------------------------------------

fn planned_switchover(rt: &Runtime, f: &mut Formation) {
    f.wait_settled();
    let engine = connect(rt, &f.url(""), EngineOptions::default().max_size(8));
    let load = Load::start(rt, &engine, 12, "switchover", Mode::Retry, None);
    load.wait_acks(None, 100, Instant::now(), Duration::from_secs(20));
    let old = f.primary();
    let t0 = Instant::now();
    let new = f.switchover();
    let writable = t0.elapsed();
    let resumed = load.wait_acks(
        Some(i32::from(f.node_port(new))),
        100,
        t0,
        Duration::from_secs(30),
    ) - t0;
    let ledger = load.stop(rt);
    let rows = rows_by_id(&[f.url("")], "switchover");
    let summary = assert_exactly_once("switchover", &ledger, &rows, f);
    println!(
        "FIGURE pg_ha switchover: node{} -> node{} (switchover() done, old primary secondary \
         again, after {}); writes resumed on the new primary {} after perform_failover \
         (longest gap between acknowledged writes {}); 12 writers, pool of 8: {summary}; {} \
         attempts retried",
        old + 1,
        new + 1,
        secs(writable),
        secs(resumed),
        secs(ledger.longest_gap()),
        ledger.retried,
    );
    assert!(
        ledger.failed.is_empty(),
        "switchover: writers using transaction_with_retry gave up: {}",
        tally(ledger.failed.iter().map(|f| f.message.as_str()))
    );
    assert!(
        ledger.retried > 0,
        "switchover: no attempt failed, so the switchover was not seen by the writers"
    );
}

// ---------------------------------------------------------------------
// 2. SIGKILL of the primary, then its restart (it rejoins as standby).
//
// On aa45677: the broken pooled connections and the failed connects
// (refused on the killed node, "read-only" on the standby until it is
// promoted) were not retryable, so every writer gave up within
// milliseconds of the kill (`ledger.failed` not empty). Nor was there a
// connect backoff: every checkout opened a connection, one failed connect
// per attempt. Here a checkout during the backoff fails at once without
// connecting, so failed connects must be a small fraction of the retried
// attempts (the assertion `failed connects * 3 < retried`) and few in
// absolute terms; and since the backoff is capped at 2 s, writes resume
// within 3 s of the promoted node answering writable.
// ---------------------------------------------------------------------

fn sigkill_of_the_primary(rt: &Runtime, f: &mut Formation) {
    f.wait_settled();
    let engine = connect(rt, &f.url(""), EngineOptions::default().max_size(8));
    let load = Load::start(rt, &engine, 12, "sigkill", Mode::Retry, None);
    load.wait_acks(None, 100, Instant::now(), Duration::from_secs(20));
    let t0 = Instant::now();
    let old = f.kill_primary();
    let promoted = f
        .wait_writable_other_than(Some(old), Duration::from_secs(60))
        .unwrap_or_else(|| panic!("sigkill: no promotion within 60 s:\n{}", f.monitor_view()));
    let writable = t0.elapsed();
    let resumed_at = load.wait_acks(
        Some(i32::from(f.node_port(promoted))),
        1,
        t0,
        Duration::from_secs(30),
    );
    let resumed = resumed_at - t0;
    let connects = failed_connects(t0, resumed_at);
    let errors = logged(t0, |e| is_retry(e) && e.at <= resumed_at);
    let retried_during = errors.len();
    f.restart_node(old);
    let restarted = Instant::now();
    let settled = f.wait_settled();
    assert_eq!(settled, promoted, "sigkill: the primary changed again");
    let rejoined = restarted.elapsed();
    load.wait_acks(
        Some(i32::from(f.node_port(promoted))),
        100,
        Instant::now(),
        Duration::from_secs(30),
    );
    let ledger = load.stop(rt);
    let rows = rows_by_id(&[f.url("")], "sigkill");
    let summary = assert_exactly_once("sigkill", &ledger, &rows, f);
    println!(
        "FIGURE pg_ha sigkill: node{} killed, node{} writable after {}; writes resumed on it \
         after {} (longest gap {}); {retried_during} attempts retried and {connects} failed \
         connects until then; node{} rejoined as secondary {} after its restart; {summary}",
        old + 1,
        promoted + 1,
        secs(writable),
        secs(resumed),
        secs(ledger.longest_gap()),
        old + 1,
        secs(rejoined),
    );
    println!(
        "FIGURE pg_ha sigkill: retried errors: {}",
        tally(errors.iter().map(|m| retry_error(m)))
    );
    assert!(
        ledger.failed.is_empty(),
        "sigkill: writers using transaction_with_retry gave up: {}",
        tally(ledger.failed.iter().map(|f| f.message.as_str()))
    );
    assert!(
        resumed < writable + Duration::from_secs(3),
        "sigkill: writes resumed {} after the kill, {} after the new primary was writable",
        secs(resumed),
        secs(resumed.saturating_sub(writable))
    );
    assert!(
        connects * 3 < retried_during && connects <= 80,
        "sigkill: {connects} failed connects for {retried_during} retried attempts: no backoff?"
    );
}

// ---------------------------------------------------------------------
// 3. A frozen primary (SIGSTOP: its port accepts TCP, nothing answers).
//
// On aa45677 a deadline was a timer that cancelled the statement with
// pg_cancel_backend and then waited for the blocking task: on a frozen
// server the cancel's own connect hangs and the task never returns, so a
// call stayed stuck until the thaw (tens of seconds), and the deadline did
// not cover the checkout (a connect to the frozen node takes
// connect_timeout, 2 s, per host). The assertion that every call returns
// within 2.5 s (the 2 s deadline plus ABANDON_AFTER) is the one it breaks.
// ---------------------------------------------------------------------

fn frozen_primary(rt: &Runtime, f: &mut Formation) {
    let deadline = Duration::from_secs(2);
    let bound = deadline + Duration::from_millis(500);
    f.wait_settled();
    let engine = connect(rt, &f.url(""), EngineOptions::default().max_size(8));
    let load = Load::start(rt, &engine, 12, "frozen", Mode::Deadline(deadline), None);
    load.wait_acks(None, 100, Instant::now(), Duration::from_secs(20));
    let frozen = f.primary();
    let t0 = Instant::now();
    f.freeze(frozen);
    let promoted = f
        .wait_writable_other_than(Some(frozen), Duration::from_secs(60))
        .unwrap_or_else(|| panic!("frozen: no promotion within 60 s:\n{}", f.monitor_view()));
    let writable = t0.elapsed();
    let port = i32::from(f.node_port(promoted));
    let resumed = load.wait_acks(Some(port), 1, t0, Duration::from_secs(30)) - t0;
    load.wait_acks(Some(port), 100, t0, Duration::from_secs(30));
    let ledger = load.stop(rt);
    drop(engine);
    f.thaw(frozen);
    let thawed = Instant::now();
    assert_eq!(
        f.wait_settled(),
        promoted,
        "frozen: the primary changed again"
    );
    let rejoined = thawed.elapsed();
    let rows = rows_by_id(&[f.url("")], "frozen");
    let summary = assert_exactly_once("frozen", &ledger, &rows, f);
    println!(
        "FIGURE pg_ha frozen: node{} frozen, node{} writable after {}; writes resumed on it \
         after {}; {} calls with a {} deadline, the longest returned in {} ({} Error::Timeout); \
         thawed node{} secondary after {}; {summary}",
        frozen + 1,
        promoted + 1,
        secs(writable),
        secs(resumed),
        ledger.calls,
        secs(deadline),
        secs(ledger.max_call),
        ledger.timeouts(),
        frozen + 1,
        secs(rejoined),
    );
    println!(
        "FIGURE pg_ha frozen: errors: {}",
        tally(ledger.failed.iter().map(|f| f.message.as_str()))
    );
    assert!(
        ledger.max_call <= bound,
        "frozen: a call with a {} deadline took {}",
        secs(deadline),
        secs(ledger.max_call)
    );
    assert!(
        ledger.timeouts() > 0,
        "frozen: no call timed out, so none met the frozen server"
    );
}

// ---------------------------------------------------------------------
// 4. The primary turned read-only while another listed host is writable.
//
// The formation has one writable node, so the URL lists the formation's
// primary first and the system PostgreSQL (127.0.0.1:5432) second, each
// with a database of the same name and the same table. On aa45677 a 25006
// (read-only transaction) neither retired the pooled connection nor was
// retryable, and the checkout ping was `SELECT 1`, which a read-only node
// answers: the writers gave up and the pool stayed on the read-only node,
// so no write ever reached the second host (the wait below times out) and
// `failed` is not empty. What bounds the move now: each pooled connection
// is retired on its first 25006 (a reload of `default_transaction_read_only`
// reaches the open sessions at their next statement), and the new
// connection skips the read-only host (libpq's target_session_attrs, and
// the engine's own `transaction_read_only` check).
// ---------------------------------------------------------------------

/// Drops the scenario's database on the system PostgreSQL, also on a panic.
struct SystemDb {
    admin: String,
    name: String,
}

impl Drop for SystemDb {
    fn drop(&mut self) {
        if let Ok(mut conn) = PgConnection::establish(&self.admin)
            && let Err(e) = conn.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
        {
            eprintln!("dropping {} on the system PostgreSQL: {e}", self.name);
        }
    }
}

fn read_only_primary(rt: &Runtime, f: &mut Formation) {
    let admin = std::env::var("PG_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let name = format!("runsync_ha_{}", std::process::id());
    exec(
        &admin,
        &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
    );
    exec(&admin, &format!("CREATE DATABASE {name}"));
    let system = SystemDb {
        admin,
        name: name.clone(),
    };
    let system_url = format!("postgres://postgres@127.0.0.1:5432/{name}");
    exec(&system_url, WRITES_TABLE);
    let p = f.wait_settled();
    f.psql(p, &format!("CREATE DATABASE {name}")).unwrap();
    let formation_url = node_db_url(f, p, &name);
    exec(&formation_url, WRITES_TABLE);
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:5432/{name}\
         ?target_session_attrs=read-write&connect_timeout=2",
        f.node_port(p)
    );
    let engine = connect(rt, &url, EngineOptions::default().max_size(8));
    let load = Load::start(rt, &engine, 12, "read-only", Mode::Retry, None);
    let warm = Instant::now();
    load.wait_acks(
        Some(i32::from(f.node_port(p))),
        100,
        warm,
        Duration::from_secs(20),
    );
    {
        let l = load.ledger.lock().unwrap();
        assert!(
            l.acked.iter().all(|a| a.port == i32::from(f.node_port(p))),
            "read-only: writes went to the second host before the first turned read-only"
        );
    }
    let t0 = Instant::now();
    f.set_read_only(p, true);
    let t1 = Instant::now();
    let moved_at = load.wait_acks(Some(5432), 1, t0, Duration::from_secs(20));
    load.wait_acks(Some(5432), 100, t0, Duration::from_secs(20));
    let ledger = load.stop(rt);
    f.set_read_only(p, false);
    drop(engine);
    let last_on_first = ledger
        .acked
        .iter()
        .filter(|a| a.port == i32::from(f.node_port(p)))
        .map(|a| a.at)
        .max();
    let rows = rows_by_id(&[formation_url, system_url], "read-only");
    let summary = assert_exactly_once("read-only", &ledger, &rows, f);
    let moved = moved_at.saturating_duration_since(t1);
    println!(
        "FIGURE pg_ha read-only: node{} set read-only (ALTER SYSTEM + reload took {}); first \
         write on the second host {} after the reload ({} after the call began); last write \
         on the read-only node {} after the reload; {} attempts retried; {summary}",
        p + 1,
        secs(t1 - t0),
        secs(moved),
        secs(moved_at - t0),
        last_on_first.map_or("(none)".into(), |at| format!(
            "{:+.3} s",
            at.saturating_duration_since(t0).as_secs_f64() - (t1 - t0).as_secs_f64()
        )),
        ledger.retried,
    );
    assert!(
        ledger.failed.is_empty(),
        "read-only: writers gave up: {}",
        tally(ledger.failed.iter().map(|f| f.message.as_str()))
    );
    assert!(
        moved < Duration::from_millis(1500),
        "read-only: writes moved to the writable host only {} after the primary turned read-only",
        secs(moved)
    );
    drop(system);
    assert!(f.wait_writable_primary(Duration::from_secs(10)).is_some());
}

// ---------------------------------------------------------------------
// 5. PgBouncer in transaction mode in front of the primary.
// ---------------------------------------------------------------------

fn run_program(url: &str, args: &[&str]) -> (std::process::Output, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_greenlet-orm"))
        .args(["--database-url", url])
        .args(args)
        .current_dir(dir.path())
        .env_remove("DATABASE_URL")
        .env_remove("RUST_LOG")
        .env_remove("RUNSYNC_ECHO")
        .output()
        .expect("the program runs");
    (out, started.elapsed())
}

#[derive(QueryableByName)]
struct Setting {
    #[diesel(sql_type = Text)]
    v: String,
}

fn statement_timeout_setting(conn: &mut PgConnection) -> QueryResult<String> {
    diesel::sql_query("SELECT current_setting('statement_timeout') AS v")
        .get_result::<Setting>(conn)
        .map(|s| s.v)
}

fn pgbouncer(rt: &Runtime, f: &mut Formation, dirs: &mut Vec<String>) {
    let p = f.wait_settled();
    f.psql(p, "CREATE DATABASE bouncer").unwrap();
    exec(&node_db_url(f, p, "bouncer"), WRITES_TABLE);
    let bouncer = PgBouncer::start_with("127.0.0.1", f.node_port(p), "bouncer", 2);
    dirs.push(bouncer.log_path().parent().unwrap().display().to_string());
    // No pgbouncer= in this URL: the engine must find the pooler itself
    // (the server's port is not the URL's).
    let auto_url = bouncer.url("bouncer", "connect_timeout=2");
    let flagged_url = bouncer.url("bouncer", "connect_timeout=2&pgbouncer=true");

    // What the old code did, done by hand, is seen by another client.
    pgbouncer_controls(f, p, dirs);

    // (a) The seed program, twice with each URL. On aa45677 Diesel's
    // prepared statement cache stayed on: the second run's
    // `__diesel_stmt_0` met the first run's, still prepared on the server
    // connection PgBouncer hands it ("prepared statement ... already
    // exists", 42P05), or a statement prepared on one server connection
    // was executed on another (26000), and the run failed.
    for (label, url) in [
        ("auto-detected", &auto_url),
        ("pgbouncer=true", &flagged_url),
    ] {
        for run in 1..=2 {
            let (out, took) = run_program(url, &[]);
            assert!(
                out.status.success() && String::from_utf8_lossy(&out.stdout) == common::SEED_OUTPUT,
                "the seed program through PgBouncer ({label}, run {run}): {}\nstdout:\n{}\nstderr:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            println!(
                "FIGURE pg_ha pgbouncer seed: {label}, run {run}: seed output in {}",
                secs(took)
            );
        }
    }

    // (b) W(1,000): the program's workload with 1,000 parents.
    let (out, took) = run_program(&auto_url, &["run", "--n", "1000"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && stdout.contains("1000 parents and 1500 children inserted")
            && stdout.contains("1000 parents and 1500 children loaded"),
        "W(1,000) through PgBouncer: {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "FIGURE pg_ha pgbouncer W(1,000): {} ({} with the process)",
        stdout.trim(),
        secs(took)
    );

    // (c) Load units, and (d) at the same time another client's session
    // state: an engine with a 100 ms statement timeout works while a plain
    // connection reads its own statement_timeout through the same 2 server
    // connections. On aa45677 the timeout was a session-level `SET
    // statement_timeout = 100` on every new connection, which stays on the
    // server connection for the next client: the observer would read
    // `100ms`, not `0`.
    let since = Instant::now();
    let flagged = connect(rt, &flagged_url, EngineOptions::default().max_size(8));
    let timed = connect(
        rt,
        &auto_url,
        EngineOptions::default()
            .max_size(8)
            .statement_timeout(Some(Duration::from_millis(100))),
    );
    let inside: String = rt
        .block_on(timed.transaction(statement_timeout_setting))
        .unwrap();
    assert_eq!(
        inside, "100ms",
        "the engine's own transactions run with its statement timeout"
    );
    let units = 150;
    let started = Instant::now();
    let load_c = Load::start(rt, &flagged, 8, "bouncer-units", Mode::Retry, Some(units));
    let load_d = Load::start(rt, &timed, 8, "bouncer-timeout", Mode::Retry, None);
    let observer_url = auto_url.clone();
    let observer = std::thread::spawn(move || {
        let mut conn = establish(&observer_url);
        let mut seen: HashMap<String, usize> = HashMap::new();
        for _ in 0..300 {
            let v = statement_timeout_setting(&mut conn).unwrap_or_else(|e| format!("error: {e}"));
            *seen.entry(v).or_default() += 1;
            std::thread::sleep(Duration::from_millis(2));
        }
        seen
    });
    let ledger_c = load_c.join(rt);
    let units_took = started.elapsed();
    let seen = observer.join().unwrap();
    let ledger_d = load_d.stop(rt);
    let direct = node_db_url(f, p, "bouncer");
    let summary_c = assert_exactly_once(
        "bouncer-units",
        &ledger_c,
        &rows_by_id(std::slice::from_ref(&direct), "bouncer-units"),
        f,
    );
    let summary_d = assert_exactly_once(
        "bouncer-timeout",
        &ledger_d,
        &rows_by_id(std::slice::from_ref(&direct), "bouncer-timeout"),
        f,
    );
    let detected = logged(since, |e| {
        e.message.contains("a proxy or pooler is in between")
    })
    .len();
    println!(
        "FIGURE pg_ha pgbouncer units: 8 tasks x {units} transactions through a pool of 2 server \
         connections in {} ({:.0} units/s); {summary_c}; {} retried",
        secs(units_took),
        ledger_c.acked.len() as f64 / units_took.as_secs_f64(),
        ledger_c.retried
    );
    println!(
        "FIGURE pg_ha pgbouncer session state: another client read statement_timeout {:?} while \
         an engine with a 100 ms timeout ran {} units alongside ({summary_d}); pooler detected \
         on {detected} connections",
        seen, ledger_d.calls
    );
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        vec!["0"],
        "another client's statement_timeout changed through PgBouncer"
    );
    // The 100 ms deadline also covers the wait for one of PgBouncer's 2
    // server connections, so a few of those units may time out (and are
    // then not in the database); nothing else may fail.
    assert!(
        ledger_c.failed.is_empty() && ledger_d.failed.iter().all(|f| f.timeout),
        "units through PgBouncer gave up: {} | {}",
        tally(ledger_c.failed.iter().map(|f| f.message.as_str())),
        tally(ledger_d.failed.iter().map(|f| f.message.as_str()))
    );
    assert!(
        detected > 0,
        "the engine without pgbouncer= did not detect the pooler"
    );
    drop(timed);

    // (e) Another client's statement is never cancelled.
    pgbouncer_cancel(rt, f, p, dirs);

    // (f) A switchover, then PgBouncer pointed at the new primary. On
    // aa45677 the writers gave up at the first 25006 from the demoted
    // node behind PgBouncer (not retryable), and with the statement cache
    // on, a client connection moved to a new server connection met
    // 26000/42P05.
    assert_eq!(
        f.wait_settled(),
        p,
        "the primary changed before the retarget"
    );
    let load_f = Load::start(rt, &flagged, 8, "bouncer-retarget", Mode::Retry, None);
    load_f.wait_acks(None, 50, Instant::now(), Duration::from_secs(20));
    let t0 = Instant::now();
    let new = f.switchover();
    let switched = t0.elapsed();
    let t1 = Instant::now();
    bouncer.retarget("127.0.0.1", f.node_port(new));
    let resumed_at = load_f.wait_acks(
        Some(i32::from(f.node_port(new))),
        1,
        t1,
        Duration::from_secs(30),
    );
    load_f.wait_acks(
        Some(i32::from(f.node_port(new))),
        100,
        t1,
        Duration::from_secs(30),
    );
    let ledger_f = load_f.stop(rt);
    let retried = logged(t0, is_retry);
    let summary_f = assert_exactly_once(
        "bouncer-retarget",
        &ledger_f,
        &rows_by_id(&[node_db_url(f, new, "bouncer")], "bouncer-retarget"),
        f,
    );
    println!(
        "FIGURE pg_ha pgbouncer retarget: switchover to node{} in {}, then RELOAD: writes \
         through PgBouncer on the new primary {} after it (longest gap {}); {summary_f}; \
         retried errors: {}",
        new + 1,
        secs(switched),
        secs(resumed_at - t1),
        secs(ledger_f.longest_gap()),
        tally(retried.iter().map(|m| retry_error(m)))
    );
    assert!(
        ledger_f.failed.is_empty(),
        "retarget: writers gave up: {}",
        tally(ledger_f.failed.iter().map(|f| f.message.as_str()))
    );
    assert!(
        resumed_at - t1 < Duration::from_secs(5),
        "retarget: writes resumed only {} after the RELOAD",
        secs(resumed_at - t1)
    );
    let stale: Vec<&String> = retried
        .iter()
        .filter(|m| m.contains("prepared statement"))
        .collect();
    assert!(
        stale.is_empty(),
        "retarget: prepared statement errors (26000/42P05) met: {stale:?}"
    );
}

/// Controls, on a PgBouncer of 1 server connection of their own: what
/// aa45677 did, done by hand, breaks another client through PgBouncer, so
/// the assertions of (a), (d) and (f) can see it.
fn pgbouncer_controls(f: &Formation, p: usize, dirs: &mut Vec<String>) {
    let control = PgBouncer::start_with("127.0.0.1", f.node_port(p), "bouncer", 1);
    dirs.push(control.log_path().parent().unwrap().display().to_string());
    let control_url = control.url("bouncer", "");
    let (mut one, mut two) = (establish(&control_url), establish(&control_url));
    // Diesel's statement cache on (aa45677 never turned it off): the same
    // named statement prepared by two clients on one server connection.
    let cacheable = || diesel::select(1.into_sql::<Integer>());
    let first = cacheable().get_result::<i32>(&mut one);
    let second = cacheable().get_result::<i32>(&mut two);
    assert!(
        first.is_ok()
            && second
                .as_ref()
                .is_err_and(|e| e.to_string().contains("already exists")),
        "control: Diesel's statement cache through PgBouncer: {first:?}, then {second:?}"
    );
    // A session-level SET (aa45677's statement timeout) is the next client's.
    one.batch_execute("SET statement_timeout = 100").unwrap();
    let leaked = statement_timeout_setting(&mut two).unwrap();
    assert_eq!(
        leaked, "100ms",
        "control: a session-level SET through PgBouncer"
    );
    println!(
        "FIGURE pg_ha pgbouncer controls: with the statement cache on, a second client's \
         prepare fails ({}); a session-level SET statement_timeout = 100 is read by the next \
         client as {leaked}",
        second.unwrap_err()
    );
    drop((one, two, control));
}

/// (e) Another client's statement is never cancelled. A PgBouncer of
/// its own with 2 server connections (with 1, the cancel's side
/// connection would run on the very server connection it targets and
/// cancel itself, so nothing would show): the engine connects first, so
/// on aa45677 it recorded server connection S1's pid; the other client
/// then sleeps on S1, the engine's calls run on S2, and their cancel
/// (`pg_cancel_backend(S1's pid)`, sent once S2 frees) lands on the
/// other client's sleep: "canceling statement due to user request".
fn pgbouncer_cancel(rt: &Runtime, f: &Formation, p: usize, dirs: &mut Vec<String>) {
    let bouncer_e = PgBouncer::start_with("127.0.0.1", f.node_port(p), "bouncer", 2);
    dirs.push(bouncer_e.log_path().parent().unwrap().display().to_string());
    let url_e = bouncer_e.url("bouncer", "connect_timeout=2");
    let engine_e = connect(rt, &url_e, EngineOptions::default().max_size(2));
    let sleeper_url = url_e.clone();
    let sleeper = std::thread::spawn(move || {
        let mut conn = establish(&sleeper_url);
        (0..3)
            .map(|_| {
                diesel::sql_query("SELECT pg_sleep(1.5)")
                    .execute(&mut conn)
                    .map(drop)
                    .map_err(|e| e.to_string())
            })
            .collect::<Vec<_>>()
    });
    std::thread::sleep(Duration::from_millis(100));
    let (dropped, deadlines) = rt.block_on(async {
        let (mut dropped, mut deadlines) = (0, 0);
        while !sleeper.is_finished() {
            let mut session = engine_e.session();
            let call = session.run_sync(|c| {
                diesel::sql_query("SELECT pg_sleep(0.3)")
                    .execute(c)
                    .map_err(Error::from)
            });
            if tokio::time::timeout(Duration::from_millis(50), call)
                .await
                .is_err()
            {
                dropped += 1;
            }
            drop(session);
            let mut session = engine_e.session();
            let timed_out = session
                .with_timeout(Duration::from_millis(100))
                .run_sync(|c| {
                    diesel::sql_query("SELECT pg_sleep(0.3)")
                        .execute(c)
                        .map_err(Error::from)
                })
                .await;
            if matches!(timed_out, Err(Error::Timeout(_))) {
                deadlines += 1;
            }
        }
        (dropped, deadlines)
    });
    let sleeps = sleeper.join().unwrap();
    println!(
        "FIGURE pg_ha pgbouncer cancel: {dropped} engine calls dropped after 50 ms and \
         {deadlines} ended by a 100 ms deadline while another client slept 3 x 1.5 s on the \
         same 2 server connections: its sleeps {sleeps:?}"
    );
    assert!(
        sleeps.iter().all(Result::is_ok),
        "another client's statement failed while the engine's calls were cancelled: {sleeps:?}"
    );
    assert!(dropped + deadlines > 0, "no engine call was cancelled");
    drop(engine_e);
    // Control: what aa45677's canceller sent, `pg_cancel_backend` of the
    // pid a client saw when it connected, through the same PgBouncer, lands
    // on whichever client runs on that server connection now.
    let mut probe = establish(&url_e);
    let pid: i32 = diesel::select(diesel::dsl::sql::<Integer>("pg_backend_pid()"))
        .get_result(&mut probe)
        .unwrap();
    let sleeper_url = url_e.clone();
    let sleeper = std::thread::spawn(move || {
        diesel::sql_query("SELECT pg_sleep(1.5)")
            .execute(&mut establish(&sleeper_url))
            .map(drop)
            .map_err(|e| e.to_string())
    });
    let cancelled = loop {
        std::thread::sleep(Duration::from_millis(100));
        // An error here would be the probe cancelling itself (the sleeper
        // on the other server connection); the assertion below says so.
        let _ = diesel::sql_query(format!("SELECT pg_cancel_backend({pid})")).execute(&mut probe);
        if sleeper.is_finished() {
            break sleeper.join().unwrap();
        }
    };
    println!(
        "FIGURE pg_ha pgbouncer cancel control: pg_cancel_backend({pid}) through PgBouncer, \
         the pid seen at connect time: the other client's sleep {cancelled:?}"
    );
    assert!(
        cancelled
            .as_ref()
            .is_err_and(|e| e.contains("canceling statement due to user request")),
        "control: a pid-based cancel through PgBouncer did not hit the other client: {cancelled:?}"
    );
    drop(probe);
    drop(bouncer_e);
}

// ---------------------------------------------------------------------
// 6. Read-your-writes on the standby.
//
// aa45677 had no `Replicated`, no write position and no wait for replay:
// a read sent to the replica engine right after a write read the standby
// as it was, which is what `read_after(None, ..)` measures here (its stale
// reads are reported). The zero-stale assertion for `read_after(Some(pos))`
// is what that old path does not give.
// ---------------------------------------------------------------------

#[derive(QueryableByName)]
struct Value {
    #[diesel(sql_type = BigInt)]
    v: i64,
}

fn read_counter(c: &mut PgConnection) -> Result<i64, Error> {
    diesel::sql_query("SELECT v FROM rw_counter WHERE id = 1")
        .get_result::<Value>(c)
        .map(|r| r.v)
        .map_err(Error::from)
}

fn read_your_writes(rt: &Runtime, f: &mut Formation) {
    let p = f.primary();
    let s = f.standby();
    f.psql(
        p,
        "CREATE TABLE rw_counter (id int PRIMARY KEY, v bigint NOT NULL); \
         INSERT INTO rw_counter VALUES (1, 0)",
    )
    .unwrap();
    let primary = connect(rt, &f.url(""), EngineOptions::default().max_size(8));
    let replica = connect(
        rt,
        &format!("{}?target_session_attrs=standby", f.node_url(s)),
        EngineOptions::default().max_size(8),
    );
    let db = Replicated::new(primary, replica);
    let cycles = 1000;
    let started = Instant::now();
    let (stale_plain, stale_after, on_primary) = rt.block_on(async {
        let (mut stale_plain, mut stale_after, mut on_primary) = (0, 0, 0);
        for i in 1..=cycles {
            let ((), position) = db
                .write(move |c| {
                    diesel::sql_query("UPDATE rw_counter SET v = $1 WHERE id = 1")
                        .bind::<BigInt, _>(i)
                        .execute(c)
                        .map(drop)
                        .map_err(Error::from)
                })
                .await
                .unwrap();
            if db.read_after(None, read_counter).await.unwrap() < i {
                stale_plain += 1;
            }
            let (v, on) = db.read_where(Some(&position), read_counter).await.unwrap();
            if v < i {
                stale_after += 1;
            }
            if on == ReadOn::Primary {
                on_primary += 1;
            }
        }
        (stale_plain, stale_after, on_primary)
    });
    println!(
        "FIGURE pg_ha read-your-writes: {cycles} cycles (write on node{}, reads on standby \
         node{}) in {}: read_after(None) stale {stale_plain}; read_after(position) stale \
         {stale_after}, {on_primary} fell back to the primary",
        p + 1,
        s + 1,
        secs(started.elapsed())
    );
    assert_eq!(
        stale_after, 0,
        "reads after the write position saw older data"
    );
}
