//! Micro figures (one round trip through the facade) and concurrency
//! (C tasks of short transactions through sessions, beside `pgbench`).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use diesel::connection::TransactionManager;
use diesel_runsync::{DatabaseUrl, Engine, EngineOptions, Error, PoolableConnection};
use greenlet_orm::AnyConnection;

use crate::Rng;
use crate::sync_impls::{select_by_key, select_update};

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

/// What one concurrency level gave.
pub struct Load {
    /// Transactions committed.
    pub transactions: usize,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// Each transaction's latency, checkout wait included.
    pub latencies: Vec<Duration>,
}

/// `clients` tasks, each running `SELECT a by key; UPDATE it` transactions
/// through `Engine::transaction` (one hop each) on one engine (pool of
/// `pool_size`) for `duration`.
pub async fn facade_load(
    url: &str,
    rows: usize,
    clients: usize,
    duration: Duration,
    pool_size: u32,
) -> anyhow::Result<Load> {
    let engine =
        Engine::<AnyConnection>::connect(url, EngineOptions::default().max_size(pool_size)).await?;
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
    let deadline = started + duration;
    let mut tasks = Vec::with_capacity(clients);
    for client in 0..clients {
        let engine = engine.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(client as u64 + 1);
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let id = rng.key(rows);
                let t = Instant::now();
                // One hop: BEGIN, SELECT, UPDATE, COMMIT.
                engine
                    .transaction(move |conn| select_update(conn, id))
                    .await?;
                latencies.push(t.elapsed());
            }
            Ok::<_, diesel::result::Error>(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    let elapsed = started.elapsed();
    Ok(Load {
        transactions: latencies.len(),
        elapsed,
        latencies,
    })
}

/// pgbench's figures for the same transaction.
pub struct PgbenchLoad {
    /// pgbench's own tps, without connection time.
    pub tps: f64,
    /// Per-transaction latencies from its `-l` log.
    pub latencies_us: Vec<f64>,
    /// The command run.
    pub command: String,
}

/// The custom script: the same transaction as [`facade_load`]'s, with
/// prepared statements (diesel caches them too).
pub const PGBENCH_SCRIPT: &str = "\\set id random(1, :rows)
BEGIN;
SELECT id, data FROM a WHERE id = :id;
UPDATE a SET data = 'c' WHERE id = :id;
COMMIT;
";

/// Runs pgbench with `clients` connections for `duration` and reads its log.
/// The floor of any thread-per-connection design: `clients` OS threads,
/// each with its own raw connection (opened before the clock starts), running
/// the same transactions (BEGIN, SELECT, UPDATE, COMMIT) for `duration`; no
/// tokio, no pool.
pub fn sync_threads_load(
    url: &str,
    rows: usize,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<Load> {
    let url = DatabaseUrl::parse(url)?;
    let mut conns = Vec::with_capacity(clients);
    for _ in 0..clients {
        conns.push(<AnyConnection as PoolableConnection>::connect(&url)?);
    }
    let started = Instant::now();
    let deadline = started + duration;
    let threads: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(client, mut conn)| {
            std::thread::spawn(move || -> anyhow::Result<Vec<Duration>> {
                let mut rng = Rng::new(client as u64 + 1);
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    let id = rng.key(rows);
                    let t = Instant::now();
                    conn.begin_outer_transaction()?;
                    select_update(&mut conn, id)?;
                    <AnyConnection as diesel::Connection>::TransactionManager::commit_transaction(
                        &mut conn,
                    )?;
                    latencies.push(t.elapsed());
                }
                Ok(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for thread in threads {
        latencies.extend(
            thread
                .join()
                .map_err(|_| anyhow::anyhow!("a load thread panicked"))??,
        );
    }
    Ok(Load {
        transactions: latencies.len(),
        elapsed: started.elapsed(),
        latencies,
    })
}

pub fn pgbench(
    pgbench: &str,
    url: &str,
    rows: usize,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<PgbenchLoad> {
    let dir: PathBuf =
        std::env::temp_dir().join(format!("runsync-pgbench-{}-{clients}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let script = dir.join("select_update.sql");
    std::fs::write(&script, PGBENCH_SCRIPT)?;
    let threads = clients.min(2);
    let args: Vec<String> = vec![
        "-n".into(),
        "-M".into(),
        "prepared".into(),
        "-c".into(),
        clients.to_string(),
        "-j".into(),
        threads.to_string(),
        "-T".into(),
        duration.as_secs().max(1).to_string(),
        "-D".into(),
        format!("rows={rows}"),
        "-f".into(),
        "select_update.sql".into(),
        "-l".into(),
        "--log-prefix=pgbench_log".into(),
        url.into(),
    ];
    let command = format!("pgbench {}", args.join(" "));
    let output = Command::new(pgbench)
        .args(&args)
        .current_dir(&dir)
        .output()
        .with_context(|| format!("running {pgbench}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "pgbench failed: {}{}",
            stdout,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let tps = stdout
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l["tps = ".len()..].split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .with_context(|| format!("no tps in pgbench's output: {stdout}"))?;
    let mut latencies_us = Vec::new();
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
            if let Some(us) = line.split_whitespace().nth(2).and_then(|v| v.parse().ok()) {
                latencies_us.push(us);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(PgbenchLoad {
        tps,
        latencies_us,
        command,
    })
}
