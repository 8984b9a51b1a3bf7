//! Fixtures shared by the tests of the `greenlet-orm` package and the
//! `runsync-bench` benchmarks.
//!
//! - [`galera`]: a throwaway 3-node MariaDB Galera Cluster on loopback
//!   (`tests/galera.rs` runs its scenarios on it, `bench/src/bin/galera.rs`
//!   its figures).
//!
//! The crate links no database client library: it runs `mariadbd` and
//! talks to the nodes with the `mariadb` command-line client, so depending
//! on it costs a default build (no `mysql` feature) nothing.

pub mod galera;
