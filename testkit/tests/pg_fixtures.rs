//! Proves the PostgreSQL fixtures work, with `psql` only: a
//! pg_auto_failover formation (write, switchover, SIGKILL failover and
//! rejoin, freeze, read-only) and a PgBouncer in front of it (queries,
//! retarget). Prints the cold start, switchover and failover times.
//!
//! Runs by default: it needs root, PostgreSQL 15, pg_auto_failover and
//! PgBouncer, and fails (never skips) when one is missing.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use runsync_testkit::pgbouncer::PgBouncer;
use runsync_testkit::pgha::{Formation, PG_BIN};

/// `psql` through a URL (one `-c`), trimmed output or the error.
fn psql_url(url: &str, sql: &str) -> Result<String, String> {
    let out = Command::new(format!("{PG_BIN}/psql"))
        .env_clear()
        .args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            url,
            "-c",
            sql,
        ])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

fn strays() -> String {
    let out = Command::new("pgrep")
        .args(["-a", "-f", "rs-pgha-"])
        .output()
        .expect("pgrep runs");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn pg_auto_failover_formation_and_pgbouncer() {
    let test = Instant::now();
    let mut f = Formation::start();
    let p = f.primary();
    let s = f.standby();
    assert_ne!(p, s);
    assert_eq!(
        f.psql(p, "SHOW synchronous_standby_names").unwrap(),
        format!("ANY 1 (pgautofailover_standby_{})", s + 1),
        "two nodes: commits wait for the standby"
    );
    assert_eq!(
        f.psql(
            p,
            "SELECT pg_encoding_to_char(encoding) FROM pg_database WHERE datname = 'test'"
        )
        .unwrap(),
        "UTF8"
    );

    // Writes on the primary, through the formation URL too.
    f.psql(p, "CREATE TABLE t (id int PRIMARY KEY, v text)")
        .unwrap();
    f.psql(p, "INSERT INTO t VALUES (1, 'before switchover')")
        .unwrap();
    assert_eq!(
        psql_url(&f.url(""), "SELECT inet_server_port()").unwrap(),
        f.node_port(p).to_string(),
        "target_session_attrs=read-write lands on the primary"
    );
    assert!(
        f.psql(s, "INSERT INTO t VALUES (9, 'x')")
            .unwrap_err()
            .contains("read-only")
    );
    // Synchronous: the row is on the standby as soon as the commit returns
    // (remote_apply is not set, so poll briefly for the replay).
    let deadline = Instant::now() + Duration::from_secs(5);
    while f.psql(s, "SELECT count(*) FROM t").as_deref() != Ok("1") {
        assert!(Instant::now() < deadline, "row not replayed on the standby");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Planned switchover.
    let new = f.switchover();
    assert_eq!(new, s);
    assert_eq!(f.primary(), s);
    assert_eq!(f.standby(), p);
    assert_eq!(
        f.psql(s, "SELECT v FROM t WHERE id = 1").unwrap(),
        "before switchover"
    );
    f.psql(s, "INSERT INTO t VALUES (2, 'after switchover')")
        .unwrap();

    // Unplanned: SIGKILL of the primary's keeper and postmaster.
    let old = f.kill_primary();
    let killed = Instant::now();
    let promoted = f
        .wait_writable_other_than(Some(old), Duration::from_secs(60))
        .unwrap_or_else(|| {
            panic!(
                "no promotion 60 s after SIGKILL; monitor:\n{}",
                f.monitor_view()
            )
        });
    println!(
        "failover after SIGKILL of node{}: node{} writable after {:.1} s",
        old + 1,
        promoted + 1,
        killed.elapsed().as_secs_f64()
    );
    assert_eq!(f.psql(promoted, "SELECT count(*) FROM t").unwrap(), "2");
    assert_eq!(
        psql_url(&f.url(""), "SELECT inet_server_port()").unwrap(),
        f.node_port(promoted).to_string()
    );
    f.restart_node(old);
    let rejoin = Instant::now();
    assert_eq!(f.wait_settled(), promoted);
    println!(
        "node{} rejoined as secondary after {:.1} s",
        old + 1,
        rejoin.elapsed().as_secs_f64()
    );

    // A frozen standby (a hung host): connecting to it times out, the
    // formation URL still reaches the primary (after the 2 s timeout when
    // the frozen host is listed first).
    let standby = f.standby();
    f.freeze(standby);
    let t = Instant::now();
    let err = f.psql(standby, "SELECT 1").unwrap_err();
    println!(
        "connect to frozen node{}: {:.1} s, {err}",
        standby + 1,
        t.elapsed().as_secs_f64()
    );
    assert!(t.elapsed() >= Duration::from_millis(1500), "{err}");
    let t = Instant::now();
    assert_eq!(
        psql_url(&f.url(""), "SELECT inet_server_port()").unwrap(),
        f.node_port(promoted).to_string()
    );
    println!(
        "formation URL with node{} frozen: {:.1} s",
        standby + 1,
        t.elapsed().as_secs_f64()
    );
    f.thaw(standby);
    assert_eq!(f.psql(standby, "SELECT pg_is_in_recovery()").unwrap(), "t");
    assert_eq!(f.wait_settled(), promoted);

    // A frozen primary (keeper frozen too): the monitor promotes the
    // standby; thawed, the old primary is demoted and rejoins.
    let hung = promoted;
    f.freeze(hung);
    let frozen = Instant::now();
    let promoted = f
        .wait_writable_other_than(Some(promoted), Duration::from_secs(60))
        .unwrap_or_else(|| {
            panic!(
                "no promotion 60 s after SIGSTOP; monitor:\n{}",
                f.monitor_view()
            )
        });
    println!(
        "failover after SIGSTOP of node{}: node{} writable after {:.1} s",
        hung + 1,
        promoted + 1,
        frozen.elapsed().as_secs_f64()
    );
    assert_eq!(promoted, standby);
    f.thaw(hung);
    let thawed = Instant::now();
    // Not asserted: what the old primary says in its first moments awake.
    println!(
        "node{} just thawed: in recovery|read-only = {:?}",
        hung + 1,
        f.psql(
            hung,
            "SELECT pg_is_in_recovery(), current_setting('default_transaction_read_only')"
        )
    );
    assert_eq!(f.wait_settled(), promoted);
    println!(
        "thawed node{} rejoined as secondary after {:.1} s",
        hung + 1,
        thawed.elapsed().as_secs_f64()
    );

    // Read-only primary: writes fail with 25006, SELECT 1 still works.
    f.set_read_only(promoted, true);
    let err = f
        .psql(promoted, "INSERT INTO t VALUES (3, 'ro')")
        .unwrap_err();
    assert!(err.contains("read-only transaction"), "{err}");
    assert_eq!(f.psql(promoted, "SELECT 1").unwrap(), "1");
    assert_eq!(f.wait_writable_primary(Duration::from_millis(300)), None);
    f.set_read_only(promoted, false);
    assert_eq!(
        f.wait_writable_primary(Duration::from_secs(5)),
        Some(promoted)
    );

    // PgBouncer in front of the primary, then retargeted at the standby.
    let b = PgBouncer::start("127.0.0.1", f.node_port(promoted), "test");
    let url = b.url("test", "connect_timeout=2");
    for _ in 0..2 {
        assert_eq!(
            psql_url(&url, "SELECT inet_server_port()").unwrap(),
            f.node_port(promoted).to_string()
        );
    }
    psql_url(&url, "INSERT INTO t VALUES (4, 'through pgbouncer')").unwrap();
    let pools = b.show("POOLS");
    assert!(
        pools.lines().any(|l| l.starts_with("test|postgres|")),
        "{pools}"
    );
    let other = 1 - promoted;
    b.retarget("127.0.0.1", f.node_port(other));
    assert_eq!(
        psql_url(&url, "SELECT inet_server_port()").unwrap(),
        f.node_port(other).to_string()
    );
    // The idle server connection to the old target is closed at once
    // (close_needed, then the janitor); WAIT_CLOSE returns when it is.
    let t = Instant::now();
    b.wait_close();
    let servers = b.show("SERVERS");
    println!(
        "pgbouncer retargeted, old server connections closed after {:.1} s:\n{servers}",
        t.elapsed().as_secs_f64()
    );
    assert!(
        !servers.contains(&format!("|{}|", f.node_port(promoted))),
        "a server connection to the old target survived the RELOAD:\n{servers}"
    );
    // Rows 1, 2 and 4 (3 failed, read-only), replicated to the standby.
    assert_eq!(psql_url(&url, "SELECT count(*) FROM t").unwrap(), "3");

    drop(b);
    let t = Instant::now();
    drop(f);
    println!(
        "formation dropped in {:.1} s; whole test {:.1} s",
        t.elapsed().as_secs_f64(),
        test.elapsed().as_secs_f64()
    );
    let left = strays();
    assert!(left.is_empty(), "processes left after the drops:\n{left}");
}
