//! The synchronous core: plain `diesel::RunQueryDsl` over one
//! [`AnyConnection`]. Nothing here knows of async, pools or the environment.

use std::io::Write;

use diesel::prelude::*;
use diesel::query_dsl::methods::LoadQuery;
#[cfg(feature = "mysql")]
use diesel::sql_types::BigInt;
use diesel_runsync::StreamingMode;

use crate::connection::AnyConnection;
use crate::connection::on_inner_connection;
use crate::error::DemoError;
use crate::models::{A, B, Family, NewA, NewB};
use crate::schema::{a, b};

/// Parents per `INSERT INTO a` statement (one bind each).
pub const PARENT_BATCH: usize = 1_000;
/// Children per `INSERT INTO b` statement (two binds each).
pub const CHILD_BATCH: usize = 2_000;
/// Parents whose children one eager `IN (...)` query loads.
pub const EAGER_BATCH: usize = 10_000;

/// The seed's three parents: `a1` with two children, `a2` with one, `a3` with two.
pub fn seed_families() -> Vec<Family> {
    vec![
        Family::new("a1", 2),
        Family::new("a2", 1),
        Family::new("a3", 2),
    ]
}

/// The workload's `n` parents: `a{i}` with two children when `i` is odd, one when even.
pub fn workload_families(n: usize) -> Vec<Family> {
    (1..=n)
        .map(|i| Family::new(format!("a{i}"), if i % 2 == 1 { 2 } else { 1 }))
        .collect()
}

/// Parents and children loaded, as counted by [`run_queries`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    /// Rows of `a` seen.
    pub parents: usize,
    /// Rows of `b` seen.
    pub children: usize,
}

/// Inserts `families`: each batch of parents in one statement, then their
/// children, carrying the parents' new ids, in one statement per
/// [`CHILD_BATCH`]. Returns the parents' ids in the order given.
pub fn insert_families(
    conn: &mut AnyConnection,
    families: &[Family],
) -> Result<Vec<i32>, DemoError> {
    let mut all_ids = Vec::with_capacity(families.len());
    for chunk in families.chunks(PARENT_BATCH) {
        let parents: Vec<NewA<'_>> = chunk
            .iter()
            .map(|f| NewA {
                data: f.data.as_deref(),
            })
            .collect();
        let ids = insert_parents(conn, &parents)?;
        let children: Vec<NewB<'_>> = chunk
            .iter()
            .zip(&ids)
            .flat_map(|(family, &a_id)| {
                family.children.iter().map(move |data| NewB {
                    a_id,
                    data: data.as_deref(),
                })
            })
            .collect();
        for batch in children.chunks(CHILD_BATCH) {
            on_inner_connection!(&mut *conn, |c| diesel::insert_into(b::table)
                .values(batch)
                .execute(c))?;
        }
        all_ids.extend(ids);
    }
    Ok(all_ids)
}

/// One multi-row `INSERT INTO a`; the new ids in the order of `rows`.
fn insert_parents(conn: &mut AnyConnection, rows: &[NewA<'_>]) -> Result<Vec<i32>, DemoError> {
    let mut ids: Vec<i32> = match conn {
        #[cfg(feature = "postgres")]
        AnyConnection::Postgresql(c) => diesel::insert_into(a::table)
            .values(rows)
            .returning(a::id)
            .get_results(c)?,
        AnyConnection::Sqlite(c) => diesel::insert_into(a::table)
            .values(rows)
            .returning(a::id)
            .get_results(c)?,
        #[cfg(feature = "mysql")]
        AnyConnection::Mysql(c) => return mysql_insert_parents(c, rows),
    };
    // RETURNING does not promise row order, but one statement's ids grow
    // with insertion order (SQLite: max(rowid)+1; PostgreSQL: one nextval per row).
    ids.sort_unstable();
    Ok(ids)
}

#[cfg(feature = "mysql")]
#[derive(QueryableByName)]
struct BatchIds {
    #[diesel(sql_type = BigInt)]
    first_id: i64,
    #[diesel(sql_type = BigInt)]
    step: i64,
    #[diesel(sql_type = BigInt)]
    lock_mode: i64,
}

/// MySQL has no `RETURNING`. Under `innodb_autoinc_lock_mode` 0 or 1
/// (MariaDB's default) one statement's rows get consecutive ids (by
/// `auto_increment_increment`) from `LAST_INSERT_ID()` on, so a batch is
/// one `INSERT ... SELECT` plus one `SELECT`, the same two statements
/// whatever the batch size. Under mode 2 (required by Galera Cluster)
/// concurrent inserts interleave their ids, and no arithmetic can name a
/// batch's rows: the batch's statement inserts nothing there (its
/// `WHERE` reads the mode on the server, so no statement is spent asking
/// first), and each row goes in its own `INSERT` followed by
/// `LAST_INSERT_ID()`, the id the server gave that row.
#[cfg(feature = "mysql")]
fn mysql_insert_parents(
    conn: &mut MysqlConnection,
    rows: &[NewA<'_>],
) -> Result<Vec<i32>, DemoError> {
    use diesel::sql_types::{Nullable, Text};
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    // `ORDER BY n` fixes the order ids are given in; `INSERT ... SELECT`
    // holds the table's AUTO-INC lock to its end under modes 0 and 1.
    let mut sql = String::with_capacity(40 * rows.len() + 160);
    sql.push_str("INSERT INTO a (data) SELECT d FROM (");
    for i in 0..rows.len() {
        if i == 0 {
            sql.push_str("SELECT 0 AS n, ? AS d");
        } else {
            sql.push_str(&format!(" UNION ALL SELECT {i}, ?"));
        }
    }
    sql.push_str(") AS batch WHERE @@innodb_autoinc_lock_mode <> 2 ORDER BY n");
    let mut insert = diesel::sql_query(sql).into_boxed();
    for row in rows {
        insert = insert.bind::<Nullable<Text>, _>(row.data);
    }
    let inserted = insert.execute(conn)?;
    let batch: BatchIds = diesel::sql_query(
        "SELECT CAST(LAST_INSERT_ID() AS SIGNED) AS first_id, \
         CAST(@@auto_increment_increment AS SIGNED) AS step, \
         CAST(@@innodb_autoinc_lock_mode AS SIGNED) AS lock_mode",
    )
    .get_result(conn)?;
    let to_id = |id: i64| {
        i32::try_from(id).map_err(|_| DemoError::Check("an id does not fit in INTEGER".into()))
    };
    if batch.lock_mode != 2 && inserted == rows.len() {
        return (0..rows.len() as i64)
            .map(|i| to_id(batch.first_id + i * batch.step))
            .collect();
    }
    if batch.lock_mode != 2 || inserted != 0 {
        return Err(DemoError::Check(format!(
            "a batch of {} parents inserted {inserted} rows",
            rows.len()
        )));
    }
    rows.iter()
        .map(|row| {
            diesel::insert_into(a::table).values(row).execute(conn)?;
            let last: BatchIds = diesel::sql_query(
                "SELECT CAST(LAST_INSERT_ID() AS SIGNED) AS first_id, \
                 CAST(@@auto_increment_increment AS SIGNED) AS step, \
                 CAST(@@innodb_autoinc_lock_mode AS SIGNED) AS lock_mode",
            )
            .get_result(conn)?;
            to_id(last.first_id)
        })
        .collect()
}

/// The seed's `run_queries`: selects every `A` and, for each, loads its
/// `B`s with one query (the lazy N+1 pattern), writing each to `out`; then
/// sets the first `A`'s data (by id) to `"new data"`.
pub fn run_queries(conn: &mut AnyConnection, out: &mut impl Write) -> Result<Counts, DemoError> {
    let parents = a::table.select(A::as_select()).load(conn)?;
    let mut counts = Counts {
        parents: parents.len(),
        children: 0,
    };
    for parent in &parents {
        writeln!(out, "{parent}")?;
        let children = B::belonging_to(parent).select(B::as_select()).load(conn)?;
        for child in &children {
            writeln!(out, "{child}")?;
        }
        counts.children += children.len();
    }
    update_first(conn, "new data")?;
    Ok(counts)
}

/// [`run_queries`] with the children loaded eagerly: parents, then all
/// their children in one `IN (...)` query per [`EAGER_BATCH`] parents.
pub fn run_queries_eager(
    conn: &mut AnyConnection,
    out: &mut impl Write,
) -> Result<Counts, DemoError> {
    let families = load_families(conn)?;
    let mut counts = Counts::default();
    for (parent, children) in &families {
        writeln!(out, "{parent}")?;
        for child in children {
            writeln!(out, "{child}")?;
        }
        counts.parents += 1;
        counts.children += children.len();
    }
    update_first(conn, "new data")?;
    Ok(counts)
}

/// Every parent with its children, loaded with `belonging_to` + `grouped_by`.
pub fn load_families(conn: &mut AnyConnection) -> QueryResult<Vec<(A, Vec<B>)>> {
    let parents = a::table.select(A::as_select()).load(conn)?;
    let mut families = Vec::with_capacity(parents.len());
    for chunk in parents.chunks(EAGER_BATCH) {
        let children = B::belonging_to(chunk)
            .select(B::as_select())
            .load(conn)?
            .grouped_by(chunk);
        families.extend(chunk.iter().cloned().zip(children));
    }
    Ok(families)
}

/// Every parent with its children, from one query read row by row as it
/// arrives (PostgreSQL: `PgRowByRowLoadingMode`; SQLite steps its
/// statement; libmysqlclient buffers the whole result first): a `LEFT JOIN`
/// ordered by parent id then child id, each parent handed to `each` as soon
/// as its last child has been read. Stops at the first error `each` returns.
/// The producer of `AsyncSession::stream` for `run --stream` and the HTTP
/// example's `GET /parents/stream`.
pub fn for_each_family(
    conn: &mut AnyConnection,
    each: impl FnMut(A, Vec<B>) -> Result<(), DemoError>,
) -> Result<(), DemoError> {
    on_inner_connection!(conn, |c| families_row_by_row(
        c,
        a::table
            .left_join(b::table)
            .select(((a::id, a::data), (b::id, b::a_id, b::data).nullable()))
            .order_by((a::id, b::id.nullable())),
        each
    ))
}

/// [`for_each_family`] on one inner connection, in its [`StreamingMode`].
fn families_row_by_row<C, Q>(
    conn: &mut C,
    query: Q,
    mut each: impl FnMut(A, Vec<B>) -> Result<(), DemoError>,
) -> Result<(), DemoError>
where
    C: StreamingMode,
    Q: RunQueryDsl<C> + LoadQuery<'static, C, (A, Option<B>), C::Mode>,
{
    let mut current: Option<(A, Vec<B>)> = None;
    for row in query.load_iter::<(A, Option<B>), C::Mode>(conn)? {
        let (parent, child) = row?;
        match &mut current {
            Some((open, children)) if open.id == parent.id => children.extend(child),
            _ => {
                let next = (parent, child.into_iter().collect());
                if let Some((done, children)) = current.replace(next) {
                    each(done, children)?;
                }
            }
        }
    }
    match current {
        Some((last, children)) => each(last, children),
        None => Ok(()),
    }
}

/// Sets the data of the `A` with the smallest id.
pub fn update_first(conn: &mut AnyConnection, data: &str) -> QueryResult<()> {
    let first = a::table.order(a::id).select(A::as_select()).first(conn)?;
    diesel::update(&first).set(a::data.eq(data)).execute(conn)?;
    Ok(())
}

/// Every row of `a` and `b`, ordered by id.
pub fn all_rows(conn: &mut AnyConnection) -> QueryResult<(Vec<A>, Vec<B>)> {
    let parents = a::table.order(a::id).select(A::as_select()).load(conn)?;
    let children = b::table.order(b::id).select(B::as_select()).load(conn)?;
    Ok((parents, children))
}

/// Row counts of `a` and `b`.
pub fn count_rows(conn: &mut AnyConnection) -> QueryResult<(i64, i64)> {
    let parents = a::table.count().get_result(conn)?;
    let children = b::table.count().get_result(conn)?;
    Ok((parents, children))
}
