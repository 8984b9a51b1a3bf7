//! Guides: how the engine behaves where it matters, with the settings
//! that change it. Each is a page of these docs; their code compiles as
//! doctests.

/// Scale-out on PostgreSQL: multi-host URLs and `target_session_attrs`,
/// timeouts and keepalives, what a switchover and a failover cost the
/// caller, PgBouncer in transaction mode, read replicas and read-your-writes.
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
#[doc = include_str!("../docs/scale-out-postgres.md")]
pub mod scale_out_postgres {}
