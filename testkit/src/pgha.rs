//! A throwaway pg_auto_failover formation on loopback: a monitor and two
//! PostgreSQL 15 nodes, a primary and a synchronous hot standby.
//!
//! [`Formation::start`] makes a temporary directory under `/tmp` (prefix
//! `rs-pgha-`), picks free ports, and starts the monitor and then each node
//! with `pg_autoctl create … --run` (the keeper stays running): every
//! server listens on 127.0.0.1 only, trusts every local user, keeps its
//! sockets and pg_autoctl's state in the temporary directory, and the nodes
//! have a database `test` (superuser `postgres`, no password, UTF-8). The
//! monitor gets fast failover settings (see [`FAST_SETTINGS`]), so an
//! unplanned failover takes about 6 s instead of about 50 s.
//!
//! Everything runs as user `postgres`; each keeper (`pg_autoctl run`, its
//! services and the postmaster it starts) is a process group of its own.
//! Dropping the [`Formation`] (also while a panic unwinds) sends SIGCONT
//! and then SIGKILL to every process of every keeper, postmaster children
//! included, and removes the directory: nothing matching `rs-pgha-` stays.
//!
//! The system PostgreSQL (port 5432, `/var/run/postgresql`) is never
//! touched: the fixture's servers get their own ports, socket directory
//! (`PG_REGRESS_SOCK_DIR`, `PGHOST`) and `XDG_*` directories.
//!
//! Needs root and Debian's `postgresql-15`, `postgresql-15-auto-failover`
//! and `pg-auto-failover-cli`; [`Formation::start`] panics saying which one
//! is missing.

use crate::free_port;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// PostgreSQL 15's binaries (`pg_ctl`, `postgres`, `psql`).
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// pg_auto_failover's command-line tool (`pg-auto-failover-cli`).
pub const PG_AUTOCTL: &str = "/usr/bin/pg_autoctl";
/// The monitor's extension (`postgresql-15-auto-failover`).
pub const EXTENSION: &str = "/usr/lib/postgresql/15/lib/pgautofailover.so";
/// The number of PostgreSQL nodes (besides the monitor).
pub const NODES: usize = 2;
/// The monitor settings [`Formation::start`] applies (`ALTER SYSTEM` and
/// `pg_reload_conf()` on the monitor): a health check every second, one
/// retry after 0.5 s, a node unhealthy after 3 s, and a primary that does
/// not report given up after 3 more seconds. pg_auto_failover's defaults
/// are 5 s, 2 retries 2 s apart, 20 s and 30 s.
pub const FAST_SETTINGS: [(&str, &str); 6] = [
    ("pgautofailover.health_check_period", "1000"),
    ("pgautofailover.health_check_timeout", "1000"),
    ("pgautofailover.health_check_retry_delay", "500"),
    ("pgautofailover.health_check_max_retries", "1"),
    ("pgautofailover.node_considered_unhealthy_timeout", "3000"),
    ("pgautofailover.primary_demote_timeout", "3000"),
];

/// How long [`Formation::start`], [`Formation::switchover`] and
/// [`Formation::wait_settled`] wait before panicking.
pub const TIMEOUT: Duration = Duration::from_secs(60);

fn unavailable(why: &str) -> ! {
    panic!(
        "cannot start the pg_auto_failover test formation: {why} (needs root, postgresql-15, \
         postgresql-15-auto-failover and pg-auto-failover-cli: \
         `apt-get install -y postgresql-15-auto-failover pg-auto-failover-cli`)"
    )
}

pub(crate) fn output(cmd: &mut Command) -> String {
    let out = cmd.output().expect("the command starts");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The uid and gid of user `postgres`, or `None` when there is no such user.
pub(crate) fn postgres_ids() -> Option<(u32, u32)> {
    let id = |flag: &str| {
        let out = Command::new("id").args([flag, "postgres"]).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

pub(crate) fn is_root() -> bool {
    output(Command::new("id").arg("-u")) == "0"
}

/// Runs `sql` with `psql` (as the calling user, over TCP to 127.0.0.1,
/// 2 s connect timeout, no `.psqlrc`, unaligned tuples only, stop on the
/// first error). Each element of `sql` is one `-c` (one transaction).
pub(crate) fn psql_at(port: u16, user: &str, db: &str, sql: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new(format!("{PG_BIN}/psql"));
    cmd.env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("PGCONNECT_TIMEOUT", "2")
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            user,
            "-d",
            db,
        ]);
    for s in sql {
        cmd.args(["-c", s]);
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{PG_BIN}/psql: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// `pid` and all its descendants (from `/proc`), parents before children.
/// PostgreSQL's children each call `setsid()`, so a process group does not
/// hold them: the tree does.
pub(crate) fn process_tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(p) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                continue;
            };
            if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|s| s.parse().ok()) {
                parents.push((p, ppid));
            }
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    tree
}

pub(crate) fn signal(sig: &str, pids: &[u32]) {
    if pids.is_empty() {
        return;
    }
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg("--")
        .args(pids.iter().map(u32::to_string))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// One `pg_autoctl` keeper (the monitor's or a node's) and its server.
struct Keeper {
    name: String,
    port: u16,
    pgdata: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    frozen: bool,
}

impl Keeper {
    /// SIGCONT then SIGKILL to the keeper's whole process tree (its
    /// services, the postmaster and the postmaster's children).
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let tree = process_tree(child.id());
            signal("CONT", &tree);
            signal("KILL", &tree);
            let _ = child.kill();
            let _ = child.wait();
            self.frozen = false;
            // Orphaned postmaster children (already reparented) by PID file.
            if let Some(pid) = self.postmaster_pid() {
                let tree = process_tree(pid);
                signal("CONT", &tree);
                signal("KILL", &tree);
            }
        }
    }

    /// The postmaster's pid from `postmaster.pid`, if that process runs.
    fn postmaster_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.pgdata.join("postmaster.pid")).ok()?;
        let pid: u32 = text.lines().next()?.trim().parse().ok()?;
        Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
    }
}

/// A monitor and two nodes; dropping it kills every process it started
/// and removes its directory.
///
/// Nodes are numbered 0 and 1 in the methods (`node1`, `node2` in
/// pg_auto_failover and in messages). Which one is primary changes with
/// [`Formation::switchover`] and failovers: ask [`Formation::primary`].
pub struct Formation {
    monitor: Keeper,
    nodes: Vec<Keeper>,
    uid: u32,
    gid: u32,
    dir: tempfile::TempDir,
}

impl Drop for Formation {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
        self.monitor.kill();
    }
}

impl Formation {
    /// Starts the monitor (fast failover settings, see [`FAST_SETTINGS`]),
    /// then node 0 (it registers first and becomes the primary, with a
    /// database `test`) and, once node 0 is registered, node 1 (its keeper
    /// waits for the primary, then clones it with `pg_basebackup`;
    /// `CHECKPOINT` is issued on node 0 every second meanwhile, else the
    /// clone waits about 90 s for a spread checkpoint). Returns once a node is a writable primary
    /// and the other one is `secondary` (streaming, synchronous); prints
    /// how long that took. Panics (with the keepers' logs) after
    /// [`TIMEOUT`].
    pub fn start() -> Formation {
        let started = Instant::now();
        if !is_root() {
            unavailable("not running as root (the servers run as user postgres)");
        }
        for path in [
            PG_AUTOCTL,
            EXTENSION,
            &format!("{PG_BIN}/pg_ctl"),
            &format!("{PG_BIN}/postgres"),
            &format!("{PG_BIN}/psql"),
            "/usr/bin/setsid",
        ] {
            if !Path::new(path).exists() {
                unavailable(&format!("{path} not found"));
            }
        }
        let (uid, gid) = postgres_ids().unwrap_or_else(|| unavailable("no `postgres` user"));
        let dir = tempfile::Builder::new()
            .prefix("rs-pgha-")
            .tempdir_in("/tmp")
            .unwrap();
        for sub in ["sock", "config", "share", "run", "home"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
        }
        output(
            Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path()),
        );
        let keeper = |name: &str| Keeper {
            name: name.to_owned(),
            port: free_port(),
            pgdata: dir.path().join(name),
            log: dir.path().join(format!("{name}.log")),
            child: None,
            frozen: false,
        };
        let mut formation = Formation {
            monitor: keeper("monitor"),
            nodes: (1..=NODES).map(|n| keeper(&format!("node{n}"))).collect(),
            uid,
            gid,
            dir,
        };

        // The monitor.
        let mut create = formation.as_postgres(PG_AUTOCTL);
        create
            .args(["create", "monitor", "--run"])
            .args(formation.common_flags(&formation.monitor));
        formation.monitor.child = Some(formation.spawn_logged(create, &formation.monitor.log));
        formation.wait_for("the monitor to accept connections", || {
            formation
                .monitor_sql(&["SELECT 1 FROM pgautofailover.formation LIMIT 1"])
                .is_ok()
        });
        let mut settings: Vec<String> = FAST_SETTINGS
            .iter()
            .map(|(k, v)| format!("ALTER SYSTEM SET {k} = {v}"))
            .collect();
        settings.push("SELECT pg_reload_conf()".into());
        let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
        formation
            .monitor_sql(&settings)
            .unwrap_or_else(|e| panic!("fast settings on the monitor: {e}"));
        let mut phases = vec![("monitor", started.elapsed())];

        // The nodes: node1 first, so that it registers first and becomes
        // the primary; node2 as soon as node1 is registered (its keeper
        // waits for the primary before cloning it).
        formation.spawn_node(0, true);
        formation.wait_for("node1 to register", || formation.state(0).is_some());
        formation.spawn_node(1, true);
        phases.push(("nodes registered", started.elapsed()));
        let mut last_checkpoint = Instant::now();
        formation.wait_for("node2 to clone node1", || {
            if last_checkpoint.elapsed() >= Duration::from_secs(1) {
                let _ = formation.psql(0, "CHECKPOINT");
                last_checkpoint = Instant::now();
            }
            matches!(
                formation.state(1).map(|(r, _)| r).as_deref(),
                Some("catchingup" | "secondary")
            )
        });
        phases.push(("node2 cloned", started.elapsed()));
        formation.wait_settled();
        phases.push(("settled", started.elapsed()));
        let phases: Vec<String> = phases
            .iter()
            .map(|(what, t)| format!("{what} {:.1} s", t.as_secs_f64()))
            .collect();
        println!(
            "pg_auto_failover formation (monitor :{}, nodes :{} :{}) started in {:.1} s ({})",
            formation.monitor.port,
            formation.nodes[0].port,
            formation.nodes[1].port,
            started.elapsed().as_secs_f64(),
            phases.join(", ")
        );
        formation
    }

    /// The flags every `pg_autoctl create` gets.
    fn common_flags(&self, k: &Keeper) -> Vec<String> {
        vec![
            "--pgdata".into(),
            k.pgdata.display().to_string(),
            "--pgport".into(),
            k.port.to_string(),
            "--pgctl".into(),
            format!("{PG_BIN}/pg_ctl"),
            "--listen".into(),
            "127.0.0.1".into(),
            "--hostname".into(),
            "localhost".into(),
            "--auth".into(),
            "trust".into(),
            "--no-ssl".into(),
        ]
    }

    /// A command run as user `postgres` with an environment of the
    /// fixture's own: sockets, `XDG_*` and `HOME` in the temporary
    /// directory, UTF-8 locale.
    fn as_postgres(&self, program: &str) -> Command {
        let d = self.dir.path();
        let mut cmd = Command::new(program);
        cmd.env_clear()
            .env("PATH", format!("{PG_BIN}:/usr/bin:/bin"))
            .env("HOME", d.join("home"))
            .env("LANG", "C.UTF-8")
            .env("LC_ALL", "C.UTF-8")
            .env("PG_REGRESS_SOCK_DIR", d.join("sock"))
            .env("PGHOST", d.join("sock"))
            .env("XDG_CONFIG_HOME", d.join("config"))
            .env("XDG_DATA_HOME", d.join("share"))
            .env("XDG_RUNTIME_DIR", d.join("run"))
            .uid(self.uid)
            .gid(self.gid)
            .current_dir(d)
            .stdin(Stdio::null());
        cmd
    }

    /// Spawns `cmd` in a process group of its own, output appended to `log`.
    fn spawn_logged(&self, mut cmd: Command, log: &Path) -> Child {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let _ = Command::new("chown")
            .arg("postgres:postgres")
            .arg(log)
            .status();
        cmd.process_group(0)
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
    }

    /// Starts node `i`'s keeper: `pg_autoctl create postgres … --run` the
    /// first time, `pg_autoctl run` afterwards.
    fn spawn_node(&mut self, i: usize, create: bool) {
        let mut cmd = self.as_postgres(PG_AUTOCTL);
        let node = &self.nodes[i];
        if create {
            cmd.args(["create", "postgres", "--run"])
                .args(self.common_flags(node))
                .args(["--dbname", "test", "--name", &node.name])
                .args(["--monitor", &self.monitor_uri()]);
        } else {
            cmd.args(["run", "--pgdata"]).arg(&node.pgdata);
        }
        let child = self.spawn_logged(cmd, &node.log);
        self.nodes[i].child = Some(child);
    }

    fn monitor_uri(&self) -> String {
        format!(
            "postgres://autoctl_node@127.0.0.1:{}/pg_auto_failover?sslmode=disable",
            self.monitor.port
        )
    }

    /// Runs SQL on the monitor (database `pg_auto_failover`, as `postgres`).
    fn monitor_sql(&self, sql: &[&str]) -> Result<String, String> {
        psql_at(self.monitor.port, "postgres", "pg_auto_failover", sql)
    }

    /// Node `i`'s (reported, assigned) state on the monitor, if registered.
    pub fn state(&self, i: usize) -> Option<(String, String)> {
        let out = self
            .monitor_sql(&[&format!(
                "SELECT reportedstate || ' ' || goalstate FROM pgautofailover.node \
                 WHERE nodeport = {}",
                self.nodes[i].port
            )])
            .ok()?;
        let (r, g) = out.split_once(' ')?;
        Some((r.to_owned(), g.to_owned()))
    }

    /// The monitor's view of the formation, one line a node (for messages).
    pub fn monitor_view(&self) -> String {
        self.monitor_sql(&[
            "SELECT nodename || ' :' || nodeport || ' ' || reportedstate || ' -> ' || goalstate \
             || ' health ' || health FROM pgautofailover.node ORDER BY nodeid",
        ])
        .unwrap_or_else(|e| format!("(monitor: {e})"))
    }

    /// The monitor's last `n` events, newest last (time, node, reported
    /// and goal states, description): for a failed test to show what the
    /// formation went through.
    pub fn events(&self, n: usize) -> String {
        self.monitor_sql(&[&format!(
            "SELECT line FROM (SELECT eventid, eventtime::time || ' ' || nodename || ' ' || \
             reportedstate || ' -> ' || goalstate || ' ' || description AS line \
             FROM pgautofailover.event ORDER BY eventid DESC LIMIT {n}) e ORDER BY eventid"
        )])
        .unwrap_or_else(|e| format!("(monitor events: {e})"))
    }

    fn logs(&self) -> String {
        std::iter::once(&self.monitor)
            .chain(&self.nodes)
            .map(|k| format!("--- {} (last 15 lines)\n{}", k.name, tail(&k.log, 15)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The first keeper started by the fixture whose process has exited
    /// (a zombie not reaped yet) and was not killed by it.
    fn exited_keeper(&self) -> Option<&str> {
        std::iter::once(&self.monitor)
            .chain(&self.nodes)
            .find(|k| {
                k.child.as_ref().is_some_and(|c| {
                    std::fs::read_to_string(format!("/proc/{}/stat", c.id())).map_or(true, |stat| {
                        stat.rsplit_once(')')
                            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
                    })
                })
            })
            .map(|k| k.name.as_str())
    }

    fn wait_for(&self, what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + TIMEOUT;
        while !done() {
            if let Some(name) = self.exited_keeper() {
                panic!(
                    "the keeper of {name} (pg_autoctl) exited while waiting for {what}; \
                     monitor:\n{}\n{}",
                    self.monitor_view(),
                    self.logs()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "waited {} s for {what}; monitor:\n{}\n{}",
                    TIMEOUT.as_secs(),
                    self.monitor_view(),
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits (up to [`TIMEOUT`]) until the monitor reports one node
    /// `primary` and the other `secondary`, both in their assigned state,
    /// the primary accepts writes and its commits wait for the standby
    /// ([`Formation::synchronous`]). Returns the primary.
    pub fn wait_settled(&self) -> usize {
        let mut primary = 0;
        self.wait_for("one primary and one synchronous secondary", || {
            let states: Vec<_> = (0..NODES).map(|i| self.state(i)).collect();
            let is = |i: usize, s: &str| states[i].as_ref().is_some_and(|(r, g)| r == s && g == s);
            match (0..NODES).find(|&i| is(i, "primary")) {
                Some(p) if is(1 - p, "secondary") && self.writable(p) && self.synchronous(p) => {
                    primary = p;
                    true
                }
                _ => false,
            }
        });
        primary
    }

    /// Node `i`'s port on 127.0.0.1.
    pub fn node_port(&self, i: usize) -> u16 {
        self.nodes[i].port
    }

    /// The monitor's port on 127.0.0.1 (database `pg_auto_failover`).
    pub fn monitor_port(&self) -> u16 {
        self.monitor.port
    }

    /// The formation's URL, as libpq and diesel-runsync read it:
    /// `postgres://postgres@127.0.0.1:<p1>,127.0.0.1:<p2>/test?target_session_attrs=read-write&connect_timeout=2`,
    /// followed by `&<params>` unless `params` is empty. libpq tries the
    /// hosts in order and keeps the first that accepts writes; a frozen
    /// host costs `connect_timeout` (2 s) before the next is tried.
    pub fn url(&self, params: &str) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let mut url = format!(
            "postgres://postgres@{}/test?target_session_attrs=read-write&connect_timeout=2",
            hosts.join(",")
        );
        if !params.is_empty() {
            url.push('&');
            url.push_str(params);
        }
        url
    }

    /// Node `i`'s own URL: `postgres://postgres@127.0.0.1:<port>/test`.
    pub fn node_url(&self, i: usize) -> String {
        format!("postgres://postgres@127.0.0.1:{}/test", self.nodes[i].port)
    }

    /// Runs `sql` (one transaction; several statements allowed) on node
    /// `i`, database `test`, as `postgres`, with `psql` (2 s connect
    /// timeout); returns its output (unaligned, `|`-separated, no column
    /// names, trimmed) or psql's error. A frozen node costs the 2 s.
    pub fn psql(&self, i: usize, sql: &str) -> Result<String, String> {
        psql_at(self.nodes[i].port, "postgres", "test", &[sql])
            .map_err(|e| format!("{}: {e}", self.nodes[i].name))
    }

    /// Whether node `i` answers, is not in recovery and is not
    /// `default_transaction_read_only` (false for a frozen node, without
    /// asking it).
    pub fn writable(&self, i: usize) -> bool {
        !self.nodes[i].frozen
            && self
                .psql(
                    i,
                    "SELECT NOT pg_is_in_recovery() \
                     AND current_setting('default_transaction_read_only') = 'off'",
                )
                .is_ok_and(|v| v == "t")
    }

    /// Whether node `i`'s commits wait for a standby: its
    /// `synchronous_standby_names` is set and `pg_stat_replication` shows
    /// a standby streaming as `sync` or `quorum`. The monitor's `primary`
    /// state says so too, but a commit acknowledged while it is not so is
    /// lost at the next failover, so a scenario that counts acknowledged
    /// writes asks the server itself.
    pub fn synchronous(&self, i: usize) -> bool {
        !self.nodes[i].frozen
            && self
                .psql(
                    i,
                    "SELECT current_setting('synchronous_standby_names') <> '' AND EXISTS \
                     (SELECT 1 FROM pg_stat_replication WHERE state = 'streaming' \
                     AND sync_state IN ('sync', 'quorum'))",
                )
                .is_ok_and(|v| v == "t")
    }

    /// The node that accepts writes now (asked of the nodes, not the
    /// monitor: not in recovery and not read-only). Panics if there is
    /// none (during a failover, or after [`Formation::set_read_only`]);
    /// [`Formation::wait_writable_primary`] waits for one. Right after a
    /// [`Formation::thaw`] of an old primary two nodes may qualify: the
    /// lower-numbered one is returned.
    pub fn primary(&self) -> usize {
        (0..NODES)
            .find(|&i| self.writable(i))
            .unwrap_or_else(|| panic!("no writable primary now; monitor:\n{}", self.monitor_view()))
    }

    /// The node that answers and is in recovery (a hot standby). Panics if
    /// there is none.
    pub fn standby(&self) -> usize {
        (0..NODES)
            .find(|&i| {
                !self.nodes[i].frozen
                    && self.psql(i, "SELECT pg_is_in_recovery()").as_deref() == Ok("t")
            })
            .unwrap_or_else(|| panic!("no standby now; monitor:\n{}", self.monitor_view()))
    }

    /// Waits until some node accepts writes ([`Formation::writable`]),
    /// polling every 100 ms; returns it, or `None` after `timeout`.
    pub fn wait_writable_primary(&self, timeout: Duration) -> Option<usize> {
        self.wait_writable_other_than(None, timeout)
    }

    /// Like [`Formation::wait_writable_primary`], but only a node other
    /// than `old` counts (after a failover, the old primary may still
    /// accept writes for a moment).
    pub fn wait_writable_other_than(&self, old: Option<usize>, timeout: Duration) -> Option<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = (0..NODES).find(|&i| Some(i) != old && self.writable(i)) {
                return Some(i);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A planned switchover (`pgautofailover.perform_failover('default',
    /// 0)` on the monitor, what `pg_autoctl perform switchover` calls).
    /// Returns the new primary once it accepts writes and the old one is
    /// `secondary` again; prints both times. Panics after [`TIMEOUT`].
    pub fn switchover(&self) -> usize {
        let old = self.primary();
        let started = Instant::now();
        self.monitor_sql(&["SELECT pgautofailover.perform_failover('default', 0)"])
            .unwrap_or_else(|e| panic!("perform_failover: {e}"));
        let new = self
            .wait_writable_other_than(Some(old), TIMEOUT)
            .unwrap_or_else(|| {
                panic!(
                    "no new primary {} s after the switchover; monitor:\n{}\n{}",
                    TIMEOUT.as_secs(),
                    self.monitor_view(),
                    self.logs()
                )
            });
        let writable = started.elapsed();
        let settled = self.wait_settled();
        assert_eq!(
            settled, new,
            "the primary changed again during the switchover"
        );
        println!(
            "switchover node{} -> node{}: new primary writable after {:.1} s, old one \
             secondary after {:.1} s",
            old + 1,
            new + 1,
            writable.as_secs_f64(),
            started.elapsed().as_secs_f64()
        );
        new
    }

    /// SIGKILL to node `i`'s keeper, its services, its postmaster and the
    /// postmaster's children (a crashed host). Killing only the postmaster
    /// is no failover: the keeper restarts it within about a second.
    /// [`Formation::restart_node`] brings it back.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Kills the current primary ([`Formation::kill`]); returns which node
    /// it was. With [`FAST_SETTINGS`] the monitor promotes the standby
    /// about 6 s later ([`Formation::wait_writable_other_than`]); it then
    /// stays in `wait_primary` (commits asynchronous) until the old primary
    /// rejoins.
    pub fn kill_primary(&mut self) -> usize {
        let p = self.primary();
        self.kill(p);
        p
    }

    /// Starts a killed node's keeper again (`pg_autoctl run`): a node that
    /// was primary rejoins as standby (rewound with `pg_rewind` if
    /// needed). Follow with [`Formation::wait_settled`]; it took 2-9 s here.
    pub fn restart_node(&mut self, i: usize) {
        assert!(
            self.nodes[i].child.is_none(),
            "{} is running; kill it first",
            self.nodes[i].name
        );
        self.spawn_node(i, false);
    }

    /// SIGSTOP to node `i`'s whole process tree: its keeper first (so it
    /// cannot restart or reconfigure anything), then the postmaster and
    /// its children: a hung host. Its port still accepts TCP connections
    /// (the kernel completes the handshake) but nothing answers, so a
    /// client waits for its connect timeout; open sessions hang. If it was
    /// the primary, the monitor promotes the standby after about 7 s; after
    /// [`Formation::thaw`] its keeper learns it was demoted and turns it
    /// into a standby (2-8 s here). Until then the thawed old primary
    /// still answers as a writable primary (not in recovery, not
    /// read-only): two nodes look writable for that moment, so a
    /// `target_session_attrs=read-write` client listing it first connects
    /// to it (its commits wait for a synchronous standby that now follows
    /// the other node). [`Formation::wait_settled`] waits that out.
    pub fn freeze(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let Some(child) = &node.child else {
            panic!("{} is not running", node.name)
        };
        // Stop until the tree has no running member left (a child forked
        // between listing and stopping is caught by the next round).
        for _ in 0..5 {
            signal("STOP", &process_tree(child.id()));
            std::thread::sleep(Duration::from_millis(20));
        }
        node.frozen = true;
    }

    /// SIGCONT to node `i`'s whole process tree (undoes [`Formation::freeze`]).
    pub fn thaw(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        if let Some(child) = &node.child {
            signal("CONT", &process_tree(child.id()));
        }
        node.frozen = false;
    }

    /// `ALTER SYSTEM SET default_transaction_read_only = on|off` and
    /// `pg_reload_conf()` on node `i`: new sessions start read-only
    /// (writes fail with 25006, `SELECT 1` still works; libpq's
    /// `target_session_attrs=read-write` skips the node). Existing sessions
    /// keep their setting. pg_auto_failover itself switches this setting
    /// during promotions; a switchover or failover may overwrite it.
    pub fn set_read_only(&self, i: usize, on: bool) {
        let value = if on { "on" } else { "off" };
        psql_at(
            self.nodes[i].port,
            "postgres",
            "test",
            &[
                &format!("ALTER SYSTEM SET default_transaction_read_only = {value}"),
                "SELECT pg_reload_conf()",
            ],
        )
        .unwrap_or_else(|e| panic!("set_read_only({i}, {on}): {e}"));
    }

    /// Node `i`'s keeper log (`pg_autoctl`'s output, PostgreSQL's own log
    /// is under its data directory's `log/`).
    pub fn log_path(&self, i: usize) -> PathBuf {
        self.nodes[i].log.clone()
    }

    /// The temporary directory holding everything (removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
