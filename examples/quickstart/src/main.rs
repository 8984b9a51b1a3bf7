//! The smallest program on diesel-runsync: SQLite only, compiled in, no
//! demo code. Creates a table, writes in one session's transaction through
//! `run_sync` closures that return Diesel's own `QueryResult`, commits, and
//! reads the rows back through `Engine::transaction`.
//!
//! ```sh
//! cargo run -p runsync-quickstart                 # a temporary file
//! cargo run -p runsync-quickstart -- notes.db     # or a path of yours
//! ```

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{Integer, Text};
use diesel_runsync::{Engine, EngineOptions, Error};

#[derive(QueryableByName, Debug)]
struct Note {
    #[diesel(sql_type = Integer)]
    id: i32,
    #[diesel(sql_type = Text)]
    body: String,
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let dir = std::env::temp_dir().join(format!("runsync-quickstart-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| dir.join("notes.db").display().to_string());

    let engine = Engine::<SqliteConnection>::connect(&url, EngineOptions::default()).await?;

    let mut session = engine.session();
    session
        .run_sync(|conn| {
            conn.batch_execute(
                "DROP TABLE IF EXISTS notes; \
                 CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL)",
            )
        })
        .await?;
    let inserted = session
        .run_sync(|conn| {
            diesel::sql_query("INSERT INTO notes (body) VALUES ('first'), ('second')").execute(conn)
        })
        .await?;
    session.commit().await?;

    let notes: Vec<Note> = engine
        .transaction(|conn| diesel::sql_query("SELECT id, body FROM notes ORDER BY id").load(conn))
        .await?;
    println!("inserted {inserted} notes");
    for note in &notes {
        println!("{}: {}", note.id, note.body);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
