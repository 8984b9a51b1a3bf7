//! MySQL/MariaDB: what a transaction's `BEGIN`, `COMMIT` and `ROLLBACK`
//! cost in commands, counted by the server (`Questions` of the session,
//! which counts what the client sends for the server to run, `COM_SET_OPTION`
//! included, and not a statement's prepare or close). With the feature
//! `mysql-single-round-trip` each is one command, one round trip; without
//! it Diesel's `batch_execute` switches multi-statements on and off around
//! each (three).
#![cfg(feature = "mysql")]

#[allow(unused_macros, unused_imports)]
mod common;

use common::TestDb;
use diesel::{MysqlConnection, QueryResult};
use diesel_runsync::EngineOptions;

/// Commands the server has run for this session, this read included.
fn questions(c: &mut MysqlConnection) -> QueryResult<i64> {
    common::session_status(c, "Questions")
}

/// Commands per transaction end and begin: between two reads in two
/// transactions on one connection run the first's end, the second's
/// `BEGIN`, and the second read.
#[cfg(feature = "mysql-single-round-trip")]
const PER_END_AND_BEGIN: i64 = 1 + 1;
#[cfg(not(feature = "mysql-single-round-trip"))]
const PER_END_AND_BEGIN: i64 = 3 + 3;

#[tokio::test]
#[cfg_attr(runsync_skip_mysql, ignore = "MYSQL_DATABASE_URL is not set")]
async fn begin_commit_and_rollback_are_one_command_each() {
    common::run(|db: TestDb<MysqlConnection>| async move {
        let engine = db.engine_with(EngineOptions::default().max_size(1)).await;
        let first = engine.transaction(questions).await.unwrap();
        let after_commit = engine.transaction(questions).await.unwrap();
        assert_eq!(
            after_commit - first,
            PER_END_AND_BEGIN + 1,
            "COMMIT, BEGIN and the read"
        );
        // A transaction rolled back after its read.
        let mut session = engine.session();
        let read = session.run_sync(questions).await.unwrap();
        session.rollback().await.unwrap();
        drop(session);
        let after_rollback = engine.transaction(questions).await.unwrap();
        assert_eq!(
            after_rollback - read,
            PER_END_AND_BEGIN + 1,
            "ROLLBACK, BEGIN and the read"
        );
    })
    .await;
}
