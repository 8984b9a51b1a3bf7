//! Rows of `a` and `b`, and the values inserted into them.

use std::fmt;

use diesel::prelude::*;

use crate::schema::{a, b};

/// A parent row of table `a`.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Identifiable)]
#[diesel(table_name = a)]
pub struct A {
    /// Primary key, assigned by the database.
    pub id: i32,
    /// Free text; `NULL` allowed.
    pub data: Option<String>,
}

/// A child row of table `b`, belonging to one [`A`].
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Identifiable, Associations)]
#[diesel(table_name = b, belongs_to(A))]
pub struct B {
    /// Primary key, assigned by the database.
    pub id: i32,
    /// The parent's id.
    pub a_id: i32,
    /// Free text; `NULL` allowed.
    pub data: Option<String>,
}

/// A parent to insert.
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = a, treat_none_as_default_value = false)]
pub struct NewA<'a> {
    /// The parent's data.
    pub data: Option<&'a str>,
}

/// A child to insert, once its parent's id is known.
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = b, treat_none_as_default_value = false)]
pub struct NewB<'a> {
    /// The parent's id.
    pub a_id: i32,
    /// The child's data.
    pub data: Option<&'a str>,
}

/// A parent and its children, before insertion: the seed's
/// `A(bs=[B(), B()], data="a1")`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Family {
    /// The parent's data.
    pub data: Option<String>,
    /// Each child's data.
    pub children: Vec<Option<String>>,
}

impl Family {
    /// A parent with `data` and `children` children whose data is `NULL`.
    pub fn new(data: impl Into<String>, children: usize) -> Self {
        Family {
            data: Some(data.into()),
            children: vec![None; children],
        }
    }
}

/// Writes `value` as Python's `repr` writes a str or None: `'text'` or `None`.
fn python_repr(f: &mut fmt::Formatter<'_>, value: Option<&str>) -> fmt::Result {
    match value {
        None => f.write_str("None"),
        Some(s) => write!(f, "'{}'", s.replace('\\', "\\\\").replace('\'', "\\'")),
    }
}

impl fmt::Display for A {
    /// `A(id=1, data='a1')`, as the seed prints it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "A(id={}, data=", self.id)?;
        python_repr(f, self.data.as_deref())?;
        f.write_str(")")
    }
}

impl fmt::Display for B {
    /// `B(id=1, a_id=1, data=None)`, as the seed prints it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "B(id={}, a_id={}, data=", self.id, self.a_id)?;
        python_repr(f, self.data.as_deref())?;
        f.write_str(")")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_like_the_seed() {
        let a = A {
            id: 1,
            data: Some("a1".into()),
        };
        let b = B {
            id: 2,
            a_id: 1,
            data: None,
        };
        assert_eq!(a.to_string(), "A(id=1, data='a1')");
        assert_eq!(b.to_string(), "B(id=2, a_id=1, data=None)");
        let quoted = A {
            id: 3,
            data: Some("it's".into()),
        };
        assert_eq!(quoted.to_string(), r"A(id=3, data='it\'s')");
    }
}
