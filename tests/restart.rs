//! Servers stopped and started while sessions run: sessions fail with
//! errors while the server is down, work again soon after it is back, and
//! never commit part of a unit. Each test starts a throwaway server of its
//! own (a PostgreSQL cluster with `initdb` + `pg_ctl`, a MariaDB with
//! `mariadb-install-db` + `mariadbd`) on a free port in a temporary
//! directory, never the shared one.
//!
//! The tests are `restarts_lose_nothing_and_recover::postgres` and
//! `::mysql` (MariaDB), ignored like every other test of their backend:
//! when its URL variable was unset at build time, or its cargo feature is
//! off. When they run they need root (the servers run as their system
//! users) and the server binaries, and fail saying so if either is missing.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Flavor, blocking, insert_children, insert_parent, partial_units_on, runtime};
use diesel::prelude::*;
use diesel_runsync::{AsyncSession, DatabaseUrl, Engine, EngineOptions, PoolableConnection};
use greenlet_orm::{AnyConnection, DemoError};
use runsync_testkit::free_port;

const RESTARTS: usize = 3;
const RECOVERY_BOUND: Duration = Duration::from_secs(5);

fn unavailable(why: &str) -> ! {
    panic!(
        "cannot start a throwaway server: {why} (this test runs with its backend's other \
         tests; `cargo test -- --skip restarts_lose_nothing_and_recover` leaves it out)"
    )
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("the command starts");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Gives `dir` to a system user.
fn chown(dir: &Path, user: &str) {
    run(Command::new("chown").arg("-R").arg(user).arg(dir));
}

enum Kind {
    Postgres { bin: PathBuf },
    Mariadb { child: Option<Child> },
}

/// A database server private to one test.
struct Throwaway {
    kind: Kind,
    dir: tempfile::TempDir,
    port: u16,
}

impl Throwaway {
    fn postgres() -> Throwaway {
        if !is_root() {
            unavailable("not running as root");
        }
        let Some(bin) = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|mut versions| versions.next())
            .and_then(|v| v.ok())
            .map(|v| v.path().join("bin"))
            .filter(|bin| bin.join("initdb").exists())
        else {
            unavailable("initdb not found under /usr/lib/postgresql");
        };
        let dir = tempfile::Builder::new()
            .prefix("rs-pg-")
            .tempdir_in("/tmp")
            .unwrap();
        chown(dir.path(), "postgres");
        run(Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(bin.join("initdb"))
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(dir.path().join("data")));
        let server = Throwaway {
            kind: Kind::Postgres { bin },
            dir,
            port: free_port(),
        };
        server.start();
        server
    }

    fn mariadb() -> Throwaway {
        if !is_root() {
            unavailable("not running as root");
        }
        if !Path::new("/usr/sbin/mariadbd").exists() {
            unavailable("/usr/sbin/mariadbd not found");
        }
        let dir = tempfile::Builder::new()
            .prefix("rs-my-")
            .tempdir_in("/tmp")
            .unwrap();
        chown(dir.path(), "mysql");
        run(Command::new("mariadb-install-db")
            .args([
                "--no-defaults",
                "--user=mysql",
                "--skip-test-db",
                "--auth-root-authentication-method=normal",
            ])
            .arg(format!("--datadir={}", dir.path().join("data").display())));
        let mut server = Throwaway {
            kind: Kind::Mariadb { child: None },
            dir,
            port: free_port(),
        };
        server.start_mariadb();
        let mut conn = server.connect_retrying("mysql://root@127.0.0.1:{port}/mysql");
        diesel::sql_query("CREATE DATABASE test")
            .execute(&mut conn)
            .unwrap();
        server
    }

    fn url(&self) -> String {
        match self.kind {
            Kind::Postgres { .. } => {
                format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
            }
            Kind::Mariadb { .. } => format!("mysql://root@127.0.0.1:{}/test", self.port),
        }
    }

    fn connect_retrying(&self, template: &str) -> AnyConnection {
        let url = DatabaseUrl::parse(&template.replace("{port}", &self.port.to_string())).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match AnyConnection::connect(&url) {
                Ok(conn) => return conn,
                Err(e) if Instant::now() > deadline => {
                    panic!("throwaway server never answered: {e}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn start(&self) {
        if let Kind::Postgres { bin } = &self.kind {
            let options = format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
                self.port,
                self.dir.path().display()
            );
            run(Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(bin.join("pg_ctl"))
                .arg("-D")
                .arg(self.dir.path().join("data"))
                .arg("-l")
                .arg(self.dir.path().join("log"))
                .args(["-w", "-o", &options, "start"]));
        }
    }

    fn start_mariadb(&mut self) {
        let dir = self.dir.path();
        let child = Command::new("/usr/sbin/mariadbd")
            .args([
                "--no-defaults",
                "--user=mysql",
                "--bind-address=127.0.0.1",
                "--skip-grant-tables",
            ])
            .arg(format!("--port={}", self.port))
            .arg(format!("--datadir={}", dir.join("data").display()))
            .arg(format!("--socket={}", dir.join("mysqld.sock").display()))
            .arg(format!("--pid-file={}", dir.join("mysqld.pid").display()))
            .arg(format!("--log-error={}", dir.join("log").display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mariadbd starts");
        self.kind = Kind::Mariadb { child: Some(child) };
    }

    /// Stops the server abruptly: every session is cut.
    fn stop(&mut self) {
        match &mut self.kind {
            Kind::Postgres { bin } => run(Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(bin.join("pg_ctl"))
                .arg("-D")
                .arg(self.dir.path().join("data"))
                .args(["-w", "-m", "immediate", "stop"])),
            Kind::Mariadb { child } => {
                if let Some(mut child) = child.take() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
    }

    fn restart(&mut self) {
        match self.kind {
            Kind::Postgres { .. } => self.start(),
            Kind::Mariadb { .. } => self.start_mariadb(),
        }
    }
}

impl Drop for Throwaway {
    fn drop(&mut self) {
        if let Kind::Postgres { .. } = self.kind {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.stop()));
        } else {
            self.stop();
        }
    }
}

async fn unit(engine: &Engine<AnyConnection>) -> Result<(), DemoError> {
    let mut session: AsyncSession<AnyConnection> = engine.session();
    session.begin()?;
    let id = session.run_sync(insert_parent).await?;
    session.run_sync(move |c| insert_children(c, id)).await?;
    session.commit().await?;
    Ok(())
}

/// Stops or restarts the server on the blocking pool.
async fn on_server(server: &Arc<Mutex<Throwaway>>, action: fn(&mut Throwaway)) {
    let server = server.clone();
    blocking(move || action(&mut server.lock().unwrap())).await;
}

async fn survive_restarts(server: Arc<Mutex<Throwaway>>, name: &str) {
    let url = server.lock().unwrap().url();
    let engine = Engine::<AnyConnection>::connect(
        &url,
        EngineOptions::default()
            .max_size(4)
            .connection_timeout(Duration::from_secs(1)),
    )
    .await
    .unwrap();
    greenlet_orm::program::reset_schema(&engine).await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (engine, stop, ok, failed) =
                (engine.clone(), stop.clone(), ok.clone(), failed.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match unit(&engine).await {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        })
        .collect();

    let mut worst = Duration::ZERO;
    for _ in 0..RESTARTS {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let failed_before = failed.load(Ordering::Relaxed);
        on_server(&server, Throwaway::stop).await;
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(
            failed.load(Ordering::Relaxed) > failed_before,
            "{name}: sessions must fail while the server is down"
        );
        on_server(&server, Throwaway::restart).await;
        let up = Instant::now();
        loop {
            if unit(&engine).await.is_ok() {
                break;
            }
            assert!(
                up.elapsed() < Duration::from_secs(30),
                "{name}: never recovered"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        worst = worst.max(up.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let partial = blocking(move || {
        let server = server.lock().unwrap();
        let mut conn =
            server.connect_retrying(&server.url().replace(&server.port.to_string(), "{port}"));
        partial_units_on(&mut conn, 2)
    })
    .await;
    let _ = writeln!(
        std::io::stderr(),
        "FIGURE restart {name}: restarts={RESTARTS} units_ok={} units_failed={} worst_recovery_seconds={:.2} partial_units={partial}",
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        worst.as_secs_f64()
    );
    assert_eq!(partial, 0, "{name}");
    assert!(worst < RECOVERY_BOUND, "{name}: recovered in {worst:?}");
}

/// Starts the server (blocking, before the runtime), runs the test on a
/// 2-worker runtime, and stops the server once the runtime is gone (also
/// when the test panics).
fn restarts(start: fn() -> Throwaway, name: &str) {
    let server = Arc::new(Mutex::new(start()));
    let runtime = runtime(Flavor::MultiThread);
    runtime.block_on(survive_restarts(server.clone(), name));
    drop(runtime);
    drop(server);
}

/// One test per backend, named like [`per_backend!`](common::per_backend)'s
/// and ignored under the same conditions, but on a throwaway server of
/// its own instead of a database on the shared one.
mod restarts_lose_nothing_and_recover {
    use super::{Throwaway, restarts};

    #[test]
    #[cfg_attr(
        not(feature = "postgres"),
        ignore = "built without the `postgres` feature"
    )]
    #[cfg_attr(
        all(feature = "postgres", runsync_skip_postgres),
        ignore = "PG_DATABASE_URL is not set (PostgreSQL tests are off)"
    )]
    fn postgres() {
        restarts(Throwaway::postgres, "postgres");
    }

    #[test]
    #[cfg_attr(
        not(feature = "mysql"),
        ignore = "built without the `mysql` feature (cargo test --features mysql)"
    )]
    #[cfg_attr(
        all(feature = "mysql", runsync_skip_mysql),
        ignore = "MYSQL_DATABASE_URL is not set (MySQL tests are off)"
    )]
    fn mysql() {
        restarts(Throwaway::mariadb, "mariadb");
    }
}
