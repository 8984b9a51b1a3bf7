//! Micro figures (one round trip through the facade), the load figures (C
//! tasks running short units of work through the facade, sync threads,
//! diesel-async's bb8 pool and sqlx's pool, beside `pgbench`) and the
//! round-trip floor (pgbench's single-client latency for one statement).

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use diesel::connection::TransactionManager;
use diesel_runsync::{DatabaseUrl, Engine, EngineOptions, Error, PoolableConnection};
use greenlet_orm::AnyConnection;

use crate::Rng;
use crate::sync_impls::{select_by_key, unit_of_work};

/// Samples of the micro figures.
#[derive(Default)]
pub struct Micro {
    /// `tokio::task::spawn_blocking(|| ())`, the floor of one hop.
    pub spawn_blocking: Vec<Duration>,
    /// `run_sync(|_| Ok(()))` in a session whose transaction is open.
    pub empty_run_sync: Vec<Duration>,
    /// A fresh session: checkout, `run_sync(|_| Ok(()))` (BEGIN), commit.
    pub session_begin_commit: Vec<Duration>,
    /// `engine.transaction(|_| Ok(()))`: checkout, BEGIN and COMMIT in one hop.
    /// (Reported as `engine_run_sync`, its name from before
    /// `Engine::run_sync` became `Engine::transaction`, so that old and new
    /// results line up.)
    pub engine_run_sync: Vec<Duration>,
    /// The same on an engine that pings (`SELECT 1`) every checkout
    /// (`ping_after: 0`): the cost of the health check.
    pub engine_run_sync_pinged: Vec<Duration>,
    /// One PK SELECT through `run_sync` in an open transaction.
    pub pk_facade: Vec<Duration>,
    /// One PK SELECT on the raw sync connection in an open transaction.
    pub pk_sync: Vec<Duration>,
    /// One PK SELECT with diesel-async in an open transaction.
    pub pk_peer: Vec<Duration>,
    /// One PK SELECT with sqlx in an open transaction.
    pub pk_sqlx: Vec<Duration>,
    /// Diagnostic: one PK SELECT on a raw connection moved into a bare
    /// `tokio::task::spawn_blocking` and back (the facade's hop, none of its
    /// bookkeeping).
    pub pk_hop: Vec<Duration>,
}

/// Measures the micro figures: `iters` of each, in 20 interleaved rounds
/// (so a burst of load on this shared machine hits all of them alike),
/// after an untimed warm-up round.
pub async fn micro(
    backend: diesel_runsync::Backend,
    url: &str,
    rows: usize,
    iters: usize,
) -> anyhow::Result<Micro> {
    const ROUNDS: usize = 20;
    let engine = Engine::<AnyConnection>::connect(url, EngineOptions::default()).await?;
    let pinged =
        Engine::<AnyConnection>::connect(url, EngineOptions::default().ping_after(Duration::ZERO))
            .await?;
    let mut session = engine.session();
    let mut raw = <AnyConnection as PoolableConnection>::connect(&DatabaseUrl::parse(url)?)?;
    // A deferred BEGIN on every backend: on SQLite, BEGIN IMMEDIATE here
    // would hold the write lock the facade's session needs.
    <AnyConnection as diesel::Connection>::TransactionManager::begin_transaction(&mut raw)?;
    let mut peer = crate::async_impl::PeerConn::open(backend, url).await?;
    let mut sqlx_tx = crate::sqlx_impl::SqlxTx::open(backend, url).await?;
    let mut hop = Some(<AnyConnection as PoolableConnection>::connect(
        &DatabaseUrl::parse(url)?,
    )?);
    <AnyConnection as diesel::Connection>::TransactionManager::begin_transaction(
        hop.as_mut().expect("just opened"),
    )?;
    let mut rng = Rng::new(7);
    let mut m = Micro::default();
    let chunk = iters.div_ceil(ROUNDS);
    let mut scratch = Vec::new();
    for round in 0..=ROUNDS {
        // Round 0 warms up and is dropped.
        let keep = round > 0;
        let record = |target: &mut Vec<Duration>, samples: &mut Vec<Duration>| {
            if keep {
                target.append(samples);
            } else {
                samples.clear();
            }
        };

        for _ in 0..chunk {
            let t = Instant::now();
            tokio::task::spawn_blocking(|| ()).await?;
            scratch.push(t.elapsed());
        }
        record(&mut m.spawn_blocking, &mut scratch);

        for _ in 0..chunk {
            let t = Instant::now();
            session.run_sync(|_conn| Ok::<_, Error>(())).await?;
            scratch.push(t.elapsed());
        }
        record(&mut m.empty_run_sync, &mut scratch);

        for _ in 0..chunk {
            let id = rng.key(rows);
            let t = Instant::now();
            session
                .run_sync(move |conn| select_by_key(conn, id))
                .await?;
            scratch.push(t.elapsed());
        }
        record(&mut m.pk_facade, &mut scratch);

        for _ in 0..chunk {
            let id = rng.key(rows);
            let t = Instant::now();
            select_by_key(&mut raw, id)?;
            scratch.push(t.elapsed());
        }
        record(&mut m.pk_sync, &mut scratch);

        for _ in 0..chunk {
            let id = rng.key(rows);
            let t = Instant::now();
            peer.pk_select(id).await?;
            scratch.push(t.elapsed());
        }
        record(&mut m.pk_peer, &mut scratch);

        for _ in 0..chunk {
            let id = rng.key(rows);
            let t = Instant::now();
            sqlx_tx.pk_select(id).await?;
            scratch.push(t.elapsed());
        }
        record(&mut m.pk_sqlx, &mut scratch);

        for _ in 0..chunk {
            let id = rng.key(rows);
            let mut conn = hop.take().expect("the connection comes back each time");
            let t = Instant::now();
            let (conn, selected) = tokio::task::spawn_blocking(move || {
                let selected = select_by_key(&mut conn, id);
                (conn, selected)
            })
            .await?;
            scratch.push(t.elapsed());
            selected?;
            hop = Some(conn);
        }
        record(&mut m.pk_hop, &mut scratch);

        // SQLite: BEGIN IMMEDIATE would wait for the open session's write
        // lock; end it first and reopen it afterwards.
        session.commit().await?;
        for _ in 0..chunk {
            let t = Instant::now();
            let mut fresh = engine.session();
            fresh.run_sync(|_conn| Ok::<_, Error>(())).await?;
            fresh.commit().await?;
            scratch.push(t.elapsed());
        }
        record(&mut m.session_begin_commit, &mut scratch);

        for (target, engine) in [
            (&mut m.engine_run_sync, &engine),
            (&mut m.engine_run_sync_pinged, &pinged),
        ] {
            for _ in 0..chunk {
                let t = Instant::now();
                engine.transaction(|_conn| Ok::<_, Error>(())).await?;
                scratch.push(t.elapsed());
            }
            record(target, &mut scratch);
        }
    }
    Ok(m)
}

/// What one implementation gave at one concurrency level.
pub struct Load {
    /// Units of work committed.
    pub transactions: usize,
    /// Units of work that failed (each rolled back; the task went on).
    pub failures: usize,
    /// The first failure's message.
    pub first_error: Option<String>,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// Each committed unit's latency, the wait for a connection included.
    pub latencies: Vec<Duration>,
    /// Connections the implementation had open at the end.
    pub connections: u32,
    /// The fewest units (committed or failed) any one task finished: a
    /// pool that lets some tasks starve shows it here, while the latency
    /// percentiles of the units that did finish look good.
    pub min_units_per_task: usize,
}

/// What one task of [`drive`] recorded.
pub struct TaskRecord {
    latencies: Vec<Duration>,
    failures: usize,
    first_error: Option<String>,
}

impl TaskRecord {
    fn new() -> Self {
        TaskRecord {
            latencies: Vec::new(),
            failures: 0,
            first_error: None,
        }
    }

    fn record<E: std::fmt::Display>(&mut self, started: Instant, result: Result<(), E>) {
        match result {
            Ok(()) => self.latencies.push(started.elapsed()),
            Err(e) => {
                self.failures += 1;
                self.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
}

pub fn collect(records: Vec<TaskRecord>, elapsed: Duration, connections: u32) -> Load {
    let mut load = Load {
        transactions: 0,
        failures: 0,
        first_error: None,
        elapsed,
        latencies: Vec::new(),
        connections,
        min_units_per_task: records
            .iter()
            .map(|r| r.latencies.len() + r.failures)
            .min()
            .unwrap_or(0),
    };
    for r in records {
        load.failures += r.failures;
        if load.first_error.is_none() {
            load.first_error = r.first_error;
        }
        load.latencies.extend(r.latencies);
    }
    load.transactions = load.latencies.len();
    load
}

/// `clients` tokio tasks, each running `unit(key)` with random keys in
/// 1..=rows, one after another, until `duration` has passed.
pub async fn drive<U, Fut, E>(
    rows: usize,
    clients: usize,
    duration: Duration,
    unit: U,
) -> Vec<TaskRecord>
where
    U: Fn(i32) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::with_capacity(clients);
    for client in 0..clients {
        let unit = unit.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(client as u64 + 1);
            let mut record = TaskRecord::new();
            while Instant::now() < deadline {
                let id = rng.key(rows);
                let t = Instant::now();
                let result = unit(id).await;
                record.record(t, result);
            }
            record
        }));
    }
    let mut records = Vec::with_capacity(clients);
    for task in tasks {
        records.push(task.await.expect("a load task panicked"));
    }
    records
}

/// The facade: each unit is `engine.transaction(|conn| unit(conn, id))`,
/// one blocking-pool hop carrying BEGIN, the three statements and COMMIT,
/// on one `Engine<C>` with a pool of `pool_size` (`C` is the program's
/// `AnyConnection` for `facade`, a native connection for `facade-native`).
pub async fn facade_load<C: PoolableConnection>(
    url: &str,
    rows: usize,
    clients: usize,
    duration: Duration,
    options: EngineOptions,
    unit: fn(&mut C, i32) -> diesel::QueryResult<()>,
) -> anyhow::Result<Load> {
    let pool_size = options.max_size;
    let engine = Engine::<C>::connect(url, options).await?;
    // Open the whole pool first, so connects are not measured: overlapping
    // sessions each need their own connection. (On SQLite their BEGIN
    // IMMEDIATEs queue behind each other, briefly.)
    let mut warm = Vec::new();
    for _ in 0..pool_size {
        let engine = engine.clone();
        warm.push(tokio::spawn(async move {
            let mut session = engine.session();
            session
                .run_sync(|_conn| {
                    std::thread::sleep(Duration::from_millis(20));
                    Ok::<_, Error>(())
                })
                .await?;
            session.commit().await
        }));
    }
    for task in warm {
        task.await??;
    }

    let started = Instant::now();
    let unit_engine = engine.clone();
    let records = drive(rows, clients, duration, move |id| {
        let engine = unit_engine.clone();
        async move { engine.transaction(move |conn| unit(conn, id)).await }
    })
    .await;
    let elapsed = started.elapsed();
    Ok(collect(records, elapsed, engine.status().connections))
}

/// diesel-async on its bb8 pool of `pool_size` connections: each unit
/// checks a connection out and awaits BEGIN, the three statements and
/// COMMIT on it.
pub async fn diesel_async_load(
    backend: diesel_runsync::Backend,
    url: &str,
    rows: usize,
    clients: usize,
    duration: Duration,
    pool_size: u32,
) -> anyhow::Result<Load> {
    let pool = Arc::new(crate::async_impl::PeerPool::open(backend, url, pool_size).await?);
    let started = Instant::now();
    let unit_pool = pool.clone();
    let records = drive(rows, clients, duration, move |id| {
        let pool = unit_pool.clone();
        async move { pool.unit(id).await }
    })
    .await;
    let elapsed = started.elapsed();
    Ok(collect(records, elapsed, pool.size()))
}

/// sqlx on its pool of `pool_size` connections: each unit is
/// `pool.begin()`, the three statements, `commit()`.
pub async fn sqlx_load(
    backend: diesel_runsync::Backend,
    url: &str,
    rows: usize,
    clients: usize,
    duration: Duration,
    pool_size: u32,
) -> anyhow::Result<Load> {
    let pool = crate::sqlx_impl::AnyPool::open(backend, url, pool_size).await?;
    let started = Instant::now();
    let unit_pool = pool.clone();
    let records = drive(rows, clients, duration, move |id| {
        let pool = unit_pool.clone();
        async move { pool.unit(id).await }
    })
    .await;
    let elapsed = started.elapsed();
    let connections = pool.size();
    pool.close().await;
    Ok(collect(records, elapsed, connections))
}

/// A blocking pool for [`sync_threads_load`]: a stack of connections behind
/// a mutex, threads waiting on a condition variable when it is empty.
struct BlockingPool {
    idle: Mutex<Vec<AnyConnection>>,
    returned: Condvar,
}

impl BlockingPool {
    fn get(&self) -> AnyConnection {
        let mut idle = self.idle.lock().expect("pool mutex");
        loop {
            if let Some(conn) = idle.pop() {
                return conn;
            }
            idle = self.returned.wait(idle).expect("pool mutex");
        }
    }

    fn put(&self, conn: AnyConnection) {
        self.idle.lock().expect("pool mutex").push(conn);
        self.returned.notify_one();
    }
}

/// One unit on a raw connection: BEGIN (IMMEDIATE on SQLite), `unit`,
/// COMMIT (ROLLBACK on an error).
pub fn sync_unit<C: PoolableConnection>(
    conn: &mut C,
    id: i32,
    unit: fn(&mut C, i32) -> diesel::QueryResult<()>,
) -> diesel::QueryResult<()> {
    conn.begin_outer_transaction()?;
    match unit(conn, id) {
        Ok(()) => <C as diesel::Connection>::TransactionManager::commit_transaction(conn),
        Err(e) => {
            let _ = <C as diesel::Connection>::TransactionManager::rollback_transaction(conn);
            Err(e)
        }
    }
}

/// `pool_size` raw connections to `url`, opened before the clock starts.
fn open_raw(url: &str, pool_size: u32) -> anyhow::Result<Vec<AnyConnection>> {
    let url = DatabaseUrl::parse(url)?;
    (0..pool_size)
        .map(|_| Ok(<AnyConnection as PoolableConnection>::connect(&url)?))
        .collect()
}

/// Diagnostic (`--impls inline`): `clients` tokio tasks sharing `pool_size`
/// raw connections (a stack behind a mutex, a semaphore to wait on), each
/// unit run with `tokio::task::block_in_place` on the task's own worker
/// thread: the unit without a hop to the blocking pool and back. No
/// deadline, cancellation or panic containment: a measure of the hop, not
/// a design.
pub async fn inline_load(
    url: &str,
    rows: usize,
    clients: usize,
    duration: Duration,
    pool_size: u32,
) -> anyhow::Result<Load> {
    let conns = open_raw(url, pool_size)?;
    let idle = Arc::new(Mutex::new(conns));
    let free = Arc::new(tokio::sync::Semaphore::new(pool_size as usize));
    let started = Instant::now();
    let records = drive(rows, clients, duration, move |id| {
        let (idle, free) = (idle.clone(), free.clone());
        async move {
            let _permit = free.acquire().await.expect("never closed");
            let mut conn = idle
                .lock()
                .expect("pool mutex")
                .pop()
                .expect("a permit, a connection");
            let result = tokio::task::block_in_place(|| sync_unit(&mut conn, id, unit_of_work));
            idle.lock().expect("pool mutex").push(conn);
            result
        }
    })
    .await;
    Ok(collect(records, started.elapsed(), pool_size))
}

/// Diagnostic (`--impls drain`): `pool_size` OS threads, each owning one
/// raw connection, take units from one FIFO queue and run them back to
/// back; `clients` tokio tasks queue a unit and await its result. No
/// checkout and no hop per unit: a thread that finishes a unit takes the
/// next without sleeping while units wait, so a unit costs its round
/// trips and one wake-up of the task that queued it: what a design that
/// runs units on blocking connections reaches without a hand-over per
/// unit (no deadline, cancellation or panic containment: a measure, not
/// a design).
pub async fn drain_load(
    url: &str,
    rows: usize,
    clients: usize,
    duration: Duration,
    pool_size: u32,
) -> anyhow::Result<Load> {
    type Job = (i32, tokio::sync::oneshot::Sender<diesel::QueryResult<()>>);
    struct Queue {
        jobs: Mutex<(std::collections::VecDeque<Job>, bool)>,
        queued: Condvar,
    }
    let queue = Arc::new(Queue {
        jobs: Mutex::new((std::collections::VecDeque::new(), false)),
        queued: Condvar::new(),
    });
    let threads: Vec<_> = open_raw(url, pool_size)?
        .into_iter()
        .map(|mut conn| {
            let queue = queue.clone();
            std::thread::spawn(move || {
                loop {
                    let (id, reply) = {
                        let mut jobs = queue.jobs.lock().expect("queue mutex");
                        loop {
                            if let Some(job) = jobs.0.pop_front() {
                                break job;
                            }
                            if jobs.1 {
                                return;
                            }
                            jobs = queue.queued.wait(jobs).expect("queue mutex");
                        }
                    };
                    let _ = reply.send(sync_unit(&mut conn, id, unit_of_work));
                }
            })
        })
        .collect();
    let started = Instant::now();
    let unit_queue = queue.clone();
    let records = drive(rows, clients, duration, move |id| {
        let queue = unit_queue.clone();
        async move {
            let (reply, result) = tokio::sync::oneshot::channel();
            queue
                .jobs
                .lock()
                .expect("queue mutex")
                .0
                .push_back((id, reply));
            queue.queued.notify_one();
            result.await.expect("a drain thread panicked")
        }
    })
    .await;
    let elapsed = started.elapsed();
    queue.jobs.lock().expect("queue mutex").1 = true;
    queue.queued.notify_all();
    for thread in threads {
        thread.join().expect("a drain thread panicked");
    }
    Ok(collect(records, elapsed, pool_size))
}

/// Sync Diesel without tokio: `clients` OS threads sharing `pool_size` raw
/// connections (opened before the clock starts) through a blocking pool
/// (a mutex and a condition variable, as r2d2 does it), each running the
/// same units (BEGIN, the three statements, COMMIT).
pub fn sync_threads_load(
    url: &str,
    rows: usize,
    clients: usize,
    duration: Duration,
    pool_size: u32,
) -> anyhow::Result<Load> {
    let conns = open_raw(url, pool_size)?;
    let pool = Arc::new(BlockingPool {
        idle: Mutex::new(conns),
        returned: Condvar::new(),
    });
    let started = Instant::now();
    let deadline = started + duration;
    let threads: Vec<_> = (0..clients)
        .map(|client| {
            let pool = pool.clone();
            std::thread::spawn(move || {
                let mut rng = Rng::new(client as u64 + 1);
                let mut record = TaskRecord::new();
                while Instant::now() < deadline {
                    let id = rng.key(rows);
                    let t = Instant::now();
                    let mut conn = pool.get();
                    let result = sync_unit(&mut conn, id, unit_of_work);
                    pool.put(conn);
                    record.record(t, result);
                }
                record
            })
        })
        .collect();
    let mut records = Vec::with_capacity(clients);
    for thread in threads {
        records.push(
            thread
                .join()
                .map_err(|_| anyhow::anyhow!("a load thread panicked"))?,
        );
    }
    let elapsed = started.elapsed();
    Ok(collect(records, elapsed, pool_size))
}

/// pgbench's figures for the same unit of work.
pub struct PgbenchLoad {
    /// pgbench's own tps, without connection time.
    pub tps: f64,
    /// Per-transaction latencies from its `-l` log.
    pub latencies_us: Vec<f64>,
    /// Failed transactions, as pgbench reports them.
    pub failures: usize,
    /// Its connections (= its clients).
    pub clients: usize,
    /// The fewest transactions one client finished (from the log).
    pub min_units_per_client: usize,
    /// The command run.
    pub command: String,
}

/// The custom script: the same unit of work as the others', with prepared
/// statements (diesel and sqlx cache theirs too).
pub const PGBENCH_SCRIPT: &str = "\\set id random(1, :rows)
BEGIN;
SELECT id, data FROM a WHERE id = :id;
SELECT id, a_id, data FROM b WHERE a_id = :id;
UPDATE a SET data = 'c' WHERE id = :id;
COMMIT;
";

/// The floor's script: the lazy phase's child SELECT, one per transaction.
pub const PGBENCH_FLOOR_SCRIPT: &str = "\\set id random(1, :rows)
SELECT id, a_id, data FROM b WHERE a_id = :id;
";

/// Runs pgbench with `args` + the script `script` in a fresh directory;
/// `None` when there is no pgbench binary.
fn run_pgbench(
    pgbench: &str,
    tag: &str,
    script: &str,
    mut args: Vec<String>,
    url: &str,
) -> anyhow::Result<Option<(String, String, PathBuf)>> {
    let dir: PathBuf =
        std::env::temp_dir().join(format!("runsync-pgbench-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("script.sql"), script)?;
    args.extend(["-f".into(), "script.sql".into(), url.into()]);
    let command = format!("pgbench {}", args.join(" "));
    let output = match Command::new(pgbench).args(&args).current_dir(&dir).output() {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let _ = std::fs::remove_dir_all(&dir);
            return Ok(None);
        }
        Err(e) => return Err(e).with_context(|| format!("running {pgbench}")),
    };
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        let _ = std::fs::remove_dir_all(&dir);
        bail!(
            "pgbench failed: {command}\n{}{}",
            stdout,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(Some((command, stdout, dir)))
}

/// A number after `prefix` on a line of pgbench's output.
fn pgbench_figure(stdout: &str, prefix: &str) -> Option<f64> {
    stdout
        .lines()
        .find_map(|l| l.trim_start().strip_prefix(prefix))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
}

/// The MySQL/MariaDB floor: `tool` (bench/floor/mysql_floor.c, built by
/// bench/mysql_floor.sh) runs the lazy phase's child SELECT `count` times
/// on one connection of the C client library, prepared once, keys random
/// in 1..=rows. Returns its microseconds per statement and the command
/// (without the password, which it is given in `MYSQL_PWD`).
pub fn mysql_floor(
    tool: &str,
    url: &str,
    rows: usize,
    count: usize,
) -> anyhow::Result<(f64, String)> {
    let rest = url
        .strip_prefix("mysql://")
        .with_context(|| "the MySQL floor needs a mysql:// URL")?;
    let rest = rest.split('?').next().unwrap_or(rest);
    let (credentials, rest) = rest.rsplit_once('@').unwrap_or(("root", rest));
    let (user, password) = credentials.split_once(':').unwrap_or((credentials, ""));
    let (address, database) = rest
        .split_once('/')
        .with_context(|| "the MySQL floor's URL names no database")?;
    let (host, port) = address.split_once(':').unwrap_or((address, "3306"));
    let args = [
        host,
        port,
        user,
        database,
        &rows.to_string(),
        &count.to_string(),
    ]
    .map(String::from);
    let command = format!("{tool} {}", args.join(" "));
    let output = std::process::Command::new(tool)
        .args(&args)
        .env("MYSQL_PWD", password)
        .output()
        .with_context(|| format!("running {tool} (build it with bench/mysql_floor.sh)"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(
        output.status.success(),
        "{command} failed: {}{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    let us = stdout
        .split(", ")
        .find_map(|part| part.strip_suffix(" us per statement\n"))
        .and_then(|v| v.parse::<f64>().ok())
        .with_context(|| format!("no 'us per statement' in {tool}'s output: {stdout}"))?;
    Ok((us, command))
}

/// pgbench's single-client latency for the lazy phase's child SELECT
/// (`-M prepared`, keys random in 1..=rows, `transactions` of them):
/// the round-trip floor. `None` without a pgbench binary.
pub fn pgbench_floor(
    pgbench: &str,
    url: &str,
    rows: usize,
    transactions: usize,
) -> anyhow::Result<Option<(f64, String)>> {
    let args: Vec<String> = vec![
        "-n".into(),
        "-M".into(),
        "prepared".into(),
        "-c".into(),
        "1".into(),
        "-j".into(),
        "1".into(),
        "-t".into(),
        transactions.to_string(),
        "-D".into(),
        format!("rows={rows}"),
    ];
    let Some((command, stdout, dir)) =
        run_pgbench(pgbench, "floor", PGBENCH_FLOOR_SCRIPT, args, url)?
    else {
        return Ok(None);
    };
    let _ = std::fs::remove_dir_all(&dir);
    let ms = pgbench_figure(&stdout, "latency average = ")
        .with_context(|| format!("no latency average in pgbench's output: {stdout}"))?;
    Ok(Some((ms * 1000.0, command)))
}

/// Runs pgbench with `clients` connections for `duration` and reads its
/// `-l` log. `None` without a pgbench binary.
pub fn pgbench(
    pgbench: &str,
    url: &str,
    rows: usize,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<Option<PgbenchLoad>> {
    let args: Vec<String> = vec![
        "-n".into(),
        "-M".into(),
        "prepared".into(),
        "-c".into(),
        clients.to_string(),
        "-j".into(),
        clients.min(2).to_string(),
        "-T".into(),
        duration.as_secs().max(1).to_string(),
        "-D".into(),
        format!("rows={rows}"),
        "-l".into(),
        "--log-prefix=pgbench_log".into(),
    ];
    let Some((command, stdout, dir)) =
        run_pgbench(pgbench, &clients.to_string(), PGBENCH_SCRIPT, args, url)?
    else {
        return Ok(None);
    };
    let tps = pgbench_figure(&stdout, "tps = ")
        .with_context(|| format!("no tps in pgbench's output: {stdout}"))?;
    let failures =
        pgbench_figure(&stdout, "number of failed transactions: ").unwrap_or(0.0) as usize;
    let mut latencies_us = Vec::new();
    let mut per_client: std::collections::HashMap<usize, usize> = std::collections::HashMap::new();
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        let is_log = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("pgbench_log."));
        if !is_log {
            continue;
        }
        for line in std::fs::read_to_string(&path)?.lines() {
            // client_id transaction_no time_us script_no epoch epoch_us
            let mut fields = line.split_whitespace();
            if let Some(client) = fields.next().and_then(|v| v.parse().ok()) {
                *per_client.entry(client).or_default() += 1;
            }
            if let Some(us) = fields.nth(1).and_then(|v| v.parse().ok()) {
                latencies_us.push(us);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Some(PgbenchLoad {
        tps,
        latencies_us,
        failures,
        clients,
        min_units_per_client: (0..clients)
            .map(|c| per_client.get(&c).copied().unwrap_or(0))
            .min()
            .unwrap_or(0),
        command,
    }))
}
