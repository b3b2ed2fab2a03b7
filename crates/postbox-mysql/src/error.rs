//! Turning sqlx errors into [`StoreError`]s that say what is wrong without
//! leaking a password, and checking that the server is new enough.

use postbox_core::StoreError;
use sqlx::mysql::MySqlDatabaseError;

// MySQL / MariaDB server error numbers we tell apart.
const ER_CHECKREAD: u16 = 1020; // record changed since the snapshot (innodb_snapshot_isolation)
const ER_DISK_FULL: u16 = 1021;
const ER_CON_COUNT_ERROR: u16 = 1040; // too many connections
const ER_RECORD_FILE_FULL: u16 = 1114; // table full (tablespace or disk)
const ER_TOO_MANY_USER_CONNECTIONS: u16 = 1203; // max_user_connections
const ER_OPTION_PREVENTS_STATEMENT: u16 = 1290; // mostly --read-only (a replica, a failover)
const ER_CANT_EXECUTE_IN_READ_ONLY_TRANSACTION: u16 = 1792; // SQLSTATE 25006
const ER_READ_ONLY_MODE: u16 = 1836;
const ER_STATEMENT_TIMEOUT: u16 = 1969; // MariaDB: max_statement_time exceeded
const ER_QUERY_TIMEOUT: u16 = 3024; // MySQL 8: max_execution_time exceeded
const ER_DBACCESS_DENIED_ERROR: u16 = 1044;
const ER_ACCESS_DENIED_ERROR: u16 = 1045;
const ER_BAD_DB_ERROR: u16 = 1049;
const ER_ACCESS_DENIED_NO_PASSWORD_ERROR: u16 = 1698; // unknown user, or auth plugin refused
const ER_SERVER_SHUTDOWN: u16 = 1053;
const ER_NO_SUCH_TABLE: u16 = 1146;
pub(crate) const ER_LOCK_WAIT_TIMEOUT: u16 = 1205;
const ER_LOCK_DEADLOCK: u16 = 1213;
const ER_QUERY_INTERRUPTED: u16 = 1317;
const ER_CONNECTION_KILLED: u16 = 1927; // MariaDB
const ER_CLIENT_INTERACTION_TIMEOUT: u16 = 4031; // MySQL 8

/// The server number of a database error, if `e` is one.
pub(crate) fn error_number(e: &sqlx::Error) -> Option<u16> {
    e.as_database_error()
        .and_then(|d| d.try_downcast_ref::<MySqlDatabaseError>())
        .map(MySqlDatabaseError::number)
}

/// Whether a server error number means "try again later": the operation
/// may well succeed unchanged once the server, or another session, has moved
/// on.
///
/// * too many connections, for the server (1040) or for the user (1203);
/// * shutdown (1053), a killed or interrupted session (1317, 1927) or one
///   that idled out (4031);
/// * lock waits: deadlock (1213), row lock wait timeout (1205), and a write
///   conflict with the transaction's snapshot under
///   `innodb_snapshot_isolation` (1020);
/// * a statement over a time limit an operator set (MariaDB's
///   `max_statement_time` 1969, MySQL's `max_execution_time` 3024);
/// * a read-only server or transaction (1290, 1836, 1792): a primary
///   demoted during a failover, or a pool still connected to it; the next
///   connection reaches the new primary;
/// * a full table or disk (1114, 1021), which an operator frees.
fn is_transient(number: u16) -> bool {
    matches!(
        number,
        ER_CON_COUNT_ERROR
            | ER_TOO_MANY_USER_CONNECTIONS
            | ER_SERVER_SHUTDOWN
            | ER_LOCK_WAIT_TIMEOUT
            | ER_LOCK_DEADLOCK
            | ER_CHECKREAD
            | ER_QUERY_INTERRUPTED
            | ER_CONNECTION_KILLED
            | ER_CLIENT_INTERACTION_TIMEOUT
            | ER_STATEMENT_TIMEOUT
            | ER_QUERY_TIMEOUT
            | ER_OPTION_PREVENTS_STATEMENT
            | ER_READ_ONLY_MODE
            | ER_CANT_EXECUTE_IN_READ_ONLY_TRANSACTION
            | ER_RECORD_FILE_FULL
            | ER_DISK_FULL
    )
}

/// Maps an error from a store operation: connection-level and transient
/// problems (io, pool, and the server errors of [`is_transient`]) are
/// [`StoreError::Unavailable`]; a missing outbox table is
/// [`StoreError::Schema`]; the rest is [`StoreError::Database`].
pub(crate) fn map_err(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => StoreError::Unavailable(Box::new(e)),
        sqlx::Error::Database(_) => match error_number(&e) {
            Some(n) if is_transient(n) => StoreError::Unavailable(Box::new(e)),
            Some(ER_NO_SUCH_TABLE) => StoreError::Schema(e.to_string()),
            _ => StoreError::Database(Box::new(e)),
        },
        _ => StoreError::Database(Box::new(e)),
    }
}

/// Maps an error from establishing a connection to `url` (already
/// redacted): bad credentials and a missing database are configuration
/// errors that name the fix; an unreachable server is `Unavailable` and
/// names host and port.
pub(crate) fn map_connect_err(e: sqlx::Error, url: &str) -> StoreError {
    match error_number(&e) {
        Some(
            ER_ACCESS_DENIED_ERROR | ER_DBACCESS_DENIED_ERROR | ER_ACCESS_DENIED_NO_PASSWORD_ERROR,
        ) => StoreError::Config(format!(
            "MySQL at {url} refused the login: {} (check the user name and password in the URL)",
            database_message(&e)
        )),
        Some(ER_BAD_DB_ERROR) => StoreError::Config(format!(
            "MySQL at {url}: {} (create the database, or fix its name in the URL)",
            database_message(&e)
        )),
        // The server is reachable and the login right: only full. Try again
        // once other clients let go of connections, or raise the limit.
        Some(n @ (ER_CON_COUNT_ERROR | ER_TOO_MANY_USER_CONNECTIONS)) => {
            let limit = if n == ER_CON_COUNT_ERROR {
                "max_connections"
            } else {
                "max_user_connections"
            };
            StoreError::Unavailable(
                format!(
                    "MySQL at {url} has no connection to spare: {} (the server's {limit}; \
                     fewer pooled connections, or a higher limit)",
                    database_message(&e)
                )
                .into(),
            )
        }
        _ => {
            // `Io` says "error communicating with database: Connection
            // refused (os error 111)"; after "cannot reach" only the io
            // error adds anything
            let detail = match &e {
                sqlx::Error::Io(io) => io.to_string(),
                _ => e.to_string(),
            };
            match map_err(e) {
                StoreError::Unavailable(_) => {
                    StoreError::Unavailable(format!("cannot reach MySQL at {url}: {detail}").into())
                }
                StoreError::Database(_) => {
                    StoreError::Database(format!("MySQL at {url}: {detail}").into())
                }
                other => other,
            }
        }
    }
}

fn database_message(e: &sqlx::Error) -> String {
    e.as_database_error()
        .map_or_else(|| e.to_string(), |d| d.message().to_owned())
}

pub use postbox_core::redact_url;

/// The server flavours postbox can tell apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flavour {
    MariaDb,
    MySql,
}

impl Flavour {
    /// The flavour of a `SELECT VERSION()` answer: MariaDB says so in it.
    pub(crate) fn of(version: &str) -> Self {
        if version.to_ascii_lowercase().contains("mariadb") {
            Self::MariaDb
        } else {
            Self::MySql
        }
    }
}

/// Oldest versions with `FOR UPDATE SKIP LOCKED` and everything else the
/// schema uses (expression defaults, `CREATE TRIGGER IF NOT EXISTS`).
const MIN_MARIADB: (u32, u32, u32) = (10, 6, 0);
const MIN_MYSQL: (u32, u32, u32) = (8, 0, 29);

/// Checks a `SELECT VERSION()` answer; the error names the version found
/// and the version needed.
pub(crate) fn check_server_version(version: &str) -> Result<Flavour, StoreError> {
    let flavour = Flavour::of(version);
    // MariaDB may report a "5.5.5-" compatibility prefix before its real version.
    let text = version.strip_prefix("5.5.5-").unwrap_or(version);
    let mut parts = text
        .split(|c: char| !c.is_ascii_digit())
        .take(3)
        .map(str::parse::<u32>);
    let parsed = match (parts.next(), parts.next(), parts.next()) {
        (Some(Ok(a)), Some(Ok(b)), Some(Ok(c))) => (a, b, c),
        _ => {
            return Err(StoreError::Config(format!(
                "cannot read the server version {version:?}: postbox needs MariaDB >= 10.6 or MySQL >= 8.0.29"
            )));
        }
    };
    let (name, min) = match flavour {
        Flavour::MariaDb => ("MariaDB", MIN_MARIADB),
        Flavour::MySql => ("MySQL", MIN_MYSQL),
    };
    if parsed < min {
        return Err(StoreError::Config(format!(
            "{name} {version} is too old: postbox needs {name} >= {}.{}.{} (FOR UPDATE SKIP LOCKED, \
             expression defaults, CREATE TRIGGER IF NOT EXISTS); upgrade the server",
            min.0, min.1, min.2
        )));
    }
    Ok(flavour)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_server_errors_are_told_apart() {
        for n in [
            1020, 1021, 1040, 1053, 1114, 1203, 1205, 1213, 1290, 1317, 1792, 1836, 1927, 1969,
            3024, 4031,
        ] {
            assert!(is_transient(n), "{n} should be Unavailable");
        }
        // syntax, duplicate key, unknown column, access denied, no such table
        for n in [1064, 1062, 1054, 1045, 1146] {
            assert!(!is_transient(n), "{n} should not be Unavailable");
        }
    }

    #[test]
    fn accepts_supported_servers() {
        for v in [
            "10.11.19-MariaDB-0+deb12u1",
            "10.6.0-MariaDB",
            "5.5.5-10.6.12-MariaDB-log",
            "11.4.2-MariaDB",
            "8.0.36",
            "8.4.0-commercial",
            "9.1.0",
        ] {
            assert!(check_server_version(v).is_ok(), "{v} refused");
        }
    }

    #[test]
    fn refuses_old_servers_naming_the_versions() {
        for (v, needs) in [
            ("10.5.21-MariaDB", "MariaDB >= 10.6.0"),
            ("10.3.39-MariaDB-0+deb10u1", "MariaDB >= 10.6.0"),
            ("5.5.5-10.4.1-MariaDB", "MariaDB >= 10.6.0"),
            ("5.7.44-log", "MySQL >= 8.0.29"),
            ("8.0.28", "MySQL >= 8.0.29"),
        ] {
            let e = check_server_version(v).expect_err(v).to_string();
            assert!(e.contains(v) && e.contains(needs), "{e}");
        }
        let e = check_server_version("garbage").expect_err("garbage");
        assert!(e.to_string().contains("\"garbage\""), "{e}");
    }
}
