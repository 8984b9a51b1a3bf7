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
