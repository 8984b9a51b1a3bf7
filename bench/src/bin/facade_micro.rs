//! The facade's micro figures, for comparing library versions (BENCHMARKS.md,
//! "What the changes cost per transaction"): `facade_micro <iters> [pg_url]`
//! runs `iters` empty transactions and `iters`
//! one-statement transactions (`SELECT 1`) through `Engine::transaction`
//! on SQLite (and on PostgreSQL when a URL is given), and prints the
//! median of 5 repeats of each, in microseconds. Under callgrind, the
//! difference between two iteration counts gives instructions per call.
//! It uses nothing but the library, so the same file builds in the `bench/`
//! of an older commit for the comparison.
use diesel::prelude::*;
use diesel_runsync::{Engine, EngineOptions};
use std::time::Instant;

async fn figures<C: diesel_runsync::PoolableConnection>(name: &str, engine: Engine<C>, iters: u32)
where
    diesel::query_builder::SqlQuery: diesel::query_dsl::methods::ExecuteDsl<C>,
{
    let (mut empty, mut one) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let started = Instant::now();
        for _ in 0..iters {
            engine
                .transaction(|_| Ok::<_, diesel_runsync::Error>(()))
                .await
                .unwrap();
        }
        empty.push(started.elapsed().as_secs_f64() * 1e6 / iters as f64);
        let started = Instant::now();
        for _ in 0..iters {
            engine
                .transaction(|c| diesel::sql_query("SELECT 1").execute(c))
                .await
                .unwrap();
        }
        one.push(started.elapsed().as_secs_f64() * 1e6 / iters as f64);
    }
    empty.sort_by(f64::total_cmp);
    one.sort_by(f64::total_cmp);
    println!(
        "{name}: empty transaction {:.2} us, one statement {:.2} us (medians of 5 x {iters})",
        empty[2], one[2]
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let iters: u32 = args[1].parse().unwrap();
    let dir = std::env::temp_dir().join(format!("micro-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = dir.join("m.db").display().to_string();
    let sqlite = Engine::<SqliteConnection>::connect(&url, EngineOptions::default())
        .await
        .unwrap();
    figures("sqlite", sqlite, iters).await;
    if let Some(pg) = args.get(2) {
        let engine = Engine::<PgConnection>::connect(pg, EngineOptions::default())
            .await
            .unwrap();
        figures("postgres", engine, iters).await;
    }
    std::fs::remove_dir_all(&dir).ok();
}
