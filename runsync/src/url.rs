//! Database URLs: which backend a URL names, and a form safe to print.

use std::fmt;
use std::ops::Range;

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
/// `Display` and `Debug` show the URL with any password replaced by `***`:
/// the one in its user information (taken up to the URL's last `@`, so a
/// password with an unencoded `/`, `?` or `@` is hidden whole) and any
/// `password=` query parameter (libpq's). [`DatabaseUrl::expose`] gives the
/// real string to the driver.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl {
    raw: String,
    backend: Backend,
    /// `pgbouncer=` of a `postgres://` URL (taken out of `raw`, since libpq
    /// refuses parameters it does not know): whether a transaction-mode
    /// pooler sits between the engine and the server (`None`: find out).
    pooler: Option<bool>,
}

impl DatabaseUrl {
    /// Parses `url` and picks its backend from the scheme.
    ///
    /// Accepted: `postgres://`, `postgresql://`, `mysql://`, `sqlite://path`,
    /// `sqlite::memory:`, `:memory:`, `file:` URIs and plain file paths.
    /// A libpq `key=value` connection string (`host=... dbname=...`) is
    /// refused: write it as a `postgres://` URL.
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
        let scheme = url
            .split_once("://")
            .filter(|(scheme, _)| is_scheme(scheme));
        if scheme.is_none() && looks_like_key_value(url) {
            return Err(invalid(
                "it looks like a key=value connection string, which is not supported; \
                 write it as a URL: postgres://user:password@host:5432/dbname \
                 (or mysql://user:password@host:3306/dbname)",
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
                        "unknown scheme `{}`; use postgres://, mysql://, sqlite:// or a file path",
                        redact(other)
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
        let mut raw = raw;
        let pooler = match backend {
            Backend::Postgres => match take_param(&mut raw, "pgbouncer").as_deref() {
                None => None,
                Some("true" | "1" | "on" | "yes") => Some(true),
                Some("false" | "0" | "off" | "no") => Some(false),
                Some(_) => {
                    return Err(invalid("pgbouncer= takes true or false"));
                }
            },
            _ => None,
        };
        Ok(DatabaseUrl {
            raw,
            backend,
            pooler,
        })
    }

    /// Whether a transaction-mode pooler (PgBouncer) sits between the
    /// engine and the server: `Some` when the URL says so (`pgbouncer=true`
    /// or `false`, taken out of the URL before libpq reads it) or the
    /// engine was told ([`EngineOptions::transaction_pooler`](crate::EngineOptions::transaction_pooler));
    /// `None` lets each new connection find out (a server port that is not
    /// the URL's means a proxy is in between).
    pub fn transaction_pooler(&self) -> Option<bool> {
        self.pooler
    }

    /// This URL with [`transaction_pooler`](Self::transaction_pooler) set.
    pub(crate) fn with_transaction_pooler(mut self, pooler: Option<bool>) -> Self {
        if pooler.is_some() {
            self.pooler = pooler;
        }
        self
    }

    /// The value of query parameter `key`, if the URL has one.
    pub(crate) fn param(&self, key: &str) -> Option<String> {
        let (_, query) = self.raw.split_once('?')?;
        query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            (percent_decode(k) == key).then(|| percent_decode(v))
        })
    }

    /// Whether this PostgreSQL URL asks for a standby or any read-only node
    /// (`target_session_attrs=read-only`, `standby` or `prefer-standby`).
    pub fn prefers_read_only(&self) -> bool {
        self.backend == Backend::Postgres
            && self
                .param("target_session_attrs")
                .is_some_and(|v| matches!(v.as_str(), "read-only" | "standby" | "prefer-standby"))
    }

    /// The TCP ports a PostgreSQL URL names (5432 where a host gives none).
    #[cfg(feature = "postgres")]
    pub(crate) fn ports(&self) -> Vec<u16> {
        let authority = host_part(&self.raw);
        let hosts = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let mut ports: Vec<u16> = hosts
            .split(',')
            .map(|host| {
                let port = host.rsplit_once(']').map_or(host, |(_, rest)| rest);
                port.rsplit_once(':')
                    .and_then(|(_, p)| p.parse().ok())
                    .unwrap_or(5432)
            })
            .collect();
        if let Some(listed) = self.param("port") {
            ports.extend(
                listed
                    .split(',')
                    .filter_map(|p| p.trim().parse::<u16>().ok()),
            );
        }
        ports
    }

    /// The backend this URL selects.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Whether this is an SQLite in-memory database, private to each connection.
    pub fn is_sqlite_memory(&self) -> bool {
        self.backend == Backend::Sqlite && self.raw.contains(":memory:")
    }

    /// The single-host URLs a `mysql://` URL with several hosts names, one
    /// per host in the order written; any other URL alone.
    ///
    /// `mysql://user:pw@h1:3306,h2:3307,h3/db?opts` names the nodes of one
    /// cluster (MariaDB Galera Cluster): an [`Engine`](crate::Engine) on it
    /// spreads its connections over the nodes that answer, and opens new
    /// ones on the others when one goes away. The user information, database
    /// and options are each node's. (PostgreSQL URLs keep their host list:
    /// libpq reads it itself.)
    pub fn hosts(&self) -> Vec<DatabaseUrl> {
        if self.backend != Backend::Mysql {
            return vec![self.clone()];
        }
        let authority = host_part(&self.raw);
        let scheme_end = self.raw.find("://").map_or(0, |at| at + 3);
        let (userinfo, hosts) = match authority.rfind('@') {
            Some(at) => (&authority[..=at], &authority[at + 1..]),
            None => ("", authority),
        };
        if !hosts.contains(',') {
            return vec![self.clone()];
        }
        let rest = &self.raw[scheme_end + authority.len()..];
        hosts
            .split(',')
            .filter(|host| !host.is_empty())
            .map(|host| DatabaseUrl {
                raw: format!("{}{userinfo}{host}{rest}", &self.raw[..scheme_end]),
                backend: self.backend,
                pooler: self.pooler,
            })
            .collect()
    }

    /// Where this URL points, for telemetry: the first host's address and
    /// port (the backend's default port where none is written) and the
    /// database name (SQLite: the file path). Never the user or password.
    pub(crate) fn location(&self) -> (Option<String>, Option<u16>, Option<String>) {
        let query_free = |s: &str| s.split('?').next().unwrap_or("").to_owned();
        if self.backend == Backend::Sqlite {
            let path = self
                .raw
                .split_once("://")
                .map_or(self.raw.as_str(), |(_, rest)| rest);
            let path = query_free(path);
            return (None, None, (!path.is_empty()).then_some(path));
        }
        let authority = host_part(&self.raw);
        let hosts = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let first = hosts.split(',').next().unwrap_or("");
        let (address, port) = match first.strip_prefix('[') {
            // [v6]:port
            Some(v6) => match v6.split_once(']') {
                Some((address, rest)) => (address, rest.strip_prefix(':')),
                None => (v6, None),
            },
            None => match first.rsplit_once(':') {
                Some((address, port)) => (address, Some(port)),
                None => (first, None),
            },
        };
        let default_port = match self.backend {
            Backend::Postgres => 5432,
            _ => 3306,
        };
        let port = port.and_then(|p| p.parse().ok()).unwrap_or(default_port);
        let scheme_end = self.raw.find("://").map_or(0, |at| at + 3);
        let path = &self.raw[scheme_end + authority.len()..];
        let namespace = path
            .strip_prefix('/')
            .map(|p| percent_decode(&query_free(p)))
            .or_else(|| self.param("dbname"))
            .filter(|n| !n.is_empty());
        let address = percent_decode(address);
        (
            (!address.is_empty()).then_some(address),
            Some(port),
            namespace,
        )
    }

    /// The URL with its password, for handing to the driver. Never log it.
    pub fn expose(&self) -> &str {
        &self.raw
    }

    /// `message` (a driver's) with no trace of this URL's password: see
    /// [`scrub_message`].
    pub(crate) fn scrub(&self, message: &str) -> String {
        scrub_message(&self.raw, message)
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

/// Removes query parameter `key` from `url` and returns its value.
fn take_param(url: &mut String, key: &str) -> Option<String> {
    let (base, query) = url.split_once('?')?;
    let mut found = None;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| match pair.split_once('=') {
            Some((k, v)) if percent_decode(k) == key => {
                found = Some(percent_decode(v).to_ascii_lowercase());
                false
            }
            _ => true,
        })
        .collect();
    found.as_ref()?;
    *url = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    found
}

/// The `user:password@host:port` part of `scheme://authority/path`.
fn host_part(url: &str) -> &str {
    let rest = url.split_once("://").map_or("", |(_, rest)| rest);
    rest.split(['/', '?']).next().unwrap_or("")
}

/// Whether `scheme` can be a URL scheme (a letter, then letters, digits, `+-.`).
fn is_scheme(scheme: &str) -> bool {
    let mut chars = scheme.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// libpq's connection keywords, any of which starts a `key=value` string.
const LIBPQ_KEYWORDS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "passfile",
    "require_auth",
    "channel_binding",
    "connect_timeout",
    "client_encoding",
    "options",
    "application_name",
    "fallback_application_name",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "replication",
    "gssencmode",
    "sslmode",
    "sslnegotiation",
    "requiressl",
    "sslcompression",
    "sslcert",
    "sslkey",
    "sslpassword",
    "sslcertmode",
    "sslrootcert",
    "sslcrl",
    "sslcrldir",
    "sslsni",
    "requirepeer",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "krbsrvname",
    "gsslib",
    "gssdelegation",
    "service",
    "target_session_attrs",
    "load_balance_hosts",
];

/// Whether `s` (which has no URL scheme) reads as a `key=value` connection
/// string rather than a file path: it starts with a libpq keyword and `=`,
/// names a password key, or holds two or more `key=value` pairs separated by
/// spaces or `;`. A file path with one odd `name=...` part still passes.
fn looks_like_key_value(s: &str) -> bool {
    let keys: Vec<String> = (0..s.len())
        .filter(|&at| at == 0 || matches!(s.as_bytes()[at - 1], b';') || is_space(s, at - 1))
        .filter_map(|at| key_at(s, at).map(|(key, _)| key))
        .collect();
    keys.len() >= 2
        || keys
            .iter()
            .any(|key| LIBPQ_KEYWORDS.contains(&key.as_str()) || is_password_key(key))
}

fn is_space(s: &str, at: usize) -> bool {
    s.as_bytes()[at].is_ascii_whitespace()
}

/// The key of a `key=value` pair starting at byte `at` of `s` (lowercase,
/// percent-decoded), and the byte just after its `=`. Spaces may surround
/// the `=`, as libpq allows.
fn key_at(s: &str, at: usize) -> Option<(String, usize)> {
    let bytes = s.as_bytes();
    let mut end = at;
    while end < bytes.len()
        && (bytes[end].is_ascii_alphanumeric() || matches!(bytes[end], b'_' | b'-' | b'.' | b'%'))
    {
        end += 1;
    }
    if end == at {
        return None;
    }
    let mut eq = end;
    while eq < bytes.len() && bytes[eq].is_ascii_whitespace() {
        eq += 1;
    }
    if bytes.get(eq) != Some(&b'=') {
        return None;
    }
    Some((percent_decode(&s[at..end]).to_ascii_lowercase(), eq + 1))
}

/// Whether a parameter `key` (lowercase) holds a password: libpq's
/// `password` and `sslpassword`, and the `pwd` / `pass` of other drivers.
fn is_password_key(key: &str) -> bool {
    key.contains("password") || key == "pwd" || key == "pass"
}

/// Byte ranges of `url` (a URL or key=value string) that hold a password,
/// possibly overlapping, none empty: the user information's password, and
/// the values of `password=` parameters.
fn secret_ranges(url: &str) -> Vec<Range<usize>> {
    let mut ranges = param_ranges(url, false);
    if let Some(scheme_end) = url.find("://").map(|at| at + 3) {
        ranges.extend(userinfo_password(url, scheme_end..url.len()));
    }
    ranges
}

/// The password of the user information of the URL whose authority starts
/// `within` (and which ends with it): after the first ':' before the last
/// '@', since a password may hold an unencoded '/', '?', ':' or '@'.
fn userinfo_password(s: &str, within: Range<usize>) -> Option<Range<usize>> {
    let at = within.start + s[within.clone()].rfind('@')?;
    let colon = within.start + s[within.start..at].find(':')?;
    (colon + 1 < at).then_some(colon + 1..at)
}

/// The values of `password=` parameters in `s`: in a query string (after
/// '?' or '&'), a key=value string (after a space or ';'), or a `message`
/// quoting either (where an unquoted value also ends at a quote).
fn param_ranges(s: &str, message: bool) -> Vec<Range<usize>> {
    let bytes = s.as_bytes();
    (0..bytes.len())
        .filter(|&at| at == 0 || matches!(bytes[at - 1], b'?' | b'&' | b';') || is_space(s, at - 1))
        .filter_map(|at| key_at(s, at))
        .filter(|(key, _)| is_password_key(key))
        .map(|(_, after_eq)| value_range(s, after_eq, message))
        .filter(|value| !value.is_empty())
        .collect()
}

/// Byte ranges of a driver's `message` that hold a password: `password=`
/// values, and the user information's password of each URL it quotes (a
/// URL there ends at a space or a quote), unless that is a placeholder in
/// brackets, as in Diesel's `mysql://[[user]:[password]@]host...` hint.
fn message_secret_ranges(message: &str) -> Vec<Range<usize>> {
    let mut ranges = param_ranges(message, true);
    for (at, _) in message.match_indices("://") {
        let start = at + 3;
        let end = message[start..]
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '`'))
            .map_or(message.len(), |e| start + e);
        ranges.extend(userinfo_password(message, start..end).filter(|p| {
            !(message[p.clone()].starts_with('[') && message[p.clone()].ends_with(']'))
        }));
    }
    ranges
}

/// The value of a parameter whose `=` ends just before `start`: a quoted
/// value up to its closing quote, else up to where the next `key=` begins
/// (after a space, `&` or `;`) or the end, so that a value with a space or
/// an unencoded `&` is hidden whole; in a `message`, also up to a quote.
fn value_range(s: &str, start: usize, message: bool) -> Range<usize> {
    let bytes = s.as_bytes();
    let mut begin = start;
    while begin < bytes.len() && bytes[begin] == b' ' {
        begin += 1;
    }
    if let Some(&quote @ (b'\'' | b'"')) = bytes.get(begin) {
        let mut end = begin + 1;
        while end < bytes.len() && bytes[end] != quote {
            end += if bytes[end] == b'\\' { 2 } else { 1 };
        }
        return begin..(end + 1).min(bytes.len());
    }
    let mut end = begin;
    while end < bytes.len() {
        if message && matches!(bytes[end], b'"' | b'\'' | b'`') {
            break;
        }
        let separator = matches!(bytes[end], b'&' | b';') || is_space(s, end);
        if separator && end + 1 < bytes.len() && key_at(s, end + 1).is_some() {
            break;
        }
        end += 1;
    }
    // A trailing separator (the message's own punctuation) is not the password's.
    while end > begin && (matches!(bytes[end - 1], b'&' | b';') || is_space(s, end - 1)) {
        end -= 1;
    }
    begin..end
}

/// `s` with each of `ranges` replaced by `***` (ranges that overlap or
/// touch become one).
fn mask(s: &str, mut ranges: Vec<Range<usize>>) -> String {
    ranges.sort_by_key(|r| r.start);
    let mut out = String::with_capacity(s.len());
    let mut shown = 0;
    let mut masking: Option<usize> = None;
    for range in ranges {
        match masking {
            Some(end) if range.start <= end => {
                masking = Some(end.max(range.end));
                continue;
            }
            Some(end) => shown = end,
            None => {}
        }
        out.push_str(&s[shown..range.start]);
        out.push_str("***");
        masking = Some(range.end);
    }
    out.push_str(&s[masking.unwrap_or(shown)..]);
    out
}

/// `%XX` sequences decoded (lossily, to UTF-8); anything else kept.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `url` (a URL or a key=value string) with every password replaced by
/// `***`: the user information's and any `password=` parameter's.
pub(crate) fn redact(url: &str) -> String {
    mask(url, secret_ranges(url))
}

/// The characters at which a driver may cut a password it cannot parse:
/// the ends of a URL's authority, host list and query parameters.
const CUTS: &[char] = &['/', '?', '#', '@', '&', ';', ',', '=', '[', ']', ' '];

/// Where a password read in pieces is cut: [`CUTS`], and the `:` before a
/// port (libpq takes what follows a password's first `@` for host names,
/// each with its port).
const PIECE_CUTS: &[char] = &['/', '?', '#', '@', '&', ';', ',', '=', '[', ']', ' ', ':'];

/// `message` (a driver's, about connecting to `url`) with no trace of the
/// URL's password. Hiding more than the password is preferred to missing
/// part of it:
/// - the raw URL, where quoted, becomes its redacted form;
/// - each password, raw and percent-decoded, becomes `***`;
/// - a password holding a character a driver cuts at (see [`CUTS`]) may
///   have been misread and quoted in pieces (libpq takes what precedes a
///   `/` for the port, and quotes it), so every run of 4 or more characters
///   of the message found in it becomes `***`, and so does any shorter
///   piece between cuts where a quoted string of the message holds it
///   between cuts too (libpq quotes `"ab"` as a port, `"cd@host"` as a
///   host name, for the password `ab/cd` or `ab@cd`);
/// - any `password=` value, and the password of any URL the message quotes.
pub(crate) fn scrub_message(url: &str, message: &str) -> String {
    let mut out = if url.is_empty() {
        message.to_owned()
    } else {
        message.replace(url, &redact(url))
    };
    let secrets: Vec<&str> = secret_ranges(url).into_iter().map(|r| &url[r]).collect();
    let mut whole: Vec<String> = secrets
        .iter()
        .flat_map(|s| [(*s).to_owned(), percent_decode(s)])
        .collect();
    whole.sort_by_key(|s| std::cmp::Reverse(s.len()));
    whole.dedup();
    for secret in whole.iter().filter(|s| !s.is_empty()) {
        out = out.replace(secret.as_str(), "***");
    }
    for secret in secrets.iter().filter(|s| s.contains(CUTS)) {
        out = mask(&out, shared_runs(&out, secret, 4));
        let pieces: Vec<&str> = secret.split(PIECE_CUTS).filter(|p| !p.is_empty()).collect();
        out = mask(&out, quoted_pieces(&out, &pieces));
    }
    let ranges = message_secret_ranges(&out);
    mask(&out, ranges)
}

/// Byte ranges of `message` where, inside a quoted string (`"..."`,
/// `'...'` or `` `...` ``; every text between two like quotes counts), a
/// part between [`PIECE_CUTS`] (or the quotes) equals one of `pieces`.
fn quoted_pieces(message: &str, pieces: &[&str]) -> Vec<Range<usize>> {
    let mut ranges = Vec::new();
    let mut from = 0;
    while let Some(open) = message[from..].find(['"', '\'', '`']).map(|at| from + at) {
        let quote = message[open..].chars().next().unwrap_or('"');
        let start = open + 1;
        let Some(end) = message[start..].find(quote).map(|at| start + at) else {
            from = start;
            continue;
        };
        let mut at = start;
        for part in message[start..end].split(PIECE_CUTS) {
            if pieces.contains(&part) {
                ranges.push(at..at + part.len());
            }
            // The part, and the one-byte ASCII cut after it.
            at += part.len() + 1;
        }
        // The closing quote may open the next string: an apostrophe
        // (`Can't connect to server on 'ab@host'`) pairs with the wrong quote.
        from = end;
    }
    ranges
}

/// Byte ranges of `text` of at least `min` characters that also occur in
/// `secret`, each as long as it goes.
fn shared_runs(text: &str, secret: &str, min: usize) -> Vec<Range<usize>> {
    let mut runs = Vec::new();
    for (start, _) in text.char_indices() {
        let mut best = None;
        for (len, (at, c)) in text[start..].char_indices().enumerate() {
            let end = start + at + c.len_utf8();
            if !secret.contains(&text[start..end]) {
                break;
            }
            if len + 1 >= min {
                best = Some(end);
            }
        }
        if let Some(end) = best {
            runs.push(start..end);
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mysql_url_with_several_hosts_names_one_url_per_host() {
        let url = DatabaseUrl::parse("mysql://u:p@w@h1:3306,h2,[::1]:3307/db?x=1").unwrap();
        let hosts: Vec<String> = url.hosts().iter().map(|h| h.expose().to_owned()).collect();
        assert_eq!(
            hosts,
            [
                "mysql://u:p@w@h1:3306/db?x=1",
                "mysql://u:p@w@h2/db?x=1",
                "mysql://u:p@w@[::1]:3307/db?x=1"
            ]
        );
        assert_eq!(
            url.to_string(),
            "mysql://u:***@h1:3306,h2,[::1]:3307/db?x=1"
        );
        let single = DatabaseUrl::parse("mysql://root@127.0.0.1:3306/test").unwrap();
        assert_eq!(single.hosts(), std::slice::from_ref(&single));
        let pg = DatabaseUrl::parse("postgres://u@h1,h2/db").unwrap();
        assert_eq!(pg.hosts(), std::slice::from_ref(&pg));
    }

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

    /// Everything that can show `url`: its `Display`, its `Debug`,
    /// [`redact`], and [`DatabaseUrl::scrub`] of a driver message quoting
    /// the raw URL (as libpq's parse errors do), checked free of `secrets`.
    fn assert_hidden(url: &str, secrets: &[&str]) -> DatabaseUrl {
        let parsed = DatabaseUrl::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"));
        let message = format!("invalid URI: \"{url}\", near \"{}\"", secrets[0]);
        for shown in [
            parsed.to_string(),
            format!("{parsed:?}"),
            redact(url),
            parsed.scrub(&message),
        ] {
            for secret in secrets {
                assert!(!shown.contains(secret), "{secret:?} shown: {shown}");
            }
            assert!(shown.contains("***"), "{shown}");
        }
        parsed
    }

    #[test]
    fn never_prints_a_query_string_password() {
        let url = assert_hidden("postgres://u@host/db?password=s3cret", &["s3cret"]);
        assert_eq!(url.to_string(), "postgres://u@host/db?password=***");
        // Any case, any password key, among other parameters, and both forms at once.
        assert_eq!(
            redact("postgres://u:pw@h/db?sslmode=require&PassWord=s3cret&sslpassword=k3y&x=1"),
            "postgres://u:***@h/db?sslmode=require&PassWord=***&sslpassword=***&x=1"
        );
        // A percent-encoded key, and a value with an unencoded '&' or '@'.
        assert_hidden("postgres://u@h/db?pass%77ord=s3cret", &["s3cret"]);
        assert_hidden("postgres://u@h/db?password=s3c&ret", &["s3c", "ret"]);
        assert_hidden("postgres://u@h:5432/db?password=s3c@ret", &["s3c", "ret"]);
        assert_hidden("mysql://root@h/test?password=s3cret", &["s3cret"]);
    }

    #[test]
    fn never_prints_a_password_holding_url_delimiters() {
        let url = assert_hidden("postgres://u:s3c/ret@host:5432/db", &["s3c", "ret"]);
        assert_eq!(url.to_string(), "postgres://u:***@host:5432/db");
        assert_eq!(url.backend(), Backend::Postgres);
        let url = assert_hidden("mysql://root:s3c?ret@host/db", &["s3c", "ret"]);
        assert_eq!(url.to_string(), "mysql://root:***@host/db");
        assert_hidden("postgres://u:p@ss:w#rd@host/db", &["p@ss", "ss:w", "w#rd"]);
        // libpq splits at the '/' and quotes the first half as the port; a
        // half under three characters is hidden where quoted.
        let url = DatabaseUrl::parse("postgres://u:s3c/ret@127.0.0.1:1/db").unwrap();
        assert_eq!(
            url.scrub("invalid integer value \"s3c\" for connection option \"port\""),
            "invalid integer value \"***\" for connection option \"port\""
        );
        // Cut at the first '@' instead, the rest taken for the port.
        let url = DatabaseUrl::parse("postgres://u:p@ss:w#rd@host/db").unwrap();
        assert_eq!(
            url.scrub("invalid integer value \"w#rd@host\" for connection option \"port\""),
            "invalid integer value \"***@host\" for connection option \"port\""
        );
        // Words sharing only three characters with the password are kept.
        let url = DatabaseUrl::parse("postgres://u:hunter2/x@127.0.0.1:1/db").unwrap();
        assert_eq!(
            url.scrub("invalid integer value \"hunter2\" for option \"port\""),
            "invalid integer value \"***\" for option \"port\""
        );
        let url = DatabaseUrl::parse("postgres://u:ab/cd@127.0.0.1:1/db").unwrap();
        assert_eq!(
            url.scrub("invalid integer value \"ab\" for connection option \"port\""),
            "invalid integer value \"***\" for connection option \"port\""
        );
        // Several hosts and an '@': libpq ends the user information at the
        // first '@' and quotes the rest of the password with the host name.
        let url = DatabaseUrl::parse("postgres://u:ab@cd@127.0.0.1:1,h2:2/db").unwrap();
        assert_eq!(
            url.scrub("could not translate host name \"cd@127.0.0.1\" to address"),
            "could not translate host name \"***@127.0.0.1\" to address"
        );
        let url = DatabaseUrl::parse("mysql://u:ab@c:1@h1:3306,h2/db").unwrap();
        assert_eq!(
            url.scrub("Can't connect to server on 'c:1@h1' (111)"),
            "Can't connect to server on '***:***@h1' (111)"
        );
        // A piece quoted with other text is kept where it is not a part of its own.
        assert_eq!(
            url.scrub("Unknown host \"abcd\", user 'ab'"),
            "Unknown host \"abcd\", user '***'"
        );
    }

    #[test]
    fn scrub_removes_the_url_raw_and_decoded_passwords_and_password_values() {
        let raw = "postgres://alice:p%2Fss%40w0rd@db:5432/app";
        let url = DatabaseUrl::parse(raw).unwrap();
        assert_eq!(
            url.scrub(&format!("bad URI \"{raw}\"")),
            "bad URI \"postgres://alice:***@db:5432/app\""
        );
        assert_eq!(url.scrub("for p%2Fss%40w0rd"), "for ***");
        assert_eq!(url.scrub("for p/ss@w0rd"), "for ***");
        // A `password=` value the message holds, whatever its origin.
        assert_eq!(
            url.scrub("options \"host=h password=other dbname=d\" rejected"),
            "options \"host=h password=*** dbname=d\" rejected"
        );
        // A URL the message quotes, whatever its password.
        assert_eq!(
            url.scrub("see 'mysql://root:0ther@h/db'"),
            "see 'mysql://root:***@h/db'"
        );
        // Diesel's MySQL usage hint keeps its placeholder.
        let hint = "must be in the form `mysql://[[user]:[password]@]host[:port][/database]`";
        assert_eq!(url.scrub(hint), hint);
        // No password: the message is untouched.
        let plain = DatabaseUrl::parse("postgres://u@h/db").unwrap();
        assert_eq!(
            plain.scrub("FATAL: role \"u\" does not exist"),
            "FATAL: role \"u\" does not exist"
        );
    }

    #[test]
    fn refuses_key_value_strings_without_printing_their_password() {
        for (kv, shown) in [
            (
                "host=localhost user=u password=s3cret dbname=db",
                "host=localhost user=u password=*** dbname=db",
            ),
            (
                "dbname = db password = s3cret",
                "dbname = db password = ***",
            ),
            (
                "host=h password='s3c ret' port=1",
                "host=h password=*** port=1",
            ),
            ("password=s3cret", "password=***"),
            ("user=u dbname=db", "user=u dbname=db"),
            ("Server=h;Uid=u;Pwd=s3cret", "Server=h;Uid=u;Pwd=***"),
        ] {
            let err = DatabaseUrl::parse(kv).unwrap_err();
            let Error::InvalidUrl { url, reason } = &err else {
                panic!("{kv}: {err:?}");
            };
            assert_eq!(url, shown);
            assert!(reason.contains("postgres://"), "{reason}");
            for printed in [err.to_string(), format!("{err:?}")] {
                assert!(!printed.contains("s3c"), "{printed}");
            }
            assert!(!redact(kv).contains("s3c"), "{}", redact(kv));
            let scrubbed = scrub_message(kv, &format!("cannot open \"{kv}\""));
            assert!(!scrubbed.contains("s3c"), "{scrubbed}");
        }
        // A key=value string holding a URL is still one.
        let err = DatabaseUrl::parse("host=h password=s3cret options=x://y").unwrap_err();
        assert!(err.to_string().contains("key=value"), "{err}");
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }

    #[test]
    fn keeps_file_paths_and_plain_urls_as_they_were() {
        for path in [
            "data=1.db",
            "/tmp/host=x/app.db",
            "file:app.db?mode=ro&cache=shared",
            "my app.db",
        ] {
            let url = DatabaseUrl::parse(path).unwrap_or_else(|e| panic!("{path}: {e}"));
            assert_eq!(url.backend(), Backend::Sqlite, "{path}");
            assert_eq!(url.to_string(), path);
        }
        for plain in [
            "postgres://u@h/db?sslmode=require&application_name=a@b",
            "postgres://u@h/db",
            "mysql://root@127.0.0.1:3306/test",
        ] {
            assert_eq!(DatabaseUrl::parse(plain).unwrap().to_string(), plain);
        }
        // An empty password stays as written.
        assert_eq!(redact("postgres://u:@h/db"), "postgres://u:@h/db");
        // An '@' in the query of a URL with a port: the user information
        // runs to the last '@' (a password may hold '/', '?', ':' or '@'),
        // so more than a password is hidden, never less.
        assert_eq!(
            redact("postgres://u@h:5432/db?application_name=a@b"),
            "postgres://u@h:***@b"
        );
    }
}
