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
//! needs root, `mariadbd`, galera-4, rsync and socat, and fails saying so
//! if one is missing.

mod common;

use common::{TestDb, per_backend};
use diesel::connection::SimpleConnection;
use greenlet_orm::queries::{all_rows, insert_families, seed_families, workload_families};
use greenlet_orm::{AnyConnection, Family};

/// What SPEC.md says the program prints.
#[cfg(feature = "mysql")]
const SEED_OUTPUT: &str = "\
A(id=1, data='a1')
B(id=1, a_id=1, data=None)
B(id=2, a_id=1, data=None)
A(id=2, data='a2')
B(id=3, a_id=2, data=None)
A(id=3, data='a3')
B(id=4, a_id=3, data=None)
B(id=5, a_id=3, data=None)
";

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

/// A throwaway 3-node MariaDB Galera Cluster on loopback, and the scenarios
/// run on it, all in one test that owns the cluster (started once, stopped
/// when the test ends, also when it panics): `galera_cluster::mysql`.
#[cfg(feature = "mysql")]
mod cluster {
    use std::collections::HashMap;
    use std::io::Write;
    use std::os::unix::process::CommandExt;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use diesel::connection::SimpleConnection;
    use diesel::prelude::*;
    use diesel::sql_types::{BigInt, Integer, Text};
    use diesel_runsync::{Engine, EngineOptions, RetryPolicy};
    use greenlet_orm::AnyConnection;
    use greenlet_orm::queries::insert_families;

    const PROVIDER: &str = "/usr/lib/galera/libgalera_smm.so";
    const MARIADBD: &str = "/usr/sbin/mariadbd";

    fn unavailable(why: &str) -> ! {
        panic!(
            "cannot start the Galera test cluster: {why} (needs root, mariadb-server, galera-4, \
             rsync and socat; `cargo test -- --skip galera_cluster` leaves it out)"
        )
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn output(cmd: &mut Command) -> String {
        let out = cmd.output().expect("the command starts");
        assert!(
            out.status.success(),
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn id_of(flag: &str) -> u32 {
        output(Command::new("id").args([flag, "mysql"]))
            .parse()
            .unwrap_or_else(|_| unavailable("no `mysql` system user"))
    }

    struct Node {
        number: usize,
        port: u16,
        dir: PathBuf,
        child: Option<Child>,
    }

    impl Node {
        fn cnf(&self) -> String {
            format!("--defaults-file={}", self.dir.join("my.cnf").display())
        }

        fn url(&self, database: &str) -> String {
            format!("mysql://root@127.0.0.1:{}/{database}", self.port)
        }
    }

    /// Three nodes; dropping it kills every server (and its state-transfer
    /// helpers: each node is a process group) and removes the data.
    pub struct Cluster {
        nodes: Vec<Node>,
        uid: u32,
        gid: u32,
        _dir: tempfile::TempDir,
    }

    impl Drop for Cluster {
        fn drop(&mut self) {
            for i in 0..self.nodes.len() {
                self.kill(i);
            }
        }
    }

    impl Cluster {
        /// Writes each node's `my.cnf`, initialises node 1, bootstraps it
        /// and joins the others one at a time (rsync state transfer).
        pub fn start() -> Cluster {
            if output(Command::new("id").arg("-u")) != "0" {
                unavailable("not running as root (the nodes run as user mysql)");
            }
            for path in [MARIADBD, PROVIDER, "/usr/bin/rsync", "/usr/bin/socat"] {
                if !Path::new(path).exists() {
                    unavailable(&format!("{path} not found"));
                }
            }
            let dir = tempfile::Builder::new()
                .prefix("rs-galera-")
                .tempdir_in("/tmp")
                .unwrap();
            let ports: Vec<[u16; 4]> = (0..3)
                .map(|_| [free_port(), free_port(), free_port(), free_port()])
                .collect();
            let gcomm: Vec<String> = ports
                .iter()
                .map(|p| format!("127.0.0.1:{}", p[1]))
                .collect();
            let mut nodes = Vec::new();
            for (i, [port, group, ist, sst]) in ports.iter().copied().enumerate() {
                let node_dir = dir.path().join(format!("node{}", i + 1));
                std::fs::create_dir(&node_dir).unwrap();
                std::fs::create_dir(node_dir.join("data")).unwrap();
                let d = node_dir.display();
                let cnf = format!(
                    "[mysqld]\n\
                     datadir={d}/data\nsocket={d}/mysqld.sock\npid-file={d}/mysqld.pid\n\
                     log-error={d}/error.log\nport={port}\nbind-address=127.0.0.1\n\
                     skip-grant-tables\nbinlog_format=ROW\ndefault_storage_engine=InnoDB\n\
                     innodb_autoinc_lock_mode=2\ninnodb_buffer_pool_size=64M\n\
                     innodb_flush_log_at_trx_commit=0\n\
                     wsrep_on=ON\nwsrep_provider={PROVIDER}\nwsrep_cluster_name=runsync_test\n\
                     wsrep_cluster_address=gcomm://{}\n\
                     wsrep_node_address=127.0.0.1:{group}\nwsrep_node_name=node{}\n\
                     wsrep_provider_options=\"gmcast.listen_addr=tcp://127.0.0.1:{group};\
                     ist.recv_addr=127.0.0.1:{ist};gcache.size=64M;\
                     evs.keepalive_period=PT0.5S;evs.suspect_timeout=PT2S;\
                     evs.inactive_timeout=PT3S;evs.install_timeout=PT3S\"\n\
                     wsrep_sst_method=rsync\nwsrep_sst_receive_address=127.0.0.1:{sst}\n\
                     [sst]\nsockopt=bind=127.0.0.1\n",
                    gcomm.join(","),
                    i + 1
                );
                std::fs::write(node_dir.join("my.cnf"), cnf).unwrap();
                nodes.push(Node {
                    number: i + 1,
                    port,
                    dir: node_dir,
                    child: None,
                });
            }
            output(
                Command::new("chown")
                    .args(["-R", "mysql:mysql"])
                    .arg(dir.path()),
            );
            output(
                Command::new("mariadb-install-db")
                    .arg(nodes[0].cnf())
                    .args(["--user=mysql", "--skip-test-db", "--wsrep-on=OFF"]),
            );
            let mut cluster = Cluster {
                nodes,
                uid: id_of("-u"),
                gid: id_of("-g"),
                _dir: dir,
            };
            cluster.spawn(0, &["--wsrep-new-cluster"]);
            cluster.wait_synced(0, 1);
            diesel::sql_query("CREATE DATABASE test")
                .execute(&mut cluster.connect(0, "mysql"))
                .unwrap();
            for i in 1..3 {
                cluster.spawn(i, &[]);
                cluster.wait_synced(i, i + 1);
            }
            cluster
        }

        fn spawn(&mut self, i: usize, extra: &[&str]) {
            let node = &mut self.nodes[i];
            let child = Command::new(MARIADBD)
                .arg(node.cnf())
                .args(extra)
                .uid(self.uid)
                .gid(self.gid)
                .process_group(0)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("mariadbd starts");
            node.child = Some(child);
        }

        /// SIGKILL to node `i`'s process group.
        pub fn kill(&mut self, i: usize) {
            if let Some(mut child) = self.nodes[i].child.take() {
                let _ = Command::new("kill")
                    .args(["-KILL", "--", &format!("-{}", child.id())])
                    .status();
                let _ = child.kill();
                let _ = child.wait();
            }
        }

        /// Restarts a killed node from its recovered position (IST).
        pub fn restart(&mut self, i: usize) {
            let node = &self.nodes[i];
            let log = node.dir.join("recover.log");
            let status = Command::new(MARIADBD)
                .arg(node.cnf())
                .arg("--wsrep-recover")
                .arg(format!("--log-error={}", log.display()))
                .uid(self.uid)
                .gid(self.gid)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .unwrap();
            assert!(status.success(), "mariadbd --wsrep-recover failed");
            let text = std::fs::read_to_string(&log).unwrap();
            let position = text
                .lines()
                .filter_map(|l| l.split("Recovered position: ").nth(1))
                .next_back()
                .unwrap_or_else(|| panic!("no recovered position in {text}"))
                .trim()
                .to_owned();
            self.spawn(i, &[&format!("--wsrep_start_position={position}")]);
        }

        pub fn url(&self, i: usize, database: &str) -> String {
            self.nodes[i].url(database)
        }

        pub fn connect(&self, i: usize, database: &str) -> MysqlConnection {
            MysqlConnection::establish(&self.url(i, database))
                .unwrap_or_else(|e| panic!("node {}: {e}", self.nodes[i].number))
        }

        /// Waits (up to 60 s) until node `i` answers, is `Synced` and sees
        /// `size` members.
        pub fn wait_synced(&self, i: usize, size: usize) {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if let Ok(mut conn) = MysqlConnection::establish(&self.url(i, "mysql")) {
                    let state = status(&mut conn, "wsrep_local_state_comment");
                    let members = status(&mut conn, "wsrep_cluster_size");
                    if state.as_deref() == Some("Synced")
                        && members.as_deref() == Some(&size.to_string())
                    {
                        return;
                    }
                }
                if Instant::now() > deadline {
                    let log = std::fs::read_to_string(self.nodes[i].dir.join("error.log"))
                        .unwrap_or_default();
                    panic!(
                        "node {} not synced in a cluster of {size} after 60 s; its log:\n{log}",
                        self.nodes[i].number
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    #[derive(QueryableByName)]
    struct Value {
        #[diesel(sql_type = Text)]
        value: String,
    }

    /// A global status variable of the server.
    pub fn status(conn: &mut MysqlConnection, name: &str) -> Option<String> {
        diesel::sql_query(format!(
            "SELECT VARIABLE_VALUE AS value FROM information_schema.GLOBAL_STATUS \
             WHERE VARIABLE_NAME = '{}'",
            name.to_uppercase()
        ))
        .get_result::<Value>(conn)
        .ok()
        .map(|v| v.value)
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
            super::SEED_OUTPUT,
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
    /// each with read-modify-write transactions under `transaction_with_retry`.
    fn contention(rt: &tokio::runtime::Runtime, cluster: &Cluster) {
        const COUNTERS: usize = 32;
        const EACH: usize = 100;
        let mut conn = cluster.connect(0, "test");
        conn.batch_execute("CREATE TABLE counters (id INT PRIMARY KEY, n INT NOT NULL)")
            .unwrap();
        for id in 0..COUNTERS {
            diesel::sql_query(format!("INSERT INTO counters VALUES ({id}, 0)"))
                .execute(&mut conn)
                .unwrap();
        }
        let engines = engines(rt, cluster);
        let next = Arc::new(AtomicUsize::new(0));
        let retries = Arc::new(AtomicU32::new(0));
        let started = Instant::now();
        rt.block_on(async {
            let mut tasks = Vec::new();
            for engine in &engines {
                for _ in 0..8 {
                    let (engine, next, retries) = (engine.clone(), next.clone(), retries.clone());
                    tasks.push(tokio::spawn(async move {
                        let policy = RetryPolicy::default()
                            .max_attempts(100)
                            .base_delay(Duration::from_millis(2))
                            .max_delay(Duration::from_millis(50));
                        loop {
                            let unit = next.fetch_add(1, Ordering::Relaxed);
                            if unit >= COUNTERS * EACH {
                                return;
                            }
                            let id = (unit % COUNTERS) as i32;
                            let done = engine
                                .transaction_with_retry(&policy, move |c: &mut AnyConnection| {
                                    #[derive(QueryableByName)]
                                    struct N {
                                        #[diesel(sql_type = Integer)]
                                        n: i32,
                                    }
                                    let n = diesel::sql_query(
                                        "SELECT n FROM counters WHERE id = ? FOR UPDATE",
                                    )
                                    .bind::<Integer, _>(id)
                                    .get_result::<N>(c)?
                                    .n;
                                    diesel::sql_query("UPDATE counters SET n = ? WHERE id = ?")
                                        .bind::<Integer, _>(n + 1)
                                        .bind::<Integer, _>(id)
                                        .execute(c)?;
                                    diesel::QueryResult::Ok(())
                                })
                                .await
                                .unwrap_or_else(|e| panic!("unit {unit}: {e}"));
                            retries.fetch_add(done.attempts - 1, Ordering::Relaxed);
                        }
                    }));
                }
            }
            for t in tasks {
                t.await.unwrap();
            }
        });
        let elapsed = started.elapsed();
        for i in 0..3 {
            let mut conn = cluster.connect(i, "test");
            conn.batch_execute("SET SESSION wsrep_sync_wait = 1")
                .unwrap();
            let total = diesel::sql_query("SELECT CAST(sum(n) AS SIGNED) AS n FROM counters")
                .get_result::<Count>(&mut conn)
                .unwrap()
                .n;
            let exact = diesel::sql_query(format!(
                "SELECT CAST(count(*) AS SIGNED) AS n FROM counters WHERE n = {EACH}"
            ))
            .get_result::<Count>(&mut conn)
            .unwrap()
            .n;
            assert_eq!(total, (COUNTERS * EACH) as i64, "node {}: sum", i + 1);
            assert_eq!(
                exact,
                COUNTERS as i64,
                "node {}: every counter at {EACH}",
                i + 1
            );
        }
        let conflicts: Vec<String> = (0..3)
            .map(|i| {
                let mut c = cluster.connect(i, "mysql");
                format!(
                    "{}+{}",
                    status(&mut c, "wsrep_local_cert_failures").unwrap_or_default(),
                    status(&mut c, "wsrep_local_bf_aborts").unwrap_or_default()
                )
            })
            .collect();
        figure(format!(
            "contention tasks=24 counters={COUNTERS} increments={} sum_exact=true retries={} \
             cert_failures+bf_aborts_per_node={conflicts:?} seconds={:.2}",
            COUNTERS * EACH,
            retries.load(Ordering::Relaxed),
            elapsed.as_secs_f64()
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
        let log_path = cluster.nodes[2].dir.join("error.log");
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
        let after_kill: Vec<Instant> = acked
            .iter()
            .map(|(_, at)| *at)
            .filter(|at| *at > killed_at)
            .collect();
        let resumed = after_kill
            .windows(2)
            .map(|w| w[1] - w[0])
            .chain(after_kill.first().map(|first| *first - killed_at))
            .max()
            .unwrap_or(Duration::MAX);
        let mut per_node = Vec::new();
        for i in 0..3 {
            let mut conn = cluster.connect(i, "test");
            conn.batch_execute("SET SESSION wsrep_sync_wait = 1")
                .unwrap();
            #[derive(QueryableByName)]
            struct Tag {
                #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
                data: Option<String>,
            }
            let tags: Vec<Tag> = diesel::sql_query("SELECT data FROM a")
                .load(&mut conn)
                .unwrap();
            let mut counts: HashMap<String, usize> = HashMap::new();
            for tag in tags.into_iter().filter_map(|t| t.data) {
                *counts.entry(tag).or_default() += 1;
            }
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

    /// One engine over the three nodes (`mysql://root@h:p1,h:p2,h:p3/test`):
    /// its connections spread over every node; node 3 SIGKILLed under load:
    /// the engine's units go on, on nodes 1 and 2, and none is lost.
    fn multi_host(rt: &tokio::runtime::Runtime, cluster: &mut Cluster) {
        let hosts: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let url = format!("mysql://root@{}/test", hosts.join(","));
        let engine: Engine<AnyConnection> = rt
            .block_on(Engine::connect(
                &url,
                EngineOptions::default()
                    .max_size(6)
                    .connection_timeout(Duration::from_secs(5)),
            ))
            .unwrap();
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
        let after_kill: Vec<Instant> = acked
            .iter()
            .map(|(_, at)| *at)
            .filter(|at| *at > killed_at)
            .collect();
        let longest_gap = after_kill
            .windows(2)
            .map(|w| w[1] - w[0])
            .chain(after_kill.first().map(|first| *first - killed_at))
            .max()
            .unwrap_or(Duration::MAX);
        for i in 0..2 {
            let mut conn = cluster.connect(i, "test");
            conn.batch_execute("SET SESSION wsrep_sync_wait = 1")
                .unwrap();
            #[derive(QueryableByName)]
            struct Tag {
                #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
                data: Option<String>,
            }
            let tags: Vec<Tag> = diesel::sql_query("SELECT data FROM a WHERE data LIKE 'm%'")
                .load(&mut conn)
                .unwrap();
            let mut counts: HashMap<String, usize> = HashMap::new();
            for tag in tags.into_iter().filter_map(|t| t.data) {
                *counts.entry(tag).or_default() += 1;
            }
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
    /// an engine over the three nodes opens none there. The node is then
    /// killed and rejoins by IST.
    fn not_ready_node_skipped(rt: &tokio::runtime::Runtime, cluster: &mut Cluster) {
        cluster
            .connect(2, "mysql")
            .batch_execute("SET GLOBAL wsrep_provider_options = 'gmcast.isolate=1'")
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let size = status(&mut cluster.connect(0, "mysql"), "wsrep_cluster_size");
            let ready = MysqlConnection::establish(&cluster.url(2, "mysql"))
                .ok()
                .and_then(|mut c| status(&mut c, "wsrep_ready"));
            if size.as_deref() == Some("2") && ready.as_deref() == Some("OFF") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node 3 never left: {size:?} {ready:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let hosts: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let url = format!("mysql://root@{}/test", hosts.join(","));
        let engine: Engine<AnyConnection> = rt
            .block_on(Engine::connect(
                &url,
                EngineOptions::default()
                    .max_size(6)
                    .connection_timeout(Duration::from_secs(5)),
            ))
            .unwrap();
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
        figure(format!("not_ready_node_skipped spread={spread:?}"));
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
/// `mariadbd`, galera-4, rsync and socat, and fails saying so if one is missing.
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
