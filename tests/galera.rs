//! MariaDB Galera Cluster (issue 11), and MySQL ids that come from what the
//! server did, not arithmetic.
//!
//! `ids_follow_auto_increment_settings::mysql`: a session whose
//! `auto_increment_increment` / `auto_increment_offset` are 3 / 2 (what
//! node 2 of a 3-node Galera Cluster uses) inserts the seed's and a
//! 2,500-parent workload's families: every returned id is a row of `a`
//! with that family's data and children.
//!
//! `galera_cluster::mysql`: one test that owns a throwaway 3-node cluster
//! (loopback, free ports, data in a temporary directory, nodes run as user
//! `mysql` with `innodb_autoinc_lock_mode = 2`; killed and removed when the
//! test ends, also on a panic) and runs, in order: the seed program on
//! node 2 (SPEC's output, ids stepping by 3); read-after-write from node 1
//! to node 2 with `SET SESSION wsrep_sync_wait = 1`; 3 x 8 tasks over the
//! three nodes bringing 32 counters to 100 each with
//! `transaction_with_retry` (sum exact on every node); the loser of a
//! conflict between nodes swallowing the 1213 of its next statement: its
//! `COMMIT` is refused with a retryable error, the winner's row stays;
//! units through all three nodes while node 3 is SIGKILLed, then restarted
//! from its recovered position (IST): no acknowledged unit lost, none
//! duplicated, none partial, every node with the same rows; one engine
//! over the three nodes (`mysql://root@h:p1,h:p2,h:p3/test`) spreading its
//! sessions, going on on nodes 1 and 2 when node 3 is SIGKILLed. It prints `FIGURE galera`
//! lines (cold start, conflicts, retries, stall after the kill, rejoin).
//!
//! Both are ignored like the other MySQL tests (`mysql` feature off, or
//! `MYSQL_DATABASE_URL` unset at build time). When the cluster test runs it
//! needs root, `mariadbd`, the `mariadb` client, galera-4, rsync and socat,
//! and fails saying so if one is missing. The cluster harness is
//! `runsync_testkit::galera` (`testkit/`), the contention workload
//! `bench/src/contention.rs`: both shared with `bench/src/bin/galera.rs`.

mod common;

use common::{TestDb, per_backend};
use diesel::connection::SimpleConnection;
use greenlet_orm::queries::{all_rows, insert_families, seed_families, workload_families};
use greenlet_orm::{AnyConnection, Family};

/// Inserts `families` and checks each returned id against the rows.
fn insert_and_check(conn: &mut AnyConnection, families: &[Family], step: i32, offset: i32) {
    let ids = insert_families(conn, families).unwrap();
    assert_eq!(ids.len(), families.len());
    let (parents, children) = all_rows(conn).unwrap();
    for (family, &id) in families.iter().zip(&ids) {
        assert_eq!(id.rem_euclid(step), offset % step, "id {id}");
        let parent = parents
            .iter()
            .find(|p| p.id == id)
            .unwrap_or_else(|| panic!("id {id} is not a row of a"));
        assert_eq!(parent.data, family.data, "id {id}");
        let mine: Vec<_> = children
            .iter()
            .filter(|c| c.a_id == id)
            .map(|c| c.data.clone())
            .collect();
        assert_eq!(mine, family.children, "children of {id}");
    }
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), ids.len(), "ids are distinct");
}

per_backend!(ids_follow_auto_increment_settings, sync, [mysql]);
fn ids_follow_auto_increment_settings(db: TestDb) {
    let mut conn = db.connect();
    greenlet_orm::migrations::create_all(&mut conn).unwrap();
    conn.batch_execute("SET SESSION auto_increment_increment = 3, auto_increment_offset = 2")
        .unwrap();
    insert_and_check(&mut conn, &seed_families(), 3, 2);
    let (parents, _) = all_rows(&mut conn).unwrap();
    let seed_ids: Vec<i32> = parents.iter().map(|p| p.id).collect();
    assert_eq!(seed_ids, [2, 5, 8], "the seed's ids on a fresh table");
    insert_and_check(&mut conn, &workload_families(2_500), 3, 2);
}

/// The contention workload, one copy for this test and the benchmark.
#[cfg(feature = "mysql")]
#[path = "../bench/src/contention.rs"]
mod contention;

/// A throwaway 3-node MariaDB Galera Cluster on loopback
/// (`runsync_testkit::galera`), and the scenarios run on it, all in one
/// test that owns the cluster (started once, stopped when the test ends,
/// also when it panics): `galera_cluster::mysql`.
#[cfg(feature = "mysql")]
mod cluster {
    use super::contention;
    use std::collections::HashMap;
    use std::io::Write;
    use std::process::Command;
    use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use diesel::connection::SimpleConnection;
    use diesel::prelude::*;
    use diesel::sql_types::{BigInt, Integer, Text};
    use diesel_runsync::{Engine, EngineOptions, RetryPolicy};
    use greenlet_orm::AnyConnection;
    use greenlet_orm::queries::insert_families;

    use runsync_testkit::galera::Cluster;

    /// Diesel connections to the nodes of the shared harness's [`Cluster`].
    trait Connect {
        /// Node `i`, connected to `database`.
        fn connect(&self, i: usize, database: &str) -> MysqlConnection;
    }

    impl Connect for Cluster {
        fn connect(&self, i: usize, database: &str) -> MysqlConnection {
            MysqlConnection::establish(&self.url(i, database))
                .unwrap_or_else(|e| panic!("node {}: {e}", i + 1))
        }
    }

    #[derive(QueryableByName)]
    struct Value {
        #[diesel(sql_type = Text)]
        value: String,
    }

    fn figure(line: String) {
        let _ = writeln!(std::io::stderr(), "FIGURE galera {line}");
    }

    /// The seed program on node 2: SPEC's output, ids apart; ids step by the
    /// cluster size (3) with one offset, and children point at their parents.
    fn seed_program(cluster: &Cluster) {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_greenlet-orm"))
            .current_dir(dir.path())
            .env("DATABASE_URL", cluster.url(1, "test"))
            .env_remove("RUST_LOG")
            .env_remove("RUNSYNC_ECHO")
            .output()
            .expect("the program runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "the program on node 2: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut a_ids: Vec<i64> = Vec::new();
        let mut b_ids: Vec<i64> = Vec::new();
        let mut normalised = String::new();
        for line in stdout.lines() {
            let num = |key: &str| -> i64 {
                let rest = &line[line.find(key).unwrap() + key.len()..];
                rest[..rest.find([',', ')']).unwrap()].parse().unwrap()
            };
            if line.starts_with("A(") {
                a_ids.push(num("id="));
                let rest = &line[line.find(", ").unwrap()..];
                normalised.push_str(&format!("A(id={}{rest}\n", a_ids.len()));
            } else {
                b_ids.push(num("(id="));
                let parent = a_ids.iter().position(|&id| id == num("a_id=")).unwrap() + 1;
                let rest = &line[line.find(", data").unwrap()..];
                normalised.push_str(&format!("B(id={}, a_id={parent}{rest}\n", b_ids.len()));
            }
        }
        assert_eq!(
            normalised,
            crate::common::SEED_OUTPUT,
            "output on node 2:\n{stdout}"
        );
        for ids in [&a_ids, &b_ids] {
            assert!(
                ids.windows(2).all(|w| w[1] - w[0] == 3),
                "ids step by the cluster size: {stdout}"
            );
        }
        figure(format!(
            "seed_program_node2 a_ids={a_ids:?} b_ids={b_ids:?}"
        ));
    }

    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }

    /// Rows written through node 1 are read at once on node 2: always with
    /// `wsrep_sync_wait = 1`; how often without it is reported.
    fn read_after_write(cluster: &Cluster) {
        let mut writer = cluster.connect(0, "test");
        writer
            .batch_execute("CREATE TABLE raw_t (id INT PRIMARY KEY, v INT NOT NULL)")
            .unwrap();
        let mut reader = cluster.connect(1, "test");
        let mut stale_without = 0;
        const ROUNDS: i32 = 300;
        for round in 0..ROUNDS {
            let sync = round % 2 == 0;
            reader
                .batch_execute(&format!(
                    "SET SESSION wsrep_sync_wait = {}",
                    if sync { 1 } else { 0 }
                ))
                .unwrap();
            diesel::sql_query("INSERT INTO raw_t VALUES (?, 1)")
                .bind::<Integer, _>(round)
                .execute(&mut writer)
                .unwrap();
            let seen =
                diesel::sql_query("SELECT CAST(count(*) AS SIGNED) AS n FROM raw_t WHERE id = ?")
                    .bind::<Integer, _>(round)
                    .get_result::<Count>(&mut reader)
                    .unwrap()
                    .n;
            if sync {
                assert_eq!(
                    seen, 1,
                    "round {round}: node 2 missed node 1's commit with wsrep_sync_wait = 1"
                );
            } else if seen == 0 {
                stale_without += 1;
            }
        }
        figure(format!(
            "read_after_write rounds={ROUNDS} stale_with_sync_wait=0 stale_without={stale_without}/{}",
            ROUNDS / 2
        ));
    }

    fn engines(rt: &tokio::runtime::Runtime, cluster: &Cluster) -> Vec<Engine<AnyConnection>> {
        (0..3)
            .map(|i| {
                rt.block_on(Engine::connect(
                    &cluster.url(i, "test"),
                    EngineOptions::default()
                        .max_size(8)
                        .connection_timeout(Duration::from_secs(2)),
                ))
                .unwrap()
            })
            .collect()
    }

    /// 3 x 8 tasks, one engine per node, bring 32 shared counters to 100
    /// each with read-modify-write transactions under `transaction_with_retry`
    /// (the workload of `bench/src/contention.rs`, shared with the benchmark).
    fn contention(rt: &tokio::runtime::Runtime, cluster: &Cluster) {
        const COUNTERS: usize = 32;
        const EACH: usize = 100;
        contention::create_counters(&mut cluster.connect(0, "test"), COUNTERS).unwrap();
        let before: Vec<contention::Conflicts> = (0..3)
            .map(|i| contention::Conflicts::read(&mut cluster.connect(i, "mysql")).unwrap())
            .collect();
        let engines = engines(rt, cluster);
        let outcome = rt
            .block_on(contention::run(&engines, 8, COUNTERS, EACH))
            .unwrap_or_else(|e| panic!("contention: {e}"));
        assert_eq!(outcome.units, COUNTERS * EACH);
        for i in 0..3 {
            let mut conn = cluster.connect(i, "test");
            conn.batch_execute("SET SESSION wsrep_sync_wait = 1")
                .unwrap();
            contention::check(&mut conn, COUNTERS, EACH)
                .unwrap_or_else(|e| panic!("node {}: {e}", i + 1));
        }
        let conflicts: Vec<String> = (0..3)
            .map(|i| {
                let d = contention::Conflicts::read(&mut cluster.connect(i, "mysql"))
                    .unwrap()
                    .since(before[i]);
                format!("{}+{}", d.cert_failures, d.bf_aborts)
            })
            .collect();
        figure(format!(
            "contention tasks=24 counters={COUNTERS} increments={} sum_exact=true retries={} \
             (statement_errors={}) cert_failures+bf_aborts_per_node={conflicts:?} seconds={:.2}",
            outcome.units,
            outcome.retries,
            outcome.statement_errors,
            outcome.elapsed.as_secs_f64()
        ));
    }

    /// One unit: a parent tagged `tag` and its two children, in one
    /// transaction (retried on conflicts).
    async fn unit(engine: &Engine<AnyConnection>, tag: String) -> Result<u32, String> {
        let policy = RetryPolicy::default()
            .max_attempts(20)
            .base_delay(Duration::from_millis(2))
            .max_delay(Duration::from_millis(50));
        engine
            .transaction_with_retry(&policy, move |c: &mut AnyConnection| {
                let family = greenlet_orm::Family {
                    data: Some(tag.clone()),
                    children: vec![None, None],
                };
                insert_families(c, &[family]).map(|_| ())
            })
            .await
            .map(|r| r.attempts)
            .map_err(|e| e.to_string())
    }

    /// Units go through all three nodes; node 3 is SIGKILLed mid-load: the
    /// others go on, node 3 rejoins by IST, and every node holds exactly
    /// the acknowledged units (no loss, no duplicate, no partial unit).
    fn kill_and_rejoin(rt: &tokio::runtime::Runtime, cluster: &mut Cluster) {
        // The seed's rows (a2 has one child) out of the way.
        cluster
            .connect(0, "test")
            .batch_execute("DELETE FROM b; DELETE FROM a")
            .unwrap();
        let engines = engines(rt, cluster);
        let stop = Arc::new(AtomicBool::new(false));
        let acked: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
        let failed = Arc::new(AtomicUsize::new(0));
        let retries = Arc::new(AtomicU32::new(0));
        let tasks: Vec<_> = engines
            .iter()
            .enumerate()
            .flat_map(|(node, engine)| (0..4).map(move |t| (node, t, engine.clone())))
            .map(|(node, t, engine)| {
                let (stop, acked, failed, retries) =
                    (stop.clone(), acked.clone(), failed.clone(), retries.clone());
                rt.spawn(async move {
                    let mut seq = 0;
                    while !stop.load(Ordering::Relaxed) {
                        seq += 1;
                        let tag = format!("n{node}t{t}s{seq}");
                        match unit(&engine, tag.clone()).await {
                            Ok(attempts) => {
                                retries.fetch_add(attempts - 1, Ordering::Relaxed);
                                acked.lock().unwrap().push((tag, Instant::now()));
                            }
                            Err(_) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(1500));
        let before = acked.lock().unwrap().len();
        let killed_at = Instant::now();
        cluster.kill(2);
        cluster.wait_synced(0, 2);
        let shrunk = killed_at.elapsed();
        std::thread::sleep(Duration::from_millis(1000));
        let log_path = cluster.log_path(2);
        let log_before = std::fs::read_to_string(&log_path).unwrap_or_default().len();
        let rejoin_started = Instant::now();
        cluster.restart(2);
        cluster.wait_synced(2, 3);
        let rejoined = rejoin_started.elapsed();
        let log = std::fs::read_to_string(&log_path).unwrap();
        let rejoin_log = &log[log_before..];
        assert!(
            rejoin_log.contains("IST received") && !rejoin_log.contains("SST completed"),
            "node 3 rejoined without IST (or with a full state transfer):\n{rejoin_log}"
        );
        std::thread::sleep(Duration::from_millis(1500));
        stop.store(true, Ordering::Relaxed);
        rt.block_on(async {
            for t in tasks {
                t.await.unwrap();
            }
        });
        let ist_writesets = rejoin_log
            .split("Receiving IST: ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .unwrap_or("?")
            .to_owned();
        let acked = acked.lock().unwrap().clone();
        let resumed = longest_gap_after(&acked, killed_at);
        let mut per_node = Vec::new();
        for i in 0..3 {
            let mut conn = synced_connection(cluster, i);
            let counts = unit_tags(&mut conn, "SELECT data FROM a");
            let duplicated = counts.values().filter(|&&n| n > 1).count();
            let lost = acked
                .iter()
                .filter(|(tag, _)| !counts.contains_key(tag))
                .count();
            let partial = diesel::sql_query(
                "SELECT CAST(count(*) AS SIGNED) AS n FROM a WHERE \
                 (SELECT count(*) FROM b WHERE b.a_id = a.id) <> 2",
            )
            .get_result::<Count>(&mut conn)
            .unwrap()
            .n;
            assert_eq!(duplicated, 0, "node {}: duplicated units", i + 1);
            assert_eq!(lost, 0, "node {}: acknowledged units missing", i + 1);
            assert_eq!(partial, 0, "node {}: partial units", i + 1);
            per_node.push(counts.len());
        }
        assert!(
            per_node.windows(2).all(|w| w[0] == w[1]),
            "nodes disagree: {per_node:?}"
        );
        assert!(acked.len() > before, "no unit committed after the kill");
        figure(format!(
            "kill_and_rejoin units_acked={} units_failed={} retries={} rows_per_node={per_node:?} \
             survivors_saw_2_members_after_s={:.2} longest_commit_gap_after_kill_s={:.2} \
             rejoin_ist_s={:.2} ist_writesets={ist_writesets}",
            acked.len(),
            failed.load(Ordering::Relaxed),
            retries.load(Ordering::Relaxed),
            shrunk.as_secs_f64(),
            resumed.as_secs_f64(),
            rejoined.as_secs_f64()
        ));
    }

    /// An engine over `url` (every node), checkouts waiting at most 5 s.
    fn engine_over(
        rt: &tokio::runtime::Runtime,
        url: &str,
        options: EngineOptions,
    ) -> Engine<AnyConnection> {
        rt.block_on(Engine::connect(
            url,
            options.connection_timeout(Duration::from_secs(5)),
        ))
        .unwrap()
    }

    /// The nodes that `sessions` sessions of `engine`, all open at once, run on.
    async fn nodes_of_sessions(engine: &Engine<AnyConnection>, sessions: usize) -> Vec<String> {
        let mut held = Vec::new();
        let mut names = Vec::new();
        for _ in 0..sessions {
            let mut session = engine.begin().await.unwrap();
            let name = session
                .run_sync(|c: &mut AnyConnection| {
                    diesel::sql_query("SELECT @@wsrep_node_name AS value").get_result::<Value>(c)
                })
                .await
                .unwrap()
                .value;
            names.push(name);
            held.push(session);
        }
        for mut session in held {
            session.rollback().await.unwrap();
        }
        names.sort();
        names.dedup();
        names
    }

    /// The longest wait for a commit after `killed_at`: from the kill to
    /// the first acknowledged unit, or between two of them.
    fn longest_gap_after(acked: &[(String, Instant)], killed_at: Instant) -> Duration {
        let after_kill: Vec<Instant> = acked
            .iter()
            .map(|(_, at)| *at)
            .filter(|at| *at > killed_at)
            .collect();
        after_kill
            .windows(2)
            .map(|w| w[1] - w[0])
            .chain(after_kill.first().map(|first| *first - killed_at))
            .max()
            .unwrap_or(Duration::MAX)
    }

    /// A connection to node `i` whose reads wait until every write set
    /// committed in the cluster is applied there (`wsrep_sync_wait = 1`).
    fn synced_connection(cluster: &Cluster, i: usize) -> MysqlConnection {
        let mut conn = cluster.connect(i, "test");
        conn.batch_execute("SET SESSION wsrep_sync_wait = 1")
            .unwrap();
        conn
    }

    /// How many rows of `a` that `sql` selects carry each unit's tag.
    fn unit_tags(conn: &mut MysqlConnection, sql: &str) -> HashMap<String, usize> {
        #[derive(QueryableByName)]
        struct Tag {
            #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
            data: Option<String>,
        }
        let tags: Vec<Tag> = diesel::sql_query(sql).load(conn).unwrap();
        let mut counts: HashMap<String, usize> = HashMap::new();
        for tag in tags.into_iter().filter_map(|t| t.data) {
            *counts.entry(tag).or_default() += 1;
        }
        counts
    }

    /// One engine over the three nodes (`mysql://root@h:p1,h:p2,h:p3/test`):
    /// its connections spread over every node; node 3 SIGKILLed under load:
    /// the engine's units go on, on nodes 1 and 2, and none is lost.
    fn multi_host(rt: &tokio::runtime::Runtime, cluster: &mut Cluster) {
        let url = cluster.multi_host_url("test");
        let engine = engine_over(rt, &url, EngineOptions::default().max_size(6));
        let spread = rt.block_on(nodes_of_sessions(&engine, 6));
        assert_eq!(
            spread,
            ["node1", "node2", "node3"],
            "6 sessions over 3 nodes"
        );
        let stop = Arc::new(AtomicBool::new(false));
        let acked: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
        let failed: Arc<Mutex<Vec<Instant>>> = Arc::default();
        let tasks: Vec<_> = (0..6)
            .map(|t| {
                let (engine, stop, acked, failed) =
                    (engine.clone(), stop.clone(), acked.clone(), failed.clone());
                rt.spawn(async move {
                    let mut seq = 0;
                    while !stop.load(Ordering::Relaxed) {
                        seq += 1;
                        let tag = format!("m{t}s{seq}");
                        match unit(&engine, tag.clone()).await {
                            Ok(_) => acked.lock().unwrap().push((tag, Instant::now())),
                            Err(_) => {
                                failed.lock().unwrap().push(Instant::now());
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        }
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(1000));
        let killed_at = Instant::now();
        cluster.kill(2);
        cluster.wait_synced(0, 2);
        let shrunk = killed_at.elapsed();
        let settled = Instant::now();
        std::thread::sleep(Duration::from_millis(2000));
        stop.store(true, Ordering::Relaxed);
        rt.block_on(async {
            for t in tasks {
                t.await.unwrap();
            }
        });
        let after = rt.block_on(nodes_of_sessions(&engine, 6));
        assert_eq!(
            after,
            ["node1", "node2"],
            "new connections on the live nodes"
        );
        let acked = acked.lock().unwrap().clone();
        let failed = failed.lock().unwrap().clone();
        let late_failures = failed.iter().filter(|at| **at > settled).count();
        let after_settled = acked.iter().filter(|(_, at)| *at > settled).count();
        assert!(after_settled > 0, "no unit committed once node 3 was gone");
        assert_eq!(
            late_failures, 0,
            "units failed after the survivors saw 2 members"
        );
        let longest_gap = longest_gap_after(&acked, killed_at);
        for i in 0..2 {
            let counts = unit_tags(
                &mut synced_connection(cluster, i),
                "SELECT data FROM a WHERE data LIKE 'm%'",
            );
            assert!(
                counts.values().all(|&n| n == 1),
                "node {}: duplicates",
                i + 1
            );
            let lost = acked
                .iter()
                .filter(|(t, _)| !counts.contains_key(t))
                .count();
            assert_eq!(lost, 0, "node {}: acknowledged units missing", i + 1);
        }
        figure(format!(
            "multi_host spread_before={spread:?} spread_after={after:?} units_acked={} \
             units_failed={} survivors_saw_2_members_after_s={:.2} \
             longest_commit_gap_after_kill_s={:.2} failures_after_settled={late_failures}",
            acked.len(),
            failed.len(),
            shrunk.as_secs_f64(),
            longest_gap.as_secs_f64()
        ));
    }

    /// The loser of a conflict between nodes, whose closure swallows the
    /// 1213 its next statement gets (after which the server's `COMMIT`
    /// would return OK having done nothing), is not reported committed.
    fn swallowed_conflict(rt: &tokio::runtime::Runtime, cluster: &Cluster) {
        let engines = engines(rt, cluster);
        rt.block_on(async {
            let (on1, on2) = (&engines[0], &engines[1]);
            on1.transaction(|c: &mut AnyConnection| {
                diesel::sql_query("CREATE TABLE duel (id INT PRIMARY KEY, who TEXT)").execute(c)?;
                diesel::sql_query("INSERT INTO duel VALUES (1, 'nobody')").execute(c)
            })
            .await
            .unwrap();
            let mut loser = on2.begin().await.unwrap();
            loser
                .run_sync(|c: &mut AnyConnection| {
                    c.batch_execute("SET SESSION wsrep_sync_wait = 1")?;
                    diesel::sql_query("UPDATE duel SET who = 'node2' WHERE id = 1").execute(c)
                })
                .await
                .unwrap();
            on1.transaction(|c: &mut AnyConnection| {
                diesel::sql_query("UPDATE duel SET who = 'node1' WHERE id = 1").execute(c)
            })
            .await
            .unwrap();
            // Node 2 applying node 1's write set aborts the loser: once a
            // causal read there sees node 1's value, that has happened.
            let url = cluster.url(1, "test");
            crate::common::blocking(move || {
                let mut conn = MysqlConnection::establish(&url).unwrap();
                conn.batch_execute("SET SESSION wsrep_sync_wait = 1")
                    .unwrap();
                let who = diesel::sql_query("SELECT who AS value FROM duel WHERE id = 1")
                    .get_result::<Value>(&mut conn)
                    .unwrap()
                    .value;
                assert_eq!(who, "node1");
            })
            .await;
            let swallowed = loser
                .run_sync(|c: &mut AnyConnection| {
                    let next = diesel::sql_query("SELECT 1").execute(c);
                    Ok::<_, diesel_runsync::Error>(next.err().map(|e| e.to_string()))
                })
                .await
                .unwrap();
            let swallowed = swallowed.expect("the loser's next statement fails");
            assert!(swallowed.contains("Deadlock"), "{swallowed}");
            let e = loser
                .commit()
                .await
                .expect_err("the loser's COMMIT must not succeed");
            assert!(diesel_runsync::Retryable::is_retryable(&e), "{e}");
            figure(format!("swallowed_conflict loser_commit_error={e:?}"));
        });
        let mut conn = cluster.connect(1, "test");
        conn.batch_execute("SET SESSION wsrep_sync_wait = 1")
            .unwrap();
        let who = diesel::sql_query("SELECT who AS value FROM duel WHERE id = 1")
            .get_result::<Value>(&mut conn)
            .unwrap()
            .value;
        assert_eq!(who, "node1");
    }

    /// A node cut off from the others (`gmcast.isolate=1`: outside the
    /// primary component, `wsrep_ready = OFF`) still accepts connections;
    /// an engine over the three nodes opens none there. A connection that
    /// was already pooled on it fails once with 1047 and is retired, not
    /// handed out again. The node is then killed and rejoins by IST.
    fn not_ready_node_skipped(rt: &tokio::runtime::Runtime, cluster: &mut Cluster) {
        let url = cluster.multi_host_url("test");
        // Three pooled connections, one per node, opened before the
        // isolation; never pinged on checkout, so only the engine's
        // retirement rule can keep node 3's out of later sessions.
        let pooled = engine_over(
            rt,
            &url,
            EngineOptions::default()
                .max_size(3)
                .ping_after(Duration::from_secs(3600)),
        );
        let before = rt.block_on(nodes_of_sessions(&pooled, 3));
        assert_eq!(before, ["node1", "node2", "node3"]);
        cluster
            .connect(2, "mysql")
            .batch_execute("SET GLOBAL wsrep_provider_options = 'gmcast.isolate=1'")
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let size = cluster.status(0, "wsrep_cluster_size");
            let ready = cluster.status(2, "wsrep_ready");
            if size.as_deref() == Some("2") && ready.as_deref() == Some("OFF") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node 3 never left: {size:?} {ready:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // The pooled connections, all in use at once: node 3's fails with
        // 1047 (its node does not serve).
        let not_ready = rt.block_on(async {
            let mut held = Vec::new();
            let mut failures = Vec::new();
            for _ in 0..3 {
                let mut session = pooled.session();
                let named = session
                    .run_sync(|c: &mut AnyConnection| {
                        diesel::sql_query("SELECT @@wsrep_node_name AS value")
                            .get_result::<Value>(c)
                    })
                    .await;
                match named {
                    Ok(_) => held.push(session),
                    Err(e) => {
                        failures.push(e.to_string());
                        let _ = session.rollback().await;
                    }
                }
            }
            for mut session in held {
                session.rollback().await.unwrap();
            }
            failures
        });
        assert_eq!(not_ready.len(), 1, "{not_ready:?}");
        assert!(
            not_ready[0].contains("WSREP has not yet prepared node"),
            "{not_ready:?}"
        );
        // Retired: the pool opens a replacement on a ready node, and every
        // later session works (without the rule, node 3's connection would
        // come back and fail again).
        let after = rt.block_on(nodes_of_sessions(&pooled, 3));
        assert_eq!(after, ["node1", "node2"], "after the 1047");
        drop(pooled);
        let engine = engine_over(rt, &url, EngineOptions::default().max_size(6));
        let spread = rt.block_on(nodes_of_sessions(&engine, 6));
        assert_eq!(
            spread,
            ["node1", "node2"],
            "no session on the isolated node"
        );
        drop(engine);
        cluster.kill(2);
        cluster.restart(2);
        cluster.wait_synced(2, 3);
        figure(format!(
            "not_ready_node_skipped spread={spread:?} pooled_before={before:?} \
             failed_once_with_1047={not_ready:?} pooled_after={after:?}"
        ));
    }

    pub fn scenarios() {
        let cold = Instant::now();
        let mut cluster = Cluster::start();
        figure(format!(
            "cold_start_3_nodes_s={:.2}",
            cold.elapsed().as_secs_f64()
        ));
        seed_program(&cluster);
        read_after_write(&cluster);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        contention(&rt, &cluster);
        swallowed_conflict(&rt, &cluster);
        kill_and_rejoin(&rt, &mut cluster);
        not_ready_node_skipped(&rt, &mut cluster);
        multi_host(&rt, &mut cluster);
        drop(rt);
        drop(cluster);
    }
}

/// Every Galera scenario on one throwaway cluster (see [`cluster`]).
/// Ignored like the other MySQL tests; when it runs it needs root,
/// `mariadbd`, the `mariadb` client, galera-4, rsync and socat, and fails saying so if one is missing.
mod galera_cluster {
    #[test]
    #[cfg_attr(
        not(feature = "mysql"),
        ignore = "built without the `mysql` feature (cargo test --features mysql)"
    )]
    #[cfg_attr(
        all(feature = "mysql", runsync_skip_mysql),
        ignore = "MYSQL_DATABASE_URL is not set (MySQL tests are off)"
    )]
    fn mysql() {
        #[cfg(feature = "mysql")]
        super::cluster::scenarios();
    }
}
