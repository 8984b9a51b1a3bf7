//! Build-time switches for the tests of this package (and of the
//! greenlet-orm program at the workspace root, which uses this script too);
//! nothing else reads them, and the published library has no build script.
//!
//! A test of a server backend shows as *ignored* (not passed) when its URL
//! variable is unset at build time: `runsync_skip_postgres` without
//! `PG_DATABASE_URL`, `runsync_skip_mysql` without `MYSQL_DATABASE_URL`.
//! With `CI=true` or `RUNSYNC_REQUIRE_ALL_BACKENDS=1` nothing is skipped, so
//! a missing URL fails the test instead.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(runsync_skip_postgres, runsync_skip_mysql)");
    for var in [
        "PG_DATABASE_URL",
        "MYSQL_DATABASE_URL",
        "CI",
        "RUNSYNC_REQUIRE_ALL_BACKENDS",
    ] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let set = |var: &str| std::env::var(var).is_ok_and(|v| !v.is_empty());
    let truthy = |var: &str| std::env::var(var).is_ok_and(|v| v == "1" || v == "true");
    let required = truthy("CI") || truthy("RUNSYNC_REQUIRE_ALL_BACKENDS");
    if !required && !set("PG_DATABASE_URL") {
        println!("cargo::rustc-cfg=runsync_skip_postgres");
    }
    if !required && !set("MYSQL_DATABASE_URL") {
        println!("cargo::rustc-cfg=runsync_skip_mysql");
    }
}
