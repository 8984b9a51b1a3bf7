//! A throwaway 3-node MariaDB Galera Cluster on loopback.
//!
//! [`Cluster::start`] writes each node's `my.cnf` in a temporary directory
//! under `/tmp` (prefix `rs-galera-`), picks free ports, initialises node 1,
//! bootstraps it and joins the others one at a time (rsync state transfer).
//! The nodes run as user `mysql` with `innodb_autoinc_lock_mode = 2`, no
//! grant tables (user `root`, no password) and a database `test`. Dropping
//! the [`Cluster`] kills every server (SIGKILL to each node's process group,
//! so state-transfer helpers go too) and removes the data.
//!
//! Needs root, `mariadbd`, the `mariadb` client, galera-4, rsync and socat;
//! [`Cluster::start`] panics saying which one is missing.

use crate::free_port;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The Galera provider library (Debian's `galera-4`).
pub const PROVIDER: &str = "/usr/lib/galera/libgalera_smm.so";
/// The server binary.
pub const MARIADBD: &str = "/usr/sbin/mariadbd";
/// The command-line client the harness queries the nodes with.
pub const CLIENT: &str = "/usr/bin/mariadb";
/// The number of nodes [`Cluster::start`] starts.
pub const NODES: usize = 3;

fn unavailable(why: &str) -> ! {
    panic!(
        "cannot start the Galera test cluster: {why} (needs root, mariadb-server, the mariadb \
         client, galera-4, rsync and socat; `cargo test -- --skip galera_cluster` leaves it out)"
    )
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
}

/// Three nodes; dropping it kills every server (and its state-transfer
/// helpers: each node is a process group) and removes the data.
///
/// Nodes are numbered 0, 1, 2 in the methods (node 1, 2, 3 in messages and
/// in `wsrep_node_name`).
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
    /// Writes each node's `my.cnf`, initialises node 1, bootstraps it,
    /// creates the database `test`, and joins the others one at a time
    /// (rsync state transfer). Returns when all three are `Synced`.
    pub fn start() -> Cluster {
        if output(Command::new("id").arg("-u")) != "0" {
            unavailable("not running as root (the nodes run as user mysql)");
        }
        for path in [
            MARIADBD,
            CLIENT,
            PROVIDER,
            "/usr/bin/rsync",
            "/usr/bin/socat",
        ] {
            if !Path::new(path).exists() {
                unavailable(&format!("{path} not found"));
            }
        }
        let dir = tempfile::Builder::new()
            .prefix("rs-galera-")
            .tempdir_in("/tmp")
            .unwrap();
        let ports: Vec<[u16; 4]> = (0..NODES)
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
        cluster
            .query(0, "CREATE DATABASE test")
            .unwrap_or_else(|e| panic!("node 1: {e}"));
        for i in 1..NODES {
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

    /// SIGKILL to node `i`'s process group (nothing if it is not running).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Restarts a killed node from its recovered position (IST); follow
    /// with [`Cluster::wait_synced`].
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

    /// Node `i`'s client port on 127.0.0.1.
    pub fn port(&self, i: usize) -> u16 {
        self.nodes[i].port
    }

    /// Node `i`'s URL: `mysql://root@127.0.0.1:<port>/<database>`.
    pub fn url(&self, i: usize, database: &str) -> String {
        format!("mysql://root@127.0.0.1:{}/{database}", self.nodes[i].port)
    }

    /// One URL naming every node, as diesel-runsync's `DatabaseUrl` reads
    /// it: `mysql://root@127.0.0.1:<p1>,127.0.0.1:<p2>,127.0.0.1:<p3>/<database>`.
    pub fn multi_host_url(&self, database: &str) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("mysql://root@{}/{database}", hosts.join(","))
    }

    /// Node `i`'s error log.
    pub fn log_path(&self, i: usize) -> PathBuf {
        self.nodes[i].dir.join("error.log")
    }

    /// Runs `sql` (one or more statements) on node `i` with the `mariadb`
    /// client, in database `mysql`; returns its output (tab-separated
    /// values, no column names, trimmed) or the client's error.
    pub fn query(&self, i: usize, sql: &str) -> Result<String, String> {
        let out = Command::new(CLIENT)
            .args(["--protocol=TCP", "-h", "127.0.0.1", "-u", "root"])
            .arg(format!("--port={}", self.nodes[i].port))
            .args(["--connect-timeout=2", "--batch", "--skip-column-names"])
            .args(["-e", sql, "mysql"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("{CLIENT}: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(format!(
                "node {}: {}",
                self.nodes[i].number,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// A global status variable of node `i` (`wsrep_cluster_size`, ...), or
    /// `None` when the node does not answer.
    pub fn status(&self, i: usize, name: &str) -> Option<String> {
        self.query(
            i,
            &format!(
                "SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS \
                 WHERE VARIABLE_NAME = '{}'",
                name.to_uppercase()
            ),
        )
        .ok()
        .filter(|v| !v.is_empty())
    }

    /// Waits (up to 60 s) until node `i` answers, is `Synced` and sees
    /// `size` members; panics with the node's log otherwise.
    pub fn wait_synced(&self, i: usize, size: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let state = self.status(i, "wsrep_local_state_comment");
            if state.as_deref() == Some("Synced")
                && self.status(i, "wsrep_cluster_size").as_deref() == Some(&size.to_string())
            {
                return;
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(self.log_path(i)).unwrap_or_default();
                panic!(
                    "node {} not synced in a cluster of {size} after 60 s; its log:\n{log}",
                    self.nodes[i].number
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
