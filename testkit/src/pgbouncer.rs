//! A throwaway PgBouncer in transaction pooling mode on loopback.
//!
//! [`PgBouncer::start`] writes a `pgbouncer.ini` in a temporary directory
//! under `/tmp` (prefix `rs-pgha-bouncer-`), picks a free port on
//! 127.0.0.1 and runs Debian's PgBouncer 1.18 as user `postgres` (it
//! refuses to run as root). Clients log in as any user of its `auth_file`
//! (`postgres`) with no password (`auth_type = trust`); PgBouncer logs in
//! to the server as that same user, so the server must trust it too (the
//! [`crate::pgha::Formation`] nodes do). `postgres` is an admin: the
//! console is database `pgbouncer` ([`PgBouncer::admin`]). Dropping the
//! [`PgBouncer`] kills it and removes the directory.
//!
//! Settings: `pool_mode = transaction`, `default_pool_size` 4 (see
//! [`PgBouncer::start_with`]), `server_login_retry = 1` (the default 15 s
//! refuses every client for 15 s after one failed server login),
//! `ignore_startup_parameters = extra_float_digits,options` (what JDBC
//! and some drivers send; libpq and Diesel send neither unless asked),
//! `max_client_conn = 500`.
//!
//! Caveats of 1.18 in transaction mode: no `max_prepared_statements`
//! (1.21+), so Diesel's named prepared statements fail (42P05 / 26000)
//! unless its statement cache is disabled; a session-level `SET` stays on
//! the server connection for the next client; `pg_backend_pid()` names
//! the server connection, which changes between transactions.
//!
//! Needs root and Debian's `pgbouncer`; [`PgBouncer::start`] panics saying
//! what is missing.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;
use crate::pgha::{PG_BIN, is_root, postgres_ids, process_tree, psql_at, signal};

/// Debian's PgBouncer binary.
pub const PGBOUNCER: &str = "/usr/sbin/pgbouncer";
/// `default_pool_size` used by [`PgBouncer::start`].
pub const DEFAULT_POOL_SIZE: u32 = 4;

fn unavailable(why: &str) -> ! {
    panic!(
        "cannot start the test PgBouncer: {why} (needs root, user postgres, PostgreSQL 15's psql \
         and pgbouncer: `apt-get install -y pgbouncer`)"
    )
}

/// One PgBouncer process; dropping it kills it and removes its directory.
pub struct PgBouncer {
    port: u16,
    dbname: String,
    pool_size: u32,
    ini: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal("KILL", &process_tree(child.id()));
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl PgBouncer {
    /// [`PgBouncer::start_with`] with a pool of [`DEFAULT_POOL_SIZE`].
    pub fn start(target_host: &str, target_port: u16, dbname: &str) -> PgBouncer {
        PgBouncer::start_with(target_host, target_port, dbname, DEFAULT_POOL_SIZE)
    }

    /// Starts PgBouncer with database `dbname` mapped to the database of
    /// that name on `target_host:target_port`, at most `pool_size` server
    /// connections for each user and database. Returns once its admin
    /// console answers (not checking the server: PgBouncer connects
    /// lazily). Panics with its log after 10 s.
    pub fn start_with(
        target_host: &str,
        target_port: u16,
        dbname: &str,
        pool_size: u32,
    ) -> PgBouncer {
        if !is_root() {
            unavailable("not running as root (PgBouncer runs as user postgres)");
        }
        for path in [PGBOUNCER, &format!("{PG_BIN}/psql")] {
            if !Path::new(path).exists() {
                unavailable(&format!("{path} not found"));
            }
        }
        let (uid, gid) = postgres_ids().unwrap_or_else(|| unavailable("no `postgres` user"));
        let dir = tempfile::Builder::new()
            .prefix("rs-pgha-bouncer-")
            .tempdir_in("/tmp")
            .unwrap();
        std::fs::create_dir(dir.path().join("sock")).unwrap();
        std::fs::write(dir.path().join("userlist.txt"), "\"postgres\" \"\"\n").unwrap();
        let mut bouncer = PgBouncer {
            port: free_port(),
            dbname: dbname.to_owned(),
            pool_size,
            ini: dir.path().join("pgbouncer.ini"),
            log: dir.path().join("pgbouncer.log"),
            child: None,
            dir,
        };
        bouncer.write_ini(target_host, target_port);
        let status = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(bouncer.dir.path())
            .status()
            .unwrap();
        assert!(
            status.success(),
            "chown of {}",
            bouncer.dir.path().display()
        );
        let child = Command::new(PGBOUNCER)
            .arg(&bouncer.ini)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .uid(uid)
            .gid(gid)
            .process_group(0)
            .current_dir(bouncer.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| unavailable(&format!("{PGBOUNCER}: {e}")));
        bouncer.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while bouncer.admin("SHOW VERSION").is_err() {
            if let Some(Ok(Some(status))) = bouncer.child.as_mut().map(Child::try_wait) {
                panic!(
                    "pgbouncer exited ({status}); its log:\n{}",
                    bouncer.log_text()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "pgbouncer not answering after 10 s; its log:\n{}",
                    bouncer.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bouncer
    }

    fn write_ini(&self, host: &str, port: u16) {
        let d = self.dir.path().display();
        let ini = format!(
            "[databases]\n\
             {db} = host={host} port={port} dbname={db}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\nlisten_port = {listen}\n\
             unix_socket_dir = {d}/sock\n\
             logfile = {d}/pgbouncer.log\npidfile = {d}/pgbouncer.pid\n\
             auth_type = trust\nauth_file = {d}/userlist.txt\nadmin_users = postgres\n\
             pool_mode = transaction\ndefault_pool_size = {pool}\nmax_client_conn = 500\n\
             server_login_retry = 1\nserver_connect_timeout = 2\n\
             ignore_startup_parameters = extra_float_digits,options\n",
            db = self.dbname,
            listen = self.port,
            pool = self.pool_size,
        );
        // Write then rename, so a RELOAD never reads half a file.
        let tmp = self.dir.path().join("pgbouncer.ini.new");
        std::fs::write(&tmp, ini).unwrap();
        std::fs::rename(&tmp, &self.ini).unwrap();
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The port PgBouncer listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:<port>/<dbname>`, followed by
    /// `?<params>` unless `params` is empty.
    pub fn url(&self, dbname: &str, params: &str) -> String {
        let mut url = format!("postgres://postgres@127.0.0.1:{}/{dbname}", self.port);
        if !params.is_empty() {
            url.push('?');
            url.push_str(params);
        }
        url
    }

    /// Points the database at another server: rewrites `[databases]` and
    /// sends `RELOAD`, then returns. PgBouncer 1.18 marks each server
    /// connection to the old target `close_needed` and closes it when it
    /// is released (in transaction mode: at the end of the transaction
    /// running on it; an idle one went within 0.3 s here); new server
    /// connections go to the new target at once. A client inside a
    /// transaction finishes it on the old server. [`PgBouncer::wait_close`]
    /// waits for the old connections to be gone. (`RECONNECT [db]` exists
    /// in 1.18 too; it is not needed after a changed connection string.
    /// `KILL db` would drop the clients as well.)
    pub fn retarget(&self, host: &str, port: u16) {
        self.write_ini(host, port);
        self.admin("RELOAD")
            .unwrap_or_else(|e| panic!("pgbouncer RELOAD: {e}"));
    }

    /// `WAIT_CLOSE <dbname>` on the admin console: returns once no server
    /// connection is `close_needed` any more (after [`PgBouncer::retarget`]).
    /// Blocks as long as a client keeps a transaction open on one.
    pub fn wait_close(&self) {
        self.admin(&format!("WAIT_CLOSE {}", self.dbname))
            .unwrap_or_else(|e| panic!("pgbouncer WAIT_CLOSE: {e}"));
    }

    /// Runs an admin console command (`SHOW POOLS`, `RELOAD`, `PAUSE`, …)
    /// with `psql`; returns its output (unaligned, `|`-separated, no
    /// header) or psql's error.
    pub fn admin(&self, command: &str) -> Result<String, String> {
        psql_at(self.port, "postgres", "pgbouncer", &[command])
    }

    /// `SHOW <what>` on the admin console (`POOLS`, `SERVERS`, `CLIENTS`,
    /// `DATABASES`, `STATS`, …) with its header line, `|`-separated.
    /// Panics if the console does not answer.
    pub fn show(&self, what: &str) -> String {
        let out = Command::new(format!("{PG_BIN}/psql"))
            .env_clear()
            .env("PGCONNECT_TIMEOUT", "2")
            .args([
                "-X",
                "-A",
                "-P",
                "footer=off",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
            ])
            .args(["-p", &self.port.to_string(), "-d", "pgbouncer"])
            .args(["-c", &format!("SHOW {what}")])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "SHOW {what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The log file (`pgbouncer.log` in its directory).
    pub fn log_path(&self) -> &Path {
        &self.log
    }
}
