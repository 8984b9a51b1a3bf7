//! Fixtures shared by the tests of the `greenlet-orm` package and the
//! `runsync-bench` benchmarks.
//!
//! - [`galera`]: a throwaway 3-node MariaDB Galera Cluster on loopback
//!   (`tests/galera.rs` runs its scenarios on it, `bench/src/bin/galera.rs`
//!   its figures).
//! - [`pgha`]: a throwaway pg_auto_failover formation on loopback (monitor,
//!   PostgreSQL 15 primary and synchronous hot standby) with switchover,
//!   kill, freeze and read-only switches (`tests/pg_fixtures.rs`).
//! - [`chaos`]: reproducible pseudo-random numbers and a future dropped
//!   after a chosen number of polls, for the fault suites.
//! - [`pgbouncer`]: a throwaway PgBouncer 1.18 in transaction pooling mode
//!   in front of one server, retargetable.
//!
//! The crate links no database client library: it runs `mariadbd`,
//! `pg_autoctl` and `pgbouncer` and talks to the servers with the `mariadb`
//! and `psql` command-line clients, so depending on it costs a default
//! build (no `mysql` or `postgres` feature) nothing.

pub mod chaos;
pub mod galera;
pub mod pgbouncer;
pub mod pgha;

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

/// A TCP port on 127.0.0.1 that is free now, for a server a test starts.
///
/// Chosen below the kernel's ephemeral range (`ip_local_port_range`,
/// 32768-60999 by default): a port taken from that range (bind to port 0,
/// close, hand the number on) can be given to any outgoing connection
/// before the server binds it (it happened: a Galera node's SQL port taken
/// while the node received its state transfer). Ports under the range are
/// never handed out that way; they are tried from a point derived from the
/// process id, so parallel test processes start apart, and each port is
/// offered at most once per process. Falls back to port 0 when the range
/// leaves no room under it.
pub fn free_port() -> u16 {
    const FIRST: u32 = 10_000;
    static OFFERED: AtomicU32 = AtomicU32::new(0);
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let span = ephemeral_start.saturating_sub(FIRST);
    if span >= 1_000 {
        let start = std::process::id().wrapping_mul(2_654_435_761) % span;
        for _ in 0..span {
            let n = OFFERED.fetch_add(1, Ordering::Relaxed);
            let port = FIRST + (start + n.wrapping_mul(7_919)) % span;
            if TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
                return port as u16;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port on 127.0.0.1")
        .port()
}
