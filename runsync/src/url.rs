//! Database URLs: which backend a URL names, and a form safe to print.

use std::fmt;

use crate::error::Error;

/// The database backend a URL selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// An embedded SQLite file (a plain path, `sqlite://path`, `file:` URI or `:memory:`).
    Sqlite,
    /// A PostgreSQL server (`postgres://` or `postgresql://`).
    Postgres,
    /// A MySQL or MariaDB server (`mysql://`).
    Mysql,
}

impl Backend {
    /// The short lowercase name used in output and benchmark records.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
            Backend::Mysql => "mysql",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A database URL whose backend is known and whose password never prints.
///
/// `Display` and `Debug` show the URL with any password replaced by `***`;
/// [`DatabaseUrl::expose`] gives the real string to the driver.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl {
    raw: String,
    backend: Backend,
}

impl DatabaseUrl {
    /// Parses `url` and picks its backend from the scheme.
    ///
    /// Accepted: `postgres://`, `postgresql://`, `mysql://`, `sqlite://path`,
    /// `sqlite::memory:`, `:memory:`, `file:` URIs and plain file paths.
    pub fn parse(url: &str) -> Result<Self, Error> {
        let url = url.trim();
        let invalid = |reason: &str| Error::InvalidUrl {
            url: redact(url),
            reason: reason.to_owned(),
        };
        if url.is_empty() {
            return Err(invalid(
                "it is empty; set DATABASE_URL to a SQLite path, postgres://... or mysql://...",
            ));
        }
        let (backend, raw) = match url.split_once("://") {
            Some((scheme, rest)) => match scheme.to_ascii_lowercase().as_str() {
                "postgres" | "postgresql" => (Backend::Postgres, url.to_owned()),
                "mysql" => (Backend::Mysql, url.to_owned()),
                "sqlite" if rest.is_empty() => {
                    return Err(invalid("sqlite:// needs a file path, e.g. sqlite://app.db"));
                }
                "sqlite" => (Backend::Sqlite, url.to_owned()),
                // SQLite's own URI form (file:///path, file://localhost/path).
                "file" => (Backend::Sqlite, url.to_owned()),
                other => {
                    return Err(invalid(&format!(
                        "unknown scheme `{other}`; use postgres://, mysql://, sqlite:// or a file path"
                    )));
                }
            },
            None if url == "sqlite::memory:" => (Backend::Sqlite, ":memory:".to_owned()),
            None => (Backend::Sqlite, url.to_owned()),
        };
        if backend != Backend::Sqlite && host_part(&raw).is_empty() {
            return Err(invalid(
                "it names no host, e.g. postgres://user@localhost/db",
            ));
        }
        Ok(DatabaseUrl { raw, backend })
    }

    /// The backend this URL selects.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Whether this is an SQLite in-memory database, private to each connection.
    pub fn is_sqlite_memory(&self) -> bool {
        self.backend == Backend::Sqlite && self.raw.contains(":memory:")
    }

    /// The URL with its password, for handing to the driver. Never log it.
    pub fn expose(&self) -> &str {
        &self.raw
    }

    /// The password, if the URL carries one (used to scrub driver messages).
    pub(crate) fn password(&self) -> Option<&str> {
        password_of(&self.raw)
    }

    /// Removes every occurrence of this URL's password from `message`.
    pub(crate) fn scrub(&self, message: &str) -> String {
        match self.password() {
            Some(p) if !p.is_empty() => message.replace(p, "***"),
            _ => message.to_owned(),
        }
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(&self.raw))
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({:?}, {})", redact(&self.raw), self.backend)
    }
}

/// The `user:password@host:port` part of `scheme://authority/path`.
fn host_part(url: &str) -> &str {
    let rest = url.split_once("://").map_or("", |(_, rest)| rest);
    rest.split(['/', '?']).next().unwrap_or("")
}

fn password_of(url: &str) -> Option<&str> {
    let authority = host_part(url);
    let (userinfo, _) = authority.rsplit_once('@')?;
    userinfo.split_once(':').map(|(_, password)| password)
}

/// `url` with its password, if any, replaced by `***`.
pub(crate) fn redact(url: &str) -> String {
    match password_of(url) {
        Some(p) if !p.is_empty() => {
            let authority = host_part(url);
            let start = url.find(authority).unwrap_or(0);
            let (userinfo, host) = authority.rsplit_once('@').unwrap_or(("", authority));
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!(
                "{}{user}:***@{host}{}",
                &url[..start],
                &url[start + authority.len()..]
            )
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_backend_from_scheme() {
        let cases = [
            ("postgres://u@h/db", Backend::Postgres),
            ("postgresql://u@h/db", Backend::Postgres),
            ("mysql://root@127.0.0.1/test", Backend::Mysql),
            ("sqlite://app.db", Backend::Sqlite),
            ("app.db", Backend::Sqlite),
            ("file:///tmp/app.db", Backend::Sqlite),
            (":memory:", Backend::Sqlite),
            ("sqlite::memory:", Backend::Sqlite),
        ];
        for (url, backend) in cases {
            assert_eq!(DatabaseUrl::parse(url).unwrap().backend(), backend, "{url}");
        }
        assert!(
            DatabaseUrl::parse("sqlite::memory:")
                .unwrap()
                .is_sqlite_memory()
        );
    }

    #[test]
    fn rejects_unknown_scheme_empty_and_hostless() {
        let err = DatabaseUrl::parse("redis://h/0").unwrap_err().to_string();
        assert!(err.contains("unknown scheme `redis`"), "{err}");
        assert!(DatabaseUrl::parse("  ").is_err());
        assert!(DatabaseUrl::parse("postgres:///db").is_err());
        assert!(DatabaseUrl::parse("sqlite://").is_err());
    }

    #[test]
    fn never_prints_the_password() {
        let url = DatabaseUrl::parse("postgres://alice:s3cr%40t@db.example:5432/app?x=1").unwrap();
        for shown in [url.to_string(), format!("{url:?}")] {
            assert!(!shown.contains("s3cr"), "{shown}");
            assert!(
                shown.contains("alice:***@db.example:5432/app?x=1"),
                "{shown}"
            );
        }
        assert_eq!(url.scrub("bad password s3cr%40t"), "bad password ***");
        let err = DatabaseUrl::parse("nosuch://bob:hunter2@h/db").unwrap_err();
        assert!(!err.to_string().contains("hunter2"));
        assert!(!format!("{err:?}").contains("hunter2"));
        assert_eq!(redact("mysql://root@h/test"), "mysql://root@h/test");
    }
}
