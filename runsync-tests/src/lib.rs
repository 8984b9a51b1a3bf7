//! The integration tests of `diesel-runsync` live in this package's
//! `tests/` (see `tests/common/mod.rs` for the harness); this library is
//! empty. They sit outside the published crate so that their build script,
//! which reads `PG_DATABASE_URL`, `MYSQL_DATABASE_URL`, `CI` and
//! `RUNSYNC_REQUIRE_ALL_BACKENDS` to decide which backends' tests are
//! ignored, is never part of a dependent's build.
