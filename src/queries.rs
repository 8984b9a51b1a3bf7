//! The synchronous core: the program's statements ([`Statements`], plain
//! `diesel::RunQueryDsl` on each backend's connection) and the seed's logic
//! over them, for [`AnyConnection`] and for each native connection alike.
//! Nothing here knows of async, pools or the environment.

use std::io::Write;

use diesel::prelude::*;
use diesel::query_dsl::methods::LoadQuery;
#[cfg(feature = "mysql")]
use diesel::sql_types::BigInt;
use diesel_runsync::{StreamingMode, update_kept};

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
pub fn insert_families<C: Statements>(
    conn: &mut C,
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
        let ids = conn.insert_parents(&parents)?;
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
            conn.insert_children(batch)?;
        }
        all_ids.extend(ids);
    }
    Ok(all_ids)
}

/// The program's statements, one method each, on one connection type.
///
/// Written once, in `native_statements!` below, and compiled for each
/// backend's own connection type (`SqliteConnection`, `PgConnection`,
/// `MysqlConnection`): there Diesel keys its prepared-statement cache by the
/// query's type and builds no SQL text per execution. [`AnyConnection`]
/// implements it by picking its inner connection (one `match`) and running
/// the same method there, so the program's statements cost what they cost
/// on the native connection; run through the `MultiConnection` enum itself,
/// Diesel would build each statement's SQL text again on every execution.
/// The functions of this module ([`run_queries`], [`insert_families`], ...)
/// are the logic over these statements, for any `C: Statements`.
pub trait Statements {
    /// One multi-row `INSERT INTO a`; the new ids in the order of `rows`.
    fn insert_parents(&mut self, rows: &[NewA<'_>]) -> Result<Vec<i32>, DemoError>;
    /// One multi-row `INSERT INTO b`; the rows inserted.
    fn insert_children(&mut self, rows: &[NewB<'_>]) -> QueryResult<usize>;
    /// Every row of `a`, in the order the database returns them.
    fn parents(&mut self) -> QueryResult<Vec<A>>;
    /// The `A` with id `id`.
    fn parent(&mut self, id: i32) -> QueryResult<A>;
    /// The `A` with the smallest id.
    fn first_parent(&mut self) -> QueryResult<A>;
    /// `parent`'s children (`belonging_to`).
    fn children_of(&mut self, parent: &A) -> QueryResult<Vec<B>>;
    /// The children of every parent in `parents`, in one `IN (...)` query.
    fn children_of_all(&mut self, parents: &[A]) -> QueryResult<Vec<B>>;
    /// Sets the data of the `A` with id `id` (kept prepared: [`update_kept`]).
    fn set_data(&mut self, id: i32, data: &str) -> QueryResult<usize>;
    /// Every row of `a` and `b`, ordered by id.
    fn all_rows(&mut self) -> QueryResult<(Vec<A>, Vec<B>)>;
    /// Row counts of `a` and `b`.
    fn count_rows(&mut self) -> QueryResult<(i64, i64)>;
    /// See [`for_each_family`].
    fn for_each_family<F>(&mut self, each: F) -> Result<(), DemoError>
    where
        F: FnMut(A, Vec<B>) -> Result<(), DemoError>;
}

/// Implements [`Statements`] for the native connection `$conn`, with
/// `$insert_parents` for the one statement whose SQL differs by backend.
macro_rules! native_statements {
    ($conn:ty, $insert_parents:path) => {
        impl Statements for $conn {
            fn insert_parents(&mut self, rows: &[NewA<'_>]) -> Result<Vec<i32>, DemoError> {
                $insert_parents(self, rows)
            }

            fn insert_children(&mut self, rows: &[NewB<'_>]) -> QueryResult<usize> {
                diesel::insert_into(b::table).values(rows).execute(self)
            }

            fn parents(&mut self) -> QueryResult<Vec<A>> {
                a::table.select(A::as_select()).load(self)
            }

            fn parent(&mut self, id: i32) -> QueryResult<A> {
                a::table.find(id).select(A::as_select()).first(self)
            }

            fn first_parent(&mut self) -> QueryResult<A> {
                a::table.order(a::id).select(A::as_select()).first(self)
            }

            fn children_of(&mut self, parent: &A) -> QueryResult<Vec<B>> {
                B::belonging_to(parent).select(B::as_select()).load(self)
            }

            fn children_of_all(&mut self, parents: &[A]) -> QueryResult<Vec<B>> {
                B::belonging_to(parents).select(B::as_select()).load(self)
            }

            fn set_data(&mut self, id: i32, data: &str) -> QueryResult<usize> {
                update_kept(a::table.find(id), a::data.eq(data)).execute(self)
            }

            fn all_rows(&mut self) -> QueryResult<(Vec<A>, Vec<B>)> {
                let parents = a::table.order(a::id).select(A::as_select()).load(self)?;
                let children = b::table.order(b::id).select(B::as_select()).load(self)?;
                Ok((parents, children))
            }

            fn count_rows(&mut self) -> QueryResult<(i64, i64)> {
                let parents = a::table.count().get_result(self)?;
                let children = b::table.count().get_result(self)?;
                Ok((parents, children))
            }

            fn for_each_family<F>(&mut self, each: F) -> Result<(), DemoError>
            where
                F: FnMut(A, Vec<B>) -> Result<(), DemoError>,
            {
                families_row_by_row(
                    self,
                    a::table
                        .left_join(b::table)
                        .select(((a::id, a::data), (b::id, b::a_id, b::data).nullable()))
                        .order_by((a::id, b::id.nullable())),
                    each,
                )
            }
        }
    };
}

native_statements!(SqliteConnection, sqlite_insert_parents);
#[cfg(feature = "postgres")]
native_statements!(PgConnection, pg_insert_parents);
#[cfg(feature = "mysql")]
native_statements!(MysqlConnection, mysql_insert_parents);

/// Each method on the inner connection: one `match`, then the native code.
impl Statements for AnyConnection {
    fn insert_parents(&mut self, rows: &[NewA<'_>]) -> Result<Vec<i32>, DemoError> {
        on_inner_connection!(self, |c| c.insert_parents(rows))
    }
    fn insert_children(&mut self, rows: &[NewB<'_>]) -> QueryResult<usize> {
        on_inner_connection!(self, |c| c.insert_children(rows))
    }
    fn parents(&mut self) -> QueryResult<Vec<A>> {
        on_inner_connection!(self, |c| c.parents())
    }
    fn parent(&mut self, id: i32) -> QueryResult<A> {
        on_inner_connection!(self, |c| c.parent(id))
    }
    fn first_parent(&mut self) -> QueryResult<A> {
        on_inner_connection!(self, |c| c.first_parent())
    }
    fn children_of(&mut self, parent: &A) -> QueryResult<Vec<B>> {
        on_inner_connection!(self, |c| c.children_of(parent))
    }
    fn children_of_all(&mut self, parents: &[A]) -> QueryResult<Vec<B>> {
        on_inner_connection!(self, |c| c.children_of_all(parents))
    }
    fn set_data(&mut self, id: i32, data: &str) -> QueryResult<usize> {
        on_inner_connection!(self, |c| c.set_data(id, data))
    }
    fn all_rows(&mut self) -> QueryResult<(Vec<A>, Vec<B>)> {
        on_inner_connection!(self, |c| c.all_rows())
    }
    fn count_rows(&mut self) -> QueryResult<(i64, i64)> {
        on_inner_connection!(self, |c| c.count_rows())
    }
    fn for_each_family<F>(&mut self, each: F) -> Result<(), DemoError>
    where
        F: FnMut(A, Vec<B>) -> Result<(), DemoError>,
    {
        on_inner_connection!(self, |c| c.for_each_family(each))
    }
}

/// PostgreSQL and SQLite: `$name`, one multi-row `INSERT ... RETURNING id`
/// on `$conn`.
macro_rules! insert_parents_returning {
    ($name:ident, $conn:ty) => {
        fn $name(conn: &mut $conn, rows: &[NewA<'_>]) -> Result<Vec<i32>, DemoError> {
            let mut ids: Vec<i32> = diesel::insert_into(a::table)
                .values(rows)
                .returning(a::id)
                .get_results(conn)?;
            // RETURNING does not promise row order, but one statement's ids grow
            // with insertion order (SQLite: max(rowid)+1; PostgreSQL: one nextval per row).
            ids.sort_unstable();
            Ok(ids)
        }
    };
}

insert_parents_returning!(sqlite_insert_parents, SqliteConnection);
#[cfg(feature = "postgres")]
insert_parents_returning!(pg_insert_parents, PgConnection);

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
/// (MariaDB's default) the rows of one multi-row `INSERT` get consecutive
/// ids (by `auto_increment_increment`) from `LAST_INSERT_ID()` on, so a
/// batch is the mode read, one `INSERT ... VALUES` and one `SELECT`,
/// three statements whatever the batch size. Under mode 2 (required by
/// Galera Cluster) concurrent inserts interleave their ids, and no
/// arithmetic can name a batch's rows: each row goes in its own `INSERT`
/// followed by `LAST_INSERT_ID()`, the id the server gave that row. The
/// mode is read before each batch (a server setting that changes only
/// with a restart, which also ends the connection), not cached: a
/// connection may be to any node of a pool's hosts.
#[cfg(feature = "mysql")]
fn mysql_insert_parents(
    conn: &mut MysqlConnection,
    rows: &[NewA<'_>],
) -> Result<Vec<i32>, DemoError> {
    #[derive(QueryableByName)]
    struct LockMode {
        #[diesel(sql_type = BigInt)]
        lock_mode: i64,
    }
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    const LAST_IDS: &str = "SELECT CAST(LAST_INSERT_ID() AS SIGNED) AS first_id, \
         CAST(@@auto_increment_increment AS SIGNED) AS step, \
         CAST(@@innodb_autoinc_lock_mode AS SIGNED) AS lock_mode";
    let to_id = |id: i64| {
        i32::try_from(id).map_err(|_| DemoError::Check("an id does not fit in INTEGER".into()))
    };
    let mode: LockMode =
        diesel::sql_query("SELECT CAST(@@innodb_autoinc_lock_mode AS SIGNED) AS lock_mode")
            .get_result(conn)?;
    if mode.lock_mode != 2 {
        // A plain multi-row INSERT: the `INSERT ... SELECT` over a
        // 1,000-way `UNION ALL` that this replaced took twice as long on
        // MariaDB 10.11 (BENCHMARKS.md, "The MySQL parent batch").
        let inserted = diesel::insert_into(a::table).values(rows).execute(conn)?;
        let batch: BatchIds = diesel::sql_query(LAST_IDS).get_result(conn)?;
        if inserted != rows.len() || batch.lock_mode == 2 {
            return Err(DemoError::Check(format!(
                "a batch of {} parents inserted {inserted} rows under innodb_autoinc_lock_mode {}",
                rows.len(),
                batch.lock_mode
            )));
        }
        return (0..rows.len() as i64)
            .map(|i| to_id(batch.first_id + i * batch.step))
            .collect();
    }
    rows.iter()
        .map(|row| {
            diesel::insert_into(a::table).values(row).execute(conn)?;
            let last: BatchIds = diesel::sql_query(LAST_IDS).get_result(conn)?;
            to_id(last.first_id)
        })
        .collect()
}

/// The seed's `run_queries`: selects every `A` and, for each, loads its
/// `B`s with one query (the lazy N+1 pattern), writing each to `out`; then
/// sets the first `A`'s data (by id) to `"new data"`.
pub fn run_queries<C: Statements>(conn: &mut C, out: &mut impl Write) -> Result<Counts, DemoError> {
    let parents = conn.parents()?;
    let mut counts = Counts {
        parents: parents.len(),
        children: 0,
    };
    for parent in &parents {
        writeln!(out, "{parent}")?;
        let children = conn.children_of(parent)?;
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
pub fn run_queries_eager<C: Statements>(
    conn: &mut C,
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
pub fn load_families<C: Statements>(conn: &mut C) -> QueryResult<Vec<(A, Vec<B>)>> {
    let parents = conn.parents()?;
    let mut families = Vec::with_capacity(parents.len());
    for chunk in parents.chunks(EAGER_BATCH) {
        let children = conn.children_of_all(chunk)?.grouped_by(chunk);
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
pub fn for_each_family<C: Statements>(
    conn: &mut C,
    each: impl FnMut(A, Vec<B>) -> Result<(), DemoError>,
) -> Result<(), DemoError> {
    conn.for_each_family(each)
}

/// [`for_each_family`] on one native connection, in its [`StreamingMode`].
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
pub fn update_first<C: Statements>(conn: &mut C, data: &str) -> QueryResult<()> {
    let first = conn.first_parent()?;
    conn.set_data(first.id, data)?;
    Ok(())
}

/// A parent by key, its children, then its data set to `data`: the load
/// figures' unit of work (`bench/WORKLOAD.md`), run inside the caller's transaction.
pub fn touch_parent<C: Statements>(conn: &mut C, id: i32, data: &str) -> QueryResult<()> {
    let parent = conn.parent(id)?;
    let _children = conn.children_of(&parent)?;
    conn.set_data(parent.id, data)?;
    Ok(())
}

/// Every row of `a` and `b`, ordered by id.
pub fn all_rows<C: Statements>(conn: &mut C) -> QueryResult<(Vec<A>, Vec<B>)> {
    conn.all_rows()
}

/// Row counts of `a` and `b`.
pub fn count_rows<C: Statements>(conn: &mut C) -> QueryResult<(i64, i64)> {
    conn.count_rows()
}
