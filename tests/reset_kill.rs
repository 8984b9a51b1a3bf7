//! The real program killed with SIGKILL at random moments, on each backend
//! (`name::sqlite`, `name::postgres`, `name::mysql`).
//!
//! Each round starts `greenlet-orm` (the seed program) on the test's own
//! database, kills it after a random delay spread over a whole normal run
//! (process start, connect, schema reset, insert transaction, `run_sync` +
//! commit, exit), looks at what the database holds, then runs the program
//! again to the end and checks that it succeeds with the SPEC output.
//!
//! What a kill may leave ("a whole state"), phase by phase. Every round
//! starts from the final state of the previous round's normal run.
//!
//! | state | tables `a`, `b` | rows | version `20240101000000` in `__diesel_schema_migrations` | left by a kill |
//! |---|---|---|---|---|
//! | `final` | both | the SPEC rows after the last commit (`a1` reads `new data`) | recorded | before the schema reset takes effect (its commit; on MySQL its drop's `RENAME TABLE`), or after the last commit |
//! | `absent` | neither | - | not recorded | MySQL only: between the reset's drop and its create (two atomic `RENAME TABLE`s) |
//! | `empty` | both | none | recorded | after the schema reset, before the insert transaction commits |
//! | `seed` | both | the three parents and five children, `a1` still `a1` | recorded | after the insert transaction, before `run_sync` + commit |
//!
//! On SQLite and PostgreSQL the reset is one transaction, so `absent` is
//! never seen there and counts as inconsistent. Anything else (one table
//! without the other, tables without their recorded version or the reverse,
//! orphan or missing rows, other data) is an inconsistent state; the test
//! fails unless there are none. Private staging tables of the MySQL reset
//! (`*__greenlet_new`, `*__greenlet_old`) that a kill leaves behind are not
//! part of the schema; they are counted, and the next run must remove them.
//!
//! `RUNSYNC_FAULT_ROUNDS` sets the number of kills per backend (the suite
//! runs 10; RELIABILITY.md's figures 100); `RUNSYNC_KILL_SEED` fixes the random delays' seed (printed).

mod common;

use std::io::Write;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{SEED_OUTPUT, TestDb, per_backend};
use diesel::prelude::*;
use diesel::sql_types::Text;
use diesel_runsync::Backend;
use greenlet_orm::AnyConnection;
use greenlet_orm::queries::all_rows;
use runsync_testkit::chaos::next_random;

/// The schema's one migration.
const VERSION: &str = "20240101000000";

/// A normal run must end within this.
const RUN_LIMIT: Duration = Duration::from_secs(60);

fn rounds(default: usize) -> usize {
    std::env::var("RUNSYNC_FAULT_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn figure(line: String) {
    let _ = writeln!(std::io::stderr(), "FIGURE {line}");
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Starts the seed program on `url` in an empty directory (no `.env`),
/// with nothing of ours inherited but `DATABASE_URL`; its stdout and
/// stderr piped, or with `--echo` and stderr to `echo_to`.
fn start(url: &str, dir: &std::path::Path, echo_to: Option<&std::path::Path>) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_greenlet-orm"));
    command
        .current_dir(dir)
        .env("DATABASE_URL", url)
        .env_remove("RUST_LOG")
        .env_remove("RUNSYNC_ECHO")
        .stdin(Stdio::null());
    match echo_to {
        Some(path) => {
            command
                .arg("--echo")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(path).expect("the echo file"));
        }
        None => {
            command.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
    }
    command.spawn().expect("the program starts")
}

/// Where the program was when killed, from its `--echo` (each statement is
/// echoed once it has completed): which of its three transactions had
/// committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not connected yet.
    Startup,
    /// Connected; the schema reset not committed.
    Reset,
    /// The reset committed; the insert transaction not.
    Insert,
    /// The inserts committed; `run_sync` + commit not.
    Queries,
    /// Every commit done (exiting, or exited).
    Done,
}

fn phase(echo: &str) -> Phase {
    if !echo.lines().any(|l| l.starts_with("connected to ")) {
        return Phase::Startup;
    }
    match echo.lines().filter(|l| l.starts_with("COMMIT")).count() {
        0 => Phase::Reset,
        1 => Phase::Insert,
        2 => Phase::Queries,
        _ => Phase::Done,
    }
}

/// Runs the program to its end (at most [`RUN_LIMIT`]); its output and how
/// long it took.
fn run_to_end(url: &str, dir: &std::path::Path) -> (Output, Duration) {
    let started = Instant::now();
    let mut child = start(url, dir, None);
    // Read the pipes on threads, so a chatty child never blocks on them.
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut stdout, &mut v).map(|_| v)
    });
    let err = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut stderr, &mut v).map(|_| v)
    });
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > RUN_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the program did not finish within {RUN_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let elapsed = started.elapsed();
    let output = Output {
        status,
        stdout: out.join().unwrap().unwrap(),
        stderr: err.join().unwrap().unwrap(),
    };
    (output, elapsed)
}

#[derive(QueryableByName)]
struct Name {
    #[diesel(sql_type = Text)]
    name: String,
}

/// The names of the tables in the test's database (its current schema on
/// PostgreSQL), SQLite's own `sqlite_*` tables left out.
fn table_names(conn: &mut AnyConnection) -> Vec<String> {
    let sql = match conn.backend() {
        Backend::Sqlite => {
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'"
        }
        Backend::Postgres => {
            "SELECT CAST(table_name AS TEXT) AS name FROM information_schema.tables \
             WHERE table_schema = current_schema()"
        }
        Backend::Mysql => {
            "SELECT CAST(table_name AS CHAR) AS name FROM information_schema.tables \
             WHERE table_schema = DATABASE()"
        }
    };
    let mut names: Vec<String> = diesel::sql_query(sql)
        .load::<Name>(conn)
        .expect("list the tables")
        .into_iter()
        .map(|n| n.name)
        .collect();
    names.sort();
    names
}

/// What one look at the database found.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Neither table, version not recorded.
    Absent,
    /// Both tables, version recorded, no rows.
    Empty,
    /// Both tables, version recorded, the seed's rows before the update.
    Seed,
    /// Both tables, version recorded, the seed's rows after the update.
    Final,
    /// Anything else, described.
    Inconsistent(String),
}

/// Waits (up to 30 s) until no other session is connected to the test's
/// database: the server has run the statement in flight when the client
/// was killed to its end, and closed the session (rolling back what it had
/// not committed). SQLite has no server: the process is gone.
fn quiesce(db: &TestDb, conn: &mut AnyConnection) {
    use diesel::sql_types::BigInt;
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let sql = match db.backend {
        Backend::Sqlite => return,
        Backend::Postgres => {
            "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() \
             AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
        }
        Backend::Mysql => {
            "SELECT CAST(count(*) AS SIGNED) AS n FROM information_schema.processlist \
             WHERE db = DATABASE() AND id <> CONNECTION_ID()"
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while diesel::sql_query(sql).get_result::<Count>(conn).unwrap().n > 0 {
        assert!(
            Instant::now() < deadline,
            "{}: a session of the killed program stays",
            db.backend
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Looks at the database, once the killed program's session has ended:
/// its [`State`] and the staging tables left over.
fn inspect(db: &TestDb) -> (State, Vec<String>) {
    let mut conn = db.connect();
    quiesce(db, &mut conn);
    let names = table_names(&mut conn);
    let has = |t: &str| names.iter().any(|n| n == t);
    let leftovers: Vec<String> = names
        .iter()
        .filter(|n| n.contains("__greenlet_"))
        .cloned()
        .collect();
    let others: Vec<&String> = names
        .iter()
        .filter(|n| !["a", "b", "__diesel_schema_migrations"].contains(&n.as_str()))
        .filter(|n| !n.contains("__greenlet_"))
        .collect();
    let recorded: Vec<String> = if has("__diesel_schema_migrations") {
        diesel::sql_query("SELECT version AS name FROM __diesel_schema_migrations")
            .load::<Name>(&mut conn)
            .expect("read the bookkeeping")
            .into_iter()
            .map(|n| n.name)
            .collect()
    } else {
        Vec::new()
    };
    let state = if !others.is_empty() {
        State::Inconsistent(format!("unexpected tables {others:?}"))
    } else if recorded.iter().any(|v| v != VERSION) {
        State::Inconsistent(format!("unexpected versions recorded: {recorded:?}"))
    } else {
        let recorded = !recorded.is_empty();
        match (has("a"), has("b"), recorded) {
            (false, false, false) => State::Absent,
            (true, true, true) => rows_state(&mut conn),
            (a, b, recorded) => State::Inconsistent(format!(
                "table a {}, table b {}, version {}",
                if a { "present" } else { "absent" },
                if b { "present" } else { "absent" },
                if recorded { "recorded" } else { "not recorded" },
            )),
        }
    };
    (state, leftovers)
}

/// The state of present, recorded tables: by their rows.
fn rows_state(conn: &mut AnyConnection) -> State {
    let (parents, children) = match all_rows(conn) {
        Ok(rows) => rows,
        Err(e) => return State::Inconsistent(format!("cannot read the rows: {e}")),
    };
    let parents: Vec<(i32, Option<String>)> = parents.into_iter().map(|a| (a.id, a.data)).collect();
    let children: Vec<(i32, i32, Option<String>)> = children
        .into_iter()
        .map(|b| (b.id, b.a_id, b.data))
        .collect();
    let seed_children = vec![
        (1, 1, None),
        (2, 1, None),
        (3, 2, None),
        (4, 3, None),
        (5, 3, None),
    ];
    let parents_with = |first: &str| {
        vec![
            (1, Some(first.to_owned())),
            (2, Some("a2".to_owned())),
            (3, Some("a3".to_owned())),
        ]
    };
    if parents.is_empty() && children.is_empty() {
        State::Empty
    } else if children == seed_children && parents == parents_with("a1") {
        State::Seed
    } else if children == seed_children && parents == parents_with("new data") {
        State::Final
    } else {
        State::Inconsistent(format!("rows a {parents:?}, b {children:?}"))
    }
}

/// Runs the program to its end and asserts the SPEC output, the final
/// rows and no staging tables left.
fn assert_a_normal_run(db: &TestDb, dir: &std::path::Path, context: &str) {
    let (out, _) = run_to_end(&db.url, dir);
    assert!(
        out.status.success(),
        "{} {context}: the program failed: {}",
        db.backend,
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout), SEED_OUTPUT, "{} {context}", db.backend);
    assert_eq!(text(&out.stderr), "", "{} {context}", db.backend);
    let (state, leftovers) = inspect(db);
    assert_eq!(state, State::Final, "{} {context}", db.backend);
    assert!(
        leftovers.is_empty(),
        "{} {context}: staging tables left: {leftovers:?}",
        db.backend
    );
}

/// Kills the program at random moments of its run on one test database.
struct Killer<'a> {
    db: &'a TestDb,
    dir: tempfile::TempDir,
    echo_file: std::path::PathBuf,
    /// A normal run's duration (the median of five).
    normal: Duration,
    /// Delays are drawn uniformly from `0..=span` (1.2 x `normal`).
    span: Duration,
    first_seed: u64,
    seed: u64,
    rounds: usize,
    kills: usize,
    exited_first: usize,
    /// Kills per [`Phase`].
    killed_in: [usize; 5],
}

impl<'a> Killer<'a> {
    /// Runs the program to its end once (SPEC output), then five times as
    /// the killed runs are (with `--echo` to a file) to time a normal run.
    fn new(db: &'a TestDb) -> Killer<'a> {
        let dir = tempfile::tempdir().unwrap();
        assert_a_normal_run(db, dir.path(), "the first run");
        let echo_file = dir.path().join("echo.txt");
        let mut normal: Vec<Duration> = (0..5)
            .map(|_| {
                let started = Instant::now();
                let status = start(&db.url, dir.path(), Some(&echo_file)).wait().unwrap();
                assert!(status.success(), "{}: a normal run failed", db.backend);
                started.elapsed()
            })
            .collect();
        normal.sort();
        let normal = normal[2];
        let seed = std::env::var("RUNSYNC_KILL_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        Killer {
            db,
            dir,
            echo_file,
            normal,
            span: normal.mul_f64(1.2),
            first_seed: seed,
            seed,
            rounds: 0,
            kills: 0,
            exited_first: 0,
            killed_in: [0; 5],
        }
    }

    /// Starts the program and SIGKILLs it after a random delay; the delay,
    /// and where the program was (`None`: it had exited already).
    fn kill_one(&mut self) -> (Duration, Option<Phase>) {
        self.rounds += 1;
        let delay = self
            .span
            .mul_f64((next_random(&mut self.seed) % 1_000_001) as f64 / 1_000_000.0);
        let mut child = start(&self.db.url, self.dir.path(), Some(&self.echo_file));
        std::thread::sleep(delay);
        let at = if child.try_wait().unwrap().is_some() {
            self.exited_first += 1;
            None
        } else {
            child.kill().expect("SIGKILL the program"); // SIGKILL on Unix
            self.kills += 1;
            let at = phase(&std::fs::read_to_string(&self.echo_file).unwrap_or_default());
            self.killed_in[at as usize] += 1;
            Some(at)
        };
        child.wait().unwrap();
        (delay, at)
    }

    /// The next run, to its end: whether it printed the SPEC output and
    /// left the SPEC rows and no staging table; else what went wrong.
    fn recovers(&self) -> Result<(), String> {
        let (out, _) = run_to_end(&self.db.url, self.dir.path());
        let (after, leftovers_after) = inspect(self.db);
        if out.status.success()
            && text(&out.stdout) == SEED_OUTPUT
            && after == State::Final
            && leftovers_after.is_empty()
        {
            Ok(())
        } else {
            Err(format!(
                "the next run did not recover: exit {:?}, stderr {:?}, state {after:?}, staging tables {leftovers_after:?}",
                out.status.code(),
                text(&out.stderr)
            ))
        }
    }

    /// The figures common to both tests.
    fn summary(&self) -> String {
        let k = &self.killed_in;
        format!(
            "kills={} rounds={} exited_before_kill={} normal_run_ms={:.1} delays_ms=[0,{:.1}] \
             killed_in: startup={} reset={} insert={} queries={} after_last_commit={} seed={}",
            self.kills,
            self.rounds,
            self.exited_first,
            self.normal.as_secs_f64() * 1e3,
            self.span.as_secs_f64() * 1e3,
            k[Phase::Startup as usize],
            k[Phase::Reset as usize],
            k[Phase::Insert as usize],
            k[Phase::Queries as usize],
            k[Phase::Done as usize],
            self.first_seed,
        )
    }
}

per_backend!(sigkill_at_random_moments_leaves_a_whole_state, sync);
/// After each kill (and once the server has ended the killed session):
/// nothing or a whole state; then the next run recovers.
fn sigkill_at_random_moments_leaves_a_whole_state(db: TestDb) {
    let wanted = rounds(10);
    let mut killer = Killer::new(&db);
    let (mut absent, mut empty, mut seeded, mut finished) = (0, 0, 0, 0);
    let mut inconsistent: Vec<String> = Vec::new();
    let (mut with_leftovers, mut recoveries) = (0, 0);
    let started = Instant::now();
    // Until `wanted` kills: a delay past the program's end kills nothing, and
    // on a loaded machine most rounds of a small count may end so.
    while killer.kills < wanted && killer.rounds < wanted * 10 {
        let (delay, at) = killer.kill_one();
        let round = killer.rounds;
        let (state, leftovers) = inspect(&db);
        if !leftovers.is_empty() {
            with_leftovers += 1;
        }
        match state {
            State::Absent if db.backend == Backend::Mysql => absent += 1,
            State::Absent => inconsistent.push(format!(
                "round {round} ({delay:?}, {at:?}): absent, but the reset is one transaction here"
            )),
            State::Empty => empty += 1,
            State::Seed => seeded += 1,
            State::Final => finished += 1,
            State::Inconsistent(what) => {
                inconsistent.push(format!("round {round} ({delay:?}, {at:?}): {what}"));
            }
        }
        match killer.recovers() {
            Ok(()) => recoveries += 1,
            Err(what) => {
                inconsistent.push(format!("round {round}: {what}"));
                break; // the database is broken: later rounds would only repeat this
            }
        }
    }
    figure(format!(
        "sigkill {}: {} states_after_kill: final(untouched_or_done)={finished} absent={absent} \
         empty={empty} seed={seeded} inconsistent={} staging_tables_left={with_leftovers} \
         recoveries={recoveries}/{} seconds={:.1}",
        db.backend,
        killer.summary(),
        inconsistent.len(),
        killer.rounds,
        started.elapsed().as_secs_f64(),
    ));
    assert!(
        inconsistent.is_empty(),
        "{}: {} inconsistent states or failed recoveries:\n{}",
        db.backend,
        inconsistent.len(),
        inconsistent.join("\n")
    );
    assert_eq!(recoveries, killer.rounds, "{}", db.backend);
    assert!(killer.kills >= wanted, "{}: too few kills", db.backend);
}

per_backend!(sigkill_then_an_immediate_restart_recovers, sync);
/// The next run started the moment the killed one is gone, while the
/// server may still be running the statement the killed program sent
/// last: it waits for that (the reset's lock) and succeeds.
fn sigkill_then_an_immediate_restart_recovers(db: TestDb) {
    let wanted = rounds(10);
    let mut killer = Killer::new(&db);
    let mut failures: Vec<String> = Vec::new();
    let mut recoveries = 0;
    let started = Instant::now();
    while killer.kills < wanted && killer.rounds < wanted * 10 {
        let (delay, at) = killer.kill_one();
        match killer.recovers() {
            Ok(()) => recoveries += 1,
            Err(what) => {
                failures.push(format!(
                    "round {} ({delay:?}, {at:?}): {what}",
                    killer.rounds
                ));
                break;
            }
        }
    }
    figure(format!(
        "sigkill-restart {}: {} failed_recoveries={} recoveries={recoveries}/{} seconds={:.1}",
        db.backend,
        killer.summary(),
        failures.len(),
        killer.rounds,
        started.elapsed().as_secs_f64(),
    ));
    assert!(
        failures.is_empty(),
        "{}: {}",
        db.backend,
        failures.join("\n")
    );
    assert!(killer.kills >= wanted, "{}: too few kills", db.backend);
}

/// The statements of `backend`'s migration (`up.sql`), one by one.
fn up_statements(backend: Backend) -> Vec<&'static str> {
    let sql = match backend {
        Backend::Sqlite => include_str!("../migrations/sqlite/2024-01-01-000000_create_a_b/up.sql"),
        Backend::Postgres => {
            include_str!("../migrations/postgres/2024-01-01-000000_create_a_b/up.sql")
        }
        Backend::Mysql => include_str!("../migrations/mysql/2024-01-01-000000_create_a_b/up.sql"),
    };
    sql.split(';').filter(|s| !s.trim().is_empty()).collect()
}

fn exec(conn: &mut AnyConnection, sql: &str) {
    use diesel::connection::SimpleConnection;
    conn.batch_execute(sql)
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// `ALTER TABLE ... RENAME`, in `backend`'s words.
fn rename(backend: Backend, from: &str, to: &str) -> String {
    match backend {
        Backend::Mysql => format!("RENAME TABLE {from} TO {to}"),
        _ => format!("ALTER TABLE {from} RENAME TO {to}"),
    }
}

per_backend!(half_done_states_of_any_version_are_recovered, sync);
/// The half states a killed run could leave, by this version on MySQL
/// (staging tables) or by an earlier one (a plain migration, which is not
/// atomic on MySQL): each time the next run succeeds and ends with the
/// SPEC state, staging tables gone.
fn half_done_states_of_any_version_are_recovered(db: TestDb) {
    let backend = db.backend;
    let up = up_statements(backend);
    let bookkeeping = "CREATE TABLE IF NOT EXISTS __diesel_schema_migrations (\
                       version VARCHAR(50) PRIMARY KEY NOT NULL, \
                       run_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP)";
    type Setup = Box<dyn Fn(&mut AnyConnection)>;
    let cases: Vec<(&str, Setup)> = vec![
        (
            "killed between CREATE TABLE a and CREATE TABLE b (earlier version)",
            Box::new({
                let up = up.clone();
                move |c| exec(c, up[0])
            }),
        ),
        (
            "killed after the tables, before the version was recorded (earlier version)",
            Box::new({
                let up = up.clone();
                move |c| up.iter().for_each(|s| exec(c, s))
            }),
        ),
        (
            "killed between DROP TABLE b and DROP TABLE a (earlier version), rows in a",
            Box::new(move |c| exec(c, "DROP TABLE b")),
        ),
        (
            "killed after both drops, before the version was deleted (earlier version)",
            Box::new(move |c| {
                exec(c, "DROP TABLE b");
                exec(c, "DROP TABLE a");
            }),
        ),
        (
            "killed after the drop's RENAME, before dropping what it renamed away",
            Box::new(move |c| {
                exec(c, &rename(backend, "b", "b__greenlet_old"));
                exec(c, &rename(backend, "a", "a__greenlet_old"));
                exec(
                    c,
                    &rename(
                        backend,
                        "__diesel_schema_migrations",
                        "__diesel_schema_migrations__greenlet_old",
                    ),
                );
                exec(c, bookkeeping);
            }),
        ),
        (
            "killed while building the new tables and bookkeeping aside",
            Box::new(move |c| {
                exec(c, "DROP TABLE b");
                exec(c, "DROP TABLE a");
                exec(c, "DELETE FROM __diesel_schema_migrations");
                exec(c, "CREATE TABLE a__greenlet_new (id INTEGER PRIMARY KEY)");
                exec(
                    c,
                    "CREATE TABLE __diesel_schema_migrations__greenlet_new (version VARCHAR(50))",
                );
            }),
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (i, (case, setup)) in cases.iter().enumerate() {
        let case_db = TestDb::new(backend);
        if i >= 2 {
            // A reset of a whole schema holding the program's rows.
            assert_a_normal_run(&case_db, dir.path(), "setup");
        }
        let mut conn = case_db.connect();
        if i < 2 {
            // An earlier version's migration: bookkeeping first, then up.sql.
            exec(&mut conn, bookkeeping);
        }
        setup(&mut conn);
        drop(conn);
        let (state, _) = inspect(&case_db);
        assert!(
            matches!(state, State::Inconsistent(_) | State::Absent),
            "{backend}: case {case:?} sets up a half state, got {state:?}"
        );
        assert_a_normal_run(&case_db, dir.path(), case);
    }
}

per_backend!(
    the_staged_mysql_tables_are_the_migrations_tables,
    sync,
    [mysql]
);
/// The MySQL reset builds its tables from `up.sql` under other names and
/// renames them: the result is what diesel's own migration creates.
fn the_staged_mysql_tables_are_the_migrations_tables(db: TestDb) {
    #[derive(QueryableByName)]
    struct Created {
        #[diesel(sql_type = Text, column_name = "Create Table")]
        sql: String,
    }
    fn show(conn: &mut AnyConnection, table: &str) -> String {
        let sql = diesel::sql_query(format!("SHOW CREATE TABLE {table}"))
            .get_result::<Created>(conn)
            .unwrap()
            .sql;
        // The next AUTO_INCREMENT value depends on the rows inserted.
        sql.split(' ')
            .filter(|w| !w.starts_with("AUTO_INCREMENT="))
            .collect::<Vec<_>>()
            .join(" ")
    }
    let dir = tempfile::tempdir().unwrap();
    assert_a_normal_run(&db, dir.path(), "the program");
    let plain = TestDb::new(Backend::Mysql);
    let mut conn = plain.connect();
    {
        use diesel_migrations::MigrationHarness;
        let source = greenlet_orm::migrations::for_connection(&conn);
        conn.run_pending_migrations(source).unwrap();
    }
    let mut staged = db.connect();
    for table in ["a", "b"] {
        assert_eq!(
            show(&mut staged, table),
            show(&mut conn, table),
            "table {table}"
        );
    }
}
