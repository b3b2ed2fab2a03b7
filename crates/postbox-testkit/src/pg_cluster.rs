//! A throwaway PostgreSQL cluster for tests that must stop, restart or
//! crash the server: `initdb` in a temporary directory, its own port, run
//! as the `postgres` OS user when the test runs as root (PostgreSQL refuses
//! to run as root). Never the shared server. Stopped and removed on drop.
//!
//! Needs `initdb` and `pg_ctl` on `PATH` (this machine kind links them into
//! `/usr/local/bin`); a test panics naming them when they are missing.

use std::process::Command;

/// A PostgreSQL server of the test's own.
#[derive(Debug)]
pub struct PgCluster {
    dir: tempfile::TempDir,
    port: u16,
    as_postgres: bool,
}

impl PgCluster {
    /// Creates and starts a cluster with trust authentication for role
    /// `postgres` on `127.0.0.1` and a free port.
    ///
    /// # Panics
    ///
    /// When `initdb` or `pg_ctl` fail or are missing.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("postbox-test-pg")
            .tempdir()
            .unwrap_or_else(|e| panic!("temporary directory for a PostgreSQL cluster: {e}"));
        let as_postgres = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        if as_postgres {
            let ok = Command::new("chown")
                .args(["-R", "postgres:", &dir.path().display().to_string()])
                .status()
                .is_ok_and(|s| s.success());
            assert!(
                ok,
                "chown of the cluster directory to the postgres user failed"
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("no free port for a PostgreSQL cluster: {e}"));
        let c = Self {
            dir,
            port,
            as_postgres,
        };
        c.pg(&[
            "initdb",
            "-D",
            &c.data(),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        c.pg_ctl(&["-o", &c.server_options(), "start"]);
        c
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The URL of database `db` as role `postgres`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@{}/{db}", self.addr())
    }

    /// `pg_ctl restart -m fast`: a clean shutdown (every session dropped,
    /// everything flushed), then the server comes back on the same port.
    pub fn restart(&self) {
        self.pg_ctl(&["-m", "fast", "restart"]);
    }

    /// `pg_ctl restart -m immediate`: the server stops without a shutdown
    /// checkpoint, as in a crash, and recovers from its WAL when it starts
    /// again. Commits made with `synchronous_commit = off` in the last
    /// moments may be lost.
    pub fn crash_restart(&self) {
        self.pg_ctl(&["-m", "immediate", "restart"]);
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn server_options(&self) -> String {
        format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=60 -c shared_buffers=32MB",
            self.port,
            self.dir.path().display()
        )
    }

    fn pg_ctl(&self, args: &[&str]) {
        let data = self.data();
        // -l on every call: without it the server inherits the test's pipes
        let log = self.dir.path().join("pg.log").display().to_string();
        let mut all = vec!["pg_ctl", "-D", &data, "-l", &log, "-w", "-t", "60"];
        all.extend_from_slice(args);
        self.pg(&all);
    }

    fn command(&self, args: &[&str]) -> Command {
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).args(args);
            c
        } else {
            let mut c = Command::new(args[0]);
            c.args(&args[1..]);
            c
        }
    }

    fn pg(&self, args: &[&str]) {
        let o = self.command(args).output().unwrap_or_else(|e| {
            panic!("running {args:?} failed ({e}); initdb and pg_ctl must be on PATH")
        });
        assert!(
            o.status.success(),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let data = self.data();
        let _ = self
            .command(&["pg_ctl", "-D", &data, "-m", "immediate", "-w", "stop"])
            .output();
    }
}
