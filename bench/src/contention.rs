//! The contention workload of issue 11: tasks incrementing shared counters
//! with read-modify-write transactions (`SELECT ... FOR UPDATE`, then
//! `UPDATE`) under `Engine::transaction_with_retry`, and the checks of its
//! result. One copy, used by `tests/galera.rs` (correctness on a Galera
//! Cluster) and `bench/src/bin/galera.rs` (throughput), both with `#[path]`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer, Text};
use diesel_runsync::{Engine, RetryPolicy};
use greenlet_orm::AnyConnection;

/// What one [`run`] did.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Increments committed.
    pub units: usize,
    /// Attempts beyond the first, summed over the units (each one a
    /// retryable error, 1213 on Galera, seen by the client).
    pub retries: u64,
    /// Of those, the errors a statement of the closure returned (a conflict
    /// delivered to the next statement); the rest failed at `COMMIT`.
    pub statement_errors: u64,
    /// Wall time of the run.
    pub elapsed: Duration,
}

/// (Re)creates table `counters` with `counters` rows at 0.
pub fn create_counters(conn: &mut MysqlConnection, counters: usize) -> QueryResult<()> {
    conn.batch_execute("DROP TABLE IF EXISTS counters")?;
    conn.batch_execute("CREATE TABLE counters (id INT PRIMARY KEY, n INT NOT NULL)")?;
    let rows: Vec<String> = (0..counters).map(|id| format!("({id}, 0)")).collect();
    conn.batch_execute(&format!("INSERT INTO counters VALUES {}", rows.join(", ")))
}

/// `tasks_per_engine` tasks on each engine share the units
/// `0..counters * each`; unit `u` increments counter `u % counters` in a
/// transaction of its own, retried on conflicts (up to 100 attempts).
/// Returns the first error a unit ended with.
pub async fn run(
    engines: &[Engine<AnyConnection>],
    tasks_per_engine: usize,
    counters: usize,
    each: usize,
) -> Result<Outcome, String> {
    let units = counters * each;
    let next = Arc::new(AtomicUsize::new(0));
    let retries = Arc::new(AtomicU64::new(0));
    let statement_errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for engine in engines {
        for _ in 0..tasks_per_engine {
            let (engine, next, retries, statement_errors) = (
                engine.clone(),
                next.clone(),
                retries.clone(),
                statement_errors.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let policy = RetryPolicy::default()
                    .max_attempts(100)
                    .base_delay(Duration::from_millis(2))
                    .max_delay(Duration::from_millis(50));
                loop {
                    let unit = next.fetch_add(1, Ordering::Relaxed);
                    if unit >= units {
                        return Ok::<(), String>(());
                    }
                    let id = (unit % counters) as i32;
                    let errors = statement_errors.clone();
                    let done = engine
                        .transaction_with_retry(&policy, move |c: &mut AnyConnection| {
                            increment(c, id).inspect_err(|_| {
                                errors.fetch_add(1, Ordering::Relaxed);
                            })
                        })
                        .await
                        .map_err(|e| format!("unit {unit}: {e}"))?;
                    retries.fetch_add(u64::from(done.attempts - 1), Ordering::Relaxed);
                }
            }));
        }
    }
    let mut first_error = None;
    for task in tasks {
        let result = task.await.map_err(|e| e.to_string()).and_then(|r| r);
        if let (Err(e), None) = (result, &first_error) {
            first_error = Some(e);
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    Ok(Outcome {
        units,
        retries: retries.load(Ordering::Relaxed),
        statement_errors: statement_errors.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
    })
}

/// One unit's statements: read counter `id` for update, write it + 1.
fn increment(c: &mut AnyConnection, id: i32) -> QueryResult<()> {
    #[derive(QueryableByName)]
    struct N {
        #[diesel(sql_type = Integer)]
        n: i32,
    }
    let n = diesel::sql_query("SELECT n FROM counters WHERE id = ? FOR UPDATE")
        .bind::<Integer, _>(id)
        .get_result::<N>(c)?
        .n;
    diesel::sql_query("UPDATE counters SET n = ? WHERE id = ?")
        .bind::<Integer, _>(n + 1)
        .bind::<Integer, _>(id)
        .execute(c)?;
    Ok(())
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Checks on `conn` that the counters sum to `counters * each` and that
/// every one of them is at `each`.
pub fn check(conn: &mut MysqlConnection, counters: usize, each: usize) -> Result<(), String> {
    let query = |conn: &mut MysqlConnection, sql: &str| {
        diesel::sql_query(sql)
            .get_result::<Count>(conn)
            .map(|c| c.n)
            .map_err(|e| format!("{sql}: {e}"))
    };
    let rows = query(conn, "SELECT count(*) AS n FROM counters")?;
    let total = query(
        conn,
        "SELECT CAST(COALESCE(sum(n), 0) AS SIGNED) AS n FROM counters",
    )?;
    let exact = query(
        conn,
        &format!("SELECT count(*) AS n FROM counters WHERE n = {each}"),
    )?;
    if rows != counters as i64 || total != (counters * each) as i64 || exact != counters as i64 {
        return Err(format!(
            "counters: {rows} rows summing to {total}, {exact} of them at {each}; \
             expected {counters} rows summing to {}",
            counters * each
        ));
    }
    Ok(())
}

/// The server's conflict counters (global status), 0 when a variable is
/// missing (`wsrep_*` on a server without Galera).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Conflicts {
    /// `wsrep_local_cert_failures`: local transactions that failed certification.
    pub cert_failures: i64,
    /// `wsrep_local_bf_aborts`: local transactions aborted by replicated ones.
    pub bf_aborts: i64,
    /// `Innodb_deadlocks`: deadlocks InnoDB detected.
    pub deadlocks: i64,
}

impl Conflicts {
    /// Reads the counters on `conn`.
    pub fn read(conn: &mut MysqlConnection) -> QueryResult<Conflicts> {
        #[derive(QueryableByName)]
        struct Var {
            #[diesel(sql_type = Text)]
            name: String,
            #[diesel(sql_type = Text)]
            value: String,
        }
        let vars: Vec<Var> = diesel::sql_query(
            "SELECT LOWER(VARIABLE_NAME) AS name, VARIABLE_VALUE AS value \
             FROM information_schema.GLOBAL_STATUS WHERE VARIABLE_NAME IN \
             ('WSREP_LOCAL_CERT_FAILURES', 'WSREP_LOCAL_BF_ABORTS', 'INNODB_DEADLOCKS')",
        )
        .load(conn)?;
        let get = |name: &str| {
            vars.iter()
                .find(|v| v.name == name)
                .and_then(|v| v.value.parse().ok())
                .unwrap_or(0)
        };
        Ok(Conflicts {
            cert_failures: get("wsrep_local_cert_failures"),
            bf_aborts: get("wsrep_local_bf_aborts"),
            deadlocks: get("innodb_deadlocks"),
        })
    }

    /// `self - earlier`, counter by counter.
    pub fn since(self, earlier: Conflicts) -> Conflicts {
        Conflicts {
            cert_failures: self.cert_failures - earlier.cert_failures,
            bf_aborts: self.bf_aborts - earlier.bf_aborts,
            deadlocks: self.deadlocks - earlier.deadlocks,
        }
    }
}
