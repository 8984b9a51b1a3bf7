//! What the server counted: MySQL/MariaDB's `Questions` and `Com_*`
//! status counters (`SHOW GLOBAL STATUS`), read before and after a load
//! run, so that the statements and protocol commands each implementation
//! sends per unit of work are counted by the server, not by the client.
//!
//! The counters are global: whatever else the server runs at the same time
//! is counted too, and so are each implementation's connects and warm-up
//! (a few units' worth against thousands). The snapshots themselves cost
//! one `SHOW` each.

use std::collections::BTreeMap;

use diesel::sql_types::Text;
use diesel::{Connection, MysqlConnection, QueryableByName, RunQueryDsl};

#[derive(QueryableByName)]
struct StatusRow {
    #[diesel(sql_type = Text, column_name = Variable_name)]
    name: String,
    #[diesel(sql_type = Text, column_name = Value)]
    value: String,
}

/// A connection reading the server's status counters.
pub struct StatusReader {
    conn: MysqlConnection,
}

/// The counters at one moment.
pub struct Snapshot(BTreeMap<String, u64>);

impl StatusReader {
    /// Connects to `url`.
    pub fn open(url: &str) -> anyhow::Result<Self> {
        Ok(StatusReader {
            conn: MysqlConnection::establish(url)?,
        })
    }

    /// `Questions` and every `Com_*` counter, now.
    pub fn snapshot(&mut self) -> anyhow::Result<Snapshot> {
        let rows: Vec<StatusRow> = diesel::sql_query(
            "SHOW GLOBAL STATUS WHERE Variable_name = 'Questions' \
             OR Variable_name LIKE 'Com\\_%'",
        )
        .load(&mut self.conn)?;
        Ok(Snapshot(
            rows.into_iter()
                .filter_map(|r| Some((r.name, r.value.parse().ok()?)))
                .collect(),
        ))
    }
}

impl Snapshot {
    /// The counters that grew by at least 0.01 per unit between `self`
    /// and `after`, per unit of work (`Questions` first, then by name).
    pub fn per_unit(&self, after: &Snapshot, units: usize) -> Vec<(String, f64)> {
        let units = units.max(1) as f64;
        let mut grown: Vec<(String, f64)> = after
            .0
            .iter()
            .filter_map(|(name, &value)| {
                let before = self.0.get(name).copied().unwrap_or(0);
                let per = value.saturating_sub(before) as f64 / units;
                (per >= 0.01).then(|| (name.clone(), per))
            })
            .collect();
        grown.sort_by_key(|(name, _)| (name != "Questions", name.clone()));
        grown
    }
}
