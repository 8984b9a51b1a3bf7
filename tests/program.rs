//! The program as a user runs it: `greenlet-orm` against each backend,
//! with its printed objects, final rows, echoed statements and errors.

mod common;

use std::process::{Command, Output};

use common::{SEED_OUTPUT, TestDb, per_backend};
use diesel::prelude::*;
use greenlet_orm::queries::all_rows;

/// Runs the binary in an empty directory (no `.env` there), with
/// `DATABASE_URL` set and nothing else of ours inherited.
fn run_program(database_url: &str, args: &[&str]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    Command::new(env!("CARGO_BIN_EXE_greenlet-orm"))
        .args(args)
        .current_dir(dir.path())
        .env("DATABASE_URL", database_url)
        .env_remove("RUST_LOG")
        .env_remove("RUNSYNC_ECHO")
        .output()
        .expect("the program runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

per_backend!(
    a_full_run_prints_the_seed_objects_and_leaves_the_seed_rows,
    sync
);
fn a_full_run_prints_the_seed_objects_and_leaves_the_seed_rows(db: TestDb) {
    // Twice: the second run resets a schema that already exists.
    for run in 1..=2 {
        let out = run_program(&db.url, &[]);
        assert!(
            out.status.success(),
            "{} run {run}: {}",
            db.backend,
            text(&out.stderr)
        );
        assert_eq!(text(&out.stdout), SEED_OUTPUT, "{} run {run}", db.backend);
        assert_eq!(text(&out.stderr), "", "{} run {run}", db.backend);
    }
    let (parents, children) = all_rows(&mut db.connect()).unwrap();
    let parents: Vec<_> = parents.into_iter().map(|a| (a.id, a.data)).collect();
    let children: Vec<_> = children
        .into_iter()
        .map(|b| (b.id, b.a_id, b.data))
        .collect();
    assert_eq!(
        parents,
        vec![
            (1, Some("new data".to_owned())),
            (2, Some("a2".to_owned())),
            (3, Some("a3".to_owned())),
        ],
        "{}",
        db.backend
    );
    assert_eq!(
        children,
        vec![
            (1, 1, None),
            (2, 1, None),
            (3, 2, None),
            (4, 3, None),
            (5, 3, None)
        ],
        "{}",
        db.backend
    );
}

/// The kind of each echoed statement, quotes removed, e.g. `SELECT b WHERE a_id [2]`.
fn statement_kind(line: &str) -> Option<String> {
    let line = line.replace(['`', '"'], "");
    let binds = line
        .split_once("-- binds: ")
        .map(|(_, rest)| rest.split(" [").next().unwrap_or("").to_owned());
    let kind = if line.starts_with("BEGIN") {
        "BEGIN"
    } else if line.starts_with("COMMIT") {
        "COMMIT"
    } else if line.starts_with("INSERT INTO a ") {
        "INSERT a"
    } else if line.starts_with("INSERT INTO b ") {
        "INSERT b"
    } else if line.starts_with("SELECT b.id, b.a_id, b.data FROM b WHERE (b.a_id =") {
        return Some(format!("SELECT b WHERE a_id {}", binds.unwrap_or_default()));
    } else if line.starts_with("SELECT a.id, a.data FROM a ORDER BY a.id") {
        "SELECT a ORDER BY id"
    } else if line.starts_with("SELECT a.id, a.data FROM a") {
        "SELECT a"
    } else if line.starts_with("UPDATE a SET data =") {
        return Some(format!("UPDATE a {}", binds.unwrap_or_default()));
    } else {
        return None;
    };
    Some(kind.to_owned())
}

per_backend!(echo_shows_the_seed_statement_sequence, sync);
fn echo_shows_the_seed_statement_sequence(db: TestDb) {
    // A first run leaves tables behind, so the echoed run drops them.
    assert!(run_program(&db.url, &[]).status.success());
    let out = run_program(&db.url, &["--echo"]);
    assert!(
        out.status.success(),
        "{}: {}",
        db.backend,
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout), SEED_OUTPUT, "echo goes to stderr only");
    let stderr = text(&out.stderr);
    let kinds: Vec<String> = stderr.lines().filter_map(statement_kind).collect();
    // After the schema step's COMMIT: the insert and run_sync transactions.
    let last_schema_commit = kinds.iter().position(|k| k == "INSERT a").unwrap() - 2;
    assert_eq!(
        kinds[last_schema_commit], "COMMIT",
        "{}: {kinds:?}",
        db.backend
    );
    assert_eq!(kinds[0], "BEGIN", "{}: schema step begins", db.backend);
    assert_eq!(
        kinds[last_schema_commit + 1..],
        [
            "BEGIN",
            "INSERT a",
            "INSERT b",
            "COMMIT",
            "BEGIN",
            "SELECT a",
            "SELECT b WHERE a_id [1]",
            "SELECT b WHERE a_id [2]",
            "SELECT b WHERE a_id [3]",
            "SELECT a ORDER BY id",
            "UPDATE a [new data, 1]",
            "COMMIT",
        ],
        "{}: {stderr}",
        db.backend
    );
    assert!(stderr.contains("DROP TABLE b") && stderr.contains("CREATE TABLE a"));
    assert!(stderr.contains(" ms]"), "durations are shown");
}

/// Asserts a one-line error on stderr, exit code 1, nothing on stdout, and
/// no trace of `secret`.
fn assert_clean_failure(out: &Output, expect: &str, secret: &str) {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(text(&out.stdout), "");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.contains(expect), "expected {expect:?} in {stderr}");
    assert!(!stderr.contains(secret), "password leaked: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bad_urls_give_one_line_errors_without_the_password() {
    let secret = "hunter2secret";
    let unknown = run_program(&format!("redis://u:{secret}@localhost/0"), &[]);
    assert_clean_failure(&unknown, "unknown scheme `redis`", secret);
    let empty = run_program("", &[]);
    assert_clean_failure(&empty, "it is empty", secret);
    // A backend left out of the build is named as such, in the same one line.
    let (malformed_says, refused_says) = if cfg!(feature = "postgres") {
        ("invalid integer value", "Connection refused")
    } else {
        (
            "this build has no postgres support",
            "this build has no postgres support",
        )
    };
    let malformed = run_program(&format!("postgres://u:{secret}@127.0.0.1:notaport/db"), &[]);
    assert_clean_failure(&malformed, malformed_says, secret);
    let refused = run_program(&format!("postgres://u:{secret}@127.0.0.1:1/db"), &[]);
    assert_clean_failure(&refused, refused_says, secret);
    let refused = run_program(&format!("mysql://u:{secret}@127.0.0.1:1/db"), &[]);
    assert_clean_failure(&refused, "cannot connect", secret);
    if !cfg!(feature = "mysql") {
        assert_clean_failure(&refused, "this build has no mysql support", secret);
    }

    // Issue 9: the forms the redaction did not know, given with
    // --database-url. A password of two halves, so that a driver quoting
    // half of it (after splitting the URL at a '/' or '?') is caught too.
    let (head, tail) = ("hunter2Head", "hunter2Tail");
    let via_flag = |url: &str| run_program("", &["--database-url", url]);
    let clean = |out: &Output, expect: &str| {
        assert_clean_failure(out, expect, head);
        assert_clean_failure(out, expect, tail);
    };
    let (misread_says, quoted_says) = if cfg!(feature = "postgres") {
        ("invalid integer value", "unexpected character")
    } else {
        (refused_says, refused_says)
    };
    // libpq's ?password= parameter.
    let query = via_flag(&format!(
        "postgres://u@127.0.0.1:1/db?password={head}{tail}"
    ));
    clean(&query, refused_says);
    let query = via_flag(&format!("mysql://u@127.0.0.1:1/db?password={head}{tail}"));
    clean(&query, "cannot connect");
    // A password with an unencoded '/' or '?': libpq takes the first half
    // for the port and quotes it; Diesel's MySQL parser refuses the URL.
    let slash = via_flag(&format!("postgres://u:{head}/{tail}@127.0.0.1:1/db"));
    clean(&slash, misread_says);
    let question = via_flag(&format!("postgres://u:{head}?{tail}@127.0.0.1:1/db"));
    clean(&question, refused_says);
    for sep in ['/', '?'] {
        let mysql = via_flag(&format!("mysql://root:{head}{sep}{tail}@127.0.0.1:1/db"));
        clean(&mysql, "cannot connect");
    }
    // libpq quotes a URI it cannot parse, password and all.
    let quoted = via_flag(&format!("postgres://u:{head}?{tail}@[::1]x:1/db"));
    clean(&quoted, quoted_says);
    // A libpq key=value string is refused, and no SQLite file of that name
    // is created in the working directory.
    for kv in [
        format!("host=localhost user=u password={head}{tail} dbname=db"),
        format!("dbname=db password='{head} {tail}'"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_greenlet-orm"))
            .args(["--database-url", &kv])
            .current_dir(dir.path())
            .env_remove("DATABASE_URL")
            .env_remove("RUST_LOG")
            .env_remove("RUNSYNC_ECHO")
            .output()
            .expect("the program runs");
        clean(&out, "key=value connection string");
        assert!(
            text(&out.stderr).contains("password=***"),
            "{}",
            text(&out.stderr)
        );
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "{kv:?} created {left:?}");
    }
}

#[test]
fn a_missing_sqlite_directory_is_named_and_not_created() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no/such/dir");
    let out = run_program(&missing.join("app.db").display().to_string(), &[]);
    assert_clean_failure(&out, "does the file's directory exist", "\u{0}");
    assert!(!missing.exists());
}

per_backend!(
    wrong_credentials_are_reported_without_the_password,
    sync,
    [postgres, mysql]
);
fn wrong_credentials_are_reported_without_the_password(db: TestDb) {
    let secret = "wrongpass123";
    // PostgreSQL here trusts any password, so name a role that does not exist.
    let (scheme, rest) = db.url.split_once("://").unwrap();
    let host_and_db = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let url = format!("{scheme}://no_such_user_rs:{secret}@{host_and_db}");
    let out = run_program(&url, &[]);
    assert_clean_failure(&out, "cannot connect", secret);
    assert!(
        text(&out.stderr).contains("no_such_user_rs"),
        "{}",
        text(&out.stderr)
    );
}

/// Makes a directory unwritable even for root (`chattr +i`), or by mode
/// bits for other users; undone on drop.
struct ReadOnlyDir(std::path::PathBuf, bool);

impl ReadOnlyDir {
    fn new(path: &std::path::Path) -> ReadOnlyDir {
        let immutable = Command::new("chattr")
            .arg("+i")
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        if !immutable {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o555)).unwrap();
        }
        ReadOnlyDir(path.to_owned(), immutable)
    }
}

impl Drop for ReadOnlyDir {
    fn drop(&mut self) {
        if self.1 {
            let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
        } else {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&self.0, std::fs::Permissions::from_mode(0o755));
        }
    }
}

#[test]
fn a_read_only_sqlite_directory_is_named_and_left_empty() {
    let dir = tempfile::tempdir().unwrap();
    let locked = dir.path().join("locked");
    std::fs::create_dir(&locked).unwrap();
    let guard = ReadOnlyDir::new(&locked);
    let out = run_program(&locked.join("app.db").display().to_string(), &[]);
    assert_clean_failure(&out, "is it writable?", "\u{0}");
    assert_eq!(
        std::fs::read_dir(&locked).unwrap().count(),
        0,
        "nothing written"
    );
    drop(guard);
}

per_backend!(
    a_conflicting_table_fails_the_program_and_is_left_alone,
    sync
);
fn a_conflicting_table_fails_the_program_and_is_left_alone(db: TestDb) {
    let mut conn = db.connect();
    diesel::sql_query("CREATE TABLE a (something_else INTEGER)")
        .execute(&mut conn)
        .unwrap();
    diesel::sql_query("INSERT INTO a (something_else) VALUES (7)")
        .execute(&mut conn)
        .unwrap();
    let out = run_program(&db.url, &[]);
    assert_clean_failure(&out, "already exists", "\u{0}");
    #[derive(diesel::QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        something_else: i32,
    }
    let rows: Vec<Row> = diesel::sql_query("SELECT something_else FROM a")
        .load(&mut conn)
        .unwrap();
    assert_eq!(rows.len(), 1, "{}", db.backend);
    assert_eq!(rows[0].something_else, 7);
    assert!(
        diesel::sql_query("SELECT * FROM b")
            .execute(&mut conn)
            .is_err(),
        "{}: b was not created",
        db.backend
    );
}

per_backend!(
    the_password_never_appears_in_echo_logs_or_debug_output,
    sync,
    [postgres]
);
fn the_password_never_appears_in_echo_logs_or_debug_output(db: TestDb) {
    // The server here trusts local connections, so any password is accepted.
    let secret = "T0pSecretPw";
    let url = db
        .url
        .replacen("://postgres@", &format!("://postgres:{secret}@"), 1);
    assert!(
        url.contains(secret),
        "the test URL carries a password: {url}"
    );
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_greenlet-orm"))
        .arg("--echo")
        .current_dir(dir.path())
        .env("DATABASE_URL", &url)
        .env("RUST_LOG", "trace")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        all.contains("connected to postgres://postgres:***@"),
        "{all}"
    );
    assert!(!all.contains(secret), "password leaked into the output");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let engine = diesel_runsync::Engine::<greenlet_orm::AnyConnection>::connect(
            &url,
            diesel_runsync::EngineOptions::default(),
        )
        .await
        .unwrap();
        let session = engine.session();
        for shown in [
            format!("{engine:?}"),
            format!("{session:?}"),
            engine.url().to_string(),
            format!("{:?}", engine.url()),
        ] {
            assert!(!shown.contains(secret), "{shown}");
        }
    });

    // Issue 9: libpq's ?password= parameter, and a password with an
    // unencoded '?' (libpq reads both), given with --database-url.
    let (head, tail) = ("T0pSecretHead", "T0pSecretTail");
    let sep = if db.url.contains('?') { '&' } else { '?' };
    let forms = [
        (
            format!("{}{sep}password={head}{tail}", db.url),
            "password=***",
        ),
        (
            db.url
                .replacen("://postgres@", &format!("://postgres:{head}?{tail}@"), 1),
            "connected to postgres://postgres:***@",
        ),
    ];
    for (url, shown) in forms {
        assert!(url.contains(head), "the test URL carries a password: {url}");
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_greenlet-orm"))
            .args(["--echo", "--database-url", &url])
            .current_dir(dir.path())
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "trace")
            .output()
            .unwrap();
        assert!(out.status.success(), "{url}: {}", text(&out.stderr));
        let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(all.contains(shown), "{all}");
        assert!(all.contains("connected to"), "{all}");
        for piece in [head, tail] {
            assert!(
                !all.contains(piece),
                "password leaked into the output: {all}"
            );
        }
        runtime.block_on(async {
            let engine = diesel_runsync::Engine::<greenlet_orm::AnyConnection>::connect(
                &url,
                diesel_runsync::EngineOptions::default(),
            )
            .await
            .unwrap();
            for shown in [
                format!("{engine:?}"),
                format!("{:?}", engine.session()),
                engine.url().to_string(),
                format!("{:?}", engine.url()),
            ] {
                for piece in [head, tail] {
                    assert!(!shown.contains(piece), "{shown}");
                }
            }
        });
    }
}

per_backend!(migrate_subcommands_apply_list_and_revert, sync);
fn migrate_subcommands_apply_list_and_revert(db: TestDb) {
    let status = run_program(&db.url, &["migrate", "status"]);
    assert_eq!(
        text(&status.stdout),
        "pending  20240101000000\n0 applied, 1 pending\n"
    );
    let applied = run_program(&db.url, &["migrate", "run"]);
    assert_eq!(
        text(&applied.stdout),
        "applied 1 migration(s)\n",
        "{}",
        db.backend
    );
    let status = run_program(&db.url, &["migrate", "status"]);
    assert_eq!(
        text(&status.stdout),
        "applied  20240101000000\n1 applied, 0 pending\n"
    );
    let reverted = run_program(&db.url, &["migrate", "revert"]);
    assert_eq!(text(&reverted.stdout), "reverted 20240101000000\n");
    let nothing = run_program(&db.url, &["migrate", "revert"]);
    assert_clean_failure(&nothing, "no migration is applied", "\u{0}");
}

per_backend!(run_scales_the_program_and_rejects_bad_counts, sync);
fn run_scales_the_program_and_rejects_bad_counts(db: TestDb) {
    let lazy = run_program(&db.url, &["run", "--n", "50"]);
    assert!(lazy.status.success(), "{}", text(&lazy.stderr));
    assert!(
        text(&lazy.stdout).starts_with("lazy: 50 parents and 75 children inserted"),
        "{}",
        text(&lazy.stdout)
    );
    let eager = run_program(&db.url, &["run", "--n", "3", "--eager"]);
    assert_eq!(
        text(&eager.stdout),
        SEED_OUTPUT,
        "3 parents print like the seed"
    );
    let (parents, _) = all_rows(&mut db.connect()).unwrap();
    assert_eq!(parents[0].data.as_deref(), Some("new data"));
    let zero = run_program(&db.url, &["run", "--n", "0"]);
    assert_eq!(zero.status.code(), Some(2), "usage errors exit with 2");
    assert!(text(&zero.stderr).contains("at least 1"));
}

per_backend!(run_stream_prints_the_parents_as_they_come, sync);
fn run_stream_prints_the_parents_as_they_come(db: TestDb) {
    let small = run_program(&db.url, &["run", "--n", "3", "--stream"]);
    assert!(small.status.success(), "{}", text(&small.stderr));
    assert_eq!(text(&small.stdout), SEED_OUTPUT, "{}", db.backend);
    let (parents, _) = all_rows(&mut db.connect()).unwrap();
    assert_eq!(parents[0].data.as_deref(), Some("new data"));
    // Every object, in id order, each parent before its children.
    let printed = run_program(&db.url, &["run", "--n", "50", "--stream", "--print"]);
    assert!(printed.status.success(), "{}", text(&printed.stderr));
    let out = text(&printed.stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 50 + 75, "{}", db.backend);
    assert_eq!(lines[0], "A(id=1, data='a1')");
    assert_eq!(lines[3], "A(id=2, data='a2')");
    assert_eq!(lines[lines.len() - 1], "B(id=75, a_id=50, data=None)");
    let summary = run_program(&db.url, &["run", "--n", "500", "--stream"]);
    assert!(summary.status.success(), "{}", text(&summary.stderr));
    let line = text(&summary.stdout);
    assert!(
        line.starts_with("stream: 500 parents and 750 children inserted")
            && line.contains("500 parents and 750 children loaded"),
        "{line}"
    );
    let both = run_program(&db.url, &["run", "--n", "3", "--stream", "--eager"]);
    assert_eq!(both.status.code(), Some(2), "--stream and --eager conflict");
}
