//! [`update_kept`]: Diesel's `update(target).set(values)`, kept in the
//! connection's prepared-statement cache instead of prepared anew on every
//! execution.
//!
//! Diesel 2.3 marks every `UPDATE` unsafe to cache
//! (`out.unsafe_to_cache_prepared()` in `UpdateStatement::walk_ast`,
//! `diesel/src/query_builder/update_statement/mod.rs`), so each execution
//! prepares its statement again and closes it after: on MySQL/MariaDB one
//! more round trip and a `COM_STMT_CLOSE` per `UPDATE`, on PostgreSQL an
//! unnamed `Parse` round trip before the `Execute`, on SQLite an
//! `sqlite3_prepare`. The mark guards a cache keyed by the query's *type*
//! against statements whose SQL differs with their values (an `Option`
//! field left out of a changeset). But `UpdateStatement` has no static
//! query id, so the cache keys it by its SQL text and bind types anyway:
//! each shape of the SQL is its own entry, and the mark only keeps the
//! cache from holding them. [`KeptUpdate`] writes the same SQL as
//! `UpdateStatement` (`UPDATE table SET changeset WHERE ...`) without the
//! mark, under the same key: each distinct SQL text is prepared once per
//! connection and kept for the connection's life.
//!
//! A changeset of `n` `Option` fields has at most `2^n` shapes, each one
//! cache entry (and on the servers one prepared statement) per connection.
//! What still marks itself unsafe stays uncached: an `IN (...)` list in the
//! filter (its length varies), raw SQL (`diesel::dsl::sql`).
//!
//! The fix belongs in Diesel: without that one call in
//! `UpdateStatement::walk_ast`, every `UPDATE` would be cached per SQL shape,
//! as here. On a `#[derive(MultiConnection)]` enum the derive builds each
//! statement's SQL again on every execution whatever the statement: run it
//! on the backend's own connection type there.

use diesel::QueryResult;
use diesel::backend::Backend;
use diesel::query_builder::{AsChangeset, AstPass, IntoUpdateTarget, QueryFragment, QueryId};
use diesel::query_source::QuerySource;
use diesel::result::{EmptyChangeset, Error as DieselError};

/// `diesel::update(target).set(values)`, kept prepared (see the module
/// docs, [`KeptUpdate`]): run it with `execute` as Diesel's.
///
/// ```
/// # #[cfg(feature = "sqlite")] {
/// use diesel::connection::SimpleConnection;
/// use diesel::prelude::*;
///
/// diesel::table! { t (id) { id -> Integer, n -> Integer } }
///
/// let mut conn = SqliteConnection::establish(":memory:")?;
/// conn.batch_execute("CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER NOT NULL); INSERT INTO t VALUES (1, 0)")?;
/// for i in 1..=3 {
///     // Prepared on the first execution, reused by the next two.
///     diesel_runsync::update_kept(t::table.find(1), t::n.eq(i)).execute(&mut conn)?;
/// }
/// assert_eq!(t::table.select(t::n).first::<i32>(&mut conn)?, 3);
/// # }
/// # Ok::<_, Box<dyn std::error::Error>>(())
/// ```
pub fn update_kept<T, V>(
    target: T,
    values: V,
) -> KeptUpdate<<T::Table as QuerySource>::FromClause, T::WhereClause, V::Changeset>
where
    T: IntoUpdateTarget,
    V: AsChangeset<Target = T::Table>,
{
    let target = target.into_update_target();
    KeptUpdate {
        from_clause: target.table.from_clause(),
        where_clause: target.where_clause,
        values: values.as_changeset(),
    }
}

/// An `UPDATE` that stays in the connection's prepared-statement cache,
/// keyed by its SQL text: built by [`update_kept`].
#[derive(Debug, Clone, Copy)]
#[must_use = "an UPDATE does nothing until it is run (`execute`)"]
pub struct KeptUpdate<F, W, V> {
    from_clause: F,
    where_clause: W,
    values: V,
}

// Keyed by SQL text and bind types, never by type: the SQL may vary with
// the values (`Option` fields), and the text tells those shapes apart.
impl<F, W, V> QueryId for KeptUpdate<F, W, V> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<F, W, V, DB> QueryFragment<DB> for KeptUpdate<F, W, V>
where
    DB: Backend,
    F: QueryFragment<DB>,
    W: QueryFragment<DB>,
    V: QueryFragment<DB>,
{
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, DB>) -> QueryResult<()> {
        // As `UpdateStatement::walk_ast`, less its `unsafe_to_cache_prepared()`.
        if self.values.is_noop(out.backend())? {
            // Diesel's error, so that `optional_empty_changeset()` knows it.
            return Err(DieselError::QueryBuilderError(Box::new(EmptyChangeset)));
        }
        out.push_sql("UPDATE ");
        self.from_clause.walk_ast(out.reborrow())?;
        out.push_sql(" SET ");
        self.values.walk_ast(out.reborrow())?;
        self.where_clause.walk_ast(out.reborrow())?;
        Ok(())
    }
}

impl<F, W, V, Conn> diesel::RunQueryDsl<Conn> for KeptUpdate<F, W, V> {}
